"""mathmill: verified math reasoning training data for LLMs, as Prefect flows.

The public API is small: the record family, the run store, and the LLM pool.

>>> from mathmill import Problem
>>> len(Problem(statement="What is 1+1?").id)
16
"""

from mathmill.errors import (
    ConfigError,
    EndpointError,
    MathmillError,
    StorageError,
    StructuredOutputError,
)
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
