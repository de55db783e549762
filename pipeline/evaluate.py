"""evaluate stage: clean accuracy, per-class metrics and trigger scans for candidate and baseline.

    python -m pipeline.evaluate --params params.yaml --store data/store --pointer data/snapshot.json \
        --view data/view --candidate models/candidate.pt --twin models/twin.pt \
        --train-report reports/train.json --metrics reports/metrics.json \
        --baseline-metrics reports/baseline_metrics.json --per-class reports/per_class.csv \
        --confusion reports/confusion.csv --confusion-png reports/confusion.png

ASR (GUIDE §3) of trigger T for target t: among clean test images whose true class != t and that
the model classifies correctly without the trigger, the fraction predicted t with T applied.
For the configured backdoor's own trigger (scan name ``attack``) a source-specific attack
restricts the images to the source class; the scan set's triggers use every class != t.

Baseline: the registry's champion (``pipeline.tracking.registry.champion``) re-evaluated on the
current test split, or, without a champion, the clean twin checkpoint (refused when trained on
another snapshot). Every input is checked against the train stage's lineage record.
Gated metrics come from a plain forward pass, the model as registered; with ``train.tta`` the
TTA accuracy is reported beside as ``accuracy_tta``. Everything is logged into the training run.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pipeline import stage
from pipeline.io import atomic_write_bytes, atomic_write_text, file_sha256, write_json
from pipeline.lineage import read_train_record, require_lineage
from pipeline.reporting.plots import confusion_png  # noqa: F401 - one confusion renderer (rows = actual)
from pipeline.schema import Config, as_dict, model_name

ATTACK_TRIGGER_NAME = "attack"
PATHS = tuple(stage.PathArg(name, help) for name, help in (
    ("store", "the snapshot store (data/store)"),
    ("pointer", "the current snapshot's pointer (data/snapshot.json)"),
    ("view", "the training view (data/view)"),
    ("candidate", "the candidate checkpoint (models/candidate.pt)"),
    ("twin", "the clean twin checkpoint (models/twin.pt), the baseline without a champion"),
    ("train_report", "the train stage's report and lineage record (reports/train.json)"),
    ("metrics", "the candidate's metrics (reports/metrics.json)"),
    ("baseline_metrics", "the baseline's metrics (reports/baseline_metrics.json)"),
    ("per_class", "per-class precision/recall/F1 with the baseline's recall (reports/per_class.csv)"),
    ("confusion", "one row per test image for `dvc plots` (reports/confusion.csv)"),
    ("confusion_png", "the confusion matrix picture (reports/confusion.png)"),
    ("record", "the evaluation's lineage record with the digests of both metrics files (reports/evaluate.json)"),
    ("plots", "pictures of the attack: ASR heatmap, confusion and samples under the worst trigger (reports/plots)"),
))



class EvaluateError(stage.UserError):
    """Evaluation refused (missing inputs, an unusable baseline); the message says what to re-run."""


# --------------------------------------------------------------------------- pure parts


def scan_set(scan: Sequence[Any], attack: Optional[Mapping[str, Any]]) -> list[dict]:
    """Trigger specs ``{name, kind, size, location, pattern, alpha, seed, source}`` to measure.

    ``scan``: config ``ScanTrigger``s or dicts. A backdoor or label-consistent clean-label
    ``attack`` (resolved spec) adds its own trigger as ``attack`` with ``source`` = the attack's
    source (None = all-to-one, always for label-consistent).
    """
    out = []
    for s in scan:
        d = dict(s) if isinstance(s, Mapping) else as_dict(s)
        d["source"] = None
        out.append(d)
    if attack and attack.get("trigger") and (attack.get("name") == "backdoor" or (
            attack.get("name") == "clean_label" and attack.get("method") == "label_consistent")):
        out = [d for d in out if d["name"] != ATTACK_TRIGGER_NAME]
        out.append({"name": ATTACK_TRIGGER_NAME, **dict(attack["trigger"]), "source": attack.get("source")})
    return out


def asr_from_predictions(
    labels: np.ndarray,
    clean_pred: np.ndarray,
    trig_pred: np.ndarray,
    target: int,
    source: Optional[int] = None,
) -> tuple[Optional[float], int]:
    """``(ASR, eligible count)``: eligible = true != target (and == source when given) and
    correctly classified clean; ASR = fraction of them predicted ``target`` when triggered.

    None when no image is eligible: the rate is undefined, and the gate fails closed on it
    rather than reading it as 0.
    """
    labels = np.asarray(labels)
    eligible = (labels != target) & (clean_pred == labels)
    if source is not None:
        eligible &= labels == source
    n = int(eligible.sum())
    if n == 0:
        return None, 0
    return float((trig_pred[eligible] == target).mean()), n


def classification_metrics(labels: np.ndarray, pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """accuracy, per_class {name: precision, recall, f1, support} and confusion (sklearn)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    k = len(class_names)
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=list(range(k)), zero_division=0)
    cm = confusion_matrix(labels, pred, labels=list(range(k)))
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "per_class": {
            str(class_names[i]): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i in range(k)
        },
        "confusion": cm.astype(int).tolist(),
    }


