"""Procedural RGB-D rooms: the embedded default data set, with exact metric depth and classes.

Each frame is a box-shaped room (floor, four walls, ceiling) furnished with tables, chairs, cabinets,
boxes, lamps and pictures built from axis-aligned boxes and spheres, textured (planks or tiles,
wallpaper, wood grain), lit by a ceiling point light with cast shadows, and seen by a pinhole camera
at eye height. Depth can be inferred from the RGB by the cues real images carry: perspective of the
floor texture, shading falloff, occlusion, shadows and the known sizes of furniture.

Ray casting is vectorised over the whole image: every primary ray shares the camera origin, so the
slab test (Kay & Kajiya) for every pixel against every box is an outer product. Depth is z-depth
along the optical axis (what RGB-D sensors report), exact up to float32; optional sensor-like noise
follows the axial noise model of Nguyen et al. (2012) for Kinect, with holes at depth edges, at
grazing angles and in random blobs.

Two styles. "rooms" (the default): the scenes above, seen from eye height; floor, walls and ceiling
cover most pixels, so a per-pixel prior over the set already predicts much of the labels and depth.
"varied": the camera anywhere from 0.3 to 2.2 m high, pitched up or steeply down, rolled, with a
field of view of 40-95 degrees and mostly aimed at a piece of furniture from close by; 8-16 pieces
per room (plus what stands on them), turned to any yaw (boxes in their own frames), stacked, some
tipped over or hung on walls, with balls; every surface, floor and walls included, gets colours from
the whole hue range and a random solid texture (plain, stripes, checks, noise, grain, speckle), so
neither colour nor texture gives the class; one or two tinted point lights at random places above
the furniture, random ambient level and exposure. There, depth and classes must be read from the
image: object classes cover about 39 % of the pixels (11 % in "rooms").

Frames are deterministic functions of (seed, frame index, size, style), whatever the sharding or
worker count.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import logging
import multiprocessing
import os

import numpy as np
from PIL import Image

from mmcmae_jax.data import depth_units, records, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.progress import say

CLASS_NAMES = ("floor", "wall", "ceiling", "table", "chair", "cabinet", "box", "lamp", "picture")
CLASS_SET = "procedural"
FLOOR, WALL, CEILING, TABLE, CHAIR, CABINET, BOX, LAMP, PICTURE = range(len(CLASS_NAMES))
SOURCE = "procedural"
MAX_RANGE_M = 10.0
STYLES = ("rooms", "varied")
TEXTURES = ("plain", "stripes", "checks", "noise", "grain", "speckle")
# The "varied" style's knobs (the class shares quoted in docs/data.md were measured with these).
_N_GROUPS = (8, 16)  # pieces of furniture (or groups of pictures) per room, not counting what stands on them
# how often each maker runs: table, chair, cabinet, box stack, ball, floor lamp, pictures
_WEIGHTS = (0.16, 0.2, 0.2, 0.14, 0.06, 0.06, 0.18)
_SOFA_SHARE = 0.25  # of the chairs
_AIM_SHARE = 0.75  # of the views, aimed at a part of a random piece from close by
_AIM_GAP = (0.1, 1.2)  # metres from the aimed-at part, beyond half the piece's diagonal


def check_style(style) -> str:
    """`style` if it is one of STYLES, else ValueError."""
    if style not in STYLES:
        raise ValueError(f"procedural style must be one of {STYLES}, got {style!r}")
    return style


@dataclasses.dataclass
class Appearance:
    """Looks and lights of a "varied" scene, per surface: 0 floor, 1-4 the walls at x = 0, x = X,
    z = 0, z = Z, 5 ceiling, then one surface per box, then one per sphere."""

    color: np.ndarray  # (N, 3) albedo
    color2: np.ndarray  # (N, 3) the pattern's second albedo
    texture: np.ndarray  # (N,) int, index into TEXTURES
    scale: np.ndarray  # (N,) metres per pattern period
    direction: np.ndarray  # (N, 3) unit vector in texture space (stripes, grain)
    origin: np.ndarray  # (N, 3) texture-space origin, world coordinates
    frame: np.ndarray  # (N, 3, 3) texture axes (columns), world coordinates
    glow: np.ndarray  # (N,) self-illumination
    lights: np.ndarray  # (L, 3) point light positions, above every box
    light_rgb: np.ndarray  # (L, 3) power times colour
    ambient: np.ndarray  # (3,)
    exposure: float


@dataclasses.dataclass
class Scene:
    """Geometry and appearance of one room, in metres; y is up, the floor is y = 0."""

    room: np.ndarray  # (3,) room extent; the room is [0, room]
    box_lo: np.ndarray  # (B, 3)
    box_hi: np.ndarray  # (B, 3)
    box_class: np.ndarray  # (B,) int
    box_color: np.ndarray  # (B, 3) albedo
    sphere_center: np.ndarray  # (S, 3)
    sphere_radius: np.ndarray  # (S,)
    sphere_color: np.ndarray  # (S, 3)
    floor_color: np.ndarray
    wall_color: np.ndarray
    ceiling_color: np.ndarray
    floor_style: int  # 0 planks, 1 tiles
    light: np.ndarray  # (3,) point light position
    light_power: float
    sphere_class: np.ndarray | None = None  # (S,) int; None: every sphere is a LAMP
    # With box_rot, each box is centred on box_center and box_lo = -box_hi, its half extents along
    # its own axes.
    box_center: np.ndarray | None = None  # (B, 3)
    box_rot: np.ndarray | None = None  # (B, 3, 3) box frame -> world (columns: the box's axes)
    appearance: Appearance | None = None  # the "varied" style's looks; None: the "rooms" shading


def _hash01(x: np.ndarray) -> np.ndarray:
    """Cheap deterministic pseudo-random values in [0, 1) from numbers (for plank/tile tints)."""
    return np.modf(np.abs(np.sin(x * 12.9898 + 78.233) * 43758.5453))[0]


class _SceneBuilder:
    """Places furniture in a room without overlaps (rejection sampling on floor footprints)."""

    def __init__(self, rng: np.random.Generator, room: np.ndarray, camera_xz: np.ndarray):
        self.rng, self.room = rng, room
        self.boxes, self.spheres, self.footprints = [], [], [(camera_xz - 0.5, camera_xz + 0.5)]

    def color(self, base, spread=0.15):
        return np.clip(np.asarray(base) + self.rng.uniform(-spread, spread, 3), 0.05, 0.95)

    def free_spot(self, size_xz, against_wall=False, tries=20):
        """Lower corner (x, z) of a free footprint of `size_xz`, or None."""
        for _ in range(tries):
            if against_wall:
                wall = self.rng.integers(4)
                lo = self.rng.uniform(0.05, self.room[[0, 2]] - size_xz - 0.05)
                if wall == 0:
                    lo[0] = 0.01
                elif wall == 1:
                    lo[0] = self.room[0] - size_xz[0] - 0.01
                elif wall == 2:
                    lo[1] = 0.01
                else:
                    lo[1] = self.room[2] - size_xz[1] - 0.01
            else:
                lo = self.rng.uniform(0.2, self.room[[0, 2]] - size_xz - 0.2)
            hi = lo + size_xz
            if all(np.any(hi + 0.05 < flo) or np.any(lo - 0.05 > fhi) for flo, fhi in self.footprints):
                self.footprints.append((lo, hi))
                return lo
        return None

    def box(self, lo, hi, cls, color):
        self.boxes.append((np.asarray(lo, float), np.asarray(hi, float), cls, color))

    def legs(self, x0, z0, sx, sz, height, width, cls, color):
        for lx, lz in (
            (x0, z0),
            (x0 + sx - width, z0),
            (x0, z0 + sz - width),
            (x0 + sx - width, z0 + sz - width),
        ):
            self.box((lx, 0, lz), (lx + width, height, lz + width), cls, color)

    def table(self):
        size = self.rng.uniform([0.8, 0.6], [1.8, 1.1])
        spot = self.free_spot(size)
        if spot is None:
            return
        h, col = self.rng.uniform(0.68, 0.78), self.color([0.55, 0.38, 0.22])
        x0, z0 = spot
        self.box((x0, h - 0.04, z0), (x0 + size[0], h, z0 + size[1]), TABLE, col)
        self.legs(x0 + 0.03, z0 + 0.03, size[0] - 0.06, size[1] - 0.06, h - 0.04, 0.06, TABLE, col * 0.8)
        if self.rng.random() < 0.6:  # something on the table
            s = self.rng.uniform(0.12, 0.3)
            cx, cz = x0 + self.rng.uniform(s, size[0] - s), z0 + self.rng.uniform(s, size[1] - s)
            if self.rng.random() < 0.5:
                self.box(
                    (cx - s / 2, h, cz - s / 2),
                    (cx + s / 2, h + s * self.rng.uniform(0.5, 1.2), cz + s / 2),
                    BOX,
                    self.color([0.7, 0.55, 0.35]),
                )
            else:
                self.spheres.append(
                    (np.array([cx, h + s / 2, cz]), s / 2, LAMP, self.color([0.9, 0.85, 0.6], 0.1))
                )

    def chair(self):
        w = self.rng.uniform(0.42, 0.52)
        spot = self.free_spot(np.array([w, w]))
        if spot is None:
            return
        x0, z0 = spot
        seat, col = (
            self.rng.uniform(0.42, 0.48),
            self.color(self.rng.choice([[0.2, 0.3, 0.6], [0.6, 0.2, 0.2], [0.3, 0.3, 0.3]])),
        )
        self.box((x0, seat - 0.05, z0), (x0 + w, seat, z0 + w), CHAIR, col)
        self.legs(x0 + 0.02, z0 + 0.02, w - 0.04, w - 0.04, seat - 0.05, 0.04, CHAIR, col * 0.6)
        side = self.rng.integers(4)  # backrest on one of the four sides
        t, top = 0.05, seat + self.rng.uniform(0.35, 0.5)
        lo, hi = [x0, seat, z0], [x0 + w, top, z0 + w]
        if side == 0:
            hi[0] = x0 + t
        elif side == 1:
            lo[0] = x0 + w - t
        elif side == 2:
            hi[2] = z0 + t
        else:
            lo[2] = z0 + w - t
        self.box(lo, hi, CHAIR, col)

    def cabinet(self):
        size = self.rng.uniform([0.6, 0.4], [1.6, 0.6])
        if self.rng.random() < 0.5:
            size = size[::-1].copy()
        spot = self.free_spot(size, against_wall=True)
        if spot is None:
            return
        h = self.rng.uniform(0.8, 2.1)
        self.box(
            (spot[0], 0, spot[1]),
            (spot[0] + size[0], h, spot[1] + size[1]),
            CABINET,
            self.color([0.75, 0.7, 0.6], 0.2),
        )

    def floor_box(self):
        s = self.rng.uniform([0.25, 0.2, 0.25], [0.7, 0.6, 0.7])
        spot = self.free_spot(s[[0, 2]])
        if spot is None:
            return
        self.box(
            (spot[0], 0, spot[1]), (spot[0] + s[0], s[1], spot[1] + s[2]), BOX, self.color([0.65, 0.5, 0.3])
        )

    def floor_lamp(self):
        spot = self.free_spot(np.array([0.3, 0.3]))
        if spot is None:
            return
        h, r = self.rng.uniform(1.2, 1.7), self.rng.uniform(0.12, 0.22)
        c = spot + 0.15
        self.box(
            (c[0] - 0.02, 0, c[1] - 0.02), (c[0] + 0.02, h, c[1] + 0.02), LAMP, np.array([0.2, 0.2, 0.2])
        )
        self.spheres.append(
            (np.array([c[0], h + r * 0.8, c[1]]), r, LAMP, self.color([0.95, 0.9, 0.7], 0.05))
        )

    def picture(self):
        w, h = self.rng.uniform(0.4, 1.2), self.rng.uniform(0.3, 0.8)
        y0, wall = self.rng.uniform(1.1, max(1.2, self.room[1] - h - 0.3)), self.rng.integers(4)
        along = self.rng.uniform(0.1, (self.room[0] if wall >= 2 else self.room[2]) - w - 0.1)
        col = self.color(self.rng.uniform(0.2, 0.8, 3), 0.0)
        d = 0.03
        if wall == 0:
            lo, hi = (0, y0, along), (d, y0 + h, along + w)
        elif wall == 1:
            lo, hi = (self.room[0] - d, y0, along), (self.room[0], y0 + h, along + w)
        elif wall == 2:
            lo, hi = (along, y0, 0), (along + w, y0 + h, d)
        else:
            lo, hi = (along, y0, self.room[2] - d), (along + w, y0 + h, self.room[2])
        self.box(lo, hi, PICTURE, col)


def sample_scene(rng: np.random.Generator, style: str = "rooms"):
    """A random furnished room and a camera (position, rotation camera->world, horizontal fov), in
    `style` (STYLES; module docstring)."""
    if check_style(style) == "varied":
        return _sample_varied_scene(rng)
    room = rng.uniform([3.0, 2.4, 3.5], [7.0, 3.2, 8.0])
    cam = np.array([rng.uniform(0.6, room[0] - 0.6), rng.uniform(1.0, 1.7), rng.uniform(0.3, 0.35 * room[2])])
    b = _SceneBuilder(rng, room, cam[[0, 2]])
    makers = [b.table, b.chair, b.chair, b.cabinet, b.floor_box, b.floor_lamp, b.picture]
    for i in rng.integers(len(makers), size=rng.integers(3, 8)):
        makers[i]()
    if b.boxes:
        box_lo, box_hi = (np.array([x[0] for x in b.boxes]), np.array([x[1] for x in b.boxes]))
        box_class, box_color = np.array([x[2] for x in b.boxes]), np.array([x[3] for x in b.boxes])
    else:
        box_lo = box_hi = box_color = np.zeros((0, 3))
        box_class = np.zeros((0,), int)
    if b.spheres:
        sc, sr = np.array([s[0] for s in b.spheres]), np.array([s[1] for s in b.spheres])
        scol = np.array([s[3] for s in b.spheres])
    else:
        sc, sr, scol = np.zeros((0, 3)), np.zeros((0,)), np.zeros((0, 3))
    scene = Scene(
        room=room,
        box_lo=box_lo,
        box_hi=box_hi,
        box_class=box_class,
        box_color=box_color,
        sphere_center=sc,
        sphere_radius=sr,
        sphere_color=scol,
        floor_color=b.color(rng.choice([[0.55, 0.4, 0.25], [0.7, 0.7, 0.68], [0.4, 0.3, 0.25]]), 0.1),
        wall_color=b.color(rng.choice([[0.85, 0.82, 0.75], [0.7, 0.78, 0.8], [0.8, 0.7, 0.6]]), 0.08),
        ceiling_color=b.color([0.92, 0.92, 0.9], 0.04),
        floor_style=int(rng.integers(2)),
        light=np.array([rng.uniform(0.5, room[0] - 0.5), room[1] - 0.15, rng.uniform(0.5, room[2] - 0.5)]),
        light_power=float(rng.uniform(0.8, 1.3)),
    )
    # Face the room's centre, give or take; look slightly down, as a hand-held sensor does.
    centre = 0.5 * room
    yaw = np.arctan2(centre[0] - cam[0], centre[2] - cam[2]) + rng.uniform(-0.5, 0.5)
    pitch = rng.uniform(0.05, 0.45)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    rot_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    fov = rng.uniform(np.deg2rad(55), np.deg2rad(70))
    return scene, cam, rot_yaw @ rot_pitch, fov


def _rot_x(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


_SIGNS = np.array(np.meshgrid([-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], indexing="ij")).reshape(3, -1).T


class _Group:
    """One piece of furniture (and what stands on it) in its own frame: y up, standing on y = 0,
    centred on x = z = 0; placed in the room by a yaw (and maybe a tilt) and a translation."""

    def __init__(self, ceiling):
        self.ceiling = ceiling  # what stands on it stays below this (in its frame)
        self.parts = []  # (centre, half extents, rotation, class, look)
        self.spheres = []  # (centre, radius, class, look)

    def box(self, lo, hi, cls, look):
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        self.parts.append(((lo + hi) / 2, (hi - lo) / 2, np.eye(3), cls, look))


class _VariedBuilder:
    """Furnishes a room for the "varied" style: furniture turned to any yaw, stacked, tipped over;
    non-overlapping floor footprints (axis-aligned bounds of the turned pieces)."""

    def __init__(self, rng: np.random.Generator, room: np.ndarray):
        self.rng, self.room = rng, room
        # Furniture, what stands on it and pictures stay below this (lamp shades up to 0.3 m above);
        # the lights go above all of it.
        self.max_top = room[1] - 0.45
        self.box_top = 0.0  # the highest point of anything placed
        self.boxes, self.spheres = [], []  # world: (centre, half, rot, cls, look, tex origin, tex frame)
        # xz bounds; 3-D bounds; what the camera may aim at: (part centres, their weights, 3-D bounds)
        self.footprints, self.groups, self.targets = [], [], []

    def look(self, glow=0.0):
        """A random appearance: two colours of any hue, one of the TEXTURES at any scale."""
        u = self.rng.random(14)
        color = np.array(colorsys.hsv_to_rgb(u[0], 0.9 * u[1], 0.12 + 0.83 * u[2]))
        other = np.array(colorsys.hsv_to_rgb(u[3], 0.9 * u[4], 0.12 + 0.83 * u[5]))
        z, phi = 2 * u[9] - 1, 2 * np.pi * u[10]  # a uniform direction
        return dict(
            color=color,
            color2=color + (0.3 + 0.7 * u[6]) * (other - color),
            texture=int(u[7] * len(TEXTURES)),
            scale=float(0.04 * 15.0 ** u[8]),  # log-uniform, 0.04 to 0.6 m
            direction=np.array([np.sqrt(1 - z * z) * np.cos(phi), z, np.sqrt(1 - z * z) * np.sin(phi)]),
            offset=6 * u[11:14] - 3,
            glow=glow,
        )

    def fill_top(self, g, top, depth=0):
        """Put a box (maybe with more on it), a ball or a table lamp on the surface `top` of g:
        (y, centre x, centre z, half x, half z, free height), in g's frame."""
        rng = self.rng
        y, cx, cz, hx, hz, room_above = top
        room_above = min(room_above, g.ceiling - y)
        if hx < 0.04 or hz < 0.04 or room_above < 0.06:
            return
        kind = rng.random()
        if kind < 0.55:  # a box, turned a little, maybe carrying more
            half = np.array(
                [rng.uniform(0.03, min(0.35, hx)), 0, rng.uniform(0.03, min(0.35, hz))]
            )
            half[1] = rng.uniform(0.02, min(0.3, room_above / 2))
            x, z = cx + rng.uniform(-1, 1) * (hx - half[0]), cz + rng.uniform(-1, 1) * (hz - half[2])
            g.parts.append(
                (np.array([x, y + half[1], z]), half, _rot_y(rng.uniform(-0.5, 0.5)), BOX, self.look())
            )
            if depth < 2 and rng.random() < 0.5:
                self.fill_top(
                    g, (y + 2 * half[1], x, z, 0.8 * half[0], 0.8 * half[2], room_above - 2 * half[1]),
                    depth + 1,
                )
        elif kind < 0.8:  # a ball
            r = rng.uniform(0.03, min(0.2, hx, hz, room_above / 2))
            x, z = cx + rng.uniform(-1, 1) * (hx - r), cz + rng.uniform(-1, 1) * (hz - r)
            g.spheres.append((np.array([x, y + r, z]), r, BOX, self.look()))
        else:  # a table lamp: base, stem, glowing or dark shade
            if min(hx, hz) < 0.06:
                return
            r = rng.uniform(0.05, min(0.18, hx, hz))
            stem = rng.uniform(0.1, 0.45)
            if stem + 2 * r > room_above:
                return
            x, z = cx + rng.uniform(-1, 1) * (hx - r), cz + rng.uniform(-1, 1) * (hz - r)
            look = self.look()
            g.box((x - 0.6 * r, y, z - 0.6 * r), (x + 0.6 * r, y + 0.03, z + 0.6 * r), LAMP, look)
            g.box((x - 0.015, y, z - 0.015), (x + 0.015, y + stem, z + 0.015), LAMP, look)
            glow = rng.uniform(0.3, 0.9) if rng.random() < 0.5 else 0.0
            g.spheres.append((np.array([x, y + stem + r * 0.8, z]), r, LAMP, self.look(glow)))

    def place(self, g, yaw, tilt=None, wall=None, lift=0.0, tries=20):
        """Turn g by `yaw` (after `tilt`), rest it on the floor (or `lift` above it) at a free spot
        (flush against `wall` 0-3: x = 0, x = X, z = 0, z = Z) and add it to the room. False when no
        spot was found."""
        rng, room = self.rng, self.room
        rot = _rot_y(yaw) if tilt is None else _rot_y(yaw) @ tilt
        n = len(g.parts)
        centres = np.array([x[0] for x in g.parts]).reshape(n, 3) @ rot.T
        halves = np.array([x[1] for x in g.parts]).reshape(n, 3)
        rots = rot @ np.array([x[2] for x in g.parts]).reshape(n, 3, 3)
        s_centres = np.array([c for c, *_ in g.spheres]).reshape(-1, 3) @ rot.T
        s_radii = np.array([rad for _, rad, *_ in g.spheres]).reshape(-1, 1)
        corners = _all_corners(centres, halves, rots).reshape(-1, 3)
        pts = np.concatenate([corners, s_centres - s_radii, s_centres + s_radii])
        lo, hi = pts.min(0), pts.max(0)
        size = hi - lo
        if size[0] > room[0] - 0.2 or size[2] > room[2] - 0.2 or lift + size[1] > self.max_top + 0.3:
            return False  # (the lights go above everything, and below the ceiling)
        taken_lo = np.array([a for a, _ in self.footprints]).reshape(-1, 2) - 0.05
        taken_hi = np.array([b for _, b in self.footprints]).reshape(-1, 2) + 0.05
        spots = rng.uniform(0.02, room[[0, 2]] - size[[0, 2]] - 0.02, size=(tries, 2))
        if wall is not None:  # flush against it
            axis = 0 if wall < 2 else 1
            spots[:, axis] = 0.01 if wall % 2 == 0 else room[2 * axis] - size[2 * axis] - 0.01
        f_lo, f_hi = spots[:, None], spots[:, None] + size[[0, 2]]
        free = np.all(np.any(f_hi < taken_lo, -1) | np.any(f_lo > taken_hi, -1), -1)
        if not free.any():
            return False
        spot = spots[np.argmax(free)]
        f_lo, f_hi = spot, spot + size[[0, 2]]
        shift = np.array([spot[0] - lo[0], lift - lo[1], spot[1] - lo[2]])
        self.footprints.append((f_lo, f_hi))
        self.groups.append((lo + shift, hi + shift))
        centres, s_centres = centres + shift, s_centres + shift
        # a part is aimed at in proportion to its largest face (not to thin legs as often as to tops)
        weights = np.concatenate([np.sort(halves, 1)[:, 1:].prod(1), s_radii[:, 0] ** 2])
        self.targets.append((np.concatenate([centres, s_centres]), weights, lo + shift, hi + shift))
        self.box_top = max(self.box_top, hi[1] + shift[1])
        for c, h, r, (_, _, _, cls, look) in zip(centres, halves, rots, g.parts):
            self.boxes.append((c, h, r, cls, look, shift + look["offset"], r))
        for c, (_, rad, cls, look) in zip(s_centres, g.spheres):
            self.spheres.append((c, rad, cls, look, shift + look["offset"], rot))
        return True

    def table(self):
        rng, g = self.rng, _Group(self.max_top)
        w, d = rng.uniform(0.25, 1.0), rng.uniform(0.2, 0.6)  # half extents
        h, th, leg = rng.uniform(0.35, 1.1), rng.uniform(0.025, 0.08), rng.uniform(0.015, 0.05)
        look = self.look()
        legs = look if rng.random() < 0.6 else self.look()
        g.box((-w, h - th, -d), (w, h, d), TABLE, look)
        if rng.random() < 0.2:  # pedestal
            g.box((-2 * leg, 0, -2 * leg), (2 * leg, h - th, 2 * leg), TABLE, legs)
            g.box((-0.5 * d, 0, -0.5 * d), (0.5 * d, 0.03, 0.5 * d), TABLE, legs)
        else:
            for sx in (-1, 1):
                for sz in (-1, 1):
                    x, z = sx * (w - 0.03 - leg), sz * (d - 0.03 - leg)
                    g.box((x - leg, 0, z - leg), (x + leg, h - th, z + leg), TABLE, legs)
        for _ in range(rng.integers(0, 4)):
            self.fill_top(g, (h, 0, 0, w, d, 1.0))
        self.place(g, rng.uniform(0, 2 * np.pi))

    def chair(self):
        rng, g = self.rng, _Group(self.max_top)
        look = self.look()
        tilt = None
        if rng.random() < _SOFA_SHARE:  # a sofa or armchair: solid seat, back and arms
            w, d = rng.uniform(0.4, 1.1), rng.uniform(0.35, 0.5)
            seat, back, arm = rng.uniform(0.3, 0.5), rng.uniform(0.25, 0.5), rng.uniform(0.08, 0.2)
            g.box((-w, 0, -d), (w, seat, d), CHAIR, look)
            g.box((-w, seat, -d), (w, seat + back, -d + rng.uniform(0.1, 0.25)), CHAIR, look)
            if rng.random() < 0.7:
                other = look if rng.random() < 0.5 else self.look()
                arm_h = seat + rng.uniform(0.1, 0.25)
                g.box((-w, seat, -d), (-w + arm, arm_h, d), CHAIR, other)
                g.box((w - arm, seat, -d), (w, arm_h, d), CHAIR, other)
        else:
            w = rng.uniform(0.18, 0.3)
            seat, th, leg = rng.uniform(0.35, 0.6), rng.uniform(0.03, 0.08), rng.uniform(0.012, 0.03)
            legs = look if rng.random() < 0.6 else self.look()
            g.box((-w, seat - th, -w), (w, seat, w), CHAIR, look)
            for sx in (-1, 1):
                for sz in (-1, 1):
                    x, z = sx * (w - 0.02 - leg), sz * (w - 0.02 - leg)
                    g.box((x - leg, 0, z - leg), (x + leg, seat - th, z + leg), CHAIR, legs)
            back = rng.uniform(0.25, 0.6)
            g.box((-w, seat, -w), (w, seat + back, -w + rng.uniform(0.025, 0.07)), CHAIR, look)
            if rng.random() < 0.15:  # knocked over
                tilt = (_rot_x if rng.random() < 0.5 else _rot_z)(rng.choice([-0.5, 0.5]) * np.pi)
        self.place(g, rng.uniform(0, 2 * np.pi), tilt)

    def cabinet(self):
        rng, g = self.rng, _Group(self.max_top)
        w, d = rng.uniform(0.25, 1.2), rng.uniform(0.15, 0.35)
        h = rng.uniform(0.4, min(2.2, self.max_top))
        lift = 0.0
        if rng.random() < 0.2:  # hung on a wall
            h = rng.uniform(0.3, min(0.9, self.max_top - 1.2))
            lift = rng.uniform(1.1, self.max_top - h)
            g.ceiling = self.max_top - lift
        look = self.look()
        if rng.random() < 0.35:  # open shelves, with things on them
            t = rng.uniform(0.015, 0.04)
            g.box((-w, 0, -d), (w, h, -d + t), CABINET, look)
            g.box((-w, 0, -d), (-w + t, h, d), CABINET, look)
            g.box((w - t, 0, -d), (w, h, d), CABINET, look)
            levels = np.linspace(0, h - t, int(rng.integers(2, 6)))
            for y0, y1 in zip(levels, np.append(levels[1:], np.inf)):
                g.box((-w + t, y0, -d + t), (w - t, y0 + t, d), CABINET, look)
                if rng.random() < 0.7:
                    self.fill_top(g, (y0 + t, 0, t / 2, w - t, d - t / 2, y1 - y0 - t - 0.02))
        else:
            g.box((-w, 0, -d), (w, h, d), CABINET, look)
            if rng.random() < 0.6:  # doors or drawers on the front
                doors = look if rng.random() < 0.4 else self.look()
                n = int(rng.integers(1, 4))
                for i in range(n):
                    x0 = -w + 2 * w * i / n
                    g.box((x0 + 0.02, 0.05, d), (x0 + 2 * w / n - 0.02, h - 0.03, d + 0.02), CABINET, doors)
        if not lift:
            self.fill_top(g, (h, 0, 0, w, d, 1.0))
        if lift or rng.random() < 0.7:  # back to a wall: local -z turned to face it
            wall = int(rng.integers(4))
            self.place(g, (np.pi / 2, -np.pi / 2, 0.0, np.pi)[wall], wall=wall, lift=lift)
        else:
            self.place(g, rng.uniform(0, 2 * np.pi))

    def box_stack(self):
        rng, g = self.rng, _Group(self.max_top)
        half = rng.uniform([0.05, 0.04, 0.05], [0.45, 0.35, 0.45])
        half[1] = min(half[1], self.max_top / 2)
        g.parts.append((np.array([0, half[1], 0]), half, np.eye(3), BOX, self.look()))
        if rng.random() < 0.6:
            self.fill_top(g, (2 * half[1], 0, 0, half[0], half[2], 1.0))
        self.place(g, rng.uniform(0, 2 * np.pi))

    def ball(self):
        g = _Group(self.max_top)
        r = self.rng.uniform(0.06, 0.45)
        g.spheres.append((np.array([0, r, 0]), r, BOX, self.look()))
        self.place(g, 0.0)

    def floor_lamp(self):
        rng, g = self.rng, _Group(self.max_top)
        h = rng.uniform(0.9, min(1.9, self.max_top - 0.3))
        r, look = rng.uniform(0.1, 0.3), self.look()
        g.box((-0.15, 0, -0.15), (0.15, 0.03, 0.15), LAMP, look)
        g.box((-0.015, 0, -0.015), (0.015, h, 0.015), LAMP, look)
        glow = rng.uniform(0.3, 0.9) if rng.random() < 0.5 else 0.0
        if rng.random() < 0.6:
            g.spheres.append((np.array([0, h + 0.8 * r, 0]), r, LAMP, self.look(glow)))
        else:
            g.box((-r, h, -r), (r, h + 1.2 * r, r), LAMP, self.look(glow))
        self.place(g, rng.uniform(0, 2 * np.pi))

    def pictures(self):
        """One to three pictures (some glowing, like screens) on one wall."""
        rng, room = self.rng, self.room
        wall = int(rng.integers(4))
        length = room[0] if wall >= 2 else room[2]
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(0.3, min(2.0, 0.8 * length)), rng.uniform(0.3, min(1.4, self.max_top - 0.4))
            y0, d = rng.uniform(0.3, self.max_top - h), rng.uniform(0.015, 0.06)
            along = rng.uniform(0.05, length - w - 0.05)
            if wall == 0:
                lo, hi = (0, y0, along), (d, y0 + h, along + w)
            elif wall == 1:
                lo, hi = (room[0] - d, y0, along), (room[0], y0 + h, along + w)
            elif wall == 2:
                lo, hi = (along, y0, 0), (along + w, y0 + h, d)
            else:
                lo, hi = (along, y0, room[2] - d), (along + w, y0 + h, room[2])
            lo, hi = np.array(lo, float), np.array(hi, float)
            look = self.look(rng.uniform(0.2, 0.7) if rng.random() < 0.15 else 0.0)
            centre, half = (lo + hi) / 2, (hi - lo) / 2
            self.boxes.append((centre, half, np.eye(3), PICTURE, look, look["offset"], np.eye(3)))
            self.box_top = max(self.box_top, hi[1])
            self.targets.append(((lo + hi)[None] / 2, np.ones(1), lo, hi))


