"""
Tests for tools.py and what it stands on (common/sandbox.py,
common/code_tests.py), one property each: the sandbox survives hostile code, runs
the trainer's own Python environment and shows nothing around it, the tool text
follows the reference's conventions, the parser never raises, and the rewards
match the reference's definitions.

    python -m pytest tests/test_tools.py -q
"""
import collections
import http.server
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tools  # tests/conftest.py puts the repository root on sys.path
from authors_code import authors_verdicts
from common import code_tests, sandbox

TIMEOUT = 2.0  # short, so the hostile battery stays quick
GRACE = 2.0  # every call must return within TIMEOUT + GRACE
LEVEL = sandbox.sandbox_isolation().level
needs_full_isolation = pytest.mark.skipif(LEVEL != "full", reason=f"isolation level is {LEVEL}, not full")
needs_uid_drop = pytest.mark.skipif(LEVEL == "basic", reason="basic isolation cannot kill setsid() escapes")


pytestmark = pytest.mark.usefixtures("default_sandbox")  # tests/conftest.py


@pytest.fixture(params=["warm", "cold"])
def sandbox_kind(request):
    """Every hostile program runs on both paths to the full sandbox: warm (forked from a pooled interpreter)
    and cold (a new interpreter in new namespaces per call). Without full isolation there is no warm path (a
    warm call runs cold): its cases are skipped, not passed."""
    if request.param == "warm" and LEVEL != "full":
        pytest.skip(f"the warm path needs full isolation, the level here is {LEVEL}: the call would run cold")
    sandbox.configure(kind=request.param)
    return request.param


