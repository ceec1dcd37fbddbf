"""``mathmill run ...``: run a pipeline flow from the command line, then print where
its dataset and report are, a summary table and where the run is in the Prefect UI.

Flows report to ``PREFECT_API_URL`` when it is set; otherwise to a local Prefect server
started once in the background and reused by later runs (``--prefect-server local``,
the default), or to Prefect's temporary server for this run alone (``ephemeral``).
Heavy modules (the flows, Prefect, the LLM client) are imported inside the commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.abc
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from mathmill.errors import ConfigError, MathmillError
from mathmill.flows.cli_params import (
    Shortcut,
    build_params,
    load_config_file,
    option,
    params_command,
    validation_message,
)

if TYPE_CHECKING:
    from mathmill.flows.critique import CritiqueParams
    from mathmill.flows.curate import CurateParams
    from mathmill.flows.evaluate import EvaluateParams
    from mathmill.flows.formal import FormalParams
    from mathmill.flows.sample import SampleParams
    from mathmill.flows.synthesize import SynthesizeParams
    from mathmill.flows.tir import TirParams
    from mathmill.flows.train import TrainParams

__all__ = [
    "PrefectServer",
    "build_params",
    "load_config_file",
    "prefect_api",
    "run_app",
    "run_flow",
    "run_synthesize_params",
    "validation_message",
]

ServerMode = Literal["local", "ephemeral"]
PREFECT_SERVER_HELP = (
    "Where the run is recorded when PREFECT_API_URL is unset: 'local' starts a "
    "Prefect server once in the background ($MATHMILL_SERVER_HOME, default "
    "~/.mathmill/server; port $MATHMILL_SERVER_PORT, default 4200) and reuses it, so "
    "runs keep their history in the UI; 'ephemeral' uses Prefect's temporary server "
    "for this run only. Default: $MATHMILL_PREFECT_SERVER or local."
)
PrefectServer = Annotated[
    ServerMode | None, typer.Option("--prefect-server", help=PREFECT_SERVER_HELP)
]
run_app = typer.Typer(help="Run a pipeline (a Prefect flow).", no_args_is_help=True)


@run_app.callback()
def _start_helper() -> None:
    """Start the helper process (:mod:`mathmill.sidecar`) first thing, so that it imports
    the grader and the report's charting while this one imports the flow and Prefect
    (not for ``--help``).
    """
    from mathmill import sidecar

    if not {"--help", "-h"} & set(sys.argv[1:]):
        sidecar.warm(*sidecar.GRADING, *sidecar.REPORT)


console = Console(soft_wrap=True)
if not console.is_terminal:  # piped or in CI: 80 columns would cut the tables
    console.width = 120


@contextlib.contextmanager
def prefect_api(mode: ServerMode | None = None) -> Iterator[str | None]:
    """The Prefect API a command-line run reports to, set for the block's duration:
    ``PREFECT_API_URL`` when set; else the local background server (started on first
    use, reused after; ``mode='local'``); None for Prefect's temporary server.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield str(url)
        return
    mode = mode or os.environ.get("MATHMILL_PREFECT_SERVER") or "local"  # type: ignore[assignment]
    if mode == "ephemeral":
        yield None
        return
    if mode != "local":
        raise ConfigError(f"MATHMILL_PREFECT_SERVER: expected 'local' or 'ephemeral', not {mode!r}")
    from mathmill.local_server import default_home, default_port, ensure_local_server

    home, port = default_home(), default_port()
    with console.status(f"starting a local Prefect server on port {port} (once)"):
        url, started = ensure_local_server(home, "127.0.0.1", port)
    if started:
        console.print(
            f"started a local Prefect server at {ui_url(url)} (home {home.root}); later runs "
            "reuse it, `mathmill server down` stops it",
            markup=False,
            highlight=False,
        )
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


