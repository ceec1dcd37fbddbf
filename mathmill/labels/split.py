"""Quality filters and train/validation/test splits of labelled rows, in polars.

A row is one training example with at least ``id``, ``cluster_id`` (its near-duplicate
cluster, e.g. from :func:`mathmill.curate.neardup.cluster`; None for a row in no
cluster), ``bucket`` (a difficulty rung or ``"unsolved"``; may be None), ``domain`` (may
be None) and ``tokens`` (solution length; may be None), plus the flags the filters read
(``leaking``). :func:`to_frame` turns dicts or pydantic rows into a DataFrame.

:func:`apply_filters` drops rows by :class:`FilterConfig`, naming one reason per dropped
row; :func:`assign_splits` adds a ``split`` column by :class:`SplitConfig`, keeping every
cluster in one split and each stratum's row proportions close to the targets;
:func:`split_report` tells how close. Everything is vectorized except the greedy
assignment, one Python step per cluster (1M rows in a few seconds: ``bench/split.py``).

>>> df = pl.DataFrame({
...     "id": [f"r{i}" for i in range(6)],
...     "cluster_id": ["a", "a", "b", None, None, "c"],
...     "bucket": ["easy", "easy", "unsolved", "hard", "hard", "easy"],
...     "domain": ["algebra"] * 6,
...     "tokens": [100, 120, 90, None, 110, 95],
...     "leaking": [False, False, False, False, True, False],
... })
>>> kept, removed = apply_filters(df, FilterConfig(outlier_iqr=None))
>>> removed["id"].to_list(), removed["reason"].to_list(), reason_counts(removed)
(['r2', 'r4'], ['unsolved', 'leaking'], {'unsolved': 1, 'leaking': 1})
>>> out = assign_splits(kept, SplitConfig(seed=7))
>>> out.filter(pl.col("cluster_id") == "a")["split"].n_unique()
1
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, Self

import polars as pl
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "REASONS",
    "SPLITS",
    "UNSOLVED",
    "FilterConfig",
    "Split",
    "SplitConfig",
    "apply_filters",
    "assign_splits",
    "reason_counts",
    "split_report",
    "to_frame",
]

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
UNSOLVED = "unsolved"
#: Fixed reasons in the order the filters run (``missing_<label>`` sit between leaking
#: and the length filters, in ``require_labels`` order).
REASONS: tuple[str, ...] = ("unsolved", "leaking", "missing_<label>", "too_short", "too_long")

_NO_CLUSTER = "\x00"  # prefix of the cluster key of a row without a cluster: its own id
_TIE = 1e-9
_U64 = 0xFFFF_FFFF_FFFF_FFFF


def to_frame(rows: Iterable[Mapping[str, Any] | BaseModel]) -> pl.DataFrame:
    """A DataFrame of dicts or pydantic rows (dumped with ``model_dump()``); the schema is
    inferred from every row, so a column that is None at first still gets its type.
    """
    dicts = [r.model_dump() if isinstance(r, BaseModel) else dict(r) for r in rows]
    return pl.DataFrame(dicts, infer_schema_length=None)


def _require(df: pl.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; the frame has {df.columns}")


# --------------------------------------------------------------------------- filters


class FilterConfig(BaseModel):
    """Which rows :func:`apply_filters` drops. Every filter can be switched off.

    The filters run in this order and a dropped row's ``reason`` is the first that fails:

    1. ``drop_unsolved``: ``bucket == "unsolved"`` -> ``"unsolved"``;
    2. ``drop_leaking``: the boolean ``leaking`` is true -> ``"leaking"`` (null: not
       leaking);
    3. ``require_labels``, in list order: the column is null -> ``"missing_<label>"``;
    4. ``min_tokens`` / ``max_tokens``: ``tokens`` below / above -> ``"too_short"`` /
       ``"too_long"``;
    5. ``outlier_iqr`` = k: ``tokens`` outside ``[Q1 - k*IQR, Q3 + k*IQR]`` ->
       ``"too_short"`` / ``"too_long"``. The quartiles (linear interpolation) are those
       of the rows that pass 1-4, per ``outlier_by`` group (one group when empty); a
       group with fewer than ``outlier_min_rows`` token counts is not IQR-filtered.

    A row whose ``tokens`` is null is never length-filtered. A column a switched-on
    filter reads must exist (``bucket``, ``leaking``, ``tokens``, the labels).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    drop_unsolved: bool = Field(True, description='Drop rows whose bucket is "unsolved".')
    drop_leaking: bool = Field(True, description="Drop rows whose `leaking` flag is true.")
    require_labels: list[str] = Field(
        default_factory=list,
        description='Columns that must not be null, e.g. ["domain", "bucket"].',
    )
    min_tokens: int | None = Field(None, ge=0, description="Drop rows with fewer tokens.")
    max_tokens: int | None = Field(None, ge=0, description="Drop rows with more tokens.")
    outlier_iqr: float | None = Field(
        3.0, gt=0, description="Tukey fence multiplier k for token-count outliers; None: off."
    )
    outlier_by: list[str] = Field(
        default_factory=list,
        description="Columns whose groups get their own quartiles (e.g. ['bucket']).",
    )
    outlier_min_rows: int = Field(
        20, ge=1, description="Fewest token counts in a group for the IQR rule to apply."
    )

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if (
            self.min_tokens is not None
            and self.max_tokens is not None
            and self.min_tokens > self.max_tokens
        ):
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")
        return self


