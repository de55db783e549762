"""A real `mlflow server` on 127.0.0.1: the train and evaluate stages log to it over HTTP
(artifacts proxied by the server), and the run, metrics, artifacts and registered version are
read back through MlflowClient. The server is always killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_train_eval import BACKDOOR, EPOCHS, evaluate_argv, make_store, train_argv, twin_argv

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S} s: "
                            f"{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        log.close()


def test_train_and_evaluate_against_a_real_server(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline import evaluate, train, twin

    root = tmp_path / "repo"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # a few-epoch digits run can end inside the 2 s sampling period on an idle box: sample faster
    from pipeline.tracking import runs as runs_mod

    monkeypatch.setattr(runs_mod, "SYSTEM_METRICS_INTERVAL_S", 0.2)
    p = make_store(root, *BACKDOOR)  # system metrics on (psutil)
    monkeypatch.chdir(root)
    assert twin.main(twin_argv(p)) == 0
    assert train.main(train_argv(p)) == 0
    assert evaluate.main(evaluate_argv(p)) == 0

    rep = json.loads((p["reports"] / "train.json").read_text())
    assert rep["tracking_uri"] == mlflow_server
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(rep["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["snapshot_id"] == rep["snapshot_id"] and run.data.tags["attack"] == "backdoor"
    assert run.data.params["model.name"] == "small_cnn"
    ds = run.inputs.dataset_inputs[0].dataset
    assert ds.digest == rep["view_id"][:36]  # the training view used
    assert json.loads(ds.schema)["mlflow_colspec"] == [
        {"type": "string", "name": "sample_id", "required": True}, {"type": "long", "name": "label", "required": True},
        {"type": "boolean", "name": "poisoned", "required": True}]
    assert json.loads(ds.profile) == {"num_rows": rep["train_rows"], "num_elements": 3 * rep["train_rows"]}
    metrics = json.loads((p["reports"] / "metrics.json").read_text())
    assert run.data.metrics["eval/accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.metrics["eval/asr_max"] == pytest.approx(metrics["asr_max"])
    assert len(client.get_metric_history(rep["run_id"], "train/loss")) == EPOCHS
    assert any(k.startswith("system/") for k in run.data.metrics)  # mlflow.system_metrics: true
    # artifacts went through the server's proxy into --artifacts-destination
    arts = {a.path for a in client.list_artifacts(rep["run_id"], "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/per_class.csv", "evaluation/confusion.png"} <= arts
    local = client.download_artifacts(rep["run_id"], "evaluation/metrics.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["accuracy"] == metrics["accuracy"]
    assert any((tmp_path / "artifacts").rglob("metrics.json"))
    # the registered version, and the model it serves
    versions = client.search_model_versions(f"name='{rep['model_name']}'")
    assert [v.version for v in versions] == [rep["model_version"]] == ["1"]
    mv = versions[0]
    assert mv.run_id == rep["run_id"] and mv.tags["snapshot_id"] == rep["snapshot_id"]
    from pipeline.core.predict import predict
    from pipeline.data import store
    from pipeline.tracking import registry

    model, _ = registry.load_version(client, rep["model_name"], "1")  # digest-verified, no pickle
    snap = store.load_snapshot(p["store"], rep["snapshot_id"])
    x, y, _ = snap.split("test")
    assert float((predict(model, x, device="cpu") == y).mean()) == pytest.approx(metrics["accuracy"])
