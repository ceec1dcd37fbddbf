"""`mathmill run <pipeline>` options built from the params model (mathmill.flows.cli_params):
a flag per top-level field, shortcut flags, --set, --config and their precedence, one-line
errors naming the field. Nothing here calls an LLM: dry runs and validation only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
import typer.main
from pydantic import BaseModel, ConfigDict, Field
from rich.markup import escape
from typer.testing import CliRunner

from mathmill import cli as mathmill_cli
from mathmill.errors import ConfigError
from mathmill.flows.cli import run_app
from mathmill.flows.cli_params import ParamsCommand, field_type, params_command, params_of

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT / "tests" / "data" / "gsm8k_5.jsonl"
PIPELINES = ("synthesize", "tir", "sample")

# Every flag the hand-written commands had, and the field it set: they keep working.
TODAY = {
    "synthesize": {
        **{f"--{f.replace('_', '-')}": f for f in ("out", "topics", "problems_per_topic")},
        **{f"--{f.replace('_', '-')}": f for f in ("short_cots", "rounds", "domains")},
        **{f"--{f.replace('_', '-')}": f for f in ("chunk_size", "concurrency", "limit")},
        **{"--seed": "seed", "--storage-endpoint-url": "storage_endpoint_url"},
        "--base-url": "models.default.base_url",
        "--model": "models.default.model",
        "--api-key-env": "models.default.api_key_env",
        "--max-tokens": "models.default.max_tokens",
        "--max-concurrency": "models.default.max_concurrency",
        "--sandbox-url": "sandbox.url",
        "--sandbox-timeout": "sandbox.timeout_s",
        "--dry-run": "dry_run",
    },
    "tir": {
        **{f"--{f.replace('_', '-')}": f for f in ("input", "out", "limit", "split")},
        **{f"--{f.replace('_', '-')}": f for f in ("id_field", "prompt_field", "answer_field")},
        **{f"--{f.replace('_', '-')}": f for f in ("samples", "max_turns", "max_output_chars")},
        "--concurrency": "concurrency",
        "--base-url": "solver.base_url",
        "--model": "solver.model",
        "--api-key-env": "solver.api_key_env",
        "--max-tokens": "solver.max_tokens",
        "--temperature": "solver.temperature",
        "--sandbox-url": "sandbox.url",
        "--sandbox-timeout": "sandbox.timeout_s",
        "--dry-run": "dry_run",
    },
    "sample": {
        **{f"--{f.replace('_', '-')}": f for f in ("input", "out", "limit", "samples")},
        **{f"--{f.replace('_', '-')}": f for f in ("temperature", "max_tokens", "seed")},
        "--top-logprobs": "top_logprobs",
        "--backend": "backend.kind",
        "--engine-model": "backend.engine.model",
        "--tensor-parallel": "backend.engine.tensor_parallel_size",
        "--max-model-len": "backend.engine.max_model_len",
        "--runs": "backend.runs",
        "--chunk-size": "backend.chunk_size",
        "--base-url": "model.base_url",
        "--model": "model.model",
        "--api-key-env": "model.api_key_env",
        "--dry-run": "dry_run",
    },
}


def command(name: str) -> ParamsCommand:
    group: Any = typer.main.get_command(run_app)
    found = group.commands[name]
    assert isinstance(found, ParamsCommand)
    return found


def params(name: str, *args: str) -> Any:
    return params_of(command(name), list(args))


def mathmill(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``mathmill ARGS`` in this process, as the entry point runs it: exit code, stdout,
    stderr (errors are one line there).
    """
    monkeypatch.setattr(sys, "argv", ["mathmill", *args])
    code = mathmill_cli._run()
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the flags --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PIPELINES)
def test_every_top_level_field_has_a_flag_with_its_description(name: str) -> None:
    cmd = command(name)
    by_path = {path: flag for flag, path in cmd.flag_paths().items()}
    options = {p.opts[0]: p for p in cmd.params}
    scalar = {n: f for n, f in cmd.model.model_fields.items() if field_type(f.annotation)}
    assert len(scalar) >= 10
    for field_name, info in scalar.items():
        assert field_name in by_path, f"{name}: no flag for {field_name}"
        option = options[by_path[field_name]]
        assert escape(info.description or "") in option.help
    wide = CliRunner().invoke(run_app, [name, "--help"], env={"COLUMNS": "250"}, color=False)
    assert wide.exit_code == 0, wide.output
    for flag in [*cmd.flag_paths(), "--set", "--config", "--prefect-server"]:
        assert f" {flag} " in wide.output, flag


