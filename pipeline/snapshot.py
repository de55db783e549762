"""Stage `snapshot`: source -> hash-chained, append-only store + pointer + report.

    python -m pipeline.snapshot --params params.yaml --store data/store \
        --pointer data/snapshot.json --report reports/snapshot.json \
        [--stat-cache data/.snapshot-stat] [--verify]

The stage runs on every ``dvc repro`` (``always_changed``: it sees a source change however the
params were set) and is cheap when nothing changed. In order:

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
import json
import os
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from pipeline import stage
from pipeline.data import sources, stats, store
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
STAT_SCHEMA = pa.schema([("sample_id", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                         ("file_sha256", pa.string()), ("sha256", pa.string())])
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
    # The store is verified before the (long) read, so a damaged store fails fast and is never
    # mistaken for a changed source.
    vstats = store.VerifyStats()
    parent_id = store.current_snapshot(store_dir, key)
    parent = store.load_parent(store_dir, parent_id, stats_out=vstats) if parent_id else None
    # the load's freed buffers were what data.heap_map_mib returns to the OS; the phases after it
    # would only pay for mapping each block afresh (pipeline.stage.relax_heap)
    stage.relax_heap()
    _check_pointer(Path(pointer_path), store_dir, key, parent)
    t_verify = time.perf_counter()

    known = KnownRows.empty()
    if parent is not None:
        m = parent.manifest
        known = KnownRows(m["sample_id"], m["sha256"], m["file_sha256"])  # Arrow columns, not objects
    stat_path = Path(stat_cache) / f"{key}.arrow" if stat_cache else None
    stat = read_stat_cache(stat_path)
    scan_ns = time.time_ns()
    spill = Path(store_dir) / SPILL_DIR
    sources.clear_spill(spill)
    read = sources.read_source(cfg, known=known, stat=stat, previous=parent.meta["source"] if parent else None,
                               verify=verify_source, progress=progress, spill_dir=spill)
    old_scan_ns = stat.scan_ns if stat is not None else 0
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
            base = None
            if store.base_due(parent):  # a base keeps loads from reading the whole history (issue 19 item 4)
                say(f"consolidating {len(parent.manifest)} rows of {parent.id[:12]} into a base "
                    f"({parent.since_base} snapshots since the last one)")
                base = store.write_base(store_dir, parent, stats.detector_settings(detector) if detector is not None else None)
            sid, manifest = store.write_snapshot(store_dir, plan, source_meta, now, features=features, base=base)
            if base is not None and store.read_header(store_dir, sid).get("base") == base:
                store.prune_base(store_dir, parent.base, base)  # not when a crash leftover was adopted instead
            say(f"new snapshot {sid[:12]}: {len(manifest)} rows, {plan.n_new} new"
                + (f" (parent {plan.parent[:12]})" if plan.parent else ""))
        if stat_path is not None and read.stat is not None:
            write_stat_cache(stat_path, read.stat, scan_ns, old_scan_ns, read.stat_changed)
        t_write = time.perf_counter()
    finally:
        read.discard()  # the spilled pixels: in the pack now, or not needed
        try:
            spill.rmdir()  # when empty: the store holds only what its snapshots name
        except OSError:
            pass
    source_work = dict(read.work)
    del read, plan, parent  # the report needs the new manifest only (memory at 1M rows, issue 19 item 3)

    meta = store.read_meta(store_dir, sid)
    class_names = list(meta["class_names"])
    pointer = {
        "snapshot_id": sid,
        "parent": meta["parent"],
        "store": store_dir,
        "manifest": str(store.header_path(store_dir, sid)),
        "source_key": key,
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
        "provenance": stats.provenance(manifest),
        "duplicates": stats.duplicates(manifest, class_names),
        "verify_source": bool(verify_source or cfg.verify_source),
        "seconds": {
            "verify": round(t_verify - t0, 3),
            "read": round(t_read - t_verify, 3),
            "plan": round(t_plan - t_read, 3),
            "features": round(t_features - t_plan, 3),
            "write": round(t_write - t_features, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
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


def _check_pointer(path: Path, store_dir: str, key: str, parent: Optional[store.Parent]) -> None:
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
    if parent is not None and sid in parent.history:
        return
    heads = Path(store_dir) / "heads" / key
    if parent is None:
        what = f"holds no snapshot of lineage {key}, but {path} names {sid[:12]} as current: the history is gone"
        where: Path = Path(store_dir)
    else:
        what = (f"names snapshot {parent.id[:12]}, whose history does not contain {sid[:12]}, the current snapshot "
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
            t = pa.ipc.open_file(source).read_all()
        meta = t.schema.metadata or {}
        if meta.get(b"format") != STAT_FORMAT.encode() or t.schema.names != list(STAT_SCHEMA.names):
            return None
        return StatTable(t.column("sample_id"), t.column("sha256"), t.column("file_sha256"),
                         size=t.column("size").to_numpy().astype(np.int64),
                         mtime_ns=t.column("mtime_ns").to_numpy().astype(np.int64),
                         scan_ns=int(meta[b"scan_ns"]))
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None


def write_stat_cache(path: Path, table: StatTable, scan_ns: int, old_scan_ns: int, changed: bool) -> None:
    """Rewrite the cache only when it would vouch for something new: changed entries, or entries
    that were too fresh ("racy") under the old scan time and are not under the new one."""
    aged = (old_scan_ns < table.mtime_ns + sources.RACY_NS) & (table.mtime_ns + sources.RACY_NS <= scan_ns)
    if not changed and not aged.any():
        return
    arrow = pa.Table.from_arrays(
        [table.ids, pa.array(table.size, pa.int64()), pa.array(table.mtime_ns, pa.int64()), table.file_sha256,
         table.sha256],
        schema=STAT_SCHEMA.with_metadata({"format": STAT_FORMAT, "scan_ns": str(scan_ns)}))

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
