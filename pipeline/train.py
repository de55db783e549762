"""train stage: fit the candidate on the approved training view, log and register it in MLflow.

    python -m pipeline.train --params params.yaml --store data/store --view data/view \
        --validated data/validated.json --checkpoint models/candidate.pt \
        --report reports/train.json --history reports/train_history.json

Reads only the view named by data/validated.json (refused when it names another view, or when
validation failed under ``validate.on_fail: stop``; a loud warning under ``warn``). Every sample
is re-hashed on load (``data.view.load_training_view``); a mismatch aborts naming the rows.
Writes the lineage record (snapshot, view, checkpoint digest, registry version) into
reports/train.json; every later stage checks its inputs against it.

``remedy=finetune`` (issue 13): the trained model is fine-pruned or fine-tuned on a trusted reserve
(``pipeline.core.remedy``; rows of the champion's snapshot, or rows trusted in conf) before it is
saved as the candidate. A remedied version (finetune, or trained on a quarantined view) is tagged
``poisongate.remedy.of`` (the blocked version), ``.method`` and ``.record`` (the quarantine
record's digest); the gate judges it with every check like any other candidate.
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
from pipeline import remedy as remedy_mod
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


def reserve_rows(cfg: Config, tv, store_dir: str, champion_snapshot: Optional[str]) -> tuple[list[int], str]:
    """Indices of the view's rows that may serve in the trusted reserve, and where they come from."""
    from pipeline.data import store

    rs = cfg.remedy.reserve
    man = store.read_manifest(store_dir, tv.snapshot_id)
    sha = dict(zip(man["sample_id"].astype(str), man["sha256"].astype(str)))
    after = {r["sample_id"]: r["sha256_after"] for r in tv.records}
    hashes = [after.get(s, sha[s]) for s in tv.sample_ids]
    if rs.source == "trusted":
        pool = remedy_mod.reserve_pool(tv.sample_ids, hashes, tv.labels, source="trusted", trusted=rs.trusted,
                                       transformed=after)
        return pool, f"rows trusted in conf ({', '.join(rs.trusted)})"
    if champion_snapshot is None:
        raise TrainError("remedy.reserve.source=champion but the registry has no champion: list rows you vouch for "
                         "with remedy.reserve.source=trusted remedy.reserve.trusted=[<sample-id patterns>]")
    ancestry = [h["id"] for h in store.chain(store_dir, tv.snapshot_id)]
    if champion_snapshot not in ancestry:
        raise TrainError(f"the champion was trained on snapshot {champion_snapshot[:12]}, not an ancestor of "
                         f"{tv.snapshot_id[:12]}: its rows cannot vouch for this view; use remedy.reserve.source=trusted")
    cm = store.read_manifest(store_dir, champion_snapshot)
    cm = cm[cm["split"] == "train"]
    approved = {str(i): (str(h), int(y)) for i, h, y in zip(cm["sample_id"], cm["sha256"], cm["label"])}
    pool = remedy_mod.reserve_pool(tv.sample_ids, hashes, tv.labels, source="champion", approved=approved)
    return pool, f"rows of the champion's snapshot {champion_snapshot[:12]}"


