"""Calibrate the gate's trigger-agnostic checks (poison_suspects, backdoor_scan) on clean digits models,
and measure the two backdoor scans (MM-BD, Neural Cleanse) on the same clean models and on a few backdoors.

    python bench/calibrate_inspect.py [--clean 20] [--jobs 2]

Protocol (digits, small_cnn, conf/train/digits.yaml on CPU, one torch thread per process):
- Clean runs: train seeds 0..N-1 on the un-poisoned training split (the candidate), each with
  the inspect stage's compute exactly as the stage runs it: the clean reference model on the test
  split (candidate's recipe and seed, ``matched_epochs``), the two-view robust detector, cleanlab
  on 3-fold OOF probabilities, and both scans with scan seed = train seed. Each clean run is
  judged by ``gates.rules.inspection_checks`` with conf/gate/default.yaml: a failed check on a
  clean model is a false block.
- Backdoor runs (scan detection only; the robust detector is measured in detect_samples*.md):
  all-to-one and source-specific patches and noise blends at 1-20%.

Writes bench/results/calibrate_inspect.md and calibrate_inspect.json.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ATTACKS = [  # (label, attack spec) - scan detection on effective backdoors
    ("patch 3px br all->0 10%", {"source": None, "target": 0, "rate": 0.10,
                                 "trigger": {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white"}}),
    ("patch 1px tl all->2 5%", {"source": None, "target": 2, "rate": 0.05,
                                "trigger": {"kind": "patch", "size": 1, "location": "top_left", "pattern": "white"}}),
    ("patch 2px center all->5 2%", {"source": None, "target": 5, "rate": 0.02,
                                    "trigger": {"kind": "patch", "size": 2, "location": "center", "pattern": "white"}}),
    ("patch 4px tr all->8 1%", {"source": None, "target": 8, "rate": 0.01,
                                "trigger": {"kind": "patch", "size": 4, "location": "top_right", "pattern": "white"}}),
    ("blend a=0.2 all->1 10%", {"source": None, "target": 1, "rate": 0.10,
                                "trigger": {"kind": "blend", "pattern": "noise", "alpha": 0.2}}),
    ("blend a=0.1 all->6 5%", {"source": None, "target": 6, "rate": 0.05,
                               "trigger": {"kind": "blend", "pattern": "noise", "alpha": 0.1}}),
    ("patch 2px tr 4->9 20%", {"source": 4, "target": 9, "rate": 0.20,
                               "trigger": {"kind": "patch", "size": 2, "location": "top_right", "pattern": "white"}}),
    ("blend a=0.3 3->0 20%", {"source": 3, "target": 0, "rate": 0.20,
                              "trigger": {"kind": "blend", "pattern": "noise", "alpha": 0.3}}),
]
_W: dict = {}


def _init() -> None:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(1)
    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    _W["xtr"], _W["xte"], _W["ytr"], _W["yte"] = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)


def _cfg():
    from pipeline import config

    return config.from_container(config.compose(["train.device=cpu"]))


def train_candidate(job: tuple[str, int, dict | None]):
    """Train one candidate (poisoned by ``attack`` when given): ``(model, out, x, y, spec, cfg)``,
    ``out`` holding accuracy and, for an attack, poison rows, target and ASR."""
    import dataclasses

    from pipeline.core.attacks import apply_trigger, poison
    from pipeline.core.predict import predict
    from pipeline.core.train import train_model

    label, seed, attack = job
    cfg = _cfg()
    spec = dataclasses.replace(cfg.train, seed=seed)
    xtr, ytr, xte, yte = _W["xtr"], _W["ytr"], _W["xte"], _W["yte"]
    x, y = xtr, ytr
    out: dict = {"label": label, "seed": seed, "clean": attack is None, "time": {}}
    if attack is not None:
        a = {"name": "backdoor", "seed": seed, **attack, "trigger": {**attack["trigger"], "seed": seed}}
        x, y, recs = poison(xtr, ytr, [f"r{i}" for i in range(len(ytr))], a, [str(i) for i in range(10)])
        out["poison_rows"] = len(recs)
        out["target"] = attack["target"]
    t0 = time.perf_counter()
    model, _, _ = train_model(x, y, 10, "small_cnn", 32, spec)
    out["time"]["train"] = time.perf_counter() - t0
    clean_pred = predict(model, xte, device="cpu")
    out["accuracy"] = float((clean_pred == yte).mean())
    if attack is not None:
        from pipeline.evaluate import asr_from_predictions

        trig = predict(model, apply_trigger(xte, {**attack["trigger"], "seed": seed}), device="cpu")
        out["asr"], _ = asr_from_predictions(yte, clean_pred, trig, attack["target"], attack["source"])
    return model, out, x, y, spec, cfg


def run_one(job: tuple[str, int, dict | None]) -> dict:
    """One candidate: train, then the inspect stage's compute; times per step."""
    from cleanlab.filter import find_label_issues

    from pipeline.core import inspection, scan
    from pipeline.core.kfold import out_of_fold_probs

    model, out, x, y, spec, cfg = train_candidate(job)
    seed, attack = job[1], job[2]
    xte, yte = _W["xte"], _W["yte"]
    # scans
    r = scan.max_margin_scan(model, 10, (8, 8, 1), restarts=cfg.inspect.scan_restarts, steps=cfg.inspect.scan_steps,
                             lr=cfg.inspect.scan_lr, seed=seed, mad_floor=cfg.inspect.scan_mad_floor)
    out["mm"] = {"max": r.max_anomaly, "suspect": r.suspect, "anomaly": r.anomaly.tolist()}
    out["time"]["scan_max_margin"] = r.seconds
    r = scan.neural_cleanse_scan(model, xte, yte, 10, steps=cfg.inspect.scan_steps, seed=seed)
    out["nc"] = {"max": r.max_anomaly, "suspect": r.suspect, "anomaly": r.anomaly.tolist()}
    out["time"]["scan_neural_cleanse"] = r.seconds
    if attack is None:  # the full inspect compute, judged by the gate rules
        epochs = inspection.matched_epochs(spec.epochs, len(y), len(yte), spec.batch_size)
        t0 = time.perf_counter()
        cm = inspection.train_clean_model(xte, yte, 10, "small_cnn", 32, spec, epochs)
        out["time"]["clean_model"] = time.perf_counter() - t0
        det, times = inspection.two_view_detect(model, cm, x, y, xte, yte, 10, inspection.robust_config(cfg.inspect))
        out["time"].update(times)
        t0 = time.perf_counter()
        probs = out_of_fold_probs(x, y, 10, "small_cnn", 32, spec, k=cfg.inspect.kfold, seed=seed)
        out["time"]["kfold"] = time.perf_counter() - t0
        issues = find_label_issues(y, probs, n_jobs=1)
        out["tail"] = det.class_stat.tolist()
        out["shallow"] = det.class_stats["tail_ratio_shallow"].tolist()
        out["flagged"] = int(det.flagged.sum())
        out["label_issues"] = int(np.sum(issues))
        out["label_issue_fraction"] = float(np.mean(issues))
    return out


