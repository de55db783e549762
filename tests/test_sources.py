"""Fast tier: data sources on tiny synthetic image folders built in tmp_path."""

from __future__ import annotations

import io
import os
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import sources
from pipeline.config import DataConfig
from pipeline.core.hashing import sample_hashes
from pipeline.data.sources import SourceError, load_imagefolder, load_source

CLASSES = ("cat", "dog", "emu")


def pixels(seed: int, size: int = 8, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels > 1 else (size, size)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def save(path: Path, arr: np.ndarray, fmt: str = "PNG", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)


def make_folder(root: Path, classes=CLASSES, n: int = 4, size: int = 8, channels: int = 3, seed: int = 0) -> Path:
    """train/<class>/NN.png (n per class) and test/<class>/NN.png (2 per class), distinct pixels."""
    k = seed * 1000
    for split, count in (("train", n), ("test", 2)):
        for c in classes:
            for i in range(count):
                k += 1
                save(root / split / c / f"{i:02d}.png", pixels(k, size, channels))
    return root


def make_tar(src: Path, dest: Path, arcnames: list[str] | None = None) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        for name in arcnames or ["train", "test"]:
            tf.add(src / name, arcname=name)
    return dest


def add_member(tf: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if data else None)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_ids():
    d = load_source(DataConfig(name="digits"))
    assert d.images.dtype == np.uint8 and d.images.shape == (1797, 8, 8, 1)
    assert d.images.max() == 255 and d.images.min() == 0
    assert d.labels.dtype == np.int64 and d.class_names == [str(i) for i in range(10)]
    assert set(d.splits) == {"train", "test"}
    assert (d.splits == "test").sum() == 450  # 25% stratified
    assert d.sample_ids[0].startswith("digits/train/") and d.uris[0].startswith("sklearn://load_digits/")
    # Stratified: every class in both splits, in proportion.
    for split in ("train", "test"):
        assert set(d.labels[d.splits == split]) == set(range(10))
    again = load_source(DataConfig(name="digits"))
    assert again.sample_ids == d.sample_ids and np.array_equal(again.images, d.images)
    other = load_source(DataConfig(name="digits", seed=1))
    assert other.sample_ids != d.sample_ids and other.key != d.key


def test_digits_scaling_matches_round_v_times_255_over_16():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    d = load_source(DataConfig(name="digits"))
    idx = int(d.uris[0].rsplit("/", 1)[1])
    assert np.array_equal(d.images[0, :, :, 0], np.rint(raw[idx] * 255 / 16).astype(np.uint8))


def test_digits_limit_round_robin_is_a_prefix_of_a_larger_limit():
    small = load_source(DataConfig(name="digits", limit=25))
    big = load_source(DataConfig(name="digits", limit=40))
    for split in ("train", "test"):
        labels = small.labels[small.splits == split]
        assert len(labels) == 25 and set(labels) == set(range(10))
    assert set(small.sample_ids) <= set(big.sample_ids)


# ----------------------------------------------------------------------------- imagefolder layouts


def test_folder_loads_sorted_with_ids_and_uris(tmp_path):
    root = make_folder(tmp_path / "src")
    d = load_imagefolder(str(root))
    assert d.images.shape == (18, 8, 8, 3) and d.images.dtype == np.uint8
    assert d.class_names == list(CLASSES)
    assert d.sample_ids[:5] == ["train/cat/00.png", "train/cat/01.png", "train/cat/02.png", "train/cat/03.png", "train/dog/00.png"]
    assert list(d.splits).count("test") == 6 and d.sample_ids[12] == "test/cat/00.png"
    assert d.uris[0] == f"{root}::train/cat/00.png"
    assert list(d.labels[:12]) == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(d.images[0], pixels(1))  # lossless PNG round trip


def test_single_archive_and_archive_pair_match_the_folder(tmp_path):
    root = make_folder(tmp_path / "src")
    folder = load_imagefolder(str(root))
    single = load_imagefolder(str(make_tar(root, tmp_path / "data.tar.gz")))
    pair_dir = tmp_path / "pair"
    pair_dir.mkdir()
    make_tar(root, pair_dir / "mine-train.tar.gz", ["train"])
    make_tar(root, pair_dir / "mine-test.tar.gz", ["test"])
    pair = load_imagefolder(str(pair_dir))
    plain = tmp_path / "plain"
    plain.mkdir()
    make_tar(root, plain / "train.tar.gz", ["train"])
    make_tar(root, plain / "test.tar.gz", ["test"])
    for other in (single, pair, load_imagefolder(str(plain))):
        assert other.sample_ids == folder.sample_ids
        assert np.array_equal(other.images, folder.images) and np.array_equal(other.labels, folder.labels)
    assert single.uris[0] == f"{tmp_path / 'data.tar.gz'}::train/cat/00.png"
    assert pair.uris[0] == f"{pair_dir}/mine-train.tar.gz::train/cat/00.png"


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_archive_long_member_names(tmp_path, fmt):
    """Extended headers (pax / GNU long names) sit between header and data: the stream read must cope."""
    root = make_folder(tmp_path / "src")
    long_name = "x" * 150 + ".png"
    save(root / "train" / "dog" / long_name, pixels(321))
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz", format=fmt) as tf:
        tf.add(root / "train", arcname="train")
        tf.add(root / "test", arcname="test")
    d = load_imagefolder(str(tmp_path / "d.tar.gz"))
    assert np.array_equal(d.images, load_imagefolder(str(root)).images)
    assert f"train/dog/{long_name}" in d.sample_ids


def test_archive_with_dot_slash_prefix(tmp_path):
    root = make_folder(tmp_path / "src")
    with tarfile.open(tmp_path / "d.tgz", "w:gz") as tf:
        tf.add(root, arcname=".")
    d = load_imagefolder(str(tmp_path / "d.tgz"))
    assert d.sample_ids[0] == "train/cat/00.png" and len(d) == 18


def test_grayscale_and_jpeg(tmp_path):
    gray = load_imagefolder(str(make_folder(tmp_path / "g", channels=1)))
    assert gray.images.shape == (18, 8, 8, 1)
    root = tmp_path / "j"
    for split in ("train", "test"):
        for c in CLASSES:
            save(root / split / c / "a.jpg", pixels(hash(c) % 100, 16), fmt="JPEG", quality=90)
    d = load_imagefolder(str(root))
    assert d.images.shape == (6, 16, 16, 3)


def test_parallel_pool_matches_serial(tmp_path):
    root = make_folder(tmp_path / "src", n=10)
    serial = load_imagefolder(str(root), workers=1)
    pooled = load_imagefolder(str(root), workers=2, chunk_size=3)  # many chunks: the pool path
    assert pooled.sample_ids == serial.sample_ids and np.array_equal(pooled.images, serial.images)
    tar = make_tar(root, tmp_path / "d.tar.gz")
    assert np.array_equal(load_imagefolder(str(tar), workers=2, chunk_size=4).images, serial.images)


def test_limit_round_robin_over_classes(tmp_path):
    root = make_folder(tmp_path / "src", n=4)
    d = load_imagefolder(str(root), limit=4)
    train = [s for s, sp in zip(d.sample_ids, d.splits) if sp == "train"]
    assert train == ["train/cat/00.png", "train/cat/01.png", "train/dog/00.png", "train/emu/00.png"]
    assert (d.splits == "test").sum() == 4
    tar = load_imagefolder(str(make_tar(root, tmp_path / "d.tar.gz")), limit=4)
    assert tar.sample_ids == d.sample_ids


# ----------------------------------------------------------------------------- colour decisions


def test_palette_png_becomes_rgb_or_gray(tmp_path):
    root = make_folder(tmp_path / "src")
    target = root / "train" / "cat" / "00.png"
    Image.open(target).convert("RGB").quantize(16).save(target)
    assert Image.open(target).mode == "P"
    d = load_imagefolder(str(root))
    assert d.images.shape[-1] == 3
    expected = np.asarray(Image.open(target).convert("RGB"))
    assert np.array_equal(d.images[0], expected)

    groot = make_folder(tmp_path / "gray", channels=1)
    gtarget = groot / "train" / "cat" / "00.png"
    Image.open(gtarget).convert("RGB").convert("P").save(gtarget)  # palette of grey entries only
    assert Image.open(gtarget).mode == "P"
    g = load_imagefolder(str(groot))
    assert g.images.shape[-1] == 1


def test_rgba_opaque_is_dropped_transparent_refused(tmp_path):
    root = make_folder(tmp_path / "src")
    target = root / "train" / "dog" / "01.png"
    rgb = np.asarray(Image.open(target))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(target)
    d = load_imagefolder(str(root))
    assert np.array_equal(d.images[d.sample_ids.index("train/dog/01.png")], rgb)
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba, "RGBA").save(target)
    with pytest.raises(SourceError, match=r"(?s)train/dog/01.png.*transparency"):
        load_imagefolder(str(root))


