"""What the data gate catches when an attack poisons the view of an approved snapshot.

    nice -n 10 python bench/calibrate_validation.py [--datasets digits cifar10] [--seeds 20]

The clean-data calibration of the thresholds is ``bench/calibrate_growth.py`` (false blocks on
growth, detection in appends, drips, first releases). This bench measures the other way poison
reaches training: the snapshot is unchanged and already approved, and the poison stage's view
changes some of its rows (``attack.*`` set; the seed experiments of the project).

Protocol. Trial s:
- digits: the train split of split seed s (stratified, test_fraction 0.25) plus its test split;
- CIFAR-10 (../shared/datasets/cifar10, JPEG, cached as .npy like calibrate_growth): a random 50%
  subsample of the 50,000 train rows (numpy seed s); no test rows (they only add exact-duplicate
  and label-conflict candidates across splits, none of which these attacks create).
Its identity view is approved (the reference and root); then each attack poisons the train rows
(attack seed = s), source class 1 -> target 7 (digits 1 -> 7; CIFAR-10 automobile -> horse), at
rates 0.01, 0.02, 0.05, 0.1, 0.2, 0.4 of the source rows: label_flip; backdoor patch (3x3 white,
bottom_right); backdoor patch at random positions; backdoor blend (noise, alpha 0.1). The new rows
are the rows the view changed. Every verdict is the stage's: ``validate.build_tables`` on the
stage's measurement, judged by ``gates.data_checks.judge`` (the pandas twin of the GX suites;
tests/test_validate.py checks they agree). The only bench-side shortcut: a poisoned view's
per-row statistics are the clean view's with the changed rows re-measured (same functions).

Prints the smallest rate caught in every trial per check and writes the table to
bench/results/calibrate_validation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from pipeline import validate as V  # noqa: E402
from pipeline.core import attacks  # noqa: E402
from pipeline.core.hashing import sample_hashes  # noqa: E402
from pipeline.data import stats as DS  # noqa: E402
from pipeline.data import store  # noqa: E402

RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
CHECKS = tuple(dict.fromkeys(c.name for c in data_checks.CHECKS))
PATCH = {"kind": "patch", "size": 3, "pattern": "white", "alpha": 0.1, "seed": 0}
ATTACKS = {
    "label_flip": {"name": "label_flip", "source": 1, "target": 7},
    "backdoor_patch": {"name": "backdoor", "source": 1, "target": 7, "trigger": dict(PATCH, location="bottom_right")},
    "backdoor_patch_random": {"name": "backdoor", "source": 1, "target": 7, "trigger": dict(PATCH, location="random")},
    "backdoor_blend": {"name": "backdoor", "source": 1, "target": 7,
                       "trigger": {"kind": "blend", "size": 3, "location": "center", "pattern": "noise",
                                   "alpha": 0.1, "seed": 0}},
}


def load_vcfg():
    from omegaconf import OmegaConf

    from pipeline.config import ValidateConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ValidateConfig),
                                               OmegaConf.load(REPO / "conf/validate/default.yaml")))


def snapshot_of(x: np.ndarray, y: np.ndarray, split: np.ndarray, names: list[str], sid: str) -> store.Snapshot:
    ids = [f"{s}/{i}" for i, s in enumerate(split)]
    man = pd.DataFrame({"sample_id": ids, "sha256": sample_hashes(x), "label": y.astype(np.int64), "split": split,
                        "source_uri": [f"mem://{i}" for i in ids], "ingest_time": "t", "snapshot_id": "a" * 64,
                        "pack": "p", "pack_index": np.arange(len(ids))})
    return store.Snapshot(sid, man, x, names, tuple(x.shape[1:]), {"source": {"key": "bench"}})


def trials(name: str, n: int, cifar: Path, cache: Path):
    """Yield (seed, snapshot) per trial."""
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = np.rint(d.images * 255 / 16).astype(np.uint8)[..., None]
        y = d.target.astype(np.int64)
        for s in range(n):
            tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=s)
            idx = np.concatenate([tr, te])
            split = np.array(["train"] * len(tr) + ["test"] * len(te))
            yield s, snapshot_of(x[idx], y[idx], split, [str(c) for c in range(10)], f"digits{s}")
        return
    sys.path.insert(0, str(REPO / "bench"))
    from calibrate_growth import load_cifar  # the same decoded, cached copy

    xtr, ytr, names = load_cifar(cache, cifar)
    for s in range(n):
        idx = np.sort(np.random.default_rng(s).choice(len(ytr), len(ytr) // 2, replace=False))
        yield s, snapshot_of(xtr[idx], ytr[idx], np.array(["train"] * len(idx)), list(names), f"cifar{s}")


def poisoned(snap: store.Snapshot, clean: V.Measured, spec: dict, v) -> V.Measured:
    """The stage's measurement of a poisoned view: the clean one with the changed rows re-measured."""
    img, lab, ids = snap.split("train")
    new_img, new_lab, recs = attacks.poison(img, lab, ids, spec, snap.class_names)
    rows = np.array(sorted(ids.index(r["sample_id"]) for r in recs), np.int64) if recs else np.zeros(0, np.int64)
    r = clean.rows
    hashes, labels, block, ph = r.hashes.copy(), np.asarray(new_lab, np.int64), r.block.copy(), r.phash.copy()
    flags = clean.flags.copy()
    images = clean.images
    if len(rows):
        after = {x["sample_id"]: x["sha256_after"] for x in recs}
        hashes[rows] = [after[ids[i]] for i in rows]
        if spec["name"] == "backdoor":
            images = clean.images.copy()
            images[rows] = new_img[rows]
            f = DS.block_flags_cfg(new_img[rows], v)
            block[rows] = f["abnormal_block"].to_numpy()
            flags.iloc[rows, :] = f[flags.columns].to_numpy()
            ph[rows] = DS.perceptual_hashes(new_img[rows])
    n_tr = len(ids)
    all_hashes = list(hashes) + list(clean.all_hashes[n_tr:])
    all_labels = np.concatenate([labels, clean.all_labels[n_tr:]])
    dup = DS.duplicate_mask(all_hashes)[:n_tr]
    rows_ = dataclasses.replace(r, hashes=hashes, labels=labels, block=block, dup=dup, phash=ph)
    return V.Measured(rows_, images, flags, clean.all_ids, all_hashes, all_labels, rows.tolist())