@pytest.mark.parametrize("name", PIPELINES)
def test_every_flag_of_the_hand_written_commands_sets_the_same_field(name: str) -> None:
    paths = command(name).flag_paths()
    assert {flag: paths.get(flag) for flag in TODAY[name]} == TODAY[name]


def test_shortcut_help_is_the_nested_fields_description_and_defaults_show() -> None:
    from mathmill.flows.options import ModelRole, SandboxOptions

    options = {p.opts[0]: p for p in command("synthesize").params}
    assert (
        escape(ModelRole.model_fields["max_tokens"].description or "")
        in options["--max-tokens"].help
    )
    assert "(models.default.max_tokens)" in options["--max-tokens"].help
    timeout = options["--sandbox-timeout"]
    assert escape(SandboxOptions.model_fields["timeout_s"].description or "") in timeout.help
    assert (timeout.default, timeout.show_default) == ("10.0", True)
    assert (options["--topics"].default, options["--topics"].show_default) == ("10", True)
    assert options["--leak-check"].secondary_opts == ["--no-leak-check"]
    assert options["--dry-run"].secondary_opts == []  # a plain switch, as before


def test_flags_convert_through_the_model() -> None:
    cfg = params(
        "synthesize",
        *("--topics", "3", "--domains", "algebra, geometry", "--no-leak-check", "--dry-run"),
        *("--sandbox-url", "http://sb:8090", "--sandbox-timeout", "2.5", "--model", "m"),
    )
    assert (cfg.topics, cfg.domains, cfg.leak_check, cfg.dry_run) == (
        3,
        ["algebra", "geometry"],
        False,
        True,
    )
    assert (cfg.sandbox.url, cfg.sandbox.backend, cfg.sandbox.timeout_s) == (
        "http://sb:8090",
        "http",
        2.5,
    )
    assert cfg.models.default.model == "m"
    untouched = params("synthesize")
    assert (untouched.topics, untouched.leak_check, untouched.dry_run) == (10, True, False)
    assert untouched.sandbox.backend == "local"


def test_sample_chunk_flags_keep_their_meaning() -> None:
    p = params("sample", "--input", str(GSM8K), "--chunk-size", "7", "--load-chunk-size", "9")
    assert (p.backend.chunk_size, p.chunk_size) == (7, 9)
    engine = params("sample", "--input", "x", "--backend", "engine", "--engine-model", "/m")
    assert (engine.backend.kind, engine.backend.engine.model) == ("engine", "/m")


# -- --set and --config -------------------------------------------------------------------------


def test_set_reaches_the_validated_model() -> None:
    cfg = params(
        "synthesize",
        *("--set", "models.coder.temperature=0.3", "--set", "limit=5"),
        *("--set", 'domains=["a", "b"]', "--set", "out=2024", "--set", "leak_check=false"),
        *("--set", "sandbox.memory_mb=512", "--set", 'models.critic={"model": "judge"}'),
    )
    assert cfg.models.coder.temperature == 0.3
    assert (cfg.limit, cfg.domains, cfg.out, cfg.leak_check) == (5, ["a", "b"], "2024", False)
    assert cfg.sandbox.memory_mb == 512
    assert cfg.models.critic.model == "judge"
    assert params("synthesize", "--set", "limit=3", "--set", "limit=null").limit is None
    tir = params("tir", "--input", "x", "--set", "id_field=null", "--set", "solver.max_tokens=64")
    assert (tir.id_field, tir.solver.max_tokens) == (None, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "models.coder.temperature=hot"],
            "invalid synthesize parameters: models.coder.temperature: Input should be a valid "
            "number, unable to parse string as a number",
        ),
        (
            ["--set", "models.coder.temperature=9"],
            "invalid synthesize parameters: models.coder.temperature: Input should be less "
            "than or equal to 2",
        ),
        (
            ["--set", "models.coderr.temperature=0.3"],
            "invalid synthesize parameters: --set models.coderr.temperature: no such parameter "
            "(models has: default, generator, reasoner, coder, critic, rewriter)",
        ),
        (
            ["--set", "topicz=3"],
            "invalid synthesize parameters: --set topicz: no such parameter (the top level "
            "has: storage_endpoint_url, storage_block, results_block, budget, fan_out, out, "
            "topics,",
        ),
        (
            ["--set", "topics"],
            "invalid synthesize parameters: --set 'topics': expected PATH=VALUE",
        ),
        (["--topics", "0"], "invalid synthesize parameters: topics: Input should be greater"),
        (["--topics", "many"], "invalid synthesize parameters: topics: Input should be a valid"),
        (
            ["--max-tokens", "8"],
            "invalid synthesize parameters: models.default.max_tokens: Input should be greater "
            "than or equal to 16",
        ),
    ],
    ids=[
        "bad-number",
        "out-of-range",
        "unknown-nested",
        "unknown-top",
        "no-equals",
        "flag-0",
        "flag-text",
        "shortcut",
    ],
)
def test_a_bad_value_is_one_line_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, out, err = mathmill(monkeypatch, capsys, "run", "synthesize", *args, "--dry-run")
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {message}"), line
    assert "dry run" not in out


