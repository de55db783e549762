"""Fast tier: the snapshot stage's append that loads no row of the parent (issue 19 items 1, 3).

When the stat cache was written for the current snapshot and the source is the cached files as
they were plus new ones, only the new files are read, the store's rows are streamed past them,
and the snapshot written is the one the full read writes (``snapshot.fast_append``); anything
else falls back to the full read, which judges the change."""

from __future__ import annotations

import os
import random
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline import snapshot
from pipeline.data import sources, stats, store
from pipeline.data.store import SnapshotRefused
from pipeline.schema import ValidateConfig
from tests.test_snapshot_noop import no_manifest, stable
from tests.test_sources import pixels, save
from tests.test_store import Env, age, edited_under_same_stat, run_cached

KEPT = ("data", "reports", "stat")


@pytest.fixture
def env(tmp_path, monkeypatch) -> Env:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the same ingest time: fast and full give one id
    e = Env(tmp_path)
    age(e.src)
    return e


def add(env: Env, rel: str, seed: int = 0, like: str = "") -> None:
    """A new file (its pixels those of the file ``like`` when given), old enough to trust by stat."""
    path = env.src / rel
    if like:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(env.src / like, path)
    else:
        save(path, pixels(seed))
    age(path)


def both_ways(env: Env, detector: ValidateConfig | None = None, fast_only: bool = True, **kw) -> tuple[dict, dict]:
    """The next run as the stage runs it, then, from the same state, by the full read alone; each
    run's report, the cache it left and its snapshot's files. ``detector``: the data-gate columns
    computed at ingest, as the stage computes them. ``fast_only``: the stage's run must load no
    manifest (False: it may fall back to the full read)."""
    keep = env.tmp / "kept"
    for d in KEPT:
        shutil.copytree(env.tmp / d, keep / d)
    runs = []
    for fast in (True, False):
        if not fast:
            for d in KEPT:
                shutil.rmtree(env.tmp / d)
                shutil.copytree(keep / d, env.tmp / d)
        with pytest.MonkeyPatch.context() as m:
            if fast and fast_only:
                no_manifest(m)  # the append must not load a row
            else:
                m.setattr(snapshot, "fast_append", lambda *a, **k: None)
            rep = snapshot.snapshot(env.cfg(**kw), str(env.store), str(env.pointer), str(env.report), progress=None,
                                    stat_cache=str(env.tmp / "stat"), detector=detector)
        cache = snapshot.read_stat_cache(next((env.tmp / "stat").iterdir()))
        batches = snapshot.open_stat_cache(next((env.tmp / "stat").iterdir())).batch_rows
        files = {p.relative_to(env.store).as_posix(): p.read_bytes() for p in env.store.rglob("*") if p.is_file()}
        runs.append({"report": rep, "cache": cache, "files": files, "pointer": env.pointer.read_bytes(),
                     "batches": batches})
    shutil.rmtree(keep)
    return runs[0], runs[1]


def same_cache(a: sources.StatTable, b: sources.StatTable) -> bool:
    return a.same_as(b) and a.snapshot == b.snapshot


@pytest.mark.parametrize("detector", [None, ValidateConfig()])
def test_append_loads_no_row_and_writes_what_the_full_read_writes(env, detector):
    first = run_cached(env, recheck_files=4)
    # new files before, between and after the cached ones, in train/ and test/; a copy of a cached
    # file under another class (a duplicate across labels) and two new files with one pixel hash
    add(env, "train/cat/0.png", 900)  # before the first cached file ("." sorts before "0")
    add(env, "train/cat/000.png", 901)
    add(env, "train/cat/01b.png", 902)
    add(env, "train/emu/zz.png", 903)
    add(env, "test/dog/05.png", 904)
    add(env, "train/dog/dup.png", like="train/cat/00.png")
    add(env, "test/emu/twin1.png", like="train/emu/zz.png")
    fast, full = both_ways(env, detector, recheck_files=4)
    assert fast["report"]["work"]["source_append_fast"] == 1 and "source_append_fast" not in full["report"]["work"]
    assert fast["report"]["work"]["source_read"] == 7 and fast["report"]["work"]["source_decoded"] == 7
    assert fast["report"]["snapshot_id"] == full["report"]["snapshot_id"] != first["snapshot_id"]
    assert stable(fast["report"]) == stable(full["report"])
    assert fast["files"] == full["files"]  # pack, delta, features, header, heads: byte for byte
    assert fast["pointer"] == full["pointer"]
    assert same_cache(fast["cache"], full["cache"]) and fast["cache"].snapshot == fast["report"]["snapshot_id"]
    dup = fast["report"]["duplicates"]
    assert dup["n_groups"] == 2 and dup["n_cross_label_groups"] == 1 and dup["n_cross_split_groups"] == 1
    # the cache it left is bound to the new snapshot: the next run is the fast no-op
    assert run_cached(env)["work"]["source_noop_fast"] == 1


