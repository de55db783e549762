"""Where the validate stage's memory goes, phase by phase, on a workspace ``bench/scale.py --work``
left (issue 19 item 3). In one process, with this checkout's code, it runs what the stage runs on
the pandas engine up to its judged tables (load, ``measure_view``, ``build_tables`` and inside it
``samples_table`` and the significance tables) and prints, after each, the resident memory before
and after and the process's peak so far (VmHWM: a phase's transient shows as a jump in it).

    python bench/validate_phases.py WORKSPACE [--history]

The view's records are applied, less the rows a quarantine leaves out, as the stage does.
``--history``: judge the view against its approved history as the stage does (the ledger's last
and root approved views, ``reference_of`` for each, once when they are the same entry), the case
of every append after the first approved release; without it, as a first release (no
reference). The GX run that follows ``build_tables`` is not included (``bench/stage_memory.py WS
--stage validate`` measures the whole stage). One trial per call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (Arrow on the system allocator, as in the stages)
from bench.scale import proc_mib  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline import validate as V  # noqa: E402
from pipeline.data import significance as sig  # noqa: E402


def status(key: str) -> int:
    return proc_mib(key)[key]


def timed(owner, name: str) -> None:
    """Wrap ``owner.name`` so that each call prints its memory and seconds."""
    inner = getattr(owner, name)

    def wrapper(*a, **k):
        before, t = status("VmRSS"), time.perf_counter()
        out = inner(*a, **k)
        print(f"{name:24s} RSS {before:6d} -> {status('VmRSS'):6d} MiB   VmHWM {status('VmHWM'):6d} MiB   "
              f"{time.perf_counter() - t:6.1f} s", flush=True)
        return out

    setattr(owner, name, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("--history", action="store_true", help="compare with the approved history, as an append does")
    args = ap.parse_args()
    os.chdir(Path(args.workspace).resolve())
    cfg = config.load("params.yaml")
    v = cfg.validate
    sid = json.loads(Path("data/snapshot.json").read_text())["snapshot_id"]
    for name in ("_load_measurable", "measure_view", "reference_of", "samples_table", "build_tables"):
        timed(V, name)
    for name in ("count_tables", "label_conflicts", "near_duplicate_clusters"):
        timed(sig, name)
    print(f"{'start':24s} RSS {status('VmRSS'):6d} MiB")
    view_meta, records = V.read_view("data/view")
    gone = V.quarantined_ids(view_meta.get("quarantine"))
    snap, features = V._without(*V._load_measurable("data/store", sid, v), gone)
    m = V.measure_view(snap, [r for r in records if r["sample_id"] not in gone], v, features=features)
    del features
    last = root = None
    if args.history:
        last_e, root_e = V.history(V.read_ledger("data/approved"), str((snap.meta.get("source") or {}).get("key", "")),
                                   view_meta["view_id"])
        if last_e is None:
            raise SystemExit("--history: the workspace's ledger holds no approved view before this one")
        last = V.reference_of(last_e, "data/store", "data/approved", v)
        root = last if root_e is last_e else V.reference_of(root_e, "data/store", "data/approved", v)
    tables = V.build_tables(snap, m, v, last, root)
    print(f"samples table: {len(tables.frames['samples'])} rows, "
          f"{tables.frames['samples'].memory_usage(deep=True).sum() / 2**20:.0f} MiB (deep)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
