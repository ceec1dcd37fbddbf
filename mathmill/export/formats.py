"""The training formats: row builders and writers.

* ``trl``: ``{id, messages, metadata}`` JSONL per split (``tools`` too for tir's tool
  calls), or ``{id, text, metadata}`` with a tokenizer's chat template applied;
* ``verl``: RL Parquet per split (``data_source``, ``prompt`` as a role list,
  ``ability``, ``reward_model {ground_truth, style: rule}``, ``extra_info``), written by
  :func:`write_parquet`, the one Parquet writer of every verl export (critique's too);
* ``sharegpt``: ``{id, conversations: [{from, value}], metadata}`` as JSON and JSONL;
* ``hf``: a ``datasets`` DatasetDict saved to disk (the TRL columns plus ``problem``,
  ``answer``, ``data_source``), optionally pushed to the Hub.

Every export writes ``export.json`` beside its files: the source run, the counts, the
format, the filters and options.

>>> turns = [{"role": "user", "content": "2+2?"},
...          {"role": "assistant", "content": "Add.\\n<python>\\nprint(2 + 2)\\n</python>"},
...          {"role": "tool", "content": "<repl>\\n4\\n</repl>"},
...          {"role": "assistant", "content": "<final_answer>\\\\boxed{4}</final_answer>"}]
>>> calls = tool_call_turns(turns)
>>> calls[1]["content"], calls[1]["tool_calls"][0]["function"]
('Add.', {'name': 'python', 'arguments': {'code': 'print(2 + 2)'}})
>>> calls[2]["role"], calls[2]["name"]
('tool', 'python')
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from mathmill.errors import ConfigError
from mathmill.export.rows import SPLITS, Example, RunRows
from mathmill.storage import RunStore

__all__ = [
    "DEFAULT_INSTRUCTION",
    "FORMATS",
    "PYTHON_TOOL",
    "ChatTemplate",
    "ExportOptions",
    "ExportResult",
    "messages",
    "sharegpt_row",
    "tool_call_turns",
    "trl_row",
    "verl_row",
    "write_export",
    "write_parquet",
]

Format = Literal["trl", "verl", "sharegpt", "hf"]
ToolStyle = Literal["calls", "tags"]
FORMATS: tuple[str, ...] = ("trl", "verl", "sharegpt", "hf")
DEFAULT_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
"""Appended to the verl prompt (verl's own math examples do the same)."""

PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code in a stateful REPL (variables persist between calls). "
        "Returns <repl> (stdout and stderr) and <state> (imports, variables, functions).",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
        },
    },
}
"""The tool of tir's trajectories, as a JSON schema (TRL's ``tools`` column)."""

_PYTHON = re.compile(r"<python>(.*?)(?:</python>|\Z)", re.DOTALL)
_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


@dataclass
class ExportOptions:
    """How to export; see ``mathmill export --help``."""

    format: Format
    out: str | None = None
    chat_template: str | None = None
    split_from_run: bool | None = None
    """True: the run's splits (an error when it has none); False: one ``train``
    split; None: the run's splits when it has them."""
    system: str | None = None
    tool_style: ToolStyle = "calls"
    data_source: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    push_to_hub: str | None = None
    hub_token_env: str = "HF_TOKEN"
    private: bool = True


@dataclass
class ExportResult:
    """What was written: the output directory, files, and rows per split."""

    out: str
    files: dict[str, str]
    rows: dict[str, int]
    skipped: Counter[str] = field(default_factory=Counter)
    sidecar: dict[str, Any] = field(default_factory=dict)


