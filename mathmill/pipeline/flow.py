"""The Prefect flow of each pipeline: :func:`pipeline_flow` (``@flow`` with mathmill's
settings) makes a :class:`PipelineFlow`, which records its parameters (pydantic models)
without importing FastAPI.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from prefect.client.schemas.objects import State
from prefect.flows import Flow
from pydantic import BaseModel

__all__ = ["PipelineFlow", "pipeline_flow"]

P = ParamSpec("P")
R = TypeVar("R")


class PipelineFlow(Flow[P, R]):
    """A Prefect flow whose parameters, when they are pydantic models (a pipeline's
    params), are stored on the flow run as ``model_dump(mode="json", by_alias=True)``:
    what Prefect's ``jsonable_encoder`` makes of them, without importing FastAPI for it
    (~0.08 s of every run). Other values go through Prefect's own serialization.
    """

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        values = list(parameters.values())
        if not all(isinstance(v, BaseModel) and not isinstance(v, State) for v in values):
            return super().serialize_parameters(parameters)
        try:
            return {k: v.model_dump(mode="json", by_alias=True) for k, v in parameters.items()}
        except Exception:  # what Prefect stores for a value it cannot serialize
            return super().serialize_parameters(parameters)


def pipeline_flow(
    name: str,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], PipelineFlow[P, Coroutine[Any, Any, R]]]:
    """``@flow(name=name, validate_parameters=True, log_prints=False)`` as a
    :class:`PipelineFlow`.
    """

    def decorate(
        fn: Callable[P, Coroutine[Any, Any, R]],
    ) -> PipelineFlow[P, Coroutine[Any, Any, R]]:
        return PipelineFlow(fn, name=name, validate_parameters=True, log_prints=False)

    return decorate
