"""The training loop: device-resident uint8 data, on-device augmentation, Adam/SGD, one-cycle,
bf16 and channels_last on CUDA, no host synchronisation inside an epoch.

No file, config or logging library here: the stage passes the schema's ``TrainConfig`` (named
``TrainSpec`` here) and an optional ``progress`` callback (it draws the progress bar and logs metrics).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from pipeline.schema import TrainConfig

from . import augment as aug
from . import data as tdata
from . import heap
from .losses import make_loss
from .models import build_model, model_args


# The training hyper-parameters are the config schema's own type: no mirrored copy to keep in step.
TrainSpec = TrainConfig

ProgressFn = Callable[[dict[str, Any]], None]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when present, else cpu. Asking for cuda without one is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available: use device=auto or cpu")
    return dev


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA too
    np.random.seed(seed % 2**32)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weights (ndim > 1) with ``weight_decay``, biases and
    norm parameters (ndim <= 1) without. Frozen parameters (fastnet's whitening) are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    groups = param_groups(model, spec.weight_decay)
    # fused kernels on CUDA: one optimizer launch per step instead of several per parameter group
    # (its own gain was not isolated: bench/results/cifar10_tune.md compares machines, not this)
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) else {}
    if spec.optimizer == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, **fused)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.momentum > 0, **fused)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}: use adam or sgd")


def make_schedule(opt: torch.optim.Optimizer, spec: TrainSpec, total_steps: int):
    if spec.schedule == "none":
        return None
    if spec.schedule == "onecycle":
        if total_steps < 4:  # too short to warm up and anneal: constant rate
            return None
        # 25% warm-up, at least 2 steps per phase (OneCycleLR divides by the phase length)
        pct = min(0.5, max(0.25, 2.0 / total_steps))
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=total_steps,
                                                   pct_start=pct, anneal_strategy="linear",
                                                   cycle_momentum=spec.optimizer == "sgd")
    raise ValueError(f"unknown schedule {spec.schedule!r}: use none or onecycle")


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; a last batch of a single image is dropped (batch norm needs 2)."""
    steps = math.ceil(n / batch_size)
    if steps > 1 and n % batch_size == 1:
        steps -= 1
    return max(steps, 1)


def augment_pad(model: nn.Module, default: int) -> int:
    """The crop padding of ``model``: the ``augment_pad`` of the model or of its first submodule
    that sets one (``build_model`` wraps nets as ``Sequential(normalize, net)``), else ``default``."""
    for m in model.modules():
        pad = getattr(m, "augment_pad", None)
        if pad is not None:
            return int(pad)
    return int(default)


def run_data_init(model: nn.Module, images: np.ndarray) -> int:
    """Call ``data_init(model, images)`` on every submodule defining it (fastnet's patch
    whitening), with the host uint8 (N, H, W, C) images; returns how many were called."""
    inits = [m.data_init for m in model.modules() if callable(getattr(m, "data_init", None))]
    for init in inits:
        init(model, images)
    return len(inits)


# --- issue 14 (wt-team): data-parallel hook of fit(), filled in by pipeline.core.ddp ---
@dataclass(frozen=True)
class DataParallel:
    """How :func:`fit` runs as one rank of a data-parallel job (:mod:`pipeline.core.ddp` builds it).

    Every rank holds the whole data set and draws the same permutation (same seed), so all ranks
    walk the same global batches; ``shard`` takes this rank's slice of each one. ``wrap`` returns
    the module whose backward averages gradients over the ranks (DistributedDataParallel), and
    ``all_sum`` sums a tensor over the ranks (for the epoch's loss and accuracy). The loss of a
    shard is scaled by ``shard * world / batch`` so the averaged gradient is the gradient of the
    global batch's mean loss even when shards differ in size: the same optimisation as one
    process with the same batch size and number of steps (batch-norm statistics aside, see
    pipeline/core/ddp.py). The scaling assumes the loss is a mean over the batch's samples.
    """

    rank: int
    world: int
    wrap: Callable[[nn.Module], nn.Module]
    all_sum: Callable[[torch.Tensor], torch.Tensor]

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tensor_split(idx, self.world)[self.rank]


