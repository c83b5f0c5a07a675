"""
common/sandbox_cgroup.py: the memory and process-count limits of one sandbox call (common/sandbox.py), kept by
a cgroup, so that they count every page and every process the call holds.

RLIMIT_AS and RLIMIT_NPROC are per process and per uid: they do not see the pages of memfds or of a tmpfs, and
three children of 300 MB each stay under a 400 MB RLIMIT_AS. A cgroup charges every page its processes fault
in, files in memory included, and the kernel's OOM killer then picks a process inside it, never the trainer.
So each leased sandbox uid gets a cgroup of its own, <hierarchy>/sod_sandbox/<uid>, with
  - memory.max = the call's memory_mb, memory.swap.max = 0 (cgroup v2), or memory.limit_in_bytes and
    memory.memsw.limit_in_bytes (v1, where the memory controller is still bound to a v1 hierarchy, as on
    hosts that mount both);
  - pids.max = the call's process count (threads count too).
The uid is leased to one sandbox at a time on the whole machine, so its cgroup is too: the cold path moves
the call's processes in before they exec, a warm worker moves each call's child in before it runs code (the
zygote itself stays out, so it is neither counted nor killed). Where the cgroup cannot be made (not root, no
v2 controllers delegated and no v1 hierarchy, a container that hides them) Cgroups.note says why, the
isolation line repeats it and the call keeps its rlimits alone.
"""
import contextlib
import os
from dataclasses import dataclass

PARENT = "sod_sandbox"  # the folder under each hierarchy's root that holds the sandboxes' cgroups


@dataclass(frozen=True)
class Cgroups:
    """Where the sandboxes' cgroups live: version "v2" (one folder) or "v1" (a memory folder and a pids
    folder), or "" and a note saying why there are none."""
    version: str = ""
    parents: tuple = ()
    note: str = ""


def _mounts():
    """(fstype, mount point, super options) of each cgroup hierarchy this process sees."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-") + 1:]  # fstype, source, super options
            if rest[0] in ("cgroup", "cgroup2"):
                found.append((rest[0], fields[4], rest[2].split(",")))
    return found


def probe() -> Cgroups:
    """Make <hierarchy>/sod_sandbox with the memory and pids controllers; Cgroups() with a note where it
    cannot."""
    if os.geteuid() != 0:
        return Cgroups(note="no cgroup (it needs root)")
    mounts = _mounts()
    try:
        for fstype, point, _ in mounts:
            controllers = set()
            if fstype == "cgroup2":
                with open(os.path.join(point, "cgroup.controllers")) as f:
                    controllers = set(f.read().split())
            if {"memory", "pids"} <= controllers:
                # each level down to ours must hand both controllers to its children
                parent = os.path.join(point, PARENT)
                os.makedirs(parent, exist_ok=True)
                for folder in (point, parent):
                    with open(os.path.join(folder, "cgroup.subtree_control"), "w") as f:
                        f.write("+memory +pids")
                return Cgroups("v2", (parent,))
        v1 = {name: point for fstype, point, options in mounts if fstype == "cgroup"
              for name in ("memory", "pids") if name in options}
        if len(v1) == 2:
            parents = tuple(os.path.join(v1[name], PARENT) for name in ("memory", "pids"))
            for parent in parents:
                os.makedirs(parent, exist_ok=True)
            return Cgroups("v1", parents)
    except OSError as e:
        return Cgroups(note=f"no cgroup ({e.strerror} at {e.filename}: is the cgroup delegated to us?)")
    return Cgroups(note="no cgroup (no hierarchy with the memory and pids controllers)")


def folders_of(cgroups: Cgroups, uid: int) -> tuple:
    """The cgroup folders of a leased uid, made if missing (one for v2, memory then pids for v1)."""
    folders = tuple(os.path.join(parent, str(uid)) for parent in cgroups.parents)
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    return folders


def _write(folder, name, value):
    with open(os.path.join(folder, name), "w") as f:
        f.write(str(value))


def set_limits(cgroups: Cgroups, folders: tuple, memory_mb: int, processes: int):
    """The next call's limits, before it runs any code."""
    memory = int(memory_mb * 2**20)
    if cgroups.version == "v2":
        (folder,) = folders
        _write(folder, "memory.max", memory)
        _write(folder, "pids.max", processes)
        if os.path.exists(os.path.join(folder, "memory.swap.max")):  # absent without swap accounting
            _write(folder, "memory.swap.max", 0)
    elif cgroups.version == "v1":
        memory_folder, pids_folder = folders
        # memory + swap may never be below memory alone: lift it, set memory, then bring it down to the same
        # value, which leaves no room for swap
        swap = os.path.exists(os.path.join(memory_folder, "memory.memsw.limit_in_bytes"))
        if swap:
            _write(memory_folder, "memory.memsw.limit_in_bytes", -1)
        _write(memory_folder, "memory.limit_in_bytes", memory)
        if swap:
            _write(memory_folder, "memory.memsw.limit_in_bytes", memory)
        _write(pids_folder, "pids.max", processes)


def open_procs(folders: tuple) -> list:
    """Descriptors of the folders' cgroup.procs: writing b"0" to one moves the writing process in, and its
    children after it (the cold path does so between fork and exec, a warm worker's child before it runs
    code). Close-on-exec, as os.open makes them."""
    fds = []
    with contextlib.ExitStack() as undo:
        for folder in folders:
            fds.append(os.open(os.path.join(folder, "cgroup.procs"), os.O_WRONLY))
            undo.callback(os.close, fds[-1])
        undo.pop_all()
    return fds
