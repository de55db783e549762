"""The poison stage, the training view (pipeline/poison.py, pipeline/data/view.py), and the validate
stage's main end to end on a real digits store (one GX run per stage call)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import config, poison, snapshot, validate
from pipeline.data import store, view
from pipeline.core.attacks import apply_trigger
from pipeline.core.hashing import sample_hash


def write_params(path: Path, *overrides: str) -> Path:
    assert config.main(["compose", "-o", str(path), *overrides]) == 0
    return path


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    params = write_params(root / "params.yaml")
    st, ptr = root / "store", root / "snapshot.json"
    assert snapshot.main(["--params", str(params), "--store", str(st), "--pointer", str(ptr),
                          "--report", str(root / "snapshot_report.json")]) == 0
    return {"root": root, "store": st, "pointer": ptr}


def run_poison(ds, tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = write_params(tmp_path / "params.yaml", *overrides)
    out = tmp_path / "view"
    rc = poison.main(["--params", str(params), "--pointer", str(ds["pointer"]), "--store", str(ds["store"]),
                      "--out", str(out)])
    return rc, out, params


def store_digest(st: Path) -> dict:
    return {str(p.relative_to(st)): p.read_bytes() for p in sorted(st.rglob("*")) if p.is_file()}


def test_identity_view_is_a_record_not_a_copy(digits_store, tmp_path):
    before = store_digest(digits_store["store"])
    rc, out, _ = run_poison(digits_store, tmp_path, "attack=none")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["records.csv", "view.json"]
    assert (out / "records.csv").read_text() == ",".join(view.RECORD_COLUMNS) + "\n"
    meta = json.loads((out / "view.json").read_text())
    assert meta["n_poisoned"] == 0 and meta["attack"] == {"name": "none"}
    assert meta["snapshot_id"] == store.read_pointer(digits_store["pointer"])["snapshot_id"]
    tv = view.load_training_view(out, digits_store["store"])
    snap = store.load_snapshot(digits_store["store"], meta["snapshot_id"])
    imgs, labels, ids = snap.split("train")
    assert np.array_equal(tv.images, imgs) and np.array_equal(tv.labels, labels) and tv.sample_ids == ids
    assert store_digest(digits_store["store"]) == before, "the raw store is never modified"


def test_own_process_maps_the_load_then_relaxes(digits_store, tmp_path, monkeypatch):
    # data.heap_map_mib covers the manifest load (where poison peaks); clean_label's crafting after
    # it gets glibc's large threshold back (stage.relax_heap). In-process, nothing is touched.
    from pipeline import stage
    from pipeline.core import heap

    calls: list = []
    monkeypatch.setattr(heap, "map_large", lambda n, trim=None: calls.append(("map", n, trim)) or True)
    monkeypatch.setattr(stage, "_HEAP_MAPPED", False)
    monkeypatch.setattr(stage.gc, "freeze", lambda: None)  # "own process" would freeze pytest's objects
    real = store.load_snapshot
    monkeypatch.setattr(store, "load_snapshot", lambda *a, **k: calls.append("load") or real(*a, **k))
    attack = ("attack=label_flip", "attack.rate=0.2")
    rc, out, _ = run_poison(digits_store, tmp_path / "in_process", *attack)
    assert rc == 0 and calls == ["load"], calls
    calls.clear()
    monkeypatch.setattr(stage, "_own_process", lambda s: s == "poison")
    rc, out2, _ = run_poison(digits_store, tmp_path / "own", *attack)
    relaxed = ("map", heap.MAP_LARGE_MAX_BYTES, 2 * heap.MAP_LARGE_MAX_BYTES)
    assert rc == 0 and calls == [("map", 1 << 20, 2 << 20), "load", relaxed], calls
    assert (out2 / "view.json").read_bytes() == (out / "view.json").read_bytes()
    calls.clear()
    rc, _, _ = run_poison(digits_store, tmp_path / "none", "attack=none")  # no load: nothing to relax
    assert rc == 0 and calls == [("map", 1 << 20, 2 << 20)], calls


def test_identity_view_loads_no_row_and_equals_the_loaded_one(digits_store, tmp_path, monkeypatch, capsys):
    """Issue 19 item 3: with no attack and no quarantine the view needs the snapshot's header
    only; the store's files are still hashed, so a damaged store fails as a load would."""
    import shutil

    from pipeline.schema import AttackConfig

    sid = store.read_pointer(digits_store["pointer"])["snapshot_id"]
    loaded = poison.make_view(store.load_snapshot(digits_store["store"], sid), AttackConfig())
    with monkeypatch.context() as m:
        def boom(*a, **k):
            raise AssertionError("the identity view loaded the manifest")

        for name in ("load_snapshot", "load_manifest"):
            m.setattr(store, name, boom)
        rc, out, _ = run_poison(digits_store, tmp_path / "fast", "attack=none")
    assert rc == 0
    assert json.loads((out / "view.json").read_text()) == loaded[0]
    assert (out / "records.csv").read_bytes() == loaded[1]
    # pinned to the view_id's definition, not to make_view (which takes the same path)
    header_only = (",".join(view.RECORD_COLUMNS) + "\n").encode()
    assert loaded[1] == header_only and loaded[0]["view_id"] == view.compute_view_id(sid, header_only, {"name": "none"})
    copy = tmp_path / "store"
    shutil.copytree(digits_store["store"], copy)
    ds = {**digits_store, "store": copy}
    delta = copy / "deltas" / f"{store.read_meta(copy, sid)['delta']['sha256']}.parquet"
    delta.chmod(0o644)
    delta.write_bytes(delta.read_bytes()[:-1])
    capsys.readouterr()
    rc, out, _ = run_poison(ds, tmp_path / "damaged", "attack=none")
    assert rc == 1 and "does not match its sha256" in capsys.readouterr().err
    assert not (out / "view.json").exists()
    shutil.rmtree(copy)
    shutil.copytree(digits_store["store"], copy)
    next((copy / "packs").iterdir()).unlink()
    rc, out, _ = run_poison(ds, tmp_path / "no_pack", "attack=none")
    assert rc == 1 and "is missing" in capsys.readouterr().err


