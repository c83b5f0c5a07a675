"""
common/sandbox.py: the local sandbox that runs model-written Python, where the reference uses SandboxFusion,
and the switch to a client of a SandboxFusion server (its run_code HTTP API, the sandbox the reference runs
code in). One entry point, run_python, which returns a RunResult; the kind of sandbox is set once per process
with configure(kind, url, python), warm by default.

Its isolation level is probed once, on first use, and logged in one line that names each layer that holds and
each that does not, with the reason:
  - full: new pid, network, mount and IPC namespaces; a root of its own, read-only, that shows only what the
    interpreter needs (/usr, the dynamic loader's cache, the interpreter's environment at its own paths,
    /dev/null, /dev/urandom and their kin, the namespace's /proc) and private tmpfs /tmp (the working
    directory) and /dev/shm, so no socket file or world-writable folder of the host; an unprivileged uid
    leased from a pool; a seccomp filter (common/sandbox_worker.py: no keyring, no new user namespace, no
    mount, ptrace, bpf or perf events); memory and process limits per call in a cgroup that count every page
    and process the call holds, memfds and tmpfs included (common/sandbox_cgroup.py). Two ways to get there:
      warm (default): a pool of workers already inside the namespaces, each a Python interpreter that
        forks a fresh child per call (a zygote, as Chrome starts its renderers: common/sandbox_worker.py); the
        child enters a mount and IPC namespace of its own with fresh /tmp and /dev/shm and the uid's cgroup,
        drops to the worker's uid, takes its own rlimits, filter and timeout, and runs the code; afterwards
        everything in the worker's namespace is killed;
      cold: new namespaces and a new interpreter for every call (the fallback, and --sandbox cold).
  - uid: no namespaces, but the unprivileged uid and its cgroup (needs root); every process of that uid is
    killed after.
  - basic: a plain child process.
At every level: its own session and process group, an environment holding only PATH, HOME, LANG and
PYTHONIOENCODING, rlimits on address space, CPU time, processes, file size, open files and core dumps, a
parent-death signal (no sandbox outlives the trainer), output written to files capped by RLIMIT_FSIZE and
read back only up to max_output_bytes. A call returns within about timeout + 2 s whatever the code does.
A layer that cannot be had is named in the isolation line and the rest hold: without libseccomp.so.2 no
filter; without a cgroup (not root, or a hierarchy not delegated to us) memory is bounded per process by
RLIMIT_AS only; without root there is no uid and no namespace (the basic level). User namespaces are never
needed: as root the sandbox creates its namespaces directly, so a host that refuses them (AppArmor, as on
Ubuntu 24.04) changes nothing.
The interpreter is configure()'s `python` (--sandbox_python), else $SOD_SANDBOX_PYTHON, else this one, the
trainer's: the model's code gets the packages of that environment, as the authors' tool gets those of
SandboxFusion's image (numpy, sympy, ...). At the full level the root shows that environment (its prefixes
and sys.path folders) read-only at the same paths, wherever it lives (inside a home of mode 700, or under the
host's /tmp): the folders on the way to it are empty folders of the new root, so nothing else of them shows.
The other levels cannot mount: the uid level runs the trainer's interpreter only if the uid can read it, else
/usr/bin/python3 (standard library only); the basic level runs it as the trainer's own user. The isolation
line names the interpreter and which of numpy, sympy, scipy, pandas and networkx it can import; a stage on
real data stops when numpy or sympy is missing (tools.setup_sandbox).

The uid leases are flocks on files in LOCK_DIR, a folder of root's with mode 700 outside shared temporary
space, checked before use and opened without following symlinks or truncating: nobody else can lay them.

What it does NOT protect against: kernel exploits through the system calls the filter allows, CPU and cache
side channels, reading the world-readable files of /usr and of the interpreter's environment, using up the
host's CPU for the duration of the timeout, and, in the uid and basic levels, network access, host socket
files, the keyring and writes to world-writable host directories; in the basic level also processes that
setsid() away and survive, reading other processes' environments, and memory past RLIMIT_AS. The warm path's
children share the worker's hash seed and pid namespace (pids grow from call to call). For untrusted code at
scale run a real SandboxFusion service (--sandbox_url).
"""
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from common import sandbox_cgroup

