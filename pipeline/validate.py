"""validate stage: the data gate. A real Great Expectations (GX Core 1.x) validation of the view.

    python -m pipeline.validate --params params.yaml --pointer data/snapshot.json \
        --store data/store --view data/view --approved data/approved \
        --report reports/validation.json --docs reports/gx --validated data/validated.json

The stage derives pandas tables from the snapshot and the training view and runs GX's built-in
expectations over them (ephemeral context, pandas data source, whole-dataframe batch definitions,
one ExpectationSuite + ValidationDefinition per table):

``samples`` (one row per snapshot row; train rows carry the view's label and content hash)
    labels in the class set; required and provenance columns non-null (provenance coverage via
    ``mostly``); no hash under two labels; duplicate rate (``ExpectColumnValuesToBeUnique`` with
    ``mostly = 1 - max_duplicate_rate``).
``train`` (the view's train rows)
    ``ExpectColumnKLDivergenceToBeLessThan`` of the label column against a categorical
    partition built from the reference shares (GX computes KL(observed || reference) in nats).
``label_shares`` (one row per class)
    every class's share minus the reference share within ``max_class_share_delta``.
``block_rates`` (one row per class)
    the per-class rate of images with an abnormal pixel block, minus the reference's rate, at most
    ``max_block_rate_increase``.

Reference: the last approved view in ``data/approved/ledger.jsonl`` with the same class names
(another view than this one), else the un-poisoned snapshot itself (``reference.kind: source``).

The checks are the one table in ``gates.data_checks``; the statistics are
``pipeline.data.stats`` (hand-written only where GX has no expectation: the pixel-block detector
and the per-class share/rate tables). GX is imported only inside :func:`run_gx` (import ~7 s);
nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from gates import data_checks
from pipeline import stage
from pipeline.data import stats, store
from pipeline.data.view import apply_records, read_view
from pipeline.io import atomic_write_text, write_json
from pipeline.lineage import require_lineage
from pipeline.schema import Config, ValidateConfig

LEDGER = "ledger.jsonl"
PATHS = (
    stage.PathArg("pointer", "the current snapshot's pointer (data/snapshot.json)"),
    stage.PathArg("store", "the snapshot store (data/store)"),
    stage.PathArg("view", "the training view (data/view)"),
    stage.PathArg("approved", "the ledger of approved views, the next reference (data/approved)"),
    stage.PathArg("report", "the validation report (reports/validation.json)"),
    stage.PathArg("docs", "GX Data Docs folder (reports/gx)"),
    stage.PathArg("validated", "the record train reads (data/validated.json)"),
)
_say = partial(stage.say, "validate")


class ValidationError(stage.UserError):
    """Validation could not run (missing inputs, a damaged ledger): the message says what to do."""


class DataGateFailed(stage.CheckFailed):
    """The data gate refused the training view (validate.on_fail=stop)."""


def check_statistics(tables: Any, v: ValidateConfig) -> dict[str, bool]:
    """Check name -> passed, with pandas alone: the same table of checks GX runs (the benches scan
    many seeds with it; a test checks it agrees with GX)."""
    return data_checks.judge(tables.frames if isinstance(tables, stats.Tables) else tables, v)


# --------------------------------------------------------------------------- ledger (I/O)


def read_ledger(approved_dir: str | Path) -> list[dict]:
    p = Path(approved_dir) / LEDGER
    if not p.is_file():
        return []
    out = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValidationError(f"{p} line {n} is not JSON: repair or remove the line") from None
    return out


def append_ledger(approved_dir: str | Path, entry: dict) -> bool:
    """Append ``entry`` unless its view_id is already there (read, append, write temp, replace)."""
    ledger = read_ledger(approved_dir)
    if any(e.get("view_id") == entry["view_id"] for e in ledger):
        return False
    ledger.append(entry)
    atomic_write_text(Path(approved_dir) / LEDGER, "".join(json.dumps(e, sort_keys=True) + "\n" for e in ledger))
    return True


# --------------------------------------------------------------------------- GX


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if np.isfinite(f) else str(f)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if x is pd.NA:
        return None
    return x


def build_suites(tables: stats.Tables, v: ValidateConfig) -> dict[str, list]:
    """table name -> GX expectations, one per row of ``gates.data_checks.CHECKS`` (GX imported here)."""
    import great_expectations as gx

    frames = tables.frames
    suites: dict[str, list] = {name: [] for name in frames}
    for check in data_checks.CHECKS:
        cls, kwargs = data_checks.gx_spec(check, v, frames)
        exp = getattr(gx.expectations, cls)(**kwargs, meta={"check": check.name, "threshold": check.threshold(v)},
                                            notes=check.note)
        suites[check.table].append(exp)
    return {k: e for k, e in suites.items() if e}


def _observed(res: dict, table: pd.DataFrame, check: str, col: str | None) -> tuple[Any, dict]:
    details: dict[str, Any] = {}
    if "observed_value" in res:
        obs = res["observed_value"]
        if "details" in res:
            details["gx_details"] = res["details"]
        return obs, details
    obs = res.get("unexpected_percent")
    obs = None if obs is None else float(obs) / 100.0
    if check == "provenance_coverage" and obs is not None:
        obs = 1.0 - obs  # report the coverage itself, as the threshold is a coverage
    details["unexpected_count"] = res.get("unexpected_count")
    details["element_count"] = res.get("element_count")
    if res.get("partial_unexpected_list"):
        details["partial_unexpected_list"] = res["partial_unexpected_list"][:20]
    if check in ("class_share_delta", "block_rate_increase") and col in table:
        thr_fail = table.loc[table[col].isin(res.get("partial_unexpected_list") or []), "class_name"].tolist()
        details["classes"] = thr_fail
        obs = float(table[col].abs().max() if check == "class_share_delta" else table[col].max())
    return obs, details


def run_gx(tables: stats.Tables, class_names: Sequence[str], v: ValidateConfig, docs_dir: str | Path | None,
           run_name: str = "poisongate") -> tuple[bool, list[dict]]:
    """Validate the tables with GX; build Data Docs into ``docs_dir`` (index.html) when given."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import logging

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    site_dir = None
    if docs_dir is not None:
        Path(docs_dir).resolve().parent.mkdir(parents=True, exist_ok=True)
        site_dir = Path(tempfile.mkdtemp(prefix=".gx-site-", dir=Path(docs_dir).resolve().parent))
        ctx.add_data_docs_site("poisongate", {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
        })
    ds = ctx.data_sources.add_pandas("poisongate")
    frames = {"samples": tables.samples, "train": tables.train, "label_shares": tables.label_shares,
              "block_rates": tables.block_rates}
    suites = build_suites(tables, v)
    results: list[dict] = []
    success = True
    for tname, exps in suites.items():
        df = frames[tname].copy()
        for c in df.columns:  # GX wants plain dtypes: nullable Int64 -> object ints/None
            if str(df[c].dtype) == "Int64":
                df[c] = df[c].astype(object).where(df[c].notna(), None)
        bd = ds.add_dataframe_asset(tname).add_batch_definition_whole_dataframe(f"{tname}_all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"poisongate_{tname}"))
        for e in exps:
            suite.add_expectation(e)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=bd, suite=suite, name=f"{run_name}_{tname}"))
        out = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
        success &= bool(out.success)
        for er in out.results:
            cfg = er.expectation_config
            meta = dict(cfg.meta or {})
            col = cfg.kwargs.get("column")
            res = dict(er.result or {})
            obs, details = _observed(res, frames[tname], meta.get("check", ""), col)
            if er.exception_info and er.exception_info.get("raised_exception"):
                details["exception"] = er.exception_info.get("exception_message")
            details["table"] = tname
            results.append({
                "expectation": cfg.type,
                "check": meta.get("check"),
                "column": col,
                "success": bool(er.success),
                "observed": _jsonable(obs),
                "threshold": _jsonable(meta.get("threshold")),
                "details": _jsonable(details),
            })
    if site_dir is not None:
        ctx.build_data_docs()
        if not (site_dir / "index.html").is_file():
            raise ValidationError(f"GX Data Docs did not produce index.html in {site_dir}")
        docs_dir = Path(docs_dir)
        if docs_dir.exists():
            shutil.rmtree(docs_dir)
        os.replace(site_dir, docs_dir)
    return success, results


