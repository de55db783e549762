"""Terminal output of the stages: prefixed messages and progress bars that respect CI logs."""

from __future__ import annotations

import os
import sys
from typing import Any

from pipeline.errors import redact


def say(stage: str, message: str) -> None:
    print(f"{stage}: {redact(message)}", file=sys.stderr, flush=True)


def progress_enabled(stream: Any = None) -> bool:
    """Progress bars only on a terminal: a CI log gets no carriage-return redraws."""
    stream = sys.stderr if stream is None else stream
    if os.environ.get("POISONGATE_PROGRESS") in ("0", "1"):
        return os.environ["POISONGATE_PROGRESS"] == "1"
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _NoBar:
    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix(self, *_a: Any, **_k: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr, or a silent stand-in when stderr is not a terminal (or tqdm is absent)."""
    if not progress_enabled():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kwargs)
