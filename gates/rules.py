"""Release-gate rules as pure functions: metrics + thresholds -> checks.

Nothing here reads files, talks to MLflow or imports torch. Every rule fails closed: a missing,
non-numeric or NaN value, or metrics computed for another model or test split than the candidate
(stale), fails its check with a reason instead of being skipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from pipeline.schema import GateConfig


@dataclass(frozen=True)
class Check:
    name: str
    value: Optional[float]
    threshold: Optional[float]
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The thresholds are the config schema's own type (conf/gate), not a mirrored copy.
Thresholds = GateConfig


def _number(value: Any) -> Optional[float]:
    """A finite float, or None for anything missing, non-numeric, NaN or infinite."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(x: Optional[float]) -> str:
    return "missing" if x is None else f"{x:.4f}"


def _at_most(name: str, value: Any, threshold: float, what: str) -> Check:
    x = _number(value)
    if x is None:
        return Check(name, None, threshold, False, f"{what} is missing or not a finite number: fails closed")
    ok = x <= threshold
    rel = "<=" if ok else ">"
    return Check(name, x, threshold, ok, f"{what} {_fmt(x)} {rel} {threshold:.4f}")


def _at_least(name: str, value: Any, threshold: float, what: str) -> Check:
    x = _number(value)
    if x is None:
        return Check(name, None, threshold, False, f"{what} is missing or not a finite number: fails closed")
    ok = x >= threshold
    rel = ">=" if ok else "<"
    return Check(name, x, threshold, ok, f"{what} {_fmt(x)} {rel} {threshold:.4f}")


def _asr_pairs(metrics: Mapping[str, Any]) -> Optional[dict[tuple[str, str], Optional[float]]]:
    asr = metrics.get("asr")
    if not isinstance(asr, Mapping) or not asr:
        return None
    pairs: dict[tuple[str, str], Optional[float]] = {}
    for trigger, by_target in asr.items():
        if not isinstance(by_target, Mapping) or not by_target:
            pairs[(str(trigger), "?")] = None
            continue
        for target, value in by_target.items():
            pairs[(str(trigger), str(target))] = _number(value)
    return pairs


def asr_checks(candidate: Mapping[str, Any], baseline: Mapping[str, Any], t: Thresholds) -> list[Check]:
    """Highest ASR over scan triggers and targets, and its increase over the baseline.

    The increase is taken pair by pair (same trigger, same target), so a backdoor on one target
    is not hidden by a baseline that happens to be weak on another.
    """
    cand = _asr_pairs(candidate)
    if cand is None:
        return [
            Check("asr_max", None, t.max_asr, False, "candidate metrics have no ASR table: fails closed"),
            Check("asr_increase", None, t.max_asr_increase, False, "candidate metrics have no ASR table: fails closed"),
        ]
    bad = sorted(k for k, v in cand.items() if v is None)
    if bad:
        reason = f"ASR missing or NaN for {', '.join(f'{a}->{b}' for a, b in bad[:5])}: fails closed"
        return [Check("asr_max", None, t.max_asr, False, reason), Check("asr_increase", None, t.max_asr_increase, False, reason)]
    (worst_t, worst_c), worst = max(cand.items(), key=lambda kv: kv[1])  # type: ignore[arg-type,return-value]
    top = _at_most("asr_max", worst, t.max_asr, f"max ASR ({worst_t} -> {worst_c})")

    base = _asr_pairs(baseline)
    if base is None:
        inc = Check("asr_increase", None, t.max_asr_increase, False, "baseline metrics have no ASR table: fails closed")
        return [top, inc]
    missing = sorted(k for k in cand if base.get(k) is None)
    if missing:
        reason = f"baseline ASR missing for {', '.join(f'{a}->{b}' for a, b in missing[:5])}: fails closed"
        return [top, Check("asr_increase", None, t.max_asr_increase, False, reason)]
    (inc_t, inc_c), increase = max(((k, v - base[k]) for k, v in cand.items()), key=lambda kv: kv[1])  # type: ignore[operator]
    inc = _at_most("asr_increase", increase, t.max_asr_increase, f"ASR increase over baseline ({inc_t} -> {inc_c})")
    return [top, inc]


