"""The few exceptions mathmill raises. Every one says what went wrong and where."""

from __future__ import annotations


class MathmillError(Exception):
    """Base class of every error mathmill raises on purpose."""


class ConfigError(MathmillError):
    """A setting is missing or invalid; the message names the setting."""


class StorageError(MathmillError):
    """A dataset chunk could not be written, found or read; the message names the path."""


class EndpointError(MathmillError):
    """An LLM endpoint failed after retries (HTTP status, connection, timeout, bad body).

    Attributes:
        kind: short machine-readable reason: ``status``, ``timeout``, ``connection``,
            ``bad_response``.
        status: the HTTP status code, when there was one.
        attempts: how many HTTP requests were made.
    """

    def __init__(
        self, message: str, *, kind: str, status: int | None = None, attempts: int = 1
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.attempts = attempts


class EndpointTimeout(EndpointError):
    """The endpoint did not answer within the per-request timeout (after retries)."""


class StructuredOutputError(MathmillError):
    """The model's reply did not parse into the requested schema, even after one repair."""

    def __init__(self, message: str, *, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


class EmbeddedModelError(MathmillError):
    """The embedded local model could not be found, started or reached."""
