"""Fast tier for the twin/train/evaluate stages: their mains, run in-process on a digits store
made by the real snapshot and poison stages, against a sqlite MLflow store in tmp_path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import config as config_mod
from pipeline.train import TrainError, check_validated

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 4


def write_params(dest: Path, *overrides: str) -> Path:
    cfg = config_mod.compose([f"train.epochs={EPOCHS}", "train.device=cpu", *overrides])
    p = dest / "params.yaml"
    p.write_text(config_mod.to_yaml(cfg))
    return p


def make_store(root: Path, *overrides: str) -> dict[str, Path]:
    """snapshot + poison stages (real mains) and a validated.json approving the view."""
    from pipeline import poison, snapshot

    root.mkdir(parents=True, exist_ok=True)
    params = write_params(root, *overrides)
    p = {
        "params": params, "store": root / "data/store", "pointer": root / "data/snapshot.json",
        "view": root / "data/view", "validated": root / "data/validated.json", "reports": root / "reports",
        "models": root / "models",
    }
    assert snapshot.main(["--params", str(params), "--store", str(p["store"]), "--pointer", str(p["pointer"]),
                          "--report", str(root / "reports/snapshot.json")]) == 0
    assert poison.main(["--params", str(params), "--pointer", str(p["pointer"]), "--store", str(p["store"]),
                        "--out", str(p["view"])]) == 0
    approve(p)
    return p


def approve(p: dict[str, Path], success: bool = True, on_fail: str = "stop", view_id: str | None = None) -> None:
    meta = json.loads((p["view"] / "view.json").read_text())
    p["validated"].write_text(json.dumps({"snapshot_id": meta["snapshot_id"], "view_id": view_id or meta["view_id"],
                                          "success": success, "on_fail": on_fail}))


def train_argv(p: dict[str, Path]) -> list[str]:
    r, m = p["reports"], p["models"]
    return ["--params", str(p["params"]), "--store", str(p["store"]), "--view", str(p["view"]),
            "--validated", str(p["validated"]), "--checkpoint", str(m / "candidate.pt"),
            "--report", str(r / "train.json"), "--history", str(r / "train_history.json")]


def twin_argv(p: dict[str, Path]) -> list[str]:
    return ["--params", str(p["params"]), "--store", str(p["store"]), "--pointer", str(p["pointer"]),
            "--checkpoint", str(p["models"] / "twin.pt"), "--report", str(p["reports"] / "twin.json")]


def evaluate_argv(p: dict[str, Path], suffix: str = "") -> list[str]:
    r = p["reports"]
    return ["--params", str(p["params"]), "--store", str(p["store"]), "--pointer", str(p["pointer"]),
            "--view", str(p["view"]), "--candidate", str(p["models"] / "candidate.pt"),
            "--twin", str(p["models"] / "twin.pt"), "--train-report", str(r / "train.json"),
            "--metrics", str(r / f"metrics{suffix}.json"),
            "--baseline-metrics", str(r / f"baseline_metrics{suffix}.json"),
            "--per-class", str(r / f"per_class{suffix}.csv"), "--confusion", str(r / f"confusion{suffix}.csv"),
            "--confusion-png", str(r / f"confusion{suffix}.png"), "--record", str(r / f"evaluate{suffix}.json"),
            "--plots", str(r / f"plots{suffix}")]


def run_pipeline(p: dict[str, Path]) -> None:
    from pipeline import evaluate, train, twin

    assert twin.main(twin_argv(p)) == 0
    assert train.main(train_argv(p)) == 0
    assert evaluate.main(evaluate_argv(p)) == 0


BACKDOOR = ("attack=backdoor", "attack.source=1", "attack.target=7", "attack.rate=0.1")


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    """A clean (attack none) digits store; tests copy it before changing anything."""
    return make_store(tmp_path_factory.mktemp("base"))


def copy_store(base: dict[str, Path], dest: Path) -> dict[str, Path]:
    src_root = base["params"].parent
    shutil.copytree(src_root, dest)
    return {k: dest / v.relative_to(src_root) for k, v in base.items()}


@pytest.fixture(scope="module")
def backdoor_run(tmp_path_factory):
    """The full twin -> train -> evaluate chain on a backdoored digits view (sqlite MLflow)."""
    root = tmp_path_factory.mktemp("bd")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    try:
        p = make_store(root, *BACKDOOR, "mlflow.system_metrics=false")
        run_pipeline(p)
        yield p
    finally:
        mp.undo()


# --------------------------------------------------------------------------- validation gate


def test_check_validated_rules():
    v = {"snapshot_id": "s", "view_id": "v", "success": True, "on_fail": "stop"}
    assert check_validated(v, "v", "s") is None
    with pytest.raises(TrainError, match="was not validated"):
        check_validated(v, "other", "s")
    with pytest.raises(TrainError, match="snapshot"):
        check_validated(v, "v", "other")
    with pytest.raises(TrainError, match="training refused"):
        check_validated({**v, "success": False}, "v", "s")
    assert "FAILED" in check_validated({**v, "success": False, "on_fail": "warn"}, "v", "s")
    with pytest.raises(TrainError, match="lacks"):
        check_validated({"view_id": "v"}, "v", "s")


def test_train_refuses_unvalidated_or_failed_view(base_store, tmp_path, capsys):
    from pipeline import train

    p = copy_store(base_store, tmp_path / "r")
    approve(p, view_id="f" * 64)
    assert train.main(train_argv(p)) == 1
    assert "was not validated" in capsys.readouterr().err
    approve(p, success=False, on_fail="stop")
    assert train.main(train_argv(p)) == 1
    assert "validation failed" in capsys.readouterr().err
    assert not (p["models"] / "candidate.pt").exists()
    p["validated"].unlink()
    assert train.main(train_argv(p)) == 1
    assert "run the validate stage" in capsys.readouterr().err


def test_tampered_sample_aborts_training(base_store, tmp_path, capsys):
    """One flipped pixel in a pack: load_training_view raises IntegrityError naming the row and
    the train stage exits 1 with that message, writing no checkpoint."""
    import pandas as pd

    from pipeline import train
    from pipeline.data import store
    from pipeline.data.view import load_training_view

    p = copy_store(base_store, tmp_path / "r")
    sid = store.read_pointer(p["pointer"])["snapshot_id"]
    man = store.read_manifest(p["store"], sid)
    row = man[man["split"] == "train"].iloc[5]
    pack = p["store"] / "packs" / f"{row['pack']}.npy"
    arr = np.load(pack)
    arr[int(row["pack_index"]), 4, 4, 0] ^= 0x01
    pack.chmod(0o644)
    np.save(pack, arr)
    with pytest.raises(store.IntegrityError, match=row["sample_id"]):
        load_training_view(p["view"], p["store"])
    assert train.main(train_argv(p)) == 1
    err = capsys.readouterr().err
    assert "error: integrity check failed" in err and row["sample_id"] in err
    assert not (p["models"] / "candidate.pt").exists()


def test_training_view_reads_only_the_train_rows(base_store, monkeypatch):
    """Issue 19 item 3: the train stage's load keeps the train split's rows and the columns they
    need, not the whole manifest (~1/3 of its peak at 1M rows); its rows and pixels are the full
    snapshot's train split."""
    from pipeline.data import store
    from pipeline.data.view import load_training_view

    sid = store.read_pointer(base_store["pointer"])["snapshot_id"]
    full = store.load_snapshot(base_store["store"], sid)
    train = (full.manifest["split"] == "train").to_numpy()
    seen = []
    real = store.load_snapshot
    monkeypatch.setattr(store, "load_snapshot", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    tv = load_training_view(base_store["view"], base_store["store"], lazy=True)
    assert len(seen[0].manifest) == train.sum() < len(train) and (seen[0].manifest["split"] == "train").all()
    assert "source_uri" not in seen[0].manifest.columns
    assert tv.sample_ids == full.manifest.loc[train, "sample_id"].tolist()
    assert np.array_equal(np.asarray(tv.images), full.images[train])


def test_evaluate_reads_only_the_test_split_and_checks_each_row_it_reads(backdoor_run, tmp_path, capsys):
    """Issue 19 item 2: evaluate reads the test rows only (the packs are not hashed whole) and
    checks each against its manifest sha256: a changed train row is not its business (training
    refuses it), a changed test row is refused, named."""
    from pipeline import evaluate
    from pipeline.data import store

    p = backdoor_run
    copy = tmp_path / "store"
    shutil.copytree(p["store"], copy)
    q = {**p, "store": copy}
    man = store.read_manifest(copy, store.read_pointer(p["pointer"])["snapshot_id"])

    def flip(row) -> None:
        pack = copy / "packs" / f"{row['pack']}.npy"
        pack.chmod(0o644)
        arr = np.load(pack)
        arr[int(row["pack_index"]), 4, 4, 0] ^= 0x01
        np.save(pack, arr)

    flip(man[man["split"] == "train"].iloc[3])
    assert evaluate.main(evaluate_argv(q, "_train_row_changed")) == 0
    got = json.loads((p["reports"] / "metrics_train_row_changed.json").read_text())
    assert got["accuracy"] == json.loads((p["reports"] / "metrics.json").read_text())["accuracy"]
    row = man[man["split"] == "test"].iloc[2]
    flip(row)
    assert evaluate.main(evaluate_argv(q, "_test_row_changed")) == 1
    err = capsys.readouterr().err
    assert "integrity check failed" in err and row["sample_id"] in err


def test_triggered_predictions_in_chunks_equal_one_pass_over_the_split():
    """Issue 19 item 3: evaluate gives the scan triggers to the test split a chunk at a time (lazy
    rows in, never a triggered copy of the whole split); the predictions equal one
    ``apply_trigger`` + ``predict`` over the whole split, random patch locations included."""
    import torch

    from pipeline import evaluate
    from pipeline.core.attacks import apply_trigger
    from pipeline.core.models import build_model
    from pipeline.core.predict import predict
    from pipeline.data.rows import LazyRows, file_identity

    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 8)
    x = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    raw = Path(__import__("tempfile").mkdtemp()) / "rows.u8"
    raw.write_bytes(x.tobytes())
    lazy = LazyRows([(raw, 0, 50, file_identity(raw))], np.zeros(50, np.int32), np.arange(50), (8, 8, 1))
    specs = [{"name": "r", "kind": "patch", "size": 2, "location": "random", "pattern": "noise", "seed": 3},
             {"name": "br", "kind": "patch", "size": 3, "location": "bottom_right", "pattern": "white", "seed": 0},
             {"name": "b", "kind": "blend", "size": 3, "location": "center", "pattern": "noise", "alpha": 0.2, "seed": 1}]
    for spec in specs:
        whole = predict(model, apply_trigger(x, spec), batch_size=16, device="cpu")
        for images in (x, lazy):
            got = evaluate.predict_triggered(model, images, spec, batch_size=16, device="cpu", chunk=7)
            assert np.array_equal(got, whole), spec["name"]
    # (the random patch's positions differ per row: the same seed drawn per chunk would repeat them)
    assert len({tuple(r) for r in evaluate._locations(50, (8, 8, 1), specs[0])}) > 10


