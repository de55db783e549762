"""Benchmark: snapshot the full CIFAR-10 (60,000 JPEGs) into a temp store, CPU only.

    python bench/snapshot_cifar10.py [--path ../shared/datasets/cifar10] [--trials 3] [--workers 0]

Per trial, three runs of the real stage code (`pipeline.snapshot.run`) on a fresh temp store:
  first     - empty store: read the archives, decode (process pool), hash, write pack + manifest
  unchanged - same source again: decode + hash + compare, nothing written (the no-op path)
  append    - (--append, first trial only) the archives extracted to a folder (untimed), snapshotted,
              then 10 new PNGs added and snapshotted again: the timed run is the append
Prints a table (mean ± std over trials) and writes bench/results/snapshot_cifar10.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import PIL  # noqa: E402

from pipeline import snapshot, store  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402

PHASES = ("decode", "hash", "plan", "write", "total", "cpu")


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the decode pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_run(cfg: DataConfig, root: Path) -> tuple[dict, dict]:
    t, c = time.perf_counter(), _cpu()
    rep = snapshot.run(cfg, str(root / "store"), str(root / "snapshot.json"), str(root / "report.json"), progress=None)
    return rep, {"wall": time.perf_counter() - t, "cpu": _cpu() - c}


def make_append_source(src: Path, dest: Path) -> Path:
    """Extract the archives into a folder (outside the timing) so 10 PNGs can be added."""
    import tarfile

    for archive in sorted(src.glob("*.tar.gz")):
        with tarfile.open(archive, "r:gz") as tf:
            tf.extractall(dest, filter="data")
    return dest


def add_pngs(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / "train" / "airplane" / f"zz_bench_{seed}_{i:02d}.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=str(REPO / ".." / "shared" / "datasets" / "cifar10"))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--append", action="store_true", help="also time an append of 10 PNGs (extracts the data once)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "snapshot_cifar10.md"))
    args = ap.parse_args(argv)
    path = os.path.normpath(args.path)
    if not Path(path).exists():
        print(f"error: CIFAR-10 not found at {path}: pass --path", file=sys.stderr)
        return 2

    results: dict[str, list[dict]] = {"first": [], "unchanged": [], "append": []}
    rows = 0
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        append_src = make_append_source(Path(path), Path(tmp) / "folder") if args.append else None
        for trial in range(args.trials):
            root = Path(tmp) / f"t{trial}"
            cfg = DataConfig(name="cifar10", path=path, watch=path, workers=args.workers)
            rep, wall = one_run(cfg, root)
            rows = rep["n_rows"]
            results["first"].append({**rep["seconds"], **wall})
            rep2, wall = one_run(cfg, root)
            assert rep2["snapshot_id"] == rep["snapshot_id"], "unchanged source made a new snapshot"
            results["unchanged"].append({**rep2["seconds"], **wall})
            # Loading is what every later stage pays; time it once per trial.
            t, c = time.perf_counter(), _cpu()
            snap = store.load_snapshot(root / "store", rep["snapshot_id"], verify=True)
            results.setdefault("load+verify", []).append({"total": time.perf_counter() - t, "cpu": _cpu() - c})
            assert snap.images.shape[0] == rows
            shutil.rmtree(root)
            if append_src is not None and trial == 0:  # extraction is slow: one append trial
                aroot = Path(tmp) / f"a{trial}"
                acfg = DataConfig(name="imagefolder", path=str(append_src), watch=str(append_src), workers=args.workers)
                one_run(acfg, aroot)
                add_pngs(append_src, 10, trial)
                rep3, wall = one_run(acfg, aroot)
                assert rep3["n_new"] == 10, rep3["n_new"]
                results["append"].append({**rep3["seconds"], **wall})
                shutil.rmtree(aroot)

    def cell(runs: list[dict], key: str) -> str:
        vals = [r[key] for r in runs if key in r]
        if not vals:
            return "—"
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        "# Snapshot benchmark: CIFAR-10, 60,000 JPEGs (bench/snapshot_cifar10.py)",
        "",
        f"- rows: {rows}; trials: {args.trials}; workers: {args.workers or cpus} (data.workers={args.workers})",
        f"- machine: {cpus} usable CPU core(s) (os.cpu_count()={os.cpu_count()}), {platform.machine()}, "
        f"{platform.system()}; python {platform.python_version()}, Pillow {PIL.__version__}, numpy {np.__version__}",
        f"- source: {path} (two .tar.gz, read sequentially, decoded in a process pool)",
        "- seconds, mean ± std over trials; decode includes reading the archives",
        f"- load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(a shared machine: wall time grows with other work, CPU seconds much less)",
        "",
        "| run | decode | hash | plan | write | total (wall) | CPU s (all processes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("first", "unchanged", "append", "load+verify"):
        runs = results.get(name, [])
        if runs:
            lines.append(f"| {name} | " + " | ".join(cell(runs, k) for k in PHASES) + " |")
    lines += ["", "first = empty store; unchanged = same source again (no-op, nothing written); "
              "append = folder source + 10 PNGs; load+verify = store.load_snapshot(verify=True)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
