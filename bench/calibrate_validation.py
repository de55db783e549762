"""Calibrate the data gate's thresholds on clean data, and measure what it catches.

    python bench/calibrate_validation.py --calibrate [--datasets digits cifar10]
    python bench/calibrate_validation.py --table     [--datasets digits cifar10] [--seeds 20]

Protocol (both modes). The reference is an *approved earlier snapshot*, the view a later one:
- digits: reference = the train split of split seed 0 (stratified, test_fraction 0.25);
  trial s = the train split of split seed s (s = 1..N);
- CIFAR-10 (../shared/datasets/cifar10, JPEG): reference = a random 50% subsample of the 50,000
  train images (numpy seed 0); trial s = another random 50% subsample (seed s).
Duplicates are counted over the trial's train rows plus the test split, as the stage does.

``--calibrate`` prints, for each statistic the gate thresholds, its value on every clean trial
and the spread (max over trials): the defaults in conf/validate/default.yaml sit above it.
``--table`` poisons each trial (attack seed = s) at rates 0.01..0.4 for label_flip, backdoor
patch (3x3 white, bottom_right) and backdoor blend (noise, alpha 0.1), all source 1 -> target 7,
judges every check with the defaults (``validate.check_statistics``, the same decisions as the
GX suite), and prints the smallest rate caught in every trial, plus the false-alarm rate of
each check on the clean trials. No GX here (the stage's GX run is tested in tests/); numbers
are from the pure statistics the stage feeds to GX.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import DataConfig, ValidateConfig  # noqa: E402
from pipeline.core import attacks  # noqa: E402
from pipeline.core.hashing import sample_hashes  # noqa: E402
from pipeline import validate as V  # noqa: E402

RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
CHECKS = ("label_kl", "class_share_delta", "no_conflicting_labels", "duplicate_rate", "block_rate_increase")
ATTACKS = {
    "label_flip": {"name": "label_flip", "source": 1, "target": 7},
    "backdoor_patch": {"name": "backdoor", "source": 1, "target": 7,
                       "trigger": {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white",
                                   "alpha": 0.1, "seed": 0}},
    "backdoor_blend": {"name": "backdoor", "source": 1, "target": 7,
                       "trigger": {"kind": "blend", "size": 3, "location": "center", "pattern": "noise",
                                   "alpha": 0.1, "seed": 0}},
}


def load_vcfg() -> ValidateConfig:
    raw = OmegaConf.load(REPO / "conf/validate/default.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ValidateConfig), raw))


class Trials:
    """A data set and its trials: (train indices of trial s) over one image array."""

    def __init__(self, name: str, n_trials: int, cifar_path: str):
        t = time.time()
        self.name = name
        from pipeline import sources

        if name == "digits":
            # the split changes with the seed, so each trial is its own load (cheap: 1,797 rows)
            self.digits = {s: sources.load_digits(0.25, s) for s in range(n_trials + 1)}
            d0 = self.digits[0]
            self.class_names = d0.class_names
        else:
            d = sources.load_source(DataConfig(name="cifar10", path=cifar_path, watch=cifar_path))
            self.class_names = d.class_names
            self.images, self.labels = d.images, d.labels
            self.train_idx = np.flatnonzero(d.splits == "train")
            self.test_idx = np.flatnonzero(d.splits == "test")
            self.hashes = np.array(sample_hashes(d.images), dtype=object)
        print(f"# loaded {name} in {time.time() - t:.1f} s", flush=True)

    def trial(self, s: int):
        """(train images, train labels, train hashes, test labels, test hashes) of trial s."""
        if self.name == "digits":
            d = self.digits[s]
            tr, te = d.splits == "train", d.splits == "test"
            h = np.array(sample_hashes(d.images), dtype=object)
            return d.images[tr], d.labels[tr], h[tr], d.labels[te], h[te]
        rng = np.random.default_rng(s)
        idx = np.sort(rng.choice(self.train_idx, len(self.train_idx) // 2, replace=False))
        te = self.test_idx
        return self.images[idx], self.labels[idx], self.hashes[idx], self.labels[te], self.hashes[te]


def reference_of(tr: Trials, v: ValidateConfig) -> V.Reference:
    img, lab, *_ = tr.trial(0)
    return V.source_reference("seed0", img, lab, len(tr.class_names), v)


def statistics(img, lab, hashes, test_lab, test_hashes, ref: V.Reference, v: ValidateConfig, n_classes: int,
               flags=None) -> dict:
    if flags is None:
        flags = V.block_flags_cfg(img, v)["abnormal_block"].to_numpy()
    shares = V.label_shares(lab, n_classes)
    rates = V.class_rates(flags, lab, n_classes)
    dup, conflicts, _ = V.duplicate_stats(list(hashes) + list(test_hashes), list(lab) + list(test_lab))
    return {
        "provenance_coverage": 1.0,
        "kl_divergence": V.kl_divergence(shares, ref.label_shares),
        "max_abs_share_delta": float(np.abs(shares - ref.label_shares).max()),
        "duplicate_rate": dup,
        "conflicting_hashes": conflicts,
        "max_block_rate_increase": float((rates - ref.block_rates).max()),
        "clean_block_rate": float(flags.mean()),
    }


def poisoned_stats(tr: Trials, s: int, attack: dict, rate: float, ref, v, base):
    img, lab, h, tl, th = base["data"]
    spec = dict(attack, rate=rate, seed=s)
    ids = [str(i) for i in range(len(lab))]
    new_img, new_lab, recs = attacks.poison(img, lab, ids, spec, tr.class_names)
    rows = np.array([int(r["sample_id"]) for r in recs], np.int64)
    flags = base["flags"].copy()
    h2 = h.copy()
    if len(rows) and attack["name"] == "backdoor":
        flags[rows] = V.block_flags_cfg(new_img[rows], v)["abnormal_block"].to_numpy()
        h2[rows] = [r["sha256_after"] for r in recs]
    return statistics(new_img, new_lab, h2, tl, th, ref, v, len(tr.class_names), flags=flags)


def calibrate(tr: Trials, n: int, v: ValidateConfig) -> None:
    ref = reference_of(tr, v)
    keys = ("kl_divergence", "max_abs_share_delta", "duplicate_rate", "conflicting_hashes",
            "max_block_rate_increase", "clean_block_rate")
    rows = []
    for s in range(1, n + 1):
        rows.append(statistics(*tr.trial(s), ref, v, len(tr.class_names)))
    print(f"\n## clean spread: {tr.name}, {n} trials against the seed-0 reference")
    print(f"reference clean block rates per class: {np.round(ref.block_rates, 4).tolist()}")
    print("| statistic | min | mean | max (spread) | default |")
    print("|---|---|---|---|---|")
    default = {"kl_divergence": v.max_kl, "max_abs_share_delta": v.max_class_share_delta,
               "duplicate_rate": v.max_duplicate_rate, "conflicting_hashes": 0,
               "max_block_rate_increase": v.max_block_rate_increase, "clean_block_rate": "-"}
    for k in keys:
        a = np.array([r[k] for r in rows], float)
        print(f"| {k} | {a.min():.5g} | {a.mean():.5g} | {a.max():.5g} | {default[k]} |")
    sys.stdout.flush()


def table(tr: Trials, n: int, v: ValidateConfig) -> dict:
    ref = reference_of(tr, v)
    res = {"false_alarm": {}, "caught": {}}
    bases = {}
    clean = []
    for s in range(1, n + 1):
        img, lab, h, tl, th = tr.trial(s)
        flags = V.block_flags_cfg(img, v)["abnormal_block"].to_numpy()
        bases[s] = {"data": (img, lab, h, tl, th), "flags": flags}
        st = statistics(img, lab, h, tl, th, ref, v, len(tr.class_names), flags=flags)
        clean.append(V.check_statistics(st, v))
    for c in CHECKS + ("any",):
        fails = [(not all(ch.values())) if c == "any" else (not ch[c]) for ch in clean]
        res["false_alarm"][c] = float(np.mean(fails))
    for aname, attack in ATTACKS.items():
        for rate in RATES:
            outs = [V.check_statistics(poisoned_stats(tr, s, attack, rate, ref, v, bases[s]), v) for s in range(1, n + 1)]
            for c in CHECKS + ("any",):
                det = float(np.mean([(not all(o.values())) if c == "any" else (not o[c]) for o in outs]))
                res["caught"][(aname, c, rate)] = det
        print(f"# {tr.name} {aname} done", flush=True)
    return res


def print_table(results: dict[str, dict], n_by: dict[str, int]) -> None:
    names = list(results)
    print("\n## smallest poison rate caught in every trial (detection fraction at that rate); '-' = not caught up to 0.4")
    print("| attack | check | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for aname in ATTACKS:
        for c in CHECKS + ("any",):
            cells = []
            for d in names:
                caught = results[d]["caught"]
                full = [r for r in RATES if caught[(aname, c, r)] >= 1.0]
                part = [r for r in RATES if caught[(aname, c, r)] > 0]
                if full:
                    cells.append(f"{full[0]:g}" + (f" (some at {part[0]:g})" if part and part[0] < full[0] else ""))
                elif part:
                    cells.append(f"- (some at {part[0]:g}: {caught[(aname, c, part[0])]:.0%})")
                else:
                    cells.append("-")
            print(f"| {aname} | {c} | " + " | ".join(cells) + " |")
    print("\n## false-alarm rate on clean trials")
    print("| check | " + " | ".join(f"{d} ({n_by[d]} seeds)" for d in names) + " |")
    print("|---|" + "---|" * len(names))
    for c in CHECKS + ("any",):
        print(f"| {c} | " + " | ".join(f"{results[d]['false_alarm'][c]:.2f}" for d in names) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--calibrate", action="store_true")
    mode.add_argument("--table", action="store_true")
    ap.add_argument("--datasets", nargs="+", default=["digits", "cifar10"], choices=["digits", "cifar10"])
    ap.add_argument("--seeds", type=int, default=20, help="clean trials (calibration, false alarms)")
    ap.add_argument("--cifar", default=str(REPO.parent / "shared/datasets/cifar10"))
    args = ap.parse_args(argv)
    v = load_vcfg()
    print(f"# machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()} "
          f"numpy {np.__version__}; thresholds from conf/validate/default.yaml: {v}")
    results, n_by = {}, {}
    for d in args.datasets:
        n = args.seeds
        tr = Trials(d, n, args.cifar)
        if args.calibrate:
            calibrate(tr, n, v)
        else:
            res = table(tr, n, v)
            results[d] = res
            n_by[d] = n
    if args.table:
        print_table(results, n_by)
    return 0


if __name__ == "__main__":
    sys.exit(main())
