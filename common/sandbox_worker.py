"""
common/sandbox_worker.py: what runs as root inside a full sandbox's namespaces (common/sandbox.py), a program, not
a module to import. The host passes its text to `python -c`: the interpreter may run as an unprivileged uid
that cannot read the repository (it may live under /root, mode 700). Two ways in:

    python -I -S -B -c <this text> cold <code file> <uid> <view>               the cold path: one call, then exec
    python -c <this text> warm <socket fd> <uid> <view> <cgroup fds>           the zygote of a warm worker

Either way the process that runs the model's code gets the same three layers:
  - a root of its own (enter_root): a read-only tmpfs that holds only what the interpreter needs. <view> (JSON
    of common/sandbox.py's View) names the host's folders and files bound read-only at their own paths (/usr,
    the dynamic loader's cache, the interpreter's environment) and the host's symlinks to repeat (/lib ->
    usr/lib); /dev holds null, zero, full, random and urandom, /proc is the pid namespace's own. pivot_root
    makes it / and the host's tree is detached: no /run, /var, /home or /etc of the host, so no socket file
    of the host, and nothing world-writable but the call's own /tmp and /dev/shm;
  - the call's scratch space (fresh_scratch): new tmpfs /tmp and /dev/shm, in which the view's folders that
    lived under the host's /tmp (a venv there) are bound again;
  - a seccomp filter (seccomp_filter), installed before any model code runs, in the spirit of Docker's default
    profile: the keyring (add_key, keyctl, request_key), new user namespaces (unshare, clone with
    CLONE_NEWUSER), mount and its relatives, ptrace and process_vm_*, bpf, perf_event_open, userfaultfd,
    io_uring, kernel modules, kexec, reboot, swap, clocks and the like all answer EPERM. clone3 answers ENOSYS,
    since a filter cannot read its flags, and the C library then falls back to clone. Other architectures than
    the native one are killed (libseccomp's default).

Cold: read the code, build the root and the scratch space, write the code to /tmp/main.py, drop to the uid (no
groups, no new privileges, a parent-death signal), install the filter and exec the interpreter on main.py,
which so becomes the namespace's pid 1. The host has put this process in the call's cgroup already.

Warm: the zygote builds the root once. For each request on the socket it hands the call to a child forked
ahead of time, which entered a mount and IPC namespace of its own with fresh scratch space, moved itself into
the call's cgroup (<cgroup fds>: the host's descriptors of its cgroup.procs files) and installed the filter.
The child takes the request's stdin, stdout, stderr and code descriptors, its rlimits and a parent-death
signal, drops to the uid, closes every inherited descriptor, gets the scrubbed environment and runs the code
as /tmp/main.py. The zygote never runs model code: after each call it kills everything else in the namespace
(kill(-1) from pid 1), answers {status, returncode} and forks the next child from the same clean state. It
exits when the host's end of the socket closes.
"""
import atexit
import ctypes
import json
import os
import resource
import select
import signal
import socket
import stat
import sys
import types

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}[os.uname().machine]  # glibc has no wrapper for it
SCRATCH = ("/tmp", "/dev/shm")  # a fresh tmpfs per call
DEVICES = ("null", "zero", "full", "random", "urandom")
DEVICE_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"))

# -----------------------------------------------------------------------------
# What a call sees: both paths

def mount(source, target, fstype, flags, options=None):
    def c(text):
        return None if text is None else os.fsencode(text)
    if libc.mount(c(source), c(target), c(fstype), flags, c(options)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")

def read_only(path, extra=0):
    # a bind remount changes this one mount; it keeps the mount's nosuid, nodev and noexec (statvfs reports
    # them with the same bits)
    keep = os.statvfs(path).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep | extra)

def bind(fd, path):
    # the file or folder that `fd` (O_PATH) holds, read-only at `path`, made on the way
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.makedirs(path, exist_ok=True)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
    read_only(path, MS_NOSUID | MS_NODEV)  # no setuid program of /usr gains anything, nor does a device node
    os.close(fd)

