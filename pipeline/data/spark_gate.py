"""``validate.engine: spark``: the data gate's statistics as Spark SQL over the store's Parquet
manifests, for stores one machine cannot hold (issue 19 item 6; docs/data-gate.md "Spark engine").

The pandas engine (the default) holds every row's columns in the stage's process. This one leaves
the rows on the cluster and brings back only what the judgement needs: per-class counts, the rows
of a label conflict, the within-radius pairs of near-duplicate phashes. What it computes is what
``validate.measure_view`` + ``build_tables`` compute, row for row (tests/test_validate_spark.py
compares every judged table and statistic of both engines), from the same inputs:

- the chain's delta manifests and the data-gate columns stored at ingest (``features`` files),
  each hashed on the driver against the header that names it before Spark reads it, joined by
  (file, ``_metadata.row_index``): a features file is row-aligned with its delta. The rows before
  the newest base come from that base's manifest and columns instead (:func:`base_start`), so a
  long history costs one base and at most ``store.BASE_EVERY`` deltas;
- the view's records, applied on the driver to the few rows they name (their pixels read from the
  packs and checked against the manifest's sha256, as the pandas engine checks them); the rows a
  record rebuilt are measured from those pixels (``stats.row_features``);
- the last approved view and the root as Spark tables of their train-row keys (sample id, content
  hash, class), so "new rows" is an anti-join on the cluster; their counts come from the ledger.

The GX suites then run on GX's Spark execution engine (``validate.run_gx(spark=...)``): the
per-sample table as the Spark DataFrame built here, the per-class tables (one row per class) as
small Spark DataFrames.

Refused with a message (exit 1), never approximated: a snapshot of the chain stored without the
data-gate columns or with other block-detector settings (validate it with ``engine=pandas``), and a
reference approved under other detector settings (the pandas engine re-measures it from pixels).

pyspark is imported only here and only when the engine is chosen; it needs a Java 17+ runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.data import significance as sig
from pipeline.data import stats, store
from pipeline.errors import UserError

PROVENANCE_COLUMNS = stats.PROVENANCE_COLUMNS


class SparkEngineError(UserError):
    """The Spark engine cannot judge this store as it is (exit 1, with what to do)."""


def session(v) -> Any:
    """The SparkSession of ``validate.spark_master`` and ``validate.spark_conf``."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkEngineError("validate.engine=spark needs pyspark (pip install -e '.[spark]') and a Java 17+ "
                               "runtime (apt-get install openjdk-17-jre-headless); or set validate.engine=pandas") from None
    # quiet and UI-less by default: a stage's output is its verdict, not Spark's progress bars
    conf = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
            "spark.sql.session.timeZone": "UTC", "spark.sql.shuffle.partitions": "8", **dict(v.spark_conf)}
    b = SparkSession.builder.master(v.spark_master).appName("poisongate-validate")
    for k, x in conf.items():
        b = b.config(k, str(x))
    try:
        spark = b.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - py4j raises its own types when the JVM cannot start
        raise SparkEngineError(f"could not start Spark (master {v.spark_master}): {type(exc).__name__}: {exc}. "
                               "Is a Java 17+ runtime installed (java -version)?") from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


@dataclass(frozen=True)
class RefSpec:
    """An approved view as the Spark engine compares with it (what ``validate.reference_of`` reads)."""

    entry: dict  # its ledger line
    records: list[dict]  # its saved records, the quarantined rows' left out
    gone: frozenset  # sample ids its quarantine left out


@dataclass
class SparkCounter:
    """``significance.Counter`` from per-class sums the cluster computed."""

    class_names: tuple[str, ...]
    sums: dict[str, np.ndarray]  # n b d, nn nb nd, sn sb sd: per class index
    differs: bool

    def present(self) -> tuple[str, ...]:
        return tuple(c for c, k in zip(self.class_names, self.sums["n"]) if k > 0)

    def counts(self, which: Optional[str], names: Sequence[str]) -> sig.ClassCounts:
        p = {None: "", "new": "n", "since": "s"}[which]  # the prefix of the sums' keys
        idx = [self.class_names.index(c) for c in names]
        return sig.ClassCounts(self.sums[p + "n" if p else "n"][idx], self.sums[p + "b"][idx], self.sums[p + "d"][idx])

    def since_differs(self) -> bool:
        return self.differs