def test_backdoor_view_round_trip(digits_store, tmp_path):
    before = store_digest(digits_store["store"])
    rc, out, _ = run_poison(digits_store, tmp_path, "attack=backdoor", "attack.rate=0.1", "attack.trigger.location=random")
    assert rc == 0
    meta = json.loads((out / "view.json").read_text())
    assert meta["attack"]["source"] == 1 and meta["attack"]["target"] == 7 and meta["n_poisoned"] > 0
    lines = (out / "records.csv").read_text().splitlines()
    assert lines[0] == "sample_id,original_label,new_label,transform,sha256_after"
    assert len(lines) == meta["n_poisoned"] + 1
    tv = view.load_training_view(out, digits_store["store"])
    assert len(tv.poisoned_rows) == meta["n_poisoned"]
    for r in tv.records:
        assert r["transform"]["location"] != "random"
        i = tv.sample_ids.index(r["sample_id"])
        assert tv.labels[i] == 7 and sample_hash(tv.images[i]) == r["sha256_after"]
    assert store_digest(digits_store["store"]) == before
    # the same config gives the same view id (seeded); another seed another view
    rc, out2, _ = run_poison(digits_store, tmp_path / "again", "attack=backdoor", "attack.rate=0.1",
                             "attack.trigger.location=random")
    assert json.loads((out2 / "view.json").read_text())["view_id"] == meta["view_id"]


def test_label_flip_view_and_tampering_is_detected(digits_store, tmp_path):
    rc, out, _ = run_poison(digits_store, tmp_path, "attack=label_flip", "attack.target=7", "attack.rate=0.4")
    assert rc == 0
    tv = view.load_training_view(out, digits_store["store"])
    assert all(r["transform"] is None for r in tv.records)
    # edit a record: the view id no longer matches
    rec = out / "records.csv"
    text = rec.read_text().splitlines()
    parts = text[1].split(",")
    parts[2] = "3"
    rec.write_text("\n".join([text[0], ",".join(parts), *text[2:]]) + "\n")
    with pytest.raises(store.IntegrityError, match="view_id"):
        view.load_training_view(out, digits_store["store"])


