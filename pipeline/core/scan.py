"""Model backdoor scans that need no knowledge of the trigger (torch + numpy only).

Both scans ask, per target class t, how *easy* it is to make the model say t, and call a class
whose answer is an outlier among the classes a likely backdoor target. The outlier test is the
one Neural Cleanse uses: a one-sided anomaly index over classes, ``(x_t - median) / (1.4826 *
MAD)`` (1.4826 makes the MAD a standard-deviation estimate under a normal law); the gate
thresholds the largest index.

- :func:`max_margin_scan` (MM-BD, Wang et al. 2022): data-free. For each class t, gradient ascent
  on the *input* (pixels kept in 0..255) maximises ``logit_t - max_{j != t} logit_j`` from
  several random starts; the statistic is the largest margin reached. A backdoor plants a
  feature that drives t far beyond any natural image, whatever the trigger's shape (patch or
  full-image blend), so the target's maximum margin is an upper outlier.
- :func:`neural_cleanse_scan` (Wang et al. 2019, simplified): with clean images, for each t an
  input mask ``m`` (H, W) and pattern ``p`` are optimised so that ``(1 - m) x + m p`` is
  classified t, with an L1 penalty on ``m``; the statistic is the mask's L1 norm (pixels), and a
  backdoor target needs an unusually *small* mask (a lower outlier). A fixed penalty weight
  replaces the paper's adaptive schedule (a few hundred steps on the CPU, not thousands); a
  full-image blend needs a full-size mask, which is why Neural Cleanse misses blends.

Every class is optimised in one batch (targets x restarts), so a scan is a few hundred forward
and backward passes of one batch. Deterministic for a seed on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.schema import SCAN_METHODS  # noqa: F401 - one list of scan names, in the schema

MAD_SCALE = 1.4826  # MAD -> standard deviation of a normal law (Neural Cleanse's consistency constant)
MAD_FLOOR = 1e-6  # relative floor of the MAD (fraction of |median|): identical statistics give no anomaly


class ScanError(ValueError):
    """Input a scan refuses; the message says what to change."""


@dataclass(frozen=True)
class ScanResult:
    """One scan of one model: a statistic and an anomaly index per class (index = class id).

    ``anomaly``: higher = more likely a backdoor target (for Neural Cleanse the sign is flipped
    so that both scans read the same way). ``extra``: per-class side numbers (e.g. the ASR the
    inverted trigger reached) for the report."""

    method: str
    statistic: np.ndarray
    anomaly: np.ndarray
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def max_anomaly(self) -> float:
        return float(np.max(self.anomaly))

    @property
    def suspect(self) -> int:
        return int(np.argmax(self.anomaly))

    def to_dict(self, class_names: list[str] | None = None) -> dict[str, Any]:
        names = class_names or [str(i) for i in range(len(self.statistic))]
        per = {}
        for i, name in enumerate(names):
            row = {"statistic": float(self.statistic[i]), "anomaly": float(self.anomaly[i])}
            row.update({k: float(v[i]) for k, v in self.extra.items()})
            per[str(name)] = row
        return {"method": self.method, "max_anomaly": self.max_anomaly, "suspect_class": str(names[self.suspect]),
                "seconds": round(self.seconds, 3), "params": dict(self.params), "per_class": per}


def anomaly_index(stat: Any, high: bool = True, rel_floor: float = 0.0) -> np.ndarray:
    """One-sided MAD anomaly index of each value among all (Neural Cleanse's outlier test).

    ``high``: large values are anomalous (MM-BD margins); else small ones (NC mask norms).
    ``rel_floor``: the MAD is at least this fraction of |median|. With 10 classes the MAD is the
    median of 9-10 deviations and can collapse when most classes land close together; a clean
    model then scores a large index for an ordinary spread (bench/results/calibrate_scan.md)."""
    s = np.asarray(stat, np.float64)
    if s.ndim != 1 or len(s) < 3:
        raise ScanError(f"the anomaly index needs >= 3 classes, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ScanError("scan statistics contain NaN or inf: the optimisation diverged (lower the step size)")
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med)))
    if not 0.0 <= rel_floor < 1.0:
        raise ScanError(f"rel_floor must be in [0, 1), got {rel_floor}")
    mad = max(mad, MAD_FLOOR * max(abs(med), 1.0), float(rel_floor) * abs(med))
    z = (s - med) / (MAD_SCALE * mad)
    return z if high else -z


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_model_inputs(num_classes: int, image_shape: tuple[int, ...]) -> None:
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 3:
        raise ScanError(f"a scan needs >= 3 classes (an anomaly among classes), got {num_classes!r}")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ScanError(f"image_shape must be (H, W, C), got {image_shape}")


def max_margin_scan(
    model: nn.Module,
    num_classes: int,
    image_shape: tuple[int, int, int],
    restarts: int = 8,
    steps: int = 150,
    lr: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    mad_floor: float = 0.0,
) -> ScanResult:
    """MM-BD: the largest ``logit_t - max_{j != t} logit_j`` reached per class (module doc).

    Pixels are ``255 * sigmoid(z)`` (always a valid image); ``z`` starts at N(0, 1) noise,
    ``restarts`` starts per class, Adam with step ``lr`` on ``z`` for ``steps`` steps.
    ``mad_floor``: the anomaly index's relative MAD floor (:func:`anomaly_index`)."""
    import time

    _check_model_inputs(num_classes, image_shape)
    if restarts < 1 or steps < 1 or not lr > 0:
        raise ScanError(f"restarts and steps must be >= 1 and lr > 0, got {restarts}, {steps}, {lr}")
    t0 = time.perf_counter()
    dev = torch.device(device)
    model = _frozen(model, dev)
    h, w, c = image_shape
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(num_classes * restarts, c, h, w, generator=g).to(dev).requires_grad_(True)
    target = torch.arange(num_classes, device=dev).repeat_interleave(restarts)
    opt = torch.optim.Adam([z], lr=lr)
    rows = torch.arange(len(target), device=dev)

    def margin() -> torch.Tensor:
        logits = model(255.0 * torch.sigmoid(z)).float()
        own = logits[rows, target]
        other = logits.clone()
        other[rows, target] = float("-inf")
        return own - other.max(1).values

    for _ in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        (-margin().sum()).backward()
        opt.step()
    with torch.no_grad():
        m = margin().view(num_classes, restarts).max(1).values.double().cpu().numpy()
    return ScanResult("max_margin", m, anomaly_index(m, high=True, rel_floor=mad_floor), time.perf_counter() - t0,
                      {"restarts": int(restarts), "steps": int(steps), "lr": float(lr), "seed": int(seed),
                       "mad_floor": float(mad_floor)})


def neural_cleanse_scan(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    steps: int = 200,
    batch: int = 32,
    lr: float = 0.1,
    l1_weight: float = 0.01,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ScanResult:
    """Neural Cleanse, fixed L1 weight (module doc): per class the L1 norm (pixels) of the
    smallest mask found that flips clean images of other classes to it.

    ``images``: clean uint8 (N, H, W, C) (the evaluation split), ``labels`` their classes.
    ``l1_weight``: loss per masked pixel against the cross-entropy of the target. ``extra``:
    ``asr`` = fraction of the last batch flipped to the target (a mask that did not reach its
    target is no evidence either way)."""
    import time

    x_all = np.asarray(images)
    y_all = np.asarray(labels)
    if x_all.ndim != 4 or x_all.dtype != np.uint8 or len(x_all) == 0:
        raise ScanError(f"images must be non-empty uint8 (N, H, W, C), got {x_all.dtype} {x_all.shape}")
    if y_all.shape != (len(x_all),):
        raise ScanError(f"labels must be ({len(x_all)},), got {y_all.shape}")
    _check_model_inputs(num_classes, x_all.shape[1:])
    if steps < 1 or batch < 1 or not lr > 0 or not l1_weight > 0:
        raise ScanError(f"steps, batch >= 1 and lr, l1_weight > 0 required, got {steps}, {batch}, {lr}, {l1_weight}")
    t0 = time.perf_counter()
    dev = torch.device(device)
    model = _frozen(model, dev)
    n, h, w, c = x_all.shape
    k = num_classes
    x = torch.from_numpy(np.ascontiguousarray(x_all)).permute(0, 3, 1, 2).float().to(dev)
    y = torch.from_numpy(y_all.astype(np.int64)).to(dev)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    mask_z = torch.full((k, 1, h, w), -2.0).to(dev).requires_grad_(True)  # sigmoid(-2) = 0.12: a faint start
    pat_z = (0.1 * torch.randn(k, c, h, w, generator=g)).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([mask_z, pat_z], lr=lr)
    target = torch.arange(k, device=dev).repeat_interleave(batch)
    ce = nn.CrossEntropyLoss(reduction="none")
    asr = torch.zeros(k, dtype=torch.float64)
    for _ in range(int(steps)):
        idx = torch.randint(0, n, (k * batch,), generator=g).to(dev)
        xb = x[idx]
        m = torch.sigmoid(mask_z).repeat_interleave(batch, 0)
        p = 255.0 * torch.sigmoid(pat_z).repeat_interleave(batch, 0)
        logits = model((1 - m) * xb + m * p).float()
        keep = (y[idx] != target).float()  # images of the target itself teach nothing
        loss_ce = (ce(logits, target) * keep).sum() / keep.sum().clamp(min=1)
        loss = loss_ce * k + l1_weight * torch.sigmoid(mask_z).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            hit = ((logits.argmax(1) == target).float() * keep).view(k, batch).sum(1)
            asr = (hit / keep.view(k, batch).sum(1).clamp(min=1)).double().cpu()
    with torch.no_grad():
        l1 = torch.sigmoid(mask_z).sum((1, 2, 3)).double().cpu().numpy()
    return ScanResult("neural_cleanse", l1, anomaly_index(l1, high=False), time.perf_counter() - t0,
                      {"steps": int(steps), "batch": int(batch), "lr": float(lr), "l1_weight": float(l1_weight),
                       "seed": int(seed)}, {"asr": asr.numpy()})


