"""Issue 12: the inspect stage, the backdoor scans and the gate checks that read its report.

Rules: hand-built reports (pass, fail, malformed, stale). Scans: tiny hand-made models whose
backdoor target is known. Stage: a poisoned digits pipeline run in-process (4 epochs): the stage
flags the poison, writes the CSV with its columns, and the gate binds its report by digest.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gates.rules import (
    INSPECT_FORMAT,
    Thresholds,
    backdoor_scan_check,
    evaluate_gate,
    inspection_checks,
    passed,
    poison_suspects_check,
)

T = Thresholds(max_asr=0.2, max_asr_increase=0.1, max_recall_drop=0.1, min_accuracy=0.9, max_accuracy_drop=0.03)
TRAIN = {"snapshot_id": "s1", "view_id": "v1", "checkpoint_sha256": "c1", "model_version": "2", "run_id": "r"}


def report(tail=(1.3, 1.4, 1.5), shallow=(1.5, 1.6, 1.7), anomaly=(0.5, -0.2, 1.1), issues=0.001, **over):
    rep = {
        "format": INSPECT_FORMAT, **{k: TRAIN[k] for k in ("snapshot_id", "view_id", "checkpoint_sha256", "model_version")},
        "mode": "two_view",
        "classes": {str(i): {"tail_ratio": a, "tail_ratio_shallow": b} for i, (a, b) in enumerate(zip(tail, shallow))},
        "cleanlab": {"k": 3, "epochs": 10}, "label_issue_fraction": issues,
        "flagged_with_block": {"rows": 0, "block_rows": 3, "classes": {}, "sample_ids": []},
        "scan": {"candidate": {"method": "max_margin", "max_anomaly": max(anomaly),
                               "per_class": {str(i): {"statistic": 10.0, "anomaly": a} for i, a in enumerate(anomaly)}},
                 "baseline": {"method": "max_margin", "max_anomaly": 1.0, "kind": "twin"}},
    }
    rep.update(over)
    return rep


# --------------------------------------------------------------------------- rules


def test_clean_report_passes_both_checks():
    checks = inspection_checks(report(), TRAIN, T)
    assert [c.name for c in checks] == ["poison_suspects", "backdoor_scan"]
    assert all(c.passed for c in checks), checks
    assert checks[0].value == pytest.approx(1.5) and checks[1].value == pytest.approx(1.1)


def test_a_suspect_cluster_fails_and_names_the_class():
    c = poison_suspects_check(report(tail=(1.3, 4.2, 1.5)), TRAIN, T)
    assert not c.passed and c.value == pytest.approx(4.2) and "class 1 (4.20)" in c.reason
    # the threshold itself blocks (the detector's rule is ratio >= threshold)
    assert not poison_suspects_check(report(tail=(1.3, T.max_tail_ratio, 1.5)), TRAIN, T).passed
    c = poison_suspects_check(report(shallow=(1.5, 3.0, 1.7)), TRAIN, T)
    assert not c.passed and "shallow" in c.reason
    c = poison_suspects_check(report(issues=0.05), TRAIN, T)
    assert not c.passed and "cleanlab" in c.reason
    assert poison_suspects_check(report(cleanlab=None, label_issue_fraction=None), TRAIN, T).passed


def test_one_suspect_row_with_an_abnormal_block_fails_and_is_named():
    one = {"rows": 1, "block_rows": 4, "classes": {"2": 1}, "sample_ids": ["train/2/r00010.png"]}
    c = poison_suspects_check(report(flagged_with_block=one), TRAIN, T)
    assert not c.passed and "abnormal pixel block" in c.reason and "train/2/r00010.png" in c.reason
    assert c.value == pytest.approx(1.5)  # the value stays the largest tail ratio
    relaxed = Thresholds(**{**T.__dict__, "max_flagged_with_block": 1})
    assert poison_suspects_check(report(flagged_with_block=one), TRAIN, relaxed).passed
    assert "0 flagged row(s) with an abnormal pixel block" in poison_suspects_check(report(), TRAIN, T).reason


def test_flagged_with_block_counts_only_rows_both_views_agree_on():
    from pipeline.inspect import flagged_with_block

    flagged = np.array([1, 0, 1, 0, 1], bool)
    block = np.array([1, 1, 0, 0, 1], bool)
    out = flagged_with_block(flagged, block, np.array([0, 1, 1, 0, 2]), [f"r{i}" for i in range(5)], ["a", "b", "c"])
    assert out == {"rows": 2, "block_rows": 3, "classes": {"a": 1, "c": 1}, "sample_ids": ["r0", "r4"]}


def test_a_scan_outlier_fails_and_names_the_target():
    c = backdoor_scan_check(report(anomaly=(0.1, 9.0, 0.3)), TRAIN, T)
    assert not c.passed and c.value == pytest.approx(9.0) and "target class 1" in c.reason
    assert backdoor_scan_check(report(anomaly=(0.1, T.max_scan_anomaly, 0.3)), TRAIN, T).passed


@pytest.mark.parametrize("bad", [
    None, "unreadable (Expecting value)", [], {"format": "other"},
    report(format="poisongate-inspect/0"),
    report(classes={}), report(classes={"0": {"tail_ratio": float("nan"), "tail_ratio_shallow": 1.0}}),
    report(classes={"0": {"tail_ratio": "x"}}), report(mode="self"),
    report(label_issue_fraction=None),
    report(flagged_with_block=None), report(flagged_with_block={"rows": "x"}),
    report(flagged_with_block={"rows": float("nan")}),
])
def test_missing_or_malformed_report_fails_poison_suspects_closed(bad):
    c = poison_suspects_check(bad, TRAIN, T)
    assert not c.passed
    assert "fails closed" in c.reason or "stale" in c.reason


@pytest.mark.parametrize("bad", [
    None, report(scan={}), report(scan={"candidate": {"per_class": {}}}),
    report(scan={"candidate": {"per_class": {"0": {"anomaly": 1}, "1": {"anomaly": None}, "2": {"anomaly": 0}}}}),
    report(scan={"candidate": {"per_class": {"0": {"anomaly": float("inf")}, "1": {}, "2": {}}}}),
])
def test_missing_or_malformed_scan_fails_closed(bad):
    c = backdoor_scan_check(bad, TRAIN, T)
    assert not c.passed and "fails closed" in c.reason


def test_missing_report_says_what_to_run():
    for c in inspection_checks(None, TRAIN, T):
        assert not c.passed and "dvc repro inspect" in c.reason


@pytest.mark.parametrize("field", ["snapshot_id", "view_id", "checkpoint_sha256", "model_version"])
def test_a_report_for_another_candidate_is_stale(field):
    rep = report(**{field: "other"})
    for c in inspection_checks(rep, TRAIN, T):
        assert not c.passed and "stale" in c.reason and field in c.reason
    assert not passed(inspection_checks(report(), None, T))


def test_not_required_passes_and_the_gate_appends_the_checks():
    relaxed = Thresholds(**{**T.__dict__, "require_inspection": False})
    assert all(c.passed and "not required" in c.reason for c in inspection_checks(None, TRAIN, relaxed))
    rep = report(tail=(1.3, 5.0, 1.5))
    before = copy.deepcopy(rep)
    metrics = {"accuracy": 0.99, "per_class": {"0": {"recall": 1.0}}, "asr": {"a": {"0": 0.0}},
               "model": {"checkpoint_sha256": "c1"}, "snapshot_id": "s1", "view_id": "v1"}
    base = {**metrics, "baseline": {"kind": "twin"}}
    checks = evaluate_gate(metrics, base, {"view_id": "v1", "success": True}, TRAIN, None, T,
                           detection=inspection_checks(rep, TRAIN, T))
    assert [c.name for c in checks][-2:] == ["poison_suspects", "backdoor_scan"]
    assert not passed(checks) and rep == before


# --------------------------------------------------------------------------- scans


class _Planted(nn.Module):
    """Logits = a fixed random linear map of the image, plus a large bonus for class ``target``
    when the top-left pixel is bright: a backdoor the max-margin scan must find."""

    def __init__(self, k: int = 6, target: int | None = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(k, 64, generator=g) * 0.01)
        self.target = target

    def forward(self, x):
        x = x.float() / 255.0
        logits = x.flatten(1) @ self.w.T
        if self.target is not None:
            bonus = torch.zeros_like(logits)
            bonus[:, self.target] = 30.0 * x[:, 0, 0, 0]
            logits = logits + bonus
        return logits


def test_anomaly_index_is_one_sided_and_refuses_bad_input():
    from pipeline.core.scan import ScanError, anomaly_index

    a = anomaly_index([1.0, 1.1, 0.9, 1.0, 5.0])
    assert a.argmax() == 4 and a[4] > 10
    assert anomaly_index([1.0, 1.1, 0.9, 1.0, 0.01], high=False).argmax() == 4
    assert np.all(anomaly_index([2.0, 2.0, 2.0]) == 0)
    with pytest.raises(ScanError):
        anomaly_index([1.0, 2.0])
    with pytest.raises(ScanError):
        anomaly_index([1.0, float("nan"), 2.0])
    with pytest.raises(ScanError):
        anomaly_index([1.0, 1.1, 0.9], rel_floor=1.0)


def test_mad_floor_damps_a_collapsed_spread_but_keeps_a_real_outlier():
    """Nine classes almost equal (MAD 0.01 of a median 10): an ordinary 1.0 step reads as a huge
    index without the floor and as a small one with it, while a backdoor-sized margin (2x the
    median) stays far above the gate's threshold either way."""
    from pipeline.core.scan import anomaly_index
    from pipeline.schema import GateConfig, InspectConfig

    floor, thr = InspectConfig().scan_mad_floor, GateConfig().max_scan_anomaly
    spread = [10.0, 10.01, 9.99, 10.02, 9.98, 10.0, 10.01, 9.99, 10.0, 11.0]
    assert anomaly_index(spread, rel_floor=0.0).max() > 30 > thr
    assert anomaly_index(spread, rel_floor=floor).max() < thr
    planted = spread[:-1] + [20.0]
    assert anomaly_index(planted, rel_floor=floor).argmax() == 9 and anomaly_index(planted, rel_floor=floor).max() > 2 * thr


