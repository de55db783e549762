"""``validate.engine: spark`` (issue 19 item 6): the data gate's statistics as Spark SQL over the
store's Parquet manifests and its GX suites on GX's Spark execution engine, in local mode.

Each case runs the real stages (snapshot, poison) once, then the validate stage twice on copies of
the same state, once per engine: every judged table, every statistic and the verdict must be the
same. Skipped only when pyspark or a Java runtime is missing (then the skip says which).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import validate as V

from test_validate import _write_source, default_vcfg, noise_images

try:
    import pyspark  # noqa: F401
    _SKIP = "" if shutil.which("java") else "no Java runtime (apt-get install openjdk-17-jre-headless)"
except ImportError:
    _SKIP = "pyspark is not installed (pip install -e '.[spark]')"

pytestmark = pytest.mark.skipif(bool(_SKIP), reason=f"the Spark engine needs it: {_SKIP}")


@pytest.fixture(scope="module", autouse=True)
def _stop_spark():
    """The validate stage's process exits with its Spark session; in-process tests stop it, so
    the worker's later tests do not share the CPU with idle executors."""
    yield
    if not _SKIP:
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            active.stop()


def _compose(tmp: Path, src: Path, name: str, *overrides: str) -> Path:
    from pipeline import config

    path = tmp / f"{name}.yaml"
    assert config.main(["compose", "-o", str(path), "data=imagefolder", f"data.path={src}", "data.workers=1",
                        "validate.docs=false", *overrides]) == 0
    return path


def _ingest(tmp: Path, params: Path) -> None:
    from pipeline import poison, snapshot

    assert snapshot.main(["--params", str(params), "--store", str(tmp / "store"), "--pointer",
                          str(tmp / "snapshot.json"), "--report", str(tmp / "snapshot_report.json")]) == 0
    assert poison.main(["--params", str(params), "--pointer", str(tmp / "snapshot.json"), "--store",
                        str(tmp / "store"), "--out", str(tmp / "view")]) == 0


def _validate(tmp: Path, params: Path) -> tuple[int, dict]:
    rc = V.main(["--params", str(params), "--pointer", str(tmp / "snapshot.json"), "--store", str(tmp / "store"),
                 "--view", str(tmp / "view"), "--approved", str(tmp / "approved"), "--report",
                 str(tmp / "validation.json"), "--docs", str(tmp / "gx"), "--validated", str(tmp / "validated.json"),
                 "--history", str(tmp / "gx_history")])
    return rc, json.loads((tmp / "validation.json").read_text())


def _both(tmp: Path, state: Path, pandas_params: Path, spark_params: Path) -> tuple[tuple, tuple]:
    """The validate stage on two copies of ``state``, one per engine."""
    runs = []
    for name, params in (("pandas", pandas_params), ("spark", spark_params)):
        work = tmp / f"run-{name}"
        shutil.copytree(state, work)
        runs.append(_validate(work, params))
    return runs[0], runs[1]


def _same(a: dict, b: dict) -> None:
    assert a["engine"] == "pandas" and b["engine"] == "spark"
    assert a["success"] == b["success"]
    assert a["statistics"] == b["statistics"]
    assert a["tests"].keys() == b["tests"].keys()
    for name in a["tests"]:
        assert a["tests"][name] == b["tests"][name], name
    key = lambda r: (r["check"], r["column"], r["expectation"])  # noqa: E731
    strip = lambda r: {k: r[k] for k in ("check", "column", "expectation", "success", "threshold")}  # noqa: E731
    assert sorted(map(strip, a["results"]), key=key) == sorted(map(strip, b["results"]), key=key)
    assert a["blocked"] == b["blocked"]