@dataclass
class Judged:
    """What ``validate.run`` needs of a measured view: the tables (the samples table a Spark
    DataFrame), the statistics, and the view's per-class counts for the ledger."""

    frames: dict[str, Any]
    statistics: dict
    counts: sig.ClassCounts
    class_names: tuple[str, ...]
    last: Optional[sig.Reference]  # the references as the count tables used them
    root: Optional[sig.Reference]


def _verified(store_dir: Path, local: Path, digest: str, what: str) -> None:
    """Hash a file here, on the driver, against the digest its header names, before Spark reads it."""
    if not local.is_file() or store.file_sha256(local) != digest:
        raise store.DamagedStore(store_dir, local, f"is missing or does not match its sha256 ({what})")


def _paths(store_dir: Path, uri: str, headers: list[dict], detector: Optional[dict], start: int = 0) -> tuple[list, list]:
    """(digest, chain position, path as Spark reads it) of every non-empty delta from chain
    position ``start`` on (and, with ``detector``, features file), each hashed here against its
    header first."""
    deltas, feats = [], []
    for k, h in enumerate(headers):
        if k < start or not h["n_new"]:
            continue
        d = h["delta"]["sha256"]
        local = store._delta_path(store_dir, d)
        _verified(store_dir, local, d, f"the delta manifest of snapshot {h['id'][:12]}")
        deltas.append((d, k, f"{uri}/deltas/{d}.parquet"))
        if detector is None:
            continue
        f = h.get("features")
        if f is None or f["detector"] != detector:
            raise SparkEngineError(
                f"snapshot {h['id'][:12]} was stored {'without the data-gate columns' if f is None else 'with other block-detector settings'}"
                f" ({h['n_new']} rows): the Spark engine reads those columns and never the pixels; validate this store "
                "with validate.engine=pandas (it measures such rows from their pixels)")
        local = store._features_path(store_dir, f["sha256"])
        _verified(store_dir, local, f["sha256"], f"the data-gate columns of snapshot {h['id'][:12]}")
        feats.append((f["sha256"], k, f"{uri}/features/{f['sha256']}.parquet"))
    return deltas, feats


def _read(spark, files: list, schema) -> Any:
    """The files (digest, k, path) as one Spark table with the chain position ``k`` and ``r``, the
    row's index in its file."""
    from pyspark.sql import functions as F

    files_df = spark.createDataFrame([(d, k) for d, k, _ in files], "digest string, k long")
    df = (spark.read.schema(schema).parquet(*[p for _, _, p in files])
          .withColumn("digest", F.regexp_extract(F.col("_metadata.file_path"), r"([0-9a-f]{64})\.parquet$", 1))
          .withColumn("r", F.col("_metadata.row_index")))
    return df.join(F.broadcast(files_df), "digest")


def _spark_schema(arrow_schema) -> str:
    kind = {"string": "string", "int64": "bigint", "bool": "boolean", "uint64": "decimal(20,0)"}
    return ", ".join(f"{f.name} {kind[str(f.type)]}" for f in arrow_schema)


def _check_counts(spark_df, headers: list[dict], what: str, store_dir: Path, start: int = 0) -> None:
    """Each chain position's rows (from ``start`` on): as many as its header says, ``r`` running
    0..n-1 (so every row has the one manifest place ``r`` + the rows before its snapshot, as the
    pandas engine's concatenation gives it)."""
    from pyspark.sql import functions as F

    per_k = spark_df.groupBy("k").agg(F.count("*").alias("n"), F.min("r").alias("lo"), F.max("r").alias("hi"))
    got = {int(r["k"]): (int(r["n"]), r["lo"], r["hi"]) for r in per_k.collect()}
    for k, h in enumerate(headers[start:], start):
        n, lo, hi = got.get(k, (0, None, None))
        if n != h["n_new"] or (n and (lo, hi) != (0, n - 1)):
            raise store.DamagedStore(store_dir, store.header_path(store_dir, h["id"]),
                                     f"says {h['n_new']} new rows, its {what} holds {n} as Spark reads it"
                                     + ("" if n != h["n_new"] else f" (at places {lo}..{hi})"))


