"""Fresh-seed calibration of the gate's backdoor scan (MM-BD) on digits (issue 12).

    python bench/calibrate_scan.py [--clean 60] [--first-seed 200] [--attack-seeds 2] [--jobs 2]

Why a second calibration: the first one (bench/calibrate_inspect.py, train seeds 0..19) set
``gate.max_scan_anomaly`` and then one of 20 *new* clean full-pipeline runs scored 4.99 > 4.0
(bench/results/redteam_digits_clean20.md). A threshold must be judged on seeds it was not chosen
on, so this script splits the clean models in two halves by seed: the threshold of each anomaly
rule is set on the first half (its largest clean value times ``--margin``) and its false alarms
are counted on the second half, which it never saw. The backdoored models measure what each rule
still detects at that threshold.

Protocol: digits, small_cnn, conf/train/digits.yaml on CPU, one torch thread per process. The
scan runs exactly as the inspect stage runs it (conf/inspect: restarts, steps, lr, and the
stage's fixed ``scan_seed``), and per-class statistics are kept, so every anomaly rule below is
computed on the same scans:
- ``mad``: today's rule, ``(s - median) / (1.4826 * MAD)`` over the 10 classes;
- ``mad_floor``: the same with the MAD floored at ``inspect.scan_mad_floor`` x median (the
  stage's rule): with 10 classes the MAD of 9 near-identical margins can collapse, which turns
  a small difference into a large index on a clean model.

Writes bench/results/calibrate_scan.md and calibrate_scan.json.
"""

from __future__ import annotations

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
sys.path.insert(0, str(REPO / "bench"))

from calibrate_inspect import ATTACKS, _cfg, _init, train_candidate  # noqa: E402 - the same split, attacks, recipe


def run_one(job: tuple[str, int, dict | None]) -> dict:
    from pipeline.core import scan

    model, out, _, _, _, cfg = train_candidate(job)
    i = cfg.inspect
    r = scan.max_margin_scan(model, 10, (8, 8, 1), restarts=i.scan_restarts, steps=i.scan_steps, lr=i.scan_lr,
                             seed=i.scan_seed)  # the raw statistic: every rule's index is computed below
    out["statistic"] = r.statistic.tolist()
    out["seconds"] = r.seconds
    return out


def rules(floor: float) -> dict:
    """Each anomaly rule's relative MAD floor: today's rule without one, the stage's with it."""
    return {"mad": 0.0, "mad_floor": floor}