def test_apply_records_checks_sha256_after():
    imgs = np.zeros((3, 8, 8, 1), np.uint8)
    t = {"kind": "patch", "size": 3, "location": [5, 5], "pattern": "white", "alpha": 0.1, "seed": 0}
    good = sample_hash(apply_trigger(imgs[:1], t)[0])
    recs = [{"sample_id": "b", "original_label": 1, "new_label": 7, "transform": t, "sha256_after": good}]
    out, labels, rows = view.apply_records(imgs, np.array([0, 1, 2]), ["a", "b", "c"], recs)
    assert rows == [1] and labels.tolist() == [0, 7, 2] and (out[1, 5:, 5:] == 255).all()
    with pytest.raises(store.IntegrityError, match="sha256_after"):
        view.apply_records(imgs, np.array([0, 1, 2]), ["a", "b", "c"], [dict(recs[0], sha256_after="0" * 64)])
    with pytest.raises(store.IntegrityError, match="original label"):
        view.apply_records(imgs, np.array([0, 2, 2]), ["a", "b", "c"], recs)
    # records round-trip through CSV bytes
    assert view.parse_records(view.records_csv(recs)) == recs
    # the ids may come as a pandas (Arrow-backed) column: records are found by Arrow, not a dict of every row
    out2, labels2, rows2 = view.apply_records(imgs, np.array([0, 1, 2]), pd.Series(["a", "b", "c"]), recs)
    assert rows2 == rows and labels2.tolist() == labels.tolist() and (out2 == out).all()


def test_row_positions_finds_the_wanted_ids_in_any_column_kind():
    """``row_positions`` takes lists, arrays, pandas columns of several Arrow chunks (a manifest
    loaded from several deltas) and ids that are not strings (matched by their ``str``), as the
    dict of every row it replaced did."""
    import pyarrow as pa

    want = ["d", "a", "zz", "a"]
    expect = {"a": 0, "d": 3}
    chunked = pd.concat([pd.Series(["a", "b"]), pd.Series(["c", "d"])], ignore_index=True)
    assert chunked.array._pa_array.num_chunks == 2  # the case take_strings exists for
    for ids in (["a", "b", "c", "d"], np.array(["a", "b", "c", "d"], object), chunked,
                pa.chunked_array([["a", "b"], ["c", "d"]])):
        assert view.row_positions(ids, want) == expect, type(ids)
    assert view.row_positions([10, 11, 12], [12]) == {"12": 2}  # an int id is found by its str
    assert view.row_positions(pd.Series([10, 11, 12]), ["11"]) == {"11": 1}  # an int column too
    assert view.row_positions(["a", 2, None, 1.0], ["2", "None", "1.0"]) == {"2": 1, "None": 2, "1.0": 3}  # str() each
    assert view.row_positions(["a", "b", "a"], ["a"]) == {"a": 2}  # twice: the last row, as the dict gave
    assert view.row_positions(["a"], []) == {} and view.row_positions([], ["a"]) == {}


@pytest.mark.parametrize("override,message", [
    ("attack.rate=1.5", "rate"),
    ("attack.target=1", "same class"),
    ("attack.source=cat", "unknown class"),
    ("attack.trigger.size=9", "larger than"),
])
def test_poison_stage_refuses_bad_values(digits_store, tmp_path, capsys, override, message):
    rc, out, _ = run_poison(digits_store, tmp_path, "attack=backdoor", override)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not (out / "view.json").exists()


def run_validate(ds, tmp_path, view_dir, params, approved):
    args = ["--params", str(params), "--pointer", str(ds["pointer"]), "--store", str(ds["store"]),
            "--view", str(view_dir), "--approved", str(approved), "--report", str(tmp_path / "validation.json"),
            "--docs", str(tmp_path / "gx"), "--validated", str(tmp_path / "validated.json")]
    return validate.main(args)


def test_validate_stage_end_to_end(digits_store, tmp_path, capsys):
    """Real GX through the stage main: clean passes and is approved; a patched view then fails
    against the approved reference (stop: exit 1; warn: exit 0, success false)."""
    approved = tmp_path / "approved"
    rc, clean_view, params = run_poison(digits_store, tmp_path / "clean", "attack=none")
    assert run_validate(digits_store, tmp_path, clean_view, params, approved) == 0
    rep = json.loads((tmp_path / "validation.json").read_text())
    assert rep["success"] and rep["reference"]["kind"] == "source"
    assert {"success", "snapshot_id", "view_id", "reference", "results", "statistics"} <= set(rep)
    assert (tmp_path / "gx" / "index.html").is_file()
    vj = json.loads((tmp_path / "validated.json").read_text())
    assert vj == {"snapshot_id": rep["snapshot_id"], "view_id": rep["view_id"], "success": True, "on_fail": "stop"}
    ledger = validate.read_ledger(approved)
    assert [e["view_id"] for e in ledger] == [rep["view_id"]]
    # re-validating the same view does not add a second ledger line
    assert run_validate(digits_store, tmp_path, clean_view, params, approved) == 0
    assert len(validate.read_ledger(approved)) == 1

    rc, bad_view, params = run_poison(digits_store, tmp_path / "bad", "attack=backdoor", "attack.rate=0.1")
    assert run_validate(digits_store, tmp_path, bad_view, params, approved) == 1
    rep = json.loads((tmp_path / "validation.json").read_text())
    assert not rep["success"] and rep["reference"]["kind"] == "approved"
    assert "block_rate" in {r["check"] for r in rep["results"] if not r["success"]}  # was block_rate_increase (issue 11: renamed test)
    assert json.loads((tmp_path / "validated.json").read_text())["success"] is False
    assert len(validate.read_ledger(approved)) == 1, "a failed view is never approved"

    warn = write_params(tmp_path / "warn.yaml", "attack=backdoor", "attack.rate=0.1", "validate.on_fail=warn")
    assert run_validate(digits_store, tmp_path, bad_view, warn, approved) == 0
    vj = json.loads((tmp_path / "validated.json").read_text())
    assert vj["success"] is False and vj["on_fail"] == "warn"
    assert len(validate.read_ledger(approved)) == 1


