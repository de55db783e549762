"""Data sources: one small interface, three kinds of data, all decoded to uint8 (N, H, W, C).

``load_source(data_cfg) -> SourceData`` decodes a whole source (tests, benches, calibration).
The snapshot stage uses ``read_source(data_cfg, known=..., stat=...) -> SourceRead``, the
incremental read: it decodes only what the store does not already hold (see "Incremental read").

Kinds (``data.name``)
---------------------
- ``digits``: scikit-learn's bundled 8x8 digits (no download). Values 0..16 are scaled to
  ``round(v * 255 / 16)`` so every source is uint8; shape (8, 8, 1). The split is a stratified
  ``train_test_split`` on ``data.test_fraction`` / ``data.seed``. Ids ``digits/<split>/<idx>``,
  URIs ``sklearn://load_digits/<idx>``.
- ``imagefolder``: ``data.path`` is one of
    * a folder with ``train/<class>/*`` and ``test/<class>/*``;
    * a single ``.tar.gz`` (or ``.tgz`` / ``.tar``) holding ``train/`` and ``test/``;
    * a folder with two archives, ``*-train.tar.gz`` and ``*-test.tar.gz`` (or ``train.tar.gz`` /
      ``test.tar.gz``), each holding its own split.
  Ids ``<split>/<class>/<file>`` (the path inside the source), URIs ``<source>::<member>``
  where ``<source>`` is ``data.path`` as configured (or the archive inside it), so manifests do not
  depend on where the repository is checked out.
- ``cifar10``: an ``imagefolder`` with CIFAR-10's ten class names; ``data.path`` defaults to
  ``../shared/datasets/cifar10``. When the path is missing and ``data.download`` is true, torchvision
  downloads CIFAR-10 and it is exported to ImageFolder PNGs under ``data.path`` (needs internet).

Decisions (each one tested)
---------------------------
- Class names are the sorted folder names of ``train/``; ``test/`` must hold the same set.
  Label = index in that list.
- Row order is deterministic: split (train, test), then class, then file name (string order).
- ``data.limit`` keeps at most N rows per split, taken round-robin over the classes (first file of
  each class, then the second, ...) so every class is represented; growing the limit only adds rows.
- Decoding is Pillow's (PNG, JPEG, BMP, WebP; single frame). Colour handling:
  ``1``/``L`` -> 1 channel; ``RGB``/``YCbCr``/``CMYK`` -> 3 channels; palette (``P``) -> ``L`` when
  every palette entry it uses is grey, else ``RGB``; an alpha channel (``LA``, ``RGBA``, ``P`` with
  transparency) is dropped when it is fully opaque and REFUSED otherwise (flattening onto a
  background would invent pixels: the user must decide the background). 16-bit and float images are
  refused (the store holds uint8). A data set mixing 1-channel and 3-channel images is REFUSED
  (converting silently would hide what is most likely a mistake in the data); so is a data set with
  more than one image size, unless ``data.resize: [H, W]`` is set: then every image is resized when
  it is ingested (``data.resize_mode``: ``fit`` = scale and centre-crop, ``stretch``; see
  :class:`Resize`). The source files stay untouched (each row keeps its file's byte digest), the
  store holds the resized pixels (their hash is the row's sha256), and the transform is recorded in
  the snapshot header and is part of the lineage key: changing it starts a new lineage. Both errors
  name the minority files.
- Anything in a class folder that Pillow cannot read as an image (including hidden files) is an
  error, never skipped: silently dropping a file would make the snapshot disagree with its source.
- Symlinks (in a folder or an archive), hard links (a folder file with ``st_nlink > 1``, or a tar
  hard-link member), device files, absolute tar member names and ``..`` components are refused: a
  source must be a self-contained tree that DVC can hash. A file or member name that is not UTF-8
  is refused with its bytes shown (ids and manifests are UTF-8).

Hostile input is bounded before it is read (issue 16 item 7): a file or tar member larger than
``data.max_file_bytes`` is refused from its stat / tar header, without reading it; an image whose
header announces more than ``data.max_image_pixels`` pixels is refused before Pillow decodes it
(Pillow's own decompression-bomb guard is set to the same bound). The bytes waiting to be decoded
are bounded too: a chunk sent to a worker holds at most ``CHUNK_SIZE`` files and ``CHUNK_BYTES``.

Incremental read
----------------
``read_source`` gets what the store knows about every earlier row (``known``: sample id ->
pixel hash and the byte digest of the file it was ingested from) and a local stat cache (``stat``:
sample id -> size, mtime, byte digest, pixel hash of the file when last confirmed):

- folder source: the tree is listed with ``os.scandir`` (no file is opened). A known file whose
  (size, mtime_ns) equals its stat-cache entry, recorded for the same pixel hash, is trusted without
  a read, unless its mtime is within ``RACY_NS`` of the scan that recorded it (git's "racily
  clean" rule: a file written in the same clock tick as the scan may have changed unseen). Every
  other known file is read and its sha256 compared with the recorded digest; only when the bytes
  differ is it decoded and its pixels compared (a re-encoded but pixel-identical file is fine).
  New files are read, digested and decoded. Each run also re-reads ``data.recheck_files`` randomly
  chosen trusted files (a spot check of the stat shortcut).
- archive source: a .tar.gz cannot be stat-checked per member, so each archive's sha256 is
  computed (one sequential read, ~1 GB/s; no decompression). When every archive's digest and
  ``data.limit`` equal what the parent snapshot recorded, the source is unchanged and nothing is
  decompressed. Otherwise the archives are streamed and each member's digest compared with the
  recorded one; only new or changed members are decoded.
- ``verify=True`` (``data.verify_source``, ``--verify``): every file is read and decoded and its
  pixels compared (the full check; costs a cold snapshot).

Speed: archives are read sequentially in the parent (a .tar.gz cannot be seeked) and the member
bytes go in chunks to a process pool that decodes and hashes them (``data.workers``, 0 = one per
core).
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import operator
import os
import random
import re
import stat as stat_mod
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.rows import Prefixed, as_list, as_strings, blank_strings, take_strings
from pipeline.schema import DataConfig
from pipeline.console import progress_bar
from pipeline.errors import UserError

SPLITS = ("train", "test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_DEFAULT_PATH = "../shared/datasets/cifar10"
FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
CHUNK_SIZE = 500  # images per task sent to a worker: large enough to amortise pickling
# Rows per block when the stat cache's hashes are compared with the store's: a block's two hash
# columns are ~8 MiB; a block of every row was 130 MiB at 1M files (issue 19 item 3).
COMPARE_ROWS = 65536
# Bytes per task: with at most 2 tasks per worker in flight, the undecoded bytes held stay near
# (2 * workers + 2) * (CHUNK_BYTES + data.max_file_bytes), whatever the files' count or size.
CHUNK_BYTES = 16 * 1024**2
MAX_LISTED = 10  # offending files named in one error message
DEFAULT_MAX_FILE_BYTES = 64 * 1024**2  # = schema.DataConfig.max_file_bytes
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # = schema.DataConfig.max_image_pixels
# A file whose mtime is this close to the scan that recorded its stat is re-read next time:
# file systems stamp mtimes with a coarse clock (a jiffy; 2 s on FAT), so a write in the same tick
# as the scan leaves (size, mtime) unchanged (git's "racily clean" index entries).
RACY_NS = 2_000_000_000
# Files per part of a folder's listing (_walk_folder): the no-op's comparison holds one part's ids,
# stats and cache rows (~2 MiB), not a whole class folder's (~80k files at 1M rows)
WALK_PART = 16384
# The local stat cache's columns (``snapshot.write_stat_cache``): per file, the (size, mtime) it had
# when its bytes hashed to ``file_sha256`` and decoded to pixels hashing to ``sha256``
STAT_SCHEMA = pa.schema([("sample_id", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                         ("file_sha256", pa.string()), ("sha256", pa.string())])

Progress = Optional[Callable[[str], None]]


class SourceError(UserError):
    """A data source the pipeline refuses to read; the message names the file and the fix."""


@dataclass(frozen=True)
class SourceData:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), index into class_names
    class_names: list[str]
    splits: np.ndarray  # str (N,), "train" | "test"
    sample_ids: list[str]
    uris: list[str]
    key: str = ""  # lineage key of the store (see source_key)
    spec: dict = field(default_factory=dict)  # what identifies the source, for the snapshot meta

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass
class KnownRows:
    """What the store recorded about its earlier rows, as Arrow columns: sample id -> pixel hash
    and the byte digest of the file the row was ingested from ("" when not a file). Columns, not
    Python objects: the snapshot stage builds this for every row on every run, and at 1M rows a
    dict of ids and object arrays of hex strings cost ~0.5 GB (issue 19 item 3); lookups are
    Arrow's hash join (``pc.index_in``)."""

    ids: pa.Array
    sha256: pa.Array
    file_sha256: pa.Array
    _pos: Optional[dict[str, int]] = None

    def __post_init__(self) -> None:
        self.ids, self.sha256, self.file_sha256 = (as_strings(c) for c in (self.ids, self.sha256, self.file_sha256))
        if not len(self.ids) == len(self.sha256) == len(self.file_sha256):
            raise ValueError(f"{len(self.ids)} ids, {len(self.sha256)} hashes and {len(self.file_sha256)} digests")

    @classmethod
    def empty(cls) -> "KnownRows":
        return cls([], [], [])

    def positions(self, ids) -> np.ndarray:
        """Row of each id here, -1 when unknown."""
        if not len(self.ids):
            return np.full(len(ids), -1, np.int64)
        pos = pc.index_in(as_strings(ids), value_set=self.ids)
        return pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def take(self, column: str, pos: np.ndarray) -> pa.Array:
        """``column`` ("sha256" or "file_sha256") at ``pos`` (from :meth:`positions`), "" at -1."""
        col = getattr(self, column)
        if not len(col):
            return blank_strings(len(pos))
        return take_strings(col, pos)  # a manifest's chunks are not concatenated for it

    def get(self, sample_id: str) -> Optional[tuple[str, str]]:
        if self._pos is None:
            self._pos = dict(zip(self.ids.to_pylist(), range(len(self.ids))))
        i = self._pos.get(sample_id)
        return None if i is None else (self.sha256[i].as_py(), self.file_sha256[i].as_py())


@dataclass
class StatTable(KnownRows):
    """The local stat cache of a folder source: per file, the (size, mtime) it had when its bytes
    hashed to ``file_sha256`` and decoded to pixels hashing to ``sha256``; ``scan_ns`` is when the
    scan that recorded it started (see RACY_NS)."""

    size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mtime_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scan_ns: int = 0
    snapshot: str = ""  # the snapshot whose rows the cache's hashes are (the run that wrote it made it current)

    def same_as(self, other: Optional["StatTable"]) -> bool:
        return (other is not None and self.ids.equals(other.ids) and np.array_equal(self.size, other.size)
                and np.array_equal(self.mtime_ns, other.mtime_ns)
                and self.sha256.equals(other.sha256) and self.file_sha256.equals(other.file_sha256))

    def without(self, ids: Iterable[str]) -> "StatTable":
        """This cache less the entries of ``ids`` (files it must no longer vouch for)."""
        keep = pc.invert(pc.is_in(self.ids, value_set=pa.array(list(ids), pa.string())))
        mask = keep.to_numpy(zero_copy_only=False)
        return StatTable(self.ids.filter(keep), self.sha256.filter(keep), self.file_sha256.filter(keep),
                         size=self.size[mask], mtime_ns=self.mtime_ns[mask], scan_ns=self.scan_ns,
                         snapshot=self.snapshot)


