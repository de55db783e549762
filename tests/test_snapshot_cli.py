"""Fast tier: `python -m pipeline.snapshot` main(): exit codes, messages on stderr, store untouched."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline import config, snapshot
from tests.test_sources import add_member, make_folder, make_tar, pixels, png_bytes, save
from tests.test_store import tree_digest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_params() -> dict:
    return OmegaConf.to_container(config.compose([]))


class Cli:
    def __init__(self, tmp: Path, base: dict):
        self.tmp, self.base = tmp, base
        self.params = tmp / "params.yaml"
        self.store = tmp / "data" / "store"
        self.pointer = tmp / "data" / "snapshot.json"
        self.report = tmp / "reports" / "snapshot.json"

    def write_params(self, **data) -> None:
        raw = {**self.base, "data": {**self.base["data"], **data}}
        self.params.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))

    def argv(self) -> list[str]:
        return ["--params", str(self.params), "--store", str(self.store), "--pointer", str(self.pointer),
                "--report", str(self.report)]

    def main(self, capsys) -> tuple[int, str]:
        rc = snapshot.main(self.argv())
        return rc, capsys.readouterr().err

    def outputs(self) -> dict:
        return {"store": tree_digest(self.store), "pointer": tree_digest(self.pointer.parent),
                "report": tree_digest(self.report.parent)}


@pytest.fixture
def cli(tmp_path, base_params) -> Cli:
    return Cli(tmp_path, base_params)


def imagefolder(cli: Cli, path: Path) -> None:
    cli.write_params(name="imagefolder", path=str(path), workers=1)


def test_main_creates_then_keeps_a_snapshot(cli, capsys):
    src = make_folder(cli.tmp / "src")
    imagefolder(cli, src)
    rc, err = cli.main(capsys)
    assert rc == 0, err
    assert "new snapshot" in err and "decoded 18 images" in err
    before = cli.outputs()
    rc, err = cli.main(capsys)
    assert rc == 0 and "source unchanged" in err
    assert cli.outputs() == before


def _corrupt(src: Path) -> str:
    p = src / "train" / "cat" / "01.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return "train/cat/01.png"


def _truncated(src: Path) -> str:
    p = src / "test" / "dog" / "00.png"
    p.write_bytes(p.read_bytes()[:60])
    return "test/dog/00.png"


def _non_image(src: Path) -> str:
    (src / "train" / "emu" / "README.md").write_text("# not an image")
    return "train/emu/README.md"


def _symlink(src: Path) -> str:
    os.symlink(src / "train" / "cat" / "00.png", src / "train" / "cat" / "link.png")
    return "train/cat/link.png"


def _other_size(src: Path) -> str:
    save(src / "train" / "dog" / "big.png", pixels(77, size=10))
    return "train/dog/big.png"


def _rgba(src: Path) -> str:
    img = np.dstack([pixels(78), np.full((8, 8), 128, np.uint8)])
    Image.fromarray(img, "RGBA").save(src / "train" / "dog" / "alpha.png")
    return "train/dog/alpha.png"


def _gray(src: Path) -> str:
    save(src / "train" / "dog" / "gray.png", pixels(79, channels=1))
    return "train/dog/gray.png"


def _empty_class(src: Path) -> str:
    (src / "train" / "fox").mkdir()
    (src / "test" / "fox").mkdir()
    return "train/fox/"


def _missing_test(src: Path) -> str:
    import shutil

    shutil.rmtree(src / "test")
    return "missing test/"


BAD_FOLDERS = [_corrupt, _truncated, _non_image, _symlink, _other_size, _rgba, _gray, _empty_class, _missing_test]


@pytest.mark.parametrize("breaker", BAD_FOLDERS, ids=[b.__name__.strip("_") for b in BAD_FOLDERS])
def test_bad_folder_input_exits_2_and_touches_nothing(cli, capsys, breaker):
    src = make_folder(cli.tmp / "src")
    imagefolder(cli, src)
    assert cli.main(capsys)[0] == 0  # an earlier snapshot that must survive byte-for-byte
    save(src / "train" / "cat" / "new.png", pixels(1234))  # growth that must NOT be ingested
    before = cli.outputs()
    needle = breaker(src)
    rc, err = cli.main(capsys)
    assert rc == 2, err
    assert re.search(r"^error: ", err, re.M) and needle in err, err
    assert "Traceback" not in err
    assert cli.outputs() == before


@pytest.mark.parametrize("member", ["train/cat/../../escape.png", "/etc/train/cat/x.png"])
def test_bad_archive_member_exits_2(cli, capsys, member):
    src = make_folder(cli.tmp / "src")
    tar = make_tar(src, cli.tmp / "data.tar.gz")
    imagefolder(cli, tar)
    assert cli.main(capsys)[0] == 0
    before = cli.outputs()
    with tarfile.open(cli.tmp / "bad.tar.gz", "w:gz") as out, tarfile.open(tar) as tf:
        for m in tf.getmembers():
            out.addfile(m, tf.extractfile(m) if m.isfile() else None)
        add_member(out, member, png_bytes(pixels(5)))
    os.replace(cli.tmp / "bad.tar.gz", tar)
    rc, err = cli.main(capsys)
    assert rc == 2 and "refused" in err and member in err, err
    assert cli.outputs() == before


def test_archive_symlink_exits_2(cli, capsys):
    src = make_folder(cli.tmp / "src")
    tar = cli.tmp / "data.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(src / "train", arcname="train")
        tf.add(src / "test", arcname="test")
        add_member(tf, "train/cat/sneaky.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    imagefolder(cli, tar)
    rc, err = cli.main(capsys)
    assert rc == 2 and "train/cat/sneaky.png: symlink" in err
    assert not cli.store.exists()  # a failed first run does not even create the store


@pytest.mark.parametrize("change", ["pixel", "delete", "rename"])
def test_rewritten_history_exits_1_listing_rows(cli, capsys, change):
    src = make_folder(cli.tmp / "src")
    imagefolder(cli, src)
    assert cli.main(capsys)[0] == 0
    before = cli.outputs()
    target = src / "train" / "emu" / "03.png"
    if change == "pixel":
        arr = np.asarray(Image.open(target)).copy()
        arr[0, 0, 0] ^= 0x80
        Image.fromarray(arr).save(target)
        expected = "train/emu/03.png: pixels changed"
    elif change == "delete":
        target.unlink()
        expected = "train/emu/03.png: vanished from the source"
    else:
        target.rename(src / "train" / "emu" / "x.png")
        expected = "looks like a rename of train/emu/03.png to train/emu/x.png"
    rc, err = cli.main(capsys)
    assert rc == 1 and re.search(r"^error: ", err, re.M) and expected in err, err
    assert cli.outputs() == before


def test_config_errors_exit_2(cli, capsys):
    cli.write_params(name="mnist")
    rc, err = cli.main(capsys)
    assert rc == 2 and "unknown data.name 'mnist'" in err
    cli.write_params(name="imagefolder", path=None)
    rc, err = cli.main(capsys)
    assert rc == 2 and "needs data.path" in err
    cli.write_params(name="imagefolder", path=str(cli.tmp / "nowhere"))
    rc, err = cli.main(capsys)
    assert rc == 2 and "nowhere does not exist" in err
    cli.params.unlink()
    rc, err = cli.main(capsys)
    assert rc == 2 and "not found" in err
    assert not cli.store.exists() and not cli.pointer.exists() and not cli.report.exists()


def test_in_process_main_leaves_the_garbage_collector_alone(cli, capsys):
    """A stage's own process freezes its heap before exiting (its teardown's collections cost ~0.2
    s); called in-process, as here or from a notebook, it must not: the caller lives on."""
    imagefolder(cli, make_folder(cli.tmp / "src"))
    before = gc.get_freeze_count()
    rc, err = cli.main(capsys)
    assert rc == 0, err
    assert gc.get_freeze_count() == before


def test_own_process_maps_the_parent_load_then_relaxes(cli, capsys, monkeypatch):
    """data.heap_map_mib covers the parent's load (its freed buffers are what it returns to the OS);
    then stage.relax_heap lets the read, plan and data-gate columns use the heap again (mapping
    their many 1-32 MiB blocks afresh cost +8% to +32% on a 1% append at 1M rows,
    bench/results/data_stages_map_large_1m.log). In-process, the allocator is never touched."""
    from pipeline import stage
    from pipeline.core import heap
    from pipeline.data import sources, store

    calls: list = []
    monkeypatch.setattr(heap, "map_large", lambda n, trim=None: calls.append(("map", n, trim)) or True)
    monkeypatch.setattr(stage, "_HEAP_MAPPED", False)
    # "own process" below would also freeze the pytest process's objects at the stage's exit
    monkeypatch.setattr(stage.gc, "freeze", lambda: None)
    for mod, name in ((store, "load_parent"), (sources, "read_source")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    imagefolder(cli, make_folder(cli.tmp / "src"))
    rc, err = cli.main(capsys)  # in-process: no map, so nothing to relax
    assert rc == 0 and calls == ["read_source"], (err, calls)
    monkeypatch.setattr(stage, "_own_process", lambda s: s == "snapshot")
    for cold in (True, False):  # a cold snapshot has no parent to load: relaxed before the read
        calls.clear()
        if cold:
            shutil.rmtree(cli.store)
            cli.pointer.unlink()
        rc, err = cli.main(capsys)
        assert rc == 0, err
        relaxed = ("map", heap.MAP_LARGE_MAX_BYTES, 2 * heap.MAP_LARGE_MAX_BYTES)
        want = [("map", 1 << 20, 2 << 20)] + ([] if cold else ["load_parent"]) + [relaxed, "read_source"]
        assert calls == want, (cold, calls)


def test_cli_subprocess_does_not_import_torch(cli):
    src = make_folder(cli.tmp / "src")
    imagefolder(cli, src)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.snapshot", *cli.argv()],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the start-up it reports is this process's own: with the stage's time it fits in the wall time
    # (psutil's create_time, from a boot time in whole seconds, had said 1.6-1.8 s for 0.7 s)
    done = re.search(r"snapshot: done in ([\d.]+) s \(([\d.]+) s start-up before it\)", proc.stderr)
    assert done, proc.stderr[-2000:]
    if sys.platform.startswith("linux"):  # elsewhere the figure is psutil's, whole-second based
        assert float(done[1]) + float(done[2]) <= wall + 0.1
    imported = re.findall(r"\|\s+(\S+)\s*$", proc.stderr, flags=re.M)
    assert imported and not any(m == "torch" or m.startswith("torch.") for m in imported)
    assert not any(m.startswith(("mlflow", "great_expectations")) for m in imported)


def test_verify_flag_re_decodes_everything(cli, capsys):
    src = make_folder(cli.tmp / "src")
    imagefolder(cli, src)
    assert cli.main(capsys)[0] == 0
    rc = snapshot.main(cli.argv() + ["--verify"])
    err = capsys.readouterr().err
    assert rc == 0 and "decoded 18 images" in err and "source unchanged" in err, err
    assert json.loads(cli.report.read_text())["verify_source"] is True


def test_data_watch_is_deprecated_and_ignored(cli, capsys):
    """An older params.yaml that still sets data.watch loads; the key changes nothing."""
    src = make_folder(cli.tmp / "src")
    cli.write_params(name="imagefolder", path=str(src), workers=1, watch="/nonexistent/stale")
    rc, err = cli.main(capsys)
    assert rc == 0 and "new snapshot" in err, err


def test_resize_records_the_transform_and_appends_incrementally(cli, capsys):
    """Issue 19 item 5 end to end: a folder of mixed sizes is snapshotted with data.resize, the
    header (and so the snapshot id) records the transform, an append decodes only the new file, and
    a changed transform is a new lineage, not a rewrite of the recorded rows."""
    src = make_folder(cli.tmp / "src", size=8)
    save(src / "train" / "dog" / "big.png", pixels(3, size=20))
    cli.write_params(name="imagefolder", path=str(src), workers=1)
    rc, err = cli.main(capsys)
    assert rc == 2 and "data.resize: [8, 8]" in err, err
    cli.write_params(name="imagefolder", path=str(src), workers=1, resize=[8, 8])
    rc, err = cli.main(capsys)
    assert rc == 0, err
    rep = json.loads(cli.report.read_text())
    assert rep["image_shape"] == [8, 8, 3] and rep["n_rows"] == 19
    assert rep["source"]["transform"] == {"kind": "resize", "size": [8, 8], "mode": "fit",
                                          "interpolation": "bilinear", "version": 1}
    first = rep["snapshot_id"]
    save(src / "train" / "emu" / "tall.jpg", pixels(4, size=30)[:, :10], fmt="JPEG")
    rc, err = cli.main(capsys)
    rep = json.loads(cli.report.read_text())
    assert rc == 0 and rep["parent"] == first and rep["n_new"] == 1, err
    assert rep["work"]["source_decoded"] == 1  # only the new file, resized
    # the view carries the transform next to the attack record
    from pipeline import poison
    from pipeline.data import store
    from pipeline.schema import AttackConfig

    snap = store.load_snapshot(cli.store, rep["snapshot_id"])
    meta, _ = poison.make_view(snap, AttackConfig())
    assert meta["transform"] == rep["source"]["transform"]
    assert poison.identity_view(rep["snapshot_id"], store.read_meta(cli.store, rep["snapshot_id"]))[0] == meta
    cli.write_params(name="imagefolder", path=str(src), workers=1, resize=[6, 6])
    rc, err = cli.main(capsys)
    rep2 = json.loads(cli.report.read_text())
    assert rc == 0 and rep2["parent"] is None and rep2["image_shape"] == [6, 6, 3], err
    assert rep2["source"]["key"] != rep["source"]["key"]


def test_resize_config_errors_exit_2(cli, capsys):
    src = make_folder(cli.tmp / "src")
    for bad, msg in (([8], "must be [height, width]"), ([0, 8], "data.resize[0] (height)"),
                     ([8, 8.5], "data.resize[1]")):
        cli.write_params(name="imagefolder", path=str(src), resize=bad)
        rc, err = cli.main(capsys)
        assert rc == 2 and msg in err, (bad, err)
    cli.write_params(name="imagefolder", path=str(src), resize=[8, 8], resize_mode="squash")
    rc, err = cli.main(capsys)
    assert rc == 2 and "unknown data.resize_mode 'squash'" in err
    cli.write_params(name="digits", resize=[8, 8])
    rc, err = cli.main(capsys)
    assert rc == 2 and "digits are 8x8 arrays" in err
    assert not cli.store.exists()
