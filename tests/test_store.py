"""Fast tier: the append-only store, through the stage's `run` on tiny synthetic image folders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import snapshot
from pipeline.data import sources, stats, store
from pipeline.config import DataConfig
from pipeline.core.hashing import sample_hash
from pipeline.data.rows import Prefixed, as_strings
from pipeline.data.store import COLUMNS, IntegrityError, SnapshotRefused, StoreError
from tests.test_sources import make_folder, pixels, save


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root: the 'byte-for-byte untouched' check."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Env:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.src = make_folder(tmp / "src")
        self.store = tmp / "data" / "store"
        self.pointer = tmp / "data" / "snapshot.json"
        self.report = tmp / "reports" / "snapshot.json"

    def cfg(self, **kw) -> DataConfig:
        base = dict(name="imagefolder", path=str(self.src), workers=1)
        return DataConfig(**{**base, **kw})

    def run(self, **kw) -> dict:
        return snapshot.snapshot(self.cfg(**kw), str(self.store), str(self.pointer), str(self.report), progress=None)

    def refused(self, match: str, **kw) -> SnapshotRefused:
        before = tree_digest(self.store)
        with pytest.raises(SnapshotRefused, match=match) as exc:
            self.run(**kw)
        assert tree_digest(self.store) == before, "a refused snapshot touched the store"
        return exc.value


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp_path)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_first_snapshot_layout_ids_and_load(env):
    rep = env.run()
    sid = rep["snapshot_id"]
    header = env.store / "snapshots" / f"{sid}.json"
    assert sha(header) == sid  # the id is the hash of the header, which names everything else
    meta = json.loads(header.read_text())
    assert (env.store / "FORMAT").read_text() == store.FORMAT_TEXT
    assert meta["delta"]["rows"] == 18 and sha(env.store / "deltas" / f"{meta['delta']['sha256']}.parquet") == meta["delta"]["sha256"]
    man = store.read_manifest(env.store, sid)
    assert list(man.columns) == store.MANIFEST_COLUMNS and list(man.columns)[:9] == COLUMNS and len(man) == 18
    assert set(man["snapshot_id"]) == {sid}
    pack = man["pack"].iloc[0]
    assert meta["packs"] == [pack] and sha(env.store / "packs" / f"{pack}.npy") == pack
    # The byte digest of each source file is recorded at ingest (what makes the next run incremental).
    assert man["file_sha256"].iloc[0] == sha(env.src / "train" / "cat" / "00.png")
    assert man["file_size"].iloc[0] == (env.src / "train" / "cat" / "00.png").stat().st_size
    assert not (env.store / "HEAD").exists()  # one ref for "current": heads/<key>
    assert (env.store / "heads" / sources.source_key(env.cfg())).read_text().strip() == sid
    assert meta["parent"] is None and meta["image_shape"] == [8, 8, 3] and meta["class_names"] == ["cat", "dog", "emu"]

    snap = store.load_snapshot(env.store, sid)
    src = sources.load_imagefolder(str(env.src))
    assert np.array_equal(snap.images, src.images) and snap.manifest["sample_id"].tolist() == src.sample_ids
    x, y, ids = snap.split("test")
    assert x.shape == (6, 8, 8, 3) and y.dtype == np.int64 and ids[0] == "test/cat/00.png"
    assert snap.image_shape == (8, 8, 3) and snap.class_names == ["cat", "dog", "emu"]

    ptr = store.read_pointer(env.pointer)
    assert ptr == {"snapshot_id": sid, "parent": None, "store": str(env.store),
                   "manifest": f"{env.store}/snapshots/{sid}.json", "source_key": sources.source_key(env.cfg()),
                   "n_rows": 18, "n_new": 18, "class_names": ["cat", "dog", "emu"], "image_shape": [8, 8, 3]}
    assert rep["provenance"]["coverage"] == 1.0 and rep["duplicates"]["n_groups"] == 0
    assert rep["counts"]["train"]["per_class"] == {"cat": 4, "dog": 4, "emu": 4}
    assert rep["counts"] == stats.counts(man, meta["class_names"])  # the header's fast bincount agrees
    assert set(rep["seconds"]) == {"verify", "read", "plan", "features", "write", "total"}


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_have_the_mode_the_umask_gives(env, mask):
    """Every file of a snapshot (header, delta, features, pack, heads), its pointer and report have
    the mode ``open`` gives (0666 less the umask): written through ``mkstemp`` they were 0600, so a
    team sharing a store (or a reviewer reading CI's reports) could not read another user's files."""
    old = os.umask(mask)
    try:
        env.run()
    finally:
        os.umask(old)
    files = [p for p in [*env.store.rglob("*"), env.pointer, env.report] if p.is_file()]
    assert {p.relative_to(env.store).parts[0] for p in files if p.is_relative_to(env.store)} >= \
        {"snapshots", "deltas", "packs", "heads"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}


def test_temp_names_are_as_long_as_mkstemps(tmp_path):
    """The atomic writes' temporary names add what mkstemp's add (8 characters): 16 hex characters
    left 8 fewer for the target's own name under the file system's 255-byte limit."""
    import tempfile

    from pipeline.io import create_temp

    names = []
    for make in (lambda: create_temp(tmp_path, ".t.", ".tmp"), lambda: tempfile.mkstemp(".tmp", ".t.", tmp_path)):
        fd, name = make()
        os.close(fd)
        names.append(len(os.path.basename(name)))
    assert names[0] == names[1], names


def test_written_files_follow_a_folders_default_acl_as_open_does(tmp_path):
    """Where a folder has a default ACL, open() takes a new file's mode from it, not from the
    umask: an atomic write must do the same, neither 0600 nor wider than the ACL allows."""
    import struct

    from pipeline.io import atomic_write_bytes

    folder = tmp_path / "acl"
    folder.mkdir()
    # setfacl -d -m u::rwx,g::r-x,o::--- (the kernel's binary form; setfacl need not be installed)
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                          for tag, perm in ((0x01, 7), (0x04, 5), (0x20, 0)))
    try:
        os.setxattr(folder, "system.posix_acl_default", acl)
        has_acl = True
    except OSError:  # a file system without POSIX ACLs: the umask decides, for open() and for us
        has_acl = False
    old = os.umask(0o022)
    try:
        with open(folder / "plain", "wb") as fh:
            fh.write(b"x")
        atomic_write_bytes(folder / "atomic", b"x")
    finally:
        os.umask(old)
    expected = "0o640" if has_acl else "0o644"  # what open() gives under this ACL, else under the umask
    assert oct((folder / "plain").stat().st_mode & 0o777) == expected
    assert oct((folder / "atomic").stat().st_mode & 0o777) == expected


def test_append_ten_files_keeps_old_rows_and_files(env):
    first = env.run()
    old_files = tree_digest(env.store)
    old_man = store.read_manifest(env.store, first["snapshot_id"])
    for i in range(10):
        save(env.src / ("train" if i < 7 else "test") / ["cat", "dog", "emu"][i % 3] / f"new{i}.png", pixels(500 + i))
    rep = env.run()
    assert rep["parent"] == first["snapshot_id"] and rep["n_rows"] == 28 and rep["n_new"] == 10
    new_man = store.read_manifest(env.store, rep["snapshot_id"])
    # Every earlier row identical (ingest time, URI, pack, first snapshot id), new rows after.
    pd.testing.assert_frame_equal(new_man.iloc[:18].reset_index(drop=True), old_man)
    assert set(new_man["snapshot_id"].iloc[18:]) == {rep["snapshot_id"]}
    # The new snapshot's delta holds only its 10 rows, and its header names its parent.
    meta = json.loads((env.store / "snapshots" / f"{rep['snapshot_id']}.json").read_text())
    assert meta["parent"] == first["snapshot_id"] and meta["delta"]["rows"] == 10
    after = tree_digest(env.store)
    assert all(after[k] == v for k, v in old_files.items() if k not in ("HEAD",) and not k.startswith("heads"))
    assert len(list((env.store / "packs").iterdir())) == 2 and len(list((env.store / "deltas").iterdir())) == 2
    snap = store.load_snapshot(env.store, rep["snapshot_id"])
    assert len(snap.manifest) == 28 and snap.manifest["sample_id"].iloc[-1] == "test/emu/new8.png"
    old = store.load_snapshot(env.store, first["snapshot_id"])  # the earlier snapshot still loads
    assert np.array_equal(snap.images[:18], old.images)


def test_lazy_rows_read_what_an_eager_load_holds(env):
    """Issue 19 item 3: a lazy load (rows read from the packs on demand) gives the eager load's
    pixels through every indexing the pipeline uses, across packs, with rows replaced by a view."""
    from pipeline.data import view as view_mod

    env.run()
    for i in range(10):
        save(env.src / ("train" if i < 7 else "test") / ["cat", "dog", "emu"][i % 3] / f"new{i}.png", pixels(500 + i))
    sid = env.run()["snapshot_id"]
    eager = store.load_snapshot(env.store, sid)
    lazy = store.load_snapshot(env.store, sid, lazy=True)
    rows = lazy.images
    assert type(rows).__name__ == "LazyRows" and rows.shape == eager.images.shape and len(rows) == 28
    assert np.array_equal(np.asarray(rows), eager.images)
    idx = np.array([27, 0, 18, 5, 5, 20])
    assert np.array_equal(rows[idx], eager.images[idx]) and np.array_equal(rows[-1], eager.images[-1])
    assert np.array_equal(rows[3:25:4], eager.images[3:25:4])
    mask = np.arange(28) % 3 == 0
    assert np.array_equal(rows[mask], eager.images[mask])
    with pytest.raises(IndexError):
        rows[28]
    # the train split stays lazy; records applied lazily equal records applied to arrays
    (li, ll, lids), (ei, el, eids) = lazy.split("train"), eager.split("train")
    assert type(li).__name__ == "LazyRows" and lids == eids and np.array_equal(li[:], ei)
    from pipeline.core.attacks import apply_trigger as at
    from pipeline.core.hashing import sample_hash as h

    trig = {"kind": "patch", "size": 2, "location": "top_left", "pattern": "white", "alpha": 1.0, "seed": 0}
    recs = [{"sample_id": eids[k], "original_label": int(el[k]), "new_label": 0, "transform": trig,
             "sha256_after": h(at(ei[k:k + 1], trig)[0])} for k in (1, 9, 17)]
    a_img, a_lab, a_rows = view_mod.apply_records(ei, el, eids, recs)
    b_img, b_lab, b_rows = view_mod.apply_records(li, ll, lids, recs)
    # split_rows: the same rows, the ids as the manifest's column (by position), records found alike
    ri, rl, rids = lazy.split_rows("train")
    assert not isinstance(rids, list) and list(rids) == eids and rids[5] == eids[5] and np.array_equal(rl, el)
    c_img, c_lab, c_rows = view_mod.apply_records(ri, rl, rids, recs)
    assert c_rows == a_rows and np.array_equal(c_lab, a_lab) and np.array_equal(np.asarray(c_img), a_img)
    assert type(b_img).__name__ == "LazyRows" and np.array_equal(np.asarray(b_img), a_img)
    assert np.array_equal(a_lab, b_lab) and a_rows == b_rows
    assert np.array_equal(li[:], ei), "the lazy split itself is unchanged (copy on write)"
    rep = np.array([9, 1, 9, 0])  # a replaced row twice: both positions read the replacement
    assert np.array_equal(b_img.subset(rep)[:], a_img[rep]) and np.array_equal(b_img[rep], a_img[rep])
    q = {"rows": [{"sample_id": eids[9], "sha256": recs[1]["sha256_after"]}, {"sample_id": eids[2], "sha256": h(ei[2])}]}
    a = view_mod.drop_quarantined(a_img, a_lab, eids, a_rows, q)
    b = view_mod.drop_quarantined(b_img, b_lab, lids, b_rows, q)
    assert np.array_equal(np.asarray(b[0]), a[0]) and b[2] == a[2] and b[3] == a[3] and len(b[0]) == len(eids) - 2
    with pytest.raises(ValueError, match="not a uint8"):
        rows.with_rows({0: np.zeros((3, 3, 3), np.uint8)})
    # negative positions keep their replacement; rows only; masks and keys are checked
    last = len(eids) - 1
    assert np.array_equal(b_img[np.array([-len(eids) + 1])], a_img[[1]])
    with pytest.raises(TypeError, match="rows only"):
        rows[0, 0]
    with pytest.raises(IndexError):
        li.subset(np.ones(3, bool))
    with pytest.raises(IndexError):
        li.with_rows({last + 1: ei[0]})
    mine = ei[0].copy()
    held = li.with_rows({-1: mine})
    mine[:] = 0
    assert np.array_equal(held[last], ei[0]), "with_rows keeps its own copy"
    # a pack replaced after the load is refused at the next read, not trained on
    pack = next((env.store / "packs").iterdir())
    data = pack.read_bytes()
    pack.unlink()
    pack.write_bytes(data)
    with pytest.raises(store.DamagedStore, match="changed after it was verified"):
        np.asarray(rows)


def test_read_rows_preads_runs_into_place_and_reports_a_short_file(tmp_path, monkeypatch):
    """LazyRows reads a pack by pread, one read a run of rows consecutive in the file and in the
    output (issue 19 item 3: a fresh mapping per streamed batch cost 2x, bench/lazy_rows_read.py).
    Every order, repeat and run shape reads numpy's rows; a read the kernel cuts short (Linux
    returns at most ~2 GiB a call) is continued; a file that ends early is reported, not padded."""
    from pipeline.data import rows as rows_mod

    x = np.random.default_rng(0).integers(0, 256, (40, 3, 2, 1), dtype=np.uint8)
    path = tmp_path / "p.npy"
    np.save(path, x)
    offset = np.load(path, mmap_mode="r").offset
    lazy = rows_mod.LazyRows([(path, offset, 40, rows_mod.file_identity(path))], np.zeros(40, np.int32),
                             np.arange(40), x.shape[1:])
    calls = []
    real = os.preadv

    def short(fd, bufs, pos):  # at most 7 bytes a call: every run takes several
        calls.append(pos)
        return real(fd, [memoryview(bufs[0])[:7]], pos)

    for cut in (False, True):
        if cut:
            monkeypatch.setattr(rows_mod.os, "preadv", short)
        for idx in (np.arange(40), np.array([5, 6, 7, 20, 21, 3]), np.array([9, 8, 7]), np.array([4, 4, 5, 39, 0]),
                    np.array([], np.int64), np.random.default_rng(1).permutation(40)[:17]):
            assert np.array_equal(lazy[idx], x[idx]), (cut, idx)
        assert np.array_equal(lazy[10:30], x[10:30]) and np.array_equal(np.asarray(lazy), x)
    assert len(calls) > 40  # the cut reads were continued, not taken as the end of the file
    monkeypatch.setattr(rows_mod.os, "preadv", real)
    out = np.zeros((3, 3, 2, 1), np.uint8)
    with open(path, "rb") as fh:  # rows 38, 39 and one past the end: the file ends first
        assert not rows_mod.read_rows(fh.fileno(), offset, np.array([38, 39, 40]), out, np.arange(3))
        assert rows_mod.read_rows(fh.fileno(), offset, np.array([0, 1]), out, np.array([2, 0]))
    assert np.array_equal(out[2], x[0]) and np.array_equal(out[0], x[1])


def test_unchanged_source_writes_nothing(env):
    first = env.run()
    store_before = tree_digest(env.store)
    ptr, report = env.pointer.read_bytes(), env.report.read_bytes()
    mtimes = (env.pointer.stat().st_mtime_ns, env.report.stat().st_mtime_ns)
    again = env.run()
    assert again["snapshot_id"] == first["snapshot_id"] and again["n_new"] == 18
    assert tree_digest(env.store) == store_before
    assert env.pointer.read_bytes() == ptr and env.report.read_bytes() == report
    assert (env.pointer.stat().st_mtime_ns, env.report.stat().st_mtime_ns) == mtimes
    # DVC deletes non-persistent outputs before a run: the pointer comes back byte-identical.
    env.pointer.unlink()
    env.run()
    assert env.pointer.read_bytes() == ptr


def test_one_pixel_changed_refused(env):
    env.run()
    target = env.src / "train" / "dog" / "02.png"
    arr = np.asarray(Image.open(target)).copy()
    arr[3, 4, 1] ^= 1
    Image.fromarray(arr).save(target)  # PNG: lossless, exactly one pixel differs
    exc = env.refused(r"(?s)rewrote 1 row.*train/dog/02.png: pixels changed")
    assert exc.problems == [p for p in exc.problems if "train/dog/02.png" in p]


def test_deleted_row_refused(env):
    env.run()
    (env.src / "test" / "emu" / "01.png").unlink()
    env.refused(r"(?s)test/emu/01.png: vanished from the source")


def test_a_source_that_lost_every_row_is_refused_naming_each(env):
    """The refusal's checks index the source's rows by the parent's: with no source row at all,
    every earlier row is reported vanished, nothing crashes (called with the empty source's
    columns directly: the source readers refuse an empty folder before they get here)."""
    sid = env.run()["snapshot_id"]
    parent = store.load_parent(env.store, sid)
    with pytest.raises(SnapshotRefused, match="rewrote 18 row") as exc:
        store._refuse_rewrites(parent, [], [], np.zeros(0, object), np.zeros(0, str))
    assert sorted(exc.value.problems) == sorted(f"{i}: vanished from the source" for i in parent.manifest["sample_id"])


def test_a_source_listing_an_id_twice_is_refused():
    """Each comparison with the parent takes one row per id; a reader that listed one twice (a bug,
    or a hostile source plugin) is refused before any of them, naming the id."""
    imgs = np.zeros((3, 2, 2, 1), np.uint8)
    with pytest.raises(SnapshotRefused, match=r"lists 1 sample id\(s\) more than once.*train/a.png") as exc:
        store.plan_snapshot(None, ["train/a.png", "train/b.png", "train/a.png"], ["1" * 64, "2" * 64, "3" * 64],
                            np.zeros(3, np.int64), ["c"], np.array(["train"] * 3), ["u"] * 3, imgs, "t")
    assert exc.value.problems == ["train/a.png: listed more than once"]


def test_rename_refused_as_rename(env):
    env.run()
    (env.src / "train" / "cat" / "01.png").rename(env.src / "train" / "cat" / "renamed.png")
    exc = env.refused(r"looks like a rename of train/cat/01.png to train/cat/renamed.png")
    assert len(exc.problems) == 1


def test_move_to_other_class_refused_as_relabel(env):
    env.run()
    (env.src / "train" / "cat" / "01.png").rename(env.src / "train" / "dog" / "moved.png")
    env.refused(r"looks like a relabel of train/cat/01.png \(class cat\) to train/dog/moved.png \(class dog\)")


def test_digits_for_real_and_label_change_refused(tmp_path, monkeypatch):
    e = Env(tmp_path)
    cfg = dict(name="digits", path=None)
    first = e.run(**cfg)
    assert first["n_rows"] == 1797 and first["image_shape"] == [8, 8, 1]
    assert first["source"]["name"] == "digits"
    real = sources.load_digits

    def relabelled(*a, **kw):
        d = real(*a, **kw)
        labels = d.labels.copy()
        labels[5] = (labels[5] + 1) % 10
        return sources.SourceData(d.images, labels, d.class_names, d.splits, d.sample_ids, d.uris)

    monkeypatch.setattr(sources, "load_digits", relabelled)
    sid = real(0.25, 0).sample_ids[5]
    e.refused(rf"{sid}: label changed", **cfg)


def test_new_class_gets_the_next_index(env):
    first = env.run()
    for split in ("train", "test"):
        save(env.src / split / "ant" / "00.png", pixels(700 + len(split)))
    rep = env.run()
    assert rep["class_names"] == ["cat", "dog", "emu", "ant"] and rep["n_new"] == 2
    snap = store.load_snapshot(env.store, rep["snapshot_id"])
    assert snap.manifest["label"].tolist()[:18] == store.load_snapshot(env.store, first["snapshot_id"]).manifest["label"].tolist()
    assert set(snap.manifest["label"].tolist()[18:]) == {3}


def test_shrinking_the_limit_is_refused_growing_it_appends(env):
    small = env.run(limit=3)
    assert small["n_rows"] == 6
    grown = env.run(limit=5)
    assert grown["parent"] == small["snapshot_id"] and grown["n_new"] == 4  # +2 train, +2 test (only 6 exist)
    env.refused(r"vanished", limit=3)


def test_verify_catches_tampered_pack_and_manifest(env):
    rep = env.run()
    sid = rep["snapshot_id"]
    man = store.read_manifest(env.store, sid)
    pack_path = env.store / "packs" / f"{man['pack'].iloc[0]}.npy"
    pristine = pack_path.read_bytes()
    arr = np.load(pack_path)
    arr[2, 0, 0, 0] ^= 0xFF
    np.save(pack_path, arr)
    with pytest.raises(IntegrityError, match=r"1 row\(s\).*train/cat/02.png"):
        store.load_snapshot(env.store, sid)
    assert store.load_snapshot(env.store, sid, verify=False).images[2, 0, 0, 0] == arr[2, 0, 0, 0]
    pack_path.write_bytes(pristine)

    meta = json.loads((env.store / "snapshots" / f"{sid}.json").read_text())
    delta = env.store / "deltas" / f"{meta['delta']['sha256']}.parquet"
    table = pq.read_table(delta).to_pandas()
    table.loc[table["sample_id"] == "test/cat/00.png", "sample_id"] = "test/cat/0x.png"
    pq.write_table(pa.Table.from_pandas(table, schema=store.DELTA_SCHEMA, preserve_index=False), delta)
    with pytest.raises(IntegrityError, match=r"damaged store: .*deltas/.*does not match its sha256"):
        store.load_snapshot(env.store, sid)
    with pytest.raises(StoreError, match=r"not found"):
        store.load_snapshot(env.store, "0" * 64)


def test_duplicates_and_cross_label_duplicates_reported(env):
    img = pixels(4242)
    save(env.src / "train" / "cat" / "dupA.png", img)
    save(env.src / "train" / "cat" / "dupB.png", img)
    save(env.src / "train" / "dog" / "dupC.png", pixels(4343))
    save(env.src / "test" / "emu" / "dupD.png", pixels(4343))
    rep = env.run()
    dup = rep["duplicates"]
    assert dup["n_groups"] == 2 and dup["n_duplicate_rows"] == 2 and dup["n_cross_label_groups"] == 1
    first = dup["groups"][0]  # cross-label first
    assert first["labels"] == ["dog", "emu"] and first["cross_split"] and first["sample_ids"] == ["train/dog/dupC.png", "test/emu/dupD.png"]
    assert dup["groups"][1]["sample_ids"] == ["train/cat/dupA.png", "train/cat/dupB.png"]
    assert dup["groups"][1]["sha256"] == sample_hash(img[..., :3])


def test_two_sources_share_a_store_as_two_lineages(env, tmp_path):
    a = env.run()
    other = make_folder(tmp_path / "other", classes=("x", "y"), seed=7)
    b = env.run(path=str(other))
    assert b["parent"] is None and b["snapshot_id"] != a["snapshot_id"]
    assert len(list((env.store / "heads").iterdir())) == 2
    assert json.loads(env.pointer.read_text())["snapshot_id"] == b["snapshot_id"]
    back = env.run()  # back to the first source: unchanged, no new snapshot
    assert back["snapshot_id"] == a["snapshot_id"]
    assert json.loads(env.pointer.read_text())["snapshot_id"] == a["snapshot_id"]
    assert len(list((env.store / "snapshots").glob("*.json"))) == 2


def test_history_without_heads_or_pointer_still_refuses(env):
    first = env.run()
    save(env.src / "train" / "cat" / "zz.png", pixels(900))
    second = env.run()
    shutil.rmtree(env.store / "heads")
    env.pointer.unlink()
    (env.src / "train" / "cat" / "zz.png").unlink()
    env.refused(r"train/cat/zz.png: vanished")  # compared with the newest snapshot, not the first
    assert store.current_snapshot(env.store, sources.source_key(env.cfg())) == second["snapshot_id"]
    assert first["snapshot_id"] != second["snapshot_id"]


def test_head_naming_a_missing_snapshot_is_a_store_error(env):
    rep = env.run()
    (env.store / "snapshots" / f"{rep['snapshot_id']}.json").unlink()
    with pytest.raises(StoreError, match=r"not found"):
        env.run()


def test_crash_before_meta_leaves_no_half_snapshot(env, monkeypatch):
    first = env.run()
    save(env.src / "train" / "cat" / "zz.png", pixels(901))
    real = store.atomic_write

    def crash_on_meta(path: Path, data: bytes) -> None:
        if path.suffix == ".json" and path.parent.name == "snapshots":
            raise OSError("simulated crash")
        real(path, data)

    monkeypatch.setattr(store, "atomic_write", crash_on_meta)
    with pytest.raises(OSError):
        env.run()
    monkeypatch.setattr(store, "atomic_write", real)
    assert [m["id"] for m in store.list_snapshots(env.store)] == [first["snapshot_id"]]
    assert (env.store / "heads" / sources.source_key(env.cfg())).read_text().strip() == first["snapshot_id"]
    assert not list(env.store.rglob(".*tmp-*"))
    rep = env.run()
    assert rep["parent"] == first["snapshot_id"] and rep["n_new"] == 1


def test_plan_is_pure_and_refuses_shape_change(env):
    env.run()
    parent = store.load_parent(env.store, store.current_snapshot(env.store, sources.source_key(env.cfg())))
    imgs = np.zeros((1, 4, 4, 3), np.uint8)
    with pytest.raises(SnapshotRefused, match=r"one image shape"):
        store.plan_snapshot(parent, ["train/cat/new.png"], [sample_hash(imgs[0])], np.array([0]), ["cat"],
                            np.array(["train"]), ["u"], imgs, "t")


def _data_buffer(column) -> int:
    """Address of the first chunk's character data of a string column (pandas or Arrow)."""
    arr = pa.array(column) if isinstance(column, pd.Series) else column
    arr = arr.chunk(0) if isinstance(arr, pa.ChunkedArray) else arr
    return arr.buffers()[2].address


