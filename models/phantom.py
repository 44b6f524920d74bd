"""Synthetic chest CT phantoms with ground-truth nodules, as arrays and as DICOM CT series.

A phantom is an axial slab of a chest: body wall (skin, fat, muscle), ribs and spine, a
mediastinum with heart and trachea, an optional diaphragm dome, two lungs around -850 HU with
texture, branching vessel trees with bronchi beside the larger branches, and nodules (solid,
part-solid, ground-glass; round or irregular with spicules; parenchymal, juxta-pleural or
juxta-vascular; 3 to 30 mm). Scanner blur, slice-profile smoothing and correlated noise follow.
Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed fixes the phantom.

Conventions: ``volume_hu[z, y, x]``; ``spacing_mm = (dz, dy, dx)``; world positions are patient
LPS ``(x, y, z)`` mm; slice ``k`` lies at ``z = origin_mm[2] + k * dz``; orientation is the
identity (rows along +x, columns along +y).

Public API
----------
make_phantom(seed, shape=None, spacing_mm=None, n_nodules=None, confounders=False, ...) -> Phantom
write_dicom_series(volume_hu, spacing_mm, out_dir, seed, origin_mm=..., ...) -> list[Path]
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from pipelines.comparison import Status
from pipelines.registration import RigidTransform, move_volume

FloatArray = npt.NDArray[np.float32]
Rng = np.random.Generator

SLICE_THICKNESSES_MM = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5)
NODULE_KINDS = ("solid", "part-solid", "ground-glass")
NODULE_LOCATIONS = ("parenchymal", "juxta-pleural", "juxta-vascular")
LUNG_HU = -860.0
SOFT_HU = 40.0


@dataclass(frozen=True)
class PhantomNodule:
    """Ground truth for one phantom nodule.

    Attributes
    ----------
    centre_xyz_mm : tuple of float
        Centre in patient LPS millimetres.
    diameter_mm : float
        Nominal diameter (twice the mean radius) in millimetres.
    kind : str
        ``solid``, ``part-solid`` or ``ground-glass``.
    shape : str
        ``round`` or ``irregular``.
    location : str
        ``parenchymal``, ``juxta-pleural`` or ``juxta-vascular``.
    label : int
        Value of this nodule in :attr:`Phantom.labels`.
    """

    centre_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str
    shape: str
    location: str
    label: int


@dataclass
class Phantom:
    """A synthetic CT volume and its ground truth.

    Attributes
    ----------
    volume_hu : numpy.ndarray
        int16 ``[z, y, x]`` Hounsfield units (-2048 outside the reconstruction circle).
    spacing_mm : tuple of float
        ``(dz, dy, dx)``; ``dz`` equals the slice thickness.
    origin_mm : tuple of float
        LPS ``(x, y, z)`` of voxel ``[0, 0, 0]``.
    nodules : list of PhantomNodule
        Nodules in the volume.
    labels : numpy.ndarray
        uint8 ``[z, y, x]``; ``k`` marks voxels of the nodule with ``label == k``.
    seed : int
        The seed that made it.
    confounders : list of PhantomConfounder
        Structures that are not nodules (empty unless made with ``confounders=True``).
    """

    volume_hu: npt.NDArray[np.int16]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    nodules: list[PhantomNodule]
    labels: npt.NDArray[np.uint8]
    seed: int
    confounders: list[PhantomConfounder] = field(default_factory=list)


@dataclass
class _Grid:
    """World coordinates of the voxel grid (1D per axis)."""

    z: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    x: npt.NDArray[np.float64]
    spacing: tuple[float, float, float]

    def index_box(
        self,
        lo: Sequence[float] | npt.NDArray[np.float64],
        hi: Sequence[float] | npt.NDArray[np.float64],
    ) -> tuple[slice, slice, slice]:
        """Slices of the voxels whose centres lie in the world box ``lo..hi`` (x, y, z order)."""
        out = []
        for axis, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0 = int(np.searchsorted(axis, a))
            i1 = int(np.searchsorted(axis, b, side="right"))
            out.append(slice(i0, max(i0, i1)))
        return out[0], out[1], out[2]

    def points(self, box: tuple[slice, slice, slice]) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Broadcastable world z, y, x arrays for a box of voxels."""
        z = self.z[box[0]].astype(np.float32)[:, None, None]
        y = self.y[box[1]].astype(np.float32)[None, :, None]
        x = self.x[box[2]].astype(np.float32)[None, None, :]
        return z, y, x


@dataclass
class _Anatomy:
    """Random anatomy parameters of one phantom (mm)."""

    body_a: float
    body_b: float
    fat: float
    muscle: float
    med_half_width: float
    heart: tuple[float, float, float, float]
    dome: tuple[float, float, float, float] | None
    harmonics: npt.NDArray[np.float64]
    z_mid: float
    z_half: float
    segments: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, int]] = field(
        default_factory=list
    )


# --------------------------------------------------------------------------- anatomy


def _draw_anatomy(rng: Rng, z_mid: float, z_half: float) -> _Anatomy:
    a = rng.uniform(125.0, 175.0)
    b = a * rng.uniform(0.62, 0.78)
    heart = (
        rng.uniform(5.0, 25.0),
        -b * rng.uniform(0.15, 0.3),
        a * rng.uniform(0.2, 0.27),
        b * rng.uniform(0.35, 0.5),
    )
    dome = None
    if rng.random() < 0.35:
        side = rng.choice([-1.0, 1.0])
        radius = rng.uniform(70.0, 110.0)
        top = z_mid - z_half + rng.uniform(8.0, 30.0)
        dome = (side * a * 0.42, top - radius, radius, rng.uniform(-b * 0.1, b * 0.15))
    return _Anatomy(
        body_a=a,
        body_b=b,
        fat=rng.uniform(4.0, 25.0),
        muscle=rng.uniform(8.0, 14.0),
        med_half_width=rng.uniform(18.0, 32.0),
        heart=heart,
        dome=dome,
        harmonics=rng.normal(0.0, 0.025, size=(4, 2)),
        z_mid=z_mid,
        z_half=z_half,
    )


def _angular_scale(anat: _Anatomy, theta: FloatArray) -> FloatArray:
    out = np.ones_like(theta)
    for k, (c, s) in enumerate(anat.harmonics, start=2):
        out = out + c * np.cos(k * theta) + s * np.sin(k * theta)
    return out.astype(np.float32)


def _lung_cavity_slice(
    anat: _Anatomy, y: FloatArray, x: FloatArray, z: float
) -> npt.NDArray[np.bool_]:
    """Lung region on one axial plane (world ``y`` column and ``x`` row vectors)."""
    taper = 1.0 - 0.12 * (z - anat.z_mid) / max(anat.z_half, 1.0)
    inner_a = (anat.body_a - anat.fat - anat.muscle - 10.0) * taper
    inner_b = (anat.body_b - anat.fat - anat.muscle - 8.0) * taper
    theta = np.arctan2(y / anat.body_b, x / anat.body_a)
    q = np.sqrt((x / inner_a) ** 2 + (y / inner_b) ** 2) / _angular_scale(anat, theta)
    cavity = q < 1.0
    med = (np.abs(x) < anat.med_half_width + 8.0 * (y < 0)) & (y < inner_b * 0.55)
    spine = (np.abs(x) < 32.0) & (y > inner_b * 0.45)
    hx, hy, ha, hb = anat.heart
    heart = ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 < 1.0
    mask = cavity & ~med & ~spine & ~heart
    if anat.dome is not None:
        dx, dz, dr, dy = anat.dome
        dome = (x - dx) ** 2 + (y - dy) ** 2 * 0.7 + (z - dz) ** 2 < dr**2
        mask &= ~dome
    return np.asarray(mask, dtype=bool)