@dataclass
class SourceRead:
    """The outcome of an incremental read: every row of the source, decoded only where needed.

    ``images`` holds the decoded rows only (``decoded`` marks them, in row order); a row that was
    not decoded carries the pixel hash the store recorded for it (``hashes``), confirmed by its
    file's stat or byte digest. ``unchanged`` is the archive shortcut: the archives are the ones
    the parent snapshot was ingested from, so nothing was read and the row fields are empty.
    """

    sample_ids: list[str] | pa.Array  # a folder source's string columns are Arrow arrays (as_strings / as_list)
    class_names: list[str]
    labels: np.ndarray  # int64, index into class_names
    splits: np.ndarray
    uris: list[str] | pa.Array | Prefixed  # a folder's: its path + "::" + each id, made for the rows taken
    hashes: list[str] | pa.Array  # pixel sha256 (core.hashing.sample_hash) of every row
    file_sizes: np.ndarray  # int64 bytes of the file each row came from; -1 when not a file
    file_sha256: list[str] | pa.Array  # sha256 of those bytes; "" when not a file or not read this run
    decoded: np.ndarray  # bool (N,)
    images: np.ndarray  # uint8 (n_decoded, H, W, C)
    key: str = ""
    spec: dict = field(default_factory=dict)  # what the snapshot header records about the source
    work: dict = field(default_factory=dict)  # counters: listed, trusted, read, decoded, ...
    stat: Optional[StatTable] = None  # the stat cache after this read (folder sources)
    stat_changed: bool = False  # stat differs from the cache it started from
    unchanged: bool = False
    decoded_rows: Optional["_Decoded"] = None  # owns the spill file behind a lazy ``images``
    raw: Optional[object] = None  # the decoded rows' file bytes (rows.RawBlobs), when a transform is set

    def discard(self) -> None:
        """Remove the spill file of the decoded pixels (``read_source(spill_dir=...)``): call it
        once the snapshot is written; ``images`` cannot be read after."""
        if self.decoded_rows is not None:
            self.decoded_rows.discard()

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass(slots=True)
class _Entry:
    """One file of a file source, before decoding (slots, not frozen: one per file, made fast)."""

    split: str
    cls: str
    name: str  # file name inside the class folder
    uri: str
    sample_id: str  # f"{split}/{cls}/{name}"
    size: int = -1  # bytes, from the listing (folders) or the tar header
    mtime_ns: int = -1  # folders only
    path: str = ""  # the file on disk (folders only)

    @property
    def order(self) -> tuple[int, str, str]:
        return (SPLITS.index(self.split), self.cls, self.name)


@dataclass(frozen=True)
class Resize:
    """The transform that makes images of any size one shape (``data.resize``, ``data.resize_mode``).

    ``fit``: scale the shorter side to fit, then crop the centre (Pillow's ``ImageOps.fit``, the
    shape of torchvision's ``Resize`` + ``CenterCrop``); ``stretch``: scale both sides (the aspect
    ratio changes). Bilinear, Pillow's. An image already of the target size is not resampled.
    ``VERSION`` names this definition: it is part of the source's lineage key, so a changed
    transform starts a new lineage instead of rewriting recorded rows.
    """

    height: int
    width: int
    mode: str = "fit"

    VERSION = 1
    MODES = ("fit", "stretch")

    def record(self) -> dict:
        return {"kind": "resize", "size": [self.height, self.width], "mode": self.mode,
                "interpolation": "bilinear", "version": self.VERSION}

    def apply(self, img: np.ndarray) -> np.ndarray:
        from PIL import Image, ImageOps

        if img.shape[:2] == (self.height, self.width):
            return img
        im = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        size = (self.width, self.height)
        out = (ImageOps.fit(im, size, method=Image.Resampling.BILINEAR) if self.mode == "fit"
               else im.resize(size, Image.Resampling.BILINEAR))
        return _as_hwc(np.asarray(out))


def resize_of(cfg: DataConfig) -> Optional[Resize]:
    r = getattr(cfg, "resize", None)
    if r is None:
        return None
    return Resize(int(r[0]), int(r[1]), str(getattr(cfg, "resize_mode", "fit")))


