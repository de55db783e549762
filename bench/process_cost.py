"""The fixed cost of a stage process beyond its work (issue 19 item 1): compiling the project's
modules, and the interpreter's teardown at exit, with and without ``gc.freeze()`` before it.

    python bench/process_cost.py [--trials 15] [--module pipeline.snapshot]

Each trial starts fresh interpreters that import the stage module (numpy, pandas, pyarrow, the
project) and exit:

- ``no .pyc``: the project's modules compiled from source on every start (a box that sets
  PYTHONDONTWRITEBYTECODE, as this sandbox does), normal exit;
- ``.pyc``: the project's modules compiled once beforehand (a user's checkout after its first run);
- ``.pyc + gc.freeze()``: what ``stage.main`` now does before a stage's own process exits;
- ``.pyc + os._exit``: no teardown at all, the floor.

The project's code is copied to two scratch folders, one compiled with ``compileall``; the cases run
interleaved, so load on the box hits them alike. Printed: wall seconds per process (min, median,
max) and each median's saving against the first case. Produced the figures quoted in
``pipeline/stage.py`` and ``bench/scale.py``.
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--module", default="pipeline.snapshot")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pg-process-cost-"))
    try:
        roots = {}
        for name in ("source", "compiled"):
            roots[name] = scratch / name
            shutil.copytree(REPO / "pipeline", roots[name] / "pipeline",
                            ignore=shutil.ignore_patterns("__pycache__"))
        compileall.compile_dir(str(roots["compiled"]), quiet=1)
        base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        imp = f"import {args.module}"
        cases = {
            "no .pyc, normal exit": (imp, {**base, "PYTHONPATH": str(roots["source"]), "PYTHONDONTWRITEBYTECODE": "1"}),
            ".pyc, normal exit": (imp, {**base, "PYTHONPATH": str(roots["compiled"])}),
            ".pyc + gc.freeze(), exit": (imp + ", gc; gc.freeze()", {**base, "PYTHONPATH": str(roots["compiled"])}),
            ".pyc + os._exit (no teardown)": (imp + ", os; os._exit(0)", {**base, "PYTHONPATH": str(roots["compiled"])}),
        }
        secs: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.trials):
            for name, (code, env) in cases.items():
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True, env={**env, "PYTHONSAFEPATH": "1"},
                               cwd=scratch)
                secs[name].append(time.perf_counter() - t)
        if any(roots["source"].rglob("*.pyc")):
            raise SystemExit("the no-.pyc case wrote bytecode: its figures are void")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"# python bench/process_cost.py --trials {args.trials} --module {args.module}; {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print("| process (import the stage, exit) | min s | median s | max s | median saving |")
    print("|---|---|---|---|---|")
    first = statistics.median(next(iter(secs.values())))
    for name, v in secs.items():
        med = statistics.median(v)
        print(f"| {name} | {min(v):.3f} | {med:.3f} | {max(v):.3f} | {first - med:+.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
