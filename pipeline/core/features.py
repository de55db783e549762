"""Penultimate-layer features: what the classifier head sees (torch only).

Detectors of poisoned samples (spectral signatures, activation clustering), the clean-label
feature-collision attack and the LGM likelihood all work in this space, so there is one way to
reach it: a forward hook on the classifier head's input. The head is the last module that sets
``is_head = True`` (a custom head, e.g. an LGM layer), else the last ``nn.Linear`` of the model
(small_cnn's, fastnet's and torchvision ResNet-18's final layer).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import data as tdata
from .train import resolve_device


def classifier_head(model: nn.Module) -> nn.Module:
    """The module whose input is the penultimate representation (see the module docstring)."""
    flagged = [m for m in model.modules() if getattr(m, "is_head", False)]
    if flagged:
        return flagged[-1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear and no module with is_head=True: "
                         "cannot locate the penultimate layer")
    return linears[-1]


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` of one batch in a single forward pass; differentiable (crafting
    attacks and trigger inversion need gradients through the features)."""
    captured: list[torch.Tensor] = []
    hook = classifier_head(model).register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    if not captured:
        raise RuntimeError("the classifier head was not called in the forward pass")
    return logits, captured[-1].flatten(1)


@torch.no_grad()
def penultimate_features(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int = 512,
    device: str | torch.device = "auto",
    return_logits: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 -> (N, D) float32 features (and (N, K) logits with ``return_logits``).

    Eval mode, plain forward pass (no TTA, no autocast: detectors compare distances, and bf16
    rounding would blur small clusters)."""
    if len(images) == 0:
        raise ValueError("penultimate_features needs at least one image")
    dev = resolve_device(device)
    model.to(dev).eval()
    # filled in place, not a list of batches concatenated at the end: that held every feature
    # twice at the peak (small_cnn's 256-wide layer at 1M rows: 1 GiB more)
    f_all = lg_all = None
    n = len(images)
    for i in range(0, n, batch_size):
        xb = tdata.to_device(images[i : i + batch_size], dev)
        lg, f = forward_with_features(model, xb)
        if f_all is None:
            f_all = np.empty((n, *f.shape[1:]), np.float32)
            lg_all = np.empty((n, *lg.shape[1:]), np.float32)
        f_all[i : i + len(xb)] = f.float().cpu().numpy()
        lg_all[i : i + len(xb)] = lg.float().cpu().numpy()
    return (f_all, lg_all) if return_logits else f_all
