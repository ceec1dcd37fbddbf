"""The fake server's handler for the formal pipeline's tests: the reasoner answers
each lemma with M reasonings of which one (index 1) copies the proof's tactics and the
others explain the idea; the judge fails a reasoning that copies tactics; a scoring
request (vLLM's prompt logprobs, as the fake server shapes them) gets one token.
``served`` counts each request body answered, so a test sees calls paid twice.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mathmill.llm.fake_server import Fault, RecordedRequest, Reply, Response

PLANTED = Path(__file__).parent / "data" / "formal_e2e"
COPY_MARK = "Do exactly these steps:"
_PROOF = re.compile(r"\nProof:\n(.*)\Z", re.S)
_LEMMA = re.compile(r"Lemma \(([^)]*)\):\n(.*?)\n\nGoals", re.S)


@dataclass
class FormalWorld:
    """Scripted reasoner, judge and scorer (see the module docstring)."""

    served: Counter[str] = field(default_factory=Counter)
    stages: Counter[str] = field(default_factory=Counter)
    paused: threading.Event = field(default_factory=threading.Event)
    lemmas: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: RecordedRequest) -> Response:
        if self.paused.is_set():
            return Fault.hang(120.0)  # in flight when the test kills the run
        stage = request.headers.get("x-mathmill-stage", "")
        body = request.body or {}
        text = " ".join(str(m.get("content", "")) for m in request.messages)
        if stage == "formal_reason":
            response = self._reason(text, int(body.get("n") or 1))
        elif stage == "formal_judge":
            copies = COPY_MARK in text.split("Reasoning:", 1)[-1]
            verdict = {
                "relies_on_tactics": copies,
                "reason": "copies the script" if copies else "ok",
            }
            response = Reply(json.dumps(verdict))
        else:  # formal_score: one token; the prompt logprobs come with it
            response = Reply("x")
        with self._lock:
            self.stages[stage] += 1
            self.served[stage + "|" + json.dumps(body, sort_keys=True)] += 1
        return response

    def _reason(self, text: str, n: int) -> Reply:
        proof = _PROOF.search(text)
        lemma = _LEMMA.search(text)
        if lemma:
            with self._lock:
                self.lemmas.add(lemma.group(2).strip())
        script = proof.group(1).strip() if proof else "?"
        out = []
        for i in range(n):
            if i == 1:
                out.append(f"{COPY_MARK}\n{script}")
            else:
                out.append(
                    f"Idea {i}: argue by induction on the first number; the base case is a "
                    "computation and the step follows from the hypothesis."
                )
        return Reply(contents=out)

    def paid_twice(self) -> dict[str, int]:
        """Requests answered more than once (stage|body -> times)."""
        return {k: v for k, v in self.served.items() if v > 1}
