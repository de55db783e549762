"""Data-parallel training (DDP) with torch.distributed: one process per device, under torchrun.

    torchrun --standalone --nproc_per_node 2 -m pipeline.distributed --data train.npz --out runs/ddp

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

Compute core: torch, numpy and the stdlib only (no files: the command line that trains from an
``.npz`` and saves the checkpoint is ``pipeline.distributed``, at the edge).
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as tdata
from .models import build_model, model_args
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
