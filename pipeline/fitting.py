"""What the train and twin stages share: fit a model on arrays with progress, save it, summarise.

Neither stage imports the other, so a change to train's MLflow logging never retrains the twin.
torch is imported inside the functions (the module itself is light).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.schema import Config, as_dict
from pipeline.stage import CheckFailed, UserError, progress_bar


class TrainError(CheckFailed):
    """Training refused: its input was not validated or not the one the pipeline approved (exit 1)."""


def progress(epochs: int, desc: str) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    """A ``core.train`` progress callback drawing a bar on a terminal (loss, img/s), and its
    close; on a non-terminal (CI) one line per epoch instead of redraws."""
    state: dict[str, Any] = {"bar": None, "t0": None, "seen": 0, "loss": None}

    def cb(ev: dict[str, Any]) -> None:
        if state["bar"] is None:
            state["bar"] = progress_bar(total=epochs * ev.get("steps", 1), desc=desc, unit="batch")
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
            if not hasattr(bar, "format_dict"):  # the silent stand-in: one plain line per epoch
                print(f"{desc}: epoch {ev['epoch']}/{epochs} loss {ev['loss']:.4f} "
                      f"acc {ev['train_accuracy']:.3f} {ev['images_per_s']:.0f} img/s", file=sys.stderr)

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return cb, close


def train_arrays(images, labels, num_classes: int, cfg: Config, desc: str):
    """Build and fit ``cfg.model`` on uint8 NHWC arrays with ``cfg.train``; ``(model, args, history, s)``."""
    from pipeline.core.data import data_path_for, pixel_bytes
    from pipeline.core.train import resolve_device, train_model

    try:
        device = resolve_device(cfg.train.device)
    except RuntimeError as exc:  # cuda asked for without one
        raise UserError(str(exc)) from None
    nbytes = pixel_bytes(images)
    path = data_path_for(images, cfg.train, device.type)
    print(f"{desc}: {len(images)} images {tuple(images.shape[1:])}, {num_classes} classes, "
          f"{cfg.model.name}, {cfg.train.epochs} epochs on {device}, batches {path} "
          f"({nbytes / 2**20:.0f} MiB of pixels; train.data_path={cfg.train.data_path})", file=sys.stderr)
    cb, close = progress(cfg.train.epochs, desc)
    t0 = time.perf_counter()
    try:
        model, args, history = train_model(images, labels, num_classes, cfg.model.name, cfg.model.width, cfg.train, cb)
    finally:
        close()
    return model, args, history, time.perf_counter() - t0


def save_model(path: Path, model, args: dict, cfg: Config, **meta: Any) -> str:
    """Write the checkpoint (safetensors + JSON header, ``pipeline.checkpoints``) atomically; its sha256."""
    from pipeline import checkpoints

    return checkpoints.save(path, model, args, config=as_dict(cfg), **meta)


def history_summary(history: list[dict], seconds: float) -> dict:
    last = history[-1] if history else {}
    return {
        "epochs": len(history),
        "train_seconds": round(seconds, 3),
        "final_loss": last.get("loss"),
        "final_train_accuracy": last.get("train_accuracy"),
        "images_per_s": (sum(h["images_per_s"] for h in history) / len(history)) if history else None,
    }
