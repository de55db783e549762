"""Tensor data on the training device: upload, streamed batches and per-channel statistics.

Two ways to feed training (``train.data_path``; :func:`choose_data_path` picks one under
``auto``): *resident*, the whole data set on the device as uint8 NCHW (tiny for digits, 150 MB for
CIFAR-10), batches gathered by index there; *stream*, batches gathered on the host from any
(N, H, W, C) uint8 array-like (a numpy array, an ``np.memmap`` over a store pack) by a
``torch.utils.data.DataLoader`` and uploaded one at a time, so device and host memory grow with
the batch size, not with N. Normalisation is the model's first layer, so everything here stays
on the raw 0..255 scale. Augmentation and TTA: :mod:`pipeline.core.augment`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.data


def to_device(images, device: torch.device | str, channels_last: bool = False) -> torch.Tensor:
    """(N, H, W, C) uint8 array-like -> (N, C, H, W) uint8 tensor on ``device``.

    ``channels_last``: return the free NCHW view of the NHWC buffer (channels_last strided)
    instead of a contiguous NCHW copy. Off the CPU the rows go up ``UPLOAD_CHUNK_BYTES`` at a
    time into one device buffer, so a lazy store view is never read whole into host memory
    (``np.ascontiguousarray`` of one reads every row: +748 MiB at 1M rows of 28x28)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) uint8 images, got {images.dtype} {images.shape}")
    device = torch.device(device)
    if device.type == "cpu" or len(images) == 0:  # on the CPU the host copy is the resident set itself
        t = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    else:
        t = torch.empty(tuple(int(d) for d in images.shape), dtype=torch.uint8, device=device)
        step = _rows_per_chunk(images, UPLOAD_CHUNK_BYTES)
        for a in range(0, len(images), step):
            # synchronous copy: the chunk's host memory is free to reuse when it returns
            t[a:a + step].copy_(torch.from_numpy(_writable(images[a:a + step])))
    t = t.permute(0, 3, 1, 2)  # a view: NHWC memory is channels_last NCHW
    return t if channels_last else t.contiguous()


DATA_PATHS = ("auto", "resident", "stream")
STATS_CHUNK_BYTES = 64 * 2**20  # bytes per histogram chunk of a host array: bounded memory, same exact counts
UPLOAD_CHUNK_BYTES = 64 * 2**20  # bytes of rows per host-to-device copy of the resident set: host memory stays at one chunk


