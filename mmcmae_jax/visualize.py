"""Pictures of RGB-D data and predictions, shared by the trainer's image summaries (pictures.py), the
notebook (colab/m3_demo.ipynb) and the README figure (docs/figures/make_figures.py).

The image functions take NumPy arrays and return uint8 RGB images (H, W, 3), so they tile into grids and
write to PNG or TensorBoard alike. Conventions: depth maps that are compared (prediction and truth)
share one colour scale; invalid pixels (no depth measurement, ignore label) are black; a masked patch
is a darkened patch.

    images, (vmin, vmax) = colorize_depths([pred, truth], valid=valid)
    fig = plot_panels([[rgb, *images]], titles=["RGB", "predicted", "truth"])
"""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from mmcmae_jax.device_batch import IMAGENET_MEAN, IMAGENET_STD  # the RGB normalisation of the model inputs


def rgb_to_uint8(rgb: np.ndarray, normalised: bool = True) -> np.ndarray:
    """(H, W, 3) RGB, ImageNet-normalised (or in [0, 1]) -> uint8."""
    rgb = np.asarray(rgb, np.float32)
    if normalised:
        rgb = rgb * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(rgb, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def colorize(values: np.ndarray, vmin: float, vmax: float, cmap: str = "turbo",
             valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W[, 1]) scalars -> uint8 RGB with a fixed scale [vmin, vmax]; invalid pixels black."""
    values = np.asarray(values, np.float32).reshape(np.shape(values)[:2])
    scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    image = (colormaps[cmap](np.nan_to_num(scaled))[..., :3] * 255 + 0.5).astype(np.uint8)
    if valid is not None:
        image[np.asarray(valid).reshape(image.shape[:2]) <= 0] = 0
    return image


def shared_depth_scale(*depths: np.ndarray, valid: np.ndarray | None = None, percentile: float = 2.0):
    """One (vmin, vmax) for several depth maps of the same frame, robust to outliers, so the
    colours of prediction and ground truth compare directly."""
    stacked = np.concatenate([np.asarray(d, np.float32).reshape(-1) for d in depths])
    if valid is not None:
        mask = np.concatenate([np.asarray(valid).reshape(-1) > 0] * len(depths))
        stacked = stacked[mask]
    stacked = stacked[np.isfinite(stacked)]
    if stacked.size == 0:
        return 0.0, 1.0
    return float(np.percentile(stacked, percentile)), float(np.percentile(stacked, 100 - percentile))


def error_map(pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None,
              vmax: float | None = None) -> np.ndarray:
    """|pred - target| in a sequential colour map, 0 black-ish to vmax bright; invalid pixels black."""
    error = np.abs(np.asarray(pred, np.float32) - np.asarray(target, np.float32)).reshape(np.shape(pred)[:2])
    if vmax is None:
        finite = error[np.isfinite(error)] if valid is None else error[(np.asarray(valid).reshape(error.shape) > 0)]
        vmax = float(np.percentile(finite, 98)) if finite.size else 1.0
    return colorize(error, 0.0, vmax, "inferno", valid)


def colorize_depths(depths, valid: np.ndarray | None = None, cmap: str = "turbo", scale=None,
                    percentile: float = 2.0):
    """Several depth maps of one frame in one colour scale: ([uint8 images], (vmin, vmax)).

    The scale is `scale` when given, else `shared_depth_scale` over all of them, so equal depths get
    equal colours in every image."""
    vmin, vmax = scale if scale is not None else shared_depth_scale(*depths, valid=valid, percentile=percentile)
    return [colorize(d, vmin, vmax, cmap, valid) for d in depths], (vmin, vmax)


def colorize_signed(values: np.ndarray, valid: np.ndarray | None = None, vmax: float | None = None,
                    cmap: str = "coolwarm") -> np.ndarray:
    """Signed values (predicted noise, residuals) in a diverging map centred on 0: [-vmax, vmax]."""
    values = np.asarray(values, np.float32)
    if vmax is None:
        seen = values if valid is None else values[np.asarray(valid).reshape(values.shape) > 0]
        seen = np.abs(seen[np.isfinite(seen)])
        vmax = float(seen.max()) if seen.size else 1.0
    vmax = max(vmax, 1e-6)
    return colorize(values, -vmax, vmax, cmap, valid)


def patch_mask_pixels(patch_mask: np.ndarray, height: int, width: int, patch_size: int) -> np.ndarray:
    """(N,) patch mask, row-major over the (height/P, width/P) patch grid -> (height, width) bool."""
    grid_h, grid_w = height // patch_size, width // patch_size
    patch_mask = np.asarray(patch_mask).reshape(-1)
    if grid_h * patch_size != height or grid_w * patch_size != width or patch_mask.size != grid_h * grid_w:
        raise ValueError(f"a {height}x{width} image in {patch_size}-pixel patches has {grid_h}x{grid_w} patches; "
                         f"the mask has {patch_mask.size}")
    return np.repeat(np.repeat(patch_mask.reshape(grid_h, grid_w) > 0, patch_size, 0), patch_size, 1)


def masked_overlay(image: np.ndarray, patch_mask: np.ndarray, patch_size: int, shade: float = 0.25) -> np.ndarray:
    """Darken the masked (hidden) patches of a uint8 image. patch_mask: (N,), 1 = masked, row-major."""
    image = np.asarray(image).copy()
    pixel_mask = patch_mask_pixels(patch_mask, image.shape[0], image.shape[1], patch_size)
    image[pixel_mask] = (image[pixel_mask] * shade).astype(np.uint8)
    return image


def segmentation_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours; the last row (for the ignore label) is black."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 256, size=(num_classes, 3)).astype(np.uint8)
    return np.concatenate([palette, np.zeros((1, 3), np.uint8)])


def colorize_labels(labels: np.ndarray, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """(H, W) class indices -> uint8 RGB in `segmentation_palette`; ignore and out-of-range labels black."""
    labels = np.asarray(labels).astype(np.int64)
    labels = np.where((labels < 0) | (labels >= num_classes) | (labels == ignore_label), num_classes, labels)
    return segmentation_palette(num_classes)[labels]


def grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equally sized uint8 images, one list per row, with a white gap."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (height + pad) - pad, columns * (width + pad) - pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas[i * (height + pad): i * (height + pad) + height, j * (width + pad): j * (width + pad) + width] = image
    return canvas


def label_legend(class_names, ignore_name: str | None = "unlabelled") -> dict:
    """{class name: uint8 colour} in the colours of `colorize_labels`, for `plot_panels(legend=...)`."""
    palette = segmentation_palette(len(class_names))
    legend = {name: palette[i] for i, name in enumerate(class_names)}
    if ignore_name:
        legend[ignore_name] = palette[-1]
    return legend


def plot_panels(rows, titles=None, row_labels=None, legend: dict | None = None, panel_size: float = 2.0,
                suptitle: str | None = None, colorbars=None):
    """A matplotlib Figure of uint8 images, one list per row, with column titles, row labels, an optional
    colour legend ({name: colour}) and optional colour bars: one (cmap, vmin, vmax, label) or None per
    row, drawn at the row's end, for the scale its images were coloured with (`colorize`). It is built
    without pyplot, so it leaves no global state and works headless; show it with IPython's
    `display(fig)`, write it with `fig.savefig(path)`, or get its pixels with `figure_to_image`."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    num_rows, num_cols = len(rows), max(len(r) for r in rows)
    bars = colorbars is not None and any(bar is not None for bar in colorbars)
    extra = 0.45 if titles is not None else 0.1
    fig = Figure(figsize=(panel_size * (num_cols + (0.45 if bars else 0.0)),
                          panel_size * num_rows + extra + (0.5 if legend else 0.0) + (0.3 if suptitle else 0.0)))
    axes = fig.subplots(num_rows, num_cols + bars, squeeze=False,
                        gridspec_kw={"width_ratios": [1] * num_cols + [0.08] * bars})
    for i in range(num_rows):
        for j in range(num_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(rows[i]):
                ax.imshow(rows[i][j], interpolation="nearest")
            else:
                ax.axis("off")
            if titles is not None and i == 0 and j < len(titles):
                ax.set_title(titles[j], fontsize=9)
            if row_labels is not None and j == 0 and i < len(row_labels):
                ax.set_ylabel(row_labels[i], fontsize=9)
        if bars:
            bar = colorbars[i] if i < len(colorbars) else None
            if bar is None:
                axes[i][-1].axis("off")
            else:
                cmap, vmin, vmax, label = bar
                scale = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=axes[i][-1])
                scale.set_label(label, fontsize=8)
                scale.ax.tick_params(labelsize=7)
    if legend:
        handles = [Patch(facecolor=np.asarray(c, np.float32) / 255, edgecolor="0.5", label=n) for n, c in legend.items()]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if legend else 0, 1, 1))
    return fig


def figure_to_image(fig, dpi: int = 100) -> np.ndarray:
    """The pixels of a matplotlib Figure as uint8 RGB (H, W, 3), for PNG files and TensorBoard."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