def test_mixed_grayscale_and_rgb_refused_naming_the_minority(tmp_path):
    root = make_folder(tmp_path / "src")
    save(root / "train" / "emu" / "02.png", pixels(99, channels=1))
    with pytest.raises(SourceError, match=r"(?s)mixes grayscale and colour.*train/emu/02.png"):
        load_imagefolder(str(root))


def test_size_mismatch_refused_naming_the_file_and_the_resize_setting(tmp_path):
    root = make_folder(tmp_path / "src")
    save(root / "test" / "dog" / "01.png", pixels(5, size=9))
    with pytest.raises(SourceError, match=r"(?s)more than one size.*set data.resize: \[8, 8\].*test/dog/01.png: 9x9"):
        load_imagefolder(str(root))


def test_resize_accepts_any_sizes_and_keeps_files_untouched(tmp_path):
    """Issue 19 item 5: JPEG and PNG of several sizes and aspects become one shape; the files are
    not rewritten, an image already of the target size is not resampled."""
    root = make_folder(tmp_path / "src", size=12)
    wide = np.random.default_rng(1).integers(0, 256, (12, 30, 3), dtype=np.uint8)
    save(root / "train" / "cat" / "wide.jpg", wide, fmt="JPEG", quality=95)
    save(root / "train" / "dog" / "tall.png", pixels(7, size=40)[:, :20])
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for mode in ("fit", "stretch"):
        d = load_imagefolder(str(root), workers=1, resize=sources.Resize(12, 12, mode))
        assert d.images.shape == (len(d.sample_ids), 12, 12, 3)
        i = d.sample_ids.index("train/cat/00.png")  # already 12x12: the decoded pixels, bit for bit
        assert np.array_equal(d.images[i], np.asarray(Image.open(root / "train" / "cat" / "00.png")))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    # fit keeps the aspect (scale the short side, crop the middle); stretch squeezes the whole width in
    fit = load_imagefolder(str(root), workers=1, resize=sources.Resize(12, 12, "fit"))
    st = load_imagefolder(str(root), workers=1, resize=sources.Resize(12, 12, "stretch"))
    k = fit.sample_ids.index("train/cat/wide.jpg")
    assert not np.array_equal(fit.images[k], st.images[k])
    decoded = np.asarray(Image.open(root / "train" / "cat" / "wide.jpg"))
    assert np.abs(fit.images[k].astype(int) - decoded[:, 9:21].astype(int)).mean() < 3  # the centre crop
    # many decode processes give the same rows as one (the transform travels to the workers)
    par = load_imagefolder(str(root), workers=2, chunk_size=4, resize=sources.Resize(12, 12, "fit"))
    assert np.array_equal(par.images, fit.images) and par.sample_ids == fit.sample_ids


