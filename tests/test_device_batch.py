"""The compact batch and the model inputs the step makes from it, against NumPy written here."""
import jax
import numpy as np
import pytest

from mmcmae_jax.data import augment, config, pipeline, procedural, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.device_batch import (MODEL_FIELDS, host_fields, masked_quantiles, prepare_batch,
                                     prepare_batch_numpy, random_host_batch)
from mmcmae_jax.modalities import BATCH_KEYS

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
LUMA = np.array([0.299, 0.587, 0.114])


def numpy_jitter(rgb, order, factors):
    """torchvision's ColorJitter on one float64 image in [0, 1], written out op by op."""
    for op, f in zip(order, factors):
        if f == 1.0:
            continue
        grey = rgb @ LUMA
        if op == 0:
            rgb = rgb * f
        elif op == 1:
            rgb = grey.mean() + (rgb - grey.mean()) * f
        else:
            rgb = grey[..., None] + (rgb - grey[..., None]) * f
        rgb = np.clip(rgb, 0, 1)
    return rgb


def numpy_standardize(depth_m, trim):
    valid = depth_m > 0
    values = depth_m[valid].astype(np.float64)
    lo, hi = np.quantile(values, [trim, 1 - trim])
    core = values[(values >= lo) & (values <= hi)]
    return np.where(valid, (depth_m - core.mean()) / max(core.std(), 0.01), 0)


def test_prepare_batch_matches_numpy():
    host = random_host_batch(np.random.default_rng(0), 3, 16, num_classes=5)
    host["depth_units"][1, :4] = 0  # more holes in one frame
    out = jax.device_get(prepare_batch(host, MODEL_FIELDS, 0.1))
    for i in range(3):
        rgb = numpy_jitter(host["rgb"][i] / 255.0, host["color_jitter"][i, 0].astype(int), host["color_jitter"][i, 1])
        np.testing.assert_allclose(out["rgb"][i], (rgb - MEAN) / STD, atol=2e-5)
        depth_m = host["depth_units"][i].astype(np.float64) * 0.001
        np.testing.assert_allclose(out["depth_m"][i, ..., 0], depth_m, rtol=1e-6)
        np.testing.assert_allclose(out["depth"][i, ..., 0], numpy_standardize(depth_m, 0.1), atol=2e-5)
        np.testing.assert_array_equal(out["depth_valid"][i, ..., 0], host["depth_units"][i] > 0)
    np.testing.assert_array_equal(out["label"], host["label"].astype(np.int32))
    assert {k: v.dtype for k, v in out.items()} == {"rgb": np.float32, "depth": np.float32, "depth_valid": np.float32,
                                                    "depth_m": np.float32, "label": np.int32}
    on_host = prepare_batch_numpy(host, MODEL_FIELDS, 0.1)  # the host version the probe and notebook use
    for k in MODEL_FIELDS:
        np.testing.assert_allclose(on_host[k], out[k], atol=2e-5)


def test_identity_jitter_leaves_the_image_and_a_frame_without_depth_is_zero():
    host = random_host_batch(np.random.default_rng(1), 2, 8)
    host["color_jitter"][:] = [[0, 1, 2], [1, 1, 1]]
    host["depth_units"][1] = 0
    out = jax.device_get(prepare_batch(host, ("rgb", "depth"), 0.1))
    want = ((host["rgb"].astype(np.float32) / 255.0 - MEAN.astype(np.float32)) / STD.astype(np.float32))
    np.testing.assert_allclose(out["rgb"], want, atol=1e-6)  # XLA may divide as a multiply: 1 ulp
    assert np.all(out["depth"][1] == 0) and np.all(np.isfinite(out["depth"]))


def test_masked_quantiles_match_numpy():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(5, 40)).astype(np.float32)
    valid = rng.random((5, 40)) < np.array([[1.0], [0.5], [0.1], [0.03], [0.0]])
    valid[3] = False
    valid[3, 7] = True  # exactly one valid value
    lo, hi = (np.asarray(q) for q in masked_quantiles(values, valid, (0.1, 0.9)))
    for i in range(4):
        want = np.quantile(values[i][valid[i]], [0.1, 0.9])
        np.testing.assert_allclose([lo[i], hi[i]], want, rtol=1e-6)


def test_host_fields():
    assert host_fields(BATCH_KEYS) == ("rgb", "color_jitter", "depth_units", "depth_scale")
    assert host_fields(("rgb", "label")) == ("rgb", "color_jitter", "label")
    with pytest.raises(KeyError, match="normals"):
        host_fields(("normals",))


def test_stored_depth_units_pass_through_unresized(tmp_path):
    """At the stored size, centre crop, no flip: the batch holds the record's own integer depth."""
    frame = procedural.render_frame(3, 0, 24)
    paths = procedural.write_procedural_dataset(str(tmp_path / "p"), 2, 24, seed=3, num_shards=1, format="tfrecord",
                                                depth_noise=False, num_workers=1)
    stored = schema.decode_example(schema.parse_example(next(iter(procedural.records.read_records(paths[0])))))
    batch = next(pipeline.make_pipeline(paths, config.data_options(), batch_size=1, image_size=24, seed=0,
                                        train=False, shard_index=0, shard_count=1))
    np.testing.assert_array_equal(batch["depth_units"][0], stored.depth_units)
    np.testing.assert_array_equal(batch["rgb"][0], stored.rgb)
    np.testing.assert_allclose(batch["depth_units"][0] * batch["depth_scale"][0], frame["depth_m"], atol=1.5e-4)


def test_label_beyond_uint8_is_a_record_error(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    depth = np.full((8, 8), 1000, np.uint16)
    label = np.full((8, 8), 300, np.uint16)
    ex = schema.example_from_arrays(rgb, depth, 0.001, frame_id="f0", source="test", label=label)
    path = str(tmp_path / "bad-00000-of-00001.tfrecord")
    procedural.records.write_records(path, [schema.serialize_example(ex)])
    it = pipeline.make_pipeline(path, config.data_options(), batch_size=1, image_size=8, seed=0, train=False,
                                shard_index=0, shard_count=1)
    with pytest.raises(RecordError, match="uint8"):
        next(it)
    no_labels = pipeline.make_pipeline(path, config.data_options(), batch_size=1, image_size=8, seed=0, train=False,
                                       shard_index=0, shard_count=1, labels=False)
    assert next(no_labels)["depth_units"].max() == 1000  # pre-training never reads the labels


def test_resize_frame_keeps_measured_pixels_nonzero():
    units = np.ones((4, 4), np.uint16)  # 1 unit everywhere: a bilinear mean must not round to "none"
    frame = schema.DecodedFrame(np.zeros((4, 4, 3), np.uint8), units, 0.001, None, "x")
    _, depth, _ = augment.resize_frame(frame, (0, 0, 4, 4), 7, flip=False, labels=False)
    assert np.all(depth == 1)
