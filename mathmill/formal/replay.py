"""Replay of Coq proofs through the CoqIDE XML protocol (``coqidetop.opt``), recording
the goals before each tactic step.

A :class:`CoqWorker` is one long-lived ``coqidetop.opt -main-channel stdfds
-async-proofs off`` process spoken to over blocking pipes (run it in a thread).
:func:`replay_file` sends a file's sentences in order, records the goals before each
tactic of the requested lemmas, admits the ``Qed`` proofs of the others, and gets past
failures (a broken proof is admitted after ``Edit_at``), timeouts and crashes (the
process is restarted and the file's prefix sent again, proofs admitted).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html.entities import name2codepoint
from pathlib import Path
from typing import IO, NamedTuple, cast

from mathmill.errors import (
    CoqCrashed,
    CoqError,
    CoqRestarted,
    CoqTimeout,
    ReplayAborted,
)
from mathmill.formal.extract import (
    LEMMA_KINDS,
    ExtractError,
    LemmaBlock,
    Sentence,
    in_section,
    parse_blocks,
    read_source,
    step_text,
)
from mathmill.records import FormalLemma, Goal, ProofState

__all__ = [
    "CoqCrashed",
    "CoqError",
    "CoqGoals",
    "CoqRestarted",
    "CoqTimeout",
    "CoqWorker",
    "ReplayOutcome",
    "coq_available",
    "coq_version",
    "replay_file",
]

COQIDETOP = "coqidetop.opt"


def coq_available() -> bool:
    """Whether ``coqc`` and ``coqidetop.opt`` are on the PATH."""
    return shutil.which("coqc") is not None and shutil.which(COQIDETOP) is not None


@functools.cache
def coq_version() -> str:
    """``coqc --version``'s first line (part of the replay stage's cache key: another
    Coq may replay differently); ``"none"`` when Coq is not installed.
    """
    try:
        out = subprocess.run(
            ["coqc", "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return (out.stdout.strip().splitlines() or ["unknown"])[0]


@dataclass
class CoqGoals:
    """The goals of an open proof: focused, unfocused (per focus level), shelved,
    given up.
    """

    fg: list[Goal] = field(default_factory=list)
    bg: list[list[Goal]] = field(default_factory=list)
    shelved: list[Goal] = field(default_factory=list)
    given_up: list[Goal] = field(default_factory=list)

    def pending(self) -> list[Goal]:
        """The goals the next step works on: the focused ones, or when none is focused
        (after a bullet's goal is closed) the innermost unfocused ones.
        """
        if self.fg:
            return self.fg
        for level in self.bg:
            if level:
                return level
        return []

    @property
    def done(self) -> bool:
        """No goal left at all (``Qed`` may be said)."""
        return not (self.fg or any(self.bg) or self.shelved or self.given_up)


# ---------------------------------------------------------------- XML protocol

_ENTITY = re.compile(rb"&([A-Za-z][A-Za-z0-9]*);")
_XML_ENTITIES = frozenset({b"lt", b"gt", b"amp", b"quot", b"apos"})


def _fix_entities(chunk: bytes) -> bytes:
    def sub(m: re.Match[bytes]) -> bytes:
        name = m.group(1)
        if name in _XML_ENTITIES:
            return m.group(0)
        code = name2codepoint.get(name.decode("ascii"), 0xFFFD)
        return b"&#%d;" % code

    return _ENTITY.sub(sub, chunk)


def _esc(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def _text(elem: ET.Element | None) -> str:
    """Plain text of a richpp (or any) element: markup stripped, NBSP as spaces."""
    if elem is None:
        return ""
    return "".join(elem.itertext()).replace("\xa0", " ").strip()


def _goal(elem: ET.Element) -> Goal:
    children = list(elem)
    hyps = [_text(h) for h in children[1]] if len(children) > 1 else []
    ccl = _text(children[2]) if len(children) > 2 else ""
    return Goal(hypotheses=hyps, conclusion=ccl)


def _goal_list(elem: ET.Element) -> list[Goal]:
    return [_goal(g) for g in elem if g.tag == "goal"]


def _parse_goals(value: ET.Element) -> CoqGoals | None:
    opt = value.find("option")
    if opt is None or opt.get("val") != "some":
        return None
    goals = opt.find("goals")
    if goals is None:
        return None
    parts = list(goals)
    fg = _goal_list(parts[0]) if parts else []
    bg: list[list[Goal]] = []
    if len(parts) > 1:
        for pair in parts[1]:
            sides = list(pair)
            level: list[Goal] = []
            for side in sides:
                level.extend(_goal_list(side))
            bg.append(level)
    shelved = _goal_list(parts[2]) if len(parts) > 2 else []
    given_up = _goal_list(parts[3]) if len(parts) > 3 else []
    return CoqGoals(fg=fg, bg=bg, shelved=shelved, given_up=given_up)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` (resolved here, in the parent: the child only calls it) that
    makes the child get SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    killed run leaves no coqidetop behind busy with a runaway tactic. None elsewhere.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    kill = int(signal.SIGKILL)

    def arm() -> None:
        prctl(1, kill)  # PR_SET_PDEATHSIG

    return arm


class CoqWorker:
    """One ``coqidetop.opt`` process speaking the CoqIDE XML protocol, synchronously.

    ``load_paths`` are ``(dir, logical prefix)`` pairs passed as ``-Q``; the installed
    mathcomp is found in ``user-contrib`` without one. The replayed file is not given a
    logical name (its module is ``Top``), so replaying an installed file does not clash
    with its ``.vo``. Every call has a timeout: past it the process is killed, a fresh
    one started and :class:`CoqTimeout` raised; a dead process gives
    :class:`CoqCrashed` (after the same restart). A refused sentence leaves the document
    where it was before it and raises :class:`CoqError` with Coq's message.
    """

    def __init__(
        self,
        load_paths: Sequence[tuple[Path, str]] = (),
        *,
        timeout_s: float = 30.0,
        args: Sequence[str] = (),
        program: str = COQIDETOP,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.load_paths = list(load_paths)
        self.timeout_s = timeout_s
        self.args = list(args)
        self.program = program
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self.root = 1
        self.tip = 1
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._parser: ET.XMLPullParser[ET.Element] | None = None
        self._pending: list[ET.Element] = []
        self._messages: list[str] = []
        self._hold = b""

    # -- process --------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running process's id (None when not started)."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The command line the process is started with."""
        cmd = [self.program, "-main-channel", "stdfds", "-async-proofs", "off"]
        for d, logical in self.load_paths:
            cmd += ["-Q", str(d), logical]
        return cmd + self.args

    def start(self) -> int:
        """Start (or restart) the process and send ``Init``; returns the root state id."""
        self._kill()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (kept open with the process)
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            preexec_fn=_die_with_parent(),
        )
        self._parser = ET.XMLPullParser(events=("end",))
        self._parser.feed(b"<coq>")
        self._pending = []
        self._hold = b""
        value = self._call('<call val="Init"><option val="none"/></call>', self.start_timeout_s)
        if value.get("val") != "good":
            raise CoqError(f"Init failed: {_text(value)}")
        sid = value.find("state_id")
        self.root = self.tip = int(sid.get("val", "1")) if sid is not None else 1
        return self.root

    def restart(self) -> int:
        """Kill the process and start a fresh one (counted in ``restarts``)."""
        self.restarts += 1
        return self.start()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.close()
            with contextlib.suppress(OSError, ValueError):
                if proc.stdout is not None:
                    proc.stdout.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        """Stop the process."""
        proc = self._proc
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write(b'<call val="Quit"><unit/></call>')
                proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self._kill()

    def __enter__(self) -> CoqWorker:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - 2000))
            return self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    # -- calls ----------------------------------------------------------------

    def _call(self, xml: str, timeout_s: float | None = None) -> ET.Element:
        """Send one call and return its ``<value>``, collecting feedback messages."""
        if self._proc is None:
            self.start()
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        self._messages = []
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            proc.stdin.write(xml.encode("utf-8"))
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._lost(CoqCrashed, "coqidetop died")
        deadline = time.monotonic() + limit
        fd = proc.stdout.fileno()
        while True:
            value = self._next_value()
            if value is not None:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                self._lost(CoqTimeout, f"timeout after {limit:g}s")
            try:
                ready, _, _ = select.select([fd], [], [], left)
            except (OSError, ValueError):
                self._lost(CoqCrashed, "coqidetop died")
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._lost(CoqCrashed, "coqidetop died (end of its output)")
            self._feed(chunk)

    def _lost(self, kind: type[CoqRestarted], why: str) -> None:
        proc = self._proc
        code = proc.poll() if proc is not None else None
        tail = self._stderr_tail()
        detail = why + (f" (exit code {code})" if code is not None else "")
        if tail and kind is CoqCrashed:
            detail += f": {tail[-500:]}"
        self.restart()
        raise kind(detail)

    def _feed(self, chunk: bytes) -> None:
        assert self._parser is not None
        data = self._hold + chunk
        amp = data.rfind(b"&")
        if amp >= 0 and b";" not in data[amp:]:
            data, self._hold = data[:amp], data[amp:]
        else:
            self._hold = b""
        try:
            self._parser.feed(_fix_entities(data))
        except ET.ParseError as exc:
            self._lost(CoqCrashed, f"unreadable reply from coqidetop: {exc}")
        for event in self._parser.read_events():
            elem: object = cast("tuple[str, object]", event)[1]
            if isinstance(elem, ET.Element):
                self._pending.append(elem)

    def _next_value(self) -> ET.Element | None:
        while self._pending:
            elem = self._pending.pop(0)
            if elem.tag == "feedback":
                msg = elem.find("feedback_content/message")
                if msg is not None:
                    level = msg.find("message_level")
                    if level is not None and level.get("val") == "error":
                        self._messages.append(_text(msg.find("richpp")))
            elif elem.tag == "value":
                self._pending = []
                return elem
        return None

    def _fail_message(self, value: ET.Element) -> str:
        msg = _text(value.find("richpp")) or "; ".join(m for m in self._messages if m)
        return msg or "Coq reported an error"

    def add(self, sentence: str, *, timeout_s: float | None = None) -> int:
        """Add one sentence on top of the tip and run it; returns its state id.

        On a Coq error the document goes back to the tip before it and
        :class:`CoqError` is raised with Coq's message.
        """
        before = self.tip
        call = (
            '<call val="Add"><pair><pair><pair><pair>'
            f"<string>{_esc(sentence)}</string><int>0</int></pair>"
            f'<pair><state_id val="{before}"/><bool val="false"/></pair></pair>'
            "<int>0</int></pair><pair><int>1</int><int>0</int></pair></pair></call>"
        )
        value = self._call(call, timeout_s)
        if value.get("val") != "good":
            message = self._fail_message(value)
            self._back_to(before)
            raise CoqError(message)
        sid = value.find("pair/state_id")
        new = int(sid.get("val", "0")) if sid is not None else 0
        self.tip = new
        status = self._call('<call val="Status"><bool val="false"/></call>', timeout_s)
        if status.get("val") != "good":
            message = self._fail_message(status)
            self._back_to(before)
            raise CoqError(message, new)
        return new

    def _back_to(self, state_id: int) -> None:
        try:
            self.edit_at(state_id)
        except CoqRestarted:
            raise
        except CoqError:
            # The document cannot go back: start again (the caller resends its prefix).
            self.restart()
            raise CoqCrashed("could not go back after an error; restarted") from None

    def edit_at(self, state_id: int, *, timeout_s: float | None = None) -> None:
        """Go back to an earlier state (``Edit_at``); it becomes the tip."""
        value = self._call(f'<call val="Edit_at"><state_id val="{state_id}"/></call>', timeout_s)
        if value.get("val") != "good":
            raise CoqError(f"Edit_at {state_id} failed: {self._fail_message(value)}")
        self.tip = state_id

    def goals(self, *, timeout_s: float | None = None) -> CoqGoals | None:
        """The goals at the tip (None when no proof is open)."""
        value = self._call('<call val="Goal"><unit/></call>', timeout_s)
        if value.get("val") != "good":
            raise CoqError(self._fail_message(value))
        return _parse_goals(value)


