"""The GPU data path on CPU: core.augment (crop/flip, TTA) and how core.train.fit and
core.predict use it (data_init hook, augment_pad, determinism, learning)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core import augment as A


def _batch(n=6, c=3, h=8, w=8, dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype)


def _reflect(i: int, size: int) -> int:
    i = abs(i)
    return 2 * (size - 1) - i if i > size - 1 else i


def _reference_crop(img: torch.Tensor, pad: int, oy: int, ox: int, flip: bool, mode: str) -> torch.Tensor:
    """Explicit per-pixel reference: pad the image, take the window at (oy, ox), flip."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            si, sj = i + oy - pad, j + ox - pad
            if mode == "reflect":
                out[:, i, j] = img[:, _reflect(si, h), _reflect(sj, w)]
            elif 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_crop_flip_matches_per_image_reference(dtype, mode):
    x = _batch(n=16, dtype=dtype)
    pad = 3
    out = A.random_crop_flip(x, pad, torch.Generator().manual_seed(7), mode=mode)
    # replay the documented draw order: oy for all, ox for all, then flips
    g = torch.Generator().manual_seed(7)
    oy = torch.randint(0, 2 * pad + 1, (16,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (16,), generator=g)
    fl = torch.randint(0, 2, (16,), generator=g).bool()
    assert out.shape == x.shape and out.dtype == x.dtype
    for n in range(16):
        ref = _reference_crop(x[n], pad, int(oy[n]), int(ox[n]), bool(fl[n]), mode)
        assert torch.equal(out[n], ref), n
    assert len(set(zip(oy.tolist(), ox.tolist()))) > 1 and 0 < int(fl.sum()) < 16  # the draws vary


@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_chunked_crop_flip_is_the_whole_set_gather(chunk, mode):
    """The training loop augments a resident set ``chunk_rows`` images at a time (bounded gather
    indices): the same draws, the same pixels, the same channels_last layout as one gather."""
    x = _batch(n=16)
    whole = A.random_crop_flip(x, 3, torch.Generator().manual_seed(7), mode=mode)
    part = A.random_crop_flip(x, 3, torch.Generator().manual_seed(7), mode=mode, chunk_rows=chunk)
    assert torch.equal(part, whole) and part.stride() == whole.stride()
    with pytest.raises(ValueError, match="chunk_rows"):
        A.random_crop_flip(x, 3, torch.Generator(), chunk_rows=0)
    assert A.chunk_rows_for((10, 3, 32, 32)) == 21845 and A.chunk_rows_for((1, 1, 10**6, 10**6)) == 1


def test_crop_flip_window_of_padded_input_without_replay():
    """Every output is one of the (2p+1)^2 x 2 windows of its own input (no knowledge of the RNG)."""
    x = _batch(n=8, c=2, h=6, w=7)
    pad = 2
    out = A.random_crop_flip(x, pad, torch.Generator().manual_seed(1))
    for n in range(8):
        windows = [_reference_crop(x[n], pad, oy, ox, fl, "reflect")
                   for oy in range(2 * pad + 1) for ox in range(2 * pad + 1) for fl in (False, True)]
        assert any(torch.equal(out[n], wnd) for wnd in windows)


def test_flip_only_equals_torch_flip_and_values_preserved():
    x = _batch(n=32)
    out = A.random_crop_flip(x, 0, torch.Generator().manual_seed(3))
    flipped = [torch.equal(out[n], x[n].flip(-1)) for n in range(32)]
    same = [torch.equal(out[n], x[n]) for n in range(32)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
    # no new values: a crop/flip only moves pixels (reflect), or adds zeros (zeros mode)
    crop = A.random_crop_flip(x, 4, torch.Generator().manual_seed(3))
    for n in range(32):
        assert set(crop[n].unique().tolist()) <= set(x[n].unique().tolist())
    f = A.random_crop_flip(x.float() / 255, 2, torch.Generator().manual_seed(3))
    assert f.dtype == torch.float32 and 0 <= float(f.min()) and float(f.max()) <= 1


def test_crop_flip_is_deterministic_under_a_generator():
    x = _batch(n=10)
    a = A.random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    b = A.random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    c = A.random_crop_flip(x, 2, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_refuses_bad_pad():
    with pytest.raises(ValueError):
        A.random_crop_flip(_batch(h=4, w=4), 4, torch.Generator())
    with pytest.raises(ValueError):
        A.random_crop_flip(_batch(), -1, torch.Generator())
    with pytest.raises(ValueError):
        A.shift_images(_batch(), 1, 1, mode="wrap")


def test_output_is_channels_last_strided():
    out = A.random_crop_flip(_batch(), 2, torch.Generator())
    assert out.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- TTA


class GAP(nn.Module):
    def forward(self, x):
        return x.float().mean((2, 3))


def test_tta_view_set_is_documented():
    assert A.tta_view_specs(2) == [(False, 0, 0), (True, 0, 0), (False, 2, 2), (False, -2, -2),
                                   (True, 2, 2), (True, -2, -2)]
    assert A.tta_view_specs(0) == [(False, 0, 0), (True, 0, 0)]
    assert A.tta_view_specs(2, flip=False) == [(False, 0, 0), (False, 2, 2), (False, -2, -2)]


def test_tta_of_invariant_model_equals_plain_logits():
    model = GAP()
    # global average pooling is exactly flip invariant
    x = _batch(n=5, h=10, w=10).float()
    assert torch.allclose(A.tta_logits(model, x, shift=0), model(x), atol=1e-5)
    # and translation invariant on images whose content does not depend on position
    const = torch.rand(5, 3, 1, 1).expand(5, 3, 10, 10) * 255
    assert torch.allclose(A.tta_logits(model, const, shift=2), model(const), atol=1e-4)


def test_tta_of_asymmetric_model_matches_hand_computation():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    x = _batch(n=3, c=2, h=6, w=6).float()
    views = []
    for fl, dy, dx in [(False, 0, 0), (True, 0, 0), (False, 2, 2), (False, -2, -2), (True, 2, 2), (True, -2, -2)]:
        v = torch.stack([_reference_crop(img, 2, 2 - dy, 2 - dx, False, "reflect") for img in x])
        views.append(v.flip(-1) if fl else v)
    expected = torch.stack([lin(v) for v in views]).mean(0)
    got = A.tta_logits(lin, x, shift=2)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, lin(x), atol=1e-3)  # the views matter for this model


# ----------------------------------------------------------------------------- fit, predict


def _tiny_problem(n=96, side=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 80, (n, side, side, 1)).astype(np.uint8)
    x[y == 1] += 150  # class 1 is bright: learnable in a few steps
    return x, y


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.init_calls = 0

    def data_init(self, root, images):
        assert root is not None and images.dtype == np.uint8
        self.init_calls += 1

    def forward(self, x):
        x = x.float() / 255
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_fit_learns_and_is_deterministic():
    from pipeline.core.predict import predict, predict_logits
    from pipeline.core.train import TrainSpec, fit

    x, y = _tiny_problem(n=64)
    spec = TrainSpec(epochs=5, batch_size=16, optimizer="sgd", lr=0.5, schedule="onecycle", device="cpu",
                     label_smoothing=0.1, augment=True, aug_pad=1, weight_decay=5e-4)
    torch.manual_seed(0)
    m1 = Tiny()
    h1 = fit(m1, x, y, spec)
    torch.manual_seed(0)
    m2 = Tiny()
    h2 = fit(m2, x, y, spec)
    assert m1.init_calls == 1 and not m1.training
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2] and len(h1) == 5
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert h1[-1]["loss"] < h1[0]["loss"]
    pred = predict(m1, x, device="cpu", batch_size=40)
    assert pred.dtype == np.int64 and pred.shape == (64,) and (pred == y).mean() > 0.9
    logits = predict_logits(m1, x, device="cpu", tta=True, batch_size=40)
    assert logits.shape == (64, 2) and logits.dtype == np.float32
    # a different seed draws other crops and another order
    h3 = fit(Tiny(), x, y, dataclasses.replace(spec, seed=1))
    assert [r["loss"] for r in h3] != [r["loss"] for r in h1]


def test_fit_augments_on_device_with_the_models_pad(monkeypatch):
    """fit crops with the model's (or a submodule's) ``augment_pad``, else spec.aug_pad, drawing
    from a generator on the training device; one augmentation of the whole set per epoch."""
    from pipeline.core import train as T
    from pipeline.core.models import Normalize

    calls = []
    real = A.random_crop_flip

    def spy(x, pad, generator=None, **kw):
        calls.append((tuple(x.shape), pad, generator.device if generator is not None else None))
        return real(x, pad, generator, **kw)

    monkeypatch.setattr(A, "random_crop_flip", spy)
    x, y = _tiny_problem(n=40)
    spec = T.TrainSpec(epochs=2, batch_size=16, device="cpu", augment=True, aug_pad=3)

    T.fit(Tiny(), x, y, spec)
    assert calls == [((40, 1, 8, 8), 3, torch.device("cpu"))] * 2
    calls.clear()

    class Padded(Tiny):
        augment_pad = 1

    wrapped = nn.Sequential(Normalize([0.5], [0.5]), Padded())  # as build_model wraps nets
    assert T.augment_pad(wrapped, 3) == 1 and T.augment_pad(Tiny(), 3) == 3
    T.fit(wrapped, x, y, spec)
    assert [c[1] for c in calls] == [1, 1]
    calls.clear()
    T.fit(Tiny(), x, y, T.TrainSpec(epochs=1, batch_size=16, device="cpu", augment=False))
    assert calls == []
