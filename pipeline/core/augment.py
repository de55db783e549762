"""The GPU data path: resident uint8 data, batched on-device augmentation, fast fit and TTA.

Imports torch and numpy only (core budget). Everything runs on CUDA and, unchanged, on CPU.

* The whole training set lives on the device as one uint8 NCHW tensor (50,000 CIFAR-10 images
  are 150 MB). There is no DataLoader and no per-image Python: an epoch is one vectorised
  crop+flip gather, one permutation and a sequence of slices.
* ``random_crop_flip`` pads by ``pad`` pixels with **reflect** padding (default; ``mode="zeros"``
  pads with zeros) and takes a window at a per-image random offset in ``[0, 2*pad]``, then
  flips half of the images horizontally. Reflection keeps border statistics natural (no black
  frames the model never sees at test time) and is what the TTA translates use, so training
  and test views come from the same distribution. It is computed as one gather through index
  tables (no padded copy is materialised), so it is the same on uint8 and float input.
* ``fit_resident``: SGD (Nesterov) with a one-cycle (linear warm-up, linear decay) schedule,
  label smoothing, bf16 autocast and channels_last on CUDA, optional ``torch.compile``. The loop
  never synchronises with the host: the learning rate is a Python float computed from the step
  index, losses are accumulated on the device and read once per epoch.
* ``tta_logits``: the mean of the logits over six views, see its docstring.

Models take raw pixels (uint8, or float in 0..255) and normalise inside (design.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np
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
                     flip: bool = True, mode: str = "reflect") -> torch.Tensor:
    """Padded random crop + random horizontal flip of a batch, on ``x``'s device.

    Equivalent, image by image, to: pad by ``pad`` on every side (reflect, or zeros), take the
    H x W window whose top-left corner is at (oy, ox) with oy, ox uniform in ``[0, 2*pad]``,
    then flip horizontally with probability 1/2 (when ``flip``). Offsets are drawn first
    (oy for all images, then ox), then the flips, all from ``generator``, which must live on
    ``x.device`` (or be None for the global RNG). ``x``: uint8 or float (N, C, H, W); the output
    has the same shape, dtype and value range.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if mode == "reflect" and pad > min(x.shape[-2:]) - 1:
        raise ValueError(f"reflect pad {pad} must be smaller than the image side {tuple(x.shape[-2:])}")
    n = x.shape[0]
    dev = x.device
    if pad > 0:
        oy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    else:
        oy = ox = torch.zeros(n, dtype=torch.long, device=dev)
    if flip:
        fl = torch.randint(0, 2, (n,), device=dev, generator=generator).bool()
    else:
        fl = torch.zeros(n, dtype=torch.bool, device=dev)
    # window at offset o in the padded image = input shifted by (pad - o)
    return shift_images(x, pad - oy, pad - ox, fl, mode=mode)


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


# --------------------------------------------------------------------------------------------
# device, residency, schedule
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available: use device=auto or cpu")
    return torch.device(device)


