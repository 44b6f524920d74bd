"""SEG, SR (TID 1500) and GSPS for LIDC-IDRI-0001 and a synthetic study pass ``dciodvfy``.

Nodules come from the LIDC readers' contours (``069.xml``, as the issue allows) and from the
phantom's label map. Every written object is validated with dicom3tools' ``dciodvfy``; each
``Error -`` line must be in :data:`INHERITED_ERRORS` (errors copied from the source's attributes,
each explained), warnings are printed (``pytest -s``) so they stay visible.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO

from dicom_node.delivery import rejected_instances
from dicom_node.results import ModelIdentity, ResultObject, ResultSet
from models.phantom import make_phantom, write_dicom_series
from pipelines.findings import Nodule
from pipelines.outputs import KIND_BY_SOP_CLASS, encode_results
from pipelines.volume import Volume, build_volume
from tests.helpers import dciodvfy
from tests.nodule_fixtures import grid_mask_to_nodule, lidc_nodules

MODEL = ModelIdentity("noduleai-detector", "1.0.0")
#: The LIDC readers' nodule: centre (LPS mm) per ../shared/data/README.md.
LIDC_NODULE_MM = np.array([55.5, 85.6, -116.1])

#: dciodvfy errors allowed in what we write, each copied from the source's own attributes.
#: Empty: our objects do not copy the attributes the LIDC source gets wrong (its slices lack the
#: Type 2 AcquisitionNumber of the CT Image module, which no SEG/SR/PR module has; its empty
#: StudyTime/StudyID only give DICOMDIR *warnings*, which are copied into the study module of
#: every derived object and listed below as warnings). Add a pattern here only with the source
#: attribute it comes from.
INHERITED_ERRORS: dict[str, str] = {}

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed"
)


@dataclass
class Study:
    """One encoded study: the sources, the volume, the nodules and what was written."""

    paths: list[Path]
    volume: Volume
    nodules: list[Nodule]
    objects: list[Dataset]
    files: dict[str, Path]


def _write(objects: list[Dataset], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for ds in objects:
        path = folder / f"{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[str(ds.Modality)] = path
    return files


def _assert_no_errors_of_ours(path: Path) -> None:
    errors, warnings = dciodvfy(path)
    print(
        f"\ndciodvfy {path.parent.name}/{path.name}: {len(errors)} errors, {len(warnings)} warnings"
    )
    for line in warnings:
        print("  ", line)
    ours = [e for e in errors if not any(re.search(p, e) for p in INHERITED_ERRORS)]
    assert not ours, f"dciodvfy errors in {path.name}: {ours}"


@pytest.fixture(scope="module")
def lidc(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Study:
    folder = next((shared_data / "lidc-idri-0001").glob("*/*"))
    paths = sorted(folder.glob("*.dcm"))
    volume = build_volume(paths)
    nodules = lidc_nodules(folder / "069.xml", volume)
    objects = encode_results(paths, volume, nodules, MODEL).datasets
    return Study(paths, volume, nodules, objects, _write(objects, tmp_path_factory.mktemp("lidc")))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Study:
    ph = make_phantom(
        11, shape=(32, 256, 256), spacing_mm=(2.0, 1.4, 1.4), n_nodules=2, fov_padding=False
    )
    paths = write_dicom_series(
        ph.volume_hu, ph.spacing_mm, tmp_path_factory.mktemp("phantom-ct"), 11, ph.origin_mm
    )
    volume = build_volume(paths)
    nodules = [
        grid_mask_to_nodule(ph.labels == n.label, volume, probability=p)
        for n, p in zip(ph.nodules, (0.55, 0.97), strict=True)
    ]
    objects = encode_results(paths, volume, nodules, MODEL).datasets
    folder = tmp_path_factory.mktemp("phantom-results")
    return Study(paths, volume, nodules, objects, _write(objects, folder))


@pytest.fixture(scope="module")
def negative(lidc: Study, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    objects = encode_results(lidc.paths, lidc.volume, [], MODEL).datasets
    assert [ds.Modality for ds in objects] == ["SR"]
    yield _write(objects, tmp_path_factory.mktemp("negative"))["SR"]


@needs_dciodvfy
@pytest.mark.parametrize("modality", ["SEG", "SR", "PR", "OT"])
def test_lidc_results_pass_dciodvfy_with_no_errors_of_ours(lidc: Study, modality: str) -> None:
    _assert_no_errors_of_ours(lidc.files[modality])


@needs_dciodvfy
@pytest.mark.parametrize("modality", ["SEG", "SR", "PR", "OT"])
def test_phantom_results_pass_dciodvfy_with_no_errors_of_ours(
    phantom: Study, modality: str
) -> None:
    _assert_no_errors_of_ours(phantom.files[modality])


@needs_dciodvfy
def test_negative_report_passes_dciodvfy_and_says_nothing_was_found(negative: Path) -> None:
    _assert_no_errors_of_ours(negative)
    root = dcmread(negative)
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in root.ContentSequence]
    assert "126010" not in names  # no (empty) Imaging Measurements container
    summary = root.ContentSequence[-1].ContentSequence[0]
    assert summary.ConceptCodeSequence[0].CodeValue == "111241"  # without findings


def test_the_lidc_source_itself_has_the_errors_we_do_not_copy(lidc: Study) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed")
    errors, _ = dciodvfy(lidc.paths[0])
    assert any("AcquisitionNumber" in e for e in errors)


def _ipp(ds: Dataset) -> np.ndarray:
    return np.asarray([float(v) for v in ds.ImagePositionPatient])


@pytest.mark.parametrize("study", ["lidc", "phantom"])
def test_seg_frames_lie_on_the_source_slices_without_gaps(
    study: str, request: pytest.FixtureRequest
) -> None:
    """Each segment has one frame per slice its nodule touches, on that slice; no empty frame."""
    data: Study = request.getfixturevalue(study)
    seg = dcmread(data.files["SEG"])
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    assert frames.reshape(len(frames), -1).any(axis=1).all(), "an empty frame was written"
    sources = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, data.paths)}
    slices_per_segment: dict[int, list[float]] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        source = sources[ref.ReferencedSOPInstanceUID]
        position = np.asarray(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        )
        assert np.allclose(position, _ipp(source), atol=1e-3)
        # highdicom moves SegmentIdentificationSequence to the shared group for one segment
        group = frame if "SegmentIdentificationSequence" in frame else shared
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        slices_per_segment.setdefault(number, []).append(position[2])
    assert sorted(slices_per_segment) == list(range(1, len(data.nodules) + 1))
    dz = data.volume.spacing_mm[0]
    for zs in slices_per_segment.values():
        steps = np.diff(sorted(zs))
        assert np.allclose(steps, dz, atol=1e-3), "a segment's frames have a gap"


def _scoords(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        if child.ValueType == "SCOORD":
            yield child
        yield from _scoords(child)


def test_sr_outline_is_closed_inside_the_image_and_around_the_lidc_nodule(lidc: Study) -> None:
    sr = dcmread(lidc.files["SR"])
    outlines = list(_scoords(sr))
    assert len(outlines) == len(lidc.nodules) == 1
    scoord = outlines[0]
    assert scoord.GraphicType == "POLYLINE"
    points = np.asarray(scoord.GraphicData, dtype=np.float64).reshape(-1, 2)
    assert np.array_equal(points[0], points[-1])
    image_ref = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    image = next(ds for ds in map(dcmread, lidc.paths) if ds.SOPInstanceUID == image_ref)
    rows, cols = int(image.Rows), int(image.Columns)
    assert (points[:, 0] >= 0).all() and (points[:, 0] <= cols).all()
    assert (points[:, 1] >= 0).all() and (points[:, 1] <= rows).all()
    dr, dc = (float(v) for v in image.PixelSpacing)
    centre_px = points[:-1].mean(axis=0) - 0.5  # image coordinates -> pixel indices
    centre_mm = _ipp(image) + np.array([centre_px[0] * dc, centre_px[1] * dr, 0.0])
    assert np.linalg.norm(centre_mm - LIDC_NODULE_MM) < 8.0
    extent_mm = (points.max(axis=0) - points.min(axis=0)) * (dc, dr)
    assert 15.0 < extent_mm.max() < 45.0  # the nodule is about 28 x 34 mm


def _measurements(sr: Dataset) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}

    def walk(item: Dataset) -> None:
        for child in item.get("ContentSequence", []):
            if child.ValueType == "NUM":
                code = child.ConceptNameCodeSequence[0]
                name = f"{code.CodingSchemeDesignator}:{code.CodeValue}"
                found.setdefault(name, []).append(
                    float(child.MeasuredValueSequence[0].NumericValue)
                )
            walk(child)

    walk(sr)
    return found


def test_sr_carries_diameters_volume_hu_and_probability_per_nodule(phantom: Study) -> None:
    sr = dcmread(phantom.files["SR"])
    values = _measurements(sr)
    # long axis, short axis, volume, attenuation coefficient (mean), certainty of finding
    for name in ("SCT:103339001", "SCT:103340004", "SCT:118565006", "DCM:112031", "DCM:111012"):
        assert len(values[name]) == len(phantom.nodules), name
    assert sorted(values["DCM:111012"]) == [55.0, 97.0]
    # measured on the drawn outline (stored pixels), as every output reports them
    reported = encode_results(phantom.paths, phantom.volume, phantom.nodules, MODEL).nodules
    expected = sorted(round(n.long_axis_mm, 2) for n in reported)
    assert sorted(values["SCT:103339001"]) == pytest.approx(expected)


def _planar_groups(sr: Dataset) -> list[tuple[np.ndarray, float, float, str]]:
    """Per TID 1410 group: polyline (column, row), long axis, short axis, referenced image."""
    groups = []
    for item in sr.ContentSequence:
        for group in item.get("ContentSequence", []):
            if group.get("ValueType") != "CONTAINER":
                continue
            values = {str(c.ConceptNameCodeSequence[0].CodeValue): c for c in group.ContentSequence}
            scoord = next(
                (c for c in group.ContentSequence if c.get("ValueType") == "SCOORD"), None
            )
            if scoord is None:
                continue
            points = np.asarray(scoord.GraphicData, dtype=np.float64).reshape(-1, 2)
            image = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            long_axis = float(values["103339001"].MeasuredValueSequence[0].NumericValue)
            short_axis = float(values["103340004"].MeasuredValueSequence[0].NumericValue)
            groups.append((points, long_axis, short_axis, str(image)))
    return groups


@pytest.mark.parametrize("name", ["lidc", "phantom"])
def test_the_sr_axes_are_measured_on_the_polyline_it_draws(
    name: str, request: pytest.FixtureRequest
) -> None:
    """A reader measuring the drawn outline gets the stated long axis (to 0.1 mm) and a short
    axis no longer than the outline's extent across it; findings carry the same values."""
    study: Study = request.getfixturevalue(name)
    sr = dcmread(study.files["SR"])
    spacing = {
        str(ds.SOPInstanceUID): [float(v) for v in ds.PixelSpacing]
        for ds in (dcmread(p, stop_before_pixels=True) for p in study.paths)
    }
    groups = _planar_groups(sr)
    assert len(groups) == len(study.nodules)
    reported = encode_results(study.paths, study.volume, study.nodules, MODEL).nodules
    for (points, long_axis, short_axis, image), nodule in zip(groups, reported, strict=True):
        row_mm, column_mm = spacing[image]
        mm = points * np.array([column_mm, row_mm])
        chords = np.sqrt(((mm[:, None, :] - mm[None, :, :]) ** 2).sum(-1))
        assert long_axis == pytest.approx(float(chords.max()), abs=0.1)
        assert 0 < short_axis <= long_axis
        assert (nodule.long_axis_mm, nodule.short_axis_mm) == pytest.approx(
            (long_axis, short_axis), abs=0.01
        )


