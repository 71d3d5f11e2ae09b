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
"""

from __future__ import annotations

import numpy as np

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
