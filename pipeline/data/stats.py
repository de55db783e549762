"""Descriptive data statistics, computed with numpy/pandas apart from any judging.

Two consumers:

- the snapshot stage and the store report what a snapshot holds (:func:`counts`,
  :func:`provenance`, :func:`duplicates`);
- the data gate (``pipeline.validate``) measures every training row: an abnormal pixel block
  anywhere in the image (:func:`block_flags_all`), an exact duplicate (:func:`duplicate_mask`), a
  64-bit perceptual hash (:func:`perceptual_hashes`). ``pipeline.data.significance`` turns these
  per-row facts into per-class tests, and ``gates.data_checks`` holds the one table of checks
  that judges them.

Hand-written only where no library computes the statistic: GX, scikit-image and imagehash have no
"uniform, extreme, foreign k x k block" detector, and no library scans every window of a batch
with integral images. Nothing here imports torch or GX; imagehash is imported only by
:func:`perceptual_hashes`.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from pipeline.core.attacks import NAMED_LOCATIONS, named_location
from pipeline.errors import UserError
from pipeline.schema import ValidateConfig

PROVENANCE_COLUMNS = ("source_uri", "ingest_time", "snapshot_id")
MAX_DUPLICATE_GROUPS = 50  # duplicate groups listed in a report
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StatsError(UserError, ValueError):
    """Bad input to a data statistic (the message says what to pass instead; exit 2)."""


# ----------------------------------------------------------------------------- manifest statistics


def duplicates(manifest: pd.DataFrame, class_names: list[str], cap: int = MAX_DUPLICATE_GROUPS) -> dict:
    """Exact duplicates: one pixel hash under several ids, worst first (several labels, then splits)."""
    dup = manifest[manifest.duplicated("sha256", keep=False)]
    groups = []
    for h, g in dup.groupby("sha256", sort=True):
        labels = sorted({class_names[int(x)] for x in g["label"]})
        splits = sorted(set(g["split"]))
        groups.append({"sha256": h, "sample_ids": g["sample_id"].tolist()[:10], "n": int(len(g)),
                       "labels": labels, "cross_label": len(labels) > 1, "splits": splits,
                       "cross_split": len(splits) > 1})
    groups.sort(key=lambda g: (not g["cross_label"], not g["cross_split"], -g["n"], g["sha256"]))
    n_rows = int(sum(g["n"] - 1 for g in groups))
    return {
        "n_groups": len(groups),
        "n_duplicate_rows": n_rows,  # rows beyond the first of each group
        "rate": n_rows / len(manifest) if len(manifest) else 0.0,
        "n_cross_label_groups": sum(g["cross_label"] for g in groups),
        "n_cross_split_groups": sum(g["cross_split"] for g in groups),
        "groups": groups[:cap],
        "capped": len(groups) > cap,
    }


def provenance(manifest: pd.DataFrame) -> dict:
    """Fraction of rows that say where they came from, what they are and when they were ingested."""
    # Arrow compute (RE2, no Python objects): the snapshot stage reports this over every row on each
    # append, and pandas' string methods took 0.09-0.14 s of a 1% append at 100k (issue 19 item 1).
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(manifest)

    def col(name: str) -> pa.Array:  # a missing value stays missing (pandas 2's astype(str) made it "None")
        s = manifest[name]
        if isinstance(s.dtype, pd.CategoricalDtype):  # a parent's repeated columns (store.REPEATED_COLUMNS)
            return pa.array(s).cast(pa.string())  # from its dictionary: no Python string a row
        return pa.array(s.astype(str).where(s.notna(), None), type=pa.string(), from_pandas=True)

    def nonempty(a: pa.Array) -> pa.Array:
        return pc.fill_null(pc.greater(pc.utf8_length(a), 0), False)

    def hex64(a: pa.Array) -> pa.Array:
        return pc.fill_null(pc.match_substring_regex(a, _HEX64.pattern), False)

    sid = col("snapshot_id")
    ids = pc.unique(sid)  # a snapshot's rows share its id: match each id once
    has_uri = nonempty(col("source_uri"))
    has_hash = hex64(col("sha256"))
    has_ingest = pc.and_(nonempty(col("ingest_time")), pc.is_in(sid, value_set=ids.filter(hex64(ids))))
    full = pc.and_(pc.and_(has_uri, has_hash), has_ingest)

    def count(mask: pa.Array) -> int:
        return int(pc.sum(mask).as_py() or 0)

    return {
        "coverage": float(count(full) / n) if n else 0.0,
        "rows": n,
        "with_source_uri": count(has_uri),
        "with_sha256": count(has_hash),
        "with_ingest_record": count(has_ingest),
    }


def counts(manifest: pd.DataFrame, class_names: list[str]) -> dict:
    out: dict = {}
    for split in sorted(set(manifest["split"]), key=lambda s: (s != "train", s)):
        part = manifest[manifest["split"] == split]
        by_label = part["label"].astype(int).value_counts()
        out[split] = {"n": int(len(part)),
                      "per_class": {c: int(by_label.get(i, 0)) for i, c in enumerate(class_names)}}
    return out


# ----------------------------------------------------------------------------- per-row statistics of a view


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise StatsError(f"images must be a uint8 (N, H, W, C) array, got {images.dtype} {images.shape}")
    return images


def _box(ii: np.ndarray, img: np.ndarray, ya, yb, xa, xb) -> np.ndarray:
    """Sum over [ya, yb) x [xa, xb) per candidate, from integral images ii (m, H+1, W+1, C)."""
    return (ii[img, yb, xb] - ii[img, ya, xb] - ii[img, yb, xa] + ii[img, ya, xa]).astype(np.float64)


def block_flags_all(
    images: np.ndarray,
    sizes: Sequence[int] = (3,),
    low: float = 16,
    high: float = 239,
    max_std: float = 4.0,
    min_contrast: float = 64.0,
    *,
    chunk: int = 1024,
) -> pd.DataFrame:
    """Abnormal k x k pixel blocks at *every* position (every k in ``sizes``), per image.

    The attack module places a patch at a named location (corners, centre) or at ``random`` /
    concrete positions; a scan of the five named locations (:func:`block_flags_named`) never sees
    the latter. Same block definition as there: *uniform* (every channel's std <= ``max_std``),
    *extreme* (every channel's mean <= ``low`` or every one >= ``high``) and *foreign* (differs
    by >= ``min_contrast`` in some channel's mean from its ring, the pixels within max(1, k // 2)
    of the block clipped to the image, and from the image's per-channel median). The foreign test
    is what keeps clean data quiet (dark digit background = the median; white sky = its ring).

    Vectorised with integral images (sums and sums of squares of all windows at once, exact
    integers: int32 while H * W * 255^2 fits, int64 beyond); ring and median only for the few
    windows already uniform and extreme (CIFAR-10's 50,000 images: ~12 s on a busy core, the
    named scan ~3 s). A patch smaller than every k is not seen (a 2x2 patch
    inside a 3x3 window is not uniform); k = 2 is not a usable default (it flags 10% of clean
    digits: thick strokes); a patch larger than k is seen at its corner windows.

    Returns the columns of :func:`block_flags_named`: ``abnormal_block`` (bool),
    ``abnormal_block_at`` (the named location when the block sits at one, else ``"[y, x]"`` of
    its top-left pixel, suffixed ``" k=K"`` when several sizes are scanned; "" when none) and
    ``block_<loc>`` (bool per named location, first size), plus ``block_y``, ``block_x``,
    ``block_k`` (-1 when none). Named positions win when an image has several blocks.
    """
    images = _check_images(images)
    n, h, w, c = images.shape
    sizes = [int(k) for k in sizes]
    if not sizes or any(k < 1 or k > min(h, w) for k in sizes):
        raise StatsError(f"block sizes {sizes} do not fit the {h}x{w} images: use sizes in 1..{min(h, w)}")
    if chunk < 1:
        raise StatsError(f"chunk must be >= 1, got {chunk}")
    big_dtype = np.int32 if h * w * 255 * 255 < 2**31 else np.int64
    best = np.full(n, np.iinfo(np.int64).max, np.int64)  # priority of the reported block
    by, bx, bk = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    named_flags = {loc: np.zeros(n, bool) for loc in NAMED_LOCATIONS}
    for si, k in enumerate(sizes):
        named = {named_location(loc, (h, w), k): j for j, loc in enumerate(NAMED_LOCATIONS)}
        rank = np.full((h - k + 1, w - k + 1), -1, np.int64)
        for (y, x), j in named.items():
            rank[y, x] = j if rank[y, x] < 0 else min(rank[y, x], j)
        r = max(1, k // 2)
        for i0 in range(0, n, chunk):
            x8 = images[i0 : i0 + chunk]
            m = len(x8)
            xi = x8.astype(big_dtype)
            ii = np.zeros((m, h + 1, w + 1, c), big_dtype)
            ii[:, 1:, 1:] = xi.cumsum(1).cumsum(2)
            s = (ii[:, k:, k:] - ii[:, :-k, k:] - ii[:, k:, :-k] + ii[:, :-k, :-k]).astype(np.int64)
            kk = k * k
            extreme = (s <= low * kk).all(axis=3) | (s >= high * kk).all(axis=3)
            if not extreme.any():
                continue
            img, ys, xs = np.nonzero(extreme)
            sq = xi * xi
            ii2 = np.zeros((m, h + 1, w + 1, c), big_dtype)
            ii2[:, 1:, 1:] = sq.cumsum(1).cumsum(2)
            s1 = s[img, ys, xs].astype(np.float64)  # (t, c)
            s2 = _box(ii2, img, ys, ys + k, xs, xs + k)
            var = np.maximum(s2 / kk - (s1 / kk) ** 2, 0.0)
            keep = (var <= max_std**2 + 1e-9).all(axis=1)
            if not keep.any():
                continue
            img, ys, xs, s1 = img[keep], ys[keep], xs[keep], s1[keep]
            bmean = s1 / kk
            ya, yb = np.maximum(ys - r, 0), np.minimum(ys + k + r, h)
            xa, xb = np.maximum(xs - r, 0), np.minimum(xs + k + r, w)
            ring_n = ((yb - ya) * (xb - xa) - kk).astype(np.float64)
            ring_sum = _box(ii, img, ya, yb, xa, xb) - s1
            contrast = np.where(ring_n > 0, np.abs(bmean - ring_sum / np.maximum(ring_n, 1)[:, None]).max(axis=1), 0.0)
            uimg, inv = np.unique(img, return_inverse=True)
            med = np.median(x8[uimg].reshape(len(uimg), h * w, c), axis=1)[inv]  # (t, c)
            off_bg = np.abs(bmean - med).max(axis=1)
            flag = (contrast >= min_contrast) & (off_bg >= min_contrast)
            if not flag.any():
                continue
            img, ys, xs = img[flag], ys[flag], xs[flag]
            g = i0 + img
            nr = rank[ys, xs]
            if si == 0:
                for j, loc in enumerate(NAMED_LOCATIONS):
                    named_flags[loc][g[nr == j]] = True
            # priority: earlier size, then named location order, then row-major position
            prio = si * 10**9 + np.where(nr >= 0, nr, len(NAMED_LOCATIONS) + ys * (w + 1) + xs)
            order = np.lexsort((prio, g))
            g, prio, ys, xs = g[order], prio[order], ys[order], xs[order]
            first = np.r_[True, g[1:] != g[:-1]]
            g, prio, ys, xs = g[first], prio[first], ys[first], xs[first]
            better = prio < best[g]
            g, prio, ys, xs = g[better], prio[better], ys[better], xs[better]
            best[g], by[g], bx[g], bk[g] = prio, ys, xs, k
    flagged = by >= 0
    at = np.full(n, "", dtype=object)
    for i in np.flatnonzero(flagged):
        k = int(bk[i])
        loc = next((lo for lo in NAMED_LOCATIONS if named_location(lo, (h, w), k) == (by[i], bx[i])), None)
        s_ = loc or f"[{by[i]}, {bx[i]}]"
        at[i] = s_ + (f" k={k}" if len(sizes) > 1 else "")
    df = pd.DataFrame({"abnormal_block": flagged, "abnormal_block_at": at.astype(str)})
    for loc in NAMED_LOCATIONS:
        df[f"block_{loc}"] = named_flags[loc]
    df["block_y"], df["block_x"], df["block_k"] = by, bx, bk
    return df


def block_flags_named(
    images: np.ndarray,
    block_size: int,
    low: float,
    high: float,
    max_std: float,
    min_contrast: float,
) -> pd.DataFrame:
    """Abnormal pixel blocks at the four corners and the centre only: the scan the gate used before
    :func:`block_flags_all` (kept as the reference that scan is tested against, and to measure what
    the named-only scan missed: a ``random``-location patch).

    A k x k block (k = ``block_size``) is *abnormal* when it is
    - uniform: every channel's pixel std <= ``max_std``;
    - extreme: every channel's mean <= ``low`` or every channel's mean >= ``high``;
    - foreign: it differs from its ring (the pixels within ``ring = max(1, k // 2)`` of the block,
      clipped to the image) by >= ``min_contrast`` in at least one channel's mean, *and* from the
      image's background (its per-channel median) by as much.
    The last condition is what keeps clean data quiet: the dark corners of digits are uniform and
    extreme, but so is the background of the whole image (a dark corner next to a stroke differs
    from its ring, not from the median); the white sky/background corners of CIFAR-10 photos are
    uniform and extreme, but so is their ring. A bright trigger patch pasted onto a dark digit, or
    onto a photo's content, differs from both. Hand-written because GX has no image statistic.

    Returns columns ``abnormal_block`` (bool), ``abnormal_block_at`` (location or ""), and
    ``block_<loc>`` (bool per location).
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    k = int(block_size)
    if k < 1 or k > min(h, w):
        raise StatsError(f"validate.block_size {k} does not fit the {h}x{w} images: use 1..{min(h, w)}")
    r = max(1, k // 2)
    med = np.empty((n, c), np.float32)  # per-image, per-channel median: the image's background
    for i in range(0, n, 4096):
        med[i : i + 4096] = np.median(images[i : i + 4096].reshape(-1, h * w, c), axis=1)
    out: dict[str, np.ndarray] = {}
    any_flag = np.zeros(n, bool)
    first = np.full(n, "", dtype=object)
    for loc in NAMED_LOCATIONS:
        y0, x0 = named_location(loc, (h, w), k)
        ya, yb, xa, xb = max(0, y0 - r), min(h, y0 + k + r), max(0, x0 - r), min(w, x0 + k + r)
        reg = images[:, ya:yb, xa:xb, :].astype(np.float32)  # only the region: CIFAR is 600 MB as float
        blk = reg[:, y0 - ya : y0 - ya + k, x0 - xa : x0 - xa + k, :]
        bmean = blk.mean(axis=(1, 2))  # (n, c)
        bstd = blk.std(axis=(1, 2)).max(axis=1)  # (n,)
        ring_n = (yb - ya) * (xb - xa) - k * k
        if ring_n <= 0:  # block covers the whole image: no ring to differ from
            contrast = np.zeros(n, np.float32)
        else:
            ring_mean = (reg.sum(axis=(1, 2)) - blk.sum(axis=(1, 2))) / ring_n
            contrast = np.abs(bmean - ring_mean).max(axis=1)
        extreme = (bmean <= low).all(axis=1) | (bmean >= high).all(axis=1)
        off_background = np.abs(bmean - med).max(axis=1) >= min_contrast
        flag = (bstd <= max_std) & extreme & (contrast >= min_contrast) & off_background
        out[f"block_{loc}"] = flag
        first = np.where(flag & ~any_flag, loc, first)
        any_flag |= flag
    df = pd.DataFrame(out)
    df.insert(0, "abnormal_block_at", first.astype(str))
    df.insert(0, "abnormal_block", any_flag)
    return df


def block_sizes(v: ValidateConfig, image_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """The block sides the gate scans: ``block_size`` .. ``block_size_max``, cut to the image
    (an 8x8 digit has no room for k = 9; k = block_size must fit, or the scan refuses)."""
    top = int(v.block_size_max)
    if image_shape is not None:
        top = min(top, int(min(image_shape[0], image_shape[1])))
    return tuple(range(int(v.block_size), max(int(v.block_size), top) + 1))


def block_flags_cfg(images: np.ndarray, v: ValidateConfig) -> pd.DataFrame:
    """The gate's block scan with the detector settings of ``conf/validate`` (every position, every
    size in :func:`block_sizes`)."""
    images = np.asarray(images)
    sizes = block_sizes(v, images.shape[1:3] if images.ndim == 4 else None)
    return block_flags_all(images, sizes, v.block_low, v.block_high, v.block_max_std, v.block_min_contrast)


def detector_settings(v: ValidateConfig) -> dict:
    """What a per-class block count depends on: the approved ledger records it with the counts, so
    counts measured with other settings are never compared with today's."""
    return {"scan": "all_positions", "block_size": int(v.block_size), "block_size_max": int(v.block_size_max),
            "block_low": float(v.block_low),
            "block_high": float(v.block_high), "block_max_std": float(v.block_max_std),
            "block_min_contrast": float(v.block_min_contrast)}


_HEX_VALUE = np.full(256, 255, np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def hash_keys(hashes: Sequence[str]) -> tuple[np.ndarray, object] | None:
    """The first 64 bits of every 64-hex content hash, as uint64, read from the Arrow buffer of a
    pandas Arrow-backed string column or array without a Python string a row; and the Arrow
    ChunkedArray they came from (for :func:`pick_hashes`). None when ``hashes`` is anything else
    (a list, an object array, a missing value, a string not 64 characters long): the callers then
    take the string path.

    Equal hashes give equal keys; different hashes almost never do (a 64-bit prefix of SHA-256),
    and never silently: every caller confirms a group of equal keys on the full strings of its few
    rows. So a string that is not hex is not refused here: it still has one key, only a less
    spread one. Hand-written because neither pandas nor Arrow parses hex into integers, and their hash
    tables over 1M 64-character strings were the data gate's largest transient (a Python str a
    row in ``label_conflicts``: +177 MiB at 1M rows; ``Series.duplicated``'s table: +143 MiB).
    """
    if not isinstance(hashes, (pd.Series, pd.api.extensions.ExtensionArray)):
        return None
    try:
        chunked = hashes.array.__arrow_array__() if isinstance(hashes, pd.Series) else hashes.__arrow_array__()
    except (AttributeError, TypeError):
        return None
    import pyarrow as pa

    if not (pa.types.is_string(chunked.type) or pa.types.is_large_string(chunked.type)) or chunked.null_count:
        return None
    wide = np.int64 if pa.types.is_large_string(chunked.type) else np.int32
    parts = []
    for chunk in chunked.chunks:
        n = len(chunk)
        offsets = np.frombuffer(chunk.buffers()[1], wide)[chunk.offset:chunk.offset + n + 1]
        if n and not (np.diff(offsets) == 64).all():
            return None
        if not n:
            continue
        data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(n, 64)
        key = np.zeros(n, np.uint64)
        for i in range(16):  # a column at a time: 1 byte a row of temporaries, not 16
            key <<= np.uint64(4)
            key ^= _HEX_VALUE[data[:, i]].astype(np.uint64)
        parts.append(key)
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint64)), chunked


def pick_hashes(chunked: object, rows: np.ndarray) -> list[str]:
    """The full hash strings of ``rows`` of the ChunkedArray :func:`hash_keys` returned."""
    import pyarrow as pa

    rows = np.asarray(rows, np.int64)
    out: list = [None] * len(rows)
    if not len(rows):
        return out
    # chunk by chunk: ChunkedArray.take joined the chunks first (a copy of the whole column, +29 MiB
    # at 1M rows, for a handful of rows)
    bounds = np.cumsum([0] + [len(c) for c in chunked.chunks])
    which = np.searchsorted(bounds, rows, side="right") - 1
    for c in np.unique(which):
        at = np.flatnonzero(which == c)
        for i, h in zip(at, chunked.chunk(int(c)).take(pa.array(rows[at] - bounds[c])).to_pylist()):
            out[i] = h
    return out


def same_key_rows(keys: np.ndarray) -> np.ndarray:
    """Rows (ascending) whose key is on another row too: the only rows that can share a hash."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    same = k[1:] == k[:-1]
    del k
    run = np.zeros(len(keys), bool)
    run[1:] |= same
    run[:-1] |= same
    return np.sort(order[run])


def duplicate_mask(hashes: Sequence[str]) -> np.ndarray:
    """True for every row whose content hash is on another row too. A pandas column or array is
    read as it is (an Arrow-backed one is not turned into Python strings: :func:`hash_keys`, then
    the full strings of the rows that share a key)."""
    keyed = hash_keys(hashes)
    if keyed is not None:
        keys, chunked = keyed
        mask = np.zeros(len(keys), bool)
        rows = same_key_rows(keys)
        if len(rows):
            mask[rows] = pd.Series(pick_hashes(chunked, rows), dtype=object).duplicated(keep=False).to_numpy(bool)
        return mask
    column = isinstance(hashes, (pd.Series, pd.api.extensions.ExtensionArray))
    s = pd.Series(hashes) if column else pd.Series(list(hashes), dtype=object)
    return s.duplicated(keep=False).to_numpy(bool)


def perceptual_hashes(images: np.ndarray, method: str = "phash") -> np.ndarray:
    """64-bit perceptual hash of every image (``imagehash.phash`` / ``dhash`` / ``average_hash``,
    hash_size 8) as uint64, colour images via their luminance. The snapshot stage computes it once
    per row as the row enters (~0.1-0.2 ms an image), and the data gate reads it back."""
    images = _check_images(images)
    if method == "phash":
        return _phash_batched(images)
    import imagehash
    from PIL import Image

    fns = {"dhash": imagehash.dhash, "average_hash": imagehash.average_hash}
    if method not in fns:
        raise StatsError(f"unknown perceptual hash {method!r}: use one of phash, {', '.join(fns)}")
    fn = fns[method]
    out = np.empty(len(images), np.uint64)
    grey = images.shape[3] == 1
    for i, im in enumerate(images):
        bits = fn(Image.fromarray(im[..., 0] if grey else im)).hash.reshape(-1).astype(np.uint8)
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


_PHASH_SIDE = 32  # imagehash.phash's hash_size 8 x highfreq_factor 4


@functools.cache  # found once a process
def _dct_ii() -> Callable[[np.ndarray, int], np.ndarray]:
    """``dct(x, axis)``: exactly what ``scipy.fftpack.dct(x, axis=axis)`` computes (imagehash's call),
    through scipy's own compiled pocketfft module.

    Why not ``import scipy.fftpack``: that import runs ``scipy.fft``'s package init (scipy.special,
    array-api-compat), ~0.3 s of CPU, the largest single fixed cost of a 1% append at 100k
    (``bench/append_profile.py``; issue 19 item 1). The compiled module needs none of it, so it is
    loaded from scipy's folder by path (1 ms). Any surprise (no such file, another signature, a
    wrong answer on a probe) falls back to ``scipy.fftpack``; ``tests/test_datastats.py`` checks
    the hashes bit for bit against imagehash, which goes through ``scipy.fftpack``."""
    fn = None
    if "scipy.fft" not in sys.modules:  # else the package is loaded anyway: nothing to save
        try:
            fn = _private_pocketfft_dct()
        except Exception:  # noqa: BLE001 - an optimisation only: scipy.fftpack is always right
            fn = None
    if fn is None:
        import scipy.fftpack

        def fn(x: np.ndarray, axis: int) -> np.ndarray:
            return scipy.fftpack.dct(x, axis=axis)
    return fn


def _private_pocketfft_dct() -> Callable[[np.ndarray, int], np.ndarray] | None:
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("scipy")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "fft" / "_pocketfft"
    files = [f for sfx in importlib.machinery.EXTENSION_SUFFIXES for f in folder.glob("pypocketfft" + sfx)]
    if len(files) != 1:
        return None
    name = "scipy.fft._pocketfft.pypocketfft"  # its init function's name; not put in sys.modules
    loader = importlib.machinery.ExtensionFileLoader(name, str(files[0]))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, files[0], loader=loader))
    loader.exec_module(mod)

    def fn(x: np.ndarray, axis: int) -> np.ndarray:
        # scipy.fft._pocketfft.realtransforms._r2r for a real, unpadded, forward type-2 transform:
        # float64 input, norm None (inorm 0), no output array, 1 worker, orthogonalize None
        return mod.dct(np.asarray(x, np.float64), 2, (axis,), 0, None, 1, None)

    # the textbook DCT-II, 2 sum x_n cos(pi k (2n + 1) / 2N), of a probe shaped as phash's batches,
    # along the axes phash uses
    probe = (np.arange(2 * _PHASH_SIDE * _PHASH_SIDE, dtype=np.float64) % 251).reshape(2, _PHASH_SIDE, _PHASH_SIDE) ** 1.5
    for axis in (1, 2):
        n = probe.shape[axis]
        basis = 2 * np.cos(np.pi * np.arange(n)[:, None] * (2 * np.arange(n)[None, :] + 1) / (2 * n))
        want = np.moveaxis(np.tensordot(basis, np.moveaxis(probe, axis, 0), axes=1), 0, axis)
        if not np.allclose(fn(probe, axis), want, rtol=1e-12, atol=1e-9):
            return None
    return fn


def _phash_batched(images: np.ndarray) -> np.ndarray:
    """``imagehash.phash`` (hash_size 8) of a batch, bit for bit: the same PIL greyscale conversion
    and Lanczos resize per image, then the two DCTs, the 8x8 low band and its median for 512 images
    per call. imagehash takes one image per call; its per-image DCT and median were half the
    snapshot stage's feature time (tests/test_datastats.py checks the equality with imagehash)."""
    from PIL import Image

    dct = _dct_ii()
    grey = images.shape[3] == 1
    out = np.empty(len(images), np.uint64)
    # 512 images a DCT call: the float64 transforms of a whole 4,096-row chunk raised the peak by
    # ~70 MiB (~11 MiB at 512; one chunk of 28x28 rows, bench/results/memory_micro.md)
    for s0 in range(0, len(images), 512):
        part = images[s0:s0 + 512]
        small = np.empty((len(part), _PHASH_SIDE, _PHASH_SIDE), np.uint8)
        for i, im in enumerate(part):
            small[i] = np.asarray(Image.fromarray(im[..., 0] if grey else im).convert("L")
                                  .resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS))
        low = dct(dct(small, 1), 2)[:, :8, :8].reshape(len(part), 64)
        bits = low > np.median(low, axis=1, keepdims=True)
        out[s0:s0 + len(part)] = np.packbits(bits, axis=1).view(">u8")[:, 0]
    return out


FEATURE_CHUNK_ROWS = 4096  # rows per chunk: the block scan's integral images are ~8x the chunk's pixels


def row_features(images, v: ValidateConfig, rows: Sequence[int] | np.ndarray | None = None,
                 on_chunk: Callable[[np.ndarray, np.ndarray], None] | None = None) -> pd.DataFrame:
    """What the data gate needs of each row's pixels, once per row (issue 19 item 2): the 64-bit
    perceptual hash and the block scan of ``conf/validate`` (:func:`block_flags_cfg`), columns
    ``phash``, ``abnormal_block``, ``abnormal_block_at``. The snapshot stage computes them as rows enter the store; the data gate
    computes them only for rows it has no stored columns for (a poisoned row, another detector
    setting). ``images`` may be lazy (``pipeline.data.rows``): chunks of ``FEATURE_CHUNK_ROWS``
    rows are read at a time, so memory stays flat whatever the row count. ``on_chunk(rows, pixels)``
    sees each chunk as it is read (the data gate checks the rows' hashes there: one read a row)."""
    from pipeline.data.rows import take

    idx = np.arange(len(images)) if rows is None else np.asarray(rows, np.int64)
    phash = np.empty(len(idx), np.uint64)
    flag = np.zeros(len(idx), bool)
    at = np.full(len(idx), "", dtype=object)
    for s in range(0, len(idx), FEATURE_CHUNK_ROWS):
        chunk = np.asarray(take(images, idx[s:s + FEATURE_CHUNK_ROWS]))
        if on_chunk is not None:
            on_chunk(idx[s:s + FEATURE_CHUNK_ROWS], chunk)
        e = s + len(chunk)
        phash[s:e] = perceptual_hashes(chunk)
        f = block_flags_cfg(chunk, v)
        flag[s:e] = f["abnormal_block"].to_numpy(bool)
        at[s:e] = f["abnormal_block_at"].to_numpy(object)
    return pd.DataFrame({"phash": phash, "abnormal_block": flag, "abnormal_block_at": at.astype(str)})


def label_shares(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Fraction of the rows in each class (reports)."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels[(labels >= 0) & (labels < n_classes)], minlength=n_classes).astype(float)
    return counts / max(1, len(labels))
