"""Calibrate the release gate's drift thresholds on clean seed-to-seed spread, and show the margin
to the seed attacks.

    python bench/calibrate_gate.py [--seeds 6] [overrides ...]

Protocol: the pipeline's own config (conf/ composed with the overrides; default digits +
small_cnn), the pipeline's own data source, training loop and evaluation
(`pipeline.evaluate.evaluate_model`, the scan set of conf/eval). N clean models differ only in
`train.seed` (0..N-1). Every ordered pair (baseline i, candidate j != i) gives the statistics the
gate thresholds: the largest per-class recall drop, the clean accuracy drop, and the largest ASR
increase over (trigger, target) pairs. Then the seed attacks are trained with train.seed 0 and
compared with the seed-0 clean model as baseline: label flip 40% of class 1 -> 7 and a 3x3 white
bottom-right patch on 10% of class 1 -> 7.

Prints a table and writes bench/results/gate_calibration.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import compose, from_container  # noqa: E402


def pair_stats(base: dict, cand: dict) -> dict:
    recall_drop = max(base["per_class"][c]["recall"] - cand["per_class"][c]["recall"] for c in base["per_class"])
    asr_inc = max(
        cand["asr"][t][c] - base["asr"][t][c]
        for t in cand["asr"] for c in cand["asr"][t]
        if cand["asr"][t][c] is not None and base["asr"][t].get(c) is not None
    )
    return {"recall_drop": recall_drop, "accuracy_drop": base["accuracy"] - cand["accuracy"], "asr_increase": asr_inc,
            "asr_max": cand["asr_max"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6, help="clean models (train.seed 0..N-1); >= 5")
    ap.add_argument("--out", default=str(REPO / "bench/results/gate_calibration.md"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default: the digits defaults)")
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error("--seeds must be at least 2")

    os.chdir(REPO)  # data.path defaults are relative to the repo root
    cfg = from_container(compose(args.overrides))
    from pipeline import sources
    from pipeline.core import attacks
    from pipeline.core.train import TrainSpec, train_model
    from pipeline.evaluate import evaluate_model

    src = sources.load_source(cfg.data)
    train = src.splits == "train"
    x_tr, y_tr = src.images[train], src.labels[train]
    x_te, y_te = src.images[~train], src.labels[~train]
    names = [str(c) for c in src.class_names]
    scan = list(cfg.eval.scan)

    def evaluate(model, attack: dict | None) -> dict:
        return evaluate_model(model, x_te, y_te, names, scan, attack, cfg.eval.batch_size, cfg.train.device, cfg.train.tta)

    def fit(images: np.ndarray, labels: np.ndarray, seed: int):
        spec = dataclasses.replace(cfg.train, seed=seed)
        t0 = time.perf_counter()
        model, _, _ = train_model(images, labels, len(names), cfg.model.name, cfg.model.width, spec)
        return model, time.perf_counter() - t0

    t_all = time.perf_counter()
    clean, secs = [], []
    for s in range(args.seeds):
        model, sec = fit(x_tr, y_tr, s)
        if s == 0:
            baseline_model = model  # re-evaluated with each attack's own trigger, as the pipeline does
        m = evaluate(model, None)
        clean.append(m)
        secs.append(sec)
        print(f"clean seed {s}: accuracy {m['accuracy']:.4f}, asr_max {m['asr_max']:.3f}, {sec:.1f} s", file=sys.stderr)
    pairs = [pair_stats(clean[i], clean[j]) for i, j in itertools.permutations(range(args.seeds), 2)]

    attacks_run = {
        "label flip 40% 1->7": {"name": "label_flip", "source": "1", "target": "7", "rate": 0.4, "seed": 0,
                                "trigger": {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white",
                                            "alpha": 0.1, "seed": 0}},
        "backdoor patch 10% 1->7": {"name": "backdoor", "source": "1", "target": "7", "rate": 0.1, "seed": 0,
                                    "trigger": {"kind": "patch", "size": 3, "location": "bottom_right",
                                                "pattern": "white", "alpha": 0.1, "seed": 0}},
    }
    attacked = {}
    ids = [f"r{i}" for i in range(len(y_tr))]
    for label, spec in attacks_run.items():
        resolved = attacks.resolve_attack(spec, names, x_tr.shape[1:])
        xp, yp, _ = attacks.poison(x_tr, y_tr, ids, spec, names)
        m = evaluate(fit(xp, yp, 0)[0], resolved)
        attacked[label] = (m, pair_stats(evaluate(baseline_model, resolved), m))
        print(f"{label}: accuracy {m['accuracy']:.4f}, asr_max {m['asr_max']:.3f}", file=sys.stderr)
    total = time.perf_counter() - t_all

    def col(key: str) -> np.ndarray:
        return np.array([p[key] for p in pairs])

    lines = [
        "# Release-gate calibration (bench/calibrate_gate.py)",
        "",
        f"- config: data={cfg.data.name}, model={cfg.model.name}, epochs={cfg.train.epochs}, "
        f"overrides={args.overrides or 'none'}",
        f"- clean models: train.seed 0..{args.seeds - 1} ({args.seeds} models, {len(pairs)} ordered pairs); "
        f"test rows {len(y_te)}",
        f"- machine: {os.cpu_count()} CPU cores, {platform.machine()}, python {platform.python_version()}, "
        f"torch {__import__('torch').__version__}, device {cfg.train.device}; {np.mean(secs):.1f} ± {np.std(secs):.1f} s "
        f"per model; {total:.0f} s in all",
        "",
        "| statistic (candidate vs baseline) | clean mean | clean max | gate threshold |",
        "|---|---|---|---|",
        f"| largest per-class recall drop | {col('recall_drop').mean():.4f} | {col('recall_drop').max():.4f} | "
        f"max_recall_drop {cfg.gate.max_recall_drop} |",
        f"| clean accuracy drop | {col('accuracy_drop').mean():.4f} | {col('accuracy_drop').max():.4f} | "
        f"max_accuracy_drop {cfg.gate.max_accuracy_drop} |",
        f"| largest ASR increase (trigger, target) | {col('asr_increase').mean():.4f} | "
        f"{col('asr_increase').max():.4f} | max_asr_increase {cfg.gate.max_asr_increase} |",
        f"| max ASR of a clean model | {col('asr_max').mean():.4f} | {col('asr_max').max():.4f} | max_asr {cfg.gate.max_asr} |",
        f"| clean accuracy | {np.mean([m['accuracy'] for m in clean]):.4f} | min {min(m['accuracy'] for m in clean):.4f} | "
        f"min_accuracy {cfg.gate.min_accuracy} |",
        "",
        "| attack (train.seed 0, baseline = clean seed 0) | accuracy | class-1 recall drop | largest recall drop | "
        "max ASR | ASR increase |",
        "|---|---|---|---|---|---|",
    ]
    for label, (m, st) in attacked.items():
        c1 = clean[0]["per_class"]["1"]["recall"] - m["per_class"]["1"]["recall"]
        lines.append(f"| {label} | {m['accuracy']:.4f} | {c1:.4f} | {st['recall_drop']:.4f} | {m['asr_max']:.4f} | "
                     f"{st['asr_increase']:.4f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
