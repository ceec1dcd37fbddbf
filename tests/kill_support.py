"""Helpers for tests/test_kill_endpoints.py: a run's endpoints killed mid-run.

* :class:`SandboxServer`: ``mathmill sandbox serve`` on a fixed port, in its own process
  group, that can be killed with ``kill -9`` (the whole group) and started again on the
  same port; its access log tells which requests it served.
* :class:`TcpProxy`: a TCP relay in front of an S3 server (moto) that can be *stopped*
  (listener closed, open connections dropped: clients get "connection refused") and
  *started* again on the same port, while the server behind it keeps its data, as a
  real S3 endpoint that goes down and comes back would.
* :class:`OnAnswer`: wraps a fake LLM handler and runs an action (kill the sandbox,
  stop the endpoint) right after its N-th answer to a stage, before that answer goes
  out. The outage then starts at the same point of the run whatever the machine's
  speed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mathmill.llm.fake_server import RecordedRequest, Response
from tests.chaos_support import alive, descendants

Handler = Callable[[RecordedRequest], Response]
ZYGOTE_WORKDIR = re.compile(r"--workdir (\S+)")


class SandboxServer:
    """``mathmill sandbox serve --port PORT`` as this user, its log in ``log``.

    :meth:`kill` sends SIGKILL to its process group and waits until every process it
    had started (its zygotes, in sessions of their own) is gone; :meth:`start` can be
    called again afterwards and listens on the same port.
    """

    def __init__(self, port: int, log: Path, *, workers: int = 2, timeout_s: float = 5.0) -> None:
        self.port = port
        self.log = log
        self.workers = workers
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.left_behind: list[str] = []  # processes or sandbox dirs the last kill left

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_s: float = 120.0) -> None:
        """Start the server and wait until ``/health`` answers."""
        argv = [sys.executable, "-m", "mathmill", "sandbox", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--workers", str(self.workers)]
        argv += ["--timeout", str(self.timeout_s)]
        keep = ("PATH", "HOME", "LANG", "PYTHONPATH")
        env = {k: v for k, v in os.environ.items() if k in keep} | {"PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True
            )
        deadline = time.monotonic() + wait_s
        with httpx.Client(base_url=self.url, timeout=5) as probe:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sandbox server exited: {self.log.read_text()[-2000:]}")
                try:
                    if probe.get("/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sandbox server on port {self.port} did not start")
                time.sleep(0.2)

    def kill(self, gone_s: float = 20.0) -> None:
        """``kill -9`` of the server's process group; waits for its zygotes to exit
        (they are in sessions of their own and end when the server's pipes close) and
        records in ``left_behind`` any process or sandbox directory still there.
        """
        assert self.proc is not None
        below = descendants(self.proc.pid)
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + gone_s
        while any(alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.05)
        dirs = {m.group(1) for cmd in below.values() if (m := ZYGOTE_WORKDIR.search(cmd))}
        deadline = time.monotonic() + gone_s
        while any(os.path.exists(d) for d in dirs) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.left_behind = [f"{pid} {cmd}" for pid, cmd in below.items() if alive(pid)]
        self.left_behind += sorted(d for d in dirs if os.path.exists(d))

    def stop(self) -> None:
        """Stop it for good (SIGTERM, then SIGKILL of the group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def executions(self) -> int:
        """``POST /execute`` requests this server answered (its access log, all starts)."""
        return self.log.read_text(errors="replace").count('"POST /execute HTTP/1.1" 200')


_REQUEST_LINE = re.compile(rb"^(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r\n")


class TcpProxy:
    """A TCP relay from ``127.0.0.1:port`` to ``target`` (host, port), one pair of
    threads per connection. :meth:`stop` closes the listener and every open connection
    (new ones are refused); :meth:`start` listens on the same port again.

    HTTP request lines sent through it are kept in ``requests`` (``"PUT /bucket/key"``);
    ``cut``, when set, sees each one before it is forwarded: when it returns True the
    proxy stops at once and that request never reaches the server.
    """

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port
        self.cut: Callable[[str], bool] | None = None
        self.requests: list[str] = []
        self.stops = 0
        self.dropped = 0  # connections closed by stop()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self._listener is not None

    def start(self) -> TcpProxy:
        """Listen (on the same port as before, if it was started once)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listener and drop every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self.dropped += len(conns)
            self.stops += listener is not None
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            for a, b, out in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, out), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outgoing: bool) -> None:
        try:
            while data := src.recv(65536):
                if outgoing and (m := _REQUEST_LINE.match(data)):
                    line = f"{m.group(1).decode()} {m.group(2).decode()}"
                    if self.cut is not None and self.cut(line):
                        self.stop()
                        return
                    self.requests.append(line)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            src.close()


@dataclass
class OnAnswer:
    """Wraps ``inner``; right after its ``after``-th answer to a request of ``stage``
    (header ``x-mathmill-stage``; prefix match), runs ``action`` once, before that
    answer is sent. ``done`` is set once the action has run.
    """

    inner: Handler
    stage: str
    after: int
    action: Callable[[], None]
    seen: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: RecordedRequest) -> Response:
        response = self.inner(request)
        if request.headers.get("x-mathmill-stage", "").startswith(self.stage):
            with self._lock:
                self.seen += 1
                fire = self.seen == self.after
            if fire:
                self.action()
                self.done.set()
        return response