def base_start(store_dir: Path, headers: list[dict], detector: Optional[dict]) -> int:
    """The chain position whose base (on disk, and with ``detector``'s data-gate columns when
    ``detector`` is given) stands for every row before it, as a pandas load starts from it
    (``store.resolve``); 0 when none does. Spark then reads one base and at most
    ``store.BASE_EVERY`` deltas, not the whole history (issue 19 item 4)."""
    j = len(headers) - len(store._from_base(store_dir, headers))
    if j <= 0:
        return 0
    b = headers[j]["base"]
    if b["of"] != headers[j - 1]["id"] or b["rows"] != headers[j - 1]["n_rows"]:
        raise store.DamagedStore(store_dir, store.header_path(store_dir, headers[j]["id"]),
                                 f"names a base of {str(b['of'])[:12]} ({b['rows']} rows), not of its parent "
                                 f"{headers[j - 1]['id'][:12]} ({headers[j - 1]['n_rows']} rows)")
    if detector is not None and (b.get("features") is None or b["features"]["detector"] != detector):
        return 0  # the base holds no columns of these settings: the deltas' own files are read
    return j


def _base_rows(spark, store_dir: Path, uri: str, headers: list[dict], j: int, detector: Optional[dict]) -> Any:
    """The rows of chain positions 0..j-1 from the base of ``headers[j]`` (``base_start``): the
    delta columns, ``snapshot_id``, ``k`` and ``r`` (its place in its snapshot's delta: base row
    minus the rows of the snapshots before), and with ``detector`` the base's data-gate columns,
    row-aligned with its manifest. None when the base marks some rows' columns as not stored (the
    caller then reads the deltas, whose files say which snapshot lacks them)."""
    from pyspark.sql import functions as F

    h = headers[j]
    b = h["base"]
    _verified(store_dir, store._base_path(store_dir, b["manifest"], "parquet"), b["manifest"],
              f"the base manifest of snapshot {h['id'][:12]}")
    rows = (spark.read.schema(_spark_schema(store.BASE_SCHEMA)).parquet(f"{uri}/bases/{b['manifest']}.parquet")
            .withColumn("g", F.col("_metadata.row_index")))
    offsets = np.concatenate([[0], np.cumsum([x["n_new"] for x in headers[:j]])])
    ids = spark.createDataFrame([(k, x["id"], int(offsets[k])) for k, x in enumerate(headers[:j])],
                                "k long, snapshot_id string, off long")
    # a row naming a snapshot outside 0..j-1 drops out here, and _check_counts then refuses the store
    rows = rows.join(F.broadcast(ids), "snapshot_id").withColumn("r", F.col("g") - F.col("off")).drop("off")
    if detector is None:
        return rows.drop("g")
    fd = b["features"]["sha256"]
    _verified(store_dir, store._base_path(store_dir, fd, "parquet"), fd,
              f"the base's data-gate columns of snapshot {h['id'][:12]}")
    f = (spark.read.schema(_spark_schema(store.BASE_FEATURE_SCHEMA)).parquet(f"{uri}/bases/{fd}.parquet")
         .withColumn("g", F.col("_metadata.row_index")))
    agg = f.agg(F.count("*").alias("n"), F.sum((~F.col("stored")).cast("long")).alias("missing")).collect()[0]
    if int(agg["n"]) != b["rows"]:
        raise store.DamagedStore(store_dir, store._base_path(store_dir, fd, "parquet"),
                                 f"holds {int(agg['n'])} rows as Spark reads it, its header says {b['rows']}")
    if int(agg["missing"] or 0):
        return None
    return rows.join(f.drop("stored"), "g", "left").drop("g")


