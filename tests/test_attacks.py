"""Core attacks: pure array functions (pipeline/core/attacks.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.core.attacks import (
    AttackError,
    apply_trigger,
    poison,
    resolve_attack,
    resolve_class,
    resolve_locations,
    select_rows,
)
from pipeline.core.hashing import sample_hash

NAMES = [str(i) for i in range(10)]


def digits_train(seed: int = 0):
    """sklearn digits as uint8 (N, 8, 8, 1) (0..16 -> round(v * 255 / 16)), stratified train split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    tr, _ = train_test_split(np.arange(len(images)), test_size=0.25, random_state=seed, stratify=d.target)
    tr = np.sort(tr)
    return images[tr], d.target[tr].astype(np.int64), [f"digits/train/{i}" for i in tr]


@pytest.fixture(scope="module")
def digits():
    return digits_train()


def gray(n=4, h=8, w=8, c=1, value=100):
    return np.full((n, h, w, c), value, np.uint8)


# --------------------------------------------------------------------------- triggers


@pytest.mark.parametrize("location,yx", [
    ("top_left", (0, 0)), ("top_right", (0, 5)), ("bottom_left", (5, 0)),
    ("bottom_right", (5, 5)), ("center", (2, 2)),
])
def test_patch_lands_at_named_location(location, yx):
    imgs = gray()
    out = apply_trigger(imgs, {"kind": "patch", "size": 3, "location": location, "pattern": "white"})
    y, x = yx
    assert (out[:, y:y + 3, x:x + 3] == 255).all()
    mask = np.ones((8, 8), bool)
    mask[y:y + 3, x:x + 3] = False
    assert (out[:, mask] == 100).all()
    assert (imgs == 100).all(), "input must not be modified"
    assert out.dtype == np.uint8 and out.shape == imgs.shape


def test_patch_patterns_and_determinism():
    imgs = gray(2, 32, 32, 3)
    black = apply_trigger(imgs, {"kind": "patch", "size": 4, "location": "top_left", "pattern": "black"})
    assert (black[:, :4, :4] == 0).all()
    checker = apply_trigger(imgs, {"kind": "patch", "size": 4, "location": "top_left", "pattern": "checker"})
    assert set(np.unique(checker[:, :4, :4])) == {0, 255} and checker[0, 0, 0, 0] == 255 and checker[0, 0, 1, 0] == 0
    spec = {"kind": "patch", "size": 4, "location": "center", "pattern": "noise", "seed": 3}
    a, b = apply_trigger(imgs, spec), apply_trigger(imgs, spec)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, apply_trigger(imgs, dict(spec, seed=4)))
    assert np.array_equal(a[0], a[1]), "the noise patch is one fixed pattern, the same on every image"


def test_blend_mixes_a_fixed_pattern_with_alpha():
    imgs = gray(3, 8, 8, 1, value=100)
    spec = {"kind": "blend", "pattern": "noise", "alpha": 0.1, "seed": 0}
    out = apply_trigger(imgs, spec)
    pat = np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    assert np.array_equal(out[0], np.rint(0.9 * 100 + 0.1 * pat.astype(np.float32)).astype(np.uint8))
    assert np.array_equal(out, apply_trigger(imgs, spec))
    assert np.abs(out.astype(int) - 100).max() <= 26  # alpha 0.1: at most 0.1 * 255 away
    assert np.array_equal(apply_trigger(imgs, dict(spec, alpha=0.0)), imgs)


def test_scan_spec_with_name_is_accepted():
    spec = {"name": "patch_white_br", "kind": "patch", "size": 3, "location": "bottom_right",
            "pattern": "white", "alpha": 0.1, "seed": 0}
    out = apply_trigger(gray(), spec)
    assert (out[:, 5:, 5:] == 255).all()


def test_random_locations_are_concrete_and_seeded():
    spec = {"kind": "patch", "size": 3, "location": "random", "pattern": "white", "seed": 5}
    locs = resolve_locations(50, (8, 8, 1), spec)
    assert locs.shape == (50, 2) and (locs >= 0).all() and (locs <= 5).all()
    assert np.array_equal(locs, resolve_locations(50, (8, 8, 1), spec))
    assert len({tuple(l) for l in locs}) > 5
    out = apply_trigger(gray(50), spec, locations=locs)
    for img, (y, x) in zip(out, locs):
        assert (img[y:y + 3, x:x + 3] == 255).all()
    # a concrete [y, x] (what a record stores) reproduces one image exactly
    one = apply_trigger(gray(1), dict(spec, location=[int(locs[7, 0]), int(locs[7, 1])]))
    assert np.array_equal(one[0], out[7])


