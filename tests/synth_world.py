"""A scripted "world" that answers the synthesize flow's prompts over real HTTP (as the
handler of :class:`~mathmill.llm.fake_server.FakeOpenAIServer`).

Every reply is a pure function of the request, so runs are reproducible whatever the
order of concurrent calls. A topic's *kind* decides how its problems' solutions fare:

=========  ==================================================  =====================
kind       what the models do                                  final outcome
=========  ==================================================  =====================
ok         right answer, right code                            verified, round 0
fix        wrong answer; the rewrite fixes it                  verified, round 1
stuck      wrong answer, every round                           unverified wrong_answer
crash      the code raises                                     unverified error
leak       the code prints the answer as a literal             unverified leak
noanswer   the solution has no \\boxed{}                       unverified no_answer
spin       the code never ends                                 unverified timeout
bad        the reasoner answers HTTP 400 (context too long)    unverified llm_error
leaky      the problem text contains its answer                dropped contains_solution
dup        every problem of the topic is the same text         dropped duplicate
wrongcot   wrong answer, code written from it reproduces it    unverified disagreement
split      short CoT 0 wrong (reproduced by its code), others  that one: unverified
           right                                               disagreement (blind
                                                               check) or minority
                                                               (majority, 2+ shorts)
=========  ==================================================  =====================

The blind program (``blind.code``, ``blind.repair``: written from the problem alone)
computes the right answer a*b + c for every kind; ``blind="crash"`` makes every blind
program raise (the check is inconclusive), ``blind="repair"`` only the first (its
repair round computes it). Topics cycle over ``kinds``: with the default kinds, ten
topics cover the first ten (``wrongcot`` and ``split`` come after them).

Used by tests/test_synthesize.py, tests/test_blind_check.py and bench/synthesize.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from mathmill.llm.fake_server import Fault, RecordedRequest, Reply, Response

KINDS = (
    "ok",
    "fix",
    "stuck",
    "crash",
    "leak",
    "noanswer",
    "spin",
    "bad",
    "leaky",
    "dup",
    "wrongcot",
    "split",
)
_TOPIC = re.compile(r"Topic: Topic (\d+) \((\w+)\)")
_PROBLEM = re.compile(r"\[(\w+)\] Let a = (\d+), b = (\d+) and c = (\d+)\. Compute a\*b \+ c\.")
_COUNT = re.compile(r"Propose (\d+) distinct")
_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def _n(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


@dataclass
class SynthWorld:
    """The handler. ``kinds`` is cycled over topic numbers; ``served`` counts every
    request answered at once by (stage, body) so a test can see calls paid twice.
    """

    kinds: tuple[str, ...] = KINDS
    blind: str = "right"
    served: Counter[str] = field(default_factory=Counter)
    paused: threading.Event = field(default_factory=threading.Event)
    failing: set[str] = field(default_factory=set)
    answered: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: RecordedRequest) -> Response:
        if self.paused.is_set():
            return Fault.hang(120.0)  # in flight when the test kills the client
        stage = request.headers.get("x-mathmill-stage", "")
        if stage in self.failing:
            return Fault.status(503)  # the endpoint is down for this stage
        body = request.body or {}
        text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        response = self._answer(stage, text, int(body.get("seed") or 0))
        with self._lock:
            self.answered += 1
            if isinstance(response, Reply):
                self.served[stage + "|" + json.dumps(body, sort_keys=True)] += 1
        return response

    def _answer(self, stage: str, text: str, seed: int) -> Response:
        if stage == "topics":
            count = int(m.group(1)) if (m := _COUNT.search(text)) else 5
            start = seed * 100
            names = [
                f"Topic {k} ({self.kinds[k % len(self.kinds)]})"
                for k in range(start, start + count)
            ]
            return Reply(json.dumps({"topics": [*names, names[0]]}))  # one duplicate
        if stage == "problems":
            m = _TOPIC.search(text)
            if m is None:
                return Reply('{"problem": "?"}')
            number, kind = int(m.group(1)), m.group(2)
            sample = 0 if kind == "dup" else seed
            a, b, c = 2 + _n(number, sample) % 40, 2 + _n(number, sample, "b") % 30, _n(number) % 9
            statement = f"[{kind}] Let a = {a}, b = {b} and c = {c}. Compute a*b + c."
            if kind == "leaky":
                statement += f" Answer: {a * b + c}"
            return Reply(json.dumps({"problem": statement}))
        m = _PROBLEM.search(text)
        if m is None:
            return Reply("I do not understand.")
        kind = m.group(1)
        a, b, c = (int(m.group(i)) for i in (2, 3, 4))
        truth = a * b + c
        if stage.startswith("cot."):
            if kind == "bad":
                return Fault.status(400)
            split = kind == "split" and stage == "cot.short" and seed % 2 == 1
            wrong = kind in ("fix", "stuck", "wrongcot") or split
            return Reply(self._cot(kind, truth, stage, seed, wrong=wrong))
        if stage == "rewrite":  # depends on the solution it revises, so rounds differ
            revised = hashlib.sha256(text.encode()).hexdigest()[:8]
            return Reply(
                self._cot(kind, truth, f"rewrite of {revised}", seed, wrong=kind == "stuck")
            )
        if stage in ("verify.code", "verify.regen"):
            if kind in ("wrongcot", "split"):  # faithful to the solution, right or wrong
                boxed = _BOXED.findall(text)
                off = int(boxed[-1]) - truth if boxed else 0
                code = f"a, b, c = {a}, {b}, {c}\nprint(a * b + c + {off})"
                return Reply(f"```python\n{code}\n```")
            return Reply(f"```python\n{self._code(kind, a, b, c, truth)}\n```")
        if stage.startswith("blind."):  # written from the problem alone
            crash = self.blind == "crash" or (self.blind == "repair" and stage == "blind.code")
            code = self._code("crash" if crash else "ok", a, b, c, truth)
            return Reply(f"```python\n{code}\n```")
        if stage == "verify.critique":
            review = {
                "summary": "follows the solution",
                "alignment": 9,
                "rigor": 8,
                "complexity": 10,
                "edge_cases": [],
                "issues": [],
                "passed": True,
            }
            return Reply(json.dumps(review))
        return Reply("unexpected stage " + stage)

    @staticmethod
    def _cot(kind: str, truth: int, stage: str, seed: int, *, wrong: bool) -> str:
        answer = truth + 1 if wrong else truth
        steps = f"({stage}, sample {seed}) Multiply a by b, then add c."
        if kind == "noanswer":
            return steps + " So that is the result."
        return f"{steps} The result is \\boxed{{{answer}}}."

    @staticmethod
    def _code(kind: str, a: int, b: int, c: int, truth: int) -> str:
        if kind == "crash":
            return f"a, b, c = {a}, {b}, {c}\nprint((a * b + c) // 0)"
        if kind == "leak":
            return f"print({truth})"
        if kind == "spin":
            return "while True:\n    pass"
        return f"a, b, c = {a}, {b}, {c}\nprint(a * b + c)"

    def paid_twice(self) -> dict[str, int]:
        """Requests answered more than once (stage|body -> times)."""
        return {k: v for k, v in self.served.items() if v > 1}


OUTCOME = {
    "ok": ("verified", 0),
    "fix": ("verified", 1),
    "stuck": ("wrong_answer", None),
    "crash": ("error", None),
    "leak": ("leak", None),
    "noanswer": ("no_answer", None),
    "spin": ("timeout", None),
    "bad": ("llm_error", 0),
}
"""kind -> (final status, final round; None = the last rewrite round)."""
