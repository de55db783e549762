"""Robustness of the data gate (issue 16 item 4, issue 11): class-set changes, a damaged or edited
approved ledger, a forged data/validated.json. Each case runs the real stage mains in-process on a
tmp store built by the snapshot stage, and asserts the exit code, a message naming the file or
key, and that nothing was lost (the ledger and the store byte for byte, no approval added)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config, poison, snapshot, train, validate
from pipeline.data import store

N_BASE, N_TEST = 650, 100


def write_rows(root: Path, x: np.ndarray, y, split: str, tag: str) -> None:
    for i, (img, c) in enumerate(zip(x, y)):
        d = root / split / str(c)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(d / f"{tag}{i:05d}.png")


def digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


class Repo:
    """A source folder, a store and the data gate's files, driven through the stage mains."""

    def __init__(self, tmp: Path, digits_split):
        xtr, ytr, xte, yte = digits_split
        self.tmp, self.src = tmp, tmp / "src"
        self.x, self.y = xtr, ytr
        write_rows(self.src, xtr[:N_BASE], ytr[:N_BASE], "train", "base")
        write_rows(self.src, xte[:N_TEST], yte[:N_TEST], "test", "test")

    def params(self, *overrides: str) -> Path:
        p = self.tmp / "params.yaml"
        assert config.main(["compose", "-o", str(p), "data=imagefolder", f"data.path={self.src}", "data.workers=1",
                            "validate.docs=false", *overrides]) == 0
        return p

    def paths(self) -> dict[str, str]:
        t = self.tmp
        return {k: str(t / v) for k, v in {
            "store": "store", "pointer": "snapshot.json", "view": "view", "approved": "approved",
            "report": "validation.json", "docs": "gx", "validated": "validated.json"}.items()}

    def snapshot(self, *overrides: str) -> int:
        p = self.paths()
        return snapshot.main(["--params", str(self.params(*overrides)), "--store", p["store"], "--pointer",
                              p["pointer"], "--report", str(self.tmp / "snapshot_report.json")])

    def poison(self, *overrides: str) -> int:
        p = self.paths()
        return poison.main(["--params", str(self.params(*overrides)), "--pointer", p["pointer"], "--store",
                            p["store"], "--out", p["view"]])

    def validate(self, *overrides: str) -> int:
        p = self.paths()
        return validate.main(["--params", str(self.params(*overrides))] + [
            x for k in ("pointer", "store", "view", "approved", "report", "docs", "validated") for x in (f"--{k}", p[k])])

    def release(self, *overrides: str) -> int:
        assert self.snapshot(*overrides) == 0
        assert self.poison(*overrides) == 0
        return self.validate(*overrides)

    @property
    def ledger(self) -> Path:
        return self.tmp / "approved" / validate.LEDGER

    def kept(self) -> dict:
        """What a refusal must leave as it was."""
        return {"approved": digest(self.tmp / "approved"), "store": digest(self.tmp / "store")}

    def report(self) -> dict:
        return json.loads((self.tmp / "validation.json").read_text())


def add_new_class(repo: Repo, n: int = 30) -> None:
    """A new class folder "10" (mirrored zeros) in train/ and test/."""
    zeros = np.flatnonzero(repo.y[N_BASE:] == 0)[: n + 5] + N_BASE
    mirrored = np.flip(repo.x[zeros], axis=2)
    write_rows(repo.src, mirrored[:n], ["10"] * n, "train", "newclass")
    write_rows(repo.src, mirrored[n:], ["10"] * 5, "test", "newclass")


@pytest.fixture
def repo(tmp_path, digits_split) -> Repo:
    r = Repo(tmp_path, digits_split)
    assert r.release() == 0  # the base release is approved: the root of this source
    return r


def failed(rep: dict) -> set[str]:
    return {r["check"] for r in rep["results"] if not r["success"]}


# --------------------------------------------------------------------------- class set


