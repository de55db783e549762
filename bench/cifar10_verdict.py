"""CIFAR-10 two-model verdict benchmark: seed-style loop vs the project's GPU core (issue 6).

One run, one GPU, three configurations, each producing the full two-model verdict the pipeline
makes (a clean twin and a candidate trained with 40% of class 1 relabelled 9, both evaluated on
the clean test split, the gate's accuracy and per-class recall rules applied):

  (a) ``reference``: the seed-style loop of GUIDE §5 row 1 -- torchvision ResNet-18 (3x3 stem,
      no max-pool), DataLoader over PIL images with RandomHorizontalFlip + ToTensor + Normalize,
      Adam 1e-3, batch 128, fp32, 10 epochs; evaluation with ToTensor + Normalize, no TTA.
  (b) ``resnet18``: ``pipeline.core.models.build_model("resnet18")`` trained by the project's
      one training loop (``pipeline.core.train.train_model``/``fit``: resident uint8 data,
      on-device crop+flip, bf16, channels_last, SGD one-cycle, label smoothing) with
      conf/train/resnet18.yaml; evaluated by ``pipeline.core.predict``: plain forward (gated, as in
      the pipeline) and, when the train config says ``tta``, with TTA (reported).
  (c) ``fastnet``: the same with ``fastnet`` and conf/train/fastnet.yaml + conf/model/fastnet.yaml.

Everything but the two training loops and the timing is the pipeline's own code: the data come
from ``pipeline.data.sources.load_imagefolder``, the label flip from ``pipeline.core.attacks.poison``,
the metrics from ``pipeline.evaluate.classification_metrics``, the verdict from ``gates.rules``
with a conf/gate preset (``--gate``), the hyper-parameters from conf/train + conf/model as
``pipeline.schema`` types. Needs torch, torchvision, numpy, Pillow, PyYAML and scikit-learn (no
omegaconf, dvc or mlflow): bench/README.md says which wheels to carry to a box without the last two.

    python bench/cifar10_verdict.py --data ../shared/datasets/cifar10            # full, on a GPU
    python bench/cifar10_verdict.py --data .gpu/cifar10 --trials 5 --ref-trials 1 --gate cifar10
    python bench/cifar10_verdict.py --smoke                                      # CPU code path

Timing: ``s/model`` = training wall time of one model (data upload, whitening init, all epochs;
synchronised), ``s/epoch`` = mean epoch time, ``to verdict`` = wall time from the start of the twin's
training to the gate verdict (both trainings, both evaluations, the gate). JPEG decoding is shared
by all configurations and reported once. Before timing, each configuration runs one untimed
warm-up (1 epoch on a subset ending in a batch of the real last-batch size, then one evaluation:
cuDNN autotuning of every batch shape, allocator; ``--no-warmup`` to skip).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, get_type_hints

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gates import rules  # noqa: E402
from pipeline.core.attacks import AttackError, poison, resolve_attack  # noqa: E402
from pipeline.core.models import build_model  # noqa: E402
from pipeline.core.predict import predict  # noqa: E402
from pipeline.core.train import augment_pad, resolve_device, train_model  # noqa: E402
from pipeline.data.sources import SPLITS, load_imagefolder  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.evaluate import classification_metrics  # noqa: E402
from pipeline.schema import MISSING, ConfigError, GateConfig, ModelConfig, TrainConfig, check_gate  # noqa: E402

CONF = REPO / "conf"
DEFAULT_OUT = str(REPO / "bench/results/cifar10_verdict.md")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the seed loop's fixed Normalize constants
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# Imported by the bench's edge (conf/ reading, metrics) but absent from a bare torch box: checked
# before any decoding or training, so a missing one costs no GPU time.
EDGE_PACKAGES = {"yaml": "PyYAML", "sklearn": "scikit-learn"}


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    x_train: np.ndarray  # uint8 (N, H, W, C)
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    ids_train: list[str] = field(default_factory=list)  # sample ids of the train rows (poison records)
    decode_s: float = 0.0
    loader: str = ""


def first_per_class(labels: np.ndarray, limit: Optional[int]) -> np.ndarray:
    """Sorted indices of ``limit`` rows taken one per class in turn, in row order.

    This is ``load_imagefolder``'s own ``limit`` rule (round-robin over classes, first file first)
    and that rule only adds rows as the limit grows, so decoding with the larger of two limits and
    cutting one split down here gives exactly the rows a decode with the smaller limit would.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rank = np.empty(len(labels), np.int64)  # position of each row within its class
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rank[rows] = np.arange(len(rows))
    return np.sort(np.lexsort((labels, rank))[:limit])


