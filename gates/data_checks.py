"""The data gate's checks: one table, from which everything else is derived.

Each :class:`DataCheck` names the table and column it judges, the kind of expectation, and how its
bounds come from ``conf/validate``. The tables are built by the statistics
(``pipeline.data.significance.gate_tables`` for the tests of significance, the class set and the
rules; the validate stage's per-sample table for identity and provenance). Four consumers read
this table and nothing else:

- the validate stage turns each row into a Great Expectations expectation (:func:`gx_spec` gives
  the expectation class name and its keyword arguments), so GX judges the real tables;
- :func:`judge` applies the same rules with pandas alone, for the calibration benches that scan
  thousands of appends without GX (tests/test_validate.py checks both agree, case by case);
- :func:`rate_checks` tells the statistics which rate tests to build (and so how alpha is split);
- docs/data-gate.md lists the checks from :data:`CHECKS` (the note is the expectation's note in
  the Data Docs too).

The tests of significance share one decision rule: a row of a test table blocks when
``p_adjusted < alpha`` AND ``effect >= min_effect``. The statistics write ``p_gate`` =
``p_adjusted`` where the effect reaches ``min_effect``, else 1.0, so GX judges the whole rule with
one built-in expectation: ``ExpectColumnValuesToBeBetween(column="p_gate", min_value=alpha)``.

A check whose table is absent does not apply (the rate checks against a reference on a first
release): GX gets no expectation for it and :func:`judge` leaves it out; the report lists it as
skipped.

Pure: no I/O, no GX import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import pandas as pd

from pipeline.schema import ValidateConfig

Bounds = Callable[[ValidateConfig, Mapping[str, pd.DataFrame]], dict[str, Any]]
CLASS_SET_OK = ("shared", "new (accepted)", "removed (accepted)")  # = significance.CLASS_SET_OK


@dataclass(frozen=True)
class DataCheck:
    name: str  # the check's name in reports (several expectations may share one)
    table: str  # the table it judges (a key of the tables mapping)
    column: str
    kind: str  # in_set | not_null | between
    bounds: Bounds  # the expectation's arguments from the config (value_set, min/max, mostly, ...)
    threshold: Callable[[ValidateConfig], Any]  # what reports show as the threshold
    note: str  # why the check exists: the Data Docs note and the docs row
    statistic: str = "rule"  # fisher | binomial (tests of significance built per class) | rule | row | class_set
    needs_history: bool = False  # runs only against an approved reference


def _n_classes(tables: Mapping[str, pd.DataFrame]) -> int:
    return len(tables["classes"])  # one row per class of the snapshot (descriptive, not judged)


def _required(col: str) -> DataCheck:
    return DataCheck("required_not_null", "samples", col, "not_null", lambda v, t: {"mostly": 1.0},
                     lambda v: 1.0, f"every row has a {col}: rows without identity cannot be traced or verified",
                     statistic="row")


def _provenance(col: str) -> DataCheck:
    return DataCheck("provenance_coverage", "samples", col, "not_null",
                     lambda v, t: {"mostly": float(v.min_provenance_coverage)},
                     lambda v: float(v.min_provenance_coverage),
                     f"share of rows with a {col} (where each row came from and when) at least "
                     "validate.min_provenance_coverage", statistic="row")


def _p_gate(name: str, statistic: str, effect_key: Optional[str], needs_history: bool, note: str) -> DataCheck:
    """A test-table check: every row's p_gate >= alpha (no row significant AND material)."""
    return DataCheck(
        name, name, "p_gate", "between", lambda v, t: {"min_value": float(v.alpha)},
        (lambda v: {"alpha": float(v.alpha), "min_effect": float(getattr(v, effect_key))}) if effect_key
        else (lambda v: {"any_row_blocks": True}),
        note, statistic=statistic, needs_history=needs_history)


