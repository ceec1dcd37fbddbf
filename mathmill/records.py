"""The record family every stage passes on.

Stages fill typed fields; ``metadata`` holds only extras. Every record round-trips
losslessly through Parquet (see :mod:`mathmill.codec`), nested fields included.

>>> p = Problem(statement="What is  1+1?", answer="2", source="demo")
>>> p.id == Problem(statement="What is 1+1?").id
True
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, model_validator

__all__ = [
    "RECORD_TYPES",
    "Attempt",
    "AttemptKind",
    "ConsistencyFlag",
    "Critique",
    "CritiqueExample",
    "CritiqueTarget",
    "CuratedRow",
    "Dropped",
    "ErrorInfo",
    "ExecStatus",
    "ExecutionResult",
    "FormalLemma",
    "FormalReasoning",
    "GenChoice",
    "GenRequest",
    "Generation",
    "Goal",
    "Label",
    "MergedProblem",
    "ModelTally",
    "Problem",
    "PromptRef",
    "ProofState",
    "Record",
    "Sample",
    "SampleStatus",
    "SamplingParams",
    "SolutionRow",
    "Structure",
    "TokenLogprob",
    "TokenUsage",
    "Topic",
    "Turn",
    "Verdict",
    "VerdictStatus",
    "normalize_statement",
    "stable_id",
]

AttemptKind = Literal["long_cot", "short_cot", "code", "tir"]
ExecStatus = Literal["ok", "error", "timeout", "memory", "output_limit", "crashed"]
VerdictStatus = Literal[
    "verified",
    "wrong_answer",
    "error",
    "timeout",
    "no_output",
    "correct",
    "incorrect",
    "unvalidated",
    "failed",
    "no_answer",
    "no_code",
    "leak",
    "llm_error",
    "disagreement",
    "minority",
]

_WS = re.compile(r"\s+")


def _as_utc(value: datetime) -> datetime:
    """Timestamps are UTC; a naive one is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UTCDateTime = Annotated[datetime, AfterValidator(_as_utc)]


def _now() -> datetime:
    return datetime.now(UTC)


def normalize_statement(text: str) -> str:
    """Normalize a problem statement for identity: NFKC, collapsed whitespace, stripped.

    Case and punctuation are kept: ``x`` and ``X`` can be different variables.

    >>> normalize_statement("  Find\\u00a0x,\\n  if x+1=2. ")
    'Find x, if x+1=2.'
    """
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def stable_id(*parts: str, length: int = 16) -> str:
    """A short hex id from the SHA-256 of the parts (joined with a unit separator).

    >>> stable_id("a", "b") == stable_id("a", "b") != stable_id("ab")
    True
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return digest[:length]


class Record(BaseModel):
    """Base of every record: strict about unknown fields, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenUsage(Record):
    """Tokens used by one or more LLM calls."""

    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        """The usage of both.

        >>> (TokenUsage(prompt_tokens=3) + TokenUsage(completion_tokens=4)).total_tokens
        7
        """
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class SamplingParams(Record):
    """The sampling parameters a text was generated with."""

    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1024, description="Samples per prompt.")
    seed: int | None = None
    stop: list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class PromptRef(Record):
    """Which prompt template produced a text: its id and the SHA-256 of its content."""

    template_id: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ErrorInfo(Record):
    """A recorded failure: what kind, what it said, in which stage, after how many tries."""

    kind: str = Field(description="Short reason, e.g. 'timeout', 'status', 'invalid_json'.")
    message: str
    stage: str | None = None
    attempts: int = Field(1, ge=0)
    status: int | None = Field(None, description="HTTP status, when there was one.")

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed: timeouts, connection errors, 408, 409,
        429 and 5xx, and a call not sent because the run's budget was spent. A 400
        (e.g. context too long) or an invalid reply is permanent.
        """
        if self.kind in ("timeout", "connection", "bad_response", "sandbox", "budget"):
            return True
        if self.kind == "status" and self.status is not None:
            return self.status in (408, 409, 429) or self.status >= 500
        return False


class ExecutionResult(Record):
    """What running code in the sandbox gave. The one result shape of every backend."""

    status: ExecStatus
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    exit_code: int | None = None
    wall_ms: float = Field(0.0, ge=0.0)
    cpu_ms: float = Field(0.0, ge=0.0)
    peak_memory_kb: int | None = Field(None, ge=0)
    backend: str | None = Field(None, description="Which sandbox backend ran it.")


class Verdict(Record):
    """A grading decision: the status, which rule decided, and why."""

    status: VerdictStatus
    expected: str | None = None
    predicted: str | None = None
    rule: str | None = Field(None, description="The grader rule that decided.")
    reason: str = ""


class Critique(Record):
    """A structured critique of a solution or of its code."""

    summary: str
    issues: list[str] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=dict)
    passed: bool | None = None
    model: str | None = None
    error: ErrorInfo | None = Field(None, description="Why no critique could be had.")


class Turn(Record):
    """One message of a multi-turn trajectory; tool turns carry their execution."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    execution: ExecutionResult | None = None