def _body_slice(anat: _Anatomy, y: FloatArray, x: FloatArray, z: float, rng: Rng) -> FloatArray:
    """Body wall, mediastinum, bones and table on one plane (lungs filled in later)."""
    a, b = anat.body_a, anat.body_b
    q_body = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    q_fat = np.sqrt((x / (a - anat.fat)) ** 2 + (y / (b - anat.fat)) ** 2)
    q_mus = np.sqrt(
        (x / (a - anat.fat - anat.muscle)) ** 2 + (y / (b - anat.fat - anat.muscle)) ** 2
    )
    img = np.full(np.broadcast_shapes(y.shape, x.shape), -1000.0, dtype=np.float32)
    img[q_body < 1.0] = -100.0
    img[q_fat < 1.0] = 45.0
    img[q_mus < 1.0] = SOFT_HU
    # ribs: slanted bony bands just inside the muscle layer
    theta = np.abs(np.arctan2(y, x))
    ring = (q_mus < 1.0) & (q_mus > 1.0 - 11.0 / a)
    band = np.sin(2.0 * np.pi * (z + 18.0 * theta) / 24.0) > 0.45
    img[ring & band & (y < b * 0.7)] = 450.0
    # spine: vertebral body with cortical rim, canal behind it
    sy = b - anat.fat - anat.muscle - 22.0
    r_vert = np.sqrt(x**2 + (y - sy) ** 2)
    img[r_vert < 17.0] = 700.0
    img[r_vert < 14.5] = 260.0
    img[np.sqrt(x**2 + (y - sy - 24.0) ** 2) < 7.0] = 15.0
    # trachea (air with a wall) in the upper mediastinum
    ty = -b * 0.12
    r_tr = np.sqrt((x - 4.0) ** 2 + (y - ty) ** 2)
    if z > anat.z_mid:
        img[r_tr < 11.0] = 20.0
        img[r_tr < 9.0] = -1000.0
    # table under the patient
    table = (y > b + 8.0) & (y < b + 14.0) & (np.abs(x) < a * 1.05)
    img[np.broadcast_to(table, img.shape)] = 120.0
    return img


def _lung_texture(
    rng: Rng,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    y_world: npt.NDArray[np.float64],
    anat: _Anatomy,
) -> FloatArray:
    """Lung parenchyma HU: smooth random texture plus a posterior (dependent) gradient."""
    coarse = tuple(max(2, int(n * s / 8.0) + 2) for n, s in zip(shape, spacing, strict=True))
    field_c = rng.normal(0.0, 1.0, size=coarse).astype(np.float32)
    field_c = ndimage.gaussian_filter(field_c, 1.0)
    field_c *= 22.0 / max(float(field_c.std()), 1e-3)
    zoom = [n / c for n, c in zip(shape, coarse, strict=True)]
    tex = ndimage.zoom(field_c, zoom, order=1)[: shape[0], : shape[1], : shape[2]]
    grad = (35.0 * (y_world / anat.body_b)).astype(np.float32)[None, :, None]
    return np.asarray(LUNG_HU + tex + grad, dtype=np.float32)


# --------------------------------------------------------------------------- tubes


