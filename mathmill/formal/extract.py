"""Extraction of lemmas from Coq ``.v`` files: a sentence splitter that agrees with
Coq's (byte offsets, comments, strings, bullets), the lemmas whose proofs end in
``Qed.``/``Defined.`` with their tactic steps, the file's notations, and premises
from the ``.glob`` file next to the source.

>>> [s.text for s in split_sentences('Lemma a : True. (* c. *)\\nProof. - exact I. Qed.')]
['Lemma a : True.', 'Proof.', '-', 'exact I.', 'Qed.']
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mathmill.errors import ExtractError
from mathmill.records import FormalLemma, stable_id

__all__ = [
    "LEMMA_KINDS",
    "MATHCOMP_ROOT",
    "ExtractError",
    "LemmaBlock",
    "Sentence",
    "default_sources",
    "discover",
    "extract_all",
    "extract_file",
    "in_section",
    "inner_modules",
    "is_bullet",
    "parse_blocks",
    "read_glob",
    "split_sentences",
]

LEMMA_KINDS = (
    "Lemma",
    "Theorem",
    "Corollary",
    "Fact",
    "Remark",
    "Proposition",
    "Property",
)
"""The statement keywords extracted as lemmas."""

MATHCOMP_ROOT = Path("/usr/lib/ocaml/coq/user-contrib/mathcomp")
"""Where Debian's libcoq-mathcomp installs its sources, ``.vo`` and ``.glob`` files."""


@dataclass(frozen=True)
class Sentence:
    """One Coq sentence: its text and UTF-8 byte range ``[start, end)`` in the file."""

    text: str
    start: int
    end: int
    line: int


@dataclass
class LemmaBlock:
    """A statement with a proof: indices into the file's sentence list.

    ``steps`` groups the proof's tactic sentences: an opening brace or a bullet goes
    with the tactic that follows it, a closing brace with the tactic before it.
    """

    kind: str
    name: str
    statement: int
    proof_start: int | None
    terminator: int
    steps: list[list[int]] = field(default_factory=list)
    attributes: str = ""
    is_lemma: bool = True

    @property
    def proof_indices(self) -> range:
        """Every sentence of the proof, terminator included."""
        return range(self.statement + 1, self.terminator + 1)


_BLANK = frozenset(b" \t\n\r\x0c")
_SPECIAL = re.compile(rb'\(\*|"|\.')
_COMMENT_TOKENS = re.compile(rb'\(\*|\*\)|"')
_BULLET = re.compile(rb"(-+|\++|\*+)(?=[\s(\[{a-zA-Z_]|$)")


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def _skip_string(data: bytes, i: int, what: str) -> int:
    """``i`` is just after an opening quote; the index just after the closing one."""
    n = len(data)
    while True:
        j = data.find(b'"', i)
        if j < 0:
            raise ExtractError(what, i - 1)
        if j + 1 < n and data[j + 1] == 0x22:
            i = j + 2
            continue
        return j + 1


def _skip_comment(data: bytes, i: int) -> int:
    """``i`` is just after ``(*``; the index just after the matching ``*)``."""
    start = i - 2
    depth = 1
    while depth:
        m = _COMMENT_TOKENS.search(data, i)
        if m is None:
            raise ExtractError("comment", start)
        tok = m.group()
        if tok == b"(*":
            depth += 1
            i = m.end()
        elif tok == b"*)":
            depth -= 1
            i = m.end()
        else:
            try:
                i = _skip_string(data, m.end(), "string in comment")
            except ExtractError as exc:
                raise ExtractError("comment", start) from exc
    return i


def _split_bytes(data: bytes) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    n = len(data)
    i = 0
    while True:
        # Skip blanks and comments between sentences.
        while i < n:
            c = data[i]
            if c in _BLANK:
                i += 1
            elif data.startswith(b"(*", i):
                i = _skip_comment(data, i + 2)
            else:
                break
        if i >= n:
            return spans
        start = i
        c = data[i]
        if c in (0x7B, 0x7D):  # { }
            spans.append((i, i + 1))
            i += 1
            continue
        m = _BULLET.match(data, i)
        if m is not None:
            spans.append((i, m.end()))
            i = m.end()
            continue
        while True:
            m2 = _SPECIAL.search(data, i)
            if m2 is None:
                raise ExtractError("sentence (no final '.')", start)
            tok = m2.group()
            if tok == b"(*":
                i = _skip_comment(data, m2.end())
            elif tok == b'"':
                i = _skip_string(data, m2.end(), "string")
            else:
                j = m2.start()
                nxt = j + 1
                if (nxt >= n or data[nxt] in _BLANK) and (j == 0 or data[j - 1] != 0x2E):
                    spans.append((start, nxt))
                    i = nxt
                    break
                i = nxt


