"""Poisoned-sample detection on digits: published spectral signatures and activation clustering,
our robust detector, and cleanlab on k-fold out-of-fold probabilities, measured in one run.

    python bench/detect_samples.py [--jobs 2] [--clean-seeds 20] [--kfold 3] [--full] [--seeds 1]

Protocol (digits, small_cnn, the committed digits recipe on CPU, one torch thread per process):

1. Clean runs: train seeds 0..S-1 on the un-poisoned training split. Each is a clean model (how
   many rows and classes every detector flags when nothing is poisoned: the gate's false-block
   rate) and the baseline of the per-class recall drop for the attack trials with that seed.
2. Attack trials, each with its own attack seed and a train seed cycling over 0..S-1, poisoned by
   the project's own ``pipeline.core.attacks.poison``: white patches at every corner and the
   centre, sizes 1-4 px, all-to-one and source-specific; full-image noise blends alpha
   0.05/0.1/0.2/0.3, all-to-one and source-specific; label flip; two-class label swap (two
   label_flip passes drawn from the original labels, so no row is flipped back). Rates 1, 2, 5,
   10, 20% of the affected rows. The default grid covers every location x size once per mode and
   every rate for every family, not their full product (``--full``); the script prints what it cut.
3. Per trial: the candidate's clean accuracy and ASR (GUIDE §3, ``asr_from_predictions``) or
   recall drop against the clean model of the same train seed; penultimate features of the
   training view and of the clean test split (the robust detector's reference); every
   detector's precision, recall (flags against the poison records) and AUROC (its primary
   score); whether it blocks (robust: its own rule, a class's main tail ratio >= the threshold
   or its shallow-band ratio >= the shallow threshold). When the
   attack is effective (ASR >= 0.5 or recall drop >= 0.1), every detector's flagged rows are
   removed and the model is retrained with the same seed: the ASR / recall drop left.

Detectors: SS = ``spectral_signatures`` with eps = the attack's configured rate (an oracle upper
bound, BackdoorBench's setting: 10% -> 15% removed per class; 0.1 on clean runs); AC =
``activation_clustering`` (PCA 10, 2-means, smaller cluster, as BackdoorBench); robust =
``robust_detect`` in its two-view mode: the candidate's features of the training view and of the
test split (reference), and the features of the same rows from a clean model trained on the test
split alone (same recipe and seed, 3x the epochs: as many optimizer steps as the candidate); robust-cand = the candidate view only; robust-self = no
reference at all (robust-cand and robust-self: detection only, no retrain); cleanlab =
``find_label_issues`` on ``--kfold``-fold out-of-fold probabilities (``pipeline.core.kfold``),
AUROC from 1 - self-confidence.

Writes bench/results/detect_samples.md (tables) and detect_samples.json (every trial's numbers).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # before numpy loads BLAS: one thread per worker process

import argparse
import itertools
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RATES = (0.01, 0.02, 0.05, 0.10, 0.20)
LOCATIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
SIZES = (1, 2, 3, 4)
ALPHAS = (0.05, 0.1, 0.2, 0.3)
SWAPS = ((3, 8), (1, 7), (4, 9), (5, 6), (2, 7))
DETECTORS = ("ss", "ac", "robust", "robust_cand", "robust_self", "cleanlab")
RETRAINED = ("ss", "ac", "robust", "cleanlab")
ASR_EFFECTIVE = 0.5  # GUIDE/issue 12: an attack whose candidate reaches this ASR must be blocked
DROP_EFFECTIVE = 0.1  # ... or this per-class recall drop


# ----------------------------------------------------------------------------- grid


def _pair(i: int) -> tuple[int, int]:
    """A (source, target) pair that varies with i and never repeats a class."""
    s = (3 * i + 1) % 10
    t = (7 * i + 2) % 10
    return (s, (t + 1) % 10) if s == t else (s, t)


def build_grid(full: bool, seeds: int, rep_start: int = 0, noise: bool = False) -> tuple[list[dict], list[str]]:
    """Trial specs and the list of what the default grid leaves out. ``noise``: only the uniform
    label-noise cell (cleanlab's anchor), not part of the attack grid."""
    trials: list[dict] = []
    cut: list[str] = []
    if noise:
        trials = [{"family": "label_noise", "kind": "noise", "rate": 0.2, "anchor": "label_noise_20"}]
        out = [{**trials[0], "rep": rep} for rep in range(rep_start, rep_start + seeds)]
        for j, t in enumerate(out, start=10_000 + rep_start):
            t["id"], t["attack_seed"], t["source"], t["target"] = j, 1000 + j, None, None
        return out, ["--noise: only uniform 20% label noise (every row relabelled to another class with p = 0.2)"]
    combos = list(itertools.product(LOCATIONS, SIZES))
    for mode_i, mode in enumerate(("all_to_one", "source")):
        for i, (loc, size) in enumerate(combos):
            rates = RATES if full else (RATES[(i + 2 * mode_i) % len(RATES)],)
            for rate in rates:
                trials.append({"family": f"patch_{mode}", "kind": "patch", "mode": mode, "location": loc,
                               "size": size, "rate": rate})
    if not full:
        cut.append(f"patches: each of the {len(combos)} location x size pairs runs at one rate per mode "
                   f"(rates rotate so every rate runs {len(combos) // len(RATES)} times per mode), "
                   f"not all {len(RATES)} ({len(combos) * 2 * (len(RATES) - 1)} trials cut)")
    for mode_i, mode in enumerate(("all_to_one", "source")):
        for i, alpha in enumerate(ALPHAS):
            rates = RATES if full else tuple(RATES[(2 * i + j + mode_i) % len(RATES)] for j in range(2))
            for rate in rates:
                trials.append({"family": f"blend_{mode}", "kind": "blend", "mode": mode, "alpha": alpha, "rate": rate})
    if not full:
        cut.append(f"blends: each alpha runs at 2 of the {len(RATES)} rates per mode "
                   f"({len(ALPHAS) * 2 * (len(RATES) - 2)} trials cut)")
    for rate in RATES:
        trials.append({"family": "label_flip", "kind": "flip", "rate": rate})
        trials.append({"family": "label_swap", "kind": "swap", "rate": rate})
    # The issue's anchors, always at the full product of seeds: all-to-one 10% BadNets-like
    # (3x3 white bottom-right) and Blended-like (noise alpha 0.2), and the 20% flip.
    anchors = [
        {"family": "patch_all_to_one", "kind": "patch", "mode": "all_to_one", "location": "bottom_right", "size": 3, "rate": 0.10, "anchor": "badnets_a2o_10"},
        {"family": "blend_all_to_one", "kind": "blend", "mode": "all_to_one", "alpha": 0.2, "rate": 0.10, "anchor": "blended_a2o_10"},
        {"family": "patch_all_to_one", "kind": "patch", "mode": "all_to_one", "location": "bottom_right", "size": 3, "rate": 0.20, "anchor": "badnets_a2o_20"},
        {"family": "blend_all_to_one", "kind": "blend", "mode": "all_to_one", "alpha": 0.2, "rate": 0.20, "anchor": "blended_a2o_20"},
    ]
    trials += anchors
    out = []
    for rep in range(rep_start, rep_start + seeds):
        for i, t in enumerate(trials):
            out.append({**t, "rep": rep})
    for j, t in enumerate(out, start=rep_start * len(trials)):
        t["id"] = j
        t["attack_seed"] = 1000 + j
        s, tgt = _pair(j)
        t["source"], t["target"] = (None, tgt) if t.get("mode") == "all_to_one" else (s, tgt)
        if t["kind"] == "swap":
            t["source"], t["target"] = SWAPS[j % len(SWAPS)]
    if seeds == 1 and not full:
        cut.append("one seed per cell (--seeds N repeats the grid with new attack and train seeds)")
    if rep_start:
        cut.append(f"repetitions {rep_start}..{rep_start + seeds - 1} of the grid only (--rep-start): "
                   "attack seeds and trial ids continue where repetition 0 ended")
    return out, cut


# ----------------------------------------------------------------------------- worker

_W: dict[str, Any] = {}


def _init_worker(k: int, thresholds: tuple[float, float]) -> None:
    import torch

    torch.set_num_threads(1)
    from pipeline.sources import load_digits

    src = load_digits(0.25, 0)
    tr = src.splits == "train"
    _W.update(
        xtr=src.images[tr], ytr=src.labels[tr], xte=src.images[~tr], yte=src.labels[~tr],
        ids=[s for s, m in zip(src.sample_ids, tr) if m], names=list(src.class_names), k=k,
        thresholds=thresholds,
    )


EPOCHS = 10  # conf/train/digits.yaml


def _spec(seed: int, epochs: int = EPOCHS):
    from pipeline.core.train import TrainSpec

    # conf/train/digits.yaml on CPU
    return TrainSpec(epochs=epochs, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", seed=seed, device="cpu")


def _train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = EPOCHS):
    from pipeline.core.train import train_model

    t0 = time.perf_counter()
    model, _, _ = train_model(x, y, 10, "small_cnn", 32, _spec(seed, epochs))
    return model, time.perf_counter() - t0


def clean_model_epochs(n_view: int, n_ref: int) -> int:
    """Epochs of the clean model on the reference split: as many optimizer steps as the candidate
    takes on the view (digits: 1347 / 450 rows -> 30 epochs). At the candidate's 10 epochs the
    450-row model takes 70 steps, is underfit, and its foreignness of clean rows is noisier: on
    the dev set the weakest source-specific backdoor went 1.60 -> 1.98 and the clean maximum
    1.62 -> 1.58 from 10 to 30 epochs."""
    return max(EPOCHS, int(round(EPOCHS * n_view / n_ref)))


def _recall(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.array([(pred[y == c] == c).mean() for c in range(10)])


def _trigger(t: dict) -> dict:
    if t["kind"] == "patch":
        return {"kind": "patch", "size": t["size"], "location": t["location"], "pattern": "white", "seed": t["attack_seed"]}
    return {"kind": "blend", "pattern": "noise", "alpha": t["alpha"], "seed": t["attack_seed"]}


def poison_view(t: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, poison mask) of the trial's training view."""
    from pipeline.core.attacks import poison

    x, y, ids, names = _W["xtr"], _W["ytr"], _W["ids"], _W["names"]
    if t["kind"] in ("patch", "blend"):
        passes = [{"name": "backdoor", "source": t["source"], "target": t["target"], "rate": t["rate"],
                   "seed": t["attack_seed"], "trigger": _trigger(t)}]
    elif t["kind"] == "flip":
        passes = [{"name": "label_flip", "source": t["source"], "target": t["target"], "rate": t["rate"], "seed": t["attack_seed"]}]
    else:
        a, b = t["source"], t["target"]
        passes = [{"name": "label_flip", "source": a, "target": b, "rate": t["rate"], "seed": t["attack_seed"]},
                  {"name": "label_flip", "source": b, "target": a, "rate": t["rate"], "seed": t["attack_seed"] + 1}]
    xi, yi, pm = x.copy(), y.copy(), np.zeros(len(y), bool)
    if t["kind"] == "noise":  # not one of the project's attacks: cleanlab's anchor setting
        rng = np.random.default_rng(t["attack_seed"])
        rows = rng.choice(len(y), size=int(round(t["rate"] * len(y))), replace=False)
        yi[rows] = (y[rows] + rng.integers(1, 10, len(rows))) % 10
        pm[rows] = True
        return xi, yi, pm
    pos = {sid: i for i, sid in enumerate(ids)}
    for spec in passes:  # every pass on the original arrays: a swap never flips a row back
        nx, ny, recs = poison(x, y, ids, spec, names)
        rows = np.array([pos[r["sample_id"]] for r in recs], np.int64)
        if len(rows):
            xi[rows], yi[rows], pm[rows] = nx[rows], ny[rows], True
    return xi, yi, pm


def attack_effect(model, t: dict, base_recall: np.ndarray | None) -> dict:
    """ASR (backdoor) or the largest recall drop over the affected classes (flip, swap)."""
    from pipeline.core.attacks import apply_trigger
    from pipeline.core.predict import predict
    from pipeline.evaluate import asr_from_predictions

    xte, yte = _W["xte"], _W["yte"]
    clean = predict(model, xte, device="cpu")
    out = {"acc": float((clean == yte).mean())}
    if t["kind"] in ("patch", "blend"):
        trig = predict(model, apply_trigger(xte, _trigger(t)), device="cpu")
        out["asr"], _ = asr_from_predictions(yte, clean, trig, t["target"], t["source"])
    if base_recall is not None and t["kind"] in ("flip", "swap", "noise"):
        affected = ([t["source"]] if t["kind"] == "flip" else [t["source"], t["target"]] if t["kind"] == "swap"
                    else list(range(10)))
        rec = _recall(yte, clean)
        out["recall_drop"] = float(max(base_recall[c] - rec[c] for c in affected))
    return out


def run_detectors(model, x: np.ndarray, y: np.ndarray, eps: float, seed: int, with_kfold: bool) -> dict:
    """Features, the detectors, timings. Returns {'det': {name: Detection-like dict}, 'time': ...}.

    The clean model of the two-view robust detector is a small_cnn trained on the test split
    alone (same recipe and seed, as many optimizer steps as the candidate: ``clean_model_epochs``):
    the trusted split the reference comes from."""
    from pipeline.core import detect
    from pipeline.core.features import penultimate_features

    times: dict[str, float] = {}
    xte, yte = _W["xte"], _W["yte"]
    t0 = time.perf_counter()
    f = penultimate_features(model, x, device="cpu")
    fr = penultimate_features(model, xte, device="cpu")
    times["features"] = time.perf_counter() - t0
    clean_model, times["clean_model_train"] = _train(xte, yte, seed, clean_model_epochs(len(x), len(xte)))
    t0 = time.perf_counter()
    g = penultimate_features(clean_model, x, device="cpu")
    gr = penultimate_features(clean_model, xte, device="cpu")
    times["clean_features"] = time.perf_counter() - t0
    cfg = detect.RobustConfig(class_threshold=_W["thresholds"][0], shallow_threshold=_W["thresholds"][1])
    dets = {}
    t0 = time.perf_counter(); dets["ss"] = detect.spectral_signatures(f, y, 10, eps=eps); times["ss"] = time.perf_counter() - t0
    t0 = time.perf_counter(); dets["ac"] = detect.activation_clustering(f, y, 10, seed=seed); times["ac"] = time.perf_counter() - t0
    t0 = time.perf_counter(); dets["robust"] = detect.robust_detect(f, y, 10, fr, yte, g, gr, config=cfg); times["robust"] = time.perf_counter() - t0
    t0 = time.perf_counter(); dets["robust_cand"] = detect.robust_detect(f, y, 10, fr, yte, config=cfg); times["robust_cand"] = time.perf_counter() - t0
    t0 = time.perf_counter(); dets["robust_self"] = detect.robust_detect(f, y, 10, config=cfg); times["robust_self"] = time.perf_counter() - t0
    out = {name: {"primary": d.primary, "flagged": d.flagged, "class_stat": d.class_stat,
                  "shallow": d.class_stats.get("tail_ratio_shallow"), "suspicious": list(d.suspicious)}
           for name, d in dets.items()}
    if with_kfold:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        from pipeline.core.kfold import out_of_fold_probs

        t0 = time.perf_counter()
        probs = out_of_fold_probs(x, y, 10, "small_cnn", 32, _spec(seed), k=_W["k"], seed=seed)
        times["kfold_train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        issues = find_label_issues(y, probs, n_jobs=1)
        quality = get_label_quality_scores(y, probs)
        times["cleanlab"] = time.perf_counter() - t0
        counts = np.bincount(y[issues], minlength=10).astype(float)
        out["cleanlab"] = {"primary": 1.0 - quality, "flagged": issues, "class_stat": counts, "shallow": None,
                           "suspicious": []}
    return {"det": out, "time": times}


def _metrics(d: dict, pm: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    fl = d["flagged"]
    tp = int((fl & pm).sum())
    return {
        "flagged": int(fl.sum()),
        "precision": tp / int(fl.sum()) if fl.sum() else 0.0,
        "recall": tp / int(pm.sum()) if pm.sum() else None,
        "auroc": float(roc_auc_score(pm, d["primary"])) if 0 < pm.sum() < len(pm) else None,
        "class_stat_max": float(np.max(d["class_stat"])),
    }


def clean_run(seed: int, with_kfold: bool = True) -> dict:
    x, y = _W["xtr"], _W["ytr"]
    model, t_train = _train(x, y, seed)
    from pipeline.core.predict import predict

    pred = predict(model, _W["xte"], device="cpu")
    res = run_detectors(model, x, y, eps=0.1, seed=seed, with_kfold=with_kfold)
    det = {}
    for name, d in res["det"].items():
        fl = d["flagged"]
        det[name] = {"flagged": int(fl.sum()), "classes_with_flags": int(len(np.unique(y[fl]))),
                     "class_stat": [float(v) for v in d["class_stat"]], "suspicious": d["suspicious"]}
        if d["shallow"] is not None:
            det[name]["shallow"] = [float(v) for v in d["shallow"]]
    return {"seed": seed, "acc": float((pred == _W["yte"]).mean()), "recall": _recall(_W["yte"], pred).tolist(),
            "train_s": t_train, "time": res["time"], "det": det}


def attack_trial(t: dict, base_recall: list[float], seed: int) -> dict:
    xi, yi, pm = poison_view(t)
    model, t_train = _train(xi, yi, seed)
    base = np.asarray(base_recall)
    eff = attack_effect(model, t, base)
    effective = (eff.get("asr") or 0.0) >= ASR_EFFECTIVE or eff.get("recall_drop", 0.0) >= DROP_EFFECTIVE
    res = run_detectors(model, xi, yi, eps=min(max(t["rate"], 0.01), 0.5), seed=seed, with_kfold=True)
    out = {**t, "train_seed": seed, "n_poison": int(pm.sum()), "candidate": eff, "effective": bool(effective),
           "train_s": t_train, "time": res["time"], "det": {}}
    targets = sorted(set(yi[pm].tolist()))
    for name, d in res["det"].items():
        m = _metrics(d, pm)
        cs = np.asarray(d["class_stat"])
        m["class_stat_targets"] = float(cs[targets].max()) if targets else None
        rest = np.delete(cs, targets)
        m["class_stat_others"] = float(rest.max()) if len(rest) else 0.0
        if d["shallow"] is not None:
            sh = np.asarray(d["shallow"])
            m["shallow_targets"] = float(sh[targets].max()) if targets else None
            rest = np.delete(sh, targets)
            m["shallow_others"] = float(rest.max()) if len(rest) else 0.0
        if name in ("robust", "robust_cand", "robust_self"):
            m["blocked"] = bool(d["suspicious"])
            m["suspicious"] = d["suspicious"]
        out["det"][name] = m
    if effective:
        for name in RETRAINED:
            keep = ~res["det"][name]["flagged"]
            if keep.all():
                out["det"][name]["after"] = dict(eff)
                continue
            m2, _ = _train(xi[keep], yi[keep], seed)
            out["det"][name]["after"] = attack_effect(m2, t, base)
    return out


def _clean_job(args):
    return clean_run(*args)


def clean_report(clean: list[dict], args, wall: float, thresholds: tuple[float, float]) -> str:
    """The --clean-only confirmation run: robust statistics of clean models only."""
    thr, sthr = thresholds
    L = ["# Robust detector on clean digits models: false-block confirmation\n",
         f"Clean train seeds {clean[0]['seed']}..{clean[-1]['seed']} ({len(clean)} models), no k-fold, same recipe and "
         f"detectors as bench/results/detect_samples.md. Block rule: main tail ratio >= {thr} or shallow >= {sthr}. "
         f"Wall time {wall / 60:.1f} min. Command: `python bench/detect_samples.py " + " ".join(sys.argv[1:]) + "`\n",
         "| detector | main ratio (max over classes) mean ± std | largest | shallow mean ± std | largest | false blocks |",
         "|---|---|---|---|---|---|"]
    for name in ("robust", "robust_cand", "robust_self"):
        cm = [max(c["det"][name]["class_stat"]) for c in clean]
        cs = [max(c["det"][name]["shallow"]) for c in clean]
        fb = sum(bool(c["det"][name]["suspicious"]) for c in clean)
        L.append(f"| {name} | {_ms(cm, '{:.3f}')} | {max(cm):.3f} | {_ms(cs, '{:.3f}')} | {max(cs):.3f} | {fb}/{len(clean)} |")
    L.append("\nPer seed (robust, two views): " + ", ".join(
        f"{c['seed']}: {max(c['det']['robust']['class_stat']):.3f}/{max(c['det']['robust']['shallow']):.3f}" for c in clean))
    return "\n".join(L) + "\n"


def _attack_job(args):
    t, bases = args
    seed, recall = bases[t["id"] % len(bases)]  # a clean run's train seed: it is the recall-drop baseline
    return attack_trial(t, recall, seed)


# ----------------------------------------------------------------------------- report


def _ms(v: list[float], fmt: str = "{:.2f}") -> str:
    v = [x for x in v if x is not None]
    if not v:
        return "—"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(np.mean(v))} ± {fmt.format(np.std(v))}"


def _effect(e: dict) -> float | None:
    return e.get("asr") if "asr" in e else e.get("recall_drop")


def report(clean: list[dict], trials: list[dict], cut: list[str], args, wall: float, thresholds: tuple[float, float]) -> str:
    import torch

    L: list[str] = []
    L.append("# Poisoned-sample detection on digits (issue 12, deliverable 1)\n")
    L.append(f"Machine: {platform.machine()} CPU box, {os.cpu_count()} cores shared with other jobs "
             f"(timings noisy), torch {torch.__version__}, one torch thread per process, `--jobs {args.jobs}`. "
             f"Model: small_cnn (width 32), conf/train/digits.yaml recipe on CPU. "
             f"Clean runs: {len(clean)} train seeds. Attack trials: {len(trials)} "
             f"({sum(t['effective'] for t in trials)} effective: ASR >= {ASR_EFFECTIVE} or recall drop >= {DROP_EFFECTIVE}). "
             f"k-fold for cleanlab: k = {args.kfold}. Robust block rule: main tail ratio >= {thresholds[0]} "
             f"or shallow-band ratio >= {thresholds[1]} in any class. "
             f"Wall time: {wall / 60:.1f} min.\n")
    L.append("Command: `python bench/detect_samples.py " + " ".join(sys.argv[1:]) + "`\n")
    if cut:
        L.append("Cut from the full grid (`--full` runs it):\n" + "".join(f"- {c}\n" for c in cut))
    names = {"ss": "spectral signatures (published)", "ac": "activation clustering (published)",
             "robust": "robust (ours: two views, test split + clean model)",
             "robust_cand": "robust, candidate view only", "robust_self": "robust, no reference",
             "cleanlab": f"cleanlab on {args.kfold}-fold OOF"}

    # --- summary over effective attacks per family
    eff = [t for t in trials if t["effective"]]
    fams = sorted({t["family"] for t in trials})
    L.append("\n## Effective attacks, per family: detection and what is left after removing the flagged rows and retraining\n")
    L.append("Effect = ASR (backdoor) or largest recall drop of the affected classes (flip, swap); "
             "'after' = the same measured on the model retrained without the detector's flagged rows "
             "(robust-cand and robust-self are detection only). Mean ± std over the family's effective trials.\n")
    L.append("| family | n eff / n | candidate effect | detector | precision | recall | AUROC | blocked | effect after | acc after |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for fam in fams:
        ft = [t for t in eff if t["family"] == fam]
        n_all = sum(t["family"] == fam for t in trials)
        if not ft:
            L.append(f"| {fam} | 0 / {n_all} | — | — | | | | | | |")
            continue
        ce = _ms([_effect(t["candidate"]) for t in ft])
        for name in DETECTORS:
            ds = [t["det"][name] for t in ft]
            blocked = f"{sum(d['blocked'] for d in ds)}/{len(ds)}" if "blocked" in ds[0] else "n/a"
            after = _ms([_effect(d["after"]) for d in ds if "after" in d])
            acc = _ms([d["after"]["acc"] for d in ds if "after" in d])
            L.append(f"| {fam} | {len(ft)} / {n_all} | {ce} | {names[name]} | {_ms([d['precision'] for d in ds])} | "
                     f"{_ms([d['recall'] for d in ds])} | {_ms([d['auroc'] for d in ds], '{:.3f}')} | {blocked} | {after} | {acc} |")
            ce = ""

    # --- anchors
    L.append("\n## Anchor cells (the issue's BackdoorBench / cleanlab rows, same run)\n")
    L.append("| cell | trials | candidate effect | SS effect after | AC effect after | robust effect after | cleanlab effect after | robust P / R | cleanlab P / R |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    cells = sorted({t.get("anchor") for t in trials if t.get("anchor")})
    for a in cells:
        ft = [t for t in trials if t.get("anchor") == a]
        row = [a, str(len(ft)), _ms([_effect(t["candidate"]) for t in ft])]
        for name in RETRAINED:
            row.append(_ms([_effect(t["det"][name]["after"]) for t in ft if "after" in t["det"][name]]))
        for name in ("robust", "cleanlab"):
            row.append(f"{_ms([t['det'][name]['precision'] for t in ft])} / {_ms([t['det'][name]['recall'] for t in ft])}")
        L.append("| " + " | ".join(row) + " |")
    flips = [t for t in trials if t["kind"] in ("flip", "swap") and t["rate"] >= 0.2]
    if flips:
        L.append(f"| flip + swap at 20% (label noise) | {len(flips)} | {_ms([_effect(t['candidate']) for t in flips])} | "
                 f"cleanlab P/R: {_ms([t['det']['cleanlab']['precision'] for t in flips])} / {_ms([t['det']['cleanlab']['recall'] for t in flips])} | "
                 f"robust P/R: {_ms([t['det']['robust']['precision'] for t in flips])} / {_ms([t['det']['robust']['recall'] for t in flips])} | | | | |")

    # --- blocks: robust statistics and margins
    thr, sthr = thresholds
    L.append("\n## Gate statistics: robust tail ratios (max over classes)\n")
    L.append(f"Block rule: any class with main tail ratio (depths >= 3 rows) >= {thr} or shallow-band ratio "
             f"(depths 1-2) >= {sthr} (RobustConfig at run time, or --threshold / --shallow-threshold).\n")

    def smax(rec: dict, key: str) -> float:
        return max(rec[key]) if rec.get(key) is not None else 0.0

    def blocked_at(rec: dict, t1: float, t2: float) -> bool:
        return smax(rec, "class_stat") >= t1 or smax(rec, "shallow") >= t2

    def trial_max(m: dict, key: str) -> float:
        v = [m.get(f"{key}_targets"), m.get(f"{key}_others")]
        return max(x for x in v if x is not None) if any(x is not None for x in v) else 0.0

    def trial_blocked_at(m: dict, t1: float, t2: float) -> bool:
        return trial_max(m, "class_stat") >= t1 or trial_max(m, "shallow") >= t2

    for name, what in (("robust", "robust (two views)"), ("robust_cand", "candidate view only (robust-cand)"),
                       ("robust_self", "without a reference (robust-self)")):
        cm = [smax(c["det"][name], "class_stat") for c in clean]
        cs = [smax(c["det"][name], "shallow") for c in clean]
        L.append(f"- **{what}**: clean models ({len(clean)}): main ratio {_ms(cm)}, largest {max(cm):.3f}; shallow "
                 f"{_ms(cs)}, largest {max(cs):.3f}; false blocks {sum(bool(c['det'][name]['suspicious']) for c in clean)}/{len(clean)}")
        if name == "robust":
            nt = [t["det"][name]["class_stat_others"] for t in trials]
            nts = [t["det"][name].get("shallow_others") or 0.0 for t in trials]
            L.append(f"  - non-target classes of the {len(trials)} attacked models: main largest {max(nt):.3f}, shallow largest {max(nts):.3f}")
        if eff:
            lo = min(eff, key=lambda t: t["det"][name]["class_stat_targets"])
            L.append(f"  - effective attacks: blocked {sum(t['det'][name]['blocked'] for t in eff)}/{len(eff)}; smallest "
                     f"target-class main ratio {lo['det'][name]['class_stat_targets']:.3f} ({_label(lo)}, {lo['n_poison']} rows)")
            for t in eff:
                if not t["det"][name]["blocked"] and name == "robust":
                    L.append(f"  - MISSED: {_label(t)} at {t['rate']:.2f} ({t['n_poison']} rows): main "
                             f"{t['det'][name]['class_stat_targets']:.3f}, shallow {t['det'][name].get('shallow_targets') or 0:.3f}, "
                             f"candidate effect {_effect(t['candidate']):.2f}")
        ineff = [t for t in trials if not t["effective"]]
        if ineff and name == "robust":
            L.append(f"  - ineffective attacks ({len(ineff)}): blocked anyway {sum(t['det'][name]['blocked'] for t in ineff)}/{len(ineff)}")
    L.append("\nThreshold sweep of the main ratio (shallow threshold fixed) and of the shallow ratio (main fixed):\n")
    L.append("| main / shallow threshold | robust: clean false blocks | robust: effective blocked | robust-cand: clean false blocks | robust-cand: effective blocked | robust-self: clean false blocks | robust-self: effective blocked |")
    L.append("|---|---|---|---|---|---|---|")
    grid = [(t1, sthr) for t1 in sorted({1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.2, thr})]
    grid += [(thr, t2) for t2 in sorted({1.8, 1.9, 2.0, 2.2, 2.4, 1e9}) if t2 != sthr]
    for t1, t2 in grid:
        row = [f"{t1:g} / {'off' if t2 >= 1e9 else f'{t2:g}'}"]
        for name in ("robust", "robust_cand", "robust_self"):
            fb = sum(blocked_at(c["det"][name], t1, t2) for c in clean)
            bl = sum(trial_blocked_at(t["det"][name], t1, t2) for t in eff)
            row += [f"{fb}/{len(clean)}", f"{bl}/{len(eff)}"]
        L.append("| " + " | ".join(row) + " |")

    # --- clean runs
    L.append("\n## Clean runs: what each detector flags when nothing is poisoned\n")
    L.append("| detector | rows flagged (mean ± std) | max | classes with a flag (mean) | class statistic (max over classes), mean ± std | largest |")
    L.append("|---|---|---|---|---|---|")
    for name in DETECTORS:
        v = [c["det"][name]["flagged"] for c in clean]
        k = [c["det"][name]["classes_with_flags"] for c in clean]
        s = [max(c["det"][name]["class_stat"]) for c in clean]
        L.append(f"| {names[name]} | {_ms(v, '{:.1f}')} | {max(v)} | {np.mean(k):.1f} | {_ms(s)} | {max(s):.2f} |")
    L.append("\nClass statistics: SS = top squared singular value ratio to the median class (derived, not in the paper); "
             "AC = silhouette of the 2-means split; robust = tail scan ratio; cleanlab = label issues in the class.\n")

    # --- timing
    L.append("\n## Time per model (digits, 1347 training rows, CPU, one thread, machine shared: noisy)\n")
    allt = [c["time"] for c in clean] + [t["time"] for t in trials]
    L.append("| step | seconds (mean ± std) |")
    L.append("|---|---|")
    trn = [c["train_s"] for c in clean] + [t["train_s"] for t in trials]
    L.append(f"| train one small_cnn | {_ms(trn)} |")
    for key in ("features", "clean_model_train", "clean_features", "robust", "robust_cand", "robust_self", "ss", "ac",
                "kfold_train", "cleanlab"):
        L.append(f"| {key} | {_ms([t[key] for t in allt if key in t], '{:.3f}')} |")
    L.append(f"| features + clean model + robust (the inspect cost) | "
             f"{_ms([t['features'] + t['clean_model_train'] + t['clean_features'] + t['robust'] for t in allt], '{:.3f}')} |")

    # --- per trial
    L.append("\n## Every trial\n")
    L.append("| id | attack | rate | poison rows | effect | eff | robust main ratio target / others (shallow target) | block | robust P/R/AUC | SS P/R/AUC | AC P/R/AUC | cleanlab P/R/AUC | after: SS / AC / robust / cleanlab |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in trials:
        d = t["det"]

        def pra(m):
            r = "—" if m["recall"] is None else f"{m['recall']:.2f}"
            a = "—" if m["auroc"] is None else f"{m['auroc']:.3f}"
            return f"{m['precision']:.2f}/{r}/{a}"

        after = " / ".join("—" if "after" not in d[n] else f"{_effect(d[n]['after']):.2f}" for n in RETRAINED)
        ct = d["robust"]["class_stat_targets"]
        L.append(f"| {t['id']} | {_label(t)} | {t['rate']:.2f} | {t['n_poison']} | {_effect(t['candidate']):.2f} | "
                 f"{'yes' if t['effective'] else 'no'} | {ct:.2f} / {d['robust']['class_stat_others']:.2f} "
                 f"({d['robust'].get('shallow_targets') or 0:.2f}) | "
                 f"{'yes' if d['robust']['blocked'] else 'no'} | {pra(d['robust'])} | {pra(d['ss'])} | {pra(d['ac'])} | "
                 f"{pra(d['cleanlab'])} | {after} |")
    return "\n".join(L) + "\n"


def _label(t: dict) -> str:
    if t["kind"] == "patch":
        src = "all" if t["source"] is None else str(t["source"])
        return f"patch {t['size']}px {t['location']} {src}->{t['target']}"
    if t["kind"] == "blend":
        src = "all" if t["source"] is None else str(t["source"])
        return f"blend a={t['alpha']} {src}->{t['target']}"
    if t["kind"] == "flip":
        return f"flip {t['source']}->{t['target']}"
    if t["kind"] == "noise":
        return "uniform label noise"
    return f"swap {t['source']}<->{t['target']}"


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--clean-seeds", type=int, default=20, help="clean models (>= 20 for the gate calibration)")
    ap.add_argument("--clean-start", type=int, default=0, help="first clean train seed")
    ap.add_argument("--clean-only", action="store_true",
                    help="only clean models, no k-fold, no attacks: a false-block confirmation run "
                         "(default --out bench/results/detect_samples_clean.md)")
    ap.add_argument("--kfold", type=int, default=3, help="folds for cleanlab's out-of-fold probabilities")
    ap.add_argument("--seeds", type=int, default=1, help="repeats of the attack grid (new attack + train seeds)")
    ap.add_argument("--full", action="store_true", help="every location x size x rate and alpha x rate")
    ap.add_argument("--rep-start", type=int, default=0, help="first grid repetition (new attack seeds, ids)")
    ap.add_argument("--noise", action="store_true",
                    help="only the uniform 20%% label-noise cell, --seeds times (cleanlab's anchor; "
                         "default --out bench/results/detect_samples_noise.md)")
    ap.add_argument("--limit", type=int, default=None, help="run only the first N attack trials (smoke)")
    ap.add_argument("--threshold", type=float, default=None, help="robust main tail-ratio threshold (default: RobustConfig)")
    ap.add_argument("--shallow-threshold", type=float, default=None, help="robust shallow-band threshold (default: RobustConfig)")
    ap.add_argument("--out", default=str(REPO / "bench/results/detect_samples.md"))
    args = ap.parse_args()
    args.out_given = "--out" in sys.argv
    from pipeline.core.detect import RobustConfig

    thresholds = (args.threshold if args.threshold is not None else RobustConfig().class_threshold,
                  args.shallow_threshold if args.shallow_threshold is not None else RobustConfig().shallow_threshold)
    grid, cut = build_grid(args.full, args.seeds, args.rep_start, args.noise)
    if args.noise and not args.out_given:
        args.out = str(REPO / "bench/results/detect_samples_noise.md")
    if args.limit is not None:
        cut.append(f"--limit {args.limit}: only the first {args.limit} of {len(grid)} attack trials")
        grid = grid[: args.limit]
    print(f"{args.clean_seeds} clean runs, {len(grid)} attack trials, jobs={args.jobs}", flush=True)
    for c in cut:
        print("cut:", c, flush=True)
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_init_worker, initargs=(args.kfold, thresholds)) as pool:
        clean = []
        seeds = range(args.clean_start, args.clean_start + args.clean_seeds)
        for r in pool.imap_unordered(_clean_job, [(sd, not args.clean_only) for sd in seeds]):
            clean.append(r)
            print(f"clean seed {r['seed']}: acc {r['acc']:.3f}, robust max T {max(r['det']['robust']['class_stat']):.3f} "
                  f"shallow {max(r['det']['robust']['shallow']):.3f} block {r['det']['robust']['suspicious']}, "
                  f"cleanlab flags {r['det']['cleanlab']['flagged']}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        clean.sort(key=lambda r: r["seed"])
        if args.clean_only:
            md = clean_report(clean, args, time.perf_counter() - t0, thresholds)
            out = Path(args.out if args.out_given else REPO / "bench/results/detect_samples_clean.md")
            out.write_text(md)
            out.with_suffix(".json").write_text(json.dumps(_jsonable({"args": vars(args), "thresholds": thresholds,
                                                                      "clean": clean}), indent=1))
            print(md)
            print(f"wrote {out}")
            return 0
        bases = [(c["seed"], c["recall"]) for c in clean]
        trials = []
        for r in pool.imap_unordered(_attack_job, [(t, bases) for t in grid]):
            trials.append(r)
            d = r["det"]["robust"]
            print(f"trial {r['id']:3d} {_label(r):32s} rate {r['rate']:.2f}: effect {_effect(r['candidate']):.2f} "
                  f"eff={r['effective']} T={d['class_stat_targets']:.2f} block={d['blocked']} "
                  f"P/R {d['precision']:.2f}/{d['recall']:.2f}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        trials.sort(key=lambda r: r["id"])
    wall = time.perf_counter() - t0
    md = report(clean, trials, cut, args, wall, thresholds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    raw = {"args": vars(args), "thresholds": thresholds, "wall_s": wall, "cut": cut, "clean": clean, "trials": trials}
    out.with_suffix(".json").write_text(json.dumps(_jsonable(raw), indent=1))
    print(md)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