def test_spark_engine_judges_a_growing_poisoned_store_exactly_as_pandas(tmp_path, digits_split):
    """A root release, then an append carrying exact and edited copies under another label and a
    patch on class 7, validated under a backdoor view (records that rebuild pixels): both engines
    give the same tables, statistics, expectations and verdict, and the Spark run says so."""
    xtr, ytr, xte, yte = digits_split
    src = tmp_path / "src"
    _write_source(src, xtr[:400], ytr[:400], "train", "r")
    _write_source(src, xte[:80], yte[:80], "test", "t")
    state = tmp_path / "state"
    p = _compose(tmp_path, src, "pandas")
    s = _compose(tmp_path, src, "spark", "validate.engine=spark", "validate.spark_master='local[1]'")
    _ingest(state, p)
    assert _validate(state, p)[0] == 0  # the root, approved (the clean test compares a root's engines)

    _write_source(src, xtr[400:600], ytr[400:600], "train", "a")  # clean growth
    _write_source(src, xtr[:3], (ytr[:3] + 1) % 10, "train", "copy")  # exact copies, other label
    blurred = np.clip(xtr[3:6].astype(int) + 3, 0, 255).astype(np.uint8)
    _write_source(src, blurred, (ytr[3:6] + 1) % 10, "train", "edit")  # near copies, other label
    sevens = xtr[600:][ytr[600:] == 7][:12].copy()
    sevens[:, 5:8, 5:8, 0] = 255
    _write_source(src, sevens, np.full(len(sevens), 7), "train", "patch")
    attack = ["attack=backdoor", "attack.rate=0.1"]
    p = _compose(tmp_path, src, "pandas2", *attack)
    s = _compose(tmp_path, src, "spark2", *attack, "validate.engine=spark", "validate.spark_master='local[1]'")
    _ingest(state, p)
    (rc_p, rep_p), (rc_s, rep_s) = _both(tmp_path / "append", state, p, s)
    assert rc_p == rc_s == 1
    _same(rep_p, rep_s)
    assert rep_s["statistics"]["n_poisoned_rows"] > 0 and rep_s["statistics"]["train_rows_measured_from_pixels"] > 0
    failed = {r["check"] for r in rep_s["results"] if not r["success"]}
    assert {"label_conflicts", "near_duplicate_clusters", "block_rate"} <= failed, failed
    assert not (tmp_path / "append" / "run-spark" / "approved" / "ledger.jsonl").read_text().count("\n") > 1


