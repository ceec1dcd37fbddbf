"""Quality filters and train/validation/test splits (mathmill.labels.split)."""

from __future__ import annotations

import json
import random
from importlib import resources
from typing import Any

import polars as pl
import pytest
import xxhash
from pydantic import BaseModel, ValidationError

from mathmill.curate.neardup import cluster
from mathmill.labels.split import (
    FilterConfig,
    SplitConfig,
    apply_filters,
    assign_splits,
    reason_counts,
    split_report,
    to_frame,
)
from tests.test_curate_text import change_number, respace

DOMAINS = ["algebra", "geometry", "number_theory", "counting"]
BUCKETS = ["trivial", "easy", "medium", "hard", "very_hard"]


def planted(rows: int = 2000, clusters: int = 600, seed: int = 0) -> pl.DataFrame:
    """``rows`` rows in ``clusters`` near-duplicate clusters of 1-10 rows over 4 domains x
    5 buckets; a cluster's rows share its labels, except one row in each of about 10% of
    the clusters (size >= 2), which takes another bucket.
    """
    rng = random.Random(seed)
    sizes = [1] * clusters
    # the remaining rows one at a time to a random cluster not yet at 10
    open_ = list(range(clusters))
    for _ in range(rows - clusters):
        j = rng.randrange(len(open_))
        sizes[open_[j]] += 1
        if sizes[open_[j]] == 10:
            open_[j] = open_[-1]
            open_.pop()
    out: list[dict[str, Any]] = []
    for c, size in enumerate(sizes):
        domain, bucket = rng.choice(DOMAINS), rng.choice(BUCKETS)
        odd = size >= 2 and rng.random() < 0.1
        for k in range(size):
            out.append(
                {
                    "id": f"c{c:04d}-{k}",
                    "cluster_id": f"c{c:04d}",
                    "bucket": rng.choice(BUCKETS) if odd and k == size - 1 else bucket,
                    "domain": domain,
                    "tokens": rng.randint(50, 800),
                }
            )
    assert len(out) == rows
    return pl.DataFrame(out)


def straddling(df: pl.DataFrame) -> int:
    per = df.filter(pl.col("cluster_id").is_not_null()).group_by("cluster_id")
    return per.agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height


def worst(report: list[dict[str, Any]], min_rows: int = 50) -> float:
    """The largest deviation (fraction) of an achieved from a target proportion over the
    strata with at least ``min_rows`` rows.
    """
    return max(
        abs(float(e["achieved"][s]) - float(e["target"][s]))
        for e in report[:-1]
        if e["rows"] >= min_rows
        for s in e["target"]
    )


def overall_deviation(report: list[dict[str, Any]]) -> float:
    total = report[-1]
    assert total["stratum"] == "all"
    return max(
        abs(float(total["achieved"][s]) - float(total["target"][s])) for s in total["target"]
    )


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_clusters_never_straddle_and_strata_hit_their_targets(seed: int) -> None:
    df = planted(seed=seed)
    cfg = SplitConfig(seed=seed)
    out = assign_splits(df, cfg)
    assert out.height == df.height and out["id"].to_list() == df["id"].to_list()
    assert set(out["split"].unique().to_list()) == {"train", "validation", "test"}
    assert straddling(out) == 0
    report = split_report(out, cfg)
    assert report[-1]["straddling"] == 0 and report[-1]["rows"] == 2000
    assert report[-1]["clusters"] == 600
    big = [e for e in report[:-1] if e["rows"] >= 50]
    assert len(big) >= 15  # 20 strata of ~100 rows
    assert worst(report) <= 0.05, [(e["stratum"], e["achieved"]) for e in big]
    assert overall_deviation(report) <= 0.02


def test_other_fractions_and_no_strata() -> None:
    df = planted(seed=3)
    cfg = SplitConfig(train=0.6, validation=0.25, test=0.15, stratify_by=[], seed=3)
    out = assign_splits(df, cfg)
    assert straddling(out) == 0
    report = split_report(out, cfg)
    assert [e["stratum"] for e in report] == ["all"]
    assert overall_deviation(report) <= 0.01


def test_a_zero_fraction_gets_nothing() -> None:
    df = planted(seed=4)
    out = assign_splits(df, SplitConfig(train=0.9, validation=0.1, test=0.0, seed=4))
    assert "test" not in out["split"].to_list()
    assert straddling(out) == 0


