"""
The code_interpreter tool, the tool-call parser and the reward functions of SOD.

What is here
- execute_code(code) returns exactly the text the model is shown after a tool
  call (recipe/demystify/reward.py: CustomSandboxFusionTool.execute): take the first ```python block if there
  is one, auto-print the last line, run it, show stdout + stderr (so a traceback
  is visible), or the literal "no stdout here" on a timeout or a sandbox
  failure, and cut the text to 256 characters around the middle.
- parse_tool_calls(text) reads Hermes-style <tool_call>{json}</tool_call> calls
  (verl/experimental/agent_loop/tool_parser.py); run_tool_calls answers them, a malformed call getting the
  reference's "Error when executing tool: ..." text instead of an exception.
- score_math: the strict box of verl's math_dapo (exact string match of the
  last \\boxed{} in the last 100 characters); score_math_lenient: math_verify;
  score_code: unit tests with partial credit; compute_score: the dispatch on
  data_source plus the reference's shaping of wrong answers (recipe/demystify/reward.py:
  compute_score).

Where this departs from the authors' code (defaults are the reference unless
noted; the README's deviations table says why each one matters)
- autoprint="expression" prints the last statement only if it is a bare
  expression; the default "reference" heuristic turns `x = 5` into
  `print(x = 5)`.
- a process killed by a signal gets "Process killed by signal SIGSEGV" appended
  (always on: the reference shows the model nothing at all in that case).
- score_code reads the text after the LAST </think> (the reference takes
  split("</think>")[1]) and does not turn "\\n" escapes into newlines (the
  reference does, breaking print("\\n".join(...))). Both bugs are flags.
- compute_score: tool_shaping="reference" reproduces what the reference really
  computes (-1.1 for every wrong answer); "turns" is what it meant to compute.
- parse_tool_calls drops a call whose arguments are not a JSON object (the
  reference keeps it and fails when executing it).

The local sandbox (SandboxFusion stands in for it in the reference)
The isolation level is probed once, on first use, and logged in one line:
- full: new pid, network and mount namespaces (unshare), a read-only root
  filesystem, a private tmpfs /tmp as working directory (and /dev/shm), and an
  unprivileged uid (setpriv) leased from a pool so that RLIMIT_NPROC bounds a
  fork bomb per sandbox. Killing the namespace's first process kills all of it,
  however the code daemonised.
- uid: no namespaces, but the unprivileged uid (needs root); every process of
  that uid is killed afterwards.
- basic: a plain child process.
At every level: its own session and process group (killed on timeout), a fresh
working directory removed afterwards, an environment holding only PATH, HOME,
LANG and PYTHONIOENCODING, and rlimits on address space, CPU time, processes,
file size and core dumps. Output goes to files capped by RLIMIT_FSIZE and is
read back only up to max_output_bytes, so printing forever cannot fill the
host's memory. A call returns within about timeout + 2 s whatever the code does.
The interpreter is $SOD_SANDBOX_PYTHON if set, else this one if the unprivileged
uid can run it, else /usr/bin/python3, which has only the standard library:
point SOD_SANDBOX_PYTHON at a world-readable venv to give the model numpy/sympy.

What it does NOT protect against: kernel exploits and container escapes, CPU
and cache side channels, reading world-readable host files (the repository,
/etc, other users' world-readable data), using up the host's CPU for the
duration of the timeout, and, in the uid and basic levels, network access and
writes to world-writable host directories; in the basic level also processes
that setsid() away and survive, and reading other processes' environments.
For untrusted code at scale run a real SandboxFusion service and pass
sandbox_url=... (the HTTP run_code API the reference uses).

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
TOOL_SCHEMA = {"type": "function", "function": {"name": "code_interpreter", "description": "A tool for executing code.", "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The code to execute."}}, "required": ["code"]}}}
NO_STDOUT = "no stdout here"  # the reference's text for a timeout or any sandbox failure

# sandbox
SANDBOX_UIDS = range(60001, 60001 + 128)  # one uid per running sandbox: RLIMIT_NPROC counts per uid
MAX_PROCESSES = 64  # RLIMIT_NPROC, only enforced once the uid is unprivileged (root ignores it)
MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: bounds stdout/stderr files and anything written
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# SandboxFusion HTTP API
HTTP_TRIES = 3  # the reference retries only on HTTP 504, 3 tries in all
HTTP_RETRY_DELAY = 1.0  # seconds, doubled after each 504
# code tests
CODE_TEST_MEMORY_MB = 1024  # the reference's check_correctness limit
MAX_PARALLEL_CASES = 8

# -----------------------------------------------------------------------------
# the local sandbox

# Runs as root inside the new namespaces. The code file is opened as fd 3 BEFORE
# the private tmpfs covers /tmp (the host copy may live under /tmp), and the
# code reaches python as a file, never through the shell's parser. The mounts
# are private to the namespace (unshare's default propagation), so the host
# never sees them. After exec, python is the namespace's pid 1: when it exits,
# or is killed, the kernel kills every process left inside. (Being pid 1, it
# ignores signals it sends itself without a handler, and SIGXFSZ: writing past
# RLIMIT_FSIZE raises "OSError: File too large" instead of killing it.)
_FULL_SANDBOX_SCRIPT = """
set -e
exec 3< "$1"
mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp
if [ -d /dev/shm ]; then mount -t tmpfs -o size=16m,mode=1777 tmpfs /dev/shm; fi
mount -o remount,bind,ro /
cd /tmp && unset OLDPWD
cat <&3 > main.py
exec 3<&-
exec setpriv --reuid="$2" --regid="$2" --clear-groups --no-new-privs -- "$3" main.py
"""


def _sandbox_command(level, python, uid, code_path):
    # No -I: the environment is already scrubbed, -I would make python ignore
    # PYTHONIOENCODING, and it would drop the script's directory from sys.path,
    # which code that writes a helper module and imports it relies on.
    if level == "full":
        return ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount", "--mount-proc",
                "sh", "-c", _FULL_SANDBOX_SCRIPT, "sandbox", code_path, str(uid), python]
    if level == "uid":
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--", python, "main.py"]
    return [python, "main.py"]


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


@contextlib.contextmanager
def _leased_uid():
    """An unprivileged uid used by no other running sandbox, in this process or any other.

    The lease is an flock on a file per uid in the temporary directory, so every
    program using this module on the machine must share that directory."""
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
            try:
                _kill_processes_of(uid)  # leftovers of a host that died mid-run
                yield uid
            finally:
                _kill_processes_of(uid)
                lock.close()  # releases the flock
            return
        time.sleep(0.05)  # every uid is busy


def _read_capped(f, max_bytes):
    f.seek(0)
    return f.read(max_bytes).decode("utf-8", errors="replace")


def _run_sandboxed(code, stdin, timeout, memory_mb, max_output_bytes, level, python):
    host_dir = tempfile.mkdtemp(prefix="sod_sandbox_")  # mode 700: only root (and, at level uid, the leased uid)
    try:
        code_path = os.path.join(host_dir, "main.py")
        with open(code_path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)  # a lone surrogate becomes invalid UTF-8, which python then reports
        with contextlib.ExitStack() as stack:
            uid = stack.enter_context(_leased_uid()) if level in ("full", "uid") else None
            if level == "uid":
                os.chown(host_dir, uid, uid)  # it is the working directory
            stdin_file, out, err = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
            stdin_file.write(stdin.encode("utf-8", errors="surrogatepass"))
            stdin_file.seek(0)
            env = {"PATH": SAFE_PATH, "HOME": "/tmp" if level == "full" else host_dir,
                   "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
            limits = _rlimits(timeout, memory_mb)

            def set_limits():  # runs in the child between fork and exec: plain syscalls only, no locks
                for res, values in limits:
                    resource.setrlimit(res, values)

            try:
                proc = subprocess.Popen(_sandbox_command(level, python, uid, code_path), stdin=stdin_file,
                                        stdout=out, stderr=err, cwd=host_dir, env=env,
                                        start_new_session=True, preexec_fn=set_limits)
            except (OSError, subprocess.SubprocessError) as e:
                return {"status": "error", "returncode": None, "stdout": "", "stderr": str(e)}
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
            status, returncode = ("timeout", None) if timed_out.is_set() else ("finished", returncode)
            return {"status": status, "returncode": returncode,
                    "stdout": _read_capped(out, max_output_bytes), "stderr": _read_capped(err, max_output_bytes)}
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


_isolation = None
_isolation_lock = threading.Lock()


def sandbox_isolation():
    """(level, interpreter) of the local sandbox: probed on first use, cached, logged once."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe_isolation()
        return _isolation


