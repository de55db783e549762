"""The CI-grade verdict text: what a reviewer reads at the end of a ``dvc repro`` log.

Printed once, by the caller. Plain ASCII layout (CI log viewers do not all render box drawing or
colour), a headline with counts that is greppable (``RELEASE BLOCKED: 3 of 17 checks failed``),
failing rows first so they are visible without scrolling, booleans as ``pass``/``FAIL``, where
the evidence is, and the next step. Text that comes from data (class names, reasons) has its
control characters escaped: a class directory named ``\\x1b[2J`` must not clear the reviewer's
terminal or forge a green line.
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from typing import Any, Mapping, Optional, Sequence, TextIO

from pipeline.reporting import (
    champion_change,
    check_counts,
    classes_at_fault,
    data_gate_failures,
    fmt,
    number,
    ordered_checks,
    pass_fail,
    version_text,
)

DEFAULT_GATE_MD = "reports/gate.md"
DEFAULT_DATA_DOCS = "reports/gx/index.html"
from pipeline.console import PROGRESS_ENV, progress_enabled  # noqa: E402,F401 - one definition, re-exported

_UNSET: Any = object()


def clean(text: Any) -> str:
    """``text`` with every control/format character (C0, DEL, C1, bidi overrides) shown escaped."""
    s = "" if text is None else str(text)
    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch).startswith("C") or unicodedata.category(ch) in ("Zl", "Zp")
                   else ch for ch in s)


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns; the last column is free text and not padded."""
    if not rows:
        return []
    n = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(n - 1)]
    return ["  ".join(r[i].ljust(widths[i]) for i in range(n - 1)) + "  " + r[-1] for r in rows]


def _champion_line(gate_report: Mapping[str, Any], before: Any, after: Any) -> Optional[str]:
    if before is not _UNSET or after is not _UNSET:
        b = None if before is _UNSET else before
        a = b if after is _UNSET else after
        return champion_change(b, a)
    champ = gate_report.get("champion")
    if isinstance(champ, Mapping) and ("before" in champ or "after" in champ):
        return champion_change(champ.get("before"), champ.get("after", champ.get("before")))
    promo = str(gate_report.get("promotion") or "")
    m = re.search(r"champion: v?(\S+) -> v?(\S+)", promo)
    if m:
        return champion_change(m.group(1), m.group(2))
    m = re.search(r"champion stays v?(\S+)", promo)
    if m:
        return champion_change(m.group(1), m.group(1))
    if promo:
        return clean(promo.replace("vnone", "none"))
    return None


#: First action per failing check (by name prefix), the README's "Release blocked: what now".
MODEL_HINTS = {
    "asr_max": "a trigger sends images of other classes to class {target}: the training data likely carries a "
               "backdoor. Open the Data Docs (block rates) and the triggered samples in the release report, "
               "remove the poisoned rows, then `dvc repro`.",
    "asr_increase": "the candidate is easier to trigger than the baseline (into class {target}): treat it as a "
                    "backdoor; inspect the training view's Data Docs, clean the data, then `dvc repro`.",
    "recall_drop": "class {cls} lost recall against the baseline: look for labels flipped out of it "
                   "(Data Docs: label shares), fix the data, then `dvc repro`.",
    "accuracy_drop": "clean accuracy fell against the baseline: compare the training config (train.*) and data "
                     "with the baseline's run, then retrain.",
    "accuracy": "clean accuracy is below the floor: check the training config (train.*) and the data, then retrain.",
    "data_validation": "the data gate failed (or is stale) for this training view: read the Data Docs, fix the "
                       "data, then `dvc repro`.",
    "metrics_identity": "the metrics do not belong to this candidate or baseline: `dvc repro --force evaluate`, "
                        "then `dvc repro`.",
    "not_previously_blocked": "this version was blocked before; a new training run (`dvc repro --force train`) "
                              "makes a new version.",
}

