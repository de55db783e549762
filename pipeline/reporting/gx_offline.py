"""GX Data Docs that render in an air-gapped artifact viewer.

GX 1.x Data Docs pages (templates ``page.j2``, ``index_page.j2``, ``js_script_imports.j2``,
``top_navbar.j2`` of great_expectations/render/view) load everything but their own default
stylesheet from the internet:

- CSS: Bootstrap 4.3.1 (maxcdn.bootstrapcdn.com), bootstrap-table 1.19.1 and its filter-control
  extension 1.19.0 (unpkg.com), bootstrap-datepicker 1.9.0 and Font Awesome 6.6.0
  (cdnjs.cloudflare.com), @forevolve/bootstrap-dark 1.1.0 (cdn.jsdelivr.net);
- JS: jQuery 3.7.1 (code.jquery.com), popper.js 1.12.9 and bootstrap-datepicker 1.9.0
  (cdnjs), Bootstrap 4.3.1 (stackpath.bootstrapcdn.com), bootstrap-table 1.19.1 + filter-control
  (unpkg), vega 5, vega-lite 5, vega-embed 6 (cdn.jsdelivr.net);
- images: the navbar logo ``logo-long.png`` and a CSS background ``full_logo_dark.png`` from the
  great-expectations-web-assets S3 bucket.

Offline, the index page's two tables are EMPTY (bootstrap-table builds them in JS from data
inlined in a script), the KL-divergence bar charts are blank (vega), icons (pass/fail) vanish
(Font Awesome) and the layout is unstyled.

None of those libraries ships in the great_expectations wheel or in any other installed Python
package (GX ships only its own images, HK Grotesk fonts and ``data_docs_default_styles.css``,
which it already copies into ``static/``); Debian has only jQuery (libjs-jquery, 3.6.1), useless
without Bootstrap and bootstrap-table. So :func:`make_offline` makes each page static instead:

- the CDN ``<link>``/``<script src>`` tags go; one minimal stylesheet (Bootstrap's grid, tables,
  alerts, cards, badges, tabs, and text glyphs for the five Font Awesome icons GX uses) is inlined
  in each page;
- each bootstrap-table script is replaced by a plain ``<table>`` built from the ``columns`` and
  ``data`` the script carries (rows link to their validation page, newest first);
- each vega-embed script is replaced by an inline SVG bar chart of the spec's dataset (or a
  table of it when the spec is not a simple bar chart);
- the remaining inline scripts (all jQuery: modals, fade toggles, row clicks) go; the controls
  that need them (filter toolbars, "show failed only" toggles, the tutorial footer) are hidden;
- the S3 logo points at the local copy GX wrote to ``static/images/logo-long.png``; a remote
  CSS ``url()`` becomes ``none``; links to external sites keep their text but lose the ``href``.

Hand-written because no maintained tool makes GX Data Docs self-contained: GX offers no asset
mirror setting in 1.x (its ``custom_views_directory`` needs a file context with a plugins
directory, and local copies of the assets would still have to come from somewhere). The rewrite
is idempotent (a second call changes nothing) and only touches ``*.html``/``*.css`` under
``docs_dir``. :func:`external_references` is the check tests and CI use.
"""

from __future__ import annotations

import ast
import html as _html
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional

OFFLINE_MARK = "poisongate-offline"

#: Elements hidden offline because they only work with the removed scripts or are CDN-only.
_HIDE = (
    ".btn-group-toggle", '[id$="-body-table-toolbar"]', ".modal", ".ge-walkthrough-modal", "#ge-cta-footer",
    "table[data-toggle=\"table\"]:empty",
)

