"""The ``train`` flow: supervised fine-tuning with TRL on a train split (a TRL
``messages`` JSONL such as ``mathmill export RUN --format trl`` writes), evaluated on the
validation split; checkpoints and the final model in the run directory (local or object
storage), resumed from the newest checkpoint after a crash; the loss curves as
``loss.png``, ``metrics.json`` and Prefect artifacts. Deployed to the ``gpu`` work pool.

The model it writes (``<out>/model``) is a plain Hugging Face directory: vLLM serves it
(``backend: {kind: engine|deployment, engine: {model: <out>/model}}``) for the
``evaluate`` and ``sample`` flows.

>>> TrainParams(train="train.jsonl").hyper.lr(lora=False)
1e-05
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import ConfigError
from mathmill.flows.options import StorageFields
from mathmill.pipeline.flow import pipeline_flow
from mathmill.storage import RunStore
from mathmill.tasks.train import Hyper, LoraOptions, TrainOutcome

__all__ = ["TrainParams", "TrainResult", "loss_chart", "train"]

log = logging.getLogger("mathmill.flows.train")


class TrainParams(StorageFields):
    """Parameters of the train flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: str = Field(
        description="Train split: a .jsonl or .parquet with 'messages' (or 'text') rows.",
        examples=["runs/export/train.jsonl"],
    )
    validation: str | None = Field(None, description="Validation split (same format).")
    model: str | None = Field(
        None,
        description="A local Hugging Face model directory (default: the bundled "
        "SmolLM2-135M, converted by `mathmill vllm convert`).",
    )
    out: str = Field("runs/train", description="Run directory (re-run to resume).")
    limit: int | None = Field(None, ge=1, description="Train on the first N rows only.")
    hyper: Hyper = Field(default_factory=Hyper, description="Hyperparameters.")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA (PEFT).")
    dry_run: bool = Field(False, description="Validate the parameters; train nothing.")

    def model_dir(self) -> str:
        """The model to fine-tune."""
        if self.model:
            return self.model
        from mathmill.llm.vllm_model import local_vllm_model

        return str(local_vllm_model())


class TrainResult(BaseModel):
    """What a train run did and where its outputs are."""

    out: str
    model_dir: str = ""
    train_rows: int = 0
    validation_rows: int = 0
    steps: int = 0
    resumed_from: str | None = None
    train_loss: float | None = None
    first_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float = 0.0
    device: str = ""
    wall_s: float = 0.0
    outputs: dict[str, str] = Field(default_factory=dict)


def loss_chart(history: list[dict[str, Any]], title: str) -> bytes | None:
    """The train (and eval) loss by step as a PNG; None without a logged loss."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), marker="o", markersize=3, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="s", linestyle="--", label="validation loss")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _history_with_steps(outcome: TrainOutcome) -> list[dict[str, Any]]:
    return [h for h in outcome.log_history if "step" in h]


def _markdown(result: TrainResult) -> str:
    lines = [
        f"# train: {result.steps} steps on {result.train_rows} rows ({result.device})",
        "",
        "| figure | value |",
        "|---|---|",
        f"| first / last train loss | {result.first_loss} / {result.train_loss} |",
        f"| validation loss | {result.eval_loss} |",
        f"| tokens/s (training) | {result.tokens_per_s:.1f} |",
        f"| resumed from | {result.resumed_from or '-'} |",
        f"| model | {result.model_dir} |",
        "",
        f"Loss curve: {result.outputs.get('loss.png', '-')}",
    ]
    return "\n".join(lines)


async def _publish(result: TrainResult, history: list[dict[str, Any]]) -> None:
    """The markdown and the loss table as artifacts of the flow run (when there is one)."""
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    await acreate_markdown_artifact(key="train-summary", markdown=_markdown(result))
    rows = [
        {k: h.get(k) for k in ("step", "loss", "eval_loss", "learning_rate", "grad_norm")}
        for h in history
        if "loss" in h or "eval_loss" in h
    ]
    if rows:
        await acreate_table_artifact(key="train-loss", table=rows)


@pipeline_flow("train")
async def train(params: TrainParams) -> TrainResult:
    """Fine-tune a model on a train split with TRL (LoRA optional), evaluate on the
    validation split, checkpoint into the run directory and resume from it.
    """
    from mathmill.tasks.train import read_messages, train_sft

    started = time.perf_counter()
    store = RunStore(await params.storage_config(params.out))
    data = read_messages(params.train, "train")
    if params.limit is not None:
        data = data.select(range(min(params.limit, len(data))))
    validation = read_messages(params.validation, "validation") if params.validation else None
    model = params.model_dir()
    result = TrainResult(
        out=store.url,
        train_rows=len(data),
        validation_rows=len(validation) if validation is not None else 0,
    )
    if params.dry_run:
        return result
    if not await asyncio.to_thread(os.path.isdir, model):
        raise ConfigError(f"model: {model} is not a model directory on this machine")
    outcome = await asyncio.to_thread(
        train_sft,
        model=model,
        train=data,
        validation=validation,
        store=store,
        hyper=params.hyper,
        lora=params.lora,
        on_checkpoint=lambda path: log.info("checkpoint saved: %s", path),
    )
    history = _history_with_steps(outcome)
    losses = [h["loss"] for h in history if "loss" in h]
    result = result.model_copy(
        update={
            "model_dir": outcome.model_dir,
            "steps": outcome.steps,
            "resumed_from": outcome.resumed_from,
            "train_loss": outcome.train_loss,
            "first_loss": losses[0] if losses else None,
            "eval_loss": outcome.eval_loss,
            "tokens_per_s": round(outcome.tokens_per_s, 2),
            "device": outcome.device,
        }
    )
    outputs = {"model": outcome.model_dir}
    outputs["metrics.json"] = store.write_bytes(
        "metrics.json", json.dumps({"log_history": outcome.log_history}, indent=2).encode()
    )
    chart = loss_chart(history, f"fine-tuning loss ({params.train.rsplit('/', 1)[-1]})")
    if chart is not None:
        outputs["loss.png"] = store.write_bytes("loss.png", chart)
    result = result.model_copy(
        update={"outputs": outputs, "wall_s": round(time.perf_counter() - started, 2)}
    )
    outputs["train.json"] = store.write_bytes(
        "train.json", result.model_dump_json(indent=2).encode()
    )
    await _publish(result, history)
    log.info(
        "train: %d steps, loss %s -> %s, validation %s, %.1f tokens/s, model in %s",
        result.steps,
        result.first_loss,
        result.train_loss,
        result.eval_loss,
        result.tokens_per_s,
        result.model_dir,
    )
    return result
