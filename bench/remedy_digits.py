"""Backdoor remedies measured on digits on the CPU (issues 13 and 18).

For each attack (BadNets 3x3 white patch bottom-right all-to-one -> 0, BadNets source-specific
1 -> 7, blend with seeded noise at alpha 0.1 and 0.2 all-to-one -> 0), each poison rate (1, 5,
10%) and each seed, a small_cnn is trained on the poisoned digits training split with the
project's loop (GUIDE digits recipe: Adam 3e-3 one-cycle, batch 64, 10 epochs), then:

- (a) clean fine-tuning (``core.remedy.finetune``: Adam 1e-3 constant, batch 16) on a trusted
  reserve of 1, 5 and 10% of the training rows, ASR and accuracy read after 0, 1, 2, 5 and 10
  epochs (the issue-18 curve; one 10-epoch run per reserve, evaluated at those epochs);
  the main table's (a) is the 5% reserve after 10 epochs;
- (b) fine-pruning (``core.remedy.fine_prune``: dormant channels of the last conv block off while
  the reserve accuracy stays within 5 points, then the same 10-epoch fine-tuning) on the 5%
  reserve;
- (c) the LGM loss from scratch (``train.loss=lgm``, alpha 0.1, lambda 0.1) on the same
  poisoned rows; its likelihood score's AUROC at ranking the poisoned rows is reported beside;
- (d) quarantine: drop rows from the poisoned training view and retrain from scratch with the
  same recipe and seed. *Oracle*: exactly the poison record's rows (the best any detector can
  do). *Robust*: the rows ``core.detect.robust_detect`` flags in its two-view mode, set up as
  bench/detect_samples.py does: the candidate's penultimate features of the training view and of
  the test split (the reference), and the same rows through a clean small_cnn trained on the
  test split alone with as many optimizer steps as the candidate
  (``detect_samples.clean_model_epochs``: 30 epochs), default ``RobustConfig`` (the gate's
  thresholds). Every flagged row is dropped, whether or not the detector blocks (its flags are
  what the inspect stage writes to suspects.csv); precision, recall, AUROC, rows dropped and
  whether it blocked are reported beside. The clean model only picks rows to drop: the retrained
  model sees training rows only.

Reserve: drawn by ``core.remedy.trusted_reserve`` among the training rows the attack did not
touch, stratified per class, seeded with the run's seed; its size is the fraction of *all*
training rows (1% = 13 rows, 5% = 67, 10% = 135).

ASR: GUIDE section 3 via ``pipeline.evaluate.asr_from_predictions`` (test rows of class != target
and, for 1 -> 7, of class 1, that the model gets right clean).

    nice -n 10 python bench/remedy_digits.py                 # full: 3 seeds, 2 processes
    python bench/remedy_digits.py --seeds 0 --rates 0.1 --attacks blend20 --jobs 1   # one cell
    nice -n 10 python bench/remedy_digits.py --remedies quarantine_oracle,quarantine_robust
        # only (d); merged into the existing remedy_digits.json by (attack, rate, seed), and the
        # md regenerated from the merged json (the other columns keep their stored numbers)
    python bench/remedy_digits.py --report-only               # regenerate the md from the json

Writes bench/results/remedy_digits.md and remedy_digits.json (every number of every run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.core.attacks import apply_trigger, poison  # noqa: E402
from pipeline.core.detect import RobustConfig, robust_detect  # noqa: E402
from pipeline.core.features import penultimate_features  # noqa: E402
from pipeline.core.losses import lgm_scores  # noqa: E402
from pipeline.core.predict import predict  # noqa: E402
from pipeline.core.remedy import fine_prune, finetune, trusted_reserve  # noqa: E402
from pipeline.core.train import TrainSpec, train_model  # noqa: E402
from pipeline.evaluate import asr_from_predictions  # noqa: E402

# ---------------------------------------------------------------- hyper-parameters (one block)
TRAIN = dict(epochs=10, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", device="cpu")
WIDTH = 32  # small_cnn channels of the first block
LGM = dict(loss="lgm", lgm_alpha=0.1, lgm_lambda=0.1)  # margin, likelihood weight (unitless)
FT = dict(lr=2e-3, batch_size=16, optimizer="adam")  # clean fine-tuning: Adam step (remedy_digits_tune.md), batch
FT_EPOCHS = (0, 1, 2, 5, 10)  # curve read-outs (issue 18)
RESERVES = (0.01, 0.05, 0.10)  # trusted reserve, fraction of all training rows
MAIN_RESERVES = (0.05, 0.10)  # reserves of the main tables' (a) and (b)
MAIN_RESERVE = 0.05  # the tuning sweep's reserve
# (a)/(b) variants: name -> (fine-prune first, freeze_norm)
REMEDIES = {"FT": (False, False), "FT frozen BN": (False, True), "FP": (True, False), "FP frozen BN": (True, True)}
FP = dict(max_accuracy_drop=0.05, max_fraction=0.9, epochs=10)  # fine-pruning
HAND_WRITTEN = "<!-- hand-written below: kept by reruns -->"
GOAL_ASR, GOAL_DROP = 0.02, 0.02  # issue 13: Blended <= 2% ASR with <= 2 points lost
PATCH = {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white"}
ATTACKS: dict[str, dict[str, Any]] = {
    "badnets_a2o": {"source": None, "target": 0, "trigger": PATCH},
    "badnets_1to7": {"source": 1, "target": 7, "trigger": PATCH},
    "blend10": {"source": None, "target": 0, "trigger": {"kind": "blend", "pattern": "noise", "alpha": 0.1, "seed": 0}},
    "blend20": {"source": None, "target": 0, "trigger": {"kind": "blend", "pattern": "noise", "alpha": 0.2, "seed": 0}},
}
RATES = (0.01, 0.05, 0.10)
SEEDS = (0, 1, 2)
# Remedy groups a run can be limited to (--remedies). "finetune" = the curve and every (a)/(b)
# variant (the main tables' FT column is the curve's 10-epoch point, so they run together).
GROUPS = ("finetune", "lgm", "quarantine_oracle", "quarantine_robust")
QUARANTINE = {"quarantine_oracle": "(d) Q oracle", "quarantine_robust": "(d) Q robust"}
SUMMARY_START = "<!-- summary: hand-written, kept by reruns -->"
SUMMARY_END = "<!-- end summary -->"


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The project's digits split (tests/conftest.py::digits_split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return xtr, ytr, xte, yte


DATA = digits()


def measure(model: torch.nn.Module, atk: dict[str, Any]) -> dict[str, float]:
    _, _, xte, yte = DATA
    clean = predict(model, xte, device="cpu", amp=False)
    trig = predict(model, apply_trigger(xte, atk["trigger"]), device="cpu", amp=False)
    asr, n = asr_from_predictions(yte, clean, trig, atk["target"], atk["source"])
    return {"asr": asr, "accuracy": float((clean == yte).mean()), "eligible": n}


def clean_model_epochs(n_view: int, n_ref: int) -> int:
    """The two-view detector's clean model: as many optimizer steps as the candidate (digits: 30
    epochs on the 450 test rows). bench/detect_samples.py's rule, imported so both benches agree."""
    sys.path.insert(0, str(REPO / "bench"))
    from detect_samples import clean_model_epochs as rule

    return rule(n_view, n_ref)


