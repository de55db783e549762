"""Gate rules on hand-built metrics: each rule passes, fails, and fails closed."""

from __future__ import annotations

import copy
import math

import pytest

from gates.rules import (
    Thresholds,
    accuracy_checks,
    asr_checks,
    evaluate_gate,
    identity_check,
    passed,
    recall_checks,
    validation_check,
)

T = Thresholds(max_asr=0.2, max_asr_increase=0.1, max_recall_drop=0.1, min_accuracy=0.9, max_accuracy_drop=0.03)


def metrics(acc=0.97, recalls=(0.98, 0.97, 0.96), asr=0.02, snapshot="s1", sha="c1", view="v1"):
    return {
        "accuracy": acc,
        "per_class": {str(i): {"precision": 0.9, "recall": r, "f1": 0.9} for i, r in enumerate(recalls)},
        "asr": {"patch_br": {"0": asr, "1": 0.01}, "blend": {"0": 0.0, "1": 0.0}},
        "model": {"checkpoint_sha256": sha, "model_version": "2", "run_id": "r"},
        "snapshot_id": snapshot,
        "view_id": view,
    }


def baseline(kind="twin", version=None, **kw):
    m = metrics(**kw)
    m["baseline"] = {"kind": kind, "model_version": version, "snapshot_id": m["snapshot_id"]}
    return m


TRAIN = {"checkpoint_sha256": "c1", "snapshot_id": "s1", "model_version": "2", "run_id": "r"}
VALID = {"view_id": "v1", "success": True, "in_ledger": True}


def by_name(checks):
    return {c.name: c for c in checks}


def test_clean_candidate_passes_every_check():
    checks = evaluate_gate(metrics(), baseline(), VALID, TRAIN, None, T)
    assert passed(checks), [c for c in checks if not c.passed]
    assert {"metrics_identity", "data_validation", "accuracy", "accuracy_drop", "asr_max", "asr_increase"} <= set(by_name(checks))
    assert sum(c.name.startswith("recall_drop[") for c in checks) == 3


def test_backdoor_fails_on_asr_and_names_the_pair():
    checks = by_name(asr_checks(metrics(asr=0.9), baseline(), T))
    assert not checks["asr_max"].passed and checks["asr_max"].value == pytest.approx(0.9)
    assert "patch_br -> 0" in checks["asr_max"].reason
    assert not checks["asr_increase"].passed and checks["asr_increase"].value == pytest.approx(0.88)


def test_asr_increase_is_pairwise():
    # The baseline is weak on another target: the increase on this pair must still show.
    cand = metrics(asr=0.15)
    base = baseline()
    base["asr"]["patch_br"] = {"0": 0.0, "1": 0.15}
    checks = by_name(asr_checks(cand, base, T))
    assert checks["asr_max"].passed
    assert not checks["asr_increase"].passed and checks["asr_increase"].value == pytest.approx(0.15)


def test_label_flip_fails_on_one_class_recall():
    checks = by_name(recall_checks(metrics(recalls=(0.98, 0.70, 0.96)), baseline(), T))
    assert not checks["recall_drop[1]"].passed
    assert checks["recall_drop[1]"].value == pytest.approx(0.27)
    assert checks["recall_drop[0]"].passed and checks["recall_drop[2]"].passed


def test_recall_drop_at_threshold_passes_and_just_over_fails():
    assert recall_checks(metrics(recalls=(0.88, 0.97, 0.96)), baseline(recalls=(0.98, 0.97, 0.96)), T)[0].passed
    assert not recall_checks(metrics(recalls=(0.879, 0.97, 0.96)), baseline(recalls=(0.98, 0.97, 0.96)), T)[0].passed


def test_accuracy_floor_and_drop():
    low = by_name(accuracy_checks(metrics(acc=0.85), baseline(acc=0.86), T))
    assert not low["accuracy"].passed and low["accuracy_drop"].passed
    drop = by_name(accuracy_checks(metrics(acc=0.92), baseline(acc=0.97), T))
    assert drop["accuracy"].passed and not drop["accuracy_drop"].passed


@pytest.mark.parametrize("bad", [None, float("nan"), math.inf, "n/a", True])
def test_missing_or_nan_metric_fails_closed(bad):
    cand = metrics()
    cand["accuracy"] = bad
    checks = by_name(accuracy_checks(cand, baseline(), T))
    assert not checks["accuracy"].passed and not checks["accuracy_drop"].passed
    assert "fails closed" in checks["accuracy"].reason


