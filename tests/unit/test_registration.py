"""Rigid transforms and the registration of a CT to a prior: algebra, the moving of volumes, and
recovery of known motions on phantoms and on a real CT."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from models.phantom import make_phantom
from pipelines.preprocess import lung_mask
from pipelines.registration import RigidTransform, move_volume, register_rigid
from pipelines.volume import Volume, build_volume

pytestmark = pytest.mark.unit

#: A 170 mm slab: scans are cut from its middle, so that a moved scan shows anatomy everywhere
#: (as a real follow-up does) rather than the blank that moving a volume leaves at its ends.
SHAPE = (68, 176, 176)
MIDDLE = slice(14, 54)
SPACING = (2.5, 2.0, 2.0)


def _volume(
    hu: npt.NDArray[np.floating],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
) -> Volume:
    return Volume(
        hu=np.asarray(hu, dtype=np.float32),
        spacing_mm=spacing,
        origin_mm=origin,
        series_instance_uid="",
        study_instance_uid="",
        frame_of_reference_uid="",
        sop_instance_uids=[],
        source_positions=[],
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    )


def _lung_points(volume: Volume, step: int = 4) -> npt.NDArray[np.float64]:
    """LPS positions of the lungs (:func:`pipelines.preprocess.lung_mask`), every ``step``-th
    voxel in-plane."""
    lungs = lung_mask(volume.hu[:, ::step, ::step])
    k, j, i = np.nonzero(lungs)
    dz, dy, dx = volume.spacing_mm
    x0, y0, z0 = volume.origin_mm
    return np.stack([x0 + i * step * dx, y0 + j * step * dy, z0 + k * dz], axis=1)


def _error_mm(
    found: RigidTransform, truth: RigidTransform, points: npt.NDArray[np.float64]
) -> float:
    """Largest distance between where ``found`` and ``truth`` map ``points``."""
    return float(np.linalg.norm(found.to_prior(points) - truth.to_prior(points), axis=1).max())


def _moved(volume: Volume, truth: RigidTransform, seed: int) -> Volume:
    """A follow-up of ``volume``: moved by ``truth``, with fresh noise."""
    rng = np.random.default_rng(seed)
    hu = move_volume(volume.hu, volume.spacing_mm, volume.origin_mm, truth)
    hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
    return _volume(hu, volume.spacing_mm, volume.origin_mm)


def _crop(volume: Volume, slices: slice) -> Volume:
    """The slices ``slices`` of ``volume`` (a scan of less of the patient)."""
    x, y, z = volume.origin_mm
    origin = (x, y, z + slices.indices(volume.hu.shape[0])[0] * volume.spacing_mm[0])
    return _volume(volume.hu[slices], volume.spacing_mm, origin)


@pytest.fixture(scope="module")
def phantom() -> Volume:
    ph = make_phantom(21, shape=SHAPE, spacing_mm=SPACING, n_nodules=0, fov_padding=False)
    return _volume(ph.volume_hu, ph.spacing_mm, ph.origin_mm)


def _centre(volume: Volume) -> npt.NDArray[np.float64]:
    shape = np.array(volume.hu.shape[::-1]) - 1
    return np.array(volume.origin_mm) + shape * np.array(volume.spacing_mm[::-1]) / 2.0


# --------------------------------------------------------------------------- algebra


def test_to_current_undoes_to_prior_for_one_point_and_for_many() -> None:
    t = RigidTransform.from_params((3.0, -2.0, 4.5), (10.0, -5.0, 20.0), (1.0, 2.0, 3.0))
    points = np.random.default_rng(0).normal(0.0, 100.0, (50, 3))
    assert np.allclose(t.to_current(t.to_prior(points)), points)
    assert t.to_prior(points[0]).shape == (3,)
    assert np.allclose(t.to_current(t.to_prior(points[0])), points[0])
    assert np.allclose(t.inverse().to_prior(points), t.to_current(points))


def test_from_params_rotates_about_the_centre_then_shifts() -> None:
    centre = np.array([10.0, -20.0, 30.0])
    t = RigidTransform.from_params((0.0, 0.0, 90.0), (1.0, 2.0, 3.0), centre)
    assert np.allclose(t.to_prior(centre), centre + np.array([1.0, 2.0, 3.0]))
    # 90 degrees about z takes +x to +y
    assert np.allclose(
        t.to_prior(centre + np.array([5.0, 0.0, 0.0])), centre + np.array([1.0, 7.0, 3.0])
    )
    assert t.rotation_deg == pytest.approx(90.0)


def test_rotation_angle_and_translation_length() -> None:
    t = RigidTransform.from_params((3.0, 0.0, 0.0), (3.0, 4.0, 0.0), (0.0, 0.0, 0.0))
    assert t.rotation_deg == pytest.approx(3.0)
    assert t.translation_mm == pytest.approx(5.0)
    assert RigidTransform.identity().rotation_deg == 0.0
    assert RigidTransform.identity().translation_mm == 0.0


def test_a_transform_is_immutable_and_hands_out_copies() -> None:
    t = RigidTransform.identity()
    t.matrix[0, 0] = 5.0
    t.vector[0] = 5.0
    assert t == RigidTransform.identity()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.translation = (1.0, 0.0, 0.0)  # type: ignore[misc]


def test_move_volume_shows_prior_anatomy_at_its_current_position() -> None:
    spacing, origin = (2.0, 1.0, 1.5), (-30.0, -40.0, 100.0)
    z, y, x = np.mgrid[0:30, 0:80, 0:60]
    world = np.stack(
        [origin[0] + x * spacing[2], origin[1] + y * spacing[1], origin[2] + z * spacing[0]], -1
    )
    q = np.array([5.0, 0.0, 130.0])
    blob = np.exp(-np.sum((world - q) ** 2, axis=-1) / (2 * 4.0**2)).astype(np.float32)
    t = RigidTransform.from_params((2.0, -3.0, 5.0), (4.0, -6.0, 8.0), (0.0, 0.0, 120.0))
    moved = move_volume(blob, spacing, origin, t)
    assert moved.dtype == np.float32 and moved.shape == blob.shape
    centroid = (world * moved[..., None]).sum(axis=(0, 1, 2)) / moved.sum()
    assert np.allclose(centroid, t.to_current(q), atol=0.2)


# --------------------------------------------------------------------------- registration


def test_a_phantom_registers_to_itself_as_the_identity(phantom: Volume) -> None:
    scan = _crop(phantom, MIDDLE)
    result = register_rigid(scan, scan)
    assert _error_mm(result.transform, RigidTransform.identity(), _lung_points(scan)) < 0.5
    assert result.overlap > 0.99
    assert result.cost < 1e-3


@pytest.mark.parametrize(
    ("angles", "shift"),
    [((4.0, -3.0, 5.0), (12.0, -8.0, 6.0)), ((-2.0, 4.5, -3.0), (-20.0, 15.0, -14.0))],
)
def test_register_rigid_recovers_a_known_motion_of_a_phantom(
    phantom: Volume, angles: tuple[float, float, float], shift: tuple[float, float, float]
) -> None:
    truth = RigidTransform.from_params(angles, shift, _centre(phantom))
    current = _crop(_moved(phantom, truth, seed=1), MIDDLE)
    result = register_rigid(current, _crop(phantom, MIDDLE))
    assert _error_mm(result.transform, truth, _lung_points(current)) < 1.5


def test_register_rigid_recovers_a_motion_with_partial_z_overlap(phantom: Volume) -> None:
    """The prior covers 65 mm, the follow-up 85 mm further up, and the patient moved 18 mm in z:
    less than half of the follow-up is in the prior."""
    truth = RigidTransform.from_params((-3.0, 2.0, 4.0), (6.0, -4.0, 18.0), _centre(phantom))
    current = _crop(_moved(phantom, truth, seed=2), slice(18, 52))
    prior = _crop(phantom, slice(14, 40))
    result = register_rigid(current, prior)
    assert _error_mm(result.transform, truth, _lung_points(current)) < 1.5
    assert 0.3 < result.overlap < 0.6


def test_register_rigid_recovers_a_known_motion_of_a_real_ct(shared_data: Path) -> None:
    """LIDC-IDRI-0001 (133 slices of 512 x 512) against a copy moved by 4 degrees and 25 mm."""
    real = build_volume(sorted((shared_data / "lidc-idri-0001").rglob("*.dcm")))
    truth = RigidTransform.from_params((2.5, -3.0, 4.0), (15.0, -12.0, 15.0), _centre(real))
    current = _moved(real, truth, seed=3)
    result = register_rigid(current, real)
    assert _error_mm(result.transform, truth, _lung_points(current)) < 1.5
    assert result.seconds < 30.0
