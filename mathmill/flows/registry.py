"""The pipelines by name: where each one's flow, parameter and declaration are. Used by
the ``refresh`` flow (which composes them) and the ``chunks`` flow (which runs a share
of one's chunks on a worker). Imports happen on use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from mathmill.errors import ConfigError

__all__ = ["PIPELINES", "Entry", "entry"]


@dataclass(frozen=True)
class Entry:
    """Where pipeline ``name`` lives: its module, flow, and the flow's parameter."""

    name: str
    module: str
    flow: str
    param: str

    def load(self) -> tuple[Any, Any]:
        """The flow and the declared :class:`~mathmill.pipeline.dag.Pipeline`."""
        module = importlib.import_module(self.module)
        return getattr(module, self.flow), module.PIPELINE

    @property
    def ref(self) -> str:
        """The pipeline's ``module:attribute``."""
        return f"{self.module}:PIPELINE"


PIPELINES = {
    e.name: e
    for e in (
        Entry("synthesize", "mathmill.flows.synthesize", "synthesize", "params"),
        Entry("tir", "mathmill.flows.tir", "tir", "params"),
        Entry("sample", "mathmill.flows.sample", "sample", "params"),
        Entry("curate", "mathmill.flows.curate", "curate", "params"),
        Entry("evaluate", "mathmill.flows.evaluate", "evaluate", "params"),
        Entry("critique", "mathmill.flows.critique", "critique", "params"),
        Entry("formal", "mathmill.flows.formal", "formal", "params"),
    )
}


def entry(name: str) -> Entry:
    """The registry entry of pipeline ``name``; a clear error for an unknown one."""
    try:
        return PIPELINES[name]
    except KeyError:
        known = ", ".join(sorted(PIPELINES))
        raise ConfigError(f"unknown pipeline {name!r} (known: {known})") from None
