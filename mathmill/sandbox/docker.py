"""The Docker backend: start a container of ``sandbox_image/`` and talk HTTP to it.

The container runs the sandbox server as uid 10001 with no network, a read-only
root, tmpfs for /tmp, pids and memory limits, every capability dropped and
``no-new-privileges``; the server listens on a Unix socket in a host directory
mounted into the container, so no network is needed to reach it.

Inside the container the server still isolates each job (user/pid/mount/network
namespaces, a private /proc, a tmpfs, Landlock, rlimits). Docker's default seccomp
profile forbids the namespaces, and its masked /proc paths forbid mounting a fresh
/proc, so the container runs with mathmill's own seccomp profile
(``mathmill/sandbox/seccomp.json``: everything allowed except kernel modules,
keyrings, BPF, ptrace, io_uring, the new mount API, clock and reboot calls...) and
``systempaths=unconfined``. Build the image with ``scripts/build_sandbox_image.sh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from importlib import resources
from typing import Any

from mathmill import __version__
from mathmill.records import ExecutionResult
from mathmill.sandbox.http import HTTPSandbox
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.protocol import SandboxUnavailable, SessionResult, SessionState

__all__ = [
    "DEFAULT_IMAGE",
    "DockerSandbox",
    "container_options",
    "create_container",
    "reap_orphans",
    "seccomp_profile",
]

logger = logging.getLogger("mathmill.sandbox")
DEFAULT_IMAGE = f"mathmill-sandbox:{__version__}"
SOCKET = "/run/mathmill/sandbox.sock"


def seccomp_profile() -> str:
    """The container's seccomp profile (JSON text, as the Docker API takes it)."""
    return resources.files("mathmill.sandbox").joinpath("seccomp.json").read_text()


def container_options(
    socket_dir: str,
    *,
    memory_mb: int = 4096,
    pids: int = 512,
    workers: int = 2,
    job_timeout_s: float = 10.0,
    job_memory_mb: int = 1024,
    cpus: float | None = None,
) -> dict[str, Any]:
    """The ``docker run`` options of the sandbox container (docker SDK keywords).

    ``memory_mb``/``pids``/``cpus`` bound the whole container; ``job_timeout_s`` and
    ``job_memory_mb`` are the server's default limits per execution.
    """
    host: dict[str, Any] = {
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=512m"},
        "binds": {socket_dir: {"bind": os.path.dirname(SOCKET), "mode": "rw"}},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges", f"seccomp={seccomp_profile()}"],
        "pids_limit": pids,
        "mem_limit": f"{memory_mb}m",
        "memswap_limit": f"{memory_mb}m",
    }
    if cpus is not None:
        host["nano_cpus"] = int(cpus * 1e9)
    return {
        "command": [
            "mathmill",
            "sandbox",
            "serve",
            "--uds",
            SOCKET,
            "--workers",
            str(workers),
            "--timeout",
            str(job_timeout_s),
            "--memory-mb",
            str(job_memory_mb),
        ],
        "user": "10001:10001",
        "environment": {},
        "labels": {"mathmill.sandbox": "1", "mathmill.owner": owner()},
        "host_config": host,
    }


