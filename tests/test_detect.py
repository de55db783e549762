"""Fast tier for poisoned-sample detection (pipeline.core.detect) and out-of-fold probabilities
(pipeline.core.kfold): synthetic features where the answer is known, the hand-written numerics
against sklearn, input validation, and one small digits end-to-end check."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.core import detect
from pipeline.core.detect import DetectError, RobustConfig, robust_detect, tail_scan_ratio
from pipeline.core.kfold import KFoldError, out_of_fold_probs, stratified_folds
from pipeline.core.train import TrainSpec

K, D = 5, 16


def gaussian_classes(n_per: int, seed: int, spread: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """K well-separated isotropic Gaussian classes in D dims (class c at spread * e_c)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), n_per)
    f = rng.normal(size=(len(y), D))
    f[np.arange(len(y)), y] += spread
    return f, y


def plant_cluster(f: np.ndarray, y: np.ndarray, cls: int, share: float, seed: int, shift: float = 10.0):
    """Append poisoned rows labelled ``cls`` making up ``share`` of that class: a tight cluster
    off in a direction no clean class uses (a trigger's feature), about twice as far from the
    clean rows of its class as they are from each other (what digits backdoors show)."""
    rng = np.random.default_rng(seed)
    n_clean = int((y == cls).sum())
    n_p = int(round(share * n_clean / (1 - share)))
    p = rng.normal(scale=0.7, size=(n_p, D))
    p[:, cls] += 8.0
    p[:, D - 1] += shift
    fx = np.concatenate([f, p])
    yx = np.concatenate([y, np.full(n_p, cls)])
    pm = np.concatenate([np.zeros(len(y), bool), np.ones(n_p, bool)])
    return fx, yx, pm


# --------------------------------------------------------------------------- robust detector


def test_robust_finds_a_cluster_that_is_45_percent_of_its_class():
    f, y = gaussian_classes(120, seed=0)
    ref_f, ref_y = gaussian_classes(40, seed=1)
    fx, yx, pm = plant_cluster(f, y, cls=2, share=0.45, seed=2)
    assert math.isclose(pm.sum() / (yx == 2).sum(), 0.45, abs_tol=0.01)
    det = robust_detect(fx, yx, K, ref_f, ref_y)
    cfg = RobustConfig()
    assert det.suspicious_classes(cfg.class_threshold) == [2]
    assert det.class_stat[2] > 2 * np.delete(det.class_stat, 2).max()
    assert det.flagged[pm].mean() >= 0.95  # recall
    assert det.flagged[~pm].mean() <= 0.05  # the clean rows of class 2 mostly survive too
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(pm, det.primary) > 0.99


def test_robust_without_reference_while_the_cluster_is_a_minority():
    f, y = gaussian_classes(120, seed=3)
    fx, yx, pm = plant_cluster(f, y, cls=4, share=0.30, seed=4)
    det = robust_detect(fx, yx, K)
    assert det.params["mode"] == "self"
    assert det.suspicious_classes(RobustConfig().class_threshold) == [4]
    assert det.flagged[pm].mean() >= 0.9


def test_robust_catches_a_flipped_minority_by_foreignness():
    """Rows of class 0 relabelled 3: near class 0's reference, far from 3's."""
    f, y = gaussian_classes(120, seed=5)
    ref_f, ref_y = gaussian_classes(40, seed=6)
    flip = np.flatnonzero(y == 0)[:12]
    y2 = y.copy()
    y2[flip] = 3
    det = robust_detect(f, y2, K, ref_f, ref_y)
    assert 3 in det.suspicious_classes(RobustConfig().class_threshold)
    assert det.flagged[flip].all()
    assert (det.scores["foreignness"][flip] > 1).all()  # closer to class 0 than to their label


