"""inspect stage: trigger-agnostic detection of poisoned training rows and a backdoor scan of the models.

    python -m pipeline.inspect --params params.yaml --store data/store --pointer data/snapshot.json \
        --view data/view --candidate models/candidate.safetensors --twin models/twin.safetensors \
        --train-report reports/train.json --suspects reports/suspects.csv --report reports/inspect.json

Runs after train, on the exact candidate, view and snapshot the train stage's lineage record
names (every input is checked against it; the candidate is loaded digest-verified):

1. Poisoned rows: ``core.detect.robust_detect`` in its two-view mode: the candidate's penultimate
   features of the training view against the evaluation split (trusted: the gate already trusts
   it for accuracy and ASR), and the same rows through a *clean model* trained on that split alone
   with as many optimizer steps as the candidate. Per class a tail scan ratio; rows flagged.
2. Label issues: cleanlab's ``find_label_issues`` on ``inspect.kfold``-fold out-of-fold
   probabilities (``core.kfold``: the project's training loop, the candidate's recipe).
3. Backdoor scan (``core.scan``, ``inspect.scan``): a per-target-class anomaly index of the
   candidate and of the baseline (the registry's champion, or the clean twin without one).

Writes reports/suspects.csv (one row per training row: row, sample_id, sha256, class, every
score, flags) and reports/inspect.json (per-class ratios, flag counts, thresholds, mode, scans,
seconds per step, and when the view carries a poison record precision/recall/AUROC against it),
bound to the lineage it inspected and, through the MLflow run's ``poisongate.inspect_sha256``
tag, to its own bytes: the gate's ``poison_suspects`` and ``backdoor_scan`` checks read it.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence

import numpy as np

from pipeline import stage
from pipeline.io import atomic_write_with, file_sha256, write_json
from pipeline.lineage import read_train_record, require_lineage
from pipeline.schema import Config, as_dict, model_name

FORMAT = "poisongate-inspect/1"
PATHS = tuple(stage.PathArg(name, help) for name, help in (
    ("store", "the snapshot store (data/store)"),
    ("pointer", "the current snapshot's pointer (data/snapshot.json)"),
    ("view", "the training view (data/view)"),
    ("candidate", "the candidate checkpoint (models/candidate.safetensors)"),
    ("twin", "the clean twin checkpoint, the scan's baseline without a champion (models/twin.safetensors)"),
    ("train_report", "the train stage's report and lineage record (reports/train.json)"),
    ("suspects", "per-row scores and flags to write (reports/suspects.csv)"),
    ("report", "the inspection report to write (reports/inspect.json)"),
))
SUSPECT_COLUMNS = ("row", "sample_id", "sha256", "class", "label", "suspicion", "outlyingness", "foreignness",
                   "foreignness_candidate", "label_quality", "lgm_nll", "flagged_robust", "label_issue", "flagged",
                   "abnormal_block", "poisoned")
MAX_LISTED = 20  # sample ids a report lists per finding (the suspects file has them all)


class InspectError(stage.UserError):
    """Inspection refused (missing or stale inputs); the message says what to re-run."""


# --------------------------------------------------------------------------- pure parts


def write_suspects_csv(fh: BinaryIO, sample_ids: Sequence[str], sha256: Sequence[Any], labels: np.ndarray,
                       class_names: Sequence[str], scores: dict[str, np.ndarray], flagged: np.ndarray,
                       label_quality: Optional[np.ndarray], label_issue: Optional[np.ndarray],
                       poisoned: Optional[np.ndarray], lgm_nll: Optional[np.ndarray] = None,
                       abnormal_block: Optional[np.ndarray] = None) -> None:
    """reports/suspects.csv (columns ``SUSPECT_COLUMNS``; empty cells where a detector did not run,
    the candidate has no LGM head (``lgm_nll``: train.loss=lgm only) or the view has no poison
    record), written to ``fh`` a row at a time: at 1M rows the text is ~150 MB, which a string
    held whole (and its encoded copy) would add to the stage's peak. ``sha256``: str or ASCII
    bytes (``row_scan``'s array)."""
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    w = csv.writer(text, lineterminator="\n")
    w.writerow(SUSPECT_COLUMNS)
    for i, sid in enumerate(sample_ids):
        issue = None if label_issue is None else bool(label_issue[i])
        h = sha256[i]
        w.writerow([
            i, sid, h.decode() if isinstance(h, bytes) else h, class_names[int(labels[i])], int(labels[i]),
            *(f"{float(scores[k][i]):.6g}" for k in ("suspicion", "outlyingness", "foreignness", "foreignness_candidate")),
            "" if label_quality is None else f"{float(label_quality[i]):.6g}",
            "" if lgm_nll is None else f"{float(lgm_nll[i]):.6g}",
            int(bool(flagged[i])), "" if issue is None else int(issue), int(bool(flagged[i]) or bool(issue)),
            "" if abnormal_block is None else int(bool(abnormal_block[i])),
            "" if poisoned is None else int(bool(poisoned[i])),
        ])
    text.flush()
    text.detach()  # the caller's file stays open (atomic_write_with fsyncs and renames it)


def flagged_with_block(flagged: np.ndarray, block: np.ndarray, labels: np.ndarray, sample_ids: Sequence[str],
                       class_names: Sequence[str]) -> dict:
    """Rows the robust detector flags *and* whose pixels hold an abnormal block (the data gate's
    patch scan): two independent views agreeing on one row. A patch trigger on one row is below
    every rate test (the data gate's, the tail ratios'), but that row is both foreign to its class
    and patched; a clean row rarely is both (calibration: conf/gate ``max_flagged_with_block``)."""
    both = np.flatnonzero(np.asarray(flagged, bool) & np.asarray(block, bool))
    counts: dict[str, int] = {}
    for i in both:
        c = class_names[int(labels[i])]
        counts[c] = counts.get(c, 0) + 1
    return {"rows": int(len(both)), "block_rows": int(np.asarray(block, bool).sum()), "classes": counts,
            "sample_ids": [str(sample_ids[i]) for i in both[:MAX_LISTED]]}


def row_scan(images, v) -> tuple[np.ndarray, np.ndarray]:
    """``(abnormal_block bool (N,), sha256 (N,) S64)`` of every training-view row in one pass,
    a chunk per read so a lazy view stays lazy: the data gate's abnormal-block flag
    (``stats.block_flags_cfg``, the same ``conf/validate`` settings) and the content hash of the
    pixels the candidate trained on (as bytes: 64 B a row, not a 113-B str object)."""
    from pipeline.core.hashing import sample_hashes
    from pipeline.data import stats
    from pipeline.data.rows import take

    n = len(images)
    block = np.zeros(n, bool)
    sha = np.empty(n, "S64")
    for s0 in range(0, n, stats.FEATURE_CHUNK_ROWS):
        chunk = np.asarray(take(images, np.arange(s0, min(n, s0 + stats.FEATURE_CHUNK_ROWS))))
        block[s0:s0 + len(chunk)] = stats.block_flags_cfg(chunk, v)["abnormal_block"].to_numpy(bool)
        sha[s0:s0 + len(chunk)] = sample_hashes(chunk)
    return block, sha


def detection_quality(poisoned: np.ndarray, flagged: np.ndarray, score: np.ndarray) -> dict[str, Optional[float]]:
    """Precision, recall (flags vs the poison record) and AUROC (score vs the record), sklearn.
    AUROC is None when the record holds one class only (every row or no row poisoned)."""
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    y = np.asarray(poisoned, bool)
    f = np.asarray(flagged, bool)
    auroc = float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None
    return {"precision": float(precision_score(y, f, zero_division=0)),
            "recall": float(recall_score(y, f, zero_division=0)), "auroc": auroc,
            "flagged": int(f.sum()), "poisoned": int(y.sum())}


def inspect_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's scalars as MLflow metrics under ``inspect/`` and ``time/inspect_``."""
    out: dict[str, Any] = {
        "inspect/max_tail_ratio": report["max_tail_ratio"],
        "inspect/max_shallow_tail_ratio": report["max_shallow_tail_ratio"],
        "inspect/flagged_rows": report["flagged_rows"],
        "inspect/suspicious_classes": len(report["suspicious_classes"]),
    }
    if report.get("flagged_with_block") is not None:
        out["inspect/flagged_with_block"] = report["flagged_with_block"]["rows"]
        out["inspect/block_rows"] = report["flagged_with_block"]["block_rows"]
    if report.get("label_issue_fraction") is not None:
        out["inspect/label_issues"] = report["label_issues"]
        out["inspect/label_issue_fraction"] = report["label_issue_fraction"]
    for name, scan in (report.get("scan") or {}).items():
        if scan:
            out[f"inspect/scan/{name}/max_anomaly"] = scan["max_anomaly"]
    for cls, row in report["classes"].items():
        out[f"inspect/tail_ratio/{cls}"] = row["tail_ratio"]
    for det, q in ((report.get("poison_record") or {}).get("detectors") or {}).items():
        for k in ("precision", "recall", "auroc"):
            out[f"inspect/{det}/{k}"] = q.get(k)
    for step, s in report["seconds"].items():
        out[f"time/inspect_{step}"] = s
    return {k: float(v) for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------- stage


def _baseline_model(cfg: Config, name: str, twin: Path, snapshot_id: str, candidate_version: Optional[str]):
    """``(model, {kind, model_version})``: the champion (digest-verified from the registry) unless
    the candidate is the champion itself, else the clean twin of this snapshot."""
    from pipeline import checkpoints
    from pipeline.tracking import registry, runs

    mv = registry.champion(runs.client(), name)
    if mv is not None and str(mv.version) != str(candidate_version):
        try:
            model, _ = registry.load_version(runs.client(), name, str(mv.version))
        except Exception as exc:
            # Fail closed, worded as evaluate does: a champion that cannot be loaded is no reason
            # to scan the (weaker) twin instead.
            raise InspectError(
                f"champion {name} v{mv.version} could not be loaded or evaluated ({type(exc).__name__}: {exc}). "
                "Restore its artifacts, or move/delete the `champion` alias deliberately, then re-run `dvc repro`"
            ) from exc
        return model, {"kind": "champion", "model_version": str(mv.version)}
    if not twin.is_file():
        raise InspectError(f"no champion for {name} and {twin} not found: run the twin stage")
    model, header = checkpoints.load(twin)
    require_lineage(header, {"snapshot_id": snapshot_id}, what=f"the twin {twin}", against="the current snapshot",
                    fix="re-run `dvc repro twin`")
    return model, {"kind": "twin", "model_version": None, "checkpoint_sha256": file_sha256(twin)}


def _scan(cfg: Config, model, ref_images, ref_labels, num_classes: int, device: str):
    from pipeline.core import scan

    i = cfg.inspect
    if i.scan == "max_margin":
        return scan.max_margin_scan(model, num_classes, tuple(ref_images.shape[1:]), restarts=i.scan_restarts,
                                    steps=i.scan_steps, lr=i.scan_lr, seed=i.scan_seed, device=device,
                                    mad_floor=i.scan_mad_floor)
    return scan.neural_cleanse_scan(model, ref_images, ref_labels, num_classes, steps=i.scan_steps, lr=i.scan_lr,
                                    seed=i.scan_seed, device=device)


def _cleanlab(cfg: Config, images, labels, num_classes: int, device: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(label_issue bool (N,), label_quality (N,), seconds)``: cleanlab on k-fold OOF probabilities."""
    import dataclasses

    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from pipeline.core.kfold import out_of_fold_probs

    spec = dataclasses.replace(cfg.train, device=device, epochs=cfg.inspect.kfold_epochs or cfg.train.epochs)
    t0 = time.perf_counter()
    probs = out_of_fold_probs(images, labels, num_classes, cfg.model.name, cfg.model.width, spec,
                              k=cfg.inspect.kfold, seed=cfg.train.seed)
    t1 = time.perf_counter()
    present = np.unique(labels)
    if len(present) < 2:
        raise InspectError("cleanlab needs at least 2 classes in the training view")
    issues = find_label_issues(labels, probs, n_jobs=1)
    quality = get_label_quality_scores(labels, probs)
    return np.asarray(issues, bool), np.asarray(quality, np.float64), \
        {"kfold": t1 - t0, "cleanlab": time.perf_counter() - t1}


def run(cfg: Config, args: argparse.Namespace) -> dict:
    from pipeline import checkpoints
    from pipeline.core import inspection
    from pipeline.core.train import resolve_device
    from pipeline.data import stats
    from pipeline.data import store as store_mod
    from pipeline.data import view as view_mod

    t_start = time.perf_counter()
    train_report, lineage = read_train_record(args.train_report)
    cand = Path(args.candidate)
    if not cand.is_file():
        raise InspectError(f"{cand} not found: run the train stage")
    fix = "re-run the train stage (`dvc repro train`)"
    snapshot_id = store_mod.read_pointer(args.pointer)["snapshot_id"]
    require_lineage({"snapshot_id": snapshot_id}, lineage, what="the current snapshot",
                    against=f"the candidate ({args.train_report})", fix=fix, fields=("snapshot_id",))
    candidate, _ = checkpoints.load_verified(cand, lineage.checkpoint_sha256, f"{args.train_report}")
    try:
        device = str(resolve_device(cfg.train.device))
    except RuntimeError as exc:
        raise InspectError(str(exc)) from None

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    # lazy: the pixels are read a batch at a time by each pass over the view (features, k-fold,
    # block scan, hashes), as the train stage does; in memory they were the whole train split
    # twice over at load (issue 19 item 3)
    tv = view_mod.load_training_view(args.view, args.store, verify=True, lazy=True)  # IntegrityError on tamper
    require_lineage(tv, lineage, what=f"the view {args.view}", against=f"the candidate ({args.train_report})",
                    fix=fix, fields=("view_id", "snapshot_id"))
    ref_images, ref_labels, _, _ = store_mod.read_split(args.store, snapshot_id, "test")  # only the test rows
    class_names = [str(c) for c in tv.class_names]
    k = len(class_names)
    labels = np.asarray(tv.labels, np.int64)
    ref_labels = np.asarray(ref_labels, np.int64)
    if len(ref_labels) == 0:
        raise InspectError(f"snapshot {snapshot_id[:12]} has no test rows: the two-view detector needs the "
                           "evaluation split (check data.*)")
    seconds["load"] = time.perf_counter() - t0

    # 1. the clean reference model and the two-view robust detector
    epochs = cfg.inspect.clean_epochs or inspection.matched_epochs(cfg.train.epochs, len(labels), len(ref_labels),
                                                                   cfg.train.batch_size)
    import dataclasses

    spec = dataclasses.replace(cfg.train, device=device)
    t0 = time.perf_counter()
    clean_model = inspection.train_clean_model(ref_images, ref_labels, k, cfg.model.name, cfg.model.width, spec, epochs)
    seconds["clean_model"] = time.perf_counter() - t0
    try:
        det, times = inspection.two_view_detect(candidate, clean_model, tv.images, labels, ref_images, ref_labels, k,
                                                inspection.robust_config(cfg.inspect, device), device=device,
                                                batch_size=cfg.eval.batch_size)
    except ValueError as exc:  # DetectError: a class with too few evaluation rows
        raise InspectError(f"the robust detector refused its input: {exc}") from exc
    seconds.update(times)
    del clean_model

    # 2. cleanlab on out-of-fold probabilities
    issues = quality = None
    if cfg.inspect.kfold:
        issues, quality, times = _cleanlab(cfg, tv.images, labels, k, device)
        seconds.update(times)

    # 3. the backdoor scan of the candidate and the baseline
    name = train_report.get("model_name") or model_name(cfg)
    t0 = time.perf_counter()
    scan_cand = _scan(cfg, candidate, ref_images, ref_labels, k, device)
    seconds["scan_candidate"] = time.perf_counter() - t0
    base_model, base_info = _baseline_model(cfg, name, Path(args.twin), snapshot_id, lineage.model_version)
    t0 = time.perf_counter()
    scan_base = _scan(cfg, base_model, ref_images, ref_labels, k, device)
    seconds["scan_baseline"] = time.perf_counter() - t0

    # 4. the LGM likelihood (issue 13): a candidate trained with train.loss=lgm scores each row by
    # the negative log-likelihood of its labelled class Gaussian, one more per-sample score
    lgm_nll = None
    if cfg.train.loss == "lgm":
        from pipeline.core.losses import lgm_scores

        t0 = time.perf_counter()
        lgm_nll = lgm_scores(candidate, tv.images, labels, batch_size=cfg.eval.batch_size, device=device)
        seconds["lgm_scores"] = time.perf_counter() - t0

    # the report
    poisoned = None
    if tv.poisoned_rows:
        poisoned = np.zeros(len(labels), bool)
        poisoned[np.asarray(tv.poisoned_rows, np.int64)] = True
    t0 = time.perf_counter()
    block, sha = row_scan(tv.images, cfg.validate)
    seconds["block_scan"] = time.perf_counter() - t0  # and the rows' hashes: the same pass
    both = flagged_with_block(det.flagged, block, labels, tv.sample_ids, class_names)
    atomic_write_with(Path(args.suspects), lambda fh: write_suspects_csv(
        fh, tv.sample_ids, sha, labels, class_names, det.scores, det.flagged, quality, issues, poisoned, lgm_nll, block))
    per_class = inspection.class_summary(det, labels, k, issues)
    record = None
    if poisoned is not None:
        dets = {"robust": detection_quality(poisoned, det.flagged, det.primary)}
        if issues is not None:
            dets["cleanlab"] = detection_quality(poisoned, issues, 1.0 - quality)
            dets["any"] = detection_quality(poisoned, det.flagged | issues, det.primary)
        if lgm_nll is not None:  # a score only (no flag rule of its own): its AUROC against the record
            dets["lgm"] = detection_quality(poisoned, np.zeros(len(labels), bool), lgm_nll)
        record = {"rows": int(poisoned.sum()), "detectors": dets}
    seconds["total"] = time.perf_counter() - t_start
    shallow = det.class_stats["tail_ratio_shallow"]
    report = {
        "format": FORMAT,
        **lineage.to_dict(),
        "run_id": train_report.get("run_id"),
        "mode": det.params["mode"],
        "train_rows": int(len(labels)),
        "reference_rows": int(len(ref_labels)),
        "clean_model": {"epochs": int(epochs), "trained_on": "the snapshot's test split", "seed": int(cfg.train.seed)},
        "thresholds": {k2: getattr(cfg.inspect, k2) for k2 in ("class_threshold", "shallow_threshold",
                                                                 "flag_quantile", "suspicious_flag_quantile", "k_ref")},
        "max_tail_ratio": float(np.max(det.class_stat)),
        "max_shallow_tail_ratio": float(np.max(shallow)),
        "suspicious_classes": [class_names[c] for c in det.suspicious],
        "flagged_rows": int(det.flagged.sum()),
        "flagged_with_block": {**both, "detector": stats.detector_settings(cfg.validate)},
        "label_issues": None if issues is None else int(issues.sum()),
        "label_issue_fraction": None if issues is None else float(issues.mean()),
        "cleanlab": None if issues is None else {"k": int(cfg.inspect.kfold),
                                                 "epochs": int(cfg.inspect.kfold_epochs or cfg.train.epochs)},
        "classes": {class_names[c]: per_class[c] for c in range(k)},
        "scan": {"candidate": scan_cand.to_dict(class_names),
                 "baseline": {**scan_base.to_dict(class_names), **base_info}},
        "poison_record": record,
        "seconds": {s: round(v, 3) for s, v in seconds.items()},
        "suspects": str(args.suspects),
        "suspects_sha256": file_sha256(args.suspects),
        "config": as_dict(cfg.inspect),
    }
    write_json(Path(args.report), report)
    digest = file_sha256(args.report)

    run_id = train_report.get("run_id")
    if run_id:
        from pipeline.tracking import runs

        uri = stage.redact(runs.tracking_uri())
        if train_report.get("tracking_uri") and train_report["tracking_uri"] != uri:
            runs.warn(f"{args.train_report} was written against {train_report['tracking_uri']}; logging to {uri}")
        runs.log_metrics(run_id, inspect_metrics(report))
        # The gate reads this back: an inspect report edited after this point no longer matches its run.
        runs.client().set_tag(run_id, runs.TAG_INSPECT_SHA, digest)
        runs.log_artifacts(run_id, [args.report, args.suspects], artifact_path="inspection")

    rec = ""
    if record:
        q = record["detectors"]["robust"]
        rec = f"; vs the poison record ({record['rows']} rows): P {q['precision']:.2f} R {q['recall']:.2f}"
    issues_txt = "" if issues is None else f", cleanlab {int(issues.sum())} label issues"
    issues_txt += f", {both['rows']} flagged with an abnormal pixel block (of {both['block_rows']} with one)"
    stage.say("inspect", f"max tail ratio {report['max_tail_ratio']:.2f} (suspicious: "
              f"{', '.join(report['suspicious_classes']) or 'none'}), {report['flagged_rows']} rows flagged{issues_txt}; "
              f"scan max anomaly {scan_cand.max_anomaly:.2f} (class {class_names[scan_cand.suspect]}; baseline "
              f"{base_info['kind']} {scan_base.max_anomaly:.2f}){rec}; {seconds['total']:.1f} s")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("inspect", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
