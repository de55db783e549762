"""Calibrate the statistical data gate on *growth*: clean appends must pass, poisoned ones must not.

    python bench/calibrate_growth.py                       # full run (~10 min on 2 busy cores)
    python bench/calibrate_growth.py --clean-seeds 10 --attack-seeds 5 --datasets digits   # quick

Protocol (issue 11). A growth sequence = a root release (the first approved view: 650 digits rows,
or 3,000 CIFAR-10 train rows) followed by L appends of s rows each, all drawn without replacement
from the same pool (digits: all 1,797 rows; CIFAR-10: the 50,000 train rows of the JPEG copy in
../shared/datasets/cifar10), with a seeded permutation per (data set, size, seed). Sizes 20, 50,
100, 150, 200, 500 rows; L = 3 (digits at 500 rows: L = 2, the pool holds no more). Every append is
judged, in order, against its history:

- NEW rules (``pipeline.data.stats``): per-class one-sided Fisher tests of the new rows against the
  last approved view, against the root, and everything since the root against the root
  (block_rate, label_share, duplicate_rate), Bonferroni over Tarone's testable hypotheses, alpha
  split between the three checks, plus a minimum effect; and the rules without a rate
  (label_conflicts, near_duplicate_clusters of 64-bit phash within the radius). Blocks abnormal
  blocks found by the all-position scan (``block_flags_all``).
- OLD rules (``validate.check_statistics`` with conf/validate/default.yaml): the whole view's
  KL / max share delta / duplicate rate / per-class block-rate increase against the last approved
  view, with the named-location scan (``validate.block_flags``); no test split in the duplicates.

Clean appends: every append of every sequence (``--clean-seeds`` sequences per size). Poisoned
appends: the last append of a sequence (``--attack-seeds`` per size, sizes >= 50) is replaced by a
poisoned copy made by ``pipeline.core.attacks.poison``, all-to-one into class 7 (digits "7",
CIFAR-10 "horse") on a fraction f of the append's rows (1, 2, 5, 10, 20%): 3x3 white patch at the
bottom-right corner; 3x3 white patch at random positions; blend (noise, alpha 0.1); label flip.

Also: a *drip* (6 appends of 100 rows, each with a 3x3 corner patch on 1 or 2 rows) judged by the
full design and by the last-approved comparison alone; the *first snapshot* (no history): prior
block-rate test, label conflicts and cross-label near-duplicate clusters on clean roots, patched
roots and roots with relabelled copies; the block scan's clean flag rate (named vs all
positions); the phash radius (closest cross-label pair over the whole data set).

Writes bench/results/calibrate_growth.md and bench/results/calibrate_growth.json. Machine: see the
header line; CPU only, torch not imported. CIFAR-10 is decoded once and cached as .npy under
``--cache`` (default /tmp/poisongate-cache).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core import attacks  # noqa: E402
from pipeline.core.hashing import sample_hashes  # noqa: E402
from pipeline.data import significance as S  # noqa: E402

SIZES = (20, 50, 100, 150, 200, 500)
ATTACK_SIZES = (50, 100, 150, 200, 500)
FRACS = (0.01, 0.02, 0.05, 0.1, 0.2)
TARGET = 7
NEW_CHECKS = ("block_rate", "block_rate_prior", "label_share", "duplicate_rate", "label_conflicts", "near_duplicate_clusters")
OLD_CHECKS = ("block_rate_increase", "label_kl", "class_share_delta", "duplicate_rate", "no_conflicting_labels")
PATCH = {"kind": "patch", "size": 3, "pattern": "white", "alpha": 0.1}
ATTACKS = {
    "patch_corner": {"name": "backdoor", "trigger": dict(PATCH, location="bottom_right")},
    "patch_random": {"name": "backdoor", "trigger": dict(PATCH, location="random")},
    "blend": {"name": "backdoor", "trigger": {"kind": "blend", "size": 3, "location": "center", "pattern": "noise",
                                              "alpha": 0.1, "seed": 0}},
    "label_flip": {"name": "label_flip"},
}


# --------------------------------------------------------------------------- data


class Pool:
    """One data set's pool of rows with every per-row statistic precomputed once."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str], root_size: int,
                 v_old, params: S.GateParams):
        self.name, self.images, self.labels = name, images, labels.astype(np.int64)
        self.class_names, self.root_size, self.v_old, self.params = class_names, root_size, v_old, params
        from pipeline import validate as V

        self.V = V
        t = time.time()
        self.flags = S.block_flags_all(images)["abnormal_block"].to_numpy()
        self.t_scan_all = time.time() - t
        t = time.time()
        self.flags_named = V.block_flags(images, v_old.block_size, v_old.block_low, v_old.block_high,
                                         v_old.block_max_std, v_old.block_min_contrast)["abnormal_block"].to_numpy()
        self.t_scan_named = time.time() - t
        t = time.time()
        self.sha = sample_hashes(images)
        codes, uniq = pd.factorize(pd.Series(self.sha))
        self.codes = codes.astype(np.int64)
        self.code_of = {h: i for i, h in enumerate(uniq)}
        self.phash = S.perceptual_hashes(images)
        self.t_hash = time.time() - t
        # near-duplicate pairs of the whole pool, once; a view keeps those with both ends present
        pairs = S.near_duplicate_pairs(self.phash, params.near_dup_radius)
        self.nd_i, self.nd_j = pairs["i"].to_numpy(), pairs["j"].to_numpy()
        print(f"# {name}: {len(images)} rows; all-position scan {self.t_scan_all:.1f} s, named {self.t_scan_named:.1f} s, "
              f"sha256+phash {self.t_hash:.1f} s", flush=True)

    @property
    def C(self) -> int:
        return len(self.class_names)