def test_rows_without_a_cluster_are_their_own_cluster() -> None:
    df = planted(seed=5).with_columns(
        pl.when(pl.col("cluster_id").str.ends_with("7"))
        .then(None)
        .otherwise(pl.col("cluster_id"))
        .alias("cluster_id")
    )
    orphans = df.filter(pl.col("cluster_id").is_null()).height
    assert orphans > 100
    out = assign_splits(df, SplitConfig(seed=5))
    assert straddling(out) == 0
    report = split_report(out, SplitConfig(seed=5))
    # each orphan row counts as a cluster
    named = df.filter(pl.col("cluster_id").is_not_null())["cluster_id"].n_unique()
    assert report[-1]["clusters"] == named + orphans
    assert overall_deviation(report) <= 0.02
    # orphans of one former cluster are spread: they are not tied together
    assert out.filter(pl.col("cluster_id").is_null())["split"].n_unique() == 3


def test_same_seed_same_splits_whatever_the_input_order() -> None:
    df = planted(seed=6)
    cfg = SplitConfig(seed=11)
    first = dict(assign_splits(df, cfg).select("id", "split").iter_rows())
    again = dict(assign_splits(df, cfg).select("id", "split").iter_rows())
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=99)
    assert shuffled["id"].to_list() != df["id"].to_list()
    other = assign_splits(shuffled, cfg)
    assert other["id"].to_list() == shuffled["id"].to_list()  # input order kept
    assert first == again == dict(other.select("id", "split").iter_rows())
    reseeded = dict(assign_splits(df, SplitConfig(seed=12)).select("id", "split").iter_rows())
    assert reseeded != first


def test_a_mixed_cluster_takes_the_stratum_of_its_smallest_id() -> None:
    # c1's smallest id is in bucket "x" (alone there otherwise): the whole cluster is
    # placed as a stratum-"x" cluster, whatever the row order.
    rows: list[dict[str, str | None]] = [
        {"id": "b", "cluster_id": "c1", "bucket": "y", "domain": "d"},
        {"id": "a", "cluster_id": "c1", "bucket": "x", "domain": "d"},
        {"id": "c", "cluster_id": "c1", "bucket": "y", "domain": "d"},
    ]
    rows += [
        {"id": f"z{i:03d}", "cluster_id": None, "bucket": "y", "domain": "d"} for i in range(200)
    ]
    df = pl.DataFrame(rows)
    cfg = SplitConfig(seed=1)
    out = assign_splits(df, cfg)
    back = assign_splits(df.reverse(), cfg)
    assert dict(out.select("id", "split").iter_rows()) == dict(
        back.select("id", "split").iter_rows()
    )
    assert out.filter(pl.col("cluster_id") == "c1")["split"].n_unique() == 1
    # stratum "y" is the 200 "z" rows (160/20/20 exactly); stratum "x" is c1 alone,
    # which then goes where the deficit is largest: train
    z = out.filter(pl.col("id").str.starts_with("z")).group_by("split").len()
    assert dict(z.iter_rows()) == {"train": 160, "validation": 20, "test": 20}
    assert set(out.filter(pl.col("cluster_id") == "c1")["split"]) == {"train"}
    # the report counts rows by their own bucket: "y" has b and c too
    y = next(e for e in split_report(out, cfg) if e["values"]["bucket"] == "y")
    assert y["rows"] == 202 and y["counts"] == {"train": 162, "validation": 20, "test": 20}


def test_small_strata_go_where_the_overall_split_is_shortest() -> None:
    # 40 strata of one row each, then 20 of two-row clusters: no stratum can be split,
    # yet the overall proportions hold (the deficits carry from stratum to stratum)
    rows = [
        {"id": f"s{i}", "cluster_id": None, "bucket": f"b{i}", "domain": "d"} for i in range(40)
    ]
    rows += [
        {"id": f"p{i}-{k}", "cluster_id": f"p{i}", "bucket": f"q{i}", "domain": "d"}
        for i in range(20)
        for k in range(2)
    ]
    df = pl.DataFrame(rows)
    cfg = SplitConfig(seed=3)
    out = assign_splits(df, cfg)
    counts = dict(out.group_by("split").len().iter_rows())
    assert counts == {"train": 64, "validation": 8, "test": 8}
    assert straddling(out) == 0
    # every stratum sits whole in one split
    strata = out.group_by("bucket").agg(pl.col("split").n_unique())
    assert strata["split"].max() == 1


