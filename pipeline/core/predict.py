"""Batched inference on raw uint8 images (the model normalises)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

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
    """(N, H, W, C) uint8 -> (N, K) float32 logits. ``tta``: :func:`data.tta_logits`.

    Moves ``model`` to ``device`` and puts it in eval mode. bf16 autocast on CUDA when ``amp``.
    """
    dev = resolve_device(device)
    model.to(dev).eval()
    if len(images) == 0:
        raise ValueError("predict needs at least one image")
    out = []
    for i in range(0, len(images), batch_size):
        xb = tdata.to_device(images[i : i + batch_size], dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
            logits = tdata.tta_logits(model, xb) if tta else model(xb)
        out.append(logits.float().cpu())
    return torch.cat(out).numpy()


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
