"""attack=clean_label through the poison stage: the view keeps labels, stores each row's
perturbation (inside the view_id), is crafted against the digest-checked twin, and evaluate sees
label-consistent's trigger and feature collision's targets (digits, in-process, CPU)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import config, evaluate, poison, snapshot, twin
from pipeline.checkpoints import load
from pipeline.data import store, view
from pipeline.schema import AttackConfig, ConfigError, check


def write_params(path: Path, *overrides: str) -> Path:
    assert config.main(["compose", "-o", str(path), *overrides]) == 0
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A digits store and a short clean twin (5 epochs: crafting needs a model, not a champion)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cl")
    params = write_params(root / "params.yaml", "train.epochs=5", "train.device=cpu")
    st, ptr = root / "store", root / "snapshot.json"
    assert snapshot.main(["--params", str(params), "--store", str(st), "--pointer", str(ptr),
                          "--report", str(root / "snapshot_report.json")]) == 0
    assert twin.main(["--params", str(params), "--store", str(st), "--pointer", str(ptr),
                      "--checkpoint", str(root / "twin.safetensors"), "--report", str(root / "twin.json")]) == 0
    # the twin trains on exactly the train split (read with load_snapshot(split="train"))
    man = store.read_manifest(st, store.read_pointer(ptr)["snapshot_id"])
    assert json.loads((root / "twin.json").read_text())["train_rows"] == int((man["split"] == "train").sum()) < len(man)
    return {"root": root, "store": st, "pointer": ptr, "twin": root / "twin.safetensors",
            "twin_report": root / "twin.json"}


def run_poison(s, tmp_path: Path, *overrides: str, twin_report: Path | None = None) -> tuple[int, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = write_params(tmp_path / "params.yaml", "attack=clean_label", "attack.craft_model=twin",
                          "train.device=cpu", *overrides)
    out = tmp_path / "view"
    rc = poison.main(["--params", str(params), "--pointer", str(s["pointer"]), "--store", str(s["store"]),
                      "--twin", str(s["twin"]), "--twin-report", str(twin_report or s["twin_report"]),
                      "--out", str(out)])
    return rc, out


@pytest.fixture(scope="module")
def lc_view(setup, tmp_path_factory):
    rc, out = run_poison(setup, tmp_path_factory.mktemp("lc"), "attack.eps=64")
    assert rc == 0
    return out


def test_label_consistent_view_keeps_labels_and_stays_in_eps(setup, lc_view):
    meta, records = view.read_view(lc_view)
    a = meta["attack"]
    assert a["name"] == "clean_label" and a["method"] == "label_consistent" and a["target"] == 8
    twin_sha = json.loads(setup["twin_report"].read_text())["checkpoint_sha256"]
    assert a["craft_model"] == {"kind": "twin", "model_version": None, "checkpoint_sha256": twin_sha}
    snap = store.load_snapshot(setup["store"], meta["snapshot_id"])
    images, labels, ids = snap.split("train")
    assert meta["n_poisoned"] == round(0.5 * int((labels == 8).sum()))
    assert all(r["original_label"] == r["new_label"] == 8 for r in records)
    deltas = view.perturbations(records, images.shape[1:])
    index = {str(s): i for i, s in enumerate(ids)}
    rows = np.array([index[r["sample_id"]] for r in records])
    # outside the 3x3 bottom-right trigger every pixel moved by at most eps; the recorded norms match
    mask = np.ones(images.shape[1:], bool)
    mask[-3:, -3:] = False
    assert np.abs(deltas[:, mask]).max() <= 64 and np.abs(deltas[:, mask]).max() > 0
    assert all(r["transform"]["adv_linf"] <= 64 for r in records)
    assert np.allclose([r["transform"]["linf"] for r in records], np.abs(deltas).reshape(len(rows), -1).max(1))
    tv = view.load_training_view(lc_view, setup["store"])
    assert np.array_equal(tv.labels, labels)  # labels unchanged, every one
    assert np.array_equal(tv.images[rows].astype(np.int16) - images[rows].astype(np.int16), deltas)
    assert (tv.images[rows][:, -3:, -3:] == 255).all()  # they carry the trigger
    assert meta["crafting"]["loss_after"] > meta["crafting"]["loss_before"]


def _rewrite_delta(records_csv: Path, fn) -> None:
    rows = records_csv.read_text().splitlines()
    head, first = rows[0], rows[1]
    import csv, io

    rec = next(csv.reader(io.StringIO(first)))
    t = json.loads(rec[3])
    t = fn(t)
    rec[3] = view.canonical_json(t)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(rec)
    records_csv.write_text("\n".join([head, buf.getvalue().rstrip("\n"), *rows[2:]]) + "\n")


def _bump(t: dict) -> dict:
    d = np.frombuffer(base64.b64decode(t["delta"]), "<i2").copy()
    d[0] = 1 if d[0] <= 0 else d[0] - 1  # one pixel of the perturbation changed
    return {**t, "delta": base64.b64encode(d.tobytes()).decode()}


def test_edited_perturbation_is_refused(setup, lc_view, tmp_path):
    import shutil

    v = tmp_path / "view"
    shutil.copytree(lc_view, v)
    _rewrite_delta(v / "records.csv", _bump)
    with pytest.raises(store.IntegrityError, match="was edited"):
        view.read_view(v)
    # ... and with the view_id recomputed too (a careful forger), the row no longer hashes
    meta = json.loads((v / "view.json").read_text())
    meta["view_id"] = view.compute_view_id(meta["snapshot_id"], (v / "records.csv").read_bytes(), meta["attack"])
    (v / "view.json").write_text(json.dumps(meta))
    with pytest.raises(store.IntegrityError):
        view.load_training_view(v, setup["store"])


def test_view_records_round_trip(lc_view):
    data = (lc_view / "records.csv").read_bytes()
    assert view.records_csv(view.parse_records(data)) == data


def test_norm_edit_is_refused(setup, lc_view, tmp_path):
    import shutil

    v = tmp_path / "view"
    shutil.copytree(lc_view, v)
    _rewrite_delta(v / "records.csv", lambda t: {**t, "linf": 1.0})
    meta = json.loads((v / "view.json").read_text())
    meta["view_id"] = view.compute_view_id(meta["snapshot_id"], (v / "records.csv").read_bytes(), meta["attack"])
    (v / "view.json").write_text(json.dumps(meta))
    with pytest.raises(store.IntegrityError, match="L-inf"):
        view.load_training_view(v, setup["store"])


def test_swapped_twin_is_refused(setup, tmp_path):
    rep = json.loads(setup["twin_report"].read_text())
    bad = tmp_path / "twin.json"
    bad.write_text(json.dumps({**rep, "checkpoint_sha256": "0" * 64}))
    rc, out = run_poison(setup, tmp_path / "a", twin_report=bad)
    assert rc == 1 and not (out / "view.json").exists()
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({**rep, "snapshot_id": "f" * 64}))
    rc, _ = run_poison(setup, tmp_path / "b", twin_report=stale)
    assert rc == 2


def test_feature_collision_stage_and_targeted_success(setup, tmp_path):
    rc, out = run_poison(setup, tmp_path, "attack.method=feature_collision", "attack.source=4", "attack.target=9",
                         "attack.eps=32", "attack.rate=0.3", "attack.n_targets=3", "attack.steps=30")
    assert rc == 0
    meta, records = view.read_view(out)
    a = meta["attack"]
    assert a["method"] == "feature_collision" and len(a["targets"]) == 3
    snap = store.load_snapshot(setup["store"], meta["snapshot_id"])
    tr_img, tr_lab, _ = snap.split("train")
    per = round(0.3 * int((tr_lab == 9).sum()) / 3)
    assert meta["n_poisoned"] == 3 * per and len({r["sample_id"] for r in records}) == 3 * per  # disjoint sets
    assert all(r["original_label"] == r["new_label"] == 9 for r in records)
    assert all(r["transform"]["linf"] <= 32 for r in records)
    assert {r["transform"]["target_id"] for r in records} == {t["sample_id"] for t in a["targets"]}
    # crafting moved the poisons' features towards their targets
    assert meta["crafting"]["feature_dist_after"] < 0.9 * meta["crafting"]["feature_dist_before"]
    te_img, te_lab, te_ids = snap.split("test")
    assert all(te_lab[list(te_ids).index(t["sample_id"])] == 4 for t in a["targets"])
    model, _ = load(setup["twin"])
    t = evaluate.targeted_metrics(model, a, te_img, list(te_ids), device="cpu")["feature_collision"]
    # the twin was trained without the poison and classifies every target correctly (pick_targets)
    assert t == {"success_rate": 0.0, "successes": 0, "n_targets": 3, "base_class": 9}
    # a target that is no longer that test row: the view is stale
    moved = [{**a["targets"][0], "sha256": "0" * 64}, *a["targets"][1:]]
    with pytest.raises(evaluate.EvaluateError, match="re-run the poison stage"):
        evaluate.targeted_metrics(model, {**a, "targets": moved}, te_img, list(te_ids), device="cpu")


def test_scan_set_carries_label_consistent_trigger(lc_view):
    meta, _ = view.read_view(lc_view)
    specs = evaluate.scan_set([], meta["attack"])
    assert [s["name"] for s in specs] == ["attack"] and specs[0]["source"] is None
    assert specs[0]["size"] == 3 and specs[0]["location"] == "bottom_right"
    fc = {**meta["attack"], "method": "feature_collision"}
    assert evaluate.scan_set([], fc) == []


@pytest.mark.parametrize("overrides, match", [
    ({"method": "feature_collision", "source": None}, "attack.source"),
    ({"method": "label_consistent", "source": 1}, "attack.source"),
    ({"method": "poison_frogs"}, "attack.method"),
    ({"eps": 300.0}, "attack.eps"),
    ({"rate": 0.0}, "attack.rate"),
    ({"n_targets": 0}, "attack.n_targets"),
    ({"craft_model": "champion"}, "attack.craft_model"),
])
def test_bad_clean_label_config_is_refused(overrides, match):
    cfg = config.load(write_params_tmp())
    cfg.attack = AttackConfig(**{**vars(AttackConfig(name="clean_label", target=8, rate=0.5)), **overrides})
    with pytest.raises(ConfigError, match=match):
        check(cfg)


def write_params_tmp() -> Path:
    import tempfile

    p = Path(tempfile.mkdtemp()) / "params.yaml"
    return write_params(p, "attack=clean_label")


@pytest.mark.parametrize("overrides", [("attack.eps=64", "attack.steps=3"),
                                       ("attack.method=feature_collision", "attack.source=3", "attack.target=8",
                                        "attack.n_targets=2", "attack.steps=3")])
def test_crafting_reads_only_its_classes_and_equals_a_craft_over_whole_splits(setup, tmp_path, overrides):
    """Issue 19 item 3: the poison stage loads the snapshot lazily and clean_label reads only the
    train rows of the class it poisons (and feature collision the test rows of its targets'
    class); the records equal those of ``craft`` over the whole, eagerly loaded splits. A pack
    row changed behind the manifest is refused as it is read."""
    from pipeline.core.clean_label import craft, resolve_clean_label

    params = write_params(tmp_path / "params.yaml", "attack=clean_label", *overrides)
    cfg = config.load(str(params))
    model, crafted_by = load(setup["twin"])[0], {"kind": "twin", "model_version": None, "checkpoint_sha256": "x"}
    sid = store.read_pointer(setup["pointer"])["snapshot_id"]
    lazy = store.load_snapshot(setup["store"], sid, lazy=True, hash_packs=False)
    resolved, records, _ = poison.clean_label_view(lazy, as_spec(cfg), model, crafted_by)
    full = store.load_snapshot(setup["store"], sid)
    images, labels, ids = full.split("train")
    spec = resolve_clean_label(as_spec(cfg), full.class_names, images.shape[1:])
    t_img, t_lab, t_ids = full.split("test")
    result, targets = craft(model, images, labels, ids, spec, t_img, t_lab, t_ids)
    assert view.clean_label_records(result.records) == records and len(records) > 0
    assert [t["sample_id"] for t in targets] == [t["sample_id"] for t in resolved.get("targets", [])]

    man = lazy.manifest
    row = int(np.flatnonzero((man["split"] == "train").to_numpy() & (lazy.labels == resolved["target"]))[0])
    changed = lazy.images.with_rows({row: 255 - np.asarray(lazy.images[row])})
    with pytest.raises(store.IntegrityError, match=man["sample_id"].iloc[row]):
        poison.clean_label_view(store.Snapshot(lazy.id, man, changed, lazy.class_names, lazy.image_shape, lazy.meta),
                                as_spec(cfg), model, crafted_by)


def as_spec(cfg) -> dict:
    from pipeline.schema import as_dict

    return as_dict(cfg.attack)