def test_load_source_resizes_every_kind_of_file_source(tmp_path):
    root = make_folder(tmp_path / "src", classes=sources.CIFAR10_CLASSES, n=1, size=12)
    save(root / "train" / "cat" / "big.png", pixels(3, size=20))
    for name in ("cifar10", "imagefolder"):
        d = load_source(DataConfig(name=name, path=str(root), workers=1, resize=[8, 8]))
        assert d.images.shape[1:] == (8, 8, 3) and d.spec["transform"]["size"] == [8, 8]


def test_resize_is_part_of_the_lineage_key():
    base = DataConfig(name="imagefolder", path="/data/x")
    keys = {sources.source_key(base),
            sources.source_key(DataConfig(name="imagefolder", path="/data/x", resize=[32, 32])),
            sources.source_key(DataConfig(name="imagefolder", path="/data/x", resize=[32, 32], resize_mode="stretch")),
            sources.source_key(DataConfig(name="imagefolder", path="/data/x", resize=[64, 64]))}
    assert len(keys) == 4
    assert sources.source_spec(DataConfig(name="imagefolder", path="/data/x", resize=[32, 24]))["transform"] == {
        "kind": "resize", "size": [32, 24], "mode": "fit", "interpolation": "bilinear", "version": 1}
    assert "transform" not in sources.source_spec(base)  # stores made before the option keep their key


