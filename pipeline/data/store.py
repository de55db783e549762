"""The content-addressed, append-only sample store under ``data/store``: a hash chain, like git.

Layout (format 2; docs/store.md has the full story)::

    data/store/FORMAT                          "poisongate-store 2"
    data/store/packs/<sha256>.npy              uint8 (n, H, W, C): the pixels one snapshot ingested
    data/store/deltas/<sha256>.parquet         delta manifest: the rows one snapshot added
    data/store/features/<sha256>.parquet       the data gate's per-row columns of those rows (optional)
    data/store/snapshots/<snapshot_id>.json    header; its sha256 IS the snapshot id
    data/store/heads/<source-key>              the current snapshot of one source lineage (the only ref)

Every file is named by the sha256 of its bytes, so every file can be checked against its name:

- a **header** (canonical JSON: sorted keys, ASCII) names its ``parent`` (a snapshot id or null),
  its ``delta`` (sha256 and row count), the ``packs`` its new rows live in, ``class_names``,
  ``image_shape``, ``source`` (the lineage key and what identified the source: path, limit,
  archive digests), ``created``, ``n_rows``, ``n_new`` and ``counts``. The snapshot id is the sha256
  of the header file, so a snapshot id pins its whole history: the header pins its delta and packs
  by hash, and its parent by id, back to the root.
- a **delta** (Parquet, columns ``DELTA_SCHEMA``) holds only the rows that snapshot added:
  ``sample_id, sha256, label, split, source_uri, ingest_time, pack, pack_index, file_size,
  file_sha256`` (``sha256`` = pixel hash, ``core.hashing.sample_hash``; ``file_sha256`` = sha256 of
  the source file's bytes at ingest, what makes the next snapshot incremental).
- a **features** file (Parquet, ``FEATURE_SCHEMA``, optional: ``header["features"]`` names it with
  the detector settings it was computed with) holds, row-aligned with the delta, what the data gate
  needs of each new row's pixels: ``phash``, ``abnormal_block``, ``abnormal_block_at``
  (``stats.row_features``). Computed once, at ingest, so the data gate reads columns, not pixels
  (issue 19 item 2); bound by the header like the delta, so an edited file is a DamagedStore.
- a **base** (optional; ``header["base"]``, every ``BASE_EVERY`` snapshots): the parent's full
  manifest, its pixels in manifest order and its data-gate columns, bound by sha256 like a delta.
  Loads (:func:`resolve`) start at the newest base on disk instead of the root, so they read at
  most ``BASE_EVERY`` deltas and packs whatever the history's length (issue 19 item 4); a base
  that is not on disk (superseded and removed) only means walking further back.
- the **full manifest** of a snapshot is its chain's deltas concatenated, root first, with a
  ``snapshot_id`` column naming the snapshot that first ingested each row (derived from the chain,
  not stored: a delta cannot contain the hash of the header that names it).

Rules
-----
- Verify before use: :func:`chain` checks every header against its id and the links between
  them; :func:`load_manifest` checks every delta against its hash; :func:`verify_packs` hashes
  every pack (``hashlib.file_digest``). Any mismatch is a :class:`DamagedStore` (exit 1) naming the
  file and how to restore it, never a complaint about the source. ``verify(deep=True)`` re-hashes
  every sample as well.
- Append-only: a new snapshot holds every row of its parent unchanged, followed by the new rows in
  source order. An earlier row whose pixels, label or split changed, or that vanished, makes
  :func:`plan_snapshot` raise :class:`SnapshotRefused` listing every offending row; nothing is
  written. A vanished row whose exact pixels reappear under a new id is reported as "looks like a
  rename of X to Y" (same class) or "looks like a relabel of X (class a) to Y (class b)".
- Class indices are stable: a class that appears later gets the next index.
- One lineage per source key (``sources.source_key``). ``heads/<key>`` is the one ref saying which
  snapshot is current; when it is missing it is recovered from the history: the one snapshot of
  that key no other names as parent; several tips is a damaged store and is refused.
- Writes are atomic (temp file + ``os.replace``) and ordered pack -> delta -> header -> heads: a
  crash leaves at most files nothing refers to, never half a snapshot. A re-run after a crash
  between header and heads adopts the header it already wrote (same rows) instead of forking.
- Format 1 stores (CSV manifests, ids not chained) are refused with "re-snapshot into a new
  store": there was no data to migrate.

``python -m pipeline.data.store verify [--store data/store] [--deep]`` checks every lineage.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import heap
from pipeline.core.hashing import sample_hash
from pipeline.data.rows import Prefixed, as_strings, blank_strings
from pipeline.errors import CheckFailed, UserError
from pipeline.io import atomic_write_bytes as atomic_write
from pipeline.io import atomic_write_with, create_temp

FORMAT_VERSION = 2
FORMAT_FILE = "FORMAT"
FORMAT_TEXT = f"poisongate-store {FORMAT_VERSION}\n"
COLUMNS = ["sample_id", "sha256", "label", "split", "source_uri", "ingest_time", "snapshot_id", "pack", "pack_index"]
FILE_COLUMNS = ["file_size", "file_sha256"]
MANIFEST_COLUMNS = COLUMNS + FILE_COLUMNS  # the full manifest (DataFrame) of load_manifest / load_snapshot
DELTA_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("sha256", pa.string()),
    ("label", pa.int64()),
    ("split", pa.string()),
    ("source_uri", pa.string()),
    ("ingest_time", pa.string()),
    ("pack", pa.string()),
    ("pack_index", pa.int64()),
    ("file_size", pa.int64()),  # -1: the row did not come from a file (digits)
    ("file_sha256", pa.string()),  # "": idem
])
DELTA_COLUMNS = DELTA_SCHEMA.names
FEATURE_SCHEMA = pa.schema([("phash", pa.uint64()), ("abnormal_block", pa.bool_()), ("abnormal_block_at", pa.string())])
BASE_SCHEMA = pa.schema([*DELTA_SCHEMA, ("snapshot_id", pa.string())])  # a base's manifest: every row of its parent
BASE_FEATURE_SCHEMA = pa.schema([*FEATURE_SCHEMA, ("stored", pa.bool_())])
# Snapshots since the last base (or the root) after which the next snapshot writes a base: a load
# then reads at most this many deltas and packs plus one base, however long the history (issue 19
# item 4). Each base copies its parent's pixels once; the one before it is removed, so the store
# holds at most one consolidated copy per lineage. 32: a 1% append's fixed cost stays ~1/32 of a
# full copy, and 32 small files load in ~40 ms (bench/results/store_load.md).
BASE_EVERY = 32
_BASE_USED = "base_used"  # set on the first header of a resolve(): its base stands for the rows before it
_INT_COLUMNS = ("label", "pack_index", "file_size")
# Columns with a few values repeated over many rows (one per snapshot, or per split): a parent's
# manifest holds them as pandas categoricals, not a string a row. At 1M rows they were 182 MiB of
# the 605 MiB the no-op snapshot's parent load added (bench/results/snapshot_noop_phases_1m.log).
REPEATED_COLUMNS = ("split", "ingest_time", "snapshot_id", "pack")
HEADER_KEYS = {"format", "parent", "delta", "packs", "class_names", "image_shape", "source", "created",
               "n_rows", "n_new", "counts"}
MAX_LISTED = 20  # rows named in one error message
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(UserError):
    """The store cannot be used as asked (missing snapshot, unknown format); the message says why."""


class IntegrityError(StoreError, CheckFailed):
    """Stored bytes do not match their recorded hashes (exit 1)."""

    prefix = "integrity check failed, stage aborted: "


class DamagedStore(IntegrityError):
    """A store file is missing or does not match its hash: the store, not the source, is at fault."""

    def __init__(self, store: str | Path, path: str | Path, what: str):
        self.path = str(path)
        super().__init__(f"damaged store: {path}: {what}. The source is not at fault. {restore_hint(store)}")


class SnapshotRefused(StoreError, CheckFailed):
    """The source rewrote history: earlier rows changed or vanished. `problems` lists them all."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


def restore_hint(store: str | Path) -> str:
    return (f"Restore {store} from DVC: `dvc checkout --force {store}` (this machine's DVC cache) or "
            f"`dvc pull --force {store}` (the DVC remote), or from a backup; then check it with "
            f"`python -m pipeline.data.store verify --store {store}`")