def _surface_arrays(looks, origins, frames):
    return dict(
        color=np.array([x["color"] for x in looks]),
        color2=np.clip(np.array([x["color2"] for x in looks]), 0, 1),
        texture=np.array([x["texture"] for x in looks], int),
        scale=np.array([x["scale"] for x in looks]),
        direction=np.array([x["direction"] for x in looks]),
        origin=np.array(origins, float),
        frame=np.array(frames, float),
        glow=np.array([x["glow"] for x in looks]),
    )


def _sample_varied_scene(rng: np.random.Generator):
    """The "varied" style (module docstring): a room, its furniture, lights and a camera."""
    room = rng.uniform([2.5, 2.4, 2.5], [6.5, 3.3, 6.5])
    b = _VariedBuilder(rng, room)
    # A spot kept free, where the camera can always stand.
    spare = rng.uniform(0.3, room[[0, 2]] - 0.3)
    b.footprints.append((spare - 0.25, spare + 0.25))
    makers = [b.table, b.chair, b.cabinet, b.box_stack, b.ball, b.floor_lamp, b.pictures]
    weights = np.array(_WEIGHTS)
    for i in rng.choice(len(makers), size=int(rng.integers(_N_GROUPS[0], _N_GROUPS[1] + 1)), p=weights):
        makers[i]()

    # The camera: mostly (_AIM_SHARE) near a random object and aimed at it, else anywhere free with
    # any yaw; never inside a piece's bounds (unless above it).
    top_cam = min(2.2, room[1] - 0.25)

    def free(xz, y):
        inside = np.all((xz > 0.3) & (xz < room[[0, 2]] - 0.3))
        return inside and all(
            np.any(xz < lo[[0, 2]] - 0.15) or np.any(xz > hi[[0, 2]] + 0.15) or y > hi[1] + 0.15
            for lo, hi in b.groups
        )

    aim = b.targets and rng.random() < _AIM_SHARE
    if aim:  # a part of a random piece, seen from a random side, at a pitch within the limits
        centres, weights, lo, hi = b.targets[int(rng.integers(len(b.targets)))]
        target = centres[rng.choice(len(centres), p=weights / weights.sum())]
        reach = 0.5 * np.linalg.norm((hi - lo)[[0, 2]])
    for _ in range(30):
        if aim:
            angle, dist = rng.uniform(0, 2 * np.pi), reach + rng.uniform(*_AIM_GAP)
            xz = target[[0, 2]] + dist * np.array([np.cos(angle), np.sin(angle)])
            y = np.clip(target[1] + dist * np.tan(rng.uniform(-0.3, 0.75)), 0.3, top_cam)
        else:
            xz, y = rng.uniform(0.3, room[[0, 2]] - 0.3), rng.uniform(0.3, top_cam)
        if free(xz, y):
            break
    else:
        xz, y = spare, rng.uniform(0.3, top_cam)
    cam = np.array([xz[0], y, xz[1]])
    if aim:
        to = target - cam
        yaw = np.arctan2(to[0], to[2]) + rng.normal(0, 0.08)
        pitch = np.arctan2(-to[1], np.hypot(to[0], to[2])) + rng.normal(0, 0.06)
    else:
        yaw, pitch = rng.uniform(0, 2 * np.pi), rng.uniform(-0.35, 0.8)
    pitch = np.clip(pitch, -0.35, 0.8)
    roll = rng.uniform(-0.3, 0.3)
    cp, sp = np.cos(pitch), np.sin(pitch)
    rot = _rot_y(yaw) @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]]) @ _rot_z(roll)
    fov = rng.uniform(np.deg2rad(40), np.deg2rad(95))

    # Lights: one or two, tinted, anywhere above everything (as the shadow test wants).
    top = max([b.box_top] + [c[1] + rad for c, rad, *_ in b.spheres])
    n_lights = 1 + int(rng.random() < 0.4)
    lights, light_rgb = [], []
    for _ in range(n_lights):
        lights.append([rng.uniform(0.2, room[0] - 0.2), rng.uniform(top + 0.05, room[1] - 0.05),
                       rng.uniform(0.2, room[2] - 0.2)])
        tint = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.4), 1.0))
        light_rgb.append(rng.uniform(0.4, 2.2) / np.sqrt(n_lights) * tint / tint.mean())
    amb_tint = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), 1.0))
    ambient = rng.uniform(0.06, 0.4) * amb_tint / amb_tint.mean()

    floor = b.look()
    walls = [b.look()] * 4 if rng.random() < 0.7 else [b.look() for _ in range(4)]
    ceiling = b.look()
    room_looks = [floor] + walls + [ceiling]
    looks = room_looks + [x[4] for x in b.boxes] + [x[3] for x in b.spheres]
    origins = [x["offset"] for x in room_looks] + [x[5] for x in b.boxes] + [x[4] for x in b.spheres]
    frames = [np.eye(3)] * 6 + [x[6] for x in b.boxes] + [x[5] for x in b.spheres]
    appearance = Appearance(
        **_surface_arrays(looks, origins, frames),
        lights=np.array(lights),
        light_rgb=np.array(light_rgb),
        ambient=ambient,
        exposure=float(rng.uniform(0.75, 1.35)),
    )
    n_box, n_sph = len(b.boxes), len(b.spheres)
    half = np.array([x[1] for x in b.boxes]).reshape(n_box, 3)
    scene = Scene(
        room=room,
        box_lo=-half,
        box_hi=half,
        box_class=np.array([x[3] for x in b.boxes], int),
        box_color=appearance.color[6 : 6 + n_box],
        sphere_center=np.array([x[0] for x in b.spheres]).reshape(n_sph, 3),
        sphere_radius=np.array([x[1] for x in b.spheres], float),
        sphere_color=appearance.color[6 + n_box :],
        floor_color=appearance.color[0],
        wall_color=appearance.color[1],
        ceiling_color=appearance.color[5],
        floor_style=-1,
        light=appearance.lights[0],
        light_power=float(np.linalg.norm(appearance.light_rgb[0])),
        sphere_class=np.array([x[2] for x in b.spheres], int),
        box_center=np.array([x[0] for x in b.boxes]).reshape(n_box, 3),
        box_rot=np.array([x[2] for x in b.boxes]).reshape(n_box, 3, 3),
        appearance=appearance,
    )
    return scene, cam, rot, fov


