"""Formal proofs: lemma extraction from Coq files and proof replay through coqidetop.

Coq 8.16 and mathcomp are installed by ``make check`` (scripts/install_coq.sh); these
tests fail, not skip, without them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mathmill.formal.extract import (
    MATHCOMP_ROOT,
    ExtractError,
    default_sources,
    discover,
    extract_all,
    extract_file,
    split_sentences,
)
from mathmill.formal.replay import CoqWorker, coq_available, replay_file
from mathmill.records import FormalLemma, stable_id

DATA = Path(__file__).parent / "data" / "formal"
PLANTED = DATA / "planted.v"


def require_coq() -> None:
    """Fail (not skip) when Coq or mathcomp is missing."""
    if not coq_available():
        pytest.fail("coqc / coqidetop.opt not found: run scripts/install_coq.sh")
    if not (MATHCOMP_ROOT / "ssreflect" / "ssrnat.v").is_file():
        pytest.fail(f"mathcomp sources not found under {MATHCOMP_ROOT}: run scripts/install_coq.sh")


# ---------------------------------------------------------------- splitter


def test_split_sentences_comments_strings_bullets() -> None:
    text = (
        '(* a. (* nested. *) "str *)" *)\n'
        'Definition s := "a "". b".\n'
        'Notation "x .." := x (at level 0).\n'
        "Lemma é (n : nat) : n = n.\nProof.\n"
        "- by [].\n++ { idtac. }\n*** done.\nQed."
    )
    got = split_sentences(text)
    assert [s.text for s in got] == [
        'Definition s := "a "". b".',
        'Notation "x .." := x (at level 0).',
        "Lemma é (n : nat) : n = n.",
        "Proof.",
        "-",
        "by [].",
        "++",
        "{",
        "idtac.",
        "}",
        "***",
        "done.",
        "Qed.",
    ]
    data = text.encode()
    for s in got:
        assert data[s.start : s.end].decode() == s.text
    assert got[2].line == 4 and got[3].line == 5
    # offsets are bytes: "é" is two
    assert got[3].start == text.index("Proof.") + 1


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("Lemma a : True.\n(* open (* nested *)\nProof.", 2),
        ('Lemma a : True.\n\nDefinition s := "open.', 3),
        ("Lemma a : True.\nProof", 2),
    ],
)
def test_unparsable_file_raises(tmp_path: Path, text: str, line: int) -> None:
    bad = tmp_path / "bad.v"
    bad.write_text(text)
    with pytest.raises(ExtractError, match=rf"bad\.v:{line}:"):
        extract_file(bad, tmp_path, "x.bad")
    lemmas, failed = extract_all([(bad, tmp_path, "x.bad")], workers=1)
    assert lemmas == [] and failed and "bad.v" in failed[0][0] and "bad.v" in failed[0][1]


def test_undecodable_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "latin.v"
    bad.write_bytes(b"Lemma a : True.\nProof. exact I. Qed.\n(* caf\xe9 *)\n")
    with pytest.raises(ExtractError, match=r"latin\.v:3: .*UTF-8"):
        extract_file(bad, tmp_path, "x.latin")


def test_extract_planted_file() -> None:
    lemmas = extract_file(PLANTED, DATA, "planted")
    by_name = {lem.name: lem for lem in lemmas}
    assert list(by_name) == [
        "good_add",
        "broken_add",
        "uses_broken",
        "loops",
        "after_loop",
        "bullets",
    ]
    good = by_name["good_add"]
    assert good.statement == "Lemma good_add n : n + 0 = n."
    assert good.tactics == ["elim: n => [|n IHn].", "by [].", "by rewrite addSn IHn."]
    assert good.proof.startswith("Proof.") and good.proof.endswith("Qed.")
    assert good.file == "planted.v" and good.line == 4 and good.terminator == "Qed."
    assert by_name["bullets"].tactics == ["split.", "- exact p.", "- { exact q. }"]
    data = PLANTED.read_bytes()
    assert data[good.start : good.end].decode().endswith("Qed.")


def test_extract_skips_admitted_let_and_unproved(tmp_path: Path) -> None:
    src = tmp_path / "m.v"
    src.write_text(
        "Section S.\nVariable n : nat.\n"
        "Let l : n = n. Proof. by []. Qed.\n"
        "#[local] Lemma a : True. Proof. exact I. Qed.\n"
        "Local Theorem b : True. Proof using. exact I. Defined.\n"
        "Lemma c : True. Proof. Admitted.\n"
        "Lemma d : False. Proof. Abort.\n"
        "Lemma e : True := I.\n"
        "Remark f : True. exact I. Qed.\n"
        "End S.\n"
    )
    lemmas = extract_file(src, tmp_path, "m")
    assert [(lem.name, lem.kind, lem.terminator) for lem in lemmas] == [
        ("a", "Lemma", "Qed."),
        ("b", "Theorem", "Defined."),
        ("f", "Remark", "Qed."),
    ]
    assert lemmas[0].statement == "Lemma a : True." and lemmas[0].metadata == {
        "attributes": "#[local]"
    }
    assert lemmas[1].tactics == ["exact I."] and lemmas[2].tactics == ["exact I."]


@pytest.mark.slow
def test_extract_mathcomp_sources() -> None:
    require_coq()
    files = discover(default_sources())
    start = time.perf_counter()
    lemmas, failed = extract_all(files, workers=2)
    took = time.perf_counter() - start
    mid = sum(3 <= len(lem.tactics) <= 7 for lem in lemmas)
    print(  # noqa: T201
        f"mathcomp ssreflect+algebra: {len(files)} files, {len(lemmas)} lemmas, "
        f"{mid} with 3-7 tactic steps, {len(failed)} files dropped, {took:.2f}s"
    )
    assert len(files) >= 40 and not failed
    assert len(lemmas) >= 8000 and mid >= 500
    add = [lem for lem in lemmas if lem.name == "addnC" and lem.module.endswith("ssrnat")]
    assert len(add) == 1
    addn_c = add[0]
    assert addn_c.module == "mathcomp.ssreflect.ssrnat" and addn_c.file == "ssrnat.v"
    assert any(p.startswith("mathcomp.ssreflect.ssrnat.") for p in addn_c.premises)
    assert any(p.endswith("ssrfun.commutative") for p in addn_c.premises)
    assert "mathcomp.ssreflect.ssrnat.addnC" not in addn_c.premises
    assert any("Notation" in n for n in addn_c.notations)
    for lem in lemmas:
        assert lem.statement.startswith(lem.kind), lem.statement
        assert lem.tactics, lem.name
    # Names repeat across the Modules of a file (order.v): the id includes the Module path.
    assert len({lem.id for lem in lemmas}) == len(lemmas)
    assert addn_c.id == stable_id("mathcomp.ssreflect.ssrnat", "addnC")


@pytest.mark.slow
def test_splitter_matches_coqc_time(tmp_path: Path) -> None:
    require_coq()
    for name in ("binomial.v", "div.v", "tuple.v"):
        work = tmp_path / name[:-2]
        work.mkdir()
        shutil.copy(MATHCOMP_ROOT / "ssreflect" / name, work / name)
        # Compiled under another logical name: no clash with the installed .vo.
        proc = subprocess.run(
            ["coqc", "-time", "-Q", str(work), "mathmilltest", name],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        coq = [(int(a), int(b)) for a, b in re.findall(r"^Chars (\d+) - (\d+) ", proc.stdout, re.M)]
        ours = [(s.start, s.end) for s in split_sentences((work / name).read_text())]
        assert len(coq) > 300
        assert ours == coq, name


# ---------------------------------------------------------------- replay


def _by_name(
    lemmas: list[FormalLemma], outcomes: list[tuple[FormalLemma | None, str | None]]
) -> dict[str, tuple[FormalLemma | None, str | None]]:
    return {lem.name: out for lem, out in zip(lemmas, outcomes, strict=True)}


@pytest.mark.slow
def test_replay_mathcomp_file() -> None:
    require_coq()
    path = MATHCOMP_ROOT / "ssreflect" / "div.v"
    lemmas = extract_file(path, MATHCOMP_ROOT / "ssreflect", "mathcomp.ssreflect.div")
    start = time.perf_counter()
    outcomes = replay_file(path, "mathcomp.ssreflect.div", lemmas, timeout_s=60)
    took = time.perf_counter() - start
    replayed = [lem for lem, err in outcomes if lem is not None]
    dropped = [err for lem, err in outcomes if lem is None]
    print(f"div.v: {len(replayed)} replayed, {len(dropped)} dropped in {took:.1f}s; {dropped[:3]}")  # noqa: T201
    assert len(replayed) >= 0.95 * len(lemmas)
    for lem in replayed:
        assert lem.states is not None and len(lem.states) == len(lem.tactics)
        assert lem.states[0].goals, lem.name
    edivn_eq = next(lem for lem in replayed if lem.name == "edivn_eq")
    assert edivn_eq.states is not None
    first = edivn_eq.states[0].goals[0]
    # The statement's conclusion, as Coq prints it.
    assert "edivn" in first.conclusion and "=" in first.conclusion
    assert all(" : " in h for h in first.hypotheses)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seq.v", "bigop.v"])
def test_replay_files_with_sections_keeps_their_lemmas_types(name: str) -> None:
    """Files whose lemmas live in Sections: a lemma not asked for is replayed for real
    there (Admitted would generalize it over every section variable and break the
    file's later `Arguments` and proofs), so the 3-7-step lemmas all replay.
    """
    require_coq()
    path = MATHCOMP_ROOT / "ssreflect" / name
    module = f"mathcomp.ssreflect.{name.removesuffix('.v')}"
    every = extract_file(path, MATHCOMP_ROOT / "ssreflect", module)
    lemmas = [lem for lem in every if 3 <= len(lem.tactics) <= 7]
    start = time.perf_counter()
    outcomes = replay_file(path, module, lemmas, timeout_s=60)
    took = time.perf_counter() - start
    dropped = [err for lem, err in outcomes if lem is None]
    done = len(lemmas) - len(dropped)
    print(f"{name}: {done} of {len(lemmas)} replayed in {took:.1f}s; {dropped[:2]}")  # noqa: T201
    assert len(lemmas) >= 20
    assert len(dropped) <= 0.05 * len(lemmas), dropped[:3]


@pytest.mark.slow
def test_replay_planted_failures_and_timeout() -> None:
    require_coq()
    lemmas = extract_file(PLANTED, DATA, "planted")
    worker = CoqWorker(timeout_s=2.0)
    try:
        outcomes = replay_file(PLANTED, "planted", lemmas, timeout_s=2.0, worker=worker)
        restarts = worker.restarts
    finally:
        worker.close()
    out = _by_name(lemmas, outcomes)
    print({name: err for name, (_, err) in out.items()})  # noqa: T201
    good, err = out["good_add"]
    assert err is None and good is not None and good.states is not None
    assert len(good.states) == 3
    assert good.states[0].goals[0].conclusion == "n + 0 = n"
    assert good.states[0].goals[0].hypotheses == ["n : nat"]
    assert len(good.states[1].goals) == 2  # after elim: base case and step
    broken, err = out["broken_add"]
    assert broken is None and err is not None
    assert "rewrite mulnC." in err and "does not match" in err  # Coq's own message
    uses, err = out["uses_broken"]
    assert err is None and uses is not None  # the broken one was admitted
    loops, err = out["loops"]
    assert loops is None and err is not None and "timeout" in err
    assert restarts >= 1
    assert out["after_loop"][1] is None  # replayed after the restart
    bullets, err = out["bullets"]
    assert err is None and bullets is not None and bullets.states is not None
    assert [len(s.goals) for s in bullets.states] == [1, 2, 1]
    assert bullets.states[2].goals[0].conclusion == "Q"


@pytest.mark.slow
def test_replay_survives_a_crash() -> None:
    require_coq()
    lemmas = extract_file(PLANTED, DATA, "planted")
    lemmas = [lem for lem in lemmas if lem.name != "loops"]
    worker = CoqWorker(timeout_s=10.0)
    pids: list[int | None] = []

    def kill(lemma: FormalLemma, step: int, w: CoqWorker) -> None:
        if lemma.name == "uses_broken" and step == 1 and not pids:
            pids.append(w.pid)
            assert w._proc is not None
            w._proc.kill()
            w._proc.wait()

    try:
        outcomes = replay_file(
            PLANTED, "planted", lemmas, timeout_s=10.0, worker=worker, on_step=kill
        )
        assert worker.restarts >= 1 and worker.pid != pids[0]
    finally:
        worker.close()
    out = _by_name(lemmas, outcomes)
    print({name: err for name, (_, err) in out.items()})  # noqa: T201
    assert pids, "the hook never ran"
    assert out["broken_add"][0] is None
    for name in ("good_add", "uses_broken", "after_loop", "bullets"):
        assert out[name][1] is None, out[name]


@pytest.mark.slow
def test_replay_missing_library_fails_the_rest(tmp_path: Path) -> None:
    require_coq()
    src = tmp_path / "missing.v"
    src.write_text(
        "From mathcomp Require Import ssreflect ssrnat.\n"
        "Lemma first n : n + 0 = n. Proof. by rewrite addn0. Qed.\n"
        "From mathcomp Require Import no_such_library_here.\n"
        "Lemma second n : 0 + n = n. Proof. by []. Qed.\n"
        "Lemma third : True. Proof. exact I. Qed.\n"
    )
    lemmas = extract_file(src, tmp_path, "missing")
    outcomes = replay_file(src, "missing", lemmas, timeout_s=30)
    assert outcomes[0].error is None
    for lem, err in outcomes[1:]:
        assert lem is None and err is not None
        assert "no_such_library_here" in err


def test_worker_add_goals_edit_at() -> None:
    require_coq()
    with CoqWorker(timeout_s=30) as w:
        root = w.tip
        w.add("Lemma t (P : Prop) (p : P) : P /\\ True.")
        after = w.tip
        goals = w.goals()
        assert goals is not None
        assert goals.fg[0].conclusion == "P /\\ True"
        assert goals.fg[0].hypotheses == ["P : Prop", "p : P"]
        with pytest.raises(Exception, match="not found"):
            w.add("exact no_such_term.")
        assert w.tip == after  # back where it was
        w.add("split.")
        w.edit_at(after)
        goals = w.goals()
        assert goals is not None and len(goals.fg) == 1
        w.edit_at(root)
        assert w.goals() is None
