"""The large-margin Gaussian mixture (LGM) loss (torch + numpy only).

Wan et al., CVPR 2018, "Rethinking Feature Distribution for Loss Functions in Image
Classification"; Sargsyan et al. 2020 train with it against clean-label poisoning. The
penultimate features ``x`` are modelled as a mixture of one Gaussian per class, N(mu_k, Sigma_k)
with Sigma_k the identity or a learned diagonal, equal priors. The head's logits are the class
log-likelihoods up to a shared constant:

    logit_k(x) = -d_k(x) - 1/2 log|Sigma_k|,   d_k(x) = 1/2 (x - mu_k)^T Sigma_k^-1 (x - mu_k)

Training (:class:`LGMLoss`) adds two things to softmax cross-entropy on these logits:

- a margin: the true class's distance term is multiplied by (1 + alpha) before the softmax,
  so a sample must be closer to its own mean than the margin asks to score low loss;
- a likelihood regulariser, lambda * mean(-log N(x; mu_y, Sigma_y)) (constant dropped), which
  pulls each feature towards its labelled class's mean: without it the features only need to be
  relatively closer, and the likelihood is no use for spotting outliers.

The likelihood is what :func:`lgm_scores` hands the inspect stage: a row whose features sit far
from its *labelled* class's Gaussian (a mislabelled row, a poison whose features collide with
another class) gets a high negative log-likelihood.

Nothing here exists in torch or a maintained library with the margin and the likelihood term
(torch's GaussianNLLLoss is a regression loss), hence the hand-written head.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COVARIANCES = ("identity", "diag")
LOSS_NAMES = ("ce", "lgm")


class LGMError(ValueError):
    """A bad LGM head, loss or score request (the message says what to change)."""


class LGMHead(nn.Module):
    """Class means (and optionally per-class diagonal log-variances) in feature space.

    ``forward(features) -> logits`` with ``logit_k = -d_k - 1/2 log|Sigma_k|`` (no margin: the
    margin is a training-time term of :class:`LGMLoss`, so train and eval forwards agree and
    checkpoints hold nothing mode-dependent). Computed in float32 even under autocast: the
    squared-distance expansion ``|x|^2 - 2 x.mu + |mu|^2`` cancels badly in bf16.

    ``is_head = True`` makes :func:`pipeline.core.features.classifier_head` hook this module's
    input as the penultimate representation.
    """

    is_head = True

    def __init__(self, in_features: int, num_classes: int, covariance: str = "identity"):
        super().__init__()
        if covariance not in COVARIANCES:
            raise LGMError(f"unknown LGM covariance {covariance!r}: use one of {', '.join(COVARIANCES)}")
        if in_features < 1 or num_classes < 2:
            raise LGMError(f"LGMHead needs in_features >= 1 and num_classes >= 2, got {in_features}, {num_classes}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.covariance = covariance
        # N(0, 1) means: the scale of post-ReLU features of the project's nets at initialisation
        # (unit-ish after batch norm), so the first logits are neither flat nor saturated.
        self.means = nn.Parameter(torch.randn(num_classes, in_features))
        if covariance == "diag":
            self.log_var = nn.Parameter(torch.zeros(num_classes, in_features))
        else:
            self.register_parameter("log_var", None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, covariance={self.covariance}"

    def log_det(self) -> torch.Tensor:
        """(K,) log|Sigma_k| (zeros for the identity)."""
        if self.log_var is None:
            return self.means.new_zeros(self.num_classes, dtype=torch.float32)
        return self.log_var.float().sum(1)

    def half_sq_distance(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) d_k(x) = 1/2 Mahalanobis distance squared to each class mean."""
        x = x.float().flatten(1)
        mu = self.means.float()
        if self.log_var is None:
            d2 = (x * x).sum(1, keepdim=True) - 2.0 * x @ mu.T + (mu * mu).sum(1)[None]
        else:
            inv = torch.exp(-self.log_var.float())  # (K, D) 1/variance
            d2 = (x * x) @ inv.T - 2.0 * x @ (mu * inv).T + (mu * mu * inv).sum(1)[None]
        return 0.5 * d2.clamp_min(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.flatten(1).shape[1] != self.in_features:
            raise LGMError(f"LGMHead expects {self.in_features} features, got {x.flatten(1).shape[1]}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            return -self.half_sq_distance(x) - 0.5 * self.log_det()[None]


def find_lgm_head(model: nn.Module) -> LGMHead:
    """The (last) :class:`LGMHead` of ``model``; :class:`LGMError` when it has none."""
    heads = [m for m in model.modules() if isinstance(m, LGMHead)]
    if not heads:
        raise LGMError(f"{type(model).__name__} has no LGM head: build it with head='lgm' "
                       "(train.loss=lgm) to use the LGM loss or its likelihood score")
    return heads[-1]


def margin_logits(logits: torch.Tensor, labels: torch.Tensor, head: LGMHead, alpha: float) -> torch.Tensor:
    """Logits with the true class's distance term scaled by ``1 + alpha``: logit_y - alpha * d_y.

    The head's logits already hold ``-d_k - 1/2 log|Sigma_k|``, so ``d_k`` is recovered from
    them without a second pass over the features."""
    half_d = -logits.float() - 0.5 * head.log_det()[None]
    onehot = F.one_hot(labels, logits.shape[1]).to(half_d.dtype)
    return logits.float() - float(alpha) * half_d * onehot


class LGMLoss(nn.Module):
    """``CE(margin_logits, y) + lam * mean(-log N(x; mu_y, Sigma_y))`` (constant dropped).

    ``-log N`` of the labelled class is ``-logit_y`` of the head (up to D/2 log 2 pi), so the
    loss needs only the logits and the head's log-variances.

    ``alpha`` (unitless): margin, the extra fraction of the true-class distance; Wan et al. use
    0.1-0.3 on CIFAR. ``lam`` (unitless): weight of the likelihood term relative to the
    classification term; Wan et al. use 0.1 and less.
    """

    def __init__(self, head: LGMHead, alpha: float = 0.1, lam: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        if not isinstance(head, LGMHead):
            raise LGMError(f"LGMLoss needs an LGMHead, got {type(head).__name__}")
        if not (alpha >= 0.0 and math.isfinite(alpha)):
            raise LGMError(f"lgm_alpha (margin) must be a finite number >= 0, got {alpha}")
        if not (lam >= 0.0 and math.isfinite(lam)):
            raise LGMError(f"lgm_lambda (likelihood weight) must be a finite number >= 0, got {lam}")
        self.head = head
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cls = F.cross_entropy(margin_logits(logits, labels, self.head, self.alpha), labels,
                              label_smoothing=self.label_smoothing)
        if self.lam == 0.0:
            return cls
        nll = -logits.float().gather(1, labels[:, None]).squeeze(1)
        return cls + self.lam * nll.mean()


def make_loss(model: nn.Module, loss: str = "ce", alpha: float = 0.1, lam: float = 0.1,
              label_smoothing: float = 0.0) -> nn.Module:
    """The training criterion ``(logits, labels) -> scalar`` for ``train.loss``: ``ce`` or ``lgm``
    (which needs a model built with ``head='lgm'``)."""
    if loss == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if loss == "lgm":
        return LGMLoss(find_lgm_head(model), alpha, lam, label_smoothing)
    raise LGMError(f"unknown loss {loss!r}: use one of {', '.join(LOSS_NAMES)}")


def replace_head(net: nn.Module, covariance: str = "identity") -> nn.Module:
    """Swap the last ``nn.Linear`` of ``net`` for an :class:`LGMHead` of the same shape, in place.

    Works for every model of :mod:`pipeline.core.models` (small_cnn's, ResNet-18's ``fc`` and
    fastnet's ``head`` are each the last Linear). fastnet multiplies its head's output by a
    logit scale; an LGM head's logits are log-likelihoods, so that scale is set to 1.
    """
    parent, name, linear = None, None, None
    for mod in net.modules():
        for child_name, child in mod.named_children():
            if isinstance(child, nn.Linear):
                parent, name, linear = mod, child_name, child
    if linear is None:
        raise LGMError(f"{type(net).__name__} has no nn.Linear to replace with an LGM head")
    setattr(parent, name, LGMHead(linear.in_features, linear.out_features, covariance))
    if hasattr(parent, "logit_scale"):
        parent.logit_scale = 1.0
    return net


@torch.no_grad()
def lgm_scores(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 512,
    device: str | torch.device = "auto",
) -> np.ndarray:
    """(N,) float64 negative log-likelihood of each row's *labelled* class Gaussian (nats; higher
    = more suspect): ``d_y(x) + 1/2 log|Sigma_y| + D/2 log 2 pi`` on the penultimate features.

    A plain eval-mode forward pass in float32 (no TTA, no autocast), through the head's logits,
    which are exactly the class log-likelihoods less ``D/2 log 2 pi``. ``model`` must carry an
    :class:`LGMHead` (``train.loss=lgm``); a softmax model has no class Gaussians to score under.
    """
    from .predict import predict_logits  # imported here: predict -> train -> losses

    head = find_lgm_head(model)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise LGMError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise LGMError("lgm_scores needs at least one row")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= head.num_classes:
        raise LGMError(f"labels must be integers in 0..{head.num_classes - 1}")
    logits = predict_logits(model, images, batch_size=batch_size, device=device, amp=False)
    ll = np.take_along_axis(logits.astype(np.float64), labels.astype(np.int64)[:, None], axis=1)[:, 0]
    return -ll + 0.5 * head.in_features * math.log(2.0 * math.pi)
