"""Smoke tier: attack=clean_label through the real `dvc repro` (digits, CPU, sqlite MLflow).

Label-consistent (the config's defaults): every label stays true, the evaluate stage scans the
attack's own trigger, reports/metrics.json and the MLflow run carry its ASR, and the release gate
judges it. Feature collision (in the same repo, re-using snapshot and twin): reports/metrics.json
and the run carry its targeted success over 10 target instances."""

from __future__ import annotations

import pytest

from conftest import make_repo_copy

pytestmark = pytest.mark.smoke


def run_metrics(repo, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=repo.tracking_uri, registry_uri=repo.tracking_uri)
    return dict(client.get_run(run_id).data.metrics)


def test_clean_label_methods_report_their_success(tmp_path):
    repo = make_repo_copy(tmp_path)
    # warn: the model gate is what this test reaches (the data gate's verdict is recorded below)
    repo.compose("attack=clean_label", "validate.on_fail=warn")
    proc = repro_allow_block(repo)
    view = repo.json("data/view/view.json")
    assert view["attack"]["method"] == "label_consistent" and view["attack"]["craft_model"]["kind"] == "twin"
    assert view["n_poisoned"] > 0
    m, b = repo.json("reports/metrics.json"), repo.json("reports/baseline_metrics.json")
    asr, base_asr = m["asr"]["attack"]["8"], b["asr"]["attack"]["8"]
    assert asr is not None and asr > base_asr, (asr, base_asr)  # the poison taught the trigger
    run_id = repo.json("reports/train.json")["run_id"]
    logged = run_metrics(repo, run_id)
    assert logged["asr/attack/8"] == pytest.approx(asr)
    gate = repo.json("reports/gate.json")
    checks = {c["name"]: c for c in gate["checks"]}
    # the gate's ASR check saw the attack's trigger: its value is at least this trigger's ASR
    assert checks["asr_max"]["value"] >= asr - 1e-9
    if asr > checks["asr_max"]["threshold"]:
        assert not checks["asr_max"]["passed"] and gate["passed"] is False and proc.returncode != 0
    assert (proc.returncode == 0) == gate["passed"]

    repo.compose("attack=clean_label", "validate.on_fail=warn", "attack.method=feature_collision",
                 "attack.source=4", "attack.target=9", "attack.eps=160", "attack.steps=50")
    proc = repro_allow_block(repo)
    view = repo.json("data/view/view.json")
    assert view["attack"]["method"] == "feature_collision" and len(view["attack"]["targets"]) == 10
    m = repo.json("reports/metrics.json")
    t = m["targeted"]["feature_collision"]
    assert t["n_targets"] == 10 and t["base_class"] == 9 and 0.0 <= t["success_rate"] <= 1.0
    assert repo.json("reports/baseline_metrics.json")["targeted"]["feature_collision"]["n_targets"] == 10
    logged = run_metrics(repo, repo.json("reports/train.json")["run_id"])
    assert logged["eval/targeted_success/feature_collision"] == pytest.approx(t["success_rate"])
    assert view["crafting"]["feature_dist_after"] < view["crafting"]["feature_dist_before"]
    # the release gate judges the targets (red-team runs only): a moved target beyond the baseline blocks
    gate = repo.json("reports/gate.json")
    check = {c["name"]: c for c in gate["checks"]}["targeted_success[feature_collision]"]
    base = repo.json("reports/baseline_metrics.json")["targeted"]["feature_collision"]["success_rate"]
    assert check["value"] == pytest.approx(t["success_rate"] - base)
    assert check["passed"] == (check["value"] <= check["threshold"])
    if not check["passed"]:
        assert gate["passed"] is False and proc.returncode != 0


def repro_allow_block(repo):
    """`dvc repro`: exit 0 on a pass, non-zero only when the gate blocked (never another failure)."""
    proc = repo.repro(check=False)
    if proc.returncode != 0:
        gate = (repo.root / "reports" / "gate.json")
        assert gate.is_file() and "Running stage 'gate'" in proc.stdout, proc.stderr[-4000:]
        assert repo.json("reports/gate.json")["passed"] is False, proc.stderr[-4000:]
    return proc
