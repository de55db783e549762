"""Shared fixtures. The smoke tier copies the repository into a temp folder and runs the real
`dvc repro` there against a real sqlite MLflow store; nothing is mocked."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# What a fresh clone would not have: build outputs, local stores, caches.
_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "mlflow.db", "mlruns", "mlartifacts",
    "reports", "models", ".gpu", "outputs", "multirun", "tmp",
)


def _copy_repo(dest: Path) -> None:
    shutil.copytree(REPO, dest, ignore=_IGNORE)
    data = dest / "data"
    for child in data.iterdir():
        if child.name not in ("README.md", "quarantine.json"):  # the git-tracked files of data/
            shutil.rmtree(child) if child.is_dir() else child.unlink()


# The smoke tier's recipe: every stage still runs for real, on 4 epochs (digits passes its gate
# from 4: test_clean_growth_is_promoted_at_every_append_and_a_poisoned_batch_is_not) and without cleanlab's 3-fold retraining
# (~40% of the inspect stage). The first release of test_release_gate_blocks_poison_and_promotes_clean
# keeps the defaults whole (`compose(full=True)`): the shipped configuration, end to end, passes.
# Clean appends with cleanlab on are measured by bench/redteam.py --placement append. On 2 CI
# cores this recipe is what brings `make test` near 15 minutes (README, "Measured").
SMOKE_DEFAULTS = ("train.epochs=4", "inspect.kfold=0")


@dataclass
class RepoCopy:
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *overrides: str, full: bool = False) -> None:
        """Write params.yaml from conf/ with Hydra overrides, as `dvc exp run` would.

        Unless ``full``, the smoke tier's cheaper recipe (SMOKE_DEFAULTS) comes first; a key the
        test sets itself wins."""
        own = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        base = [] if full else [o for o in SMOKE_DEFAULTS if o.split("=", 1)[0] not in own]
        self.run([sys.executable, "-m", "pipeline.config", "compose", "-o", "params.yaml", *base, *overrides])

    def run(self, cmd: list[str], check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
        return proc

    def repro(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run([str(BIN / "dvc"), "repro", *args], check=check)

    def json(self, rel: str) -> dict:
        return json.loads((self.root / rel).read_text())

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]


def make_repo_copy(dest: Path) -> RepoCopy:
    root = dest / "repo"
    _copy_repo(root)
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{dest / 'mlflow.db'}"
    env["GX_ANALYTICS_ENABLED"] = "false"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # One torch thread per stage process: `make test` runs one pytest worker per core, and a
    # second thread per process on tiny digits batches only oversubscribes the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    copy = RepoCopy(root, env)
    # DVC and the git-commit tag want a repository; a fresh clone has one.
    copy.run(["git", "init", "-q"])
    copy.run(["git", "-c", "user.email=ci@poisongate", "-c", "user.name=ci", "add", "-A"])
    copy.run(["git", "-c", "user.email=ci@poisongate", "-c", "user.name=ci", "commit", "-q", "-m", "copy"])
    return copy


@pytest.fixture
def repo_copy(tmp_path: Path) -> RepoCopy:
    return make_repo_copy(tmp_path)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's global thread count set to ``n`` inside, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, restored after it: on 2 cores shared with other jobs, a
    second thread on tiny digits batches waits more than it computes (3x slower measured)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits_split():
    """sklearn digits as uint8 (N, 8, 8, 1) (0..16 -> round(v * 255 / 16)), stratified 75/25
    split with random_state 0: ``(x_train, y_train, x_test, y_test)``. Needs only numpy and
    scikit-learn (the GPU box has no omegaconf, so not ``pipeline.sources``)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return xtr, ytr, xte, yte


# --------------------------------------------------------------------------- a released pipeline state
# One released state per session (every stage in-process: digits, 4 epochs, sqlite MLflow store
# and file artifact store inside the folder): v1 champion, then v2 trained and evaluated but not
# yet gated. Tests clone it (``released``) and change one thing; the sqlite store's absolute
# paths are rewritten to the clone.

MODEL = "poisongate-digits"
STATE_EPOCHS = 4  # the released state: enough for the digits gate (accuracy >= 0.9)