# ----------------------------------------------------------------------------- bad input


def test_corrupt_truncated_and_non_image_files(tmp_path):
    root = make_folder(tmp_path / "src")
    target = root / "train" / "cat" / "02.png"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"(?s)train/cat/02.png: corrupt or truncated"):
        load_imagefolder(str(root))
    target.write_bytes(data)
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match=r"(?s)train/cat/notes.txt: not an image"):
        load_imagefolder(str(root))


def test_corrupt_member_in_archive(tmp_path):
    root = make_folder(tmp_path / "src")
    (root / "test" / "emu" / "00.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    tar = make_tar(root, tmp_path / "d.tar.gz")
    with pytest.raises(SourceError, match=r"(?s)d.tar.gz::test/emu/00.png"):
        load_imagefolder(str(tar))


@pytest.mark.parametrize("name", ["../evil.png", "train/cat/../../evil.png", "/abs/train/cat/x.png"])
def test_tar_member_escaping_the_source_refused(tmp_path, name):
    root = make_folder(tmp_path / "src")
    tar = make_tar(root, tmp_path / "d.tar.gz")
    with tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as out, tarfile.open(tar) as tf:
        for m in tf.getmembers():
            out.addfile(m, tf.extractfile(m) if m.isfile() else None)
        add_member(out, name, png_bytes(pixels(1)))
    with pytest.raises(SourceError, match=r"(?s)(\.\.|absolute).*refused"):
        load_imagefolder(str(tmp_path / "bad.tar.gz"))


def test_symlinks_refused_in_folder_and_archive(tmp_path):
    root = make_folder(tmp_path / "src")
    os.symlink(root / "train" / "cat" / "00.png", root / "train" / "cat" / "99.png")
    with pytest.raises(SourceError, match=r"(?s)train/cat/99.png is a symlink"):
        load_imagefolder(str(root))
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tf:
        tf.add(root / "train", arcname="train")  # tarfile stores the symlink as a symlink
        tf.add(root / "test", arcname="test")
    with pytest.raises(SourceError, match=r"(?s)train/cat/99.png: symlink"):
        load_imagefolder(str(tmp_path / "d.tar.gz"))
    os.unlink(root / "train" / "cat" / "99.png")
    os.symlink(root / "train" / "dog", root / "train" / "wolf")
    with pytest.raises(SourceError, match=r"(?s)train/wolf is a symlink"):
        load_imagefolder(str(root))


def test_empty_class_folder_refused(tmp_path):
    root = make_folder(tmp_path / "src")
    (root / "train" / "fox").mkdir()
    (root / "test" / "fox").mkdir()
    with pytest.raises(SourceError, match=r"(?s)empty class folder.*train/fox/"):
        load_imagefolder(str(root))
    tar = make_tar(root, tmp_path / "d.tar.gz")
    with pytest.raises(SourceError, match=r"(?s)empty class folder"):
        load_imagefolder(str(tar))


def test_missing_test_split_and_class_mismatch(tmp_path):
    root = make_folder(tmp_path / "src")
    import shutil

    shutil.rmtree(root / "test" / "emu")
    with pytest.raises(SourceError, match=r"(?s)same class folders.*only in train/: \['emu'\]"):
        load_imagefolder(str(root))
    shutil.rmtree(root / "test")
    with pytest.raises(SourceError, match=r"(?s)missing test/"):
        load_imagefolder(str(root))
    with pytest.raises(SourceError, match=r"(?s)missing test/"):
        load_imagefolder(str(make_tar(root, tmp_path / "d.tar.gz", ["train"])))


def test_layout_errors_file_outside_class_and_nested_folder(tmp_path):
    root = make_folder(tmp_path / "src")
    (root / "train" / "stray.png").write_bytes(png_bytes(pixels(3)))
    with pytest.raises(SourceError, match=r"(?s)train/stray.png is a file directly in train/"):
        load_imagefolder(str(root))
    (root / "train" / "stray.png").unlink()
    save(root / "train" / "cat" / "sub" / "x.png", pixels(4))
    with pytest.raises(SourceError, match=r"(?s)train/cat/sub is a folder inside a class folder"):
        load_imagefolder(str(root))


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(SourceError, match=r"(?s)does not exist.*train/<class>"):
        load_imagefolder(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match=r"(?s)needs data.path"):
        load_source(DataConfig(name="imagefolder"))
    with pytest.raises(SourceError, match=r"(?s)unknown data.name"):
        load_source(DataConfig(name="mnist"))
    with pytest.raises(SourceError, match=r"(?s)neither train/ and test/ folders nor"):
        load_imagefolder(str(tmp_path))


def test_cifar10_missing_says_where_to_put_the_data(tmp_path):
    cfg = DataConfig(name="cifar10", path=str(tmp_path / "cifar"))
    with pytest.raises(SourceError, match=r"(?s)CIFAR-10 not found at .*cifar10-train.tar.gz.*data.download=true"):
        load_source(cfg)
    assert not (tmp_path / "cifar").exists()


def test_cifar10_refuses_other_classes(tmp_path):
    root = make_folder(tmp_path / "src")
    with pytest.raises(SourceError, match=r"(?s)not CIFAR-10's"):
        load_source(DataConfig(name="cifar10", path=str(root)))


def test_cifar10_download_exports_imagefolder_pngs(tmp_path, monkeypatch):
    """The opt-in download path, with torchvision's CIFAR10 replaced by a tiny fake (no network)."""

    class FakeCIFAR10:
        classes = list(sources.CIFAR10_CLASSES)

        def __init__(self, root, train, download):
            assert download
            n = 20 if train else 10
            self.data = np.stack([pixels(i + (0 if train else 100), 32) for i in range(n)])
            self.targets = [i % 10 for i in range(n)]

    fake = types.ModuleType("torchvision.datasets")
    fake.CIFAR10 = FakeCIFAR10
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake)
    dest = tmp_path / "cifar"
    d = load_source(DataConfig(name="cifar10", path=str(dest), download=True))
    assert len(d) == 30 and d.images.shape[1:] == (32, 32, 3)
    assert (dest / "train" / "airplane" / "0000.png").is_file() and not (dest / ".raw").exists()
    assert np.array_equal(d.images[0], pixels(0, 32))