def judge(o: dict, mm_threshold: float | None = None) -> dict[str, bool]:
    """The gate's two checks on a clean run's numbers (``gates.rules``, conf/gate/default.yaml)."""
    from gates.rules import INSPECT_FORMAT, inspection_checks

    t = _cfg().gate
    if mm_threshold is not None:
        import dataclasses

        t = dataclasses.replace(t, max_scan_anomaly=mm_threshold)
    ids = {"snapshot_id": "s", "view_id": "v", "checkpoint_sha256": "c", "model_version": "1"}
    rep = {"format": INSPECT_FORMAT, **ids, "mode": "two_view",
           "classes": {str(c): {"tail_ratio": o["tail"][c], "tail_ratio_shallow": o["shallow"][c]} for c in range(10)},
           "cleanlab": {"k": 3}, "label_issue_fraction": o["label_issue_fraction"],
           "scan": {"candidate": {"method": "max_margin",
                                  "per_class": {str(c): {"anomaly": o["mm"]["anomaly"][c]} for c in range(10)}}}}
    a, b = inspection_checks(rep, ids, t)
    return {"poison_suspects": not a.passed, "backdoor_scan": not b.passed}


def _ms(v) -> str:
    v = np.asarray([x for x in v if x is not None], float)
    return "—" if not len(v) else f"{v.mean():.2f} ± {v.std():.2f}"


