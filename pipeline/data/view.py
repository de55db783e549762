"""The training view: a transformation record over a snapshot, never a copy of the data.

``data/view/view.json``: ``{view_id, snapshot_id, attack, n_poisoned, records: "records.csv"}``;
``records.csv``: ``sample_id, original_label, new_label, transform, sha256_after`` (one row per
poisoned train row; ``transform`` is the JSON trigger spec with a concrete location, ``""`` for a
pure label flip). ``view_id`` = sha256 of snapshot_id + records CSV bytes + the canonical JSON of
the resolved attack spec, so any edit of a record, the attack or the snapshot changes it.

Clean-label views (``attack.name: clean_label``) keep every label (``new_label == original_label``)
and store each row's pixel perturbation in its record: the transform holds ``delta`` (base64 of the
int16 ``after - before``, little-endian, C order), ``shape``, the method's parameters, and the
row's ``linf``/``l2`` (and ``adv_linf``/``adv_l2``, the adversarial part alone, for
label-consistent). Being in records.csv, the perturbation is inside the view_id like every other
record: an edited perturbation is refused on load (view_id), and a perturbation that does not
rebuild the recorded row, or whose norms differ from the recorded ones, too (IntegrityError).
A row is then rebuilt as ``before + delta`` (a delta leaving 0..255 is refused, never clipped).

A quarantined view (``remedy=quarantine``, ``pipeline.remedy``) also carries ``quarantine:
{record_sha256, snapshot_id, view_id, rows: [{sample_id, sha256}]}``: those train rows are left
out of the view (after the records are applied, each checked against its sha256). The quarantine
enters the view_id only when present, so every other view keeps its id.

:func:`load_training_view` rebuilds the training arrays from the store: it loads the snapshot's
train split (every row re-hashed against the manifest by the store), re-applies each record's
transform, and checks each poisoned row against ``sha256_after``. Nothing is imported from torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import heap
from pipeline.core.attacks import apply_trigger
from pipeline.core.hashing import sample_hash
from pipeline.data.rows import take_strings
from pipeline.data.store import IntegrityError
from pipeline.io import atomic_write_bytes, write_json
from pipeline.errors import UserError

RECORD_COLUMNS = ("sample_id", "original_label", "new_label", "transform", "sha256_after")
VIEW_FILE = "view.json"
RECORDS_FILE = "records.csv"


class ViewError(UserError):
    """A training view that is missing or malformed (the message says what to re-run)."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


CLEAN_LABEL_NORM_KEYS = ("linf", "l2", "adv_linf", "adv_l2")


def encode_delta(delta: np.ndarray) -> str:
    import base64

    return base64.b64encode(np.ascontiguousarray(delta, dtype="<i2").tobytes()).decode("ascii")