# --------------------------------------------------------------------------- stage


def run(cfg: Config, args: argparse.Namespace) -> dict:
    v = cfg.validate
    ptr = store.read_pointer(args.pointer)
    meta, records = read_view(args.view)
    require_lineage(meta, {"snapshot_id": ptr["snapshot_id"]}, what=f"the view in {args.view}",
                    against=f"the current snapshot ({args.pointer})", fix="re-run the poison stage")
    snap = store.load_snapshot(args.store, ptr["snapshot_id"], verify=True)
    class_names = list(snap.class_names)
    tr_img, tr_lab, tr_ids = snap.split("train")
    tr_ids = [str(s) for s in tr_ids]
    view_img, view_lab, _ = apply_records(tr_img, tr_lab, tr_ids, records, verify=True)
    ledger = read_ledger(args.approved)
    ref = stats.approved_reference(ledger, class_names, meta["view_id"]) or stats.source_reference(
        snap.id, tr_img, np.asarray(tr_lab, np.int64), len(class_names), v)
    tables = stats.build_tables(snap.manifest, snap.images, view_img, view_lab, tr_ids,
                                {r["sample_id"] for r in records}, class_names, ref, v)
    success, results = run_gx(tables, class_names, v, args.docs if v.docs else None)

    statistics = tables.statistics
    report = {
        "success": bool(success),
        "snapshot_id": snap.id,
        "view_id": meta["view_id"],
        "reference": {"kind": ref.kind, "snapshot_id": ref.snapshot_id, "view_id": ref.view_id},
        "results": results,
        "statistics": _jsonable(statistics),
        "thresholds": {k: getattr(v, k) for k in v.__dataclass_fields__},
    }
    write_json(Path(args.report), report)
    write_json(Path(args.validated), {"snapshot_id": snap.id, "view_id": meta["view_id"],
                                      "success": bool(success), "on_fail": v.on_fail})
    Path(args.approved).mkdir(parents=True, exist_ok=True)
    if success:
        append_ledger(args.approved, {
            "snapshot_id": snap.id, "view_id": meta["view_id"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "label_shares": statistics["label_shares"], "block_rates": statistics["block_rates"],
        })
    failed = [r for r in results if not r["success"]]
    _say(f"{'PASS' if success else 'FAIL'} view {meta['view_id'][:12]} against {ref.kind} "
         f"reference {ref.snapshot_id[:12]} ({len(results) - len(failed)}/{len(results)} expectations)")
    for r in failed:
        _say(f"  failed {r['check']}: {r['expectation']}({r['column']}) observed {r['observed']} "
             f"threshold {r['threshold']}")
    if not success:
        if v.on_fail == "warn":
            _say("on_fail=warn: continuing; train and the gate see success=false")
        else:
            raise DataGateFailed(f"the data gate refused view {meta['view_id'][:12]} "
                                 f"({', '.join(sorted({r['check'] for r in failed}))}): see {args.report}"
                                 f" and {args.docs}/index.html")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return stage.main("validate", run, PATHS, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
