"""Per-model set-up cost of ``core.train.train_model`` on CIFAR-10, outside the epochs (issue 6).

The first GPU sweep (bench/results/cifar10_tune.md) found ~3 s per model between "start" and
"first epoch". This times, side by side on the same arrays, the pieces that ran on the host:

* ``channel_stats``: the current exact 256-bin histogram (``core.data.channel_stats``) against
  the float64 chunked sums it replaced (kept here, verbatim in effect, as the comparison);
* fastnet's whitening (``run_data_init``) on the CPU: what every model paid while ``fit`` ran it
  before moving the model to the GPU (it now runs on the training device).

    python bench/train_setup_cost.py --data .gpu/cifar10 --trials 3

Prints a table and writes bench/results/train_setup_cost.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from cifar10_verdict import load_data  # noqa: E402
from pipeline.core.data import channel_stats  # noqa: E402
from pipeline.core.models import build_model  # noqa: E402
from pipeline.core.train import run_data_init  # noqa: E402


def channel_stats_float64(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """The implementation channel_stats had before: chunked float64 sums of values and squares."""
    c = images.shape[-1]
    s = np.zeros(c, np.float64)
    ss = np.zeros(c, np.float64)
    for i in range(0, len(images), chunk):
        block = images[i : i + chunk].reshape(-1, c).astype(np.float64)
        s += block.sum(0)
        ss += np.square(block).sum(0)
    n = images.size // c
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return [float(m / 255) for m in mean], [float(v / 255) for v in std]


def timed(fn, trials: int) -> list[float]:
    out = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/datasets/cifar10"))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--out", default=str(REPO / "bench/results/train_setup_cost.md"))
    args = ap.parse_args(argv)

    data = load_data(Path(args.data), args.limit, args.limit, os.cpu_count() or 1)
    x = data.x_train
    new, old = channel_stats(x), channel_stats_float64(x)
    if not np.allclose(new, old, rtol=1e-9, atol=1e-12):
        print(f"error: the two channel_stats disagree: {new} vs {old}", file=sys.stderr)
        return 1
    mean, std = new
    torch.manual_seed(0)
    rows = [
        ("channel_stats, float64 chunked sums (before)", timed(lambda: channel_stats_float64(x), args.trials)),
        ("channel_stats, 256-bin histogram (now)", timed(lambda: channel_stats(x), args.trials)),
        ("fastnet whitening on the CPU (before: fit ran it before model.to(device))",
         timed(lambda: run_data_init(build_model("fastnet", 10, 3, x.shape[1], 64, mean, std), x), args.trials)),
    ]
    head = (f"# Per-model set-up cost outside the epochs ({len(x)} CIFAR-10 training images)\n\n"
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}\n"
            f"- trials: {args.trials} (mean ± std, seconds)\n"
            f"- command: python bench/train_setup_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}\n\n"
            "| step | seconds |\n|---|---|\n")
    body = "".join(f"| {name} | {statistics.mean(t):.3f} ± {statistics.stdev(t) if len(t) > 1 else 0.0:.3f} |\n"
                   for name, t in rows)
    text = head + body
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
