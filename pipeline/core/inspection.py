"""The inspect stage's compute (torch + numpy): the clean reference model and the two-view detector.

The stage (``pipeline/inspect.py``) does the I/O, cleanlab and MLflow at its edges; this module
turns arrays and models into a :class:`~pipeline.core.detect.Detection`:

1. a *clean model* trained on the trusted evaluation split alone, with as many optimizer steps as
   the candidate took on the training view (:func:`matched_epochs`): it never saw a poisoned row;
2. penultimate features of the training view and of the evaluation split through both models;
3. :func:`pipeline.core.detect.robust_detect_blocks`: its two-view mode, a block of training rows at a time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import numpy as np
from torch import nn

from . import heap
from .detect import DetectError, Detection, RobustConfig, robust_detect_blocks
from .features import penultimate_features
from .train import TrainSpec, steps_per_epoch, train_model

BLOCK_BATCHES = 32  # training rows scored per block, in batches (512 x 32 = 16k rows: ~35 MiB of pixels
#                     and features of small_cnn, ~0.3 s of distances a class; bounded whatever N is)


def matched_epochs(epochs: int, n_view: int, n_ref: int, batch_size: int) -> int:
    """Epochs on ``n_ref`` rows that take as many optimizer steps as ``epochs`` on ``n_view`` rows
    (at least ``epochs``). Digits: 10 epochs x 22 steps on 1,347 rows -> 28 epochs x 8 steps on
    450. At the candidate's own 10 epochs the small clean model is underfit and its foreignness
    of clean rows noisier (bench/results/detect_samples.md: weakest source-specific backdoor
    1.60 -> 1.98, clean maximum 1.62 -> 1.58 from 10 to 30 epochs)."""
    if min(epochs, n_view, n_ref, batch_size) < 1:
        raise ValueError(f"epochs, rows and batch size must be >= 1, got {epochs}, {n_view}, {n_ref}, {batch_size}")
    want = epochs * steps_per_epoch(n_view, batch_size)
    per = steps_per_epoch(n_ref, batch_size)
    return max(int(epochs), int(round(want / per)))


def train_clean_model(
    ref_images: np.ndarray,
    ref_labels: np.ndarray,
    num_classes: int,
    model_name: str,
    width: int,
    spec: TrainSpec,
    epochs: int,
) -> nn.Module:
    """The clean reference model: the candidate's recipe and seed, ``epochs`` on the trusted split."""
    model, _, _ = train_model(ref_images, ref_labels, num_classes, model_name, width,
                              dataclasses.replace(spec, epochs=int(epochs)))
    return model


def two_view_detect(
    candidate: nn.Module,
    clean_model: nn.Module,
    images: Any,
    labels: np.ndarray,
    ref_images: np.ndarray,
    ref_labels: np.ndarray,
    num_classes: int,
    config: RobustConfig = RobustConfig(),
    device: str = "cpu",
    batch_size: int = 512,
    block_batches: int = BLOCK_BATCHES,
) -> tuple[Detection, dict[str, float]]:
    """``(robust_detect two-view Detection, seconds per step)`` of the training view against the
    evaluation split (see the module doc). ``images``: any (N, H, W, C) uint8 array-like that
    slices (a lazy store view): the training rows go through both models ``block_batches``
    batches at a time and are scored block by block (``detect.robust_detect_blocks``), so
    neither their pixels nor their features are ever held whole."""
    # The blocks run over the labels and the reference is gathered by its labels' order: rows
    # beyond either would be left out silently, or fail as an IndexError, not as bad input.
    if len(images) != len(labels):
        raise DetectError(f"{len(images)} training images but {len(labels)} labels: give one label per row")
    if len(ref_images) != len(ref_labels):
        raise DetectError(f"{len(ref_images)} reference images but {len(ref_labels)} labels: give one label per row")
    times = {"features": 0.0}
    t_start = time.perf_counter()
    step = batch_size * max(1, int(block_batches))  # rows a block: whole batches, the forward passes of one pass

    def feats(model: nn.Module, x) -> np.ndarray:
        t0 = time.perf_counter()
        out = penultimate_features(model, np.asarray(x), batch_size=batch_size, device=device)
        times["features"] += time.perf_counter() - t0
        return out

    def blocks():
        for s0 in range(0, len(labels), step):
            part = images[s0:s0 + step]
            yield feats(candidate, part), feats(clean_model, part)

    # The reference in class order, so the detector's per-class rows are views of one array, and
    # read a block at a time, so no sorted copy of the images is made; passed, not kept here.
    order = np.argsort(np.asarray(ref_labels), kind="stable")

    def sorted_feats(model: nn.Module) -> np.ndarray:
        out = None
        for s0 in range(0, len(order), step):
            f = feats(model, ref_images[order[s0:s0 + step]])
            if out is None:
                out = np.empty((len(order), *f.shape[1:]), f.dtype)
            out[s0:s0 + len(f)] = f
        return out

    det = robust_detect_blocks(blocks(), labels, num_classes, sorted_feats(candidate),
                               np.asarray(ref_labels)[order], sorted_feats(clean_model), config=config)
    times["robust"] = time.perf_counter() - t_start - times["features"]
    heap.release()  # the blocks' features and distances, before the stage's next phase
    return det, times


def robust_config(settings: Any, device: str = "cpu") -> RobustConfig:
    """A :class:`RobustConfig` from the inspect config (``schema.InspectConfig``) fields it names."""
    keys = ("k_ref", "class_threshold", "shallow_threshold", "flag_quantile", "suspicious_flag_quantile")
    return RobustConfig(**{k: getattr(settings, k) for k in keys}, device=device)


def class_summary(det: Detection, labels: np.ndarray, num_classes: int,
                  label_issues: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
    """Per class: rows, tail ratios, argmax depth, robust flags, cleanlab issues, suspicious."""
    depth = det.params.get("depth") or [0] * num_classes
    shallow = det.class_stats.get("tail_ratio_shallow", np.zeros(num_classes))
    out = []
    for c in range(num_classes):
        m = labels == c
        out.append({
            "rows": int(m.sum()),
            "tail_ratio": float(det.class_stat[c]),
            "tail_ratio_shallow": float(shallow[c]),
            "depth": int(depth[c]),
            "flagged": int(det.flagged[m].sum()),
            "label_issues": None if label_issues is None else int(label_issues[m].sum()),
            "suspicious": c in det.suspicious,
        })
    return out
