"""Clean-label poisoning: every poisoned row keeps its true label (torch + numpy only).

Two methods, both crafting small pixel perturbations against a *feature-extractor model* handed
in by the caller (the poison stage passes the current champion, else the clean twin):

- :func:`feature_collision` (Shafahi et al. 2018, "Poison Frogs"): base-class training images are
  moved, inside an L∞ ε-ball, until their penultimate-layer features collide with one target
  test instance. Trained on them (labelled base, truthfully), a victim learns to put the target
  instance's features in the base class. Success is per target instance:
  :func:`feature_collision_success` runs it over several independent targets, retraining a victim
  from scratch for each.
- :func:`label_consistent` (Turner et al. 2019): target-class training images are made hard to
  learn by an untargeted PGD perturbation against the clean model (L∞ ε-ball), then carry the
  backdoor trigger (:func:`pipeline.core.attacks.apply_trigger`); labels stay the target class.
  With the natural features made useless, the victim leans on the trigger, which then pulls any
  triggered image to the target class (ASR as in GUIDE §3, measured by the evaluate stage).

Pixel units throughout: images are uint8 0..255 and ``eps`` is in the same units (digits' 8/255
of the range is eps=8). Every poisoned image is an integer image inside ``[x - floor(eps), x +
floor(eps)] ∩ [0, 255]`` (label-consistent: outside the trigger's pixels, which the trigger
overwrites). Each returned record carries the full pixel delta ``after - before`` as int16 so the
view can rebuild the row bit-exactly as ``before + delta`` and check ``sha256_after``.

Hand-written on purpose: no maintained torch library ships these two attacks against a plain
``nn.Module`` with integer-pixel, per-row records (ART and torchattacks assume float inputs in
[0, 1] and do not return reproducible uint8 rows), and the loops are a few lines of PGD.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .attacks import AttackError, apply_trigger, normalize_trigger, resolve_locations, select_rows
from .features import forward_with_features
from .hashing import sample_hash
from .train import resolve_device

METHODS = ("feature_collision", "label_consistent")
BASE_SELECTIONS = ("nearest", "nearest_pixels", "random")


class CleanLabelError(AttackError):
    """A clean-label attack request the pipeline refuses (the message says how to fix it)."""


@dataclass
class CleanLabelResult:
    """What a crafting call returns.

    ``images``/``labels``: the whole poisoned train split (labels identical to the input's).
    ``rows``: sorted indices of the poisoned rows. ``perturbations``: (k, H, W, C) int16, the
    pixel delta ``after - before`` of each poisoned row, in ``rows`` order (= ``records`` order).
    ``records``: one dict per poisoned row (see :func:`make_records`). ``info``: crafting
    diagnostics (seconds, feature distances or losses before/after).
    """

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    perturbations: np.ndarray
    records: list[dict]
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _check_inputs(images: np.ndarray, labels: np.ndarray, sample_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CleanLabelError(f"images must be a uint8 (N, H, W, C) array, got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CleanLabelError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images) or len(sample_ids) != len(images):
        raise CleanLabelError(
            f"images ({len(images)}), labels ({len(labels)}) and sample_ids ({len(sample_ids)}) differ in length"
        )
    return images, labels.astype(np.int64)


def _check_eps(eps: float) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise CleanLabelError(f"eps must be a number of pixel units in [0, 255], got {eps!r}") from None
    if not 0.0 <= eps <= 255.0 or eps != eps:
        raise CleanLabelError(f"eps must be in [0, 255] pixel units (8 = 8/255 of the range), got {eps}")
    return eps


def _check_rate(rate: float) -> float:
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise CleanLabelError(f"rate must be a fraction in (0, 1], got {rate!r}") from None
    if not 0.0 < rate <= 1.0:
        raise CleanLabelError(f"rate must be in (0, 1] (a fraction of the class's training rows), got {rate}")
    return rate


def _check_class(value: Any, num_classes: int | None, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CleanLabelError(f"{what} must be a class index (int), got {value!r}; resolve names with attacks.resolve_class")
    if value < 0 or (num_classes is not None and value >= num_classes):
        raise CleanLabelError(f"{what} {value} is not a class index 0..{(num_classes or 1) - 1}")
    return int(value)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise CleanLabelError(f"steps must be an integer >= 0, got {steps!r}")
    return int(steps)


def _num_classes(model: nn.Module) -> int | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else None


# --------------------------------------------------------------------------- shared pieces


def _to_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, C) uint8 -> float32 (N, C, H, W) on the 0..255 scale (the model normalises)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()


def _to_nhwc_uint8(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def _ball(base: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer bounds of the L∞ ball ∩ [0, 255]: rounding any point inside stays inside."""
    r = math.floor(eps)
    return (base - r).clamp(0, 255), (base + r).clamp(0, 255)


def perturbation_norms(delta: np.ndarray) -> tuple[float, float]:
    """(L∞, L2) of one pixel delta, in pixel units (0..255 scale)."""
    d = np.asarray(delta, np.float64)
    return float(np.abs(d).max(initial=0.0)), float(np.sqrt(np.square(d).sum()))


def make_records(
    before: np.ndarray,
    after: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    sample_ids: Sequence[str],
    transform: Mapping[str, Any],
    extra: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Per poisoned row: ``{sample_id, original_label, new_label (== original), transform,
    perturbation (int16 (H, W, C) = after - before), linf, l2, sha256_after}``.

    ``transform`` is shared by every row except ``delta_index`` (the row's position in the
    stacked perturbations, = record order) and the per-row ``extra`` keys (e.g. a trigger's
    concrete location). Returns ``(perturbations (k, H, W, C) int16, records)``.
    """
    deltas = after[rows].astype(np.int16) - before[rows].astype(np.int16)
    records = []
    for j, i in enumerate(rows):
        t = dict(transform)
        t["delta_index"] = j
        if extra is not None:
            t.update(extra[j])
        linf, l2 = perturbation_norms(deltas[j])
        records.append({
            "sample_id": str(sample_ids[i]),
            "original_label": int(labels[i]),
            "new_label": int(labels[i]),
            "transform": t,
            "perturbation": deltas[j],
            "linf": linf,
            "l2": l2,
            "sha256_after": sample_hash(after[i]),
        })
    return deltas, records


def apply_perturbations(images: np.ndarray, rows: np.ndarray, perturbations: np.ndarray) -> np.ndarray:
    """``images`` with ``before + delta`` on ``rows``: how the view rebuilds clean-label rows.

    Refuses a delta that leaves 0..255 (a corrupt or mismatched perturbation file) rather than
    clipping it into a different image."""
    images = np.asarray(images)
    perturbations = np.asarray(perturbations)
    if perturbations.dtype != np.int16 or perturbations.shape != (len(rows),) + images.shape[1:]:
        raise CleanLabelError(
            f"perturbations must be int16 {(len(rows),) + images.shape[1:]}, got {perturbations.dtype} {perturbations.shape}"
        )
    out = images.copy()
    if len(rows) == 0:
        return out
    new = images[rows].astype(np.int16) + perturbations
    if new.min() < 0 or new.max() > 255:
        raise CleanLabelError("a perturbation takes pixels outside 0..255: the perturbation file does not match these rows")
    out[rows] = new.astype(np.uint8)
    return out


# --------------------------------------------------------------------------- feature collision


def _features(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([forward_with_features(model, x[i : i + batch])[1] for i in range(0, len(x), batch)])


def _as_models(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    models = [model] if isinstance(model, nn.Module) else list(model)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise CleanLabelError("model must be an nn.Module or a non-empty sequence of them (an ensemble of extractors)")
    return models


class _Frozen:
    """Eval mode and no parameter gradients while crafting; restores ``requires_grad`` after
    (the caller's model may be trained again, e.g. fine-tuned by a bench)."""

    def __init__(self, models: Sequence[nn.Module], device: torch.device):
        self.models, self.device = list(models), device

    def __enter__(self) -> list[nn.Module]:
        self.saved = [[p.requires_grad for p in m.parameters()] for m in self.models]
        for m in self.models:
            m.to(self.device).eval()
            for p in m.parameters():
                p.requires_grad_(False)
        return self.models

    def __exit__(self, *exc: Any) -> None:
        for m, flags in zip(self.models, self.saved):
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)


def feature_collision(
    model: nn.Module | Sequence[nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    sample_ids: Sequence[str],
    target_image: np.ndarray,
    base_class: int,
    *,
    rate: float = 0.3,
    eps: float = 32.0,
    steps: int = 100,
    lr: float | None = None,
    opacity: float = 0.5,
    base_selection: str = "nearest",
    seed: int = 0,
    device: str | torch.device = "cpu",
    target_id: str | None = None,
) -> CleanLabelResult:
    """Poison Frogs: ``round(rate * n_base)`` base-class rows, each moved within the L∞ ``eps``
    ball (pixel units) to minimise ``||f(x) - f(target)||² / ||f(target)||²`` in ``model``'s
    penultimate features (summed over the models when ``model`` is an ensemble: a poison that
    collides in several independently trained extractors transfers better to a victim trained
    from scratch, as in Zhu et al. 2019's multi-network crafting).

    Optimiser: Adam on the pixels (step ``lr`` pixel units, default ``eps / 10``), projected onto
    the integer ball ∩ [0, 255] after every step, then rounded (rounding stays in the ball). The
    paper's forward-backward splitting keeps the poison near its base through a ``β||x - b||²``
    term; the hard ε-ball does that job here, so there is no β. 100 steps converge on digits
    (1000 steps lowered the final distance by < 1.5%: bench/results/clean_label_digits.md).

    ``opacity`` (the paper's end-to-end "watermark"): the start point is ``(1 - opacity) * base +
    opacity * target``, clipped into the ball, so the ε bound still holds. ``base_selection``:
    ``nearest`` takes the base rows whose features are closest to the target's (an attacker
    picks its bases; closer bases collide within a smaller ε), ``nearest_pixels`` the closest in
    pixel L2, ``random`` a seeded draw (``seed``; the other two are deterministic).
    ``target_id`` (e.g. the target's test sample id) is written into each record's transform.

    ``info``: ``feature_dist_before``/``_after`` (mean over poisons and models of the relative
    squared feature distance to the target), ``seconds``, ``n_poisons``.

    On 8x8 digits with a victim trained from scratch this is not effective at any ε where the
    poisons still look like their label (1/10 targets at ε 32-96; 8/10 only at ε 160, where the
    poisons have become the target digit): bench/results/clean_label_digits.md.
    """
    t0 = time.perf_counter()
    models = _as_models(model)
    images, labels = _check_inputs(images, labels, sample_ids)
    eps, rate, steps = _check_eps(eps), _check_rate(rate), _check_steps(steps)
    base_class = _check_class(base_class, _num_classes(models[0]), "base_class")
    target_image = np.asarray(target_image)
    if target_image.dtype != np.uint8 or target_image.shape != images.shape[1:]:
        raise CleanLabelError(
            f"target_image must be one uint8 image of shape {images.shape[1:]}, got {target_image.dtype} {target_image.shape}"
        )
    if not 0.0 <= float(opacity) <= 1.0:
        raise CleanLabelError(f"opacity must be in [0, 1] (the target's weight in the start point), got {opacity}")
    if base_selection not in BASE_SELECTIONS:
        raise CleanLabelError(f"unknown base_selection {base_selection!r}: use one of {', '.join(BASE_SELECTIONS)}")
    cand = np.flatnonzero(labels == base_class)
    if len(cand) == 0:
        raise CleanLabelError(f"no training row has the base class {base_class}")
    k = max(1, int(round(rate * len(cand))))
    lr = float(lr) if lr is not None else max(eps / 10.0, 0.5)
    if lr <= 0:
        raise CleanLabelError(f"lr must be > 0 pixel units, got {lr}")

    dev = resolve_device(device)
    with _Frozen(models, dev):
        tgt = _to_nchw(target_image[None], dev)
        with torch.no_grad():
            f_ts = [_features(m, tgt) for m in models]
            norms = [float((f**2).sum()) or 1.0 for f in f_ts]

        def dist(x: torch.Tensor) -> torch.Tensor:  # per row, relative squared distance, mean over models
            total = torch.zeros(len(x), device=dev)
            for m, f_t, nrm in zip(models, f_ts, norms):
                total = total + ((forward_with_features(m, x)[1] - f_t) ** 2).sum(1) / nrm
            return total / len(models)

        x_cand = _to_nchw(images[cand], dev)
        with torch.no_grad():
            if base_selection == "nearest":
                order = torch.argsort(dist(x_cand), stable=True).cpu().numpy()[:k]
            elif base_selection == "nearest_pixels":
                d = ((x_cand - tgt) ** 2).flatten(1).sum(1)
                order = torch.argsort(d, stable=True).cpu().numpy()[:k]
            else:
                order = np.random.default_rng(seed).choice(len(cand), size=k, replace=False)
        rows = np.sort(cand[order]).astype(np.int64)
        base = _to_nchw(images[rows], dev)
        lo, hi = _ball(base, eps)
        start = torch.max(torch.min((1.0 - opacity) * base + opacity * tgt, hi), lo)
        with torch.no_grad():
            d_before = float(dist(base).mean())
        x = start.clone().requires_grad_(True)
        if steps and eps >= 1:
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                loss = dist(x).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, hi), lo))
        with torch.no_grad():
            x_final = torch.max(torch.min(x.detach().round(), hi), lo)
            d_after = float(dist(x_final).mean())

    out = images.copy()
    out[rows] = _to_nhwc_uint8(x_final)
    transform = {
        "method": "feature_collision",
        "eps": eps,
        "opacity": float(opacity),
        "base_class": base_class,
        "target_sha256": sample_hash(target_image),
    }
    if target_id is not None:
        transform["target_id"] = str(target_id)
    deltas, records = make_records(images, out, rows, labels, sample_ids, transform)
    info = {
        "method": "feature_collision",
        "n_poisons": int(k),
        "n_base_rows": int(len(cand)),
        "n_models": len(models),
        "feature_dist_before": d_before,
        "feature_dist_after": d_after,
        "steps": steps,
        "lr": lr,
        "seconds": time.perf_counter() - t0,
    }
    return CleanLabelResult(out, labels.copy(), rows, deltas, records, info)


