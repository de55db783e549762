"""Statistics of the data gate (pipeline/data/significance.py, the per-row statistics in
pipeline/data/stats.py): exact tests, correction, effect gate, cumulative drift, first-snapshot
rules and the all-position block scan."""

from __future__ import annotations

import subprocess
import sys
from math import comb

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import ValidateConfig
from pipeline.core.attacks import apply_trigger, poison, resolve_locations
from pipeline.core.hashing import sample_hashes
from pipeline.data import significance as S
from pipeline.data import stats as DS

NAMES = [str(i) for i in range(10)]
REPO = Path(__file__).resolve().parent.parent
P: ValidateConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ValidateConfig),
                                                        OmegaConf.load(REPO / "conf/validate/default.yaml")))


def counts(rows, block=None, dup=None) -> S.ClassCounts:
    rows = np.asarray(rows, np.int64)
    z = np.zeros_like(rows)
    return S.ClassCounts(rows, z if block is None else np.asarray(block), z if dup is None else np.asarray(dup))


def rows_counts(images, labels, hashes=None) -> S.ClassCounts:
    flags = DS.block_flags_all(images)["abnormal_block"].to_numpy()
    dup = DS.duplicate_mask(hashes if hashes is not None else sample_hashes(images))
    return S.ClassCounts.of(labels, flags, dup, 10)


# --------------------------------------------------------------------------- exact tests


def test_fisher_one_sided_matches_hand_value_and_scipy():
    # 5 of 15 new rows flagged, 0 of 65 reference rows: P(all 5 flagged rows fall among the 15 new)
    hand = comb(15, 5) / comb(80, 5)
    p, p_min = S.fisher_greater([5], [15], [0], [65])
    assert p[0] == pytest.approx(hand, rel=1e-9)
    assert p[0] == pytest.approx(st.fisher_exact([[5, 10], [0, 65]], alternative="greater").pvalue, rel=1e-9)
    assert p_min[0] == pytest.approx(hand, rel=1e-9)  # 5 flagged in all: 5 of 5 in the new rows is the extreme
    # vectorised over many tables, incl. an empty sample and no flagged row at all
    x, n, X, N = [1, 0, 3, 0], [15, 0, 40, 12], [1, 2, 1, 0], [65, 30, 500, 70]
    p, p_min = S.fisher_greater(x, n, X, N)
    ref = [st.fisher_exact([[a, b - a], [c, d - c]], alternative="greater").pvalue if b else 1.0
           for a, b, c, d in zip(x, n, X, N)]
    np.testing.assert_allclose(p, ref, rtol=1e-9)
    assert p_min[1] == 1.0 and p_min[3] == 1.0  # nothing to test: untestable


def test_binomial_one_sided_matches_hand_value_and_scipy():
    # P(X >= 3), X ~ Bin(10, 0.1) = 1 - P(0) - P(1) - P(2)
    hand = 1 - (0.9**10 + 10 * 0.1 * 0.9**9 + 45 * 0.01 * 0.9**8)
    p, p_min = S.binom_greater([3], [10], 0.1)
    assert p[0] == pytest.approx(hand, rel=1e-9)
    assert p[0] == pytest.approx(st.binomtest(3, 10, 0.1, alternative="greater").pvalue, rel=1e-9)
    assert p_min[0] == pytest.approx(0.1**10)


