"""The one RGB-D example schema, serialised as `tf.train.Example` without TensorFlow.

Feature keys (all single values unless said):
  rgb/encoded      bytes   PNG or JPEG
  rgb/format       bytes   b"png" or b"jpeg"
  rgb/resize_to_depth int64  optional 1: the image is stored at its own size (e.g. ScanNet's 1296x968
                           colour JPEG, kept as its source bytes) and resized to the depth size on read
  depth/encoded    bytes   uint16 PNG
  depth/scale      float   metres per depth unit (0 = no measurement)
  label/encoded    bytes   optional uint8/uint16 PNG; class index, 255 = unlabelled
  label/class_set  bytes   optional name of the class set, e.g. b"nyu40", b"procedural"
  camera/intrinsics float x4  optional fx, fy, cx, cy in pixels
  frame_id         bytes   unique within the source
  source           bytes   e.g. b"nyu_depth_v2", b"sunrgbd", b"procedural"

The protos are the ones tensorflow-datasets ships (`tf_example_generated_pb2`).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image
from google.protobuf.message import DecodeError
from tensorflow_datasets.proto import tf_example_generated_pb2 as tf_example_pb2

from mmcmae_jax.data import depth_units
from mmcmae_jax.data.errors import RecordError

IGNORE_LABEL = 255
RGB_FORMATS = ("png", "jpeg")


@dataclasses.dataclass(frozen=True)
class RGBDExample:
    """One RGB-D frame as stored: encoded images plus metadata."""

    rgb: bytes
    depth: bytes
    depth_scale: float
    frame_id: str
    source: str
    rgb_format: str = "png"
    label: bytes | None = None
    label_set: str | None = None
    intrinsics: tuple[float, float, float, float] | None = None
    resize_rgb_to_depth: bool = False


@dataclasses.dataclass(frozen=True)
class DecodedFrame:
    """Pixels of one frame: rgb uint8 (H,W,3), depth as stored, uint16 (H,W) units of depth_scale metres
    (0 = no measurement), label int32 (H,W)|None."""

    rgb: np.ndarray
    depth_units: np.ndarray
    depth_scale: float
    label: np.ndarray | None
    frame_id: str

    @property
    def depth_m(self) -> np.ndarray:
        """Depth in metres, float32 (0 = no measurement)."""
        return depth_units.units_to_metres(self.depth_units, self.depth_scale)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H,W[,3]) or uint16 (H,W) array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def example_from_arrays(
    rgb: np.ndarray,
    depth_units_u16: np.ndarray,
    depth_scale: float,
    *,
    frame_id: str,
    source: str,
    label: np.ndarray | None = None,
    label_set: str | None = None,
    intrinsics=None,
    rgb_format: str = "png",
) -> RGBDExample:
    """Encode arrays (rgb uint8 HxWx3, depth uint16 units, label ints with 255 = ignore)."""
    return example_from_encoded(
        encode_png(rgb) if rgb_format == "png" else encode_jpeg(rgb),
        rgb_format,
        encode_png(depth_units_u16.astype(np.uint16)),
        depth_scale,
        frame_id=frame_id,
        source=source,
        label=label,
        label_set=label_set,
        intrinsics=intrinsics,
    )


def example_from_encoded(
    rgb: bytes,
    rgb_format: str,
    depth_png: bytes,
    depth_scale: float,
    *,
    frame_id: str,
    source: str,
    label: np.ndarray | None = None,
    label_set: str | None = None,
    intrinsics=None,
    resize_rgb_to_depth: bool = False,
) -> RGBDExample:
    """An example from already encoded images (e.g. a source's own JPEG and uint16 PNG bytes, stored
    without decoding and re-encoding them) and a label array (ints, 255 = ignore)."""
    if rgb_format not in RGB_FORMATS:
        raise ValueError(f"rgb format must be one of {RGB_FORMATS}, got {rgb_format!r}")
    label_bytes = None
    if label is not None:
        label = np.asarray(label)
        label_bytes = encode_png(label.astype(np.uint8 if label.max(initial=0) < 256 else np.uint16))
    return RGBDExample(
        rgb=rgb,
        depth=depth_png,
        depth_scale=float(depth_scale),
        frame_id=frame_id,
        source=source,
        rgb_format=rgb_format,
        label=label_bytes,
        label_set=label_set,
        intrinsics=None if intrinsics is None else tuple(float(v) for v in intrinsics),
        resize_rgb_to_depth=resize_rgb_to_depth,
    )


def serialize_example(ex: RGBDExample) -> bytes:
    """The example as serialised `tf.train.Example` bytes."""
    proto = tf_example_pb2.Example()
    feat = proto.features.feature
    feat["rgb/encoded"].bytes_list.value.append(ex.rgb)
    feat["rgb/format"].bytes_list.value.append(ex.rgb_format.encode())
    feat["depth/encoded"].bytes_list.value.append(ex.depth)
    feat["depth/scale"].float_list.value.append(ex.depth_scale)
    feat["frame_id"].bytes_list.value.append(ex.frame_id.encode())
    feat["source"].bytes_list.value.append(ex.source.encode())
    if ex.label is not None:
        feat["label/encoded"].bytes_list.value.append(ex.label)
        feat["label/class_set"].bytes_list.value.append((ex.label_set or "").encode())
    if ex.intrinsics is not None:
        feat["camera/intrinsics"].float_list.value.extend(ex.intrinsics)
    if ex.resize_rgb_to_depth:
        feat["rgb/resize_to_depth"].int64_list.value.append(1)
    return proto.SerializeToString(deterministic=True)  # map entries in key order: the same bytes in every process


def parse_example(data: bytes, *, path: str = "<bytes>", record=None) -> RGBDExample:
    """Serialised bytes back to an RGBDExample; a malformed record raises RecordError."""
    proto = tf_example_pb2.Example()
    try:
        proto.ParseFromString(data)
    except DecodeError as e:
        raise RecordError(path, f"not a tf.train.Example ({e})", record=record) from None
    feat = proto.features.feature

    def one_bytes(key, required=True):
        if key not in feat or not feat[key].bytes_list.value:
            if required:
                raise RecordError(path, f"missing feature {key!r}", record=record)
            return None
        return feat[key].bytes_list.value[0]

    if "depth/scale" not in feat or not feat["depth/scale"].float_list.value:
        raise RecordError(path, "missing feature 'depth/scale'", record=record)
    intr = list(feat["camera/intrinsics"].float_list.value) if "camera/intrinsics" in feat else []
    if intr and len(intr) != 4:
        raise RecordError(path, f"camera/intrinsics has {len(intr)} values, expected 4", record=record)
    label_set = one_bytes("label/class_set", required=False)
    return RGBDExample(
        rgb=one_bytes("rgb/encoded"),
        depth=one_bytes("depth/encoded"),
        # The proto stores float32: take its shortest decimal form, so 0.001 reads back as 0.001.
        depth_scale=float(str(np.float32(feat["depth/scale"].float_list.value[0]))),
        frame_id=one_bytes("frame_id").decode(),
        source=one_bytes("source").decode(),
        rgb_format=(one_bytes("rgb/format", required=False) or b"png").decode(),
        label=one_bytes("label/encoded", required=False),
        label_set=None if label_set is None else label_set.decode(),
        intrinsics=tuple(float(str(np.float32(v))) for v in intr) if intr else None,
        resize_rgb_to_depth="rgb/resize_to_depth" in feat and any(feat["rgb/resize_to_depth"].int64_list.value),
    )


def _decode_image(data: bytes, what: str, path, record, size: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels of an encoded image (an rgb image in palette, CMYK or other colour modes converted to RGB);
    with size (width, height), resized to it (bilinear; a JPEG is first decoded at the smallest of its
    DCT scales that is not smaller)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if size is not None and im.size != size:
                im.draft(None, size)
            im.load()
            if what == "rgb" and im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            if size is not None and im.size != size:
                im = im.resize(size, Image.BILINEAR)
            return np.asarray(im)
    except Exception as e:  # PIL raises several types for corrupt data.
        raise RecordError(
            path, f"cannot decode {what} image ({type(e).__name__}: {e})", record=record
        ) from None


def decode_example(ex: RGBDExample, *, path: str = "<bytes>", record=None, labels: bool = True) -> DecodedFrame:
    """Decode pixels and check the frame is usable; any problem raises RecordError. labels=False: the
    label image is neither decoded nor checked (label None)."""
    where = dict(path=path, record=record if record is not None else ex.frame_id)
    units = _decode_image(ex.depth, "depth", **where)
    if units.ndim != 2:
        raise RecordError(path, f"depth has shape {units.shape}, expected (H, W)", record=where["record"])
    depth_size = (units.shape[1], units.shape[0])
    rgb = _decode_image(ex.rgb, "rgb", **where, size=depth_size if ex.resize_rgb_to_depth else None)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise RecordError(path, f"rgb has shape {rgb.shape}, expected (H, W, 3)", record=where["record"])
    rgb = rgb[..., :3].astype(np.uint8)
    if units.shape != rgb.shape[:2]:
        raise RecordError(
            path, f"rgb size {rgb.shape[:2]} and depth size {units.shape} differ", record=where["record"]
        )
    if not (np.isfinite(ex.depth_scale) and ex.depth_scale > 0):
        raise RecordError(
            path, f"depth scale {ex.depth_scale} is not a positive number", record=where["record"]
        )
    if units.dtype not in (np.uint8, np.uint16):  # a PNG holds at most 16 bits; say so if that ever changes
        if units.min() < 0 or units.max() > np.iinfo(np.uint16).max:
            raise RecordError(path, f"depth values span [{units.min()}, {units.max()}], beyond uint16",
                              record=where["record"])
    units = units.astype(np.uint16, copy=False)
    if not units.any():
        raise RecordError(path, "frame has no valid depth (all zero)", record=where["record"])
    if ex.intrinsics is not None and not (
        np.all(np.isfinite(ex.intrinsics)) and ex.intrinsics[0] > 0 and ex.intrinsics[1] > 0
    ):
        raise RecordError(
            path, f"intrinsics {ex.intrinsics} are not finite positive focal lengths", record=where["record"]
        )
    label = None
    if labels and ex.label is not None:
        label = _decode_image(ex.label, "label", **where)
        if label.shape != rgb.shape[:2]:
            raise RecordError(
                path, f"label size {label.shape} and rgb size {rgb.shape[:2]} differ", record=where["record"]
            )
        label = label.astype(np.int32)
    return DecodedFrame(rgb=rgb, depth_units=units, depth_scale=ex.depth_scale, label=label, frame_id=ex.frame_id)