logger = logging.getLogger("sandbox")

SANDBOX_UIDS = range(60001, 60001 + 128)  # one uid per running sandbox: RLIMIT_NPROC counts per uid
MAX_PROCESSES = 64  # RLIMIT_NPROC, only enforced once the uid is unprivileged (root ignores it)
MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: bounds stdout/stderr files and anything written
MAX_OPEN_FILES = 256  # RLIMIT_NOFILE: the sandbox's own, not whatever the trainer inherited
# The uid leases: a root-owned folder of mode 700 outside shared temporary space, where nobody else can lay
# a symlink or hold a lock (/run is root's and cleared at boot, as a lease should be).
LOCK_DIR = "/run/sod_sandbox" if os.path.isdir("/run") else "/var/lib/sod_sandbox"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_ENV = {"PATH": SAFE_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
PACKAGES = ("numpy", "sympy", "scipy", "pandas", "networkx")  # of SandboxFusion's image: the isolation line
# says which the sandbox's interpreter can import
# What the full sandbox's root shows of the host besides the interpreter's environment, read-only: programs
# and shared libraries, and the dynamic loader's cache (a symlink among them, /lib -> usr/lib, is repeated)
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                "/etc/localtime")

_kind, _url, _python = "warm", "", ""  # set by configure


class RunResult(NamedTuple):
    """How one program ended, and what it wrote."""
    status: str              # "finished" (any exit code), "timeout", or "error" (the sandbox could not run it)
    returncode: int | None   # when finished; negative: killed by that signal
    stdout: str = ""
    stderr: str = ""


