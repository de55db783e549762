"""Peak-memory micro-measurements behind two constants (issue 19 item 3), each in a fresh process
(``ru_maxrss`` growth over the call):

    python bench/memory_micro.py

- ``detect._kth_distance`` of 17,000 x 256 rows against 2,000 reference rows at distance blocks of
  2**24 and 2**22 elements (``RobustConfig.chunk_elems``: 273 vs 84 MiB on the 2-core box);
- the perceptual hash of one 4,096-row chunk of 28x28 rows: one DCT over the whole chunk (the
  first batched version) against ``stats.perceptual_hashes`` (512 images a call): 74 vs 11 MiB.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

KTH = """
import resource, torch
from pipeline.core.detect import _kth_distance
torch.manual_seed(0)
x, r = torch.randn(17000, 256), torch.randn(2000, 256)
b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_kth_distance(x, r, 3, None, {chunk})
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - b) / 1024)
"""
PHASH = """
import resource, numpy as np, scipy.fftpack
from PIL import Image
from pipeline.data import stats
x = np.random.default_rng(0).integers(0, 256, (4096, 28, 28, 1), dtype=np.uint8)
b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {whole}:
    small = np.stack([np.asarray(Image.fromarray(im[..., 0]).convert("L").resize((32, 32), Image.Resampling.LANCZOS))
                      for im in x])
    scipy.fftpack.dct(scipy.fftpack.dct(small, axis=1), axis=2)
else:
    stats.perceptual_hashes(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - b) / 1024)
"""


def run(code: str) -> float:
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent).stdout)


def main() -> int:
    print("| measurement | peak growth MiB |\n|---|---|")
    for chunk in (1 << 24, 1 << 22):
        print(f"| _kth_distance, 17k x 2k rows, blocks of {chunk:,} elements | {run(KTH.format(chunk=chunk)):.1f} |")
    print(f"| phash of 4,096 rows, one DCT over the chunk | {run(PHASH.format(whole=True)):.1f} |")
    print(f"| phash of 4,096 rows, stats.perceptual_hashes (512 a call) | {run(PHASH.format(whole=False)):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