def tool_call_turns(turns: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """tir's Pythonformer turns as TRL's tool calls: an assistant turn whose
    ``<python>`` block a tool turn answers becomes ``{"role": "assistant", "content":
    <its text>, "tool_calls": [{"type": "function", "function": {"name": "python",
    "arguments": {"code": ...}}}]}``; the tool turn ``{"role": "tool", "name": "python",
    "content": ...}``. Other turns are kept as they are.
    """
    out: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        answered = i + 1 < len(turns) and turns[i + 1]["role"] == "tool"
        m = _PYTHON.search(turn["content"]) if turn["role"] == "assistant" and answered else None
        if m is not None:
            text = (turn["content"][: m.start()] + turn["content"][m.end() :]).strip()
            code = m.group(1).strip("\n")
            call = {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}
            out.append({"role": "assistant", "content": text, "tool_calls": [call]})
        elif turn["role"] == "tool":
            out.append({"role": "tool", "name": "python", "content": turn["content"]})
        else:
            out.append({"role": turn["role"], "content": turn["content"]})
    return out


def messages(
    ex: Example, *, system: str | None = None, tool_style: ToolStyle = "tags"
) -> list[dict[str, Any]]:
    """An example's chat messages: ``system`` (when given) replaces the run's own system
    turn; ``tool_style="calls"`` turns tool turns into TRL tool calls.
    """
    turns = ex.turns
    if system is not None:
        turns = [t for t in turns if t["role"] != "system"]
        if system:
            turns = [{"role": "system", "content": system}, *turns]
    has_tools = any(t["role"] == "tool" for t in turns)
    if tool_style == "calls" and has_tools:
        return tool_call_turns(turns)
    return [dict(t) for t in turns]


def _uses_tools(msgs: Sequence[dict[str, Any]]) -> bool:
    return any("tool_calls" in m for m in msgs)


def trl_row(
    ex: Example,
    *,
    system: str | None = None,
    tool_style: ToolStyle = "calls",
    template: ChatTemplate | None = None,
) -> dict[str, Any]:
    """One TRL SFT row: ``{"id", "messages", "metadata"}`` (``"tools"``: the python
    tool's schema as a JSON string, when the messages call it), or with a chat template
    ``{"id", "text", "metadata"}``.
    """
    msgs = messages(ex, system=system, tool_style=tool_style)
    tools = [PYTHON_TOOL] if _uses_tools(msgs) else None
    if template is not None:
        return {"id": ex.id, "text": template.render(msgs, tools), "metadata": ex.metadata}
    row: dict[str, Any] = {"id": ex.id, "messages": msgs}
    if tools:
        row["tools"] = json.dumps(tools)
    row["metadata"] = ex.metadata
    return row


def sharegpt_row(ex: Example, *, system: str | None = None) -> dict[str, Any]:
    """One ShareGPT row: ``{"id", "conversations": [{"from", "value"}], "metadata"}``,
    ``from`` in system / human / gpt / tool (tir's tool output, as its ShareGPT export).
    """
    conv = [
        {"from": _SHAREGPT[t["role"]], "value": t["content"]}
        for t in messages(ex, system=system, tool_style="tags")
    ]
    return {"id": ex.id, "conversations": conv, "metadata": ex.metadata}


def verl_row(
    ex: Example,
    index: int,
    split: str,
    *,
    system: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    data_source: str | None = None,
    pipeline: str = "",
) -> dict[str, Any]:
    """One verl RL row: ``data_source``, ``prompt`` (``[system?, user]``: the problem and
    the instruction), ``ability: "math"``, ``reward_model {ground_truth, style: "rule"}``,
    ``extra_info {index, split, id, pipeline, question, solution}``. An example with its
    own verl row (critique) keeps it, with this index and split.
    """
    if ex.verl is not None:
        row = dict(ex.verl)
        row["extra_info"] = {**row["extra_info"], "index": index, "split": split}
        if data_source:
            row["data_source"] = data_source
        return row
    content = f"{ex.problem}\n\n{instruction}" if instruction else ex.problem
    prompt = [{"role": "user", "content": content}]
    if system:
        prompt.insert(0, {"role": "system", "content": system})
    solution = next((t["content"] for t in reversed(ex.turns) if t["role"] == "assistant"), "")
    return {
        "data_source": data_source or ex.data_source,
        "prompt": prompt,
        "ability": "math",
        "reward_model": {"ground_truth": ex.answer or "", "style": "rule"},
        "extra_info": {
            "index": index,
            "split": split,
            "id": ex.id,
            "pipeline": pipeline,
            "question": ex.problem,
            "solution": solution,
        },
    }


class ChatTemplate:
    """A tokenizer's chat template, from a local folder (never downloaded)."""

    def __init__(self, directory: str) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ConfigError("--chat-template needs transformers: pip install transformers") from e
        if not Path(directory).is_dir():
            raise ConfigError(f"--chat-template: no tokenizer folder {directory}")
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--chat-template: cannot load a tokenizer from {directory}: {e}"
            ) from e
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"--chat-template: the tokenizer in {directory} has no chat template")
        self.directory = directory
        self._tools_checked = False

    def render(self, msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        """The conversation as the template writes it (no generation prompt)."""
        if tools and not self._tools_checked:
            self.check_tool_calls()
        text: str = self.tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False)
        return text

    def check_tool_calls(self) -> None:
        """Refuse a template that would drop the tool calls' code or the tool output."""
        code, output = "print(7 * 191)", "tool_output_5b1e"
        msgs = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [_call(code)]},
            {"role": "tool", "name": "python", "content": output},
        ]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tools=[PYTHON_TOOL], tokenize=False)
        except Exception as e:  # jinja2's TemplateError and the template's own raise_exception
            text = f"error: {e}"
        if "7 * 191" not in text or output not in text:
            raise ConfigError(
                f"the chat template in {self.directory} drops tool calls or tool output; "
                "use --tool-style tags (the code stays in the assistant's text) or a "
                "template that renders tool calls"
            )
        self._tools_checked = True


