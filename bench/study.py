"""The systematic study (issue 18): regularisation x attack x rate x seed on digits (CPU), with
the release gate's verdict, the inspect detector's flag rates, and the clean fine-tuning curve.

    nice -n 10 python bench/study.py [--jobs 2] [--seeds 3] [--quick]

Drives the pipeline's own functions, no dvc subprocesses: ``core.attacks.poison`` (patch, blend,
label flip: what the poison stage calls), ``core.clean_label.craft`` (what the poison stage calls
for attack=clean_label), ``core.train.fit`` with ``schema.TrainConfig`` (the train stage's loop),
``pipeline.evaluate.evaluate_model`` + ``targeted_metrics`` (the evaluate stage's metrics),
``gates.rules`` with conf/gate/default.yaml (the release gate's ASR/recall/accuracy checks),
``core.detect.robust_detect`` (the inspect detector, reference mode: candidate features, the test
split as the trusted reference) and ``core.remedy.finetune`` (remedy=finetune).

Cells: architecture small_cnn only (fastnet and resnet18 need the GPU: not run here);
regularisation none (dropout 0) | wd (weight decay 5e-4) | dropout (p 0.5) | augment (crop, pad 1,
no flip) | smooth (label smoothing 0.1) | lgm (loss=lgm); each cell's baseline = the clean model
of the same regularisation and seed (the twin). Clean-label poisons are crafted once per seed
against that seed's clean `none` model (the attacker does not know the victim's regulariser)
and reused across regularisations. Rates are the pipeline's `attack.rate` (see the table).
Writes bench/results/study_digits.md, study_digits.json and study_*.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results"

# Digits small_cnn recipe (conf/train/digits.yaml): Adam 3e-3, one-cycle, batch 64, 10 epochs.
BASE_TRAIN = dict(epochs=10, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", device="cpu")
REGS = {  # name -> (TrainConfig overrides, dropout p of small_cnn's head; the model's default is 0.1)
    "none": ({}, 0.0),
    "wd": ({"weight_decay": 5e-4}, 0.0),
    "dropout": ({}, 0.5),
    "augment": ({"augment": True, "aug_pad": 1}, 0.0),  # flip is off below: a mirrored digit is another class
    "smooth": ({"label_smoothing": 0.1}, 0.0),
    "lgm": ({"loss": "lgm"}, 0.0),
}
TRIG = dict(kind="patch", size=3, location="bottom_right", pattern="white", alpha=0.1, seed=0)
ATTACKS = {  # name -> attack config (as params.yaml's attack.*)
    "patch3_br": dict(name="backdoor", source=None, target=7, trigger=TRIG),
    "patch2_tl": dict(name="backdoor", source=None, target=7, trigger={**TRIG, "size": 2, "location": "top_left"}),
    "blend": dict(name="backdoor", source=None, target=7, trigger={**TRIG, "kind": "blend", "pattern": "noise", "alpha": 0.2}),
    "label_flip": dict(name="label_flip", source=1, target=7),
    "label_consistent": dict(name="clean_label", method="label_consistent", source=None, target=8, eps=96, steps=20,
                             trigger=TRIG),
    "feature_collision": dict(name="clean_label", method="feature_collision", source=4, target=9, eps=160, steps=50,
                              n_targets=10, opacity=0.5),
}
RATES = (0.01, 0.05, 0.10)
CLEAN_LABEL_EXTRA_RATE = 0.5  # the bench's effective label-consistent rate, beside the three
CLEAN_LABEL_RATES = (0.05, 0.10, CLEAN_LABEL_EXTRA_RATE)  # 1% cut: 1 row of class 8, and 0 per FC target
FT_EPOCHS = (0, 1, 2, 5, 10)
FT_RESERVES = (0.01, 0.05, 0.10)
FT_ATTACKS = ("patch3_br", "label_consistent")
FT_RATE = 0.10

_W: dict = {}


def _init():
    import torch

    torch.set_num_threads(1)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.clip(np.round(d.images * 255.0 / 16.0), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    import yaml

    _W["scan"] = yaml.safe_load((ROOT / "conf" / "eval" / "default.yaml").read_text())["scan"]  # the evaluate stage's set
    _W.update(xtr=xtr, ytr=ytr, xte=xte, yte=yte, ids=[f"digits/train/{i}" for i in range(len(ytr))],
              te_ids=[f"digits/test/{i}" for i in range(len(yte))], names=[str(i) for i in range(10)])


def train(images, labels, reg: str, seed: int):
    """core.train.fit on a small_cnn built as train_model builds it, with the cell's regulariser."""
    import torch
    from pipeline.core import data as tdata
    from pipeline.core import augment as aug
    from pipeline.core.models import build_model, model_args
    from pipeline.core.train import fit, seed_everything
    from pipeline.schema import TrainConfig

    over, p = REGS[reg]
    spec = TrainConfig(**{**BASE_TRAIN, **over, "seed": seed})
    seed_everything(seed)
    mean, std = tdata.channel_stats(images)
    args = model_args("small_cnn", 10, images.shape[-1], images.shape[1], 32, mean, std,
                      head="lgm" if spec.loss == "lgm" else "linear", lgm_covariance=spec.lgm_covariance)
    model = build_model(**args)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    orig = aug.random_crop_flip

    def no_flip(x, pad, gen=None, flip=True, mode="reflect", **kw):
        return orig(x, pad, gen, flip=False, mode=mode, **kw)

    aug.random_crop_flip = no_flip
    try:
        fit(model, images, labels, spec, None)
    finally:
        aug.random_crop_flip = orig
    return model.eval()


