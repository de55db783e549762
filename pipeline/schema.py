"""The configuration schema: plain dataclasses and their checks, standard library only.

One definition serves everything: ``pipeline.config`` reads params.yaml into these types with
OmegaConf (the only module that imports it), and the compute core, the gate rules and the data
sources take them directly. Nothing here imports a third-party package, so the schema loads on a
GPU machine that has torch and numpy but no omegaconf, dvc or mlflow.

Required values are ``MISSING`` (``???``, OmegaConf's marker). :func:`check` refuses every
invalid value with the key, the value and the allowed range, before any stage does work.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from collections.abc import Mapping
from typing import Any, Optional

from pipeline.errors import UserError

MISSING: Any = "???"

DATA_NAMES = ("digits", "cifar10", "imagefolder")
ATTACK_NAMES = ("none", "label_flip", "backdoor", "clean_label")
CLEAN_LABEL_METHODS = ("feature_collision", "label_consistent")
CRAFT_MODELS = ("auto", "twin")
MODEL_NAMES = ("small_cnn", "resnet18", "fastnet")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "onecycle")
LOSSES = ("ce", "lgm")
LGM_COVARIANCES = ("identity", "diag")
TRIGGER_KINDS = ("patch", "blend")
NAMED_LOCATIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
LOCATIONS = NAMED_LOCATIONS + ("random",)
PATCH_PATTERNS = ("white", "black", "checker", "noise")
BLEND_PATTERNS = ("noise", "checker")
ON_FAIL = ("stop", "warn")
ENGINES = ("pandas", "spark")
REMEDY_NAMES = ("none", "quarantine", "finetune")
REMEDY_METHODS = ("finetune", "fine_prune")
RESERVE_SOURCES = ("champion", "trusted")
SCAN_METHODS = ("max_margin", "neural_cleanse")  # pipeline.core.scan


class ConfigError(UserError):
    """A configuration the pipeline refuses to run with (exit 2)."""


@dataclass
class DataConfig:
    name: str = MISSING  # digits | cifar10 | imagefolder
    path: Optional[str] = None  # folder or .tar.gz (cifar10, imagefolder)
    # Deprecated and ignored: the snapshot stage runs on every `dvc repro` (always_changed) and
    # finds source changes itself, so nothing needs to tell DVC which path to hash. Kept so an
    # older params.yaml still loads; conf/ no longer sets it.
    watch: Optional[str] = None
    limit: Optional[int] = None  # keep the first N rows per split and class order (smoke tests)
    test_fraction: float = 0.25  # digits only: stratified test share
    seed: int = 0  # digits only: split seed
    download: bool = False  # cifar10 only: torchvision download when data.path is missing
    workers: int = 0  # decode processes; 0 = one per core
    # Hostile-input bounds, checked before anything is read or decoded (issue 16 item 7).
    max_file_bytes: int = 64 * 1024**2  # bytes: one source file or tar member; larger is refused unread
    max_image_pixels: int = 4096 * 4096  # pixels (width x height), read from the image header before decoding
    # Incremental snapshot: a known file whose (size, mtime) is unchanged is trusted without a read.
    verify_source: bool = False  # true: re-read and re-decode every file, compare pixels (full check)
    recheck_files: int = 32  # files: stat-trusted files re-read and digest-checked per run (spot check)
    # MiB: in the snapshot and poison processes (their manifest loads) and validate, host allocations
    # this large get their own mapping, returned when freed (core.heap.map_large); 0 = glibc's default
    heap_map_mib: int = 1
    # Variable-size images (issue 19 item 5): [height, width] every image is resized to at ingest;
    # null refuses a source with more than one image size. Part of the lineage key (a new store lineage).
    resize: Optional[list[int]] = None
    resize_mode: str = "fit"  # fit: scale + centre crop (aspect kept) | stretch: scale both sides


@dataclass
class TriggerConfig:
    kind: str = "patch"  # patch | blend
    size: int = 3  # patch side, pixels
    location: Any = "bottom_right"  # top_left | top_right | bottom_left | bottom_right | center | random | [y, x]
    pattern: str = "white"  # white | black | checker | noise (patch); noise | checker (blend)
    alpha: float = 0.1  # blend weight of the pattern, 0..1
    seed: int = 0  # seed of noise patterns and random locations


@dataclass
class ScanTrigger(TriggerConfig):
    """A trigger of the evaluate stage's scan set: a :class:`TriggerConfig` with a name."""

    name: str = MISSING


