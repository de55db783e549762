"""Remedies after a blocked release (issue 13): the quarantine record and the trusted reserve.

A release blocked for poison leaves the user two ways back to a clean candidate:

- **quarantine**: the rows a detector flagged (``reports/suspects.csv`` of the inspect stage) are
  written into a record, ``data/quarantine.json``, by the user (the DAG cannot loop back into the
  poison stage on its own)::

      python -m pipeline.remedy quarantine --suspects reports/suspects.csv --out data/quarantine.json

  With ``remedy=quarantine`` the poison stage leaves those rows out of the training view (a
  transformation record like the attack's: the raw store never changes). The record names the
  snapshot and the view it was made from and carries its own digest; the stage refuses a record
  that was edited (:class:`QuarantineTampered`, exit 1), that comes from a snapshot outside the
  current one's ancestry or from another view of the same snapshot (:class:`LineageError`, exit 2),
  or whose rows no longer hash to what the detector saw.
- **finetune**: the train stage prunes and/or fine-tunes the trained model on a trusted reserve
  (``pipeline.core.remedy``); :func:`reserve_pool` says which rows may serve.

Everything here is the standard library and numpy: the poison stage imports it, and a
``remedy=none`` run must not pay for torch, pandas or MLflow.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from pipeline.errors import CheckFailed, UserError
from pipeline.lineage import LineageError

RECORD_FORMAT = 1
RECORD_KIND = "poisongate.quarantine"
# suspects.csv: the inspect stage's columns that are not scores (issue 12)
ID_COLUMNS = ("row_id", "sample_id")
META_COLUMNS = ("row_id", "sample_id", "sha256", "class", "flagged", "detectors", "flagged_by", "split")
TAG_OF = "poisongate.remedy.of"
TAG_METHOD = "poisongate.remedy.method"
TAG_RECORD = "poisongate.remedy.record"


class QuarantineError(UserError):
    """A quarantine request that cannot be carried out as asked (exit 2; the message says what to do)."""


class QuarantineTampered(CheckFailed):
    """The quarantine record does not hash to its digest, or its rows are not the rows it names (exit 1)."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of the record's canonical JSON without its ``digest`` field (a record names itself)."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k != "digest"}).encode()).hexdigest()


def _sealed(record: dict) -> dict:
    record["digest"] = record_digest(record)
    return record


def empty_record() -> dict:
    """The record committed with the repository: nothing quarantined, bound to no snapshot."""
    return _sealed({"format": RECORD_FORMAT, "kind": RECORD_KIND, "snapshot_id": None, "view_id": None,
                    "source": None, "created": None, "rows": []})


# --------------------------------------------------------------------------- building a record