# --------------------------------------------------------------------------- the chain


def test_checkpoint_and_train_report(backdoor_run):
    from safetensors.torch import load_file

    from pipeline.checkpoints import read_header

    p = backdoor_run
    ckpt = {**read_header(p["models"] / "candidate.pt"), "state_dict": load_file(p["models"] / "candidate.pt")}
    assert set(ckpt) >= {"state_dict", "model_args", "config", "snapshot_id", "view_id", "class_names", "kind"}
    assert ckpt["kind"] == "candidate" and ckpt["class_names"] == [str(i) for i in range(10)]
    assert ckpt["model_args"]["name"] == "small_cnn" and len(ckpt["model_args"]["mean"]) == 1
    assert ckpt["config"]["attack"]["name"] == "backdoor" and ckpt["config"]["train"]["epochs"] == EPOCHS
    rep = json.loads((p["reports"] / "train.json").read_text())
    for key in ("run_id", "experiment_id", "tracking_uri", "model_name", "model_version", "snapshot_id", "view_id",
                "checkpoint", "checkpoint_sha256"):
        assert rep[key], key
    assert rep["model_name"] == "poisongate-digits" and rep["view_id"] == ckpt["view_id"]
    hist = json.loads((p["reports"] / "train_history.json").read_text())
    assert [h["epoch"] for h in hist] == list(range(1, EPOCHS + 1))
    twin = json.loads((p["reports"] / "twin.json").read_text())
    assert twin["kind"] == "twin" and twin["snapshot_id"] == rep["snapshot_id"] and twin["view_id"] is None
    tw = read_header(p["models"] / "twin.pt")
    assert tw["kind"] == "twin" and tw["view_id"] is None