@pytest.mark.parametrize("window", [65536, 5, 1])
def test_appends_in_a_row_stay_fast_and_match_the_full_read(env, monkeypatch, window):
    """Each append rewrites the cache a window at a time (``window`` rows: a batch each, new
    files among them); the next run reads it back whole (the full read) or a window at a time."""
    monkeypatch.setattr(snapshot, "STAT_WINDOW_ROWS", window)
    run_cached(env)
    for k in range(3):
        add(env, f"train/dog/0{k}a.png", 950 + k)  # between cached files
        add(env, f"test/emu/n{k}.png", 960 + k)  # after the last one
        fast, full = both_ways(env)
        assert fast["report"]["work"]["source_append_fast"] == 1
        assert fast["files"] == full["files"] and same_cache(fast["cache"], full["cache"])
        # a batch of a window's rows or more each (the last aside): appends do not split the file finer
        assert sum(fast["batches"]) == 20 + 2 * k and min(fast["batches"][:-1], default=window) >= window
        assert (len(fast["batches"]) > 1) == (window < 20 + 2 * k)
    assert fast["report"]["n_rows"] == 24
    add(env, "train/cat/last.png", 970)
    assert run_cached(env)["work"]["source_append_fast"] == 1
    assert run_cached(env)["work"]["source_noop_fast"] == 1  # the windows of a cache of many batches
    add(env, "train/cat/later.png", 971)
    assert run_cached(env)["work"]["source_append_fast"] == 1  # and the next append's


def test_a_cache_of_many_batches_replaced_while_gathered_is_not_read(env, monkeypatch):
    monkeypatch.setattr(snapshot, "STAT_WINDOW_ROWS", 4)
    run_cached(env)
    add(env, "train/cat/new.png", 940)
    run_cached(env)
    path = next((env.tmp / "stat").iterdir())
    whole = snapshot.read_stat_cache(path)
    assert len(snapshot.open_stat_cache(path).batch_rows) > 1 and len(whole.ids) == 19
    real = pa.memory_map
    calls = []

    def swapping(*a, **k):  # the cache rebound by another run between two columns
        calls.append(1)
        if len(calls) == 2:
            snapshot.write_stat_cache(path, whole, whole.scan_ns, 0, True, "f" * 64)
        return real(*a, **k)

    monkeypatch.setattr(pa, "memory_map", swapping)
    assert snapshot.read_stat_cache(path) is None


def test_what_is_not_an_append_falls_back_to_the_full_read(env):
    first = run_cached(env, recheck_files=0)
    # a new class folder: the full read adds the class
    add(env, "train/fox/00.png", 970)
    add(env, "test/fox/00.png", 971)
    rep = run_cached(env, recheck_files=0)
    assert "source_append_fast" not in rep["work"] and rep["class_names"][-1] == "fox" and rep["n_new"] == 2
    # a new file and a touched one (same bytes, new mtime): the full read confirms it by digest
    add(env, "train/cat/new.png", 972)
    p = env.src / "train" / "dog" / "01.png"
    p.write_bytes(p.read_bytes())
    age(p, 30)
    rep = run_cached(env, recheck_files=0)
    assert "source_append_fast" not in rep["work"] and rep["work"]["source_confirmed_by_digest"] == 1
    assert rep["n_new"] == 1
    # a new file and a racy one (written within RACY_NS of the scan)
    add(env, "train/cat/new2.png", 973)
    p = env.src / "test" / "cat" / "00.png"
    p.write_bytes(p.read_bytes())
    rep = run_cached(env, recheck_files=0)
    assert "source_append_fast" not in rep["work"] and rep["n_new"] == 1
    assert first["snapshot_id"] != rep["snapshot_id"]


