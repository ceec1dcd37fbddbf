"""``mathmill export RUN_DIR --format trl|verl|sharegpt|hf``.

Only typer is imported here; the readers and writers (pyarrow, datasets, transformers)
load when the command runs, so that ``mathmill --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["export"]


def export(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory (a path or s3://...).")],
    format: Annotated[
        str, typer.Option("--format", "-f", help="trl, verl, sharegpt or hf.")
    ] = "trl",
    out: Annotated[
        str | None, typer.Option(help="Output directory (default RUN_DIR/export/FORMAT).")
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="A local tokenizer folder: write a 'text' column rendered with its chat "
            "template (trl, hf). Never downloaded."
        ),
    ] = None,
    split_from_run: Annotated[
        bool | None,
        typer.Option(
            "--split-from-run/--no-split-from-run",
            help="Keep the run's train/validation/test splits (curate); default: when it has "
            "them. --no-split-from-run: one 'train' split.",
        ),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option(help="A system message for every row (replaces the run's own; '' drops it)."),
    ] = None,
    tool_style: Annotated[
        str,
        typer.Option(
            help="tir in trl/hf: 'calls' (TRL tool calls and a tools column) or 'tags' "
            "(the <python> blocks stay in the text)."
        ),
    ] = "calls",
    data_source: Annotated[
        str | None, typer.Option(help="The data_source of every row (verl picks its reward by it).")
    ] = None,
    instruction: Annotated[
        str | None,
        typer.Option(
            help="Appended to verl prompts ('' for none; default: think step by step, "
            "answer in \\boxed{})."
        ),
    ] = None,
    push_to_hub: Annotated[
        str | None, typer.Option(help="hf: push the DatasetDict to this Hub repo (owner/name).")
    ] = None,
    hub_token_env: Annotated[
        str, typer.Option(help="Name of the environment variable holding the Hub token.")
    ] = "HF_TOKEN",
    public: Annotated[
        bool, typer.Option(help="Push as a public dataset (default private).")
    ] = False,
    allow_incomplete: Annotated[
        bool, typer.Option(help="Export what finished of an incomplete run.")
    ] = False,
) -> None:
    """Export a run's VERIFIED rows for training: TRL SFT messages JSONL, verl RL
    Parquet, ShareGPT, or a datasets DatasetDict; with export.json (source, counts,
    filters). The pipeline is read from the run's manifest.json.
    """
    from rich.console import Console
    from rich.table import Table

    from mathmill.errors import ConfigError
    from mathmill.export.formats import DEFAULT_INSTRUCTION, FORMATS, ExportOptions, write_export
    from mathmill.export.rows import read_run

    if format not in FORMATS:
        raise ConfigError(f"--format: one of {', '.join(FORMATS)}, not {format!r}")
    if tool_style not in ("calls", "tags"):
        raise ConfigError(f"--tool-style: calls or tags, not {tool_style!r}")
    opts = ExportOptions(
        format=format,  # type: ignore[arg-type]
        out=out,
        chat_template=chat_template,
        split_from_run=split_from_run,
        system=system,
        tool_style=tool_style,  # type: ignore[arg-type]
        data_source=data_source,
        instruction=DEFAULT_INSTRUCTION if instruction is None else instruction,
        push_to_hub=push_to_hub,
        hub_token_env=hub_token_env,
        private=not public,
    )
    if format in ("verl", "hf"):
        import datasets

        datasets.disable_progress_bars()  # one summary below, not a bar per file
    rows = read_run(run_dir, allow_incomplete=allow_incomplete)
    result = write_export(rows, opts)
    console = Console(soft_wrap=True)
    table = Table(show_header=False, box=None)
    table.add_row("pipeline", rows.pipeline)
    table.add_row("verified rows", f"{len(rows.examples)} of {rows.read} read")
    for split, n in result.rows.items():
        table.add_row(f"  {split}", str(n))
    for reason, n in sorted(result.skipped.items()):
        table.add_row(f"skipped: {reason}", str(n))
    console.print(table, markup=False, highlight=False)
    console.print(f"written to {result.out}", markup=False, highlight=False)
