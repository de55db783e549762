"""Red-team sweep on digits: poison placed upstream (in the source's first snapshot), the pipeline's own
stages run in-process, and which gate layer blocks each attack.

    python bench/redteam.py [--jobs 2] [--clean 4] [--full] [--every N [--offset K]] [--seed-base S] [--limit N]

Each trial writes an ImageFolder source (the digits train split, some rows poisoned *in the
files*, and the clean test split), composes params.yaml (data=imagefolder, attack=none: the
pipeline is not told about the attack, so its trigger is in no scan set; validate.on_fail=warn and
gate.fail_on_block=false so every layer is measured), and runs snapshot -> poison -> validate ->
twin -> train -> inspect -> evaluate -> gate through each stage's ``main`` in one process, with a
private sqlite MLflow store. There is no champion and the twin is trained on the same poisoned
snapshot: the case the issue reports promoted at ASR 0.98.

Layers (a layer "detects" when it fails a check): data gate = reports/validation.json success
false; inspect = ``poison_suspects``; scan = ``backdoor_scan``; ASR = ``asr_max`` or
``asr_increase``; recall = any ``recall_drop[...]`` or ``accuracy_drop``. Effect: ASR of the
attack's own trigger (GUIDE §3, measured here on the candidate checkpoint) or, for flips and
swaps, the largest recall drop of the affected classes against a clean model of the same seed.
Effective = ASR >= 0.5 or recall drop >= 0.1.

Writes bench/results/redteam_digits.md, redteam_digits.json and the plots redteam_asr_vs_rate.png,
redteam_detection_vs_rate.png.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RATES = (0.01, 0.02, 0.05, 0.10, 0.20)
LOCATIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
STAGES = ("snapshot", "poison", "validate", "twin", "train", "inspect", "evaluate", "gate")
LAYERS = ("data_gate", "inspect", "scan", "asr", "recall")
PLACE = {"first": "the first snapshot", "append": "a later append"}
_W: dict = {}


def build_grid(full: bool) -> tuple[list[dict], list[str]]:
    """The attack grid, cut to ~20 min of 2 cores unless ``full``; and what was cut."""
    grid, cut = [], []
    i = 0
    for mode in ("all_to_one", "source"):
        for li, loc in enumerate(LOCATIONS):
            for size in (1, 2, 3, 4):
                rates = RATES if full else (RATES[(li + size + (mode == "source")) % len(RATES)],)
                for r in rates:
                    s = (3 * i + 1) % 10
                    t = (7 * i + 2) % 10
                    t = (t + 1) % 10 if t == s else t
                    grid.append({"kind": "patch", "mode": mode, "location": loc, "size": size, "rate": r,
                                 "source": s if mode == "source" else None, "target": t})
                    i += 1
        for alpha in (0.05, 0.1, 0.2, 0.3):
            for r in (RATES if full else RATES[1::2] if alpha >= 0.1 else (RATES[-1],)):
                s, t = (3 * i + 1) % 10, (7 * i + 2) % 10
                t = (t + 1) % 10 if t == s else t
                grid.append({"kind": "blend", "mode": mode, "alpha": alpha, "rate": r,
                             "source": s if mode == "source" else None, "target": t})
                i += 1
    for r in (RATES if full else (0.10, 0.20)):
        grid.append({"kind": "flip", "mode": "source", "rate": r, "source": 1, "target": 7})
        grid.append({"kind": "swap", "mode": "source", "rate": r, "source": 3, "target": 8})
    if not full:
        cut = ["patches: each location x size x mode at one rate (rates rotate), not all 5",
               "blends: alpha 0.05 at 20% only, alpha >= 0.1 at 2%, 10% (not all 5 rates)",
               "flip and swap: 10% and 20% only (lower rates never reached a recall drop of 0.1 on digits: "
               "bench/results/detect_samples.md)",
               "placement: first snapshot only (the case the issue reports promoted); a later append is not run",
               "one seed per cell"]
    return grid, cut


def _trigger(t: dict, seed: int) -> dict:
    if t["kind"] == "patch":
        return {"kind": "patch", "size": t["size"], "location": t["location"], "pattern": "white", "alpha": 0.1,
                "seed": seed}
    return {"kind": "blend", "size": 3, "location": "center", "pattern": "noise", "alpha": t["alpha"], "seed": seed}


def _init() -> None:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(1)
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    os.environ["POISONGATE_TRACEBACK"] = "0"
    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    _W["xtr"], _W["xte"], _W["ytr"], _W["yte"] = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)


def poisoned_train(t: dict | None, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from pipeline.core.attacks import poison

    x, y = _W["xtr"], _W["ytr"]
    ids = [f"r{i}" for i in range(len(y))]
    names = [str(i) for i in range(10)]
    xi, yi, pm = x.copy(), y.copy(), np.zeros(len(y), bool)
    if t is None:
        return xi, yi, pm
    if t["kind"] in ("patch", "blend"):
        passes = [{"name": "backdoor", "source": t["source"], "target": t["target"], "rate": t["rate"], "seed": seed,
                   "trigger": _trigger(t, seed)}]
    elif t["kind"] == "flip":
        passes = [{"name": "label_flip", "source": t["source"], "target": t["target"], "rate": t["rate"], "seed": seed}]
    else:
        passes = [{"name": "label_flip", "source": t["source"], "target": t["target"], "rate": t["rate"], "seed": seed},
                  {"name": "label_flip", "source": t["target"], "target": t["source"], "rate": t["rate"], "seed": seed + 1}]
    pos = {s: i for i, s in enumerate(ids)}
    for spec in passes:
        nx, ny, recs = poison(x, y, ids, spec, names)
        rows = np.array([pos[r["sample_id"]] for r in recs], np.int64)
        if len(rows):
            xi[rows], yi[rows], pm[rows] = nx[rows], ny[rows], True
    return xi, yi, pm


CLEAN_SEED0 = 1000  # job seed of the first clean run: clean run i trains with seed i + --first-clean-seed


def _append_rows(pm: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Rows of the later append: every poisoned row, then random clean rows up to ``size``."""
    rng = np.random.default_rng(10_000 + seed)
    clean = np.flatnonzero(~pm)
    extra = max(0, size - int(pm.sum()))
    keep = pm.copy()
    keep[rng.choice(clean, size=min(extra, len(clean)), replace=False)] = True
    return keep