def test_spark_engine_clean_append_passes_and_is_approved_like_pandas(tmp_path):
    """Clean growth (noise textures: no block, no duplicate) passes on both engines, and both
    append the same counts to the approved ledger."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    _write_source(src, noise_images(rng, 300), np.repeat(np.arange(10), 30), "train", "r")
    _write_source(src, noise_images(rng, 50), np.repeat(np.arange(10), 5), "test", "t")
    state = tmp_path / "state"
    p = _compose(tmp_path, src, "pandas")
    # with the GX Data Docs: the site is built from the Spark engine's results too
    s = _compose(tmp_path, src, "spark", "validate.engine=spark", "validate.spark_master='local[1]'", "validate.docs=true")
    _ingest(state, p)
    assert _validate(state, p)[0] == 0  # the root, approved
    _write_source(src, noise_images(rng, 120), np.repeat(np.arange(10), 12), "train", "a")
    _ingest(state, p)
    (rc_p, rep_p), (rc_s, rep_s) = _both(tmp_path, state, p, s)
    assert rc_p == rc_s == 0
    _same(rep_p, rep_s)
    assert rep_s["statistics"]["n_new_rows"] == 120
    assert (tmp_path / "run-spark" / "gx" / "index.html").is_file()
    lines = [V.read_ledger(tmp_path / f"run-{e}" / "approved")[-1] for e in ("pandas", "spark")]
    assert lines[0]["counts"] == lines[1]["counts"] and lines[0]["view_id"] == lines[1]["view_id"]

    # a quarantined view (remedy=quarantine) is judged without the rows it leaves out, alike
    from pipeline.data import spark_gate, store

    sid = store.read_pointer(state / "snapshot.json")["snapshot_id"]
    man = store.read_manifest(state / "store", sid)
    gone = set(man.loc[man["split"] == "train", "sample_id"].iloc[::37].tolist())
    ledger = V.read_ledger(state / "approved")
    v = default_vcfg()
    snap, feats = V._without(*V._load_measurable(state / "store", sid, v), gone)
    ref = V.reference_of(ledger[-1], state / "store", state / "approved", v)
    want = V.build_tables(snap, V.measure_view(snap, [], v, features=feats), v, ref, ref)
    from pyspark.sql import SparkSession

    got = spark_gate.judge_view(SparkSession.getActiveSession(), state / "store", sid, [], sorted(gone), v,
                                V._ref_spec(state / "approved", ledger[-1]), V._ref_spec(state / "approved", ledger[-1]),
                                V.data_checks.rate_checks())
    assert got.statistics == want.statistics and got.statistics["n_train"] == 420 - len(gone)
    for name in want.frames:
        if name != "samples":
            pd.testing.assert_frame_equal(got.frames[name].reset_index(drop=True),
                                          want.frames[name].reset_index(drop=True), check_dtype=False, obj=name)


def test_spark_engine_refuses_other_detector_settings_and_edited_manifests(tmp_path, digits_split):
    """Columns stored with other block-detector settings are refused with what to do, not measured
    some other way; a delta or features file edited after ingest is a damaged store before Spark
    reads a byte of it."""
    from pipeline.data import spark_gate, store
    from pipeline.errors import UserError

    xtr, ytr, xte, yte = digits_split
    src = tmp_path / "src"
    _write_source(src, xtr[:100], ytr[:100], "train", "r")
    _write_source(src, xte[:80], yte[:80], "test", "t")
    p = _compose(tmp_path, src, "pandas")
    _ingest(tmp_path, p)
    sid = store.read_pointer(tmp_path / "snapshot.json")["snapshot_id"]
    h = store.read_header(tmp_path / "store", sid)
    v = default_vcfg()
    root = tmp_path / "store"
    assert spark_gate._paths(root, str(root), [h], spark_gate.stats.detector_settings(v))  # the stored settings
    v.block_size = 4  # other detector settings than the stored columns'
    with pytest.raises(UserError, match="other block-detector settings.*engine=pandas"):
        spark_gate._paths(root, str(root), [h], spark_gate.stats.detector_settings(v))
    # what Spark will read is hashed first: an edited delta or features file is a damaged store
    for path in (root / "deltas" / f"{h['delta']['sha256']}.parquet", root / "features" / f"{h['features']['sha256']}.parquet"):
        good = path.read_bytes()
        path.chmod(0o644)
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        with pytest.raises(store.DamagedStore, match=path.name[:12]):
            spark_gate._paths(root, str(root), [h], spark_gate.stats.detector_settings(default_vcfg()))
        path.write_bytes(good)


def test_spark_engine_reads_the_newest_base_not_the_whole_history(tmp_path, digits_split, monkeypatch):
    """A history long enough to carry a base (``store.BASE_EVERY`` lowered to 2): the Spark engine
    reads that base and the deltas after it, as a pandas load does. Shown by removing, from the
    Spark run's copy of the store only, the delta and features files the base stands for (but the
    root's, which the approved reference reads): its
    tables, statistics and verdict are still the pandas engine's on the complete store, over a
    poisoned append. An edited base is a damaged store before Spark reads it."""
    from pipeline.data import spark_gate, store

    monkeypatch.setattr(store, "BASE_EVERY", 2)
    xtr, ytr, xte, yte = digits_split
    src = tmp_path / "src"
    _write_source(src, xtr[:300], ytr[:300], "train", "r")
    _write_source(src, xte[:60], yte[:60], "test", "t")
    state = tmp_path / "state"
    p = _compose(tmp_path, src, "pandas")
    _ingest(state, p)
    assert _validate(state, p)[0] == 0
    for a in range(3):  # clean growth, one snapshot each
        _write_source(src, xtr[300 + 60 * a:360 + 60 * a], ytr[300 + 60 * a:360 + 60 * a], "train", f"a{a}")
        _ingest(state, p)
    _write_source(src, xtr[:3], (ytr[:3] + 1) % 10, "train", "copy")  # exact copies under another label
    attack = ["attack=backdoor", "attack.rate=0.1"]
    p = _compose(tmp_path, src, "pandas2", *attack)
    s = _compose(tmp_path, src, "spark2", *attack, "validate.engine=spark", "validate.spark_master='local[1]'")
    _ingest(state, p)

    sid = store.read_pointer(state / "snapshot.json")["snapshot_id"]
    headers = store.chain(state / "store", sid)
    v = default_vcfg()
    j = spark_gate.base_start(state / "store", headers, spark_gate.stats.detector_settings(v))
    assert len(headers) == 5 and j >= 2 and headers[j]["base"]["rows"] == headers[j - 1]["n_rows"]

    runs = []
    for name, params in (("pandas", p), ("spark", s)):
        work = tmp_path / f"run-{name}"
        shutil.copytree(state, work)
        if name == "spark":
            # what the base stands for: Spark must not need it (the root's stay: the approved
            # reference is the root's view, and its chain has no base)
            for h in headers[1:j]:
                (work / "store" / "deltas" / f"{h['delta']['sha256']}.parquet").unlink()
                (work / "store" / "features" / f"{h['features']['sha256']}.parquet").unlink()
        runs.append(_validate(work, params))
    (rc_p, rep_p), (rc_s, rep_s) = runs
    assert rc_p == rc_s == 1
    _same(rep_p, rep_s)
    assert rep_s["statistics"]["n_rows"] == headers[-1]["n_rows"] and rep_s["statistics"]["label_conflicts"] >= 1

    base = state / "store" / "bases" / f"{headers[j]['base']['manifest']}.parquet"
    good = base.read_bytes()
    base.chmod(0o644)
    base.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    from pyspark.sql import SparkSession

    with pytest.raises(store.DamagedStore, match=base.name[:12]):
        spark_gate.chain_rows(SparkSession.getActiveSession(), state / "store", str(state / "store"), headers,
                              spark_gate.stats.detector_settings(v))


def test_spark_clusters_of_repeated_hashes_equal_the_in_memory_clusters():
    """The Spark engine's near-duplicate clusters join rows that share a hash through its first row,
    as ``significance.near_duplicate_clusters`` does: on hashes repeated by the dozen (and near
    copies of them, the top bit included: Spark's longs are signed), the same cluster table,
    and only k rows a hash of k copies reach the driver's edge list."""
    from pyspark.sql import functions as F

    from pipeline.data import significance as S
    from pipeline.data import spark_gate as G

    spark = G.session(dataclasses.replace(default_vcfg(), spark_master="local[1]"))
    rng = np.random.default_rng(4)
    names = ("a", "b", "c")
    seen = {"edges": []}
    real = S.clusters_from_pairs
    for trial in range(3):
        base = rng.integers(0, 2**63, 30, dtype=np.int64).astype(np.uint64) | (np.uint64(trial % 2) << np.uint64(63))
        near = base[:10] ^ (np.uint64(1) << rng.integers(0, 64, 10).astype(np.uint64))
        pool = np.concatenate([base, near])
        h = pool[rng.integers(0, len(pool), 400)]
        y = rng.integers(0, 3, len(h))
        train = spark.createDataFrame(pd.DataFrame({"train_index": np.arange(len(h), dtype=np.int64),
                                                    "phash": G._signed(h), "label_now": y.astype(np.int64),
                                                    "sample_id": [f"r{i}" for i in range(len(h))]}))
        for radius in (0, 2):
            want = S.near_duplicate_clusters(h, y, radius)
            want["labels"] = want["labels"].map(lambda ls: [names[int(i)] for i in ls])
            want["sample_ids"] = want["rows"].map(lambda rs: [f"r{i}" for i in rs])

            def spy(pairs, *a, **k):
                seen["edges"].append(len(pairs))
                return real(pairs, *a, **k)

            S.clusters_from_pairs = spy
            try:
                got = G._clusters(spark, train.where(F.lit(True)), radius, names)
            finally:
                S.clusters_from_pairs = real
            assert len(want) > 0
            pd.testing.assert_frame_equal(got.reset_index(drop=True), want[got.columns].reset_index(drop=True),
                                          obj=f"trial {trial} radius {radius}")
            # 400 rows over <= 40 hashes: star edges (<= 400 + distinct pairs), not ~400^2/80 row pairs
            assert seen["edges"][-1] < 400 + 40 * 39 // 2, seen["edges"][-1]
