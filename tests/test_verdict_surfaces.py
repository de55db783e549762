"""Issue 17: the verdict where reviewers look, against a real MLflow store (sqlite + file artifacts).

A passing and a blocked release from the same released state: the run's name, description,
tags, `gate/*` and namespaced metrics, the evidence logged as artifacts (gate report, release
report, validation report, Data Docs, pictures of the attack), the version's description; the
experiment opens on its runs table; a byte-identical checkpoint is not registered again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MODEL = "poisongate-digits"


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def _check_surfaces(state, verdict: str) -> dict:
    from pipeline.tracking import registry

    c = state.client()
    rep = state.json("reports/train.json")
    run = c.get_run(rep["run_id"])
    version = rep["model_version"]
    gate = state.json("reports/gate.json")
    # pass / blocked at a glance: one tag vocabulary on runs and versions, a unique telling name
    assert run.data.tags[registry.TAG_VERDICT] == verdict
    assert c.get_model_version(MODEL, version).tags[registry.TAG_VERDICT] == verdict
    assert run.info.run_name.startswith("digits-") and f"-v{version}-{verdict}-" in run.info.run_name
    # descriptions: the verdict summary, which checks failed, value against threshold, the baseline
    desc = run.data.tags["mlflow.note.content"]
    assert f"Release {verdict.upper()}" in desc and "compared with the" in desc
    for name in gate["failed"]:
        assert f"`{name}`" in desc
    assert c.get_model_version(MODEL, version).description == desc
    assert "reports/" not in desc  # artifact paths, not paths on the CI machine
    # metrics: gate/* as columns, namespaced names, the learning rate actually used
    m = run.data.metrics
    assert m["gate/passed"] == (1.0 if verdict == "passed" else 0.0)
    assert "gate/asr_max" in m and "gate/max_recall_drop" in m
    assert "eval/accuracy" in m and any(k.startswith("asr/") for k in m) and "recall/0" in m
    assert not any("." in k.split("/")[0] for k in m if not k.startswith("system"))
    lrs = [x.value for x in c.get_metric_history(rep["run_id"], "train/lr")]
    assert lrs and min(lrs) > 0
    # the evidence travels with the model
    arts = _artifacts(c, rep["run_id"])
    for path in ("gate/gate.json", "gate/gate.md", "gate/release.html", "gate/summary.json",
                 "validation/validation.json", "validation/gx/index.html", "evaluation/plots/asr_heatmap.png",
                 "evaluation/metrics.json"):
        assert path in arts, (path, sorted(arts))
    return {"run": run, "gate": gate, "arts": arts}


def test_passing_and_blocked_runs_carry_their_verdict(released):
    from pipeline.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    rc, out = released.run("gate")
    assert rc == 0, out
    assert "RELEASE PASSED: 0 of" in out and "champion: v1 -> v2" in out
    assert out.count("RELEASE PASSED") == 1  # printed once
    ok = _check_surfaces(released, "passed")
    assert released.champion() == "2"
    exp = released.client().get_experiment(ok["run"].info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI opens on the runs table
    summary = released.json("reports/summary.json")
    assert summary["verdict"] == "passed" and summary["baseline"] == "champion" and summary["asr_max"] is not None

    released.compose("attack=label_flip", "attack.source=1", "attack.target=7", "attack.rate=0.6",
                     "validate.on_fail=warn")
    for stage in ("poison", "validate", "train", "evaluate"):
        rc, out = released.run(stage)
        assert rc == 0, out[-2000:]
    rc, out = released.run("gate")
    assert rc == 1
    heads = [x for x in out.splitlines() if x.startswith("RELEASE ")]
    assert len(heads) == 1 and heads[0].startswith("RELEASE BLOCKED: ") and " checks failed" in heads[0]
    lines = out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("status"))) + 1:]
    first_pass = next(i for i, x in enumerate(table) if x.startswith("pass"))
    assert all(x.startswith("FAIL") for x in table[:first_pass])  # failing rows first
    assert "champion: v2 (unchanged)" in out or "champion: v2" in out
    bad = _check_surfaces(released, "blocked")
    assert "recall_drop[1]" in bad["gate"]["failed"]
    assert released.champion() == "2"
    assert released.json("reports/summary.json")["verdict"] == "blocked"
    html = (released.root / "reports/release.html").read_text()
    assert "BLOCKED" in html and "recall_drop[1]" in html
    assert "http://" not in html and "https://" not in html  # no CDN; and no UI address is known for sqlite


def test_blocked_exit_zero_when_fail_on_block_is_false(released):
    released.compose("train.seed=1", "gate.fail_on_block=false", "gate.min_accuracy=1.0")
    rc, out = released.run("gate")
    assert rc == 0 and "RELEASE BLOCKED" in out and "fail_on_block=false" in out
    assert released.champion() == "1"
    assert released.json("reports/gate.json")["passed"] is False


def test_byte_identical_checkpoint_is_not_registered_again(released):
    versions = released.versions()
    released.compose("train.seed=1")  # the state's v2 settings again
    rc, out = released.run("train")
    assert rc == 0, out[-2000:]
    assert released.versions() == versions
    assert released.json("reports/train.json")["model_version"] == "2"
    assert "byte-identical" in out


def test_release_html_is_self_contained(released):
    rc, _ = released.run("gate")
    assert rc == 0
    html = (released.root / "reports/release.html").read_text()
    assert "<script src" not in html and 'rel="stylesheet"' not in html and "@import" not in html
    assert html.count("data:image/png;base64,") >= 3 and "PASSED" in html  # the pictures are inline


def test_a_data_gate_block_shows_in_mlflow_and_in_offline_data_docs(released):
    from pipeline.reporting.gx_offline import external_references
    from pipeline.tracking import registry

    released.compose("attack=label_flip", "attack.source=1", "attack.target=7", "attack.rate=0.6")
    assert released.run("poison")[0] == 0
    rc, out = released.run("validate")
    assert rc == 1
    assert "RELEASE BLOCKED BY THE DATA GATE" in out and "class at fault: 7" in out
    c = released.client()
    runs = c.search_runs([c.get_experiment_by_name("poisongate").experiment_id],
                         f"tags.`{registry.TAG_VERDICT}` = 'blocked'")
    gate_runs = [r for r in runs if "blocked-by-data-gate" in r.info.run_name]
    assert gate_runs, [r.info.run_name for r in runs]
    r = gate_runs[0]
    assert "label_share" in r.data.tags[registry.TAG_FAILED] and "data gate" in r.data.tags["mlflow.note.content"]
    arts = {a.path for a in c.list_artifacts(r.info.run_id, "validation")}
    assert "validation/validation.json" in arts and "validation/gx" in arts
    docs = released.root / "reports/gx"
    assert external_references(docs) == []  # opens in an air-gapped viewer
    pages = "".join(p.read_text() for p in docs.rglob("*.html"))
    assert f"view-{released.json('reports/validation.json')['view_id'][:12]}" in pages  # run named after the view
    assert "Data asset: None" not in pages and "__none__" not in pages
    # history: the released state's earlier validation is still listed after this run replaced the folder
    stored = list((released.root / "data/gx_history").rglob("*.json"))
    shown = list(docs.rglob("validations/**/*.html"))
    assert len(shown) == len(stored)
    assert len({p.parent.parent.name for p in shown}) >= 2  # two runs (views) in the site
