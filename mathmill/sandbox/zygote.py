"""The sandbox server process ("zygote"): pre-imports the math stack, clones a child
per job, and keeps stateful sessions. Run by :class:`mathmill.sandbox.local.LocalSandbox`
as ``python -m mathmill.sandbox.zygote`` with a clean environment; it speaks
length-prefixed JSON on stdin/stdout (each request carries an ``id`` that its answer
repeats) and logs to stderr.

Process tree of a stateless job::

    zygote ─ G, cloned into new user/pid/mount/net/ipc/uts namespaces as their PID 1:
             own session, pids cgroup, private /proc, tmpfs job dir, rlimits, Landlock,
             no capabilities; runs the code

When G exits or is killed, the kernel kills every process left in its pid namespace
(double-forked escapees included). A session is the same tree with a long-lived
holder process H under a reaper init; each turn runs in a fork T of H that takes
over as the holder on success and is discarded on timeout, crash, memory error or
output overflow, so the pre-turn state survives without replaying history.

The zygote is one event loop that supervises its job or session turn (deadline,
output caps, limits) and, while quiet, clones the next job's process ahead.

A clone copies the zygote's memory, so the zygote never clones while it holds anyone
else's data: it reads the next request only when quiet (no job running or waiting, no
session turn in flight or queued), one message at a time, so that when it clones a
process, for a job ahead or for the job or session it has just read, its memory holds
no other job's code or output that is still going on. (What earlier, finished work
left in freed memory may still be there, as in any fork server.) Several jobs run at
once on several zygotes (``LocalSandbox(workers=...)``), not in one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mathmill.sandbox import isolation as iso
from mathmill.sandbox.box import (
    Box,
    job_environment,
    prepare_landlock,
    set_environment,
    spawn_namespaced,
)
from mathmill.sandbox.guest import describe_state, new_namespace
from mathmill.sandbox.holder import holder_loop
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.prefork import prepare_for_cloning
from mathmill.sandbox.sessions import Session, Sessions
from mathmill.sandbox.stateless import Stateless
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


_PAGE = os.sysconf("SC_PAGE_SIZE")


class _VmSize:
    """This process's address space size, read from a descriptor kept open."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)

    def __call__(self) -> int:
        return int(os.pread(self._fd, 64, 0).split()[0]) * _PAGE


