"""The refresh flow composes any list of pipelines into one dated version: each one's
directory inside it, latest.json and versions.jsonl only once all completed; a bad
entry fails before any call, naming itself; a failed pipeline leaves the previous
version latest, and a re-run resumes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mathmill.errors import ConfigError, IncompleteRun
from mathmill.flows.refresh import RefreshParams, refresh
from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply
from tests.deploy_support import ROOT, free_port

PROBLEMS = ROOT / "tests" / "data" / "problems" / "amc23_5.jsonl"


def _answer(request: RecordedRequest) -> Reply:
    n = int((request.body or {}).get("n") or 1)
    return Reply(contents=[f"so the answer is \\boxed{{{i}}}" for i in range(n)])


def _params(root: Path, base_url: str, version: str = "v1") -> RefreshParams:
    model = {"base_url": base_url, "model": "m", "max_retries": 0}
    common: dict[str, Any] = {"input": str(PROBLEMS), "model": model}
    return RefreshParams.model_validate(
        {
            "root": str(root),
            "version": version,
            "pipelines": [
                {"pipeline": "sample", "params": common | {"samples": 2}},
                {
                    "pipeline": "sample",
                    "name": "hot",
                    "params": common | {"samples": 3, "temperature": 1.2},
                },
            ],
        }
    )


def test_two_pipelines_make_one_version(prefect_api: dict[str, str], tmp_path: Path) -> None:
    with FakeOpenAIServer(_answer) as fake:
        result = asyncio.run(refresh(_params(tmp_path, fake.base_url)))
    assert set(result.results) == {"sample", "hot"}
    assert result.results["sample"]["samples"] == 10 and result.results["hot"]["samples"] == 15
    assert (tmp_path / "v1" / "sample" / "samples.jsonl").exists()
    assert (tmp_path / "v1" / "hot" / "samples.jsonl").exists()
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["version"] == "v1" and latest["path"].endswith("/v1")
    assert latest["pipelines"]["hot"]["problems"] == 5
    versions = (tmp_path / "versions.jsonl").read_text().splitlines()
    assert [json.loads(v)["version"] for v in versions] == ["v1"]


def test_a_bad_entry_fails_before_any_call(prefect_api: dict[str, str], tmp_path: Path) -> None:
    with FakeOpenAIServer(_answer) as fake:
        params = _params(tmp_path, fake.base_url)
        bad = params.pipelines[1].model_copy(update={"params": {"samples": 0}})
        broken = params.model_copy(update={"pipelines": [params.pipelines[0], bad]})
        with pytest.raises(ConfigError, match=r"pipelines\.hot\.params\.(input|samples): "):
            asyncio.run(refresh(broken))
        assert fake.requests == []
    with pytest.raises(ValueError, match="same directory"):
        RefreshParams.model_validate(
            {"pipelines": [{"pipeline": "sample"}, {"pipeline": "sample"}]}
        )


def test_a_failed_pipeline_keeps_the_previous_version_latest(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    with FakeOpenAIServer(_answer) as fake:
        asyncio.run(refresh(_params(tmp_path, fake.base_url, "v1")))
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(IncompleteRun, match=r"refresh v2: 2 of 2 pipelines did not finish"):
        asyncio.run(refresh(_params(tmp_path, dead, "v2")))
    assert json.loads((tmp_path / "latest.json").read_text())["version"] == "v1"
    with FakeOpenAIServer(_answer) as fake:
        again = asyncio.run(refresh(_params(tmp_path, fake.base_url, "v2")))
    assert again.version == "v2"
    assert json.loads((tmp_path / "latest.json").read_text())["version"] == "v2"
    versions = (tmp_path / "versions.jsonl").read_text().splitlines()
    assert [json.loads(v)["version"] for v in versions] == ["v1", "v2"]
