"""
Tests for the escapes a security review found in the local sandbox (common/sandbox.py and
common/sandbox_worker.py), one property each, on both paths (warm and cold) at the default full isolation:
no host socket file is reachable, the kernel keyring, new user namespaces, mount, ptrace, bpf and perf events
are refused, memory held outside the process's own address space (memfds, tmpfs, several children) counts
against the call's limit, the open-files limit is the sandbox's own, and a lock folder laid by another user
cannot make the trainer change any file. The older hostile battery lives in tests/test_tools.py.

    OMP_NUM_THREADS=1 python -m pytest tests/test_sandbox.py -q
"""
import os
import platform
import pwd
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from common import sandbox

REPO = Path(__file__).resolve().parents[1]
LEVEL = sandbox.sandbox_isolation().level
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="uid leases need root")


pytestmark = pytest.mark.usefixtures("default_sandbox")  # tests/conftest.py


@pytest.fixture(params=["warm", "cold"])
def kind(request):
    """Every escape is tried on both paths to the full sandbox."""
    if LEVEL != "full":
        pytest.skip(f"isolation level is {LEVEL}, not full")
    sandbox.configure(kind=request.param)
    return request.param


def run(code, timeout=10.0, memory_mb=2048):
    return sandbox.run_python(code, timeout=timeout, memory_mb=memory_mb)


# System call numbers the tests make through ctypes (glibc wraps none of the keyring calls).
SYSCALLS = {"x86_64": {"add_key": 248, "keyctl": 250, "perf_event_open": 298, "bpf": 321},
            "aarch64": {"add_key": 217, "keyctl": 219, "perf_event_open": 241, "bpf": 280}}
NR = SYSCALLS.get(platform.machine())
needs_known_syscalls = pytest.mark.skipif(NR is None, reason=f"no syscall numbers for {platform.machine()}")

CTYPES_PRELUDE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, result):
    print(name, 'ok' if result >= 0 else errno.errorcode[ctypes.get_errno()], flush=True)
"""

# -----------------------------------------------------------------------------
# host socket files


def test_no_socket_file_of_the_host_is_reachable(kind):
    """A Unix socket listening on disk (under /run, /var/tmp or the host's /dev/shm, anyone may connect) is
    out of reach: the sandbox's filesystem holds no host socket folder."""
    name = "sod_" + secrets.token_hex(6)
    paths = [f"/run/{name}.sock", f"/var/tmp/{name}.sock", f"/dev/shm/{name}.sock"]
    listeners, accepted = [], []
    for path in paths:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen(8)
        listener.settimeout(0.2)
        listeners.append(listener)

    def accept_all():
        while listeners:
            for listener in list(listeners):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                accepted.append(listener.getsockname())
                conn.sendall(b"banner")
                conn.close()
    thread = threading.Thread(target=accept_all, daemon=True)
    thread.start()
    code = ("import socket\n"
            f"for path in {paths!r}:\n"
            "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "    try:\n        s.connect(path)\n        print(path, s.recv(16))\n"
            "    except OSError as e:\n        print(path, type(e).__name__)\n")
    try:
        result = run(code)
    finally:
        closing, listeners[:] = list(listeners), []
        thread.join()
        for listener, path in zip(closing, paths):
            listener.close()
            os.unlink(path)
    assert result.status == "finished" and result.returncode == 0, result
    assert "banner" not in result.stdout and accepted == [], result.stdout
    assert result.stdout.count("FileNotFoundError") == len(paths)


def test_the_filesystem_shows_only_what_the_interpreter_needs(kind):
    code = ("import os\nprint(sorted(os.listdir('/')))\nprint(sorted(os.listdir('/dev')))\n"
            "print(sorted(os.listdir('/etc')) if os.path.isdir('/etc') else [])\n"
            f"print(os.path.exists({str(REPO / 'README.md')!r}))")
    result = run(code)
    top, dev, etc, repo = result.stdout.splitlines()
    env_tops = {d.split("/")[1] for d in sandbox.sandbox_isolation().view.binds}
    assert set(eval(top)) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc",
                              "tmp", *env_tops}, top
    assert set(eval(dev)) <= {"null", "zero", "urandom", "random", "full", "shm", "fd", "stdin", "stdout",
                              "stderr"}, dev
    assert set(eval(etc)) <= {"ld.so.cache", "localtime"}, etc
    assert repo == "False" or REPO.is_relative_to("/usr")