def configure(kind: str = "warm", url: str = "", python: str = "") -> None:
    """Where run_python runs code from now on, for the whole process: the local sandbox's warm or cold path
    with `python` as its interpreter (empty: $SOD_SANDBOX_PYTHON, else this one), or, when url names a
    SandboxFusion server, that server (kind and python are then unused). A new interpreter is probed on first
    use; call this before any tool call runs."""
    global _kind, _url, _python, _isolation, _warm_pool
    if kind not in ("warm", "cold"):
        raise ValueError(f"sandbox must be warm or cold, not {kind!r}")
    if python and not shutil.which(python):
        raise ValueError(f"the sandbox's python {python!r} is not an executable")
    pool = None
    with _sandbox_lock:
        _kind, _url = kind, url
        if python != _python:
            _python, _isolation, pool, _warm_pool = python, None, _warm_pool, None
    if pool is not None:
        pool.close()


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
              (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
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


def _lock_folder() -> int:
    """A descriptor of LOCK_DIR, made if missing, after checking that it is a folder (not a symlink) of
    root's with mode 700: a folder someone else laid could hold symlinks named like the lock files, or locks
    held forever."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(LOCK_DIR, 0o700)
    fd = os.open(LOCK_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    info = os.fstat(fd)
    if info.st_uid != 0 or stat.S_IMODE(info.st_mode) != 0o700:
        os.close(fd)
        raise OSError(f"the sandbox's lock folder {LOCK_DIR} must be a folder of root's, mode 700; it is "
                      f"uid {info.st_uid}'s, mode {stat.S_IMODE(info.st_mode):o}: remove it and start again")
    return fd


def _lease_uid() -> tuple:
    """(lock file, uid): an unprivileged uid used by no other running sandbox, in this process or any other,
    until the lock file is closed. The lease is an flock on a file per uid in LOCK_DIR, opened without
    following a symlink and never truncated."""
    folder = _lock_folder()
    try:
        first = _uid_rng.randrange(len(SANDBOX_UIDS))  # spread threads over the pool
        while True:
            for k in range(len(SANDBOX_UIDS)):
                uid = SANDBOX_UIDS[(first + k) % len(SANDBOX_UIDS)]
                lock = os.fdopen(os.open(str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                                         | os.O_CLOEXEC, 0o600, dir_fd=folder), "rb", buffering=0)
                try:
                    if not stat.S_ISREG(os.fstat(lock.fileno()).st_mode):
                        raise OSError(f"{LOCK_DIR}/{uid} is not a regular file")
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    lock.close()
                    continue
                except BaseException:
                    lock.close()
                    raise
                _kill_processes_of(uid)  # leftovers of a host that died mid-run
                return lock, uid
            time.sleep(0.05)  # every uid is busy
    finally:
        os.close(folder)


@contextlib.contextmanager
def _leased_uid():
    lock, uid = _lease_uid()
    try:
        yield uid
    finally:
        _kill_processes_of(uid)
        lock.close()  # releases the flock


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child must not import or dlopen


def _set_parent_death_signal(parent: int):
    """In a child between fork and exec: SIGKILL when the thread that started it dies (no orphaned
    sandbox). A parent that died before the prctl sends nothing, so the child checks that its parent is
    still `parent` afterwards and exits otherwise."""
    _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _sweep_stale_folders():
    """The scratch folders of cold sandboxes whose host process died (a SIGKILL leaves them behind)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        parts = name.split("_")
        if name.startswith("sod_sandbox_") and len(parts) >= 4 and parts[2].isdigit():
            with contextlib.suppress(OSError):  # only a folder of ours: another user may name one so
                info = os.lstat(os.path.join(root, name))
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                    continue
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
# The full sandbox's root: what the interpreter needs, and nothing else of the host

@dataclass(frozen=True)
class View:
    """What a full sandbox's root shows of the host (common/sandbox_worker.py builds it)."""
    binds: tuple = ()  # folders and files bound read-only at their own paths
    links: tuple = ()  # (path, target): symlinks of SYSTEM_PATHS, repeated as they are on the host

    def as_json(self) -> str:
        return json.dumps({"binds": list(self.binds), "links": [list(link) for link in self.links]})


def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _view(folders) -> View:
    """The root that shows SYSTEM_PATHS and the interpreter's `folders` read-only at their own paths: each
    topmost one is bound, the folders on the way to it are made empty (so nothing else of a home or of the
    host's /tmp shows), and a symlink of SYSTEM_PATHS is repeated as a symlink."""
    links = tuple((path, os.readlink(path)) for path in SYSTEM_PATHS if os.path.islink(path))
    wanted = {path for path in SYSTEM_PATHS if os.path.exists(path) and not os.path.islink(path)}
    wanted |= {os.path.normpath(f) for f in folders if os.path.isabs(f) and os.path.isdir(f) and f != "/"}
    binds = []
    for path in sorted(wanted):  # sorted: a folder comes before what it holds
        if not any(_inside(path, bound) for bound in binds):
            binds.append(path)
    return View(tuple(binds), links)


# What an interpreter says of itself, run on the host as the trainer's user: its version and prefix (the
# sandbox's run of it must say the same) and the folders it loads from: its prefixes, its sys.path, and the
# folder of its binary (a venv's python is a link to its base's).
_SELF_DESCRIPTION = """import json, os, sys
folders = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
           os.path.dirname(os.path.realpath(sys.executable)), *sys.path]
print(json.dumps([sys.version, sys.prefix, folders]))"""


def _describe(python):
    """[version, prefix, folders] of `python`, run on the host; None if it does not run."""
    try:
        out = subprocess.run([python, "-I", "-c", _SELF_DESCRIPTION], env=SANDBOX_ENV, cwd="/",
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        return json.loads(out.stdout) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# -----------------------------------------------------------------------------
# The cold path: a new interpreter in new namespaces per call
#
# What runs inside the namespaces as root, on both paths, is common/sandbox_worker.py: here it builds the call's
# root (the View, fresh /tmp and /dev/shm), drops to the uid, installs the seccomp filter and execs the
# interpreter on the code. It is passed to `python -c` as text: the unprivileged uid may be unable to read the
# repository (it may live under /root, mode 700). The host puts the call in its uid's cgroup first.
_IN_SANDBOX = Path(__file__).with_name("sandbox_worker.py").read_text(encoding="utf-8")


def _sandbox_command(level, python, uid, code_path, view):
    # No -I for the code: the environment is already scrubbed, -I would make python
    # ignore PYTHONIOENCODING, and it would drop the script's directory from sys.path,
    # which code that writes a helper module and imports it relies on. (The root
    # process before it, which execs it, is started with -I -S -B: it needs no site.)
    if level == "full":
        return ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount", "--ipc", "--mount-proc",
                python, "-I", "-S", "-B", "-c", _IN_SANDBOX, "cold", code_path, str(uid), view.as_json()]
    if level == "uid":
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                "--pdeathsig", "KILL", "--", python, "main.py"]
    return [python, "main.py"]