def test_two_view_catches_what_the_candidate_learned_to_hide():
    """A source-specific backdoor as the candidate sees it: triggered rows of class 0 labelled 1
    sit just outside class 1's clean cloud (mildly outlying, not foreign). A clean model never
    learned the trigger, so there they sit inside class 0: foreign to their label."""
    rng = np.random.default_rng(20)
    f, y = gaussian_classes(120, seed=21)
    ref_f, ref_y = gaussian_classes(40, seed=22)
    g, _ = gaussian_classes(120, seed=23)  # the clean model's view of the same clean rows
    g_ref, _ = gaussian_classes(40, seed=24)
    n_p = 10
    cand_p = rng.normal(size=(n_p, D))
    cand_p[:, 1] += 8.0
    cand_p[:, D - 1] += 3.0  # a small shift: the candidate pulled them next to class 1
    clean_p = rng.normal(size=(n_p, D))
    clean_p[:, 0] += 8.0  # the clean model sees class-0 digits
    fx, gx = np.concatenate([f, cand_p]), np.concatenate([g, clean_p])
    yx = np.concatenate([y, np.ones(n_p, np.int64)])
    pm = np.r_[np.zeros(len(y), bool), np.ones(n_p, bool)]
    thr = RobustConfig().class_threshold
    one = robust_detect(fx, yx, K, ref_f, ref_y)
    two = robust_detect(fx, yx, K, ref_f, ref_y, gx, g_ref)
    assert one.params["mode"] == "reference" and two.params["mode"] == "two_view"
    assert one.suspicious_classes(thr) == []
    assert two.suspicious_classes(thr) == [1]
    assert two.flagged[pm].all()
    assert two.flagged[~pm & (yx != 1)].mean() < 0.01  # elsewhere only the top 0.5%
    assert two.flagged[~pm & (yx == 1)].mean() < 0.25  # a suspicious class: above the pool's 90% (~10%)
    assert (two.scores["foreignness"][pm] > 1).all() and (one.scores["foreignness"][pm] < 1).all()


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_robust_clean_gaussian_classes_stay_under_the_flag_rate(seed):
    f, y = gaussian_classes(150, seed=seed)
    ref_f, ref_y = gaussian_classes(40, seed=seed + 100)
    cfg = RobustConfig()
    det = robust_detect(f, y, K, ref_f, ref_y, config=cfg)
    assert det.suspicious_classes(cfg.class_threshold) == []
    # each class flags rows above the other classes' 99.5% quantile: ~0.5%, allow 4x for sampling
    assert det.flagged.mean() <= 4 * (1 - cfg.flag_quantile)


def test_tail_scan_ratio_by_hand():
    pool = np.arange(1, 101, dtype=float)  # quantile(1 - m/n) is easy to read off
    cls = np.array([1.0] * 7 + [300.0, 200.0, 150.0])  # n = 10, 3 extreme rows
    ratio, m = tail_scan_ratio(cls, pool, min_depth=3, max_depth_frac=0.5)
    # depth 3: s_(3) = 150 over quantile(0.7) of 1..100 = 70.3
    assert m == 3
    assert ratio == pytest.approx(150.0 / np.quantile(pool, 0.7))
    assert tail_scan_ratio(cls, pool, min_depth=6, max_depth_frac=0.5) == (0.0, 0)  # class too small to scan


def test_robust_is_deterministic_and_reports_its_settings():
    f, y = gaussian_classes(60, seed=7)
    a = robust_detect(f, y, K)
    b = robust_detect(f, y, K)
    np.testing.assert_array_equal(a.primary, b.primary)
    assert a.params["k_ref"] == RobustConfig().k_ref and a.class_stat_name == "tail_ratio"
    assert set(a.class_stats) == {"tail_ratio", "tail_ratio_shallow"}


# --------------------------------------------------------------------------- published baselines


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.33])
def test_spectral_signatures_removes_exactly_one_and_a_half_eps_per_class(eps):
    f, y = gaussian_classes(97, seed=8)
    fx, yx, _ = plant_cluster(f, y, cls=1, share=0.45, seed=9)
    det = detect.spectral_signatures(fx, yx, K, eps=eps)
    for c in range(K):
        n_c = int((yx == c).sum())
        assert det.flagged[yx == c].sum() == min(n_c, math.ceil(1.5 * eps * n_c))