def _check_shards(n: int, batch_size: int, steps: int, world: int) -> None:
    sizes = [min(batch_size, n - s * batch_size) for s in range(steps)]
    if min(sizes) < world:
        raise ValueError(
            f"a batch of {min(sizes)} images (the last of {n} at batch size {batch_size}) cannot be split "
            f"over {world} ranks: choose a batch size that leaves a last batch of 0 or >= {world} images")
# --- end issue 14 ---


def fit(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    spec: TrainSpec,
    progress: Optional[ProgressFn] = None,
    init_from_data: bool = True,
    parallel: Optional[DataParallel] = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on (N, H, W, C) uint8 ``images`` and int ``labels``.

    First every submodule's ``data_init(model, images)`` hook runs (:func:`run_data_init`),
    unless ``init_from_data=False`` (fine-tuning a trained model on a small reserve must keep
    the layers initialised from the full training set). The criterion is
    :func:`pipeline.core.losses.make_loss` of ``spec.loss``.
    The data is uploaded once and stays on the device (``resident``), or, when its pixels exceed
    ``spec.resident_max_mib`` (``spec.host_resident_max_mib`` on a CPU; ``spec.data_path: auto``) or ``data_path: stream``, is gathered
    batch by batch on the host through a DataLoader (``spec.loader_workers`` processes) and
    uploaded per batch: memory then grows with the batch size, not with N, and ``images`` may be
    any (N, H, W, C) uint8 array-like (an ``np.memmap``). On that path host allocations of at
    least ``spec.stream_map_mib`` MiB get their own mapping (:func:`pipeline.core.heap.map_large`,
    for the rest of the process), so resident memory follows one batch's tensors through the
    epoch. Both paths train on the same batches in the same order, with the same crops and flips
    (tests/test_core.py). All randomness of the loop (the per-epoch permutation, crop offsets and
    flips) comes from one ``torch.Generator`` on the training device seeded with ``spec.seed``:
    nothing random crosses from the host, and a seed gives the same run on the same device (CPU
    and CUDA draw different numbers). With ``spec.augment`` the whole resident set is
    cropped+flipped once per epoch
    (:func:`pipeline.core.augment.random_crop_flip`, reflect padding of :func:`augment_pad`
    pixels), then batches are gathered from it. Loss and accuracy are accumulated on the device
    and read once per epoch.

    ``progress`` gets ``{"event": "step", epoch, step, steps, images}`` after each batch and
    ``{"event": "epoch", **history row}`` after each epoch. Returns one row per epoch:
    ``epoch, loss, train_accuracy, lr, seconds, images_per_s``.

    ``parallel``: run as one rank of a data-parallel job (:class:`DataParallel`); the history
    then covers the global batches (summed over ranks), ``images`` in step events this rank's.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) < 2:
        raise ValueError("training needs at least 2 images")
    device = resolve_device(spec.device)
    cuda = device.type == "cuda"
    channels_last = spec.channels_last and cuda
    use_amp = spec.amp and cuda

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if init_from_data:
        run_data_init(model, images)  # on the training device (fastnet's whitening: 1 s on CPU, ms on a GPU)
    pad = augment_pad(model, spec.aug_pad)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(spec.seed))
    n = len(images)
    path = tdata.data_path_for(images, spec, torch.device(device).type)
    if path == "resident":
        x_all = tdata.to_device(images, device, channels_last=channels_last)
        y_all = torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device)
    else:
        x_all = y_all = None
        labels_host = np.asarray(labels, dtype=np.int64)
        if spec.stream_map_mib:  # flat host memory over the epoch (conf/train: stream_map_mib)
            heap.map_large(int(spec.stream_map_mib) * 2**20)

    opt = make_optimizer(model, spec)
    steps = steps_per_epoch(n, spec.batch_size)
    sched = make_schedule(opt, spec, spec.epochs * steps)
    loss_fn = make_loss(model, spec.loss, spec.lgm_alpha, spec.lgm_lambda, spec.label_smoothing)
    if parallel is not None:  # issue 14: DDP
        _check_shards(n, spec.batch_size, steps, parallel.world)
    module = parallel.wrap(model) if parallel is not None else model
    forward = torch.compile(module) if (spec.compile and cuda) else module

    history: list[dict[str, float]] = []
    heap.release()  # what earlier phases of the process freed (a stage's load, another model's fit)
    for epoch in range(1, spec.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        if path == "resident":
            x_ep = (aug.random_crop_flip(x_all, pad, gen, chunk_rows=aug.chunk_rows_for(x_all.shape))
                    if spec.augment else x_all)
            if channels_last:
                x_ep = x_ep.contiguous(memory_format=torch.channels_last)  # no-op for crop output
        elif spec.augment:  # the resident path's draws for every row, in its order (same crops)
            aug.check_pad(pad, tuple(images.shape[1:3]))
            oy, ox, fl = aug.crop_flip_draws(n, pad, device, gen)
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        batches = None
        if path == "stream":  # the same permutation and batches as resident, gathered on the host
            host_perm = perm.cpu()
            shards = []
            for s in range(steps):
                b = host_perm[s * spec.batch_size : (s + 1) * spec.batch_size]
                shards.append((parallel.shard(b) if parallel is not None else b).numpy())
            batches = iter(tdata.batch_loader(images, labels_host, shards, spec.loader_workers, pin_memory=cuda))
        for step in range(steps):
            idx = perm[step * spec.batch_size : (step + 1) * spec.batch_size]
            global_n = len(idx)
            if parallel is not None:  # issue 14: this rank's shard of the global batch
                idx = parallel.shard(idx)
            if batches is None:
                xb = x_ep[idx]  # an index gather keeps x_ep's channels_last layout (tests/test_gpu.py)
                yb = y_all[idx]
            else:
                xh, yh = next(batches)
                xb = tdata.upload(xh, device, channels_last=channels_last)
                yb = yh.to(device, non_blocking=True)
                if spec.augment:
                    xb = aug.shift_images(xb, pad - oy[idx], pad - ox[idx], fl[idx])
                    if channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = forward(xb)
                loss = loss_fn(logits.float(), yb)
            lr_used = opt.param_groups[0]["lr"]  # the rate this step uses (the schedule moves it after)
            opt.zero_grad(set_to_none=True)
            if parallel is not None:  # issue 14: DDP averages over ranks; make it the global mean
                (loss * (len(idx) * parallel.world / global_n)).backward()
            else:
                loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            nb = len(idx)
            loss_sum += loss.detach() * nb
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += nb
            if progress is not None:
                progress({"event": "step", "epoch": epoch, "step": step + 1, "steps": steps, "images": nb})
        if parallel is not None:  # issue 14: the epoch's numbers over all ranks
            loss_sum, correct = parallel.all_sum(loss_sum), parallel.all_sum(correct)
            seen = int(parallel.all_sum(torch.tensor(seen, device=device)).item())
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "loss": float(loss_sum.item()) / seen,  # the epoch's one host read
            "train_accuracy": float(correct.item()) / seen,
            "lr": float(lr_used),  # of the epoch's last step: what was used, not the next step's value
            "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else float("inf"),
        }
        history.append(row)
        heap.release()  # the epoch's freed batches and augmented copy, before the next one allocates
        if progress is not None:
            progress({"event": "epoch", **row})
    model.eval()
    return history


def train_model(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    model_name: str,
    width: int,
    spec: TrainSpec,
    progress: Optional[ProgressFn] = None,
) -> tuple[nn.Module, dict[str, Any], list[dict[str, float]]]:
    """Seed, compute the normalisation from ``images``, build the model and :func:`fit` it.

    Returns ``(model in eval mode, model_args for the checkpoint, history)``.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square (N, H, W, C) images, got {images.shape}")
    seed_everything(spec.seed)
    mean, std = tdata.channel_stats(images)
    head = "lgm" if spec.loss == "lgm" else "linear"
    args = model_args(model_name, num_classes, images.shape[-1], images.shape[1], width, mean, std,
                      head=head, lgm_covariance=spec.lgm_covariance)
    model = build_model(**args)
    history = fit(model, images, labels, spec, progress)
    return model, args, history