def load_data(path: Path, limit_train: Optional[int], limit_test: Optional[int], workers: int,
              progress: Optional[Callable[[str], None]] = None) -> Data:
    """Decode with ``pipeline.data.sources.load_imagefolder`` (one ``limit`` for both splits: the
    larger one), then cut each split to its own limit with :func:`first_per_class`."""
    t0 = time.perf_counter()
    limits = dict(zip(SPLITS, (limit_train, limit_test)))
    decode_limit = None if None in limits.values() else max(limits.values())  # type: ignore[type-var]
    src = load_imagefolder(str(path), decode_limit, workers, progress=progress)
    rows = {}
    for split, limit in limits.items():
        part = np.flatnonzero(src.splits == split)
        rows[split] = part[first_per_class(src.labels[part], limit)]
    tr, te = rows["train"], rows["test"]
    return Data(src.images[tr], src.labels[tr], src.images[te], src.labels[te], list(src.class_names),
                [src.sample_ids[i] for i in tr], time.perf_counter() - t0, "pipeline.data.sources.load_imagefolder")


def resize(images: np.ndarray, side: int) -> np.ndarray:
    """Area-resize uint8 (N, H, W, C) images to side x side (smoke runs only)."""
    if images.shape[1] == side:
        return images
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.interpolate(t, size=(side, side), mode="area")
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def flip_labels(data: Data, source: Any, target: Any, rate: float, seed: int) -> tuple[np.ndarray, dict, int]:
    """The poison stage's label flip of the train split: ``(labels, resolved attack, rows flipped)``.

    ``source``/``target`` are class indices or names; a bad class, ``source == target`` or a rate
    outside [0, 1] is an ``AttackError``.
    """
    spec = {"name": "label_flip", "source": source, "target": target, "rate": rate, "seed": seed}
    attack = resolve_attack(spec, data.class_names)
    _, labels, records = poison(data.x_train, data.y_train, data.ids_train, spec, data.class_names)
    return labels, attack, len(records)


# ----------------------------------------------------------------------------- config files