def test_concat_manifests_keeps_categoricals_whatever_their_categories():
    """pandas makes a column object when the parts' categories differ or one part holds plain
    strings; concat_manifests keeps it categorical, every value where it was."""
    a = pd.DataFrame({"split": pd.Categorical(["train", "test", "train"]), "n": [1, 2, 3]})
    b = pd.DataFrame({"split": pd.Categorical(["val"]), "n": [4]})
    c = pd.DataFrame({"split": pd.array(["test", "holdout"], dtype="str"), "n": [5, 6]})
    assert not isinstance(pd.concat([a, b])["split"].dtype, pd.CategoricalDtype)  # what this guards against
    out = store.concat_manifests([a, b, c], ignore_index=True)
    assert isinstance(out["split"].dtype, pd.CategoricalDtype)
    assert out["split"].tolist() == ["train", "test", "train", "val", "test", "holdout"]
    assert as_strings(out["split"]).to_pylist() == out["split"].tolist()  # from the dictionary, as strings
    assert out["n"].tolist() == [1, 2, 3, 4, 5, 6] and out["n"].dtype == np.int64
    gaps = store.concat_manifests([a, pd.DataFrame({"split": ["val", None], "n": [7, 8]})], ignore_index=True)
    assert gaps["split"].tolist()[3] == "val" and pd.isna(gaps["split"].iloc[4])  # missing stays missing
    plain = pd.DataFrame({"split": ["x"], "n": [0]})
    pd.testing.assert_frame_equal(store.concat_manifests([plain, plain]), pd.concat([plain, plain]))