# -----------------------------------------------------------------------------
# the kernel keyring, new user namespaces, and other calls that open the kernel up


KEYRING = CTYPES_PRELUDE + """
KEY_SPEC_USER_KEYRING, KEYCTL_SEARCH = -4, 10
if {plant}:
    call('add_key', libc.syscall({add_key}, b'user', b'{name}', b'secret', 6, KEY_SPEC_USER_KEYRING))
call('keyctl', libc.syscall({keyctl}, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, b'user', b'{name}', 0))
"""


@needs_known_syscalls
@pytest.mark.parametrize("path", ["warm", "cold"])
def test_the_keyring_is_refused_and_no_key_reaches_the_next_call(path, one_worker):
    """add_key and keyctl are refused, so no key planted by one call (warm: on the same worker) is read by the
    next, nor survives the trainer for the next run that leases the same uid."""
    sandbox.configure(kind=path)
    name = "sod" + secrets.token_hex(6)
    plant = run(KEYRING.format(plant=True, name=name, **NR)).stdout
    look = run(KEYRING.format(plant=False, name=name, **NR)).stdout
    assert plant.splitlines() == ["add_key EPERM", "keyctl EPERM"], plant
    assert look.splitlines() == ["keyctl EPERM"], look
    assert name not in Path("/proc/keys").read_text()


def test_new_user_namespaces_are_refused(kind):
    code = CTYPES_PRELUDE + """
CLONE_NEWUSER, CLONE_NEWNS, SIGCHLD = 0x10000000, 0x20000, 17
def in_a_child(name, attempt):              # each try from a fresh process, outside any new namespace
    pid = os.fork()
    if pid == 0:
        call(name, attempt())
        os._exit(0)
    os.waitpid(pid, 0)
in_a_child('unshare', lambda: libc.unshare(CLONE_NEWUSER))
in_a_child('unshare_mount', lambda: libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
if os.uname().machine == 'x86_64':          # the raw clone system call, as fork with the flag
    pid = libc.syscall(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
    call('clone', pid)
else:
    print('clone EPERM')
import subprocess
print(subprocess.run(['unshare', '-U', '-r', 'true'], capture_output=True).returncode != 0)
"""
    assert run(code).stdout == "unshare EPERM\nunshare_mount EPERM\nclone EPERM\nTrue\n"


@needs_known_syscalls
def test_mount_ptrace_bpf_and_perf_events_are_refused_by_a_seccomp_filter(kind):
    code = CTYPES_PRELUDE + """
print([line.split()[1] for line in open('/proc/self/status') if line.startswith('Seccomp:')][0])
call('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))
call('ptrace', libc.ptrace(0, 0, None, None))                  # PTRACE_TRACEME
attr = (ctypes.c_uint32 * 32)()                                # a software cpu-clock counter of this process
attr[0], attr[2], attr[10] = 1, 128, 0b1100000                 # software, size, exclude_kernel and _hv
call('perf_event_open', libc.syscall({perf_event_open}, attr, 0, -1, -1, 0))
call('bpf', libc.syscall({bpf}, 0, (ctypes.c_char * 64)(), 64))   # BPF_MAP_CREATE
""".format(**NR)
    result = run(code).stdout.splitlines()
    assert result == ["2", "mount EPERM", "ptrace EPERM", "perf_event_open EPERM", "bpf EPERM"], result

# -----------------------------------------------------------------------------
# memory the process does not map: memfds, tmpfs pages, several children


