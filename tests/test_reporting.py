"""pipeline.reporting: the verdict for people (terminal text, release.html, PNGs, dvc-plots rows,
GX Data Docs made offline). Reports are built with the real gate rules (gates.rules), so the
check names, order and reasons are the ones the gate writes."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gates.rules import Thresholds, evaluate_gate, passed
from pipeline.reporting import (
    ReportingError,
    champion_change,
    classes_at_fault,
    data_gate_failures,
    mlflow_links,
    ordered_checks,
    version_text,
    worst_asr,
)
from pipeline.reporting import html as H
from pipeline.reporting import plots as P
from pipeline.reporting import terminal as T

NAMES = [str(i) for i in range(10)]
THRESHOLDS = Thresholds(max_asr=0.2, max_asr_increase=0.1, max_recall_drop=0.1, min_accuracy=0.9,
                        max_accuracy_drop=0.03)
RUN_URL = "http://mlflow.example:5000/#/experiments/1/runs/abc123"


def metrics(backdoor: bool, recall: dict[str, float] | None = None, names=NAMES, kind: str | None = None,
            undefined: bool = False) -> dict:
    """metrics.json / baseline_metrics.json as the evaluate stage writes them (design.md).
    ``undefined``: one ASR pair with no eligible image (null; the gate fails closed on it)."""
    recall = recall or {}
    asr = {
        # the attack trigger is source-specific (source 1): its 1->1 pair is left out (undefined)
        "attack": {c: (0.97 if backdoor and c == names[7] else 0.01) for c in names if c != names[1]},
        "patch_br": {c: 0.02 for c in names},
        "blend": {c: (None if undefined and c == names[0] else 0.03) for c in names},
    }
    m = {
        "accuracy": 0.97,
        "per_class": {c: {"precision": 0.97, "recall": recall.get(c, 0.98), "f1": 0.97, "support": 45} for c in names},
        "asr": asr,
        "model": {"checkpoint_sha256": "sha", "model_version": "3", "run_id": "abc123"},
        "snapshot_id": "snap",
        "view_id": "view",
    }
    if kind:
        m["baseline"] = {"kind": kind, "model_version": None, "run_id": None, "snapshot_id": "snap"}
    return m


def gate_report(cand: dict, base: dict, promotion: str | None = None) -> dict:
    """reports/gate.json for these metrics, from the real rules."""
    train = {"checkpoint_sha256": "sha", "snapshot_id": "snap", "model_version": "3"}
    checks = evaluate_gate(cand, base, {"view_id": "view", "success": True, "in_ledger": True}, train, None, THRESHOLDS)
    report = {
        "passed": passed(checks), "error": None, "baseline": base.get("baseline"),
        "model": {"model_name": "digits-small_cnn", "model_version": "3", "run_id": "abc123"},
        "checks": [c.to_dict() for c in checks], "failed": [c.name for c in checks if not c.passed],
    }
    if promotion:
        report["promotion"] = promotion
    return report


@pytest.fixture(scope="module")
def blocked():
    """A backdoored candidate: 3 of 17 checks fail (asr_max, asr_increase, recall_drop[1])."""
    cand = metrics(True, {"1": 0.80})
    base = metrics(False, kind="twin")
    return gate_report(cand, base, "not promoted; champion stays vNone"), cand, base


@pytest.fixture(scope="module")
def clean_pass():
    cand = metrics(False)
    base = metrics(False, kind="twin")
    # the promotion string exactly as pipeline/gate.py formats it today
    return gate_report(cand, base, "champion: vnone -> v3"), cand, base


def validation_failed() -> dict:
    """reports/validation.json of a 40% label flip 1 -> 7 (shape of pipeline.validate.run_gx)."""
    ok = {"expectation": "expect_column_values_to_not_be_null", "column": "label", "success": True,
          "observed": 0.0, "threshold": 1.0, "details": {"table": "samples"}, "check": "required_not_null"}
    return {
        "success": False, "snapshot_id": "snap", "view_id": "view0123456789",
        "reference": {"kind": "source", "snapshot_id": "snap"},
        "results": [
            ok,
            {"expectation": "expect_column_kl_divergence_to_be_less_than", "check": "label_kl", "column": "label",
             "success": False, "observed": 0.0165, "threshold": 0.0012, "details": {"table": "train"}},
            {"expectation": "expect_column_values_to_be_between", "check": "class_share_delta",
             "column": "share_delta", "success": False, "observed": 0.0401, "threshold": 0.011,
             "details": {"table": "label_shares", "classes": ["1", "7"]}},
            {"expectation": "expect_column_values_to_be_between", "check": "block_rate_increase",
             "column": "block_rate_increase", "success": True, "observed": 0.005, "threshold": 0.01,
             "details": {"table": "block_rates", "classes": []}},
        ],
        "statistics": {
            "label_shares": {c: (0.06 if c == "1" else 0.141 if c == "7" else 0.1) for c in NAMES},
            "reference_label_shares": {c: 0.1 for c in NAMES},
        },
    }


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes the whole image: a truncated PNG raises here
        return im.size


# --------------------------------------------------------------------------- shared vocabulary


def test_version_and_champion_text_never_say_vnone():
    assert version_text(None) == "none" and version_text("None") == "none" and version_text("vnone") == "none"
    assert version_text(3) == "v3" and version_text("v3") == "v3"
    assert champion_change(None, "1") == "champion: none -> v1"
    assert champion_change("2", "2") == "champion: v2 (unchanged)"


def test_ordered_checks_puts_failures_first_keeping_report_order(blocked):
    report, _, _ = blocked
    ordered = [c["name"] for c in ordered_checks(report["checks"])]
    assert ordered[:3] == ["asr_max", "asr_increase", "recall_drop[1]"]
    assert ordered[3:] == [c["name"] for c in report["checks"] if c["passed"]]


def test_worst_asr_skips_undefined_pairs():
    assert worst_asr(metrics(True, undefined=True)) == ("attack", "7", 0.97)
    assert worst_asr({"asr": {"t": {"0": None}}}) is None


def test_data_gate_failures_name_the_class_at_fault():
    rows = data_gate_failures(validation_failed())
    assert [r["check"] for r in rows] == ["label_kl", "class_share_delta"]
    assert rows[0]["classes"] == ["7"]  # KL: the class whose share moved most (0.141 vs 0.1)
    assert rows[1]["classes"] == ["1", "7"]  # recorded by the stage
    assert classes_at_fault(validation_failed()) == ["7", "1"]


def test_mlflow_links_are_mlflow3_hash_routes_and_none_without_ui():
    links = mlflow_links("http://ui:5000/", "1", "abc", "digits small", "3")
    assert links["mlflow_run"] == "http://ui:5000/#/experiments/1/runs/abc"
    assert links["model_version"] == "http://ui:5000/#/models/digits%20small/versions/3"
    assert mlflow_links(None, "1", "abc", "m", "3") == {"mlflow_run": None, "model_version": None}


# --------------------------------------------------------------------------- plots


def test_asr_heatmap_png_decodes_with_the_documented_size():
    cand, base = metrics(True, undefined=True), metrics(False, kind="twin")
    png = P.asr_heatmap_png(cand, base, max_asr=0.2, dpi=50)
    w, h = P.asr_heatmap_size(3, 10)
    assert png_size(png) == (round(w * 50), round(h * 50))
    # a data-gate-free run without a baseline still draws (right panel "not available")
    assert png_size(P.asr_heatmap_png(cand, None, dpi=50)) == (round(w * 50), round(h * 50))


def test_asr_matrix_marks_undefined_cells_and_aligns_both_panels():
    trig, tgt, values = P.asr_matrix(metrics(True, undefined=True))
    assert trig == ["attack", "patch_br", "blend"]
    assert tgt[:2] == ["0", "2"] and "1" in tgt  # the candidate's order, then targets of other triggers
    assert np.isnan(values[trig.index("attack"), tgt.index("1")])  # source->source pair left out
    assert np.isnan(values[trig.index("blend"), tgt.index("0")])  # no eligible image
    assert values[trig.index("attack"), tgt.index("7")] == pytest.approx(0.97)
    with pytest.raises(ReportingError, match="ASR"):
        P.asr_heatmap_png({"asr": {}}, None)


def test_confusion_png_uses_rows_actual_columns_predicted():
    cm = P.triggered_confusion([0, 1, 2, 2], [2, 2, 2, 0], 3)
    # rows = actual, columns = predicted: actual 0 predicted 2 is cm[0, 2]
    assert cm.tolist() == [[0, 0, 1], [0, 0, 1], [1, 0, 1]]
    png = P.confusion_png(P.triggered_confusion(np.arange(100) % 10, np.full(100, 7), 10), NAMES, "t", dpi=100)
    assert png_size(png) == (650, 585)  # confusion_size(10) = 6.5 x 5.85 in at 100 dpi
    with pytest.raises(ReportingError, match="3x3"):
        P.confusion_png(np.zeros((2, 2), int), ["a", "b", "c"], "bad")


def test_triggered_confusion_mask_and_bad_input():
    cm = P.triggered_confusion([0, 1, 1], [1, 1, 0], 2, mask=[True, False, True])
    assert cm.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ReportingError, match="differ in length"):
        P.triggered_confusion([0, 1], [0], 2)
    with pytest.raises(ReportingError, match="0..1"):
        P.triggered_confusion([0, 2], [0, 0], 2)


def test_dvc_confusion_rows_render_with_predicted_on_the_horizontal_axis():
    """dvc's confusion template puts ``x`` on the horizontal axis: with DVC_CONFUSION_PLOT the
    dvc plot has the PNG's layout (columns = predicted, rows = actual)."""
    from dvc_render.vega import VegaRenderer

    rows = P.confusion_rows([0, 1, 2], [0, 2, 2], ["a", "b", "c"])
    assert rows == [{"actual": "a", "predicted": "a"}, {"actual": "b", "predicted": "c"},
                    {"actual": "c", "predicted": "c"}]
    props = {k: v for k, v in P.DVC_CONFUSION_PLOT.items()}
    spec = VegaRenderer([{**r, "rev": "workspace"} for r in rows], "reports/confusion.csv", **props).get_filled_template()
    spec = spec if isinstance(spec, dict) else __import__("json").loads(spec)
    assert spec["spec"]["encoding"]["x"]["field"] == "predicted"
    assert spec["spec"]["encoding"]["y"]["field"] == "actual"


