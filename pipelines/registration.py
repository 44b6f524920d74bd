"""Rigid registration of a CT to the same patient's prior CT (numpy and scipy only).

A :class:`RigidTransform` maps a point of the **current** study's patient space to the **prior**
study's, both LPS millimetres: ``q = R p + t``. :func:`register_rigid` finds it from the images
by intensity: mean squared HU difference (both are CT of one patient, so equal tissue has equal
HU), minimised over three rotation angles (degrees) and three shifts (mm) by Powell's method
(Powell MJD. *An efficient method for finding the minimum of a function of several variables
without calculating derivatives.* Comput J 1964;7:155-62) on a coarse-to-fine pyramid (8, 4,
2 mm), with the cost evaluated at a random subset of voxels: the scheme of intensity-based
registration as in Thevenaz P, Ruttimann UE, Unser M. *A pyramid approach to subpixel
registration based on intensity.* IEEE Trans Image Process 1998;7:27-41, and Klein S, Staring M,
Murphy K, Viergever MA, Pluim JPW. *elastix: a toolbox for intensity-based medical image
registration.* IEEE Trans Med Imaging 2010;29:196-205.

Steps:

1. Each volume is sampled once onto isotropic grids of :data:`LEVELS_MM` (HU clipped to
   :data:`HU_RANGE`, Gaussian-smoothed by one voxel of the level); the full-resolution volume is
   never interpolated during the search.
2. The body (the largest component above -400 HU, holes filled per slice) and the lungs (air
   inside it) are segmented on the 4 mm grid. Rotations turn about the current lungs' centroid;
   the first shift maps that centroid onto the prior's (in z only when neither lung mask is cut
   by the scan's ends, since a slab's lungs centre on the slab).
3. A coarse grid of shifts around it is searched on the 8 mm grid (:data:`SEARCH_MM`), then
   Powell refines all six parameters level by level.
4. The cost is evaluated at a fixed, seeded random subset (at most :data:`MAX_POINTS`) of the
   current level's body voxels; the prior is sampled at the transformed points by trilinear
   interpolation, and only points that land inside the prior count, so partial z overlap is
   handled; below :data:`MIN_OVERLAP` of the points inside, the cost is a flat penalty.

Runtime is about a thousand cost evaluations of at most 40 000 points, nearly independent of the
matrix: 2-4 s on one core for LIDC-IDRI-0001 (133 x 512 x 512), about 1 s for a 36 x 320 x 320
phantom; memory is the pyramid (a 2 mm grid is 1/20 of a 0.7 x 0.7 x 2.5 mm volume).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from pipelines.volume import Volume

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Isotropic grid spacings of the pyramid, coarse to fine (mm).
LEVELS_MM = (8.0, 4.0, 2.0)
#: Most sample points of the cost per level (smoother levels need fewer).
MAX_POINTS = (10_000, 20_000, 40_000)
#: HU window of the cost: air to soft tissue; bone and contrast do not dominate it.
HU_RANGE = (-1000.0, 200.0)
#: The level (index into :data:`LEVELS_MM`) on which body and lungs are segmented.
MASK_LEVEL = 1
#: Below this fraction of sample points inside the prior, the cost is :data:`PENALTY`.
MIN_OVERLAP = 0.2
PENALTY = 10.0
#: Offsets (mm) of the initial shift search on the coarsest grid, per axis x, y, z.
SEARCH_MM = ((-16.0, -8.0, 0.0, 8.0, 16.0),) * 2 + (tuple(float(z) for z in range(-40, 41, 8)),)
#: Rounding tolerance (voxels) of "inside the prior" at its first and last voxel.
EDGE = 1e-6
#: Powell tolerances on the parameters (degrees and mm) and on the cost.
XTOL, FTOL = 0.05, 1e-3


@dataclass(frozen=True)
class RigidTransform:
    """``q = R p + t``: a point ``p`` of the current study to ``q`` of the prior (LPS mm).

    Attributes
    ----------
    rotation : tuple of tuple of float
        The 3 x 3 rotation matrix ``R``, row by row (see :attr:`matrix`).
    translation : tuple of float
        ``t`` in mm.
    """

    rotation: tuple[tuple[float, float, float], ...]
    translation: tuple[float, float, float]

    @classmethod
    def of(cls, rotation: npt.ArrayLike, translation: npt.ArrayLike) -> RigidTransform:
        """A transform from a 3 x 3 rotation matrix and a 3-vector."""
        r = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
        t = np.asarray(translation, dtype=np.float64).reshape(3)
        rows = tuple((float(a), float(b), float(c)) for a, b, c in r)
        return cls(rows, (float(t[0]), float(t[1]), float(t[2])))

    @classmethod
    def identity(cls) -> RigidTransform:
        """The transform that moves nothing."""
        return cls.of(np.eye(3), np.zeros(3))

    @classmethod
    def from_params(
        cls, angles_deg: npt.ArrayLike, shift_mm: npt.ArrayLike, centre_mm: npt.ArrayLike
    ) -> RigidTransform:
        """Rotation about ``centre_mm``, then a shift: ``q = R (p - c) + c + s``.

        Parameters
        ----------
        angles_deg : array_like
            Rotations about the patient x, y and z axes in degrees, applied in that order
            (extrinsic x-y-z Euler angles, ``R = Rz Ry Rx``).
        shift_mm : array_like
            ``s``, mm.
        centre_mm : array_like
            ``c``, the fixed point of the rotation, mm.
        """
        r = Rotation.from_euler("xyz", np.asarray(angles_deg, np.float64), degrees=True)
        matrix = np.asarray(r.as_matrix(), dtype=np.float64)
        c = np.asarray(centre_mm, dtype=np.float64)
        return cls.of(matrix, c + np.asarray(shift_mm, dtype=np.float64) - matrix @ c)

    @property
    def matrix(self) -> FloatArray:
        """``R`` as a new 3 x 3 array."""
        return np.array(self.rotation, dtype=np.float64)

    @property
    def vector(self) -> FloatArray:
        """``t`` as a new array."""
        return np.array(self.translation, dtype=np.float64)

    def to_prior(self, points: npt.ArrayLike) -> FloatArray:
        """Map ``(3,)`` or ``(N, 3)`` current-study points to the prior study."""
        p = np.asarray(points, dtype=np.float64)
        return np.asarray(p @ self.matrix.T + self.vector, dtype=np.float64)

    def to_current(self, points: npt.ArrayLike) -> FloatArray:
        """Map ``(3,)`` or ``(N, 3)`` prior-study points to the current study (the inverse)."""
        q = np.asarray(points, dtype=np.float64)
        return np.asarray((q - self.vector) @ self.matrix, dtype=np.float64)

    def inverse(self) -> RigidTransform:
        """The transform from the prior study to the current one."""
        r = self.matrix
        return RigidTransform.of(r.T, -r.T @ self.vector)

    @property
    def rotation_deg(self) -> float:
        """Total rotation angle in degrees (angle of the axis-angle form)."""
        cos = (float(np.trace(self.matrix)) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

    @property
    def translation_mm(self) -> float:
        """Length of ``t`` in mm (depends on the origin; about a centre see :meth:`from_params`)."""
        return float(np.linalg.norm(self.vector))


@dataclass(frozen=True)
class Registration:
    """The result of :func:`register_rigid`.

    Attributes
    ----------
    transform : RigidTransform
        Current study to prior study.
    cost : float
        Final cost on the finest level: mean squared HU difference over the sample points inside
        the prior, divided by the variance of the current sample values (0 is a perfect match,
        about 2 unrelated images).
    overlap : float
        Fraction of the finest level's sample points that map inside the prior volume.
    seconds : float
        Wall time of the registration.
    """

    transform: RigidTransform
    cost: float
    overlap: float
    seconds: float


@dataclass(frozen=True)
class _Level:
    """One volume on one isotropic pyramid grid; voxel ``[k, j, i]`` at ``origin + s (i, j, k)``."""

    image: npt.NDArray[np.float32]
    spacing: float
    origin: FloatArray

    def world(self, index_zyx: npt.NDArray[np.intp]) -> FloatArray:
        """LPS mm of ``(N, 3)`` voxel indices ``(k, j, i)``."""
        return np.asarray(self.origin + index_zyx[:, ::-1] * self.spacing, dtype=np.float64)

    def index_map(self, transform: RigidTransform) -> tuple[FloatArray, FloatArray]:
        """``(A, b)`` such that ``A p + b`` are the fractional ``(k, j, i)`` indices of
        ``transform.to_prior(p)`` on this grid."""
        a = transform.matrix[::-1] / self.spacing
        b = (transform.vector - self.origin)[::-1] / self.spacing
        return a, b


class _Cost:
    """Normalised mean squared difference of one level at fixed sample points of the current."""

    def __init__(
        self, current: _Level, body: BoolArray, prior: _Level, most: int, seed: int = 0
    ) -> None:
        index = np.argwhere(body)
        if len(index) > most:
            rng = np.random.default_rng(seed)
            index = index[np.sort(rng.choice(len(index), most, replace=False))]
        self.points = np.ascontiguousarray(current.world(index).T)
        self.values = current.image[tuple(index.T)].astype(np.float64)
        self.scale = max(float(self.values.var()), 1.0)
        self.prior = prior
        self.upper = np.array(prior.image.shape, dtype=np.float64)[:, None] - 1.0

    def inside(self, transform: RigidTransform) -> tuple[BoolArray, FloatArray]:
        """Which points land inside the prior, and their prior voxel coordinates."""
        a, b = self.prior.index_map(transform)
        coords = a @ self.points + b[:, None]
        inside = (coords >= -EDGE) & (coords <= self.upper + EDGE)
        return np.all(inside, axis=0), coords

    def __call__(self, transform: RigidTransform) -> tuple[float, float]:
        """Cost and overlap fraction of ``transform``."""
        inside, coords = self.inside(transform)
        overlap = float(inside.mean())
        if overlap < MIN_OVERLAP:
            return PENALTY, overlap
        sampled = ndimage.map_coordinates(
            self.prior.image, coords[:, inside], order=1, mode="nearest"
        )
        diff = sampled - self.values[inside]
        return float(np.mean(diff * diff)) / self.scale, overlap


def register_rigid(current: Volume, prior: Volume) -> Registration:
    """Find the rigid transform from ``current`` to ``prior`` (two CT of one patient).

    Parameters
    ----------
    current : Volume
        The study being read (the fixed image: the cost is sampled on its grid).
    prior : Volume
        The patient's earlier CT.

    Returns
    -------
    Registration
        Transform (current LPS to prior LPS), final cost, overlap and wall time.
    """
    start = time.perf_counter()
    fixed, moving = _pyramid(current), _pyramid(prior)
    grid_c, grid_p = fixed[MASK_LEVEL], moving[MASK_LEVEL]
    body, lungs_c = _masks(grid_c.image)
    lungs_p = _masks(grid_p.image)[1]
    centre = _centroid(grid_c, lungs_c)
    params = np.concatenate([np.zeros(3), _initial_shift(grid_c, lungs_c, grid_p, lungs_p)])
    costs = [
        _Cost(f, _resize_mask(body, grid_c, f), m, most, seed=n)
        for n, (f, m, most) in enumerate(zip(fixed, moving, MAX_POINTS, strict=True))
    ]
    params = _search_shift(costs[0], params, centre)
    for cost in costs:
        params = _powell(cost, params, centre)
    transform = RigidTransform.from_params(params[:3], params[3:], centre)
    value, overlap = costs[-1](transform)
    return Registration(transform, value, overlap, time.perf_counter() - start)


def _pyramid(volume: Volume) -> list[_Level]:
    """The volume on every grid of :data:`LEVELS_MM`, clipped and smoothed."""
    levels: list[_Level] = []
    for spacing in sorted(LEVELS_MM):
        if not levels:
            image = _sample(volume, spacing)
        else:
            ratio = round(spacing / levels[-1].spacing)
            image = levels[-1].image[::ratio, ::ratio, ::ratio]
        smooth = ndimage.gaussian_filter(image, 1.0, mode="nearest")
        levels.append(_Level(np.asarray(smooth, np.float32), spacing, _origin(volume)))
    return sorted(levels, key=lambda level: -level.spacing)


def _origin(volume: Volume) -> FloatArray:
    return np.array(volume.origin_mm, dtype=np.float64)


def _sample(volume: Volume, spacing: float) -> npt.NDArray[np.float32]:
    """Trilinear samples of the clipped HU on an isotropic grid from the volume's first voxel."""
    extent = (np.array(volume.hu.shape) - 1) * np.array(volume.spacing_mm)
    axes = [
        np.arange(int(e // spacing) + 1) * spacing / s
        for e, s in zip(extent, volume.spacing_mm, strict=True)
    ]
    out = np.empty([len(a) for a in axes], dtype=np.float32)
    k = axes[0]
    jj, ii = np.meshgrid(axes[1], axes[2], indexing="ij")
    for n, z in enumerate(k):
        z0 = min(int(z), max(volume.hu.shape[0] - 2, 0))
        pair = volume.hu[z0 : z0 + 2]
        coords = np.stack([np.full_like(jj, z - z0), jj, ii])
        out[n] = ndimage.map_coordinates(pair, coords, order=1, mode="nearest")
    return np.clip(out, *HU_RANGE, out=out)


def _masks(image: npt.NDArray[np.float32]) -> tuple[BoolArray, BoolArray]:
    """Body (largest component above -400 HU, filled per slice) and lungs (air inside it)."""
    dense = image > -400.0
    labels, count = ndimage.label(dense)
    if count == 0:
        return np.ones_like(dense), np.zeros_like(dense)
    sizes = np.bincount(labels.ravel())[1:]
    body = labels == int(np.argmax(sizes)) + 1
    for z in range(body.shape[0]):
        body[z] = ndimage.binary_fill_holes(body[z])
    return body, body & ~dense


def _resize_mask(mask: BoolArray, source: _Level, target: _Level) -> BoolArray:
    """``mask`` of ``source``'s grid on ``target``'s (nearest voxel; both share the origin)."""
    axes = [
        np.clip(np.rint(np.arange(n) * target.spacing / source.spacing).astype(np.intp), 0, m - 1)
        for n, m in zip(target.image.shape, mask.shape, strict=True)
    ]
    return np.asarray(mask[np.ix_(*axes)], dtype=bool)


def _centroid(level: _Level, mask: BoolArray) -> FloatArray:
    index = np.argwhere(mask)
    if len(index) == 0:
        index = np.argwhere(np.ones_like(mask))
    return np.asarray(level.world(index).mean(axis=0), dtype=np.float64)


def _initial_shift(
    current: _Level, lungs_c: BoolArray, prior: _Level, lungs_p: BoolArray
) -> FloatArray:
    """Prior lungs' centroid minus the current's; z only when neither is cut by the scan ends."""
    shift = _centroid(prior, lungs_p) - _centroid(current, lungs_c)
    if _cut(lungs_c) or _cut(lungs_p):
        shift[2] = 0.0
    return shift


def _cut(lungs: BoolArray) -> bool:
    """Whether the lungs reach the first or last slice (a slab or a truncated scan)."""
    return bool(lungs[0].any() or lungs[-1].any())


def _search_shift(cost: _Cost, params: FloatArray, centre: FloatArray) -> FloatArray:
    """The best of a grid of shifts (:data:`SEARCH_MM`) around ``params``, angles kept."""
    best, best_value = params, np.inf
    for offset in itertools.product(*SEARCH_MM):
        trial = params + np.concatenate([np.zeros(3), offset])
        value = cost(RigidTransform.from_params(trial[:3], trial[3:], centre))[0]
        if value < best_value:
            best, best_value = trial, value
    return best


def _powell(cost: _Cost, params: FloatArray, centre: FloatArray) -> FloatArray:
    """Powell's method on the six parameters from ``params`` at one level."""

    def objective(x: FloatArray) -> float:
        return cost(RigidTransform.from_params(x[:3], x[3:], centre))[0]

    options: dict[str, Any] = {"xtol": XTOL, "ftol": FTOL}
    result = optimize.minimize(objective, params, method="Powell", options=options)
    return np.asarray(result.x, dtype=np.float64)


def move_volume(
    hu: npt.NDArray[np.float32],
    spacing_mm: tuple[float, float, float],
    origin_mm: tuple[float, float, float],
    transform: RigidTransform,
) -> npt.NDArray[np.float32]:
    """The image of a patient who moved by ``transform``, on the same grid.

    The output is a *current* image whose prior is ``hu``: output at LPS point ``p`` is ``hu``
    at ``transform.to_prior(p)`` (trilinear; outside the input the input's minimum), so
    ``register_rigid(moved, original)`` should return ``transform``; anatomy at ``q`` in ``hu``
    appears at ``transform.to_current(q)``.

    Parameters
    ----------
    hu : numpy.ndarray
        ``[z, y, x]`` float32 (or any real) values.
    spacing_mm : tuple of float
        ``(dz, dy, dx)``.
    origin_mm : tuple of float
        LPS ``(x, y, z)`` of voxel ``[0, 0, 0]``.
    transform : RigidTransform
        Current (output) to prior (input) patient space.

    Returns
    -------
    numpy.ndarray
        float32, same shape; one output array and no other full-size temporary.
    """
    spacing_xyz = np.array(spacing_mm[::-1], dtype=np.float64)
    origin = np.array(origin_mm, dtype=np.float64)
    r = transform.matrix
    # index (k, j, i) -> world p = origin + S P o; input index o' = P S^-1 (R p + t - origin)
    matrix = (r * spacing_xyz[None, :] / spacing_xyz[:, None])[::-1, ::-1]
    offset = ((r @ origin + transform.vector - origin) / spacing_xyz)[::-1]
    out = np.empty(hu.shape, dtype=np.float32)
    ndimage.affine_transform(
        hu, matrix, offset, output=out, order=1, mode="constant", cval=float(np.min(hu))
    )
    return out
