"""Robustness: a tampered or damaged store is reported as a damaged store (exit 1), naming the
file and how to restore it, never blamed on the source; the refused run changes nothing (the
store's bytes and the pointer stay as they were). Also: kill -9 during the stage, disk full.

Issue 16 items 3, 6 (store part), 9; the fuzz case "hole 5" (deleted manifest row + deleted
source file + new file) included, plain and consistently forged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from pipeline.data import store
from tests.robustness.store_kit import REPO, Stage, rewrite_delta
from tests.test_sources import make_folder, pixels, save


@pytest.fixture
def two(tmp_path, capsys) -> Stage:
    """A lineage of two snapshots (18 rows, then 3 appended), pointer and stat cache in place."""
    st = Stage(tmp_path, make_folder(tmp_path / "src"))
    assert st.main(capsys)[0] == 0
    for i in range(3):
        save(st.source / "train" / "dog" / f"new{i}.png", pixels(600 + i))
    rc, err = st.main(capsys)
    assert rc == 0 and "new snapshot" in err, err
    return st


def _root(st: Stage) -> str:
    return st.header()["parent"]


# ----------------------------------------------------------------------------- tampers: (do it, what names it)


def edit_manifest_row(st: Stage) -> str:
    def edit(df):
        df.loc[df["sample_id"] == "train/cat/01.png", "sha256"] = "0" * 64
        return df
    return f"deltas/{rewrite_delta(st.delta_path(_root(st)), edit).name}"


def deleted_row_and_source_change(st: Stage) -> str:
    """Hole 5: drop a row from the manifest, delete its file, add a new one."""
    path = rewrite_delta(st.delta_path(), lambda df: df[df["sample_id"] != "train/dog/new1.png"])
    (st.source / "train" / "dog" / "new1.png").unlink()
    save(st.source / "train" / "dog" / "fresh.png", pixels(777))
    return f"deltas/{path.name}"


def edit_label(st: Stage) -> str:
    def edit(df):
        df.loc[df["sample_id"] == "train/cat/02.png", "label"] = 1
        return df
    return f"deltas/{rewrite_delta(st.delta_path(_root(st)), edit).name}"


def flip_pack_byte(st: Stage) -> str:
    pack = st.store / "packs" / f"{st.header(_root(st))['packs'][0]}.npy"
    data = bytearray(pack.read_bytes())
    data[-5] ^= 0x01
    pack.write_bytes(bytes(data))
    return f"packs/{pack.name}"


def delete_pack(st: Stage) -> str:
    pack = st.store / "packs" / f"{st.header()['packs'][0]}.npy"
    pack.unlink()
    return f"packs/{pack.name}: is missing"


def garbage_heads(st: Stage) -> str:
    (st.store / "heads" / st.key).write_bytes(b"\xff\xfe not an id\n")
    return f"heads/{st.key}: does not hold a snapshot id"


def truncate_delta(st: Stage) -> str:
    path = st.delta_path()
    path.write_bytes(path.read_bytes()[:100])
    return f"deltas/{path.name}"


def header_edited(st: Stage) -> str:
    sid = st.head()
    path = store.header_path(st.store, sid)
    path.write_text(path.read_text().replace('"n_new": 3', '"n_new": 4'))
    return f"snapshots/{sid}.json: does not hash to its id"


def header_renamed(st: Stage) -> str:
    """The head's id names a file holding another snapshot's header: the id does not match."""
    head, root = st.head(), _root(st)
    shutil.copy(store.header_path(st.store, root), store.header_path(st.store, head))
    return f"snapshots/{head}.json: does not hash to its id"


def parent_header_deleted(st: Stage) -> str:
    root = _root(st)
    store.header_path(st.store, root).unlink()
    return f"snapshots/{root}.json: is missing: snapshot {st.head()[:12]} names it as its parent"


def format_garbled(st: Stage) -> str:
    (st.store / "FORMAT").write_text("who knows\n")
    return "FORMAT: does not say"


TAMPERS = [edit_manifest_row, deleted_row_and_source_change, edit_label, flip_pack_byte, delete_pack, garbage_heads,
           truncate_delta, header_edited, header_renamed, parent_header_deleted, format_garbled]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__ for t in TAMPERS])
def test_tampered_store_is_a_damaged_store(two, capsys, tamper):
    needle = tamper(two)
    before = two.kept()
    rc, err = two.main(capsys)
    assert rc == 1, err
    assert "error: integrity check failed" in err and "damaged store: " in err and needle in err, err
    assert "source is not at fault" in err and "dvc checkout --force" in err
    assert "the source rewrote" not in err and "label changed" not in err and "Traceback" not in err
    assert two.kept() == before, "a refused run changed the store or the pointer"
    rc, verr = two.verify(capsys)
    assert rc == 1 and needle in verr, verr


def test_forged_consistent_history_is_refused_against_the_pointer(two, capsys):
    """Hole 5 by someone who also rehashes: a new delta without the row, a new header naming it,
    heads moved to the forged id. The forged chain is self-consistent; it cannot contain the id
    the pointer recorded, so the stage refuses, naming heads."""
    head = two.head()
    h = two.header(head)
    df = pq.read_table(two.delta_path(head)).to_pandas()
    df = df[df["sample_id"] != "train/dog/new1.png"]
    data = store.delta_bytes(df)
    digest = store._sha256(data)
    (two.store / "deltas" / f"{digest}.parquet").write_bytes(data)
    # (the forger drops the stored data-gate columns too: without them the gate reads pixels)
    forged = {**{k: x for k, x in h.items() if k != "features"}, "delta": {"sha256": digest, "rows": 2}, "n_new": 2,
              "n_rows": h["n_rows"] - 1}
    hb = store.header_bytes(forged)
    fid = store._sha256(hb)
    store.header_path(two.store, fid).write_bytes(hb)
    store.header_path(two.store, head).unlink()
    (two.store / "heads" / two.key).write_text(fid + "\n")
    (two.source / "train" / "dog" / "new1.png").unlink()
    save(two.source / "train" / "dog" / "fresh.png", pixels(778))
    assert two.verify(capsys)[0] == 0  # on its own the forgery checks out: ids are trusted from outside
    before = two.kept()
    rc, err = two.main(capsys)
    assert rc == 1 and f"heads/{two.key}" in err and f"does not contain {head[:12]}" in err, err
    assert two.kept() == before


def test_deleted_heads_ref_is_recovered_from_the_chain(two, capsys):
    before = two.kept()
    (two.store / "heads" / two.key).unlink()
    rc, err = two.main(capsys)
    assert rc == 0 and "stays current" in err, err
    assert two.kept() == before  # heads/<key> rewritten with the same id; nothing else touched


def test_format_1_store_is_refused_not_damaged(tmp_path, capsys):
    st = Stage(tmp_path, make_folder(tmp_path / "src"))
    (st.store / "snapshots").mkdir(parents=True)
    (st.store / "snapshots" / ("b" * 64 + ".csv")).write_text("sample_id\n")
    before = st.kept()
    rc, err = st.main(capsys)
    assert rc == 2 and "store format 1 found" in err and "re-snapshot into a new store" in err, err
    assert st.kept() == before


# ----------------------------------------------------------------------------- kill -9 and disk full

_SHIM = """
import os, sys, time
from pathlib import Path
from pipeline.data import store
real = store.atomic_write
folder, when, mark = os.environ["KILL_IN"], os.environ["KILL_WHEN"], os.environ["KILL_MARK"]

