"""Evaluation metrics against independent NumPy computations, and independence from batching."""
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax.transfer import metrics

MIN_D, MAX_D = 1e-3, 10.0


def depth_set(seed=0, n=5, size=12):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.3, 12.0, (n, size, size, 1)).astype(np.float32)  # some beyond the 10 m cap
    target[rng.random(target.shape) < 0.2] = 0.0                            # holes
    pred = (np.where(target > 0, target, 3.0) * rng.uniform(0.7, 1.4, target.shape)).astype(np.float32)
    pred[0, 0, 0, 0] = 20.0   # clipped to max_depth
    pred[0, 0, 1, 0] = 1e-5   # clipped to min_depth
    target[3] = 0.0           # a frame with no valid pixel
    return pred, target


def numpy_depth(pred, target, average, crop=None):
    """Eigen et al.'s formulas, image by image with boolean indexing (as BTS's compute_errors)."""
    per_image, pooled_p, pooled_t = [], [], []
    for p, t in zip(pred[..., 0].astype(np.float64), target[..., 0].astype(np.float64)):
        v = (t > MIN_D) & (t < MAX_D)
        if crop is not None:
            v &= crop
        if not v.any():
            continue
        p, t = np.clip(p[v], MIN_D, MAX_D), t[v]
        pooled_p.append(p)
        pooled_t.append(t)
        per_image.append(errors(p, t))
    if average == "image":
        return {k: np.mean([e[k] for e in per_image]) for k in per_image[0]}
    return errors(np.concatenate(pooled_p), np.concatenate(pooled_t))


def errors(p, t):
    thresh = np.maximum(p / t, t / p)
    return {"delta1": np.mean(thresh < 1.25), "delta2": np.mean(thresh < 1.25 ** 2),
            "delta3": np.mean(thresh < 1.25 ** 3), "abs_rel": np.mean(np.abs(p - t) / t),
            "sq_rel": np.mean((p - t) ** 2 / t), "rmse": np.sqrt(np.mean((p - t) ** 2)),
            "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(t)) ** 2)),
            "log10": np.mean(np.abs(np.log10(p) - np.log10(t)))}


def accumulate_depth(pred, target, batch, crop=None):
    """Sums over batches of `batch` frames, the last padded with zero-weight garbage."""
    totals = None
    for start in range(0, len(pred), batch):
        p, t = pred[start:start + batch], target[start:start + batch]
        w = np.ones(len(p), np.float32)
        if len(p) < batch:
            pad = batch - len(p)
            p = np.concatenate([p, np.full((pad,) + p.shape[1:], 5.0, np.float32)])
            t = np.concatenate([t, np.full((pad,) + t.shape[1:], 1.0, np.float32)])
            w = np.concatenate([w, np.zeros(pad, np.float32)])
        sums = metrics.depth_metric_sums(jnp.asarray(p), jnp.asarray(t), jnp.asarray(w), min_depth=MIN_D,
                                         max_depth=MAX_D, crop_mask=None if crop is None else jnp.asarray(crop))
        sums = {k: np.float64(v) for k, v in sums.items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    return totals


@pytest.mark.parametrize("average", ["image", "pixel"])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_depth_metrics_match_numpy_whatever_the_batching(average, batch):
    pred, target = depth_set()
    got = metrics.depth_metrics(accumulate_depth(pred, target, batch), average)
    expected = numpy_depth(pred, target, average)
    assert set(got) == set(metrics.DEPTH_METRICS)
    for k in metrics.DEPTH_METRICS:
        np.testing.assert_allclose(got[k], expected[k], rtol=2e-5, err_msg=k)


def test_depth_metrics_with_the_eval_crop_match_numpy():
    pred, target = depth_set(1, size=24)
    crop = metrics.eval_crop_mask(24)
    got = metrics.depth_metrics(accumulate_depth(pred, target, 2, crop), "image")
    expected = numpy_depth(pred, target, "image", crop)
    for k in metrics.DEPTH_METRICS:
        np.testing.assert_allclose(got[k], expected[k], rtol=2e-5, err_msg=k)
    assert got["abs_rel"] != pytest.approx(metrics.depth_metrics(accumulate_depth(pred, target, 2), "image")["abs_rel"])


def test_nyu_eval_crop_in_the_central_square():
    # 480x640 -> central 480x480 (columns 80..559) -> 480 px: Eigen's rows 45..470 remain, all columns.
    mask = metrics.eval_crop_mask(480)
    rows = np.flatnonzero(mask.any(1))
    assert (rows[0], rows[-1]) == (45, 470) and mask[45:471].all() and not mask[:45].any()
    mask = metrics.eval_crop_mask(64)
    assert mask.shape == (64, 64) and 0.8 < mask.mean() < 0.95


def test_perfect_depth_scores_perfectly():
    _, target = depth_set(2)
    got = metrics.depth_metrics(accumulate_depth(np.where(target > 0, target, 1.0), target, 5), "image")
    assert got["delta1"] == 1.0 and got["abs_rel"] < 1e-6 and got["rmse"] < 1e-5


def numpy_segmentation(pred, labels, num_classes, ignore=255):
    keep = labels != ignore
    p, t = pred[keep], labels[keep]
    ious = []
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else np.nan)
    return np.array(ious), np.mean(p == t), keep.sum()


