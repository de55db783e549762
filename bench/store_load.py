"""Benchmark: loading a snapshot stays flat from 1 to 1,000 packs (issue 19 item 4).

    python bench/store_load.py [--rows 100000] [--packs 1,10,100,1000] [--trials 3] [--base-every 32]

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

Each load is timed twice on the same store: from its newest base (what every stage does), and with
the bases/ folder moved away (the whole history: every header, delta and pack).

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


def build_chain(root: Path, rows: int, packs: int, seed: int = 0, base_every: int = 0) -> str:
    """Write a lineage of `packs` snapshots (rows/packs rows each) straight through the store's
    encoders, without re-planning the growing manifest each time (that would be O(N x P)). With
    ``base_every``, a snapshot whose parent is that many snapshots past the last base carries a
    base of its parent, written by ``store.write_base`` as the snapshot stage writes it."""
    rng = np.random.default_rng(seed)
    classes = [str(i) for i in range(10)]
    parent = None
    per = rows // packs
    (root / "packs").mkdir(parents=True)
    (root / "deltas").mkdir()
    (root / "snapshots").mkdir()
    (root / store.FORMAT_FILE).write_text(store.FORMAT_TEXT)
    counts = np.zeros(10, np.int64)
    since, old_base = 0, None
    for k in range(packs):
        base = None
        if base_every and since >= base_every:
            par = store.load_parent(root, parent)
            base = store.write_base(root, par)
            since = 0
        since += 1
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
        if base is not None:
            header["base"] = base
        hb = store.header_bytes(header)
        parent = store._sha256(hb)
        (root / "snapshots" / f"{parent}.json").write_bytes(hb)
        if base is not None:
            store.prune_base(root, old_base, base)
            old_base = base
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
    ap.add_argument("--base-every", type=int, default=store.BASE_EVERY,
                    help="snapshots between bases, as the snapshot stage writes them (0: none)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "store_load.md"))
    args = ap.parse_args(argv)
    lines = [
        "# Snapshot load time against the number of packs (issue 19 item 4)",
        "",
        f"`python bench/store_load.py --rows {args.rows} --packs {args.packs} --trials {args.trials} "
        f"--base-every {args.base_every}`",
        "",
        f"Machine: {platform.machine()} CPU box, {os.cpu_count()} cores, shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the start): timings are noisy. {args.rows:,} rows of 28x28x1 uint8 "
        f"({args.rows * 784 / 1e6:.0f} MB of pixels) as a chain of P snapshots, one pack each, a base every "
        f"{args.base_every} snapshots as the snapshot stage writes them; {args.trials} trials, mean ± std seconds "
        f"(page cache warm). \"whole history\": the same store with its bases/ folder moved away, so loads walk "
        f"every header, delta and pack (what the store did before bases). Same store, same run.",
        "",
        "| packs (snapshots) | files a load reads (from base / whole) | load, verify: from base | load, verify: whole "
        "history | load, no verify: from base | load, no verify: whole history | assemble grouped | assemble masked "
        "(c901d6d) | c901d6d per-row verify |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in [int(x) for x in args.packs.split(",")]:
        tmp = Path(tempfile.mkdtemp(prefix=f"pg-load-{p}-"))
        try:
            t = time.perf_counter()
            root = tmp / "store"
            sid = build_chain(root, args.rows, p, base_every=args.base_every)
            print(f"P={p}: built in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            snap = store.load_snapshot(root, sid)  # warm the page cache; check it loads
            man = snap.manifest
            hs = store.chain(root, sid)
            tail = store.resolve(root, sid)
            v = timed(lambda: store.load_snapshot(root, sid, verify=True), args.trials)
            nv = timed(lambda: store.load_snapshot(root, sid, verify=False), args.trials)
            aside = tmp / "bases-aside"
            if (root / "bases").is_dir():
                (root / "bases").rename(aside)
            try:
                assert len(store.resolve(root, sid)) == p
                whole = store.load_snapshot(root, sid)
                assert whole.manifest.equals(man) and np.array_equal(whole.images, snap.images)
                vw = timed(lambda: store.load_snapshot(root, sid, verify=True), args.trials)
                nvw = timed(lambda: store.load_snapshot(root, sid, verify=False), args.trials)
            finally:
                if aside.is_dir():
                    aside.rename(root / "bases")
            g = timed(lambda: assemble(root, man, True, hs), args.trials)
            m = timed(lambda: assemble(root, man, False, hs), args.trials)
            assert np.array_equal(assemble(root, man, True, hs), assemble(root, man, False, hs))
            rv = timed(lambda: [sample_hash(im) for im in snap.images], 1)
            files = f"{3 * len(tail) + (2 if store.base_of(tail) else 0)} / {3 * p}"  # header + delta + pack each
            row = (f"| {p} | {files} | {fmt(v)} | {fmt(vw)} | {fmt(nv)} | {fmt(nvw)} | {fmt(g)} | {fmt(m)} | "
                   f"{fmt(rv)} |")
            print(row, file=sys.stderr, flush=True)
            lines.append(row)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    lines += ["", "Flat = the load from a base does not grow with P: it reads at most --base-every headers, deltas "
              "and packs plus one base (manifest and pixels). The whole-history load grows with P (a few files "
              "per snapshot); the masked loop of c901d6d grows as N x P.",
              "`verify=True` hashes the files it reads (one sequential read each) where c901d6d hashed every row.", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
