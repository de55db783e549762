"""Training through the store on a GPU: the resident path against the streamed one (issue 19 item 3).

One run on the lent GPU, every case in its own process: its host peak is its own VmHWM (the
packs' and memmaps' file pages it maps included) and its RssAnon sampled every 10 ms (what it
allocated), its device peak ``torch.cuda.max_memory_allocated``:

1. **CIFAR-10 into a store.** The carried archives are snapshotted by the snapshot stage's own
   function (``pipeline.snapshot.snapshot``: decode, hash, packs, delta manifest) into a fresh
   store (cold), then once more (no-op: every file known by size and mtime).
2. **CIFAR-10 from the store.** The train split read lazily (``store.load_snapshot(lazy=True,
   split="train")``: rows stay in the packs), fastnet trained with conf/train/fastnet.yaml through
   the project's one loop (``core.train.train_model``) with ``data_path`` resident (the rows
   uploaded once, a chunk at a time), stream (a DataLoader gathering each batch from the packs,
   0 and 4 workers) and auto; test accuracy by ``core.predict`` on the test split.
3. **A 1M-row store.** ``--rows`` rows of 28x28x1 (CIFAR-10's training pixels, grey, centre 28x28
   crop, tiled; each row's index written into its first 4 pixels so every row, and its sha256, is
   unique; the first 80% "train", the rest "test") put into a fresh store by the store's own
   ``plan_snapshot`` and ``write_snapshot`` from a staged ``np.memmap``, a chunk of rows at a time:
   the snapshot stage's hashing, manifest, pack and header, without its source listing and image
   decode (writing and decoding 1M image files would not fit the device time). Its build seconds
   are in the header; a sample of rows is checked against the manifest by ``store.check_rows``.
   small_cnn (conf/train/digits.yaml, batch 512) trains one epoch on its lazy train split
   (800k rows at 1M) resident, streamed (0 and 4 workers) and auto.
4. **At scale, from memmaps.** 1M rows of 28x28x1 (748 MiB: small_cnn at batch 512) and 1M rows of
   32x32x3 (2,930 MiB: fastnet, over the 2,048 MiB ``resident_max_mib``) as ``np.memmap`` files
   (the same tiled pixels, unstamped), one epoch resident and streamed (0 workers). The last run's
   4-worker and auto rows of these two sets are not repeated (auto = resident for the first,
   stream for the second; bench/results/gpu_data_path_run2.md has them).
5. **Simulated card caps.** fastnet, one epoch at batch 1024, on the first R rows of the 32x32x3
   memmap, R the most rows whose pixels fit ``resident_max_mib`` (699,050 at 2,048 MiB), so auto
   keeps them resident, in a process whose CUDA caching allocator is capped by
   ``torch.cuda.set_per_process_memory_fraction`` at 16 GiB with (a) this checkout's chunked
   augmentation and (b) the old one-gather augmentation (``augment.chunk_rows_for`` patched in
   that child to return the row count: ``random_crop_flip`` then gathers the whole set at once),
   and (c) at 24 GiB with the old gather. A CUDA out-of-memory error ends the case as an "OOM" row
   (its message's first line, the device peaks until then), not the run. The cap is a per-process
   allocator limit, not a 16 or 24 GB card: the CUDA context (~0.5 GiB on a real card) is outside
   it, and the allocator's fragmentation on a small card may differ. Only the augmentation is the
   old code's; the upload is this checkout's chunked one. Skipped without CUDA.

    python bench/gpu_data_path.py --data .gpu/cifar10 --out $OUT      # on the GPU box
    python bench/gpu_data_path.py --data .gpu/cifar10 --out $OUT --groups store   # 1 and 3 only
    python bench/gpu_data_path.py --smoke                             # CPU code path, tiny sizes

Needs torch, numpy, pandas, pyarrow, Pillow, PyYAML (conf/ read as in cifar10_verdict.py) and
scikit-learn (its imports); no dvc, mlflow, omegaconf, hydra or GX. Writes ``gpu_data_path.md`` and
``gpu_data_path.json`` to ``--out`` (``gpu_data_path_<groups>.*`` with ``--groups``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GROUPS = ("cifar10", "store", "memmap", "caps")  # --groups
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- one case (child process)


def load_case(case: dict):
    """``(train images, train labels, test images or None, test labels or None)`` of a case."""
    if case["data"] == "store":
        from pipeline.data import store

        snap = store.load_snapshot(case["store"], case["snapshot"], lazy=True, columns=("split",), split="train")
        x, y, _ = snap.split("train")
        if not case.get("test", True):
            return x, np.asarray(y), None, None
        test = store.load_snapshot(case["store"], case["snapshot"], lazy=True, columns=("split",), split="test")
        xt, yt, _ = test.split("test")
        return x, np.asarray(y), np.asarray(xt), np.asarray(yt)
    x, y = np.load(case["images"], mmap_mode="r"), np.load(case["labels"], mmap_mode="r")
    if case.get("limit"):  # the first rows of the memmap: still a memmap, nothing read
        x, y = x[: case["limit"]], y[: case["limit"]]
    return x, np.asarray(y), None, None


class AnonPeak:
    """The largest RssAnon of this process, read every ``every`` seconds on a thread: the host
    memory the case allocated, without the page cache of the packs or memmaps it maps."""

    def __init__(self, every: float = 0.01):
        import threading

        from bench.scale import proc_mib

        self.read = lambda: proc_mib("RssAnon")["RssAnon"]
        self.peak, self.every, self._stop = self.read(), every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.read())


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def run_case(case: dict) -> dict:
    from bench.scale import proc_mib

    anon = AnonPeak()
    import torch

    from bench.cifar10_verdict import compose_group, typed
    from pipeline.schema import ModelConfig, TrainConfig
    from pipeline.core import augment
    from pipeline.core.data import data_path_for
    from pipeline.core.predict import predict
    from pipeline.core.train import train_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    out: dict = {}
    if case.get("cap_gib"):  # before any allocation: the caching allocator refuses past the cap
        if not cuda:
            raise SystemExit("a memory cap needs a CUDA device")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(case["cap_gib"] * 2**30 / total, 0)
        out["cap_mib"] = round(case["cap_gib"] * 2**10)
        out["card_mib"] = round(total / 2**20)
    if case.get("old_gather"):  # the old augmentation: one gather over the whole set (train.fit reads
        # augment.chunk_rows_for at each epoch; random_crop_flip takes chunk_rows >= N as one piece)
        augment.chunk_rows_for = lambda shape, index_bytes=augment.AUG_INDEX_BYTES: max(1, int(shape[0]))
    t0 = time.perf_counter()
    x, y, xt, yt = load_case(case)
    t_load = time.perf_counter() - t0
    train_name, model_name = case["conf"]
    spec = typed(TrainConfig, {**compose_group("train", train_name), "device": device, **case["overrides"]},
                 f"conf/train/{train_name}.yaml")
    model = typed(ModelConfig, compose_group("model", model_name), f"conf/model/{model_name}.yaml")
    path = data_path_for(x, spec, torch.device(device).type)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    out.update({"rows": len(x), "pixel_mib": round(x.size / 2**20, 1) if hasattr(x, "size") else None,
                "path": path, "load_s": round(t_load, 2)})
    device_peaks = lambda: ({"device_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20),  # noqa: E731
                             "device_reserved_peak_mib": round(torch.cuda.max_memory_reserved() / 2**20)}
                            if cuda else {"device_peak_mib": None, "device_reserved_peak_mib": None})
    t0 = time.perf_counter()
    try:
        net, _, hist = train_model(x, y, int(y.max()) + 1, model.name, model.width, spec)
        if cuda:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
        if not _is_oom(e):
            raise
        lines = str(e).strip().splitlines()
        out.update(oom=f"{type(e).__name__}: {lines[0] if lines else ''}", train_s=round(time.perf_counter() - t0, 2),
                   **device_peaks(), host_peak_mib=proc_mib("VmHWM")["VmHWM"], host_anon_peak_mib=anon.stop())
        return out
    t_train = time.perf_counter() - t0
    out.update({"train_s": round(t_train, 2),
                "epoch_s": [round(h["seconds"], 3) for h in hist], "loss": [h["loss"] for h in hist],
                "images_per_s_last": round(hist[-1]["images_per_s"]), **device_peaks()})
    if xt is not None:
        out["test_accuracy"] = float((predict(net, xt, device=device) == yt).mean())
    # VmHWM of this process's own memory since its exec (file pages it mapped included); wait4's
    # ru_maxrss would also count the parent's peak at the fork
    out["host_peak_mib"] = proc_mib("VmHWM")["VmHWM"]
    out["host_anon_peak_mib"] = anon.stop()
    return out


# ----------------------------------------------------------------------------- the parent


def child(case: dict) -> dict:
    """Run a case in its own process: ``run_case``'s result (with its own host peaks)."""
    with tempfile.NamedTemporaryFile("w+", suffix=".json") as fh:
        code = subprocess.run([sys.executable, __file__, "--case", json.dumps(case), "--result", fh.name]).returncode
        if code != 0:
            return {"error": f"exit {code}"}
        return json.loads(Path(fh.name).read_text())


