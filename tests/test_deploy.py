"""Deployments end to end: `mathmill server up` (a real local Prefect server, pools,
block types, deployments/prefect.yaml), blocks saved with `mathmill blocks`, a process
worker on the cpu pool, and `prefect deployment run ... --watch` of synthesize and of
the nightly refresh against the fake LLM server, with storage in a bucket on a
loopback S3 server (moto).
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mathmill.llm.fake_server import FakeOpenAIServer
from tests.conftest import S3_KEY, S3_SECRET, s3_client
from tests.deploy_support import MATHMILL, clean_env, run_cmd, server_up, worker
from tests.synth_world import SynthWorld

pytestmark = pytest.mark.slow
BUCKET = "mathmill-deploy"
LLM_OPTS = ["--model", "fake", "--max-concurrency", "8"]
WATCH = ["--watch-timeout", "400"]
_run = run_cmd


@dataclass
class Deployed:
    env: dict[str, str]
    url: str
    world: SynthWorld
    fake: FakeOpenAIServer
    s3: object  # a boto3 client on the bucket's server
    work: Path


@pytest.fixture(scope="module")
def deployed(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    work = tmp_path_factory.mktemp("deploy")
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    world = SynthWorld(kinds=("ok", "fix"))
    with server_up(work, clean_env(work / "client")) as env, FakeOpenAIServer(world) as fake:
        url = env["PREFECT_API_URL"]
        # the keys are read from the environment once, stored as secrets in blocks
        keys = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        where = ["--endpoint-url", s3_endpoint, "--region", "us-east-1"]
        _run(
            [MATHMILL, "blocks", "s3", "data", "--bucket", BUCKET, "--folder", "mm", *where],
            env | keys,
        )
        _run([MATHMILL, "blocks", "llm", "fake", "--base-url", fake.base_url, *LLM_OPTS], env)
        # the worker has no AWS keys and no endpoint settings: all come from blocks
        with worker("cpu", env | {"MATHMILL_CACHE_DIR": str(work / "cache")}, work):
            yield Deployed(env, url, world, fake, s3, work)


def _config(**extra: object) -> dict[str, object]:
    return {
        "storage_block": "data",
        "topics": 2,
        "problems_per_topic": 2,
        "short_cots": 1,
        "rounds": 2,
        "chunk_size": 4,
        "models": {"default": {"block": "fake", "max_retries": 0}},
        "sandbox": {"timeout_s": 1.0, "workers": 2},
        **extra,
    }


def _keys(d: Deployed, prefix: str) -> list[str]:
    listing = d.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _body(d: Deployed, key: str) -> bytes:
    data: bytes = d.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[attr-defined]
    return data


def _deployment_run(
    d: Deployed, name: str, config: dict[str, object], param_name: str = "params"
) -> str:
    param = ["--param", f"{param_name}={json.dumps(config)}"]
    return _run(
        [sys.executable, "-m", "prefect", "deployment", "run", name, "--watch", *WATCH, *param],
        d.env,
        timeout=480,
    )


def test_deployment_run_watch_writes_the_dataset_to_the_bucket(deployed: Deployed) -> None:
    started = time.monotonic()
    out = _deployment_run(deployed, "synthesize/synthesize", _config(out="runs/ci"))
    assert "Completed" in out, out
    verified = [k for k in _keys(deployed, "mm/runs/ci/verified/") if k.endswith(".parquet")]
    rows = sum(pq.ParquetFile(io.BytesIO(_body(deployed, k))).metadata.num_rows for k in verified)
    assert rows == 8  # as the in-process run of the same world
    jsonl = _body(deployed, "mm/runs/ci/verified.jsonl").decode().splitlines()
    assert len(jsonl) == 8 and all(json.loads(line)["status"] == "verified" for line in jsonl)
    assert "complete" in _body(deployed, "mm/runs/ci/report.md").decode()
    # Prefect's task results went to the block too (next to the run directory)
    results = [k for k in _keys(deployed, "mm/") if not k.startswith("mm/runs/")]
    assert len(results) >= 5, results
    # every request went to the block's endpoint and no AWS key reached the fake LLM
    assert deployed.world.answered and deployed.fake.requests
    assert all(S3_SECRET not in json.dumps(r.body) for r in deployed.fake.requests)
    assert time.monotonic() - started < 480


def test_the_nightly_refresh_carries_its_cron_schedule(deployed: Deployed) -> None:
    out = _run(
        [sys.executable, "-m", "prefect", "deployment", "inspect", "refresh/nightly"],
        deployed.env,
    )
    assert "'cron': '0 3 * * *'" in out and "'timezone': 'UTC'" in out, out
    assert "'active': True" in out and "'work_pool_name': 'cpu'" in out


_SCHEDULED = """
import asyncio, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState
from prefect.client.schemas.filters import FlowRunFilterStateType
from prefect.client.schemas.objects import StateType

async def main() -> None:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
        )
        for run in runs:
            print(run.expected_start_time.isoformat())

asyncio.run(main())
"""


def test_the_scheduler_makes_the_nightly_runs(deployed: Deployed) -> None:
    # The server's scheduler service turns the cron schedule into scheduled runs at 03:00
    # UTC (it failed silently on SQLAlchemy 2.1: a nightly schedule that never fired).
    deadline = time.monotonic() + 180
    while True:
        printed = _run([sys.executable, "-c", _SCHEDULED], deployed.env).split()
        out = [t for t in printed if t[:4].isdigit()]  # the times, not a warning's words
        if out or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert out, "no scheduled run of refresh/nightly after 180 s"
    assert all(t.endswith("03:00:00+00:00") for t in out), out


def test_a_refresh_run_writes_a_dated_version_and_latest(deployed: Deployed) -> None:
    synth = {k: v for k, v in _config().items() if k != "storage_block"}
    params = {
        "root": "datasets/nightly",
        "storage_block": "data",
        "version": "2026-11-22",
        "pipelines": [{"pipeline": "synthesize", "params": synth}],
    }
    out = _deployment_run(deployed, "refresh/nightly", params, "params")
    assert "Completed" in out, out
    latest = json.loads(_body(deployed, "mm/datasets/nightly/latest.json"))
    assert latest["version"] == "2026-11-22"
    assert latest["pipelines"]["synthesize"]["verified"] == 8
    assert latest["path"].endswith("/mm/datasets/nightly/2026-11-22")
    assert _keys(deployed, "mm/datasets/nightly/2026-11-22/synthesize/verified/")
    versions = _body(deployed, "mm/datasets/nightly/versions.jsonl").decode().splitlines()
    assert [json.loads(v)["version"] for v in versions] == ["2026-11-22"]
