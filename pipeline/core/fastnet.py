"""fastnet: a small, wide, shallow CIFAR-scale network built to train in seconds on one GPU.

Ideas from the published CIFAR-10 speed runs, written here from scratch:

* **Patch whitening** first layer: a frozen k x k conv (k=2) whose filters are the eigenvectors
  of the covariance of k x k input patches, scaled by 1/sqrt(eigenvalue + eps), followed by
  their negatives (so a GELU keeps both signs). Its output on training patches has ~identity
  covariance: the first learned layer sees decorrelated, unit-variance inputs from step one.
  Initialised from data by :func:`init_whitening` (``FastNet.data_init``, which
  ``core.train.fit`` calls); its bias stays trainable.
* Three wide blocks (widths w, 4w, 4w for ``width=w``): conv3x3 -> maxpool 2 (ceil) -> BN ->
  GELU -> conv3x3 -> BN -> GELU. Convs start near identity (a Dirac term on the first
  channels), which lets a large learning rate work from the first step.
* Head: global max-pool, a bias-free linear layer, logits scaled by ``logit_scale`` (1/8), a
  temperature that keeps the softmax soft with the large learning rate.
* Training recipe (conf/train/fastnet.yaml): batch 1024, SGD Nesterov one-cycle, label smoothing
  0.2, reflect-padded 2 px translate + flip (``augment_pad = 2``), flip+translate TTA.

Like every model of ``core.models``, it is wrapped by ``build_model`` behind a ``Normalize``
layer; bare, it takes normalised float NCHW input (uint8 is cast to float, unnormalised).
Shapes: 32x32 -> whiten 31 -> 16 -> 8 -> 4 -> 1; 8x8 -> 7 -> 4 -> 2 -> 1. Any side >= 2 works.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():  # near-identity start: add a Dirac kernel on the first min(cin, cout) channels
        m = min(cin, cout)
        conv.weight[:m, :m, 1, 1] += torch.eye(m)
    return conv


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float = 0.2):
        super().__init__()
        self.conv1 = _conv(cin, cout)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.bn1 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = _conv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    augment_pad = 2  # px: translate range of the training augmentation (core.train.fit reads it)

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, whiten_kernel: int = 2,
                 logit_scale: float = 0.125, bn_momentum: float = 0.2):
        super().__init__()
        k = whiten_kernel
        d = in_channels * k * k
        self.whiten = nn.Conv2d(in_channels, 2 * d, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # fixed by init_whitening; only its bias trains
        self.register_buffer("whitened", torch.zeros((), dtype=torch.bool))
        widths = (width, 4 * width, 4 * width)
        self.act = nn.GELU()
        self.blocks = nn.Sequential(
            Block(2 * d, widths[0], bn_momentum),
            Block(widths[0], widths[1], bn_momentum),
            Block(widths[1], widths[2], bn_momentum),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            x = x.float()
        x = self.act(self.whiten(x))
        # global max-pool as a reduction: same values as AdaptiveMaxPool2d(1), 12% faster
        # forward+backward on the H100 (bench/results/cifar10_tune.md)
        x = self.blocks(x).amax(dim=(2, 3))
        return self.head(x) * self.logit_scale

    def data_init(self, root: nn.Module, images: np.ndarray) -> None:
        """Hook for training loops: whiten from the training images (``root`` = the full
        model, whose earlier layers, e.g. Normalize, feed this one)."""
        init_whitening(root, images)


class _Captured(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__("captured")
        self.value = value


def _find_fastnet(model: nn.Module) -> FastNet:
    for m in model.modules():
        if isinstance(m, FastNet):
            return m
    raise ValueError("init_whitening needs a model containing a FastNet")


def _sample(images: np.ndarray, max_images: int) -> np.ndarray:
    step = max(1, len(images) // max_images)  # strided, not the first rows: sources are class-sorted
    return images[::step][:max_images]


@torch.no_grad()
def whitening_input(model: nn.Module, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The tensor the whitening conv of ``model`` receives for uint8 (N, H, W, C) ``images``
    (the model runs up to that layer only: a pre-hook captures its input and stops)."""
    net = _find_fastnet(model)
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    dev = net.whiten.weight.device
    x = x.to(dev).permute(0, 3, 1, 2)

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        raise _Captured(args[0])

    handle = net.whiten.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Captured as cap:
        return cap.value.float()
    finally:
        handle.remove()
    raise RuntimeError("the whitening layer was not reached")  # pragma: no cover


@torch.no_grad()
def patch_covariance(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and covariance (d, d), float64, of all k x k patches of (N, C, H, W) ``x``,
    patch vectors ordered like a conv weight's (C, k, k) flattening. Computed on ``x``'s device;
    the patches come from strided views (``Tensor.unfold``), not ``F.unfold``, whose CUDA
    im2col launches one kernel per image."""
    c = x.shape[1]
    p = x.double().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k) view
    p = p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
    mean = p.mean(0)
    pc = p - mean
    cov = pc.T @ pc / max(1, p.shape[0] - 1)
    return mean, cov


@torch.no_grad()
def init_whitening(model: nn.Module, images: np.ndarray | torch.Tensor, max_images: int = 5000,
                   eps: float = 5e-4) -> None:
    """Set the FastNet whitening conv of ``model`` from uint8 (N, H, W, C) training ``images``.

    Filters i < d: ``v_i / sqrt(lambda_i + eps)`` (eigen-pairs of the patch covariance, largest
    first); filters d + i: their negatives. Bias = minus each filter's response to the mean
    patch, so the output on training patches is centred with covariance ~ identity (exactly
    ``diag(lambda / (lambda + eps))``). Uses at most ``max_images`` images, strided.
    """
    net = _find_fastnet(model)
    conv = net.whiten
    k = conv.kernel_size[0]
    x = whitening_input(model, _sample(images, max_images))
    mean, cov = patch_covariance(x, k)
    # a d x d eigenproblem (d = 12): solved on the CPU, which spares creating a cuSOLVER context
    mean, cov = mean.cpu(), cov.cpu()
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    filt = (evecs / torch.sqrt(evals + eps)).T  # (d, d): row i = filter i
    w = torch.cat([filt, -filt]).reshape(conv.weight.shape)
    b = -(torch.cat([filt, -filt]) @ mean)
    conv.weight.copy_(w.to(conv.weight.dtype))  # copy_ moves to the conv's device
    conv.bias.copy_(b.to(conv.bias.dtype))
    net.whitened.fill_(True)


def build_fastnet(num_classes: int, in_channels: int, image_size: int, width: int = 64, **kw: Any) -> FastNet:
    """A bare FastNet (no Normalize: ``core.models.build_model("fastnet", ...)`` adds it).

    ``width``: channels of the first block (the others get 4x). ``image_size`` is accepted for
    the common signature; every side >= 2 works. Extra keywords go to :class:`FastNet`.
    """
    if image_size < 2:
        raise ValueError(f"fastnet needs images of at least 2x2 pixels, got {image_size}")
    return FastNet(num_classes=num_classes, in_channels=in_channels, width=width, **kw)


build = build_fastnet  # the name core.models.build_model calls
