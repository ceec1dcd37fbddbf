"""Storage: chunk references, atomic writes, and what a crash leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mathmill.errors import StorageError
from mathmill.records import Problem
from mathmill.storage import RunStore
from mathmill.tasks.export import remove_stale_chunks


def problems(n: int, tag: str = "") -> list[Problem]:
    return [
        Problem(statement=f"Problem {tag}{i}: what is {i}+{i}?", answer=str(2 * i))
        for i in range(n)
    ]


def test_write_read_list_and_replace(store: RunStore) -> None:
    ds = store.dataset("problems")
    assert ds.keys() == []
    ref0 = ds.write_chunk("00000", problems(3, "a"))
    ref1 = ds.write_chunk("00001", problems(2, "b"))
    assert ds.keys() == ["00000", "00001"]
    assert [r.rows for r in ds.refs()] == [3, 2]
    assert ds.refs()[0].sha256 == ref0.sha256
    assert len(ds.read_all()) == 5
    assert store.datasets() == ["problems"]
    # Writing an existing key replaces it: a re-run never duplicates rows.
    ref0b = ds.write_chunk("00000", problems(4, "c"))
    assert ref0b.sha256 != ref0.sha256
    assert len(ds.read_all()) == 6
    assert ds.to_table().num_rows == 6
    # A stale reference is detected instead of silently reading other rows.
    with pytest.raises(StorageError, match="changed since it was referenced"):
        ds.read_chunk(ref0)
    assert [p.statement for p in ds.read_chunk(ref1)] == [p.statement for p in problems(2, "b")]


def test_chunk_path_is_on_the_store(store: RunStore) -> None:
    ref = store.dataset("p").write_chunk("k", problems(1))
    if store.is_local:
        assert Path(ref.path).is_file()
    else:
        assert ref.path.startswith("s3://")
        assert store.fs.exists(ref.path)


def test_bad_keys_and_empty_chunks_are_refused(store: RunStore) -> None:
    with pytest.raises(StorageError, match="invalid chunk key"):
        store.dataset("p").write_chunk("../escape", problems(1))
    with pytest.raises(StorageError, match="invalid dataset name"):
        store.dataset(".hidden")
    with pytest.raises(StorageError, match="empty chunk"):
        store.dataset("p").write_chunk("k", [])
    with pytest.raises(StorageError, match="not found"):
        store.dataset("p").read_chunk("missing")


def test_corrupt_file_under_a_chunk_name_is_a_clear_error(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path))
    ds = store.dataset("p")
    ds.write_chunk("00000", problems(2))
    (tmp_path / "p" / "00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StorageError, match=r"chunk '00001' is not valid Parquet"):
        ds.read_all()


def test_text_artifacts(store: RunStore) -> None:
    url = store.write_bytes("reports/usage.md", b"# usage\n")
    assert url.endswith("reports/usage.md")
    assert store.read_bytes("reports/usage.md") == b"# usage\n"
    with pytest.raises(StorageError, match="no file"):
        store.read_bytes("reports/missing.md")


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from mathmill.records import Problem
    from mathmill.storage import RunStore

    real_fsync = os.fsync
    def slow_fsync(fd):
        # The bytes are in the temporary file; stall before the rename.
        print("WRITING", flush=True)
        time.sleep(60)
    store = RunStore(sys.argv[1])
    ds = store.dataset("problems")
    ds.write_chunk("00000", [Problem(statement="kept")])
    os.fsync = slow_fsync
    rows = [Problem(statement=f"row {i} " + "x" * 200) for i in range(5000)]
    ds.write_chunk("00001", rows)
    """
)


@pytest.mark.slow
def test_write_killed_halfway_is_not_read_as_a_chunk(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "WRITING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    leftovers = [p.name for p in (tmp_path / "problems").iterdir()]
    assert any(name.startswith(".tmp-") for name in leftovers), leftovers  # killed mid-write
    ds = RunStore(str(tmp_path)).dataset("problems")
    assert ds.keys() == ["00000"]
    assert [p.statement for p in ds.read_all()] == ["kept"]
    # The re-run completes the chunk and the temporary is never listed.
    ds.write_chunk("00001", problems(3))
    assert ds.keys() == ["00000", "00001"]
    assert len(ds.read_all()) == 4
    # The run's finish removes the killed write's temporary once it is old (a write in
    # progress elsewhere, younger, is left alone).
    fresh = tmp_path / "problems" / ".tmp-fresh-00002.parquet"
    fresh.write_bytes(b"in progress")
    assert remove_stale_chunks(RunStore(str(tmp_path)), ["problems"], ds.refs()) == 0
    assert fresh.exists() and any(
        p.name.startswith(".tmp-") for p in (tmp_path / "problems").iterdir()
    )
    hour_ago = time.time() - 3600
    for p in (tmp_path / "problems").iterdir():
        if p.name.startswith(".tmp-") and p != fresh:
            os.utime(p, (hour_ago, hour_ago))
    remove_stale_chunks(RunStore(str(tmp_path)), ["problems"], ds.refs())
    assert sorted(p.name for p in (tmp_path / "problems").iterdir()) == [
        ".tmp-fresh-00002.parquet",
        "00000.parquet",
        "00001.parquet",
    ]


def test_unfinished_s3_upload_is_not_a_chunk(s3_store: RunStore) -> None:
    """A crash during a multipart upload leaves an incomplete upload, never an object."""
    ds = s3_store.dataset("problems")
    ds.write_chunk("00000", problems(1))
    s3 = s3_store.fs
    bucket, _, prefix = s3_store.root.partition("/")
    client_kwargs = {"endpoint_url": s3_store.config.endpoint_url}
    import boto3

    client = boto3.client(
        "s3",
        aws_access_key_id=s3_store.config.key.get_secret_value(),  # type: ignore[union-attr]
        aws_secret_access_key=s3_store.config.secret.get_secret_value(),  # type: ignore[union-attr]
        region_name="us-east-1",
        **client_kwargs,
    )
    key = f"{prefix}/problems/00001.parquet"
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    s3.invalidate_cache()
    assert ds.keys() == ["00000"]
    assert len(ds.read_all()) == 1


@pytest.mark.slow
def test_storage_survives_a_fresh_process(tmp_path: Path) -> None:
    """What one process wrote, another reads (as a resumed run does), and exits cleanly.

    Regression: reading with pq.read_table() on an in-memory buffer made about one
    process in three abort at exit (pyarrow 26.0.1, "terminate called without an
    active exception"), so several processes are run.
    """
    RunStore(str(tmp_path)).dataset("p").write_chunk("00000", problems(2))
    for _ in range(8):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from mathmill.storage import RunStore;"
                "print(len(RunStore(sys.argv[1]).dataset('p').read_all()))",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "2"


def test_open_write_is_all_or_nothing(store: RunStore) -> None:
    with store.open_write("a.jsonl") as a, store.open_write("b.jsonl") as b:
        for i in range(3):
            a.write(b"%d\n" % i)
            b.write(b"x" * 7_000_000)  # past S3's 5 MiB part size: a real multipart upload
    assert store.read_bytes("a.jsonl") == b"0\n1\n2\n"
    assert len(store.read_bytes("b.jsonl")) == 21_000_000

    def write_then_fail() -> None:
        with store.open_write("c.jsonl") as c:
            c.write(b"y" * 7_000_000)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_then_fail()
    assert not store.exists("c.jsonl")  # nothing half-written is visible
    if store.is_local:
        assert sorted(os.listdir(store.root)) == ["a.jsonl", "b.jsonl"]  # no temporary left