MEMFDS = """
import os
chunk = b'x' * 2**20
for k in range(40):
    fd = os.memfd_create('hold')
    for _ in range(16):
        os.write(fd, chunk)
    print((k + 1) * 16, flush=True)
print('held')
"""
TMPFS = CTYPES_PRELUDE + """
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x20000
uid, gid = os.getuid(), os.getgid()
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0:    # root of a user namespace of its own: it may mount
    open('/proc/self/setgroups', 'w').write('deny')
    open('/proc/self/uid_map', 'w').write(f'0 {uid} 1')
    open('/proc/self/gid_map', 'w').write(f'0 {gid} 1')
    call('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, b'size=1g'))
chunk = b'x' * 2**20
for k in range(384):
    with open(f'/tmp/fill{k // 8}', 'ab') as f:   # files of 8 MB: RLIMIT_FSIZE bounds each one
        f.write(chunk)
    print(k + 1, flush=True)
"""
CHILDREN = """
import os, sys, time
pids = []
for k in range(3):
    pid = os.fork()
    if pid == 0:
        block = b'x' * (300 * 2**20)        # written, so every page is really held
        print('filled', flush=True)
        time.sleep(3)
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
"""


def test_memfds_count_against_the_call_memory_limit(kind):
    """40 memfds of 16 MB held 640 MB under a 256 MB limit: the call is now killed (or its writes fail)
    before it holds much more than its limit."""
    result = run(MEMFDS, memory_mb=256)
    held = [int(line) for line in result.stdout.split() if line.isdigit()]
    assert "held" not in result.stdout and max(held, default=0) <= 256, result


def test_a_tmpfs_of_its_own_counts_against_the_call_memory_limit(kind):
    """A tmpfs mounted in a new user namespace held 384 MB under a 256 MB limit."""
    result = run(TMPFS, memory_mb=256)
    held = [int(line) for line in result.stdout.split() if line.isdigit()]
    assert max(held, default=0) <= 256, result


def test_several_children_share_one_memory_limit(kind):
    """Three children of 300 MB each held 887 MB under a 400 MB limit."""
    result = run(CHILDREN, memory_mb=400, timeout=20)
    assert result.stdout.count("filled") < 3, result


def test_the_open_files_limit_is_the_sandbox_own(kind):
    result = run("import resource\nprint(resource.getrlimit(resource.RLIMIT_NOFILE))")
    assert result.stdout == f"{(sandbox.MAX_OPEN_FILES, sandbox.MAX_OPEN_FILES)}\n"

# -----------------------------------------------------------------------------
# the uid lock folder


FIRST_CALL = """
import sys
sys.path.insert(0, {repo!r})
from common import sandbox
sandbox.configure(kind={kind!r})
print(sandbox.run_python('print(6 * 7)').stdout, end='')
"""


def laid_folder(folder, target):
    """A folder of user nobody holding a symlink to `target` in place of every uid's lock file."""
    nobody = pwd.getpwnam("nobody").pw_uid
    folder.mkdir(mode=0o777)
    for uid in sandbox.SANDBOX_UIDS:
        (folder / str(uid)).symlink_to(target)
        os.lchown(folder / str(uid), nobody, nobody)
    os.chown(folder, nobody, nobody)


@needs_root
@pytest.mark.parametrize("path", ["warm", "cold"])
def test_a_lock_folder_laid_in_temporary_space_changes_no_file(path, tmp_path):
    """Another user creates the old lock folder in /tmp first, with symlinks named like the lock files: the
    trainer's first call leaves the file they point to as it was."""
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "precious"
    target.write_text("do not truncate")
    temp = tmp_path / "tmp"
    temp.mkdir(mode=0o1777)
    os.chmod(temp, 0o1777)
    laid_folder(temp / "sod_sandbox_uids", target)
    out = subprocess.run([sys.executable, "-c", FIRST_CALL.format(repo=str(REPO), kind=path)], cwd=REPO,
                         env=dict(os.environ, TMPDIR=str(temp)), capture_output=True, text=True, timeout=120)
    assert target.read_text() == "do not truncate"
    assert out.stdout == "42\n", out.stderr[-2000:]