def _slab(origin, inv_dirs, lo, hi):
    """Slab test (Kay & Kajiya) of rays against one box: entry t (inf where missed) and entry axis.

    origin is (3,) or (..., 3) like inv_dirs (1 / ray direction)."""
    with np.errstate(invalid="ignore", over="ignore"):
        t1, t2 = (lo - origin) * inv_dirs, (hi - origin) * inv_dirs
    t_lo, t_hi = np.minimum(t1, t2), np.maximum(t1, t2)
    near, far = t_lo.max(-1), t_hi.min(-1)
    hit = (near <= far) & (near > 1e-4)
    return np.where(hit, near, np.inf), t_lo.argmax(-1)


def _box_pixel_rect(lo, hi, cam, rot, f, size):
    """Conservative pixel rectangle (r0, r1, c0, c1) a box can cover; the whole image if it straddles
    the camera plane. Perspective maps a box to the convex hull of its corners' images."""
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    cam_xyz = (corners - cam) @ rot
    if np.any(cam_xyz[:, 2] < 1e-3):
        return 0, size, 0, size
    cols = f * cam_xyz[:, 0] / cam_xyz[:, 2] + 0.5 * size
    rows = 0.5 * size - f * cam_xyz[:, 1] / cam_xyz[:, 2]
    clip = lambda x: int(np.clip(x, 0, size))
    return (
        clip(np.floor(rows.min())),
        clip(np.ceil(rows.max()) + 1),
        clip(np.floor(cols.min())),
        clip(np.ceil(cols.max()) + 1),
    )