OFFLINE_CSS = """
/* poisongate offline stylesheet: stands in for Bootstrap 4, bootstrap-table and Font Awesome,
   which GX Data Docs load from CDNs. */
*,::after,::before{box-sizing:border-box}
body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;
  font-size:.95rem;line-height:1.5;color:#212529;background:#fff}
a{color:#0366d6;text-decoration:none}a:hover{text-decoration:underline}
a:not([href]){color:inherit}
img{max-width:100%}
h1,h2,h3,h4,h5,h6,.h6{margin:.4rem 0;font-weight:600;line-height:1.25}
.container-fluid{width:100%;padding:0 15px}
.row{display:flex;flex-wrap:wrap;margin:0 -15px}
[class*="col-"]{position:relative;width:100%;padding:0 15px;min-width:0}
.col-12{flex:0 0 100%;max-width:100%}.col-6{flex:0 0 50%;max-width:50%}
.d-none{display:none!important}.d-flex{display:flex!important}.float-left{float:left}
.align-items-center{align-items:center}.justify-content-center{justify-content:center}
.flex-column{flex-direction:column}
@media (min-width:576px){.d-sm-block{display:block!important}.flex-sm-row{flex-direction:row}}
@media (min-width:768px){.col-md-2{flex:0 0 16.667%;max-width:16.667%}
  .col-md-10{flex:0 0 83.333%;max-width:83.333%}.d-md-block{display:block!important}
  .d-md-inline-flex{display:inline-flex!important}}
.navbar{display:flex;align-items:center;padding:.4rem 1rem;border-bottom:1px solid #dee2e6;background:#fff}
.sticky-top{position:sticky;top:0;z-index:10}
.table,.ge-offline-table{width:100%;border-collapse:collapse;margin-bottom:1rem}
.table td,.table th,.ge-offline-table td,.ge-offline-table th{padding:.3rem .5rem;border:1px solid #dee2e6;
  vertical-align:top;text-align:left}
.ge-offline-table th,.table th{background:#f6f8fa}
.table-responsive{display:block;width:100%;overflow-x:auto}
.show-scrollbars{overflow-x:auto}
.alert{padding:.6rem 1rem;margin-bottom:1rem;border:1px solid transparent;border-radius:.25rem}
.alert-secondary{background:#e2e3e5;border-color:#d6d8db;color:#383d41}
.alert-info{background:#d1ecf1;border-color:#bee5eb;color:#0c5460}
.card{border:1px solid rgba(0,0,0,.125);border-radius:.25rem;margin-bottom:1rem;background:#fff}
.card-header{padding:.5rem 1rem;background:rgba(0,0,0,.03);border-bottom:1px solid rgba(0,0,0,.125)}
.card-body{padding:1rem}
.badge{display:inline-block;padding:.2em .45em;font-size:80%;font-weight:700;border-radius:.25rem}
.badge-secondary{background:#6c757d;color:#fff}
.nav,.nav-tabs{display:flex;flex-wrap:wrap;padding-left:0;margin:0 0 .5rem;list-style:none}
.nav-tabs{border-bottom:1px solid #dee2e6}
.nav-link{display:block;padding:.35rem .8rem}
.nav-pills .nav-link.active,.nav-tabs .nav-link.active{font-weight:700}
.breadcrumb{display:flex;flex-wrap:wrap;list-style:none;padding:.5rem 1rem;margin:0 0 1rem;background:#e9ecef;
  border-radius:.25rem}
.breadcrumb-item+.breadcrumb-item::before{content:"/";padding:0 .5rem;color:#6c757d}
.tab-pane{margin-bottom:1.5rem}
.text-danger{color:#b42318!important}.text-success{color:#1a7f37!important}.text-center{text-align:center}
.lead{font-size:1.1rem}.bg-light{background:#f8f9fa}.border{border:1px solid #dee2e6}
.btn{display:inline-block;padding:.25rem .6rem;border:1px solid transparent;border-radius:.25rem}
.btn-primary{color:#fff;background:#0366d6}
.fas,.fa{font-style:normal;font-weight:700}
.fa-check-circle::before{content:"\\2714\\FE0E  "}
.fa-times::before{content:"\\2718\\FE0E  "}
.fa-question-circle::before{content:"?"}
.fa-exclamation-triangle::before{content:"!"}
.fa-comment::before{content:"\\2026"}
.ge-offline-note{color:#57606a;font-size:.85rem}
""" + ",".join(_HIDE) + "{display:none!important}\n"

