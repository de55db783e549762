"""Smoke tier: the real `dvc repro` in a temp copy of the repo (digits, CPU), a real sqlite MLflow
store and registry. The release gate blocks poisoned candidates and promotes clean ones."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, RepoCopy, make_repo_copy

pytestmark = pytest.mark.smoke


def champion(repo: RepoCopy, name: str = "poisongate-digits") -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=repo.tracking_uri, registry_uri=repo.tracking_uri)
    try:
        version = client.get_registered_model(name).aliases.get("champion")
    except MlflowException:
        return None
    return None if version is None else str(version)


def version_tags(repo: RepoCopy, version: str, name: str = "poisongate-digits") -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=repo.tracking_uri, registry_uri=repo.tracking_uri)
    return dict(client.get_model_version(name, version).tags)


def failed_checks(repo: RepoCopy) -> set[str]:
    gate = repo.json("reports/gate.json")
    return {c["name"] for c in gate["checks"] if not c["passed"]}


def test_release_gate_blocks_poison_and_promotes_clean(tmp_path):
    repo = make_repo_copy(tmp_path)

    # 1. Clean run: passes against the clean twin, champion set. The README's `make run` on the
    #    shipped defaults, whole (no smoke-tier shortcuts): no false block at the defaults. The
    #    attempts below use the smoke recipe (conftest.SMOKE_DEFAULTS) against this champion.
    repo.compose(full=True)
    repo.repro()
    gate = repo.json("reports/gate.json")
    assert gate["passed"] is True, gate
    assert gate["baseline"]["kind"] == "twin"
    first = repo.json("reports/train.json")["model_version"]
    assert champion(repo) == str(first)
    # No stage is recorded in DVC's run cache: an old verdict can never be restored from it.
    runs = repo.root / ".dvc" / "cache" / "runs"
    assert not runs.exists() or not any(p.is_file() for p in runs.rglob("*"))
    # Resume/re-run: a second `dvc repro` re-runs nothing but the two always_changed stages: the
    # snapshot stage's own check of the source (which changes nothing) and the gate, which
    # re-checks the registry (the champion lives outside DVC) and promotes nothing new.
    again = repo.repro()
    assert re.findall(r"Running stage '([\w-]+)'", again.stdout) == ["snapshot", "gate"], again.stdout
    assert "stays current" in again.stderr
    assert repo.json("reports/gate.json")["passed"] is True and champion(repo) == str(first)

    # The verdict is in DVC's own comparisons: commit this (passed) state's small summary metrics;
    # the blocked attempt below shows as passed True -> False in `dvc metrics diff`.
    assert repo.json("reports/summary.json")["verdict"] == "passed"
    repo.run(["git", "add", "-A"])
    repo.run(["git", "-c", "user.email=ci@poisongate", "-c", "user.name=ci", "commit", "-qm", "clean release"])

    # 2. Label flip 40% of class 1 -> 7, data gate in warn mode: blocked on class-1 recall drift.
    repo.compose("attack=label_flip", "attack.source=1", "attack.target=7", "attack.rate=0.4", "validate.on_fail=warn")
    proc = repo.repro(check=False)
    assert proc.returncode != 0
    failed = failed_checks(repo)
    assert "recall_drop[1]" in failed, repo.json("reports/gate.json")
    assert repo.json("reports/gate.json")["baseline"]["kind"] == "champion"
    flipped = repo.json("reports/train.json")["model_version"]
    assert champion(repo) == str(first)
    tags = version_tags(repo, str(flipped))
    assert tags["poisongate.verdict"] == "blocked" and "recall_drop[1]" in tags["poisongate.failed_checks"]
    assert repo.json("reports/summary.json")["verdict"] == "blocked"
    diff = json.loads(repo.run([str(BIN / "dvc"), "metrics", "diff", "--json"]).stdout)
    summary = diff.get("reports/summary.json") or {}
    assert summary.get("passed", {}).get("old") is True and summary.get("passed", {}).get("new") is False, diff
    repo.run(["git", "add", "-A"])
    repo.run(["git", "-c", "user.email=ci@poisongate", "-c", "user.name=ci", "commit", "-qm", "flip attempt"])

    # 3. Backdoor as the README's red-team experiment: 3x3 white corner patch on 10% of class 1 -> 7,
    #    blocked on ASR, and KEPT as an experiment (gate.fail_on_block=false: exit 0, champion unchanged).
    proc = repo.run([str(BIN / "dvc"), "exp", "run", "-n", "redteam-backdoor", "-S", "attack=backdoor",
                     "-S", "attack.source=1", "-S", "attack.target=7", "-S", "attack.rate=0.1",
                     "-S", "validate.on_fail=warn", "-S", "gate.fail_on_block=false"])
    failed = failed_checks(repo)
    assert {"asr_max", "asr_increase"} <= failed, repo.json("reports/gate.json")
    assert champion(repo) == str(first)
    exps = json.loads(repo.run([str(BIN / "dvc"), "exp", "show", "--json"]).stdout)
    text = json.dumps(exps)
    assert "redteam-backdoor" in text and '"verdict": "blocked"' in text and '"asr_max"' in text

    # The self-contained release report renders in a real browser with no network.
    html = repo.root / "reports/release.html"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}", "--dump-dom",
                              html.as_uri()], capture_output=True, text=True, timeout=120).stdout
        assert "BLOCKED" in dom and "asr_max" in dom
    else:  # .ci/run installs chromium; say so when a developer's machine lacks it
        print("chromium not installed: the release.html browser check was skipped")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import urllib.request

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("mlflow server did not answer /health within 90 s")


def test_gate_fails_closed(tmp_path):
    repo = make_repo_copy(tmp_path)
    port = _free_port()
    repo.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    try:
        # A first candidate that would pass, up to the gate (no champion yet: every refusal below
        # must leave it so).
        repo.compose()
        repo.repro("evaluate", "inspect")  # the gate's two inputs (inspect is not an ancestor of evaluate)
        assert champion(repo) is None
        gate_cmd = [sys.executable, "-m", "pipeline.gate"]

        # A corrupted metrics file: blocked with a clear message, nothing promoted.
        metrics = repo.root / "reports/metrics.json"
        good = metrics.read_text()
        metrics.write_text(good[: len(good) // 2])
        proc = repo.run(gate_cmd, check=False)
        assert proc.returncode == 2 and "metrics" in proc.stderr and "unreadable" in proc.stderr
        assert repo.json("reports/gate.json")["passed"] is False
        assert champion(repo) is None
        metrics.write_text(good)

        # No baseline metrics: the gate refuses.
        base = repo.root / "reports/baseline_metrics.json"
        kept = base.read_text()
        base.unlink()
        proc = repo.run(gate_cmd, check=False)
        assert proc.returncode == 2 and "baseline metrics" in proc.stderr
        assert champion(repo) is None
        base.write_text(kept)
    finally:
        server.terminate()
        server.wait(timeout=30)

    # An unreachable tracking server: blocked, nothing promoted.
    proc = repo.run(gate_cmd, check=False, timeout=300)
    assert proc.returncode == 2 and "tracking" in proc.stderr.lower()
    assert repo.json("reports/gate.json")["passed"] is False
    server = _start_server(tmp_path, port)
    try:
        assert champion(repo) is None
        # With the server back the same candidate passes: the refusals above were not verdicts.
        proc = repo.run(gate_cmd, check=False)
        assert proc.returncode == 0, proc.stderr
        first = champion(repo)
        assert first == str(repo.json("reports/train.json")["model_version"])

        # A missing baseline model: the champion's artifacts are gone. A candidate is not compared
        # against the weaker twin instead: evaluate refuses and nothing is promoted. (evaluate is
        # forced on the current candidate: a retrained one would take the same path, at the cost
        # of a training.)
        shutil.rmtree(tmp_path / "artifacts")
        proc = repo.repro("--force", "--single-item", "evaluate", check=False)
        assert proc.returncode != 0
        assert f"champion poisongate-digits v{first} could not be loaded" in proc.stderr + proc.stdout
        assert champion(repo) == first
    finally:
        server.terminate()
        server.wait(timeout=30)