def _rows_per_chunk(images, chunk_bytes: int) -> int:
    """Rows of an (N, H, W, C) array-like in ``chunk_bytes`` (at least one), read from its shape."""
    row = int(np.prod(images.shape[1:], dtype=np.int64)) * np.dtype(images.dtype).itemsize
    return max(1, int(chunk_bytes) // max(1, row))


def pixel_bytes(images) -> int:
    """Bytes of a (N, H, W, C) uint8 array-like's pixels (read from its shape, nothing loaded)."""
    return int(np.prod(images.shape, dtype=np.int64)) * np.dtype(images.dtype).itemsize


def resident_budget_mib(device_type: str, resident_max_mib: float, host_resident_max_mib: float) -> float:
    """The ``auto`` path's budget on this device. On a CPU the "device" is the host: the resident
    copy, plus the augmented copy each epoch makes of it, is the process's own memory (at 1M rows
    of 28x28, 0.75 GiB each), so the smaller host budget applies; a GPU keeps it in device memory."""
    return resident_max_mib if device_type != "cpu" else min(resident_max_mib, host_resident_max_mib)


def data_path_for(images, spec, device_type: str) -> str:
    """The path ``spec`` (``data_path``, ``resident_max_mib``, ``host_resident_max_mib``) gives
    ``images`` on a device of this type: what the training loop uses and the stage reports."""
    budget = resident_budget_mib(device_type, spec.resident_max_mib, spec.host_resident_max_mib)
    return choose_data_path(pixel_bytes(images), spec.data_path, budget)


def choose_data_path(nbytes: int, data_path: str = "auto", resident_max_mib: float = 2048) -> str:
    """``resident`` or ``stream``: ``auto`` keeps the set resident when its pixels fit in
    ``resident_max_mib`` MiB (the fast path: one upload, gathers on the device), else streams."""
    if data_path not in DATA_PATHS:
        raise ValueError(f"unknown data path {data_path!r}: use one of {', '.join(DATA_PATHS)}")
    if data_path != "auto":
        return data_path
    return "resident" if nbytes <= resident_max_mib * 2**20 else "stream"


def gather(images, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of an (N, H, W, C) array-like, in ``idx`` order, as one contiguous array.

    Read in sorted row order (a memmap then pages each row in once, front to back) and put back
    in the batch's order, so a streamed batch equals the resident path's gather of the same idx."""
    idx = np.asarray(idx, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx), *images.shape[1:]), dtype=images.dtype)
    out[order] = images[idx[order]]
    return out


class _Batches(torch.utils.data.Dataset):
    """One item = one whole batch (its row indices fixed by the training loop's permutation)."""

    def __init__(self, images, labels: np.ndarray, batches: list[np.ndarray]):
        self.images, self.labels, self.batches = images, labels, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batches[k]
        return torch.from_numpy(gather(self.images, idx)), torch.from_numpy(np.asarray(self.labels[idx], np.int64))


def batch_loader(images, labels: np.ndarray, batches: list[np.ndarray], workers: int = 0,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ``(uint8 NHWC images, int64 labels)`` host tensors, batch by batch,
    in the given order; ``workers`` > 0 gathers ahead in that many processes (2 batches each)."""
    # Its own generator: an iterator draws a base seed, and from the global RNG that draw would
    # shift every later global draw (dropout) away from the resident path's.
    return torch.utils.data.DataLoader(_Batches(images, labels, batches), batch_size=None, shuffle=False,
                                       num_workers=int(workers), pin_memory=pin_memory,
                                       prefetch_factor=2 if workers else None, generator=torch.Generator())


def upload(batch: torch.Tensor, device: torch.device | str, channels_last: bool = False) -> torch.Tensor:
    """A host uint8 NHWC batch -> NCHW on ``device`` (as :func:`to_device` does for a whole set)."""
    t = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return t if channels_last else t.contiguous()


def channel_stats(images: np.ndarray | torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, H, W, C) uint8 images on the 0..1 scale.

    Exact, from a 256-bin histogram per channel (``torch.bincount``; on the tensor's device when
    given a tensor): 0.19 s for CIFAR-10's 150 M values on 2 CPU cores, where float64 sums took
    2.24 s of every model's training time (bench/train_setup_cost.py)."""
    if len(images.shape) != 4 or images.shape[0] == 0:
        raise ValueError(f"channel_stats needs a non-empty (N, H, W, C) array, got {tuple(images.shape)}")
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"channel_stats needs uint8 images, got {images.dtype}")
        hist = _histogram(images)
    else:
        if images.dtype != np.uint8:
            raise ValueError(f"channel_stats needs uint8 images, got {images.dtype}")
        # a host array (maybe a memmap or store rows) in chunks: memory stays at one chunk
        step = _rows_per_chunk(images, STATS_CHUNK_BYTES)
        hist = sum(_histogram(torch.from_numpy(_writable(images[a:a + step])))
                   for a in range(0, len(images), step))
    hist = hist.cpu().to(torch.float64)  # counts < 2**53: exact
    v = torch.arange(256, dtype=torch.float64)
    n = hist.sum(1)
    mean = (hist * v).sum(1) / n
    var = ((hist * (v - mean[:, None]) ** 2).sum(1) / n).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std < 1e-3, torch.full_like(std, 255.0), std)  # constant channel: no scaling
    return [float(m / 255) for m in mean], [float(s / 255) for s in std]


def _writable(chunk) -> np.ndarray:
    """The chunk itself when torch can wrap it (a slice of a plain array), else a copy (a read-only
    memmap slice: torch refuses to wrap non-writable memory without a warning; a one-row slice of
    a reversed array: numpy calls it C-contiguous, torch refuses its negative stride)."""
    a = np.asarray(chunk)
    ok = a.flags.writeable and a.flags.c_contiguous and all(st >= 0 for st in a.strides)
    return a if ok else np.array(a)


def _histogram(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1, t.shape[-1])
    return torch.stack([torch.bincount(flat[:, ch], minlength=256) for ch in range(flat.shape[1])])