def test_tarone_count_and_bonferroni_correction():
    assert S.tarone_count(np.array([1e-6, 1e-6, 0.5, 0.5, 1.0]), 0.01) == 2
    assert S.tarone_count(np.array([1.0, 1.0]), 0.01) == 1  # nothing testable: K = 1
    assert S.tarone_count(np.full(30, 1e-40), 0.01) == 30  # all testable: plain Bonferroni
    t = pd.DataFrame({
        "check": ["block_rate"] * 3 + ["label_share"] * 2,
        "comparison": "last_approved", "class_index": [0, 1, 2, 0, 1], "class_name": ["a", "b", "c", "a", "b"],
        "x_new": 0, "n_new": 10, "rate_new": 0.5, "x_ref": 0, "n_ref": 10, "rate_ref": 0.0, "effect": 0.5,
        "p_value": [1e-4, 0.3, 1.0, 1e-3, 0.2], "p_min": [1e-6, 1e-6, 1.0, 1e-30, 1e-30],
    })
    j = S.adjust(t, P)
    # alpha split between the two checks; block_rate has K = 2 testable rows, label_share K = 2
    assert j["m_tests"].tolist() == [4, 4, 4, 4, 4]
    np.testing.assert_allclose(j["p_adjusted"], [4e-4, 1.0, 1.0, 4e-3, 0.8])
    assert j["testable"].tolist() == [True, True, False, True, True]
    assert j["blocked"].tolist() == [True, False, False, True, False]
    # p_gate carries the whole rule for GX: p_gate >= alpha on every row <=> nothing blocked
    assert ((j["p_gate"] < P.alpha) == j["blocked"]).all()


def test_effect_size_gate():
    # 10,000 rows on each side: 2.5% vs 1% flagged is highly significant
    ref = counts([10_000] * 10, block=[100] * 10)
    small = counts([10_000] * 10, block=[100] * 9 + [250])  # +1.5 points: below min_effect_block_rate
    large = counts([10_000] * 10, block=[100] * 9 + [320])  # +2.2 points
    ts = S.growth_tests(small, ref, NAMES, P)
    tl = S.growth_tests(large, ref, NAMES, P)
    row = lambda t: t[(t.check == "block_rate") & (t.class_index == 9)].iloc[0]  # noqa: E731
    assert row(ts)["p_adjusted"] < 1e-6 and not row(ts)["blocked"] and row(ts)["p_gate"] == 1.0
    assert row(tl)["blocked"] and row(tl)["effect"] == pytest.approx(0.022)
    assert not S.growth_tests(large, ref, NAMES, dataclasses.replace(P, min_effect_block_rate=0.03))["blocked"].any()


# --------------------------------------------------------------------------- cumulative drift


