"""Remedies for a backdoored model (torch + numpy only): clean fine-tuning and fine-pruning on
a trusted reserve.

Truong et al. 2020 found that a few epochs of fine-tuning on a small clean set make a backdoor
ineffective: the trigger's shortcut is one the clean data never rewards, and a small learning
rate moves the weights off it without leaving the clean solution. :func:`finetune` is that
step, reusing :func:`pipeline.core.train.fit` (its optimizer, seeding and device handling) with
a constant rate and without re-initialising data-dependent layers. On digits it only partly
holds (bench/results/remedy_digits.md, 10% poison): 10 epochs on a 10% reserve leave
all-to-one BadNets at 25% and blend at 7-33% ASR, and a 1% reserve changes almost nothing.

The trusted reserve is a set of rows the user vouches for: rows of an approved snapshot, or rows
marked trusted in the config. :func:`trusted_reserve` draws one, stratified per class, from the
rows that a caller knows are clean (the bench: training rows the attack did not touch).

:func:`fine_prune` is the second option (Liu et al. 2018, "Fine-Pruning"): channels of the last
convolutional block that stay dormant on clean data are where a backdoor hides, so they are
switched off, then the model is fine-tuned with them held off. Chosen over ANP (Wu & Wang 2021)
on digits measurements (bench/results/remedy_digits.md, "Why fine-pruning"): a prototype of
ANP took ~8x the time (300 mask iterations, 9-18 s per model on a busy 2-core CPU against
~2 s), its result swung with its perturbation budget and pruning threshold, and at the paper's
settings (eps 0.4, threshold 0.2) it pruned nothing on a BadNets model. On a 10% reserve
fine-pruning brings BadNets (10% poison) to 0.7-1.8% ASR and blend to 0.6-5.7% for 0.7-2.2
points of accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from . import data as tdata
from .losses import LGMHead
from .predict import predict
from .train import ProgressFn, TrainSpec, fit, resolve_device, seed_everything

OPTIMIZERS = ("adam", "sgd")


class RemedyError(ValueError):
    """A remedy request the core refuses (the message says what to change)."""


def _check_rows(images: np.ndarray, labels: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise RemedyError(f"{what}: images must be a uint8 (N, H, W, C) array, got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise RemedyError(f"{what}: {len(images)} images but labels of shape {labels.shape}")
    if len(labels) and labels.dtype.kind not in "iu":
        raise RemedyError(f"{what}: labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


def trusted_reserve(
    labels: np.ndarray,
    fraction: float,
    seed: int = 0,
    exclude: Optional[Sequence[int]] = None,
    n_rows: Optional[int] = None,
) -> np.ndarray:
    """Sorted row indices of a clean reserve: ``round(fraction * n_rows)`` rows drawn without
    replacement from the rows not in ``exclude``, stratified per class (largest-remainder shares
    of the clean rows; when the reserve has room for one row per class, every class with a clean
    row gets at least one, which can add a row or two), from ``default_rng(seed)``.

    ``n_rows`` (default ``len(labels)``) sets the size the fraction refers to: the bench asks for
    1/5/10% *of the training rows* and draws them among the un-poisoned ones.
    """
    labels = np.asarray(labels)
    if not (0.0 < float(fraction) <= 1.0) or math.isnan(float(fraction)):
        raise RemedyError(f"reserve fraction must be in (0, 1], got {fraction}")
    keep = np.ones(len(labels), bool)
    if exclude is not None and len(exclude):
        keep[np.asarray(exclude, np.int64)] = False
    pool = np.flatnonzero(keep)
    total = int(round(float(fraction) * (len(labels) if n_rows is None else int(n_rows))))
    if total < 1 or len(pool) < total:
        raise RemedyError(f"a reserve of {total} rows cannot be drawn from {len(pool)} clean rows "
                          f"(fraction {fraction}): use a larger fraction or more clean rows")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[pool], return_counts=True)
    # largest-remainder allocation of ``total`` over classes, in proportion to their clean rows
    share = counts / counts.sum() * total
    alloc = np.floor(share).astype(int)
    for i in np.argsort(-(share - alloc), kind="stable")[: total - alloc.sum()]:
        alloc[i] += 1
    alloc = np.minimum(np.maximum(alloc, (total >= len(classes)) * 1), counts)
    picked = [rng.choice(pool[labels[pool] == c], size=k, replace=False) for c, k in zip(classes, alloc) if k]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def finetune(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    loss: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    freeze_norm: bool = False,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on a trusted clean reserve; returns :func:`fit`'s history.

    A constant learning rate (no warm-up: the model is trained already) and every parameter
    free. Batch norm trains as usual (batch statistics, running statistics move to the reserve),
    or with ``freeze_norm`` it normalises with the running statistics of the full training set
    and keeps them, while its scale and shift still train: a reserve of 13-135 rows in batches
    of 16 estimates them poorly (digits: ``freeze_norm`` removes blend backdoors far better at
    the same rate, bench/results/remedy_digits.md). ``loss`` defaults to
    the model's own: ``lgm`` for a model with an LGM head, else ``ce``. Data-dependent
    initialisation (fastnet's whitening) is not re-run: the reserve is far smaller than the
    training set. ``epochs=0`` leaves the model as it is and returns ``[]``.

    Units: ``lr`` is the optimizer step (Adam) or rate (SGD). Defaults (Adam 2e-3 constant =
    2/3 of the digits training peak, batch 16, 10 epochs) from the digits sweep
    (bench/results/remedy_digits_tune.md, a dev seed): the rate is the knob that matters. At
    1e-3 and below a 5% reserve leaves BadNets/blend ASR at 35-100%; 3e-3 and above remove more
    of the backdoor but cost up to 4 points of accuracy. Batch 64 gives a 67-row reserve 2 steps
    per epoch, and SGD at 0.01-0.05 left ASR at 100% in the first dev runs.
    """
    labels = _check_rows(images, labels, "finetune")
    if not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise RemedyError(f"finetune epochs must be an integer >= 0, got {epochs!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise RemedyError(f"finetune lr must be a finite number > 0, got {lr}")
    if batch_size < 2:
        raise RemedyError(f"finetune batch_size must be >= 2 (batch norm), got {batch_size}")
    if optimizer not in OPTIMIZERS:
        raise RemedyError(f"unknown finetune optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if len(labels) < 2:
        raise RemedyError(f"the trusted reserve has {len(labels)} rows: fine-tuning needs at least 2")
    num_classes = _num_classes(model)
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise RemedyError(f"reserve labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    if epochs == 0:
        return []
    if loss is None:
        loss = "lgm" if any(isinstance(m, LGMHead) for m in model.modules()) else "ce"
    spec = TrainSpec(epochs=int(epochs), batch_size=int(batch_size), optimizer=optimizer, lr=float(lr),
                     weight_decay=float(weight_decay), schedule="none", seed=int(seed), device=device, loss=loss)
    # fit() puts the model in training mode every epoch; a pre-hook puts each norm layer back in
    # eval mode just before it runs (no change to the shared loop, removed afterwards)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if freeze_norm else []
    hooks = [m.register_forward_pre_hook(_norm_eval) for m in norms]
    seed_everything(seed)  # dropout draws from the global generator: same seed, same run, whatever ran before
    try:
        return fit(model, images, labels, spec, progress, init_from_data=False)
    finally:
        for h in hooks:
            h.remove()


def _norm_eval(module: nn.Module, _args: tuple) -> None:
    module.training = False


def _num_classes(model: nn.Module) -> Optional[int]:
    """Output size of the classifier head (LGM or last Linear), or None when unknown."""
    heads = [m for m in model.modules() if isinstance(m, LGMHead)]
    if heads:
        return heads[-1].num_classes
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None



# --------------------------------------------------------------------------- fine-pruning


@dataclass
class FinePruneResult:
    """What :func:`fine_prune` did: the pruned layer (a ``named_modules`` name), its channels
    switched off (dormant first), the reserve accuracy before pruning, after pruning and after
    fine-tuning, and the fine-tuning history."""

    layer: str
    pruned: list[int]
    channels: int
    reserve_accuracy_before: float
    reserve_accuracy_pruned: float
    reserve_accuracy_after: float
    history: list[dict[str, float]] = field(default_factory=list)


def last_norm_layer(model: nn.Module) -> tuple[str, nn.BatchNorm2d]:
    """``(name, module)`` of the last ``BatchNorm2d``: the output of the last convolutional block.

    Zeroing a channel's scale and shift there switches the channel off exactly when only an
    activation with f(0) = 0 and pooling follow it (small_cnn: ReLU; fastnet: GELU). In
    ResNet-18 the last one sits before the residual add: pruning there removes the channel's
    last residual branch, the skip path still carries it.
    """
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise RemedyError(f"{type(model).__name__} has no BatchNorm2d: fine-pruning needs a last conv block with one")
    return norms[-1]


@torch.no_grad()
def channel_activity(model: nn.Module, images: np.ndarray, layer: nn.Module, batch_size: int = 512,
                     device: str | torch.device = "auto") -> np.ndarray:
    """(C,) mean post-ReLU activation of each channel of ``layer``'s output over ``images``
    (eval mode): Liu et al.'s dormancy measure."""
    dev = resolve_device(device)
    model.to(dev).eval()
    sums: list[torch.Tensor] = []  # per batch: (C,) sum over its images of each channel's spatial mean
    hook = layer.register_forward_hook(lambda _m, _i, out: sums.append(torch.relu(out.float()).mean((2, 3)).sum(0)))
    try:
        for i in range(0, len(images), batch_size):
            model(tdata.to_device(images[i : i + batch_size], dev))
    finally:
        hook.remove()
    total = torch.stack(sums).sum(0)
    return (total / len(images)).cpu().numpy()


def fine_prune(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    max_accuracy_drop: float = 0.05,
    max_fraction: float = 0.9,
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    optimizer: str = "adam",
    progress: Optional[ProgressFn] = None,
    freeze_norm: bool = False,
) -> FinePruneResult:
    """Fine-pruning (Liu et al. 2018) in place: prune, then :func:`finetune` on the reserve.

    1. Rank the channels of the last conv block (:func:`last_norm_layer`) by their mean
       activation on the reserve (:func:`channel_activity`), most dormant first.
    2. Switch off channels in that order (scale and shift of the norm layer set to 0) while the
       reserve accuracy stays within ``max_accuracy_drop`` (fraction, 0.05 = 5 points; Liu et al.
       stop at 4 points on a validation set; a 67-row digits reserve moves in 1.5-point steps)
       of the unpruned model's, and at most ``max_fraction`` of the channels.
    3. Fine-tune with the pruned channels held at 0 (``torch.nn.utils.prune`` masks), then make
       the pruning permanent: the state dict keeps its keys, so the checkpoint loads into a
       freshly built model of the same arguments.
    """
    labels = _check_rows(images, labels, "fine_prune")
    if not 0.0 <= max_accuracy_drop <= 1.0:
        raise RemedyError(f"max_accuracy_drop is a fraction in [0, 1], got {max_accuracy_drop}")
    if not 0.0 < max_fraction < 1.0:
        raise RemedyError(f"max_fraction must be in (0, 1): pruning every channel leaves no model, got {max_fraction}")
    if len(labels) < 2:
        raise RemedyError(f"the trusted reserve has {len(labels)} rows: fine-pruning needs at least 2")
    name, norm = last_norm_layer(model)
    order = np.argsort(channel_activity(model, images, norm, device=device), kind="stable")
    c = len(order)
    w0, b0 = norm.weight.detach().clone(), norm.bias.detach().clone()

    def accuracy_with(k: int) -> float:
        with torch.no_grad():
            norm.weight.copy_(w0)
            norm.bias.copy_(b0)
            off = torch.as_tensor(order[:k], device=w0.device)
            norm.weight[off] = 0.0
            norm.bias[off] = 0.0
        return float((predict(model, images, device=device, amp=False) == labels).mean())

    before = accuracy_with(0)
    k_keep, acc_keep = 0, before
    # one channel at a time, as Liu et al.; stride so that a wide layer (ResNet's 512) costs at
    # most ~64 reserve passes
    step = max(1, c // 64)
    for k in range(step, int(max_fraction * c) + 1, step):
        acc = accuracy_with(k)
        if acc < before - max_accuracy_drop:
            break
        k_keep, acc_keep = k, acc
    accuracy_with(k_keep)
    mask = torch.ones_like(w0)
    mask[torch.as_tensor(order[:k_keep], device=w0.device)] = 0.0
    tprune.custom_from_mask(norm, "weight", mask)
    tprune.custom_from_mask(norm, "bias", mask.clone())
    try:
        history = finetune(model, images, labels, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                           device=device, optimizer=optimizer, progress=progress, freeze_norm=freeze_norm)
    finally:
        tprune.remove(norm, "weight")
        tprune.remove(norm, "bias")
    after = float((predict(model, images, device=device, amp=False) == labels).mean())
    return FinePruneResult(layer=name, pruned=[int(i) for i in order[:k_keep]], channels=c,
                           reserve_accuracy_before=before, reserve_accuracy_pruned=acc_keep,
                           reserve_accuracy_after=after, history=history)