def recall_checks(candidate: Mapping[str, Any], baseline: Mapping[str, Any], t: Thresholds) -> list[Check]:
    """One check per class: baseline recall minus candidate recall on the same test split."""
    cand = candidate.get("per_class")
    base = baseline.get("per_class")
    if not isinstance(cand, Mapping) or not cand:
        return [Check("recall_drop", None, t.max_recall_drop, False, "candidate metrics have no per-class table: fails closed")]
    if not isinstance(base, Mapping) or not base:
        return [Check("recall_drop", None, t.max_recall_drop, False, "baseline metrics have no per-class table: fails closed")]
    if set(cand) != set(base):
        diff = sorted(set(cand) ^ set(base))
        return [Check("recall_drop", None, t.max_recall_drop, False, f"candidate and baseline classes differ ({', '.join(map(str, diff))}): fails closed")]
    checks = []
    for cls in cand:
        c = _number((cand[cls] or {}).get("recall")) if isinstance(cand[cls], Mapping) else None
        b = _number((base[cls] or {}).get("recall")) if isinstance(base[cls], Mapping) else None
        drop = None if c is None or b is None else b - c
        checks.append(_at_most(f"recall_drop[{cls}]", drop, t.max_recall_drop, f"class {cls} recall drop vs baseline"))
    return checks


def accuracy_checks(candidate: Mapping[str, Any], baseline: Mapping[str, Any], t: Thresholds) -> list[Check]:
    acc = _number(candidate.get("accuracy"))
    base = _number(baseline.get("accuracy"))
    drop = None if acc is None or base is None else base - acc
    return [
        _at_least("accuracy", acc, t.min_accuracy, "clean accuracy"),
        _at_most("accuracy_drop", drop, t.max_accuracy_drop, "clean accuracy drop vs baseline"),
    ]


def targeted_checks(candidate: Mapping[str, Any], baseline: Mapping[str, Any], t: Thresholds) -> list[Check]:
    """Targeted clean-label attacks (feature collision): the share of the attack's target test
    images the candidate reads as the attack's base class, against the baseline on the same
    targets. Only a red-team run has targets (evaluate writes ``targeted`` when the view's attack
    names them); a real attacker's targets are unknown, which is why the trigger-agnostic checks
    exist. A candidate with targets and a baseline without them fails closed."""
    cand = candidate.get("targeted")
    if not cand:
        return []
    if not isinstance(cand, Mapping):
        return [Check("targeted_success", None, t.max_targeted_increase, False,
                      "the candidate's targeted metrics are malformed: fails closed")]
    base = baseline.get("targeted") if isinstance(baseline.get("targeted"), Mapping) else {}
    out = []
    for method in sorted(cand):
        c = cand[method] if isinstance(cand[method], Mapping) else {}
        b = base.get(method) if isinstance(base.get(method), Mapping) else {}
        name = f"targeted_success[{method}]"
        cx, bx = _number(c.get("success_rate")), _number(b.get("success_rate"))
        if cx is None or bx is None:
            out.append(Check(name, None, t.max_targeted_increase, False,
                             f"{method}: targeted success of the candidate or the baseline is missing: fails closed"))
            continue
        out.append(_at_most(name, cx - bx, t.max_targeted_increase,
                            f"{method}: targets read as the base class, candidate {cx:.2f} vs baseline {bx:.2f}, increase"))
    return out


def validation_check(validated: Optional[Mapping[str, Any]], candidate: Mapping[str, Any], t: Thresholds) -> Check:
    """The data gate must have passed for the very view the candidate was trained on: ``success``
    in data/validated.json, confirmed by ``in_ledger`` (the caller found the approval of that
    view in the hash-chained ledger; anything but True fails closed)."""
    name = "data_validation"
    if not t.require_validation:
        return Check(name, None, None, True, "not required (gate.require_validation=false)")
    if not validated:
        return Check(name, None, None, False, "no data validation record: fails closed")
    if validated.get("view_id") != candidate.get("view_id"):
        return Check(name, None, None, False, f"validation is for view {validated.get('view_id')}, candidate was trained on {candidate.get('view_id')}: stale")
    ok = validated.get("success") is True
    if ok and validated.get("in_ledger") is not True:
        return Check(name, 0.0, 1.0, False, f"data/validated.json says view {str(validated.get('view_id'))[:12]} passed, but the "
                     "approved ledger (data/approved/ledger.jsonl) holds no approval of it: the record was edited or "
                     "comes from another checkout; re-run `dvc repro validate`")
    return Check(name, 1.0 if ok else 0.0, 1.0, ok, "data validation passed" if ok else "data validation failed for this training view (see the run's artifact validation/validation.json)")


