"""The LGM head, loss and likelihood score (pipeline.core.losses) and the head=lgm model arg."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.features import classifier_head, penultimate_features
from pipeline.core.losses import LGMError, LGMHead, LGMLoss, lgm_scores, make_loss, margin_logits
from pipeline.checkpoints import load as load_checkpoint
from pipeline.checkpoints import save as save_checkpoint
from pipeline.core.models import build_model, model_args
from pipeline.core.predict import predict, predict_logits
from pipeline.core.train import TrainSpec, fit, train_model

# the digits recipe at 6 epochs: enough for ~97% here, half the test time of the full 10
LGM_SPEC = TrainSpec(epochs=6, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", seed=0,
                     device="cpu", loss="lgm", lgm_alpha=0.1, lgm_lambda=0.1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def lgm_model(digits_split):
    xtr, ytr, _, _ = digits_split
    model, args, history = train_model(xtr, ytr, 10, "small_cnn", 16, LGM_SPEC)
    return model, args, history


# --------------------------------------------------------------------------- head


@pytest.mark.parametrize("cov", ["identity", "diag"])
def test_head_shapes_and_logits_are_gaussian_log_likelihoods(cov):
    torch.manual_seed(0)
    head = LGMHead(6, 4, covariance=cov)
    if cov == "diag":
        with torch.no_grad():
            head.log_var.uniform_(-1.0, 1.0)
    x = torch.randn(5, 6)
    logits = head(x)
    assert logits.shape == (5, 4) and logits.dtype == torch.float32
    var = torch.ones(4, 6) if cov == "identity" else head.log_var.detach().exp()
    for i in range(5):
        for k in range(4):
            d = 0.5 * (((x[i] - head.means[k].detach()) ** 2) / var[k]).sum()
            expect = -d - 0.5 * torch.log(var[k]).sum()
            assert logits[i, k].item() == pytest.approx(expect.item(), rel=1e-4, abs=1e-4)
    # the nearest mean (identity) wins the argmax
    if cov == "identity":
        assert torch.equal(logits.argmax(1), torch.cdist(x, head.means.detach()).argmin(1))


def test_head_refuses_bad_arguments():
    with pytest.raises(LGMError, match="covariance"):
        LGMHead(4, 3, covariance="full")
    with pytest.raises(LGMError, match="num_classes"):
        LGMHead(4, 1)
    with pytest.raises(LGMError, match="expects 4 features"):
        LGMHead(4, 3)(torch.zeros(2, 5))


def test_model_with_lgm_head_is_found_by_features():
    m = build_model("small_cnn", 10, 1, 8, width=8, head="lgm").eval()
    head = classifier_head(m)
    assert isinstance(head, LGMHead) and head.in_features == 2 * 8 * 4 and head.num_classes == 10
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    feats, logits = penultimate_features(m, x, device="cpu", return_logits=True)
    assert feats.shape == (3, 64) and logits.shape == (3, 10)
    # fastnet's logit scale would distort log-likelihoods: the swap sets it to 1
    f = build_model("fastnet", 10, 1, 8, width=4, head="lgm")
    assert isinstance(classifier_head(f), LGMHead) and f.net.logit_scale == 1.0
    with pytest.raises(ValueError, match="unknown head"):
        build_model("small_cnn", 10, 1, 8, head="softmax")


# --------------------------------------------------------------------------- loss


def test_margin_lowers_only_the_true_class_logit():
    torch.manual_seed(0)
    head = LGMHead(5, 3)
    logits = head(torch.randn(4, 5))
    y = torch.tensor([0, 1, 2, 1])
    ml = margin_logits(logits, y, head, alpha=0.5)
    true = torch.arange(4), y
    assert (ml[true] < logits[true]).all()
    other = torch.ones_like(logits, dtype=torch.bool)
    other[true] = False
    assert torch.equal(ml[other], logits[other])
    assert torch.equal(margin_logits(logits, y, head, alpha=0.0), logits)
    # the margin makes the loss harder: CE part grows with alpha (lambda 0 isolates it)
    assert LGMLoss(head, 0.5, 0.0)(logits, y) > LGMLoss(head, 0.0, 0.0)(logits, y)
    # the likelihood term is -logit_y: lambda adds lam * mean(-logit_y)
    base = LGMLoss(head, 0.1, 0.0)(logits, y)
    extra = (-logits[true]).mean()
    assert LGMLoss(head, 0.1, 0.3)(logits, y).item() == pytest.approx((base + 0.3 * extra).item(), rel=1e-5)


def test_loss_refuses_bad_settings():
    head = LGMHead(4, 3)
    with pytest.raises(LGMError, match="alpha"):
        LGMLoss(head, alpha=-0.1)
    with pytest.raises(LGMError, match="lambda"):
        LGMLoss(head, lam=float("nan"))
    with pytest.raises(LGMError, match="no LGM head"):
        make_loss(build_model("small_cnn", 3, 1, 8, width=4), "lgm")
    with pytest.raises(LGMError, match="unknown loss"):
        make_loss(build_model("small_cnn", 3, 1, 8, width=4), "hinge")
    x = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(LGMError, match="unknown loss"):
        fit(build_model("small_cnn", 3, 1, 8, width=4), x, np.array([0, 1, 2, 0]),
            TrainSpec(epochs=1, device="cpu", loss="focal"))


def test_lgm_training_decreases_the_loss_and_classifies(lgm_model, digits_split):
    model, args, history = lgm_model
    _, _, xte, yte = digits_split
    assert args["head"] == "lgm" and args["lgm_covariance"] == "identity"
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    # same bar as a CE digits model would clear at this length (>= 90%, digits is ~99% at 10 epochs)
    assert (predict(model, xte, device="cpu") == yte).mean() >= 0.9


def test_lgm_scores_rank_mislabelled_rows_above_their_class(lgm_model, digits_split):
    model, _, _ = lgm_model
    xtr, ytr, xte, yte = digits_split
    # clean test rows of class c as labelled, and five test rows of class w mislabelled c: every
    # mislabelled row scores above 95% of the clean ones (margins ~15-25 nats on this model)
    for c, w in ((1, 7), (0, 6)):
        clean = xte[yte == c]
        wrong = xte[yte == w][:5]
        s_clean = lgm_scores(model, clean, np.full(len(clean), c), device="cpu")
        s_wrong = lgm_scores(model, wrong, np.full(len(wrong), c), device="cpu")
        assert s_clean.shape == (len(clean),) and s_clean.dtype == np.float64
        assert s_wrong.min() > np.quantile(s_clean, 0.95), (c, w, s_wrong, np.quantile(s_clean, 0.95))
    # score = -logit_y + D/2 log 2 pi (an NLL in nats)
    logits = predict_logits(model, wrong, device="cpu", amp=False)
    d = classifier_head(model).in_features
    np.testing.assert_allclose(s_wrong, -logits[:, c] + 0.5 * d * math.log(2 * math.pi), rtol=1e-6)


def test_lgm_scores_refuse_bad_input(lgm_model):
    model, _, _ = lgm_model
    x = np.zeros((3, 8, 8, 1), np.uint8)
    with pytest.raises(LGMError, match="3 images but 2 labels"):
        lgm_scores(model, x, np.array([0, 1]), device="cpu")
    with pytest.raises(LGMError, match=r"0\.\.9"):
        lgm_scores(model, x, np.array([0, 1, 10]), device="cpu")
    with pytest.raises(LGMError, match="no LGM head"):
        lgm_scores(build_model("small_cnn", 10, 1, 8, width=4), x, np.array([0, 1, 2]), device="cpu")


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("cov", ["identity", "diag"])
def test_lgm_checkpoint_roundtrip(tmp_path, cov):
    torch.manual_seed(0)
    args = model_args("small_cnn", 4, 1, 8, 4, [0.3], [0.2], head="lgm", lgm_covariance=cov)
    m = build_model(**args).eval()
    with torch.no_grad():
        if cov == "diag":
            classifier_head(m).log_var.uniform_(-1, 1)
    save_checkpoint(tmp_path / "m.pt", m, args, kind="candidate")
    m2, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["model_args"]["head"] == "lgm" and isinstance(classifier_head(m2), LGMHead)
    assert classifier_head(m2).covariance == cov
    x = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_allclose(predict_logits(m, x, device="cpu"), predict_logits(m2, x, device="cpu"),
                               rtol=1e-6, atol=1e-5)


def test_linear_model_args_are_unchanged_and_old_checkpoints_load(tmp_path):
    args = model_args("small_cnn", 3, 1, 8, 4, [0.3], [0.2])
    assert "head" not in args and "lgm_covariance" not in args  # earlier checkpoints' exact keys
    m = build_model(**args)
    save_checkpoint(tmp_path / "old.pt", m, args)
    m2, _ = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(classifier_head(m2), torch.nn.Linear)