def test_the_data_gate_reads_the_columns_stored_at_ingest_not_the_pixels(digits_store, tmp_path):
    """Issue 19 item 2: the snapshot stage stores each new row's data-gate columns (perceptual hash,
    block scan) bound by its header; the data gate measures from them and reads pixels only for
    rows a record rebuilt, with results identical to measuring every row from its pixels."""
    import dataclasses
    import shutil

    from pipeline.data import stats

    v = config.load(write_params(tmp_path / "p.yaml")).validate
    st = digits_store["store"]
    sid = json.loads(digits_store["pointer"].read_text())["snapshot_id"]
    detector = stats.detector_settings(v)
    assert store.read_meta(st, sid)["features"]["detector"] == detector
    feats = store.load_features(st, sid, detector)
    snap = store.load_snapshot(st, sid)
    assert len(feats) == len(snap.manifest) and feats["stored"].all()
    expect = stats.row_features(snap.images, v)
    assert (feats["phash"].to_numpy(np.uint64) == expect["phash"].to_numpy(np.uint64)).all()
    assert (feats["abnormal_block"].to_numpy() == expect["abnormal_block"].to_numpy()).all()

    rc, bad_view, _ = run_poison(digits_store, tmp_path / "bad", "attack=backdoor", "attack.rate=0.1")
    assert rc == 0
    _meta, records = view.read_view(bad_view)
    rebuilt = sum(1 for r in records if r["transform"])
    lazy = store.load_snapshot(st, sid, lazy=True, hash_packs=False)
    stored = validate.measure_view(lazy, records, v, features=feats)
    pixels = validate.measure_view(snap, records, v)
    n_train = int((snap.manifest["split"] == "train").sum())
    assert stored.from_pixels == rebuilt > 0 and pixels.from_pixels == n_train
    assert (stored.rows.block == pixels.rows.block).all() and stored.rows.block.sum() >= rebuilt // 2
    assert (stored.rows.phash == pixels.rows.phash).all()
    assert stored.flags["abnormal_block_at"].tolist() == pixels.flags["abnormal_block_at"].tolist()

    # Other detector settings: nothing stored for them, so every row is measured from its pixels.
    other = dataclasses.replace(v, block_size=v.block_size + 1)
    assert not store.load_features(st, sid, stats.detector_settings(other))["stored"].any()

    # Pixels the gate reads from unhashed packs are checked row by row: a pack changed after the
    # snapshot is refused, not measured.
    copy = tmp_path / "store"
    shutil.copytree(st, copy)
    row = snap.manifest[snap.manifest["split"] == "train"].iloc[0]
    pack = copy / "packs" / f"{row['pack']}.npy"
    arr = np.load(pack, mmap_mode="r")
    at = arr.offset + int(row["pack_index"]) * int(np.prod(arr.shape[1:]))  # the row's first pixel
    del arr
    data = bytearray(pack.read_bytes())
    data[at] ^= 0xFF
    pack.write_bytes(bytes(data))
    with pytest.raises(store.IntegrityError, match="do not hash to their manifest sha256"):
        validate.measure_view(store.load_snapshot(copy, sid, lazy=True, hash_packs=False), [], other,
                              features=store.load_features(copy, sid, stats.detector_settings(other)))

    # An edited features file is a damaged store, named.
    f = next((copy / "features").glob("*.parquet"))
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(store.DamagedStore, match="data-gate columns"):
        store.load_features(copy, sid, detector)
    ok, _reports, _notes = store.verify_store(copy)
    assert not ok


