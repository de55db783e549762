"""Out-of-fold predicted probabilities through the project's one training loop (torch + numpy).

cleanlab's ``find_label_issues`` needs, for every training row, class probabilities from a model
that never saw that row: a row the model trained on is memorised, its given label looks right,
and a flipped label goes unnoticed. So the rows are split into k stratified folds, k models are
trained by :func:`pipeline.core.train.train_model` on k-1 folds each, and each predicts the fold
it left out. cleanlab itself runs at the edge (the inspect stage, the bench) on the result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import heap
from .predict import predict_logits
from .rows import take
from .train import TrainSpec, train_model

ProgressFn = Callable[[dict[str, Any]], None]


class KFoldError(ValueError):
    """Input :func:`out_of_fold_probs` refuses; the message says what to change."""


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold id (0..k-1) per row; every class is spread over the folds as evenly as possible.

    Hand-written (sklearn's StratifiedKFold may not be imported in the core, docs/design.md):
    each class's rows are shuffled with ``default_rng(seed)`` and dealt round-robin, the deal
    starting where the previous class's ended, so fold sizes differ by at most one row overall
    and a class's count by at most one between folds.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise KFoldError(f"labels must be 1-D, got shape {y.shape}")
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise KFoldError(f"k must be an int >= 2, got {k!r}")
    if k > len(y):
        raise KFoldError(f"k = {k} folds need at least {k} rows, got {len(y)}")
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), np.int64)
    start = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = (start + np.arange(len(idx))) % k
        start = (start + len(idx)) % k
    return folds


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def out_of_fold_probs(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    model_name: str,
    width: int,
    spec: TrainSpec,
    k: int = 5,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    batch_size: int = 512,
) -> np.ndarray:
    """(N, K) float32 softmax probabilities, row i from the fold model that left row i out.

    ``spec`` is the candidate's training recipe; fold f trains with ``seed = spec.seed + f`` so
    the k models differ. ``seed`` draws the folds (:func:`stratified_folds`). ``progress`` gets
    ``{"event": "fold", "fold", "k", "train_rows", "heldout_rows"}`` (index arrays) before each
    fold's training, then the training loop's own events. Prediction is a plain forward pass
    (no TTA) on ``spec.device``.
    """
    if not hasattr(images, "subset"):  # a lazy view of the store stays lazy: each fold model streams its rows
        images = np.asarray(images)
    y = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise KFoldError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if y.ndim != 1 or len(y) != len(images):
        raise KFoldError(f"labels must be (N,) = ({len(images)},), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise KFoldError(f"labels must be integer class indices, got dtype {y.dtype}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise KFoldError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise KFoldError(f"labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    folds = stratified_folds(y, k, seed)
    if min(np.bincount(folds, minlength=k)) == 0 or len(y) - max(np.bincount(folds, minlength=k)) < 2:
        raise KFoldError(f"{len(y)} rows are too few for {k} folds (each fold model needs >= 2 training rows)")
    probs = np.full((len(y), num_classes), np.nan, np.float32)
    for f in range(k):
        held = np.flatnonzero(folds == f)
        train = np.flatnonzero(folds != f)
        if progress is not None:
            progress({"event": "fold", "fold": f, "k": k, "train_rows": train, "heldout_rows": held})
        fold_spec = dataclasses.replace(spec, seed=int(spec.seed) + f)
        model, _, _ = train_model(take(images, train), y[train], num_classes, model_name, width, fold_spec,
                                  progress)
        logits = predict_logits(model, take(images, held), batch_size=batch_size, device=spec.device, amp=False)
        probs[held] = _softmax(logits).astype(np.float32)
        del model
        heap.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return probs