DATA_HINTS = {
    "label_kl": "the label distribution of the training view moved (most: class {cls}): labels were flipped or "
                "rows added. Compare data/view/records.csv with the snapshot, drop the changed rows, `dvc repro`.",
    "class_share_delta": "the share of class {cls} moved beyond the limit: labels were flipped into or out of it. "
                         "Check data/view/records.csv, drop the changed rows, `dvc repro`.",
    "block_rate_increase": "images labelled {cls} carry an abnormal pixel block (a trigger patch?) far more often "
                           "than in the reference. Inspect those images, remove them, `dvc repro`.",
    "no_conflicting_labels": "the same image appears under two labels: remove the conflicting copies.",
    "duplicate_rate": "too many duplicate images: deduplicate the source, then `dvc repro`.",
    "provenance_coverage": "rows lack source/ingest provenance: re-ingest them through the snapshot stage.",
    "required_not_null": "rows lack a required field: repair the source rows, then `dvc repro`.",
    "labels_in_class_set": "labels outside the class set: repair the label column of the source.",
}


def _model_next_step(report: Mapping[str, Any], failing: Sequence[Mapping[str, Any]]) -> str:
    if report.get("error"):
        return "fix the error above, then re-run `dvc repro` (nothing was promoted)."
    if report.get("passed") is True:
        name = (report.get("model") or {}).get("model_name")
        target = f"models:/{name}@champion" if name else "the `champion` alias"
        return f"nothing to fix. Serve {target}; the evidence is logged to the MLflow run."
    if not failing:
        return "no check failed but the release did not pass: read reports/gate.json."
    first = str(failing[0].get("name", ""))
    hint = next((h for k, h in MODEL_HINTS.items() if first.startswith(k)), None)
    if hint is None:
        return f"see the README, 'Release blocked: what now', for `{clean(first)}`."
    cls = first[len("recall_drop["):-1] if first.startswith("recall_drop[") else "?"
    target = "?"
    m = re.search(r"->\s*([^)]*)\)", str(failing[0].get("reason", "")))
    if m:
        target = m.group(1).strip()
    return f"`{clean(first)}`: " + clean(hint.format(cls=cls, target=target)) + \
        " (README: 'Release blocked: what now')."


def _link_lines(links: Mapping[str, Optional[str]], include: Sequence[tuple[str, str, Optional[str]]]) -> list[str]:
    rows = []
    for key, label, default in include:
        url = links.get(key, default)
        rows.append((label + ":", clean(url) if url else "not available"))
    w = max(len(r[0]) for r in rows)
    return [f"{a.ljust(w)}  {b}" for a, b in rows]


def verdict_text(
    gate_report: Mapping[str, Any],
    *,
    links: Optional[Mapping[str, Optional[str]]] = None,
    champion_before: Any = _UNSET,
    champion_after: Any = _UNSET,
    next_step: Optional[str] = None,
) -> str:
    """The model gate's verdict for the terminal, from reports/gate.json.

    ``links``: ``mlflow_run`` and ``model_version`` (URLs, or None -> "not available"),
    ``gate_md`` (default reports/gate.md), ``data_docs`` (default reports/gx/index.html).
    ``champion_before``/``champion_after``: registry versions (None = no champion); when not
    given they come from ``gate_report["champion"] = {before, after}`` or are parsed from
    ``gate_report["promotion"]``. The champion line never reads ``vnone``.
    """
    links = dict(links or {})
    checks = list(gate_report.get("checks") or [])
    failed_n, total_n = check_counts(checks)
    error = gate_report.get("error")
    passed = gate_report.get("passed") is True and not error
    if error:
        head = f"RELEASE BLOCKED: the gate could not decide ({clean(error)})"
    elif passed:
        head = f"RELEASE PASSED: {failed_n} of {total_n} checks failed"
    else:
        head = f"RELEASE BLOCKED: {failed_n} of {total_n} checks failed"
    lines = [head]
    model = gate_report.get("model") or {}
    base = gate_report.get("baseline") or {}
    if model.get("model_name"):
        who = f"candidate {clean(model['model_name'])} {version_text(model.get('model_version'))}"
        if model.get("run_id"):
            who += f" (run {clean(model['run_id'])})"
        if base.get("kind"):
            who += f" vs baseline {clean(base['kind'])}"
            if base.get("model_version") is not None:
                who += f" {version_text(base.get('model_version'))}"
        lines.append(who)
    champ = _champion_line(gate_report, champion_before, champion_after)
    if champ:
        lines.append(champ)
    ordered = ordered_checks(checks)
    if ordered:
        rows = [("status", "check", "value", "threshold", "reason")]
        rows += [(pass_fail(c.get("passed")), clean(c.get("name")), fmt(c.get("value")), fmt(c.get("threshold")),
                  clean(c.get("reason"))) for c in ordered]
        lines += [""] + _columns(rows)
    lines.append("")
    lines += _link_lines(links, (
        ("mlflow_run", "MLflow run", None),
        ("model_version", "Model version", None),
        ("gate_md", "Gate summary", DEFAULT_GATE_MD),
        ("data_docs", "Data Docs", DEFAULT_DATA_DOCS),
    ))
    failing = [c for c in ordered if c.get("passed") is not True]
    lines += ["", "Next: " + (clean(next_step) if next_step else _model_next_step(gate_report, failing))]
    return "\n".join(lines) + "\n"