def _segment_occupancy(
    grid: _Grid, p0: npt.NDArray[np.float64], p1: npt.NDArray[np.float64], radius: float
) -> tuple[tuple[slice, slice, slice], FloatArray] | None:
    """Partial-volume occupancy of a capsule from ``p0`` to ``p1`` (world xyz) of ``radius``."""
    pad = radius + 1.5
    box = grid.index_box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
    if any(s.stop <= s.start for s in box):
        return None
    z, y, x = grid.points(box)
    d = (p1 - p0).astype(np.float32)
    dd = float(d @ d) or 1e-6
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt(
        (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    )
    edge = 0.5 * min(grid.spacing[1], grid.spacing[0])
    occ = np.clip((radius - dist) / (2.0 * edge) + 0.5, 0.0, 1.0).astype(np.float32)
    return box, occ


def _grow_tree(
    rng: Rng,
    start: npt.NDArray[np.float64],
    direction: npt.NDArray[np.float64],
    radius: float,
    gen: int,
    anat: _Anatomy,
) -> None:
    """Append vessel segments of a random branching tree to ``anat.segments``."""
    if radius < 0.45 or gen > 8:
        return
    length = rng.uniform(14.0, 30.0) * (0.88**gen)
    end = start + direction * length
    anat.segments.append((start, end, radius, gen))
    for sign in (-1.0, 1.0):
        new_dir = direction + sign * rng.normal(0.0, 0.55, 3)
        new_dir /= np.linalg.norm(new_dir) + 1e-9
        _grow_tree(rng, end, new_dir, radius * rng.uniform(0.66, 0.84), gen + 1, anat)


def _draw_vessels(rng: Rng, anat: _Anatomy) -> None:
    for side in (-1.0, 1.0):
        for _ in range(int(rng.integers(4, 7))):
            hilum = np.array(
                [
                    side * (anat.med_half_width + 6.0),
                    rng.uniform(-35.0, 25.0),
                    anat.z_mid + rng.uniform(-anat.z_half, anat.z_half) * 0.8,
                ]
            )
            d = np.array([side, rng.normal(0.0, 0.6), rng.normal(0.0, 0.7)])
            _grow_tree(rng, hilum, d / np.linalg.norm(d), rng.uniform(3.0, 4.8), 0, anat)


def _rasterise_vessels(
    grid: _Grid, anat: _Anatomy, shape: tuple[int, int, int]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Vessel occupancy, bronchial wall occupancy and bronchial lumen occupancy."""
    vessel = np.zeros(shape, np.float32)
    wall = np.zeros(shape, np.float32)
    lumen = np.zeros(shape, np.float32)
    for p0, p1, r, gen in anat.segments:
        hit = _segment_occupancy(grid, p0, p1, r)
        if hit is not None:
            np.maximum(vessel[hit[0]], hit[1], out=vessel[hit[0]])
        if gen > 2:
            continue
        axis = (p1 - p0) / (np.linalg.norm(p1 - p0) + 1e-9)
        perp = np.cross(axis, [0.0, 0.0, 1.0])
        perp /= np.linalg.norm(perp) + 1e-9
        ra = 0.9 * r
        off = perp * (r + ra + 1.2)
        for target, rad in ((wall, ra + 0.5 + 0.12 * ra), (lumen, ra)):
            hit = _segment_occupancy(grid, p0 + off, p1 + off, rad)
            if hit is not None:
                np.maximum(target[hit[0]], hit[1], out=target[hit[0]])
    return vessel, wall, lumen


# --------------------------------------------------------------------------- nodules


def _nodule_occupancy(
    grid: _Grid, rng: Rng, centre: npt.NDArray[np.float64], radius: float, irregular: bool
) -> tuple[tuple[slice, slice, slice], FloatArray]:
    """Occupancy of a round (ellipsoidal) or irregular (lobulated) nodule."""
    pad = radius * 1.5 + 2.0
    box = grid.index_box(centre - pad, centre + pad)
    z, y, x = grid.points(box)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    axes = rng.uniform(0.85, 1.15, 3) if not irregular else rng.uniform(0.75, 1.25, 3)
    axes /= np.cbrt(np.prod(axes))
    dist = np.sqrt((dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2)
    r_dir = np.full_like(dist, radius)
    if irregular:
        norm = np.maximum(dist, 1e-3)
        for _ in range(3):
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            cos = (dx * v[0] + dy * v[1] + dz * v[2]) / norm
            r_dir = r_dir * (
                1.0
                + rng.uniform(0.06, 0.16)
                * np.cos(rng.integers(2, 4) * np.pi * cos + rng.uniform(0, 6.3))
            )
    edge = 0.5 * min(grid.spacing[1], grid.spacing[0])
    occ = np.clip((r_dir - dist) / (2.0 * edge) + 0.5, 0.0, 1.0).astype(np.float32)
    return box, occ


def _pick_centre(
    rng: Rng,
    location: str,
    radius: float,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    anat: _Anatomy,
) -> npt.NDArray[np.float64] | None:
    """World centre for a nodule of ``radius`` at ``location``, or None when it cannot fit."""
    margin_z = radius + 1.0
    zs = np.flatnonzero((grid.z > grid.z[0] + margin_z) & (grid.z < grid.z[-1] - margin_z))
    if zs.size == 0:
        return None
    if location == "juxta-vascular":
        segs = [s for s in anat.segments if 1.0 <= s[2] <= 3.5]
        rng.shuffle(segs)
        for p0, p1, r, _ in segs[:40]:
            p = p0 + rng.uniform(0.2, 0.8) * (p1 - p0)
            perp = np.cross(p1 - p0, rng.normal(size=3))
            perp /= np.linalg.norm(perp) + 1e-9
            c = p + perp * (r + 0.55 * radius)
            if _inside_lung(c, radius * 0.8 + 2.0, grid, lungs, margin_z):
                return c
        return None
    k = int(rng.choice(zs))
    dist = ndimage.distance_transform_edt(lungs[k], sampling=grid.spacing[1:])
    if location == "juxta-pleural":
        ok = (dist > radius * 0.55) & (dist < radius * 0.55 + 1.5 * grid.spacing[1])
    else:
        ok = dist > radius + 4.0
    cand = np.argwhere(ok)
    if cand.size == 0:
        return None
    iy, ix = cand[int(rng.integers(len(cand)))]
    return np.array([grid.x[ix], grid.y[iy], grid.z[k]])


def _inside_lung(
    c: npt.NDArray[np.float64],
    clearance: float,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    margin_z: float,
) -> bool:
    if not grid.z[0] + margin_z < c[2] < grid.z[-1] - margin_z:
        return False
    for off in ((0, 0), (clearance, 0), (-clearance, 0), (0, clearance), (0, -clearance)):
        iz = int(np.argmin(np.abs(grid.z - c[2])))
        iy = int(np.argmin(np.abs(grid.y - c[1] - off[1])))
        ix = int(np.argmin(np.abs(grid.x - c[0] - off[0])))
        if not lungs[iz, iy, ix]:
            return False
    return True


MASS_DIAMETERS_MM = (30.0, 45.0)
"""Diameter range of the mass that :func:`make_phantom` paints with ``mass_chance``: a focal
lesion over 30 mm is a mass (Fleischner glossary), reported, unlike diffuse opacities."""


CONFOUNDER_MASS_CHANCE = 0.5
"""``mass_chance`` of the phantoms with confounders that train and evaluate stage 2: without
masses among them, stage 2 learns from the consolidation patches that every large dense lesion is
a negative."""


def _draw_mass_spec(rng: Rng) -> tuple[float, str, str, str]:
    diameter = float(rng.uniform(*MASS_DIAMETERS_MM))
    kind = "solid" if rng.random() < 0.85 else "part-solid"
    shape = "irregular" if rng.random() < 0.6 else "round"
    location = "juxta-pleural" if rng.random() < 0.3 else "parenchymal"
    return diameter, kind, shape, location


def _draw_nodule_spec(rng: Rng) -> tuple[float, str, str, str]:
    diameter = float(np.exp(rng.uniform(np.log(3.0), np.log(30.0))))
    kind = str(rng.choice(NODULE_KINDS, p=[0.6, 0.2, 0.2]))
    shape = "irregular" if rng.random() < 0.4 else "round"
    location = str(rng.choice(NODULE_LOCATIONS, p=[0.5, 0.25, 0.25]))
    return diameter, kind, shape, location


def _add_nodules(
    rng: Rng,
    n: int,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    anat: _Anatomy,
    hu: FloatArray,
    labels: npt.NDArray[np.uint8],
    draw: Callable[[Rng], tuple[float, str, str, str]] = _draw_nodule_spec,
    placed: Sequence[PhantomNodule] = (),
) -> list[PhantomNodule]:
    """Paint ``n`` nodules drawn by ``draw`` into ``hu`` (in place) and ``labels``, clear of the
    nodules already ``placed`` (their labels come first); return their ground truth."""
    nodules: list[PhantomNodule] = []
    for _ in range(n * 6):
        if len(nodules) == n:
            break
        diameter, kind, shape, location = draw(rng)
        radius = diameter / 2.0
        centre = _pick_centre(rng, location, radius, grid, lungs, anat)
        if centre is None or any(
            np.linalg.norm(centre - np.array(o.centre_xyz_mm)) < radius + o.diameter_mm / 2 + 3
            for o in (*placed, *nodules)
        ):
            continue
        box, occ = _nodule_occupancy(grid, rng, centre, radius, shape == "irregular")
        solid = float(rng.uniform(-20.0, 70.0))
        ggo = float(rng.uniform(-680.0, -480.0))
        val = np.full_like(occ, solid if kind == "solid" else ggo)
        if kind == "part-solid":
            core_box, core = _nodule_occupancy(
                grid, rng, centre, radius * rng.uniform(0.35, 0.6), False
            )
            core_in = np.zeros_like(occ)
            rel = tuple(
                slice(c.start - b.start, c.stop - b.start)
                for c, b in zip(core_box, box, strict=True)
            )
            core_in[rel] = core[tuple(slice(0, s.stop - s.start) for s in rel)]
            val = val * (1.0 - core_in) + solid * core_in
        if shape == "irregular" and kind != "ground-glass":
            _add_spicules(rng, grid, centre, radius, hu)
        label = len(placed) + len(nodules) + 1
        _paint(hu, labels, box, occ, val, label)
        nodules.append(
            PhantomNodule(
                centre_xyz_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                diameter_mm=round(diameter, 2),
                kind=kind,
                shape=shape,
                location=location,
                label=label,
            )
        )
    return nodules


def _paint(
    hu: FloatArray,
    labels: npt.NDArray[np.uint8],
    box: tuple[slice, slice, slice],
    occ: FloatArray,
    value: FloatArray | float,
    label: int,
) -> None:
    """Blend a nodule of occupancy ``occ`` and HU ``value`` into ``hu`` (never darkening it) and
    mark its voxels of occupancy at least 0.5 with ``label``."""
    region = hu[box]
    hu[box] = np.where(occ > 0, np.maximum(region, region * (1 - occ) + value * occ), region)
    labels[box][occ >= 0.5] = label


def _add_spicules(
    rng: Rng, grid: _Grid, centre: npt.NDArray[np.float64], radius: float, hu: FloatArray
) -> None:
    for _ in range(int(rng.integers(2, 6))):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        hit = _segment_occupancy(
            grid, centre, centre + v * radius * rng.uniform(1.3, 1.9), rng.uniform(0.35, 0.7)
        )
        if hit is not None:
            region = hu[hit[0]]
            hu[hit[0]] = np.maximum(region, region * (1 - hit[1]) + 0.0 * hit[1])


# --------------------------------------------------------------------------- confounders

CONFOUNDER_KINDS = ("opacity", "atelectasis", "fissure", "plaque")
"""What :func:`make_phantom` paints with ``confounders=True``: lung findings that are not nodules
and fool a detector trained on clean phantoms (negatives: they never get a label)."""

CONFOUNDER_CLEARANCE_MM = 4.0
"""Confounders stay this far outside every nodule's nominal sphere."""


@dataclass(frozen=True)
class PhantomConfounder:
    """One painted structure that is not a nodule.

    Attributes
    ----------
    kind : str
        One of :data:`CONFOUNDER_KINDS`: ``opacity`` (ill-defined ground-glass or consolidation
        patch of pneumonia, 12-70 mm, mostly peripheral and several per phantom, in both lungs),
        ``atelectasis`` (dependent subpleural band), ``fissure`` (thin oblique plane through a
        lung) or ``plaque`` (flat pleural thickening, sometimes calcified).
    centre_xyz_mm : tuple of float
        A point inside it (LPS mm): the occupancy-weighted centre.
    size_mm : float
        Its largest extent as drawn (mm).
    """

    kind: str
    centre_xyz_mm: tuple[float, float, float]
    size_mm: float


def _keep_out(
    grid: _Grid, box: tuple[slice, slice, slice], nodules: Sequence[PhantomNodule]
) -> npt.NDArray[np.bool_]:
    """Voxels of ``box`` that are at least :data:`CONFOUNDER_CLEARANCE_MM` outside every nodule."""
    z, y, x = grid.points(box)
    ok = np.ones((z.shape[0], y.shape[1], x.shape[2]), bool)
    for n in nodules:
        c = n.centre_xyz_mm
        r = n.diameter_mm / 2 * 1.3 + CONFOUNDER_CLEARANCE_MM
        ok &= (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 > r * r
    return ok


def _smooth_field(rng: Rng, shape: tuple[int, ...], cells: tuple[float, ...]) -> FloatArray:
    """Zero-mean, unit-variance random field varying over about ``cells`` voxels per axis."""
    coarse = tuple(max(2, int(n / c) + 2) for n, c in zip(shape, cells, strict=True))
    f = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.8)
    f = ndimage.zoom(f, [n / c for n, c in zip(shape, coarse, strict=True)], order=1)
    f = f[tuple(slice(0, n) for n in shape)]
    return np.asarray((f - f.mean()) / max(float(f.std()), 1e-3), dtype=np.float32)


def _blend(
    hu: FloatArray,
    box: tuple[slice, slice, slice],
    occ: FloatArray,
    value: FloatArray | float,
    where: npt.NDArray[np.bool_],
) -> None:
    """Blend ``value`` at occupancy ``occ`` into ``hu[box]`` where allowed, never darkening."""
    region = hu[box]
    occ = np.where(where, occ, 0.0).astype(np.float32)
    hu[box] = np.maximum(region, region * (1 - occ) + value * occ)


def _centre(
    grid: _Grid, box: tuple[slice, slice, slice], occ: FloatArray
) -> tuple[float, float, float]:
    z, y, x = grid.points(box)
    w = float(occ.sum()) or 1.0
    return (
        float((occ * x).sum() / w),
        float((occ * y).sum() / w),
        float((occ * z).sum() / w),
    )


def _add_opacity(
    rng: Rng,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    hu: FloatArray,
    nodules: Sequence[PhantomNodule],
    side: float,
    fade: bool,
) -> PhantomConfounder | None:
    """An ill-defined ground-glass (sometimes consolidating) patch, usually subpleural, in the
    lung on ``side`` (sign of LPS x)."""
    size = float(np.exp(rng.uniform(np.log(12.0), np.log(70.0))))
    ks = np.flatnonzero(lungs.any(axis=(1, 2)))
    if not ks.size:
        return None
    k = int(rng.choice(ks))
    in_side = lungs[k] & ((grid.x[None, :] * side) > 0)
    if not in_side.any():
        return None
    dist = ndimage.distance_transform_edt(in_side, sampling=grid.spacing[1:])
    peripheral = rng.random() < 0.8
    ok = in_side & ((dist < 0.3 * size + 2.0) if peripheral else (dist > 0.3 * size))
    pts = np.argwhere(ok)
    if not len(pts):
        return None
    iy, ix = pts[int(rng.integers(len(pts)))]
    c = np.array([grid.x[ix], grid.y[iy], grid.z[k]])
    return _paint_opacity(rng, grid, lungs, hu, nodules, c, size, fade)


def _paint_opacity(
    rng: Rng,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    hu: FloatArray,
    nodules: Sequence[PhantomNodule],
    c: npt.NDArray[np.float64],
    size: float,
    fade: bool,
) -> PhantomConfounder | None:
    """Paint an ill-defined opacity of about ``size`` mm around the LPS point ``c``.

    With ``fade`` it fades out between 1 and 1.4 times its radii, inside its box; without
    (opacity model 1), its patchy margin and its long axis can reach the box and end there on
    straight faces, which no real opacity does."""
    # model 2 sizes its box by the axes, so draws them first; model 1 keeps its draw order
    axes = _opacity_axes(rng) if fade else None
    half = 0.7 * size * float(axes.max()) + 2.0 if axes is not None else size / 2 + 6.0
    box = grid.index_box(c - half, c + half)
    if any(s.stop - s.start < 2 for s in box):
        return None
    z, y, x = grid.points(box)
    if axes is None:
        axes = _opacity_axes(rng)
    e = np.sqrt(
        ((x - c[0]) / axes[0]) ** 2 + ((y - c[1]) / axes[1]) ** 2 + ((z - c[2]) / axes[2]) ** 2
    ) / (size / 2)
    shape = (z.shape[0], y.shape[1], x.shape[2])
    cells = tuple(6.0 / s for s in grid.spacing)
    score = (1.0 - e) + rng.uniform(0.3, 0.7) * _smooth_field(rng, shape, cells)
    soft = rng.uniform(0.3, 0.8)  # margin over 30-80 % of the radius: ill-defined
    occ = np.clip(score / soft, 0.0, 1.0).astype(np.float32)
    if fade:
        occ *= np.clip((1.4 - e) / 0.4, 0.0, 1.0).astype(np.float32)
    where = lungs[box] & _keep_out(grid, box, nodules)
    occ = np.where(where, occ, 0.0).astype(np.float32)
    if occ.sum() < 1.0:
        return None
    patchy = _smooth_field(rng, shape, tuple(3.0 / s for s in grid.spacing))
    value = (rng.uniform(-720.0, -480.0) + 50.0 * patchy).astype(np.float32)
    if rng.random() < 0.35:
        dense = np.clip((score - rng.uniform(0.4, 0.7)) / 0.15, 0.0, 1.0)
        value = (value * (1 - dense) + rng.uniform(-150.0, 30.0) * dense).astype(np.float32)
    _blend(hu, box, occ, value, where)
    return PhantomConfounder("opacity", _centre(grid, box, occ), round(size, 1))


def _opacity_axes(rng: Rng) -> npt.NDArray[np.float64]:
    """Relative semi-axes (x, y, z) of an opacity, of product 1."""
    axes = rng.uniform(0.6, 1.4, 3)
    return np.asarray(axes / np.cbrt(np.prod(axes)), dtype=np.float64)


def _add_atelectasis(
    rng: Rng,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    hu: FloatArray,
    nodules: Sequence[PhantomNodule],
) -> PhantomConfounder | None:
    """A dependent (posterior) subpleural band of partly collapsed lung, 2-10 mm thick."""
    ks = np.flatnonzero(lungs.any(axis=(1, 2)))
    if not ks.size:
        return None
    length = rng.uniform(20.0, 60.0)
    z0 = float(rng.uniform(grid.z[ks[0]], grid.z[ks[-1]]))
    sel = ks[np.abs(grid.z[ks] - z0) < length / 2]
    if not sel.size:
        return None
    box = (slice(int(sel[0]), int(sel[-1]) + 1), slice(None), slice(None))
    thick = rng.uniform(2.0, 10.0)
    shape = (box[0].stop - box[0].start, len(grid.y), len(grid.x))
    cells = (12.0 / grid.spacing[0], 12.0 / grid.spacing[1], 12.0 / grid.spacing[2])
    t = thick * (1.0 + 0.35 * _smooth_field(rng, shape, cells))
    occ = np.zeros(shape, np.float32)
    posterior = grid.y[None, :, None] > rng.uniform(0.0, 40.0)
    for i, k in enumerate(range(box[0].start, box[0].stop)):
        d = ndimage.distance_transform_edt(lungs[k], sampling=grid.spacing[1:])
        occ[i] = np.clip((t[i] - d) / 1.5 + 0.5, 0.0, 1.0)
    where = lungs[box] & posterior & _keep_out(grid, box, nodules)
    occ = np.where(where, occ, 0.0).astype(np.float32)
    if occ.sum() < 1.0:
        return None
    _blend(hu, box, occ, float(rng.uniform(-450.0, -50.0)), where)
    return PhantomConfounder("atelectasis", _centre(grid, box, occ), round(length, 1))


def _add_fissure(
    rng: Rng,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    hu: FloatArray,
    nodules: Sequence[PhantomNodule],
    side: float,
) -> PhantomConfounder | None:
    """A thin oblique plane (interlobar fissure) through the lung on ``side``."""
    cols = np.flatnonzero(grid.x * side > 0)
    if not cols.size:
        return None
    box = (slice(None), slice(None), slice(int(cols[0]), int(cols[-1]) + 1))
    lung_box = lungs[box]
    pts = np.argwhere(lung_box)
    if not len(pts):
        return None
    p = pts[int(rng.integers(len(pts)))]
    z, y, x = grid.points(box)
    c = (float(x[0, 0, p[2]]), float(y[0, p[1], 0]), float(z[p[0], 0, 0]))
    angle = rng.uniform(np.pi / 6, np.pi / 3)
    n = np.array([rng.normal(0.0, 0.15), np.sin(angle), np.cos(angle)])
    n /= np.linalg.norm(n)
    half_width = rng.uniform(0.4, 0.8)
    d = np.abs((x - c[0]) * n[0] + (y - c[1]) * n[1] + (z - c[2]) * n[2])
    occ = np.clip((half_width - d) / 0.5 + 0.5, 0.0, 1.0).astype(np.float32)
    where = lung_box & _keep_out(grid, box, nodules)
    occ = np.where(where, occ, 0.0).astype(np.float32)
    if occ.sum() < 1.0:
        return None
    _blend(hu, box, occ, float(rng.uniform(-650.0, -400.0)), where)
    return PhantomConfounder("fissure", _centre(grid, box, occ), 0.0)


def _add_plaque(
    rng: Rng,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    hu: FloatArray,
    nodules: Sequence[PhantomNodule],
) -> PhantomConfounder | None:
    """A flat pleural thickening 1.5-4 mm thick and 10-30 mm wide (calcified in a third)."""
    ks = np.flatnonzero(lungs.any(axis=(1, 2)))
    if not ks.size:
        return None
    k = int(rng.choice(ks))
    edge = lungs[k] & ~ndimage.binary_erosion(lungs[k])
    pts = np.argwhere(edge)
    if not len(pts):
        return None
    iy, ix = pts[int(rng.integers(len(pts)))]
    c = np.array([grid.x[ix], grid.y[iy], grid.z[k]])
    width = rng.uniform(10.0, 30.0)
    thick = rng.uniform(1.5, 4.0)
    box = grid.index_box(c - width / 2 - 2, c + width / 2 + 2)
    z, y, x = grid.points(box)
    r = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    depth = ndimage.distance_transform_edt(lungs[box], sampling=grid.spacing)
    # lens: thickest at the centre, thinning towards the rim
    t = thick * np.sqrt(np.clip(1.0 - (r / (width / 2)) ** 2, 0.0, 1.0))
    occ = np.clip((t - depth) / 1.0 + 0.5, 0.0, 1.0).astype(np.float32)
    where = lungs[box] & _keep_out(grid, box, nodules)
    occ = np.where(where, occ, 0.0).astype(np.float32)
    if occ.sum() < 1.0:
        return None
    value = float(rng.uniform(250.0, 600.0) if rng.random() < 0.33 else rng.uniform(20.0, 80.0))
    _blend(hu, box, occ, value, where)
    return PhantomConfounder("plaque", _centre(grid, box, occ), round(width, 1))


def _add_confounders(
    rng: Rng,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    hu: FloatArray,
    nodules: Sequence[PhantomNodule],
    fade: bool,
) -> list[PhantomConfounder]:
    """Paint the confounders of one phantom into ``hu`` (in place), away from every nodule.

    Multifocal opacities in both lungs (pneumonia) in two phantoms of three, a dependent band
    in half, one or two fissures in most and pleural plaques in a third. ``fade``: see
    :func:`_paint_opacity`.
    """
    out: list[PhantomConfounder | None] = []
    if rng.random() < 0.67:
        n = int(rng.integers(2, 8))
        sides = [(-1.0, 1.0)[i % 2] for i in range(n)]
        out += [_add_opacity(rng, grid, lungs, hu, nodules, side, fade) for side in sides]
    if rng.random() < 0.5:
        out.append(_add_atelectasis(rng, grid, lungs, hu, nodules))
    for side in (-1.0, 1.0):
        if rng.random() < 0.6:
            out.append(_add_fissure(rng, grid, lungs, hu, nodules, side))
    if rng.random() < 0.33:
        out += [_add_plaque(rng, grid, lungs, hu, nodules) for _ in range(int(rng.integers(1, 5)))]
    return [c for c in out if c is not None]


SATELLITE_PARENT_MM = 15.0
"""Opacities at least this large get satellite foci (opacity model 2)."""
SATELLITE_MM = (4.0, 14.0)
"""Size range of a satellite focus (mm, drawn log-uniform)."""


def _add_satellites(
    rng: Rng,
    grid: _Grid,
    lungs: npt.NDArray[np.bool_],
    hu: FloatArray,
    nodules: Sequence[PhantomNodule],
    parents: Sequence[PhantomConfounder],
) -> list[PhantomConfounder]:
    """Paint one to four small ill-defined foci (:data:`SATELLITE_MM`) beside each opacity of
    :data:`SATELLITE_PARENT_MM` or more, 2-20 mm beyond its drawn radius: the patchy multifocal
    ground-glass of pneumonia. Alone, such a focus looks like a ground-glass nodule; beside the
    patch it belongs to, it is part of the diffuse process and a negative."""
    out: list[PhantomConfounder | None] = []
    for p in parents:
        if p.kind != "opacity" or p.size_mm < SATELLITE_PARENT_MM:
            continue
        for _ in range(int(rng.integers(1, 5))):
            size = float(np.exp(rng.uniform(*np.log(SATELLITE_MM))))
            u = rng.standard_normal(3)
            u /= max(float(np.linalg.norm(u)), 1e-6)
            c = np.asarray(p.centre_xyz_mm) + u * (p.size_mm / 2 + rng.uniform(2.0, 20.0))
            if not _inside_lung(c, 0.0, grid, lungs, 0.0):
                continue
            out.append(_paint_opacity(rng, grid, lungs, hu, nodules, c, size, fade=True))
    return [c for c in out if c is not None]


# --------------------------------------------------------------------------- assembly


def _draw_geometry(
    rng: Rng, shape: tuple[int, int, int] | None, spacing_mm: tuple[float, float, float] | None
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if spacing_mm is None:
        thick = float(rng.choice(SLICE_THICKNESSES_MM))
        pix = float(rng.uniform(0.6, 0.9))
        spacing_mm = (thick, pix, pix)
    if shape is None:
        n_xy = 512
        n_z = round(rng.uniform(56.0, 88.0) / spacing_mm[0])
        shape = (n_z, n_xy, n_xy)
    return shape, spacing_mm


def _scanner(rng: Rng, hu: FloatArray, spacing: tuple[float, float, float]) -> FloatArray:
    """Apply in-plane PSF, slice profile and correlated noise."""
    fwhm = rng.uniform(0.7, 1.1)
    sigma = (0.42, fwhm / 2.355 / spacing[1], fwhm / 2.355 / spacing[2])
    out = ndimage.gaussian_filter(hu, sigma)
    noise = rng.standard_normal(size=hu.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.7, 0.7))
    noise *= rng.uniform(10.0, 35.0) / max(float(noise.std()), 1e-3)
    out += noise
    return np.asarray(out, dtype=np.float32)


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    n_nodules: int | tuple[int, int] | None = None,
    fov_padding: bool | None = None,
    confounders: bool = False,
    mass_chance: float = 0.0,
    opacity_model: int = 1,
) -> Phantom:
    """Make a synthetic chest CT phantom, deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Seed of every random choice; equal seeds (and arguments) give identical phantoms.
    shape : tuple of int, optional
        ``(slices, rows, columns)``. Default: 512 x 512 and a 56-88 mm slab.
    spacing_mm : tuple of float, optional
        ``(slice thickness, row spacing, column spacing)``. Default: pixel 0.6-0.9 mm, slice
        thickness one of :data:`SLICE_THICKNESSES_MM`. The body is sized in millimetres, so a
        small ``shape`` with a large spacing still holds a whole chest cross-section.
    n_nodules : int or (low, high), optional
        Number of nodules (or an inclusive range to draw from). Default: 0 to 4. Fewer are
        placed when they do not fit.
    fov_padding : bool, optional
        Pad outside the reconstruction circle with -2048 HU (as some scanners do). Default:
        drawn at random.
    confounders : bool, optional
        Also paint lung findings that are not nodules (:data:`CONFOUNDER_KINDS`): pneumonia-like
        opacities, dependent atelectasis, fissures, pleural plaques. They come from their own
        random stream, so the rest of the phantom is the one made without them.
    mass_chance : float, optional
        Chance that the phantom also holds one mass (:data:`MASS_DIAMETERS_MM`, solid or
        part-solid, often lobulated; a labelled lesion, the last of ``nodules``), drawn from a
        random stream of its own and painted before the confounders, which keep clear of it.
    opacity_model : int, optional
        How ``confounders`` paints pneumonia-like opacities. 1 (default; stage 2 up to 1.6.0
        trained on it, the held-out confounder phantoms of :mod:`models.evaluate` use it): a
        large opacity can end on the straight faces of the box it is painted in. 2 (stage 2
        1.7.0): every opacity fades out inside its box, and the larger ones get small satellite
        foci (:func:`_add_satellites`) from a random stream of their own.

    Returns
    -------
    Phantom
        Volume, geometry, ground-truth nodules and label map.
    """
    rng = np.random.default_rng(seed)
    shape, spacing_mm = _draw_geometry(rng, shape, spacing_mm)
    scene = _draw_scene(rng, shape, spacing_mm)
    labels = np.zeros(shape, np.uint8)
    if n_nodules is None:
        n_nodules = (0, 4)
    n = (
        n_nodules
        if isinstance(n_nodules, int)
        else int(rng.integers(n_nodules[0], n_nodules[1] + 1))
    )
    nodules = _add_nodules(rng, n, scene.grid, scene.lungs, scene.anat, scene.hu, labels)
    m_rng = np.random.default_rng([seed, 2])
    if m_rng.random() < mass_chance:
        nodules += _add_nodules(
            m_rng,
            1,
            scene.grid,
            scene.lungs,
            scene.anat,
            scene.hu,
            labels,
            _draw_mass_spec,
            nodules,
        )
    painted = []
    if confounders:
        c_rng = np.random.default_rng([seed, 1])
        if opacity_model not in (1, 2):
            raise ValueError(f"opacity_model {opacity_model}: 1 or 2")
        fade = opacity_model == 2
        painted = _add_confounders(c_rng, scene.grid, scene.lungs, scene.hu, nodules, fade)
        if fade:
            s_rng = np.random.default_rng([seed, 3])
            painted += _add_satellites(s_rng, scene.grid, scene.lungs, scene.hu, nodules, painted)
    hu = _scanner(rng, scene.hu, spacing_mm)
    if fov_padding is None:
        fov_padding = bool(rng.random() < 0.4)
    if fov_padding:
        yy, xx = np.meshgrid(
            np.arange(shape[1]) - shape[1] / 2, np.arange(shape[2]) - shape[2] / 2, indexing="ij"
        )
        hu[:, (yy / shape[1]) ** 2 + (xx / shape[2]) ** 2 > 0.25] = -2048.0
    vol = np.clip(np.rint(hu), -2048, 3071).astype(np.int16)
    return Phantom(
        volume_hu=vol,
        spacing_mm=spacing_mm,
        origin_mm=scene.origin,
        nodules=nodules,
        labels=labels,
        seed=seed,
        confounders=painted,
    )


@dataclass
class _Scene:
    """Noise-free anatomy of one phantom on its grid, before nodules and scanner effects."""

    grid: _Grid
    anat: _Anatomy
    hu: FloatArray
    lungs: npt.NDArray[np.bool_]
    origin: tuple[float, float, float]


def _draw_scene(
    rng: Rng, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]
) -> _Scene:
    """Place the grid (origin drawn), draw the anatomy to fit the field of view and render it."""
    fov = (shape[2] * spacing_mm[2], shape[1] * spacing_mm[1])
    origin = (
        -fov[0] / 2 + rng.uniform(-10, 10),
        -fov[1] / 2 + rng.uniform(-15, 5),
        float(rng.uniform(-220.0, -80.0)),
    )
    grid = _Grid(
        z=np.asarray(origin[2] + np.arange(shape[0]) * spacing_mm[0], dtype=np.float64),
        y=np.asarray(origin[1] + np.arange(shape[1]) * spacing_mm[1], dtype=np.float64),
        x=np.asarray(origin[0] + np.arange(shape[2]) * spacing_mm[2], dtype=np.float64),
        spacing=spacing_mm,
    )
    z_half = max((grid.z[-1] - grid.z[0]) / 2.0, 1.0)
    anat = _draw_anatomy(rng, float(grid.z.mean()), float(z_half))
    # keep the body inside the field of view
    scale = min(1.0, 0.47 * fov[0] / anat.body_a, 0.44 * fov[1] / anat.body_b)
    anat.body_a *= scale
    anat.body_b *= scale
    hu, lungs = _anatomy_volume(rng, grid, anat, shape)
    return _Scene(grid, anat, hu, lungs, origin)


