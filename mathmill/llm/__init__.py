"""The LLM layer: endpoint config, the async client pool, usage, the embedded model.

The names below are imported on first use (the client pulls in the ``openai`` SDK).
"""

from typing import TYPE_CHECKING

from mathmill._lazy import lazy_getattr

if TYPE_CHECKING:
    from mathmill.llm.client import ChatResult, Choice, LLMClient, LLMPool, StructuredResult
    from mathmill.llm.config import EndpointConfig, Price
    from mathmill.llm.usage import UsageMeter

__all__ = [
    "ChatResult",
    "Choice",
    "EndpointConfig",
    "LLMClient",
    "LLMPool",
    "Price",
    "StructuredResult",
    "UsageMeter",
]

_CLIENT = "mathmill.llm.client"
__getattr__ = lazy_getattr(
    __name__,
    {
        "ChatResult": _CLIENT,
        "Choice": _CLIENT,
        "LLMClient": _CLIENT,
        "LLMPool": _CLIENT,
        "StructuredResult": _CLIENT,
        "EndpointConfig": "mathmill.llm.config",
        "Price": "mathmill.llm.config",
        "UsageMeter": "mathmill.llm.usage",
    },
)