def ui_url(api: str) -> str:
    """The UI address of a Prefect API URL (``http://h:4200/api`` -> ``http://h:4200``)."""
    return api.removesuffix("/").removesuffix("/api")


class KnownErrorFilter(logging.Filter):
    """Drops the traceback of mathmill's own errors (bad input, a stopped run: their
    message says what went wrong and where) from what the terminal shows; other
    exceptions keep theirs. The Prefect UI's logs keep every traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MathmillError) or isinstance(
            getattr(exc, "__cause__", None), MathmillError
        ):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_known_errors() -> None:
    """Install :class:`KnownErrorFilter` on the terminal handlers (root's and Prefect's)
    (after Prefect set them up: later set-ups are incremental and keep them).
    """
    import prefect.main  # noqa: F401  (sets up Prefect's logging)

    names = ["prefect", *(n for n in logging.root.manager.loggerDict if n.startswith("prefect."))]
    loggers = [logging.root, *(logging.getLogger(name) for name in names)]
    for logger in loggers:
        for handler in logger.handlers:
            is_terminal = type(handler).__name__ != "APILogHandler"
            if is_terminal and not any(isinstance(f, KnownErrorFilter) for f in handler.filters):
                handler.addFilter(KnownErrorFilter())


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("not now", name=name)


def skip_pyarrow_pandas_probe() -> None:
    """Spare a run pyarrow's import of pandas (~0.4 s on 2 cores).

    The first time pyarrow converts a Python list it imports pandas, only to ask
    whether the list is a pandas object. A run's rows are plain lists: here pyarrow
    makes that first probe while pandas cannot be imported, and so does not ask
    again until :func:`mathmill.sources.pyarrow_knows_pandas` (called before HF
    datasets are read) or a pandas conversion (``to_pandas()``, ``from_pandas()``)
    brings pandas back. Only for the CLI's own process; where pandas is already
    imported, nothing changes.
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)  # `import pandas` fails while it is there
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(blocker)


def run_flow(
    flow: Any, server: ServerMode | None = None, *, progress: bool = False, **params: Any
) -> tuple[Any, str | None]:
    """Run a Prefect flow on the server :func:`prefect_api` picks; its result and the
    run's link in the UI (None on a temporary server). The flow's own error is raised
    as it is, after the link, so the failed run's logs are one click away. With
    ``progress``, the run's progress is drawn meanwhile (:func:`live_view`).
    """

    from prefect.settings import PREFECT_UI_URL

    async def _run(api: str | None) -> tuple[Any, str | None]:
        state = await flow(**params, return_state=True)
        run_id = state.state_details.flow_run_id
        ui = PREFECT_UI_URL.value() if api else None  # Prefect Cloud's UI is elsewhere
        link = f"{ui}/runs/flow-run/{run_id}" if ui and run_id else None
        try:
            return await state.aresult(), link
        except BaseException:
            print_ui(link)
            raise

    from mathmill import sidecar

    skip_pyarrow_pandas_probe()
    try:
        with prefect_api(server) as api:
            quiet_known_errors()
            with live_view(progress, str(getattr(flow, "name", "run"))):
                return asyncio.run(_run(api))
    finally:
        sidecar.stop()  # the command is done with it: exit without waiting for it


@contextlib.contextmanager
def live_view(enabled: bool, title: str) -> Iterator[None]:
    """The run's progress in the terminal for the block's duration
    (:class:`~mathmill.pipeline.progress.LiveProgress` as ``live_listener``, which the
    flow run's context inherits); a plain line per stage when stdout is no terminal.
    """
    if not enabled:
        yield
        return
    from mathmill.pipeline.progress import LiveProgress, live_listener

    with LiveProgress(console, title=title) as view:
        token = live_listener.set(view)
        try:
            yield
        finally:
            live_listener.reset(token)