@pytest.mark.parametrize("gone", ["train/emu/00.png", "test/emu/01.png"])
def test_a_vanished_file_beside_new_ones_is_refused(env, gone):
    """More files than rows, yet one cached file gone: the first of a folder, or the last of the
    last folder (the cache's rows then outlast the listing). The full read refuses it."""
    run_cached(env, recheck_files=0)
    add(env, "train/cat/new3.png", 974)
    add(env, "train/cat/new4.png", 976)
    (env.src / gone).unlink()
    with pytest.raises(SnapshotRefused, match=f"{gone}: vanished"):
        run_cached(env, recheck_files=0)


def test_a_cached_file_too_recent_to_trust_by_stat_is_read_by_the_full_read(env):
    """A file written just before the scan that cached it (within RACY_NS) may change again in
    the same clock tick: its cached stat does not vouch for it, however it lists now."""
    p = env.src / "train" / "dog" / "02.png"
    p.write_bytes(p.read_bytes())  # mtime now: the first run's scan is within RACY_NS of it
    run_cached(env, recheck_files=0)
    add(env, "train/cat/new.png", 975)
    rep = run_cached(env, recheck_files=0)
    assert "source_append_fast" not in rep["work"] and rep["n_new"] == 1


def test_an_edit_under_the_same_stat_is_caught_beside_an_append(env):
    edited_under_same_stat(env)
    add(env, "train/cat/new.png", 980)
    with pytest.raises(SnapshotRefused, match=r"train/emu/z.bmp: pixels changed"):
        run_cached(env, recheck_files=10_000)  # the spot check re-reads every cached file


def test_the_files_the_appends_spot_check_caught_are_read_again_by_the_full_read(env, monkeypatch):
    """The full read re-reads what the append's spot check caught, even when its own spot check
    (``data.recheck_files`` 0 here) would not have picked it."""
    edited_under_same_stat(env)
    add(env, "train/cat/new.png", 981)
    monkeypatch.setattr(sources, "_spot_rows", lambda n, recheck: np.arange(n))  # the append's: every file
    with pytest.raises(SnapshotRefused, match=r"train/emu/z.bmp: pixels changed"):
        run_cached(env, recheck_files=0)


@pytest.mark.parametrize("detector", [None, ValidateConfig()])
def test_an_append_due_a_base_writes_it_from_the_pass_over_the_store(env, monkeypatch, detector):
    """Every BASE_EVERY-th append carries a base (the parent's rows in one place). The append
    writes it from the pass that verifies the store (store.BaseWriter: no row loaded), byte for
    byte the base the full read writes, from the root and from an older base (then removed)."""
    monkeypatch.setattr(store, "BASE_EVERY", 2)
    monkeypatch.setattr(store, "BASE_GROUP_ROWS", 3)  # several row groups, cut across the deltas
    snapshot.snapshot(env.cfg(), str(env.store), str(env.pointer), str(env.report), progress=None,
                      stat_cache=str(env.tmp / "stat"), detector=detector)
    bases = []
    for k in range(4):
        add(env, f"train/cat/a{k}.png", 990 + k)
        add(env, f"test/dog/a{k}.png", 980 + k)
        fast, full = both_ways(env, detector)
        assert fast["report"]["work"]["source_append_fast"] == 1 and fast["files"] == full["files"]
        assert stable(fast["report"]) == stable(full["report"])
        h = store.read_meta(env.store, fast["report"]["snapshot_id"])
        bases.append(h.get("base"))
        if h.get("base"):
            assert (h["base"]["features"] is not None) == (detector is not None)
            assert h["base"]["of"] == h["parent"]
    assert [b is not None for b in bases] == [False, True, False, True]
    # the newest base stands for the rows before it; the older one is removed
    tip = store.read_meta(env.store, fast["report"]["snapshot_id"])
    assert [h["id"] for h in store.resolve(env.store, tip["id"])] == [tip["id"]]
    assert not (env.store / "bases" / f"{bases[1]['pixels']}.npy").exists()
    assert sorted(p.name for p in (env.store / "bases").iterdir()) == sorted(
        [f"{bases[3]['manifest']}.parquet", f"{bases[3]['pixels']}.npy"]
        + ([f"{bases[3]['features']['sha256']}.parquet"] if detector is not None else []))
    whole = store.chain(env.store, tip["id"])
    pd.testing.assert_frame_equal(store.load_manifest(env.store, tip["id"]),
                                  store.load_manifest(env.store, tip["id"], headers=whole))
    assert np.array_equal(store.load_snapshot(env.store, tip["id"]).images,
                          np.asarray(store.load_snapshot(env.store, tip["id"], lazy=True).images))