@dataclass
class AttackConfig:
    name: str = "none"  # none | label_flip | backdoor | clean_label
    source: Optional[Any] = None  # class name or index; null = all non-target classes
    target: Any = 0  # class name or index
    rate: float = 0.0  # fraction of the source rows (or of all non-target rows when source is null)
    seed: int = 0
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    # clean_label only (conf/attack/clean_label.yaml gives each its unit and reason; every label
    # stays true). label_consistent: `rate` of the `target` rows get a PGD perturbation, then the
    # trigger. feature_collision: test instances of `source` are the targets, `rate` of the
    # `target` (base) rows are crafted so the targets are read as `target`.
    method: str = "label_consistent"  # feature_collision | label_consistent
    eps: float = 96.0  # L-inf radius of the perturbation, pixel units (0..255)
    steps: int = 20  # optimiser steps (PGD signed steps, or Adam steps for feature_collision)
    n_targets: int = 10  # feature_collision: target test instances (>= 10 for a success rate)
    opacity: float = 0.5  # feature_collision: target's weight in the start point (Poison Frogs watermark)
    craft_model: str = "auto"  # auto = the registry's champion, else the clean twin | twin


@dataclass
class ValidateConfig:
    """The data gate's settings (conf/validate/default.yaml gives each its unit and reason)."""

    on_fail: str = "stop"  # stop | warn
    min_provenance_coverage: float = 1.0
    # tests of significance: block when p_adjusted < alpha AND effect >= min_effect (docs/data-gate.md)
    alpha: float = MISSING  # family-wise false-block probability of one validation of clean data
    min_effect_block_rate: float = MISSING  # rise of a class's abnormal-block rate, fraction of its rows
    min_effect_share: float = MISSING  # rise of a class's share of the rows, fraction
    min_effect_duplicate_rate: float = MISSING  # rise of a class's exact-duplicate rate, fraction of its rows
    prior_block_rate: float = MISSING  # block rate per class a release is tested against without history
    near_dup_radius: int = MISSING  # Hamming radius (bits of a 64-bit phash) of a near-duplicate
    accept_new_classes: list[str] = field(default_factory=list)  # class names allowed to appear
    accept_removed_classes: list[str] = field(default_factory=list)  # class names allowed to lose every train row
    block_size: int = 3
    block_size_max: int = 4  # every k from block_size to this is scanned
    block_low: int = 16
    block_high: int = 239
    block_max_std: float = 4.0
    block_min_contrast: float = 64.0  # 0..255: a flagged block differs this much from its ring and the image median
    docs: bool = True
    # issue 19 item 6: where the statistics and the GX suites run (pipeline.data.spark_gate)
    engine: str = "pandas"  # pandas | spark
    spark_master: str = "local[*]"  # a Spark master URL: local[N], spark://host:7077, yarn, k8s://...
    spark_store: str = ""  # the store's URI as the executors see it (s3a://..., hdfs://...); "" = --store
    spark_conf: dict[str, str] = field(default_factory=dict)  # extra SparkSession settings


@dataclass
class ModelConfig:
    name: str = MISSING  # small_cnn | resnet18 | fastnet
    width: int = 32