def load_cifar(cache: Path, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 train rows, decoded once (pipeline.sources) and cached as .npy."""
    cache.mkdir(parents=True, exist_ok=True)
    fi, fl, fn = cache / "cifar10_train_images.npy", cache / "cifar10_train_labels.npy", cache / "cifar10_classes.json"
    if not (fi.is_file() and fl.is_file() and fn.is_file()):
        from pipeline.sources import load_imagefolder

        t = time.time()
        d = load_imagefolder(str(path))
        tr = np.asarray(d.splits) == "train"
        np.save(fi, d.images[tr])
        np.save(fl, d.labels[tr])
        fn.write_text(json.dumps(list(d.class_names)))
        print(f"# decoded CIFAR-10 in {time.time() - t:.1f} s, cached under {cache}", flush=True)
    return np.load(fi), np.load(fl), json.loads(fn.read_text())


def load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits as sk

    d = sk()
    return np.rint(d.images * 255 / 16).astype(np.uint8)[..., None], d.target.astype(np.int64), [str(c) for c in d.target_names]


# --------------------------------------------------------------------------- one view = a list of row blocks


class Rows:
    """Rows of a view: pool indices plus per-row overrides (poisoned labels, flags, hashes)."""

    def __init__(self, pool: Pool, idx: np.ndarray, labels=None, flags=None, flags_named=None, codes=None, phash=None):
        self.idx = np.asarray(idx, np.int64)
        self.labels = pool.labels[self.idx] if labels is None else np.asarray(labels, np.int64)
        self.flags = pool.flags[self.idx] if flags is None else flags
        self.flags_named = pool.flags_named[self.idx] if flags_named is None else flags_named
        self.codes = pool.codes[self.idx] if codes is None else codes
        self.phash = pool.phash[self.idx] if phash is None else phash

    def __len__(self) -> int:
        return len(self.idx)

    @staticmethod
    def cat(parts: list["Rows"]) -> "Rows":
        r = object.__new__(Rows)
        for k in ("idx", "labels", "flags", "flags_named", "codes", "phash"):
            setattr(r, k, np.concatenate([getattr(p, k) for p in parts]))
        return r


def n_conflicts(codes: np.ndarray, labels: np.ndarray) -> int:
    """Number of content hashes under more than one label."""
    pairs = np.unique(np.stack([codes, labels], 1), axis=0)
    _, cnt = np.unique(pairs[:, 0], return_counts=True)
    return int((cnt > 1).sum())


def dup_flags(codes: np.ndarray) -> np.ndarray:
    _, inv, cnt = np.unique(codes, return_inverse=True, return_counts=True)
    return cnt[inv] > 1


def counts(rows: Rows, dup: np.ndarray, C: int) -> S.ClassCounts:
    return S.ClassCounts.of(rows.labels, rows.flags, dup, C)


def cross_label_near_dup(pool: Pool, view: Rows) -> bool:
    """Does the view hold a phash cluster under two labels? (= a cross-label pair within the
    radius; same answer as ``S.near_duplicate_clusters(view.phash, view.labels, r)``, from the
    pool's precomputed pairs plus the rows whose pixels a poison changed.)"""
    r = pool.params.near_dup_radius
    changed = view.phash != pool.phash[view.idx]
    pos = np.full(len(pool.labels), -1, np.int64)
    pos[view.idx[~changed]] = np.flatnonzero(~changed)
    a, b = pos[pool.nd_i], pos[pool.nd_j]
    ok = (a >= 0) & (b >= 0)
    if (view.labels[a[ok]] != view.labels[b[ok]]).any():
        return True
    for k in np.flatnonzero(changed):
        d = np.bitwise_count(view.phash ^ view.phash[k])
        d[k] = 99
        if ((d <= r) & (view.labels != view.labels[k])).any():
            return True
    return False


def judge_new(pool: Pool, root: Rows, approved: list[Rows], new: Rows, *, root_only: bool = False,
              last_only: bool = False) -> dict[str, bool]:
    """NEW rules on one append: {check: blocked}."""
    C, P = pool.C, pool.params
    last = Rows.cat([root] + approved)
    view = Rows.cat([root] + approved + [new])
    dup_view = dup_flags(view.codes)
    n_last = len(last)
    c_root = counts(root, dup_flags(root.codes), C)
    c_last = counts(last, dup_flags(last.codes), C)
    new_c = S.ClassCounts.of(new.labels, new.flags, dup_view[n_last:], C)
    since = Rows.cat(approved + [new])
    since_c = S.ClassCounts.of(since.labels, since.flags, dup_view[len(root):], C)
    if last_only:
        t = S.growth_tests(new_c, c_last, pool.class_names, P)
    else:
        t = S.growth_tests(new_c, c_last, pool.class_names, P, new_vs_root=since_c, root=c_root)
    chk, cmp_, blk = t["check"].to_numpy(), t["comparison"].to_numpy(), t["blocked"].to_numpy()
    out = {c: bool(blk[chk == c].any()) for c in S.RATE_CHECKS + ("block_rate_prior",)}
    out["by_comparison"] = {c: bool(blk[cmp_ == c].any()) for c in S.COMPARISONS}
    # rules without a rate, over the whole view (cheap: codes and phash precomputed)
    out["label_conflicts"] = n_conflicts(view.codes, view.labels) > 0
    out["near_duplicate_clusters"] = cross_label_near_dup(pool, view)
    out["any"] = any(out[c] for c in NEW_CHECKS)
    return out


def judge_old(pool: Pool, approved_view: Rows, view: Rows) -> dict[str, bool]:
    """OLD rules (today's check_statistics and thresholds) on the whole view vs the last approved."""
    V, C = pool.V, pool.C
    ref_sh = V.label_shares(approved_view.labels, C)
    ref_br = V.class_rates(approved_view.flags_named, approved_view.labels, C)
    sh = V.label_shares(view.labels, C)
    br = V.class_rates(view.flags_named, view.labels, C)
    stats = {
        "provenance_coverage": 1.0,
        "kl_divergence": V.kl_divergence(sh, ref_sh),
        "max_abs_share_delta": float(np.abs(sh - ref_sh).max()),
        "duplicate_rate": float(dup_flags(view.codes).mean()),
        "conflicting_hashes": n_conflicts(view.codes, view.labels),
        "max_block_rate_increase": float((br - ref_br).max()),
    }
    out = V.check_statistics(stats, pool.v_old)
    res = {c: not out[c] for c in OLD_CHECKS}
    res["any"] = not all(out.values())
    return res


def poison_rows(pool: Pool, rows: Rows, attack: str, frac: float, seed: int) -> Rows:
    """A poisoned copy of ``rows``: all-to-one into TARGET on round(frac * len) rows."""
    n = len(rows)
    cand = int((rows.labels != TARGET).sum())
    k = max(1, int(round(frac * n)))
    spec = dict(ATTACKS[attack], source=None, target=TARGET, rate=min(1.0, k / max(cand, 1)), seed=seed)
    if "trigger" in spec:
        spec["trigger"] = dict(spec["trigger"], seed=seed)
    imgs = pool.images[rows.idx]
    new_img, new_lab, recs = attacks.poison(imgs, rows.labels, [str(i) for i in range(n)], spec, pool.class_names)
    changed = np.array([int(r["sample_id"]) for r in recs], np.int64)
    flags, flags_named, codes, ph = rows.flags.copy(), rows.flags_named.copy(), rows.codes.copy(), rows.phash.copy()
    if len(changed) and spec["name"] == "backdoor":
        sub = new_img[changed]
        flags[changed] = S.block_flags_all(sub)["abnormal_block"].to_numpy()
        v = pool.v_old
        flags_named[changed] = pool.V.block_flags(sub, v.block_size, v.block_low, v.block_high, v.block_max_std,
                                                  v.block_min_contrast)["abnormal_block"].to_numpy()
        codes[changed] = [pool.code_of.get(r["sha256_after"], -1 - int(r["sample_id"]) - 10**7 * (seed + 1)) for r in recs]
        ph[changed] = S.perceptual_hashes(sub)
    return Rows(pool, rows.idx, labels=new_lab, flags=flags, flags_named=flags_named, codes=codes, phash=ph)


# --------------------------------------------------------------------------- experiments


def sequence(pool: Pool, size: int, seed: int) -> tuple[Rows, list[Rows]]:
    rng = np.random.default_rng([seed, size, len(pool.name)])
    perm = rng.permutation(len(pool.labels))
    L = min(3, (len(perm) - pool.root_size) // size)
    root = Rows(pool, perm[: pool.root_size])
    apps = [Rows(pool, perm[pool.root_size + j * size : pool.root_size + (j + 1) * size]) for j in range(L)]
    return root, apps


def run_clean(pool: Pool, seeds: int) -> dict:
    res: dict = {}
    for size in SIZES:
        cell = {"n": 0, "new": {c: 0 for c in NEW_CHECKS + ("any",)}, "old": {c: 0 for c in OLD_CHECKS + ("any",)},
                "new_by_comparison": {c: 0 for c in S.COMPARISONS}, "by_position": {}}
        for seed in range(seeds):
            root, apps = sequence(pool, size, seed)
            for j, app in enumerate(apps):
                new = judge_new(pool, root, apps[:j], app)
                old = judge_old(pool, Rows.cat([root] + apps[:j]), Rows.cat([root] + apps[: j + 1]))
                cell["n"] += 1
                for c in NEW_CHECKS + ("any",):
                    cell["new"][c] += int(new[c])
                for c in S.COMPARISONS:
                    cell["new_by_comparison"][c] += int(new["by_comparison"][c])
                for c in OLD_CHECKS + ("any",):
                    cell["old"][c] += int(old[c])
                cell["by_position"].setdefault(j + 1, [0, 0])
                cell["by_position"][j + 1][0] += int(new["any"])
                cell["by_position"][j + 1][1] += 1
        res[size] = cell
        print(f"#   clean {pool.name} s={size}: {cell['n']} appends, new any {cell['new']['any']}, old any {cell['old']['any']}",
              flush=True)
    return res


def run_attacks(pool: Pool, seeds: int) -> dict:
    res: dict = {}
    for size in ATTACK_SIZES:
        for seed in range(seeds):
            root, apps = sequence(pool, size, 1000 + seed)
            approved, last = apps[:-1], apps[-1]
            for attack in ATTACKS:
                for frac in FRACS:
                    bad = poison_rows(pool, last, attack, frac, seed)
                    new = judge_new(pool, root, approved, bad)
                    old = judge_old(pool, Rows.cat([root] + approved), Rows.cat([root] + approved + [bad]))
                    cell = res.setdefault(f"{attack}|{frac}|{size}", {"n": 0, "new": {}, "old": {}})
                    cell["n"] += 1
                    for c in NEW_CHECKS + ("any",):
                        cell["new"][c] = cell["new"].get(c, 0) + int(new[c])
                    for c in OLD_CHECKS + ("any",):
                        cell["old"][c] = cell["old"].get(c, 0) + int(old[c])
        print(f"#   attacks {pool.name} s={size} done", flush=True)
    return res


def run_drip(pool: Pool, seeds: int, per_append: int, n_apps: int = 6, size: int = 100) -> dict:
    """n_apps appends of `size` rows, each with a corner patch on `per_append` rows (into TARGET)."""
    out = {"full": np.zeros(n_apps, int), "last_only": np.zeros(n_apps, int), "old": np.zeros(n_apps, int), "n": 0}
    avail = (len(pool.labels) - pool.root_size) // size
    n_apps = min(n_apps, avail)
    for seed in range(seeds):
        rng = np.random.default_rng([seed, 77, len(pool.name)])
        perm = rng.permutation(len(pool.labels))
        root = Rows(pool, perm[: pool.root_size])
        apps = []
        for j in range(n_apps):
            clean = Rows(pool, perm[pool.root_size + j * size : pool.root_size + (j + 1) * size])
            apps.append(poison_rows(pool, clean, "patch_corner", per_append / size, 10 * seed + j))
        first = {"full": None, "last_only": None, "old": None}
        for j in range(n_apps):
            if first["full"] is None and judge_new(pool, root, apps[:j], apps[j])["any"]:
                first["full"] = j
            if first["last_only"] is None and judge_new(pool, root, apps[:j], apps[j], last_only=True)["any"]:
                first["last_only"] = j
            if first["old"] is None and judge_old(pool, Rows.cat([root] + apps[:j]), Rows.cat([root] + apps[: j + 1]))["any"]:
                first["old"] = j
        for k, j in first.items():
            if j is not None:
                out[k][j:] += 1  # blocked by append j+1 (cumulative)
        out["n"] += 1
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()} | {"n_apps": n_apps,
                                                                                             "per_append": per_append}


def reencode_jpeg(images: np.ndarray, quality: int = 90) -> np.ndarray:
    from PIL import Image

    out = []
    for im in images:
        pil = Image.fromarray(im[..., 0] if im.shape[2] == 1 else im)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out).astype(np.uint8)


def run_first_snapshot(pool: Pool, seeds: int) -> dict:
    """No history: prior block-rate test + conflicts + cross-label near-duplicates on the root."""
    P, C = pool.params, pool.C
    res: dict = {"clean": {"n": 0, "prior": 0, "conflicts": 0, "near_dup": 0, "any": 0}, "patch": {}, "copies": {}}

    def judge_root(rows: Rows) -> dict:
        c = S.ClassCounts.of(rows.labels, rows.flags, dup_flags(rows.codes), C)
        t = S.first_snapshot_tests(c, pool.class_names, P)
        out = {"prior": bool(t["blocked"].any()),
               "conflicts": n_conflicts(rows.codes, rows.labels) > 0,
               "near_dup": bool(S.near_duplicate_clusters(rows.phash, rows.labels, P.near_dup_radius)["blocked"].any())}
        out["any"] = any(out.values())
        return out

    for seed in range(seeds):
        rng = np.random.default_rng([seed, 5, len(pool.name)])
        perm = rng.permutation(len(pool.labels))
        root = Rows(pool, perm[: pool.root_size])
        o = judge_root(root)
        res["clean"]["n"] += 1
        for k in o:
            res["clean"][k] += int(o[k])
        for attack in ("patch_corner", "patch_random"):
            for frac in FRACS:
                o = judge_root(poison_rows(pool, root, attack, frac, seed))
                cell = res["patch"].setdefault(f"{attack}|{frac}", {"n": 0, "prior": 0, "any": 0})
                cell["n"] += 1
                cell["prior"] += int(o["prior"])
                cell["any"] += int(o["any"])
        # 5 rows copied under another label: exact, JPEG q90, blend a=0.1, 3x3 patch
        pick = rng.choice(len(root), 5, replace=False)
        src = pool.images[root.idx[pick]]
        variants = {
            "exact": src,
            "jpeg_q90": reencode_jpeg(src),
            "blend_0.1": attacks.apply_trigger(src, ATTACKS["blend"]["trigger"]),
            "patch_3x3": attacks.apply_trigger(src, dict(PATCH, location="bottom_right")),
        }
        for name, imgs in variants.items():
            hs = sample_hashes(imgs)
            extra = Rows(pool, root.idx[pick], labels=(root.labels[pick] + 1) % C,
                         flags=S.block_flags_all(imgs)["abnormal_block"].to_numpy(), flags_named=np.zeros(5, bool),
                         codes=np.array([pool.code_of.get(h, -1 - i - 100 * seed) for i, h in enumerate(hs)]),
                         phash=S.perceptual_hashes(imgs))
            o = judge_root(Rows.cat([root, extra]))
            cell = res["copies"].setdefault(name, {"n": 0, "conflicts": 0, "near_dup": 0, "any": 0})
            cell["n"] += 1
            for k in ("conflicts", "near_dup", "any"):
                cell[k] += int(o[k])
    return res


def block_scan_rates(pool: Pool) -> dict:
    per_class = lambda f: [float(f[pool.labels == c].mean()) for c in range(pool.C)]  # noqa: E731
    return {"named": float(pool.flags_named.mean()), "all": float(pool.flags.mean()),
            "named_max_class": float(max(per_class(pool.flags_named))), "all_max_class": float(max(per_class(pool.flags))),
            "all_per_class": per_class(pool.flags), "t_named_s": pool.t_scan_named, "t_all_s": pool.t_scan_all,
            "rows": int(len(pool.labels))}


def phash_radius(pool: Pool, max_r: int) -> dict:
    """Closest cross-label pair, and the cross-label pair count per radius, over the whole pool."""
    pairs = S.near_duplicate_pairs(pool.phash, max_r)
    cross = pool.labels[pairs["i"]] != pool.labels[pairs["j"]]
    d = pairs["distance"].to_numpy()
    return {"cross_pairs_within": {r: int((cross & (d <= r)).sum()) for r in range(max_r + 1)},
            "same_pairs_within": {r: int((~cross & (d <= r)).sum()) for r in range(max_r + 1)},
            "closest_cross": int(d[cross].min()) if cross.any() else None}


# --------------------------------------------------------------------------- report


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100.0 * k / n:.1f}%)" if n else "-"


