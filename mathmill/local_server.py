"""``mathmill server up``: a local Prefect server on SQLite or PostgreSQL, ready to run
mathmill.

It starts ``prefect server start`` in the background (tuned as measured in FACTS.md:
task-run recorder batches, analytics off) on its database
(:class:`mathmill.local_server_database.Database`: the SQLite file in its home by default, or
a ``postgresql+asyncpg://`` URL checked before the start, its password never printed),
waits for ``/api/health``, creates the
``cpu``, ``vllm`` and ``gpu`` process work pools, registers the block types and deploys
``deployments/prefect.yaml``. Each step is skipped when already done, so ``up`` is
safe to repeat; ``down`` stops a server ``up`` started.

``mathmill run`` uses the same server (:func:`ensure_local_server`): started in the
background by the first run that needs one, reused by the later ones, so local runs
keep their history in the UI and pay no temporary server each.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mathmill.errors import ServerError as ServerError

if TYPE_CHECKING:  # pydantic stays out of `mathmill --help`
    from mathmill.local_server_database import Database

__all__ = [
    "POOLS",
    "ServerHome",
    "create_pools",
    "default_home",
    "default_port",
    "deploy",
    "ensure_local_server",
    "server_env",
    "start_server",
    "stop_server",
    "wait_healthy",
]

POOLS = {
    "cpu": "CPU flows: synthesize, tir, refresh",
    "vllm": "GPU flows on vLLM",
    "gpu": "GPU training (train)",
}
TUNING = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
}


@dataclass(frozen=True)
class ServerHome:
    """Where a local server keeps its database, log and pid file."""

    root: Path

    @property
    def pid_file(self) -> Path:
        """The running server's process id."""
        return self.root / "server.pid"

    @property
    def log_file(self) -> Path:
        """The server's output."""
        return self.root / "server.log"

    @property
    def database(self) -> Path:
        """The SQLite database (the default)."""
        return self.root / "prefect.db"

    @property
    def database_record(self) -> Path:
        """The database the server last started on, its password masked."""
        return self.root / "database.txt"

    def recorded_database(self) -> str | None:
        """What :attr:`database_record` says, if anything."""
        try:
            return self.database_record.read_text().strip() or None
        except OSError:
            return None


def default_home() -> ServerHome:
    """The local server's directory: ``$MATHMILL_SERVER_HOME`` or ``~/.mathmill/server``."""
    root = os.environ.get("MATHMILL_SERVER_HOME") or "~/.mathmill/server"
    return ServerHome(Path(root).expanduser())


def default_port() -> int:
    """The local server's port: ``$MATHMILL_SERVER_PORT`` or 4200 (Prefect's)."""
    value = os.environ.get("MATHMILL_SERVER_PORT") or "4200"
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ServerError(f"MATHMILL_SERVER_PORT: expected a port number, not {value!r}")
    return port


def api_url(host: str, port: int) -> str:
    """The API URL of a server on ``host:port``."""
    return f"http://{host}:{port}/api"


def server_env(
    home: ServerHome,
    ui_api_url: str,
    base: dict[str, str] | None = None,
    database: Database | None = None,
) -> dict[str, str]:
    """The environment of ``prefect server start``: its own PREFECT_HOME and database
    (``database``, default the SQLite file in ``home``), the address the UI calls, the
    tuning settings (unless already set), and no API URL of another server.
    """
    env = dict(os.environ if base is None else base)
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_UI_API_URL", ui_api_url)
    env["PREFECT_HOME"] = str(home.root)
    if database is None:
        from mathmill.local_server_database import resolve_database

        database = resolve_database("sqlite", home)
    # the newer name would win over the older one: only one is set
    env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = database.url.get_secret_value()
    for key, value in TUNING.items():
        env.setdefault(key, value)
    return env


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a Prefect API answers at ``url``. A plain ``http://`` URL is asked
    without loading the CA bundle (~20 ms of every run, for no TLS; redirects are not
    followed, so none can lead to https).
    """
    import httpx

    verify = not url.startswith("http://")
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(
    url: str, process: subprocess.Popen[bytes] | None, log: Path, timeout_s: float = 120.0
) -> None:
    """Wait until the API answers; raise with the log's tail if the server exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(url):
            return
        if process is not None and process.poll() is not None:
            raise ServerError(
                f"prefect server exited with code {process.returncode}; log {log}:\n{_tail(log)}"
            )
        time.sleep(0.5)
    raise ServerError(f"prefect server did not answer at {url} within {timeout_s:.0f}s; log {log}")