def apply_filters(df: pl.DataFrame, cfg: FilterConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``df`` into (kept, removed) by ``cfg``; both keep the input order, and
    ``removed`` has one more column, ``reason`` (see :class:`FilterConfig` for the order
    that names it; :func:`reason_counts` counts them).
    """
    if "reason" in df.columns:
        raise ValueError('the input already has a "reason" column')
    length = any(x is not None for x in (cfg.min_tokens, cfg.max_tokens, cfg.outlier_iqr))
    _require(
        df,
        [
            *(["bucket"] if cfg.drop_unsolved else []),
            *(["leaking"] if cfg.drop_leaking else []),
            *cfg.require_labels,
            *(["tokens"] if length else []),
            *(cfg.outlier_by if cfg.outlier_iqr is not None else []),
        ],
        "apply_filters",
    )
    rules: list[tuple[pl.Expr, str]] = []
    if cfg.drop_unsolved:
        rules.append((pl.col("bucket").cast(pl.String) == UNSOLVED, "unsolved"))
    if cfg.drop_leaking:
        rules.append((pl.col("leaking").cast(pl.Boolean).fill_null(False), "leaking"))
    rules.extend((pl.col(c).is_null(), f"missing_{c}") for c in cfg.require_labels)
    tokens = pl.col("tokens").cast(pl.Float64) if length else pl.lit(None, pl.Float64)
    if cfg.min_tokens is not None:
        rules.append((tokens < cfg.min_tokens, "too_short"))
    if cfg.max_tokens is not None:
        rules.append((tokens > cfg.max_tokens, "too_long"))

    reason: pl.Expr = pl.lit(None, pl.String)
    if rules:
        for cond, name in reversed(rules):  # built inside out: the first rule wins
            reason = pl.when(cond.fill_null(False)).then(pl.lit(name)).otherwise(reason)
    out = df.with_columns(reason.alias("reason"))

    if cfg.outlier_iqr is not None and out.height:
        k = cfg.outlier_iqr
        sample = pl.when(pl.col("reason").is_null()).then(tokens)

        def per_group(e: pl.Expr) -> pl.Expr:
            return e.over(cfg.outlier_by) if cfg.outlier_by else e

        q1 = per_group(sample.quantile(0.25, interpolation="linear"))
        q3 = per_group(sample.quantile(0.75, interpolation="linear"))
        n = per_group(sample.count())
        out = (
            out.with_columns(q1.alias("__q1"), q3.alias("__q3"), n.alias("__n"))
            .with_columns(
                pl.when(pl.col("reason").is_not_null() | (pl.col("__n") < cfg.outlier_min_rows))
                .then(pl.col("reason"))
                .when(tokens < pl.col("__q1") - k * (pl.col("__q3") - pl.col("__q1")))
                .then(pl.lit("too_short"))
                .when(tokens > pl.col("__q3") + k * (pl.col("__q3") - pl.col("__q1")))
                .then(pl.lit("too_long"))
                .otherwise(pl.col("reason"))
                .alias("reason")
            )
            .drop("__q1", "__q3", "__n")
        )
    kept = out.filter(pl.col("reason").is_null()).drop("reason")
    removed = out.filter(pl.col("reason").is_not_null())
    return kept, removed


def reason_counts(removed: pl.DataFrame) -> dict[str, int]:
    """Rows per ``reason`` of :func:`apply_filters`' removed frame, in filter order
    (``missing_*`` between ``leaking`` and the length reasons, alphabetically).
    """
    if removed.height == 0:
        return {}
    counts = removed.group_by("reason").len()
    found = dict(zip(counts["reason"].to_list(), counts["len"].to_list(), strict=True))

    def rank(r: str) -> tuple[int, str]:
        if r.startswith("missing_"):
            return (2, r)
        return (REASONS.index(r) if r in REASONS else len(REASONS), r)

    return {r: found[r] for r in sorted(found, key=rank)}


# --------------------------------------------------------------------------- splits


class SplitConfig(BaseModel):
    """Target split fractions, the stratification columns and the seed of
    :func:`assign_splits`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    train: float = Field(0.8, ge=0.0, le=1.0, description="Fraction of rows in train.")
    validation: float = Field(0.1, ge=0.0, le=1.0, description="Fraction in validation.")
    test: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of rows in test.")
    stratify_by: list[str] = Field(
        default_factory=lambda: ["bucket", "domain"],
        description="Columns whose value combinations are the strata; [] for none.",
    )
    seed: int = Field(0, description="Seeds the cluster order and the tie-breaks.")

    @model_validator(mode="after")
    def _fractions(self) -> Self:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + validation + test must be 1, not {total:g} "
                f"({self.train:g} + {self.validation:g} + {self.test:g})"
            )
        if len(set(self.stratify_by)) != len(self.stratify_by):
            raise ValueError(f"stratify_by repeats a column: {self.stratify_by}")
        if "split" in self.stratify_by:
            raise ValueError('cannot stratify by "split", the column assign_splits writes')
        return self

    @property
    def fractions(self) -> dict[Split, float]:
        """The targets by split name."""
        return {"train": self.train, "validation": self.validation, "test": self.test}


