"""Fast tier: the snapshot stage's no-op that loads no manifest row (issue 19 item 3).

When the local stat cache was written for the current snapshot and the source lists, file for
file, as it recorded, the stage hashes the store's files and reports from the head's header
(``snapshot.fast_noop``); anything else falls back to the full read, which judges the change."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipeline import snapshot
from pipeline.data import sources, stats, store
from pipeline.data.rows import as_list
from pipeline.data.store import DamagedStore, SnapshotRefused
from tests.test_sources import pixels, save
from tests.test_store import Env, age, edited_under_same_stat, run_cached

VOLATILE = ("seconds", "work")


@pytest.fixture
def env(tmp_path) -> Env:
    e = Env(tmp_path)
    age(e.src)  # files written within sources.RACY_NS of a scan are re-read: not a no-op by design
    return e


def stable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in VOLATILE}


def no_manifest(monkeypatch) -> None:
    """Any manifest load fails the test: the fast no-op must not need one."""
    def boom(*a, **k):
        raise AssertionError("the no-op loaded a manifest")

    for name in ("load_parent", "load_manifest", "load_snapshot"):
        monkeypatch.setattr(store, name, boom)


def test_noop_loads_no_manifest_and_reports_what_the_full_read_does(env, monkeypatch):
    first = run_cached(env)
    with monkeypatch.context() as m:
        no_manifest(m)
        again = run_cached(env)
    assert again["work"]["source_noop_fast"] == 1 and again["snapshot_id"] == first["snapshot_id"]
    assert again["work"]["source_listed"] == 18 and again["work"]["source_rechecked"] == 18  # recheck_files 32 > 18
    assert again["work"]["store_packs_hashed"] == 1 and again["work"]["store_bytes_hashed"] > 0
    assert stable(again) == stable(first)
    # a full read without the cache reports the same snapshot the same way
    full = env.run()
    assert "source_noop_fast" not in full["work"] and stable(full) == stable(first)


def test_header_summary_is_what_the_final_manifest_gives(env):
    # a duplicate across labels, so the duplicates summary is not empty
    shutil.copy(env.src / "train" / "cat" / "00.png", env.src / "train" / "dog" / "zz.png")
    age(env.src)
    first = run_cached(env)
    save(env.src / "test" / "dog" / "new.png", pixels(4242))
    age(env.src)
    grown = run_cached(env)
    for rep in (first, grown):
        meta = store.read_meta(env.store, rep["snapshot_id"])
        man = store.load_manifest(env.store, rep["snapshot_id"])
        assert meta["summary"]["provenance"] == stats.provenance(man) == rep["provenance"]
        assert meta["summary"]["duplicates"] == stats.duplicates(man, meta["class_names"]) == rep["duplicates"]
        assert rep["duplicates"]["n_cross_label_groups"] == 1


def test_every_change_falls_back_to_the_full_read(env, monkeypatch):
    first = run_cached(env, recheck_files=0)
    # a new file: an append, judged by the full read
    save(env.src / "train" / "dog" / "new.png", pixels(777))
    age(env.src / "train" / "dog" / "new.png")
    grown = run_cached(env, recheck_files=0)
    assert grown["n_new"] == 1 and "source_noop_fast" not in grown["work"]
    assert run_cached(env, recheck_files=0)["work"]["source_noop_fast"] == 1  # the cache is bound to it now
    # a touched file (new mtime, same bytes): the full read confirms it by digest, then fast again
    os.utime(env.src / "train" / "cat" / "01.png", ns=(10**18, 10**18 - 5 * sources.RACY_NS))
    touched = run_cached(env, recheck_files=0)
    assert "source_noop_fast" not in touched["work"] and touched["work"]["source_confirmed_by_digest"] == 1
    assert touched["snapshot_id"] == grown["snapshot_id"]
    assert run_cached(env, recheck_files=0)["work"]["source_noop_fast"] == 1
    # a file too recent to trust by its stat (racy): re-read by the full read
    p = env.src / "test" / "cat" / "00.png"
    p.write_bytes(p.read_bytes())
    racy = run_cached(env, recheck_files=0)
    assert "source_noop_fast" not in racy["work"] and racy["snapshot_id"] == grown["snapshot_id"]
    # a vanished file: refused by the full read
    (env.src / "train" / "emu" / "00.png").unlink()
    with pytest.raises(SnapshotRefused, match="vanished"):
        run_cached(env, recheck_files=0)
    assert first["snapshot_id"] != grown["snapshot_id"]


def test_spot_check_catches_an_edit_under_the_same_stat(env):
    """An edit that keeps size and mtime passes a stat comparison by design (the documented gap);
    the spot check re-reads it, and the full read it falls back to refuses the changed pixels."""
    edited_under_same_stat(env)
    before = {p.name: p.read_bytes() for p in (env.tmp / "stat").iterdir()}
    assert run_cached(env, recheck_files=0)["work"]["source_noop_fast"] == 1  # no spot check: the gap
    with pytest.raises(SnapshotRefused, match=r"train/emu/z.bmp: pixels changed"):
        run_cached(env, recheck_files=10_000)
    assert {p.name: p.read_bytes() for p in (env.tmp / "stat").iterdir()} == before  # refused: cache untouched


def test_cache_bound_to_another_snapshot_or_none_is_not_trusted_for_the_noop(env):
    first = run_cached(env)
    path = next((env.tmp / "stat").iterdir())
    cache = snapshot.read_stat_cache(path)
    assert cache.snapshot == first["snapshot_id"]
    # the same rows, bound to another id (or none: a cache from before the binding)
    for bound in ("f" * 64, ""):
        snapshot.write_stat_cache(path, cache, cache.scan_ns, 0, True, bound)
        rep = run_cached(env)
        assert "source_noop_fast" not in rep["work"] and rep["snapshot_id"] == first["snapshot_id"]
        assert snapshot.read_stat_cache(path).snapshot == first["snapshot_id"]  # the full read binds it again
    assert run_cached(env)["work"]["source_noop_fast"] == 1


def test_a_damaged_store_still_fails_the_noop(env, monkeypatch):
    first = run_cached(env)
    no_manifest(monkeypatch)  # the fast no-op's own check (store.verify_files) must catch it
    pack = next((env.store / "packs").iterdir())
    pack.chmod(0o644)
    data = bytearray(pack.read_bytes())
    data[-1] ^= 1
    pack.write_bytes(bytes(data))
    with pytest.raises(DamagedStore, match="does not match its sha256"):
        run_cached(env)
    pack.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    assert run_cached(env)["snapshot_id"] == first["snapshot_id"]
    (env.store / "deltas" / f"{store.read_meta(env.store, first['snapshot_id'])['delta']['sha256']}.parquet").unlink()
    with pytest.raises(DamagedStore, match="is missing"):
        run_cached(env)


def test_a_moved_head_is_refused_by_the_noop_too(env, monkeypatch):
    first = run_cached(env)
    path = next((env.tmp / "stat").iterdir())
    kept = path.read_bytes()  # the cache bound to the first snapshot
    save(env.src / "train" / "dog" / "new.png", pixels(778))
    age(env.src / "train" / "dog" / "new.png")
    run_cached(env)
    # heads/<key> moved back to the first snapshot while the pointer names the second; the source
    # and the cache as they were then: a listing the fast no-op accepts
    key = json.loads(env.pointer.read_text())["source_key"]
    (env.store / "heads" / key).write_text(first["snapshot_id"])
    (env.src / "train" / "dog" / "new.png").unlink()
    path.write_bytes(kept)
    no_manifest(monkeypatch)
    with pytest.raises(DamagedStore, match="history does not contain"):
        run_cached(env)


def batches_of(cache: sources.StatTable, rows: int) -> list[pa.RecordBatch]:
    t = pa.table({"sample_id": cache.ids, "size": cache.size, "mtime_ns": cache.mtime_ns,
                  "file_sha256": cache.file_sha256})
    return t.to_batches(max_chunksize=rows)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_listing_comparison_across_batch_and_folder_bounds(env, rows):
    run_cached(env)
    cache = snapshot.read_stat_cache(next((env.tmp / "stat").iterdir()))
    cfg = env.cfg(recheck_files=0)
    ok = sources.listing_unchanged(cfg, batches_of(cache, rows), cache.scan_ns, 18)
    assert ok.unchanged and ok.work == {"listed": 18, "trusted": 18, "rechecked": 0}
    # counted before a file is stat-ed: an append (or a loss) costs the names only
    assert sources.listing_unchanged(cfg, batches_of(cache, rows), cache.scan_ns, 19).reason == \
        "18 files, the snapshot has 19 rows"
    fewer = sources.StatTable(cache.ids.slice(0, 17), cache.sha256.slice(0, 17), cache.file_sha256.slice(0, 17),
                              size=cache.size[:17], mtime_ns=cache.mtime_ns[:17])
    assert sources.listing_unchanged(cfg, batches_of(fewer, rows), cache.scan_ns, 18).reason == \
        "more files than cached rows"
    more = sources.StatTable(pa.concat_arrays([cache.ids, pa.array(["train/zz/0.png"])]),
                             pa.concat_arrays([cache.sha256, pa.array([""])]),
                             pa.concat_arrays([cache.file_sha256, pa.array([""])]),
                             size=np.append(cache.size, 1), mtime_ns=np.append(cache.mtime_ns, 1))
    assert sources.listing_unchanged(cfg, batches_of(more, rows), cache.scan_ns, 18).reason == \
        "fewer files than cached rows"
    bumped = cache.mtime_ns.copy()
    bumped[9] += 1
    other = sources.StatTable(cache.ids, cache.sha256, cache.file_sha256, size=cache.size, mtime_ns=bumped)
    assert "differs from the cache" in sources.listing_unchanged(cfg, batches_of(other, rows), cache.scan_ns, 18).reason
    # a scan too close to the files' mtimes: not trusted by stat
    assert "too recent" in sources.listing_unchanged(cfg, batches_of(cache, rows), int(cache.mtime_ns.max()), 18).reason
    for kw in ({"verify_source": True}, {"limit": 3}):
        assert not sources.listing_unchanged(env.cfg(**kw), batches_of(cache, rows), cache.scan_ns, 18).unchanged


def test_listing_comparison_refuses_what_the_full_read_refuses(env):
    run_cached(env)
    cache = snapshot.read_stat_cache(next((env.tmp / "stat").iterdir()))
    # a file replaced by a symlink (the count unchanged: the walk meets it)
    (env.src / "train" / "cat" / "00.png").unlink()
    os.symlink(env.src / "train" / "dog" / "00.png", env.src / "train" / "cat" / "00.png")
    with pytest.raises(sources.SourceError, match="symlink"):
        sources.listing_unchanged(env.cfg(), batches_of(cache, 4), cache.scan_ns, 18)
    with pytest.raises(sources.SourceError, match="symlink"):
        run_cached(env)


def test_stat_cache_is_read_in_windows(env, monkeypatch):
    run_cached(env)
    path = next((env.tmp / "stat").iterdir())
    c = snapshot.open_stat_cache(path)
    assert c.batch_rows == (18,)  # one batch, as read_stat_cache takes it without a copy
    assert [b.num_rows for b in c.batches()] == [18]
    monkeypatch.setattr(snapshot, "STAT_WINDOW_ROWS", 4)
    wins = list(c.batches())
    assert [b.num_rows for b in wins] == [4, 4, 4, 4, 2]
    whole = snapshot.read_stat_cache(path)
    assert pa.concat_arrays([b.column("sample_id") for b in wins]).equals(whole.ids)
    assert run_cached(env)["work"]["source_noop_fast"] == 1
    # replaced between windows (another run): the stream ends, the caller sees too few rows
    it = c.batches()
    first = next(it)
    snapshot.write_stat_cache(path, whole, whole.scan_ns + 1, 0, True, whole.snapshot)
    assert first.num_rows == 4 and list(it) == []
    path.write_bytes(b"not arrow")
    assert snapshot.open_stat_cache(path) is None and "source_noop_fast" not in run_cached(env)["work"]


@pytest.mark.parametrize("part", [1, 3, 4])
def test_a_folder_listed_in_parts_is_the_same_listing(env, monkeypatch, part):
    # the emu folder gets 7 files (4 + 3 extra): parts of 3 and 4 split it, part 1 splits every folder
    for i in range(3):
        save(env.src / "train" / "emu" / f"x{i}.png", pixels(900 + i))
    for split in ("train", "test"):
        (env.src / split / "emu2").mkdir()  # an empty class folder: one empty part, refused
    whole = sources._list_folder(env.src, str(env.src), 1 << 20)
    monkeypatch.setattr(sources, "WALK_PART", part)
    parts = sources._list_folder(env.src, str(env.src), 1 << 20)
    assert parts.ids == whole.ids and parts.runs == whole.runs and parts.dirs == whole.dirs
    assert np.array_equal(parts.sizes, whole.sizes) and np.array_equal(parts.mtimes, whole.mtimes)
    with pytest.raises(sources.SourceError, match="empty class folder"):
        run_cached(env)
    for split in ("train", "test"):
        (env.src / split / "emu2").rmdir()
    age(env.src)
    first = run_cached(env)
    again = run_cached(env)
    assert again["work"]["source_noop_fast"] == 1 and again["work"]["source_listed"] == 21
    assert stable(again) == stable(first)


def test_a_file_the_spot_check_caught_is_re_read_by_the_full_read(env, monkeypatch):
    """The fast check's draw holds the edited file, the full read's draw does not: only dropping
    the caught file from the cache makes the full read re-read it (and refuse the change)."""
    edited_under_same_stat(env)
    draws = []

    class Rigged:
        def sample(self, population, k):
            draws.append(k)
            return list(population)[:k] if len(draws) == 1 else []  # fast check: every file; full read: none

    monkeypatch.setattr(sources.random, "SystemRandom", Rigged)
    with pytest.raises(SnapshotRefused, match=r"train/emu/z.bmp: pixels changed"):
        run_cached(env, recheck_files=100)
    assert draws == [19, 18]  # the full read drew among 18 trusted files: the caught one was not


def test_empty_class_folders_are_refused_by_the_listing_as_by_the_full_read(env, monkeypatch):
    run_cached(env)
    for split in ("train", "test"):
        (env.src / split / "yak").mkdir()  # the file count is unchanged: the walk meets them
    cache = snapshot.open_stat_cache(next((env.tmp / "stat").iterdir()))
    with pytest.raises(sources.SourceError, match="empty class folder"):
        sources.listing_unchanged(env.cfg(), cache.batches(), cache.scan_ns, 18)
    with pytest.raises(sources.SourceError, match="empty class folder"):
        run_cached(env)  # the full read refuses it, after verifying the store


def test_a_refusal_after_a_damaged_store_reports_the_store_first(env):
    """The full read verifies the store before it reads the source; a source the fast check
    would refuse sends it there, so a damaged store is still the error reported."""
    run_cached(env)
    (env.src / "train" / "cat" / "00.png").unlink()
    os.symlink(env.src / "train" / "dog" / "00.png", env.src / "train" / "cat" / "00.png")
    pack = next((env.store / "packs").iterdir())
    pack.chmod(0o644)
    data = bytearray(pack.read_bytes())
    data[-1] ^= 1
    pack.write_bytes(bytes(data))
    with pytest.raises(DamagedStore):
        run_cached(env)


def test_a_head_written_before_headers_carried_a_summary(env, monkeypatch):
    first = run_cached(env)
    real = store.read_meta

    def old_header(store_dir, sid):
        return {k: v for k, v in real(store_dir, sid).items() if k != "summary"}

    monkeypatch.setattr(store, "read_meta", old_header)
    again = run_cached(env)  # the full read, whose report computes the summary from the manifest
    assert "source_noop_fast" not in again["work"] and stable(again) == stable(first)


def test_noop_restores_a_missing_head_ref(env, monkeypatch):
    first = run_cached(env)
    key = json.loads(env.pointer.read_text())["source_key"]
    (env.store / "heads" / key).unlink()
    no_manifest(monkeypatch)
    assert run_cached(env)["work"]["source_noop_fast"] == 1
    assert (env.store / "heads" / key).read_text().strip() == first["snapshot_id"]


def test_noop_over_a_base_hashes_the_base(env, monkeypatch):
    monkeypatch.setattr(store, "BASE_EVERY", 1)
    run_cached(env)
    for i in range(2):  # the second append carries a base of its parent
        save(env.src / "test" / "dog" / f"b{i}.png", pixels(600 + i))
        age(env.src / "test" / "dog" / f"b{i}.png")
        run_cached(env)
    pixels_files = list((env.store / "bases").glob("*.npy"))
    assert len(pixels_files) == 1
    with monkeypatch.context() as m:
        no_manifest(m)
        assert run_cached(env)["work"]["source_noop_fast"] == 1
        pixels_files[0].chmod(0o644)
        data = bytearray(pixels_files[0].read_bytes())
        data[-1] ^= 1
        pixels_files[0].write_bytes(bytes(data))
        with pytest.raises(DamagedStore, match="does not match its sha256"):
            run_cached(env)


def test_a_racy_entry_is_re_read_not_trusted(env):
    run_cached(env)
    p = env.src / "train" / "dog" / "fresh.png"
    save(p, pixels(31337))  # not back-dated: written within RACY_NS of the next scan
    grown = run_cached(env)
    assert grown["n_new"] == 1
    cache = snapshot.read_stat_cache(next((env.tmp / "stat").iterdir()))
    assert cache.snapshot == grown["snapshot_id"]
    ok = sources.listing_unchanged(env.cfg(recheck_files=0), snapshot.open_stat_cache(
        next((env.tmp / "stat").iterdir())).batches(), cache.scan_ns, 19)
    assert not ok.unchanged and "too recent" in ok.reason
    again = run_cached(env, recheck_files=0)
    assert "source_noop_fast" not in again["work"] and again["work"]["source_read"] >= 1


def same_listing(got, want) -> None:
    assert got is not None
    assert as_list(got.ids) == want.ids and got.runs == want.runs and got.dirs == want.dirs
    assert np.array_equal(got.sizes, want.sizes) and np.array_equal(got.mtimes, want.mtimes)


@pytest.mark.parametrize("part", [3, 16384])
@pytest.mark.parametrize("change", ["first", "last", "racy", "renamed"])
def test_a_change_the_count_misses_hands_its_listing_to_the_full_read(env, monkeypatch, part, change):
    """The walk that meets a change goes on and hands the tree's listing over (the rows before
    the change are the cache's): the full read does not list again, and judges as it would."""
    monkeypatch.setattr(sources, "WALK_PART", part)
    first = run_cached(env)
    files = sorted((env.src / "train").rglob("*.png")) + sorted((env.src / "test").rglob("*.png"))
    if change == "first":
        os.utime(files[0], ns=(10**18, 10**18))
    elif change == "last":
        os.utime(files[-1], ns=(10**18, 10**18))
    elif change == "racy":
        files[5].write_bytes(files[5].read_bytes())  # same bytes, a mtime within RACY_NS of now
    else:
        files[7].rename(files[7].with_name("zz-moved.png"))  # the count is unchanged
    path = next((env.tmp / "stat").iterdir())
    cache = snapshot.open_stat_cache(path)
    check = sources.listing_unchanged(env.cfg(), cache, cache.scan_ns, 18)
    assert not check.unchanged
    same_listing(check.listing, sources._list_folder(env.src, str(env.src), 1 << 26))
    listed = []
    real = sources._list_folder
    monkeypatch.setattr(sources, "_list_folder", lambda *a, **k: listed.append(1) or real(*a, **k))
    if change == "renamed":
        with pytest.raises(SnapshotRefused, match="vanished"):
            run_cached(env)
    else:
        rep = run_cached(env)
        assert "source_noop_fast" not in rep["work"] and rep["snapshot_id"] == first["snapshot_id"]
    assert listed == []  # the full read took the fast check's listing


