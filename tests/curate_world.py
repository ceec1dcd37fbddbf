"""A scripted "world" that answers the curate pipeline's prompts over real HTTP (as the
handler of :class:`~mathmill.llm.fake_server.FakeOpenAIServer`), and the input it is
scripted for: real GSM8K test problems (``tests/data/gsm8k_test.jsonl``, MIT (c) 2021
OpenAI) each given a *kind*, plus planted duplicates, benchmark items and bad rows.

The solver's program for a problem depends on its kind and the round (the previous
program's ``# v<k>`` marker, carried in the repair prompt):

============  ==========================================  ==============================
kind          what the solver writes                      final outcome
============  ==========================================  ==============================
ok            right at once                               curated, 0 repairs
wrong1        wrong answer, then right                    curated, 1 repair
error1        raises, then right                          curated, 1 repair
timeout1      never ends, then right                      curated, 1 repair
noout1        prints nothing, then right                  curated, 1 repair
nocode1       a reply without code, then right            curated, 1 repair
twofix        raises, wrong answer, then right            curated, 2 repairs
never         a wrong answer every round                  unsolved wrong_answer
crash         raises every round                          unsolved error
leakfix       prints the answer as a literal; the judge   curated, leak repaired
              confirms; the repair computes it
leakok        a flagged program the judge clears          curated, leak cleared
leakstuck     prints the literal, and again when asked    leaking
============  ==========================================  ==============================

Every reply is a pure function of the request, so runs are reproducible whatever the
order of concurrent calls.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mathmill.llm.fake_server import Fault, RecordedRequest, Reply, Response

DATA = Path(__file__).parent / "data"
KINDS = (
    "ok",
    "wrong1",
    "error1",
    "timeout1",
    "noout1",
    "nocode1",
    "twofix",
    "never",
    "crash",
    "leakfix",
    "leakok",
    "leakstuck",
)
OUTCOME: dict[str, tuple[str, str, int | None]] = {
    "ok": ("curated", "none", 0),
    "wrong1": ("curated", "none", 1),
    "error1": ("curated", "none", 1),
    "timeout1": ("curated", "none", 1),
    "noout1": ("curated", "none", 1),
    "nocode1": ("curated", "none", 1),
    "twofix": ("curated", "none", 2),
    "never": ("unsolved", "wrong_answer", None),
    "crash": ("unsolved", "error", None),
    "leakfix": ("curated", "repaired", 1),
    "leakok": ("curated", "cleared", 0),
    "leakstuck": ("leaking", "leak", None),
}
"""kind -> (where the row ends, its reason or leak verdict, repair rounds on the row)."""
_PROBLEM = re.compile(r"Problem: (.*?)\n\n", re.DOTALL)
_VERSION = re.compile(r"# v(\d+)")


def key(text: str) -> str:
    """A problem's key, robust to whitespace and Unicode normalization."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())[:120]


def gsm8k(n: int, start: int = 0) -> list[dict[str, object]]:
    """``n`` rows of the GSM8K test split copy (id, problem, answer, source, license)."""
    lines = (DATA / "gsm8k_test.jsonl").read_text("utf-8").splitlines()[start : start + n]
    return [json.loads(line) for line in lines]


def benchmark_rows(name: str) -> list[dict[str, object]]:
    """The rows of ``tests/data/problems/<name>_5.jsonl``."""
    path = DATA / "problems" / f"{name}_5.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@dataclass
class Planted:
    """The input file's rows and, for each id, what should become of it."""

    rows: list[object]
    expected: dict[str, tuple[str, str]] = field(default_factory=dict)
    kinds: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (kind, answer)
    kind_of: dict[str, str] = field(default_factory=dict)  # input id -> kind


