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
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from gates.rules import Check, Thresholds, evaluate_gate, passed
from pipeline.config import ConfigError, load, model_name
from pipeline.io import atomic_write_text, read_json


class GateError(RuntimeError):
    """An error on the way to the verdict; the release fails closed."""


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


def summary_markdown(report: dict[str, Any]) -> str:
    head = "PASSED" if report["passed"] else "BLOCKED"
    lines = [f"# Release gate: {head}", ""]
    if report.get("error"):
        lines += [f"**Error:** {report['error']}", ""]
    base = report.get("baseline") or {}
    model = report.get("model") or {}
    lines += [
        f"- candidate: {model.get('model_name', '?')} v{model.get('model_version', '?')} (run {model.get('run_id', '?')})",
        f"- baseline: {base.get('kind', '?')} v{base.get('model_version', '-')} on snapshot {str(base.get('snapshot_id', '?'))[:12]}",
    ]
    promo = report.get("promotion")
    if promo:
        lines.append(f"- promotion: {promo}")
    lines += ["", "| check | value | threshold | passed | reason |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        val = "" if c["value"] is None else f"{c['value']:.4f}"
        thr = "" if c["threshold"] is None else f"{c['threshold']:.4f}"
        lines.append(f"| {c['name']} | {val} | {thr} | {'yes' if c['passed'] else '**no**'} | {c['reason']} |")
    return "\n".join(lines) + "\n"


def verdict_table(report: dict[str, Any]) -> str:
    rows = [("check", "value", "threshold", "ok", "reason")]
    for c in report.get("checks", []):
        rows.append((
            c["name"],
            "-" if c["value"] is None else f"{c['value']:.4f}",
            "-" if c["threshold"] is None else f"{c['threshold']:.4f}",
            "yes" if c["passed"] else "NO",
            c["reason"],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    head = "RELEASE PASSED" if report.get("passed") else "RELEASE BLOCKED"
    if report.get("error"):
        head += f": {report['error']}"
    promo = report.get("promotion")
    if promo:
        head += f"\n{promo}"
    return head + "\n" + "\n".join(out)


def _client(train_report: dict[str, Any]):
    # An outage must fail within seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    if train_report.get("tracking_uri") and train_report["tracking_uri"] != uri:
        raise GateError(
            f"the candidate was registered in {train_report['tracking_uri']} but MLFLOW_TRACKING_URI is {uri}: "
            "run the gate against the same store as train"
        )
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_gate(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    cfg = load(args.params)
    thresholds = Thresholds.from_config(cfg.gate)
    train_report = read_report(Path(args.train_report), "train report")
    name = train_report.get("model_name")
    if name != model_name(cfg):
        raise GateError(
            f"the train report registered model {name!r} but the config names {model_name(cfg)!r}: "
            "re-run `dvc repro` so train, evaluate and gate agree")
    candidate = read_report(Path(args.metrics), "candidate metrics")
    baseline = read_report(Path(args.baseline_metrics), "baseline metrics")
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

    from gates import promote

    try:
        client = _client(train_report)
        champion = promote.current_champion(client, name)
        registered = promote.registered_version(client, name, str(version))
    except MlflowException as exc:
        raise GateError(f"cannot read the registry ({exc.message.splitlines()[0]}): is the tracking server up? Not promoted") from exc
    except Exception as exc:  # connection errors surface as several types
        raise GateError(f"cannot reach the tracking store ({type(exc).__name__}: {exc}): not promoted") from exc

    # The version to promote must be the one trained in this run and measured in these metrics.
    tags = dict(registered.tags or {})
    sha = (candidate.get("model") or {}).get("checkpoint_sha256")
    if registered.run_id != run_id or tags.get("checkpoint_sha256") != sha:
        raise GateError(
            f"{name} v{version} in the registry was not produced by run {run_id} with the evaluated "
            "checkpoint: re-run `dvc repro --force train`")

    checks = evaluate_gate(candidate, baseline, validated, train_report, champion, thresholds,
                           prior_verdict=tags.get(promote.TAG_VERDICT))
    report = verdict(checks, baseline.get("baseline") or {}, model)
    try:
        # The verdict reaches the run before the alias moves: a promotion must never be left
        # without its record.
        _log_to_run(client, run_id, report)
        if report["passed"]:
            if champion == str(version):
                report["promotion"] = f"v{version} already champion"
            else:
                promote.promote(client, name, str(version), champion)
                report["promotion"] = f"champion: v{champion or 'none'} -> v{version}"
        elif champion == str(version):
            # Re-judged after its promotion (e.g. thresholds tightened): report it, but the live
            # champion is neither demoted nor tagged as blocked here; a person decides.
            report["promotion"] = f"v{version} is the champion and fails these checks now; alias left in place"
        else:
            promote.block(client, name, str(version), [f"{c.name}: {c.reason}" for c in checks if not c.passed])
            report["promotion"] = f"not promoted; champion stays v{champion or 'none'}"
    except Exception as exc:
        raise GateError(f"could not record the verdict in MLflow ({type(exc).__name__}: {exc}): not promoted") from exc
    return report, 0 if report["passed"] else 1


def _log_to_run(client: Any, run_id: str, report: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    from pipeline.tracking import metric_key

    now = int(time.time() * 1000)
    metrics = [Metric("gate_passed", 1.0 if report["passed"] else 0.0, now, 0)]
    for c in report["checks"]:
        if c["value"] is not None:
            metrics.append(Metric(metric_key(f"gate.{c['name']}"), float(c["value"]), now, 0))
    client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, "gate.verdict", "passed" if report["passed"] else "blocked")
    client.set_tag(run_id, "gate.failed_checks", ", ".join(report["failed"])[:4900] or "none")


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
    print(verdict_table(report))
    return 0 if report.get("passed") else 1


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.gate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="reports/metrics.json")
    ap.add_argument("--baseline-metrics", default="reports/baseline_metrics.json")
    ap.add_argument("--validated", default="data/validated.json")
    ap.add_argument("--train-report", default="reports/train.json")
    ap.add_argument("--report", default="reports/gate.json")
    ap.add_argument("--summary", default="reports/gate.md")
    ap.add_argument("--show", metavar="GATE_JSON", help="only print the verdict table of an existing report")
    ap.add_argument("--since", type=float, help="with --show: epoch seconds the pipeline run started")
    ap.add_argument("--repro-rc", type=int, default=0, help="with --show: exit code of `dvc repro`")
    args = ap.parse_args(argv)
    if args.show:
        return show(Path(args.show), args.since, args.repro_rc)

    try:
        report, rc = run_gate(args)
    except (GateError, ConfigError) as exc:
        report, rc = verdict([], {}, {}, error=str(exc)), 2
    except Exception as exc:  # fail closed on anything unexpected, but say what it was
        report, rc = verdict([], {}, {}, error=f"unexpected {type(exc).__name__}: {exc}"), 2
    atomic_write_text(Path(args.report), json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(args.summary), summary_markdown(report))
    print(verdict_table(report), file=sys.stderr if rc else sys.stdout)
    if rc == 2:
        print(f"error: {report['error']}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