def test_a_stratum_too_small_beside_a_large_one() -> None:
    # one row of a rare domain among 500 common ones: it goes to one split, and the
    # large stratum still meets its targets
    rows = [
        {"id": f"r{i}", "cluster_id": None, "bucket": "easy", "domain": "a"} for i in range(500)
    ]
    rows.append({"id": "rare", "cluster_id": None, "bucket": "easy", "domain": "z"})
    df = pl.DataFrame(rows)
    cfg = SplitConfig(seed=0)
    out = assign_splits(df, cfg)
    report = split_report(out, cfg)
    rare = next(e for e in report if e["values"].get("domain") == "z")
    assert rare["rows"] == 1 and sorted(rare["counts"].values()) == [0, 0, 1]
    big = next(e for e in report if e["values"].get("domain") == "a")
    assert big["counts"] == {"train": 400, "validation": 50, "test": 50}
    assert overall_deviation(report) <= 0.002


def test_null_labels_are_a_stratum_of_their_own() -> None:
    df = planted(seed=8).with_columns(
        pl.when(pl.col("domain") == "counting")
        .then(None)
        .otherwise(pl.col("domain"))
        .alias("domain")
    )
    cfg = SplitConfig(seed=8)
    out = assign_splits(df, cfg)
    report = split_report(out, cfg)
    nulls = [e for e in report if e["values"].get("domain", "") is None]
    assert nulls and sum(e["rows"] for e in nulls) == df["domain"].null_count()
    assert worst(report) <= 0.05 and straddling(out) == 0


def test_empty_input() -> None:
    empty = planted().head(0)
    out = assign_splits(empty, SplitConfig())
    assert out.height == 0 and "split" in out.columns
    assert split_report(out)[-1]["rows"] == 0
    kept, removed = apply_filters(empty, FilterConfig(drop_leaking=False))
    assert kept.height == 0 and removed.height == 0 and "reason" in removed.columns
    assert reason_counts(removed) == {}


def test_split_config_validation() -> None:
    with pytest.raises(ValidationError, match="must be 1"):
        SplitConfig(train=0.8, validation=0.1, test=0.2)
    with pytest.raises(ValidationError, match="must be 1"):
        SplitConfig(train=0.5, validation=0.1, test=0.1)
    with pytest.raises(ValidationError):
        SplitConfig(train=1.2, validation=-0.1, test=-0.1)
    with pytest.raises(ValidationError, match="extra"):
        SplitConfig(val=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="repeats"):
        SplitConfig(stratify_by=["domain", "domain"])
    SplitConfig(train=0.7, validation=0.2, test=0.1)  # 0.7 + 0.2 + 0.1 != 1.0 exactly
    cfg = SplitConfig()
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="domain"):
        assign_splits(pl.DataFrame({"id": ["a"], "cluster_id": ["c"], "bucket": ["x"]}), cfg)


def test_rows_from_dicts_and_models() -> None:
    class Row(BaseModel):
        id: str
        cluster_id: str | None
        bucket: str | None
        domain: str | None
        tokens: int | None
        leaking: bool = False

    rows = [Row(id="a", cluster_id=None, bucket=None, domain=None, tokens=None)]
    rows += [
        Row(id=f"r{i}", cluster_id=f"c{i % 7}", bucket="easy", domain="algebra", tokens=100)
        for i in range(30)
    ]
    df = to_frame([*rows[:1], *(r.model_dump() for r in rows[1:])])
    assert df.schema["bucket"] == pl.String and df.schema["tokens"] == pl.Int64
    kept, removed = apply_filters(df, FilterConfig(require_labels=["domain"]))
    assert removed["id"].to_list() == ["a"] and reason_counts(removed) == {"missing_domain": 1}
    assert straddling(assign_splits(kept, SplitConfig())) == 0


# --------------------------------------------------------------------------- filters


def filter_frame() -> pl.DataFrame:
    """100 ordinary rows (tokens 100-199) plus one row per reason."""
    rows: list[dict[str, Any]] = [
        {
            "id": f"ok{i}",
            "cluster_id": None,
            "bucket": "easy",
            "domain": "algebra",
            "tokens": 100 + i,
            "leaking": False,
        }
        for i in range(100)
    ]
    base = {"cluster_id": None, "bucket": "easy", "domain": "algebra", "tokens": 150}
    rows += [
        {**base, "id": "unsolved", "bucket": "unsolved", "leaking": True},  # first reason wins
        {**base, "id": "leaking", "leaking": True, "domain": None},
        {**base, "id": "nodomain", "domain": None, "leaking": False},
        {**base, "id": "nobucket", "bucket": None, "leaking": None},
        {**base, "id": "tiny", "tokens": 3, "leaking": False},
        {**base, "id": "huge", "tokens": 5000, "leaking": False},
        {**base, "id": "notokens", "tokens": None, "leaking": False},
        {**base, "id": "nullflag", "leaking": None},
    ]
    return pl.DataFrame(rows).with_columns(pl.col("cluster_id").cast(pl.String))