def _write(root: Path, x: np.ndarray, y: np.ndarray, split: str, keep: np.ndarray | None = None) -> None:
    from PIL import Image

    for i, (img, c) in enumerate(zip(x, y)):
        if keep is not None and not keep[i]:
            continue
        d = root / split / str(int(c))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(d / f"r{i:05d}.png")


STAGE_ARGS = {
    "snapshot": ["--store", "data/store", "--pointer", "data/snapshot.json", "--report", "reports/snapshot.json"],
    "poison": ["--pointer", "data/snapshot.json", "--store", "data/store", "--out", "data/view"],
    "validate": ["--pointer", "data/snapshot.json", "--store", "data/store", "--view", "data/view", "--approved",
                 "data/approved", "--report", "reports/validation.json", "--docs", "reports/gx", "--validated",
                 "data/validated.json"],
    "twin": ["--store", "data/store", "--pointer", "data/snapshot.json", "--checkpoint", "models/twin.safetensors",
             "--report", "reports/twin.json"],
    "train": ["--store", "data/store", "--view", "data/view", "--validated", "data/validated.json", "--checkpoint",
              "models/candidate.safetensors", "--report", "reports/train.json", "--history", "reports/train_history.json"],
    "inspect": ["--store", "data/store", "--pointer", "data/snapshot.json", "--view", "data/view", "--candidate",
                "models/candidate.safetensors", "--twin", "models/twin.safetensors", "--train-report",
                "reports/train.json", "--suspects", "reports/suspects.csv", "--report", "reports/inspect.json"],
    "evaluate": ["--store", "data/store", "--pointer", "data/snapshot.json", "--view", "data/view", "--candidate",
                 "models/candidate.safetensors", "--twin", "models/twin.safetensors", "--train-report",
                 "reports/train.json", "--metrics", "reports/metrics.json", "--baseline-metrics",
                 "reports/baseline_metrics.json", "--per-class", "reports/per_class.csv", "--confusion",
                 "reports/confusion.csv", "--confusion-png", "reports/confusion.png", "--record",
                 "reports/evaluate.json", "--plots", "reports/plots"],
    "gate": ["--metrics", "reports/metrics.json", "--baseline-metrics", "reports/baseline_metrics.json",
             "--validated", "data/validated.json", "--train-report", "reports/train.json", "--evaluation",
             "reports/evaluate.json", "--report", "reports/gate.json", "--summary", "reports/gate.md",
             "--validation", "reports/validation.json", "--docs", "reports/gx", "--plots", "reports/plots",
             "--confusion-png", "reports/confusion.png", "--html", "reports/release.html", "--summary-metrics",
             "reports/summary.json", "--inspection", "reports/inspect.json"],
}


