"""Clean-label attacks (pipeline.core.clean_label): ε bound, labels kept, the crafting objective
moves the right way, records match the arrays, determinism, refused inputs. Fast tier: one small
clean model (3 epochs) shared by the module, few crafting steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core import clean_label as cl
from pipeline.core.attacks import apply_trigger
from pipeline.core.features import penultimate_features
from pipeline.core.hashing import sample_hash
from pipeline.core.train import TrainSpec, train_model

TRIGGER = {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white", "alpha": 0.1, "seed": 0}
SOURCE, BASE, TARGET = 4, 9, 8


@pytest.fixture(scope="module")
def setup(digits_split):
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = digits_split
    spec = TrainSpec(epochs=3, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", device="cpu", seed=1)
    model = train_model(xtr, ytr, 10, "small_cnn", 16, spec)[0]
    ids = [f"train-{i}" for i in range(len(xtr))]
    target_idx = cl.pick_targets(model, xte, yte, SOURCE, 2, seed=0)
    return model, xtr, ytr, ids, xte, yte, target_idx


def _check_records(res: cl.CleanLabelResult, before: np.ndarray, labels: np.ndarray, ids: list[str]) -> None:
    """Records and stacked perturbations describe exactly the rows that changed."""
    assert len(res.records) == len(res.rows) == len(res.perturbations)
    assert res.perturbations.dtype == np.int16
    np.testing.assert_array_equal(res.perturbations, res.images[res.rows].astype(np.int16) - before[res.rows].astype(np.int16))
    np.testing.assert_array_equal(cl.apply_perturbations(before, res.rows, res.perturbations), res.images)
    for j, (i, rec) in enumerate(zip(res.rows, res.records)):
        assert rec["sample_id"] == ids[i]
        assert rec["original_label"] == rec["new_label"] == int(labels[i])
        assert rec["transform"]["delta_index"] == j
        np.testing.assert_array_equal(rec["perturbation"], res.perturbations[j])
        d = rec["perturbation"].astype(np.float64)
        assert rec["linf"] == pytest.approx(np.abs(d).max())
        assert rec["l2"] == pytest.approx(np.sqrt((d**2).sum()))
        assert rec["sha256_after"] == sample_hash(res.images[i])
    untouched = np.setdiff1d(np.arange(len(before)), res.rows)
    np.testing.assert_array_equal(res.images[untouched], before[untouched])


def test_feature_collision_stays_in_eps_and_keeps_labels(setup):
    model, xtr, ytr, ids, xte, _yte, tidx = setup
    eps = 16.0
    res = cl.feature_collision(model, xtr, ytr, ids, xte[tidx[0]], BASE, rate=0.1, eps=eps, steps=15, opacity=0.5)
    assert res.images.dtype == np.uint8 and res.images.shape == xtr.shape
    np.testing.assert_array_equal(res.labels, ytr)
    assert len(res.rows) == round(0.1 * (ytr == BASE).sum())
    assert (ytr[res.rows] == BASE).all()
    delta = res.images.astype(np.int16) - xtr.astype(np.int16)
    assert np.abs(delta).max() <= eps
    assert np.abs(delta).max() > 0  # something was crafted
    assert max(r["linf"] for r in res.records) <= eps
    _check_records(res, xtr, ytr, ids)
    t = res.records[0]["transform"]
    assert t["method"] == "feature_collision" and t["eps"] == eps and t["opacity"] == 0.5
    assert t["target_sha256"] == sample_hash(xte[tidx[0]])


def test_feature_collision_lowers_feature_distance(setup):
    model, xtr, ytr, ids, xte, _yte, tidx = setup
    target = xte[tidx[0]]
    res = cl.feature_collision(model, xtr, ytr, ids, target, BASE, rate=0.1, eps=48.0, steps=30, opacity=0.0)
    f_t = penultimate_features(model, target[None], device="cpu")[0]
    d_before = ((penultimate_features(model, xtr[res.rows], device="cpu") - f_t) ** 2).sum(1)
    d_after = ((penultimate_features(model, res.images[res.rows], device="cpu") - f_t) ** 2).sum(1)
    # every poison moves toward the target, and on average by a clear margin (30 steps at ε=48
    # close well over half the gap on this model; 0.8 leaves room for other torch builds)
    assert (d_after < d_before).all()
    assert d_after.mean() < 0.8 * d_before.mean()
    assert res.info["feature_dist_after"] < res.info["feature_dist_before"]


def test_feature_collision_ensemble_and_selection(setup):
    model, xtr, ytr, ids, xte, _yte, tidx = setup
    near = cl.feature_collision(model, xtr, ytr, ids, xte[tidx[0]], BASE, rate=0.1, eps=8.0, steps=0)
    rand = cl.feature_collision(model, xtr, ytr, ids, xte[tidx[0]], BASE, rate=0.1, eps=8.0, steps=0,
                                base_selection="random", seed=3)
    # nearest-feature bases start closer to the target than a random draw of the same size
    assert near.info["feature_dist_before"] < rand.info["feature_dist_before"]
    ens = cl.feature_collision([model, model], xtr, ytr, ids, xte[tidx[0]], BASE, rate=0.1, eps=8.0, steps=5)
    one = cl.feature_collision(model, xtr, ytr, ids, xte[tidx[0]], BASE, rate=0.1, eps=8.0, steps=5)
    np.testing.assert_array_equal(ens.images, one.images)  # a 2x ensemble of one model = that model
    assert ens.info["n_models"] == 2
    lc_one = cl.label_consistent(model, xtr, ytr, ids, TARGET, TRIGGER, rate=0.1, eps=8.0, steps=3)
    lc_ens = cl.label_consistent([model, model], xtr, ytr, ids, TARGET, TRIGGER, rate=0.1, eps=8.0, steps=3)
    np.testing.assert_array_equal(lc_ens.images, lc_one.images)
    with pytest.raises(cl.CleanLabelError, match="ensemble"):
        cl.feature_collision([], xtr, ytr, ids, xte[tidx[0]], BASE)


def test_label_consistent_stays_in_eps_and_raises_loss(setup):
    model, xtr, ytr, ids, *_ = setup
    eps = 32.0
    res = cl.label_consistent(model, xtr, ytr, ids, TARGET, TRIGGER, rate=0.3, eps=eps, steps=10, seed=0)
    plain = cl.label_consistent(model, xtr, ytr, ids, TARGET, TRIGGER, rate=0.3, eps=0.0, seed=0)
    np.testing.assert_array_equal(res.labels, ytr)
    np.testing.assert_array_equal(res.rows, plain.rows)
    assert (ytr[res.rows] == TARGET).all()
    assert len(res.rows) == round(0.3 * (ytr == TARGET).sum())
    # the trigger's pixels carry the trigger; every other pixel stays within ε
    mask = np.zeros(xtr.shape[1:], bool)
    mask[-3:, -3:, :] = True
    np.testing.assert_array_equal(res.images[res.rows][:, mask], 255)
    delta = res.images.astype(np.int16) - xtr.astype(np.int16)
    assert np.abs(delta[:, ~mask]).max() <= eps
    assert all(r["adv_linf"] <= eps for r in res.records)
    np.testing.assert_array_equal(plain.images[plain.rows], apply_trigger(xtr[plain.rows], TRIGGER))
    _check_records(res, xtr, ytr, ids)
    # the PGD part makes the rows hard for the clean model: higher loss than trigger-only rows
    loss = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        def ce(images):
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
            return float(loss(model(x), torch.as_tensor(ytr[res.rows])))
        assert ce(res.images[res.rows]) > ce(plain.images[plain.rows]) + 0.5
    assert res.info["loss_after"] > res.info["loss_before"]


def test_deterministic_for_a_seed(setup):
    model, xtr, ytr, ids, xte, _yte, tidx = setup
    a = cl.label_consistent(model, xtr, ytr, ids, TARGET, TRIGGER, rate=0.2, eps=16.0, steps=5, seed=7)
    b = cl.label_consistent(model, xtr, ytr, ids, TARGET, TRIGGER, rate=0.2, eps=16.0, steps=5, seed=7)
    c = cl.label_consistent(model, xtr, ytr, ids, TARGET, TRIGGER, rate=0.2, eps=16.0, steps=5, seed=8)
    np.testing.assert_array_equal(a.images, b.images)
    assert [r["sha256_after"] for r in a.records] == [r["sha256_after"] for r in b.records]
    assert not np.array_equal(a.images, c.images)  # the seed draws the rows and the random start
    f1 = cl.feature_collision(model, xtr, ytr, ids, xte[tidx[1]], BASE, rate=0.1, eps=16.0, steps=10, base_selection="random", seed=2)
    f2 = cl.feature_collision(model, xtr, ytr, ids, xte[tidx[1]], BASE, rate=0.1, eps=16.0, steps=10, base_selection="random", seed=2)
    np.testing.assert_array_equal(f1.images, f2.images)
    np.testing.assert_array_equal(f1.perturbations, f2.perturbations)


def test_success_helper_and_targets(setup):
    model, xtr, ytr, ids, xte, yte, tidx = setup
    assert (yte[tidx] == SOURCE).all()
    pred = model(torch.from_numpy(xte[tidx]).permute(0, 3, 1, 2).float()).argmax(1).numpy()
    np.testing.assert_array_equal(pred, SOURCE)
    seen = []

    def same_model(images, labels, seed):  # a "victim" that is the clean model: no attack can succeed
        seen.append((len(images), seed))
        return model

    out = cl.feature_collision_success(model, xtr, ytr, ids, xte[tidx], BASE, same_model, seed=10,
                                       test_images=xte, test_labels=yte, rate=0.05, eps=8.0, steps=2)
    assert out["n_targets"] == 2 and out["successes"] == 0 and out["success_rate"] == 0.0
    assert seen == [(len(xtr), 10), (len(xtr), 11)]
    assert all(p["prediction"] == SOURCE and p["victim_accuracy"] > 0.5 for p in out["per_target"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": -1.0}, "eps must be in"),
        ({"eps": 300.0}, "eps must be in"),
        ({"rate": 0.0}, "rate must be in"),
        ({"rate": 1.5}, "rate must be in"),
        ({"steps": -2}, "steps must be"),
    ],
)
def test_bad_numbers_are_refused(setup, kwargs, match):
    model, xtr, ytr, ids, xte, _yte, tidx = setup
    with pytest.raises(cl.CleanLabelError, match=match):
        cl.feature_collision(model, xtr, ytr, ids, xte[tidx[0]], BASE, **kwargs)
    with pytest.raises(cl.CleanLabelError, match=match):
        cl.label_consistent(model, xtr, ytr, ids, TARGET, TRIGGER, **kwargs)


def test_bad_inputs_are_refused(setup):
    model, xtr, ytr, ids, xte, _yte, tidx = setup
    t = xte[tidx[0]]
    with pytest.raises(cl.CleanLabelError, match="uint8"):
        cl.feature_collision(model, xtr.astype(np.float32), ytr, ids, t, BASE)
    with pytest.raises(cl.CleanLabelError, match="differ in length"):
        cl.label_consistent(model, xtr, ytr[:-1], ids, TARGET, TRIGGER)
    with pytest.raises(cl.CleanLabelError, match="target_image"):
        cl.feature_collision(model, xtr, ytr, ids, xte[:2], BASE)
    with pytest.raises(cl.CleanLabelError, match="base_class"):
        cl.feature_collision(model, xtr, ytr, ids, t, 10)
    with pytest.raises(cl.CleanLabelError, match="class index"):
        cl.label_consistent(model, xtr, ytr, ids, "8", TRIGGER)
    with pytest.raises(cl.CleanLabelError, match="opacity"):
        cl.feature_collision(model, xtr, ytr, ids, t, BASE, opacity=1.5)
    with pytest.raises(cl.CleanLabelError, match="base_selection"):
        cl.feature_collision(model, xtr, ytr, ids, t, BASE, base_selection="farthest")
    with pytest.raises(cl.CleanLabelError, match="larger than"):
        cl.label_consistent(model, xtr, ytr, ids, TARGET, {**TRIGGER, "size": 9})
    with pytest.raises(cl.CleanLabelError, match="no training row"):
        cl.label_consistent(model, xtr[ytr != TARGET], ytr[ytr != TARGET], ids[: int((ytr != TARGET).sum())], TARGET, TRIGGER)
    with pytest.raises(cl.CleanLabelError, match="outside 0..255"):
        cl.apply_perturbations(xtr, np.array([0]), np.full((1,) + xtr.shape[1:], 300, np.int16))
    assert issubclass(cl.CleanLabelError, ValueError)
