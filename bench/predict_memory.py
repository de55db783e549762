"""Resident memory one ``predict_logits`` call leaves behind, today's one-buffer version against the
list of per-batch logits it replaced (issue 19 item 3), over a lazy subset of a workspace's view.

    python bench/predict_memory.py WORKSPACE [--every 3] [--old]

WORKSPACE: one a ``bench/scale.py --work DIR`` run left (its store and training view). Rows: every
``--every``-th row of the view (k-fold's held-out fold is every 3rd), 512-row batches, a fresh
small_cnn. Prints RssAnon before, after the call and after ``heap.release``, and the seconds.
``--old`` runs the replaced loop (kept here, not in the pipeline). One process per call: run it
once with and once without ``--old``. Produced the k-fold figures of
``bench/results/scale_inspect_100k_stop29.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scale import proc_mib  # noqa: E402
from pipeline.core import data as tdata  # noqa: E402
from pipeline.core import heap  # noqa: E402
from pipeline.core.models import build_model  # noqa: E402
from pipeline.core.predict import predict_logits  # noqa: E402
from pipeline.core.rows import take  # noqa: E402
from pipeline.data import view as view_mod  # noqa: E402


def anon_mib() -> int:
    return proc_mib("RssAnon")["RssAnon"]


@torch.no_grad()
def old_predict_logits(model, images, batch_size: int = 512) -> np.ndarray:
    """The loop before 4f4cee0 (CPU path): a list of per-batch logits, concatenated at the end."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(tdata.to_device(images[i : i + batch_size], "cpu")).float())
    return torch.cat(out).cpu().numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace")
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--old", action="store_true", help="the replaced list-of-batches loop")
    args = ap.parse_args()
    ws = Path(args.workspace)
    tv = view_mod.load_training_view(ws / "data/view", ws / "data/store", verify=False, lazy=True)
    rows = take(tv.images, np.arange(0, len(tv.labels), args.every))
    torch.manual_seed(0)
    model = build_model("small_cnn", len(tv.class_names), rows.shape[3], rows.shape[1], width=32)
    heap.release()
    before = anon_mib()
    t0 = time.perf_counter()
    logits = old_predict_logits(model, rows) if args.old else predict_logits(model, rows, device="cpu", amp=False)
    seconds = time.perf_counter() - t0
    after = anon_mib()
    heap.release()
    print(f"{'old list' if args.old else 'one buffer'}: {len(logits)} rows (every {args.every}th), RssAnon "
          f"{before} -> {after} MiB (+{after - before}), {anon_mib()} after heap.release; {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