@dataclass(frozen=True)
class Snapshot:
    id: str
    # MANIFEST_COLUMNS (a load with ``columns``: those and what the load reads; the data gate then
    # drops pack and pack_index, which its lazy rows hold); label, pack_index, file_size int64
    manifest: pd.DataFrame
    images: np.ndarray  # uint8 (N, H, W, C), row-aligned with manifest (a rows.LazyRows when loaded lazy)
    class_names: list[str]
    image_shape: tuple[int, int, int]
    meta: dict = field(default_factory=dict)  # the header, plus "id"

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["label"].to_numpy(dtype=np.int64)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images, labels, sample_ids) of one split, in manifest order."""
        images, labels, ids = self.split_rows(name)
        return images, labels, ids.tolist()

    def split_rows(self, name: str) -> tuple[np.ndarray, np.ndarray, Any]:
        """:meth:`split` with the sample ids as the manifest's column (a pandas array, Arrow-backed
        for a stored snapshot; indexable by position) instead of a list of Python strings: at 808k
        train rows the list held ~65 MiB for as long as a stage kept it (issue 19 item 3)."""
        from pipeline.data.rows import take

        mask = (self.manifest["split"] == name).to_numpy()
        return take(self.images, mask), self.labels[mask], self.manifest["sample_id"][mask].reset_index(drop=True).array


@dataclass(frozen=True)
class Parent:
    """What a new snapshot is compared with: the verified manifest and header, no pixels."""

    id: str
    manifest: pd.DataFrame  # MANIFEST_COLUMNS; REPEATED_COLUMNS categorical
    meta: dict
    history: tuple[str, ...] = ()  # the chain's ids, root first (ends with id)
    since_base: int = 0  # headers a load of it reads: since its newest base on disk, else since the root
    base: Optional[dict] = None  # that base's header entry (None: loads read from the root)


@dataclass(frozen=True)
class Plan:
    """The outcome of comparing a source with its parent; pure data, nothing written yet."""

    parent: Optional[str]
    manifest: pd.DataFrame  # full manifest, REPEATED_COLUMNS categorical; the new rows last, their snapshot_id and pack still ""
    new_images: np.ndarray  # uint8 (n_new, H, W, C) or lazy rows (pipeline.data.rows), in the order of the new rows
    class_names: list[str]
    image_shape: tuple[int, int, int]
    new_raw: Optional[object] = None  # the new rows' file bytes (rows.RawBlobs), same order; None: not kept

    @property
    def n_new(self) -> int:
        return len(self.new_images)

    @property
    def unchanged(self) -> bool:
        return self.parent is not None and self.n_new == 0


@dataclass
class VerifyStats:
    snapshots: int = 0
    rows: int = 0
    packs: int = 0
    bytes_hashed: int = 0
    rows_rehashed: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- encoding


def header_bytes(header: dict) -> bytes:
    """The canonical bytes of a header: what the snapshot id hashes (sorted keys, ASCII, LF)."""
    return (json.dumps(header, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def _parquet_buffer(frame: pd.DataFrame, schema: pa.Schema) -> pa.Buffer:
    """The Parquet file of ``frame`` as an Arrow buffer: hashed and written as it is (a bytes copy
    of a 1M-row delta was ~100 MB more at the cold snapshot's peak)."""
    # column by column into Arrow, no Python object per cell (issue 19 item 3)
    table = pa.Table.from_arrays([as_strings(frame[c]) if isinstance(frame[c].dtype, pd.CategoricalDtype)
                                  else pa.array(frame[c], f.type) for c, f in zip(schema.names, schema)], schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _parquet_bytes(frame: pd.DataFrame, schema: pa.Schema) -> bytes:
    return _parquet_buffer(frame, schema).to_pybytes()


def delta_bytes(rows: pd.DataFrame) -> bytes:
    """The Parquet bytes of a delta manifest (the new rows of one snapshot)."""
    return _parquet_bytes(rows, DELTA_SCHEMA)


def features_bytes(features: pd.DataFrame) -> bytes:
    """The Parquet bytes of a features file (``FEATURE_SCHEMA``, row-aligned with its delta)."""
    return _parquet_bytes(features, FEATURE_SCHEMA)


def counts(manifest: pd.DataFrame, class_names: list[str]) -> dict:
    """Rows per split and class: ``stats.counts``'s table, by bincount (it runs on every append)."""
    splits = manifest["split"].to_numpy(dtype=object)
    labels = manifest["label"].to_numpy(dtype=np.int64)
    out: dict = {}
    for split in sorted(set(splits.tolist()), key=lambda s: (s != "train", s)):
        per = np.bincount(labels[splits == split], minlength=len(class_names))
        out[split] = {"n": int(per.sum()), "per_class": {c: int(per[i]) for i, c in enumerate(class_names)}}
    return out


def add_counts(a: dict, b: dict, class_names: list[str]) -> dict:
    """:func:`counts` of two sets of rows, from each one's."""
    out: dict = {}
    for split in sorted(set(a) | set(b), key=lambda s: (s != "train", s)):
        pa_, pb = a.get(split, {}).get("per_class", {}), b.get(split, {}).get("per_class", {})
        per = {c: int(pa_.get(c, 0)) + int(pb.get(c, 0)) for c in class_names}
        out[split] = {"n": int(sum(per.values())), "per_class": per}
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ----------------------------------------------------------------------------- pure functions


def plan_snapshot(parent: Optional[Parent], sample_ids: list[str], hashes: list[str], labels: np.ndarray,
                  class_names: list[str], splits: np.ndarray, uris: list[str], images: np.ndarray,
                  ingest_time: str, *, decoded: Optional[np.ndarray] = None,
                  file_sizes: Optional[np.ndarray] = None, file_sha256: Optional[list[str]] = None,
                  raw=None) -> Plan:
    """Compare a source with its parent; refuse a rewrite of history, else plan the append.

    ``images`` holds the rows marked in ``decoded`` (all rows when ``decoded`` is None); a row that
    was not decoded carries the hash the parent recorded for it, vouched for by the source reader.
    ``raw``: the decoded rows' file bytes (``rows.RawBlobs``, same order as ``images``), kept in the
    store for a transformed source (issue 19 item 5).
    """
    n = len(sample_ids)
    ids_a = as_strings(sample_ids)
    dup = _twice(pa.chunked_array([ids_a]))  # one id, one row: the comparisons below rely on it
    if dup:
        raise SnapshotRefused(f"the source lists {len(dup)} sample id(s) more than once (each row needs an id of its "
                              f"own; nothing was written): {_few(dup)}", [f"{d}: listed more than once" for d in dup])
    decoded = np.ones(n, bool) if decoded is None else np.asarray(decoded, bool)
    if int(decoded.sum()) != len(images):
        raise ValueError(f"{int(decoded.sum())} rows marked decoded but {len(images)} images given")
    dec_pos = np.cumsum(decoded) - 1  # row -> index into images, where decoded
    image_shape = tuple(int(x) for x in images.shape[1:]) if len(images) else (0, 0, 0)
    names = np.array(class_names, dtype=object)[np.asarray(labels, np.int64)] if n else np.zeros(0, object)
    if parent is None:
        store_classes = list(class_names)
        old = empty_manifest()
    else:
        old = parent.manifest
        store_classes = list(parent.meta["class_names"])
        p_shape = tuple(parent.meta["image_shape"])
        if len(images) and p_shape != image_shape:
            raise SnapshotRefused(
                f"the source's images are {image_shape} but snapshot {parent.id} holds {p_shape}: one image shape "
                f"per lineage; restore the source or snapshot it into another store (--store)",
                [f"image shape {p_shape} -> {image_shape}"],
            )
        image_shape = p_shape
        store_classes += sorted(set(class_names) - set(store_classes))
        _refuse_rewrites(parent, sample_ids, hashes, names, splits)
    store_index = {c: i for i, c in enumerate(store_classes)}
    # Which rows are new, by Arrow's hash join: no Python set of every earlier id (issue 19 item 3).
    is_new = (~pc.is_in(ids_a, value_set=as_strings(old["sample_id"])).to_numpy(zero_copy_only=False) if len(old)
              else np.ones(n, bool))
    new_idx = np.flatnonzero(is_new)
    new_pos = new_idx.tolist()
    undecoded = new_idx[~decoded[new_idx]]
    if len(undecoded):
        raise ValueError(f"new rows must be decoded: {_few(ids_a.take(pa.array(undecoded)).to_pylist())}")
    sizes = np.full(n, -1, np.int64) if file_sizes is None else np.asarray(file_sizes, np.int64)
    k = len(new_idx)
    # Every row new (a cold snapshot): the columns as they are. A take of all of them copied four
    # string columns the read still holds (+200 MiB at 1M rows, bench/results/snapshot_cold_phases_1m.log).
    pick = (lambda a: a) if k == n else (lambda a, at=pa.array(new_idx, pa.int64()): a.take(at))
    to_store = np.array([store_index[c] for c in class_names] or [0], np.int64)  # source label -> store label
    uri_col = uris if isinstance(uris, Prefixed) else as_strings(uris)  # Prefixed: made for the rows taken only
    new = pa.table({
        "sample_id": pick(ids_a),
        "sha256": pick(as_strings(hashes)),
        "label": pa.array(to_store[np.asarray(labels, np.int64)[new_idx]] if k else np.zeros(0, np.int64)),
        # REPEATED_COLUMNS as dictionaries: pandas categoricals, as the parent's manifest holds them
        "split": as_strings(np.asarray(splits).astype(str)[new_idx]).dictionary_encode(),
        "source_uri": as_strings(pick(uri_col)),
        "ingest_time": _repeated(ingest_time, k),
        "snapshot_id": _repeated("", k),
        "pack": _repeated("", k),
        "pack_index": pa.array(np.arange(k, dtype=np.int64)),
        "file_size": pa.array(sizes[new_idx]),
        "file_sha256": pick(blank_strings(n) if file_sha256 is None else as_strings(file_sha256)),
    }).to_pandas()[MANIFEST_COLUMNS]
    manifest = old if not new_pos else concat_manifests([old, new], ignore_index=True) if len(old) else new
    if new_pos:
        from pipeline.data.rows import take

        at = dec_pos[np.array(new_pos, dtype=np.int64)]
        # A cold snapshot, and an append that decoded only its new files, take every decoded row in
        # order: no copy, so lazy (spilled) images stay lazy and memory stays flat (issue 19 item 3).
        new_images = images if len(at) == len(images) and bool((at == np.arange(len(at))).all()) else take(images, at)
    else:
        at = np.zeros(0, np.int64)
        new_images = np.zeros((0, *image_shape), np.uint8)
    new_raw = None
    if raw is not None:
        new_raw = raw.subset(at)
        changed = [ids_a[i].as_py() for i, k, n in zip(new_pos, new_raw.lengths.tolist(), sizes[new_pos].tolist())
                   if n >= 0 and k != n]
        if changed:
            raise StoreError(f"{len(changed)} file(s) changed size between the listing and the read ({_few(changed)}): "
                             "something is writing to the source; re-run when it is stable")
    return Plan(parent.id if parent else None, manifest, new_images, store_classes, image_shape, new_raw)


def _repeated(value: str, k: int) -> pa.DictionaryArray:
    """``value`` ``k`` times, stored once."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(k, np.int32)), pa.array([value], pa.string()))


def empty_manifest() -> pd.DataFrame:
    """A manifest of no row, with every column (``MANIFEST_COLUMNS``)."""
    return pd.DataFrame({c: pd.Series([], dtype=np.int64 if c in _INT_COLUMNS else object) for c in MANIFEST_COLUMNS})


def _refuse_rewrites(parent: Parent, sample_ids: list[str], hashes: list[str], names, splits: np.ndarray) -> None:
    old = parent.manifest
    classes = parent.meta["class_names"]
    if not len(old):
        return
    # Vectorised in Arrow and numpy (no Python object per row): which earlier rows are present with
    # the same hash, class and split. Only the rows that are not, and the source's new rows, become
    # Python objects for the messages: a refusal at 1M rows built a dict of every row (+340 MiB).
    src_ids, old_ids = as_strings(sample_ids), as_strings(old["sample_id"])
    pos = pc.index_in(old_ids, value_set=src_ids)
    present = pos.is_valid().to_numpy(zero_copy_only=False)
    p = pos.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    src_hash = as_strings(hashes)
    old_hash = as_strings(old["sha256"])
    old_label = old["label"].to_numpy()
    names = np.asarray(names, dtype=object)
    cur_split = np.asarray(splits).astype(str)
    ok = present if not len(src_ids) else (  # an empty source: every row vanished, nothing to index
        present
        & pc.equal(src_hash.take(pa.array(p)), old_hash).to_numpy(zero_copy_only=False)
        & (names[p] == np.array(classes, dtype=object)[old_label])
        & pc.equal(as_strings(cur_split[p]), as_strings(old["split"])).to_numpy(zero_copy_only=False))
    if ok.all():
        return
    # Where vanished pixels went: the same hash under an id the parent did not have.
    appeared: dict[str, list[int]] = {}
    for k in np.flatnonzero(~pc.is_in(src_ids, value_set=old_ids).to_numpy(zero_copy_only=False)):
        appeared.setdefault(src_hash[int(k)].as_py(), []).append(int(k))
    problems: list[str] = []
    old_split = old["split"].to_numpy()
    for i in np.flatnonzero(~ok):
        sid, h, name, split = old_ids[int(i)].as_py(), old_hash[int(i)].as_py(), classes[int(old_label[i])], old_split[i]
        if not present[i]:
            moved = appeared.get(h, [])
            if moved:
                new_id, new_name = src_ids[moved[0]].as_py(), names[moved[0]]
                if new_name == name:
                    problems.append(f"{sid}: vanished; looks like a rename of {sid} to {new_id} (same pixels)")
                else:
                    problems.append(f"{sid}: vanished; looks like a relabel of {sid} (class {name}) to {new_id} "
                                    f"(class {new_name}), same pixels")
            else:
                problems.append(f"{sid}: vanished from the source")
            continue
        ch, cname, csplit = src_hash[int(p[i])].as_py(), names[p[i]], cur_split[p[i]]
        if ch != h:
            problems.append(f"{sid}: pixels changed (sha256 {h[:12]} -> {ch[:12]})")
        if cname != name:
            problems.append(f"{sid}: label changed ({name} -> {cname})")
        if csplit != split:
            problems.append(f"{sid}: split changed ({split} -> {csplit})")
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise SnapshotRefused(
            f"the source rewrote {len(problems)} row(s) of snapshot {parent.id[:12]} (the store is append-only; "
            f"nothing was written). Restore the original files, or snapshot the changed data into a new store "
            f"(--store) as a new lineage:\n  {shown}{more}",
            problems,
        )


# ----------------------------------------------------------------------------- reading and verifying


def _snap_dir(store: Path) -> Path:
    return store / "snapshots"


def header_path(store_dir: str | Path, snapshot_id: str) -> Path:
    return _snap_dir(Path(store_dir)) / f"{snapshot_id}.json"


def check_format(store_dir: str | Path) -> None:
    """Refuse a store this code cannot read (format 1, or a newer format)."""
    store = Path(store_dir)
    fmt = store / FORMAT_FILE
    if fmt.is_file():
        text = fmt.read_text(errors="replace")
        if text == FORMAT_TEXT:
            return
        m = re.fullmatch(r"poisongate-store (\d+)\n?", text)
        if m:
            raise StoreError(f"{fmt}: store format {m.group(1)} found; this code reads format {FORMAT_VERSION}: "
                             f"use a matching version of poisongate, or re-snapshot into a new store (--store)")
        raise DamagedStore(store, fmt, f"does not say {FORMAT_TEXT.strip()!r}")
    if _snap_dir(store).is_dir() and any(_snap_dir(store).glob("*.csv")):
        raise StoreError(
            f"store format 1 found in {store} (CSV manifests whose ids are not chained; this version keeps a "
            f"hash-chained store, format {FORMAT_VERSION}, and does not convert old ones): re-snapshot into a new "
            f"store: move {store} aside (keep it as the record of what was released) and run the snapshot stage "
            f"again, or pass --store <new folder>")


def read_header(store_dir: str | Path, snapshot_id: str, *, missing: str = "not found") -> dict:
    """A snapshot's header, checked against its id (sha256 of the file); with ``"id"`` added.

    ``missing``: "not found" raises StoreError (an id asked for that this store never had); any
    other text raises DamagedStore with it (an id the store itself refers to).
    """
    store = Path(store_dir)
    if not isinstance(snapshot_id, str) or not _HEX64.match(snapshot_id):
        raise StoreError(f"{snapshot_id!r} is not a snapshot id (64 hex digits)")
    path = header_path(store, snapshot_id)
    if not path.is_file():
        if missing == "not found":
            raise StoreError(f"snapshot {snapshot_id} not found in {store} (no {path}): run the snapshot stage, "
                             f"or restore the store")
        raise DamagedStore(store, path, missing)
    data = path.read_bytes()
    actual = _sha256(data)
    if actual != snapshot_id:
        raise DamagedStore(store, path, f"does not hash to its id (sha256 {actual[:12]}...): the header was edited, "
                                        f"truncated or renamed")
    try:
        h = json.loads(data)
    except ValueError as exc:
        raise DamagedStore(store, path, f"is not valid JSON ({exc})") from None
    problem = _header_problem(h)
    if problem:
        raise DamagedStore(store, path, problem)
    return {**h, "id": snapshot_id}


def _header_problem(h: object) -> str:
    if not isinstance(h, dict):
        return "is not a JSON object"
    if h.get("format") != FORMAT_VERSION:
        return f"has format {h.get('format')!r}, not {FORMAT_VERSION}"
    missing = HEADER_KEYS - set(h)
    if missing:
        return f"lacks {sorted(missing)}"
    if h["parent"] is not None and not (isinstance(h["parent"], str) and _HEX64.match(h["parent"])):
        return f"names parent {h['parent']!r}, not a snapshot id"
    d = h["delta"]
    if not (isinstance(d, dict) and isinstance(d.get("sha256"), str) and _HEX64.match(d["sha256"])
            and isinstance(d.get("rows"), int) and d["rows"] == h["n_new"]):
        return f"has a malformed delta entry {d!r}"
    if not (isinstance(h["packs"], list) and all(isinstance(p, str) and _HEX64.match(p) for p in h["packs"])):
        return "has a malformed packs list"
    if not (isinstance(h["class_names"], list) and all(isinstance(c, str) for c in h["class_names"])):
        return "has malformed class_names"
    if not (isinstance(h["image_shape"], list) and len(h["image_shape"]) == 3
            and all(isinstance(x, int) and x > 0 for x in h["image_shape"])):
        return f"has a malformed image_shape {h['image_shape']!r}"
    if not (isinstance(h["source"], dict) and isinstance(h["source"].get("key"), str)):
        return "has no source key"
    if not all(isinstance(h[k], int) and h[k] >= 0 for k in ("n_rows", "n_new")):
        return "has malformed row counts"
    f = h.get("features")
    if f is not None and not (isinstance(f, dict) and isinstance(f.get("sha256"), str) and _HEX64.match(f["sha256"])
                              and f.get("rows") == h["n_new"] and isinstance(f.get("detector"), dict)):
        return f"has a malformed features entry {f!r}"
    b = h.get("base")
    if b is not None:
        hexes = [b.get(k) for k in ("manifest", "pixels")] if isinstance(b, dict) else []
        bf = b.get("features") if isinstance(b, dict) else None
        if not (isinstance(b, dict) and b.get("of") == h["parent"] and h["parent"] is not None
                and isinstance(b.get("rows"), int) and b["rows"] + h["n_new"] == h["n_rows"]
                and all(isinstance(x, str) and _HEX64.match(x) for x in hexes) and len(hexes) == 2
                and (bf is None or (isinstance(bf, dict) and isinstance(bf.get("sha256"), str)
                                    and _HEX64.match(bf["sha256"]) and isinstance(bf.get("detector"), dict)))):
            return f"has a malformed base entry {b!r}"
    sm = h.get("summary")
    if sm is not None and not (isinstance(sm, dict) and isinstance(sm.get("provenance"), dict)
                               and isinstance(sm.get("duplicates"), dict)):
        return f"has a malformed summary entry {sm!r}"
    r = h.get("raw")
    if r is not None and not (isinstance(r, dict) and isinstance(r.get("sha256"), str) and _HEX64.match(r["sha256"])
                              and r.get("rows") == h["n_new"] and isinstance(r.get("bytes"), int) and r["bytes"] >= 0):
        return f"has a malformed raw entry {r!r}"
    return ""


def chain(store_dir: str | Path, snapshot_id: str) -> list[dict]:
    """The verified headers from the root to ``snapshot_id``: every header hashes to its id, each
    names an existing parent of the same lineage, and the counts, classes and shape add up."""
    return _walk(Path(store_dir), snapshot_id, stop_at_base=False)


def lineage(store_dir: str | Path, snapshot_id: str) -> tuple[list[dict], list[dict]]:
    """``(chain, resolved)``: every header back to the root, and those a load of the snapshot reads
    (from its newest base on disk), as :func:`load_parent` and :func:`verify_files` take them."""
    whole = chain(store_dir, snapshot_id)
    return whole, _from_base(Path(store_dir), whole)


def resolve(store_dir: str | Path, snapshot_id: str) -> list[dict]:
    """The verified headers a load reads: from the newest one whose base is on disk (its first
    header then carries ``base_used``: the base stands for every row before it) or, without one,
    from the root, to ``snapshot_id``. Loads read these, so their cost does not grow with the
    length of the history (issue 19 item 4); :func:`chain` still walks it all."""
    return _walk(Path(store_dir), snapshot_id, stop_at_base=True)


def _base_usable(store: Path, h: dict) -> bool:
    b = h.get("base")
    return b is not None and _base_path(store, b["manifest"], "parquet").is_file() and \
        _base_path(store, b["pixels"], "npy").is_file()


def _walk(store: Path, snapshot_id: str, stop_at_base: bool) -> list[dict]:
    headers: list[dict] = []
    seen: set[str] = set()
    cur: Optional[str] = snapshot_id
    child: Optional[str] = None
    while cur is not None:
        if cur in seen:  # cannot happen with honest hashes; guards a loop in forged headers
            raise DamagedStore(store, header_path(store, cur), "is its own ancestor")
        seen.add(cur)
        h = read_header(store, cur, missing="not found" if child is None else
                        f"is missing: snapshot {child[:12]} names it as its parent")
        headers.append(h)
        if stop_at_base and _base_usable(store, h):
            break
        child, cur = cur, h["parent"]
    headers.reverse()
    if stop_at_base:
        headers = _from_base(store, headers)
    first = headers[0]
    if first["parent"] is None and first["n_rows"] != first["n_new"]:
        raise DamagedStore(store, header_path(store, first["id"]), f"is a root with n_rows {first['n_rows']} != n_new {first['n_new']}")
    for p, c in zip(headers, headers[1:]):
        where = header_path(store, c["id"])
        if c["source"]["key"] != p["source"]["key"]:
            raise DamagedStore(store, where, f"belongs to lineage {c['source']['key']} but its parent {p['id'][:12]} "
                                             f"to {p['source']['key']}")
        if c["n_rows"] != p["n_rows"] + c["n_new"]:
            raise DamagedStore(store, where, f"counts {c['n_rows']} rows, but its parent has {p['n_rows']} and it adds "
                                             f"{c['n_new']}")
        if c["class_names"][: len(p["class_names"])] != p["class_names"]:
            raise DamagedStore(store, where, "renames or reorders its parent's classes")
        if c["image_shape"] != p["image_shape"]:
            raise DamagedStore(store, where, "changes its parent's image shape")
    return headers


def _from_base(store: Path, headers: list[dict]) -> list[dict]:
    """The headers a load reads of a verified list (root or base first): from the newest one
    whose base is on disk, marked ``base_used``; the whole list when none has one."""
    for j in range(len(headers) - 1, -1, -1):
        if _base_usable(store, headers[j]):
            return [{**headers[j], _BASE_USED: True}, *headers[j + 1:]]
    return headers


def base_of(headers: list[dict]) -> Optional[dict]:
    """The base a :func:`resolve` list starts from (None for a list from the root)."""
    return headers[0]["base"] if headers and headers[0].get(_BASE_USED) else None


def _base_path(store: Path, digest: str, ext: str) -> Path:
    return store / "bases" / f"{digest}.{ext}"


def _delta_path(store: Path, digest: str) -> Path:
    return store / "deltas" / f"{digest}.parquet"


def _read_table(store: Path, path: Path, digest: str, header: dict, what: str, schema: pa.Schema,
                verify: bool = True, columns: Optional[Sequence[str]] = None,
                dictionary: Sequence[str] = ()) -> pa.Table:
    """A Parquet object a header names (``what`` it is, for the messages), checked against its
    sha256 (``verify``), ``schema`` and the header's new-row count. ``columns``: decode only these
    (the file is still hashed whole when ``verify``, and its schema checked from its footer;
    without ``verify`` a damaged page in a column not decoded goes unseen). ``dictionary``: as
    :func:`_read_batches`'s."""
    pf, _data = _open_table(store, path, digest, header, what, schema, verify, dictionary)
    try:
        # threads pay off on a big table; on a small one their start-up dominates (~1 ms vs ~2-4 ms)
        table = pf.read(columns=None if columns is None else list(columns), use_threads=pf.metadata.num_rows > 20_000)
    except Exception as exc:  # noqa: BLE001 - Arrow raises several types on a corrupt file
        raise DamagedStore(store, path, f"is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    _check_decoded(store, path, pf, table.schema, columns)
    if table.num_rows != header["n_new"]:
        raise DamagedStore(store, path, f"holds {table.num_rows} rows, its header says {header['n_new']}")
    return table


def _read_batches(store: Path, path: Path, digest: str, header: dict, what: str, schema: pa.Schema,
                  verify: bool, columns: Sequence[str], dictionary: Sequence[str] = (),
                  rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """:func:`_read_table`'s checks, its rows decoded ``rows`` at a time: a reader that keeps a
    few rows of a big file (a split's) holds one batch of the others, not all of them. The row
    count is checked after the last batch: a consumer sees the error before it returns.
    ``dictionary``: string columns decoded as Arrow dictionaries (a pack or split name stored once,
    not once a row)."""
    pf, _data = _open_table(store, path, digest, header, what, schema, verify, dictionary)
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=rows, columns=list(columns), use_threads=pf.metadata.num_rows > 20_000):
            _check_decoded(store, path, pf, batch.schema, columns)
            n += batch.num_rows
            yield batch
    except DamagedStore:
        raise
    except Exception as exc:  # noqa: BLE001 - Arrow raises several types on a corrupt file
        raise DamagedStore(store, path, f"is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    if n != header["n_new"]:
        raise DamagedStore(store, path, f"holds {n} rows, its header says {header['n_new']}")


def _open_table(store: Path, path: Path, digest: str, header: dict, what: str, schema: pa.Schema, verify: bool,
                dictionary: Sequence[str] = ()) -> tuple[pq.ParquetFile, bytes]:
    """The file's footer, checked against ``schema``, and its bytes (hashed when ``verify``; the
    caller holds them while it decodes)."""
    if not path.is_file():
        raise DamagedStore(store, path, f"is missing (the {what} of snapshot {header['id'][:12]}, "
                                        f"{header['n_new']} rows)")
    data = path.read_bytes()  # once: the bytes parsed are the bytes hashed
    if verify:
        actual = _sha256(data)
        if actual != digest:
            raise DamagedStore(store, path, f"does not match its sha256 (now {actual[:12]}...): the {what} of "
                                            f"snapshot {header['id'][:12]} was edited or truncated")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data), read_dictionary=list(dictionary) or None)
        got = [(f.name, _plain(f.type)) for f in pf.schema_arrow]
    except Exception as exc:  # noqa: BLE001 - Arrow raises several types on a corrupt file
        raise DamagedStore(store, path, f"is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    if got != [(f.name, f.type) for f in schema]:
        raise DamagedStore(store, path, f"has columns {[f'{n}:{t}' for n, t in got]}, not the {what}'s schema")
    return pf, data


def _check_decoded(store: Path, path: Path, pf: pq.ParquetFile, decoded: pa.Schema,
                   columns: Optional[Sequence[str]]) -> None:
    got = {f.name: _plain(f.type) for f in pf.schema_arrow}
    if {f.name: _plain(f.type) for f in decoded} != {n: t for n, t in got.items() if columns is None or n in columns}:
        raise DamagedStore(store, path, f"decodes to columns {decoded.names}, not its footer's")


def _plain(t: pa.DataType) -> pa.DataType:
    """A column's type with a dictionary read (``_read_batches(dictionary=)``) seen as its values'."""
    return t.value_type if pa.types.is_dictionary(t) else t


def read_delta(store_dir: str | Path, header: dict, verify: bool = True,
               columns: Optional[Sequence[str]] = None) -> pa.Table:
    """The delta manifest a header names, checked against its sha256, schema and row count."""
    store = Path(store_dir)
    digest = header["delta"]["sha256"]
    return _read_table(store, _delta_path(store, digest), digest, header, "delta manifest", DELTA_SCHEMA, verify,
                       columns)


def _features_path(store: Path, digest: str) -> Path:
    return store / "features" / f"{digest}.parquet"


def read_features(store_dir: str | Path, header: dict) -> pd.DataFrame:
    """The features file a header names, checked against its sha256, schema and row count."""
    store = Path(store_dir)
    digest = header["features"]["sha256"]
    return _read_table(store, _features_path(store, digest), digest, header, "data-gate columns",
                       FEATURE_SCHEMA).to_pandas()


def read_base(store_dir: str | Path, header: dict, verify: bool = True,
              columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """The manifest of the base a header names (every row of its parent, ``MANIFEST_COLUMNS`` or
    those of ``columns``), checked against its sha256, schema and row count."""
    store = Path(store_dir)
    b = header["base"]
    path = _base_path(store, b["manifest"], "parquet")
    cols = MANIFEST_COLUMNS if columns is None else [c for c in MANIFEST_COLUMNS if c in columns]
    t = _read_table(store, path, b["manifest"], {**header, "n_new": b["rows"]}, "base manifest", BASE_SCHEMA, verify,
                    None if columns is None else cols)
    return t.to_pandas()[cols]


def read_base_features(store_dir: str | Path, header: dict) -> pd.DataFrame:
    """The data-gate columns of a header's base (``BASE_FEATURE_SCHEMA``: with ``stored``)."""
    store = Path(store_dir)
    b = header["base"]
    return _read_table(store, _base_path(store, b["features"]["sha256"], "parquet"), b["features"]["sha256"],
                       {**header, "n_new": b["rows"]}, "base's data-gate columns", BASE_FEATURE_SCHEMA).to_pandas()


def load_features(store_dir: str | Path, snapshot_id: str, detector: dict,
                  headers: Optional[list[dict]] = None) -> pd.DataFrame:
    """The data gate's stored per-row columns of a snapshot, row-aligned with its full manifest:
    ``FEATURE_SCHEMA`` plus ``stored`` (bool). A snapshot whose header names no features file, or
    one computed with other ``detector`` settings (``stats.detector_settings``), contributes rows
    with ``stored`` False: the caller computes those from the pixels."""
    store = Path(store_dir)
    headers = headers if headers is not None else resolve(store, snapshot_id)
    # the rows as a base writes them (BaseWriter.finish): one rule for which file holds which rows;
    # a file a part, as a whole-file read gave them (65,536-row parts: +4-9 MiB at 1M rows on the
    # validate stage's peak, bench/results/validate_hash_keys_1m.log)
    parts = [t.cast(BASE_FEATURE_SCHEMA) for t in _feature_parts(store, headers, None, detector, rows=1 << 30)]
    if not parts:
        return pd.DataFrame({c: [] for c in [*FEATURE_SCHEMA.names, "stored"]})
    return pa.concat_tables(parts).to_pandas()


def load_manifest(store_dir: str | Path, snapshot_id: str, verify: bool = True,
                  headers: Optional[list[dict]] = None, columns: Optional[Sequence[str]] = None,
                  split: Optional[str] = None, categorical: bool = False) -> pd.DataFrame:
    """The full manifest of a snapshot (every row; every column unless ``columns``): its base (if
    :func:`resolve` starts at one), then its chain's deltas, root first, with ``snapshot_id``.

    ``columns``: decode only these, plus what ``verify`` checks (``sample_id``, ``label``,
    ``pack``); every file is still hashed whole. A reader of a few columns then holds a fraction of
    the manifest: ``read_split``'s columns are ~half of a load's peak (issue 19 item 3).

    ``split``: keep only that split's rows, indexed by their row in the full manifest. Every row is
    still verified (hashes, labels, packs, no sample ingested twice); only the kept rows become
    pandas objects, so a reader of the test split holds ~its share of the manifest (issue 19 item 3:
    evaluate's load grew with N, ``bench/read_split_memory.py``).

    ``categorical`` (not with ``split``): ``REPEATED_COLUMNS`` come as pandas categoricals, decoded
    from Parquet's dictionaries without a string a row (what a parent's manifest is held as)."""
    return _load_manifest(store_dir, snapshot_id, verify, headers, columns, split, categorical)[0]


def _load_manifest(store_dir: str | Path, snapshot_id: str, verify: bool = True,
                   headers: Optional[list[dict]] = None, columns: Optional[Sequence[str]] = None,
                   split: Optional[str] = None, categorical: bool = False
                   ) -> tuple[pd.DataFrame, Optional[dict[str, int]]]:
    """:func:`load_manifest`, and with ``split`` the rows each pack must hold for every row of the
    chain (its highest ``pack_index`` + 1): the pixel checks of a split's load cannot see the
    other splits' rows, so they are measured here (None without ``split``)."""
    store = Path(store_dir)
    headers = headers if headers is not None else resolve(store, snapshot_id)
    unknown = set(columns or ()) - set(MANIFEST_COLUMNS)
    if unknown:
        raise ValueError(f"load_manifest: no such manifest column(s) {sorted(unknown)}")
    if categorical and split is not None:
        raise ValueError("load_manifest: categorical columns with a split's load are not supported")
    extra = ({"sample_id", "label", "pack"} if verify else set()) | ({"split"} if split is not None else set())
    want = MANIFEST_COLUMNS if columns is None else [c for c in MANIFEST_COLUMNS if c in set(columns) | extra]
    delta_cols = None if columns is None else [c for c in DELTA_SCHEMA.names if c in want]
    dictionary = [c for c in REPEATED_COLUMNS if c in want] if categorical else []
    delta_dictionary = [c for c in dictionary if c in DELTA_SCHEMA.names]
    base = base_of(headers)
    start = base["rows"] if base is not None else 0
    ids: Optional[list] = [] if verify and split is not None else None
    need: Optional[dict[str, int]] = {} if split is not None else None
    tables, kept = [], []
    for h in headers:
        digest = h["delta"]["sha256"]
        t, rows = _manifest_part(store, _delta_path(store, digest), digest, h, "delta manifest", DELTA_SCHEMA,
                                 verify, delta_cols, split, start, ids, h["packs"], need, delta_dictionary)
        tables.append(t)
        kept.append(rows)
        start += h["n_new"]
    empty = DELTA_SCHEMA.empty_table()
    table = pa.concat_tables(tables) if tables else (empty if delta_cols is None else empty.select(delta_cols))
    df = table.to_pandas()
    if "snapshot_id" in want:
        rows_of = [t.num_rows for t in tables]
        if categorical:  # a header's id once, and a small code a row
            df["snapshot_id"] = pd.Categorical.from_codes(np.repeat(np.arange(len(headers), dtype=np.int32), rows_of),
                                                          categories=pd.Index([h["id"] for h in headers], dtype="str"))
        else:  # the string dtype pandas gives the other columns (pandas 3: str, even for no rows)
            df["snapshot_id"] = pd.array(np.repeat(np.array([h["id"] for h in headers], dtype=object), rows_of),
                                         dtype=df["sample_id"].dtype)
    del table, tables
    df = df[want]
    if split is not None:
        df.index = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    if base is not None:
        b = base["manifest"]
        # a base's rows name the packs they were ingested in; its pixels file holds them now
        # its ids first: the chunks then follow the manifest's order, as the full load's message does
        base_ids: Optional[list] = [] if ids is not None else None
        bt, rows = _manifest_part(store, _base_path(store, b, "parquet"), b, {**headers[0], "n_new": base["rows"]},
                                  "base manifest", BASE_SCHEMA, verify,
                                  None if set(want) >= set(BASE_SCHEMA.names) else want, split, 0, base_ids, None, None,
                                  dictionary)
        if ids is not None:
            ids[:0] = base_ids
        part = bt.to_pandas()[want]
        del bt
        if split is not None:
            part.index = rows
        # an empty side would make its columns' dtype win (pandas 3: an empty object snapshot_id
        # turns the base's str column into object), and a split's read often has one
        df = concat_manifests([f for f in (part, df) if len(f)] or [part], ignore_index=split is None)
    if verify:
        dup = _twice(pa.chunked_array(ids, pa.string())) if ids is not None else \
            df.loc[df["sample_id"].duplicated(), "sample_id"].tolist()
        if dup:
            raise DamagedStore(store, header_path(store, headers[-1]["id"]), f"its history ingests rows twice: {_few(dup)}")
    return df, need


def _manifest_part(store: Path, path: Path, digest: str, header: dict, what: str, schema: pa.Schema, verify: bool,
                   columns: Optional[Sequence[str]], split: Optional[str], start: int, ids: Optional[list],
                   named: Optional[list], need: Optional[dict[str, int]], dictionary: Sequence[str] = ()
                   ) -> tuple[pa.Table, np.ndarray]:
    """One manifest file of a load (its rows are ``start``... of the full manifest), checked
    (``verify``: labels in the header's class list, packs among ``named``). ``split``: decoded a
    batch at a time and cut to that split's rows, returned with their row numbers; the sample ids
    of every row go to ``ids`` (the caller's check that no row is ingested twice), and each pack's
    highest ``pack_index`` + 1 over every row to ``need``. ``dictionary`` (without ``split``):
    these string columns decoded as Arrow dictionaries."""
    if split is None:
        t = _read_table(store, path, digest, header, what, schema, verify, columns, dictionary)
        if verify and t.num_rows:
            _check_rows_refer(store, path, t, header["class_names"], named)
        return t, np.zeros(0, np.int64)
    cols = [c for c in schema.names if c in columns] if columns is not None else schema.names
    # split and pack names stay Arrow dictionaries (stored once, not once a row) until cut
    batches = _read_batches(store, path, digest, header, what, schema, verify, cols,
                            dictionary=[c for c in ("split", "pack") if c in cols])
    parts, rows, at = [], [], start
    for batch in batches:
        if verify and batch.num_rows:
            _check_rows_refer(store, path, batch, header["class_names"], named)
        if ids is not None:
            ids.append(batch.column("sample_id"))
        if need is not None and batch.num_rows and "pack_index" in batch.schema.names:
            top = pa.table({"pack": batch.column("pack").cast(pa.string()), "i": batch.column("pack_index")}
                           ).group_by("pack").aggregate([("i", "max")])
            for pack, i in zip(top.column("pack").to_pylist(), top.column("i_max").to_pylist()):
                need[pack] = max(need.get(pack, 0), int(i) + 1)
        mask = pc.equal(batch.column("split").cast(pa.string()), split)
        # back to strings: pandas gets the object columns a full load gives
        cut = batch.filter(mask)
        parts.append(pa.record_batch([c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c
                                      for c in cut.columns], names=cut.schema.names))
        rows.append(np.flatnonzero(mask.to_numpy(zero_copy_only=False)) + at)
        at += batch.num_rows
    plain = pa.schema([(n, _plain(schema.field(n).type)) for n in cols])
    return pa.Table.from_batches(parts, plain), (np.concatenate(rows) if rows else np.zeros(0, np.int64))


def concat_manifests(frames: Sequence[pd.DataFrame], **kwargs) -> pd.DataFrame:
    """``pd.concat`` of manifest parts, a categorical column kept categorical: pandas makes it a
    string column when the parts' categories differ or a part holds plain strings, a string a row
    (at 1M rows the 100+ MiB the categoricals save)."""
    frames = list(frames)
    for c in frames[0].columns:
        parts = [f[c] for f in frames]
        if not any(isinstance(p.dtype, pd.CategoricalDtype) for p in parts):
            continue
        values = [p.cat.categories if isinstance(p.dtype, pd.CategoricalDtype) else p.unique() for p in parts]
        # a missing value is no category (pandas refuses one): it stays missing, code -1
        dtype = pd.CategoricalDtype(pd.Index(pd.unique(np.concatenate([np.asarray(v, object) for v in values])),
                                             dtype="str").dropna())
        frames = [f if f[c].dtype == dtype else f.assign(**{c: f[c].astype(dtype)}) for f in frames]
    return pd.concat(frames, **kwargs)


def _twice(ids: pa.ChunkedArray) -> list[str]:
    """The values ``ids`` holds more than once (Arrow's hash table: ~the strings' bytes, no objects)."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return []
    counts = pc.value_counts(ids)
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()


def _check_rows_refer(store: Path, path: Path, t: pa.Table, class_names: list, named: Optional[list] = None
                      ) -> None:
    """A manifest file's labels are in its class list and (``named``) its packs are among those."""
    labels = t.column("label")
    if labels.null_count:
        raise DamagedStore(store, path, f"has {labels.null_count} row(s) without a label")
    if pc.min(labels).as_py() < 0 or pc.max(labels).as_py() >= len(class_names):
        raise DamagedStore(store, path, "has labels outside its class list")
    if named is not None:
        # unique first, then the few values to strings: a categorical load's pack column cast whole
        # was a string a row (~65 MiB at 1M rows; the peak did not move: poison_categorical_1m.log)
        packs = set(pc.unique(t.column("pack")).cast(pa.string()).to_pylist())
        if not packs <= set(named):
            raise DamagedStore(store, path, f"refers to packs its header does not name ({sorted(packs - set(named))})")
        if "pack_index" in t.column_names and t.column("pack_index").null_count:
            raise DamagedStore(store, path, f"has {t.column('pack_index').null_count} row(s) without a pack index")


def read_manifest(store_dir: str | Path, snapshot_id: str) -> pd.DataFrame:
    """The verified full manifest of a snapshot (headers and deltas checked; packs not read)."""
    return load_manifest(store_dir, snapshot_id, verify=True)


def read_meta(store_dir: str | Path, snapshot_id: str) -> dict:
    """A snapshot's header (checked against its id), with ``"id"``."""
    check_format(store_dir)
    return read_header(store_dir, snapshot_id)


def _pack_path(store: Path, pack: str) -> Path:
    return store / "packs" / f"{pack}.npy"


def _pack_groups(manifest: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """(pack, row indices) for each pack, grouped once: O(N) whatever the number of packs (a mask
    per pack was N x packs and dominated loading at 1,000 packs, issue 19 item 4)."""
    codes, names = pd.factorize(manifest["pack"])
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    return [(str(p), order[bounds[k]:bounds[k + 1]]) for k, p in enumerate(names)]


@dataclass(frozen=True)
class _Source:
    """A file holding pixels of a snapshot: a pack, or a base's consolidated pixels."""

    path: Path
    digest: str  # the sha256 the file must hash to (its name)
    rows: np.ndarray  # the manifest rows it holds
    index: np.ndarray  # their places in the file
    what: str  # for messages
    need: int = 0  # rows the file must hold: every row of the chain's, also those a split's load leaves out


def _sources(store: Path, headers: list[dict], manifest: pd.DataFrame,
             need: Optional[dict[str, int]] = None) -> list[_Source]:
    """Where every row's pixels are: the base's pixels for the rows before the first header of a
    :func:`resolve` list, then each pack the headers name (also those holding no manifest row).
    ``manifest``: the full one, or some of its rows indexed by their row in it (a split's load),
    then with ``need``: the rows each pack must hold for every row of the chain."""
    out, start = [], 0
    base = base_of(headers)
    at = _positions(manifest)
    if base is not None:
        start = base["rows"]
        rows = np.arange(np.searchsorted(at, start))
        out.append(_Source(_base_path(store, base["pixels"], "npy"), base["pixels"], rows, at[rows], "base pixels",
                           start))
    index = manifest["pack_index"].to_numpy()
    groups = _rows_by_pack(headers, manifest, start)
    named = {p for h in headers for p in h["packs"]}
    for pack in sorted(named | set(groups)):
        rows = groups.get(pack, np.zeros(0, np.int64))
        out.append(_Source(_pack_path(store, pack), pack, rows, index[rows], "pack",
                           (need or {}).get(pack, 0)))
    return out


def _open_pack(store: Path, src: _Source, shape: tuple[int, ...], manifest: pd.DataFrame, snapshot: str) -> np.ndarray:
    path = src.path
    if not path.is_file():
        ids = manifest["sample_id"].to_numpy()[src.rows]
        raise DamagedStore(store, path, f"is missing ({len(src.rows)} row(s) of snapshot {snapshot[:12]}: {_few(ids)})")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise DamagedStore(store, path, f"is unreadable ({exc})") from None
    if (arr.dtype != np.uint8 or tuple(arr.shape[1:]) != tuple(shape) or len(arr) < src.need
            or (len(src.index) and src.index.max() >= len(arr))):
        raise DamagedStore(store, path, f"holds {arr.dtype} {arr.shape}, not the rows the manifest expects")
    return arr


def _positions(manifest: pd.DataFrame) -> np.ndarray:
    """Each row's place in the full manifest: its index (0..N-1 for a full load, ascending)."""
    return manifest.index.to_numpy()


def _rows_by_pack(headers: list[dict], manifest: pd.DataFrame, start: int = 0) -> dict[str, np.ndarray]:
    """Rows of each pack, the headers' rows starting at full-manifest row ``start``. A header's rows
    are one contiguous run of the full manifest, and the writer puts them in one pack, so this is a
    slice per header; a header naming several packs is grouped (valid, never written by this code)."""
    out: dict[str, list[np.ndarray]] = {}
    at = _positions(manifest)
    lo = int(np.searchsorted(at, start))
    for h in headers:
        start += h["n_new"]
        hi = int(np.searchsorted(at, start))
        if hi > lo:
            if len(h["packs"]) == 1:
                out.setdefault(h["packs"][0], []).append(np.arange(lo, hi))
            else:
                for pack, rows in _pack_groups(manifest.iloc[lo:hi]):
                    out.setdefault(pack, []).append(rows + lo)
        lo = hi
    return {p: np.concatenate(r) for p, r in out.items()}


def verify_packs(store_dir: str | Path, headers: list[dict], manifest: pd.DataFrame, deep: bool = False,
                 stats_out: Optional[VerifyStats] = None, need: Optional[dict[str, int]] = None) -> VerifyStats:
    """Hash every pack the headers name, and the base they start from (``deep``: every sample too)
    against its recorded sha256. ``need``: ``manifest`` is a split's (see :func:`_sources`)."""
    store = Path(store_dir)
    st = stats_out or VerifyStats()
    shape = tuple(headers[-1]["image_shape"])
    for src in _sources(store, headers, manifest, need):
        arr = _open_pack(store, src, shape, manifest, headers[-1]["id"])
        actual = file_sha256(src.path)
        st.bytes_hashed += src.path.stat().st_size
        st.packs += 1
        if actual != src.digest:
            bad = _bad_rows(arr, src, manifest)
            detail = (f"{len(bad)} row(s) of snapshot {headers[-1]['id'][:12]} do not match their sha256: {_few(bad)}"
                      if bad else "the rows this load reads still match, so rows it does not read or bytes outside "
                                  "them changed" if need is not None else
                      "its rows still match, so bytes outside them changed")
            raise DamagedStore(store, src.path, f"does not match its sha256 (now {actual[:12]}...); {detail}")
        if deep:
            bad = _bad_rows(arr, src, manifest)
            st.rows_rehashed += len(src.rows)
            if bad:  # the file hashes right but its rows do not: an ingest bug, or forged deltas
                raise DamagedStore(store, src.path, f"{len(bad)} row(s) do not match their recorded sha256: {_few(bad)}")
    return st


def verify_files(store_dir: str | Path, snapshot_id: str, stats_out: Optional[VerifyStats] = None,
                 hash_packs: bool = True, rows: int = 65_536,
                 each_rows: Optional[Callable[[pa.RecordBatch], None]] = None,
                 each_file: Optional[Callable[[dict, bool], None]] = None,
                 whole_rows: bool = False) -> tuple[list[dict], list[dict]]:
    """``(chain, resolved)`` headers of ``snapshot_id``, verified as a load verifies them, with
    memory that does not grow with the rows (the snapshot stage's no-op and poison's identity view,
    issue 19 item 3): every file a load reads is hashed against the sha256 its header records
    (deltas, the base's manifest and pixels, packs), each pixel file's dtype and shape checked, and
    each manifest file's schema, row count, labels (in the class list), packs (named by its header)
    and pack indexes (inside the pack) checked ``rows`` rows at a time. Not checked: that no sample
    id is ingested twice (that needs every id at once; every stage that loads rows checks it).
    ``hash_packs=False``: the pixel files are checked for their dtype and shape only, as
    ``load_snapshot(lazy=True, hash_packs=False)`` does (for a reader of no pixel). A mismatch
    raises DamagedStore, as a load does. ``each_rows``: called with every row of the manifest, in
    row order, ``rows`` at a time (``sample_id``, ``sha256``, ``label``, ``split``), read from the
    open file whose bytes were hashed (a file renamed over it after the hash is not read; one
    written in place meanwhile changes its inode's ctime, and is refused); what the callback
    raises is raised as it is. ``whole_rows``: ``each_rows`` gets every column of the file
    (``pack`` as a dictionary in a delta's). ``each_file(header, is_base)``: called before the
    rows of each manifest file (the base's, then each delta's), its pixel files checked.
    """
    store = Path(store_dir)
    check_format(store)
    st = stats_out or VerifyStats()
    whole = chain(store, snapshot_id)
    headers = _from_base(store, whole)
    shape = tuple(int(x) for x in headers[-1]["image_shape"])
    base = base_of(headers)

    def check(path: Path, digest: str, what: str, header: dict, fh=None) -> None:
        if fh is None and not path.is_file():
            raise DamagedStore(store, path, f"is missing (the {what} of snapshot {header['id'][:12]})")
        if fh is None:
            actual = file_sha256(path)
        else:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
            fh.seek(0)
        st.bytes_hashed += path.stat().st_size
        if actual != digest:
            raise DamagedStore(store, path, f"does not match its sha256 (now {actual[:12]}...): the {what} of "
                                            f"snapshot {header['id'][:12]} was edited or truncated")

    def pixels(path: Path, digest: str, what: str, header: dict, need: int) -> int:
        if hash_packs:
            check(path, digest, what, header)
            st.packs += 1
        elif not path.is_file():
            raise DamagedStore(store, path, f"is missing (the {what} of snapshot {header['id'][:12]})")
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")  # the header only: nothing is read
        except (ValueError, OSError, EOFError) as exc:
            raise DamagedStore(store, path, f"is unreadable ({exc})") from None
        if arr.dtype != np.uint8 or tuple(arr.shape[1:]) != shape or len(arr) < need:
            raise DamagedStore(store, path, f"holds {arr.dtype} {arr.shape}, not the rows the manifest expects")
        return len(arr)

    @contextmanager
    def open_checked(path: Path, digest: str, what: str, header: dict):
        """The manifest file, hashed; its rows are parsed from this handle, not from the path
        again, and its inode must not change (ctime, mtime, size) between the hash and the end."""
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise DamagedStore(store, path, f"is missing (the {what} of snapshot {header['id'][:12]})") from None
        except OSError as exc:
            raise DamagedStore(store, path, f"is unreadable ({exc})") from None
        def moved() -> DamagedStore:
            return DamagedStore(store, path, f"was written to while it was verified (the {what} of snapshot "
                                             f"{header['id'][:12]}): store files never change; find what writes it")

        with fh:
            before = _inode_state(fh)
            check(path, digest, what, header, fh)
            try:
                yield fh
            except DamagedStore:
                if _inode_state(fh) != before:  # what its rows showed came from the write, not the file
                    raise moved() from None
                raise
            if _inode_state(fh) != before:
                raise moved()

    def manifest_rows(fh, path: Path, header: dict, n: int, schema: pa.Schema, what: str,
                      packs: Optional[dict[str, int]]) -> None:
        cols = ["label"] + (["pack", "pack_index"] if packs is not None else [])
        failed: list[Exception] = []  # the callback's error: raised as it is, not as a damaged file
        if each_rows is not None:
            cols = list(schema.names) if whole_rows else cols + ["sample_id", "sha256", "split"]
        if each_file is not None:
            each_file(header, packs is None)
        try:
            # pages read through a 1 MiB buffer: unbuffered (pyarrow's default) a column chunk is
            # read whole, and a cold snapshot's delta is one row group of every row; reading 4 of its
            # columns took +65 MiB at 1M rows, +34 buffered (bench/results/snapshot_base_stream_1m.log)
            pf = pq.ParquetFile(fh, read_dictionary=["pack"] if packs is not None else None, pre_buffer=False,
                                buffer_size=1 << 20)
            got = [(f.name, _plain(f.type)) for f in pf.schema_arrow]
            if got != [(f.name, f.type) for f in schema]:
                raise DamagedStore(store, path, f"has columns {[f'{a}:{b}' for a, b in got]}, not the {what}'s schema")
            if pf.metadata.num_rows != n:
                raise DamagedStore(store, path, f"holds {pf.metadata.num_rows} rows, its header says {n}")
            for batch in pf.iter_batches(batch_size=rows, columns=cols, use_threads=False):
                if not batch.num_rows:
                    continue
                _check_rows_refer(store, path, batch, header["class_names"], list(packs) if packs is not None else None)
                if packs is not None:
                    ends = pa.table({"pack": batch.column("pack").cast(pa.string()), "i": batch.column("pack_index")}
                                    ).group_by("pack").aggregate([("i", "min"), ("i", "max")])
                    for pack, lo, hi in zip(*(ends.column(c).to_pylist() for c in ("pack", "i_min", "i_max"))):
                        if lo is None or lo < 0 or hi >= packs[pack]:
                            raise DamagedStore(store, path, f"places a row at {hi if lo is None or lo >= 0 else lo} "
                                                            f"in pack {pack[:12]} of {packs[pack]} rows: not the rows "
                                                            f"the manifest expects")
                if each_rows is not None:
                    try:
                        each_rows(batch if whole_rows else batch.select(["sample_id", "sha256", "label", "split"]))
                    except Exception as exc:  # noqa: BLE001 - the caller's own error, not the file's
                        failed.append(exc)
                        raise
        except DamagedStore:
            raise
        except Exception as exc:  # noqa: BLE001 - Arrow raises several types on a corrupt file
            if failed and exc is failed[-1]:
                raise  # as the callback raised it, its cause and context kept
            raise DamagedStore(store, path, f"is not a readable Parquet file ({type(exc).__name__}: {exc})") from None

    if base is not None:
        bpath = _base_path(store, base["manifest"], "parquet")
        with open_checked(bpath, base["manifest"], "base manifest", headers[0]) as fh:
            pixels(_base_path(store, base["pixels"], "npy"), base["pixels"], "base pixels", headers[0], base["rows"])
            # a base's rows name the packs they were ingested in; its pixels file holds them now
            manifest_rows(fh, bpath, headers[0], base["rows"], BASE_SCHEMA, "base manifest", None)
    for h in headers:
        dpath = _delta_path(store, h["delta"]["sha256"])
        with open_checked(dpath, h["delta"]["sha256"], "delta manifest", h) as fh:
            sizes = {pack: pixels(_pack_path(store, pack), pack, "pack", h, h["n_new"] if len(h["packs"]) == 1 else 0)
                     for pack in h["packs"]}
            manifest_rows(fh, dpath, h, h["n_new"], DELTA_SCHEMA, "delta manifest", sizes)
    st.snapshots += len(headers)
    st.rows += int(headers[-1]["n_rows"])
    return whole, headers


class RowPrint:
    """An order-free print of (sample_id, sha256) pairs: their count and the sum, mod 2**64, of a
    keyed 64-bit hash of each pair. Two equal multisets give equal prints; two others almost
    never, and no one without the key can choose rows whose hashes cancel (a sum of unkeyed
    hashes, such as the sha256 values themselves, falls to a k-sum search in seconds). What binds
    the snapshot stage's stat cache to the store's rows: the cache says which files hold which
    rows, and a forged one could otherwise hide a stored file's loss behind an unstored file.

    Hand-written: no maintained library gives a keyed multiset hash. The key is Python's own
    per-process random one (the str hash, SipHash; ~0.1 s a million pairs) when hash
    randomisation is on, else a random key for BLAKE2b (~1.2 s a million)."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0
        self._key = None if sys.flags.hash_randomization else os.urandom(16)

    CHUNK = 8192  # pairs made Python strings at a time: a 65,536-row batch at once held ~20 MiB more

    def add(self, ids, sha) -> None:
        ids, sha = as_strings(ids), as_strings(sha)
        for s0 in range(0, len(ids), self.CHUNK):
            self._add(ids.slice(s0, self.CHUNK).to_pylist(), sha.slice(s0, self.CHUNK).to_pylist())

    def _add(self, ids: list, sha: list) -> None:
        if self._key is None:
            # one keyed hash of the pair's joined text: a tuple's hash mixes its items' hashes
            # without a key, nearly linearly, and (a, x) + (b, y) met (a, y) + (b, x) in the sum
            vals = np.fromiter((hash(f"{i}\0{h}") for i, h in zip(ids, sha)), np.int64, len(ids)).view(np.uint64)
        else:
            b, key = hashlib.blake2b, self._key
            vals = np.fromiter((int.from_bytes(b(f"{i}\0{h}".encode(), key=key, digest_size=8).digest(), "little")
                                for i, h in zip(ids, sha)), np.uint64, len(ids))
        self.n += len(ids)
        self.total = (self.total + int(vals.sum(dtype=np.uint64))) % 2**64

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RowPrint) or other._key != self._key:
            return NotImplemented
        return (self.n, self.total) == (other.n, other.total)

    def twin(self) -> "RowPrint":
        """An empty print with this one's key (BLAKE2b's is per print; prints compare only so)."""
        t = RowPrint()
        t._key = self._key
        return t


def _inode_state(fh) -> tuple[int, int, int, int]:
    st = os.fstat(fh.fileno())
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def check_rows(images, rows: np.ndarray, ids: Sequence[str], sha: Sequence[str], chunk: int = 4096) -> None:
    """``images[rows]`` (numpy or lazy) must hash to ``sha[rows]``: what a reader that skipped
    hashing the packs (``load_snapshot(hash_packs=False)``) checks of the rows it does read, so
    reading a few rows never costs hashing the whole store. IntegrityError names the rows."""
    from pipeline.data.rows import take

    rows = np.asarray(rows, np.int64)
    bad = []
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        for k, img in zip(part, np.asarray(take(images, part))):
            if sample_hash(img) != sha[k]:
                bad.append(str(ids[k]))
    if bad:
        raise IntegrityError(f"{len(bad)} stored row(s) do not hash to their manifest sha256 ({_few(bad)}): the "
                             "store's packs changed; `python -m pipeline.data.store verify` names the file")


def _bad_rows(arr: np.ndarray, src: _Source, manifest: pd.DataFrame) -> list[str]:
    ids = manifest["sample_id"].to_numpy()
    want = manifest["sha256"].to_numpy()
    return [ids[r] for r, i in zip(src.rows, src.index) if sample_hash(np.asarray(arr[i])) != want[r]]


def list_snapshots(store_dir: str | Path) -> list[dict]:
    """Verified headers of every snapshot in the store, oldest first."""
    d = _snap_dir(Path(store_dir))
    if not d.is_dir():
        return []
    heads = [read_header(store_dir, p.stem) for p in d.glob("*.json") if _HEX64.match(p.stem)]
    return sorted(heads, key=lambda m: (m.get("created", ""), m.get("n_rows", 0), m["id"]))


def _read_ref(store: Path, key: str) -> Optional[str]:
    path = store / "heads" / key
    if not path.is_file():
        return None
    ref = path.read_bytes().decode("ascii", "replace").strip()
    if not _HEX64.match(ref):
        raise DamagedStore(store, path, f"does not hold a snapshot id ({ref[:40]!r}); delete it to fall back on the "
                                        f"tip of the history, or restore it")
    return ref


def read_pointer(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path} not found: run the snapshot stage (dvc repro snapshot) first")
    try:
        ptr = json.loads(path.read_text())
    except ValueError as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}): re-run the snapshot stage") from exc
    if not isinstance(ptr, dict) or "snapshot_id" not in ptr:
        raise StoreError(f"{path} has no snapshot_id: re-run the snapshot stage")
    return ptr


def current_snapshot(store_dir: str | Path, key: str) -> Optional[str]:
    """The current snapshot of lineage ``key``: ``heads/<key>``, else the tip of its chain."""
    store = Path(store_dir)
    check_format(store)
    head = _read_ref(store, key)
    if head is not None:
        h = read_header(store, head, missing=f"not found: heads/{key} names it, but the snapshot is missing")
        if h["source"]["key"] != key:
            raise DamagedStore(store, store / "heads" / key, f"names snapshot {head[:12]} of lineage {h['source']['key']}")
        return head
    same = [m for m in list_snapshots(store) if m["source"]["key"] == key]
    parents = {m["parent"] for m in same}
    tips = [m["id"] for m in same if m["id"] not in parents]
    if len(tips) > 1:
        raise DamagedStore(store, store / "heads" / key,
                           f"is missing and the history of {key} has {len(tips)} tips "
                           f"({', '.join(t[:12] for t in tips)}); write the id of the snapshot to continue from into it")
    return tips[0] if tips else None


def load_parent(store_dir: str | Path, snapshot_id: str, stats_out: Optional[VerifyStats] = None) -> Parent:
    """The parent of the next snapshot, verified as a load reads it (headers, deltas and pack
    hashes from its base, or from the root); ``history`` walks every header back to the root."""
    whole = chain(store_dir, snapshot_id)
    history = tuple(h["id"] for h in whole)
    headers = _from_base(Path(store_dir), whole)  # the same headers resolve() would read, not read twice
    manifest = load_manifest(store_dir, snapshot_id, verify=True, headers=headers, categorical=True)
    verify_packs(store_dir, headers, manifest, stats_out=stats_out)
    if stats_out is not None:
        stats_out.snapshots += len(headers)
        stats_out.rows += len(manifest)
    meta = {k: v for k, v in headers[-1].items() if k != _BASE_USED}
    return Parent(snapshot_id, manifest, meta, history, len(headers), base_of(headers))


def load_snapshot(store_dir: str | Path, snapshot_id: str, verify: bool = True, deep: bool = False,
                  lazy: bool = False, hash_packs: bool = True, columns: Optional[Sequence[str]] = None,
                  split: Optional[str] = None, categorical: bool = False) -> Snapshot:
    """Load a snapshot's manifest and pixels.

    ``verify`` checks the headers and deltas a load reads (:func:`resolve`: from the newest base
    on disk, else the root) and hashes every pack file and the base's pixels: since a file is
    named by its hash and every row's pixels were hashed into the (verified) manifest when the file
    was written, this proves the rows are the ingested ones without hashing each sample. ``deep``
    also re-hashes every row. A mismatch raises :class:`DamagedStore` (an IntegrityError) naming
    the file and, for a pack, the rows that changed.

    ``hash_packs=False`` (with ``lazy``) skips hashing the packs: for a reader of a few rows that
    checks each row it reads against its sha256 itself (the data gate), rather than read every
    pixel of the store to prove rows it never uses.

    ``columns``: the manifest holds only these (see :func:`load_manifest`) and what the loading and
    its checks need (``sample_id``, ``sha256``, ``label``, ``pack``, ``pack_index``).

    ``split``: only that split's rows (manifest and pixels), the manifest indexed by their row in
    the full one; the whole chain is still verified (:func:`load_manifest`). ``categorical``: as
    :func:`load_manifest`'s.
    """
    store = Path(store_dir)
    check_format(store)
    headers = resolve(store, snapshot_id)
    meta = headers[-1]
    if columns is not None:
        columns = [*columns, "sample_id", "sha256", "label", "pack", "pack_index"]  # what the checks read
    if deep and split is not None:
        raise ValueError("load_snapshot: deep re-hashes every row; a split's load reads some (drop split or deep)")
    manifest, need = _load_manifest(store, snapshot_id, verify=verify, headers=headers, columns=columns, split=split,
                                    categorical=categorical)
    if deep or (verify and (hash_packs or not lazy)):
        verify_packs(store, headers, manifest, deep=deep, need=need)
    shape = tuple(int(x) for x in meta["image_shape"])
    meta = {k: v for k, v in meta.items() if k != _BASE_USED}
    sources = [src for src in _sources(store, headers, manifest, need) if len(src.rows)]
    if lazy:  # pixels read on demand (pipeline.data.rows): memory grows with what is read
        from pipeline.data.rows import LazyRows, file_identity

        packs, pack_of, index = [], np.zeros(len(manifest), np.int32), np.zeros(len(manifest), np.int64)
        for k, src in enumerate(sources):
            arr = _open_pack(store, src, shape, manifest, snapshot_id)
            # the identity recorded here (after verify hashed the pack) is checked at every read
            packs.append((src.path, int(arr.offset), int(arr.shape[0]), file_identity(src.path)))
            pack_of[src.rows] = k
            index[src.rows] = src.index
            del arr
        lazy_images = LazyRows(packs, pack_of, index, shape)
        return Snapshot(snapshot_id, manifest, lazy_images, list(meta["class_names"]), shape, meta)
    images = np.empty((len(manifest), *shape), dtype=np.uint8)
    for src in sources:
        arr = _open_pack(store, src, shape, manifest, snapshot_id)
        images[src.rows] = arr[src.index]
    return Snapshot(snapshot_id, manifest, images, list(meta["class_names"]), shape, meta)


def read_split(store_dir: str | Path, snapshot_id: str, split: str, lazy: bool = False
               ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """``(images, labels, sample_ids, class_names)`` of one split, reading only its rows (issue 19:
    stages read what they need): the headers and manifest are verified, the packs are not hashed
    whole, and each row read is checked against its manifest sha256 instead. ``lazy``: the images
    stay lazy rows (``pipeline.data.rows``), checked here a chunk at a time; a later read of a
    pack replaced since is refused by the rows' file identity check."""
    # only the columns and rows a split needs: the manifest's load is this reader's peak; the
    # provenance and file columns were ~half of it, the other splits' rows ~4/5 of the rest
    # (bench/read_split_memory.py)
    snap = load_snapshot(store_dir, snapshot_id, verify=True, lazy=True, hash_packs=False, columns=("split",),
                         split=split)
    images, labels, ids = snap.split(split)
    if not lazy:
        images = np.asarray(images)
    sha = snap.manifest["sha256"].astype(str).tolist()
    class_names = [str(c) for c in snap.class_names]
    del snap  # the whole chain was read to verify it; the caller keeps one split
    # glibc keeps the freed manifest resident (~0.5 KB a row of the snapshot: evaluate grew with
    # N, bench/results/scale_eval_300k.md); hand it back before the caller's long work
    heap.release()
    check_rows(images, np.arange(len(images)), ids, sha)
    return images, labels, ids, class_names


def _few(ids: Iterable, k: int = MAX_LISTED) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:k])) + (f" ... and {len(ids) - k} more" if len(ids) > k else "")


# ----------------------------------------------------------------------------- writing


def write_file(path: Path, data: bytes) -> None:
    """Atomic write (temp file + rename) whose OSError always names the file: a full disk reports
    ENOSPC from write(), which carries no file name (stage.describe_oserror reads this one)."""
    _naming_errors(path, lambda: atomic_write(path, data))


def write_file_with(path: Path, write: Callable) -> None:
    """:func:`write_file` for content that ``write(file)`` streams out (``io.atomic_write_with``)."""
    _naming_errors(path, lambda: atomic_write_with(path, write))


def _naming_errors(path: Path, do: Callable[[], None]) -> None:
    try:
        do()
    except OSError as exc:
        if not exc.filename:
            exc.poisongate_path = str(path)  # type: ignore[attr-defined]
        raise


def write_if_changed(path: Path, data: bytes) -> bool:
    """Leave a file byte-identical (and its mtime alone) when its content would not change."""
    if path.is_file() and path.read_bytes() == data:
        return False
    write_file(path, data)
    return True


def _write_object(path: Path, data: bytes, digest: str) -> None:
    """Write a content-addressed file, unless an intact one is already there."""
    if path.is_file() and file_sha256(path) == digest:
        return
    write_file(path, data)


PACK_CHUNK_ROWS = 8192  # rows per write of a pack: its memory is one chunk, whatever the pack's size


class _HashedFile:
    """A content-addressed file (``path_of(sha256)``) written piece by piece, hashed as written,
    through a temp file in the same folder (renamed by :meth:`publish`: never half a file;
    :meth:`discard` leaves nothing). Memory is one piece, whatever the file's size; several can be
    open at once (a base's manifest and pixels are written from one pass over the store). It has
    the file methods a ``pq.ParquetWriter`` writes through; its ``close`` only marks it closed."""

    def __init__(self, path_of: Callable[[str], Path]):
        self.path_of = path_of
        folder = path_of("0" * 64).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = create_temp(folder, ".write-", ".tmp")
        self.tmp = Path(name)
        self._fh = os.fdopen(fd, "wb")
        self._h = hashlib.sha256()
        self.size = 0
        self.closed = False
        self.created = False

    def write(self, data) -> int:
        try:
            self._h.update(data)
            self._fh.write(data)
        except OSError as exc:
            self._named(exc)
        n = memoryview(data).nbytes
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass  # seal() flushes and syncs once

    def close(self) -> None:
        self.closed = True

    def seal(self) -> str:
        """Flush and sync the temp file; its digest. Several files are sealed before any is named
        (:meth:`publish`), so a full disk names none of them."""
        try:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
            return self._h.hexdigest()
        except OSError as exc:
            self._named(exc)

    def publish(self) -> tuple[str, int]:
        """Move the sealed file to its name; ``(digest, bytes)``. ``created``: whether this put the
        file there (False: an intact one was there already, and another header may name it)."""
        digest = self.seal()
        try:
            final = self.path_of(digest)
            if final.is_file() and file_sha256(final) == digest:
                self.tmp.unlink()
                self.created = False
            else:
                os.replace(self.tmp, final)
                self.created = True
            return digest, self.size
        except OSError as exc:
            self._named(exc)
        finally:
            self.discard()

    def discard(self) -> None:
        self.closed = True
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def _named(self, exc: OSError):
        if not exc.filename:
            exc.poisongate_path = str(self.tmp)  # type: ignore[attr-defined]
        raise exc


def _write_streamed(path_of: Callable[[str], Path], parts: Iterable[bytes]) -> tuple[str, int]:
    """Write ``parts`` one after the other into a content-addressed file (``path_of(sha256)``),
    hashed as written (:class:`_HashedFile`); returns (digest, bytes). Memory is one part,
    whatever the file's size."""
    out = _HashedFile(path_of)
    try:
        for part in parts:
            out.write(part)
        return out.publish()
    finally:
        out.discard()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes before a uint8 array of ``shape``."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                "fortran_order": False, "shape": shape})
    return head.getvalue()


def _npy_parts(images, chunk: int) -> Iterator[bytes | memoryview]:
    """The bytes of ``np.save(images)`` (uint8, numpy or lazy rows), a chunk of rows at a time."""
    from pipeline.data.rows import take

    shape = (len(images), *(int(x) for x in images.shape[1:]))
    yield _npy_header(shape)
    for s0 in range(0, shape[0], chunk):
        block = np.ascontiguousarray(take(images, np.arange(s0, min(s0 + chunk, shape[0]))), np.uint8)
        yield memoryview(block).cast("B")  # the block's bytes, not a copy of them


def _write_pack(store: Path, images, chunk: int = PACK_CHUNK_ROWS) -> str:
    """Write ``images`` (numpy or lazy rows) as a ``.npy`` pack named by its sha256, a chunk of
    rows at a time; the bytes are exactly ``np.save``'s. Returns the digest."""
    return _write_streamed(lambda d: _pack_path(store, d), _npy_parts(images, chunk))[0]


def _raw_path(store: Path, digest: str) -> Path:
    return store / "raw" / f"{digest}.bin"


def _write_raw(store: Path, blobs) -> tuple[str, int]:
    """The new rows' file bytes, back to back in row order, as ``raw/<sha256>.bin``; returns
    (digest, bytes). Row k's bytes start at the sum of the file sizes (the manifest's
    ``file_size``) before it, so no offsets are stored."""
    return _write_streamed(lambda d: _raw_path(store, d), blobs.iter_bytes())


def read_raw(store_dir: str | Path, snapshot_id: str, deep: bool = True) -> Iterator[tuple[str, bytes]]:
    """``(sample_id, file bytes)`` of every row whose snapshot kept its source file's bytes (a
    source with a transform: issue 19 item 5), from the root to ``snapshot_id``, in manifest
    order. Each row's bytes are checked against the ``file_sha256`` recorded at ingest (``deep``;
    else only each raw file's own sha256, after its last row): the bytes are the file as it was
    read, untouched, so its pixels can be derived again under another transform."""
    store = Path(store_dir)
    for h in chain(store, snapshot_id):
        r = h.get("raw")
        if r is None:
            continue
        delta = read_delta(store, h).select(["sample_id", "file_size", "file_sha256"]).to_pydict()
        path = _raw_path(store, r["sha256"])
        if not path.is_file():
            raise DamagedStore(store, path, f"is missing (the raw bytes of snapshot {h['id'][:12]})")
        sizes = delta["file_size"]
        if sum(sizes) != r["bytes"] or path.stat().st_size != r["bytes"]:
            raise DamagedStore(store, path, f"holds {path.stat().st_size} bytes; snapshot {h['id'][:12]} records "
                                            f"{r['bytes']} for files of {sum(sizes)} bytes")
        whole = hashlib.sha256()
        with open(path, "rb") as fh:
            for sid, n, fsha in zip(delta["sample_id"], sizes, delta["file_sha256"]):
                data = fh.read(n)
                whole.update(data)
                if deep and hashlib.sha256(data).hexdigest() != fsha:
                    raise DamagedStore(store, path, f"the bytes of {sid} do not hash to its recorded file_sha256")
                yield sid, data
        if whole.hexdigest() != r["sha256"]:
            raise DamagedStore(store, path, "does not match its sha256")


def export_raw(store_dir: str | Path, snapshot_id: str, out: str | Path) -> int:
    """Write every kept raw file of ``snapshot_id``'s history under ``out`` at its sample id
    (``train/<class>/<name>``: an ImageFolder source again); refuses to overwrite. Returns the count."""
    out = Path(out)
    n = 0
    for sid, data in read_raw(store_dir, snapshot_id):
        dest = out / sid
        if not dest.resolve().is_relative_to(out.resolve()):
            raise StoreError(f"sample id {sid!r} leaves {out}: refused")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as fh:  # x: an existing file is an error, never overwritten
            fh.write(data)
        n += 1
    return n


def write_snapshot(store_dir: str | Path, plan: Plan, source: dict, created: str,
                   features: Optional[tuple[pd.DataFrame, dict]] = None,
                   base: Optional[dict] = None,
                   summarize: Optional[Callable[[pd.DataFrame, list], dict]] = None,
                   prior: Optional[dict] = None) -> tuple[str, pd.DataFrame]:
    """Write a planned snapshot (pack, delta, features, header, heads); returns its id and final
    manifest. ``features``: the new rows' data-gate columns (``stats.row_features``) and the
    detector settings they were computed with; the header names them. ``base``: the entry
    :func:`write_base` returned for the parent; the header names it. ``summarize(manifest,
    class_names)``: what the header carries as ``summary`` about the whole snapshot (the snapshot
    stage's report fields: a no-op reports them without loading a row, ``snapshot.fast_noop``).
    ``prior``: the parent's header, when ``plan.manifest`` holds the new rows only (an append that
    loaded no parent row, ``snapshot.fast_append``): the header's row count and counts add the
    parent's, ``summarize`` is given the new rows, and the manifest returned is the new rows'."""
    store = Path(store_dir)
    check_format(store)
    if not (store / FORMAT_FILE).is_file():
        write_file(store / FORMAT_FILE, FORMAT_TEXT.encode())
    manifest = plan.manifest.copy(deep=False)  # columns are replaced, never written into: plan.manifest stays
    n = len(manifest)
    before = 0  # rows of the parent that ``manifest`` leaves out
    if prior is not None:
        if prior.get("id") != plan.parent or n != plan.n_new:
            raise ValueError("a plan of new rows only needs its parent's header as prior")
        before = int(prior["n_rows"])
    packs: list[str] = []
    if plan.n_new:
        pack = _write_pack(store, plan.new_images)
        _set_tail(manifest, "pack", pack, plan.n_new)
        packs.append(pack)
    rows = manifest.iloc[n - plan.n_new:]  # a slice shares the columns; an index array copied them all
    adopted = _adopt_leftover(store, plan, source["key"], rows)
    if adopted is not None:
        sid, old_rows = adopted
        manifest = concat_manifests([manifest.iloc[: n - plan.n_new], old_rows], ignore_index=True)
        set_head(store, source["key"], sid)
        return sid, manifest
    delta = _parquet_buffer(rows, DELTA_SCHEMA)
    ddigest = _sha256(delta)
    _write_object(_delta_path(store, ddigest), delta, ddigest)
    del delta
    extra = {}
    if features is not None:
        frame, detector = features
        if len(frame) != plan.n_new:
            raise ValueError(f"features for {len(frame)} rows, the snapshot adds {plan.n_new}")
        fb = _parquet_buffer(frame, FEATURE_SCHEMA)
        fdigest = _sha256(fb)
        _write_object(_features_path(store, fdigest), fb, fdigest)
        extra["features"] = {"sha256": fdigest, "rows": plan.n_new, "detector": detector}
    if plan.new_raw is not None and plan.n_new:
        rdigest, total = _write_raw(store, plan.new_raw)
        extra["raw"] = {"sha256": rdigest, "rows": plan.n_new, "bytes": total}
    if summarize is not None:
        # The new rows' snapshot_id is this header's hash, unknown until it is written; a stand-in
        # of that form (64 hex digits) gives what the final manifest gives to a summary that checks
        # only the form (the snapshot stage's: a test compares them). Replaced below.
        _set_tail(manifest, "snapshot_id", "0" * 64, plan.n_new)
        extra["summary"] = summarize(manifest, plan.class_names)
    if base is not None:
        if base["of"] != plan.parent or base["rows"] != before + n - plan.n_new:
            raise ValueError(f"a base of {base['of'][:12]} ({base['rows']} rows) for a snapshot of parent "
                             f"{str(plan.parent)[:12]} with {before + n - plan.n_new} rows before its new ones")
        extra["base"] = base
    header = {
        **extra,
        "format": FORMAT_VERSION,
        "parent": plan.parent,
        "delta": {"sha256": ddigest, "rows": plan.n_new},
        "packs": packs,
        "class_names": plan.class_names,
        "image_shape": list(plan.image_shape),
        "source": source,
        "created": created,
        "n_rows": before + n,
        "n_new": plan.n_new,
        "counts": counts(manifest, plan.class_names) if prior is None
        else add_counts(prior["counts"], counts(manifest, plan.class_names), plan.class_names),
    }
    hb = header_bytes(header)
    sid = _sha256(hb)
    _write_object(header_path(store, sid), hb, sid)
    set_head(store, source["key"], sid)
    _set_tail(manifest, "snapshot_id", sid, plan.n_new)
    return sid, manifest


def _set_tail(frame: pd.DataFrame, column: str, value: str, k: int) -> None:
    """Set the last ``k`` rows of a string column to ``value``, sharing the earlier rows' Arrow
    data: an indexed assignment rebuilt the whole column, 70+ MB a column at 1M rows, on every
    append (issue 19 item 3)."""
    if not k:
        return
    n, col = len(frame), frame[column]
    if isinstance(col.dtype, pd.CategoricalDtype):  # a new code, not a string a row
        cat = col.array if value in col.cat.categories else col.cat.add_categories([value]).array
        codes = cat.codes.copy()
        codes[n - k:] = cat.categories.get_loc(value)
        # "" (the plan's placeholder) no longer names a row: dropped, so categories are what rows hold
        frame[column] = pd.Series(pd.Categorical.from_codes(codes, dtype=cat.dtype).remove_unused_categories(),
                                  index=frame.index)
        return
    if not (isinstance(col.dtype, pd.StringDtype) and col.dtype.storage == "pyarrow"):
        frame.iloc[n - k:, frame.columns.get_loc(column)] = value
        return
    arr = pa.array(col)  # the column's own Arrow data, not a copy
    head = (arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr], arr.type)).slice(0, n - k)
    tail = pa.nulls(k, arr.type).fill_null(value)
    frame[column] = pd.Series(pd.array(pa.chunked_array([*head.chunks, tail], arr.type), dtype=col.dtype),
                              index=frame.index)