def test_a_cold_plan_and_an_append_share_the_columns_they_do_not_change(env, tmp_path):
    # issue 19 item 3: a cold snapshot's plan copied every string column the read still held (+200
    # MiB at 1M rows), and each write rebuilt the pack and snapshot_id columns of every earlier row
    # (bench/results/snapshot_cold_phases_1m.log). Values must not change, only the copies go.
    read = sources.read_source(env.cfg(), spill_dir=tmp_path / "spill")
    assert isinstance(read.sample_ids, pa.Array)  # the listing's Python strings do not outlive the read
    plan = store.plan_snapshot(None, read.sample_ids, read.hashes, read.labels, read.class_names, read.splits,
                               read.uris, read.images, "t", decoded=read.decoded, file_sizes=read.file_sizes,
                               file_sha256=read.file_sha256)
    m = plan.manifest
    for col, given in (("sample_id", read.sample_ids), ("sha256", read.hashes), ("file_sha256", read.file_sha256)):
        assert m[col].tolist() == sources.as_list(given)
        assert _data_buffer(m[col]) == _data_buffer(given), f"{col} was copied"
    # the URIs are made when the plan takes them, not by every read (a no-op takes none)
    assert isinstance(read.uris, Prefixed) and len(read.uris) == len(m)
    assert m["source_uri"].tolist() == [f"{env.src}::{i}" for i in sources.as_list(read.sample_ids)]
    sid, man = store.write_snapshot(env.store, plan, {"key": "k"}, "t")
    read.discard()
    assert set(plan.manifest["pack"]) == {""} and set(plan.manifest["snapshot_id"]) == {""}  # the plan is untouched
    assert set(man["snapshot_id"]) == {sid} and man["pack"].nunique() == 1
    first = man
    parent = store.load_parent(env.store, sid)
    for i in range(3):
        save(env.src / "train" / "cat" / f"new{i}.png", pixels(700 + i))
    read = sources.read_source(env.cfg(), known=sources.KnownRows(parent.manifest["sample_id"], parent.manifest["sha256"],
                                                                  parent.manifest["file_sha256"]),
                               spill_dir=tmp_path / "spill")
    plan = store.plan_snapshot(parent, read.sample_ids, read.hashes, read.labels, read.class_names, read.splits,
                               read.uris, read.images, "t2", decoded=read.decoded, file_sizes=read.file_sizes,
                               file_sha256=read.file_sha256)
    sid2, man2 = store.write_snapshot(env.store, plan, {"key": "k"}, "t2")
    read.discard()
    n = len(first)
    assert len(man2) == n + 3 and man2["snapshot_id"].tolist() == [sid] * n + [sid2] * 3
    assert man2["pack"].iloc[:n].tolist() == first["pack"].tolist() and man2["pack"].iloc[n:].nunique() == 1
    assert man2["pack"].iloc[n] != first["pack"].iloc[0]
    assert man2["source_uri"].iloc[n:].tolist() == [f"{env.src}::train/cat/new{i}.png" for i in range(3)]
    for col in store.REPEATED_COLUMNS:  # a value once and a small code a row, not a string a row
        for frame in (first, parent.manifest, plan.manifest, man2):
            assert isinstance(frame[col].dtype, pd.CategoricalDtype) and frame[col].array.codes.itemsize <= 4, col
    for col in ("pack", "snapshot_id"):  # each value a row holds, once; not the plan's ""
        assert list(man2[col].cat.categories) == list(dict.fromkeys(man2[col])), col
    assert set(plan.manifest["pack"].iloc[n:]) == {""}
    # what was written reads back equal (as strings: a plain load does not make categoricals)
    pd.testing.assert_frame_equal(store._plain_strings(man2), store.read_manifest(env.store, sid2))


