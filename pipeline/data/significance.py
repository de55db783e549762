"""Tests of significance of the data gate: what it measures per class, apart from how GX judges it.

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

``block_rate``        share of a class's rows with an abnormal pixel block (``stats.block_flags_all``);
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

Comparisons (:func:`gate_tables`; :func:`growth_tests` on bare counts), so that a drip of small
appends cannot drift through:

``last_approved``     the new rows (not in the last approved view) vs the last approved view;
``root``              the same new rows vs the root (the first approved view): a staircase whose
                      every step is small against the moving reference is large against the root;
``since_root``        every row added since the root vs the root: evidence accumulates, so k
                      appends each too small to be significant alone become significant together;
``prior`` / ``since_root_prior``  the new rows / every row since the root vs prior_block_rate.
(``root``/``since_root`` are left out while they would repeat ``last_approved``.)

Correction (:func:`adjust`): Bonferroni, family-wise, because the gate blocks when *any* hypothesis is
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

Class sets (:func:`class_set_table`): a class present in this view and not in the reference (or
the reverse: no train row left) is listed; the rate checks compare only the classes both views
hold (the root comparisons only the classes all three hold), so adding a class folder never
switches the comparison off, and check ``class_set`` fails unless ``validate.accept_new_classes``
/ ``accept_removed_classes`` name the class.

Thresholds come from ``conf/validate`` (:class:`pipeline.schema.ValidateConfig`: ``alpha``,
``min_effect_*``, ``prior_block_rate``, ``near_dup_radius``); the one table of checks that judges
these tables is ``gates.data_checks``.

Hand-written where no maintained library does it: Tarone's count (statsmodels' multipletests has no
discrete-test correction, and is not a dependency), and multi-index hashing for Hamming-radius
pairs (the pigeonhole split of the 64 bits; imagehash compares one pair at a time).

numpy, pandas and scipy only; no GX, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Optional, Protocol, Sequence

import numpy as np
import pandas as pd
from scipy import stats as st

from pipeline.data.stats import StatsError, hash_keys, pick_hashes, same_key_rows
from pipeline.schema import ValidateConfig

RATE_CHECKS = ("block_rate", "duplicate_rate", "label_share")  # Fisher tests against a reference
PRIOR_CHECK = "block_rate_prior"  # binomial test against validate.prior_block_rate
COMPARISONS = ("last_approved", "root", "since_root", "prior", "since_root_prior")
TABLE_COLUMNS = (
    "check", "comparison", "class_index", "class_name", "x_new", "n_new", "rate_new", "x_ref", "n_ref",
    "rate_ref", "effect", "p_value", "p_min", "testable", "m_tests", "p_adjusted", "alpha", "min_effect",
    "p_gate", "blocked",
)
_MIN_EFFECT_KEY = {"block_rate": "min_effect_block_rate", PRIOR_CHECK: "min_effect_block_rate",
                   "duplicate_rate": "min_effect_duplicate_rate", "label_share": "min_effect_share"}


def min_effect(v: ValidateConfig, check: str) -> float:
    """The minimum effect of a rate check, from conf/validate (``validate.<key>``)."""
    if check not in _MIN_EFFECT_KEY:
        raise StatsError(f"unknown rate check {check!r}: use one of {', '.join(_MIN_EFFECT_KEY)}")
    return float(getattr(v, _MIN_EFFECT_KEY[check]))


# --------------------------------------------------------------------------- rules without a rate


def label_conflicts(hashes: Sequence[str], labels: Sequence[int]) -> pd.DataFrame:
    """One row per content hash found under more than one label (a contradiction: always blocks).

    Columns: ``sha256``, ``n_rows``, ``n_labels``, ``labels`` (sorted list), ``rows`` (indices),
    then the judged columns (``p_value`` 0, ``effect`` = n_labels - 1, ``blocked`` True). Rows are
    in hash order.

    Integer codes and numpy sorts, not a pandas groupby on the strings: at 1M rows the groupby's
    string hash tables and the frame it needed raised the validate stage's peak by ~310 MiB
    (bench/results/validate_peak_1m.log, VmHWM +313 -> +14-20 MiB); the codes are 8 bytes a row. An
    Arrow-backed column is grouped on 64-bit keys first (stats.hash_keys): only the rows whose key
    has a second label become strings (bench/results/validate_hash_keys_1m.log: +147 MiB -> 0).
    """
    lab = np.asarray(labels, np.int64).ravel()
    keyed = hash_keys(hashes)
    if keyed is not None:
        # the rows that share a 64-bit key with another row under another label hold every conflict
        # (equal hashes have equal keys); only they are grouped on their full strings
        keys, chunked = keyed
        if len(keys) != len(lab):
            raise StatsError(f"{len(keys)} hashes but {len(lab)} labels: pass one of each per row")
        rows = same_key_rows(keys)
        if len(rows):
            k, lr = keys[rows], lab[rows]
            order = np.lexsort((lr, k))
            ks, ls = k[order], lr[order]
            other = np.r_[False, (ks[1:] == ks[:-1]) & (ls[1:] != ls[:-1])]  # a second label in a key's run
            rows = rows[np.isin(k, ks[other])]
        sub = _label_conflicts_of(pick_hashes(chunked, rows), lab[rows])
        sub["rows"] = sub["rows"].map(lambda rs: rows[rs].tolist())
        return sub
    return _label_conflicts_of(hashes, lab)


def _label_conflicts_of(hashes: Sequence[str], lab: np.ndarray) -> pd.DataFrame:
    codes, uniques = pd.factorize(np.asarray(hashes, dtype=object))  # a missing hash: -1, in no group
    if len(codes) != len(lab):
        raise StatsError(f"{len(codes)} hashes but {len(lab)} labels: pass one of each per row")
    cols = ["sha256", "n_rows", "n_labels", "labels", "rows"]
    known = np.flatnonzero(codes >= 0)
    if not len(known):
        return _rule_table(pd.DataFrame(columns=cols), "label_conflicts")
    order = known[np.lexsort((lab[known], codes[known]))]  # by hash code, then label
    c, l_ = codes[order], lab[order]
    first = np.r_[True, (c[1:] != c[:-1]) | (l_[1:] != l_[:-1])]  # the first row of each (hash, label)
    n_labels = np.bincount(c[first], minlength=len(uniques))
    bad = np.flatnonzero(n_labels > 1)
    out = []
    if len(bad):
        rows = np.flatnonzero(np.isin(codes, bad))  # ascending row order
        by = rows[np.argsort(codes[rows], kind="stable")]  # grouped by code, rows ascending within
        starts = np.searchsorted(codes[by], bad)
        ends = np.r_[starts[1:], len(by)]
        for k in np.argsort(np.asarray(uniques[bad], dtype=object)):  # hash order, as a groupby gives
            idx = by[starts[k]:ends[k]]
            out.append({"sha256": uniques[bad[k]], "n_rows": len(idx), "n_labels": int(n_labels[bad[k]]),
                        "labels": sorted(set(lab[idx].tolist())), "rows": idx.tolist()})
    return _rule_table(pd.DataFrame(out, columns=cols), "label_conflicts")


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


# candidate pairs compared at a time by near_duplicate_pairs: up to ~2x this are held (one bucket's
# block past it), ~100-150 MB of index, hash and distance arrays at 2^20
PAIR_BLOCK = 1 << 20


def _bucket_pairs(k: int, block: int):
    """The pairs (a, b), 0 <= a < b < k, of a bucket of k members, about ``block`` at a time
    (rows of the upper triangle in order): a bucket's k(k-1)/2 pairs are never built at once."""
    step = max(1, block // max(1, k - 1))
    for r0 in range(0, k - 1, step):
        rows = np.arange(r0, min(k - 1, r0 + step))
        counts = k - 1 - rows
        a = np.repeat(rows, counts)
        b = a + 1 + np.arange(len(a)) - np.repeat(np.cumsum(counts) - counts, counts)
        yield a, b


def near_duplicate_pairs(phashes: np.ndarray, radius: int) -> pd.DataFrame:
    """All pairs (i < j) of 64-bit hashes within ``radius`` bits (columns ``i``, ``j``, ``distance``).

    Multi-index hashing: split the 64 bits into radius + 1 chunks; by the pigeonhole principle two
    hashes within ``radius`` bits agree exactly on at least one chunk, so candidate pairs come
    from equal chunk values and only those are compared. Exact (no pair is missed), and near-linear
    on real data where chunk values are spread (CIFAR-10's 60,000 hashes: about a second) instead
    of the 1.8e9 comparisons of all pairs.

    Candidates are compared ``PAIR_BLOCK`` at a time and only the pairs within ``radius`` kept:
    rows that share chunk values by the thousand (a backdoor's patched rows: 20M candidates for
    8,080 patched rows among 808k at 1M rows) held every candidate pair before the first distance:
    near_duplicate_clusters +1.6 GiB and 66 s, now +0.2 GiB and 11 s
    (bench/results/validate_append_1m.log, issue 19 item 3).
    """
    h = np.asarray(phashes, np.uint64)
    radius = int(radius)
    if radius < 0 or radius > 16:
        raise StatsError(f"near-duplicate radius must be 0..16 bits, got {radius}")
    n = len(h)
    empty = pd.DataFrame({"i": np.zeros(0, np.int64), "j": np.zeros(0, np.int64), "distance": np.zeros(0, np.int64)})
    if n < 2:
        return empty
    bounds = np.linspace(0, 64, radius + 2).round().astype(int)
    kept: list[np.ndarray] = []  # i * n + j of the pairs within radius (each found once per chunk it shares)
    buf_i: list[np.ndarray] = []
    buf_j: list[np.ndarray] = []
    held = 0

    def compare() -> None:
        nonlocal held
        if held:
            i, j = np.concatenate(buf_i), np.concatenate(buf_j)
            near = _hamming(h[i], h[j]) <= radius
            kept.append(i[near] * n + j[near])
            buf_i.clear()
            buf_j.clear()
            held = 0

    for lo, hi in zip(bounds[:-1], bounds[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        ends = np.r_[starts[1:], n]
        for s_, e_ in zip(starts[(ends - starts) > 1], ends[(ends - starts) > 1]):
            members = np.sort(order[s_:e_])
            for a, b in _bucket_pairs(len(members), PAIR_BLOCK):
                buf_i.append(members[a])
                buf_j.append(members[b])
                held += len(a)
                if held >= PAIR_BLOCK:
                    compare()
    compare()
    pairs = np.unique(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
    if not len(pairs):
        return empty
    i, j = pairs // n, pairs % n
    return pd.DataFrame({"i": i, "j": j, "distance": _hamming(h[i], h[j])})


def near_duplicate_clusters(phashes: np.ndarray, labels: Sequence[int], radius: int,
                            spanning_only: bool = True) -> pd.DataFrame:
    """Clusters of near-duplicate rows (connected components of the within-``radius`` pairs).

    A cluster spans labels exactly when it holds a cross-label pair, so the measured count of
    clean cross-label pairs (0 at radius 2 on digits and CIFAR-10) is the false-cluster count.
    Columns: ``cluster``, ``n_rows``, ``n_labels``, ``labels``, ``rows``, ``max_distance``, then
    the judged columns (a cluster under two labels blocks).
    """
    labels = np.asarray(labels, np.int64)
    h = np.asarray(phashes, np.uint64)
    if len(h) != len(labels):
        raise StatsError(f"{len(h)} hashes but {len(labels)} labels: pass one of each per row")
    # The components of the row graph from the graph of its distinct hashes: rows with one hash are
    # joined to that hash's first row (distance 0), and each within-radius pair of distinct hashes
    # joins their first rows. Same components and the same distances (so the same max_distance)
    # as every row pair, but k rows sharing a hash (blank images, one upload repeated) cost k
    # edges, not k(k-1)/2: 10,000 equal hashes were 50M pairs (issue 19 item 3).
    values, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    vp = near_duplicate_pairs(values, radius)
    repeat = np.flatnonzero(first[inverse] != np.arange(len(h)))  # rows after the first of their hash
    pairs = pd.DataFrame({
        "i": np.r_[first[inverse[repeat]], first[vp["i"].to_numpy(np.int64)]].astype(np.int64),
        "j": np.r_[repeat, first[vp["j"].to_numpy(np.int64)]].astype(np.int64),
        "distance": np.r_[np.zeros(len(repeat), np.int64), vp["distance"].to_numpy(np.int64)],
    })
    involved = np.unique(np.r_[pairs["i"].to_numpy(), pairs["j"].to_numpy()]).astype(np.int64)
    return clusters_from_pairs(pairs, involved, labels[involved], spanning_only)


def clusters_from_pairs(pairs: pd.DataFrame, rows: np.ndarray, labels: np.ndarray,
                        spanning_only: bool = True) -> pd.DataFrame:
    """The cluster table of :func:`near_duplicate_clusters` from its within-radius ``pairs``
    (columns ``i``, ``j``, ``distance``), given the label of every row a pair involves (``rows``,
    ``labels`` aligned): all the validate stage's Spark engine brings back to the driver. Clusters
    are numbered by their first row."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    cols = ["cluster", "n_rows", "n_labels", "labels", "rows", "max_distance"]
    if pairs.empty:
        return _rule_table(pd.DataFrame(columns=cols), "near_duplicate_clusters")
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows)
    rows, labels = rows[order], np.asarray(labels, np.int64)[order]
    i = np.searchsorted(rows, pairs["i"].to_numpy(np.int64))
    j = np.searchsorted(rows, pairs["j"].to_numpy(np.int64))
    m = len(rows)
    _, comp = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(m, m)), directed=False)
    maxd = pd.Series(pairs["distance"].to_numpy()).groupby(comp[i]).max()
    out = []
    for cid in np.unique(comp):  # numbered by first row: rows are sorted, so components are too
        idx = np.flatnonzero(comp == cid)
        labs = sorted(set(labels[idx].tolist()))
        if spanning_only and len(labs) < 2:
            continue
        out.append({"cluster": len(out), "n_rows": len(idx), "n_labels": len(labs), "labels": labs,
                    "rows": rows[idx].tolist(), "max_distance": int(maxd[cid])})
    return _rule_table(pd.DataFrame(out, columns=cols), "near_duplicate_clusters")


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


def _judge_arrays(t: dict, v: ValidateConfig) -> dict:
    check = t["check"]
    families = list(dict.fromkeys(check.tolist()))
    share = v.alpha / max(1, len(families))
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
        min_eff[m] = min_effect(v, fam)
    material = t["effect"] >= min_eff - 1e-12
    t = dict(t)
    t.update({"testable": testable, "m_tests": m_tests, "p_adjusted": p_adj, "alpha": np.full(n, v.alpha),
              "min_effect": min_eff, "p_gate": np.where(material, p_adj, 1.0),
              "blocked": (p_adj < v.alpha) & material})
    return t


def adjust(table: pd.DataFrame, v: ValidateConfig) -> pd.DataFrame:
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
    return pd.DataFrame(_judge_arrays(t, v))[list(TABLE_COLUMNS)]


def _same(a: ClassCounts, b: ClassCounts) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("rows", "block", "dup"))


@dataclass(frozen=True)
class Comparison:
    """One comparison of the rate checks: rows under test, their reference (None = the prior
    block rate from conf), and the classes compared (those both sides hold)."""

    name: str  # one of COMPARISONS
    new: ClassCounts
    ref: Optional[ClassCounts]
    class_names: tuple[str, ...]


def comparison_table(comparisons: Sequence[Comparison], v: ValidateConfig,
                     checks: Iterable[str] = RATE_CHECKS + (PRIOR_CHECK,)) -> pd.DataFrame:
    """The judged rate-check table of several comparisons: Fisher rows (``checks`` among
    RATE_CHECKS) for each comparison with a reference, binomial ``block_rate_prior`` rows (when
    requested) for each without; one correction over all of them (:func:`adjust`)."""
    checks = tuple(checks)
    fisher = [c for c in checks if c in RATE_CHECKS]
    unknown = [c for c in checks if c not in RATE_CHECKS and c != PRIOR_CHECK]
    if unknown:
        raise StatsError(f"unknown rate check(s) {unknown}: use {', '.join(RATE_CHECKS + (PRIOR_CHECK,))}")
    parts: list[dict] = []
    for c in comparisons:
        if c.ref is None:
            if PRIOR_CHECK in checks:
                parts.append(_prior_rows(c.new, v.prior_block_rate, c.name, c.class_names))
        elif fisher:
            parts += _rate_rows(c.new, c.ref, c.name, c.class_names, fisher)
    if not parts:
        return adjust(pd.DataFrame(columns=list(TABLE_COLUMNS)), v)
    t = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return pd.DataFrame(_judge_arrays(t, v))[list(TABLE_COLUMNS)]


def growth_tests(new: ClassCounts, last: ClassCounts, class_names: Sequence[str], v: ValidateConfig, *,
                 new_vs_root: ClassCounts | None = None, root: ClassCounts | None = None,
                 checks: Sequence[str] = RATE_CHECKS, prior: bool = True) -> pd.DataFrame:
    """The judged rate-check table of one release against its history, on bare counts over one
    class list (what the unit tests and the drift arithmetic use; the stage goes through
    :func:`gate_tables`, which builds the same comparisons from row keys).

    new          the rows not in the last approved view (appended or edited);
    last         the last approved view;
    new_vs_root  the rows not in the root (the first approved view): everything since the root;
    root         the root.
    Fisher rows: ``last_approved`` (new vs last); with a root that differs from the last approved
    view also ``root`` (new vs root) and, when new_vs_root holds more than new, ``since_root``
    (new_vs_root vs root). Binomial rows (``block_rate_prior``, when ``prior``): ``prior`` (new vs
    prior_block_rate) and ``since_root_prior`` (new_vs_root vs prior_block_rate).
    """
    names = tuple(str(c) for c in class_names)
    since = new_vs_root is not None and not _same(new_vs_root, new)
    comps = [Comparison("last_approved", new, last, names)]
    if root is not None and not _same(root, last):
        comps.append(Comparison("root", new, root, names))
        if since:
            comps.append(Comparison("since_root", new_vs_root, root, names))
    comps.append(Comparison("prior", new, None, names))
    if since:
        comps.append(Comparison("since_root_prior", new_vs_root, None, names))
    return comparison_table(comps, v, tuple(checks) + ((PRIOR_CHECK,) if prior else ()))


def first_snapshot_tests(rows: ClassCounts, class_names: Sequence[str], v: ValidateConfig) -> pd.DataFrame:
    """The judged prior block-rate table of a release with no approved history (all rows new)."""
    return comparison_table([Comparison("prior", rows, None, tuple(str(c) for c in class_names))], v, (PRIOR_CHECK,))


# --------------------------------------------------------------------------- a view against its history


Key = tuple[str, str, str]  # (sample_id, content sha256, class name) of one training row
KEY_BLOCK = 65536  # rows hashed at a time by key_digests (~10 MB of Python strings a block)


def key_digests(ids, hashes, class_of_row) -> np.ndarray:
    """Each row's :data:`Key` as a 64-bit digest (pandas' ``hash_pandas_object``: SipHash per
    column, combined), so a view's keys are one uint64 array, not a set of Python tuples (at 1M
    rows ~0.5 GB per reference, issue 19 item 3). Two different keys share a digest with
    probability ~N^2 / 2^65 (3e-8 at 1M rows); a row made to collide on purpose needs a second
    preimage of SipHash-2-4's 64 bits."""
    def objects(x) -> np.ndarray:  # one dtype for every caller, so equal keys hash equal
        return np.asarray(x, dtype=object)

    # a pandas column by position (its array), whatever its index
    ids, hashes, class_of_row = (x.array if isinstance(x, pd.Series) else x for x in (ids, hashes, class_of_row))
    n = len(ids)
    if len(hashes) != n or len(class_of_row) != n:
        raise StatsError(f"key_digests: {n} ids, {len(hashes)} hashes, {len(class_of_row)} classes: pass one of each per row")
    out = np.empty(n, np.uint64)
    # In blocks: each row's digest depends on that row alone, and the Python strings a block needs
    # (pandas hashes object columns) then cost the block, not the view (issue 19 item 3)
    for lo in range(0, n, KEY_BLOCK):
        hi = min(n, lo + KEY_BLOCK)
        frame = pd.DataFrame({"id": objects(ids[lo:hi]), "hash": objects(hashes[lo:hi]),
                              "cls": objects(class_of_row[lo:hi])}, dtype=object)
        out[lo:hi] = pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)
    return out


def new_against(keys: np.ndarray, reference_keys: np.ndarray) -> np.ndarray:
    """True for each key (:func:`key_digests`) that the reference does not hold."""
    return ~np.isin(keys, reference_keys)


@dataclass(frozen=True, eq=False)
class ViewRows:
    """The train rows of one view as the gate measures them (arrays aligned by row).

    ``hashes`` are the content hashes of the pixels the view trains on (a poisoned row's
    ``sha256_after``); ``labels`` index ``class_names`` (the snapshot's, in store order);
    ``dup``: the row's pixels are on another row of the snapshot (train or test). ``ids`` and
    ``hashes``: numpy object arrays, or pandas string arrays (the stage passes the manifest's
    Arrow-backed columns, so they are never Python strings a row)."""

    ids: np.ndarray | pd.api.extensions.ExtensionArray
    hashes: np.ndarray | pd.api.extensions.ExtensionArray
    labels: np.ndarray
    block: np.ndarray
    dup: np.ndarray
    class_names: tuple[str, ...]
    phash: Optional[np.ndarray] = None  # uint64 per row (near-duplicate clusters)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if any(len(a) != n for a in (self.hashes, self.labels, self.block, self.dup)) or (
                self.phash is not None and len(self.phash) != n):
            raise StatsError("ViewRows arrays differ in length: pass one id, hash, label, block flag, dup flag "
                             "(and phash) per row")
        labels = np.asarray(self.labels, np.int64)
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise StatsError(f"labels must index class_names (0..{len(self.class_names) - 1})")

    def keys(self) -> np.ndarray:
        """Each row's (id, hash, class name) key as a digest (:func:`key_digests`)."""
        return self._keys

    @cached_property
    def _keys(self) -> np.ndarray:  # hashed once: the row counter and the stage's new-row mask both read them
        return key_digests(self.ids, self.hashes, np.asarray(self.class_names, dtype=object)[np.asarray(self.labels, np.int64)])

    def present(self) -> tuple[str, ...]:
        """Classes with at least one train row (a class with none is a removed class)."""
        n = np.bincount(np.asarray(self.labels, np.int64), minlength=len(self.class_names))
        return tuple(c for c, k in zip(self.class_names, n) if k > 0)

    def counts(self, mask: Optional[np.ndarray] = None, names: Optional[Sequence[str]] = None) -> ClassCounts:
        """Per-class counts of the rows in ``mask`` (all by default) over ``names`` (all classes by
        default, in that order; rows of other classes are left out)."""
        m = np.ones(len(self.ids), bool) if mask is None else np.asarray(mask, bool)
        full = ClassCounts.of(np.asarray(self.labels, np.int64)[m], np.asarray(self.block, bool)[m],
                              np.asarray(self.dup, bool)[m], len(self.class_names))
        if names is None:
            return full
        idx = [self.class_names.index(c) for c in names]
        return ClassCounts(full.rows[idx], full.block[idx], full.dup[idx])