def test_seg_and_sr_share_the_nodules_tracking_uids(phantom: Study) -> None:
    seg = dcmread(phantom.files["SEG"])
    sr = dcmread(phantom.files["SR"])
    seg_uids = {str(s.TrackingUID) for s in seg.SegmentSequence}
    sr_uids: set[str] = set()

    def walk(item: Dataset) -> None:
        for child in item.get("ContentSequence", []):
            if child.ValueType == "UIDREF":
                sr_uids.add(str(child.UID))
            walk(child)

    walk(sr)
    assert seg_uids and seg_uids <= sr_uids


def _as_result(objects: list[Dataset], model: ModelIdentity = MODEL) -> ResultSet:
    """What the worker would have stored for ``objects`` (only the fields revision reads)."""
    stored = tuple(
        ResultObject(
            kind=KIND_BY_SOP_CLASS[str(ds.SOPClassUID)],
            modality=str(ds.Modality),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            path=f"{ds.Modality}.dcm",
        )
        for ds in objects
    )
    number = int(objects[0].InstanceNumber)
    return ResultSet("job", "", "", model, (), 0, stored, "", 0, "", instance_number=number)


def _without_notes(objects: list[Dataset]) -> list[Dataset]:
    return [ds for ds in objects if ds.Modality != "KO"]


