"""Why the perceptual hash keeps scipy (issue 19 item 1): a numpy-only DCT (a matrix product, no
scipy import) against ``scipy.fftpack.dct``, the transform imagehash.phash uses, on the same 32x32
Lanczos-resized images. Prints, per image family, how many images get other phash bits.

    python bench/phash_dct.py

Families: scikit-learn's digits, uniform noise, flat images, mirror-symmetric noise, 4x4 blocks of
black and white. A tie between a low-band coefficient and the 8x8 band's median (exact in
arithmetic: symmetric and flat images have many zero coefficients) is decided by rounding, which
differs between the two transforms. Produced the counts in docs/store.md.
"""

from __future__ import annotations

import numpy as np
import scipy.fftpack
from PIL import Image
from sklearn.datasets import load_digits

SIDE = 32
_n, _k = np.arange(SIDE), np.arange(8)
D = 2 * np.cos(np.pi * _k[:, None] * (2 * _n[None, :] + 1) / (2 * SIDE))  # scipy's unnormalised DCT-II, 8 rows


def small(imgs: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).convert("L").resize((SIDE, SIDE), Image.Resampling.LANCZOS))
                     for im in imgs])


def bits(low: np.ndarray) -> np.ndarray:
    low = low.reshape(len(low), 64)
    return low > np.median(low, axis=1, keepdims=True)


def main() -> int:
    rng = np.random.default_rng(0)
    families = {
        "digits": (load_digits().images * 16).clip(0, 255).astype(np.uint8),
        "noise": rng.integers(0, 256, (5000, 28, 28), dtype=np.uint8),
        "flat": np.stack([np.full((28, 28), v, np.uint8) for v in range(256)]),
        "mirror-symmetric": np.stack([np.concatenate([a, a[:, ::-1]], 1)
                                      for a in rng.integers(0, 256, (2000, 28, 14), dtype=np.uint8)]),
        "blocks": np.stack([np.kron(rng.integers(0, 2, (4, 4)), np.ones((7, 7))).astype(np.uint8) * 255
                            for _ in range(2000)]),
    }
    for name, imgs in families.items():
        s = small(imgs)
        ref = bits(scipy.fftpack.dct(scipy.fftpack.dct(s, axis=1), axis=2)[:, :8, :8])
        mat = bits(D @ s.astype(np.float64) @ D.T)
        print(f"{name:>17}: {int((ref != mat).any(1).sum()):5d} of {len(imgs):5d} images get other phash bits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
