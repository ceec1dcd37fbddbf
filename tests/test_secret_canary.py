"""A canary API key through every pipeline: synthesize, tir and sample, with the key in
an environment variable and in a saved `mathmill LLM endpoint` block, one of them
through the CLI. The fake server checks that the key is really sent; then the key is
looked for everywhere it must not be: the run directories (Parquet, JSONL, reports,
manifests, call caches), Prefect's database and task results, the flow runs' logs and
artifacts on the server, the CLI's output, and the sandbox's environment (model code
prints its environment and /proc's environ files). It must never be found.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply, Response
from tests.synth_world import SynthWorld

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CANARY = f"sk-canary-{uuid.uuid4().hex}"
ENV_NAME = "MATHMILL_CANARY_KEY"
PROBLEMS = Path(__file__).parent / "data" / "problems" / "amc23_5.jsonl"
SNOOP = (
    "<python>\nimport os, glob\nprint(sorted(os.environ.items()))\n"
    "for p in glob.glob('/proc/*/environ'):\n"
    "    try:\n        print(p, open(p, 'rb').read())\n"
    "    except OSError as e:\n        print(p, e)\n"
)


def keyed(handler: Any, seen: set[str]) -> Any:
    """The handler, recording each request's Authorization header."""

    def answer(request: RecordedRequest) -> Response:
        seen.add(request.headers.get("authorization", ""))
        return handler(request)  # type: ignore[no-any-return]

    return answer


def tir_handler(request: RecordedRequest) -> Response:
    turn = sum(1 for m in (request.body or {}).get("messages", []) if m["role"] == "assistant")
    return Reply(SNOOP if turn == 0 else "<final_answer>\\boxed{1}</final_answer>")


def sample_handler(request: RecordedRequest) -> Response:
    n = int((request.body or {}).get("n") or 1)
    return Reply(contents=[f"so the answer is \\boxed{{{i}}}" for i in range(n)])


def files_holding(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


async def server_texts(flow_run_ids: list[Any]) -> str:
    """Every log line and artifact of the flow runs (and their task runs) on the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    async with get_client() as client:
        logs: list[Any] = []
        while True:  # the server answers at most 200 lines a call
            page = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)),
                limit=200,
                offset=len(logs),
            )
            logs += page
            if len(page) < 200:
                break
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        )
    assert logs and artifacts  # the runs did log and publish
    return "\n".join(
        [log.message for log in logs] + [json.dumps(a.model_dump(mode="json")) for a in artifacts]
    )


def test_the_canary_key_is_used_and_never_written(
    prefect_api: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import get_current_settings

    from mathmill.blocks.llm import LLMEndpoint
    from mathmill.flows.sample import SampleParams, sample
    from mathmill.flows.synthesize import synthesize
    from mathmill.flows.tir import TirParams, tir
    from tests.test_synthesize import world_config

    monkeypatch.setenv(ENV_NAME, CANARY)
    secret = CANARY.encode()
    seen: dict[str, set[str]] = {"synthesize": set(), "tir": set(), "sample": set()}
    flow_runs: list[Any] = []
    problems = tmp_path / "tir.jsonl"
    problems.write_text(json.dumps({"id": "p", "problem": "Snoop.", "answer": "1"}) + "\n")

    with (
        FakeOpenAIServer(keyed(SynthWorld(kinds=("ok", "fix")), seen["synthesize"])) as synth,
        FakeOpenAIServer(keyed(tir_handler, seen["tir"])) as tir_fake,
        FakeOpenAIServer(keyed(sample_handler, seen["sample"])) as sample_fake,
    ):
        # The sample endpoint's key lives in a block on the Prefect server.
        LLMEndpoint(base_url=sample_fake.base_url, model="m", api_key=SecretStr(CANARY)).save(
            "canary-endpoint", overwrite=True
        )

        cfg = world_config(synth.base_url, str(tmp_path / "synth"), topics=2)
        models = cfg.models.model_dump()
        models["default"]["api_key_env"] = ENV_NAME
        state = asyncio.run(
            synthesize(
                params=cfg.model_copy(update={"models": type(cfg.models)(**models)}),
                return_state=True,
            )
        )
        assert state.result().verified == 8
        flow_runs.append(state.state_details.flow_run_id)

        params = TirParams.model_validate(
            {
                "input": str(problems),
                "out": str(tmp_path / "tir"),
                "max_turns": 2,
                "solver": {"base_url": tir_fake.base_url, "model": "m", "api_key_env": ENV_NAME},
                "sandbox": {"timeout_s": 5.0, "workers": 1},
            }
        )
        state = asyncio.run(tir(params=params, return_state=True))
        flow_runs.append(state.state_details.flow_run_id)

        state = asyncio.run(
            sample(
                SampleParams.model_validate(
                    {
                        "input": str(PROBLEMS),
                        "out": str(tmp_path / "sample"),
                        "samples": 2,
                        "model": {"block": "canary-endpoint"},
                    }
                ),
                return_state=True,
            )
        )
        flow_runs.append(state.state_details.flow_run_id)

        # The CLI, with the key in its environment: nothing printed holds it.
        env = {**os.environ, **prefect_api, ENV_NAME: CANARY}
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "mathmill",
                "run",
                "tir",
                "--input",
                str(problems),
                "--out",
                str(tmp_path / "tir-cli"),
                "--base-url",
                tir_fake.base_url,
                "--model",
                "m",
                "--api-key-env",
                ENV_NAME,
                "--max-turns",
                "2",
                "--debug",
            ],
            env=env,
            capture_output=True,
            timeout=600,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr.decode()[-2000:]

    # The key was really used, in the header, by every pipeline.
    for name, headers in seen.items():
        assert headers == {f"Bearer {CANARY}"}, name

    # The model's code ran and printed its environment: no key there.
    trajectories = (tmp_path / "tir" / "sharegpt.jsonl").read_text()
    assert "PATH" in trajectories and "/proc/" in trajectories
    assert CANARY not in trajectories

    found = files_holding(tmp_path, secret)
    assert found == [], found
    assert secret not in cli.stdout + cli.stderr
    assert CANARY not in asyncio.run(server_texts(flow_runs))

    # Prefect's database and its task results hold no key (the block's is encrypted).
    settings = get_current_settings()
    database = settings.server.database.connection_url
    db_path = Path(str(database.get_secret_value() if database else "").split("///")[-1])
    assert db_path.is_file(), db_path
    for path in db_path.parent.glob(db_path.name + "*"):  # the -wal and -shm files too
        assert secret not in path.read_bytes(), path
    results = Path(prefect_api["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])
    assert any(results.iterdir())
    assert files_holding(results, secret) == []


def test_a_sandbox_started_with_a_key_around_holds_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from mathmill.sandbox import LocalSandbox

    monkeypatch.setenv("OPENAI_API_KEY", CANARY)

    async def scenario() -> list[bytes]:
        async with LocalSandbox(workers=1) as box:
            await box.execute("print(1)")
            pids = [w.proc.pid for w in box._workers if w.proc is not None]
            return [Path(f"/proc/{pid}/environ").read_bytes() for pid in pids]

    environs = asyncio.run(scenario())
    assert environs and all(CANARY.encode() not in e for e in environs)