_EXTERNAL = re.compile(r"^\s*(?:https?:)?//", re.I)
_LINK_TAG = re.compile(r"<link\b[^>]*?\bhref\s*=\s*[\"'](?:https?:)?//[^\"']*[\"'][^>]*>\s*", re.I)
_SCRIPT_SRC = re.compile(r"<script\b[^>]*?\bsrc\s*=\s*[\"'](?:https?:)?//[^\"']*[\"'][^>]*>\s*</script>\s*", re.I)
_INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script>", re.I | re.S)
_IMG_EXT = re.compile(r"(<img\b[^>]*?\bsrc\s*=\s*)([\"'])((?:https?:)?//[^\"']*)\2", re.I)
_A_EXT = re.compile(r"(<a\b[^>]*?)\s+href\s*=\s*([\"'])((?:https?:)?//[^\"']*)\2", re.I)
_CSS_URL = re.compile(r"url\(\s*([\"']?)((?:https?:)?//[^)\"']*)\1\s*\)", re.I)
_CSS_IMPORT = re.compile(r"@import\s+(?:url\()?\s*[\"']?(?:https?:)?//[^;]*;", re.I)
_CLEAR_BTN = re.compile(r"<button\b[^>]*onclick=\"clearTableFilters\([^\"]*\)\"[^>]*>.*?</button>", re.I | re.S)


def _rel_root(page: Path, root: Path) -> str:
    """Relative path from ``page``'s folder to the docs root (``./`` or ``../../``)."""
    rel = os.path.relpath(root, page.parent)
    return "./" if rel == "." else rel.replace(os.sep, "/") + "/"