def base_due(parent: Optional[Parent], every: Optional[int] = None) -> bool:
    """Whether the child of ``parent`` should carry a base: its loads would read ``every``
    (default ``BASE_EVERY``) or more headers otherwise."""
    every = BASE_EVERY if every is None else every
    return parent is not None and every > 0 and parent.since_base >= every


BASE_GROUP_ROWS = 65_536  # rows per Parquet row group of a base's files: the writer holds about two groups


class _Grouped:
    """A Parquet file written ``rows`` rows a row group, whatever the sizes of the tables added:
    its bytes depend on the rows alone, so a base streamed from the store in any batching (the
    full read's, the append's) is the same file."""

    def __init__(self, sink: "_HashedFile", schema: pa.Schema, rows: Optional[int] = None):
        self.schema, self.rows = schema, BASE_GROUP_ROWS if rows is None else rows
        self._w = pq.ParquetWriter(sink, schema, compression="zstd")
        self._pending: list[pa.Table] = []
        self.n = 0  # rows added
        self._held = 0

    def add(self, table: pa.Table) -> None:
        self._pending.append(table.cast(self.schema))
        self._held += table.num_rows
        self.n += table.num_rows
        while self._held >= self.rows:
            t = pa.concat_tables(self._pending)
            self._write(t.slice(0, self.rows))
            rest = t.slice(self.rows).combine_chunks()
            self._pending, self._held = [rest], rest.num_rows

    def _write(self, t: pa.Table) -> None:
        # one chunk a column: Arrow's page cuts then depend on the rows, not on how they arrived
        self._w.write_table(t.combine_chunks(), row_group_size=self.rows)

    def close(self) -> None:
        if self._held:
            self._write(pa.concat_tables(self._pending))
        self._pending, self._held = [], 0
        self._w.close()

    def abort(self) -> None:
        """Stop without a file: the writer is closed now (its footer goes to the sink the caller
        discards), not when it is collected, into a sink already closed."""
        self._pending, self._held = [], 0
        if self._w.is_open:
            try:
                self._w.close()
            except (OSError, ValueError):
                pass


