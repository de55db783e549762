"""Wall time of a cold pipeline run on the defaults (digits), stage by stage and through DVC.

    python bench/stage_times.py [--trials 1]

Each trial copies the committed tree (`git ls-files`) into a temp folder with a fresh sqlite
MLflow store, runs every stage's `cmd` from dvc.yaml in order (timing each), then, in a second
fresh copy, times one whole `dvc repro` (what `make run` does after the install). Prints a table
and writes bench/results/stage_times.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def fresh_copy(dest: Path) -> dict[str, str]:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               MLFLOW_TRACKING_URI=f"sqlite:///{dest / 'mlflow.db'}", GX_ANALYTICS_ENABLED="false",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def timed(cmd: str | list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, shell=isinstance(cmd, str), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench/results/stage_times.md"))
    args = ap.parse_args()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    per_stage: dict[str, list[float]] = {name: [] for name in stages}
    totals: list[float] = []
    for trial in range(args.trials):
        with tempfile.TemporaryDirectory(prefix="poisongate-stages-") as tmp:
            root = Path(tmp)
            env = fresh_copy(root)
            for name, stage in stages.items():
                per_stage[name].append(timed(stage["cmd"], root, env))
                print(f"trial {trial}: {name} {per_stage[name][-1]:.1f} s", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="poisongate-repro-") as tmp:
            root = Path(tmp)
            env = fresh_copy(root)
            totals.append(timed([str(BIN / "dvc"), "repro"], root, env))
            print(f"trial {trial}: dvc repro {totals[-1]:.1f} s", file=sys.stderr)

    def cell(xs: list[float]) -> str:
        return f"{np.mean(xs):.1f} ± {np.std(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"

    lines = [
        "# Cold pipeline run on digits (bench/stage_times.py)",
        "",
        f"- machine: {os.cpu_count()} CPU cores, {platform.machine()}, python {platform.python_version()}; "
        f"trials: {args.trials}; seconds (mean ± std when several trials)",
        "- each trial: a fresh copy of the committed tree and a fresh sqlite MLflow store",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {cell(xs)} |" for name, xs in per_stage.items()],
        f"| sum of stages | {cell([sum(x) for x in zip(*per_stage.values())])} |",
        f"| whole `dvc repro` (what `make run` runs after the install) | {cell(totals)} |",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