@dataclass
class Zygote:
    """The server loop. ``layers`` says which isolation layers are active."""

    workdir: str
    limits: Limits
    max_jobs: int = 1
    max_sessions: int = 8
    session_ttl_s: float = 900.0
    max_turns: int = 200
    allow_unsafe: bool = False
    use_namespaces: bool = True
    layers: dict[str, Any] = field(default_factory=dict)
    cgroups: iso.PidsCgroup | None = None
    landlock: iso.Landlock | None = None
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    wfd: int = -1
    shared_root: str | None = None
    _limits: dict[str, tuple[Limits, dict[str, Any]]] = field(default_factory=dict)
    _vm_size: _VmSize = field(default_factory=_VmSize)

    def __post_init__(self) -> None:
        self.jobs = self._stateless()
        self.sessions = Sessions(
            self.selector,
            self._spawn_session,
            self._reply,
            max_sessions=self.max_sessions,
            ttl_s=self.session_ttl_s,
            max_turns=self.max_turns,
        )

    def box(self, job_root: str, limits: Limits, name: str) -> Box:
        cgroup = self.cgroups.job(name, limits.max_processes + 2) if self.cgroups else None
        return Box(
            job_root,
            limits,
            bool(self.layers.get("namespaces")),
            self.landlock,
            self._vm_size(),
            cgroup=cgroup,
            shared_root=job_root == self.shared_root,
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
        self.landlock = prepare_landlock()  # once, before any job is cloned
        if not self.use_namespaces:
            layers.update(namespaces=False, proc=False, tmpfs=False, disabled="namespaces")
            return self._finish_probe(layers)
        probe_dir = os.path.join(self.workdir, "probe")
        os.makedirs(probe_dir, exist_ok=True)
        r, w = os.pipe()

        def body() -> None:
            found = {
                "namespaces": True,
                **iso.mount_private_proc_and_tmpfs(probe_dir, 1),
            }
            os.write(w, json.dumps(found).encode())
            os._exit(0)

        box = Box(probe_dir, self.limits, namespaces=True, landlock=None, baseline_as=0)
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
        if layers.get("namespaces") and layers.get("tmpfs"):
            # Every job mounts its own tmpfs on the same directory: nothing to create
            # or remove per job, and the zygote's environment is already the jobs'.
            self.shared_root = os.path.join(self.workdir, "job")
            os.makedirs(self.shared_root, mode=0o700, exist_ok=True)
            set_environment(job_environment(self.shared_root))
        self.jobs = self._stateless()
        return layers

    def _stateless(self) -> Stateless:
        return Stateless(
            self.selector,
            self.box,
            self._reply,
            limits=self.limits,
            max_jobs=self.max_jobs,
            workdir=self.workdir,
            shared_root=self.shared_root,
        )

    # -- sessions
    def _spawn_session(self, sid: str) -> Session:
        job_root = os.path.join(self.workdir, "sessions", sid)
        os.makedirs(job_root, mode=0o700, exist_ok=True)
        ours, theirs = socket.socketpair()
        box = self.box(job_root, self.limits, f"session-{sid}")
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
            if box.landlock:
                box.landlock.close()
            while True:  # PID 1: reap until the holder chain is gone
                try:
                    os.wait()
                except ChildProcessError:
                    os._exit(0)

        try:
            pid = spawn_namespaced(box, {theirs_fd}, body)
        except BaseException:
            ours.close()
            shutil.rmtree(job_root, ignore_errors=True)
            if box.cgroup:
                iso.PidsCgroup.remove(box.cgroup)
            raise
        finally:
            theirs.close()
        return Session(sid, pid, ours, job_root, cgroup=box.cgroup)

    # -- requests
    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "layers": self.layers,
            "sessions": len(self.sessions),
            "max_sessions": self.max_sessions,
            "jobs": len(self.jobs.running),
            "max_jobs": self.max_jobs,
        }

    def handle(self, request_id: Any, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Answer now (a dict) or later (None: a job or a session turn is under way)."""
        op = msg.get("op")
        if op == "health":
            return self.health()
        if self._refuses_jobs() and op in ("exec", "session.create"):
            return _refused(self.layers)
        if op == "exec":
            limits, fields = self._job_limits(msg.get("limits") or {})
            self.jobs.submit(request_id, msg["code"], limits, fields)
            return None
        if op == "session.create":
            return self.sessions.create(msg.get("session_id") or uuid.uuid4().hex[:16])
        if op == "session.exec":
            timeout = float(msg.get("timeout_s") or self.limits.timeout_s)
            return self.sessions.exec(request_id, msg["session_id"], msg["code"], timeout)
        if op == "session.state":
            return self.sessions.state(request_id, msg["session_id"])
        if op == "session.reset":
            return self.sessions.reset(msg["session_id"])
        if op == "session.delete":
            return self.sessions.delete(msg["session_id"])
        return {"error": f"unknown op {op!r}", "code": 400}

    def _job_limits(self, update: dict[str, Any]) -> tuple[Limits, dict[str, Any]]:
        """The zygote's limits with ``update`` applied, validated, and their fields (the
        few distinct ones are kept: Limits are immutable).
        """
        key = json.dumps(update, sort_keys=True)
        found = self._limits.get(key)
        if found is None:
            if len(self._limits) >= 64:
                self._limits.clear()
            merged = self.limits.model_copy(update=update)
            limits = Limits.model_validate(merged.model_dump())
            found = self._limits[key] = (limits, limits.model_dump())
        return found

    def _reply(self, request_id: Any, reply: dict[str, Any]) -> None:
        if self.wfd >= 0:
            send_msg(self.wfd, {**reply, "id": request_id})

    def _guarded(self, request_id: Any, fn: Any, *args: Any) -> None:
        try:
            reply = fn(*args)
        except Exception as e:  # report and keep serving
            log.exception("sandbox: request failed")
            reply = {"error": f"{type(e).__name__}: {e}", "code": 500}
        if reply is not None:
            self._reply(request_id, reply)

    def _tick(self, now: float) -> float:
        return min(self.sessions.tick(now), self.jobs.tick(now))

    def serve(self, rfd: int, wfd: int) -> None:
        """Answer requests from ``rfd`` on ``wfd`` until ``rfd`` closes."""
        self.wfd = wfd
        send_msg(wfd, {"hello": self.health()})
        closed = False
        reading = False

        def on_request(_fd: int) -> None:
            # one whole message (the client writes whole messages): nothing more is
            # read into this process until it is quiet again
            nonlocal closed
            msg = recv_msg(rfd)
            if msg is None:
                closed = True
                return
            request_id = msg.get("id")
            self._guarded(request_id, self.handle, request_id, msg)

        try:
            while not closed:
                quiet = self.quiet()
                if quiet != reading:
                    if quiet:
                        self.selector.register(rfd, selectors.EVENT_READ, on_request)
                    else:
                        self.selector.unregister(rfd)
                    reading = quiet
                self._step()
        finally:
            self.close()

    def quiet(self) -> bool:
        """No job running or waiting and no session turn in flight or queued: nothing
        of anyone's is in this process's memory but what finished work left.
        """
        return not self.jobs.running and not self.jobs.waiting and not self.sessions.busy()

    def _step(self) -> None:
        """Wait for the next event or deadline, and handle what is ready. When nothing
        is waiting, clone the next job process ahead of its job.
        """
        now = time.monotonic()
        timeout = max(0.0, self._tick(now) - now)
        prepare = self.jobs.wants_ready and self.quiet() and not self._refuses_jobs()
        if prepare and now < self.jobs.prepare_after:  # it failed just now: not a spin
            timeout, prepare = min(timeout, self.jobs.prepare_after - now), False
        events = self.selector.select(0.0 if prepare else timeout)
        for key, _ in events:
            key.data(key.fd)
        if prepare and not events:
            self.jobs.prepare()
        self._tick(time.monotonic())
        self.jobs.finish()

    def _refuses_jobs(self) -> bool:
        return bool(self.layers.get("unsafe")) and not self.allow_unsafe

    def close(self) -> None:
        """Kill every job and session, remove their directories and cgroups."""
        self.jobs.close()
        self.sessions.close()


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
        max_jobs=1,  # one job at a time: see the module's docstring
        max_sessions=int(config.get("max_sessions", 8)),
        session_ttl_s=float(config.get("session_ttl_s", 900)),
        max_turns=int(config.get("max_turns", 200)),
        allow_unsafe=bool(config.get("allow_unsafe", False)),
        use_namespaces=bool(config.get("use_namespaces", True)),
    )
    layers = zygote.probe()
    iso.set_dumpable(False)
    memory = prepare_for_cloning()
    log.info(
        "sandbox: zygote %d ready; isolation layers: %s",
        os.getpid(),
        json.dumps(layers),
    )
    log.info("sandbox: zygote %d heap on huge pages: %d MiB", os.getpid(), memory["huge_mb"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        zygote.serve(rfd, wfd)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
        if zygote.cgroups is not None:
            zygote.cgroups.close()


if __name__ == "__main__":
    main()
