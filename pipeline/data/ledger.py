"""The approved ledger (data/approved/ledger.jsonl): one line per view the data gate approved.

Validate appends to it and compares each new view with its entries; the release gate reads it to
confirm that a view data/validated.json calls "passed" really was approved (validated.json is a
plain file anyone with repo write can edit; the ledger is hash-chained, so forging an approval
means rewriting the chain from the forged line on). Kept apart from the validate stage so that the
gate reads it without importing another stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from pipeline.errors import CheckFailed
from pipeline.io import atomic_write_text

LEDGER = "ledger.jsonl"
RESTORE = ("restore data/approved from your backup, or move it aside to start the approved history "
           "again (the next release is then judged as a first release)")
_RESTORE = RESTORE


class LedgerDamaged(CheckFailed):
    """The approved ledger (or a saved view record) does not hash to what it says: nothing is
    compared against a history that cannot be trusted (exit 1, the ledger is left as it is)."""


def entry_digest(entry: dict) -> str:
    """sha256 of the entry's canonical JSON without its own ``digest``."""
    body = {k: v for k, v in entry.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_ledger(approved_dir: str | Path) -> list[dict]:
    """The approved entries, oldest first, each verified: JSON, its digest, the chain to the line
    before it. Raises :class:`LedgerDamaged` naming the file and line."""
    p = Path(approved_dir) / LEDGER
    if not p.is_file():
        return []
    out: list[dict] = []
    prev = ""
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            raise LedgerDamaged(f"{p} line {n} is not JSON (a damaged approved history): {_RESTORE}") from None
        if not isinstance(e, dict) or not isinstance(e.get("digest"), str):
            raise LedgerDamaged(f"{p} line {n} has no digest (written by hand or by an older poisongate): {_RESTORE}")
        if entry_digest(e) != e["digest"]:
            raise LedgerDamaged(f"{p} line {n} (view {str(e.get('view_id'))[:12]}) was edited: its content does not "
                                f"hash to its digest {e['digest'][:12]}; {_RESTORE}")
        if e.get("prev", "") != prev:
            raise LedgerDamaged(f"{p} line {n} (view {str(e.get('view_id'))[:12]}) does not follow the line before it "
                                f"(prev {str(e.get('prev'))[:12] or 'empty'}, expected {prev[:12] or 'empty'}): an "
                                f"approved line was removed or reordered; {_RESTORE}")
        for key in ("snapshot_id", "view_id", "source_key", "counts", "detector", "attack"):
            if key not in e:
                raise LedgerDamaged(f"{p} line {n} lacks {key!r}: {_RESTORE}")
        prev = e["digest"]
        out.append(e)
    return out


def append_ledger(approved_dir: str | Path, entry: dict) -> bool:
    """Chain ``entry`` to the last line and append it, unless its view_id is already approved
    (read and verify, append, write temp, replace). Returns whether a line was added."""
    ledger = read_ledger(approved_dir)
    if any(e.get("view_id") == entry["view_id"] for e in ledger):
        return False
    entry = {k: v for k, v in entry.items() if k != "digest"}
    entry["prev"] = ledger[-1]["digest"] if ledger else ""
    entry["digest"] = entry_digest(entry)
    ledger.append(entry)
    atomic_write_text(Path(approved_dir) / LEDGER, "".join(json.dumps(e, sort_keys=True) + "\n" for e in ledger))
    return True


def approved_entry(approved_dir: str | Path, view_id: str) -> Optional[dict]:
    """The verified ledger entry that approved ``view_id``, or None."""
    return next((e for e in read_ledger(approved_dir) if e.get("view_id") == view_id), None)
