"""The ``formal`` flow: Coq/mathcomp lemmas turned into (statement, goals, proof,
reasoning) training data.

formal_extract (every lemma of the ``.v`` files, with notations and premises) →
formal_measure (token lengths; the step and token filter) → formal_replay (each proof
replayed through Coq with the goals before each tactic) → formal_select (a BM25-diverse
subset) → formal_reason (M reasonings per lemma) → formal_score (the reasoning's
information gain on the tactics, from a smaller model's prompt logprobs) → formal_judge
(the best reasoning that does not lean on knowing the tactics) → ``formal.parquet``,
``formal.jsonl``; ``rejected.jsonl`` for lemmas with no reasoning kept.

>>> p = FormalParams(source="/tmp", logical="Probe", reasonings=3)
>>> p.all_sources(), p.min_steps, p.max_steps, p.num_documents
([('/tmp', 'Probe')], 3, 7, 100)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mathmill.flows.options import ModelRole, StorageFields
from mathmill.formal.replay import coq_version
from mathmill.pipeline.budget import BudgetFields
from mathmill.pipeline.dag import Pipeline, Resources, RunState, Step, run_pipeline
from mathmill.pipeline.finish import RunResult
from mathmill.pipeline.flow import pipeline_flow
from mathmill.records import FormalLemma, SamplingParams
from mathmill.tasks.formal import (
    ExtractConfig,
    JudgeConfig,
    MeasureConfig,
    ReasonConfig,
    ReplayConfig,
    ScoreConfig,
    SelectConfig,
    export_row,
    files_digest,
    formal_extract,
    formal_judge,
    formal_measure,
    formal_reason,
    formal_replay,
    formal_score,
    formal_select,
)
from mathmill.tasks.generation import GenBackend, place_roles

__all__ = ["PIPELINE", "FormalParams", "FormalResult", "FormalSource", "formal"]


class FormalSource(BaseModel):
    """A directory of ``.v`` files and its logical prefix (``-Q dir prefix``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: str = Field(description="Directory of .v files (searched recursively).")
    logical: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_']*(\.[A-Za-z_][A-Za-z0-9_']*)*$",
        description="Its logical path prefix, e.g. mathcomp.ssreflect.",
    )


