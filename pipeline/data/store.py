"""The content-addressed, append-only sample store under ``data/store``.

Layout (docs/design.md)::

    data/store/packs/<sha256-of-file>.npy     uint8 (n, H, W, C): the rows one snapshot ingested
    data/store/snapshots/<snapshot_id>.csv    manifest, one row per sample
    data/store/snapshots/<snapshot_id>.json   meta: id, parent, created, source, class_names, ...
    data/store/heads/<source-key>             the current snapshot of one source lineage (the only ref)

Manifest columns, in order: ``sample_id, sha256, label, split, source_uri, ingest_time,
snapshot_id, pack, pack_index`` (``pack`` = the pack's file hash, ``snapshot_id`` = the snapshot
that first ingested the row). A snapshot's id is the sha256 of its manifest CSV bytes without the
``snapshot_id`` column (the column would otherwise have to contain its own hash).

Rules
-----
- Append-only: a new snapshot holds every row of its parent byte-for-byte (ingest time, URI and
  pack included) followed by the new rows in source order. An earlier row whose pixels, label or
  split changed, or that vanished, makes :func:`plan_snapshot` raise :class:`SnapshotRefused`
  listing every offending row; nothing is written. A vanished row whose exact pixels reappear
  under a new id is still refused, but reported as "looks like a rename of X to Y" (same class) or
  "looks like a relabel of X (class a) to Y (class b)" (other class), since a file source's id
  contains its class folder.
- Class indices are stable: a class that appears in a later snapshot gets the next index, so the
  integer labels of earlier rows never change (class_names are then no longer sorted).
- One lineage per source key (``sources.source_key``: data.name + data.path, or the digits split
  settings): a digits store and a cifar10 store can share ``data/store`` without refusing each
  other, each growing its own history from ``heads/<key>``. ``heads/<key>`` is the one ref that says
  which snapshot is current; ``data/snapshot.json`` is only the DVC output derived from it. When the
  ref is missing it is recovered from the history itself: the tip of the chain of that key (the one
  snapshot no other snapshot names as parent), never by guessing from times; several tips is a
  damaged store and is refused.
- Writes are atomic (temp file in the same folder + ``os.replace``) and ordered pack -> manifest
  -> meta -> heads/<key>: a snapshot exists once its meta exists, and a crash leaves at most
  unreferenced files, never half a snapshot.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.core.hashing import sample_hash
from pipeline.data import stats
from pipeline.io import atomic_write_bytes as atomic_write
from pipeline.errors import CheckFailed, UserError

COLUMNS = ["sample_id", "sha256", "label", "split", "source_uri", "ingest_time", "snapshot_id", "pack", "pack_index"]
MAX_LISTED = 20  # rows named in one error message
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(UserError):
    """The store cannot be used as asked (missing snapshot, damaged layout); the message says why."""


class IntegrityError(StoreError, CheckFailed):
    """Stored bytes do not match their recorded hashes (exit 1)."""

    prefix = "integrity check failed, stage aborted: "


class SnapshotRefused(StoreError, CheckFailed):
    """The source rewrote history: earlier rows changed or vanished. `problems` lists them all."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class Snapshot:
    id: str
    manifest: pd.DataFrame
    images: np.ndarray  # uint8 (N, H, W, C), row-aligned with manifest
    class_names: list[str]
    image_shape: tuple[int, int, int]
    meta: dict = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["label"].to_numpy(dtype=np.int64)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images, labels, sample_ids) of one split, in manifest order."""
        mask = (self.manifest["split"] == name).to_numpy()
        return self.images[mask], self.labels[mask], self.manifest["sample_id"][mask].tolist()


@dataclass(frozen=True)
class Parent:
    """What a new snapshot is compared with: the manifest and meta, no pixels needed."""

    id: str
    manifest: pd.DataFrame  # all columns as str, exactly as stored
    meta: dict


@dataclass(frozen=True)
class Plan:
    """The outcome of comparing a source with its parent; pure data, nothing written yet."""

    parent: Optional[str]
    manifest: pd.DataFrame  # full manifest, snapshot_id of the new rows still ""
    new_images: np.ndarray  # uint8 (n_new, H, W, C), in the order of the new rows
    class_names: list[str]
    image_shape: tuple[int, int, int]

    @property
    def n_new(self) -> int:
        return len(self.new_images)

    @property
    def unchanged(self) -> bool:
        return self.parent is not None and self.n_new == 0


# ----------------------------------------------------------------------------- pure functions


def manifest_csv(df: pd.DataFrame) -> bytes:
    """The canonical CSV bytes of a manifest (what the snapshot id hashes)."""
    return df.to_csv(index=False, lineterminator="\n").encode("utf-8")


def snapshot_id_of(df: pd.DataFrame) -> str:
    return hashlib.sha256(manifest_csv(df.drop(columns=["snapshot_id"]))).hexdigest()


def plan_snapshot(parent: Optional[Parent], sample_ids: list[str], hashes: list[str], labels: np.ndarray,
                  class_names: list[str], splits: np.ndarray, uris: list[str], images: np.ndarray,
                  ingest_time: str) -> Plan:
    """Compare a decoded source with its parent; refuse a rewrite of history, else plan the append."""
    image_shape = tuple(int(x) for x in images.shape[1:]) if len(images) else (0, 0, 0)
    names = [class_names[int(i)] for i in labels]
    if parent is None:
        store_classes = list(class_names)
        old = pd.DataFrame(columns=COLUMNS, dtype=str)
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
        store_classes += sorted(set(class_names) - set(store_classes))
        _refuse_rewrites(parent, sample_ids, hashes, names, splits)
    store_index = {c: i for i, c in enumerate(store_classes)}
    known = set(old["sample_id"])
    new_pos = [i for i, sid in enumerate(sample_ids) if sid not in known]
    new = pd.DataFrame({
        "sample_id": [sample_ids[i] for i in new_pos],
        "sha256": [hashes[i] for i in new_pos],
        "label": [str(store_index[names[i]]) for i in new_pos],
        "split": [str(splits[i]) for i in new_pos],
        "source_uri": [uris[i] for i in new_pos],
        "ingest_time": [ingest_time] * len(new_pos),
        "snapshot_id": [""] * len(new_pos),
        "pack": [""] * len(new_pos),
        "pack_index": [str(k) for k in range(len(new_pos))],
    }, columns=COLUMNS, dtype=str)
    manifest = pd.concat([old, new], ignore_index=True) if len(old) else new
    new_images = np.ascontiguousarray(images[np.array(new_pos, dtype=np.int64)]) if new_pos else images[:0]
    return Plan(parent.id if parent else None, manifest, new_images, store_classes, image_shape)


def _refuse_rewrites(parent: Parent, sample_ids: list[str], hashes: list[str], names: list[str],
                     splits: np.ndarray) -> None:
    src = {sid: (h, n, str(s)) for sid, h, n, s in zip(sample_ids, hashes, names, splits)}
    classes = parent.meta["class_names"]
    old = parent.manifest
    old_ids = set(old["sample_id"])
    # Where vanished pixels went: the same hash under an id the parent did not have.
    appeared: dict[str, list[str]] = {}
    for sid, (h, _, _) in src.items():
        if sid not in old_ids:
            appeared.setdefault(h, []).append(sid)
    problems: list[str] = []
    for sid, h, label, split in zip(old["sample_id"], old["sha256"], old["label"], old["split"]):
        name = classes[int(label)]
        cur = src.get(sid)
        if cur is None:
            moved = appeared.get(h, [])
            if moved:
                new_id = moved[0]
                new_name = src[new_id][1]
                if new_name == name:
                    problems.append(f"{sid}: vanished; looks like a rename of {sid} to {new_id} (same pixels)")
                else:
                    problems.append(f"{sid}: vanished; looks like a relabel of {sid} (class {name}) to {new_id} "
                                    f"(class {new_name}), same pixels")
            else:
                problems.append(f"{sid}: vanished from the source")
            continue
        ch, cname, csplit = cur
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


# ----------------------------------------------------------------------------- reading


def _snap_dir(store: Path) -> Path:
    return store / "snapshots"


def read_manifest(store_dir: str | Path, snapshot_id: str) -> pd.DataFrame:
    path = _snap_dir(Path(store_dir)) / f"{snapshot_id}.csv"
    if not path.is_file():
        raise StoreError(f"snapshot {snapshot_id} has no manifest at {path}: run the snapshot stage, or restore the store")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    if list(df.columns) != COLUMNS:
        raise IntegrityError(f"{path}: columns {list(df.columns)} are not the manifest columns {COLUMNS}")
    return df


def read_meta(store_dir: str | Path, snapshot_id: str) -> dict:
    path = _snap_dir(Path(store_dir)) / f"{snapshot_id}.json"
    if not path.is_file():
        raise StoreError(f"snapshot {snapshot_id} not found in {store_dir} (no {path}): run the snapshot stage")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc}): the store is damaged; restore it") from exc


def list_snapshots(store_dir: str | Path) -> list[dict]:
    """Metas of every complete snapshot (one whose meta exists), oldest first."""
    d = _snap_dir(Path(store_dir))
    if not d.is_dir():
        return []
    metas = []
    for p in d.glob("*.json"):
        if _HEX64.match(p.stem):
            try:
                metas.append(json.loads(p.read_text()))
            except ValueError:
                continue
    return sorted(metas, key=lambda m: (m.get("created", ""), m.get("n_rows", 0), m["id"]))


def _read_ref(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    ref = path.read_text().strip()
    if not _HEX64.match(ref):
        raise StoreError(f"{path} does not hold a snapshot id: the store is damaged; delete {path} to fall back on the history")
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
    head = _read_ref(store / "heads" / key)
    if head is not None:
        read_meta(store, head)  # a head naming a missing snapshot is a damaged store: say so
        return head
    same = [m for m in list_snapshots(store) if m.get("source", {}).get("key") == key]
    parents = {m.get("parent") for m in same}
    tips = [m["id"] for m in same if m["id"] not in parents]
    if len(tips) > 1:
        raise StoreError(f"{store / 'heads' / key} is missing and the history of {key} has {len(tips)} tips "
                         f"({', '.join(t[:12] for t in tips)}): restore heads/{key} from a backup "
                         f"(`dvc pull data/store`) or write the id of the snapshot to continue from into it")
    return tips[0] if tips else None


def load_parent(store_dir: str | Path, snapshot_id: str) -> Parent:
    return Parent(snapshot_id, read_manifest(store_dir, snapshot_id), read_meta(store_dir, snapshot_id))


def load_snapshot(store_dir: str | Path, snapshot_id: str, verify: bool = True) -> Snapshot:
    """Load a snapshot's manifest and pixels; `verify` re-hashes every row (IntegrityError on mismatch)."""
    store = Path(store_dir)
    meta = read_meta(store, snapshot_id)
    raw = read_manifest(store, snapshot_id)
    if verify and snapshot_id_of(raw) != snapshot_id:
        raise IntegrityError(f"{_snap_dir(store) / (snapshot_id + '.csv')}: the manifest does not hash to its id "
                             f"{snapshot_id}: it was edited; restore the store")
    manifest = raw.copy()
    manifest["label"] = manifest["label"].astype(np.int64)
    manifest["pack_index"] = manifest["pack_index"].astype(np.int64)
    shape = tuple(int(x) for x in meta["image_shape"])
    images = np.empty((len(manifest), *shape), dtype=np.uint8)
    # Group the rows by pack once (O(N) whatever the number of packs; a mask per pack was
    # N x packs and dominated loading at 1,000 packs).
    codes, pack_names = pd.factorize(manifest["pack"])
    index = manifest["pack_index"].to_numpy()
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(pack_names) + 1))
    for k, pack in enumerate(pack_names):
        rows = order[bounds[k]:bounds[k + 1]]
        path = store / "packs" / f"{pack}.npy"
        if not path.is_file():
            raise IntegrityError(f"pack {path} is missing (rows {_few(manifest['sample_id'].to_numpy()[rows])}): "
                                 "restore the store")
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise IntegrityError(f"pack {path} is unreadable ({exc}): restore the store") from exc
        if arr.dtype != np.uint8 or arr.shape[1:] != shape or index[rows].max() >= len(arr):
            raise IntegrityError(f"pack {path} holds {arr.dtype} {arr.shape}, not the rows the manifest expects: restore the store")
        images[rows] = arr[index[rows]]
    if verify:
        bad = [sid for sid, h, img in zip(manifest["sample_id"], manifest["sha256"], images) if sample_hash(img) != h]
        if bad:
            raise IntegrityError(f"{len(bad)} row(s) of snapshot {snapshot_id[:12]} do not match their sha256: "
                                 f"{_few(bad)}; the store was modified, restore it")
    return Snapshot(snapshot_id, manifest, images, list(meta["class_names"]), shape, meta)


