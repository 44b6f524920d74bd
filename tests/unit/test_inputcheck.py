"""Out-of-distribution inputs (pipelines.inputcheck): every boundary, and where the reasons go."""

from __future__ import annotations

import pytest

from dicom_node.fhir_resources import ReportSubject, build_results
from dicom_node.results import ModelIdentity, ResultSet
from pipelines.inputcheck import (
    LUNG_MEDIAN_HU,
    MAX_SLICE_MM,
    PIXEL_SPACING_MM,
    UNFAMILIAR_CORRECTIONS,
    input_review,
)

pytestmark = pytest.mark.unit

FAMILIAR = (2.5, 0.703125, 0.703125)


def test_the_shared_real_scans_are_familiar() -> None:
    # LIDC-IDRI-0001: 2.5 mm slices, 0.70 mm pixels, lungs -869 HU; the COVID-19 scan: 1.25 mm,
    # 0.70 mm, -861 HU (measured on ../shared/data)
    assert input_review(FAMILIAR, 2.5, -869.0) == ()
    assert input_review((1.25, 0.703125, 0.703125), 1.25, -861.0) == ()


@pytest.mark.parametrize(
    ("spacing", "thickness", "expected"),
    [
        ((MAX_SLICE_MM, 0.7, 0.7), MAX_SLICE_MM, ()),
        ((MAX_SLICE_MM + 0.01, 0.7, 0.7), None, ("slice_thickness_mm:2.51",)),
        ((2.0, 0.7, 0.7), 3.0, ("slice_thickness_mm:3",)),  # thick slices, overlapping spacing
        ((5.0, 0.7, 0.7), 5.0, ("slice_thickness_mm:5",)),
    ],
)
def test_slice_thickness_boundary(
    spacing: tuple[float, float, float], thickness: float | None, expected: tuple[str, ...]
) -> None:
    assert input_review(spacing, thickness, -860.0) == expected


@pytest.mark.parametrize(
    ("pixel", "flagged"),
    [
        (PIXEL_SPACING_MM[0] - 0.01, True),
        (PIXEL_SPACING_MM[0], False),
        (PIXEL_SPACING_MM[1], False),
        (PIXEL_SPACING_MM[1] + 0.01, True),
    ],
)
def test_pixel_spacing_boundaries(pixel: float, flagged: bool) -> None:
    reasons = input_review((1.0, pixel, pixel), 1.0, -860.0)
    assert reasons == ((f"pixel_spacing_mm:{pixel:.4g}",) if flagged else ())


@pytest.mark.parametrize(
    ("hu", "flagged"),
    [
        (LUNG_MEDIAN_HU[0] - 1, True),
        (LUNG_MEDIAN_HU[0], False),
        (LUNG_MEDIAN_HU[1], False),
        (LUNG_MEDIAN_HU[1] + 1, True),
    ],
)
def test_lung_density_boundaries(hu: float, flagged: bool) -> None:
    assert input_review(FAMILIAR, 2.5, hu) == ((f"lung_density_hu:{hu:.0f}",) if flagged else ())


def test_no_lungs_and_resampled_or_lossy_input_are_unfamiliar() -> None:
    assert input_review(FAMILIAR, 2.5, None) == ("no_lungs",)
    corrections = [
        "flipped_row_direction",  # exact: the stored pixels, reordered
        "resampled_missing_slices:2.5",
        "gantry_tilt_corrected:15.00deg",
        "lossy_compressed_source",
    ]
    assert input_review(FAMILIAR, 2.5, -860.0, corrections) == tuple(corrections[1:])
    for name in UNFAMILIAR_CORRECTIONS:
        assert input_review(FAMILIAR, 2.5, -860.0, [f"{name}:x"]) == (f"{name}:x",)


def test_the_reasons_travel_with_the_result_and_into_the_fhir_conclusion() -> None:
    model = ModelIdentity("NoduleAI", "1.0")
    reasons = ("slice_thickness_mm:5",)
    result = ResultSet(
        "job", "1.2.3", "1.2.3.4", model, (), 0, (), "f", 0, "cpu", input_review=reasons
    )
    assert ResultSet.from_json(result.to_json()).input_review == reasons
    legacy = {k: v for k, v in result.to_json().items() if k != "input_review"}
    assert ResultSet.from_json(legacy).input_review == ()
    subject = ReportSubject("1.2.3", "PID")
    report, _ = build_results(subject, [], model, tracking_uids=[], input_review=reasons)
    assert "Input outside the validated range (slice_thickness_mm:5)" in report["conclusion"]