def _float(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_suspects(text: str, what: str = "suspects.csv") -> list[dict]:
    """The flagged rows of an inspect ``suspects.csv``: ``[{sample_id, sha256, class, scores,
    detectors}]`` in file order.

    A row is flagged when its ``flagged`` column is 1. Which detector flagged it: a
    ``detectors``/``flagged_by`` column (``;``-separated names) when present, else every
    ``flagged_<name>`` column that is 1, else ``["inspect"]``. Every other numeric column is a score.
    """
    reader = csv.DictReader(io.StringIO(text))
    cols = list(reader.fieldnames or [])
    id_col = next((c for c in ID_COLUMNS if c in cols), None)
    missing = [c for c in ("sha256", "flagged") if c not in cols] + ([] if id_col else ["row_id"])
    if missing:
        raise QuarantineError(f"{what} lacks column(s) {', '.join(missing)}: expected the inspect stage's "
                              "row_id, sha256, class, <scores...>, flagged")
    per_detector = [c for c in cols if c.startswith("flagged_")]
    scores = [c for c in cols if c not in META_COLUMNS and c not in per_detector]
    rows, seen = [], set()
    for n, r in enumerate(reader, start=2):
        flag = (r.get("flagged") or "").strip()
        if flag not in ("0", "1", "0.0", "1.0", "true", "false", "True", "False"):
            raise QuarantineError(f"{what} line {n}: flagged must be 0 or 1, got {flag!r}")
        if flag not in ("1", "1.0", "true", "True"):
            continue
        sid, sha = (r.get(id_col) or "").strip(), (r.get("sha256") or "").strip()
        if not sid or len(sha) != 64:
            raise QuarantineError(f"{what} line {n}: a flagged row needs a row id and a 64-hex sha256")
        if sid in seen:
            raise QuarantineError(f"{what} line {n}: row {sid!r} is listed twice")
        seen.add(sid)
        by = (r.get("detectors") or r.get("flagged_by") or "").strip()
        detectors = [d for d in by.split(";") if d] if by else [
            c[len("flagged_"):] for c in per_detector if (r.get(c) or "").strip() in ("1", "1.0", "true", "True")]
        rows.append({"sample_id": sid, "sha256": sha, "class": r.get("class"),
                     "scores": {c: _float(r.get(c)) for c in scores}, "detectors": detectors or ["inspect"]})
    return rows


def build_record(rows: Sequence[Mapping[str, Any]], snapshot_id: str, view_id: str,
                 source: Optional[Mapping[str, Any]] = None, created: Optional[str] = None) -> dict:
    """A sealed quarantine record of ``rows`` (from :func:`parse_suspects`), bound to the snapshot
    and the training view the detector scored. Rows are sorted by id: one set, one digest."""
    if not rows:
        raise QuarantineError("no row is flagged: there is nothing to quarantine (the record would change nothing)")
    for key, value in (("snapshot_id", snapshot_id), ("view_id", view_id)):
        if not isinstance(value, str) or len(value) != 64:
            raise QuarantineError(f"the record's {key} must be a 64-hex digest, got {value!r}")
    return _sealed({
        "format": RECORD_FORMAT, "kind": RECORD_KIND, "snapshot_id": snapshot_id, "view_id": view_id,
        "source": dict(source) if source else None,
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": sorted((dict(r) for r in rows), key=lambda r: r["sample_id"]),
    })


# --------------------------------------------------------------------------- checking a record


def verify_record(record: Any, what: str = "the quarantine record") -> dict:
    """The record, if it is one and hashes to its digest; else :class:`QuarantineTampered`."""
    if not isinstance(record, dict) or record.get("kind") != RECORD_KIND:
        raise QuarantineTampered(f"{what} is not a poisongate quarantine record: write it with "
                                 "`python -m pipeline.remedy quarantine`")
    if record.get("format") != RECORD_FORMAT:
        raise QuarantineError(f"{what} has format {record.get('format')!r}; this version reads {RECORD_FORMAT}")
    if record.get("digest") != record_digest(record):
        raise QuarantineTampered(f"{what} does not hash to its digest: it was edited after it was written; "
                                 "write it again with `python -m pipeline.remedy quarantine`")
    rows = record.get("rows")
    # strings checked here: a digest is only a checksum (anyone can recompute it), and a number as a
    # sample_id ended the poison stage in a bare TypeError (quarantined_rows' message joins the ids)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("sample_id"), str)
                                             and isinstance(r.get("sha256"), str) for r in rows):
        raise QuarantineTampered(f"{what}: rows must be a list of {{sample_id, sha256, ...}} with string values: "
                                 "write it again with `python -m pipeline.remedy quarantine`")
    dup = sorted(i for i, n in Counter(r["sample_id"] for r in rows).items() if n > 1)
    if dup:  # build_record writes one set; a repeat would count a row twice
        raise QuarantineTampered(f"{what} lists row(s) more than once ({', '.join(dup[:5])}): "
                                 "write it again with `python -m pipeline.remedy quarantine`")
    return record


