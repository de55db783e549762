"""``reports/release.html``: one self-contained page per run with the verdict and its evidence.

Self-contained on purpose: CI artifact viewers are often air-gapped or block third-party hosts,
so the page loads nothing: the stylesheet is inline, the pictures are ``data:`` URIs, there is no
script and no web font. The only URLs in it are the ``<a href>`` links the caller passes in
``links`` (MLflow run, registry version, Data Docs), which the reader follows by hand.

Plain HTML, no JavaScript: it renders the same in a browser with scripts disabled, and the
verdict is text as well as colour (a red/green banner alone fails colour-blind readers and
viewers that strip styles). Every piece of text is escaped with :func:`html.escape`; class names
come from user data (ImageFolder directory names) and must never become markup.
"""

from __future__ import annotations

import base64
import html as _html
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, Union
from urllib.parse import urlsplit

from pipeline.reporting import (
    ReportingError,
    check_counts,
    classes_at_fault,
    data_gate_failures,
    fmt,
    max_recall_drop,
    number,
    ordered_checks,
    pass_fail,
    recall_rows,
    version_text,
    worst_asr,
)

#: Label shown for each known key of ``links``, in display order; other keys follow as given.
LINK_LABELS = {
    "mlflow_run": "MLflow run",
    "model_version": "Registry model version",
    "data_docs": "GX Data Docs (data validation)",
    "gate_md": "Gate summary (gate.md)",
}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Images = Union[Mapping[str, bytes], Sequence[tuple[str, bytes]], None]

