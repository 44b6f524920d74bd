"""Baseline/follow-up phantom pairs: the truth agrees with the label maps, the motion is as
drawn, the two DICOM studies belong to one patient, and a seed fixes everything."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.phantom import PhantomPair, make_phantom_pair, write_phantom_pair
from pipelines.comparison import Status
from pipelines.volume import build_volume

pytestmark = pytest.mark.unit

SHAPE = (72, 288, 288)
SPACING = (1.25, 1.0, 1.0)
#: Coarse enough to be quick, fine enough for the nodules to fit.
TINY_SHAPE, TINY_SPACING = (36, 144, 144), (2.5, 2.0, 2.0)


@pytest.fixture(scope="module")
def pair() -> PhantomPair:
    return make_phantom_pair(5, interval_days=200, shape=SHAPE, spacing_mm=SPACING)


def _label_volume(labels: np.ndarray, label: int | None, spacing: tuple[float, ...]) -> float:
    assert label is not None
    return float((labels == label).sum() * np.prod(spacing))


def test_a_pair_holds_one_nodule_of_each_planned_status(pair: PhantomPair) -> None:
    statuses = [n.status for n in pair.nodules]
    assert statuses == [Status.STABLE, Status.GROWN, Status.GROWN, Status.NEW, Status.RESOLVED]
    for n in pair.nodules:
        assert (n.baseline_label is None) == (n.status is Status.NEW)
        assert (n.followup_label is None) == (n.status is Status.RESOLVED)
    assert len(pair.baseline.nodules) == len(pair.followup.nodules) == 4


def test_label_volumes_match_the_declared_volumes_and_growth_factors(pair: PhantomPair) -> None:
    spacing = pair.baseline.spacing_mm
    for n in pair.nodules:
        if n.baseline_volume_mm3 is not None:
            got = _label_volume(pair.baseline.labels, n.baseline_label, spacing)
            assert got == pytest.approx(n.baseline_volume_mm3, rel=0.12)
        if n.followup_volume_mm3 is not None:
            got = _label_volume(pair.followup.labels, n.followup_label, spacing)
            assert got == pytest.approx(n.followup_volume_mm3, rel=0.12)
        if n.status in (Status.STABLE, Status.GROWN):
            measured = _label_volume(
                pair.followup.labels, n.followup_label, spacing
            ) / _label_volume(pair.baseline.labels, n.baseline_label, spacing)
            assert measured == pytest.approx(n.growth_factor, rel=0.15)


def test_grown_nodules_have_the_drawn_factors_and_doubling_times(pair: PhantomPair) -> None:
    for n in pair.nodules:
        if n.status is Status.GROWN:
            assert n.growth_factor is not None and 1.8 <= n.growth_factor <= 3.0
            expected = pair.interval_days * np.log(2.0) / np.log(n.growth_factor)
            assert n.doubling_time_days == pytest.approx(expected)
        else:
            assert n.doubling_time_days is None
        if n.status is Status.STABLE:
            assert n.growth_factor == pytest.approx(1.0)


def test_nodules_are_measurable_apart_and_where_the_labels_are(pair: PhantomPair) -> None:
    centres = []
    for phantom in (pair.baseline, pair.followup):
        origin = np.array(phantom.origin_mm)
        step = np.array(phantom.spacing_mm[::-1])
        for nodule in phantom.nodules:
            assert 6.0 <= nodule.diameter_mm <= 14.0
            assert nodule.kind == "solid" and nodule.location == "parenchymal"
            voxels = np.argwhere(phantom.labels == nodule.label)[:, ::-1]
            centroid = origin + voxels.mean(axis=0) * step
            assert np.allclose(centroid, nodule.centre_xyz_mm, atol=1.0)
    for n in pair.nodules:
        centre = n.baseline_centre_mm or pair.transform.to_prior(n.followup_centre_mm)
        centres.append(np.asarray(centre))
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]]
    assert min(gaps) >= 25.0


def test_the_follow_up_centres_are_the_moved_baseline_centres(pair: PhantomPair) -> None:
    for n in pair.nodules:
        if n.baseline_centre_mm is not None and n.followup_centre_mm is not None:
            moved = pair.transform.to_current(n.baseline_centre_mm)
            assert np.allclose(moved, n.followup_centre_mm)


def test_the_patient_moved_by_a_few_degrees_and_millimetres(pair: PhantomPair) -> None:
    assert 1.7 <= pair.transform.rotation_deg <= 7.0
    z = pair.baseline.origin_mm[2] + (SHAPE[0] - 1) * SPACING[0] / 2
    x0, y0 = pair.baseline.origin_mm[:2]
    centre = np.array(
        [x0 + (SHAPE[2] - 1) * SPACING[2] / 2, y0 + (SHAPE[1] - 1) * SPACING[1] / 2, z]
    )
    assert 5.0 <= np.linalg.norm(pair.transform.to_prior(centre) - centre) <= 20.0
    assert not np.array_equal(pair.baseline.volume_hu, pair.followup.volume_hu)


def test_the_same_seed_gives_the_same_pair() -> None:
    a, b, other = (make_phantom_pair(s, 100, TINY_SHAPE, TINY_SPACING) for s in (8, 8, 9))
    assert np.array_equal(a.baseline.volume_hu, b.baseline.volume_hu)
    assert np.array_equal(a.followup.volume_hu, b.followup.volume_hu)
    assert np.array_equal(a.followup.labels, b.followup.labels)
    assert a.nodules == b.nodules and a.transform == b.transform
    assert other.transform != a.transform
    assert not np.array_equal(other.baseline.volume_hu, a.baseline.volume_hu)


def test_the_two_studies_are_one_patient_with_different_uids_and_dates(
    pair: PhantomPair, tmp_path: Path
) -> None:
    baseline, followup = write_phantom_pair(pair, tmp_path / "a")
    first = pydicom.dcmread(baseline[0])
    second = pydicom.dcmread(followup[0])
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
        assert first.get(keyword) == second.get(keyword)
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "SOPInstanceUID",
    ):
        assert first.get(keyword) != second.get(keyword)
    assert first.AccessionNumber != second.AccessionNumber
    dates = [dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date() for ds in (first, second)]
    assert (dates[1] - dates[0]).days == pair.interval_days
    assert second.SeriesDate == second.ContentDate == second.StudyDate
    again, _ = write_phantom_pair(pair, tmp_path / "b")
    assert pydicom.dcmread(again[0]).StudyInstanceUID == first.StudyInstanceUID


def test_the_written_follow_up_reads_back_with_its_geometry(
    pair: PhantomPair, tmp_path: Path
) -> None:
    _, followup = write_phantom_pair(pair, tmp_path)
    volume = build_volume(followup)
    assert volume.hu.shape == SHAPE
    assert np.allclose(volume.origin_mm, pair.followup.origin_mm, atol=1e-3)
    assert np.array_equal(volume.hu, pair.followup.volume_hu.astype(np.float32))