def _probe_isolation():
    override = os.environ.get("SOD_SANDBOX_PYTHON")
    # sys.executable often sits under /root (mode 700), where the unprivileged uid
    # cannot run it; the system python (stdlib only) usually can.
    pythons = [override] if override else [sys.executable] + ["/usr/bin/python3"] * os.path.exists("/usr/bin/python3")
    levels, missing = [], []
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        missing.append("uid drop (needs root and setpriv)")
    else:
        levels = ["full", "uid"] if shutil.which("unshare") else ["uid"]
        if not shutil.which("unshare"):
            missing.append("namespaces (no unshare)")
    # A uid that cannot read our interpreter's directory may still start it, only to
    # load another python's libraries (seen here: pyenv's 3.11.7 running Debian's
    # 3.11.2 stdlib), so the probe compares what it finds with what we are.
    probe = "import sys; print(sys.version); print(sys.prefix)"
    expected = {sys.executable: f"{sys.version}\n{sys.prefix}\n"}
    for level in levels:
        for python in pythons:
            result = _run_sandboxed(probe, "", 10.0, 1024, 4096, level, python)
            ran = result["status"] == "finished" and result["returncode"] == 0
            if ran and result["stdout"] == expected.get(python, result["stdout"]):
                what = {"full": "pid/net/mount namespaces, read-only root, private /tmp, unprivileged uid",
                        "uid": "unprivileged uid only"}[level]
                log = logger.info if level == "full" else logger.warning
                log("sandbox isolation: %s (%s), python %s; unavailable: %s", level, what, python, "; ".join(missing) or "nothing")
                return level, python
            reason = (result["stderr"].strip().splitlines() or [result["status"]])[-1]
            if ran:
                reason = "runs a different python: " + result["stdout"].split("\n")[0]
            missing.append(f"{level} with {python} ({reason})")
    logger.warning("sandbox isolation: basic (own process group, rlimits, scrubbed env), python %s; unavailable: %s",
                   pythons[0], "; ".join(missing))
    return "basic", pythons[0]