def test_max_margin_scan_finds_the_planted_target():
    from pipeline.core.scan import max_margin_scan

    torch.manual_seed(0)
    hit = max_margin_scan(_Planted(target=2), 6, (8, 8, 1), restarts=2, steps=40)
    assert hit.suspect == 2 and hit.max_anomaly > 3.0
    clean = max_margin_scan(_Planted(target=None), 6, (8, 8, 1), restarts=2, steps=40)
    assert clean.anomaly[2] < hit.anomaly[2]
    d = hit.to_dict([f"c{i}" for i in range(6)])
    assert d["suspect_class"] == "c2" and set(d["per_class"]["c0"]) == {"statistic", "anomaly"}


def test_neural_cleanse_scan_runs_and_reports_its_masks():
    from pipeline.core.scan import ScanError, neural_cleanse_scan

    rng = np.random.default_rng(0)
    x = rng.integers(0, 100, (60, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 6, 60)
    r = neural_cleanse_scan(_Planted(target=2), x, y, 6, steps=30, batch=8)
    assert r.statistic.shape == (6,) and np.isfinite(r.anomaly).all() and set(r.extra) == {"asr"}
    assert r.statistic.min() >= 0 and r.statistic.max() <= 64  # an L1 norm of an 8x8 mask in [0, 1]
    with pytest.raises(ScanError):
        neural_cleanse_scan(_Planted(), x.astype(np.float32), y, 6)


def test_matched_epochs_matches_the_candidates_steps():
    from pipeline.core.inspection import matched_epochs

    assert matched_epochs(10, 1347, 450, 64) == 28  # 10 x 22 steps = 220 ~ 28 x 8 = 224
    assert matched_epochs(10, 100, 1000, 64) == 10  # never fewer epochs than the candidate
    with pytest.raises(ValueError):
        matched_epochs(0, 10, 10, 64)


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def poisoned_state(tmp_path_factory):
    """snapshot -> poison (3x3 patch on 20% of digit 1, relabelled 7) -> validate (warn) -> twin
    -> train -> inspect -> evaluate, in-process, 4 epochs, CPU."""
    from conftest import State

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inspect") / "state"
    root.mkdir(parents=True)
    state = State(root)
    state.compose("attack=backdoor", "attack.rate=0.2", "validate.on_fail=warn", "validate.docs=false")
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=state.uri).create_experiment("poisongate", artifact_location=(root / "mlartifacts").as_uri())
    for stage in ("snapshot", "poison", "validate", "twin", "train", "inspect", "evaluate"):
        rc, out = state.run(stage)
        assert rc == 0, f"{stage}: {out[-3000:]}"
    return state