class BaseWriter:
    """A base of a snapshot written from :func:`verify_files`' pass over its rows (``file`` and
    ``rows`` are that pass's ``each_file`` and ``each_rows``, with ``whole_rows``): the manifest a
    row group at a time, every row's pixels read from its pack (or the older base) and re-hashed
    against the verified row before they are copied, so the base is right by construction. Memory
    is a batch of rows and a chunk of pixels, not the store's rows (issue 19 item 3: the append
    that wrote a base loaded every row, 1.16 GB at 1M rows). The snapshot stage's full read and its
    append both write a base this way: the same rows give the same files.

    ``headers``: the :func:`lineage` of the snapshot, whose files the pass must visit in order."""

    def __init__(self, store_dir: str | Path, whole: list[dict], headers: list[dict], chunk: int = PACK_CHUNK_ROWS):
        self.store = Path(store_dir)
        self.of = whole[-1]["id"]
        self.history = tuple(h["id"] for h in whole)
        self.headers, self.chunk = headers, chunk
        self.shape = tuple(int(x) for x in headers[-1]["image_shape"])
        self.n_rows = int(headers[-1]["n_rows"])
        base = base_of(headers)
        self._plan = ([(headers[0]["id"], True)] if base is not None else []) + [(h["id"], False) for h in headers]
        self._k = 0
        self._seg: Optional[tuple[dict, bool]] = None
        self._packs: list = []
        self._names: Optional[pa.Array] = None
        self._at = 0  # rows of the current file done
        self.created: list[Path] = []  # the files finish() put in bases/ (retract() removes them)
        self._man = _HashedFile(lambda d: _base_path(self.store, d, "parquet"))
        self._px: Optional[_HashedFile] = None
        try:
            self._rows = _Grouped(self._man, BASE_SCHEMA)
            self._px = _HashedFile(lambda d: _base_path(self.store, d, "npy"))
            self._px.write(_npy_header((self.n_rows, *self.shape)))
        except BaseException:
            self.discard()
            raise

    def file(self, header: dict, is_base: bool) -> None:
        from pipeline.data.rows import file_identity

        if self._k >= len(self._plan) or self._plan[self._k] != (header["id"], is_base):
            raise IntegrityError(f"the store moved while a base of {self.of[:12]} was written: run the stage again")
        self._k += 1
        self._seg, self._at = (header, is_base), 0
        if is_base:
            b = header["base"]
            paths, self._names = [_base_path(self.store, b["pixels"], "npy")], None
        else:
            paths, self._names = [_pack_path(self.store, p) for p in header["packs"]], pa.array(header["packs"], pa.string())
        self._packs = []
        for path in paths:  # verify_files has checked their dtype and shape; each row is hashed below
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
            self._packs.append((path, int(arr.offset), int(arr.shape[0]), file_identity(path)))
            del arr

    def rows(self, batch: pa.RecordBatch) -> None:
        from pipeline.data.rows import LazyRows

        header, is_base = self._seg
        n = batch.num_rows
        t = pa.Table.from_batches([batch])
        if is_base:
            pack_of, index = np.zeros(n, np.int32), np.arange(self._at, self._at + n, dtype=np.int64)
        else:
            t = t.set_column(t.schema.get_field_index("pack"), "pack", t.column("pack").cast(pa.string()))
            t = t.append_column("snapshot_id", pa.array(np.full(n, header["id"], dtype=object), pa.string()))
            # verify_files has checked that every row names one of the header's packs
            pack_of = pc.fill_null(pc.index_in(t.column("pack"), value_set=self._names), -1).to_numpy()
            if n and pack_of.min() < 0:
                raise IntegrityError(f"a row of snapshot {header['id'][:12]} names a pack its header does not")
            index = t.column("pack_index").to_numpy()
        self._rows.add(t.select(BASE_SCHEMA.names))
        lazy = LazyRows(self._packs, pack_of, index, self.shape)
        ids, sha = t.column("sample_id"), t.column("sha256")
        for s0 in range(0, n, self.chunk):
            e = min(s0 + self.chunk, n)
            block = lazy[s0:e]
            check_rows(block, np.arange(e - s0), ids.slice(s0, e - s0).to_pylist(), sha.slice(s0, e - s0).to_pylist())
            self._px.write(memoryview(block).cast("B"))
        self._at += n
        # the batch's freed buffers back to the OS: glibc kept them in a heap that fragmented, and
        # the pass's peak grew by 0.066 KiB a row of the store (0.039 with this and verify_files'
        # buffered reads: bench/results/snapshot_base_stream_1m.log)
        heap.release()

    def finish(self, whole: list[dict], detector: Optional[dict] = None) -> dict:
        """The base's files moved to their names; the header entry naming them. ``whole``: the
        chain :func:`verify_files` returned (it must be the one this writer was made for)."""
        if tuple(h["id"] for h in whole) != self.history or self._k != len(self._plan) or self._rows.n != self.n_rows:
            raise IntegrityError(f"the store moved while a base of {self.of[:12]} was written: run the stage again")
        out = rows = None
        try:
            self._rows.close()
            if detector is not None:
                out = _HashedFile(lambda d: _base_path(self.store, d, "parquet"))
                rows = _Grouped(out, BASE_FEATURE_SCHEMA)
                for part in _feature_parts(self.store, self.headers, whole, detector):
                    rows.add(part)
                if rows.n != self.n_rows:
                    raise IntegrityError(f"the data-gate columns of {self.of[:12]} hold {rows.n} rows, "
                                         f"not {self.n_rows}")
                rows.close()
            # every file whole and synced before any is named; one that fails to be named takes
            # back those this writer named: a failure leaves no base file behind
            files = [self._man, self._px] + ([out] if out is not None else [])
            for f in files:
                f.seal()
            named = []
            try:
                for f in files:
                    named.append((f, f.publish()[0]))
            except BaseException:
                self.created = [f.path_of(d) for f, d in named if f.created]
                self.retract()
                raise
            self.created = [f.path_of(d) for f, d in named if f.created]
            entry = {"of": self.of, "rows": self.n_rows, "manifest": named[0][1], "pixels": named[1][1],
                     "features": None}
            if out is not None:
                entry["features"] = {"sha256": named[2][1], "detector": detector}
            return entry
        finally:
            if rows is not None:
                rows.abort()
            if out is not None:
                out.discard()
            self.discard()
            heap.release()  # the pass's and the writers' freed buffers: the stage goes on

    def discard(self) -> None:
        """Remove what is not finished (the temp files)."""
        rows = getattr(self, "_rows", None)
        if rows is not None:
            rows.abort()
        self._man.discard()
        if self._px is not None:
            self._px.discard()
        try:
            (self.store / "bases").rmdir()  # only when empty: the store holds what headers name
        except OSError:
            pass

    def retract(self) -> None:
        """Remove the files :meth:`finish` put in ``bases/`` (not those that were there already):
        the snapshot that was to name them was not written."""
        for path in self.created:
            path.unlink(missing_ok=True)
        self.created = []
        self.discard()


