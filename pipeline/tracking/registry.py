"""The MLflow model registry: register a checkpoint, read the champion, the only promotion.

TFX's Pusher pushes only the exact model its Evaluator blessed. Here:

- a version's artifact is the safetensors checkpoint the train stage wrote (``model/model.safetensors``
  in the run's artifacts; no pickle anywhere), registered with its sha256 as the tag
  ``checkpoint_sha256``; a byte-identical checkpoint is never registered twice (the existing
  version is reused, so re-running an unchanged config does not churn the registry);
- :func:`load_version` downloads a version's artifact and verifies its sha256 against that tag
  before reading a byte of it;
- only :func:`promote` moves the alias `champion`, and it records the verdict together with the
  digest it was given for (``poisongate.verdict`` = passed, ``poisongate.verdict_sha256``);
  :func:`block` tags a blocked version with the checks it failed;
- :func:`champion_problem` says whether the current champion carries a passed verdict (or a
  recorded waiver) for its own digest: an alias moved by hand in the UI does not, and the gate
  refuses to go on until it is restored or waived (``python -m pipeline.tracking.registry``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from pipeline.errors import UserError

CHAMPION = "champion"
ARTIFACT_DIR = "model"
ARTIFACT_FILE = "model.safetensors"
TAG_SHA = "checkpoint_sha256"
TAG_VERDICT = "poisongate.verdict"  # passed | blocked (the same key on runs and versions)
TAG_VERDICT_SHA = "poisongate.verdict_sha256"  # the checkpoint digest the verdict was given for
TAG_FAILED = "poisongate.failed_checks"
TAG_PREVIOUS = "poisongate.previous_champion"
TAG_WAIVER = "poisongate.waiver"  # JSON {by, reason, time, sha256}: a reviewed exception
# MLflow caps tag values at 5,000 characters (8,000 on newer stores); stay under the lower.
_TAG_MAX = 4900


class PromotionConflict(UserError):
    """The champion moved while this gate ran (another pipeline promoted)."""


class RegistryError(UserError):
    """The registry cannot be used as asked; the message says what to do."""


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


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
        if _not_found(exc):
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


def waiver_of(tags: Mapping[str, str]) -> Optional[dict]:
    raw = tags.get(TAG_WAIVER)
    if not raw:
        return None
    try:
        w = json.loads(raw)
    except ValueError:
        return None
    return w if isinstance(w, dict) else None


def champion_problem(mv: Any) -> Optional[str]:
    """Why the champion version ``mv`` is not legitimately the champion, or None when it is.

    Legitimate: a passed verdict given for its own checkpoint digest, or a recorded waiver for
    that digest. Anything else means the alias was moved outside the gate (or the version's
    tags were edited afterwards)."""
    if mv is None:
        return None
    tags = dict(mv.tags or {})
    sha = tags.get(TAG_SHA)
    if tags.get(TAG_VERDICT) == "passed" and sha and tags.get(TAG_VERDICT_SHA) == sha:
        return None
    w = waiver_of(tags)
    if w and sha and w.get("sha256") == sha:
        return None
    verdict = tags.get(TAG_VERDICT) or "none"
    return (f"champion v{mv.version} carries no passed verdict for its checkpoint digest "
            f"(verdict: {verdict}); the alias was moved outside the release gate")


def fix_hint(model_name: str) -> str:
    return (f"ask whoever moved the alias; restore the last gated champion with `python -m "
            f"pipeline.tracking.registry restore --model {model_name}`, or record a reviewed exception with "
            f"`python -m pipeline.tracking.registry waive --model {model_name} --version <v> --reason '...' --by <you>`")


def promote(client: Any, model_name: str, version: str, previous: Optional[str], sha256: str) -> None:
    """Record the passed verdict for ``sha256``, then move the alias (compare-and-set as far as the
    registry allows: a champion that moved since the baseline was read means this candidate was
    never compared with it)."""
    # MLflow cannot compare-and-set an alias, so the re-read and the move happen under a registry
    # lock every promoter takes (pipeline.tracking.lock): of two racing gates one moves the alias;
    # the other, once it holds the lock, re-reads the moved alias and fails closed.
    from pipeline.tracking.lock import LockError, promotion_lock

    with promotion_lock(client, model_name) as lock:
        now = champion_version(client, model_name)
        if now != previous:
            raise PromotionConflict(f"champion moved from v{previous or 'none'} to v{now} during this gate run: "
                                    "re-run `dvc repro` to compare with the new champion")
        client.set_model_version_tag(model_name, version, TAG_VERDICT, "passed")
        client.set_model_version_tag(model_name, version, TAG_VERDICT_SHA, sha256)
        client.set_model_version_tag(model_name, version, TAG_PREVIOUS, previous or "none")
        if lock.expired():  # held past its ttl: another promoter may have broken it
            raise LockError(f"promotion lock {lock.name} expired before the alias moved: not promoted, re-run the gate")
        client.set_registered_model_alias(model_name, CHAMPION, version)


def block(client: Any, model_name: str, version: str, failed: list[str], sha256: Optional[str]) -> None:
    client.set_model_version_tag(model_name, version, TAG_VERDICT, "blocked")
    if sha256:
        client.set_model_version_tag(model_name, version, TAG_VERDICT_SHA, sha256)
    client.set_model_version_tag(model_name, version, TAG_FAILED, "; ".join(failed)[:_TAG_MAX])


# ----------------------------------------------------------------------------- artifacts


def register_checkpoint(client: Any, run_id: str, model_name: str, checkpoint: str | Path, sha256: str,
                        tags: Mapping[str, str]) -> tuple[str, bool]:
    """Log the checkpoint as the run's ``model/model.safetensors`` and register it; ``(version,
    created)``. A version holding the same digest is reused (``created`` False)."""
    from mlflow.exceptions import MlflowException

    same = _versions_with_digest(client, model_name, sha256)
    if same:
        return str(min(int(v.version) for v in same)), False
    with tempfile.TemporaryDirectory(prefix="poisongate-model-") as tmp:
        dst = Path(tmp) / ARTIFACT_FILE
        shutil.copyfile(checkpoint, dst)
        client.log_artifact(run_id, str(dst), artifact_path=ARTIFACT_DIR)
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(model_name, source=f"runs:/{run_id}/{ARTIFACT_DIR}", run_id=run_id,
                                     tags={**{k: str(v) for k, v in tags.items()}, TAG_SHA: sha256})
    return str(mv.version), True


def _versions_with_digest(client: Any, model_name: str, sha256: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name='{model_name}' and tags.{TAG_SHA}='{sha256}'"))
    except MlflowException as exc:
        if _not_found(exc):
            return []
        raise


def download_version(client: Any, model_name: str, version: str, dst: str | Path) -> Path:
    """The version's checkpoint file, downloaded into ``dst`` from the store ``client`` talks to
    (resolved explicitly: mlflow's process-global tracking URI must not pick another store)."""
    import mlflow

    from pipeline.tracking.runs import tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    source = client.get_model_version_download_uri(model_name, version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                     tracking_uri=tracking_uri()))
    path = local / ARTIFACT_FILE if local.is_dir() else local
    if not path.is_file():
        raise RegistryError(f"{model_name} v{version} has no {ARTIFACT_DIR}/{ARTIFACT_FILE} artifact (not a poisongate "
                            "version, or its artifacts were deleted): it cannot be loaded")
    return path