# ----------------------------------------------------------------------------- incremental reads (issue 19 item 1)


def age(root: Path, seconds: float = 60.0) -> None:
    """Back-date files: one written within sources.RACY_NS of a scan is 'racy' and re-read anyway."""
    t = time.time_ns() - int(seconds * 1e9)
    for p in ([root] if root.is_file() else root.rglob("*")):
        if p.is_file():
            os.utime(p, ns=(t, t))


def run_cached(env: Env, **kw) -> dict:
    return snapshot.snapshot(env.cfg(**kw), str(env.store), str(env.pointer), str(env.report), progress=None,
                             stat_cache=str(env.tmp / "stat"))


def test_incremental_run_decodes_only_what_changed(env):
    age(env.src)
    first = run_cached(env, recheck_files=0)
    assert first["work"]["source_decoded"] == 18 and first["work"]["store_bytes_hashed"] == 0
    assert not (env.store / snapshot.SPILL_DIR).exists()  # the decoded pixels' spill file went into the pack
    again = run_cached(env, recheck_files=0)  # stat cache vouches for all 18: not one file opened
    assert again["snapshot_id"] == first["snapshot_id"]
    assert again["work"]["source_trusted"] == 18 and again["work"].get("source_read", 0) == 0
    assert again["work"].get("source_decoded", 0) == 0 and again["work"]["store_packs_hashed"] == 1
    for i in range(2):
        save(env.src / "train" / "dog" / f"new{i}.png", pixels(800 + i))
        age(env.src / "train" / "dog" / f"new{i}.png")
    grown = run_cached(env, recheck_files=0)
    assert grown["n_new"] == 2 and grown["work"]["source_decoded"] == 2 and grown["work"]["source_trusted"] == 18
    # touched (same bytes, new mtime): confirmed by its byte digest, not decoded
    os.utime(env.src / "train" / "cat" / "01.png")
    touched = run_cached(env, recheck_files=0)
    assert touched["snapshot_id"] == grown["snapshot_id"]
    assert touched["work"]["source_confirmed_by_digest"] == 1 and touched["work"].get("source_decoded", 0) == 0
    # re-encoded with the same pixels: decoded once, pixels equal, nothing new
    p = env.src / "train" / "cat" / "02.png"
    Image.open(p).save(p, compress_level=0)
    reenc = run_cached(env, recheck_files=0)
    assert reenc["snapshot_id"] == grown["snapshot_id"] and reenc["work"]["source_decoded"] == 1
    # without a stat cache every known file is read and digest-checked, still none decoded
    plain = env.run()
    assert plain["work"]["source_read"] == 20 and plain["work"].get("source_decoded", 0) == 1  # the re-encoded one