def _call_cgroup(stack, cgroups, uid, memory_mb) -> list:
    """Descriptors of the uid's cgroup.procs files (closed with `stack`), its limits set for this call; none
    where there is no cgroup."""
    if not cgroups.version:
        return []
    folders = sandbox_cgroup.folders_of(cgroups, uid)
    sandbox_cgroup.set_limits(cgroups, folders, memory_mb, MAX_PROCESSES)
    fds = sandbox_cgroup.open_procs(folders)
    for fd in fds:
        stack.callback(os.close, fd)
    return fds


def _run_cold(code, stdin_file, out, err, timeout, memory_mb, level, python, view=View(),
              cgroups=sandbox_cgroup.Cgroups()) -> RunResult:
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
            host_pid = os.getpid()
            try:
                cgroup_procs = _call_cgroup(stack, cgroups, uid, memory_mb) if uid is not None else []

                def in_child():  # runs between fork and exec: plain syscalls only, no locks
                    _set_parent_death_signal(host_pid)
                    for res, values in limits:
                        resource.setrlimit(res, values)
                    for fd in cgroup_procs:
                        os.write(fd, b"0")  # into the uid's cgroup: unshare, the worker and the code

                proc = subprocess.Popen(_sandbox_command(level, python, uid, code_path, view),
                                        stdin=stdin_file, stdout=out, stderr=err, cwd=host_dir, env=env,
                                        start_new_session=True, preexec_fn=in_child)
            except (OSError, subprocess.SubprocessError) as e:
                err.write(str(e).encode())
                return RunResult("error", None)
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
            return RunResult("timeout", None) if timed_out.is_set() else RunResult("finished", returncode)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


# -----------------------------------------------------------------------------
# The warm path: a pool of sandboxed interpreters that fork a fresh child per call
#
# Starting an interpreter inside fresh namespaces costs ~12-15 ms of CPU per call, most of a toy RL step.
# A warm worker pays it once: `unshare` builds the pid, network, mount and IPC namespaces, and inside them a
# Python "zygote" (root in the namespace, its pid 1) builds the sandbox's root (the View) and waits for
# requests on a socket. Each call then gets a child forked from the zygote, so from an interpreter that has
# already started. Before it runs the model's code the child enters a mount and IPC namespace of its own with
# fresh tmpfs /tmp and /dev/shm (its private scratch space, gone with it), moves into the worker's cgroup (the
# uid's, whose limits the host sets for each call), drops to the worker's unprivileged uid, takes its own
# rlimits and a parent-death signal, installs the seccomp filter, closes every inherited descriptor and
# receives a scrubbed environment. Nothing of one call is left for the next: the zygote never runs model code,
# kills everything in the namespace after each call (kill(-1) from pid 1) and forks the next child from the
# same clean state. A worker dies with its host: the zygote exits when the host's end of the socket closes,
# which the kernel does when the host dies.
#
# The zygote is common/sandbox_worker.py (_IN_SANDBOX, as on the cold path).


