"""poison stage: write the training view (a transformation record over the snapshot).

    python -m pipeline.poison --params params.yaml --pointer data/snapshot.json \
        --store data/store --out data/view

Only the snapshot's train split is touched; the raw store is never written. ``attack.name: none``
writes an identity view (view.json + a header-only records.csv), not a copy of the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pipeline.config import AttackConfig, ConfigError
from pipeline.core.attacks import AttackError, poison, resolve_attack
from pipeline.view import ViewError, build_view, write_view


def attack_spec(cfg: AttackConfig) -> dict:
    """The config section as the plain dict the core attacks take."""
    return dataclasses.asdict(cfg)


def make_view(snapshot, attack_cfg: AttackConfig) -> tuple[dict, bytes]:
    """Pure: ``(view.json dict, records.csv bytes)`` for a loaded snapshot and an attack config."""
    spec = attack_spec(attack_cfg)
    images, labels, ids = snapshot.split("train")
    resolved = resolve_attack(spec, snapshot.class_names, images.shape[1:])
    _, _, records = poison(images, labels, list(ids), spec, snapshot.class_names)
    return build_view(snapshot.id, resolved, records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.poison", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--pointer", required=True, help="data/snapshot.json")
    ap.add_argument("--store", required=True, help="data/store")
    ap.add_argument("--out", required=True, help="view directory (data/view)")
    args = ap.parse_args(argv)
    from pipeline import config, store

    try:
        cfg = config.load(args.params)
        ptr = store.read_pointer(args.pointer)
        snap = store.load_snapshot(args.store, ptr["snapshot_id"], verify=True)
        meta, data = make_view(snap, cfg.attack)
        write_view(Path(args.out), meta, data)
    except store.IntegrityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except store.StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, AttackError, ViewError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a = meta["attack"]
    what = "identity view (no attack)" if a["name"] == "none" else (
        f"{a['name']}: {meta['n_poisoned']} train row(s) of "
        f"{'class ' + snap.class_names[a['source']] if a['source'] is not None else 'every non-target class'}"
        f" -> {snap.class_names[a['target']]}"
    )
    print(f"poison: view {meta['view_id'][:12]} over snapshot {meta['snapshot_id'][:12]}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