def planted_input(per_kind: int = 2) -> Planted:
    """GSM8K problems cycled over the kinds, then planted rows: exact, spacing-only and
    reworded-number duplicates, benchmark items (exact, with a sentence added, with
    spacing changes), a problem with no answer, and malformed rows.
    """
    base = gsm8k(len(KINDS) * per_kind)
    out = Planted(rows=[])
    for i, row in enumerate(base):
        kind = KINDS[i % len(KINDS)]
        out.rows.append(row)
        out.kinds[key(str(row["problem"]))] = (kind, int(str(row["answer"]).replace(",", "")))
        out.kind_of[str(row["id"])] = kind
        place, reason, _ = OUTCOME[kind]
        out.expected[str(row["id"])] = (place, reason)
    first = base[0]
    assert "’" in str(first["problem"])
    longest = max(base[2:], key=lambda r: len(str(r["problem"]).split()))
    words = str(longest["problem"]).split()
    digits = next(i for i, w in enumerate(words) if any(c.isdigit() for c in w))
    reworded = [*words[:digits], "1" + words[digits], *words[digits + 1 :]]
    planted = [
        # the same text: the load stage drops it (same problem id)
        ({**first, "id": "dup-exact"}, ("dropped", "duplicate")),
        # the same after normalization (typographic apostrophe): the dedup stage
        (
            {**first, "id": "dup-normalized", "problem": str(first["problem"]).replace("’", "'")},
            ("duplicates", "duplicate"),
        ),
        (
            {**longest, "id": "dup-near", "problem": " ".join(reworded)},
            ("duplicates", "near_duplicate"),
        ),
    ]
    aime, math500, amc = (
        benchmark_rows("aime_1983_2024"),
        benchmark_rows("math500"),
        benchmark_rows("amc23"),
    )
    planted += [
        ({**aime[0], "id": "bench-aime"}, ("contaminated", "contaminated")),
        (
            {
                **math500[1],
                "id": "bench-math500",
                "problem": "Solve this. " + str(math500[1]["problem"]),
            },
            ("contaminated", "contaminated"),
        ),
        (
            {**amc[2], "id": "bench-amc", "problem": str(amc[2]["problem"]).replace("$", " $ ")},
            ("contaminated", "contaminated"),
        ),
        (
            {
                "id": "no-answer",
                "problem": "A train leaves at noon and goes 60 miles per hour "
                "for three hours, then 40 miles per hour for two more hours. How far did it go?",
            },
            ("unsolved", "no_reference"),
        ),
    ]
    for row, expected in planted:
        out.rows.append(row)
        out.expected[str(row["id"])] = expected
    out.rows += [
        {"id": "bad-missing", "text": "no problem field"},
        {"id": "bad-type", "problem": 42},
    ]
    return out


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """The rows as a JSONL file."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


@dataclass
class CurateWorld:
    """The handler: ``kinds`` maps a problem's key to (kind, answer). ``served`` counts
    every request answered at once by (stage, body), so a test can see calls paid twice.
    """

    kinds: dict[str, tuple[str, int]]
    rungs: tuple[str, ...] = ("base",)
    levels: dict[str, int] = field(default_factory=dict)  # problem key -> first solving rung
    served: Counter[str] = field(default_factory=Counter)
    stages: Counter[str] = field(default_factory=Counter)
    paused: threading.Event = field(default_factory=threading.Event)
    failing: set[str] = field(default_factory=set)  # stages answered 503 (endpoint down)
    prompts: list[tuple[str, str]] = field(default_factory=list)
    answered: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: RecordedRequest) -> Response:
        if self.paused.is_set():
            return Fault.hang(120.0)  # in flight when the test kills the run
        stage = request.headers.get("x-mathmill-stage", "")
        if stage in self.failing:
            return Fault.status(503)
        body = request.body or {}
        text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        if stage.startswith("ladder."):
            response = self._ladder(stage.split(".", 1)[1], body)
        elif stage == "sample":  # the evaluate flow: the model plays the last rung
            response = self._ladder(self.rungs[-1], body)
        elif stage == "structure":
            response = Reply(json.dumps(STRUCTURE))
        else:
            response = self._answer(stage, text)
        with self._lock:
            self.answered += 1
            self.stages[stage] += 1
            self.prompts.append((stage, text))
            if isinstance(response, Reply):
                self.served[stage + "|" + json.dumps(body, sort_keys=True)] += 1
        return response

    def _ladder(self, rung: str, body: dict[str, object]) -> Response:
        """A rung's samples: right from the problem's planted rung on (``levels``), wrong
        before it (a problem with no planted rung is solved by the first).
        """
        messages = body.get("messages") or []
        statement = str(messages[-1]["content"]) if isinstance(messages, list) else ""
        found = self.kinds.get(key(statement))
        if found is None:
            return Reply("I cannot solve this.")
        answer = found[1]
        n = int(str(body.get("n") or 1))
        level = self.levels.get(key(statement), 0)
        right = self.rungs.index(rung) >= level if rung in self.rungs else True
        text = f"The answer is \\boxed{{{answer if right else answer + 1}}}."
        return Reply(contents=[text] * n)

    def paid_twice(self) -> dict[str, int]:
        """Requests answered more than once (stage|body -> times)."""
        return {k: v for k, v in self.served.items() if v > 1}

    def _answer(self, stage: str, text: str) -> Response:
        m = _PROBLEM.search(text)
        found = self.kinds.get(key(m.group(1))) if m else None
        if found is None:
            return Reply("```python\nprint('I do not know')\n```")
        kind, answer = found
        version = _VERSION.findall(text)
        repair = "did not give the right result" in text  # a reply with no code has no marker
        round_ = int(version[-1]) + 1 if version else int(repair)
        if stage == "leaks.judge":
            cleared = kind == "leakok"
            reason = "the constant comes from the problem" if cleared else "prints a literal"
            return Reply(json.dumps({"leak": not cleared, "reason": reason}))
        if stage == "leaks.repair":
            if kind == "leakstuck":
                return Reply(f"```python\n# v{round_}\nprint({answer})\n```")
            return Reply(f"```python\n# v{round_}\n{_computes(answer)}\n```")
        return Reply(self._program(kind, answer, round_))

    @staticmethod
    def _program(kind: str, answer: int, round_: int) -> str:
        head = f"# v{round_}\n"
        plan = {
            "wrong1": ["wrong"],
            "error1": ["raise"],
            "timeout1": ["spin"],
            "noout1": ["silent"],
            "nocode1": ["nocode"],
            "twofix": ["raise", "wrong"],
            "never": ["wrong"] * 10,
            "crash": ["raise"] * 10,
            "leakfix": ["literal"],
            "leakok": ["assigned"],
            "leakstuck": ["literal"],
        }.get(kind, [])
        step = plan[round_] if round_ < len(plan) else "right"
        if step == "nocode":
            return f"{head}The answer is easy to see."
        body = {
            "right": _computes(answer),
            "wrong": _computes(answer + 1),
            "raise": "x = 1 // 0\nprint(x)",
            "spin": "while True:\n    pass",
            "silent": "y = 3",
            "literal": f"print({answer})",
            "assigned": f"total = {answer}\nprint(total)",
        }[step]
        return f"```python\n{head}{body}\n```"


STRUCTURE = {
    "domain": "algebra",
    "subdomain": "word problems",
    "objects": ["integers"],
    "constraints": ["quantities are whole numbers"],
    "answer_type": "integer",
    "reasoning_patterns": ["step-by-step arithmetic"],
    "case_analysis": False,
    "construction": False,
    "techniques": ["unit rates"],
    "depth": 3,
}


def _computes(value: int) -> str:
    """A program that computes ``value`` (no literal equal to it)."""
    return f"parts = [{value - 7}, 3, 4]\nprint(sum(parts))"
