"""Rendering of the release verdict for people: terminal text, one HTML page, PNG pictures, and
GX Data Docs made viewable offline.

Everything here is a pure function of the reports the stages already write (gate.json,
metrics.json, baseline_metrics.json, validation.json): nothing reads files, talks to MLflow or
imports torch. The stage modules decide where the output goes.

Modules: :mod:`.terminal` (CI text, ``progress_enabled``), :mod:`.html` (``release.html``),
:mod:`.plots` (matplotlib/sklearn PNGs, dvc-plots rows; imports matplotlib lazily),
:mod:`.gx_offline` (rewrite GX Data Docs so they render without a CDN).

This package module holds the small vocabulary both text renderers share, so the terminal and
the HTML page can never disagree on the order of checks, the counts or the class at fault.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence


class ReportingError(ValueError):
    """Input a renderer cannot draw (wrong shape, not a PNG, ...); the message says what to pass."""


def number(value: Any) -> Optional[float]:
    """A finite float, or None for anything missing, boolean, non-numeric, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def fmt(value: Any, digits: int = 4) -> str:
    """A number as text, or ``-`` when it is missing: a blank cell reads as zero to a reviewer."""
    x = number(value)
    return "-" if x is None else f"{x:.{digits}f}"


def pass_fail(ok: Any) -> str:
    """Booleans as words a reviewer scans for: ``pass`` / ``FAIL`` (``yes``/``no`` hid failures)."""
    return "pass" if ok is True else "FAIL"


def version_text(version: Any) -> str:
    """``v3`` for a version, ``none`` for no version (never ``vnone``); accepts ``3``, ``"3"``, ``"v3"``."""
    if version is None:
        return "none"
    s = str(version).strip()
    if not s or s.lower() in ("none", "null", "vnone", "-"):
        return "none"
    return s if s.startswith("v") else f"v{s}"


def champion_change(before: Any, after: Any) -> str:
    """``champion: none -> v1``; ``champion: v2 (unchanged)`` when the alias did not move."""
    b, a = version_text(before), version_text(after)
    if b == a:
        return f"champion: {a} (unchanged)"
    return f"champion: {b} -> {a}"


