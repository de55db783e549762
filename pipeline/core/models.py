"""Classifiers and checkpoints (torch + torchvision only).

Every model starts with a :class:`Normalize` layer holding the training mean/std, so callers
always pass raw pixels (uint8, or float on the 0..255 scale) in NCHW layout. The arguments that
rebuild a model (:func:`model_args`) travel in the checkpoint next to its state dict
(``pipeline.checkpoints``: safetensors, no pickle; files are the edge's business, not the core's).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.schema import MODEL_NAMES  # noqa: F401 - one list of model names, in the schema

HEADS = ("linear", "lgm")  # lgm: pipeline.core.losses.LGMHead (train.loss=lgm)


class Normalize(nn.Module):
    """Raw pixels (0..255, any dtype) -> (x/255 - mean) / std, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if (std_t <= 0).any():
            raise ValueError(f"Normalize needs positive std, got {list(std)}")
        # Folded: x * scale + shift, with scale = 1/(255 std) and shift = -mean/std.
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int, in_channels: int, image_size: int, width: int = 32) -> nn.Sequential:
    """Two conv blocks (conv-bn-relu x2, 2x2 max-pool) and a linear head on a 2x2 pooled map.

    Sized for 8x8 digits (8 -> 4 -> 2); any image size works (the head pools to 2x2).
    """
    w = width
    layers: list[nn.Module] = [*_conv_bn(in_channels, w), *_conv_bn(w, w), nn.MaxPool2d(2)]
    layers += [*_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w)]
    if image_size >= 8:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(2 * w * 4, num_classes)]
    return nn.Sequential(*layers)


def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    head: str = "linear",
    lgm_covariance: str = "identity",
) -> nn.Sequential:
    """The classifier ``name`` behind a Normalize layer: ``Sequential(normalize, net)``.

    ``mean``/``std`` are per-channel statistics of the training images on the 0..1 scale
    (:func:`pipeline.core.data.channel_stats`); default 0.5/0.5. ``head="lgm"`` swaps the final
    linear layer for an LGM head (``identity`` or ``diag`` covariance); checkpoints written
    before heads existed have no ``head`` key and rebuild the default linear head.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
    if name == "small_cnn":
        net = small_cnn(num_classes, in_channels, image_size, width)
    elif name == "resnet18":
        net = resnet18(num_classes, in_channels)
    elif name == "fastnet":
        from .fastnet import build_fastnet

        net = build_fastnet(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
    else:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)}")
    if head == "lgm":
        from .losses import replace_head

        replace_head(net, lgm_covariance)
    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def model_args(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    head: str = "linear",
    lgm_covariance: str = "identity",
) -> dict[str, Any]:
    """The keyword arguments of :func:`build_model`, as stored in a checkpoint (plain types).

    ``head``/``lgm_covariance`` are stored only for an LGM head, so a linear model's arguments
    (and every earlier checkpoint) keep their exact keys."""
    extra: dict[str, Any] = {"head": head, "lgm_covariance": lgm_covariance} if head != "linear" else {}
    return {
        "name": name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "width": int(width),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        **extra,
    }


def from_args(args: dict[str, Any]) -> nn.Sequential:
    return build_model(**args)
