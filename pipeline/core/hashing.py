"""Content hashes of samples: the identity every stage verifies."""

from __future__ import annotations

import hashlib

import numpy as np


def sample_hash(image: np.ndarray) -> str:
    """sha256 of an image's canonical pixel bytes: uint8, (H, W, C), C-contiguous.

    The shape is part of the hashed bytes so that two images with the same bytes in another
    layout never collide.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"sample_hash needs a uint8 (H, W, C) array, got {image.dtype} {image.shape}")
    h = hashlib.sha256(b"%dx%dx%d|" % image.shape)
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def sample_hashes(images: np.ndarray) -> list[str]:
    """sample_hash of every image of an (N, H, W, C) uint8 batch."""
    return [sample_hash(img) for img in images]
