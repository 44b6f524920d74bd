"""Synthetic phantoms: determinism, ground truth and DICOM series output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.phantom import MASS_DIAMETERS_MM, Phantom, make_phantom, write_dicom_series

SMALL = (12, 96, 96)
SPACING = (2.5, 3.6, 3.6)


@pytest.fixture(scope="module")
def tiny() -> Phantom:
    return make_phantom(7, shape=SMALL, spacing_mm=SPACING, n_nodules=2)


def test_same_seed_gives_identical_phantom() -> None:
    a = make_phantom(11, shape=SMALL, spacing_mm=SPACING, n_nodules=2)
    b = make_phantom(11, shape=SMALL, spacing_mm=SPACING, n_nodules=2)
    assert np.array_equal(a.volume_hu, b.volume_hu)
    assert np.array_equal(a.labels, b.labels)
    assert a.nodules == b.nodules
    assert a.origin_mm == b.origin_mm


def test_different_seeds_give_different_phantoms() -> None:
    a = make_phantom(11, shape=SMALL, spacing_mm=SPACING)
    b = make_phantom(12, shape=SMALL, spacing_mm=SPACING)
    assert not np.array_equal(a.volume_hu, b.volume_hu)


def test_default_geometry_is_scanner_like() -> None:
    ph = make_phantom(3, n_nodules=0)
    dz, dy, dx = ph.spacing_mm
    assert 0.6 <= dy == dx <= 0.9
    assert 0.625 <= dz <= 2.5
    assert ph.volume_hu.shape[1:] == (512, 512)
    assert ph.volume_hu.dtype == np.int16


def test_lungs_air_and_nodules_have_expected_hounsfield_units(tiny: Phantom) -> None:
    ph = tiny
    vol, lab = ph.volume_hu, ph.labels
    assert len(ph.nodules) >= 1
    assert (vol < -700).mean() > 0.2  # lungs and outside air
    for n in ph.nodules:
        assert 3.0 <= n.diameter_mm <= 30.0
        inside = vol[lab == n.label]
        if n.kind == "solid" and inside.size:
            assert np.median(inside) > -500


def test_nodule_labels_sit_at_the_reported_centres(tiny: Phantom) -> None:
    ph = tiny
    for n in ph.nodules:
        z = (n.centre_xyz_mm[2] - ph.origin_mm[2]) / ph.spacing_mm[0]
        assert 0 <= z < ph.volume_hu.shape[0]
        vox = np.argwhere(ph.labels == n.label)
        if len(vox):
            cz = vox[:, 0].mean() * ph.spacing_mm[0] + ph.origin_mm[2]
            assert abs(cz - n.centre_xyz_mm[2]) < n.diameter_mm / 2 + SPACING[0]


def test_dicom_series_round_trips_geometry_rescale_and_uids(tmp_path: Path, tiny: Phantom) -> None:
    ph = tiny
    paths = write_dicom_series(
        ph.volume_hu, ph.spacing_mm, tmp_path / "a", seed=7, origin_mm=ph.origin_mm
    )
    assert len(paths) == SMALL[0]
    dss = [pydicom.dcmread(p) for p in paths]
    assert {d.SOPClassUID for d in dss} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert len({d.SOPInstanceUID for d in dss}) == SMALL[0]
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    assert len({d.StudyInstanceUID for d in dss}) == 1
    assert dss[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    for k, d in enumerate(dss):
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        ipp = [float(v) for v in d.ImagePositionPatient]
        assert ipp[2] == pytest.approx(ph.origin_mm[2] + k * SPACING[0], abs=1e-3)
        assert ipp[0] == pytest.approx(ph.origin_mm[0], abs=1e-3)
        assert [float(v) for v in d.PixelSpacing] == pytest.approx(SPACING[1:])
        assert float(d.SliceThickness) == pytest.approx(SPACING[0])
        hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        assert np.array_equal(hu, ph.volume_hu[k])
    again = write_dicom_series(ph.volume_hu, ph.spacing_mm, tmp_path / "b", seed=7)
    assert pydicom.dcmread(again[0]).SOPInstanceUID == dss[0].SOPInstanceUID
    other = write_dicom_series(ph.volume_hu[:1], ph.spacing_mm, tmp_path / "c", seed=8)
    assert pydicom.dcmread(other[0]).SOPInstanceUID != dss[0].SOPInstanceUID
    assert dss[0].SOPInstanceUID.startswith("2.25.")


def test_dicom_series_reads_back_with_the_annotations_loader(tmp_path: Path, tiny: Phantom) -> None:
    from models.annotations import load_dicom_series

    ph = tiny
    write_dicom_series(ph.volume_hu, ph.spacing_mm, tmp_path, seed=7, origin_mm=ph.origin_mm)
    ct = load_dicom_series(tmp_path)
    assert np.array_equal(ct.volume_hu, ph.volume_hu)
    assert ct.spacing_mm == pytest.approx(ph.spacing_mm)
    assert ct.origin_mm == pytest.approx(ph.origin_mm, abs=1e-3)


CONF_SHAPE = (30, 160, 160)
CONF_SPACING = (2.5, 2.2, 2.2)


def test_confounders_leave_the_rest_of_the_phantom_as_it_was() -> None:
    plain = make_phantom(21, shape=CONF_SHAPE, spacing_mm=CONF_SPACING, n_nodules=3)
    conf = make_phantom(
        21, shape=CONF_SHAPE, spacing_mm=CONF_SPACING, n_nodules=3, confounders=True
    )
    again = make_phantom(
        21, shape=CONF_SHAPE, spacing_mm=CONF_SPACING, n_nodules=3, confounders=True
    )
    assert plain.confounders == []
    assert conf.nodules == plain.nodules and np.array_equal(conf.labels, plain.labels)
    assert conf.confounders == again.confounders
    assert np.array_equal(conf.volume_hu, again.volume_hu)
    changed = conf.volume_hu.astype(int) - plain.volume_hu.astype(int) != 0
    assert changed.any()
    # painted structures only brighten the lungs and never touch a nodule's voxels
    assert not (changed & (plain.labels > 0)).any()


@pytest.mark.parametrize("seed", [30, 31, 32, 33, 34, 35])
def test_confounders_lie_in_the_lungs_clear_of_every_nodule(seed: int) -> None:
    ph = make_phantom(seed, shape=CONF_SHAPE, spacing_mm=CONF_SPACING, confounders=True)
    for c in ph.confounders:
        assert c.kind in ("opacity", "atelectasis", "fissure", "plaque")
        for n in ph.nodules:
            gap = np.linalg.norm(np.subtract(c.centre_xyz_mm, n.centre_xyz_mm))
            assert gap > n.diameter_mm / 2
        k = round((c.centre_xyz_mm[2] - ph.origin_mm[2]) / ph.spacing_mm[0])
        assert 0 <= k < ph.volume_hu.shape[0]


def test_every_confounder_kind_is_drawn() -> None:
    kinds = {
        c.kind
        for s in range(40, 52)
        for c in make_phantom(
            s, shape=CONF_SHAPE, spacing_mm=CONF_SPACING, n_nodules=0, confounders=True
        ).confounders
    }
    assert kinds == {"opacity", "atelectasis", "fissure", "plaque"}


def test_opacities_are_ground_glass_or_consolidation_in_both_lungs() -> None:
    sides: set[bool] = set()
    for s in range(60, 66):
        plain = make_phantom(s, shape=CONF_SHAPE, spacing_mm=CONF_SPACING, n_nodules=0)
        ph = make_phantom(
            s, shape=CONF_SHAPE, spacing_mm=CONF_SPACING, n_nodules=0, confounders=True
        )
        for c in ph.confounders:
            if c.kind != "opacity":
                continue
            assert 12.0 <= c.size_mm <= 70.0
            sides.add(c.centre_xyz_mm[0] > 0)
        grew = ph.volume_hu.astype(int) - plain.volume_hu.astype(int)
        if any(c.kind == "opacity" for c in ph.confounders):
            assert grew.max() > 200  # ground glass over lung at about -860 HU
    assert sides == {True, False}


@pytest.mark.parametrize("seed", [40, 41, 42])
def test_a_mass_is_a_labelled_lesion_over_30_mm_that_the_confounders_keep_clear_of(
    seed: int,
) -> None:
    kw = {"shape": CONF_SHAPE, "spacing_mm": CONF_SPACING, "n_nodules": 2, "confounders": True}
    without = make_phantom(seed, **kw)
    ph = make_phantom(seed, mass_chance=1.0, **kw)
    assert ph.nodules[:-1] == without.nodules
    mass = ph.nodules[-1]
    assert MASS_DIAMETERS_MM[0] <= mass.diameter_mm <= MASS_DIAMETERS_MM[1]
    assert mass.kind in ("solid", "part-solid") and mass.label == len(ph.nodules)
    # its label covers about the volume of its nominal sphere
    voxel = float(np.prod(ph.spacing_mm))
    sphere = 4 / 3 * np.pi * (mass.diameter_mm / 2) ** 3
    assert 0.5 < (ph.labels == mass.label).sum() * voxel / sphere < 1.5
    for c in ph.confounders:
        gap = np.linalg.norm(np.subtract(c.centre_xyz_mm, mass.centre_xyz_mm))
        assert gap > mass.diameter_mm / 2
    assert make_phantom(seed, mass_chance=0.0, **kw).nodules == without.nodules


def test_the_mass_chance_decides_per_seed_and_leaves_plain_phantoms_alone() -> None:
    kw = {"shape": CONF_SHAPE, "spacing_mm": CONF_SPACING, "n_nodules": 1}
    masses = [
        sum(
            n.diameter_mm >= MASS_DIAMETERS_MM[0]
            for n in make_phantom(s, mass_chance=0.5, **kw).nodules
        )
        for s in range(50, 58)
    ]
    assert set(masses) == {0, 1}
    assert all(n.diameter_mm < MASS_DIAMETERS_MM[0] for n in make_phantom(50, **kw).nodules)


def _face_fraction(seed: int, fade: bool) -> float:
    """Largest share of a face of the painted region's bounding box that an opacity of 60 mm
    painted in uniform lung covers: near 1 when it ends on the straight face of its box."""
    from models.phantom import _Grid, _paint_opacity

    n, sp = 120, 1.2
    ax = np.arange(n) * sp - n * sp / 2
    grid = _Grid(z=ax.copy(), y=ax.copy(), x=ax.copy(), spacing=(sp, sp, sp))
    lungs = np.ones((n, n, n), bool)
    hu = np.full((n, n, n), -860.0, np.float32)
    rng = np.random.default_rng(seed)
    _paint_opacity(rng, grid, lungs, hu, [], np.zeros(3), 60.0, fade)
    changed = hu > -859.0
    idx = np.argwhere(changed)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    region = changed[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    faces = [region[0], region[-1], region[:, 0], region[:, -1], region[:, :, 0], region[:, :, -1]]
    return max(float(f.mean()) for f in faces)


def test_opacity_model_2_fades_out_where_model_1_ends_on_its_box() -> None:
    # model 1's patchy margin reaches the box it is painted in: a straight face
    assert max(_face_fraction(s, fade=False) for s in range(4)) > 0.2
    assert max(_face_fraction(s, fade=True) for s in range(4)) < 0.1


def test_opacity_model_2_adds_satellite_foci_beside_the_large_opacities() -> None:
    from models.phantom import SATELLITE_MM, SATELLITE_PARENT_MM

    kw = {"shape": CONF_SHAPE, "spacing_mm": CONF_SPACING, "n_nodules": 2, "confounders": True}
    default, one = make_phantom(60, **kw), make_phantom(60, opacity_model=1, **kw)
    assert np.array_equal(default.volume_hu, one.volume_hu)
    with pytest.raises(ValueError, match="opacity_model"):
        make_phantom(60, opacity_model=3, **kw)
    small = 0
    for s in range(60, 66):
        plain = make_phantom(s, shape=CONF_SHAPE, spacing_mm=CONF_SPACING, n_nodules=2)
        ph = make_phantom(s, opacity_model=2, **kw)
        assert ph.nodules == plain.nodules and np.array_equal(ph.labels, plain.labels)
        again = make_phantom(s, opacity_model=2, **kw)
        assert np.array_equal(ph.volume_hu, again.volume_hu)
        assert ph.confounders == again.confounders
        opac = [c for c in ph.confounders if c.kind == "opacity"]
        parents = [c for c in opac if c.size_mm >= SATELLITE_PARENT_MM]
        for c in opac:
            if c.size_mm >= 12.0:
                continue
            small += 1
            assert SATELLITE_MM[0] <= c.size_mm <= SATELLITE_MM[1]
            gaps = [
                np.linalg.norm(np.subtract(c.centre_xyz_mm, p.centre_xyz_mm)) - p.size_mm / 2
                for p in parents
            ]
            assert min(gaps) < 20.0 + SATELLITE_MM[1]
            for n in ph.nodules:
                assert np.linalg.norm(np.subtract(c.centre_xyz_mm, n.centre_xyz_mm)) > (
                    n.diameter_mm / 2
                )
    assert small >= 3
