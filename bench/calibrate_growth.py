"""Calibrate the statistical data gate on *growth*: clean appends must pass, poisoned ones must not.

    nice -n 10 python bench/calibrate_growth.py            # full run (see the results' wall time)
    python bench/calibrate_growth.py --clean-seeds 10 --attack-seeds 5 --datasets digits   # quick

Protocol (issue 11). A growth sequence = a root release (the first approved view: 650 digits rows,
or 3,000 CIFAR-10 train rows) followed by L appends of s rows each, all drawn without replacement
from the same pool (digits: all 1,797 rows; CIFAR-10: the 50,000 train rows of the JPEG copy in
../shared/datasets/cifar10), with a seeded permutation per (data set, size, seed). Sizes 20, 50,
100, 150, 200, 500 rows; L = 3 (digits at 500 rows: L = 2, the pool holds no more). Every append is
judged, in order, against its history:

- the data gate's own tables: ``pipeline.data.significance.gate_tables`` (what the validate stage
  builds) from the view's rows and its references (the last approved view and the root, as
  ``significance.Reference``: per-class counts and row keys), judged by ``gates.data_checks.judge``,
  the pandas twin of the GX suites (tests/test_validate.py checks they agree). Thresholds from
  conf/validate/default.yaml. No decision code of its own: a check blocks here exactly when the
  stage's GX expectation would fail.
- Not modelled: the per-sample identity/provenance checks (always complete here), and the test
  split (the stage also counts duplicates and label conflicts across the test rows).

Clean appends: every append of every sequence (``--clean-seeds`` sequences per size). Poisoned
appends: the last append of a sequence (``--attack-seeds`` per size, sizes >= 50) is replaced by a
poisoned copy made by ``pipeline.core.attacks.poison``, all-to-one into class 7 (digits "7",
CIFAR-10 "horse") on a fraction f of the append's rows (1, 2, 5, 10, 20%): 3x3 white patch at the
bottom-right corner; 3x3 white patch at random positions; blend (noise, alpha 0.1); label flip.

Also: a *drip* (6 appends of 100 rows, each with a 3x3 corner patch on 1 or 2 rows) judged by the
full design and by the last-approved comparison alone (no root); the *first snapshot* (no history): prior
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

from gates import data_checks  # noqa: E402
from pipeline.core import attacks  # noqa: E402
from pipeline.core.hashing import sample_hashes  # noqa: E402
from pipeline.data import significance as S  # noqa: E402
from pipeline.data import stats as DS  # noqa: E402
from pipeline.schema import ValidateConfig  # noqa: E402

SIZES = (20, 50, 100, 150, 200, 500)
ATTACK_SIZES = (50, 100, 150, 200, 500)
FRACS = (0.01, 0.02, 0.05, 0.1, 0.2)
TARGET = 7
# every check of the one table that this bench can exercise (the per-sample identity checks are
# always complete here)
CHECKS = tuple(dict.fromkeys(c.name for c in data_checks.CHECKS if c.statistic != "row"))
PATCH = {"kind": "patch", "size": 3, "pattern": "white", "alpha": 0.1}
ATTACKS = {
    "patch_corner": {"name": "backdoor", "trigger": dict(PATCH, location="bottom_right")},
    "patch_random": {"name": "backdoor", "trigger": dict(PATCH, location="random")},
    "blend": {"name": "backdoor", "trigger": {"kind": "blend", "size": 3, "location": "center", "pattern": "noise",
                                              "alpha": 0.1, "seed": 0}},
    "label_flip": {"name": "label_flip"},
}


PRESET = {"digits": "default", "cifar10": "cifar10"}  # conf/validate/<preset>.yaml each data set is judged with


def load_vcfg(dataset: str = "digits") -> ValidateConfig:
    """The data gate's settings as the pipeline composes them for ``dataset`` (validate=<preset>)."""
    from pipeline.config import compose, from_container

    preset = PRESET[dataset]
    return from_container(compose([] if preset == "default" else [f"validate={preset}"])).validate


# --------------------------------------------------------------------------- data