def read_record(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise QuarantineError(f"{path} not found: write it with `python -m pipeline.remedy quarantine "
                              f"--suspects reports/suspects.csv --out {path}`")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise QuarantineTampered(f"{path} is not valid JSON ({exc}): write it again") from None
    return verify_record(record, str(path))


def quarantined_rows(record: Mapping[str, Any], *, snapshot_id: str, ancestry: Sequence[str], base_view_id: str,
                     sample_ids: Sequence[str], hashes: Sequence[str], what: str = "the quarantine record") -> list[int]:
    """Indices (into ``sample_ids``) of the rows ``record`` leaves out of the training view.
    ``sample_ids``: anything :func:`pipeline.data.view.row_positions` takes; ``hashes``: indexable
    by row position (only the record's rows are read).

    ``ancestry``: the current snapshot's chain (root first, the snapshot itself last);
    ``base_view_id``: the view the current config builds *before* the quarantine; ``hashes``: each
    train row's sha256 as that view holds it. The record must come from a snapshot in the ancestry
    (a grown snapshot keeps every earlier row) and, when it is the current snapshot, from this very
    view (another attack or seed is another set of rows); each quarantined row must still hash to
    what the detector saw. Anything else fails closed.
    """
    rows = list(record.get("rows") or [])
    if not rows:
        raise QuarantineError(f"{what} lists no rows: write one from the inspect stage's suspects with "
                              "`python -m pipeline.remedy quarantine --suspects reports/suspects.csv`, or set remedy=none")
    rec_snap, rec_view = record.get("snapshot_id"), record.get("view_id")
    if rec_snap not in set(ancestry):
        raise LineageError(f"{what} was made on snapshot {str(rec_snap)[:12]}, which is not the current snapshot "
                           f"{snapshot_id[:12]} nor one of its ancestors: re-run inspect on this snapshot and "
                           "write the record again")
    if rec_snap == snapshot_id and rec_view != base_view_id:
        raise LineageError(f"{what} was made on view {str(rec_view)[:12]}, the current config builds view "
                           f"{base_view_id[:12]} of the same snapshot (another attack or seed): re-run inspect "
                           "and write the record again")
    from pipeline.data.view import row_positions

    # Arrow's is_in against the record's ids, not a dict of every train row (issue 19 item 3)
    index = row_positions(sample_ids, [r["sample_id"] for r in rows])
    unknown = [r["sample_id"] for r in rows if r["sample_id"] not in index]
    if unknown:
        raise QuarantineTampered(f"{what} names {len(unknown)} row(s) that are not train rows of the view: "
                                 f"{', '.join(unknown[:5])}")
    changed = [r["sample_id"] for r in rows if hashes[index[r["sample_id"]]] != r["sha256"]]
    if changed:
        raise QuarantineTampered(f"{len(changed)} quarantined row(s) do not hash to the sha256 the detector saw: "
                                 f"{', '.join(changed[:5])}; re-run inspect and write the record again")
    return sorted(index[r["sample_id"]] for r in rows)


def view_spec(record: Mapping[str, Any]) -> dict:
    """What the training view keeps of a record: its digest, its lineage and the rows (id, sha256)."""
    return {"record_sha256": record["digest"], "snapshot_id": record["snapshot_id"], "view_id": record["view_id"],
            "rows": [{"sample_id": r["sample_id"], "sha256": r["sha256"]} for r in record["rows"]]}


# --------------------------------------------------------------------------- the trusted reserve


def reserve_pool(sample_ids: Sequence[str], hashes: Sequence[str], labels: Sequence[int], *,
                 source: str, transformed: Iterable[str] = (), trusted: Sequence[str] = (),
                 approved: Optional[Mapping[str, tuple[str, int]]] = None) -> list[int]:
    """Indices of the training rows that may serve in the trusted reserve.

    ``source="champion"``: rows identical (id, sha256, label) to a row of ``approved`` (the
    champion's snapshot, ``{sample_id: (sha256, label)}``): data that already passed both gates.
    ``source="trusted"``: rows whose id matches one of the ``trusted`` fnmatch patterns, except
    ``transformed`` ones (the view changed them: no longer the row that was vouched for).
    """
    if source == "champion":
        if approved is None:
            raise QuarantineError("reserve source 'champion' needs the champion's rows")
        return [i for i, (s, h, y) in enumerate(zip(sample_ids, hashes, labels))
                if approved.get(str(s)) == (str(h), int(y))]
    if source == "trusted":
        changed = set(transformed)
        return [i for i, s in enumerate(sample_ids)
                if s not in changed and any(fnmatch.fnmatchcase(str(s), p) for p in trusted)]
    raise QuarantineError(f"unknown reserve source {source!r}: use champion or trusted")


def blocked_version_of(versions: Iterable[Any], view_id: str) -> Optional[str]:
    """The newest registry version trained on ``view_id`` that the gate blocked (what a remedy
    of that view remedies), or None. ``versions``: MLflow ModelVersion objects."""
    hits = [int(v.version) for v in versions
            if (v.tags or {}).get("view_id") == view_id and (v.tags or {}).get("poisongate.verdict") == "blocked"]
    return str(max(hits)) if hits else None


# --------------------------------------------------------------------------- CLI


def _lineage_of(view_dir: Optional[str], inspect_json: Optional[str]) -> tuple[str, str]:
    found: dict[str, tuple[str, str]] = {}
    if inspect_json:
        p = Path(inspect_json)
        if p.is_file():
            d = json.loads(p.read_text())
            if d.get("snapshot_id") and d.get("view_id"):
                found[str(p)] = (d["snapshot_id"], d["view_id"])
    if view_dir:
        from pipeline.data.view import read_view

        meta, _ = read_view(view_dir)
        if meta.get("quarantine"):
            raise QuarantineError(f"{view_dir} is already a quarantined view: run the poison stage with remedy=none "
                                  "and inspect that view, so the record names the rows the detector scored")
        found[f"{view_dir}/view.json"] = (meta["snapshot_id"], meta["view_id"])
    if not found:
        raise QuarantineError("no lineage: pass --view data/view (the view inspect scored) or --inspect reports/inspect.json")
    if len(set(found.values())) > 1:
        shown = "; ".join(f"{k}: snapshot {s[:12]} view {v[:12]}" for k, (s, v) in found.items())
        raise LineageError(f"the suspects and the view disagree ({shown}): re-run inspect on the current view")
    return next(iter(found.values()))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.remedy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quarantine", help="write the quarantine record from the inspect stage's suspects")
    q.add_argument("--suspects", default="reports/suspects.csv", help="the inspect stage's per-row scores")
    q.add_argument("--inspect", default="reports/inspect.json", help="the inspect stage's report (its lineage)")
    q.add_argument("--view", default="data/view", help="the training view inspect scored")
    q.add_argument("--out", default="data/quarantine.json", help="the record to write")
    c = sub.add_parser("check", help="verify a quarantine record's digest")
    c.add_argument("record", nargs="?", default="data/quarantine.json")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check":
            rec = read_record(args.record)
            print(f"{args.record}: ok, {len(rec['rows'])} row(s), digest {rec['digest'][:12]}")
            return 0
        sp = Path(args.suspects)
        if not sp.is_file():
            raise QuarantineError(f"{sp} not found: run the inspect stage (`dvc repro inspect`) first")
        data = sp.read_bytes()
        rows = parse_suspects(data.decode(), str(sp))
        snapshot_id, view_id = _lineage_of(args.view, args.inspect)
        record = build_record(rows, snapshot_id, view_id,
                              source={"suspects": str(sp), "suspects_sha256": hashlib.sha256(data).hexdigest()})
        from pipeline.io import write_json

        write_json(Path(args.out), record)
        by: dict[str, int] = {}
        for r in rows:
            for d in r["detectors"]:
                by[d] = by.get(d, 0) + 1
        print(f"quarantine: {len(rows)} row(s) written to {args.out} (digest {record['digest'][:12]}; "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(by.items()))}); next: `dvc exp run -S remedy=quarantine` "
              "or compose params with remedy=quarantine and `dvc repro`", file=sys.stderr)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)


if __name__ == "__main__":
    raise SystemExit(main())
