"""Tensor data on the training device: upload and per-channel statistics.

The whole data set lives on the device as uint8 NCHW (tiny for digits, 150 MB for CIFAR-10);
batches are gathered by index there. Normalisation is the model's first layer, so everything
here stays on the raw 0..255 scale. Augmentation and TTA: :mod:`pipeline.core.augment`.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(images: np.ndarray, device: torch.device | str, channels_last: bool = False) -> torch.Tensor:
    """(N, H, W, C) uint8 numpy -> (N, C, H, W) uint8 tensor on ``device`` (one upload).

    ``channels_last``: return the free NCHW view of the NHWC buffer (channels_last strided)
    instead of a contiguous NCHW copy."""
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
