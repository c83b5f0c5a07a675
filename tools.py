"""
tools.py: the code_interpreter tool, the tool-call parser, the rewards, and the sandbox that runs model code.

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
     the last 100 characters); score_code: unit tests with partial credit, graded as the authors' sandbox
     wrapper grades them (verl/utils/reward_score/sandbox_fusion/utils.py); compute_score: the dispatch on
     data_source and the shaping of wrong answers (recipe/demystify/reward.py: compute_score).
  4. The local sandbox, where SandboxFusion runs code in the reference; and 5. a SandboxFusion client.

Where this departs from the authors' code (README, deviations table):
  - autoprint="expression" prints the last statement only if it is a bare expression; the default
    "reference" heuristic turns `x = 5` into `print(x = 5)`;
  - a process killed by a signal gets "Process killed by signal SIGSEGV" appended (the reference shows "");
  - code_scoring="fixed" (default) reads the text after the LAST </think>, does not turn "\\n" escapes into
    newlines, and grades a function problem whose tests come as an object; "reference" keeps their bugs;
  - tool_shaping="reference" reproduces what the reference computes (-1.1 for every wrong answer); "turns"
    is what it meant to compute;
  - a `timeout` argument of a tool call is honoured up to the configured timeout (the reference has no cap).

The local sandbox. Its isolation level is probed once, on first use, and logged in one line:
  - full: new pid, network, mount and IPC namespaces, a read-only root filesystem, private tmpfs /tmp (the
    working directory) and /dev/shm, and an unprivileged uid leased from a pool, so that RLIMIT_NPROC bounds
    a fork bomb per sandbox. Two ways to get there:
      warm (default): a pool of workers already inside the namespaces, each a Python interpreter that
        forks a fresh child per call (a zygote, as Chrome starts its renderers); the child enters a mount and
        IPC namespace of its own with fresh /tmp and /dev/shm, drops to the worker's uid, takes its own
        rlimits and timeout, and runs the code; afterwards everything in the worker's namespace is killed;
      cold: a new `unshare` and a new interpreter for every call (the fallback, and --sandbox cold).
  - uid: no namespaces, but the unprivileged uid (needs root); every process of that uid is killed after.
  - basic: a plain child process.
At every level: its own session and process group, an environment holding only PATH, HOME, LANG and
PYTHONIOENCODING, rlimits on address space, CPU time, processes, file size and core dumps, a parent-death
signal (no sandbox outlives the trainer), output written to files capped by RLIMIT_FSIZE and read back
only up to max_output_bytes. A call returns within about timeout + 2 s whatever the code does.
The interpreter is $SOD_SANDBOX_PYTHON if set, else this one if the unprivileged uid can run it, else
/usr/bin/python3 (standard library only): point SOD_SANDBOX_PYTHON at a world-readable venv to give the
model numpy or sympy.

What it does NOT protect against: kernel exploits and container escapes, CPU and cache side channels,
reading world-readable host files (the repository, /etc), using up the host's CPU for the duration of the
timeout, and, in the uid and basic levels, network access and writes to world-writable host directories;
in the basic level also processes that setsid() away and survive, and reading other processes'
environments. The warm path's children share the worker's hash seed and pid namespace (pids grow from
call to call). For untrusted code at scale run a real SandboxFusion service (--sandbox_url).

Try it:
    python -c "import tools; print(tools.execute_code('6 * 7'))"
    python -m pytest tests/test_tools.py -q
"""
import ast
import collections
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger("tools")

TOOL_NAME = "code_interpreter"
# exactly what the reference passes as tools= to apply_chat_template (verl/tools/schemas.py), key order too
TOOL_SCHEMA = {"type": "function", "function": {
    "name": "code_interpreter", "description": "A tool for executing code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string",
                                                             "description": "The code to execute."}},
                   "required": ["code"]}}}
NO_STDOUT = "no stdout here"  # the reference's text for a timeout or any sandbox failure

