"""One lineage record, checked one way, in every stage that consumes another stage's output.

A :class:`Lineage` names what a model or a report was made from: the snapshot, the training
view, the checkpoint's digest and its registry version. Train writes it (into reports/train.json);
every later stage compares what it is about to use against it with :func:`require_lineage`, which
raises :class:`LineageError` (exit 2: stale or mixed-up inputs, fixed by re-running a stage) naming
each field that disagrees and the command that makes them agree again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Union

from pipeline.errors import UserError

FIELDS = ("snapshot_id", "view_id", "checkpoint_sha256", "model_version")


class LineageError(UserError):
    """Two inputs of a stage come from different runs (stale or swapped outputs)."""


@dataclass(frozen=True)
class Lineage:
    snapshot_id: Optional[str] = None
    view_id: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    model_version: Optional[str] = None

    @classmethod
    def of(cls, record: Union["Lineage", Mapping[str, Any], None]) -> "Lineage":
        """The lineage fields of a report, pointer or checkpoint dict (missing ones are None)."""
        if isinstance(record, Lineage):
            return record
        if record is None:
            record = {}
        get = record.get if isinstance(record, Mapping) else (lambda k: getattr(record, k, None))
        return cls(**{k: (None if get(k) is None else str(get(k))) for k in FIELDS})

    def to_dict(self) -> dict[str, Optional[str]]:
        return asdict(self)


def _short(value: Optional[str]) -> str:
    if value is None:
        return "none"
    return value[:12] if len(value) == 64 else value


def mismatches(actual: Union[Lineage, Mapping[str, Any], None], expected: Union[Lineage, Mapping[str, Any]],
               fields: tuple[str, ...] = FIELDS) -> list[str]:
    """Fields set in ``expected`` whose value in ``actual`` differs: ``["view_id a != b", ...]``."""
    a, e = Lineage.of(actual), Lineage.of(expected)
    out = []
    for k in fields:
        want = getattr(e, k)
        if want is not None and getattr(a, k) != want:
            out.append(f"{k} {_short(getattr(a, k))} != {_short(want)}")
    return out


def require_lineage(actual: Union[Lineage, Mapping[str, Any], None], expected: Union[Lineage, Mapping[str, Any]], *,
                    what: str, against: str, fix: str, fields: tuple[str, ...] = FIELDS) -> None:
    """Refuse ``what`` unless it belongs to ``against`` on every field ``expected`` sets.

    ``what``/``against`` name the two inputs (e.g. "data/validated.json", "the training view"),
    ``fix`` is the command that makes them agree (e.g. "re-run `dvc repro validate`").
    """
    bad = mismatches(actual, expected, fields)
    if bad:
        raise LineageError(f"{what} does not belong to {against} ({'; '.join(bad)}): {fix}")


class MissingRecord(UserError):
    """The train stage's lineage record (reports/train.json) is missing or unreadable."""


def read_train_record(path: Any) -> tuple[dict, Lineage]:
    """reports/train.json and its :class:`Lineage`, for every stage after train. A missing or
    unreadable record raises :class:`MissingRecord` (exit 2) saying which stage to re-run."""
    import json
    from pathlib import Path

    try:
        with open(Path(path)) as fh:
            report = json.load(fh)
    except FileNotFoundError:
        raise MissingRecord(f"{path} not found: run the train stage") from None
    except ValueError as exc:
        raise MissingRecord(f"{path} is unreadable ({exc}): re-run `dvc repro --force train`") from exc
    if not isinstance(report, dict):
        raise MissingRecord(f"{path} is not a JSON object: re-run `dvc repro --force train`")
    return report, Lineage.of(report)
