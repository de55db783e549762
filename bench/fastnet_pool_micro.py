"""Micro-benchmark: fastnet's pooling layers, forward + backward, bf16 channels_last (issue 6).

The fastnet profile (bench/results/cifar10_tune.md) put ``MaxPool2d`` + ``AdaptiveMaxPool2d``
at ~25% of a training step's GPU time. This times alternatives on the exact activation shapes of
fastnet at batch 1024 (widths 64/256/256, 31 -> 16 -> 8 -> 4 -> 1) and checks each against
torch's pooling (max is exact, so outputs must be equal).

    python bench/fastnet_pool_micro.py            # on the GPU box; prints a table
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F


def pool_torch(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, ceil_mode=True)


def pool_nchw(x: torch.Tensor) -> torch.Tensor:
    y = F.max_pool2d(x.contiguous(), 2, ceil_mode=True)
    return y.contiguous(memory_format=torch.channels_last)


def _pad_even(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
    return x


def pool_amax(x: torch.Tensor) -> torch.Tensor:
    x = _pad_even(x).contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    y = x.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c).amax(dim=(2, 4))
    return y.permute(0, 3, 1, 2)


def pool_slices(x: torch.Tensor) -> torch.Tensor:
    x = _pad_even(x)
    return torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                         torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


def gpool_torch(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_max_pool2d(x, 1).flatten(1)


def gpool_amax(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(2, 3))


def time_fb(fn, x: torch.Tensor, reps: int = 30) -> float:
    """Median ms of forward + backward (CUDA events)."""
    x = x.detach().requires_grad_(True)
    g = None
    times = []
    for i in range(reps + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = fn(x)
        if g is None:
            g = torch.randn_like(y)
        y.backward(g)
        end.record()
        torch.cuda.synchronize()
        x.grad = None
        if i >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}; median of 30 fwd+bwd, ms")
    shapes = [(1024, 64, 31, 31), (1024, 256, 16, 16), (1024, 256, 8, 8)]
    rows = []
    for shp in shapes:
        x = torch.randn(shp, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        ref = pool_torch(x)
        row = [str(shp)]
        for fn in (pool_torch, pool_nchw, pool_amax, pool_slices):
            out = fn(x)
            assert torch.equal(out, ref), fn.__name__
            row.append(f"{time_fb(fn, x):.3f}")
        rows.append(row)
    print("| input | max_pool2d (channels_last) | NCHW copy + pool | NHWC view amax | 4 strided slices |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    x = torch.randn(1024, 256, 4, 4, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert torch.equal(gpool_torch(x), gpool_amax(x))
    print(f"\nglobal max (1024, 256, 4, 4): adaptive_max_pool2d {time_fb(gpool_torch, x):.3f} ms, "
          f"amax {time_fb(gpool_amax, x):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