@dataclass(frozen=True)
class _Limits:
    """How a file becomes a row: the bounds checked before decoding, and the resize transform."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    resize: Optional[Resize] = None


# ----------------------------------------------------------------------------- public API


def source_spec(cfg: DataConfig) -> dict:
    """What identifies a source's lineage: everything that changes which rows it has or their ids.

    ``data.limit`` is left out on purpose: growing it only appends rows, shrinking it is a loss of
    rows that the store must refuse, not a new lineage.
    """
    if cfg.name == "digits":
        return {"name": "digits", "test_fraction": float(cfg.test_fraction), "seed": int(cfg.seed)}
    spec = {"name": cfg.name, "path": os.path.normpath(resolve_path(cfg))}
    r = resize_of(cfg)
    if r is not None:  # only when set: every source without a transform keeps its key
        spec["transform"] = r.record()
    return spec


def source_key(cfg: DataConfig) -> str:
    spec = source_spec(cfg)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec['name']}-{digest}"


def resolve_path(cfg: DataConfig) -> str:
    if cfg.path:
        return str(cfg.path)
    if cfg.name == "cifar10":
        return CIFAR10_DEFAULT_PATH
    raise SourceError(f"data.name={cfg.name} needs data.path (a folder or .tar.gz with train/<class>/* and test/<class>/*)")


def _limits(cfg: DataConfig) -> _Limits:
    return _Limits(int(getattr(cfg, "max_file_bytes", DEFAULT_MAX_FILE_BYTES)),
                   int(getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)), resize_of(cfg))


def load_source(cfg: DataConfig, progress: Progress = None) -> SourceData:
    """Load the configured source as decoded uint8 arrays (see the module docstring)."""
    if cfg.name == "digits":
        data = load_digits(cfg.test_fraction, cfg.seed, cfg.limit)
    elif cfg.name == "cifar10":
        data = load_cifar10(cfg, progress)
    elif cfg.name == "imagefolder":
        lim = _limits(cfg)
        data = load_imagefolder(resolve_path(cfg), cfg.limit, cfg.workers, progress=progress,
                                max_file_bytes=lim.max_file_bytes, max_image_pixels=lim.max_pixels,
                                resize=lim.resize)
    else:
        raise SourceError(f"unknown data.name {cfg.name!r}: use digits, cifar10 or imagefolder")
    return SourceData(
        images=data.images, labels=data.labels, class_names=data.class_names, splits=data.splits,
        sample_ids=data.sample_ids, uris=data.uris, key=source_key(cfg), spec=source_spec(cfg),
    )


def read_source(cfg: DataConfig, known: Optional[KnownRows] = None, stat: Optional[StatTable] = None,
                previous: Optional[dict] = None, verify: bool = False, recheck: Optional[int] = None,
                progress: Progress = None, spill_dir: Optional[str | Path] = None,
                listing: Optional[list["_Listing"]] = None) -> SourceRead:
    """Read the configured source, decoding only the rows ``known`` cannot vouch for.

    ``known``: what the parent snapshot recorded; ``stat``: the local stat cache; ``previous``:
    the parent snapshot's ``source`` record (archive digests, limit); ``verify``: decode
    everything (full check). See "Incremental read" in the module docstring. ``spill_dir``: the
    decoded pixels of an image source go to a file there as they are decoded and ``images`` reads
    them lazily, so memory does not grow with the rows decoded; call ``discard()`` after.
    ``listing``: ``[the folder source's listing]`` that :func:`listing_unchanged` made this run:
    not listed again (ignored with ``data.limit``); the read empties the list, so the listing is
    freed with the columns made from it, not held by the callers' frames.
    """
    if cfg.name not in ("digits", "cifar10", "imagefolder"):
        raise SourceError(f"unknown data.name {cfg.name!r}: use digits, cifar10 or imagefolder")
    verify = bool(verify or getattr(cfg, "verify_source", False))
    recheck = int(getattr(cfg, "recheck_files", 0) if recheck is None else recheck)
    if cfg.name == "digits":
        d = load_digits(cfg.test_fraction, cfg.seed, cfg.limit)
        from pipeline.core.hashing import sample_hashes

        n = len(d)
        read = SourceRead(d.sample_ids, d.class_names, d.labels, d.splits, d.uris, sample_hashes(d.images),
                          np.full(n, -1, np.int64), [""] * n, np.ones(n, bool), d.images,
                          work={"listed": n, "decoded": n})
    else:
        path = resolve_path(cfg)
        if cfg.name == "cifar10" and not os.path.exists(path):
            _cifar10_missing(cfg, path, progress)
        read = _read_imagefolder(path, cfg.limit, cfg.workers, limits=_limits(cfg), known=known or KnownRows.empty(),
                                 stat=stat, previous=previous, verify=verify, recheck=recheck,
                                 chunk_size=CHUNK_SIZE, progress=progress,
                                 spill_dir=Path(spill_dir) if spill_dir is not None else None, listing=listing)
        if cfg.name == "cifar10" and not read.unchanged and tuple(read.class_names) != CIFAR10_CLASSES:
            raise SourceError(
                f"{path}: class folders {read.class_names} are not CIFAR-10's {list(CIFAR10_CLASSES)}; "
                f"use data.name=imagefolder for another data set"
            )
    read.key = source_key(cfg)
    read.spec = {**source_spec(cfg), "limit": cfg.limit, **read.spec}
    return read


# ----------------------------------------------------------------------------- digits


@dataclass
class NoopCheck:
    """What :func:`listing_unchanged` found: ``unchanged`` (the source is the snapshot the stat
    cache was written for), why not (``reason``), the counters, and the files whose bytes the spot
    check found changed under an unchanged (size, mtime) (the full read must re-read them)."""

    unchanged: bool
    reason: str = ""
    work: dict = field(default_factory=dict)
    changed_ids: list[str] = field(default_factory=list)
    listing: Optional["_Listing"] = None  # the whole tree's, when a part differed: the full read takes it


def _count_files(root: Path) -> int:
    """The entries of the class folders of train/ and test/ (what :func:`_walk_folder` would list
    if the tree is well formed; a malformed one is refused by the walk or the full read)."""
    n = 0
    for split in SPLITS:
        sdir = root / split
        if sdir.is_symlink() or not sdir.is_dir():
            continue
        with os.scandir(sdir) as it:
            for cdir in it:
                if cdir.is_dir(follow_symlinks=False):
                    n += len(os.listdir(cdir.path))
    return n


def _cached_rows(cached: Iterable[pa.RecordBatch], n: int) -> Optional[tuple[pa.ChunkedArray, np.ndarray, np.ndarray]]:
    """The ids, sizes and mtimes of the first ``n`` rows of ``cached`` (read again from its start),
    None when it holds fewer."""
    parts = _BatchRows(cached).take(n) if n else []
    if parts is None:
        return None
    t = pa.Table.from_batches(parts, schema=None if parts else pa.schema(
        [("sample_id", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())]))
    ids = t.column("sample_id")
    return (ids.cast(pa.string()) if ids.type != pa.string() else ids,
            t.column("size").to_numpy().astype(np.int64), t.column("mtime_ns").to_numpy().astype(np.int64))


class _BatchRows:
    """The rows of a stream of record batches, taken ``k`` at a time in order (a take may span
    batches): one batch is held at a time, besides rows put back."""

    def __init__(self, batches: Iterable[pa.RecordBatch]):
        self._it, self._cur, self._at = iter(batches), None, 0
        # rows put back, read before the stream's next batch (a deque, not a chain of iterators:
        # a chain keeps every list it was given, and each batch's memory map with it)
        self._back: deque[pa.RecordBatch] = deque()

    def _take(self, k: int, upto: bool) -> Optional[list[pa.RecordBatch]]:
        parts: list[pa.RecordBatch] = []
        while k:
            if self._cur is None or self._at == self._cur.num_rows:
                self._cur, self._at = (self._back.popleft() if self._back else next(self._it, None)), 0
                if self._cur is None:
                    return parts if upto else None
                continue
            part = self._cur.slice(self._at, k)
            self._at += part.num_rows
            k -= part.num_rows
            parts.append(part)
        return parts

    def take(self, k: int) -> Optional[list[pa.RecordBatch]]:
        """The next ``k`` rows as slices, None when fewer are left."""
        return self._take(k, False)

    def take_upto(self, k: int) -> list[pa.RecordBatch]:
        """The next ``k`` rows, or as many as are left."""
        return self._take(k, True) or []

    def left(self) -> bool:
        return self.take(1) is not None

    def put_back(self, parts: list[pa.RecordBatch]) -> None:
        """Rows taken last, returned to the front (they are read again first)."""
        if self._cur is not None and self._at < self._cur.num_rows:
            self._back.appendleft(self._cur.slice(self._at))
        self._back.extendleft(reversed([p for p in parts if p.num_rows]))
        self._cur, self._at = None, 0


def _stat_checkable(cfg: DataConfig, verify: bool) -> tuple[str, str]:
    """``(path, "")`` for a source whose files the stat cache can vouch for without a read (a
    folder, no ``data.limit``, no ``--verify``), else ``("", why not)``."""
    if verify or getattr(cfg, "verify_source", False):
        return "", "verify"
    if cfg.name not in ("imagefolder", "cifar10") or cfg.limit is not None:
        return "", "not a folder source without data.limit"
    path = resolve_path(cfg)
    root = Path(path)
    if not (root.is_dir() and ((root / "train").exists() or (root / "test").exists())):
        return "", "not a folder source"
    return path, ""


def _spot_rows(n_rows: int, recheck: int) -> np.ndarray:
    """The cached rows whose files a stat check re-reads (``data.recheck_files`` of them, ascending).
    Random on purpose, as the full read's: a fixed choice would tell a tamperer which files to avoid."""
    return np.array(sorted(random.SystemRandom().sample(range(n_rows), min(max(recheck, 0), n_rows))), np.int64)


def _changed_under_stat(root: Path, path: str, picked: list[tuple[str, str]], max_file_bytes: int) -> list[str]:
    """The ``(id, recorded byte digest)`` files of ``picked`` whose bytes hash to another digest."""
    return [rel for rel, fsha in picked
            if hashlib.sha256(_read_file(f"{root}/{rel}", f"{path}::{rel}", max_file_bytes)).hexdigest() != fsha]


def listing_unchanged(cfg: DataConfig, cached: Iterable[pa.RecordBatch], scan_ns: int, n_rows: int,
                      verify: bool = False, recheck: Optional[int] = None, progress: Progress = None) -> NoopCheck:
    """Whether a folder source is, file for file, what the stat cache recorded, checked while the
    tree is listed, a part of a class folder (``WALK_PART`` files) against the same rows of the
    cache at a time: memory grows with the largest folder's names, not with the files (the
    snapshot stage's no-op, issue 19 item 3).

    ``cached``: the cache's rows in row order (``sample_id``, ``size``, ``mtime_ns``,
    ``file_sha256``) as record batches, written by the run that made the current snapshot of
    ``n_rows`` rows (the caller checks that binding); re-iterable (a list, ``snapshot.
    CacheWindows``) for the listing below; ``scan_ns``: when that run's scan began. Unchanged means: every
    listed file is a cached row at the same place with the same (size, mtime_ns), none within
    ``RACY_NS`` of the scan (the full read re-reads those), no row is left over, and
    ``data.recheck_files`` files drawn at random still hash to their recorded bytes. Anything else
    (and ``verify``, ``data.limit``, an archive source) is "not shown unchanged": the caller runs
    the full read, which judges the change. A source the full read would refuse (a symlink, a bad
    name, a layout error) raises the full read's SourceError here (the snapshot stage then runs
    the full read, which verifies the store before it reports that). When a part differs, the
    walk goes on and ``listing`` is the tree's listing, as ``_list_folder`` gives it, for the full
    read (``read_source(listing=)``), so a change the file count does not show costs one listing."""
    recheck = int(getattr(cfg, "recheck_files", 0) if recheck is None else recheck)
    path, why = _stat_checkable(cfg, verify)
    if why:
        return NoopCheck(False, why)
    root = Path(path)
    # The files counted first, by name (no stat: ~0.4 s at 1M files): an append, the usual change,
    # is told from a no-op before the ~4 s of stats, wherever its new files sort.
    listed = _count_files(root)
    if listed != n_rows:
        return NoopCheck(False, f"{listed} files, the snapshot has {n_rows} rows", {"counted": listed})
    lim = _limits(cfg)
    rows = _BatchRows(cached)
    spot = _spot_rows(n_rows, recheck)
    picked: list[tuple[str, str]] = []
    dirs: set[str] = set()
    counts: Counter = Counter()
    runs: list[tuple[str, str, int, int]] = []
    at = 0
    fresh = scan_ns - RACY_NS
    # Once a part differs the walk goes on, keeping what it lists from there: the full read then
    # takes this listing (the rows before are the cache's, just compared equal) instead of listing
    # the tree a second time (+4 s at 1M files when the change was in the last folder).
    miss, miss_at = "", 0
    tail_ids: list[pa.Array] = []
    tail_sizes, tail_mtimes = array.array("q"), array.array("q")
    for split, cls, ids, sz, mt in _walk_folder(root, path, lim.max_file_bytes):
        dirs.add(f"{split}/{cls}")
        counts[f"{split}/{cls}"] += len(ids)
        first = runs.pop()[2] if runs and runs[-1][:2] == (split, cls) else at  # a folder's next part
        runs.append((split, cls, first, at + len(ids)))
        if not ids:
            continue
        if not miss:
            parts = rows.take(len(ids))
            sizes, mtimes = np.frombuffer(sz, np.int64), np.frombuffer(mt, np.int64)
            got = pa.Table.from_batches(parts) if parts is not None else None
            if got is None:
                miss = "more files than cached rows"
            elif not (got.column("sample_id").equals(pa.chunked_array([pa.array(ids, pa.string())]))
                      and np.array_equal(got.column("size").to_numpy(), sizes)
                      and np.array_equal(got.column("mtime_ns").to_numpy(), mtimes)):
                miss = f"{split}/{cls}/ differs from the cache"
            elif (mtimes > fresh).any():
                miss = f"{split}/{cls}/ has files too recent to trust by stat"
            else:
                lo, hi = np.searchsorted(spot, [at, at + len(ids)])
                for p in spot[lo:hi].tolist():
                    picked.append((ids[p - at], got.column("file_sha256")[p - at].as_py()))
            miss_at = at
        if miss:
            tail_ids.append(pa.array(ids, pa.string()))
            tail_sizes += sz
            tail_mtimes += mt
        at += len(ids)
    if miss:
        head = None if iter(cached) is cached else _cached_rows(cached, miss_at)  # an iterator cannot be read again
        if head is None:  # the cache could not be read again: the full read lists for itself
            return NoopCheck(False, miss, {"listed": at})
        hid, hsize, hmtime = head
        listing = _Listing(dirs, pa.chunked_array([*hid.chunks, *tail_ids], pa.string()),
                           np.concatenate([hsize, np.frombuffer(tail_sizes, np.int64)]),
                           np.concatenate([hmtime, np.frombuffer(tail_mtimes, np.int64)]), runs)
        return NoopCheck(False, miss, {"listed": at}, listing=listing)
    if rows.left() or at != n_rows:
        return NoopCheck(False, "fewer files than cached rows", {"listed": at})
    _check_layout(path, dirs, counts)
    changed = _changed_under_stat(root, path, picked, lim.max_file_bytes)
    work = {"listed": at, "trusted": at - len(picked), "rechecked": len(picked)}
    if changed:
        return NoopCheck(False, f"{len(changed)} file(s) changed under the same (size, mtime)", work, changed)
    _say(progress, f"{path}: {at} files, each as the stat cache recorded it ({len(picked)} re-read to check)")
    return NoopCheck(True, "", work)


@dataclass
class AppendCheck:
    """What :func:`listing_appended` found: ``appended`` (every file the stat cache recorded is
    there as it recorded it, and the rest are new), why not (``reason``), the counters, the files
    the spot check found changed under an unchanged (size, mtime) (the full read must re-read
    them), the new files (``added``, in row order) and where each lands in the whole listing
    (``new_at``, ascending)."""

    appended: bool
    reason: str = ""
    work: dict = field(default_factory=dict)
    changed_ids: list[str] = field(default_factory=list)
    added: Optional["_Listing"] = None
    new_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    listed: int = 0


def listing_appended(cfg: DataConfig, cached: Iterable[pa.RecordBatch], scan_ns: int, n_rows: int,
                     class_names: list[str], verify: bool = False, recheck: Optional[int] = None,
                     progress: Progress = None, counted: Optional[int] = None) -> AppendCheck:
    """Whether a folder source is what the stat cache recorded plus new files, found while the tree
    is listed, a class folder at a time against the cache's rows of that folder: memory grows with
    the largest folder and the new files, not with the files (the snapshot stage's append without
    a manifest load, ``snapshot.fast_append``, issue 19 items 1 and 3).

    ``cached``, ``scan_ns``, ``n_rows``: as :func:`listing_unchanged` (the cache's rows in row
    order, bound by the caller to the current snapshot of ``n_rows`` rows). Appended means: every
    cached row is listed, in the cache's order, with the same (size, mtime_ns), none within
    ``RACY_NS`` of the scan; every other listed file is new, in a class folder of ``class_names``
    (a new class is left to the full read); ``data.recheck_files`` cached files drawn at random
    still hash to their recorded bytes; the layout is one the full read accepts. Anything else is
    "not shown appended" (the full read judges it); a source the full read would refuse raises its
    SourceError here, as in :func:`listing_unchanged`."""
    recheck = int(getattr(cfg, "recheck_files", 0) if recheck is None else recheck)
    path, why = _stat_checkable(cfg, verify)
    if why:
        return AppendCheck(False, why)
    root = Path(path)
    counted = _count_files(root) if counted is None else counted  # the caller's count, made this run
    if counted <= n_rows:
        return AppendCheck(False, f"{counted} files, the snapshot has {n_rows} rows", {"counted": counted})
    lim = _limits(cfg)
    rows = _BatchRows(cached)
    known = set(class_names)
    spot = _spot_rows(n_rows, recheck)
    picked: list[tuple[str, str]] = []
    dirs: set[str] = set()
    counts: Counter = Counter()
    new_ids: list[pa.Array] = []
    new_sizes, new_mtimes = array.array("q"), array.array("q")
    new_runs: list[tuple[str, str, int, int]] = []
    new_at: list[np.ndarray] = []
    at = cache_at = n_new = 0
    fresh = scan_ns - RACY_NS

    def folder(split: str, cls: str, ids: list[str], sz: array.array, mt: array.array) -> str:
        """Match one class folder's listing with the cache's rows of that folder; "" or why not."""
        nonlocal at, cache_at, n_new
        listed = pa.array(ids, pa.string())
        sizes, mtimes = np.frombuffer(sz, np.int64), np.frombuffer(mt, np.int64)
        # the cache's rows of this folder: those next in it under the folder's prefix (its rows are
        # a run, in the walk's order), at most as many as are listed (more: a file vanished)
        parts = rows.take_upto(len(ids))
        t = pa.Table.from_batches(parts) if parts else STAT_SCHEMA.empty_table()
        under = pc.starts_with(t.column("sample_id"), f"{split}/{cls}/").to_numpy(zero_copy_only=False)
        r = int(np.argmin(under)) if len(under) and not under.all() else len(under)
        rows.put_back(t.slice(r).to_batches())
        c = t.slice(0, r)
        c_ids = c.column("sample_id")
        if r and not pc.all(pc.is_in(c_ids, value_set=listed)).as_py():
            return f"a file of {split}/{cls}/ the cache recorded is not listed"
        old = pc.is_in(listed, value_set=c_ids).to_numpy(zero_copy_only=False) if r else np.zeros(len(ids), bool)
        where = np.flatnonzero(old)
        if len(where) != r or not listed.take(pa.array(where)).equals(c_ids.combine_chunks()):
            return f"{split}/{cls}/ lists the cached files in another order"
        if not (np.array_equal(c.column("size").to_numpy(), sizes[where])
                and np.array_equal(c.column("mtime_ns").to_numpy(), mtimes[where])):
            return f"{split}/{cls}/ differs from the cache"
        if (mtimes[where] > fresh).any():
            return f"{split}/{cls}/ has files too recent to trust by stat"
        add = np.flatnonzero(~old)
        if len(add) and cls not in known:
            return f"{split}/{cls}/ is a class the snapshot does not have"
        lo, hi = np.searchsorted(spot, [cache_at, cache_at + r])
        fsha = c.column("file_sha256")
        for p in spot[lo:hi].tolist():
            picked.append((c_ids[p - cache_at].as_py(), fsha[p - cache_at].as_py()))
        if len(add):
            new_runs.append((split, cls, n_new, n_new + len(add)))
            new_ids.append(listed.take(pa.array(add)))
            new_sizes.extend(sizes[add].tolist())
            new_mtimes.extend(mtimes[add].tolist())
            new_at.append(at + add)
            n_new += len(add)
        at += len(ids)
        cache_at += r
        return ""

    miss = ""
    # a class folder in one part (the walk holds its names anyway): new files sit anywhere in it
    for split, cls, ids, sz, mt in _walk_folder(root, path, lim.max_file_bytes, part=sys.maxsize):
        dirs.add(f"{split}/{cls}")
        counts[f"{split}/{cls}"] += len(ids)
        if not miss:
            miss = folder(split, cls, ids, sz, mt)
    work = {"counted": counted, "listed": sum(counts.values())}
    if miss:
        return AppendCheck(False, miss, work)
    if rows.left() or cache_at != n_rows:
        return AppendCheck(False, "a file the cache recorded is not listed", work)
    if not n_new:
        return AppendCheck(False, "no new file", work)
    _check_layout(path, dirs, counts)
    changed = _changed_under_stat(root, path, picked, lim.max_file_bytes)
    work.update(trusted=at - n_new - len(picked), rechecked=len(picked))
    if changed:
        return AppendCheck(False, f"{len(changed)} file(s) changed under the same (size, mtime)", work, changed)
    _say(progress, f"{path}: {at} files, {n_new} new; the other {at - n_new} as the stat cache recorded them "
                   f"({len(picked)} re-read to check)")
    added = _Listing(dirs, pa.chunked_array(new_ids, pa.string()), np.frombuffer(new_sizes, np.int64),
                     np.frombuffer(new_mtimes, np.int64), new_runs, part_of_tree=True)
    return AppendCheck(True, "", work, added=added, new_at=np.concatenate(new_at), listed=at)


def load_digits(test_fraction: float, seed: int, limit: Optional[int] = None) -> SourceData:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise SourceError(f"data.test_fraction must be between 0 and 1, not {test_fraction}")
    ds = sk_load_digits()
    # 0..16 integers -> the full uint8 range, so thresholds written for 0..255 images apply.
    images = np.rint(ds.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    targets = ds.target.astype(np.int64)
    idx = np.arange(len(targets))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=targets)
    rows: list[tuple[str, int]] = []
    for split, part in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        chosen = [int(i) for i in part]
        if limit is not None:
            chosen = sorted(i for _, i in _round_robin([(int(targets[i]), int(i)) for i in part], limit))
        rows += [(split, int(i)) for i in chosen]
    sel = np.array([i for _, i in rows], dtype=np.int64)
    return SourceData(
        images=np.ascontiguousarray(images[sel]),
        labels=targets[sel],
        class_names=[str(c) for c in ds.target_names],
        splits=np.array([s for s, _ in rows]),
        sample_ids=[f"digits/{s}/{i}" for s, i in rows],
        uris=[f"sklearn://load_digits/{i}" for _, i in rows],
    )


def _round_robin(items: list[tuple], limit: int) -> list[tuple]:
    """First `limit` items taking one per class in turn; items are (class, sort key...) tuples."""
    by_class: dict = {}
    for item in sorted(items):
        by_class.setdefault(item[0], []).append(item)
    queues = [deque(v) for _, v in sorted(by_class.items())]
    out: list[tuple] = []
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.popleft())
    return out


