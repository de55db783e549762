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
3. **At scale.** 1M rows of 28x28x1 (748 MiB: small_cnn, conf/train/digits.yaml at batch 512)
   and 1M rows of 32x32x3 (2,930 MiB: fastnet, over the 2,048 MiB ``resident_max_mib``, so auto
   streams) as ``np.memmap`` files (CIFAR-10's training pixels tiled, grey and cropped for 28x28),
   one epoch each way: what streaming costs against the resident path, and what auto picks.

    python bench/gpu_data_path.py --data .gpu/cifar10 --out $OUT      # on the GPU box
    python bench/gpu_data_path.py --smoke                             # CPU code path, tiny sizes

Needs torch, numpy, pandas, pyarrow, Pillow, PyYAML (conf/ read as in cifar10_verdict.py) and
scikit-learn (its imports); no dvc, mlflow, omegaconf or GX. Writes ``gpu_data_path.md`` and
``gpu_data_path.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
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
        test = store.load_snapshot(case["store"], case["snapshot"], lazy=True, columns=("split",), split="test")
        xt, yt, _ = test.split("test")
        return x, np.asarray(y), np.asarray(xt), np.asarray(yt)
    x = np.load(case["images"], mmap_mode="r")
    return x, np.load(case["labels"]), None, None


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


def run_case(case: dict) -> dict:
    from bench.scale import proc_mib

    anon = AnonPeak()
    import torch

    from bench.cifar10_verdict import compose_group, typed
    from pipeline.schema import ModelConfig, TrainConfig
    from pipeline.core.data import data_path_for
    from pipeline.core.predict import predict
    from pipeline.core.train import train_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    x, y, xt, yt = load_case(case)
    t_load = time.perf_counter() - t0
    train_name, model_name = case["conf"]
    spec = typed(TrainConfig, {**compose_group("train", train_name), "device": device, **case["overrides"]},
                 f"conf/train/{train_name}.yaml")
    model = typed(ModelConfig, compose_group("model", model_name), f"conf/model/{model_name}.yaml")
    path = data_path_for(x, spec, torch.device(device).type)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    net, _, hist = train_model(x, y, int(y.max()) + 1, model.name, model.width, spec)
    if device == "cuda":
        torch.cuda.synchronize()
    t_train = time.perf_counter() - t0
    out = {"rows": len(x), "pixel_mib": round(x.size / 2**20, 1) if hasattr(x, "size") else None,
           "path": path, "load_s": round(t_load, 2), "train_s": round(t_train, 2),
           "epoch_s": [round(h["seconds"], 3) for h in hist], "loss": [h["loss"] for h in hist],
           "images_per_s_last": round(hist[-1]["images_per_s"]),
           "device_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None}
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


def write_scale_rows(store_dir: str, sid: str, work: Path, rows: int, grey28: bool) -> tuple[str, str]:
    """``rows`` rows of CIFAR-10's training pixels tiled (grey, centre 28x28 crop with ``grey28``)
    into an ``np.memmap`` .npy file, a chunk at a time; its labels beside it."""
    from pipeline.data import store

    snap = store.load_snapshot(store_dir, sid, lazy=True, columns=("split",), split="train")
    x, y, _ = snap.split("train")
    x, y = np.asarray(x), np.asarray(y, np.int64)
    if grey28:
        x = (x[:, 2:30, 2:30].astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))[..., None].round().astype(np.uint8)
    name = "rows28" if grey28 else "rows32"
    mm = np.lib.format.open_memmap(work / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(rows, *x.shape[1:]))
    for a in range(0, rows, len(x)):
        mm[a:a + len(x)] = x[: rows - a]
    mm.flush()
    del mm
    np.save(work / f"{name}_labels.npy", np.resize(y, rows))
    return str(work / f"{name}.npy"), str(work / f"{name}_labels.npy")


def table(results: list[dict]) -> str:
    head = ("| case | rows | path (asked → used) | workers | epochs | s/epoch (steady) | first epoch s | train s | "
            "host VmHWM MiB | host anon peak MiB | device peak MiB | test acc | max abs Δloss vs resident |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    ref: dict[str, list] = {}
    for r in results:
        if r.get("asked") == "resident" and "loss" in r:
            ref[r["group"]] = r["loss"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | — | {r['asked']} | — | — | error: {r['error']} | | | | | | | |")
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/datasets/cifar10"), help="CIFAR-10 archives or folder")
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of each scale case")
    ap.add_argument("--smoke", action="store_true", help="CPU code path: 200 rows a split, 2k scale rows, 1 epoch")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        Path(args.result).write_text(json.dumps(run_case(json.loads(args.case))))
        return 0

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_data_path_smoke" if args.smoke else "gpu_data_path"
    limit = 200 if args.smoke else None
    rows = 2000 if args.smoke else args.rows
    epochs = {"epochs": 1} if args.smoke else {}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    header = {"device": gpu, "torch": torch.__version__, "python": platform.python_version(),
              "cpus": os.cpu_count(), "data": args.data, "rows": rows, "command": " ".join(sys.argv)}
    say(json.dumps(header))
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu_data_path_") as tmp:
        work = Path(tmp)
        sid, snap_times = snapshot_cifar(args.data, work, limit)
        base = {"data": "store", "store": str(work / "store"), "snapshot": sid}
        cases = [("cifar10 store", "cifar10", base, {**epochs, "data_path": p, "loader_workers": w})
                 for p, w in (("resident", 0), ("stream", 0), ("stream", 4), ("auto", 0))]
        for grey in (True, False):
            imgs, labels = write_scale_rows(str(work / "store"), sid, work, rows, grey)
            say(f"wrote {rows:,} rows to {imgs}")
            batch = 512 if grey else 1024
            group = "28x28x1" if grey else "32x32x3"
            for p, w in (("resident", 0), ("stream", 4), ("stream", 0), ("auto", 4)):
                cases.append((f"{rows:,} x {group}", group, {"data": "memmap", "images": imgs, "labels": labels},
                              {"epochs": 1, "batch_size": batch, "data_path": p, "loader_workers": w}))
        for name, group, data, over in cases:
            conf = ("digits", "small_cnn") if group == "28x28x1" else ("fastnet", "fastnet")
            case = {**data, "conf": conf, "overrides": over}
            say(f"{name}: {conf}, {over}")
            r = child(case)
            r.update(name=name, group=group, asked=over["data_path"], workers=over["loader_workers"], conf=conf)
            say(f"  -> {json.dumps({k: v for k, v in r.items() if k not in ('loss',)})}")
            results.append(r)
            (out / f"{stem}.json").write_text(json.dumps({**header, "snapshot_s": snap_times, "results": results}, indent=1))
    md = [f"# Training through the store on a GPU: resident vs streamed (issue 19 item 3)", "",
          *(f"- {k}: {v}" for k, v in header.items()),
          f"- CIFAR-10 snapshot into a fresh store (pipeline.snapshot.snapshot, {os.cpu_count()} decode processes): "
          f"cold {snap_times['cold']} s, no-op {snap_times['no-op']} s",
          "- one trial per row; every row its own process (host: its VmHWM, file pages it maps included, and "
          "its RssAnon sampled every 10 ms; device peak: torch.cuda.max_memory_allocated)", "", table(results), ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
