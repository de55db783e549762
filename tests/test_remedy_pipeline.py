"""The pipeline side of the remedies (issue 13): the quarantine record (pipeline/remedy.py), the
quarantined training view (poison stage), the fine-tuning step of the train stage, and the gate's
treatment of a remedied version."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import config, poison, remedy
from pipeline.data import store, view
from pipeline.data.store import IntegrityError
from pipeline.lineage import LineageError
from pipeline.schema import ConfigError

SNAP, VIEW, OTHER = "a" * 64, "b" * 64, "c" * 64


def suspects_csv(rows: list[tuple[str, str, int]], extra: str = "") -> str:
    lines = ["row_id,sha256,class,knn,spectral,flagged_knn,flagged_spectral,flagged" + extra]
    for i, (sid, sha, flag) in enumerate(rows):
        lines.append(f"{sid},{sha},7,{0.1 * i:.1f},{0.5},{flag},0,{flag}")
    return "\n".join(lines) + "\n"


def test_record_round_trip_and_digest(tmp_path):
    text = suspects_csv([("train/7/b", "1" * 64, 1), ("train/7/a", "2" * 64, 1), ("train/1/c", "3" * 64, 0)])
    rows = remedy.parse_suspects(text)
    assert [r["sample_id"] for r in rows] == ["train/7/b", "train/7/a"]  # unflagged rows are not quarantined
    assert rows[0]["detectors"] == ["knn"] and rows[1]["scores"] == {"knn": 0.1, "spectral": 0.5}
    rec = remedy.build_record(rows, SNAP, VIEW, source={"suspects": "x.csv"}, created="t")
    assert [r["sample_id"] for r in rec["rows"]] == ["train/7/a", "train/7/b"]  # one set, one digest
    p = tmp_path / "q.json"
    p.write_text(json.dumps(rec))
    back = remedy.read_record(p)
    assert back == rec and back["digest"] == remedy.record_digest(rec)
    # the same rows in another order give the same record
    assert remedy.build_record(rows[::-1], SNAP, VIEW, source={"suspects": "x.csv"}, created="t") == rec
    assert remedy.verify_record(remedy.empty_record())["rows"] == []


@pytest.mark.parametrize("edit", ["row", "lineage", "drop_row", "not_json", "int_id", "null_sha", "repeat"])
def test_tampered_record_is_refused(tmp_path, edit):
    rec = remedy.build_record(remedy.parse_suspects(suspects_csv([("r1", "1" * 64, 1), ("r2", "2" * 64, 1)])),
                              SNAP, VIEW)
    if edit == "row":
        rec["rows"][0]["sha256"] = "f" * 64
    elif edit == "lineage":
        rec["snapshot_id"] = OTHER
    elif edit == "drop_row":
        rec["rows"].pop()
    elif edit in ("int_id", "null_sha", "repeat"):
        # digests recomputed: a forger can do that; the types and the one-set rule still refuse it
        if edit == "int_id":
            rec["rows"][0]["sample_id"] = 7
        elif edit == "null_sha":
            rec["rows"][0]["sha256"] = None
        else:
            rec["rows"].append(dict(rec["rows"][0]))
        rec["digest"] = remedy.record_digest(rec)
    p = tmp_path / "q.json"
    p.write_text("{not json" if edit == "not_json" else json.dumps(rec))
    with pytest.raises(remedy.QuarantineTampered) as exc:
        remedy.read_record(p)
    assert exc.value.exit_code == 1 and str(p) in str(exc.value)


def test_suspects_without_required_columns_or_flags_are_refused():
    with pytest.raises(remedy.QuarantineError, match="sha256"):
        remedy.parse_suspects("row_id,class,flagged\nr1,7,1\n")
    with pytest.raises(remedy.QuarantineError, match="flagged must be 0 or 1"):
        remedy.parse_suspects("row_id,sha256,flagged\nr1," + "1" * 64 + ",yes\n")
    with pytest.raises(remedy.QuarantineError, match="nothing to quarantine"):
        remedy.build_record(remedy.parse_suspects(suspects_csv([("r1", "1" * 64, 0)])), SNAP, VIEW)


def _rows(ids=("r0", "r1", "r2", "r3")):
    return list(ids), [str(i) * 64 for i in range(len(ids))]


def test_quarantined_rows_checks_lineage_and_row_hashes():
    ids, hashes = _rows()
    rec = remedy.build_record([{"sample_id": "r2", "sha256": hashes[2]}, {"sample_id": "r1", "sha256": hashes[1]}],
                              SNAP, VIEW)
    kw = dict(sample_ids=ids, hashes=hashes)
    assert remedy.quarantined_rows(rec, snapshot_id=SNAP, ancestry=[SNAP], base_view_id=VIEW, **kw) == [1, 2]
    # a grown snapshot whose ancestry holds the record's: accepted (another view id is expected there)
    assert remedy.quarantined_rows(rec, snapshot_id=OTHER, ancestry=[SNAP, OTHER], base_view_id=OTHER, **kw) == [1, 2]
    with pytest.raises(LineageError, match="nor one of its ancestors"):
        remedy.quarantined_rows(rec, snapshot_id=OTHER, ancestry=[OTHER], base_view_id=VIEW, **kw)
    with pytest.raises(LineageError, match="another attack or seed"):
        remedy.quarantined_rows(rec, snapshot_id=SNAP, ancestry=[SNAP], base_view_id=OTHER, **kw)
    changed = list(hashes)
    changed[2] = "e" * 64
    with pytest.raises(remedy.QuarantineTampered, match="r2"):
        remedy.quarantined_rows(rec, snapshot_id=SNAP, ancestry=[SNAP], base_view_id=VIEW, sample_ids=ids, hashes=changed)
    with pytest.raises(remedy.QuarantineTampered, match="not train rows"):
        remedy.quarantined_rows(rec, snapshot_id=SNAP, ancestry=[SNAP], base_view_id=VIEW, sample_ids=["r0"], hashes=["0" * 64])
    with pytest.raises(remedy.QuarantineError, match="lists no rows"):
        remedy.quarantined_rows(remedy.empty_record(), snapshot_id=SNAP, ancestry=[SNAP], base_view_id=VIEW, **kw)


def test_reserve_pool_and_blocked_version():
    ids, hashes = _rows()
    labels = [0, 1, 1, 0]
    approved = {"r0": (hashes[0], 0), "r1": (hashes[1], 7), "r3": ("x" * 64, 0)}  # r1 relabelled, r3 other pixels
    assert remedy.reserve_pool(ids, hashes, labels, source="champion", approved=approved) == [0]
    assert remedy.reserve_pool(ids, hashes, labels, source="trusted", trusted=["r[12]"], transformed={"r2"}) == [1]
    v = lambda n, view, verdict: SimpleNamespace(version=str(n), tags={"view_id": view, "poisongate.verdict": verdict})
    versions = [v(1, VIEW, "blocked"), v(2, OTHER, "blocked"), v(3, VIEW, "passed"), v(4, VIEW, "blocked")]
    assert remedy.blocked_version_of(versions, VIEW) == "4" and remedy.blocked_version_of(versions, SNAP) is None


@pytest.mark.parametrize("override, key", [
    ("remedy.name=retrain", "remedy.name"), ("remedy.method=anp", "remedy.method"), ("remedy.lr=0", "remedy.lr"),
    ("remedy.reserve.fraction=1.5", "remedy.reserve.fraction"), ("remedy.max_fraction=1.0", "remedy.max_fraction"),
])
def test_remedy_config_is_range_checked(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.compose(["remedy=finetune", override])
    with pytest.raises(ConfigError, match="needs at least one pattern"):
        config.compose(["remedy=finetune", "remedy.reserve.source=trusted"])


# --------------------------------------------------------------------------- the quarantined view


from tests.test_poison import digits_store, write_params  # noqa: E402,F401 - the same module-scoped store


def run_poison(ds, tmp: Path, record: Path, *overrides: str) -> tuple[int, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    params = write_params(tmp / "params.yaml", "attack=backdoor", *overrides)
    out = tmp / "view"
    rc = poison.main(["--params", str(params), "--pointer", str(ds["pointer"]), "--store", str(ds["store"]),
                      "--quarantine", str(record), "--out", str(out)])
    return rc, out


def store_files(st: Path) -> dict:
    return {str(p.relative_to(st)): p.read_bytes() for p in sorted(st.rglob("*")) if p.is_file()}


def test_quarantined_view_leaves_the_flagged_rows_out(digits_store, tmp_path, capsys):
    before = store_files(digits_store["store"])
    missing = tmp_path / "absent.json"
    rc, base = run_poison(digits_store, tmp_path / "base", missing)  # remedy=none: the record is never read
    assert rc == 0
    meta, records = view.read_view(base)
    # the hand-made detector: the view's own poison records as suspects (an oracle)
    suspects = tmp_path / "suspects.csv"
    suspects.write_text(suspects_csv([(r["sample_id"], r["sha256_after"], 1) for r in records]))
    rec_path = tmp_path / "quarantine.json"
    assert remedy.main(["quarantine", "--suspects", str(suspects), "--view", str(base), "--inspect",
                        str(tmp_path / "no-inspect.json"), "--out", str(rec_path)]) == 0
    rec = remedy.read_record(rec_path)
    assert rec["view_id"] == meta["view_id"] and len(rec["rows"]) == len(records) > 0

    rc, qv = run_poison(digits_store, tmp_path / "q", rec_path, "remedy=quarantine")
    assert rc == 0, capsys.readouterr().err
    qmeta, _ = view.read_view(qv)
    assert qmeta["view_id"] != meta["view_id"] and qmeta["quarantine"]["record_sha256"] == rec["digest"]
    full = view.load_training_view(base, digits_store["store"])
    tv = view.load_training_view(qv, digits_store["store"])
    gone = {r["sample_id"] for r in records}
    assert len(tv.labels) == len(full.labels) - len(gone) and not gone & set(tv.sample_ids)
    assert tv.poisoned_rows == [] and tv.quarantine["record_sha256"] == rec["digest"]
    assert store_files(digits_store["store"]) == before, "the raw store is never modified"

    # the view's quarantine list edited by hand: its id no longer matches
    vj = qv / "view.json"
    edited = json.loads(vj.read_text())
    edited["quarantine"]["rows"].pop()
    vj.write_text(json.dumps(edited))
    with pytest.raises(IntegrityError, match="was edited"):
        view.read_view(qv)

    # a record made on another view of the same snapshot (another attack seed): refused, exit 2
    rc, _ = run_poison(digits_store, tmp_path / "seed", rec_path, "remedy=quarantine", "attack.seed=1")
    assert rc == 2 and "another attack or seed" in capsys.readouterr().err
    # a tampered record: refused, exit 1
    bad = json.loads(rec_path.read_text())
    bad["rows"] = bad["rows"][1:]
    rec_path.write_text(json.dumps(bad))
    rc, _ = run_poison(digits_store, tmp_path / "tampered", rec_path, "remedy=quarantine")
    assert rc == 1 and "does not hash to its digest" in capsys.readouterr().err
    # remedy=quarantine with the empty record the repository ships: refused, says what to do
    rc, _ = run_poison(digits_store, tmp_path / "empty", Path("data/quarantine.json"), "remedy=quarantine")
    assert rc == 2 and "lists no rows" in capsys.readouterr().err


def test_a_quarantine_without_an_attack_loads_no_row_and_equals_the_loaded_view(digits_store, tmp_path, monkeypatch,
                                                                                capsys):
    """The production remedy (no attack, remedy=quarantine): the record's rows are found in the
    pass that verifies the store (issue 19 item 3: no manifest load), and the view is the one the
    loaded path makes (make_view), byte for byte. A record naming a test row or a row whose hash
    moved is refused as on the loaded path."""
    from pipeline.schema import AttackConfig

    def poison_run(name: str, rec: Path, *overrides: str) -> tuple[int, Path]:
        (tmp_path / name).mkdir()
        params = write_params(tmp_path / name / "params.yaml", "attack=none", *overrides)
        out = tmp_path / name / "view"
        return poison.main(["--params", str(params), "--pointer", str(digits_store["pointer"]), "--store",
                            str(digits_store["store"]), "--quarantine", str(rec), "--out", str(out)]), out

    rc, base = poison_run("base", tmp_path / "absent.json")
    assert rc == 0
    sid = store.read_pointer(digits_store["pointer"])["snapshot_id"]
    snap = store.load_snapshot(digits_store["store"], sid)
    man = snap.manifest
    train = man[man["split"] == "train"]
    picked = [(r.sample_id, r.sha256, 1) for r in train.iloc[[3, 40, 41, 700]].itertuples()]
    suspects = tmp_path / "suspects.csv"
    suspects.write_text(suspects_csv(picked))
    rec_path = tmp_path / "quarantine.json"
    assert remedy.main(["quarantine", "--suspects", str(suspects), "--view", str(base), "--inspect",
                        str(tmp_path / "no-inspect.json"), "--out", str(rec_path)]) == 0
    rec = remedy.read_record(rec_path)
    loaded = poison.make_view(snap, AttackConfig(), rec, [h["id"] for h in store.chain(digits_store["store"], sid)])
    with monkeypatch.context() as m:
        def boom(*a, **k):
            raise AssertionError("the quarantined identity view loaded the manifest")

        for name in ("load_snapshot", "load_manifest"):
            m.setattr(store, name, boom)
        rc, out = poison_run("q", rec_path, "remedy=quarantine")
    assert rc == 0, capsys.readouterr().err
    meta, data = json.loads((out / "view.json").read_text()), (out / "records.csv").read_bytes()
    assert meta == loaded[0] and data == loaded[1] and meta["n_quarantined"] == 4
    tv = view.load_training_view(out, digits_store["store"])
    assert len(tv.labels) == len(train) - 4 and not {p[0] for p in picked} & set(tv.sample_ids)
    assert "4 row(s) quarantined" in capsys.readouterr().err

    test_row = man[man["split"] == "test"].iloc[0]
    for name, rows, err in (("test_row", picked[:1] + [(test_row.sample_id, test_row.sha256, 1)], "not train rows"),
                            ("moved", picked[:1] + [(picked[1][0], "0" * 64, 1)], "do not hash")):
        suspects.write_text(suspects_csv(rows))
        bad = tmp_path / f"{name}.json"
        assert remedy.main(["quarantine", "--suspects", str(suspects), "--view", str(base), "--inspect",
                            str(tmp_path / "no-inspect.json"), "--out", str(bad)]) == 0
        capsys.readouterr()
        rc, out = poison_run(name, bad, "remedy=quarantine")
        assert rc == 1 and err in capsys.readouterr().err and not (out / "view.json").exists()


def test_drop_quarantined_reindexes_poisoned_rows():
    images = np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2, 1)
    from pipeline.core.hashing import sample_hash

    q = {"rows": [{"sample_id": "s1", "sha256": sample_hash(images[1])}]}
    img, lab, ids, poisoned = view.drop_quarantined(images, np.arange(5), [f"s{i}" for i in range(5)], [1, 3], q)
    assert ids == ["s0", "s2", "s3", "s4"] and poisoned == [2] and list(lab) == [0, 2, 3, 4]
    q["rows"][0]["sha256"] = "0" * 64
    with pytest.raises(IntegrityError, match="s1"):
        view.drop_quarantined(images, np.arange(5), [f"s{i}" for i in range(5)], [1], q)


# --------------------------------------------------------------------------- the fine-tuning step


def test_finetune_step_on_digits(digits_split):
    """The train stage's remedy step: a reserve of 10% of the rows drawn from the pool only, the
    pruned channels and reserve accuracies reported, the model's weights changed."""
    from pipeline.core.train import TrainSpec, train_model
    from pipeline.train import apply_finetune

    torch.set_num_threads(1)
    xtr, ytr, _, _ = digits_split
    spec = TrainSpec(epochs=2, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", seed=0, device="cpu")
    model, _, _ = train_model(xtr, ytr, 10, "small_cnn", 16, spec)
    cfg = config.from_container(config.compose(["remedy=finetune", "remedy.epochs=2", "train.device=cpu"]))
    tv = SimpleNamespace(images=xtr, labels=ytr, sample_ids=[f"r{i}" for i in range(len(ytr))])
    pool = list(range(0, len(ytr), 3))  # a third of the rows may serve
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    out = apply_finetune(model, tv, cfg, pool)
    assert out["method"] == "fine_prune" and out["reserve_rows"] == round(0.1 * len(ytr))
    assert out["reserve_pool"] == len(pool) and 0 <= out["pruned_channels"] < out["channels"]
    assert 0.0 <= out["reserve_accuracy_after"] <= 1.0 and out["reserve_accuracy_pruned"] >= out["reserve_accuracy_before"] - 0.05
    assert any(not torch.equal(w0[k], v) for k, v in model.state_dict().items())
    cfg = config.from_container(config.compose(["remedy=finetune", "remedy.reserve.fraction=0.5", "train.device=cpu"]))
    with pytest.raises(ValueError, match="cannot be drawn"):  # 50% of the rows from a pool of a third
        apply_finetune(model, tv, cfg, pool)


# --------------------------------------------------------------------------- the gate and a remedied version


def test_remedied_version_that_fails_a_check_never_becomes_champion(released):
    """A remedied candidate is judged like any other: one failed check (here the accuracy floor
    raised out of reach) blocks it and `champion` stays; its lineage tags are on the version."""
    released.compose("remedy=finetune", "remedy.epochs=2", "gate.min_accuracy=1.0")
    rc, out = released.run("train")
    assert rc == 0, out[-3000:]
    report = released.json("reports/train.json")
    version = report["model_version"]
    assert report["remedy"]["method"] == "fine_prune" and report["remedy"]["reserve_rows"] > 0
    rc, out = released.run("evaluate")
    assert rc == 0, out[-3000:]
    rc, out = released.run("gate")
    assert rc == 1
    gate = released.json("reports/gate.json")
    assert gate["passed"] is False and "accuracy" in gate["failed"]
    assert released.champion() == "1"
    tags = released.client().get_model_version("poisongate-digits", version).tags
    assert tags["poisongate.verdict"] == "blocked" and tags[remedy.TAG_METHOD] == "fine_prune"
    assert remedy.TAG_OF in tags