def test_an_append_whose_base_meets_a_changed_row_stops_and_leaves_no_base(env, monkeypatch):
    """A pack changed under its name before the append: the pass that writes the base hashes it
    whole first; refused as a damaged store, and no base file, temp file or snapshot is left."""
    monkeypatch.setattr(store, "BASE_EVERY", 1)
    first = run_cached(env)
    pack = next((env.store / "packs").iterdir())
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0xFF
    pack.write_bytes(bytes(data))
    add(env, "train/cat/new.png", 985)
    with pytest.raises(store.IntegrityError):
        run_cached(env)
    assert not (env.store / "bases").exists()
    assert store.current_snapshot(env.store, sources.source_key(env.cfg())) == first["snapshot_id"]


def test_the_append_re_hashes_every_row_it_copies_into_a_base(env, monkeypatch):
    """A pack rewritten after the pass hashed it whole (and before its rows are copied): the row
    re-hash refuses it; no base, no snapshot."""
    monkeypatch.setattr(store, "BASE_EVERY", 1)
    first = run_cached(env)
    add(env, "train/cat/new.png", 986)
    real = store.BaseWriter.file

    def rewrite_then_open(self, header, is_base):
        for p in header.get("packs", []):
            path = env.store / "packs" / f"{p}.npy"
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))
        return real(self, header, is_base)

    monkeypatch.setattr(store.BaseWriter, "file", rewrite_then_open)
    with pytest.raises(store.IntegrityError, match="do not hash"):
        run_cached(env)
    assert not (env.store / "bases").exists()
    assert store.current_snapshot(env.store, sources.source_key(env.cfg())) == first["snapshot_id"]


@pytest.mark.parametrize("fast", [True, False])
def test_a_base_whose_snapshot_is_not_written_is_removed(env, monkeypatch, fast):
    """The snapshot that was to name a new base fails to be written (a full disk): the base's
    files go too, on the append's path and on the full read's."""
    import errno

    monkeypatch.setattr(store, "BASE_EVERY", 1)
    first = run_cached(env)
    add(env, "train/cat/new.png", 987)
    if not fast:
        monkeypatch.setattr(snapshot, "fast_append", lambda *a, **k: None)
    wrote = []
    real = store.BaseWriter.finish

    def finish(self, *a, **k):
        wrote.append(real(self, *a, **k))
        return wrote[-1]

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.BaseWriter, "finish", finish)
    monkeypatch.setattr(store, "write_snapshot", full_disk)
    with pytest.raises(OSError):
        run_cached(env)
    assert len(wrote) == 1 and not [p for p in env.store.glob("bases/*")]
    assert store.current_snapshot(env.store, sources.source_key(env.cfg())) == first["snapshot_id"]


