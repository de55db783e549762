"""Data-gate statistics: what the data gate measures, kept apart from how GX judges it.

The data gate blocks a release when its *new rows* differ from what was approved before in a way
an attacker would cause. Earlier rules compared absolute deltas of the whole view with fixed
thresholds set at the single-image floor, so clean growth of ~130 rows per class crossed them by
sampling noise alone (issue 11). Here every per-class rate is judged by an exact test of the new
rows against a reference, corrected for the number of hypotheses, and gated by a minimum effect:

    blocked  <=>  p_adjusted < alpha  AND  effect >= min_effect

Every check yields a *table* (one row per class and comparison, or per cluster) with the columns
``p_value``, ``p_adjusted``, ``effect``, ``min_effect``, ``p_gate`` and ``blocked``. GX judges it
with ``ExpectColumnValuesToBeBetween(column="p_gate", min_value=alpha)``: ``p_gate`` is
``p_adjusted`` where the effect reaches ``min_effect``, else 1.0, so the single column carries the
whole decision rule (equivalently: ``p_adjusted`` with ``row_condition="effect >= min_effect"``).

Rate checks, each one-sided (only an increase is an attack signal):

``block_rate``        share of a class's rows with an abnormal pixel block (:func:`block_flags_all`);
``duplicate_rate``    share of a class's rows whose content hash is on another row;
``label_share``       share of the rows that carry the class (a relabel always *raises* its
                      target class's share; the source's drop is the mirror image of that rise);
``block_rate_prior``  a class's block rate against ``prior_block_rate`` from conf (binomial).

Test against a reference: Fisher's exact test, one-sided ``greater``, of the 2x2 table (new rows:
x of n flagged; reference: X of N flagged), computed as the hypergeometric tail ``P(H >= x)``
(identical to ``scipy.stats.fisher_exact(..., alternative="greater")``, vectorised). Fisher
rather than a binomial against the reference *rate*: the reference is small (65 digits rows per
class), its rate is often 0/65, and a binomial against 0 would call one natural flagged image
impossible; Fisher carries the reference's own uncertainty. The price is that a small reference
cannot establish a low rate (0 of 65 leaves ~5% plausible), so the block rate is also tested by
a binomial (``scipy.stats.binomtest``, vectorised) against a prior rate set in conf: the only
test a first snapshot has, and the one that sees a slow drip against a small root.

Comparisons (``growth_tests``), so that a drip of small appends cannot drift through:

``last_approved``     the new rows (not in the last approved view) vs the last approved view;
``root``              the same new rows vs the root (the first approved view): a staircase whose
                      every step is small against the moving reference is large against the root;
``since_root``        every row added since the root vs the root: evidence accumulates, so k
                      appends each too small to be significant alone become significant together;
``prior`` / ``since_root_prior``  the new rows / every row since the root vs prior_block_rate.
(``root``/``since_root`` are left out while they would repeat ``last_approved``.)

Correction (``judge``): Bonferroni, family-wise, because the gate blocks when *any* hypothesis is
rejected, so its false-block rate on clean data is exactly the family-wise error rate; Holm
would give the same first rejection (it starts at alpha/m) and so the same gate decision, while
Bonferroni keeps each row's ``p_adjusted`` a function of that row alone (what a per-row GX check
needs); FDR control (Benjamini-Hochberg) does not bound the false-block rate. alpha is split
equally between the checks present (4 on growth, 1 on a first snapshot), and within a check the
count m is Tarone's number of *testable* hypotheses: with a discrete test a class with no flagged
row in either sample (or too few to ever reach alpha/m) cannot be rejected, so it does not dilute
the others (Tarone 1990; the standard fix for Fisher tests over many strata). A clean release has
0-3 testable Fisher block-rate hypotheses, so that test keeps its power; the 30 label-share
hypotheses, always testable, spend only their own quarter of alpha.

Effect size: the absolute difference of the rates, ``rate_new - rate_ref``, a fraction (0.02 = 2
percentage points). Not a ratio: reference rates sit at or near 0 (0/65 flagged digits rows)
where a ratio is undefined or explodes, and what poisons a model is the fraction of its rows,
which a difference states directly.

Rules without a rate (any occurrence blocks; measured 0 on clean digits and CIFAR-10):
``label_conflicts`` (one content hash under two labels) and ``near_duplicate_clusters`` (a cluster
of perceptual hashes within ``near_dup_radius`` bits that spans labels). Their tables carry the
same columns, with ``p_value`` 0 for a contradiction (it is not a sampling event) and ``effect``
= the number of extra labels.

Hand-written where no maintained library does it: the all-position block scan (integral images;
GX and scikit-image have no such statistic), Tarone's count (statsmodels' multipletests has no
discrete-test correction, and is not a dependency), and multi-index hashing for Hamming-radius
pairs (the pigeonhole split of the 64 bits; imagehash compares one pair at a time).

numpy, pandas, scipy.stats and imagehash only; no GX, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as st

from pipeline.core.attacks import NAMED_LOCATIONS, named_location

RATE_CHECKS = ("block_rate", "duplicate_rate", "label_share")
COMPARISONS = ("last_approved", "root", "since_root", "prior", "since_root_prior")
TABLE_COLUMNS = (
    "check", "comparison", "class_index", "class_name", "x_new", "n_new", "rate_new", "x_ref", "n_ref",
    "rate_ref", "effect", "p_value", "p_min", "testable", "m_tests", "p_adjusted", "alpha", "min_effect",
    "p_gate", "blocked",
)


class StatsError(ValueError):
    """Bad input to a data-gate statistic (the message says what to pass instead)."""


@dataclass(frozen=True)
class GateParams:
    """Thresholds of the statistical data gate (conf/validate keys of the same names).

    alpha                      family-wise false-block rate of one validation on clean data (0.01:
                               the issue's target of <= 1% clean appends blocked).
    min_effect_block_rate      fraction of a class's new rows with an abnormal block beyond the
                               reference's rate (0.02: above the highest clean per-class rate seen,
                               digits class 1 at 1.7%, so a class reaching its natural rate in a big
                               append never blocks; a 3x3 patch on 1% of an append lands ~10x this
                               in its target class).
    min_effect_share           rise of a class's share of the rows (0.02: a real distribution
                               drift of 1-2 points is not an attack; a relabel of >= 2% of the
                               rows into one class is).
    min_effect_duplicate_rate  rise of a class's share of rows whose hash is on another row (0.01:
                               the old max_duplicate_rate; clean digits and CIFAR-10 have none).
    prior_block_rate           the block rate a first snapshot is tested against, per class (0.02:
                               digits' class 1 sits at 1.7% with the all-position scan, CIFAR-10's
                               classes at <= 0.2%).
    near_dup_radius            Hamming radius in bits of 64-bit phash (2: the closest cross-label
                               pair over all 1,797 digits is 8 bits apart and over all 60,000
                               CIFAR-10 images 4 bits; phash distances come in even steps).
    """

    alpha: float = 0.01
    min_effect_block_rate: float = 0.02
    min_effect_share: float = 0.02
    min_effect_duplicate_rate: float = 0.01
    prior_block_rate: float = 0.02
    near_dup_radius: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise StatsError(f"alpha must be in (0, 1), got {self.alpha}: 0.01 blocks <= 1% of clean releases")
        for k in ("min_effect_block_rate", "min_effect_share", "min_effect_duplicate_rate", "prior_block_rate"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise StatsError(f"{k} is a fraction in [0, 1], got {v}")
        if not 0 <= int(self.near_dup_radius) <= 16:
            raise StatsError(f"near_dup_radius is a Hamming distance of 0..16 bits, got {self.near_dup_radius}")

    def min_effect(self, check: str) -> float:
        return {
            "block_rate": self.min_effect_block_rate,
            "block_rate_prior": self.min_effect_block_rate,
            "duplicate_rate": self.min_effect_duplicate_rate,
            "label_share": self.min_effect_share,
        }[check]


# --------------------------------------------------------------------------- abnormal pixel blocks


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise StatsError(f"images must be a uint8 (N, H, W, C) array, got {images.dtype} {images.shape}")
    return images


def _box(ii: np.ndarray, img: np.ndarray, ya, yb, xa, xb) -> np.ndarray:
    """Sum over [ya, yb) x [xa, xb) per candidate, from integral images ii (m, H+1, W+1, C)."""
    return (ii[img, yb, xb] - ii[img, ya, xb] - ii[img, yb, xa] + ii[img, ya, xa]).astype(np.float64)


def block_flags_all(
    images: np.ndarray,
    sizes: Sequence[int] = (3,),
    low: float = 16,
    high: float = 239,
    max_std: float = 4.0,
    min_contrast: float = 64.0,
    *,
    chunk: int = 1024,
) -> pd.DataFrame:
    """Abnormal k x k pixel blocks at *every* position (every k in ``sizes``), per image.

    The attack module places a patch at a named location (corners, centre) or at ``random`` /
    concrete positions; a scan of the five named locations (``validate.block_flags``) never sees
    the latter. Same block definition as there: *uniform* (every channel's std <= ``max_std``),
    *extreme* (every channel's mean <= ``low`` or every one >= ``high``) and *foreign* (differs
    by >= ``min_contrast`` in some channel's mean from its ring, the pixels within max(1, k // 2)
    of the block clipped to the image, and from the image's per-channel median). The foreign test
    is what keeps clean data quiet (dark digit background = the median; white sky = its ring).

    Vectorised with integral images (sums and sums of squares of all windows at once, exact
    integers: int32 while H * W * 255^2 fits, int64 beyond); ring and median only for the few
    windows already uniform and extreme (CIFAR-10's 50,000 images: ~12 s on a busy core, the
    named scan ~3 s). A patch smaller than every k is not seen (a 2x2 patch
    inside a 3x3 window is not uniform); k = 2 is not a usable default (it flags 10% of clean
    digits: thick strokes); a patch larger than k is seen at its corner windows.

    Returns the columns of ``validate.block_flags``: ``abnormal_block`` (bool),
    ``abnormal_block_at`` (the named location when the block sits at one, else ``"[y, x]"`` of
    its top-left pixel, suffixed ``" k=K"`` when several sizes are scanned; "" when none) and
    ``block_<loc>`` (bool per named location, first size), plus ``block_y``, ``block_x``,
    ``block_k`` (-1 when none). Named positions win when an image has several blocks.
    """
    images = _check_images(images)
    n, h, w, c = images.shape
    sizes = [int(k) for k in sizes]
    if not sizes or any(k < 1 or k > min(h, w) for k in sizes):
        raise StatsError(f"block sizes {sizes} do not fit the {h}x{w} images: use sizes in 1..{min(h, w)}")
    if chunk < 1:
        raise StatsError(f"chunk must be >= 1, got {chunk}")
    big_dtype = np.int32 if h * w * 255 * 255 < 2**31 else np.int64
    best = np.full(n, np.iinfo(np.int64).max, np.int64)  # priority of the reported block
    by, bx, bk = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    named_flags = {loc: np.zeros(n, bool) for loc in NAMED_LOCATIONS}
    for si, k in enumerate(sizes):
        named = {named_location(loc, (h, w), k): j for j, loc in enumerate(NAMED_LOCATIONS)}
        rank = np.full((h - k + 1, w - k + 1), -1, np.int64)
        for (y, x), j in named.items():
            rank[y, x] = j if rank[y, x] < 0 else min(rank[y, x], j)
        r = max(1, k // 2)
        for i0 in range(0, n, chunk):
            x8 = images[i0 : i0 + chunk]
            m = len(x8)
            xi = x8.astype(big_dtype)
            ii = np.zeros((m, h + 1, w + 1, c), big_dtype)
            ii[:, 1:, 1:] = xi.cumsum(1).cumsum(2)
            s = (ii[:, k:, k:] - ii[:, :-k, k:] - ii[:, k:, :-k] + ii[:, :-k, :-k]).astype(np.int64)
            kk = k * k
            extreme = (s <= low * kk).all(axis=3) | (s >= high * kk).all(axis=3)
            if not extreme.any():
                continue
            img, ys, xs = np.nonzero(extreme)
            sq = xi * xi
            ii2 = np.zeros((m, h + 1, w + 1, c), big_dtype)
            ii2[:, 1:, 1:] = sq.cumsum(1).cumsum(2)
            s1 = s[img, ys, xs].astype(np.float64)  # (t, c)
            s2 = _box(ii2, img, ys, ys + k, xs, xs + k)
            var = np.maximum(s2 / kk - (s1 / kk) ** 2, 0.0)
            keep = (var <= max_std**2 + 1e-9).all(axis=1)
            if not keep.any():
                continue
            img, ys, xs, s1 = img[keep], ys[keep], xs[keep], s1[keep]
            bmean = s1 / kk
            ya, yb = np.maximum(ys - r, 0), np.minimum(ys + k + r, h)
            xa, xb = np.maximum(xs - r, 0), np.minimum(xs + k + r, w)
            ring_n = ((yb - ya) * (xb - xa) - kk).astype(np.float64)
            ring_sum = _box(ii, img, ya, yb, xa, xb) - s1
            contrast = np.where(ring_n > 0, np.abs(bmean - ring_sum / np.maximum(ring_n, 1)[:, None]).max(axis=1), 0.0)
            uimg, inv = np.unique(img, return_inverse=True)
            med = np.median(x8[uimg].reshape(len(uimg), h * w, c), axis=1)[inv]  # (t, c)
            off_bg = np.abs(bmean - med).max(axis=1)
            flag = (contrast >= min_contrast) & (off_bg >= min_contrast)
            if not flag.any():
                continue
            img, ys, xs = img[flag], ys[flag], xs[flag]
            g = i0 + img
            nr = rank[ys, xs]
            if si == 0:
                for j, loc in enumerate(NAMED_LOCATIONS):
                    named_flags[loc][g[nr == j]] = True
            # priority: earlier size, then named location order, then row-major position
            prio = si * 10**9 + np.where(nr >= 0, nr, len(NAMED_LOCATIONS) + ys * (w + 1) + xs)
            order = np.lexsort((prio, g))
            g, prio, ys, xs = g[order], prio[order], ys[order], xs[order]
            first = np.r_[True, g[1:] != g[:-1]]
            g, prio, ys, xs = g[first], prio[first], ys[first], xs[first]
            better = prio < best[g]
            g, prio, ys, xs = g[better], prio[better], ys[better], xs[better]
            best[g], by[g], bx[g], bk[g] = prio, ys, xs, k
    flagged = by >= 0
    at = np.full(n, "", dtype=object)
    for i in np.flatnonzero(flagged):
        k = int(bk[i])
        loc = next((lo for lo in NAMED_LOCATIONS if named_location(lo, (h, w), k) == (by[i], bx[i])), None)
        s_ = loc or f"[{by[i]}, {bx[i]}]"
        at[i] = s_ + (f" k={k}" if len(sizes) > 1 else "")
    df = pd.DataFrame({"abnormal_block": flagged, "abnormal_block_at": at.astype(str)})
    for loc in NAMED_LOCATIONS:
        df[f"block_{loc}"] = named_flags[loc]
    df["block_y"], df["block_x"], df["block_k"] = by, bx, bk
    return df


# --------------------------------------------------------------------------- duplicates


def duplicate_mask(hashes: Sequence[str]) -> np.ndarray:
    """True for every row whose content hash is on another row too."""
    return pd.Series(list(hashes), dtype=object).duplicated(keep=False).to_numpy(bool)


def label_conflicts(hashes: Sequence[str], labels: Sequence[int]) -> pd.DataFrame:
    """One row per content hash found under more than one label (a contradiction: always blocks).

    Columns: ``sha256``, ``n_rows``, ``n_labels``, ``labels`` (sorted list), ``rows`` (indices),
    then the judged columns (``p_value`` 0, ``effect`` = n_labels - 1, ``blocked`` True).
    """
    df = pd.DataFrame({"sha256": list(hashes), "label": np.asarray(labels, np.int64)})
    if len(df) != len(np.asarray(labels)):
        raise StatsError(f"{len(df)} hashes but {len(np.asarray(labels))} labels: pass one of each per row")
    g = df.groupby("sha256")["label"]
    nlab = g.nunique()
    bad = nlab[nlab > 1].index
    rows = []
    for hsh in bad:
        idx = np.flatnonzero(df["sha256"].to_numpy() == hsh)
        rows.append({"sha256": hsh, "n_rows": len(idx), "n_labels": int(nlab[hsh]),
                     "labels": sorted(set(df["label"].iloc[idx].tolist())), "rows": idx.tolist()})
    return _rule_table(pd.DataFrame(rows, columns=["sha256", "n_rows", "n_labels", "labels", "rows"]), "label_conflicts")


def perceptual_hashes(images: np.ndarray, method: str = "phash") -> np.ndarray:
    """64-bit perceptual hash of every image (``imagehash.phash`` / ``dhash`` / ``average_hash``,
    hash_size 8) as uint64, colour images via their luminance. ~0.15 ms per image (CIFAR-10's
    60,000 in ~9 s on one busy core), so a stage should cache it by content hash."""
    import imagehash
    from PIL import Image

    images = _check_images(images)
    fns = {"phash": imagehash.phash, "dhash": imagehash.dhash, "average_hash": imagehash.average_hash}
    if method not in fns:
        raise StatsError(f"unknown perceptual hash {method!r}: use one of {', '.join(fns)}")
    fn = fns[method]
    out = np.empty(len(images), np.uint64)
    grey = images.shape[3] == 1
    for i, im in enumerate(images):
        bits = fn(Image.fromarray(im[..., 0] if grey else im)).hash.reshape(-1).astype(np.uint8)
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def near_duplicate_pairs(phashes: np.ndarray, radius: int) -> pd.DataFrame:
    """All pairs (i < j) of 64-bit hashes within ``radius`` bits (columns ``i``, ``j``, ``distance``).

    Multi-index hashing: split the 64 bits into radius + 1 chunks; by the pigeonhole principle two
    hashes within ``radius`` bits agree exactly on at least one chunk, so candidate pairs come
    from equal chunk values and only those are compared. Exact (no pair is missed), and near-linear
    on real data where chunk values are spread (CIFAR-10's 60,000 hashes: about a second) instead
    of the 1.8e9 comparisons of all pairs.
    """
    h = np.asarray(phashes, np.uint64)
    radius = int(radius)
    if radius < 0 or radius > 16:
        raise StatsError(f"near-duplicate radius must be 0..16 bits, got {radius}")
    n = len(h)
    if n < 2:
        return pd.DataFrame({"i": np.zeros(0, np.int64), "j": np.zeros(0, np.int64), "distance": np.zeros(0, np.int64)})
    bounds = np.linspace(0, 64, radius + 2).round().astype(int)
    ii, jj = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        ends = np.r_[starts[1:], n]
        for s_, e_ in zip(starts[(ends - starts) > 1], ends[(ends - starts) > 1]):
            members = np.sort(order[s_:e_])
            a, b = np.triu_indices(len(members), 1)
            ii.append(members[a])
            jj.append(members[b])
    if not ii:
        return pd.DataFrame({"i": np.zeros(0, np.int64), "j": np.zeros(0, np.int64), "distance": np.zeros(0, np.int64)})
    i = np.concatenate(ii)
    j = np.concatenate(jj)
    pairs = np.unique(np.stack([i, j], 1), axis=0)
    d = _hamming(h[pairs[:, 0]], h[pairs[:, 1]])
    keep = d <= radius
    return pd.DataFrame({"i": pairs[keep, 0], "j": pairs[keep, 1], "distance": d[keep]})


def near_duplicate_clusters(phashes: np.ndarray, labels: Sequence[int], radius: int,
                            spanning_only: bool = True) -> pd.DataFrame:
    """Clusters of near-duplicate rows (connected components of the within-``radius`` pairs).

    A cluster spans labels exactly when it holds a cross-label pair, so the measured count of
    clean cross-label pairs (0 at radius 2 on digits and CIFAR-10) is the false-cluster count.
    Columns: ``cluster``, ``n_rows``, ``n_labels``, ``labels``, ``rows``, ``max_distance``, then
    the judged columns (a cluster under two labels blocks).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    labels = np.asarray(labels, np.int64)
    h = np.asarray(phashes, np.uint64)
    if len(h) != len(labels):
        raise StatsError(f"{len(h)} hashes but {len(labels)} labels: pass one of each per row")
    pairs = near_duplicate_pairs(h, radius)
    cols = ["cluster", "n_rows", "n_labels", "labels", "rows", "max_distance"]
    if pairs.empty:
        return _rule_table(pd.DataFrame(columns=cols), "near_duplicate_clusters")
    n = len(h)
    g = coo_matrix((np.ones(len(pairs)), (pairs["i"], pairs["j"])), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    involved = np.unique(np.r_[pairs["i"].to_numpy(), pairs["j"].to_numpy()])
    pair_comp = comp[pairs["i"].to_numpy()]
    maxd = pd.Series(pairs["distance"].to_numpy()).groupby(pair_comp).max()
    rows = []
    for cid in np.unique(comp[involved]):
        idx = np.flatnonzero(comp == cid)
        labs = sorted(set(labels[idx].tolist()))
        if spanning_only and len(labs) < 2:
            continue
        rows.append({"cluster": int(cid), "n_rows": len(idx), "n_labels": len(labs), "labels": labs,
                     "rows": idx.tolist(), "max_distance": int(maxd[cid])})
    return _rule_table(pd.DataFrame(rows, columns=cols), "near_duplicate_clusters")


def _rule_table(df: pd.DataFrame, check: str) -> pd.DataFrame:
    """Judged columns for a rule without a rate: a row under >= 2 labels is a contradiction."""
    df = df.copy()
    nl = df["n_labels"].to_numpy(np.int64) if len(df) else np.zeros(0, np.int64)
    df.insert(0, "check", check)
    df["effect"] = (nl - 1).astype(float)
    df["p_value"] = np.where(nl > 1, 0.0, 1.0)
    df["p_adjusted"] = df["p_value"]
    df["min_effect"] = 1.0
    df["p_gate"] = np.where(nl > 1, 0.0, 1.0)
    df["blocked"] = nl > 1
    return df


# --------------------------------------------------------------------------- per-class counts


@dataclass(frozen=True, eq=False)
class ClassCounts:
    """Per-class counts of a set of rows: ``rows``, rows with an abnormal ``block``, rows whose
    hash is a ``dup``licate. Small enough for the approved ledger, and all a Fisher test needs."""

    rows: np.ndarray
    block: np.ndarray
    dup: np.ndarray

    def __post_init__(self) -> None:
        arrs = [np.asarray(a, np.int64) for a in (self.rows, self.block, self.dup)]
        if len({a.shape for a in arrs}) != 1 or arrs[0].ndim != 1:
            raise StatsError(f"rows/block/dup must be equal-length 1-D count arrays, got {[a.shape for a in arrs]}")
        if (arrs[0] < 0).any() or (arrs[1] < 0).any() or (arrs[2] < 0).any() or (arrs[1] > arrs[0]).any() or (arrs[2] > arrs[0]).any():
            raise StatsError("counts must satisfy 0 <= block, dup <= rows per class")
        for name, a in zip(("rows", "block", "dup"), arrs):
            object.__setattr__(self, name, a)

    @property
    def n_classes(self) -> int:
        return len(self.rows)

    @classmethod
    def of(cls, labels: Sequence[int], block: Sequence[bool], dup: Sequence[bool], n_classes: int) -> "ClassCounts":
        labels = np.asarray(labels, np.int64)
        block, dup = np.asarray(block, bool), np.asarray(dup, bool)
        if not (len(labels) == len(block) == len(dup)):
            raise StatsError(f"labels ({len(labels)}), block ({len(block)}) and dup ({len(dup)}) flags differ in length")
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise StatsError(f"labels must be class indices 0..{n_classes - 1}")
        bc = lambda m: np.bincount(labels[m], minlength=n_classes)  # noqa: E731
        return cls(bc(np.ones(len(labels), bool)), bc(block), bc(dup))

    def __eq__(self, o: object) -> bool:
        return isinstance(o, ClassCounts) and _same(self, o)

    __hash__ = None  # mutable arrays inside

    def __add__(self, o: "ClassCounts") -> "ClassCounts":
        return ClassCounts(self.rows + o.rows, self.block + o.block, self.dup + o.dup)

    def __sub__(self, o: "ClassCounts") -> "ClassCounts":
        return ClassCounts(self.rows - o.rows, self.block - o.block, self.dup - o.dup)

    def to_dict(self, class_names: Sequence[str]) -> dict:
        """JSON-able ``{class: {rows, block, dup}}`` for the approved ledger."""
        return {str(c): {"rows": int(self.rows[i]), "block": int(self.block[i]), "dup": int(self.dup[i])}
                for i, c in enumerate(class_names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, int]], class_names: Sequence[str]) -> "ClassCounts":
        missing = [str(c) for c in class_names if str(c) not in d]
        if missing:
            raise StatsError(f"ledger counts lack classes {missing}: the entry is over other classes")
        g = lambda k: [int(d[str(c)].get(k, 0)) for c in class_names]  # noqa: E731
        return cls(g("rows"), g("block"), g("dup"))


def new_row_mask(ids: Sequence[str], hashes: Sequence[str], labels: Sequence[int],
                 ref_ids: Sequence[str], ref_hashes: Sequence[str], ref_labels: Sequence[int]) -> np.ndarray:
    """True for each row whose (sample_id, content hash, label) is not in the reference: appended
    rows and approved rows the view changed (an edit is new evidence too)."""
    ref = set(zip(map(str, ref_ids), map(str, ref_hashes), (int(v) for v in ref_labels)))
    return np.array([(str(i), str(h), int(y)) not in ref for i, h, y in zip(ids, hashes, labels)], bool)


# --------------------------------------------------------------------------- exact tests


def fisher_greater(x: np.ndarray, n: np.ndarray, x_ref: np.ndarray, n_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Fisher exact test (new rate > reference rate) per entry, and its smallest
    achievable p-value given the margins (what Tarone's count needs).

    ``P(H >= x)`` for H hypergeometric (population n + n_ref, x + x_ref flagged, n drawn) is
    exactly ``scipy.stats.fisher_exact([[x, n - x], [x_ref, n_ref - x_ref]], "greater")``,
    vectorised. An empty sample gives p = 1 (nothing to test).
    """
    x, n, X, N = (np.asarray(a, np.int64) for a in (x, n, x_ref, n_ref))
    if (x < 0).any() or (x > n).any() or (X < 0).any() or (X > N).any():
        raise StatsError("Fisher test needs 0 <= x <= n and 0 <= x_ref <= n_ref")
    M, T = n + N, x + X
    p = np.where(n > 0, st.hypergeom.sf(x - 1, M, T, n), 1.0)
    xmax = np.minimum(n, T)
    p_min = np.where((n > 0) & (T > 0), st.hypergeom.sf(xmax - 1, M, T, n), 1.0)
    return np.clip(p, 0.0, 1.0), np.clip(p_min, 0.0, 1.0)


def binom_greater(x: np.ndarray, n: np.ndarray, p0: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided binomial test (rate > p0) per entry, = ``scipy.stats.binomtest(x, n, p0,
    "greater").pvalue`` vectorised, and the smallest achievable p-value (all n flagged: p0**n)."""
    x, n = np.asarray(x, np.int64), np.asarray(n, np.int64)
    if not 0.0 <= p0 <= 1.0:
        raise StatsError(f"prior rate must be in [0, 1], got {p0}")
    p = np.where(n > 0, st.binom.sf(x - 1, n, p0), 1.0)
    p_min = np.where(n > 0, st.binom.pmf(n, n, p0), 1.0)
    return np.clip(p, 0.0, 1.0), np.clip(p_min, 0.0, 1.0)


def tarone_count(p_min: np.ndarray, alpha: float) -> int:
    """Tarone's number of testable hypotheses: the smallest K with #{p_min <= alpha / K} <= K.

    A hypothesis whose smallest achievable p-value is above alpha / K can never be rejected at
    that level, so Bonferroni over the K others keeps the family-wise error <= alpha (Tarone,
    Biometrics 1990) while not diluting them.
    """
    pm = np.sort(np.asarray(p_min, float))
    m = len(pm)
    for k in range(1, m + 1):
        if np.searchsorted(pm, alpha / k, side="right") <= k:
            return k
    return max(m, 1)


def _rows(check: str, comparison: str, x, n, X, N, rate_ref, p, p_min, class_names: Sequence[str]) -> dict:
    C = len(class_names)
    x, n = np.asarray(x, np.int64), np.asarray(n, np.int64)
    rn = np.divide(x, n, out=np.zeros(C), where=n > 0)
    return {
        "check": np.full(C, check, dtype=object), "comparison": np.full(C, comparison, dtype=object),
        "class_index": np.arange(C), "class_name": np.array([str(c) for c in class_names], dtype=object),
        "x_new": x, "n_new": n, "rate_new": rn, "x_ref": np.broadcast_to(np.asarray(X, np.int64), (C,)),
        "n_ref": np.broadcast_to(np.asarray(N, np.int64), (C,)), "rate_ref": np.broadcast_to(np.asarray(rate_ref, float), (C,)),
        "effect": np.where(n > 0, rn - rate_ref, 0.0), "p_value": p, "p_min": p_min,
    }


def _rate_rows(new: ClassCounts, ref: ClassCounts, comparison: str, class_names: Sequence[str],
               checks: Sequence[str]) -> list[dict]:
    if new.n_classes != ref.n_classes or new.n_classes != len(class_names):
        raise StatsError(f"counts over {new.n_classes} and {ref.n_classes} classes, {len(class_names)} names: "
                         "compare views over the same class list")
    C = new.n_classes
    out = []
    for check in checks:
        if check == "block_rate":
            x, n, X, N = new.block, new.rows, ref.block, ref.rows
        elif check == "duplicate_rate":
            x, n, X, N = new.dup, new.rows, ref.dup, ref.rows
        elif check == "label_share":
            x, n = new.rows, np.full(C, new.rows.sum())
            X, N = ref.rows, np.full(C, ref.rows.sum())
        else:
            raise StatsError(f"unknown rate check {check!r}: use one of {', '.join(RATE_CHECKS)}")
        p, pmin = fisher_greater(x, n, X, N)
        rr = np.divide(X, N, out=np.zeros(C), where=N > 0)
        out.append(_rows(check, comparison, x, n, X, N, rr, p, pmin, class_names))
    return out


def _prior_rows(rows: ClassCounts, prior_rate: float, comparison: str, class_names: Sequence[str]) -> dict:
    if rows.n_classes != len(class_names):
        raise StatsError(f"counts over {rows.n_classes} classes, {len(class_names)} names")
    p, pmin = binom_greater(rows.block, rows.rows, prior_rate)
    return _rows("block_rate_prior", comparison, rows.block, rows.rows, 0, 0, float(prior_rate), p, pmin, class_names)


def _frame(parts: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def rate_tests(new: ClassCounts, ref: ClassCounts, comparison: str, class_names: Sequence[str],
               checks: Sequence[str] = RATE_CHECKS) -> pd.DataFrame:
    """Unjudged rows (one per check and class) of the new rows against one reference (Fisher)."""
    return _frame(_rate_rows(new, ref, comparison, class_names, checks))


def prior_tests(rows: ClassCounts, prior_rate: float, class_names: Sequence[str], comparison: str = "prior") -> pd.DataFrame:
    """Unjudged ``block_rate_prior`` rows: each class's block rate against a prior rate (binomial).

    Needs no history, so it is what a first snapshot has; later releases run it too, on the new
    rows and on everything since the root, because a small root cannot establish a low rate by
    itself (0 of 65 flagged rows leaves a clean rate up to ~5% plausible, so Fisher against it
    cannot see a drip of 1-2 patched rows per append; the prior can)."""
    return _frame([_prior_rows(rows, prior_rate, comparison, class_names)])


def _judge_arrays(t: dict, params: GateParams) -> dict:
    check = t["check"]
    families = list(dict.fromkeys(check.tolist()))
    share = params.alpha / max(1, len(families))
    n = len(check)
    testable, m_tests = np.zeros(n, bool), np.zeros(n, np.int64)
    p_adj, min_eff = np.ones(n), np.zeros(n)
    for fam in families:
        m = check == fam
        k = tarone_count(t["p_min"][m], share)
        tm = m & (t["p_min"] <= share / k)
        testable |= tm
        m_tests[m] = k * len(families)
        p_adj[tm] = np.minimum(1.0, t["p_value"][tm] * k * len(families))
        min_eff[m] = params.min_effect(fam)
    material = t["effect"] >= min_eff - 1e-12
    t = dict(t)
    t.update({"testable": testable, "m_tests": m_tests, "p_adjusted": p_adj, "alpha": np.full(n, params.alpha),
              "min_effect": min_eff, "p_gate": np.where(material, p_adj, 1.0),
              "blocked": (p_adj < params.alpha) & material})
    return t


def judge(table: pd.DataFrame, params: GateParams) -> pd.DataFrame:
    """Add the correction and the decision: ``testable``, ``m_tests``, ``p_adjusted``, ``alpha``,
    ``min_effect``, ``p_gate``, ``blocked``.

    alpha is split equally between the checks present (Bonferroni over the checks); within a
    check ``p_adjusted = min(1, p * K * n_checks)`` with K Tarone's count of its testable rows
    (an untestable row gets p_adjusted 1). ``blocked = p_adjusted < alpha and effect >=
    min_effect``; ``p_gate`` = p_adjusted where the effect reaches min_effect, else 1 (GX:
    ``p_gate >= alpha`` on every row).
    """
    if table.empty:
        t = table.copy()
        for col in TABLE_COLUMNS:
            if col not in t:
                t[col] = pd.Series(dtype=bool if col in ("testable", "blocked") else float)
        return t[list(TABLE_COLUMNS)]
    t = {c: table[c].to_numpy() for c in table.columns}
    t["effect"] = t["effect"].astype(float)
    t["p_value"], t["p_min"] = t["p_value"].astype(float), t["p_min"].astype(float)
    return pd.DataFrame(_judge_arrays(t, params))[list(TABLE_COLUMNS)]


def _same(a: ClassCounts, b: ClassCounts) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("rows", "block", "dup"))


def growth_tests(new: ClassCounts, last: ClassCounts, class_names: Sequence[str], params: GateParams, *,
                 new_vs_root: ClassCounts | None = None, root: ClassCounts | None = None,
                 checks: Sequence[str] = RATE_CHECKS, prior: bool = True) -> pd.DataFrame:
    """The judged rate-check table of one release against its history.

    new          the rows not in the last approved view (appended or edited);
    last         the last approved view;
    new_vs_root  the rows not in the root (the first approved view): everything since the root;
    root         the root.
    Fisher rows: ``last_approved`` (new vs last); with a root that differs from the last approved
    view also ``root`` (new vs root) and, when new_vs_root holds more than new, ``since_root``
    (new_vs_root vs root). Binomial rows (``block_rate_prior``, when ``prior``): ``prior`` (new vs
    prior_block_rate) and ``since_root_prior`` (new_vs_root vs prior_block_rate).
    """
    parts = _rate_rows(new, last, "last_approved", class_names, checks)
    since = new_vs_root is not None and not _same(new_vs_root, new)
    if root is not None and not _same(root, last):
        parts += _rate_rows(new, root, "root", class_names, checks)
        if since:
            parts += _rate_rows(new_vs_root, root, "since_root", class_names, checks)
    if prior:
        parts.append(_prior_rows(new, params.prior_block_rate, "prior", class_names))
        if since:
            parts.append(_prior_rows(new_vs_root, params.prior_block_rate, "since_root_prior", class_names))
    t = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return pd.DataFrame(_judge_arrays(t, params))[list(TABLE_COLUMNS)]


def first_snapshot_tests(rows: ClassCounts, class_names: Sequence[str], params: GateParams) -> pd.DataFrame:
    """The judged prior block-rate table of a release with no approved history (all rows new)."""
    t = _prior_rows(rows, params.prior_block_rate, "prior", class_names)
    return pd.DataFrame(_judge_arrays(t, params))[list(TABLE_COLUMNS)]


def blocked_summary(table: pd.DataFrame) -> dict:
    """``{"blocked": bool, "reasons": [short text per blocked row]}`` for logs and reports."""
    if table.empty or "blocked" not in table:
        return {"blocked": False, "reasons": []}
    b = table[table["blocked"]]
    reasons = []
    for _, r in b.iterrows():
        if "comparison" in r and isinstance(r.get("comparison"), str):
            reasons.append(f"{r['check']}[{r['class_name']}] vs {r['comparison']}: {r['rate_new']:.4f} vs "
                           f"{r['rate_ref']:.4f} (effect {r['effect']:+.4f}, p_adj {r['p_adjusted']:.2g})")
        else:
            reasons.append(f"{r['check']}: rows {list(r.get('rows', []))[:10]} under labels {r.get('labels')}")
    return {"blocked": bool(len(b)), "reasons": reasons}
