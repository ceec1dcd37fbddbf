"""The sandbox HTTP server (FastAPI), with the Pythonformer REPL server's API.

``mathmill sandbox serve --host 127.0.0.1 --port 8090 [--workers N]`` (or ``--uds
PATH`` for a Unix socket, as in the Docker image with ``--network none``).

| method | path | body | answer |
|---|---|---|---|
| POST | /execute | ``{"code", "timeout_s"?}`` | ExecutionResult |
| POST | /session/create | any (ignored) | ``{"session_id"}`` |
| POST | /session/{id}/execute | ``{"code", "timeout_s"?}`` | SessionResult |
| GET | /session/{id}/state | | SessionState |
| POST | /session/{id}/reset | | ``{"session_id"}`` |
| DELETE | /session/{id} | | ``{"deleted"}`` |
| GET | /health | | workers, sessions, isolation layers |

``timeout`` is accepted for ``timeout_s`` (Pythonformer's name). The answers above are
sent as they are to requests with the header ``X-Mathmill-Shape: native`` (what
:class:`~mathmill.sandbox.http.HTTPSandbox` sends); any other request gets them with the
Pythonformer REPL server's fields added (``success``, ``output``, ``error``,
``state``, ``state_formatted``, ...), so that unmodified Pythonformer clients work; see
:mod:`mathmill.sandbox.pythonformer` for the mapping.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mathmill.sandbox import pythonformer as pf
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.local import LocalSandbox
from mathmill.sandbox.protocol import (
    SandboxError,
    SandboxUnavailable,
    SessionNotFound,
)

__all__ = ["ExecuteRequest", "create_app"]


class ExecuteRequest(BaseModel):
    """Body of the execute endpoints."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(max_length=1_000_000)
    timeout_s: float | None = Field(None, gt=0, le=3600)
    timeout: float | None = Field(None, gt=0, le=3600, description="Same as timeout_s.")

    @property
    def limit_s(self) -> float | None:
        """The timeout asked for (``timeout_s`` before ``timeout``), if any."""
        return self.timeout_s or self.timeout


def _native(
    x_mathmill_shape: Annotated[str | None, Header(alias=pf.SHAPE_HEADER)] = None,
) -> bool:
    return pf.wants_native(x_mathmill_shape)


Native = Annotated[bool, Depends(_native)]


def create_app(sandbox: LocalSandbox) -> FastAPI:
    """The FastAPI app over a local sandbox (started and closed with the app)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await sandbox.start()
        try:
            yield
        finally:
            await sandbox.close()

    app = FastAPI(title="mathmill sandbox", lifespan=lifespan)

    def _error(request: Request, message: str, status: int) -> JSONResponse:
        native = pf.wants_native(request.headers.get(pf.SHAPE_HEADER))
        return JSONResponse(pf.error_answer(message, native), status_code=status)

    @app.exception_handler(SessionNotFound)
    async def _not_found(request: Request, exc: SessionNotFound) -> JSONResponse:
        return _error(request, str(exc), 404)

    @app.exception_handler(SandboxUnavailable)
    async def _unavailable(request: Request, exc: SandboxUnavailable) -> JSONResponse:
        return _error(request, str(exc), 503)

    @app.exception_handler(SandboxError)
    async def _failed(request: Request, exc: SandboxError) -> JSONResponse:
        return _error(request, str(exc), 500)

    @app.post("/execute")
    async def execute(body: ExecuteRequest, native: Native) -> dict[str, Any]:
        limits = sandbox.limits
        if body.limit_s is not None:
            limits = Limits.model_validate({**limits.model_dump(), "timeout_s": body.limit_s})
        result = await sandbox.execute(body.code, limits)
        if native:
            return result.model_dump(mode="json")
        return pf.execute_answer(result, limits.timeout_s)

    @app.post("/session/create")
    async def create() -> dict[str, str]:
        return {"session_id": await sandbox.create_session()}

    @app.post("/session/{session_id}/execute")
    async def session_execute(
        session_id: str, body: ExecuteRequest, native: Native
    ) -> dict[str, Any]:
        result = await sandbox.run_in_session(session_id, body.code, body.limit_s)
        if native:
            return result.model_dump(mode="json")
        return pf.session_execute_answer(result, body.limit_s or sandbox.limits.timeout_s)

    @app.get("/session/{session_id}/state")
    async def state(session_id: str, native: Native) -> dict[str, Any]:
        found = await sandbox.session_state(session_id)
        return found.model_dump(mode="json") if native else pf.state_answer(session_id, found)

    @app.post("/session/{session_id}/reset")
    async def reset(session_id: str) -> dict[str, str]:
        await sandbox.reset_session(session_id)
        return {"session_id": session_id}

    @app.delete("/session/{session_id}")
    async def delete(session_id: str) -> dict[str, str]:
        await sandbox.delete_session(session_id)
        return {"deleted": session_id}

    @app.get("/health")
    async def health(native: Native) -> dict[str, Any]:
        try:
            found = await sandbox.health()
        except SandboxError as e:
            raise HTTPException(503, str(e)) from e
        return found if native else pf.health_answer(found)

    return app


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8090,
    uds: str | None = None,
    workers: int | None = None,
    limits: Limits | None = None,
    allow_unsafe: bool = False,
) -> None:
    """Run the server until interrupted (one process; ``workers`` zygotes)."""
    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sandbox = LocalSandbox(workers=workers, limits=limits, allow_unsafe=allow_unsafe)
    uvicorn.run(create_app(sandbox), host=host, port=port, uds=uds, log_level="info")
