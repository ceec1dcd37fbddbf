"""The pipeline kit's promise: a new stage, declared in a few lines, gets caching,
resume, CLI options and artifacts with no other change (the worked example of
docs/pipelines.md), and the DAG runner's chunk plumbing (lanes, slices, whole stages,
failures) on real Parquet and a real Prefect server.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from pydantic import BaseModel, Field

from mathmill.errors import IncompleteRun
from mathmill.flows.options import InputFields, StorageFields
from mathmill.pipeline.dag import Pipeline, Resources, Step, run_pipeline
from mathmill.pipeline.finish import RunResult
from mathmill.pipeline.stage import Chunk, StageResult, stage, stage_code
from mathmill.records import ErrorInfo, Problem
from mathmill.storage import RunStore
from mathmill.tasks.load import LoadConfig, load

# -- the worked example (docs/pipelines.md): a stage and a pipeline ----------------------
# ---- example start


class LengthConfig(BaseModel):
    """Params of the ``length`` stage."""

    unit: int = Field(1, ge=1, description="Characters per unit.")


@stage("length", params=LengthConfig, inputs={"problems": Problem}, outputs={"lengths": Problem})
async def length(chunk: Chunk, cfg: LengthConfig) -> StageResult:
    """The length of each problem statement, in units."""
    rows = [
        p.model_copy(update={"metadata": {"length": len(p.statement) // cfg.unit}})
        for p in chunk.rows("problems")
    ]
    CALLS.append(chunk.index)
    if chunk.index in FAIL:  # what an endpoint outage looks like to the kit
        return StageResult(errors=[ErrorInfo(kind="timeout", message="endpoint down")])
    return StageResult(rows={"lengths": rows}, counts=Counter({"length.measured": len(rows)}))


class LengthParams(InputFields, StorageFields):
    """Parameters of the ``lengths`` pipeline."""

    out: str = Field("runs/lengths", description="Run directory (re-run to resume).")
    unit: int = Field(1, ge=1, description="Characters per unit.")
    chunk_size: int = Field(2, ge=1, description="Problems per chunk.")


LENGTHS: Pipeline[LengthParams, RunResult] = Pipeline(
    name="lengths",
    params=LengthParams,
    steps=[
        Step(load, lambda p: LoadConfig(**p.load_config(p.chunk_size))),
        Step(length, lambda p: LengthConfig(unit=p.unit)),
    ],
    resources=lambda p: Resources(roles={}),
    result=RunResult,
    exports=("lengths", "dropped"),
)
# ---- example end

CALLS: list[int] = []
FAIL: set[int] = set()


@flow(name="lengths")
async def lengths(params: LengthParams) -> RunResult:
    return await run_pipeline(LENGTHS, params)


def _problems(path: Path, n: int) -> Path:
    rows = [{"id": f"p{i}", "problem": "x" * (10 + i), "answer": str(i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    FAIL.clear()


def test_the_worked_example_is_short() -> None:
    source = Path(__file__).read_text()
    example = source.split("# ---- example start")[1].split("# ---- example end")[0]
    stage_part = example.split("class LengthParams")[0]
    assert len([line for line in stage_part.splitlines() if line.strip()]) <= 40


def test_a_new_stage_gets_caching_resume_and_artifacts(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    params = LengthParams(input=str(_problems(tmp_path / "p.jsonl", 5)), out=str(tmp_path / "r"))
    FAIL.add(1)
    with pytest.raises(IncompleteRun, match=r"lengths: 1 of 4 chunks did not finish.*re-run"):
        asyncio.run(lengths(params))
    assert sorted(CALLS) == [0, 1, 2]  # 5 problems, chunks of 2: three chunks tried
    store = RunStore(str(tmp_path / "r"))
    assert len(store.dataset("lengths").read_all(Problem)) == 3  # the finished chunks kept
    assert "INCOMPLETE" in (tmp_path / "r" / "report.md").read_text()

    FAIL.clear()
    CALLS.clear()
    result = asyncio.run(lengths(params))
    assert CALLS == [1]  # resume: only the chunk that failed
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "lengths.jsonl").read_text().splitlines()
    ]
    assert [r["metadata"]["length"] for r in rows] == [10, 11, 12, 13, 14]
    assert result.counts["length.measured"] == 5 and result.counts["load.problems"] == 5
    assert result.stages["length"]["chunks"] == 3 and result.stages["length"]["reused"] == 2

    CALLS.clear()
    again = asyncio.run(lengths(params))
    assert CALLS == [] and again.stages["length"]["reused"] == 3  # all cached
    assert again.counts == result.counts

    CALLS.clear()
    changed = asyncio.run(lengths(params.model_copy(update={"unit": 2})))
    assert sorted(CALLS) == [0, 1, 2]  # new params: a new cache key for every chunk
    assert changed.stages["load"]["reused"] == 1  # ... but not for the stage before
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "lengths.jsonl").read_text().splitlines()
    ]
    assert [r["metadata"]["length"] for r in rows] == [5, 5, 6, 6, 7]
    assert len(RunStore(str(tmp_path / "r")).dataset("lengths").keys()) == 3  # old ones gone

    counts = _artifact("lengths-counts")
    assert {"stage": "length", "outcome": "measured", "rows": 5} in counts
    assert float(_artifact("lengths-progress")) == 100.0
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["params"]["unit"] == 2


def _artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> Any:
        async with get_client() as client:
            flt = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            found = await client.read_artifacts(
                artifact_filter=flt, sort=ArtifactSort.CREATED_DESC, limit=1
            )
            return found[0].data

    data = asyncio.run(read())
    return json.loads(data) if isinstance(data, str) and data[:1] in "[{" else data


def test_the_plain_run_matches_and_the_code_key_follows_imports(tmp_path: Path) -> None:
    params = LengthParams(input=str(_problems(tmp_path / "p.jsonl", 3)), out=str(tmp_path / "r"))
    result = asyncio.run(run_pipeline(LENGTHS, params, prefect=False))
    assert result.counts["length.measured"] == 3 and sorted(CALLS) == [0, 1]
    # the stage's code key covers what it imports (records), not plumbing (storage)
    from mathmill.pipeline import stage as kit

    closure = kit._closure("mathmill.tasks.load")
    assert {"mathmill.tasks.load", "mathmill.records", "mathmill.sources"} <= closure
    assert "mathmill.storage" not in closure and "mathmill.llm.client" not in closure
    assert stage_code("mathmill.tasks.load") != stage_code("mathmill.tasks.synthesize")


def test_the_imports_a_key_follows_are_cached_by_source_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a module imports is parsed once and kept on disk by its text: a warm
    cache gives the same closure, and an edited file is parsed again.
    """
    import importlib
    import sys

    from mathmill.pipeline import stage as kit

    monkeypatch.setenv("MATHMILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kit, "_unsaved", set())
    kit._import_cache.cache_clear()
    module = tmp_path / "mm_plugin_stage.py"
    module.write_text("import json\nfrom mathmill.records import Problem\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("mm_plugin_stage")
    try:
        cold = kit._imports("mm_plugin_stage")
        assert "mathmill.records" in cold
        kit._save_import_cache()
        assert (tmp_path / "cache" / "stage-imports-v1.json").is_file()
        kit._import_cache.cache_clear()  # a new process: read back from disk
        assert kit._imports("mm_plugin_stage") == cold and not kit._unsaved
        module.write_text("from mathmill.sources import read_problems\n")
        edited = kit._imports("mm_plugin_stage")
        assert "mathmill.sources" in edited and "mathmill.records" not in edited
    finally:
        sys.modules.pop("mm_plugin_stage", None)
        kit._origin.cache_clear()
        kit._import_cache.cache_clear()


def test_the_new_pipeline_gets_its_command_line(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    import typer
    from typer.testing import CliRunner

    from mathmill.flows.cli_params import params_command

    app = typer.Typer()

    def run(params: LengthParams, _options: Any) -> None:
        """Measure the problems."""
        asyncio.run(lengths(params))

    params_command(app, "lengths", LengthParams, run)
    app.command("other")(lambda: None)  # a group, as `mathmill run` is
    runner = CliRunner()
    shown = runner.invoke(app, ["lengths", "--help"], terminal_width=200)
    assert shown.exit_code == 0 and "--unit" in shown.output
    assert "Characters per unit." in shown.output and "--chunk-size" in shown.output
    problems = _problems(tmp_path / "p.jsonl", 4)
    args = ["lengths", "--input", str(problems), "--out", str(tmp_path / "r"), "--unit", "5"]
    done = runner.invoke(app, [*args, "--set", "chunk_size=3"])
    assert done.exit_code == 0, done.output
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "lengths.jsonl").read_text().splitlines()
    ]
    assert [r["metadata"]["length"] for r in rows] == [2, 2, 2, 2]
    assert sorted(CALLS) == [0, 1]  # chunks of 3 from --set
    bad = runner.invoke(app, [*args, "--unit", "0"])
    assert bad.exit_code != 0 and "unit" in str(bad.output) + str(bad.exception)


# -- the DAG runner's edges ---------------------------------------------------------


class NoParams(BaseModel):
    """No params."""


@stage(
    "broken",
    params=NoParams,
    prompts=("no_such_template",),
    inputs={"problems": Problem},
    outputs={"out": Problem},
)
async def broken(chunk: Chunk, cfg: NoParams) -> StageResult:
    """Never runs: its spec cannot be made (no such prompt)."""
    return StageResult(rows={"out": chunk.rows("problems")})


@stage("count", params=NoParams, kind="whole", inputs={"out": Problem}, outputs={"total": Problem})
async def count(chunk: Chunk, cfg: NoParams) -> StageResult:
    """Never runs either: its input failed."""
    return StageResult()


def test_a_chunk_whose_spec_fails_stops_the_run_instead_of_hanging(tmp_path: Path) -> None:
    broken_run = Pipeline(
        name="broken",
        params=LengthParams,
        steps=[
            Step(load, lambda p: LoadConfig(**p.load_config(p.chunk_size))),
            Step(broken, lambda p: NoParams()),
            Step(count, lambda p: NoParams()),
        ],
        resources=lambda p: Resources(roles={}),
        result=RunResult,
    )
    params = LengthParams(input=str(_problems(tmp_path / "p.jsonl", 3)), out=str(tmp_path / "r"))

    async def go() -> None:
        await asyncio.wait_for(run_pipeline(broken_run, params, prefect=False), 60)

    from mathmill.errors import ConfigError

    # a bad setting found in one chunk: said as it is, once the others have ended
    with pytest.raises(ConfigError, match="no prompt template 'no_such_template'"):
        asyncio.run(go())


def test_a_pipeline_is_checked_when_declared() -> None:
    def declare(*steps: Step) -> Pipeline[LengthParams, RunResult]:
        return Pipeline(
            name="p",
            params=LengthParams,
            steps=steps,
            resources=lambda p: Resources(roles={}),
            result=RunResult,
        )

    with pytest.raises(
        ValueError, match="stage length reads 'problems', which no earlier stage writes"
    ):
        declare(Step(length, lambda p: LengthConfig()))
    loading = Step(load, lambda p: LoadConfig(**p.load_config(2)))
    with pytest.raises(ValueError, match="stage load writes 'problems', which load writes too"):
        declare(loading, loading)
    with pytest.raises(ValueError, match="slice_rows cuts the one input of a chunks stage"):
        Step(load, lambda p: LoadConfig(**p.load_config(2)), slice_rows=lambda p: 2)


def test_each_stage_keys_on_the_code_it_uses() -> None:
    from mathmill.pipeline import stage as kit
    from mathmill.tasks import synthesize as synth

    def used(s: Any) -> set[str]:
        return set().union(*(kit._closure(m) for m in kit._referenced_modules(s.fn)))

    assert "mathmill.tasks.verify" in used(synth.verify)
    assert "mathmill.tasks.verify" not in used(synth.topics)  # editing verify keeps topics
    assert "mathmill.tasks.writing" not in used(synth.verify)
    assert "mathmill.grading.reference" in used(synth.verify)
    assert not any(m.startswith("mathmill.pipeline") for m in used(synth.verify))  # plumbing
    assert synth.topics.code != synth.verify.code


def test_workers_take_registered_pipelines_and_matching_chunks(tmp_path: Path) -> None:
    from mathmill.errors import ConfigError
    from mathmill.flows.chunks import check_spec, load_pipeline
    from mathmill.llm.client import LLMPool
    from mathmill.pipeline.chunks import Runtime

    assert load_pipeline("sample").name == "sample"
    assert load_pipeline("mathmill.flows.tir:PIPELINE").name == "tir"
    with pytest.raises(ConfigError, match="'this:s' is not registered"):
        load_pipeline("this:s")  # a parameter never imports an arbitrary module
    rt = Runtime(store=RunStore(str(tmp_path / "here")), pool=LLMPool(), endpoints={})
    spec = length.spec(rt, LengthConfig(), 0, [])
    check_spec(length, spec, rt)  # the same run directory, code and prompts
    elsewhere = Runtime(store=RunStore(str(tmp_path / "there")), pool=LLMPool(), endpoints={})
    with pytest.raises(ConfigError, match="this worker opened"):
        check_spec(length, spec, elsewhere)
    with pytest.raises(ConfigError, match="code differs"):
        check_spec(length, spec.model_copy(update={"code": "0" * 64}), rt)


def test_what_a_failed_worker_paid_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fanned-out chunks flow run that failed still recorded its LLM usage: the run
    adds it (its report and budget see it), and says which flow run failed.
    """
    from mathmill.errors import FlowRunFailed
    from mathmill.llm.client import LLMPool
    from mathmill.llm.usage import UsageMeter
    from mathmill.pipeline import fanout
    from mathmill.pipeline.chunks import Runtime

    rt = Runtime(store=RunStore(str(tmp_path / "r")), pool=LLMPool(), endpoints={})
    worker = UsageMeter()
    worker.record("length", model="m", prompt_tokens=4000, completion_tokens=1000)
    rt.store.write_bytes(fanout.usage_path("run-1"), json.dumps(worker.summary()).encode())

    async def failed(*_a: Any, **_k: Any) -> str:
        raise FlowRunFailed("chunks flow run 'x' (run-1) ended Failed", flow_run_id="run-1")

    monkeypatch.setattr(fanout, "run_and_wait", failed)
    monkeypatch.setattr(fanout, "require_server", lambda *_a: None)
    params = LengthParams(input="x.jsonl", out=str(tmp_path / "r"))
    spec = length.spec(rt, LengthConfig(), 0, [])
    fan = fanout.FanOut(deployment="chunks/chunks", runs=1)
    [out] = asyncio.run(fanout.fan_out_chunks(LENGTHS, "length", [spec], params, fan, rt))
    assert isinstance(out, FlowRunFailed) and "(run-1) ended Failed" in str(out)
    assert rt.pool.meter.spent()[0] == 5000


def test_a_dry_run_checks_everything_and_calls_nothing(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.errors import ConfigError
    from mathmill.flows.sample import SampleParams, sample

    params = SampleParams(
        input=str(_problems(tmp_path / "p.jsonl", 2)), out=str(tmp_path / "r"), dry_run=True
    )
    result = asyncio.run(sample(params))
    assert result.dry_run and result.samples == 0
    assert not (tmp_path / "r").exists()  # nothing opened, nothing written
    missing = params.model_copy(update={"input": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ConfigError, match="does not exist"):
        asyncio.run(sample(missing))