def test_metrics_reports(backdoor_run):
    p = backdoor_run
    m = json.loads((p["reports"] / "metrics.json").read_text())
    b = json.loads((p["reports"] / "baseline_metrics.json").read_text())
    rep = json.loads((p["reports"] / "train.json").read_text())
    for d in (m, b):
        assert set(d) >= {"accuracy", "per_class", "asr", "asr_max", "confusion", "model", "snapshot_id", "view_id",
                          "test_rows"}
        assert set(d["per_class"]) == {str(i) for i in range(10)}
        assert set(d["per_class"]["3"]) >= {"precision", "recall", "f1", "support"}
        assert set(d["asr"]) == {"patch_white_br", "patch_white_tl", "patch_checker_br", "blend_noise", "attack"}
        assert set(d["asr"]["attack"]) == {str(i) for i in range(10)} - {"1"}  # source 1: no 1 -> 1 rate
        assert d["asr_max"] == max(v for t in d["asr"].values() for v in t.values())
        assert np.asarray(d["confusion"]).sum() == d["test_rows"] == 450
    assert m["accuracy"] >= 0.9 and b["accuracy"] >= 0.9
    assert m["model"] == {"checkpoint_sha256": rep["checkpoint_sha256"], "model_version": rep["model_version"],
                          "run_id": rep["run_id"]}
    assert b["baseline"]["kind"] == "twin" and b["baseline"]["snapshot_id"] == rep["snapshot_id"]
    # the backdoor works on the candidate and not on the clean twin
    assert m["asr"]["attack"]["7"] > b["asr"]["attack"]["7"]
    rows = (p["reports"] / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 451
    assert (p["reports"] / "per_class.csv").read_text().startswith("class,precision,recall,f1,support")
    assert (p["reports"] / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_mlflow_run_contents(backdoor_run):
    from mlflow import MlflowClient

    p = backdoor_run
    rep = json.loads((p["reports"] / "train.json").read_text())
    client = MlflowClient(tracking_uri=rep["tracking_uri"])
    run = client.get_run(rep["run_id"])
    assert run.data.params["train.epochs"] == str(EPOCHS) and run.data.params["attack.name"] == "backdoor"
    tags = run.data.tags
    assert tags["snapshot_id"] == rep["snapshot_id"] and tags["view_id"] == rep["view_id"]
    assert tags["attack"] == "backdoor" and tags["git_commit"] and tags["dvc_lock_sha256"] == "absent"
    ds = run.inputs.dataset_inputs[0].dataset
    assert ds.digest == rep["view_id"][:36]  # the training view actually used, not the clean snapshot
    assert len(client.get_metric_history(rep["run_id"], "train/loss")) == EPOCHS
    for key in ("eval/accuracy", "eval/asr_max", "recall/7", "baseline/accuracy", "time/log_model_seconds"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(rep["run_id"], "evaluation")}
    assert "evaluation/metrics.json" in arts and "evaluation/confusion.png" in arts
    mv = client.get_model_version(rep["model_name"], rep["model_version"])
    assert mv.run_id == rep["run_id"] and mv.tags["checkpoint_sha256"] == rep["checkpoint_sha256"]


def test_champion_is_the_baseline_when_present(backdoor_run, monkeypatch):
    from mlflow import MlflowClient

    from pipeline import evaluate

    p = backdoor_run
    rep = json.loads((p["reports"] / "train.json").read_text())
    monkeypatch.chdir(p["params"].parent)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", rep["tracking_uri"])
    client = MlflowClient(tracking_uri=rep["tracking_uri"])
    client.set_registered_model_alias(rep["model_name"], "champion", rep["model_version"])
    try:
        assert evaluate.main(evaluate_argv(p, "_champ")) == 0
    finally:
        client.delete_registered_model_alias(rep["model_name"], "champion")
    b = json.loads((p["reports"] / "baseline_metrics_champ.json").read_text())
    m = json.loads((p["reports"] / "metrics_champ.json").read_text())
    assert b["baseline"] == {"kind": "champion", "model_version": rep["model_version"], "run_id": rep["run_id"],
                             "snapshot_id": rep["snapshot_id"]}
    assert b["accuracy"] == pytest.approx(m["accuracy"])  # the champion is this very model


def test_evaluate_refuses_a_stale_candidate(backdoor_run, tmp_path, capsys):
    from pipeline import evaluate

    p = dict(backdoor_run)
    rep = json.loads((p["reports"] / "train.json").read_text())
    r2 = tmp_path / "reports"
    r2.mkdir()
    (r2 / "train.json").write_text(json.dumps({**rep, "checkpoint_sha256": "0" * 64}))
    p["reports"] = r2
    assert evaluate.main(evaluate_argv(p)) == 2
    assert "re-run the train stage" in capsys.readouterr().err


def test_stage_modules_import_without_torch_or_mlflow():
    code = ("import sys, pipeline.train, pipeline.twin, pipeline.evaluate, pipeline.tracking; "
            "heavy = [m for m in ('torch', 'mlflow', 'sklearn', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
