"""Supervised fine-tuning with TRL: the data, the trainer, checkpoints kept in the run
directory (local or object storage) and resumed after a crash, the final model (LoRA
adapters merged when asked) written beside them.

The flow (:mod:`mathmill.flows.train`) calls :func:`train_sft`; torch, transformers,
TRL and PEFT are imported only here, on use.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import ConfigError
from mathmill.storage import RunStore

__all__ = [
    "DONE_MARKER",
    "Hyper",
    "LoraOptions",
    "TrainOutcome",
    "download_dir",
    "latest_checkpoint",
    "prune_remote",
    "read_messages",
    "train_sft",
    "upload_dir",
]

log = logging.getLogger("mathmill.train")
DONE_MARKER = ".mathmill-complete"
"""Written into a checkpoint directory once the trainer has saved all of it."""


class LoraOptions(BaseModel):
    """LoRA adapters (PEFT) instead of full fine-tuning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str = Field("all-linear", description="PEFT's target_modules.")
    merge: bool = Field(True, description="Merge the adapters into the final model.")


class Hyper(BaseModel):
    """Hyperparameters; the defaults suit math-reasoning SFT of a small or mid model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(2.0, gt=0, description="Passes over the train split.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many steps (-1: epochs).")
    learning_rate: float | None = Field(
        None, gt=0, description="Default: 1e-5 for full fine-tuning, 2e-4 with LoRA."
    )
    batch_size: int = Field(4, ge=1, description="Sequences per device per step.")
    grad_accum: int = Field(8, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(4096, ge=16, description="Tokens per sequence (longer: cut).")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    assistant_only_loss: bool = Field(
        False,
        description="Loss on the assistant's tokens only (needs a chat template with "
        "generation markers).",
    )
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp32."
    )
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    seed: int = 0

    def lr(self, lora: bool) -> float:
        """The learning rate (the default depends on LoRA)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if lora else 1e-5


@dataclass
class TrainOutcome:
    """What a training run did."""

    model_dir: str
    steps: int
    resumed_from: str | None
    train_loss: float | None
    eval_loss: float | None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    train_tokens: int = 0
    train_s: float = 0.0
    device: str = "cpu"

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second of training time."""
        return self.train_tokens / self.train_s if self.train_s else 0.0


def read_messages(path: str, what: str) -> Any:
    """A ``datasets.Dataset`` of chat rows (``messages``) or text rows (``text``) from a
    JSONL or Parquet file, with a clear error naming the file and the first bad row.
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what}: {path} does not exist (a .jsonl or .parquet file)")
    kind = "parquet" if p.suffix == ".parquet" else "json"
    try:
        data = datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for a bad file
        raise ConfigError(f"{what}: {path} does not load: {str(e).splitlines()[0]}") from e
    columns = set(data.column_names)
    if "messages" not in columns and "text" not in columns:
        raise ConfigError(
            f"{what}: {path} has neither a 'messages' nor a 'text' column "
            f"(has: {', '.join(sorted(columns))}); `mathmill export RUN --format trl` writes one"
        )
    if "messages" in columns:
        for i, row in enumerate(data["messages"]):
            ok = (
                isinstance(row, list)
                and row
                and all(
                    isinstance(m, dict) and m.get("role") and isinstance(m.get("content"), str)
                    for m in row
                )
            )
            if not ok:
                raise ConfigError(
                    f"{what}: {path} row {i + 1}: 'messages' must be a list of "
                    "{role, content} with text content"
                )
    if len(data) == 0:
        raise ConfigError(f"{what}: {path} has no rows")
    return data


