"""Peak memory of the inspect stage alone, on a workspace a ``bench/scale.py --work DIR`` run left
(its store, view, candidate and twin), with this checkout's code (issue 19 item 3).

    python bench/inspect_memory.py WORKSPACE [--suspects reports/suspects.csv]

Uses ``bench/scale.py``'s ``measure`` (tree PSS and main-process RSS, sampled every 20 ms) with
PYTHONPATH set to this checkout, so the workspace's data is measured under today's code. Extra
environment (e.g. ``MALLOC_MMAP_THRESHOLD_=131072``) passes through. Prints the measurement and the
stage's own seconds. Produced ``bench/results/scale_inspect_100k_after.log`` (a copy of the
100k workspace of ``scale_inspect_100k.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bench.scale as S  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("--suspects", default="reports/suspects.csv")
    ap.add_argument("--report", default="reports/inspect.json")
    args = ap.parse_args()
    ws = Path(args.workspace).resolve()
    S.env_for = lambda w: {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{w}/mlflow.db", "POISONGATE_PROGRESS": "0",
                           "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    argv = [sys.executable, "-m", "pipeline.inspect", "--params", "params.yaml", "--store", "data/store", "--pointer",
            "data/snapshot.json", "--view", "data/view", "--candidate", "models/candidate.safetensors", "--twin",
            "models/twin.safetensors", "--train-report", "reports/train.json", "--suspects", args.suspects,
            "--report", args.report]
    r = S.measure(argv, ws)
    print(str(REPO), json.dumps(r), flush=True)
    if r["rc"] == 0:
        rep = json.loads((ws / args.report).read_text())
        print(json.dumps({k: rep[k] for k in ("max_tail_ratio", "flagged_rows", "label_issues", "seconds")}))
    return r["rc"]


if __name__ == "__main__":
    raise SystemExit(main())