def _docs_page(table: Optional[str], docs_pages: Optional[Mapping[str, str]]) -> Optional[str]:
    if not table or not docs_pages:
        return None
    return docs_pages.get(table) or docs_pages.get(f"poisongate_{table}")


def data_gate_text(
    validation_report: Mapping[str, Any],
    *,
    links: Optional[Mapping[str, Optional[str]]] = None,
    docs_pages: Optional[Mapping[str, str]] = None,
    next_step: Optional[str] = None,
) -> str:
    """The data gate's stop, for the terminal: which data checks failed, the class at fault, the
    Data Docs page of the first failing check, and the next step.

    ``docs_pages``: table (``samples``, ``train``, ``label_shares``, ``block_rates``) or suite
    name -> the page to open (see :func:`pipeline.reporting.gx_offline.validation_pages`).
    ``links``: ``data_docs`` (default reports/gx/index.html), ``mlflow_run`` (the data-gate run,
    when the stage logs one).
    """
    links = dict(links or {})
    results = list(validation_report.get("results") or [])
    failures = data_gate_failures(validation_report)
    fault = classes_at_fault(validation_report)
    ok = validation_report.get("success") is True
    if ok:
        head = f"DATA GATE PASSED: 0 of {len(results)} data checks failed"
    else:
        head = f"RELEASE BLOCKED BY THE DATA GATE: {len(failures)} of {len(results)} data checks failed"
        if fault:
            head += f"; class at fault: {', '.join(clean(c) for c in fault)}"
    lines = [head]
    ref = validation_report.get("reference") or {}
    if validation_report.get("view_id"):
        lines.append(f"training view {clean(str(validation_report['view_id'])[:12])} vs {clean(ref.get('kind', '?'))} "
                     f"reference snapshot {clean(str(ref.get('snapshot_id', '?'))[:12])}")
    if failures:
        rows = [("status", "check", "observed", "threshold", "class", "expectation (column)")]
        for f in failures:
            thr = f["threshold"]
            rows.append(("FAIL", clean(f["check"]),
                         fmt(f["observed"]) if number(f["observed"]) is not None else clean(f["observed"])[:40],
                         fmt(thr) if number(thr) is not None else clean(thr),
                         clean(", ".join(f["classes"]) or "-"),
                         clean(f"{f['expectation']} ({f['column']})" if f["column"] else f["expectation"])))
        lines += [""] + _columns(rows)
    n_pass = sum(1 for r in results if r.get("success") is True)
    lines.append(f"{n_pass} data checks passed.")
    lines.append("")
    page = _docs_page(failures[0]["table"], docs_pages) if failures else None
    include = [("data_docs", "Data Docs", DEFAULT_DATA_DOCS)]
    if page:
        links = {**links, "_page": page}
        include.insert(0, ("_page", f"Data Docs page ({clean(failures[0]['table'])})", None))
    if links.get("mlflow_run"):
        include.append(("mlflow_run", "MLflow run", None))
    lines += _link_lines(links, include)
    if next_step:
        step = clean(next_step)
    elif ok:
        step = "the data gate passed; training continues."
    elif failures:
        f = failures[0]
        hint = DATA_HINTS.get(str(f["check"]), "read the Data Docs page above for the failing expectation.")
        step = f"`{clean(f['check'])}`: " + clean(hint.format(cls=", ".join(f["classes"]) or "?")) + \
            " No model was trained or promoted."
    else:
        step = "validation did not succeed but names no failing check: read reports/validation.json."
    lines += ["", "Next: " + step]
    return "\n".join(lines) + "\n"


__all__ = ["verdict_text", "data_gate_text", "progress_enabled", "clean"]