def _share_append(last: S.ClassCounts, n: int, cls: int, step: float) -> S.ClassCounts:
    """n rows whose class `cls` share is `step` above the last approved share, the rest even."""
    share = last.rows[cls] / last.rows.sum() + step
    x = int(round(share * n))
    rest = np.full(10, (n - x) // 9)
    rest[cls] = x
    rest[(cls + 1) % 10] += n - rest.sum()
    return counts(rest)


def test_share_staircase_at_60pct_of_threshold_is_blocked_against_the_root():
    """Four appends, each raising class 7's share by 60% of min_effect_share over the last approved
    view: each passes that comparison, the root comparison blocks the third or the fourth."""
    root = counts([2000] * 10)
    last, since, blocked_full, blocked_last = root, counts([0] * 10), [], []
    for _ in range(4):
        new = _share_append(last, 20_000, 7, 0.6 * P.min_effect_share)
        since = since + new
        t_last = S.growth_tests(new, last, NAMES, P)
        t_full = S.growth_tests(new, last, NAMES, P, new_vs_root=since, root=root)
        blocked_last.append(bool(t_last["blocked"].any()))
        blocked_full.append(bool(t_full["blocked"].any()))
        assert not t_full[t_full.comparison == "last_approved"]["blocked"].any()
        last = last + new
    assert blocked_last == [False] * 4  # what comparing with the last approved view alone lets through
    assert not blocked_full[0] and not blocked_full[1]
    assert blocked_full[2] or blocked_full[3]
    first = blocked_full.index(True)
    assert first in (2, 3)


@pytest.mark.parametrize("root_per_class", [65, 300])  # digits' 650-row root; a 3,000-row CIFAR-10 root
def test_block_drip_at_60pct_of_the_per_append_count_is_blocked_since_the_root(root_per_class):
    """In appends of 500 rows the per-append threshold is significance: x* flagged class-7 rows
    block an append alone. Four appends with 60% of x* each: none is blocked against the last
    approved view, the evidence accumulated since the root blocks the third or the fourth."""
    root = counts([root_per_class] * 10, block=[0, 1] + [0] * 8)

    def app(m: int) -> S.ClassCounts:
        return counts([50] * 10, block=[0] * 7 + [m] + [0] * 2)

    x_star = next(m for m in range(1, 51) if S.growth_tests(app(m), root, NAMES, P)["blocked"].any())
    m = int(np.floor(0.6 * x_star))
    assert x_star >= 4 and m >= 2
    last, since, full, last_only = root, counts([0] * 10), [], []
    for _ in range(4):
        new = app(m)
        since = since + new
        last_only.append(bool(S.growth_tests(new, last, NAMES, P)["blocked"].any()))
        t = S.growth_tests(new, last, NAMES, P, new_vs_root=since, root=root)
        full.append(bool(t["blocked"].any()))
        if full[-1]:
            assert set(t.loc[t.blocked, "comparison"]) <= {"since_root", "since_root_prior"}
        last = last + new
    assert last_only == [False] * 4
    assert not full[0] and not full[1] and (full[2] or full[3])


def test_root_comparisons_are_skipped_while_the_last_approved_view_is_the_root():
    root = counts([65] * 10)
    new = counts([15] * 10)
    t = S.growth_tests(new, root, NAMES, P, new_vs_root=new, root=root)
    assert set(t["comparison"]) == {"last_approved", "prior"}
    last = root + counts([15] * 10)
    t = S.growth_tests(new, last, NAMES, P, new_vs_root=new + new, root=root)
    assert set(t["comparison"]) == {"last_approved", "root", "since_root", "prior", "since_root_prior"}
    assert set(S.growth_tests(new, last, NAMES, P, prior=False)["check"]) == set(S.RATE_CHECKS)


# --------------------------------------------------------------------------- first snapshot


def test_first_snapshot_cross_label_exact_duplicates(digits_split):
    x, y, *_ = digits_split
    imgs, labs = x[:200], y[:200].copy()
    imgs = np.concatenate([imgs, imgs[:2]])
    labs = np.concatenate([labs, (labs[:2] + 1) % 10])  # two re-uploads under another label
    hashes = sample_hashes(imgs)
    t = S.label_conflicts(hashes, labs)
    assert len(t) == 2 and t["blocked"].all() and (t["n_labels"] == 2).all()
    assert sorted(t["rows"].iloc[0]) in ([0, 200], [1, 201])
    assert S.label_conflicts(sample_hashes(x[:200]), y[:200]).empty
    # the same image twice under the same label is a duplicate, not a conflict
    assert S.label_conflicts(hashes[:200] + hashes[:1], list(y[:200]) + [y[0]]).empty
    assert DS.duplicate_mask(hashes).sum() == 4


def test_label_conflicts_match_a_groupby():
    """The numpy codes of label_conflicts give the table a pandas groupby on the strings gives."""
    def by_groupby(hashes, labels):
        df = pd.DataFrame({"sha256": pd.Series(hashes, dtype=object), "label": np.asarray(labels, np.int64)})
        g = df.groupby("sha256")["label"]
        nlab = g.nunique()
        out = []
        for h in nlab[nlab > 1].index:
            idx = np.flatnonzero(df["sha256"].to_numpy() == h)
            out.append((h, len(idx), int(nlab[h]), sorted(set(df["label"].iloc[idx].tolist())), idx.tolist()))
        return out

    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(0, 400))
        pool = [f"{k:064x}" for k in rng.permutation(max(1, n // 3) + 5)]
        hashes = [pool[i] if rng.random() > 0.05 else None for i in rng.integers(0, len(pool), n)]
        labels = rng.integers(0, 1 + trial % 4, n)
        t = S.label_conflicts(hashes, labels)
        got = [(r.sha256, r.n_rows, r.n_labels, r.labels, r.rows) for r in t.itertuples()]
        assert got == by_groupby(hashes, labels), trial
        assert t["blocked"].all() and (t["p_gate"] == 0).all()
    with pytest.raises(S.StatsError):
        S.label_conflicts(["a", "b"], [1])


def test_keyed_duplicates_and_conflicts_equal_the_string_path():
    """An Arrow-backed column takes the 64-bit-key path (no Python string a row: stats.hash_keys);
    it gives what the string path gives, also where different hashes share a key (the same first
    16 hex digits), over sliced and many-chunk columns."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(0, 300))
        prefixes = [f"{int(p):016x}" for p in rng.integers(0, 2**62, 1 + trial % 5)]  # few keys: collisions
        pool = [prefixes[int(rng.integers(len(prefixes)))] + f"{int(rng.integers(0, 2**62)):048x}"
                for _ in range(max(1, n // 3) + 3)]
        hashes = [pool[i] for i in rng.integers(0, len(pool), n)]
        labels = rng.integers(0, 1 + trial % 3, n)
        cut = int(rng.integers(0, n + 1))
        # two chunks, the second a slice at an offset: what pd.concat of manifest columns gives
        col = pd.concat([pd.Series(["f" * 64] + hashes[:cut], dtype="string[pyarrow]")[1:],
                         pd.Series(hashes[cut:], dtype="string[pyarrow]")], ignore_index=True).array
        keyed = DS.hash_keys(col)
        assert keyed is not None and len(keyed[0]) == n
        assert keyed[0].tolist() == [int(h[:16], 16) for h in hashes]
        assert DS.duplicate_mask(col).tolist() == DS.duplicate_mask(hashes).tolist(), trial
        fast, slow = S.label_conflicts(col, labels), S.label_conflicts(hashes, labels)
        key = lambda t: [(r.sha256, r.n_rows, r.n_labels, r.labels, r.rows) for r in t.itertuples()]  # noqa: E731
        assert key(fast) == key(slow) and list(fast.columns) == list(slow.columns), trial
    # not 64 characters, or a missing value: the string path
    for odd in (["a" * 63, "a" * 63], ["a" * 64, None], ["a" * 64, "a" * 65]):
        assert DS.hash_keys(pd.array(odd, dtype="string[pyarrow]")) is None
    # not hex: keys still, less spread, and the same answers as the string path
    odd = ["G" * 64, "g" * 64, "G" * 64, "zz" + "a" * 62, "ZZ" + "a" * 62, "A" * 64]
    col = pd.array(odd, dtype="string[pyarrow]")
    assert DS.duplicate_mask(col).tolist() == DS.duplicate_mask(odd).tolist() == [True, False, True, False, False, False]
    assert S.label_conflicts(col, [1, 1, 2, 3, 4, 5])["rows"].tolist() == [[0, 2]]
    assert DS.hash_keys(["a" * 64]) is None
    two = pd.array(["b" * 64, "b" * 64, "c" * 64], dtype="string[pyarrow]")
    assert DS.duplicate_mask(two).tolist() == [True, True, False]
    assert S.label_conflicts(two, [1, 2, 3])["rows"].tolist() == [[0, 1]]


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (300, 3)).astype(np.uint64)
    near = base ^ flips[:, 0] ^ np.where(rng.random(300) < 0.5, flips[:, 1], np.uint64(0))
    h = np.concatenate([base, near])
    for radius in (0, 1, 2, 3):
        got = S.near_duplicate_pairs(h, radius)
        d = np.bitwise_count(h[:, None] ^ h[None, :])
        i, j = np.nonzero(np.triu(d <= radius, 1))
        assert sorted(zip(got["i"], got["j"])) == sorted(zip(i.tolist(), j.tolist()))


def test_near_duplicate_pairs_in_blocks_match_brute_force(monkeypatch):
    """Rows that share a chunk value by the hundred (as a backdoor's patched rows do) are compared
    a block of candidate pairs at a time: with blocks of 50 candidates, and with a bucket larger
    than a block, every pair within the radius is found once, and no other."""
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 2**21, dtype=np.int64).astype(np.uint64)  # one value of the lowest chunk
    high = rng.integers(0, 2**43, 400, dtype=np.int64).astype(np.uint64) << np.uint64(21)
    h = high | shared  # 400 rows in one bucket of the lowest chunk
    h[200:260] = h[:60] ^ (np.uint64(1) << rng.integers(21, 64, 60).astype(np.uint64))  # 60 within 1 bit
    h[260:270] = h[0]  # exact copies: 11 equal rows, 55 pairs
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    for block in (50, 1 << 20):
        monkeypatch.setattr(S, "PAIR_BLOCK", block)
        for radius in (0, 1, 2):
            got = S.near_duplicate_pairs(h, radius)
            i, j = np.nonzero(np.triu(d <= radius, 1))
            assert list(zip(got["i"], got["j"])) == list(zip(i.tolist(), j.tolist())), (block, radius)
            assert (got["distance"].to_numpy() == d[i, j]).all() and len(got) >= (55 if radius == 0 else 55 + 60)


def test_near_duplicate_clusters_of_repeated_hashes_equal_the_all_pairs_clusters():
    """Rows sharing a hash are joined through the hash's first row, not pair by pair: the clusters
    (rows, labels, max distance, numbering) equal those built from every row pair."""
    rng = np.random.default_rng(2)
    for trial in range(20):
        base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
        near = base[:15] ^ (np.uint64(1) << rng.integers(0, 64, 15).astype(np.uint64))
        pool = np.concatenate([base, near])
        h = pool[rng.integers(0, len(pool), 300)]  # many rows share a hash
        y = rng.integers(0, 3, len(h))
        for radius in (0, 1, 2):
            for spanning in (True, False):
                pairs = S.near_duplicate_pairs(h, radius)
                involved = np.unique(np.r_[pairs["i"].to_numpy(), pairs["j"].to_numpy()]).astype(np.int64)
                want = S.clusters_from_pairs(pairs, involved, y[involved], spanning)
                got = S.near_duplicate_clusters(h, y, radius, spanning_only=spanning)
                assert len(want) > 0 or not spanning
                pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True),
                                              obj=f"trial {trial} radius {radius}")


@pytest.mark.parametrize("dct", ["private pocketfft", "scipy.fftpack"])
def test_batched_phash_is_imagehash_bit_for_bit(digits_split, dct, monkeypatch):
    import imagehash
    import scipy.fftpack
    from PIL import Image

    # both ways DS._dct_ii can go: scipy's compiled pocketfft loaded by path, or scipy.fftpack
    fn = DS._private_pocketfft_dct() if dct == "private pocketfft" else (lambda a, axis: scipy.fftpack.dct(a, axis=axis))
    assert fn is not None, "scipy's pocketfft module was not found or failed its probe: the fast path is gone"
    monkeypatch.setattr(DS, "_dct_ii", lambda: fn)

    x = digits_split[0][:700]  # more than one 512-row DCT batch
    rng = np.random.default_rng(3)
    cases = [x, rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),  # CIFAR-sized colour
             rng.integers(0, 256, (20, 57, 31, 1), dtype=np.uint8),  # not square, downsized
             np.full((3, 8, 8, 1), 200, np.uint8),  # flat: every coefficient ties with the median
             np.zeros((0, 28, 28, 1), np.uint8)]
    for imgs in cases:
        want = [int(str(imagehash.phash(Image.fromarray(im[..., 0] if im.shape[2] == 1 else im))), 16) for im in imgs]
        got = DS.perceptual_hashes(imgs)
        assert got.dtype == np.uint64 and got.tolist() == want


def test_phash_does_not_import_scipy_fft():
    """The snapshot stage's phash skips scipy.fft's ~0.3 s package import (issue 19 item 1)."""
    code = ("import sys, numpy as np; from pipeline.data import stats; "
            "h = stats.perceptual_hashes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28, 1) % 251); "
            "print(int(h[0]), 'scipy.fft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"
    from PIL import Image
    import imagehash
    im = (np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) % 251)
    assert int(out[0]) == int(str(imagehash.phash(Image.fromarray(im))), 16)


def test_first_snapshot_near_duplicate_clusters_span_labels(digits_split):
    x, y, *_ = digits_split
    ph = DS.perceptual_hashes(x)
    clean = S.near_duplicate_clusters(ph, y, P.near_dup_radius)
    assert clean.empty  # measured: the closest cross-label phash pair of all digits is 8 bits apart
    # a lightly blended copy of 3 rows, uploaded under another label, is found
    copies = apply_trigger(x[:3], {"kind": "blend", "pattern": "noise", "alpha": 0.05, "seed": 0})
    assert (sample_hashes(copies)[0] != sample_hashes(x[:1])[0])  # not an exact duplicate
    ph2 = np.concatenate([ph, DS.perceptual_hashes(copies)])
    y2 = np.concatenate([y, (y[:3] + 1) % 10])
    t = S.near_duplicate_clusters(ph2, y2, P.near_dup_radius)
    assert t["blocked"].all() and len(t) >= 2
    spanned = {r for rows in t["rows"] for r in rows}
    assert len(spanned & {len(x), len(x) + 1, len(x) + 2}) >= 2


def test_first_snapshot_prior_block_rate(digits_split):
    x, y, *_ = digits_split
    clean = rows_counts(x[:650], y[:650])
    assert not S.first_snapshot_tests(clean, NAMES, P)["blocked"].any()
    bad_x, bad_y, _ = poison(x[:650], y[:650], [str(i) for i in range(650)],
                             {"name": "backdoor", "source": None, "target": 7, "rate": 0.05, "seed": 0,
                              "trigger": {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white"}},
                             NAMES)
    t = S.first_snapshot_tests(rows_counts(bad_x, bad_y), NAMES, P)
    assert t["blocked"].any() and set(t.loc[t.blocked, "class_name"]) == {"7"}
    assert set(t["comparison"]) == {"prior"}


# --------------------------------------------------------------------------- block scan


def test_all_position_scan_matches_the_named_scan_at_named_locations(digits_split):
    x, *_ = digits_split
    x = x[:400]
    imgs = np.concatenate([x, apply_trigger(x[:50], {"kind": "patch", "size": 3, "location": "bottom_right",
                                                     "pattern": "white"})])
    old = DS.block_flags_named(imgs, 3, 16, 239, 4.0, 64.0)
    new = DS.block_flags_all(imgs, (3,), 16, 239, 4.0, 64.0)
    for loc in ("top_left", "top_right", "bottom_left", "bottom_right", "center"):
        assert (old[f"block_{loc}"] == new[f"block_{loc}"]).all()
    assert (new["abnormal_block"] >= old["abnormal_block"]).all()
    named_hit = old["abnormal_block"].to_numpy()
    assert (new.loc[named_hit, "abnormal_block_at"] == old.loc[named_hit, "abnormal_block_at"]).all()


def test_all_position_scan_finds_random_location_patches_the_named_scan_misses(digits_split):
    x, *_ = digits_split
    x = x[:300]
    spec = {"kind": "patch", "size": 3, "location": "random", "pattern": "white", "seed": 4}
    locs = resolve_locations(len(x), x.shape[1:], spec)
    imgs = apply_trigger(x, spec, locations=locs)
    named = DS.block_flags_named(imgs, 3, 16, 239, 4.0, 64.0)["abnormal_block"].to_numpy()
    new = DS.block_flags_all(imgs)
    found = new["abnormal_block"].to_numpy()
    assert found.mean() > 0.95 and named.mean() < 0.3
    # where the only block is the patch, the scan reports its position
    off_named = ~np.isin(new["abnormal_block_at"], ["top_left", "top_right", "bottom_left", "bottom_right", "center"]) & found
    at = new.loc[off_named, ["block_y", "block_x"]].to_numpy()
    assert (at == locs[off_named]).all(axis=1).mean() > 0.9
    # a concrete position off every named one, on the image where it is unmistakable
    one = np.zeros((1, 8, 8, 1), np.uint8)
    one[0, 1:4, 3:6, 0] = 255
    f = DS.block_flags_all(one)
    assert f.loc[0, "abnormal_block"] and f.loc[0, "abnormal_block_at"] == "[1, 3]"
    assert not DS.block_flags_named(one, 3, 16, 239, 4.0, 64.0).loc[0, "abnormal_block"]


def test_block_scan_refuses_bad_input():
    with pytest.raises(DS.StatsError, match="uint8"):
        DS.block_flags_all(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(DS.StatsError, match="do not fit"):
        DS.block_flags_all(np.zeros((2, 8, 8, 1), np.uint8), sizes=(9,))


# --------------------------------------------------------------------------- a clean append


def test_clean_digits_append_of_150_rows_passes_and_a_patched_one_does_not(digits_split):
    x, y, *_ = digits_split
    root_x, root_y = x[:650], y[:650]
    app_x, app_y = x[650:800], y[650:800]
    all_h = sample_hashes(x[:800])
    dup = DS.duplicate_mask(all_h)
    root = S.ClassCounts.of(root_y, DS.block_flags_all(root_x)["abnormal_block"], dup[:650], 10)
    new = S.ClassCounts.of(app_y, DS.block_flags_all(app_x)["abnormal_block"], dup[650:], 10)
    t = S.growth_tests(new, root, NAMES, P, new_vs_root=new, root=root)
    assert not t["blocked"].any(), S.blocked_summary(t)
    assert (t["p_gate"] >= P.alpha).all() and list(t.columns) == list(S.TABLE_COLUMNS)
    # the same append with a 3x3 corner patch on 5% of its rows (all-to-one into 7)
    px, py, recs = poison(app_x, app_y, [str(i) for i in range(150)],
                          {"name": "backdoor", "source": None, "target": 7, "rate": 7.5 / (app_y != 7).sum(), "seed": 1,
                           "trigger": {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white"}},
                          NAMES)
    assert len(recs) == 8
    bad = S.ClassCounts.of(py, DS.block_flags_all(px)["abnormal_block"], dup[650:], 10)
    tb = S.growth_tests(bad, root, NAMES, P)
    hit = tb[tb.blocked]
    assert set(hit.class_name) == {"7"} and "block_rate" in set(hit.check)
    assert set(hit.check) <= {"block_rate", "block_rate_prior"}


def test_counts_round_trip_and_new_rows():
    c = counts([3, 4], block=[1, 0], dup=[0, 2])
    assert S.ClassCounts.from_dict(c.to_dict(["a", "b"]), ["a", "b"]) == c
    assert c + c - c == c and c != counts([3, 4])
    with pytest.raises(DS.StatsError, match="lack classes"):
        S.ClassCounts.from_dict(c.to_dict(["a", "b"]), ["a", "c"])
    with pytest.raises(DS.StatsError, match="block, dup <= rows"):
        counts([1, 1], block=[2, 0])
    with pytest.raises(DS.StatsError, match="same class list"):
        S.growth_tests(counts([1, 1]), counts([1, 1, 1]), ["a", "b"], P)
    m = S.new_row_mask(["a", "b", "c"], ["h1", "h2x", "h3"], [0, 1, 2], ["a", "b"], ["h1", "h2"], [0, 1])
    assert m.tolist() == [False, True, True]  # b was edited, c appended
    from pipeline.schema import ConfigError
    from pipeline.config import compose, from_container

    raw = OmegaConf.to_container(compose())
    raw["validate"]["alpha"] = 0.0
    with pytest.raises(ConfigError, match="validate.alpha"):
        from_container(raw)


@pytest.mark.parametrize("dtype", [object, "str", "category"])
def test_provenance_counts_each_missing_record(dtype):
    good, sid = "a" * 64, "b" * 64
    m = pd.DataFrame({
        "source_uri": ["s3://x/0", "", "s3://x/2", "s3://x/3", "s3://x/4", None],
        "sha256": [good, good, "A" * 64, good, good, good],  # upper case is not a digest this store writes
        "ingest_time": ["t", "t", "t", "", "t", "t"],
        "snapshot_id": [sid, sid, sid, sid, "c" * 63, sid],
    }).astype(dtype)
    # only row 0 has every record; a missing (None) uri counts as missing, as an empty one does
    assert DS.provenance(m) == {"coverage": 1 / 6, "rows": 6, "with_source_uri": 4, "with_sha256": 5,
                                "with_ingest_record": 4}
    assert DS.provenance(m.iloc[:0])["coverage"] == 0.0
