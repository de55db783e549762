"""release.html and the offline GX Data Docs in a real headless Chromium, from disk, no network.

Chromium comes from the OS (Debian package ``chromium``; .ci/run installs it when missing). The
tests skip, saying so, only when no chromium binary is on PATH.

Network: every host name resolves to NOTFOUND (``--host-resolver-rules``), and background
networking, component updates, sync and QUIC are off, so a page that needs the internet renders
as it would in an air-gapped artifact viewer. A probe script added to a copy of the page reports
after ``load`` how many images decoded and every resource the page tried to fetch (failed
fetches are listed too: the negative control shows it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.reporting import html as H
from pipeline.reporting import plots as P

from test_reporting import NAMES, RUN_URL, blocked, build_gx_site, validation_failed  # noqa: F401 (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y --no-install-recommends chromium)")

PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const fetched = performance.getEntriesByType('resource').map(e => e.name);
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({images: imgs.length, bad: bad, fetched: fetched});
  document.body.appendChild(p);
});</script>"""


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM after load, as Chromium rendered it (scripts run, styles applied)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    assert "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def probe(page: Path, tmp_path: Path) -> dict:
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = dump_dom(copy, tmp_path / f"profile-{page.stem}-probe")
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, "the probe did not run"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_probe_detects_network_loads(tmp_path):
    """Negative control: a page with a CDN stylesheet and a remote image is caught."""
    page = tmp_path / "neg.html"
    page.write_text('<html><head><link rel="stylesheet" href="https://cdn.example.invalid/a.css"></head>'
                    '<body><img src="http://example.invalid/x.png"></body></html>')
    result = probe(page, tmp_path)
    assert result["bad"] == 1
    assert set(result["fetched"]) == {"https://cdn.example.invalid/a.css", "http://example.invalid/x.png"}


def test_release_html_renders_verdict_and_failing_checks_offline(blocked, tmp_path):  # noqa: F811
    report, cand, base = blocked
    images = {"ASR heatmap: candidate vs baseline": P.asr_heatmap_png(cand, base, max_asr=0.2, dpi=40),
              "confusion on triggered inputs": P.confusion_png(
                  P.triggered_confusion(list(range(10)) * 3, [7] * 30, 10), NAMES, "triggered", dpi=40)}
    page = tmp_path / "release.html"
    page.write_text(H.render_release_html(report, cand, base, None,
                                          {"mlflow_run": RUN_URL, "model_version": None,
                                           "data_docs": "gx/index.html"}, images))
    dom = dump_dom(page, tmp_path / "profile")
    verdict = re.search(r'id="verdict">(.*?)</span>', dom, re.S)
    assert verdict and "RELEASE BLOCKED" in verdict.group(1)
    assert "3 of 17 checks failed" in dom
    failing = re.findall(r'<tr class="fail" data-check="([^"]+)"', dom)
    assert failing[:3] == ["asr_max", "asr_increase", "recall_drop[1]"]
    result = probe(page, tmp_path)
    assert result == {"images": 2, "bad": 0, "fetched": []}  # both data: PNGs decoded, nothing fetched


def test_data_gate_release_html_renders_offline(tmp_path):
    page = tmp_path / "release.html"
    page.write_text(H.render_release_html(None, None, None, validation_failed(), {"data_docs": "gx/index.html"}, None))
    dom = dump_dom(page, tmp_path / "profile")
    assert "RELEASE BLOCKED by the data gate" in dom and "2 of 4 data checks failed" in dom
    assert re.findall(r'<tr class="fail" data-check="([^"]+)"', dom) == ["label_kl", "class_share_delta"]


def test_offline_gx_data_docs_render_their_tables(tmp_path):
    """After make_offline, the GX index shows its validation rows (bootstrap-table built them in JS
    from a CDN before) and a validation page fetches nothing."""
    from pipeline.reporting.gx_offline import make_offline

    site = tmp_path / "gx"
    build_gx_site(site, tmp_path / "history", ["view-cccccccccccc"])
    make_offline(site)
    dom = dump_dom(site / "index.html", tmp_path / "profile-index")
    rows = re.findall(r'<a href="(validations/[^"]+\.html)">', dom)
    assert len(set(rows)) == 1 and "view-cccccccccccc" in dom  # status and run-time cells link it
    result = probe(site / rows[0], tmp_path)
    assert result["fetched"] == [] and result["bad"] == 0 and result["images"] >= 1