def snapshot_cifar(data: str, work: Path, limit) -> tuple[str, dict]:
    from pipeline.data import store
    from pipeline.schema import DataConfig
    from pipeline.snapshot import snapshot

    cfg = DataConfig(name="cifar10", path=str(Path(data).resolve()), limit=limit)
    paths = dict(store_dir=str(work / "store"), pointer_path=str(work / "snapshot.json"))
    times = {}
    for name in ("cold", "no-op"):
        t0 = time.perf_counter()
        snapshot(cfg, **paths, report_path=str(work / f"snapshot_{name}.json"), progress=say,
                 stat_cache=str(work / "stat_cache.parquet"))
        times[name] = round(time.perf_counter() - t0, 2)
        say(f"snapshot {name}: {times[name]} s")
    return store.read_pointer(work / "snapshot.json")["snapshot_id"], times


def cifar_train_pixels(store_dir: str, sid: str, grey28: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10's training pixels (grey, centre 28x28 crop with ``grey28``), labels, class names."""
    from pipeline.data import store

    snap = store.load_snapshot(store_dir, sid, lazy=True, columns=("split",), split="train")
    x, y, _ = snap.split("train")
    x, y = np.asarray(x), np.asarray(y, np.int64)
    if grey28:
        x = (x[:, 2:30, 2:30].astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))[..., None].round().astype(np.uint8)
    return x, y, [str(c) for c in snap.class_names]