def test_flag_beats_set_beats_config_file(tmp_path: Path) -> None:
    config = tmp_path / "synth.yaml"
    config.write_text(
        "topics: 7\nrounds: 1\nseed: 5\nmodels:\n  default:\n    model: from-file\n"
        "    max_tokens: 100\n"
    )
    base = ("--config", str(config))
    sets = ("--set", "topics=6", "--set", "rounds=0", "--set", "models.default.model=from-set")
    flags = ("--topics", "4", "--model", "from-flag")
    only_file = params("synthesize", *base)
    assert (only_file.topics, only_file.rounds, only_file.seed) == (7, 1, 5)
    assert only_file.models.default.model == "from-file"
    with_set = params("synthesize", *base, *sets)
    assert (with_set.topics, with_set.rounds, with_set.seed) == (6, 0, 5)
    assert with_set.models.default.model == "from-set"
    everything = params("synthesize", *flags, *sets, *base)  # the order given does not matter
    assert (everything.topics, everything.rounds, everything.seed) == (4, 0, 5)
    assert everything.models.default.model == "from-flag"
    assert everything.models.default.max_tokens == 100  # the file's sibling field stays
    # a --set of a whole table under a flag's field: the flag still wins
    whole = params("synthesize", "--model", "m", "--set", 'models.default={"model": "x"}')
    assert whole.models.default.model == "m"


def test_config_file_json_and_errors(tmp_path: Path) -> None:
    config = tmp_path / "tir.json"
    config.write_text(json.dumps({"input": str(GSM8K), "solver": {"temperature": 0.1}}))
    tir = params("tir", "--config", str(config), "--temperature", "0.7")
    assert (tir.input, tir.solver.temperature) == (str(GSM8K), 0.7)
    with pytest.raises(ConfigError, match="cannot read config file"):
        params("tir", "--config", str(tmp_path / "missing.json"))


# -- the pipelines' commands, dry runs --------------------------------------------------------