def identity_check(
    candidate: Mapping[str, Any],
    baseline: Mapping[str, Any],
    train_report: Optional[Mapping[str, Any]],
    current_champion: Optional[str],
) -> Check:
    """Metrics must belong to the candidate just trained, on the same test split as the baseline,
    and the baseline must be the registry's current champion (or the twin when there is none).

    A candidate that is itself the champion (the gate re-run after its promotion) keeps the
    baseline it was promoted against.
    """
    name = "metrics_identity"
    problems = []
    if not train_report:
        problems.append("no train report")
    else:
        model = candidate.get("model") or {}
        if model.get("checkpoint_sha256") != train_report.get("checkpoint_sha256"):
            problems.append("candidate metrics were computed for another checkpoint")
        if candidate.get("snapshot_id") != train_report.get("snapshot_id"):
            problems.append("candidate metrics were computed on another snapshot")
    if candidate.get("snapshot_id") is None or candidate.get("snapshot_id") != baseline.get("snapshot_id"):
        problems.append("candidate and baseline were not evaluated on the same test split")
    info = baseline.get("baseline") or {}
    kind = info.get("kind")
    is_champion = train_report is not None and current_champion is not None and \
        str(train_report.get("model_version")) == str(current_champion)
    if kind not in ("champion", "twin"):
        problems.append("baseline kind is missing")
    elif is_champion:
        pass
    elif kind == "champion":
        if current_champion is None:
            problems.append("baseline is a champion but the registry has none now")
        elif str(info.get("model_version")) != str(current_champion):
            problems.append(f"baseline is champion v{info.get('model_version')} but the champion is now v{current_champion}")
    elif current_champion is not None:
        problems.append(f"baseline is the clean twin but champion v{current_champion} exists")
    if problems:
        return Check(name, None, None, False, "; ".join(problems) + ": stale metrics, re-run `dvc repro --force evaluate`")
    return Check(name, None, None, True, "metrics belong to the candidate and the current baseline")


def prior_verdict_check(prior_verdict: Optional[str]) -> Check:
    """A version the gate once blocked stays blocked: relaxing thresholds afterwards must not
    promote it; the fix is a new training run (a new version)."""
    if prior_verdict in ("blocked", "failed"):
        return Check("not_previously_blocked", None, None, False,
                     "this model version was blocked by an earlier gate run; train a new version")
    return Check("not_previously_blocked", None, None, True, "no earlier block of this version")


def evidence_check(digests: Mapping[str, Mapping[str, Optional[str]]]) -> Check:
    """Every input the verdict rests on is bound by digest to what produced it.

    ``digests`` maps what is checked (e.g. ``"metrics.json"``, ``"registered artifact"``) to the
    sha256 each witness records for it (``{"file": ..., "evaluate record": ..., "mlflow run": ...}``):
    all witnesses of one item must name the same, non-empty digest. A hand-edited report, a
    swapped registry artifact or a version registered for another checkpoint fails here.
    """
    problems = []
    for item, witnesses in digests.items():
        values = {k: v for k, v in witnesses.items()}
        missing = sorted(k for k, v in values.items() if not v)
        if missing:
            problems.append(f"{item}: no digest from {', '.join(missing)}")
            continue
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{k} {str(v)[:12]}" for k, v in values.items())
            problems.append(f"{item} differs between witnesses ({shown})")
    if problems:
        return Check("evidence_binding", None, None, False,
                     "; ".join(problems) + ": the verdict's inputs were edited or swapped after they were produced")
    return Check("evidence_binding", None, None, True, f"{len(digests)} input(s) match the digests their producers recorded")


def lineage_check(report: Mapping[str, Any], registry_tags: Mapping[str, Any],
                  fields: tuple[str, ...] = ("snapshot_id", "view_id", "checkpoint_sha256")) -> Check:
    """The lineage the reports claim must be the lineage the registry version was registered with."""
    bad = [f"{k}: reports {str(report.get(k))[:12]}, registry {str(registry_tags.get(k))[:12]}"
           for k in fields if not report.get(k) or report.get(k) != registry_tags.get(k)]
    if bad:
        return Check("registry_lineage", None, None, False, "; ".join(bad) + ": the reports and the registry disagree")
    return Check("registry_lineage", None, None, True, "reports and registry version name the same snapshot, view and checkpoint")


def champion_check(problem: Optional[str]) -> Check:
    """The current champion must carry a passed verdict (or a recorded waiver) for its own digest."""
    if problem:
        return Check("champion_integrity", None, None, False, problem)
    return Check("champion_integrity", None, None, True, "the champion (if any) was promoted by the gate for its digest")


# --------------------------------------------------------------------------- trigger-agnostic checks
# They read reports/inspect.json (the inspect stage): per-class tail scan ratios of the two-view
# robust detector, cleanlab's label issues, and the backdoor scan's anomaly index per target class.

INSPECT_FORMAT = "poisongate-inspect/1"
_INSPECT_FIX = "run `dvc repro inspect` (or `dvc repro --force inspect`)"