@dataclass(frozen=True, eq=False)
class Reference:
    """An approved view the new rows are compared with: its per-class counts (from the approved
    ledger) and the keys of its train rows (from the store's manifest and its saved records)."""

    view_id: str
    snapshot_id: str
    counts: Mapping[str, Mapping[str, int]]  # {class name: {rows, block, dup}}
    keys: np.ndarray  # uint64 key digests of its train rows (key_digests), unique and sorted

    def present(self) -> tuple[str, ...]:
        return tuple(c for c, d in self.counts.items() if int(d.get("rows", 0)) > 0)

    def class_counts(self, names: Sequence[str]) -> ClassCounts:
        return ClassCounts.from_dict(self.counts, names)


def class_set_table(current: Sequence[str], reference: Sequence[str], v: ValidateConfig) -> pd.DataFrame:
    """One row per class of either view: ``change`` is ``shared``, ``new`` / ``removed`` (not
    acknowledged: check class_set fails) or ``new (accepted)`` / ``removed (accepted)`` when
    ``validate.accept_new_classes`` / ``accept_removed_classes`` name it. A removed class is one
    with no train row left (the store never drops a class name, a view can empty it)."""
    cur, ref = [str(c) for c in current], [str(c) for c in reference]
    acc_new = {str(c) for c in v.accept_new_classes}
    acc_rem = {str(c) for c in v.accept_removed_classes}
    rows = []
    for c in dict.fromkeys(ref + cur):
        if c in cur and c in ref:
            change = "shared"
        elif c in cur:
            change = "new (accepted)" if c in acc_new else "new"
        else:
            change = "removed (accepted)" if c in acc_rem else "removed"
        rows.append({"class_name": c, "in_reference": c in ref, "in_view": c in cur, "change": change})
    return pd.DataFrame(rows, columns=["class_name", "in_reference", "in_view", "change"])


