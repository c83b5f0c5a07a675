"""
tools.py: the code_interpreter tool, the tool-call parser, and the rewards.

Top to bottom:
  1. The tool as the model sees it. execute_code(code) returns exactly the text the model is shown after
     a call (recipe/demystify/reward.py: CustomSandboxFusionTool.execute): the first ```python block if
     there is one, the last line auto-printed, stdout + stderr (so a traceback is visible) or the literal
     "no stdout here" on a timeout or a sandbox failure, cut to 256 characters around the middle.
  2. Tool calls. parse_tool_calls reads Hermes-style <tool_call>{json}</tool_call> calls
     (verl/experimental/agent_loop/tool_parser.py); run_tool_calls answers them in parallel, a call that
     cannot run getting the reference's "Error when executing tool: ..." text
     (tool_agent_loop.py: _call_tool).
  3. Rewards. score_math: the strict box of verl's math_dapo (exact string match of the last \\boxed{} in
     the last 100 characters); compute_score: the dispatch on data_source and the shaping of wrong answers
     (recipe/demystify/reward.py: compute_score). Code answers are graded by unit tests in
     common/code_tests.py.

The code runs in the sandbox of common/sandbox.py (its docstring says how it isolates the code and what it
does not protect against): the local one, warm or cold, or a SandboxFusion server, as set once per process
with common.sandbox.configure: setup_sandbox does it at a stage's start, from the stage's SandboxConfig flags.

Where this departs from the authors' code (docs/deviations.md):
  - autoprint="expression" prints the last statement only if it is a bare expression; the default
    "reference" heuristic turns `x = 5` into `print(x = 5)`;
  - a process killed by a signal gets "Process killed by signal SIGSEGV" appended (the reference shows "");
  - code_scoring="fixed" (default) reads the text after the LAST </think>, does not turn "\\n" escapes into
    newlines, grades a function problem whose tests come as an object, and calls its function where it stands
    (not moved into class Solution); "reference" keeps their bugs;
  - tool_shaping="reference" reproduces what the reference computes (-1.1 for every wrong answer); "turns"
    is what it meant to compute;
  - a `timeout` argument of a tool call is honoured up to the configured timeout (the reference has no cap).

Try it:
    python -c "import tools; print(tools.execute_code('6 * 7'))"
    python -m pytest tests/test_tools.py -q
"""
import ast
import collections
import json
import re
import shutil
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from common import sandbox
from common.cli import arg, reject_unused
from common.code_tests import Score, score_code

TOOL_NAME = "code_interpreter"
# exactly what the reference passes as tools= to apply_chat_template (verl/tools/schemas.py), key order too
TOOL_SCHEMA = {"type": "function", "function": {
    "name": "code_interpreter", "description": "A tool for executing code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string",
                                                             "description": "The code to execute."}},
                   "required": ["code"]}}}
NO_STDOUT = "no stdout here"  # the reference's text for a timeout or any sandbox failure


# -----------------------------------------------------------------------------
# 1. The tool as the model sees it

def execute_code(code: str, timeout: float = 60.0, memory_mb: int = 2048, *, autoprint: str = "reference",
                 max_output_chars: int = 256) -> str:
    """The text the model is shown for one code_interpreter call."""
    code = add_autoprint(extract_code_block(code), autoprint)
    result = sandbox.run_python(code, timeout=timeout, memory_mb=memory_mb)
    return truncate_output(_tool_text(result), max_output_chars)


def extract_code_block(code: str) -> str:
    """The first ```python block, stripped, if the code has one (only the first is run)."""
    blocks = re.findall(r"```python(.*?)```", code, re.DOTALL)
    return blocks[0].strip() if blocks else code


def add_autoprint(code: str, mode: str = "reference") -> str:
    """Make the program print its last line ("reference") or its last bare expression ("expression")."""
    if mode == "off":
        return code
    if mode == "reference":
        # Faithful quirks: only "" lines are skipped (not whitespace-only ones), and a
        # last line that is an assignment, indented, a comment or an import still
        # gets wrapped, so the model sees a TypeError or a SyntaxError.
        lines = code.split("\n")
        for i in reversed(range(len(lines))):
            if lines[i] == "":
                continue
            if not lines[i].startswith("print"):
                lines[i] = f"print({lines[i]})"
            break
        return "\n".join(lines)
    if mode == "expression":
        return _autoprint_last_expression(code)
    raise ValueError(f"unknown autoprint mode {mode!r}")