STAGE_ARGS = {
    "snapshot": ["--store", "data/store", "--pointer", "data/snapshot.json", "--report", "reports/snapshot.json"],
    "poison": ["--pointer", "data/snapshot.json", "--store", "data/store", "--out", "data/view"],
    "validate": ["--pointer", "data/snapshot.json", "--store", "data/store", "--view", "data/view",
                 "--approved", "data/approved", "--report", "reports/validation.json", "--docs", "reports/gx",
                 "--validated", "data/validated.json"],
    "twin": ["--store", "data/store", "--pointer", "data/snapshot.json", "--checkpoint", "models/twin.safetensors",
             "--report", "reports/twin.json"],
    "train": ["--store", "data/store", "--view", "data/view", "--validated", "data/validated.json",
              "--checkpoint", "models/candidate.safetensors", "--report", "reports/train.json",
              "--history", "reports/train_history.json"],
    "inspect": ["--store", "data/store", "--pointer", "data/snapshot.json", "--view", "data/view",
                "--candidate", "models/candidate.safetensors", "--twin", "models/twin.safetensors",
                "--train-report", "reports/train.json", "--suspects", "reports/suspects.csv",
                "--report", "reports/inspect.json"],
    "evaluate": ["--store", "data/store", "--pointer", "data/snapshot.json", "--view", "data/view",
                 "--candidate", "models/candidate.safetensors", "--twin", "models/twin.safetensors",
                 "--train-report", "reports/train.json", "--metrics", "reports/metrics.json",
                 "--baseline-metrics", "reports/baseline_metrics.json", "--per-class", "reports/per_class.csv",
                 "--confusion", "reports/confusion.csv", "--confusion-png", "reports/confusion.png",
                 "--record", "reports/evaluate.json", "--plots", "reports/plots"],
    "gate": ["--metrics", "reports/metrics.json", "--baseline-metrics", "reports/baseline_metrics.json",
             "--validated", "data/validated.json", "--train-report", "reports/train.json",
             "--evaluation", "reports/evaluate.json", "--report", "reports/gate.json", "--summary", "reports/gate.md",
             "--validation", "reports/validation.json", "--docs", "reports/gx", "--plots", "reports/plots",
             "--confusion-png", "reports/confusion.png", "--html", "reports/release.html",
             "--summary-metrics", "reports/summary.json", "--inspection", "reports/inspect.json"],
}


