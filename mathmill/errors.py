"""The few exceptions mathmill raises, all of them defined here (the modules that raise
them re-export theirs). Every one says what went wrong and where.
"""

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


class SandboxError(MathmillError):
    """The sandbox itself failed (not the code it ran)."""


class SandboxUnavailable(SandboxError):
    """No safe sandbox can run here (or the server is unreachable)."""


class SessionNotFound(SandboxError):
    """The session does not exist (deleted, expired or evicted)."""


class IncompleteChunk(MathmillError):
    """Some rows of a chunk hit a transient failure (endpoint down, timeout, sandbox
    gone). The chunk is not marked done; its finished LLM calls are in the call
    cache, so a re-run redoes only what failed.
    """


class FlowRunFailed(IncompleteChunk):
    """A flow run a run handed chunks to (the ``chunks`` or ``generate`` deployment)
    did not complete; ``flow_run_id`` names it, so what it recorded (its LLM usage) is
    still counted.
    """

    def __init__(self, message: str, *, flow_run_id: str | None = None) -> None:
        super().__init__(message)
        self.flow_run_id = flow_run_id


class IncompleteRun(MathmillError):
    """Some chunks failed; what finished is kept and a re-run resumes."""


class ServerError(MathmillError):
    """The Prefect server could not be started, reached or set up."""


# Internal signals, caught where they are raised; their bases are what their callers
# catch, so they are not MathmillErrors.


class IsolationError(OSError):
    """A sandbox isolation layer that was expected to work failed."""


class GradingTimeout(Exception):
    """The comparison did not finish in time."""


class SidecarUnusable(Exception):
    """The helper process (:mod:`mathmill.sidecar`) could not run the work sent to it
    (it died, overran, or could not read the work); the work is done in the run's
    process instead.
    """


class InvalidEngineRequest(ValueError):
    """A request the vLLM engine cannot take (too long, bad schema): an error row."""


class ExtractError(ValueError):
    """A Coq file that cannot be split into sentences (its message names file and
    line; ``pos`` is the byte offset where the unterminated part starts, when known).
    """

    def __init__(self, message: str, pos: int | None = None) -> None:
        super().__init__(message)
        self.pos = pos


class CoqError(MathmillError):
    """Coq refused a sentence (its message), or the process failed."""

    def __init__(self, message: str, state_id: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.state_id = state_id


class CoqRestarted(CoqError):
    """The process was lost (timeout or crash) and a fresh one started: the document
    is back at the root state.
    """


class CoqTimeout(CoqRestarted):
    """A call took longer than its timeout; the process was killed and restarted."""


class CoqCrashed(CoqRestarted):
    """The process died (EOF on its output); it was restarted."""


class ReplayAborted(MathmillError):
    """A sentence outside the requested proofs failed: the rest of the file cannot be
    replayed (the message says where and why).
    """