class Problem(Record):
    """A math problem. ``id`` is derived from the normalized statement unless given.

    >>> Problem(statement="2+2?").id == stable_id(normalize_statement("2+2? "))
    True
    """

    id: str = ""
    statement: str = Field(min_length=1)
    answer: str | None = Field(None, description="Reference answer, when known.")
    solution: str | None = None
    source: str | None = Field(None, description="Dataset or generator it came from.")
    source_id: str | None = Field(None, description="Its id in the source, if any.")
    license: str | None = None
    topic: str | None = None
    domain: str | None = None
    model: str | None = Field(None, description="The model that wrote it, if generated.")
    prompt: PromptRef | None = None
    usage: TokenUsage = Field(default_factory=TokenUsage)
    created_at: UTCDateTime = Field(default_factory=_now)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _derive_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("id") and data.get("statement"):
            data = {**data, "id": stable_id(normalize_statement(str(data["statement"])))}
        return data


class Attempt(Record):
    """One solution attempt at a problem: a chain of thought, code, or a TIR trajectory.

    Rounds of a feedback-rewrite loop are separate attempts linked by ``parent_id``.
    """

    id: str = ""
    problem_id: str
    kind: AttemptKind
    model: str | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    prompt: PromptRef | None = None
    sample_index: int = Field(0, ge=0)
    round: int = Field(0, ge=0, description="Feedback-rewrite round; 0 is the first try.")
    parent_id: str | None = Field(None, description="The attempt this one revises.")
    text: str | None = None
    final_answer: str | None = None
    draft_code: str | None = Field(
        None, description="The coder's first code, before the critique (``code`` is final)."
    )
    code: str | None = None
    leak_score: float | None = Field(
        None, ge=0.0, le=1.0, description="How much the code looks hard-coded (0 = computed)."
    )
    step_prompts: dict[str, str] = Field(
        default_factory=dict,
        description="Template id -> SHA-256 of the prompts of later steps (code, critique).",
    )
    step_models: dict[str, str] = Field(
        default_factory=dict, description="Role -> model of later steps (coder, critic)."
    )
    execution: ExecutionResult | None = None
    verdict: Verdict | None = None
    critique: Critique | None = None
    turns: list[Turn] = Field(default_factory=list)
    usage: TokenUsage = Field(default_factory=TokenUsage)
    latency_ms: float | None = Field(None, ge=0.0)
    error: ErrorInfo | None = None
    created_at: UTCDateTime = Field(default_factory=_now)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _derive_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("id") and data.get("problem_id"):
            prompt = data.get("prompt")
            prompt_hash = (
                prompt.sha256 if isinstance(prompt, PromptRef) else (prompt or {}).get("sha256")
            )
            parts = [
                str(data["problem_id"]),
                str(data.get("kind", "")),
                str(data.get("model") or ""),
                str(prompt_hash or ""),
                str(data.get("sample_index", 0)),
                str(data.get("round", 0)),
                str(data.get("parent_id") or ""),
            ]
            data = {**data, "id": stable_id(*parts)}
        return data


class Label(Record):
    """A label on a problem or attempt: difficulty, domain, leak, ... with its evidence."""

    target_id: str = Field(description="The problem or attempt id it labels.")
    name: str = Field(description="What is labelled, e.g. 'difficulty', 'domain', 'leak'.")
    value: str
    score: float | None = None
    source: str | None = Field(None, description="Model or heuristic that produced it.")
    reason: str = ""
    created_at: UTCDateTime = Field(default_factory=_now)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


class Topic(Record):
    """A generated topic to write problems about."""

    id: str = ""
    text: str = Field(min_length=1)
    domain: str | None = None
    model: str | None = None
    prompt: PromptRef | None = None
    created_at: UTCDateTime = Field(default_factory=_now)

    @model_validator(mode="before")
    @classmethod
    def _derive_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("id") and data.get("text"):
            data = {**data, "id": stable_id("topic", normalize_statement(str(data["text"])))}
        return data