def test_a_cache_that_names_a_stored_file_new_is_caught_by_the_stored_ids(env):
    """A cache whose entry of a stored file was renamed to a new file's name: the walk then takes
    the stored file for new; the store's ids, streamed, show it is not, and the full read judges."""
    run_cached(env)
    add(env, "train/cat/zz.png", 995)
    path = next((env.tmp / "stat").iterdir())
    c = snapshot.read_stat_cache(path)
    ids = c.ids.to_pylist()
    i = ids.index("train/cat/03.png")
    ids[i] = "train/cat/zz.png"
    st = (env.src / "train" / "cat" / "zz.png").stat()
    size, mtime = c.size.copy(), c.mtime_ns.copy()
    size[i], mtime[i] = st.st_size, st.st_mtime_ns
    forged = sources.StatTable(ids, c.sha256, c.file_sha256, size=size, mtime_ns=mtime, scan_ns=c.scan_ns,
                               snapshot=c.snapshot)
    snapshot.write_stat_cache(path, forged, c.scan_ns, 0, True, c.snapshot)
    # no spot check: it would re-read zz.png and catch the forgery first
    fast, full = both_ways(env, fast_only=False, recheck_files=0)  # the fast attempt left nothing behind
    assert "source_append_fast" not in fast["report"]["work"] and fast["report"]["n_new"] == 1
    assert fast["files"] == full["files"] and stable(fast["report"]) == stable(full["report"])
    sid = fast["report"]["snapshot_id"]
    assert store.load_manifest(env.store, sid)["sample_id"].iloc[-1] == "train/cat/zz.png"


def test_an_id_stored_twice_is_left_to_the_full_read_which_refuses_it(env):
    """A child of the head, hash-consistent (written by the store's own writer), whose one row
    repeats a stored id, and the cache bound to it: the full read refuses the history; the append
    must not build on it."""
    run_cached(env)
    key = sources.source_key(env.cfg())
    head = store.current_snapshot(env.store, key)
    meta = store.read_meta(env.store, head)
    add(env, "train/cat/tmp.png", 21)  # a decoy listed file, so the cache's count is the forged head's rows
    rd = sources.read_source(env.cfg())
    j = rd.sample_ids.to_pylist().index("train/cat/tmp.png")
    lite = store.Parent(head, store.empty_manifest(), meta, (head,), 1)
    plan = store.plan_snapshot(lite, ["train/cat/00.png"], [rd.hashes[j].as_py()], np.array([0]),
                               ["cat", "dog", "emu"], np.array(["train"]), ["x::train/cat/00.png"],
                               rd.images[j:j + 1], "2023-01-01T00:00:00.000Z")
    forged, _ = store.write_snapshot(env.store, plan, {**rd.spec, "key": key}, "2023-01-01T00:00:00.000Z",
                                     prior=meta, summarize=lambda m, n: meta["summary"])
    # bound to the forged head, scanned now (the files are old enough to trust by stat)
    snapshot.write_stat_cache(next((env.tmp / "stat").iterdir()), rd.stat, time.time_ns(), 0, True, forged)
    add(env, "train/cat/zz.png", 22)
    add(env, "train/cat/zy.png", 23)
    before = sorted(p.name for p in env.store.rglob("*"))
    with pytest.raises(store.DamagedStore, match="twice"):
        run_cached(env, recheck_files=0)
    assert sorted(p.name for p in env.store.rglob("*")) == before


def test_a_new_row_joining_a_stored_duplicate_group(env):
    shutil.copy(env.src / "train/cat/00.png", env.src / "train/dog/d1.png")
    age(env.src)
    run_cached(env)
    add(env, "test/emu/d2.png", like="train/cat/00.png")  # the group grows, across labels and splits
    add(env, "train/emu/d3.png", like="train/cat/01.png")  # a stored row's first duplicate
    fast, full = both_ways(env)
    assert fast["report"]["work"]["source_append_fast"] == 1 and fast["files"] == full["files"]
    dup = fast["report"]["duplicates"]
    assert stable(fast["report"]) == stable(full["report"])
    assert [g["n"] for g in dup["groups"]] == [3, 2] and dup["n_cross_split_groups"] == 1