def test_spectral_signatures_fails_on_a_half_poisoned_class():
    """The published rule removes 1.5 eps of the class: with eps = 10% it cannot reach a 45% cluster."""
    f, y = gaussian_classes(120, seed=13)
    fx, yx, pm = plant_cluster(f, y, cls=2, share=0.45, seed=14)
    det = detect.spectral_signatures(fx, yx, K, eps=0.1)
    assert det.flagged[pm].mean() < 0.5


def test_activation_clustering_smaller_and_relative_size():
    f, y = gaussian_classes(100, seed=15)
    fx, yx, pm = plant_cluster(f, y, cls=0, share=0.2, seed=16, shift=10.0)
    smaller = detect.activation_clustering(fx, yx, K, analysis="smaller")
    for c in range(K):  # BackdoorBench's setting flags a cluster in every class
        assert 0 < smaller.flagged[yx == c].sum() < (yx == c).sum()
    rel = detect.activation_clustering(fx, yx, K, analysis="relative-size")
    assert rel.flagged[pm].all()
    assert rel.flagged[yx != 0].mean() < 0.2  # balanced splits of clean blobs are >= 35%: mostly kept
    assert rel.class_stat[0] == rel.class_stat.max()  # the silhouette is highest where the cluster is


def test_numerics_match_sklearn():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(17)
    x = np.concatenate([rng.normal(size=(60, 4)), rng.normal(size=(40, 4)) + 5])
    lab = detect.kmeans(x, 2, seed=0)
    truth = np.r_[np.zeros(60), np.ones(40)]
    assert (lab == truth).all() or (lab == 1 - truth).all()
    assert detect.silhouette(x, lab) == pytest.approx(silhouette_score(x, lab), rel=1e-9)
    z = detect.pca_project(x, 2)
    from sklearn.decomposition import PCA

    ref = PCA(2).fit_transform(x)
    np.testing.assert_allclose(np.abs(z), np.abs(ref), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- validation


def test_input_validation():
    f, y = gaussian_classes(20, seed=18)
    with pytest.raises(DetectError, match="labels must lie"):
        robust_detect(f, y + 1, K)
    with pytest.raises(DetectError, match=r"\(N, D\)"):
        detect.spectral_signatures(f[:, 0], y, K)
    bad = f.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DetectError, match="NaN"):
        detect.activation_clustering(bad, y, K)
    with pytest.raises(DetectError, match="labels must be"):
        robust_detect(f, y[:-1], K)
    with pytest.raises(DetectError, match="eps"):
        detect.spectral_signatures(f, y, K, eps=0.0)
    with pytest.raises(DetectError, match="both"):
        robust_detect(f, y, K, reference_features=f)
    with pytest.raises(DetectError, match="dims"):
        robust_detect(f, y, K, f[:, :4], y)
    with pytest.raises(DetectError, match=r"classes \[4\]"):
        robust_detect(f, y, K, f[y != 4], y[y != 4])
    with pytest.raises(DetectError, match="k_ref"):
        robust_detect(f, y, K, config=RobustConfig(k_ref=0))
    with pytest.raises(DetectError, match="need the reference"):
        robust_detect(f, y, K, clean_features=f, clean_reference_features=f)
    with pytest.raises(DetectError, match="both clean"):
        robust_detect(f, y, K, f, y, clean_features=f)
    with pytest.raises(DetectError, match="same training rows"):
        robust_detect(f, y, K, f, y, f[:-1], f)
    with pytest.raises(DetectError, match="same reference rows"):
        robust_detect(f, y, K, f, y, f, np.concatenate([f, f]))
    with pytest.raises(DetectError, match="analysis"):
        detect.activation_clustering(f, y, K, analysis="largest")
    assert issubclass(DetectError, ValueError)


# --------------------------------------------------------------------------- k-fold


