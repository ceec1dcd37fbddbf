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

__all__ = ["SANDBOX_ENV", "Box", "detach_output", "redirect", "spawn_namespaced"]

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
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted(p for p in paths if os.path.exists(p))


@dataclass
class Box:
    """Where and how sandboxed code runs (decided once by the zygote)."""

    job_root: str
    limits: Limits
    namespaces: bool
    landlock: bool
    baseline_as: int
    private_proc: bool = False
    cgroup: str | None = None

    def enter_init(self) -> None:
        """As PID 1 of the new namespaces: die with the parent, private mounts."""
        iso.die_with_parent()
        if self.namespaces:
            mounted = iso.mount_private_proc_and_tmpfs(self.job_root, self.limits.disk_mb)
            self.private_proc = mounted["proc"]

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

    def harden(self, *, cpu: bool) -> None:
        """Environment, working directory, rlimits, Landlock, no capabilities."""
        os.environ.clear()
        os.environ.update(SANDBOX_ENV, HOME=self.job_root, TMPDIR=self.job_root)
        os.chdir(self.job_root)
        self.apply_rlimits(self.limits.cpu_limit if cpu else 24 * 3600)
        if self.landlock:
            iso.landlock(_read_only_paths(), [self.job_root], ["/dev/null"])
        if self.namespaces:
            iso.drop_capabilities()


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
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def spawn_namespaced(box: Box, keep_fds: set[int], body: Any) -> int:
    """Start a process running ``body()``: with namespaces, cloned straight into new
    user/pid/mount/net/ipc/uts namespaces as their PID 1 (when it exits, the kernel
    kills everything left in them). It first waits until the parent has put it in
    its pids cgroup. Returns its pid.
    """
    uid, gid = os.geteuid(), os.getegid()
    sync_r, sync_w = os.pipe()
    pid = iso.clone_process(iso.CLONE_ALL) if box.namespaces else os.fork()
    if pid == 0:
        try:
            os.close(sync_w)
            os.read(sync_r, 1)
            os.close(sync_r)
            iso.die_with_parent()
            os.setsid()
            _close_fds_except(keep_fds)
            if box.namespaces:
                iso.write_id_maps(uid, gid)
            body()
        finally:
            os._exit(120)
    os.close(sync_r)
    try:
        if box.cgroup:
            iso.PidsCgroup.enter(box.cgroup, pid)
    finally:
        os.write(sync_w, b"g")
        os.close(sync_w)
    return pid
