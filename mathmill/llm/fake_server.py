"""A fake OpenAI-compatible server for tests and benchmarks: real HTTP, scriptable.

It speaks ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` on
loopback, answers from a queue of scripted responses or from a function of the
request, injects faults (429 with Retry-After, 5xx, a hang past the client's
timeout, malformed JSON, truncated content) and records every request it got.

>>> with FakeOpenAIServer() as fake:  # doctest: +SKIP
...     fake.enqueue(Reply("4"), Fault.status(429, retry_after=0.1))
...     ...  # point a client at fake.base_url
...     [r.outcome for r in fake.requests]

Run standalone (for benchmarks or a manual ``mathmill endpoint check``)::

    python -m mathmill.llm.fake_server --port 8011 [--fault-rate 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn

__all__ = ["FakeOpenAIServer", "Fault", "RecordedRequest", "Reply", "Response"]


@dataclass
class Reply:
    """A successful completion. ``contents`` gives one text per sample (``n``)."""

    content: str = "ok"
    finish_reason: str = "stop"
    contents: list[str] | None = None
    delay_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class Fault:
    """A failure to inject."""

    kind: Literal["status", "hang", "malformed", "truncated"]
    code: int = 500
    retry_after: float | None = None
    seconds: float = 30.0
    body: str = ""

    @classmethod
    def status(cls, code: int, retry_after: float | None = None) -> Fault:
        """An HTTP error (``retry_after`` sets the Retry-After header, in seconds)."""
        return cls("status", code=code, retry_after=retry_after)

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Fault:
        """Accept the request and answer only after ``seconds``."""
        return cls("hang", seconds=seconds)

    @classmethod
    def malformed(cls) -> Fault:
        """HTTP 200 with a body that is not valid JSON."""
        return cls("malformed")

    @classmethod
    def truncated(cls, content: str = '{"answer": "4') -> Fault:
        """HTTP 200 with cut-off content and ``finish_reason='length'``."""
        return cls("truncated", body=content)


Response = Reply | Fault


@dataclass
class RecordedRequest:
    """A request the server got, and what it answered."""

    method: str
    path: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    received_at: float
    outcome: str = ""

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The chat messages of the request (empty for other endpoints)."""
        return list((self.body or {}).get("messages", []))


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(m.get("content", "")) for m in body["messages"])
    return str(body.get("prompt", ""))