def _hit_spheres(origin, dirs, centers, radii, t_max=None):
    """Ray/sphere: nearest positive t (inf: none) and sphere index; or any-hit before t_max."""
    oc = (origin - centers[None]) if origin.ndim == 1 else (origin[:, None] - centers[None])
    a = np.sum(dirs * dirs, -1)[:, None]
    b = np.einsum("pk,psk->ps", dirs, np.broadcast_to(oc, (len(dirs),) + centers.shape))
    c = np.sum(oc * oc, -1) - radii[None] ** 2
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    t = np.where((disc >= 0) & (t > 1e-4), t, np.inf)
    if t_max is not None:
        return np.any(t < t_max, axis=1)
    index = t.argmin(1)
    return t[np.arange(len(dirs)), index], index


def _trace_boxes(scene, cam, rot, f, size, dirs, t, cls, normal, obj_color, is_obj):
    """Primary rays against every box, each tested only inside its pixel rectangle; updates the
    per-pixel buffers (flat, length size*size) in place where a box is nearer."""
    grid = lambda a: a.reshape((size, size) + a.shape[1:])
    dirs2, t2, cls2, normal2, color2, obj2 = map(grid, (dirs, t, cls, normal, obj_color, is_obj))
    with np.errstate(divide="ignore"):
        inv2 = 1.0 / dirs2
    for lo, hi, box_cls, color in zip(scene.box_lo, scene.box_hi, scene.box_class, scene.box_color):
        r0, r1, c0, c1 = _box_pixel_rect(lo, hi, cam, rot, f, size)
        if r0 >= r1 or c0 >= c1:
            continue
        window = (slice(r0, r1), slice(c0, c1))
        near, axis = _slab(cam, inv2[window], lo, hi)
        closer = near < t2[window]
        if not closer.any():
            continue
        t2[window] = np.where(closer, near, t2[window])
        cls2[window] = np.where(closer, box_cls, cls2[window])
        face = np.zeros(near.shape + (3,))
        np.put_along_axis(
            face, axis[..., None], -np.sign(np.take_along_axis(dirs2[window], axis[..., None], -1)), -1
        )
        normal2[window] = np.where(closer[..., None], face, normal2[window])
        color2[window] = np.where(closer[..., None], color, color2[window])
        obj2[window] |= closer