def ordered_checks(checks: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Failing checks first, each group in report order: the reader stops at the first pass."""
    checks = list(checks)
    return [c for c in checks if c.get("passed") is not True] + [c for c in checks if c.get("passed") is True]


def check_counts(checks: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """``(failed, total)``; a check without ``passed: true`` counts as failed (fail closed)."""
    return sum(1 for c in checks if c.get("passed") is not True), len(checks)


def _largest_change(stats: Mapping[str, Any], now_key: str, ref_key: str, absolute: bool) -> Optional[str]:
    now, ref = stats.get(now_key), stats.get(ref_key)
    if not isinstance(now, Mapping) or not isinstance(ref, Mapping):
        return None
    best, best_delta = None, None
    for cls, value in now.items():
        v, r = number(value), number(ref.get(cls))
        if v is None or r is None:
            continue
        d = abs(v - r) if absolute else v - r
        if best_delta is None or d > best_delta:
            best, best_delta = str(cls), d
    return best


def data_gate_failures(validation_report: Optional[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The failing data-gate expectations of ``reports/validation.json``, with the class at fault.

    Each row: ``check, expectation, column, table, observed, threshold, classes`` (class names,
    possibly empty). ``classes`` comes from the stage's own ``details.classes`` when it recorded
    them (share delta, block rate); for the label-distribution KL, which is one number over all
    classes, it is the class whose share moved most against the reference (from
    ``statistics``), so the reader is pointed somewhere concrete.
    """
    if not validation_report:
        return []
    stats = validation_report.get("statistics") or {}
    out = []
    for r in validation_report.get("results") or []:
        if r.get("success") is True:
            continue
        details = r.get("details") or {}
        # the significance checks record the classes whose rows block (``blocked_classes``);
        # class-set changes record ``changes``; older reports ``classes``
        named = details.get("blocked_classes") or details.get("classes") or [
            c.get("class_name") for c in details.get("changes") or [] if isinstance(c, Mapping)]
        classes = [str(c) for c in named if c is not None]
        check = r.get("check") or r.get("expectation") or "?"
        if not classes and check == "label_kl":
            c = _largest_change(stats, "label_shares", "reference_label_shares", absolute=True)
            classes = [c] if c is not None else []
        if not classes and check == "block_rate_increase":
            c = _largest_change(stats, "block_rates", "reference_block_rates", absolute=False)
            classes = [c] if c is not None else []
        out.append({
            "check": check,
            "expectation": r.get("expectation"),
            "column": r.get("column"),
            "table": details.get("table"),
            "observed": r.get("observed"),
            "threshold": r.get("threshold"),
            "classes": classes,
        })
    return out


def classes_at_fault(validation_report: Optional[Mapping[str, Any]]) -> list[str]:
    """Every class named by a failing data-gate check, first-seen order, no repeats."""
    seen: dict[str, None] = {}
    for f in data_gate_failures(validation_report):
        for c in f["classes"]:
            seen.setdefault(c, None)
    return list(seen)


def worst_asr(metrics: Optional[Mapping[str, Any]]) -> Optional[tuple[str, str, float]]:
    """``(trigger, target, asr)`` of the highest defined ASR, or None when there is none.

    The evaluate stage applies this trigger for the triggered confusion matrix and samples.
    """
    asr = (metrics or {}).get("asr")
    if not isinstance(asr, Mapping):
        return None
    best = None
    for trig, by_target in asr.items():
        if not isinstance(by_target, Mapping):
            continue
        for target, value in by_target.items():
            v = number(value)
            if v is not None and (best is None or v > best[2]):
                best = (str(trig), str(target), v)
    return best


def recall_rows(candidate: Optional[Mapping[str, Any]], baseline: Optional[Mapping[str, Any]]
                ) -> list[tuple[str, Optional[float], Optional[float], Optional[float]]]:
    """``(class, candidate recall, baseline recall, drop = baseline - candidate)`` per class of
    the candidate (then any class only the baseline has)."""
    cand = (candidate or {}).get("per_class") or {}
    base = (baseline or {}).get("per_class") or {}
    names = list(cand) + [c for c in base if c not in cand]
    rows = []
    for name in names:
        c = number((cand.get(name) or {}).get("recall")) if isinstance(cand.get(name), Mapping) else None
        b = number((base.get(name) or {}).get("recall")) if isinstance(base.get(name), Mapping) else None
        rows.append((str(name), c, b, None if c is None or b is None else b - c))
    return rows


def max_recall_drop(candidate: Optional[Mapping[str, Any]], baseline: Optional[Mapping[str, Any]]
                    ) -> Optional[tuple[str, float]]:
    """``(class, drop)`` of the largest per-class recall drop against the baseline, or None."""
    drops = [(name, d) for name, _, _, d in recall_rows(candidate, baseline) if d is not None]
    return max(drops, key=lambda t: t[1]) if drops else None


def mlflow_links(ui_base: Optional[str], experiment_id: Any = None, run_id: Any = None,
                 model_name: Optional[str] = None, version: Any = None) -> dict[str, Optional[str]]:
    """MLflow UI deep links (MLflow 3 hash routes) for the run and the registered version.

    ``ui_base`` is the UI's address as a reviewer opens it (``http://host:5000``); None when
    no UI is known (a sqlite store without a server), and every link is then None.
    """
    from urllib.parse import quote

    out: dict[str, Optional[str]] = {"mlflow_run": None, "model_version": None}
    if not ui_base:
        return out
    base = ui_base.rstrip("/")
    if experiment_id is not None and run_id:
        out["mlflow_run"] = f"{base}/#/experiments/{quote(str(experiment_id), safe='')}/runs/{quote(str(run_id), safe='')}"
    if model_name and version is not None and version_text(version) != "none":
        out["model_version"] = (f"{base}/#/models/{quote(str(model_name), safe='')}/versions/"
                                f"{quote(version_text(version)[1:], safe='')}")
    return out