def _inspection_problem(inspection: Any, train_report: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Why the inspect report cannot be judged (missing, malformed, or for another candidate), or None."""
    if inspection is None:
        return f"no inspect report: {_INSPECT_FIX}; fails closed"
    if not isinstance(inspection, Mapping) or inspection.get("format") != INSPECT_FORMAT:
        fmt = inspection.get("format") if isinstance(inspection, Mapping) else type(inspection).__name__
        return f"the inspect report is malformed (format {fmt!r}, expected {INSPECT_FORMAT}): {_INSPECT_FIX}; fails closed"
    if not train_report:
        return "no train report to bind the inspect report to: fails closed"
    stale = [k for k in ("snapshot_id", "view_id", "checkpoint_sha256", "model_version")
             if not inspection.get(k) or str(inspection.get(k)) != str(train_report.get(k))]
    if stale:
        return (f"the inspect report is for another candidate ({', '.join(stale)} differ from the train report): "
                f"stale, {_INSPECT_FIX}")
    return None


def poison_suspects_check(inspection: Any, train_report: Optional[Mapping[str, Any]], t: Thresholds) -> Check:
    """No class may hold a cluster of suspect rows: every class's main tail scan ratio must stay
    below ``max_tail_ratio`` and its shallow-band ratio below ``max_shallow_tail_ratio`` (the
    two-view robust detector; its thresholds were calibrated in that mode only), at most
    ``max_flagged_with_block`` rows may be both flagged by that detector and hold an abnormal pixel
    block (a patch trigger on one or a few rows, below every rate test), and cleanlab's label
    issues must stay below ``max_label_issue_fraction`` of the rows (when inspect ran cleanlab).
    Value: the largest main tail ratio."""
    name = "poison_suspects"
    if not t.require_inspection:
        return Check(name, None, t.max_tail_ratio, True, "not required (gate.require_inspection=false)")
    problem = _inspection_problem(inspection, train_report)
    if problem:
        return Check(name, None, t.max_tail_ratio, False, problem)
    if inspection.get("mode") != "two_view":
        return Check(name, None, t.max_tail_ratio, False,
                     f"the detector ran in mode {inspection.get('mode')!r}; the thresholds hold for 'two_view' only: "
                     "fails closed")
    classes = inspection.get("classes")
    if not isinstance(classes, Mapping) or not classes:
        return Check(name, None, t.max_tail_ratio, False, "the inspect report has no per-class table: fails closed")
    ratios: dict[str, tuple[Optional[float], Optional[float]]] = {}
    for cls, row in classes.items():
        row = row if isinstance(row, Mapping) else {}
        ratios[str(cls)] = (_number(row.get("tail_ratio")), _number(row.get("tail_ratio_shallow")))
    bad = sorted(c for c, (a, b) in ratios.items() if a is None or b is None)
    if bad:
        return Check(name, None, t.max_tail_ratio, False,
                     f"tail ratio missing or not finite for class {', '.join(bad[:5])}: fails closed")
    worst_cls, (worst, _) = max(ratios.items(), key=lambda kv: kv[1][0])  # type: ignore[arg-type,return-value]
    over = [f"{c} ({a:.2f})" for c, (a, _b) in ratios.items() if a >= t.max_tail_ratio]  # type: ignore[operator]
    over_shallow = [f"{c} ({b:.2f})" for c, (_a, b) in ratios.items() if b >= t.max_shallow_tail_ratio]  # type: ignore[operator]
    problems = []
    if over:
        problems.append(f"class {', '.join(over)} tail ratio >= {t.max_tail_ratio:.2f}")
    if over_shallow:
        problems.append(f"class {', '.join(over_shallow)} shallow tail ratio >= {t.max_shallow_tail_ratio:.2f}")
    fwb = inspection.get("flagged_with_block")
    n_both = _number(fwb.get("rows")) if isinstance(fwb, Mapping) else None
    if n_both is None:
        return Check(name, worst, t.max_tail_ratio, False,
                     "the inspect report has no count of flagged rows with an abnormal pixel block "
                     "(flagged_with_block; written by the inspect stage since issue 12's block rule): "
                     "re-run `dvc repro inspect`; fails closed")
    if n_both > t.max_flagged_with_block:
        ids = [str(x) for x in fwb.get("sample_ids") or []][:5]
        problems.append(f"{int(n_both)} training row(s) flagged by the robust detector hold an abnormal pixel block "
                        f"(> {t.max_flagged_with_block}; classes {dict(fwb.get('classes') or {})}; e.g. {', '.join(ids)})")
    cleanlab = "cleanlab not run (inspect.kfold=0)"
    if inspection.get("cleanlab") is not None:
        frac = _number(inspection.get("label_issue_fraction"))
        if frac is None:
            return Check(name, worst, t.max_tail_ratio, False, "cleanlab's label-issue fraction is missing: fails closed")
        cleanlab = f"cleanlab label issues {frac:.4f} of the rows"
        if frac > t.max_label_issue_fraction:
            problems.append(f"{cleanlab} > {t.max_label_issue_fraction:.4f}")
    if problems:
        return Check(name, worst, t.max_tail_ratio, False,
                     "; ".join(problems) + ": a cluster of suspect training rows (see reports/suspects.csv)")
    return Check(name, worst, t.max_tail_ratio, True,
                 f"largest tail ratio {worst:.2f} (class {worst_cls}) < {t.max_tail_ratio:.2f}; {cleanlab}; "
                 f"{int(n_both)} flagged row(s) with an abnormal pixel block")


def backdoor_scan_check(inspection: Any, train_report: Optional[Mapping[str, Any]], t: Thresholds) -> Check:
    """No target class may be an outlier of the backdoor scan: the candidate's largest anomaly
    index over target classes must stay at or below ``max_scan_anomaly`` (MAD units)."""
    name = "backdoor_scan"
    if not t.require_inspection:
        return Check(name, None, t.max_scan_anomaly, True, "not required (gate.require_inspection=false)")
    problem = _inspection_problem(inspection, train_report)
    if problem:
        return Check(name, None, t.max_scan_anomaly, False, problem)
    scan = inspection.get("scan")
    cand = scan.get("candidate") if isinstance(scan, Mapping) else None
    per = cand.get("per_class") if isinstance(cand, Mapping) else None
    if not isinstance(per, Mapping) or len(per) < 3:
        return Check(name, None, t.max_scan_anomaly, False, "the inspect report has no scan of the candidate: fails closed")
    values = {str(c): _number(row.get("anomaly") if isinstance(row, Mapping) else None) for c, row in per.items()}
    bad = sorted(c for c, v in values.items() if v is None)
    if bad:
        return Check(name, None, t.max_scan_anomaly, False,
                     f"scan anomaly missing or not finite for class {', '.join(bad[:5])}: fails closed")
    target, worst = max(values.items(), key=lambda kv: kv[1])  # type: ignore[arg-type,return-value]
    base = scan.get("baseline") if isinstance(scan, Mapping) else None
    base_txt = ""
    if isinstance(base, Mapping) and _number(base.get("max_anomaly")) is not None:
        base_txt = f" (baseline {base.get('kind', '?')}: {_number(base.get('max_anomaly')):.2f})"
    method = cand.get("method", "?")
    c = _at_most(name, worst, t.max_scan_anomaly, f"{method} scan: largest anomaly index (target class {target})")
    return Check(name, c.value, c.threshold, c.passed, c.reason + base_txt +
                 ("" if c.passed else ": the model has a likely backdoor target"))


def inspection_checks(inspection: Any, train_report: Optional[Mapping[str, Any]], t: Thresholds) -> list[Check]:
    """``[poison_suspects, backdoor_scan]`` (what the gate stage adds to :func:`evaluate_gate`)."""
    return [poison_suspects_check(inspection, train_report, t), backdoor_scan_check(inspection, train_report, t)]


def evaluate_gate(
    candidate: Mapping[str, Any],
    baseline: Mapping[str, Any],
    validated: Optional[Mapping[str, Any]],
    train_report: Optional[Mapping[str, Any]],
    current_champion: Optional[str],
    t: Thresholds,
    prior_verdict: Optional[str] = None,
    integrity: Optional[list[Check]] = None,
    detection: Optional[list[Check]] = None,
) -> list[Check]:
    """All checks, in report order. The release passes only if every one passed. ``integrity``:
    the binding checks the stage computed from its evidence (:func:`evidence_check`,
    :func:`lineage_check`, :func:`champion_check`); ``detection``: the trigger-agnostic checks
    (:func:`inspection_checks`; the gate stage always passes them, failing closed without a report)."""
    return [
        *(integrity or []),
        identity_check(candidate, baseline, train_report, current_champion),
        prior_verdict_check(prior_verdict),
        validation_check(validated, candidate, t),
        *accuracy_checks(candidate, baseline, t),
        *asr_checks(candidate, baseline, t),
        *recall_checks(candidate, baseline, t),
        *targeted_checks(candidate, baseline, t),
        *(detection or []),
    ]


def passed(checks: list[Check]) -> bool:
    return bool(checks) and all(c.passed for c in checks)