# ---------------------------------------------------------------- replay


class ReplayOutcome(NamedTuple):
    """One requested lemma's replay: the lemma with ``states`` filled in, or None and
    why (Coq's error with the tactic that failed, a timeout, ...).
    """

    lemma: FormalLemma | None
    error: str | None


StepHook = Callable[[FormalLemma, int, CoqWorker], None]


class _Replay:
    def __init__(
        self,
        path: Path,
        worker: CoqWorker,
        sentences: list[Sentence],
        timeout_s: float,
        admit_others: bool,
        on_step: StepHook | None,
    ) -> None:
        self.path = path
        self.w = worker
        self.sentences = sentences
        self.timeout_s = timeout_s
        self.admit_others = admit_others
        self.on_step = on_step
        self.sectioned = in_section(sentences)
        self.committed: list[str] = []  # what to resend after a restart

    def where(self, idx: int) -> str:
        return f"{self.path.name}:{self.sentences[idx].line}"

    def resend(self) -> None:
        """After a restart: send the committed prefix again."""
        for text in self.committed:
            try:
                self.w.add(text, timeout_s=max(self.timeout_s, 60.0))
            except CoqError as exc:
                raise ReplayAborted(
                    f"could not resend the file's prefix after a restart: {text[:80]!r}: "
                    f"{exc.message}"
                ) from None

    def plain(self, idx: int) -> None:
        """A sentence outside any proof; its failure fails the rest of the file."""
        text = self.sentences[idx].text
        for attempt in (0, 1):
            try:
                self.w.add(text)
                self.committed.append(text)
                return
            except CoqRestarted as exc:
                self.resend()
                if attempt or isinstance(exc, CoqTimeout):
                    raise ReplayAborted(
                        f"{self.where(idx)}: {text[:80]!r}: {exc.message}"
                    ) from None
            except CoqError as exc:
                raise ReplayAborted(f"{self.where(idx)}: {text[:80]!r}: {exc.message}") from None

    def admitted_texts(self, b: LemmaBlock) -> list[str]:
        texts = [self.sentences[b.statement].text]
        if b.proof_start is not None:
            first = self.sentences[b.proof_start].text
            if re.match(r"Proof\s+using\b", first):
                texts.append(first)
        return [*texts, "Admitted."]

    def other(self, b: LemmaBlock) -> None:
        """A block not requested: admitted (``Qed`` lemmas) or replayed as is."""
        term = self.sentences[b.terminator].text
        if term.startswith("Abort"):
            return
        if term.startswith("Admitted") or (
            self.admit_others
            and term.startswith("Qed")
            and b.kind in LEMMA_KINDS
            # inside a Section, Admitted generalizes over every section variable (Qed
            # only over those the proof uses): the lemma's type would change after End
            and not self.sectioned[b.statement]
        ):
            texts = self.admitted_texts(b)
        else:
            texts = [self.sentences[i].text for i in range(b.statement, b.terminator + 1)]
        self.run_texts(b, texts, real=texts[-1] != "Admitted.")

    def run_texts(self, b: LemmaBlock, texts: list[str], real: bool) -> None:
        for attempt in (0, 1):
            tip = self.w.tip
            try:
                self.w.add(texts[0])
            except CoqRestarted as exc:
                self.resend()
                if attempt or isinstance(exc, CoqTimeout):
                    raise ReplayAborted(f"{self.where(b.statement)}: {exc.message}") from None
                continue
            except CoqError as exc:
                raise ReplayAborted(
                    f"{self.where(b.statement)}: {texts[0][:80]!r}: {exc.message}"
                ) from None
            after = self.w.tip
            try:
                for text in texts[1:]:
                    self.w.add(text)
                self.committed.extend(texts)
                return
            except CoqRestarted:
                self.resend()
                if attempt:
                    break
                continue
            except CoqError:
                if not real:
                    raise ReplayAborted(f"{self.where(b.statement)}: could not admit") from None
                self.admit_after(after, b, tip)
                return
        self.close_admitted(b)

    def admit_after(self, after: int, b: LemmaBlock, tip: int) -> None:
        """Close a failed proof with ``Admitted.`` from the state after its statement."""
        del tip
        try:
            self.w.edit_at(after)
            self.w.add("Admitted.")
            self.committed.extend(self.admitted_texts(b))
        except CoqRestarted:
            self.resend()
            self.close_admitted(b)
        except CoqError:
            self.w.restart()
            self.resend()
            self.close_admitted(b)

    def close_admitted(self, b: LemmaBlock) -> None:
        """With the document at the prefix: add the lemma admitted."""
        texts = self.admitted_texts(b)
        try:
            for text in texts:
                self.w.add(text)
        except CoqError as exc:
            raise ReplayAborted(
                f"{self.where(b.statement)}: could not admit: {exc.message}"
            ) from None
        self.committed.extend(texts)

    def requested(self, b: LemmaBlock, lemma: FormalLemma) -> ReplayOutcome:
        steps = [step_text(self.sentences, s) for s in b.steps]
        if steps != list(lemma.tactics):
            self.other(b)
            return ReplayOutcome(None, "the lemma's tactics differ from the file's proof")
        for attempt in (0, 1):
            try:
                return self._requested_once(b, lemma)
            except CoqCrashed as exc:
                self.resend()
                if attempt:
                    self.close_admitted(b)
                    return ReplayOutcome(None, f"coqidetop crashed: {exc.message}")
        raise AssertionError("unreachable")

    def _requested_once(self, b: LemmaBlock, lemma: FormalLemma) -> ReplayOutcome:
        s = self.sentences
        statement = s[b.statement].text
        try:
            self.w.add(statement)
        except CoqTimeout as exc:
            self.resend()
            return ReplayOutcome(None, f"statement: {exc.message}")
        except CoqCrashed:
            raise
        except CoqError as exc:
            return ReplayOutcome(None, f"statement failed: {exc.message}")
        after = self.w.tip
        current = statement
        states: list[ProofState] = []
        try:
            if b.proof_start is not None:
                current = s[b.proof_start].text
                self.w.add(current)
                after = self.w.tip
            for k, step in enumerate(b.steps):
                current = step_text(s, step)
                if self.on_step is not None:
                    self.on_step(lemma, k, self.w)
                goals = self.w.goals()
                states.append(ProofState(goals=goals.pending() if goals else []))
                for idx in step:
                    self.w.add(s[idx].text)
            goals = self.w.goals()
            if goals is not None and not goals.done:
                left = len(goals.pending()) or 1
                raise CoqError(f"{left} goal(s) left at the end of the proof")
            current = s[b.terminator].text
            self.w.add(current)
        except CoqTimeout as exc:
            self.resend()
            self.close_admitted(b)
            return ReplayOutcome(None, f"timeout in {current!r}: {exc.message}")
        except CoqCrashed:
            raise
        except CoqError as exc:
            self.admit_after(after, b, after)
            return ReplayOutcome(None, f"{current!r} failed: {exc.message}")
        if s[b.terminator].text.startswith("Defined"):
            self.committed.extend(s[i].text for i in range(b.statement, b.terminator + 1))
        else:
            self.committed.extend(self.admitted_texts(b))
        return ReplayOutcome(lemma.model_copy(update={"states": states}), None)