def _bytes(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_reprocessing_gives_identical_uids_and_late_instances_new_ones(phantom: Study) -> None:
    again = encode_results(phantom.paths, phantom.volume, phantom.nodules, MODEL).datasets
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in phantom.objects]
    first_sr = phantom.objects[1]
    # an earlier run saw one slice fewer; the late slice makes a new instance set
    earlier_volume = build_volume(phantom.paths[:-1])
    earlier = encode_results(phantom.paths[:-1], earlier_volume, [], MODEL).datasets
    assert earlier[0].SOPInstanceUID != first_sr.SOPInstanceUID
    assert earlier[0].SeriesInstanceUID == first_sr.SeriesInstanceUID
    rerun = encode_results(
        phantom.paths, phantom.volume, phantom.nodules, MODEL, history=[_as_result(earlier)]
    ).datasets
    predecessor = rerun[1].PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == first_sr.StudyInstanceUID
    ref = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == earlier[0].SOPInstanceUID


@needs_dciodvfy
def test_a_replacing_result_is_the_next_revision_and_rejects_the_earlier_objects(
    phantom: Study, tmp_path: Path
) -> None:
    """Late slice: new UIDs, InstanceNumber 2, an IOCM rejection note of the earlier objects
    (which passes dciodvfy); the same job again: the same bytes; a model rolled back to the
    first one's version: revision 3 under new UIDs, never the first result's UIDs again."""
    earlier_volume = build_volume(phantom.paths[:-1])
    first = encode_results(phantom.paths[:-1], earlier_volume, phantom.nodules, MODEL)
    # SEG, SR, GSPS carry the revision; key images the finding number
    assert [int(ds.InstanceNumber) for ds in first.datasets] == [1, 1, 1, 1, 2]
    history = [_as_result(first.datasets)]

    created = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)  # the worker: when the input was complete
    second = encode_results(
        phantom.paths, phantom.volume, phantom.nodules, MODEL, history=history, created=created
    )

    *objects, note = second.datasets
    assert [ds.Modality for ds in objects] == ["SEG", "SR", "PR", "OT", "OT"]
    assert note.Modality == "KO"
    assert [int(ds.InstanceNumber) for ds in second.datasets] == [2, 2, 2, 1, 2, 2]
    old_uids = [str(ds.SOPInstanceUID) for ds in first.datasets]
    assert not {str(ds.SOPInstanceUID) for ds in objects} & set(old_uids)
    assert [ds.SeriesInstanceUID for ds in objects] == [
        ds.SeriesInstanceUID for ds in first.datasets
    ]
    assert second.instance_number == 2 and sorted(second.retracted) == sorted(old_uids)
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    assert sorted(rejected_instances(note)) == sorted(old_uids)
    assert note.StudyInstanceUID == objects[0].StudyInstanceUID
    path = tmp_path / "KO.dcm"
    note.save_as(path, enforce_file_format=True)
    _assert_no_errors_of_ours(path)

    redelivered = encode_results(
        phantom.paths, phantom.volume, phantom.nodules, MODEL, history=history, created=created
    )
    assert [_bytes(ds) for ds in redelivered.datasets] == [_bytes(ds) for ds in second.datasets]
    same_again = encode_results(
        phantom.paths,
        phantom.volume,
        phantom.nodules,
        MODEL,
        history=[*history, _as_result(_without_notes(second.datasets))],
        created=created,
    )
    assert [_bytes(ds) for ds in same_again.datasets] == [_bytes(ds) for ds in second.datasets]

    newer = ModelIdentity(MODEL.name, "2.0.0")
    by_newer = encode_results(
        phantom.paths, phantom.volume, phantom.nodules, newer, history=history
    )
    back = encode_results(
        phantom.paths,
        phantom.volume,
        phantom.nodules,
        MODEL,
        history=[*history, _as_result(_without_notes(by_newer.datasets), newer)],
    )
    assert int(back.datasets[1].InstanceNumber) == 3
    assert str(back.datasets[1].SOPInstanceUID) != str(phantom.objects[1].SOPInstanceUID)