def write(path, data):
    path = Path(path)
    if path.parent.name == folder:
        if when == "during":  # half the bytes in the temp file atomic_write would use, then hang
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.parent / f".{path.name}.killed.tmp", "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
        else:
            real(path, data)
        Path(mark).write_text(str(path))
        time.sleep(120)
    real(path, data)

real_streamed = store._write_streamed

def streamed(path_of, parts):  # packs and raw packs are streamed, not written by atomic_write
    target = path_of("0" * 64).parent
    if target.name == folder:
        data = b"".join(parts)
        if when == "during":
            target.mkdir(parents=True, exist_ok=True)
            with open(target / ".streamed.killed.tmp", "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
            Path(mark).write_text(str(target))
        else:
            out = real_streamed(path_of, [data])
            Path(mark).write_text(str(path_of(out[0])))
        time.sleep(120)
    return real_streamed(path_of, parts)

store.atomic_write = write
store._write_streamed = streamed
from pipeline import snapshot
sys.exit(snapshot.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("folder,when", [("packs", "during"), ("deltas", "after"), ("snapshots", "during"),
                                         ("snapshots", "after"), ("heads", "during")])
def test_kill_9_mid_write_then_rerun_succeeds(two, capsys, folder, when):
    """SIGKILL at each write of a snapshot (the shim parks the process right there, so the kill
    lands mid-write deterministically): the store stays valid, the pointer names the old
    snapshot, and a re-run completes the snapshot (adopting a complete leftover header)."""
    old_head = two.head()
    ptr = two.pointer.read_bytes()
    for i in range(40):
        save(two.source / "test" / "emu" / f"k{i:02d}.png", pixels(900 + i))
    mark = two.tmp / "mark"
    proc = subprocess.Popen([sys.executable, "-c", _SHIM, *two.argv()], cwd=REPO, stderr=subprocess.PIPE,
                            env={**os.environ, "KILL_IN": folder, "KILL_WHEN": when, "KILL_MARK": str(mark)})
    deadline = time.time() + 120
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert mark.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "never reached the write"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    proc.stderr.close()
    assert two.pointer.read_bytes() == ptr
    assert two.head() == old_head or folder == "heads"
    rc, err = two.verify(capsys)
    assert rc == 0, err  # leftovers are notes, never damage
    rc, err = two.main(capsys)
    assert rc == 0, err
    rep = json.loads(two.report.read_text())
    assert rep["parent"] == old_head and rep["n_new"] == 40
    children = [m["id"] for m in store.list_snapshots(two.store) if m["parent"] == old_head]
    assert children == [rep["snapshot_id"]], "the re-run forked the history"
    assert two.verify(capsys)[0] == 0


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return proc.returncode == 0


def test_disk_full_during_snapshot_names_the_file_and_loses_nothing(tmp_path, capsys):
    mnt = tmp_path / "small"
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not _mount_tmpfs(mnt, "256k"):
        pytest.skip("needs root and `mount -t tmpfs` to simulate a full disk")
    try:
        st = Stage(tmp_path, make_folder(tmp_path / "src"))
        st.store = mnt / "store"
        assert st.main(capsys)[0] == 0
        for i in range(1500):  # 1,500 x 8x8x3 = 288 KB of pixels: the new pack cannot fit in 256 KiB
            save(st.source / "train" / "cat" / f"f{i:04d}.png", pixels(5000 + i))
        before = st.kept()
        rc, err = st.main(capsys)
        # the decoded pixels spill into the store's file system first: the spill file or the pack is named
        assert rc == 2 and "No space left on device" in err and str(mnt / "store") in err, err
        assert "Traceback" not in err and "(path unknown)" not in err
        assert st.kept() == before  # the temp file is gone, the pointer names the old snapshot
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        rc, err = st.main(capsys)
        assert rc == 0 and "1500 new" in err, err
        assert st.verify(capsys)[0] == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