def test_each_filter_names_its_reason_in_order() -> None:
    df = filter_frame()
    # "tiny" (3 tokens) is inside the default IQR fences (Q1 - 3 IQR < 0): min_tokens cuts it
    cfg = FilterConfig(require_labels=["domain", "bucket"], min_tokens=10)
    kept, removed = apply_filters(df, cfg)
    got = dict(removed.select("id", "reason").iter_rows())
    assert got == {
        "unsolved": "unsolved",
        "leaking": "leaking",
        "nodomain": "missing_domain",
        "nobucket": "missing_bucket",
        "tiny": "too_short",
        "huge": "too_long",
    }
    assert reason_counts(removed) == {
        "unsolved": 1,
        "leaking": 1,
        "missing_domain": 1,
        "missing_bucket": 1,
        "too_short": 1,
        "too_long": 1,
    }
    assert kept.height == df.height - 6 and kept.columns == df.columns
    assert {"notokens", "nullflag"} <= set(kept["id"].to_list())
    assert removed.columns == [*df.columns, "reason"]
    # input order kept on both sides
    assert removed["id"].to_list() == [i for i in df["id"].to_list() if i in got]


def test_filters_switch_off() -> None:
    df = filter_frame()
    cfg = FilterConfig(drop_unsolved=False, drop_leaking=False, outlier_iqr=None)
    kept, removed = apply_filters(df, cfg)
    assert removed.height == 0 and kept.height == df.height
    # unsolved row now removed as leaking, leaking row as missing its domain
    _, removed = apply_filters(df, FilterConfig(drop_unsolved=False, require_labels=["domain"]))
    got = dict(removed.select("id", "reason").iter_rows())
    assert got["unsolved"] == "leaking" and got["leaking"] == "leaking"
    assert got["nodomain"] == "missing_domain" and "nobucket" not in got


def test_absolute_token_bounds() -> None:
    df = filter_frame()
    cfg = FilterConfig(min_tokens=120, max_tokens=180, outlier_iqr=None)
    kept, removed = apply_filters(df, cfg)
    counts = reason_counts(removed)
    # 20 (100-119) + tiny short; 19 (181-199) + huge long
    assert counts == {"unsolved": 1, "leaking": 1, "too_short": 21, "too_long": 20}
    assert kept["tokens"].drop_nulls().min() == 120 and kept["tokens"].max() == 180
    with pytest.raises(ValidationError, match="min_tokens"):
        FilterConfig(min_tokens=10, max_tokens=5)


def test_iqr_fences() -> None:
    # tokens 100..199 plus two rows below and two above: Q1 123.75, Q3 175.25, IQR 51.5;
    # k=1 -> [72.25, 226.75]
    df = (
        filter_frame()
        .filter(pl.col("id").str.starts_with("ok"))
        .with_columns(pl.col("tokens").cast(pl.Int64))
    )
    extra = pl.DataFrame(
        {
            "id": ["lo_out", "lo_in", "hi_in", "hi_out"],
            "tokens": [72, 73, 226, 227],
        }
    ).with_columns(
        cluster_id=pl.lit(None, pl.String),
        bucket=pl.lit("easy"),
        domain=pl.lit("algebra"),
        leaking=pl.lit(False),
    )
    df = pl.concat([df, extra.select(df.columns)])
    # the fences come from all 104 rows: compute them the same way
    q1, q3 = (df["tokens"].quantile(q, interpolation="linear") for q in (0.25, 0.75))
    assert q1 is not None and q3 is not None
    lo, hi = q1 - (q3 - q1), q3 + (q3 - q1)
    assert (lo, hi) == (72.25, 226.75)
    _, removed = apply_filters(df, FilterConfig(outlier_iqr=1.0))
    assert dict(removed.select("id", "reason").iter_rows()) == {
        "lo_out": "too_short",
        "hi_out": "too_long",
    }
    # rows removed by an earlier filter do not move the quartiles
    huge = df.head(30).with_columns(
        pl.format("leak{}", pl.col("id")).alias("id"),
        pl.lit(100_000, pl.Int64).alias("tokens"),
        pl.lit(True).alias("leaking"),
    )
    _, removed = apply_filters(pl.concat([df, huge]), FilterConfig(outlier_iqr=1.0))
    assert reason_counts(removed) == {"leaking": 30, "too_short": 1, "too_long": 1}
    # too few token counts: not IQR-filtered
    _, removed = apply_filters(df, FilterConfig(outlier_iqr=1.0, outlier_min_rows=500))
    assert removed.height == 0


