"""fastnet (shapes, patch whitening) and the CIFAR-10 verdict bench's --smoke path, on CPU."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import fastnet as FN
from pipeline.core.models import build_model

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shape", [(32, 3), (8, 1)])
def test_forward_shapes(shape):
    side, ch = shape
    net = FN.build_fastnet(num_classes=10, in_channels=ch, image_size=side, width=16)
    out = net(torch.randn(4, ch, side, side))
    assert out.shape == (4, 10)
    wrapped = build_model("fastnet", 10, ch, side, 16)  # behind core.models' Normalize
    raw = torch.randint(0, 256, (4, ch, side, side), dtype=torch.uint8)
    assert wrapped(raw).shape == (4, 10)
    assert FN.build is FN.build_fastnet


def _natural_like(n=200, side=16, seed=0):
    """Smooth, correlated images (neighbouring pixels and channels alike), uint8 NHWC."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, side // 4, side // 4, 1))
    img = np.repeat(np.repeat(base, 4, 1), 4, 2)
    img = img + 0.3 * rng.normal(size=(n, side, side, 3)) + np.array([0.2, 0.0, -0.2])
    return np.clip(128 + 50 * img, 0, 255).astype(np.uint8)


def test_whitening_gives_identity_covariance_on_training_patches():
    images = _natural_like()
    model = build_model("fastnet", 10, 3, 16, 16, mean=[0.5] * 3, std=[0.2] * 3)
    net = model.net
    assert not bool(net.whitened)
    FN.init_whitening(model, images, eps=1e-6)
    assert bool(net.whitened) and not net.whiten.weight.requires_grad
    x = FN.whitening_input(model, images)
    with torch.no_grad():
        out = net.whiten(x).double()  # (N, 2d, H-1, W-1)
    d = out.shape[1] // 2
    flat = out[:, :d].permute(0, 2, 3, 1).reshape(-1, d)
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.eye(d, dtype=cov.dtype), atol=0.02), cov.diagonal()
    assert flat.mean(0).abs().max() < 1e-3  # centred by the bias
    assert torch.allclose(out[:, d:], -out[:, :d])  # the negated copies
    # the raw input patches are far from white, so the test is not vacuous
    raw = torch.nn.functional.unfold(x.double(), 2).transpose(1, 2).reshape(-1, 12)
    assert (torch.cov(raw.T) - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5


def test_data_init_hook_is_called_by_fit():
    from pipeline.core.predict import predict
    from pipeline.core.train import TrainSpec, augment_pad, fit

    rng = np.random.default_rng(0)
    x = _natural_like(n=64, side=8)
    y = rng.integers(0, 3, 64)
    model = build_model("fastnet", 3, 3, 8, 8)
    assert augment_pad(model, 4) == FN.FastNet.augment_pad == 2  # found on the wrapped net
    fit(model, x, y, TrainSpec(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, augment=True, device="cpu"))
    assert bool(model.net.whitened)
    # fit whitened with exactly what init_whitening computes from the training images
    ref = build_model("fastnet", 3, 3, 8, 8)
    FN.init_whitening(ref, x)
    assert torch.allclose(model.net.whiten.weight, ref.net.whiten.weight)
    assert predict(model, x, device="cpu", tta=True).shape == (64,)


def test_tiny_image_refused():
    with pytest.raises(ValueError):
        FN.build_fastnet(10, 3, 1, 8)


# ----------------------------------------------------------------------------- bench --smoke


def _synthetic_archive(path: Path, per_class=(4, 2), classes=10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, n in zip(("train", "test"), per_class):
            for c in range(classes):
                for i in range(n):
                    a = (rng.integers(0, 40, (32, 32, 3)) + 20 * c).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, "JPEG" if i % 2 else "PNG")
                    info = tarfile.TarInfo(f"{split}/c{c:02d}/{i:03d}.{'jpg' if i % 2 else 'png'}")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))