def _autoprint_last_expression(code):
    # python reads \r\n and \r as newlines too; normalising them first lets ast's
    # line numbers index code.split("\n") and changes no program's meaning
    code = code.replace("\r\n", "\n").replace("\r", "\n")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError):
        return code  # the model should see python's own error message
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1]
    value = last.value
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "print":
        return code
    lines = code.split("\n")

    def offset(lineno, col):  # ast columns count UTF-8 bytes, not characters
        return (sum(len(line) + 1 for line in lines[:lineno - 1])
                + len(lines[lineno - 1].encode()[:col].decode()))

    # the Expr node spans any parentheses, and may span several lines
    start, end = offset(last.lineno, last.col_offset), offset(last.end_lineno, last.end_col_offset)
    return code[:start] + "print(" + code[start:end] + ")" + code[end:]


def truncate_output(text: str, max_chars: int = 256) -> str:
    """The reference's tool-response truncation ("middle": the first and last max_chars / 2 characters);
    max_chars <= 0 keeps everything."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars // 2] + "...(truncated)..." + text[-(max_chars // 2):]


def _tool_text(result: sandbox.RunResult) -> str:
    if result.status != "finished":
        return NO_STDOUT
    text = result.stdout + result.stderr  # stdout first, then stderr, not interleaved
    returncode = result.returncode
    if returncode is not None and returncode < 0:
        # Our addition: the reference shows "" for a crash, which teaches nothing.
        # Buffered prints made before the crash are lost with the process.
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        text += ("\n" if text and not text.endswith("\n") else "") + f"Process killed by signal {name}"
    return text


# -----------------------------------------------------------------------------
# 2. Tool calls

class ToolCall(NamedTuple):
    """One call as the reference's HermesToolParser keeps it: the JSON object's "name" and "arguments", of any
    JSON type (a string of arguments is kept, and fails when it runs)."""
    name: object
    arguments: object


def _decode_tool_call(raw) -> ToolCall | None:
    """The call in one <tool_call> body; None for anything but a JSON object with both keys."""
    try:
        call = json.loads(raw.strip())
        return ToolCall(call["name"], call["arguments"])
    except Exception:  # bad JSON, not an object, a missing key, RecursionError, too many digits
        return None


def parse_tool_calls(text: str, counts: collections.Counter | None = None) -> list[ToolCall]:
    """Every well-formed Hermes tool call in text, in order; malformed ones are dropped (and counted).

    The reference executes only the first call of a turn (max_parallel_calls = 1); that choice belongs to the
    rollout loop."""
    calls, dropped = [], 0
    if isinstance(text, str) and "<tool_call>" in text and "</tool_call>" in text:
        for raw in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL):
            call = _decode_tool_call(raw)
            if call is None:
                dropped += 1
            else:
                calls.append(call)
    if counts is not None:
        counts["tool_calls_parsed"] += len(calls)
        counts["tool_calls_dropped"] += dropped
    return calls


TOOLS = {TOOL_NAME: execute_code}


def run_tool_calls(calls: list[ToolCall], timeout: float = 60.0, memory_mb: int = 2048, **kwargs) -> list[str]:
    """The tool text for each call, in order; the calls run in parallel. A call that cannot run (an unknown
    tool, arguments that are not an object, no `code`) gets "Error when executing tool: <the exception>", the
    text the reference shows, and the episode goes on. A `timeout` argument is honoured up to `timeout`."""
    def answer(call):
        try:
            tool = TOOLS[call.name]               # KeyError for an unknown tool, as the reference's lookup
            arguments = call.arguments
            code = arguments["code"]              # TypeError for a string of arguments, KeyError without code
            wanted = arguments.get("timeout", timeout)
            limit = (min(float(wanted), timeout) if isinstance(wanted, (int, float)) and wanted > 0
                     else timeout)
            return tool(code, limit, memory_mb, **kwargs)
        except Exception as e:
            return f"Error when executing tool: {e}"   # not truncated: the reference returns it as it is

    if not calls:
        return []
    with ThreadPoolExecutor(min(len(calls), 32)) as pool:  # 32 = the reference's num_workers
        return list(pool.map(answer, calls))


@dataclass
class ToolConfig:
    """The code-interpreter tool: what a call may use, and what the model sees of it."""
    tool_timeout: float = arg(60.0, "seconds per tool call, also the cap on a call's own `timeout` "
                                    "(reference 60)")
    tool_memory_mb: int = arg(2048, "memory per tool call in MB (reference 2048)")
    max_tool_response_chars: int = arg(256, "tool output shown to the model, cut around the middle "
                                            "(reference 256)")
    autoprint: str = arg("reference", "tool auto-print of the last line: reference (any line) | expression "
                                      "(bare expressions only)")
    dedupe_tool_calls: str = arg("auto", "identical calls of a rollout run once: auto (on for the toy's "
                                         "arithmetic, off for other data, whose code may be random: the authors "
                                         "run each call) | on | off")


@dataclass
class SandboxConfig:
    """Where tool calls and code tests run: the local sandbox (common/sandbox.py) or a SandboxFusion server."""
    sandbox: str = arg("warm", "local sandbox: warm (forked from pooled interpreters) | cold (one per call)")
    sandbox_url: str = arg("", "a SandboxFusion server for tool calls and code tests, not the local sandbox")
    # the local sandbox's interpreter: its environment is mounted read-only inside, and the model imports from it
    sandbox_python: str = arg("", "the local sandbox's Python (empty: $SOD_SANDBOX_PYTHON, else the trainer's)")
    sandbox_stdlib_ok: bool = arg(False, "run on real data though the sandbox's Python lacks numpy or sympy")


def setup_sandbox(cfg, *data: str):
    """The sandbox of this process's tool calls and code tests, set up once at a stage's start. On real data
    (anything but the toy, which needs the standard library alone) the model's code expects the packages of
    SandboxFusion's image: a local sandbox whose Python cannot import numpy or sympy stops the run here."""
    if cfg.sandbox_url:
        reject_unused(cfg, ["sandbox_python", "sandbox_stdlib_ok"], "with --sandbox_url (its image decides)")
    if cfg.sandbox_python and not shutil.which(cfg.sandbox_python):
        raise SystemExit(f"--sandbox_python {cfg.sandbox_python!r} is not an executable")
    sandbox.configure(cfg.sandbox, cfg.sandbox_url, python=cfg.sandbox_python)
    if cfg.sandbox_stdlib_ok or all(d.startswith("toy") for d in data):
        return
    missing = sandbox.missing_packages(("numpy", "sympy"))
    if missing:
        isolation = sandbox.sandbox_isolation()
        raise SystemExit(
            f"the sandbox runs {isolation.python} (isolation {isolation.level}), which cannot import "
            f"{' and '.join(missing)}; tool calls on real data expect them (SandboxFusion's image has them). "
            f"Install them into that environment ({isolation.python} -m pip install numpy sympy), point "
            "--sandbox_python at an environment that has them, or use a SandboxFusion server (--sandbox_url); "
            "--sandbox_stdlib_ok runs without them.")


