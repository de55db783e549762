"""Shared fixtures. The smoke tier copies the repository into a temp folder and runs the real
`dvc repro` there against a real sqlite MLflow store; nothing is mocked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

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
        if child.name != "README.md":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


@dataclass
class RepoCopy:
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *overrides: str) -> None:
        """Write params.yaml from conf/ with Hydra overrides, as `dvc exp run` would."""
        self.run([sys.executable, "-m", "pipeline.config", "compose", "-o", "params.yaml", *overrides])

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
    copy = RepoCopy(root, env)
    # DVC and the git-commit tag want a repository; a fresh clone has one.
    copy.run(["git", "init", "-q"])
    copy.run(["git", "-c", "user.email=ci@poisongate", "-c", "user.name=ci", "add", "-A"])
    copy.run(["git", "-c", "user.email=ci@poisongate", "-c", "user.name=ci", "commit", "-q", "-m", "copy"])
    return copy


@pytest.fixture
def repo_copy(tmp_path: Path) -> RepoCopy:
    return make_repo_copy(tmp_path)


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
