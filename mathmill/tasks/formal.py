"""The formal stages: lemmas extracted from Coq sources, measured and filtered by
length, replayed through Coq with the goals before each tactic, a BM25-diverse subset
chosen, several natural-language reasonings written for each, each reasoning scored
by how much it helps a smaller model predict the actual tactics (prompt logprobs), and
the best one that a judge finds does not lean on already knowing the tactics kept.

>>> lp = [TokenLogprob(token=t, logprob=-1.0) for t in ["Lemma", " x", ".\\n", "by", " []."]]
>>> [t.token for t in tactic_tokens(lp, "by [].")]
['by', ' [].']
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from mathmill.errors import ConfigError
from mathmill.formal.diverse import select_diverse
from mathmill.formal.extract import discover, extract_all
from mathmill.formal.replay import replay_file
from mathmill.formal.tokens import token_counter
from mathmill.pipeline.chunks import drop, raise_if_transient, split_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.prompts import load_prompt
from mathmill.records import (
    Dropped,
    ErrorInfo,
    FormalLemma,
    FormalReasoning,
    Generation,
    GenRequest,
    SamplingParams,
    TokenLogprob,
)
from mathmill.tasks.generation import generate

__all__ = [
    "ExtractConfig",
    "JudgeConfig",
    "JudgeReply",
    "MeasureConfig",
    "ReasonConfig",
    "ReplayConfig",
    "ScoreConfig",
    "SelectConfig",
    "formal_extract",
    "formal_judge",
    "formal_measure",
    "formal_reason",
    "formal_replay",
    "formal_score",
    "formal_select",
    "goals_text",
    "score_lemma",
    "score_prompt",
    "score_requests",
    "source_files",
    "tactic_tokens",
]


# -- extract ----------------------------------------------------------------------------


class ExtractConfig(BaseModel):
    """Which Coq sources to read: directories with their logical prefixes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[tuple[str, str], ...] = Field(min_length=1)
    files: tuple[str, ...] = Field(
        (), description="Only these files (names or paths relative to a source directory)."
    )
    workers: int = Field(2, ge=1, le=256)
    lemmas_per_chunk: int = Field(400, ge=1, description="Whole files per chunk, about this many.")


def source_files(cfg: ExtractConfig) -> list[tuple[Path, Path, str]]:
    """The ``(file, root, module)`` triples the extract stage reads, sorted; an unknown
    directory or a ``files`` entry that matches nothing is a :class:`ConfigError`.
    """
    for directory, _ in cfg.sources:
        if not Path(directory).is_dir():
            raise ConfigError(f"source: {directory!r} is not a directory")
    found = discover([(Path(d), logical) for d, logical in cfg.sources])
    if not cfg.files:
        return found
    wanted = set(cfg.files)
    chosen = [f for f in found if f[0].name in wanted or str(f[0].relative_to(f[1])) in wanted]
    seen = {f[0].name for f in chosen} | {str(f[0].relative_to(f[1])) for f in chosen}
    missing = sorted(wanted - seen)
    if missing:
        raise ConfigError(f"files: {', '.join(missing)} not found under the source directories")
    return chosen