def test_synthesize_dry_run_prints_the_plan(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = mathmill(
        monkeypatch,
        capsys,
        *("run", "synthesize", "--topics", "3", "--set", "problems_per_topic=2"),
        *("--short-cots", "2", "--out", str(tmp_path / "dry"), "--dry-run"),
    )
    assert code == 0, err
    plan = json.loads(out[: out.rindex("}") + 1])
    assert (plan["topics"], plan["problems"], plan["cots"]) == (3, 6, 18)
    assert "dry run: nothing was called" in out
    assert not (tmp_path / "dry").exists()


def test_tir_dry_run_counts_the_input_and_keeps_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("run", "tir", "--input", str(GSM8K), "--limit", "3", "--dry-run", "--debug")
    code, out, err = mathmill(monkeypatch, capsys, *args)
    assert code == 0, err
    assert f"3 problems, 0 malformed rows in {GSM8K}" in out
    code, _, err = mathmill(monkeypatch, capsys, "run", "tir", "--input", "/no/such.jsonl")
    assert code == 1
    assert (
        err.strip()
        == "error: input '/no/such.jsonl' does not exist (a file, a directory or hf:NAME)"
    )


def test_sample_dry_run_and_a_missing_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = mathmill(
        monkeypatch, capsys, "run", "sample", "--input", str(GSM8K), "--dry-run"
    )
    assert code == 0, err
    assert "dry run: parameters are valid, nothing was called" in out
    code, _, err = mathmill(monkeypatch, capsys, "run", "sample", "--dry-run")
    assert code == 1
    assert err.strip() == "error: invalid sample parameters: input: Field required"


def test_a_bad_set_in_a_real_process_is_one_line() -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mathmill", "run", "tir", "--input", str(GSM8K)),
            *("--set", "sandbox.timeout_s=-1", "--dry-run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: invalid tir parameters: sandbox.timeout_s: Input should be greater than 0"
    ]


def test_listing_the_pipelines_imports_no_model() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mathmill", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "synthesize" in done.stdout and "sample" in done.stdout
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", done.stderr, re.M))
    assert "mathmill.flows.cli_params" in names
    flows = {f"mathmill.flows.{n}" for n in PIPELINES}
    assert not names & {"prefect", *flows}, names & {"prefect", *flows}


# -- any params model gets a command ------------------------------------------------------------


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    depth: int = Field(2, ge=1, description="How deep to go.")
    label: str | None = Field(None, description="A label.")


class Toy(BaseModel):
    """A made-up pipeline's parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Who runs it.")
    count: int = Field(1, ge=1, le=10, description="How many rounds.")
    ratio: float | None = Field(None, description="Share kept.")
    mode: Literal["fast", "slow"] = Field("fast", description="How to run.")
    tags: list[str] = Field(default_factory=lambda: ["a"], description="Labels to add.")
    verbose: bool = Field(False, description="Talk more.")
    check: bool = Field(True, description="Check the result.")
    inner: Inner = Field(default_factory=Inner)


def toy_app(seen: list[tuple[Toy, Mapping[str, Any]]]) -> typer.Typer:
    def run_toy(params: Toy, options: Mapping[str, Any]) -> None:
        """Run the toy pipeline."""
        seen.append((params, options))

    app = typer.Typer()
    params_command(app, "toy", Toy, run_toy, shortcuts={"--depth": "inner.depth"})
    return app


def test_a_new_params_model_gets_a_command_with_its_flags(tmp_path: Path) -> None:
    seen: list[tuple[Toy, Mapping[str, Any]]] = []
    app = toy_app(seen)
    cmd: Any = typer.main.get_command(app)
    assert isinstance(cmd, ParamsCommand)
    assert cmd.flag_paths() == {
        **{"--name": "name", "--count": "count", "--ratio": "ratio", "--mode": "mode"},
        **{"--tags": "tags", "--verbose": "verbose", "--check": "check"},
        "--depth": "inner.depth",
    }
    options = {p.opts[0]: p for p in cmd.params}
    assert options["--mode"].metavar == "[fast|slow]"
    assert options["--check"].secondary_opts == ["--no-check"]
    assert "Who runs it." in options["--name"].help and "Required" in options["--name"].help
    runner = CliRunner()
    help_ = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}, color=False)
    assert "Run the toy pipeline." in help_.output
    for text in ("How many rounds.", "[default: 1]", "How deep to go. (inner.depth)"):
        assert text in help_.output, text

    config = tmp_path / "toy.yaml"
    config.write_text("name: from-file\ncount: 3\ninner:\n  label: x\n")
    args = ["--config", str(config), "--count", "4", "--mode", "slow", "--tags", "b,c"]
    args += ["--no-check", "--verbose", "--depth", "5", "--set", "ratio=0.5"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    ((toy, options_seen),) = seen
    assert toy == Toy(
        name="from-file",
        count=4,
        ratio=0.5,
        mode="slow",
        tags=["b", "c"],
        verbose=True,
        check=False,
        inner=Inner(depth=5, label="x"),
    )
    assert options_seen == {}

    bad = runner.invoke(app, ["--name", "n", "--mode", "medium"])
    assert bad.exit_code == 1 and isinstance(bad.exception, ConfigError)
    assert str(bad.exception).startswith("invalid toy parameters: mode: Input should be 'fast'")
    unknown = runner.invoke(app, ["--name", "n", "--set", "inner.width=3"])
    assert isinstance(unknown.exception, ConfigError)
    assert str(unknown.exception) == (
        "invalid toy parameters: --set inner.width: no such parameter (inner has: depth, label)"
    )
    assert len(seen) == 1
