"""Sandboxed execution of model-written code: one protocol, one result shape.

Backends: :class:`LocalSandbox` (zygote processes on this machine, the default),
:class:`HTTPSandbox` (the ``mathmill sandbox serve`` server), :class:`DockerSandbox`
(the image in ``sandbox_image/``); :class:`SandboxPool` spreads runs over replicas.
Model-written code never runs in the orchestrator's process.

The names below are imported on first use: the zygote process imports
``mathmill.sandbox.zygote`` only, and every module it does not load (the HTTP client,
asyncio, the records) is memory that each job's clone would copy for nothing.
"""

from typing import TYPE_CHECKING

from mathmill._lazy import lazy_getattr

if TYPE_CHECKING:
    from mathmill.records import ExecutionResult
    from mathmill.sandbox.http import HTTPSandbox
    from mathmill.sandbox.limits import Limits
    from mathmill.sandbox.local import LocalSandbox
    from mathmill.sandbox.pool import SandboxPool
    from mathmill.sandbox.protocol import (
        Sandbox,
        SandboxError,
        SandboxUnavailable,
        SessionNotFound,
        SessionResult,
        SessionState,
        session,
    )

__all__ = [
    "ExecutionResult",
    "HTTPSandbox",
    "Limits",
    "LocalSandbox",
    "Sandbox",
    "SandboxError",
    "SandboxPool",
    "SandboxUnavailable",
    "SessionNotFound",
    "SessionResult",
    "SessionState",
    "session",
]

__getattr__ = lazy_getattr(
    __name__,
    {
        "ExecutionResult": "mathmill.records",
        "HTTPSandbox": "mathmill.sandbox.http",
        "Limits": "mathmill.sandbox.limits",
        "LocalSandbox": "mathmill.sandbox.local",
        "SandboxPool": "mathmill.sandbox.pool",
        **dict.fromkeys(
            (
                "Sandbox",
                "SandboxError",
                "SandboxUnavailable",
                "SessionNotFound",
                "SessionResult",
                "SessionState",
                "session",
            ),
            "mathmill.sandbox.protocol",
        ),
    },
)
