"""The ``sample`` flow: N solutions per problem at a temperature, with the logprobs of
their tokens, graded against the reference answers: the raw material of
reasoning selection (best-of-N, pass@k difficulty, rejection sampling).

Generation runs on :class:`~mathmill.tasks.generation.GenBackend`: an endpoint (the
embedded model by default, or a vLLM OpenAI server), the ``generate`` deployment on the
``vllm`` work pool, or vLLM in this process.

>>> SampleParams(input="problems.jsonl").samples
4
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from mathmill.flows.generate import generate_rows
from mathmill.flows.options import InputFields, ModelRole, StorageFields
from mathmill.flows.resources import open_runtime
from mathmill.flows.synthesize import IncompleteRun
from mathmill.grading.equivalence import grade
from mathmill.grading.extract import extract_answer
from mathmill.llm.usage import UsageMeter
from mathmill.prompts import load_prompt
from mathmill.records import (
    Generation,
    GenRequest,
    Problem,
    Sample,
    SampleStatus,
    SamplingParams,
    stable_id,
)
from mathmill.storage import RunStore
from mathmill.tasks.export import dump_json, export_jsonl, remove_stale_chunks, write_run_file
from mathmill.tasks.generation import GenBackend
from mathmill.tasks.runtime import IncompleteChunk, use_runtime
from mathmill.tasks.tir import load_spec, load_task

__all__ = ["SampleParams", "SampleResult", "grade_samples", "run_sample", "sample"]


class SampleParams(InputFields, StorageFields):
    """Parameters of the sample flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(
        "runs/sample",
        description="Run directory: local path, s3://bucket/prefix, or a path inside "
        "storage_block (re-run to resume).",
    )
    samples: int = Field(4, ge=1, le=1024, description="Solutions per problem (n).")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_tokens: int = Field(512, ge=1, le=131072, description="Tokens per solution.")
    seed: int = Field(0, ge=0, description="Sampling seed (the same seed, the same samples).")
    top_logprobs: int = Field(
        0, ge=0, le=20, description="Alternatives kept per token, besides its own logprob."
    )
    chunk_size: int = Field(200, ge=1, le=100_000, description="Problems per load chunk.")
    backend: GenBackend = Field(
        default_factory=GenBackend, description="Where generation runs (endpoint by default)."
    )
    model: ModelRole = Field(
        default_factory=ModelRole,
        description="The endpoint backend's model (default: the embedded model).",
    )
    concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight (endpoint).")
    dry_run: bool = Field(False, description="Validate, check the input; call nothing.")


class SampleResult(BaseModel):
    """Where a sample run's outputs are, and its statistics."""

    out: str
    dry_run: bool = False
    problems: int = 0
    samples: int = 0
    stats: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    wall_s: float = 0.0
    usage: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="LLM calls, cached, errors, retries, tokens by stage."
    )


@flow(name="sample", validate_parameters=True, log_prints=False)
async def sample(params: SampleParams) -> SampleResult:
    """N solutions per problem with logprobs, graded against the reference answers."""
    return await run_sample(params)


def _sampling(params: SampleParams) -> SamplingParams:
    return SamplingParams(
        n=params.samples,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        seed=params.seed,
        logprobs=True,
        top_logprobs=params.top_logprobs or None,
    )


def _requests(problems: Sequence[Problem], sampling: SamplingParams) -> list[GenRequest]:
    system = load_prompt("sample_system").text
    return [
        GenRequest(
            id=p.id,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": p.statement},
            ],
            sampling=sampling,
        )
        for p in problems
    ]


def _grade(
    reference: str | None, text: str, problem: str | None = None
) -> tuple[SampleStatus, str | None, str]:
    found = extract_answer(text)
    if found is None:
        return "no_answer", None, "no final answer in the text"
    if reference is None:
        return "unvalidated", found.text, "no reference answer"
    verdict = grade(reference, found.text, problem=problem)  # problem: its option list
    status: SampleStatus = "correct" if verdict.equivalent else "incorrect"
    return status, found.text, f"{verdict.rule}: {verdict.reason}".strip(": ")


