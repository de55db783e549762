"""GPU tier: the CUDA path of the core (bf16 autocast, channels_last, device-side augmentation).

Runs only where torch sees a GPU (the lent device machine: `python -m pytest -m gpu tests/test_gpu.py`);
CI has none and reports these as skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.images * 255 / 16).astype(np.uint8)[..., None]
    return train_test_split(x, d.target, test_size=0.25, stratify=d.target, random_state=0)


def test_digits_cnn_trains_on_cuda_with_bf16_and_channels_last():
    from pipeline.core.predict import predict
    from pipeline.core.train import TrainSpec, train_model

    x_tr, x_te, y_tr, y_te = _digits()
    spec = TrainSpec(epochs=10, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", seed=0,
                     device="cuda", amp=True, channels_last=True)
    model, _, history = train_model(x_tr, y_tr, 10, "small_cnn", 32, spec)
    assert next(model.parameters()).device.type == "cuda"
    assert history[-1]["loss"] < history[0]["loss"]
    acc = float((predict(model, x_te, device="cuda") == y_te).mean())
    assert acc >= 0.95, acc
    # TTA on CUDA returns one class per image, like the plain pass
    assert predict(model, x_te, device="cuda", tta=True).shape == y_te.shape


def test_crop_flip_on_cuda_keeps_shape_dtype_and_is_seeded():
    from pipeline.core.augment import random_crop_flip

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    out = random_crop_flip(x, 4, g)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device.type == "cuda"
    # the same device generator seed gives the same crops (window semantics: tests/test_augment.py)
    g2 = torch.Generator(device="cuda").manual_seed(0)
    assert torch.equal(random_crop_flip(x, 4, g2), out)