def _feature_parts(store: Path, headers: list[dict], whole: Optional[list[dict]], detector: dict,
                   rows: int = 65_536) -> Iterator[pa.Table]:
    """:func:`load_features`' rows (``BASE_FEATURE_SCHEMA``) as tables of at most ``rows``, each
    file checked against its sha256, schema and row count. ``headers``: a :func:`resolve` list;
    ``whole``: its snapshot's :func:`chain` (read when None and needed)."""
    base = base_of(headers)
    if base is not None:
        if base.get("features") is None or base["features"]["detector"] != detector:
            # the base holds other settings' columns (or none): the rows before it from the root
            whole = whole if whole is not None else chain(store, headers[-1]["id"])
            yield from _feature_parts(store, whole, whole, detector, rows)
            return
        f = base["features"]["sha256"]
        for batch in _read_batches(store, _base_path(store, f, "parquet"), f, {**headers[0], "n_new": base["rows"]},
                                   "base's data-gate columns", BASE_FEATURE_SCHEMA, True, BASE_FEATURE_SCHEMA.names,
                                   rows=rows):
            yield pa.Table.from_batches([batch])
    for h in headers:
        f = h.get("features")
        if f is not None and f["detector"] == detector:
            for batch in _read_batches(store, _features_path(store, f["sha256"]), f["sha256"], h, "data-gate columns",
                                       FEATURE_SCHEMA, True, FEATURE_SCHEMA.names, rows=rows):
                yield pa.Table.from_batches([batch]).append_column("stored", pa.array(np.ones(batch.num_rows, bool)))
        else:
            for s0 in range(0, int(h["n_new"]), rows):
                k = min(rows, int(h["n_new"]) - s0)
                yield pa.table({"phash": np.zeros(k, np.uint64), "abnormal_block": np.zeros(k, bool),
                                "abnormal_block_at": blank_strings(k), "stored": np.zeros(k, bool)})


