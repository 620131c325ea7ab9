"""Confusion-matrix metrics against a direct per-class computation, and hand-made cases."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from ovss_cli.metrics import (
    ConfusionMatrix,
    WordClassTable,
    cosine_similarity_matrix,
    semantic_similarity,
)


# --------------------------------------------------------------------------- reference


def direct_metrics(preds, gts, num_classes, ignore):
    """Metrics from boolean masks, one class at a time (independent of the matrix code)."""
    pred = np.concatenate([np.ravel(p) for p in preds])
    gt = np.concatenate([np.ravel(g) for g in gts])
    valid = gt != ignore
    total = int(valid.sum())
    iou = np.full(num_classes, np.nan)
    acc = np.full(num_classes, np.nan)
    pixels = np.zeros(num_classes, dtype=np.int64)
    for c in range(num_classes):
        in_gt = valid & (gt == c)
        in_pred = valid & (pred == c)
        pixels[c] = in_gt.sum()
        if pixels[c] == 0:
            continue
        inter = (in_gt & in_pred).sum()
        acc[c] = inter / in_gt.sum()
        iou[c] = inter / (in_gt | in_pred).sum()
    present = ~np.isnan(iou)
    return {
        "miou": 100 * iou[present].mean(),
        "macc": 100 * acc[present].mean(),
        "fwiou": 100 * sum(iou[c] * pixels[c] / total for c in np.flatnonzero(present)),
        "pacc": 100 * (valid & (pred == gt)).sum() / total,
        "iou": 100 * iou,
        "acc": 100 * acc,
        "pixels": pixels,
        "unlabelled": int((valid & (pred == -1)).sum()),
    }


def random_case(seed, num_classes, ignore=255, images=3):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(images):
        shape = tuple(rng.integers(5, 40, size=2))
        # GT uses only some classes so that absent-but-predicted classes occur
        used = rng.choice(num_classes, size=max(1, num_classes // 2), replace=False)
        gt = rng.choice(used, size=shape)
        gt[rng.random(shape) < 0.15] = ignore
        pred = np.where(rng.random(shape) < 0.6, np.where(gt == ignore, 0, gt), rng.integers(0, num_classes, shape))
        pred[rng.random(shape) < 0.1] = -1
        preds.append(pred.astype(np.int32))
        gts.append(gt.astype(np.uint16 if ignore > 255 else np.uint8))
    return preds, gts


def check_against_direct(metrics, ref):
    for key in ("miou", "macc", "fwiou", "pacc"):
        assert getattr(metrics, key) == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    np.testing.assert_allclose(metrics.per_class_iou, ref["iou"], rtol=1e-12)
    np.testing.assert_allclose(metrics.per_class_acc, ref["acc"], rtol=1e-12)
    np.testing.assert_array_equal(metrics.per_class_pixels, ref["pixels"])
    assert metrics.num_pixels == int(ref["pixels"].sum())
    assert metrics.num_unlabelled == ref["unlabelled"]


# --------------------------------------------------------------------------- random inputs


@pytest.mark.parametrize("seed", range(8))
def test_random_inputs_match_direct_computation(seed):
    num_classes = [2, 3, 7, 20, 59, 150, 5, 11][seed]
    preds, gts = random_case(seed, num_classes)
    cm = ConfusionMatrix(num_classes)
    for pred, gt in zip(preds, gts):
        cm.update(pred, gt)
    check_against_direct(cm.compute(), direct_metrics(preds, gts, num_classes, 255))


def test_sixteen_bit_ignore_label():
    preds, gts = random_case(42, 300, ignore=65535)
    cm = ConfusionMatrix(300, ignore_label=65535)
    for pred, gt in zip(preds, gts):
        cm.update(pred, gt)
    check_against_direct(cm.compute(), direct_metrics(preds, gts, 300, 65535))


def test_without_unlabelled_pos_gt_excludes_nothing_extra():
    # detectron2's pos_gt sums the first C rows only; with no -1 predictions ours agrees.
    preds, gts = random_case(3, 9)
    preds = [np.where(p < 0, 0, p) for p in preds]
    cm = ConfusionMatrix(9)
    for pred, gt in zip(preds, gts):
        cm.update(pred, gt)
    m = cm.matrix
    assert m[-1].sum() == 0
    metrics = cm.compute()
    np.testing.assert_array_equal(metrics.per_class_pixels, m[:-1, :-1].sum(axis=0))
    check_against_direct(metrics, direct_metrics(preds, gts, 9, 255))


# --------------------------------------------------------------------------- hand-made


def test_perfect_prediction_scores_100():
    gt = np.array([[0, 1, 2], [2, 255, 1]])
    cm = ConfusionMatrix(4)
    cm.update(np.where(gt == 255, 3, gt), gt)
    m = cm.compute()
    assert (m.miou, m.fwiou, m.macc, m.pacc) == (100.0, 100.0, 100.0, 100.0)
    assert np.isnan(m.per_class_iou[3]) and np.isnan(m.per_class_acc[3])  # absent from GT
    assert m.num_pixels == 5


def test_class_absent_from_gt_is_excluded_but_its_false_positives_count():
    gt = np.array([0, 0, 0, 1])
    pred = np.array([0, 2, 2, 1])  # class 2 never occurs in GT
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    m = cm.compute()
    assert np.isnan(m.per_class_iou[2]) and np.isnan(m.per_class_acc[2])
    assert m.per_class_iou[0] == pytest.approx(100 / 3)
    assert m.per_class_iou[1] == 100.0
    assert m.miou == pytest.approx((100 / 3 + 100) / 2)
    assert m.macc == pytest.approx((100 / 3 + 100) / 2)
    assert m.pacc == pytest.approx(50.0)
    assert m.fwiou == pytest.approx(0.75 * 100 / 3 + 0.25 * 100)


def test_false_positive_of_one_class_lowers_another_class_iou():
    gt = np.array([0, 0, 1, 1])
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1, 1, 1]), gt)  # a class-0 pixel predicted as class 1
    m = cm.compute()
    assert m.per_class_iou[1] == pytest.approx(200 / 3)  # 2 / (2 + 1)
    assert m.per_class_iou[0] == pytest.approx(50.0)


def test_all_unlabelled_prediction_scores_zero():
    gt = np.array([[0, 1], [2, 255]])
    cm = ConfusionMatrix(3)
    cm.update(np.full(gt.shape, -1), gt)
    m = cm.compute()
    assert (m.miou, m.fwiou, m.macc, m.pacc) == (0.0, 0.0, 0.0, 0.0)
    np.testing.assert_array_equal(m.per_class_iou, [0.0, 0.0, 0.0])
    assert m.num_unlabelled == 3 and m.num_pixels == 3


def test_unlabelled_is_a_miss_that_no_other_class_pays_for():
    gt = np.array([0, 0, 1, 1])
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, -1, 1, 1]), gt)
    m = cm.compute()
    assert m.per_class_iou[0] == 50.0 and m.per_class_acc[0] == 50.0
    assert m.per_class_iou[1] == 100.0  # a wrong class instead would give 2/3
    assert m.pacc == 75.0
    assert m.num_unlabelled == 1
    assert cm.matrix[-1, 0] == 1


def test_ignore_only_image_changes_nothing():
    preds, gts = random_case(7, 6)
    cm = ConfusionMatrix(6)
    for pred, gt in zip(preds, gts):
        cm.update(pred, gt)
    before = cm.compute()
    rng = np.random.default_rng(0)
    cm.update(rng.integers(-1, 6, size=(9, 9)), np.full((9, 9), 255))
    after = cm.compute()
    for key in ("miou", "fwiou", "macc", "pacc", "num_pixels", "num_unlabelled"):
        assert getattr(after, key) == getattr(before, key)
    np.testing.assert_array_equal(after.per_class_iou, before.per_class_iou)


def test_no_pixels_gives_nan_without_warnings():
    cm = ConfusionMatrix(3)
    cm.update(np.zeros((2, 2), int), np.full((2, 2), 255))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = cm.compute()
    assert all(math.isnan(v) for v in (m.miou, m.fwiou, m.macc, m.pacc))
    assert m.num_pixels == 0


# --------------------------------------------------------------------------- streaming


def test_streaming_equals_one_update_on_the_concatenation():
    preds, gts = random_case(11, 13, images=4)
    streamed = ConfusionMatrix(13)
    for pred, gt in zip(preds, gts):
        streamed.update(pred, gt)
    whole = ConfusionMatrix(13)
    whole.update(
        np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts])
    )
    np.testing.assert_array_equal(streamed.matrix, whole.matrix)
    assert streamed.matrix.dtype == np.int64 and streamed.matrix.shape == (14, 14)
    assert streamed.compute().miou == whole.compute().miou


def test_merge_adds_counts():
    preds, gts = random_case(5, 8, images=4)
    first, second, whole = ConfusionMatrix(8), ConfusionMatrix(8), ConfusionMatrix(8)
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        (first if i % 2 else second).update(pred, gt)
        whole.update(pred, gt)
    assert first.merge(second) is first
    np.testing.assert_array_equal(first.matrix, whole.matrix)
    with pytest.raises(ValueError):
        first.merge(ConfusionMatrix(9))


def test_matrix_is_read_only():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError):
        cm.matrix[0, 0] = 5


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "pred, gt",
    [
        (np.array([0, 1]), np.array([0, 3])),  # 3 is neither a class nor ignore
        (np.array([0, 1]), np.array([0, -1])),
        (np.array([0, -2]), np.array([0, 1])),
        (np.array([0, 3]), np.array([0, 1])),
        (np.array([0, 1, 1]), np.array([0, 1])),
        (np.array([0.0, 1.0]), np.array([0, 1])),
    ],
)
def test_bad_values_raise(pred, gt):
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError):
        cm.update(pred, gt)
    assert cm.matrix.sum() == 0


def test_unlabelled_value_matches_the_segmenter():
    from ovss_cli.metrics import UNLABELLED
    from ovss_cli.segmenter import UNLABELLED as SEGMENTER_UNLABELLED

    assert UNLABELLED == SEGMENTER_UNLABELLED == -1


def test_ignore_label_inside_class_range_is_rejected():
    with pytest.raises(ValueError):
        ConfusionMatrix(10, ignore_label=5)


# --------------------------------------------------------------------------- JSON


def test_to_dict_is_json_with_null_for_absent_classes():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 2]), np.array([0, 1, 255]))
    names = ["window ", "road, route", "sky"]
    data = cm.compute().to_dict(names)
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert back["mIoU"] == 100.0 and back["num_pixels"] == 2
    assert [row["class"] for row in back["per_class"]] == names
    assert back["per_class"][2] == {"class": "sky", "iou": None, "acc": None, "pixels": 0}
    with pytest.raises(ValueError):
        cm.compute().to_dict(names[:2])


# --------------------------------------------------------------------------- similarity


def test_identical_embeddings_give_similarity_one():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 16))
    sim = cosine_similarity_matrix(emb, emb)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    gt = rng.integers(0, 5, size=(6, 7))
    gt[0, 0] = 255
    table = WordClassTable(5, 5)
    table.update(np.where(gt == 255, 0, gt), gt)
    result = semantic_similarity(table, sim)
    assert result.mean == pytest.approx(1.0)
    assert result.rescaled == pytest.approx(1.0)
    assert result.num_pixels == 41
    np.testing.assert_array_equal(result.table, np.diag(np.bincount(gt[gt != 255], minlength=5)))


def test_hand_made_two_by_two_table():
    sim = np.array([[1.0, 0.2], [0.4, 0.8]])  # rows: words, columns: classes
    counts = np.array([[3, 1], [1, 5]])
    result = semantic_similarity(counts, sim)
    assert result.mean == pytest.approx((3 * 1.0 + 1 * 0.2 + 1 * 0.4 + 5 * 0.8) / 10)  # 0.76
    # column 0 -> [1, 0], column 1 -> [0, 1]
    assert result.rescaled == pytest.approx((3 + 5) / 10)
    # two unlabelled class-0 pixels score as its worst word: 0.4 raw, 0 rescaled
    with_unlabelled = semantic_similarity(counts, sim, unlabelled=np.array([2, 0]))
    assert with_unlabelled.mean == pytest.approx((7.6 + 2 * 0.4) / 12)
    assert with_unlabelled.rescaled == pytest.approx(8 / 12)
    assert with_unlabelled.num_unlabelled == 2


def test_word_class_table_streams_and_tracks_unlabelled():
    table = WordClassTable(3, 2)
    table.update(np.array([[0, 2], [-1, 1]]), np.array([[0, 1], [1, 255]]))
    table.update(np.array([1, 1]), np.array([0, 255]))
    np.testing.assert_array_equal(table.counts, [[1, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(table.unlabelled, [0, 1])
    other = WordClassTable(3, 2)
    other.update(np.array([0]), np.array([0]))
    table.merge(other)
    assert table.counts[0, 0] == 2
    with pytest.raises(ValueError):
        table.update(np.array([3]), np.array([0]))  # word id out of range


def test_flat_similarity_column_rescales_to_one_and_empty_is_nan():
    sim = np.array([[0.5, 0.9], [0.5, 0.1]])
    result = semantic_similarity(np.array([[0, 0], [4, 0]]), sim)
    assert result.rescaled == 1.0  # every word is as close to class 0 as any other
    assert math.isnan(semantic_similarity(np.zeros((2, 2), int), sim).mean)
    with pytest.raises(ValueError):
        semantic_similarity(np.zeros((2, 3), int), sim)
