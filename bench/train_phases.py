"""Where the train stage's memory goes, phase by phase, on a workspace ``bench/scale.py --work``
left (issue 19 item 3). In one process, with this checkout's code, it runs what the stage runs
before and during its fit, and prints each phase's own peak (the kernel's peak-RSS counter is reset
before each phase: ``/proc/self/clear_refs`` 5) and the resident memory after it:

  start           the stage's imports (torch, MLflow, the pipeline);
  load            ``view.load_training_view(lazy=True, verify=True)``, as the stage calls it;
  mlflow input    ``runs.log_view_input`` into a throwaway SQLite tracking store (a real run);
  fit, step 1     ``fitting.train_arrays`` on the streamed path (``data_path=stream``) up to the
                  end of its first batch: channel statistics, the model, the epoch's draws;
  fit, steps 2-K  the next K-1 batches (``--steps``): the loop's steady state.

    python bench/train_phases.py WORKSPACE [--steps 30] [--batch-size 512]

The fit is stopped after ``--steps`` batches (its progress callback raises): a whole epoch at 1M
rows is an hour on a 2-core CPU, and a batch's memory does not depend on which batch it is.
Comparing the same phases at two N (100k, 1M) shows which of them grow with N; ``bench/
stage_memory.py WS --stage train`` measures the whole stage. One trial per call.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (Arrow on the system allocator, as in the stages)
from bench.scale import proc_mib, reset_peak  # noqa: E402


class _Stop(Exception):
    pass


def phase(name: str, t0: float) -> None:
    """Print the phase's peak and what stays resident, then reset the peak for the next phase."""
    m = proc_mib("VmHWM", "VmRSS", "RssAnon")
    print(f"{name:16s} peak {m['VmHWM']:6d} MiB   after: RSS {m['VmRSS']:6d}  anon {m['RssAnon']:6d} MiB   "
          f"{time.perf_counter() - t0:7.1f} s", flush=True)
    reset_peak()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("--steps", type=int, default=30, help="batches to run before the fit is stopped")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--map-mib", type=int, default=None,
                    help="train.stream_map_mib for this run (default: the workspace's params.yaml)")
    ap.add_argument("--every", type=int, default=0, help="also print the resident memory every this many steps")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (step 1 and the steady state are separate phases)")
    os.chdir(Path(args.workspace).resolve())
    t0 = time.perf_counter()
    import mlflow
    import torch  # noqa: F401

    from pipeline import config
    from pipeline.data import view as view_mod
    from pipeline.fitting import train_arrays
    from pipeline.tracking import runs

    cfg = config.load("params.yaml")
    probe = {"epochs": 1, "batch_size": args.batch_size, "data_path": "stream"}
    if args.map_mib is not None:
        probe["stream_map_mib"] = args.map_mib
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **probe))
    print(f"batch {cfg.train.batch_size}, streamed, train.stream_map_mib={cfg.train.stream_map_mib}", flush=True)
    phase("start", t0)

    t0 = time.perf_counter()
    tv = view_mod.load_training_view("data/view", "data/store", verify=True, lazy=True)
    phase("load", t0)
    print(f"  {len(tv.labels)} train rows; sample_ids {sum(sys.getsizeof(s) for s in tv.sample_ids) / 2**20:.0f} MiB "
          f"of str + {sys.getsizeof(tv.sample_ids) / 2**20:.0f} MiB of list", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("train-phases")
        with mlflow.start_run():
            runs.log_view_input(tv, name="view", source=str(Path("data/view").resolve()))
        phase("mlflow input", t0)

    t0 = time.perf_counter()
    seen = {"step": 0, "t1": 0.0}

    def stop_after(ev: dict) -> None:
        if ev["event"] != "step":
            return
        seen["step"] = ev["step"]
        if ev["step"] == 1:
            phase("fit, step 1", t0)
            seen["t1"] = time.perf_counter()
        elif args.every and ev["step"] % args.every == 0:
            m = proc_mib("VmRSS", "RssAnon")
            print(f"  step {ev['step']:5d}: RSS {m['VmRSS']:6d}  anon {m['RssAnon']:6d} MiB", flush=True)
        if ev["step"] >= args.steps:
            raise _Stop

    import pipeline.fitting as fitting

    fitting.progress = lambda epochs, desc: (stop_after, lambda: None)  # the stage's bar, replaced by the probe
    try:
        train_arrays(tv.images, tv.labels, len(tv.class_names), cfg, "train")
    except _Stop:
        pass
    phase(f"fit, steps 2-{seen['step']}", t0)
    print(f"  {(time.perf_counter() - seen['t1']) / max(1, seen['step'] - 1):.3f} s a step after the first", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