def run_hostile(code, **kwargs):
    start = time.monotonic()
    text = tools.execute_code(code, TIMEOUT, autoprint="off", **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT + GRACE, f"took {elapsed:.1f} s"
    return text


def live_processes_with(marker):
    """Pids whose name or command line holds marker (zombies are dead: they only wait to be reaped)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline + stat and stat.rsplit(b")", 1)[1].split()[0] != b"Z":
            found.append(int(pid))
    return found


def name_self(marker):
    # the kernel shows this name (comm, 15 bytes at most) in the host's /proc, and forks inherit it
    return f"open('/proc/self/comm', 'w').write({marker!r})\n"


def process_name(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def unique_marker():
    return "sod" + secrets.token_hex(6)

# -----------------------------------------------------------------------------
# the sandbox against hostile code


def test_infinite_loop_returns_the_reference_timeout_text_and_is_killed(sandbox_kind):
    marker = unique_marker()
    assert run_hostile(name_self(marker) + "while True: pass") == "no stdout here"
    assert live_processes_with(marker) == []


@pytest.mark.parametrize("loop",
                         ["while True: os.fork()",  # dies as soon as the namespace's pid 1 hits the limit
                          "while True:\n    try: os.fork()\n    except OSError: pass"],  # keeps forking
                         ids=["plain", "resilient"])
def test_fork_bomb_is_bounded_and_leaves_nothing_running(loop, sandbox_kind):
    marker = unique_marker()
    text = run_hostile(name_self(marker) + "import os\n" + loop)
    # the children's tracebacks interleave and the 256-char cap may cut "BlockingIOError" out:
    # any traceback will do
    assert text == "no stdout here" or text.startswith("Traceback") or "BlockingIOError" in text
    assert live_processes_with(marker) == []


def test_allocating_10_gb_gives_a_memory_error(sandbox_kind):
    assert "MemoryError" in run_hostile("x = bytearray(10 * 2**30)")


def test_printing_forever_is_capped_on_the_host(sandbox_kind):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    text = run_hostile("import sys\nwhile True: sys.stdout.write('x' * 2**20)")
    assert len(text) <= 256 + len("...(truncated)...")
    assert text.startswith("x" * 100)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


@needs_uid_drop
@pytest.mark.parametrize("spawn", [
    "import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nprint('spawned')",
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
    "        os.execvp('sleep', ['sleep', '{marker}'])\n    os._exit(0)\ntime.sleep(0.2)\nprint('spawned')",
], ids=["popen", "double-fork-setsid"])
def test_background_children_do_not_survive(spawn, sandbox_kind):
    marker = f"{10**6 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"  # an unused sleep duration
    assert run_hostile(spawn.format(marker=marker)) == "spawned\n"
    assert live_processes_with(marker) == []


@needs_uid_drop
def test_a_program_that_leaves_its_process_group_is_killed_on_timeout(sandbox_kind):
    marker = unique_marker()
    assert (run_hostile(name_self(marker) + "import os, time\nos.setsid()\ntime.sleep(100)")
            == "no stdout here")
    assert live_processes_with(marker) == []


@pytest.mark.parametrize("level", ["uid", "basic"])
def test_fallback_levels_run_code_and_kill_it_on_timeout(level, monkeypatch):
    if level == "uid" and LEVEL != "full" and LEVEL != "uid":
        pytest.skip("needs root and setpriv")
    python = sys.executable
    if level == "uid":  # without mounts: an interpreter that the unprivileged uid can read where it lies
        python = next((p for p in (sys.executable, "/usr/bin/python3")
                       if sandbox._probe("uid", p, sandbox.View()) is not None), None)
        if python is None:
            pytest.skip("no interpreter here that the unprivileged uid can read")
    monkeypatch.setattr(sandbox, "_isolation", sandbox.Isolation(level, python, sandbox.View(), ()))
    assert tools.execute_code("6 * 7") == "42\n"
    marker = unique_marker()
    assert run_hostile(name_self(marker) + "import os\nif os.fork() == 0:\n    os.setsid()\n"
                                           "while True: pass") == "no stdout here"
    if level == "uid":  # at the basic level the setsid() child escapes, as the module docstring says
        assert live_processes_with(marker) == []
    else:
        for pid in live_processes_with(marker):
            os.kill(pid, 9)


@needs_full_isolation
def test_writes_outside_the_working_directory_do_not_reach_the_host(sandbox_kind):
    name = unique_marker()
    targets = [f"/tmp/{name}", str(Path(__file__).resolve().parents[1] / name)]
    code = "".join(f"try:\n    open({t!r}, 'w').write('x')\n    print('wrote')\n"
                   "except OSError as e:\n    print(e)\n"
                   for t in targets)
    try:
        run_hostile(code, max_output_chars=0)
        # read-only root, private /tmp: neither write reaches the host (wherever the repository lives)
        assert not any(os.path.exists(t) for t in targets)
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)


def test_the_parent_environment_is_not_visible(sandbox_kind):
    secret = "secret-" + secrets.token_hex(8)
    os.environ["SOD_TEST_SECRET"] = secret
    try:
        code = ("import os\nprint(dict(os.environ))\n"
                f"for pid in (1, {os.getpid()}, os.getppid()):\n"
                "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
                "    except OSError as e:\n        print(e)\n")
        text = run_hostile(code, max_output_chars=0)
    finally:
        del os.environ["SOD_TEST_SECRET"]
    assert "'PATH'" in text
    if LEVEL == "basic":
        pytest.skip("at the basic level the program runs as our uid and can read our /proc environ")
    assert secret not in text


@needs_full_isolation
def test_network_connections_fail(sandbox_kind):
    text = run_hostile("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n"
                       "print('connected')")
    assert "connected" not in text and "Network is unreachable" in text


def test_sys_exit_with_an_error_code_returns_the_output_normally(sandbox_kind):
    assert run_hostile("import sys\nprint('bye')\nsys.exit(3)") == "bye\n"
    result = sandbox.run_python("import sys\nsys.exit(3)", timeout=TIMEOUT)
    assert (result.status, result.returncode) == ("finished", 3)
    result = sandbox.run_python("raise SystemExit('bye')", timeout=TIMEOUT)
    assert (result.returncode, result.stderr) == (1, "bye\n")


def test_a_segfault_is_reported_as_a_signal(sandbox_kind):
    assert (run_hostile("import ctypes\nctypes.string_at(0)")
            == "Process killed by signal SIGSEGV")


def test_run_python_feeds_stdin_and_keeps_streams_apart(sandbox_kind):
    result = sandbox.run_python("import sys\nprint(input()[::-1])\nprint('oops', file=sys.stderr)",
                                stdin="abc\n")
    assert result == sandbox.RunResult(status="finished", returncode=0, stdout="cba\n", stderr="oops\n")

# -----------------------------------------------------------------------------
# the sandbox's interpreter: the trainer's environment, and nothing around it

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def private_folder():
    """A folder of mode 700, as a home folder is, with a world-readable file in it."""
    folder = Path(tempfile.mkdtemp(prefix="sod_private_"))
    beside = folder / "beside.txt"
    beside.write_text("secret-" + secrets.token_hex(8))
    beside.chmod(0o644)
    assert folder.stat().st_mode & 0o777 == 0o700
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_venv(folder, *flags):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *flags, str(folder / "venv")], check=True,
                   timeout=120)
    return str(folder / "venv" / "bin" / "python")


TRAINER_IN_A_VENV = """
import json, sys
sys.path.insert(0, {repo!r})
import tools
from common import sandbox
answers = {{}}
for kind in ("warm", "cold"):
    sandbox.configure(kind)
    answers[kind] = [tools.execute_code(code, 20, autoprint="off", max_output_chars=0) for code in {codes!r}]
isolation = sandbox.sandbox_isolation()
print(json.dumps([isolation.level, isolation.python, answers]))
"""


def test_a_private_venv_runs_as_the_trainer_with_its_packages_and_nothing_beside_it(private_folder):
    """The real case: a venv inside a folder of mode 700 (here under /tmp, which the sandbox's own /tmp hides),
    whose numpy and sympy come from its base prefix (--system-site-packages: pyenv's, under /root here). Run as
    the trainer, its tool calls import them on both paths; the file beside the venv, the host's files and the
    network stay out of reach."""
    if LEVEL != "full":
        pytest.skip(f"mounting the environment needs full isolation, not {LEVEL}")
    pytest.importorskip("numpy")
    pytest.importorskip("sympy")
    python = make_venv(private_folder, "--system-site-packages")
    venv, beside = private_folder / "venv", private_folder / "beside.txt"
    codes = ["import numpy, sympy\nprint(1)",
             "import sys\nprint(sys.prefix)",
             f"print(open({str(beside)!r}).read())",
             f"import os\nprint(sorted(os.listdir({str(private_folder)!r})))",
             f"open({str(venv / 'written')!r}, 'w')",
             "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)"]
    env = {k: v for k, v in os.environ.items() if k != "SOD_SANDBOX_PYTHON"}
    out = subprocess.run([python, "-c", TRAINER_IN_A_VENV.format(repo=str(REPO), codes=codes)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    level, sandbox_python, answers = json.loads(out.stdout.splitlines()[-1])
    assert (level, sandbox_python) == ("full", python)
    for kind in ("warm", "cold"):
        imports, prefix, read, listing, write, connect = answers[kind]
        assert imports == "1\n" and prefix == f"{venv}\n"
        assert "No such file or directory" in read and beside.read_text() not in read
        assert listing == "['venv']\n"  # the path to the venv, nothing else of the private folder
        assert "Read-only file system" in write or "Permission denied" in write
        assert "Network is unreachable" in connect
    assert not (venv / "written").exists()


@needs_full_isolation
def test_the_way_to_the_environment_shows_nothing_else(sandbox_kind):
    """Each folder on the way to a bound one (/root on the way to pyenv's /root/.pyenv/versions/3.11.7) holds
    only the next folder on that way; neither they nor what is bound can be written."""
    view = sandbox.sandbox_isolation().view
    binds, shown = view.binds, view.binds + tuple(path for path, _ in view.links)
    ways = sorted({"/".join(b.split("/")[:k]) for b in binds for k in range(2, b.count("/") + 1)} - set(binds))
    if not ways:
        pytest.skip("every bound folder sits at the top of the root here")
    expected = "".join(f"{sorted({b[len(w):].split('/')[1] for b in shown if b.startswith(w + '/')})}\n"
                       for w in ways)
    code = "import os\n" + "".join(f"print(sorted(os.listdir({w!r})))\n" for w in ways)
    assert run_hostile(code, max_output_chars=0) == expected
    for folder in ways + [b for b in binds if os.path.isdir(b)]:
        text = run_hostile(f"open({folder + '/sod_written'!r}, 'w')")
        assert "Read-only file system" in text or "Permission denied" in text


def test_the_view_binds_the_topmost_folders_and_repeats_the_system_symlinks(monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="sod_layout_"))
    try:
        for folder in ["usr/lib", "opt/env/lib", "home/alice/venv/lib/site-packages"]:
            (root / folder).mkdir(parents=True)
        (root / "lib").symlink_to("usr/lib")
        monkeypatch.setattr(sandbox, "SYSTEM_PATHS", (str(root / "usr"), str(root / "lib"), str(root / "none")))
        view = sandbox._view([str(root / "opt/env"), str(root / "opt/env/lib"), str(root / "usr/lib"),
                              str(root / "home/alice/venv/lib/site-packages"), str(root / "home/alice/venv"),
                              str(root / "missing"), "", "/"])
        assert view == sandbox.View(
            binds=(str(root / "home/alice/venv"), str(root / "opt/env"), str(root / "usr")),
            links=((str(root / "lib"), "usr/lib"),))
    finally:
        shutil.rmtree(root)


def test_sandbox_python_chooses_the_interpreter_and_real_data_needs_numpy_and_sympy(private_folder, monkeypatch):
    """--sandbox_python (else $SOD_SANDBOX_PYTHON) is the sandbox's interpreter. A bare venv has the standard
    library alone: enough for the toy, not for real data, where the stage stops with what to do unless
    --sandbox_stdlib_ok."""
    import rollout
    python = make_venv(private_folder)
    cfg = rollout.RolloutConfig(sandbox_python=python)
    tools.setup_sandbox(cfg, "toy", "toy:valid")
    assert sandbox.sandbox_isolation().python == python
    assert tools.execute_code("import sys\nprint(sys.prefix)") == f"{private_folder / 'venv'}\n"
    assert "ModuleNotFoundError" in tools.execute_code("import numpy\nprint(1)")
    with pytest.raises(SystemExit, match=r"cannot import numpy and sympy; .*pip install numpy sympy.*"
                                         r"--sandbox_python.*--sandbox_url.*--sandbox_stdlib_ok"):
        tools.setup_sandbox(cfg, "toy", "aime_2024_problems.parquet")
    tools.setup_sandbox(rollout.RolloutConfig(sandbox_python=python, sandbox_stdlib_ok=True),
                          "Open-AgentRL-30K.parquet")
    with pytest.raises(SystemExit, match="--sandbox_python is not used with --sandbox_url"):
        tools.setup_sandbox(rollout.RolloutConfig(sandbox_python=python, sandbox_url="http://x"), "toy")
    with pytest.raises(SystemExit, match="--sandbox_python .* is not an executable"):
        tools.setup_sandbox(rollout.RolloutConfig(sandbox_python=str(private_folder / "nope")), "toy")
    monkeypatch.setenv("SOD_SANDBOX_PYTHON", python)
    sandbox.configure()  # back to the default interpreter: the environment variable's
    assert sandbox.sandbox_isolation().python == python
    monkeypatch.delenv("SOD_SANDBOX_PYTHON")
    sandbox.configure(python=sys.executable)
    if LEVEL == "full":  # the trainer's own environment, mounted: the sandbox imports what the trainer does
        import importlib.util
        assert sandbox.missing_packages() == [m for m in ("numpy", "sympy") if not importlib.util.find_spec(m)]


# -----------------------------------------------------------------------------
# the tool text


def test_tool_calls_sent_together_give_the_answers_of_one_after_another_in_order():
    """64 calls at once (how much faster that is: python scripts/speed.py)."""
    codes = [f"print(sum(range(10**5)) + {i})" for i in range(64)]
    calls = [tools.ToolCall(tools.TOOL_NAME, {"code": c}) for c in codes]
    sequential = [tools.execute_code(c) for c in codes]
    assert tools.run_tool_calls(calls) == sequential == [f"{4999950000 + i}\n" for i in range(64)]


def test_reference_autoprint_wraps_the_last_nonempty_line():
    assert tools.add_autoprint("x = 1\nx * 2\n\n") == "x = 1\nprint(x * 2)\n\n"
    assert tools.add_autoprint("print(1)\n") == "print(1)\n"
    assert tools.execute_code("x = 21\nx * 2") == "42\n"


def test_reference_autoprint_keeps_its_quirks():
    assert "TypeError" in tools.execute_code("x = 5")  # print(x = 5)
    assert "IndentationError" in tools.execute_code("def f():\n    return 1")  # print(    return 1)
    assert "SyntaxError" in tools.execute_code("import math")  # print(import math)
    assert tools.add_autoprint("x\n   ") == "x\nprint(   )"  # whitespace-only lines are not skipped
    assert tools.add_autoprint("printer = 3") == "printer = 3"  # starts with "print": left alone
    assert tools.add_autoprint("x = 5", "off") == "x = 5"


def test_expression_autoprint_wraps_only_a_final_bare_expression():
    def wrap(code):
        return tools.add_autoprint(code, "expression")
    assert wrap("x = 5") == "x = 5"
    assert wrap("print(1)") == "print(1)"
    assert wrap("def f(:") == "def f(:"  # a syntax error is left for python to report
    assert wrap("x = 1; x  # the answer") == "x = 1; print(x)  # the answer"
    assert wrap("(1 +\n 2)\n") == "print((1 +\n 2))\n"
    assert wrap("é = 1\né + 1") == "é = 1\nprint(é + 1)"  # ast columns are bytes, not characters
    assert tools.execute_code("import math\nmath.factorial(\n    5\n)", autoprint="expression") == "120\n"


def test_only_the_first_fenced_python_block_runs():
    text = "Let me compute.\n```python\nprint(1)\n```\nand\n```python\nprint(2)\n```"
    assert tools.execute_code(text) == "1\n"


def test_truncation_keeps_the_middle_out():
    text = "".join(chr(ord("a") + i % 26) for i in range(300))
    assert tools.truncate_output(text, 256) == text[:128] + "...(truncated)..." + text[-128:]
    assert tools.truncate_output(text, 300) == text
    assert tools.truncate_output(text, 0) == text
    assert tools.execute_code("print('y' * 1000)") == "y" * 128 + "...(truncated)..." + "y" * 127 + "\n"


def test_stdout_comes_before_stderr():
    code = "import sys\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\nprint('c')"
    assert tools.execute_code(code) == "a\nc\nb\n"


def test_tool_call_failed_follows_the_reference_markers():
    assert tools.tool_call_failed("Traceback (most recent call last): ...")
    assert tools.tool_call_failed("Error when executing tool: 'code'")
    assert tools.tool_call_failed("Execution timed out")
    assert tools.tool_call_failed("no stdout here")  # our addition: the local timeout text
    assert not tools.tool_call_failed("42\n")


class FakeSandboxFusion(http.server.BaseHTTPRequestHandler):
    """A SandboxFusion server that speaks the official client's models: every request must parse as a
    RunCodeRequest, and every 200 reply is a RunCodeResponse."""
    replies = []  # (HTTP status, JSON body), consumed in order
    requests = []

    def do_POST(self):
        from sandbox_fusion.models import RunCodeRequest, RunCodeResponse
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        RunCodeRequest.parse_obj(payload)  # raises on a request the real server would refuse
        self.requests.append((self.path, payload))
        status, body = self.replies.pop(0)
        if status == 200:
            body = json.loads(RunCodeResponse.parse_obj(body).json())
        self.send_response(status)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def sandbox_fusion(monkeypatch):
    pytest.importorskip("sandbox_fusion",
                        reason="the SandboxFusion client (pip install -r tests/requirements.txt)")
    monkeypatch.setattr("common.sandbox.HTTP_RETRY_DELAY", 0.0)
    FakeSandboxFusion.replies, FakeSandboxFusion.requests = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeSandboxFusion)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_sandbox_fusion_api_retries_504_and_returns_stdout_then_stderr(sandbox_fusion):
    finished = {"status": "Failed", "message": "", "run_result": {"status": "Finished", "stdout": "out\n",
                                                                 "stderr": "err\n", "return_code": 1}}
    FakeSandboxFusion.replies = [(504, {}), (504, {}), (200, finished)]
    sandbox.configure(url=sandbox_fusion)
    assert tools.execute_code("x", 7, 512) == "out\nerr\n"
    path, payload = FakeSandboxFusion.requests[-1]
    assert path == "/run_code" and len(FakeSandboxFusion.requests) == 3
    assert payload == {"code": "print(x)", "language": "python", "compile_timeout": 7, "run_timeout": 7,
                       "memory_limit_MB": 512, "stdin": None, "files": {}, "fetch_files": []}


def test_sandbox_fusion_failures_give_the_reference_text(sandbox_fusion):
    FakeSandboxFusion.replies = [(200, {"status": "Failed", "message": "",
                                        "run_result": {"status": "TimeLimitExceeded"}}),
                                 (500, {})]
    sandbox.configure(url=sandbox_fusion + "/run_code")
    assert tools.execute_code("1") == "no stdout here"
    sandbox.configure(url=sandbox_fusion)
    assert tools.execute_code("1") == "no stdout here"  # no retry on 500
    sandbox.configure(url="http://127.0.0.1:9")
    assert tools.execute_code("1") == "no stdout here"

# -----------------------------------------------------------------------------
# tool calls


def tool_call(name, arguments, arguments_as_string=False):
    args = json.dumps(json.dumps(arguments)) if arguments_as_string else json.dumps(arguments)
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n</tool_call>'


# no piece, nor two pieces, can form a tag
no_tags = st.text(st.characters(blacklist_characters="<>"), max_size=30)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | no_tags
malformed = st.sampled_from(['{"name": "code_interpreter"}', '{"arguments": {}}', "[1, 2]", '"text"', "42",
                             "{'name': 'x'}", "{", "", "[" * 100000 + "]" * 100000, "1" * 5000])
# kept by the reference's parser (a JSON object with both keys), and answered with an error when run
kept_but_odd = st.sampled_from([('{"name": "x", "arguments": [1]}', tools.ToolCall("x", [1])),
                                ('{"name": 3, "arguments": {}}', tools.ToolCall(3, {})),
                                ('{"name": "x", "arguments": "not json"}',
                                 tools.ToolCall("x", "not json"))])


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "{", "}", '"name"', '"arguments"', ":", ",",
                                 '"x"', "[", "\n"])
                | st.text(max_size=20), max_size=30).map("".join))
def test_parse_tool_calls_never_raises(text):
    calls = tools.parse_tool_calls(text)
    assert all(isinstance(c, tools.ToolCall) for c in calls)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.tuples(st.just("call"), no_tags, st.dictionaries(no_tags, json_scalars, max_size=3), st.booleans()),
    st.tuples(st.just("junk"), no_tags),
    st.tuples(st.just("malformed"), malformed),
    st.tuples(st.just("odd"), kept_but_odd)), max_size=8))
def test_parse_tool_calls_round_trips_well_formed_calls_in_order(pieces):
    text, expected = "", []
    for piece in pieces:
        if piece[0] == "call":
            _, name, arguments, as_string = piece
            text += tool_call(name, arguments, as_string)
            expected.append(tools.ToolCall(name, json.dumps(arguments) if as_string else arguments))
        elif piece[0] == "junk":
            text += piece[1]
        elif piece[0] == "odd":
            text += f"<tool_call>{piece[1][0]}</tool_call>"
            expected.append(piece[1][1])
        else:
            text += f"<tool_call>{piece[1]}</tool_call>"
    counts = collections.Counter()
    assert tools.parse_tool_calls(text, counts) == expected
    assert counts["tool_calls_parsed"] == len(expected)
    assert counts["tool_calls_dropped"] == sum(p[0] == "malformed" for p in pieces)


def test_parse_tool_calls_needs_both_tags_and_keeps_unknown_names():
    assert tools.parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}') == []
    assert (tools.parse_tool_calls(tool_call("search", {"q": 1}))
            == [tools.ToolCall("search", {"q": 1})])


def test_run_tool_calls_answers_calls_that_cannot_run_with_the_reference_error_text():
    """The texts verl's _call_tool shows (tool_agent_loop.py): Python's own exception message, not
    truncated."""
    calls = [tools.ToolCall("code_interpreter", {"code": "print(1)"}),
             tools.ToolCall("python", {"code": "print(2)"}),
             tools.ToolCall("code_interpreter", {"script": "print(3)"}),
             tools.ToolCall("code_interpreter", {"code": 4}),
             # arguments written as a string
             tools.ToolCall("code_interpreter", '{"code": "print(5)"}'),
             tools.ToolCall("code_interpreter", '{"code": "print(6)}')]    # ... a malformed one
    texts = tools.run_tool_calls(calls)
    assert texts[0] == "1\n"
    assert texts[1] == "Error when executing tool: 'python'"
    assert texts[2] == "Error when executing tool: 'code'"
    assert texts[3] == "Error when executing tool: expected string or bytes-like object, got 'int'"
    assert texts[4] == texts[5] == "Error when executing tool: string indices must be integers, not 'str'"
    assert [tools.tool_call_failed(t) for t in texts] == [False, True, True, True, True, True]


def test_a_timeout_argument_is_honoured_up_to_the_configured_timeout():
    slow = "import time\ntime.sleep(1.5)\nprint('done')"
    def call(t):
        return tools.ToolCall("code_interpreter", {"code": slow, "timeout": t})
    start = time.monotonic()
    short, capped, ignored = tools.run_tool_calls([call(0.5), call(100), call("soon")], timeout=3.0)
    assert short == "no stdout here" and capped == ignored == "done\n"
    assert time.monotonic() - start < 3.0

# -----------------------------------------------------------------------------
# math rewards


def reference_strict_box(solution_str, ground_truth):
    """verl math_dapo, strict_box_verify=True, rewritten here from its description."""
    s = solution_str[-300:][-100:]
    idx = s.rfind("\\boxed{")
    pred = None
    if idx >= 0:
        depth, i, right = 0, idx, None
        while i < len(s):
            if s[i] == "{":
                depth += 1
            elif s[i] == "}":
                depth -= 1
                if depth == 0:
                    right = i
                    break
            i += 1
        if right is not None:
            pred = s[idx:right + 1][len("\\boxed{"):-1]
    return {"score": 1.0 if pred == ground_truth else -1.0, "acc": pred == ground_truth, "pred": pred}


TRICKY = [("The answer is \\boxed{42}.", "42"),
          ("The answer is \\boxed{ 42}.", "42"),  # a space: wrong, no normalisation
          ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
          ("\\boxed{1} then \\boxed{2}", "2"),  # the last box counts
          ("\\boxed{1} then \\boxed{2}", "1"),
          ("\\boxed{7}" + "." * 100, "7"),  # the box is earlier than the last 100 characters
          ("x" * 500 + "\\boxed{7}", "7"),
          ("\\boxed{7", "7"),  # never closed
          ("\\boxed{√2·π}", "√2·π"),  # unicode
          ("\\boxed{A}", "A"), ("\\boxed{(A)}", "A"), ("no box at all", "3")]


@pytest.mark.parametrize("solution, truth", TRICKY)
def test_score_math_matches_the_reference_on_tricky_strings(solution, truth):
    assert tools.score_math(solution, truth)._asdict() == reference_strict_box(solution, truth)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["\\boxed{", "{", "}", "4", "2", " ", "é", "x" * 40]),
                max_size=20).map("".join),
       st.sampled_from(["42", "4", "", "é"]))
def test_score_math_matches_the_reference_everywhere(solution, truth):
    assert tools.score_math(solution, truth)._asdict() == reference_strict_box(solution, truth)


def test_score_math_casts_a_numeric_ground_truth_to_str():
    assert tools.score_math("\\boxed{42}", 42).acc


def test_lenient_math_grader_works_inside_a_worker_thread():
    with ThreadPoolExecutor(1) as pool:
        right = pool.submit(tools.score_math_lenient, "so \\boxed{0.5}", "\\frac{1}{2}").result()
        wrong = pool.submit(tools.score_math_lenient, "so \\boxed{3}", "2").result()
        garbage = pool.submit(tools.score_math_lenient, "\\boxed{\\frac{", "2").result()
    assert right.acc and right.score == 1.0
    assert not wrong.acc and wrong.score == -1.0
    assert not garbage.acc

# -----------------------------------------------------------------------------
# code rewards

DOUBLE = "```python\nn = int(input())\nprint(n * 2)\n```"


def test_score_code_stdin_stdout_gives_partial_credit():
    # trailing newlines are ignored
    tests = {"inputs": ["1\n", "2\n", "3\n", "4\n"], "outputs": ["2\n", "4", "7\n", "8\n\n"]}
    assert code_tests.score_code(DOUBLE, tests) == code_tests.Score(0.75, False,
                                                                    "n = int(input())\nprint(n * 2)\n")
    assert code_tests.score_code(DOUBLE, json.dumps({"inputs": ["5\n"], "outputs": ["10\n"]})).acc


def test_score_code_calls_fn_name_on_solution_or_on_a_function():
    tests = {"inputs": ["[1, 2]\n3", "[]\n0"], "outputs": ["[[1, 2], 3]", "[[], 0]"], "fn_name": "pair"}
    method = ("```python\nclass Solution:\n    def pair(self, xs: List[int], n: int):\n"
              "        return (xs, n)\n```")
    function = "```python\ndef pair(xs, n):\n    return [xs, n]\n```"
    assert code_tests.score_code(method, tests).score == 1.0  # a tuple equals its list
    assert code_tests.score_code(function, tests).score == 1.0
    assert code_tests.score_code("```python\ndef other(xs, n):\n    return 0\n```", tests).score == -1.0


def test_score_code_runs_leetcode_style_asserts_one_by_one():
    tests = {"import_prefix": "from typing import *\n", "entry_point": "add",
             "test_code": "def check(candidate):\n    assert candidate(1, 2) == 3\n"
                          "    assert candidate(2, 2) == 5\n"}
    assert code_tests.score_code("```python\ndef add(a, b):\n    return a + b\n```", tests).score == 0.5


def test_score_code_reads_after_the_last_think_unless_asked_for_the_reference_split():
    tests = {"inputs": ["2\n"], "outputs": ["4\n"]}
    text = "<think>a</think>```python\nprint(0)\n```<think>b</think>" + DOUBLE
    assert code_tests.score_code(text, tests).acc
    assert not code_tests.score_code(text, tests, code_scoring="reference").acc  # grades print(0)


def test_reference_newline_unescaping_breaks_escaped_strings():
    code = "```python\nprint('\\n'.join(['a', 'b']))\n```"
    tests = {"inputs": [""], "outputs": ["a\nb\n"]}
    assert code_tests.score_code(code, tests).acc
    assert (code_tests.score_code(code, tests, code_scoring="reference")
            == code_tests.Score(-1.0, False, None))


def test_score_code_without_a_block_or_with_a_syntax_error_scores_minus_one():
    tests = {"inputs": ["1\n"], "outputs": ["2\n"]}
    assert code_tests.score_code("print(2)", tests).score == -1.0
    assert code_tests.score_code("```python\ndef (\n```", tests).score == -1.0

# -----------------------------------------------------------------------------
# compute_score


def test_compute_score_shaping_modes():
    wrong, right = "\\boxed{1}", "\\boxed{2}"
    assert tools.compute_score("aime", right, "2") == tools.Score(1.0, True, "2")
    assert tools.compute_score("aime", wrong, "2").score == pytest.approx(-1.1)  # num_turns reads 0
    def turns(n):
        return tools.compute_score("aime", wrong, "2", {"num_turns": n}, tool_shaping="turns").score
    assert [turns(2), turns(4), turns(6), turns(20)] == pytest.approx([-1.0, -0.9, -0.8, -0.6])
    assert tools.compute_score("aime", wrong, "2", {"num_turns": 6}, tool_shaping="none").score == -1.0
    assert tools.compute_score("gpqa", "no box", "A").pred == ""
    with pytest.raises(ValueError):
        tools.compute_score("aime", right, "2", tool_shaping="per-turn")


def test_compute_score_dispatches_code_and_lenient_math():
    assert (tools.compute_score("livecodebench", DOUBLE, {"inputs": ["2\n"], "outputs": ["4\n"]}).score
            == 1.0)
    assert (tools.compute_score("livecodebench", "no code", {"inputs": ["2\n"], "outputs": ["4\n"]}).score
            == pytest.approx(-1.1))
    assert tools.compute_score("aime", "\\boxed{0.5}", "\\frac{1}{2}", lenient_math=True).acc

# -----------------------------------------------------------------------------
# the warm sandbox: nothing of one call reaches the next, nothing outlives the trainer


LEAVE_STATE = """
import os, resource, json, subprocess, sys, time
open('/tmp/left_behind', 'w').write('x')
open('/dev/shm/left_behind', 'w').write('x')
os.makedirs('/tmp/d', exist_ok=True)
os.chdir('/tmp/d')
os.environ['LEFT_BEHIND'] = '1'
json.left_behind = 1                                         # a global of a module the zygote preloads
sys.left_behind = 1
resource.setrlimit(resource.RLIMIT_NOFILE, (7, 7))           # lowered: the process may not raise it again
subprocess.Popen(['sleep', '{marker}'])                       # still running when the call ends
r, w = os.pipe()                                             # open descriptors
print('left', os.getpid())
"""
LOOK_FOR_STATE = """
import os, resource, json, sys, glob
print(os.path.exists('/tmp/left_behind'), os.path.exists('/dev/shm/left_behind'), os.getcwd(),
      os.environ.get('LEFT_BEHIND'), hasattr(json, 'left_behind'), hasattr(sys, 'left_behind'),
      resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 7, sorted(glob.glob('/tmp/*')),
      sorted(os.listdir('/proc/self/fd')))
"""


def test_no_state_reaches_the_next_call_on_the_same_worker(one_worker):
    marker = f"{10**6 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    first = sandbox.run_python(LEAVE_STATE.replace("{marker}", marker), timeout=5)
    assert first.stdout.startswith("left"), first
    fresh = sandbox.run_python(LOOK_FOR_STATE, timeout=5)
    # /tmp holds the code, and the way to the interpreter's environment if that lives under the host's /tmp
    in_tmp = {"/tmp/" + d.split("/")[2] for d in sandbox.sandbox_isolation().view.binds if d.startswith("/tmp/")}
    assert fresh.stdout == (f"False False /tmp None False False False {sorted({'/tmp/main.py', *in_tmp})} "
                               "['0', '1', '2', '3']\n"), fresh
    assert live_processes_with(marker) == []
    assert one_worker.count == 1  # the same worker answered both calls


def test_a_worker_killed_from_outside_is_replaced(one_worker):
    assert tools.execute_code("print(1)") == "1\n"
    worker = one_worker.idle[0]
    os.killpg(worker.proc.pid, 9)
    worker.proc.wait()
    assert tools.execute_code("print(2)") == "no stdout here"  # the call that met the dead worker
    assert tools.execute_code("print(3)") == "3\n"             # a new worker
    assert one_worker.idle[0] is not worker


def test_warm_and_cold_paths_give_the_same_answers_alone_and_64_at_once():
    """Both paths, one after the other (their cost, side by side: python scripts/speed.py)."""
    if LEVEL != "full":
        pytest.skip("the warm path needs full isolation")
    calls = [tools.ToolCall(tools.TOOL_NAME, {"code": f"print(57 * {i})"}) for i in range(64)]
    for kind in ("warm", "cold"):
        sandbox.configure(kind=kind)
        assert [tools.execute_code("print(57 * 26)") for _ in range(3)] == ["1482\n"] * 3
        assert tools.run_tool_calls(calls) == [f"{57 * i}\n" for i in range(64)]


SIGKILL_DURING_A_CALL = """
import sys, time
sys.path.insert(0, {repo!r})
import tools
from common import sandbox
sandbox.configure(kind={kind!r})
print("calling", flush=True)
tools.execute_code(open('/proc/self/comm', 'w').write({marker!r}) and "import time\\ntime.sleep(30)", 60)
"""


@pytest.mark.parametrize("path", ["warm", "cold"])
def test_no_sandbox_outlives_a_killed_trainer(path, tmp_path):
    if LEVEL != "full":
        pytest.skip("needs full isolation")
    marker = unique_marker()
    code = SIGKILL_DURING_A_CALL.format(repo=str(Path(__file__).resolve().parents[1]), marker=marker,
                                        kind=path)
    code = code.replace("open('/proc/self/comm', 'w').write({marker!r}) and ".format(marker=marker),
                        f"\"open('/proc/self/comm', 'w').write({marker!r})\\n\" + ")
    trainer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert trainer.stdout.readline() == "calling\n"
    # the trainer's own command line holds the marker too (and so does a child it forked, until that child
    # execs): wait for a process that the sandboxed program named
    running = []
    deadline = time.monotonic() + 20
    while not running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [pid for pid in live_processes_with(marker) if process_name(pid) == marker]
    assert running, "the sandboxed program never started"
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 10  # SIGKILL travels two parent-death hops; a loaded machine may lag
    while live_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_processes_with(marker) == []
    if path == "cold":  # the scratch folder of the killed trainer is swept at the next start
        stale = [p for p in Path(tempfile.gettempdir()).glob(f"sod_sandbox_{trainer.pid}_*")]
        subprocess.run([sys.executable, "-c",
                        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r});"
                        "from common import sandbox; sandbox.sandbox_isolation()"], check=True)
        assert stale and not any(p.exists() for p in stale)


def test_a_sandbox_whose_host_died_before_it_could_ask_for_the_death_signal_never_starts():
    # between fork and exec the child asks for SIGKILL on its parent's death; had the parent died already,
    # the request is void and the child would run on as an orphan: it must exit instead
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        sandbox._set_parent_death_signal(parent + 1)  # a parent it does not have
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1
    pid = os.fork()
    if pid == 0:
        sandbox._set_parent_death_signal(parent)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


# -----------------------------------------------------------------------------
# function-call code tests, graded as the authors' sandbox wrapper grades them (tests/authors_code.py)

FUNCTION_PROBLEMS = [
    # (solution, fn_name, [(stdin, expected stdout)])
    ("def f(s):\n    return s", "f", [('"abc"', "abc"), ('"abc"', '"abc"')]),        # a str prints raw
    ("def f(x):\n    return x / 1", "f", [("1", "1"), ("1", "1.0")]),                # 1.0 is not 1
    ("def f(xs):\n    return xs", "f", [("[1,2]", "[1,2]"), ("[1,2]", "[1, 2]")]),   # json.dumps spacing
    # a trailing newline fails
    ("def f(a, b):\n    return (a, b)", "f", [("1\n2", "[1, 2]"), ("1\n2\n", "[1, 2]")]),
    ("def f(a):\n    return a > 0", "f", [("3", "true"), ("3", "True")]),            # bool: json
    ("def f(a):\n    return None", "f", [("3", "null"), ("3", "None")]),
    ("def f(a):\n    return {'k': [a]}", "f", [("5", '{"k": [5]}')]),
    ("class Solution:\n    def f(self, a: List[int]) -> int:\n        return sum(a)", "f",
     [("[1, 2, 3]", "6"), ("[]", "0")]),
    ("def f(a):\n    return sqrt(a)", "f", [("4", "2.0")]),                          # star imports: math
    ("def f(a):\n    raise ValueError(a)", "f", [("1", "")]),                        # an error prints nothing
    ("def g(a):\n    return a", "f", [("1", "1")]),                                  # no such function
    # blank stdin: no arguments
    ("def f():\n    return 7", "f", [("", "7"), ("  \n", "7")]),
]


@pytest.mark.parametrize("solution, fn_name, cases", FUNCTION_PROBLEMS)
def test_function_problems_get_the_verdicts_of_the_authors_wrapper(solution, fn_name, cases):
    tests = {"inputs": [i for i, _ in cases], "outputs": [o for _, o in cases], "fn_name": fn_name}
    ours = code_tests.code_verdicts(solution, __import__("ast").parse(solution), tests)
    theirs = authors_verdicts(solution, tests)
    if ours is None:  # the code defines neither the function nor class Solution: the reference scores it -1
        assert not any(theirs)
        assert code_tests.score_code(f"```python\n{solution}\n```", tests).score == -1.0
    else:
        assert ours == theirs


def test_reference_code_scoring_fails_function_problems_given_as_objects_without_class_solution():
    tests = {"inputs": ["3"], "outputs": ["3"], "fn_name": "f"}
    solution = "```python\ndef f(a):\n    return a\n```"
    assert code_tests.score_code(solution, tests).acc
    # a JSON string parses
    assert code_tests.score_code(solution, json.dumps(tests), code_scoring="reference").acc
    # str(dict) does not
    assert code_tests.score_code(solution, tests, code_scoring="reference").score == -1.0


def test_code_tests_and_tool_calls_reach_sandbox_fusion_from_a_stage_config(sandbox_fusion, monkeypatch):
    """--sandbox_url of every stage's config carries through the rollout to the tool and to the code
    grader."""
    import rollout
    ok = {"status": "Success", "message": "", "run_result": {"status": "Finished", "stdout": "4\n",
                                                             "stderr": "", "return_code": 0}}
    FakeSandboxFusion.replies = [(200, ok)] * 2
    cfg = rollout.RolloutConfig(sandbox_url=sandbox_fusion)
    tools.setup_sandbox(cfg, "Open-AgentRL-30K.parquet")  # as a stage does once, at its start
    assert (tools.tool_runner(cfg)([tools.ToolCall(tools.TOOL_NAME, {"code": "print(2 + 2)"})])
            == tools.Reply(["4\n"]))
    t = rollout.Trajectory(prompt_ids=[], data_source="livecodebench",
                           ground_truth={"inputs": ["2"], "outputs": ["4"]})
    monkeypatch.setattr(t, "response_ids", [], raising=False)
    tokenizer = type("T", (), {"decode": staticmethod(lambda ids, skip_special_tokens:
                                                      "```python\nprint(4)\n```")})
    rollout.score_trajectory(t, tokenizer, cfg)
    assert t.acc and [p["stdin"] for _, p in FakeSandboxFusion.requests] == [None, "2"]
