"""``mathmill export``: real runs of synthesize, curate and tir (a real Prefect server, a
fake OpenAI server, the real sandbox) exported as TRL messages, verl Parquet, ShareGPT
and a DatasetDict, each read back with its consumer's loader: TRL's SFTTrainer and
data utilities on the bundled SmolLM2 tokenizer, pyarrow and ``datasets`` for verl,
``load_from_disk`` for the DatasetDict.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mathmill.errors import ConfigError
from mathmill.export.formats import ExportOptions, ExportResult, write_export
from mathmill.export.rows import RunRows, detect_pipeline, read_run
from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.records import CuratedRow, SolutionRow
from mathmill.storage import RunStore

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def export(run: Path, fmt: str, out: Path, **options: Any) -> tuple[RunRows, ExportResult]:
    rows = read_run(str(run))
    return rows, write_export(rows, ExportOptions(format=fmt, out=str(out), **options))  # type: ignore[arg-type]


def tokenizer_dir() -> Path:
    """The bundled SmolLM2's converted folder (tokenizer, chat template, weights)."""
    from mathmill.llm.vllm_model import local_vllm_model

    try:
        path = local_vllm_model()
    except Exception as e:  # no transformers, no GGUF: nothing to convert offline
        pytest.skip(f"the bundled SmolLM2 cannot be converted here: {e}")
    return path


# --- no flow -------------------------------------------------------------------------


def test_the_pipeline_is_read_from_the_manifest() -> None:
    def kind(*names: str, **params: Any) -> str:
        return detect_pipeline({"chunks": {n: [] for n in names}, "params": params})

    assert kind("topics", "problems", "cots", "verified", "unverified") == "synthesize"
    assert kind("problems", "curated", "train", "validation", "test") == "curate"
    assert kind("problems", "trajectories") == "tir"
    assert kind("problems", "samples", top_p=1.0) == "sample"
    assert kind("problems", "samples") == "evaluate"
    assert kind("problems", "samples", "merged", "critiques") == "critique"
    with pytest.raises(ConfigError, match="cannot tell"):
        kind("problems")


