"""An async client pool over the official ``openai`` SDK for OpenAI-compatible endpoints.

One :class:`LLMClient` per endpoint bounds the requests in flight with a semaphore,
retries 429/5xx/timeouts/connection errors with tenacity (honouring ``Retry-After``),
applies a per-request timeout and records usage, latency and cost per stage.

>>> pool = LLMPool()
>>> client = pool.client(EndpointConfig(base_url="http://127.0.0.1:8000/v1", model="m"))
>>> client.endpoint.max_concurrency
16
>>> result = await client.chat([{"role": "user", "content": "2+2?"}])  # doctest: +SKIP
"""

from __future__ import annotations

import email.utils
import functools
import json
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx2
import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from mathmill.errors import EndpointError, EndpointTimeout, StructuredOutputError
from mathmill.llm.cache import CallCache
from mathmill.llm.config import EndpointConfig, Price
from mathmill.llm.limiter import Limiter
from mathmill.llm.structured import parse_reply, repair_message, response_format, schema_hint
from mathmill.llm.usage import UsageMeter
from mathmill.records import ErrorInfo, SamplingParams, TokenUsage

__all__ = [
    "ChatResult",
    "Choice",
    "LLMClient",
    "LLMPool",
    "StructuredResult",
    "TokenLogprob",
]

T = TypeVar("T", bound=BaseModel)
Message = dict[str, Any]

