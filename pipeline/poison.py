"""poison stage: write the training view (a transformation record over the snapshot).

    python -m pipeline.poison --params params.yaml --pointer data/snapshot.json \
        --store data/store --out data/view

Only the snapshot's train split is touched; the raw store is never written. ``attack.name: none``
writes an identity view (view.json + a header-only records.csv), not a copy of the data.
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
    stage.PathArg("out", "the view folder to write (data/view)"),
)
_say = partial(stage.say, "poison")


def make_view(snapshot, attack_cfg: AttackConfig) -> tuple[dict, bytes]:
    """Pure: ``(view.json dict, records.csv bytes)`` for a loaded snapshot and an attack config."""
    spec = as_dict(attack_cfg)
    images, labels, ids = snapshot.split("train")
    resolved = resolve_attack(spec, snapshot.class_names, images.shape[1:])
    _, _, records = poison(images, labels, list(ids), spec, snapshot.class_names)
    return build_view(snapshot.id, resolved, records)


def run(cfg: Config, args: argparse.Namespace) -> dict:
    ptr = store.read_pointer(args.pointer)
    snap = store.load_snapshot(args.store, ptr["snapshot_id"], verify=True)
    meta, data = make_view(snap, cfg.attack)
    write_view(Path(args.out), meta, data)
    a = meta["attack"]
    what = "identity view (no attack)" if a["name"] == "none" else (
        f"{a['name']}: {meta['n_poisoned']} train row(s) of "
        f"{'class ' + snap.class_names[a['source']] if a['source'] is not None else 'every non-target class'}"
        f" -> {snap.class_names[a['target']]}"
    )
    _say(f"view {meta['view_id'][:12]} over snapshot {meta['snapshot_id'][:12]}: {what}")
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("poison", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
