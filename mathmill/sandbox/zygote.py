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
import json
import logging
import os
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
from mathmill.sandbox.box import Box, detach_output, redirect, spawn_namespaced
from mathmill.sandbox.holder import holder_loop
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.runtime import describe_state, new_namespace, run_code
from mathmill.sandbox.supervise import cpu_aware_exit, result_fields, supervise
from mathmill.sandbox.wire import recv_msg, send_msg

log = logging.getLogger("mathmill.sandbox")

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
            pid = spawn_namespaced(box, {w}, body)
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
            redirect(out_w, err_w)
            box.harden(cpu=True)
            report = run_code(code, new_namespace())
            detach_output()
            os.write(res_w, json.dumps(report).encode() + b"\n")
            os._exit(0)

        pid = spawn_namespaced(box, {out_w, err_w, res_w}, body)
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
        result = result_fields(got, cpu_aware_exit(status, usage, limits), wall_ms, usage)
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
                holder_loop(theirs_fd, box, namespace, describe_state(namespace))
                os._exit(0)
            os.close(theirs_fd)
            while True:  # PID 1: reap until the holder chain is gone
                try:
                    os.wait()
                except ChildProcessError:
                    os._exit(0)

        pid = spawn_namespaced(box, {theirs_fd}, body)
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
