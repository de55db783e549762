"""Benchmark: loading a snapshot stays flat from 1 to 1,000 packs (issue 19 item 4).

    python bench/store_load.py [--rows 100000] [--packs 1,10,100,1000] [--trials 3]

A store of --rows synthetic 28x28 grey rows is written as a chain of P snapshots (P appends of
rows/P rows each, so P packs, P delta manifests, P headers), for each P. Timed, per P:

  load (verify)    - `store.load_snapshot(verify=True)`: chain + delta hashes, every pack hashed
                     (hashlib.file_digest), rows assembled;
  load (no verify) - `store.load_snapshot(verify=False)`;
  assemble grouped - only the pixel assembly as the store does it: each header's rows are one run
                     of the manifest in one pack (a slice, O(N) whatever P);
  assemble masked  - the same with the loop it replaced (`rows = packs == pack` per pack, the old
                     store.py:382, N x P comparisons), on the same manifest and packs;
  old row verify   - what the old `verify=True` added: `sample_hash` of every row (the new
                     verify hashes pack files instead).

Mean ± std over --trials, seconds; writes bench/results/store_load.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.hashing import sample_hash  # noqa: E402
from pipeline.data import store  # noqa: E402


def build_chain(root: Path, rows: int, packs: int, seed: int = 0) -> str:
    """Write a lineage of `packs` snapshots (rows/packs rows each) straight through the store's
    encoders, without re-planning the growing manifest each time (that would be O(N x P))."""
    rng = np.random.default_rng(seed)
    classes = [str(i) for i in range(10)]
    parent = None
    per = rows // packs
    (root / "packs").mkdir(parents=True)
    (root / "deltas").mkdir()
    (root / "snapshots").mkdir()
    (root / store.FORMAT_FILE).write_text(store.FORMAT_TEXT)
    counts = np.zeros(10, np.int64)
    for k in range(packs):
        imgs = rng.integers(0, 256, (per, 28, 28, 1), dtype=np.uint8)
        buf = io.BytesIO()
        np.save(buf, imgs, allow_pickle=False)
        pack = store._sha256(buf.getvalue())
        (root / "packs" / f"{pack}.npy").write_bytes(buf.getvalue())
        labels = rng.integers(0, 10, per)
        counts += np.bincount(labels, minlength=10)
        df = pd.DataFrame({
            "sample_id": [f"train/{labels[i]}/p{k:04d}_{i:06d}.png" for i in range(per)],
            "sha256": [sample_hash(im) for im in imgs],
            "label": labels.astype(np.int64),
            "split": ["train"] * per,
            "source_uri": [f"bench::{k}/{i}" for i in range(per)],
            "ingest_time": [f"2025-01-01T00:00:{k % 60:02d}Z"] * per,
            "pack": [pack] * per,
            "pack_index": np.arange(per, dtype=np.int64),
            "file_size": np.full(per, -1, np.int64),
            "file_sha256": [""] * per,
        })
        delta = store.delta_bytes(df)
        dsha = store._sha256(delta)
        (root / "deltas" / f"{dsha}.parquet").write_bytes(delta)
        header = {"format": store.FORMAT_VERSION, "parent": parent, "delta": {"sha256": dsha, "rows": per},
                  "packs": [pack], "class_names": classes, "image_shape": [28, 28, 1],
                  "source": {"name": "bench", "key": "bench-0"}, "created": f"{k:06d}",
                  "n_rows": per * (k + 1), "n_new": per,
                  "counts": {"train": {"n": int(counts.sum()), "per_class": dict(zip(classes, counts.tolist()))}}}
        hb = store.header_bytes(header)
        parent = store._sha256(hb)
        (root / "snapshots" / f"{parent}.json").write_bytes(hb)
    return parent


def assemble(root: Path, manifest: pd.DataFrame, grouped: bool, headers: list[dict]) -> np.ndarray:
    images = np.empty((len(manifest), 28, 28, 1), np.uint8)
    index = manifest["pack_index"].to_numpy()
    if grouped:  # what load_snapshot does: one slice of rows per header (grouped once if several packs)
        for pack, rows in store._rows_by_pack(headers, manifest).items():
            arr = np.load(root / "packs" / f"{pack}.npy", mmap_mode="r")
            images[rows] = arr[index[rows]]
    else:  # the loop of c901d6d's store.py (N x P)
        packs = manifest["pack"].to_numpy()
        for pack in pd.unique(packs):
            arr = np.load(root / "packs" / f"{pack}.npy", mmap_mode="r")
            rows = packs == pack
            images[rows] = arr[index[rows]]
    return images


def timed(fn, trials: int) -> list[float]:
    out = []
    for _ in range(trials):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--packs", default="1,10,100,1000")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "store_load.md"))
    args = ap.parse_args(argv)
    lines = [
        "# Snapshot load time against the number of packs (issue 19 item 4)",
        "",
        f"Machine: {platform.machine()} CPU box, {os.cpu_count()} cores, shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the start): timings are noisy. {args.rows:,} rows of 28x28x1 uint8 "
        f"({args.rows * 784 / 1e6:.0f} MB of pixels) as a chain of P snapshots, one pack each; {args.trials} "
        f"trials, mean ± std seconds (page cache warm).",
        "",
        "| packs (snapshots) | load, verify | load, no verify | assemble grouped (new) | assemble masked (old) "
        "| old per-row verify |",
        "|---|---|---|---|---|---|",
    ]
    for p in [int(x) for x in args.packs.split(",")]:
        tmp = Path(tempfile.mkdtemp(prefix=f"pg-load-{p}-"))
        try:
            t = time.perf_counter()
            sid = build_chain(tmp / "store", args.rows, p)
            print(f"P={p}: built in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            snap = store.load_snapshot(tmp / "store", sid)  # warm the page cache; check it loads
            man = snap.manifest
            hs = store.chain(tmp / "store", sid)
            v = timed(lambda: store.load_snapshot(tmp / "store", sid, verify=True), args.trials)
            nv = timed(lambda: store.load_snapshot(tmp / "store", sid, verify=False), args.trials)
            g = timed(lambda: assemble(tmp / "store", man, True, hs), args.trials)
            m = timed(lambda: assemble(tmp / "store", man, False, hs), args.trials)
            assert np.array_equal(assemble(tmp / "store", man, True, hs), assemble(tmp / "store", man, False, hs))
            rv = timed(lambda: [sample_hash(im) for im in snap.images], 1)
            row = f"| {p} | {fmt(v)} | {fmt(nv)} | {fmt(g)} | {fmt(m)} | {fmt(rv)} |"
            print(row, file=sys.stderr, flush=True)
            lines.append(row)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    lines += ["", "Flat = the grouped assembly and the whole load do not grow with P; the masked loop grows as N x P.",
              "The new `verify=True` hashes pack files (one sequential read) where the old one hashed every row.", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