def _split(data: bytes, where: str) -> list[Sentence]:
    try:
        spans = _split_bytes(data)
    except ExtractError as exc:
        pos = exc.pos or 0
        raise ExtractError(f"{where}:{_line_of(data, pos)}: unterminated {exc}") from None
    out: list[Sentence] = []
    line = 1
    last = 0
    for start, end in spans:
        line += data.count(b"\n", last, start)
        last = start
        try:
            text = data[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise ExtractError(f"{where}:{line}: bytes that are not UTF-8") from None
        out.append(Sentence(text, start, end, line))
    return out


def split_sentences(text: str) -> list[Sentence]:
    """Split Coq source into sentences, as Coq does: a sentence ends at a ``.`` followed
    by a blank or the end of the file (not ``..``), never inside a comment (they nest)
    or a string (``""`` escapes); bullets (``-``, ``+``, ``*``, repeated) and braces at
    the start of a sentence are sentences of their own. Offsets are UTF-8 bytes.

    Raises :class:`ExtractError` for an unterminated comment, string or sentence.
    """
    return _split(text.encode("utf-8"), "<text>")


# ---------------------------------------------------------------- lemma blocks

_ATTRS = re.compile(
    r"(?:#\[[^\]]*\]\s*|(?:Local|Global|Polymorphic|Monomorphic|Private|Program)\s+)*"
)
_IDENT = r"[^\W\d][\w']*"
_STATEMENT = re.compile(
    r"(Lemma|Theorem|Corollary|Fact|Remark|Proposition|Property|Definition|Let|Example"
    r"|Fixpoint|CoFixpoint|Instance|Goal)\b\s*(" + _IDENT + ")?"
)
_TERMINATORS = ("Qed.", "Defined.", "Admitted.", "Abort.")
_TERMINATOR = re.compile(r"(Qed|Defined|Admitted|Abort(?:\s+All)?|Save\s+" + _IDENT + r")\s*\.$")
# Sentences that cannot be inside a proof: seeing one means the statement had no proof.
_TOPLEVEL = re.compile(
    r"(?:#\[[^\]]*\]\s*|(?:Local|Global|Polymorphic|Program)\s+)*"
    r"(Lemma|Theorem|Corollary|Fact|Remark|Proposition|Property|Definition|Let|Example"
    r"|Fixpoint|CoFixpoint|Inductive|CoInductive|Variant|Record|Structure|Class"
    r"|Instance|Section|End|Module|Goal|Canonical|Coercion|Variable|Variables"
    r"|Hypothesis|Hypotheses|Context|Notation|Infix|Require|From|Import|Export)\b"
)
_PROOF = re.compile(r"Proof\b(?!\s+(?!using\b|with\b)[^\s.])")
_NOTATION = re.compile(
    r"(?:#\[[^\]]*\]\s*|(?:Local|Global)\s+)*(?:Reserved\s+)?(?:Notation|Infix)\b"
)


def is_bullet(text: str) -> bool:
    """Whether a sentence is a bullet or a brace (it focuses, it runs no tactic)."""
    return text in ("{", "}") or bool(re.fullmatch(r"-+|\++|\*+", text))


def parse_blocks(sentences: Sequence[Sentence]) -> list[LemmaBlock]:
    """Every statement followed by a proof (up to ``Qed.``, ``Defined.``, ``Admitted.``,
    ``Abort.`` or ``Save``): lemma kinds, and also definitions, ``Let``, instances and
    ``Goal`` opened in proof mode (``is_lemma`` False for those).
    """
    blocks: list[LemmaBlock] = []
    i = 0
    n = len(sentences)
    while i < n:
        text = sentences[i].text
        attrs = _ATTRS.match(text)
        rest = text[attrs.end() :] if attrs else text
        m = _STATEMENT.match(rest)
        if m is None:
            i += 1
            continue
        j = i + 1
        term: int | None = None
        while j < n:
            t = sentences[j].text
            if _TERMINATOR.match(t):
                term = j
                break
            if _TOPLEVEL.match(t) or _STATEMENT.match(t):
                break
            j += 1
        if term is None:
            i = max(j, i + 1)
            continue
        kind = m.group(1)
        name = m.group(2) or ""
        proof_start: int | None = None
        k = i + 1
        if k < term and _PROOF.match(sentences[k].text):
            proof_start = k
            k += 1
        steps: list[list[int]] = []
        pending: list[int] = []
        for idx in range(k, term):
            t = sentences[idx].text
            if t == "}" and steps and not pending:
                steps[-1].append(idx)
            elif is_bullet(t):
                pending.append(idx)
            else:
                steps.append([*pending, idx])
                pending = []
        if pending:
            if steps:
                steps[-1].extend(pending)
            else:
                steps.append(pending)
        blocks.append(
            LemmaBlock(
                kind=kind,
                name=name,
                statement=i,
                proof_start=proof_start,
                terminator=term,
                steps=steps,
                attributes=text[: attrs.end()].strip() if attrs else "",
                is_lemma=kind in LEMMA_KINDS and bool(name),
            )
        )
        i = term + 1
    return blocks


def step_text(sentences: Sequence[Sentence], step: Sequence[int]) -> str:
    """A tactic step's text: its sentences joined by a space (``- by rewrite addnC.``)."""
    return " ".join(sentences[i].text for i in step)


# ---------------------------------------------------------------- glob premises

_SKIP_KINDS = frozenset({"var", "not", "lib", "mod", "sec", "modtype", "binder"})
_GLOB_REF = re.compile(r"R(\d+):(\d+) (\S+) (\S+) (\S+) (\S+)$")


def read_glob(path: Path) -> list[tuple[int, str, str]]:
    """The references of a ``.glob`` file: ``(byte position, qualified name, kind)``
    sorted by position; notations, variables and library/module names left out.
    """
    refs: list[tuple[int, str, str]] = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.startswith("R"):
                continue
            m = _GLOB_REF.match(line.rstrip("\n"))
            if m is None or m.group(6) in _SKIP_KINDS:
                continue
            lib, sec, ident = m.group(3), m.group(4), m.group(5)
            qual = f"{lib}.{ident}" if sec == "<>" else f"{lib}.{sec}.{ident}"
            refs.append((int(m.group(1)), qual, m.group(6)))
    refs.sort(key=lambda r: r[0])
    return refs


_MODULE_OPEN = re.compile(
    r"(?:#\[[^\]]*\]\s*|(?:Local|Global)\s+)*(Module|Section)\s+(?:(?:Type|Import|Export)\s+)?"
    r"(" + _IDENT + r")([^.]*)\.$",
    re.S,
)
_END = re.compile(r"End\s+(" + _IDENT + r")\s*\.$")


def _scopes(sentences: Sequence[Sentence]) -> list[tuple[tuple[str, str], ...]]:
    """For each sentence, the ``Module``s and ``Section``s it is in, outermost first,
    as ``(kind, name)``.
    """
    stack: list[tuple[str, str]] = []
    out: list[tuple[tuple[str, str], ...]] = []
    for s in sentences:
        out.append(tuple(stack))
        m = _MODULE_OPEN.match(s.text)
        if m is not None:
            if ":=" not in m.group(3):
                stack.append((m.group(1), m.group(2)))
            continue
        e = _END.match(s.text)
        if e is not None:
            for k in range(len(stack) - 1, -1, -1):
                if stack[k][1] == e.group(1):
                    del stack[k:]
                    break
    return out


def inner_modules(sentences: Sequence[Sentence]) -> list[str]:
    """For each sentence, the path of the Coq ``Module``s it is in (sections left out),
    e.g. ``Order.POrderTheory``; empty at the file's top level.
    """
    return [".".join(n for kind, n in scope if kind == "Module") for scope in _scopes(sentences)]


def in_section(sentences: Sequence[Sentence]) -> list[bool]:
    """For each sentence, whether it is inside a ``Section`` (where ``Admitted``
    generalizes over every section variable, unlike ``Qed``: not a drop-in stand-in).
    """
    return [any(kind == "Section" for kind, _ in scope) for scope in _scopes(sentences)]


def _premises(
    refs: list[tuple[int, str, str]], positions: list[int], start: int, end: int, own: str
) -> list[str]:
    lo = bisect.bisect_left(positions, start)
    hi = bisect.bisect_left(positions, end)
    seen: dict[str, None] = {}
    for _, qual, _ in refs[lo:hi]:
        if qual != own:
            seen.setdefault(qual, None)
    return list(seen)


# ---------------------------------------------------------------- files


def read_source(path: Path) -> tuple[bytes, list[Sentence]]:
    """A file's bytes and sentences; :class:`ExtractError` when it cannot be split."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExtractError(f"{path}: cannot read: {exc}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = _line_of(data, exc.start)
        raise ExtractError(f"{path}:{line}: bytes that are not UTF-8") from None
    return data, _split(data, str(path))


def extract_file(path: Path, root: Path, module: str) -> list[FormalLemma]:
    """The lemmas of one ``.v`` file whose proofs end in ``Qed.`` or ``Defined.``.

    ``module`` is the file's logical path (``mathcomp.ssreflect.ssrnat``), ``root``
    the directory ``file`` is made relative to. Premises come from the ``.glob`` next
    to the file, when there is one. Raises :class:`ExtractError` for a file that
    cannot be parsed.
    """
    data, sentences = read_source(path)
    blocks = parse_blocks(sentences)
    inner = inner_modules(sentences)
    notations = [s.text for s in sentences if _NOTATION.match(s.text)]
    glob = path.with_suffix(".glob")
    refs = read_glob(glob) if glob.is_file() else []
    positions = [r[0] for r in refs]
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix()
    out: list[FormalLemma] = []
    for b in blocks:
        term = sentences[b.terminator]
        terminator = term.text.split()[0].rstrip(".") + "."
        if not b.is_lemma or terminator not in ("Qed.", "Defined."):
            continue
        st = sentences[b.statement]
        statement = st.text[len(b.attributes) :].lstrip() if b.attributes else st.text
        proof = data[st.end : term.end].decode("utf-8").strip()
        metadata: dict[str, str] = {"attributes": b.attributes} if b.attributes else {}
        if inner[b.statement]:
            metadata["inner_module"] = inner[b.statement]
        out.append(
            FormalLemma(
                id=stable_id(module, f"{inner[b.statement]}.{b.name}".lstrip(".")),
                name=b.name,
                kind=b.kind,
                module=module,
                file=rel,
                line=st.line,
                start=st.start,
                end=term.end,
                statement=statement,
                proof=proof,
                tactics=[step_text(sentences, step) for step in b.steps],
                terminator=terminator,
                notations=notations,
                premises=_premises(refs, positions, st.start, term.end, f"{module}.{b.name}"),
                metadata=dict(metadata),
            )
        )
    return out


def default_sources() -> list[tuple[Path, str]]:
    """The installed mathcomp ``ssreflect`` and ``algebra`` sources with their logical
    prefixes.
    """
    return [
        (MATHCOMP_ROOT / "ssreflect", "mathcomp.ssreflect"),
        (MATHCOMP_ROOT / "algebra", "mathcomp.algebra"),
    ]


def discover(dirs: Sequence[tuple[Path, str]]) -> list[tuple[Path, Path, str]]:
    """``(file, root, module)`` for every ``.v`` under each ``(dir, prefix)``, sorted;
    the module is the prefix and the file's path under ``dir`` (``a/b.v`` -> ``P.a.b``).
    """
    out: list[tuple[Path, Path, str]] = []
    for root, prefix in dirs:
        for f in sorted(root.rglob("*.v")):
            parts = f.relative_to(root).with_suffix("").parts
            module = ".".join([prefix, *parts]) if prefix else ".".join(parts)
            out.append((f, root, module))
    return out


def _extract_one(item: tuple[Path, Path, str]) -> tuple[list[FormalLemma], str | None]:
    path, root, module = item
    try:
        return extract_file(path, root, module), None
    except ExtractError as exc:
        return [], str(exc)


def extract_all(
    files: Sequence[tuple[Path, Path, str]], workers: int = 1
) -> tuple[list[FormalLemma], list[tuple[str, str]]]:
    """Extract every file (``(file, root, module)`` from :func:`discover`), over a pool
    of ``workers`` processes (inline when 1). Returns the lemmas in file order and
    ``(file, reason)`` for the files that could not be parsed.
    """
    if workers <= 1 or len(files) <= 1:
        results = [_extract_one(item) for item in files]
    else:
        import multiprocessing

        # forkserver: the caller is a threaded flow process (Prefect, maybe vLLM)
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = list(pool.map(_extract_one, files, chunksize=1))
    lemmas: list[FormalLemma] = []
    failed: list[tuple[str, str]] = []
    for (path, _, _), (found, error) in zip(files, results, strict=True):
        lemmas.extend(found)
        if error is not None:
            failed.append((str(path), error))
    return lemmas, failed
