"""The snapshot store on a DVC remote (S3 on the moto server): `dvc push`, then a fresh `git
clone` + `dvc pull snapshot` restores the store and the pointer byte for byte, with the same
snapshot ids, and DVC sees the restored stage as up to date. This is also the store's restore
procedure (docs/team.md, "Restore the snapshot store")."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BIN, make_repo_copy

from .conftest import BUCKET, s3_env

pytestmark = pytest.mark.smoke


def _require_dvc_s3() -> None:
    try:
        import dvc_s3  # noqa: F401
    except ImportError:
        pytest.skip("missing dependency: Python package dvc-s3 (pip install dvc-s3), DVC's S3 remote")


def _write_pngs(root: Path, images: np.ndarray, labels: np.ndarray, rows, split: str, tag: str) -> None:
    for i in rows:
        d = root / split / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{tag}{i:04d}.png")


def _tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _snapshot_ids(store: Path) -> set[str]:
    """A snapshot's id is the sha256 of its header file, which is stored under that name."""
    ids = {p.stem for p in (store / "snapshots").glob("*.json")}
    assert all(hashlib.sha256((store / "snapshots" / f"{i}.json").read_bytes()).hexdigest() == i for i in ids)
    return ids


def test_push_then_pull_into_a_fresh_clone_restores_the_store(tmp_path, s3, digits_split):
    _require_dvc_s3()
    # A small image-folder source that grows once: two snapshots, the second the child of the first.
    x, y, xt, yt = digits_split
    images, labels = x[..., 0], y
    src = tmp_path / "source"
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    _write_pngs(src, xt[..., 0], yt, range(0, len(yt), 3), "test", "t")
    _write_pngs(src, images, labels, order[:300], "train", "a")

    repo = make_repo_copy(tmp_path)
    repo.env.update(s3_env(s3))
    dvc = str(BIN / "dvc")
    prefix = f"dvc-{uuid.uuid4().hex[:8]}"
    # The team's remote lives in the committed .dvc/config; credentials would go to
    # `dvc remote modify --local` (here: the environment).
    repo.run([dvc, "remote", "add", "-d", "team", f"s3://{BUCKET}/{prefix}"])
    repo.run([dvc, "remote", "modify", "team", "endpointurl", s3.endpoint])
    repo.compose("data=imagefolder", f"data.path={src}")
    repo.repro("snapshot")
    first = repo.json("data/snapshot.json")["snapshot_id"]
    _write_pngs(src, images, labels, order[300:400], "train", "b")
    repo.repro("snapshot")
    pointer = repo.json("data/snapshot.json")
    assert pointer["parent"] == first and pointer["n_new"] == 100
    store = repo.root / "data/store"
    assert _snapshot_ids(store) == {first, pointer["snapshot_id"]}
    # Caching the (persist) store does not put the stage into DVC's run cache.
    runs = repo.root / ".dvc" / "cache" / "runs"
    assert not runs.exists() or not any(p.is_file() for p in runs.rglob("*"))

    repo.run(["git", "add", "-A"])
    repo.run(["git", "-c", "user.email=ci@poisongate", "-c", "user.name=ci", "commit", "-q", "-m", "two snapshots"])
    push = repo.run([dvc, "push", "snapshot"])
    assert s3.keys(BUCKET, prefix + "/"), push.stdout
    # Every pack, manifest and meta file went up: the bucket holds one object per cached file
    # plus the directory listing(s).
    assert len(s3.keys(BUCKET, prefix + "/")) >= len(_tree(store))

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo.root), str(clone)], check=True, capture_output=True)
    assert not (clone / "data/store").exists() and not (clone / "data/snapshot.json").exists()
    pulled = subprocess.run([dvc, "pull", "snapshot"], cwd=clone, env=repo.env, capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert json.loads((clone / "data/snapshot.json").read_text()) == pointer
    assert _snapshot_ids(clone / "data/store") == {first, pointer["snapshot_id"]}
    assert _tree(clone / "data/store") == _tree(store)
    # DVC agrees: only the uncached, git-ignored report is missing, not the store or the pointer.
    status = subprocess.run([dvc, "status", "snapshot"], cwd=clone, env=repo.env, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    assert "data/store" not in status.stdout and "data/snapshot.json" not in status.stdout, status.stdout
    # Re-running the stage on the restored store finds the source unchanged: same snapshot, no new files.
    again = subprocess.run([dvc, "repro", "snapshot"], cwd=clone, env=repo.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((clone / "data/snapshot.json").read_text()) == pointer
    assert _tree(clone / "data/store") == _tree(store)
    # The restored store is usable: the pipeline verifies every sample hash when it loads it.
    check = subprocess.run(
        [str(BIN / "python"), "-c",
         "import sys; from pipeline.data import store\n"
         "for sid in sys.argv[1:]: print(sid, len(store.load_snapshot('data/store', sid, verify=True).manifest))",
         first, pointer["snapshot_id"]],
        cwd=clone, env=repo.env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert [int(line.split()[1]) for line in check.stdout.split("\n") if line] == [300 + 150, 400 + 150]