def _anatomy_volume(
    rng: Rng, grid: _Grid, anat: _Anatomy, shape: tuple[int, int, int]
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """HU volume without nodules, and the lung cavity mask."""
    y = grid.y.astype(np.float32)[:, None]
    x = grid.x.astype(np.float32)[None, :]
    hu = np.empty(shape, np.float32)
    lungs = np.empty(shape, bool)
    for k, z in enumerate(grid.z):
        hu[k] = _body_slice(anat, y, x, float(z), rng)
        lungs[k] = _lung_cavity_slice(anat, y, x, float(z))
    if anat.dome is not None:
        dx, dz, dr, dy = anat.dome
        zz, yy, xx = grid.points((slice(None), slice(None), slice(None)))
        in_dome = (xx - dx) ** 2 + (yy - dy) ** 2 * 0.7 + (zz - dz) ** 2 < dr**2
        in_dome &= np.sqrt((xx / anat.body_a) ** 2 + (yy / anat.body_b) ** 2) < 0.9
        hu[in_dome] = 60.0
    tex = _lung_texture(rng, shape, grid.spacing, grid.y, anat)
    _draw_vessels(rng, anat)
    vessel, wall, lumen = _rasterise_vessels(grid, anat, shape)
    vessel_hu = rng.uniform(20.0, 260.0)  # without or with intravenous contrast
    lung_hu = tex * (1 - vessel) + vessel_hu * vessel
    lung_hu = lung_hu * (1 - wall) + 0.0 * wall
    lung_hu = lung_hu * (1 - lumen) - 1000.0 * lumen
    hu[lungs] = lung_hu[lungs]
    return hu, lungs


# --------------------------------------------------------------------------- DICOM


_UID_NAMESPACE = uuid.UUID("6f1b2c9e-2d0a-5c3e-9a57-4e0d6a1c8b21")


def _uid(seed: int, *parts: str, key: str = "") -> str:
    """Deterministic ``2.25`` UID (PS3.5 B.2) from a uuid5 of the seed, ``key`` and ``parts``."""
    name = "/".join(["noduleai-phantom", str(seed), *([key] if key else []), *parts])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def write_dicom_series(
    volume_hu: npt.NDArray[np.generic],
    spacing_mm: tuple[float, float, float],
    out_dir: str | Path,
    seed: int,
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    study_date: str = "20260101",
    uid_key: str = "",
    accession_number: str | None = None,
) -> list[Path]:
    """Write ``volume_hu`` as a DICOM CT Image Storage series, one file per slice.

    Pixel data are signed 16-bit stored values with RescaleSlope 1 and RescaleIntercept -1024
    (HU = stored - 1024), Explicit VR Little Endian. Slice ``k`` has ImagePositionPatient
    ``origin_mm + (0, 0, k * dz)``, ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``,
    PixelSpacing ``[dy, dx]`` and SliceThickness ``dz``. Study, series, frame-of-reference and
    instance UIDs are ``2.25`` UIDs derived from ``seed`` and ``uid_key`` (same seed and key,
    same UIDs); patient attributes are synthetic and derived from the seed unless given, so two
    studies of one patient share a seed and differ in ``uid_key``.

    Parameters
    ----------
    volume_hu : numpy.ndarray
        ``[z, y, x]`` Hounsfield units (values are clipped to -2048..3071).
    spacing_mm : tuple of float
        ``(dz, dy, dx)`` in mm.
    out_dir : str or pathlib.Path
        Folder to create and fill (``CT000000.dcm``, ...).
    seed : int
        Seed from which UIDs and synthetic patient attributes are derived.
    origin_mm : tuple of float
        LPS ``(x, y, z)`` of the first voxel.
    patient_id, patient_name, study_uid : str, optional
        Overrides for the synthetic values (e.g. to put several series in one study).
    series_number : int
        SeriesNumber; also part of the series UID derivation.
    study_date : str
        StudyDate, SeriesDate and ContentDate (``YYYYMMDD``).
    uid_key : str
        Extra key of the UID derivation ("" derives them from ``seed`` alone).
    accession_number : str, optional
        AccessionNumber; default ``PH`` and the seed.

    Returns
    -------
    list of pathlib.Path
        The files written, in slice order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored = (np.clip(np.rint(np.asarray(volume_hu, dtype=np.float32)), -2048, 3071) + 1024).astype(
        np.int16
    )
    base = _series_dataset(
        seed, spacing_mm, stored.shape, patient_id, patient_name, study_uid, series_number, uid_key
    )
    base.StudyDate = base.SeriesDate = base.ContentDate = study_date
    base.AccessionNumber = accession_number or f"PH{seed:08d}"
    paths = []
    for k in range(stored.shape[0]):
        ds = _slice_dataset(base, k, stored[k], spacing_mm, origin_mm, seed, series_number, uid_key)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = out / f"CT{k:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _series_dataset(
    seed: int,
    spacing_mm: tuple[float, float, float],
    shape: tuple[int, ...],
    patient_id: str | None,
    patient_name: str | None,
    study_uid: str | None,
    series_number: int,
    uid_key: str,
) -> Dataset:
    rng = np.random.default_rng(seed)
    birth = _dt.date(1940, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 45)))
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality = "CT"
    ds.PatientName = patient_name or f"PHANTOM^{seed:06d}"
    ds.PatientID = patient_id or f"NAI-PH-{seed:06d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.StudyInstanceUID = study_uid or _uid(seed, "study", key=uid_key)
    ds.SeriesInstanceUID = _uid(seed, "series", str(series_number), key=uid_key)
    ds.FrameOfReferenceUID = _uid(seed, "frame", key=uid_key)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = str(seed % 100000)
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "NoduleAI phantom"
    ds.ManufacturerModelName = "make_phantom"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Synthetic chest CT phantom"
    ds.StudyDescription = "CT CHEST (synthetic)"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = "120"
    ds.PatientPosition = "FFS"
    ds.PositionReferenceIndicator = ""
    ds.SliceThickness = f"{spacing_mm[0]:.4g}"
    ds.SpacingBetweenSlices = f"{spacing_mm[0]:.4g}"
    ds.PixelSpacing = [f"{spacing_mm[1]:.6g}", f"{spacing_mm[2]:.6g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns = int(shape[1]), int(shape[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.AcquisitionNumber = 1
    return ds


def _slice_dataset(
    base: Dataset,
    k: int,
    pixels: npt.NDArray[np.int16],
    spacing_mm: tuple[float, float, float],
    origin_mm: tuple[float, float, float],
    seed: int,
    series_number: int,
    uid_key: str,
) -> Dataset:
    from copy import deepcopy

    ds = deepcopy(base)
    z = origin_mm[2] + k * spacing_mm[0]
    ds.SOPInstanceUID = _uid(seed, "instance", str(series_number), str(k), key=uid_key)
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{origin_mm[0]:.6g}", f"{origin_mm[1]:.6g}", f"{z:.6g}"]
    ds.SliceLocation = f"{z:.6g}"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


# --------------------------------------------------------------------------- prior/current pairs

#: StudyDate of a pair's baseline; the follow-up is ``interval_days`` later.
PAIR_BASELINE_DATE = _dt.date(2025, 1, 6)
#: Anatomy drawn beyond each end of the slab (mm), so that the moved follow-up has no empty slices.
PAIR_MARGIN_MM = 36.0
#: Largest slice spacing (mm) of the anatomy that is moved and then sampled at the scans' slices:
#: interpolating between thick slices would smear thin vessels into faint ground-glass blobs.
PAIR_FINE_MM = 1.0
#: Least distance of a nodule's edge from the lung wall, of nodules' centres from each other, of
#: a nodule's edge from a large vessel, and of a nodule's edge from the slab's ends (mm).
PAIR_WALL_MM, PAIR_GAP_MM, PAIR_VESSEL_MM, PAIR_END_MM = 6.0, 25.0, 3.0, 8.0
#: The nodules of a pair: status, baseline diameter range (mm), volume factor range.
PAIR_PLAN: tuple[tuple[Status, tuple[float, float], tuple[float, float]], ...] = (
    (Status.STABLE, (6.0, 12.0), (1.0, 1.0)),
    (Status.GROWN, (6.0, 9.5), (1.8, 3.0)),
    (Status.GROWN, (6.0, 9.5), (1.8, 3.0)),
    (Status.NEW, (6.0, 12.0), (1.0, 1.0)),
    (Status.RESOLVED, (6.0, 12.0), (1.0, 1.0)),
)


@dataclass(frozen=True)
class PairNodule:
    """Ground truth of one nodule of a :class:`PhantomPair`.

    Attributes
    ----------
    status : Status
        STABLE or GROWN (in both scans), NEW (follow-up only) or RESOLVED (baseline only).
    baseline_label, followup_label : int or None
        Its value in that scan's :attr:`Phantom.labels` (None: absent).
    baseline_centre_mm, followup_centre_mm : tuple of float or None
        Centre in that scan's patient LPS mm; the follow-up centre is
        ``transform.to_current(baseline_centre)``.
    baseline_volume_mm3, followup_volume_mm3 : float or None
        Nominal volume ``pi d^3 / 6``.
    growth_factor : float or None
        Follow-up over baseline volume (nodules in both scans).
    doubling_time_days : float or None
        ``interval ln 2 / ln(growth_factor)`` for grown nodules.
    """

    status: Status
    baseline_label: int | None
    baseline_centre_mm: tuple[float, float, float] | None
    baseline_volume_mm3: float | None
    followup_label: int | None
    followup_centre_mm: tuple[float, float, float] | None
    followup_volume_mm3: float | None
    growth_factor: float | None
    doubling_time_days: float | None


@dataclass(frozen=True)
class PhantomPair:
    """A baseline and a follow-up phantom of one patient, who moved in between.

    Attributes
    ----------
    baseline, followup : Phantom
        The two scans, on the same grid; each scan's :attr:`Phantom.nodules` holds the nodules
        it shows.
    interval_days : int
        Days from baseline to follow-up.
    transform : RigidTransform
        Follow-up (current) to baseline (prior) patient space, what
        ``register_rigid(followup, baseline)`` should find.
    nodules : tuple of PairNodule
        Truth per nodule, in :data:`PAIR_PLAN` order.
    seed : int
        The seed that made it.
    """

    baseline: Phantom
    followup: Phantom
    interval_days: int
    transform: RigidTransform
    nodules: tuple[PairNodule, ...]
    seed: int


@dataclass(frozen=True)
class _PairSpec:
    """A pair nodule to paint: baseline centre, diameters (0: absent), HU and shape seed."""

    status: Status
    centre: npt.NDArray[np.float64]
    d_baseline: float
    d_followup: float
    hu: float
    shape_seed: int


def make_phantom_pair(
    seed: int,
    interval_days: int = 365,
    shape: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
) -> PhantomPair:
    """Make a baseline and a follow-up phantom of one patient, deterministically from ``seed``.

    One noise-free anatomy is drawn (:func:`make_phantom`'s) on a slab longer than the scans by
    :data:`PAIR_MARGIN_MM` at each end. The baseline is its middle; the follow-up is the anatomy
    moved rigidly (1-4 degrees about each axis, a 5-20 mm shift, by
    :func:`pipelines.registration.move_volume`) and cut to the same grid. Solid round nodules
    (:data:`PAIR_PLAN`: stable, two grown by known volume factors, new, resolved) are painted after
    the move, each in the follow-up at the moved position of its baseline centre, then each scan
    gets scanner blur and noise of its own.

    Parameters
    ----------
    seed : int
        Seed of every random choice.
    interval_days : int
        Days between the scans (the doubling times follow from it).
    shape : tuple of int, optional
        ``(slices, rows, columns)`` of each scan. Default: 512 x 512 and a 120-160 mm slab.
    spacing_mm : tuple of float, optional
        ``(dz, dy, dx)``. Default: 1.25-2.5 mm slices, 0.6-0.8 mm pixels.

    Returns
    -------
    PhantomPair
        Both scans, the true transform and the truth per nodule.

    Raises
    ------
    ValueError
        When the nodules do not fit in the lungs (a too small slab or field of view).
    """
    rng = np.random.default_rng(seed)
    shape, spacing_mm = _draw_pair_geometry(rng, shape, spacing_mm)
    pad = int(np.ceil(PAIR_MARGIN_MM / spacing_mm[0]))
    fine = int(np.ceil(spacing_mm[0] / PAIR_FINE_MM))
    scene = _draw_scene(
        rng,
        ((shape[0] + 2 * pad - 1) * fine + 1, shape[1], shape[2]),
        (spacing_mm[0] / fine, spacing_mm[1], spacing_mm[2]),
    )
    crop = slice(pad * fine, (pad + shape[0] - 1) * fine + 1, fine)
    grid = _Grid(scene.grid.z[crop], scene.grid.y, scene.grid.x, spacing_mm)
    transform = _draw_motion(rng, grid)
    specs = _place_pair_nodules(rng, scene, crop, grid, transform)
    moved = move_volume(scene.hu, scene.grid.spacing, scene.origin, transform)[crop]
    origin = (scene.origin[0], scene.origin[1], float(grid.z[0]))
    baseline, labels_b = _pair_scan(rng, scene.hu[crop], grid, specs, None, origin, seed)
    followup, labels_f = _pair_scan(rng, moved, grid, specs, transform, origin, seed)
    truth = tuple(
        _pair_truth(s, labels_b.get(i), labels_f.get(i), transform, interval_days)
        for i, s in enumerate(specs)
    )
    return PhantomPair(baseline, followup, interval_days, transform, truth, seed)


def _draw_pair_geometry(
    rng: Rng, shape: tuple[int, int, int] | None, spacing_mm: tuple[float, float, float] | None
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if spacing_mm is None:
        pix = float(rng.uniform(0.6, 0.8))
        spacing_mm = (float(rng.choice((1.25, 1.5, 2.0, 2.5))), pix, pix)
    if shape is None:
        shape = (round(rng.uniform(120.0, 160.0) / spacing_mm[0]), 512, 512)
    return shape, spacing_mm


def _draw_motion(rng: Rng, grid: _Grid) -> RigidTransform:
    """Rotation of 1-4 degrees about each axis (random signs) about the slab's centre, then a
    5-20 mm shift in a random direction."""
    angles = rng.uniform(1.0, 4.0, 3) * rng.choice((-1.0, 1.0), 3)
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(5.0, 20.0)
    centre = [float(grid.x.mean()), float(grid.y.mean()), float(grid.z.mean())]
    return RigidTransform.from_params(angles, shift, centre)


def _place_pair_nodules(
    rng: Rng, scene: _Scene, crop: slice, grid: _Grid, transform: RigidTransform
) -> list[_PairSpec]:
    """Draw :data:`PAIR_PLAN`'s nodules and place them where both scans show them clear of the
    lung wall, large vessels, the slab ends and each other."""
    wall, free, points = _clearance_maps(scene, crop)
    z_followup = transform.to_current(points)[:, 2]
    specs: list[_PairSpec] = []
    for status, (lo, hi), (f_lo, f_hi) in PAIR_PLAN:
        d_baseline = float(rng.uniform(lo, hi))
        d_followup = d_baseline * float(rng.uniform(f_lo, f_hi)) ** (1.0 / 3.0)
        radius = max(d_baseline, d_followup) / 2.0
        ok = (wall >= radius + PAIR_WALL_MM) & (free >= radius + PAIR_VESSEL_MM)
        ok &= _inside_slab(points[:, 2], grid, radius) & _inside_slab(z_followup, grid, radius)
        for other in specs:
            ok &= np.linalg.norm(points - other.centre, axis=1) >= PAIR_GAP_MM
        if not ok.any():
            raise ValueError(f"no room for a {status} nodule of {2 * radius:.1f} mm")
        centre = points[int(rng.choice(np.flatnonzero(ok)))]
        if status is Status.NEW:
            d_baseline = 0.0
        if status is Status.RESOLVED:
            d_followup = 0.0
        hu = float(rng.uniform(-20.0, 70.0))
        specs.append(
            _PairSpec(status, centre, d_baseline, d_followup, hu, int(rng.integers(2**31)))
        )
    return specs


def _clearance_maps(
    scene: _Scene, crop: slice
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per lung voxel of the slab (in-plane about every millimetre): distance to the lung wall,
    distance to anything dense (the wall or a vessel), and its LPS position."""
    step = max(1, round(1.0 / scene.grid.spacing[1]))
    sub = (crop, slice(None, None, step), slice(None, None, step))
    sampling = (
        scene.grid.spacing[0] * (crop.step or 1),
        scene.grid.spacing[1] * step,
        scene.grid.spacing[2] * step,
    )
    lungs = scene.lungs[sub]
    dense = ndimage.gaussian_filter(scene.hu[sub], 0.5) > -650.0
    wall = ndimage.distance_transform_edt(lungs, sampling=sampling)
    free = ndimage.distance_transform_edt(lungs & ~dense, sampling=sampling)
    k, j, i = np.nonzero(lungs)
    points = np.stack(
        [scene.grid.x[::step][i], scene.grid.y[::step][j], scene.grid.z[crop][k]], axis=1
    )
    return wall[k, j, i], free[k, j, i], points


def _inside_slab(z: npt.NDArray[np.float64], grid: _Grid, radius: float) -> npt.NDArray[np.bool_]:
    """Whether a nodule of ``radius`` at each ``z`` keeps :data:`PAIR_END_MM` from the slab ends."""
    margin = radius + PAIR_END_MM
    return np.asarray((z >= grid.z[0] + margin) & (z <= grid.z[-1] - margin))


def _pair_scan(
    rng: Rng,
    anatomy: FloatArray,
    grid: _Grid,
    specs: list[_PairSpec],
    transform: RigidTransform | None,
    origin: tuple[float, float, float],
    seed: int,
) -> tuple[Phantom, dict[int, int]]:
    """One scan of a pair: the nodules it shows painted on ``anatomy`` (at
    ``transform.to_current`` of their baseline centre for the follow-up; the slight ellipsoids'
    axes stay along the scanner's), then scanner effects. Returns the phantom and each shown
    spec's label."""
    hu = np.array(anatomy, dtype=np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    nodules: list[PhantomNodule] = []
    label_of: dict[int, int] = {}
    for index, spec in enumerate(specs):
        diameter = spec.d_baseline if transform is None else spec.d_followup
        if diameter <= 0.0:
            continue
        centre = spec.centre if transform is None else transform.to_current(spec.centre)
        shape_rng = np.random.default_rng(spec.shape_seed)
        box, occ = _nodule_occupancy(grid, shape_rng, centre, diameter / 2.0, irregular=False)
        label = len(nodules) + 1
        _paint(hu, labels, box, occ, spec.hu, label)
        label_of[index] = label
        xyz = (float(centre[0]), float(centre[1]), float(centre[2]))
        nodules.append(
            PhantomNodule(xyz, round(diameter, 2), "solid", "round", "parenchymal", label)
        )
    hu = _scanner(rng, hu, grid.spacing)
    volume = np.clip(np.rint(hu), -2048, 3071).astype(np.int16)
    return Phantom(volume, grid.spacing, origin, nodules, labels, seed), label_of


def _pair_truth(
    spec: _PairSpec,
    label_b: int | None,
    label_f: int | None,
    transform: RigidTransform,
    interval_days: int,
) -> PairNodule:
    def xyz(p: npt.NDArray[np.float64]) -> tuple[float, float, float]:
        return float(p[0]), float(p[1]), float(p[2])

    v_b = np.pi / 6.0 * spec.d_baseline**3 if spec.d_baseline > 0 else None
    v_f = np.pi / 6.0 * spec.d_followup**3 if spec.d_followup > 0 else None
    factor = v_f / v_b if v_b is not None and v_f is not None else None
    doubling = (
        interval_days * np.log(2.0) / np.log(factor)
        if spec.status is Status.GROWN and factor
        else None
    )
    return PairNodule(
        status=spec.status,
        baseline_label=label_b,
        baseline_centre_mm=xyz(spec.centre) if v_b is not None else None,
        baseline_volume_mm3=v_b,
        followup_label=label_f,
        followup_centre_mm=xyz(transform.to_current(spec.centre)) if v_f is not None else None,
        followup_volume_mm3=v_f,
        growth_factor=factor,
        doubling_time_days=None if doubling is None else float(doubling),
    )


def write_phantom_pair(pair: PhantomPair, out_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Write a pair as two DICOM CT studies of one patient (``baseline/`` and ``followup/``).

    Both share PatientID, PatientName, birth date and sex (all derived from the pair's seed);
    study, series, frame-of-reference and instance UIDs differ (derived from the seed and the
    time point, so deterministic); StudyDates are :data:`PAIR_BASELINE_DATE` and
    ``interval_days`` later.

    Returns
    -------
    tuple of list of pathlib.Path
        The baseline's files and the follow-up's, in slice order.
    """
    out = Path(out_dir)
    written = []
    for key, phantom, days in (
        ("baseline", pair.baseline, 0),
        ("followup", pair.followup, pair.interval_days),
    ):
        date = PAIR_BASELINE_DATE + _dt.timedelta(days=days)
        written.append(
            write_dicom_series(
                phantom.volume_hu,
                phantom.spacing_mm,
                out / key,
                pair.seed,
                origin_mm=phantom.origin_mm,
                patient_id=f"NAI-PP-{pair.seed:06d}",
                patient_name=f"PHANTOM^PAIR{pair.seed:06d}",
                study_date=date.strftime("%Y%m%d"),
                uid_key=key,
                accession_number=f"PP{pair.seed:08d}{key[0].upper()}",
            )
        )
    return written[0], written[1]