@dataclass
class RewardConfig:
    """The reward: how an answer is graded, and how a wrong or overlong one is shaped."""
    math_scoring: str = arg("strict", "math and GPQA answers: strict (the reference's exact last box) "
                                      "| lenient (math-verify's symbolic equivalence)")
    code_scoring: str = arg("fixed", "code problems: fixed | reference (their </think> split, newline unescaping, "
                                     "test reading and class Solution wrapping; docs/deviations.md)")
    tool_shaping: str = arg("reference", "wrong-answer shaping: reference (-1.1) "
                                         "| turns (+0.1 per tool round) | none")
    overlong_buffer: int = arg(0, "DAPO overlong penalty buffer in tokens, 0 = off (reference 1024)")
    overlong_penalty: float = arg(1.0, "DAPO overlong penalty factor (reference 1.0)")


class Reply(NamedTuple):
    """What one trajectory's tool calls of a turn come back as."""
    texts: list[str]                # the text shown to the model, one per call
    sandbox_failure: bool = False   # the sandbox failed, not the code (the toy's flaky sandbox, toy/flaky.py)


def tool_runner(cfg, dedupe: bool = False):
    """The tool as a rollout calls it, set up by a RolloutConfig: one trajectory's calls of a turn in, one
    Reply out; `key` (trajectory, turn) names the turn. Rollouts call it from many threads at once. With
    `dedupe`, identical calls of one rollout (the n samples of a prompt often write the same code) run once
    and share the answer: exact only for deterministic code (the authors run every call)."""
    shared: dict[str, Future] = {}
    lock = threading.Lock()

    def run(calls: list[ToolCall]) -> list[str]:
        return run_tool_calls(calls, timeout=cfg.tool_timeout, memory_mb=cfg.tool_memory_mb,
                              autoprint=cfg.autoprint, max_output_chars=cfg.max_tool_response_chars)

    def call(calls: list[ToolCall], key=None) -> Reply:
        if not dedupe:
            return Reply(run(calls))
        name = json.dumps(calls, sort_keys=True)
        with lock:
            answer, first = shared.get(name), name not in shared
            if first:
                answer = shared[name] = Future()
        if first:
            answer.set_result(run(calls))  # run_tool_calls returns a text for every call, it never raises
        return Reply(answer.result())
    return call


