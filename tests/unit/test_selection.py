"""Series selection: which series of a study is analysed, and why the others are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.errors import StudyRejectedError
from pipelines.selection import NoEligibleSeriesError, is_lung_kernel, select_series
from tests.unit.test_volume import axial_positions, write_enhanced_ct, write_series, write_slice

CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def series(folder: Path, count: int = 22, step: float = 2.0, **attrs: object) -> list[Path]:
    """A synthetic CT series of its own SeriesInstanceUID."""
    attrs.setdefault("SeriesInstanceUID", generate_uid())
    return write_series(folder, axial_positions(count, step=step), **attrs)


def rejected(paths: list[Path], **kwargs: object) -> NoEligibleSeriesError:
    with pytest.raises(NoEligibleSeriesError) as info:
        select_series(paths, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == "no_eligible_series"
    assert isinstance(info.value, StudyRejectedError)
    return info.value


def test_lidc_small_is_chosen_among_real_series_of_every_kind(shared_data: Path) -> None:
    folders = ["lidc-small", "jpeg2000-ct", "malformed", "transfer-syntaxes"]
    paths = [p for f in folders for p in (shared_data / f).rglob("*") if p.is_file()]
    chosen = select_series(paths, min_slices=10)
    lidc = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    assert chosen.series_instance_uid == lidc
    assert len(chosen.paths) == 16 and chosen.paths == sorted(chosen.paths)
    assert chosen.reasons_by_series[lidc].startswith("selected")
    assert chosen.reasons_by_series[
        "no-series-uid:1.3.12.2.1107.5.1.4.60064.30000022120807274275100000041"
    ].startswith("no_study_or_series_uid")
    assert (
        "not_ct: Modality SR"
        in chosen.reasons_by_series["1.2.276.0.7230010.3.1.3.1787205428.166.1117461927.22"]
    )
    assert chosen.warnings == ()


def test_files_without_study_and_series_uid_are_grouped_by_frame_of_reference_and_refused(
    shared_data: Path,
) -> None:
    """The anonymised JPEG 2000 slices: nothing could reference them, as at C-STORE."""
    err = rejected(list((shared_data / "jpeg2000-ct").iterdir()), min_slices=10)
    ((key, reasons),) = err.reasons_by_series.items()
    assert key.startswith("no-series-uid:1.3.12.2.1107")
    assert [r.split(":")[0] for r in reasons] == ["no_study_or_series_uid"]


def test_a_series_whose_instances_lack_a_study_uid_is_refused(tmp_path: Path) -> None:
    good = series(tmp_path / "good", StudyInstanceUID=generate_uid())
    err = rejected(series(tmp_path / "bad", StudyInstanceUID=""))
    assert [r.split(":")[0] for r in next(iter(err.reasons_by_series.values()))] == [
        "no_study_or_series_uid"
    ]
    assert select_series(good).paths == sorted(good)


def test_non_dicom_files_and_dicomdir_are_ignored(tmp_path: Path) -> None:
    paths = series(tmp_path / "ct")
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "empty.dcm").write_bytes(b"")
    dicomdir = write_slice(
        tmp_path / "DICOMDIR", (0.0, 0.0, 0.0), SOPClassUID="1.2.840.10008.1.3.10"
    )
    others = [tmp_path / "notes.txt", tmp_path / "empty.dcm", dicomdir]
    chosen = select_series([*paths, *others])
    assert list(chosen.reasons_by_series) == [chosen.series_instance_uid]
    assert len(chosen.paths) == 22


def test_a_cr_image_is_rejected_as_no_eligible_series(tmp_path: Path) -> None:
    cr = write_slice(
        tmp_path / "cr.dcm",
        (0.0, 0.0, 0.0),
        Modality="CR",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.1",
        SeriesInstanceUID="1.2.3.4",
    )
    error = rejected([cr])
    assert error.reasons_by_series["1.2.3.4"][0] == "not_ct: Modality CR"
    assert "series 1.2.3.4: not_ct: Modality CR" in error.detail
    assert json.loads(error.to_json())["1.2.3.4"][0].startswith("not_ct")


def test_a_three_slice_series_is_rejected_as_too_few_slices(tmp_path: Path) -> None:
    error = rejected(series(tmp_path, count=3, SeriesInstanceUID="1.2.3"))
    assert error.reasons_by_series == {"1.2.3": ["too_few_slices: 3 slice positions (< 20)"]}


def test_malformed_placeholder_slices_are_rejected_with_their_reasons(shared_data: Path) -> None:
    error = rejected(sorted((shared_data / "malformed").glob("*.dcm")), min_slices=2)
    (reasons,) = error.reasons_by_series.values()
    assert [r.split(":")[0] for r in reasons] == ["no_frame_of_reference"]


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]}, "not_original"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
        ({"orientation": CORONAL}, "not_axial"),
        ({"Modality": "MR"}, "not_ct"),
    ],
)
def test_derived_localizer_coronal_and_non_ct_series_are_refused(
    tmp_path: Path, attrs: dict[str, object], reason: str
) -> None:
    error = rejected(series(tmp_path, **attrs))
    (reasons,) = error.reasons_by_series.values()
    assert reasons[0].startswith(reason + ":")


def test_a_series_with_ct_sop_class_but_no_modality_is_accepted(tmp_path: Path) -> None:
    paths = series(tmp_path, Modality="")
    assert len(select_series(paths).paths) == 22


def test_a_lung_kernel_is_preferred_at_equal_thickness(tmp_path: Path) -> None:
    soft = series(tmp_path / "soft", ConvolutionKernel="STANDARD", SeriesInstanceUID="1.1")
    lung = series(tmp_path / "lung", ConvolutionKernel="LUNG", SeriesInstanceUID="1.2")
    chosen = select_series([*soft, *lung])
    assert chosen.series_instance_uid == "1.2"
    assert chosen.reasons_by_series["1.1"].startswith("eligible, ranked lower")


def test_thin_slices_beat_a_lung_kernel_at_standard_thickness(tmp_path: Path) -> None:
    thin = series(tmp_path / "thin", step=1.0, thickness=1.0, SeriesInstanceUID="1.1")
    lung = series(
        tmp_path / "lung",
        step=2.5,
        thickness=2.5,
        ConvolutionKernel="B70f",
        SeriesInstanceUID="1.2",
    )
    assert select_series([*lung, *thin]).series_instance_uid == "1.1"


def test_five_mm_slices_are_used_only_when_nothing_thinner_qualifies(tmp_path: Path) -> None:
    thick = series(tmp_path / "thick", step=5.0, thickness=5.0, SeriesInstanceUID="1.5")
    scout = series(
        tmp_path / "scout", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesInstanceUID="1.1"
    )
    chosen = select_series([*thick, *scout])
    assert (chosen.series_instance_uid, chosen.warnings) == ("1.5", ("thick_slices",))
    two = series(tmp_path / "two", step=2.0, SeriesInstanceUID="1.2")
    assert select_series([*thick, *two]).series_instance_uid == "1.2"


def test_slices_thicker_than_five_mm_are_refused(tmp_path: Path) -> None:
    error = rejected(series(tmp_path, step=7.0, thickness=7.0, SeriesInstanceUID="1.7"))
    assert error.reasons_by_series["1.7"][0].startswith("too_thick: 7.00 mm")


def test_a_series_with_a_gap_yields_to_a_regular_one_but_remains_eligible(tmp_path: Path) -> None:
    gappy = series(tmp_path / "gap", step=1.0, thickness=1.0, SeriesInstanceUID="1.1")
    gappy[10].unlink()
    del gappy[10]
    regular = series(tmp_path / "reg", step=2.0, SeriesInstanceUID="1.2")
    assert select_series([*gappy, *regular]).series_instance_uid == "1.2"
    alone = select_series(gappy)
    assert alone.series_instance_uid == "1.1"
    assert "irregular_spacing" in alone.warnings


def test_an_original_enhanced_ct_counts_its_frames_as_slices(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", [(-12.0, -10.0, 2.0 * k) for k in range(5)])
    assert select_series([path], min_slices=5).paths == [path]
    assert "too_few_slices" in rejected([path], min_slices=6).detail


@pytest.mark.parametrize(
    ("kernel", "lung"),
    [
        ("LUNG", True),
        ("BONE", True),
        ("STANDARD", False),
        ("SOFT", False),
        ("B70f", True),
        ("B60f", True),
        ("I70f\\3", True),
        ("Br64d", True),
        ("Bl57d", True),
        ("B30f", False),
        ("Br38f\\3", False),
        ("I31f", False),
        ("FC52", True),
        ("FC86", True),
        ("FC13", False),
        ("L", True),
        ("YC", True),
        ("B", False),
        ("C", False),
        ("", False),
    ],
)
def test_lung_kernel_heuristic(kernel: str, lung: bool) -> None:
    assert is_lung_kernel(kernel.replace("\\", " ")) is lung
