"""Stage `snapshot`: source -> content-addressed, append-only store + pointer + report.

    python -m pipeline.snapshot --params params.yaml --store data/store \
        --pointer data/snapshot.json --report reports/snapshot.json

The source is decoded (``pipeline.sources``), every row hashed, and compared with the current
snapshot of the same source lineage (``pipeline.store``, whose docstring has the rules: one
lineage per source key, append-only, refusals). Outcomes:

- new rows: a new snapshot (pack + manifest + meta) is written, then ``heads/<key>`` and ``HEAD``;
- no new rows: nothing is written to the store; the pointer and the report are rewritten only if
  their content differs (the report's ``seconds`` do not count), so DVC sees no change;
- an earlier row changed or vanished: exit 1, every offending row on stderr, nothing written;
- bad input (config, unreadable/odd images, layout, damaged store): exit 2, nothing written.

Exit codes and error messages come from the one stage runner (``pipeline.stage``).

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

from pipeline import stage
from pipeline.core.hashing import sample_hashes
from pipeline.data import sources, stats, store
from pipeline.schema import Config, DataConfig

PATHS = (
    stage.PathArg("store", "store folder (data/store)"),
    stage.PathArg("pointer", "pointer file naming the current snapshot (data/snapshot.json)"),
    stage.PathArg("report", "report file (reports/snapshot.json)"),
)
_say = partial(stage.say, "snapshot")


def ingest_time() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def snapshot(cfg: DataConfig, store_dir: str, pointer_path: str, report_path: str,
             progress: Optional[Callable[[str], None]] = _say) -> dict:
    """Snapshot the configured source; returns the report. Raises the project's errors."""
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    key = sources.source_key(cfg)
    # The store is read before the (long) decode so a damaged store fails fast.
    parent_id = store.current_snapshot(store_dir, key)
    parent = store.load_parent(store_dir, parent_id) if parent_id else None
    src = sources.load_source(cfg, progress)
    t_decode = time.perf_counter()
    hashes = sample_hashes(src.images)
    t_hash = time.perf_counter()
    now = ingest_time()
    plan = store.plan_snapshot(parent, src.sample_ids, hashes, src.labels, src.class_names, src.splits,
                               src.uris, src.images, now)
    t_plan = time.perf_counter()
    source_meta = {**src.spec, "key": src.key}
    manifest = plan.manifest
    if plan.unchanged:
        sid = parent_id
        store.set_head(store_dir, key, sid)  # no-op unless another lineage was current
        say(f"source unchanged: {len(plan.manifest)} rows, snapshot {sid[:12]} stays current")
    else:
        sid, manifest = store.write_snapshot(store_dir, plan, source_meta, now)
        say(f"new snapshot {sid[:12]}: {len(plan.manifest)} rows, {plan.n_new} new"
            + (f" (parent {plan.parent[:12]})" if plan.parent else ""))
    t_write = time.perf_counter()

    meta = store.read_meta(store_dir, sid)
    class_names = list(meta["class_names"])
    pointer = {
        "snapshot_id": sid,
        "parent": meta["parent"],
        "store": store_dir,
        "manifest": f"{store_dir.rstrip('/')}/snapshots/{sid}.csv",
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
        "counts": stats.counts(manifest, class_names),
        "provenance": stats.provenance(manifest),
        "duplicates": stats.duplicates(manifest, class_names),
        "seconds": {
            "decode": round(t_decode - t0, 3),
            "hash": round(t_hash - t_decode, 3),
            "plan": round(t_plan - t_hash, 3),
            "write": round(t_write - t_plan, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    store.write_if_changed(Path(pointer_path), _json(pointer))
    _write_report(Path(report_path), report)
    return report


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _write_report(path: Path, report: dict) -> None:
    """Keep an existing report whose content differs only in timings (DVC then sees no change)."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != "seconds"} == {
                k: v for k, v in report.items() if k != "seconds"}:
            return
    store.atomic_write(path, _json(report))


def run(cfg: Config, args: argparse.Namespace) -> dict:
    report = snapshot(cfg.data, args.store, args.pointer, args.report)
    dup = report["duplicates"]
    _say(f"snapshot {report['snapshot_id'][:12]}: {report['n_rows']} rows, provenance coverage "
         f"{report['provenance']['coverage']:.3f}, {dup['n_groups']} duplicate group(s) "
         f"({dup['n_cross_label_groups']} across labels), {report['seconds']['total']:.1f} s")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("snapshot", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