_FAILURE_MARKERS = ("error when executing tool", "traceback", "execution timed out", "request failed")


def tool_call_failed(text: str) -> bool:
    """The reference's success flag (metrics only), inverted.

    We also count the timeout text "no stdout here" as a failure; the reference's
    markers miss it because SandboxFusion's own timeout message never reaches the model."""
    lowered = text.lower()
    return any(marker in lowered for marker in _FAILURE_MARKERS) or text.strip() == NO_STDOUT


# -----------------------------------------------------------------------------
# 3. Rewards: math and GPQA

def last_boxed_only_string(s: str) -> str | None:
    """The last "\\boxed{...}" of s with its braces matched, or None."""
    idx = s.rfind("\\boxed{")
    if idx < 0:
        return None
    depth = 0
    for i in range(idx, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return s[idx:i + 1]
    return None  # the box never closes


def score_math(solution_str: str, ground_truth: str) -> Score:
    """verl's math_dapo with strict_box_verify=True: exact match, no normalisation.

    GPQA uses it too, with the option letter as ground truth. The ground truth is
    cast with str() because eval data may store it as a number; the reference's
    data casts it the same way before it gets here."""
    s = solution_str[-300:]  # compute_score keeps the last 300 characters...
    s = s[-100:]  # ...and the strict verifier the last 100 of those
    boxed = last_boxed_only_string(s)
    pred = boxed[len("\\boxed{"):-1] if boxed is not None else None
    acc = pred == str(ground_truth)
    return Score(1.0 if acc else -1.0, acc, pred)


def score_math_lenient(solution_str: str, ground_truth: str) -> Score:
    """math_verify's symbolic equivalence on the last \\boxed{} (or the whole text)."""
    from math_verify import parse, verify  # lazy: it pulls in sympy

    # math_verify times out with signal.alarm, which raises outside the main thread;
    # there we run without its timeout.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    boxed = last_boxed_only_string(solution_str)
    try:
        gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=timeout)
        answer = parse(boxed if boxed is not None else solution_str, parsing_timeout=timeout)
        acc = bool(verify(gold, answer, timeout_seconds=timeout))
        pred = str(answer[1]) if len(answer) > 1 else None  # parse gives [sympy value, its string]
    except Exception:
        acc, pred = False, None
    return Score(1.0 if acc else -1.0, acc, pred)


# -----------------------------------------------------------------------------
# 3. Rewards: one trajectory

def compute_score(data_source: str, solution_str: str, ground_truth, extra_info: dict | None = None, *,
                  tool_shaping: str = "reference", lenient_math: bool = False,
                  code_scoring: str = "fixed") -> Score:
    """The reference's reward (recipe/demystify/reward.py: compute_score): a scorer by data source, then
    shaping of wrong answers.

    tool_shaping:
      "reference": what the reference computes. Its formula reads num_turns from
        extra_info, but the DAPO reward manager never puts it there, so it reads 0
        and every wrong answer gets min(-0.6, s - 0.1) = -1.1.
      "turns": what it meant: min(-0.6, s + 0.1 * (num_turns - 2) / 2) with
        num_turns = extra_info["num_turns"], +0.1 per tool round, capped at -0.6.
      "none": min(-0.6, s), the reference's unused outcome-only reward.
    """
    if tool_shaping not in ("reference", "turns", "none"):
        raise ValueError(f"unknown tool_shaping {tool_shaping!r}")
    if "code" in data_source.lower():
        result = score_code(solution_str, ground_truth, code_scoring=code_scoring)
    elif lenient_math:
        result = score_math_lenient(solution_str, ground_truth)
    else:
        result = score_math(solution_str, ground_truth)
    score = result.score
    if score < 0:  # a wrong answer, or code that could not be tested
        if tool_shaping == "none":
            score = min(-0.6, score)
        else:
            num_turns = (extra_info or {}).get("num_turns", 0) if tool_shaping == "turns" else 0
            score = min(-0.6, score + 0.1 * (num_turns - 2) / 2)
    return Score(score, result.acc, result.pred if result.pred is not None else "")  # "" is a vote in maj@k
