"""Stage `snapshot`: source -> hash-chained, append-only store + pointer + report.

    python -m pipeline.snapshot --params params.yaml --store data/store \
        --pointer data/snapshot.json --report reports/snapshot.json \
        [--stat-cache data/.snapshot-stat] [--verify]

The stage runs on every ``dvc repro`` (``always_changed``: it sees a source change however the
params were set) and is cheap when nothing changed. First the no-op that loads no manifest row
(:func:`fast_noop`, issue 19 item 3): when the stat cache was written for the current snapshot,
that snapshot's header carries the report's summary, and a folder source lists, file for file, as
the cache recorded (``sources.listing_unchanged``), the store's files are hashed
(``store.verify_files``), the pointer is checked against the chain, and the report comes from the
header; its memory does not grow with the rows. Then the append that loads no row of the parent
(:func:`fast_append`): under the same binding, when the source is the cached files as they were
plus new ones (``sources.listing_appended``), only the new files are read, the store is verified
as the no-op verifies it with its rows streamed past the new ones, and the snapshot is written as
the full read would write it (the same bytes and id; the summary and counts are the parent's
header's plus the new rows'). Anything else (and a source the listing would refuse: the store is
verified first, below), in order:

1. the current snapshot of this source lineage (``heads/<key>``) and its whole chain are verified
   (header ids, delta hashes, pack hashes) BEFORE anything is compared: a tampered store fails
   here as a damaged store (exit 1), naming the file and how to restore it; the pointer
   (``data/snapshot.json``) must name a snapshot in that chain, else the history was rewritten;
2. the source is read incrementally (``pipeline.data.sources.read_source``): only new files, and
   known files whose stat or bytes changed, are decoded; ``--verify`` (or ``data.verify_source``)
   decodes everything and compares pixels;
3. the rows are compared with the parent (``pipeline.data.store.plan_snapshot``, whose docstring
   has the rules). Outcomes:

- new rows: a new snapshot (pack, delta, header) is written, then ``heads/<key>``;
- no new rows: nothing is written to the store; the pointer and the report are rewritten only if
  their content differs (``seconds`` and ``work`` do not count), so DVC sees no change;
- an earlier row changed or vanished: exit 1, every offending row on stderr, nothing written;
- bad input (config, unreadable/odd images, layout): exit 2, nothing written.

The pointer and the report are written only on success; dvc.yaml keeps them (``persist``), so a
refused run leaves the last good pointer in place.

``--stat-cache`` names a folder for a machine-local cache of source file stats (size, mtime, byte
digest): it lets an unchanged file be trusted without a read. It is not part of the store (DVC
neither tracks nor backs it up); deleting it only costs one full read of the source's bytes.

Setting ``SOURCE_DATE_EPOCH`` fixes the ingest time (and so the snapshot id) for reproducible runs.
No torch here: the stage must start fast.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import stage
from pipeline.data import sources, stats, store
from pipeline.data.rows import as_strings
from pipeline.data.sources import KnownRows, StatTable
from pipeline.schema import Config, DataConfig, ValidateConfig

PATHS = (
    stage.PathArg("store", "store folder (data/store)"),
    stage.PathArg("pointer", "pointer file naming the current snapshot (data/snapshot.json)"),
    stage.PathArg("report", "report file (reports/snapshot.json)"),
    stage.PathArg("stat_cache", "folder of the local source-stat cache (none: every known file is re-read)",
                  required=False),
)
_say = partial(stage.say, "snapshot")
STAT_FORMAT = "poisongate-stat 2"
STAT_SCHEMA = sources.STAT_SCHEMA
# Rows of the stat cache a no-op compares at a time (CacheWindows: ~11 MiB of the file at 28x28 ids)
STAT_WINDOW_ROWS = 65536
# Decoded pixels wait here (in the store's file system, not /tmp, which may be RAM) between the
# decode and the pack: the stage's memory stays flat however many rows a snapshot adds.
SPILL_DIR = ".spill"
_VOLATILE = ("seconds", "work")  # report keys that do not make a report "changed"


def ingest_time() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def snapshot(cfg: DataConfig, store_dir: str, pointer_path: str, report_path: str,
             progress: Optional[Callable[[str], None]] = _say, *, verify_source: bool = False,
             stat_cache: Optional[str] = None, detector: Optional[ValidateConfig] = None) -> dict:
    """Snapshot the configured source; returns the report. Raises the project's errors.

    ``detector`` (``conf/validate``): the new rows' data-gate columns (``stats.row_features``) are
    computed while their pixels are in memory and stored with the snapshot, so the data gate reads
    columns instead of pixels (issue 19 item 2). None stores none (the gate computes them)."""
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    key = sources.source_key(cfg)
    vstats = store.VerifyStats()
    parent_id = store.current_snapshot(store_dir, key)
    stat_path = Path(stat_cache) / f"{key}.arrow" if stat_cache else None
    bound = bound_cache(store_dir, parent_id, stat_path) if parent_id else None
    noop = fast_noop(cfg, *bound, verify_source, progress) if bound is not None else None
    changed = noop.changed_ids if noop is not None else []  # files the full read must re-read
    distrust = False  # the cache does not describe the store's rows: the full read reads every file
    if noop is not None and noop.unchanged:
        # Nothing changed: the store's files are hashed (as a load would: a damaged store still
        # fails) and the report comes from the head's header; no manifest row is loaded.
        t_read = time.perf_counter()
        stored = store.RowPrint()
        whole, headers = store.verify_files(store_dir, parent_id, stats_out=vstats,
                                            each_rows=lambda b: stored.add(b.column("sample_id"), b.column("sha256")))
        distrust = not cache_describes(bound[1], stored, say)
    if noop is not None and noop.unchanged and not distrust:
        _check_pointer(Path(pointer_path), store_dir, key, parent_id, [h["id"] for h in whole])
        store.set_head(store_dir, key, parent_id)  # no-op unless heads/<key> was missing
        meta = headers[-1]
        say(f"source unchanged: {meta['n_rows']} rows, snapshot {parent_id[:12]} stays current "
            f"(every file as the stat cache recorded it)")
        seconds = {"verify": round(time.perf_counter() - t_read, 3), "read": round(t_read - t0, 3),
                   "plan": 0.0, "features": 0.0, "write": 0.0}
        return _finish(meta, None, cfg, verify_source, pointer_path, report_path, store_dir, seconds, t0, vstats,
                       {**noop.work, "noop_fast": 1})
    if bound is not None and noop is not None and "counted" in noop.work and not distrust:
        # Another number of files than rows: when more, an append, shown without loading the
        # parent's rows where it can be (fast_append)
        scan_ns = time.time_ns()  # before the listing: what the new cache's entries are racy against
        appended = fast_append(cfg, store_dir, *bound, stat_path, scan_ns, noop.work["counted"], pointer_path,
                               progress, detector)
        if appended is not None and appended.snapshot:
            appended.work["append_fast"] = 1
            return _finish(store.read_meta(store_dir, appended.snapshot), None, cfg, verify_source, pointer_path,
                           report_path, store_dir, appended.seconds, t0, appended.verified, appended.work)
        if appended is not None:
            changed, distrust = appended.changed_ids, appended.distrust
    # The store is verified before the (long) read, so a damaged store fails fast and is never
    # mistaken for a changed source.
    parent = store.load_parent(store_dir, parent_id, stats_out=vstats) if parent_id else None
    # the load's freed buffers were what data.heap_map_mib returns to the OS; the phases after it
    # would only pay for mapping each block afresh (pipeline.stage.relax_heap)
    stage.relax_heap()
    _check_pointer(Path(pointer_path), store_dir, key, parent.id if parent else None,
                   parent.history if parent else ())
    t_verify = time.perf_counter()

    known = KnownRows.empty()
    if parent is not None:
        m = parent.manifest
        known = KnownRows(m["sample_id"], m["sha256"], m["file_sha256"])  # Arrow columns, not objects
    stat = read_stat_cache(stat_path) if not distrust else None
    if stat is not None and changed:
        # the spot check read other bytes than the cache vouches for: the full read re-reads them
        say(f"{len(changed)} file(s) changed under the same size and mtime: {', '.join(changed[:5])}; "
            f"reading them again")
        stat = stat.without(changed)
    scan_ns = time.time_ns()
    spill = Path(store_dir) / SPILL_DIR
    sources.clear_spill(spill)
    # the listing the fast check made (a change it met): the read takes it instead of listing again
    handover = [noop.listing] if noop is not None and noop.listing is not None else None
    noop = None
    try:
        read = sources.read_source(cfg, known=known, stat=stat, previous=parent.meta["source"] if parent else None,
                                   verify=verify_source, progress=progress, spill_dir=spill, listing=handover)
    except BaseException:
        _remove_empty(spill)
        raise
    old_scan_ns = stat.scan_ns if stat is not None else 0
    old_bound = stat.snapshot if stat is not None else ""
    del known, stat  # the parent's columns and the old cache: read.stat is the new one (memory, issue 19 item 3)
    try:
        t_read = time.perf_counter()
        now = ingest_time()
        if read.unchanged and parent is not None:
            plan = store.Plan(parent.id, parent.manifest, np.zeros((0, *parent.meta["image_shape"]), np.uint8),
                              list(parent.meta["class_names"]), tuple(parent.meta["image_shape"]))
        else:
            plan = store.plan_snapshot(parent, read.sample_ids, read.hashes, read.labels, read.class_names, read.splits,
                                       read.uris, read.images, now, decoded=read.decoded, file_sizes=read.file_sizes,
                                       file_sha256=read.file_sha256, raw=read.raw)
        t_plan = time.perf_counter()
        manifest = plan.manifest
        t_features = t_plan
        if plan.unchanged:
            sid = parent_id
            store.set_head(store_dir, key, sid)  # no-op unless heads/<key> was missing
            say(f"source unchanged: {len(plan.manifest)} rows, snapshot {sid[:12]} stays current")
        else:
            source_meta = {**read.spec, "key": key}
            features = None
            if detector is not None:
                say(f"measuring {plan.n_new} new rows for the data gate (perceptual hash, block scan)")
                features = (stats.row_features(plan.new_images, detector), stats.detector_settings(detector))
            t_features = time.perf_counter()
            base, created = None, []
            if store.base_due(parent):  # a base keeps loads from reading the whole history (issue 19 item 4)
                say(f"consolidating {len(parent.manifest)} rows of {parent.id[:12]} into a base "
                    f"({parent.since_base} snapshots since the last one)")
                base = store.write_base(store_dir, parent, stats.detector_settings(detector) if detector is not None else None,
                                        created=created)
            sid, manifest = _with_base(store_dir, lambda: store.write_snapshot(
                store_dir, plan, source_meta, now, features=features, base=base, summarize=summary),
                base, created, parent.base if parent is not None else None)
            say(f"new snapshot {sid[:12]}: {len(manifest)} rows, {plan.n_new} new"
                + (f" (parent {plan.parent[:12]})" if plan.parent else ""))
        if stat_path is not None and read.stat is not None:
            write_stat_cache(stat_path, read.stat, scan_ns, old_scan_ns, read.stat_changed or old_bound != sid, sid)
        t_write = time.perf_counter()
    finally:
        read.discard()  # the spilled pixels: in the pack now, or not needed
        _remove_empty(spill)
    source_work = dict(read.work)
    del read, plan, parent  # the report needs the new manifest only (memory at 1M rows, issue 19 item 3)
    seconds = {"verify": round(t_verify - t0, 3), "read": round(t_read - t_verify, 3), "plan": round(t_plan - t_read, 3),
               "features": round(t_features - t_plan, 3), "write": round(t_write - t_features, 3)}
    return _finish(store.read_meta(store_dir, sid), manifest, cfg, verify_source, pointer_path, report_path,
                   store_dir, seconds, t0, vstats, source_work)


def bound_cache(store_dir: str, head: str, stat_path: Optional[Path]) -> Optional[tuple[dict, "CacheWindows"]]:
    """``(head's header, the stat cache)`` when the cache was written for ``head`` and the header
    carries the summary: what :func:`fast_noop` and :func:`fast_append` need to show their case
    without loading a row. None otherwise (no cache, one bound to another snapshot, a head written
    before headers carried a summary): the full read decides then."""
    if stat_path is None:
        return None
    meta = store.read_meta(store_dir, head)
    if "summary" not in meta:
        return None
    cache = open_stat_cache(stat_path)
    if cache is None or cache.snapshot != head:
        return None
    return meta, cache


def cache_describes(cache: "CacheWindows", stored: store.RowPrint, say: Callable[[str], None]) -> bool:
    """Whether the stat cache's (file, row hash) pairs are the store's rows (``stored``: their
    print, taken as the store was verified): a cache vouches for which files hold which rows, and
    one forged to name an unstored file where a stored one was would otherwise hide that file's
    loss from the fast paths (the trust-boundaries rule: what a gate trusts is bound to what made
    it). When not, says so: the caller reads every file, trusting no entry of it."""
    cached = stored.twin()
    for window in cache.batches():
        cached.add(window.column("sample_id"), window.column("sha256"))
    if cached == stored:
        return True
    say(f"the stat cache does not describe snapshot {cache.snapshot[:12]}'s rows ({cached.n} entries for "
        f"{stored.n} rows, or other files or hashes): it was edited or written by another tool; reading every file")
    return False


def fast_noop(cfg: DataConfig, meta: dict, cache: "CacheWindows", verify_source: bool,
              progress: Optional[Callable[[str], None]] = None) -> Optional[sources.NoopCheck]:
    """Whether the source is, file for file, what the stat cache recorded when the head (``meta``,
    the cache bound to it: :func:`bound_cache`) was made current (``sources.listing_unchanged``),
    so the run is a no-op that loads no manifest row: its memory does not grow with the rows
    (issue 19 item 3). None when the listing refuses the source: the full read decides then, as it
    does whenever this says "not unchanged"."""
    try:
        return sources.listing_unchanged(cfg, cache, cache.scan_ns, int(meta["n_rows"]), verify=verify_source,
                                         progress=progress)
    except sources.SourceError:
        # the full read refuses it too, after verifying the store: a damaged store is reported first
        return None


@dataclass
class Appended:
    """What :func:`fast_append` did: the snapshot it wrote ("" when it left the append to the full
    read), or the files the spot check found changed (the full read must re-read them)."""

    snapshot: str = ""
    history: tuple[str, ...] = ()
    changed_ids: list[str] = field(default_factory=list)
    work: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    verified: store.VerifyStats = field(default_factory=store.VerifyStats)
    distrust: bool = False  # the cache does not describe the store's rows (cache_describes)


def fast_append(cfg: DataConfig, store_dir: str, meta: dict, cache: "CacheWindows", stat_path: Path, scan_ns: int,
                counted: int, pointer_path: str, progress: Optional[Callable[[str], None]] = None,
                detector: Optional[ValidateConfig] = None) -> Optional[Appended]:
    """An append that loads no row of the parent (issue 19 items 1 and 3): when the stat cache
    (``cache``, at ``stat_path``) was written for the head (``meta``: :func:`bound_cache`) and the
    source is the cached files as they were plus new ones (``sources.listing_appended``), only the
    new files are read; the store
    is verified as :func:`fast_noop` verifies it (``store.verify_files``), its rows streamed past
    the new ones (an id already there, or a duplicate group the report cannot be updated for,
    leaves the append to the full read); the new rows are planned and written as the full read
    would write them (``store.write_snapshot(prior=)``: the same delta, header and snapshot id, a
    test compares them), and the cache gets the new files' entries, bound to the new snapshot.
    None when that cannot be shown (the full read decides: the caller runs it, after any
    ``changed_ids``); its memory grows with the new rows and the stat cache, not with the store's
    manifest. A head whose child is due to carry a base (``store.base_due``) gets it from the same
    pass over the store's rows (``store.BaseWriter``), as the full read writes it."""
    head = meta["id"]
    whole, headers = store.lineage(store_dir, head)
    lite = store.Parent(head, store.empty_manifest(), meta, tuple(h["id"] for h in whole), len(headers),
                        store.base_of(headers))
    n_old = int(meta["n_rows"])
    t0 = time.perf_counter()
    try:
        chk = sources.listing_appended(cfg, cache, cache.scan_ns, n_old, list(meta["class_names"]),
                                       progress=progress, counted=counted)
    except sources.SourceError:
        return None  # the full read refuses it too, after verifying the store
    if not chk.appended:
        return Appended(changed_ids=chk.changed_ids) if chk.changed_ids else None
    say = progress or (lambda _m: None)
    out = Appended(history=lite.history)
    writer = None
    spill = Path(store_dir) / SPILL_DIR
    sources.clear_spill(spill)
    try:
        read = sources.read_source(cfg, previous=meta["source"], progress=progress, spill_dir=spill,
                                   listing=[chk.added])
    except sources.SourceError:
        _remove_empty(spill)
        return None  # refused by the full read too, once it has verified the store (a damaged store first)
    except BaseException:
        _remove_empty(spill)
        raise
    try:
        t_read = time.perf_counter()
        new_ids, new_sha = as_strings(read.sample_ids), as_strings(read.hashes)
        hashes = pc.unique(new_sha)
        clash: list[str] = []
        matches: list[pa.RecordBatch] = []
        # 8 bytes a stored id: store.verify_files leaves "no id twice" to the loads of rows, and an
        # append must not build on a history the full read refuses (Python's str hash is keyed per
        # process: a collision cannot be aimed at, and only sends the run to the full read)
        prints = [np.fromiter(map(hash, new_ids.to_pylist()), np.int64, len(new_ids))]

        if store.base_due(lite):  # a base keeps loads from reading the whole history (issue 19 item 4)
            say(f"consolidating {n_old} rows of {head[:12]} into a base ({lite.since_base} snapshots since the "
                f"last one), from the pass that verifies them")
            writer = store.BaseWriter(store_dir, whole, headers)

        stored = store.RowPrint()

        def each(batch: pa.RecordBatch) -> None:  # the store's rows, streamed past the new ones
            if writer is not None:
                writer.rows(batch)
                batch = batch.select(["sample_id", "sha256", "label", "split"])
            ids = batch.column("sample_id")
            stored.add(ids, batch.column("sha256"))
            prints.append(np.fromiter(map(hash, ids.to_pylist()), np.int64, len(ids)))
            hit = pc.is_in(ids, value_set=new_ids)
            if pc.any(hit).as_py():
                clash.extend(ids.filter(hit).to_pylist()[:5])
            same = pc.is_in(batch.column("sha256"), value_set=hashes)
            if pc.any(same).as_py():
                matches.append(batch.filter(same))

        whole2, _ = store.verify_files(store_dir, head, stats_out=out.verified, each_rows=each,
                                       each_file=writer.file if writer is not None else None,
                                       whole_rows=writer is not None)
        t_verify = time.perf_counter()
        if not cache_describes(cache, stored, say):
            return Appended(distrust=True)
        if clash:
            say(f"{len(clash)}+ new file id(s) already in snapshot {head[:12]} ({', '.join(clash)}): "
                f"the full read judges the source")
            return None
        seen = np.sort(np.concatenate(prints))
        del prints
        if bool((seen[1:] == seen[:-1]).any()):
            say(f"an id may be stored twice in snapshot {head[:12]}: the full read checks the store")
            return None
        del seen
        if [h["id"] for h in whole2] != list(lite.history):
            return None  # the store moved under the run
        _check_pointer(Path(pointer_path), store_dir, sources.source_key(cfg), head, lite.history)
        now = ingest_time()
        plan = store.plan_snapshot(lite, read.sample_ids, read.hashes, read.labels, read.class_names, read.splits,
                                   read.uris, read.images, now, decoded=read.decoded, file_sizes=read.file_sizes,
                                   file_sha256=read.file_sha256, raw=read.raw)
        t_plan = time.perf_counter()
        before = meta["summary"]
        dup = grown_duplicates(before["duplicates"], n_old + plan.n_new,
                               _matched_rows(matches), plan.manifest, plan.class_names)
        old_full = _full_rows(before["provenance"])
        if dup is None or old_full is None:
            say("the head's summary (duplicate groups, provenance) cannot be grown from the new rows alone: "
                "the full read makes it")
            return None
        features = None
        if detector is not None:
            say(f"measuring {plan.n_new} new rows for the data gate (perceptual hash, block scan)")
            features = (stats.row_features(plan.new_images, detector), stats.detector_settings(detector))
        t_features = time.perf_counter()

        def summarize(rows, _names: list) -> dict:  # the new rows (their snapshot id a stand-in of its form)
            return {"provenance": grown_provenance(before["provenance"], old_full, stats.provenance(rows)),
                    "duplicates": dup}

        base = None
        if writer is not None:
            base = writer.finish(whole2, stats.detector_settings(detector) if detector is not None else None)
        source_meta = {**read.spec, "key": sources.source_key(cfg)}
        sid, _ = _with_base(store_dir, lambda: store.write_snapshot(
            store_dir, plan, source_meta, now, features=features, summarize=summarize, prior=meta, base=base),
            base, writer.created if writer is not None else [], lite.base)
        say(f"new snapshot {sid[:12]}: {n_old + plan.n_new} rows, {plan.n_new} new (parent {head[:12]}; "
            f"no earlier row loaded)")
        _grow_stat_cache(stat_path, cache, chk.new_at, read, scan_ns, sid)
        out.snapshot = sid
        out.work = {**read.work, **{k: v for k, v in chk.work.items() if k != "counted"}}
        out.seconds = {"verify": round(t_verify - t_read, 3), "read": round(t_read - t0, 3),
                       "plan": round(t_plan - t_verify, 3), "features": round(t_features - t_plan, 3),
                       "write": round(time.perf_counter() - t_features, 3)}
        return out
    finally:
        if writer is not None:
            writer.discard()  # a base not finished (the append left to the full read): its temp files
        read.discard()
        _remove_empty(spill)


def _with_base(store_dir: str, write: Callable[[], tuple], base: Optional[dict], created: list[Path],
               old_base: Optional[dict]) -> tuple:
    """``write()`` (the store.write_snapshot naming ``base``, or None). The base files this run put
    in bases/ (``created``) go when it fails: no header names them; the older base goes once the
    new snapshot names this one (not when a crash leftover was adopted instead)."""
    try:
        out = write()
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    if base is not None and store.read_header(store_dir, out[0]).get("base") == base:
        store.prune_base(store_dir, old_base, base)
    return out


def _remove_empty(folder: Path) -> None:
    """Remove the spill folder when empty: the store holds only what its snapshots name."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _matched_rows(batches: list[pa.RecordBatch]) -> pd.DataFrame:
    """The store's rows that share a pixel hash with a new row, in row order."""
    cols = ["sample_id", "sha256", "label", "split"]
    if not batches:
        return pd.DataFrame({c: pd.Series([], dtype=np.int64 if c == "label" else object) for c in cols})
    t = pa.Table.from_batches(batches)
    return pd.DataFrame({c: t.column(c).to_pylist() for c in cols})


def _full_rows(prov: dict) -> Optional[int]:
    """The rows with full provenance a report's coverage was computed from (it stores the share),
    None when no count gives that share exactly."""
    n = int(prov["rows"])
    if not n:
        return 0
    full = round(float(prov["coverage"]) * n)
    return full if float(full / n) == float(prov["coverage"]) else None


def grown_provenance(before: dict, before_full: int, new: dict) -> dict:
    """``stats.provenance`` of a snapshot's rows plus new ones, from each part's (every count is per row)."""
    n = int(before["rows"]) + int(new["rows"])
    full = before_full + round(float(new["coverage"]) * int(new["rows"]))
    return {"coverage": float(full / n) if n else 0.0, "rows": n,
            **{k: int(before[k]) + int(new[k]) for k in ("with_source_uri", "with_sha256", "with_ingest_record")}}


def grown_duplicates(before: dict, n_rows: int, old: pd.DataFrame, new: pd.DataFrame, class_names: list,
                     cap: int = stats.MAX_DUPLICATE_GROUPS) -> Optional[dict]:
    """``stats.duplicates`` of a snapshot grown by ``new`` rows, from its report ``before`` and
    ``old``: every earlier row whose hash a new row has (a group without a new row is unchanged).
    None when the listed groups cannot be told: ``before`` was capped and listed a group the new
    rows join (an unlisted group might then move up into the list)."""
    cols = ["sample_id", "sha256", "label", "split"]
    both = pd.concat([old[cols], new[cols].astype({"split": object})], ignore_index=True)
    was = stats.duplicates(old, class_names, cap=len(old))  # the touched hashes' groups before
    now = stats.duplicates(both, class_names, cap=len(both))  # and after
    touched = {g["sha256"] for g in was["groups"]}
    if before["capped"] and any(g["sha256"] in touched for g in before["groups"]):
        return None
    groups = [g for g in before["groups"] if g["sha256"] not in touched] + now["groups"]
    groups.sort(key=lambda g: (not g["cross_label"], not g["cross_split"], -g["n"], g["sha256"]))
    counts = {k: int(before[k]) - int(was[k]) + int(now[k])
              for k in ("n_groups", "n_duplicate_rows", "n_cross_label_groups", "n_cross_split_groups")}
    return {"n_groups": counts["n_groups"], "n_duplicate_rows": counts["n_duplicate_rows"],
            "rate": counts["n_duplicate_rows"] / n_rows if n_rows else 0.0,
            "n_cross_label_groups": counts["n_cross_label_groups"],
            "n_cross_split_groups": counts["n_cross_split_groups"],
            "groups": groups[:cap], "capped": counts["n_groups"] > cap}


class _CacheMoved(Exception):
    """The stat cache was replaced while a run read it a window at a time."""


def _grow_stat_cache(path: Path, cache: "CacheWindows", new_at: np.ndarray, read: sources.SourceRead,
                     scan_ns: int, snapshot_id: str) -> None:
    """The stat cache with the new files' entries put where they are listed (``new_at``), bound
    to the new snapshot, written a window of the old cache at a time: the cache is never whole in
    memory (a record batch a window; :func:`read_stat_cache` gathers them). Left as it is (bound
    to the parent: the next run reads in full and rewrites it) when it was replaced since this
    run opened it."""
    new = read.stat
    if new is None or len(new.ids) != len(new_at):
        return
    k = len(new_at)
    before = np.asarray(new_at, np.int64) - np.arange(k)  # the cached files listed before each new one
    fresh = pa.Table.from_arrays([new.ids, pa.array(new.size, pa.int64()), pa.array(new.mtime_ns, pa.int64()),
                                  new.file_sha256, new.sha256], schema=STAT_SCHEMA)
    schema = STAT_SCHEMA.with_metadata({"format": STAT_FORMAT, "scan_ns": str(scan_ns), "snapshot": snapshot_id})
    n_old = sum(cache.batch_rows)

    def merged() -> Iterator[pa.RecordBatch]:
        c0 = 0
        for window in cache.batches():
            c1 = c0 + window.num_rows
            lo, hi = np.searchsorted(before, [c0, c1])
            if hi == lo:
                yield window
            else:  # the window's rows with the new files listed among them, in listing order
                at = (before[lo:hi] - c0) + np.arange(hi - lo)
                is_new = np.zeros(window.num_rows + hi - lo, bool)
                is_new[at] = True
                order = np.empty(len(is_new), np.int64)
                order[~is_new] = np.arange(window.num_rows)
                order[is_new] = window.num_rows + np.arange(hi - lo)
                both = pa.concat_tables([pa.Table.from_batches([window]).cast(STAT_SCHEMA), fresh.slice(lo, hi - lo)])
                yield from both.take(pa.array(order)).combine_chunks().to_batches()
            c0 = c1
        if c0 != n_old:
            raise _CacheMoved()
        lo = int(np.searchsorted(before, n_old))
        if lo < k:
            yield from fresh.slice(lo).to_batches()

    def write(fh) -> None:  # batches of about STAT_WINDOW_ROWS rows: appends do not split the file ever finer
        with pa.ipc.new_file(fh, schema) as w:
            held: list[pa.RecordBatch] = []
            for batch in itertools.chain(merged(), [None]):
                if batch is not None:
                    held.append(batch)
                if held and (batch is None or sum(b.num_rows for b in held) >= STAT_WINDOW_ROWS):
                    # one batch, unless a string column passes 2 GiB (Arrow then splits it): every one written
                    for one in (pa.Table.from_batches(held).combine_chunks().to_batches() if len(held) > 1 else held):
                        w.write_batch(pa.RecordBatch.from_arrays(one.columns, schema=schema))
                    held = []

    try:
        store.write_file_with(path, write)
    except _CacheMoved:
        pass


def summary(manifest, class_names: list) -> dict:
    """What the report says of the whole snapshot: its provenance coverage and exact duplicates
    (stored in the header of every snapshot this stage writes, ``store.write_snapshot``)."""
    return {"provenance": stats.provenance(manifest), "duplicates": stats.duplicates(manifest, class_names)}


def _finish(meta: dict, manifest, cfg: DataConfig, verify_source: bool, pointer_path: str, report_path: str,
            store_dir: str, seconds: dict, t0: float, vstats: store.VerifyStats, source_work: dict) -> dict:
    """Write the pointer and the report of snapshot ``meta`` (its header); returns the report.
    The whole snapshot's provenance and duplicates come from its header (written with it), else
    (a header from before they were) from ``manifest``."""
    sid = meta["id"]
    class_names = list(meta["class_names"])
    summary_ = meta.get("summary") or summary(manifest, class_names)
    pointer = {
        "snapshot_id": sid,
        "parent": meta["parent"],
        "store": store_dir,
        "manifest": str(store.header_path(store_dir, sid)),
        "source_key": meta["source"]["key"],
        "n_rows": int(meta["n_rows"]),
        "n_new": int(meta["n_new"]),
        "class_names": class_names,
        "image_shape": meta["image_shape"],
    }
    report = {
        "snapshot_id": sid,
        "parent": meta["parent"],
        "source": meta["source"],
        "n_rows": int(meta["n_rows"]),
        "n_new": int(meta["n_new"]),
        "class_names": class_names,
        "image_shape": meta["image_shape"],
        "counts": meta["counts"],
        "provenance": summary_["provenance"],
        "duplicates": summary_["duplicates"],
        "verify_source": bool(verify_source or cfg.verify_source),
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 3)},
        "work": {
            "store_snapshots_verified": vstats.snapshots,
            "store_packs_hashed": vstats.packs,
            "store_bytes_hashed": vstats.bytes_hashed,
            **{f"source_{k}": int(v) for k, v in sorted(source_work.items())},
        },
    }
    store.write_if_changed(Path(pointer_path), _json(pointer))
    _write_report(Path(report_path), report)
    return report