def files_digest(cfg: ExtractConfig) -> str:
    """A digest of the source files' names, sizes and modification times: an edited
    file changes the extract stage's cache key.
    """
    h = hashlib.sha256()
    for path, root, module in source_files(cfg):
        for part in (path, path.with_suffix(".glob")):  # premises come from the .glob
            if part.exists():
                st = os.stat(part)
                name = part.relative_to(root)
                h.update(f"{name}|{module}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _file_drop(file: str, reason: str) -> Dropped:
    return Dropped(
        stage="formal_extract",
        reason="unparsable",
        detail=reason,
        target_id=file,
        record_type="file",
        record={"file": file},
    )


@stage(
    "formal_extract",
    params=ExtractConfig,
    kind="source",
    outputs={"lemmas": FormalLemma},
)
async def formal_extract(chunk: Chunk, cfg: ExtractConfig) -> StageResult:
    """Every lemma of the source files with its statement, tactic sentences, the
    file's notations and the premises it uses (from ``.glob``); parallel over files. A
    file that cannot be parsed goes to ``dropped`` with the reason. Chunks hold whole
    files (a file's lemmas replay in one Coq process).
    """
    files = source_files(cfg)
    lemmas, failed = await asyncio.to_thread(extract_all, files, cfg.workers)
    roots = {module: str(root) for _, root, module in files}  # one module per file
    chunks: list[list[FormalLemma]] = [[]]
    last_file = None
    for lemma in lemmas:
        if lemma.file != last_file and len(chunks[-1]) >= cfg.lemmas_per_chunk:
            chunks.append([])
        last_file = lemma.file
        root = roots.get(lemma.module, "")
        chunks[-1].append(lemma.model_copy(update={"metadata": {**lemma.metadata, "root": root}}))
    counts: Counter[str] = Counter(
        {"formal_extract.files": len(files), "formal_extract.lemmas": len(lemmas)}
    )
    if failed:
        counts["formal_extract.files_dropped"] = len(failed)
    return StageResult(
        rows={f"lemmas/{i:05d}": rows for i, rows in enumerate(chunks) if rows},
        dropped=[_file_drop(file, reason) for file, reason in failed],
        counts=counts,
    )


# -- measure and filter -----------------------------------------------------------------


class MeasureConfig(BaseModel):
    """Token lengths (one tokenizer) and the length filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer: str = "cl100k_base"
    min_tokens: int = Field(0, ge=0, description="Min tokens of statement + proof.")
    max_tokens: int = Field(1024, ge=1, description="Max tokens of statement + proof.")
    min_steps: int = Field(3, ge=1, description="Min tactic sentences.")
    max_steps: int = Field(7, ge=1, description="Max tactic sentences.")


def _too(lemma: FormalLemma, cfg: MeasureConfig) -> tuple[str, str] | None:
    steps, tokens = len(lemma.tactics), lemma.proof_tokens or 0
    if steps < cfg.min_steps:
        return "too_few_steps", f"{steps} tactic steps < {cfg.min_steps}"
    if steps > cfg.max_steps:
        return "too_many_steps", f"{steps} tactic steps > {cfg.max_steps}"
    if tokens < cfg.min_tokens:
        return "too_few_tokens", f"{tokens} tokens < {cfg.min_tokens}"
    if tokens > cfg.max_tokens:
        return "too_many_tokens", f"{tokens} tokens > {cfg.max_tokens}"
    return None


@stage(
    "formal_measure",
    params=MeasureConfig,
    inputs={"lemmas": FormalLemma},
    outputs={"measured": FormalLemma},
)
async def formal_measure(chunk: Chunk, cfg: MeasureConfig) -> StageResult:
    """Tokens of the statement, of statement + proof and of the tactic sequence; a
    lemma outside the step or token bounds goes to ``dropped`` with the reason. (It runs
    before replay: it reads only the text, so Coq replays only lemmas that can be kept.)
    """
    lemmas: list[FormalLemma] = chunk.rows("lemmas")
    counter = token_counter(cfg.tokenizer)
    statements = counter.count([x.statement for x in lemmas])
    proofs = counter.count([f"{x.statement}\n{x.proof}" for x in lemmas])
    tactics = counter.count([x.tactic_text for x in lemmas])
    kept: list[FormalLemma] = []
    dropped: list[Dropped] = []
    counts: Counter[str] = Counter()
    for lemma, s, p, t in zip(lemmas, statements, proofs, tactics, strict=True):
        measured = lemma.model_copy(
            update={
                "statement_tokens": s,
                "proof_tokens": p,
                "tactic_tokens": t,
                "tokenizer": counter.name,
            }
        )
        why = _too(measured, cfg)
        if why is None:
            kept.append(measured)
            counts["formal_measure.kept"] += 1
        else:
            dropped.append(drop("formal_measure", why[0], measured, lemma.id, why[1]))
            counts[f"formal_measure.{why[0]}"] += 1
    return StageResult(rows={"measured": kept}, dropped=dropped, counts=counts)


# -- replay ------------------------------------------------------------------------------


class ReplayConfig(BaseModel):
    """Replay through Coq: load paths, the timeout per sentence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[tuple[str, str], ...] = ()
    timeout_s: float = Field(30.0, gt=0, le=3600, description="Per Coq sentence.")


@stage(
    "formal_replay",
    params=ReplayConfig,
    inputs={"measured": FormalLemma},
    outputs={"replayed": FormalLemma},
)
async def formal_replay(chunk: Chunk, cfg: ReplayConfig) -> StageResult:
    """Each lemma's proof replayed through Coq (``coqidetop``, one long-lived process
    per file, restarted on a crash or a timeout), with the goals before each tactic; a
    proof that does not replay to its terminator goes to ``dropped`` with Coq's error.
    """
    lemmas: list[FormalLemma] = chunk.rows("measured")
    by_file: dict[tuple[str, str], list[FormalLemma]] = {}
    for lemma in lemmas:
        key = (str(lemma.metadata.get("root") or ""), lemma.file)
        by_file.setdefault(key, []).append(lemma)
    load_paths = [(Path(d), logical) for d, logical in cfg.sources]
    kept: list[FormalLemma] = []
    dropped: list[Dropped] = []
    counts: Counter[str] = Counter()
    for (root, file), group in by_file.items():
        path = Path(root) / file
        outcomes = await asyncio.to_thread(
            replay_file,
            path,
            group[0].module,
            group,
            load_paths=load_paths,
            timeout_s=cfg.timeout_s,
        )
        for lemma, (replayed, error) in zip(group, outcomes, strict=True):
            if replayed is not None:
                kept.append(replayed)
                counts["formal_replay.replayed"] += 1
            else:
                detail = error or "did not replay"
                dropped.append(drop("formal_replay", "replay_failed", lemma, lemma.id, detail))
                counts["formal_replay.failed"] += 1
    return StageResult(rows={"replayed": kept}, dropped=dropped, counts=counts)


# -- diverse subset ----------------------------------------------------------------------


class SelectConfig(BaseModel):
    """The BM25-diverse subset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_documents: int = Field(100, ge=1, description="How many lemmas to keep.")
    seed: int = 0
    items_per_chunk: int = Field(16, ge=1, description="Lemmas per chunk of the LLM stages.")


@stage(
    "formal_select",
    params=SelectConfig,
    kind="whole",
    inputs={"replayed": FormalLemma},
    outputs={"selected": FormalLemma},
)
async def formal_select(chunk: Chunk, cfg: SelectConfig) -> StageResult:
    """``num_documents`` lemmas chosen by greedy farthest-point over BM25 similarity
    of statement + proof (seeded), in pick order.
    """
    lemmas: list[FormalLemma] = sorted(chunk.rows("replayed"), key=lambda x: (x.file, x.start))
    docs = [f"{x.statement}\n{x.proof}" for x in lemmas]
    picked = await asyncio.to_thread(select_diverse, docs, cfg.num_documents, cfg.seed)
    rows = [
        lemmas[i].model_copy(update={"metadata": {**lemmas[i].metadata, "pick": rank}})
        for rank, i in enumerate(picked)
    ]
    counts = Counter(
        {"formal_select.selected": len(rows), "formal_select.not_selected": len(docs) - len(rows)}
    )
    return StageResult(rows=dict(split_rows("selected", rows, cfg.items_per_chunk)), counts=counts)


# -- reasonings --------------------------------------------------------------------------


class ReasonConfig(BaseModel):
    """M reasonings per lemma."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampling: SamplingParams


def goals_text(lemma: FormalLemma) -> str:
    """The goals before each tactic, as the reasoning prompt shows them."""
    if not lemma.states:
        return "(not recorded)"
    lines = []
    for step, (tactic, state) in enumerate(zip(lemma.tactics, lemma.states, strict=False), 1):
        lines.append(f"Step {step} ({tactic}):")
        if not state.goals:
            lines.append("  no goals")
        for goal in state.goals:
            lines += [f"  {h}" for h in goal.hypotheses]
            lines.append(f"  ============================\n  {goal.conclusion}")
    return "\n".join(lines)


@stage(
    "formal_reason",
    params=ReasonConfig,
    roles=("reasoner",),
    prompts=("formal_reasoning",),
    inputs={"selected": FormalLemma},
    outputs={"reasoned": FormalLemma},
)
async def formal_reason(chunk: Chunk, cfg: ReasonConfig) -> StageResult:
    """M reasonings per lemma from the reasoning model (any backend), the prompt giving
    the statement, the goals and the proof. Finished calls are cached: a re-run pays
    only for the lemmas not done.
    """
    lemmas: list[FormalLemma] = chunk.rows("selected")
    prompt = load_prompt("formal_reasoning")
    requests = [
        GenRequest(
            id=x.id,
            messages=[
                {
                    "role": "user",
                    "content": prompt.render(
                        module=x.module, statement=x.statement, goals=goals_text(x), proof=x.proof
                    ),
                }
            ],
            sampling=cfg.sampling,
        )
        for x in lemmas
    ]
    gens = await generate(chunk.rt, "reasoner", requests, stage="formal_reason")
    failed = [g.error for g in gens if g.error is not None]
    raise_if_transient("formal_reason", chunk.spec.key, failed, len(gens))
    kept: list[FormalLemma] = []
    dropped: list[Dropped] = []
    counts: Counter[str] = Counter()
    for lemma, g in zip(lemmas, gens, strict=True):
        texts = [c.text.strip() for c in sorted(g.choices, key=lambda c: c.index)]
        reasonings = [
            FormalReasoning(index=i, text=t, model=g.model) for i, t in enumerate(texts) if t
        ]
        if g.error is not None or not reasonings:
            why = g.error.message if g.error is not None else "every reasoning was empty"
            dropped.append(drop("formal_reason", "no_reasoning", lemma, lemma.id, why))
            counts["formal_reason.failed"] += 1
            continue
        kept.append(lemma.model_copy(update={"reasonings": reasonings}))
        counts["formal_reason.reasonings"] += len(reasonings)
    return StageResult(
        rows={"reasoned": kept},
        dropped=dropped,
        counts=counts,
        errors=failed,
        attempted=len(lemmas),
    )


# -- score -------------------------------------------------------------------------------


class ScoreConfig(BaseModel):
    """Scoring with prompt logprobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_reasoning_chars: int = Field(
        8000, ge=100, description="A longer reasoning is cut to this many characters."
    )


def score_prompt(lemma: FormalLemma, reasoning: str | None) -> str:
    """The text the scoring model reads: the statement, the reasoning (when given),
    then ``Proof.`` and the actual tactic sentences, which are scored.
    """
    parts = [f"(* Lemma *)\n{lemma.statement}\n"]
    if reasoning is not None:
        parts.append(f"(* Reasoning *)\n{reasoning}\n")
    parts.append(f"(* Proof *)\nProof.\n{lemma.tactic_text}")
    return "\n".join(parts)


def tactic_tokens(prompt_logprobs: Sequence[TokenLogprob], suffix: str) -> list[TokenLogprob]:
    """The prompt tokens that spell ``suffix`` (the tactics, at the end of the prompt):
    from the last token back until their text covers it; the first may also hold the
    whitespace before the tactics (``"\\nintros"``). A :class:`ValueError` when the
    tokens' texts do not join up to the suffix (a token split inside a multi-byte
    character decodes to U+FFFD; a tokenizer whose token texts are not the text, e.g.
    SentencePiece's ``▁``; a token that holds text before the tactics): the span would
    be a guess, and a guessed span scores different tokens with and without the
    reasoning.
    """
    out: list[TokenLogprob] = []
    covered = 0
    for token in reversed(prompt_logprobs):
        if covered >= len(suffix):
            break
        out.append(token)
        covered += len(token.token)
    out.reverse()
    text = "".join(t.token for t in out)
    if text.endswith(suffix) and not text[: len(text) - len(suffix)].strip():
        return out
    if covered < len(suffix):
        why = f"they cover {covered} of {len(suffix)} characters"
    elif "\ufffd" in text:
        why = "a token splits a multi-byte character"
    else:
        why = "a token straddles the start of the tactics or its text is not the text"
    raise ValueError(f"the scoring model's prompt tokens do not spell the tactics: {why}")


def _mean_logprob(tokens: Sequence[TokenLogprob]) -> float:
    return sum(t.logprob for t in tokens) / len(tokens)


def score_requests(lemma: FormalLemma, cfg: ScoreConfig) -> list[GenRequest]:
    """The scoring requests of one lemma: ``<id>:none`` (statement alone) and
    ``<id>:<index>`` per reasoning, each asking for prompt logprobs, one token out.
    """
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    texts: list[tuple[str, str | None]] = [("none", None)]
    texts += [(str(r.index), r.text[: cfg.max_reasoning_chars]) for r in lemma.reasonings]
    return [
        GenRequest(
            id=f"{lemma.id}:{tag}",
            prompt=score_prompt(lemma, text),
            sampling=greedy,
            prompt_logprobs=0,
        )
        for tag, text in texts
    ]


def score_lemma(lemma: FormalLemma, by_id: dict[str, Generation]) -> FormalLemma:
    """``lemma`` with every reasoning's score from its scoring generations (see
    :func:`score_requests`): mean logprob per tactic token with the reasoning minus
    without. A reasoning whose call failed is left out (its reason in the lemma's
    ``metadata["not_scored"]``); a failed call without the reasoning, or no reasoning
    scored, is a :class:`ValueError`.
    """
    base = _scored_mean(by_id[f"{lemma.id}:none"], lemma)
    scored = []
    skipped: dict[str, JsonValue] = {}
    for r in lemma.reasonings:
        g = by_id[f"{lemma.id}:{r.index}"]
        try:
            mean = _scored_mean(g, lemma)
        except ValueError as e:
            skipped[str(r.index)] = str(e)
            continue
        scored.append(
            r.model_copy(update={"score": mean - base, "logprob_with": mean, "scored_by": g.model})
        )
    if not scored:
        raise ValueError(f"no reasoning could be scored: {next(iter(skipped.values()), '')}")
    meta: dict[str, JsonValue] = {**lemma.metadata, "logprob_without": base}
    if skipped:
        meta["not_scored"] = skipped
    return lemma.model_copy(update={"reasonings": scored, "metadata": meta})


@stage(
    "formal_score",
    params=ScoreConfig,
    roles=("scorer",),
    inputs={"reasoned": FormalLemma},
    outputs={"scored": FormalLemma},
)
async def formal_score(chunk: Chunk, cfg: ScoreConfig) -> StageResult:
    """Each reasoning scored by the scoring model's prompt logprobs: the mean
    log-probability per token of the actual tactic sequence given statement + reasoning,
    minus the same given the statement alone (one request per reasoning and one without,
    each with ``max_tokens=1``).
    """
    lemmas: list[FormalLemma] = chunk.rows("reasoned")
    requests = [r for x in lemmas for r in score_requests(x, cfg)]
    gens = await generate(chunk.rt, "scorer", requests, stage="formal_score")
    failed = [g.error for g in gens if g.error is not None]
    raise_if_transient("formal_score", chunk.spec.key, failed, len(gens))
    answered = [g for g in gens if g.error is None]
    if answered and not any(g.prompt_logprobs for g in answered):
        raise ConfigError(
            f"formal_score: the scoring model ({answered[0].model or 'scorer'}) returned no "
            "prompt logprobs; score with vLLM: the engine (scorer_backend kind 'engine'), "
            "the vllm pool ('deployment'), or a vLLM server (scorer.base_url)"
        )
    by_id = {g.id: g for g in gens}
    kept: list[FormalLemma] = []
    dropped: list[Dropped] = []
    counts: Counter[str] = Counter()
    for x in lemmas:
        try:
            done = score_lemma(x, by_id)
        except ValueError as e:
            dropped.append(drop("formal_score", "not_scored", x, x.id, str(e)))
            counts["formal_score.failed"] += 1
            continue
        kept.append(done)
        counts["formal_score.scored"] += len(done.reasonings)
        counts["formal_score.reasoning_failed"] += len(x.reasonings) - len(done.reasonings)
    return StageResult(
        rows={"scored": kept},
        dropped=dropped,
        counts=counts,
        errors=failed,
        attempted=len(requests),
    )


def _scored_mean(g: Generation, lemma: FormalLemma) -> float:
    if g.error is not None:
        raise ValueError(f"the scoring call failed: {g.error.message}")
    if not g.prompt_logprobs:
        raise ValueError(
            "the scoring model returned no prompt logprobs (it must be vLLM: the engine, "
            "the vllm pool, or a vLLM server)"
        )
    return _mean_logprob(tactic_tokens(g.prompt_logprobs, lemma.tactic_text))


# -- judge and pick ----------------------------------------------------------------------


class JudgeConfig(BaseModel):
    """The constraint check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Off: the best-scored reasoning is kept.")
    max_checks: int = Field(20, ge=1, description="Reasonings judged per lemma at most.")