def _call(code: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)


def write_parquet(store: RunStore, relpath: str, rows: Sequence[dict[str, Any]]) -> str:
    """Rows as one Parquet file written by ``datasets`` (the types verl's and TRL's
    loaders expect: lists of structs for role lists, structs for nested dicts), under
    ``store`` (local or object storage); its path or URL.
    """
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        datasets.Dataset.from_list(list(rows)).to_parquet(str(path))
        return store.write_bytes(relpath, path.read_bytes())


def _dataset_dict(splits: dict[str, list[dict[str, Any]]]) -> Any:
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def save_dataset_dict(store: RunStore, splits: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """A DatasetDict saved with ``save_to_disk`` at the root of ``store`` (written
    locally, then copied file by file: local or object storage); the files written.
    """
    data = _dataset_dict(splits)
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data.save_to_disk(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                rel = path.relative_to(tmp).as_posix()
                files[rel] = store.write_bytes(rel, path.read_bytes())
    return files


def push_dataset_dict(
    splits: dict[str, list[dict[str, Any]]], repo: str, token_env: str, *, private: bool
) -> str:
    """Push the DatasetDict to the Hub as ``repo``; the token is read from the
    environment variable ``token_env`` (never passed on a command line, never logged).
    """
    token = os.environ.get(token_env)
    if not token:
        raise ConfigError(f"--push-to-hub: set the environment variable {token_env} to a token")
    _dataset_dict(splits).push_to_hub(repo, token=token, private=private)
    return f"https://huggingface.co/datasets/{repo}"


def _group(rows: RunRows, opts: ExportOptions) -> dict[str, list[Example]]:
    """Examples by output split: the run's own (curate's) or one ``train``."""
    if opts.split_from_run and not rows.splits:
        raise ConfigError(
            f"--split-from-run: this {rows.pipeline} run has no train/validation/test splits"
        )
    use = bool(rows.splits) and opts.split_from_run is not False
    groups: dict[str, list[Example]] = {}
    for ex in rows.examples:
        groups.setdefault(ex.split if use else "train", []).append(ex)
    order = [s for s in SPLITS if s in groups] + sorted(set(groups) - set(SPLITS))
    return {s: groups[s] for s in order}


def write_export(rows: RunRows, opts: ExportOptions) -> ExportResult:
    """Write ``rows`` in ``opts.format`` under ``opts.out`` (default
    ``<run>/export/<format>``) with its ``export.json``.
    """
    if opts.format not in FORMATS:
        raise ConfigError(f"--format: one of {', '.join(FORMATS)}, not {opts.format!r}")
    if opts.chat_template and opts.format not in ("trl", "hf"):
        raise ConfigError("--chat-template applies to --format trl and hf")
    if opts.push_to_hub and opts.format != "hf":
        raise ConfigError("--push-to-hub applies to --format hf")
    out_url = opts.out or f"{rows.source}/export/{opts.format}"
    store = RunStore(out_url)
    template = ChatTemplate(opts.chat_template) if opts.chat_template else None
    skipped: Counter[str] = Counter()
    tables: dict[str, list[dict[str, Any]]] = {}
    for split, group in _group(rows, opts).items():
        built: list[dict[str, Any]] = []
        for ex in group:
            if opts.format == "verl":
                if ex.verl is None and not ex.answer:
                    skipped["no ground truth"] += 1
                    continue
                built.append(
                    verl_row(
                        ex,
                        len(built),
                        split,
                        system=opts.system,
                        instruction=opts.instruction,
                        data_source=opts.data_source,
                        pipeline=rows.pipeline,
                    )
                )
                continue
            if not ex.sft:
                skipped["no solution to train on (no teacher critique)"] += 1
                continue
            if opts.format == "sharegpt":
                built.append(sharegpt_row(ex, system=opts.system))
                continue
            row = trl_row(ex, system=opts.system, tool_style=opts.tool_style, template=template)
            if opts.format == "hf":
                row |= {"problem": ex.problem, "answer": ex.answer or "", "split": split}
                row["data_source"] = opts.data_source or ex.data_source
            built.append(row)
        if built:
            tables[split] = built
    files: dict[str, str] = {}
    if opts.format == "trl":
        for split, table in tables.items():
            files[f"{split}.jsonl"] = store.write_bytes(f"{split}.jsonl", _jsonl(table))
    elif opts.format == "sharegpt":
        for split, table in tables.items():
            files[f"{split}.jsonl"] = store.write_bytes(f"{split}.jsonl", _jsonl(table))
            data = json.dumps(table, ensure_ascii=False, indent=1).encode("utf-8")
            files[f"{split}.json"] = store.write_bytes(f"{split}.json", data)
    elif opts.format == "verl":
        for split, table in tables.items():
            files[f"{split}.parquet"] = write_parquet(store, f"{split}.parquet", table)
    elif tables:
        files |= save_dataset_dict(store, tables)
    if opts.push_to_hub and tables:
        files["hub"] = push_dataset_dict(
            tables, opts.push_to_hub, opts.hub_token_env, private=opts.private
        )
    counts = {split: len(t) for split, t in tables.items()}
    sidecar = {
        "format": opts.format,
        "source": rows.source,
        "pipeline": rows.pipeline,
        "run_status": rows.status,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": {
            "read": rows.read,
            "verified": len(rows.examples),
            "skipped_by_run_filter": dict(rows.skipped),
            "skipped_by_format": dict(skipped),
            "exported": sum(counts.values()),
            "splits": counts,
        },
        "filters": rows.filters,
        "options": {
            "chat_template": opts.chat_template,
            "split_from_run": opts.split_from_run,
            "system": opts.system,
            "tool_style": opts.tool_style,
            "data_source": opts.data_source,
            "instruction": opts.instruction if opts.format == "verl" else None,
            "push_to_hub": opts.push_to_hub,
        },
        "files": sorted(files),
    }
    files["export.json"] = store.write_bytes(
        "export.json", json.dumps(sidecar, indent=1, ensure_ascii=False).encode("utf-8")
    )
    return ExportResult(store.url, files, counts, skipped + rows.skipped, sidecar)
