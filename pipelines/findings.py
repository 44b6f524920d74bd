"""Post-processing: stage-2 findings into nodules a radiologist reads.

Per nodule: centre (LPS, mm), long- and short-axis diameters on the axial slice of largest extent
(as RECIST and Lung-RADS measure), the same diameters of its solid component (the largest
connected part above :data:`SOLID_HU`; what Lung-RADS grades a part-solid nodule by), volume,
mean HU, attenuation type and probability, with a "needs review" flag inside the uncertainty band
above the operating point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from pipelines.preprocess import ISO_SPACING_MM
from pipelines.refine import Finding

#: HU above which a voxel counts as solid (soft tissue) rather than ground glass.
SOLID_HU = -300.0
#: Solid fraction of the nodule's core at or above which it is solid, at or below which it is
#: ground-glass; part-solid in between (Fleischner Society glossary, attenuation categories).
SOLID_FRACTION, GROUND_GLASS_FRACTION = 0.8, 0.2


@dataclass
class Nodule:
    """One reported nodule; the mask lies on the isotropic grid at ``mask_origin_mm``."""

    center_mm: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    type: str
    probability: float
    needs_review: bool
    mask: npt.NDArray[np.bool_] = field(repr=False)
    mask_origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mask_spacing_mm: float = ISO_SPACING_MM
    #: Long and short axis of the solid component (0 when it has none).
    solid_long_axis_mm: float = 0.0
    solid_short_axis_mm: float = 0.0
    #: Centre in the cranial half of the lung mask (``None``: no lung mask).
    upper_zone: bool | None = None


def needs_review(probability: float, threshold: float, review_band: float) -> bool:
    """Whether a finding at ``probability`` is near the operating ``threshold``: in the lowest
    ``review_band`` fraction of the range from the threshold to 1. A fraction, not a fixed
    margin, so that it means the same when the threshold moves: a fixed 0.05 flagged every
    finding once a stage 2 chose 0.95."""
    return probability < threshold + review_band * (1.0 - threshold)


def describe(
    finding: Finding,
    iso_hu: npt.NDArray[np.floating[Any]],
    origin_mm: tuple[float, float, float],
    threshold: float,
    review_band: float,
) -> Nodule:
    """Measure ``finding`` on the isotropic HU volume and classify it."""
    mask = finding.mask
    hu = _masked_hu(mask, finding.mask_origin_xyz_mm, iso_hu, origin_mm)
    long_axis, short_axis = axes_mm(mask) if mask.any() else (finding.diameter_mm, 0.0)
    solid_long, solid_short = solid_axes_mm(mask, hu)
    return Nodule(
        center_mm=finding.centre_xyz_mm,
        long_axis_mm=long_axis,
        short_axis_mm=short_axis,
        volume_mm3=finding.volume_mm3,
        mean_hu=float(hu.mean()) if hu.size else float("nan"),
        type=attenuation_type(mask, hu),
        probability=finding.probability,
        needs_review=needs_review(finding.probability, threshold, review_band),
        mask=mask,
        mask_origin_mm=finding.mask_origin_xyz_mm,
        solid_long_axis_mm=solid_long,
        solid_short_axis_mm=solid_short,
    )


def solid_axes_mm(
    mask: npt.NDArray[np.bool_], hu: npt.NDArray[np.floating[Any]]
) -> tuple[float, float]:
    """Long and short axis of the largest connected solid part (HU above :data:`SOLID_HU`).

    ``hu`` holds the values under ``mask`` in mask order; a mask partly outside the volume
    (fewer values than voxels) has no measurable solid component: ``(0, 0)``.
    """
    if hu.size == 0 or hu.size != int(mask.sum()):
        return 0.0, 0.0
    solid = np.zeros_like(mask)
    solid[mask] = hu > SOLID_HU
    labels, count = ndimage.label(solid)
    if count == 0:
        return 0.0, 0.0
    sizes = ndimage.sum_labels(solid, labels, index=range(1, count + 1))
    largest = labels == int(np.argmax(sizes)) + 1
    return axes_mm(largest)


def _masked_hu(
    mask: npt.NDArray[np.bool_],
    mask_origin_mm: tuple[float, float, float],
    iso_hu: npt.NDArray[np.floating[Any]],
    origin_mm: tuple[float, float, float],
) -> npt.NDArray[np.floating[Any]]:
    """HU values under ``mask`` (in mask order), clipped to the volume."""
    lo = [round((mask_origin_mm[i] - origin_mm[i]) / ISO_SPACING_MM) for i in (2, 1, 0)]
    src = tuple(
        slice(max(0, a), min(n, a + m))
        for a, m, n in zip(lo, mask.shape, iso_hu.shape, strict=True)
    )
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
    return iso_hu[src][mask[dst]]


def axes_mm(mask: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """Long axis and the longest extent perpendicular to it, on the largest axial slice."""
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    points = np.argwhere(mask[z]).astype(np.float64)
    if len(points) < 2:
        return ISO_SPACING_MM, ISO_SPACING_MM
    edge = mask[z] & ~ndimage.binary_erosion(mask[z])
    outline = np.argwhere(edge).astype(np.float64) if edge.sum() >= 2 else points
    d = np.sqrt(((outline[:, None, :] - outline[None, :, :]) ** 2).sum(-1))
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    direction = (outline[j] - outline[i]) / max(d[i, j], 1e-9)
    normal = np.array([-direction[1], direction[0]])
    across = points @ normal
    long_axis = (d[i, j] + 1.0) * ISO_SPACING_MM
    short_axis = (across.max() - across.min() + 1.0) * ISO_SPACING_MM
    return float(long_axis), float(min(short_axis, long_axis))


def attenuation_type(mask: npt.NDArray[np.bool_], hu: npt.NDArray[np.floating[Any]]) -> str:
    """``solid``, ``part-solid`` or ``ground-glass`` from the solid fraction of the core."""
    if hu.size == 0:
        return "solid"
    core = ndimage.binary_erosion(mask)
    values = hu[core[mask]] if core.sum() >= 8 else hu
    solid = float((values > SOLID_HU).mean())
    if solid >= SOLID_FRACTION:
        return "solid"
    if solid <= GROUND_GLASS_FRACTION:
        return "ground-glass"
    return "part-solid"