def edited_under_same_stat(env: Env) -> None:
    """A BMP (fixed size) whose pixels are edited after a cached snapshot, its mtime restored: the
    stat is the cached one, the bytes are not."""
    bmp = env.src / "train" / "emu" / "z.bmp"
    save(bmp, pixels(4321), fmt="BMP")
    age(env.src)
    run_cached(env, recheck_files=0)
    st = bmp.stat()
    arr = np.asarray(Image.open(bmp)).copy()
    arr[1, 1, 1] ^= 0x40
    Image.fromarray(arr).save(bmp, format="BMP")
    os.utime(bmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert bmp.stat().st_size == st.st_size


def test_stat_shortcut_its_spot_check_and_full_verify(env):
    """An edit that keeps size and mtime (BMP: fixed size; mtime restored) passes the stat shortcut
    by design; the random spot check, a run without the cache and verify_source all catch it."""
    edited_under_same_stat(env)
    assert run_cached(env, recheck_files=0)["n_new"] == 19  # trusted by (size, mtime): the documented gap
    env.refused(r"train/emu/z.bmp: pixels changed", recheck_files=10_000)  # the spot check reads it
    with pytest.raises(SnapshotRefused, match=r"train/emu/z.bmp: pixels changed"):
        run_cached(env, recheck_files=0, verify_source=True)
    with pytest.raises(SnapshotRefused, match=r"train/emu/z.bmp: pixels changed"):
        snapshot.snapshot(env.cfg(recheck_files=0), str(env.store), str(env.pointer), str(env.report), progress=None,
                          verify_source=True, stat_cache=str(env.tmp / "stat"))


def test_archive_noop_hashes_the_archive_and_decodes_nothing(env, tmp_path):
    from tests.test_sources import make_tar

    tar = make_tar(env.src, tmp_path / "d.tar.gz")
    first = env.run(path=str(tar))
    assert first["work"]["source_decoded"] == 18
    assert first["source"]["archives"] == [{"name": str(tar), "size": tar.stat().st_size, "sha256": sha(tar)}]
    os.utime(tar)  # a new mtime changes nothing: the archive's digest decides
    again = env.run(path=str(tar))
    assert again["snapshot_id"] == first["snapshot_id"] and "source_decoded" not in again["work"]
    assert again["work"]["source_archive_bytes_hashed"] == tar.stat().st_size
    save(env.src / "test" / "dog" / "zz.png", pixels(999))
    make_tar(env.src, tar)
    grown = env.run(path=str(tar))
    assert grown["n_new"] == 1 and grown["work"]["source_decoded"] == 1
    assert grown["work"]["source_confirmed_by_digest"] == 18
    with pytest.raises(SnapshotRefused, match="vanished"):
        env.run(path=str(tar), limit=1)


def test_format_1_store_is_refused_with_the_way_out(env):
    (env.store / "snapshots").mkdir(parents=True)
    (env.store / "snapshots" / ("a" * 64 + ".csv")).write_text("sample_id,sha256\n")
    with pytest.raises(StoreError, match=r"store format 1 found.*re-snapshot into a new store") as exc:
        env.run()
    assert exc.value.exit_code == 2


def test_verify_command_summarises_each_lineage(env, tmp_path, capsys):
    env.run()
    other = make_folder(tmp_path / "other", classes=("x", "y"), seed=7)
    env.run(path=str(other))
    assert store.main(["verify", "--store", str(env.store)]) == 0
    err = capsys.readouterr().err
    assert err.count("lineage imagefolder-") == 2 and err.count(": ok: 1 snapshot(s)") == 2
    assert store.main(["verify", "--store", str(env.store), "--deep"]) == 0
    assert "samples re-hashed" in capsys.readouterr().err
    pack = next((env.store / "packs").iterdir())
    data = bytearray(pack.read_bytes())
    data[-1] ^= 1
    pack.write_bytes(bytes(data))
    assert store.main(["verify", "--store", str(env.store)]) == 1
    err = capsys.readouterr().err
    assert f"packs/{pack.name}: does not match its sha256" in err and "dvc checkout --force" in err
    assert store.main(["verify", "--store", str(tmp_path / "nowhere")]) == 2


def test_rerun_after_a_crash_between_header_and_heads_adopts_the_header(env, monkeypatch):
    first = env.run()
    save(env.src / "train" / "cat" / "zz.png", pixels(902))
    real = store.atomic_write

    def crash_on_heads(path: Path, data: bytes) -> None:
        if path.parent.name == "heads":
            raise OSError("simulated crash")
        real(path, data)

    monkeypatch.setattr(store, "atomic_write", crash_on_heads)
    with pytest.raises(OSError):
        env.run()
    monkeypatch.setattr(store, "atomic_write", real)
    leftover = [m["id"] for m in store.list_snapshots(env.store) if m["parent"] == first["snapshot_id"]]
    assert len(leftover) == 1
    rep = env.run()
    assert rep["snapshot_id"] == leftover[0]  # adopted, not forked
    assert len(store.list_snapshots(env.store)) == 2


def test_bases_keep_loads_short_and_equal_to_the_whole_history(env, monkeypatch):
    """Issue 19 item 4: every BASE_EVERY snapshots the next one carries a base (its parent's
    manifest, pixels and data-gate columns in one place). A load reads from the newest base on
    disk, and gets exactly what reading the whole history gives; a superseded base is removed and
    loads of its snapshots walk the history; a damaged base is a DamagedStore; verify checks each
    base against the history it stands for."""
    from test_validate import default_vcfg

    monkeypatch.setattr(store, "BASE_EVERY", 2)
    v = default_vcfg()
    det = stats.detector_settings(v)
    ids = []
    for k in range(6):
        if k:
            for i in range(2):
                save(env.src / "train" / ["cat", "dog", "emu"][(k + i) % 3] / f"a{k}_{i}.png", pixels(900 + 10 * k + i))
        ids.append(snapshot.snapshot(env.cfg(), str(env.store), str(env.pointer), str(env.report),
                                     detector=v, progress=None)["snapshot_id"])
    heads = [store.read_header(env.store, s) for s in ids]
    assert [h.get("base", {}).get("of") for h in heads] == [None, None, ids[1], None, ids[3], None]
    tip = ids[-1]
    assert [h["id"] for h in store.resolve(env.store, tip)] == ids[4:]  # from the newest base, not the root
    whole = store.chain(env.store, tip)
    assert len(whole) == 6
    # the same manifest, features and pixels as the whole history gives (eager and lazy)
    pd.testing.assert_frame_equal(store.load_manifest(env.store, tip),
                                  store.load_manifest(env.store, tip, headers=whole))
    pd.testing.assert_frame_equal(store.load_features(env.store, tip, det),
                                  store.load_features(env.store, tip, det, headers=whole))
    assert store.load_features(env.store, tip, det)["stored"].all()
    # a reader of a few columns (read_split) gets those columns of the same manifest, from the base
    # and from the whole history, plus what the checks read
    full = store.load_manifest(env.store, tip)
    for hs in (None, whole):
        few = store.load_manifest(env.store, tip, headers=hs, columns=("split", "snapshot_id"))
        assert list(few.columns) == ["sample_id", "label", "split", "snapshot_id", "pack"]
        pd.testing.assert_frame_equal(few, full[few.columns])
    with pytest.raises(ValueError, match="no such manifest column"):
        store.load_manifest(env.store, tip, columns=("splits",))
    # a parent's load: REPEATED_COLUMNS as categoricals (a value once, a code a row: issue 19 item
    # 3), the same values, from the base and from the whole history
    for hs in (None, whole):
        cat = store.load_manifest(env.store, tip, headers=hs, categorical=True)
        assert [c for c in cat.columns if isinstance(cat[c].dtype, pd.CategoricalDtype)] == \
            [c for c in store.MANIFEST_COLUMNS if c in store.REPEATED_COLUMNS]
        pd.testing.assert_frame_equal(store._plain_strings(cat), full)
    pd.testing.assert_frame_equal(store._plain_strings(store.load_parent(env.store, tip).manifest), full)
    with pytest.raises(ValueError, match="categorical"):
        store.load_manifest(env.store, tip, split="train", categorical=True)
    # a split's load (read_split's): its rows of the same manifest, indexed by their full row, and
    # their pixels, whether the rows before the base come from it or from the whole history
    snap = store.load_snapshot(env.store, tip)
    for split in ("train", "test"):
        mask = (full["split"] == split).to_numpy()
        assert 0 < mask.sum() < len(full)
        for hs in (None, whole):
            cut = store.load_manifest(env.store, tip, headers=hs, columns=("split",), split=split)
            pd.testing.assert_frame_equal(cut, full.loc[mask, cut.columns])
            pd.testing.assert_frame_equal(store.load_manifest(env.store, tip, headers=hs, split=split), full[mask])
        for lazy in (False, True):
            part = store.load_snapshot(env.store, tip, lazy=lazy, split=split)
            assert np.array_equal(np.asarray(part.images), snap.images[mask])
    assert np.array_equal(np.asarray(store.load_snapshot(env.store, tip, lazy=True).images), snap.images)
    assert [sample_hash(x) for x in snap.images] == snap.manifest["sha256"].tolist()
    # only the newest base is kept: ids[2]'s was superseded, its loads walk the history
    bases = sorted(p.name for p in (env.store / "bases").iterdir())
    b = heads[4]["base"]
    assert bases == sorted([f"{b['manifest']}.parquet", f"{b['pixels']}.npy", f"{b['features']['sha256']}.parquet"])
    assert [h["id"] for h in store.resolve(env.store, ids[3])] == ids[:4]
    old = store.load_snapshot(env.store, ids[3])
    assert np.array_equal(old.images, snap.images[: len(old.images)])
    ok, reports, notes = store.verify_store(env.store)
    assert ok and any("base of snapshot" in n and "not on disk" in n for n in notes), notes
    assert reports[0].stats.rows_rehashed == b["rows"]  # every base row checked against the history

    # a damaged base is refused, naming the file; without the base, loads walk the history again
    px = env.store / "bases" / f"{b['pixels']}.npy"
    good = px.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    px.write_bytes(bytes(bad))
    with pytest.raises(store.DamagedStore, match="bases/"):
        store.load_snapshot(env.store, tip)
    assert not store.verify_store(env.store)[0]
    px.unlink()
    assert [h["id"] for h in store.resolve(env.store, tip)] == ids
    assert np.array_equal(store.load_snapshot(env.store, tip).images, snap.images)
    px.write_bytes(good)

    # a base whose files hash right but that is not its parent (a buggy or forged writer): a new
    # header names it, and verify says the base is not the parent's manifest
    man = store.read_base(env.store, heads[4])
    man.loc[0, "label"] = (int(man.loc[0, "label"]) + 1) % 3
    mb = store._parquet_bytes(man, store.BASE_SCHEMA)
    (env.store / "bases" / f"{store._sha256(mb)}.parquet").write_bytes(mb)
    forged = {k: v for k, v in heads[4].items() if k != "id"}
    forged["base"] = {**forged["base"], "manifest": store._sha256(mb)}
    hb = store.header_bytes(forged)
    (env.store / "snapshots" / f"{store._sha256(hb)}.json").write_bytes(hb)
    store.set_head(env.store, heads[4]["source"]["key"], store._sha256(hb))
    ok, reports, _ = store.verify_store(env.store)
    assert not ok and any("is not the manifest of" in r.message for r in reports), [r.message for r in reports]


def test_a_base_is_written_streamed_and_refuses_a_row_that_changed_after_verify(env):
    """write_base streams the parent's rows from the store (store.BaseWriter over verify_files:
    issue 19 item 3, no load of every row), re-hashing every row against its verified delta as it
    is copied. Its pixels are np.save's bytes of the whole history; a row changed since the
    parent's verification is refused, also when a delta forged to agree with it sits beside it,
    and no base file (nor a temp file) is left."""
    env.run()
    for i in range(3):
        save(env.src / "train" / "cat" / f"b{i}.png", pixels(950 + i))
    sid = env.run()["snapshot_id"]
    parent = store.load_parent(env.store, sid)
    entry = store.write_base(env.store, parent, chunk=5)  # several chunks, the last one short
    whole = store.load_snapshot(env.store, sid)
    base_px = env.store / "bases" / f"{entry['pixels']}.npy"
    assert entry["rows"] == len(whole.images) and sha(base_px) == entry["pixels"]
    assert np.array_equal(np.load(base_px), whole.images)
    pd.testing.assert_frame_equal(store._plain_strings(store.read_base(env.store, {"base": entry})),
                                  store.load_manifest(env.store, sid))
    shutil.rmtree(env.store / "bases")
    header = store.read_header(env.store, sid)
    pack = env.store / "packs" / f"{header['packs'][0]}.npy"
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0xFF  # the last row of the newest pack, after load_parent verified it
    pack.write_bytes(bytes(data))
    with pytest.raises(store.IntegrityError, match="do not hash"):
        store.write_base(env.store, parent, chunk=5)
    assert _base_files(env) == []
    # a delta rewritten to agree with the changed pack: the rows streamed are checked against the
    # sha256 the header records for the delta, so the forgery is what is refused
    delta = env.store / "deltas" / f"{header['delta']['sha256']}.parquet"
    rows = store.read_delta(env.store, header).to_pandas()
    arr = np.load(pack)
    rows.loc[len(rows) - 1, "sha256"] = sample_hash(arr[int(rows["pack_index"].iloc[-1])])
    delta.write_bytes(store._parquet_bytes(rows, store.DELTA_SCHEMA))
    with pytest.raises(store.DamagedStore, match="does not match its sha256"):
        store.write_base(env.store, parent, chunk=5)
    assert _base_files(env) == []
    # a parent verified with another history than the store now holds
    with pytest.raises(store.IntegrityError, match="history changed since it was verified"):
        store.write_base(env.store, dataclasses.replace(parent, history=parent.history[1:]), chunk=5)


def test_load_features_reads_past_a_base_of_other_settings(env, monkeypatch):
    """load_features (and a base's columns) share store._feature_parts; checked here against each
    snapshot's own file: a snapshot stored with other detector settings gives rows marked not
    stored, and a base whose columns were measured with other settings is read past (the rows
    before it from the whole history), from resolve's headers and from the chain alike."""
    import dataclasses

    from test_validate import default_vcfg

    monkeypatch.setattr(store, "BASE_EVERY", 2)
    v = default_vcfg()
    other = dataclasses.replace(v, block_min_contrast=float(v.block_min_contrast) + 7.0)
    det = stats.detector_settings(v)
    ids = []
    for k, vk in enumerate((v, v, other, v, other)):  # snapshot 4 carries a base of 3 with `other`'s columns
        if k:
            save(env.src / "train" / "dog" / f"o{k}.png", pixels(800 + k))
        ids.append(snapshot.snapshot(env.cfg(), str(env.store), str(env.pointer), str(env.report),
                                     detector=vk, progress=None)["snapshot_id"])
    tip = ids[-1]
    hs = store.resolve(env.store, tip)
    assert hs[0]["base"]["features"]["detector"] != det  # the case: a base of other settings
    parts = []
    for h in store.chain(env.store, tip):
        if h["features"]["detector"] == det:
            parts.append(store.read_features(env.store, h).assign(stored=True))
        else:
            n = int(h["n_new"])
            parts.append(pd.DataFrame({"phash": np.zeros(n, np.uint64), "abnormal_block": np.zeros(n, bool),
                                       "abnormal_block_at": pd.array([""] * n, dtype="str"),
                                       "stored": np.zeros(n, bool)}))
    want = pd.concat(parts, ignore_index=True)
    assert want["stored"].any() and not want["stored"].all()
    for headers in (None, store.chain(env.store, tip)):
        pd.testing.assert_frame_equal(store.load_features(env.store, tip, det, headers=headers), want)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # a writer closed on collection
def test_a_streamed_base_is_the_same_files_whatever_the_batching(env, monkeypatch):
    """The base's Parquet files are cut into fixed row groups (store.BASE_GROUP_ROWS) whatever the
    batches the store's rows arrive in, so the full read and the append (which stream the store in
    other batches) write the same files; the features file is load_features' rows."""
    from test_validate import default_vcfg

    v = default_vcfg()
    det = stats.detector_settings(v)
    monkeypatch.setattr(store, "BASE_GROUP_ROWS", 4)
    for k in range(3):
        save(env.src / "train" / "dog" / f"g{k}.png", pixels(970 + k))
        sid = snapshot.snapshot(env.cfg(), str(env.store), str(env.pointer), str(env.report), detector=v,
                                progress=None)["snapshot_id"]
    entries = []
    for rows, chunk in ((65_536, 8192), (3, 2), (1, 1), (7, 5)):
        whole, headers = store.lineage(env.store, sid)
        w = store.BaseWriter(env.store, whole, headers, chunk)
        got, _ = store.verify_files(env.store, sid, rows=rows, each_rows=w.rows, each_file=w.file, whole_rows=True)
        entries.append(w.finish(got, det))
    assert all(e == entries[0] for e in entries[1:]), entries
    e = entries[0]
    f = env.store / "bases" / f"{e['manifest']}.parquet"
    n = store.read_header(env.store, sid)["n_rows"]
    assert pq.ParquetFile(f).metadata.num_row_groups == -(-n // 4)
    pd.testing.assert_frame_equal(store._plain_strings(store.read_base(env.store, {"base": e})),
                                  store.load_manifest(env.store, sid))
    pd.testing.assert_frame_equal(store.read_base_features(env.store, {"id": sid, "base": e}),
                                  store.load_features(env.store, sid, det))
    assert sorted(p.name for p in (env.store / "bases").iterdir()) == sorted(
        [f"{e['manifest']}.parquet", f"{e['pixels']}.npy", f"{e['features']['sha256']}.parquet"])  # no temp file
    # a writer whose pass visits other files than it was made for (the store moved) refuses
    whole, headers = store.lineage(env.store, sid)
    w = store.BaseWriter(env.store, whole[:-1], headers[:-1], 8)
    with pytest.raises(store.IntegrityError, match="store moved"):
        store.verify_files(env.store, sid, each_rows=w.rows, each_file=w.file, whole_rows=True)
    w.discard()
    assert not [p for p in (env.store / "bases").iterdir() if p.name.startswith(".write-")]
    # a data-gate file gone: finish refuses before it names any file, and leaves none
    shutil.rmtree(env.store / "bases")
    gone = env.store / "features" / f"{store.read_header(env.store, sid)['features']['sha256']}.parquet"
    gone.unlink()
    whole, headers = store.lineage(env.store, sid)
    w = store.BaseWriter(env.store, whole, headers)
    got, _ = store.verify_files(env.store, sid, each_rows=w.rows, each_file=w.file, whole_rows=True)
    with pytest.raises(store.DamagedStore, match="is missing"):
        w.finish(got, det)
    assert _base_files(env) == []


def _base_files(env) -> list[str]:
    folder = env.store / "bases"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_a_base_that_cannot_be_named_whole_leaves_no_file(env, monkeypatch, fails):
    """BaseWriter.finish syncs all its files before it names any, and takes back those it named
    when a later one fails: a full disk or a failed rename leaves nothing in bases/."""
    import errno

    env.run()
    save(env.src / "train" / "cat" / "b0.png", pixels(950))
    sid = env.run()["snapshot_id"]
    whole, headers = store.lineage(env.store, sid)
    w = store.BaseWriter(env.store, whole, headers)
    got, _ = store.verify_files(env.store, sid, each_rows=w.rows, each_file=w.file, whole_rows=True)
    real = getattr(os, fails)
    calls = []

    def second_fails(*a):
        calls.append(a)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a)

    monkeypatch.setattr(os, fails, second_fails)
    with pytest.raises(OSError):
        w.finish(got)
    assert len(calls) == 2 and _base_files(env) == []


def test_read_split_reads_only_its_rows_and_checks_each(env):
    """Issue 19 (stages read what they need): evaluate and inspect read the test split alone. A
    changed train row is not its business; a changed test row is refused, named."""
    sid = env.run()["snapshot_id"]
    man = store.read_manifest(env.store, sid)
    full = store.load_snapshot(env.store, sid)
    imgs, labels, ids, names = store.read_split(env.store, sid, "test")
    test = (man["split"] == "test").to_numpy()
    assert np.array_equal(imgs, full.images[test]) and ids == man.loc[test, "sample_id"].tolist()
    assert np.array_equal(labels, man.loc[test, "label"].to_numpy()) and names == full.class_names

    def flip(row) -> None:
        pack = env.store / "packs" / f"{row['pack']}.npy"
        pack.chmod(0o644)
        arr = np.load(pack)
        arr[int(row["pack_index"]), 0, 0, 0] ^= 0x01
        np.save(pack, arr)

    flip(man[man["split"] == "train"].iloc[1])
    assert np.array_equal(store.read_split(env.store, sid, "test")[0], imgs)
    row = man[man["split"] == "test"].iloc[2]
    flip(row)
    with pytest.raises(IntegrityError, match=row["sample_id"]):
        store.read_split(env.store, sid, "test")


def test_read_split_hands_the_whole_manifest_back_before_returning(env, monkeypatch):
    """read_split verifies the chain with the whole manifest, then keeps one split: the snapshot it
    loaded is gone when it trims the heap (glibc kept the freed manifest resident: +54-66 MiB after
    a test-split read of 101k rows, +11-14 with the trim, bench/read_split_memory.py)."""
    import gc
    import weakref

    sid = env.run()["snapshot_id"]
    loaded, alive_at_release = [], []
    real_load = store.load_snapshot

    def load(*a, **kw):
        snap = real_load(*a, **kw)
        loaded.append(weakref.ref(snap))
        return snap

    def release() -> bool:
        gc.collect()
        alive_at_release.append([r() is not None for r in loaded])
        return True

    monkeypatch.setattr(store, "load_snapshot", load)
    monkeypatch.setattr(store.heap, "release", release)
    imgs, labels, ids, names = store.read_split(env.store, sid, "test", lazy=True)
    assert len(ids) == len(labels) > 0 and names
    assert alive_at_release == [[False]], alive_at_release


def test_read_split_decodes_only_the_columns_it_uses_and_still_verifies_every_file(env, monkeypatch):
    """Issue 19 item 3: the manifest load is read_split's peak; it decodes the split, place and
    check columns, not the provenance and file columns (the read's peak about halved at 101k rows,
    bench/results/read_split_columns_100k.log). Every delta is still hashed whole: an edit to a
    column it does not decode is refused."""
    sid = env.run()["snapshot_id"]
    seen = []
    real_load = store.load_snapshot
    monkeypatch.setattr(store, "load_snapshot", lambda *a, **kw: seen.append(real_load(*a, **kw)) or seen[-1])
    imgs, labels, ids, names = store.read_split(env.store, sid, "test")
    assert sorted(seen[0].manifest.columns) == ["label", "pack", "pack_index", "sample_id", "sha256", "split"]
    man = store.read_manifest(env.store, sid)
    test = (man["split"] == "test").to_numpy()
    assert ids == man.loc[test, "sample_id"].tolist()
    # only the split's rows became pandas rows, with their place in the full manifest
    assert seen[0].manifest.index.tolist() == np.flatnonzero(test).tolist() and test.sum() < len(man)
    # rewrite the delta with another source_uri (a column read_split skips) under the same name
    h = store.read_header(env.store, sid)
    path = env.store / "deltas" / f"{h['delta']['sha256']}.parquet"
    t = store.read_delta(env.store, h).to_pandas()
    t.loc[0, "source_uri"] = "s3://elsewhere/x.png"
    path.chmod(0o644)
    path.write_bytes(store._parquet_bytes(t, store.DELTA_SCHEMA))
    with pytest.raises(store.DamagedStore, match="does not match its sha256"):
        store.read_split(env.store, sid, "test")


def test_a_history_that_ingests_a_row_twice_is_refused_by_a_split_read_too(env):
    """A forged child whose delta re-ingests a row of its parent (rehashed, so every file checks
    out) is refused by every load, a split's included, even when the twice-ingested row is not in
    the split read: the split's reader checks every row's sample id, not only those it keeps."""
    root = env.run()["snapshot_id"]
    h = store.read_header(env.store, root)
    man = store.read_manifest(env.store, root)
    row = man[man["split"] == "train"].iloc[0]
    delta = store.read_delta(env.store, h).to_pandas().iloc[[int(row.name)]]
    data = store.delta_bytes(delta)
    digest = store._sha256(data)
    (env.store / "deltas" / f"{digest}.parquet").write_bytes(data)
    child = {k: v for k, v in h.items() if k not in ("id", "features", "raw", "base")}
    child.update(parent=root, delta={"sha256": digest, "rows": 1}, n_new=1, n_rows=h["n_rows"] + 1)
    hb = store.header_bytes(child)
    (env.store / "snapshots" / f"{store._sha256(hb)}.json").write_bytes(hb)
    forged = store._sha256(hb)
    with pytest.raises(store.DamagedStore, match=f"ingests rows twice: .*{row['sample_id']}"):
        store.load_manifest(env.store, forged)
    for split in ("test", "train"):
        with pytest.raises(store.DamagedStore, match=f"ingests rows twice: .*{row['sample_id']}"):
            store.load_manifest(env.store, forged, split=split, columns=("split",))
    with pytest.raises(store.DamagedStore, match="ingests rows twice"):
        store.read_split(env.store, forged, "test")
    # a header that says its delta holds more rows than it does: the split's batched read counts them
    child.update(n_new=2, n_rows=h["n_rows"] + 2, delta={"sha256": digest, "rows": 2})
    hb = store.header_bytes(child)
    (env.store / "snapshots" / f"{store._sha256(hb)}.json").write_bytes(hb)
    with pytest.raises(store.DamagedStore, match="holds 1 rows, its header says 2"):
        store.read_split(env.store, store._sha256(hb), "test")
    # a new row without a label: refused by name, by a full load and a split's
    delta = delta.assign(sample_id="test/cat/forged.png", split="test", label=pd.array([None], dtype="Int64"))
    data = store.delta_bytes(delta)
    (env.store / "deltas" / f"{store._sha256(data)}.parquet").write_bytes(data)
    child.update(n_new=1, n_rows=h["n_rows"] + 1, delta={"sha256": store._sha256(data), "rows": 1})
    hb = store.header_bytes(child)
    (env.store / "snapshots" / f"{store._sha256(hb)}.json").write_bytes(hb)
    for split in (None, "test"):
        with pytest.raises(store.DamagedStore, match="1 row.s. without a label"):
            store.load_manifest(env.store, store._sha256(hb), split=split)


def test_a_split_load_still_checks_where_every_row_of_the_chain_points(env):
    """A split's load sees only its rows' pixel places, but the pack must hold every row of the
    chain: a forged (rehashed) history whose test rows point past the end of their pack is refused
    by a train-split load too, as by a full one. deep (every row re-hashed) and a split conflict."""
    root = env.run()["snapshot_id"]
    h = store.read_header(env.store, root)
    df = store.read_delta(env.store, h).to_pandas()
    df.loc[df["split"] == "test", "pack_index"] = 999
    data = store.delta_bytes(df)
    (env.store / "deltas" / f"{store._sha256(data)}.parquet").write_bytes(data)
    forged = {k: v for k, v in h.items() if k not in ("id", "features", "raw", "base")}
    forged["delta"] = {**h["delta"], "sha256": store._sha256(data)}
    hb = store.header_bytes(forged)
    (env.store / "snapshots" / f"{store._sha256(hb)}.json").write_bytes(hb)
    fid = store._sha256(hb)
    for split in (None, "train"):
        with pytest.raises(store.DamagedStore, match="not the rows the manifest expects"):
            store.load_snapshot(env.store, fid, lazy=True, split=split)
    with pytest.raises(ValueError, match="deep re-hashes every row"):
        store.load_snapshot(env.store, root, deep=True, split="train")


def test_packs_are_written_in_chunks_byte_for_byte_as_np_save(tmp_path):
    """Issue 19 item 3: a pack is streamed a chunk of rows at a time (numpy or lazy rows) and is
    byte-identical to ``np.save`` of the whole array, so its name (sha256) does not depend on how
    it was written."""
    import io

    from pipeline.data.rows import LazyRows, file_identity

    x = np.random.default_rng(0).integers(0, 256, (10, 5, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    want = hashlib.sha256(buf.getvalue()).hexdigest()
    raw = tmp_path / "rows.u8"
    raw.write_bytes(x[::-1].tobytes())
    lazy = LazyRows([(raw, 0, 10, file_identity(raw))], np.zeros(10, np.int32), np.arange(9, -1, -1), x.shape[1:])
    for images, chunk in ((x, 3), (lazy, 4), (x, 100)):
        digest = store._write_pack(tmp_path / "s", images, chunk=chunk)
        assert digest == want
        path = store._pack_path(tmp_path / "s", digest)
        assert path.read_bytes() == buf.getvalue() and np.array_equal(np.load(path), x)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_a_transformed_source_keeps_its_raw_bytes_and_they_derive_its_pixels_again(env, tmp_path):
    """Issue 19 item 5: with ``data.resize`` the store keeps every new file's bytes untouched next to
    the resized pixels (one raw pack per snapshot, named in the header); the bytes equal the
    source files', the recorded (versioned) transform applied to them gives the stored pixels
    row for row, ``export-raw`` writes them back out as a source that snapshots to the same rows
    without the original, and a damaged raw pack is caught by verify and by the reader."""
    save(env.src / "train" / "dog" / "big.png", pixels(3, size=20))
    save(env.src / "train" / "cat" / "wide.jpg", pixels(4, size=30)[:, :12], fmt="JPEG")
    first = env.run(resize=[8, 8])
    sid = first["snapshot_id"]
    header = json.loads((env.store / "snapshots" / f"{sid}.json").read_text())
    assert header["raw"]["rows"] == first["n_rows"] == 20
    man = store.read_manifest(env.store, sid)
    raw = dict(store.read_raw(env.store, sid))
    assert list(raw) == man["sample_id"].tolist()
    assert all(data == (env.src / i).read_bytes() for i, data in raw.items())
    t = header["source"]["transform"]
    assert t["version"] == sources.Resize.VERSION
    resize = sources.Resize(*t["size"], t["mode"])
    assert [sample_hash(resize.apply(sources.decode_image(raw[i]))) for i in man["sample_id"]] == man["sha256"].tolist()

    save(env.src / "test" / "dog" / "new.png", pixels(5, size=11))
    grown = env.run(resize=[8, 8])
    gh = json.loads((env.store / "snapshots" / f"{grown['snapshot_id']}.json").read_text())
    assert gh["raw"]["rows"] == grown["n_new"] == 1  # an append keeps only its own files
    assert [i for i, _ in store.read_raw(env.store, grown["snapshot_id"])][-1] == "test/dog/new.png"

    out = tmp_path / "exported"
    assert store.main(["export-raw", "--store", str(env.store), "--snapshot", grown["snapshot_id"], "--out", str(out)]) == 0
    again = snapshot.snapshot(env.cfg(path=str(out), resize=[8, 8]), str(tmp_path / "s2"), str(tmp_path / "p2.json"),
                              str(tmp_path / "r2.json"), progress=None)
    m2 = store.read_manifest(tmp_path / "s2", again["snapshot_id"])
    m1 = store.read_manifest(env.store, grown["snapshot_id"])
    assert dict(zip(m2["sample_id"], m2["sha256"])) == dict(zip(m1["sample_id"], m1["sha256"]))
    assert store.main(["export-raw", "--store", str(env.store), "--snapshot", sid, "--out", str(out)]) == 2  # no overwrite

    small = make_folder(tmp_path / "small")
    untransformed = snapshot.snapshot(env.cfg(path=str(small)), str(env.store), str(tmp_path / "p4.json"),
                                      str(tmp_path / "r4.json"), progress=None)
    assert "raw" not in json.loads((env.store / "snapshots" / f"{untransformed['snapshot_id']}.json").read_text())

    pack = env.store / "raw" / f"{header['raw']['sha256']}.bin"
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 1
    pack.write_bytes(bytes(data))
    ok, _, _ = store.verify_store(env.store)
    assert not ok
    with pytest.raises(store.DamagedStore, match=r"raw/.*do not hash to its recorded file_sha256"):
        list(store.read_raw(env.store, sid))


def test_stages_use_the_system_allocator_for_arrow():
    # pipeline/__init__.py picks Arrow's pool before pyarrow is imported (memory at 1M rows, issue 19
    # item 3); an explicit ARROW_DEFAULT_MEMORY_POOL still wins
    code = "import pipeline.snapshot, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "system"
    env["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() != "system"


def test_a_manifest_row_without_a_pack_index_is_refused(tmp_path):
    """A delta whose pack_index is null (a forged, self-consistent file): Arrow's min/max skip
    nulls, so the range check alone would pass it and a reader would index with garbage."""
    t = pa.table({"label": pa.array([0, 1], pa.int64()), "pack": pa.array(["p", "p"]),
                  "pack_index": pa.array([0, None], pa.int64())})
    with pytest.raises(store.DamagedStore, match="1 row.s. without a pack index"):
        store._check_rows_refer(tmp_path, tmp_path / "d.parquet", t, ["a", "b"], ["p"])
    store._check_rows_refer(tmp_path, tmp_path / "d.parquet", t.drop_columns(["pack_index"]), ["a", "b"], ["p"])