def run_python(code: str, stdin: str = "", timeout: float = 60.0, memory_mb: int = 2048,
               max_output_bytes: int = 8 * 2**20) -> dict:
    """Run a Python program in the local sandbox: no auto-print, no truncation.

    status is "finished" (any exit code; a negative returncode is a signal),
    "timeout" or "error" (the sandbox could not start). Output past
    max_output_bytes is dropped (and a program cannot write past MAX_FILE_BYTES)."""
    level, python = sandbox_isolation()
    return _run_sandboxed(code, stdin, timeout, memory_mb, max_output_bytes, level, python)


def _run_code_http(code, url, timeout, memory_mb):
    """SandboxFusion's run_code API, with the reference's output convention."""
    url = url.rstrip("/")
    if not url.endswith("/run_code"):
        url += "/run_code"
    payload = json.dumps({"code": code, "language": "python", "compile_timeout": timeout,
                          "run_timeout": timeout, "memory_limit_MB": memory_mb}).encode()
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    for attempt in range(HTTP_TRIES):
        try:
            with urllib.request.urlopen(request, timeout=2 * timeout + 10) as response:
                run = json.loads(response.read())["run_result"]
            if run["status"] != "Finished":  # e.g. TimeLimitExceeded
                return NO_STDOUT
            return (run.get("stdout") or "") + (run.get("stderr") or "")
        except urllib.error.HTTPError as e:
            if e.code != 504 or attempt == HTTP_TRIES - 1:
                return NO_STDOUT
            time.sleep(HTTP_RETRY_DELAY * 2**attempt)
        except Exception:  # connection refused, bad JSON, missing keys: the model sees the same text
            return NO_STDOUT
    return NO_STDOUT

# -----------------------------------------------------------------------------
# the code_interpreter tool


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
        return sum(len(line) + 1 for line in lines[:lineno - 1]) + len(lines[lineno - 1].encode()[:col].decode())

    # the Expr node spans any parentheses, and may span several lines
    start, end = offset(last.lineno, last.col_offset), offset(last.end_lineno, last.end_col_offset)
    return code[:start] + "print(" + code[start:end] + ")" + code[end:]


