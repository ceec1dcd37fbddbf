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
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mathmill.errors import ConfigError, MathmillError

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

__all__ = [
    "PrefectServer",
    "build_params",
    "load_config_file",
    "prefect_api",
    "run_app",
    "run_flow",
    "run_synthesize_config",
    "validation_message",
]

M = TypeVar("M", bound="BaseModel")
ServerMode = Literal["local", "ephemeral"]
PrefectServer = Annotated[
    ServerMode | None,
    typer.Option(
        "--prefect-server",
        help="Where the run is recorded when PREFECT_API_URL is unset: 'local' starts a "
        "Prefect server once in the background ($MATHMILL_SERVER_HOME, default "
        "~/.mathmill/server; port $MATHMILL_SERVER_PORT, default 4200) and reuses it, so "
        "runs keep their history in the UI; 'ephemeral' uses Prefect's temporary server "
        "for this run only. Default: $MATHMILL_PREFECT_SERVER or local.",
    ),
]
run_app = typer.Typer(help="Run a pipeline (a Prefect flow).", no_args_is_help=True)
console = Console(soft_wrap=True)
if not console.is_terminal:  # piped or in CI: 80 columns would cut the tables
    console.width = 120


def validation_message(error: ValidationError, what: str) -> str:
    """One line naming each bad field: ``topics: Input should be ...``."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(config)"
        parts.append(f"{where}: {e['msg']}")
    return f"invalid {what}: " + "; ".join(parts)


def load_config_file(path: Path | None) -> dict[str, Any]:
    """A JSON or YAML file of flow parameters (empty when no file)."""
    if path is None:
        return {}
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json and yaml raise different errors
        reason = " ".join(str(e).split())  # YAML's messages span lines
        raise ConfigError(f"config file {path} does not parse: {reason}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of parameters")
    return data


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None:
        return
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def build_params(model: type[M], config: Path | None, values: dict[str, Any], what: str) -> M:
    """Flow parameters from a config file, overridden by the flags that were given
    (dotted keys for nested fields); a bad value is one :class:`ConfigError` line.
    """
    from pydantic import ValidationError

    data = load_config_file(config)
    for key, value in values.items():
        _set(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e, what)) from None


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
    from mathmill.server import default_home, default_port, ensure_local_server

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


def run_flow(flow: Any, server: ServerMode | None = None, **params: Any) -> tuple[Any, str | None]:
    """Run a Prefect flow on the server :func:`prefect_api` picks; its result and the
    run's link in the UI (None on a temporary server). The flow's own error is raised
    as it is, after the link, so the failed run's logs are one click away.
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

    skip_pyarrow_pandas_probe()
    with prefect_api(server) as api:
        quiet_known_errors()
        return asyncio.run(_run(api))


def print_ui(link: str | None) -> None:
    """Where the finished run is in the Prefect UI (nothing for a temporary server)."""
    if link:
        console.print(f"Prefect UI: {link}", markup=False, highlight=False)


def run_synthesize_config(cfg: Any, server: ServerMode | None = None) -> tuple[Any, str | None]:
    """Run the synthesize flow for a validated config; its result and UI link."""
    from mathmill.flows.synthesize import synthesize

    return run_flow(synthesize, server, config=cfg)


def print_result(result: Any, link: str | None = None) -> None:
    """The counts table, the outputs and the verified/unverified totals."""
    from mathmill.tasks.export import count_rows

    table = Table(title="rows by stage and outcome")
    for column in ("stage", "outcome", "rows"):
        table.add_column(column, justify="right" if column == "rows" else "left")
    for row in count_rows(result.counts):
        table.add_row(str(row["stage"]), str(row["outcome"]), str(row["rows"]))
    console.print(table)
    console.print(usage_table(result.usage))
    console.print(f"run directory: {result.out}")
    for name, path in result.outputs.items():
        console.print(f"  {name:16} {path}", markup=False, highlight=False)
    console.print(
        f"{result.verified} verified and {result.unverified} unverified rows "
        f"in {result.wall_s:.1f}s"
    )
    print_ui(link)


