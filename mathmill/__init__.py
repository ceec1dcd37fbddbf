"""mathmill: verified math reasoning training data for LLMs, as Prefect flows.

The public API is small: the record family, the run store, and the LLM pool. They are
imported on first use, so the command line starts without what it does not need.

>>> from mathmill import Problem
>>> len(Problem(statement="What is 1+1?").id)
16
"""

from typing import TYPE_CHECKING

from mathmill._lazy import lazy_getattr
from mathmill.errors import (
    ConfigError,
    EndpointError,
    MathmillError,
    StorageError,
    StructuredOutputError,
)

if TYPE_CHECKING:
    from mathmill.llm import EndpointConfig, LLMPool
    from mathmill.records import Attempt, Label, Problem, Verdict
    from mathmill.storage import ChunkRef, RunStore

__version__ = "0.1.0"

__all__ = [
    "Attempt",
    "ChunkRef",
    "ConfigError",
    "EndpointConfig",
    "EndpointError",
    "LLMPool",
    "Label",
    "MathmillError",
    "Problem",
    "RunStore",
    "StorageError",
    "StructuredOutputError",
    "Verdict",
    "__version__",
]

__getattr__ = lazy_getattr(
    __name__,
    {
        "EndpointConfig": "mathmill.llm.config",
        "LLMPool": "mathmill.llm.client",
        **dict.fromkeys(("Attempt", "Label", "Problem", "Verdict"), "mathmill.records"),
        **dict.fromkeys(("ChunkRef", "RunStore"), "mathmill.storage"),
    },
)