def truncate_output(text: str, max_chars: int = 256) -> str:
    """The reference's tool-response truncation ("middle": the first and last max_chars / 2 characters);
    max_chars <= 0 keeps everything."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars // 2] + "...(truncated)..." + text[-(max_chars // 2):]


def _tool_text(result):
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


def execute_code(code: str, timeout: float = 60.0, memory_mb: int = 2048, *, autoprint: str = "reference",
                 max_output_chars: int = 256, sandbox_url: str | None = None) -> str:
    """The text the model is shown for one code_interpreter call."""
    code = add_autoprint(extract_code_block(code), autoprint)
    if sandbox_url:
        text = _run_code_http(code, sandbox_url, timeout, memory_mb)
    else:
        text = _tool_text(run_python(code, timeout=timeout, memory_mb=memory_mb))
    return truncate_output(text, max_output_chars)


# -----------------------------------------------------------------------------
# tool calls


def _decode_tool_call(raw):
    try:
        call = json.loads(raw.strip())
        name, arguments = call["name"], call["arguments"]
        if isinstance(arguments, str):  # some models write the arguments object as a JSON string
            arguments = json.loads(arguments)
    except Exception:  # bad JSON, not an object, a missing key, RecursionError, too many digits
        return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return {"name": name, "arguments": arguments}


def parse_tool_calls(text: str, counts: collections.Counter | None = None) -> list[dict]:
    """Every well-formed Hermes tool call in text, in order; malformed ones are dropped.

    Unknown tool names are kept: run_tool_calls answers them with an error text,
    as the reference does. The reference executes only the first call of a turn
    (max_parallel_calls = 1); that choice belongs to the rollout loop."""
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


def _code_argument(call):
    """The code of a call, or the exception the reference would raise for it."""
    if call.get("name") != TOOL_NAME:
        raise KeyError(call.get("name"))  # the reference's tool lookup by name
    arguments = call.get("arguments")
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    code = arguments["code"]
    if not isinstance(code, str):
        raise TypeError(f"code must be a string, not {type(code).__name__}")
    return code


def run_tool_calls(calls: list[dict], timeout=60.0, memory_mb=2048, **kwargs) -> list[str]:
    """The tool text for each call, in order; the calls run in parallel."""
    def answer(call):
        try:
            code = _code_argument(call)
        except Exception as e:
            return truncate_output(f"Error when executing tool: {e}", kwargs.get("max_output_chars", 256))
        return execute_code(code, timeout, memory_mb, **kwargs)

    if not calls:
        return []
    with ThreadPoolExecutor(min(len(calls), 32)) as pool:
        return list(pool.map(answer, calls))


_FAILURE_MARKERS = ("error when executing tool", "traceback", "execution timed out", "request failed")


def tool_call_failed(text: str) -> bool:
    """The reference's success flag (metrics only), inverted.

    We also count the timeout text "no stdout here" as a failure; the reference's
    markers miss it because SandboxFusion's own timeout message never reaches the model."""
    lowered = text.lower()
    return any(marker in lowered for marker in _FAILURE_MARKERS) or text.strip() == NO_STDOUT

# -----------------------------------------------------------------------------
# rewards: math and GPQA


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
# rewards: code

# Functional tests call a named function. The star imports give LeetCode-style
# signatures (List[int], deque, ...) the names they assume, as the reference's
# sandbox wrapper does. The result is printed after a marker and compared on the
# host, so the program never sees the expected output.
_RESULT_MARKER = "__sod_result__:"
_FUNCTION_PREAMBLE = """from typing import *
from collections import *
from itertools import *
from functools import *
from heapq import *
from bisect import *
from math import *
import math, re, string
"""
_FUNCTION_HARNESS = """

import json as _sod_json, sys as _sod_sys
_sod_args = _sod_json.loads(_sod_sys.stdin.read())
_sod_target = getattr(Solution(), {fn!r}) if isinstance(globals().get("Solution"), type) else globals()[{fn!r}]
print("\\n" + {marker!r} + _sod_json.dumps(_sod_target(*_sod_args), default=repr))
"""


def _exited_cleanly(result):
    return result["status"] == "finished" and result["returncode"] == 0


def _function_output(stdout):
    if _RESULT_MARKER not in stdout:
        return None
    try:
        return json.loads(stdout.rsplit(_RESULT_MARKER, 1)[1])
    except ValueError:
        return None


