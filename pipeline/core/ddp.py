"""Data-parallel training (DDP) with torch.distributed: one process per device, under torchrun.

    torchrun --standalone --nproc_per_node 2 -m pipeline.core.ddp --data train.npz --out runs/ddp
    python -m pipeline.core.ddp --help

Each rank trains :func:`pipeline.core.train.fit` on its shard of every global batch
(:class:`pipeline.core.train.DataParallel`): the global batch size, the number of steps, the
learning-rate schedule and the data order are those of single-process training with the same
:class:`TrainSpec`, and DistributedDataParallel averages the gradients so every rank takes the
same step. Backend: nccl on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU. Rank 0
saves; the other ranks return the same model.

Batch norm: each rank normalises with its shard's statistics unless the layers are
SyncBatchNorm. torch 2.14's SyncBatchNorm raises on CPU tensors ("expected input tensor to be on
GPU or XPU ..."; torch/nn/modules/batchnorm.py), so: ``sync_bn="auto"`` converts on CUDA (then
DDP is single-process training up to float summation order) and keeps per-rank statistics on
the CPU (a different, equally valid estimate; tests/team/test_ddp.py bounds the difference).

Compute core: torch, numpy and the stdlib only. The train stage wires :func:`train_model_ddp` in
when it runs under torchrun (``WORLD_SIZE`` > 1); this module's CLI trains from an ``.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as tdata
from .models import MODEL_NAMES, build_model, model_args, save_checkpoint
from .train import DataParallel, ProgressFn, TrainSpec, fit, resolve_device, seed_everything

INIT_TIMEOUT_S = 300  # rendezvous + first collective; ranks import torch at different speeds


def world_size() -> int:
    """Processes in the job: torchrun's WORLD_SIZE, 1 outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one that saves, logs and prints."""
    return rank() == 0


def sync_bn_supported(device: torch.device) -> bool:
    """Whether torch's SyncBatchNorm can run on ``device`` (torch 2.14: GPU/XPU/HPU, not CPU)."""
    return device.type in ("cuda", "xpu", "hpu")


def rank_device(spec_device: str) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when the spec resolves to CUDA, else the CPU."""
    dev = resolve_device(spec_device)
    if dev.type == "cuda" and world_size() > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs: "
                             "use torchrun --nproc_per_node <= the number of GPUs")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    return dev


def init_process_group(device: torch.device) -> bool:
    """Join torchrun's job (env:// rendezvous); True when this call created the group (so the
    caller destroys it). nccl for CUDA, gloo otherwise."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=INIT_TIMEOUT_S), **kw)
    return True


def data_parallel(device: torch.device) -> DataParallel:
    """The hook :func:`fit` needs to run as this rank of the initialised process group."""
    cuda = device.type == "cuda"

    def wrap(model: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return DataParallel(dist.get_rank(), dist.get_world_size(), wrap, all_sum)


def fit_ddp(model: nn.Module, images: np.ndarray, labels: np.ndarray, spec: TrainSpec,
            progress: Optional[ProgressFn] = None) -> list[dict[str, float]]:
    """:func:`fit` as this rank of the initialised process group (single process when none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fit(model, images, labels, spec, progress)
    device = rank_device(spec.device)
    return fit(model, images, labels, replace(spec, device=str(device)), progress, parallel=data_parallel(device))


def train_model_ddp(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    model_name: str,
    width: int,
    spec: TrainSpec,
    progress: Optional[ProgressFn] = None,
    sync_bn: str | bool = "auto",
) -> tuple[nn.Module, dict[str, Any], list[dict[str, float]]]:
    """:func:`pipeline.core.train.train_model`, data-parallel over the process group.

    Call it in every rank (the group must be initialised, e.g. by :func:`init_process_group`);
    every rank gets the same ``(model in eval mode, model_args, history)``; save on
    :func:`is_main` only. ``sync_bn``: ``"auto"`` (SyncBatchNorm where supported: CUDA), True
    (raise where unsupported), False (per-rank statistics). The returned model has plain
    BatchNorm layers again, so it loads and serves like a single-process one.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square (N, H, W, C) images, got {images.shape}")
    if sync_bn not in ("auto", True, False):
        raise ValueError(f"sync_bn must be 'auto', True or False, not {sync_bn!r}")
    seed_everything(spec.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    mean, std = tdata.channel_stats(images)
    args = model_args(model_name, num_classes, images.shape[-1], images.shape[1], width, mean, std)
    model = build_model(**args)
    device = rank_device(spec.device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    use_sync = distributed and (sync_bn is True or (sync_bn == "auto" and sync_bn_supported(device)))
    if use_sync and not sync_bn_supported(device):
        raise ValueError(f"sync_bn=True but torch's SyncBatchNorm does not run on {device.type}: use sync_bn='auto' or False")
    if use_sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    history = fit_ddp(model, images, labels, replace(spec, device=str(device)), progress)
    if use_sync:  # back to plain BatchNorm (same state-dict keys) for saving and serving
        plain = build_model(**args)
        plain.load_state_dict(model.state_dict())
        model = plain.to(device).eval()
    return model, args, history


# ---- CLI ----------------------------------------------------------------------------------------

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
        prog="torchrun --standalone --nproc_per_node N -m pipeline.core.ddp",
        description="Train one model data-parallel over N processes (one per GPU; gloo on the CPU). "
                    "Rank 0 writes OUT/model.pt (state dict + model_args, loads with weights_only=True) "
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
            save_checkpoint(args.out / "model.pt", model, margs, world_size=world_size(),
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
