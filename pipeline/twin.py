"""twin stage: the clean twin, the baseline when the registry has no champion (GUIDE §3).

    python -m pipeline.twin --params params.yaml --store data/store --pointer data/snapshot.json \
        --checkpoint models/twin.pt --report reports/twin.json [--validated data/validated.json]

Same model, hyper-parameters and seed as the candidate, trained on the *un-poisoned* train split
of the current snapshot (every row re-hashed on load). Not logged to MLflow, never registered:
reports/twin.json is train.json without the tracking and registry fields.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import config as config_mod
from pipeline.io import read_json, write_json
from pipeline.train import TrainError, guarded, history_summary, save_model, train_arrays


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.params)
    from pipeline import store as store_mod

    pointer = store_mod.read_pointer(args.pointer)
    snapshot_id = pointer["snapshot_id"]
    if args.validated and Path(args.validated).is_file():
        v = read_json(Path(args.validated))
        if v.get("snapshot_id") not in (None, snapshot_id):
            raise TrainError(
                f"{args.validated} names snapshot {str(v['snapshot_id'])[:12]} but {args.pointer} names "
                f"{snapshot_id[:12]}: re-run the validate stage"
            )
    snap = store_mod.load_snapshot(args.store, snapshot_id, verify=True)
    images, labels, _ids = snap.split("train")
    class_names = list(snap.class_names)
    del snap
    model, margs, history, seconds = train_arrays(images, labels, len(class_names), cfg, "twin")
    sha = save_model(Path(args.checkpoint), model, margs, cfg, snapshot_id=snapshot_id, view_id=None,
                     class_names=class_names, kind="twin")
    report = {
        "kind": "twin",
        "snapshot_id": snapshot_id,
        "view_id": None,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": sha,
        "train_rows": int(len(labels)),
        **history_summary(history, seconds),
    }
    write_json(Path(args.report), report)
    print(f"twin: {len(history)} epochs in {seconds:.1f} s on snapshot {snapshot_id[:12]}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.twin", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--store", required=True)
    ap.add_argument("--pointer", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--validated", default=None, help="optional: refuse when it names another snapshot")
    return ap


def main(argv: list[str] | None = None) -> int:
    return guarded(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