@dataclass
class TrainConfig:
    """Training hyper-parameters; the core's training loop takes this type directly."""

    epochs: int = MISSING
    batch_size: int = 128
    optimizer: str = "adam"  # adam | sgd (nesterov)
    lr: float = 1e-3  # Adam step, or peak one-cycle rate
    weight_decay: float = 0.0  # on weights (ndim > 1) only: never on biases or norm parameters
    momentum: float = 0.9  # SGD only
    schedule: str = "none"  # none | onecycle
    label_smoothing: float = 0.0
    augment: bool = False  # padded random crop (reflect) + flip, see core.augment
    aug_pad: int = 4  # crop padding in pixels, unless the model sets ``augment_pad``
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:n]
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile on CUDA: pays off only over many models per process
    # issue 19 item 3: resident = the whole set on the device (fast path); stream = DataLoader batches
    # from the host array; auto = resident when the pixels fit in resident_max_mib, else stream
    data_path: str = "auto"
    resident_max_mib: int = 2048  # MiB of training pixels the auto path keeps on the device in one piece
    # on a CPU the device is the host: its resident copy (and the epoch's augmented one) is process memory
    host_resident_max_mib: int = 256
    loader_workers: int = 0  # DataLoader processes gathering streamed batches ahead (0 = in the loop)
    # MiB: on the streamed path, host allocations this large get their own mapping, returned when
    # freed (core.heap.map_large), so memory follows the batch, not the step count; 0 = glibc's default
    stream_map_mib: int = 4
    tta: bool = False  # also report accuracy with flip+translate TTA (accuracy_tta); never gated
    # loss (issue 13): ce = softmax cross-entropy; lgm = large-margin Gaussian mixture
    # (core.losses; the model then gets an LGM head whose likelihood inspect uses as a score)
    loss: str = "ce"  # ce | lgm
    lgm_alpha: float = 0.1  # unitless margin: the true class's distance counts (1 + alpha) x in training
    lgm_lambda: float = 0.1  # unitless weight of the likelihood regulariser
    lgm_covariance: str = "identity"  # identity | diag (a learned per-class diagonal)


@dataclass
class EvalConfig:
    scan: list[ScanTrigger] = field(default_factory=list)
    batch_size: int = 512


@dataclass
class InspectConfig:
    """The inspect stage's detectors (conf/inspect/default.yaml gives each its unit and reason).

    The gate's block thresholds on what inspect reports live in :class:`GateConfig`; these
    settings decide how the scores are computed and which rows are flagged."""

    k_ref: int = 3  # q-th nearest reference row (rows) of the robust detector
    class_threshold: float = 1.8  # main tail ratio at which a class is flagged deep (recall first)
    shallow_threshold: float = 2.5  # shallow-band tail ratio at which a class is suspicious
    flag_quantile: float = 0.995  # flag a row above this quantile of the other classes' suspicion
    suspicious_flag_quantile: float = 0.90  # ... or above this one in a suspicious class
    clean_epochs: Optional[int] = None  # epochs of the clean reference model; null = the candidate's step count
    kfold: int = 3  # folds of the out-of-fold probabilities for cleanlab; 0 = no cleanlab
    kfold_epochs: Optional[int] = None  # epochs of each fold model; null = train.epochs
    scan: str = "max_margin"  # max_margin (MM-BD, data-free) | neural_cleanse
    scan_restarts: int = 8  # random starts per class (max_margin)
    scan_steps: int = 150  # optimizer steps of the scan
    scan_lr: float = 0.1  # Adam step on the scan's logit-space pixels
    scan_seed: int = 0
    scan_mad_floor: float = 0.08  # max_margin: the anomaly index's MAD is at least this fraction of the median


@dataclass
class GateConfig:
    max_asr: float = MISSING
    max_asr_increase: float = MISSING
    max_recall_drop: float = MISSING
    min_accuracy: float = MISSING
    max_accuracy_drop: float = MISSING
    require_validation: bool = True
    # Trigger-agnostic checks on reports/inspect.json (conf/gate/default.yaml: units, calibration)
    max_tail_ratio: float = 1.8  # poison_suspects: a class's main tail scan ratio (unitless)
    max_shallow_tail_ratio: float = 2.5  # poison_suspects: a class's shallow-band ratio (unitless)
    max_label_issue_fraction: float = 0.02  # poison_suspects: cleanlab label issues, fraction of training rows
    max_flagged_with_block: int = 0  # poison_suspects: rows both flagged by the robust detector and holding an abnormal block
    max_scan_anomaly: float = 3.0  # backdoor_scan: largest anomaly index over target classes (MAD units)
    require_inspection: bool = True  # false: the two checks pass with "not required"
    max_targeted_increase: float = 0.05  # targeted_success: fraction of a red-team attack's target images moved to its base class beyond the baseline
    fail_on_block: bool = True  # false: a blocked release exits 0 (champion unchanged), so `dvc exp run` keeps it