def test_an_incomplete_run_or_a_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no manifest\.json"):
        read_run(str(tmp_path))
    store = RunStore(str(tmp_path))
    row = SolutionRow(
        id="a1",
        problem_id="p1",
        problem="What is 2+2?",
        cot_type="long_cot",
        solution="2+2 = \\boxed{4}",
        final_answer="4",
        status="verified",
        rounds=0,
        lineage=["a1"],
    )
    ref = store.dataset("verified").write_chunk("00000", [row])
    manifest = {"status": "INCOMPLETE (1 chunks failed)", "params": {}, "chunks": {}}
    manifest["chunks"] = {"verified": [ref.model_dump(mode="json")]}
    store.write_bytes("manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ConfigError, match="allow-incomplete"):
        read_run(str(tmp_path))
    rows = read_run(str(tmp_path), allow_incomplete=True)
    assert (rows.pipeline, rows.read, [e.answer for e in rows.examples]) == ("synthesize", 1, ["4"])
    with pytest.raises(ConfigError, match="no train/validation/test"):
        write_export(
            rows, ExportOptions(format="trl", out=str(tmp_path / "x"), split_from_run=True)
        )


# --- real runs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_run(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mathmill.flows.synthesize import synthesize
    from tests.synth_world import SynthWorld
    from tests.test_synthesize import world_config

    out = tmp_path_factory.mktemp("export-synth") / "run"
    world = SynthWorld(kinds=("ok", "fix", "stuck"))
    with FakeOpenAIServer(world) as fake:
        cfg = world_config(fake.base_url, str(out), topics=3, problems_per_topic=1)
        asyncio.run(synthesize(params=cfg))
    return out


@pytest.fixture(scope="module")
def curate_run(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mathmill.flows.curate import curate
    from tests.curate_world import CurateWorld, planted_input, write_jsonl
    from tests.test_curate import config

    planted = planted_input()
    tmp = tmp_path_factory.mktemp("export-curate")
    data = write_jsonl(tmp / "in.jsonl", planted.rows)
    with FakeOpenAIServer(CurateWorld(planted.kinds)) as fake:
        asyncio.run(curate(params=config(fake.base_url, data, tmp / "run")))
    return tmp / "run"


@pytest.fixture(scope="module")
def tir_run(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mathmill.flows.tir import tir
    from tests.test_tir import handler, params

    tmp = tmp_path_factory.mktemp("export-tir")
    with FakeOpenAIServer(handler) as fake:
        asyncio.run(tir(params=params(fake.base_url, tmp)))
    return tmp / "run"


@pytest.fixture(scope="module")
def smollm() -> Path:
    return tokenizer_dir()


@pytest.mark.slow
def test_synthesize_to_trl_is_accepted_by_sft_trainer(
    synth_run: Path, smollm: Path, tmp_path: Path
) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    verified = RunStore(str(synth_run)).dataset("verified").read_all(SolutionRow)
    rows, result = export(synth_run, "trl", tmp_path / "trl")
    assert rows.pipeline == "synthesize" and len(rows.examples) == len(verified) > 0
    assert rows.skipped["unverified"] == rows.read - len(verified) > 0
    assert result.rows == {"train": len(verified)}
    written = jsonl(tmp_path / "trl" / "train.jsonl")
    by_id = {r.id: r for r in verified}
    for row in written:
        source = by_id[row["id"]]
        assert row["messages"] == [
            {"role": "user", "content": source.problem},
            {"role": "assistant", "content": source.solution},
        ]
        assert row["metadata"]["final_answer"] == source.final_answer
    sidecar = json.loads((tmp_path / "trl" / "export.json").read_text())
    assert sidecar["source"] == str(synth_run) and sidecar["format"] == "trl"
    assert sidecar["counts"]["exported"] == len(verified)
    assert sidecar["filters"] == ["dataset verified", "status == verified"]

    ds = datasets.load_dataset("json", data_files=str(tmp_path / "trl" / "train.jsonl"))["train"]
    assert is_conversational(ds[0])
    tokenizer = AutoTokenizer.from_pretrained(smollm, local_files_only=True)
    text = maybe_apply_chat_template(ds[0], tokenizer)["text"]
    assert "<|im_start|>assistant\n" + written[0]["messages"][1]["content"] in text
    # TRL's own preparation: ChatML check, chat template, tokenization, labels
    model = AutoModelForCausalLM.from_pretrained(smollm, local_files_only=True)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=256,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    prepared = trainer.train_dataset
    assert "input_ids" in prepared.column_names and len(prepared) == len(written)
    ids = prepared[0]["input_ids"]
    assert tokenizer.decode(ids).startswith("<|im_start|>system")
    trainer.train()  # one step on CPU: the rows go through the collator and the model


@pytest.mark.slow
def test_synthesize_to_verl_parquet_loads_with_pyarrow_and_datasets(
    synth_run: Path, tmp_path: Path
) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    verified = RunStore(str(synth_run)).dataset("verified").read_all(SolutionRow)
    export(synth_run, "verl", tmp_path / "verl", data_source="lighteval/MATH")
    path = tmp_path / "verl" / "train.parquet"
    table = pq.read_table(path)
    assert table.num_rows == len(verified)
    schema = table.schema
    assert set(schema.names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert schema.field("data_source").type == pa.string()
    assert schema.field("ability").type == pa.string()
    prompt = schema.field("prompt").type
    assert pa.types.is_list(prompt) and {f.name for f in prompt.value_type} == {"role", "content"}
    reward = schema.field("reward_model").type
    assert pa.types.is_struct(reward) and {f.name for f in reward} == {"ground_truth", "style"}
    extra = schema.field("extra_info").type
    assert {"index", "split", "id", "question", "solution"} <= {f.name for f in extra}
    assert extra.field("index").type == pa.int64()
    ds = datasets.load_dataset("parquet", data_files={"train": str(path)})["train"]
    answers = {r.id: r.final_answer for r in verified}
    for i, row in enumerate(ds):
        assert row["ability"] == "math" and row["data_source"] == "lighteval/MATH"
        assert row["prompt"][0]["role"] == "user"
        assert row["prompt"][0]["content"].endswith("within \\boxed{}.")
        assert row["reward_model"] == {
            "ground_truth": answers[row["extra_info"]["id"]],
            "style": "rule",
        }
        assert row["extra_info"]["index"] == i and row["extra_info"]["split"] == "train"


@pytest.mark.slow
def test_synthesize_to_sharegpt_and_the_command(synth_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharegpt"
    args = ["export", str(synth_run), "--format", "sharegpt", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "mathmill", *args, "--system", "Solve it."],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "synthesize" in done.stdout and str(out) in done.stdout
    rows = jsonl(out / "train.jsonl")
    assert json.loads((out / "train.json").read_text()) == rows
    assert rows and all(
        [c["from"] for c in r["conversations"]] == ["system", "human", "gpt"] for r in rows
    )
    assert rows[0]["conversations"][0]["value"] == "Solve it."
    # the default output directory is inside the run; a bad format is one line
    bad = subprocess.run(
        [sys.executable, "-m", "mathmill", "export", str(synth_run), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: --format")


@pytest.mark.slow
def test_curate_splits_as_dataset_dict_and_verl(curate_run: Path, tmp_path: Path) -> None:
    import datasets
    import pyarrow.parquet as pq

    store = RunStore(str(curate_run))
    splits = {s: store.dataset(s).read_all(CuratedRow) for s in ("train", "validation", "test")}
    assert all(splits.values())
    rows, result = export(curate_run, "hf", tmp_path / "hf")
    assert rows.pipeline == "curate" and rows.splits == ["train", "validation", "test"]
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert isinstance(ds, datasets.DatasetDict) and list(ds) == ["train", "validation", "test"]
    for name, part in ds.items():
        assert sorted(part["id"]) == sorted(r.id for r in splits[name])
        assert set(part["split"]) == {name}
    row = ds["train"][0]
    source = next(r for r in splits["train"] if r.id == row["id"])
    assert row["answer"] == source.answer and row["problem"] == source.problem
    assert row["messages"][0] == {"role": "user", "content": source.problem}
    assert source.code.strip() in row["messages"][1]["content"]
    assert f"\\boxed{{{source.answer}}}" in row["messages"][1]["content"]
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["counts"]["splits"] == {
        k: len(v) for k, v in splits.items()
    }
    # one train split on request
    export(curate_run, "hf", tmp_path / "one", split_from_run=False)
    one = datasets.load_from_disk(str(tmp_path / "one"))
    assert list(one) == ["train"] and len(one["train"]) == sum(map(len, splits.values()))
    # verl: a file per split, the split in extra_info, the reference answer as ground truth
    _, result = export(curate_run, "verl", tmp_path / "verl", split_from_run=True)
    assert set(result.files) == {
        "train.parquet",
        "validation.parquet",
        "test.parquet",
        "export.json",
    }
    test = pq.read_table(tmp_path / "verl" / "test.parquet").to_pylist()
    answers = {r.id: r.answer for r in splits["test"]}
    assert {r["extra_info"]["id"]: r["reward_model"]["ground_truth"] for r in test} == answers
    assert {r["extra_info"]["split"] for r in test} == {"test"}


@pytest.mark.slow
def test_tir_trajectories_as_trl_tool_calls(tir_run: Path, smollm: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template

    rows, _ = export(tir_run, "trl", tmp_path / "trl")
    assert rows.pipeline == "tir"
    assert rows.skipped and set(rows.skipped) <= {
        "verdict incorrect",
        "verdict failed",
        "verdict unvalidated",
    }
    written = {r["id"]: r for r in jsonl(tmp_path / "trl" / "train.jsonl")}
    finished = {r["id"] for r in jsonl(tir_run / "sharegpt.jsonl")}
    correct = {
        r["id"] for r in jsonl(tir_run / "sharegpt.jsonl") if r["metadata"]["verdict"] == "correct"
    }
    assert set(written) == correct and correct < finished
    row = written["t0"]
    assert [m["role"] for m in row["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    call = row["messages"][2]
    assert call["content"] == "Eggs left, times two."
    assert call["tool_calls"] == [
        {
            "type": "function",
            "function": {
                "name": "python",
                "arguments": {"code": "left = 16 - 3 - 4\nprint(left * 2)"},
            },
        }
    ]
    assert (
        row["messages"][3]["name"] == "python"
        and "<repl>\n18\n</repl>" in row["messages"][3]["content"]
    )
    assert json.loads(row["tools"])[0]["function"]["name"] == "python"
    # the bundled SmolLM2's template drops tool calls: refused, with what to do instead
    with pytest.raises(ConfigError, match="--tool-style tags"):
        export(tir_run, "trl", tmp_path / "x", chat_template=str(smollm))
    export(tir_run, "trl", tmp_path / "tags", chat_template=str(smollm), tool_style="tags")
    text = jsonl(tmp_path / "tags" / "train.jsonl")[0]["text"]
    assert "<python>" in text and "<|im_start|>tool\n<repl>" in text
    # a template that renders tool calls (TRL's bundled Qwen2.5 one, on SmolLM2's tokenizer)
    import trl

    qwen = tmp_path / "qwen-template"
    shutil.copytree(smollm, qwen, ignore=shutil.ignore_patterns("*.safetensors"))
    template = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
    shutil.copy(template, qwen / "chat_template.jinja")
    tokenizer = AutoTokenizer.from_pretrained(qwen, local_files_only=True)
    example = {"messages": row["messages"]}
    rendered = apply_chat_template(example, tokenizer, tools=json.loads(row["tools"]))["text"]
    assert '"code": "left = 16 - 3 - 4\\nprint(left * 2)"' in rendered
    assert "<tool_response>\n<repl>\n18" in rendered
    export(tir_run, "trl", tmp_path / "qwen", chat_template=str(qwen))
    texts = {r["id"]: r["text"] for r in jsonl(tmp_path / "qwen" / "train.jsonl")}
    assert texts["t0"] == rendered
    # ShareGPT keeps tir's own form (the same rows as its sharegpt.jsonl, correct ones only)
    export(tir_run, "sharegpt", tmp_path / "sharegpt")
    ours = {r["id"]: r for r in jsonl(tmp_path / "sharegpt" / "train.jsonl")}
    theirs = {r["id"]: r for r in jsonl(tir_run / "sharegpt.jsonl") if r["id"] in correct}
    assert ours == theirs