def show_progress(options: Mapping[str, Any]) -> bool:
    """Whether a run command draws its progress: not with ``--no-progress`` (or
    ``MATHMILL_PROGRESS=0``), nor with ``--debug`` (its turns print instead).
    """
    return bool(options.get("progress", True)) and not options.get("debug")


def print_ui(link: str | None) -> None:
    """Where the finished run is in the Prefect UI (nothing for a temporary server)."""
    if link:
        console.print(f"Prefect UI: {link}", markup=False, highlight=False)


def run_synthesize_params(
    cfg: Any, server: ServerMode | None = None, *, progress: bool = False
) -> tuple[Any, str | None]:
    """Run the synthesize flow for a validated config; its result and UI link."""
    from mathmill.flows.synthesize import synthesize

    return run_flow(synthesize, server, progress=progress, params=cfg)


def print_result(result: Any, link: str | None = None, *, name: str = "") -> None:
    """A pipeline run's end: its statistics (or counts by stage and outcome), the LLM
    usage, where the outputs are, a headline and the run's link in the Prefect UI.
    """
    from mathmill.tasks.export import count_rows

    if result.stats:
        table = Table(title=f"{name} statistics".strip())
        table.add_column("metric")
        table.add_column("value", justify="right")
        for metric, value in result.stats.items():
            table.add_row(metric, str(value))
    else:
        table = Table(title="rows by stage and outcome")
        for column in ("stage", "outcome", "rows"):
            table.add_column(column, justify="right" if column == "rows" else "left")
        for row in count_rows(result.counts):
            table.add_row(str(row["stage"]), str(row["outcome"]), str(row["rows"]))
    console.print(table)
    if any(u.get("calls") or u.get("cached") for u in result.usage.values()):
        console.print(usage_table(result.usage))
    console.print(f"run directory: {result.out}")
    for name, path in result.outputs.items():
        console.print(f"  {name:16} {path}", markup=False, highlight=False)
    console.print(f"{_headline(result)} in {result.wall_s:.1f}s")
    print_ui(link)


def _headline(result: Any) -> str:
    if hasattr(result, "replayed"):
        return (
            f"{result.lemmas} lemmas, {result.replayed} replayed, {result.selected} selected, "
            f"{result.kept} kept with a reasoning ({result.rejected} rejected)"
        )
    if hasattr(result, "examples"):
        return (
            f"{result.problems} problems, {result.kept} kept, {result.examples} critique "
            f"examples ({result.right} right, {result.wrong} wrong)"
        )
    if hasattr(result, "accuracy"):
        return f"{result.problems} problems, accuracy {result.accuracy}"
    if hasattr(result, "curated"):
        return f"{result.read} problems read, {result.curated} curated"
    if hasattr(result, "verified"):
        return f"{result.verified} verified and {result.unverified} unverified rows"
    if hasattr(result, "samples"):
        return f"{result.problems} problems, {result.samples} samples"
    return f"{result.problems} problems"


def usage_table(usage: dict[str, dict[str, float]]) -> Table:
    """LLM usage by stage as a rich table (cached = replayed from the call cache; GPU s:
    vLLM engine time; sbx s: sandbox execution time).
    """
    table = Table(title="LLM usage by stage")
    table.add_column("stage", no_wrap=True)
    columns = ("calls", "cached", "errors", "retries", "prompt_tokens", "completion_tokens")
    titles = ("calls", "cached", "err", "retry", "in tok", "out tok", "ms", "USD", "GPU s", "sbx s")
    for title in titles:
        table.add_column(title, justify="right", no_wrap=True)
    for name, u in usage.items():
        cells = [str(int(u[c])) for c in columns]
        cells += [f"{u['mean_latency_ms']:.0f}", f"{u['cost_usd']:.4f}"]
        cells += [f"{u.get('gpu_s', 0.0):.1f}", f"{u.get('sandbox_s', 0.0):.1f}"]
        table.add_row(name, *cells)
    return table


_ROLE_STYLE = {"user": "yellow", "assistant": "cyan", "tool": "green", "final": "bold magenta"}