def usage_table(usage: dict[str, dict[str, float]]) -> Table:
    """LLM usage by stage as a rich table (cached = replayed from the call cache)."""
    table = Table(title="LLM usage by stage")
    table.add_column("stage", no_wrap=True)
    columns = ("calls", "cached", "errors", "retries", "prompt_tokens", "completion_tokens")
    for title in ("calls", "cached", "err", "retry", "in tok", "out tok", "ms", "USD"):
        table.add_column(title, justify="right", no_wrap=True)
    for name, u in usage.items():
        cells = [str(int(u[c])) for c in columns]
        table.add_row(name, *cells, f"{u['mean_latency_ms']:.0f}", f"{u['cost_usd']:.4f}")
    return table


Opt = typer.Option


@run_app.command("synthesize")
def synthesize_command(
    out: Annotated[str | None, Opt(help="Run directory or s3:// URL (re-run to resume).")] = None,
    topics: Annotated[int | None, Opt(help="Unique topics to generate.")] = None,
    problems_per_topic: Annotated[int | None, Opt(help="Problems per topic.")] = None,
    short_cots: Annotated[int | None, Opt(help="Short CoTs per problem.")] = None,
    rounds: Annotated[int | None, Opt(help="Feedback-rewrite rounds.")] = None,
    domains: Annotated[str | None, Opt(help="Comma-separated domains.")] = None,
    chunk_size: Annotated[int | None, Opt(help="Problems per chunk (task).")] = None,
    concurrency: Annotated[int | None, Opt(help="Rows in flight per chunk.")] = None,
    limit: Annotated[int | None, Opt(help="Solve at most this many problems.")] = None,
    seed: Annotated[int | None, Opt(help="Base seed.")] = None,
    base_url: Annotated[str | None, Opt(help="Default endpoint for every role.")] = None,
    model: Annotated[str | None, Opt(help="Default model for every role.")] = None,
    api_key_env: Annotated[
        str | None, Opt(help="Env var holding the API key (never the key itself).")
    ] = None,
    max_tokens: Annotated[int | None, Opt(help="Max tokens per reply, every role.")] = None,
    max_concurrency: Annotated[int | None, Opt(help="Requests in flight per endpoint.")] = None,
    sandbox_url: Annotated[str | None, Opt(help="Use a sandbox server at this URL.")] = None,
    sandbox_timeout: Annotated[float | None, Opt(help="Seconds per code run.")] = None,
    storage_endpoint_url: Annotated[str | None, Opt(help="S3-compatible endpoint.")] = None,
    config: Annotated[
        Path | None, Opt("--config", help="JSON/YAML file of flow parameters (flags win).")
    ] = None,
    dry_run: Annotated[bool, Opt("--dry-run", help="Validate and print the plan.")] = False,
    prefect_server: PrefectServer = None,
) -> None:
    """Generate problems and chains of thought, verify them by code, write the dataset."""
    from mathmill.flows.synthesize import SynthesizeConfig, plan

    values = {
        "out": out,
        "topics": topics,
        "problems_per_topic": problems_per_topic,
        "short_cots": short_cots,
        "rounds": rounds,
        "domains": [d.strip() for d in domains.split(",") if d.strip()] if domains else None,
        "chunk_size": chunk_size,
        "concurrency": concurrency,
        "limit": limit,
        "seed": seed,
        "storage_endpoint_url": storage_endpoint_url,
        "models.default.base_url": base_url,
        "models.default.model": model,
        "models.default.api_key_env": api_key_env,
        "models.default.max_tokens": max_tokens,
        "models.default.max_concurrency": max_concurrency,
        "sandbox.url": sandbox_url,
        "sandbox.backend": "http" if sandbox_url else None,
        "sandbox.timeout_s": sandbox_timeout,
        "dry_run": dry_run or None,
    }
    cfg = build_params(SynthesizeConfig, config, values, "synthesize parameters")
    if cfg.dry_run:
        console.print_json(plan(cfg).model_dump_json())
        console.print("dry run: nothing was called")
        return
    print_result(*run_synthesize_config(cfg, prefect_server))


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


