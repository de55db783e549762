"""train stage: fit the candidate on the approved training view, log and register it in MLflow.

    python -m pipeline.train --params params.yaml --store data/store --view data/view \
        --validated data/validated.json --checkpoint models/candidate.pt \
        --report reports/train.json --history reports/train_history.json

Reads only the view named by data/validated.json (refused when it names another view, or when
validation failed under ``validate.on_fail: stop``; a loud warning under ``warn``). Every sample
is re-hashed on load (``view.load_training_view``); a mismatch aborts naming the rows.
torch and mlflow are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import config as config_mod
from pipeline.io import write_json


class TrainError(ValueError):
    """Training refused for a reason the user can fix (the message says how)."""


# --------------------------------------------------------------------------- pure parts


def check_validated(validated: dict, view_id: str, snapshot_id: str, on_fail_default: str = "stop") -> Optional[str]:
    """Refuse a view that was not validated; return a warning text when it failed under ``warn``.

    Raises :class:`TrainError` when ``validated`` names another view or snapshot, or when
    validation failed and ``on_fail`` is ``stop``.
    """
    if not isinstance(validated, dict):
        raise TrainError("validated.json is not a JSON object: re-run the validate stage")
    for key in ("view_id", "success"):
        if key not in validated:
            raise TrainError(f"validated.json lacks {key!r}: re-run the validate stage")
    if validated["view_id"] != view_id:
        raise TrainError(
            f"the training view {view_id[:12]} was not validated (data/validated.json names view "
            f"{str(validated['view_id'])[:12]}): run the validate stage before training"
        )
    if validated.get("snapshot_id") not in (None, snapshot_id):
        raise TrainError(
            f"data/validated.json names snapshot {str(validated['snapshot_id'])[:12]}, the view is over "
            f"{snapshot_id[:12]}: re-run the validate stage"
        )
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


def tqdm_progress(epochs: int, desc: str) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    """A ``core.train`` progress callback drawing a tqdm bar on stderr (loss, img/s); and close."""
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None, "t0": None, "seen": 0, "loss": None}

    def cb(ev: dict[str, Any]) -> None:
        if state["bar"] is None:
            state["bar"] = tqdm(total=epochs * ev.get("steps", 1), desc=desc, unit="batch", file=sys.stderr,
                                dynamic_ncols=True, mininterval=0.5)
            state["t0"] = time.perf_counter()
        bar = state["bar"]
        if ev["event"] == "step":
            state["seen"] += ev["images"]
            bar.update(1)
            dt = time.perf_counter() - state["t0"]
            if bar.n % 10 == 0 or ev["step"] == ev["steps"]:
                post = {"epoch": f"{ev['epoch']}/{epochs}", "img/s": f"{state['seen'] / max(dt, 1e-9):.0f}"}
                if state["loss"] is not None:
                    post["loss"] = f"{state['loss']:.4f}"
                bar.set_postfix(post, refresh=False)
        else:
            state["loss"] = ev["loss"]
            bar.set_postfix({"epoch": f"{ev['epoch']}/{epochs}", "loss": f"{ev['loss']:.4f}",
                             "acc": f"{ev['train_accuracy']:.3f}", "img/s": f"{ev['images_per_s']:.0f}"})

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return cb, close


def config_dict(cfg: config_mod.Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def train_arrays(images, labels, num_classes: int, cfg: config_mod.Config, desc: str):
    """Build and fit ``cfg.model`` on uint8 NHWC arrays with ``cfg.train``; ``(model, args, history, s)``."""
    from pipeline.core.train import TrainSpec, resolve_device, train_model

    spec = TrainSpec.from_obj(cfg.train)
    device = resolve_device(spec.device)
    print(f"{desc}: {len(images)} images {tuple(images.shape[1:])}, {num_classes} classes, "
          f"{cfg.model.name}, {spec.epochs} epochs on {device}", file=sys.stderr)
    cb, close = tqdm_progress(spec.epochs, desc)
    t0 = time.perf_counter()
    try:
        model, args, history = train_model(images, labels, num_classes, cfg.model.name, cfg.model.width, spec, cb)
    finally:
        close()
    return model, args, history, time.perf_counter() - t0


def save_model(path: Path, model, args: dict, cfg: config_mod.Config, **meta: Any) -> str:
    """Write the checkpoint (design.md) atomically; its sha256."""
    from pipeline.core.models import save_checkpoint
    from pipeline.tracking import file_sha256

    save_checkpoint(path, model, args, config=config_dict(cfg), **meta)
    return file_sha256(path)


def history_summary(history: list[dict], seconds: float) -> dict:
    last = history[-1] if history else {}
    return {
        "epochs": len(history),
        "train_seconds": round(seconds, 3),
        "final_loss": last.get("loss"),
        "final_train_accuracy": last.get("train_accuracy"),
        "images_per_s": (sum(h["images_per_s"] for h in history) / len(history)) if history else None,
    }


# --------------------------------------------------------------------------- stage


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.params)
    from pipeline import view as view_mod
    from pipeline.io import read_json

    vpath = Path(args.validated)
    if not vpath.is_file():
        raise TrainError(f"{vpath} not found: run the validate stage (`dvc repro validate`) first")
    validated = read_json(vpath)
    meta, _ = view_mod.read_view(args.view)
    warning = check_validated(validated, meta["view_id"], meta["snapshot_id"], cfg.validate.on_fail)
    if warning:
        print("\n" + "!" * 100 + f"\nWARNING: {warning}\n" + "!" * 100 + "\n", file=sys.stderr)

    t_load = time.perf_counter()
    tv = view_mod.load_training_view(args.view, args.store, verify=True)  # IntegrityError on tamper
    t_load = time.perf_counter() - t_load
    if tv.view_id != meta["view_id"]:
        raise TrainError("the view changed while training started: re-run the pipeline")

    import mlflow

    from pipeline import store as store_mod
    from pipeline import tracking

    experiment_id = tracking.configure(cfg.mlflow.experiment)
    if cfg.mlflow.system_metrics:
        mlflow.set_system_metrics_sampling_interval(tracking.SYSTEM_METRICS_INTERVAL_S)
    name = config_mod.model_name(cfg)
    attack_name = (tv.attack or {}).get("name", "none")
    tags = tracking.run_tags(tv.snapshot_id, tv.view_id, attack_name,
                             attack_spec=json.dumps(tv.attack, sort_keys=True), stage="train",
                             validation="passed" if validated["success"] else "FAILED (on_fail=warn)",
                             data=cfg.data.name)
    run_name = f"{cfg.data.name}-{attack_name}-{tv.view_id[:8]}"
    with mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=bool(cfg.mlflow.system_metrics)) as run:
        run_id = run.info.run_id
        tracking.log_params(run_id, config_mod.flatten(cfg))
        tracking.log_snapshot_input(store_mod.read_manifest(args.store, tv.snapshot_id), tv.snapshot_id,
                                    name=f"{cfg.data.name}-snapshot", source=str(Path(args.store).resolve()))

        model, margs, history, seconds = train_arrays(tv.images, tv.labels, len(tv.class_names), cfg, "train")
        sha = save_model(Path(args.checkpoint), model, margs, cfg, snapshot_id=tv.snapshot_id, view_id=tv.view_id,
                         class_names=list(tv.class_names), kind="candidate")
        tracking.log_history(run_id, history)
        summary = history_summary(history, seconds)
        tracking.log_metrics(run_id, {"train_seconds": seconds, "load_seconds": t_load,
                                      "poisoned_rows": len(tv.poisoned_rows)})

        t_log = time.perf_counter()
        model_uri, version = tracking.log_model(
            model.cpu(), name,
            version_tags={"snapshot_id": tv.snapshot_id, "view_id": tv.view_id, "attack": attack_name,
                          "checkpoint_sha256": sha, "validation": tags["validation"]},
        )
        t_log = time.perf_counter() - t_log
        tracking.log_metrics(run_id, {"log_model_seconds": t_log})

        write_json(Path(args.history), history)
        report = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "tracking_uri": tracking.tracking_uri(),
            "model_name": name,
            "model_version": version,
            "model_uri": model_uri,
            "snapshot_id": tv.snapshot_id,
            "view_id": tv.view_id,
            "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": sha,
            "attack": tv.attack,
            "validation_success": bool(validated["success"]),
            "train_rows": int(len(tv.labels)),
            "load_seconds": round(t_load, 3),
            "log_model_seconds": round(t_log, 3),
            **summary,
        }
        write_json(Path(args.report), report)
        tracking.log_artifacts(run_id, [args.report, args.history], artifact_path="train")
    print(f"train: {summary['epochs']} epochs in {seconds:.1f} s; run {run_id}, {name} v{version}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--store", required=True)
    ap.add_argument("--view", required=True)
    ap.add_argument("--validated", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--history", required=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(run, args)


def guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a stage body; expected failures print ``error: ...`` and return 2 (input) or 1 (check)."""
    from pipeline import tracking
    from pipeline.core.attacks import AttackError
    from pipeline.store import IntegrityError, StoreError
    from pipeline.view import ViewError

    try:
        return fn(args)
    except IntegrityError as exc:
        print(f"error: integrity check failed, stage aborted: {exc}", file=sys.stderr)
        return 1
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (config_mod.ConfigError, ViewError, StoreError, AttackError, tracking.TrackingError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.startswith("mlflow"):
            print(f"error: MLflow ({tracking.tracking_uri()}): {exc}", file=sys.stderr)
            return 2
        raise

if __name__ == "__main__":
    sys.exit(main())