def grade_samples(
    problems: Sequence[Problem], gens: Sequence[Generation], sampling: SamplingParams
) -> list[Sample]:
    """One :class:`Sample` per generated solution (or one ``error`` row for a request
    that failed), graded against the problem's answer; ``sampling`` is what the
    requests asked for.
    """
    prompt = load_prompt("sample_system").ref
    by_id = {p.id: p for p in problems}
    rows: list[Sample] = []
    for g in gens:
        p = by_id[g.id]
        base: dict[str, Any] = {"problem_id": p.id, "problem": p.statement, "reference": p.answer}
        base |= {"model": g.model, "backend": g.backend, "prompt": prompt, "sampling": sampling}
        if g.error is not None:
            rows.append(
                Sample(
                    id=stable_id(p.id, "error"),
                    index=0,
                    text="",
                    status="error",
                    reason=g.error.message,
                    **base,
                )
            )
            continue
        for c in g.choices:
            status, answer, reason = _grade(p.answer, c.text, p.statement)
            lps = c.logprobs
            total = sum(t.logprob for t in lps) if lps else None
            rows.append(
                Sample(
                    id=stable_id(p.id, str(c.index), g.model),
                    index=c.index,
                    text=c.text,
                    final_answer=answer,
                    status=status,
                    reason=reason,
                    finish_reason=c.finish_reason,
                    tokens=c.tokens,
                    logprob_sum=total,
                    logprob_mean=total / len(lps) if lps and total is not None else None,
                    logprobs=lps,
                    **base,
                )
            )
    return rows


def sample_stats(rows: Sequence[Sample], problems: int, dropped: int = 0) -> list[dict[str, Any]]:
    """The run's statistics as table rows (metric, value); ``dropped``: input rows the
    load stage did not pass on (malformed, duplicate).
    """
    per: dict[str, list[Sample]] = defaultdict(list)
    for r in rows:
        per[r.problem_id].append(r)
    graded = [r for r in rows if r.status in ("correct", "incorrect", "no_answer")]
    correct = sum(r.status == "correct" for r in rows)
    any_correct = sum(any(s.status == "correct" for s in v) for v in per.values())
    means = [r.logprob_mean for r in rows if r.logprob_mean is not None]

    def rate(n: int, d: int) -> float:
        return round(n / d, 4) if d else 0.0

    return [
        {"metric": "problems", "value": problems},
        {"metric": "dropped input rows", "value": dropped},
        {"metric": "samples", "value": sum(r.status != "error" for r in rows)},
        {"metric": "accuracy (correct / graded samples)", "value": rate(correct, len(graded))},
        {"metric": "pass@n (a correct sample)", "value": rate(any_correct, len(per))},
        {"metric": "no answer", "value": sum(r.status == "no_answer" for r in rows)},
        {"metric": "unvalidated", "value": sum(r.status == "unvalidated" for r in rows)},
        {"metric": "errors", "value": sum(r.status == "error" for r in rows)},
        {"metric": "mean tokens", "value": rate(sum(r.tokens for r in rows), len(rows))},
        {"metric": "mean logprob per token", "value": round(sum(means) / len(means), 4)}
        if means
        else {"metric": "mean logprob per token", "value": None},
    ]