def metrics_of(model, attack: dict | None):
    from pipeline.evaluate import evaluate_model, targeted_metrics

    spec = None
    if attack is not None and attack.get("name") in ("backdoor", "clean_label"):
        spec = attack
    m = evaluate_model(model, _W["xte"], _W["yte"], _W["names"], _W["scan"], spec, device="cpu")
    if attack is not None:
        t = targeted_metrics(model, attack, _W["xte"], _W["te_ids"], device="cpu")
        if t:
            m["targeted"] = t
    return m


def gate_verdict(cand: dict, base: dict) -> tuple[bool, list[str]]:
    """The release gate's model checks (accuracy, ASR, recall) at conf/gate/default.yaml."""
    import yaml
    from gates import rules
    from pipeline.schema import GateConfig

    g = yaml.safe_load((ROOT / "conf" / "gate" / "default.yaml").read_text())
    t = GateConfig(**{k: g[k] for k in ("max_asr", "max_asr_increase", "max_recall_drop", "min_accuracy", "max_accuracy_drop")})
    checks = [*rules.accuracy_checks(cand, base, t), *rules.asr_checks(cand, base, t), *rules.recall_checks(cand, base, t)]
    return all(c.passed for c in checks), [c.name for c in checks if not c.passed]


def inspect_rows(model, images, labels, poisoned: np.ndarray):
    """robust_detect (reference mode): share of poisoned / clean rows flagged, and whether any class is suspicious."""
    from pipeline.core import detect
    from pipeline.core.features import penultimate_features

    f = penultimate_features(model, images, device="cpu")
    fr = penultimate_features(model, _W["xte"], device="cpu")
    d = detect.robust_detect(f, labels, 10, fr, _W["yte"])
    mask = np.zeros(len(labels), bool)
    mask[poisoned] = True
    return {"flag_poison": float(d.flagged[mask].mean()) if mask.any() else None,
            "flag_clean": float(d.flagged[~mask].mean()), "suspicious": [int(c) for c in d.suspicious]}


def build_poison(name: str, rate: float, seed: int, surrogate):
    """(images, labels, poisoned rows, resolved attack) of one attack cell (the poison stage's code)."""
    from pipeline.core.attacks import poison, resolve_attack
    from pipeline.core.clean_label import craft, resolve_clean_label

    a = {**ATTACKS[name], "rate": rate, "seed": seed}
    x, y, ids = _W["xtr"], _W["ytr"], _W["ids"]
    if a["name"] == "clean_label":
        r = resolve_clean_label(a, _W["names"], x.shape[1:])
        res, targets = craft(surrogate, x, y, ids, r, _W["xte"], _W["yte"], _W["te_ids"], device="cpu")
        if targets:
            r["targets"] = [{"sample_id": t["sample_id"], "sha256": t["sha256"]} for t in targets]
        return res.images, res.labels, res.rows, r, res.info["seconds"]
    t0 = time.perf_counter()
    xi, yi, recs = poison(x, y, ids, a, _W["names"])
    index = {s: i for i, s in enumerate(ids)}
    rows = np.array(sorted(index[r["sample_id"]] for r in recs), np.int64)
    return xi, yi, rows, resolve_attack(a, _W["names"], x.shape[1:]), time.perf_counter() - t0


