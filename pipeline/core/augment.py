"""On-device augmentation and test-time augmentation (TTA), batched, for any dtype.

Imports torch only (core budget). Everything runs on CUDA and, unchanged, on CPU. The training
loop is :func:`pipeline.core.train.fit` (it augments the resident training set once per epoch
with :func:`random_crop_flip`); inference is :mod:`pipeline.core.predict` (TTA through
:func:`tta_logits`).

* ``random_crop_flip`` pads by ``pad`` pixels with **reflect** padding (default; ``mode="zeros"``
  pads with zeros) and takes a window at a per-image random offset in ``[0, 2*pad]``, then
  flips half of the images horizontally. Reflection keeps border statistics natural (no black
  frames the model never sees at test time) and is what the TTA translates use, so training
  and test views come from the same distribution. It is computed as one gather through index
  tables (no padded copy is materialised), so it is the same on uint8 and float input.
* ``tta_logits``: the mean of the logits over six views, see its docstring.

Models take raw pixels (uint8, or float in 0..255) and normalise inside (design.md).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

PAD_MODES = ("reflect", "zeros")


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------


def _reflect_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Map coordinates in [-size+1, 2*size-2] onto [0, size-1] by reflection without repeating
    the edge (numpy/torch ``reflect``): -1 -> 1, size -> size-2."""
    idx = idx.abs()
    return torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)


def shift_images(x: torch.Tensor, dy: torch.Tensor | int, dx: torch.Tensor | int,
                 flip: torch.Tensor | bool = False, mode: str = "reflect") -> torch.Tensor:
    """Translate each image of ``x`` (N, C, H, W) by (dy, dx) pixels, optionally flipping it.

    ``out[n, :, i, j] = x[n, :, i - dy[n], j' - dx[n]]`` where ``j' = W-1-j`` when ``flip[n]``
    else ``j`` (the flip is applied after the shift, to the shifted image), and coordinates that
    fall outside the image are reflected (``mode="reflect"``) or read as 0 (``mode="zeros"``).
    ``dy``, ``dx`` and ``flip`` are ints/bools or length-N tensors. One gather, no Python loop
    over images; dtype, device and value range are preserved. The result is channels_last
    strided (a contiguous (N, H, W, C) buffer viewed as NCHW).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"unknown pad mode {mode!r}: use one of {', '.join(PAD_MODES)}")
    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    dev = x.device

    def per_image(v: Any, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(v, device=dev)
        return (t.expand(n) if t.ndim == 0 else t).to(dtype)

    dy_t, dx_t = per_image(dy, torch.long), per_image(dx, torch.long)
    flip_t = per_image(flip, torch.bool)
    ii = torch.arange(h, device=dev)
    jj = torch.arange(w, device=dev)
    cols = torch.where(flip_t[:, None], (w - 1) - jj[None, :], jj[None, :])  # (N, W)
    rows = ii[None, :] - dy_t[:, None]  # (N, H)
    cols = cols - dx_t[:, None]
    if mode == "reflect":
        if h < 2 or w < 2:
            raise ValueError("reflect padding needs images of at least 2x2 pixels")
        if any(isinstance(v, int) and abs(v) > min(h, w) - 1 for v in (dy, dx)):
            raise ValueError(f"a reflect shift must be smaller than the image side ({h}x{w})")
        rows_c, cols_c = _reflect_index(rows, h), _reflect_index(cols, w)
    else:
        rows_c, cols_c = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    nn_idx = torch.arange(n, device=dev)[:, None, None]
    # advanced indices separated by a slice: the broadcast index dims (N, H, W) come first
    out = x[nn_idx, :, rows_c[:, :, None], cols_c[:, None, :]]  # (N, H, W, C)
    if mode == "zeros":
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        out = out * valid[..., None].to(out.dtype)
    return out.permute(0, 3, 1, 2)


def random_crop_flip(x: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None,
                     flip: bool = True, mode: str = "reflect", chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Padded random crop + random horizontal flip of a batch, on ``x``'s device.

    Equivalent, image by image, to: pad by ``pad`` on every side (reflect, or zeros), take the
    H x W window whose top-left corner is at (oy, ox) with oy, ox uniform in ``[0, 2*pad]``,
    then flip horizontally with probability 1/2 (when ``flip``). Offsets are drawn first
    (oy for all images, then ox), then the flips, all from ``generator``, which must live on
    ``x.device`` (or be None for the global RNG). ``x``: uint8 or float (N, C, H, W); the output
    has the same shape, dtype and value range.

    ``chunk_rows``: gather that many images at a time into one output buffer (the same draws,
    the same pixels). On CUDA the gather's index tensors take ~24 bytes a pixel position, ~10x
    a uint8 set's own size (1M CIFAR-size rows: a 30 GiB device peak for 2.9 GiB of pixels,
    bench/results/gpu_data_path_run2.md; a 2 GiB set ran out of memory under a 16 GiB cap,
    bench/results/gpu_data_path.md); :func:`chunk_rows_for` bounds them.
    """
    check_pad(pad, tuple(x.shape[-2:]), mode)
    n = x.shape[0]
    oy, ox, fl = crop_flip_draws(n, pad, x.device, generator, flip)
    # window at offset o in the padded image = input shifted by (pad - o)
    if chunk_rows is None or chunk_rows >= n:
        return shift_images(x, pad - oy, pad - ox, fl, mode=mode)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    c, h, w = x.shape[1:]
    out = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)  # shift_images' layout
    for a in range(0, n, chunk_rows):
        b = a + chunk_rows
        out[a:b] = shift_images(x[a:b], pad - oy[a:b], pad - ox[a:b], fl[a:b], mode=mode)
    return out


