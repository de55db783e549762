"""Row selection over an (N, H, W, C) array-like that may be lazy (duck-typed: no imports).

One helper for the core (k-fold) and the data layer (views, the store, the stages' chunked scans),
here because the core may not import the data layer and the data layer should not import torch
(which ``pipeline.core.data`` does).
"""

from __future__ import annotations


def take(images, rows):
    """Rows ``rows`` of an (N, H, W, C) array-like without reading them when it can: a lazy view
    of the store's packs (anything with ``subset``, e.g. ``pipeline.data.rows.LazyRows``) gives a
    lazy view of those rows, an array gives ``images[rows]``. A k-fold training set at 1M rows
    was a 0.5 GiB copy before its loop could stream (issue 19 item 3)."""
    return images.subset(rows) if hasattr(images, "subset") else images[rows]