class _Worker:
    """One warm sandbox: the unshare process, the zygote at the other end of `sock`, the uid it runs code as
    and that uid's cgroup."""

    def __init__(self, python: str, view: View, cgroups: sandbox_cgroup.Cgroups, uid: int, lease):
        host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.uid, self.lease, self.sock, self.cgroups = uid, lease, host_end, cgroups
        self.folders = sandbox_cgroup.folders_of(cgroups, uid) if cgroups.version else ()
        self.memory_mb = None  # the limit the cgroup holds now
        procs = sandbox_cgroup.open_procs(self.folders)
        try:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount", "--ipc", "--mount-proc",
                 python, "-c", _IN_SANDBOX, "warm", str(worker_end.fileno()), str(uid), view.as_json(),
                 json.dumps(procs)],
                pass_fds=[worker_end.fileno(), *procs], env=SANDBOX_ENV, cwd="/", start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            worker_end.close()
            for fd in procs:
                os.close(fd)
        self.sock.settimeout(15.0)
        try:
            ready = self.sock.recv(16)
        except OSError:
            ready = b""
        if ready != b"ready":
            self.close()
            raise OSError(f"the warm sandbox did not start: {self.proc.stderr.read().decode()[-300:]}")

    def run(self, code: str, stdin_file, out, err, timeout: float, memory_mb: int) -> RunResult:
        """The zygote's answer; ValueError if it gave none."""
        if self.folders and memory_mb != self.memory_mb:
            sandbox_cgroup.set_limits(self.cgroups, self.folders, memory_mb, MAX_PROCESSES)
            self.memory_mb = memory_mb
        with _scratch_file() as code_file:
            code_file.write(code.encode("utf-8", errors="surrogatepass"))
            code_file.seek(0)
            request = {"timeout": timeout,
                       "rlimits": [(res, *values) for res, values in _rlimits(timeout, memory_mb)],
                       "env": SANDBOX_ENV}
            fds = [stdin_file.fileno(), out.fileno(), err.fileno(), code_file.fileno()]
            self.sock.settimeout(timeout + 2.0)  # the zygote answers within its own deadline
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
            answer = json.loads(self.sock.recv(1 << 16) or b"{}")
        if answer.get("status") not in ("finished", "timeout"):
            raise ValueError("the warm sandbox gave no answer")
        return RunResult(answer["status"], answer.get("returncode"))

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

    def __init__(self, python: str, view: View, size: int, cgroups=sandbox_cgroup.Cgroups()):
        self.python, self.view, self.cgroups, self.size = python, view, cgroups, size
        self.idle, self.count = [], 0
        self.lock = threading.Condition()

    def run(self, code, stdin_file, out, err, timeout, memory_mb) -> RunResult | None:
        """The call's status and returncode (its output is in `out` and `err`); None if no worker could start
        (the caller falls back to the cold path)."""
        try:
            worker = self._acquire()
        except OSError as e:
            logger.warning("warm sandbox unavailable, running this call cold: %s", e)
            return None
        try:
            result = worker.run(code, stdin_file, out, err, timeout, memory_mb)
        except (OSError, ValueError):
            self._discard(worker)
            return RunResult("error", None)
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
                return _Worker(self.python, self.view, self.cgroups, uid, lease)
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

@dataclass(frozen=True)
class Isolation:
    """What the local sandbox is: probed once, logged in one line."""
    level: str       # full, uid or basic
    python: str      # the interpreter of every call
    view: View       # what the full level's root shows: the host's programs, libraries, that interpreter
    packages: tuple  # those of PACKAGES that code in the sandbox can import
    seccomp: bool = False  # the probe's code ran under the seccomp filter
    cgroups: sandbox_cgroup.Cgroups = sandbox_cgroup.Cgroups()  # where the calls' cgroups live, if anywhere


_isolation = None
_warm_pool = None
_sandbox_lock = threading.Lock()


def sandbox_isolation() -> Isolation:
    """The local sandbox's isolation level, interpreter and packages: probed on first use, cached, logged
    once."""
    global _isolation
    with _sandbox_lock:
        if _isolation is None:
            _sweep_stale_folders()
            _isolation = _probe_isolation()
        return _isolation


def missing_packages(names=("numpy", "sympy")) -> list:
    """Those of `names` (of PACKAGES) that code in the sandbox cannot import; none on a SandboxFusion server,
    whose image has them."""
    return [] if _url else [name for name in names if name not in sandbox_isolation().packages]


