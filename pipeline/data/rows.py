"""Rows read on demand from the store's packs: a read-only (N, H, W, C) uint8 array-like.

Issue 19 item 3: the train stage must not hold the data set in RAM two or three times (the
snapshot, its train split, the view with its records applied). :class:`LazyRows` holds, per row,
which pack it is in and where, plus the few rows a view replaces (poison records); pixels are
read only when indexed. Indexing follows numpy: an integer gives one row, a slice, an index
array or a boolean mask gives a new in-memory array of those rows (so the training loop's
DataLoader, ``channel_stats`` and fastnet's strided sample work unchanged); ``subset`` and
``with_rows`` give new lazy views without reading a pixel; ``np.asarray(rows)`` reads them all
(the resident fast path).

Each read ``pread``s its rows (:func:`read_rows`), nothing stays mapped: a mapping kept open would
leave every page it ever touched counted in the process's resident memory, which would then grow
with N over an epoch, and a mapping made for each read cost 2x in a streamed epoch.
The packs were hashed when the snapshot was loaded; each read opens the file, and its
(device, inode, size, mtime) must still be the ones recorded then, else ``DamagedStore``: a pack
replaced or rewritten during a long training run is refused, not trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.rows import take  # noqa: F401  (the data layer's callers import it from here)


class Prefixed:
    """A string column whose every value is ``prefix`` + the value of ``values`` at that row, made
    only for the rows a caller takes: a folder source's URIs are its path + "::" + each sample id,
    and the whole column (62 MiB at 1M files) was built on every read while a no-op takes none of
    it (issue 19 item 3). :func:`as_strings` and :func:`as_list` give the whole column."""

    def __init__(self, prefix: str, values: pa.Array):
        self.prefix, self.values = prefix, values

    def __len__(self) -> int:
        return len(self.values)

    def take(self, at) -> pa.Array:
        return self._join(self.values.take(at))

    def column(self) -> pa.Array:
        return self._join(self.values)

    def _join(self, values: pa.Array) -> pa.Array:
        return pc.binary_join_element_wise(pa.scalar(self.prefix), values, pa.scalar(""))


def as_strings(values) -> pa.Array:
    """A column of strings as an Arrow ``string`` array: from a list, a numpy array, a pandas
    column, an Arrow (chunked) array or :class:`Prefixed`. Arrow, not Python objects: at 1M rows a
    column of sha256 hex strings is 68 MB here against 121 MB as ``str`` objects (issue 19 item 3).
    A pandas column of several chunks (a manifest loaded from several deltas) comes back as a
    ChunkedArray sharing them: combining would copy the column (:func:`take_strings` reads it)."""
    if isinstance(values, Prefixed):
        return values.column()
    if str(getattr(values, "dtype", "")) == "category":
        # a pandas categorical as Arrow's dictionary, cast below: ~25x faster at 1M rows than
        # pa.array(values, pa.string()), which makes a Python string a row first
        values = pa.array(values)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values if values.type == pa.string() else values.cast(pa.string())
    return pa.array(values, pa.string())


def take_strings(col: pa.Array | pa.ChunkedArray, pos: np.ndarray) -> pa.Array:
    """``col`` (a string column) at ``pos``, "" where ``pos`` is -1, as one array.

    Hand-written because Arrow's own ways cost a column or two more at the peak (issue 19 item 3:
    the snapshot stage looks the store's 1M recorded hashes up this way on every run): ``take``
    on a ChunkedArray (a manifest loaded from several deltas) concatenates the chunks first,
    65 MiB for a hash column at 1M rows even for a take of 32 rows, and ``if_else`` for the ""
    grows its output by doubling. Here each chunk is taken from where it is, the "" is one more
    chunk, and the pieces are put back in ``pos``'s order."""
    chunks = list(col.chunks) if isinstance(col, pa.ChunkedArray) else [col]
    pos = np.asarray(pos, np.int64)
    if (pos < 0).any():
        pos = np.where(pos >= 0, pos, len(col))
        chunks.append(pa.array([""], col.type))
    chunks = [c for c in chunks if len(c)] or [pa.array([], col.type)]
    bounds = np.cumsum([0] + [len(c) for c in chunks])
    which = np.searchsorted(bounds, pos, side="right") - 1
    if not len(pos) or which.min() == which.max():  # one chunk holds every row asked for
        k = int(which[0]) if len(pos) else 0
        return chunks[k].take(pa.array(pos - bounds[k]))
    order = np.argsort(which, kind="stable")
    ks, starts = np.unique(which[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    grouped = pa.concat_arrays([chunks[k].take(pa.array(pos[order[a:b]] - bounds[k]))
                                for k, a, b in zip(ks.tolist(), starts.tolist(), ends.tolist())])
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return grouped.take(pa.array(back))


def as_list(values) -> list:
    """A column as a Python list (for the per-row paths: error messages, archive members)."""
    if isinstance(values, Prefixed):
        values = values.column()
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_pylist()
    return values if isinstance(values, list) else list(values)


def blank_strings(n: int) -> pa.Array:
    """n empty strings (the "unknown" of a string column)."""
    return pa.array(np.full(n, "", object), pa.string())


def file_identity(path: Path | str) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns) of a pack: what a read checks against the verified file."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class LazyRows:
    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, packs: list[tuple[Path, int, int, tuple]], pack_of: np.ndarray, index: np.ndarray,
                 image_shape: tuple[int, ...], replaced: Optional[dict[int, np.ndarray]] = None):
        """``packs``: (path, header bytes, rows, :func:`file_identity` when verified) of each .npy
        pack; ``pack_of``/``index``: each row's pack number and row inside it; ``replaced``:
        row -> pixels that replace the pack's."""
        self._packs = packs
        self._pack_of = np.asarray(pack_of, np.int32)
        self._index = np.asarray(index, np.int64)
        self._image_shape = tuple(int(x) for x in image_shape)
        self._replaced = dict(replaced or {})

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._index), *self._image_shape)

    def __len__(self) -> int:
        return len(self._index)

    def subset(self, rows) -> "LazyRows":
        """These rows (an index array or a boolean mask), in that order, still lazy."""
        rows = self._positions(rows)
        hit = self._hits(rows)  # every position of a replaced row, a repeated one included
        return LazyRows(self._packs, self._pack_of[rows], self._index[rows], self._image_shape,
                        {int(k): self._replaced[int(rows[k])] for k in hit})

    def _hits(self, rows: np.ndarray) -> np.ndarray:
        if not self._replaced:
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.isin(rows, np.fromiter(self._replaced, np.int64, len(self._replaced))))

    def with_rows(self, updates: dict[int, np.ndarray]) -> "LazyRows":
        """A copy in which row i reads as ``updates[i]`` (copy on write: neither this one nor the
        caller's arrays are shared)."""
        new = {}
        for i, img in updates.items():
            k = int(self._positions(np.array([i]))[0])
            img = np.asarray(img)
            if tuple(img.shape) != self._image_shape or img.dtype != np.uint8:
                raise ValueError(f"row {i}: {img.dtype} {img.shape} is not a uint8 {self._image_shape} image")
            new[k] = img.copy()
        return LazyRows(self._packs, self._pack_of, self._index, self._image_shape, {**self._replaced, **new})

    def _positions(self, key) -> np.ndarray:
        """Row positions of an index array (negatives from the end) or a boolean mask, range-checked."""
        rows = np.asarray(key)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise IndexError(f"boolean index of shape {rows.shape} for {len(self)} rows")
            return np.flatnonzero(rows)
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows are indexed by integers or a boolean mask, not {rows.dtype}")
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return np.where(rows < 0, rows + len(self), rows)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # rows only: numpy's per-axis indexing would need the pixels first
            raise TypeError("LazyRows is indexed by rows only (int, slice, index array, boolean mask); "
                            "index the returned array for pixels")
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            return self._read(np.array([i]))[0]
        if isinstance(key, slice):
            return self._read(np.arange(len(self))[key])
        return self._read(self._positions(key))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self._image_shape), np.uint8)
        if not len(rows):
            return out
        codes = self._pack_of[rows]
        order = np.argsort(codes, kind="stable")  # one open per pack touched, rows in file order
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for grp in np.split(order, bounds):
            path, offset, n, identity = self._packs[int(codes[grp[0]])]
            at = self._index[rows[grp]]
            srt = np.argsort(at, kind="stable")
            with open(path, "rb", buffering=0) as fh:  # the identity of the file actually read, not of the path
                st = os.fstat(fh.fileno())
                if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != tuple(identity):
                    _changed(path)
                if not read_rows(fh.fileno(), offset, at[srt], out, grp[srt]):
                    _changed(path)
        for k in self._hits(rows):
            out[k] = self._replaced[int(rows[k])]
        return out