def artifact_sha256(client: Any, model_name: str, version: str) -> str:
    """The sha256 of the bytes the registry would serve for this version."""
    from pipeline.io import file_sha256

    with tempfile.TemporaryDirectory(prefix="poisongate-verify-") as tmp:
        return file_sha256(download_version(client, model_name, version, tmp))


def load_version(client: Any, model_name: str, version: str) -> tuple[Any, dict]:
    """Download, verify against the version's ``checkpoint_sha256`` tag, then load (no pickle)."""
    from pipeline import checkpoints

    mv = client.get_model_version(model_name, version)
    with tempfile.TemporaryDirectory(prefix="poisongate-load-") as tmp:
        path = download_version(client, model_name, version, tmp)
        return checkpoints.load_verified(path, (mv.tags or {}).get(TAG_SHA), f"{model_name} v{version}'s registration")


# ----------------------------------------------------------------------------- CLI (restore, waive)


def restore(client: Any, model_name: str) -> Optional[str]:
    """Move `champion` back to the newest version with a passed verdict for its own digest."""
    from mlflow.exceptions import MlflowException

    try:
        versions = list(client.search_model_versions(f"name='{model_name}'"))
    except MlflowException as exc:
        raise RegistryError(f"cannot list versions of {model_name}: {exc}") from exc
    good = [v for v in versions if champion_problem(v) is None and (v.tags or {}).get(TAG_VERDICT) == "passed"]
    if not good:
        client.delete_registered_model_alias(model_name, CHAMPION)
        return None
    best = max(good, key=lambda v: int(v.version))
    client.set_registered_model_alias(model_name, CHAMPION, str(best.version))
    return str(best.version)