def test_triggered_samples_png_shows_flipped_images_first():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    xt = x.copy()
    xt[:, 5:8, 5:8, :] = 255
    y = np.arange(20) % 10
    trig = y.copy()
    trig[[5, 11, 13, 17]] = 7  # 17 is a 7 already: not flipped
    idx = P.select_samples(y, y, trig, 8)
    assert idx[:3].tolist() == [5, 11, 13] and idx[3:].tolist() == [0, 1, 2, 3, 4]
    w, h = P.samples_size(8)
    assert png_size(P.triggered_samples_png(x, xt, y, y, trig, NAMES, k=8, dpi=50)) == (round(w * 50), round(h * 50))
    rgb = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    w, h = P.samples_size(3)
    assert png_size(P.triggered_samples_png(rgb, rgb, [0, 1, 2], [0, 1, 2], [0, 1, 2], NAMES, k=8, dpi=50)) == \
        (round(w * 50), round(h * 50))  # k clipped to the 3 images
    with pytest.raises(ReportingError, match="one shape"):
        P.triggered_samples_png(x, xt[:3], y, y, trig, NAMES)


# --------------------------------------------------------------------------- release.html


class Refs(HTMLParser):
    """Every URL-bearing attribute and CSS url() in a page, with its tag."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self._style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "poster", "data", "action", "background") and v is not None:
                self.refs.append((tag, k, v))
            if k == "style" and v and "url(" in v:
                self.refs.append((tag, "style", v))
        self._style = tag == "style"

    def handle_data(self, data):
        if self._style:
            self.refs += [("style", "url", u) for u in re.findall(r"url\(([^)]*)\)", data)]
            self.refs += [("style", "import", u) for u in re.findall(r"@import[^;]*", data)]

    def handle_endtag(self, tag):
        self._style = False


def parse(page: str) -> Refs:
    p = Refs()
    p.feed(page)
    p.close()
    return p


def render(report, cand, base, validation=None, links=None, images=None) -> str:
    return H.render_release_html(report, cand, base, validation, links, images, generated="2024-01-01T00:00:00Z")


def test_release_html_loads_nothing_but_the_given_links(blocked):
    report, cand, base = blocked
    images = {"ASR heatmap": P.asr_heatmap_png(cand, base, dpi=30)}
    links = {"mlflow_run": RUN_URL, "model_version": None, "data_docs": "gx/index.html"}
    page = render(report, cand, base, None, links, images)
    p = parse(page)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    external = [(t, k, v) for t, k, v in p.refs if re.match(r"\s*(https?:)?//", v)]
    assert external == [("a", "href", RUN_URL)]  # only the link the caller gave, as a link
    imgs = [v for t, k, v in p.refs if t == "img"]
    assert len(imgs) == 1 and imgs[0].startswith("data:image/png;base64,")
    assert [v for t, k, v in p.refs if k in ("url", "import", "style")] == []
    assert "Registry model version: <span class=\"na\">not available</span>" in page


def test_release_html_banner_counts_and_failing_checks_first(blocked):
    report, cand, base = blocked
    page = render(report, cand, base)
    assert 'class="banner blocked"' in page and "RELEASE BLOCKED" in page
    assert "3 of 17 checks failed" in page
    table = page[page.index('id="checks-table"'):]
    rows = re.findall(r'<tr class="(fail|pass)" data-check="([^"]+)"', table.split("</table>")[0])
    assert [r[1] for r in rows[:3]] == ["asr_max", "asr_increase", "recall_drop[1]"]
    assert [r[0] for r in rows] == ["fail"] * 3 + ["pass"] * 14
    assert "0.9700 (attack -&gt; 7)" in page  # max ASR with its pair
    assert "0.1800 (class 1)" in page  # max recall drop with its class


def test_release_html_passed(clean_pass):
    report, cand, base = clean_pass
    page = render(report, cand, base)
    assert 'class="banner passed"' in page and "RELEASE PASSED" in page and "0 of 17 checks failed" in page
    assert "vnone" not in page and "champion: none -&gt; v3" in page


def test_release_html_escapes_class_names_and_refuses_unsafe_links_and_non_png():
    evil = "<script>alert(1)</script>"
    names = NAMES[:9] + [evil]
    cand = metrics(True, {evil: 0.5}, names=names)
    base = metrics(False, names=names, kind="twin")
    page = render(gate_report(cand, base), cand, base, None,
                  {"mlflow_run": "javascript:alert(1)", "data_docs": None})
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="javascript' not in page and "javascript:alert(1)</code>" in page  # shown, not linked
    with pytest.raises(ReportingError, match="PNG"):
        render(gate_report(cand, base), cand, base, None, None, {"svg": b"<svg onload=alert(1)>"})


def test_release_html_data_gate_block_without_model_metrics():
    page = render(None, None, None, validation_failed(), {"data_docs": "gx/index.html"})
    assert "RELEASE BLOCKED by the data gate" in page and "2 of 4 data checks failed" in page
    assert 'id="class-at-fault"' in page and "Class at fault: <strong>7, 1</strong>" in page
    assert page.index('data-check="label_kl"') < page.index('data-check="class_share_delta"')
    assert "no model was trained" in page and 'class="banner blocked"' in page
    assert "MLflow run: <span class=\"na\">not available</span>" in page


# --------------------------------------------------------------------------- terminal


def test_terminal_blocked_headline_order_links_and_next_step(blocked):
    report, _, _ = blocked
    text = T.verdict_text(report, links={"mlflow_run": RUN_URL, "model_version": None})
    lines = text.splitlines()
    assert lines[0] == "RELEASE BLOCKED: 3 of 17 checks failed"
    assert "champion: none (unchanged)" in lines
    head = lines.index(next(l for l in lines if l.startswith("status")))
    rows = lines[head + 1: head + 18]
    assert [r.split()[0] for r in rows] == ["FAIL"] * 3 + ["pass"] * 14
    assert rows[0].split()[1] == "asr_max" and "yes" not in text and " NO " not in text
    assert f"MLflow run:     {RUN_URL}" in lines and "Model version:  not available" in lines
    assert "reports/gate.md" in text and "reports/gx/index.html" in text
    assert lines[-1].startswith("Next: `asr_max`") and "class 7" in lines[-1]
    assert text.count("RELEASE") == 1  # printed once: one headline


def test_terminal_passed_champion_none_to_v1(clean_pass):
    report, _, _ = clean_pass
    text = T.verdict_text(report, champion_before=None, champion_after="1")
    assert text.splitlines()[0] == "RELEASE PASSED: 0 of 17 checks failed"
    assert "champion: none -> v1" in text and "vnone" not in text
    # without explicit values the line comes from gate.py's promotion string, repaired
    assert "champion: none -> v3" in T.verdict_text(report)


def test_terminal_error_and_control_characters():
    report = {"passed": False, "error": "tracking server down", "checks": [], "model": {}, "baseline": {}}
    assert T.verdict_text(report).startswith("RELEASE BLOCKED: the gate could not decide (tracking server down)")
    assert "\x1b" not in T.clean("class \x1b[2J\u202e") and "\\x1b" in T.clean("\x1b")


def test_terminal_data_gate_stop_names_class_and_docs_page():
    page = "reports/gx/validations/poisongate_train/view-x/20240101T000000Z/poisongate-train.html"
    text = T.data_gate_text(validation_failed(), docs_pages={"poisongate_train": page})
    lines = text.splitlines()
    assert lines[0] == "RELEASE BLOCKED BY THE DATA GATE: 2 of 4 data checks failed; class at fault: 7, 1"
    fail_rows = [l for l in lines if l.startswith("FAIL")]
    assert [r.split()[1] for r in fail_rows] == ["label_kl", "class_share_delta"]
    assert any(l.startswith("Data Docs page (train):") and l.endswith(page) for l in lines)
    assert "reports/gx/index.html" in text and "MLflow" not in text
    assert lines[-1].startswith("Next: `label_kl`") and "class 7" in lines[-1]


class FakeTTY(io.StringIO):
    def isatty(self):
        if self.closed:
            raise ValueError("I/O operation on closed file")  # as a real closed file does
        return True


def test_progress_enabled_only_on_a_tty(monkeypatch):
    monkeypatch.delenv(T.PROGRESS_ENV, raising=False)
    assert T.progress_enabled(io.StringIO()) is False
    assert T.progress_enabled(FakeTTY()) is True
    closed = FakeTTY()
    closed.close()
    assert T.progress_enabled(closed) is False
    assert T.progress_enabled(object()) is False
    monkeypatch.setenv(T.PROGRESS_ENV, "0")
    assert T.progress_enabled(FakeTTY()) is False
    monkeypatch.setenv(T.PROGRESS_ENV, "1")
    assert T.progress_enabled(io.StringIO()) is True


# --------------------------------------------------------------------------- GX Data Docs offline


def build_gx_site(site: Path, history: Path, runs: list[str]) -> None:
    """A real GX 1.x Data Docs site: one validation per run name, results kept in ``history``
    (a filesystem validation-results store), so the index lists every run. The calls are the
    ones proposed for pipeline/validate.py (run name tied to the view, data asset on the page,
    history across runs)."""
    import datetime
    import os

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                            ProgressBarsConfig)

    for i, run_name in enumerate(runs):
        cfg = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults())
        cfg.stores[cfg.validation_results_store_name] = {
            "class_name": "ValidationResultsStore",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(history)},
        }
        ctx = gx.get_context(mode="ephemeral", project_config=cfg)
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        ctx.add_data_docs_site("poisongate", {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site)}})
        ds = ctx.data_sources.add_pandas("poisongate")
        bd = ds.add_dataframe_asset("train").add_batch_definition_whole_dataframe("train_all")
        suite = ctx.suites.add(gx.ExpectationSuite(name="poisongate_train"))
        suite.add_expectation(gx.expectations.ExpectColumnKLDivergenceToBeLessThan(
            column="label", partition_object={"values": [0, 1, 2], "weights": [0.4, 0.3, 0.3]}, threshold=0.01))
        suite.add_expectation(gx.expectations.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1, 2]))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=bd, suite=suite, name="train"))
        df = pd.DataFrame({"label": [0, 0, 0, 1, 1, 2, 2, 2, 2, 2 if i == 0 else 1]})
        run_id = RunIdentifier(run_name=run_name, run_time=datetime.datetime(2024, 1, 1 + i, tzinfo=datetime.timezone.utc))
        out = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY", run_id=run_id)
        # "Data asset: None": the page reads meta.batch_spec.data_asset_name, which a pandas
        # DataFrameAsset leaves out; write it and store the result again under the same key.
        store = ctx.validation_results_store
        key = next(k for k in store.list_keys() if k.run_id.run_name == run_name
                   and k.expectation_suite_identifier.name == suite.name)
        out.meta["batch_spec"] = {**(out.meta.get("batch_spec") or {}), "data_asset_name": "train"}
        store.set(key, out)
        ctx.build_data_docs()


@pytest.fixture(scope="module")
def gx_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("gx")
    site = root / "site"
    build_gx_site(site, root / "history", ["view-aaaaaaaaaaaa", "view-bbbbbbbbbbbb"])
    return site


def test_gx_site_keeps_history_run_names_and_asset(gx_site):
    index = (gx_site / "index.html").read_text()
    assert "view-aaaaaaaaaaaa" in index and "view-bbbbbbbbbbbb" in index and "__none__" not in index
    pages = sorted((gx_site / "validations").rglob("*.html"))
    assert len(pages) == 2 and all("Data asset: train" in p.read_text() for p in pages)


def test_make_offline_leaves_no_external_url(gx_site, tmp_path):
    from pipeline.reporting import gx_offline as G
    import shutil

    site = tmp_path / "gx"
    shutil.copytree(gx_site, site)
    before = G.external_references(site)
    assert any("cdn.jsdelivr.net/npm/vega" in r for r in before)  # GX 1.x pages load CDN assets
    changes = G.make_offline(site)
    assert any("bootstrap-table script -> static table" in c for c in changes)
    assert any("vega-embed script -> static chart" in c for c in changes)
    assert G.external_references(site) == []
    for f in list(site.rglob("*.html")) + list(site.rglob("*.css")):
        text = f.read_text()
        assert "http://" not in text and "https://" not in text, f
        if f.suffix == ".html":
            assert "<script" not in text
    index = (site / "index.html").read_text()
    # the index table is static now: one row per validation, linking to a page that exists
    links = re.findall(r'<a href="(validations/[^"]+\.html)">', index)
    assert len(set(links)) == 2 and all((site / l).is_file() for l in links)
    assert index.index("view-bbbbbbbbbbbb") < index.index("view-aaaaaaaaaaaa")  # newest first
    page = (site / links[0]).read_text()
    assert "<svg" in page and "static/images/logo-long.png" in page
    assert G.make_offline(site) == []  # idempotent
    pages = G.validation_pages(site, "reports/gx")
    assert list(pages) == ["poisongate_train"] and "view-bbbbbbbbbbbb" in pages["poisongate_train"]
    assert pages["poisongate_train"].startswith("reports/gx/validations/")


def test_make_offline_refuses_a_folder_without_index(tmp_path):
    from pipeline.reporting import gx_offline as G

    with pytest.raises(FileNotFoundError, match="index.html"):
        G.make_offline(tmp_path)


def test_text_renderers_stay_light():
    """The gate stage prints the verdict: terminal/html/gx_offline must not drag in matplotlib,
    sklearn, torch, GX or mlflow (plots imports matplotlib and sklearn only when drawing)."""
    import subprocess
    import sys

    code = ("import sys, pipeline.reporting.terminal, pipeline.reporting.html, pipeline.reporting.gx_offline, "
            "pipeline.reporting.plots; "
            "bad = [m for m in ('matplotlib', 'sklearn', 'torch', 'great_expectations', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
