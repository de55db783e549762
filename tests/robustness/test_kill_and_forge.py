"""Issue 16, the families left after the first suite: kill -9 during train, evaluate and gate,
and a data-gate record forged to "passed" for the very view it refused.

Each kill parks the stage at one chosen write (a shim replaces that function with one that marks
the moment and sleeps), so SIGKILL lands there deterministically. Each case asserts the exit code,
that nothing was lost (`champion`, the registry's versions, the store's bytes) and that the next
run recovers: the gate then judges the real candidate and promotes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, STAGE_ARGS

pytestmark = pytest.mark.robustness

_SHIM = """
import functools, os, sys, time
from pathlib import Path
import importlib

stage, target, when, mark = sys.argv[1], os.environ["PARK_AT"], os.environ.get("PARK_WHEN", ""), os.environ["PARK_MARK"]
mod_name, attr = target.rsplit(":", 1)
owner_path, _, cls = mod_name.partition("#")
owner = importlib.import_module(owner_path)
if cls:
    owner = getattr(owner, cls)
real = getattr(owner, attr)

def park(*args, **kwargs):
    if not when or any(str(a).endswith(when) for a in args):
        Path(mark).write_text(target)
        time.sleep(120)
    return real(*args, **kwargs)

setattr(owner, attr, park)
if os.environ.get("LOCK_TTL"):  # a promotion lock a killed gate leaves behind expires soon
    import pipeline.tracking.lock as lock
    lock.promotion_lock = functools.partial(lock.promotion_lock, ttl_s=float(os.environ["LOCK_TTL"]))
