"""Sandboxed execution of model-written code: one protocol, one result shape.

Backends: :class:`LocalSandbox` (zygote processes on this machine, the default),
:class:`HTTPSandbox` (the ``mathmill sandbox serve`` server), :class:`DockerSandbox`
(the image in ``sandbox_image/``); :class:`SandboxPool` spreads runs over replicas.
Model-written code never runs in the orchestrator's process.
"""

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