# Run inside the sandbox: its answer must match what the host's run of the same interpreter says
# (_SELF_DESCRIPTION), and it names the packages the code can import and its seccomp mode (2: a filter).
_SANDBOX_PROBE = ("import importlib.util, json, sys\n"
                  f"found = [name for name in {PACKAGES!r} if importlib.util.find_spec(name)]\n"
                  "mode = [line.split()[1] for line in open('/proc/self/status') if line.startswith('Seccomp:')]\n"
                  "print(json.dumps([sys.version, sys.prefix, found, mode == ['2']]))")


def _probe(level, python, view, cgroups=sandbox_cgroup.Cgroups()):
    """[version, prefix, importable packages, seccomp filter on] as `python` says them inside the sandbox;
    None if it fails."""
    with _scratch_file() as stdin_file, _scratch_file() as out, _scratch_file() as err:
        result = _run_cold(_SANDBOX_PROBE, stdin_file, out, err, 10.0, 1024, level, python, view, cgroups)
        stdout = _read_capped(out, 8192)
    if result.status != "finished" or result.returncode != 0:
        return None
    with contextlib.suppress(ValueError):
        return json.loads(stdout)


def _probe_isolation() -> Isolation:
    chosen = _python or os.environ.get("SOD_SANDBOX_PYTHON", "")
    # Without a choice, this interpreter; where the uid cannot read it and no namespace can mount it into
    # view, the system python (standard library only).
    pythons = ([shutil.which(chosen) or chosen] if chosen
               else [sys.executable] + ["/usr/bin/python3"] * os.path.exists("/usr/bin/python3"))
    levels, notes = [], []
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        notes.append("no unprivileged uid (it needs root and setpriv)")
    else:
        levels = ["full", "uid"] if shutil.which("unshare") else ["uid"]
        if not shutil.which("unshare"):
            notes.append("no namespaces (unshare is missing)")
    cgroups = sandbox_cgroup.probe() if levels else sandbox_cgroup.Cgroups(note="no cgroup (it needs root)")
    # A uid that cannot read an interpreter's directory may still start it, only to
    # load another python's libraries (seen here: pyenv's 3.11.7 running Debian's
    # 3.11.2 stdlib), so the probe compares what it finds with the host's answer.
    described = {}
    for level in levels:
        for python in pythons:
            if python not in described:
                described[python] = _describe(python)
            if described[python] is None:
                if python not in [n.split(" ")[0] for n in notes]:
                    notes.append(f"{python} does not run")
                continue
            version, prefix, folders = described[python]
            view = _view(folders) if level == "full" else View()
            found = _probe(level, python, view, cgroups)
            if found is not None and found[:2] == [version, prefix]:
                return _logged(Isolation(level, python, view, tuple(found[2]), found[3], cgroups), notes)
            if python not in [n.split(" ")[0] for n in notes]:
                notes.append(f"{python} is not usable by the sandbox's unprivileged uid, " + (
                    "even with its environment mounted (are its files readable by others?)" if level == "full"
                    else "it lives where that uid cannot read"))
    found = _probe("basic", pythons[0], View())
    return _logged(Isolation("basic", pythons[0], View(), tuple(found[2]) if found else ()), notes)


def _logged(isolation: Isolation, notes: list) -> Isolation:
    """The isolation line: each layer that holds, and each that does not with the reason."""
    level, view, cgroups = isolation.level, isolation.view, isolation.cgroups
    layers = {"full": ["pid, network, mount and IPC namespaces",
                       f"a read-only root of {', '.join(view.binds)}, /dev/null, /dev/urandom and a fresh /tmp",
                       "unprivileged uid"],
              "uid": ["no namespaces: the host's files, sockets and network", "unprivileged uid"],
              "basic": ["no namespaces", "no uid of its own", "own process group, scrubbed environment"]}[level]
    if level == "full":
        layers.append("seccomp filter" if isolation.seccomp else
                      "no seccomp filter (libseccomp.so.2 could not be loaded): keyring, user namespaces, "
                      "ptrace, bpf and perf events are open")
    if level != "basic":
        layers.append(f"memory and process limits per call in a cgroup {cgroups.version}" if cgroups.version
                      else f"{cgroups.note}: memory limited per process (RLIMIT_AS) only")
    layers.append(f"rlimits (address space, CPU, processes, file size, {MAX_OPEN_FILES} open files)")
    missing = [name for name in PACKAGES if name not in isolation.packages]
    (logger.info if level == "full" and isolation.seccomp and cgroups.version else logger.warning)(
        "sandbox isolation: %s (%s), python %s; importable: %s; missing: %s%s", level, "; ".join(layers),
        isolation.python, ", ".join(isolation.packages) or "none", ", ".join(missing) or "none",
        f" ({'; '.join(notes)})" if notes else "")
    return isolation