def _shadowed_by_boxes(scene, points, to_light):
    """Whether the segment from each point to the light crosses a box. Only points inside a box's
    light-space footprint are tested exactly: seen from the light (above everything), the slope
    (x - Lx, z - Lz) / (Ly - y) of every point of a box lies within its corners' slopes."""
    light = scene.light
    drop = np.maximum(light[1] - points[:, 1], 1e-6)
    slope = (points[:, [0, 2]] - light[[0, 2]]) / drop[:, None]
    shadowed = np.zeros(len(points), bool)
    for lo, hi in zip(scene.box_lo, scene.box_hi):
        corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
        c_slope = (corners[:, [0, 2]] - light[[0, 2]]) / np.maximum(light[1] - corners[:, 1], 1e-6)[:, None]
        s_lo, s_hi = c_slope.min(0), c_slope.max(0)
        cand = np.nonzero((points[:, 1] < hi[1]) & np.all((slope >= s_lo) & (slope <= s_hi), -1) & ~shadowed)[
            0
        ]
        if len(cand):
            with np.errstate(divide="ignore"):
                near, _ = _slab(points[cand], 1.0 / to_light[cand], lo, hi)
            shadowed[cand] |= near < 1.0
    return shadowed


def _floor_texture(scene, p):
    if scene.floor_style == 0:  # wooden planks along x
        plank = np.floor(p[:, 2] / 0.18)
        tint = 0.8 + 0.35 * _hash01(plank)
        grain = 1.0 + 0.06 * np.sin(p[:, 0] * 35.0 + 9.0 * _hash01(plank + 3.1))
        gap = np.where(np.modf(p[:, 2] / 0.18)[0] < 0.05, 0.55, 1.0)
        return (tint * grain * gap)[:, None]
    tile = np.floor(p[:, 0] / 0.5) + np.floor(p[:, 2] / 0.5)
    checker = np.where(tile % 2 == 0, 1.0, 0.8)
    grout = (np.modf(p[:, 0] / 0.5)[0] % 1 < 0.025) | (np.modf(p[:, 2] / 0.5)[0] % 1 < 0.025)
    return np.where(grout, 0.5, checker)[:, None]