def chain_rows(spark, store_dir: Path, uri: str, headers: list[dict], detector: Optional[dict]) -> Any:
    """Every row of the chain's snapshot, as Spark reads the manifests: the delta columns, ``k``,
    ``r`` (the row's place: chain position, index in its delta), ``snapshot_id`` and, with
    ``detector``, the stored data-gate columns (``phash`` as a signed 64-bit int). The rows
    before the newest usable base come from that base (:func:`base_start`), the rest from their
    deltas."""
    from pyspark.sql import functions as F

    j = base_start(store_dir, headers, detector)
    based = _base_rows(spark, store_dir, uri, headers, j, detector) if j else None
    if based is None:
        j = 0
    deltas, feats = _paths(store_dir, uri, headers, detector, start=j)
    ids = spark.createDataFrame([(k, h["id"]) for k, h in enumerate(headers)], "k long, snapshot_id string")
    rows = None
    if deltas:
        rows = _read(spark, deltas, _spark_schema(store.DELTA_SCHEMA)).drop("digest")
        rows = rows.join(F.broadcast(ids), "k")
        if detector is not None:
            f = _read(spark, feats, _spark_schema(store.FEATURE_SCHEMA)).drop("digest")
            _check_counts(f, headers, "data-gate columns", store_dir, start=j)
            rows = rows.join(f, ["k", "r"], "left")
    if based is not None:
        rows = based if rows is None else based.unionByName(rows)
    if rows is None:  # no rows at all: an empty table of the delta columns
        rows = spark.createDataFrame([], _spark_schema(store.DELTA_SCHEMA) + ", k long, r long, snapshot_id string"
                                     + (", phash decimal(20,0), abnormal_block boolean, abnormal_block_at string"
                                        if detector is not None else ""))
    _check_counts(rows, headers, "delta manifest" if not j else "base and delta manifests", store_dir)
    if detector is None:
        return rows
    # Spark has no unsigned 64-bit type: the phash's bits as a signed long (xor and popcount agree)
    big = F.expr("CAST('9223372036854775808' AS DECIMAL(20,0))")  # 2^63: py4j passes no Python int that large
    return rows.withColumn("phash", F.when(F.col("phash") >= big, F.col("phash") - big - big)
                           .otherwise(F.col("phash")).cast("long"))


def _signed(h: np.ndarray) -> np.ndarray:
    return np.asarray(h, np.uint64).view(np.int64)


def _record_rows(spark, rows, store_dir: Path, headers: list[dict], records: Sequence[dict], v) -> pd.DataFrame:
    """The records applied to the rows they name, on the driver: per row its view hash and label,
    and (rebuilt pixels) its data-gate columns measured from the rebuilt pixels."""
    from pyspark.sql import functions as F

    from pipeline.data.view import apply_records

    cols = ["sample_id", "sha_now", "label_now", "o_phash", "o_block", "o_at", "o_changed"]
    if not records:
        return pd.DataFrame(columns=cols)
    want = sorted({str(r["sample_id"]) for r in records})
    ids = spark.createDataFrame([(i,) for i in want], "sample_id string")
    got = (rows.join(F.broadcast(ids), "sample_id").where(F.col("split") == "train")
           .select("sample_id", "sha256", "label", "pack", "pack_index").toPandas())
    got = got.sort_values("sample_id").reset_index(drop=True)
    shape = tuple(int(x) for x in headers[-1]["image_shape"])
    named = {p for h in headers for p in h["packs"]}
    imgs = np.empty((len(got), *shape), np.uint8)
    for pack, part in got.groupby("pack"):
        if pack not in named:
            raise store.DamagedStore(store_dir, store._pack_path(store_dir, pack), "is not a pack the chain names")
        src = store._Source(store._pack_path(store_dir, pack), pack, part.index.to_numpy(),
                            part["pack_index"].to_numpy(np.int64), "pack")
        arr = store._open_pack(store_dir, src, shape, got, headers[-1]["id"])
        imgs[part.index.to_numpy()] = arr[part["pack_index"].to_numpy(np.int64)]
    store.check_rows(imgs, np.arange(len(got)), got["sample_id"].tolist(), got["sha256"].tolist())
    # apply_records names a record whose row is not a train row of the snapshot
    view_img, view_lab, _ = apply_records(imgs, got["label"].to_numpy(np.int64), got["sample_id"].tolist(), records)
    after = {r["sample_id"]: r["sha256_after"] for r in records}
    changed = np.zeros(len(got), bool)
    pos = {i: k for k, i in enumerate(got["sample_id"])}
    for r in records:
        if r.get("transform"):
            changed[pos[str(r["sample_id"])]] = True
    out = pd.DataFrame({"sample_id": got["sample_id"], "sha_now": [after[i] for i in got["sample_id"]],
                        "label_now": view_lab.astype(np.int64), "o_phash": np.zeros(len(got), np.int64),
                        "o_block": np.zeros(len(got), bool), "o_at": [""] * len(got), "o_changed": changed})
    if changed.any():
        m = stats.row_features(view_img, v, np.flatnonzero(changed))
        out.loc[changed, "o_phash"] = _signed(m["phash"].to_numpy(np.uint64))
        out.loc[changed, "o_block"] = m["abnormal_block"].to_numpy(bool)
        out.loc[changed, "o_at"] = m["abnormal_block_at"].astype(str).to_numpy()
    return out[cols]


