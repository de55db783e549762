"""The pipeline's configuration schema, and the one place that reads params.yaml.

Every stage's ``main`` calls :func:`load` once and passes the typed sections down; nothing deeper
opens params.yaml. The schema is an OmegaConf structured config, so an unknown key, a wrong type
or a missing required value (``???``) is refused when the file is read, not deep in a stage.

params.yaml is the composition of ``conf/`` (Hydra), written by ``dvc exp run`` when DVC's Hydra
integration is enabled, or by ``python -m pipeline.config compose [overrides...]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A configuration the pipeline refuses to run with."""


@dataclass
class DataConfig:
    name: str = MISSING  # digits | cifar10 | imagefolder
    path: Optional[str] = None  # folder or .tar.gz (cifar10, imagefolder)
    # The path DVC hashes to decide whether the source changed: the data itself for file
    # sources; the loader module for digits (its data ships inside scikit-learn).
    watch: Optional[str] = None
    limit: Optional[int] = None  # keep the first N rows per split and class order (smoke tests)
    test_fraction: float = 0.25  # digits only: stratified test share
    seed: int = 0  # digits only: split seed
    download: bool = False  # cifar10 only: torchvision download when data.path is missing
    workers: int = 0  # decode processes; 0 = one per core


@dataclass
class TriggerConfig:
    kind: str = "patch"  # patch | blend
    size: int = 3  # patch side, pixels
    location: str = "bottom_right"  # top_left | top_right | bottom_left | bottom_right | center | random
    pattern: str = "white"  # white | black | checker | noise (patch); noise (blend)
    alpha: float = 0.1  # blend weight of the pattern, 0..1
    seed: int = 0  # seed of noise patterns and random locations


@dataclass
class AttackConfig:
    name: str = "none"  # none | label_flip | backdoor
    source: Optional[Any] = None  # class name or index; null = all non-target classes
    target: Any = 0  # class name or index
    rate: float = 0.0  # fraction of the source rows (or of all non-target rows when source is null)
    seed: int = 0
    trigger: TriggerConfig = field(default_factory=TriggerConfig)


@dataclass
class ValidateConfig:
    on_fail: str = "stop"  # stop | warn
    min_provenance_coverage: float = 1.0
    max_kl: float = MISSING
    max_class_share_delta: float = MISSING
    max_duplicate_rate: float = MISSING
    block_size: int = 3
    block_low: int = 16
    block_high: int = 239
    block_max_std: float = 4.0
    block_min_contrast: float = 64.0  # 0..255: a flagged block differs this much from its ring and the image median
    max_block_rate_increase: float = MISSING
    docs: bool = True


@dataclass
class ModelConfig:
    name: str = MISSING  # small_cnn | resnet18 | fastnet
    width: int = 32


@dataclass
class TrainConfig:
    epochs: int = MISSING
    batch_size: int = 128
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "none"  # none | onecycle
    label_smoothing: float = 0.0
    augment: bool = False  # padded random crop (reflect; pad = the model's augment_pad, else 4 px) + flip, see core.augment
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    tta: bool = False  # also report accuracy with flip+translate TTA (accuracy_tta); never gated


@dataclass
class ScanTrigger:
    name: str = MISSING
    kind: str = "patch"
    size: int = 3
    location: str = "bottom_right"
    pattern: str = "white"
    alpha: float = 0.1
    seed: int = 0


@dataclass
class EvalConfig:
    scan: list[ScanTrigger] = field(default_factory=list)
    batch_size: int = 512


@dataclass
class GateConfig:
    max_asr: float = MISSING
    max_asr_increase: float = MISSING
    max_recall_drop: float = MISSING
    min_accuracy: float = MISSING
    max_accuracy_drop: float = MISSING
    require_validation: bool = True


@dataclass
class MlflowConfig:
    experiment: str = "poisongate"
    model_name: Optional[str] = None  # default poisongate-<data.name>
    system_metrics: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


DATA_NAMES = ("digits", "cifar10", "imagefolder")
ATTACK_NAMES = ("none", "label_flip", "backdoor")


def _check(cfg: Config) -> None:
    if cfg.data.name not in DATA_NAMES:
        raise ConfigError(f"unknown data.name {cfg.data.name!r}: use one of {', '.join(DATA_NAMES)}")
    if cfg.data.name == "imagefolder" and not cfg.data.path:
        raise ConfigError("data.name=imagefolder needs data.path (a folder or .tar.gz with train/<class>/* and test/<class>/*)")
    if not cfg.data.watch:
        raise ConfigError("data.watch is empty: it must name the path DVC hashes for the source (normally ${data.path})")
    if cfg.attack.name not in ATTACK_NAMES:
        raise ConfigError(f"unknown attack.name {cfg.attack.name!r}: use one of {', '.join(ATTACK_NAMES)}")
    if cfg.validate.on_fail not in ("stop", "warn"):
        raise ConfigError(f"validate.on_fail must be 'stop' or 'warn', not {cfg.validate.on_fail!r}")
    for key in ("max_asr", "max_asr_increase", "max_recall_drop", "min_accuracy", "max_accuracy_drop"):
        value = getattr(cfg.gate, key)
        if not 0.0 <= value <= 1.0:  # also refuses NaN and inf: a threshold that cannot fail is no gate
            raise ConfigError(f"gate.{key} must be a fraction in [0, 1], not {value}")
    for key in ("min_provenance_coverage", "max_kl", "max_class_share_delta", "max_duplicate_rate",
                "max_block_rate_increase"):
        value = getattr(cfg.validate, key)
        if not 0.0 <= value < float("inf"):
            raise ConfigError(f"validate.{key} must be a finite non-negative number, not {value}")
    if cfg.data.limit is not None and cfg.data.limit <= 0:
        raise ConfigError(f"data.limit must be a positive row count or null, not {cfg.data.limit}")


def from_container(raw: Any) -> Config:
    """Validate a plain mapping against the schema and return the typed config."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        OmegaConf.to_container(merged, throw_on_missing=True)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}".replace("\n", " ")) from exc
    _check(cfg)
    return cfg


def load(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml (the composed config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: compose it with `python -m pipeline.config compose > {path}`")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several types
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return from_container(raw)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/ with Hydra, as `dvc exp run` does, and return the resolved config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:  # Hydra and OmegaConf raise many types; all mean a bad composition
        raise ConfigError(f"cannot compose conf/ with {overrides or []}: {exc}".replace("\n", " ")) from exc
    from_container(resolved)  # refuse what the stages would refuse
    return resolved


def to_yaml(cfg: DictConfig | Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if isinstance(cfg, Config) else cfg)


def flatten(cfg: Config) -> dict[str, str]:
    """Dotted keys -> string values, for MLflow params."""
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

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return out


def model_name(cfg: Config) -> str:
    return cfg.mlflow.model_name or f"poisongate-{cfg.data.name}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.config", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compose", help="print params.yaml composed from conf/ with Hydra overrides")
    c.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=cifar10 attack=backdoor attack.rate=0.1")
    c.add_argument("-o", "--out", help="write to this file instead of stdout")
    ch = sub.add_parser("check", help="validate a params file")
    ch.add_argument("path", nargs="?", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "compose":
            text = "# Composed from conf/ by `python -m pipeline.config compose` (or `dvc exp run`); edit conf/.\n"
            text += OmegaConf.to_yaml(compose(args.overrides))
            if args.out:
                Path(args.out).write_text(text)
            else:
                sys.stdout.write(text)
        else:
            load(args.path)
            print(f"{args.path}: ok")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