def craft_seed(seed: int) -> dict:
    """Per seed: the clean `none` surrogate and every clean-label poison crafted against it."""
    _init() if not _W else None
    sur = train(_W["xtr"], _W["ytr"], "none", seed)
    out = {}
    for name in ("label_consistent", "feature_collision"):
        for rate in CLEAN_LABEL_RATES:
            try:
                xi, yi, rows, r, secs = build_poison(name, rate, seed, sur)
                out[(name, rate)] = (xi, yi, rows, r, secs)
            except Exception as exc:  # e.g. 1% of the base class over 10 targets = 0 poisons per target
                out[(name, rate)] = str(exc)
    return out


def run_group(reg: str, seed: int, crafted: dict) -> list[dict]:
    """One (regularisation, seed): the clean twin, every attack cell, false blocks of a clean rerun."""
    _init() if not _W else None
    t0 = time.perf_counter()
    clean = train(_W["xtr"], _W["ytr"], reg, seed)
    rows_out = []
    base_by_attack = {}
    # false blocks: another clean model (seed + 1000) judged against this baseline, and inspected
    other = train(_W["xtr"], _W["ytr"], reg, seed + 1000)
    b0, c0 = metrics_of(clean, None), metrics_of(other, None)
    ok, failed = gate_verdict(c0, b0)
    ins = inspect_rows(other, _W["xtr"], _W["ytr"], np.zeros(0, np.int64))
    rows_out.append(dict(reg=reg, seed=seed, attack="clean", rate=0.0, acc=c0["accuracy"], asr=c0["asr_max"],
                         gate_pass=ok, failed=failed, inspect_suspicious=ins["suspicious"], flag_clean=ins["flag_clean"]))
    for name in ATTACKS:
        rates = CLEAN_LABEL_RATES if ATTACKS[name]["name"] == "clean_label" else RATES
        for rate in rates:
            if ATTACKS[name]["name"] == "clean_label":
                got = crafted[(name, rate)]
                if isinstance(got, str):
                    rows_out.append(dict(reg=reg, seed=seed, attack=name, rate=rate, error=got))
                    continue
                xi, yi, prow, spec, secs = got
            else:
                xi, yi, prow, spec, secs = build_poison(name, rate, seed, None)
            model = train(xi, yi, reg, seed)
            key = json.dumps(spec, sort_keys=True, default=str)
            if key not in base_by_attack:
                base_by_attack[key] = metrics_of(clean, spec)
            base = base_by_attack[key]
            m = metrics_of(model, spec)
            ok, failed = gate_verdict(m, base)
            ins = inspect_rows(model, xi, yi, prow)
            t = (m.get("targeted") or {}).get("feature_collision")
            asr = m["asr"].get("attack", {}).get(str(spec["target"])) if "attack" in m["asr"] else None
            rows_out.append(dict(
                reg=reg, seed=seed, attack=name, rate=rate, n_poison=int(len(prow)), craft_s=secs,
                acc=m["accuracy"], asr=asr, base_asr=base["asr"].get("attack", {}).get(str(spec["target"])),
                targeted=None if t is None else t["success_rate"],
                base_targeted=None if t is None else base["targeted"]["feature_collision"]["success_rate"],
                recall_target=m["per_class"][str(spec["target"])]["recall"],
                recall_source=None if spec.get("source") is None else m["per_class"][str(spec["source"])]["recall"],
                gate_pass=ok, failed=failed, flag_poison=ins["flag_poison"], flag_clean=ins["flag_clean"],
                inspect_suspicious=ins["suspicious"],
                linf_max=float(np.abs(xi[prow].astype(int) - _W["xtr"][prow].astype(int)).max()) if len(prow) else 0.0))
    for r in rows_out:
        r["group_s"] = time.perf_counter() - t0
    return rows_out


def finetune_curve(seed: int, crafted: dict) -> list[dict]:
    """Clean fine-tuning (remedy=finetune's core.remedy.finetune, its default lr/batch) of the
    reg=none victims at rate 10%: ASR and accuracy after 0/1/2/5/10 epochs on a 1/5/10% reserve."""
    import torch
    from pipeline.core.remedy import finetune, trusted_reserve

    _init() if not _W else None
    out = []
    for name in FT_ATTACKS:
        if ATTACKS[name]["name"] == "clean_label":
            xi, yi, prow, spec, _ = crafted[(name, FT_RATE if name != "label_consistent" else CLEAN_LABEL_EXTRA_RATE)]
        else:
            xi, yi, prow, spec, _ = build_poison(name, FT_RATE, seed, None)
        victim = train(xi, yi, "none", seed)
        for frac in FT_RESERVES:
            idx = trusted_reserve(yi, frac, seed=seed, exclude=prow)  # 1/5/10% of the training rows
            for ep in FT_EPOCHS:
                m = copy.deepcopy(victim)
                finetune(m, _W["xtr"][idx], _W["ytr"][idx], epochs=ep, seed=seed, device="cpu")
                met = metrics_of(m.eval(), spec)
                out.append(dict(attack=name, seed=seed, reserve=frac, reserve_rows=int(len(idx)), epochs=ep,
                                acc=met["accuracy"], asr=met["asr"]["attack"][str(spec["target"])]))
    return out