def _changed(path) -> None:
    from pipeline.data.store import DamagedStore

    raise DamagedStore(Path(path).parent.parent, path, "changed after it was verified (replaced or rewritten while it "
                       "was being read)")


def read_rows(fd: int, offset: int, at: np.ndarray, out: np.ndarray, dest: np.ndarray) -> bool:
    """Rows ``at`` (ascending) of the rows stored back to back from byte ``offset`` of file ``fd``
    into ``out[dest]`` (``out`` C-contiguous): one ``pread`` a run of rows consecutive both in the
    file and in ``out``, straight into ``out``. False when the file ends before a row does.

    Hand-written: a memmap made for each read (what LazyRows did) faults its pages in afresh every
    time: 512 random 28x28 rows of a 1M-row pack took 4.8-5.9 ms that way, 1.4-1.7 ms by ``pread``,
    and a streamed epoch reads ~1,600 such batches (bench/results/lazy_rows_read_1m.log; a streamed
    H200 epoch over such a store went from 21.0 to 8.3 s). One mapping kept open is faster still
    (0.25 ms), but every page it touched counts in the process's RSS: 621 MiB after 400 batches."""
    if not len(at):
        return True
    size = out[0].nbytes
    flat = memoryview(out).cast("B")
    cut = np.flatnonzero((np.diff(at) != 1) | (np.diff(dest) != 1)) + 1
    starts = np.r_[0, cut]
    ends = np.r_[cut, len(at)]
    for a, b, r0, d0 in zip(starts.tolist(), ends.tolist(), at[starts].tolist(), dest[starts].tolist()):
        view, pos, done = flat[d0 * size:(d0 + b - a) * size], offset + r0 * size, 0
        while done < len(view):  # a read returns at most ~2 GiB on Linux: a bigger run takes several
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                return False
            done += got
    return True


class RawBlobs:
    """Variable-length byte strings (image files as they were read) stored back to back in one
    file, read on demand (:meth:`iter_bytes`, :meth:`subset`). What the snapshot stage keeps of a
    transformed source's files (issue 19 item 5), spilled as they are read and copied into the
    store's raw pack; memory holds offsets, not bytes."""

    def __init__(self, path: Path | str, offsets: np.ndarray, lengths: np.ndarray):
        self.path = Path(path)
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.asarray(lengths, np.int64)
        if self.offsets.shape != self.lengths.shape:
            raise ValueError(f"{len(self.offsets)} offsets for {len(self.lengths)} lengths")

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, rows) -> "RawBlobs":
        rows = np.asarray(rows, np.int64)
        return RawBlobs(self.path, self.offsets[rows], self.lengths[rows])

    def iter_bytes(self):
        """Each blob's bytes, in order (one open file, positioned reads)."""
        with open(self.path, "rb") as fh:
            fd = fh.fileno()
            for off, n in zip(self.offsets.tolist(), self.lengths.tolist()):
                data = os.pread(fd, n, off)
                if len(data) != n:
                    raise OSError(f"{self.path}: {n} bytes at {off} expected, {len(data)} there (the file shrank)")
                yield data
