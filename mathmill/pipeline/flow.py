"""The Prefect flow of each pipeline: :func:`pipeline_flow` (``@flow`` with mathmill's
settings) makes a :class:`PipelineFlow`, which records its parameters (pydantic models)
without importing FastAPI.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import prefect.flows as flows_module
from prefect.client.schemas.objects import State
from prefect.flows import Flow
from prefect.utilities.callables import ParameterSchema, parameter_schema
from pydantic import BaseModel

__all__ = ["PipelineFlow", "pipeline_flow"]

P = ParamSpec("P")
_SCHEMA = "parameter_schema"  # prefect.flows' name of the function Flow.__init__ calls
R = TypeVar("R")


class PipelineFlow(Flow[P, R]):
    """A Prefect flow whose parameters, when they are pydantic models (a pipeline's
    params), are stored on the flow run as ``model_dump(mode="json", by_alias=True)``:
    what Prefect's ``jsonable_encoder`` makes of them, without importing FastAPI for it
    (~0.08 s of every run). Other values go through Prefect's own serialization.

    Its :attr:`parameters` (the JSON schema of its parameters) is made on first use,
    not when the flow is declared: a run never reads it (a deployment makes its own),
    and it is ~0.06 s of every command that imports a pipeline.
    """

    _parameters: ParameterSchema | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        real = getattr(flows_module, _SCHEMA)
        setattr(flows_module, _SCHEMA, _later)  # what Flow.__init__ calls, for a moment
        try:
            super().__init__(*args, **kwargs)
        finally:
            setattr(flows_module, _SCHEMA, real)

    @property
    def parameters(self) -> ParameterSchema:
        if self._parameters is None:
            self._parameters = parameter_schema(self.fn)
        return self._parameters

    @parameters.setter
    def parameters(self, value: ParameterSchema | None) -> None:
        self._parameters = value

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        values = list(parameters.values())
        if not all(isinstance(v, BaseModel) and not isinstance(v, State) for v in values):
            return super().serialize_parameters(parameters)
        try:
            return {k: v.model_dump(mode="json", by_alias=True) for k, v in parameters.items()}
        except Exception:  # what Prefect stores for a value it cannot serialize
            return super().serialize_parameters(parameters)


def _later(fn: Any) -> None:
    """Stands for Prefect's ``parameter_schema`` while a :class:`PipelineFlow` is made."""
    return None


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