def test_a_cache_shorter_than_the_tree_still_hands_a_listing(env):
    run_cached(env)
    cache = snapshot.read_stat_cache(next((env.tmp / "stat").iterdir()))
    fewer = sources.StatTable(cache.ids.slice(0, 17), cache.sha256.slice(0, 17), cache.file_sha256.slice(0, 17),
                              size=cache.size[:17], mtime_ns=cache.mtime_ns[:17])
    check = sources.listing_unchanged(env.cfg(), batches_of(fewer, 4), cache.scan_ns, 18)
    assert check.reason == "more files than cached rows"
    same_listing(check.listing, sources._list_folder(env.src, str(env.src), 1 << 26))
    # an iterator cannot be read again for the rows before the change: no listing, the full read lists
    once = sources.listing_unchanged(env.cfg(), iter(batches_of(fewer, 4)), cache.scan_ns, 18)
    assert once.reason == "more files than cached rows" and once.listing is None


def swap_in_cache(env: Env, gone: str, new: str, seed: int) -> None:
    """The source loses the stored file ``gone`` and gains ``new`` (sorting where ``gone`` did),
    and the stat cache is forged to list ``new`` in its place: every listed file then matches a
    cache entry, and the file count is unchanged."""
    path = next((env.tmp / "stat").iterdir())
    c = snapshot.read_stat_cache(path)
    (env.src / gone).unlink()
    save(env.src / new, pixels(seed))
    age(env.src / new)
    ids = c.ids.to_pylist()
    i = ids.index(gone)
    ids[i] = new
    st = (env.src / new).stat()
    size, mtime = c.size.copy(), c.mtime_ns.copy()
    size[i], mtime[i] = st.st_size, st.st_mtime_ns
    fsha = c.file_sha256.to_pylist()
    fsha[i] = store.file_sha256(env.src / new)
    forged = sources.StatTable(ids, c.sha256, fsha, size=size, mtime_ns=mtime, scan_ns=c.scan_ns, snapshot=c.snapshot)
    snapshot.write_stat_cache(path, forged, c.scan_ns, 0, True, c.snapshot)


