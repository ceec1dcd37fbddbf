"""The sandbox protocol: one result shape for every backend, plus session state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import SandboxError as SandboxError
from mathmill.errors import SandboxUnavailable as SandboxUnavailable
from mathmill.errors import SessionNotFound as SessionNotFound
from mathmill.records import ExecutionResult
from mathmill.sandbox.limits import Limits

__all__ = [
    "ClassInfo",
    "ExecutionResult",
    "FunctionInfo",
    "Sandbox",
    "SandboxError",
    "SandboxUnavailable",
    "SessionNotFound",
    "SessionResult",
    "SessionState",
    "VariableInfo",
    "session",
]


class VariableInfo(BaseModel):
    """A variable of a session: its type and a short repr (or shape)."""

    name: str
    type: str
    repr: str
    len: int | None = Field(None, description="Length of a list, tuple, set or dict.")
    keys: list[str] | None = Field(None, description="A dict's first keys (str, else repr).")
    shape: list[int] | None = Field(None, description="Shape of an array-like (numpy, pandas).")


class FunctionInfo(BaseModel):
    """A function defined in a session, with its signature."""

    name: str
    signature: str


class ClassInfo(BaseModel):
    """A class defined in a session, with its methods."""

    name: str
    methods: list[str] = Field(default_factory=list)


class SessionState(BaseModel):
    """What a session holds, built inside the sandbox (repr runs user code there)."""

    imports: list[str] = Field(default_factory=list)
    variables: list[VariableInfo] = Field(default_factory=list)
    functions: list[FunctionInfo] = Field(default_factory=list)
    classes: list[ClassInfo] = Field(default_factory=list)
    summary: str = Field("(empty)", description="One line, e.g. 'imports: sympy | vars: x=...'.")


class SessionResult(ExecutionResult):
    """A session turn's result: the execution result plus the state after the turn
    (the pre-turn state when the turn was discarded).
    """

    model_config = ConfigDict(extra="forbid")

    session_id: str
    state: SessionState | None = None
    kept: bool = Field(False, description="Whether the turn's process became the session.")


@runtime_checkable
class Sandbox(Protocol):
    """What every backend (local, HTTP, Docker) offers."""

    async def execute(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        """Run ``code`` once, statelessly."""
        ...

    async def create_session(self) -> str:
        """Start a stateful session; returns its id."""
        ...

    async def run_in_session(
        self, session_id: str, code: str, timeout_s: float | None = None
    ) -> SessionResult:
        """Run one turn in a session."""
        ...

    async def session_state(self, session_id: str) -> SessionState:
        """The session's current state."""
        ...

    async def reset_session(self, session_id: str) -> None:
        """Forget the session's state (same id)."""
        ...

    async def delete_session(self, session_id: str) -> None:
        """End the session and free its resources."""
        ...

    async def health(self) -> dict[str, Any]:
        """Liveness and the isolation layers in force."""
        ...

    async def close(self) -> None:
        """Stop the backend."""
        ...


@contextlib.asynccontextmanager
async def session(sandbox: Sandbox) -> AsyncIterator[str]:
    """A session that is always deleted, also when the block fails."""
    sid = await sandbox.create_session()
    try:
        yield sid
    finally:
        with contextlib.suppress(SandboxError):
            await sandbox.delete_session(sid)
