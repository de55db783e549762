"""Terminal output of the stages: prefixed messages and progress bars that respect CI logs."""

from __future__ import annotations

import os
import sys
from typing import Any

from pipeline.errors import redact


def say(stage: str, message: str) -> None:
    print(f"{stage}: {redact(message)}", file=sys.stderr, flush=True)


#: Environment override for :func:`progress_enabled`: ``1`` forces bars on, ``0`` off.
PROGRESS_ENV = "POISONGATE_PROGRESS"


def progress_enabled(stream: Any = None) -> bool:
    """Whether to draw progress bars on ``stream`` (default ``sys.stderr``, where tqdm writes).

    Only on an interactive terminal: in a CI log every ``\r`` redraw is kept as text (kilobytes
    of bars per stage). ``POISONGATE_PROGRESS=1``/``0`` overrides."""
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
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
