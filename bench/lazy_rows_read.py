"""Reading rows of a store lazily (``pipeline.data.rows.LazyRows``): what a streamed epoch's
batches, an in-order pass and the resident path's chunked upload cost, per read, under two code
trees side by side (issue 19 item 3).

    python bench/lazy_rows_read.py STORE SNAPSHOT --old /tmp/old [--new .] [--pairs 2]

Each (code tree, pair) runs in its own process, alternating old/new, on the same store: the train
split loaded lazily (``store.load_snapshot(lazy=True, split="train", hash_packs=False)``), then

- ``random 512``: 400 batches of 512 rows drawn from a fixed permutation, each read the way the
  streamed DataLoader reads it (``core.data.gather``: rows sorted, then put back);
- ``in order 512``: 400 consecutive slices of 512 rows (``x[s:s + 512]``: prediction's order);
- ``64 MiB chunks``: the whole split in slices of 64 MiB of rows (``core.data.to_device``'s
  upload off the CPU), once.

ms per read (the read alone), and the process's RssFile and VmRSS after each case (file pages it has mapped count
in RSS; pages a ``pread`` brought into the page cache do not). Prints a table; the pixels each tree
read are compared by a digest of every batch (they must be equal).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCHES, BATCH, CHUNK = 400, 512, 64 * 2**20


def status() -> dict:
    want = ("VmRSS", "RssFile", "RssAnon")
    return {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith(want)}


def child(store_dir: str, snapshot: str) -> dict:
    from pipeline.core.data import gather
    from pipeline.data import store

    snap = store.load_snapshot(store_dir, snapshot, lazy=True, columns=("split",), split="train", hash_packs=False)
    x, _y, _ = snap.split("train")
    del snap
    out = {"rows": len(x), "type": type(x).__name__, "cases": {}}
    perm = np.random.default_rng(0).permutation(len(x))
    size = int(np.prod(x.shape[1:]))

    def run(name, reads):
        h, dt, k = hashlib.sha256(), 0.0, 0
        for r in reads:
            t = time.perf_counter()
            got = r()
            dt += time.perf_counter() - t  # the read only: the digest below is the check, not the cost
            h.update(got.tobytes())
            k += 1
        out["cases"][name] = {"reads": k, "ms_per_read": round(1000 * dt / k, 3), "digest": h.hexdigest()[:16],
                              **status()}

    run("random 512", (lambda s=s: gather(x, perm[s:s + BATCH]) for s in range(0, BATCHES * BATCH, BATCH)))
    run("in order 512", (lambda s=s: x[s:s + BATCH] for s in range(0, BATCHES * BATCH, BATCH)))
    step = max(1, CHUNK // size)
    run("64 MiB chunks", (lambda s=s: x[s:s + step] for s in range(0, len(x), step)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("snapshot")
    ap.add_argument("--old", required=True, help="the code tree to compare with (a git worktree)")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, args.child)
        print(json.dumps(child(args.store, args.snapshot)))
        return 0
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; store {args.store}, "
          f"snapshot {args.snapshot[:12]}; {args.pairs} alternating pairs, each tree in its own process", flush=True)
    rows = []
    for pair in range(1, args.pairs + 1):
        for name, tree in (("old", args.old), ("new", args.new)):
            res = subprocess.run([sys.executable, __file__, args.store, args.snapshot, "--old", args.old,
                                  "--child", str(Path(tree).resolve())], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONSAFEPATH": "1"})
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((pair, name, r))
            print(f"pair {pair} {name}: {json.dumps(r)}", flush=True)
    print()
    print(f"| case | tree | pair | rows | reads | ms a read | RssFile MiB after | VmRSS MiB after | digest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in rows[0][2]["cases"]:
        for pair, name, r in rows:
            c = r["cases"][case]
            print(f"| {case} | {name} | {pair} | {r['rows']:,} | {c['reads']} | {c['ms_per_read']} | {c['RssFile']} | "
                  f"{c['VmRSS']} | {c['digest']} |")
    digests = {(case, r["cases"][case]["digest"]) for _p, _n, r in rows for case in r["cases"]}
    same = len(digests) == len(rows[0][2]["cases"])
    print(f"\npixels read equal across trees and pairs: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
