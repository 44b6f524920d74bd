"""Nodules for encoder and worker tests: from the LIDC readers' contours and from phantom label
maps, and a detector that returns chosen nodules (:class:`FixedDetector`).

The issue allows nodules drawn from the LIDC readers' XML as encoder input. Masks are built on
the Volume grid (both sources are axial, identity orientation) and resampled onto the isotropic
grid the detector reports (:class:`pipelines.findings.Nodule`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.annotations import LidcReading, read_lidc_xml
from pipelines.detect import Detection
from pipelines.findings import Nodule, attenuation_type, axes_mm
from pipelines.preprocess import ISO_SPACING_MM
from pipelines.volume import Volume


def _fill_polygon(xy: npt.NDArray[np.float64], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Pixels inside or on a closed polygon of pixel-centre (x, y) points (even-odd rule)."""
    out = np.zeros(shape, dtype=bool)
    x0, y0 = np.floor(xy.min(axis=0)).astype(int)
    x1, y1 = np.ceil(xy.max(axis=0)).astype(int)
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    inside = np.zeros(ys.shape, dtype=bool)
    px, py = xy[:, 0], xy[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    for ax, ay, bx, by in zip(px, py, qx, qy, strict=True):
        crosses = (ay > ys) != (by > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            xcross = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xs < xcross)
    out[y0 : y1 + 1, x0 : x1 + 1] = inside
    pts = np.rint(xy).astype(int)
    out[pts[:, 1], pts[:, 0]] = True
    return out


def _reading_mask(reading: LidcReading, volume: Volume) -> npt.NDArray[np.bool_]:
    mask = np.zeros(volume.hu.shape, dtype=bool)
    z0, dz = volume.origin_mm[2], volume.spacing_mm[0]
    for roi in reading.rois:
        if len(roi.xy_px) < 3:
            continue
        k = round((roi.z_mm - z0) / dz)
        if 0 <= k < mask.shape[0]:
            filled = _fill_polygon(roi.xy_px, mask.shape[1:])
            mask[k] = mask[k] | filled if roi.inclusion else mask[k] & ~filled
    return mask


def grid_mask_to_nodule(
    grid_mask: npt.NDArray[np.bool_], volume: Volume, probability: float = 0.93
) -> Nodule:
    """A Nodule from a boolean mask on the Volume grid, resampled to the isotropic grid."""
    idx = np.argwhere(grid_mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    sz, sy, sx = volume.spacing_mm
    ox, oy, oz = volume.origin_mm
    world_lo = np.array([ox + lo[2] * sx, oy + lo[1] * sy, oz + lo[0] * sz]) - 2.0
    world_hi = np.array([ox + hi[2] * sx, oy + hi[1] * sy, oz + hi[0] * sz]) + 2.0
    s = ISO_SPACING_MM
    shape_xyz = np.floor((world_hi - world_lo) / s).astype(int) + 1
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape_xyz[::-1]), indexing="ij")
    coords = np.stack(
        [
            (world_lo[2] + zz * s - oz) / sz,
            (world_lo[1] + yy * s - oy) / sy,
            (world_lo[0] + xx * s - ox) / sx,
        ]
    )
    iso = ndimage.map_coordinates(grid_mask.astype(np.float32), coords, order=1) >= 0.5
    iso_hu = ndimage.map_coordinates(volume.hu, coords, order=1)
    centre = idx.mean(axis=0)
    long_axis, short_axis = axes_mm(iso)
    return Nodule(
        center_mm=(ox + centre[2] * sx, oy + centre[1] * sy, oz + centre[0] * sz),
        long_axis_mm=long_axis,
        short_axis_mm=short_axis,
        volume_mm3=float(iso.sum()) * s**3,
        mean_hu=float(iso_hu[iso].mean()),
        type=attenuation_type(iso, iso_hu[iso]),
        probability=probability,
        needs_review=probability < 0.6,
        mask=iso,
        mask_origin_mm=(float(world_lo[0]), float(world_lo[1]), float(world_lo[2])),
    )


def lidc_nodules(xml: Path, volume: Volume) -> list[Nodule]:
    """Nodules of 3 mm or more: voxels marked by at least half the readers of each group."""
    groups: list[list[npt.NDArray[np.bool_]]] = []
    centres: list[npt.NDArray[np.float64]] = []
    for reading in read_lidc_xml(xml):
        if reading.kind != "nodule":
            continue
        mask = _reading_mask(reading, volume)
        if not mask.any():
            continue
        centre = np.argwhere(mask).mean(axis=0) * np.array(volume.spacing_mm)
        for i, c in enumerate(centres):
            if np.linalg.norm(c - centre) < 10.0:
                groups[i].append(mask)
                break
        else:
            groups.append([mask])
            centres.append(centre)
    nodules = []
    for masks in sorted(groups, key=len, reverse=True):
        votes = np.sum(masks, axis=0)
        nodules.append(grid_mask_to_nodule(votes >= max(1, len(masks) / 2), volume))
    return nodules


class FixedDetector:
    """Returns ``nodules`` for every volume; raises ``fail[series]`` once per listed series."""

    backend = "fixed"

    def __init__(self, nodules: list[Nodule], fail: dict[str, Exception] | None = None) -> None:
        self.nodules = nodules
        self.fail = dict(fail or {})
        self.calls: list[str] = []

    def run(self, volume: Volume) -> Detection:
        self.calls.append(volume.series_instance_uid)
        error = self.fail.pop(volume.series_instance_uid, None)
        if error is not None:
            raise error
        return Detection(
            series_instance_uid=volume.series_instance_uid,
            nodules=list(self.nodules),
            candidates=len(self.nodules),
            timings_ms={"stage1": 1.0, "stage2": 1.0},
            backend=self.backend,
            model_versions={"stage1_screen": "0.0.0", "stage2_refine": "0.0.0"},
        )