def _few(ids, k: int = MAX_LISTED) -> str:
    ids = list(ids)
    return ", ".join(ids[:k]) + (f" ... and {len(ids) - k} more" if len(ids) > k else "")


# ----------------------------------------------------------------------------- writing


def write_if_changed(path: Path, data: bytes) -> bool:
    """Leave a file byte-identical (and its mtime alone) when its content would not change."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, data)
    return True


def write_snapshot(store_dir: str | Path, plan: Plan, source: dict, created: str) -> tuple[str, pd.DataFrame]:
    """Write a planned snapshot (pack, manifest, meta, heads); returns its id and final manifest."""
    store = Path(store_dir)
    manifest = plan.manifest.copy()
    new_rows = manifest["snapshot_id"] == ""
    if plan.n_new:
        buf = io.BytesIO()
        np.save(buf, plan.new_images, allow_pickle=False)
        data = buf.getvalue()
        pack = hashlib.sha256(data).hexdigest()
        ppath = store / "packs" / f"{pack}.npy"
        if not ppath.is_file():  # content-addressed: an existing file already holds these bytes
            atomic_write(ppath, data)
        manifest.loc[new_rows, "pack"] = pack
    sid = snapshot_id_of(manifest)
    manifest.loc[new_rows, "snapshot_id"] = sid
    atomic_write(_snap_dir(store) / f"{sid}.csv", manifest_csv(manifest))
    meta = {
        "id": sid,
        "parent": plan.parent,
        "created": created,
        "source": source,
        "class_names": plan.class_names,
        "image_shape": list(plan.image_shape),
        "n_rows": int(len(manifest)),
        "n_new": plan.n_new,
        "counts": stats.counts(manifest, plan.class_names),
    }
    atomic_write(_snap_dir(store) / f"{sid}.json", (json.dumps(meta, indent=2) + "\n").encode())
    set_head(store, source["key"], sid)
    return sid, manifest


def set_head(store_dir: str | Path, key: str, snapshot_id: str) -> None:
    write_if_changed(Path(store_dir) / "heads" / key, (snapshot_id + "\n").encode())