AUG_INDEX_BYTES = 512 * 2**20  # bytes of gather indices per chunk of a whole-set augmentation (~24 a pixel position)


def chunk_rows_for(shape: tuple[int, ...], index_bytes: int = AUG_INDEX_BYTES) -> int:
    """Images per chunk of :func:`random_crop_flip` over an (N, C, H, W) set: its index tensors
    (three int64 per output position) within ``index_bytes``. 32x32: 21,845 images."""
    h, w = int(shape[-2]), int(shape[-1])
    return max(1, int(index_bytes) // (24 * h * w))


def check_pad(pad: int, side: tuple[int, int], mode: str = "reflect") -> None:
    """Refuse a reflect pad that reaches past the image (``side``: (H, W))."""
    if mode == "reflect" and pad > min(side) - 1:
        raise ValueError(f"reflect pad {pad} must be smaller than the image side {tuple(side)}")


def crop_flip_draws(n: int, pad: int, device, generator: Optional[torch.Generator] = None,
                    flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(oy, ox, flip)`` draws of :func:`random_crop_flip` for ``n`` images, in its order.

    The streamed training path draws them for the whole set once per epoch and applies each
    batch's share with :func:`shift_images`: the same crops as the resident path, and every
    data-parallel rank's generator advances alike whatever its shard of a batch."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad > 0:
        oy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    else:
        oy = ox = torch.zeros(n, dtype=torch.long, device=device)
    if flip:
        fl = torch.randint(0, 2, (n,), device=device, generator=generator).bool()
    else:
        fl = torch.zeros(n, dtype=torch.bool, device=device)
    return oy, ox, fl


# --------------------------------------------------------------------------------------------
# test-time augmentation
# --------------------------------------------------------------------------------------------

#: (flip, dy, dx) of every TTA view for ``shift=s``: identity, hflip, and both of them
#: translated by (+s, +s) (content moves down-right) and (-s, -s) (up-left), reflect-padded.
def tta_view_specs(shift: int = 2, flip: bool = True) -> list[tuple[bool, int, int]]:
    flips = (False, True) if flip else (False,)
    specs = [(fl, 0, 0) for fl in flips]
    if shift:
        for fl in flips:
            specs += [(fl, shift, shift), (fl, -shift, -shift)]
    return specs


def tta_views(x: torch.Tensor, shift: int = 2, flip: bool = True) -> list[torch.Tensor]:
    """The TTA views of a batch, in :func:`tta_view_specs` order (the flip is applied to the
    shifted image)."""
    out = []
    for fl, dy, dx in tta_view_specs(shift, flip):
        if not fl and dy == 0 and dx == 0:
            out.append(x)
        else:
            out.append(shift_images(x, dy, dx, fl, mode="reflect"))
    return out


@torch.no_grad()
def tta_logits(model: nn.Module, x: torch.Tensor, shift: int = 2, flip: bool = True) -> torch.Tensor:
    """Logits averaged (arithmetic mean, equal weights, in float32) over six views of ``x``:
    identity, horizontal flip, identity translated by (+shift, +shift) and (-shift, -shift),
    and the flipped image translated by the same two offsets; translates use reflect padding.
    ``shift=0`` gives the two-view flip TTA; ``flip=False`` drops the flipped views. All views of a batch go through the model as one
    concatenated batch (the model must be in eval mode for per-sample independence)."""
    views = tta_views(x, shift, flip)
    n = x.shape[0]
    batch = torch.cat([v.contiguous(memory_format=torch.channels_last) for v in views])
    logits = model(batch).float()
    return logits.view(len(views), n, -1).mean(0)