class Pool:
    """One data set's pool of rows with every per-row statistic precomputed once (as the stage
    computes them: stats.block_flags_cfg, sample hashes, stats.perceptual_hashes)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str], root_size: int,
                 v: ValidateConfig):
        self.name, self.images, self.labels = name, images, labels.astype(np.int64)
        self.class_names, self.root_size, self.v = tuple(class_names), root_size, v
        t = time.time()
        self.flags = DS.block_flags_cfg(images, v)["abnormal_block"].to_numpy()
        self.t_scan_all = time.time() - t
        t = time.time()
        self.flags_named = DS.block_flags_named(images, v.block_size, v.block_low, v.block_high, v.block_max_std,
                                                v.block_min_contrast)["abnormal_block"].to_numpy()
        self.t_scan_named = time.time() - t
        t = time.time()
        self.sha = np.asarray(sample_hashes(images), dtype=object)
        self.phash = DS.perceptual_hashes(images)
        self.t_hash = time.time() - t
        print(f"# {name}: {len(images)} rows; all-position scan {self.t_scan_all:.1f} s, named {self.t_scan_named:.1f} s, "
              f"sha256+phash {self.t_hash:.1f} s", flush=True)

    @property
    def C(self) -> int:
        return len(self.class_names)


def load_cifar(cache: Path, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 train rows, decoded once (pipeline.data.sources) and cached as .npy."""
    cache.mkdir(parents=True, exist_ok=True)
    fi, fl, fn = cache / "cifar10_train_images.npy", cache / "cifar10_train_labels.npy", cache / "cifar10_classes.json"
    if not (fi.is_file() and fl.is_file() and fn.is_file()):
        from pipeline.data.sources import load_imagefolder

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

    def __init__(self, pool: Pool, idx: np.ndarray, labels=None, flags=None, flags_named=None, sha=None, phash=None):
        self.idx = np.asarray(idx, np.int64)
        self.labels = pool.labels[self.idx] if labels is None else np.asarray(labels, np.int64)
        self.flags = pool.flags[self.idx] if flags is None else flags
        self.flags_named = pool.flags_named[self.idx] if flags_named is None else flags_named
        self.sha = pool.sha[self.idx] if sha is None else np.asarray(sha, dtype=object)
        self.phash = pool.phash[self.idx] if phash is None else phash

    def __len__(self) -> int:
        return len(self.idx)

    @staticmethod
    def cat(parts: list["Rows"]) -> "Rows":
        r = object.__new__(Rows)
        for k in ("idx", "labels", "flags", "flags_named", "sha", "phash"):
            setattr(r, k, np.concatenate([getattr(p, k) for p in parts]))
        return r


def view_rows(pool: Pool, view: Rows) -> S.ViewRows:
    """The view as the stage measures it (sample id = pool index; no test split here)."""
    return S.ViewRows(np.array([str(i) for i in view.idx], dtype=object), view.sha, view.labels, view.flags,
                      DS.duplicate_mask(view.sha), pool.class_names, view.phash)


def reference(pool: Pool, view: Rows, view_id: str) -> S.Reference:
    r = view_rows(pool, view)
    return S.Reference(view_id, view_id, r.counts().to_dict(pool.class_names), frozenset(r.keys()))


def judge_view(pool: Pool, root: Rows | None, approved: list[Rows], new: Rows, *, last_only: bool = False) -> dict:
    """The data gate on one release: {check: blocked} + the blocking comparisons, from the stage's
    tables (significance.gate_tables) and the one table of checks (data_checks.judge)."""
    v = pool.v
    view = Rows.cat(([root] if root is not None else []) + approved + [new])
    last_ref = root_ref = None
    if root is not None:
        last_ref = reference(pool, Rows.cat([root] + approved), f"last{len(approved)}")
        root_ref = None if last_only else (last_ref if not approved else reference(pool, root, "root"))
    rows = view_rows(pool, view)
    frames = S.gate_tables(rows, v, last=last_ref, root=root_ref, all_hashes=rows.hashes, all_labels=rows.labels,
                           rate_checks=data_checks.rate_checks())
    verdict = data_checks.judge(frames, v)
    out = {c: not verdict.get(c, True) for c in CHECKS}
    out["by_comparison"] = {c: False for c in S.COMPARISONS}
    for name in data_checks.rate_checks():
        t = frames.get(name)
        if t is not None and len(t):
            for c in set(t.loc[t["p_gate"] < v.alpha, "comparison"]):
                out["by_comparison"][c] = True
    out["any"] = not all(verdict.values())
    return out