def decode_delta(transform: dict, image_shape: Sequence[int]) -> np.ndarray:
    """The int16 perturbation of a clean-label record (shape checked against the image's)."""
    import base64
    import binascii

    shape = tuple(int(v) for v in transform.get("shape") or ())
    if shape != tuple(image_shape):
        raise IntegrityError(f"a clean-label perturbation has shape {shape}, the images {tuple(image_shape)}; "
                             "re-run the poison stage")
    try:
        raw = base64.b64decode(transform["delta"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise IntegrityError("a clean-label perturbation is not valid base64; re-run the poison stage") from None
    if len(raw) != 2 * int(np.prod(shape)):
        raise IntegrityError(f"a clean-label perturbation has {len(raw)} bytes, expected {2 * int(np.prod(shape))}")
    return np.frombuffer(raw, dtype="<i2").reshape(shape).astype(np.int16)


def _norms(delta: np.ndarray) -> tuple[float, float]:
    d = np.asarray(delta, np.float64)
    return float(np.abs(d).max(initial=0.0)), float(np.sqrt(np.square(d).sum()))


def clean_label_records(records: Sequence[dict]) -> list[dict]:
    """Records of ``core.clean_label`` (an ndarray ``perturbation`` and norms per row) as view
    records: the perturbation and norms go into the transform, which the view_id covers."""
    out = []
    for r in records:
        delta = np.asarray(r["perturbation"], np.int16)
        t = dict(r["transform"] or {})
        t.pop("delta_index", None)
        t.update({"delta": encode_delta(delta), "shape": list(delta.shape)})
        for k in CLEAN_LABEL_NORM_KEYS:
            if k in r:
                t[k] = round(float(r[k]), 6)
        out.append({"sample_id": str(r["sample_id"]), "original_label": int(r["original_label"]),
                    "new_label": int(r["new_label"]), "transform": t, "sha256_after": r["sha256_after"]})
    return out


def perturbations(records: Sequence[dict], image_shape: Sequence[int]) -> np.ndarray:
    """(k, H, W, C) int16: the clean-label perturbations of ``records`` in record order."""
    deltas = [decode_delta(r["transform"], image_shape) for r in records if r.get("transform") and "delta" in r["transform"]]
    return np.stack(deltas) if deltas else np.zeros((0, *image_shape), np.int16)


def _apply_delta(image: np.ndarray, r: dict) -> np.ndarray:
    t = r["transform"]
    delta = decode_delta(t, image.shape)
    if int(r["new_label"]) != int(r["original_label"]):
        raise IntegrityError(f"clean-label record {r['sample_id']!r} changes the label "
                             f"({r['original_label']} -> {r['new_label']}); re-run the poison stage")
    linf, l2 = _norms(delta)
    if abs(linf - float(t.get("linf", -1))) > 1e-3 or abs(l2 - float(t.get("l2", -1))) > 1e-3:
        raise IntegrityError(f"clean-label record {r['sample_id']!r}: its perturbation has L-inf {linf:g} / L2 {l2:.3f}, "
                             f"the record says {t.get('linf')} / {t.get('l2')}; re-run the poison stage")
    new = image.astype(np.int16) + delta
    if new.min() < 0 or new.max() > 255:
        raise IntegrityError(f"clean-label record {r['sample_id']!r}: its perturbation takes pixels outside 0..255 "
                             "(it does not belong to this row); re-run the poison stage")
    return new.astype(np.uint8)


def records_csv(records: Sequence[dict]) -> bytes:
    """The records as CSV bytes (fixed column order, ``\\n`` line ends, canonical JSON transforms)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RECORD_COLUMNS)
    for r in records:
        t = r.get("transform")
        w.writerow([
            r["sample_id"],
            int(r["original_label"]),
            int(r["new_label"]),
            "" if not t else (t if isinstance(t, str) else canonical_json(t)),
            r["sha256_after"],
        ])
    return buf.getvalue().encode()


def parse_records(data: bytes) -> list[dict]:
    """Inverse of :func:`records_csv` (transform as a dict, or None for a pure flip)."""
    rows = list(csv.reader(io.StringIO(data.decode())))
    if not rows or tuple(rows[0]) != RECORD_COLUMNS:
        raise ViewError(f"records.csv must start with the header {','.join(RECORD_COLUMNS)}")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(RECORD_COLUMNS):
            raise ViewError(f"records.csv line {n} has {len(row)} fields, expected {len(RECORD_COLUMNS)}")
        sid, orig, new, transform, after = row
        out.append({
            "sample_id": sid,
            "original_label": int(orig),
            "new_label": int(new),
            "transform": json.loads(transform) if transform else None,
            "sha256_after": after,
        })
    return out


def compute_view_id(snapshot_id: str, records_bytes: bytes, attack: dict, quarantine: Optional[dict] = None) -> str:
    h = hashlib.sha256()
    h.update(snapshot_id.encode())
    h.update(records_bytes)
    h.update(canonical_json(attack).encode())
    if quarantine is not None:
        h.update(b"|quarantine|" + canonical_json(quarantine).encode())
    return h.hexdigest()


def build_view(snapshot_id: str, attack: dict, records: Sequence[dict],
               quarantine: Optional[dict] = None) -> tuple[dict, bytes]:
    """``(view.json dict, records.csv bytes)`` for a resolved attack and its records (and the
    rows a quarantine record leaves out, ``pipeline.remedy.view_spec``)."""
    data = records_csv(records)
    meta = {
        "view_id": compute_view_id(snapshot_id, data, attack, quarantine),
        "snapshot_id": snapshot_id,
        "attack": attack,
        "n_poisoned": len(records),
        "records": RECORDS_FILE,
    }
    if quarantine is not None:
        meta["quarantine"] = quarantine
        meta["n_quarantined"] = len(quarantine["rows"])
    return meta, data


def write_view(view_dir: str | Path, meta: dict, records_bytes: bytes) -> None:
    """Write records.csv then view.json, each atomically (view.json last: it names the records)."""
    view_dir = Path(view_dir)
    view_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(view_dir / RECORDS_FILE, records_bytes)
    write_json(view_dir / VIEW_FILE, meta)


def read_view(view_dir: str | Path) -> tuple[dict, list[dict]]:
    """``(view.json, records)``; the view_id is recomputed and must match (else IntegrityError)."""
    view_dir = Path(view_dir)
    vj = view_dir / VIEW_FILE
    if not vj.is_file():
        raise ViewError(f"{vj} not found: run the poison stage (`dvc repro poison`)")
    try:
        meta = json.loads(vj.read_text())
    except json.JSONDecodeError as exc:
        raise ViewError(f"{vj} is not valid JSON: {exc}; re-run the poison stage") from None
    for key in ("view_id", "snapshot_id", "attack", "records"):
        if key not in meta:
            raise ViewError(f"{vj} lacks {key!r}: re-run the poison stage")
    rp = view_dir / meta["records"]
    if not rp.is_file():
        raise ViewError(f"{rp} not found: re-run the poison stage")
    data = rp.read_bytes()
    expect = compute_view_id(meta["snapshot_id"], data, meta["attack"], meta.get("quarantine"))
    if expect != meta["view_id"]:
        raise IntegrityError(
            f"training view {view_dir} was edited: view_id {meta['view_id'][:12]} does not match its "
            f"records/attack/snapshot ({expect[:12]}); re-run the poison stage"
        )
    return meta, parse_records(data)


def row_positions(sample_ids, wanted: Sequence[Any]) -> dict[str, int]:
    """``{id: its row in sample_ids}`` for each id of ``wanted`` found there (as ``str``; an id
    there twice: its last row, as a dict of every row gave).

    ``sample_ids``: a list, an array, a pandas column or an Arrow (chunked) array. Arrow's
    ``is_in`` against the few wanted ids, not a dict of every row: at 808k train ids that dict held
    ~60 MB of Python objects on every view applied, with or without records (issue 19 item 3)."""
    want = list(dict.fromkeys(str(w) for w in wanted))
    if not want:
        return {}
    try:
        col = sample_ids if isinstance(sample_ids, (pa.Array, pa.ChunkedArray)) else pa.array(sample_ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed kinds
        col = None
    if col is None or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        # ids that are not all strings (ints, floats, None): each one's str(), as the dict of every
        # row gave; a stored manifest's ids are always strings, so this is for in-memory callers
        col = pa.array([str(s) for s in sample_ids], pa.string())
    col = col.cast(pa.string()) if col.type != pa.string() else col
    hit = np.flatnonzero(pc.is_in(col, value_set=pa.array(want, pa.string())).to_numpy(zero_copy_only=False))
    return {s: int(i) for s, i in zip(take_strings(col, hit).to_pylist(), hit)}


def apply_records(
    images: np.ndarray, labels: np.ndarray, sample_ids: Any, records: Sequence[dict], verify: bool = True
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Re-apply ``records`` to train arrays; return ``(images, labels, poisoned row indices)``.

    ``sample_ids``: one per row, any kind :func:`row_positions` takes (a list, an array, a pandas
    or Arrow column). Raises ``store.IntegrityError`` when a record names an unknown row, disagrees with the
    row's original label, or (``verify``) the rebuilt row does not hash to ``sha256_after``.
    """
    index = row_positions(sample_ids, [r["sample_id"] for r in records])
    lazy = hasattr(images, "with_rows")  # a rows.LazyRows: the changed rows go in as replacements
    images = images if lazy else images.copy()
    updates: dict[int, np.ndarray] = {}
    labels = np.asarray(labels, np.int64).copy()
    rows: list[int] = []
    bad: list[str] = []
    for r in records:
        i = index.get(r["sample_id"])
        if i is None:
            raise IntegrityError(f"view record {r['sample_id']!r} is not a train row of the snapshot; re-run the poison stage")
        if int(labels[i]) != int(r["original_label"]):
            raise IntegrityError(
                f"view record {r['sample_id']!r} says original label {r['original_label']}, the snapshot says {int(labels[i])}"
            )
        img = updates[i] if i in updates else images[i]
        if r["transform"] and "delta" in r["transform"]:  # clean-label: before + stored perturbation
            img = _apply_delta(img, r)
        elif r["transform"]:
            img = apply_trigger(img[None], r["transform"])[0]
        if lazy:
            if r["transform"] or i in updates:  # a pure label flip leaves the pack's pixels as they are
                updates[i] = img
        else:
            images[i] = img
        labels[i] = int(r["new_label"])
        if verify and sample_hash(img) != r["sha256_after"]:
            bad.append(r["sample_id"])
        rows.append(i)
    if bad:
        raise IntegrityError(
            f"{len(bad)} poisoned row(s) do not hash to their recorded sha256_after: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}"
        )
    return (images.with_rows(updates) if lazy and updates else images), labels, rows


def quarantined_ids(quarantine: Optional[dict]) -> set[str]:
    return {str(r["sample_id"]) for r in (quarantine or {}).get("rows") or []}


def drop_quarantined(images: np.ndarray, labels: np.ndarray, sample_ids: Sequence[str], poisoned_rows: Sequence[int],
                     quarantine: Optional[dict], verify: bool = True
                     ) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    """The train arrays without the quarantined rows (``poisoned_rows`` re-indexed). Each one must
    be a row of the view and (``verify``) hash to the sha256 the record names (IntegrityError)."""
    if not quarantine:
        return images, labels, [str(s) for s in sample_ids], list(poisoned_rows)
    index = row_positions(sample_ids, [r["sample_id"] for r in quarantine["rows"]])  # not a dict of every row
    drop = np.zeros(len(sample_ids), bool)
    bad = []
    for r in quarantine["rows"]:
        i = index.get(str(r["sample_id"]))
        if i is None or (verify and sample_hash(images[i]) != r["sha256"]):
            bad.append(str(r["sample_id"]))
            continue
        drop[i] = True
    if bad:
        raise IntegrityError(f"{len(bad)} quarantined row(s) are not in the view or do not hash to their recorded "
                             f"sha256: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; re-run the poison stage")
    keep = np.flatnonzero(~drop)
    new_index = -np.ones(len(sample_ids), np.int64)
    new_index[keep] = np.arange(len(keep))
    poisoned = [int(new_index[i]) for i in poisoned_rows if not drop[i]]
    from pipeline.data.rows import take

    return take(images, keep), np.asarray(labels)[keep], [str(sample_ids[i]) for i in keep], poisoned


def rows_kept(snap, ids: set[str]) -> np.ndarray:
    """The boolean mask of ``snap``'s rows that are not in ``ids``."""
    return ~snap.manifest["sample_id"].astype(str).isin(ids).to_numpy()


def without_rows(snap, ids: set[str], keep: Optional[np.ndarray] = None):
    """A ``store.Snapshot`` less the rows ``ids`` (the data gate measures a quarantined view so).
    ``keep``: :func:`rows_kept` of ``ids`` when the caller has it (it masks other columns too)."""
    if not ids:
        return snap
    import dataclasses

    from pipeline.data.rows import take

    keep = rows_kept(snap, ids) if keep is None else keep
    return dataclasses.replace(snap, manifest=snap.manifest[keep].reset_index(drop=True), images=take(snap.images, keep))


@dataclass
class TrainingView:
    images: np.ndarray
    labels: np.ndarray
    sample_ids: list[str]
    view_id: str
    snapshot_id: str
    class_names: list[str]
    attack: dict
    poisoned_rows: list[int] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    quarantine: Optional[dict] = None  # view.json's quarantine (rows left out), None when none


def load_training_view(view_dir: str | Path, store_dir: str | Path, verify: bool = True,
                       lazy: bool = False) -> TrainingView:
    """The train split of the view's snapshot with the view's records re-applied (see module doc).

    ``lazy``: ``images`` is a :class:`pipeline.data.rows.LazyRows` over the store's packs (only
    the rows the records change are held in memory); pixels are read when the trainer asks."""
    from pipeline.data import store

    meta, records = read_view(view_dir)
    # the train split's rows and the columns they need: the whole manifest was ~1/3 of the train
    # stage's peak at 1M rows (issue 19 item 3; bench/results/read_split_rows.log)
    snap = store.load_snapshot(store_dir, meta["snapshot_id"], verify=verify, lazy=lazy, columns=("split",),
                               split="train")
    images, labels, ids = snap.split("train")
    class_names = list(snap.class_names)
    del snap
    images, labels, rows = apply_records(images, labels, list(ids), records, verify=verify)
    quarantine = meta.get("quarantine")
    images, labels, ids, rows = drop_quarantined(images, labels, list(ids), rows, quarantine, verify=verify)
    # the manifest's load is freed; glibc would keep it resident through training (+236-278 ->
    # +59-70 MiB kept after a 1M-row load, bench/results/train_view_load_1m.log)
    heap.release()
    return TrainingView(
        images=images,
        labels=labels,
        sample_ids=[str(s) for s in ids],
        view_id=meta["view_id"],
        snapshot_id=meta["snapshot_id"],
        class_names=class_names,
        attack=meta["attack"],
        poisoned_rows=rows,
        records=records,
        quarantine=quarantine,
    )