@dataclass
class MlflowConfig:
    experiment: str = "poisongate"
    model_name: Optional[str] = None  # default poisongate-<data.name>
    system_metrics: bool = True


@dataclass
class ReserveConfig:
    """Where the trusted clean reserve of ``remedy=finetune`` comes from (conf/remedy/finetune.yaml)."""

    source: str = "champion"  # champion | trusted
    trusted: list[str] = field(default_factory=list)  # sample-id patterns (fnmatch) vouched for, source=trusted
    fraction: float = 0.1  # reserve size, fraction of the view's training rows
    seed: int = 0  # draw of the reserve rows


@dataclass
class RemedyConfig:
    """A remedy after a blocked release (issue 13; conf/remedy/*.yaml give units and reasons)."""

    name: str = "none"  # none | quarantine | finetune
    of: Optional[str] = None  # the blocked registry version this remedies; null = found from the view
    method: str = "fine_prune"  # finetune | fine_prune
    epochs: int = 10
    lr: float = 0.002
    batch_size: int = 16
    optimizer: str = "adam"  # adam | sgd
    max_accuracy_drop: float = 0.05
    max_fraction: float = 0.9
    freeze_norm: bool = False
    reserve: ReserveConfig = field(default_factory=ReserveConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    remedy: RemedyConfig = field(default_factory=RemedyConfig)


def as_dict(obj: Any) -> Any:
    """A config dataclass (or a list/dict of them) as plain dicts, lists and scalars."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj


def flatten(cfg: Any) -> dict[str, str]:
    """Dotted keys -> string values (MLflow params): ``{"train.lr": "0.003", "eval.scan.0.name": ...}``."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = str(node)

    walk("", as_dict(cfg))
    return out


def model_name(cfg: Config) -> str:
    return cfg.mlflow.model_name or f"poisongate-{cfg.data.name}"


# ----------------------------------------------------------------------------- checks


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key} = {value!r} is invalid: {allowed}")


def _one_of(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"unknown {key} {value!r}: use one of {', '.join(map(str, options))}")