def enter_root(view):
    # As root, in the sandbox's own mount namespace: everything to show is opened while the host's paths
    # still lead to it, a tmpfs mounted over /tmp becomes the new root, each is bound there at its own path,
    # and pivot_root swaps the new root in; the host's tree is then detached.
    opened = [(path, os.open(path, os.O_PATH)) for path in view["binds"]]
    new = "/tmp"
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    umask = os.umask(0o022)  # the folders made on the way must be traversable by the uid
    for path, fd in opened:
        bind(fd, new + path)
    for path, target in view["links"]:
        os.makedirs(os.path.dirname(new + path), exist_ok=True)
        os.symlink(target, new + path)
    os.mkdir(new + "/dev")
    mount("tmpfs", new + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in DEVICES:
        os.close(os.open(f"{new}/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o644))
        mount(f"/dev/{name}", f"{new}/dev/{name}", None, MS_BIND)
    for name, target in DEVICE_LINKS:
        os.symlink(target, f"{new}/dev/{name}")
    os.mkdir(new + "/dev/shm")
    read_only(new + "/dev")
    os.mkdir(new + "/proc")
    mount("/proc", new + "/proc", None, MS_BIND)  # the pid namespace's own (unshare --mount-proc's)
    os.makedirs(new + "/tmp", exist_ok=True)
    os.umask(umask)
    read_only(new)
    os.chdir(new)
    if libc.syscall(PIVOT_ROOT, b".", b".") != 0:  # the old root now sits under the new one, at "."
        raise OSError(ctypes.get_errno(), "pivot_root")
    if libc.umount2(b".", MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), "umount the host's root")
    os.chdir("/")

def fresh_scratch(view):
    # As root, in the call's own mount namespace: fresh tmpfs /tmp and /dev/shm, and in them again the view's
    # folders that lived under the host's /tmp, opened before the tmpfs hides them.
    under = [(path, os.open(path, os.O_PATH)) for path in view["binds"]
             if any(path.startswith(folder + "/") for folder in SCRATCH)]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777")
    umask = os.umask(0o022)
    for path, fd in under:
        bind(fd, path)
    os.umask(umask)

def drop_to(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # also what lets an unprivileged process install a filter
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setresuid, which clears it

# -----------------------------------------------------------------------------
# The seccomp filter: built once, installed in each call's process after the privilege drop

REFUSED = (
    "add_key", "keyctl", "request_key",                                   # the kernel keyring
    "unshare", "setns",                                                   # namespaces (clone: below)
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",   # other processes' memory
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "name_to_handle_at", "open_by_handle_at",
    "lookup_dcookie", "uselib", "_sysctl", "fanotify_init", "nfsservctl")
SCMP_ACT_ALLOW, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 7

def scmp_act_errno(code):
    return 0x00050000 | code

class ArgCmp(ctypes.Structure):  # libseccomp's struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]

def seccomp_filter():
    # A libseccomp context with the rules above, or None where libseccomp.so.2 cannot be loaded (the host's
    # isolation line then says the filter is missing: the probe reads Seccomp from /proc/self/status).
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    eperm = scmp_act_errno(1)
    rules = [(name, eperm, None) for name in REFUSED]
    rules += [("clone", eperm, ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)),
              ("clone3", scmp_act_errno(38), None)]  # ENOSYS
    for name, action, compare in rules:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            continue  # not a system call of this architecture
        arguments = (1, ctypes.pointer(compare)) if compare else (0, None)
        if lib.seccomp_rule_add_array(ctx, action, number, *arguments) != 0:
            raise OSError(f"seccomp rule for {name}")
    return lib, ctx

def install(seccomp):
    if seccomp is not None and seccomp[0].seccomp_load(seccomp[1]) != 0:
        raise OSError("seccomp_load")

# -----------------------------------------------------------------------------
# The cold path

def run_cold(code_path, uid, view, seccomp):
    # pid 1 of new pid, network, mount and IPC namespaces (unshare's), as root. The code is read before the
    # new root hides it (the host's copy may live under /tmp). The mounts are private to the namespace
    # (unshare's default propagation): the host never sees them. After the exec the interpreter of the code is
    # pid 1: when it exits, or is killed, the kernel kills every process left inside. (Being pid 1, it ignores
    # signals it sends itself without a handler, and SIGXFSZ: writing past RLIMIT_FSIZE raises "OSError: File
    # too large" instead of killing it.) Its parent-death signal kills it when unshare dies, and unshare has
    # its own from the host thread that started it.
    with open(code_path, "rb") as f:
        code = f.read()
    enter_root(view)
    fresh_scratch(view)
    os.chdir("/tmp")
    with open("main.py", "wb") as f:
        f.write(code)
    drop_to(uid)
    install(seccomp)
    os.execv(sys.executable, [sys.executable, "main.py"])  # every descriptor we opened closes on exec

# -----------------------------------------------------------------------------
# The warm path: the zygote

def prepare():
    # The next call's process, forked ahead of its request: it enters a mount and IPC namespace of its own
    # with fresh scratch space and the call's cgroup (as root), then waits on `channel` for the request and
    # its descriptors.
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
        fresh_scratch(view)  # opens what it binds here: a bind's source must be of the caller's namespace
        for fd in cgroup_fds:
            os.write(fd, b"0")  # "0": the writing process (its children follow it)
        # the filter now, before the request, off the call's path (0.3 ms): what is left to do as root
        # (setresuid, setrlimit, ...) is allowed, and no model code has run yet
        install(seccomp)
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
    uid, view = int(sys.argv[3]), json.loads(sys.argv[4])
    seccomp = seccomp_filter()  # loaded while the host's /usr is still the library's path
    if sys.argv[1] == "cold":
        run_cold(sys.argv[2], uid, view, seccomp)
    sock = socket.socket(fileno=int(sys.argv[2]))
    cgroup_fds = json.loads(sys.argv[5])
    enter_root(view)
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