# sandbox
SANDBOX_UIDS = range(60001, 60001 + 128)  # one uid per running sandbox: RLIMIT_NPROC counts per uid
MAX_PROCESSES = 64  # RLIMIT_NPROC, only enforced once the uid is unprivileged (root ignores it)
MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: bounds stdout/stderr files and anything written
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_ENV = {"PATH": SAFE_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
# SandboxFusion HTTP API
HTTP_TRIES = 3  # the reference retries only on HTTP 504, 3 tries in all
HTTP_RETRY_DELAY = 1.0  # seconds, doubled after each 504
# code tests (verl/utils/reward_score/livecodebench/code_math.py)
CODE_TEST_TIMEOUT = 30.0
CODE_TEST_MEMORY_MB = 1024
MAX_PARALLEL_CASES = 8


# -----------------------------------------------------------------------------
# 1. The tool as the model sees it

def execute_code(code: str, timeout: float = 60.0, memory_mb: int = 2048, *, autoprint: str = "reference",
                 max_output_chars: int = 256, sandbox: str = "warm", sandbox_url: str = "") -> str:
    """The text the model is shown for one code_interpreter call."""
    code = add_autoprint(extract_code_block(code), autoprint)
    result = run_python(code, timeout=timeout, memory_mb=memory_mb, sandbox=sandbox, sandbox_url=sandbox_url)
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


def _tool_text(result: dict) -> str:
    if result["status"] != "finished":
        return NO_STDOUT
    text = result["stdout"] + result["stderr"]  # stdout first, then stderr, not interleaved
    returncode = result["returncode"]
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

def _decode_tool_call(raw):
    """A call as the reference's HermesToolParser keeps it: a JSON object with "name" and "arguments" (of any
    JSON type: a string of arguments is kept, and fails when it runs). None for anything else."""
    try:
        call = json.loads(raw.strip())
        return {"name": call["name"], "arguments": call["arguments"]}
    except Exception:  # bad JSON, not an object, a missing key, RecursionError, too many digits
        return None


def parse_tool_calls(text: str, counts: collections.Counter | None = None) -> list[dict]:
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


def run_tool_calls(calls: list[dict], timeout: float = 60.0, memory_mb: int = 2048, **kwargs) -> list[str]:
    """The tool text for each call, in order; the calls run in parallel. A call that cannot run (an unknown
    tool, arguments that are not an object, no `code`) gets "Error when executing tool: <the exception>", the
    text the reference shows, and the episode goes on. A `timeout` argument is honoured up to `timeout`."""
    def answer(call):
        try:
            tool = TOOLS[call["name"]]            # KeyError for an unknown tool, as the reference's lookup
            arguments = call["arguments"]
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


def score_math(solution_str: str, ground_truth: str) -> dict:
    """verl's math_dapo with strict_box_verify=True: exact match, no normalisation.

    GPQA uses it too, with the option letter as ground truth. The ground truth is
    cast with str() because eval data may store it as a number; the reference's
    data casts it the same way before it gets here."""
    s = solution_str[-300:]  # compute_score keeps the last 300 characters...
    s = s[-100:]  # ...and the strict verifier the last 100 of those
    boxed = last_boxed_only_string(s)
    pred = boxed[len("\\boxed{"):-1] if boxed is not None else None
    acc = pred == str(ground_truth)
    return {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


def score_math_lenient(solution_str: str, ground_truth: str) -> dict:
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
    return {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}

# -----------------------------------------------------------------------------
# 3. Rewards: code

# A function problem ("fn_name") is graded as the authors' sandbox wrapper grades it: the solution behind a
# preamble of star imports (LeetCode-style signatures such as List[int] need them), then a harness that reads
# one JSON value per line of stdin, calls the function (a top-level one, else Solution().fn_name), and prints
# the result: json.dumps for dict, list, tuple, None and bool, str() for anything else. A failure prints
# nothing and exits 0. The printed text is compared with the expected output as a string, after rstrip("\n").
_STAR_IMPORTED = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                  "statistics", "itertools", "functools", "operator", "io", "sys", "json",
                  "builtins", "typing")
_FUNCTION_PREAMBLE = ("import traceback\n" + "".join(f"from {m} import *\n" for m in _STAR_IMPORTED)
                      + "".join(f"import {m}\n" for m in _STAR_IMPORTED if m not in ("builtins", "typing")))
_FUNCTION_HARNESS = """

def _sod_call_function():
    raw = sys.stdin.read()
    try:
        args = [json.loads(line) for line in raw.split("\\n")] if raw.strip() else []
        target = globals()[{fn!r}] if {fn!r} in globals() else getattr(globals()["Solution"](), {fn!r})
        result = target(*args)
    except BaseException:
        traceback.print_exc()
        return
    if isinstance(result, (dict, list, tuple)) or result is None or isinstance(result, bool):
        print(json.dumps(result))
    else:
        print(str(result))


_sod_call_function()
"""


def check_code_tests(tests) -> dict:
    """A code problem's ground truth as a dict, or ValueError saying what is wrong with it: {"inputs",
    "outputs"} (stdin/stdout), the same with "fn_name" (a function's arguments and return value), or
    {"import_prefix", "test_code", "entry_point"} (LeetCode asserts); a JSON string of one of these is read
    first."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"code tests are a string that is not JSON ({e.msg})") from None
    if not isinstance(tests, dict):
        raise ValueError(f"code tests must be an object, not a {type(tests).__name__}")
    if {"import_prefix", "test_code", "entry_point"} <= tests.keys():
        return tests
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if (not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs)
            or not inputs):
        raise ValueError("code tests need equally long, non-empty `inputs` and `outputs` lists "
                         "(or import_prefix, test_code and entry_point)")
    return tests


def _exited_cleanly(result):
    return result["status"] == "finished" and result["returncode"] == 0


def _printed(expected):
    return lambda r: _exited_cleanly(r) and r["stdout"].rstrip("\n") == str(expected).rstrip("\n")


def _code_cases(code: str, tree, tests: dict):
    """[(program, stdin, passed(result))] for one test spec, or None if the code cannot be tested."""
    if "import_prefix" in tests:
        # LeetCode style, as the reference builds it: check()'s header line glued to each
        # later non-empty line ("def check(candidate):" + "    assert ..." is valid python)
        lines = [line for line in tests["test_code"].split("\n") if line != ""]
        return [(tests["import_prefix"] + code + "\n" + lines[0] + lines[i]
                 + f"\ncheck({tests['entry_point']})", "", _exited_cleanly) for i in range(1, len(lines))]
    if "fn_name" in tests:
        fn = tests["fn_name"]
        defines = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        if "Solution" not in defines and fn not in defines:
            return None  # the reference cannot wrap a missing function into class Solution
        program = _FUNCTION_PREAMBLE + code + _FUNCTION_HARNESS.format(fn=fn)
        return [(program, str(inp), _printed(out)) for inp, out in zip(tests["inputs"], tests["outputs"])]
    return [(code, str(inp), _printed(out)) for inp, out in zip(tests["inputs"], tests["outputs"])]


def score_code(solution_str: str, tests, *, code_scoring: str = "fixed", timeout: float = CODE_TEST_TIMEOUT,
               sandbox: str = "warm", sandbox_url: str = "") -> dict:
    """The fraction of unit tests the last ```python block passes
    (verl/utils/reward_score/livecodebench/code_math.py).

    code_scoring="fixed" reads the text after the last </think>; "reference" keeps the authors' behaviour:
    split("</think>")[1] (the text between the first two), every "\\n" escape turned into a line break (which
    breaks print("\\n".join(...))), and a function problem whose tests come as an object (not a JSON string)
    scored -1 unless the code defines class Solution (their str() / json.loads round trip of the tests)."""
    if code_scoring not in ("fixed", "reference"):
        raise ValueError(f"unknown code_scoring {code_scoring!r}")
    fail = {"score": -1.0, "acc": False, "pred": None}
    reference = code_scoring == "reference"
    if "</think>" in solution_str:
        solution_str = (solution_str.split("</think>")[1] if reference
                        else solution_str.rsplit("</think>", 1)[1])
    blocks = re.findall(r"```python\n(.*?)```", solution_str, re.DOTALL)
    if not blocks:
        return fail
    code = blocks[-1]
    if reference:
        code = code.replace("\\n", "\n").replace("\\t", "\t")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError):  # ValueError: a null byte
        return fail
    as_object = isinstance(tests, dict)
    tests = check_code_tests(tests)
    if reference and as_object and "fn_name" in tests and "class Solution" not in code:
        return {"score": -1.0, "acc": False, "pred": code}
    passed = code_verdicts(code, tree, tests, timeout=timeout, sandbox=sandbox, sandbox_url=sandbox_url)
    if not passed:
        return fail
    return {"score": sum(passed) / len(passed), "acc": all(passed), "pred": code}


def code_verdicts(code: str, tree, tests: dict, *, timeout: float = CODE_TEST_TIMEOUT, sandbox: str = "warm",
                  sandbox_url: str = "") -> list[bool] | None:
    """Pass or fail for each test case, the cases run in parallel; None if the code cannot be tested."""
    cases = _code_cases(code, tree, tests)
    if not cases:
        return None

    def run(case):
        return run_python(case[0], case[1], timeout, CODE_TEST_MEMORY_MB, sandbox=sandbox,
                          sandbox_url=sandbox_url)

    with ThreadPoolExecutor(min(len(cases), MAX_PARALLEL_CASES)) as pool:
        results = list(pool.map(run, cases))
    return [passes(result) for (_, _, passes), result in zip(cases, results)]


# -----------------------------------------------------------------------------
# 3. Rewards: one trajectory

def compute_score(data_source: str, solution_str: str, ground_truth, extra_info: dict | None = None, *,
                  tool_shaping: str = "reference", lenient_math: bool = False, code_scoring: str = "fixed",
                  sandbox: str = "warm", sandbox_url: str = "") -> dict:
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
        result = score_code(solution_str, ground_truth, code_scoring=code_scoring, sandbox=sandbox,
                            sandbox_url=sandbox_url)
    elif lenient_math:
        result = score_math_lenient(solution_str, ground_truth)
    else:
        result = score_math(solution_str, ground_truth)
    score = result["score"]
    if score < 0:  # a wrong answer, or code that could not be tested
        if tool_shaping == "none":
            score = min(-0.6, score)
        else:
            num_turns = (extra_info or {}).get("num_turns", 0) if tool_shaping == "turns" else 0
            score = min(-0.6, score + 0.1 * (num_turns - 2) / 2)
    pred = result["pred"] if result["pred"] is not None else ""  # "" is still a vote in maj@k
    return {"score": score, "acc": result["acc"], "pred": pred}


# -----------------------------------------------------------------------------
# 4. The local sandbox: limits and uids

def _rlimits(timeout, memory_mb):
    """(resource, (soft, hard)) pairs, lowered to the current hard limits so a non-root host can set them."""
    cpu = int(timeout) + 1  # CPU seconds; several threads can burn it faster than the wall clock
    memory = int(memory_mb * 2**20)
    wanted = [(resource.RLIMIT_AS, memory, memory),
              (resource.RLIMIT_CPU, cpu, cpu + 1),
              (resource.RLIMIT_NPROC, MAX_PROCESSES, MAX_PROCESSES),
              (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
              (resource.RLIMIT_CORE, 0, 0)]
    limits = []
    for res, soft, hard in wanted:
        current_hard = resource.getrlimit(res)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        limits.append((res, (soft, hard)))
    return limits


def _processes_of(uid):
    """Pids of the live (not zombie) processes owned by uid."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]  # the name in () may hold spaces
        except (OSError, IndexError):
            continue  # it exited while we looked
        if state != b"Z":
            pids.append(int(entry))
    return pids


def _kill_processes_of(uid):
    # The uid is leased to one sandbox at a time, so everything it owns is ours to
    # kill. Repeat because a process may fork between the scan and the kill.
    for _ in range(100):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)

_uid_rng = random.Random()  # our own: drawing from the global one would shift a seeded training run


def _lease_uid() -> tuple:
    """(lock file, uid): an unprivileged uid used by no other running sandbox, in this process or any other,
    until the lock file is closed. The lease is an flock on a file per uid in the temporary directory, so
    every program using this module on the machine must share that directory."""
    lock_dir = os.path.join(tempfile.gettempdir(), "sod_sandbox_uids")
    os.makedirs(lock_dir, exist_ok=True)
    first = _uid_rng.randrange(len(SANDBOX_UIDS))  # spread threads over the pool
    while True:
        for k in range(len(SANDBOX_UIDS)):
            uid = SANDBOX_UIDS[(first + k) % len(SANDBOX_UIDS)]
            lock = open(os.path.join(lock_dir, str(uid)), "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            _kill_processes_of(uid)  # leftovers of a host that died mid-run
            return lock, uid
        time.sleep(0.05)  # every uid is busy


@contextlib.contextmanager
def _leased_uid():
    lock, uid = _lease_uid()
    try:
        yield uid
    finally:
        _kill_processes_of(uid)
        lock.close()  # releases the flock


def _set_parent_death_signal():
    """In a child between fork and exec: SIGKILL when the thread that started it dies (no orphaned
    sandbox)."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _sweep_stale_folders():
    """The scratch folders of cold sandboxes whose host process died (a SIGKILL leaves them behind)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        parts = name.split("_")
        if name.startswith("sod_sandbox_") and len(parts) >= 4 and parts[2].isdigit():
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            except PermissionError:
                pass  # alive, another user's


def _scratch_file():
    """An anonymous in-memory file (memfd) for a call's code, stdin, stdout or stderr: no filesystem involved,
    gone when closed; RLIMIT_FSIZE caps what the program can write to it. A temporary file where memfd is
    missing."""
    try:
        return os.fdopen(os.memfd_create("sod_sandbox", os.MFD_CLOEXEC), "w+b")
    except (AttributeError, OSError):
        return tempfile.TemporaryFile()


def _read_capped(f, max_bytes):
    f.seek(0)
    return f.read(max_bytes).decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# 4. The local sandbox: the cold path, a new interpreter in new namespaces per call

# Runs as root inside the new namespaces. The code file is opened as fd 3 BEFORE the private tmpfs covers /tmp
# (the host copy may live under /tmp), and the code reaches python as a file, never through the shell's
# parser. The mounts are private to the namespace (unshare's default propagation), so the host never sees
# them. After exec, python is the namespace's pid 1: when it exits, or is killed, the kernel kills every
# process left inside. (Being pid 1, it ignores signals it sends itself without a handler, and SIGXFSZ:
# writing past RLIMIT_FSIZE raises "OSError: File too large" instead of killing it.) setpriv's parent-death
# signal kills it when unshare dies, and unshare has its own from the host thread that started it.
_FULL_SANDBOX_SCRIPT = """
set -e
exec 3< "$1"
mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp
if [ -d /dev/shm ]; then mount -t tmpfs -o size=16m,mode=1777 tmpfs /dev/shm; fi
mount -o remount,bind,ro /
cd /tmp && unset OLDPWD
cat <&3 > main.py
exec 3<&-
exec setpriv --reuid="$2" --regid="$2" --clear-groups --no-new-privs --pdeathsig KILL -- "$3" main.py
"""


def _sandbox_command(level, python, uid, code_path):
    # No -I: the environment is already scrubbed, -I would make python ignore
    # PYTHONIOENCODING, and it would drop the script's directory from sys.path,
    # which code that writes a helper module and imports it relies on.
    if level == "full":
        return ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount", "--ipc", "--mount-proc",
                "sh", "-c", _FULL_SANDBOX_SCRIPT, "sandbox", code_path, str(uid), python]
    if level == "uid":
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                "--pdeathsig", "KILL", "--", python, "main.py"]
    return [python, "main.py"]


def _run_cold(code, stdin_file, out, err, timeout, memory_mb, level, python) -> dict:
    # mode 700: root (and, at level uid, the uid)
    host_dir = tempfile.mkdtemp(prefix=f"sod_sandbox_{os.getpid()}_")
    try:
        code_path = os.path.join(host_dir, "main.py")
        with open(code_path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)  # a lone surrogate becomes invalid UTF-8, which python then reports
        with contextlib.ExitStack() as stack:
            uid = stack.enter_context(_leased_uid()) if level in ("full", "uid") else None
            if level == "uid":
                os.chown(host_dir, uid, uid)  # it is the working directory
            env = dict(SANDBOX_ENV, HOME="/tmp" if level == "full" else host_dir)
            limits = _rlimits(timeout, memory_mb)

            def in_child():  # runs between fork and exec: plain syscalls only, no locks
                _set_parent_death_signal()
                for res, values in limits:
                    resource.setrlimit(res, values)

            try:
                proc = subprocess.Popen(_sandbox_command(level, python, uid, code_path), stdin=stdin_file,
                                        stdout=out, stderr=err, cwd=host_dir, env=env,
                                        start_new_session=True, preexec_fn=in_child)
            except (OSError, subprocess.SubprocessError) as e:
                err.write(str(e).encode())
                return {"status": "error", "returncode": None}
            # A timer kills the group at the deadline while we block in waitpid: Popen.wait(timeout=...)
            # would poll with sleeps of up to 50 ms, which is most of the cost of a short call.
            timed_out = threading.Event()

            def kill_on_deadline():
                timed_out.set()
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)

            deadline = threading.Timer(timeout, kill_on_deadline)
            deadline.start()
            try:
                returncode = proc.wait()
            finally:
                deadline.cancel()
                # also after a normal exit: background children of the basic level share the group
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()  # cannot have left its group (a session leader), but wait() must never hang
                proc.wait()
            return {"status": "timeout", "returncode": None} if timed_out.is_set() else \
                {"status": "finished", "returncode": returncode}
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


# -----------------------------------------------------------------------------
# 4. The local sandbox: the warm path, a pool of sandboxed interpreters that fork a fresh child per call
#
# Starting an interpreter inside fresh namespaces costs ~12-15 ms of CPU per call, most of a toy RL step.
# A warm worker pays it once: `unshare` builds the pid, network and mount namespaces and a read-only root, and
# inside them a Python "zygote" (root in the namespace, its pid 1) waits for requests on a socket. Each call
# then gets a child forked from the zygote, so from an interpreter that has already started. Before it runs
# the model's code the child enters a mount namespace of its own with fresh tmpfs /tmp and /dev/shm (its
# private scratch space, gone with it), drops to the worker's unprivileged uid, takes its own rlimits and a
# parent-death signal, closes every inherited descriptor and receives a scrubbed environment. Nothing of one
# call is left for the next: the zygote never runs model code, kills everything in the namespace after each
# call (kill(-1) from pid 1) and forks the next child from the same clean state. A worker dies with its host:
# the zygote exits when the host's end of the socket closes, which the kernel does when the host dies.

_ZYGOTE = r'''
import atexit, ctypes, json, os, resource, select, signal, socket, sys, types
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC, MS_REC, MS_PRIVATE = 0x20000, 0x8000000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
sock = socket.socket(fileno=int(sys.argv[1]))
uid = int(sys.argv[2])

def prepare():
    # The next call's process, forked ahead of its request: it enters a mount and IPC namespace of its own with
    # fresh tmpfs /tmp and /dev/shm (as root), then waits on `channel` for the request and its descriptors.
    host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid:
        child_end.close()
        return pid, host_end
    sock.close()
    host_end.close()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if libc.unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        os._exit(111)
    for path, size in ((b"/tmp", b"size=64m,mode=1777"), (b"/dev/shm", b"size=16m,mode=1777")):
        if os.path.isdir(path) and libc.mount(b"tmpfs", path, b"tmpfs", 0, size) != 0:
            os._exit(111)
    os.chdir("/tmp")
    message, fds, _, _ = socket.recv_fds(child_end, 1 << 16, 4)
    if not message:
        os._exit(0)
    run(json.loads(message), fds)

def run(request, fds):
    stdin, stdout, stderr, code_fd = fds
    for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
        os.dup2(fd, target)
    code = os.pread(code_fd, 1 << 30, 0)
    with open("main.py", "wb") as f:
        f.write(code)
    for res, soft, hard in request["rlimits"]:
        resource.setrlimit(res, (soft, hard))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setresuid, which clears it
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # setresuid cleared it too: /proc/self is the process's own again,
                                             # as after the exec of the cold path (core dumps stay off: RLIMIT_CORE 0)
    if libc.close_range(3, 0xFFFFFFFF, 0) != 0:  # every inherited descriptor, in one system call
        os.closerange(3, 1 << 16)
    os.environ.clear()
    os.environ.update(request["env"])
    main = types.ModuleType("__main__")
    main.__file__, main.__cached__ = "/tmp/main.py", None
    sys.modules["__main__"] = main
    sys.argv, sys.path[0] = ["main.py"], "/tmp"
    if "random" in sys.modules:
        sys.modules["random"].seed()
    try:
        exec(compile(code, "/tmp/main.py", "exec"), main.__dict__)
        status = 0
    except SystemExit as e:  # as the interpreter handles it for `python main.py`
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # drop this frame
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        status = 1
    finish(status, main)

def finish(status, main):
    # The interpreter's own exit, without tearing down every object: in a forked child that teardown copies each
    # page it touches and costs ~10 ms. Threads are joined, atexit handlers run, the program's own globals are
    # released (so its objects' finalizers run and its files are flushed), then stdout and stderr are flushed.
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    atexit._run_exitfuncs()
    main.__dict__.clear()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status & 0xFF)

def reap(pid):
    # Kill every process of the namespace but this one and reap them all; the wait status of `pid`.
    status = None
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            done, st = os.waitpid(-1, 0)
        except ChildProcessError:
            return status
        if done == pid:
            status = st

import gc
gc.freeze()  # objects of the zygote are never collected: a collection in a child would copy every page it scans
next_call = prepare()
sock.send(b"ready")
while True:
    try:
        message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
    except OSError:
        break
    if not message:
        break  # the host is gone
    request = json.loads(message)
    pid, channel = next_call
    try:
        socket.send_fds(channel, [message], fds)
    except OSError:
        pass  # the prepared process died: the call reports it as a sandbox failure below
    for fd in fds:
        os.close(fd)
    channel.close()
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd, sock], [], [], request["timeout"])
    os.close(pidfd)
    status = reap(pid)
    if sock in ready and pidfd not in ready:
        break  # the host closed its end while the call ran
    timed_out = not ready
    returncode = None if timed_out or status is None else os.waitstatus_to_exitcode(status)
    sock.send(json.dumps({"status": "timeout" if timed_out else "finished", "returncode": returncode}).encode())
    next_call = prepare()  # while the host reads this answer
reap(-1)
'''

# Runs as root inside the new namespaces: the root filesystem read-only, then the zygote
# (pid 1 of the namespace).
_WORKER_SCRIPT = """
set -e
mount -o remount,bind,ro /
cd /
exec "$1" -c "$2" "$3" "$4"
"""


class _Worker:
    """One warm sandbox: the unshare process, the zygote at the other end of `sock`, and the uid it runs code
    as."""

    def __init__(self, python: str, uid: int, lease):
        host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.uid, self.lease, self.sock = uid, lease, host_end
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount", "--mount-proc", "sh", "-c",
             _WORKER_SCRIPT, "worker", python, _ZYGOTE, str(worker_end.fileno()), str(uid)],
            pass_fds=[worker_end.fileno()], env=SANDBOX_ENV, cwd="/", start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        worker_end.close()
        self.sock.settimeout(15.0)
        try:
            ready = self.sock.recv(16)
        except OSError:
            ready = b""
        if ready != b"ready":
            self.close()
            raise OSError(f"the warm sandbox did not start: {self.proc.stderr.read().decode()[-300:]}")

    def run(self, code: str, stdin_file, out, err, timeout: float, memory_mb: int) -> dict:
        with _scratch_file() as code_file:
            code_file.write(code.encode("utf-8", errors="surrogatepass"))
            code_file.seek(0)
            request = {"timeout": timeout,
                       "rlimits": [(res, *values) for res, values in _rlimits(timeout, memory_mb)],
                       "env": SANDBOX_ENV}
            fds = [stdin_file.fileno(), out.fileno(), err.fileno(), code_file.fileno()]
            self.sock.settimeout(timeout + 2.0)  # the zygote answers within its own deadline
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
            return json.loads(self.sock.recv(1 << 16) or b"{}")

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()  # the zygote exits at the end of its socket
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        _kill_processes_of(self.uid)
        self.lease.close()


class _WarmPool:
    """Warm workers, started when needed, at most `size`; a dead or stuck worker is replaced."""

    def __init__(self, python: str, size: int):
        self.python, self.size = python, size
        self.idle, self.count = [], 0
        self.lock = threading.Condition()

    def run(self, code, stdin_file, out, err, timeout, memory_mb) -> dict | None:
        """The call's {status, returncode}; None if no worker could start (the caller falls back to the cold
        path)."""
        try:
            worker = self._acquire()
        except OSError as e:
            logger.warning("warm sandbox unavailable, running this call cold: %s", e)
            return None
        try:
            result = worker.run(code, stdin_file, out, err, timeout, memory_mb)
            if result.get("status") not in ("finished", "timeout"):
                raise OSError("the warm sandbox gave no answer")
        except (OSError, ValueError):
            self._discard(worker)
            return {"status": "error", "returncode": None}
        with self.lock:
            self.idle.append(worker)
            self.lock.notify()
        return result

    def _acquire(self) -> _Worker:
        with self.lock:
            while not self.idle and self.count >= self.size:
                self.lock.wait()
            if self.idle:
                return self.idle.pop()
            self.count += 1
        try:
            lease, uid = _lease_uid()
            try:
                return _Worker(self.python, uid, lease)
            except BaseException:
                lease.close()
                raise
        except BaseException:
            with self.lock:
                self.count -= 1
                self.lock.notify()
            raise

    def _discard(self, worker: _Worker):
        worker.close()
        with self.lock:
            self.count -= 1
            self.lock.notify()

    def close(self):
        with self.lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.close()

# -----------------------------------------------------------------------------
# 4. The local sandbox: the isolation probe, and the one entry point

_isolation = None
_warm_pool = None
_sandbox_lock = threading.Lock()


def sandbox_isolation():
    """(level, interpreter) of the local sandbox: probed on first use, cached, logged once."""
    global _isolation
    with _sandbox_lock:
        if _isolation is None:
            _sweep_stale_folders()
            _isolation = _probe_isolation()
        return _isolation


def _probe_isolation():
    override = os.environ.get("SOD_SANDBOX_PYTHON")
    # sys.executable often sits under /root (mode 700), where the unprivileged uid
    # cannot run it; the system python (stdlib only) usually can.
    pythons = ([override] if override
               else [sys.executable] + ["/usr/bin/python3"] * os.path.exists("/usr/bin/python3"))
    levels, notes = [], []
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        notes.append("no unprivileged uid (it needs root and setpriv)")
    else:
        levels = ["full", "uid"] if shutil.which("unshare") else ["uid"]
        if not shutil.which("unshare"):
            notes.append("no namespaces (unshare is missing)")
    # A uid that cannot read our interpreter's directory may still start it, only to
    # load another python's libraries (seen here: pyenv's 3.11.7 running Debian's
    # 3.11.2 stdlib), so the probe compares what it finds with what we are.
    probe = "import sys; print(sys.version); print(sys.prefix)"
    expected = {sys.executable: f"{sys.version}\n{sys.prefix}\n"}
    for level in levels:
        for python in pythons:
            with _scratch_file() as stdin_file, _scratch_file() as out, _scratch_file() as err:
                result = _run_cold(probe, stdin_file, out, err, 10.0, 1024, level, python)
                stdout = _read_capped(out, 4096)
            if _exited_cleanly(result) and stdout == expected.get(python, stdout):
                what = {"full": "pid, network, mount and IPC namespaces, read-only root, private /tmp, "
                                "unprivileged uid", "uid": "unprivileged uid only"}[level]
                (logger.info if level == "full" else logger.warning)(
                    "sandbox isolation: %s (%s), python %s%s", level, what, python,
                    f" ({'; '.join(notes)})" if notes else "")
                return level, python
            if python not in [n.split(" ")[0] for n in notes]:
                notes.append(f"{python} is not usable by the sandbox's unprivileged uid, "
                             "it lives where that uid cannot read")
    logger.warning("sandbox isolation: basic (own process group, rlimits, scrubbed environment), "
                   "python %s (%s)", pythons[0], "; ".join(notes))
    return "basic", pythons[0]


def _warm_workers():
    """The shared pool of warm sandboxes, started on first use; None where the warm path cannot run."""
    global _warm_pool
    level, python = sandbox_isolation()
    with _sandbox_lock:
        if _warm_pool is None and level == "full":
            _warm_pool = _WarmPool(python, size=min(32, max(4, 2 * (os.cpu_count() or 1))))
        return _warm_pool if level == "full" else None


def run_python(code: str, stdin: str = "", timeout: float = 60.0, memory_mb: int = 2048,
               max_output_bytes: int = 8 * 2**20, *, sandbox: str = "warm", sandbox_url: str = "") -> dict:
    """Run a Python program: no auto-print, no truncation. Returns {status, returncode, stdout, stderr};
    status is "finished" (any exit code; a negative returncode is a signal), "timeout" or "error" (the sandbox
    could not run it). `sandbox`: warm | cold for the local sandbox, ignored when sandbox_url names a
    SandboxFusion server. Output past max_output_bytes is dropped (and a program cannot write past
    MAX_FILE_BYTES)."""
    if sandbox_url:
        return _run_code_http(code, stdin, sandbox_url, timeout, memory_mb)
    if sandbox not in ("warm", "cold"):
        raise ValueError(f"sandbox must be warm or cold, not {sandbox!r}")
    level, python = sandbox_isolation()
    with _scratch_file() as stdin_file, _scratch_file() as out, _scratch_file() as err:
        stdin_file.write(stdin.encode("utf-8", errors="surrogatepass"))
        stdin_file.seek(0)
        pool = _warm_workers() if sandbox == "warm" and _warm_can_run(code) else None
        result = pool.run(code, stdin_file, out, err, timeout, memory_mb) if pool is not None else None
        if result is None:
            result = _run_cold(code, stdin_file, out, err, timeout, memory_mb, level, python)
        return dict(result, stdout=_read_capped(out, max_output_bytes),
                    stderr=_read_capped(err, max_output_bytes))


def _warm_can_run(code: str) -> bool:
    """Source python would refuse to read from a file gets the cold path, which reports it as python does."""
    return "\0" not in code and not any("\ud800" <= ch <= "\udfff" for ch in code)


# -----------------------------------------------------------------------------
# 5. SandboxFusion: the run_code HTTP API the reference uses, for untrusted code at scale

def _run_code_http(code, stdin, url, timeout, memory_mb) -> dict:
    """The request of verl/utils/reward_score/sandbox_fusion/utils.py: call_sandbox_api; only HTTP 504 is
    retried. A run that did not finish (a timeout) is status "timeout"; an unreachable or broken server,
    status "error"."""
    url = url.rstrip("/")
    if not url.endswith("/run_code"):
        url += "/run_code"
    payload = json.dumps({"compile_timeout": timeout, "run_timeout": timeout, "code": code,
                          "stdin": stdin or None, "memory_limit_MB": memory_mb, "language": "python",
                          "files": {}, "fetch_files": []}).encode()
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json",
                                                                 "Accept": "application/json"})
    error = {"status": "error", "returncode": None, "stdout": "", "stderr": ""}
    for attempt in range(HTTP_TRIES):
        try:
            with urllib.request.urlopen(request, timeout=2 * timeout + 10) as response:
                answer = json.loads(response.read())
            run = answer.get("run_result") or {}
            if run.get("status") == "Finished":
                return {"status": "finished", "returncode": run.get("return_code"),
                        "stdout": run.get("stdout") or "", "stderr": run.get("stderr") or ""}
            if run.get("status") == "TimeLimitExceeded":
                return dict(error, status="timeout")
            return dict(error, stderr=answer.get("message") or "")
        except urllib.error.HTTPError as e:
            if e.code != 504 or attempt == HTTP_TRIES - 1:
                return dict(error, stderr=f"HTTP {e.code}")
            time.sleep(HTTP_RETRY_DELAY * 2**attempt)
        except Exception as e:  # connection refused, bad JSON, missing keys: the model sees the same text
            return dict(error, stderr=str(e))
    return error
