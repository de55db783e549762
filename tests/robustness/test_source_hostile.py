"""Robustness: hostile sources are refused before they cost memory, naming the file and the key.

Issue 16 item 7 (bounded resources): a 14 MB .tar.gz holding one 3 GiB member, and 2.9 MB of
10000x10000 PNGs, are refused with peak RSS under 1 GB (measured with resource.getrusage in a
process of their own). Item 9's data cases: hard link, non-UTF-8 name, symlink. Each case asserts
the exit code, the message, and that the earlier snapshot and the pointer are untouched.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.robustness.store_kit import Stage, run_measured
from tests.test_sources import make_folder, make_tar, pixels, png_bytes, save

RSS_LIMIT = 1 << 30  # bytes: issue 16 item 7's bound for every hostile case
GIB = 1 << 30


@pytest.fixture
def folder(tmp_path, capsys) -> Stage:
    st = Stage(tmp_path, make_folder(tmp_path / "src"))
    assert st.main(capsys)[0] == 0
    return st


def _refused(st: Stage, capsys, *needles: str, rc: int = 2) -> str:
    before = st.kept()
    code, err = st.main(capsys)
    assert code == rc, err
    for n in needles:
        assert n in err, (n, err)
    assert err.startswith("error: ") or "\nerror: " in err
    assert "Traceback" not in err
    assert st.kept() == before, "a refused run changed the store or the pointer"
    return err


def write_bomb_tar(dest: Path, src: Path, member: str = "train/cat/huge.png", size: int = 3 * GIB) -> Path:
    """A valid .tar.gz: the source's members, then one member of `size` zero bytes.

    Deflate restarts after a full flush, so every 1 MiB block of zeros compresses to the same
    bytes: the archive is written in a blink (about 4.5 KB per MiB: 14 MB for 3 GiB).
    """
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT)
    for name in ("train", "test"):
        tf.add(src / name, arcname=name)
    plain = buf.getvalue()[: tf.offset]  # the members, without the end-of-archive blocks
    info = tarfile.TarInfo(member)
    info.size = size
    head = plain + info.tobuf(format=tarfile.GNU_FORMAT)
    mib = bytes(1 << 20)
    comp = zlib.compressobj(1, zlib.DEFLATED, -15)
    crc = zlib.crc32(head)
    with open(dest, "wb") as out:
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip header
        out.write(comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH))
        block = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)
        out.write(block)
        crc = zlib.crc32(mib, crc)
        for _ in range(size // len(mib) - 1):
            out.write(block)
            crc = zlib.crc32(mib, crc)
        tail = bytes(1024)
        out.write(comp.compress(tail) + comp.flush(zlib.Z_FINISH))
        crc = zlib.crc32(tail, crc)
        total = len(head) + size + len(tail)
        out.write(crc.to_bytes(4, "little") + (total & 0xFFFFFFFF).to_bytes(4, "little"))
    return dest


def test_tar_member_of_3_gib_refused_from_its_header(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    tar = make_tar(src, tmp_path / "data.tar.gz")
    st = Stage(tmp_path, tar)
    assert st.main(capsys)[0] == 0
    before = st.kept()
    write_bomb_tar(tar, src)
    assert tar.stat().st_size < 15e6
    rc, err, rss = run_measured(st.argv())
    assert rc == 2, err
    assert "data.tar.gz::train/cat/huge.png" in err and "data.max_file_bytes" in err and str(3 * GIB) in err, err
    assert 0 < rss < RSS_LIMIT, f"peak RSS {rss / 1e6:.0f} MB"
    assert st.kept() == before


def test_huge_png_dimensions_refused_from_the_header(folder, capsys):
    blob = io.BytesIO()
    Image.new("L", (10000, 10000)).save(blob, format="PNG")
    data = blob.getvalue()
    n = max(1, int(2.9e6 // len(data)))  # 2.9 MB of them, as in the fuzz
    for i in range(n):
        (folder.source / "train" / "emu" / f"bomb{i:02d}.png").write_bytes(data)
    before = folder.kept()
    rc, err, rss = run_measured(folder.argv())
    assert rc == 2, err
    assert "train/emu/bomb00.png" in err and "data.max_image_pixels" in err and "100000000" in err, err
    assert 0 < rss < RSS_LIMIT, f"peak RSS {rss / 1e6:.0f} MB"
    assert folder.kept() == before


def test_image_over_a_lowered_pixel_bound_names_the_key(folder, capsys):
    """Between the bound and twice it, Pillow only warns: the warning is an error here. (The bound
    applies to what is decoded: new files; the 18 known ones are vouched for by their digests.)"""
    save(folder.source / "train" / "cat" / "new.png", pixels(34))
    folder.write_params(max_image_pixels=50)  # 8x8 images have 64 pixels
    _refused(folder, capsys, "train/cat/new.png", "data.max_image_pixels (50 pixels)")


def test_oversized_folder_file_refused_by_stat_without_a_read(folder, capsys):
    big = folder.source / "train" / "cat" / "sparse.png"
    with open(big, "wb") as fh:
        fh.truncate(3 * GIB)  # sparse: 3 GiB by stat, no disk used
    _refused(folder, capsys, "train/cat/sparse.png", str(3 * GIB), "data.max_file_bytes")


def test_hard_link_in_a_folder_source_refused(folder, capsys):
    os.link(folder.source / "train" / "cat" / "00.png", folder.source / "test" / "cat" / "linked.png")
    _refused(folder, capsys, "hard link", "train/cat/00.png")  # either name may be met first


def test_hard_link_member_in_an_archive_refused(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    tar = tmp_path / "d.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(src / "train", arcname="train")
        tf.add(src / "test", arcname="test")
        info = tarfile.TarInfo("train/cat/hard.png")
        info.type, info.linkname = tarfile.LNKTYPE, "train/cat/00.png"
        tf.addfile(info)
    st = Stage(tmp_path, tar)
    _refused(st, capsys, "train/cat/hard.png: hard link in the archive refused")


def test_non_utf8_file_name_is_a_clear_error(folder, capsys):
    bad = os.fsencode(folder.source / "train" / "dog") + b"/bad\xff.png"
    with open(bad, "wb") as fh:
        fh.write(png_bytes(pixels(31)))
    err = _refused(folder, capsys, "train/dog/bad\\xff.png", "not valid UTF-8")
    assert "rename it" in err


def test_non_utf8_member_name_in_an_archive(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    tar = tmp_path / "d.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        tf.add(src / "train", arcname="train")
        tf.add(src / "test", arcname="test")
        data = png_bytes(pixels(32))
        info = tarfile.TarInfo(os.fsdecode(b"train/cat/odd\xfe.png"))
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    st = Stage(tmp_path, tar)
    _refused(st, capsys, "train/cat/odd\\xfe.png", "not valid UTF-8")


def test_symlink_in_a_folder_source_refused(folder, capsys):
    os.symlink("/etc/passwd", folder.source / "train" / "dog" / "evil.png")
    _refused(folder, capsys, "train/dog/evil.png is a symlink")


def test_unreadable_new_file_is_named(folder, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    p = folder.source / "train" / "dog" / "locked.png"
    save(p, pixels(33))
    p.chmod(0)
    _refused(folder, capsys, "train/dog/locked.png: cannot be read")


def test_a_file_that_grows_after_its_size_was_read_is_read_whole_or_refused(tmp_path, monkeypatch):
    # _read_file sizes its buffer by fstat; a file appended to between the fstat and the read must
    # neither be cut short (a hash of half a file) nor slip past the size cap
    from pipeline.data import sources

    p = tmp_path / "grows.png"
    p.write_bytes(bytes(range(100)))
    class Shrunk:  # the size fstat saw before 90 more bytes were appended
        st_size = 10

    monkeypatch.setattr(sources.os, "fstat", lambda fd: Shrunk())
    assert sources._read_file(str(p), "grows.png", 1000) == bytes(range(100))
    with pytest.raises(sources.SourceError, match="larger than data.max_file_bytes"):
        sources._read_file(str(p), "grows.png", 50)
    assert sources._read_file(str(p), "grows.png", 100) == bytes(range(100))
