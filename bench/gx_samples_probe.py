"""Where the validate stage's peak comes from at scale (issue 19 item 3): GX's run over the samples
table alone, with only the expectations of one kind, on a ``bench/scale.py --keep-workspaces``
workspace, with this checkout's code and the stage's heap setting (``stage.map_heap``). Prints the
resident memory before ``run_gx`` and the peak during it (VmHWM reset with
``/proc/self/clear_refs`` just before: Linux only). One trial per call.

    python bench/gx_samples_probe.py WORKSPACE in_set|not_null|all

Produced section 3 of bench/results/validate_hash_keys_1m.log (then as a /tmp script, inlined there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (Arrow on the system allocator, as in the stages)
from bench.scale import proc_mib  # noqa: E402
from pipeline import config, stage  # noqa: E402
from pipeline import validate as V  # noqa: E402

KINDS = {"in_set": ("labels_in_class_set",), "not_null": ("required_not_null", "provenance_coverage"), "all": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("kind", choices=sorted(KINDS))
    args = ap.parse_args()
    os.chdir(Path(args.workspace).resolve())
    cfg = config.load("params.yaml")
    v = cfg.validate
    stage.map_heap("validate", cfg.data.heap_map_mib)
    sid = json.loads(Path("data/snapshot.json").read_text())["snapshot_id"]
    _, records = V.read_view("data/view")
    snap, features = V._load_measurable("data/store", sid, v)
    m = V.measure_view(snap, records, v, features=features)
    tables = V.build_tables(snap, m, v, None, None)
    keep = KINDS[args.kind]
    suites = V.build_suites

    def samples_only(frames, vv):  # the samples table's suite, its expectations of one kind
        return {t: [e for e in exps if keep is None or e.meta["check"] in keep]
                for t, exps in suites(frames, vv).items() if t == "samples"}

    V.build_suites = samples_only
    before = proc_mib("VmRSS")["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    _, results = V.run_gx(tables.frames, v, None, run_name="probe", history_dir=tempfile.mkdtemp())
    peak = proc_mib("VmHWM")["VmHWM"]
    print(f"{args.kind} {len(results)} expectations: RSS before {before} MiB, peak during run_gx {peak} MiB "
          f"(+{peak - before}), {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