def test_hashes_differ_per_image(tmp_path):
    d = load_imagefolder(str(make_folder(tmp_path / "src")))
    assert len(set(sample_hashes(d.images))) == len(d)


def test_spilled_read_matches_the_in_memory_one_and_cleans_up(tmp_path):
    """Issue 19 item 3: with ``spill_dir`` the decoded pixels go to a file as they arrive and the
    read's images are lazy rows of it (a cold snapshot holds decode chunks, not the data set);
    they equal the in-memory read's, for a folder and for an archive pair, and ``discard`` removes
    the file. A refused read (a second image size, here the first arrival's) leaves no file."""
    from pipeline.data.rows import LazyRows

    root = make_folder(tmp_path / "src", n=5)
    cfg = DataConfig(name="imagefolder", path=str(root), workers=1)
    pair = tmp_path / "pair"
    pair.mkdir()
    for split in ("train", "test"):
        make_tar(root, pair / f"x-{split}.tar.gz", [split])
    for path in (root, pair):
        mem = load_imagefolder(str(path))
        spill = tmp_path / f"spill-{path.name}"
        read = sources.read_source(DataConfig(name="imagefolder", path=str(path), workers=1), spill_dir=spill)
        assert isinstance(read.images, LazyRows) and len(list(spill.iterdir())) == 1
        assert sources.as_list(read.sample_ids) == mem.sample_ids and np.array_equal(np.asarray(read.images), mem.images)
        assert sources.as_list(read.hashes) == sample_hashes(mem.images)
        read.discard()
        assert list(spill.iterdir()) == []
    odd = sorted((root / "train" / "cat").iterdir())[0]
    save(odd, pixels(9, size=9))  # the first file decoded has the minority size
    spill = tmp_path / "spill-odd"
    with pytest.raises(SourceError, match=rf"(?s)more than one size \(most are 8x8.*{odd.name}: 9x9"):
        sources.read_source(cfg, spill_dir=spill)
    assert list(spill.iterdir()) == []


