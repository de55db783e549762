"""The project's error classes and credential redaction (standard library only).

Every failure a user can act on is a :class:`UserError`; the stage runner (``pipeline.stage``)
maps it to an exit code. They live here, apart from the runner, so the schema, the data layer and
the compute core can raise them without importing the runner's config loading.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """A failure the user can act on; the message says what went wrong and what to do."""

    exit_code = 2
    prefix = ""  # what kind of failure, printed before the message


class CheckFailed(UserError):
    """Data or a model was refused by a check (integrity, lineage, data gate, release gate)."""

    exit_code = 1


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")


def redact(text: str) -> str:
    """Hide the password of every ``scheme://user:password@host`` in ``text`` (error messages,
    reports and tags must never carry a tracking server's credentials)."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
