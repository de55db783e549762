"""Where a 1% append's seconds go (issue 19 item 1): the snapshot stage's functions timed in-process.

    python bench/append_profile.py SOURCE [--trials 3] [--keep DIR]

SOURCE: an ImageFolder source of N rows (``bench/scale.py --sources`` keeps them, e.g.
``src-100000-28x28x1``). A fresh workspace of this checkout (``scale.workspace``) takes a cold
snapshot (the stage's own process, timed as ``scale.py`` times it), then N/100 files are added and,
per trial, the store is put back to its cold state and the append runs in this process, with
``time.perf_counter`` around each function below (inclusive times; a nested one is inside its
caller's). The added files are removed at the end. Printed: one line per trial. Produced the
breakdown in docs/store.md ("Where a 1% append at 100k goes").
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

T0 = time.perf_counter()
import pipeline.snapshot as snap_stage  # noqa: E402  (timed: the stage's imports)
from pipeline import config  # noqa: E402
from pipeline.data import sources, stats, store  # noqa: E402

IMPORT_S = time.perf_counter() - T0
import bench.scale as S  # noqa: E402

TIMED = {sources: ("_list_folder", "_ingest", "read_source"),
         stats: ("perceptual_hashes", "block_flags_cfg", "row_features", "provenance", "duplicates"),
         store: ("load_parent", "load_manifest", "verify_packs", "plan_snapshot", "write_snapshot")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--keep", default=None, help="leave the workspace here (default: a temporary one, removed)")
    args = ap.parse_args()
    source = Path(args.source).resolve()
    n = sum(1 for _ in source.glob("*/*/*"))
    ws = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pg-append-")) / "ws"
    stages = S.workspace("HEAD", ws, source, [])
    cold = S.measure(S.stage_argv(stages, "snapshot"), ws)
    print(f"N={n}: cold snapshot {cold['seconds']:.2f} s (its own process), importing the stage here {IMPORT_S:.2f} s")
    cold_data = ws.parent / "data.cold"
    shutil.copytree(ws / "data", cold_data, symlinks=True)
    added = S.write_rows(source, n, n + n // 100)
    acc: dict[str, float] = {}

    def timed(fn, name):
        @functools.wraps(fn)
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
        return run

    for mod, names in TIMED.items():
        for name in names:
            setattr(mod, name, timed(getattr(mod, name), name))
    try:
        for trial in range(args.trials):
            shutil.rmtree(ws / "data")
            shutil.copytree(cold_data, ws / "data", symlinks=True)
            acc.clear()
            t = time.perf_counter()
            cfg = config.load(str(ws / "params.yaml"))
            t_cfg = time.perf_counter() - t
            t = time.perf_counter()
            snap_stage.snapshot(cfg.data, str(ws / "data/store"), str(ws / "data/snapshot.json"),
                                str(ws / "reports/snapshot.json"), None, stat_cache=str(ws / "data/.snapshot-stat"),
                                detector=cfg.validate)
            total = time.perf_counter() - t
            parts = ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
            print(f"trial {trial + 1}: append of {len(added)} rows: config {t_cfg:.3f} s, stage {total:.3f} s ({parts})")
    finally:
        for f in added:
            f.unlink(missing_ok=True)
        if not args.keep:
            shutil.rmtree(ws.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
