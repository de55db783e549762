"""poison stage: write the training view (a transformation record over the snapshot).

    python -m pipeline.poison --params params.yaml --pointer data/snapshot.json \
        --store data/store --quarantine data/quarantine.json --twin models/twin.safetensors \
        --twin-report reports/twin.json --out data/view

Only the snapshot's train split is touched; the raw store is never written. ``attack.name: none``
writes an identity view (view.json + a header-only records.csv), not a copy of the data; without
a quarantine it holds no row (:func:`identity_view` from the header; ``store.verify_files`` hashes
the manifest files and checks their rows a batch at a time, and checks the pixel files' shapes),
so its memory does not grow with the rows.
``remedy=quarantine`` also leaves the rows of the quarantine record out of the view (checked
against the snapshot's ancestry, this view and each row's hash: ``pipeline.remedy``); with any
other remedy the record is not read.

``attack.name: clean_label`` crafts its poison against a model (``pipeline.core.clean_label``):
with ``attack.craft_model: auto`` the registry's champion (downloaded and digest-checked, as
evaluate loads it) when there is one, else the clean twin (``--twin``, digest-checked against
``--twin-report`` and refused when trained on another snapshot); ``twin`` always uses the twin.
The view's attack names the crafting model (kind, digest, version), so the view_id covers it.
The champion lives outside DVC: promoting a new one does not re-run this stage by itself.
Labels stay true; each row's perturbation and norms are in its record (``pipeline.data.view``).
Feature collision's target test instances are named in the view's attack (``targets``).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import stage
from pipeline.core.attacks import poison_records, resolve_attack
from pipeline.data import store
from pipeline.data.view import build_view, clean_label_records, parse_records, row_positions, write_view
from pipeline.schema import AttackConfig, Config, as_dict

PATHS = (
    stage.PathArg("pointer", "the current snapshot's pointer (data/snapshot.json)"),
    stage.PathArg("store", "the snapshot store (data/store)"),
    stage.PathArg("quarantine", "the quarantine record, read with remedy=quarantine (data/quarantine.json)",
                  required=False, default="data/quarantine.json"),
    stage.PathArg("twin", "the clean twin checkpoint, clean_label's crafting model without a champion "
                  "(models/twin.safetensors)", required=False, default="models/twin.safetensors"),
    stage.PathArg("twin_report", "the twin's report with its digest (reports/twin.json)", required=False,
                  default="reports/twin.json"),
    stage.PathArg("out", "the view folder to write (data/view)"),
)
_say = partial(stage.say, "poison")


class PoisonError(stage.UserError):
    """The poison stage cannot build the view as configured (the message says what to run)."""


def clean_label_view(snapshot, spec: dict, model, crafted_by: dict, device: str = "cpu") -> tuple[dict, list[dict], dict]:
    """``(resolved attack, view records, crafting info)`` of a clean-label attack on a snapshot.

    Reads only the rows the crafting uses (issue 19 item 3): the train rows of the class it
    poisons and, for feature collision, the test rows of its target instances' class; each is
    checked against its manifest sha256 as it is read (a lazy snapshot's packs are not hashed).
    Both methods draw their rows within those classes, so the records are the ones a craft over
    whole splits would give."""
    from pipeline.core.clean_label import craft, resolve_clean_label
    from pipeline.data.rows import take

    resolved = resolve_clean_label(spec, snapshot.class_names, tuple(snapshot.image_shape))
    resolved["craft_model"] = dict(crafted_by)
    man = snapshot.manifest
    labels = snapshot.labels

    def rows_of(name: str, cls: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        idx = np.flatnonzero((man["split"] == name).to_numpy(bool) & (labels == cls))
        images = np.asarray(take(snapshot.images, idx))
        # strings for the rows read only: every row's split, id and hash as Python strings held +283 MiB at
        # 1.01M rows while the crafting ran (bench/results/clean_label_rows_1m.log)
        ids = man["sample_id"].iloc[idx].astype(str).tolist()
        store.check_rows(images, np.arange(len(idx)), ids, man["sha256"].iloc[idx].astype(str).tolist())
        return images, labels[idx], ids

    images, train_labels, train_ids = rows_of("train", resolved["target"])
    test = rows_of("test", resolved["source"]) if resolved["method"] == "feature_collision" else (None, None, None)
    result, targets = craft(model, images, train_labels, train_ids, resolved, *test, device=device)
    if resolved["method"] == "feature_collision":
        resolved["targets"] = [{"sample_id": t["sample_id"], "sha256": t["sha256"]} for t in targets]
    return resolved, clean_label_records(result.records), result.info


def identity_view(snapshot_id: str, snapshot_meta: dict) -> tuple[dict, bytes]:
    """Pure: the view of no attack and no quarantine, ``(view.json dict, records.csv bytes)``: it
    names the snapshot (and copies its transform for reviewers) and holds no record, so it needs
    the snapshot's header only, not a row (issue 19 item 3)."""
    meta, data = build_view(snapshot_id, {"name": "none"}, [])
    transform = (snapshot_meta.get("source") or {}).get("transform")
    if transform:  # the resize the rows went through: bound through snapshot_id, copied for reviewers
        meta["transform"] = transform
    return meta, data


def quarantine_view(snapshot_id: str, snapshot_meta: dict, record: dict, ancestry: list[str],
                    ids: list[str], hashes: list[str]) -> tuple[dict, bytes]:
    """Pure: the view of no attack less the rows of a quarantine ``record`` (``make_view``'s, for
    that case), from the train rows the record names as the store holds them (``ids`` and
    ``hashes``: a row each, found in ``store.verify_files``' pass), not from every row (issue 19
    item 3: the loaded path held the train split's identity columns, 439 MiB peak at 1M rows against
    157, bench/results/poison_quarantine_stream_1m.log)."""
    from pipeline import remedy

    base, _ = identity_view(snapshot_id, snapshot_meta)
    if len(set(ids)) != len(ids):
        raise store.IntegrityError(f"snapshot {snapshot_id[:12]} holds a quarantined row twice: the store's history "
                                   "is not one a load accepts; `python -m pipeline.data.store verify` names it")
    remedy.quarantined_rows(record, snapshot_id=snapshot_id, ancestry=ancestry, base_view_id=base["view_id"],
                            sample_ids=ids, hashes=hashes)
    meta, data = build_view(snapshot_id, {"name": "none"}, [], quarantine=remedy.view_spec(record))
    if "transform" in base:
        meta["transform"] = base["transform"]
    return meta, data


def make_view(snapshot, attack_cfg: AttackConfig, record: Optional[dict] = None,
              ancestry: Optional[list[str]] = None, model=None, crafted_by: Optional[dict] = None,
              device: str = "cpu") -> tuple[dict, bytes]:
    """Pure: ``(view.json dict, records.csv bytes)`` for a loaded snapshot and an attack config,
    less the rows of a verified quarantine ``record`` (``ancestry``: the snapshot's chain ids).
    ``model``/``crafted_by``: clean_label's crafting model and its identity (kind, digest)."""
    spec = as_dict(attack_cfg)
    if spec.get("name", "none") == "none" and record is None:
        return identity_view(snapshot.id, snapshot.meta)
    images, labels, ids = snapshot.split_rows("train")
    info = None
    if spec.get("name") == "clean_label":
        if model is None:
            raise PoisonError("attack clean_label needs a crafting model (the champion or the clean twin)")
        resolved, records, info = clean_label_view(snapshot, spec, model, crafted_by or {}, device)
    else:
        resolved = resolve_attack(spec, snapshot.class_names, images.shape[1:])
        records = poison_records(images, labels, ids, spec, snapshot.class_names)
    meta, data = build_view(snapshot.id, resolved, records)
    if info is not None:
        meta["crafting"] = info  # diagnostics (seconds, losses/distances): outside the view_id
    transform = (snapshot.meta.get("source") or {}).get("transform")
    if transform:  # the resize the rows went through: bound through snapshot_id, copied for reviewers
        meta["transform"] = transform
    if record is None:
        return meta, data
    from pipeline import remedy

    man = snapshot.manifest
    after = {r["sample_id"]: r["sha256_after"] for r in records}
    stored = man.loc[(man["split"] == "train").to_numpy(), "sha256"].array  # by position
    hashes = _ViewHashes(stored, {i: after[s] for s, i in row_positions(ids, list(after)).items()})
    remedy.quarantined_rows(record, snapshot_id=snapshot.id, ancestry=ancestry or [snapshot.id],
                            base_view_id=meta["view_id"], sample_ids=ids, hashes=hashes)
    qmeta, qdata = build_view(snapshot.id, resolved, records, quarantine=remedy.view_spec(record))
    if info is not None:
        qmeta["crafting"] = info
    if transform:
        qmeta["transform"] = transform
    return qmeta, qdata


class _ViewHashes:
    """Each train row's sha256 as the view holds it, by position: a record's ``sha256_after`` for
    a row the attack changed, else the manifest's. Read on demand: a list of every row's hash as
    Python strings held ~90 MB at 808k train rows on each quarantined view (issue 19 item 3)."""

    def __init__(self, stored, changed: dict[int, str]):
        self._stored, self._changed = stored, changed

    def __len__(self) -> int:
        return len(self._stored)

    def __getitem__(self, i: int) -> str:
        h = self._changed.get(int(i))
        return h if h is not None else str(self._stored[int(i)])


def crafting_model(cfg: Config, args: argparse.Namespace, snapshot_id: str, class_names: list[str]):
    """``(model, identity)``: the champion (``craft_model: auto`` and one exists), else the twin.

    Both loads are digest-checked before a byte is read (registry tag / reports/twin.json); the
    twin must be of the current snapshot and the champion must have the snapshot's classes."""
    from pipeline import checkpoints
    from pipeline.io import read_json
    from pipeline.lineage import require_lineage

    if cfg.attack.craft_model == "auto":
        from pipeline.schema import model_name
        from pipeline.tracking import registry, runs

        client = runs.client()
        name = model_name(cfg)
        mv = registry.champion(client, name)
        if mv is not None:
            model, header = registry.load_version(client, name, str(mv.version))
            if [str(c) for c in header.get("class_names") or []] != [str(c) for c in class_names]:
                raise PoisonError(f"the champion {name} v{mv.version} has classes {header.get('class_names')}, the "
                                  f"snapshot {class_names}: craft against the twin (attack.craft_model=twin)")
            return model, {"kind": "champion", "model_version": str(mv.version),
                           "checkpoint_sha256": (mv.tags or {}).get(registry.TAG_SHA)}
    tp, rp = Path(args.twin), Path(args.twin_report)
    if not tp.is_file() or not rp.is_file():
        raise PoisonError(f"{tp} or {rp} not found: clean_label crafts against the clean twin; run `dvc repro twin`")
    report = read_json(rp)
    require_lineage(report, {"snapshot_id": snapshot_id}, what=f"the twin ({rp})", against="the current snapshot",
                    fix="re-run `dvc repro twin`", fields=("snapshot_id",))
    model, _ = checkpoints.load_verified(tp, report.get("checkpoint_sha256"), f"{rp}")
    return model, {"kind": "twin", "model_version": None, "checkpoint_sha256": report["checkpoint_sha256"]}


def run(cfg: Config, args: argparse.Namespace) -> dict:
    stage.map_heap("poison", cfg.data.heap_map_mib)
    ptr = store.read_pointer(args.pointer)
    if cfg.attack.name == "none":
        # No attack (a production run): the view names the snapshot and holds no row, so no
        # manifest row is loaded and memory does not grow with the rows (issue 19 item 3). The
        # manifest files are hashed and their rows checked a batch at a time, as the load below
        # checks them (a damaged or sloppily forged store fails here), except that no id is
        # ingested twice (validate, twin and train load the rows and check it); the pixels are not
        # read, so the packs are only checked for their shape, as below. A quarantine's rows are
        # found in the same pass: only they are kept.
        from pipeline import remedy

        record = remedy.read_record(args.quarantine) if cfg.remedy.name == "quarantine" else None
        named = pa.array([r["sample_id"] for r in (record or {}).get("rows") or []], pa.string())
        ids: list[str] = []
        hashes: list[str] = []

        def each(batch: pa.RecordBatch) -> None:  # the train rows the record names
            hit = pc.and_(pc.equal(batch.column("split"), "train"),
                          pc.is_in(batch.column("sample_id"), value_set=named))
            if pc.any(hit).as_py():
                rows = batch.filter(hit)
                ids.extend(rows.column("sample_id").to_pylist())
                hashes.extend(rows.column("sha256").to_pylist())

        whole, headers = store.verify_files(args.store, ptr["snapshot_id"], hash_packs=False,
                                            each_rows=each if record is not None and len(named) else None)
        meta, data = identity_view(ptr["snapshot_id"], headers[-1])
        what = "identity view (no attack)"
        if record is not None:
            meta, data = quarantine_view(ptr["snapshot_id"], headers[-1], record, [h["id"] for h in whole],
                                         ids, hashes)
            what += f"; {meta['n_quarantined']} row(s) quarantined (record {record['digest'][:12]})"
        write_view(Path(args.out), meta, data)
        _say(f"view {meta['view_id'][:12]} over snapshot {meta['snapshot_id'][:12]}: {what}")
        return meta
    # Every attack reads only the rows it uses (issue 19 item 3): lazy rows, packs not hashed
    # whole, and each row read is checked against its manifest sha256 before the view is written
    # (clean_label checks the classes it crafts over as it reads them: clean_label_view).
    # The manifest's identity columns only (the load adds sample_id, sha256, label and the pack
    # columns): provenance and file columns were ~240 MiB at 1M rows that no attack reads.
    # split and pack as categoricals (a small code a row, not a string: ~65 MiB of pack names alone
    # at 1M rows, bench/results/poison_categorical_1m.log)
    snap = store.load_snapshot(args.store, ptr["snapshot_id"], verify=True, lazy=True, hash_packs=False,
                               columns=("split",), categorical=True)
    # the load's freed buffers were what data.heap_map_mib returns to the OS; clean_label's crafting
    # (torch passes) after it would only pay for mapping each block afresh (stage.relax_heap)
    stage.relax_heap()
    record = ancestry = None
    if cfg.remedy.name == "quarantine":
        from pipeline import remedy

        record = remedy.read_record(args.quarantine)
        ancestry = [h["id"] for h in store.chain(args.store, snap.id)]
    model = crafted_by = None
    if cfg.attack.name == "clean_label":
        model, crafted_by = crafting_model(cfg, args, snap.id, [str(c) for c in snap.class_names])
        _say(f"crafting {cfg.attack.method} against the {crafted_by['kind']} "
             f"({(crafted_by['checkpoint_sha256'] or '')[:12]})")
    device = cfg.train.device
    meta, data = make_view(snap, cfg.attack, record, ancestry, model, crafted_by, device)
    man = snap.manifest
    read = {r["sample_id"] for r in parse_records(data)}  # the rows the attack poisoned
    # the columns by position, not lists of every row's strings (~185 MiB at 1M rows, issue 19 item 3)
    store.check_rows(snap.images, np.flatnonzero(man["sample_id"].astype(str).isin(read).to_numpy()),
                     man["sample_id"].array, man["sha256"].array)
    write_view(Path(args.out), meta, data)
    a = meta["attack"]
    if a["name"] == "clean_label":
        c = meta["crafting"]
        what = (f"clean_label {a['method']}: {meta['n_poisoned']} train row(s) of class "
                f"{snap.class_names[a['target']]} perturbed within eps {a['eps']:g}, labels kept"
                + (f", {len(a['targets'])} target(s) of class {snap.class_names[a['source']]}" if a.get("targets") else "")
                + f" ({c['seconds']:.1f} s)")
    elif a["name"] == "none":
        what = "identity view (no attack)"
    else:
        what = (
        f"{a['name']}: {meta['n_poisoned']} train row(s) of "
        f"{'class ' + snap.class_names[a['source']] if a['source'] is not None else 'every non-target class'}"
        f" -> {snap.class_names[a['target']]}"
    )
    if record is not None:
        what += f"; {meta['n_quarantined']} row(s) quarantined (record {record['digest'][:12]})"
    _say(f"view {meta['view_id'][:12]} over snapshot {meta['snapshot_id'][:12]}: {what}")
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("poison", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