def test_poison_stage_reads_only_the_rows_it_poisons(digits_store, tmp_path, capsys):
    """Issue 19 item 3: a backdoor view reads the pixels of the rows it poisons and no others, and
    checks each row it reads against its manifest sha256 (the packs are not hashed whole)."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(digits_store["store"], copy)
    ds = {**digits_store, "store": copy}
    attack = ("attack=backdoor", "attack.rate=0.1")
    rc, out, _ = run_poison(ds, tmp_path / "a", *attack)
    assert rc == 0
    records = view.read_view(out)[1]
    poisoned = {r["sample_id"] for r in records}
    assert poisoned
    man = store.read_manifest(copy, json.loads(digits_store["pointer"].read_text())["snapshot_id"])

    def flip(row) -> None:
        pack = copy / "packs" / f"{row['pack']}.npy"
        arr = np.load(pack, mmap_mode="r")
        at = arr.offset + int(row["pack_index"]) * int(np.prod(arr.shape[1:]))
        del arr
        data = bytearray(pack.read_bytes())
        data[at] ^= 0xFF
        pack.chmod(0o644)
        pack.write_bytes(bytes(data))

    flip(man[(man["split"] == "train") & ~man["sample_id"].isin(poisoned)].iloc[0])  # a row it does not read
    rc, out, _ = run_poison(ds, tmp_path / "b", *attack)
    assert rc == 0 and view.read_view(out)[1] == records
    victim = man[man["sample_id"] == sorted(poisoned)[0]].iloc[0]
    flip(victim)
    capsys.readouterr()
    rc, _, _ = run_poison(ds, tmp_path / "c", *attack)
    err = capsys.readouterr().err
    assert rc == 1 and "integrity check failed" in err and victim["sample_id"] in err, err


def forge_head(store_dir: Path, sid: str, case: str) -> str:
    """A self-consistent forged head (in place): its delta rewritten and every hash recomputed, so
    only the rows' content can tell; returns its id."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    for p in store_dir.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    h = store.read_meta(store_dir, sid)
    h.pop("id")
    d = pq.read_table(store_dir / "deltas" / f"{h['delta']['sha256']}.parquet").to_pydict()
    schema = store.DELTA_SCHEMA
    if case == "label":
        d["label"][0] = 99
    elif case == "pack":
        d["pack"][0] = "cd" * 32
    elif case == "index":
        d["pack_index"][0] = 10**6
    elif case == "rows":
        d = {k: v[1:] for k, v in d.items()}
    elif case == "schema":
        d["label"] = [str(x) for x in d["label"]]
        schema = pa.schema([(f.name, pa.string() if f.name == "label" else f.type) for f in schema])
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(d, schema=schema), buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    h["delta"]["sha256"] = hashlib.sha256(data).hexdigest()
    (store_dir / "deltas" / f"{h['delta']['sha256']}.parquet").write_bytes(data)
    hb = store.header_bytes(h)
    nid = hashlib.sha256(hb).hexdigest()
    (store_dir / "snapshots" / f"{nid}.json").write_bytes(hb)
    return nid


@pytest.mark.parametrize("case,message", [
    ("label", "labels outside its class list"),
    ("pack", "packs its header does not name"),
    ("index", "not the rows the manifest expects"),
    ("rows", "its header says"),
    ("schema", "schema"),
])
def test_identity_view_refuses_a_forged_head_a_load_refuses(digits_store, tmp_path, capsys, case, message):
    """The identity view parses no row into memory, yet a forged head whose hashes are consistent
    is refused as a load refuses it (the rows' labels, packs, indexes, count and schema are
    checked a batch at a time by store.verify_files)."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(digits_store["store"], copy)
    sid = store.read_pointer(digits_store["pointer"])["snapshot_id"]
    nid = forge_head(copy, sid, case)
    with pytest.raises(store.DamagedStore, match=message):
        store.load_snapshot(copy, nid)
    with pytest.raises(store.DamagedStore, match=message):
        store.verify_files(copy, nid, hash_packs=False)
    ptr = tmp_path / "snapshot.json"
    ptr.write_text(json.dumps({**json.loads(digits_store["pointer"].read_text()), "snapshot_id": nid}))
    capsys.readouterr()
    rc, out, _ = run_poison({**digits_store, "store": copy, "pointer": ptr}, tmp_path / "v", "attack=none")
    assert rc == 1 and message in " ".join(capsys.readouterr().err.split()) and not (out / "view.json").exists()