def waive(client: Any, model_name: str, version: str, reason: str, by: str) -> dict:
    """Record a reviewed exception: this version may be champion although the gate did not pass
    it (the waiver names its digest, so it does not cover a later swap of the artifact)."""
    if not reason.strip() or not by.strip():
        raise RegistryError("a waiver needs --reason and --by (who reviewed it)")
    mv = client.get_model_version(model_name, version)
    sha = (mv.tags or {}).get(TAG_SHA)
    if not sha or artifact_sha256(client, model_name, version) != sha:
        raise RegistryError(f"{model_name} v{version}'s artifact does not match its recorded digest: not waived")
    w = {"by": by, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sha256": sha}
    client.set_model_version_tag(model_name, version, TAG_WAIVER, json.dumps(w, sort_keys=True)[:_TAG_MAX])
    client.set_registered_model_alias(model_name, CHAMPION, version)
    return w


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.errors import redact
    from pipeline.tracking.runs import client as make_client

    ap = argparse.ArgumentParser(prog="python -m pipeline.tracking.registry",
                                 description="Repair the `champion` alias outside the gate, on the record.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("restore", help="move champion back to the newest version the gate passed for its digest")
    r.add_argument("--model", required=True, help="registered model name (poisongate-<data.name>)")
    w = sub.add_parser("waive", help="make a version champion although the gate did not pass it, recording why")
    w.add_argument("--model", required=True, help="registered model name")
    w.add_argument("--version", required=True, help="the version to make champion")
    w.add_argument("--reason", required=True, help="why this exception is acceptable (recorded on the version)")
    w.add_argument("--by", required=True, help="who reviewed it (recorded on the version)")
    s = sub.add_parser("status", help="say whether the champion carries a passed verdict for its digest")
    s.add_argument("--model", required=True, help="registered model name")
    args = ap.parse_args(argv)
    try:
        c = make_client()
        if args.cmd == "restore":
            v = restore(c, args.model)
            print(f"champion of {args.model}: {'v' + v if v else 'none (no version passed the gate)'}")
        elif args.cmd == "waive":
            waive(c, args.model, args.version, args.reason, args.by)
            print(f"champion of {args.model}: v{args.version} (waiver recorded on the version)")
        else:
            mv = champion(c, args.model)
            problem = champion_problem(mv)
            print(f"champion of {args.model}: {'v' + str(mv.version) if mv else 'none'}"
                  + (f": {problem}" if problem else ": gated"))
            return 1 if problem else 0
    except Exception as exc:  # noqa: BLE001 - a CLI: every failure is a message and exit 2
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