def _view_rows(spark, rows, overrides: pd.DataFrame, gone: Sequence[str], class_names: Sequence[str]) -> Any:
    """The snapshot's rows as the view has them: ``sha_now``, ``label_now``, the data-gate columns,
    ``poisoned``, ``class_name``; the quarantined rows left out."""
    from pyspark.sql import functions as F

    o = spark.createDataFrame(overrides.astype({"o_phash": np.int64, "o_block": bool, "o_changed": bool}),
                              "sample_id string, sha_now string, label_now long, o_phash long, o_block boolean, "
                              "o_at string, o_changed boolean")
    df = rows.join(F.broadcast(o), "sample_id", "left")
    ch = F.coalesce(F.col("o_changed"), F.lit(False))
    df = df.select(
        "k", "r", "sample_id", "split", "source_uri", "ingest_time", "snapshot_id",
        F.coalesce("sha_now", "sha256").alias("sha_now"), F.coalesce("label_now", "label").alias("label_now"),
        F.when(ch, F.col("o_phash")).otherwise(F.col("phash")).alias("phash"),
        F.when(ch, F.col("o_block")).otherwise(F.col("abnormal_block")).alias("abnormal_block"),
        F.when(ch, F.col("o_at")).otherwise(F.col("abnormal_block_at")).alias("abnormal_block_at"),
        F.col("o_changed").isNotNull().alias("poisoned"))
    if gone:
        g = spark.createDataFrame([(str(i),) for i in sorted(gone)], "sample_id string")
        df = df.join(F.broadcast(g), "sample_id", "left_anti")
    return df.withColumn("class_name", _class_name(class_names))


def _class_name(class_names: Sequence[str]) -> Any:
    """``label_now`` as its class name (the keys compare names, as the pandas engine's do)."""
    from pyspark.sql import functions as F

    return F.element_at(F.array(*[F.lit(str(c)) for c in class_names]), F.col("label_now").cast("int") + 1)


def _ref_keys(spark, store_dir: Path, uri: str, ref: RefSpec) -> Any:
    """The train-row keys (sample_id, sha_now, class_name) of an approved view."""
    from pyspark.sql import functions as F

    headers = store.chain(store_dir, ref.entry["snapshot_id"])
    names = [str(c) for c in headers[-1]["class_names"]]
    rows = chain_rows(spark, store_dir, uri, headers, None).where(F.col("split") == "train")
    o = pd.DataFrame({"sample_id": [str(r["sample_id"]) for r in ref.records],
                      "sha_now": [str(r["sha256_after"]) for r in ref.records],
                      "label_now": [int(r["new_label"]) for r in ref.records]}).drop_duplicates("sample_id", keep="last")
    o_df = spark.createDataFrame(o, "sample_id string, sha_now string, label_now long")
    df = rows.join(F.broadcast(o_df), "sample_id", "left").select(
        "sample_id", F.coalesce("sha_now", "sha256").alias("sha_now"), F.coalesce("label_now", "label").alias("label_now"))
    if ref.gone:
        g = spark.createDataFrame([(str(i),) for i in sorted(ref.gone)], "sample_id string")
        df = df.join(F.broadcast(g), "sample_id", "left_anti")
    return df.select("sample_id", "sha_now", _class_name(names).alias("class_name"))