def tree_digest(root: Path) -> str:
    """One digest of every file's path and bytes under ``root`` (nothing lost, nothing changed)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _forget_artifact_repos() -> None:
    """MLflow caches artifact repositories by run id for the life of a process; clones of a state
    share run ids, so a case must not write through the cache into the state it was cloned from."""
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()


@dataclass
class State:
    root: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def run(self, stage: str, *extra: str, params: str = "params.yaml") -> tuple[int, str]:
        """The stage's main in-process, in this state's folder; ``(exit code, stderr + stdout)``."""
        import importlib

        import mlflow

        mod = importlib.import_module(f"pipeline.{stage}")
        out, err = io.StringIO(), io.StringIO()
        mp = pytest.MonkeyPatch()
        mp.chdir(self.root)
        mp.setenv("MLFLOW_TRACKING_URI", self.uri)
        mlflow.set_tracking_uri(self.uri)  # as in a fresh stage process: no global URI left from another state
        _forget_artifact_repos()
        try:
            # One CPU thread for every in-process stage: float sums differ with the thread count,
            # and other tests change torch's global count, so a re-run would not be byte-identical.
            with torch_threads(1), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = mod.main(["--params", params, *STAGE_ARGS[stage], *extra])
        finally:
            mp.undo()
        return rc, err.getvalue() + out.getvalue()

    def client(self):
        from mlflow import MlflowClient

        _forget_artifact_repos()
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def champion(self) -> Optional[str]:
        from pipeline.tracking.registry import champion_version

        return champion_version(self.client(), MODEL)

    def versions(self) -> list[str]:
        return sorted(str(v.version) for v in self.client().search_model_versions(f"name='{MODEL}'"))

    def json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())

    def compose(self, *overrides: str, out: str = "params.yaml") -> None:
        from pipeline import config

        cfg = config.compose([f"train.epochs={STATE_EPOCHS}", "train.device=cpu", "mlflow.system_metrics=false",
                              *overrides])
        (self.root / out).write_text(config.to_yaml(cfg))

    def clone(self, dest: Path) -> "State":
        shutil.copytree(self.root, dest)
        old, new = str(self.root), str(dest)
        con = sqlite3.connect(dest / "mlflow.db")
        try:
            for (table,) in con.execute("select name from sqlite_master where type='table'").fetchall():
                for col in con.execute(f"pragma table_info('{table}')").fetchall():
                    if "CHAR" in str(col[2]).upper() or "TEXT" in str(col[2]).upper():
                        con.execute(f'update "{table}" set "{col[1]}" = replace("{col[1]}", ?, ?) '
                                    f'where "{col[1]}" like ?', (old, new, f"%{old}%"))
            con.commit()
        finally:
            con.close()
        for p in (dest / "reports").glob("*.json"):
            text = p.read_text()
            if old in text:
                p.write_text(text.replace(old, new))
        return State(dest)


def _released(root: Path) -> State:
    state = State(root)
    root.mkdir(parents=True, exist_ok=True)
    state.compose()
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=state.uri).create_experiment("poisongate", artifact_location=(root / "mlartifacts").as_uri())
    for stage in ("snapshot", "poison", "validate", "twin", "train", "inspect", "evaluate", "gate"):
        rc, out = state.run(stage)
        assert rc == 0, f"{stage}: {out[-3000:]}"
    assert state.champion() == "1"
    # A second candidate, trained and evaluated, waiting for the gate.
    state.compose("train.seed=1")
    for stage in ("train", "inspect", "evaluate"):
        rc, out = state.run(stage)
        assert rc == 0, f"{stage}: {out[-3000:]}"
    assert state.json("reports/train.json")["model_version"] == "2"
    return state


@pytest.fixture(scope="session")
def released_base(tmp_path_factory) -> State:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("POISONGATE_TRACEBACK", "0")
    return _released(tmp_path_factory.mktemp("released") / "state")


@pytest.fixture
def released(released_base: State, tmp_path: Path) -> State:
    """A private clone of the released state for one case."""
    return released_base.clone(tmp_path / "state")


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(path: Path, marker: Path) -> None:
    """Write a torch/pickle file at ``path`` whose loading would create ``marker``."""
    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": {}, "model_args": {}, "x": _Payload(marker)}, buf)
    path.write_bytes(buf.getvalue())


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a pickle payload ran"



@pytest.fixture
def payload():
    """``payload(path, marker)``: plant a pickle whose loading would create ``marker``."""
    return pickle_payload


@pytest.fixture
def digest():
    """``digest(folder)``: one sha256 of every file's path and bytes under the folder."""
    return tree_digest


# --------------------------------------------------------------------------- `make test` on N workers
# `make test` runs pytest-xdist with `--dist loadfile`: a module's tests share one worker, so its
# module fixtures are built once. Two changes to that scheduler, both for the 2-core CI:
# - the team tier (tests/team/) is one unit, so its session servers (PostgreSQL, moto, mlflow
#   server) start once, not once per worker;
# - the longest units go first (longest-processing-time-first; seconds from the last `--durations`
#   run at -n 2, README "Measured"), so no 4-minute smoke test starts last on one worker while
#   the other one idles. A unit missing here just runs after these, in collection order.
LONGEST_FIRST = (  # seconds: the units' test time in the fresh-clone `.ci/run` at -n 2 (625d533)
    "tests/test_smoke_release.py",  # ~490 s
    "tests/team",  # ~250 s
    "tests/robustness/test_data_gate_smoke.py",  # ~210 s
    "tests/test_smoke_cifar.py",  # ~155 s
    "tests/test_smoke_remedy.py",  # ~130 s
    "tests/robustness/test_kill_and_forge.py",  # ~120 s
    "tests/test_smoke_clean_label.py",  # ~100 s
)


def _unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "tests/team" if path.startswith("tests/team/") else path


def pytest_collection_modifyitems(config, items):
    rank = {u: i for i, u in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(_unit(it.nodeid), len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class TeamAsOneUnit(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return TeamAsOneUnit(config, log)