def run_pipeline(root: Path, src: Path, seed: int) -> dict[str, float]:
    """Every stage's ``main`` in ``root``; seconds per stage. Raises on a stage error (exit 2)."""
    import importlib

    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils

    from pipeline import config

    cfg = config.compose(["data=imagefolder", f"data.path={src}", "data.workers=1", "train.device=cpu",
                          f"train.seed={seed}", "mlflow.system_metrics=false", "validate.on_fail=warn",
                          "validate.docs=false", "gate.fail_on_block=false"])
    (root / "params.yaml").write_text(config.to_yaml(cfg))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    utils._artifact_repos_cache.clear()
    if MlflowClient(tracking_uri=uri).get_experiment_by_name("poisongate") is None:  # a second release reuses it
        MlflowClient(tracking_uri=uri).create_experiment("poisongate", artifact_location=(root / "mlartifacts").as_uri())
    times = {}
    os.chdir(root)
    try:
        for stage in STAGES:
            mod = importlib.import_module(f"pipeline.{stage}")
            t0 = time.perf_counter()
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = mod.main(["--params", "params.yaml", *STAGE_ARGS[stage]])
            times[stage] = time.perf_counter() - t0
            if rc not in (0,) and not (stage == "gate" and rc == 1):
                raise RuntimeError(f"{stage} exited {rc}: {err.getvalue()[-1500:]}")
    finally:
        os.chdir(old)
    return times


def trial(job: tuple[int, dict | None]) -> dict:
    from pipeline import checkpoints
    from pipeline.core.attacks import apply_trigger
    from pipeline.core.predict import predict
    from pipeline.evaluate import asr_from_predictions

    seed, t, placement, append_size = job
    out: dict = {"seed": seed, "attack": t, "clean": t is None, "placement": placement}
    tmp = Path(tempfile.mkdtemp(prefix="redteam-"))
    try:
        x, y, pm = poisoned_train(t, seed)
        out["poison_rows"] = int(pm.sum())
        src = tmp / "src"
        root = tmp / "repo"
        (root / "data").mkdir(parents=True)
        (root / "reports").mkdir()
        (root / "models").mkdir()
        _write(src, _W["xte"], _W["yte"], "test")
        # attacks: train seeds 0-4 (paired with the clean references below); clean runs: one train
        # seed each (CLEAN_SEED0 + i -> i), so N clean runs are N different models
        out["train_seed"] = seed % 5 if t is not None else seed - CLEAN_SEED0
        t0 = time.perf_counter()
        if placement == "first":
            _write(src, x, y, "train")
        else:  # a clean first release (the champion), then an append that carries every poisoned row
            in_append = _append_rows(pm, append_size, seed)
            _write(src, x, y, "train", keep=~in_append)
            out["first_release"] = run_pipeline(root, src, out["train_seed"])
            first_gate = json.loads((root / "reports/gate.json").read_text())
            out["first_passed"] = bool(first_gate["passed"])
            _write(src, x, y, "train", keep=in_append)
            out["append_rows"] = int(in_append.sum())
        out["time"] = run_pipeline(root, src, out["train_seed"])
        out["wall"] = time.perf_counter() - t0
        gate = json.loads((root / "reports/gate.json").read_text())
        failed = {c["name"] for c in gate["checks"] if not c["passed"]}
        val = json.loads((root / "reports/validation.json").read_text())
        out["layers"] = {
            "data_gate": val.get("success") is not True,
            "inspect": "poison_suspects" in failed,
            "scan": "backdoor_scan" in failed,
            "asr": bool({"asr_max", "asr_increase"} & failed),
            "recall": any(f.startswith("recall_drop[") or f == "accuracy_drop" for f in failed),
        }
        out["blocked"] = not gate["passed"]
        out["failed"] = sorted(failed)
        insp = json.loads((root / "reports/inspect.json").read_text())
        out["inspect"] = {"max_tail": insp["max_tail_ratio"], "scan": insp["scan"]["candidate"]["max_anomaly"],
                          "scan_class": insp["scan"]["candidate"]["suspect_class"],
                          "record": insp.get("poison_record")}
        model, _ = checkpoints.load(root / "models/candidate.safetensors")
        xte, yte = _W["xte"], _W["yte"]
        clean = predict(model, xte, device="cpu")
        out["accuracy"] = float((clean == yte).mean())
        if t is not None and t["kind"] in ("patch", "blend"):
            trig = predict(model, apply_trigger(xte, _trigger(t, seed)), device="cpu")
            out["asr"], _ = asr_from_predictions(yte, clean, trig, t["target"], t["source"])
        elif t is not None:
            twin, _ = checkpoints.load(root / "models/twin.safetensors")  # trained on the same poisoned rows
            from pipeline.core.train import TrainSpec, train_model

            ref, _, _ = train_model(_W["xtr"], _W["ytr"], 10, "small_cnn", 32,
                                    TrainSpec(epochs=10, batch_size=64, optimizer="adam", lr=0.003,
                                              schedule="onecycle", seed=seed % 5, device="cpu"))
            rp = predict(ref, xte, device="cpu")
            aff = [t["source"]] if t["kind"] == "flip" else [t["source"], t["target"]]
            out["recall_drop"] = float(max((rp[yte == c] == c).mean() - (clean[yte == c] == c).mean() for c in aff))
        out["effective"] = (out.get("asr") or 0) >= 0.5 or (out.get("recall_drop") or 0) >= 0.1
    except Exception as exc:  # noqa: BLE001 - a failed trial is reported, not hidden
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def label(t: dict | None) -> str:
    if t is None:
        return "clean"
    who = "all" if t["source"] is None else str(t["source"])
    if t["kind"] == "patch":
        return f"patch {t['size']}px {t['location']} {who}->{t['target']}"
    if t["kind"] == "blend":
        return f"blend a={t['alpha']} {who}->{t['target']}"
    return f"{t['kind']} {t['source']}{'->' if t['kind'] == 'flip' else '<->'}{t['target']}"


