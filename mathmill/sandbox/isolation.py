"""Linux isolation primitives for the sandbox, by raw syscalls (ctypes).

Used only inside forked sandbox processes, never in the orchestrator. Each layer is
optional: :func:`probe` reports which ones this kernel allows, and the sandbox
refuses untrusted code when nothing beyond rlimits is available (unless the caller
opts in to unsafe execution).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import stat
import struct
import time
from collections.abc import Iterable

from mathmill.errors import IsolationError as IsolationError

__all__ = [
    "CLONE_ALL",
    "Landlock",
    "clone_process",
    "drop_capabilities",
    "landlock_abi",
    "mount_private_proc_and_tmpfs",
    "set_rlimits",
    "write_id_maps",
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_ALL = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC, MS_PRIVATE = 16384, 1 << 18

PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_PDEATHSIG = 1

_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

# Filesystem access rights by the ABI that introduced them.
_FS_RIGHTS_ABI1 = (1 << 13) - 1  # execute .. make_sym
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_FS_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read_file, read_dir
_FS_FILE_RW = (1 << 1) | (1 << 2)  # write_file, read_file
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect (ABI 4)
_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets, signals (ABI 6)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise IsolationError(err, f"{what}: {os.strerror(err)}")
    return result


def mount_private_proc_and_tmpfs(job_root: str, size_mb: int) -> dict[str, bool]:
    """In a new mount + pid namespace (as its PID 1): make mounts private, mount a
    fresh /proc (only this namespace's processes) and a size-capped tmpfs on job_root.
    """
    done = {"proc": False, "tmpfs": False}
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount private /")
    if _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0:
        done["proc"] = True
    options = f"size={size_mb}m,mode=0700".encode()
    if _libc.mount(b"tmpfs", job_root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) == 0:
        done["tmpfs"] = True
    return done


def landlock_abi() -> int:
    """The Landlock ABI version (0 when unavailable)."""
    result = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return max(0, int(result))


def _handled_rights(abi: int) -> tuple[int, bytes]:
    """The filesystem rights this ABI handles, and the ruleset attribute to create."""
    fs = _FS_RIGHTS_ABI1
    if abi >= 2:
        fs |= _FS_REFER
    if abi >= 3:
        fs |= _FS_TRUNCATE
    if abi >= 5:
        fs |= _FS_IOCTL_DEV
    net = _NET_TCP if abi >= 4 else 0
    scoped = _SCOPE_ALL if abi >= 6 else 0
    if abi >= 6:
        return fs, struct.pack("QQQ", fs, net, scoped)
    if abi >= 4:
        return fs, struct.pack("QQ", fs, net)
    return fs, struct.pack("Q", fs)


_Rule = tuple[int, "ctypes.Array[ctypes.c_char]", str]  # O_PATH fd, packed rule, path
_RULE_PATH = _LANDLOCK_RULE_PATH_BENEATH


class Landlock:
    """Landlock rules prepared once, in the zygote: the read-only paths and files are
    opened (``O_PATH``) and their rules packed here, so that a job only makes the
    syscalls. What a job mounts afresh (its /proc, its job directory) it adds itself.

    :meth:`restrict` restricts the calling process and its children: read-only paths,
    read-write paths, and no TCP bind/connect or signals/abstract sockets outside the
    domain (where the ABI has them).
    """

    def __init__(self, read_only: Iterable[str], rw_files: Iterable[str]) -> None:
        self.abi = landlock_abi()
        self._fs, self._attr = _handled_rights(self.abi)
        self._rules: list[_Rule] = []
        if self.abi:
            for paths, rights in ((read_only, _FS_READ), (rw_files, _FS_FILE_RW)):
                for path in paths:
                    if rule := self._rule(path, rights):
                        self._rules.append(rule)

    def _rule(self, path: str, rights: int) -> _Rule | None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return None
        allowed = rights & self._fs
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            allowed &= _FS_FILE_RW | (1 << 0) | _FS_TRUNCATE | _FS_IOCTL_DEV
        return fd, ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd), 12), path

    @property
    def fds(self) -> set[int]:
        """The prepared descriptors (a job keeps them until :meth:`restrict`)."""
        return {fd for fd, _, _ in self._rules}

    def restrict(self, read_only: Iterable[str] = (), read_write: Iterable[str] = ()) -> int:
        """Restrict this process to the prepared rules plus ``read_only`` and
        ``read_write`` (opened now), then close the prepared descriptors. Returns the
        ABI used (0 when Landlock is unavailable: nothing done).
        """
        if self.abi == 0:
            self.close()
            return 0
        buf = ctypes.create_string_buffer(self._attr, len(self._attr))
        ruleset = _check(
            _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(self._attr)), 0),
            "landlock_create_ruleset",
        )
        fresh = [self._rule(path, _FS_READ) for path in read_only]
        fresh += [self._rule(path, self._fs) for path in read_write]
        rules = self._rules + [rule for rule in fresh if rule]
        try:
            for _, rule, path in rules:
                if _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _RULE_PATH, rule, 0) < 0:
                    _check(-1, f"landlock_add_rule {path}")
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
            _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
        finally:
            os.close(ruleset)
            for fd, _, _ in rules:
                os.close(fd)
            self._rules = []
        return self.abi

    def close(self) -> None:
        """Close the prepared descriptors."""
        for fd, _, _ in self._rules:
            os.close(fd)
        self._rules = []


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


_LAST_CAP = _last_capability()  # read once, in the zygote


def drop_capabilities() -> None:
    """Drop every capability (bounding set first), set no_new_privs, and not dumpable."""
    for cap in range(_LAST_CAP + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
            break  # EINVAL: past the last capability
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def set_dumpable(flag: bool) -> None:
    """Not dumpable: /proc/<pid>/{mem,environ,fd} become unreadable to same-uid peers."""
    _libc.prctl(PR_SET_DUMPABLE, int(flag), 0, 0, 0)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def set_rlimits(
    *,
    cpu_s: int,
    address_space: int,
    nproc: int,
    fsize: int,
    nofile: int,
) -> None:
    """Hard and soft limits: CPU seconds, address space, processes, file size,
    open files, no core dumps. SIGXFSZ is ignored so an oversized write fails with
    EFBIG instead of killing the process.
    """
    limits = {
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
        resource.RLIMIT_AS: (address_space, address_space),
        resource.RLIMIT_NPROC: (nproc, nproc),
        resource.RLIMIT_FSIZE: (fsize, fsize),
        resource.RLIMIT_NOFILE: (nofile, nofile),
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _pids_cgroup_root() -> str | None:
    """Where this process's cgroup lives in a hierarchy with the pids controller."""
    mounts: list[tuple[str, str, str]] = []  # (mount point, fstype, super options)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields and rfields[0] in ("cgroup", "cgroup2"):
                mounts.append((fields[4], rfields[0], rfields[-1]))
    with open("/proc/self/cgroup") as f:
        memberships = [line.strip().split(":", 2) for line in f if line.strip()]
    for point, fstype, options in mounts:
        if fstype == "cgroup" and "pids" in options.split(","):
            for _, controllers, path in memberships:
                if "pids" in controllers.split(","):
                    return os.path.join(point, path.lstrip("/"))
        if fstype == "cgroup2":
            for hid, _, path in memberships:
                candidate = os.path.join(point, path.lstrip("/"))
                try:
                    with open(os.path.join(candidate, "cgroup.controllers")) as c:
                        if hid == "0" and "pids" in c.read().split():
                            return candidate
                except OSError:
                    continue
    return None


class PidsCgroup:
    """A pids cgroup per job: the process limit that works for root too (RLIMIT_NPROC
    does not apply to uid 0). Needs write access to the cgroup hierarchy.
    """

    def __init__(self, parent: str) -> None:
        self.parent = parent

    @classmethod
    def create_parent(cls, name: str) -> PidsCgroup | None:
        """A parent cgroup for this server's jobs, or None when not possible."""
        root = _pids_cgroup_root()
        if root is None:
            return None
        parent = os.path.join(root, name)
        try:
            os.makedirs(parent, exist_ok=True)
            probe = os.path.join(parent, "probe")
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError:
            return None
        return cls(parent)

    def job(self, name: str, max_pids: int) -> str:
        """Create the job's cgroup with ``pids.max``; returns its path."""
        path = os.path.join(self.parent, name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        self.set_max(path, max_pids)
        return path

    @staticmethod
    def set_max(path: str, max_pids: int) -> None:
        """Set the cgroup's ``pids.max``."""
        fd = os.open(os.path.join(path, "pids.max"), os.O_WRONLY)
        try:
            os.write(fd, str(max_pids).encode())
        finally:
            os.close(fd)

    @staticmethod
    def open_procs(path: str) -> int:
        """A descriptor on the cgroup's ``cgroup.procs``, for :meth:`join` in a child
        (the kernel checks the opener's credentials: the zygote's).
        """
        return os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)

    @staticmethod
    def join(procs_fd: int) -> None:
        """Move the calling process into the cgroup of ``procs_fd`` and close it (the
        move costs an RCU grace period: the child waits for it, not the zygote).
        """
        try:
            os.write(procs_fd, b"0")
        finally:
            os.close(procs_fd)

    @staticmethod
    def try_remove(path: str) -> bool:
        """Remove a job cgroup now if it is empty; False while processes are still exiting."""
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    @staticmethod
    def remove(path: str) -> None:
        """Remove a job cgroup, waiting up to a second for its processes to be gone."""
        for _ in range(50):
            if PidsCgroup.try_remove(path):
                return
            time.sleep(0.02)  # processes still exiting
        with contextlib.suppress(OSError):
            os.rmdir(path)

    def close(self) -> None:
        """Remove the parent cgroup (after all jobs)."""
        with contextlib.suppress(OSError):
            os.rmdir(self.parent)


_pylibc = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL across the call, like os.fork
_pylibc.syscall.restype = ctypes.c_long
_SYS_CLONE = 56
_SIGCHLD = 17


def clone_process(flags: int) -> int:
    """fork() straight into new namespaces (one process instead of unshare + fork).

    Returns 0 in the child (PID 1 of a new pid namespace) and the child's pid in the
    parent. The child must write its uid/gid maps (:func:`write_id_maps`). Only safe
    in a single-threaded process, as the zygote is.
    """
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = int(_pylibc.syscall(_SYS_CLONE, ctypes.c_ulong(flags | _SIGCHLD), None, None, None, None))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    errno = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise IsolationError(errno, f"clone: {os.strerror(errno)}")
    return pid


def write_id_maps(outer_uid: int, outer_gid: int) -> None:
    """In a fresh user namespace: map uid/gid 1000 inside to the outer ids."""
    set_dumpable(True)  # /proc/self/*_map are root's when not dumpable
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"1000 {outer_uid} 1"),
        ("gid_map", f"1000 {outer_gid} 1"),
    ):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