def _literal(text: str) -> Any:
    """A Python/JS literal as GX's templates print it (a Python repr); None if it is not one."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _bootstrap_table(script: str) -> Optional[str]:
    """The static ``<table>`` for a GX bootstrap-table script, or None if it is not one / unparseable."""
    if "bootstrapTable(" not in script or "columns:" not in script:
        return None
    cols = re.search(r"^\s*columns:\s*(\[.*\]),\s*$", script, re.M)
    data = re.search(r"^\s*data:\s*(\[.*\]),\s*$", script, re.M)
    columns = _literal(cols.group(1)) if cols else None
    rows = _literal(data.group(1)) if data else None
    if not isinstance(columns, list) or not isinstance(rows, list):
        return None
    columns = [c for c in columns if isinstance(c, dict) and c.get("field")]
    if "_run_time_sort" in {k for r in rows if isinstance(r, dict) for k in r}:
        rows = sorted(rows, key=lambda r: -float(r.get("_run_time_sort") or 0))  # newest first, as GX sorts
    head = "".join(f"<th>{_html.escape(str(c.get('title', c['field'])))}</th>" for c in columns)
    body = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        cells = []
        link = r.get("_table_row_link_path")
        for i, c in enumerate(columns):
            # GX's own cell HTML (icons, tooltips, suite links), as bootstrap-table would insert it
            value = str(r.get(c["field"], ""))
            if i == 0 and link and "<a " not in value:
                value = f'<a href="{_html.escape(str(link), quote=True)}">{value or "open"}</a>'
            elif c["field"] == "run_time" and link:
                value = f'<a href="{_html.escape(str(link), quote=True)}">{_html.escape(value)}</a>'
            cells.append(f"<td>{value}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{max(1, len(columns))}" class="ge-offline-note">none</td></tr>')
    return (f'<table class="ge-offline-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def _vega_static(script: str) -> Optional[str]:
    """An inline SVG bar chart (or a table) for a GX vega-embed script, or None if it is not one."""
    if "vegaEmbed(" not in script:
        return None
    m = re.search(r"vlSpec\s*=\s*(\{.*\})\s*;\s*$", script, re.M)
    spec = _literal(m.group(1)) if m else None
    if not isinstance(spec, dict):
        return '<p class="ge-offline-note">(chart not available offline)</p>'
    datasets = spec.get("datasets") or {}
    name = (spec.get("data") or {}).get("name")
    records = datasets.get(name) if isinstance(datasets, dict) else None
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        return '<p class="ge-offline-note">(chart not available offline)</p>'
    enc = spec.get("encoding") or {}
    mark = spec.get("mark")
    mark = mark.get("type") if isinstance(mark, dict) else mark
    xf = (enc.get("x") or {}).get("field")
    yf = (enc.get("y") or {}).get("field")
    ys = [_num(r.get(yf)) for r in records] if yf else []
    if mark != "bar" or not xf or not yf or any(v is None for v in ys) or len(records) > 200:
        keys = list(records[0])
        head = "".join(f"<th>{_html.escape(str(k))}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{_html.escape(str(r.get(k, '')))}</td>" for k in keys) + "</tr>"
                       for r in records[:200])
        return f'<table class="ge-offline-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    n = len(records)
    bar, gap, height, pad_top, pad_bottom = 24, 6, 120, 14, 18
    width = n * (bar + gap) + gap
    top = max(max(ys), 1e-12)
    parts = [f'<svg class="ge-offline-chart" role="img" width="{width}" '
             f'height="{height + pad_top + pad_bottom}" font-size="9" font-family="sans-serif">',
             f"<title>{_html.escape(f'{yf} by {xf}')}</title>"]
    for i, (r, v) in enumerate(zip(records, ys)):
        h = max(0.0, v / top * height)
        x = gap + i * (bar + gap)
        y = pad_top + height - h
        parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="#4c78a8">'
                     f"<title>{_html.escape(f'{xf}={r.get(xf)}: {yf}={v:.4g}')}</title></rect>")
        parts.append(f'<text x="{x + bar / 2}" y="{y - 2:.1f}" text-anchor="middle">{v:.3f}</text>')
        parts.append(f'<text x="{x + bar / 2}" y="{pad_top + height + 12}" text-anchor="middle">'
                     f"{_html.escape(str(r.get(xf)))}</text>")
    parts.append("</svg>")
    return f'<div class="ge-offline-chart-box">{"".join(parts)}</div>'


def _rewrite_css(text: str) -> tuple[str, list[str]]:
    changes = []

    def url(m: re.Match) -> str:
        changes.append(f"css url({m.group(2)}) -> none")
        return "none"

    def imp(m: re.Match) -> str:
        changes.append(f"css {m.group(0).strip()} removed")
        return ""

    text = _CSS_URL.sub(url, text)
    text = _CSS_IMPORT.sub(imp, text)
    return text, changes


def _rewrite_html(text: str, page: Path, root: Path) -> tuple[str, list[str]]:
    changes: list[str] = []
    rel = _rel_root(page, root)

    def drop(kind: str):
        def f(m: re.Match) -> str:
            url = re.search(r"(?:href|src)\s*=\s*[\"']([^\"']*)", m.group(0), re.I)
            changes.append(f"{kind} {url.group(1) if url else '?'} removed")
            return ""
        return f

    text = _LINK_TAG.sub(drop("stylesheet"), text)
    text = _SCRIPT_SRC.sub(drop("script"), text)

    def inline(m: re.Match) -> str:
        body = m.group(1)
        table = _bootstrap_table(body)
        if table is not None:
            changes.append("bootstrap-table script -> static table")
            return table
        chart = _vega_static(body)
        if chart is not None:
            changes.append("vega-embed script -> static chart")
            return chart
        if body.strip():
            changes.append("inline jQuery script removed")
        return ""

    text = _INLINE_SCRIPT.sub(inline, text)
    n = len(_CLEAR_BTN.findall(text))
    if n:
        text = _CLEAR_BTN.sub("", text)
        changes.append(f"{n} filter button(s) removed")

    def img(m: re.Match) -> str:
        url = m.group(3)
        fname = url.split("?")[0].rsplit("/", 1)[-1]
        local = root / "static" / "images" / fname
        if fname and local.is_file():
            changes.append(f"image {url} -> {rel}static/images/{fname}")
            return f"{m.group(1)}{m.group(2)}{rel}static/images/{fname}{m.group(2)}"
        changes.append(f"image {url} removed (no local copy)")
        return f"{m.group(1)}{m.group(2)}{m.group(2)}"

    text = _IMG_EXT.sub(img, text)

    def anchor(m: re.Match) -> str:
        changes.append(f"link {m.group(3)} -> text")
        return m.group(1)

    text = _A_EXT.sub(anchor, text)
    text, css_changes = _rewrite_css(text)
    changes += css_changes
    if f'id="{OFFLINE_MARK}"' not in text:
        style = f'<style id="{OFFLINE_MARK}">{OFFLINE_CSS}</style>\n'
        if re.search(r"</head>", text, re.I):
            text = re.sub(r"</head>", lambda _: style + "</head>", text, count=1, flags=re.I)
        else:
            text = style + text
        changes.append("offline stylesheet inlined")
    return text, changes


def make_offline(docs_dir: str | os.PathLike) -> list[str]:
    """Rewrite the GX Data Docs site in ``docs_dir`` in place so it loads nothing from the network.

    Returns ``["<relative file>: <change>", ...]``; empty when there was nothing to change (a
    second call). Raises ``FileNotFoundError`` when ``docs_dir`` has no ``index.html``.
    """
    root = Path(docs_dir)
    if not (root / "index.html").is_file():
        raise FileNotFoundError(f"{root} has no index.html: pass the Data Docs folder (e.g. reports/gx)")
    changed: list[str] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".html", ".htm", ".css"):
            continue
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".css":
            new, changes = _rewrite_css(text)
        else:
            new, changes = _rewrite_html(text, path, root)
        if new != text:
            tmp = path.with_name(path.name + ".offline-tmp")
            tmp.write_text(new, encoding="utf-8")
            os.replace(tmp, path)
        rel = path.relative_to(root).as_posix()
        changed += [f"{rel}: {c}" for c in changes]
    return changed


class _RefScanner(HTMLParser):
    """Collects every URL a browser would load or navigate to: src/href/srcset/... and CSS url()."""

    ATTRS = {"src", "href", "srcset", "poster", "data", "action", "formaction", "background", "xlink:href",
             "manifest", "cite", "longdesc", "ping"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []
        self._in: Optional[str] = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in self.ATTRS:
                for part in value.split(",") if name == "srcset" else [value]:
                    self.refs.append(f"<{tag} {name}> {part.strip().split(' ')[0]}")
            elif name == "style":
                self.refs += [f"<{tag} style> {u}" for _, u in _CSS_URL_ANY.findall(value)]
        self._in = tag if tag in ("style", "script") else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "style":
            self.refs += [f"<style> {u}" for _, u in _CSS_URL_ANY.findall(data)]
            self.refs += [f"<style> {m}" for m in _CSS_IMPORT_ANY.findall(data)]
        elif self._in == "script":
            self.refs += [f"<script> {u}" for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s'\"]*", data)]


_CSS_URL_ANY = re.compile(r"url\(\s*([\"']?)([^)\"']*)\1\s*\)", re.I)
_CSS_IMPORT_ANY = re.compile(r"@import\s+[^;]*;", re.I)


def external_references(docs_dir: str | os.PathLike) -> list[str]:
    """Every external URL (``http:``, ``https:``, protocol-relative) that a page or stylesheet
    under ``docs_dir`` loads or links to, as ``"<file>: <where> <url>"``. Empty = air-gap safe."""
    root = Path(docs_dir)
    out = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        rel = path.relative_to(root).as_posix()
        if suffix in (".html", ".htm"):
            p = _RefScanner()
            p.feed(path.read_text(encoding="utf-8"))
            p.close()
            refs = [r for r in p.refs if _EXTERNAL.match(r.split("> ", 1)[1])]
        elif suffix == ".css":
            text = path.read_text(encoding="utf-8")
            refs = [f"url() {u}" for _, u in _CSS_URL_ANY.findall(text) if _EXTERNAL.match(u)]
            refs += [f"@import {m}" for m in _CSS_IMPORT_ANY.findall(text) if re.search(r"(?:https?:)?//", m)]
        else:
            continue
        out += [f"{rel}: {r}" for r in refs]
    return out


def validation_pages(docs_dir: str | os.PathLike, prefix: Optional[str] = None) -> dict[str, str]:
    """Suite name -> the newest validation page of that suite in the site (GX lays them out as
    ``validations/<suite>/<run name>/<run time>/<batch>.html``; run times sort as text).

    Paths are relative to ``docs_dir``, or joined to ``prefix`` (e.g. ``reports/gx``) so a
    terminal message can print them as the user opens them.
    """
    root = Path(docs_dir)
    newest: dict[str, tuple[str, str]] = {}
    for page in (root / "validations").glob("*/*/*/*.html"):
        suite, _run, run_time = page.relative_to(root / "validations").parts[:3]
        rel = page.relative_to(root).as_posix()
        if suite not in newest or run_time > newest[suite][0]:
            newest[suite] = (run_time, rel)
    base = prefix.rstrip("/") + "/" if prefix else ""
    return {suite: base + rel for suite, (_, rel) in sorted(newest.items())}
