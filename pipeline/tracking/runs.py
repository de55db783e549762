"""MLflow runs: tracking URI, one client, run tags, params, metrics, artifacts (mlflow imported lazily).

Tracking URI: ``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db`` (the repository root when
run by DVC): a real store with a model registry, no server needed. One run per pipeline
execution: train creates it; evaluate and gate log into it (its id is in reports/train.json).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from pipeline.io import file_sha256
from pipeline.errors import UserError

SYSTEM_METRICS_INTERVAL_S = 2.0  # sampling period of system metrics (mlflow's default is 10 s)
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
# mlflow.data dataset digests are stored in a VARCHAR(36) column: the view id is cut to fit
# (the full ids are the dataset input's `view_id`/`snapshot_id` tags and the run's tags).
DIGEST_CHARS = 36
# The evaluate stage records the digests of the metrics files it wrote on the run; the gate
# compares them with the files it reads (a hand-edited report no longer matches its run).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TAG_METRICS_SHA = "poisongate.metrics_sha256"
TAG_BASELINE_SHA = "poisongate.baseline_metrics_sha256"
TAG_INSPECT_SHA = "poisongate.inspect_sha256"  # the inspect stage's report (gate: evidence_binding)


class TrackingError(UserError):
    """The tracking server or registry refused an operation (message says what to check)."""


def tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def cap_retries() -> None:
    """An unreachable tracking server must fail within seconds, not after MLflow's default minutes
    of retries (set before mlflow talks to a server; the user's own settings win): at most 2
    attempts of 10 s each, 1 s apart, so a dead server is reported in about 20 s."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    if not os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        from pipeline.console import progress_enabled

        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true" if progress_enabled() else "false"


def probe(experiment: str) -> None:
    """Fail fast, before any long work, when the tracking store cannot be used (dead server,
    corrupt sqlite file, wrong credentials): one cheap read with the capped retries."""
    cap_retries()
    from pipeline.errors import redact

    uri = redact(tracking_uri())
    try:
        client().get_experiment_by_name(experiment)
    except Exception as exc:  # noqa: BLE001 - every failure here means the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"the tracking store {uri} cannot be used ({type(exc).__name__}: {redact(first)[:300]}): "
                            "start the server or fix MLFLOW_TRACKING_URI (a corrupt mlflow.db: restore or move it "
                            "aside); nothing was trained") from None


def client():
    """The one MlflowClient of a stage, on :func:`tracking_uri` for tracking and registry."""
    cap_retries()
    from mlflow import MlflowClient

    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def configure(experiment: str) -> str:
    """Point mlflow at :func:`tracking_uri` and ``experiment`` (created if missing); its id."""
    cap_retries()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.set_experiment(experiment)
    if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        # MLflow 3's UI opens an experiment of unknown kind on its (empty) GenAI overview; this
        # kind opens the runs table, where the verdicts are.
        client().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def dvc_lock_sha256(path: str | Path = "dvc.lock") -> str:
    p = Path(path)
    return file_sha256(p) if p.is_file() else "absent"


def run_tags(snapshot_id: str, view_id: Optional[str], attack: str, **extra: Any) -> dict[str, str]:
    """The identity tags every training run carries (design.md)."""
    tags = {
        "git_commit": git_commit(),
        "dvc_lock_sha256": dvc_lock_sha256(),
        "snapshot_id": snapshot_id,
        "view_id": view_id or "",
        "attack": attack,
    }
    tags.update({k: str(v) for k, v in extra.items()})
    return tags


def log_params(run_id: str, params: Mapping[str, str]) -> None:
    """All params in batches (log_batch takes at most 100 params per call)."""
    from mlflow.entities import Param

    c = client()
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """A dict of scalars in one batch call (non-finite and None values are skipped)."""
    import math

    rows = [(k, float(v), step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    _log_metric_rows(run_id, rows)


def log_history(run_id: str, history: Sequence[Mapping[str, float]], prefix: str = "train/") -> None:
    """Per-epoch rows (``epoch`` + values) as ``train/<key>`` metrics with step = epoch, batched.

    Metric names use ``/`` namespaces (``train/``, ``asr/<trigger>/<target>``, ``recall/<class>``,
    ``gate/``): the MLflow UI groups its charts by them."""
    rows = []
    for row in history:
        step = int(row["epoch"])
        for k, v in row.items():
            if k != "epoch":
                rows.append((f"{prefix}{k}", float(v), step))
    _log_metric_rows(run_id, rows)


def evaluation_metrics(metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float]:
    """The evaluate stage's scalars in namespaces: ``eval/accuracy``, ``recall/<class>``,
    ``asr/<trigger>/<target>``, and the baseline's under ``baseline/``."""
    out: dict[str, float] = {"eval/accuracy": metrics["accuracy"], "baseline/accuracy": baseline["accuracy"]}
    if metrics.get("asr_max") is not None:
        out["eval/asr_max"] = metrics["asr_max"]
    if baseline.get("asr_max") is not None:
        out["baseline/asr_max"] = baseline["asr_max"]
    for c, m in metrics["per_class"].items():
        out[f"recall/{c}"] = m["recall"]
        out[f"baseline/recall/{c}"] = baseline["per_class"][c]["recall"]
    for trig, d in metrics["asr"].items():
        for t, v in d.items():
            if v is not None:
                out[f"asr/{trig}/{t}"] = v
    return out


def _log_metric_rows(run_id: str, rows: Iterable[tuple[str, float, int]]) -> None:
    import time

    from mlflow.entities import Metric

    c = client()
    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(k), v, now, s) for k, v, s in rows]
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        c.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])


def metric_key(name: str) -> str:
    """MLflow keys allow alphanumerics, _ - . space / : anything else becomes _."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def log_view_input(view: Any, name: str, source: str) -> None:
    """The training view actually used (rows, labels after poisoning, the poisoned flag) as the
    active run's training dataset input; digest = the view id (cut to MLflow's column size)."""
    import warnings

    import mlflow
    import numpy as np
    import pandas as pd

    # numpy columns, not a Python int and bool per row (the same schema): at 808k train rows this
    # step left +150-159 MiB resident, now +95-96 (bench/results/train_mlflow_input_1m.log)
    poisoned = np.zeros(len(view.sample_ids), bool)
    poisoned[np.fromiter(view.poisoned_rows, np.int64)] = True
    df = pd.DataFrame({"sample_id": view.sample_ids, "label": np.asarray(view.labels, np.int64),
                       "poisoned": poisoned})
    with warnings.catch_warnings():  # a local path matches two equivalent local source types
        warnings.filterwarnings("ignore", message=".*interpreted in multiple ways.*")
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
        ds = mlflow.data.from_pandas(df, source=source, name=name, digest=view.view_id[:DIGEST_CHARS])
        mlflow.log_input(ds, context="training", tags={"snapshot_id": view.snapshot_id, "view_id": view.view_id})


def log_artifacts(run_id: str, paths: Iterable[str | Path], artifact_path: Optional[str] = None) -> None:
    c = client()
    for p in paths:
        if Path(p).is_file():
            c.log_artifact(run_id, str(p), artifact_path=artifact_path)


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr)