def write_base(store_dir: str | Path, parent: Parent, detector: Optional[dict] = None,
               chunk: int = PACK_CHUNK_ROWS, created: Optional[list] = None) -> dict:
    """Consolidate ``parent`` (verified by :func:`load_parent`) into ``bases/``: its full manifest,
    its pixels in manifest order and, with ``detector``, its data-gate columns, streamed from the
    store by :class:`BaseWriter` (every row re-hashed against its verified delta as it is copied;
    ``chunk`` rows of pixels at a time). Refused when the store's history is no longer the one
    ``parent`` was verified with. Returns the header entry naming the files; ``created`` gets the
    paths it put in ``bases/`` (for the caller to remove if the snapshot naming them is not written)."""
    whole, headers = lineage(store_dir, parent.id)
    if tuple(h["id"] for h in whole) != tuple(parent.history):
        raise IntegrityError(f"snapshot {parent.id[:12]}'s history changed since it was verified: run the stage again")
    w = BaseWriter(store_dir, whole, headers, chunk)
    try:
        # the packs are not hashed whole: every row is hashed as it is copied
        got, _ = verify_files(store_dir, parent.id, hash_packs=False, each_rows=w.rows, each_file=w.file,
                              whole_rows=True)
        entry = w.finish(got, detector)
        if created is not None:
            created.extend(w.created)
        return entry
    finally:
        w.discard()


