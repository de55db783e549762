"""Tuning sweep and profiler for the CIFAR-10 GPU path (issue 6): one clean model per variant.

Loads CIFAR-10 once, then for every ``--run`` trains one clean model with the project's loop
(``pipeline.core.train.train_model``) and evaluates it on the test split with the plain forward
pass (what the gate uses) and with TTA. Rows are appended to ``--out`` as JSON lines as soon as
each finishes (a killed run keeps what it did) and a table is printed last.

    python bench/cifar10_tune.py --data .gpu/cifar10 \\
        --run fastnet --run fastnet:lr=0.8,epochs=12 --run resnet18:epochs=2,compile=true \\
        --profile resnet18:batch_size=512

``--run NAME[:key=value,...]``: NAME is resnet18 or fastnet; keys are ``TrainConfig`` fields
(epochs, lr, batch_size, compile, ...) or ``width``, values YAML scalars; defaults come from
conf/train/NAME.yaml and conf/model/NAME.yaml through the verdict bench's ``core_config`` (the
same schema types and checks). ``--profile`` runs ``torch.profiler`` over one epoch on a 10k-image subset
(after a warm-up epoch) and prints the kernels that take the most GPU time: the limiting factor
of a missed target. Needs torch, numpy, Pillow and PyYAML (no scikit-learn; bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import yaml  # noqa: E402

from cifar10_verdict import core_config, load_data, resize  # noqa: E402
from pipeline.core.predict import predict  # noqa: E402
from pipeline.core.train import fit, resolve_device, train_model  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.schema import TrainConfig  # noqa: E402

# ResNet-18 (3x3 stem, no max-pool) on 32x32: forward+backward GFLOP per image (GUIDE §5).
RESNET18_GFLOP_PER_IMAGE = 3.33


def parse_run(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    if name not in ("resnet18", "fastnet"):
        raise SystemExit(f"error: --run {text!r}: model must be resnet18 or fastnet")
    kw: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --run {text!r}: expected key=value, got {item!r}")
        try:
            kw[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise SystemExit(f"error: --run {text!r}: {k}={v!r} is not a YAML scalar ({e})") from None
    try:  # refuse unknown keys and wrong types before any data is loaded
        core_config(name, "cpu", **kw)
    except UserError as e:
        raise SystemExit(f"error: --run {text!r}: {e}") from None
    return name, kw


def make_spec(name: str, kw: dict[str, Any], device: str) -> tuple[TrainConfig, int, dict[str, Any]]:
    """The TrainConfig and width of a variant, and the overrides that made it (for the table)."""
    spec, model = core_config(name, device, **kw)
    return spec, model.width, dict(kw)


def run_one(name: str, kw: dict[str, Any], data, device: str, log) -> dict[str, Any]:
    spec, width, changed = make_spec(name, kw, device)
    dev = resolve_device(device)
    n_cls = len(data.class_names)
    t0 = time.perf_counter()
    model, _, hist = train_model(data.x_train, data.y_train, n_cls, name, width, spec)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    plain = float((predict(model, data.x_test, 1024, dev, tta=False) == data.y_test).mean())
    eval_s = time.perf_counter() - t1
    tta = float((predict(model, data.x_test, 1024, dev, tta=True) == data.y_test).mean())
    ep = [h["seconds"] for h in hist]
    steady = ep[1:] if len(ep) > 1 else ep
    row = {
        "model": name, "changed": changed, "epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr,
        "compile": spec.compile, "width": width, "s_model": train_s, "s_first_epoch": ep[0],
        "s_epoch_steady": statistics.median(steady), "s_eval_plain": eval_s,
        "acc_plain": plain, "acc_tta": tta, "final_train_loss": hist[-1]["loss"],
    }
    if name == "resnet18" and dev.type == "cuda":
        row["tflops_steady"] = RESNET18_GFLOP_PER_IMAGE * len(data.x_train) / row["s_epoch_steady"] / 1e3
    log(json.dumps(row))
    return row


def profile(name: str, kw: dict[str, Any], data, device: str, rows: int, out_dir: Path, log) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile

    spec, width, _ = make_spec(name, kw, device)
    dev = resolve_device(device)
    n = min(10240, len(data.x_train))
    x, y = data.x_train[:n], data.y_train[:n]
    n_cls = len(data.class_names)
    model, _, _ = train_model(x, y, n_cls, name, width, replace(spec, epochs=1))  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        hist = fit(model, x, y, replace(spec, epochs=1))
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    head = (f"# profile {name} {kw}: 1 epoch on {n} images, {hist[0]['seconds']:.3f} s "
            f"(x {len(data.x_train) / n:.2f} for the full set)\n")
    log(head + table)
    (out_dir / f"profile_{name}.txt").write_text(head + table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/datasets/cifar10"))
    ap.add_argument("--run", action="append", default=[], metavar="NAME[:k=v,...]")
    ap.add_argument("--profile", action="append", default=[], metavar="NAME[:k=v,...]")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "bench/results/cifar10_tune.jsonl"))
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    runs = [parse_run(r) for r in args.run]
    profs = [parse_run(r) for r in args.profile]
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        log(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    try:
        data = load_data(Path(args.data), args.limit_train, args.limit_test, os.cpu_count() or 1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.image_size:
        data.x_train, data.x_test = resize(data.x_train, args.image_size), resize(data.x_test, args.image_size)
    log(f"data: {len(data.x_train)} train / {len(data.x_test)} test, decoded in {data.decode_s:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a warm-up so that the first variant's time is not cuDNN autotuning and allocator growth
    if runs:
        spec, width, _ = make_spec(runs[0][0], {}, str(dev))
        train_model(data.x_train[:2048], data.y_train[:2048], len(data.class_names), runs[0][0], width,
                    replace(spec, epochs=1))
    rows = []
    for name, kw in runs:
        row = run_one(name, kw, data, str(dev), log)
        row["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        row["torch"] = torch.__version__
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    for name, kw in profs:
        profile(name, kw, data, str(dev), args.profile_rows, out.parent, log)
    if rows:
        log("\n| model | changed | epochs | s/epoch (steady) | first epoch | s/model | acc plain | acc TTA |")
        log("|---|---|---|---|---|---|---|---|")
        for r in rows:
            log(f"| {r['model']} | {r['changed']} | {r['epochs']} | {r['s_epoch_steady']:.3f} | {r['s_first_epoch']:.2f} "
                f"| {r['s_model']:.2f} | {100 * r['acc_plain']:.2f}% | {100 * r['acc_tta']:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
