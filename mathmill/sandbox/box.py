"""How a sandboxed process is set up: its environment, mounts, limits, Landlock rules
and capabilities, and how it is started (cloned into new namespaces).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

from mathmill.sandbox import isolation as iso
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.supervise import kill_namespace_except

__all__ = [
    "SANDBOX_ENV",
    "Box",
    "detach_output",
    "job_environment",
    "prepare_landlock",
    "redirect",
    "set_environment",
    "spawn_namespaced",
]

SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "MALLOC_ARENA_MAX": "2",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def prepare_landlock() -> iso.Landlock | None:
    """The Landlock rules of every job, prepared once by the zygote (None when the
    kernel has no Landlock). A job adds its own /proc and job directory.
    """
    if iso.landlock_abi() == 0:
        return None
    read_only = [p for p in _read_only_paths() if p != "/proc"]
    return iso.Landlock(read_only, ["/dev/null"])


def _read_only_paths() -> list[str]:
    # /etc is not readable as a whole: a job of a root server owns root's files there.
    etc = [
        "/etc/ld.so.cache",
        "/etc/localtime",
        "/etc/passwd",
        "/etc/group",
        "/etc/hosts",
        "/etc/nsswitch.conf",
        "/etc/ssl/certs",
        "/etc/alternatives",
        "/etc/fonts",
        "/etc/mime.types",
        "/etc/matplotlibrc",
    ]
    paths = {
        "/usr",
        "/lib",
        "/lib64",
        "/lib32",
        "/bin",
        "/sbin",
        "/proc",
        "/dev/null",
        "/dev/zero",
        "/dev/urandom",
        "/dev/random",
        "/sys/devices/system/cpu",
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        *etc,
    }
    paths.update(import_paths())
    return sorted(p for p in paths if os.path.exists(p))


def import_paths() -> set[str]:
    """The directories of ``sys.path`` a job may read, to import what it is offered.

    Not the current directory (the zygote's own, where jobs and sessions live); and of
    a directory that holds the mathmill package itself (a source checkout on PYTHONPATH
    or an editable install: its tests, configs and maybe a ``.env`` beside it) only the
    package.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    skip = {os.path.realpath(os.path.dirname(package)), os.path.realpath(os.getcwd())}
    paths = {package}  # an editable install finds it by a hook, not by a path
    for entry in sys.path:
        if entry and os.path.isdir(entry) and os.path.realpath(entry) not in skip:
            paths.add(entry)
    return paths


@dataclass
class Box:
    """Where and how sandboxed code runs (decided once by the zygote)."""

    job_root: str
    limits: Limits
    namespaces: bool
    landlock: iso.Landlock | None
    baseline_as: int
    private_proc: bool = False
    cgroup: str | None = None
    # The same job_root serves every job of the zygote, each on its own tmpfs: the
    # tmpfs is then required (without it, jobs would share the directory).
    shared_root: bool = False

    def enter_init(self) -> None:
        """As PID 1 of the new namespaces (already dying with the parent): private mounts."""
        if self.namespaces:
            mounted = iso.mount_private_proc_and_tmpfs(self.job_root, self.limits.disk_mb)
            self.private_proc = mounted["proc"]
            if self.shared_root and not mounted["tmpfs"]:
                raise iso.IsolationError(0, f"no tmpfs on the shared {self.job_root}")

    def kill_others(self, keep: set[int]) -> None:
        """Kill the namespace's other processes; only with a private /proc (else the
        host's processes would be visible and we would hit them).
        """
        if self.private_proc:
            kill_namespace_except(keep)

    def apply_rlimits(self, cpu_s: int) -> None:
        """The limits' rlimits, with ``cpu_s`` CPU seconds (a session turn sets its own)."""
        limits = self.limits
        iso.set_rlimits(
            cpu_s=cpu_s,
            address_space=self.baseline_as + limits.memory_mb * (1 << 20),
            nproc=limits.max_processes,
            fsize=limits.max_file_mb * (1 << 20),
            nofile=limits.max_open_files,
        )

    @property
    def inherited_fds(self) -> set[int]:
        """Descriptors of the zygote the process needs until :meth:`harden`."""
        return self.landlock.fds if self.landlock else set()

    def harden(self, *, cpu: bool) -> None:
        """Environment, working directory, rlimits, Landlock, no capabilities."""
        set_environment(job_environment(self.job_root))
        os.chdir(self.job_root)
        self.apply_rlimits(self.limits.cpu_limit if cpu else 24 * 3600)
        if self.landlock:
            self.landlock.restrict(read_only=["/proc"], read_write=[self.job_root])
        if self.namespaces:
            iso.drop_capabilities()


def job_environment(job_root: str) -> dict[str, str]:
    """The whole environment of a job (nothing of the caller's)."""
    return dict(SANDBOX_ENV, HOME=job_root, TMPDIR=job_root)


def set_environment(env: dict[str, str]) -> None:
    """Make ``os.environ`` exactly ``env`` (changing only what differs)."""
    for key in [key for key in os.environ if key not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def redirect(out_w: int, err_w: int) -> None:
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(null)


def detach_output() -> None:
    """Close this process's copies of the turn's output pipes (fds 1 and 2)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def _close_fds_except(keep: set[int]) -> None:
    """Close every descriptor above 2 but ``keep`` (close_range: no /proc walk)."""
    low = 3
    for fd in sorted(k for k in keep if k >= low):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))  # the soft limit: no descriptor above it


def spawn_namespaced(box: Box, keep_fds: set[int], body: Any) -> int:
    """Start a process running ``body()``: with namespaces, cloned straight into new
    user/pid/mount/net/ipc/uts namespaces as their PID 1 (when it exits, the kernel
    kills everything left in them). Before anything else it joins its pids cgroup
    (through a descriptor the zygote opened), or exits. Returns its pid.
    """
    uid, gid = os.geteuid(), os.getegid()
    cgroup = iso.PidsCgroup.open_procs(box.cgroup) if box.cgroup else None
    try:
        pid = iso.clone_process(iso.CLONE_ALL) if box.namespaces else os.fork()
        if pid == 0:
            try:
                iso.die_with_parent()
                if cgroup is not None:
                    iso.PidsCgroup.join(cgroup)
                os.setsid()
                _close_fds_except(keep_fds | box.inherited_fds)
                if box.namespaces:
                    iso.write_id_maps(uid, gid)
                body()
            finally:
                os._exit(120)
    finally:
        if cgroup is not None:
            os.close(cgroup)
    return pid
