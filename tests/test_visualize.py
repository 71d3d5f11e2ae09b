"""Visualisation helpers: shared depth scales, invalid pixels, masked-patch overlays, label palettes,
error maps and the panel figure used by the notebook and the README figure."""
import numpy as np
import pytest

from mmcmae_jax import visualize


def ramp(height=16, width=16, lo=0.5, hi=4.0):
    return np.linspace(lo, hi, height * width, dtype=np.float32).reshape(height, width)


def test_colorize_is_uint8_rgb_and_monotone_ends():
    image = visualize.colorize(ramp(), 0.5, 4.0)
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    # The two ends of the scale are different colours, and values beyond the scale clip to the ends.
    assert not np.array_equal(image[0, 0], image[-1, -1])
    clipped = visualize.colorize(np.array([[-10.0, 100.0]]), 0.5, 4.0)
    np.testing.assert_array_equal(clipped[0, 0], image[0, 0])
    np.testing.assert_array_equal(clipped[0, 1], image[-1, -1])


def test_shared_scale_maps_equal_depths_to_equal_colours():
    truth = ramp()
    pred = truth * 1.5 + 0.3  # another range: alone it would get other colours
    pred[0, 0], truth[0, 1] = 2.0, 2.0
    (pred_img, truth_img), (vmin, vmax) = visualize.colorize_depths([pred, truth])
    assert vmin < 2.0 < vmax
    # The same depth in the two maps has the same colour ...
    np.testing.assert_array_equal(pred_img[0, 0], truth_img[0, 1])
    # ... as with an explicitly given scale ...
    (again, _), _ = visualize.colorize_depths([pred, truth], scale=(vmin, vmax))
    np.testing.assert_array_equal(again, pred_img)
    # ... whereas scaling each map on its own would not give that.
    own_pred = visualize.colorize(pred, *visualize.shared_depth_scale(pred))
    own_truth = visualize.colorize(truth, *visualize.shared_depth_scale(truth))
    assert not np.array_equal(own_pred[0, 0], own_truth[0, 1])


def test_shared_scale_ignores_invalid_pixels_and_outliers():
    depth = ramp()
    valid = np.ones_like(depth)
    depth[0, :4] = 0.0  # holes
    valid[0, :4] = 0
    depth[5, 5] = 1e4   # a wild outlier, trimmed by the percentile
    vmin, vmax = visualize.shared_depth_scale(depth, valid=valid)
    assert vmin > 0.5 and vmax < 100.0
    assert visualize.shared_depth_scale(np.zeros((4, 4)), valid=np.zeros((4, 4))) == (0.0, 1.0)


@pytest.mark.parametrize("fn", ["colorize", "error_map", "signed"])
def test_invalid_pixels_are_black(fn):
    depth = ramp() + 1.0
    valid = np.ones((16, 16, 1), np.float32)
    valid[3:6, 7:9] = 0
    if fn == "colorize":
        image = visualize.colorize(depth[..., None], 0.0, 5.0, valid=valid)
    elif fn == "error_map":
        image = visualize.error_map(depth, depth + 0.5, valid=valid)
    else:
        image = visualize.colorize_signed(depth - 2.0, valid=valid)
    dark = valid[..., 0] == 0
    assert np.all(image[dark] == 0)
    assert np.all(image[~dark].max(-1) > 0)


def test_error_map_brighter_for_larger_errors():
    target = ramp()
    pred = target.copy()
    pred[:, 8:] += 1.0  # right half wrong, left half exact
    image = visualize.error_map(pred, target).astype(int).sum(-1)
    assert image[:, 8:].min() > image[:, :8].max()


def test_signed_map_is_symmetric_about_zero():
    image = visualize.colorize_signed(np.array([[-1.0, 0.0, 1.0]]))
    lo, mid, hi = image[0]
    assert not np.array_equal(lo, hi)
    # Zero sits in the middle of the diverging map: its colour is the map's centre.
    np.testing.assert_array_equal(mid, visualize.colorize(np.array([[0.5]]), 0.0, 1.0, "coolwarm")[0, 0])