def render(scene: Scene, cam: np.ndarray, rot: np.ndarray, fov: float, size: int):
    """Ray-cast one view. Returns rgb float (H,W,3) in [0,1], z-depth (H,W), class (H,W), normals,
    ray directions (camera z = 1) and the intrinsics (fx, fy, cx, cy)."""
    if scene.appearance is not None:
        return _render_varied(scene, cam, rot, fov, size)
    f = 0.5 * size / np.tan(0.5 * fov)
    u = (np.arange(size) + 0.5 - 0.5 * size) / f
    dirs_cam = np.stack(np.broadcast_arrays(u[None, :], -u[:, None], np.ones((size, size))), -1).reshape(
        -1, 3
    )
    dirs = dirs_cam @ rot.T  # t along these directions is z-depth, since their camera z is 1
    n_pix = len(dirs)
    rows = np.arange(n_pix)

    # The room seen from inside: the exit face.
    with np.errstate(divide="ignore", invalid="ignore"):
        t_faces = np.where(dirs > 0, (scene.room - cam) / dirs, -cam / dirs)
    t_faces = np.where(np.isfinite(t_faces) & (t_faces > 0), t_faces, np.inf)
    axis = t_faces.argmin(1)
    t = t_faces[rows, axis]
    normal = np.zeros((n_pix, 3))
    normal[rows, axis] = -np.sign(dirs[rows, axis])
    cls = np.where(axis == 1, np.where(dirs[:, 1] < 0, FLOOR, CEILING), WALL)
    albedo = np.empty((n_pix, 3))
    albedo[:] = scene.wall_color
    albedo[cls == FLOOR] = scene.floor_color
    albedo[cls == CEILING] = scene.ceiling_color
    obj_color = np.zeros((n_pix, 3))
    is_obj = np.zeros(n_pix, bool)

    if len(scene.box_lo):
        _trace_boxes(scene, cam, rot, f, size, dirs, t, cls, normal, obj_color, is_obj)
    if len(scene.sphere_center):
        ts, isp = _hit_spheres(cam, dirs, scene.sphere_center, scene.sphere_radius)
        closer = ts < t
        t = np.where(closer, ts, t)
        cls = np.where(closer, LAMP, cls)
        ns = (cam + ts[:, None] * dirs - scene.sphere_center[isp]) / scene.sphere_radius[isp][:, None]
        normal = np.where(closer[:, None], ns, normal)
        obj_color = np.where(closer[:, None], scene.sphere_color[isp], obj_color)
        is_obj |= closer

    p = cam + t[:, None] * dirs
    # Textures, computed only where they apply: the perspective of regular patterns is a strong
    # monocular depth cue.
    albedo[is_obj] = obj_color[is_obj]
    floor, wall, pic = cls == FLOOR, cls == WALL, cls == PICTURE
    wood = (cls == TABLE) | (cls == CABINET)
    albedo[floor] *= _floor_texture(scene, p[floor])
    along = np.where(np.abs(normal[:, 0]) > 0.5, p[:, 2], p[:, 0])
    pw, aw = p[wall], along[wall]
    albedo[wall] *= ((1.0 + 0.05 * np.sin(aw * 2 * np.pi / 0.2)) * np.where(pw[:, 1] < 0.1, 0.6, 1.0))[
        :, None
    ]
    pd = p[wood]
    albedo[wood] *= (1 + 0.07 * np.sin(30 * (pd[:, 0] + pd[:, 2]) + 5 * pd[:, 1]))[:, None]
    albedo[pic] *= (0.7 + 0.3 * np.sin(7 * p[pic, 1] + 5 * along[pic]))[:, None] * np.array([1.0, 0.8, 1.2])

    # Lighting: ceiling point light with inverse-square falloff and cast shadows, plus sky-like ambient.
    to_light = scene.light - p
    dist2 = np.sum(to_light**2, -1)
    lambert = np.clip(np.sum(normal * to_light, -1) / np.sqrt(dist2), 0, None)
    lit = np.ones(n_pix, bool)
    origin = p + 1e-3 * normal
    if len(scene.box_lo):
        lit &= ~_shadowed_by_boxes(scene, origin, to_light)
    if len(scene.sphere_center):
        lit &= ~_hit_spheres(origin, to_light, scene.sphere_center, scene.sphere_radius, t_max=1.0)
    direct = scene.light_power * 4.0 * lambert * lit / (1.0 + dist2)
    ambient = 0.22 + 0.08 * normal[:, 1]
    lamp_glow = np.where((cls == LAMP) & is_obj & (obj_color.mean(-1) > 0.6), 0.5, 0.0)
    rgb = albedo * (ambient + direct + lamp_glow)[:, None]
    rgb = np.clip(rgb, 0, 1) ** (1 / 1.6)
    intrinsics = (f, f, 0.5 * size, 0.5 * size)
    return (
        rgb.reshape(size, size, 3),
        t.reshape(size, size),
        cls.reshape(size, size),
        normal.reshape(size, size, 3),
        dirs.reshape(size, size, 3),
        intrinsics,
    )


def _all_corners(centers, halves, rots):
    """(B, 8, 3) world corners of boxes with centres, half extents and axes (B, 3, 3)."""
    return centers[:, None] + np.einsum("sk,bk,bjk->bsj", _SIGNS, halves, rots)