CHECKS: tuple[DataCheck, ...] = (
    DataCheck("labels_in_class_set", "samples", "label", "in_set",
              lambda v, t: {"value_set": list(range(_n_classes(t)))},
              lambda v: "class indices", "every label is a class of the snapshot", statistic="row"),
    *(_required(c) for c in ("sample_id", "sha256", "label", "split")),
    *(_provenance(c) for c in ("source_uri", "ingest_time", "snapshot_id")),
    DataCheck("class_set", "class_set", "change", "in_set", lambda v, t: {"value_set": list(CLASS_SET_OK)},
              lambda v: {"accept_new_classes": list(v.accept_new_classes),
                         "accept_removed_classes": list(v.accept_removed_classes)},
              "no class appears, or loses every train row, against the last approved view unless "
              "validate.accept_new_classes / accept_removed_classes name it (the rate checks still "
              "compare the shared classes)", statistic="class_set", needs_history=True),
    _p_gate("block_rate", "fisher", "min_effect_block_rate", True,
            "per class, the new rows' rate of images with an abnormal pixel block (a trigger-like patch "
            "at any position) is not significantly and materially above the last approved view's, the "
            "root's, nor (all rows since the root) the root's: one-sided Fisher exact test"),
    _p_gate("duplicate_rate", "fisher", "min_effect_duplicate_rate", True,
            "per class, the new rows' rate of exact duplicates (pixels on another row) is not "
            "significantly and materially above the reference's: one-sided Fisher exact test"),
    _p_gate("label_share", "fisher", "min_effect_share", True,
            "per class, the class's share of the new rows is not significantly and materially above its "
            "share of the reference (a relabel raises its target's share): one-sided Fisher exact test"),
    _p_gate("block_rate_prior", "binomial", "min_effect_block_rate", False,
            "per class, the abnormal-block rate of the new rows (and of all rows since the root) is not "
            "significantly and materially above validate.prior_block_rate: one-sided binomial test; "
            "needs no history, so a first release runs it"),
    _p_gate("label_conflicts", "rule", None, False,
            "one image (content hash) never carries two labels, in any split: a relabelled copy is a "
            "flip attack"),
    _p_gate("near_duplicate_clusters", "rule", None, False,
            "no cluster of near-duplicate train images (64-bit phash within validate.near_dup_radius "
            "bits) spans two labels: a lightly edited copy under another label is a flip attack"),
)

_GX_CLASS = {
    "in_set": "ExpectColumnValuesToBeInSet",
    "not_null": "ExpectColumnValuesToNotBeNull",
    "between": "ExpectColumnValuesToBeBetween",
}


def rate_checks() -> tuple[str, ...]:
    """The tests of significance the statistics must build (their tables, one per check)."""
    return tuple(c.name for c in CHECKS if c.statistic in ("fisher", "binomial"))


def applicable(tables: Mapping[str, pd.DataFrame]) -> tuple[DataCheck, ...]:
    """The checks whose table was built (a first release has no reference tables)."""
    return tuple(c for c in CHECKS if c.table in tables)


def gx_spec(check: DataCheck, v: ValidateConfig, tables: Mapping[str, pd.DataFrame]) -> tuple[str, dict[str, Any]]:
    """The GX expectation class name and keyword arguments of a check."""
    return _GX_CLASS[check.kind], {"column": check.column, **check.bounds(v, tables)}


def evaluate_check(check: DataCheck, v: ValidateConfig, tables: Mapping[str, pd.DataFrame]) -> tuple[bool, Any]:
    """``(passed, observed)`` of one check with pandas alone: the semantics of its GX expectation
    (``mostly`` = the fraction of non-null values that must meet it; an empty column passes)."""
    df = tables[check.table]
    col = df[check.column]
    kw = check.bounds(v, tables)
    mostly = kw.get("mostly", 1.0)
    nonnull = col.dropna()
    if check.kind == "not_null":
        frac = float(col.notna().mean()) if len(col) else 1.0
        return frac >= mostly, frac
    if check.kind == "in_set":
        bad = ~nonnull.isin(kw["value_set"])
        frac = 1.0 - float(bad.mean()) if len(nonnull) else 1.0
        return frac >= mostly, int(bad.sum())
    if check.kind == "between":
        lo, hi = kw.get("min_value"), kw.get("max_value")
        x = pd.to_numeric(nonnull, errors="coerce")
        bad = x.isna() | ((x < lo) if lo is not None else False) | ((x > hi) if hi is not None else False)
        frac = 1.0 - float(bad.mean()) if len(x) else 1.0
        if not len(x):
            observed = None
        elif lo is not None and hi is None:
            observed = float(x.min())  # the worst row of a lower bound (the smallest p_gate)
        else:
            observed = float(x.max())
        return frac >= mostly, observed
    raise ValueError(f"unknown data check kind {check.kind!r}")


def judge(tables: Mapping[str, pd.DataFrame], v: ValidateConfig,
          checks: Optional[tuple[DataCheck, ...]] = None) -> dict[str, bool]:
    """Check name -> passed, for every applicable check (a check with several expectations passes
    when all of them do). The pandas twin of the GX run."""
    out: dict[str, bool] = {}
    for c in checks or applicable(tables):
        if c.table not in tables:
            continue
        ok, _ = evaluate_check(c, v, tables)
        out[c.name] = out.get(c.name, True) and ok
    return out