def test_new_class_folder_plus_flip_is_refused(repo, capsys):
    """The fuzz case of issue 16 item 4: 60 class-1 images filed under 7 plus a new class folder.
    Before, the new class switched the comparison off and the flip was promoted."""
    capsys.readouterr()
    ones = np.flatnonzero(repo.y[N_BASE:] == 1)[:60] + N_BASE
    write_rows(repo.src, repo.x[ones], [7] * 60, "train", "flip")
    add_new_class(repo)
    assert repo.snapshot() == 0 and repo.poison() == 0
    before = repo.kept()
    assert repo.validate() == 1
    err = capsys.readouterr().err
    assert "class_set" in err and "validate.accept_new_classes" in err and "'10'" in err
    assert "label_share[7] vs last_approved" in err
    assert failed(repo.report()) == {"class_set", "label_share"}
    assert repo.report()["reference"]["kind"] == "approved"  # compared with the approved base, not itself
    assert repo.kept() == before
    assert json.loads((repo.tmp / "validated.json").read_text())["success"] is False

    # acknowledging the new class does not let the flip through: the shared classes are still compared
    assert repo.validate("validate.accept_new_classes=[10]") == 1
    assert failed(repo.report()) == {"label_share"}
    assert repo.kept() == before


def test_acknowledged_new_class_alone_passes(repo, capsys):
    add_new_class(repo)
    assert repo.snapshot() == 0 and repo.poison() == 0
    before = repo.kept()
    assert repo.validate() == 1
    assert failed(repo.report()) == {"class_set"}
    assert "validate.accept_new_classes" in capsys.readouterr().err
    assert repo.kept() == before
    assert repo.validate("validate.accept_new_classes=[10]") == 0
    assert len(validate.read_ledger(repo.tmp / "approved")) == 2


def test_removed_class_is_refused(repo, capsys):
    """A view that empties a class (every row of class 1 relabelled 7) removes it from training."""
    assert repo.poison("attack=label_flip", "attack.source=1", "attack.target=7", "attack.rate=1.0") == 0
    before = repo.kept()
    capsys.readouterr()
    assert repo.validate() == 1
    err = capsys.readouterr().err
    assert "class '1' is removed" in err and "validate.accept_removed_classes" in err
    assert {"class_set", "label_share"} <= failed(repo.report())
    assert repo.kept() == before


def test_class_folder_deleted_from_the_source_is_refused_by_the_snapshot(repo, capsys):
    shutil.rmtree(repo.src / "train" / "3")
    shutil.rmtree(repo.src / "test" / "3")
    before = repo.kept()
    capsys.readouterr()
    assert repo.snapshot() == 1
    err = capsys.readouterr().err
    assert "train/3/" in err  # the vanished rows are named
    assert repo.kept() == before


# --------------------------------------------------------------------------- the approved ledger


def _second_release(repo: Repo) -> None:
    idx = np.arange(N_BASE, N_BASE + 150)
    write_rows(repo.src, repo.x[idx], repo.y[idx], "train", "app")
    assert repo.release() == 0
    assert len(validate.read_ledger(repo.tmp / "approved")) == 2