def peaks(models: list[dict], rel_floor: float) -> list[tuple[float, int]]:
    """(largest anomaly index, its class) of each model's scan under one rule."""
    from pipeline.core import scan

    out = []
    for o in models:
        z = scan.anomaly_index(np.asarray(o["statistic"]), rel_floor=rel_floor)
        out.append((float(z.max()), int(z.argmax())))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", type=int, default=60, help="clean models (train seeds first-seed..)")
    ap.add_argument("--first-seed", type=int, default=200, help="first clean train seed (0..19 calibrated the old threshold)")
    ap.add_argument("--attack-seeds", type=int, default=2)
    ap.add_argument("--margin", type=float, default=1.25, help="threshold = largest calibration-half value x margin")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "calibrate_scan"))
    ap.add_argument("--from-json", help="re-judge a previous run's scans (no training)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        clean, attacks, wall = res["clean"], res["attacks"], res.get("wall", 0.0)
    else:
        jobs = [("clean", s, None) for s in range(args.first_seed, args.first_seed + args.clean)]
        jobs += [(label, args.first_seed + 1000 + r * 10 + i, spec)
                 for r in range(args.attack_seeds) for i, (label, spec) in enumerate(ATTACKS)]
        res_l = []
        with mp.get_context("spawn").Pool(args.jobs, initializer=_init) as pool:
            for k, o in enumerate(pool.imap_unordered(run_one, jobs), 1):
                res_l.append(o)
                print(f"[{k}/{len(jobs)}] {o['label']} seed {o['seed']}: acc {o['accuracy']:.3f}"
                      + (f" asr {o['asr']:.2f}" if "asr" in o else ""), flush=True)
        wall = time.perf_counter() - t0
        clean = sorted((o for o in res_l if o["clean"]), key=lambda o: o["seed"])
        attacks = sorted((o for o in res_l if not o["clean"]), key=lambda o: o["seed"])
        Path(args.out + ".json").write_text(json.dumps({"clean": clean, "attacks": attacks, "wall": wall}, indent=1))
    text = report(clean, attacks, wall, args)
    Path(args.out + ".md").write_text(text)
    print(text)
    return 0


def report(clean: list[dict], attacks: list[dict], wall: float, args) -> str:
    cfg = _cfg()
    half = len(clean) // 2
    calib, held = clean[:half], clean[half:]
    eff = [a for a in attacks if (a.get("asr") or 0) >= 0.5]
    lines = ["# Fresh-seed calibration of the backdoor scan (MM-BD) on digits (issue 12)", "",
             f"Machine: {platform.machine()} CPU box, 2 cores shared with other jobs, one torch thread per process, "
             f"`--jobs {args.jobs}`. Model: small_cnn (width 32), conf/train/digits.yaml on CPU; the scan as the "
             f"inspect stage runs it (restarts {cfg.inspect.scan_restarts}, steps {cfg.inspect.scan_steps}, "
             f"scan seed {cfg.inspect.scan_seed}). Clean models: {len(clean)} (train seeds "
             f"{clean[0]['seed']}..{clean[-1]['seed']}, none used before); calibration half: the first {len(calib)} "
             f"seeds, held-out half: the other {len(held)}. Backdoored models: {len(attacks)}, of which {len(eff)} "
             f"effective (ASR >= 0.5). Wall {wall / 60:.1f} min. Relative MAD floor (`inspect.scan_mad_floor`): "
             f"{cfg.inspect.scan_mad_floor}.", "",
             f"Command: `python bench/calibrate_scan.py --clean {len(clean)} --first-seed {clean[0]['seed']} "
             f"--attack-seeds {args.attack_seeds} --margin {args.margin} --jobs {args.jobs}`", "",
             "Threshold = largest value on the calibration half x margin. Detection = max index over the threshold "
             "AND the arg-max class is the attack's target.", "",
             "| rule | calibration max | threshold | held-out max | held-out false alarms | all clean over the gate's "
             f"{cfg.gate.max_scan_anomaly} | backdoors detected at threshold | at the gate's {cfg.gate.max_scan_anomaly} |",
             "|---|---|---|---|---|---|---|---|"]
    gate = cfg.gate.max_scan_anomaly
    rule = rules(cfg.inspect.scan_mad_floor)
    # every model's peak under every rule, computed once: the tables below only read them
    pk = {name: {"calib": peaks(calib, f), "held": peaks(held, f), "clean": peaks(clean, f), "eff": peaks(eff, f),
                 "attacks": peaks(attacks, f)} for name, f in rule.items()}

    def detected(p: list[tuple[float, int]], thr: float) -> int:
        return sum(v > thr and c == a["target"] for (v, c), a in zip(p, eff))

    for name in rule:
        p = pk[name]
        cm = max(v for v, _ in p["calib"])
        thr = cm * args.margin
        lines.append(f"| {name} | {cm:.2f} | {thr:.2f} | {max(v for v, _ in p['held']):.2f} | "
                     f"{sum(v > thr for v, _ in p['held'])}/{len(held)} | {sum(v > gate for v, _ in p['clean'])}/{len(clean)} | "
                     f"{detected(p['eff'], thr)}/{len(eff)} | {detected(p['eff'], gate)}/{len(eff)} |")
    lines += ["", "## Each rule at fixed thresholds", "",
              "| rule | threshold | clean over (calibration half) | clean over (held-out half) | backdoors detected |",
              "|---|---|---|---|---|"]
    for name in rule:
        p = pk[name]
        for thr in (2.5, 3.0, 3.5, 4.0, 5.0):
            lines.append(f"| {name} | {thr} | {sum(v > thr for v, _ in p['calib'])}/{len(calib)} | "
                         f"{sum(v > thr for v, _ in p['held'])}/{len(held)} | {detected(p['eff'], thr)}/{len(eff)} |")
    lines += ["", "## Clean models (max anomaly per rule)", "", "| seed | acc | " + " | ".join(rule) + " |",
              "|---|---|" + "---|" * len(rule)]
    for i, o in enumerate(clean):
        lines.append(f"| {o['seed']} | {o['accuracy']:.3f} | " + " | ".join(f"{pk[n]['clean'][i][0]:.2f}" for n in rule) + " |")
    lines += ["", "## Backdoored models", "", "| attack | seed | rows | ASR | " + " | ".join(f"{n} (class)" for n in rule)
              + " |", "|---|---|---|---|" + "---|" * len(rule)]
    for i, a in enumerate(attacks):
        vals = [f"{pk[n]['attacks'][i][0]:.2f} ({pk[n]['attacks'][i][1]})" for n in rule]
        lines.append(f"| {a['label']} | {a['seed']} | {a['poison_rows']} | {a['asr']:.2f} | " + " | ".join(vals) + " |")
    secs = [o["seconds"] for o in clean + attacks]
    lines += ["", f"Scan seconds per model: {np.mean(secs):.2f} ± {np.std(secs):.2f} ({args.jobs} job(s) on 2 busy cores)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