def to_resident(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) host array -> uint8 (N, C, H, W) device tensor, channels_last strided
    (a free permute of the NHWC buffer). Copied once; pinned for an async transfer on CUDA."""
    t = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {t.dtype} {tuple(t.shape)}")
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True).permute(0, 3, 1, 2)


def onecycle_lr(step: int, total: int, peak: float, warmup: float = 0.2,
                start: float = 0.1, end: float = 0.0) -> float:
    """One-cycle, piecewise linear: ``start*peak`` -> ``peak`` over the first ``warmup`` share of
    the steps, then linearly down to ``end*peak`` at the last step."""
    if total <= 1:
        return peak
    t = step / (total - 1)
    if t < warmup:
        return peak * (start + (1 - start) * t / warmup)
    return peak * (1 + (end - 1) * (t - warmup) / max(1e-12, 1 - warmup))


@dataclass
class ResidentSpec:
    """Hyper-parameters of :func:`fit_resident` (a superset of conf/train's keys)."""

    epochs: int = 10
    batch_size: int = 512
    optimizer: str = "sgd"  # sgd (Nesterov) | adam
    lr: float = 0.2  # peak learning rate
    weight_decay: float = 5e-4  # on weights of conv/linear layers only (not on biases, BN)
    momentum: float = 0.9
    schedule: str = "onecycle"  # onecycle | none
    warmup: float = 0.2  # one-cycle: share of the steps spent warming up
    label_smoothing: float = 0.0
    augment: bool = True
    pad: Optional[int] = None  # crop padding, px; None = model.augment_pad or 4
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = True  # (CUDA only)
    compile: bool = False  # torch.compile the model (CUDA only)
    drop_last: bool = True  # drop the last incomplete batch (static shapes)

    @classmethod
    def from_config(cls, train_cfg: Any, **overrides: Any) -> "ResidentSpec":
        """From a pipeline.config.TrainConfig (duck-typed: no config import in the core)."""
        kw = {f: getattr(train_cfg, f) for f in cls.__dataclass_fields__ if hasattr(train_cfg, f)}
        kw.update(overrides)
        return cls(**kw)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit_resident(model: nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 spec: ResidentSpec, progress: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Train ``model`` in place on uint8 (N, H, W, C) ``images`` kept on the device.

    Every submodule with a ``data_init(root_model, images)`` method (fastnet's patch whitening)
    is initialised first from the host uint8 images. Returns a history dict: ``loss`` (mean train loss
    per epoch), ``seconds`` (wall time per epoch, synchronised), ``spec``, ``device``.
    """
    dev = resolve_device(spec.device)
    cuda = dev.type == "cuda"
    g = torch.Generator(device=dev)
    g.manual_seed(int(spec.seed))
    torch.manual_seed(int(spec.seed))
    inits = [m.data_init for m in model.modules() if callable(getattr(m, "data_init", None))]
    if inits:
        host = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        for init in inits:
            init(model, host)
    model.to(dev)
    if cuda and spec.channels_last:
        model.to(memory_format=torch.channels_last)
    x_all = to_resident(images, dev)
    y_all = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().to(dev)
    n = x_all.shape[0]
    bs = min(spec.batch_size, n)
    steps_per_epoch = n // bs if spec.drop_last else math.ceil(n / bs)
    total = max(1, steps_per_epoch * spec.epochs)
    pad = spec.pad if spec.pad is not None else int(getattr(model, "augment_pad", 4))

    if spec.optimizer == "sgd":
        opt = torch.optim.SGD(_param_groups(model, spec.weight_decay), lr=spec.lr, momentum=spec.momentum,
                              nesterov=spec.momentum > 0)
    elif spec.optimizer == "adam":
        opt = torch.optim.Adam(_param_groups(model, spec.weight_decay), lr=spec.lr)
    else:
        raise ValueError(f"unknown optimizer {spec.optimizer!r}: use sgd or adam")
    step_fn = torch.compile(model) if (spec.compile and cuda) else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and spec.amp) else _Null()
    crit = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)

    history: dict[str, Any] = {"loss": [], "seconds": [], "spec": asdict(spec), "device": str(dev)}
    step = 0
    model.train()
    for epoch in range(spec.epochs):
        t0 = time.perf_counter()
        x_ep = random_crop_flip(x_all, pad, g) if spec.augment else x_all
        if cuda and spec.channels_last:
            x_ep = x_ep.contiguous(memory_format=torch.channels_last)
        perm = torch.randperm(n, device=dev, generator=g)
        loss_sum = torch.zeros((), device=dev)
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            xb, yb = x_ep[idx], y_all[idx]
            lr = onecycle_lr(step, total, spec.lr, spec.warmup) if spec.schedule == "onecycle" else spec.lr
            for group in opt.param_groups:
                group["lr"] = lr
            with amp:
                loss = crit(step_fn(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
        if cuda:
            torch.cuda.synchronize(dev)
        history["seconds"].append(time.perf_counter() - t0)
        history["loss"].append(float(loss_sum) / max(1, steps_per_epoch))  # one sync per epoch
        if progress is not None:
            progress({"epoch": epoch + 1, "loss": history["loss"][-1], "seconds": history["seconds"][-1]})
    model.eval()
    return history


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 1024,
                   device: str | torch.device = "auto", tta: bool = False, tta_shift: int = 2,
                   amp: bool = True, channels_last: bool = True) -> torch.Tensor:
    """float32 logits (N, classes) on the CPU for uint8 (N, H, W, C) ``images`` (eval mode;
    bf16 autocast and channels_last on CUDA; TTA as in :func:`tta_logits`)."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    model.eval().to(dev)
    if cuda and channels_last:
        model.to(memory_format=torch.channels_last)
    x_all = to_resident(images, dev)
    out = []
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and amp) else _Null()
    with ctx:
        for b in range(0, x_all.shape[0], batch_size):
            xb = x_all[b:b + batch_size]
            logits = tta_logits(model, xb, tta_shift) if tta else model(xb).float()
            out.append(logits.float())
    return torch.cat(out).cpu() if out else torch.zeros(0)


def predict_classes(model: nn.Module, images: np.ndarray | torch.Tensor, **kw: Any) -> np.ndarray:
    """Class indices (int64) for uint8 (N, H, W, C) images; keywords as :func:`predict_logits`."""
    return predict_logits(model, images, **kw).argmax(1).numpy().astype(np.int64)
