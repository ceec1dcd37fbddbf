"""The local backend: zygote server processes on this machine (the embedded default).

Each zygote is a separate process started with a clean environment (none of the
caller's variables: no API keys), two per core by default. Stateless jobs go to the
least busy zygote, which runs one job or session turn at a time (so that no job's
process is cloned while another's code or output is in the zygote); a session lives
on the zygote that created it. Requests carry an id; a zygote reads the next one
when it is quiet.

>>> async with LocalSandbox() as sandbox:  # doctest: +SKIP
...     result = await sandbox.execute("print(2**10)")
...     result.stdout
'1024\\n'
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from typing import Any

from mathmill.records import ExecutionResult
from mathmill.sandbox.box import SANDBOX_ENV
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.protocol import (
    SandboxError,
    SandboxUnavailable,
    SessionNotFound,
    SessionResult,
    SessionState,
)

__all__ = ["LocalSandbox"]

log = logging.getLogger("mathmill.sandbox")
_HEADER = struct.Struct(">I")
_Waiter = asyncio.Future[dict[str, Any] | None]


def _absolute_pythonpath() -> str:
    """$PYTHONPATH with each entry absolute: the zygote runs in its own directory."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return os.pathsep.join(os.path.abspath(p) for p in entries if p)


class _Worker:
    """One zygote process and the requests in flight to it (matched to answers by id)."""

    def __init__(self, index: int, config: dict[str, Any]) -> None:
        self.index = index
        self.config = config
        # Jobs beyond what the zygote runs at once wait here, so that a job's wait
        # for its answer starts when the zygote has room for it.
        self.slots = asyncio.Semaphore(1)  # a zygote runs one job at a time
        self.proc: asyncio.subprocess.Process | None = None
        self.pending = 0
        self.hello: dict[str, Any] = {}
        self.workdir = ""
        self._start_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count()
        self._log_task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> dict[str, Any]:
        async with self._start_lock:
            if self.running:
                return self.hello
            return await self._start()

    async def _start(self) -> dict[str, Any]:
        self.workdir = tempfile.mkdtemp(prefix=f"mathmill-sandbox-{self.index}-")
        env = dict(SANDBOX_ENV, HOME=self.workdir)
        if "PYTHONPATH" in os.environ:  # where mathmill itself is found; not a secret
            env["PYTHONPATH"] = _absolute_pythonpath()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # not its directory on sys.path (nor so in the jobs' Landlock rules)
            "-m",
            "mathmill.sandbox.zygote",
            "--workdir",
            self.workdir,
            "--config",
            json.dumps(self.config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=self.workdir,  # not the orchestrator's: `-m` puts the cwd on sys.path
            start_new_session=True,
            limit=1 << 30,
        )
        self.proc = proc
        self._log_task = asyncio.create_task(self._forward_logs(proc))
        hello = await asyncio.wait_for(_read(proc), timeout=120)
        if hello is None:
            raise SandboxUnavailable(f"sandbox worker {self.index} exited while starting")
        self.hello = hello["hello"]
        self._waiters = {}
        self._reader = asyncio.create_task(self._read_answers(proc, self._waiters))
        return self.hello

    async def _forward_logs(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            log.info("worker %d: %s", self.index, line.decode(errors="replace").rstrip())

    async def _read_answers(
        self, proc: asyncio.subprocess.Process, waiters: dict[int, _Waiter]
    ) -> None:
        """Hand each answer to the request with its id; at the end, fail the rest."""
        try:
            while (answer := await _read(proc)) is not None:
                waiter = waiters.pop(answer.pop("id", None), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
        finally:
            for waiter in waiters.values():
                if not waiter.done():
                    waiter.set_result(None)
            waiters.clear()

    async def request(self, msg: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """Send ``msg``; its answer, or SandboxError when none comes in ``wait_s``."""
        self.pending += 1
        try:
            if msg["op"] != "exec":
                return await self._request(msg, wait_s)
            async with self.slots:
                return await self._request(msg, wait_s)
        finally:
            self.pending -= 1

    async def _request(self, msg: dict[str, Any], wait_s: float) -> dict[str, Any]:
        request_id = next(self._ids)
        proc, waiters = self.proc, self._waiters
        try:
            if proc is None or proc.returncode is not None or proc.stdin is None:
                raise SandboxError(f"sandbox worker {self.index} is not running")
            waiter: _Waiter = asyncio.get_running_loop().create_future()
            waiters[request_id] = waiter
            data = json.dumps({**msg, "id": request_id}).encode()
            async with self._write_lock:
                proc.stdin.write(_HEADER.pack(len(data)) + data)
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()
            try:
                reply = await asyncio.wait_for(waiter, wait_s)
            except TimeoutError:
                reply = None
            if reply is None:
                await self.stop(proc)
                raise SandboxError(
                    f"sandbox worker {self.index} died or hung during {msg.get('op')!r}; "
                    "it is restarted on the next request (its sessions are lost)"
                )
            return reply
        finally:
            waiters.pop(request_id, None)

    async def stop(self, proc: asyncio.subprocess.Process | None = None) -> None:
        """Stop the zygote (given ``proc``: only while that one is still the current one)."""
        if proc is not None and proc is not self.proc:
            return
        proc, workdir, tasks = self.proc, self.workdir, (self._log_task, self._reader)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                await proc.wait()
        for task in tasks:
            if task is not None:
                task.cancel()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


async def _read(proc: asyncio.subprocess.Process) -> Any:
    """One message from the zygote; None at end of stream."""
    assert proc.stdout is not None
    try:
        header = await proc.stdout.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        return json.loads(await proc.stdout.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


class LocalSandbox:
    """Run code in zygote processes on this machine.

    Args:
        workers: zygote processes (default: two per core). Each runs one job or
            session turn at a time, and clones the next job's process while quiet.
        limits: default limits of each execution and turn.
        max_sessions_per_worker: sessions a worker keeps; the least recently used one
            is evicted past it.
        session_ttl_s: an idle session is deleted after this long.
        max_turns: turns per session.
        allow_unsafe: run code even where no isolation beyond rlimits is possible.
        use_namespaces: False forces the rlimits-only mode (for hosts where user
            namespaces are disabled); it then needs ``allow_unsafe``.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        limits: Limits | None = None,
        max_sessions_per_worker: int = 8,
        session_ttl_s: float = 900.0,
        max_turns: int = 200,
        allow_unsafe: bool = False,
        use_namespaces: bool = True,
    ) -> None:
        self.limits = limits or Limits()
        config = {
            "limits": self.limits.model_dump(),
            "max_sessions": max_sessions_per_worker,
            "session_ttl_s": session_ttl_s,
            "max_turns": max_turns,
            "allow_unsafe": allow_unsafe,
            "use_namespaces": use_namespaces,
        }
        self.allow_unsafe = allow_unsafe
        count = workers or 2 * (os.cpu_count() or 1)
        self._workers = [_Worker(i, config) for i in range(count)]
        self._started = False
        self._start_lock = asyncio.Lock()

    async def start(self) -> LocalSandbox:
        """Start the workers; raises :class:`SandboxUnavailable` when unsafe."""
        async with self._start_lock:
            if self._started:
                return self
            hellos = await asyncio.gather(*(w.start() for w in self._workers))
            self._started = True
            layers = hellos[0]["layers"]
            if layers.get("unsafe") and not self.allow_unsafe:
                await self.close()
                raise SandboxUnavailable(
                    "no isolation beyond rlimits is available on this machine "
                    f"(layers: {layers}); refusing untrusted code. Pass allow_unsafe=True "
                    "(or --unsafe) to run it anyway."
                )
            log.info("sandbox: %d workers; isolation layers: %s", len(self._workers), layers)
        return self

    async def __aenter__(self) -> LocalSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every worker (their sessions end with them)."""
        await asyncio.gather(*(w.stop() for w in self._workers))
        self._started = False

    async def _worker_for(self, session_id: str) -> _Worker:
        await self.start()
        index, _, _ = session_id.partition("-")
        if not index.isdigit() or int(index) >= len(self._workers):
            raise SessionNotFound(f"no session {session_id!r}")
        return self._workers[int(index)]

    async def _restart_if_dead(self, worker: _Worker) -> None:
        if not worker.running:
            log.warning("sandbox: worker %d died; restarting it", worker.index)
            await worker.start()

    async def execute(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        """Run ``code`` once in a fresh sandboxed process."""
        await self.start()
        limits = limits or self.limits
        worker = min(self._workers, key=lambda w: w.pending)
        await self._restart_if_dead(worker)
        reply = await worker.request(
            {"op": "exec", "code": code, "limits": limits.model_dump()},
            limits.timeout_s + 60,
        )
        _raise_for(reply)
        return ExecutionResult.model_validate(reply)

    async def create_session(self) -> str:
        """Start a session on the least loaded worker."""
        await self.start()
        worker = min(self._workers, key=lambda w: w.pending)
        await self._restart_if_dead(worker)
        sid = f"{worker.index}-{os.urandom(8).hex()}"
        reply = await worker.request({"op": "session.create", "session_id": sid}, 60)
        _raise_for(reply)
        return sid

    async def run_in_session(
        self, session_id: str, code: str, timeout_s: float | None = None
    ) -> SessionResult:
        """Run one turn; a timed-out, crashed or out-of-memory turn leaves the state as
        it was before the turn.
        """
        worker = await self._worker_for(session_id)
        timeout = timeout_s or self.limits.timeout_s
        reply = await worker.request(
            {
                "op": "session.exec",
                "session_id": session_id,
                "code": code,
                "timeout_s": timeout,
            },
            timeout + 60,
        )
        _raise_for(reply)
        state = reply.pop("state", None)
        reply.pop("session_lost", None)
        return SessionResult(
            session_id=session_id,
            state=SessionState.model_validate(state) if state else None,
            **reply,
        )

    async def session_state(self, session_id: str) -> SessionState:
        """The session's state (from the last successful turn; runs no user code)."""
        worker = await self._worker_for(session_id)
        reply = await worker.request({"op": "session.state", "session_id": session_id}, 30)
        _raise_for(reply)
        return SessionState.model_validate(reply["state"])

    async def reset_session(self, session_id: str) -> None:
        """Replace the session by an empty one with the same id."""
        worker = await self._worker_for(session_id)
        _raise_for(await worker.request({"op": "session.reset", "session_id": session_id}, 60))

    async def delete_session(self, session_id: str) -> None:
        """End the session: its processes are killed and its directory removed."""
        worker = await self._worker_for(session_id)
        _raise_for(await worker.request({"op": "session.delete", "session_id": session_id}, 60))

    async def health(self) -> dict[str, Any]:
        """Each worker's pid, sessions and isolation layers."""
        await self.start()
        replies = []
        for worker in self._workers:
            await self._restart_if_dead(worker)
            if worker._waiters:  # busy: it reads no request before its job is done
                replies.append({**worker.hello, "ok": worker.running})
                continue
            worker.hello = await worker.request({"op": "health"}, 30)
            replies.append(worker.hello)
        return {
            "ok": all(r.get("ok") for r in replies),
            "backend": "local",
            "workers": len(replies),
            "sessions": sum(int(r.get("sessions", 0)) for r in replies),
            "layers": replies[0]["layers"],
        }


def _raise_for(reply: dict[str, Any]) -> None:
    """Turn a zygote's error reply into the matching exception."""
    if "error" not in reply:
        return
    code = reply.get("code")
    if code in (404, 410):
        raise SessionNotFound(str(reply["error"]))
    if code == 503:
        raise SandboxUnavailable(str(reply["error"]))
    raise SandboxError(str(reply["error"]))
