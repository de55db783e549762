"""Batched inference on raw uint8 images (the model normalises)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import augment as aug
from . import data as tdata
from .train import resolve_device


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int = 512,
    device: str | torch.device = "auto",
    tta: bool = False,
    amp: bool = True,
) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, K) float32 logits. ``tta``: :func:`augment.tta_logits` (mean
    logits over identity, flip and +-2 px reflect-padded translates of both: 6 views).

    Moves ``model`` to ``device`` and puts it in eval mode. On CUDA: channels_last model and
    inputs, bf16 autocast when ``amp``. Logits stay on the device until the single copy back.
    """
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if len(images) == 0:
        raise ValueError("predict needs at least one image")
    model.to(dev).eval()
    if cuda:
        model.to(memory_format=torch.channels_last)
    out = None
    for i in range(0, len(images), batch_size):
        xb = tdata.to_device(images[i : i + batch_size], dev, channels_last=cuda)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp and cuda):
            logits = aug.tta_logits(model, xb) if tta else model(xb)
        if out is None:
            # One buffer filled in place, not a list of per-batch tensors: on a CPU each small
            # kept tensor pinned the batch's freed activations around it in glibc's heap, growing
            # with the batches (40k rows: +944 MiB, bench/predict_memory.py;
            # tests/test_core.py::test_predict_memory_does_not_grow_with_the_batches)
            out = torch.empty((len(images), *logits.shape[1:]), dtype=torch.float32, device=logits.device)
        out[i : i + len(logits)] = logits.float()
    return out.cpu().numpy()


def predict(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int = 512,
    device: str | torch.device = "auto",
    tta: bool = False,
    amp: bool = True,
) -> np.ndarray:
    """Class indices (N,) int64 for (N, H, W, C) uint8 images."""
    return predict_logits(model, images, batch_size, device, tta, amp).argmax(1).astype(np.int64)