_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       margin: 0; color: #1f2328; background: #ffffff; }
main { max-width: 1180px; margin: 0 auto; padding: 0 20px 40px; }
.banner { padding: 18px 20px; color: #ffffff; }
.banner.passed { background: #1a7f37; }
.banner.blocked { background: #b42318; }
.banner .verdict { font-size: 28px; font-weight: 700; letter-spacing: .02em; display: block; }
.banner .counts { font-size: 18px; font-weight: 600; display: block; margin-top: 2px; }
.banner p { margin: 6px 0 0; }
h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.fail td { background: #ffebe9; }
.status { font-weight: 700; white-space: nowrap; }
tr.fail .status { color: #b42318; }
tr.pass .status { color: #1a7f37; }
.note { color: #57606a; }
.na { color: #57606a; font-style: italic; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 13px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
footer { color: #57606a; font-size: 12px; margin-top: 30px; }
"""


def esc(value: Any) -> str:
    """Escaped text for element content and quoted attributes."""
    return _html.escape("" if value is None else str(value), quote=True)


def safe_href(url: Optional[str]) -> Optional[str]:
    """``url`` if it may be an ``href``: http(s) or a relative path; None for anything else
    (``javascript:``, ``data:``, ``file:``, protocol-relative ``//host``), which is then shown as
    text, not as a link."""
    if not url:
        return None
    s = str(url).strip()
    parts = urlsplit(s)
    if parts.scheme in ("http", "https") and parts.netloc:
        return s
    if not parts.scheme and not s.startswith("//") and not parts.netloc:
        return s
    return None


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...``; refuses anything that is not a PNG (the page must not carry
    a script or an SVG smuggled in as a picture)."""
    if not isinstance(png, (bytes, bytearray)) or not bytes(png).startswith(PNG_MAGIC):
        raise ReportingError("images must be PNG bytes (e.g. from pipeline.reporting.plots)")
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def _image_items(images: Images) -> list[tuple[str, bytes]]:
    if not images:
        return []
    if isinstance(images, Mapping):
        return [(str(k), v) for k, v in images.items()]
    return [(str(k), v) for k, v in images]


def _table(head: Sequence[str], rows: Iterable[str], table_id: Optional[str] = None) -> str:
    tid = f' id="{esc(table_id)}"' if table_id else ""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f"<table{tid}><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _check_rows(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for c in ordered_checks(checks):
        ok = c.get("passed") is True
        rows.append(
            f'<tr class="{"pass" if ok else "fail"}" data-check="{esc(c.get("name"))}">'
            f'<td class="status">{esc(pass_fail(c.get("passed")))}</td>'
            f"<td><code>{esc(c.get('name'))}</code></td>"
            f'<td class="num">{esc(fmt(c.get("value")))}</td>'
            f'<td class="num">{esc(fmt(c.get("threshold")))}</td>'
            f"<td>{esc(c.get('reason'))}</td></tr>")
    return rows


def _data_gate_section(validation_report: Optional[Mapping[str, Any]], data_docs: Optional[str]) -> str:
    if not validation_report:
        return ('<section id="data-gate"><h2>Data gate</h2><p class="na">No validation report '
                "(reports/validation.json) was given.</p></section>")
    results = list(validation_report.get("results") or [])
    failures = data_gate_failures(validation_report)
    ok = validation_report.get("success") is True
    out = ['<section id="data-gate"><h2>Data gate</h2>',
           f'<p><span class="status">{esc("passed" if ok else "FAILED")}</span>: '
           f"{len(failures)} of {len(results)} data checks failed"]
    ref = validation_report.get("reference") or {}
    if ref:
        out.append(f" (reference: {esc(ref.get('kind', '?'))} snapshot "
                   f"<code>{esc(str(ref.get('snapshot_id', '?'))[:12])}</code>)")
    out.append(".</p>")
    if failures:
        rows = []
        for f in failures:
            rows.append(
                f'<tr class="fail" data-check="{esc(f["check"])}"><td class="status">FAIL</td>'
                f"<td><code>{esc(f['check'])}</code></td><td>{esc(f['expectation'])}"
                f"{'' if not f['column'] else ' (' + esc(f['column']) + ')'}</td>"
                f'<td class="num">{esc(_observed_text(f["observed"]))}</td>'
                f'<td class="num">{esc(f["threshold"] if number(f["threshold"]) is None else fmt(f["threshold"]))}</td>'
                f"<td>{esc(', '.join(f['classes']) or '-')}</td></tr>")
        out.append(_table(["status", "check", "expectation (column)", "observed", "threshold", "class at fault"],
                          rows, "data-gate-failures"))
        fault = classes_at_fault(validation_report)
        if fault:
            out.append(f'<p id="class-at-fault">Class at fault: <strong>{esc(", ".join(fault))}</strong>.</p>')
    passing = [r for r in results if r.get("success") is True]
    if passing:
        rows = [f'<tr class="pass"><td class="status">pass</td><td><code>{esc(r.get("check"))}</code></td>'
                f"<td>{esc(r.get('expectation'))}{'' if not r.get('column') else ' (' + esc(r.get('column')) + ')'}</td>"
                f'<td class="num">{esc(_observed_text(r.get("observed")))}</td>'
                f'<td class="num">{esc(r.get("threshold"))}</td></tr>' for r in passing]
        out.append(f"<details><summary>{len(passing)} passing data checks</summary>"
                   + _table(["status", "check", "expectation (column)", "observed", "threshold"], rows) + "</details>")
    href = safe_href(data_docs)
    if href:
        out.append(f'<p>Every expectation, with its observed values: <a href="{esc(href)}">GX Data Docs</a>.</p>')
    out.append("</section>")
    return "".join(out)


def _observed_text(value: Any) -> str:
    x = number(value)
    if x is not None:
        return f"{x:.4f}"
    return "-" if value is None else str(value)[:80]


def _comparison_section(candidate: Optional[Mapping[str, Any]], baseline: Optional[Mapping[str, Any]],
                        checks: Sequence[Mapping[str, Any]], stopped_at_data_gate: bool) -> str:
    if not candidate:
        why = ("the pipeline stopped at the data gate, so no model was trained or measured"
               if stopped_at_data_gate else "no candidate metrics were given")
        return f'<section id="comparison"><h2>Candidate vs baseline</h2><p class="na">Not available: {esc(why)}.</p></section>'
    thresholds = {c.get("name"): c.get("threshold") for c in checks}
    base_info = (baseline or {}).get("baseline") or {}
    base_name = base_info.get("kind") or "baseline"
    if base_info.get("model_version") is not None:
        base_name += f" {version_text(base_info.get('model_version'))}"
    cw, bw = worst_asr(candidate), worst_asr(baseline)
    drop = max_recall_drop(candidate, baseline)

    def asr_text(w: Optional[tuple[str, str, float]]) -> str:
        return "-" if w is None else f"{w[2]:.4f} ({w[0]} -> {w[1]})"

    rows = [
        f'<tr><td>clean accuracy</td><td class="num">{esc(fmt(candidate.get("accuracy")))}</td>'
        f'<td class="num">{esc(fmt((baseline or {}).get("accuracy")))}</td>'
        f'<td class="num">{_bound(">=", thresholds.get("accuracy"))}</td></tr>',
        f'<tr><td>max ASR (trigger -> target)</td><td class="num">{esc(asr_text(cw))}</td>'
        f'<td class="num">{esc(asr_text(bw))}</td><td class="num">{_bound("<=", thresholds.get("asr_max"))}</td></tr>',
        f'<tr><td>max recall drop vs baseline</td><td class="num">'
        f'{esc("-" if drop is None else f"{drop[1]:.4f} (class {drop[0]})")}</td><td class="num">-</td>'
        f'<td class="num">{_bound("<=", _recall_threshold(checks))}</td></tr>',
    ]
    out = ['<section id="comparison"><h2>Candidate vs baseline</h2>',
           _table(["metric", "candidate", base_name, "gate threshold"], rows, "comparison-table")]
    failed_recall = {str(c.get("name"))[len("recall_drop["):-1] for c in checks
                     if str(c.get("name", "")).startswith("recall_drop[") and c.get("passed") is not True}
    rrows = []
    for name, c, b, d in recall_rows(candidate, baseline):
        bad = name in failed_recall
        rrows.append(f'<tr class="{"fail" if bad else "pass"}"><td>{esc(name)}</td>'
                     f'<td class="num">{esc(fmt(c))}</td><td class="num">{esc(fmt(b))}</td>'
                     f'<td class="num">{esc(fmt(d))}</td><td class="status">{"FAIL" if bad else ""}</td></tr>')
    out.append("<h3>Per-class recall</h3>")
    out.append(_table(["class", "candidate recall", f"{base_name} recall", "drop", "gate"], rrows, "recall-table"))
    out.append("</section>")
    return "".join(out)


def _bound(rel: str, threshold: Any) -> str:
    return "-" if number(threshold) is None else esc(f"{rel} {fmt(threshold)}")


def _recall_threshold(checks: Sequence[Mapping[str, Any]]) -> Optional[float]:
    for c in checks:
        if str(c.get("name", "")).startswith("recall_drop"):
            return number(c.get("threshold"))
    return None


def _links_section(links: Optional[Mapping[str, Optional[str]]]) -> str:
    links = dict(links or {})
    keys = [k for k in LINK_LABELS] + [k for k in links if k not in LINK_LABELS]
    items = []
    for k in keys:
        if k not in links and k not in ("mlflow_run", "model_version", "data_docs"):
            continue
        label = LINK_LABELS.get(k, k)
        url = links.get(k)
        href = safe_href(url)
        if href:
            items.append(f'<li>{esc(label)}: <a href="{esc(href)}" data-link="{esc(k)}">{esc(url)}</a></li>')
        elif url:
            items.append(f"<li>{esc(label)}: <code>{esc(url)}</code></li>")
        else:
            items.append(f'<li>{esc(label)}: <span class="na">not available</span></li>')
    return f'<section id="links"><h2>Links</h2><ul>{"".join(items)}</ul></section>'


def _pictures_section(images: Images) -> str:
    items = _image_items(images)
    if not items:
        return ""
    figs = [f'<figure><img alt="{esc(cap)}" src="{png_data_uri(png)}"><figcaption>{esc(cap)}</figcaption></figure>'
            for cap, png in items]
    return f'<section id="pictures"><h2>Pictures</h2>{"".join(figs)}</section>'


def render_release_html(
    gate_report: Optional[Mapping[str, Any]],
    candidate_metrics: Optional[Mapping[str, Any]],
    baseline_metrics: Optional[Mapping[str, Any]],
    validation_report: Optional[Mapping[str, Any]],
    links: Optional[Mapping[str, Optional[str]]],
    images: Images,
    *,
    generated: Optional[str] = None,
) -> str:
    """The whole release report as one HTML string.

    ``gate_report``: reports/gate.json, or None when the pipeline stopped at the data gate (then
    the verdict is BLOCKED from ``validation_report`` alone, and the page names the data checks
    and the class at fault). ``candidate_metrics``/``baseline_metrics``: reports/metrics.json and
    baseline_metrics.json (None when not measured). ``links``: ``{"mlflow_run", "model_version",
    "data_docs", "gate_md", ...: URL or relative path or None}``; None shows "not available".
    ``images``: ``{caption: PNG bytes}`` in display order. ``generated``: the timestamp to print
    (default now, UTC); pass one for byte-identical output in tests.
    """
    validation_failed = bool(validation_report) and validation_report.get("success") is not True
    stopped_at_data_gate = gate_report is None and validation_failed
    checks = list((gate_report or {}).get("checks") or [])
    error = (gate_report or {}).get("error")
    if gate_report is not None:
        passed = gate_report.get("passed") is True and error is None
    else:
        passed = False  # no gate verdict: never show a release as passed
    failed_n, total_n = check_counts(checks)
    model = (gate_report or {}).get("model") or {}
    base = (gate_report or {}).get("baseline") or {}

    if stopped_at_data_gate:
        failures = data_gate_failures(validation_report)
        n_results = len(validation_report.get("results") or [])
        verdict = "RELEASE BLOCKED by the data gate"
        counts = f"{len(failures)} of {n_results} data checks failed"
        fault = classes_at_fault(validation_report)
        detail = ("The training view failed data validation, so no model was trained or promoted."
                  + (f" Class at fault: {', '.join(fault)}." if fault else ""))
    elif gate_report is None:
        verdict, counts, detail = "RELEASE BLOCKED", "no gate verdict", "No gate report was given: nothing is known to be promoted."
    elif error:
        verdict, counts = "RELEASE BLOCKED", "the gate could not decide"
        detail = f"Error: {error}"
    else:
        verdict = "RELEASE PASSED" if passed else "RELEASE BLOCKED"
        counts = f"{failed_n} of {total_n} checks failed"
        detail = ""
    who = []
    if model.get("model_name"):
        who.append(f"candidate {model.get('model_name')} {version_text(model.get('model_version'))}"
                   + (f" (run {model.get('run_id')})" if model.get("run_id") else ""))
    if base.get("kind"):
        who.append(f"baseline: {base.get('kind')}"
                   + (f" {version_text(base.get('model_version'))}" if base.get("model_version") is not None else ""))
    promo = (gate_report or {}).get("promotion")
    if promo:
        who.append(str(promo).replace("vnone", "none"))

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(verdict)}: {esc(counts)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<header class="banner {"passed" if passed else "blocked"}" role="status">',
        f'<span class="verdict" id="verdict">{"&#10004; " if passed else "&#10008; "}{esc(verdict)}</span>',
        f'<span class="counts" id="counts">{esc(counts)}</span>',
    ]
    if detail:
        parts.append(f'<p id="detail">{esc(detail)}</p>')
    if who:
        parts.append(f"<p>{esc('; '.join(who))}</p>")
    parts.append("</header><main>")
    if checks:
        parts.append('<section id="checks"><h2>Release checks (failing first)</h2>')
        parts.append(_table(["status", "check", "value", "threshold", "reason"], _check_rows(checks), "checks-table"))
        parts.append("</section>")
    elif gate_report is not None:
        parts.append('<section id="checks"><h2>Release checks</h2><p class="na">No check ran.</p></section>')
    if validation_failed:  # the data failures explain everything after them: show them first
        parts.append(_data_gate_section(validation_report, (links or {}).get("data_docs")))
        parts.append(_comparison_section(candidate_metrics, baseline_metrics, checks, stopped_at_data_gate))
    else:
        parts.append(_comparison_section(candidate_metrics, baseline_metrics, checks, False))
        parts.append(_data_gate_section(validation_report, (links or {}).get("data_docs")))
    parts.append(_pictures_section(images))
    parts.append(_links_section(links))
    stamp = generated or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    parts.append(f"<footer>poisongate release report, generated {esc(stamp)}. Self-contained: "
                 "no script, no external stylesheet, font or image.</footer>")
    parts.append("</main></body></html>\n")
    return "".join(parts)