def test_iqr_per_group() -> None:
    # "hard" solutions are 10x longer: one global fence would cut them, per-bucket not
    rows = [{"id": f"e{i}", "bucket": "easy", "tokens": 100 + i % 50} for i in range(200)] + [
        {"id": f"h{i}", "bucket": "hard", "tokens": 1000 + 10 * (i % 50)} for i in range(40)
    ]
    df = pl.DataFrame(rows).with_columns(
        cluster_id=pl.lit(None, pl.String), domain=pl.lit("a"), leaking=pl.lit(False)
    )
    _, removed = apply_filters(df, FilterConfig())
    assert reason_counts(removed) == {"too_long": 40}
    _, removed = apply_filters(df, FilterConfig(outlier_by=["bucket"]))
    assert removed.height == 0


def test_filter_input_checks() -> None:
    df = filter_frame().drop("leaking")
    with pytest.raises(ValueError, match="leaking"):
        apply_filters(df, FilterConfig())
    kept, _ = apply_filters(df, FilterConfig(drop_leaking=False))
    assert kept.height > 0
    with pytest.raises(ValueError, match="tokens"):
        apply_filters(df.drop("tokens"), FilterConfig(drop_leaking=False))
    with pytest.raises(ValidationError):
        FilterConfig(outlier_iqr=0)
    with pytest.raises(ValidationError, match="extra"):
        FilterConfig(drop_short=True)  # type: ignore[call-arg]


def test_filter_then_split_round_trip() -> None:
    df = planted(seed=9).with_columns(
        leaking=(pl.col("id").str.ends_with("-3")),
        tokens=pl.when(pl.col("id").str.ends_with("-5")).then(10_000).otherwise(pl.col("tokens")),
    )
    kept, removed = apply_filters(df, FilterConfig())
    assert kept.height + removed.height == df.height
    counts = reason_counts(removed)
    assert set(counts) == {"leaking", "too_long"} and counts["too_long"] > 10
    cfg = SplitConfig(seed=9)
    out = assign_splits(kept, cfg)
    assert straddling(out) == 0 and overall_deviation(split_report(out, cfg)) <= 0.02


# --------------------------------------------------------------------------- real data


def fake_bucket(key: str) -> str:
    return BUCKETS[xxhash.xxh3_64_intdigest(key.encode()) % len(BUCKETS)]


def _math500() -> list[dict[str, Any]]:
    path = resources.files("mathmill") / "data" / "benchmarks" / "math500.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_math500_split_keeps_clusters_and_proportions() -> None:
    # MATH-500 plus 1-3 planted near-duplicates (respaced, a number changed) of 150 of
    # its problems, clustered for real; domain = the subject, a fake bucket by a hash of
    # the original's id (a variant is as hard as its original)
    items = _math500()
    assert len(items) == 500
    rng = random.Random(0)
    ids = [it["id"] for it in items]
    texts = [it["problem"] for it in items]
    for it in rng.sample(items, 150):
        variants = [respace(it["problem"]), change_number(it["problem"], rng)]
        variants.append(respace(variants[1] or it["problem"]))
        for k, text in enumerate(variants[: rng.randint(1, 3)]):
            if text and text != it["problem"]:
                ids.append(f"{it['id']}~{k}")
                texts.append(text)
    clusters = cluster(ids, texts)
    multi = sum(
        1 for rep, n in zip(clusters.representative, clusters.size, strict=True) if rep and n > 1
    )
    assert multi >= 120
    df = pl.DataFrame(
        {
            "id": ids,
            "cluster_id": list(clusters.cluster_id),
            "domain": [i.split("/")[1] for i in ids],  # test/<subject>/<n>.json
            "bucket": [fake_bucket(i.split("~")[0]) for i in ids],
        }
    )
    assert df["domain"].n_unique() == 7
    # strata of 7 subjects x 5 fake buckets (6-59 rows each)
    cfg = SplitConfig(seed=0)
    out = assign_splits(df, cfg)
    assert straddling(out) == 0
    report = split_report(out, cfg)
    assert report[-1]["clusters"] == clusters.num_clusters >= 500
    assert overall_deviation(report) <= 0.02
    for e in report[:-1]:  # each small stratum within 1.5 rows of each target
        for s in e["target"]:
            assert abs(e["counts"][s] - e["target"][s] * e["rows"]) <= 1.5, e
    # by subject only (57-208 rows per stratum): within 5 points
    cfg = SplitConfig(stratify_by=["domain"], seed=0)
    out = assign_splits(df, cfg)
    report = split_report(out, cfg)
    assert straddling(out) == 0 and worst(report) <= 0.05
    assert overall_deviation(report) <= 0.02