def _match(blocks: list[LemmaBlock], sentences: list[Sentence], lemma: FormalLemma) -> int | None:
    by_start = [
        k
        for k, b in enumerate(blocks)
        if b.name == lemma.name and sentences[b.statement].start == lemma.start
    ]
    if by_start:
        return by_start[0]
    by_name = [k for k, b in enumerate(blocks) if b.name == lemma.name]
    return by_name[0] if len(by_name) == 1 else None


def replay_file(
    path: Path,
    module: str,
    lemmas: Sequence[FormalLemma],
    *,
    load_paths: Sequence[tuple[Path, str]] = (),
    timeout_s: float = 30.0,
    admit_others: bool = True,
    worker: CoqWorker | None = None,
    on_step: StepHook | None = None,
) -> list[ReplayOutcome]:
    """Replay the proofs of ``lemmas`` (from ``path``) through Coq, recording the goals
    before each tactic step; one :class:`ReplayOutcome` per lemma, in order.

    The file's sentences are sent in order in one ``coqidetop`` process (``worker``, or
    a new one with ``load_paths``, closed at the end). Proofs of other lemmas ending in
    ``Qed.`` are admitted when ``admit_others`` (``Defined.`` ones are replayed). A
    failed requested proof is dropped with Coq's message and the tactic, and admitted so
    later proofs can use the lemma; a timeout (``timeout_s`` per sentence) or a crash
    restarts the process and resends the file's prefix. A failure outside proofs (a
    missing library, ...) fails every requested lemma not yet replayed. ``on_step``
    is called before each step (tests use it to kill the process).
    """
    del module  # the file is replayed as module Top (no clash with an installed .vo)
    results: list[ReplayOutcome | None] = [None] * len(lemmas)
    try:
        _, sentences = read_source(path)
    except ExtractError as exc:
        return [ReplayOutcome(None, f"cannot parse: {exc}")] * len(lemmas)
    blocks = parse_blocks(sentences)
    wanted: dict[int, list[int]] = {}
    for k, lemma in enumerate(lemmas):
        found = _match(blocks, sentences, lemma)
        if found is None:
            results[k] = ReplayOutcome(None, f"lemma {lemma.name} not found in {path.name}")
        else:
            wanted.setdefault(blocks[found].statement, []).append(k)
    block_at = {b.statement: b for b in blocks}
    own = worker is None
    w = worker if worker is not None else CoqWorker(load_paths, timeout_s=timeout_s)
    w.timeout_s = timeout_s
    fatal: str | None = None
    try:
        w.start() if own or w.pid is None else w.edit_at(w.root)
        replay = _Replay(path, w, sentences, timeout_s, admit_others, on_step)
        i = 0
        while i < len(sentences):
            b = block_at.get(i)
            if b is None:
                replay.plain(i)
                i += 1
                continue
            ks = wanted.get(i)
            if ks:
                outcome = replay.requested(b, lemmas[ks[0]])
                for k in ks:
                    results[k] = outcome
            else:
                replay.other(b)
            i = b.terminator + 1
    except ReplayAborted as exc:
        fatal = str(exc)
    except CoqError as exc:
        fatal = f"Coq failed: {exc.message}"
    finally:
        if own:
            w.close()
    return [
        r if r is not None else ReplayOutcome(None, f"not replayed: {fatal or 'unknown'}")
        for r in results
    ]
