"""Reading the image files of a source: colour, 16-bit depth and label images.

Each missing, unreadable or unsuitable file raises RecordError naming it. Labels become class indices
0..K-1 with 255 = unlabelled.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mmcmae_jax.data import depth_units, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.schema import IGNORE_LABEL


def read_bytes(path: str) -> bytes:
    """A file's bytes; a missing or unreadable file raises RecordError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RecordError(path, "file does not exist") from None
    except OSError as e:
        raise RecordError(path, f"cannot read file ({e})") from None


def _open_image(path: str, data: bytes) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception as e:  # PIL raises several types for corrupt data.
        raise RecordError(path, f"cannot decode image ({type(e).__name__}: {e})") from None


def read_image(path: str) -> np.ndarray:
    """Pixels of an image file; a missing or undecodable file raises RecordError naming it."""
    return np.asarray(_open_image(path, read_bytes(path)))


def read_rgb(path: str) -> tuple[np.ndarray, bytes, str]:
    """A colour image's pixels (uint8 (H, W, 3)) and what a record stores of it: (bytes, format).

    A JPEG or PNG of 8-bit RGB or grey is stored as its own bytes, never decoded and re-encoded (grey
    becomes RGB when read); palette, grey with alpha, RGBA, CMYK and other formats are converted to RGB
    and stored as PNG. An image of more than 8 bits per channel raises RecordError naming the file.
    """
    data = read_bytes(path)
    im = _open_image(path, data)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise RecordError(path, f"rgb image has {im.mode} pixels; colour images need 8 bits per channel")
    rgb = np.asarray(im.convert("RGB"))
    stored_format = {"JPEG": "jpeg", "PNG": "png"}.get(im.format)
    if stored_format is not None and im.mode in ("RGB", "L"):
        return rgb, data, stored_format
    return rgb, schema.encode_png(rgb), "png"


def read_depth_png(path: str) -> tuple[np.ndarray, bytes]:
    """A depth image's uint16 values and the file's bytes; anything but a one-channel 16-bit PNG (an
    8-bit PNG, a colour image, a PGM) raises RecordError naming the file."""
    data = read_bytes(path)
    im = _open_image(path, data)
    raw = np.asarray(im)
    if im.format == "PNG" and im.mode.startswith("I;16"):
        return raw.astype(np.uint16), data
    what = f"a {im.format or 'unknown'} image of mode {im.mode}"
    if im.mode in ("L", "P", "1"):
        what += " (8 bits: at most 255 depth units)"
    hint = ""
    if raw.ndim == 2 and raw.dtype.itemsize > 1 and raw.size and 0 <= raw.min() and raw.max() <= 65535:
        disparity = depth_units.kinect_disparity(raw.astype(np.uint16))
        hint = f"; its values look like {disparity}" if disparity else ""
    raise RecordError(path, f"depth must be a one-channel 16-bit PNG; this is {what}{hint}")


def one_based_labels(label: np.ndarray) -> np.ndarray:
    """Labels stored 1..K with 0 = unlabelled (NYU, ScanNet nyu40) -> 0..K-1 with 255 = unlabelled."""
    label = np.asarray(label).astype(np.int64)
    return np.where(label > 0, label - 1, IGNORE_LABEL).astype(np.uint8)


def check_same_size(rgb, depth, rgb_path, depth_path):
    """A depth (or label) image the size of its colour image, else RecordError naming both files."""
    if rgb.shape[:2] != depth.shape[:2]:
        raise RecordError(
            depth_path, f"depth size {depth.shape[:2]} differs from rgb size {rgb.shape[:2]} of {rgb_path}"
        )
