"""The sandbox server process ("zygote"): pre-imports the math stack, forks a child
per job, and keeps stateful sessions. Run by :class:`mathmill.sandbox.local.LocalSandbox`
as ``python -m mathmill.sandbox.zygote`` with a clean environment; it speaks
length-prefixed JSON on stdin/stdout and logs to stderr.

Process tree of a stateless job::

    zygote ─ G, cloned into new user/pid/mount/net/ipc/uts namespaces as their PID 1:
             own session, pids cgroup, private /proc, tmpfs job dir, rlimits, Landlock,
             no capabilities; runs the code

When G exits or is killed, the kernel kills every process left in its pid namespace
(double-forked escapees included). A session is the same tree with a long-lived
holder process H under a reaper init; each turn runs in a fork T of H that takes
over as the holder on success and is discarded on timeout, crash, memory error or
output overflow, so the pre-turn state survives without replaying history.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import resource
import select
import shutil
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mathmill.sandbox import isolation as iso
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.runtime import describe_state, new_namespace, run_code
from mathmill.sandbox.wire import recv_msg, send_msg

log = logging.getLogger("mathmill.sandbox")

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
PREIMPORTS = ("numpy", "sympy", "scipy", "pandas")


def _preimport() -> list[str]:
    loaded = []
    for name in PREIMPORTS:
        try:
            __import__(name)
            loaded.append(name)
        except ImportError:
            log.warning("sandbox: %s is not installed; jobs import it themselves", name)
    return loaded


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


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


# -- supervision ---------------------------------------------------------------------


@dataclass
class Supervised:
    """What a supervisor collected from a running job."""

    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    result: bytes = b""
    timed_out: bool = False
    overflow: bool = False


def supervise(out_r: int, err_r: int, res_r: int, deadline: float, cap: int) -> Supervised:
    """Read the job's stdout/stderr (capped) and result pipe until all close, the
    deadline passes (``timed_out``) or an output passes its cap (``overflow``).

    The result is one JSON line: once it is complete, output is drained for a
    moment more, so a background process holding the pipes cannot stall the turn.
    """
    got = Supervised()
    buffers = {out_r: bytearray(), err_r: bytearray(), res_r: bytearray()}
    open_fds = set(buffers)
    drain_until: float | None = None
    while open_fds:
        now = time.monotonic()
        if drain_until is None and buffers[res_r].endswith(b"\n"):
            drain_until = now + 0.2
        if drain_until is not None and now >= drain_until:
            break
        remaining = (drain_until or deadline) - now
        if remaining <= 0:
            got.timed_out = True
            break
        ready, _, _ = select.select(list(open_fds), [], [], remaining)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
                continue
            buffers[fd] += chunk
            if fd != res_r and len(buffers[fd]) > cap:
                got.overflow = True
        if got.overflow:
            break
    for fd in buffers:
        os.close(fd)
    got.stdout, got.stdout_truncated = bytes(buffers[out_r][:cap]), len(buffers[out_r]) > cap
    got.stderr, got.stderr_truncated = bytes(buffers[err_r][:cap]), len(buffers[err_r]) > cap
    got.result = bytes(buffers[res_r])
    return got


def _status_from(got: Supervised, reported: dict[str, Any] | None, exit_status: int | None) -> str:
    if got.timed_out:
        return "timeout"
    if got.overflow:
        return "output_limit"
    if reported is not None:
        return str(reported.get("status", "crashed"))
    if (
        exit_status is not None
        and exit_status < 0
        and -exit_status in (signal.SIGXCPU, signal.SIGKILL)
    ):
        return "timeout" if -exit_status == signal.SIGXCPU else "crashed"
    return "crashed"


def _cpu_aware_exit(status: int, usage: Any, limits: Limits) -> int:
    code = os.waitstatus_to_exitcode(status)
    if code == -signal.SIGKILL and usage.ru_utime + usage.ru_stime >= limits.cpu_limit - 0.5:
        return -signal.SIGXCPU  # killed at the hard CPU limit: a timeout, not a crash
    return code


def _result(
    got: Supervised, exit_status: int | None, wall_ms: float, usage: Any = None
) -> dict[str, Any]:
    """The ExecutionResult fields from what the supervisor saw and the job reported."""
    reported: dict[str, Any] | None = None
    with contextlib.suppress(ValueError):
        reported = json.loads(got.result) if got.result else None
    own = reported or {}
    return {
        "status": _status_from(got, reported, exit_status),
        "stdout": _decode(got.stdout),
        "stderr": _decode(got.stderr),
        "stdout_truncated": got.stdout_truncated,
        "stderr_truncated": got.stderr_truncated,
        "exit_code": own.get("exit_code", exit_status),
        "wall_ms": wall_ms,
        "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000 if usage else own.get("cpu_ms", 0.0),
        "peak_memory_kb": usage.ru_maxrss if usage else own.get("peak_memory_kb"),
        "backend": "local",
        "reported": reported,
    }


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _kill_namespace_except(keep: set[int]) -> None:
    """SIGKILL every process visible in /proc (our pid namespace) except ``keep``."""
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in keep:
            with contextlib.suppress(OSError):
                os.kill(int(name), signal.SIGKILL)


# -- the sandboxed side ----------------------------------------------------------------


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
            _kill_namespace_except(keep)

    def harden(self, *, cpu: bool) -> None:
        """Environment, working directory, rlimits, Landlock, no capabilities."""
        os.environ.clear()
        os.environ.update(SANDBOX_ENV, HOME=self.job_root, TMPDIR=self.job_root)
        os.chdir(self.job_root)
        limits = self.limits
        iso.set_rlimits(
            cpu_s=limits.cpu_limit if cpu else 24 * 3600,
            address_space=self.baseline_as + limits.memory_mb * (1 << 20),
            nproc=limits.max_processes,
            fsize=limits.max_file_mb * (1 << 20),
            nofile=limits.max_open_files,
        )
        if self.landlock:
            iso.landlock(_read_only_paths(), [self.job_root], ["/dev/null"])
        if self.namespaces:
            iso.drop_capabilities()


def _redirect(out_w: int, err_w: int) -> None:
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(null)


def _detach_output() -> None:
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


def _spawn_namespaced(box: Box, keep_fds: set[int], body: Any) -> int:
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


# -- sessions: the holder loop (inside the sandbox) -------------------------------------


def _holder_loop(sock: int, box: Box, namespace: dict[str, Any], state: dict[str, Any]) -> None:
    """Serve turns for one session until the zygote closes the socket."""
    baseline = set(namespace)
    while True:
        msg = recv_msg(sock)
        if msg is None:
            os._exit(0)
        if msg["op"] == "state":
            send_msg(sock, {"state": state})
            continue
        if msg["op"] != "exec":
            send_msg(sock, {"error": f"unknown op {msg['op']!r}"})
            continue
        timeout = float(msg["timeout_s"])
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        res_r, res_w = os.pipe()
        keep_r, keep_w = os.pipe()
        start = time.monotonic()
        child = os.fork()
        if child == 0:  # T: run the turn; on success, become the holder
            for fd in (out_r, err_r, res_r, keep_r):
                os.close(fd)
            os.setpgid(0, 0)
            _redirect(out_w, err_w)
            os.close(out_w)
            os.close(err_w)
            iso.set_rlimits(
                cpu_s=box.limits.cpu_limit if timeout >= box.limits.timeout_s else int(timeout) + 1,
                address_space=box.baseline_as + box.limits.memory_mb * (1 << 20),
                nproc=box.limits.max_processes,
                fsize=box.limits.max_file_mb * (1 << 20),
                nofile=box.limits.max_open_files,
            )
            report = run_code(msg["code"], namespace)
            own = resource.getrusage(resource.RUSAGE_SELF)
            report["cpu_ms"] = (own.ru_utime + own.ru_stime) * 1000
            report["peak_memory_kb"] = own.ru_maxrss
            try:
                report["state"] = describe_state(namespace, baseline)
            except BaseException as e:  # a hostile __repr__ must not break the session
                report["state"] = dict(state, summary=f"(state unavailable: {type(e).__name__})")
            keep = report["status"] in ("ok", "error")
            _detach_output()
            if keep:
                os.write(keep_w, b"K")
            os.close(keep_w)
            os.write(res_w, json.dumps(report).encode() + b"\n")
            os.close(res_w)
            if not keep:
                os._exit(1)
            state = report["state"]
            continue  # T is the holder now; H sends the reply and exits
        for fd in (out_w, err_w, res_w, keep_w):
            os.close(fd)
        got = supervise(out_r, err_r, res_r, start + timeout, box.limits.max_output_bytes)
        kept = False
        if got.timed_out or got.overflow:
            with contextlib.suppress(OSError):
                os.killpg(child, signal.SIGKILL)
            box.kill_others({1, os.getpid()})
        else:
            fcntl.fcntl(keep_r, fcntl.F_SETFL, os.O_NONBLOCK)
            with contextlib.suppress(BlockingIOError):
                kept = os.read(keep_r, 1) == b"K"
        os.close(keep_r)
        exit_status, usage = None, None
        if not kept:
            _, status, usage = os.wait4(child, 0)
            exit_status = _cpu_aware_exit(status, usage, box.limits)
            box.kill_others({1, os.getpid()})
        reply = _result(got, exit_status, (time.monotonic() - start) * 1000, usage)
        reported = reply.pop("reported")
        reply["state"] = reported["state"] if kept and reported else state
        reply["kept"] = kept
        send_msg(sock, reply)
        if kept:
            os._exit(0)  # the turn's process serves the session from now on


# -- the zygote ---------------------------------------------------------------------------


@dataclass
class Session:
    sid: str
    pid: int
    sock: socket.socket
    job_root: str
    created: float
    last_used: float
    turns: int = 0
    cgroup: str | None = None


@dataclass
class Zygote:
    """The server loop. ``layers`` says which isolation layers are active."""

    workdir: str
    limits: Limits
    max_sessions: int = 8
    session_ttl_s: float = 900.0
    max_turns: int = 200
    allow_unsafe: bool = False
    use_namespaces: bool = True
    layers: dict[str, Any] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    cgroups: iso.PidsCgroup | None = None

    def box(self, job_root: str, limits: Limits) -> Box:
        name = os.path.basename(job_root)
        cgroup = self.cgroups.job(name, limits.max_processes + 2) if self.cgroups else None
        return Box(
            job_root,
            limits,
            bool(self.layers.get("namespaces")),
            bool(self.layers.get("landlock_abi")),
            _vm_size(),
            cgroup=cgroup,
        )

    # -- probing
    def probe(self) -> dict[str, Any]:
        """Fork a child that tries each layer; record what works."""
        self.cgroups = iso.PidsCgroup.create_parent(f"mathmill-sandbox-{os.getpid()}")
        layers: dict[str, Any] = {
            "uid": os.geteuid(),
            "rlimits": True,
            # RLIMIT_NPROC does nothing for uid 0; a pids cgroup does.
            "nproc_rlimit": os.geteuid() != 0,
            "pids_cgroup": self.cgroups is not None,
            "landlock_abi": iso.landlock_abi(),
            "preimported": _preimport(),
        }
        if not self.use_namespaces:
            layers.update(namespaces=False, proc=False, tmpfs=False, disabled="namespaces")
            return self._finish_probe(layers)
        probe_dir = os.path.join(self.workdir, "probe")
        os.makedirs(probe_dir, exist_ok=True)
        r, w = os.pipe()

        def body() -> None:
            found = {"namespaces": True, **iso.mount_private_proc_and_tmpfs(probe_dir, 1)}
            os.write(w, json.dumps(found).encode())
            os._exit(0)

        box = Box(probe_dir, self.limits, namespaces=True, landlock=False, baseline_as=0)
        try:
            pid = _spawn_namespaced(box, {w}, body)
        except OSError as e:
            pid, layers["error"] = 0, str(e)
        os.close(w)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        os.close(r)
        if pid:
            os.waitpid(pid, 0)
        found = {"namespaces": False, "proc": False, "tmpfs": False}
        with contextlib.suppress(ValueError):
            found.update(json.loads(data or b"{}"))
        layers.update(found)
        return self._finish_probe(layers)

    def _finish_probe(self, layers: dict[str, Any]) -> dict[str, Any]:
        layers["process_limit"] = layers["nproc_rlimit"] or layers["pids_cgroup"]
        layers["isolated"] = (
            bool(layers.get("namespaces"))
            and layers["process_limit"]
            and (layers["landlock_abi"] > 0 or bool(layers.get("tmpfs")))
        )
        layers["unsafe"] = not layers["isolated"]
        self.layers = layers
        return layers

    # -- stateless jobs
    def execute(self, code: str, limits: Limits) -> dict[str, Any]:
        if self.layers.get("unsafe") and not self.allow_unsafe:
            return _refused(self.layers)
        job_root = os.path.join(self.workdir, "jobs", uuid.uuid4().hex)
        os.makedirs(job_root, mode=0o700)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        res_r, res_w = os.pipe()
        box = self.box(job_root, limits)
        start = time.monotonic()

        def body() -> None:
            box.enter_init()
            _redirect(out_w, err_w)
            box.harden(cpu=True)
            report = run_code(code, new_namespace())
            _detach_output()
            os.write(res_w, json.dumps(report).encode() + b"\n")
            os._exit(0)

        pid = _spawn_namespaced(box, {out_w, err_w, res_w}, body)
        for fd in (out_w, err_w, res_w):
            os.close(fd)
        got = supervise(out_r, err_r, res_r, start + limits.timeout_s, limits.max_output_bytes)
        if got.timed_out or got.overflow:
            _kill_group(pid)
        _, status, usage = os.wait4(pid, 0)
        wall_ms = (time.monotonic() - start) * 1000
        shutil.rmtree(job_root, ignore_errors=True)
        if box.cgroup:
            iso.PidsCgroup.remove(box.cgroup)
        result = _result(got, _cpu_aware_exit(status, usage, limits), wall_ms, usage)
        result.pop("reported")
        return result

    # -- sessions
    def create_session(self, sid: str | None = None) -> dict[str, Any]:
        if self.layers.get("unsafe") and not self.allow_unsafe:
            return _refused(self.layers)
        while len(self.sessions) >= self.max_sessions:
            oldest = min(self.sessions.values(), key=lambda s: s.last_used)
            log.info("sandbox: evicting least recently used session %s", oldest.sid)
            self.delete_session(oldest.sid)
        sid = sid or uuid.uuid4().hex[:16]
        job_root = os.path.join(self.workdir, "sessions", sid)
        os.makedirs(job_root, mode=0o700, exist_ok=True)
        ours, theirs = socket.socketpair()
        box = self.box(job_root, self.limits)
        theirs_fd = theirs.fileno()

        def body() -> None:
            box.enter_init()
            holder = os.fork()
            if holder == 0:
                null = os.open("/dev/null", os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                box.harden(cpu=False)
                namespace = new_namespace()
                _holder_loop(theirs_fd, box, namespace, describe_state(namespace))
                os._exit(0)
            os.close(theirs_fd)
            while True:  # PID 1: reap until the holder chain is gone
                try:
                    os.wait()
                except ChildProcessError:
                    os._exit(0)

        pid = _spawn_namespaced(box, {theirs_fd}, body)
        theirs.close()
        now = time.monotonic()
        self.sessions[sid] = Session(sid, pid, ours, job_root, now, now, cgroup=box.cgroup)
        return {"session_id": sid}

    def session_exec(self, sid: str, code: str, timeout_s: float) -> dict[str, Any]:
        session = self.sessions.get(sid)
        if session is None:
            return {"error": f"no session {sid!r}", "code": 404}
        if session.turns >= self.max_turns:
            return {"error": f"session {sid!r} reached its {self.max_turns} turns", "code": 409}
        session.turns += 1
        session.last_used = time.monotonic()
        reply = self._ask(
            session, {"op": "exec", "code": code, "timeout_s": timeout_s}, timeout_s + 15
        )
        if reply is None:
            self.delete_session(sid)
            return {
                "status": "crashed",
                "stdout": "",
                "stderr": "session died; it was removed",
                "exit_code": None,
                "wall_ms": 0.0,
                "state": None,
                "session_lost": True,
            }
        reply["backend"] = "local"
        return reply

    def session_state(self, sid: str) -> dict[str, Any]:
        session = self.sessions.get(sid)
        if session is None:
            return {"error": f"no session {sid!r}", "code": 404}
        session.last_used = time.monotonic()
        reply = self._ask(session, {"op": "state"}, 15)
        if reply is None:
            self.delete_session(sid)
            return {"error": f"session {sid!r} died", "code": 410}
        return reply

    def _ask(self, session: Session, msg: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        fd = session.sock.fileno()
        try:
            send_msg(fd, msg)
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                log.warning("sandbox: session %s did not answer in %.0fs", session.sid, timeout)
                return None
            reply: dict[str, Any] | None = recv_msg(fd)
            return reply
        except OSError:
            return None

    def delete_session(self, sid: str) -> dict[str, Any]:
        session = self.sessions.pop(sid, None)
        if session is None:
            return {"error": f"no session {sid!r}", "code": 404}
        session.sock.close()
        _kill_group(session.pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(session.pid, 0)
        shutil.rmtree(session.job_root, ignore_errors=True)
        if session.cgroup:
            iso.PidsCgroup.remove(session.cgroup)
        return {"deleted": sid}

    def reset_session(self, sid: str) -> dict[str, Any]:
        if sid not in self.sessions:
            return {"error": f"no session {sid!r}", "code": 404}
        self.delete_session(sid)
        return self.create_session(sid)

    def expire(self) -> None:
        now = time.monotonic()
        for sid, session in list(self.sessions.items()):
            if now - session.last_used > self.session_ttl_s:
                log.info(
                    "sandbox: session %s idle for %.0fs, deleted", sid, now - session.last_used
                )
                self.delete_session(sid)

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "layers": self.layers,
            "sessions": len(self.sessions),
            "max_sessions": self.max_sessions,
        }

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "exec":
            limits = self.limits.model_copy(update=msg.get("limits") or {})
            return self.execute(msg["code"], Limits.model_validate(limits.model_dump()))
        if op == "session.create":
            return self.create_session(msg.get("session_id"))
        if op == "session.exec":
            timeout = float(msg.get("timeout_s") or self.limits.timeout_s)
            return self.session_exec(msg["session_id"], msg["code"], timeout)
        if op == "session.state":
            return self.session_state(msg["session_id"])
        if op == "session.reset":
            return self.reset_session(msg["session_id"])
        if op == "session.delete":
            return self.delete_session(msg["session_id"])
        if op == "health":
            return self.health()
        return {"error": f"unknown op {op!r}", "code": 400}

    def serve(self, rfd: int, wfd: int) -> None:
        send_msg(wfd, {"hello": self.health()})
        while True:
            ready, _, _ = select.select([rfd], [], [], 1.0)
            self.expire()
            if not ready:
                continue
            msg = recv_msg(rfd)
            if msg is None:
                break
            try:
                reply = self.handle(msg)
            except Exception as e:  # report and keep serving
                log.exception("sandbox: request failed")
                reply = {"error": f"{type(e).__name__}: {e}", "code": 500}
            send_msg(wfd, reply)
        for sid in list(self.sessions):
            self.delete_session(sid)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group of ``pid`` and ``pid`` itself (its namespace dies with it)."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _refused(layers: dict[str, Any]) -> dict[str, Any]:
    return {
        "error": "refusing untrusted code: no isolation beyond rlimits is available here "
        f"(layers: {layers}); pass allow_unsafe=True to run it anyway",
        "code": 503,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of the zygote process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="{}", help="JSON: limits, max_sessions, ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    config = json.loads(args.config)
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # nothing but protocol messages on the pipe
    os.makedirs(args.workdir, mode=0o700, exist_ok=True)
    zygote = Zygote(
        workdir=args.workdir,
        limits=Limits.model_validate(config.get("limits") or {}),
        max_sessions=int(config.get("max_sessions", 8)),
        session_ttl_s=float(config.get("session_ttl_s", 900)),
        max_turns=int(config.get("max_turns", 200)),
        allow_unsafe=bool(config.get("allow_unsafe", False)),
        use_namespaces=bool(config.get("use_namespaces", True)),
    )
    layers = zygote.probe()
    iso.set_dumpable(False)
    log.info("sandbox: zygote %d ready; isolation layers: %s", os.getpid(), json.dumps(layers))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        zygote.serve(rfd, wfd)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
        if zygote.cgroups is not None:
            zygote.cgroups.close()


if __name__ == "__main__":
    main()
