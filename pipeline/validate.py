"""validate stage: the data gate. A real Great Expectations (GX Core 1.x) validation of the view.

    python -m pipeline.validate --params params.yaml --pointer data/snapshot.json \
        --store data/store --view data/view --approved data/approved \
        --report reports/validation.json --docs reports/gx --validated data/validated.json

The stage derives pandas tables from the snapshot and the training view and runs GX's built-in
expectations over them (ephemeral context, pandas data source, whole-dataframe batch definitions,
one ExpectationSuite + ValidationDefinition per table):

``samples`` (one row per snapshot row; train rows carry the view's label and content hash)
    labels in the class set; required and provenance columns non-null (provenance coverage via
    ``mostly``); no hash under two labels; duplicate rate (``ExpectColumnValuesToBeUnique`` with
    ``mostly = 1 - max_duplicate_rate``).
``train`` (the view's train rows)
    ``ExpectColumnKLDivergenceToBeLessThan`` of the label column against a categorical
    partition built from the reference shares (GX computes KL(observed || reference) in nats).
``label_shares`` (one row per class)
    every class's share minus the reference share within ``max_class_share_delta``.
``block_rates`` (one row per class)
    the per-class rate of images with an abnormal pixel block, minus the reference's rate, at most
    ``max_block_rate_increase``.

Reference: the last approved view in ``data/approved/ledger.jsonl`` with the same class names
(another view than this one), else the un-poisoned snapshot itself (``reference.kind: source``).

Only the statistics are hand-written (GX has no image expectation: the pixel-block detector and
the per-class share/rate tables are computed here with numpy/pandas, then judged by GX).
GX is imported only inside :func:`run_gx` (import ~7 s); nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, ValidateConfig
from pipeline.core.attacks import NAMED_LOCATIONS, named_location
from pipeline.core.hashing import sample_hashes

REQUIRED_COLUMNS = ("sample_id", "sha256", "label", "split")
PROVENANCE_COLUMNS = ("source_uri", "ingest_time", "snapshot_id")
LEDGER = "ledger.jsonl"


class ValidationError(ValueError):
    """Validation could not run (missing inputs, mismatched view): the message says what to do."""


# --------------------------------------------------------------------------- statistics (pure)


def block_flags(
    images: np.ndarray,
    block_size: int,
    low: float,
    high: float,
    max_std: float,
    min_contrast: float,
) -> pd.DataFrame:
    """Per-image abnormal-pixel-block statistics at the four corners and the centre.

    A k x k block (k = ``block_size``) is *abnormal* when it is
    - uniform: every channel's pixel std <= ``max_std``;
    - extreme: every channel's mean <= ``low`` or every channel's mean >= ``high``;
    - foreign: it differs from its ring (the pixels within ``ring = max(1, k // 2)`` of the block,
      clipped to the image) by >= ``min_contrast`` in at least one channel's mean, *and* from the
      image's background (its per-channel median) by as much.
    The last condition is what keeps clean data quiet: the dark corners of digits are uniform and
    extreme, but so is the background of the whole image (a dark corner next to a stroke differs
    from its ring, not from the median); the white sky/background corners of CIFAR-10 photos are
    uniform and extreme, but so is their ring. A bright trigger patch pasted onto a dark digit, or
    onto a photo's content, differs from both. Hand-written because GX has no image statistic.

    Returns columns ``abnormal_block`` (bool), ``abnormal_block_at`` (location or ""), and
    ``block_<loc>`` (bool per location).
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    k = int(block_size)
    if k < 1 or k > min(h, w):
        raise ConfigError(f"validate.block_size {k} does not fit the {h}x{w} images: use 1..{min(h, w)}")
    r = max(1, k // 2)
    med = np.empty((n, c), np.float32)  # per-image, per-channel median: the image's background
    for i in range(0, n, 4096):
        med[i : i + 4096] = np.median(images[i : i + 4096].reshape(-1, h * w, c), axis=1)
    out: dict[str, np.ndarray] = {}
    any_flag = np.zeros(n, bool)
    first = np.full(n, "", dtype=object)
    for loc in NAMED_LOCATIONS:
        y0, x0 = named_location(loc, (h, w), k)
        ya, yb, xa, xb = max(0, y0 - r), min(h, y0 + k + r), max(0, x0 - r), min(w, x0 + k + r)
        reg = images[:, ya:yb, xa:xb, :].astype(np.float32)  # only the region: CIFAR is 600 MB as float
        blk = reg[:, y0 - ya : y0 - ya + k, x0 - xa : x0 - xa + k, :]
        bmean = blk.mean(axis=(1, 2))  # (n, c)
        bstd = blk.std(axis=(1, 2)).max(axis=1)  # (n,)
        ring_n = (yb - ya) * (xb - xa) - k * k
        if ring_n <= 0:  # block covers the whole image: no ring to differ from
            contrast = np.zeros(n, np.float32)
        else:
            ring_mean = (reg.sum(axis=(1, 2)) - blk.sum(axis=(1, 2))) / ring_n
            contrast = np.abs(bmean - ring_mean).max(axis=1)
        extreme = (bmean <= low).all(axis=1) | (bmean >= high).all(axis=1)
        off_background = np.abs(bmean - med).max(axis=1) >= min_contrast
        flag = (bstd <= max_std) & extreme & (contrast >= min_contrast) & off_background
        out[f"block_{loc}"] = flag
        first = np.where(flag & ~any_flag, loc, first)
        any_flag |= flag
    df = pd.DataFrame(out)
    df.insert(0, "abnormal_block_at", first.astype(str))
    df.insert(0, "abnormal_block", any_flag)
    return df


def block_flags_cfg(images: np.ndarray, v: ValidateConfig) -> pd.DataFrame:
    return block_flags(images, v.block_size, v.block_low, v.block_high, v.block_max_std, v.block_min_contrast)


def pixel_moments(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-image pixel mean and std (0..255), in chunks (a float copy of CIFAR-10 is 600 MB)."""
    n = len(images)
    mean, std = np.zeros(n), np.zeros(n)
    for i in range(0, n, chunk):
        f = images[i : i + chunk].reshape(min(chunk, n - i), -1).astype(np.float32)
        mean[i : i + chunk], std[i : i + chunk] = f.mean(axis=1), f.std(axis=1)
    return mean, std


def label_shares(labels: np.ndarray, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels[(labels >= 0) & (labels < n_classes)], minlength=n_classes).astype(float)
    return counts / max(1, len(labels))


def class_rates(flags: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class fraction of flagged rows (0 for an empty class)."""
    labels = np.asarray(labels, np.int64)
    flags = np.asarray(flags, bool)
    tot = np.bincount(labels, minlength=n_classes).astype(float)
    hit = np.bincount(labels[flags], minlength=n_classes).astype(float)
    return np.divide(hit, tot, out=np.zeros(n_classes), where=tot > 0)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats (inf where p has mass q lacks); what GX's KL expectation computes."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    m = p > 0
    if (q[m] <= 0).any():
        return float("inf")
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def duplicate_stats(hashes: Sequence[str], labels: Sequence[int]) -> tuple[float, int, np.ndarray]:
    """(fraction of rows whose hash appears on another row, number of hashes under >1 label,
    per-row count of distinct labels of the row's hash)."""
    df = pd.DataFrame({"h": list(hashes), "y": np.asarray(labels, np.int64)})
    if df.empty:
        return 0.0, 0, np.zeros(0, np.int64)
    dup_rate = float(df["h"].duplicated(keep=False).mean())
    nlab = df.groupby("h")["y"].nunique()
    per_row = df["h"].map(nlab).to_numpy(np.int64)
    return dup_rate, int((nlab > 1).sum()), per_row


@dataclass
class Reference:
    kind: str  # approved | source
    snapshot_id: str
    label_shares: np.ndarray
    block_rates: np.ndarray
    view_id: str | None = None


def source_reference(snapshot_id: str, train_images: np.ndarray, train_labels: np.ndarray, n_classes: int,
                     v: ValidateConfig) -> Reference:
    """The un-poisoned snapshot's own train shares and block rates."""
    flags = block_flags_cfg(train_images, v)["abnormal_block"].to_numpy()
    return Reference("source", snapshot_id, label_shares(train_labels, n_classes),
                     class_rates(flags, train_labels, n_classes))


def read_ledger(approved_dir: str | Path) -> list[dict]:
    p = Path(approved_dir) / LEDGER
    if not p.is_file():
        return []
    out = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValidationError(f"{p} line {n} is not JSON: repair or remove the line") from None
    return out


def approved_reference(ledger: list[dict], class_names: Sequence[str], view_id: str) -> Reference | None:
    """The last approved entry over the same classes, other than ``view_id`` itself."""
    names = [str(c) for c in class_names]
    for e in reversed(ledger):
        if e.get("view_id") == view_id:
            continue
        shares, rates = e.get("label_shares") or {}, e.get("block_rates") or {}
        if sorted(shares) != sorted(names):
            continue
        return Reference(
            "approved", e["snapshot_id"],
            np.array([float(shares[c]) for c in names]),
            np.array([float(rates.get(c, 0.0)) for c in names]),
            view_id=e.get("view_id"),
        )
    return None


def append_ledger(approved_dir: str | Path, entry: dict) -> bool:
    """Append ``entry`` unless its view_id is already there (read, append, write temp, replace)."""
    from pipeline.io import atomic_write_text

    ledger = read_ledger(approved_dir)
    if any(e.get("view_id") == entry["view_id"] for e in ledger):
        return False
    ledger.append(entry)
    atomic_write_text(Path(approved_dir) / LEDGER, "".join(json.dumps(e, sort_keys=True) + "\n" for e in ledger))
    return True


@dataclass
class Tables:
    samples: pd.DataFrame
    train: pd.DataFrame
    label_shares: pd.DataFrame
    block_rates: pd.DataFrame
    statistics: dict = field(default_factory=dict)


def build_tables(
    manifest: pd.DataFrame,
    images: np.ndarray,
    view_images: np.ndarray,
    view_labels: np.ndarray,
    view_ids: Sequence[str],
    poisoned_ids: set[str],
    class_names: Sequence[str],
    reference: Reference,
    v: ValidateConfig,
) -> Tables:
    """The four tables GX validates, from the snapshot (all rows) and the view's train rows."""
    n_classes = len(class_names)
    s = manifest.reset_index(drop=True).copy()
    for col in REQUIRED_COLUMNS + PROVENANCE_COLUMNS:
        if col not in s.columns:
            s[col] = None
    s = s[list(REQUIRED_COLUMNS + PROVENANCE_COLUMNS)].copy()
    for col in PROVENANCE_COLUMNS + ("sample_id", "sha256", "split"):
        s[col] = s[col].astype(object).where(s[col].notna() & (s[col].astype(str) != ""), None)
    s["label"] = pd.to_numeric(s["label"], errors="coerce")
    s["poisoned"] = False
    pos = {sid: i for i, sid in enumerate(s["sample_id"].astype(str))}
    train_rows = np.array([pos[str(sid)] for sid in view_ids], np.int64)
    imgs = np.asarray(images).copy()
    if len(train_rows):
        imgs[train_rows] = view_images
        s.loc[train_rows, "label"] = np.asarray(view_labels, np.int64)
        changed = [pos[p] for p in poisoned_ids]
        s.loc[changed, "poisoned"] = True
        # the view's content hash for the rows it changes; untouched rows keep the manifest hash
        if changed:
            s.loc[changed, "sha256"] = sample_hashes(imgs[changed])
    s["label"] = s["label"].astype("Int64")
    s["pixel_mean"], s["pixel_std"] = pixel_moments(imgs)
    flags = block_flags_cfg(imgs, v)
    s["abnormal_block"] = flags["abnormal_block"].to_numpy()
    s["abnormal_block_at"] = flags["abnormal_block_at"].to_numpy()
    dup_rate, n_conflicts, per_row = duplicate_stats(s["sha256"].astype(str), s["label"].fillna(-1).astype(int))
    s["labels_per_hash"] = per_row

    train = s.iloc[train_rows].reset_index(drop=True)
    tl = train["label"].to_numpy(np.int64)
    shares = label_shares(tl, n_classes)
    rates = class_rates(train["abnormal_block"].to_numpy(bool), tl, n_classes)
    share_tab = pd.DataFrame({
        "class_index": np.arange(n_classes), "class_name": [str(c) for c in class_names],
        "share": shares, "reference_share": reference.label_shares,
        "share_delta": shares - reference.label_shares,
    })
    block_tab = pd.DataFrame({
        "class_index": np.arange(n_classes), "class_name": [str(c) for c in class_names],
        "block_rate": rates, "reference_block_rate": reference.block_rates,
        "block_rate_increase": rates - reference.block_rates,
    })
    cov = s[list(PROVENANCE_COLUMNS)].notna().all(axis=1).mean() if len(s) else 1.0
    stats = {
        "n_rows": int(len(s)),
        "n_train": int(len(train)),
        "n_poisoned_rows": int(s["poisoned"].sum()),
        "provenance_coverage": float(cov),
        "kl_divergence": kl_divergence(shares, reference.label_shares),
        "max_abs_share_delta": float(np.abs(share_tab["share_delta"]).max()) if n_classes else 0.0,
        "duplicate_rate": dup_rate,
        "conflicting_hashes": n_conflicts,
        "max_block_rate_increase": float(block_tab["block_rate_increase"].max()) if n_classes else 0.0,
        "abnormal_block_rows_train": int(train["abnormal_block"].sum()),
        "label_shares": {str(c): float(x) for c, x in zip(class_names, shares)},
        "reference_label_shares": {str(c): float(x) for c, x in zip(class_names, reference.label_shares)},
        "block_rates": {str(c): float(x) for c, x in zip(class_names, rates)},
        "reference_block_rates": {str(c): float(x) for c, x in zip(class_names, reference.block_rates)},
    }
    return Tables(s, train, share_tab, block_tab, stats)


def check_statistics(stats: dict, v: ValidateConfig) -> dict[str, bool]:
    """The pass/fail of every check from the statistics alone (what the GX suite decides).

    Used by bench/calibrate_validation.py to scan many seeds without GX; the stage uses GX.
    """
    return {
        "provenance_coverage": stats["provenance_coverage"] >= v.min_provenance_coverage,
        "label_kl": stats["kl_divergence"] <= v.max_kl,
        "class_share_delta": stats["max_abs_share_delta"] <= v.max_class_share_delta,
        "no_conflicting_labels": stats["conflicting_hashes"] == 0,
        "duplicate_rate": stats["duplicate_rate"] <= v.max_duplicate_rate,
        "block_rate_increase": stats["max_block_rate_increase"] <= v.max_block_rate_increase,
    }


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


def build_suites(tables: Tables, class_names: Sequence[str], v: ValidateConfig) -> dict[str, list]:
    """table name -> list of GX expectations (GX imported here)."""
    import great_expectations as gx

    E = gx.expectations
    n = len(class_names)
    samples = [
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(n)),
                                      meta={"check": "labels_in_class_set", "threshold": f"0..{n - 1}"}),
    ]
    for col in REQUIRED_COLUMNS:
        samples.append(E.ExpectColumnValuesToNotBeNull(column=col, meta={"check": "required_not_null", "threshold": 1.0}))
    for col in PROVENANCE_COLUMNS:
        samples.append(E.ExpectColumnValuesToNotBeNull(
            column=col, mostly=float(v.min_provenance_coverage),
            meta={"check": "provenance_coverage", "threshold": float(v.min_provenance_coverage)}))
    samples.append(E.ExpectColumnValuesToBeBetween(
        column="labels_per_hash", min_value=1, max_value=1,
        meta={"check": "no_conflicting_labels", "threshold": 1}))
    samples.append(E.ExpectColumnValuesToBeUnique(
        column="sha256", mostly=float(max(0.0, 1.0 - v.max_duplicate_rate)),
        meta={"check": "duplicate_rate", "threshold": float(v.max_duplicate_rate)}))
    # Categorical partition: GX compares the label column's value counts with these weights.
    # (Verified with GX 1.x: categorical partitions work; observed_value = KL(observed || ref).)
    ref = np.clip(tables.label_shares["reference_share"].to_numpy(float), 0.0, None)
    ref = ref / ref.sum() if ref.sum() > 0 else np.full(n, 1.0 / max(1, n))
    train = [E.ExpectColumnKLDivergenceToBeLessThan(
        column="label", partition_object={"values": list(range(n)), "weights": [float(w) for w in ref]},
        threshold=float(v.max_kl), meta={"check": "label_kl", "threshold": float(v.max_kl)})]
    shares = [E.ExpectColumnValuesToBeBetween(
        column="share_delta", min_value=-float(v.max_class_share_delta), max_value=float(v.max_class_share_delta),
        meta={"check": "class_share_delta", "threshold": float(v.max_class_share_delta)})]
    blocks = [E.ExpectColumnValuesToBeBetween(
        column="block_rate_increase", max_value=float(v.max_block_rate_increase),
        meta={"check": "block_rate_increase", "threshold": float(v.max_block_rate_increase)})]
    return {"samples": samples, "train": train, "label_shares": shares, "block_rates": blocks}


def _observed(res: dict, table: pd.DataFrame, check: str, col: str | None) -> tuple[Any, dict]:
    details: dict[str, Any] = {}
    if "observed_value" in res:
        obs = res["observed_value"]
        if "details" in res:
            details["gx_details"] = res["details"]
        return obs, details
    obs = res.get("unexpected_percent")
    obs = None if obs is None else float(obs) / 100.0
    if check == "provenance_coverage" and obs is not None:
        obs = 1.0 - obs  # report the coverage itself, as the threshold is a coverage
    details["unexpected_count"] = res.get("unexpected_count")
    details["element_count"] = res.get("element_count")
    if res.get("partial_unexpected_list"):
        details["partial_unexpected_list"] = res["partial_unexpected_list"][:20]
    if check in ("class_share_delta", "block_rate_increase") and col in table:
        thr_fail = table.loc[table[col].isin(res.get("partial_unexpected_list") or []), "class_name"].tolist()
        details["classes"] = thr_fail
        obs = float(table[col].abs().max() if check == "class_share_delta" else table[col].max())
    return obs, details


def run_gx(tables: Tables, class_names: Sequence[str], v: ValidateConfig, docs_dir: str | Path | None,
           run_name: str = "poisongate") -> tuple[bool, list[dict]]:
    """Validate the tables with GX; build Data Docs into ``docs_dir`` (index.html) when given."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import logging

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    site_dir = None
    if docs_dir is not None:
        Path(docs_dir).resolve().parent.mkdir(parents=True, exist_ok=True)
        site_dir = Path(tempfile.mkdtemp(prefix=".gx-site-", dir=Path(docs_dir).resolve().parent))
        ctx.add_data_docs_site("poisongate", {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
        })
    ds = ctx.data_sources.add_pandas("poisongate")
    frames = {"samples": tables.samples, "train": tables.train, "label_shares": tables.label_shares,
              "block_rates": tables.block_rates}
    suites = build_suites(tables, class_names, v)
    results: list[dict] = []
    success = True
    for tname, exps in suites.items():
        df = frames[tname].copy()
        for c in df.columns:  # GX wants plain dtypes: nullable Int64 -> object ints/None
            if str(df[c].dtype) == "Int64":
                df[c] = df[c].astype(object).where(df[c].notna(), None)
        bd = ds.add_dataframe_asset(tname).add_batch_definition_whole_dataframe(f"{tname}_all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"poisongate_{tname}"))
        for e in exps:
            suite.add_expectation(e)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=bd, suite=suite, name=f"{run_name}_{tname}"))
        out = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
        success &= bool(out.success)
        for er in out.results:
            cfg = er.expectation_config
            meta = dict(cfg.meta or {})
            col = cfg.kwargs.get("column")
            res = dict(er.result or {})
            obs, details = _observed(res, frames[tname], meta.get("check", ""), col)
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
        docs_dir = Path(docs_dir)
        if docs_dir.exists():
            shutil.rmtree(docs_dir)
        os.replace(site_dir, docs_dir)
    return success, results


# --------------------------------------------------------------------------- stage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--pointer", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--view", required=True)
    ap.add_argument("--approved", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--docs", required=True)
    ap.add_argument("--validated", required=True)
    args = ap.parse_args(argv)
    from pipeline import config, store
    from pipeline.io import write_json
    from pipeline.view import ViewError, apply_records, read_view

    try:
        cfg = config.load(args.params)
        v = cfg.validate
        ptr = store.read_pointer(args.pointer)
        meta, records = read_view(args.view)
        if meta["snapshot_id"] != ptr["snapshot_id"]:
            raise ValidationError(
                f"the view in {args.view} is over snapshot {meta['snapshot_id'][:12]}, the pointer names "
                f"{ptr['snapshot_id'][:12]}: re-run the poison stage")
        snap = store.load_snapshot(args.store, ptr["snapshot_id"], verify=True)
        class_names = list(snap.class_names)
        tr_img, tr_lab, tr_ids = snap.split("train")
        tr_ids = [str(s) for s in tr_ids]
        view_img, view_lab, _ = apply_records(tr_img, tr_lab, tr_ids, records, verify=True)
        ledger = read_ledger(args.approved)
        ref = approved_reference(ledger, class_names, meta["view_id"]) or source_reference(
            snap.id, tr_img, np.asarray(tr_lab, np.int64), len(class_names), v)
        tables = build_tables(snap.manifest, snap.images, view_img, view_lab, tr_ids,
                              {r["sample_id"] for r in records}, class_names, ref, v)
        success, results = run_gx(tables, class_names, v, args.docs if v.docs else None)
    except store.IntegrityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except store.StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, ValidationError, ViewError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    stats = tables.statistics
    report = {
        "success": bool(success),
        "snapshot_id": snap.id,
        "view_id": meta["view_id"],
        "reference": {"kind": ref.kind, "snapshot_id": ref.snapshot_id, "view_id": ref.view_id},
        "results": results,
        "statistics": _jsonable(stats),
        "thresholds": {k: getattr(v, k) for k in v.__dataclass_fields__},
    }
    write_json(Path(args.report), report)
    write_json(Path(args.validated), {"snapshot_id": snap.id, "view_id": meta["view_id"],
                                      "success": bool(success), "on_fail": v.on_fail})
    Path(args.approved).mkdir(parents=True, exist_ok=True)
    if success:
        append_ledger(args.approved, {
            "snapshot_id": snap.id, "view_id": meta["view_id"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "label_shares": stats["label_shares"], "block_rates": stats["block_rates"],
        })
    failed = [r for r in results if not r["success"]]
    print(f"validate: {'PASS' if success else 'FAIL'} view {meta['view_id'][:12]} against {ref.kind} "
          f"reference {ref.snapshot_id[:12]} ({len(results) - len(failed)}/{len(results)} expectations)")
    for r in failed:
        print(f"  failed {r['check']}: {r['expectation']}({r['column']}) observed {r['observed']} "
              f"threshold {r['threshold']}", file=sys.stderr)
    if success:
        return 0
    if v.on_fail == "warn":
        print("validate: on_fail=warn: continuing; train and the gate see success=false", file=sys.stderr)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
