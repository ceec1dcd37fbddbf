"""Flow runs of a deployment, started and waited for: how a run hands chunks to workers
on a work pool (the ``chunks`` deployment on the ``cpu`` pool, the ``generate``
deployment on the ``vllm`` pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from mathmill.errors import ConfigError, FlowRunFailed

__all__ = ["require_server", "run_and_wait"]

log = logging.getLogger("mathmill.pipeline")


def require_server(what: str, pool: str) -> None:
    """Fail with the fix when no Prefect server (and so no worker) can be reached."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError(
            f"{what} needs a Prefect server with workers on the {pool} pool: run "
            "`mathmill server up` and export the PREFECT_API_URL it prints"
        )


async def run_and_wait(
    deployment: str,
    parameters: dict[str, Any],
    *,
    kind: str,
    pool: str,
    run_timeout_s: float | None = None,
    warn_after_s: float = 60.0,
) -> str:
    """Start one flow run of ``deployment`` and wait for it; its id. Raises
    :class:`FlowRunFailed` (naming the flow run, its state and message; its id for what
    it recorded) unless it completes, and :class:`ConfigError` when the deployment does
    not exist. A run no worker picks up gets a warning after ``warn_after_s``; a run
    past ``run_timeout_s``, or one whose caller is cancelled, is cancelled too.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import arun_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = await arun_deployment(
            deployment, parameters=parameters, timeout=0, tags=["mathmill", kind]
        )
    except ObjectNotFound as e:
        raise ConfigError(
            f"no deployment {deployment!r} on the Prefect server: `mathmill server up` "
            "deploys it, or set the deployment option"
        ) from e
    what = f"{kind} flow run {run.name!r} ({run.id})"
    started = time.monotonic()
    warned = False
    async with get_client() as client:
        while True:
            state = (await client.read_flow_run(run.id)).state
            if state is not None and state.is_final():
                break
            waited = time.monotonic() - started
            if not warned and waited > warn_after_s and state and state.is_scheduled():
                warned = True
                log.warning(
                    "%s: no worker has picked it up after %.0fs; is one running? "
                    "`prefect worker start --pool %s --type process`",
                    what,
                    waited,
                    pool,
                )
            if run_timeout_s is not None and waited > run_timeout_s:
                await _cancel(client, run.id)
                raise FlowRunFailed(
                    f"{what} not finished after {run_timeout_s:g}s "
                    f"(state {state.name if state else 'unknown'}; cancelled); chunks it "
                    "finished are kept, re-run to resume",
                    flow_run_id=str(run.id),
                )
            try:
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:  # this run stops: so does the one it started
                with contextlib.suppress(Exception):
                    await asyncio.shield(_cancel(client, run.id))
                raise
    if not state.is_completed():
        raise FlowRunFailed(
            f"{what} ended {state.name}: {state.message or ''}; chunks it finished are kept, "
            "re-run to resume",
            flow_run_id=str(run.id),
        )
    return str(run.id)


async def _cancel(client: Any, flow_run_id: Any) -> None:
    """Ask a flow run to stop (its worker cancels it), so no chunk runs twice at once."""
    from prefect.states import Cancelling

    with contextlib.suppress(Exception):  # already ended, or the server is gone
        await client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