def start_server(
    home: ServerHome,
    host: str,
    port: int,
    timeout_s: float = 120.0,
    ui_api_url: str | None = None,
    database: Database | None = None,
) -> str:
    """Start the server in the background unless one answers already; its API URL.
    ``ui_api_url`` is the API address browsers use (default: this host and port).
    ``database``: default ``$MATHMILL_SERVER_DATABASE``, else SQLite in ``home``; a
    PostgreSQL database is checked (one connection) before the server starts.
    """
    url = api_url(host, port)
    if healthy(url):
        return url
    from mathmill.local_server_database import resolve_database

    db = database or resolve_database(None, home)
    db.check()
    home.root.mkdir(parents=True, exist_ok=True)
    home.database_record.write_text(db.masked + "\n")
    log = home.log_file.open("ab")
    # Prefect's CLI, with the server's SQLite transactions taking turns instead of
    # failing on each other under load (see mathmill.prefect_server)
    launcher = "mathmill.prefect_server"
    cmd = [sys.executable, "-m", launcher, "server", "start", "--host", host, "--port", str(port)]
    process = subprocess.Popen(
        cmd,
        env=server_env(
            home,
            ui_api_url or api_url("127.0.0.1" if host == "0.0.0.0" else host, port),
            database=db,
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives this command; `mathmill server down` stops it
    )
    log.close()
    home.pid_file.write_text(str(process.pid))
    try:
        wait_healthy(url, process, home.log_file, timeout_s)
    except ServerError as e:  # the log's tail may quote the URL
        raise ServerError(db.mask(str(e))) from None
    return url


def ensure_local_server(
    home: ServerHome, host: str, port: int, timeout_s: float = 120.0
) -> tuple[str, bool]:
    """The API URL of the server on ``host:port``, started from ``home`` unless one
    answers already; and whether this call started it. Runs starting at once take
    turns (a lock file in ``home``), so one server starts, not several.
    """
    url = api_url(host, port)
    if healthy(url):
        return url, False
    home.root.mkdir(parents=True, exist_ok=True)
    # The lock goes with the file's closing (the server, started with close_fds, does
    # not inherit it).
    with (home.root / "start.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if healthy(url):  # another run started it while this one waited
            return url, False
        try:
            start_server(home, host, port, timeout_s)
        except ServerError as e:
            raise ServerError(
                f"{e}\n(a local Prefect server is started for runs when PREFECT_API_URL is "
                "unset: set MATHMILL_SERVER_PORT to another port, PREFECT_API_URL to a "
                "server, or use --prefect-server ephemeral)"
            ) from e
        return url, True


def stop_server(home: ServerHome, timeout_s: float = 20.0) -> bool:
    """Stop the server ``start_server`` started from ``home``; False when none ran."""
    try:
        pid = int(home.pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        home.pid_file.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    home.pid_file.unlink(missing_ok=True)
    return True


async def create_pools(names: dict[str, str] | None = None) -> list[str]:
    """Create the process work pools that do not exist yet; the names created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        for name, description in (names or POOLS).items():
            try:
                await client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    description=description,
                    base_job_template=template,
                )
            )
            created.append(name)
    return created


CRASH_AUTOMATION = "mathmill: mark unresponsive flow runs crashed"
# A deployment's flow run sends a heartbeat event every HEARTBEAT_S (deployments/prefect.yaml
# sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY for both pools; Prefect's minimum is 30 s). A run
# whose process died (its worker or machine killed) sends no more: after UNRESPONSIVE_S
# without a heartbeat or an end, the automation marks it Crashed.
HEARTBEAT_S = 30
# Long enough that a live run is not taken for dead (its heartbeats come from a thread
# of their own; a server down for a while also misses them), short enough to act on.
UNRESPONSIVE_S = 300


async def ensure_crash_automation(within_s: float = UNRESPONSIVE_S) -> str:
    """Create :data:`CRASH_AUTOMATION` (Prefect's documented zombie-run detection: a
    proactive trigger on the heartbeat events of each flow run, which changes the run's
    state to Crashed) with the window ``within_s``; ``created``, ``kept`` (it exists
    with that window) or ``replaced`` (it had another).
    """
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    async with get_client() as client:
        outcome = "created"
        for existing in await client.read_automations_by_name(CRASH_AUTOMATION):
            window = getattr(existing.trigger, "within", None)
            if window is not None and window.total_seconds() == within_s:
                return "kept"
            await client.delete_automation(existing.id)
            outcome = "replaced"
        trigger = EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        )
        action = ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {within_s:g} s: its process died (worker or machine "
            "killed); a new run with the same parameters resumes from its finished chunks",
        )
        await client.create_automation(
            AutomationCore(
                name=CRASH_AUTOMATION,
                description="Created by `mathmill server up` (docs/deploy.md).",
                trigger=trigger,
                actions=[action],
            )
        )
    return outcome


def deploy(prefect_file: Path, url: str, timeout_s: float = 300.0) -> str:
    """``prefect deploy --all`` of ``prefect_file`` against ``url``; its output."""
    if not prefect_file.is_file():
        raise ServerError(f"no deployment file at {prefect_file}")
    env = dict(os.environ, PREFECT_API_URL=url)
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        str(prefect_file),
    ]
    done = subprocess.run(
        cmd,
        env=env,
        cwd=prefect_file.resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise ServerError(f"prefect deploy failed (exit {done.returncode}):\n{tail}")
    return done.stdout
