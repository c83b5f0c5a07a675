"""
common/sandbox_worker.py: what runs as root inside a full sandbox's namespaces (common/sandbox.py), a program, not
a module to import. The host passes its text to `python -c`: the interpreter may run as an unprivileged uid
that cannot read the repository (it may live under /root, mode 700). Two ways in:

    python -I -S -B -c <this text> cold <code file> <uid> <mounts>    the cold path: one call, then exec
    python -c <this text> warm <socket fd> <uid> <mounts>             the zygote of a warm worker

Either way the process that runs the model's code sees the same files (mount_call_view): fresh tmpfs /tmp
and /dev/shm, a read-only root, and the interpreter's environment read-only at its own paths. <mounts> (JSON
of common/sandbox.py's EnvironmentMounts) names the environment's folders that the unprivileged uid could
not reach on its own: below a folder it cannot traverse (a home of mode 700) or under the host's /tmp, which
the fresh one hides. Each is opened before any mount, then bind-mounted at its own path inside a tmpfs that
covers the topmost folder the uid cannot traverse (a mask: root's, mode 755, read-only) or inside the fresh
/tmp. So the environment becomes visible and nothing else of the folders around it does.

Cold: read the code, mount, write it to /tmp/main.py, drop to the uid (no groups, no new privileges, a
parent-death signal) and exec the interpreter on main.py, which so becomes the namespace's pid 1.

Warm: for each request on the socket the zygote hands the call to a child forked ahead of time. The child
enters a mount and IPC namespace of its own with the view above, takes the request's stdin, stdout, stderr
and code descriptors, its rlimits and a parent-death signal, drops to the uid, closes every inherited
descriptor, gets the scrubbed environment and runs the code as /tmp/main.py. The zygote never runs model
code: after each call it kills everything else in the namespace (kill(-1) from pid 1), answers
{status, returncode} and forks the next child from the same clean state. It exits when the host's end of
the socket closes.
"""
import atexit
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import types

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC = 0x20000, 0x8000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38

# -----------------------------------------------------------------------------
# What a call sees: both paths

def mount(source, target, fstype, flags, options=None):
    def c(text):
        return None if text is None else os.fsencode(text)
    if libc.mount(c(source), c(target), c(fstype), flags, c(options)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")

def read_only(path):
    # a bind remount changes this one mount; it keeps the mount's nosuid, nodev and noexec (statvfs reports
    # them with the same bits)
    keep = os.statvfs(path).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)

def open_environment(mounts):
    # the environment's folders, opened while the host's paths still lead to them: a mask or the fresh /tmp
    # will hide those paths, a descriptor keeps the folder itself
    return [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in mounts["dirs"]]

def mount_call_view(mounts, opened):
    # As root, in the call's own mount namespace: fresh tmpfs /tmp and /dev/shm, the masks, then each folder
    # of the environment bound read-only at its own path, inside a mask or the fresh /tmp.
    mount("tmpfs", "/tmp", "tmpfs", 0, "size=64m,mode=1777")
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", 0, "size=16m,mode=1777")
    for mask in mounts["masks"]:
        mount("tmpfs", mask, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    umask = os.umask(0o022)  # the folders created on the way must be traversable by the uid
    for path, fd in opened:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)  # the folder the descriptor holds
        read_only(path)
    os.umask(umask)
    for mask in mounts["masks"]:
        read_only(mask)

def drop_to(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setresuid, which clears it

# -----------------------------------------------------------------------------
# The cold path

def run_cold(code_path, uid, mounts):
    # pid 1 of new pid, network, mount and IPC namespaces (unshare's), as root. The code is read before the
    # fresh /tmp hides it (the host's copy may live under /tmp). The mounts are private to the namespace
    # (unshare's default propagation): the host never sees them. After the exec the interpreter of the code is
    # pid 1: when it exits, or is killed, the kernel kills every process left inside. (Being pid 1, it ignores
    # signals it sends itself without a handler, and SIGXFSZ: writing past RLIMIT_FSIZE raises "OSError: File
    # too large" instead of killing it.) Its parent-death signal kills it when unshare dies, and unshare has
    # its own from the host thread that started it.
    with open(code_path, "rb") as f:
        code = f.read()
    mount_call_view(mounts, open_environment(mounts))
    read_only("/")
    os.chdir("/tmp")
    with open("main.py", "wb") as f:
        f.write(code)
    drop_to(uid)
    os.execv(sys.executable, [sys.executable, "main.py"])  # every descriptor we opened closes on exec

# -----------------------------------------------------------------------------
# The warm path: the zygote

def prepare():
    # The next call's process, forked ahead of its request: it enters a mount and IPC namespace of its own
    # with the call's view (as root), then waits on `channel` for the request and its descriptors.
    host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid:
        child_end.close()
        return pid, host_end
    sock.close()
    host_end.close()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        if libc.unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        mount("none", "/", None, MS_REC | MS_PRIVATE)
        # opened here, not in the zygote: a bind's source must belong to the caller's mount namespace
        mount_call_view(mounts, open_environment(mounts))
    except OSError:
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
    drop_to(uid)
    # setresuid cleared the dumpable flag too: /proc/self is the process's own again, as after the exec of
    # the cold path (core dumps stay off: RLIMIT_CORE 0)
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
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
    # The interpreter's own exit, without tearing down every object: in a forked child that teardown
    # copies each page it touches and costs ~10 ms. Threads are joined, atexit handlers run, the program's
    # own globals are released (so its objects' finalizers run and its files are flushed), then stdout and
    # stderr are flushed.
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

if __name__ == "__main__":  # always under `python -c`; the guard only keeps an import of this file harmless
    uid, mounts = int(sys.argv[3]), json.loads(sys.argv[4])
    if sys.argv[1] == "cold":
        run_cold(sys.argv[2], uid, mounts)
    sock = socket.socket(fileno=int(sys.argv[2]))
    import gc
    # objects of the zygote are never collected: a collection in a child would copy every page it scans
    gc.freeze()
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
        sock.send(json.dumps({"status": "timeout" if timed_out else "finished",
                              "returncode": returncode}).encode())
        next_call = prepare()  # while the host reads this answer
    reap(-1)