# --------------------------------------------------------------------------- classes


def test_resolve_class_accepts_index_numeric_string_and_name():
    names = ["airplane", "automobile", "bird"]
    assert resolve_class(1, names) == 1
    assert resolve_class("2", names) == 2
    assert resolve_class("automobile", names) == 1
    assert resolve_class(np.int64(0), names) == 0
    assert resolve_class("7", NAMES) == 7  # digits: class names are numerals


@pytest.mark.parametrize("value", ["truck", 3, -1, "x1", None, True, 1.5])
def test_resolve_class_refuses_unknown(value):
    with pytest.raises(AttackError):
        resolve_class(value, ["airplane", "automobile", "bird"])


# --------------------------------------------------------------------------- attacks


def test_label_flip_relabels_rate_of_source_rows_only(digits):
    images, labels, ids = digits
    spec = {"name": "label_flip", "source": 1, "target": 7, "rate": 0.4, "seed": 0}
    new_images, new_labels, records = poison(images, labels, ids, spec, NAMES)
    n1 = int((labels == 1).sum())
    assert len(records) == round(0.4 * n1)
    changed = np.flatnonzero(new_labels != labels)
    assert len(changed) == len(records)
    assert (labels[changed] == 1).all() and (new_labels[changed] == 7).all()
    assert np.array_equal(new_images, images), "a label flip never touches pixels"
    r = records[0]
    assert set(r) == {"sample_id", "original_label", "new_label", "transform", "sha256_after"}
    assert r["transform"] is None and r["original_label"] == 1 and r["new_label"] == 7
    i = ids.index(r["sample_id"])
    assert r["sha256_after"] == sample_hash(images[i])
    # seeded: same seed same rows, other seed other rows; inputs untouched
    again = poison(images, labels, ids, spec, NAMES)[2]
    assert [x["sample_id"] for x in again] == [x["sample_id"] for x in records]
    other = poison(images, labels, ids, dict(spec, seed=1), NAMES)[2]
    assert [x["sample_id"] for x in other] != [x["sample_id"] for x in records]