def _number(key: str, value: Any, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
            hi_open: bool = False, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        kind = "an integer" if integer else "a finite number"
        _fail(key, value, f"must be {kind} in {left}{lo:g}, {hi:g}{right}")


def check_trigger(prefix: str, t: TriggerConfig) -> None:
    _one_of(f"{prefix}.kind", t.kind, TRIGGER_KINDS)
    _number(f"{prefix}.size", t.size, 1, 4096, integer=True)
    _number(f"{prefix}.alpha", t.alpha, 0.0, 1.0)
    _number(f"{prefix}.seed", t.seed, 0, 2**32 - 1, integer=True)
    patterns = PATCH_PATTERNS if t.kind == "patch" else BLEND_PATTERNS
    _one_of(f"{prefix}.pattern", t.pattern, patterns)
    loc = t.location
    if isinstance(loc, str):
        _one_of(f"{prefix}.location", loc, LOCATIONS)
    elif not (isinstance(loc, (list, tuple)) and len(loc) == 2 and all(isinstance(v, int) and v >= 0 for v in loc)):
        _fail(f"{prefix}.location", loc, f"use one of {', '.join(LOCATIONS)} or [y, x] (non-negative integers)")


def check_inspect(i: InspectConfig) -> None:
    """The inspect stage's settings (conf/inspect/default.yaml)."""
    _number("inspect.k_ref", i.k_ref, 1, 64, integer=True)
    _number("inspect.class_threshold", i.class_threshold, 1.0, 100.0, lo_open=True)
    _number("inspect.shallow_threshold", i.shallow_threshold, 1.0, 100.0, lo_open=True)
    _number("inspect.flag_quantile", i.flag_quantile, 0.0, 1.0, lo_open=True, hi_open=True)
    _number("inspect.suspicious_flag_quantile", i.suspicious_flag_quantile, 0.0, 1.0, lo_open=True, hi_open=True)
    if i.clean_epochs is not None:
        _number("inspect.clean_epochs", i.clean_epochs, 1, 100_000, integer=True)
    # 1 fold is no held-out prediction; 20 folds cost 20 trainings
    if i.kfold != 0:
        _number("inspect.kfold", i.kfold, 2, 20, integer=True)
    if i.kfold_epochs is not None:
        _number("inspect.kfold_epochs", i.kfold_epochs, 1, 100_000, integer=True)
    _one_of("inspect.scan", i.scan, SCAN_METHODS)
    _number("inspect.scan_restarts", i.scan_restarts, 1, 1024, integer=True)
    _number("inspect.scan_steps", i.scan_steps, 1, 100_000, integer=True)
    _number("inspect.scan_lr", i.scan_lr, 0.0, 10.0, lo_open=True)
    _number("inspect.scan_seed", i.scan_seed, 0, 2**32 - 1, integer=True)
    _number("inspect.scan_mad_floor", i.scan_mad_floor, 0.0, 1.0, hi_open=True)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check(cfg: Config) -> None:
    """Refuse every invalid setting, naming the key, the value and the allowed range."""
    d = cfg.data
    _one_of("data.name", d.name, DATA_NAMES)
    if d.name == "imagefolder" and not d.path:
        raise ConfigError("data.name=imagefolder needs data.path (a folder or .tar.gz with train/<class>/* and test/<class>/*)")
    _number("data.max_file_bytes", d.max_file_bytes, 1, 2**40, integer=True)
    _number("data.max_image_pixels", d.max_image_pixels, 1, 2**32, integer=True)
    _number("data.recheck_files", d.recheck_files, 0, 2**31, integer=True)
    _number("data.heap_map_mib", d.heap_map_mib, 0, 32, integer=True)  # 32 MiB: glibc's ceiling
    _one_of("data.resize_mode", d.resize_mode, ("fit", "stretch"))
    if d.resize is not None:
        r = list(d.resize)
        if len(r) != 2:
            raise ConfigError(f"data.resize must be [height, width] in pixels or null, got {r!r}")
        _number("data.resize[0] (height)", r[0], 1, 8192, integer=True)
        _number("data.resize[1] (width)", r[1], 1, 8192, integer=True)
        if d.name == "digits":
            raise ConfigError("data.resize applies to image files (imagefolder, cifar10); digits are 8x8 arrays: "
                              "set data.resize: null")
    if d.limit is not None:
        _number("data.limit", d.limit, 1, math.inf, integer=True)
    _number("data.test_fraction", d.test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
    _number("data.workers", d.workers, 0, 1024, integer=True)

    a = cfg.attack
    _one_of("attack.name", a.name, ATTACK_NAMES)
    if a.name == "clean_label":
        check_clean_label(a)
    # attack.rate, the classes and the trigger's fit to the image are checked against the data by
    # the poison stage (core.attacks.resolve_attack), where the class names and image size are known.

    v = cfg.validate
    _one_of("validate.on_fail", v.on_fail, ON_FAIL)
    _number("validate.min_provenance_coverage", v.min_provenance_coverage, 0.0, 1.0)
    # alpha in (0, 0.5]: 0 can never block, above 0.5 blocks most clean data
    _number("validate.alpha", v.alpha, 0.0, 0.5, lo_open=True)
    for key in ("min_effect_block_rate", "min_effect_share", "min_effect_duplicate_rate", "prior_block_rate"):
        _number(f"validate.{key}", getattr(v, key), 0.0, 1.0)  # fractions of rows
    _number("validate.near_dup_radius", v.near_dup_radius, 0, 16, integer=True)  # of 64 bits; > 16 is no near-duplicate
    for key in ("accept_new_classes", "accept_removed_classes"):
        names = getattr(v, key)
        if not isinstance(names, (list, tuple)) or not all(isinstance(c, (str, int)) and str(c) for c in names):
            _fail(f"validate.{key}", names, "a list of class names (strings), e.g. [cat, dog]; [] to acknowledge none")
    _number("validate.block_size", v.block_size, 1, 4096, integer=True)
    _number("validate.block_size_max", v.block_size_max, 1, 4096, integer=True)
    if v.block_size_max < v.block_size:
        _fail("validate.block_size_max", v.block_size_max,
              f"must be >= validate.block_size ({v.block_size}): the scan covers block_size..block_size_max")
    _number("validate.block_low", v.block_low, 0, 255)
    _number("validate.block_high", v.block_high, 0, 255)
    if v.block_low >= v.block_high:
        _fail("validate.block_low", v.block_low, f"must be below validate.block_high ({v.block_high})")
    _number("validate.block_max_std", v.block_max_std, 0.0, 255.0)
    _number("validate.block_min_contrast", v.block_min_contrast, 0.0, 255.0)
    _one_of("validate.engine", v.engine, ENGINES)
    if not isinstance(v.spark_master, str) or not v.spark_master.strip():
        _fail("validate.spark_master", v.spark_master, "a Spark master URL, e.g. local[*] or spark://host:7077")
    if not isinstance(v.spark_conf, Mapping) or not all(isinstance(k, str) and k.startswith("spark.")
                                                         for k in v.spark_conf):
        _fail("validate.spark_conf", v.spark_conf, "a mapping of Spark settings, e.g. {spark.executor.memory: 4g}")

    _one_of("model.name", cfg.model.name, MODEL_NAMES)
    _number("model.width", cfg.model.width, 1, 4096, integer=True)

    t = cfg.train
    _number("train.epochs", t.epochs, 1, 100_000, integer=True)
    _number("train.batch_size", t.batch_size, 2, 1 << 20, integer=True)
    _one_of("train.data_path", t.data_path, ("auto", "resident", "stream"))
    _number("train.resident_max_mib", t.resident_max_mib, 0, 1 << 30, integer=True)
    _number("train.host_resident_max_mib", t.host_resident_max_mib, 0, 1 << 30, integer=True)
    _number("train.loader_workers", t.loader_workers, 0, 256, integer=True)
    _number("train.stream_map_mib", t.stream_map_mib, 0, 32, integer=True)  # 32 MiB: glibc's ceiling
    _one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    _number("train.lr", t.lr, 0.0, 100.0, lo_open=True)
    _number("train.weight_decay", t.weight_decay, 0.0, 1.0)
    _number("train.momentum", t.momentum, 0.0, 1.0, hi_open=True)
    _one_of("train.schedule", t.schedule, SCHEDULES)
    _number("train.label_smoothing", t.label_smoothing, 0.0, 1.0, hi_open=True)
    _number("train.aug_pad", t.aug_pad, 0, 64, integer=True)
    _one_of("train.loss", t.loss, LOSSES)
    _number("train.lgm_alpha", t.lgm_alpha, 0.0, 10.0)
    _number("train.lgm_lambda", t.lgm_lambda, 0.0, 100.0)
    _one_of("train.lgm_covariance", t.lgm_covariance, LGM_COVARIANCES)
    _number("train.seed", t.seed, 0, 2**32 - 1, integer=True)
    if not isinstance(t.device, str) or not _DEVICE.match(t.device):
        _fail("train.device", t.device, "use auto, cpu, cuda or cuda:<index>")

    _number("eval.batch_size", cfg.eval.batch_size, 1, 1 << 20, integer=True)
    names = [s.name for s in cfg.eval.scan]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        _fail("eval.scan", dup, "every scan trigger needs a unique name")
    for i, s in enumerate(cfg.eval.scan):
        if not isinstance(s.name, str) or not s.name or s.name == "attack":
            _fail(f"eval.scan.{i}.name", s.name, "a non-empty name other than 'attack' (reserved for the attack's own trigger)")
        check_trigger(f"eval.scan.{i}", s)

    check_gate(cfg.gate)
    check_inspect(cfg.inspect)
    if not isinstance(cfg.mlflow.experiment, str) or not cfg.mlflow.experiment.strip():
        _fail("mlflow.experiment", cfg.mlflow.experiment, "a non-empty experiment name")
    check_remedy(cfg.remedy)


def check_gate(g: GateConfig) -> None:
    """The release gate's thresholds (also used by benches that compose conf/gate/ alone)."""
    for key in ("max_asr", "max_asr_increase", "max_recall_drop", "min_accuracy", "max_accuracy_drop",
                "max_label_issue_fraction", "max_targeted_increase"):
        # also refuses NaN and inf: a threshold that cannot fail is no gate
        _number(f"gate.{key}", getattr(g, key), 0.0, 1.0)
    # ratios and MAD units: 1.0 would block every clean model (a clean class sits at ~1), 100 none
    _number("gate.max_tail_ratio", g.max_tail_ratio, 1.0, 100.0, lo_open=True)
    _number("gate.max_shallow_tail_ratio", g.max_shallow_tail_ratio, 1.0, 100.0, lo_open=True)
    _number("gate.max_scan_anomaly", g.max_scan_anomaly, 0.0, 100.0, lo_open=True)
    _number("gate.max_flagged_with_block", g.max_flagged_with_block, 0, 10**9, integer=True)  # rows


def check_clean_label(a: AttackConfig) -> None:
    """Ranges of the clean-label keys (classes and the trigger's fit are checked against the data
    by the poison stage, where class names and the image size are known)."""
    _one_of("attack.method", a.method, CLEAN_LABEL_METHODS)
    _number("attack.eps", a.eps, 0.0, 255.0)  # pixel units: 255 is the whole range
    _number("attack.rate", a.rate, 0.0, 1.0, lo_open=True)  # 0 crafts nothing
    _number("attack.steps", a.steps, 0, 100_000, integer=True)
    _number("attack.n_targets", a.n_targets, 1, 10_000, integer=True)
    _number("attack.opacity", a.opacity, 0.0, 1.0)
    _one_of("attack.craft_model", a.craft_model, CRAFT_MODELS)
    if a.method == "label_consistent" and a.source is not None:
        _fail("attack.source", a.source, "label_consistent poisons the target class's own rows and its trigger pulls "
              "every class: set attack.source=null")
    if a.method == "feature_collision" and a.source is None:
        _fail("attack.source", a.source, "feature_collision needs the class of its target test instances "
              "(attack.source, e.g. 4; the targets are to be read as attack.target)")
    check_trigger("attack.trigger", a.trigger)


def check_remedy(r: RemedyConfig) -> None:
    _one_of("remedy.name", r.name, REMEDY_NAMES)
    if r.of is not None and not (isinstance(r.of, (str, int)) and str(r.of).isdigit()):
        _fail("remedy.of", r.of, "a registry version number (the blocked one), or null to find it from the view")
    _one_of("remedy.method", r.method, REMEDY_METHODS)
    _number("remedy.epochs", r.epochs, 0, 10_000, integer=True)
    _number("remedy.lr", r.lr, 0.0, 100.0, lo_open=True)
    _number("remedy.batch_size", r.batch_size, 2, 1 << 20, integer=True)  # >= 2: batch norm
    _one_of("remedy.optimizer", r.optimizer, OPTIMIZERS)
    _number("remedy.max_accuracy_drop", r.max_accuracy_drop, 0.0, 1.0)
    _number("remedy.max_fraction", r.max_fraction, 0.0, 1.0, lo_open=True, hi_open=True)  # 1 prunes every channel
    rs = r.reserve
    _one_of("remedy.reserve.source", rs.source, RESERVE_SOURCES)
    if not isinstance(rs.trusted, (list, tuple)) or not all(isinstance(p, str) and p for p in rs.trusted):
        _fail("remedy.reserve.trusted", rs.trusted, "a list of sample-id patterns, e.g. ['digits/train/1*']")
    if rs.source == "trusted" and r.name == "finetune" and not rs.trusted:
        _fail("remedy.reserve.trusted", rs.trusted, "remedy.reserve.source=trusted needs at least one pattern")
    _number("remedy.reserve.fraction", rs.fraction, 0.0, 1.0, lo_open=True)
    _number("remedy.reserve.seed", rs.seed, 0, 2**32 - 1, integer=True)