CLASS_SET_OK = ("shared", "new (accepted)", "removed (accepted)")


class Counter(Protocol):
    """Per-class counts of a view's train rows, as :func:`count_tables` needs them: of all rows,
    of the rows new against the last approved view (``"new"``) and of those new against the root
    (``"since"``). :class:`RowCounter` counts from rows in memory; the validate stage's Spark
    engine from aggregates it computed on the cluster."""

    class_names: tuple[str, ...]

    def present(self) -> tuple[str, ...]: ...

    def counts(self, which: Optional[str], names: Sequence[str]) -> ClassCounts: ...

    def since_differs(self) -> bool: ...


@dataclass(frozen=True, eq=False)
class RowCounter:
    rows: ViewRows
    new: Optional[np.ndarray] = None
    since: Optional[np.ndarray] = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.rows.class_names

    def present(self) -> tuple[str, ...]:
        return self.rows.present()

    def counts(self, which: Optional[str], names: Sequence[str]) -> ClassCounts:
        return self.rows.counts({None: None, "new": self.new, "since": self.since}[which], names)

    def since_differs(self) -> bool:
        return self.since is not None and bool((self.since != self.new).any())


def row_counter(rows: ViewRows, last: Optional[Reference], root: Optional[Reference]) -> RowCounter:
    """The new-row masks of :class:`RowCounter`: a row is new when its (id, hash, class) key is not
    among the reference's."""
    if last is None:
        return RowCounter(rows)
    keys = rows.keys()
    new = new_against(keys, last.keys)
    since = new_against(keys, root.keys) if root is not None and root.view_id != last.view_id else None
    return RowCounter(rows, new, since)