class Dropped(Record):
    """A row a stage did not pass on, kept with its reason (the side output)."""

    stage: str
    reason: str = Field(description="Short reason, e.g. 'duplicate', 'contains_solution'.")
    detail: str = ""
    target_id: str = Field(description="Id of the dropped topic, problem or attempt.")
    record_type: str
    record: JsonValue = Field(description="The dropped row itself, as JSON.")
    created_at: UTCDateTime = Field(default_factory=_now)


class SolutionRow(Record):
    """One row of a synthesized dataset: a problem with one solution, flat, for training.

    Verified rows have ``status == "verified"``; the unverified side output uses the
    same shape with the failure ``status`` and ``reason`` of the last round.
    """

    id: str = Field(description="The final attempt's id.")
    problem_id: str
    problem: str
    topic: str | None = None
    domain: str | None = None
    cot_type: AttemptKind
    solution: str
    final_answer: str | None = None
    code: str | None = None
    computed_answer: str | None = None
    blind_answer: str | None = Field(
        None, description="What a program written from the problem alone printed (blind check)."
    )
    status: VerdictStatus
    reason: str = ""
    rounds: int = Field(ge=0, description="Rewrite rounds it took (0 = verified at once).")
    lineage: list[str] = Field(description="Attempt ids from the first round to this one.")
    model: str | None = None
    prompts: dict[str, str] = Field(
        default_factory=dict, description="Prompt template id -> SHA-256, per step."
    )
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    created_at: UTCDateTime = Field(default_factory=_now)


class Structure(Record):
    """A problem's and its solution's structure, as an LLM read them: the problem's
    angle (domain, subdomain, objects, constraints, answer type) and the solution's
    (reasoning patterns, case analysis, construction, techniques, depth).
    """

    domain: str = ""
    subdomain: str = ""
    objects: list[str] = Field(default_factory=list, description="Mathematical objects.")
    constraints: list[str] = Field(default_factory=list)
    answer_type: str = Field("", description="integer, fraction, expression, tuple, ...")
    reasoning_patterns: list[str] = Field(default_factory=list)
    case_analysis: bool = False
    construction: bool = False
    techniques: list[str] = Field(default_factory=list)
    depth: int = Field(0, ge=0, le=100, description="Reasoning steps the solution needs.")
    model: str | None = None


class CuratedRow(Record):
    """One row of a curated dataset: a problem (normalized, the original beside it)
    with the Python program that computes its reference answer in the sandbox, and
    how it got there (repair rounds, samples, the leak check).
    """

    id: str = Field(description="The problem's id.")
    problem: str = Field(description="The normalized problem text.")
    original_problem: str = Field(description="The problem text as it was read.")
    answer: str = Field(description="The normalized reference answer.")
    original_answer: str
    source: str | None = None
    source_id: str | None = None
    license: str | None = None
    domain: str | None = None
    cluster_id: str | None = Field(None, description="Its near-duplicate cluster.")
    code: str = Field(description="The program; it prints the answer.")
    computed_answer: str | None = None
    rounds: int = Field(0, ge=0, description="Repair rounds it took (0 = right at once).")
    sample_index: int = Field(0, ge=0, description="Which of the samples solved it.")
    samples_solved: int = Field(1, ge=0, description="Samples that solved it (pass@k).")
    samples: int = Field(1, ge=1)
    lineage: list[str] = Field(default_factory=list, description="Attempt ids, first to last.")
    model: str | None = None
    leak_flagged: bool = Field(False, description="The AST detector flagged the code.")
    leak_verdict: Literal["none", "cleared", "repaired"] = Field(
        "none",
        description="none: not flagged; cleared: the judge found no leak; "
        "repaired: a confirmed leak rewritten and verified again.",
    )
    leak_reason: str = ""
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    computation_buckets: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Difficulty ladder: rung -> [correct, samples]; rungs after the early "
        "exit are absent.",
    )
    bucket: str | None = Field(None, description="The first rung that solved it, or 'unsolved'.")
    ladder_tokens: int = Field(0, ge=0, description="Tokens the ladder spent on it.")
    difficulty: float | None = Field(None, description="Effective difficulty in [0, 1].")
    difficulty_raw: float | None = Field(None, description="The fit's difficulty (logits).")
    difficulty_se: float | None = Field(None, description="Its standard error (logits).")
    difficulty_method: str | None = None
    domain_heuristic: str | None = Field(None, description="The keyword classifier's domain.")
    domain_confidence: float | None = None
    structure: Structure | None = None
    split: str | None = Field(None, description="train, validation or test.")
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    created_at: UTCDateTime = Field(default_factory=_now)


