"""The bad-input table, through the CLI as a user meets it (`mathmill run sample` on a
fake endpoint and a real Prefect server): every bad input ends as a one-line error
naming the file, row or field, or as dropped rows with their reasons while the good
rows are kept; never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mathmill.llm.fake_server import FakeOpenAIServer, Reply

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def parquet(columns: dict[str, list[object]]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)

    return write


OK = {"problem": "What is 1?", "answer": "1"}
# name -> (file contents, or a writer), rows kept, what the dropped reasons must say
ROWS: dict[str, tuple[bytes | Callable[[Path], None], int, list[str]]] = {
    "non_utf8.jsonl": (jsonl(OK) + b'{"problem": "caf\xe9 \xff"}\n', 1, ["not UTF-8"]),
    "truncated_last_line.jsonl": (jsonl(OK) + b'{"problem": "b", "ans', 1, ["not JSON"]),
    "row_of_100mb.jsonl": (jsonl({"problem": "x" * 100 * 2**20}, OK), 1, ["over the limit"]),
    "wrong_types.jsonl": (
        jsonl({"problem": 42}, {"problem": ["a"]}, [1, 2], {"problem": "b", "answer": {}}, OK),
        1,
        ["'problem' must be text, not int", "not list", "not an object", "'answer' must be"],
    ),
    "missing_fields.jsonl": (jsonl({"question": "a"}, {"problem": "   "}, OK), 1, ["no 'problem'"]),
    "duplicates.jsonl": (jsonl({**OK, "id": "1"}, {**OK, "id": "2"}), 1, ["duplicate"]),
    "nan_and_empty_answers.jsonl": (
        b'{"problem": "a", "answer": NaN}\n{"problem": "b", "answer": ""}\n'
        b'{"problem": "c", "answer": Infinity}\n' + jsonl(OK),
        4,
        [],
    ),
    "latex_bombs.jsonl": (
        jsonl(
            {"problem": "p1", "answer": "\\frac{" * 5000 + "1" + "}" * 5000},
            {"problem": "p2", "answer": "{" * 100_000},
            {"problem": "p3", "answer": "10^{10^{10^{10^{10}}}}"},
        ),
        3,
        [],
    ),
    "wrong_types.parquet": (parquet({"problem": ["a", None], "answer": [1.5, 2.0]}), 1, []),
    "missing_column.parquet": (parquet({"question": ["a"]}), 0, ["no 'problem'"]),
    "nan_answers.parquet": (parquet({"problem": ["a", "b"], "answer": [math.nan, 2.0]}), 2, []),
}
# name -> (file contents, what the one-line error must say)
ERRORS: dict[str, tuple[bytes | Callable[[Path], None] | None, str]] = {
    "empty.jsonl": (b"", "no problems"),
    "only_bad_rows.jsonl": (b"{nope\n", "no problems"),
    "empty.parquet": (b"", "not valid Parquet"),
    "truncated.parquet": (b"PAR1\x00\x00garbage", "not valid Parquet"),
    "missing.jsonl": (None, "does not exist"),
}


def write_input(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif callable(content):
        content(path)
    return path


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mathmill", "run", "sample", "--samples", "1", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def endpoint() -> object:
    with FakeOpenAIServer(lambda _r: Reply("so \\boxed{1}")) as fake:
        yield fake


@pytest.fixture
def env(prefect_api: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **prefect_api}


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(ROWS))
def test_bad_rows_are_dropped_with_their_reason(
    name: str, endpoint: FakeOpenAIServer, env: dict[str, str], tmp_path: Path
) -> None:
    content, kept, reasons = ROWS[name]
    path = write_input(tmp_path, name, content)
    out = tmp_path / "run"
    args = ["--input", str(path), "--out", str(out), "--base-url", endpoint.base_url]
    proc = run_cli([*args, "--model", "m"], env)
    no_traceback(proc)
    if kept == 0:
        assert proc.returncode != 0 and "no problems" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == kept
    assert all(s["status"] for s in samples)  # graded, or why not
    dropped = (out / "dropped.jsonl").read_text() if (out / "dropped.jsonl").exists() else ""
    for reason in reasons:
        assert reason in dropped, (reason, dropped[:2000])
    assert len(dropped.encode()) < 200_000  # a 100 MB row is not copied into the reasons


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_unreadable_inputs_are_one_line_errors(
    name: str, endpoint: FakeOpenAIServer, env: dict[str, str], tmp_path: Path
) -> None:
    content, message = ERRORS[name]
    path = write_input(tmp_path, name, content)
    args = ["--input", str(path), "--out", str(tmp_path / "run"), "--base-url", endpoint.base_url]
    proc = run_cli([*args, "--model", "m"], env)
    no_traceback(proc)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and name in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        ("samples: [1, 2\n", [], "does not parse"),
        ("samplez: 3\n", [], "samplez"),
        ("model: {block: no-such-block}\n", [], "no-such-block"),
        ("", ["--temperature", "9"], "temperature"),
        ("", ["--input", "hf:no-such/dataset"], "hf:no-such/dataset"),
    ],
)
def test_bad_settings_are_one_line_errors(
    config: str, flags: list[str], message: str, env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "in.jsonl").write_bytes(jsonl(OK))
    (tmp_path / "config.yaml").write_text(config)
    args = ["--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "run")]
    if config:
        args += ["--config", str(tmp_path / "config.yaml")]
    else:
        args += ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    proc = run_cli([*args, *flags], {**env, "HF_HUB_OFFLINE": "1"})
    no_traceback(proc)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
