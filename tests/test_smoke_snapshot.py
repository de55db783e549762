"""Smoke tier: the snapshot stage under a real `dvc repro` in a copy of the repository.

- every change of the source is seen, however params.yaml was set (issue 11 item 5): an append,
  and a `data.path` edited by hand in params.yaml (no compose), are both ingested;
- an unchanged source rewrites nothing, so no later stage re-runs;
- a damaged store fails the stage, keeps `data/snapshot.json` (persist), and is restored from
  DVC: from this machine's cache (`dvc checkout --force data/store`) and from a remote
  (`dvc push`, then `dvc pull` into an emptied store and cache); `verify` passes after each;
- no stage lands in DVC's run cache.
"""

from __future__ import annotations

import re
import shutil
import sys

import pytest

from tests.conftest import BIN, make_repo_copy
from tests.test_sources import make_folder, pixels, save

pytestmark = pytest.mark.smoke


def _verify(repo) -> tuple[int, str]:
    proc = repo.run([sys.executable, "-m", "pipeline.data.store", "verify", "--store", "data/store"], check=False)
    return proc.returncode, proc.stderr


def test_snapshot_under_dvc_sees_every_change_and_restores_from_dvc(tmp_path):
    repo = make_repo_copy(tmp_path)
    src = make_folder(tmp_path / "src")
    repo.compose("data=imagefolder", f"data.path={src}", "data.workers=1")
    repo.repro("snapshot")
    first = repo.json("data/snapshot.json")
    assert first["n_rows"] == 18

    # No-op: the stage runs (always_changed) but changes nothing DVC would see (DVC compares
    # content hashes; it may re-link a cached output after the run, so mtimes are not compared).
    ptr = repo.root / "data" / "snapshot.json"
    lock, before = (repo.root / "dvc.lock").read_bytes(), ptr.read_bytes()
    again = repo.repro("snapshot")
    assert "stays current" in again.stderr, again.stderr
    assert ptr.read_bytes() == before and (repo.root / "dvc.lock").read_bytes() == lock

    # An append is seen without any `watch` dependency.
    save(src / "train" / "cat" / "zz.png", pixels(4040))
    repo.repro("snapshot")
    grown = repo.json("data/snapshot.json")
    assert grown["n_new"] == 1 and grown["parent"] == first["snapshot_id"]

    # data.path edited by hand in params.yaml (DVC's usual workflow; nothing recomposed).
    other = make_folder(tmp_path / "other", seed=3)
    params = repo.root / "params.yaml"
    text = params.read_text()
    assert str(src) in text
    params.write_text(text.replace(str(src), str(other)))
    proc = repo.repro("snapshot")
    moved = repo.json("data/snapshot.json")
    assert moved["parent"] is None and moved["source_key"] != grown["source_key"], proc.stderr
    assert repo.json("reports/snapshot.json")["source"]["path"] == str(other)

    # A damaged store: the stage fails as a damaged store and the pointer stays (persist).
    current = repo.json(f"data/store/snapshots/{moved['snapshot_id']}.json")
    pack = repo.root / "data" / "store" / "packs" / f"{current['packs'][0]}.npy"
    pristine = pack.read_bytes()
    data = bytearray(pristine)
    data[-3] ^= 0x10
    pack.write_bytes(bytes(data))
    kept = ptr.read_bytes()
    proc = repo.repro("snapshot", check=False)
    assert proc.returncode != 0 and "damaged store" in proc.stderr and pack.name in proc.stderr, proc.stderr
    assert ptr.read_bytes() == kept
    assert _verify(repo)[0] == 1

    # Restore from this machine's DVC cache.
    repo.run([str(BIN / "dvc"), "checkout", "--force", "data/store"])
    assert pack.read_bytes() == pristine
    rc, err = _verify(repo)
    assert rc == 0, err
    assert "stays current" in repo.repro("snapshot").stderr

    # Back it up to a remote, lose the store and the cache, pull it back.
    remote = tmp_path / "remote"
    repo.run([str(BIN / "dvc"), "remote", "add", "-d", "backup", str(remote)])
    repo.run([str(BIN / "dvc"), "push", "data/store"])
    shutil.rmtree(repo.root / "data" / "store")
    shutil.rmtree(repo.root / ".dvc" / "cache")
    repo.run([str(BIN / "dvc"), "pull", "data/store"])
    rc, err = _verify(repo)
    assert rc == 0 and re.search(r"lineage imagefolder-\w+: ok: 2 snapshot\(s\), 19 rows", err), err

    # Neither persist outputs nor always_changed stages are recorded in DVC's run cache.
    runs = repo.root / ".dvc" / "cache" / "runs"
    assert not runs.exists() or not any(p.is_file() for p in runs.rglob("*"))
