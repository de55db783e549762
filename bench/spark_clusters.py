"""The Spark engine's near-duplicate clusters when many rows share a phash (issue 19 items 3 and 6).

Builds ``--rows`` train rows in a local Spark session, ``--equal`` of them with one phash (blank
images, one upload repeated) and the rest distinct random hashes with ``--near`` near copies, then
runs ``spark_gate._clusters`` of the checkout at ``--repo`` (default: this one), and prints its
seconds, the driver's peak RSS (this Python process's VmHWM; the JVM is a process of its own) and
the cluster table's shape. Run it once per checkout to compare two versions:

    python bench/spark_clusters.py --rows 100000 --equal 5000 --repo /tmp/old
    python bench/spark_clusters.py --rows 100000 --equal 5000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--equal", type=int, default=5_000, help="rows sharing one phash")
    ap.add_argument("--near", type=int, default=1_000, help="rows 1 bit away from another row")
    ap.add_argument("--radius", type=int, default=2)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    args = ap.parse_args()
    sys.path.insert(0, args.repo)

    import dataclasses

    import numpy as np
    import pandas as pd
    from omegaconf import OmegaConf

    from pipeline.data import spark_gate as G
    from pipeline.schema import ValidateConfig

    v = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ValidateConfig),
                                            OmegaConf.load(Path(args.repo) / "conf/validate/default.yaml")))
    spark = G.session(dataclasses.replace(v, spark_master=args.master))
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, args.rows, dtype=np.int64).astype(np.uint64)
    h[: args.equal] = h[0]
    src = rng.integers(args.equal, args.rows, args.near)
    h[args.equal: args.equal + args.near] = h[src] ^ (np.uint64(1) << rng.integers(0, 64, args.near).astype(np.uint64))
    y = rng.integers(0, 10, args.rows)
    y[: args.equal] = 3
    y[1] = 4  # one of the equal rows under another label: the cluster spans labels
    train = spark.createDataFrame(pd.DataFrame({"train_index": np.arange(args.rows, dtype=np.int64), "phash": G._signed(h),
                                                "label_now": y.astype(np.int64),
                                                "sample_id": [f"r{i}" for i in range(args.rows)]})).cache()
    train.count()
    names = tuple(str(i) for i in range(10))

    def hwm() -> int:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    t0 = time.perf_counter()
    t = G._clusters(spark, train, args.radius, names)
    dt = time.perf_counter() - t0
    print(f"repo {args.repo}: rows {args.rows}, equal {args.equal}, near {args.near}, radius {args.radius}, "
          f"{args.master}: {dt:.1f} s, driver VmHWM {hwm()} MiB, clusters {len(t)}, "
          f"rows in clusters {int(t['n_rows'].sum()) if len(t) else 0}, max n_rows {int(t['n_rows'].max()) if len(t) else 0}",
          flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
