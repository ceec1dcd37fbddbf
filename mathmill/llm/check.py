"""``mathmill endpoint check``: one real call, and whether structured output works."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pydantic import BaseModel

from mathmill.errors import EndpointError, EndpointTimeout, MathmillError
from mathmill.llm.client import LLMPool
from mathmill.llm.config import EndpointConfig, StructuredMode
from mathmill.records import SamplingParams

__all__ = ["CheckReport", "check_endpoint"]


class _Sum(BaseModel):
    answer: int


@dataclass
class CheckReport:
    """What the check found."""

    base_url: str
    model: str
    latency_ms: float
    reply: str
    completion_tokens: int
    structured_mode: StructuredMode | None
    structured_detail: str


async def _check(endpoint: EndpointConfig) -> CheckReport:
    async with LLMPool() as pool:
        client = pool.client(endpoint)
        if not endpoint.model:
            try:
                models = await client.openai.models.list()
            except Exception as e:
                raise EndpointError(
                    f"{endpoint.base_url}: no --model given and /models failed: {e}",
                    kind="connection",
                ) from e
            if not models.data:
                raise EndpointError(f"{endpoint.base_url}: serves no models", kind="bad_response")
            endpoint = endpoint.model_copy(update={"model": models.data[0].id})
            client = pool.client(endpoint)
        result = await client.chat(
            [{"role": "user", "content": "Reply with the single word: pong"}],
            stage="check",
            sampling=SamplingParams(temperature=0.0, max_tokens=8),
        )
        other: StructuredMode = (
            "json_object" if endpoint.structured_mode == "json_schema" else "json_schema"
        )
        modes: list[StructuredMode] = [endpoint.structured_mode, other]
        detail = ""
        works: StructuredMode | None = None
        for mode in modes:
            probe = pool.client(endpoint.model_copy(update={"structured_mode": mode}))
            try:
                parsed = await probe.structured(
                    [
                        {
                            "role": "user",
                            "content": 'What is 2+3? Reply as JSON: {"answer": <integer>}',
                        }
                    ],
                    _Sum,
                    stage="check.structured",
                    sampling=SamplingParams(temperature=0.0, max_tokens=32),
                )
            except MathmillError as e:
                detail += f"{mode}: {str(e).splitlines()[0][:160]}; "
                continue
            works = mode
            detail = f"{mode} parsed {parsed.value!r}" + (
                " after a repair" if parsed.repaired else ""
            )
            break
        return CheckReport(
            base_url=endpoint.base_url,
            model=result.model or endpoint.model,
            latency_ms=result.latency_ms,
            reply=result.text.strip()[:60],
            completion_tokens=result.usage.completion_tokens,
            structured_mode=works,
            structured_detail=detail.rstrip("; "),
        )


def check_endpoint(endpoint: EndpointConfig, *, overall_timeout_s: float = 120.0) -> CheckReport:
    """Run the check; raises :class:`EndpointError` with a one-line reason on failure."""
    try:
        return asyncio.run(asyncio.wait_for(_check(endpoint), overall_timeout_s))
    except TimeoutError as e:
        raise EndpointTimeout(
            f"{endpoint.base_url}: the check did not finish within {overall_timeout_s:g}s",
            kind="timeout",
        ) from e
