"""Stage `gate`: the release verdict, and the only promotion to `champion`.

Reads the candidate's and the baseline's metrics, the data-validation record and the train
report; applies the pure rules in gates.rules; writes reports/gate.json, gate.md, the
self-contained reports/release.html and the small git-tracked reports/summary.json (DVC's
metrics); puts the verdict where reviewers look (the MLflow run's name, description, tags,
`gate/*` metrics and artifacts; the model version's description and tags); on pass moves the
registry alias `champion` to the candidate's version, on fail tags the version with the failed
checks and exits 1 (0 with ``gate.fail_on_block: false``, so `dvc exp run` keeps the attempt).

Fail closed: any error on the way to the verdict (an unreadable report, an unreachable tracking
server, a missing baseline) is a failed release with a message saying what to do, and no alias
is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from gates.rules import Check, evaluate_gate, passed
from pipeline import stage
from pipeline.io import atomic_write_text, read_json, write_json
from pipeline.schema import Config, model_name

PATHS = (
    stage.PathArg("metrics", "the candidate's metrics", default="reports/metrics.json"),
    stage.PathArg("baseline_metrics", "the baseline's metrics", default="reports/baseline_metrics.json"),
    stage.PathArg("validated", "the data gate's record", default="data/validated.json"),
    stage.PathArg("approved", "the data gate's ledger of approved views (data/approved)", default="data/approved"),
    stage.PathArg("train_report", "the train report and lineage record", default="reports/train.json"),
    stage.PathArg("evaluation", "the evaluate stage's record of the metrics digests", default="reports/evaluate.json"),
    stage.PathArg("report", "the verdict to write", default="reports/gate.json"),
    stage.PathArg("summary", "the verdict as markdown", default="reports/gate.md"),
    stage.PathArg("validation", "the data gate's report, logged with the verdict", default="reports/validation.json"),
    stage.PathArg("docs", "the GX Data Docs folder, logged with the verdict", default="reports/gx"),
    stage.PathArg("plots", "the evaluate stage's pictures of the attack", default="reports/plots"),
    stage.PathArg("confusion_png", "the clean confusion matrix picture", default="reports/confusion.png"),
    stage.PathArg("html", "the self-contained release report to write", default="reports/release.html"),
    stage.PathArg("summary_metrics", "the small verdict metrics DVC compares (git-tracked)",
                  default="reports/summary.json"),
    stage.PathArg("inspection", "the inspect stage's report (poison_suspects, backdoor_scan)",
                  default="reports/inspect.json"),
)


class GateError(stage.UserError):
    """An error on the way to the verdict; the release fails closed (exit 2)."""


class ReleaseBlocked(stage.CheckFailed):
    """The release gate failed at least one check (exit 1)."""


def read_report(path: Path, what: str) -> dict[str, Any]:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise GateError(f"{what} {path} is missing: run `dvc repro` so the earlier stages produce it") from None
    except (ValueError, OSError) as exc:
        raise GateError(f"{what} {path} is unreadable ({exc}): re-run `dvc repro --force evaluate`") from exc


def verdict(checks: list[Check], baseline: dict[str, Any], model: dict[str, Any], error: Optional[str] = None) -> dict[str, Any]:
    return {
        "passed": error is None and passed(checks),
        "error": error,
        "baseline": baseline,
        "model": model,
        "checks": [c.to_dict() for c in checks],
        "failed": [c.name for c in checks if not c.passed],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def render_markdown(report: dict[str, Any]) -> str:
    """reports/gate.md: the terminal verdict (one renderer) under a markdown headline."""
    from pipeline.reporting.terminal import verdict_text

    head = "PASSED" if report.get("passed") else "BLOCKED"
    return f"# Release gate: {head}\n\n```\n{verdict_text(report, links=report.get('links'))}```\n"


def summary_metrics(report: dict[str, Any], candidate: Optional[dict], baseline: Optional[dict]) -> dict[str, Any]:
    """The few numbers `dvc exp show` / `dvc metrics diff` compare across experiments and commits."""
    from pipeline.reporting import max_recall_drop

    drop = max_recall_drop(candidate, baseline) if candidate and baseline else None
    return {
        "verdict": "passed" if report.get("passed") else "blocked",
        "passed": bool(report.get("passed")),
        "failed_checks": len(report.get("failed") or []) + (1 if report.get("error") else 0),
        "accuracy": (candidate or {}).get("accuracy"),
        "asr_max": (candidate or {}).get("asr_max"),
        "max_recall_drop": None if drop is None else drop[1],
        "baseline": ((baseline or {}).get("baseline") or {}).get("kind"),
        "model_version": (report.get("model") or {}).get("model_version"),
    }


def _client(train_report: dict[str, Any]):
    from pipeline.tracking import runs

    uri = stage.redact(runs.tracking_uri())
    if train_report.get("tracking_uri") and train_report["tracking_uri"] != uri:
        raise GateError(
            f"the candidate was registered in {train_report['tracking_uri']} but MLFLOW_TRACKING_URI is {uri}: "
            "run the gate against the same store as train"
        )
    return runs.client()


def run_gate(cfg: Config, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    from gates.rules import champion_check, evidence_check, inspection_checks, lineage_check
    from pipeline.io import file_sha256

    thresholds = cfg.gate
    train_report = read_report(Path(args.train_report), "train report")
    name = train_report.get("model_name")
    if name != model_name(cfg):
        raise GateError(
            f"the train report registered model {name!r} but the config names {model_name(cfg)!r}: "
            "re-run `dvc repro` so train, evaluate and gate agree")
    candidate = read_report(Path(args.metrics), "candidate metrics")
    baseline = read_report(Path(args.baseline_metrics), "baseline metrics")
    record = read_report(Path(args.evaluation), "evaluation record")
    try:
        validated = read_json(Path(args.validated))
    except FileNotFoundError:
        validated = None  # the validation check fails closed on None
    if isinstance(validated, dict) and validated.get("success") is True:
        # validated.json is a plain file: a "passed" counts only when the hash-chained ledger holds
        # the approval of that very view (a damaged ledger raises LedgerDamaged: not promoted).
        from pipeline.data.ledger import approved_entry

        validated = {**validated, "in_ledger": approved_entry(args.approved, str(validated.get("view_id"))) is not None}
    inspection_path = Path(args.inspection)
    inspection: Any = None  # the inspection checks fail closed on None
    if inspection_path.is_file():
        try:
            inspection = read_json(inspection_path)
        except (ValueError, OSError) as exc:
            inspection = f"unreadable ({exc})"  # not a mapping: judged malformed, fails closed
    version = train_report.get("model_version")
    run_id = train_report.get("run_id")
    if not version or not run_id:
        raise GateError("train report names no registered model version or run: re-run `dvc repro --force train`")
    model = {"model_name": name, "model_version": str(version), "run_id": run_id}

    from mlflow.exceptions import MlflowException

    from pipeline.tracking import registry
    from pipeline.tracking.runs import TAG_BASELINE_SHA, TAG_INSPECT_SHA, TAG_METRICS_SHA

    try:
        client = _client(train_report)
        current = registry.champion(client, name)
        champion = None if current is None else str(current.version)
        registered = registry.registered_version(client, name, str(version))
        run_tags = client.get_run(run_id).data.tags
        served = registry.artifact_sha256(client, name, str(version))
    except MlflowException as exc:
        raise GateError(f"cannot read the registry ({exc.message.splitlines()[0]}): is the tracking server up? "
                        "Not promoted") from exc
    except registry.RegistryError:
        raise
    except Exception as exc:  # connection errors surface as several types
        raise GateError(f"cannot reach the tracking store ({type(exc).__name__}: {exc}): not promoted") from exc

    # What is promoted must be what was evaluated, and every report must be the one its stage wrote.
    tags = dict(registered.tags or {})
    evaluated = (candidate.get("model") or {}).get("checkpoint_sha256")
    evidence = {
        "metrics.json": {"file": file_sha256(args.metrics), "evaluate record": record.get("metrics_sha256"),
                         "mlflow run": run_tags.get(TAG_METRICS_SHA)},
        "baseline_metrics.json": {"file": file_sha256(args.baseline_metrics),
                                  "evaluate record": record.get("baseline_metrics_sha256"),
                                  "mlflow run": run_tags.get(TAG_BASELINE_SHA)},
        "candidate checkpoint": {"metrics": evaluated, "train report": train_report.get("checkpoint_sha256"),
                                 "registry tag": tags.get(registry.TAG_SHA), "registered artifact": served},
    }
    if thresholds.require_inspection and inspection_path.is_file():
        # a missing report fails poison_suspects/backdoor_scan closed; a present one must be the one inspect wrote
        evidence["inspect.json"] = {"file": file_sha256(inspection_path), "mlflow run": run_tags.get(TAG_INSPECT_SHA)}
    integrity = [
        champion_check(registry.champion_problem(current)),
        evidence_check(evidence),
        lineage_check(train_report, {**tags, "checkpoint_sha256": tags.get(registry.TAG_SHA)}),
    ]
    checks = evaluate_gate(candidate, baseline, validated, train_report, champion, thresholds,
                           prior_verdict=tags.get(registry.TAG_VERDICT), integrity=integrity,
                           detection=inspection_checks(inspection, train_report, thresholds))
    report = verdict(checks, baseline.get("baseline") or {}, model)
    report["champion"] = {"before": champion, "after": champion}
    if current is not None and registry.champion_problem(current):
        report["next_step"] = registry.fix_hint(name)
    if report["passed"]:
        if champion == str(version):
            report["promotion"] = f"v{version} already champion"
        else:
            report["champion"]["after"] = str(version)
            report["promotion"] = f"champion: {_v(champion)} -> v{version}"
    elif champion == str(version):
        # Re-judged after its promotion (e.g. thresholds tightened): report it, but the live
        # champion is neither demoted nor tagged as blocked here; a person decides.
        report["promotion"] = f"v{version} is the champion and fails these checks now; alias left in place"
    else:
        report["promotion"] = f"not promoted; champion stays {_v(champion)}"
    exp_id = client.get_run(run_id).info.experiment_id
    report["links"] = _links(exp_id, run_id, name, str(version))
    ctx = {"client": client, "name": name, "version": str(version), "run_id": run_id, "champion": champion,
           "served": served, "data": cfg.data.name, "attack": train_report.get("attack") or {}}
    return report, 0 if report["passed"] else 1, ctx


def _links(experiment_id: str, run_id: str, name: str, version: str) -> dict[str, Optional[str]]:
    """MLflow UI links: the server's own address when tracking over HTTP (it serves the UI), or
    ``POISONGATE_MLFLOW_UI`` (e.g. http://127.0.0.1:5000 for `mlflow ui` on a sqlite store)."""
    import os

    from pipeline.reporting import mlflow_links
    from pipeline.tracking.runs import tracking_uri

    uri = tracking_uri()
    ui = os.environ.get("POISONGATE_MLFLOW_UI") or (uri if uri.startswith(("http://", "https://")) else None)
    if ui:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(ui)  # never a password in a printed link
        ui = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    return mlflow_links(ui, experiment_id, run_id, name, version)


def publish(ctx: dict[str, Any], report: dict[str, Any], args: argparse.Namespace) -> None:
    """Put the verdict where reviewers look, then (only on a pass) move `champion`: the alias is
    the very last write, so a promotion never exists without its record."""
    from pipeline.tracking import registry

    client, name, version, run_id = ctx["client"], ctx["name"], ctx["version"], ctx["run_id"]
    passed_ = bool(report["passed"])
    verdict_word = "passed" if passed_ else "blocked"
    _log_to_run(client, run_id, report)
    attack = (ctx["attack"] or {}).get("name", "none")
    client.update_run(run_id, name=f"{ctx['data']}-{attack}-v{version}-{verdict_word}-{run_id[:6]}")
    description = _description(report)
    client.set_tag(run_id, "mlflow.note.content", description)  # the run page's description
    from pipeline.tracking.runs import log_artifacts

    log_artifacts(run_id, [args.report, args.summary, args.html, args.summary_metrics], artifact_path="gate")
    log_artifacts(run_id, [args.validation], artifact_path="validation")
    if Path(args.docs).is_dir():
        client.log_artifacts(run_id, str(args.docs), artifact_path="validation/gx")
    client.update_model_version(name, version, description=description[:4900])
    if passed_:
        if ctx["champion"] != version:
            registry.promote(client, name, version, ctx["champion"], ctx["served"])
    elif ctx["champion"] != version:
        registry.block(client, name, version, [f"{c['name']}: {c['reason']}" for c in report["checks"]
                                               if not c["passed"]], ctx["served"])


def _description(report: dict[str, Any]) -> str:
    """The verdict summary shown as the run's and the version's description in the MLflow UI."""
    checks = report.get("checks") or []
    failed = [c for c in checks if not c["passed"]]
    base = report.get("baseline") or {}
    head = (f"**Release {'PASSED' if report['passed'] else 'BLOCKED'}**: {len(failed)} of {len(checks)} checks failed; "
            f"compared with the {base.get('kind', '?')} {_v(base.get('model_version')) if base.get('model_version') else ''}"
            .rstrip())
    lines = [head, ""]
    for c in failed:
        val = "-" if c["value"] is None else f"{c['value']:.4f}"
        thr = "-" if c["threshold"] is None else f"{c['threshold']:.4f}"
        lines.append(f"- `{c['name']}`: {val} vs {thr}: {c['reason']}")
    lines += ["", f"{report.get('promotion', '')}. Evidence: artifacts `gate/release.html`, `gate/gate.md`, "
              "`validation/validation.json`, `validation/gx/index.html`, `evaluation/plots/`."]
    return "\n".join(lines)


def _v(version: Optional[str]) -> str:
    return "none" if version is None else f"v{version}"


def _log_to_run(client: Any, run_id: str, report: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    from pipeline.tracking.runs import metric_key

    now = int(time.time() * 1000)
    metrics = [Metric("gate/passed", 1.0 if report["passed"] else 0.0, now, 0)]
    for c in report["checks"]:
        if c["value"] is not None:
            metrics.append(Metric(metric_key(f"gate/{c['name']}"), float(c["value"]), now, 0))
    if not any(m.key == "gate/max_recall_drop" for m in metrics):
        drops = [c["value"] for c in report["checks"] if c["name"].startswith("recall_drop[") and c["value"] is not None]
        if drops:
            metrics.append(Metric("gate/max_recall_drop", float(max(drops)), now, 0))
    client.log_batch(run_id, metrics=metrics)
    from pipeline.tracking import registry

    client.set_tag(run_id, registry.TAG_VERDICT, "passed" if report["passed"] else "blocked")
    client.set_tag(run_id, registry.TAG_FAILED, ", ".join(report["failed"])[:4900] or "none")


def show(path: Path, since: Optional[float], repro_rc: int) -> int:
    """After `make run`: the gate printed its verdict already, so only say where it is; when the
    pipeline stopped before the gate, say that (and nothing was promoted)."""
    stale = not path.is_file() or (since is not None and path.stat().st_mtime < since)
    if stale:
        if repro_rc == 0 and path.is_file():
            report = read_json(path)
            state = "PASSED" if report.get("passed") else "BLOCKED"
            print(f"RELEASE {state} (unchanged since the last run: see {path.with_name('gate.md')})")
            return 0 if report.get("passed") else 1
        print("RELEASE BLOCKED: the pipeline stopped before the gate (see the error above); nothing was promoted. "
              "The data gate's findings: reports/gx/index.html")
        return 1
    try:
        report = read_json(path)
    except (OSError, ValueError) as exc:
        print(f"RELEASE BLOCKED: {path} is unreadable ({exc}); nothing is known to be promoted.")
        return 1
    print(f"verdict above; the release report: {path.with_name('release.html')}")
    return 0 if report.get("passed") else 1


def run(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Judge, write the verdict (also when judging failed: fail closed), then raise on a block."""
    ctx = None
    try:
        report, rc, ctx = run_gate(cfg, args)
    except stage.UserError as exc:
        report, rc = verdict([], {}, {}, error=stage.redact(str(exc))), 2
    except Exception as exc:  # fail closed on anything unexpected, but say what it was
        report, rc = verdict([], {}, {}, error=stage.redact(f"unexpected {type(exc).__name__}: {exc}")), 2
    _write_all(args, report)
    if ctx is not None:
        try:
            publish(ctx, report, args)
        except Exception as exc:  # noqa: BLE001 - fail closed: no verdict record, no promotion
            report = {**report, "passed": False, "champion": {"before": ctx["champion"], "after": ctx["champion"]},
                      "error": stage.redact(f"could not record the verdict in MLflow ({type(exc).__name__}: {exc}): "
                                            "not promoted"),
                      "promotion": f"not promoted; champion stays {_v(ctx['champion'])}"}
            rc = 2
            _write_all(args, report)
    from pipeline.reporting.terminal import verdict_text

    print(verdict_text(report, links=report.get("links"), next_step=report.get("next_step")), flush=True)
    if rc == 2:
        raise GateError(report["error"])
    if rc == 1:
        if not cfg.gate.fail_on_block:
            stage.say("gate", "BLOCKED, exit 0 because gate.fail_on_block=false (the experiment is kept; "
                              "`champion` did not move)")
            return report
        raise ReleaseBlocked(f"{len(report['failed'])} check(s) failed: {', '.join(report['failed'])}; "
                             f"see {args.summary} and {args.html}")
    return report


def _write_all(args: argparse.Namespace, report: dict[str, Any]) -> None:
    atomic_write_text(Path(args.report), json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(args.summary), render_markdown(report))
    candidate, baseline = _try_json(args.metrics), _try_json(args.baseline_metrics)
    write_json(Path(args.summary_metrics), summary_metrics(report, candidate, baseline))
    _write_html(args, report, candidate, baseline)


def _try_json(path: str) -> Optional[dict]:
    try:
        return read_json(Path(path))
    except (OSError, ValueError):
        return None


def _write_html(args: argparse.Namespace, report: dict[str, Any], candidate: Optional[dict],
                baseline: Optional[dict]) -> None:
    """reports/release.html: verdict banner, failing checks, candidate vs baseline, the pictures."""
    from pipeline.reporting.html import render_release_html

    images = {}
    for caption, path in (("ASR per scan trigger and target (candidate | baseline)", Path(args.plots) / "asr_heatmap.png"),
                          ("Confusion under the worst trigger (rows: actual)", Path(args.plots) / "triggered_confusion.png"),
                          ("Samples: clean (top) and triggered (bottom)", Path(args.plots) / "triggered_samples.png"),
                          ("Clean confusion matrix (rows: actual)", Path(args.confusion_png))):
        if path.is_file():
            images[caption] = path.read_bytes()
    links = {**(report.get("links") or {}), "gate_md": "gate.md", "data_docs": "gx/index.html"}
    html = render_release_html(report if report.get("checks") or report.get("error") else None, candidate, baseline,
                               _try_json(args.validation), links, images)
    atomic_write_text(Path(args.html), html)


def _show_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--show", metavar="GATE_JSON", help="only print the verdict table of an existing report")
    ap.add_argument("--since", type=float, help="with --show: epoch seconds the pipeline run started")
    ap.add_argument("--repro-rc", type=int, default=0, help="with --show: exit code of `dvc repro`")


def main(argv: Optional[list[str]] = None) -> int:
    doc = __doc__.split("\n\n")[0]
    args, _ = stage.build_parser("gate", doc, PATHS, _show_options).parse_known_args(argv)
    if args.show:
        return show(Path(args.show), args.since, args.repro_rc)
    return stage.main("gate", run, PATHS, argv, doc, _show_options)


if __name__ == "__main__":
    raise SystemExit(main())