class FormalParams(BudgetFields, StorageFields):
    """Parameters of the formal flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field("runs/formal", description="Run directory (re-run to resume).")
    source: str | None = Field(
        None,
        description="A directory of .v files (default: the installed mathcomp "
        "ssreflect and algebra sources).",
    )
    logical: str | None = Field(
        None, description="The source's logical prefix (default: the directory's name)."
    )
    sources: list[FormalSource] = Field(
        default_factory=list, description="More source directories with their prefixes."
    )
    files: list[str] = Field(
        default_factory=list, description="Only these files (names, or paths in a source)."
    )
    workers: int = Field(2, ge=1, le=256, description="Files parsed at once.")
    tokenizer: str = Field(
        "cl100k_base",
        description="Token counts: cl100k_base (offline), a tokenizer folder or a cached "
        "Hugging Face name.",
    )
    min_tokens: int = Field(0, ge=0, description="Min tokens of statement + proof.")
    max_tokens: int = Field(1024, ge=1, description="Max tokens of statement + proof.")
    min_steps: int = Field(3, ge=1, description="Min tactic sentences.")
    max_steps: int = Field(7, ge=1, description="Max tactic sentences.")
    replay_timeout_s: float = Field(30.0, gt=0, le=3600, description="Per Coq sentence.")
    num_documents: int = Field(100, ge=1, description="Size of the BM25-diverse subset.")
    seed: int = Field(0, ge=0, description="Selection and sampling seed.")
    reasonings: int = Field(20, ge=1, le=256, description="Reasonings per lemma (M).")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Reasoning temperature.")
    reasoning_max_tokens: int = Field(1024, ge=16, le=131072)
    endpoint: ModelRole = Field(
        default_factory=ModelRole,
        description="Default endpoint for the reasoner and the judge (default: embedded).",
    )
    reasoner: ModelRole = Field(default_factory=ModelRole, description="The reasoning model.")
    reasoner_backend: GenBackend = Field(
        default_factory=GenBackend, description="Where the reasonings are generated."
    )
    scorer: ModelRole = Field(
        default_factory=ModelRole,
        description="A vLLM server for scoring (base_url + model): it must return prompt "
        "logprobs. Unset: scorer_backend.",
    )
    scorer_backend: GenBackend | None = Field(
        None,
        description="vLLM here ('engine') or on the vllm pool ('deployment') for scoring. "
        "Unset and no scorer.base_url: the bundled SmolLM2 in vLLM here (make setup-vllm).",
    )
    judge: ModelRole = Field(default_factory=ModelRole, description="The constraint judge.")
    judge_enabled: bool = Field(True, description="Off: keep the best-scored reasoning.")
    max_checks: int = Field(20, ge=1, description="Reasonings judged per lemma at most.")
    items_per_chunk: int = Field(16, ge=1, le=10_000, description="Lemmas per LLM chunk.")
    concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight (endpoints).")
    dry_run: bool = Field(False, description="Validate and list the source files; call nothing.")

    @model_validator(mode="after")
    def _bounds(self) -> FormalParams:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps {self.min_steps} > max_steps {self.max_steps}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")
        if self.logical is not None and self.source is None:
            raise ValueError("logical: give it with source")
        return self

    def check_input(self) -> None:
        """The source directories and files exist and hold ``.v`` files (before any
        call): a clear error otherwise.
        """
        from mathmill.errors import ConfigError
        from mathmill.formal.tokens import token_counter
        from mathmill.tasks.formal import source_files

        token_counter(self.tokenizer)  # a tokenizer not here: a clear error now
        if not source_files(_extract_config(self)):
            dirs = ", ".join(d for d, _ in self.all_sources())
            raise ConfigError(f"source: no .v files under {dirs}")

    def all_sources(self) -> list[tuple[str, str]]:
        """``(directory, logical prefix)`` of every source; the installed mathcomp
        ssreflect and algebra when none is given.
        """
        out = [(s.dir, s.logical) for s in self.sources]
        if self.source is not None:
            logical = self.logical or Path(self.source.rstrip("/")).name or "Top"
            out.insert(0, (self.source, logical))
        if not out:
            from mathmill.formal.extract import default_sources

            out = [(str(d), logical) for d, logical in default_sources()]
        return out

    def scorer_placement(self) -> GenBackend:
        """Where scoring runs: the given backend; the scorer's server (endpoint) when
        it has a base_url; else vLLM here on the bundled SmolLM2.
        """
        if self.scorer_backend is not None:
            return self.scorer_backend
        if self.scorer.base_url is not None or self.scorer.block is not None:
            return GenBackend()
        from mathmill.llm.vllm_engine import EngineConfig
        from mathmill.llm.vllm_model import local_vllm_model

        engine = EngineConfig(
            model=str(local_vllm_model()),
            dtype="float32",
            max_model_len=4096,
            enforce_eager=True,
            cpu_kv_cache_gb=2,
        )
        return GenBackend(kind="engine", engine=engine)


class FormalResult(RunResult):
    """Where a formal run's outputs are, and its headline figures."""

    lemmas: int = 0
    replayed: int = 0
    selected: int = 0
    kept: int = 0
    rejected: int = 0


def _extract_config(p: FormalParams) -> ExtractConfig:
    return ExtractConfig(sources=tuple(p.all_sources()), files=tuple(p.files), workers=p.workers)


def _measure_config(p: FormalParams) -> MeasureConfig:
    return MeasureConfig(
        tokenizer=p.tokenizer,
        min_tokens=p.min_tokens,
        max_tokens=p.max_tokens,
        min_steps=p.min_steps,
        max_steps=p.max_steps,
    )


def _reason_config(p: FormalParams) -> ReasonConfig:
    return ReasonConfig(
        sampling=SamplingParams(
            n=p.reasonings,
            temperature=p.temperature,
            max_tokens=p.reasoning_max_tokens,
            seed=p.seed,
        )
    )


def _resources(p: FormalParams) -> Resources:
    scorer = p.scorer_placement()
    roles, backends = place_roles(
        {
            "reasoner": (p.reasoner.over(p.endpoint), p.reasoner_backend),
            "scorer": (p.scorer.over(p.endpoint), scorer),
        }
    )
    roles["judge"] = p.judge.over(p.endpoint)
    in_process = any(b.kind == "engine" for b in backends.values())
    return Resources(
        roles=roles,
        backends=backends,
        row_concurrency=p.concurrency,
        chunk_concurrency=1 if in_process else 2,
    )


def _formal_rows(state: RunState) -> list[FormalLemma]:
    rows = state.read("formal", FormalLemma)
    return sorted(rows, key=lambda x: int(str(x.metadata.get("pick", 0))))


def _exports(state: RunState) -> dict[str, str]:
    """``formal.parquet``: statement, goals, proof, the chosen reasoning, its score and
    the judge's verdict, one row per kept lemma, in selection order.
    """
    from mathmill.export.formats import write_parquet

    rows = [export_row(x) for x in _formal_rows(state)]
    if not rows:
        return {}
    return {"formal.parquet": write_parquet(state.rt.store, "formal.parquet", rows)}