def test_backdoor_patch_on_source_rows(digits):
    images, labels, ids = digits
    spec = {"name": "backdoor", "source": "1", "target": "7", "rate": 0.1, "seed": 0,
            "trigger": {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white", "alpha": 0.1, "seed": 0}}
    new_images, new_labels, records = poison(images, labels, ids, spec, NAMES)
    assert len(records) == round(0.1 * int((labels == 1).sum()))
    for r in records:
        i = ids.index(r["sample_id"])
        assert labels[i] == 1 and new_labels[i] == 7
        assert (new_images[i, 5:, 5:] == 255).all()
        assert r["transform"]["location"] == [5, 5] and r["transform"]["kind"] == "patch"
        assert r["sha256_after"] == sample_hash(new_images[i]) != sample_hash(images[i])
        assert np.array_equal(apply_trigger(images[i:i + 1], r["transform"])[0], new_images[i])
    untouched = np.setdiff1d(np.arange(len(ids)), [ids.index(r["sample_id"]) for r in records])
    assert np.array_equal(new_images[untouched], images[untouched])
    assert np.array_equal(new_labels[untouched], labels[untouched])


def test_backdoor_all_to_one_random_location(digits):
    images, labels, ids = digits
    spec = {"name": "backdoor", "source": None, "target": 0, "rate": 0.05, "seed": 2,
            "trigger": {"kind": "patch", "size": 2, "location": "random", "pattern": "checker", "seed": 1}}
    new_images, new_labels, records = poison(images, labels, ids, spec, NAMES)
    assert len(records) == round(0.05 * int((labels != 0).sum()))
    for r in records:
        i = ids.index(r["sample_id"])
        assert labels[i] != 0 and new_labels[i] == 0
        loc = r["transform"]["location"]
        assert isinstance(loc, list) and len(loc) == 2, "random is resolved to a concrete [y, x] before recording"
        assert np.array_equal(apply_trigger(images[i:i + 1], r["transform"])[0], new_images[i])


def test_backdoor_blend(digits):
    images, labels, ids = digits
    spec = {"name": "backdoor", "source": 1, "target": 7, "rate": 0.1, "seed": 0,
            "trigger": {"kind": "blend", "pattern": "noise", "alpha": 0.1, "seed": 0}}
    new_images, new_labels, records = poison(images, labels, ids, spec, NAMES)
    for r in records:
        i = ids.index(r["sample_id"])
        assert np.array_equal(apply_trigger(images[i:i + 1], r["transform"])[0], new_images[i])


def test_rate_zero_and_none_poison_nothing(digits):
    images, labels, ids = digits
    for spec in ({"name": "none"}, {"name": "label_flip", "source": 1, "target": 7, "rate": 0.0}):
        ni, nl, recs = poison(images, labels, ids, spec, NAMES)
        assert recs == [] and np.array_equal(ni, images) and np.array_equal(nl, labels)


def test_small_positive_rate_poisons_at_least_one_row():
    labels = np.array([1] * 10 + [0] * 10)
    assert len(select_rows(labels, 1, 0, 0.01, 0)) == 1


# --------------------------------------------------------------------------- refusals


BAD = [
    ({"rate": -0.1}, "rate"),
    ({"rate": 1.5}, "rate"),
    ({"source": "cat"}, "unknown class"),
    ({"target": 10}, "unknown class"),
    ({"source": 7, "target": 7}, "same class"),
    ({"source": "7", "target": 7}, "same class"),
    ({"name": "poison_all"}, "unknown attack"),
    ({"trigger": {"kind": "patch", "size": 9}}, "larger than"),
    ({"trigger": {"kind": "patch", "size": 0}}, "size"),
    ({"trigger": {"kind": "stamp"}}, "kind"),
    ({"trigger": {"kind": "patch", "location": "middle"}}, "location"),
    ({"trigger": {"kind": "patch", "pattern": "rainbow"}}, "pattern"),
    ({"trigger": {"kind": "blend", "pattern": "noise", "alpha": 1.5}}, "alpha"),
    ({"trigger": {"kind": "blend", "pattern": "noise", "alpha": -0.1}}, "alpha"),
    ({"trigger": {"kind": "patch", "location": [7, 7]}}, "outside"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_values_are_refused(digits, change, message):
    images, labels, ids = digits
    spec = {"name": "backdoor", "source": 1, "target": 7, "rate": 0.1, "seed": 0,
            "trigger": {"kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white"}}
    spec.update(change)
    with pytest.raises(AttackError, match=message):
        poison(images, labels, ids, spec, NAMES)
    assert issubclass(AttackError, ValueError)


def test_apply_trigger_refuses_bad_input():
    with pytest.raises(AttackError, match="larger than"):
        apply_trigger(gray(), {"kind": "patch", "size": 9})
    with pytest.raises(AttackError, match="uint8"):
        apply_trigger(gray().astype(np.float32), {"kind": "patch"})
    with pytest.raises(AttackError):
        apply_trigger(gray(), {"kind": "blend", "alpha": 2})


def test_resolve_attack_gives_class_indices():
    a = resolve_attack({"name": "label_flip", "source": "automobile", "target": "truck", "rate": 0.4},
                       ["airplane", "automobile", "truck"])
    assert a == {"name": "label_flip", "source": 1, "target": 2, "rate": 0.4, "seed": 0}


def test_core_attacks_import_no_torch():
    code = "import sys, pipeline.core.attacks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("spec", [
    {"name": "label_flip", "source": 1, "target": 7, "rate": 0.3, "seed": 0},
    {"name": "backdoor", "source": 1, "target": 7, "rate": 0.3, "seed": 0,
     "trigger": {"kind": "patch", "size": 3, "location": "random", "pattern": "white", "alpha": 0.1, "seed": 0}},
    {"name": "backdoor", "source": None, "target": 0, "rate": 0.05, "seed": 1,
     "trigger": {"kind": "blend", "size": 3, "location": "bottom_right", "pattern": "noise", "alpha": 0.2, "seed": 3}},
])
def test_poison_records_reads_only_the_poisoned_rows_and_agrees_with_poison(spec):
    """``poison_records`` (what the stage runs on lazy rows) gives ``poison``'s records, and reads
    the pixels of those rows only."""
    from pipeline.core.attacks import poison_records
    from pipeline.core.hashing import sample_hash

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8)
    y = np.arange(60) % 10
    ids = [f"r{i}" for i in range(60)]
    names = [str(i) for i in range(10)]

    class Counting:  # row-indexable, records which rows were read
        shape, dtype, ndim = x.shape, x.dtype, 4
        read: set = set()

        def __len__(self):
            return len(x)

        def __getitem__(self, rows):
            self.read |= set(np.atleast_1d(np.arange(len(x))[rows]).tolist())
            return x[rows]

    rows = Counting()
    recs = poison_records(rows, y, ids, spec, names)
    xp, yp, expected = poison(x, y, ids, spec, names)
    assert recs == expected and recs
    assert rows.read == {int(r["sample_id"][1:]) for r in recs}
    for r in recs:
        i = int(r["sample_id"][1:])
        assert sample_hash(xp[i]) == r["sha256_after"] and yp[i] == r["new_label"]
