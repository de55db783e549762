"""Promotion through the MLflow model registry: the only place the `champion` alias is set.

TFX's Pusher pushes only a blessed model; here only a version whose gate passed gets the alias,
and a blocked version is tagged with the checks it failed so reviewers see why in the UI.
"""

from __future__ import annotations

from typing import Any, Optional

CHAMPION = "champion"
TAG_VERDICT = "poisongate.gate"
TAG_FAILED = "poisongate.failed_checks"
TAG_PREVIOUS = "poisongate.previous_champion"
# MLflow caps tag values at 5,000 characters (8,000 on newer stores); stay under the lower.
_TAG_MAX = 4900


def current_champion(client: Any, model_name: str) -> Optional[str]:
    """The version holding the `champion` alias, or None when the model or alias does not exist.

    Any other error (an unreachable server, say) propagates: the gate must not mistake an outage
    for "no champion" and compare against the twin instead.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    aliases = getattr(model, "aliases", None) or {}
    version = aliases.get(CHAMPION)
    return None if version is None else str(version)


class PromotionConflict(RuntimeError):
    """The champion moved while this gate ran (another pipeline promoted)."""


def registered_version(client: Any, model_name: str, version: str) -> Any:
    """The registry's ModelVersion (raises MlflowException when it does not exist)."""
    return client.get_model_version(model_name, version)


def promote(client: Any, model_name: str, version: str, previous: Optional[str]) -> None:
    # Compare-and-set: a champion that moved since the baseline was read means this candidate
    # was never compared with it.
    # --- issue 14 (wt-team): promotion lock; the lead moves pipeline/registry_lock.py here ---
    # MLflow cannot compare-and-set an alias, so the re-read and the move happen under a
    # registry lock that every promoter takes: of two racing gates one moves the alias and the
    # other, once it gets the lock, re-reads the moved alias and raises PromotionConflict.
    from pipeline.registry_lock import LockError, promotion_lock

    with promotion_lock(client, model_name) as lock:
        now = current_champion(client, model_name)
        if now != previous:
            raise PromotionConflict(f"champion moved from v{previous or 'none'} to v{now} during this gate run: re-run `dvc repro --force evaluate`")
        client.set_model_version_tag(model_name, version, TAG_VERDICT, "passed")
        client.set_model_version_tag(model_name, version, TAG_PREVIOUS, previous or "none")
        if lock.expired():  # held past its ttl: another promoter may have broken it
            raise LockError(f"promotion lock {lock.name} expired before the alias moved: not promoted, re-run the gate")
        client.set_registered_model_alias(model_name, CHAMPION, version)
    # --- end issue 14 ---


def block(client: Any, model_name: str, version: str, failed: list[str]) -> None:
    client.set_model_version_tag(model_name, version, TAG_VERDICT, "failed")
    client.set_model_version_tag(model_name, version, TAG_FAILED, "; ".join(failed)[:_TAG_MAX])