@pytest.mark.parametrize("append", [False, True])
def test_a_cache_forged_to_hide_a_lost_file_is_caught_by_the_stores_rows(env, append):
    """The stat cache is bound to the store's rows, not only to the head's id: a cache forged to
    name an unstored file where a stored one was (the lost file then hidden from the no-op and
    from the append, whose listing matches it file for file) does not describe the store's rows,
    so the stage reads every file, trusting no entry, and refuses the lost row."""
    first = run_cached(env, recheck_files=0)
    swap_in_cache(env, "train/cat/02.png", "train/cat/02b.png", 930)
    if append:
        save(env.src / "train" / "dog" / "zz.png", pixels(931))
        age(env.src / "train" / "dog" / "zz.png")
    with pytest.raises(SnapshotRefused, match=r"train/cat/02\.png"):
        run_cached(env, recheck_files=0)
    assert store.current_snapshot(env.store, sources.source_key(env.cfg())) == first["snapshot_id"]


def test_a_cache_that_does_not_describe_the_store_is_not_trusted_then_rewritten(env):
    """A cache entry whose row hash is not the store's (edited, or written by another tool): the
    run trusts no entry of it (every file read, none taken on its stat), finds the source
    unchanged, and leaves an honest cache the next run's no-op takes."""
    first = run_cached(env, recheck_files=0)
    path = next((env.tmp / "stat").iterdir())
    c = snapshot.read_stat_cache(path)
    sha = c.sha256.to_pylist()
    sha[3] = "0" * 64
    snapshot.write_stat_cache(path, sources.StatTable(c.ids, sha, c.file_sha256, size=c.size, mtime_ns=c.mtime_ns,
                                                      scan_ns=c.scan_ns, snapshot=c.snapshot),
                              c.scan_ns, 0, True, c.snapshot)
    again = run_cached(env, recheck_files=0)
    assert again["snapshot_id"] == first["snapshot_id"] and "source_noop_fast" not in again["work"]
    assert again["work"].get("source_trusted", 0) == 0 and again["work"]["source_read"] == 18
    assert run_cached(env, recheck_files=0)["work"]["source_noop_fast"] == 1
