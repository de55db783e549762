"""Backdoor remedies (pipeline.core.remedy): trusted reserve, clean fine-tuning, fine-pruning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.attacks import apply_trigger, poison
from pipeline.core.models import build_model
from pipeline.core.predict import predict
from pipeline.core.remedy import RemedyError, fine_prune, finetune, last_norm_layer, trusted_reserve
from pipeline.core.train import TrainSpec, fit, train_model
from pipeline.evaluate import asr_from_predictions

PATCH = {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white"}
# source-specific BadNets 1 -> 7 on 10% of the digit-1 rows (14 rows): ASR ~100% on a width-16
# small_cnn after 6 epochs of the digits recipe, trained in a few seconds
ATTACK = {"name": "backdoor", "source": 1, "target": 7, "rate": 0.1, "seed": 0, "trigger": PATCH}
SPEC = TrainSpec(epochs=6, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", seed=0, device="cpu")
# the stated tolerance: a remedy may cost at most 3 points of clean accuracy on the 450 test rows
# (the bench's goal is 2 points on the mean of 3 seeds; one seed of one model moves by ~1 point)
MAX_ACC_DROP = 0.03


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def backdoored(digits_split):
    xtr, ytr, xte, yte = digits_split
    xp, yp, records = poison(xtr, ytr, [str(i) for i in range(len(xtr))], ATTACK, [str(c) for c in range(10)])
    rows = np.array([int(r["sample_id"]) for r in records])
    model, _, _ = train_model(xp, yp, 10, "small_cnn", 16, SPEC)
    reserve = trusted_reserve(ytr, 0.10, seed=0, exclude=rows)
    return model, xp, yp, rows, reserve


def asr_acc(model, digits_split) -> tuple[float, float]:
    _, _, xte, yte = digits_split
    clean = predict(model, xte, device="cpu")
    trig = predict(model, apply_trigger(xte, PATCH), device="cpu")
    asr, n = asr_from_predictions(yte, clean, trig, target=7, source=1)
    assert n > 30  # the digit-1 test rows the model gets right
    return asr, float((clean == yte).mean())


# --------------------------------------------------------------------------- reserve


def test_trusted_reserve_is_stratified_clean_and_seeded():
    labels = np.repeat(np.arange(5), 40)  # 200 rows, 40 per class
    poisoned = np.arange(0, 200, 7)
    r = trusted_reserve(labels, 0.1, seed=3, exclude=poisoned)
    assert len(r) == 20 and len(np.unique(r)) == 20 and np.all(np.diff(r) > 0)
    assert not np.isin(r, poisoned).any()
    assert np.bincount(labels[r], minlength=5).min() >= 3  # every class gets its share (4 +- 1)
    assert np.array_equal(r, trusted_reserve(labels, 0.1, seed=3, exclude=poisoned))
    assert not np.array_equal(r, trusted_reserve(labels, 0.1, seed=4, exclude=poisoned))
    # the fraction refers to n_rows when given (the bench: a share of all training rows)
    assert len(trusted_reserve(labels, 0.05, seed=0, n_rows=1000)) == 50


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_trusted_reserve_refuses_bad_fractions(fraction):
    with pytest.raises(RemedyError, match="fraction"):
        trusted_reserve(np.zeros(10, np.int64), fraction)


def test_trusted_reserve_refuses_more_rows_than_are_clean():
    with pytest.raises(RemedyError, match="cannot be drawn"):
        trusted_reserve(np.zeros(10, np.int64), 0.5, exclude=np.arange(7))


# --------------------------------------------------------------------------- fine-tuning


def test_finetune_lowers_backdoor_asr_and_keeps_accuracy(backdoored, digits_split):
    model, xp, yp, _, reserve = backdoored
    asr0, acc0 = asr_acc(model, digits_split)
    assert asr0 >= 0.8  # the attack took: otherwise the test proves nothing
    m = copy.deepcopy(model)
    history = finetune(m, xp[reserve], yp[reserve], epochs=10, seed=0, device="cpu")
    asr1, acc1 = asr_acc(m, digits_split)
    assert len(history) == 10 and history[0]["lr"] == pytest.approx(2e-3)  # constant rate
    assert asr1 <= asr0 - 0.5, (asr0, asr1)
    assert acc1 >= acc0 - MAX_ACC_DROP, (acc0, acc1)


def test_finetune_zero_epochs_leaves_the_model_untouched(backdoored):
    model, xp, yp, _, reserve = backdoored
    m = copy.deepcopy(model)
    assert finetune(m, xp[reserve], yp[reserve], epochs=0, device="cpu") == []
    for a, b in zip(model.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)


class _Counted(nn.Module):
    """A tiny net with a data_init hook that counts its calls (fastnet's whitening stand-in)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.calls = 0

    def data_init(self, root, images):
        self.calls += 1

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x.float() / 255))).mean((2, 3)))


def test_finetune_does_not_rerun_data_init():
    x = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    y = np.arange(12) % 3
    net = _Counted()
    fit(net, x, y, TrainSpec(epochs=1, batch_size=4, device="cpu"))
    assert net.calls == 1
    finetune(net, x, y, epochs=2, batch_size=4, device="cpu")
    assert net.calls == 1


