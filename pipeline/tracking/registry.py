"""The MLflow model registry: registering a model, reading the champion, and the only promotion.

TFX's Pusher pushes only a blessed model; here only a version whose gate passed gets the alias
`champion` (:func:`promote`), and a blocked version is tagged with the checks it failed so reviewers
see why in the UI (:func:`block`). :func:`champion` is the one reader of the alias.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

CHAMPION = "champion"
TAG_VERDICT = "poisongate.gate"
TAG_FAILED = "poisongate.failed_checks"
TAG_PREVIOUS = "poisongate.previous_champion"
# MLflow caps tag values at 5,000 characters (8,000 on newer stores); stay under the lower.
_TAG_MAX = 4900


class PromotionConflict(RuntimeError):
    """The champion moved while this gate ran (another pipeline promoted)."""


def champion(client: Any, model_name: str) -> Optional[Any]:
    """The ModelVersion holding the `champion` alias, or None when the model or alias is absent.

    Absence is read from the registered model's alias map, never from an error text. Any other
    error (an unreachable server, say) propagates: an outage must not be mistaken for "no
    champion" and the weaker clean twin compared against instead.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (getattr(model, "aliases", None) or {}).get(CHAMPION)
    return None if version is None else client.get_model_version(model_name, str(version))


def champion_version(client: Any, model_name: str) -> Optional[str]:
    mv = champion(client, model_name)
    return None if mv is None else str(mv.version)


def registered_version(client: Any, model_name: str, version: str) -> Any:
    """The registry's ModelVersion (raises MlflowException when it does not exist)."""
    return client.get_model_version(model_name, version)


def promote(client: Any, model_name: str, version: str, previous: Optional[str]) -> None:
    # Compare-and-set as far as the registry allows: a champion that moved since the baseline
    # was read means this candidate was never compared with it.
    now = champion_version(client, model_name)
    if now != previous:
        raise PromotionConflict(f"champion moved from v{previous or 'none'} to v{now} during this gate run: "
                                "re-run `dvc repro --force evaluate`")
    client.set_model_version_tag(model_name, version, TAG_VERDICT, "passed")
    client.set_model_version_tag(model_name, version, TAG_PREVIOUS, previous or "none")
    client.set_registered_model_alias(model_name, CHAMPION, version)


def block(client: Any, model_name: str, version: str, failed: list[str]) -> None:
    client.set_model_version_tag(model_name, version, TAG_VERDICT, "failed")
    client.set_model_version_tag(model_name, version, TAG_FAILED, "; ".join(failed)[:_TAG_MAX])


def pip_requirements() -> list[str]:
    """Explicit requirements for logged models (skips mlflow's slow inference)."""
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        import torchvision

        reqs.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    except ImportError:
        pass
    return reqs


def log_model(model, model_name: Optional[str], version_tags: Mapping[str, str] | None = None) -> tuple[str, Optional[str]]:
    """Log ``model`` (CPU) to the active run and register it as a new version of ``model_name``.

    Returns ``(model_uri, version or None)``. No input example or signature inference and
    explicit pip requirements (mlflow's requirement inference would re-import the model in a
    subprocess).
    """
    import mlflow

    from pipeline.tracking.runs import client

    info = mlflow.pytorch.log_model(
        model,
        name="model",
        registered_model_name=model_name,
        pip_requirements=pip_requirements(),
        # pickle, not mlflow 3's default pt2: pt2 needs an input example and traces a fixed batch
        # shape. Loading needs `pipeline.core.models` importable (this repository installed).
        serialization_format="pickle",
        await_registration_for=60,
    )
    version = info.registered_model_version
    if model_name and version is not None and version_tags:
        c = client()
        for k, v in version_tags.items():
            c.set_model_version_tag(model_name, str(version), k, str(v))
    return info.model_uri, (str(version) if version is not None else None)


def load_model(model_name: str, version: str):
    """The registered model ``model_name`` version ``version`` on the CPU."""
    import mlflow

    return mlflow.pytorch.load_model(f"models:/{model_name}/{version}", map_location="cpu")
