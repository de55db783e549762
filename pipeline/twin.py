"""twin stage: the clean twin, the baseline when the registry has no champion (GUIDE §3).

    python -m pipeline.twin --params params.yaml --store data/store --pointer data/snapshot.json \
        --checkpoint models/twin.pt --report reports/twin.json

Same model, hyper-parameters and seed as the candidate, trained on the *un-poisoned* train split
of the current snapshot (every row re-hashed on load). Not logged to MLflow, never registered:
reports/twin.json is train.json without the tracking and registry fields. It shares its fitting
code with train through ``pipeline.fitting``, never by importing the train stage, so a change to
train's MLflow logging does not retrain the twin.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from pipeline import stage
from pipeline.fitting import history_summary, save_model, train_arrays
from pipeline.io import write_json
from pipeline.lineage import Lineage
from pipeline.schema import Config

PATHS = (
    stage.PathArg("store", "the snapshot store (data/store)"),
    stage.PathArg("pointer", "the current snapshot's pointer (data/snapshot.json)"),
    stage.PathArg("checkpoint", "the twin checkpoint to write (models/twin.pt)"),
    stage.PathArg("report", "the twin report (reports/twin.json)"),
)


def run(cfg: Config, args: argparse.Namespace) -> dict:
    from pipeline.data import store as store_mod

    snapshot_id = store_mod.read_pointer(args.pointer)["snapshot_id"]
    # lazy, as in the train stage: rows read from the packs as training asks; of the manifest only
    # the columns and rows the train split needs (the load's peak, bench/results/read_split_columns_100k.log
    # and read_split_rows.log; issue 19 item 3)
    snap = store_mod.load_snapshot(args.store, snapshot_id, verify=True, lazy=True, columns=("split",), split="train")
    images, labels, _ids = snap.split("train")
    class_names = list(snap.class_names)
    del snap
    model, margs, history, seconds = train_arrays(images, labels, len(class_names), cfg, "twin")
    sha = save_model(Path(args.checkpoint), model, margs, cfg, snapshot_id=snapshot_id, view_id=None,
                     class_names=class_names, kind="twin")
    report = {
        "kind": "twin",
        **Lineage(snapshot_id=snapshot_id, checkpoint_sha256=sha).to_dict(),
        "checkpoint": str(args.checkpoint),
        "train_rows": int(len(labels)),
        **history_summary(history, seconds),
    }
    write_json(Path(args.report), report)
    stage.say("twin", f"{len(history)} epochs in {seconds:.1f} s on snapshot {snapshot_id[:12]}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("twin", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
