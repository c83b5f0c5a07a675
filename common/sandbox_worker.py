"""
common/sandbox_worker.py: the zygote of a warm sandbox worker (common/sandbox.py: _Worker), a program, not a
module to import.

It runs as root and pid 1 inside the worker's pid, network and mount namespaces (read-only root), and is
started as `python -c <the text of this file> <socket fd> <uid>`: the host reads the text, because the
interpreter may run as an unprivileged uid that cannot read the repository (it may live under /root, mode
700).

For each request on the socket it hands the call to a child forked ahead of time. The child enters a mount
and IPC namespace of its own with fresh tmpfs /tmp and /dev/shm, takes the request's stdin, stdout, stderr
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
CLONE_NEWNS, CLONE_NEWIPC, MS_REC, MS_PRIVATE = 0x20000, 0x8000000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38

def prepare():
    # The next call's process, forked ahead of its request: it enters a mount and IPC namespace of its own
    # with fresh tmpfs /tmp and /dev/shm (as root), then waits on `channel` for the request and its
    # descriptors.
    host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid:
        child_end.close()
        return pid, host_end
    sock.close()
    host_end.close()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if (libc.unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0
            or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0):
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
    sock = socket.socket(fileno=int(sys.argv[1]))
    uid = int(sys.argv[2])
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