def test_inspect_flags_the_poison_and_writes_the_csv(poisoned_state):
    from pipeline.inspect import SUSPECT_COLUMNS

    rep = poisoned_state.json("reports/inspect.json")
    train = poisoned_state.json("reports/train.json")
    for k in ("snapshot_id", "view_id", "checkpoint_sha256", "model_version"):
        assert rep[k] == train[k]
    assert rep["mode"] == "two_view" and rep["format"] == INSPECT_FORMAT
    assert "7" in rep["suspicious_classes"]  # the target class holds the poisoned cluster
    robust = rep["poison_record"]["detectors"]["robust"]
    assert robust["poisoned"] == rep["poison_record"]["rows"] > 0
    assert robust["recall"] >= 0.9 and robust["auroc"] >= 0.9
    assert set(rep["scan"]) == {"candidate", "baseline"} and rep["scan"]["baseline"]["kind"] == "twin"
    assert len(rep["scan"]["candidate"]["per_class"]) == 10
    assert {"load", "clean_model", "features", "robust", "kfold", "cleanlab", "scan_candidate", "total"} <= set(rep["seconds"])

    with open(poisoned_state.root / "reports/suspects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == SUSPECT_COLUMNS
    assert len(rows) == rep["train_rows"] == train["train_rows"]
    poisoned = [r for r in rows if r["poisoned"] == "1"]
    assert len(poisoned) == rep["poison_record"]["rows"]
    assert all(r["class"] == "7" and len(r["sha256"]) == 64 for r in poisoned)
    assert sum(r["flagged"] == "1" for r in poisoned) >= 0.9 * len(poisoned)
    assert not poison_suspects_check(rep, train, T).passed  # the gate would block this candidate
    # the block column is the data gate's scan; the report counts the rows both views agree on
    assert sum(r["abnormal_block"] == "1" for r in poisoned) >= 0.9 * len(poisoned)  # a 3x3 white patch
    both = [r["sample_id"] for r in rows if r["flagged_robust"] == "1" and r["abnormal_block"] == "1"]
    fwb = rep["flagged_with_block"]
    assert fwb["rows"] == len(both) >= 0.8 * len(poisoned) and fwb["sample_ids"] == both[:20]
    assert fwb["block_rows"] == sum(r["abnormal_block"] == "1" for r in rows)
    assert fwb["detector"]["block_size_max"] == 4 and "block_scan" in rep["seconds"]


def test_gate_blocks_on_poison_suspects_and_binds_the_report(poisoned_state, tmp_path):
    state = poisoned_state.clone(tmp_path / "s")
    rc, _ = state.run("gate", params="params.yaml")
    gate = state.json("reports/gate.json")
    checks = {c["name"]: c for c in gate["checks"]}
    assert rc == 1 and not checks["poison_suspects"].get("passed")
    assert checks["evidence_binding"]["passed"], checks["evidence_binding"]

    # an edited inspect report (a lowered ratio) no longer matches the digest its run recorded
    path = state.root / "reports/inspect.json"
    rep = json.loads(path.read_text())
    for row in rep["classes"].values():
        row["tail_ratio"] = row["tail_ratio_shallow"] = 1.0
    rep["label_issue_fraction"] = 0.0
    path.write_text(json.dumps(rep))
    rc, _ = state.run("gate")
    checks = {c["name"]: c for c in state.json("reports/gate.json")["checks"]}
    assert rc == 1 and not checks["evidence_binding"]["passed"]
    assert "inspect.json" in checks["evidence_binding"]["reason"]

    # a deleted report fails closed and says what to run
    path.unlink()
    rc, _ = state.run("gate")
    checks = {c["name"]: c for c in state.json("reports/gate.json")["checks"]}
    assert rc == 1 and "dvc repro inspect" in checks["poison_suspects"]["reason"]
    assert not checks["backdoor_scan"]["passed"]


def test_inspect_refuses_a_swapped_candidate(poisoned_state, tmp_path):
    import shutil

    state = poisoned_state.clone(tmp_path / "s")
    shutil.copyfile(state.root / "models/twin.safetensors", state.root / "models/candidate.safetensors")
    rc, out = state.run("inspect")
    assert rc == 1 and "candidate.safetensors" in out and "swapped" in out


def test_lgm_likelihood_is_one_more_per_sample_score(poisoned_state, tmp_path):
    """A candidate trained with train.loss=lgm (issue 13) adds its class-Gaussian negative
    log-likelihood to reports/suspects.csv and its AUROC to the poison record; a softmax
    candidate leaves the column empty."""
    with open(poisoned_state.root / "reports/suspects.csv", newline="") as fh:
        assert {r["lgm_nll"] for r in csv.DictReader(fh)} == {""}
    state = poisoned_state.clone(tmp_path / "lgm")
    state.compose("attack=backdoor", "attack.rate=0.2", "validate.on_fail=warn", "validate.docs=false",
                  "train.loss=lgm")
    for stage in ("train", "inspect"):
        rc, out = state.run(stage)
        assert rc == 0, f"{stage}: {out[-3000:]}"
    with open(state.root / "reports/suspects.csv", newline="") as fh:
        nll = np.array([float(r["lgm_nll"]) for r in csv.DictReader(fh)])
    rep = state.json("reports/inspect.json")
    assert len(nll) == rep["train_rows"] and np.isfinite(nll).all()
    lgm = rep["poison_record"]["detectors"]["lgm"]
    assert lgm["flagged"] == 0 and 0.0 <= lgm["auroc"] <= 1.0
    assert rep["seconds"]["lgm_scores"] >= 0