def _load_bench(name: str):
    """A bench/ script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / f"bench/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _bench():
    return _load_bench("cifar10_verdict")


def test_bench_smoke_runs_the_three_configs(tmp_path, capsys):
    archive = tmp_path / "synth.tar.gz"
    _synthetic_archive(archive, per_class=(3, 1))
    out = tmp_path / "verdict.md"
    bench = _bench()
    rc = bench.main(["--smoke", "--data", str(archive), "--out", str(out), "--workers", "1", "--image-size", "8",
                     "--gate", "cifar10"])
    assert rc == 0
    text = out.read_text()
    for row in ("| reference | 1 | 1 |", "| resnet18 | 1 | 1 |", "| fastnet | 1 | 1 |"):
        assert row in text
    assert "torch: " + torch.__version__ in text and "SMOKE" in text and "trials:" in text
    assert "30 train / 10 test, 8 px" in text
    # the preset is named in the table and its thresholds judged the trials (gate=cifar10: 0.07, not 0.1)
    assert "preset cifar10 (conf/gate/cifar10.yaml): max_recall_drop=0.07" in text and "gate=cifar10" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["gate_preset"] == "cifar10" and raw["thresholds"]["min_accuracy"] == 0.85
    (check,) = [c for c in raw["results"][0]["checks"] if c["name"] == "recall_drop[c01]"]
    assert check["threshold"] == 0.07


def test_bench_refuses_bad_gate_and_classes_before_training(tmp_path, capsys):
    archive = tmp_path / "synth.tar.gz"
    _synthetic_archive(archive, per_class=(1, 1), classes=3)
    bench = _bench()
    args = ["--smoke", "--data", str(archive), "--out", str(tmp_path / "o.md"), "--workers", "1"]
    assert bench.main([*args, "--gate", "nope"]) == 2
    assert "conf/gate/nope.yaml: use one of cifar10, default" in capsys.readouterr().err
    assert bench.main([*args, "--source", "c02", "--target", "2"]) == 2  # same class, by name and index
    assert "same class" in capsys.readouterr().err
    assert bench.main([*args, "--target", "c07"]) == 2
    assert "unknown class 'c07'" in capsys.readouterr().err
    assert not (tmp_path / "o.md").exists()


def test_bench_loader_and_labels(tmp_path):
    from pipeline.data.sources import load_imagefolder
    from pipeline.schema import ConfigError, GateConfig

    archive = tmp_path / "synth.tar.gz"
    _synthetic_archive(archive, per_class=(3, 2), classes=3)
    bench = _bench()
    data = bench.load_data(archive, None, None, 1)
    assert data.class_names == ["c00", "c01", "c02"]
    assert data.x_train.shape == (9, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and data.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    limited = bench.load_data(archive, 4, None, 1)
    assert sorted(limited.y_train.tolist()) == [0, 0, 1, 2]  # round-robin over classes
    assert len(limited.y_test) == 6  # no test limit
    # two limits: the very rows load_imagefolder selects for each limit alone
    both = bench.load_data(archive, 5, 2, 1)
    for split, x, n in (("train", both.x_train, 5), ("test", both.x_test, 2)):
        ref = load_imagefolder(str(archive), n, 1)
        assert np.array_equal(x, ref.images[ref.splits == split])
    y, attack, k = bench.flip_labels(data, 1, "c02", 2 / 3, seed=0)
    assert k == 2 and (y == 1).sum() == 1 and (y == 2).sum() == 5 and attack["target"] == 2
    m = bench.classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), data.class_names)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["per_class"]["c02"]["recall"] == 0.0
    thr = GateConfig(max_asr=1.0, max_asr_increase=1.0, max_recall_drop=0.1, min_accuracy=0.5, max_accuracy_drop=0.03)
    checks = bench.gate({"accuracy": 0.9, "per_class": {"a": {"recall": 0.5}}},
                        {"accuracy": 0.9, "per_class": {"a": {"recall": 0.8}}}, thr)
    assert [c["name"] for c in checks if not c["passed"]] == ["recall_drop[a]"]
    spec, model = bench.core_config("fastnet", "cpu", epochs=1, lr="1e-3", width=8)
    assert (spec.batch_size, spec.epochs, spec.lr, spec.device, spec.tta, model.width) == (1024, 1, 0.001, "cpu", True, 8)
    assert bench.gate_config("cifar10").max_recall_drop == 0.07  # defaults: [default, _self_] applied
    assert bench.gate_config("cifar10").max_asr == bench.gate_config("default").max_asr
    with pytest.raises(ConfigError, match="epochs = 1.5 is float, not int"):
        bench.core_config("fastnet", "cpu", epochs=1.5)


def test_bench_config_refuses_bad_conf_files(tmp_path, monkeypatch):
    from pipeline.schema import ConfigError

    bench = _bench()
    files = {"train/fastnet.yaml": "epochs: 1\nlr_typo: 0.1\n", "model/fastnet.yaml": "name: fastnet\n",
             "gate/part.yaml": "max_recall_drop: 0.1\n", "gate/loop.yaml": "defaults: [loop]\n",
             "gate/wide.yaml": "defaults: [default]\nmax_recall_drop: 2.0\n"}
    for rel, body in {**files, "gate/default.yaml": (REPO / "conf/gate/default.yaml").read_text()}.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(body)
    monkeypatch.setattr(bench, "CONF", tmp_path)
    with pytest.raises(ConfigError, match=r"conf/train/fastnet.yaml: unknown key\(s\) \['lr_typo'\]"):
        bench.core_config("fastnet", "cpu")
    with pytest.raises(ConfigError, match=r"conf/gate/part.yaml: required key\(s\) \['max_asr'"):
        bench.gate_config("part")
    with pytest.raises(ConfigError, match="includes itself"):
        bench.gate_config("loop")
    with pytest.raises(ConfigError, match=r"conf/gate/wide.yaml: gate.max_recall_drop = 2.0 is invalid: must be a finite number in \[0, 1\]"):
        bench.gate_config("wide")


def test_patch_covariance_matches_unfold():
    """The strided-view patches give F.unfold's patch vectors, in conv-weight order."""
    x = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    mean, cov = FN.patch_covariance(x, 2)
    p = torch.nn.functional.unfold(x, 2).transpose(1, 2).reshape(-1, 12)
    torch.testing.assert_close(mean, p.mean(0))
    torch.testing.assert_close(cov, torch.cov(p.T))