class JudgeReply(BaseModel):
    """The judge's structured verdict (lenient: a weak model may omit the reason)."""

    relies_on_tactics: bool = True
    reason: str = ""


async def _judge_one(
    chunk: Chunk, lemma: FormalLemma, r: FormalReasoning
) -> tuple[FormalReasoning, ErrorInfo | None]:
    text = load_prompt("formal_judge").render(
        statement=lemma.statement, tactics=lemma.tactic_text, reasoning=r.text
    )
    got = await chunk.rt.client("judge").structured(
        [{"role": "user", "content": text}],
        JudgeReply,
        stage="formal_judge",
        raise_on_error=False,
    )
    if got.value is None:
        for error in (got.result.error, got.error):
            if error is not None and error.transient:
                return r, error
        error = got.error or got.result.error
        why = f"the judge gave no verdict ({error.message if error else 'no reply'})"
        return r.model_copy(update={"verdict": "fail", "verdict_reason": why}), None
    verdict = "fail" if got.value.relies_on_tactics else "pass"
    return r.model_copy(update={"verdict": verdict, "verdict_reason": got.value.reason}), None


@stage(
    "formal_judge",
    params=JudgeConfig,
    roles=("judge",),
    prompts=("formal_judge",),
    inputs={"scored": FormalLemma},
    outputs={"formal": FormalLemma, "rejected": FormalLemma},
)
async def formal_judge(chunk: Chunk, cfg: JudgeConfig) -> StageResult:
    """From the best-scored reasoning down, the judge checks that it does not rely on
    already knowing the tactics; the first that passes is kept (``formal``). A lemma
    with none goes to ``rejected`` with every verdict.
    """
    lemmas: list[FormalLemma] = chunk.rows("scored")
    counts: Counter[str] = Counter()
    errors: list[ErrorInfo] = []

    async def one(x: FormalLemma) -> FormalLemma:
        order = sorted(
            x.reasonings,
            key=lambda r: (-(r.score if r.score is not None else float("-inf")), r.index),
        )
        if not cfg.enabled:  # the best-scored one, unjudged
            return x.model_copy(update={"chosen": order[0].index if order else None})
        judged: dict[int, FormalReasoning] = {}
        chosen = None
        for r in order[: cfg.max_checks]:
            verdict, error = await _judge_one(chunk, x, r)
            if error is not None:
                errors.append(error)
                break
            judged[r.index] = verdict
            counts[f"formal_judge.{verdict.verdict}"] += 1
            if verdict.verdict == "pass":
                chosen = r.index
                break
        reasonings = [judged.get(r.index, r) for r in x.reasonings]
        return x.model_copy(update={"reasonings": reasonings, "chosen": chosen})

    done = await asyncio.gather(*(one(x) for x in lemmas))
    raise_if_transient("formal_judge", chunk.spec.key, errors, len(lemmas))
    kept = [x for x in done if x.chosen is not None]
    rejected = [x for x in done if x.chosen is None]
    counts["formal_judge.kept"] += len(kept)
    counts["formal_judge.rejected"] += len(rejected)
    return StageResult(
        rows={"formal": kept, "rejected": rejected},
        counts=counts,
        attempted=len(lemmas),
    )


def export_row(x: FormalLemma) -> dict[str, Any]:
    """One row of ``formal.parquet``: the lemma, its goals, the chosen reasoning with
    its score and the judge's verdict.
    """
    chosen = next(r for r in x.reasonings if r.index == x.chosen)
    return {
        "id": x.id,
        "name": x.name,
        "module": x.module,
        "file": x.file,
        "statement": x.statement,
        "proof": x.proof,
        "tactics": list(x.tactics),
        "goals": [[g.model_dump(mode="json") for g in s.goals] for s in x.states or []],
        "premises": list(x.premises),
        "reasoning": chosen.text,
        "reasoning_model": chosen.model,
        "score": chosen.score,
        "logprob_with": chosen.logprob_with,
        "logprob_without": x.metadata.get("logprob_without"),
        "scored_by": chosen.scored_by,
        "verdict": chosen.verdict,
        "verdict_reason": chosen.verdict_reason,
        "reasonings": len(x.reasonings),
        "tactic_tokens": x.tactic_tokens,
        "proof_tokens": x.proof_tokens,
    }
