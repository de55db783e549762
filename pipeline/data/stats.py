"""Data-gate statistics, computed with numpy/pandas apart from the judging.

The tables here (per-sample flags, per-class shares and rates, duplicates, provenance) are what
the data gate judges: ``gates.data_checks`` holds the one table of checks over them, from which
the Great Expectations suites (validate stage), the pure judge used by the calibration benches
and the docs are derived. Only the statistics that no library computes are hand-written here
(GX has no image expectation: the pixel-block detector and the per-class rates are ours).
Nothing here imports torch or GX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import entropy

from pipeline.core.attacks import NAMED_LOCATIONS, named_location
from pipeline.core.hashing import sample_hashes
from pipeline.schema import ConfigError, ValidateConfig

REQUIRED_COLUMNS = ("sample_id", "sha256", "label", "split")
PROVENANCE_COLUMNS = ("source_uri", "ingest_time", "snapshot_id")
MAX_DUPLICATE_GROUPS = 50  # duplicate groups listed in a report
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- manifest statistics


def duplicates(manifest: pd.DataFrame, class_names: list[str], cap: int = MAX_DUPLICATE_GROUPS) -> dict:
    """Exact duplicates: one pixel hash under several ids, worst first (several labels, then splits)."""
    dup = manifest[manifest.duplicated("sha256", keep=False)]
    groups = []
    for h, g in dup.groupby("sha256", sort=True):
        labels = sorted({class_names[int(x)] for x in g["label"]})
        splits = sorted(set(g["split"]))
        groups.append({"sha256": h, "sample_ids": g["sample_id"].tolist()[:10], "n": int(len(g)),
                       "labels": labels, "cross_label": len(labels) > 1, "splits": splits,
                       "cross_split": len(splits) > 1})
    groups.sort(key=lambda g: (not g["cross_label"], not g["cross_split"], -g["n"], g["sha256"]))
    n_rows = int(sum(g["n"] - 1 for g in groups))
    return {
        "n_groups": len(groups),
        "n_duplicate_rows": n_rows,  # rows beyond the first of each group
        "rate": n_rows / len(manifest) if len(manifest) else 0.0,
        "n_cross_label_groups": sum(g["cross_label"] for g in groups),
        "n_cross_split_groups": sum(g["cross_split"] for g in groups),
        "groups": groups[:cap],
        "capped": len(groups) > cap,
    }


def provenance(manifest: pd.DataFrame) -> dict:
    """Fraction of rows that say where they came from, what they are and when they were ingested."""
    n = len(manifest)
    has_uri = manifest["source_uri"].astype(str).str.len() > 0
    has_hash = manifest["sha256"].astype(str).str.fullmatch(_HEX64.pattern)
    has_ingest = (manifest["ingest_time"].astype(str).str.len() > 0) & manifest["snapshot_id"].astype(str).str.fullmatch(_HEX64.pattern)
    full = has_uri & has_hash & has_ingest
    return {
        "coverage": float(full.sum() / n) if n else 0.0,
        "rows": n,
        "with_source_uri": int(has_uri.sum()),
        "with_sha256": int(has_hash.sum()),
        "with_ingest_record": int(has_ingest.sum()),
    }


def counts(manifest: pd.DataFrame, class_names: list[str]) -> dict:
    out: dict = {}
    for split in sorted(set(manifest["split"]), key=lambda s: (s != "train", s)):
        part = manifest[manifest["split"] == split]
        by_label = part["label"].astype(int).value_counts()
        out[split] = {"n": int(len(part)),
                      "per_class": {c: int(by_label.get(i, 0)) for i, c in enumerate(class_names)}}
    return out



# ----------------------------------------------------------------------------- training-view statistics


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
    if (q[p > 0] <= 0).any():
        return float("inf")
    return float(entropy(p, q)) if p.sum() > 0 else 0.0


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


@dataclass
class Tables:
    samples: pd.DataFrame
    train: pd.DataFrame
    label_shares: pd.DataFrame
    block_rates: pd.DataFrame
    statistics: dict = field(default_factory=dict)

    @property
    def frames(self) -> dict[str, pd.DataFrame]:
        """The tables by the names ``gates.data_checks`` uses."""
        return {"samples": self.samples, "train": self.train, "label_shares": self.label_shares,
                "block_rates": self.block_rates}


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