def owner() -> str:
    """This process, as the containers it starts are labelled (``host:pid``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def reap_orphans(engine: Any) -> list[str]:
    """Remove the sandbox containers whose owner process on this host is gone (an
    orchestrator killed with SIGKILL cannot stop its containers). Returns their ids.
    """
    host = socket.gethostname()
    removed = []
    for container in engine.containers.list(all=True, filters={"label": "mathmill.sandbox"}):
        owner_host, _, pid = container.labels.get("mathmill.owner", "").rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(Exception):  # removed meanwhile by another process
            container.remove(force=True)
            removed.append(container.short_id)
    if removed:
        logger.warning("removed %d orphaned sandbox container(s): %s", len(removed), removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_container(engine: Any, image: str, options: dict[str, Any]) -> Any:
    """Create and start the container with the low-level API (``options`` from
    :func:`container_options`), unmasking /proc's system paths as ``docker run
    --security-opt systempaths=unconfined`` does (the SDK's high-level ``run`` has no
    such option): the jobs inside mount their own /proc, which the kernel refuses
    while parts of the container's /proc are masked. Returns the docker SDK container.
    """
    api = engine.api
    host_config = api.create_host_config(**options["host_config"])
    host_config["MaskedPaths"] = []
    host_config["ReadonlyPaths"] = []
    created = api.create_container(
        image,
        command=options["command"],
        user=options["user"],
        environment=options["environment"],
        labels=options["labels"],
        host_config=host_config,
    )
    try:
        api.start(created["Id"])
    except Exception:
        api.remove_container(created["Id"], force=True)
        raise
    return engine.containers.get(created["Id"])


class DockerSandbox:
    """A sandbox in a Docker container, reached over a Unix socket.

    Args:
        image: the sandbox image (``scripts/build_sandbox_image.sh`` builds
            ``mathmill-sandbox:<version>``).
        timeout_s: default execution timeout.
        start_timeout_s: how long to wait for the server's ``/health``.
        **options: :func:`container_options` keywords (``memory_mb``, ``pids``,
            ``workers``, ``job_memory_mb``, ``cpus``).
    """

    def __init__(
        self,
        image: str = DEFAULT_IMAGE,
        *,
        timeout_s: float = 10.0,
        start_timeout_s: float = 120.0,
        **options: Any,
    ) -> None:
        self.image = image
        self.options = options
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.container: Any = None
        self._client: HTTPSandbox | None = None
        self._socket_dir = ""

    async def __aenter__(self) -> DockerSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> DockerSandbox:
        """Start the container and wait until its server answers ``/health`` (once: a
        started sandbox is returned as it is).
        """
        if self.container is not None:
            return self
        try:
            import docker
        except ImportError as e:
            raise SandboxUnavailable(
                "the docker backend needs: pip install 'mathmill[docker]'"
            ) from e
        self._socket_dir = tempfile.mkdtemp(prefix="mathmill-docker-")
        os.chmod(self._socket_dir, 0o777)  # the server inside runs as uid 10001
        options = container_options(self._socket_dir, job_timeout_s=self.timeout_s, **self.options)
        try:
            engine = docker.from_env()
            await asyncio.to_thread(reap_orphans, engine)
            self.container = await asyncio.to_thread(create_container, engine, self.image, options)
        except Exception as e:  # docker.errors.* and connection errors
            self._remove_socket_dir()
            raise SandboxUnavailable(f"cannot start {self.image}: {e}") from e
        self._client = HTTPSandbox(uds=self.socket_path, timeout_s=self.timeout_s)
        await self._wait_healthy()
        return self

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                await self.client.health()
                return
            except SandboxUnavailable as e:
                why = await asyncio.to_thread(self._exited)
                if why or time.monotonic() > deadline:
                    logs = await asyncio.to_thread(self._logs)
                    await self.close()
                    raise SandboxUnavailable(
                        f"sandbox container of {self.image} "
                        f"{why or 'did not answer /health in time'}; last log lines:\n{logs}"
                    ) from e
                await asyncio.sleep(0.2)

    def _exited(self) -> str:
        self.container.reload()
        if self.container.status in ("exited", "dead"):
            code = self.container.attrs.get("State", {}).get("ExitCode")
            return f"exited with code {code}"
        return ""

    def _logs(self) -> str:
        try:
            text = self.container.logs(tail=20).decode(errors="replace")
        except Exception as e:  # the container may be gone already
            return f"(no logs: {e})"
        return str(text)

    @property
    def socket_path(self) -> str:
        """The host path of the server's Unix socket (for other HTTP clients)."""
        if not self._socket_dir:
            raise SandboxUnavailable("DockerSandbox.start() was not called")
        return os.path.join(self._socket_dir, "sandbox.sock")

    @property
    def client(self) -> HTTPSandbox:
        """The HTTP client of the server inside the container."""
        if self._client is None:
            raise SandboxUnavailable("DockerSandbox.start() was not called")
        return self._client

    async def execute(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        """Run ``code`` once in the container's sandbox."""
        result = await self.client.execute(code, limits)
        return result.model_copy(update={"backend": "docker"})

    async def create_session(self) -> str:
        """Start a session in the container."""
        return await self.client.create_session()

    async def run_in_session(
        self, session_id: str, code: str, timeout_s: float | None = None
    ) -> SessionResult:
        """Run one turn of a session in the container."""
        result = await self.client.run_in_session(session_id, code, timeout_s)
        return result.model_copy(update={"backend": "docker"})

    async def session_state(self, session_id: str) -> SessionState:
        """A session's state."""
        return await self.client.session_state(session_id)

    async def reset_session(self, session_id: str) -> None:
        """Forget a session's state."""
        await self.client.reset_session(session_id)

    async def delete_session(self, session_id: str) -> None:
        """End a session."""
        await self.client.delete_session(session_id)

    async def health(self) -> dict[str, Any]:
        """The server's health and isolation layers, with the container's id."""
        data = await self.client.health()
        return {**data, "backend": "docker", "container": self.container.short_id}

    async def close(self) -> None:
        """Stop and remove the container (idempotent)."""
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self.container is not None:
            container, self.container = self.container, None
            with contextlib.suppress(Exception):  # already gone
                await asyncio.to_thread(container.stop, timeout=5)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(container.remove, force=True)
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = ""
