"""The data gate's checks: one table, from which everything else is derived.

Each :class:`DataCheck` names the statistics table and column it judges (built by
``pipeline.data.stats.build_tables``), the kind of expectation, and how its bounds come from
``conf/validate``. Three consumers read this table and nothing else:

- the validate stage turns each row into a Great Expectations expectation (:func:`gx_spec` gives
  the expectation class name and its keyword arguments), so GX judges the real tables;
- :func:`judge` applies the same rules with pandas alone, for the calibration benches that scan
  hundreds of appends without GX (a test checks both agree);
- docs/data-gate.md lists the checks from :data:`CHECKS` (the note is the expectation's note in
  the Data Docs too).

Pure: no I/O, no GX import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import pandas as pd

from pipeline.schema import ValidateConfig

Bounds = Callable[[ValidateConfig, Mapping[str, pd.DataFrame]], dict[str, Any]]


@dataclass(frozen=True)
class DataCheck:
    name: str  # the check's name in reports (several expectations may share one)
    table: str  # samples | train | label_shares | block_rates
    column: str
    kind: str  # in_set | not_null | between | unique | kl_below
    bounds: Bounds  # the expectation's arguments from the config (value_set, min/max, mostly, ...)
    threshold: Callable[[ValidateConfig], Any]  # what reports show as the threshold
    note: str  # why the check exists: the Data Docs note and the docs row


def _n_classes(tables: Mapping[str, pd.DataFrame]) -> int:
    return len(tables["label_shares"])


def _reference_partition(tables: Mapping[str, pd.DataFrame]) -> dict[str, list]:
    ref = np.clip(tables["label_shares"]["reference_share"].to_numpy(float), 0.0, None)
    n = len(ref)
    ref = ref / ref.sum() if ref.sum() > 0 else np.full(n, 1.0 / max(1, n))
    return {"values": list(range(n)), "weights": [float(w) for w in ref]}


def _required(col: str) -> DataCheck:
    return DataCheck("required_not_null", "samples", col, "not_null", lambda v, t: {"mostly": 1.0},
                     lambda v: 1.0, f"every row has a {col}: rows without identity cannot be traced or verified")


def _provenance(col: str) -> DataCheck:
    return DataCheck("provenance_coverage", "samples", col, "not_null",
                     lambda v, t: {"mostly": float(v.min_provenance_coverage)},
                     lambda v: float(v.min_provenance_coverage),
                     f"share of rows with a {col} (where each row came from and when) at least "
                     "validate.min_provenance_coverage")


CHECKS: tuple[DataCheck, ...] = (
    DataCheck("labels_in_class_set", "samples", "label", "in_set",
              lambda v, t: {"value_set": list(range(_n_classes(t)))},
              lambda v: "class indices", "every label is a class of the snapshot"),
    *(_required(c) for c in ("sample_id", "sha256", "label", "split")),
    *(_provenance(c) for c in ("source_uri", "ingest_time", "snapshot_id")),
    DataCheck("no_conflicting_labels", "samples", "labels_per_hash", "between",
              lambda v, t: {"min_value": 1, "max_value": 1}, lambda v: 1,
              "one image (content hash) never carries two labels: a relabelled copy is a flip attack"),
    DataCheck("duplicate_rate", "samples", "sha256", "unique",
              lambda v, t: {"mostly": float(max(0.0, 1.0 - v.max_duplicate_rate))},
              lambda v: float(v.max_duplicate_rate),
              "share of rows whose pixels appear on another row at most validate.max_duplicate_rate"),
    DataCheck("label_kl", "train", "label", "kl_below",
              lambda v, t: {"partition_object": _reference_partition(t), "threshold": float(v.max_kl)},
              lambda v: float(v.max_kl), "KL divergence (nats) of the train label shares from the reference"),
    DataCheck("class_share_delta", "label_shares", "share_delta", "between",
              lambda v, t: {"min_value": -float(v.max_class_share_delta), "max_value": float(v.max_class_share_delta)},
              lambda v: float(v.max_class_share_delta), "each class's train share within the reference's +- the threshold"),
    DataCheck("block_rate_increase", "block_rates", "block_rate_increase", "between",
              lambda v, t: {"max_value": float(v.max_block_rate_increase)},
              lambda v: float(v.max_block_rate_increase),
              "per-class share of images with an abnormal pixel block (a trigger-like patch) over the reference's"),
)

_GX_CLASS = {
    "in_set": "ExpectColumnValuesToBeInSet",
    "not_null": "ExpectColumnValuesToNotBeNull",
    "between": "ExpectColumnValuesToBeBetween",
    "unique": "ExpectColumnValuesToBeUnique",
    "kl_below": "ExpectColumnKLDivergenceToBeLessThan",
}


def gx_spec(check: DataCheck, v: ValidateConfig, tables: Mapping[str, pd.DataFrame]) -> tuple[str, dict[str, Any]]:
    """The GX expectation class name and keyword arguments of a check."""
    return _GX_CLASS[check.kind], {"column": check.column, **check.bounds(v, tables)}


def _kl(labels: pd.Series, partition: Mapping[str, list]) -> float:
    from scipy.stats import entropy

    values = list(partition["values"])
    counts = labels.dropna().astype(int).value_counts()
    obs = np.array([counts.get(x, 0) for x in values], float)
    if obs.sum() == 0:
        return float("inf")
    q = np.asarray(partition["weights"], float)
    p = obs / obs.sum()
    if (q[p > 0] <= 0).any():
        return float("inf")
    return float(entropy(p, q))


def evaluate_check(check: DataCheck, v: ValidateConfig, tables: Mapping[str, pd.DataFrame]) -> tuple[bool, Any]:
    """``(passed, observed)`` of one check with pandas alone: the semantics of its GX expectation."""
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
        observed = float(x.abs().max() if lo is not None and hi is not None and lo == -hi else x.max()) if len(x) else None
        return frac >= mostly, observed
    if check.kind == "unique":
        dup = nonnull.duplicated(keep=False)
        rate = float(dup.mean()) if len(nonnull) else 0.0
        return 1.0 - rate >= mostly, rate
    if check.kind == "kl_below":
        kl = _kl(col, kw["partition_object"])
        return kl <= kw["threshold"], kl
    raise ValueError(f"unknown data check kind {check.kind!r}")


def judge(tables: Mapping[str, pd.DataFrame], v: ValidateConfig,
          checks: Optional[tuple[DataCheck, ...]] = None) -> dict[str, bool]:
    """Check name -> passed (a check with several expectations passes when all of them do)."""
    out: dict[str, bool] = {}
    for c in checks or CHECKS:
        ok, _ = evaluate_check(c, v, tables)
        out[c.name] = out.get(c.name, True) and ok
    return out
