"""Checkpoints without pickle: safetensors weights plus the JSON that rebuilds the model.

A checkpoint file (``models/*.safetensors``, and the artifact every registry version points to)
holds the state dict as safetensors tensors and, in the safetensors header's metadata, one JSON
string ``poisongate`` with ``model_args`` (what ``core.models.build_model`` takes) and the
lineage meta (snapshot_id, view_id, class_names, kind, config). Loading never runs a pickle:
the header is parsed as JSON, the tensors are raw buffers, and the model is rebuilt from its
arguments with ``build_model``. A file that is not such a checkpoint (a pickle payload renamed,
a truncated file) is refused with :class:`CheckpointError` before anything is executed.

:func:`load_verified` first compares the file's sha256 with the digest its registration record
names, so a swapped artifact is refused before it is read.

safetensors is a dependency of the edge, not of the compute core (which only builds models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import CheckFailed, UserError
from pipeline.io import atomic_write_bytes, file_sha256

META_KEY = "poisongate"
FORMAT = "poisongate-checkpoint/1"


class CheckpointError(UserError):
    """Not a poisongate checkpoint (or not readable); the message says what to re-run."""


class DigestMismatch(CheckpointError, CheckFailed):
    """A file's sha256 differs from the digest its record names: it was swapped or damaged (exit 1)."""


def checkpoint_bytes(model: Any, model_args: dict[str, Any], **meta: Any) -> bytes:
    """The checkpoint of ``model`` as safetensors bytes (CPU tensors, contiguous)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "model_args": model_args, **meta}
    return save(state, metadata={META_KEY: json.dumps(header, sort_keys=True, default=str)})


def save(path: str | Path, model: Any, model_args: dict[str, Any], **meta: Any) -> str:
    """Write the checkpoint atomically; its sha256."""
    atomic_write_bytes(Path(path), checkpoint_bytes(model, model_args, **meta))
    return file_sha256(path)


def read_header(path: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON meta (model_args, lineage), read without loading any tensor."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run the stage that writes it (`dvc repro`)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc}); it may be a pickle or a damaged "
                              f"file and is not loaded: re-run the stage that writes it") from None
    try:
        header = json.loads(meta[META_KEY])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path} has no poisongate header: not a poisongate checkpoint, not loaded") from None
    if header.get("format") != FORMAT or not isinstance(header.get("model_args"), dict):
        raise CheckpointError(f"{path} is format {header.get('format')!r}, expected {FORMAT}: re-run the stage")
    return header


def load(path: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild the model of a checkpoint: ``(model in eval mode, header dict)``."""
    from safetensors.torch import load_file

    from pipeline.core.models import from_args

    header = read_header(path)
    try:
        model = from_args(header["model_args"])
        state = load_file(str(path), device=device)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit the model its header describes ({exc}): "
                              "re-run the stage that writes it") from None
    model.eval()
    return model, header


def verify_digest(path: str | Path, expected: Optional[str], what: str) -> str:
    """The file's sha256, refused (:class:`DigestMismatch`) unless it equals ``expected``."""
    actual = file_sha256(path)
    if not expected:
        raise DigestMismatch(f"{what} has no recorded sha256 to verify {path} against: not loaded")
    if actual != expected:
        raise DigestMismatch(f"{path} has sha256 {actual[:12]}, but {what} records {str(expected)[:12]}: "
                             "the file was swapped or damaged and is not loaded")
    return actual


def load_verified(path: str | Path, expected_sha256: Optional[str], what: str,
                  device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """:func:`verify_digest`, then :func:`load`."""
    verify_digest(path, expected_sha256, what)
    return load(path, device)