def quarantine(xp: np.ndarray, yp: np.ndarray, drop: np.ndarray, seed: int, atk: dict[str, Any]) -> dict[str, Any]:
    """Retrain from scratch without the ``drop`` rows (bool mask), same recipe and seed."""
    t0 = time.perf_counter()
    keep = ~drop
    m, _, _ = train_model(xp[keep], yp[keep], 10, "small_cnn", WIDTH, TrainSpec(seed=seed, **TRAIN))
    return {**measure(m, atk), "dropped": int(drop.sum()), "train_s": time.perf_counter() - t0}


def robust_flags(model: torch.nn.Module, xp: np.ndarray, yp: np.ndarray, seed: int) -> tuple[Any, dict[str, float]]:
    """``robust_detect`` in two-view mode, set up as bench/detect_samples.py (module doc)."""
    _, _, xte, yte = DATA
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    clean, _, _ = train_model(xte, yte, 10, "small_cnn", WIDTH,
                              TrainSpec(seed=seed, **{**TRAIN, "epochs": clean_model_epochs(len(xp), len(xte))}))
    times["clean_model_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    f = penultimate_features(model, xp, device="cpu")
    fr = penultimate_features(model, xte, device="cpu")
    g = penultimate_features(clean, xp, device="cpu")
    gr = penultimate_features(clean, xte, device="cpu")
    det = robust_detect(f, yp, 10, fr, yte, g, gr, config=RobustConfig())
    times["features_detect"] = time.perf_counter() - t0
    return det, times


def run_cell(attack: str, rate: float, seed: int, groups: tuple[str, ...] = GROUPS) -> dict[str, Any]:
    """One poisoned training set and the remedies of ``groups`` on it."""
    torch.set_num_threads(1)
    xtr, ytr, _, _ = DATA
    atk = ATTACKS[attack]
    spec = {"name": "backdoor", "source": atk["source"], "target": atk["target"], "rate": rate, "seed": seed,
            "trigger": atk["trigger"]}
    ids = [str(i) for i in range(len(xtr))]
    xp, yp, records = poison(xtr, ytr, ids, spec, [str(c) for c in range(10)])
    rows = np.array([int(r["sample_id"]) for r in records], np.int64)
    out: dict[str, Any] = {"attack": attack, "rate": rate, "seed": seed, "n_poisoned": len(rows), "seconds": {}}

    t0 = time.perf_counter()
    model, _, _ = train_model(xp, yp, 10, "small_cnn", WIDTH, TrainSpec(seed=seed, **TRAIN))
    out["seconds"]["train_ce"] = time.perf_counter() - t0
    out["before"] = measure(model, atk)
    is_poison = np.zeros(len(yp), bool)
    is_poison[rows] = True

    # (d) quarantine: oracle (the poison record) and the robust detector's flags, then retrain
    if "quarantine_oracle" in groups or "quarantine_robust" in groups:
        out["quarantine"] = {"before": out["before"]}
    if "quarantine_oracle" in groups:
        out["quarantine"]["oracle"] = quarantine(xp, yp, is_poison, seed, atk)
    if "quarantine_robust" in groups:
        from sklearn.metrics import roc_auc_score

        det, times = robust_flags(model, xp, yp, seed)
        fl = det.flagged
        tp = int((fl & is_poison).sum())
        got = quarantine(xp, yp, fl, seed, atk)
        got.update(times, precision=tp / int(fl.sum()) if fl.any() else None,
                   recall=tp / len(rows) if len(rows) else None, true_dropped=tp,
                   auroc=float(roc_auc_score(is_poison, det.primary)) if 0 < len(rows) < len(yp) else None,
                   blocked=bool(det.suspicious), suspicious=[int(c) for c in det.suspicious],
                   tail_ratio_max=float(det.class_stat.max()))
        out["quarantine"]["robust"] = got
    if "finetune" not in groups and "lgm" not in groups:
        return out

    # (a) clean fine-tuning curve, one 10-epoch run per reserve read at FT_EPOCHS
    t0 = time.perf_counter()
    out["finetune"] = {}
    for frac in (RESERVES if "finetune" in groups else ()):
        res = trusted_reserve(ytr, frac, seed=seed, exclude=rows)
        m = copy.deepcopy(model)
        curve = {0: out["before"]}

        def read(ev: dict[str, Any], m=m, curve=curve) -> None:
            if ev["event"] == "epoch" and ev["epoch"] in FT_EPOCHS:
                curve[ev["epoch"]] = measure(m, atk)

        finetune(m, xp[res], yp[res], epochs=max(FT_EPOCHS), seed=seed, device="cpu", progress=read,
                 freeze_norm=False, **FT)
        out["finetune"][str(frac)] = {"reserve_rows": len(res), "curve": {str(k): v for k, v in curve.items()}}
    out["seconds"]["finetune_curve"] = time.perf_counter() - t0

    # (a) and (b) variants on the main reserves (plain FT = the curve's 10-epoch point)
    t0 = time.perf_counter()
    out["remedies"] = {}
    for frac in (MAIN_RESERVES if "finetune" in groups else ()):
        res = trusted_reserve(ytr, frac, seed=seed, exclude=rows)
        got: dict[str, Any] = {"FT": out["finetune"][str(frac)]["curve"][str(max(FT_EPOCHS))]}
        for name, (prune_first, frozen) in REMEDIES.items():
            if name == "FT":
                continue
            m = copy.deepcopy(model)
            if prune_first:
                fp = fine_prune(m, xp[res], yp[res], seed=seed, device="cpu", freeze_norm=frozen, **FT, **FP)
                got[name] = {**measure(m, atk), "pruned": len(fp.pruned), "channels": fp.channels}
            else:
                finetune(m, xp[res], yp[res], epochs=max(FT_EPOCHS), seed=seed, device="cpu", freeze_norm=frozen, **FT)
                got[name] = measure(m, atk)
        out["remedies"][str(frac)] = got
    out["seconds"]["remedies"] = time.perf_counter() - t0
    if "finetune" not in groups:
        del out["finetune"], out["remedies"]
    if "lgm" not in groups:
        return out

    # (c) LGM loss from scratch, and its likelihood score as a poisoned-row detector
    t0 = time.perf_counter()
    lgm, _, _ = train_model(xp, yp, 10, "small_cnn", WIDTH, TrainSpec(seed=seed, **TRAIN, **LGM))
    out["seconds"]["train_lgm"] = time.perf_counter() - t0
    out["lgm"] = measure(lgm, atk)
    from sklearn.metrics import roc_auc_score

    scores = lgm_scores(lgm, xp, yp, device="cpu")
    out["lgm"]["score_auroc"] = float(roc_auc_score(is_poison, scores)) if 0 < len(rows) < len(yp) else None
    return out


TUNE_SEED = 100  # dev seed of the learning-rate sweep: not one of the reported seeds
TUNE_LRS = (5e-4, 1e-3, 2e-3, 3e-3, 5e-3)
TUNE_ATTACKS = ("badnets_a2o", "badnets_1to7", "blend10", "blend20")


def run_tune(attack: str, rate: float = 0.10, seed: int = TUNE_SEED) -> list[dict[str, Any]]:
    """Fine-tuning and fine-pruning at each of TUNE_LRS on one backdoored model (5% reserve)."""
    torch.set_num_threads(1)
    xtr, ytr, _, _ = DATA
    atk = ATTACKS[attack]
    spec = {"name": "backdoor", "source": atk["source"], "target": atk["target"], "rate": rate, "seed": seed,
            "trigger": atk["trigger"]}
    xp, yp, records = poison(xtr, ytr, [str(i) for i in range(len(xtr))], spec, [str(c) for c in range(10)])
    rows = np.array([int(r["sample_id"]) for r in records], np.int64)
    model, _, _ = train_model(xp, yp, 10, "small_cnn", WIDTH, TrainSpec(seed=seed, **TRAIN))
    before = measure(model, atk)
    res = trusted_reserve(ytr, MAIN_RESERVE, seed=seed, exclude=rows)
    out = []
    for lr in TUNE_LRS:
        row = {"attack": attack, "lr": lr, "before": before}
        for name, (prune_first, frozen) in REMEDIES.items():
            m = copy.deepcopy(model)
            if prune_first:
                fine_prune(m, xp[res], yp[res], seed=seed, device="cpu", lr=lr, batch_size=FT["batch_size"],
                           freeze_norm=frozen, **FP)
            else:
                finetune(m, xp[res], yp[res], epochs=10, lr=lr, batch_size=FT["batch_size"], seed=seed,
                         device="cpu", freeze_norm=frozen)
            row[name] = measure(m, atk)
        out.append(row)
    return out


def tune_report(rows: list[dict[str, Any]], wall: float) -> str:
    L = ["# Learning-rate sweep of the digits remedies (dev seed, not reported)\n",
         f"One backdoored small_cnn per attack at 10% poison, seed {TUNE_SEED}; {MAIN_RESERVE:.0%} reserve; Adam "
         f"constant rate, batch {FT['batch_size']}, 10 epochs; FP = fine-pruning as in remedy_digits.md; frozen BN = "
         "batch norm kept in eval mode (running statistics of the full training set) while fine-tuning. "
         f"Cells: ASR % / clean accuracy %. Wall {wall:.0f} s on the busy 2-core CPU box.\n",
         "| attack | before | remedy | " + " | ".join(f"lr {lr:g}" for lr in TUNE_LRS) + " |",
         "|---|---|---|" + "---|" * len(TUNE_LRS)]
    f = lambda d: f"{100 * d['asr']:.1f} / {100 * d['accuracy']:.1f}" if d["asr"] is not None else "n/a"  # noqa: E731
    for atk in TUNE_ATTACKS:
        rs = [r for r in rows if r["attack"] == atk]
        for name in REMEDIES:
            if rs:
                L.append(f"| {atk} | {f(rs[0]['before'])} | {name} | " + " | ".join(f(r[name]) for r in rs) + " |")
    return "\n".join(L) + "\n"


def run_clean(seed: int) -> dict[str, Any]:
    """Clean CE and LGM models: accuracy, and each trigger's ASR when nothing was planted."""
    torch.set_num_threads(1)
    xtr, ytr, _, _ = DATA
    out: dict[str, Any] = {"attack": "none", "seed": seed}
    for name, extra in (("ce", {}), ("lgm", LGM)):
        model, _, _ = train_model(xtr, ytr, 10, "small_cnn", WIDTH, TrainSpec(seed=seed, **TRAIN, **extra))
        out[name] = {a: measure(model, atk) for a, atk in ATTACKS.items()}
    return out


# ---------------------------------------------------------------- report


def ms(values: list[float | None], pct: bool = True) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    k = 100.0 if pct else 1.0
    m = statistics.mean(v) * k
    s = statistics.stdev(v) * k if len(v) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def goal_cell(cs: list[dict], get: Any, before: Any) -> str:
    """'ASR / points lost' over seeds, bold when the issue-13 goal is met (mean ASR and mean loss)."""
    asr = [get(c)["asr"] for c in cs]
    lost = [before(c)["accuracy"] - get(c)["accuracy"] for c in cs]
    ok = all(a is not None for a in asr) and (statistics.mean(asr) <= GOAL_ASR + 1e-9
                                              and statistics.mean(lost) <= GOAL_DROP + 1e-9)
    t = f"{ms(asr)} / {ms(lost)}"
    return f"**{t}**" if ok else t


def report(cells: list[dict], clean: list[dict], meta: dict) -> str:
    by: dict[tuple[str, float], list[dict]] = {}
    for c in cells:
        by.setdefault((c["attack"], c["rate"]), []).append(c)
    keys = sorted(by, key=lambda k: (list(ATTACKS).index(k[0]), k[1]))
    has = {g: all(g in c for c in cells) for g in ("remedies", "finetune", "lgm", "quarantine")}
    qcols = [(name, k) for k, name in (("oracle", QUARANTINE["quarantine_oracle"]), ("robust", QUARANTINE["quarantine_robust"]))
             if has["quarantine"] and all(k in c["quarantine"] for c in cells)]
    L: list[str] = []
    L.append("# Backdoor remedies on digits (issues 13 and 18)\n")
    L.append(f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['jobs']} worker process(es), 1 thread each, "
             f"shared with other jobs (timings noisy). Seeds: {meta['seeds']} (attack rows, training, reserve and "
             f"fine-tuning all seeded by the run's seed). Wall time: {meta['wall_s']:.0f} s "
             f"(remedies: {', '.join(meta.get('groups', ['finetune', 'lgm']))}). Cut: {meta['cut'] or 'nothing'}.\n")
    for r in meta.get("merged_runs", []):
        L.append(f"Merged run: {', '.join(r['groups'])} measured later on the same machine kind, {r['jobs']} worker "
                 f"process(es), 1 thread each, seeds {r['seeds']}, wall time {r['wall_s']:.0f} s, cut: "
                 f"{r['cut'] or 'nothing'}; merged into the stored cells by (attack, rate, seed). The backdoored "
                 f"model is retrained in that run with the same seed: its ASR and accuracy equal the stored "
                 f"'before' in {r['before_match']} of {r['cells']} cells (accuracy lost for its columns is taken "
                 f"against its own retrained model).\n")
    L.append("Model: small_cnn (width 32), digits recipe (Adam 3e-3 one-cycle, batch 64, 10 epochs). "
             "Attacks via `pipeline.core.attacks.poison`: BadNets = 3x3 white patch bottom-right; `badnets_a2o` "
             "all-to-one -> 0 (rate = fraction of non-target rows), `badnets_1to7` source 1 -> 7 (rate = fraction "
             "of class-1 rows: 1% = 1 row), `blend10`/`blend20` = seeded uniform noise blended at alpha 0.1/0.2, "
             "all-to-one -> 0. ASR per GUIDE §3. Values are percent, mean ± std over seeds.\n")
    L.append(f"Remedies: (a) clean fine-tuning, Adam {FT['lr']:g} constant (picked on a dev seed: "
             f"remedy_digits_tune.md), batch {FT['batch_size']}, 10 epochs on a trusted reserve of "
             f"{' and '.join(f'{r:.0%}' for r in MAIN_RESERVES)}; (b) fine-pruning (last conv block's dormant channels off while "
             f"the reserve accuracy stays within {FP['max_accuracy_drop']:.0%}, then (a)); (c) LGM loss from "
             f"scratch (alpha {LGM['lgm_alpha']}, lambda {LGM['lgm_lambda']}). Reserve = clean training rows the "
             "attack did not touch, stratified per class, drawn by `core.remedy.trusted_reserve` with the run's "
             "seed; its size is a fraction of all 1347 training rows (1% = 13, 5% = 67, 10% = 135 rows). "
             "(d) quarantine: retrain from scratch with the same recipe and seed without the poison record's rows "
             "(Q oracle) or without the rows `core.detect.robust_detect` flags in two-view mode (Q robust: "
             "reference = test split, clean model = small_cnn trained on the test split for as many optimizer "
             "steps as the candidate, default `RobustConfig`); no reserve.\n")

    def cell(vals: list[dict]) -> str:
        a = ms([v["asr"] for v in vals])
        return f"{a} / {ms([v['accuracy'] for v in vals])}"

    for frac in (MAIN_RESERVES if has["remedies"] and has["lgm"] else ()):
        L.append(f"## ASR % / clean accuracy % before and after each remedy, {frac:.0%} reserve\n")
        L.append(f"(a) FT = clean fine-tuning, (b) FP = fine-pruning then the same fine-tuning (Adam {FT['lr']:g} "
                 f"constant, batch {FT['batch_size']}, 10 epochs); frozen BN = batch norm in eval mode while "
                 "fine-tuning (`freeze_norm=True`); (c) LGM = trained from scratch with the LGM loss on the same "
                 "poisoned rows (needs no reserve); (d) Q = quarantine and retrain (needs no reserve: same numbers "
                 "in both tables). Cells: mean ± std over seeds.\n")
        names = list(REMEDIES)
        L.append("| attack | rate | poisoned rows | before | " + " | ".join(names) + " | (c) LGM | "
                 + "".join(f"{n} | " for n, _ in qcols) + "FP pruned ch. |")
        L.append("|---|---|---|---|" + "---|" * len(names) + "---|" * (2 + len(qcols)))
        for k in keys:
            cs = by[k]
            rem = [c["remedies"][str(frac)] for c in cs]
            L.append(f"| {k[0]} | {k[1]:.0%} | {cs[0]['n_poisoned']} | {cell([c['before'] for c in cs])} | "
                     + " | ".join(cell([r[n] for r in rem]) for n in names)
                     + f" | {cell([c['lgm'] for c in cs])} | "
                     + "".join(f"{cell([c['quarantine'][q] for c in cs])} | " for _, q in qcols)
                     + f"{statistics.mean(r['FP']['pruned'] for r in rem):.0f}/{rem[0]['FP']['channels']} |")
        L.append("")

    if qcols:
        L.append("## (d) Quarantine: drop rows, retrain from scratch\n")
        L.append("Q oracle drops exactly the poison record's rows; Q robust drops every row `robust_detect` (two "
                 "views, gate thresholds) flags, blocked or not. Precision / recall of the flags against the poison "
                 "record; AUROC of its suspicion score; blocked = seeds where the detector's own rule called a class "
                 "suspicious (the gate would have stopped the release). 'before' = the backdoored model retrained in "
                 "the quarantine run (same seed). Cells: mean ± std over seeds.\n")
        L.append("| attack | rate | poisoned rows | before | Q oracle | Q robust | rows dropped (robust) | "
                 "precision | recall | AUROC | blocked |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for k in keys:
            cs = by[k]
            q = [c["quarantine"] for c in cs]
            rob = [x.get("robust") for x in q]
            if all(r is not None for r in rob):
                extra = (f"{statistics.mean(r['dropped'] for r in rob):.1f} | {ms([r['precision'] for r in rob], False)} | "
                         f"{ms([r['recall'] for r in rob], False)} | {ms([r['auroc'] for r in rob], False)} | "
                         f"{sum(r['blocked'] for r in rob)}/{len(rob)}")
            else:
                extra = "n/a | n/a | n/a | n/a | n/a"
            L.append(f"| {k[0]} | {k[1]:.0%} | {cs[0]['n_poisoned']} | {cell([x['before'] for x in q])} | "
                     + " | ".join(cell([x[n] for x in q]) if all(n in x for x in q) else "n/a" for n in ("oracle", "robust"))
                     + f" | {extra} |")
        L.append("")
        qt: dict[str, list[float]] = {}
        for c in cells:
            q = c["quarantine"]
            if "oracle" in q:
                qt.setdefault("retrain (oracle)", []).append(q["oracle"]["train_s"])
            if "robust" in q:
                for k, name in (("clean_model_train", "clean model (30 ep on 450 rows)"),
                                ("features_detect", "features + robust_detect"), ("train_s", "retrain (robust)")):
                    qt.setdefault(name, []).append(q["robust"][k])
        L.append("Mean seconds per cell of the quarantine run (busy shared CPU, noisy): "
                 + ", ".join(f"{k} {statistics.mean(v):.1f}" for k, v in qt.items()) + ".\n")

    if not (has["remedies"] and has["lgm"]):
        L.append(f"## Goal check: Blended <= {GOAL_ASR:.0%} ASR with <= {GOAL_DROP * 100:.0f} points of accuracy lost\n")
        L.append("Accuracy lost = accuracy of the backdoored model minus the remedied one's, per seed. "
                 "Cells: ASR % / points lost, mean ± std; **met** in bold.\n")
        L.append("| attack | rate | " + " | ".join(n for n, _ in qcols) + " |")
        L.append("|---|---|" + "---|" * len(qcols))
        for k in keys:
            if k[0].startswith("blend"):
                L.append(f"| {k[0]} | {k[1]:.0%} | " + " | ".join(
                    goal_cell(by[k], lambda c, q=q: c["quarantine"][q], lambda c: c["quarantine"]["before"])
                    for _, q in qcols) + " |")
        L.append("")
        t = {k: statistics.mean(c["seconds"][k] for c in cells) for k in cells[0]["seconds"]}
        L.append("Mean seconds per cell (busy shared CPU, noisy): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + ".\n")
        return "\n".join(L)

    L.append(f"## Goal check: Blended <= {GOAL_ASR:.0%} ASR with <= {GOAL_DROP * 100:.0f} points of accuracy lost\n")
    L.append("Accuracy lost = accuracy of the backdoored model minus the remedied one's, per seed (for (c): the CE "
             "model trained on the same poisoned rows minus the LGM one; for (d): the backdoored model of the "
             "quarantine run minus the retrained one). Met = mean ASR and mean loss both within. "
             "Anchor (BackdoorBench, CIFAR-10 10%, Blended): fine-tuning 96.1% ASR; ANP 2.2% at -6.9 points. "
             "Cells: ASR % / points lost, mean ± std; **met** in bold.\n")
    cols = [(f"{n} {frac:.0%}", lambda c, n=n, frac=frac: c["remedies"][str(frac)][n])
            for frac in MAIN_RESERVES for n in REMEDIES] + [("(c) LGM", lambda c: c["lgm"])]
    base = {n: (lambda c: c["before"]) for n, _ in cols}
    for n, q in qcols:
        cols.append((n, lambda c, q=q: c["quarantine"][q]))
        base[n] = lambda c: c["quarantine"]["before"]
    L.append("| attack | rate | " + " | ".join(n for n, _ in cols) + " |")
    L.append("|---|---|" + "---|" * len(cols))
    for k in keys:
        if not k[0].startswith("blend"):
            continue
        L.append(f"| {k[0]} | {k[1]:.0%} | " + " | ".join(goal_cell(by[k], get, base[n]) for n, get in cols) + " |")
    L.append("")

    L.append("## Clean fine-tuning curve (issue 18): ASR / accuracy after 0, 1, 2, 5, 10 epochs\n")
    L.append(f"Adam {FT['lr']:g} constant, batch {FT['batch_size']}. One 10-epoch run per reserve, read after each "
             "listed epoch. Cells: ASR % / clean accuracy %, mean over seeds (std in the JSON).\n")
    L.append("| attack | rate | reserve | " + " | ".join(f"{e} ep" for e in FT_EPOCHS) + " |")
    L.append("|---|---|---|" + "---|" * len(FT_EPOCHS))
    for k in keys:
        cs = by[k]
        for frac in RESERVES:
            cells_txt = []
            for e in FT_EPOCHS:
                pts = [c["finetune"][str(frac)]["curve"][str(e)] for c in cs]
                a = [p["asr"] for p in pts if p["asr"] is not None]
                cells_txt.append(f"{100 * statistics.mean(a):.1f} / {100 * statistics.mean(p['accuracy'] for p in pts):.1f}"
                                 if a else "n/a")
            rows = cs[0]["finetune"][str(frac)]["reserve_rows"]
            L.append(f"| {k[0]} | {k[1]:.0%} | {frac:.0%} ({rows} rows) | " + " | ".join(cells_txt) + " |")
    L.append("")

    L.append("## Does the LGM loss lower backdoor ASR compared with cross-entropy?\n")
    L.append("Same poisoned rows, same seed, same recipe; only the loss differs. Paired difference = LGM - CE per seed. "
             "AUROC: the LGM likelihood score (`core.losses.lgm_scores`, NLL of the labelled class) ranking the "
             "poisoned training rows above the clean ones (0.5 = chance).\n")
    L.append("| attack | rate | CE ASR | LGM ASR | LGM - CE (pts) | CE acc | LGM acc | LGM score AUROC |")
    L.append("|---|---|---|---|---|---|---|---|")
    for k in keys:
        cs = by[k]
        diff = [(c["lgm"]["asr"] - c["before"]["asr"]) if None not in (c["lgm"]["asr"], c["before"]["asr"]) else None
                for c in cs]
        L.append(f"| {k[0]} | {k[1]:.0%} | {ms([c['before']['asr'] for c in cs])} | {ms([c['lgm']['asr'] for c in cs])} | "
                 f"{ms(diff)} | {ms([c['before']['accuracy'] for c in cs])} | {ms([c['lgm']['accuracy'] for c in cs])} | "
                 f"{ms([c['lgm']['score_auroc'] for c in cs], pct=False)} |")
    if clean:
        L.append("")
        L.append("Clean models (no attack): accuracy and each trigger's ASR with nothing planted.\n")
        L.append("| loss | accuracy | " + " | ".join(f"ASR {a}" for a in ATTACKS) + " |")
        L.append("|---|---|" + "---|" * len(ATTACKS))
        for loss in ("ce", "lgm"):
            first = next(iter(ATTACKS))
            L.append(f"| {loss} | {ms([c[loss][first]['accuracy'] for c in clean])} | "
                     + " | ".join(ms([c[loss][a]["asr"] for c in clean]) for a in ATTACKS) + " |")
    L.append("")
    t = {k: statistics.mean(c["seconds"][k] for c in cells) for k in cells[0]["seconds"]}
    L.append("Mean seconds per cell (busy shared CPU, noisy): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + ".\n")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--rates", default=",".join(map(str, RATES)))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each)")
    ap.add_argument("--no-clean", action="store_true", help="skip the clean CE/LGM reference models")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "remedy_digits"))
    ap.add_argument("--tune", action="store_true", help="only the learning-rate sweep on the dev seed "
                    "(writes <out>_tune.md/json)")
    ap.add_argument("--remedies", default=",".join(GROUPS),
                    help=f"remedy groups to run, of {', '.join(GROUPS)}. A subset is merged into an existing "
                    "<out>.json by (attack, rate, seed) and the md regenerated from the merged json")
    ap.add_argument("--report-only", action="store_true", help="regenerate <out>.md from <out>.json, run nothing")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.report_only:
        if not out.with_suffix(".json").exists():
            ap.error(f"{out.with_suffix('.json')} not found: run the bench first")
        stored = json.loads(out.with_suffix(".json").read_text())
        write_md(out, report(stored["cells"], stored["clean"], stored["meta"]))
        return 0
    groups = tuple(g for g in a.remedies.split(",") if g)
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        ap.error(f"unknown remedy group(s) {bad}: use a comma list of {', '.join(GROUPS)}")
    groups = tuple(g for g in GROUPS if g in groups)
    if a.tune:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=a.jobs, mp_context=get_context("fork")) as ex:
            rows = [r for f in [ex.submit(run_tune, atk) for atk in TUNE_ATTACKS] for r in f.result()]
        md = tune_report(rows, time.perf_counter() - t0)
        print(md)
        Path(a.out + "_tune.md").write_text(md)
        Path(a.out + "_tune.json").write_text(json.dumps(rows, indent=1))
        return 0
    seeds = [int(s) for s in a.seeds.split(",")]
    rates = [float(r) for r in a.rates.split(",")]
    attacks = a.attacks.split(",")
    unknown = [x for x in attacks if x not in ATTACKS]
    if unknown:
        ap.error(f"unknown attack(s) {unknown}: use {', '.join(ATTACKS)}")
    cut = []
    if seeds != list(SEEDS) or rates != list(RATES) or attacks != list(ATTACKS):
        cut.append(f"ran seeds {seeds}, rates {rates}, attacks {attacks} of the full grid")
    partial = groups != GROUPS
    if a.no_clean and not partial:
        cut.append("clean reference models")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    jobs = [(atk, r, s) for atk in attacks for r in rates for s in seeds]
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=get_context("fork")) as ex:
        futs = [ex.submit(run_cell, *j, groups) for j in jobs]
        cfuts = [] if (a.no_clean or "lgm" not in groups) else [ex.submit(run_clean, s) for s in seeds]
        cells = []
        for f in futs:
            c = f.result()
            cells.append(c)
            got = {}
            if "remedies" in c:
                got.update(c["remedies"][str(MAIN_RESERVES[-1])])
            if "lgm" in c:
                got["LGM"] = c["lgm"]
            for q, v in c.get("quarantine", {}).items():
                if q != "before":
                    got[f"Q {q}"] = v
            print(f"{c['attack']:>13} {c['rate']:.2f} s{c['seed']}: ASR {c['before']['asr']:.3f} -> "
                  + " ".join(f"{k} {v['asr']:.3f}/{v['accuracy']:.3f}" for k, v in got.items() if v["asr"] is not None)
                  + (f" (robust dropped {c['quarantine']['robust']['dropped']}, P {c['quarantine']['robust']['precision']}, "
                     f"R {c['quarantine']['robust']['recall']})" if "robust" in c.get("quarantine", {}) else ""),
                  flush=True)
        clean = [f.result() for f in cfuts]
    wall = time.perf_counter() - t0
    meta = {"machine": f"2-core CPU box ({platform.machine()}, {os.cpu_count()} logical CPUs)", "torch": torch.__version__,
            "jobs": a.jobs, "seeds": seeds, "wall_s": wall, "cut": "; ".join(cut), "groups": list(groups),
            "hyper": {"train": TRAIN, "lgm": LGM, "finetune": FT, "fine_prune": FP, "reserves": RESERVES,
                      "robust": {k: getattr(RobustConfig(), k) for k in RobustConfig.__dataclass_fields__}}}
    out.parent.mkdir(parents=True, exist_ok=True)
    if partial and out.with_suffix(".json").exists():
        stored = json.loads(out.with_suffix(".json").read_text())
        cells, meta = merge(stored, cells, meta)
        clean = stored["clean"]
    md = report(cells, clean, meta)
    print(md)
    write_md(out, md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": cells, "clean": clean}, indent=1))
    return 0


def merge(stored: dict, new: list[dict], run_meta: dict) -> tuple[list[dict], dict]:
    """The stored cells with the new run's groups added by (attack, rate, seed). Only the
    quarantine groups are merged (their own 'before' travels with them); the stored numbers of
    every other column are kept as they are."""
    if any(g in run_meta["groups"] for g in ("finetune", "lgm")):
        raise SystemExit("error: only the quarantine groups merge into a stored run; run finetune and lgm "
                         "together as a full run (or give --out a new path)")
    cells = stored["cells"]
    meta = stored["meta"]
    meta.setdefault("groups", ["finetune", "lgm"])  # runs before the quarantine groups existed
    index = {(c["attack"], c["rate"], c["seed"]): c for c in cells}
    match = 0
    for c in new:
        old = index.get((c["attack"], c["rate"], c["seed"]))
        if old is None:
            raise SystemExit(f"error: stored run has no cell {c['attack']} {c['rate']} seed {c['seed']}: "
                             "merge only cells the stored run has, or give --out a new path")
        q = c["quarantine"]
        q["seconds"] = c["seconds"]
        old.setdefault("quarantine", {}).update(q)
        match += all(abs(old["before"][k] - c["before"][k]) < 1e-9 for k in ("asr", "accuracy")
                     if old["before"][k] is not None and c["before"][k] is not None)
    runs = [r for r in meta.get("merged_runs", []) if r["groups"] != run_meta["groups"]]
    runs.append({k: run_meta[k] for k in ("jobs", "seeds", "wall_s", "cut", "groups")}
                | {"cells": len(new), "before_match": match, "robust": run_meta["hyper"]["robust"]})
    meta["merged_runs"] = runs
    return cells, meta


def write_md(out: Path, md: str) -> None:
    """Write <out>.md, keeping the hand-written summary (after the title) and reading (at the end)."""
    old = out.with_suffix(".md").read_text() if out.with_suffix(".md").exists() else ""
    if SUMMARY_START in old and SUMMARY_END in old:
        block = old[old.index(SUMMARY_START):old.index(SUMMARY_END) + len(SUMMARY_END)]
        title, rest = md.split("\n", 1)
        md = f"{title}\n\n{block}\n{rest}"
    if HAND_WRITTEN in old:  # the reading below the marker is prose about a run: kept, re-check it
        md += "\n" + old[old.index(HAND_WRITTEN):]
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