def test_segmentation_metrics_match_numpy_over_batches():
    rng = np.random.default_rng(5)
    num_classes = 6
    labels = rng.integers(0, num_classes - 1, (7, 9, 10)).astype(np.int32)  # class 5 never occurs...
    labels[rng.random(labels.shape) < 0.25] = 255
    pred = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, num_classes - 1, labels.shape))
    pred = np.where(pred == 255, 0, pred).astype(np.int32)                   # ...nor is it predicted
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for start in range(0, 7, 3):  # batches of 3, the last padded with weight 0
        p, t = pred[start:start + 3], labels[start:start + 3]
        w = np.ones(3, np.float32)
        w[len(p):] = 0
        p = np.concatenate([p, np.zeros((3 - len(p),) + p.shape[1:], np.int32)])
        t = np.concatenate([t, np.zeros((3 - len(t),) + t.shape[1:], np.int32)])
        confusion += np.asarray(metrics.confusion_matrix(jnp.asarray(p), jnp.asarray(t), jnp.asarray(w), num_classes))
    got = metrics.segmentation_metrics(confusion, [f"c{i}" for i in range(num_classes)])
    ious, acc, counted = numpy_segmentation(pred, labels, num_classes)
    assert got["labelled_pixels"] == counted
    np.testing.assert_allclose(got["pixel_acc"], acc, rtol=1e-12)
    np.testing.assert_allclose(got["miou"], np.nanmean(ious), rtol=1e-12)
    assert got["classes_present"] == num_classes - 1 and got["per_class_iou"]["c5"] is None
    np.testing.assert_allclose([got["per_class_iou"][f"c{i}"] for i in range(5)], ious[:5], rtol=1e-12)


def test_confusion_matrix_drops_ignored_and_out_of_range_labels():
    labels = jnp.asarray([[[0, 1, 255, 7]]], jnp.int32)
    pred = jnp.asarray([[[0, 0, 1, 1]]], jnp.int32)
    cm = np.asarray(metrics.confusion_matrix(pred, labels, jnp.ones(1), 2))
    np.testing.assert_array_equal(cm, [[1, 0], [1, 0]])


def test_confusion_matrix_counts_uint8_labels_as_int32_ones():
    """uint8 labels (a decoded label PNG) give the same counts: label * num_classes must not wrap."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 40, size=(2, 6, 7)).astype(np.uint8)
    labels[0, 0, :3] = 255
    pred = rng.integers(0, 40, size=(2, 6, 7)).astype(np.uint8)
    as_uint8 = np.asarray(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(labels), jnp.ones(2), 40))
    counted = labels != 255
    expected = np.zeros((40, 40), np.int64)
    np.add.at(expected, (labels[counted], pred[counted]), 1)
    np.testing.assert_array_equal(as_uint8, expected)


def test_empty_evaluation_sets_raise():
    with pytest.raises(ValueError, match="no labelled pixel"):
        metrics.segmentation_metrics(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="valid depth"):
        metrics.depth_metrics({"images": 0.0, "pixels": 0.0}, "image")
