"""The sandbox HTTP server (FastAPI), with the Pythonformer REPL server's API.

``mathmill sandbox serve --host 127.0.0.1 --port 8090 [--workers N]`` (or ``--uds
PATH`` for a Unix socket, as in the Docker image with ``--network none``).

| method | path | body | answer |
|---|---|---|---|
| POST | /execute | ``{"code", "timeout_s"?}`` | ExecutionResult |
| POST | /session/create | none | ``{"session_id"}`` |
| POST | /session/{id}/execute | ``{"code", "timeout_s"?}`` | SessionResult |
| GET | /session/{id}/state | | SessionState |
| POST | /session/{id}/reset | | ``{"session_id"}`` |
| DELETE | /session/{id} | | ``{"deleted"}`` |
| GET | /health | | workers, sessions, isolation layers |
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mathmill.records import ExecutionResult
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.local import LocalSandbox
from mathmill.sandbox.protocol import (
    SandboxError,
    SandboxUnavailable,
    SessionNotFound,
    SessionResult,
    SessionState,
)

__all__ = ["ExecuteRequest", "create_app"]


class ExecuteRequest(BaseModel):
    """Body of the execute endpoints."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(max_length=1_000_000)
    timeout_s: float | None = Field(None, gt=0, le=3600)


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

    @app.exception_handler(SessionNotFound)
    async def _not_found(_request: Any, exc: SessionNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(SandboxUnavailable)
    async def _unavailable(_request: Any, exc: SandboxUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(SandboxError)
    async def _failed(_request: Any, exc: SandboxError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    @app.post("/execute")
    async def execute(body: ExecuteRequest) -> ExecutionResult:
        limits = sandbox.limits
        if body.timeout_s is not None:
            limits = Limits.model_validate({**limits.model_dump(), "timeout_s": body.timeout_s})
        return await sandbox.execute(body.code, limits)

    @app.post("/session/create")
    async def create() -> dict[str, str]:
        return {"session_id": await sandbox.create_session()}

    @app.post("/session/{session_id}/execute")
    async def session_execute(session_id: str, body: ExecuteRequest) -> SessionResult:
        return await sandbox.run_in_session(session_id, body.code, body.timeout_s)

    @app.get("/session/{session_id}/state")
    async def state(session_id: str) -> SessionState:
        return await sandbox.session_state(session_id)

    @app.post("/session/{session_id}/reset")
    async def reset(session_id: str) -> dict[str, str]:
        await sandbox.reset_session(session_id)
        return {"session_id": session_id}

    @app.delete("/session/{session_id}")
    async def delete(session_id: str) -> dict[str, str]:
        await sandbox.delete_session(session_id)
        return {"deleted": session_id}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        try:
            return await sandbox.health()
        except SandboxError as e:
            raise HTTPException(503, str(e)) from e

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