def report(clean: list[dict], attacks: list[dict], wall: float, args) -> str:
    cfg = _cfg()
    g = cfg.gate
    lines = ["# Calibration of the gate's trigger-agnostic checks on clean digits models (issue 12)", "",
             f"Machine: {platform.machine()} CPU box, 2 cores shared with other jobs (timings noisy), one torch thread "
             f"per process, `--jobs {args.jobs}`. Model: small_cnn (width 32), conf/train/digits.yaml on CPU. "
             f"Clean models: {len(clean)} (train seeds 0..{len(clean) - 1}; scan seed = train seed; cleanlab fold seed = "
             f"train seed). Backdoored models: {len(attacks)} ({len(ATTACKS)} attacks x {args.attack_seeds} seed(s)). "
             f"Wall time {wall / 60:.1f} min.", "",
             f"Command: `python bench/calibrate_inspect.py --clean {args.clean} --attack-seeds {args.attack_seeds} "
             f"--jobs {args.jobs}`", "",
             "## Clean models: the statistics each check thresholds (max over classes per model)", "",
             "| statistic | gate threshold | mean ± std | largest | clean models over the threshold |",
             "|---|---|---|---|---|"]
    rows = [("main tail ratio (two-view robust)", g.max_tail_ratio, [max(o["tail"]) for o in clean], ">="),
            ("shallow tail ratio (1-2 rows)", g.max_shallow_tail_ratio, [max(o["shallow"]) for o in clean], ">="),
            ("cleanlab label-issue fraction", g.max_label_issue_fraction, [o["label_issue_fraction"] for o in clean], ">"),
            ("MM-BD max anomaly index (gate's scan)", g.max_scan_anomaly, [o["mm"]["max"] for o in clean], ">"),
            ("Neural Cleanse max anomaly index (not gated)", None, [o["nc"]["max"] for o in clean], ">")]
    for name, thr, vals, rel in rows:
        over = "—" if thr is None else sum((v >= thr) if rel == ">=" else (v > thr) for v in vals)
        lines.append(f"| {name} | {'—' if thr is None else thr} | {_ms(vals)} | {max(vals):.3f} | "
                     f"{over if thr is None else f'{over}/{len(vals)}'} |")
    fb = [judge(o) for o in clean]
    n_fb = sum(any(j.values()) for j in fb)
    lines += ["", f"**Gate false blocks on clean models (conf/gate/default.yaml): {n_fb}/{len(clean)}** "
              f"(poison_suspects {sum(j['poison_suspects'] for j in fb)}, backdoor_scan {sum(j['backdoor_scan'] for j in fb)}). "
              "Target: at most 1 in 20.", "",
              f"Rows flagged by the robust detector per clean model: {_ms([o['flagged'] for o in clean])}; "
              f"cleanlab label issues: {_ms([o['label_issues'] for o in clean])} (max {max(o['label_issues'] for o in clean)}).",
              "", "## Backdoor scans: MM-BD vs Neural Cleanse (same models)", "",
              "Detection = max anomaly index over the threshold AND the arg-max class is the attack's target.", "",
              "| scan | threshold | clean false alarms | backdoors detected (ASR >= 0.5) | seconds per model |",
              "|---|---|---|---|---|"]
    eff = [a for a in attacks if (a.get("asr") or 0) >= 0.5]
    for key, name, thrs in (("mm", "MM-BD (max margin)", (2.0, 2.5, 3.0, 3.5)), ("nc", "Neural Cleanse", (2.0, 3.0, 3.5))):
        tkey = "scan_max_margin" if key == "mm" else "scan_neural_cleanse"
        secs = _ms([o["time"][tkey] for o in clean + attacks])
        for thr in thrs:
            fa = sum(o[key]["max"] > thr for o in clean)
            det = sum(a[key]["max"] > thr and a[key]["suspect"] == a["target"] for a in eff)
            lines.append(f"| {name} | {thr} | {fa}/{len(clean)} | {det}/{len(eff)} | {secs} |")
    lines += ["", "| attack | seed | poison rows | ASR | MM-BD max anomaly (class) | NC max anomaly (class) |", "|---|---|---|---|---|---|"]
    for a in attacks:
        lines.append(f"| {a['label']} | {a['seed']} | {a['poison_rows']} | {a['asr'] if a['asr'] is None else round(a['asr'], 2)} | "
                     f"{a['mm']['max']:.2f} ({a['mm']['suspect']}) | {a['nc']['max']:.2f} ({a['nc']['suspect']}) |")
    lines += ["", "## Seconds per step (clean models, the inspect stage's compute; noisy)", "", "| step | seconds |", "|---|---|"]
    for k in ("train", "clean_model", "features", "robust", "kfold", "scan_max_margin", "scan_neural_cleanse"):
        lines.append(f"| {k} | {_ms([o['time'].get(k) for o in clean])} |")
    lines += ["", "## Clean models", "", "| seed | acc | max tail | max shallow | label issues | MM-BD max (class) | NC max (class) | blocked |",
              "|---|---|---|---|---|---|---|---|"]
    for o, j in zip(clean, fb):
        lines.append(f"| {o['seed']} | {o['accuracy']:.3f} | {max(o['tail']):.2f} | {max(o['shallow']):.2f} | {o['label_issues']} | "
                     f"{o['mm']['max']:.2f} ({o['mm']['suspect']}) | {o['nc']['max']:.2f} ({o['nc']['suspect']}) | "
                     f"{', '.join(k for k, v in j.items() if v) or 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", type=int, default=20)
    ap.add_argument("--attack-seeds", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "calibrate_inspect"))
    args = ap.parse_args()
    jobs = [("clean", s, None) for s in range(args.clean)]
    jobs += [(label, 100 + r * 10 + i, spec) for r in range(args.attack_seeds) for i, (label, spec) in enumerate(ATTACKS)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs, initializer=_init) as pool:
        res = []
        for o in pool.imap_unordered(run_one, jobs):
            res.append(o)
            print(f"{o['label']} seed {o['seed']}: MM {o['mm']['max']:.2f} NC {o['nc']['max']:.2f}"
                  + (f" tail {max(o['tail']):.2f}" if "tail" in o else f" asr {o.get('asr')}"), flush=True)
    wall = time.perf_counter() - t0
    clean = sorted((o for o in res if o["clean"]), key=lambda o: o["seed"])
    attacks = sorted((o for o in res if not o["clean"]), key=lambda o: o["seed"])
    text = report(clean, attacks, wall, args)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"clean": clean, "attacks": attacks}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