def data_gate(seeds: list[int]) -> list[dict]:
    """The data gate's first-release test (``block_rate_prior``) on each poisoned view: every class's
    share of rows with an abnormal flat block (conf/validate's detector) against
    validate.prior_block_rate, binomial; blocked when p x 10 classes (Bonferroni, a conservative
    stand-in for validate's Tarone-Holm adjustment) < validate.alpha and the rate exceeds the prior
    by validate.min_effect_block_rate. Model-free, so per (attack, rate, seed), not per
    regularisation. The later-release tests (against the approved history) are not run here."""
    import yaml
    from pipeline.data import significance as sig
    from pipeline.data import stats
    from pipeline.schema import ValidateConfig

    _init() if not _W else None
    v = ValidateConfig(**yaml.safe_load((ROOT / "conf" / "validate" / "default.yaml").read_text()))
    out = []

    def judge(images, labels) -> tuple[bool, list[int]]:
        flags = stats.block_flags_cfg(images, v)["abnormal_block"].to_numpy(bool)
        n = np.bincount(labels, minlength=10)
        x = np.bincount(labels, weights=flags, minlength=10).astype(int)
        p, _ = sig.binom_greater(x, n, v.prior_block_rate)
        hit = (np.minimum(1.0, p * 10) < v.alpha) & (x / np.maximum(n, 1) - v.prior_block_rate >= v.min_effect_block_rate)
        return bool(hit.any()), [int(c) for c in np.flatnonzero(hit)]

    blocked, classes = judge(_W["xtr"], _W["ytr"])
    out.append(dict(attack="clean", rate=0.0, seed=None, blocked=blocked, classes=classes))
    for seed in seeds:
        sur = train(_W["xtr"], _W["ytr"], "none", seed)
        for name in ATTACKS:
            for rate in (CLEAN_LABEL_RATES if ATTACKS[name]["name"] == "clean_label" else RATES):
                try:
                    xi, yi, prow, spec, _ = build_poison(name, rate, seed, sur)
                except Exception:
                    continue
                blocked, classes = judge(xi, yi)
                out.append(dict(attack=name, rate=rate, seed=seed, blocked=blocked, classes=classes))
    return out


# --------------------------------------------------------------------------- report


def _ms(v):
    v = [x for x in v if x is not None]
    if not v:
        return "–"
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}" if len(v) > 1 else f"{100 * v[0]:.1f}"