def count_tables(counter: Counter, v: ValidateConfig, *, last: Optional[Reference], root: Optional[Reference],
                 rate_checks: Iterable[str] = RATE_CHECKS + (PRIOR_CHECK,)) -> dict[str, pd.DataFrame]:
    """The tables judged from per-class counts: ``class_set`` (with a reference) and one table
    per rate check (``block_rate``, ``duplicate_rate``, ``label_share`` with a reference;
    ``block_rate_prior`` always). Rate rows carry the snapshot's class index."""
    rate_checks = tuple(rate_checks)
    frames: dict[str, pd.DataFrame] = {}
    present = counter.present()
    comps: list[Comparison] = []
    if last is None:
        comps.append(Comparison("prior", counter.counts(None, present), None, present))
        rate_checks = tuple(c for c in rate_checks if c == PRIOR_CHECK)
    else:
        frames["class_set"] = class_set_table(present, last.present(), v)
        shared = tuple(c for c in present if c in set(last.present()))
        comps.append(Comparison("last_approved", counter.counts("new", shared), last.class_counts(shared), shared))
        differs = counter.since_differs()
        if root is not None and root.view_id != last.view_id:
            shared_root = tuple(c for c in shared if c in set(root.present()))
            root_c = root.class_counts(shared_root)
            comps.append(Comparison("root", counter.counts("new", shared_root), root_c, shared_root))
            if differs:
                comps.append(Comparison("since_root", counter.counts("since", shared_root), root_c, shared_root))
        # the prior needs no reference: every class of the view, a new one included
        comps.append(Comparison("prior", counter.counts("new", present), None, present))
        if differs:
            comps.append(Comparison("since_root_prior", counter.counts("since", present), None, present))
    table = comparison_table(comps, v, rate_checks)
    index = {c: i for i, c in enumerate(counter.class_names)}
    table["class_index"] = table["class_name"].map(index).astype(np.int64)
    for check in rate_checks:
        frames[check] = table[table["check"] == check].reset_index(drop=True)
    return frames