def _check_pointer(path: Path, store_dir: str, key: str, parent: Optional[str], history: Sequence[str]) -> None:
    """The pointer names the last snapshot this stage made current; for the same lineage it must
    be in the history of ``heads/<key>``. If it is not, heads was moved back or the history was
    rewritten (a forged chain can be self-consistent; it cannot contain the id recorded before)."""
    try:
        ptr = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no pointer yet (or a broken one): it is about to be rewritten
    if not isinstance(ptr, dict) or ptr.get("source_key") != key or not isinstance(ptr.get("snapshot_id"), str):
        return
    sid = ptr["snapshot_id"]
    if parent is not None and sid in history:
        return
    heads = Path(store_dir) / "heads" / key
    if parent is None:
        what = f"holds no snapshot of lineage {key}, but {path} names {sid[:12]} as current: the history is gone"
        where: Path = Path(store_dir)
    else:
        what = (f"names snapshot {parent[:12]}, whose history does not contain {sid[:12]}, the current snapshot "
                f"named by {path}: the history was rewritten or heads/{key} was moved")
        where = heads
    raise store.DamagedStore(store_dir, where, what + f" (to start a new history on purpose, delete {path} too)")


# ----------------------------------------------------------------------------- local stat cache


def read_stat_cache(path: Optional[Path]) -> Optional[StatTable]:
    """The local stat cache (an Arrow IPC file: read without parsing); None when absent or
    unreadable: it is only a cache, a missing one costs one read of every known file's bytes."""
    if path is None or not path.is_file():
        return None
    try:
        with pa.OSFile(str(path)) as source:  # read into memory: nothing stays mapped to a file that may be replaced
            reader = pa.ipc.open_file(source)
            meta = reader.schema.metadata or {}
            if meta.get(b"format") != STAT_FORMAT.encode() or not reader.schema.remove_metadata().equals(STAT_SCHEMA):
                return None
            t = reader.read_all() if reader.num_record_batches <= 1 else _gathered(path, meta)
        if t is None:
            return None
        return StatTable(t.column("sample_id"), t.column("sha256"), t.column("file_sha256"),
                         size=t.column("size").to_numpy().astype(np.int64),
                         mtime_ns=t.column("mtime_ns").to_numpy().astype(np.int64),
                         scan_ns=int(meta[b"scan_ns"]), snapshot=meta.get(b"snapshot", b"").decode())
    except (OSError, ValueError, KeyError, UnicodeDecodeError, pa.ArrowException):
        return None