def test_freeze_norm_keeps_running_statistics_and_trains_scale_and_shift():
    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    y = np.arange(16) % 4
    base = build_model("small_cnn", 4, 1, 8, width=4)
    norms = lambda m: [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]  # noqa: E731
    frozen, free = copy.deepcopy(base), copy.deepcopy(base)
    finetune(frozen, x, y, epochs=2, batch_size=8, device="cpu", freeze_norm=True)
    finetune(free, x, y, epochs=2, batch_size=8, device="cpu", freeze_norm=False)
    for b, f, g in zip(norms(base), norms(frozen), norms(free)):
        assert torch.equal(b.running_mean, f.running_mean) and torch.equal(b.running_var, f.running_var)
        assert int(f.num_batches_tracked) == 0
        assert not torch.equal(b.weight, f.weight)  # scale (and shift) still learn
        assert not torch.equal(b.running_mean, g.running_mean)  # the default does move them
    # the pre-hooks are gone: a later forward in train mode updates the statistics again
    frozen.train()
    before = norms(frozen)[0].running_mean.clone()
    frozen(torch.as_tensor(x).permute(0, 3, 1, 2))
    assert not torch.equal(before, norms(frozen)[0].running_mean)


def test_finetune_is_seeded_whatever_ran_before():
    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    y = np.arange(16) % 4
    base = build_model("small_cnn", 4, 1, 8, width=4)  # has dropout: draws from the global generator
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(123)
    finetune(a, x, y, epochs=2, batch_size=8, seed=5, device="cpu")
    torch.rand(1000)  # consume the global generator
    finetune(b, x, y, epochs=2, batch_size=8, seed=5, device="cpu")
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_finetune_uses_the_lgm_loss_for_an_lgm_model():
    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    y = np.arange(16) % 4
    base = build_model("small_cnn", 4, 1, 8, width=4, head="lgm")
    runs = {}
    for loss in (None, "lgm", "ce"):
        torch.manual_seed(0)
        m = copy.deepcopy(base)
        runs[loss] = [h["loss"] for h in finetune(m, x, y, epochs=2, batch_size=8, device="cpu", loss=loss)]
    assert runs[None] == runs["lgm"] and runs[None] != runs["ce"]


@pytest.mark.parametrize("kwargs, match", [
    ({"images": np.zeros((4, 8, 8, 1), np.float32)}, "uint8"),
    ({"labels": np.array([0, 1, 2])}, "4 images"),
    ({"labels": np.array([0, 1, 2, 10])}, r"0\.\.9"),
    ({"labels": np.array([0.0, 1.0, 2.0, 3.0])}, "integers"),
    ({"lr": 0.0}, "lr"),
    ({"epochs": -1}, "epochs"),
    ({"epochs": 1.5}, "epochs"),
    ({"batch_size": 1}, "batch_size"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"images": np.zeros((1, 8, 8, 1), np.uint8), "labels": np.array([0])}, "at least 2"),
])
def test_finetune_refuses_bad_input(kwargs, match):
    args = {"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.array([0, 1, 2, 3]), "device": "cpu"}
    args.update(kwargs)
    with pytest.raises(RemedyError, match=match):
        finetune(build_model("small_cnn", 10, 1, 8, width=4), **args)


# --------------------------------------------------------------------------- fine-pruning


def test_fine_prune_switches_off_dormant_channels_and_lowers_asr(backdoored, digits_split):
    model, xp, yp, _, reserve = backdoored
    asr0, acc0 = asr_acc(model, digits_split)
    m = copy.deepcopy(model)
    r = fine_prune(m, xp[reserve], yp[reserve], max_accuracy_drop=0.05, epochs=10, seed=0, device="cpu")
    name, norm = last_norm_layer(m)
    assert r.layer == name and r.channels == norm.num_features and 0 < len(r.pruned) < r.channels
    assert r.reserve_accuracy_pruned >= r.reserve_accuracy_before - 0.05
    off = torch.as_tensor(r.pruned)
    # pruned for good: scale and shift are 0 after fine-tuning, the others trained on
    assert torch.all(norm.weight[off] == 0) and torch.all(norm.bias[off] == 0)
    assert torch.count_nonzero(norm.weight) == r.channels - len(r.pruned)
    # the state dict keeps the plain keys (no *_orig / *_mask): it loads into a fresh model
    fresh = build_model("small_cnn", 10, 1, 8, width=16)
    fresh.load_state_dict(m.state_dict())
    asr1, acc1 = asr_acc(m, digits_split)
    assert asr1 <= asr0 - 0.5, (asr0, asr1)
    assert acc1 >= acc0 - MAX_ACC_DROP, (acc0, acc1)


def test_fine_prune_refuses_bad_settings():
    x = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    y = np.arange(8) % 4
    model = build_model("small_cnn", 4, 1, 8, width=4)
    with pytest.raises(RemedyError, match="max_fraction"):
        fine_prune(model, x, y, max_fraction=1.0, device="cpu")
    with pytest.raises(RemedyError, match="max_accuracy_drop"):
        fine_prune(model, x, y, max_accuracy_drop=5, device="cpu")
    with pytest.raises(RemedyError, match="at least 2"):
        fine_prune(model, x[:1], y[:1], device="cpu")
    no_norm = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(RemedyError, match="BatchNorm2d"):
        fine_prune(no_norm, x, y, device="cpu")