def _cluster_key(df: pl.DataFrame) -> pl.Expr:
    if df.filter(pl.col("cluster_id").is_null() & pl.col("id").is_null()).height:
        raise ValueError("a row with neither cluster_id nor id cannot be placed")
    return (
        pl.when(pl.col("cluster_id").is_null())
        .then(pl.concat_str(pl.lit(_NO_CLUSTER), pl.col("id").cast(pl.String)))
        .otherwise(pl.col("cluster_id").cast(pl.String))
    )


def _h(seed: int, text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8"), seed=seed & _U64)


def _label(columns: list[str], values: Iterable[Any]) -> str:
    return ", ".join(f"{c}={v}" for c, v in zip(columns, values, strict=True)) or "all"


def assign_splits(df: pl.DataFrame, cfg: SplitConfig) -> pl.DataFrame:
    """``df`` with a ``split`` column (``"train"``, ``"validation"`` or ``"test"``), rows in
    input order; an existing ``split`` column is replaced.

    * **Clusters.** Rows with the same ``cluster_id`` always share a split; a row whose
      ``cluster_id`` is null is a cluster of its own (keyed by its ``id``).
    * **Strata.** A cluster's stratum is the ``stratify_by`` values of its *first row by
      id* (the smallest ``id``; ties by those values), so it does not depend on the
      input order. Null is a value like any other.
    * **Greedy.** Strata are taken largest first (ties by a seeded hash of their label);
      within one, clusters largest first (ties by a seeded hash of the cluster key, then
      the key). Each cluster goes to the split with the largest *deficit*, the rows it
      is short of its target (``fraction * rows``); a tie goes to the split ranked first
      by a seeded per-stratum order. A split with fraction 0 gets nothing.
    * **Carry.** The deficits are cumulative: what a stratum could not hit exactly
      (rounding, whole clusters) is carried into the next one's. A large stratum starts
      about one row off its targets at most; a **small stratum** (too few rows or
      clusters to split, e.g. one row) goes, cluster by cluster, to whichever split
      the strata before it have left shortest: mostly train, validation and test in
      turn roughly in proportion, so the overall proportions stay within about a row
      of the targets instead of every tiny stratum rounding to train.

    The result is a function of the rows (as a set), ``cfg.seed`` and the fractions.
    """
    _require(df, ["id", "cluster_id", *cfg.stratify_by], "assign_splits")
    if "split" in df.columns:
        df = df.drop("split")
    if df.height == 0:
        return df.with_columns(pl.lit(None, pl.String).alias("split"))
    strat = list(cfg.stratify_by)
    rows = df.select(_cluster_key(df).alias("__k"), pl.col("id"), *[pl.col(c) for c in strat]).sort(
        ["__k", "id", *strat], nulls_last=True
    )
    clusters = rows.group_by("__k", maintain_order=True).agg(
        pl.len().alias("__n"), *[pl.col(c).first() for c in strat]
    )

    # Strata: largest first, ties by a seeded hash of the label.
    if strat:
        strata = clusters.group_by(strat).agg(pl.col("__n").sum().alias("__rows"))
    else:
        strata = pl.DataFrame({"__rows": [int(clusters["__n"].sum())]})
    labels = [_label(strat, r) for r in strata.select(strat).iter_rows()] if strat else ["all"]
    strata = strata.with_columns(
        pl.Series("__label", labels, dtype=pl.String),
        pl.Series("__sh", [_h(cfg.seed, f"stratum\x1f{x}") for x in labels], dtype=pl.UInt64),
    ).sort(["__rows", "__sh", "__label"], descending=[True, False, False])
    strata = strata.with_row_index("__s")
    if strat:
        clusters = clusters.join(
            strata.select("__s", *strat), on=strat, how="left", nulls_equal=True
        )
    else:
        clusters = clusters.with_columns(pl.lit(0, pl.UInt32).alias("__s"))
    keys = clusters["__k"].to_list()
    clusters = clusters.with_columns(
        pl.Series("__ch", [_h(cfg.seed, k) for k in keys], dtype=pl.UInt64)
    ).sort(["__s", "__n", "__ch", "__k"], descending=[False, True, False, False])

    fractions = [cfg.train, cfg.validation, cfg.test]
    active = [i for i, f in enumerate(fractions) if f > 0]
    stratum_rows = strata["__rows"].to_list()
    stratum_labels = strata["__label"].to_list()
    sizes = clusters["__n"].to_list()
    sidx = clusters["__s"].to_list()
    chosen = _greedy(sizes, sidx, stratum_rows, stratum_labels, fractions, active, cfg.seed)

    names = pl.Series("split", [SPLITS[i] for i in chosen], dtype=pl.String)
    table = clusters.select("__k").with_columns(names)
    return (
        df.with_columns(_cluster_key(df).alias("__k"))
        .join(table, on="__k", how="left", maintain_order="left")
        .drop("__k")
    )


def _greedy(
    sizes: list[int],
    sidx: list[int],
    stratum_rows: list[int],
    stratum_labels: list[str],
    fractions: list[float],
    active: list[int],
    seed: int,
) -> list[int]:
    """The split index of each cluster (given sorted by stratum, then processing order)."""
    deficit = [0.0, 0.0, 0.0]
    chosen: list[int] = []
    current = -1
    order = active
    for size, s in zip(sizes, sidx, strict=True):
        if s != current:  # a new stratum: add its targets, rank its splits for ties
            current = s
            n = stratum_rows[s]
            for i in active:
                deficit[i] += fractions[i] * n
            label = stratum_labels[s]
            order = sorted(active, key=lambda i: _h(seed, f"tie\x1f{label}\x1f{i}"))
        best = order[0]
        top = deficit[best]
        for i in order[1:]:
            if deficit[i] > top + _TIE:
                best, top = i, deficit[i]
        deficit[best] -= size
        chosen.append(best)
    return chosen


def split_report(df: pl.DataFrame, cfg: SplitConfig | None = None) -> list[dict[str, Any]]:
    """Per stratum of ``cfg.stratify_by`` (by each row's own values; sorted by label),
    then one ``"all"`` entry: ``stratum`` (label), ``values``, ``rows``, ``clusters``
    (distinct clusters with a row there), ``straddling`` (of those, clusters whose rows
    are in more than one split: 0 after :func:`assign_splits`), ``target`` and
    ``achieved`` fractions and ``counts`` per split. ``df`` needs a ``split`` column.
    """
    cfg = cfg or SplitConfig()
    strat = list(cfg.stratify_by)
    _require(df, ["id", "cluster_id", "split", *strat], "split_report")
    target = {s: float(f) for s, f in cfg.fractions.items()}
    if df.height == 0:
        empty = {s: 0 for s in SPLITS}
        return [
            {
                "stratum": "all",
                "values": {},
                "rows": 0,
                "clusters": 0,
                "straddling": 0,
                "target": target,
                "achieved": {s: 0.0 for s in SPLITS},
                "counts": empty,
            }
        ]
    frame = df.select(
        _cluster_key(df).alias("__k"), pl.col("split").cast(pl.String), *[pl.col(c) for c in strat]
    ).with_columns((pl.col("split").n_unique().over("__k") > 1).alias("__straddle"))

    def entry(label: str, values: dict[str, Any], part: pl.DataFrame) -> dict[str, Any]:
        counts = dict(part.group_by("split").len().iter_rows())
        n = part.height
        by_cluster = part.group_by("__k").agg(pl.col("__straddle").first())
        return {
            "stratum": label,
            "values": values,
            "rows": n,
            "clusters": by_cluster.height,
            "straddling": int(by_cluster["__straddle"].sum()),
            "target": target,
            "achieved": {s: (counts.get(s, 0) / n if n else 0.0) for s in SPLITS},
            "counts": {s: int(counts.get(s, 0)) for s in SPLITS},
        }

    out: list[dict[str, Any]] = []
    if strat:
        parts = frame.partition_by(strat, as_dict=True, maintain_order=True)
        entries = [
            entry(_label(strat, key), dict(zip(strat, key, strict=True)), part)
            for key, part in parts.items()
        ]
        out.extend(sorted(entries, key=lambda e: str(e["stratum"])))
    out.append(entry("all", {}, frame))
    return out