def latest_checkpoint(store: RunStore, prefix: str = "checkpoints") -> str | None:
    """The newest complete checkpoint (``checkpoint-N`` with its marker) under
    ``prefix`` of the run directory; None without one.
    """
    root = f"{store.root}/{prefix}"
    if not store.fs.exists(root):
        return None
    steps = []
    for entry in store.fs.ls(root, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        complete = f"{root}/{name}/{DONE_MARKER}"
        if name.startswith("checkpoint-") and name[11:].isdigit() and store.fs.exists(complete):
            steps.append(int(name[11:]))
    return f"{prefix}/checkpoint-{max(steps)}" if steps else None


def upload_dir(store: RunStore, local: Path, relpath: str) -> None:
    """Copy the files of ``local`` to ``relpath`` of the run directory, replacing what
    was there (fsspec's recursive put nests a directory into an existing one).
    """
    remote = f"{store.root}/{relpath}"
    if store.fs.exists(remote):
        store.fs.rm(remote, recursive=True)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        store.fs.put_file(str(file), f"{remote}/{file.relative_to(local).as_posix()}")


def download_dir(store: RunStore, relpath: str, local: Path) -> None:
    """Copy ``relpath`` of the run directory (its files) into ``local``."""
    remote = f"{store.root}/{relpath}"
    for path in store.fs.find(remote):
        name = str(path).split(remote.split("://")[-1], 1)[-1].lstrip("/")
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        store.fs.get_file(path, str(target))


def prune_remote(store: RunStore, keep: set[str]) -> None:
    """Delete the run directory's checkpoints the trainer no longer keeps locally
    (``save_total_limit``), so object storage holds as many as the trainer does.
    """
    root = f"{store.root}/checkpoints"
    for entry in store.fs.ls(root, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("checkpoint-") and name not in keep:
            store.fs.rm(f"{root}/{name}", recursive=True)


@contextmanager
def _local_dir(store: RunStore) -> Iterator[tuple[Path, bool]]:
    """A local directory for the trainer's output: the run directory itself when it is
    local, else a temporary one synced to the store (yields ``(path, remote)``).
    """
    if store.is_local:
        yield Path(store.root), False
        return
    tmp = Path(tempfile.mkdtemp(prefix="mathmill-train-"))
    try:
        yield tmp, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _precision(hyper: Hyper, cuda: bool) -> dict[str, bool]:
    import torch

    choice = hyper.precision
    if choice == "auto":
        choice = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if choice != "fp32" and not cuda:
        raise ConfigError(f"precision {choice} needs a GPU; use fp32 or auto on CPU")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def _mean_tokens(data: Any, tokenizer: Any, max_length: int, sample: int = 2000) -> float:
    """Mean tokens per row as the trainer sees them (cut at ``max_length``), over the
    first ``sample`` rows.
    """
    total = 0
    rows = data.select(range(min(sample, len(data))))
    for row in rows:
        if "messages" in row and row["messages"] is not None:
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True)
            if hasattr(ids, "keys"):  # a BatchEncoding (transformers 5)
                ids = ids["input_ids"]
            n = len(ids)
        else:
            n = len(tokenizer(row["text"])["input_ids"])
        total += min(n, max_length)
    return total / len(rows) if len(rows) else 0.0


def train_sft(
    *,
    model: str,
    train: Any,
    validation: Any | None,
    store: RunStore,
    hyper: Hyper,
    lora: LoraOptions,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[str], None] | None = None,
) -> TrainOutcome:
    """Fine-tune ``model`` (a local HF model directory) on ``train`` with TRL's
    ``SFTTrainer``, evaluating on ``validation``; checkpoints every ``save_steps`` into
    ``checkpoints/`` of the run directory (each marked complete once saved), resumed
    from the newest complete one; the final model in ``model/``.
    """
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    precision = _precision(hyper, cuda)
    with _local_dir(store) as (local, _), tempfile.TemporaryDirectory() as scratch:
        ckpt_dir = local / "checkpoints"
        resume = latest_checkpoint(store)
        if resume is not None and not store.is_local:  # fetch it from object storage
            download_dir(store, resume, local / resume)
        resume_path = str(local / resume) if resume is not None else None
        if resume_path is not None:
            log.info("resuming from %s", resume)

        class Sync(TrainerCallback):
            """Marks each saved checkpoint complete (and copies it to object storage)."""

            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                name = f"checkpoint-{state.global_step}"
                path = ckpt_dir / name
                if not path.exists():
                    return
                marker = json.dumps({"step": state.global_step})
                if store.is_local:
                    (path / DONE_MARKER).write_text(marker)
                else:  # the files first, the marker last: a half-copied one is not complete
                    upload_dir(store, path, f"checkpoints/{name}")
                    store.write_bytes(f"checkpoints/{name}/{DONE_MARKER}", marker.encode())
                    (path / DONE_MARKER).write_text(marker)
                    prune_remote(store, {p.name for p in ckpt_dir.glob("checkpoint-*")})
                if on_checkpoint is not None:
                    on_checkpoint(f"checkpoints/{name}")

            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
            ) -> None:
                if on_log is not None and logs:
                    on_log(dict(logs) | {"step": state.global_step})

        evaluate = validation is not None and len(validation) > 0
        config = SFTConfig(
            output_dir=str(ckpt_dir),
            num_train_epochs=hyper.epochs,
            max_steps=hyper.max_steps,
            learning_rate=hyper.lr(lora.enabled),
            per_device_train_batch_size=hyper.batch_size,
            per_device_eval_batch_size=hyper.batch_size,
            gradient_accumulation_steps=hyper.grad_accum,
            max_length=hyper.max_length,
            warmup_steps=hyper.warmup_ratio,  # a float in [0, 1): the ratio of total steps
            lr_scheduler_type=hyper.scheduler,
            weight_decay=hyper.weight_decay,
            max_grad_norm=hyper.max_grad_norm,
            assistant_only_loss=hyper.assistant_only_loss,
            gradient_checkpointing=hyper.gradient_checkpointing,
            logging_steps=hyper.logging_steps,
            logging_first_step=True,
            eval_strategy="steps" if evaluate else "no",
            eval_steps=hyper.eval_steps,
            save_strategy="steps",
            save_steps=hyper.save_steps,
            save_total_limit=hyper.save_total_limit,
            seed=hyper.seed,
            data_seed=hyper.seed,
            report_to="none",
            use_cpu=not cuda,
            dataset_num_proc=1,
            disable_tqdm=True,
            bf16=precision["bf16"],
            fp16=precision["fp16"],
        )
        peft_config = None
        if lora.enabled:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=validation if evaluate else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Sync()],
        )
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume_path)
        took = time.perf_counter() - started
        eval_loss = None
        if evaluate:
            metrics = trainer.evaluate()
            eval_loss = metrics.get("eval_loss")
        final = Path(scratch) / "model" if not store.is_local else local / "model"
        _save_final(trainer, tokenizer, final, lora)
        if not store.is_local:
            upload_dir(store, final, "model")
        history = [dict(h) for h in trainer.state.log_history]
        losses = [h["loss"] for h in history if "loss" in h]
        steps_done = trainer.state.global_step
        first_step = int(resume_path.rsplit("-", 1)[1]) if resume_path else 0
        rows_seen = (steps_done - first_step) * hyper.batch_size * hyper.grad_accum
        tokens = _mean_tokens(train, tokenizer, hyper.max_length) * rows_seen
        return TrainOutcome(
            model_dir=f"{store.url}/model",
            steps=steps_done,
            resumed_from=resume,
            train_loss=losses[-1] if losses else None,
            eval_loss=eval_loss if eval_loss is None or math.isfinite(eval_loss) else None,
            log_history=history,
            train_tokens=int(tokens),
            train_s=took,
            device="cuda" if cuda else "cpu",
        )


def _save_final(trainer: Any, tokenizer: Any, path: Path, lora: LoraOptions) -> None:
    """The trained model as a plain HF directory (adapters merged when asked), with its
    tokenizer: what vLLM loads.
    """
    model = trainer.model
    if lora.enabled and lora.merge:
        model = model.merge_and_unload()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