class FakeOpenAIServer:
    """A real HTTP server on 127.0.0.1 in a background thread.

    Responses come, in order of precedence, from the queue (:meth:`enqueue`), from
    ``handler(request)``, or are ``Reply("ok")``. With ``fault_rate`` > 0 a seeded
    random draw replaces that many answers by a fault from ``faults``.
    """

    def __init__(
        self,
        handler: Callable[[RecordedRequest], Response] | None = None,
        *,
        model: str = "fake-model",
        fault_rate: float = 0.0,
        faults: list[Fault] | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
    ) -> None:
        self.handler = handler
        self.model = model
        self.fault_rate = fault_rate
        self.faults = faults or [
            Fault.status(429, retry_after=0.05),
            Fault.status(500),
            Fault.status(503, retry_after=0.05),
            Fault.hang(30.0),
            Fault.malformed(),
        ]
        self.record = record
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Response] = deque()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._host, self._port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self.in_flight = 0
        self.in_flight_log: list[tuple[float, int]] = []  # (monotonic time, in flight after)

    # -- scripting ---------------------------------------------------------------
    def enqueue(self, *responses: Response) -> None:
        """Queue responses, answered in order before the handler is consulted."""
        with self._lock:
            self._queue.extend(responses)

    def outcomes(self) -> list[str]:
        """What each recorded request was answered with, in order."""
        return [r.outcome for r in self.requests]

    def _next(self, request: RecordedRequest) -> Response:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self.fault_rate and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.faults)
        if self.handler is not None:
            return self.handler(request)
        return Reply()

    # -- lifecycle ---------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://{self._host}:{self._port}/v1"

    def start(self) -> FakeOpenAIServer:
        """Bind, start serving in a thread, and return once it accepts connections."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this: without it, the separate header and body
        # writes meet the client's delayed ACK and every response waits ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self._host, self._port))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
            backlog=4096,
            lifespan="off",
            interface="asgi3",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-openai"
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (hanging requests are dropped)."""
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- ASGI --------------------------------------------------------------------
    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        more = True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["path"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            await _send(send, 400, {"error": {"message": "request body is not JSON"}})
            return
        request = RecordedRequest(scope["method"], path, body, headers, time.monotonic())
        if self.record:
            self.requests.append(request)
        if path.endswith("/models"):
            request.outcome = "models"
            data = [{"id": self.model, "object": "model", "created": 0, "owned_by": "mathmill"}]
            await _send(send, 200, {"object": "list", "data": data})
            return
        if not (path.endswith("/chat/completions") or path.endswith("/completions")):
            request.outcome = "404"
            await _send(send, 404, {"error": {"message": f"no route {path}"}})
            return
        if not isinstance(body, dict):
            request.outcome = "400"
            await _send(send, 400, {"error": {"message": "missing JSON body"}})
            return
        response = self._next(request)
        self._count_in_flight(+1)
        try:
            await self._answer(request, body, response, send)
        finally:
            self._count_in_flight(-1)

    def _count_in_flight(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta
            self.in_flight_log.append((time.monotonic(), self.in_flight))

    def peak_in_flight(self, start: float = 0.0, end: float = float("inf")) -> int:
        """Most completion requests in flight at once between two ``time.monotonic()``
        readings (0 when none ran then).
        """
        with self._lock:
            log = list(self.in_flight_log)
        level = peak = 0
        seen = False
        for when, now in log:
            if when >= end:
                break
            if when >= start:
                peak = max(peak, level, now)
                seen = True
            level = now
        return peak if seen else level

    async def _answer(
        self, request: RecordedRequest, body: dict[str, Any], response: Response, send: Any
    ) -> None:
        if isinstance(response, Fault):
            if response.kind == "status":
                request.outcome = f"status:{response.code}"
                extra = {}
                if response.retry_after is not None:
                    extra["retry-after"] = f"{response.retry_after:g}"
                payload = {"error": {"message": f"injected {response.code}", "type": "fault"}}
                await _send(send, response.code, payload, extra)
                return
            if response.kind == "hang":
                request.outcome = "hang"
                await asyncio.sleep(response.seconds)
                response = Reply()
            elif response.kind == "malformed":
                request.outcome = "malformed"
                await _send_raw(send, 200, b'{"id": "chatcmpl-x", "choices": [{"message": ')
                return
            else:
                request.outcome = "truncated"
                response = Reply(response.body, finish_reason="length")
        if response.delay_s:
            await asyncio.sleep(response.delay_s)
        request.outcome = request.outcome or "ok"
        await _send(send, 200, self._completion(body, response))

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        n = int(body.get("n") or 1)
        texts = reply.contents or [reply.content] * n
        chat = "messages" in body
        with self._lock:
            self._counter += 1
            ident = self._counter
        prompt_tokens = reply.prompt_tokens or _tokens(_prompt_text(body))
        choices = []
        completion_tokens = 0
        for i, text in enumerate(texts[:n] if reply.contents is None else texts):
            completion_tokens += _tokens(text)
            pieces = text.split(" ")
            if chat:
                choice: dict[str, Any] = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
                if body.get("logprobs"):
                    k = int(body.get("top_logprobs") or 0)
                    choice["logprobs"] = {
                        "content": [
                            {
                                "token": tok,
                                "logprob": -0.1 * (j + 1),
                                "bytes": None,
                                "top_logprobs": [
                                    {"token": tok, "logprob": -0.1 * (j + 1), "bytes": None}
                                ][:k],
                            }
                            for j, tok in enumerate(pieces)
                        ]
                    }
            else:
                choice = {
                    "index": i,
                    "text": text,
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
                if body.get("logprobs") is not None:
                    choice["logprobs"] = {
                        "tokens": pieces,
                        "token_logprobs": [-0.1 * (j + 1) for j in range(len(pieces))],
                        "top_logprobs": [{tok: -0.1 * (j + 1)} for j, tok in enumerate(pieces)],
                        "text_offset": [0] * len(pieces),
                    }
            choices.append(choice)
        extras = _prompt_logprobs(body)
        if not chat and choices:
            choices[0] |= extras  # vLLM: on the choice for completions, on the response for chat
        return (extras if chat else {}) | {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{ident}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": reply.completion_tokens or completion_tokens,
                "total_tokens": prompt_tokens + (reply.completion_tokens or completion_tokens),
            },
        }


def _prompt_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``prompt_logprobs`` extra, shaped as vLLM sends it: one entry per prompt
    word with the whitespace before it (``" beta"``, as a BPE token decodes: the tokens
    join back to the text; token ids 100, 101, ...), none for the first, each with the
    prompt's token (rank 2, logprob -0.5) and a better alternative (id 7, rank 1, logprob -0.1);
    ``prompt_token_ids`` with ``return_token_ids``.
    """
    k = body.get("prompt_logprobs")
    if k is None:
        return {}
    words = re.findall(r"\s*\S+", _prompt_text(body))
    ids = [100 + i for i in range(len(words))]
    positions: list[dict[str, Any] | None] = [None]
    for i in range(1, len(words)):
        entry = {str(ids[i]): {"logprob": -0.5, "rank": 2, "decoded_token": words[i]}}
        if int(k) >= 1:
            entry["7"] = {"logprob": -0.1, "rank": 1, "decoded_token": "<best>"}
        positions.append(entry)
    out: dict[str, Any] = {"prompt_logprobs": positions}
    if body.get("return_token_ids"):
        out["prompt_token_ids"] = ids
    return out


async def _send(
    send: Any, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    await _send_raw(send, status, json.dumps(payload).encode(), headers)


async def _send_raw(
    send: Any, status: int, data: bytes, headers: dict[str, str] | None = None
) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted (for benchmarks and manual checks)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--content", default="ok", help="the text every reply carries")
    parser.add_argument("--no-record", action="store_true", help="keep no request log")
    args = parser.parse_args(argv)
    server = FakeOpenAIServer(
        lambda _r: Reply(args.content),
        model=args.model,
        fault_rate=args.fault_rate,
        port=args.port,
        record=not args.no_record,
    )
    server.start()
    print(f"fake OpenAI server on {server.base_url}", flush=True)  # noqa: T201
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