def check_code_tests(tests) -> dict:
    """A code problem's ground truth as a dict, or ValueError saying what is wrong with it: {"inputs", "outputs"}
    (stdin/stdout), the same with "fn_name" (a function's arguments and return value), or {"import_prefix",
    "test_code", "entry_point"} (LeetCode asserts); a JSON string of one of these is read first."""
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
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise ValueError("code tests need equally long, non-empty `inputs` and `outputs` lists "
                         "(or import_prefix, test_code and entry_point)")
    return tests


def _code_cases(code, tree, tests):
    """[(program, stdin, passed(result))] for one test spec, or None if the code cannot be tested."""
    if "import_prefix" in tests:
        # LeetCode style, as the reference builds it: check()'s header line glued to each
        # later non-empty line ("def check(candidate):" + "    assert ..." is valid python)
        lines = [line for line in tests["test_code"].split("\n") if line != ""]
        return [(tests["import_prefix"] + code + "\n" + lines[0] + lines[i] + f"\ncheck({tests['entry_point']})", "", _exited_cleanly)
                for i in range(1, len(lines))]
    inputs, outputs = tests["inputs"], tests["outputs"]
    if "fn_name" in tests:
        fn = tests["fn_name"]
        defines = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        if "Solution" not in defines and fn not in defines:
            return None  # the reference cannot wrap a missing function into class Solution
        program = _FUNCTION_PREAMBLE + code + _FUNCTION_HARNESS.format(fn=fn, marker=_RESULT_MARKER)
        cases = []
        for inp, expected in zip(inputs, outputs):
            try:
                args = json.dumps([json.loads(line) for line in inp.split("\n") if line.strip()])
                want = json.loads(expected)
            except ValueError:
                cases.append(("raise SystemExit('unreadable test case')", "", lambda r: False))
                continue
            # json turns tuples into lists on the way out, so a tuple equals its list
            cases.append((program, args, lambda r, want=want: _exited_cleanly(r) and _function_output(r["stdout"]) == want))
        return cases
    return [(code, inp, lambda r, want=expected: _exited_cleanly(r) and r["stdout"].rstrip("\n") == want.rstrip("\n"))
            for inp, expected in zip(inputs, outputs)]


def score_code(solution_str: str, tests: dict | str, timeout: float = 30.0, *,
               reference_think_split: bool = False, reference_unescape_newlines: bool = False) -> dict:
    """The fraction of unit tests the last ```python block passes (verl/utils/reward_score/livecodebench/code_math.py).

    tests: {"inputs", "outputs"} (stdin/stdout), {"inputs", "outputs", "fn_name"}
    (functional) or {"import_prefix", "test_code", "entry_point"} (LeetCode), or
    the same as a JSON string."""
    fail = {"score": -1.0, "acc": False, "pred": None}
    if "</think>" in solution_str:
        # the reference's split("</think>")[1] is the text between the first and the
        # second </think>: in a multi-turn trajectory it misses the final answer
        solution_str = solution_str.split("</think>")[1] if reference_think_split else solution_str.rsplit("</think>", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", solution_str, re.DOTALL)
    if not blocks:
        return fail
    code = blocks[-1]
    if reference_unescape_newlines:  # the reference's bug: "\n" inside a string literal becomes a line break
        code = code.replace("\\n", "\n").replace("\\t", "\t")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError):  # ValueError: a null byte
        return fail
    if isinstance(tests, str):
        tests = json.loads(tests)
    cases = _code_cases(code, tree, tests)
    if not cases:
        return fail
    with ThreadPoolExecutor(min(len(cases), MAX_PARALLEL_CASES)) as pool:
        results = list(pool.map(lambda case: run_python(case[0], case[1], timeout, CODE_TEST_MEMORY_MB), cases))
    passed = [passes(result) for (_, _, passes), result in zip(cases, results)]
    return {"score": sum(passed) / len(passed), "acc": all(passed), "pred": code}

# -----------------------------------------------------------------------------
# the reward of one trajectory


def compute_score(data_source: str, solution_str: str, ground_truth, extra_info: dict | None = None, *,
                  tool_shaping: str = "reference", lenient_math: bool = False) -> dict:
    """The reference's reward (recipe/demystify/reward.py: compute_score): a scorer by data source, then shaping of wrong answers.

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
        result = score_code(solution_str, ground_truth)
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