mod = importlib.import_module("pipeline." + stage)
sys.exit(mod.main(sys.argv[2:]))
"""


def _kill_at(state, stage: str, target: str, when: str = "", lock_ttl: str = "") -> str:
    """Run ``stage`` in a subprocess, park it at ``target`` and SIGKILL it there; its stderr."""
    mark = state.root / "park.mark"
    env = {**os.environ, "MLFLOW_TRACKING_URI": state.uri, "PYTHONPATH": str(REPO), "PARK_AT": target,
           "PARK_WHEN": when, "PARK_MARK": str(mark), "LOCK_TTL": lock_ttl, "GX_ANALYTICS_ENABLED": "false"}
    argv = [sys.executable, "-c", _SHIM, stage, "--params", "params.yaml", *STAGE_ARGS[stage]]
    proc = subprocess.Popen(argv, cwd=state.root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not mark.exists():
        proc.kill()
        pytest.fail(f"{stage} never reached {target}: {proc.stderr.read().decode()[-3000:]}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    err = proc.stderr.read().decode()
    proc.stderr.close()
    mark.unlink()
    return err


def _before(state, digest) -> dict:
    return {"champion": state.champion(), "versions": state.versions(), "store": digest(state.root / "data/store")}


def _nothing_lost(state, digest, before: dict) -> None:
    assert state.champion() == before["champion"], "a killed stage moved champion"
    assert state.versions() == before["versions"], "a killed stage added or removed a version"
    assert digest(state.root / "data/store") == before["store"], "a killed stage changed the store"


def _release(state, *stages: str) -> None:
    for stage in stages:
        rc, out = state.run(stage)
        assert rc == 0, f"{stage} after the kill: {out[-3000:]}"


def test_kill_9_in_train_before_registering_then_rerun_promotes(released, digest):
    before = _before(released, digest)
    report = (released.root / "reports/train.json").read_bytes()
    _kill_at(released, "train", "pipeline.tracking.registry:register_checkpoint")
    _nothing_lost(released, digest, before)
    assert (released.root / "reports/train.json").read_bytes() == report  # the lineage record is not half-new
    _release(released, "train", "inspect", "evaluate", "gate")
    # the same config trains the same bytes: the existing version is reused, not a third one
    assert released.versions() == before["versions"] and released.champion() == "2"


def test_kill_9_in_evaluate_between_reports_then_the_gate_refuses_the_mix(released, digest):
    """A new candidate (v3) is trained; evaluate is killed after it wrote v3's metrics.json and
    before the baseline metrics and its record: a gate run on that mix fails closed (the metrics
    no longer match the recorded digests) and champion stays where it was."""
    released.compose("train.seed=2")
    _release(released, "train", "inspect")
    assert released.json("reports/train.json")["model_version"] == "3"
    record = (released.root / "reports/evaluate.json").read_bytes()
    before = _before(released, digest)
    _kill_at(released, "evaluate", "pipeline.evaluate:write_json", when="baseline_metrics.json")
    model = released.json("reports/metrics.json")["model"]
    assert str(model["model_version"]) == "3", model  # the kill landed after the candidate's metrics
    assert (released.root / "reports/evaluate.json").read_bytes() == record
    rc, out = released.run("gate")
    assert rc == 1 and "evidence_binding" in out, out[-3000:]
    _nothing_lost(released, digest, before)
    # v3 now carries that blocked verdict: a re-evaluation does not re-judge it (relaxed evidence
    # never promotes a blocked version); the message says how to get a new version.
    _release(released, "evaluate")
    rc, out = released.run("gate")
    assert rc == 1 and "not_previously_blocked" in out and "dvc repro --force train" in out, out[-3000:]
    _nothing_lost(released, digest, before)


def test_kill_9_in_gate_before_promotion_keeps_the_champion(released, digest):
    before = _before(released, digest)
    _kill_at(released, "gate", "pipeline.tracking.registry:promote")
    _nothing_lost(released, digest, before)
    _release(released, "gate")
    assert released.champion() == "2"


def test_kill_9_in_gate_holding_the_promotion_lock_then_rerun_breaks_the_expired_lock(released, digest):
    """Killed inside the lock, after the verdict tags and before the alias: champion has not moved;
    the lock it leaves expires (ttl 2 s here, 300 s by default) and the next gate breaks it."""
    before = _before(released, digest)
    _kill_at(released, "gate", "mlflow.tracking.client#MlflowClient:set_registered_model_alias", lock_ttl="2")
    _nothing_lost(released, digest, before)
    from pipeline.tracking.lock import read_lock

    held = read_lock(released.client(), "poisongate-digits")
    assert held is not None, "the killed gate held no lock: the kill landed outside the promotion"
    time.sleep(max(0.0, held.expires_s - time.time()) + 0.5)
    _release(released, "gate")
    assert released.champion() == "2"
    assert read_lock(released.client(), "poisongate-digits") is None, "the lock was not released"


def test_validated_json_forged_to_passed_for_the_refused_view_is_not_promoted(released, digest):
    """The data gate refuses a patched view; validated.json is then edited to "passed" for that
    same view (so train accepts it). The release gate finds no approval of the view in the ledger."""
    released.compose("train.seed=1", "attack=backdoor", "attack.source=1", "attack.target=7", "attack.rate=0.1")
    assert released.run("poison")[0] == 0
    rc, out = released.run("validate")
    assert rc == 1, out[-2000:]
    vpath = released.root / "data/validated.json"
    forged = {**json.loads(vpath.read_text()), "success": True}
    vpath.write_text(json.dumps(forged))
    before = _before(released, digest)
    _release(released, "train", "evaluate")
    rc, out = released.run("gate")
    assert rc == 1 and "data_validation" in out and "ledger" in out, out[-3000:]
    assert released.champion() == before["champion"]
    assert digest(released.root / "data/store") == before["store"]
    gate = released.json("reports/gate.json")
    assert not gate["passed"] and any(c.startswith("data_validation") for c in gate["failed"])


@pytest.mark.smoke
def test_two_dvc_repro_at_once_the_second_is_refused_and_nothing_is_lost(tmp_path):
    """A second `dvc repro` in the same working copy while one runs: DVC's repository lock refuses
    it at once (non-zero, naming the lock), and the first run completes unharmed. Both target the
    data gate (snapshot, twin, poison, validate): the lock is the repository's, whatever the target,
    and the stages after it would only add a training to the test."""
    from tests.conftest import BIN, make_repo_copy

    repo = make_repo_copy(tmp_path)
    repo.compose()  # the smoke recipe: the lock, not the defaults' epochs, is what is tested here
    first = subprocess.Popen([str(BIN / "dvc"), "repro", "validate"], cwd=repo.root, env=repo.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (repo.root / "data/snapshot.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # the first run is past its start, holding the lock
        assert first.poll() is None, "the first run ended before the second could start"
        second = repo.repro("validate", check=False)
        assert second.returncode != 0
        assert "lock" in (second.stdout + second.stderr).lower(), second.stdout[-2000:] + second.stderr[-2000:]
        out, err = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:] + err[-3000:]
    validation = repo.json("reports/validation.json")
    assert validation["success"] is True
    assert validation["snapshot_id"] == json.loads((repo.root / "data/snapshot.json").read_text())["snapshot_id"]
    assert repo.json("data/validated.json")["success"] is True
