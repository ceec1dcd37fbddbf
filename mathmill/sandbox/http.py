"""A client backend for the sandbox HTTP server (TCP or a Unix socket).

It asks for mathmill's own answer shape (header ``X-Mathmill-Shape: native``) and
validates the answers as :class:`ExecutionResult`, :class:`SessionResult` and
:class:`SessionState`; without the header the server adds the Pythonformer fields
(:mod:`mathmill.sandbox.pythonformer`).
"""

from __future__ import annotations

from typing import Any

import httpx

from mathmill.records import ExecutionResult
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.protocol import (
    SandboxError,
    SandboxUnavailable,
    SessionNotFound,
    SessionResult,
    SessionState,
)
from mathmill.sandbox.pythonformer import NATIVE, SHAPE_HEADER

__all__ = ["HTTPSandbox"]


class HTTPSandbox:
    """Talks to ``mathmill sandbox serve`` (or the Docker image).

    Args:
        base_url: e.g. ``http://127.0.0.1:8090``; with ``uds`` the host part is ignored.
        uds: path of a Unix socket to connect through (``--network none`` containers).
        timeout_s: default execution timeout sent with each request.
    """

    def __init__(
        self, base_url: str = "http://sandbox", *, uds: str | None = None, timeout_s: float = 10.0
    ) -> None:
        transport = httpx.AsyncHTTPTransport(uds=uds) if uds else None
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout_s + 60),
            headers={SHAPE_HEADER: NATIVE},
        )

    async def __aenter__(self) -> HTTPSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP connections (the server keeps running)."""
        await self._client.aclose()

    async def _call(self, method: str, path: str, json: Any = None, wait_s: float = 60) -> Any:
        try:
            response = await self._client.request(method, path, json=json, timeout=wait_s)
        except httpx.HTTPError as e:
            raise SandboxUnavailable(f"sandbox server {self._client.base_url}: {e!r}") from e
        if response.status_code == 404:
            raise SessionNotFound(response.json().get("detail", path))
        if response.status_code == 503:
            raise SandboxUnavailable(response.json().get("detail", "unavailable"))
        if response.status_code >= 400:
            raise SandboxError(
                f"sandbox server: HTTP {response.status_code}: {response.text[:300]}"
            )
        return response.json()

    async def execute(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        """Run ``code`` once on the server (only ``timeout_s`` of ``limits`` is sent)."""
        timeout = limits.timeout_s if limits else self.timeout_s
        data = await self._call(
            "POST", "/execute", {"code": code, "timeout_s": timeout}, timeout + 60
        )
        return ExecutionResult.model_validate(data)

    async def create_session(self) -> str:
        """Start a session on the server."""
        return str((await self._call("POST", "/session/create"))["session_id"])

    async def run_in_session(
        self, session_id: str, code: str, timeout_s: float | None = None
    ) -> SessionResult:
        """Run one turn in a session."""
        timeout = timeout_s or self.timeout_s
        data = await self._call(
            "POST",
            f"/session/{session_id}/execute",
            {"code": code, "timeout_s": timeout},
            timeout + 60,
        )
        return SessionResult.model_validate(data)

    async def session_state(self, session_id: str) -> SessionState:
        """The session's state."""
        return SessionState.model_validate(await self._call("GET", f"/session/{session_id}/state"))

    async def reset_session(self, session_id: str) -> None:
        """Forget the session's state."""
        await self._call("POST", f"/session/{session_id}/reset")

    async def delete_session(self, session_id: str) -> None:
        """End the session."""
        await self._call("DELETE", f"/session/{session_id}")

    async def health(self) -> dict[str, Any]:
        """The server's health and isolation layers."""
        data: dict[str, Any] = await self._call("GET", "/health")
        return data