def test_bench_warm_size_and_clean_pairs():
    bench = _bench()
    assert bench.warm_size(50000, 1024) == 4 * 1024 + 50000 % 1024  # ends in the real last-batch size
    assert bench.warm_size(100, 1024) == 100
    from pipeline.schema import GateConfig

    thr = GateConfig(max_asr=1.0, max_asr_increase=1.0, max_recall_drop=0.1, min_accuracy=0.0, max_accuracy_drop=0.03)

    def res(trial, recalls, acc):
        twin = {"accuracy": acc, "per_class": {c: {"recall": r} for c, r in zip("ab", recalls)}}
        return bench.Result("x", trial, 1, 0.0, 0.0, 0.0, twin, twin, [], False, False)

    cp = bench.clean_pairs([res(0, (0.9, 0.9), 0.9), res(1, (0.75, 0.95), 0.88)], thr)
    # 0 as baseline, 1 as candidate: class a drops 0.15 -> blocked; the reverse drops 0.05 -> passes
    assert cp["pairs"] == 2 and cp["blocked"] == 1
    assert cp["max_recall_drop"] == pytest.approx(0.15) and cp["max_accuracy_drop"] == pytest.approx(0.02)
    assert bench.clean_pairs([res(0, (0.9, 0.9), 0.9)], thr)["pairs"] == 0


def test_bench_refuses_bad_ref_workers(tmp_path, capsys):
    archive = tmp_path / "synth.tar.gz"
    _synthetic_archive(archive, per_class=(1, 1), classes=2)
    assert _bench().main(["--data", str(archive), "--ref-workers", "four", "--out", str(tmp_path / "o.md")]) == 2
    assert "--ref-workers" in capsys.readouterr().err


def test_tune_script_runs_and_profiles_on_cpu(tmp_path):
    archive = tmp_path / "synth.tar.gz"
    _synthetic_archive(archive, per_class=(3, 1))
    tune = _load_bench("cifar10_tune")
    out = tmp_path / "tune.jsonl"
    rc = tune.main(["--data", str(archive), "--image-size", "8", "--device", "cpu", "--out", str(out),
                    "--run", "fastnet:epochs=1,width=8", "--profile", "fastnet:epochs=1,width=8", "--profile-rows", "3"])
    assert rc == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["changed"] == {"epochs": 1, "width": 8} and row["width"] == 8 and row["epochs"] == 1
    assert 0.0 <= row["acc_plain"] <= 1.0 and row["s_model"] > 0
    assert "profile fastnet" in (tmp_path / "profile_fastnet.txt").read_text()
    with pytest.raises(SystemExit):
        tune.main(["--data", str(archive), "--run", "vgg"])
    with pytest.raises(SystemExit, match="unknown key"):
        tune.main(["--data", str(archive), "--run", "fastnet:bogus=1"])


def test_setup_cost_bench_runs_and_checks_agreement(tmp_path):
    archive = tmp_path / "synth.tar.gz"
    _synthetic_archive(archive, per_class=(3, 1))
    mod = _load_bench("train_setup_cost")
    out = tmp_path / "cost.md"
    assert mod.main(["--data", str(archive), "--trials", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "256-bin histogram (now)" in text and "float64 chunked sums (before)" in text and "trials: 2" in text
