"""poison stage: write the training view (a transformation record over the snapshot).

    python -m pipeline.poison --params params.yaml --pointer data/snapshot.json \
        --store data/store --quarantine data/quarantine.json --out data/view

Only the snapshot's train split is touched; the raw store is never written. ``attack.name: none``
writes an identity view (view.json + a header-only records.csv), not a copy of the data.
``remedy=quarantine`` also leaves the rows of the quarantine record out of the view (checked
against the snapshot's ancestry, this view and each row's hash: ``pipeline.remedy``); with any
other remedy the record is not read.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Optional

from pipeline import stage
from pipeline.core.attacks import poison, resolve_attack
from pipeline.data import store
from pipeline.data.view import build_view, write_view
from pipeline.schema import AttackConfig, Config, as_dict

PATHS = (
    stage.PathArg("pointer", "the current snapshot's pointer (data/snapshot.json)"),
    stage.PathArg("store", "the snapshot store (data/store)"),
    stage.PathArg("quarantine", "the quarantine record, read with remedy=quarantine (data/quarantine.json)",
                  required=False, default="data/quarantine.json"),
    stage.PathArg("out", "the view folder to write (data/view)"),
)
_say = partial(stage.say, "poison")


def make_view(snapshot, attack_cfg: AttackConfig, record: Optional[dict] = None,
              ancestry: Optional[list[str]] = None) -> tuple[dict, bytes]:
    """Pure: ``(view.json dict, records.csv bytes)`` for a loaded snapshot and an attack config,
    less the rows of a verified quarantine ``record`` (``ancestry``: the snapshot's chain ids)."""
    spec = as_dict(attack_cfg)
    images, labels, ids = snapshot.split("train")
    resolved = resolve_attack(spec, snapshot.class_names, images.shape[1:])
    _, _, records = poison(images, labels, list(ids), spec, snapshot.class_names)
    meta, data = build_view(snapshot.id, resolved, records)
    if record is None:
        return meta, data
    from pipeline import remedy

    man = snapshot.manifest
    after = {r["sample_id"]: r["sha256_after"] for r in records}
    hashes = [after.get(str(i), str(h)) for i, h in zip(ids, man.loc[(man["split"] == "train").to_numpy(), "sha256"])]
    remedy.quarantined_rows(record, snapshot_id=snapshot.id, ancestry=ancestry or [snapshot.id],
                            base_view_id=meta["view_id"], sample_ids=[str(i) for i in ids], hashes=hashes)
    return build_view(snapshot.id, resolved, records, quarantine=remedy.view_spec(record))


def run(cfg: Config, args: argparse.Namespace) -> dict:
    ptr = store.read_pointer(args.pointer)
    snap = store.load_snapshot(args.store, ptr["snapshot_id"], verify=True)
    record = ancestry = None
    if cfg.remedy.name == "quarantine":
        from pipeline import remedy

        record = remedy.read_record(args.quarantine)
        ancestry = [h["id"] for h in store.chain(args.store, snap.id)]
    meta, data = make_view(snap, cfg.attack, record, ancestry)
    write_view(Path(args.out), meta, data)
    a = meta["attack"]
    what = "identity view (no attack)" if a["name"] == "none" else (
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