def apply_finetune(model, tv, cfg: Config, pool: list[int]) -> dict:
    """Fine-prune or fine-tune ``model`` in place on a reserve drawn from ``pool``; what was done."""
    import numpy as np

    from pipeline.core import remedy as core_remedy
    from pipeline.core.predict import predict
    from pipeline.fitting import progress

    r = cfg.remedy
    exclude = np.setdiff1d(np.arange(len(tv.labels)), np.asarray(pool, np.int64))
    rows = core_remedy.trusted_reserve(tv.labels, r.reserve.fraction, seed=r.reserve.seed, exclude=exclude,
                                       n_rows=len(tv.labels))
    images, labels = tv.images[rows], tv.labels[rows]
    cb, close = progress(r.epochs, f"remedy ({r.method})")
    common = dict(epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, seed=cfg.train.seed, device=cfg.train.device,
                  optimizer=r.optimizer, progress=cb, freeze_norm=r.freeze_norm)
    try:
        if r.method == "fine_prune":
            res = core_remedy.fine_prune(model, images, labels, max_accuracy_drop=r.max_accuracy_drop,
                                         max_fraction=r.max_fraction, **common)
            out = {"layer": res.layer, "pruned_channels": len(res.pruned), "channels": res.channels,
                   "reserve_accuracy_before": res.reserve_accuracy_before,
                   "reserve_accuracy_pruned": res.reserve_accuracy_pruned,
                   "reserve_accuracy_after": res.reserve_accuracy_after}
        else:
            before = float((predict(model, images, device=cfg.train.device, amp=False) == labels).mean())
            core_remedy.finetune(model, images, labels, **common)
            after = float((predict(model, images, device=cfg.train.device, amp=False) == labels).mean())
            out = {"pruned_channels": 0, "reserve_accuracy_before": before, "reserve_accuracy_after": after}
    finally:
        close()
    return {"method": r.method, "reserve_rows": int(len(rows)), "reserve_pool": int(len(pool)),
            "reserve_sample_ids_sha256": _ids_digest([tv.sample_ids[i] for i in rows]), **out}


def _ids_digest(ids: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


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
    # lazy: the rows are read from the packs as training asks for them (issue 19 item 3)
    tv = view_mod.load_training_view(args.view, args.store, verify=True, lazy=True)  # IntegrityError on tamper
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

        if cfg.remedy.name == "quarantine" and not tv.quarantine:
            raise TrainError("remedy=quarantine but the training view has no quarantine: re-run the poison stage")
        client = runs.client()
        remedy_tags: dict[str, str] = {}
        if cfg.remedy.name == "finetune" or tv.quarantine:
            origin = tv.quarantine["view_id"] if tv.quarantine else tv.view_id
            of = str(cfg.remedy.of) if cfg.remedy.of is not None else remedy_mod.blocked_version_of(
                client.search_model_versions(f"name='{name}'"), origin)
            remedy_tags = {remedy_mod.TAG_OF: of or "none",
                           remedy_mod.TAG_METHOD: cfg.remedy.method if cfg.remedy.name == "finetune" else "quarantine"}
            if tv.quarantine:
                remedy_tags[remedy_mod.TAG_RECORD] = tv.quarantine["record_sha256"]
                if cfg.remedy.name == "finetune":
                    remedy_tags[remedy_mod.TAG_METHOD] = f"quarantine+{cfg.remedy.method}"
            for k, v in remedy_tags.items():
                client.set_tag(run_id, k, v)
        pool = pool_from = None
        if cfg.remedy.name == "finetune":  # the reserve is chosen (and refused) before the long fit
            champ = registry.champion(client, name)
            pool, pool_from = reserve_rows(cfg, tv, args.store, (champ.tags or {}).get("snapshot_id") if champ else None)

        model, margs, history, seconds = train_arrays(tv.images, tv.labels, len(tv.class_names), cfg, "train")
        remedy_report: Optional[dict] = None
        if pool is not None:
            t_rem = time.perf_counter()
            remedy_report = {**apply_finetune(model, tv, cfg, pool), "reserve_from": pool_from}
            remedy_report["seconds"] = round(time.perf_counter() - t_rem, 3)
            runs.log_metrics(run_id, {f"remedy/{k}": v for k, v in remedy_report.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
            stage.say("train", f"remedy {cfg.remedy.method}: {remedy_report['reserve_rows']} reserve rows "
                               f"({pool_from}), {remedy_report['pruned_channels']} channel(s) pruned, reserve accuracy "
                               f"{remedy_report['reserve_accuracy_before']:.3f} -> {remedy_report['reserve_accuracy_after']:.3f}")
        if remedy_tags:
            remedy_report = {**(remedy_report or {}), "of": remedy_tags[remedy_mod.TAG_OF],
                             "tags": remedy_tags, "quarantined_rows": len((tv.quarantine or {}).get("rows") or [])}
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
                  "validation": tags["validation"], **remedy_tags},
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
            "remedy": remedy_report,
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
