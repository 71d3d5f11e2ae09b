"""Depth units of every source, decoded in this one place.

A record stores depth as a uint16 PNG plus its scale in metres per unit, so that one decoder
(`units_to_metres`) serves every source. Each converter brings its source's raw depth into that form
with the functions here; nothing else in the package knows how a source encodes depth.

| source | on disk | metres per stored unit |
|---|---|---|
| NYU Depth V2 PNG export | uint16 millimetres | 0.001 |
| NYU Depth V2 labeled .mat | float metres | stored as 1/5000 m units (0.2 mm, range 13.1 m) |
| SUN RGB-D | uint16, bits rotated: mm = (d >> 3) | (d << 13) | 0.001 after the rotation |
| ScanNet exported frames | uint16 millimetres | 0.001 |
| TUM RGB-D | uint16, 5000 units per metre | 0.0002 |
| procedural scenes (ours) | exact float metres | stored as 1/5000 m units |

Zero means "no measurement" in every source, and stays so.

Every converted frame's depth is checked against `PlausibleDepth` (`check_plausible`): depth read with
the wrong units or encoding is an error that names the file and the encoding the values look like.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmcmae_jax.data.errors import RecordError

MILLIMETRE = 0.001
TUM_UNIT = 1.0 / 5000.0
# Metres stored at 0.2 mm resolution: fine enough for any indoor sensor, and reaches 13.1 m.
FINE_UNIT = 1.0 / 5000.0

SOURCE_SCALES = {
    "nyu_png": MILLIMETRE,
    "nyu_mat": FINE_UNIT,
    "sunrgbd": MILLIMETRE,
    "scannet": MILLIMETRE,
    "tum": TUM_UNIT,
    "procedural": FINE_UNIT,
}


# How a depth file's uint16 values are read: as units ("plain"), or SUN RGB-D's rotated bits.
DEPTH_ENCODINGS = ("plain", "sunrgbd")
# Raw Kinect v1 disparity is 11-bit; 2047 marks "no measurement".
KINECT_DISPARITY_INVALID = 2047


@dataclasses.dataclass(frozen=True)
class PlausibleDepth:
    """The range of valid depth (metres) that a converted indoor frame must fall in."""

    median_min: float = 0.1
    median_max: float = 20.0
    maximum: float = 100.0

    @classmethod
    def parse(cls, text: str) -> "PlausibleDepth":
        """'MEDIAN_MIN,MEDIAN_MAX,MAXIMUM' in metres, e.g. '0.1,20,100'."""
        try:
            lo, hi, top = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"plausible depth {text!r} is not MEDIAN_MIN,MEDIAN_MAX,MAXIMUM in metres") from None
        if not 0 <= lo <= hi <= top:
            raise ValueError(f"plausible depth {text!r} needs 0 <= MEDIAN_MIN <= MEDIAN_MAX <= MAXIMUM")
        return cls(lo, hi, top)

    def accepts(self, depth_m: np.ndarray) -> bool:
        valid = depth_m[valid_depth_mask(depth_m)]
        return not valid.size or (
            self.median_min <= float(np.median(valid)) <= self.median_max and float(valid.max()) < self.maximum
        )


def _looks_like_kinect_disparity(raw: np.ndarray) -> bool:
    """11-bit values whose maximum is the 2047 'no measurement' marker, on at least 0.1% of pixels, with
    other values too: raw Kinect disparity, which depth in millimetres practically never imitates."""
    return (
        raw.size > 0
        and int(raw.max()) == KINECT_DISPARITY_INVALID
        and np.count_nonzero(raw == KINECT_DISPARITY_INVALID) >= max(1, raw.size // 1000)
        and bool(np.any((raw > 0) & (raw < KINECT_DISPARITY_INVALID)))
    )


def kinect_disparity(raw: np.ndarray) -> str | None:
    """What the uint16 values `raw` are when they are raw Kinect disparity (as stored, or with the two
    bytes of each value swapped), else None."""
    raw = np.asarray(raw, np.uint16)
    if _looks_like_kinect_disparity(raw):
        how = "raw Kinect disparity (11-bit, 2047 = no measurement)"
    elif _looks_like_kinect_disparity(raw.byteswap()):
        how = "raw Kinect disparity with its two bytes swapped (NYU's raw .pgm frames)"
    else:
        return None
    return f"{how}, not depth: convert it to depth first, e.g. with the NYU toolbox's depth_rel2depth_abs"


def _carries_sunrgbd_rotation(raw: np.ndarray) -> bool:
    """SUN RGB-D's rotation makes every value under 8.192 m a multiple of 8: at least 99% of the valid
    values are, among at least 16 different ones (plain millimetres: about 1 in 8)."""
    valid = raw[raw > 0]
    return bool(np.count_nonzero((valid & 7) == 0) >= 0.99 * valid.size) and np.unique(valid).size >= 16


# (what it is, encoding, metres per unit, the `folder` options that read it), most specific first.
_COMMON_ENCODINGS = (
    ("SUN RGB-D's bit-rotated millimetres", "sunrgbd", MILLIMETRE, "--depth-encoding sunrgbd --depth-scale 0.001"),
    ("millimetres", "plain", MILLIMETRE, "--depth-scale 0.001"),
    ("TUM RGB-D's 5000 units per metre", "plain", TUM_UNIT, "--depth-scale 0.0002"),
)


def likely_encodings(
    raw: np.ndarray, limits: PlausibleDepth, exclude: tuple[str, float] | None = None
) -> list[str]:
    """The common depth encodings that give plausible depth from the on-disk uint16 values `raw`, each
    with the `folder` options that read it; `exclude` = (encoding, scale) leaves out the one tried."""
    raw = np.asarray(raw, np.uint16)
    return [
        f"{what} ({options})"
        for what, encoding, scale, options in _COMMON_ENCODINGS
        if (encoding, scale) != exclude and limits.accepts(units_to_metres(decode_raw(raw, encoding), scale))
    ]


def describe_reading(encoding: str, scale: float) -> str:
    return f"units of {scale:g} m" + (" after SUN RGB-D's bit rotation" if encoding == "sunrgbd" else "")


def check_plausible(
    units: np.ndarray,
    scale: float,
    path: str,
    limits: PlausibleDepth = PlausibleDepth(),
    *,
    raw: np.ndarray | None = None,
    encoding: str = "plain",
    record=None,
) -> None:
    """Raise RecordError naming `path` when the frame's valid depth (uint16 `units` of `scale` metres) is
    outside `limits`, or when raw, the file's own uint16 values (read with `encoding`), are raw Kinect
    disparity or carry SUN RGB-D's bit rotation that the reading ignores. raw also lets the error name
    the encodings under which the values would be plausible.
    """
    disparity = None if raw is None else kinect_disparity(raw)
    if disparity:
        raise RecordError(path, f"depth values look like {disparity}", record=record)
    depth_m = units_to_metres(units, scale)
    if raw is not None and encoding == "plain" and _carries_sunrgbd_rotation(raw):
        sunrgbd_m = units_to_metres(sunrgbd_to_millimetres(raw), MILLIMETRE)
        if limits.accepts(sunrgbd_m) and not np.allclose(depth_m, sunrgbd_m, rtol=0.01):
            raise RecordError(
                path,
                f"depth values carry SUN RGB-D's bit rotation (almost all are multiples of 8): read as "
                f"{describe_reading(encoding, scale)} their median is {np.median(depth_m[depth_m > 0]):.3g} m, "
                f"read as SUN RGB-D's {np.median(sunrgbd_m[sunrgbd_m > 0]):.3g} m; use --depth-encoding sunrgbd "
                f"--depth-scale 0.001",
                record=record,
            )
    if limits.accepts(depth_m):
        return
    valid = depth_m[valid_depth_mask(depth_m)]
    hint = ""
    if raw is not None:
        hints = likely_encodings(raw, limits, exclude=(encoding, scale))
        hint = ("; it looks like " + ", or ".join(hints)) if hints else (
            "; none of millimetres, TUM's 1/5000 m, SUN RGB-D's bit rotation or raw Kinect disparity fits")
    raise RecordError(
        path,
        f"implausible depth read as {describe_reading(encoding, scale)}: valid median {np.median(valid):.3g} m, "
        f"maximum {valid.max():.3g} m (expected a median in [{limits.median_min:g}, {limits.median_max:g}] m "
        f"and a maximum under {limits.maximum:g} m; --plausible-depth sets the range){hint}",
        record=record,
    )


def decode_raw(raw: np.ndarray, encoding: str) -> np.ndarray:
    """A depth file's uint16 values to units: "plain" keeps them, "sunrgbd" undoes SUN RGB-D's rotation."""
    if encoding == "sunrgbd":
        return sunrgbd_to_millimetres(raw)
    if encoding != "plain":
        raise ValueError(f"depth encoding must be one of {DEPTH_ENCODINGS}, got {encoding!r}")
    return np.asarray(raw, np.uint16)


def sunrgbd_to_millimetres(raw: np.ndarray) -> np.ndarray:
    """Undo SUN RGB-D's depth encoding: a 16-bit rotation right by 3 bits gives millimetres.

    SUN RGB-D's own toolbox (read3dPoints.m) decodes `bitor(bitshift(d,-3), bitshift(d,16-3))`.
    """
    d = np.asarray(raw).astype(np.uint32)
    return (((d >> 3) | (d << 13)) & 0xFFFF).astype(np.uint16)


def metres_to_units(depth_m: np.ndarray, scale: float) -> np.ndarray:
    """Quantise metric depth to uint16 units of `scale` metres; invalid or out-of-range becomes 0."""
    depth_m = np.asarray(depth_m, dtype=np.float64)
    units = np.round(np.where(np.isfinite(depth_m), depth_m, 0.0) / scale)
    units = np.where((units > 0) & (units <= 65535), units, 0)
    return units.astype(np.uint16)


def units_to_metres(units: np.ndarray, scale: float) -> np.ndarray:
    """Stored uint16 units to float32 metres (0 stays 0: no measurement)."""
    return (np.asarray(units).astype(np.float32) * np.float32(scale)).astype(np.float32)


def valid_depth_mask(depth_m: np.ndarray) -> np.ndarray:
    """Where depth is a measurement: positive and finite."""
    return np.isfinite(depth_m) & (depth_m > 0)
