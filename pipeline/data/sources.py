"""Data sources: one small interface, three kinds of data, all decoded to uint8 (N, H, W, C).

``load_source(data_cfg) -> SourceData`` is the only entry point the snapshot stage uses.

Kinds (``data.name``)
---------------------
- ``digits``: scikit-learn's bundled 8x8 digits (no download). Values 0..16 are scaled to
  ``round(v * 255 / 16)`` so every source is uint8; shape (8, 8, 1). The split is a stratified
  ``train_test_split`` on ``data.test_fraction`` / ``data.seed``. Ids ``digits/<split>/<idx>``,
  URIs ``sklearn://load_digits/<idx>``.
- ``imagefolder``: ``data.path`` is one of
    * a folder with ``train/<class>/*`` and ``test/<class>/*``;
    * a single ``.tar.gz`` (or ``.tgz`` / ``.tar``) holding ``train/`` and ``test/``;
    * a folder with two archives, ``*-train.tar.gz`` and ``*-test.tar.gz`` (or ``train.tar.gz`` /
      ``test.tar.gz``), each holding its own split.
  Ids ``<split>/<class>/<file>`` (the path inside the source), URIs ``<source>::<member>``
  where ``<source>`` is ``data.path`` as configured (or the archive inside it), so manifests do not
  depend on where the repository is checked out.
- ``cifar10``: an ``imagefolder`` with CIFAR-10's ten class names; ``data.path`` defaults to
  ``../shared/datasets/cifar10``. When the path is missing and ``data.download`` is true, torchvision
  downloads CIFAR-10 and it is exported to ImageFolder PNGs under ``data.path`` (needs internet).

Decisions (each one tested)
---------------------------
- Class names are the sorted folder names of ``train/``; ``test/`` must hold the same set.
  Label = index in that list.
- Row order is deterministic: split (train, test), then class, then file name (string order).
- ``data.limit`` keeps at most N rows per split, taken round-robin over the classes (first file of
  each class, then the second, ...) so every class is represented; growing the limit only adds rows.
- Decoding is Pillow's (PNG, JPEG, BMP, WebP; single frame). Colour handling:
  ``1``/``L`` -> 1 channel; ``RGB``/``YCbCr``/``CMYK`` -> 3 channels; palette (``P``) -> ``L`` when
  every palette entry it uses is grey, else ``RGB``; an alpha channel (``LA``, ``RGBA``, ``P`` with
  transparency) is dropped when it is fully opaque and REFUSED otherwise (flattening onto a
  background would invent pixels: the user must decide the background). 16-bit and float images are
  refused (the store holds uint8). A data set mixing 1-channel and 3-channel images is REFUSED
  (converting silently would hide what is most likely a mistake in the data); so is a data set with
  more than one image size. Both errors name the minority files.
- Anything in a class folder that Pillow cannot read as an image (including hidden files) is an
  error, never skipped: silently dropping a file would make the snapshot disagree with its source.
- Symlinks (in a folder or an archive), hard links, device files, absolute tar member names and
  ``..`` components are refused: a source must be a self-contained tree that DVC can hash.

Speed: archives are read sequentially in the parent (a .tar.gz cannot be seeked) and the member
bytes go in chunks to a process pool that decodes them (``data.workers``, 0 = one per core).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from pipeline.schema import DataConfig
from pipeline.console import progress_bar
from pipeline.errors import UserError

SPLITS = ("train", "test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_DEFAULT_PATH = "../shared/datasets/cifar10"
FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
CHUNK_SIZE = 500  # images per task sent to a worker: large enough to amortise pickling
MAX_LISTED = 10  # offending files named in one error message

Progress = Optional[Callable[[str], None]]


class SourceError(UserError):
    """A data source the pipeline refuses to read; the message names the file and the fix."""


@dataclass(frozen=True)
class SourceData:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), index into class_names
    class_names: list[str]
    splits: np.ndarray  # str (N,), "train" | "test"
    sample_ids: list[str]
    uris: list[str]
    key: str = ""  # lineage key of the store (see source_key)
    spec: dict = field(default_factory=dict)  # what identifies the source, for the snapshot meta

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class _Entry:
    """One file of a file source, before decoding."""

    split: str
    cls: str
    name: str  # file name inside the class folder
    uri: str

    @property
    def sample_id(self) -> str:
        return f"{self.split}/{self.cls}/{self.name}"

    @property
    def order(self) -> tuple[int, str, str]:
        return (SPLITS.index(self.split), self.cls, self.name)


# ----------------------------------------------------------------------------- public API


def source_spec(cfg: DataConfig) -> dict:
    """What identifies a source's lineage: everything that changes which rows it has or their ids.

    ``data.limit`` is left out on purpose: growing it only appends rows, shrinking it is a loss of
    rows that the store must refuse, not a new lineage.
    """
    if cfg.name == "digits":
        return {"name": "digits", "test_fraction": float(cfg.test_fraction), "seed": int(cfg.seed)}
    return {"name": cfg.name, "path": os.path.normpath(resolve_path(cfg))}


def source_key(cfg: DataConfig) -> str:
    spec = source_spec(cfg)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec['name']}-{digest}"


def resolve_path(cfg: DataConfig) -> str:
    if cfg.path:
        return str(cfg.path)
    if cfg.name == "cifar10":
        return CIFAR10_DEFAULT_PATH
    raise SourceError(f"data.name={cfg.name} needs data.path (a folder or .tar.gz with train/<class>/* and test/<class>/*)")


def load_source(cfg: DataConfig, progress: Progress = None) -> SourceData:
    """Load the configured source as decoded uint8 arrays (see the module docstring)."""
    if cfg.name == "digits":
        data = load_digits(cfg.test_fraction, cfg.seed, cfg.limit)
    elif cfg.name == "cifar10":
        data = load_cifar10(cfg, progress)
    elif cfg.name == "imagefolder":
        data = load_imagefolder(resolve_path(cfg), cfg.limit, cfg.workers, progress=progress)
    else:
        raise SourceError(f"unknown data.name {cfg.name!r}: use digits, cifar10 or imagefolder")
    return SourceData(
        images=data.images, labels=data.labels, class_names=data.class_names, splits=data.splits,
        sample_ids=data.sample_ids, uris=data.uris, key=source_key(cfg), spec=source_spec(cfg),
    )


# ----------------------------------------------------------------------------- digits


def load_digits(test_fraction: float, seed: int, limit: Optional[int] = None) -> SourceData:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise SourceError(f"data.test_fraction must be between 0 and 1, not {test_fraction}")
    ds = sk_load_digits()
    # 0..16 integers -> the full uint8 range, so thresholds written for 0..255 images apply.
    images = np.rint(ds.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    targets = ds.target.astype(np.int64)
    idx = np.arange(len(targets))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=targets)
    rows: list[tuple[str, int]] = []
    for split, part in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        chosen = [int(i) for i in part]
        if limit is not None:
            chosen = sorted(i for _, i in _round_robin([(int(targets[i]), int(i)) for i in part], limit))
        rows += [(split, int(i)) for i in chosen]
    sel = np.array([i for _, i in rows], dtype=np.int64)
    return SourceData(
        images=np.ascontiguousarray(images[sel]),
        labels=targets[sel],
        class_names=[str(c) for c in ds.target_names],
        splits=np.array([s for s, _ in rows]),
        sample_ids=[f"digits/{s}/{i}" for s, i in rows],
        uris=[f"sklearn://load_digits/{i}" for _, i in rows],
    )


def _round_robin(items: list[tuple], limit: int) -> list[tuple]:
    """First `limit` items taking one per class in turn; items are (class, sort key...) tuples."""
    by_class: dict = {}
    for item in sorted(items):
        by_class.setdefault(item[0], []).append(item)
    queues = [deque(v) for _, v in sorted(by_class.items())]
    out: list[tuple] = []
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.popleft())
    return out


# ----------------------------------------------------------------------------- cifar10


def load_cifar10(cfg: DataConfig, progress: Progress = None) -> SourceData:
    path = resolve_path(cfg)
    if not os.path.exists(path):
        if not cfg.download:
            raise SourceError(
                f"CIFAR-10 not found at {path} (resolved against {os.getcwd()}): put cifar10-train.tar.gz and "
                f"cifar10-test.tar.gz (members train/<class>/NNNN.jpg, test/<class>/...) or a folder with "
                f"train/<class>/ and test/<class>/ there, set data.path to where they are, or set "
                f"data.download=true to fetch CIFAR-10 with torchvision (needs internet)"
            )
        download_cifar10(Path(path), progress)
    data = load_imagefolder(path, cfg.limit, cfg.workers, progress=progress)
    if tuple(data.class_names) != CIFAR10_CLASSES:
        raise SourceError(
            f"{path}: class folders {data.class_names} are not CIFAR-10's {list(CIFAR10_CLASSES)}; "
            f"use data.name=imagefolder for another data set"
        )
    return data


def download_cifar10(dest: Path, progress: Progress = None) -> None:
    """Opt-in: torchvision's CIFAR-10 exported as ImageFolder PNGs (lossless) under `dest`.

    Written into a temp folder next to `dest` and renamed at the end, so an interrupted download
    never looks like a complete source.
    """
    import shutil

    from PIL import Image

    try:
        from torchvision.datasets import CIFAR10
    except ImportError as exc:  # pragma: no cover - torchvision is a project dependency
        raise SourceError(f"data.download=true needs torchvision ({exc}); install it or put the data in {dest}") from exc
    tmp = dest.parent / f".{dest.name}.download-{os.getpid()}"
    raw = tmp / ".raw"
    try:
        for split, train in (("train", True), ("test", False)):
            _say(progress, f"downloading CIFAR-10 {split} with torchvision into {raw}")
            try:
                ds = CIFAR10(root=str(raw), train=train, download=True)
            except Exception as exc:
                raise SourceError(f"CIFAR-10 download failed ({exc}): check the internet connection or put the data in {dest}") from exc
            counters: Counter = Counter()
            for img, label in zip(ds.data, ds.targets):
                cls = ds.classes[int(label)]
                folder = tmp / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(img, dtype=np.uint8)).save(folder / f"{counters[cls]:04d}.png")
                counters[cls] += 1
        shutil.rmtree(raw, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- image folders


def load_imagefolder(path: str, limit: Optional[int] = None, workers: int = 0, *,
                     chunk_size: int = CHUNK_SIZE, progress: Progress = None) -> SourceData:
    """Decode a folder / archive / archive pair in ImageFolder layout (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(
            f"data.path {path} does not exist (resolved against {os.getcwd()}): point it at a folder or .tar.gz "
            f"with train/<class>/* and test/<class>/*"
        )
    if p.is_file():
        if not _is_archive(p):
            raise SourceError(f"data.path {path} is a file but not a .tar.gz/.tgz/.tar archive")
        streams = [(path, _archive_entries(p, path, SPLITS))]
    elif (p / "train").exists() or (p / "test").exists() or (p / "train").is_symlink() or (p / "test").is_symlink():
        streams = [(path, _folder_entries(p, path))]
    else:
        archives = _split_archives(p)
        streams = [(f"{path}/{a.name}", _archive_entries(a, f"{path}/{a.name}", (s,))) for s, a in archives.items()]
    return _decode_source(path, streams, limit, _workers(workers), chunk_size, progress)


def _is_archive(p: Path) -> bool:
    return p.name.endswith((".tar.gz", ".tgz", ".tar"))


def _split_archives(folder: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for child in sorted(folder.iterdir()):
        for split in SPLITS:
            if re.fullmatch(rf"(.+-)?{split}\.(tar\.gz|tgz|tar)", child.name):
                found[split].append(child)
    if not found["train"] and not found["test"]:
        raise SourceError(
            f"{folder} holds neither train/ and test/ folders nor *-train.tar.gz / *-test.tar.gz archives: "
            f"lay the data out as train/<class>/* and test/<class>/*"
        )
    out: dict[str, Path] = {}
    for split in SPLITS:
        if not found[split]:
            raise SourceError(f"{folder}: missing the {split} archive (*-{split}.tar.gz or {split}.tar.gz next to the other)")
        if len(found[split]) > 1:
            raise SourceError(f"{folder}: several {split} archives ({', '.join(a.name for a in found[split])}); keep one")
        if found[split][0].is_symlink():
            raise SourceError(f"{found[split][0]} is a symlink: copy the archive into the source folder")
        out[split] = found[split][0]
    return out


def _folder_entries(root: Path, label: str) -> Iterator[tuple[_Entry | tuple[str, str], bytes | None]]:
    """Walk train/ and test/ in sorted order; yields (entry, bytes) and (("dir", split/cls), None)."""
    for split in SPLITS:
        sdir = root / split
        if sdir.is_symlink():
            raise SourceError(f"{sdir} is a symlink: a source must be a self-contained tree (copy the data in)")
        if not sdir.is_dir():
            continue  # reported as a missing split once everything is listed
        for cdir in sorted(sdir.iterdir(), key=lambda c: c.name):
            rel = f"{split}/{cdir.name}"
            if cdir.is_symlink():
                raise SourceError(f"{label}::{rel} is a symlink: copy the data into the source (symlinks are refused)")
            if not cdir.is_dir():
                raise SourceError(f"{label}::{rel} is a file directly in {split}/: every image must be in a class folder {split}/<class>/")
            yield ("dir", rel), None
            for f in sorted(cdir.iterdir(), key=lambda c: c.name):
                frel = f"{rel}/{f.name}"
                if f.is_symlink():
                    raise SourceError(f"{label}::{frel} is a symlink: copy the file into the source (symlinks are refused)")
                if f.is_dir():
                    raise SourceError(f"{label}::{frel} is a folder inside a class folder: expected {split}/<class>/<image file>")
                if not f.is_file():
                    raise SourceError(f"{label}::{frel} is not a regular file: remove it")
                yield _Entry(split, cdir.name, f.name, f"{label}::{frel}"), f.read_bytes()


def _archive_entries(archive: Path, label: str, splits: tuple[str, ...]) -> Iterator[tuple[_Entry | tuple[str, str], bytes | None]]:
    """Stream a tar archive member by member (no seeking: .tar.gz is read once, in order)."""
    try:
        tf = tarfile.open(archive, mode="r|*")
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{archive}: not a readable tar archive ({exc}); re-create it with `tar czf`") from exc
    seen: set[str] = set()
    dirs: set[str] = set()
    try:
        with tf:
            for m in tf:
                name = m.name
                parts = [x for x in name.split("/") if x not in (".", "")]
                # stricter than data_filter (which strips a leading / and allows a `..` that stays inside)
                if ".." in parts or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
                    raise SourceError(f"{label}::{name}: member path {'with .. ' if '..' in parts else 'is absolute, '}"
                                      f"refused; re-create the archive with plain relative paths (tar -C <dir> ...)")
                if m.issym() or m.islnk() or m.type not in _PLAIN_TYPES:  # stricter: no links at all
                    kind = "symlink" if m.issym() else "hard link" if m.islnk() else f"member of type {m.type!r}"
                    raise SourceError(f"{label}::{name}: {kind} in the archive refused; store regular files only")
                try:
                    # the standard library's extraction policy: no absolute or escaping paths, no
                    # device files, no links pointing outside
                    tarfile.data_filter(m, _FILTER_ROOT)
                except tarfile.FilterError as exc:
                    what = "with .. " if ".." in parts else "is absolute, " if name.startswith("/") else ""
                    raise SourceError(
                        f"{label}::{name}: member path {what}refused ({exc}): it could escape the source; "
                        f"re-create the archive with relative paths of regular files (tar -C <dir> ...)"
                    ) from None
                if not parts:
                    continue
                if parts[0] not in splits:
                    raise SourceError(f"{label}::{name}: outside {' and '.join(s + '/' for s in splits)}; "
                                      f"expected <split>/<class>/<image file>")
                if m.isdir():
                    if len(parts) == 2:
                        yield ("dir", parts[0] + "/" + parts[1]), None
                    elif len(parts) > 2:
                        raise SourceError(f"{label}::{name}: folder inside a class folder; expected {parts[0]}/<class>/<image file>")
                    continue
                if len(parts) != 3:
                    raise SourceError(f"{label}::{name}: expected {parts[0]}/<class>/<image file>")
                rel = "/".join(parts)
                if rel in seen:
                    raise SourceError(f"{label}::{name}: appears twice in the archive; keep one copy")
                seen.add(rel)
                cls_dir = parts[0] + "/" + parts[1]
                if cls_dir not in dirs:
                    dirs.add(cls_dir)
                    yield ("dir", cls_dir), None
                yield _Entry(parts[0], parts[1], parts[2], f"{label}::{rel}"), _member_bytes(tf, m)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise SourceError(f"{archive}: truncated or corrupt archive ({exc}); re-create or re-download it") from exc


def _member_bytes(tf: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    fh = tf.extractfile(m)
    data = fh.read() if fh is not None else b""
    if len(data) != m.size:
        raise tarfile.ReadError(f"unexpected end of data in {m.name}")
    return data


_FILTER_ROOT = "/nonexistent-poisongate-source"  # data_filter judges paths against a destination
_PLAIN_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE)


def _decode_source(path: str, streams: list[tuple[str, Iterator]], limit: Optional[int], workers: int,
                   chunk_size: int, progress: Progress) -> SourceData:
    dirs: set[str] = set()
    entries: list[_Entry] = []
    arrays: list[np.ndarray] = []
    errors: list[str] = []
    t0 = time.perf_counter()

    def listed() -> Iterator[tuple[_Entry, bytes]]:
        for _, stream in streams:
            for entry, data in stream:
                if isinstance(entry, tuple):
                    dirs.add(entry[1])
                else:
                    yield entry, data

    if limit is not None:
        # The selection needs every name first; a limited run is a smoke test, so memory is small.
        everything = list(listed())
        _check_layout(path, dirs, [e for e, _ in everything])
        keep = {id(x[1]) for x in _select_limit([(e.order, e) for e, _ in everything], limit)}
        items: Iterable[tuple[_Entry, bytes]] = [(e, d) for e, d in everything if id(e) in keep]
    else:
        items = listed()

    bar = progress_bar(desc="decode", unit="img")
    try:
        for batch_entries, results in _decode_stream(items, workers, chunk_size):
            for entry, res in zip(batch_entries, results):
                if isinstance(res, str):
                    errors.append(f"{entry.uri}: {res}")
                else:
                    entries.append(entry)
                    arrays.append(res)
            bar.update(len(batch_entries))
    finally:
        bar.close()
    if limit is None:
        _check_layout(path, dirs, entries)
    if errors:
        raise SourceError(_listing(f"{len(errors)} file(s) in {path} are not usable images", errors,
                                   "fix or remove them (every file in a class folder must be an image)"))
    _check_uniform(path, entries, arrays)
    order = sorted(range(len(entries)), key=lambda i: entries[i].order)
    entries = [entries[i] for i in order]
    class_names = sorted({d.split("/", 1)[1] for d in dirs if d.startswith("train/")})
    index = {c: i for i, c in enumerate(class_names)}
    images = np.stack([arrays[i] for i in order]) if order else np.zeros((0, 1, 1, 1), np.uint8)
    _say(progress, f"decoded {len(entries)} images from {path} in {time.perf_counter() - t0:.1f} s")
    return SourceData(
        images=images,
        labels=np.array([index[e.cls] for e in entries], dtype=np.int64),
        class_names=class_names,
        splits=np.array([e.split for e in entries]),
        sample_ids=[e.sample_id for e in entries],
        uris=[e.uri for e in entries],
    )


def _select_limit(keyed: list[tuple[tuple[int, str, str], object]], limit: int) -> list[tuple]:
    """Round-robin over classes, per split: keyed items are ((split_idx, class, file), payload)."""
    out: list[tuple] = []
    for s in range(len(SPLITS)):
        part = [(k[1], k[2], id(v), v) for k, v in keyed if k[0] == s]
        out += [(t[0], t[3]) for t in _round_robin(part, limit)]
    return out


def _check_layout(path: str, dirs: set[str], entries: list[_Entry]) -> None:
    classes = {s: sorted({d.split("/", 1)[1] for d in dirs if d.startswith(s + "/")}) for s in SPLITS}
    for split in SPLITS:
        if not classes[split]:
            raise SourceError(
                f"{path}: missing {split}/ (or it has no class folders): the source needs train/<class>/* and test/<class>/*"
            )
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise SourceError(
            f"{path}: test/ and train/ must have the same class folders; only in train/: {only_train}, "
            f"only in test/: {only_test}"
        )
    counts = Counter(f"{e.split}/{e.cls}" for e in entries)
    empty = sorted(d for d in dirs if counts[d] == 0)
    if empty:
        raise SourceError(_listing(f"{path}: {len(empty)} empty class folder(s)", [f"{path}::{d}/" for d in empty],
                                   "add images to them or remove the folders"))


def _check_uniform(path: str, entries: list[_Entry], arrays: list[np.ndarray]) -> None:
    if not arrays:
        return
    channels = Counter(a.shape[2] for a in arrays)
    if len(channels) > 1:
        major = channels.most_common(1)[0][0]
        odd = [f"{e.uri}: {a.shape[2]} channel(s)" for e, a in zip(entries, arrays) if a.shape[2] != major]
        raise SourceError(_listing(
            f"{path} mixes grayscale and colour images ({dict(channels)} by channel count)", odd,
            f"convert them to {'RGB' if major == 3 else 'grayscale (L)'} like the other {channels[major]} images"))
    sizes = Counter(a.shape[:2] for a in arrays)
    if len(sizes) > 1:
        (h, w), n = sizes.most_common(1)[0]
        odd = [f"{e.uri}: {a.shape[1]}x{a.shape[0]}" for e, a in zip(entries, arrays) if a.shape[:2] != (h, w)]
        raise SourceError(_listing(
            f"{path} has images of more than one size (most are {w}x{h}, {n} images)", odd,
            f"resize them to {w}x{h} or remove them (one image size per data set)"))


def _listing(head: str, items: list[str], fix: str) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{head}: {fix}\n  {shown}{more}"


# ----------------------------------------------------------------------------- decoding


def _workers(n: int) -> int:
    if n and n > 0:
        return int(n)
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def _chunks(items: Iterable[tuple[_Entry, bytes]], size: int) -> Iterator[tuple[list[_Entry], list[bytes]]]:
    es: list[_Entry] = []
    bs: list[bytes] = []
    for e, b in items:
        es.append(e)
        bs.append(b)
        if len(es) == size:
            yield es, bs
            es, bs = [], []
    if es:
        yield es, bs


def _decode_stream(items: Iterable[tuple[_Entry, bytes]], workers: int, chunk_size: int
                   ) -> Iterator[tuple[list[_Entry], list[np.ndarray | str]]]:
    """Decode chunk by chunk; a pool only when there is more than one chunk to share out.

    The parent keeps reading (the archive stream) while up to 2 chunks per worker are in flight, so
    reading and decoding overlap without holding the whole data set's bytes in memory.
    """
    chunks = _chunks(items, chunk_size)
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    if second is None or workers <= 1:
        for es, bs in (c for c in (first, second) if c is not None):
            yield es, decode_chunk(bs)
        for es, bs in chunks:
            yield es, decode_chunk(bs)
        return
    import multiprocessing as mp

    # fork: workers start in milliseconds and need nothing but Pillow and numpy.
    ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
    with ctx.Pool(workers) as pool:
        pending: deque = deque()

        def submit(chunk: tuple[list[_Entry], list[bytes]]) -> None:
            pending.append((chunk[0], pool.apply_async(decode_chunk, (chunk[1],))))

        submit(first)
        submit(second)
        for chunk in chunks:
            submit(chunk)
            while len(pending) > 2 * workers:
                es, res = pending.popleft()
                yield es, res.get()
        while pending:
            es, res = pending.popleft()
            yield es, res.get()


def decode_chunk(blobs: list[bytes]) -> list[np.ndarray | str]:
    """Worker task: decode each blob; an error becomes its message (the parent names the file)."""
    out: list[np.ndarray | str] = []
    for b in blobs:
        try:
            out.append(decode_image(b))
        except SourceError as exc:
            out.append(str(exc))
    return out


def decode_image(data: bytes) -> np.ndarray:
    """Pillow-decode one image file to a canonical uint8 (H, W, C) array, C in {1, 3}."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise SourceError(f"animated/multi-frame {im.format} image; store one frame per file")
            im.load()
            return _canonical(im)
    except UnidentifiedImageError:
        raise SourceError(f"not an image ({'/'.join(FORMATS)}) Pillow can read") from None
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise assorted types on malformed files
        raise SourceError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None


def _canonical(im) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        if "transparency" in im.info:
            im, mode = im.convert("RGBA"), "RGBA"
        else:
            return _as_hwc(np.asarray(im.convert("L" if _grey_palette(im) else "RGB")))
    if mode in ("PA",):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.size and alpha.min() < 255:
            raise SourceError(
                f"{mode} image with transparency (alpha < 255 on {int((alpha < 255).sum())} pixels); "
                f"flatten it onto a background and save it without alpha"
            )
        return _as_hwc(np.asarray(im.convert("L" if mode.startswith("L") else "RGB")))
    if mode in ("1", "L"):
        return _as_hwc(np.asarray(im.convert("L")))
    if mode in ("RGB", "YCbCr", "CMYK"):
        return _as_hwc(np.asarray(im.convert("RGB") if mode != "RGB" else im))
    if mode.startswith(("I", "F")):
        raise SourceError(f"{mode} (16-bit or float) image; the store holds 8-bit images: convert it to L or RGB")
    if mode in ("LAB", "HSV"):
        return _as_hwc(np.asarray(im.convert("RGB")))
    raise SourceError(f"unsupported image mode {mode}; save it as L or RGB")


def _grey_palette(im) -> bool:
    pal = im.getpalette() or []
    used = [i for _, i in (im.getcolors(256) or [])]
    return all(pal[3 * i] == pal[3 * i + 1] == pal[3 * i + 2] for i in used if 3 * i + 2 < len(pal))


def _as_hwc(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.uint8, copy=False)
    return np.ascontiguousarray(a[..., None] if a.ndim == 2 else a)


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)