def test_nan_asr_and_missing_tables_fail_closed():
    cand = metrics()
    cand["asr"]["blend"]["1"] = float("nan")
    assert not any(c.passed for c in asr_checks(cand, baseline(), T))
    assert not any(c.passed for c in asr_checks({"asr": {}}, baseline(), T))
    no_base = baseline()
    del no_base["asr"]
    assert not by_name(asr_checks(metrics(), no_base, T))["asr_increase"].passed
    assert not recall_checks({"per_class": {}}, baseline(), T)[0].passed
    other = metrics()
    other["per_class"]["9"] = {"recall": 1.0}
    assert not recall_checks(other, baseline(), T)[0].passed


def test_validation_must_be_for_this_view():
    assert validation_check(VALID, metrics(), T).passed
    assert not validation_check({"view_id": "v1", "success": False}, metrics(), T).passed
    assert not validation_check({"view_id": "other", "success": True}, metrics(), T).passed
    assert not validation_check(None, metrics(), T).passed
    # a "passed" record without the ledger's approval of that view is not believed
    forged = validation_check({"view_id": "v1", "success": True}, metrics(), T)
    assert not forged.passed and "ledger" in forged.reason
    assert not validation_check({**VALID, "in_ledger": "yes"}, metrics(), T).passed
    relaxed = Thresholds(**{**T.__dict__, "require_validation": False})
    assert validation_check(None, metrics(), relaxed).passed


def test_stale_metrics_fail_identity():
    assert identity_check(metrics(), baseline(), TRAIN, None).passed
    assert not identity_check(metrics(sha="old"), baseline(), TRAIN, None).passed
    assert not identity_check(metrics(), baseline(snapshot="s0"), TRAIN, None).passed
    # The champion moved since the baseline was evaluated.
    assert not identity_check(metrics(), baseline("champion", "3"), TRAIN, "4").passed
    assert identity_check(metrics(), baseline("champion", "4"), TRAIN, "4").passed
    # A twin baseline while a champion exists is the wrong baseline.
    assert not identity_check(metrics(), baseline("twin"), TRAIN, "4").passed
    assert not identity_check(metrics(), {**baseline(), "baseline": {}}, TRAIN, None).passed
    assert not identity_check(metrics(), baseline(), None, None).passed


def test_inputs_are_not_mutated():
    cand, base = metrics(), baseline()
    before = copy.deepcopy((cand, base))
    evaluate_gate(cand, base, VALID, TRAIN, None, T)
    assert (cand, base) == before


def test_no_checks_is_not_a_pass():
    assert not passed([])


def test_a_blocked_version_stays_blocked():
    checks = by_name(evaluate_gate(metrics(), baseline(), VALID, TRAIN, None, T, prior_verdict="failed"))
    assert not checks["not_previously_blocked"].passed
    assert not passed(list(checks.values()))
    assert by_name(evaluate_gate(metrics(), baseline(), VALID, TRAIN, None, T, prior_verdict="passed"))["not_previously_blocked"].passed


def test_gate_rerun_after_promotion_keeps_its_baseline():
    # TRAIN's version 2 was promoted against the twin; re-running the gate must not call that stale.
    assert identity_check(metrics(), baseline("twin"), TRAIN, "2").passed
    assert identity_check(metrics(), baseline("champion", "1"), TRAIN, "2").passed
    # ...but another version's champion still makes a twin baseline stale.
    assert not identity_check(metrics(), baseline("twin"), TRAIN, "3").passed


def test_targeted_success_checks_only_red_team_targets_and_fail_closed():
    from gates.rules import targeted_checks

    assert targeted_checks(metrics(), baseline(), T) == []  # no targets: no check
    fc = lambda rate: {"feature_collision": {"success_rate": rate, "successes": int(rate * 10), "n_targets": 10}}  # noqa: E731
    ok = targeted_checks({**metrics(), "targeted": fc(0.0)}, {**baseline(), "targeted": fc(0.0)}, T)
    assert [c.name for c in ok] == ["targeted_success[feature_collision]"] and ok[0].passed
    moved = targeted_checks({**metrics(), "targeted": fc(0.1)}, {**baseline(), "targeted": fc(0.0)}, T)
    assert not moved[0].passed and moved[0].value == pytest.approx(0.1)
    no_base = targeted_checks({**metrics(), "targeted": fc(0.0)}, baseline(), T)
    assert not no_base[0].passed and "fails closed" in no_base[0].reason
    assert not targeted_checks({**metrics(), "targeted": "x"}, baseline(), T)[0].passed
    checks = evaluate_gate({**metrics(), "targeted": fc(0.2)}, {**baseline(), "targeted": fc(0.0)}, VALID, TRAIN, None, T)
    assert "targeted_success[feature_collision]" in [c.name for c in checks if not c.passed]
