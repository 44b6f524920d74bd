"""Volume building: geometry, HU, corrections and rejections on real and synthetic CT series."""

from __future__ import annotations

import math
import random
import shutil
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.errors import StudyRejectedError
from pipelines.geometry import FILL_HU
from pipelines.pixels import read_hu
from pipelines.volume import SourceFrame, Volume, build_volume

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SIZE = 24


def field_hu(x: npt.ArrayLike, y: npt.ArrayLike, z: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """A linear HU field of patient position: any linear interpolation reproduces it exactly."""
    return 10.0 * np.asarray(x) + 20.0 * np.asarray(y) + 7.0 * np.asarray(z)


def plane_pixels(
    position: Sequence[float],
    orientation: Sequence[float],
    spacing: float,
    shape: tuple[int, int] = (SIZE, SIZE),
) -> npt.NDArray[np.float64]:
    """HU of every pixel of an image plane (PS3.3 C.7.6.2.1.1 pixel-to-patient mapping)."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    j, i = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    world = (
        np.asarray(position)[:, None, None]
        + row[:, None, None] * i * spacing
        + col[:, None, None] * j * spacing
    )
    return field_hu(world[0], world[1], world[2])


def base_dataset(**attrs: object) -> Dataset:
    """A CT Image header with the study/series attributes every synthetic slice shares."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.ConvolutionKernel = "STANDARD"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def write_slice(
    path: Path,
    position: Sequence[float],
    *,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 1.0,
    hu: npt.NDArray[np.float64] | None = None,
    thickness: float = 2.0,
    **attrs: object,
) -> Path:
    """One single-frame CT slice whose HU is :func:`field_hu` at its pixels (or ``hu``)."""
    ds = base_dataset(**attrs)
    ds.SOPInstanceUID = str(attrs.get("SOPInstanceUID", generate_uid()))
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = thickness
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if hu is None:
        hu = plane_pixels(position, orientation, spacing, (int(ds.Rows), int(ds.Columns)))
    ds.PixelData = (np.round(hu) + 1024).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path, positions: Sequence[Sequence[float]], **kwargs: object
) -> list[Path]:
    """A synthetic series, one file per position, named so that file order is not z order."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_slice(folder / f"{n:03d}-{random.random():.6f}.dcm", p, **kwargs)  # type: ignore[arg-type]
        for n, p in enumerate(positions)
    ]


def axial_positions(
    count: int, step: float = 2.0, z0: float = -20.0, x0: float = -12.0, y0: float = -10.0
) -> list[tuple[float, float, float]]:
    return [(x0, y0, z0 + k * step) for k in range(count)]


def canonical_world(volume: Volume) -> tuple[npt.NDArray[np.float64], ...]:
    """LPS coordinates of every voxel under the Volume convention (origin + index * spacing)."""
    dz, dy, dx = volume.spacing_mm
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in volume.hu.shape), indexing="ij")
    ox, oy, oz = volume.origin_mm
    return ox + x * dx, oy + y * dy, oz + z * dz


def assert_matches_field(volume: Volume, inner: int = 0) -> None:
    x, y, z = canonical_world(volume)
    expected = field_hu(x, y, z)
    box = tuple(slice(inner, n - inner if inner else None) for n in volume.hu.shape)
    np.testing.assert_allclose(volume.hu[box], expected[box], atol=1.0)


def rejection(call: Callable[[], object]) -> StudyRejectedError:
    with pytest.raises(StudyRejectedError) as info:
        call()
    return info.value


# ---------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def lidc_small(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "lidc-small").rglob("*.dcm"))


def test_lidc_small_builds_sixteen_axial_slices_with_the_scanner_geometry(
    lidc_small: list[Path],
) -> None:
    volume = build_volume(lidc_small)
    assert volume.hu.shape == (16, 512, 512)
    assert volume.hu.dtype == np.float32
    assert volume.spacing_mm == pytest.approx((2.5, 0.703125, 0.703125))
    assert volume.origin_mm == pytest.approx((-166.0, -171.699997, -132.5))
    assert volume.orientation == AXIAL
    assert volume.corrections == []
    assert len(volume.sop_instance_uids) == 16
    assert (volume.rows, volume.columns, volume.slice_thickness) == (512, 512, 2.5)
    assert volume.hu.min() == -2048.0  # field-of-view padding, as the data README says


def test_lidc_voxel_indices_map_to_patient_mm_at_the_readers_nodule(lidc_small: list[Path]) -> None:
    volume = build_volume(lidc_small)
    centre = (55.5, 85.6, -116.1)
    dz, dy, dx = volume.spacing_mm
    ox, oy, oz = volume.origin_mm
    i, j, k = (
        round((centre[0] - ox) / dx),
        round((centre[1] - oy) / dy),
        round((centre[2] - oz) / dz),
    )
    assert (i, j, k) == (315, 366, 7)
    source = volume.source_positions[k]
    assert source is not None
    stored = next(p for p in lidc_small if p.name == "-115.000000.dcm")
    ds = pydicom.dcmread(stored)
    assert source == SourceFrame(ds.SOPInstanceUID, None)
    np.testing.assert_array_equal(volume.hu[k], ds.pixel_array.astype(np.float32) - 1024)
    assert (
        float(np.median(volume.hu[k - 1 : k + 2, j - 3 : j + 4, i - 3 : i + 4])) > 0
    )  # solid nodule
    assert float(np.median(volume.hu[k, j, i - 45 : i - 20])) < -800  # aerated lung to its right


def test_shuffled_file_order_builds_the_same_volume(lidc_small: list[Path]) -> None:
    shuffled = list(lidc_small)
    random.Random(4).shuffle(shuffled)
    a, b = build_volume(lidc_small), build_volume(shuffled[::-1])
    np.testing.assert_array_equal(a.hu, b.hu)
    assert (a.origin_mm, a.source_positions) == (b.origin_mm, b.source_positions)


def test_full_lidc_series_builds_without_holding_more_than_the_volume_in_memory(
    shared_data: Path,
) -> None:
    paths = [p for p in (shared_data / "lidc-idri-0001").rglob("*.dcm")]
    tracemalloc.start()
    try:
        volume = build_volume(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert volume.hu.shape == (133, 512, 512)
    assert volume.origin_mm[2] == pytest.approx(-340.0)
    assert peak < volume.hu.nbytes + 24 * 2**20


def test_jpeg2000_series_without_uids_decodes_with_file_meta_instance_uids(
    shared_data: Path,
) -> None:
    volume = build_volume(sorted((shared_data / "jpeg2000-ct").iterdir()))
    assert volume.hu.shape == (20, 512, 512)
    assert volume.spacing_mm == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.origin_mm[2] == pytest.approx(-804.5)
    assert volume.series_instance_uid == ""
    assert all(uid.startswith("1.3.12.2.1107.5.1.4.60064") for uid in volume.sop_instance_uids)
    assert float(volume.hu.min()) >= -1024.0 and float(volume.hu.max()) > 1000


def _own_hu(path: Path) -> npt.NDArray[np.float32]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return read_hu(path, None, float(ds.RescaleSlope), float(ds.RescaleIntercept))


LOSSLESS = [
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.5",
]


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_transfer_syntaxes_decode_to_exactly_the_original_hu(
    shared_data: Path, syntax: str
) -> None:
    folder = shared_data / "transfer-syntaxes"
    (path,) = folder.glob(f"CTImage.dcm_*_{syntax}.dcm")
    np.testing.assert_array_equal(_own_hu(path), _own_hu(folder / "CTImage.dcm"))


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.50",
    ],
)
def test_lossy_transfer_syntaxes_decode_close_to_the_original_hu(
    shared_data: Path, syntax: str
) -> None:
    folder = shared_data / "transfer-syntaxes"
    (path,) = folder.glob(f"CTImage.dcm_*_{syntax}.dcm")
    error = np.abs(_own_hu(path) - _own_hu(folder / "CTImage.dcm"))
    assert float(error.mean()) < 20.0


@pytest.mark.parametrize("name", ["CT1_J2KR", "CT2_J2KR"])
def test_nema_jpeg2000_lossless_ct_slices_decode(shared_data: Path, name: str) -> None:
    assert _own_hu(shared_data / "transfer-syntaxes" / name).shape == (512, 512)


def test_jpeg_syntaxes_that_need_gdcm_are_rejected_as_undecodable(shared_data: Path) -> None:
    (path,) = (shared_data / "transfer-syntaxes").glob("CTImage.dcm_*_1.2.840.10008.1.2.4.53.dcm")
    assert rejection(lambda: read_hu(path, None, 1.0, 0.0)).code == "undecodable_pixel_data"


def test_enhanced_ct_multiframe_builds_with_rescale_from_the_functional_groups(
    shared_data: Path,
) -> None:
    path = shared_data / "transfer-syntaxes" / "CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"
    volume = build_volume([path], min_slices=2)
    assert volume.hu.shape == (2, 512, 512)
    assert volume.spacing_mm == pytest.approx((10.0, 0.388672, 0.388672))
    # Row cosine -x: flipped so that x increases to the patient's left.
    assert volume.origin_mm == pytest.approx((99.5 - 511 * 0.388672, -301.5, -159.0))
    assert "flipped_row_direction" in volume.corrections
    assert "lossy_compressed_source" in volume.corrections
    uid = volume.sop_instance_uids[0]
    assert volume.source_positions == [SourceFrame(uid, 1), SourceFrame(uid, 2)]
    stored = pydicom.pixels.pixel_array(str(path), index=0).astype(np.float32)
    np.testing.assert_array_equal(volume.hu[0], (stored - 1024)[:, ::-1])


@pytest.mark.parametrize(
    ("name", "code"),
    [("no-pixel-data.dcm", "no_pixel_data"), ("no-pixel-spacing.dcm", "no_pixel_spacing")],
)
def test_instances_without_pixels_or_spacing_are_rejected(
    shared_data: Path, name: str, code: str
) -> None:
    path = shared_data / "transfer-syntaxes" / name
    assert rejection(lambda: build_volume([path] * 3)).code == code


def test_malformed_placeholder_slices_are_rejected_for_lack_of_a_frame_of_reference(
    shared_data: Path,
) -> None:
    paths = sorted((shared_data / "malformed").glob("*.dcm"))
    error = rejection(lambda: build_volume(paths, min_slices=2))
    assert error.code == "no_frame_of_reference"


# ---------------------------------------------------------------------- synthetic series


def test_synthetic_series_matches_its_patient_space_field(tmp_path: Path) -> None:
    volume = build_volume(write_series(tmp_path, axial_positions(6)))
    assert volume.origin_mm == pytest.approx((-12.0, -10.0, -20.0))
    assert volume.spacing_mm == pytest.approx((2.0, 1.0, 1.0))
    assert_matches_field(volume)


def test_three_slices_build_but_two_are_too_few(tmp_path: Path) -> None:
    paths = write_series(tmp_path, axial_positions(3))
    assert build_volume(paths).hu.shape[0] == 3
    assert rejection(lambda: build_volume(paths[:2])).code == "too_few_slices"


def test_an_identical_duplicate_slice_is_dropped_with_a_note(tmp_path: Path) -> None:
    paths = write_series(tmp_path, axial_positions(5))
    copy = shutil.copy(paths[2], tmp_path / "copy.dcm")
    volume = build_volume([*paths, Path(copy)])
    assert volume.hu.shape[0] == 5
    assert any(c.startswith("duplicate_dropped:") for c in volume.corrections)
    assert_matches_field(volume)


def test_conflicting_duplicate_positions_are_rejected(tmp_path: Path) -> None:
    paths = write_series(tmp_path, axial_positions(5))
    other = write_slice(
        tmp_path / "other.dcm", axial_positions(5)[3], hu=np.full((SIZE, SIZE), 40.0)
    )
    error = rejection(lambda: build_volume([*paths, other]))
    assert error.code == "duplicate_positions"


def test_a_missing_slice_is_rejected_with_where_it_is(tmp_path: Path) -> None:
    positions = axial_positions(8)
    del positions[4]
    error = rejection(lambda: build_volume(write_series(tmp_path, positions)))
    assert error.code == "missing_slices"
    assert "-14.00 and -10.00 mm" in error.detail


def test_a_missing_slice_is_interpolated_when_configured(tmp_path: Path) -> None:
    positions = axial_positions(8)
    del positions[4]
    volume = build_volume(write_series(tmp_path, positions), resample_gaps=True)
    assert volume.hu.shape[0] == 8
    assert volume.source_positions[4] is None and volume.source_positions[3] is not None
    assert any(c.startswith("resampled_missing_slices") for c in volume.corrections)
    assert_matches_field(volume)


def test_uneven_spacing_is_resampled_to_the_median_spacing(tmp_path: Path) -> None:
    zs = [0.0, 2.0, 4.0, 6.6, 8.0, 10.0, 12.0]
    volume = build_volume(write_series(tmp_path, [(-12.0, -10.0, z) for z in zs]))
    assert volume.spacing_mm[0] == pytest.approx(2.0)
    assert volume.hu.shape[0] == 7
    assert any(c.startswith("resampled_uneven_spacing") for c in volume.corrections)
    assert_matches_field(volume)


def test_spacing_too_uneven_to_resample_is_rejected(tmp_path: Path) -> None:
    zs = [0.0, 2.0, 4.0, 4.5, 6.5, 8.5, 10.5]
    error = rejection(lambda: build_volume(write_series(tmp_path, [(0.0, 0.0, z) for z in zs])))
    assert error.code == "uneven_spacing"


def test_positions_drifting_in_plane_are_sheared_back_as_gantry_tilt(tmp_path: Path) -> None:
    tilt = math.radians(15.0)
    positions = [(-12.0, -10.0 + k * 2.0 * math.tan(tilt), -20.0 + k * 2.0) for k in range(8)]
    volume = build_volume(write_series(tmp_path, positions, GantryDetectorTilt=15.0))
    assert volume.hu.shape == (8, SIZE, SIZE)
    assert "gantry_tilt_corrected:15.00deg" in volume.corrections
    assert volume.origin_mm == pytest.approx((-12.0, -10.0, -20.0))
    assert volume.source_positions[7] is not None
    # The last slice lies 3.75 mm further posterior: the grid keeps the first slice's field, so
    # its first rows were never scanned and hold air.
    x, y, z = canonical_world(volume)
    np.testing.assert_allclose(volume.hu[:, 4:], field_hu(x, y, z)[:, 4:], atol=1.0)
    assert float(volume.hu[7, 0, 0]) == FILL_HU


def test_a_tilted_image_plane_is_resampled_onto_an_axial_grid(tmp_path: Path) -> None:
    tilt = math.radians(8.0)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), math.sin(tilt))
    positions = axial_positions(12)
    volume = build_volume(
        write_series(tmp_path, positions, orientation=orientation, GantryDetectorTilt=8.0)
    )
    assert any(c.startswith("resampled_to_axial_grid") for c in volume.corrections)
    assert volume.spacing_mm == pytest.approx((2.0, 1.0, 1.0))
    assert all(source is None for source in volume.source_positions)
    assert_matches_field(volume, inner=4)


def test_gantry_tilt_beyond_thirty_degrees_is_rejected(tmp_path: Path) -> None:
    tilt = math.radians(35.0)
    positions = [(0.0, k * 2.0 * math.tan(tilt), k * 2.0) for k in range(5)]
    error = rejection(lambda: build_volume(write_series(tmp_path, positions)))
    assert error.code == "gantry_tilt"


@pytest.mark.parametrize(
    "orientation",
    [
        (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
        (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
        (0.0, 1.0, 0.0, 1.0, 0.0, 0.0),
        (0.0, -1.0, 0.0, 1.0, 0.0, 0.0),
    ],
)
def test_axis_aligned_orientations_are_canonicalised_to_lps(
    tmp_path: Path, orientation: tuple[float, ...]
) -> None:
    volume = build_volume(
        write_series(tmp_path, axial_positions(5, x0=10.0, y0=8.0), orientation=orientation)
    )
    assert volume.orientation == orientation
    assert volume.hu.shape == (5, SIZE, SIZE)
    assert_matches_field(volume)
    assert not any(c.startswith("resampled") for c in volume.corrections)


def test_feet_first_stacks_still_come_out_in_increasing_z(tmp_path: Path) -> None:
    paths = write_series(tmp_path, axial_positions(6, step=-2.5, z0=10.0))
    volume = build_volume(paths)
    assert volume.origin_mm[2] == pytest.approx(-2.5)
    assert_matches_field(volume)


def test_slices_of_different_sizes_are_inconsistent_geometry(tmp_path: Path) -> None:
    paths = write_series(tmp_path, axial_positions(4))
    odd = write_slice(tmp_path / "odd.dcm", (-12.0, -10.0, 0.0), spacing=0.5)
    assert rejection(lambda: build_volume([*paths, odd])).code == "inconsistent_geometry"


def write_enhanced_ct(path: Path, positions: Sequence[Sequence[float]]) -> Path:
    """An Enhanced CT instance with a different rescale on every frame (PS3.3 C.7.6.16)."""
    ds = base_dataset(SOPClassUID=ENHANCED_CT, SOPInstanceUID=generate_uid())
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.NumberOfFrames = len(positions)
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [1.0, 1.0]
    shared.PixelMeasuresSequence[0].SliceThickness = 2.0
    shared.PlaneOrientationSequence = DicomSequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(AXIAL)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames, pixels = [], []
    for n, position in enumerate(positions):
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = list(position)
        item.PixelValueTransformationSequence = DicomSequence([Dataset()])
        item.PixelValueTransformationSequence[0].RescaleSlope = 2
        item.PixelValueTransformationSequence[0].RescaleIntercept = -1000 - 10 * n
        frames.append(item)
        hu = plane_pixels(position, AXIAL, 1.0)
        pixels.append(np.round((hu + 1000 + 10 * n) / 2).astype("<i2"))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.stack(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_ct_frames_are_sorted_by_position_with_per_frame_rescale(tmp_path: Path) -> None:
    positions = [(-12.0, -10.0, float(z)) for z in (4, 0, 8, 2, 6)]
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", positions)
    volume = build_volume([path])
    assert volume.hu.shape == (5, SIZE, SIZE)
    assert [s.frame_number for s in volume.source_positions if s] == [2, 4, 1, 5, 3]
    assert_matches_field(volume)


def test_a_gantry_tilt_attribute_the_geometry_does_not_show_is_only_noted(tmp_path: Path) -> None:
    volume = build_volume(write_series(tmp_path, axial_positions(4), GantryDetectorTilt=12.0))
    assert volume.corrections == ["gantry_tilt_attribute_only:12.00deg"]
    assert_matches_field(volume)


def test_instances_of_two_series_are_not_mixed_into_one_volume(tmp_path: Path) -> None:
    first = write_series(tmp_path / "a", axial_positions(3))
    second = write_series(tmp_path / "b", axial_positions(3, z0=0.0), SeriesInstanceUID="1.2.9")
    assert rejection(lambda: build_volume([*first, *second])).code == "mixed_series"


def test_an_image_plane_far_from_axial_is_rejected(tmp_path: Path) -> None:
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    positions = [(0.0, float(y), 0.0) for y in range(4)]
    error = rejection(lambda: build_volume(write_series(tmp_path, positions, orientation=coronal)))
    assert error.code == "not_axial"


def test_a_non_square_matrix_with_rows_along_y_is_transposed(tmp_path: Path) -> None:
    orientation = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0)
    paths = write_series(tmp_path, axial_positions(4), orientation=orientation, Rows=16)
    volume = build_volume(paths)
    assert volume.hu.shape == (4, SIZE, 16)
    assert "transposed_rows_columns" in volume.corrections
    assert_matches_field(volume)