@needs_dciodvfy
def test_enhanced_ct_frames_are_referenced_by_number_and_flips_are_undone(
    shared_data: Path, tmp_path: Path
) -> None:
    """A multi-frame source whose rows run right-to-left (Volume flips it) still gets masks
    and outlines where the nodule is in patient space, on the stored columns."""
    path = shared_data / "transfer-syntaxes" / "CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"
    volume = build_volume([path], min_slices=2)
    assert "flipped_row_direction" in volume.corrections
    grid = np.zeros(volume.hu.shape, dtype=bool)
    grid[:, 200:230, 300:330] = True  # canonical [z, y, x]: off-centre, so a wrong flip shows
    nodule = grid_mask_to_nodule(grid, volume)
    objects = encode_results([path], volume, [nodule], MODEL).datasets
    files = _write(objects, tmp_path)
    for modality in ("SEG", "SR", "PR"):
        _assert_no_errors_of_ours(files[modality])
    seg = dcmread(files["SEG"])
    source = dcmread(path, stop_before_pixels=True)
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    number = int(ref.ReferencedFrameNumber)
    src_frame = source.PerFrameFunctionalGroupsSequence[number - 1]
    shared = source.SharedFunctionalGroupsSequence[0]
    ipp = np.asarray([float(v) for v in src_frame.PlanePositionSequence[0].ImagePositionPatient])
    assert np.allclose(
        [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], ipp, atol=1e-3
    )
    iop = np.asarray([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    dc = float(shared.PixelMeasuresSequence[0].PixelSpacing[1])
    columns = np.nonzero(seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)[0].any(axis=0))[0]
    world_x = ipp[0] + columns * dc * iop[0]
    x_lo = volume.origin_mm[0] + 299.5 * volume.spacing_mm[2]
    x_hi = volume.origin_mm[0] + 329.5 * volume.spacing_mm[2]
    assert world_x.min() >= x_lo - 1.0 and world_x.max() <= x_hi + 1.0


def test_every_object_describes_its_series_and_the_sr_declares_its_private_scheme(
    lidc: Study,
) -> None:
    seg, sr, pr = (dcmread(lidc.files[m]) for m in ("SEG", "SR", "PR"))
    assert [ds.SeriesDescription for ds in (seg, sr, pr)] == [
        "NoduleAI nodule segmentation",
        "NoduleAI nodule report",
        "NoduleAI nodule outlines",
    ]
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99NODULEAI"
    assert scheme.CodingSchemeResponsibleOrganization == "NoduleAI"