def write_scale_rows(store_dir: str, sid: str, work: Path, rows: int, grey28: bool) -> tuple[str, str]:
    """``rows`` rows of CIFAR-10's training pixels tiled (grey, centre 28x28 crop with ``grey28``)
    into an ``np.memmap`` .npy file, a chunk at a time; its labels beside it."""
    x, y, _ = cifar_train_pixels(store_dir, sid, grey28)
    name = "rows28" if grey28 else "rows32"
    mm = np.lib.format.open_memmap(work / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(rows, *x.shape[1:]))
    for a in range(0, rows, len(x)):
        mm[a:a + len(x)] = x[: rows - a]
    mm.flush()
    del mm
    np.save(work / f"{name}_labels.npy", np.resize(y, rows))
    return str(work / f"{name}.npy"), str(work / f"{name}_labels.npy")


def build_scale_store(src_store: str, src_sid: str, work: Path, rows: int, chunk: int = 65536,
                      test_fraction: float = 0.2) -> tuple[str, str, dict]:
    """A fresh store of ``rows`` 28x28x1 rows (CIFAR-10's training pixels, grey 28x28, tiled; row
    i's index as 4 little-endian bytes in its first 4 pixels, so no two rows hash alike), built by
    the store's own ``plan_snapshot`` and ``write_snapshot`` (no image files, no decode). The rows
    are staged in an ``np.memmap`` a chunk at a time and hashed as the store hashes a row
    (``core.hashing.sample_hash``, what ``store.check_rows`` verifies); the plan takes the memmap
    as its images, so the pack is written from it a chunk at a time too. The first
    ``1 - test_fraction`` of the rows are "train" (a folder source lists train first), the rest
    "test". Returns the store, the snapshot id and the seconds of each phase."""
    from pipeline.core.hashing import sample_hash
    from pipeline.data import store

    secs: dict = {}
    t0 = t = time.perf_counter()
    x, y, class_names = cifar_train_pixels(src_store, src_sid, grey28=True)
    stage = work / "store_rows_stage.npy"
    mm = np.lib.format.open_memmap(stage, mode="w+", dtype=np.uint8, shape=(rows, *x.shape[1:]))
    hashes: list[str] = []
    for a in range(0, rows, chunk):
        idx = np.arange(a, min(rows, a + chunk))
        block = x[idx % len(x)]  # a copy
        block.reshape(len(idx), -1)[:, :4] = idx.astype("<u4").view(np.uint8).reshape(-1, 4)
        mm[a:a + len(idx)] = block
        hashes += [sample_hash(r) for r in block]
    mm.flush()
    labels = y[np.arange(rows) % len(x)]
    n_train = rows - int(round(rows * test_fraction))
    splits = np.where(np.arange(rows) < n_train, "train", "test")
    ids = [f"train/{i:07d}" if i < n_train else f"test/{i:07d}" for i in range(rows)]
    uris = [f"bench-tiled-cifar10::{i}" for i in ids]
    secs["rows_and_hashes"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    plan = store.plan_snapshot(parent=None, sample_ids=ids, hashes=hashes, labels=labels, class_names=class_names,
                               splits=splits, uris=uris, images=mm, ingest_time=created)
    secs["plan"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    out = work / "store1m"
    source = {"key": "bench-tiled-cifar10", "kind": "bench: CIFAR-10 train pixels, grey 28x28, tiled, index-stamped",
              "rows": rows}
    sid, manifest = store.write_snapshot(out, plan, source, created)
    secs["write"] = round(time.perf_counter() - t, 2)
    del plan, manifest, mm
    stage.unlink()
    t = time.perf_counter()
    # the read-back a trainer's load does (headers, delta, the pack's hash), and a sample of rows
    # re-hashed against the manifest: the store verifies packs, not rows, on a load
    snap = store.load_snapshot(out, sid, lazy=True)
    check = np.unique(np.r_[np.arange(0, rows, max(1, rows // 10000)), rows - 1])
    store.check_rows(snap.images, check, snap.manifest["sample_id"].tolist(), snap.manifest["sha256"].tolist())
    secs["load_and_check"] = round(time.perf_counter() - t, 2)
    secs["rows_checked"] = len(check)
    secs["total"] = round(time.perf_counter() - t0, 2)
    return str(out), sid, secs


def table(results: list[dict]) -> str:
    head = ("| case | rows | path (asked → used) | workers | epochs | s/epoch (steady) | first epoch s | train s | "
            "host VmHWM MiB | host anon peak MiB | device peak MiB | test acc | max abs Δloss vs resident |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    ref: dict[str, list] = {}
    for r in results:
        if r.get("asked") == "resident" and "loss" in r:
            ref[r["group"]] = r["loss"]
    for r in results:
        if "error" in r or "oom" in r:
            why = f"error: {r['error']}" if "error" in r else "OOM"
            lines.append(f"| {r['name']} | — | {r['asked']} | — | — | {why} | | | | | | | |")
            continue
        ep = r["epoch_s"]
        steady = np.mean(ep[1:]) if len(ep) > 1 else ep[0]
        dl = ""
        if r["group"] in ref and r.get("asked") != "resident":
            a, b = np.asarray(ref[r["group"]]), np.asarray(r["loss"])
            dl = f"{float(np.max(np.abs(a - b))):.2g}" if len(a) == len(b) else ""
        acc = f"{100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else "—"
        lines.append(f"| {r['name']} | {r['rows']:,} | {r['asked']} → {r['path']} | {r['workers']} | {len(ep)} | "
                     f"{steady:.3f} | {ep[0]:.3f} | {r['train_s']:.2f} | {r['host_peak_mib']} | {r['host_anon_peak_mib']} | "
                     f"{r['device_peak_mib'] if r['device_peak_mib'] is not None else '—'} | {acc} | {dl} |")
    return "\n".join(lines)


def cap_table(results: list[dict]) -> str:
    head = ("| cap | case | rows | pixel MiB | path (asked → used) | result | device peak MiB (allocated) | "
            "device reserved peak MiB | epoch s | train s (to the OOM) | host anon peak MiB |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    notes = []
    for r in results:
        cap = f"{r['cap_gib']} GiB"
        if "error" in r:
            lines.append(f"| {cap} | {r['name']} | — | — | {r['asked']} | error: {r['error']} | | | | | |")
            continue
        result = "OOM" if "oom" in r else "ok"
        if "oom" in r:
            notes.append(f"- {cap}, {r['name']}: `{r['oom']}`")
        ep = f"{r['epoch_s'][0]:.3f}" if r.get("epoch_s") else "—"
        lines.append(f"| {cap} | {r['name']} | {r['rows']:,} | {r['pixel_mib']} | {r['asked']} → {r['path']} | "
                     f"{result} | {r['device_peak_mib']} | {r['device_reserved_peak_mib']} | {ep} | {r['train_s']:.2f} | "
                     f"{r['host_anon_peak_mib']} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/datasets/cifar10"), help="CIFAR-10 archives or folder")
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of each scale case and of the scale store")
    ap.add_argument("--smoke", action="store_true", help="CPU code path: 200 rows a split, 2k scale rows, 1 epoch")
    ap.add_argument("--groups", default=",".join(GROUPS),
                    help=f"the case groups to run, comma-separated, of {', '.join(GROUPS)} (CIFAR-10's snapshot "
                         "always runs: the other groups' pixels come from it)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    groups = set(args.groups.split(","))
    if not groups or groups - set(GROUPS):
        ap.error(f"--groups: one or more of {', '.join(GROUPS)}, not {args.groups!r}")
    if args.case:
        Path(args.result).write_text(json.dumps(run_case(json.loads(args.case))))
        return 0

    import torch

    from bench.cifar10_verdict import compose_group
    from pipeline.core.data import choose_data_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("gpu_data_path_smoke" if args.smoke else "gpu_data_path") + \
        ("" if groups == set(GROUPS) else "_" + "_".join(g for g in GROUPS if g in groups))
    limit = 200 if args.smoke else None
    rows = 2000 if args.smoke else args.rows
    epochs = {"epochs": 1} if args.smoke else {}
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "none (CPU)"
    header = {"device": gpu, "torch": torch.__version__, "python": platform.python_version(),
              "cpus": os.cpu_count(), "data": args.data, "rows": rows, "command": " ".join(sys.argv)}
    # the cap cases: the most 32x32x3 rows whose pixels fit fastnet's resident budget (auto: resident)
    budget_mib = float(compose_group("train", "fastnet")["resident_max_mib"])
    cap_rows = int(budget_mib * 2**20) // 3072
    if choose_data_path(cap_rows * 3072, "auto", budget_mib) != "resident":
        raise SystemExit(f"{cap_rows} rows of 32x32x3 would not be resident at {budget_mib} MiB")
    caps = [(16, "new: chunked augmentation", False), (16, "old: one gather", True), (24, "old: one gather", True)]
    say(json.dumps(header))
    t_run = time.perf_counter()
    results: list[dict] = []
    cap_results: list[dict] = []
    store_s: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_data_path_") as tmp:
        work = Path(tmp)
        sid, snap_times = snapshot_cifar(args.data, work, limit)
        src = str(work / "store")

        def save() -> None:
            (out / f"{stem}.json").write_text(json.dumps(
                {**header, "snapshot_s": snap_times, "scale_store_s": store_s, "results": results,
                 "cap_results": cap_results, "run_s": round(time.perf_counter() - t_run, 1)}, indent=1))

        def run(name, group, conf, data, over, extra=None) -> dict:
            case = {**data, "conf": conf, "overrides": over, **(extra or {})}
            say(f"{name}: {conf}, {over}, {extra or ''}")
            r = child(case)
            r.update(name=name, group=group, asked=over["data_path"], workers=over["loader_workers"], conf=conf)
            say(f"  -> {json.dumps({k: v for k, v in r.items() if k not in ('loss',)})}")
            return r

        fastnet, digits = ("fastnet", "fastnet"), ("digits", "small_cnn")
        base = {"data": "store", "store": src, "snapshot": sid}
        for p, w in (("resident", 0), ("stream", 0), ("stream", 4), ("auto", 0)) if "cifar10" in groups else ():
            results.append(run("cifar10 store", "cifar10", fastnet, base,
                               {**epochs, "data_path": p, "loader_workers": w}))
            save()

        # the scale store: built by the store's plan/write functions, trained from its lazy train split
        if "store" in groups:
            say(f"building a store of {rows:,} 28x28x1 rows (plan_snapshot + write_snapshot, no decode)")
            big, big_sid, store_s = build_scale_store(src, sid, work, rows)
            say(f"  -> {big_sid[:12]}: {json.dumps(store_s)}")
            group = "1M store 28x28x1" if rows == 1_000_000 else f"{rows:,} store 28x28x1"
            for p, w in (("resident", 0), ("stream", 0), ("stream", 4), ("auto", 0)):
                results.append(run(group, group, digits, {"data": "store", "store": big, "snapshot": big_sid, "test": False},
                                   {"epochs": 1, "batch_size": 512, "data_path": p, "loader_workers": w}))
                save()
            shutil.rmtree(big)

        for grey in (True, False) if groups & {"memmap", "caps"} else ():
            if grey and "memmap" not in groups:
                continue
            n = rows if grey or not cuda else max(rows, cap_rows)  # the cap cases read its first cap_rows
            imgs, labels = write_scale_rows(src, sid, work, n, grey)
            say(f"wrote {n:,} rows to {imgs}")
            group = "28x28x1" if grey else "32x32x3"
            data = {"data": "memmap", "images": imgs, "labels": labels, "limit": rows}
            for p in ("resident", "stream") if "memmap" in groups else ():
                results.append(run(f"{rows:,} x {group}", group, digits if grey else fastnet, data,
                                   {"epochs": 1, "batch_size": 512 if grey else 1024, "data_path": p,
                                    "loader_workers": 0}))
                save()
            if grey or "caps" not in groups:
                continue
            if not cuda:
                say("simulated card caps: skipped (no CUDA device; the cap is a CUDA allocator limit)")
                continue
            for cap, name, old in caps:
                r = run(name, "cap", fastnet, {**data, "limit": cap_rows},
                        {"epochs": 1, "batch_size": 1024, "data_path": "auto", "loader_workers": 0},
                        {"cap_gib": cap, "old_gather": old})
                r["cap_gib"] = cap
                cap_results.append(r)
                save()
        save()
    run_s = round(time.perf_counter() - t_run, 1)
    md = [f"# Training through the store on a GPU: resident vs streamed (issue 19 item 3)", "",
          *(f"- {k}: {v}" for k, v in header.items()),
          f"- CIFAR-10 snapshot into a fresh store (pipeline.snapshot.snapshot, {os.cpu_count()} decode processes): "
          f"cold {snap_times['cold']} s, no-op {snap_times['no-op']} s",
          f"- {rows:,}-row 28x28x1 store built from arrays by store.plan_snapshot + store.write_snapshot (no decode; "
          f"one process): {store_s.get('total')} s in all (rows staged and hashed {store_s.get('rows_and_hashes')} s, "
          f"plan {store_s.get('plan')} s, write {store_s.get('write')} s, load + {store_s.get('rows_checked')} rows "
          f"re-hashed {store_s.get('load_and_check')} s); its train split is the first 80%",
          f"- the whole run (the cases' processes included): {run_s} s",
          "- one trial per row; every row its own process (host: its VmHWM, file pages it maps included, and "
          "its RssAnon sampled every 10 ms; device peak: torch.cuda.max_memory_allocated)", "", table(results), "",
          "## Simulated card caps", "",
          f"fastnet (conf/train/fastnet.yaml), one epoch at batch 1024, data_path auto, on {cap_rows:,} rows of "
          f"32x32x3 ({cap_rows * 3072 / 2**20:,.1f} MiB, under resident_max_mib {budget_mib:g}), in a process capped "
          "by torch.cuda.set_per_process_memory_fraction (the caching allocator's limit; the CUDA context is outside "
          "it, so this is not a real card of that size). \"old: one gather\" patches augment.chunk_rows_for in that "
          "process to return the row count.", ""]
    md += [cap_table(cap_results) if cap_results else "Not run (--groups)." if "caps" not in groups else
           "Skipped: no CUDA device (the cap is a CUDA allocator limit)." if not cuda else "No cap case ran.", ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)
    bad = [r for r in results if "error" in r or "oom" in r] + [r for r in cap_results if "error" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
