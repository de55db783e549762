"""Where the snapshot stage's memory goes, call by call, on a workspace ``bench/scale.py --work``
left (issue 19 item 3). In one process, with this checkout's code, it runs the stage as its
dvc.yaml ``cmd`` does (``pipeline.snapshot.main``) and prints, for each call of the functions
below, its own peak RSS (the kernel's counter is reset before the call: ``/proc/self/clear_refs``
5), the RSS before and after, and its seconds. With the source unchanged this is the no-op that
every ``dvc repro`` runs.

    python bench/snapshot_phases.py WORKSPACE [--params params.yaml] [--base-every N]

``--base-every N`` sets ``store.BASE_EVERY`` for the run: an append whose parent is N or more
snapshots from its base consolidates the parent into a base first (``store.write_base``), the
snapshot stage's heaviest append (every 32nd by default).

A call inside another is reported too; the outer call's peak is the highest over the whole call,
its inner calls' included (before stop 40 it was only "since its last inner call"). One trial per
call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (Arrow on the system allocator, as in the stages)
from bench.scale import proc_mib, reset_peak  # noqa: E402

WRAPPED = {
    "pipeline.data.store": ("load_parent", "load_manifest", "verify_packs", "verify_files", "plan_snapshot",
                            "write_base", "write_snapshot"),
    "pipeline.data.sources": ("read_source", "listing_unchanged", "listing_appended"),
    "pipeline.snapshot": ("fast_noop", "fast_append", "read_stat_cache", "write_stat_cache", "_grow_stat_cache"),
    "pipeline.data.stats": ("row_features", "provenance", "duplicates"),
}


_OPEN: list[int] = []  # the highest peak of the calls inside each wrapped call still running


def timed(owner, name: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*a, **k):
        before, t = proc_mib("VmRSS")["VmRSS"], time.perf_counter()
        reset_peak()
        _OPEN.append(0)
        try:
            out = inner(*a, **k)
        finally:
            inside = _OPEN.pop()
        m = proc_mib("VmRSS", "VmHWM")
        # an inner call reset the counter when it ended: this call's peak is the higher of its own
        # since then and its inner calls' peaks
        peak = max(m["VmHWM"], inside)
        if _OPEN:
            _OPEN[-1] = max(_OPEN[-1], peak)
        print(f"{name:18s} peak {peak:6d} MiB   RSS {before:6d} -> {m['VmRSS']:6d} MiB   "
              f"{time.perf_counter() - t:6.1f} s", flush=True)
        reset_peak()
        return out

    setattr(owner, name, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("--params", default="params.yaml", help="the workspace's params file (relative to it)")
    ap.add_argument("--base-every", type=int, help="store.BASE_EVERY for this run (default: the store's)")
    args = ap.parse_args()
    os.chdir(Path(args.workspace).resolve())
    import importlib

    from pipeline import snapshot

    if args.base_every is not None:
        from pipeline.data import store

        store.BASE_EVERY = args.base_every
    for mod, names in WRAPPED.items():
        m = importlib.import_module(mod)
        for name in names:
            timed(m, name)
    print(f"{'start':18s} RSS {proc_mib('VmRSS')['VmRSS']:6d} MiB", flush=True)
    t = time.perf_counter()
    reset_peak()
    rc = snapshot.main(["--params", args.params, "--store", "data/store", "--pointer", "data/snapshot.json",
                        "--report", "reports/snapshot.json", "--stat-cache", "data/.snapshot-stat"])
    m = proc_mib("VmRSS", "VmHWM")
    print(f"{'stage (rest)':18s} peak {m['VmHWM']:6d} MiB   RSS after {m['VmRSS']:6d} MiB   "
          f"{time.perf_counter() - t:6.1f} s in all, rc {rc}", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
