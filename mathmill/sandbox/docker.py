"""The Docker backend: start a container of ``sandbox_image/`` and talk HTTP to it.

The container runs the sandbox server as a non-root user with no network, a
read-only root, tmpfs for /tmp, pids and memory limits and every capability
dropped; the server listens on a Unix socket in a host directory mounted into the
container, so no network is needed to reach it. Needs a Docker engine (none runs on
the project's CI machines: this backend is documented, not exercised there).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

from mathmill.records import ExecutionResult
from mathmill.sandbox.http import HTTPSandbox
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.protocol import SandboxUnavailable, SessionResult, SessionState

__all__ = ["DockerSandbox", "container_options"]

DEFAULT_IMAGE = "mathmill-sandbox:latest"


def container_options(
    socket_dir: str, *, memory_mb: int = 4096, pids: int = 512, workers: int = 2
) -> dict[str, Any]:
    """The ``docker run`` options of the sandbox container (docker SDK keywords)."""
    return {
        "command": [
            "mathmill",
            "sandbox",
            "serve",
            "--uds",
            "/run/mathmill/sandbox.sock",
            "--workers",
            str(workers),
        ],
        "user": "10001:10001",
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=512m"},
        "volumes": {socket_dir: {"bind": "/run/mathmill", "mode": "rw"}},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": pids,
        "mem_limit": f"{memory_mb}m",
        "detach": True,
        "auto_remove": True,
        "environment": {},
    }


class DockerSandbox:
    """A sandbox in a Docker container, reached over a Unix socket."""

    def __init__(
        self, image: str = DEFAULT_IMAGE, *, timeout_s: float = 10.0, **options: Any
    ) -> None:
        self.image = image
        self.options = options
        self.timeout_s = timeout_s
        self.container: Any = None
        self._client: HTTPSandbox | None = None
        self._socket_dir = ""

    async def start(self) -> DockerSandbox:
        """Start the container and wait for the server's /health."""
        try:
            import docker
        except ImportError as e:
            raise SandboxUnavailable(
                "the docker backend needs: pip install 'mathmill[docker]'"
            ) from e
        self._socket_dir = tempfile.mkdtemp(prefix="mathmill-docker-")
        os.chmod(self._socket_dir, 0o777)
        try:
            engine = docker.from_env()
            self.container = await asyncio.to_thread(
                engine.containers.run,
                self.image,
                **container_options(self._socket_dir, **self.options),
            )
        except Exception as e:  # docker.errors.* and connection errors
            raise SandboxUnavailable(f"cannot start {self.image}: {e}") from e
        sock = os.path.join(self._socket_dir, "sandbox.sock")
        self._client = HTTPSandbox(uds=sock, timeout_s=self.timeout_s)
        deadline = time.monotonic() + 120
        while True:
            try:
                await self._client.health()
                return self
            except SandboxUnavailable:
                if time.monotonic() > deadline:
                    await self.close()
                    raise
                await asyncio.sleep(0.5)

    @property
    def client(self) -> HTTPSandbox:
        if self._client is None:
            raise SandboxUnavailable("DockerSandbox.start() was not called")
        return self._client

    async def execute(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        return await self.client.execute(code, limits)

    async def create_session(self) -> str:
        return await self.client.create_session()

    async def run_in_session(
        self, session_id: str, code: str, timeout_s: float | None = None
    ) -> SessionResult:
        return await self.client.run_in_session(session_id, code, timeout_s)

    async def session_state(self, session_id: str) -> SessionState:
        return await self.client.session_state(session_id)

    async def reset_session(self, session_id: str) -> None:
        await self.client.reset_session(session_id)

    async def delete_session(self, session_id: str) -> None:
        await self.client.delete_session(session_id)

    async def health(self) -> dict[str, Any]:
        return await self.client.health()

    async def close(self) -> None:
        """Stop the container (it is removed automatically)."""
        if self._client is not None:
            await self._client.close()
        if self.container is not None:
            await asyncio.to_thread(self.container.stop, timeout=5)
            self.container = None
