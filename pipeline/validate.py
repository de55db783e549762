"""validate stage: the data gate. A real Great Expectations (GX Core 1.x) validation of the view.

    python -m pipeline.validate --params params.yaml --pointer data/snapshot.json \
        --store data/store --view data/view --approved data/approved \
        --report reports/validation.json --docs reports/gx --validated data/validated.json

What is judged (docs/data-gate.md has the rules, the thresholds and what they catch):

- the *new rows* of this release, i.e. the train rows (sample id, content hash, label) that are not
  in the last approved view of the same source: rows appended since, and rows the view poisoned;
- per class, with exact one-sided tests, against the last approved view, the root (the first
  approved view of the source) and, for everything added since the root, the root again:
  abnormal-block rate, exact-duplicate rate, label share (Fisher); and the block rate against a
  prior from conf (binomial, needs no history). A row blocks when ``p_adjusted < alpha`` AND
  ``effect >= min_effect``; the statistics write that rule into one column, ``p_gate``;
- rules that need no history: one image under two labels (``label_conflicts``, all splits), a
  near-duplicate cluster spanning labels (``near_duplicate_clusters``, 64-bit phash);
- the class set: a class that appears or loses every train row fails ``class_set`` unless
  ``validate.accept_new_classes`` / ``accept_removed_classes`` name it; the rate checks still
  compare the shared classes;
- identity and provenance of every row (labels in the class set, required and provenance columns).

Each check is a row of the one table ``gates.data_checks.CHECKS``; GX judges every table with
built-in expectations (``ExpectColumnValuesToBeBetween(p_gate, min_value=alpha)`` for the tests),
one suite + validation definition per table, in an ephemeral context. A first release (no approved
view of this source) runs the checks that need no history; the others are reported as skipped.

The approved ledger (``data/approved/ledger.jsonl``) holds one line per approved view: per-class
counts (rows, abnormal blocks, duplicates), the detector settings they were measured with, the
source key, and a hash chain (``prev`` = the previous line's ``digest``, ``digest`` = sha256 of the
line's canonical JSON without it), so an edited, removed or reordered line is refused (exit 1)
before anything is compared. ``data/approved/views/<view_id>.csv`` keeps the records of each
approved poisoned view (they hash to its view id), so the next release knows exactly which rows
the reference held. A pass appends a line; a refusal leaves the ledger byte for byte as it was.

GX is imported only inside :func:`run_gx` (import ~7 s); nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from gates import data_checks
from pipeline import stage
from pipeline.data import significance as sig
from pipeline.data import stats, store
from pipeline.data.ledger import (LEDGER, RESTORE as _RESTORE, LedgerDamaged, append_ledger,  # noqa: F401
                                  entry_digest, read_ledger)
from pipeline.data.view import (apply_records, compute_view_id, parse_records, quarantined_ids, read_view, row_positions,
                                records_csv, rows_kept, without_rows)
from pipeline.io import atomic_write_bytes, atomic_write_text, write_json
from pipeline.lineage import require_lineage
from pipeline.schema import Config, ValidateConfig

VIEWS = "views"  # data/approved/views/<view_id>.csv: the records of an approved poisoned view
REQUIRED_COLUMNS = ("sample_id", "sha256", "label", "split")
PROVENANCE_COLUMNS = stats.PROVENANCE_COLUMNS
PATHS = (
    stage.PathArg("pointer", "the current snapshot's pointer (data/snapshot.json)"),
    stage.PathArg("store", "the snapshot store (data/store)"),
    stage.PathArg("view", "the training view (data/view)"),
    stage.PathArg("approved", "the ledger of approved views, the next reference (data/approved)"),
    stage.PathArg("report", "the validation report (reports/validation.json)"),
    stage.PathArg("docs", "GX Data Docs folder (reports/gx)"),
    stage.PathArg("validated", "the record train reads (data/validated.json)"),
    stage.PathArg("history", "GX validation results kept across runs, for the Data Docs' history (data/gx_history)",
                  default="data/gx_history"),
)
_say = partial(stage.say, "validate")


class ValidationError(stage.UserError):
    """Validation could not run (missing inputs): the message says what to do."""


class DataGateFailed(stage.CheckFailed):
    """The data gate refused the training view (validate.on_fail=stop)."""


def check_statistics(tables: Any, v: ValidateConfig) -> dict[str, bool]:
    """Check name -> passed, with pandas alone: the same table of checks GX runs (a test checks
    it agrees with GX)."""
    return data_checks.judge(tables.frames if isinstance(tables, Tables) else tables, v)


# --------------------------------------------------------------------------- ledger (I/O)


def save_records(approved_dir: str | Path, view_id: str, records: Sequence[dict]) -> None:
    """Keep the records of an approved poisoned view (the next release's reference needs them)."""
    if records:
        p = Path(approved_dir) / VIEWS / f"{view_id}.csv"
        data = records_csv(records)
        if not (p.is_file() and p.read_bytes() == data):
            atomic_write_bytes(p, data)


def saved_records(approved_dir: str | Path, entry: dict) -> list[dict]:
    """The records of an approved view, verified against its view id."""
    if int(entry.get("n_poisoned", 0)) == 0:
        data = records_csv([])
    else:
        p = Path(approved_dir) / VIEWS / f"{entry['view_id']}.csv"
        if not p.is_file():
            raise LedgerDamaged(f"{p} is missing: the approved view {entry['view_id'][:12]} poisoned "
                                f"{entry['n_poisoned']} rows and its records are the reference's; {_RESTORE}")
        data = p.read_bytes()
    if compute_view_id(entry["snapshot_id"], data, entry["attack"], entry.get("quarantine")) != entry["view_id"]:
        raise LedgerDamaged(f"the records of approved view {entry['view_id'][:12]} ({Path(approved_dir) / VIEWS}) do "
                            f"not hash to its view id: they were edited; {_RESTORE}")
    return parse_records(data)


def history(ledger: Sequence[dict], source_key: str, view_id: str) -> tuple[Optional[dict], Optional[dict]]:
    """(last approved, root) entries of this source: the approved views of the same store lineage.
    Re-validating an approved view sees the history before its own approval, so it reproduces
    its verdict instead of comparing the view with itself."""
    own = [e for e in ledger if e.get("source_key") == source_key]
    for i, e in enumerate(own):
        if e.get("view_id") == view_id:
            own = own[:i]
            break
    return (own[-1], own[0]) if own else (None, None)


# --------------------------------------------------------------------------- measuring a view


@dataclass
class Measured:
    """One view measured: its train rows, and every row of its snapshot (for conflicts)."""

    rows: sig.ViewRows
    images: np.ndarray  # the view's train images
    flags: pd.DataFrame  # stats.block_flags_all of the train images
    all_ids: Any  # train rows first: indexable by position (pandas Arrow-backed string arrays in the stage)
    all_hashes: Any
    all_labels: np.ndarray
    poisoned: list[int]  # train-row indices the view changed: only there do rows' hashes and labels differ from the manifest's
    from_pixels: int = -1  # train rows measured from their pixels (the rest: columns stored at ingest)


def measure_view(snap: store.Snapshot, records: Sequence[dict], v: ValidateConfig, phash: bool = True,
                 features: Optional[pd.DataFrame] = None) -> Measured:
    """Apply the view's records to the snapshot's train rows and measure every row.

    ``features`` (``store.load_features``, row-aligned with ``snap.manifest``): the per-row
    columns stored at ingest. A train row whose pixels the view left alone and that has stored
    columns is measured from them without reading its pixels; the others (a row the view changed,
    a snapshot stored without columns or with other detector settings) are measured from their
    pixels, in chunks. A row read for that (and not rebuilt by a record, which ``apply_records``
    checks against ``sha256_after``) is checked against its manifest sha256 first: the caller may
    have skipped hashing the packs. Without ``features`` every row is measured from its pixels."""
    man = snap.manifest
    train = (man["split"] == "train").to_numpy()
    # Ids and hashes stay the manifest's Arrow-backed columns: as lists of Python strings (ids,
    # hashes, then the snapshot's) they held ~300 MiB at 1M rows for the whole stage (issue 19 item 3)
    tr_img, tr_lab, tr_ids = snap.split_rows("train")
    te_ids = man["sample_id"][~train].reset_index(drop=True).array
    tr_sha = man["sha256"][train].reset_index(drop=True).array
    view_img, view_lab, poisoned = apply_records(tr_img, tr_lab, tr_ids, records, verify=True)
    n = len(tr_ids)
    changed = np.zeros(n, bool)  # rows whose pixels a record rebuilt (a pure label flip keeps them)
    after: dict[int, str] = {}  # row -> the hash it trains on, where a record says (its last record)
    for i, r in zip(poisoned, records):  # apply_records gives each record's row, in order
        after[i] = r["sha256_after"]
        changed[i] |= bool(r.get("transform"))
    tr_hash = tr_sha
    if after:
        tr_hash = tr_sha.copy()
        tr_hash[np.fromiter(after, np.int64, len(after))] = list(after.values())
    all_hashes = pd.concat([pd.Series(tr_hash), man["sha256"][~train]], ignore_index=True).array
    all_ids = pd.concat([pd.Series(tr_ids), pd.Series(te_ids)], ignore_index=True).array
    all_labels = np.concatenate([np.asarray(view_lab, np.int64), man.loc[~train, "label"].to_numpy(np.int64)])
    dup = stats.duplicate_mask(all_hashes)[:n]
    if features is None:
        need = np.arange(n)
        flags = pd.DataFrame({"abnormal_block": np.zeros(n, bool), "abnormal_block_at": [""] * n})
        hashes = np.zeros(n, np.uint64)
    else:
        if len(features) != len(man):
            raise ValidationError(f"{len(features)} rows of stored data-gate columns for {len(man)} snapshot rows")
        f = features.loc[train].reset_index(drop=True)
        need = np.flatnonzero(~f["stored"].to_numpy(bool) | changed)
        flags = pd.DataFrame({"abnormal_block": f["abnormal_block"].to_numpy(bool),
                              "abnormal_block_at": f["abnormal_block_at"].astype(str).to_numpy(object)})
        hashes = f["phash"].to_numpy(np.uint64).copy()
    if len(need):
        def check(pos: np.ndarray, pixels: np.ndarray) -> None:  # the rows not rebuilt by a record
            keep = np.flatnonzero(~changed[pos])
            if len(keep):
                store.check_rows(pixels, keep, list(tr_ids[pos]), list(tr_sha[pos]))

        measured = stats.row_features(view_img, v, need, on_chunk=check if features is not None else None)
        flags.loc[need, "abnormal_block"] = measured["abnormal_block"].to_numpy(bool)
        flags.loc[need, "abnormal_block_at"] = measured["abnormal_block_at"].to_numpy(object)
        hashes[need] = measured["phash"].to_numpy(np.uint64)
    _say(f"measured {n} train rows: {n - len(need)} from the columns stored at ingest, {len(need)} from pixels")
    rows = sig.ViewRows(tr_ids, tr_hash, np.asarray(view_lab, np.int64), flags["abnormal_block"].to_numpy(bool), dup,
                        tuple(str(c) for c in snap.class_names), hashes if phash else None)
    return Measured(rows, view_img, flags, all_ids, all_hashes, all_labels, poisoned, int(len(need)))


def _load_measurable(store_dir: str | Path, snapshot_id: str, v: ValidateConfig) -> tuple[store.Snapshot, pd.DataFrame]:
    """A snapshot as the data gate reads it: the chain and manifest verified, pixels lazy and
    unhashed (``measure_view`` checks every row it reads), and the columns stored at ingest."""
    # store.REPEATED_COLUMNS as categoricals, one value per snapshot (or split) over every row: a
    # byte or so a row, not a string each (at 1.01M rows snapshot_id 69, ingest_time 31, split 12
    # MiB; issue 19 item 3)
    snap = store.load_snapshot(store_dir, snapshot_id, verify=True, lazy=True, hash_packs=False,
                               columns=REQUIRED_COLUMNS + PROVENANCE_COLUMNS, categorical=True)
    # where each row's pixels are now lives in the lazy rows: the manifest's copy (77 MiB at 1M
    # rows) would only ride along to the end of the stage (issue 19 item 3)
    snap = replace(snap, manifest=snap.manifest.drop(columns=["pack", "pack_index"]))
    return snap, store.load_features(store_dir, snapshot_id, stats.detector_settings(v))


def _without(snap: store.Snapshot, features: pd.DataFrame, gone: set[str]) -> tuple[store.Snapshot, pd.DataFrame]:
    """``view.without_rows`` on the snapshot and its row-aligned columns alike."""
    if not gone:
        return snap, features
    keep = rows_kept(snap, gone)
    return without_rows(snap, gone, keep), features[keep].reset_index(drop=True)


def as_reference(m: Measured, view_id: str, snapshot_id: str) -> sig.Reference:
    """A measured view as the reference of the next one (what its ledger line will say)."""
    return sig.Reference(view_id, snapshot_id, m.rows.counts().to_dict(m.rows.class_names), np.unique(m.rows.keys()))


def reference_of(entry: dict, store_dir: str | Path, approved_dir: str | Path, v: ValidateConfig) -> sig.Reference:
    """An approved entry as a reference: its counts from the ledger (re-measured from the store
    when the detector settings changed since), its row keys from the store's manifest and its
    saved records."""
    sid = entry["snapshot_id"]
    # The train rows' identity columns only, Arrow-backed: the whole manifest, then its ids and
    # hashes as Python strings, made this the stage's peak on every append (+1.1 GiB at 1M rows,
    # bench/results/validate_append_1m.log, issue 19 item 3). The chain is still verified whole
    # (first, as before): an edited history is a DamagedStore.
    tr = store.load_manifest(store_dir, sid, verify=True, columns=("sample_id", "sha256", "label"), split="train")
    names = [str(c) for c in store.read_meta(store_dir, sid)["class_names"]]
    records = saved_records(approved_dir, entry)
    ids, hashes = tr["sample_id"].reset_index(drop=True), tr["sha256"].reset_index(drop=True)
    labels = tr["label"].to_numpy(np.int64).copy()
    del tr
    # The approved view's rows, as columns: the manifest's, with each saved record's hash and class
    # in place of its row's (a record of a row the manifest lacks adds one), less the quarantined.
    if records:
        at = row_positions(ids, [r["sample_id"] for r in records])
        extra = [r for r in records if str(r["sample_id"]) not in at]
        last = {at[str(r["sample_id"])]: r for r in records if str(r["sample_id"]) in at}  # a row's last record
        if last:
            pos = np.fromiter(last, np.int64, len(last))
            hashes = hashes.copy()
            hashes.iloc[pos] = [r["sha256_after"] for r in last.values()]
            labels[pos] = [int(r["new_label"]) for r in last.values()]
        if extra:
            ids = pd.concat([ids, pd.Series([str(r["sample_id"]) for r in extra], dtype=ids.dtype)], ignore_index=True)
            hashes = pd.concat([hashes, pd.Series([r["sha256_after"] for r in extra], dtype=hashes.dtype)],
                               ignore_index=True)
            labels = np.concatenate([labels, np.array([int(r["new_label"]) for r in extra], np.int64)])
    gone = quarantined_ids(entry.get("quarantine"))  # rows a quarantined view left out (issue 13)
    keep = ~ids.isin(gone).to_numpy(bool) if gone else np.ones(len(ids), bool)
    counts = entry["counts"]
    if entry["detector"] != stats.detector_settings(v):
        _say(f"the block detector settings changed since approved view {entry['view_id'][:12]}: re-measuring it")
        snap, features = _without(*_load_measurable(store_dir, sid, v), gone)
        m = measure_view(snap, [r for r in records if r["sample_id"] not in gone], v, phash=False, features=features)
        counts = m.rows.counts().to_dict(m.rows.class_names)
    keys = sig.key_digests(ids[keep].array, hashes[keep].array, np.asarray(names, dtype=object)[labels[keep]])
    return sig.Reference(entry["view_id"], sid, counts, np.unique(keys))


def _ref_spec(approved_dir: str | Path, entry: Optional[dict]):
    """An approved entry as the Spark engine reads it (what :func:`reference_of` reads)."""
    if entry is None:
        return None
    from pipeline.data.spark_gate import RefSpec

    gone = quarantined_ids(entry.get("quarantine"))
    return RefSpec(entry, [r for r in saved_records(approved_dir, entry) if r["sample_id"] not in gone], frozenset(gone))


# --------------------------------------------------------------------------- tables


@dataclass
class Tables:
    """Every table the data gate judges, by name (``gates.data_checks`` names them)."""

    frames: dict[str, pd.DataFrame]
    statistics: dict

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.frames[name]


def samples_table(snap: store.Snapshot, m: Measured) -> pd.DataFrame:
    """One row per snapshot row (identity, provenance); train rows carry the view's label and hash."""
    # no deep copies: pandas' copy-on-write keeps the manifest unchanged when a column is set here
    s = snap.manifest.reset_index(drop=True)
    for col in REQUIRED_COLUMNS + PROVENANCE_COLUMNS:
        if col not in s.columns:
            s[col] = None
    s = s[list(REQUIRED_COLUMNS + PROVENANCE_COLUMNS)]
    for col in PROVENANCE_COLUMNS + ("sample_id", "sha256", "split"):
        # "" -> missing, in the column's own dtype: a pandas string column stays Arrow-backed
        # (astype(object) made a Python str per cell: ~100 MB per column at 1M rows, issue 19 item 3)
        c = s[col]
        if isinstance(c.dtype, pd.CategoricalDtype):  # "" is looked for among the few values, not on every row
            s[col] = c.cat.remove_categories([x for x in c.cat.categories if str(x) == ""])
            continue
        s[col] = c.mask((c.isna() | (c.astype(str) == "")).to_numpy(bool), None)
    s["label"] = pd.to_numeric(s["label"], errors="coerce").astype("Int64")
    train = np.flatnonzero((s["split"] == "train").to_numpy())
    s["poisoned"] = False
    s["abnormal_block"] = False
    s["abnormal_block_at"] = ""
    if len(train):
        s.loc[train, "label"] = m.rows.labels
        changed = np.unique(np.asarray(m.poisoned, np.int64))  # the rest keep the manifest's hash
        if len(changed):
            s.loc[train[changed], "sha256"] = [m.rows.hashes[int(k)] for k in changed]
        s.loc[train[m.poisoned], "poisoned"] = True
        s.loc[train, "abnormal_block"] = m.flags["abnormal_block"].to_numpy()
        s.loc[train, "abnormal_block_at"] = m.flags["abnormal_block_at"].to_numpy()
    return s


def build_tables(snap: store.Snapshot, m: Measured, v: ValidateConfig, last: Optional[sig.Reference],
                 root: Optional[sig.Reference]) -> Tables:
    """The samples table, a descriptive per-class table, and the statistics' judged tables."""
    rows = m.rows
    frames = {"samples": samples_table(snap, m)}
    full = rows.counts()
    n = max(1, int(full.rows.sum()))
    frames["classes"] = pd.DataFrame({
        "class_index": np.arange(len(rows.class_names)), "class_name": list(rows.class_names),
        "train_rows": full.rows, "share": full.rows / n,
        "block_rate": np.divide(full.block, full.rows, out=np.zeros(len(full.rows)), where=full.rows > 0),
        "duplicate_rate": np.divide(full.dup, full.rows, out=np.zeros(len(full.rows)), where=full.rows > 0),
    })
    frames.update(sig.gate_tables(rows, v, last=last, root=root, all_hashes=m.all_hashes, all_labels=m.all_labels,
                                  all_ids=m.all_ids, rate_checks=data_checks.rate_checks()))
    new = np.ones(len(rows.ids), bool) if last is None else sig.new_against(rows.keys(), last.keys)
    names = rows.class_names
    statistics = {
        "n_rows": int(len(frames["samples"])),
        "n_train": int(len(rows.ids)),
        "n_poisoned_rows": int(len(m.poisoned)),
        "n_new_rows": int(new.sum()),
        "train_rows_measured_from_pixels": int(m.from_pixels),
        "new_rows_per_class": {c: int(x) for c, x in zip(names, np.bincount(rows.labels[new], minlength=len(names)))},
        "provenance_coverage": float(frames["samples"][list(PROVENANCE_COLUMNS)].notna().all(axis=1).mean())
        if len(frames["samples"]) else 1.0,
        "abnormal_block_rows_train": int(full.block.sum()),
        "duplicate_rows_train": int(full.dup.sum()),
        "label_conflicts": int(len(frames["label_conflicts"])),
        "near_duplicate_clusters": int(len(frames.get("near_duplicate_clusters", ()))),
        "label_shares": {c: float(x) for c, x in zip(names, frames["classes"]["share"])},
        "block_rates": {c: float(x) for c, x in zip(names, frames["classes"]["block_rate"])},
    }
    return Tables(frames, statistics)


# --------------------------------------------------------------------------- GX


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if np.isfinite(f) else str(f)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if x is pd.NA:
        return None
    return x


def build_suites(frames: dict[str, pd.DataFrame], v: ValidateConfig) -> dict[str, list]:
    """table name -> GX expectations, one per applicable row of ``gates.data_checks.CHECKS``."""
    import great_expectations as gx

    suites: dict[str, list] = {}
    for check in data_checks.applicable(frames):
        cls, kwargs = data_checks.gx_spec(check, v, frames)
        exp = getattr(gx.expectations, cls)(**kwargs, meta={"check": check.name, "threshold": _jsonable(check.threshold(v))},
                                            notes=check.note)
        suites.setdefault(check.table, []).append(exp)
    return suites


_DETAIL_COLUMNS = ("comparison", "class_name", "x_new", "n_new", "rate_new", "x_ref", "n_ref", "rate_ref", "effect",
                   "p_value", "p_adjusted", "min_effect", "n_labels", "labels", "sample_ids")


def _observed(res: dict, table: pd.DataFrame, check: str, col: str | None, v: ValidateConfig) -> tuple[Any, dict]:
    details: dict[str, Any] = {}
    if "observed_value" in res:
        return res["observed_value"], details
    obs = res.get("unexpected_percent")
    obs = None if obs is None else float(obs) / 100.0
    if check == "provenance_coverage" and obs is not None:
        obs = 1.0 - obs  # report the coverage itself, as the threshold is a coverage
    details["unexpected_count"] = res.get("unexpected_count")
    details["element_count"] = res.get("element_count")
    if col == "p_gate":
        obs = float(table["p_gate"].min()) if len(table) else None
        bad = table[table["p_gate"] < v.alpha]
        details["blocked_rows"] = [{k: r[k] for k in _DETAIL_COLUMNS if k in r} for r in bad.head(20).to_dict("records")]
        details["blocked_classes"] = sorted({str(c) for c in bad.get("class_name", pd.Series(dtype=object))})
    elif check == "class_set":
        bad = table[~table["change"].isin(data_checks.CLASS_SET_OK)]
        details["changes"] = bad.to_dict("records")
        obs = [f"{r['change']}: {r['class_name']}" for r in details["changes"]]
    elif res.get("partial_unexpected_list"):
        details["partial_unexpected_list"] = res["partial_unexpected_list"][:20]
    return obs, details


def _gx_frame(df: pd.DataFrame) -> pd.DataFrame:
    """GX wants plain dtypes: nullable Int64 -> object ints/None; list cells -> JSON text."""
    df = df.copy(deep=False)  # columns are replaced, never written into: the caller's frame is untouched
    for c in df.columns:
        if str(df[c].dtype) == "Int64":
            df[c] = df[c].astype(object).where(df[c].notna(), None)
        elif df[c].dtype == object and len(df) and df[c].map(lambda x: isinstance(x, (list, tuple))).any():
            df[c] = df[c].map(lambda x: json.dumps(_jsonable(x)) if isinstance(x, (list, tuple)) else x)
    return df


@contextmanager
def _no_batch_fingerprint():
    """GX's pandas engine fingerprints each batch it builds: ``pandas.util.hash_pandas_object`` over
    the whole frame, md5'd into a batch marker (``pandas_data_fingerprint``), whenever the frame's
    shallow ``memory_usage`` is under its module constant ``HASH_THRESHOLD`` (1e9 bytes, string
    cells counted as pointers). Nothing here reads that marker: what the gate trusts is bound by
    sha256 (``pipeline.lineage``, the store's chain). At 1M rows the hash held 363 MiB of the
    heap at validate's peak (memray; bench/results/validate_peak_1m.log, with the stage's peak RSS
    before and after). GX has no setting for it, so the constant is
    lowered while the suites run. A GX without the constant is left alone (it only costs memory);
    ``test_gx_skips_its_batch_fingerprint`` fails then, as a reminder to look again."""
    try:
        from great_expectations.execution_engine import pandas_execution_engine as engine
    except ImportError:  # pragma: no cover - GX itself is missing: run_gx fails on its own import
        yield
        return
    old = getattr(engine, "HASH_THRESHOLD", None)
    if old is None:
        yield
        return
    engine.HASH_THRESHOLD = 0
    try:
        yield
    finally:
        engine.HASH_THRESHOLD = old


def _spark_frame(spark: Any, df: pd.DataFrame) -> Any:
    """A small judged table as a Spark DataFrame with an explicit schema (Spark cannot infer the
    type of a column that is all None, and GX reads the values as they are)."""
    df = _gx_frame(df)
    kinds, cols = [], {}
    for c in df.columns:
        dt = df[c].dtype
        if pd.api.types.is_bool_dtype(dt):
            kinds.append(f"`{c}` boolean")
            cols[c] = df[c].astype(object)
        elif pd.api.types.is_integer_dtype(dt):
            kinds.append(f"`{c}` bigint")
            cols[c] = df[c].astype(object).map(int)
        elif pd.api.types.is_float_dtype(dt):
            kinds.append(f"`{c}` double")
            cols[c] = df[c].astype(object).map(float)
        else:
            kinds.append(f"`{c}` string")
            cols[c] = df[c].map(lambda x: None if x is None or (isinstance(x, float) and np.isnan(x)) else str(x))
    rows = list(zip(*[cols[c].tolist() for c in df.columns])) if len(df.columns) else []
    return spark.createDataFrame(rows, ", ".join(kinds))


def run_gx(tables: Tables | dict[str, pd.DataFrame], v: ValidateConfig, docs_dir: str | Path | None,
           run_name: str = "poisongate", history_dir: str | Path | None = None,
           spark: Any = None) -> tuple[bool, list[dict]]:
    """Validate the tables with GX; build Data Docs into ``docs_dir`` (index.html) when given.

    ``spark`` (``validate.engine=spark``): GX's Spark execution engine judges every table; the
    samples table is then already a Spark DataFrame, the others are turned into small ones.

    The Data Docs are reviewer-ready: each validation is named after the view (``run_name``) and
    its data asset, failing per-class rows are listed by class name, the results of earlier runs
    stay listed (the validation results store lives in ``history_dir``, outside the docs folder
    the next run replaces), and the site is rewritten to render offline (no CDN:
    ``pipeline.reporting.gx_offline``)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import datetime
    import logging

    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (
        DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig,
    )

    frames = tables.frames if isinstance(tables, Tables) else tables
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)
    project = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults())
    if history_dir is not None:
        Path(history_dir).mkdir(parents=True, exist_ok=True)
        project.stores[project.validation_results_store_name] = {
            "class_name": "ValidationResultsStore",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(history_dir).resolve())},
        }
    ctx = gx.get_context(mode="ephemeral", project_config=project)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    site_dir = None
    if docs_dir is not None:
        Path(docs_dir).resolve().parent.mkdir(parents=True, exist_ok=True)
        site_dir = Path(tempfile.mkdtemp(prefix=".gx-site-", dir=Path(docs_dir).resolve().parent))
        ctx.add_data_docs_site("poisongate", {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
        })
    ds = ctx.data_sources.add_spark("poisongate") if spark is not None else ctx.data_sources.add_pandas("poisongate")
    suites = build_suites(frames, v)
    results: list[dict] = []
    success = True
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.datetime.now(datetime.timezone.utc))
    results_store = ctx.validation_results_store
    for tname, exps in suites.items():
        bd = ds.add_dataframe_asset(tname).add_batch_definition_whole_dataframe(f"{tname}_all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"poisongate_{tname}"))
        for e in exps:
            suite.add_expectation(e)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=bd, suite=suite, name=f"{run_name}_{tname}"))
        big = not isinstance(frames[tname], pd.DataFrame)  # the Spark engine's samples table
        per_class = not big and "class_name" in frames[tname].columns and len(frames[tname]) <= 10_000
        # per-class tables: every failing value is listed with its class; the big sample table: a summary
        fmt = ({"result_format": "COMPLETE", "unexpected_index_column_names": ["class_name"]} if per_class
               else "SUMMARY")
        data = frames[tname] if big else (_spark_frame(spark, frames[tname]) if spark is not None else _gx_frame(frames[tname]))
        with _no_batch_fingerprint():
            out = vd.run(batch_parameters={"dataframe": data}, result_format=fmt, run_id=run_id)
        _name_the_asset(results_store, run_id, suite.name, out, tname)
        success &= bool(out.success)
        for er in out.results:
            cfg = er.expectation_config
            meta = dict(cfg.meta or {})
            col = cfg.kwargs.get("column")
            obs, details = _observed(dict(er.result or {}), frames[tname], meta.get("check", ""), col, v)
            if er.exception_info and er.exception_info.get("raised_exception"):
                details["exception"] = er.exception_info.get("exception_message")
            details["table"] = tname
            results.append({
                "expectation": cfg.type,
                "check": meta.get("check"),
                "column": col,
                "success": bool(er.success),
                "observed": _jsonable(obs),
                "threshold": _jsonable(meta.get("threshold")),
                "details": _jsonable(details),
            })
    if site_dir is not None:
        ctx.build_data_docs()
        if not (site_dir / "index.html").is_file():
            raise ValidationError(f"GX Data Docs did not produce index.html in {site_dir}")
        from pipeline.reporting.gx_offline import make_offline

        make_offline(site_dir)
        docs_dir = Path(docs_dir)
        if docs_dir.exists():
            shutil.rmtree(docs_dir)
        os.replace(site_dir, docs_dir)
    return success, results


def _name_the_asset(results_store: Any, run_id: Any, suite_name: str, result: Any, asset: str) -> None:
    """Data Docs read the asset's name from the result's batch spec, which a dataframe batch never
    sets ("Data asset: None"): set it and store the result again under its own key."""
    try:
        keys = [k for k in results_store.list_keys() if k.run_id.run_name == run_id.run_name
                and k.run_id.run_time == run_id.run_time and k.expectation_suite_identifier.name == suite_name]
    except Exception:  # noqa: BLE001 - a cosmetic fix must never fail the data gate
        return
    if keys:
        result.meta["batch_spec"] = {**(result.meta.get("batch_spec") or {}), "data_asset_name": asset}
        results_store.set(keys[0], result)


def log_data_gate_block(cfg: Config, report: dict, args: argparse.Namespace, reasons: Sequence[str]) -> Optional[str]:
    """A data-gate stop leaves a run in MLflow too (tagged blocked, with the reasons, the report and
    the Data Docs), so every attempt shows in one place. Best effort: the stage fails either way."""
    try:
        import mlflow

        from pipeline.tracking import registry, runs

        runs.configure(cfg.mlflow.experiment)
        attack = (report.get("attack") or {}).get("name", "none")
        name = f"{cfg.data.name}-{attack}-view{report['view_id'][:8]}-blocked-by-data-gate"
        failed = sorted({r["check"] for r in report["results"] if not r["success"]})
        tags = runs.run_tags(report["snapshot_id"], report["view_id"], attack, stage="validate",
                             **{registry.TAG_VERDICT: "blocked", registry.TAG_FAILED: ", ".join(failed)[:4900],
                                "mlflow.note.content": "**Release BLOCKED by the data gate**\n\n"
                                + "\n".join(f"- {r}" for r in reasons[:20])
                                + "\n\nEvidence: artifacts `validation/validation.json`, `validation/gx/index.html`."})
        with mlflow.start_run(run_name=name, tags=tags) as run:
            c = runs.client()
            c.log_artifact(run.info.run_id, str(args.report), artifact_path="validation")
            if Path(args.docs).is_dir():
                c.log_artifacts(run.info.run_id, str(args.docs), artifact_path="validation/gx")
            runs.log_metrics(run.info.run_id, {"gate/passed": 0.0, "data/new_rows": report["statistics"].get("n_new_rows", 0)})
            return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - the data gate's verdict does not depend on MLflow
        _say(f"warning: could not log the data-gate block to MLflow ({stage.redact(str(exc))[:300]})")
        return None


# --------------------------------------------------------------------------- stage


def _reasons(frames: dict[str, pd.DataFrame], v: ValidateConfig, limit: int = 8) -> list[str]:
    """Short text for each blocking row (logs and the error message)."""
    out = []
    if "class_set" in frames:
        t = frames["class_set"]
        for _, r in t[~t["change"].isin(data_checks.CLASS_SET_OK)].iterrows():
            key = "accept_new_classes" if r["change"] == "new" else "accept_removed_classes"
            out.append(f"class_set: class {r['class_name']!r} is {r['change']} since the last approved view "
                       f"(acknowledge it with validate.{key})")
    for check in data_checks.applicable(frames):
        if check.column != "p_gate":
            continue
        t = frames[check.table]
        out += [f"{s}" for s in sig.blocked_summary(t[t["p_gate"] < v.alpha].assign(blocked=True))["reasons"]]
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def run(cfg: Config, args: argparse.Namespace) -> dict:
    stage.map_heap("validate", cfg.data.heap_map_mib)
    v = cfg.validate
    # Fail closed: the record train reads exists only once this validation completes (DVC removes
    # it before the command too; a direct call must not leave an earlier verdict in place).
    Path(args.validated).unlink(missing_ok=True)
    ptr = store.read_pointer(args.pointer)
    meta, records = read_view(args.view)
    require_lineage(meta, {"snapshot_id": ptr["snapshot_id"]}, what=f"the view in {args.view}",
                    against=f"the current snapshot ({args.pointer})", fix="re-run the poison stage")
    ledger = read_ledger(args.approved)  # a damaged history is refused before anything is measured
    gone = quarantined_ids(meta.get("quarantine"))  # a quarantined view is judged without the rows it leaves out
    kept = [r for r in records if r["sample_id"] not in gone]
    spark = None
    if v.engine == "spark":
        from pipeline.data import spark_gate

        source_key = str((store.read_meta(args.store, ptr["snapshot_id"]).get("source") or {}).get("key", ""))
        last_e, root_e = history(ledger, source_key, meta["view_id"])
        spark = spark_gate.session(v)
        _say(f"engine spark: master {v.spark_master}, Spark {spark.version}")
        j = spark_gate.judge_view(spark, args.store, ptr["snapshot_id"], kept, gone, v,
                                  _ref_spec(args.approved, last_e), _ref_spec(args.approved, root_e),
                                  data_checks.rate_checks())
        tables, class_names, full, last, root = Tables(j.frames, j.statistics), j.class_names, j.counts, j.last, j.root
        snap_id = ptr["snapshot_id"]
    else:
        snap, features = _load_measurable(args.store, ptr["snapshot_id"], v)
        snap, features = _without(snap, features, gone)
        source_key = str((snap.meta.get("source") or {}).get("key", ""))
        m = measure_view(snap, kept, v, features=features)
        last_e, root_e = history(ledger, source_key, meta["view_id"])
        last = reference_of(last_e, args.store, args.approved, v) if last_e else None
        # one approved release so far is both: read once
        root = (last if root_e is last_e else reference_of(root_e, args.store, args.approved, v)) if root_e else None
        tables = build_tables(snap, m, v, last, root)
        class_names, full, snap_id = m.rows.class_names, m.rows.counts(), snap.id
    frames = tables.frames
    success, results = run_gx(tables, v, args.docs if v.docs else None, run_name=f"view-{meta['view_id'][:12]}",
                              history_dir=args.history, spark=spark)

    skipped = [{"check": c.name, "reason": "first release of this source: no approved view to compare with"}
               for c in data_checks.CHECKS if c.table not in frames]
    reasons = _reasons(frames, v) if not success else []
    report = {
        "success": bool(success),
        "snapshot_id": snap_id,
        "view_id": meta["view_id"],
        "engine": v.engine,
        "reference": {"kind": "approved" if last else "source",
                      "snapshot_id": last.snapshot_id if last else snap_id,
                      "view_id": last.view_id if last else None,
                      "root": {"snapshot_id": root.snapshot_id, "view_id": root.view_id} if root else None,
                      "source_key": source_key},
        "results": results,
        "skipped": sorted({s["check"]: s for s in skipped}.values(), key=lambda s: s["check"]),
        "blocked": reasons,
        "tests": {name: _jsonable(frames[name].to_dict("records")) for name in frames
                  if name not in ("samples",)},
        "statistics": _jsonable(tables.statistics),
        "thresholds": _jsonable({k: getattr(v, k) for k in v.__dataclass_fields__}),
    }
    write_json(Path(args.report), report)
    write_json(Path(args.validated), {"snapshot_id": snap_id, "view_id": meta["view_id"],
                                      "success": bool(success), "on_fail": v.on_fail})
    Path(args.approved).mkdir(parents=True, exist_ok=True)
    if success:
        save_records(args.approved, meta["view_id"], records)
        append_ledger(args.approved, {
            "snapshot_id": snap_id, "view_id": meta["view_id"], "source_key": source_key,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "attack": meta["attack"], "n_poisoned": len(records),
            "class_names": list(class_names),
            "counts": full.to_dict(class_names),
            "detector": stats.detector_settings(v),
            "reference_view_id": last.view_id if last else None,
            "label_shares": tables.statistics["label_shares"], "block_rates": tables.statistics["block_rates"],
            **({"quarantine": meta["quarantine"]} if meta.get("quarantine") else {}),
        })
    failed = [r for r in results if not r["success"]]
    ref_txt = (f"last approved view {last.view_id[:12]}" + (f", root {root.view_id[:12]}" if root and root.view_id != last.view_id else "")
               if last else "no approved view (first release: checks without history)")
    _say(f"{'PASS' if success else 'FAIL'} view {meta['view_id'][:12]}: {tables.statistics['n_new_rows']} new rows "
         f"against {ref_txt} ({len(results) - len(failed)}/{len(results)} expectations)")
    for r in reasons:
        _say(f"  blocked {r}")
    for r in failed:
        if r["column"] != "p_gate" and r["check"] != "class_set":
            _say(f"  failed {r['check']}: {r['expectation']}({r['column']}) observed {r['observed']} "
                 f"threshold {r['threshold']}")
    if not success:
        if v.on_fail == "warn":
            _say("on_fail=warn: continuing; train and the gate see success=false")
        else:
            from pipeline.reporting.gx_offline import validation_pages
            from pipeline.reporting.terminal import data_gate_text

            report["attack"] = meta["attack"]
            run_id = log_data_gate_block(cfg, report, args, reasons)
            pages = validation_pages(args.docs) if v.docs and Path(args.docs).is_dir() else None
            print(data_gate_text(report, links={"data_docs": f"{args.docs}/index.html",
                                                "mlflow_run": f"run {run_id}" if run_id else None},
                                 docs_pages=pages), flush=True)
            raise DataGateFailed(f"the data gate refused view {meta['view_id'][:12]} "
                                 f"({', '.join(sorted({r['check'] for r in failed}))}): see {args.report}"
                                 f" and {args.docs}/index.html")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("validate", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