def _pixel_rects(corners, cam, rot, f, size):
    """(B, 4) int pixel rectangles (r0, r1, c0, c1) of boxes given by their corners (B, 8, 3), as in
    _box_pixel_rect: the whole image for a box straddling the camera plane, empty for one behind it."""
    xyz = (corners - cam) @ rot
    z = xyz[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        cols = f * xyz[..., 0] / z + 0.5 * size
        rows = 0.5 * size - f * xyz[..., 1] / z
    rect = np.stack(
        [np.floor(rows.min(1)), np.ceil(rows.max(1)) + 1, np.floor(cols.min(1)), np.ceil(cols.max(1)) + 1], 1
    )
    rect = np.clip(np.nan_to_num(rect), 0, size)
    rect[np.any(z < 1e-3, 1)] = (0, size, 0, size)
    rect[np.all(z <= 0, 1)] = 0
    return rect.astype(int)


def _trace_turned_boxes(scene, corners, cam, rot, f, size, dirs, t, cls, surf, normal):
    """Like _trace_boxes for boxes in their own frames (box_center, box_rot): each ray is taken into
    the box's frame, where the slab test applies; t is unchanged by that rigid map."""
    grid = lambda a: a.reshape((size, size) + a.shape[1:])
    dirs2, t2, cls2, surf2, normal2 = map(grid, (dirs, t, cls, surf, normal))
    rects = _pixel_rects(corners, cam, rot, f, size)
    for i in np.nonzero((rects[:, 0] < rects[:, 1]) & (rects[:, 2] < rects[:, 3]))[0]:
        c, r, hi = scene.box_center[i], scene.box_rot[i], scene.box_hi[i]
        window = (slice(rects[i, 0], rects[i, 1]), slice(rects[i, 2], rects[i, 3]))
        local = dirs2[window] @ r
        with np.errstate(divide="ignore"):
            near, axis = _slab((cam - c) @ r, 1.0 / local, -hi, hi)
        closer = near < t2[window]
        if not closer.any():
            continue
        t2[window] = np.where(closer, near, t2[window])
        cls2[window] = np.where(closer, scene.box_class[i], cls2[window])
        surf2[window] = np.where(closer, 6 + i, surf2[window])
        face = np.zeros(near.shape + (3,))
        np.put_along_axis(face, axis[..., None], -np.sign(np.take_along_axis(local, axis[..., None], -1)), -1)
        normal2[window] = np.where(closer[..., None], face @ r.T, normal2[window])


def _trace_spheres(scene, corners, cam, rot, f, size, dirs, t, cls, surf, normal):
    """Primary rays against every sphere, each tested only inside the pixel rectangle of its bounding
    cube (corners); updates the buffers like _trace_turned_boxes."""
    grid = lambda a: a.reshape((size, size) + a.shape[1:])
    dirs2, t2, cls2, surf2, normal2 = map(grid, (dirs, t, cls, surf, normal))
    first = 6 + len(scene.box_lo)
    rects = _pixel_rects(corners, cam, rot, f, size)
    for i in np.nonzero((rects[:, 0] < rects[:, 1]) & (rects[:, 2] < rects[:, 3]))[0]:
        c, rad = scene.sphere_center[i], scene.sphere_radius[i]
        window = (slice(rects[i, 0], rects[i, 1]), slice(rects[i, 2], rects[i, 3]))
        d = dirs2[window]
        near = _hit_spheres(cam, d.reshape(-1, 3), c[None], np.array([rad]))[0].reshape(d.shape[:2])
        closer = near < t2[window]
        if not closer.any():
            continue
        t2[window] = np.where(closer, near, t2[window])
        cls2[window] = np.where(closer, scene.sphere_class[i], cls2[window])
        surf2[window] = np.where(closer, first + i, surf2[window])
        n = (cam + near[..., None] * d - c) / rad
        normal2[window] = np.where(closer[..., None], n, normal2[window])


def _shadowed_varied(scene, corners, points, light, to_light):
    """Whether the segment from each point to `light` crosses a box (in its own frame) or a sphere;
    corners: (B + S, 8, 3), of the boxes then of the spheres' bounding cubes. As in
    _shadowed_by_boxes, a point is tested exactly only inside an occluder's light-space footprint
    (found by bisection in the points sorted by x slope); an occluder reaching above the light (never
    made: the lights are placed above everything) would be tested on every point."""
    drop = np.maximum(light[1] - points[:, 1], 1e-6)
    slope = (points[:, [0, 2]] - light[[0, 2]]) / drop[:, None]
    order = np.argsort(slope[:, 0], kind="stable")
    sorted_x = slope[order, 0]
    tops = corners[..., 1].max(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        c_slope = (corners[..., [0, 2]] - light[[0, 2]]) / (light[1] - corners[..., 1])[..., None]
    s_lo, s_hi = c_slope.min(1), c_slope.max(1)
    first = np.searchsorted(sorted_x, s_lo[:, 0], "left")
    last = np.searchsorted(sorted_x, s_hi[:, 0], "right")
    n_box = len(scene.box_lo)
    shadowed = np.zeros(len(points), bool)
    for k in range(len(corners)):
        if tops[k] >= light[1]:
            cand = np.nonzero(~shadowed)[0]
        else:
            if first[k] >= last[k]:
                continue
            cand = order[first[k] : last[k]]
            z_slope = slope[cand, 1]
            cand = cand[(points[cand, 1] < tops[k]) & (z_slope >= s_lo[k, 1]) & (z_slope <= s_hi[k, 1])]
            cand = cand[~shadowed[cand]]
        if not len(cand):
            continue
        if k < n_box:
            c, r, hi = scene.box_center[k], scene.box_rot[k], scene.box_hi[k]
            with np.errstate(divide="ignore"):
                near, _ = _slab((points[cand] - c) @ r, 1.0 / (to_light[cand] @ r), -hi, hi)
            shadowed[cand] |= near < 1.0
        else:
            c, rad = scene.sphere_center[k - n_box], scene.sphere_radius[k - n_box]
            shadowed[cand] |= _hit_spheres(points[cand], to_light[cand], c[None], np.array([rad]), t_max=1.0)
    return shadowed


def _value_noise(q):
    """Smooth 3-D value noise in [0, 1): trilinear blend of hashed lattice values."""
    cell = np.floor(q)
    w = q - cell
    w = w * w * (3 - 2 * w)
    out = np.zeros(len(q))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                h = _hash01((cell[:, 0] + dx) + 57.0 * (cell[:, 1] + dy) + 113.0 * (cell[:, 2] + dz))
                out += (
                    (w[:, 0] if dx else 1 - w[:, 0])
                    * (w[:, 1] if dy else 1 - w[:, 1])
                    * (w[:, 2] if dz else 1 - w[:, 2])
                    * h
                )
    return out


def _solid_albedo(app, surf, p):
    """Albedo from each surface's solid texture (TEXTURES): a mix of its two colours by a pattern in
    [0, 1] of the point in the surface's texture frame, in units of its scale."""
    q = np.einsum("pk,pkj->pj", p - app.origin[surf], app.frame[surf]) / app.scale[surf][:, None]
    along = np.sum(q * app.direction[surf], -1)
    kind = app.texture[surf]
    m = np.zeros(len(p))
    k = kind == 1  # stripes
    m[k] = along[k] - np.floor(along[k]) < 0.5
    k = kind == 2  # checks
    m[k] = np.floor(q[k]).sum(-1) % 2
    k = kind == 3  # blotchy noise
    m[k] = np.clip((0.65 * _value_noise(q[k]) + 0.35 * _value_noise(2.7 * q[k]) - 0.2) / 0.6, 0, 1)
    k = kind == 4  # wood-like grain: bands bent by noise
    m[k] = 0.5 + 0.5 * np.sin(2 * np.pi * (3 * along[k] + 2 * _value_noise(q[k])))
    k = kind == 5  # speckle: a random value per small cell
    cells = np.floor(8 * q[k])
    m[k] = _hash01(cells[:, 0] + 57.0 * cells[:, 1] + 113.0 * cells[:, 2])
    color = app.color[surf]
    return color + m[:, None] * (app.color2[surf] - color)


def _render_varied(scene: Scene, cam, rot, fov, size):
    """render() for the "varied" style: turned boxes, classed spheres, solid textures, tinted lights."""
    app = scene.appearance
    f = 0.5 * size / np.tan(0.5 * fov)
    u = (np.arange(size) + 0.5 - 0.5 * size) / f
    dirs_cam = np.stack(np.broadcast_arrays(u[None, :], -u[:, None], np.ones((size, size))), -1).reshape(
        -1, 3
    )
    dirs = dirs_cam @ rot.T  # t along these directions is z-depth, since their camera z is 1
    n_pix = len(dirs)
    rows = np.arange(n_pix)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_faces = np.where(dirs > 0, (scene.room - cam) / dirs, -cam / dirs)
    t_faces = np.where(np.isfinite(t_faces) & (t_faces > 0), t_faces, np.inf)
    axis = t_faces.argmin(1)
    t = t_faces[rows, axis]
    normal = np.zeros((n_pix, 3))
    normal[rows, axis] = -np.sign(dirs[rows, axis])
    neg = dirs[rows, axis] < 0
    cls = np.where(axis == 1, np.where(neg, FLOOR, CEILING), WALL)
    walls = np.where(axis == 0, np.where(neg, 1, 2), np.where(neg, 3, 4))
    surf = np.where(axis == 1, np.where(neg, 0, 5), walls)  # Appearance's surface numbers
    n_box = len(scene.box_lo)
    box_corners = _all_corners(scene.box_center, scene.box_hi, scene.box_rot)
    sphere_corners = scene.sphere_center[:, None] + _SIGNS * scene.sphere_radius[:, None, None]
    if n_box:
        _trace_turned_boxes(scene, box_corners, cam, rot, f, size, dirs, t, cls, surf, normal)
    if len(scene.sphere_center):
        _trace_spheres(scene, sphere_corners, cam, rot, f, size, dirs, t, cls, surf, normal)

    p = cam + t[:, None] * dirs
    albedo = _solid_albedo(app, surf, p)
    origin = p + 1e-3 * normal
    occluders = np.concatenate([box_corners, sphere_corners])
    light = np.zeros((n_pix, 3))
    for pos, color in zip(app.lights, app.light_rgb):
        to_light = pos - p
        dist2 = np.sum(to_light**2, -1)
        lambert = np.clip(np.sum(normal * to_light, -1) / np.sqrt(dist2), 0, None)
        facing = np.nonzero(lambert > 0)[0]  # only these can be lit: test their shadows
        lit = np.zeros(n_pix, bool)
        lit[facing] = ~_shadowed_varied(scene, occluders, origin[facing], pos, to_light[facing])
        light += (4.0 * lambert * lit / (1.0 + dist2))[:, None] * color
    light += app.ambient * (0.85 + 0.15 * normal[:, 1])[:, None] + app.glow[surf][:, None]
    rgb = np.clip(albedo * light * app.exposure, 0, 1) ** (1 / 1.6)
    intrinsics = (f, f, 0.5 * size, 0.5 * size)
    return (
        rgb.reshape(size, size, 3),
        t.reshape(size, size),
        cls.reshape(size, size),
        normal.reshape(size, size, 3),
        dirs.reshape(size, size, 3),
        intrinsics,
    )


def sensor_noise(rng: np.random.Generator, depth: np.ndarray, normal: np.ndarray, dirs: np.ndarray):
    """Kinect-like depth: axial noise growing with z^2 (Nguyen et al. 2012), holes at depth edges,
    at grazing angles, in random blobs, and beyond the sensor's range. 0 marks a hole."""
    size = depth.shape[0]
    noisy = depth + rng.normal(size=depth.shape) * (0.0012 + 0.0019 * (depth - 0.4) ** 2)
    edge = np.zeros_like(depth, bool)
    jump_x = np.abs(np.diff(depth, axis=1)) > 0.04 * depth[:, 1:]
    jump_y = np.abs(np.diff(depth, axis=0)) > 0.04 * depth[1:, :]
    edge[:, 1:] |= jump_x
    edge[:, :-1] |= jump_x
    edge[1:, :] |= jump_y
    edge[:-1, :] |= jump_y
    cos_view = np.abs(np.sum(normal * dirs, -1)) / np.linalg.norm(dirs, axis=-1)
    cell = max(size // 16, 1)
    coarse = rng.random((size // cell + 1, size // cell + 1))
    blobs = (
        np.asarray(
            Image.fromarray(coarse.astype(np.float32)).resize((size + cell, size + cell), Image.BILINEAR)
        )[:size, :size]
        > 0.93
    )
    holes = (edge & (rng.random(depth.shape) < 0.6)) | (cos_view < 0.1) | blobs | (noisy > MAX_RANGE_M * 0.8)
    return np.where(holes, 0.0, noisy)


def render_frame(seed: int, index: int, size: int, depth_noise: bool = False, style: str = "rooms") -> dict:
    """Frame `index` of the procedural set with `seed`: rgb uint8, depth_m (exact, or with sensor noise
    and holes), depth_exact_m, label uint8, intrinsics. Deterministic in (seed, index, size, style)."""
    rng = np.random.default_rng([seed, index])
    scene, cam, rot, fov = sample_scene(rng, style)
    rgb, depth, cls, normal, dirs, intrinsics = render(scene, cam, rot, fov, size)
    rgb = np.clip(rgb * 255 + rng.normal(0, 2.0, rgb.shape), 0, 255).astype(np.uint8)
    depth = depth.astype(np.float32)
    measured = sensor_noise(rng, depth, normal, dirs).astype(np.float32) if depth_noise else depth
    return dict(
        rgb=rgb,
        depth_m=measured,
        depth_exact_m=depth,
        label=cls.astype(np.uint8),
        intrinsics=intrinsics,
        frame_id=(f"procedural-{seed}-{index:08d}" if style == "rooms"
                  else f"procedural-{style}-{seed}-{index:08d}"),
    )


def frame_example(
    seed: int, index: int, size: int, depth_noise: bool = False, style: str = "rooms"
) -> schema.RGBDExample:
    frame = render_frame(seed, index, size, depth_noise, style)
    scale = depth_units.SOURCE_SCALES["procedural"]
    return schema.example_from_arrays(
        frame["rgb"],
        depth_units.metres_to_units(frame["depth_m"], scale),
        scale,
        frame_id=frame["frame_id"],
        source=SOURCE,
        label=frame["label"],
        label_set=CLASS_SET,
        intrinsics=frame["intrinsics"],
    )


def _write_shard(job):
    path, fmt, seed, start, stop, size, depth_noise, style = job
    with records.open_writer(path, fmt) as writer:
        for index in range(start, stop):
            writer.write(schema.serialize_example(frame_example(seed, index, size, depth_noise, style)))
    return path


def write_procedural_dataset(
    out_dir: str,
    num_frames: int,
    image_size: int = 128,
    seed: int = 0,
    num_shards: int = 8,
    format: str = records.ARRAY_RECORD,
    depth_noise: bool = False,
    num_workers: int | None = None,
    prefix: str = "procedural",
    style: str = "rooms",
    overwrite: bool = False,
) -> list[str]:
    """Render `num_frames` frames in `style` (STYLES) into `num_shards` shard files under out_dir;
    returns their paths.

    Shards are written in parallel by `num_workers` processes (default: all cores). Frame i is the same
    whatever the shard count. A `procedural.json` beside the shards records the arguments. The shards
    appear in out_dir only when all are written (records.ShardSetWriter); an out_dir that already holds
    record files is refused (RecordError) unless overwrite, which replaces them.
    """
    check_style(style)
    if format not in records.FORMATS:
        raise ValueError(f"format must be one of {records.FORMATS}, got {format!r}")
    if num_frames < 1 or num_shards < 1 or image_size < 8:
        raise ValueError(
            f"need num_frames >= 1, num_shards >= 1, image_size >= 8; got "
            f"{num_frames}, {num_shards}, {image_size}"
        )
    num_shards = min(num_shards, num_frames)
    os.makedirs(out_dir, exist_ok=True)
    shard_set = records.ShardSetWriter(out_dir, prefix, num_shards, format, overwrite=overwrite)
    bounds = np.linspace(0, num_frames, num_shards + 1).astype(int)
    jobs = [
        (
            shard_set.temporary_paths[i],
            format,
            seed,
            int(bounds[i]),
            int(bounds[i + 1]),
            image_size,
            depth_noise,
            style,
        )
        for i in range(num_shards)
    ]
    workers = min(num_workers or os.cpu_count() or 1, num_shards)
    with shard_set:
        if workers > 1:
            # spawn, not fork: the caller (the trainer) may already run JAX's threads.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                pool.map(_write_shard, jobs, chunksize=1)
        else:
            for job in jobs:
                _write_shard(job)
    paths = shard_set.paths
    meta = dict(
        num_frames=num_frames,
        image_size=image_size,
        seed=seed,
        num_shards=num_shards,
        format=format,
        depth_noise=depth_noise,
        style=style,
        class_names=list(CLASS_NAMES),
        shards=paths,
    )
    with open(os.path.join(out_dir, f"{prefix}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    logging.info(
        "wrote %d procedural frames (%s, %dpx) to %d shards in %s", num_frames, style, image_size, num_shards,
        out_dir,
    )
    return paths


def ensure_procedural_dataset(
    out_dir: str,
    num_frames: int,
    image_size: int = 128,
    seed: int = 0,
    num_shards: int = 8,
    format: str = records.ARRAY_RECORD,
    depth_noise: bool = False,
    prefix: str = "procedural",
    style: str = "rooms",
) -> list[str]:
    """The shard paths of a procedural set in out_dir, writing it first unless the same one is there."""
    check_style(style)
    meta_path = os.path.join(out_dir, f"{prefix}.json")
    meta = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        meta.setdefault("style", "rooms")  # sets written before styles existed are "rooms"
        wanted = dict(
            num_frames=num_frames,
            image_size=image_size,
            seed=seed,
            num_shards=min(num_shards, num_frames),
            format=format,
            depth_noise=depth_noise,
            style=style,
        )
        if all(meta.get(k) == v for k, v in wanted.items()) and all(
            os.path.exists(p) for p in meta["shards"]
        ):
            return list(meta["shards"])
        # Another run may still read the set that is replaced here: say so, with what changed.
        changed = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
        say("data", f"replacing the procedural set in {out_dir} ({changed or 'shards missing'}); give each "
                    f"set its own procedural_dir to keep both")
    # Replacing removes the folder's record files: only ever those of an earlier procedural set.
    ours = {os.path.basename(p) for p in (meta or {}).get("shards", [])}
    foreign = [p for p in (records.record_files_in(out_dir) if os.path.isdir(out_dir) else [])
               if os.path.basename(p) not in ours]
    if foreign:
        shown = ", ".join(os.path.basename(p) for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise RecordError(out_dir, f"holds {len(foreign)} record files that are not its procedural set ({shown}); "
                                   "the procedural set is written to a folder of its own: set procedural_dir to "
                                   "another folder")
    return write_procedural_dataset(
        out_dir, num_frames, image_size, seed, num_shards, format, depth_noise, prefix=prefix, style=style,
        overwrite=True,
    )