def compose_group(group: str, name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """conf/GROUP/NAME.yaml as a plain mapping, its same-group ``defaults`` list applied.

    Hydra's order: the entries in turn, ``_self_`` where it stands (last when absent). Hydra itself
    needs omegaconf, which the GPU box lacks, and conf/gate/cifar10.yaml (``defaults: [default,
    _self_]``) is all the bench meets; an entry naming another group is refused.
    """
    path = CONF / group / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
        raise ConfigError(f"no conf/{group}/{name}.yaml: use one of {options}")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    defaults = raw.pop("defaults", None) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: defaults must be a list of option names, got {defaults!r}")
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    out: dict[str, Any] = {}
    for entry in defaults:
        if entry == "_self_":
            out.update(raw)
        elif isinstance(entry, str) and entry not in (*_seen, name):
            out.update(compose_group(group, entry, (*_seen, name)))
        else:
            raise ConfigError(f"{path}: defaults entry {entry!r} is not an option of conf/{group}/ "
                              "(or it includes itself); compose it with `python -m pipeline.config compose`")
    return out


def typed(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """A ``pipeline.schema`` dataclass from a plain mapping.

    What OmegaConf's structured merge does in ``pipeline.config`` (not importable on the GPU
    box): an unknown key, a required value left out, or a value of the wrong type is refused
    naming the key; ints and numeric strings (YAML 1.1 reads ``1e-3`` as a string) become floats
    for float fields. Ranges are the caller's (``schema.check`` judges a whole ``Config`` only).
    """
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}: use {', '.join(known)}")
    hints = get_type_hints(cls)
    out = {}
    for key, value in values.items():
        want = hints[key]
        if want is float and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                pass
        if want in (bool, int, float, str) and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise ConfigError(f"{where}: {key} = {value!r} is {type(value).__name__}, not {want.__name__}")
        out[key] = value
    obj = cls(**out)
    missing = [k for k in known if isinstance(getattr(obj, k), str) and getattr(obj, k) == MISSING]
    if missing:
        raise ConfigError(f"{where}: required key(s) {missing} have no value")
    return obj


def core_config(name: str, device: str, **overrides: Any) -> tuple[TrainConfig, ModelConfig]:
    """conf/train/NAME.yaml and conf/model/NAME.yaml as schema types, ``overrides`` (TrainConfig
    fields, or ``width``) on top; an unknown key, here or in the files, is a ``ConfigError``."""
    over = dict(overrides)
    model_over = {"width": over.pop("width")} if "width" in over else {}
    unknown = sorted(set(over) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for {name}: use TrainConfig fields or width")

    def where(group: str, keys: Mapping[str, Any]) -> str:
        return f"conf/{group}/{name}.yaml" + (f" with {', '.join(sorted(keys))} overridden" if keys else "")

    spec = typed(TrainConfig, {**compose_group("train", name), "device": device, **over}, where("train", over))
    model = typed(ModelConfig, {**compose_group("model", name), **model_over}, where("model", model_over))
    if model.name != name:
        raise ConfigError(f"conf/model/{name}.yaml builds model {model.name!r}, not {name!r}")
    return spec, model


def gate_config(preset: str) -> GateConfig:
    """The release gate's thresholds of conf/gate/PRESET.yaml (``gates.rules.Thresholds``)."""
    t = typed(GateConfig, compose_group("gate", preset), f"conf/gate/{preset}.yaml")
    try:
        check_gate(t)  # the pipeline's own ranges (NaN refused): a threshold that cannot fail is no gate
    except ConfigError as exc:
        raise ConfigError(f"conf/gate/{preset}.yaml: {exc}") from None
    return t


# ----------------------------------------------------------------------------- gate


def gate(candidate: Mapping[str, Any], baseline: Mapping[str, Any], t: GateConfig) -> list[dict[str, Any]]:
    """The release gate's accuracy and per-class recall rules (``gates.rules``).

    Not ``rules.evaluate_gate``: its identity, validation and ASR checks judge the pipeline's
    lineage records and a trigger scan, which a label-flip bench does not make (they would fail
    closed on every trial and hide the rules measured here).
    """
    return [c.to_dict() for c in (*rules.accuracy_checks(candidate, baseline, t),
                                  *rules.recall_checks(candidate, baseline, t))]


def missing_packages() -> list[str]:
    """pip names of the bench's edge packages that this Python cannot import."""
    return [pip for mod, pip in EDGE_PACKAGES.items() if importlib.util.find_spec(mod) is None]


# ----------------------------------------------------------------------------- trainers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass
class Trained:
    model: nn.Module
    train_s: float
    epoch_s: list[float]


class _PILSet(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_model(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


def train_reference(x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int, dev: torch.device,
                    workers: int, seed: int) -> Trained:
    """GUIDE §5 row 1: DataLoader + PIL transforms, Adam 1e-3, batch 128, fp32."""
    from torchvision import transforms as T

    torch.manual_seed(seed)
    tf = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    loader = torch.utils.data.DataLoader(_PILSet(x, y, tf), batch_size=128, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    t0 = time.perf_counter()
    model = reference_model(num_classes).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    epoch_s = []
    for _ in range(epochs):
        te = time.perf_counter()
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(dev), yb.to(dev)
            loss = crit(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync(dev)
        epoch_s.append(time.perf_counter() - te)
    return Trained(model.eval(), time.perf_counter() - t0, epoch_s)


@torch.no_grad()
def predict_reference(model: nn.Module, x: np.ndarray, dev: torch.device, workers: int) -> np.ndarray:
    from torchvision import transforms as T

    tf = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    loader = torch.utils.data.DataLoader(_PILSet(x, np.zeros(len(x)), tf), batch_size=512, num_workers=workers)
    preds = [model(xb.to(dev)).argmax(1).cpu() for xb, _ in loader]
    return torch.cat(preds).numpy()


def train_core(name: str, width: int, spec: TrainConfig, x: np.ndarray, y: np.ndarray, num_classes: int) -> Trained:
    """``pipeline.core.train.train_model``: seed, Normalize from the training mean/std, build via
    core.models, ``data_init`` hooks (fastnet whitening), :func:`pipeline.core.train.fit`."""
    dev = resolve_device(spec.device)
    t0 = time.perf_counter()
    model, _, hist = train_model(x, y, num_classes, name, width, spec)
    sync(dev)
    return Trained(model.eval(), time.perf_counter() - t0, [h["seconds"] for h in hist])


def warm_size(n: int, batch: int, full_batches: int = 4) -> int:
    """Rows of a warm-up subset: a few full batches plus one of the size the full set's last
    batch has (``n % batch``), so every batch shape of the timed run is autotuned beforehand."""
    return min(n, full_batches * batch + n % batch)


# ----------------------------------------------------------------------------- one verdict


@dataclass
class Result:
    config: str
    trial: int
    epochs: int
    epoch_s: float
    model_s: float
    verdict_s: float
    twin: dict
    cand: dict
    checks: list
    blocked: bool
    recall_blocked: bool
    extra: dict = field(default_factory=dict)


Predictions = tuple[np.ndarray, Optional[np.ndarray]]  # plain forward (gated), TTA (reported) or None


def evaluate(predict_fn: Callable[[nn.Module], Predictions], model: nn.Module, data: Data) -> dict[str, Any]:
    """Metrics of the plain forward pass (what the pipeline's gate uses) plus ``accuracy_tta``."""
    plain, tta = predict_fn(model)
    m = classification_metrics(data.y_test, plain, data.class_names)
    m["accuracy_tta"] = float(np.mean(tta == data.y_test)) if tta is not None else None
    return m


def verdict(config: str, trial: int, epochs: int, train_fn: Callable[[np.ndarray], Trained],
            predict_fn: Callable[[nn.Module], Predictions], data: Data, y_poison: np.ndarray,
            thr: GateConfig, dev: torch.device, log: Callable[[str], None]) -> Result:
    t0 = time.perf_counter()
    twin = train_fn(data.y_train)
    m_twin = evaluate(predict_fn, twin.model, data)
    cand = train_fn(y_poison)
    m_cand = evaluate(predict_fn, cand.model, data)
    checks = gate(m_cand, m_twin, thr)
    sync(dev)
    total = time.perf_counter() - t0
    blocked = not all(c["passed"] for c in checks)
    recall_blocked = any(not c["passed"] for c in checks if c["name"].startswith("recall_drop"))
    epoch_s = statistics.mean(twin.epoch_s + cand.epoch_s)
    r = Result(config, trial, epochs, epoch_s, (twin.train_s + cand.train_s) / 2, total, m_twin, m_cand, checks,
               blocked, recall_blocked)
    failed = [c["name"] for c in checks if not c["passed"]]
    log(f"  {config} trial {trial}: {r.epoch_s:.3f} s/epoch, {r.model_s:.2f} s/model, verdict in {total:.2f} s; "
        f"acc twin {m_twin['accuracy']:.4f} (TTA {m_twin['accuracy_tta']}) cand {m_cand['accuracy']:.4f}; "
        f"{'BLOCKED (' + ', '.join(failed) + ')' if blocked else 'passed'}")
    return r


# ----------------------------------------------------------------------------- report


def _ms(vals: list[float], fmt: str) -> str:
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


def clean_pairs(rs: list[Result], thr: GateConfig) -> dict[str, Any]:
    """The gate's false alarms on clean models: every ordered pair of two trials' clean twins
    (different seeds, same data), one as candidate, the other as baseline, under the drop rules
    (accuracy_drop and recall_drop; the absolute accuracy floor is left out)."""
    pairs = [(a, b) for a in rs for b in rs if a is not b]
    blocked, rec, acc = 0, [], []
    for base, cand in pairs:
        checks = [c for c in gate(cand.twin, base.twin, thr) if c["name"] != "accuracy"]
        blocked += not all(c["passed"] for c in checks)
        drops = [c["value"] for c in checks if c["name"].startswith("recall_drop") and c["value"] is not None]
        if drops:
            rec.append(max(drops))
        acc.append(base.twin["accuracy"] - cand.twin["accuracy"])
    return {"pairs": len(pairs), "blocked": blocked, "max_recall_drop": max(rec, default=None),
            "max_accuracy_drop": max(acc, default=None)}


def table(results: list[Result], source_name: str, header: dict[str, Any], thr: GateConfig,
          preset: str = "default") -> str:
    configs = list(dict.fromkeys(r.config for r in results))
    refs = [c for c in configs if c.startswith("reference")]
    ref_t = {c: statistics.mean(r.verdict_s for r in results if r.config == c) for c in refs}
    ref = [r for r in results if refs and r.config == refs[0]]
    ref_acc = statistics.mean(r.twin["accuracy"] for r in ref) if ref else None
    lines = [f"# CIFAR-10 two-model verdict ({header['mode']})", ""]
    for k, v in header.items():
        lines.append(f"- {k}: {v}")
    speed_head = "speed-up vs " + " / ".join(refs) if refs else "speed-up"
    lines += ["", f"| config | trials | epochs | s/epoch | s/model | s to verdict | {speed_head} | clean acc (twin) "
              f"| twin acc with TTA | candidate acc | `{source_name}` recall twin → cand | Δ acc vs (a), pt (TTA) "
              f"| verdict, gate={preset} (blocked / trials) | clean-pair false alarms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        rs = [r for r in results if r.config == c]
        twin_acc = [r.twin["accuracy"] for r in rs]
        rec_t = [r.twin["per_class"][source_name]["recall"] for r in rs]
        rec_c = [r.cand["per_class"][source_name]["recall"] for r in rs]
        mine = statistics.mean(r.verdict_s for r in rs)
        speed = " / ".join(f"{t / mine:.1f}×" for t in ref_t.values()) if ref_t else "—"
        cp = clean_pairs(rs, thr)
        fa = f"{cp['blocked']}/{cp['pairs']}" if cp["pairs"] else "— (1 trial)"
        if cp["max_recall_drop"] is not None:
            fa += f" (max recall drop {100 * cp['max_recall_drop']:.1f} pt)"
        tta_acc = [r.twin["accuracy_tta"] for r in rs if r.twin.get("accuracy_tta") is not None]
        dacc = f"{100 * (statistics.mean(twin_acc) - ref_acc):+.1f}" if ref_acc is not None else "—"
        if ref_acc is not None and tta_acc:
            dacc += f" ({100 * (statistics.mean(tta_acc) - ref_acc):+.1f})"
        tta_cell = f"{_ms([100 * a for a in tta_acc], '.2f')}%" if tta_acc else "—"
        nb = sum(r.blocked for r in rs)
        nr = sum(r.recall_blocked for r in rs)
        lines.append(
            f"| {c} | {len(rs)} | {rs[0].epochs} | {_ms([r.epoch_s for r in rs], '.3f')} | {_ms([r.model_s for r in rs], '.2f')} "
            f"| {_ms([r.verdict_s for r in rs], '.2f')} | {speed} | {_ms([100 * a for a in twin_acc], '.2f')}% "
            f"| {tta_cell} | {_ms([100 * r.cand['accuracy'] for r in rs], '.2f')}% | {_ms([100 * v for v in rec_t], '.1f')}% → "
            f"{_ms([100 * v for v in rec_c], '.1f')}% | {dacc} | {nb}/{len(rs)} (recall rule {nr}/{len(rs)}) | {fa} |")
    lines += ["", "Accuracies are of the plain forward pass, which the pipeline's gate uses; `twin acc with TTA` "
              "(flip + ±2 px translates, 6 views) is what `evaluate` reports as `accuracy_tta`; (a) has no TTA.",
              "", "Verdict: candidate (40% of class `" + source_name + "` relabelled) vs its clean twin under the gate's "
              "accuracy and per-class recall rules; `recall rule` counts trials where a per-class recall drop alone "
              "blocks it (the detection that matters; `min_accuracy` also blocks any model under the floor). "
              "`clean-pair false alarms`: ordered pairs of two trials' clean twins (different seeds) that the drop "
              "rules (accuracy_drop, recall_drop) would block, and the largest per-class recall drop between them.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/datasets/cifar10"),
                    help="ImageFolder folder, .tar.gz, or folder with *-train/*-test .tar.gz (default ../shared/datasets/cifar10)")
    ap.add_argument("--configs", default="reference,resnet18,fastnet", help="comma list of reference,resnet18,fastnet")
    ap.add_argument("--trials", type=int, default=3, help="trials of (b) and (c)")
    ap.add_argument("--ref-trials", type=int, default=1, help="trials of (a), the slow reference")
    ap.add_argument("--ref-epochs", type=int, default=10)
    ap.add_argument("--ref-workers", default="4",
                    help="DataLoader workers of the reference loop; a comma list (4,2) times one reference per "
                         "value, the first named `reference`, the others `reference-w<N>`")
    ap.add_argument("--epochs", action="append", default=[], metavar="CONFIG=N", help="override epochs, e.g. fastnet=12")
    ap.add_argument("--compile", action="store_true", help="torch.compile (b) and (c) (off by default)")
    ap.add_argument("--no-tta", action="store_true")
    ap.add_argument("--source", default=1, help="class (index or name) whose rows are relabelled")
    ap.add_argument("--target", default=9, help="class (index or name) they are relabelled as")
    ap.add_argument("--rate", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gate", default="default", metavar="PRESET",
                    help="thresholds of conf/gate/PRESET.yaml: " + ", ".join(sorted(p.stem for p in (CONF / "gate").glob("*.yaml"))))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0, help="decode processes (0 = one per core)")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None, help="area-resize images (smoke runs)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU code-path check: 128 train / 64 test, 16 px, 1 epoch, 1 trial, no warm-up; "
                         "writes bench/results/cifar10_verdict_smoke.md")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    epochs_override = {}
    for item in args.epochs:
        k, _, v = item.partition("=")
        epochs_override[k] = int(v)
    if args.smoke:
        args.limit_train = args.limit_train or 128
        args.limit_test = args.limit_test or 64
        if args.out == DEFAULT_OUT:
            args.out = str(REPO / "bench/results/cifar10_verdict_smoke.md")
        args.image_size = args.image_size or 16
        args.trials, args.ref_trials, args.ref_workers, args.no_warmup = 1, 1, "0", True
        args.ref_epochs = 1
        for c in ("resnet18", "fastnet"):
            epochs_override.setdefault(c, 1)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in ("reference", "resnet18", "fastnet"):
            print(f"error: unknown config {c!r}", file=sys.stderr)
            return 2
    try:
        ref_workers = [int(w) for w in str(args.ref_workers).split(",") if w.strip()]
    except ValueError:
        ref_workers = []
    if not ref_workers or min(ref_workers) < 0:
        print(f"error: --ref-workers must be a comma list of integers >= 0, got {args.ref_workers!r}", file=sys.stderr)
        return 2
    loader_workers: dict[str, int] = {}
    if "reference" in configs:
        names = ["reference"] + [f"reference-w{w}" for w in ref_workers[1:]]
        loader_workers = dict(zip(names, ref_workers))
        i = configs.index("reference")
        configs[i:i + 1] = names

    missing = missing_packages()
    if missing:
        print(f"error: this Python cannot import {', '.join(missing)}: pip install them, or carry their wheels to "
              "the GPU box (bench/README.md names the wheels)", file=sys.stderr)
        return 2
    import sklearn.metrics  # noqa: F401 - classification_metrics imports it lazily: once here, not in a timed verdict
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    workers = args.workers or (os.cpu_count() or 1)
    try:  # every refusal before any training: configs first, then the data
        thr = gate_config(args.gate)
        cores = {c: core_config(c, str(dev), compile=args.compile, **({"epochs": epochs_override[c]} if c in epochs_override else {}))
                 for c in configs if not c.startswith("reference")}
        data = load_data(Path(args.data), args.limit_train, args.limit_test, workers, progress=log)
        y_poison, attack, n_flipped = flip_labels(data, args.source, args.target, args.rate, args.seed)
    except (UserError, AttackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.image_size:
        data.x_train, data.x_test = resize(data.x_train, args.image_size), resize(data.x_test, args.image_size)
    n_cls = len(data.class_names)
    source_name, target_name = data.class_names[attack["source"]], data.class_names[attack["target"]]
    log(f"data: {len(data.x_train)} train / {len(data.x_test)} test {data.x_train.shape[1:]} decoded in "
        f"{data.decode_s:.1f} s ({data.loader}, {workers} workers); {n_flipped} rows of "
        f"{source_name} relabelled {target_name}; device {dev}")

    results: list[Result] = []
    specs: dict[str, dict] = {}

    for c in configs:
        if c.startswith("reference"):
            ep, n_trials, nw = args.ref_epochs, args.ref_trials, loader_workers[c]
            specs[c] = {"optimizer": "adam", "lr": 1e-3, "batch_size": 128, "epochs": ep, "amp": False,
                        "loader_workers": nw}

            def make_train(seed: int, ep: int = ep, nw: int = nw) -> Callable[[np.ndarray], Trained]:
                return lambda y: train_reference(data.x_train, y, n_cls, ep, dev, nw, seed)

            def predict_fn(model: nn.Module, nw: int = nw) -> Predictions:
                return predict_reference(model, data.x_test, dev, nw), None

            def warm() -> None:
                # a subset that ends in a batch of the full set's last-batch size: those shapes get
                # their cuDNN autotuning here, not in the first timed trial
                n_tr, n_te = warm_size(len(data.x_train), 128), warm_size(len(data.x_test), 512)
                t = train_reference(data.x_train[:n_tr], data.y_train[:n_tr], n_cls, 1, dev, 0, 0)
                predict_reference(t.model, data.x_test[:n_te], dev, 0)
        else:
            base, width = cores[c][0], cores[c][1].width
            ep, n_trials, tta = base.epochs, args.trials, base.tta and not args.no_tta
            probe = build_model(c, n_cls, data.x_train.shape[-1], data.x_train.shape[1], width)
            pad = augment_pad(probe, base.aug_pad)  # the crop padding fit uses (a model's augment_pad wins)
            specs[c] = {**asdict(base), "aug_pad": pad, "tta": tta, "width": width}

            def make_train(seed: int, c: str = c, base: TrainConfig = base,
                           width: int = width) -> Callable[[np.ndarray], Trained]:
                spec = replace(base, seed=seed)
                return lambda y: train_core(c, width, spec, data.x_train, y, n_cls)

            def predict_fn(model: nn.Module, tta: bool = tta) -> Predictions:
                plain = predict(model, data.x_test, batch_size=1024, device=dev)
                return plain, (predict(model, data.x_test, batch_size=1024, device=dev, tta=True) if tta else None)

            def warm(c: str = c, base: TrainConfig = base, width: int = width) -> None:
                n_tr = warm_size(len(data.x_train), base.batch_size)
                t = train_core(c, width, replace(base, epochs=1), data.x_train[:n_tr], data.y_train[:n_tr], n_cls)
                predict_fn(t.model)

        log(f"[{c}] {n_trials} trial(s), {ep} epochs")
        if not args.no_warmup:
            warm()
        for trial in range(n_trials):
            train_fn = make_train(args.seed + trial)
            results.append(verdict(c, trial, ep, train_fn, predict_fn, data, y_poison, thr, dev, log))

    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    header = {
        "mode": "SMOKE (tiny CPU code-path check: numbers mean nothing)" if args.smoke else "full",
        "device": gpu_name,
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "trials": ", ".join(f"{c}: {sum(r.config == c for r in results)}" for c in configs),
        "data": f"{args.data} ({len(data.x_train)} train / {len(data.x_test)} test, {data.x_train.shape[1]} px; decoded in {data.decode_s:.1f} s by {data.loader})",
        "poison": f"{n_flipped} of class {source_name} → {target_name} (rate {args.rate}; pipeline.core.attacks.poison)",
        "gate": f"preset {args.gate} (conf/gate/{args.gate}.yaml): " + ", ".join(
            f"{k}={getattr(thr, k)}" for k in ("max_recall_drop", "min_accuracy", "max_accuracy_drop"))
        + "; rules: gates.rules.accuracy_checks + recall_checks",
        "warm-up": "none" if args.no_warmup else "one untimed 1-epoch run per config (4 batches + one of the last batch's size) and one evaluation",
        "compile": args.compile,
        "configs": "; ".join(f"{c}: " + ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("device",)) for c, s in specs.items()),
        "command": "python " + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    text = table(results, source_name, header, thr, args.gate)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps({"header": header, "gate_preset": args.gate, "thresholds": asdict(thr), "results": [asdict(r) for r in results]}, indent=1)
    for path, body in ((out, text), (out.with_suffix(".json"), raw)):  # every trial, per-class, for re-analysis
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, path)
    print()
    print(text)
    print(f"saved {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
