"""The full release flow against the team server: the real `dvc repro` (digits, CPU) with
MLFLOW_TRACKING_URI pointing at `mlflow server` on PostgreSQL whose artifacts go to S3 (moto).

A clean release passes and becomes `champion`; a backdoored one (data gate in warn mode) is
blocked by the release gate, tagged as failed, and the champion does not move; the runs' and
the registered model's artifacts are objects in the S3 bucket. Then two gates race to promote
two passing candidates: exactly one moves `champion`, the other fails closed.

Only user-visible behaviour is asserted (exit codes, reports/gate.json, the registry alias and
tags, objects in the bucket), so the test survives refactors of the stages.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import make_repo_copy

from .conftest import BUCKET

pytestmark = pytest.mark.smoke


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(uri: str, name: str):
    from mlflow.exceptions import MlflowException

    try:
        v = _client(uri).get_registered_model(name).aliases.get("champion")
    except MlflowException:
        return None
    return None if v is None else str(v)


def _s3_prefix(uri: str) -> str:
    """``mlflow-artifacts:/<path>`` (the proxied scheme) -> the S3 key prefix it is stored under."""
    assert uri.startswith("mlflow-artifacts:"), uri
    return "mlartifacts/" + uri.split(":", 1)[1].lstrip("/")


def test_release_flow_on_postgres_and_s3(tmp_path, team_server, s3, unique_name):
    repo = make_repo_copy(tmp_path)
    repo.env["MLFLOW_TRACKING_URI"] = team_server.url
    name = unique_name
    client = _client(team_server.url)

    # 1. Clean release: passes against the clean twin and becomes champion.
    repo.compose(f"mlflow.model_name={name}")
    repo.repro()
    gate = repo.json("reports/gate.json")
    assert gate["passed"] is True, gate
    clean = repo.json("reports/train.json")
    first = str(clean["model_version"])
    assert _champion(team_server.url, name) == first
    mv = client.get_model_version(name, first)
    assert mv.tags.get("poisongate.gate") == "passed"
    # The run's artifacts and the registered model's files are objects in the bucket.
    run_keys = s3.keys(BUCKET, _s3_prefix(client.get_run(clean["run_id"]).info.artifact_uri) + "/")
    assert run_keys, "no artifact of the training run in S3"
    model_keys = s3.keys(BUCKET, _s3_prefix(client.get_model_version_download_uri(name, first)) + "/")
    assert model_keys, "the registered model's files are not in S3"

    # 2. Backdoor: 3x3 patch on 10% of class 1 -> 7, data gate only warns: the release gate blocks.
    repo.compose(f"mlflow.model_name={name}", "attack=backdoor", "attack.source=1", "attack.target=7",
                 "attack.rate=0.1", "validate.on_fail=warn")
    proc = repo.repro(check=False)
    assert proc.returncode != 0
    gate = repo.json("reports/gate.json")
    assert gate["passed"] is False
    assert gate["baseline"]["kind"] == "champion"  # compared with the champion, loaded back from S3
    failed = [c["name"] for c in gate["checks"] if not c["passed"]]
    assert any(n.startswith("asr") for n in failed), gate
    poisoned = str(repo.json("reports/train.json")["model_version"])
    assert poisoned != first
    assert client.get_model_version(name, poisoned).tags.get("poisongate.gate") == "failed"
    assert _champion(team_server.url, name) == first

    # 3. Two gates race. Two clean candidates are trained and evaluated against champion v1 (the
    # same config retrained: a new registry version each), then both gates run at once.
    repo.compose(f"mlflow.model_name={name}")
    sides = []
    for side in ("a", "b"):
        if side == "b":
            repo.repro("--force", "-s", "train")
        repo.repro("evaluate")
        d = tmp_path / side
        d.mkdir()
        for f in ("metrics.json", "baseline_metrics.json", "train.json"):
            shutil.copy(repo.root / "reports" / f, d / f)
        sides.append(d)
    versions = [repo.json(str(d / "train.json"))["model_version"] for d in sides]
    assert len(set(versions)) == 2
    procs = [
        subprocess.Popen([sys.executable, "-m", "pipeline.gate", "--params", "params.yaml",
                          "--metrics", str(d / "metrics.json"), "--baseline-metrics", str(d / "baseline_metrics.json"),
                          "--validated", "data/validated.json", "--train-report", str(d / "train.json"),
                          "--report", str(d / "gate.json"), "--summary", str(d / "gate.md")],
                         cwd=repo.root, env=repo.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for d in sides
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    rcs = [p.returncode for p in procs]
    assert sorted(rcs)[0] == 0 and sorted(rcs)[1] != 0, (rcs, outs)
    win, lose = (0, 1) if rcs[0] == 0 else (1, 0)
    assert _champion(team_server.url, name) == str(versions[win])
    lost = repo.json(str(sides[lose] / "gate.json"))
    assert lost["passed"] is False
    assert client.get_model_version(name, str(versions[lose])).tags.get("poisongate.gate") != "passed"
    # Either the loser's promotion overlapped the winner's: it re-read the alias under the lock
    # and refused, naming the move it saw; or it started after the move and its baseline was
    # already stale (metrics_identity). Which one is timing; both fail closed.
    # tests/team/test_promotion_race.py forces the overlap with a barrier.
    moved = f"champion moved from v{first} to v{versions[win]}" in (lost.get("error") or "")
    stale = "metrics_identity" in lost.get("failed", [])
    assert moved or stale, lost