def _reference(ref: Optional[RefSpec], class_detector: dict) -> Optional[sig.Reference]:
    if ref is None:
        return None
    if ref.entry["detector"] != class_detector:
        raise SparkEngineError(
            f"approved view {ref.entry['view_id'][:12]} was measured with other block-detector settings: its counts "
            "must be re-measured from its pixels, which the Spark engine never reads; validate this release with "
            "validate.engine=pandas once (the next releases compare with it)")
    return sig.Reference(ref.entry["view_id"], ref.entry["snapshot_id"], ref.entry["counts"], np.zeros(0, np.uint64))


def _index(spark, df) -> Any:
    """``train_index`` (place among the train rows) and ``all_index`` (train rows first, then the
    test rows, each in manifest order): the row numbers the pandas engine's tables use."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    tr = (F.col("split") == "train").cast("long")
    per = {int(r["k"]): (int(r["t"]), int(r["n"])) for r in df.groupBy("k").agg(F.sum(tr).alias("t"), F.count("*").alias("n")).collect()}
    off, t0, e0 = [], 0, 0
    for k in sorted(per):
        off.append((k, t0, e0))
        t0 += per[k][0]
        e0 += per[k][1] - per[k][0]
    offs = spark.createDataFrame(off or [(0, 0, 0)], "k long, t_off long, e_off long")
    w = Window.partitionBy("k").orderBy("r").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    df = df.withColumn("_tr", tr).withColumn("_tr_rank", F.sum("_tr").over(w) - 1) \
        .withColumn("_te_rank", F.sum(1 - F.col("_tr")).over(w) - 1).join(F.broadcast(offs), "k")
    df = df.withColumn("train_index", F.when(F.col("_tr") == 1, F.col("t_off") + F.col("_tr_rank")))
    df = df.withColumn("all_index", F.coalesce(F.col("train_index"), F.lit(t0) + F.col("e_off") + F.col("_te_rank")))
    return df.drop("_tr", "_tr_rank", "_te_rank", "t_off", "e_off"), t0


def _conflicts(df, class_names: Sequence[str]) -> pd.DataFrame:
    """``significance.label_conflicts`` of the rows whose hash carries two labels (all splits)."""
    from pyspark.sql import functions as F

    bad = df.groupBy("sha_now").agg(F.countDistinct("label_now").alias("nl")).where(F.col("nl") > 1).select("sha_now")
    sub = df.join(bad, "sha_now").select("all_index", "sha_now", "label_now", "sample_id").toPandas()
    sub = sub.sort_values("all_index").reset_index(drop=True)
    t = sig.label_conflicts(sub["sha_now"].tolist(), sub["label_now"].to_numpy(np.int64))
    t["rows"] = t["rows"].map(lambda rs: [int(sub["all_index"].iat[i]) for i in rs])
    t["labels"] = t["labels"].map(lambda ls: [class_names[int(i)] for i in ls])
    t["sample_ids"] = t["rows"].map(lambda rs: [str(x) for x in sub.set_index("all_index").loc[rs, "sample_id"]])
    return t


def _clusters(spark, train, radius: int, class_names: Sequence[str]) -> pd.DataFrame:
    """``significance.near_duplicate_clusters`` with the candidate pairs found by a join on the
    cluster: multi-index hashing, as ``near_duplicate_pairs`` does it in memory (radius + 1 bit
    bands; two hashes within ``radius`` bits agree exactly on one band), then the exact distance."""
    from pyspark.sql import functions as F

    bounds = np.linspace(0, 64, radius + 2).round().astype(int)
    bands = [F.struct(F.lit(b).alias("band"),
                      F.shiftrightunsigned("phash", int(lo)).bitwiseAND(F.lit((1 << (hi - lo)) - 1 if hi - lo < 64 else -1)).alias("key"))
             for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
    # As near_duplicate_clusters does in memory: the pairs of distinct hashes, between their first
    # rows, and each later row of a hash joined to its first at distance 0. The same components and
    # max distances as every row pair, but k rows sharing a hash bring k rows to the driver, not
    # k(k-1)/2 (10,000 blank images: 50M pairs).
    firsts = train.groupBy("phash").agg(F.min("train_index").alias("train_index"))
    repeats = (train.select(F.col("train_index").alias("j"), "phash").join(firsts, "phash")
               .where(F.col("j") != F.col("train_index"))
               .select(F.col("train_index").alias("i"), "j", F.lit(0).cast("long").alias("distance")))
    keyed = firsts.select("train_index", "phash", F.explode(F.array(*bands)).alias("b")) \
        .select("train_index", "phash", "b.band", "b.key")
    a, b = keyed.alias("a"), keyed.alias("b")
    pairs = (a.join(b, (F.col("a.band") == F.col("b.band")) & (F.col("a.key") == F.col("b.key"))
                    & (F.col("a.train_index") < F.col("b.train_index")))
             .select(F.col("a.train_index").alias("i"), F.col("b.train_index").alias("j"),
                     F.bit_count(F.col("a.phash").bitwiseXOR(F.col("b.phash"))).cast("long").alias("distance"))
             .where(F.col("distance") <= radius).distinct().unionByName(repeats).toPandas())
    pairs = pairs.sort_values(["i", "j"]).reset_index(drop=True)
    involved = np.unique(np.r_[pairs["i"].to_numpy(np.int64), pairs["j"].to_numpy(np.int64)])
    if len(involved):
        ids = spark.createDataFrame([(int(i),) for i in involved], "train_index long")
        info = train.join(F.broadcast(ids), "train_index").select("train_index", "label_now", "sample_id") \
            .toPandas().set_index("train_index").loc[involved]
    else:
        info = pd.DataFrame({"label_now": [], "sample_id": []})
    t = sig.clusters_from_pairs(pairs, involved, info["label_now"].to_numpy(np.int64))
    t["labels"] = t["labels"].map(lambda ls: [class_names[int(i)] for i in ls])
    t["sample_ids"] = t["rows"].map(lambda rs: [str(info.at[i, "sample_id"]) for i in rs])
    return t


def judge_view(spark, store_dir: str | Path, snapshot_id: str, records: Sequence[dict], gone: Sequence[str], v,
               last: Optional[RefSpec], root: Optional[RefSpec], rate_checks: Sequence[str]) -> Judged:
    """The data gate's tables and statistics of a view, computed on Spark (module docstring)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    store_dir = Path(store_dir)
    uri = (v.spark_store or str(store_dir.resolve())).rstrip("/")
    headers = store.chain(store_dir, snapshot_id)
    names = tuple(str(c) for c in headers[-1]["class_names"])
    detector = stats.detector_settings(v)
    last_ref, root_ref = _reference(last, detector), _reference(root, detector)
    rows = chain_rows(spark, store_dir, uri, headers, detector)
    overrides = _record_rows(spark, rows, store_dir, headers, records, v)
    df = _view_rows(spark, rows, overrides, gone, names)
    df = df.withColumn("dup", F.count("*").over(Window.partitionBy("sha_now")) > 1)  # pixels on another row
    df, n_train = _index(spark, df)
    df = df.cache()
    train = df.where(F.col("split") == "train")
    key = ["sample_id", "sha_now", "class_name"]
    new = F.lit(True)
    since = None
    if last is not None:
        train = train.join(_ref_keys(spark, store_dir, uri, last).withColumn("_in_last", F.lit(True)), key, "left")
        new = F.col("_in_last").isNull()
        if root is not None and root.entry["view_id"] != last.entry["view_id"]:
            train = train.join(_ref_keys(spark, store_dir, uri, root).withColumn("_in_root", F.lit(True)), key, "left")
            since = F.col("_in_root").isNull()
    train = train.withColumn("new", new).withColumn("since", since if since is not None else F.col("new"))
    i = lambda c: F.sum(c.cast("long"))  # noqa: E731
    b, d, nw, sn = F.col("abnormal_block"), F.col("dup"), F.col("new"), F.col("since")
    agg = train.groupBy("label_now").agg(
        F.count("*").alias("n"), i(b).alias("b"), i(d).alias("d"), i(nw).alias("nn"), i(nw & b).alias("nb"),
        i(nw & d).alias("nd"), i(sn).alias("sn"), i(sn & b).alias("sb"), i(sn & d).alias("sd"),
        i(nw != sn).alias("diff")).collect()
    sums = {k: np.zeros(len(names), np.int64) for k in ("n", "b", "d", "nn", "nb", "nd", "sn", "sb", "sd")}
    differs = False
    for r in agg:
        for k in sums:
            sums[k][int(r["label_now"])] = int(r[k])
        differs |= int(r["diff"]) > 0
    counter = SparkCounter(names, sums, since is not None and differs)
    frames: dict[str, Any] = {}
    full = counter.counts(None, names)
    n = max(1, int(full.rows.sum()))
    frames["classes"] = pd.DataFrame({
        "class_index": np.arange(len(names)), "class_name": list(names), "train_rows": full.rows, "share": full.rows / n,
        "block_rate": np.divide(full.block, full.rows, out=np.zeros(len(names)), where=full.rows > 0),
        "duplicate_rate": np.divide(full.dup, full.rows, out=np.zeros(len(names)), where=full.rows > 0)})
    frames.update(sig.count_tables(counter, v, last=last_ref, root=root_ref, rate_checks=rate_checks))
    frames["label_conflicts"] = _conflicts(df, names)
    frames["near_duplicate_clusters"] = _clusters(spark, df.where(F.col("split") == "train"), int(v.near_dup_radius), names)
    prov = F.lit(True)
    for c in PROVENANCE_COLUMNS:
        prov = prov & F.col(c).isNotNull() & (F.col(c) != "")
    tot = df.agg(F.count("*").alias("n"), i(prov).alias("prov")).collect()[0]
    nul = lambda c: F.when(F.col(c) != "", F.col(c))  # noqa: E731 - the pandas engine's "" -> None
    frames["samples"] = df.select(
        nul("sample_id").alias("sample_id"), nul("sha_now").alias("sha256"), F.col("label_now").alias("label"),
        nul("split").alias("split"), *[nul(c).alias(c) for c in PROVENANCE_COLUMNS], "poisoned",
        F.when(F.col("split") == "train", F.col("abnormal_block")).otherwise(F.lit(False)).alias("abnormal_block"),
        F.when(F.col("split") == "train", F.col("abnormal_block_at")).otherwise(F.lit("")).alias("abnormal_block_at"))
    new_counts = counter.counts("new", names).rows if last is not None else full.rows
    statistics = {
        "n_rows": int(tot["n"]),
        "n_train": int(n_train),
        "n_poisoned_rows": len(records),
        "n_new_rows": int(new_counts.sum()),
        "train_rows_measured_from_pixels": int(overrides["o_changed"].sum()) if len(overrides) else 0,
        "new_rows_per_class": {c: int(x) for c, x in zip(names, new_counts)},
        "provenance_coverage": float(tot["prov"]) / int(tot["n"]) if int(tot["n"]) else 1.0,
        "abnormal_block_rows_train": int(full.block.sum()),
        "duplicate_rows_train": int(full.dup.sum()),
        "label_conflicts": int(len(frames["label_conflicts"])),
        "near_duplicate_clusters": int(len(frames["near_duplicate_clusters"])),
        "label_shares": {c: float(x) for c, x in zip(names, frames["classes"]["share"])},
        "block_rates": {c: float(x) for c, x in zip(names, frames["classes"]["block_rate"])},
    }
    return Judged(frames, statistics, full, names, last_ref, root_ref)