def report(results: dict, meta: dict) -> str:
    L = [f"# Data gate on growth: false blocks and detection (bench/calibrate_growth.py)", "",
         f"Machine: {meta['machine']} (timings noisy: shared by several jobs). Wall time {meta['wall_s']:.0f} s. "
         f"Params: {meta['params']}. Old rules: conf/validate/default.yaml ({meta['old']}).",
         f"Seeds: {meta['clean_seeds']} clean sequences per size, {meta['attack_seeds']} poisoned per size "
         f"(seeds 1000+), {meta['first_seeds']} first snapshots, {meta['drip_seeds']} drips; roots "
         f"{ {d: r['root_size'] for d, r in results.items()} } rows.", ""]
    L += ["## Clean appends: false-block rate (blocked / appends judged)", "",
          "NEW = `pipeline.data.stats`: per-class one-sided Fisher tests of the new rows vs the last approved view, vs the root, "
          "and of all rows since the root vs the root (block_rate, label_share, duplicate_rate), binomial vs the prior block rate "
          "(block_rate_prior), Bonferroni over Tarone's testable hypotheses with alpha split between the 4 checks, AND the minimum "
          "effect; plus label conflicts and cross-label phash clusters (any blocks). "
          "OLD = today's `check_statistics` with conf/validate/default.yaml on the whole view vs the last approved view.", "",
          "| data | rows/append | appends | NEW block_rate | NEW block_rate_prior | NEW label_share | NEW duplicate_rate | NEW conflicts+near-dup "
          "| **NEW any** | OLD block_rate_increase | OLD label_kl | OLD class_share_delta | OLD duplicate_rate | **OLD any** |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tot_new, tot_old, tot_n = 0, 0, 0
    for d, r in results.items():
        for size, c in r["clean"].items():
            n = c["n"]
            tot_new += c["new"]["any"]; tot_old += c["old"]["any"]; tot_n += n
            L.append(f"| {d} | {size} | {n} | {pct(c['new']['block_rate'], n)} | {pct(c['new']['block_rate_prior'], n)} | "
                     f"{pct(c['new']['label_share'], n)} | "
                     f"{pct(c['new']['duplicate_rate'], n)} | {pct(c['new']['label_conflicts'] + c['new']['near_duplicate_clusters'], n)} | "
                     f"**{pct(c['new']['any'], n)}** | {pct(c['old']['block_rate_increase'], n)} | {pct(c['old']['label_kl'], n)} | "
                     f"{pct(c['old']['class_share_delta'], n)} | {pct(c['old']['duplicate_rate'], n)} | **{pct(c['old']['any'], n)}** |")
    L += ["", f"All clean appends: NEW {pct(tot_new, tot_n)}, OLD {pct(tot_old, tot_n)}.", ""]
    L += ["## Poisoned appends: detection rate (NEW any / OLD any)", "",
          "All-to-one into class 7 on f of the append's rows (`attacks.poison`); patch = 3x3 white; blend = noise alpha 0.1. "
          "The poisoned append is the last of its sequence (judged against root + earlier clean appends). "
          "Read OLD's detection next to its false-block rate above: on digits it blocks 24-66% of *clean* appends of "
          ">= 100 rows, so most of its 'detection' there is the same noise.", ""]
    for d, r in results.items():
        L += [f"### {d}", "", "| attack | f | " + " | ".join(f"{s} rows" for s in ATTACK_SIZES) + " | catching NEW check(s) at 100 rows |",
              "|---|---|" + "---|" * len(ATTACK_SIZES) + "---|"]
        for attack in ATTACKS:
            for frac in FRACS:
                cells = []
                for s in ATTACK_SIZES:
                    c = r["attacks"][f"{attack}|{frac}|{s}"]
                    cells.append(f"{100 * c['new']['any'] / c['n']:.0f}% / {100 * c['old']['any'] / c['n']:.0f}%")
                c100 = r["attacks"][f"{attack}|{frac}|100"]
                which = ", ".join(f"{k} {100 * v / c100['n']:.0f}%" for k, v in c100["new"].items() if k != "any" and v)
                L.append(f"| {attack} | {frac:g} | " + " | ".join(cells) + f" | {which or '-'} |")
        L.append("")
    L += ["## Poisoned appends: detection per NEW check, at f = 5% (checks that never fired are left out)", "",
          "| data | attack | check | " + " | ".join(f"{s} rows" for s in ATTACK_SIZES) + " |",
          "|---|---|---|" + "---|" * len(ATTACK_SIZES)]
    for d, r in results.items():
        for attack in ATTACKS:
            for c in NEW_CHECKS:
                cells = [r["attacks"][f"{attack}|0.05|{s}"] for s in ATTACK_SIZES]
                if any(x["new"].get(c, 0) for x in cells):
                    L.append(f"| {d} | {attack} | {c} | " + " | ".join(f"{100 * x['new'][c] / x['n']:.0f}%" for x in cells) + " |")
    L += ["", "## Drip: 6 appends of 100 rows, each with a 3x3 corner patch on m rows (into class 7)", "",
          "Cumulative share of sequences blocked by append k. full = NEW with the root comparisons; "
          "last_only = NEW against the last approved view only; OLD = today's rules.", "",
          "| data | m per append | rule | " + " | ".join(f"by {k}" for k in range(1, 7)) + " |", "|---|---|---|" + "---|" * 6]
    for d, r in results.items():
        for dr in r["drip"]:
            for rule in ("full", "last_only", "old"):
                vals = dr[rule] + [dr[rule][-1]] * (6 - len(dr[rule]))
                L.append(f"| {d} | {dr['per_append']} | {rule} | " + " | ".join(f"{100 * v / dr['n']:.0f}%" for v in vals) + " |")
    L += ["", "## First snapshot (no history)", "",
          "Prior block-rate test (binomial per class vs `prior_block_rate`), exact label conflicts, cross-label phash clusters.", "",
          "| data | case | n | prior block rate | conflicts | near-dup clusters | any |", "|---|---|---|---|---|---|---|"]
    for d, r in results.items():
        f = r["first"]
        c = f["clean"]
        L.append(f"| {d} | clean root | {c['n']} | {pct(c['prior'], c['n'])} | {pct(c['conflicts'], c['n'])} | "
                 f"{pct(c['near_dup'], c['n'])} | {pct(c['any'], c['n'])} |")
        for k, c in f["patch"].items():
            a, fr = k.split("|")
            L.append(f"| {d} | {a} on {float(fr):.0%} of the root | {c['n']} | {pct(c['prior'], c['n'])} | - | - | {pct(c['any'], c['n'])} |")
        for k, c in f["copies"].items():
            L.append(f"| {d} | 5 rows copied under another label ({k}) | {c['n']} | - | {pct(c['conflicts'], c['n'])} | "
                     f"{pct(c['near_dup'], c['n'])} | {pct(c['any'], c['n'])} |")
    L += ["", "## Block scan: clean flag rate, named locations vs all positions (k = 3)", "",
          "| data | rows | named: all rows | named: worst class | all positions: all rows | all positions: worst class | time named / all |",
          "|---|---|---|---|---|---|---|"]
    for d, r in results.items():
        b = r["block_scan"]
        L.append(f"| {d} | {b['rows']} | {100 * b['named']:.3f}% | {100 * b['named_max_class']:.2f}% | {100 * b['all']:.3f}% | "
                 f"{100 * b['all_max_class']:.2f}% | {b['t_named_s']:.1f} s / {b['t_all_s']:.1f} s |")
    L += ["", "## phash radius: cross-label pairs within r bits over the whole pool", "",
          "| data | closest cross-label pair | " + " | ".join(f"r={r}" for r in range(9)) + " | same-label pairs r<=2 |",
          "|---|---|" + "---|" * 10]
    for d, r in results.items():
        p = r["phash"]
        cw = p["cross_pairs_within"]
        L.append(f"| {d} | {p['closest_cross'] if p['closest_cross'] is not None else '>' + str(max(cw))} bits | "
                 + " | ".join(str(cw.get(k, "n/m")) for k in range(9)) + f" | {p['same_pairs_within'][2]} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["digits", "cifar10"], choices=["digits", "cifar10"])
    ap.add_argument("--clean-seeds", type=int, default=100, help="clean sequences per size (3 appends each)")
    ap.add_argument("--attack-seeds", type=int, default=40, help="poisoned appends per size, attack and fraction")
    ap.add_argument("--first-seeds", type=int, default=20)
    ap.add_argument("--drip-seeds", type=int, default=20)
    ap.add_argument("--cifar", default=str(REPO.parent / "shared/datasets/cifar10"))
    ap.add_argument("--cache", default="/tmp/poisongate-cache")
    ap.add_argument("--cifar-root", type=int, default=3000)
    ap.add_argument("--digits-root", type=int, default=650)
    ap.add_argument("--out", default=str(REPO / "bench/results/calibrate_growth"))
    args = ap.parse_args(argv)
    from omegaconf import OmegaConf

    from pipeline.config import ValidateConfig

    v_old = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ValidateConfig), OmegaConf.load(REPO / "conf/validate/default.yaml")))
    params = S.GateParams()
    t0 = time.time()
    results: dict = {}
    for d in args.datasets:
        if d == "digits":
            img, lab, names = load_digits()
            root = args.digits_root
        else:
            img, lab, names = load_cifar(Path(args.cache), Path(args.cifar))
            root = args.cifar_root
        pool = Pool(d, img, lab, names, root, v_old, params)
        # radius 8 on 50,000 hashes makes 7-bit chunks: millions of candidates; 4 shows CIFAR's closest pair
        r = {"root_size": root, "block_scan": block_scan_rates(pool), "phash": phash_radius(pool, 8 if d == "digits" else 4)}
        r["clean"] = run_clean(pool, args.clean_seeds)
        r["attacks"] = run_attacks(pool, args.attack_seeds)
        r["drip"] = [run_drip(pool, args.drip_seeds, m) for m in (1, 2)]
        r["first"] = run_first_snapshot(pool, args.first_seeds)
        results[d] = r
        print(f"# {d} done at {time.time() - t0:.0f} s", flush=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()}-core CPU, python {platform.python_version()}, numpy "
                       f"{np.__version__}, pandas {pd.__version__}, scipy {__import__('scipy').__version__}",
            "wall_s": time.time() - t0, "params": params.__dict__, "old": {k: getattr(v_old, k) for k in (
                "max_kl", "max_class_share_delta", "max_duplicate_rate", "max_block_rate_increase")},
            "clean_seeds": args.clean_seeds, "attack_seeds": args.attack_seeds, "first_seeds": args.first_seeds,
            "drip_seeds": args.drip_seeds}
    md = report(results, meta)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
