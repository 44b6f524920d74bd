"""Inputs outside what the detector was trained and measured on: the findings need review.

The detector was trained on phantoms of 0.625-2.5 mm slices and 0.6-0.9 mm pixels
(:mod:`models.phantom`) and measured on real CT of 1.25-2.5 mm slices and 0.70 mm pixels
(``../shared/data``). A series outside that range, or one the node had to resample or that was
stored lossy, is analysed anyway (a radiologist may still want the marks), but its findings are
out-of-distribution: every finding then *needs review*, and the reasons travel with the result
(``input_review`` in ``findings.json``, the findings API, the study page and the FHIR conclusion).

Each reason is a code with the measured value, ``name:value``:

``slice_thickness_mm``
    SliceThickness, or the slice spacing when larger, over :data:`MAX_SLICE_MM`.
``pixel_spacing_mm``
    In-plane spacing outside :data:`PIXEL_SPACING_MM`.
``no_lungs``
    No air-filled lung was found (not a chest CT, or wrong rescale values).
``lung_density_hu``
    The lungs' median HU outside :data:`LUNG_MEDIAN_HU` (normal lungs read about -870 HU; the
    shared LIDC-IDRI and COVID-19 scans -869 and -861): a calibration fault, or disease filling
    the lungs.
the Volume's corrections
    ``resampled_missing_slices``, ``resampled_uneven_spacing``, ``gantry_tilt_corrected``,
    ``resampled_to_axial_grid``: the detector saw interpolated slices; ``lossy_compressed_source``:
    compression artefacts it never saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Thickest slices (and widest slice spacing) trained on, mm.
MAX_SLICE_MM = 2.5
#: In-plane pixel spacing range accepted as familiar, mm (trained 0.6-0.9; clinical chest CT is
#: usually 0.6-0.8).
PIXEL_SPACING_MM = (0.5, 1.0)
#: Median HU of the lung mask accepted as familiar.
LUNG_MEDIAN_HU = (-950.0, -700.0)
#: Volume corrections after which the detector ran on interpolated or lossy data.
UNFAMILIAR_CORRECTIONS = (
    "resampled_missing_slices",
    "resampled_uneven_spacing",
    "gantry_tilt_corrected",
    "resampled_to_axial_grid",
    "lossy_compressed_source",
)


def input_review(
    spacing_mm: tuple[float, float, float],
    slice_thickness_mm: float | None,
    lung_median_hu: float | None,
    corrections: Sequence[str] = (),
) -> tuple[str, ...]:
    """Why this series is outside what the detector was validated on (empty: it is not).

    Parameters
    ----------
    spacing_mm : tuple of float
        ``(dz, dy, dx)`` of the series volume.
    slice_thickness_mm : float, optional
        SliceThickness as stored.
    lung_median_hu : float, optional
        Median HU inside the lung mask; ``None`` when no lung was found.
    corrections : sequence of str
        :attr:`pipelines.volume.Volume.corrections`.
    """
    reasons: list[str] = []
    thickness = max(spacing_mm[0], slice_thickness_mm or 0.0)
    if thickness > MAX_SLICE_MM:
        reasons.append(f"slice_thickness_mm:{thickness:.4g}")
    low, high = PIXEL_SPACING_MM
    for pixel in dict.fromkeys(spacing_mm[1:]):
        if not low <= pixel <= high:
            reasons.append(f"pixel_spacing_mm:{pixel:.4g}")
    if lung_median_hu is None:
        reasons.append("no_lungs")
    elif not LUNG_MEDIAN_HU[0] <= lung_median_hu <= LUNG_MEDIAN_HU[1]:
        reasons.append(f"lung_density_hu:{lung_median_hu:.0f}")
    for correction in corrections:
        if correction.split(":", 1)[0] in UNFAMILIAR_CORRECTIONS:
            reasons.append(correction)
    return tuple(reasons)