_RETRY_STATUS = {408, 409, 429}
_CONNECTIONS_PER_SHARD = 32


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The TLS context of every connection shard: what ``verify=True`` makes (the CA
    bundle, ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` honoured), made once per process,
    not per shard (~20 ms each: 8 shards at 256 in flight).
    """
    return httpx2.create_ssl_context()


@dataclass(slots=True)
class TokenLogprob:
    """One generated token with its logprob and the top alternatives."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)
    token_id: int | None = None


@dataclass(slots=True)
class Choice:
    """One sample of a completion."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class ChatResult:
    """The outcome of one logical call: the samples, or the recorded error."""

    model: str
    choices: list[Choice]
    usage: TokenUsage
    latency_ms: float
    attempts: int
    cost_usd: float = 0.0
    error: ErrorInfo | None = None
    raw: dict[str, Any] | None = None
    cached: bool = False
    prompt_logprobs: list[TokenLogprob] | None = None
    """Logprob of each prompt token after the first (vLLM servers, ``prompt_logprobs``)."""

    @property
    def ok(self) -> bool:
        """True when the call produced at least one choice."""
        return self.error is None

    @property
    def text(self) -> str:
        """The first sample's text ('' when the call failed)."""
        return self.choices[0].text if self.choices else ""

    @property
    def texts(self) -> list[str]:
        """All samples' texts."""
        return [c.text for c in self.choices]

    def add_costs(self, other: ChatResult) -> None:
        """Count another call's tokens, cost, time and attempts on this result (a repair
        call, or more samples asked for separately).
        """
        self.usage = self.usage + other.usage
        self.latency_ms += other.latency_ms
        self.cost_usd += other.cost_usd
        self.attempts += other.attempts


@dataclass(slots=True)
class StructuredResult(Generic[T]):
    """A structured call: the parsed value (or the recorded failure) and the raw text."""

    value: T | None
    raw: str
    repaired: bool
    result: ChatResult
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        """True when ``value`` parsed."""
        return self.value is not None


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRY_STATUS or exc.status_code >= 500
    return isinstance(
        exc,
        openai.APITimeoutError
        | openai.APIConnectionError
        | openai.APIResponseValidationError
        | json.JSONDecodeError,
    )


def _describe(exc: BaseException, endpoint: EndpointConfig, attempts: int) -> EndpointError:
    where = f"{endpoint.base_url} (model {endpoint.model!r})"
    tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(exc, openai.APITimeoutError):
        return EndpointTimeout(
            f"{where}: no answer within {endpoint.timeout_s:g}s {tries}",
            kind="timeout",
            attempts=attempts,
        )
    if isinstance(exc, openai.APIStatusError):
        body = exc.response.text[:200].replace("\n", " ")
        return EndpointError(
            f"{where}: HTTP {exc.status_code} {tries}: {body}",
            kind="status",
            status=exc.status_code,
            attempts=attempts,
        )
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return EndpointError(
            f"{where}: cannot connect {tries}: {cause}", kind="connection", attempts=attempts
        )
    return EndpointError(
        f"{where}: invalid response {tries}: {type(exc).__name__}: {exc}",
        kind="bad_response",
        attempts=attempts,
    )


class LLMClient:
    """Calls to one endpoint, bounded by a live :class:`Limiter` (``max_concurrency`` at
    first), with retries and accounting.

    Methods raise :class:`~mathmill.errors.EndpointError` on final failure unless
    ``raise_on_error=False``, in which case the failure is returned in ``result.error``.
    A request that is not a cache hit is not sent once the meter's budget is spent
    (:meth:`~mathmill.llm.usage.UsageMeter.budget_reached`): it fails at once with
    kind ``budget``.
    """

    def __init__(
        self,
        endpoint: EndpointConfig,
        meter: UsageMeter,
        price: Price | None = None,
        cache: CallCache | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.meter = meter
        self.cache = cache
        self.price = endpoint.price or price
        # httpcore scans its whole connection pool on every request (a poll syscall
        # per idle connection), so one pool of 256 connections costs far more CPU per
        # call than 8 pools of 32. Requests go to the least loaded shard.
        n_shards = -(-endpoint.max_concurrency // _CONNECTIONS_PER_SHARD)
        self._per_shard = -(-endpoint.max_concurrency // n_shards)
        self._shards = [self._sdk_client(self._per_shard) for _ in range(n_shards)]
        self._load = [0] * n_shards
        self.openai = self._shards[0]
        self.limiter = Limiter(endpoint.max_concurrency)
        self._backoff = wait_exponential_jitter(
            multiplier=0.25, max=endpoint.max_backoff_s, jitter=0.25
        )

    def _sdk_client(self, connections: int) -> openai.AsyncOpenAI:
        limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
        return openai.AsyncOpenAI(
            base_url=self.endpoint.base_url,
            api_key=self.endpoint.api_key.get_secret_value(),
            timeout=self.endpoint.timeout_s,
            max_retries=0,  # retries are ours (tenacity), so they are counted and logged
            http_client=openai.DefaultAsyncHttpx2Client(limits=limits, verify=_tls_context()),
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        for shard in self._shards:
            await shard.close()

    def set_concurrency(self, limit: int) -> None:
        """Change the requests allowed in flight, now (live tuning); connections are
        added when the limit grows past those open.
        """
        self.limiter.resize(limit)
        while len(self._shards) * self._per_shard < self.limiter.capacity:
            self._shards.append(self._sdk_client(self._per_shard))
            self._load.append(0)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = _retry_after(exc) if exc is not None else None
        if after is not None:
            return min(after, self.endpoint.max_backoff_s)
        return float(self._backoff(state))

    async def _request(self, kind: str, body: dict[str, Any]) -> tuple[Any, int]:
        """The response and the attempts it took. The first attempt runs bare; only a
        retryable failure builds the tenacity loop, which starts from that failure (so
        its waits, Retry-After included, and its attempt numbers are those of one loop
        over every attempt).
        """
        try:
            return await self._attempt(kind, body), 1
        except Exception as e:
            if not _retryable(e) or self.endpoint.max_retries < 1:
                if isinstance(e, openai.OpenAIError | json.JSONDecodeError):
                    raise _describe(e, self.endpoint, 1) from e
                raise
            first: BaseException | None = e
        attempts = 1
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.endpoint.max_retries + 1),
            wait=self._wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first is not None:  # tenacity's attempt 1: the failure seen above
                        failed, first = first, None
                        raise failed
                    attempts += 1
                    response = await self._attempt(kind, body)
        except Exception as e:
            if isinstance(e, openai.OpenAIError | json.JSONDecodeError):
                raise _describe(e, self.endpoint, attempts) from e
            raise
        return response, attempts

    async def _attempt(self, kind: str, body: dict[str, Any]) -> Any:
        """One request on the least loaded connection shard, within the limiter."""
        async with self.limiter:
            load = self._load
            shard = load.index(min(load))
            load[shard] += 1
            try:
                response = await _send(self._shards[shard], kind, body)
            finally:
                load[shard] -= 1
        if isinstance(response, str):  # the SDK returns str for non-JSON bodies
            raise openai.APIResponseValidationError(
                response=httpx2.Response(200, request=httpx2.Request("POST", "/")),
                body=response,
                message=f"response body is not JSON: {response[:80]!r}",
            )
        return response

    def _body(self, sampling: SamplingParams | None, extra: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.endpoint.model}
        if sampling is not None:
            for name in ("temperature", "top_p", "max_tokens", "seed", "stop"):
                value = getattr(sampling, name)
                if value is not None:
                    body[name] = value
            if sampling.n != 1:
                body["n"] = sampling.n
        if self.endpoint.extra_body:
            body["extra_body"] = dict(self.endpoint.extra_body)
        body.update(extra)
        return body

    def _finish(
        self,
        stage: str,
        start: float,
        attempts: int,
        usage: TokenUsage,
        choices: list[Choice],
        raw: dict[str, Any] | None,
        model: str,
    ) -> ChatResult:
        latency = (time.perf_counter() - start) * 1000.0
        cost = self.price.cost(usage.prompt_tokens, usage.completion_tokens) if self.price else 0.0
        self.meter.record(
            stage,
            model=model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            latency_ms=latency,
            cost_usd=cost,
            retries=attempts - 1,
        )
        return ChatResult(model, choices, usage, latency, attempts, cost, None, raw)

    def _failed(
        self, stage: str, start: float, err: EndpointError, raise_on_error: bool
    ) -> ChatResult:
        latency = (time.perf_counter() - start) * 1000.0
        self.meter.record(
            stage,
            model=self.endpoint.model,
            latency_ms=latency,
            retries=max(0, err.attempts - 1),
            error=True,
        )
        if raise_on_error:
            raise err
        info = ErrorInfo(
            kind=err.kind, message=str(err), stage=stage, attempts=err.attempts, status=err.status
        )
        return ChatResult(self.endpoint.model, [], TokenUsage(), latency, err.attempts, error=info)

    def _refused(self, stage: str, start: float, why: str, raise_on_error: bool) -> ChatResult:
        """A call not sent because the run's budget is spent: a transient failure (the
        chunk stays incomplete; a re-run with a larger budget sends it).
        """
        err = EndpointError(f"{stage}: {why}; request not sent", kind="budget", attempts=0)
        if raise_on_error:
            raise err
        info = ErrorInfo(kind="budget", message=str(err), stage=stage, attempts=0)
        latency = (time.perf_counter() - start) * 1000.0
        return ChatResult(self.endpoint.model, [], TokenUsage(), latency, 0, error=info)

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        stage: str = "default",
        sampling: SamplingParams | None = None,
        raise_on_error: bool = True,
        keep_raw: bool = False,
        cache_salt: str = "",
        **extra: Any,
    ) -> ChatResult:
        """One chat completion (``sampling.n`` samples). ``extra`` goes into the body.

        With a call cache on the pool, a request already answered (same body and
        ``cache_salt``) is replayed from the cache instead of being sent.
        """
        body = self._body(sampling, extra)
        if sampling is not None and sampling.logprobs:
            body["logprobs"] = True
            if sampling.top_logprobs is not None:
                body["top_logprobs"] = sampling.top_logprobs
        body["messages"] = list(messages)
        return await self._call("chat", body, stage, raise_on_error, keep_raw, cache_salt)

    async def complete(
        self,
        prompt: str,
        *,
        stage: str = "default",
        sampling: SamplingParams | None = None,
        raise_on_error: bool = True,
        keep_raw: bool = False,
        cache_salt: str = "",
        **extra: Any,
    ) -> ChatResult:
        """One text completion (``/v1/completions``); ``sampling.top_logprobs`` sets
        ``logprobs``. Extras such as ``echo`` or vLLM's ``prompt_logprobs`` (via
        ``extra_body``) pass through; ``keep_raw`` keeps the whole response.
        """
        body = self._body(sampling, extra)
        if sampling is not None and sampling.logprobs:
            body["logprobs"] = sampling.top_logprobs or 1
        body["prompt"] = prompt
        return await self._call("completions", body, stage, raise_on_error, keep_raw, cache_salt)

    async def _call(
        self,
        kind: str,
        body: dict[str, Any],
        stage: str,
        raise_on_error: bool,
        keep_raw: bool,
        cache_salt: str,
    ) -> ChatResult:
        start = time.perf_counter()
        key = None
        if self.cache is not None and not keep_raw:
            key = self.cache.key(kind, self.endpoint.cache_scope, body, salt=cache_salt)
            if (hit := self.cache.get(key)) is not None:
                return self._replay(stage, start, hit)
        if (spent := self.meter.budget_reached()) is not None:
            return self._refused(stage, start, spent, raise_on_error)
        body["extra_headers"] = {"X-Mathmill-Stage": stage}
        try:
            response, attempts = await self._request(kind, body)
        except EndpointError as e:
            return self._failed(stage, start, e, raise_on_error)
        choices = _chat_choices(response) if kind == "chat" else _completion_choices(response)
        usage = _usage(response)
        raw = response.model_dump() if keep_raw else None
        result = self._finish(stage, start, attempts, usage, choices, raw, response.model or "")
        asked = (body.get("extra_body") or {}).get("prompt_logprobs")
        if asked is not None:
            result.prompt_logprobs = _prompt_logprobs(response, int(asked))
        if key is not None and self.cache is not None:
            self.cache.put(key, _to_cached(result))
        return result

    def _replay(self, stage: str, start: float, hit: dict[str, Any]) -> ChatResult:
        choices = [
            Choice(
                c["index"],
                c["text"],
                c["finish_reason"],
                None
                if c["logprobs"] is None
                else [TokenLogprob(t, lp, top) for t, lp, top in c["logprobs"]],
            )
            for c in hit["choices"]
        ]
        usage = TokenUsage(**hit["usage"])
        self.meter.record(stage, model=hit["model"], cached=True)
        latency = (time.perf_counter() - start) * 1000.0
        result = ChatResult(hit["model"], choices, usage, latency, 0, cached=True)
        if (plp := hit.get("prompt_logprobs")) is not None:
            result.prompt_logprobs = [TokenLogprob(t, lp, top, tid) for t, tid, lp, top in plp]
        return result

    async def structured(
        self,
        messages: Sequence[Message],
        schema: type[T],
        *,
        stage: str = "default",
        sampling: SamplingParams | None = None,
        raise_on_error: bool = True,
        **extra: Any,
    ) -> StructuredResult[T]:
        """A chat call whose reply is parsed into ``schema``.

        The request carries the schema in the endpoint's ``structured_mode``. Parsing
        tolerates code fences, surrounding prose and raw newlines; on an invalid reply
        one repair retry shows the model its reply and the error. A reply that still
        fails raises :class:`StructuredOutputError`, or with ``raise_on_error=False``
        comes back with ``value=None`` and ``error`` recorded.
        """
        mode = self.endpoint.structured_mode
        msgs = list(messages)
        if mode == "json_object":
            msgs = [{"role": "system", "content": schema_hint(schema)}, *msgs]
        extra = {"response_format": response_format(schema, mode), **extra}
        result = await self.chat(
            msgs, stage=stage, sampling=sampling, raise_on_error=raise_on_error, **extra
        )
        if not result.ok:
            return StructuredResult(None, "", False, result, result.error)
        try:
            return StructuredResult(parse_reply(result.text, schema), result.text, False, result)
        except ValueError as first:
            repair = [
                *msgs,
                {"role": "assistant", "content": result.text},
                {"role": "user", "content": repair_message(str(first))},
            ]
            second = await self.chat(
                repair,
                stage=stage,
                sampling=sampling,
                raise_on_error=raise_on_error,
                **extra,
            )
            second.add_costs(result)
            if second.ok:
                try:
                    value = parse_reply(second.text, schema)
                    return StructuredResult(value, second.text, True, second)
                except ValueError as e:
                    first = e
            message = f"{stage}: reply does not fit {schema.__name__} after one repair: {first}"
            if raise_on_error:
                raise StructuredOutputError(message, raw=second.text or result.text) from first
            info = ErrorInfo(kind="invalid_json", message=message, stage=stage, attempts=2)
            return StructuredResult(None, second.text or result.text, True, second, info)


# The SDK's per-call options, as mathmill's bodies carry them (``create``'s keywords).
_OPTIONS = {"extra_headers": "headers", "extra_body": "extra_json", "extra_query": "params"}
_SCALARS = (str, int, float, bool, type(None))


def _plain_json(value: Any) -> bool:
    """Whether ``value`` is made of dicts with string keys, lists and scalars only."""
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    return False


async def _send(sdk: openai.AsyncOpenAI, kind: str, body: dict[str, Any]) -> Any:
    """One request, as ``sdk.chat.completions.create(**body)`` (or ``completions``) sends
    it, through the client's public ``post``: the same JSON, headers, auth and parsed
    response, without the typed method's walk of the body against the parameter types
    (~0.3 ms a call, most of the SDK's own CPU; it only drops omitted values, and finds
    no alias or format to apply in these requests). A body of anything but plain JSON
    (a pydantic message, a tuple, a class as ``response_format``) or a streamed one
    goes through the typed method.
    """
    options: Any = {"security": {"bearer_auth": True}}  # the SDK's RequestOptions
    payload: dict[str, Any] = {}
    for key, value in body.items():
        if key in _OPTIONS:
            if value is not None:
                options[_OPTIONS[key]] = value
        else:
            payload[key] = value
    typed = "timeout" in payload or bool(payload.get("stream"))  # the SDK's own handling
    if typed or not _plain_json(payload):
        if kind == "chat":
            return await sdk.chat.completions.create(**body)
        return await sdk.completions.create(**body)
    if kind == "chat":
        return await sdk.post(
            "/chat/completions", cast_to=ChatCompletion, body=payload, options=options
        )
    return await sdk.post("/completions", cast_to=Completion, body=payload, options=options)


def _chat_choices(response: Any) -> list[Choice]:
    choices = []
    for c in response.choices:
        logprobs = None
        if c.logprobs is not None and c.logprobs.content is not None:
            logprobs = [
                TokenLogprob(t.token, t.logprob, {a.token: a.logprob for a in t.top_logprobs})
                for t in c.logprobs.content
            ]
        choices.append(Choice(c.index, c.message.content or "", c.finish_reason, logprobs))
    return choices


def _completion_choices(response: Any) -> list[Choice]:
    choices = []
    for c in response.choices:
        logprobs = None
        lp = c.logprobs
        if lp is not None and lp.tokens is not None and lp.token_logprobs is not None:
            tops = lp.top_logprobs or [{} for _ in lp.tokens]
            logprobs = [
                TokenLogprob(tok, val if val is not None else float("nan"), dict(top or {}))
                for tok, val, top in zip(lp.tokens, lp.token_logprobs, tops, strict=False)
            ]
        choices.append(Choice(c.index, c.text, c.finish_reason, logprobs))
    return choices


def _prompt_logprobs(response: Any, k: int) -> list[TokenLogprob] | None:
    """vLLM's ``prompt_logprobs`` (on the first choice for completions, on the response
    for chat): per prompt position ``None`` or ``{token_id: {logprob, rank,
    decoded_token}}``: the ``k`` most likely tokens and the prompt's own token.
    ``prompt_token_ids`` (asked for with ``return_token_ids``) says which one it is.
    """
    for holder in (*response.choices[:1], response):
        extra = getattr(holder, "model_extra", None) or {}
        positions = extra.get("prompt_logprobs")
        if positions:
            ids = extra.get("prompt_token_ids") or (response.model_extra or {}).get(
                "prompt_token_ids"
            )
            return _parse_prompt_logprobs(positions, ids, k)
    return None


def _parse_prompt_logprobs(
    positions: list[dict[str, dict[str, Any]] | None], ids: list[int] | None, k: int
) -> list[TokenLogprob]:
    out = []
    for i, entry in enumerate(positions):
        if not entry:
            continue
        if ids is not None and str(ids[i]) in entry:
            key = str(ids[i])
        else:  # without ids: the prompt's token is the one outside the top ranks
            key = max(entry, key=lambda k: entry[k].get("rank") or 0)
        chosen = entry[key]
        top = {
            str(v.get("decoded_token", t)): float(v["logprob"])
            for t, v in entry.items()
            if (v.get("rank") or 0) <= k
        }
        out.append(
            TokenLogprob(
                str(chosen.get("decoded_token", "")), float(chosen["logprob"]), top, int(key)
            )
        )
    return out


def _to_cached(result: ChatResult) -> dict[str, Any]:
    return {
        "prompt_logprobs": None
        if result.prompt_logprobs is None
        else [[t.token, t.token_id, t.logprob, t.top] for t in result.prompt_logprobs],
        "model": result.model,
        "usage": result.usage.model_dump(),
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": None
                if c.logprobs is None
                else [[t.token, t.logprob, t.top] for t in c.logprobs],
            }
            for c in result.choices
        ],
    }


def _usage(response: Any) -> TokenUsage:
    u = getattr(response, "usage", None)
    if u is None:
        return TokenUsage()
    return TokenUsage(
        prompt_tokens=u.prompt_tokens or 0, completion_tokens=u.completion_tokens or 0
    )


class LLMPool:
    """Clients by endpoint, sharing one :class:`UsageMeter` for the run.

    Roles that point at the same endpoint (same base URL and key) share one client
    and so one concurrency limit. With a :class:`~mathmill.llm.cache.CallCache`,
    finished calls are stored and replayed instead of being paid for again.
    """

    def __init__(self, meter: UsageMeter | None = None, cache: CallCache | None = None) -> None:
        self.meter = meter or UsageMeter()
        self.cache = cache
        self._clients: dict[str, LLMClient] = {}

    def client(self, endpoint: EndpointConfig) -> LLMClient:
        """The client for ``endpoint`` (created on first use)."""
        key = f"{endpoint.pool_key()}|{endpoint.model}|{endpoint.max_concurrency}"
        if key not in self._clients:
            self._clients[key] = LLMClient(endpoint, self.meter, cache=self.cache)
        return self._clients[key]

    async def aclose(self) -> None:
        """Close every client's connections."""
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def __aenter__(self) -> LLMPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