class GenRequest(Record):
    """One prompt for batch generation (the ``generate`` flow, a vLLM engine or an
    HTTP endpoint): a completion ``prompt`` or chat ``messages``, how to sample it, and
    what to return besides the text.
    """

    id: str = Field(description="Unique within a batch; the output carries it.")
    prompt: str | None = Field(None, description="Raw text prompt (completion).")
    messages: list[dict[str, str]] | None = Field(
        None, description="Chat messages ({role, content}); the model's chat template applies."
    )
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="Logprob of every prompt token (and this many top)."
    )
    json_schema: JsonValue = Field(
        None, description="JSON schema the reply must follow (guided decoding)."
    )
    metadata: dict[str, JsonValue] = Field(
        default_factory=dict, description="Carried to the output unchanged."
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> GenRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"request {self.id!r}: set exactly one of prompt and messages")
        return self


class TokenLogprob(Record):
    """A token with its logprob, and the most likely alternatives at its position."""

    token: str
    token_id: int | None = None
    logprob: float
    top: dict[str, float] = Field(default_factory=dict)


class GenChoice(Record):
    """One sample of a :class:`Generation`."""

    index: int = Field(ge=0)
    text: str
    finish_reason: str | None = None
    tokens: int = Field(0, ge=0, description="Generated tokens.")
    cumulative_logprob: float | None = Field(
        None, description="Sum of the generated tokens' logprobs (when logprobs were asked)."
    )
    logprobs: list[TokenLogprob] | None = None


class Generation(Record):
    """The answer to one :class:`GenRequest`: its samples, usage, or the error."""

    id: str
    model: str = ""
    backend: str = Field("", description="'vllm' (offline engine) or 'http' (an endpoint).")
    choices: list[GenChoice] = Field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = Field(
        None, description="Every prompt token after the first, with its logprob."
    )
    usage: TokenUsage = Field(default_factory=TokenUsage)
    latency_ms: float | None = Field(
        None, ge=0.0, description="Time of the call(s) (endpoint backend)."
    )
    error: ErrorInfo | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    created_at: UTCDateTime = Field(default_factory=_now)

    @property
    def texts(self) -> list[str]:
        """Every sample's text."""
        return [c.text for c in self.choices]


SampleStatus = Literal["correct", "incorrect", "no_answer", "unvalidated", "error"]


class Sample(Record):
    """One sampled solution of a problem (the ``sample`` flow), graded against the
    reference answer, with the logprobs of its tokens.
    """

    id: str
    problem_id: str
    problem: str
    reference: str | None = None
    index: int = Field(ge=0, description="Which of the problem's samples.")
    text: str
    final_answer: str | None = None
    status: SampleStatus
    reason: str = ""
    finish_reason: str | None = None
    tokens: int = Field(0, ge=0)
    logprob_sum: float | None = None
    logprob_mean: float | None = Field(None, description="Mean logprob per generated token.")
    logprobs: list[TokenLogprob] | None = None
    model: str = ""
    backend: str = ""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    prompt: PromptRef | None = None
    rung: str | None = Field(None, description="The difficulty-ladder rung that drew it.")
    generator: str | None = Field(
        None,
        description="The name of the model in the run's list that drew it (critique: two "
        "names may serve the same model at two temperatures).",
    )
    created_at: UTCDateTime = Field(default_factory=_now)


ConsistencyFlag = Literal["all_right", "all_wrong", "mixed", "ungraded"]


class ModelTally(BaseModel):
    """One model's graded samples of one problem."""

    model_config = ConfigDict(extra="forbid")

    right: int = Field(0, ge=0)
    wrong: int = Field(0, ge=0, description="Incorrect or without a final answer.")
    ungraded: int = Field(0, ge=0, description="Errors, and samples with no reference.")
    pass_rate: float | None = Field(None, description="right / (right + wrong).")
    flag: ConsistencyFlag = "ungraded"


class MergedProblem(Record):
    """Every model's samples of one problem (critique's merge), in input order: per
    model the tally and consistency flag, and whether the consistency filter kept it.
    """

    id: str
    position: int = Field(ge=0, description="Its place in the input.")
    problem: str
    reference: str | None = None
    source: str | None = None
    models: dict[str, ModelTally] = Field(default_factory=dict)
    pass_rate: float | None = Field(None, description="Over every model's graded samples.")
    kept: bool
    reason: str = Field(description="Why it was kept or dropped (the filter's rule).")
    examples: int = Field(0, ge=0, description="Critique examples drawn from it.")
    created_at: UTCDateTime = Field(default_factory=_now)


CritiqueTarget = Literal["right", "wrong"]


