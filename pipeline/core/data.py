"""Tensor data on the training device: upload, statistics, batch augmentation, TTA.

The whole data set lives on the device as uint8 NCHW (tiny for digits, 150 MB for CIFAR-10);
batches are gathered by index and augmented there. Normalisation is the model's first layer, so
everything here stays on the raw 0..255 scale.

``augment_batch`` and ``tta_logits`` are deliberately simple reference versions (issue 6 may
replace them with faster ones behind the same signatures).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_device(images: np.ndarray, device: torch.device | str, channels_last: bool = False) -> torch.Tensor:
    """(N, H, W, C) uint8 numpy -> (N, C, H, W) uint8 tensor on ``device`` (one upload)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) uint8 images, got {images.dtype} {images.shape}")
    t = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    t = t.permute(0, 3, 1, 2)  # a view: NHWC memory is channels_last NCHW
    return t if channels_last else t.contiguous()


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, H, W, C) uint8 images on the 0..1 scale (chunked, float64)."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"channel_stats needs a non-empty (N, H, W, C) array, got {images.shape}")
    c = images.shape[-1]
    s = np.zeros(c, np.float64)
    ss = np.zeros(c, np.float64)
    for i in range(0, len(images), chunk):
        block = images[i : i + chunk].reshape(-1, c).astype(np.float64)
        s += block.sum(0)
        ss += np.square(block).sum(0)
    n = images.size // c
    mean = s / n
    var = np.maximum(ss / n - mean**2, 0.0)
    std = np.sqrt(var)
    std = np.where(std < 1e-3, 1.0 * 255, std)  # constant channel: no scaling
    return [float(m / 255) for m in mean], [float(v / 255) for v in std]


def augment_batch(x: torch.Tensor, pad: int, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill, = padded random crop) and a random
    horizontal flip per image, on ``x``'s device. ``x``: (N, C, H, W), uint8 or float.

    Random numbers come from ``generator`` (a CPU generator: the same draws on any device).
    """
    n, c, h, w = x.shape
    out = x
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (N, H)
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (N, W)
        n_idx = torch.arange(n, device=x.device)[:, None, None, None]
        c_idx = torch.arange(c, device=x.device)[None, :, None, None]
        out = padded[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift (N, C, H, W) images by (dy, dx) pixels, filling with zeros."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p))
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


TTA_SHIFTS: Sequence[tuple[int, int]] = ((0, 0), (2, 2), (-2, -2))


@torch.no_grad()
def tta_logits(model: torch.nn.Module, x: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Test-time augmentation: logits averaged over the identity, translations by +-2 px and
    (when ``flip``) the horizontal mirror of each. ``x``: raw (N, C, H, W) batch."""
    total = None
    views = 0
    for dy, dx in TTA_SHIFTS:
        shifted = translate(x, dy, dx)
        for v in (shifted, shifted.flip(3)) if flip else (shifted,):
            out = model(v).float()
            total = out if total is None else total + out
            views += 1
    assert total is not None
    return total / views