def pick_targets(
    model: nn.Module,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    target_class: int,
    n: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``n`` seeded test indices of class ``target_class`` that ``model`` classifies correctly
    (Poison Frogs attacks instances the clean model gets right; a target already misclassified
    would count as a free success)."""
    test_images, test_labels = np.asarray(test_images), np.asarray(test_labels)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    with torch.no_grad():
        pred = model(_to_nchw(test_images, dev)).argmax(1).cpu().numpy()
    cand = np.flatnonzero((test_labels == target_class) & (pred == test_labels))
    if len(cand) < n:
        raise CleanLabelError(f"only {len(cand)} correctly classified test images of class {target_class}, asked for {n} targets")
    return np.sort(np.random.default_rng(seed).choice(cand, size=n, replace=False)).astype(np.int64)


TrainFn = Callable[[np.ndarray, np.ndarray, int], nn.Module]


def feature_collision_success(
    model: nn.Module | Sequence[nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    sample_ids: Sequence[str],
    target_images: np.ndarray,
    base_class: int,
    train_fn: TrainFn,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    on_result: Callable[[int, CleanLabelResult], Mapping[str, Any]] | None = None,
    **craft: Any,
) -> dict:
    """Run :func:`feature_collision` once per target image (independent attacks) and retrain a
    victim on each poisoned set; success = the victim predicts ``base_class`` on the target.

    ``train_fn(images, labels, seed) -> model`` trains the victim (the caller owns the training
    spec: from scratch, or fine-tuning the extractor as in the paper's transfer setting). Target
    ``i`` gets seed ``seed + i`` for crafting and training. ``test_images``/``test_labels``: also
    report each victim's clean accuracy. ``on_result(i, result)``: extra per-target fields (a
    bench's inspection of the poisons). ``craft``: keyword arguments of :func:`feature_collision`.
    Returns ``{success_rate, successes, n_targets, per_target: [...], craft_seconds_mean,
    craft_seconds_max}``.
    """
    target_images = np.asarray(target_images)
    if target_images.ndim != 4 or len(target_images) == 0:
        raise CleanLabelError(f"target_images must be a non-empty (T, H, W, C) uint8 array, got {target_images.shape}")
    per = []
    dev = resolve_device(device)
    for i, timg in enumerate(target_images):
        res = feature_collision(model, images, labels, sample_ids, timg, base_class, seed=seed + i, device=dev, **craft)
        victim = train_fn(res.images, res.labels, seed + i).to(dev).eval()
        with torch.no_grad():
            logits = victim(_to_nchw(timg[None], dev))
            acc = None
            if test_images is not None and test_labels is not None:
                pred = torch.cat([victim(_to_nchw(test_images[j : j + 1024], dev)).argmax(1)
                                  for j in range(0, len(test_images), 1024)]).cpu().numpy()
                acc = float((pred == np.asarray(test_labels)).mean())
        row = {
            "target": i,
            "prediction": int(logits.argmax(1).item()),
            "success": int(logits.argmax(1).item()) == base_class,
            "base_prob": float(torch.softmax(logits, 1)[0, base_class]),
            "victim_accuracy": acc,
            "craft_seconds": res.info["seconds"],
            "feature_dist_before": res.info["feature_dist_before"],
            "feature_dist_after": res.info["feature_dist_after"],
            "n_poisons": res.info["n_poisons"],
            "linf_max": max((r["linf"] for r in res.records), default=0.0),
            "l2_mean": float(np.mean([r["l2"] for r in res.records])) if res.records else 0.0,
        }
        if on_result is not None:
            row.update(on_result(i, res))
        per.append(row)
    succ = sum(p["success"] for p in per)
    secs = [p["craft_seconds"] for p in per]
    return {
        "success_rate": succ / len(per),
        "successes": int(succ),
        "n_targets": len(per),
        "per_target": per,
        "craft_seconds_mean": float(np.mean(secs)),
        "craft_seconds_max": float(np.max(secs)),
    }


# --------------------------------------------------------------------------- label-consistent


def label_consistent(
    model: nn.Module | Sequence[nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    sample_ids: Sequence[str],
    target_class: int,
    trigger: Mapping[str, Any],
    *,
    rate: float = 0.5,
    eps: float = 64.0,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> CleanLabelResult:
    """Turner et al.: ``round(rate * n_target)`` seeded target-class rows get an untargeted PGD
    perturbation (maximise ``model``'s cross-entropy on their true label, L∞ ``eps`` pixel units,
    ``steps`` signed steps of ``step_size``, default ``2.5 * eps / steps``, seeded uniform random
    start), are rounded to integers in the ball, then carry ``trigger`` (a trigger spec of
    :mod:`pipeline.core.attacks`; ``random`` locations are resolved per row and recorded).
    Labels stay ``target_class``. ``model`` may be an ensemble (the loss is averaged over the
    models): perturbations that fool several independently trained models transfer better to a
    victim trained from scratch.

    Digits (small_cnn, target 8, 3x3 patch, rate 0.5): ASR 53% at ε 64 (64% against 3 models),
    77% at ε 96, against 16% for the trigger alone (bench/results/clean_label_digits.md).

    Each record's ``perturbation`` is the full delta (adversarial part and trigger) so the view
    rebuilds the row as ``before + delta``; ``adv_linf``/``adv_l2`` are the norms of the
    adversarial part alone (the one bounded by ``eps``). ``info``: ``loss_before``/``_after``
    (mean cross-entropy of ``model`` on the chosen rows, clean vs perturbed before the trigger),
    ``seconds``, ``n_poisons``.
    """
    t0 = time.perf_counter()
    images, labels = _check_inputs(images, labels, sample_ids)
    models = _as_models(model)
    eps, rate, steps = _check_eps(eps), _check_rate(rate), _check_steps(steps)
    target_class = _check_class(target_class, _num_classes(models[0]), "target_class")
    try:
        trig = normalize_trigger(trigger, images.shape[1:])
    except AttackError as exc:
        raise CleanLabelError(str(exc)) from None
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    step_size = float(step_size)
    if step_size < 0:
        raise CleanLabelError(f"step_size must be >= 0 pixel units, got {step_size}")
    if not (labels == target_class).any():
        raise CleanLabelError(f"no training row has the target class {target_class}")
    rows = select_rows(labels, target_class, target_class, rate, seed)

    dev = resolve_device(device)
    ce = nn.CrossEntropyLoss(reduction="none")

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # per row, mean over the models
        return sum(ce(m(x), y) for m in models) / len(models)

    with _Frozen(models, dev):
        base = _to_nchw(images[rows], dev)
        y = torch.as_tensor(labels[rows], device=dev)
        lo, hi = _ball(base, eps)
        x = base.clone()
        if random_start and eps > 0:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            noise = (torch.rand(base.shape, generator=gen) * 2 - 1).to(dev) * math.floor(eps)
            x = torch.max(torch.min(base + noise, hi), lo)
        for _ in range(steps if eps > 0 else 0):
            x.requires_grad_(True)
            loss = loss_fn(x, y).sum()
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = torch.max(torch.min(x + step_size * grad.sign(), hi), lo)
        with torch.no_grad():
            x_adv = torch.max(torch.min(x.detach().round(), hi), lo)
            loss_before = float(loss_fn(base, y).mean())
            loss_after = float(loss_fn(x_adv, y).mean())

    adv = images.copy()
    adv[rows] = _to_nhwc_uint8(x_adv)
    locs = resolve_locations(len(rows), images.shape[1:], trig) if trig["kind"] == "patch" else None
    out = adv.copy()
    if len(rows):
        out[rows] = apply_trigger(adv[rows], trig, locations=locs)
    adv_deltas = adv[rows].astype(np.int16) - images[rows].astype(np.int16)
    extra = []
    for j in range(len(rows)):
        e: dict[str, Any] = {}
        if locs is not None:
            e["trigger"] = {**trig, "location": [int(locs[j, 0]), int(locs[j, 1])]}
        a_linf, a_l2 = perturbation_norms(adv_deltas[j])
        e["adv_linf"], e["adv_l2"] = a_linf, a_l2
        extra.append(e)
    transform = {"method": "label_consistent", "eps": eps, "steps": steps, "trigger": trig}
    deltas, records = make_records(images, out, rows, labels, sample_ids, transform, extra)
    for r in records:  # the adversarial norms are row facts, not transform parameters
        r["adv_linf"] = r["transform"].pop("adv_linf")
        r["adv_l2"] = r["transform"].pop("adv_l2")
    info = {
        "method": "label_consistent",
        "n_poisons": int(len(rows)),
        "n_target_rows": int((labels == target_class).sum()),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "steps": steps,
        "step_size": step_size,
        "seconds": time.perf_counter() - t0,
    }
    return CleanLabelResult(out, labels.copy(), rows, deltas, records, info)


# --------------------------------------------------------------------------- the poison stage's entry


def resolve_clean_label(spec: Mapping[str, Any], class_names: Sequence[str], image_shape: Sequence[int]) -> dict:
    """The ``attack.*`` config of ``name: clean_label`` with class indices and typed values (what the
    view records as its attack). ``source``: feature collision's target-instance class (required),
    None for label-consistent (all-to-one); ``target``: the class the attack pulls to (the base
    class of feature collision, the poisoned class and trigger target of label-consistent)."""
    from .attacks import resolve_attack

    method = spec.get("method", "label_consistent")
    if method not in METHODS:
        raise CleanLabelError(f"unknown clean-label method {method!r}: use one of {', '.join(METHODS)}")
    try:
        a = resolve_attack({**spec, "name": "clean_label"}, class_names, image_shape)
    except AttackError as exc:
        raise CleanLabelError(str(exc)) from None
    if method == "label_consistent" and a["source"] is not None:
        raise CleanLabelError("label_consistent poisons the target class's own rows: set attack.source=null")
    if method == "feature_collision" and a["source"] is None:
        raise CleanLabelError("feature_collision needs attack.source: the class of its target test instances")
    out = {**a, "method": method, "eps": _check_eps(spec.get("eps", 96.0)), "steps": _check_steps(int(spec.get("steps", 20)))}
    _check_rate(a["rate"])
    if method == "label_consistent":
        try:
            out["trigger"] = normalize_trigger(spec.get("trigger") or {}, image_shape)
        except AttackError as exc:
            raise CleanLabelError(str(exc)) from None
    else:
        n = int(spec.get("n_targets", 10))
        if n < 1:
            raise CleanLabelError(f"attack.n_targets must be >= 1, got {n}")
        out["n_targets"] = n
        out["opacity"] = float(spec.get("opacity", 0.5))
    return out


def craft(
    model: nn.Module | Sequence[nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    sample_ids: Sequence[str],
    attack: Mapping[str, Any],
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    test_ids: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CleanLabelResult, list[dict]]:
    """Craft a resolved clean-label ``attack`` (:func:`resolve_clean_label`) on the train split.

    Returns ``(result, targets)``. Label-consistent: one :func:`label_consistent` call, ``targets``
    empty. Feature collision: ``n_targets`` test instances of ``attack["source"]`` that ``model``
    classifies correctly (:func:`pick_targets`, seeded), each with its own disjoint set of
    ``round(rate * n_base / n_targets)`` base rows (nearest in features to that target, chosen
    among the rows no earlier target took): one victim trained on the view meets all of them, and
    its success rate is the share of targets it reads as the base class. ``targets``:
    ``[{index (test row), sample_id, sha256}]``. Records carry ``target_id``/``target_sha256``.
    """
    images, labels = _check_inputs(images, labels, sample_ids)
    if attack.get("method") == "label_consistent":
        res = label_consistent(model, images, labels, sample_ids, attack["target"], attack["trigger"],
                               rate=attack["rate"], eps=attack["eps"], steps=attack["steps"], seed=attack["seed"],
                               device=device)
        return res, []
    if attack.get("method") != "feature_collision":
        raise CleanLabelError(f"unknown clean-label method {attack.get('method')!r}: use one of {', '.join(METHODS)}")
    if test_images is None or test_labels is None or test_ids is None:
        raise CleanLabelError("feature_collision needs the test split: its targets are test instances")
    t0 = time.perf_counter()
    models = _as_models(model)
    base, n_t = int(attack["target"]), int(attack["n_targets"])
    n_base = int((labels == base).sum())
    per = int(round(attack["rate"] * n_base / n_t))
    if per < 1:
        raise CleanLabelError(
            f"attack.rate {attack['rate']} of {n_base} base rows over {n_t} targets leaves no poison per target: "
            "raise attack.rate or lower attack.n_targets")
    idx = pick_targets(models[0], test_images, test_labels, int(attack["source"]), n_t, seed=attack["seed"], device=device)
    avail = labels.copy()
    out = images.copy()
    rows_all: list[np.ndarray] = []
    records: list[dict] = []
    d_before, d_after = [], []
    targets = []
    for j, ti in enumerate(idx):
        timg = np.asarray(test_images[ti])
        cand = int((avail == base).sum())
        res = feature_collision(models, images, avail, sample_ids, timg, base, rate=min(1.0, per / cand),
                                eps=attack["eps"], steps=attack["steps"], opacity=attack["opacity"],
                                base_selection="nearest", seed=attack["seed"] + j, device=device,
                                target_id=str(test_ids[ti]))
        out[res.rows] = res.images[res.rows]
        avail[res.rows] = -1  # taken: the next target chooses among the rest
        rows_all.append(res.rows)
        for r in res.records:
            r["original_label"] = r["new_label"] = base
            r["transform"].pop("delta_index", None)
        records += res.records
        d_before.append(res.info["feature_dist_before"])
        d_after.append(res.info["feature_dist_after"])
        targets.append({"index": int(ti), "sample_id": str(test_ids[ti]), "sha256": sample_hash(timg)})
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    order = np.argsort(rows, kind="stable")
    rows, records = rows[order], [records[i] for i in order]
    deltas = out[rows].astype(np.int16) - images[rows].astype(np.int16)
    info = {
        "method": "feature_collision",
        "n_poisons": int(len(rows)),
        "n_targets": n_t,
        "poisons_per_target": per,
        "feature_dist_before": float(np.mean(d_before)),
        "feature_dist_after": float(np.mean(d_after)),
        "seconds": time.perf_counter() - t0,
    }
    return CleanLabelResult(out, labels.copy(), rows, deltas, records, info), targets


def targeted_success(predictions: np.ndarray, base_class: int) -> dict:
    """Feature collision's success: the share of target instances read as the base class."""
    p = np.asarray(predictions).astype(np.int64)
    hits = int((p == int(base_class)).sum())
    return {"success_rate": hits / len(p) if len(p) else None, "successes": hits, "n_targets": int(len(p)),
            "base_class": int(base_class)}