def _gathered(path: Path, meta: dict) -> Optional[pa.Table]:
    """A cache written in many batches (:func:`_grow_stat_cache`) as one contiguous batch, a
    column at a time, each from a fresh memory map of the file (closed before the next): the
    process holds the columns gathered so far plus one column's pages of the file. A read of
    every batch at once held the file and the copy together (+174 MiB at 1M rows); Arrow has no
    concatenation that frees its inputs as it goes, hence this."""
    cols = []
    for name in STAT_SCHEMA.names:
        with pa.memory_map(str(path)) as src:
            reader = pa.ipc.open_file(src)
            if (reader.schema.metadata or {}) != meta:
                return None  # replaced since: its first reader decides again
            parts = [reader.get_batch(i).column(name) for i in range(reader.num_record_batches)]
            cols.append(pa.concat_arrays(parts))
            del parts, reader
    return pa.Table.from_arrays(cols, schema=STAT_SCHEMA)


@dataclass(frozen=True)
class CacheWindows:
    """The stat cache's rows read a window at a time (:func:`open_stat_cache`)."""

    path: Path
    batch_rows: tuple[int, ...]  # rows of each record batch of the file
    scan_ns: int
    snapshot: str

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self.batches()

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Its rows in order, ``STAT_WINDOW_ROWS`` at a time, each window sliced from a fresh
        memory map of the file, so the pages a window touched leave the process with it. Not
        batches read in turn: the cache is one batch (the full read's ``read_stat_cache`` takes
        it without a copy; a cache of many batches made it copy every string column, +174 MiB at
        1M rows), and reading a batch reads it whole. A window that cannot be read ends the
        stream: the caller then sees fewer rows than files, and so does a file replaced since it
        was opened (its binding or scan time differ). This stage replaces the cache by rename, so
        a mapped window never sees its file truncated."""
        for i, rows in enumerate(self.batch_rows):
            for s in range(0, rows, STAT_WINDOW_ROWS):
                try:
                    with pa.memory_map(str(self.path)) as src:  # closed: the window's buffers keep its map
                        reader = pa.ipc.open_file(src)
                        meta = reader.schema.metadata or {}
                        if (meta.get(b"snapshot", b"").decode() != self.snapshot
                                or int(meta.get(b"scan_ns", b"-1")) != self.scan_ns):
                            return  # replaced since it was opened (another run): not the rows vouched for
                        window = reader.get_batch(i).slice(s, STAT_WINDOW_ROWS)
                except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException):
                    return
                yield window


def open_stat_cache(path: Optional[Path]) -> Optional[CacheWindows]:
    """The stat cache for a read a window at a time (its footer and metadata read, no row); None
    when absent or unreadable, as :func:`read_stat_cache`."""
    if path is None or not path.is_file():
        return None
    try:
        with pa.memory_map(str(path)) as src:
            reader = pa.ipc.open_file(src)
            meta = reader.schema.metadata or {}
            if meta.get(b"format") != STAT_FORMAT.encode() or not reader.schema.remove_metadata().equals(STAT_SCHEMA):
                return None
            rows = tuple(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        return CacheWindows(path, rows, int(meta[b"scan_ns"]), meta.get(b"snapshot", b"").decode())
    except (OSError, ValueError, KeyError, UnicodeDecodeError, pa.ArrowException):
        return None


def write_stat_cache(path: Path, table: StatTable, scan_ns: int, old_scan_ns: int, changed: bool,
                     snapshot: str = "") -> None:
    """Rewrite the cache only when it would vouch for something new: changed entries, entries
    that were too fresh ("racy") under the old scan time and are not under the new one, or a new
    ``snapshot`` (the one this run made current, whose rows the cache's hashes are: what lets the
    next run show a no-op without loading it, :func:`fast_noop`; the caller passes ``changed`` then)."""
    aged = (old_scan_ns < table.mtime_ns + sources.RACY_NS) & (table.mtime_ns + sources.RACY_NS <= scan_ns)
    if not changed and not aged.any():
        return
    arrow = pa.Table.from_arrays(
        [table.ids, pa.array(table.size, pa.int64()), pa.array(table.mtime_ns, pa.int64()), table.file_sha256,
         table.sha256],
        schema=STAT_SCHEMA.with_metadata({"format": STAT_FORMAT, "scan_ns": str(scan_ns), "snapshot": snapshot}))

    def write(fh) -> None:  # streamed to the file: a 1M-row cache is ~170 MB, never held as bytes
        with pa.ipc.new_file(fh, arrow.schema) as w:
            w.write_table(arrow)

    store.write_file_with(path, write)


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _write_report(path: Path, report: dict) -> None:
    """Keep an existing report whose content differs only in timings and work counters (DVC then
    sees no change)."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and {k: v for k, v in old.items() if k not in _VOLATILE} == {
                k: v for k, v in report.items() if k not in _VOLATILE}:
            return
    store.write_file(path, _json(report))


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--verify", action="store_true",
                    help="re-read and re-decode every source file and compare its pixels (as data.verify_source)")


def run(cfg: Config, args: argparse.Namespace) -> dict:
    stage.map_heap("snapshot", cfg.data.heap_map_mib)
    report = snapshot(cfg.data, args.store, args.pointer, args.report, verify_source=args.verify,
                      stat_cache=args.stat_cache, detector=cfg.validate)
    dup = report["duplicates"]
    _say(f"snapshot {report['snapshot_id'][:12]}: {report['n_rows']} rows, provenance coverage "
         f"{report['provenance']['coverage']:.3f}, {dup['n_groups']} duplicate group(s) "
         f"({dup['n_cross_label_groups']} across labels), {report['seconds']['total']:.1f} s")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("snapshot", run, PATHS, argv, __doc__, extra=_extra)


if __name__ == "__main__":
    raise SystemExit(main())
