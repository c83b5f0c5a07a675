"""
common/sandbox.py: the local sandbox that runs model-written Python, where the reference uses SandboxFusion,
and the switch to a SandboxFusion server (common/sandbox_fusion.py). One entry point, run_python; the kind of
sandbox is set once per process with configure(kind, url), warm by default.

Its isolation level is probed once, on first use, and logged in one line:
  - full: new pid, network, mount and IPC namespaces, a read-only root filesystem, private tmpfs /tmp (the
    working directory) and /dev/shm, and an unprivileged uid leased from a pool, so that RLIMIT_NPROC bounds
    a fork bomb per sandbox. Two ways to get there:
      warm (default): a pool of workers already inside the namespaces, each a Python interpreter that
        forks a fresh child per call (a zygote, as Chrome starts its renderers: common/sandbox_worker.py); the
        child enters a mount and IPC namespace of its own with fresh /tmp and /dev/shm, drops to the worker's
        uid, takes its own rlimits and timeout, and runs the code; afterwards everything in the worker's
        namespace is killed;
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
"""
import contextlib
import fcntl
import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import sandbox_fusion

logger = logging.getLogger("sandbox")

SANDBOX_UIDS = range(60001, 60001 + 128)  # one uid per running sandbox: RLIMIT_NPROC counts per uid
MAX_PROCESSES = 64  # RLIMIT_NPROC, only enforced once the uid is unprivileged (root ignores it)
MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: bounds stdout/stderr files and anything written
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_ENV = {"PATH": SAFE_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}

_kind = "warm"  # set by configure
_url = ""


def configure(kind: str = "warm", url: str = "") -> None:
    """Where run_python runs code from now on, for the whole process: the local sandbox's warm or cold path,
    or, when url names a SandboxFusion server, that server (kind is then unused)."""
    global _kind, _url
    if kind not in ("warm", "cold"):
        raise ValueError(f"sandbox must be warm or cold, not {kind!r}")
    _kind, _url = kind, url


# -----------------------------------------------------------------------------
# Limits and uids

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
# The cold path: a new interpreter in new namespaces per call

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
# The warm path: a pool of sandboxed interpreters that fork a fresh child per call
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
#
# The zygote is common/sandbox_worker.py, passed to `python -c` as text: the unprivileged uid may be unable to
# read the repository (it may live under /root, mode 700).
_ZYGOTE = Path(__file__).with_name("sandbox_worker.py").read_text(encoding="utf-8")

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
# The isolation probe, and the one entry point

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
            exited_cleanly = result["status"] == "finished" and result["returncode"] == 0
            if exited_cleanly and stdout == expected.get(python, stdout):
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
               max_output_bytes: int = 8 * 2**20) -> dict:
    """Run a Python program: no auto-print, no truncation. Returns {status, returncode, stdout, stderr};
    status is "finished" (any exit code; a negative returncode is a signal), "timeout" or "error" (the sandbox
    could not run it). It runs where configure() said: the SandboxFusion server if a url is set, else the
    local sandbox's warm or cold path. Output past max_output_bytes is dropped (and a program cannot write
    past MAX_FILE_BYTES)."""
    kind, url = _kind, _url
    if url:
        return sandbox_fusion.run_code(code, stdin, url, timeout, memory_mb)
    level, python = sandbox_isolation()
    with _scratch_file() as stdin_file, _scratch_file() as out, _scratch_file() as err:
        stdin_file.write(stdin.encode("utf-8", errors="surrogatepass"))
        stdin_file.seek(0)
        pool = _warm_workers() if kind == "warm" and _warm_can_run(code) else None
        result = pool.run(code, stdin_file, out, err, timeout, memory_mb) if pool is not None else None
        if result is None:
            result = _run_cold(code, stdin_file, out, err, timeout, memory_mb, level, python)
        return dict(result, stdout=_read_capped(out, max_output_bytes),
                    stderr=_read_capped(err, max_output_bytes))


def _warm_can_run(code: str) -> bool:
    """Source python would refuse to read from a file gets the cold path, which reports it as python does."""
    return "\0" not in code and not any("\ud800" <= ch <= "\udfff" for ch in code)