def poison_rows(pool: Pool, rows: Rows, attack: str, frac: float, seed: int) -> Rows:
    """A poisoned copy of ``rows``: all-to-one into TARGET on round(frac * len) rows."""
    n = len(rows)
    cand = int((rows.labels != TARGET).sum())
    k = max(1, int(round(frac * n)))
    spec = dict(ATTACKS[attack], source=None, target=TARGET, rate=min(1.0, k / max(cand, 1)), seed=seed)
    if "trigger" in spec:
        spec["trigger"] = dict(spec["trigger"], seed=seed)
    imgs = pool.images[rows.idx]
    new_img, new_lab, recs = attacks.poison(imgs, rows.labels, [str(i) for i in range(n)], spec, list(pool.class_names))
    changed = np.array([int(r["sample_id"]) for r in recs], np.int64)
    flags, flags_named, sha, ph = rows.flags.copy(), rows.flags_named.copy(), rows.sha.copy(), rows.phash.copy()
    if len(changed) and spec["name"] == "backdoor":
        sub = new_img[changed]
        v = pool.v
        flags[changed] = DS.block_flags_cfg(sub, v)["abnormal_block"].to_numpy()
        flags_named[changed] = DS.block_flags_named(sub, v.block_size, v.block_low, v.block_high, v.block_max_std,
                                                    v.block_min_contrast)["abnormal_block"].to_numpy()
        sha[changed] = [r["sha256_after"] for r in recs]
        ph[changed] = DS.perceptual_hashes(sub)
    return Rows(pool, rows.idx, labels=new_lab, flags=flags, flags_named=flags_named, sha=sha, phash=ph)


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
        cell = {"n": 0, "checks": {c: 0 for c in CHECKS + ("any",)}, "by_comparison": {c: 0 for c in S.COMPARISONS},
                "by_position": {}}
        for seed in range(seeds):
            root, apps = sequence(pool, size, seed)
            for j, app in enumerate(apps):
                out = judge_view(pool, root, apps[:j], app)
                cell["n"] += 1
                for c in CHECKS + ("any",):
                    cell["checks"][c] += int(out[c])
                for c in S.COMPARISONS:
                    cell["by_comparison"][c] += int(out["by_comparison"][c])
                pos = cell["by_position"].setdefault(j + 1, [0, 0])
                pos[0] += int(out["any"])
                pos[1] += 1
        res[size] = cell
        print(f"#   clean {pool.name} s={size}: {cell['n']} appends, blocked {cell['checks']['any']}", flush=True)
    return res


def run_attacks(pool: Pool, seeds: int) -> dict:
    res: dict = {}
    for size in ATTACK_SIZES:
        for seed in range(seeds):
            root, apps = sequence(pool, size, 1000 + seed)
            approved, last = apps[:-1], apps[-1]
            for attack in ATTACKS:
                for frac in FRACS:
                    out = judge_view(pool, root, approved, poison_rows(pool, last, attack, frac, seed))
                    cell = res.setdefault(f"{attack}|{frac}|{size}", {"n": 0, "checks": {}})
                    cell["n"] += 1
                    for c in CHECKS + ("any",):
                        cell["checks"][c] = cell["checks"].get(c, 0) + int(out[c])
        print(f"#   attacks {pool.name} s={size} done", flush=True)
    return res


