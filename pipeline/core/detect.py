"""Poisoned-sample detection on penultimate-layer features (torch + numpy only).

Every detector takes the candidate's features of the training view, ``(N, D)`` float, with the
view's labels, and returns a :class:`Detection`: per-sample scores (higher = more suspect), a
flagged bool per sample, and one statistic per class (higher = more likely to hold a poisoned
cluster) that a gate thresholds.

Two published baselines, kept as published so the bench can measure them in the same run:

- :func:`spectral_signatures` (Tran, Li, Madry 2018): per class, the squared projection of the
  mean-centred features on their top singular vector; the top ``1.5 * eps`` of every class is
  removed. It assumes the poison is a small minority (the mean is the clean mean, the top
  direction is the poison direction) and has no decision rule: it always removes 1.5 eps.
- :func:`activation_clustering` (Chen et al. 2018, as run by BackdoorBench): per class, PCA to
  10 dimensions, 2-means, and the smaller cluster is poison (``analysis="smaller"``, BackdoorBench's
  setting) or only when it holds < 35% of the class (``"relative-size"``, ART's default).

Both fail when the target class is about half poison (all-to-one at 10% makes the digits target
class 47% poison): the mean sits between the two modes, and the smaller 2-means cluster can be the
clean one or a slice of either.

:func:`robust_detect` (ours) scores every row against a per-class *reference*: the features of a
trusted clean split (the evaluation split, which the gate already trusts for accuracy and ASR) or,
without one, the training rows themselves through a median-rank neighbour that stays in the clean
mode while a class is less than half poison. In one feature space, with D_j(x) the distance from
x to its q-th nearest reference row of class j:

- ``outlyingness`` a(x) = D_c(x) / (median of D_c over the reference of class c): far from every
  clean row of its label (a backdoor maps its rows to a trigger region);
- ``foreignness`` r(x) = D_c(x) / min_{j != c} D_j(x): closer to another class than to its label
  (a flipped row; a source-specific backdoor's row still resembles its source).

``suspicion`` s(x) = a(x) * r(x). Both ratios are scale-free, so one threshold fits every class.
The candidate's own features blur r for backdoors (it learned to put triggered rows near their
target), so when a clean split exists r is taken from a second feature space, a *clean model*
trained on that split alone (as many optimizer steps as the candidate): it never saw a poisoned
row, and every dirty-label poison (patch, blend, flip, swap) looks there like the class it
depicts. In bench/results/detect_samples.md the candidate-only score blocked 43 of 47 effective
digits attacks at 0/20 clean false blocks, the two-view score all 47 (the misses were 1-7-row
source-specific patches).

The class statistic is a *tail scan ratio*: T_c = max over depths m of s_(m) / Q_{-c}(1 - m/n_c),
where s_(m) is the m-th largest suspicion in class c and Q_{-c} the quantile function of the
suspicion of all rows of the other classes. A clean class's m-th largest row sits at the level of
the m-th largest of a same-size draw from the other classes (ratio ~1 at every depth); a class
holding a poisoned cluster of m rows has its top m rows far above (depth m small: a few extreme
rows, a source-specific backdoor of 3 rows; depth m large: a bimodal class, all-to-one at 10-20%).
Depths start at 3 rows (1-2 extreme rows are natural outliers; 3 poisoned rows already reached ASR
0.83 on digits) and stop at 75% of the class (all-to-one 20% makes the target class 64% poison).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch

SCORE_EPS = 1e-12  # floor of a distance or a quantile before a division (duplicate rows have distance 0)


class DetectError(ValueError):
    """Input a detector refuses; the message says what to change."""


@dataclass(frozen=True)
class Detection:
    """What a detector found in one training view.

    ``scores``: name -> (N,) float64, higher = more suspect; the first entry is the primary score
    (the one AUROC is computed from). ``flagged``: (N,) bool. ``class_stat``: (K,) float64, higher
    = more suspicious, 0 for a class with too few rows to judge. ``class_stats``: every per-class
    statistic by name (``class_stat`` is the one named ``class_stat_name``). ``suspicious``: the
    classes the detector's own decision rule calls suspicious (empty for the published baselines,
    which have none). ``params``: the settings used.
    """

    method: str
    scores: dict[str, np.ndarray]
    flagged: np.ndarray
    class_stat: np.ndarray
    class_stat_name: str
    params: dict[str, Any] = field(default_factory=dict)
    class_stats: dict[str, np.ndarray] = field(default_factory=dict)
    suspicious: tuple[int, ...] = ()

    @property
    def primary(self) -> np.ndarray:
        return next(iter(self.scores.values()))

    def suspicious_classes(self, threshold: float) -> list[int]:
        """Classes whose ``class_stat`` reaches ``threshold`` (NaN counts as suspicious: fail closed).
        The robust detector's own rule (both bands) is ``suspicious``."""
        s = self.class_stat
        return [int(c) for c in np.flatnonzero(~(s < threshold))]


