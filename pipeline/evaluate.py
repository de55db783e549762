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

Baseline: the registry's ``<model_name>@champion`` re-evaluated on the current test split, or,
without a champion, the clean twin checkpoint (refused when trained on another snapshot).
Gated metrics come from a plain forward pass, the model as registered; with ``train.tta`` the
TTA accuracy is reported beside as ``accuracy_tta``. Everything is logged into the training run.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pipeline import config as config_mod
from pipeline.io import atomic_write_bytes, atomic_write_text, read_json, write_json

ATTACK_TRIGGER_NAME = "attack"


class EvaluateError(ValueError):
    """Evaluation refused (stale or missing inputs); the message says what to re-run."""


# --------------------------------------------------------------------------- pure parts


def scan_set(scan: Sequence[Any], attack: Optional[Mapping[str, Any]]) -> list[dict]:
    """Trigger specs ``{name, kind, size, location, pattern, alpha, seed, source}`` to measure.

    ``scan``: config ``ScanTrigger``s or dicts. A backdoor ``attack`` (resolved spec) adds its own
    trigger as ``attack`` with ``source`` = the attack's source (None = all-to-one).
    """
    out = []
    for s in scan:
        d = dict(s) if isinstance(s, Mapping) else {k: getattr(s, k) for k in
                                                    ("name", "kind", "size", "location", "pattern", "alpha", "seed")}
        d["source"] = None
        out.append(d)
    if attack and attack.get("name") == "backdoor" and attack.get("trigger"):
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


def _evaluate(model, test_images, test_labels, class_names, scan_specs, attack_spec, batch_size, device, tta):
    """:func:`evaluate_model` and the clean predictions."""
    from pipeline.core.attacks import apply_trigger
    from pipeline.core.predict import predict

    labels = np.asarray(test_labels, np.int64)
    clean = predict(model, test_images, batch_size=batch_size, device=device, tta=tta)
    out = classification_metrics(labels, clean, class_names)
    asr: dict[str, dict[str, float]] = {}
    eligible: dict[str, dict[str, int]] = {}
    for spec in scan_set(scan_specs, attack_spec):
        triggered = apply_trigger(test_images, spec)
        trig = predict(model, triggered, batch_size=batch_size, device=device, tta=tta)
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
    return {k: out[k] for k in order}, clean


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