def test_a_capped_duplicate_list_the_new_rows_join_is_left_to_the_full_read(env):
    """More duplicate groups than the report lists: a new row joining a listed group might let an
    unlisted one move up, which the header cannot tell; one joining none is still appended."""
    for k in range(stats.MAX_DUPLICATE_GROUPS + 2):
        save(env.src / "train" / "cat" / f"g{k:03d}a.png", pixels(5000 + k))
        shutil.copy(env.src / "train" / "cat" / f"g{k:03d}a.png", env.src / "train" / "cat" / f"g{k:03d}b.png")
    age(env.src)
    first = run_cached(env)
    assert first["duplicates"]["capped"]
    listed = first["duplicates"]["groups"][0]["sample_ids"][0]
    add(env, "train/dog/join.png", like=listed)
    fast, full = both_ways(env, fast_only=False)
    assert "source_append_fast" not in fast["report"]["work"] and fast["files"] == full["files"]
    add(env, "train/dog/alone.png", 5999)
    fast, full = both_ways(env)
    assert fast["report"]["work"]["source_append_fast"] == 1 and fast["files"] == full["files"]


def test_a_damaged_or_moving_manifest_and_a_failing_callback(env):
    """store.verify_files(each_rows=): a callback's own error comes out as it is (not as a damaged
    store); a manifest written to while it is verified is refused."""
    first = run_cached(env)
    sid = first["snapshot_id"]

    def fails(batch):
        try:
            raise KeyError("why")
        except KeyError as why:
            raise MemoryError("the caller's") from why

    with pytest.raises(MemoryError, match="the caller's") as caught:
        store.verify_files(env.store, sid, each_rows=fails)
    assert isinstance(caught.value.__cause__, KeyError)  # as raised: its cause kept
    delta = env.store / "deltas" / f"{store.read_meta(env.store, sid)['delta']['sha256']}.parquet"

    def touches(batch):
        os.utime(delta)  # the inode changes (ctime, mtime) after its bytes were hashed

    with pytest.raises(store.DamagedStore, match="written to while it was verified"):
        store.verify_files(env.store, sid, each_rows=touches)


def test_a_cache_with_other_column_types_is_not_read(env):
    run_cached(env)
    path = next((env.tmp / "stat").iterdir())
    c = snapshot.read_stat_cache(path)
    t = pa.table({"sample_id": pa.array(range(len(c.ids)), pa.int64()), "size": c.size, "mtime_ns": c.mtime_ns,
                  "file_sha256": c.file_sha256, "sha256": c.sha256},
                 metadata={"format": snapshot.STAT_FORMAT, "scan_ns": str(c.scan_ns), "snapshot": c.snapshot})
    with pa.OSFile(str(path), "wb") as fh, pa.ipc.new_file(fh, t.schema) as w:
        w.write_table(t)
    assert snapshot.read_stat_cache(path) is None and snapshot.open_stat_cache(path) is None
    add(env, "train/cat/new.png", 997)
    assert run_cached(env)["n_new"] == 1  # the full read, with no cache


def test_an_error_reading_the_new_files_leaves_no_spill_folder(env, monkeypatch):
    """Not a source error (the full read would then run): the fast path's own clean-up."""
    run_cached(env)
    add(env, "train/cat/new.png", 32)

    def fails(*a, spill_dir=None, **k):
        spill_dir.mkdir(parents=True, exist_ok=True)
        raise MemoryError("while decoding")

    monkeypatch.setattr(sources, "read_source", fails)
    with pytest.raises(MemoryError, match="while decoding"):
        run_cached(env, recheck_files=0)
    assert not (env.store / snapshot.SPILL_DIR).exists()


def test_a_new_file_that_does_not_decode_leaves_no_spill_folder(env):
    run_cached(env)
    add(env, "train/cat/000.png", 31)
    (env.src / "train/cat/zzz.png").write_bytes(b"not an image")
    age(env.src / "train/cat/zzz.png")
    with pytest.raises(sources.SourceError):
        run_cached(env, recheck_files=0)
    assert not (env.store / snapshot.SPILL_DIR).exists()