def family(t: dict) -> str:
    return f"{t['kind']}_{'all_to_one' if t['source'] is None else 'source'}" if t["kind"] in ("patch", "blend") else t["kind"]


def plots(trials: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = [t for t in trials if not t["clean"] and "error" not in t]
    fams = sorted({family(t["attack"]) for t in att})
    paths = [out.with_name(out.name + "_asr_vs_rate.png"), out.with_name(out.name + "_detection_vs_rate.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for f in fams:
        pts = sorted((t["attack"]["rate"], t.get("asr", t.get("recall_drop"))) for t in att if family(t["attack"]) == f)
        rates = sorted({p[0] for p in pts})
        ax.plot(rates, [np.mean([v for r, v in pts if r == rr and v is not None] or [np.nan]) for rr in rates], "o-", label=f)
    ax.set_xscale("log"); ax.set_xlabel("poison rate (fraction of affected rows)"); ax.set_ylabel("ASR (flip/swap: recall drop)")
    ax.axhline(0.5, color="grey", ls=":"); ax.legend(fontsize=7); ax.set_title("Attack effect vs rate (digits)")
    fig.tight_layout(); fig.savefig(paths[0], dpi=110); plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    rates = sorted({t["attack"]["rate"] for t in att})
    for layer in (*LAYERS, "blocked"):
        ys = []
        for r in rates:
            eff = [t for t in att if t["attack"]["rate"] == r and t["effective"]]
            ys.append(np.mean([t["blocked"] if layer == "blocked" else t["layers"][layer] for t in eff]) if eff else np.nan)
        ax.plot(rates, ys, "o-", label=layer, lw=2.5 if layer == "blocked" else 1)
    ax.set_xscale("log"); ax.set_xlabel("poison rate"); ax.set_ylabel("share of effective attacks detected")
    ax.set_ylim(-0.05, 1.05); ax.legend(fontsize=7); ax.set_title("Detection per gate layer vs rate (effective attacks)")
    fig.tight_layout(); fig.savefig(paths[1], dpi=110); plt.close(fig)
    return paths


def report(trials: list[dict], cut: list[str], wall: float, args) -> str:
    ok = [t for t in trials if "error" not in t]
    clean = [t for t in ok if t["clean"]]
    att = [t for t in ok if not t["clean"]]
    eff = [t for t in att if t["effective"]]
    places = sorted({t["placement"] for t in ok})
    lines = [f"# Red-team sweep on digits: upstream poison, placed in: {', '.join(PLACE[p] for p in places)} "
             "(issue 12, deliverable 4)", "",
             f"Machine: {platform.machine()} CPU box, 2 cores shared with other jobs, one torch thread per process, "
             f"`--jobs {args.jobs}`. Every stage in-process (`bench/redteam.py`), conf defaults (small_cnn, 10 epochs), "
             f"data=imagefolder (the digits split written as PNGs; poison written into the files), attack=none, "
             f"validate.on_fail=warn, gate.fail_on_block=false. Trials: {len(att)} attacks + {len(clean)} clean; "
             f"errors: {len(trials) - len(ok)}. Wall {wall / 60:.1f} min.", "",
             f"Command: `python bench/redteam.py {' '.join(sys.argv[1:])}`", "",
             "Cut from the issue's grid:", *[f"- {c}" for c in cut], "",
             "Placement `append`: a clean first release (it becomes champion) from the train rows outside the "
             "append, then one append that carries every poisoned row (plus clean rows up to "
             f"{args.append_size} rows for an attack; clean runs cycle through {args.clean_append_sizes} rows); "
             "the layers are read on the second release, judged against the first one as champion.", ""]
    for place in places:
        pa = [t for t in att if t["placement"] == place]
        pe = [t for t in pa if t["effective"]]
        lines += [f"## Detection per gate layer, {PLACE[place]} (effective attacks: ASR >= 0.5 or recall drop >= 0.1)", "",
                  "| family | effective / run | data gate | inspect | scan | ASR (scan set) | recall | blocked (any check) |",
                  "|---|---|---|---|---|---|---|---|"]
        for f in sorted({family(t["attack"]) for t in pa}):
            run = [t for t in pa if family(t["attack"]) == f]
            e = [t for t in run if t["effective"]]
            cells = [f"{sum(t['layers'][l] for t in e)}/{len(e)}" for l in LAYERS] if e else ["—"] * len(LAYERS)
            lines.append(f"| {f} | {len(e)} / {len(run)} | {' | '.join(cells)} | {sum(t['blocked'] for t in e)}/{len(e)} |")
        if pe:
            lines.append(f"| **all** | {len(pe)} / {len(pa)} | " + " | ".join(
                f"{sum(t['layers'][l] for t in pe)}/{len(pe)}" for l in LAYERS) + f" | **{sum(t['blocked'] for t in pe)}/{len(pe)}** |")
        pc = [t for t in clean if t["placement"] == place]
        lines += ["", f"**Clean runs, {PLACE[place]}: {sum(t['blocked'] for t in pc)}/{len(pc)} blocked** "
                  f"(failed checks: {', '.join(sorted({f for t in pc for f in t['failed']})) or 'none'}).", ""]
        if place == "append" and pc:
            lines += ["| clean append rows | runs | blocked | first release passed |", "|---|---|---|---|"]
            for n in sorted({t["append_rows"] for t in pc}):
                g = [t for t in pc if t["append_rows"] == n]
                lines.append(f"| {n} | {len(g)} | {sum(t['blocked'] for t in g)} | {sum(t['first_passed'] for t in g)}/{len(g)} |")
            lines.append("")
    lines += ["Clean false blocks of the inspect checks alone over clean models: bench/results/calibrate_inspect.md, "
              "bench/results/calibrate_scan.md.", "",
              "## Every trial", "", "| placement | attack | rate | rows | effect | eff | acc | max tail | scan (class) | robust P/R | failed checks |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(ok, key=lambda t: (t["placement"], t["clean"], label(t["attack"]), (t["attack"] or {}).get("rate", 0))):
        eff_v = t.get("asr", t.get("recall_drop"))
        rec = ((t["inspect"].get("record") or {}).get("detectors") or {}).get("robust")
        pr = f"{rec['precision']:.2f}/{rec['recall']:.2f}" if rec else "—"
        rows = t["poison_rows"] if t["placement"] == "first" else f"{t['poison_rows']} of {t['append_rows']}"
        lines.append(f"| {t['placement']} | {label(t['attack'])} | {(t['attack'] or {}).get('rate', '—')} | {rows} | "
                     f"{'—' if eff_v is None else f'{eff_v:.2f}'} | {'yes' if t.get('effective') else 'no'} | {t['accuracy']:.3f} | "
                     f"{t['inspect']['max_tail']:.2f} | {t['inspect']['scan']:.2f} ({t['inspect']['scan_class']}) | {pr} | "
                     f"{', '.join(t['failed']) or 'none'} |")
    for t in trials:
        if "error" in t:
            lines.append(f"\nerror in {label(t['attack'])} rate {(t['attack'] or {}).get('rate')}: {t['error'][:300]}")
    steps = {}
    for t in ok:
        for k, v in t["time"].items():
            steps.setdefault(k, []).append(v)
    lines += ["", "## Seconds per stage (in-process, noisy)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {np.mean(v):.2f} ± {np.std(v):.2f} |" for k, v in steps.items()]
    return "\n".join(lines) + "\n"


def combine(args) -> int:
    """``--combine``: the report and plots of the trials of several runs, as one."""
    res = []
    for f in args.combine:
        res += json.loads(Path(f).read_text())
    _, cut = build_grid(False)
    cut = [c for c in cut if not c.startswith("placement:")]
    cut.append(f"combined from {', '.join(Path(f).name for f in args.combine)} (each one's own report gives its "
               "command and its grid cut)")
    out = Path(args.out)
    import re

    text = re.sub(r"Wall [0-9.]+ min\.", "Wall: in each run's own report.", report(res, cut, 0.0, args), count=1)
    out.with_suffix(".md").write_text(text)
    if [t for t in res if "error" not in t and not t["clean"]]:
        plots(res, out)
    print(text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--clean", type=int, default=4)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="run only the first N attack trials (smoke)")
    ap.add_argument("--every", type=int, default=1, help="run every N-th attack trial of the grid (time budget)")
    ap.add_argument("--offset", type=int, default=0,
                    help="with --every N: start at this trial of the grid (0..N-1), so N runs cover the whole grid")
    ap.add_argument("--seed-base", type=int, default=0,
                    help="attack seed of the first trial (trial i poisons with seed base + i): other poison draws")
    ap.add_argument("--placement", choices=("first", "append", "both"), default="first",
                    help="poison in the first snapshot, in a later append after a clean first release, or both")
    ap.add_argument("--append-size", type=int, default=300,
                    help="rows of the later append for an attack trial (its poisoned rows plus clean ones)")
    ap.add_argument("--clean-append-sizes", default="20,50,100,200,500",
                    help="append sizes the clean runs cycle through (placement append)")
    ap.add_argument("--first-clean-seed", type=int, default=0, help="train seed of the first clean run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "redteam_digits"))
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="no trials: one report of the trials of several runs' JSON files (e.g. the --offset runs "
                         "that together cover a grid)")
    args = ap.parse_args()
    if args.combine:
        return combine(args)
    grid, cut = build_grid(args.full)
    placements = ("first", "append") if args.placement == "both" else (args.placement,)
    if args.placement != "first":
        cut = [c for c in cut if not c.startswith("placement:")]
    if args.placement == "append":
        cut.append("placement: a later append only (a clean first release, then the append; --placement append)")
    if not 0 <= args.offset < max(args.every, 1):
        ap.error(f"--offset must be in 0..{max(args.every, 1) - 1}")
    if args.every > 1:
        grid = grid[args.offset:: args.every]
        cut.append(f"--every {args.every} --offset {args.offset}: every {args.every}-th trial of the grid above, "
                   f"from trial {args.offset} ({len(grid)} trials)")
    if args.limit:
        grid = grid[: args.limit]
        cut.append(f"--limit {args.limit}: only the first {args.limit} attack trials of the grid")
    sizes = [int(v) for v in args.clean_append_sizes.split(",")]
    jobs = [(CLEAN_SEED0 + args.first_clean_seed + i, None, p, sizes[i % len(sizes)])
            for p in placements for i in range(args.clean)]
    jobs += [(args.seed_base + i, t, p, args.append_size) for p in placements for i, t in enumerate(grid)]
    t0 = time.perf_counter()
    res = []
    with mp.get_context("spawn").Pool(args.jobs, initializer=_init, maxtasksperchild=8) as pool:
        for o in pool.imap_unordered(trial, jobs):
            res.append(o)
            print(f"[{len(res)}/{len(jobs)}] {o['placement']} {label(o['attack'])} {(o['attack'] or {}).get('rate', '')}: "
                  f"{o.get('error') or (o.get('asr', o.get('recall_drop')), o.get('failed'))}", flush=True)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    text = report(res, cut, wall, args)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    ok = [t for t in res if "error" not in t and not t["clean"]]
    if ok:
        pngs = plots(res, out)
        try:  # also into MLflow (the issue asks for it): one run in the default store of the repo
            import mlflow

            os.environ.pop("MLFLOW_TRACKING_URI", None)
            mlflow.set_tracking_uri(f"sqlite:///{REPO / 'mlflow.db'}")
            mlflow.set_experiment("poisongate-redteam")
            with mlflow.start_run(run_name="redteam_digits"):
                for p in [*pngs, out.with_suffix(".md")]:
                    mlflow.log_artifact(str(p))
        except Exception as exc:  # noqa: BLE001
            print(f"MLflow logging skipped: {exc}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
