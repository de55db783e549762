"""Stage `gate`: the release verdict, and the only promotion to `champion`.

Reads the candidate's and the baseline's metrics, the data-validation record and the train
report; applies the pure rules in gates.rules; writes reports/gate.json and a markdown summary;
logs the verdict to the candidate's MLflow run; on pass moves the registry alias `champion` to the
candidate's version, on fail tags the version with the failed checks and exits 1.

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
from pipeline.io import atomic_write_text, read_json
from pipeline.schema import Config, model_name

PATHS = (
    stage.PathArg("metrics", "the candidate's metrics", default="reports/metrics.json"),
    stage.PathArg("baseline_metrics", "the baseline's metrics", default="reports/baseline_metrics.json"),
    stage.PathArg("validated", "the data gate's record", default="data/validated.json"),
    stage.PathArg("train_report", "the train report and lineage record", default="reports/train.json"),
    stage.PathArg("evaluation", "the evaluate stage's record of the metrics digests", default="reports/evaluate.json"),
    stage.PathArg("report", "the verdict to write", default="reports/gate.json"),
    stage.PathArg("summary", "the verdict as markdown", default="reports/gate.md"),
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


def _cells(c: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return (c["name"], "-" if c["value"] is None else f"{c['value']:.4f}",
            "-" if c["threshold"] is None else f"{c['threshold']:.4f}", "pass" if c["passed"] else "FAIL", c["reason"])


def render_verdict(report: dict[str, Any], markdown: bool = False) -> str:
    """The verdict as text for the terminal, or as markdown for reports/gate.md (one renderer)."""
    head = "PASSED" if report.get("passed") else "BLOCKED"
    checks = report.get("checks", [])
    rows = [_cells(c) for c in checks]
    base = report.get("baseline") or {}
    model = report.get("model") or {}
    if markdown:
        lines = [f"# Release gate: {head}", ""]
        if report.get("error"):
            lines += [f"**Error:** {report['error']}", ""]
        lines += [
            f"- candidate: {model.get('model_name', '?')} v{model.get('model_version', '?')} (run {model.get('run_id', '?')})",
            f"- baseline: {base.get('kind', '?')} v{base.get('model_version', '-')} on snapshot {str(base.get('snapshot_id', '?'))[:12]}",
        ]
        if report.get("promotion"):
            lines.append(f"- promotion: {report['promotion']}")
        lines += ["", "| check | value | threshold | passed | reason |", "|---|---|---|---|---|"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]} | {'yes' if r[3] == 'pass' else '**no**'} | {r[4]} |" for r in rows]
        return "\n".join(lines) + "\n"
    out = [f"RELEASE {head}" + (f": {report['error']}" if report.get("error") else "")]
    if report.get("promotion"):
        out.append(report["promotion"])
    table = [("check", "value", "threshold", "ok", "reason"), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    out += ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in table]
    return "\n".join(out)


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
    from gates.rules import champion_check, evidence_check, lineage_check
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
    version = train_report.get("model_version")
    run_id = train_report.get("run_id")
    if not version or not run_id:
        raise GateError("train report names no registered model version or run: re-run `dvc repro --force train`")
    model = {"model_name": name, "model_version": str(version), "run_id": run_id}

    from mlflow.exceptions import MlflowException

    from pipeline.tracking import registry
    from pipeline.tracking.runs import TAG_BASELINE_SHA, TAG_METRICS_SHA

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
    integrity = [
        champion_check(registry.champion_problem(current)),
        evidence_check({
            "metrics.json": {"file": file_sha256(args.metrics), "evaluate record": record.get("metrics_sha256"),
                             "mlflow run": run_tags.get(TAG_METRICS_SHA)},
            "baseline_metrics.json": {"file": file_sha256(args.baseline_metrics),
                                      "evaluate record": record.get("baseline_metrics_sha256"),
                                      "mlflow run": run_tags.get(TAG_BASELINE_SHA)},
            "candidate checkpoint": {"metrics": evaluated, "train report": train_report.get("checkpoint_sha256"),
                                     "registry tag": tags.get(registry.TAG_SHA), "registered artifact": served},
        }),
        lineage_check(train_report, {**tags, "checkpoint_sha256": tags.get(registry.TAG_SHA)}),
    ]
    checks = evaluate_gate(candidate, baseline, validated, train_report, champion, thresholds,
                           prior_verdict=tags.get(registry.TAG_VERDICT), integrity=integrity)
    report = verdict(checks, baseline.get("baseline") or {}, model)
    report["champion"] = {"before": champion, "after": champion}
    if current is not None and registry.champion_problem(current):
        report["next_step"] = registry.fix_hint(name)
    try:
        # The verdict reaches the run before the alias moves: a promotion must never be left
        # without its record.
        _log_to_run(client, run_id, report)
        if report["passed"]:
            if champion == str(version):
                report["promotion"] = f"v{version} already champion"
            else:
                registry.promote(client, name, str(version), champion, served)
                report["champion"]["after"] = str(version)
                report["promotion"] = f"champion: {_v(champion)} -> v{version}"
        elif champion == str(version):
            # Re-judged after its promotion (e.g. thresholds tightened): report it, but the live
            # champion is neither demoted nor tagged as blocked here; a person decides.
            report["promotion"] = f"v{version} is the champion and fails these checks now; alias left in place"
        else:
            registry.block(client, name, str(version), [f"{c.name}: {c.reason}" for c in checks if not c.passed],
                           served)
            report["promotion"] = f"not promoted; champion stays {_v(champion)}"
    except registry.PromotionConflict:
        raise
    except Exception as exc:
        raise GateError(f"could not record the verdict in MLflow ({type(exc).__name__}: {exc}): not promoted") from exc
    return report, 0 if report["passed"] else 1


def _v(version: Optional[str]) -> str:
    return "none" if version is None else f"v{version}"


def _log_to_run(client: Any, run_id: str, report: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    from pipeline.tracking.runs import metric_key

    now = int(time.time() * 1000)
    metrics = [Metric("gate_passed", 1.0 if report["passed"] else 0.0, now, 0)]
    for c in report["checks"]:
        if c["value"] is not None:
            metrics.append(Metric(metric_key(f"gate.{c['name']}"), float(c["value"]), now, 0))
    client.log_batch(run_id, metrics=metrics)
    from pipeline.tracking import registry

    client.set_tag(run_id, registry.TAG_VERDICT, "passed" if report["passed"] else "blocked")
    client.set_tag(run_id, registry.TAG_FAILED, ", ".join(report["failed"])[:4900] or "none")


def show(path: Path, since: Optional[float], repro_rc: int) -> int:
    """Print the verdict table after `make run`; say so when the pipeline stopped before the gate."""
    stale = not path.is_file() or (since is not None and repro_rc != 0 and path.stat().st_mtime < since)
    if stale:
        print("RELEASE BLOCKED: the pipeline stopped before the gate (see the error above); nothing was promoted.")
        return 1
    try:
        report = read_json(path)
    except (OSError, ValueError) as exc:
        print(f"RELEASE BLOCKED: {path} is unreadable ({exc}); nothing is known to be promoted.")
        return 1
    print(render_verdict(report))
    return 0 if report.get("passed") else 1


def run(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Judge, write the verdict (also when judging failed: fail closed), then raise on a block."""
    try:
        report, rc = run_gate(cfg, args)
    except stage.UserError as exc:
        report, rc = verdict([], {}, {}, error=stage.redact(str(exc))), 2
    except Exception as exc:  # fail closed on anything unexpected, but say what it was
        report, rc = verdict([], {}, {}, error=stage.redact(f"unexpected {type(exc).__name__}: {exc}")), 2
    atomic_write_text(Path(args.report), json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(args.summary), render_verdict(report, markdown=True))
    print(render_verdict(report), file=sys.stderr if rc else sys.stdout)
    if rc == 2:
        raise GateError(report["error"])
    if rc == 1:
        raise ReleaseBlocked(f"{len(report['failed'])} check(s) failed: {', '.join(report['failed'])}; "
                             f"see {args.summary}")
    return report


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