def _count(state: RunState, key: str) -> int:
    return int(state.tracker.counts.get(key, 0))


def _stats(state: RunState) -> list[dict[str, Any]]:
    c = state.tracker.counts
    rows: list[dict[str, Any]] = [
        {"metric": "source files", "value": _count(state, "formal_extract.files")},
        {
            "metric": "files dropped (unparsable)",
            "value": _count(state, "formal_extract.files_dropped"),
        },
        {"metric": "lemmas extracted", "value": _count(state, "formal_extract.lemmas")},
        {"metric": "kept by the length filter", "value": _count(state, "formal_measure.kept")},
    ]
    rows += [
        {"metric": f"filter: {k.removeprefix('formal_measure.')}", "value": v}
        for k, v in sorted(c.items())
        if k.startswith("formal_measure.") and k != "formal_measure.kept"
    ]
    rows += [
        {"metric": "replayed with goals", "value": _count(state, "formal_replay.replayed")},
        {"metric": "replay failed", "value": _count(state, "formal_replay.failed")},
        {"metric": "selected (BM25-diverse)", "value": _count(state, "formal_select.selected")},
        {"metric": "reasonings", "value": _count(state, "formal_reason.reasonings")},
        {"metric": "reasonings scored", "value": _count(state, "formal_score.scored")},
        {
            "metric": "judge pass / fail",
            "value": f"{_count(state, 'formal_judge.pass')} / {_count(state, 'formal_judge.fail')}",
        },
        {"metric": "lemmas kept", "value": _count(state, "formal_judge.kept")},
        {"metric": "lemmas rejected", "value": _count(state, "formal_judge.rejected")},
    ]
    scores = [
        r.score
        for x in _formal_rows(state)
        for r in x.reasonings
        if r.index == x.chosen and r.score is not None
    ]
    if scores:
        mean = sum(scores) / len(scores)
        rows.append({"metric": "mean score of kept reasonings", "value": round(mean, 4)})
    return rows


def _report(state: RunState) -> str:
    return (
        f"{_count(state, 'formal_extract.lemmas')} lemmas extracted from "
        f"{_count(state, 'formal_extract.files')} files; "
        f"{_count(state, 'formal_measure.kept')} within the length bounds, "
        f"{_count(state, 'formal_replay.replayed')} replayed through Coq, "
        f"{_count(state, 'formal_select.selected')} selected; "
        f"{_count(state, 'formal_judge.kept')} kept with a reasoning, "
        f"{_count(state, 'formal_judge.rejected')} rejected by the judge."
    )


def _summary(state: RunState) -> dict[str, Any]:
    return {
        "lemmas": _count(state, "formal_extract.lemmas"),
        "replayed": _count(state, "formal_replay.replayed"),
        "selected": _count(state, "formal_select.selected"),
        "kept": _count(state, "formal_judge.kept"),
        "rejected": _count(state, "formal_judge.rejected"),
    }


PIPELINE: Pipeline[FormalParams, FormalResult] = Pipeline(
    name="formal",
    params=FormalParams,
    steps=[
        Step(
            formal_extract,
            _extract_config,
            extra=lambda p: {"files": files_digest(_extract_config(p))},
        ),
        Step(formal_measure, _measure_config),
        Step(
            formal_replay,
            lambda p: ReplayConfig(sources=tuple(p.all_sources()), timeout_s=p.replay_timeout_s),
            extra=lambda p: {"coq": coq_version()},
        ),
        Step(
            formal_select,
            lambda p: SelectConfig(
                num_documents=p.num_documents, seed=p.seed, items_per_chunk=p.items_per_chunk
            ),
        ),
        Step(formal_reason, _reason_config),
        Step(formal_score, lambda p: ScoreConfig()),
        Step(
            formal_judge,
            lambda p: JudgeConfig(enabled=p.judge_enabled, max_checks=p.max_checks),
        ),
    ],
    resources=_resources,
    result=FormalResult,
    exports=("formal", "rejected", "dropped"),
    listed=("formal",),
    extra_exports=_exports,
    report=_report,
    stats=_stats,
    summary=_summary,
    ref="mathmill.flows.formal:PIPELINE",
    description="Coq proofs → replay with goals → length filter → BM25-diverse subset → "
    "reasonings → logprob scoring → judge.",
)
"""extract → measure → replay → select → reason → score → judge → exports."""


@pipeline_flow("formal")
async def formal(params: FormalParams) -> FormalResult:
    """Lemmas of Coq sources replayed with goals, filtered, a diverse subset given
    reasonings scored by their information gain on the tactics and checked by a judge.
    """
    return await run_pipeline(PIPELINE, params)