def print_turn(event: Any) -> None:
    """``--debug``: one turn of a trajectory, coloured by role."""
    style = _ROLE_STYLE.get(event.role, "white")
    if event.role == "tool" and event.note not in ("", "ok"):
        style = "red"
    head = f"[{event.problem_id[:8]} #{event.sample}] {event.role}"
    note = f" ({event.note})" if event.note else ""
    console.rule(f"[{style}]{head}{note}[/{style}]", align="left", style=style)
    console.print(event.content, style=style, markup=False, highlight=False)


# -- the pipelines: options from their params models (mathmill.flows.cli_params) ----------

# Shortcut flags for common nested fields (flag -> dotted path); every other field has its
# own flag (top-level) or `--set PATH=VALUE`. A shortcut takes its flag from a top-level
# field of the same name (sample's --chunk-size), which then gets one of its own here.
SANDBOX_URL = Shortcut("sandbox.url", also={"sandbox.backend": "http"})
SYNTHESIZE_FLAGS: dict[str, str | Shortcut] = {
    "--base-url": "models.default.base_url",
    "--model": "models.default.model",
    "--api-key-env": "models.default.api_key_env",
    "--max-tokens": "models.default.max_tokens",
    "--max-concurrency": "models.default.max_concurrency",
    "--sandbox-url": SANDBOX_URL,
    "--sandbox-timeout": "sandbox.timeout_s",
}
TIR_FLAGS: dict[str, str | Shortcut] = {
    "--base-url": "solver.base_url",
    "--model": "solver.model",
    "--api-key-env": "solver.api_key_env",
    "--max-tokens": "solver.max_tokens",
    "--temperature": "solver.temperature",
    "--sandbox-url": SANDBOX_URL,
    "--sandbox-timeout": "sandbox.timeout_s",
}
SAMPLE_FLAGS: dict[str, str | Shortcut] = {
    "--base-url": "model.base_url",
    "--model": "model.model",
    "--api-key-env": "model.api_key_env",
    "--backend": "backend.kind",
    "--engine-model": "backend.engine.model",
    "--tensor-parallel": "backend.engine.tensor_parallel_size",
    "--max-model-len": "backend.engine.max_model_len",
    "--runs": "backend.runs",
    "--chunk-size": "backend.chunk_size",
    "--load-chunk-size": "chunk_size",
}
CURATE_FLAGS: dict[str, str | Shortcut] = {
    "--base-url": "solver.base_url",
    "--model": "solver.model",
    "--api-key-env": "solver.api_key_env",
    "--max-tokens": "solver.max_tokens",
    "--judge-model": "judge.model",
    "--sandbox-url": SANDBOX_URL,
    "--sandbox-timeout": "sandbox.timeout_s",
}
CRITIQUE_FLAGS: dict[str, str | Shortcut] = {
    "--models": Shortcut("model_names", help="Served model names on the endpoint, A,B,..."),
    "--base-url": "endpoint.base_url",
    "--api-key-env": "endpoint.api_key_env",
    "--teacher-model": Shortcut(
        "teacher_model.model",
        also={"teacher": True},
        help="A teacher explains each example (only explanations that agree are kept).",
    ),
}
FORMAL_FLAGS: dict[str, str | Shortcut] = {
    "--base-url": "endpoint.base_url",
    "--model": "endpoint.model",
    "--api-key-env": "endpoint.api_key_env",
    "--judge-model": "judge.model",
    "--scorer-base-url": "scorer.base_url",
    "--scorer-model": "scorer.model",
    "--scorer-backend": "scorer_backend.kind",
    "--scorer-engine-model": "scorer_backend.engine.model",
}
EVALUATE_FLAGS: dict[str, str | Shortcut] = {
    "--base-url": "model.base_url",
    "--model": "model.model",
    "--api-key-env": "model.api_key_env",
    "--backend": "backend.kind",
    "--engine-model": "backend.engine.model",
}