class CritiqueExample(Record):
    """A critique training example: a model's solution of a problem, the prompt asking
    whether it is right, the grader's verdict as the target; with a teacher, the
    teacher's explanation when its own conclusion agrees with the grader.
    """

    id: str
    problem_id: str
    position: int = Field(ge=0, description="The problem's place in the input.")
    question: str
    solution: str
    ground_truth: str | None = Field(None, description="The question's reference answer.")
    final_answer: str | None = Field(None, description="The answer the solution gave.")
    target: CritiqueTarget
    model: str = Field(description="The name of the model in the run's list.")
    served_model: str = ""
    sample_id: str
    sample_index: int = Field(ge=0)
    source: str | None = None
    data_source: str
    prompt: str = Field(description="The critique prompt, filled in.")
    prompt_ref: PromptRef | None = None
    critique: str | None = Field(None, description="The teacher's critique, when kept.")
    teacher_conclusion: CritiqueTarget | None = None
    teacher_model: str | None = None
    created_at: UTCDateTime = Field(default_factory=_now)


class Goal(Record):
    """One open goal of a proof state: its hypotheses (``name : type``) and conclusion."""

    hypotheses: list[str] = Field(default_factory=list)
    conclusion: str


class ProofState(Record):
    """The goals before one tactic of a replayed proof (empty: no goal left)."""

    goals: list[Goal] = Field(default_factory=list)


class FormalReasoning(Record):
    """A natural-language reasoning written for a formal proof, with its score: the
    mean per-token log-probability of the proof's tactics given statement + reasoning,
    minus the same given the statement alone (the reasoning's information gain).
    """

    index: int = Field(ge=0)
    text: str
    model: str = ""
    score: float | None = Field(None, description="Information gain (nats per tactic token).")
    logprob_with: float | None = Field(None, description="Mean logprob with the reasoning.")
    scored_by: str | None = Field(None, description="The scoring model.")
    verdict: Literal["pass", "fail"] | None = Field(
        None, description="The judge: fail when it leans on already knowing the tactics."
    )
    verdict_reason: str | None = None


class FormalLemma(Record):
    """A lemma of a proof library: where it is, its statement and its proof as tactic
    sentences; after replay the goals before each tactic; after the later stages its
    token lengths, reasonings and the chosen one.
    """

    id: str
    name: str
    kind: str = Field("Lemma", description="Lemma, Theorem, Corollary, Fact, Remark, ...")
    module: str = Field(description="The logical module path (mathcomp.ssreflect.ssrnat).")
    file: str = Field(description="The file, relative to the source directory.")
    line: int = Field(ge=1, description="The statement's first line.")
    start: int = Field(0, ge=0, description="Byte offset of the statement in the file.")
    end: int = Field(0, ge=0, description="Byte offset just after the proof's terminator.")
    statement: str = Field(description="The statement sentence, as written.")
    proof: str = Field(description="The proof as written (Proof. ... Qed.).")
    tactics: list[str] = Field(
        default_factory=list, description="The proof's tactic sentences (no Proof./Qed.)."
    )
    terminator: str = Field("Qed.", description="Qed. or Defined.")
    notations: list[str] = Field(
        default_factory=list, description="Notation declarations of its file."
    )
    premises: list[str] = Field(
        default_factory=list, description="Qualified names its statement and proof use (.glob)."
    )
    states: list[ProofState] | None = Field(
        None, description="Replayed: the goals before each tactic (one per tactic)."
    )
    statement_tokens: int | None = Field(None, ge=0)
    proof_tokens: int | None = Field(None, ge=0, description="Statement + proof tokens.")
    tactic_tokens: int | None = Field(None, ge=0, description="Tokens of the tactic sequence.")
    tokenizer: str | None = None
    reasonings: list[FormalReasoning] = Field(default_factory=list)
    chosen: int | None = Field(None, description="Index of the kept reasoning.")
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    created_at: UTCDateTime = Field(default_factory=_now)

    @property
    def tactic_text(self) -> str:
        """The tactic sequence, one sentence per line."""
        return "\n".join(self.tactics)


RECORD_TYPES: dict[str, type[Record]] = {
    cls.__name__: cls
    for cls in (
        Problem,
        Topic,
        Dropped,
        SolutionRow,
        CuratedRow,
        Structure,
        Attempt,
        Label,
        Verdict,
        Critique,
        MergedProblem,
        CritiqueExample,
        ExecutionResult,
        Turn,
        TokenUsage,
        SamplingParams,
        PromptRef,
        ErrorInfo,
        GenRequest,
        Generation,
        GenChoice,
        TokenLogprob,
        Sample,
        Goal,
        ProofState,
        FormalReasoning,
        FormalLemma,
    )
}
"""Every record type by name; Parquet chunks record which one they hold."""
