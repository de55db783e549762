"""train stage: fit the candidate on the approved training view, log and register it in MLflow.

    python -m pipeline.train --params params.yaml --store data/store --view data/view \
        --validated data/validated.json --checkpoint models/candidate.pt \
        --report reports/train.json --history reports/train_history.json

Reads only the view named by data/validated.json (refused when it names another view, or when
validation failed under ``validate.on_fail: stop``; a loud warning under ``warn``). Every sample
is re-hashed on load (``data.view.load_training_view``); a mismatch aborts naming the rows.
Writes the lineage record (snapshot, view, checkpoint digest, registry version) into
reports/train.json; every later stage checks its inputs against it.
torch and mlflow are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from pipeline import stage
from pipeline.fitting import TrainError, history_summary, save_model, train_arrays
from pipeline.io import read_json, write_json
from pipeline.lineage import Lineage, LineageError, require_lineage
from pipeline.schema import Config, flatten, model_name

PATHS = (
    stage.PathArg("store", "the snapshot store (data/store)"),
    stage.PathArg("view", "the training view (data/view)"),
    stage.PathArg("validated", "the data gate's record (data/validated.json)"),
    stage.PathArg("checkpoint", "the candidate checkpoint to write (models/candidate.pt)"),
    stage.PathArg("report", "the train report and lineage record (reports/train.json)"),
    stage.PathArg("history", "per-epoch metrics (reports/train_history.json)"),
)


# --------------------------------------------------------------------------- pure parts


def check_validated(validated: dict, view_id: str, snapshot_id: str, on_fail_default: str = "stop") -> Optional[str]:
    """Refuse a view that was not validated; return a warning text when it failed under ``warn``.

    Raises :class:`TrainError` when ``validated`` is malformed or failed under ``on_fail: stop``,
    or names another view or snapshot.
    """
    if not isinstance(validated, dict):
        raise TrainError("validated.json is not a JSON object: re-run the validate stage")
    for key in ("view_id", "success"):
        if key not in validated:
            raise TrainError(f"validated.json lacks {key!r}: re-run the validate stage")
    try:
        require_lineage(validated, {"view_id": view_id}, what="data/validated.json",
                        against=f"the training view {view_id[:12]} (it was not validated)",
                        fix="run the validate stage before training")
        if validated.get("snapshot_id") is not None:
            require_lineage(validated, {"snapshot_id": snapshot_id}, what="data/validated.json",
                            against=f"the view's snapshot {snapshot_id[:12]}", fix="re-run the validate stage")
    except LineageError as exc:
        raise TrainError(str(exc)) from None
    if validated["success"] is True:
        return None
    on_fail = validated.get("on_fail") or on_fail_default
    if on_fail == "warn":
        return (
            f"validation FAILED for view {view_id[:12]} and validate.on_fail=warn: training anyway. "
            "This model must not be promoted; see reports/validation.json"
        )
    raise TrainError(
        f"validation failed for view {view_id[:12]} (on_fail={on_fail}): training refused; "
        "see reports/validation.json, or set validate.on_fail=warn to train anyway"
    )


# --------------------------------------------------------------------------- stage


def run(cfg: Config, args: argparse.Namespace) -> dict:
    from pipeline.data import view as view_mod

    vpath = Path(args.validated)
    if not vpath.is_file():
        raise TrainError(f"{vpath} not found: run the validate stage (`dvc repro validate`) first")
    validated = read_json(vpath)
    meta, _ = view_mod.read_view(args.view)
    warning = check_validated(validated, meta["view_id"], meta["snapshot_id"], cfg.validate.on_fail)
    if warning:
        print("\n" + "!" * 100 + f"\nWARNING: {warning}\n" + "!" * 100 + "\n", file=sys.stderr)

    from pipeline.tracking import registry, runs

    runs.probe(cfg.mlflow.experiment)  # a dead or corrupt tracking store fails here, before training
    t_load = time.perf_counter()
    tv = view_mod.load_training_view(args.view, args.store, verify=True)  # IntegrityError on tamper
    t_load = time.perf_counter() - t_load
    require_lineage(tv, {"view_id": meta["view_id"]}, what="the loaded view", against=f"{args.view}",
                    fix="the view changed while training started: re-run the pipeline")

    import mlflow

    experiment_id = runs.configure(cfg.mlflow.experiment)
    if cfg.mlflow.system_metrics:
        mlflow.set_system_metrics_sampling_interval(runs.SYSTEM_METRICS_INTERVAL_S)
    name = model_name(cfg)
    attack_name = (tv.attack or {}).get("name", "none")
    tags = runs.run_tags(tv.snapshot_id, tv.view_id, attack_name,
                         attack_spec=json.dumps(tv.attack, sort_keys=True), stage="train",
                         validation="passed" if validated["success"] else "FAILED (on_fail=warn)",
                         data=cfg.data.name)
    run_name = f"{cfg.data.name}-{attack_name}-{tv.view_id[:8]}"
    with mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=bool(cfg.mlflow.system_metrics)) as run:
        run_id = run.info.run_id
        runs.log_params(run_id, flatten(cfg))
        runs.log_view_input(tv, name=f"{cfg.data.name}-view-{tv.view_id[:8]}", source=str(Path(args.view).resolve()))

        model, margs, history, seconds = train_arrays(tv.images, tv.labels, len(tv.class_names), cfg, "train")
        sha = save_model(Path(args.checkpoint), model, margs, cfg, snapshot_id=tv.snapshot_id, view_id=tv.view_id,
                         class_names=list(tv.class_names), kind="candidate")
        runs.log_history(run_id, history)
        summary = history_summary(history, seconds)
        runs.log_metrics(run_id, {"time/train_seconds": seconds, "time/load_seconds": t_load,
                                  "data/poisoned_rows": len(tv.poisoned_rows)})

        t_log = time.perf_counter()
        version, created = registry.register_checkpoint(
            runs.client(), run_id, name, args.checkpoint, sha,
            tags={"snapshot_id": tv.snapshot_id, "view_id": tv.view_id, "attack": attack_name,
                  "validation": tags["validation"]},
        )
        model_uri = f"models:/{name}/{version}"
        if not created:
            stage.say("train", f"the checkpoint is byte-identical to {name} v{version}: no new version registered")
        t_log = time.perf_counter() - t_log
        runs.log_metrics(run_id, {"time/log_model_seconds": t_log})

        write_json(Path(args.history), history)
        lineage = Lineage(snapshot_id=tv.snapshot_id, view_id=tv.view_id, checkpoint_sha256=sha, model_version=version)
        report = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "tracking_uri": stage.redact(runs.tracking_uri()),
            "model_name": name,
            "model_uri": model_uri,
            **lineage.to_dict(),
            "checkpoint": str(args.checkpoint),
            "attack": tv.attack,
            "validation_success": bool(validated["success"]),
            "train_rows": int(len(tv.labels)),
            "load_seconds": round(t_load, 3),
            "log_model_seconds": round(t_log, 3),
            **summary,
        }
        write_json(Path(args.report), report)
        runs.log_artifacts(run_id, [args.report, args.history], artifact_path="train")
    stage.say("train", f"{summary['epochs']} epochs in {seconds:.1f} s; run {run_id}, {name} v{version}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("train", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