PREFECT_SERVER = option("prefect_server", PrefectServer)
DEBUG = option(
    "debug",
    Annotated[bool, typer.Option("--debug", help="Print every turn in colour (no progress view).")],
    False,
)
PROGRESS = option(
    "progress",
    Annotated[
        bool,
        typer.Option(
            "--progress/--no-progress",
            envvar="MATHMILL_PROGRESS",
            help="Show the run's progress: per stage chunks, rows and ETA, and the LLM "
            "calls, tokens and cost (a plain line per stage when stdout is not a terminal).",
        ),
    ],
    True,
)


def synthesize_model() -> type[SynthesizeParams]:
    """The synthesize flow's parameters (imports the flow)."""
    from mathmill.flows.synthesize import SynthesizeParams

    return SynthesizeParams


def run_synthesize(cfg: SynthesizeParams, options: Mapping[str, Any]) -> None:
    """Generate problems and chains of thought, verify them by code, write the dataset."""
    from mathmill.flows.synthesize import plan

    if cfg.dry_run:
        console.print_json(plan(cfg).model_dump_json())
        console.print("dry run: nothing was called")
        return
    progress = show_progress(options)
    print_result(*run_synthesize_params(cfg, options["prefect_server"], progress=progress))


def tir_model() -> type[TirParams]:
    """The tir flow's parameters (imports the flow)."""
    from mathmill.flows.tir import TirParams

    return TirParams


def run_tir(params: TirParams, options: Mapping[str, Any]) -> None:
    """Tool-integrated reasoning trajectories against a stateful Python sandbox."""
    from mathmill.flows.tir import tir, turn_hook

    if options["debug"]:
        params = params.model_copy(update={"concurrency": 1})  # turns print in order
    params.check_input()
    if params.dry_run:
        items = list(params.read())
        bad = [i for i in items if not hasattr(i, "statement")]
        console.print(
            f"{len(items) - len(bad)} problems, {len(bad)} malformed rows in {params.input_name()}"
        )
        console.print("dry run: nothing was called")
        return
    if options["debug"]:
        turn_hook.set(print_turn)
    progress = show_progress(options)
    print_result(
        *run_flow(tir, options["prefect_server"], progress=progress, params=params), name="tir"
    )


def run_checked(flow_: Any, name: str, params: Any, options: Mapping[str, Any]) -> None:
    """Check a pipeline's input, answer a dry run, else run ``flow_`` with progress and
    print its result (sample, curate, evaluate).
    """
    params.check_input()
    if params.dry_run:
        console.print("dry run: parameters are valid, nothing was called")
        return
    progress = show_progress(options)
    done = run_flow(flow_, options["prefect_server"], progress=progress, params=params)
    print_result(*done, name=name)


def sample_model() -> type[SampleParams]:
    """The sample flow's parameters (imports the flow)."""
    from mathmill.flows.sample import SampleParams

    return SampleParams


def run_sample(params: SampleParams, options: Mapping[str, Any]) -> None:
    """N solutions per problem with token logprobs, graded against the answers."""
    from mathmill.flows.sample import sample

    run_checked(sample, "sample", params, options)


def curate_model() -> type[CurateParams]:
    """The curate flow's parameters (imports the flow)."""
    from mathmill.flows.curate import CurateParams

    return CurateParams


def run_curate(params: CurateParams, options: Mapping[str, Any]) -> None:
    """Problems from files, datasets or SQL: normalized, deduplicated, decontaminated,
    solved by verified code with repair rounds, leak-checked.
    """
    from mathmill.flows.curate import curate

    run_checked(curate, "curate", params, options)


def critique_model() -> type[CritiqueParams]:
    """The critique flow's parameters (imports the flow)."""
    from mathmill.flows.critique import CritiqueParams

    return CritiqueParams


