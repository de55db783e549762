"""Set a ``bench/scale.py --keep-workspaces`` workspace up for the poison stage with a quarantine
and no attack (the production remedy; issue 19 item 3): ``data/quarantine.json`` a record of
``--rows`` train rows, evenly spaced over the train split (np.linspace), built with
``remedy.build_record`` against the view the poison stage last wrote (``data/view``, the identity
view), and ``remedy.name: quarantine`` in the workspace's params.yaml (``--off`` sets it back to
none). Then ``bench/stage_ab.sh OLD NEW WS poison`` measures the stage.

    python bench/quarantine_record.py WORKSPACE [--rows 100] [--off]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import remedy  # noqa: E402
from pipeline.data import store  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--off", action="store_true", help="remedy.name back to none (the record is left)")
    args = ap.parse_args()
    os.chdir(Path(args.workspace).resolve())
    params = yaml.safe_load(Path("params.yaml").read_text())
    if not args.off:
        sid = store.read_pointer("data/snapshot.json")["snapshot_id"]
        man = store.load_manifest("data/store", sid, columns=("sample_id", "sha256", "split"), split="train")
        pick = np.linspace(0, len(man) - 1, args.rows).astype(int)
        view = json.loads(Path("data/view/view.json").read_text())
        rows = [{"sample_id": man["sample_id"].iloc[i], "sha256": man["sha256"].iloc[i], "class": "bench",
                 "scores": {}, "detectors": ["bench"]} for i in pick]
        rec = remedy.build_record(rows, sid, view["view_id"])
        Path("data/quarantine.json").write_text(json.dumps(rec, indent=1))
        print(f"record {rec['digest'][:12]} of {len(rows)} rows on snapshot {sid[:12]} ({len(man)} train rows)")
    params["remedy"]["name"] = "none" if args.off else "quarantine"
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