def test_a_damaged_store_fails_the_append(env):
    run_cached(env)
    add(env, "train/cat/new.png", 996)
    pack = next((env.store / "packs").iterdir())
    pack.chmod(0o644)
    data = bytearray(pack.read_bytes())
    data[-1] ^= 1
    pack.write_bytes(bytes(data))
    with pytest.raises(store.DamagedStore, match="does not match its sha256"):
        run_cached(env)
    assert not (env.store / snapshot.SPILL_DIR).exists()


# ----------------------------------------------------------------------------- the report's summary


def frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["sample_id", "sha256", "label", "split"])


@pytest.mark.parametrize("seed", range(40))
def test_grown_duplicates_is_what_the_whole_gives(seed):
    rng = random.Random(seed)
    names = ["a", "b", "c"]
    n_old, n_new = rng.randint(1, 40), rng.randint(1, 15)
    pool = [f"{k:064x}" for k in range(rng.randint(3, 40))]  # few hashes: many groups
    rows = [(f"s{i:03d}", rng.choice(pool), rng.randrange(3), rng.choice(["train", "test"]))
            for i in range(n_old + n_new)]
    old, new = frame(rows[:n_old]), frame(rows[n_old:])
    cap = rng.choice([1, 2, 3, 50])
    before = stats.duplicates(old, names, cap=cap)
    matched = old[old["sha256"].isin(set(new["sha256"]))]
    got = snapshot.grown_duplicates(before, n_old + n_new, matched, new, names, cap=cap)
    whole = stats.duplicates(frame(rows), names, cap=cap)
    touched = set(matched["sha256"][matched["sha256"].duplicated(keep=False)])
    if before["capped"] and any(g["sha256"] in touched for g in before["groups"]):
        assert got is None
    else:
        assert got == whole


def test_grown_provenance_is_what_the_whole_gives():
    rows = pd.DataFrame({"snapshot_id": ["a" * 64] * 5 + ["b" * 64] * 3, "source_uri": ["u", "", "u", "u", None, "u", "u", ""],
                         "sha256": ["f" * 64] * 7 + ["x"], "ingest_time": ["t"] * 8})
    old, new = rows.iloc[:5], rows.iloc[5:]
    before = stats.provenance(old)
    full = snapshot._full_rows(before)
    assert full == 3
    assert snapshot.grown_provenance(before, full, stats.provenance(new)) == stats.provenance(rows)
    assert snapshot._full_rows({**before, "coverage": 0.123456}) is None  # no count of 5 rows gives it


def test_listing_appended_marks_the_new_files_where_they_are_listed(env):
    run_cached(env)
    cache = snapshot.open_stat_cache(next((env.tmp / "stat").iterdir()))
    add(env, "train/cat/000.png", 1)
    add(env, "test/emu/99.png", 2)
    chk = sources.listing_appended(env.cfg(recheck_files=0), cache, cache.scan_ns, 18, ["cat", "dog", "emu"])
    assert chk.appended and chk.listed == 20
    assert chk.added.ids.to_pylist() == ["train/cat/000.png", "test/emu/99.png"]
    assert chk.new_at.tolist() == [1, 19]  # after train/cat/00.png ("." sorts before "0"); the last file
    assert [r[:2] for r in chk.added.runs] == [("train", "cat"), ("test", "emu")]
    # not an append: no new file, a class the snapshot lacks, more rows than files
    assert sources.listing_appended(env.cfg(), cache, cache.scan_ns, 20, ["cat", "dog", "emu"]).reason == \
        "20 files, the snapshot has 20 rows"
    assert "a class the snapshot does not have" in sources.listing_appended(
        env.cfg(), cache, cache.scan_ns, 18, ["cat", "dog"]).reason
    assert not sources.listing_appended(env.cfg(verify_source=True), cache, cache.scan_ns, 18, ["cat"]).appended
    np.testing.assert_array_equal(chk.added.sizes, [(env.src / r).stat().st_size
                                                    for r in ("train/cat/000.png", "test/emu/99.png")])