def test_overlay_darkens_exactly_the_masked_patches():
    rng = np.random.default_rng(0)
    image = rng.integers(60, 256, size=(32, 48, 3)).astype(np.uint8)
    patch = 8
    mask = rng.integers(0, 2, size=(32 // patch) * (48 // patch))
    out = visualize.masked_overlay(image, mask, patch, shade=0.25)
    pixels = visualize.patch_mask_pixels(mask, 32, 48, patch)
    # Row-major: patch k covers rows (k // 6) * 8.., columns (k % 6) * 8..
    for k, m in enumerate(mask):
        r, c = (k // 6) * patch, (k % 6) * patch
        block = pixels[r:r + patch, c:c + patch]
        assert block.all() if m else not block.any()
    np.testing.assert_array_equal(out[~pixels], image[~pixels])
    np.testing.assert_array_equal(out[pixels], (image[pixels] * 0.25).astype(np.uint8))
    assert np.all(out[pixels] < image[pixels])
    assert image.min() >= 60  # the input is not modified in place


def test_overlay_rejects_a_mask_of_the_wrong_size():
    with pytest.raises(ValueError, match="patches"):
        visualize.masked_overlay(np.zeros((32, 32, 3), np.uint8), np.ones(15), 8)


def test_palette_ignore_colour_and_distinct_classes():
    palette = visualize.segmentation_palette(9)
    assert palette.shape == (10, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette[-1], 0)  # the ignore colour is black
    assert np.all(palette[:-1].max(-1) >= 40)     # no class is black
    assert len({tuple(c) for c in palette[:-1]}) == 9
    labels = np.array([[0, 1, 8], [255, 9, -1]])
    image = visualize.colorize_labels(labels, 9)
    np.testing.assert_array_equal(image[0], palette[[0, 1, 8]])
    np.testing.assert_array_equal(image[1], 0)  # ignore (255), out of range (9) and negative: black
    legend = visualize.label_legend(["floor", "wall"])
    np.testing.assert_array_equal(legend["wall"], visualize.segmentation_palette(2)[1])
    np.testing.assert_array_equal(legend["unlabelled"], 0)


def test_rgb_to_uint8_undoes_imagenet_normalisation():
    rgb = np.random.default_rng(0).uniform(0, 1, size=(4, 4, 3)).astype(np.float32)
    normalised = (rgb - visualize.IMAGENET_MEAN) / visualize.IMAGENET_STD
    np.testing.assert_array_equal(visualize.rgb_to_uint8(normalised), visualize.rgb_to_uint8(rgb, normalised=False))
    assert np.abs(visualize.rgb_to_uint8(normalised).astype(int) - np.round(rgb * 255)).max() <= 1


def test_grid_places_images_with_gaps():
    a = np.full((4, 5, 3), 10, np.uint8)
    b = np.full((4, 5, 3), 20, np.uint8)
    canvas = visualize.grid([[a, b], [b]], pad=2)
    assert canvas.shape == (4 * 2 + 2, 5 * 2 + 2, 3)
    assert np.all(canvas[:4, :5] == 10) and np.all(canvas[:4, 7:] == 20) and np.all(canvas[6:, :5] == 20)
    assert np.all(canvas[4:6] == 255) and np.all(canvas[6:, 7:] == 255)  # gap and the empty cell stay white


def test_plot_panels_draws_every_image(tmp_path):
    from PIL import Image
    images = [np.full((8, 8, 3), v, np.uint8) for v in (0, 128, 255)]
    fig = visualize.plot_panels([images, images[:2]], titles=["a", "b", "c"], row_labels=["x", "y"],
                                legend=visualize.label_legend(["floor"]))
    axes = fig.get_axes()
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == ["a", "b", "c"]
    assert len(axes[0].get_images()) == 1 and len(axes[5].get_images()) == 0  # missing cell left empty
    path = tmp_path / "panels.png"
    fig.savefig(path)
    assert Image.open(path).size[0] > 100


def test_plot_panels_draws_a_colour_bar_per_row_at_its_scale():
    images = [np.full((8, 8, 3), v, np.uint8) for v in (0, 128)]
    fig = visualize.plot_panels([images, images], titles=["a", "b"],
                                colorbars=[("turbo", 0.5, 3.0, "depth (m)"), None])
    bar_axes = [ax for ax in fig.get_axes() if ax.get_ylabel() == "depth (m)"]
    assert len(bar_axes) == 1 and bar_axes[0].get_ylim() == pytest.approx((0.5, 3.0))
    image = visualize.figure_to_image(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def stage2_outputs(batch=2, size=32, patch=8, seed=0):
    """What the stage-2 objective's forward gives for a batch, with random values."""
    rng = np.random.default_rng(seed)
    patches = (size // patch) ** 2
    inputs = dict(rgb=rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                  depth=rng.normal(size=(batch, size, size, 1)).astype(np.float32),
                  depth_valid=np.ones((batch, size, size, 1), np.float32))
    out = dict(mask={"rgb": rng.integers(0, 2, (batch, patches)), "depth": rng.integers(0, 2, (batch, patches))},
               added_noise=(0.3 * rng.normal(size=(batch, size, size, 1))).astype(np.float32),
               pred={"depth": rng.normal(size=(batch, patches, patch * patch)).astype(np.float32)})
    return out, inputs


def test_stage2_grid_has_column_titles_and_a_depth_colour_bar_per_row():
    from mmcmae_jax import pictures
    out, inputs = stage2_outputs()
    fig = pictures.stage2_figure(out, inputs, 8, "step 7")
    axes = fig.get_axes()
    titles = ["RGB, masked", "noisy depth, masked", "reconstructed depth", "predicted noise", "ground-truth depth"]
    assert [ax.get_title() for ax in axes[:5]] == titles
    bars = [ax for ax in axes if ax.get_ylabel() == "depth (σ)"]
    assert len(bars) == 2  # one per example, at the scale its depth maps were coloured with
    for bar, depth in zip(bars, inputs["depth"]):
        assert bar.get_ylim() == pytest.approx(visualize.shared_depth_scale(depth, valid=np.ones_like(depth)))
    noise = [float(np.abs(n).max()) for n in out["added_noise"]]
    assert [axes[i * 6].get_ylabel() for i in range(2)] == [f"example {i}\nnoise ±{noise[i]:.2g}" for i in range(2)]


def test_trainer_pictures_are_the_titled_grid():
    """What the trainer writes to TensorBoard and images/ is that grid, with its titles and colour bars."""
    import jax
    import jax.numpy as jnp
    from mmcmae_jax import pictures
    from mmcmae_jax.config import training_config
    from mmcmae_jax.device_batch import prepare_batch_numpy, random_host_batch
    from mmcmae_jax.modalities import BATCH_KEYS
    out, _ = stage2_outputs()
    host = random_host_batch(np.random.default_rng(0), 2, 32)
    config = training_config(2)
    inputs = prepare_batch_numpy(host, BATCH_KEYS, config.data.depth_trim)  # what the step makes of the batch

    class Objective:  # a stage-2 objective whose forward gives the outputs above
        batch_keys = BATCH_KEYS

        def forward(self, params, batch, rng):
            return jax.tree.map(jnp.asarray, out)

    class Writer:  # the trainer's MetricWriter, recording what it is given
        def write_image(self, step, tag, image, png_path):
            written.update(step=step, tag=tag, image=image, png_path=png_path)

    written = {}
    config.model.update(variant="64x2x2/8", image_size=32)
    write = pictures.stage2_picture_fn(Objective(), config, "/w")
    write(7, {}, jax.tree.map(jnp.asarray, host), Writer())
    expected = visualize.figure_to_image(pictures.stage2_figure(out, inputs, 8, "step 7: training batch"))
    assert written["step"] == 7 and written["png_path"] == "/w/images/step_000007.png"
    assert written["image"].shape == expected.shape
    assert np.abs(written["image"].astype(int) - expected).mean() < 1.0