# ----------------------------------------------------------------------------- cifar10


def load_cifar10(cfg: DataConfig, progress: Progress = None) -> SourceData:
    path = resolve_path(cfg)
    if not os.path.exists(path):
        _cifar10_missing(cfg, path, progress)
    lim = _limits(cfg)
    data = load_imagefolder(path, cfg.limit, cfg.workers, progress=progress,
                            max_file_bytes=lim.max_file_bytes, max_image_pixels=lim.max_pixels, resize=lim.resize)
    if tuple(data.class_names) != CIFAR10_CLASSES:
        raise SourceError(
            f"{path}: class folders {data.class_names} are not CIFAR-10's {list(CIFAR10_CLASSES)}; "
            f"use data.name=imagefolder for another data set"
        )
    return data


def _cifar10_missing(cfg: DataConfig, path: str, progress: Progress) -> None:
    if not cfg.download:
        raise SourceError(
            f"CIFAR-10 not found at {path} (resolved against {os.getcwd()}): put cifar10-train.tar.gz and "
            f"cifar10-test.tar.gz (members train/<class>/NNNN.jpg, test/<class>/...) or a folder with "
            f"train/<class>/ and test/<class>/ there, set data.path to where they are, or set "
            f"data.download=true to fetch CIFAR-10 with torchvision (needs internet)"
        )
    download_cifar10(Path(path), progress)


