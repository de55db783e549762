"""Resident memory a test-split read leaves behind, with and without ``store.read_split``'s heap
trim (issue 19 item 3), on a workspace's current snapshot.

    python bench/read_split_memory.py WORKSPACE [--no-trim] [--all-columns] [--train-view]

WORKSPACE: one with a snapshot (``bench/append_profile.py --keep DIR``, ``bench/scale.py --work``).
``--no-trim`` replaces ``heap.release`` with a no-op: the code before the trim. ``--all-columns``
makes ``read_split`` decode every manifest column: the code before it read only a split's columns.
One process per call; prints RssAnon and VmHWM (MiB) before and after: the VmHWM rise is the read's
peak. Produced the +65 / +14 MiB of ``bench/results/read_split_memory_100k.log``, the column figures
of ``bench/results/read_split_columns_100k.log``, those of ``bench/results/read_split_rows.log`` (run
alternately with the previous commit's copy of this script in a git worktree) and store.read_split's comments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402,F401  (the evaluate stage's baseline: torch loaded)

from bench.scale import proc_mib  # noqa: E402
from pipeline.data import store  # noqa: E402


def status() -> dict:
    return proc_mib("RssAnon", "VmHWM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("--no-trim", action="store_true")
    ap.add_argument("--all-columns", action="store_true")
    ap.add_argument("--train-view", action="store_true",
                    help="measure the train stage's load instead (view.load_training_view, lazy): the train split")
    args = ap.parse_args()
    ws = Path(args.workspace)
    if args.no_trim:
        store.heap.release = lambda: False
    if args.all_columns:
        load = store.load_snapshot
        store.load_snapshot = lambda *a, columns=None, **kw: load(*a, **kw)
    sid = json.loads((ws / "data/snapshot.json").read_text())["snapshot_id"]
    before = status()
    t0 = time.perf_counter()
    if args.train_view:
        from pipeline.data import view

        labels = view.load_training_view(ws / "data/view", ws / "data/store", verify=True, lazy=True).labels
    else:
        _, labels, _, _ = store.read_split(ws / "data/store", sid, "test", lazy=True)
    seconds = time.perf_counter() - t0
    after = status()
    what = ", ".join(["no trim" if args.no_trim else "trim", "all columns" if args.all_columns else "split's columns"])
    print(f"{what}: {len(labels)} {'train-view' if args.train_view else 'test'} rows of snapshot {sid[:12]}: RssAnon "
          f"{before['RssAnon']} -> {after['RssAnon']} MiB (+{after['RssAnon'] - before['RssAnon']}), VmHWM "
          f"{before['VmHWM']} -> {after['VmHWM']} (+{after['VmHWM'] - before['VmHWM']}); {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