def test_stratified_folds_balance_and_validation():
    y = np.repeat(np.arange(3), [10, 7, 5])
    folds = stratified_folds(y, 4, seed=0)
    counts = np.bincount(folds, minlength=4)
    assert counts.max() - counts.min() <= 1
    for c in range(3):
        per = np.bincount(folds[y == c], minlength=4)
        assert per.max() - per.min() <= 1
    np.testing.assert_array_equal(folds, stratified_folds(y, 4, seed=0))
    with pytest.raises(KFoldError, match="k must"):
        stratified_folds(y, 1)
    with pytest.raises(KFoldError, match="rows"):
        stratified_folds(y[:3], 4)


FAST = TrainSpec(epochs=6, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", seed=0, device="cpu")


def test_out_of_fold_probs_come_from_models_that_never_saw_the_row(digits_split):
    torch.set_num_threads(1)
    xtr, ytr, _, _ = digits_split
    x, y = xtr[:600], ytr[:600].copy()
    flipped = np.arange(0, 600, 30)  # 20 rows relabelled to the next class
    y_true = y[flipped].copy()
    y[flipped] = (y[flipped] + 1) % 10
    events = []
    probs = out_of_fold_probs(x, y, 10, "small_cnn", 16, FAST, k=3, seed=0,
                              progress=lambda e: events.append(e) if e["event"] == "fold" else None)
    assert probs.shape == (600, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    held = [e["heldout_rows"] for e in events]
    assert len(held) == 3
    for e in events:  # each model's training rows and the rows it predicts are disjoint
        assert not np.intersect1d(e["train_rows"], e["heldout_rows"]).size
    np.testing.assert_array_equal(np.sort(np.concatenate(held)), np.arange(600))  # every row once
    # models that never saw the flipped rows predict their true class, not the given label
    assert (probs[flipped].argmax(1) == y_true).mean() >= 0.8
    assert probs[flipped, y[flipped]].mean() < 0.2
    with pytest.raises(KFoldError, match="uint8"):
        out_of_fold_probs(x.astype(np.float32), y, 10, "small_cnn", 16, FAST, k=3)
    with pytest.raises(KFoldError, match="0..9"):
        out_of_fold_probs(x, y + 1, 10, "small_cnn", 16, FAST, k=3)


# --------------------------------------------------------------------------- digits end to end


def test_digits_all_to_one_backdoor_found_where_spectral_signatures_stop(digits_split):
    """All-to-one 1-px trigger at 10%: the target class is ~47% poison. The robust detector (two
    views: the candidate and a clean model trained on the test split) blocks exactly the target
    class and flags every poisoned row; SS as published removes 15% of each class."""
    from pipeline.core.attacks import poison
    from pipeline.core.features import penultimate_features
    from pipeline.core.train import train_model

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = digits_split
    spec = {"name": "backdoor", "source": None, "target": 0, "rate": 0.1, "seed": 0,
            "trigger": {"kind": "patch", "size": 1, "location": "bottom_right", "pattern": "white"}}
    ids = [f"r{i}" for i in range(len(ytr))]
    xp, yp, recs = poison(xtr, ytr, ids, spec, [str(i) for i in range(10)])
    pm = np.isin(ids, [r["sample_id"] for r in recs])
    assert pm.sum() / (yp == 0).sum() > 0.4
    recipe = TrainSpec(epochs=10, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", device="cpu")
    model, _, _ = train_model(xp, yp, 10, "small_cnn", 32, recipe)
    # the trusted split alone, as many optimizer steps as the candidate (450 rows: 3x the epochs)
    clean_model, _, _ = train_model(xte, yte, 10, "small_cnn", 32, dataclasses.replace(recipe, epochs=30))
    f, fr = penultimate_features(model, xp, device="cpu"), penultimate_features(model, xte, device="cpu")
    g, gr = penultimate_features(clean_model, xp, device="cpu"), penultimate_features(clean_model, xte, device="cpu")
    det = robust_detect(f, yp, 10, fr, yte, g, gr)
    assert det.params["mode"] == "two_view"
    assert det.suspicious == (0,)
    assert det.flagged[pm].mean() >= 0.95
    assert det.flagged[~pm].mean() < 0.05
    ss = detect.spectral_signatures(f, yp, 10, eps=0.1)
    assert ss.flagged[pm].mean() < 0.5


def test_out_of_fold_probs_keep_a_lazy_view_lazy(digits_split, tmp_path):
    # inspect hands k-fold the store's lazy training view: at 1M rows, reading it whole (the old
    # np.asarray) and copying each fold's rows out of it was 1.3 GiB before any model trained
    import dataclasses

    from pipeline.data.rows import LazyRows, file_identity

    torch.set_num_threads(1)
    x, y = digits_split[0][:150], digits_split[1][:150]
    raw = tmp_path / "rows.u8"
    raw.write_bytes(x.tobytes())
    reads = []

    class Counted(LazyRows):
        def subset(self, rows):
            s = super().subset(rows)
            return Counted(s._packs, s._pack_of, s._index, s._image_shape, s._replaced)

        def _read(self, rows):
            reads.append(len(rows))
            return super()._read(rows)

    lazy = Counted([(raw, 0, 150, file_identity(raw))], np.zeros(150, np.int32), np.arange(150), x.shape[1:])
    spec = dataclasses.replace(FAST, epochs=1, batch_size=32, data_path="stream")
    want = out_of_fold_probs(x, y, 10, "small_cnn", 8, spec, k=3, seed=0, batch_size=40)
    got = out_of_fold_probs(lazy, y, 10, "small_cnn", 8, spec, k=3, seed=0, batch_size=40)
    np.testing.assert_array_equal(got, want)
    # batches, and each fold's rows once for its channel statistics (chunks of 64 MiB): never the set
    assert reads and max(reads) < len(x), reads


# --------------------------------------------------------------------------- the two-view detector in blocks


def _two_view_case():
    """The source-specific case above: a clean model's view where the poisoned rows look like class 0."""
    rng = np.random.default_rng(30)
    f, y = gaussian_classes(120, seed=31)
    ref_f, ref_y = gaussian_classes(40, seed=32)
    g, _ = gaussian_classes(120, seed=33)
    g_ref, _ = gaussian_classes(40, seed=34)
    cand_p, clean_p = rng.normal(size=(10, D)), rng.normal(size=(10, D))
    cand_p[:, 1] += 8.0
    cand_p[:, D - 1] += 3.0
    clean_p[:, 0] += 8.0
    return (np.concatenate([f, cand_p]), np.concatenate([g, clean_p]), np.r_[y, np.ones(10, np.int64)],
            ref_f, ref_y, g_ref)


def test_two_view_in_blocks_scores_what_the_whole_arrays_score():
    # inspect scores the training view a block at a time (issue 19: at 1M rows the two feature
    # matrices alone were 2 GiB); a row's scores depend on it and the reference only, so uneven
    # blocks, a one-row block included, must give the whole-array Detection
    fx, gx, yx, ref_f, ref_y, g_ref = _two_view_case()
    whole = robust_detect(fx, yx, K, ref_f, ref_y, gx, g_ref)
    cuts = [0, 1, 38, 300, len(yx)]
    blocks = ((fx[a:b], gx[a:b]) for a, b in zip(cuts, cuts[1:]))
    got = detect.robust_detect_blocks(blocks, yx, K, ref_f, ref_y, g_ref)
    assert got.params == whole.params and got.params["mode"] == "two_view"
    for name, s in whole.scores.items():
        np.testing.assert_allclose(got.scores[name], s, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got.flagged, whole.flagged)
    np.testing.assert_allclose(got.class_stat, whole.class_stat, rtol=1e-6)
    assert got.suspicious == whole.suspicious == (1,)


def test_two_view_in_blocks_refuses_blocks_that_do_not_fit_the_labels():
    fx, gx, yx, ref_f, ref_y, g_ref = _two_view_case()
    n = len(yx)

    def run(blocks):
        return detect.robust_detect_blocks(iter(blocks), yx, K, ref_f, ref_y, g_ref)

    with pytest.raises(DetectError, match=f"held {n - 5} training rows, the labels {n}"):
        run([(fx[:-5], gx[:-5])])
    with pytest.raises(DetectError, match="does not fit the"):
        run([(fx, gx), (fx[:1], gx[:1])])
    with pytest.raises(DetectError, match="1 clean feature rows"):
        run([(fx[:2], gx[:1])])
    with pytest.raises(DetectError, match="clean-model features have 3 dims"):
        run([(fx, gx[:, :3])])
    with pytest.raises(DetectError, match="NaN or inf"):
        bad = fx.copy()
        bad[7, 0] = np.nan
        run([(bad, gx)])
    with pytest.raises(DetectError, match="clean_reference_features have 3 rows"):
        detect.robust_detect_blocks(iter([(fx, gx)]), yx, K, ref_f, ref_y, g_ref[:3])
    # an empty block adds nothing (a chunker's last block may be empty)
    whole = run([(fx, gx)])
    split = run([(fx[:0], gx[:0]), (fx[:9], gx[:9]), (fx[9:9], gx[9:9]), (fx[9:], gx[9:])])
    np.testing.assert_array_equal(split.flagged, whole.flagged)


def test_two_view_detect_reads_the_view_a_block_at_a_time(digits_split, tmp_path):
    # the stage hands the detector the store's lazy view: no read may take more than one block,
    # and the Detection is the one of the whole arrays through the same two models
    from pipeline.core.features import penultimate_features
    from pipeline.core.inspection import two_view_detect
    from pipeline.core.models import build_model
    from pipeline.data.rows import LazyRows, file_identity

    torch.manual_seed(0)
    x, y, xte, yte = digits_split
    x, y = x[:300], y[:300]
    cand, clean = build_model("small_cnn", 10, 1, 8, width=8), build_model("small_cnn", 10, 1, 8, width=8)
    raw = tmp_path / "rows.u8"
    raw.write_bytes(x.tobytes())
    reads = []

    class Counted(LazyRows):
        def _read(self, rows):
            reads.append(len(rows))
            return super()._read(rows)

    lazy = Counted([(raw, 0, len(x), file_identity(raw))], np.zeros(len(x), np.int32), np.arange(len(x)), x.shape[1:])
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread waits more than it computes
    try:
        det, seconds = two_view_detect(cand, clean, lazy, y, xte, yte, 10, device="cpu", batch_size=32, block_batches=2)
    finally:
        torch.set_num_threads(before)
    assert reads and max(reads) <= 64 and sum(reads) == len(x), reads
    assert set(seconds) == {"features", "robust"} and min(seconds.values()) >= 0
    whole = robust_detect(penultimate_features(cand, x, batch_size=32, device="cpu"), y, 10,
                          penultimate_features(cand, xte, batch_size=32, device="cpu"), yte,
                          penultimate_features(clean, x, batch_size=32, device="cpu"),
                          penultimate_features(clean, xte, batch_size=32, device="cpu"))
    for name, s in whole.scores.items():
        np.testing.assert_allclose(det.scores[name], s, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(det.flagged, whole.flagged)
    # rows without a label, or reference rows without one, are refused, not dropped or an IndexError
    # (a view of 300 rows with 192 labels once scored 192 rows and said nothing)
    with pytest.raises(DetectError, match="300 training images but 192 labels"):
        two_view_detect(cand, clean, lazy, y[:192], xte, yte, 10, device="cpu", batch_size=32, block_batches=2)
    for ri, rl in ((xte[:-1], yte), (xte, yte[:-1])):
        with pytest.raises(DetectError, match="reference images but"):
            two_view_detect(cand, clean, lazy, y, ri, rl, 10, device="cpu", batch_size=32, block_batches=2)