def run_critique(params: CritiqueParams, options: Mapping[str, Any]) -> None:
    """N samples per problem from several models, kept where they disagree, turned into
    right/wrong critique data (verl parquet).
    """
    from mathmill.flows.critique import critique

    run_checked(critique, "critique", params, options)


def formal_model() -> type[FormalParams]:
    """The formal flow's parameters (imports the flow)."""
    from mathmill.flows.formal import FormalParams

    return FormalParams


def run_formal(params: FormalParams, options: Mapping[str, Any]) -> None:
    """Coq lemmas replayed with goals, filtered, a BM25-diverse subset given reasonings
    scored by prompt logprobs and checked by a judge.
    """
    from mathmill.flows.formal import formal

    run_checked(formal, "formal", params, options)


def train_model() -> type[TrainParams]:
    """The train flow's parameters (imports the flow, not torch)."""
    from mathmill.flows.train import TrainParams

    return TrainParams


def run_train(params: TrainParams, options: Mapping[str, Any]) -> None:
    """Fine-tune a model on a train split with TRL (LoRA optional), checkpointed and
    resumable; the loss curves in the run directory.
    """
    from mathmill.flows.train import train

    if params.dry_run:
        console.print("dry run: parameters are valid, nothing was trained")
        return
    result, link = run_flow(train, options["prefect_server"], params=params)
    console.print(
        f"{result.steps} steps on {result.train_rows} rows ({result.device}): loss "
        f"{result.first_loss} -> {result.train_loss}, validation {result.eval_loss}, "
        f"{result.tokens_per_s:.1f} tokens/s"
        + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
    )
    for name, path in result.outputs.items():
        console.print(f"  {name:16} {path}", markup=False, highlight=False)
    print_ui(link)


def evaluate_model() -> type[EvaluateParams]:
    """The evaluate flow's parameters (imports the flow)."""
    from mathmill.flows.evaluate import EvaluateParams

    return EvaluateParams


def run_evaluate(params: EvaluateParams, options: Mapping[str, Any]) -> None:
    """A model on a split: accuracy by bucket, domain and structure tag, with intervals;
    failure patterns with examples.
    """
    from mathmill.flows.evaluate import evaluate

    run_checked(evaluate, "evaluate", params, options)


params_command(
    run_app,
    "synthesize",
    synthesize_model,
    run_synthesize,
    shortcuts=SYNTHESIZE_FLAGS,
    extra=[PREFECT_SERVER, PROGRESS],
)
params_command(
    run_app,
    "tir",
    tir_model,
    run_tir,
    shortcuts=TIR_FLAGS,
    extra=[DEBUG, PREFECT_SERVER, PROGRESS],
)
params_command(
    run_app,
    "sample",
    sample_model,
    run_sample,
    shortcuts=SAMPLE_FLAGS,
    extra=[PREFECT_SERVER, PROGRESS],
)
params_command(
    run_app,
    "curate",
    curate_model,
    run_curate,
    shortcuts=CURATE_FLAGS,
    extra=[PREFECT_SERVER, PROGRESS],
)
params_command(
    run_app,
    "critique",
    critique_model,
    run_critique,
    shortcuts=CRITIQUE_FLAGS,
    extra=[PREFECT_SERVER, PROGRESS],
)
params_command(
    run_app,
    "formal",
    formal_model,
    run_formal,
    shortcuts=FORMAL_FLAGS,
    extra=[PREFECT_SERVER, PROGRESS],
)
params_command(
    run_app,
    "train",
    train_model,
    run_train,
    shortcuts={"--lora": Shortcut("lora.enabled", help="Train LoRA adapters (PEFT).")},
    extra=[PREFECT_SERVER],
)
params_command(
    run_app,
    "evaluate",
    evaluate_model,
    run_evaluate,
    shortcuts=EVALUATE_FLAGS,
    extra=[PREFECT_SERVER, PROGRESS],
)
