"""The full release flow against the team server: the real `dvc repro` (digits, CPU) with
MLFLOW_TRACKING_URI pointing at `mlflow server` on PostgreSQL whose artifacts go to S3 (moto).

The module fixture runs the releases once: a clean one, then a backdoored one (data gate in
warn mode), and records what a user would look at right after each (exit code,
reports/gate.json, the registry alias and tags, objects in the bucket). The tests assert on
that record, so they survive refactors of the stages.

Two gates racing to move `champion` are tested in tests/team/test_promotion_race.py: real OS
processes against this same kind of server, the overlap forced by a barrier in every round.
"""

from __future__ import annotations

from types import SimpleNamespace

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


def _model_prefix(client, name: str, version: str) -> str:
    """The S3 key prefix of a registered version's files. The registry records the version's source
    as ``runs:/<run>/<path>`` (the digest-checked artifact stays in its run), so it resolves there."""
    uri = client.get_model_version_download_uri(name, version)
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        return _s3_prefix(client.get_run(run_id).info.artifact_uri) + "/" + path.strip("/")
    return _s3_prefix(uri)


@pytest.fixture(scope="module")
def releases(tmp_path_factory, team_server, s3):
    tmp = tmp_path_factory.mktemp("release-on-server")
    repo = make_repo_copy(tmp)
    repo.env["MLFLOW_TRACKING_URI"] = team_server.url
    name = "team-release"  # this module's own registered model on the shared server
    client = _client(team_server.url)
    r = SimpleNamespace(repo=repo, name=name, uri=team_server.url, tmp=tmp)

    # 1. Clean release.
    repo.compose(f"mlflow.model_name={name}")
    r.clean_rc = repo.repro(check=False).returncode
    r.clean_gate = repo.json("reports/gate.json")
    r.clean_train = repo.json("reports/train.json")
    r.first = str(r.clean_train["model_version"])
    r.champion_after_clean = _champion(team_server.url, name)
    r.clean_tags = dict(client.get_model_version(name, r.first).tags)
    r.run_keys = s3.keys(BUCKET, _s3_prefix(client.get_run(r.clean_train["run_id"]).info.artifact_uri) + "/")
    r.model_keys = s3.keys(BUCKET, _model_prefix(client, name, r.first) + "/")

    # 2. Backdoor: 3x3 patch on 10% of class 1 -> 7; the data gate only warns.
    repo.compose(f"mlflow.model_name={name}", "attack=backdoor", "attack.source=1", "attack.target=7",
                 "attack.rate=0.1", "validate.on_fail=warn")
    proc = repo.repro(check=False)
    r.poison_rc, r.poison_out = proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    r.poison_gate = repo.json("reports/gate.json")
    r.poisoned = str(repo.json("reports/train.json")["model_version"])
    r.champion_after_poison = _champion(team_server.url, name)
    r.poison_tags = dict(client.get_model_version(name, r.poisoned).tags)
    return r


def test_clean_release_passes_and_becomes_champion(releases):
    r = releases
    assert r.clean_rc == 0
    assert r.clean_gate["passed"] is True, r.clean_gate
    assert r.champion_after_clean == r.first
    assert r.clean_tags.get("poisongate.verdict") == "passed"
    # The run's artifacts and the registered model's files are objects in the bucket.
    assert r.run_keys, "no artifact of the training run in S3"
    assert r.model_keys, "the registered model's files are not in S3"


def test_poisoned_release_is_blocked_and_the_champion_stays(releases):
    r = releases
    assert r.poison_rc != 0, r.poison_out
    gate = r.poison_gate
    assert gate["passed"] is False
    assert gate["baseline"]["kind"] == "champion"  # compared with the champion, loaded back from S3
    failed = [c["name"] for c in gate["checks"] if not c["passed"]]
    assert any(n.startswith("asr") for n in failed), gate
    assert r.poisoned != r.first
    assert r.poison_tags.get("poisongate.verdict") == "blocked"
    assert r.champion_after_poison == r.first
