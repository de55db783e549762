"""Small file helpers shared by the stages: atomic writes, JSON reads, file digests."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so a crash never leaves half a file."""
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """:func:`atomic_write_bytes` for content written by ``write(file)`` as it is produced (a
    large Arrow table streamed out, never whole in memory as bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_temp(folder: Path | str, prefix: str, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp``, but the file gets the mode ``open()`` gives a new file: 0666 through
    the umask, or through the folder's default ACL where it has one. mkstemp's 0600 meant a store,
    report or pointer could be read only by the user who wrote it, so a team sharing a store on one
    file system (or a reviewer reading CI's reports) could not read each other's files; a chmod
    after the fact would have widened files in a folder whose ACL keeps them private."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        # 8 characters, as mkstemp's: a longer name would reach the file system's name limit sooner
        name = os.path.join(folder, f"{prefix}{secrets.token_urlsafe(6)}{suffix}")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(folder))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