def run(name: str, n: int, args, v) -> dict:
    caught = {}
    t0 = time.time()
    for s, snap in trials(name, n, Path(args.cifar), Path(args.cache)):
        clean = V.measure_view(snap, [], v)
        ref = V.as_reference(clean, "clean", snap.id)
        for aname, attack in ATTACKS.items():
            for rate in RATES:
                spec = dict(attack, rate=rate, seed=s)
                m = poisoned(snap, clean, spec, v)
                verdict = data_checks.judge(V.build_tables(snap, m, v, ref, ref).frames, v)
                for c in CHECKS:
                    caught.setdefault((aname, c, rate), []).append(not verdict.get(c, True))
                caught.setdefault((aname, "any", rate), []).append(not all(verdict.values()))
        print(f"# {name} trial {s} done at {time.time() - t0:.0f} s", flush=True)
    return {k: float(np.mean(x)) for k, x in caught.items()}


def table(results: dict[str, dict], n_by: dict[str, int]) -> str:
    names = list(results)
    L = ["| attack | check | " + " | ".join(f"{d} ({n_by[d]} trials)" for d in names) + " |",
         "|---|---|" + "---|" * len(names)]
    for aname in ATTACKS:
        for c in CHECKS + ("any",):
            cells = []
            for d in names:
                caught = results[d]
                full = [r for r in RATES if caught[(aname, c, r)] >= 1.0]
                part = [r for r in RATES if caught[(aname, c, r)] > 0]
                if full:
                    cells.append(f"{full[0]:g}" + (f" (some at {part[0]:g})" if part and part[0] < full[0] else ""))
                elif part:
                    cells.append(f"- (some at {part[0]:g}: {caught[(aname, c, part[0])]:.0%})")
                else:
                    cells.append("-")
            if c == "any" or any(x != "-" for x in cells):
                L.append(f"| {aname} | {'**any**' if c == 'any' else c} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="accepted for older command lines (the only mode)")
    ap.add_argument("--datasets", nargs="+", default=["digits", "cifar10"], choices=["digits", "cifar10"])
    ap.add_argument("--seeds", type=int, default=20, help="trials per data set")
    ap.add_argument("--cifar", default=str(REPO.parent / "shared/datasets/cifar10"))
    ap.add_argument("--cache", default="/tmp/poisongate-cache")
    ap.add_argument("--out", default=str(REPO / "bench/results/calibrate_validation.md"))
    args = ap.parse_args(argv)
    v = load_vcfg()
    t0 = time.time()
    results = {d: run(d, args.seeds, args, v) for d in args.datasets}
    md = "\n".join([
        "# What the data gate catches in a poisoned view of an approved snapshot (bench/calibrate_validation.py)", "",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, python {platform.python_version()}, numpy "
        f"{np.__version__}; wall {time.time() - t0:.0f} s (shared box). Thresholds: conf/validate/default.yaml. "
        "Source class 1 -> target 7; cell = smallest rate (fraction of the source class) caught in every trial, "
        "'(some at r)' = caught in some trials from r; '-' = never up to 0.4; checks that never fired are left out.", "",
        table(results, {d: args.seeds for d in results}), ""])
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