def prune_base(store_dir: str | Path, old: Optional[dict], keep: Optional[dict]) -> None:
    """Remove the files of base ``old`` (the one a new base supersedes) that ``keep`` does not
    use. The headers that name ``old`` stay valid: a load of them walks their whole history."""
    if old is None:
        return
    store = Path(store_dir)
    used = set() if keep is None else {keep["manifest"], keep["pixels"], (keep.get("features") or {}).get("sha256")}
    files = [(old["manifest"], "parquet"), (old["pixels"], "npy")]
    if old.get("features"):
        files.append((old["features"]["sha256"], "parquet"))
    for digest, ext in files:
        if digest not in used:
            _base_path(store, digest, ext).unlink(missing_ok=True)


def _adopt_leftover(store: Path, plan: Plan, key: str, rows: pd.DataFrame) -> Optional[tuple[str, pd.DataFrame]]:
    """A complete child of the parent with exactly these rows, left by a run killed before it moved
    heads: reuse it rather than fork the history with a twin (the tip would become ambiguous)."""
    if plan.parent is None or not _snap_dir(store).is_dir():
        return None
    cols = ["sample_id", "sha256", "label", "split", "source_uri", "pack", "pack_index", "file_size", "file_sha256"]
    for h in list_snapshots(store):
        if h["parent"] != plan.parent or h["source"]["key"] != key or h["n_new"] != plan.n_new:
            continue
        try:
            old = read_delta(store, h).to_pandas()
            verify_packs(store, [h], old.assign(snapshot_id=h["id"]))
        except StoreError:
            continue
        if old[cols].reset_index(drop=True).equals(_plain_strings(rows[cols]).reset_index(drop=True)):
            return h["id"], old.assign(snapshot_id=h["id"])[MANIFEST_COLUMNS]
    return None