def gate_tables(rows: ViewRows, v: ValidateConfig, *, last: Optional[Reference], root: Optional[Reference],
                all_hashes: Sequence[str], all_labels: Sequence[int], all_ids: Optional[Sequence[str]] = None,
                rate_checks: Iterable[str] = RATE_CHECKS + (PRIOR_CHECK,)) -> dict[str, pd.DataFrame]:
    """Every judged table of the data gate but the per-sample one, by check name.

    rows         the view's train rows;
    last / root  the last approved view and the root (first approved view) of this source, or None
                 (first release: only the checks that need no history);
    all_hashes / all_labels / all_ids  every row of the snapshot (train rows with the view's hash
                 and label, then the test rows), for exact label conflicts across splits;
    rate_checks  the rate checks to build (``gates.data_checks.rate_checks()``: the one table).

    Tables: those of :func:`count_tables`, and the rules ``label_conflicts`` (all rows) and
    ``near_duplicate_clusters`` (train rows; needs ``rows.phash``).
    """
    frames = count_tables(row_counter(rows, last, root), v, last=last, root=root, rate_checks=rate_checks)
    names = rows.class_names
    conflicts = label_conflicts(all_hashes, all_labels)  # no list copies (1M labels as Python ints: ~36 MB)
    conflicts["labels"] = conflicts["labels"].map(lambda ls: [names[int(i)] for i in ls])
    if all_ids is not None:
        conflicts["sample_ids"] = conflicts["rows"].map(lambda rs: [str(all_ids[i]) for i in rs])
    frames["label_conflicts"] = conflicts
    if rows.phash is not None:
        clusters = near_duplicate_clusters(rows.phash, rows.labels, v.near_dup_radius)
        clusters["labels"] = clusters["labels"].map(lambda ls: [names[int(i)] for i in ls])
        clusters["sample_ids"] = clusters["rows"].map(lambda rs: [str(rows.ids[i]) for i in rs])
        frames["near_duplicate_clusters"] = clusters
    return frames


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
