"""Peak memory of one stage alone, on a workspace a ``bench/scale.py --work DIR --keep-workspaces`` run left (its
store, view, candidate and twin), with this checkout's code (issue 19 item 3).

    python bench/stage_memory.py WORKSPACE [--stage inspect]

Runs the stage exactly as this checkout's dvc.yaml ``cmd`` says, in WORKSPACE, with PYTHONPATH set
to this checkout, so the workspace's data is measured under today's code (the workspace's own
code is not used). Measured with ``bench/scale.py``'s ``measure`` (tree PSS and main-process
RSS, sampled every 20 ms). Extra environment (e.g. ``MALLOC_MMAP_THRESHOLD_=131072``) passes
through. Prints the measurement and, for inspect and evaluate, what the stage reported. One
trial per call. Produced ``bench/results/scale_inspect_100k_after.log`` (then named
``inspect_memory.py``, inspect only) and the ``*_alone`` lines of this stop's results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bench.scale as S  # noqa: E402

REPORTS = {"inspect": ("reports/inspect.json", ("max_tail_ratio", "flagged_rows", "label_issues", "seconds")),
           "evaluate": ("reports/metrics.json", ("accuracy", "test_rows", "asr_max"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("--stage", default="inspect", help="a stage of this checkout's dvc.yaml")
    args = ap.parse_args()
    ws = Path(args.workspace).resolve()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    if args.stage not in stages:
        ap.error(f"no stage {args.stage!r} in {REPO / 'dvc.yaml'}: one of {', '.join(stages)}")
    # PYTHONSAFEPATH: `python -m` puts the working directory first on sys.path, and the workspace
    # holds its own copy of pipeline/, which would shadow this checkout's (stop 28's "after"
    # measurement of inspect ran the workspace's code, not the checkout's, because of it)
    S.env_for = lambda w: {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{w}/mlflow.db", "POISONGATE_PROGRESS": "0",
                           "PYTHONPATH": str(REPO), "PYTHONSAFEPATH": "1",
                           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    code = subprocess.run([sys.executable, "-c", "import pipeline, os; print(os.path.dirname(pipeline.__file__))"],
                          cwd=ws, env=S.env_for(ws), capture_output=True, text=True, check=True).stdout.strip()
    if Path(code).resolve() != (REPO / "pipeline").resolve():
        raise SystemExit(f"the stage would import {code}, not this checkout's pipeline/: check PYTHONPATH")
    r = S.measure(S.stage_argv(stages, args.stage), ws)
    print(str(REPO), args.stage, json.dumps(r), flush=True)
    report, keys = REPORTS.get(args.stage, (None, ()))
    if r["rc"] == 0 and report and (ws / report).is_file():
        rep = json.loads((ws / report).read_text())
        print(json.dumps({k: rep.get(k) for k in keys}))
    return r["rc"]


if __name__ == "__main__":
    raise SystemExit(main())