def run_drip(pool: Pool, seeds: int, per_append: int, n_apps: int = 6, size: int = 100) -> dict:
    """n_apps appends of `size` rows, each with a corner patch on `per_append` rows (into TARGET)."""
    out = {"full": np.zeros(n_apps, int), "last_only": np.zeros(n_apps, int), "n": 0}
    n_apps = min(n_apps, (len(pool.labels) - pool.root_size) // size)
    for seed in range(seeds):
        rng = np.random.default_rng([seed, 77, len(pool.name)])
        perm = rng.permutation(len(pool.labels))
        root = Rows(pool, perm[: pool.root_size])
        apps = []
        for j in range(n_apps):
            clean = Rows(pool, perm[pool.root_size + j * size : pool.root_size + (j + 1) * size])
            apps.append(poison_rows(pool, clean, "patch_corner", per_append / size, 10 * seed + j))
        first = {"full": None, "last_only": None}
        for j in range(n_apps):
            # every append is judged against the previous ones as if they had been approved
            if first["full"] is None and judge_view(pool, root, apps[:j], apps[j])["any"]:
                first["full"] = j
            if first["last_only"] is None and judge_view(pool, root, apps[:j], apps[j], last_only=True)["any"]:
                first["last_only"] = j
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
    """No history: the checks a first release runs (prior block rate, conflicts, near-duplicates)."""
    C = pool.C
    res: dict = {"clean": {"n": 0, "prior": 0, "conflicts": 0, "near_dup": 0, "any": 0}, "patch": {}, "copies": {}}

    def judge_root(rows: Rows) -> dict:
        o = judge_view(pool, None, [], rows)
        out = {"prior": o["block_rate_prior"], "conflicts": o["label_conflicts"], "near_dup": o["near_duplicate_clusters"]}
        out["any"] = o["any"]
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
            extra = Rows(pool, root.idx[pick], labels=(root.labels[pick] + 1) % C,
                         flags=DS.block_flags_cfg(imgs, pool.v)["abnormal_block"].to_numpy(),
                         flags_named=np.zeros(5, bool), sha=sample_hashes(imgs), phash=DS.perceptual_hashes(imgs))
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
    L = ["# Data gate on growth: false blocks and detection (bench/calibrate_growth.py)", "",
         f"Machine: {meta['machine']} (timings noisy: shared by several jobs). Wall time {meta['wall_s']:.0f} s. "
         f"Thresholds (conf/validate, per data set): {meta['params']}.",
         f"Seeds: {meta['clean_seeds']} clean sequences per size, {meta['attack_seeds']} poisoned per size "
         f"(seeds 1000+), {meta['first_seeds']} first snapshots, {meta['drip_seeds']} drips; roots "
         f"{ {d: r['root_size'] for d, r in results.items()} } rows.",
         "Every verdict is `gates.data_checks.judge` (the pandas twin of the stage's GX suites) on the tables "
         "`pipeline.data.significance.gate_tables` builds for the validate stage: no decision code of the bench's own.", ""]
    L += ["## Clean appends: false-block rate (blocked / appends judged)", "",
          "| data | rows/append | appends | " + " | ".join(CHECKS) + " | **any** |",
          "|---|---|---|" + "---|" * (len(CHECKS) + 1)]
    tot, tot_n = 0, 0
    for d, r in results.items():
        for size, c in r["clean"].items():
            n = c["n"]
            tot += c["checks"]["any"]
            tot_n += n
            L.append(f"| {d} | {size} | {n} | " + " | ".join(pct(c["checks"][k], n) for k in CHECKS)
                     + f" | **{pct(c['checks']['any'], n)}** |")
    L += ["", f"All clean appends: {pct(tot, tot_n)} blocked.", ""]
    L += ["## Poisoned appends: detection rate (share of appends blocked)", "",
          "All-to-one into class 7 on f of the append's rows (`attacks.poison`); patch = 3x3 white; blend = noise alpha 0.1. "
          "The poisoned append is the last of its sequence (judged against root + earlier clean appends).", ""]
    for d, r in results.items():
        L += [f"### {d}", "", "| attack | f | " + " | ".join(f"{s} rows" for s in ATTACK_SIZES) + " | catching check(s) at 100 rows |",
              "|---|---|" + "---|" * len(ATTACK_SIZES) + "---|"]
        for attack in ATTACKS:
            for frac in FRACS:
                cells = []
                for s in ATTACK_SIZES:
                    c = r["attacks"][f"{attack}|{frac}|{s}"]
                    cells.append(f"{100 * c['checks']['any'] / c['n']:.0f}%")
                c100 = r["attacks"][f"{attack}|{frac}|100"]
                which = ", ".join(f"{k} {100 * v / c100['n']:.0f}%" for k, v in c100["checks"].items() if k != "any" and v)
                L.append(f"| {attack} | {frac:g} | " + " | ".join(cells) + f" | {which or '-'} |")
        L.append("")
    L += ["## Drip: 6 appends of 100 rows, each with a 3x3 corner patch on m rows (into class 7)", "",
          "Cumulative share of sequences blocked by append k. full = with the root comparisons; "
          "last_only = against the last approved view only (and the prior on its new rows).", "",
          "| data | m per append | rule | " + " | ".join(f"by {k}" for k in range(1, 7)) + " |", "|---|---|---|" + "---|" * 6]
    for d, r in results.items():
        for dr in r["drip"]:
            for rule in ("full", "last_only"):
                vals = dr[rule] + [dr[rule][-1]] * (6 - len(dr[rule]))
                L.append(f"| {d} | {dr['per_append']} | {rule} | " + " | ".join(f"{100 * v / dr['n']:.0f}%" for v in vals) + " |")
    L += ["", "## First snapshot (no history)", "",
          "The checks a first release runs: block_rate_prior (binomial per class vs `prior_block_rate`), label_conflicts, "
          "near_duplicate_clusters.", "",
          "| data | case | n | block_rate_prior | label_conflicts | near_duplicate_clusters | any |", "|---|---|---|---|---|---|---|"]
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
    L += ["", "## Block scan: clean flag rate, named locations (k = block_size) vs all positions (k = block_size..block_size_max)", "",
          "| data | k (all positions) | rows | named: all rows | named: worst class | all positions: all rows | all positions: worst class | time named / all |",
          "|---|---|---|---|---|---|---|---|"]
    for d, r in results.items():
        b = r["block_scan"]
        pd_ = meta["params"].get(d, {})
        L.append(f"| {d} | {pd_.get('block_size')}..{pd_.get('block_size_max')} | {b['rows']} | {100 * b['named']:.3f}% | {100 * b['named_max_class']:.2f}% | {100 * b['all']:.3f}% | "
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


KEYS = ("alpha", "min_effect_block_rate", "min_effect_share", "min_effect_duplicate_rate", "prior_block_rate",
        "near_dup_radius", "block_size", "block_size_max")


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
    t0 = time.time()
    results: dict = {}
    params: dict = {}
    for d in args.datasets:
        v = load_vcfg(d)
        if d == "digits":
            img, lab, names = load_digits()
            root = args.digits_root
        else:
            img, lab, names = load_cifar(Path(args.cache), Path(args.cifar))
            root = args.cifar_root
        pool = Pool(d, img, lab, names, root, v)
        # radius 8 on 50,000 hashes makes 7-bit chunks: millions of candidates; 4 shows CIFAR's closest pair
        r = {"root_size": root, "block_scan": block_scan_rates(pool), "phash": phash_radius(pool, 8 if d == "digits" else 4)}
        r["clean"] = run_clean(pool, args.clean_seeds)
        r["attacks"] = run_attacks(pool, args.attack_seeds)
        r["drip"] = [run_drip(pool, args.drip_seeds, m) for m in (1, 2)]
        r["first"] = run_first_snapshot(pool, args.first_seeds)
        results[d] = r
        params[d] = {"preset": f"validate={PRESET[d]}", **{k: getattr(v, k) for k in KEYS}}
        print(f"# {d} done at {time.time() - t0:.0f} s", flush=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()}-core CPU, python {platform.python_version()}, numpy "
                       f"{np.__version__}, pandas {pd.__version__}, scipy {__import__('scipy').__version__}",
            "wall_s": time.time() - t0, "params": params,
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
