"""The LLM layer: endpoint config, the async client pool, usage, the embedded model."""

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