@needs_root
def test_a_lock_folder_not_owned_by_root_alone_is_refused(tmp_path, monkeypatch):
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "precious"
    target.write_text("do not truncate")
    laid_folder(tmp_path / "locks", target)
    monkeypatch.setattr(sandbox, "LOCK_DIR", str(tmp_path / "locks"))
    with pytest.raises(OSError, match="lock folder .* must be a folder of root's, mode 700"):
        sandbox._lease_uid()
    assert target.read_text() == "do not truncate"


@needs_root
def test_the_lock_folder_is_root_owned_private_and_outside_temporary_space():
    assert sandbox.run_python("print(1)").stdout == "1\n"
    info = os.lstat(sandbox.LOCK_DIR)
    assert info.st_uid == 0 and info.st_mode & 0o7777 == 0o700 and os.path.isdir(sandbox.LOCK_DIR)
    assert not sandbox.LOCK_DIR.startswith((tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"))
    for name in os.listdir(sandbox.LOCK_DIR):
        assert os.lstat(os.path.join(sandbox.LOCK_DIR, name)).st_mode & 0o170777 == 0o100600

# -----------------------------------------------------------------------------
# where a layer is missing


def test_the_isolation_line_names_each_missing_layer(caplog):
    isolation = sandbox.Isolation("full", sys.executable, sandbox.View(("/usr",)), ("numpy",), seccomp=False,
                                  cgroups=sandbox.sandbox_cgroup.Cgroups(note="no cgroup (a reason)"))
    with caplog.at_level("INFO", logger="sandbox"):
        sandbox._logged(isolation, [])
    line = caplog.records[-1]
    assert line.levelname == "WARNING"
    assert "no seccomp filter (libseccomp.so.2 could not be loaded)" in line.getMessage()
    assert "no cgroup (a reason): memory limited per process (RLIMIT_AS) only" in line.getMessage()
    with caplog.at_level("INFO", logger="sandbox"):
        sandbox._logged(sandbox.Isolation("basic", sys.executable, sandbox.View(), ()), [])
    assert "no namespaces; no uid of its own" in caplog.records[-1].getMessage()


def test_cgroup_v2_limits_are_written_where_the_kernel_reads_them(tmp_path):
    """This host may mount the memory controller on cgroup v1; the v2 file names are checked here."""
    (tmp_path / "memory.swap.max").write_text("max")
    cgroups = sandbox.sandbox_cgroup.Cgroups("v2", (str(tmp_path.parent),))
    sandbox.sandbox_cgroup.set_limits(cgroups, (str(tmp_path),), 256, 64)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "memory.max": str(256 * 2**20), "memory.swap.max": "0", "pids.max": "64"}


@needs_root
def test_the_calls_cgroup_holds_its_processes_and_limits():
    """The cgroup the isolation line names is the one a call runs in, with the call's limits."""
    cgroups = sandbox.sandbox_isolation().cgroups
    if not cgroups.version:
        pytest.skip(cgroups.note)
    for kind in ("warm", "cold"):
        sandbox.configure(kind=kind)
        result = sandbox.run_python("import os\nprint(open('/proc/self/cgroup').read())", memory_mb=300)
        assert f"/{sandbox.sandbox_cgroup.PARENT}/" in result.stdout, result
        uid = int(result.stdout.split(f"/{sandbox.sandbox_cgroup.PARENT}/")[1].split()[0])
        folders = sandbox.sandbox_cgroup.folders_of(cgroups, uid)
        limit = "memory.max" if cgroups.version == "v2" else "memory.limit_in_bytes"
        assert Path(folders[0], limit).read_text().strip() == str(300 * 2**20)