def print_tir_result(result: Any, link: str | None = None) -> None:
    """The statistics, the LLM usage and where the exports are."""
    table = Table(title="tir statistics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in result.stats.items():
        table.add_row(metric, str(value))
    console.print(table)
    console.print(usage_table(result.usage))
    console.print(f"run directory: {result.out}")
    for name, path in result.outputs.items():
        console.print(f"  {name:16} {path}", markup=False, highlight=False)
    console.print(f"{result.problems} problems in {result.wall_s:.1f}s")
    print_ui(link)


@run_app.command("tir")
def tir_command(
    input: Annotated[
        str | None, Opt("--input", help="JSONL/Parquet file, dataset directory or hf:NAME.")
    ] = None,
    out: Annotated[str | None, Opt(help="Run directory or s3:// URL (re-run to resume).")] = None,
    limit: Annotated[int | None, Opt(help="At most this many problems.")] = None,
    split: Annotated[str | None, Opt(help="Dataset split (directories, hf:).")] = None,
    id_field: Annotated[str | None, Opt(help="Input field with the id.")] = None,
    prompt_field: Annotated[str | None, Opt(help="Input field with the problem.")] = None,
    answer_field: Annotated[str | None, Opt(help="Input field with the answer.")] = None,
    samples: Annotated[int | None, Opt(help="Trajectories per problem.")] = None,
    max_turns: Annotated[int | None, Opt(help="Model replies per trajectory.")] = None,
    max_output_chars: Annotated[int | None, Opt(help="<repl> output cap.")] = None,
    concurrency: Annotated[int | None, Opt(help="Trajectories in flight.")] = None,
    base_url: Annotated[str | None, Opt(help="OpenAI-compatible endpoint.")] = None,
    model: Annotated[str | None, Opt(help="Model name.")] = None,
    api_key_env: Annotated[str | None, Opt(help="Env var holding the API key.")] = None,
    max_tokens: Annotated[int | None, Opt(help="Max tokens per reply.")] = None,
    temperature: Annotated[float | None, Opt(help="Sampling temperature.")] = None,
    sandbox_url: Annotated[str | None, Opt(help="Use a sandbox server at this URL.")] = None,
    sandbox_timeout: Annotated[float | None, Opt(help="Seconds per code block.")] = None,
    config: Annotated[
        Path | None, Opt("--config", help="JSON/YAML file of flow parameters (flags win).")
    ] = None,
    debug: Annotated[bool, Opt("--debug", help="Print every turn in colour.")] = False,
    dry_run: Annotated[bool, Opt("--dry-run", help="Validate and count; call nothing.")] = False,
    prefect_server: PrefectServer = None,
) -> None:
    """Tool-integrated reasoning trajectories against a stateful Python sandbox."""
    from mathmill.flows.tir import TirParams, tir, turn_hook

    values = {
        "input": input,
        "out": out,
        "limit": limit,
        "split": split,
        "id_field": id_field,
        "prompt_field": prompt_field,
        "answer_field": answer_field,
        "samples": samples,
        "max_turns": max_turns,
        "max_output_chars": max_output_chars,
        "concurrency": 1 if debug else concurrency,
        "solver.base_url": base_url,
        "solver.model": model,
        "solver.api_key_env": api_key_env,
        "solver.max_tokens": max_tokens,
        "solver.temperature": temperature,
        "sandbox.url": sandbox_url,
        "sandbox.backend": "http" if sandbox_url else None,
        "sandbox.timeout_s": sandbox_timeout,
        "dry_run": dry_run or None,
    }
    params = build_params(TirParams, config, values, "tir parameters")
    params.check_input()
    if params.dry_run:
        from mathmill.sources import FieldMap, read_problems

        fields = FieldMap(params.prompt_field, params.answer_field, None, params.id_field)
        items = list(read_problems(params.input, fields, split=params.split, limit=params.limit))
        bad = [i for i in items if not hasattr(i, "statement")]
        console.print(
            f"{len(items) - len(bad)} problems, {len(bad)} malformed rows in {params.input}"
        )
        console.print("dry run: nothing was called")
        return
    if debug:
        turn_hook.set(print_turn)
    print_tir_result(*run_flow(tir, prefect_server, params=params))


@run_app.command("sample")
def sample_command(
    input: Annotated[
        str | None, Opt("--input", help="JSONL/Parquet file, dataset directory or hf:NAME.")
    ] = None,
    out: Annotated[str | None, Opt(help="Run directory or s3:// URL (re-run to resume).")] = None,
    limit: Annotated[int | None, Opt(help="At most this many problems.")] = None,
    samples: Annotated[int | None, Opt(help="Solutions per problem (n).")] = None,
    temperature: Annotated[float | None, Opt(help="Sampling temperature.")] = None,
    max_tokens: Annotated[int | None, Opt(help="Tokens per solution.")] = None,
    seed: Annotated[int | None, Opt(help="Sampling seed.")] = None,
    top_logprobs: Annotated[int | None, Opt(help="Alternatives kept per token.")] = None,
    backend: Annotated[
        str | None, Opt(help="endpoint (default), deployment (vllm pool) or engine (here).")
    ] = None,
    engine_model: Annotated[
        str | None, Opt(help="Model folder or HF name for vLLM (deployment, engine).")
    ] = None,
    tensor_parallel: Annotated[int | None, Opt(help="GPUs per engine.")] = None,
    max_model_len: Annotated[int | None, Opt(help="Engine context length.")] = None,
    runs: Annotated[int | None, Opt(help="generate flow runs at once (deployment).")] = None,
    chunk_size: Annotated[int | None, Opt(help="Requests per generation chunk.")] = None,
    base_url: Annotated[str | None, Opt(help="OpenAI-compatible endpoint.")] = None,
    model: Annotated[str | None, Opt(help="Model name at the endpoint.")] = None,
    api_key_env: Annotated[str | None, Opt(help="Env var holding the API key.")] = None,
    config: Annotated[
        Path | None, Opt("--config", help="JSON/YAML file of flow parameters (flags win).")
    ] = None,
    dry_run: Annotated[bool, Opt("--dry-run", help="Validate; call nothing.")] = False,
    prefect_server: PrefectServer = None,
) -> None:
    """N solutions per problem with token logprobs, graded against the answers."""
    from mathmill.flows.sample import SampleParams, sample

    values = {
        "input": input,
        "out": out,
        "limit": limit,
        "samples": samples,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "seed": seed,
        "top_logprobs": top_logprobs,
        "backend.kind": backend,
        "backend.engine.model": engine_model,
        "backend.engine.tensor_parallel_size": tensor_parallel,
        "backend.engine.max_model_len": max_model_len,
        "backend.runs": runs,
        "backend.chunk_size": chunk_size,
        "model.base_url": base_url,
        "model.model": model,
        "model.api_key_env": api_key_env,
        "dry_run": dry_run or None,
    }
    params = build_params(SampleParams, config, values, "sample parameters")
    params.check_input()
    if params.dry_run:
        console.print("dry run: parameters are valid, nothing was called")
        return
    result, link = run_flow(sample, prefect_server, params=params)
    table = Table(title="sample statistics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in result.stats.items():
        table.add_row(metric, str(value))
    console.print(table)
    for name, path in result.outputs.items():
        console.print(f"  {name:16} {path}", markup=False, highlight=False)
    console.print(f"{result.problems} problems, {result.samples} samples in {result.wall_s:.1f}s")
    print_ui(link)