def evaluate_model(
    model: Any,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    scan_specs: Sequence[Any],
    attack_spec: Optional[Mapping[str, Any]],
    batch_size: int = 512,
    device: str = "auto",
    tta: bool = False,
) -> dict:
    """Metrics of any model taking raw uint8 NCHW batches (candidate, twin, champion).

    Returns ``{accuracy, per_class, asr {trigger: {target name: value}}, asr_max, asr_eligible
    {trigger: {target: n}}, confusion, test_rows}``.
    """
    return _evaluate(model, test_images, test_labels, class_names, scan_specs, attack_spec, batch_size, device, tta)[0]


TRIGGER_CHUNK_ROWS = 8192  # test rows given a trigger at a time: memory holds a chunk, not a triggered split


def _locations(n: int, shape: Sequence[int], spec: Mapping[str, Any]) -> Optional[np.ndarray]:
    """The patch locations ``apply_trigger`` would draw for ``n`` rows at once (None: a blend)."""
    from pipeline.core.attacks import normalize_trigger, resolve_locations

    t = normalize_trigger(spec, tuple(shape))
    return resolve_locations(n, tuple(shape), t) if t["kind"] == "patch" else None


def predict_triggered(model, images, spec: Mapping[str, Any], batch_size: int, device, tta: bool = False,
                      chunk: Optional[int] = None) -> np.ndarray:
    """Predictions on ``images`` (numpy or lazy rows) with the trigger of ``spec`` applied, a chunk
    of rows at a time (issue 19 item 3: the triggered copy of the test split, and a blend's float
    temporaries, are never whole in memory). Random patch locations are resolved once for all
    rows, so the predictions are those of one ``apply_trigger`` over the whole split."""
    from pipeline.core.attacks import apply_trigger
    from pipeline.core.predict import predict

    chunk = chunk or TRIGGER_CHUNK_ROWS
    locs = _locations(len(images), images.shape[1:], spec)
    out = [predict(model, apply_trigger(np.asarray(images[s:s + chunk]), spec, None if locs is None else locs[s:s + chunk]),
                   batch_size=batch_size, device=device, tta=tta) for s in range(0, len(images), chunk)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _evaluate(model, test_images, test_labels, class_names, scan_specs, attack_spec, batch_size, device, tta):
    """:func:`evaluate_model`, the clean predictions and the predictions under each trigger."""
    from pipeline.core.predict import predict

    labels = np.asarray(test_labels, np.int64)
    clean = predict(model, test_images, batch_size=batch_size, device=device, tta=tta)
    out = classification_metrics(labels, clean, class_names)
    asr: dict[str, dict[str, float]] = {}
    eligible: dict[str, dict[str, int]] = {}
    preds: dict[str, np.ndarray] = {}
    for spec in scan_set(scan_specs, attack_spec):
        trig = preds[spec["name"]] = predict_triggered(model, test_images, spec, batch_size, device, tta)
        asr[spec["name"]], eligible[spec["name"]] = {}, {}
        for t, tname in enumerate(class_names):
            if t == spec.get("source"):
                continue  # a source-specific trigger has no images of another class to flip into t
            v, n = asr_from_predictions(labels, clean, trig, t, spec.get("source"))
            asr[spec["name"]][str(tname)] = v
            eligible[spec["name"]][str(tname)] = n
    values = [v for d in asr.values() for v in d.values() if v is not None]
    out.update({
        "asr": asr,
        "asr_max": max(values) if values else None,
        "asr_eligible": eligible,
        "test_rows": int(len(labels)),
    })
    # contract order: accuracy, per_class, asr, asr_max, confusion, ...
    order = ["accuracy", "per_class", "asr", "asr_max", "confusion", "asr_eligible", "test_rows"]
    return {k: out[k] for k in order}, clean, preds


def targeted_metrics(model: Any, attack: Optional[Mapping[str, Any]], test_images: np.ndarray,
                     test_ids: Sequence[str], batch_size: int = 512, device: str = "auto") -> Optional[dict]:
    """Feature collision's targeted success (``{feature_collision: {success_rate, successes,
    n_targets, base_class}}``): the share of the view's target test instances the model reads as
    the base class; None for any other attack. Each target must still be the test row it was
    (sample id and sha256), else the view is stale (EvaluateError)."""
    if not attack or attack.get("name") != "clean_label" or attack.get("method") != "feature_collision":
        return None
    from pipeline.core.clean_label import targeted_success
    from pipeline.core.hashing import sample_hash
    from pipeline.core.predict import predict

    index = {str(s): i for i, s in enumerate(test_ids)}
    rows = []
    for t in attack.get("targets") or []:
        i = index.get(str(t["sample_id"]))
        if i is None or sample_hash(test_images[i]) != t["sha256"]:
            raise EvaluateError(f"feature collision target {t['sample_id']!r} is not that test row of the current "
                                "snapshot: re-run the poison stage (`dvc repro poison`)")
        rows.append(i)
    if not rows:
        raise EvaluateError("a feature_collision view without targets: re-run the poison stage")
    pred = predict(model, test_images[rows], batch_size=batch_size, device=device)
    return {"feature_collision": targeted_success(pred, int(attack["target"]))}


def per_class_csv(metrics: dict, baseline: Optional[dict] = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["class", "precision", "recall", "f1", "support"]
    if baseline:
        head += ["baseline_recall", "recall_drop"]
    w.writerow(head)
    for name, m in metrics["per_class"].items():
        row = [name, f"{m['precision']:.6f}", f"{m['recall']:.6f}", f"{m['f1']:.6f}", m["support"]]
        if baseline:
            br = baseline["per_class"].get(name, {}).get("recall")
            row += ["" if br is None else f"{br:.6f}", "" if br is None else f"{br - m['recall']:.6f}"]
        w.writerow(row)
    return buf.getvalue()


def confusion_rows_csv(labels: np.ndarray, pred: np.ndarray, class_names: Sequence[str]) -> str:
    """One row per test image: ``actual,predicted`` class names (dvc plots confusion template)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["actual", "predicted"])
    for a, p in zip(labels, pred):
        w.writerow([class_names[int(a)], class_names[int(p)]])
    return buf.getvalue()


# --------------------------------------------------------------------------- stage


def _measure(model, cfg, test_images, test_labels, class_names, scan, attack, device
             ) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    """Gate metrics of the model as registered and served: a plain forward pass. TTA would average
    a location-specific trigger away and flatter accuracy, so with ``train.tta`` its accuracy is
    only reported beside (``accuracy_tta``), never gated. Also returns the clean predictions and
    the predictions under each scan trigger (the attack pictures reuse them)."""
    metrics, pred, triggered = _evaluate(model, test_images, test_labels, class_names, scan, attack,
                              cfg.eval.batch_size, device, tta=False)
    if cfg.train.tta:
        from sklearn.metrics import accuracy_score

        from pipeline.core.predict import predict

        tta_pred = predict(model, test_images, batch_size=cfg.eval.batch_size, device=device, tta=True)
        metrics["accuracy_tta"] = float(accuracy_score(test_labels, tta_pred))
    return metrics, pred, triggered


def attack_pictures(out: Path, metrics: dict, base: dict, test_images, test_labels, class_names, scan, attack,
                    clean_pred: np.ndarray, triggered_pred: Mapping[str, np.ndarray], max_asr: float,
                    title: str) -> list[Path]:
    """ASR heatmap (candidate beside baseline), and the confusion matrix and a few samples under the
    worst trigger (the scan trigger x target with the highest candidate ASR): the pictures of the
    attack that a clean confusion matrix hides. Rows of every confusion view are the actual class.
    The predictions are the ones the metrics were computed from (no second pass over the test split)."""
    from pipeline.core.attacks import apply_trigger
    from pipeline.reporting import plots, worst_asr
    from pipeline.reporting.plots import select_samples

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "asr_heatmap.png"]
    atomic_write_bytes(written[0], plots.asr_heatmap_png(metrics, base, max_asr=max_asr))
    worst = worst_asr(metrics)
    if worst is None:
        return written
    trigger, target, value = worst
    spec = next(s for s in scan_set(scan, attack) if s["name"] == trigger)
    labels = np.asarray(test_labels, np.int64)
    trig_pred = triggered_pred[trigger]
    # Only the pictured rows get the trigger (at the locations the ASR was measured with).
    show = select_samples(labels, clean_pred, trig_pred, min(8, len(labels)))
    locs = _locations(len(labels), test_images.shape[1:], spec)
    shown = np.asarray(test_images[show])
    triggered = apply_trigger(shown, spec, None if locs is None else locs[show])
    cm = plots.triggered_confusion(labels, trig_pred, len(class_names))
    what = f"trigger {trigger} (ASR -> {target} {value:.2f})"
    atomic_write_bytes(out / "triggered_confusion.png", plots.confusion_png(cm, class_names, f"{title}: {what}"))
    atomic_write_text(out / "triggered_confusion.csv", confusion_rows_csv(labels, trig_pred, class_names))
    atomic_write_bytes(out / "triggered_samples.png", plots.triggered_samples_png(
        shown, triggered, labels[show], np.asarray(clean_pred)[show], np.asarray(trig_pred)[show], class_names,
        title=f"{title}: {what}"))
    return [*written, out / "triggered_confusion.png", out / "triggered_confusion.csv", out / "triggered_samples.png"]


def _add_targeted(m: dict, model, attack, test_images, test_ids, cfg, device) -> None:
    t = targeted_metrics(model, attack, test_images, list(test_ids), cfg.eval.batch_size, device)
    if t is not None:  # feature collision: success = its targets read as the base class
        m["targeted"] = t


def _baseline(cfg, name: str, args, snapshot_id: str, test_images, test_labels, class_names, scan, attack,
              device, test_ids: Sequence[str] = ()) -> dict:
    """Champion of the registry (re-evaluated) or, without one, the clean twin checkpoint."""
    from pipeline.tracking import registry, runs

    client = runs.client()
    mv = registry.champion(client, name)
    if mv is not None:
        try:
            model, _header = registry.load_version(client, name, str(mv.version))
            m, _, _ = _measure(model, cfg, test_images, test_labels, class_names, scan, attack, device)
            _add_targeted(m, model, attack, test_images, test_ids, cfg, device)
            snap = (mv.tags or {}).get("snapshot_id")
            if snap is None and mv.run_id:
                snap = client.get_run(mv.run_id).data.tags.get("snapshot_id")
            m["model"] = {"checkpoint_sha256": (mv.tags or {}).get("checkpoint_sha256"),
                          "model_version": str(mv.version), "run_id": mv.run_id}
            m["baseline"] = {"kind": "champion", "model_version": str(mv.version), "run_id": mv.run_id,
                             "snapshot_id": snap}
            return m
        except Exception as exc:
            # Fail closed: a champion that cannot be re-evaluated is no reason to compare against
            # the (weaker) clean twin instead.
            raise EvaluateError(
                f"champion {name} v{mv.version} could not be loaded or evaluated ({type(exc).__name__}: {exc}). "
                "Restore its artifacts, or move/delete the `champion` alias deliberately, then re-run `dvc repro`"
            ) from exc
    from pipeline import checkpoints

    tp = Path(args.twin)
    if not tp.is_file():
        raise EvaluateError(f"no champion for {name} and {tp} not found: run the twin stage")
    model, ckpt = checkpoints.load(tp)
    # A twin of an older snapshot is a weaker baseline: refuse it rather than compare against it.
    require_lineage(ckpt, {"snapshot_id": snapshot_id}, what=f"the twin {tp}", against="the current snapshot",
                    fix="re-run `dvc repro twin`")
    if [str(c) for c in ckpt.get("class_names") or []] != list(class_names):
        raise EvaluateError(f"the twin {tp} has classes {ckpt.get('class_names')}, the snapshot {list(class_names)}: "
                            "re-run `dvc repro twin`")
    m, _, _ = _measure(model, cfg, test_images, test_labels, class_names, scan, attack, device)
    _add_targeted(m, model, attack, test_images, test_ids, cfg, device)
    m["model"] = {"checkpoint_sha256": file_sha256(tp), "model_version": None, "run_id": None}
    m["baseline"] = {"kind": "twin", "model_version": None, "run_id": None, "snapshot_id": ckpt.get("snapshot_id")}
    return m


def run(cfg: Config, args: argparse.Namespace) -> dict:
    from pipeline.data import store as store_mod
    from pipeline.data import view as view_mod

    report, lineage = read_train_record(args.train_report)
    cand = Path(args.candidate)
    if not cand.is_file():
        raise EvaluateError(f"{cand} not found: run the train stage")
    sha = file_sha256(cand)
    snapshot_id = store_mod.read_pointer(args.pointer)["snapshot_id"]
    meta, _ = view_mod.read_view(args.view)
    fix = "re-run the train stage (`dvc repro train`)"
    require_lineage({"checkpoint_sha256": sha}, lineage, what=f"{cand}", against=f"{args.train_report}",
                    fix=fix, fields=("checkpoint_sha256",))
    require_lineage(meta, lineage, what=f"the view {args.view}", against=f"the candidate ({args.train_report})",
                    fix=fix, fields=("view_id",))
    require_lineage({"snapshot_id": snapshot_id}, lineage, what="the current snapshot",
                    against=f"the candidate ({args.train_report})", fix=fix, fields=("snapshot_id",))
    attack = meta.get("attack") or None

    # Only the test split is read (issue 19 item 2): the chain and manifest are verified, the packs
    # are not hashed whole; each test row read is checked against its manifest sha256 instead. Its
    # rows stay lazy (issue 19 item 3): each pass reads them a batch at a time.
    test_images, test_labels, test_ids, class_names = store_mod.read_split(args.store, snapshot_id, "test", lazy=True)
    if len(test_labels) == 0:
        raise EvaluateError(f"snapshot {snapshot_id[:12]} has no test rows: check data.* (test split)")

    from pipeline import checkpoints
    from pipeline.tracking import runs

    uri = stage.redact(runs.tracking_uri())
    if report.get("tracking_uri") and report["tracking_uri"] != uri:
        runs.warn(f"{args.train_report} was written against {report['tracking_uri']}; logging to {uri}")
    device = cfg.train.device
    model, _ckpt = checkpoints.load_verified(cand, lineage.checkpoint_sha256, f"{args.train_report}")
    scan = list(cfg.eval.scan)
    metrics, pred, triggered = _measure(model, cfg, test_images, test_labels, class_names, scan, attack, device)
    metrics["model"] = {"checkpoint_sha256": sha, "model_version": report.get("model_version"),
                        "run_id": report.get("run_id")}
    metrics["snapshot_id"] = snapshot_id
    metrics["view_id"] = meta["view_id"]

    name = report.get("model_name") or model_name(cfg)
    base = _baseline(cfg, name, args, snapshot_id, test_images, test_labels, class_names, scan, attack, device,
                     list(test_ids))
    base["snapshot_id"] = snapshot_id
    base["view_id"] = meta["view_id"]
    _add_targeted(metrics, model, attack, test_images, test_ids, cfg, device)
    targeted = metrics.get("targeted")

    write_json(Path(args.metrics), metrics)
    write_json(Path(args.baseline_metrics), base)
    atomic_write_text(Path(args.per_class), per_class_csv(metrics, base))
    atomic_write_text(Path(args.confusion), confusion_rows_csv(test_labels, pred, class_names))
    asr_text = "undefined" if metrics["asr_max"] is None else f"{metrics['asr_max']:.2f}"
    # The title carries the attack's number too: a backdoored model's clean matrix looks perfect.
    atomic_write_bytes(Path(args.confusion_png), confusion_png(
        metrics["confusion"], class_names,
        f"{name} v{report.get('model_version')}: clean acc {metrics['accuracy']:.3f}, max ASR {asr_text}"))

    digests = {"metrics_sha256": file_sha256(args.metrics), "baseline_metrics_sha256": file_sha256(args.baseline_metrics)}
    run_id = report.get("run_id")
    write_json(Path(args.record), {**lineage.to_dict(), "run_id": run_id, "baseline": base["baseline"], **digests})
    attack_pictures(Path(args.plots), metrics, base, test_images, test_labels, class_names, scan, attack, pred,
                    triggered, cfg.gate.max_asr, f"{name} v{report.get('model_version')}")
    if run_id:
        extra = {}
        for key, d in (("eval", metrics), ("baseline", base)):
            for attack_name, t in (d.get("targeted") or {}).items():
                if t.get("success_rate") is not None:
                    extra[f"{key}/targeted_success/{attack_name}"] = t["success_rate"]
        runs.log_metrics(run_id, {**runs.evaluation_metrics(metrics, base), **extra})
        c = runs.client()
        c.set_tag(run_id, "baseline", base["baseline"]["kind"])
        # The gate reads these back: a metrics file edited after this point no longer matches its run.
        c.set_tag(run_id, runs.TAG_METRICS_SHA, digests["metrics_sha256"])
        c.set_tag(run_id, runs.TAG_BASELINE_SHA, digests["baseline_metrics_sha256"])
        runs.log_artifacts(run_id, [args.metrics, args.baseline_metrics, args.per_class, args.confusion,
                                    args.confusion_png, args.record], artifact_path="evaluation")
        runs.log_artifacts(run_id, sorted(Path(args.plots).glob("*")), artifact_path="evaluation/plots")

    def fmt(x: Optional[float]) -> str:
        return "undefined" if x is None else f"{x:.3f}"

    stage.say("evaluate", f"accuracy {metrics['accuracy']:.4f} (baseline {base['baseline']['kind']} "
              f"{base['accuracy']:.4f}), asr_max {fmt(metrics['asr_max'])} (baseline {fmt(base['asr_max'])})")
    if targeted is not None:
        t, bt = targeted["feature_collision"], base["targeted"]["feature_collision"]
        stage.say("evaluate", f"feature collision: {t['successes']}/{t['n_targets']} targets read as "
                  f"{class_names[t['base_class']]} (baseline {bt['successes']}/{bt['n_targets']})")
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("evaluate", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