def download_cifar10(dest: Path, progress: Progress = None) -> None:
    """Opt-in: torchvision's CIFAR-10 exported as ImageFolder PNGs (lossless) under `dest`.

    Written into a temp folder next to `dest` and renamed at the end, so an interrupted download
    never looks like a complete source.
    """
    import shutil

    from PIL import Image

    try:
        from torchvision.datasets import CIFAR10
    except ImportError as exc:  # pragma: no cover - torchvision is a project dependency
        raise SourceError(f"data.download=true needs torchvision ({exc}); install it or put the data in {dest}") from exc
    tmp = dest.parent / f".{dest.name}.download-{os.getpid()}"
    raw = tmp / ".raw"
    try:
        for split, train in (("train", True), ("test", False)):
            _say(progress, f"downloading CIFAR-10 {split} with torchvision into {raw}")
            try:
                ds = CIFAR10(root=str(raw), train=train, download=True)
            except Exception as exc:
                raise SourceError(f"CIFAR-10 download failed ({exc}): check the internet connection or put the data in {dest}") from exc
            counters: Counter = Counter()
            for img, label in zip(ds.data, ds.targets):
                cls = ds.classes[int(label)]
                folder = tmp / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(img, dtype=np.uint8)).save(folder / f"{counters[cls]:04d}.png")
                counters[cls] += 1
        shutil.rmtree(raw, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- image folders


def load_imagefolder(path: str, limit: Optional[int] = None, workers: int = 0, *,
                     chunk_size: int = CHUNK_SIZE, progress: Progress = None,
                     max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                     max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     resize: Optional[Resize] = None) -> SourceData:
    """Decode a folder / archive / archive pair in ImageFolder layout (see the module docstring)."""
    read = _read_imagefolder(path, limit, workers, limits=_Limits(max_file_bytes, max_image_pixels, resize),
                             known=KnownRows.empty(), stat=None, previous=None, verify=True, recheck=0,
                             chunk_size=chunk_size, progress=progress)
    return SourceData(images=read.images, labels=read.labels, class_names=read.class_names, splits=read.splits,
                      sample_ids=as_list(read.sample_ids), uris=as_list(read.uris))


def _layout(path: str) -> tuple[str, list[tuple[str, Path, tuple[str, ...]]]]:
    """("folder", [(path, root, SPLITS)]) or ("archives", [(label, archive, splits), ...])."""
    p = Path(path)
    if not p.exists():
        raise SourceError(
            f"data.path {path} does not exist (resolved against {os.getcwd()}): point it at a folder or .tar.gz "
            f"with train/<class>/* and test/<class>/*"
        )
    if p.is_file():
        if not _is_archive(p):
            raise SourceError(f"data.path {path} is a file but not a .tar.gz/.tgz/.tar archive")
        return "archives", [(path, p, SPLITS)]
    if (p / "train").exists() or (p / "test").exists() or (p / "train").is_symlink() or (p / "test").is_symlink():
        return "folder", [(path, p, SPLITS)]
    return "archives", [(f"{path}/{a.name}", a, (s,)) for s, a in _split_archives(p).items()]


def _read_imagefolder(path: str, limit: Optional[int], workers: int, *, limits: _Limits, known: KnownRows,
                      stat: Optional[StatTable], previous: Optional[dict], verify: bool, recheck: int,
                      chunk_size: int, progress: Progress, spill_dir: Optional[Path] = None,
                      listing: Optional[list["_Listing"]] = None) -> SourceRead:
    t0 = time.perf_counter()
    kind, parts = _layout(path)
    if kind == "folder":
        read = _read_folder(parts[0][1], path, limit, workers, limits, known, stat, verify, recheck, chunk_size,
                            spill_dir, listing if limit is None else None)
    else:
        read = _read_archives(path, parts, limit, workers, limits, known, previous, verify, chunk_size, progress,
                              spill_dir)
    if not read.unchanged:
        w = read.work
        _say(progress, f"decoded {int(read.decoded.sum())} images from {path} in {time.perf_counter() - t0:.1f} s "
                       f"({len(read)} files: {w.get('trusted', 0)} unchanged by (size, mtime), "
                       f"{w.get('confirmed_by_digest', 0)} by byte digest)")
    return read


def _read_folder(root: Path, path: str, limit: Optional[int], workers: int, limits: _Limits, known: KnownRows,
                 stat: Optional[StatTable], verify: bool, recheck: int, chunk_size: int,
                 spill_dir: Optional[Path] = None, listing: Optional[list["_Listing"]] = None) -> SourceRead:
    """A folder source, column by column: list with one stat per file (or take ``listing``, made
    this run), trust what the stat cache vouches for, read and digest the rest, decode what the
    digests cannot vouch for."""
    work: Counter = Counter()
    ls = listing.pop() if listing else _list_folder(root, path, limits.max_file_bytes)
    if not ls.part_of_tree:
        _check_layout(path, ls.dirs, ls.counts())  # layout errors before a single file is opened
    ids, sizes, mtimes, splits, classes = ls.ids, ls.sizes, ls.mtimes, ls.splits(), ls.classes()
    if limit is not None:
        keyed = [((SPLITS.index(s), c, i.rsplit("/", 1)[1]), k) for k, (i, s, c) in enumerate(zip(ids, splits, classes))]
        keep = np.array(sorted(k for _, k in _select_limit(keyed, limit)), dtype=np.int64)
        ids = [ids[k] for k in keep]
        sizes, mtimes, splits, classes = sizes[keep], mtimes[keep], splits[keep], classes[keep]
    n = len(ids)
    work["listed"] = n
    ids_a = as_strings(ids)
    dirs = ls.dirs
    # From here on the ids are Arrow only: the listing's Python strings (~90 MB at 1M files) are
    # gone before the store's and the cache's columns are looked up, where an append's and a no-op's
    # read peaked (bench/results/snapshot_phases_1m.log).
    del ids, ls
    # What the store and the stat cache recorded, as Arrow columns ("" where unknown): no Python
    # string per row is made for the rows the stat cache vouches for (issue 19 item 3). Only the
    # two columns a trusted row keeps are taken whole; the other two are read where needed.
    kpos = known.positions(ids_a)
    k_sha = known.take("sha256", kpos)
    cached = stat is not None and len(stat.ids) > 0
    cpos = stat.positions(ids_a) if cached else np.full(n, -1, np.int64)
    c_fsha = stat.take("file_sha256", cpos) if cached else blank_strings(n)
    ok = np.zeros(n, bool)
    if cached and not verify:
        ok = (cpos >= 0) & (kpos >= 0)
        ok &= np.where(ok, stat.size[cpos] == sizes, False) & np.where(ok, stat.mtime_ns[cpos] == mtimes, False)
        ok &= mtimes <= stat.scan_ns - RACY_NS
        # The cache's pixel hash must be the store's: compared a block of rows at a time, not as a
        # full column of the cache's hashes (65 MiB at 1M rows).
        cand = np.flatnonzero(ok)
        for s0 in range(0, len(cand), COMPARE_ROWS):
            c = cand[s0:s0 + COMPARE_ROWS]
            ok[c] = pc.equal(stat.sha256.take(pa.array(cpos[c])), k_sha.take(pa.array(c))).to_numpy(zero_copy_only=False)
        trusted = np.flatnonzero(ok)
        # The spot check is random on purpose: a fixed choice would tell a tamperer which files to avoid.
        picked = random.SystemRandom().sample(range(len(trusted)), min(max(recheck, 0), len(trusted)))
        spot = trusted[np.array(picked, np.int64)]
        ok[spot] = False
        work["trusted"], work["rechecked"] = int(ok.sum()), len(spot)
        todo = np.flatnonzero(~ok)
    else:
        todo = np.arange(n)
    # The rows to read get their expectations as Python strings (_ingest compares them one by one);
    # _ingest fills hashes/fsha for those rows only, the trusted rows take the recorded columns below.
    hashes = np.full(n, None, dtype=object)
    fsha = np.full(n, None, dtype=object)
    slot = np.full(n, -1, np.int64)
    slot[todo] = np.arange(len(todo))
    tk, tc = kpos[todo], cpos[todo]
    expected = [table.take(col, at).to_numpy(zero_copy_only=False) if has else None
                for table, col, at, has in ((known, "sha256", tk, len(known.ids)), (known, "file_sha256", tk, len(known.ids)),
                                            (stat, "file_sha256", tc, cached), (stat, "sha256", tc, cached))]
    del kpos, cpos, tk, tc  # only the trusted rows' k_sha and c_fsha are read from here on
    base, prefix = str(root), f"{path}::"  # a row's URI is prefix + its id (the URI column below too)

    def uri_of(i: int) -> str:
        return prefix + ids_a[int(i)].as_py()

    def read_todo() -> Iterator[tuple[int, bytes]]:
        for i in todo.tolist():
            rel = ids_a[i].as_py()
            yield i, _read_file(f"{base}/{rel}", prefix + rel, limits.max_file_bytes)

    items = read_todo()

    def expect(i: int) -> tuple[str, str, str, str]:
        j = slot[i]
        return tuple("" if col is None else col[j] for col in expected)  # type: ignore[return-value]

    dec = _ingest(items, uri_of, expect, hashes, fsha, verify, workers, chunk_size, limits, work, path, spill_dir)
    try:
        dec.check(path, uri_of)
    except BaseException:
        dec.discard()
        raise
    del expected
    decoded_idx = np.sort(np.asarray(dec.rows, np.int64))
    class_names = sorted({d.split("/", 1)[1] for d in dirs if d.startswith("train/")})
    index = {c: i for i, c in enumerate(class_names)}
    decoded = np.zeros(n, dtype=bool)
    decoded[decoded_idx] = True
    images = dec.images(decoded_idx)
    # one column at a time, each input dropped once merged: the no-op's peak at 1M rows held four
    # 65 MiB hash columns here (bench/results/snapshot_noop_1m.log)
    hashes_a = _patched(k_sha, todo, hashes[todo])
    del hashes, k_sha
    fsha_a = _patched(c_fsha, todo, fsha[todo])
    del fsha, c_fsha
    keep = pc.and_(pc.not_equal(hashes_a, ""), pc.not_equal(fsha_a, ""))
    keep_np = keep.to_numpy(zero_copy_only=False)
    # Every row kept (the usual case): the new cache shares the read's columns. A filter would copy
    # them while the old cache is still alive: +155 MiB at the no-op's peak at 1M rows
    # (bench/results/snapshot_noop_1m.log).
    pick = (lambda a: a) if keep_np.all() else (lambda a: a.filter(keep))
    new_stat = StatTable(pick(ids_a), pick(hashes_a), pick(fsha_a), size=sizes[keep_np],
                         mtime_ns=mtimes[keep_np], scan_ns=stat.scan_ns if stat is not None else 0)
    return SourceRead(
        # Arrow, not the listing's Python strings: those went on living through the plan and the
        # write (~150 MB at 1M rows, bench/results/snapshot_cold_phases_1m.log)
        sample_ids=ids_a,
        class_names=class_names,
        labels=np.array([index.get(c, -1) for c in classes.tolist()], dtype=np.int64),
        splits=splits.astype(str),
        uris=Prefixed(prefix, ids_a),
        hashes=hashes_a,
        file_sizes=sizes.astype(np.int64),
        file_sha256=fsha_a,
        decoded=decoded,
        images=images,
        work=dict(work),
        stat=new_stat,
        stat_changed=not new_stat.same_as(stat),
        decoded_rows=dec,
        raw=dec.raw(decoded_idx),
    )


def _patched(recorded: pa.Array, rows: np.ndarray, values: np.ndarray, max_runs: int = 10_000) -> pa.Array:
    """``recorded`` (a string column) with ``values`` at ``rows`` (ascending; None reads as ""). No
    copy when every value is the recorded one (a no-op read); else one copy, put together from
    runs of slices, at the column's size: ``pc.if_else`` grew its output by doubling, twice the
    column at the peak (128 MiB for a 65 MiB hash column at 1M rows, issue 19 item 3). A null
    recorded (a damaged cache or forged manifest) reads as "", as the merge it replaced made it."""
    recorded = recorded if recorded.null_count == 0 else recorded.fill_null("")
    fresh = pa.array(values, pa.string())
    fresh = fresh if fresh.null_count == 0 else fresh.fill_null("")
    if len(rows) == len(recorded):  # every row given (a cold read): the given values are the column
        return fresh
    at = pa.array(rows, pa.int64())
    differ = np.flatnonzero(pc.not_equal(fresh, recorded.take(at)).to_numpy(zero_copy_only=False))
    if not len(differ):
        return recorded
    rows, fresh = rows[differ], fresh.take(pa.array(differ))
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # runs of consecutive rows to replace
    if len(starts) > max_runs:  # scattered: a slice per run would cost more than the doubling
        mask = np.zeros(len(recorded), bool)
        mask[rows] = True
        spread = np.full(len(recorded), -1, np.int64)
        spread[rows] = np.arange(len(rows))
        return pc.if_else(pa.array(mask), fresh.take(pa.array(spread, mask=~mask)), recorded)
    ends = np.append(starts[1:], len(rows))
    pieces, done = [], 0
    for a, b in zip(starts.tolist(), ends.tolist()):
        first = int(rows[a])
        pieces += [recorded.slice(done, first - done), fresh.slice(a, b - a)]
        done = first + (b - a)
    pieces.append(recorded.slice(done))
    return pa.concat_arrays(pieces)


def _read_archives(path: str, parts: list[tuple[str, Path, tuple[str, ...]]], limit: Optional[int], workers: int,
                   limits: _Limits, known: KnownRows, previous: Optional[dict], verify: bool, chunk_size: int,
                   progress: Progress, spill_dir: Optional[Path] = None) -> SourceRead:
    """An archive source: hashed whole first (the no-op shortcut), else streamed member by member."""
    work: Counter = Counter()
    archives = []
    for label, archive, _ in parts:
        with open(archive, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        archives.append({"name": label, "size": archive.stat().st_size, "sha256": digest})
        work["archive_bytes_hashed"] += archives[-1]["size"]
    spec = {"archives": archives}
    if not verify and previous is not None and previous.get("archives") == archives and previous.get("limit") == limit:
        _say(progress, f"{path}: archives unchanged (sha256 of {work['archive_bytes_hashed'] / 1e6:.1f} MB "
                       f"equals the parent snapshot's); nothing decoded")
        empty = np.zeros(0, np.int64)
        return SourceRead([], [], empty, np.array([], dtype=str), [], [], empty, [], np.zeros(0, bool),
                          np.zeros((0, 1, 1, 1), np.uint8), spec=spec, work=dict(work), unchanged=True)
    dirs: set[str] = set()

    def members() -> Iterator[tuple[_Entry, bytes]]:
        for label, archive, splits in parts:
            for entry, data in _archive_entries(archive, label, splits, limits.max_file_bytes):
                if isinstance(entry, tuple):
                    dirs.add(entry[1])
                else:
                    yield entry, data

    if limit is not None:
        # The selection needs every name first; a limited run is a smoke test, so memory is small.
        everything = list(members())
        _check_layout(path, dirs, Counter(f"{e.split}/{e.cls}" for e, _ in everything))
        keep = {id(x[1]) for x in _select_limit([(e.order, e) for e, _ in everything], limit)}
        pairs: Iterable[tuple[_Entry, bytes]] = ((e, d) for e, d in everything if id(e) in keep)
    else:
        pairs = members()
    entries: list[_Entry] = []
    hashes: list[str] = []
    fsha: list[str] = []

    def appended() -> Iterator[tuple[int, bytes]]:
        for e, d in pairs:
            entries.append(e)
            hashes.append("")
            fsha.append("")
            yield len(entries) - 1, d

    def expect(i: int) -> tuple[str, str, str, str]:
        k = known.get(entries[i].sample_id)
        return (k[0], k[1], "", "") if k is not None else ("", "", "", "")

    dec = _ingest(appended(), lambda i: entries[i].uri, expect, hashes, fsha, verify, workers, chunk_size,
                  limits, work, path, spill_dir)
    try:
        work["listed"] = len(entries)
        if limit is None:
            _check_layout(path, dirs, Counter(f"{e.split}/{e.cls}" for e in entries))
        dec.check(path, lambda i: entries[i].uri)
    except BaseException:
        dec.discard()
        raise
    order = sorted(range(len(entries)), key=lambda i: entries[i].order)  # members come in archive order
    entries, hashes, fsha = [entries[i] for i in order], [hashes[i] for i in order], [fsha[i] for i in order]
    n = len(entries)
    arrived = np.asarray(dec.rows, np.int64)  # in the members' order
    decoded = np.zeros(n, dtype=bool)
    if len(arrived):
        renumber = np.empty(n, np.int64)
        renumber[np.asarray(order, np.int64)] = np.arange(n)
        decoded[renumber[arrived]] = True
    class_names = sorted({d.split("/", 1)[1] for d in dirs if d.startswith("train/")})
    index = {c: i for i, c in enumerate(class_names)}
    return SourceRead(
        sample_ids=[e.sample_id for e in entries],
        class_names=class_names,
        labels=np.array([index[e.cls] for e in entries], dtype=np.int64),
        splits=np.array([e.split for e in entries]),
        uris=[e.uri for e in entries],
        hashes=hashes,
        file_sizes=np.array([e.size for e in entries], dtype=np.int64),
        file_sha256=fsha,
        decoded=decoded,
        images=dec.images(np.asarray(order, np.int64)[decoded]),  # the kept rows, by their old numbers
        spec=spec,
        work=dict(work),
        decoded_rows=dec,
        raw=dec.raw(np.asarray(order, np.int64)[decoded]),
    )


def _read_file(path: str, uri: str, max_file_bytes: int) -> bytes:
    """The bytes of a listed file, never more than the cap, never through a link made since."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise SourceError(f"{uri}: vanished while the source was read; re-run when the source is stable") from None
    except OSError as exc:
        raise SourceError(f"{uri}: cannot be read ({exc.strerror or exc}); fix its permissions or remove it") from None
    with os.fdopen(fd, "rb") as fh:
        # read(n) allocates n bytes up front: the cap (64 MiB) per file was an mmap/munmap per file,
        # ~3x the read of a small image. The file's size bounds it; a file that grew since is read on
        # up to the cap, so the check below still sees every byte past it.
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(min(size, max_file_bytes) + 1)
        if len(data) > size:
            data += fh.read(max_file_bytes + 1 - len(data))
    if len(data) > max_file_bytes:
        raise SourceError(_too_big(uri, None, max_file_bytes))
    return data


def _too_big(uri: str, size: Optional[int], max_file_bytes: int) -> str:
    what = f"{size} bytes" if size is not None else "more bytes"
    return (f"{uri}: {what} is larger than data.max_file_bytes ({max_file_bytes} bytes); refused before reading it. "
            f"Remove the file, or raise data.max_file_bytes if it is a genuine image")


def _ingest(items: Iterable[tuple[int, bytes]], uri_of: Callable[[int], str],
            expect: Callable[[int], tuple[str, str, str, str]], hashes, fsha, verify: bool, workers: int,
            chunk_size: int, limits: _Limits, work: Counter, path: str = "the source",
            spill_dir: Optional[Path] = None) -> _Decoded:
    """Digest what was read; decode what the digests cannot vouch for. Fills ``hashes`` and
    ``fsha`` in place (by row index); returns the decoded rows (:class:`_Decoded`: spilled to a
    file in ``spill_dir`` as they arrive, if given).

    ``expect(i)`` = (pixel hash and file digest the store recorded, file digest and pixel hash
    the stat cache recorded), "" where unknown: a row whose bytes hash to a recorded digest is
    confirmed without decoding (unless ``verify``)."""

    dec = _Decoded(spill_dir, keep_raw=limits.resize is not None)

    def to_decode() -> Iterator[tuple[int, bytes]]:
        for i, data in items:
            digest = hashlib.sha256(data).hexdigest()
            fsha[i] = digest
            work["read"] += 1
            work["bytes_read"] += len(data)
            k_sha, k_fsha, c_fsha, c_sha = expect(i)
            if k_sha and not verify and ((k_fsha and digest == k_fsha) or (c_fsha == digest and c_sha == k_sha)):
                hashes[i] = k_sha
                work["confirmed_by_digest"] += 1
                continue
            dec.add_raw(i, data)
            yield i, data

    errors: list[str] = []
    bar = progress_bar(desc="decode", unit="img")
    try:
        for tags, results in _decode_stream(to_decode(), workers, chunk_size, limits.max_pixels, limits.resize):
            for i, res in zip(tags, results):
                if isinstance(res, str):
                    errors.append(f"{uri_of(i)}: {res}")
                else:
                    dec.add(i, res[0])
                    hashes[i] = res[1]
            work["decoded"] += len(tags)
            bar.update(len(tags))
        if errors:
            raise SourceError(_listing(f"{len(errors)} file(s) in {path} are not usable images", errors,
                                       "fix or remove them (every file in a class folder must be an image)"))
    except BaseException:
        dec.discard()
        raise
    finally:
        bar.close()
    return dec


def _is_archive(p: Path) -> bool:
    return p.name.endswith((".tar.gz", ".tgz", ".tar"))


def _split_archives(folder: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for child in sorted(folder.iterdir()):
        for split in SPLITS:
            if re.fullmatch(rf"(.+-)?{split}\.(tar\.gz|tgz|tar)", child.name):
                found[split].append(child)
    if not found["train"] and not found["test"]:
        raise SourceError(
            f"{folder} holds neither train/ and test/ folders nor *-train.tar.gz / *-test.tar.gz archives: "
            f"lay the data out as train/<class>/* and test/<class>/*"
        )
    out: dict[str, Path] = {}
    for split in SPLITS:
        if not found[split]:
            raise SourceError(f"{folder}: missing the {split} archive (*-{split}.tar.gz or {split}.tar.gz next to the other)")
        if len(found[split]) > 1:
            raise SourceError(f"{folder}: several {split} archives ({', '.join(a.name for a in found[split])}); keep one")
        if found[split][0].is_symlink():
            raise SourceError(f"{found[split][0]} is a symlink: copy the archive into the source folder")
        out[split] = found[split][0]
    return out


def _printable(text: str) -> str:
    """A name as text that can always be printed: undecodable bytes as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_name(label: str, rel: str) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(
            f"{_printable(label)}::{_printable(rel)}: the name is not valid UTF-8 (bytes "
            f"{rel.encode('utf-8', 'surrogateescape')!r}); rename it to UTF-8 (sample ids and manifests are UTF-8)"
        ) from None


@dataclass
class _Listing:
    """A folder source listed in row order: ids (= paths inside the source), sizes, mtimes, and the
    class folders as runs of rows (split, class, start, end)."""

    dirs: set[str]
    ids: list[str] | pa.ChunkedArray  # Arrow when listing_unchanged made it (the cache's rows, then the walk's)
    sizes: np.ndarray
    mtimes: np.ndarray
    runs: list[tuple[str, str, int, int]]
    # Some of the tree's files only (the new ones, ``listing_appended``), whose whole tree's layout
    # was checked as it was listed; ``dirs`` is still every class folder (the class names come from it)
    part_of_tree: bool = False

    def splits(self) -> np.ndarray:
        return np.repeat(np.array([r[0] for r in self.runs] or [""], dtype=object)[: len(self.runs)],
                         [r[3] - r[2] for r in self.runs])

    def classes(self) -> np.ndarray:
        return np.repeat(np.array([r[1] for r in self.runs] or [""], dtype=object)[: len(self.runs)],
                         [r[3] - r[2] for r in self.runs])

    def counts(self) -> Counter:
        return Counter({f"{s}/{c}": b - a for s, c, a, b in self.runs})


def _list_folder(root: Path, label: str, max_file_bytes: int) -> _Listing:
    """List train/ and test/ with one lstat per file, opening none; refuse what a source must not hold."""
    dirs: set[str] = set()
    ids: list[str] = []
    # typed arrays, not lists: 2 int objects a file were ~80 MB at 1M files (bench/results/snapshot_noop_1m.log)
    sizes, mtimes = array.array("q"), array.array("q")
    runs: list[tuple[str, str, int, int]] = []
    for split, cls, names, sz, mt in _walk_folder(root, label, max_file_bytes):
        start = len(ids)
        ids += names
        sizes += sz
        mtimes += mt
        if runs and runs[-1][:2] == (split, cls):  # the next part of the same folder
            start = runs.pop()[2]
        dirs.add(f"{split}/{cls}")
        runs.append((split, cls, start, len(ids)))
    return _Listing(dirs, ids, np.frombuffer(sizes, np.int64), np.frombuffer(mtimes, np.int64), runs)


def _walk_folder(root: Path, label: str, max_file_bytes: int, part: Optional[int] = None
                 ) -> Iterator[tuple[str, str, list[str], array.array, array.array]]:
    """The class folders of train/ and test/ in row order, as ``(split, class, ids, sizes,
    mtimes)`` parts of at most ``part`` files (a folder's parts in a row; an empty folder as one
    empty part), one lstat per file and none opened; what a source must not hold is refused as it
    is met. A folder's names are held (they are sorted), their ids and stats a part at a time."""
    _check_name(label, "")
    part = part or WALK_PART
    by_name = operator.attrgetter("name")
    for split in SPLITS:
        sdir = root / split
        if sdir.is_symlink():
            raise SourceError(f"{sdir} is a symlink: a source must be a self-contained tree (copy the data in)")
        if not sdir.is_dir():
            continue  # reported as a missing split once everything is listed
        with os.scandir(sdir) as it:
            class_dirs = sorted(it, key=by_name)
        for cdir in class_dirs:
            rel = f"{split}/{cdir.name}"
            _check_name(label, rel)
            if cdir.is_symlink():
                raise SourceError(f"{label}::{rel} is a symlink: copy the data into the source (symlinks are refused)")
            if not cdir.is_dir(follow_symlinks=False):
                raise SourceError(f"{label}::{rel} is a file directly in {split}/: every image must be in a class folder {split}/<class>/")
            folder = cdir.path
            names = sorted(os.listdir(folder))
            for p0 in range(0, max(len(names), 1), part):
                ids: list[str] = []
                sizes, mtimes = array.array("q"), array.array("q")
                for name in names[p0:p0 + part]:
                    frel = f"{rel}/{name}"
                    if not name.isascii():
                        _check_name(label, frel)
                    st = os.lstat(f"{folder}/{name}")
                    if not stat_mod.S_ISREG(st.st_mode) or st.st_nlink > 1 or st.st_size > max_file_bytes:
                        _refuse_file(label, frel, split, st, max_file_bytes)
                    ids.append(frel)
                    sizes.append(st.st_size)
                    mtimes.append(st.st_mtime_ns)
                yield split, cdir.name, ids, sizes, mtimes


def _refuse_file(label: str, frel: str, split: str, st: os.stat_result, max_file_bytes: int) -> None:
    """Raise the error a listed file deserves (the listing's fast path calls this only on a misfit)."""
    mode = st.st_mode
    if stat_mod.S_ISLNK(mode):
        raise SourceError(f"{label}::{frel} is a symlink: copy the file into the source (symlinks are refused)")
    if stat_mod.S_ISDIR(mode):
        raise SourceError(f"{label}::{frel} is a folder inside a class folder: expected {split}/<class>/<image file>")
    if not stat_mod.S_ISREG(mode):
        raise SourceError(f"{label}::{frel} is not a regular file: remove it")
    if st.st_nlink > 1:
        raise SourceError(
            f"{label}::{frel} is a hard link ({st.st_nlink} names for one file): a source must be a "
            f"self-contained tree whose files change only through it; copy the file instead of linking it "
            f"(cp without -l, or `dvc config cache.type copy` for a DVC-managed source)")
    raise SourceError(_too_big(f"{label}::{frel}", st.st_size, max_file_bytes))


def _archive_entries(archive: Path, label: str, splits: tuple[str, ...],
                     max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
                     ) -> Iterator[tuple[_Entry | tuple[str, str], bytes | None]]:
    """Stream a tar archive member by member (no seeking: .tar.gz is read once, in order)."""
    try:
        tf = tarfile.open(archive, mode="r|*")
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{archive}: not a readable tar archive ({exc}); re-create it with `tar czf`") from exc
    seen: set[str] = set()
    dirs: set[str] = set()
    try:
        with tf:
            for m in tf:
                name = m.name
                _check_name(label, name)
                parts = [x for x in name.split("/") if x not in (".", "")]
                # stricter than data_filter (which strips a leading / and allows a `..` that stays inside)
                if ".." in parts or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
                    raise SourceError(f"{label}::{name}: member path {'with .. ' if '..' in parts else 'is absolute, '}"
                                      f"refused; re-create the archive with plain relative paths (tar -C <dir> ...)")
                if m.issym() or m.islnk() or m.type not in _PLAIN_TYPES:  # stricter: no links at all
                    kind = "symlink" if m.issym() else "hard link" if m.islnk() else f"member of type {m.type!r}"
                    raise SourceError(f"{label}::{name}: {kind} in the archive refused; store regular files only")
                try:
                    # the standard library's extraction policy: no absolute or escaping paths, no
                    # device files, no links pointing outside
                    tarfile.data_filter(m, _FILTER_ROOT)
                except tarfile.FilterError as exc:
                    what = "with .. " if ".." in parts else "is absolute, " if name.startswith("/") else ""
                    raise SourceError(
                        f"{label}::{name}: member path {what}refused ({exc}): it could escape the source; "
                        f"re-create the archive with relative paths of regular files (tar -C <dir> ...)"
                    ) from None
                if not parts:
                    continue
                if parts[0] not in splits:
                    raise SourceError(f"{label}::{name}: outside {' and '.join(s + '/' for s in splits)}; "
                                      f"expected <split>/<class>/<image file>")
                if m.isdir():
                    if len(parts) == 2:
                        yield ("dir", parts[0] + "/" + parts[1]), None
                    elif len(parts) > 2:
                        raise SourceError(f"{label}::{name}: folder inside a class folder; expected {parts[0]}/<class>/<image file>")
                    continue
                if len(parts) != 3:
                    raise SourceError(f"{label}::{name}: expected {parts[0]}/<class>/<image file>")
                rel = "/".join(parts)
                if rel in seen:
                    raise SourceError(f"{label}::{name}: appears twice in the archive; keep one copy")
                seen.add(rel)
                if m.size > max_file_bytes:  # from the tar header: nothing of the member is read
                    raise SourceError(_too_big(f"{label}::{rel}", m.size, max_file_bytes))
                cls_dir = parts[0] + "/" + parts[1]
                if cls_dir not in dirs:
                    dirs.add(cls_dir)
                    yield ("dir", cls_dir), None
                yield _Entry(parts[0], parts[1], parts[2], f"{label}::{rel}", rel, int(m.size)), _member_bytes(tf, m)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise SourceError(f"{archive}: truncated or corrupt archive ({exc}); re-create or re-download it") from exc


def _member_bytes(tf: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    fh = tf.extractfile(m)
    data = fh.read() if fh is not None else b""
    if len(data) != m.size:
        raise tarfile.ReadError(f"unexpected end of data in {m.name}")
    return data


_FILTER_ROOT = "/nonexistent-poisongate-source"  # data_filter judges paths against a destination
_PLAIN_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE)


def _select_limit(keyed: list[tuple[tuple[int, str, str], object]], limit: int) -> list[tuple]:
    """Round-robin over classes, per split: keyed items are ((split_idx, class, file), payload)."""
    out: list[tuple] = []
    for s in range(len(SPLITS)):
        part = [(k[1], k[2], id(v), v) for k, v in keyed if k[0] == s]
        out += [(t[0], t[3]) for t in _round_robin(part, limit)]
    return out


def _check_layout(path: str, dirs: set[str], counts: Counter) -> None:
    """Both splits present, with the same class folders, none empty (``counts``: rows per split/class)."""
    classes = {s: sorted({d.split("/", 1)[1] for d in dirs if d.startswith(s + "/")}) for s in SPLITS}
    for split in SPLITS:
        if not classes[split]:
            raise SourceError(
                f"{path}: missing {split}/ (or it has no class folders): the source needs train/<class>/* and test/<class>/*"
            )
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise SourceError(
            f"{path}: test/ and train/ must have the same class folders; only in train/: {only_train}, "
            f"only in test/: {only_test}"
        )
    empty = sorted(d for d in dirs if counts[d] == 0)
    if empty:
        raise SourceError(_listing(f"{path}: {len(empty)} empty class folder(s)", [f"{path}::{d}/" for d in empty],
                                   "add images to them or remove the folders"))


class _Decoded:
    """The decoded rows of one read, as they arrive from the decode workers (issue 19 item 3).

    With ``spill_dir`` the pixels go to a file there as they arrive, and :meth:`images` is a lazy
    (:class:`pipeline.data.rows.LazyRows`) view of it: a cold snapshot of 1M rows holds a few decode
    chunks in memory, not the data set (the old dict of arrays, its stack, the plan's copy and
    the pack's buffer were four copies). Without, they stay in memory (``load_imagefolder``).
    Rows of another shape than the first are counted, not kept: they make the read fail
    (:meth:`check`), and a few of each shape are remembered to be named."""

    def __init__(self, spill_dir: Optional[Path] = None, keep_raw: bool = False):
        self.spill_dir = spill_dir
        # The files' bytes too (issue 19 item 5: a transformed source's raw bytes stay in the
        # store, so its pixels can be derived again under another transform without the source).
        self.keep_raw = keep_raw and spill_dir is not None
        # typed arrays, not lists: a Python int per row (~40 MB at 1M rows) outlived the read, and
        # its objects, made between the decode's short-lived strings, kept their arenas resident
        self.raw_rows = array.array("q")
        self.raw_lengths = array.array("q")
        self.raw_path: Optional[Path] = None
        self._raw_fh = None
        self.shape: Optional[tuple[int, ...]] = None
        self.rows = array.array("q")  # row index of each kept image, in arrival order
        self.arrays: list[np.ndarray] = []
        self.path: Optional[Path] = None
        self._fh = None
        self.shapes: Counter = Counter()
        self.named: dict[tuple[int, ...], list[int]] = {}  # up to MAX_LISTED rows of each shape

    def add(self, i: int, arr: np.ndarray) -> None:
        shape = tuple(arr.shape)
        self.shapes[shape] += 1
        named = self.named.setdefault(shape, [])
        if len(named) < MAX_LISTED:
            named.append(i)
        if self.shape is None:
            self.shape = shape
            if self.spill_dir is not None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f"decoded-{os.getpid()}-", suffix=".u8", dir=self.spill_dir)
                self.path, self._fh = Path(tmp), os.fdopen(fd, "wb")
        if shape != self.shape:
            return  # the read fails in check(); its pixels are never used
        self.rows.append(i)
        if self._fh is not None:
            _spill_write(self._fh, self.path, np.ascontiguousarray(arr, np.uint8).tobytes())
        else:
            self.arrays.append(arr)

    def add_raw(self, i: int, data: bytes) -> None:
        if not self.keep_raw:
            return
        if self._raw_fh is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"raw-{os.getpid()}-", suffix=".u8", dir=self.spill_dir)
            self.raw_path, self._raw_fh = Path(tmp), os.fdopen(fd, "wb")
        _spill_write(self._raw_fh, self.raw_path, data)
        self.raw_rows.append(i)
        self.raw_lengths.append(len(data))

    def __len__(self) -> int:
        return len(self.rows)

    def raw(self, rows: np.ndarray):
        """The kept files' bytes of ``rows`` (row indices, each kept), in that order
        (:class:`pipeline.data.rows.RawBlobs`); None unless ``keep_raw``."""
        if not self.keep_raw:
            return None
        from pipeline.data.rows import RawBlobs

        rows = np.asarray(rows, np.int64)
        if self._raw_fh is not None:
            fh, self._raw_fh = self._raw_fh, None
            _spill_write(fh, self.raw_path, None)
        if not len(self.raw_rows):
            return RawBlobs(os.devnull, np.zeros(0, np.int64), np.zeros(0, np.int64))
        arrival = np.asarray(self.raw_rows, np.int64)
        lengths = np.asarray(self.raw_lengths, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        order = np.argsort(arrival, kind="stable")
        at = order[np.searchsorted(arrival[order], rows)]
        return RawBlobs(self.raw_path, offsets[at], lengths[at])

    def check(self, path: str, uri_of: Callable[[int], str]) -> None:
        """One channel count and one size, or a SourceError naming the odd files."""
        if len(self.shapes) < 2:
            return
        channels = Counter()
        for shape, n in self.shapes.items():
            channels[shape[2]] += n
        if len(channels) > 1:
            major = channels.most_common(1)[0][0]
            odd = [(i, f"{uri_of(i)}: {shape[2]} channel(s)") for shape, rows in self.named.items()
                   if shape[2] != major for i in rows]
            raise SourceError(_listing(
                f"{path} mixes grayscale and colour images ({dict(channels)} by channel count)", [m for _, m in sorted(odd)],
                f"convert them to {'RGB' if major == 3 else 'grayscale (L)'} like the other {channels[major]} images",
                total=sum(n for shape, n in self.shapes.items() if shape[2] != major)))
        (h, w, _c), n = self.shapes.most_common(1)[0]
        odd = [(i, f"{uri_of(i)}: {shape[1]}x{shape[0]}") for shape, rows in self.named.items()
               if shape[:2] != (h, w) for i in rows]
        raise SourceError(_listing(
            f"{path} has images of more than one size (most are {w}x{h}, {n} images)", [m for _, m in sorted(odd)],
            f"set data.resize: [{h}, {w}] (and data.resize_mode: fit | stretch) to resize every image when it is "
            f"ingested, or resize or remove them", total=sum(k for shape, k in self.shapes.items() if shape[:2] != (h, w))))

    def images(self, rows: np.ndarray):
        """The kept images of ``rows`` (row indices, each kept), in that order: a numpy array, or
        lazy rows of the spill file."""
        rows = np.asarray(rows, np.int64)
        if not len(self.rows):
            return np.zeros((0, 1, 1, 1), np.uint8)
        arrival = np.asarray(self.rows, np.int64)
        order = np.argsort(arrival, kind="stable")
        at = order[np.searchsorted(arrival[order], rows)]  # arrival position of each requested row
        if self.path is None:  # kept in memory
            return np.stack([self.arrays[k] for k in at]) if len(at) else np.zeros((0, *self.shape), np.uint8)
        from pipeline.data.rows import LazyRows, file_identity

        if self._fh is not None:  # the last row has arrived: the file is complete
            fh, self._fh = self._fh, None
            _spill_write(fh, self.path, None)
        return LazyRows([(self.path, 0, len(self.rows), file_identity(self.path))], np.zeros(len(at), np.int32),
                        at, self.shape)

    def discard(self) -> None:
        for fh in (self._fh, self._raw_fh):
            if fh is not None:
                try:
                    fh.close()
                except OSError:
                    pass  # its buffered bytes cannot be flushed (a full disk): the file goes anyway
        self._fh = self._raw_fh = None
        for path in (self.path, self.raw_path):
            if path is not None:
                path.unlink(missing_ok=True)


def _spill_write(fh, path: Optional[Path], data: Optional[bytes]) -> None:
    """A write to a spill file (``data`` None: flush, fsync and close it) whose OSError names the
    file: a full disk reports ENOSPC from a write or a flush without a name."""
    try:
        if data is not None:
            fh.write(data)
        else:
            try:
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fh.close()
    except OSError as exc:
        if not exc.filename:
            exc.poisongate_path = str(path)  # type: ignore[attr-defined]
        raise


def clear_spill(spill_dir: Path) -> None:
    """Remove the spill files (:class:`_Decoded`) of processes that are gone (a killed snapshot)."""
    if not spill_dir.is_dir():
        return
    for f in spill_dir.glob("*.u8"):
        m = re.fullmatch(r"(?:decoded|raw)-(\d+)-.*\.u8", f.name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except OSError:
            pass  # alive, another user's: not ours to remove


def _listing(head: str, items: list[str], fix: str, total: Optional[int] = None) -> str:
    """``total``: how many there are when ``items`` names only some of them."""
    total = len(items) if total is None else total
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {total - min(len(items), MAX_LISTED)} more" if total > min(len(items), MAX_LISTED) else ""
    return f"{head}: {fix}\n  {shown}{more}"


# ----------------------------------------------------------------------------- decoding


def _workers(n: int) -> int:
    if n and n > 0:
        return int(n)
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def _chunks(items: Iterable[tuple[object, bytes]], size: int, max_bytes: int = CHUNK_BYTES
            ) -> Iterator[tuple[list[object], list[bytes]]]:
    tags: list[object] = []
    blobs: list[bytes] = []
    held = 0
    for tag, b in items:
        tags.append(tag)
        blobs.append(b)
        held += len(b)
        if len(tags) == size or held >= max_bytes:
            yield tags, blobs
            tags, blobs, held = [], [], 0
    if tags:
        yield tags, blobs


def _decode_stream(items: Iterable[tuple[object, bytes]], workers: int, chunk_size: int,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, resize: Optional[Resize] = None
                   ) -> Iterator[tuple[list[object], list[tuple[np.ndarray, str] | str]]]:
    """Decode chunk by chunk; a pool only when there is more than one chunk to share out.

    The parent keeps reading (the archive stream) while up to 2 chunks per worker are in flight, so
    reading and decoding overlap without holding the whole data set's bytes in memory.
    """
    chunks = _chunks(items, chunk_size)
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    if second is None or workers <= 1:
        for tags, bs in (c for c in (first, second) if c is not None):
            yield tags, decode_chunk(bs, max_pixels, resize)
        for tags, bs in chunks:
            yield tags, decode_chunk(bs, max_pixels, resize)
        return
    import multiprocessing as mp

    # fork: workers start in milliseconds and need nothing but Pillow and numpy.
    ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
    with ctx.Pool(workers) as pool:
        pending: deque = deque()

        def submit(chunk: tuple[list[object], list[bytes]]) -> None:
            pending.append((chunk[0], pool.apply_async(decode_chunk, (chunk[1], max_pixels, resize))))

        submit(first)
        submit(second)
        for chunk in chunks:
            submit(chunk)
            while len(pending) > 2 * workers:
                tags, res = pending.popleft()
                yield tags, res.get()
        while pending:
            tags, res = pending.popleft()
            yield tags, res.get()


def decode_chunk(blobs: list[bytes], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 resize: Optional[Resize] = None) -> list[tuple[np.ndarray, str] | str]:
    """Worker task: decode (and resize) and hash each blob; an error becomes its message (the parent
    names the file). The hash is of the pixels the store keeps, after the transform."""
    from pipeline.core.hashing import sample_hash

    out: list[tuple[np.ndarray, str] | str] = []
    for b in blobs:
        try:
            img = decode_image(b, max_pixels)
            if resize is not None:
                img = resize.apply(img)
            out.append((img, sample_hash(img)))
        except SourceError as exc:
            out.append(str(exc))
    return out


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Pillow-decode one image file to a canonical uint8 (H, W, C) array, C in {1, 3}.

    The dimensions come from the header (``Image.open`` reads nothing else) and are checked against
    ``max_pixels`` before a single pixel is decoded; Pillow's decompression-bomb guard is set to the
    same bound, and its warning is an error here, so nothing is decoded past it.
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise SourceError(_too_many_pixels(f"{w}x{h}", max_pixels))
                if getattr(im, "n_frames", 1) > 1:
                    raise SourceError(f"animated/multi-frame {im.format} image; store one frame per file")
                im.load()
                return _canonical(im)
    except UnidentifiedImageError:
        raise SourceError(f"not an image ({'/'.join(FORMATS)}) Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        size = re.search(r"\((\d+) pixels\)", str(exc))
        raise SourceError(_too_many_pixels(f"{size.group(1) if size else 'too many'} pixels", max_pixels)) from None
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise assorted types on malformed files
        raise SourceError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None


def _too_many_pixels(size: str, max_pixels: int) -> str:
    return (f"image of {size} is larger than data.max_image_pixels ({max_pixels} pixels); refused before decoding. "
            f"Resize or remove it, or raise data.max_image_pixels if such images are genuine")


def _canonical(im) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        if "transparency" in im.info:
            im, mode = im.convert("RGBA"), "RGBA"
        else:
            return _as_hwc(np.asarray(im.convert("L" if _grey_palette(im) else "RGB")))
    if mode in ("PA",):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.size and alpha.min() < 255:
            raise SourceError(
                f"{mode} image with transparency (alpha < 255 on {int((alpha < 255).sum())} pixels); "
                f"flatten it onto a background and save it without alpha"
            )
        return _as_hwc(np.asarray(im.convert("L" if mode.startswith("L") else "RGB")))
    if mode in ("1", "L"):
        return _as_hwc(np.asarray(im.convert("L")))
    if mode in ("RGB", "YCbCr", "CMYK"):
        return _as_hwc(np.asarray(im.convert("RGB") if mode != "RGB" else im))
    if mode.startswith(("I", "F")):
        raise SourceError(f"{mode} (16-bit or float) image; the store holds 8-bit images: convert it to L or RGB")
    if mode in ("LAB", "HSV"):
        return _as_hwc(np.asarray(im.convert("RGB")))
    raise SourceError(f"unsupported image mode {mode}; save it as L or RGB")


def _grey_palette(im) -> bool:
    pal = im.getpalette() or []
    used = [i for _, i in (im.getcolors(256) or [])]
    return all(pal[3 * i] == pal[3 * i + 1] == pal[3 * i + 2] for i in used if 3 * i + 2 < len(pal))


def _as_hwc(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.uint8, copy=False)
    return np.ascontiguousarray(a[..., None] if a.ndim == 2 else a)


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)