def test_clear_spill_removes_only_files_of_dead_processes(tmp_path):
    import subprocess

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"decoded-{gone.pid}-x.u8"
    live = tmp_path / f"decoded-{os.getpid()}-y.u8"
    other = tmp_path / "notes.txt"
    for f in (dead, live, other):
        f.write_bytes(b"1")
    sources.clear_spill(tmp_path)
    assert not dead.exists() and live.exists() and other.exists()


def test_the_cache_vouches_only_where_its_pixel_hash_is_the_stores_compared_block_by_block(tmp_path, monkeypatch):
    # issue 19 item 3: the cache's hashes are compared with the store's a block of rows at a time
    # (no full column of either); a block boundary must not change which files are trusted
    import time

    monkeypatch.setattr(sources, "COMPARE_ROWS", 4)  # five blocks over the folder's 18 files
    root = make_folder(tmp_path / "src")
    cfg = DataConfig(name="imagefolder", path=str(root), workers=1, recheck_files=0)
    first = sources.read_source(cfg, spill_dir=tmp_path / "spill")
    first.discard()
    n, bad = len(first), [3, 4, 13]  # the last row of a block, the first of the next, one inside
    known = sources.KnownRows(first.sample_ids, first.hashes, first.file_sha256)
    sha = sources.as_list(first.stat.sha256)
    for i in bad:
        sha[i] = "0" * 64  # the cache vouches for another pixel hash than the store recorded
    cache = sources.StatTable(first.stat.ids, sha, first.stat.file_sha256, size=first.stat.size,
                              mtime_ns=first.stat.mtime_ns, scan_ns=time.time_ns() + 2 * sources.RACY_NS)
    again = sources.read_source(cfg, known=known, stat=cache, spill_dir=tmp_path / "spill")
    again.discard()
    assert again.work["trusted"] == n - len(bad) and again.work["read"] == len(bad)
    assert again.work["confirmed_by_digest"] == len(bad) and int(again.decoded.sum()) == 0
    assert sources.as_list(again.hashes) == sources.as_list(first.hashes)  # the store's, not the cache's
    assert again.stat_changed and sources.as_list(again.stat.sha256) == sources.as_list(first.hashes)


def test_a_cache_entry_with_a_null_digest_is_dropped_not_a_crash(tmp_path):
    # the stat cache is only a cache: one that parses but holds a null must not break the read
    # (the merge that _patched replaced filled nulls with ""; review of stop 35)
    import time

    import pyarrow as pa

    root = make_folder(tmp_path / "src")
    cfg = DataConfig(name="imagefolder", path=str(root), workers=1, recheck_files=0)
    first = sources.read_source(cfg, spill_dir=tmp_path / "spill")
    first.discard()
    known = sources.KnownRows(first.sample_ids, first.hashes, first.file_sha256)
    fsha = sources.as_list(first.stat.file_sha256)
    fsha[2] = None
    cache = sources.StatTable(first.stat.ids, first.stat.sha256, pa.array(fsha, pa.string()), size=first.stat.size,
                              mtime_ns=first.stat.mtime_ns, scan_ns=time.time_ns() + 3 * sources.RACY_NS)
    again = sources.read_source(cfg, known=known, stat=cache, spill_dir=tmp_path / "spill")
    again.discard()
    assert sources.as_list(again.hashes) == sources.as_list(first.hashes) and int(again.decoded.sum()) == 0
    assert sources.as_list(again.file_sha256)[2] == "" and len(again.stat.ids) == len(first) - 1


def test_patched_columns_are_the_recorded_one_unless_a_value_differs():
    # what a folder read keeps per row: the recorded hash, or the one it read (issue 19 item 3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        rec = sources.as_strings([f"r{i}" for i in range(n)])
        rows = np.sort(rng.choice(n, int(rng.integers(0, n + 1)), replace=False)).astype(np.int64)
        vals = np.array([None if rng.random() < 0.1 else (f"r{r}" if rng.random() < 0.5 else f"f{r}") for r in rows],
                        dtype=object)
        want = sources.as_list(rec)
        for r, v in zip(rows.tolist(), vals):
            want[r] = "" if v is None else v
        for max_runs in (10_000, 0):  # runs of slices, and the scattered case's if_else
            got = sources._patched(rec, rows, vals, max_runs=max_runs)
            assert got.to_pylist() == want and got.type == rec.type
    rec = sources.as_strings(["a", "b", "c"])
    assert sources._patched(rec, np.array([1]), np.array(["b"], object)) is rec  # nothing differs: no copy
    # a null recorded (a damaged stat cache): "" where kept, the read value where given
    holed = sources.as_strings(["a", None, "c", None])
    assert sources._patched(holed, np.array([1]), np.array(["x"], object)).to_pylist() == ["a", "x", "c", ""]
    assert sources._patched(holed, np.array([0]), np.array(["a"], object)).to_pylist() == ["a", "", "c", ""]