def report(rows, ft, wall, args) -> str:
    import torch

    L = ["# Systematic study on digits (CPU): regularisation × attack × rate, gate verdicts, fine-tuning\n",
         f"Machine: 2-core x86_64 CPU box shared with other jobs (timings are noisy upper bounds), torch "
         f"{torch.__version__}, 1 torch thread per process, `--jobs {args.jobs}`, `nice -n 10`. Seeds: {args.seeds} "
         f"(0..{args.seeds - 1}); mean ± std over seeds. Wall time {wall / 60:.1f} min. "
         f"Command: `python bench/study.py {' '.join(sys.argv[1:])}`.\n",
         "Model: small_cnn (width 32), digits recipe (Adam 3e-3, one-cycle, batch 64, 10 epochs). "
         "Regularisation: " + ", ".join(f"`{k}` = {v[0] or {}} dropout {v[1]}" for k, v in REGS.items()) + ". "
         "Baseline of each cell: the clean model of the same regularisation and seed. Gate: conf/gate/default.yaml's "
         "accuracy, ASR and recall checks (gates.rules). `inspect`: core.detect.robust_detect in reference mode "
         "(candidate features, test split as reference): `flag P/C` = share of poisoned / clean rows flagged; "
         "`insp` = share of runs where any class is suspicious (inspect's block).\n",
         "Rates are the pipeline's `attack.rate`: patch/blend = all-to-one → 7, share of all non-7 rows; label flip "
         "1 → 7, share of class 1; label_consistent = share of class-8 rows (target 8, ε 96, 3×3 patch); "
         "feature_collision = share of base-class 9 rows over 10 target 4s (ε 160, 50 Adam steps). ASR: the attack's "
         "own trigger (GUIDE §3); for feature collision the targeted success (targets read as 9).\n",
         "Not run: fastnet and resnet18 (GPU only; no GPU cells were run for this study); the data gate "
         "(pipeline.validate's significance tests need a store and an approved history per cell: not measured here).\n"]
    L.append("## Clean runs (false blocks)\n")
    L.append("| reg | acc % | max ASR % | gate false-block | inspect false-block | clean rows flagged % |")
    L.append("|---|---|---|---|---|---|")
    for reg in REGS:
        c = [r for r in rows if r["reg"] == reg and r["attack"] == "clean"]
        if not c:
            continue
        L.append(f"| {reg} | {_ms([r['acc'] for r in c])} | {_ms([r['asr'] for r in c])} | "
                 f"{sum(not r['gate_pass'] for r in c)}/{len(c)} | {sum(bool(r['inspect_suspicious']) for r in c)}/{len(c)} | "
                 f"{_ms([r['flag_clean'] for r in c])} |")
    L.append("\n## Attacks\n")
    L.append("| attack | rate | reg | poisons | acc % | ASR / targeted % | baseline % | target recall % | gate blocks | failed checks | inspect blocks | flag P / C % |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ATTACKS:
        for rate in sorted({r["rate"] for r in rows if r["attack"] == name}):
            for reg in REGS:
                c = [r for r in rows if r["attack"] == name and r["rate"] == rate and r["reg"] == reg]
                if not c:
                    continue
                if all("error" in r for r in c):
                    L.append(f"| {name} | {rate:g} | {reg} | – | – | not run: {c[0]['error'][:80]} | | | | | | |")
                    continue
                c = [r for r in c if "error" not in r]
                val = [r["targeted"] if r["targeted"] is not None else r["asr"] for r in c]
                bval = [r["base_targeted"] if r["base_targeted"] is not None else r["base_asr"] for r in c]
                failed = sorted({f for r in c for f in r["failed"]})
                L.append(f"| {name} | {rate:g} | {reg} | {c[0]['n_poison']} | {_ms([r['acc'] for r in c])} | **{_ms(val)}** | "
                         f"{_ms(bval)} | {_ms([r['recall_target'] for r in c])} | {sum(not r['gate_pass'] for r in c)}/{len(c)} | "
                         f"{', '.join(failed) or '–'} | {sum(bool(r['inspect_suspicious']) for r in c)}/{len(c)} | "
                         f"{_ms([r['flag_poison'] for r in c])} / {_ms([r['flag_clean'] for r in c])} |")
    L.append("\n## ASR (or targeted success) per regularisation, mean over seeds and rates\n")
    L.append("| attack | " + " | ".join(REGS) + " |")
    L.append("|---|" + "---|" * len(REGS))
    for name in ATTACKS:
        cells = []
        for reg in REGS:
            c = [r for r in rows if r["attack"] == name and r["reg"] == reg and "error" not in r]
            cells.append(_ms([r["targeted"] if r["targeted"] is not None else r["asr"] for r in c]))
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    if ft:
        L.append("\n## Clean fine-tuning (core.remedy.finetune, lr 2e-3, batch 16, Adam; reg none)\n")
        L.append("Victims: patch3_br at rate 10%, label_consistent at rate 50% (its effective rate). Reserve: 1/5/10% of "
                 "the training rows, stratified, never a poisoned row. Cells: ASR % / accuracy %.\n")
        L.append("| attack | reserve (rows) | " + " | ".join(f"{e} ep" for e in FT_EPOCHS) + " |")
        L.append("|---|---|" + "---|" * len(FT_EPOCHS))
        for name in FT_ATTACKS:
            for frac in FT_RESERVES:
                c = [r for r in ft if r["attack"] == name and r["reserve"] == frac]
                if not c:
                    continue
                cells = [f"{_ms([r['asr'] for r in c if r['epochs'] == e])} / {_ms([r['acc'] for r in c if r['epochs'] == e])}"
                         for e in FT_EPOCHS]
                L.append(f"| {name} | {frac:g} ({c[0]['reserve_rows']}) | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def _val(r: dict):
    """ASR of the attack's trigger, or feature collision's targeted success (None for label flip:
    it has no trigger; its effect is the recall drop)."""
    return r["targeted"] if r.get("targeted") is not None else r.get("asr")


def plots(rows, ft) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ATTACKS:
        c = [r for r in rows if r["attack"] == name and r["reg"] == "none" and "error" not in r]
        rates = sorted({r["rate"] for r in c})
        ys = [np.mean([v for r in c if r["rate"] == q for v in [_val(r)] if v is not None] or [np.nan]) for q in rates]
        ax.plot([100 * q for q in rates], [100 * y for y in ys], marker="o", label=name)
    ax.set_xscale("log"); ax.set_xlabel("attack.rate (%)"); ax.set_ylabel("ASR / targeted success (%)")
    ax.set_title("small_cnn, digits, reg none (GPU architectures not run)"); ax.legend(fontsize=7)
    p = OUT / "study_asr_vs_rate.png"; fig.tight_layout(); fig.savefig(p, dpi=100); plt.close(fig); paths.append(p)
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(REGS)
    names = list(ATTACKS)
    for j, reg in enumerate(REGS):
        ys = [np.mean([v for r in rows if r["attack"] == n and r["reg"] == reg and "error" not in r
                       for v in [_val(r)] if v is not None] or [np.nan]) for n in names]
        ax.bar(np.arange(len(names)) + j * w, [100 * y for y in ys], w, label=reg)
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2); ax.set_xticklabels(names, rotation=20, fontsize=7)
    ax.set_ylabel("ASR (%), mean over rates and seeds"); ax.legend(fontsize=7); ax.set_title("ASR per regularisation")
    p = OUT / "study_asr_per_reg.png"; fig.tight_layout(); fig.savefig(p, dpi=100); plt.close(fig); paths.append(p)
    if ft:
        fig, axes = plt.subplots(1, len(FT_ATTACKS), figsize=(9, 3.5))
        for ax, name in zip(np.atleast_1d(axes), FT_ATTACKS):
            for frac in FT_RESERVES:
                c = [r for r in ft if r["attack"] == name and r["reserve"] == frac]
                ax.plot(FT_EPOCHS, [100 * np.mean([r["asr"] for r in c if r["epochs"] == e]) for e in FT_EPOCHS],
                        marker="o", label=f"ASR, reserve {100 * frac:g}%")
                ax.plot(FT_EPOCHS, [100 * np.mean([r["acc"] for r in c if r["epochs"] == e]) for e in FT_EPOCHS],
                        ls="--", label=f"acc, reserve {100 * frac:g}%")
            ax.set_title(name); ax.set_xlabel("fine-tuning epochs"); ax.set_ylabel("%")
        np.atleast_1d(axes)[0].legend(fontsize=6)
        p = OUT / "study_finetune.png"; fig.tight_layout(); fig.savefig(p, dpi=100); plt.close(fig); paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--regs", default=",".join(REGS), help="comma-separated subset of " + ",".join(REGS))
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--mlflow", action="store_true", help="log the table and plots to MLflow (MLFLOW_TRACKING_URI)")
    ap.add_argument("--out", default="study_digits")
    args = ap.parse_args()
    regs = [r for r in args.regs.split(",") if r]
    t0 = time.perf_counter()
    seeds = list(range(args.seeds))
    with ProcessPoolExecutor(args.jobs, initializer=_init) as ex:
        crafted = dict(zip(seeds, ex.map(craft_seed, seeds)))
        print(f"crafted in {time.perf_counter() - t0:.0f} s", flush=True)
        futs = [ex.submit(run_group, reg, s, crafted[s]) for s in seeds for reg in regs]
        ffuts = [] if args.no_finetune else [ex.submit(finetune_curve, s, crafted[s]) for s in seeds]
        rows, ft = [], []
        for f in futs:
            rows += f.result()
            print(f"group done at {time.perf_counter() - t0:.0f} s", flush=True)
        for f in ffuts:
            ft += f.result()
    wall = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    md = report(rows, ft, wall, args)
    (OUT / f"{args.out}.md").write_text(md)
    (OUT / f"{args.out}.json").write_text(json.dumps({"rows": rows, "finetune": ft, "wall_s": wall}, indent=1, default=str))
    paths = plots(rows, ft)
    if args.mlflow:
        import mlflow

        with mlflow.start_run(run_name="study_digits"):
            mlflow.log_artifact(str(OUT / f"{args.out}.md"))
            for p in paths:
                mlflow.log_artifact(str(p))
    print(md)


if __name__ == "__main__":
    main()