# --------------------------------------------------------------------------- validation


def _check(features: Any, labels: Any, num_classes: int, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(features as dtype, labels as int64)``; the robust detector asks for float32,
    the precision its distances are computed in (a float64 copy was 2x the features' memory)."""
    f = _check_features(features, dtype)
    return f, _check_labels(labels, len(f), num_classes)


def _check_features(features: Any, dtype: Any) -> np.ndarray:
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise DetectError(f"features must be a non-empty (N, D) array, got shape {f.shape}")
    if not np.issubdtype(f.dtype, np.number) or np.issubdtype(f.dtype, np.complexfloating):
        raise DetectError(f"features must be real numbers, got dtype {f.dtype}")
    if not np.isfinite(f).all():
        raise DetectError("features contain NaN or inf: check the model (diverged training?)")
    return f.astype(dtype, copy=False)


def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise DetectError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if y.ndim != 1 or len(y) != n:
        raise DetectError(f"labels must be (N,) = ({n},), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DetectError(f"labels must be integer class indices, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DetectError(f"labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    return y.astype(np.int64, copy=False)


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- small numerics
# Hand-written because the core may not import sklearn/scipy (docs/design.md): PCA by SVD,
# k-means with k-means++ seeding, silhouette. Each is a few lines and tested against sklearn.


def pca_project(x: np.ndarray, dims: int) -> np.ndarray:
    """Mean-centred ``x`` projected on its top ``dims`` principal axes (SVD), (n, min(dims, ...))."""
    xc = x - x.mean(0, keepdims=True)
    if len(x) < 2:
        return xc[:, :dims]
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:dims].T


def kmeans(x: np.ndarray, k: int = 2, n_init: int = 10, seed: int = 0, max_iter: int = 300) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs by inertia (sklearn's
    defaults); returns labels (n,) int64. Deterministic for ``seed``."""
    n = len(x)
    if n <= k:
        return np.arange(n, dtype=np.int64) % max(k, 1)
    rng = np.random.default_rng(seed)
    sq = (x * x).sum(1)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(n)]]
        d2 = ((x - centers[0]) ** 2).sum(1)
        for _c in range(1, k):
            tot = d2.sum()
            idx = rng.choice(n, p=d2 / tot) if tot > 0 else rng.integers(n)
            centers.append(x[idx])
            d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
        c = np.stack(centers)
        lab = np.full(n, -1)
        for _it in range(max_iter):
            dist = sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
            new = dist.argmin(1)
            if (new == lab).all():
                break
            lab = new
            for j in range(k):
                m = lab == j
                if m.any():
                    c[j] = x[m].mean(0)
        inertia = float(np.take_along_axis(dist, lab[:, None], 1).sum())
        if inertia < best_inertia:
            best, best_inertia = lab.copy(), inertia
    return best.astype(np.int64)


def silhouette(x: np.ndarray, lab: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean); 0 when fewer than 2 clusters or a singleton-only split."""
    ks = np.unique(lab)
    if len(ks) < 2 or len(x) < 3:
        return 0.0
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    lt = torch.from_numpy(lab)
    s = np.empty(len(x))
    for i0 in range(0, len(x), 2048):
        d = torch.cdist(t[i0 : i0 + 2048], t)
        mean_to = torch.stack([d[:, lt == k].sum(1) for k in ks], 1)  # (b, K)
        counts = torch.stack([(lt == k).sum() for k in ks]).to(d.dtype)
        own = lt[i0 : i0 + 2048]
        own_idx = torch.searchsorted(torch.from_numpy(ks), own)
        n_own = counts[own_idx]
        a = mean_to.gather(1, own_idx[:, None])[:, 0] / (n_own - 1).clamp(min=1)
        other = mean_to / counts[None]
        other.scatter_(1, own_idx[:, None], float("inf"))
        b = other.min(1).values
        si = (b - a) / torch.maximum(a, b).clamp(min=SCORE_EPS)
        si[n_own <= 1] = 0.0  # sklearn's convention for singletons
        s[i0 : i0 + 2048] = si.numpy()
    return float(s.mean())


# --------------------------------------------------------------------------- published baselines


def spectral_signatures(features: Any, labels: Any, num_classes: int, eps: float = 0.1) -> Detection:
    """Tran et al. (2018) as published: per class, score = <f - mean_c, v_c>^2 with v_c the top
    right singular vector of the class's centred features; flag the ``ceil(1.5 * eps * n_c)``
    highest of every class. ``eps``: the defender's upper bound on the poisoned fraction
    (BackdoorBench's CIFAR-10 runs remove 15% = 1.5 x 10%).

    ``class_stat`` (not part of the paper, which has no decision rule): the class's top squared
    singular value per row, divided by the median of that over classes.
    """
    f, y = _check(features, labels, num_classes)
    if not 0.0 < float(eps) <= 0.5:
        raise DetectError(f"eps (upper bound on the poisoned fraction) must be in (0, 0.5], got {eps}")
    score = np.zeros(len(f))
    flagged = np.zeros(len(f), bool)
    sv = np.zeros(num_classes)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        xc = f[idx] - f[idx].mean(0, keepdims=True)
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        score[idx] = (xc @ vt[0]) ** 2
        sv[c] = s[0] ** 2 / len(idx)
        n_remove = min(len(idx), math.ceil(1.5 * eps * len(idx)))
        flagged[idx[np.argsort(-score[idx], kind="stable")[:n_remove]]] = True
    present = sv > 0
    med = np.median(sv[present]) if present.any() else 1.0
    stat = np.where(present, sv / max(med, SCORE_EPS), 0.0)
    return Detection("spectral_signatures", {"spectral": score}, flagged, stat, "top_sv_ratio",
                     {"eps": float(eps), "removed_fraction": 1.5 * float(eps)})


def activation_clustering(
    features: Any,
    labels: Any,
    num_classes: int,
    nb_dims: int = 10,
    analysis: str = "smaller",
    size_threshold: float = 0.35,
    seed: int = 0,
) -> Detection:
    """Chen et al. (2018) as BackdoorBench runs it: per class, PCA to ``nb_dims``, 2-means; the
    smaller cluster is poison in every class (``analysis="smaller"``) or only when it holds less
    than ``size_threshold`` of the class (``"relative-size"``, ART's default 0.35).

    Scores: ``ac_margin`` = (distance to the larger cluster's centre - distance to the smaller's)
    in the reduced space, a continuous version of the cluster assignment for AUROC.
    ``class_stat``: the silhouette of the class's 2-means split (Chen et al. read a high
    silhouette as a sign of poison); it is not thresholded here.
    """
    f, y = _check(features, labels, num_classes)
    if analysis not in ("smaller", "relative-size"):
        raise DetectError(f"unknown analysis {analysis!r}: use 'smaller' or 'relative-size'")
    if int(nb_dims) < 1:
        raise DetectError(f"nb_dims must be >= 1, got {nb_dims}")
    if not 0.0 < size_threshold < 1.0:
        raise DetectError(f"size_threshold must be in (0, 1), got {size_threshold}")
    margin = np.zeros(len(f))
    flagged = np.zeros(len(f), bool)
    sil = np.zeros(num_classes)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < 3:
            continue
        z = pca_project(f[idx], int(nb_dims))
        lab = kmeans(z, 2, seed=seed + c)
        sizes = np.bincount(lab, minlength=2)
        small = int(sizes.argmin())
        big = 1 - small
        centres = np.stack([z[lab == j].mean(0) if sizes[j] else np.zeros(z.shape[1]) for j in range(2)])
        d = np.sqrt(((z[:, None, :] - centres[None]) ** 2).sum(-1))
        margin[idx] = d[:, big] - d[:, small]
        sil[c] = silhouette(z, lab)
        is_poison = analysis == "smaller" or sizes[small] / len(idx) < size_threshold
        if is_poison and sizes[small] < len(idx):
            flagged[idx[lab == small]] = True
    return Detection("activation_clustering", {"ac_margin": margin}, flagged, sil, "silhouette",
                     {"nb_dims": int(nb_dims), "analysis": analysis, "size_threshold": float(size_threshold)})


# --------------------------------------------------------------------------- robust detector


@dataclass(frozen=True)
class RobustConfig:
    """Settings of :func:`robust_detect` (defaults measured in bench/results/detect_samples.md)."""

    k_ref: int = 3  # q-th nearest reference row (rows): small = local, so a clean row of a rare
    #                 style needs only 3 reference rows like it; on the digits dev set (candidate
    #                 view) the clean/poison margin of the class statistic was 1.23, 1.18, 1.13, 1.14
    #                 for k = 2, 3, 4, 5 (k = 3: two neighbours of slack against a duplicated row)
    self_frac: float = 0.5  # without a reference: the q-th nearest training row of the class at
    #                         q = ceil(0.5 n_c), which stays in the clean mode while poison < 50%
    min_depth: int = 3  # rows: shallowest depth of the main tail scan; depths 1..min_depth-1 form the
    #                     separate shallow band (one or two extreme rows: natural outliers are common
    #                     there, so it has its own, higher threshold)
    max_depth_frac: float = 0.75  # deepest depth, fraction of the class (all-to-one 20% = 64% poison)
    class_threshold: float = 1.8  # main tail ratio (unitless) at which a class is suspicious. Two-view
    #   mode, digits, clean model at 30 epochs: 20 dev clean models max 1.58 (with the 10-epoch clean
    #   model, 64 clean models reached 1.76); weakest effective multi-row attacks 1.93 and 1.98 (7-row
    #   source-specific patches). Set before bench/results/detect_samples_final.md (fresh seeds).
    shallow_threshold: float = 2.5  # shallow-band ratio (depths 1-2 rows) at which a class is suspicious.
    #   Clean models reach 2.1 there (one of 20 bench models), and the one effective single-row
    #   attack measured gave 2.28: they cannot be told apart, so this band only blocks a row far
    #   beyond anything clean (a single poisoned row is a known miss; see the bench).
    flag_quantile: float = 0.995  # flag a row above this quantile of the other classes' suspicion
    suspicious_flag_quantile: float = 0.90  # ... or above this one in a suspicious class (recall first:
    #                                         every poisoned row left behind keeps the backdoor alive)
    device: str = "cpu"
    chunk_elems: int = 1 << 22  # distance-matrix block size (elements): cdist's block, kthvalue's copy and
    #                             its int64 indices are ~16 B an element (1 << 24 was 273 MiB at the peak)

    def check(self) -> None:
        if self.k_ref < 1:
            raise DetectError(f"k_ref must be >= 1, got {self.k_ref}")
        if not 0.0 < self.self_frac <= 1.0:
            raise DetectError(f"self_frac must be in (0, 1], got {self.self_frac}")
        if self.min_depth < 1:
            raise DetectError(f"min_depth must be >= 1 row, got {self.min_depth}")
        if not 0.0 < self.max_depth_frac <= 1.0:
            raise DetectError(f"max_depth_frac must be in (0, 1], got {self.max_depth_frac}")
        for name in ("flag_quantile", "suspicious_flag_quantile"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise DetectError(f"{name} must be in (0, 1), got {v}")
        if not self.class_threshold > 0 or not self.shallow_threshold > 0:
            raise DetectError(f"class_threshold and shallow_threshold must be > 0, got "
                              f"{self.class_threshold}, {self.shallow_threshold}")


def _kth_distance(
    x: torch.Tensor, ref: torch.Tensor, q: int, self_index: Optional[torch.Tensor], chunk_elems: int
) -> torch.Tensor:
    """Distance from each row of ``x`` to its ``q``-th nearest row of ``ref``, (n,) float64.

    ``self_index`` (n,) int: position of each x row inside ``ref`` (-1 when absent): that pair is
    excluded (leave-one-out). Blocks of rows keep the distance matrix under ``chunk_elems``."""
    n, m = len(x), len(ref)
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    step = max(1, chunk_elems // max(m, 1))
    for i0 in range(0, n, step):
        d = torch.cdist(x[i0 : i0 + step], ref)
        if self_index is not None:
            si = self_index[i0 : i0 + step]
            rows = torch.nonzero(si >= 0)[:, 0]
            d[rows, si[rows]] = float("inf")
        out[i0 : i0 + step] = torch.kthvalue(d, q, dim=1).values.to(torch.float64)
    return out


def tail_scan_ratio(class_scores: np.ndarray, pool_scores: np.ndarray, min_depth: int, max_depth_frac: float) -> tuple[float, int]:
    """``(max over m of s_(m) / Q_pool(1 - m/n), argmax m)`` for one class (see the module doc).

    ``(0.0, 0)`` when the class is too small to scan (fewer than ``min_depth`` rows in its scan
    range) or the pool is empty."""
    s = np.sort(np.asarray(class_scores, np.float64))[::-1]
    n = len(s)
    hi = int(math.floor(max_depth_frac * n))
    if hi < min_depth or len(pool_scores) == 0:
        return 0.0, 0
    m = np.arange(min_depth, hi + 1)
    q = np.quantile(np.asarray(pool_scores, np.float64), 1.0 - m / n)
    ratio = s[m - 1] / np.maximum(q, SCORE_EPS)
    j = int(ratio.argmax())
    return float(ratio[j]), int(m[j])


class _Reference:
    """One feature space's reference: its rows of each class (on the detector's device) and each
    class's scale (the median leave-one-out ``k_ref``-th distance inside the class). Built once;
    training rows are then scored against it in any number of blocks (:meth:`scores`), each
    row's scores depending on that row alone."""

    def __init__(self, rf: np.ndarray, ry: np.ndarray, num_classes: int, config: RobustConfig):
        self.dev = _device(config.device)
        self.config = config
        self.dims = int(rf.shape[1])
        self.scale = np.ones(num_classes)
        self.rows: list[Optional[torch.Tensor]] = [None] * num_classes
        r = torch.from_numpy(np.ascontiguousarray(rf, dtype=np.float32)).to(self.dev)
        for j in range(num_classes):
            ridx = np.flatnonzero(ry == j)
            if len(ridx) < config.k_ref + 1:
                continue  # absent from training and short in the reference: never anyone's own class
            # rows sorted by class (inspect sorts its reference) are a view, not a copy: at 1M
            # rows the reference is 200k x 256 float32 per feature space
            contiguous = ridx[-1] - ridx[0] + 1 == len(ridx)
            rj = r[int(ridx[0]):int(ridx[-1]) + 1] if contiguous else r[torch.from_numpy(ridx).to(self.dev)]
            loo = _kth_distance(rj, rj, config.k_ref, torch.arange(len(ridx), device=self.dev), config.chunk_elems)
            self.scale[j] = float(torch.median(loo).item())
            self.rows[j] = rj

    def scores(self, f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(outlyingness, foreignness)`` of the rows ``f`` (float32, validated) labelled ``y``."""
        x = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)).to(self.dev)
        # float32: the q-th distances are float32 values (cdist's precision), so half the memory
        # of float64 and the same numbers
        dist = torch.full((len(f), len(self.rows)), float("inf"), dtype=torch.float32, device=self.dev)
        for j, rj in enumerate(self.rows):
            if rj is not None:
                dist[:, j] = _kth_distance(x, rj, self.config.k_ref, None, self.config.chunk_elems).to(torch.float32)
        return _ratios(dist.cpu().numpy(), y, self.scale)


def _ratios(d: np.ndarray, y: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(outlyingness, foreignness)`` from the (n, K) q-th distances ``d`` to each class (inf
    where a class has no reference) and each class's scale."""
    rows = np.arange(len(d))
    own = d[rows, y].astype(np.float64)
    other_d = d.copy()
    other_d[rows, y] = np.inf
    other = other_d.min(1).astype(np.float64)
    own = np.where(np.isfinite(own), own, 0.0)  # a singleton class without reference: nothing to compare
    outlying = own / np.maximum(scale[y], SCORE_EPS)
    foreign = np.where(np.isfinite(other), own / np.maximum(other, SCORE_EPS), 0.0)
    return outlying, foreign


def _self_view(f: np.ndarray, y: np.ndarray, num_classes: int, config: RobustConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(outlyingness, foreignness)`` of every row with the training rows as their own reference
    (``self_frac`` rank, leave-one-out): every row is needed at once."""
    dev = _device(config.device)
    x = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)).to(dev)
    n = len(f)
    dist = torch.full((n, num_classes), float("inf"), dtype=torch.float64, device=dev)
    scale = np.ones(num_classes)
    pos = np.full(n, -1, np.int64)
    for j in range(num_classes):
        idx = np.flatnonzero(y == j)
        if len(idx) < 2:
            continue
        pos[:] = -1
        pos[idx] = np.arange(len(idx))
        q = max(1, min(len(idx) - 1, math.ceil(config.self_frac * len(idx))))
        xj = x[torch.from_numpy(idx).to(dev)]
        dist[:, j] = _kth_distance(x, xj, q, torch.from_numpy(pos).to(dev), config.chunk_elems)
        scale[j] = float(torch.median(dist[torch.from_numpy(idx).to(dev), j]).item())
    return _ratios(dist.cpu().numpy(), y, scale)


def _check_reference(rf: Any, ry: Any, num_classes: int, dims: int, present: np.ndarray, k_ref: int,
                     what: str) -> tuple[np.ndarray, np.ndarray]:
    f, y = _check(rf, ry, num_classes, np.float32)
    if f.shape[1] != dims:
        raise DetectError(f"{what} features have {f.shape[1]} dims, the training rows' {dims}: "
                          "extract both with the same model")
    counts = np.bincount(y, minlength=num_classes)
    short = [c for c in range(num_classes) if present[c] and counts[c] < k_ref + 1]
    if short:
        raise DetectError(f"classes {short} have fewer than k_ref + 1 = {k_ref + 1} {what} rows "
                          f"(counts {[int(counts[c]) for c in short]}): give a larger reference split or lower k_ref")
    return f, y


def robust_detect(
    features: Any,
    labels: Any,
    num_classes: int,
    reference_features: Any = None,
    reference_labels: Any = None,
    clean_features: Any = None,
    clean_reference_features: Any = None,
    config: RobustConfig = RobustConfig(),
) -> Detection:
    """Score every training row (module doc); flag rows; compute the per-class tail scan ratio.

    - ``features``: the candidate's penultimate features of the training view, (N, D).
    - ``reference_features``/``reference_labels``: the candidate's features of a trusted clean split
      (the evaluation split) and its true labels; every class present in ``labels`` needs at
      least ``k_ref + 1`` reference rows. Without them the training rows are their own reference
      (``self_frac`` rank, leave-one-out), valid while a class is less than half poison.
    - ``clean_features``/``clean_reference_features`` (recommended; needs the reference): the
      same training rows and reference rows through a *clean model*, one trained on the trusted
      split alone. It never saw a poisoned row, so a poisoned row looks like what it depicts
      (its source class), whatever trigger the candidate learned. Then
      ``suspicion = outlyingness (candidate) * foreignness (clean model)``: unusual for its label
      to the candidate, and closer to another class than to its label for a model that never saw
      it. Without them both factors come from the candidate.

    Scores: ``suspicion`` (primary), ``outlyingness``, ``foreignness`` (the two factors used),
    ``foreignness_candidate`` (always). ``params``: the settings, ``mode`` (``two_view`` |
    ``reference`` | ``self``), ``depth`` (argmax depth per class).
    """
    config.check()
    f, y = _check(features, labels, num_classes, np.float32)
    present = np.bincount(y, minlength=num_classes) > 0
    if (reference_features is None) != (reference_labels is None):
        raise DetectError("give both reference_features and reference_labels, or neither")
    if (clean_features is None) != (clean_reference_features is None):
        raise DetectError("give both clean_features and clean_reference_features, or neither")
    if clean_features is not None and reference_features is None:
        raise DetectError("clean_features need the reference split: pass reference_features and reference_labels "
                          "(the clean model is trained on that split)")
    if reference_features is None:
        outlying, foreign_cand = _self_view(f, y, num_classes, config)
        return _decide(outlying, foreign_cand, foreign_cand, y, num_classes, config, "self")
    ref = _check_reference(reference_features, reference_labels, num_classes, f.shape[1], present,
                           config.k_ref, "reference")
    outlying, foreign_cand = _Reference(*ref, num_classes, config).scores(f, y)
    foreign = foreign_cand
    mode = "reference"
    if clean_features is not None:
        if len(clean_features) != len(f):
            raise DetectError(f"clean_features have {len(clean_features)} rows, features {len(f)}: "
                              "give the same training rows")
        g, _ = _check(clean_features, y, num_classes, np.float32)
        if len(clean_reference_features) != len(ref[0]):
            raise DetectError(f"clean_reference_features have {len(clean_reference_features)} rows, "
                              f"reference_features {len(ref[0])}: give the same reference rows")
        gref = _check_reference(clean_reference_features, ref[1], num_classes, g.shape[1], present,
                                config.k_ref, "clean reference")
        _, foreign = _Reference(*gref, num_classes, config).scores(g, y)
        mode = "two_view"
    return _decide(outlying, foreign, foreign_cand, y, num_classes, config, mode)


def robust_detect_blocks(
    blocks: Iterable[tuple[Any, Any]],
    labels: Any,
    num_classes: int,
    reference_features: Any,
    reference_labels: Any,
    clean_reference_features: Any,
    config: RobustConfig = RobustConfig(),
) -> Detection:
    """:func:`robust_detect` in its two-view mode, the training rows arriving in blocks.

    ``blocks`` yields ``(candidate features, clean-model features)`` of consecutive training rows,
    in order, covering ``labels`` exactly. Only the reference features, one block and five
    float64s per row are held, not the training rows' two (N, D) feature matrices (small_cnn at
    1M rows: 2 GiB). Each row's scores depend on that row and the reference alone, so they are
    those of :func:`robust_detect` on the whole arrays (up to float rounding of a differently
    blocked distance product)."""
    config.check()
    rf = _check_features(reference_features, np.float32)
    y = _check_labels(labels, len(labels), num_classes)
    if len(y) == 0:
        raise DetectError("features must be a non-empty (N, D) array, got no training rows")
    present = np.bincount(y, minlength=num_classes) > 0
    ref = _check_reference(rf, reference_labels, num_classes, rf.shape[1], present, config.k_ref, "reference")
    if len(clean_reference_features) != len(ref[0]):
        raise DetectError(f"clean_reference_features have {len(clean_reference_features)} rows, "
                          f"reference_features {len(ref[0])}: give the same reference rows")
    gr = _check_features(clean_reference_features, np.float32)
    gref = _check_reference(gr, ref[1], num_classes, gr.shape[1], present, config.k_ref, "clean reference")
    cand, clean = _Reference(*ref, num_classes, config), _Reference(*gref, num_classes, config)
    # the per-class copies are all that is needed from here on
    del rf, gr, ref, gref, reference_features, clean_reference_features
    n = len(y)
    outlying, foreign, foreign_cand = np.empty(n), np.empty(n), np.empty(n)
    s0 = 0
    for fb, gb in blocks:
        if len(fb) == 0 and len(gb) == 0:
            continue  # an empty block (a chunker's last, say) adds no row
        fb, gb = _check_features(fb, np.float32), _check_features(gb, np.float32)
        e = s0 + len(fb)
        if len(gb) != len(fb) or e > n:
            raise DetectError(f"a block of {len(fb)} candidate and {len(gb)} clean feature rows at row {s0} "
                              f"does not fit the {n} labels: give the same training rows to both models, in order")
        for what, b, r in (("candidate", fb, cand), ("clean-model", gb, clean)):
            if b.shape[1] != r.dims:
                raise DetectError(f"{what} features have {b.shape[1]} dims, its reference's {r.dims}: "
                                  "extract both with the same model")
        outlying[s0:e], foreign_cand[s0:e] = cand.scores(fb, y[s0:e])
        _, foreign[s0:e] = clean.scores(gb, y[s0:e])
        s0 = e
    if s0 != n:
        raise DetectError(f"the blocks held {s0} training rows, the labels {n}: give every row once")
    return _decide(outlying, foreign, foreign_cand, y, num_classes, config, "two_view")


def _decide(outlying: np.ndarray, foreign: np.ndarray, foreign_cand: np.ndarray, y: np.ndarray, num_classes: int,
            config: RobustConfig, mode: str) -> Detection:
    """The suspicion, the per-class tail scan and the flags (module doc) from the two factors."""
    susp = outlying * foreign
    n = len(y)
    stat = np.zeros(num_classes)
    shallow = np.zeros(num_classes)
    depth = np.zeros(num_classes, np.int64)
    flagged = np.zeros(n, bool)
    suspicious = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        pool = susp[y != c]
        if not len(idx) or not len(pool):
            continue
        stat[c], depth[c] = tail_scan_ratio(susp[idx], pool, config.min_depth, config.max_depth_frac)
        if config.min_depth > 1:
            shallow[c] = _shallow_ratio(susp[idx], pool, config.min_depth - 1)
        if stat[c] >= config.class_threshold or shallow[c] >= config.shallow_threshold:
            suspicious.append(c)
        # a bimodal class (main band) is flagged deep, recall first; elsewhere only the extreme rows
        level = config.suspicious_flag_quantile if stat[c] >= config.class_threshold else config.flag_quantile
        flagged[idx] = susp[idx] > np.quantile(pool, level)
    params = {**{k: getattr(config, k) for k in config.__dataclass_fields__}, "mode": mode, "depth": depth.tolist()}
    scores = {"suspicion": susp, "outlyingness": outlying, "foreignness": foreign, "foreignness_candidate": foreign_cand}
    return Detection("robust", scores, flagged, stat, "tail_ratio", params,
                     {"tail_ratio": stat, "tail_ratio_shallow": shallow}, tuple(suspicious))


def _shallow_ratio(class_scores: np.ndarray, pool_scores: np.ndarray, max_depth: int) -> float:
    """max over m = 1..max_depth of s_(m) / Q_pool(1 - m/n): the shallow band of the tail scan."""
    s = np.sort(np.asarray(class_scores, np.float64))[::-1]
    n = len(s)
    m = np.arange(1, min(max_depth, n) + 1)
    if not len(m):
        return 0.0
    q = np.quantile(np.asarray(pool_scores, np.float64), 1.0 - m / n)
    return float((s[m - 1] / np.maximum(q, SCORE_EPS)).max())