def test_take_strings_reads_each_chunk_where_it_is_and_gives_blank_for_unknown():
    # KnownRows.take over a manifest of several deltas (a ChunkedArray): Arrow's take would
    # concatenate the chunks first (issue 19 item 3); the rows and their order must not change
    import pyarrow as pa

    from pipeline.data.rows import take_strings

    rng = np.random.default_rng(1)
    for _ in range(300):
        sizes = rng.integers(0, 6, int(rng.integers(1, 4))).tolist()
        vals = [f"v{i}" for i in range(sum(sizes))]
        it = iter(vals)
        chunks = [pa.array([next(it) for _ in range(k)], pa.string()) for k in sizes]
        col = pa.chunked_array(chunks, pa.string()) if rng.random() < 0.7 else pa.array(vals, pa.string())
        pos = rng.integers(-1, len(vals), int(rng.integers(0, 12))) if vals else np.full(2, -1)
        got = take_strings(col, pos)
        assert isinstance(got, pa.Array) and got.type == pa.string()
        assert got.to_pylist() == ["" if p < 0 else vals[p] for p in pos]
    import pandas as pd

    def two_deltas(a: list, b: list) -> pd.Series:  # a manifest column as a load of two deltas gives it
        return pd.concat([pd.Series(a, dtype="str"), pd.Series(b, dtype="str")], ignore_index=True)

    known = sources.KnownRows(two_deltas(["a", "b"], ["c"]), two_deltas(["ha", "hb"], ["hc"]), ["fa", "fb", "fc"])
    assert isinstance(known.sha256, pa.ChunkedArray) and known.sha256.num_chunks == 2  # the path this is for
    assert known.take("sha256", known.positions(["c", "zz", "a"])).to_pylist() == ["hc", "", "ha"]


def test_an_unchanged_folder_read_shares_its_columns_with_the_new_stat_cache(tmp_path):
    # issue 19 item 3: a no-op snapshot at 1M rows copied its hash columns into the new stat cache
    # while the old cache was still alive (bench/results/snapshot_noop_1m.log); the values must not
    # change, only the copies go
    import time

    root = make_folder(tmp_path / "src")
    for spot in (0, 3):  # every file trusted by its stat, and a spot check re-reading some
        cfg = DataConfig(name="imagefolder", path=str(root), workers=1, recheck_files=spot)
        first = sources.read_source(cfg, spill_dir=tmp_path / "spill")
        first.discard()
        known = sources.KnownRows(first.sample_ids, first.hashes, first.file_sha256)
        aged = sources.StatTable(first.stat.ids, first.stat.sha256, first.stat.file_sha256, size=first.stat.size,
                                 mtime_ns=first.stat.mtime_ns, scan_ns=time.time_ns() + 2 * sources.RACY_NS)
        again = sources.read_source(cfg, known=known, stat=aged, spill_dir=tmp_path / "spill")
        again.discard()
        n = len(first.sample_ids)
        assert again.work["trusted"] == n - spot and int(again.decoded.sum()) == 0
        assert again.sample_ids == first.sample_ids and not again.stat_changed
        assert again.hashes.equals(first.hashes) and again.file_sha256.equals(first.file_sha256)
        assert again.stat.sha256 is again.hashes and again.stat.file_sha256 is again.file_sha256  # no copy
        assert again.stat.size.dtype == np.int64 and np.array_equal(again.stat.size, first.stat.size)
    # KnownRows.take: the recorded value at each known position, "" where the id is unknown
    known = sources.KnownRows(["a", "b", "c"], ["ha", "hb", "hc"], ["fa", "fb", "fc"])
    assert known.take("sha256", known.positions(["c", "a"])).to_pylist() == ["hc", "ha"]
    assert known.take("file_sha256", known.positions(["b", "zz"])).to_pylist() == ["fb", ""]
