"""Data-parallel training from the command line, under torchrun (DDP; the edge of ``pipeline.core.ddp``).

    torchrun --standalone --nproc_per_node 4 -m pipeline.distributed --data train.npz --out runs/ddp
    torchrun --standalone --nproc_per_node 2 -m pipeline.distributed --data train.npz --out runs/ddp --device cpu

``train.npz`` holds ``images`` (uint8 N,H,W,C) and ``labels``. Every rank trains its shard of each
global batch (``pipeline.core.ddp.train_model_ddp``); rank 0 writes ``model.safetensors``
(``pipeline.checkpoints``, no pickle) and ``history.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch.distributed as dist

from pipeline import checkpoints
from pipeline.core.ddp import init_process_group, is_main, rank_device, train_model_ddp, world_size
from pipeline.core.models import MODEL_NAMES
from pipeline.core.train import TrainSpec


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    with np.load(path) as z:
        if "images" not in z or "labels" not in z:
            raise ValueError(f"{path} needs arrays 'images' (N, H, W, C uint8) and 'labels' (N,)")
        images, labels = z["images"], z["labels"].astype(np.int64)
        num_classes = int(z["num_classes"]) if "num_classes" in z else int(labels.max()) + 1
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: images must be (N, H, W, C) uint8, got {images.dtype} {images.shape}")
    return images, labels, num_classes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="torchrun --standalone --nproc_per_node N -m pipeline.distributed",
        description="Train one model data-parallel over N processes (one per GPU; gloo on the CPU). "
                    "Rank 0 writes OUT/model.safetensors (weights + model arguments, no pickle) "
                    "and OUT/history.json. Without torchrun it trains in one process.")
    ap.add_argument("--data", required=True, type=Path, help=".npz with images (N,H,W,C uint8), labels (N,), optional num_classes")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="small_cnn", choices=MODEL_NAMES)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch: split over the ranks")
    ap.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--schedule", default="onecycle", choices=("none", "onecycle"))
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--augment", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (each rank takes cuda:LOCAL_RANK)")
    ap.add_argument("--sync-bn", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        images, labels, num_classes = _load_npz(args.data)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = TrainSpec(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                     weight_decay=args.weight_decay, schedule=args.schedule, label_smoothing=args.label_smoothing,
                     augment=args.augment, seed=args.seed, device=args.device)
    device = rank_device(spec.device)
    created = init_process_group(device) if world_size() > 1 else False
    try:
        def progress(ev: dict[str, Any]) -> None:
            if ev["event"] == "epoch":
                print(f"epoch {ev['epoch']}: loss {ev['loss']:.4f} acc {ev['train_accuracy']:.4f} "
                      f"{ev['images_per_s']:.0f} img/s ({world_size()} ranks)", file=sys.stderr, flush=True)

        sync = {"auto": "auto", "on": True, "off": False}[args.sync_bn]
        model, margs, history = train_model_ddp(images, labels, num_classes, args.model, args.width, spec,
                                                progress if (is_main() and not args.quiet) else None, sync_bn=sync)
        if is_main():
            args.out.mkdir(parents=True, exist_ok=True)
            checkpoints.save(args.out / "model.safetensors", model, margs, world_size=world_size(),
                             backend=dist.get_backend() if dist.is_initialized() else "none")
            (args.out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        if dist.is_initialized():
            dist.barrier()  # nobody exits (and tears the group down) before rank 0 has saved
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if created:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