def _warm_workers():
    """The shared pool of warm sandboxes, started on first use; None where the warm path cannot run."""
    global _warm_pool
    isolation = sandbox_isolation()
    with _sandbox_lock:
        if _warm_pool is None and isolation.level == "full":
            _warm_pool = _WarmPool(isolation.python, isolation.view,
                                   size=min(32, max(4, 2 * (os.cpu_count() or 1))), cgroups=isolation.cgroups)
        return _warm_pool if isolation.level == "full" else None


def run_python(code: str, stdin: str = "", timeout: float = 60.0, memory_mb: int = 2048,
               max_output_bytes: int = 8 * 2**20) -> RunResult:
    """Run a Python program: no auto-print, no truncation. It runs where configure() said: the SandboxFusion
    server if a url is set, else the local sandbox's warm or cold path. Output past max_output_bytes is dropped
    (and a program cannot write past MAX_FILE_BYTES)."""
    kind, url = _kind, _url
    if url:
        return _run_on_server(code, stdin, url, timeout, memory_mb)
    isolation = sandbox_isolation()
    with _scratch_file() as stdin_file, _scratch_file() as out, _scratch_file() as err:
        stdin_file.write(stdin.encode("utf-8", errors="surrogatepass"))
        stdin_file.seek(0)
        pool = _warm_workers() if kind == "warm" and _warm_can_run(code) else None
        result = pool.run(code, stdin_file, out, err, timeout, memory_mb) if pool is not None else None
        if result is None:
            result = _run_cold(code, stdin_file, out, err, timeout, memory_mb, isolation.level,
                               isolation.python, isolation.view, isolation.cgroups)
        return result._replace(stdout=_read_capped(out, max_output_bytes),
                               stderr=_read_capped(err, max_output_bytes))


def _warm_can_run(code: str) -> bool:
    """Source python would refuse to read from a file gets the cold path, which reports it as python does."""
    return "\0" not in code and not any("\ud800" <= ch <= "\udfff" for ch in code)


# -----------------------------------------------------------------------------
# A SandboxFusion server (--sandbox_url): every program goes there instead, the way to run untrusted code at
# scale

HTTP_TRIES = 3  # the reference retries only on HTTP 504, 3 tries in all
HTTP_RETRY_DELAY = 1.0  # seconds, doubled after each 504


def _run_on_server(code: str, stdin: str, url: str, timeout: float, memory_mb: int) -> RunResult:
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
    error = RunResult("error", None)
    for attempt in range(HTTP_TRIES):
        try:
            with urllib.request.urlopen(request, timeout=2 * timeout + 10) as response:
                answer = json.loads(response.read())
            run = answer.get("run_result") or {}
            if run.get("status") == "Finished":
                return RunResult("finished", run.get("return_code"), run.get("stdout") or "",
                                 run.get("stderr") or "")
            if run.get("status") == "TimeLimitExceeded":
                return error._replace(status="timeout")
            return error._replace(stderr=answer.get("message") or "")
        except urllib.error.HTTPError as e:
            if e.code != 504 or attempt == HTTP_TRIES - 1:
                return error._replace(stderr=f"HTTP {e.code}")
            time.sleep(HTTP_RETRY_DELAY * 2**attempt)
        except Exception as e:  # connection refused, bad JSON, missing keys: the model sees the same text
            return error._replace(stderr=str(e))
    return error