@pytest.mark.parametrize("damage,message", [
    (lambda lines: [lines[0][: len(lines[0]) // 2]] + lines[1:], "line 1 is not JSON"),
    (lambda lines: [lines[0].replace('"rows": 65', '"rows": 99', 1)] + lines[1:], "line 1 (view"),
    (lambda lines: lines[1:], "does not follow the line before it"),
])
def test_damaged_or_edited_ledger_is_refused_and_left_as_it_is(repo, capsys, damage, message):
    _second_release(repo)
    lines = repo.ledger.read_text().splitlines()
    assert '"rows": 65' in lines[0]
    repo.ledger.write_text("\n".join(damage(lines)) + "\n")
    before = repo.kept()
    capsys.readouterr()
    assert repo.validate() == 1
    err = capsys.readouterr().err
    assert str(repo.ledger) in err and message in err and "restore data/approved" in err
    assert repo.kept() == before
    assert not (repo.tmp / "validated.json").exists()  # no verdict for a view judged against nothing


def test_edit_with_a_recomputed_digest_breaks_the_chain(repo, capsys):
    _second_release(repo)
    lines = repo.ledger.read_text().splitlines()
    e = json.loads(lines[0])
    e["counts"]["7"]["block"] = 60  # a root that "had" many patched sevens hides a later patch
    e["digest"] = validate.entry_digest(e)
    repo.ledger.write_text("\n".join([json.dumps(e, sort_keys=True)] + lines[1:]) + "\n")
    before = repo.kept()
    capsys.readouterr()
    assert repo.validate() == 1
    err = capsys.readouterr().err
    assert f"{repo.ledger} line 2" in err and "does not follow" in err
    assert repo.kept() == before


# --------------------------------------------------------------------------- data/validated.json


def test_validated_json_forged_to_success_for_another_view_is_refused_by_train(repo, capsys):
    approved_view = json.loads((repo.tmp / "validated.json").read_text())
    assert approved_view["success"] is True
    assert repo.poison("attack=backdoor") == 0
    assert repo.validate() == 1  # the patched view is refused ...
    bad_view = json.loads((repo.tmp / "view" / "view.json").read_text())["view_id"]
    (repo.tmp / "validated.json").write_text(json.dumps(approved_view))  # ... and the record forged
    before = repo.kept()
    capsys.readouterr()
    ckpt = repo.tmp / "candidate.pt"
    rc = train.main(["--params", str(repo.params()), "--store", str(repo.tmp / "store"), "--view",
                     str(repo.tmp / "view"), "--validated", str(repo.tmp / "validated.json"), "--checkpoint",
                     str(ckpt), "--report", str(repo.tmp / "train.json"), "--history", str(repo.tmp / "hist.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "data/validated.json" in err and bad_view[:12] in err
    assert not ckpt.exists() and not (repo.tmp / "train.json").exists()
    assert repo.kept() == before
    # the release gate's own rule refuses it too (a record for another view is stale)
    from gates.rules import Thresholds, validation_check

    check = validation_check(approved_view, {"view_id": bad_view}, Thresholds(require_validation=True))
    assert not check.passed and "stale" in check.reason
    # and a re-run of validate replaces the forged record with the truth
    assert repo.validate() == 1
    assert json.loads((repo.tmp / "validated.json").read_text())["view_id"] == bad_view
    assert json.loads((repo.tmp / "validated.json").read_text())["success"] is False
    assert store.read_pointer(repo.tmp / "snapshot.json")["snapshot_id"]  # the pointer is intact


def test_edited_records_of_an_approved_poisoned_view_are_refused(tmp_path, digits_split, capsys):
    """An approved view that poisoned rows (a blend passes a first release) keeps its records under
    data/approved/views/; the next release reads them as its reference and refuses an edit."""
    repo = Repo(tmp_path, digits_split)
    blend = ("attack=backdoor", "attack.trigger.kind=blend", "attack.trigger.pattern=noise", "attack.rate=0.05")
    assert repo.release(*blend) == 0
    view_id = json.loads((repo.tmp / "view" / "view.json").read_text())["view_id"]
    saved = repo.tmp / "approved" / validate.VIEWS / f"{view_id}.csv"
    assert saved.is_file() and saved.read_bytes() == (repo.tmp / "view" / "records.csv").read_bytes()
    lines = saved.read_text().splitlines()
    saved.write_text("\n".join(lines[:1] + [lines[1].replace(",7,", ",1,", 1)] + lines[2:]) + "\n")
    idx = np.arange(N_BASE, N_BASE + 150)
    write_rows(repo.src, repo.x[idx], repo.y[idx], "train", "app")
    assert repo.snapshot() == 0 and repo.poison(*blend) == 0
    before = repo.kept()
    capsys.readouterr()
    assert repo.validate(*blend) == 1
    err = capsys.readouterr().err
    assert "do not hash to its view id" in err and str(repo.tmp / "approved" / validate.VIEWS) in err
    assert repo.kept() == before
