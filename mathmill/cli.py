"""The ``mathmill`` command line."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from mathmill import __version__
from mathmill.deploy_cli import blocks_app, server_app
from mathmill.errors import MathmillError
from mathmill.export.cli import export
from mathmill.flows.cli import PrefectServer, run_app

if TYPE_CHECKING:
    from mathmill.llm.config import EndpointConfig

app = typer.Typer(
    help="mathmill: verified math reasoning data for LLMs, as Prefect flows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
endpoint_app = typer.Typer(help="Check OpenAI-compatible endpoints.", no_args_is_help=True)
app.add_typer(endpoint_app, name="endpoint")
sandbox_app = typer.Typer(help="Run the code sandbox.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(run_app, name="run")
app.add_typer(server_app, name="server")
app.add_typer(blocks_app, name="blocks")
vllm_app = typer.Typer(help="vLLM helpers (the vllm work pool).", no_args_is_help=True)
app.add_typer(vllm_app, name="vllm")
app.command()(export)  # mathmill export RUN_DIR --format trl|verl|sharegpt|hf (docs/export.md)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

BaseUrl = Annotated[
    str | None,
    typer.Option(help="OpenAI-compatible base URL (env MATHMILL_BASE_URL); none = embedded model."),
]
Model = Annotated[str | None, typer.Option(help="Model name (env MATHMILL_MODEL).")]
ApiKeyEnv = Annotated[
    str,
    typer.Option(help="Name of the environment variable holding the API key (never the key)."),
]


def _endpoint(base_url: str | None, model: str | None, api_key_env: str) -> EndpointConfig | None:
    from mathmill.llm.config import endpoint_from_env

    return endpoint_from_env(base_url, model, os.environ.get(api_key_env) or None)


@app.command()
def version() -> None:
    """Print the mathmill version."""
    console.print(__version__)


@endpoint_app.command("check")
def endpoint_check(
    base_url: BaseUrl = None,
    model: Model = None,
    api_key_env: ApiKeyEnv = "MATHMILL_API_KEY",
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 30.0,
    retries: Annotated[int, typer.Option(help="Retries per request.")] = 1,
    require_structured: Annotated[
        bool, typer.Option(help="Fail when structured output does not work.")
    ] = False,
) -> None:
    """Make one real call; print the model, latency and whether structured output works."""
    from mathmill.llm.check import check_endpoint
    from mathmill.llm.embedded import EmbeddedModel

    endpoint = _endpoint(base_url, model, api_key_env)
    update = {"timeout_s": timeout, "max_retries": retries, "max_backoff_s": 2.0}
    if endpoint is None:
        with console.status("starting the embedded model"), EmbeddedModel() as embedded:
            report = check_endpoint(embedded.model_copy(update=update), overall_timeout_s=600)
    else:
        endpoint = endpoint.model_copy(update=update)
        budget = (retries + 1) * timeout * 3 + 10
        report = check_endpoint(endpoint, overall_timeout_s=budget)
    table = Table(show_header=False, box=None)
    table.add_row("endpoint", report.base_url)
    table.add_row("model", report.model)
    table.add_row("latency", f"{report.latency_ms:.0f} ms ({report.completion_tokens} tokens)")
    table.add_row("reply", repr(report.reply))
    ok = report.structured_mode is not None
    table.add_row("structured output", f"{'yes' if ok else 'no'}: {report.structured_detail}")
    console.print(table)
    if require_structured and not ok:
        err.print("error: structured output does not work on this endpoint")
        raise typer.Exit(1)
    console.print("[green]OK[/green]")


@sandbox_app.command("serve")
def sandbox_serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8090,
    uds: Annotated[str | None, typer.Option(help="Listen on this Unix socket instead.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=256, help="Zygote processes (default: cores).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Default timeout per execution, s.")] = 10.0,
    memory_mb: Annotated[int, typer.Option(help="Memory per execution, MiB.")] = 1024,
    unsafe: Annotated[
        bool, typer.Option(help="Run code even where only rlimits can isolate it.")
    ] = False,
) -> None:
    """Serve the sandbox over HTTP (the Pythonformer REPL API)."""
    from mathmill.sandbox.http_server import serve
    from mathmill.sandbox.limits import Limits

    serve(
        host=host,
        port=port,
        uds=uds,
        workers=workers,
        limits=Limits(timeout_s=timeout, memory_mb=memory_mb),
        allow_unsafe=unsafe,
    )


@app.command()
def grade(
    gold: Annotated[str | None, typer.Argument(help="Reference answer.")] = None,
    pred: Annotated[str | None, typer.Argument(help="Predicted answer or model text.")] = None,
    file: Annotated[
        str | None,
        typer.Option("--file", help="JSONL with 'gold' and 'pred' per row ('-' for stdin)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per comparison.")] = 5.0,
) -> None:
    """Grade one pair (prints the verdict and the rule) or a JSONL file of pairs (one JSON
    object per row on stdout: the row plus 'equivalent', 'status', 'rule', 'reason').
    """
    from mathmill.grading.cli import grade_file, grade_pair

    if file is not None:
        raise typer.Exit(grade_file(file, timeout_s=timeout))
    if gold is None or pred is None:
        err.print("error: give GOLD and PRED, or --file pairs.jsonl")
        raise typer.Exit(2)
    result = grade_pair(gold, pred, timeout_s=timeout)
    console.print(
        f"{'equivalent' if result.equivalent else 'not equivalent'} "
        f"({result.status}; rule: {result.rule}): {result.reason}",
        markup=False,
        highlight=False,
    )
    raise typer.Exit(0 if result.equivalent else 1)


@app.command()
def classify(
    file: Annotated[
        str, typer.Argument(help="Problems: .jsonl, .parquet, a dataset directory or hf:NAME.")
    ],
    field: Annotated[str, typer.Option(help="Field holding the problem text.")] = "problem",
    code_field: Annotated[
        str, typer.Option(help="Field holding solution code, if any ('' for none).")
    ] = "code",
    plan_field: Annotated[
        str, typer.Option(help="Field holding a plan or solution text, if any.")
    ] = "",
    out: Annotated[
        str | None, typer.Option(help="Write the labels here (JSONL); default stdout.")
    ] = None,
    domains: Annotated[
        str | None,
        typer.Option(help="Comma-separated domains (default: algebra, number theory, ...)."),
    ] = None,
) -> None:
    """Label each problem with its domain by keywords and hard rules (fast, no model):
    one JSON line per row (id, domain, confidence, scores, rule), then counts per domain.
    Bad rows are reported on stderr and skipped.
    """
    from mathmill.labels.cli import print_summary, run_classify

    summary = run_classify(
        file,
        field=field,
        code_field=code_field or None,
        plan_field=plan_field or None,
        out=out,
        domains=domains,
    )
    print_summary(summary, stderr=out is None)
    if summary.rows == 0 and summary.bad_rows:
        raise typer.Exit(1)  # every row was bad: say so in the exit status too


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="Run directory: a local path or s3://...")],
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint (env MATHMILL_S3_ENDPOINT_URL).")
    ] = None,
) -> None:
    """Re-render a run's dataset report (report.html and report/*.png, in the run
    directory) from its manifest and datasets; prints where report.html is.
    """
    from mathmill.report.cli import run_report

    files, seconds = run_report(run_dir, endpoint_url)
    console.print(f"{len(files) - 1} charts in {seconds:.1f} s", highlight=False)
    console.print(files["report.html"], markup=False, highlight=False)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Run directory (re-run to resume).")] = "runs/demo",
    topics: Annotated[int, typer.Option(min=1, max=20, help="Topics to generate.")] = 2,
    problems_per_topic: Annotated[int, typer.Option(min=1, max=5)] = 1,
    short_cots: Annotated[int, typer.Option(min=0, max=4, help="Short CoTs per problem.")] = 1,
    rounds: Annotated[int, typer.Option(min=0, max=3, help="Rewrite rounds.")] = 1,
    max_tokens: Annotated[int, typer.Option(min=16, max=4096, help="Tokens per reply.")] = 320,
    base_url: BaseUrl = None,
    model: Model = None,
    api_key_env: ApiKeyEnv = "MATHMILL_API_KEY",
    prefect_server: PrefectServer = None,
) -> None:
    """Run the synthesize flow with small numbers on the embedded model (no keys, no GPU):
    topics, problems, chains of thought, code verification in the sandbox, rewrites,
    the blind check.
    """
    from mathmill.flows.cli import print_result, run_synthesize_params
    from mathmill.flows.synthesize import SynthesizeParams

    default: dict[str, object] = {"max_tokens": max_tokens}
    endpoint = _endpoint(base_url, model, api_key_env)
    if endpoint is not None:
        default |= {"base_url": endpoint.base_url, "model": endpoint.model}
        if os.environ.get(api_key_env):
            default["api_key_env"] = api_key_env
    cfg = SynthesizeParams(
        out=out,
        topics=topics,
        problems_per_topic=problems_per_topic,
        short_cots=short_cots,
        rounds=rounds,
        short_cot_max_tokens=max_tokens,
        models={"default": default},
    )
    console.print(
        f"synthesize on {endpoint.label if endpoint else 'the embedded model'}: "
        f"{topics} topics x {problems_per_topic} problems, 1 long + {short_cots} short CoTs, "
        f"{rounds} rewrite round(s); writing to {out}"
    )
    progress = os.environ.get("MATHMILL_PROGRESS", "1").strip().lower() not in ("0", "false", "no")
    print_result(*run_synthesize_params(cfg, prefect_server, progress=progress))


@vllm_app.command("convert")
def vllm_convert() -> None:
    """Convert the bundled SmolLM2 GGUF into a model folder vLLM loads; prints its path."""
    from mathmill.llm.vllm_model import local_vllm_model

    console.print(str(local_vllm_model()), markup=False, highlight=False)


def _run() -> int:
    """Run the app; the exit code. Errors end in one line on stderr, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except MathmillError as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        return 1
    except TyperException as e:
        if hasattr(e, "show"):
            e.show()
        return int(getattr(e, "exit_code", 2))
    except Exception as e:
        if os.environ.get("MATHMILL_DEBUG"):
            raise
        err.print(
            f"internal error: {type(e).__name__}: {e} (set MATHMILL_DEBUG=1 for the traceback)",
            markup=False,
            highlight=False,
        )
        return 70
    return code if isinstance(code, int) else 0


def _exit(code: int) -> NoReturn:
    """Exit after the atexit handlers (Prefect's log and event flushes, logging) and
    flushed output, skipping the interpreter's teardown: freeing the modules of
    Prefect, openai and pydantic one by one takes ~1 s of a short run, for nothing.
    Under a profiler, tracer or debugger (cProfile, coverage, pdb) the exit is the
    ordinary one, so they can write what they gathered.
    """
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe, a detached stream
            stream.flush()
    os._exit(code)


def main() -> None:
    """Entry point of the ``mathmill`` command (ends the process)."""
    # Collect cycles 70x less often: the imports (Prefect, openai, pydantic) and a run's
    # records allocate millions of objects that live on, and every full collection
    # walks them all: 0.5 s of a 3.5 s run of 1,000 calls (bench/e2e.py). Reference
    # counting still frees everything else at once.
    gc.set_threshold(50_000, 20, 20)
    # A local Prefect server must not try to phone home (offline machines log errors).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _exit(_run())
