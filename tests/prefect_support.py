"""Reading what a flow run left on the Prefect server (tests only)."""

from __future__ import annotations

import asyncio
from typing import Any


def artifacts(flow_run_id: Any, key: str) -> list[Any]:
    """The artifacts with ``key`` of flow run ``flow_run_id`` on the current server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    async def read() -> list[Any]:
        async with get_client() as client:
            flt = ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
            return list(await client.read_artifacts(artifact_filter=flt))

    return asyncio.run(read())