def confusion_png(confusion: list[list[int]], class_names: Sequence[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    k = len(class_names)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if k <= 20:
        thr = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > thr else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- stage


def _measure(model, cfg, test_images, test_labels, class_names, scan, attack, device) -> tuple[dict, np.ndarray]:
    """Gate metrics of the model as registered and served: a plain forward pass. TTA would average
    a location-specific trigger away and flatter accuracy, so with ``train.tta`` its accuracy is
    only reported beside (``accuracy_tta``), never gated."""
    metrics, pred = _evaluate(model, test_images, test_labels, class_names, scan, attack,
                              cfg.eval.batch_size, device, tta=False)
    if cfg.train.tta:
        from sklearn.metrics import accuracy_score

        from pipeline.core.predict import predict

        tta_pred = predict(model, test_images, batch_size=cfg.eval.batch_size, device=device, tta=True)
        metrics["accuracy_tta"] = float(accuracy_score(test_labels, tta_pred))
    return metrics, pred


def _baseline(cfg, name: str, args, snapshot_id: str, test_images, test_labels, class_names, scan, attack,
              device) -> dict:
    """Champion of the registry (re-evaluated) or, without one, the clean twin checkpoint."""
    from pipeline import tracking

    mv = tracking.get_alias(name, "champion")
    if mv is not None:
        try:
            model = tracking.load_registered_model(name, "champion")
            m, _ = _measure(model, cfg, test_images, test_labels, class_names, scan, attack, device)
            snap = (mv.tags or {}).get("snapshot_id")
            if snap is None and mv.run_id:
                from mlflow import MlflowClient

                snap = MlflowClient().get_run(mv.run_id).data.tags.get("snapshot_id")
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
    from pipeline.core.models import load_checkpoint

    tp = Path(args.twin)
    if not tp.is_file():
        raise EvaluateError(f"no champion for {name} and {tp} not found: run the twin stage")
    try:
        model, ckpt = load_checkpoint(tp)
    except Exception as exc:  # torch raises several types for a damaged file
        raise EvaluateError(f"the twin checkpoint {tp} is unreadable ({type(exc).__name__}: {exc}): "
                            "re-run `dvc repro --force twin`") from exc
    # A twin of an older snapshot is a weaker baseline: refuse it rather than compare against it.
    if ckpt.get("snapshot_id") != snapshot_id or [str(c) for c in ckpt.get("class_names") or []] != list(class_names):
        raise EvaluateError(f"the twin {tp} was trained on snapshot {str(ckpt.get('snapshot_id'))[:12]}, the current "
                            f"snapshot is {snapshot_id[:12]}: re-run `dvc repro twin`")
    m, _ = _measure(model, cfg, test_images, test_labels, class_names, scan, attack, device)
    from pipeline.tracking import file_sha256

    m["model"] = {"checkpoint_sha256": file_sha256(tp), "model_version": None, "run_id": None}
    m["baseline"] = {"kind": "twin", "model_version": None, "run_id": None, "snapshot_id": ckpt.get("snapshot_id")}
    return m


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.params)
    from pipeline import store as store_mod
    from pipeline import view as view_mod
    from pipeline.tracking import file_sha256

    try:
        report = read_json(Path(args.train_report))
    except FileNotFoundError:
        raise EvaluateError(f"{args.train_report} not found: run the train stage") from None
    except ValueError as exc:
        raise EvaluateError(f"{args.train_report} is unreadable ({exc}): re-run `dvc repro --force train`") from exc
    cand = Path(args.candidate)
    if not cand.is_file():
        raise EvaluateError(f"{cand} not found: run the train stage")
    sha = file_sha256(cand)
    if report.get("checkpoint_sha256") != sha:
        raise EvaluateError(f"{cand} does not match {args.train_report} (sha256 differs): re-run the train stage")
    pointer = store_mod.read_pointer(args.pointer)
    snapshot_id = pointer["snapshot_id"]
    meta, _ = view_mod.read_view(args.view)
    if meta["view_id"] != report.get("view_id"):
        raise EvaluateError(f"the candidate was trained on view {str(report.get('view_id'))[:12]}, "
                            f"{args.view} is {meta['view_id'][:12]}: re-run the train stage")
    if report.get("snapshot_id") != snapshot_id:
        raise EvaluateError(f"the candidate was trained on snapshot {str(report.get('snapshot_id'))[:12]}, "
                            f"the current snapshot is {snapshot_id[:12]}: re-run the pipeline")
    attack = meta.get("attack") or None

    snap = store_mod.load_snapshot(args.store, snapshot_id, verify=True)
    test_images, test_labels, _ = snap.split("test")
    class_names = [str(c) for c in snap.class_names]
    del snap
    if len(test_labels) == 0:
        raise EvaluateError(f"snapshot {snapshot_id[:12]} has no test rows: check data.* (test split)")

    from pipeline import tracking
    from pipeline.core.models import load_checkpoint

    import mlflow

    uri = tracking.tracking_uri()
    if report.get("tracking_uri") and report["tracking_uri"] != uri:
        tracking.warn(f"{args.train_report} was written against {report['tracking_uri']}; logging to {uri}")
    mlflow.set_tracking_uri(uri)
    device = cfg.train.device
    model, _ckpt = load_checkpoint(cand)
    scan = list(cfg.eval.scan)
    metrics, pred = _measure(model, cfg, test_images, test_labels, class_names, scan, attack, device)
    metrics["model"] = {"checkpoint_sha256": sha, "model_version": report.get("model_version"),
                        "run_id": report.get("run_id")}
    metrics["snapshot_id"] = snapshot_id
    metrics["view_id"] = meta["view_id"]

    name = report.get("model_name") or config_mod.model_name(cfg)
    base = _baseline(cfg, name, args, snapshot_id, test_images, test_labels, class_names, scan, attack, device)
    base["snapshot_id"] = snapshot_id
    base["view_id"] = meta["view_id"]

    write_json(Path(args.metrics), metrics)
    write_json(Path(args.baseline_metrics), base)
    atomic_write_text(Path(args.per_class), per_class_csv(metrics, base))
    atomic_write_text(Path(args.confusion), confusion_rows_csv(test_labels, pred, class_names))
    atomic_write_bytes(Path(args.confusion_png), confusion_png(
        metrics["confusion"], class_names, f"{name} v{report.get('model_version')}: acc {metrics['accuracy']:.3f}"))

    run_id = report.get("run_id")
    if run_id:
        scalars: dict[str, float] = {
            "accuracy": metrics["accuracy"],
            "baseline_accuracy": base["accuracy"],
        }
        if metrics["asr_max"] is not None:
            scalars["asr_max"] = metrics["asr_max"]
        if base["asr_max"] is not None:
            scalars["baseline_asr_max"] = base["asr_max"]
        for c, m in metrics["per_class"].items():
            scalars[f"recall_{c}"] = m["recall"]
            scalars[f"baseline_recall_{c}"] = base["per_class"][c]["recall"]
        for trig, d in metrics["asr"].items():
            for t, v in d.items():
                if v is not None:
                    scalars[f"asr.{trig}.{t}"] = v
        tracking.log_metrics(run_id, scalars)
        from mlflow import MlflowClient

        MlflowClient().set_tag(run_id, "baseline", base["baseline"]["kind"])
        tracking.log_artifacts(run_id, [args.metrics, args.baseline_metrics, args.per_class, args.confusion,
                                        args.confusion_png], artifact_path="evaluation")
    def fmt(x: Optional[float]) -> str:
        return "undefined" if x is None else f"{x:.3f}"

    print(f"evaluate: accuracy {metrics['accuracy']:.4f} (baseline {base['baseline']['kind']} "
          f"{base['accuracy']:.4f}), asr_max {fmt(metrics['asr_max'])} (baseline {fmt(base['asr_max'])})",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    for opt in ("--store", "--pointer", "--view", "--candidate", "--twin", "--train-report", "--metrics",
                "--baseline-metrics", "--per-class", "--confusion", "--confusion-png"):
        ap.add_argument(opt, required=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    from pipeline.train import guarded

    args = build_parser().parse_args(argv)

    def body(a: argparse.Namespace) -> int:
        try:
            return run(a)
        except EvaluateError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return guarded(body, args)


if __name__ == "__main__":
    sys.exit(main())
