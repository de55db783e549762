"""The one place that reads params.yaml (and the only importer of omegaconf and Hydra).

The stage runner (``pipeline.stage``) calls :func:`load` once per stage and passes the typed
sections down; nothing deeper opens params.yaml. The types live in ``pipeline.schema`` (standard
library only). They are merged as an OmegaConf structured config, so an unknown key, a wrong type
or a missing required value (``???``) is refused when the file is read, then
``schema.check`` refuses every out-of-range value, naming the key.

params.yaml is the composition of ``conf/`` (Hydra), written by ``dvc exp run`` when DVC's Hydra
integration is enabled, or by ``python -m pipeline.config compose [overrides...]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.schema import (  # noqa: F401 - re-exported: the config API in one import
    ATTACK_NAMES, DATA_NAMES, AttackConfig, Config, ConfigError, DataConfig, EvalConfig, GateConfig,
    InspectConfig, MlflowConfig, ModelConfig, ScanTrigger, TrainConfig, TriggerConfig, ValidateConfig, check, flatten, model_name,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def from_container(raw: Any) -> Config:
    """Validate a plain mapping against the schema and return the typed config."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        OmegaConf.to_container(merged, throw_on_missing=True)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}".replace("\n", " ")) from exc
    check(cfg)
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
