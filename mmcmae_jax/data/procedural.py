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

Frames are deterministic functions of (seed, frame index), whatever the sharding or worker count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os

import numpy as np
from PIL import Image

from mmcmae_jax.data import depth_units, records, schema

CLASS_NAMES = ("floor", "wall", "ceiling", "table", "chair", "cabinet", "box", "lamp", "picture")
CLASS_SET = "procedural"
FLOOR, WALL, CEILING, TABLE, CHAIR, CABINET, BOX, LAMP, PICTURE = range(len(CLASS_NAMES))
SOURCE = "procedural"
MAX_RANGE_M = 10.0


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


def sample_scene(rng: np.random.Generator):
    """A random furnished room and a camera (position, rotation camera->world, horizontal fov)."""
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
    and the intrinsics (fx, fy, cx, cy)."""
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


def render_frame(seed: int, index: int, size: int, depth_noise: bool = False) -> dict:
    """Frame `index` of the procedural set with `seed`: rgb uint8, depth_m (exact, or with sensor noise
    and holes), depth_exact_m, label uint8, intrinsics. Deterministic in (seed, index, size)."""
    rng = np.random.default_rng([seed, index])
    scene, cam, rot, fov = sample_scene(rng)
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
        frame_id=f"procedural-{seed}-{index:08d}",
    )


def frame_example(seed: int, index: int, size: int, depth_noise: bool = False) -> schema.RGBDExample:
    frame = render_frame(seed, index, size, depth_noise)
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
    path, fmt, seed, start, stop, size, depth_noise = job
    with records.open_writer(path, fmt) as writer:
        for index in range(start, stop):
            writer.write(schema.serialize_example(frame_example(seed, index, size, depth_noise)))
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
) -> list[str]:
    """Render `num_frames` frames into `num_shards` shard files under out_dir; returns their paths.

    Shards are written in parallel by `num_workers` processes (default: all cores). Frame i is the same
    whatever the shard count. A `procedural.json` beside the shards records the arguments.
    """
    if format not in records.FORMATS:
        raise ValueError(f"format must be one of {records.FORMATS}, got {format!r}")
    if num_frames < 1 or num_shards < 1 or image_size < 8:
        raise ValueError(
            f"need num_frames >= 1, num_shards >= 1, image_size >= 8; got "
            f"{num_frames}, {num_shards}, {image_size}"
        )
    num_shards = min(num_shards, num_frames)
    os.makedirs(out_dir, exist_ok=True)
    bounds = np.linspace(0, num_frames, num_shards + 1).astype(int)
    jobs = [
        (
            records.shard_name(out_dir, prefix, i, num_shards, format),
            format,
            seed,
            int(bounds[i]),
            int(bounds[i + 1]),
            image_size,
            depth_noise,
        )
        for i in range(num_shards)
    ]
    workers = min(num_workers or os.cpu_count() or 1, num_shards)
    if workers > 1:
        # spawn, not fork: the caller (the trainer) may already run JAX's threads.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            paths = pool.map(_write_shard, jobs, chunksize=1)
    else:
        paths = [_write_shard(job) for job in jobs]
    meta = dict(
        num_frames=num_frames,
        image_size=image_size,
        seed=seed,
        num_shards=num_shards,
        format=format,
        depth_noise=depth_noise,
        class_names=list(CLASS_NAMES),
        shards=paths,
    )
    with open(os.path.join(out_dir, f"{prefix}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    logging.info(
        "wrote %d procedural frames (%dpx) to %d shards in %s", num_frames, image_size, num_shards, out_dir
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
) -> list[str]:
    """The shard paths of a procedural set in out_dir, writing it first unless the same one is there."""
    meta_path = os.path.join(out_dir, f"{prefix}.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        wanted = dict(
            num_frames=num_frames,
            image_size=image_size,
            seed=seed,
            num_shards=min(num_shards, num_frames),
            format=format,
            depth_noise=depth_noise,
        )
        if all(meta.get(k) == v for k, v in wanted.items()) and all(
            os.path.exists(p) for p in meta["shards"]
        ):
            return list(meta["shards"])
        # Another run may still read the set that is replaced here: say so, with what changed.
        changed = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
        print(f"[data] replacing the procedural set in {out_dir} ({changed or 'shards missing'}); give each "
              f"set its own procedural_dir to keep both", flush=True)
    return write_procedural_dataset(
        out_dir, num_frames, image_size, seed, num_shards, format, depth_noise, prefix=prefix
    )