def _plain_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its categorical columns as the string columns a Parquet read gives."""
    cats = [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)]
    return frame.astype({c: frame[c].cat.categories.dtype for c in cats}) if cats else frame


def set_head(store_dir: str | Path, key: str, snapshot_id: str) -> None:
    write_if_changed(Path(store_dir) / "heads" / key, (snapshot_id + "\n").encode())


# ----------------------------------------------------------------------------- whole-store verification


@dataclass
class LineageReport:
    key: str
    head: Optional[str]
    ok: bool
    message: str
    stats: VerifyStats = field(default_factory=VerifyStats)
    history: tuple[str, ...] = ()


def verify_store(store_dir: str | Path, deep: bool = False,
                 say: Callable[[str], None] = lambda m: None) -> tuple[bool, list[LineageReport], list[str]]:
    """Check every lineage of a store: (ok, one report per lineage, notes on stray files).

    Each lineage's chain is checked from its head (headers, deltas, packs; ``deep``: every sample).
    Every other header is checked against its id too. Files nothing refers to (a crash leftover, a
    temp file) are notes, not failures: they cannot change what any snapshot id names.
    """
    store = Path(store_dir)
    if not store.is_dir():
        raise StoreError(f"no store at {store}: run the snapshot stage first (or pass --store)")
    check_format(store)
    ok = True
    reports: list[LineageReport] = []
    headers: dict[str, dict] = {}
    for p in sorted(_snap_dir(store).glob("*.json")) if _snap_dir(store).is_dir() else []:
        if not _HEX64.match(p.stem):
            continue
        try:
            headers[p.stem] = read_header(store, p.stem)
        except StoreError as exc:
            ok = False
            reports.append(LineageReport("?", p.stem, False, str(exc)))
            say(f"DAMAGED  {exc}")
    keys = {h["source"]["key"] for h in headers.values()}
    if (store / "heads").is_dir():
        keys |= {p.name for p in (store / "heads").iterdir() if not p.name.startswith(".")}
    reached: set[str] = set()
    used_deltas: set[str] = set()
    used_packs: set[str] = set()
    used_features: set[str] = set()
    used_raw: set[str] = set()
    used_bases: set = set()
    notes_base: list[str] = []
    for key in sorted(keys):
        t0 = time.perf_counter()
        st = VerifyStats()
        head = None
        try:
            head = current_snapshot(store, key)
            if head is None:
                raise DamagedStore(store, store / "heads" / key, "names a lineage with no snapshot")
            hs = chain(store, head)
            manifest = load_manifest(store, head, verify=True, headers=hs)
            verify_packs(store, hs, manifest, deep=deep, stats_out=st)
            if any(h.get("raw") for h in hs):
                for _ in read_raw(store, head, deep=deep):  # each raw file's sha256 (deep: each row's)
                    pass
            for h in hs:
                if h.get("features") is not None:
                    read_features(store, h)
                if h.get("base") is not None:
                    if _base_usable(store, h):
                        _check_base(store, h, manifest, hs, st)
                        b = h["base"]
                        used_bases |= {b["manifest"], b["pixels"], (b.get("features") or {}).get("sha256")}
                    else:
                        notes_base.append(f"the base of snapshot {h['id'][:12]} is not on disk (superseded by a "
                                          f"newer one): loads of it read its whole history; nothing is lost")
            st.snapshots, st.rows = len(hs), len(manifest)
            st.seconds = time.perf_counter() - t0
            reached |= {h["id"] for h in hs}
            used_deltas |= {h["delta"]["sha256"] for h in hs}
            used_packs |= {p for h in hs for p in h["packs"]}
            used_features |= {h["features"]["sha256"] for h in hs if h.get("features")}
            used_raw |= {h["raw"]["sha256"] for h in hs if h.get("raw")}
            deep_note = f", {st.rows_rehashed} samples re-hashed" if deep else ""
            msg = (f"lineage {key}: ok: {st.snapshots} snapshot(s), {st.rows} rows, head {head[:12]}, "
                   f"{st.packs} pack(s), {st.bytes_hashed / 1e6:.1f} MB hashed{deep_note} in {st.seconds:.2f} s")
            reports.append(LineageReport(key, head, True, msg, st, tuple(h["id"] for h in hs)))
            say(msg)
        except StoreError as exc:
            ok = False
            reports.append(LineageReport(key, head, False, str(exc), st))
            say(f"lineage {key}: DAMAGED: {exc}")
            cur = head
            while cur in headers and cur not in reached:  # what the damaged chain still names
                reached.add(cur)
                cur = headers[cur]["parent"]
    notes: list[str] = list(notes_base)
    for sid, h in sorted(headers.items()):
        if sid not in reached:
            notes.append(f"{header_path(store, sid)}: snapshot in no head's history (a crash leftover or an abandoned "
                         f"branch); it is checked against its id, nothing uses it")
            used_deltas.add(h["delta"]["sha256"])
            used_packs |= set(h["packs"])
            if h.get("features"):
                used_features.add(h["features"]["sha256"])
            if h.get("raw"):
                used_raw.add(h["raw"]["sha256"])
            if h.get("base"):
                b = h["base"]
                used_bases |= {b["manifest"], b["pixels"], (b.get("features") or {}).get("sha256")}
    for folder, used, suffixes in (("deltas", used_deltas, (".parquet",)), ("packs", used_packs, (".npy",)),
                                   ("features", used_features, (".parquet",)), ("bases", used_bases, (".parquet", ".npy")),
                                   ("raw", used_raw, (".bin",))):
        d = store / folder
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            if any(p.name.endswith(x) and p.name[: -len(x)] in used for x in suffixes):
                continue
            notes.append(f"{p}: referenced by no snapshot (a leftover of an interrupted write); safe to delete")
    for note in notes:
        say(f"note: {note}")
    return ok, reports, notes


def _check_base(store: Path, h: dict, manifest: pd.DataFrame, hs: list[dict], st: VerifyStats) -> None:
    """A base must be its parent, exactly: its manifest the first rows of the chain's, each of its
    pixel rows hashing to that manifest's sha256, its data-gate columns those the chain stores."""
    b = h["base"]
    base = read_base(store, h)
    ref = manifest.iloc[: b["rows"]].reset_index(drop=True)
    if not base.reset_index(drop=True).equals(ref):
        raise DamagedStore(store, _base_path(store, b["manifest"], "parquet"),
                           f"is not the manifest of {b['of'][:12]}, the parent of snapshot {h['id'][:12]} that it stands for")
    src = _Source(_base_path(store, b["pixels"], "npy"), b["pixels"], np.arange(b["rows"]), np.arange(b["rows"]), "base pixels")
    arr = _open_pack(store, src, tuple(h["image_shape"]), manifest, h["id"])
    actual = file_sha256(src.path)
    st.bytes_hashed += src.path.stat().st_size
    if actual != src.digest:
        raise DamagedStore(store, src.path, f"does not match its sha256 (now {actual[:12]}...)")
    bad = _bad_rows(arr, src, manifest)
    st.rows_rehashed += b["rows"]
    if bad:
        raise DamagedStore(store, src.path, f"{len(bad)} row(s) are not the pixels of {b['of'][:12]}: {_few(bad)}")
    if b.get("features"):
        k = next(i for i, x in enumerate(hs) if x["id"] == b["of"])
        want = load_features(store, b["of"], b["features"]["detector"], hs[: k + 1])
        got = read_base_features(store, h)
        stored = want["stored"].to_numpy(bool)
        if not (np.array_equal(got["stored"].to_numpy(bool), stored)
                and got[stored].drop(columns="stored").reset_index(drop=True).equals(
                    want[stored].drop(columns="stored").reset_index(drop=True))):
            raise DamagedStore(store, _base_path(store, b["features"]["sha256"], "parquet"),
                               f"are not the data-gate columns the history of {b['of'][:12]} stores")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pipeline.data.store verify``: exit 0 when every chain checks, 1 when damaged."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.data.store", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check every snapshot chain of a store (exit 0 ok, 1 damaged, 2 error)")
    v.add_argument("--store", default="data/store", help="store folder (default data/store)")
    v.add_argument("--deep", action="store_true", help="also re-hash every sample (reads every pixel)")
    x = sub.add_parser("export-raw", help="write the source files a transformed snapshot kept (data.resize) "
                                          "back out as an ImageFolder tree, checked against their recorded digests")
    x.add_argument("--store", default="data/store", help="store folder (default data/store)")
    x.add_argument("--snapshot", default=None, help="snapshot id (default: the one data/snapshot.json names)")
    x.add_argument("--pointer", default="data/snapshot.json", help="pointer file naming the snapshot")
    x.add_argument("--out", required=True, help="folder to write train/<class>/<file> and test/... into")
    args = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(f"store: {msg}", file=sys.stderr, flush=True)

    if args.cmd == "export-raw":
        try:
            sid = args.snapshot or read_pointer(args.pointer)["snapshot_id"]
            n = export_raw(args.store, sid, args.out)
        except FileExistsError as exc:
            print(f"error: {exc.filename} exists: export into an empty folder", file=sys.stderr, flush=True)
            return 2
        except StoreError as exc:
            print(f"error: {exc.prefix}{exc}", file=sys.stderr, flush=True)
            return exc.exit_code
        if n == 0:
            say(f"snapshot {sid[:12]} kept no raw files: they are kept only for a source with data.resize set")
            return 1
        say(f"wrote {n} file(s) of snapshot {sid[:12]} under {args.out}")
        return 0

    try:
        ok, reports, notes = verify_store(args.store, deep=args.deep, say=say)
    except StoreError as exc:
        print(f"error: {exc.prefix}{exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    n_snap = sum(r.stats.snapshots for r in reports)
    if ok:
        say(f"{args.store}: ok ({len(reports)} lineage(s), {n_snap} snapshot(s) in their histories"
            f"{', ' + str(len(notes)) + ' note(s)' if notes else ''})")
        return 0
    bad = [r for r in reports if not r.ok]
    print(f"error: {IntegrityError.prefix}{args.store}: {len(bad)} damaged lineage(s) or header(s); "
          f"{restore_hint(args.store)}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