async def run_sample(params: SampleParams) -> SampleResult:
    """load → generate (N samples per problem, on the backend) → grade → exports."""
    logger = get_run_logger()
    params.check_input()
    if params.dry_run:
        logger.info("dry run: %s", params.model_dump_json())
        return SampleResult(out=params.out, dry_run=True)
    started = time.perf_counter()
    storage = await params.storage_config(params.out)
    roles = {"sampler": params.model}
    if params.backend.kind != "endpoint":
        roles = {}
    async with open_runtime(storage, roles, sandbox=None, row_concurrency=params.concurrency) as rt:
        with use_runtime(rt):
            spec = load_spec(rt.store.url, params.load_config(params.chunk_size))
            loaded = await params.with_results(load_task)(spec, params.chunk_size)
            refs = [r for name, r in sorted(loaded.refs.items()) if name.startswith("problems")]
            problems = [
                p for ref in refs for p in rt.store.dataset("problems").read_chunk(ref, Problem)
            ]
            sampling = _sampling(params)
            requests = _requests(problems, sampling)
            try:
                gens = await generate_rows(
                    rt,
                    requests,
                    params.backend,
                    stage="sample",
                    role="sampler",
                    storage=params,
                    out=params.out,
                )
            except IncompleteChunk as e:
                message = (
                    f"generation did not finish: {e}; finished chunks are kept in "
                    f"{rt.store.url}; re-run the same command to resume"
                )
                _write_incomplete_report(rt.store, message, rt.pool.meter)
                raise IncompleteRun(message) from e
            rows = grade_samples(problems, gens, sampling)
            return await _finish(
                params, rt.store, loaded.refs, problems, rows, started, rt.pool.meter
            )


def _write_incomplete_report(store: RunStore, message: str, meter: UsageMeter) -> None:
    """report.md of a run that stopped: why, and the calls made (retries included)."""
    lines = ["# sample run: incomplete", "", message, "", "## LLM usage", "", meter.to_markdown()]
    write_run_file(store, "report.md", ("\n".join(lines) + "\n").encode(), failed=True)


async def _finish(
    params: SampleParams,
    store: RunStore,
    load_refs: dict[str, Any],
    problems: Sequence[Problem],
    rows: Sequence[Sample],
    started: float,
    meter: UsageMeter,
) -> SampleResult:
    size = 1000
    keep = [
        store.dataset("samples").write_chunk(f"samples-{i // size:05d}", rows[i : i + size])
        for i in range(0, len(rows), size)
    ]
    keep += list(load_refs.values())
    remove_stale_chunks(store, ("samples", "problems", "dropped"), keep)
    dropped = [r for r in keep if r.dataset == "dropped"]
    outputs = {
        "samples": f"{store.url}/samples/",
        "samples.jsonl": export_jsonl(
            store, "samples.jsonl", [r for r in keep if r.dataset == "samples"]
        ),
        "dropped.jsonl": export_jsonl(store, "dropped.jsonl", dropped),
        "report": f"{store.url}/report.md",
    }
    stats = sample_stats(rows, len(problems), sum(r.rows for r in dropped))
    wall = time.perf_counter() - started
    lines = [
        "# sample run",
        "",
        f"{len(problems)} problems, {params.samples} samples each, temperature "
        f"{params.temperature}, backend {params.backend.kind}, {wall:.1f}s.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {r['metric']} | {r['value']} |" for r in stats),
        "",
        "## Outputs",
        "",
        *(f"- {k}: {v}" for k, v in outputs.items()),
    ]
    if meter.stages():  # endpoint calls made here (a deployment's are in its own runs)
        lines += ["", "## LLM usage", "", meter.to_markdown()]
    report = "\n".join(lines) + "\n"
    store.write_bytes("report.md", report.encode())
    result = SampleResult(
        out=store.url,
        problems=len(problems),
        samples=len(rows),
        stats={str(r["metric"]): r["value"] for r in stats},
        outputs=outputs,
        wall_s=wall,
        usage=meter.summary(),
    )
    manifest = {"params": params.model_dump(mode="json"), "result": result.model_dump(mode="json")}
    store.write_bytes("manifest.json", dump_json(manifest))
    await acreate_table_artifact(stats, key="sample-stats", description="sample statistics")
    await acreate_markdown_artifact(report, key="sample-report", description="sample run report")
    get_run_logger().info("sample: %s", ", ".join(f"{r['metric']}={r['value']}" for r in stats[:4]))
    return result
