"""Nodule masks on the source images: per-frame masks, the largest slice, its outline.

The detector reports each nodule's mask on an isotropic grid (:class:`pipelines.findings.Nodule`,
``mask[z, y, x]`` at ``mask_origin_mm`` with ``mask_spacing_mm``), in the canonical LPS geometry of
:class:`pipelines.volume.Volume`. Viewers draw SEG frames, SR SCOORDs and GSPS graphics on the
*stored* images, in the stored row/column order, and a Volume may be flipped, transposed or
tilt-corrected relative to them (PS3.3 C.7.6.2.1.1). So this module does not un-flip the canonical
array; it goes through patient coordinates instead, which is exact for every case Volume handles:

1. Each output slice of the Volume names its stored frame (``Volume.source_positions``, a
   SOPInstanceUID and, for multi-frame Enhanced CT, a frame number). Interpolated slices (None)
   have no stored frame and are skipped.
2. For that frame, the stored geometry (ImagePositionPatient, ImageOrientationPatient and
   PixelSpacing, per frame or shared for multi-frame, PS3.3 C.7.6.16) places every stored pixel
   ``(row r, column c)`` at ``P = IPP + c * dc * rowcos + r * dr * colcos`` (PS3.3 C.7.6.2.1.1).
3. The isotropic mask is sampled at ``P`` by trilinear interpolation of the 0/1 mask; a pixel is in
   the nodule when the interpolated value is at least 0.5, i.e. when at least half of the mask's
   neighbourhood around the pixel centre is nodule ("overlap >= 0.5"). Only the pixels under the
   mask's bounding box are sampled.

The result is a 2D boolean array per stored frame in stored (row, column) order: what a SEG frame
(PS3.3 C.8.20) and an SR/GSPS graphic in image coordinates (PS3.3 C.18.6.1.1, C.10.5) need.

Image coordinates follow PS3.3 C.10.5.1.2 / C.18.6.1.1: ``(column, row)`` with ``(0, 0)`` the
top-left corner of the top-left pixel, so that pixel's centre is ``(0.5, 0.5)``. Outlines run
along pixel edges (joining edge midpoints), so they enclose the masked pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from scipy import ndimage

from pipelines.findings import Nodule
from pipelines.headers import frame_attr
from pipelines.volume import SourceFrame, Volume

BoolArray = npt.NDArray[np.bool_]
Points = npt.NDArray[np.float64]

#: Interpolated mask value at a pixel centre from which the pixel belongs to the nodule.
OVERLAP = 0.5


@dataclass(frozen=True)
class SourcePlane:
    """Where one stored frame lies in patient space (PS3.3 C.7.6.2).

    Attributes
    ----------
    source : SourceFrame
        SOPInstanceUID and frame number (None for single-frame instances).
    slice_index : int
        Index of the Volume slice taken from this frame.
    sop_class_uid : str
        SOPClassUID of the stored instance.
    position : numpy.ndarray
        ImagePositionPatient (centre of the first stored pixel), mm.
    row_cosine, column_cosine : numpy.ndarray
        The two direction cosines of ImageOrientationPatient (along a row, along a column).
    pixel_spacing : tuple of float
        PixelSpacing ``(row spacing dr, column spacing dc)`` in mm.
    rows, columns : int
        Matrix size.
    """

    source: SourceFrame
    slice_index: int
    sop_class_uid: str
    position: Points
    row_cosine: Points
    column_cosine: Points
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    @property
    def normal(self) -> Points:
        """Unit normal, row cosine x column cosine."""
        n = np.cross(self.row_cosine, self.column_cosine)
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    def to_pixel(self, xyz: Sequence[float] | Points) -> tuple[float, float, float]:
        """``(column, row, height)`` of a patient point: pixel indices and mm off the plane."""
        d = np.asarray(xyz, dtype=np.float64) - self.position
        return (
            float(d @ self.row_cosine / self.pixel_spacing[1]),
            float(d @ self.column_cosine / self.pixel_spacing[0]),
            float(d @ self.normal),
        )


@dataclass(frozen=True)
class PlaneMask:
    """A nodule's mask on one stored frame, in stored ``[row, column]`` order."""

    plane: SourcePlane
    mask: BoolArray

    @property
    def area_px(self) -> int:
        """Number of pixels in the nodule."""
        return int(self.mask.sum())


@dataclass(frozen=True)
class Outline:
    """The closed outline of a nodule on its largest stored slice.

    Attributes
    ----------
    plane : SourcePlane
        The stored frame it is drawn on.
    points : numpy.ndarray
        ``(N, 2)`` float ``(column, row)`` image coordinates, first point repeated last.
    long_axis : numpy.ndarray
        ``(2, 2)`` endpoints of the longest chord between outline points, ``(column, row)``.
    long_axis_mm : float
        Its length in mm (PixelSpacing applied per axis).
    short_axis_mm : float
        The outline's longest extent perpendicular to the long axis, in mm.

    These two are the nodule's planar measurements wherever it is reported (SR, FHIR, JSON,
    Lung-RADS): measured on the outline the SR draws, so a reader measuring the drawn polyline
    gets the stated long axis.
    """

    plane: SourcePlane
    points: Points
    long_axis: Points
    long_axis_mm: float
    short_axis_mm: float


def _floats(value: Any, count: int) -> list[float]:
    numbers = [float(v) for v in value]
    if len(numbers) != count:
        raise ValueError(f"expected {count} values, got {len(numbers)}")
    return numbers


def source_planes(volume: Volume, datasets: Mapping[str, Dataset]) -> list[SourcePlane]:
    """The stored frame behind every Volume slice that has one, in Volume (z) order.

    Parameters
    ----------
    volume : Volume
        The canonical volume the nodules were found in.
    datasets : mapping of str to pydicom.Dataset
        Source instances (headers suffice) by SOPInstanceUID.

    Returns
    -------
    list of SourcePlane
        One per slice whose ``source_positions`` entry is not None and whose instance is given.
    """
    planes: list[SourcePlane] = []
    for k, source in enumerate(volume.source_positions):
        if source is None or source.sop_instance_uid not in datasets:
            continue
        ds = datasets[source.sop_instance_uid]
        index = None if source.frame_number is None else source.frame_number - 1
        ipp = _floats(frame_attr(ds, index, "PlanePositionSequence", "ImagePositionPatient"), 3)
        iop = _floats(
            frame_attr(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        )
        spacing = _floats(frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing"), 2)
        planes.append(
            SourcePlane(
                source=source,
                slice_index=k,
                sop_class_uid=str(ds.SOPClassUID),
                position=np.asarray(ipp, dtype=np.float64),
                row_cosine=np.asarray(iop[:3], dtype=np.float64),
                column_cosine=np.asarray(iop[3:], dtype=np.float64),
                pixel_spacing=(spacing[0], spacing[1]),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
            )
        )
    return planes


def grid_corners(
    shape_zyx: tuple[int, ...], origin_mm: Sequence[float], spacing_mm: float
) -> Points:
    """The 8 corners (LPS mm) of the voxel-edge bounding box of a ``[z, y, x]`` grid whose voxel
    ``[0, 0, 0]`` lies at ``origin_mm``."""
    origin = np.asarray(origin_mm, dtype=np.float64)
    shape_xyz = np.asarray(shape_zyx[::-1], dtype=np.float64)
    lo, hi = origin - spacing_mm / 2.0, origin + (shape_xyz - 0.5) * spacing_mm
    return np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )


def sample_on_plane(
    values: npt.NDArray[np.float32],
    origin_mm: Sequence[float],
    spacing_mm: float,
    plane: SourcePlane,
    corners: Points | None = None,
) -> npt.NDArray[np.float32] | None:
    """``values[z, y, x]`` (an isotropic grid at ``origin_mm``) interpolated trilinearly at the
    centre of every stored pixel of ``plane``, 0 outside the grid.

    Only the pixels under the grid's bounding box (``corners``, from :func:`grid_corners`) are
    sampled. Returns ``(rows, columns)`` float32, or ``None`` when the box does not cross the
    plane.
    """
    if corners is None:
        corners = grid_corners(values.shape, origin_mm, spacing_mm)
    cols, rows, heights = np.array([plane.to_pixel(c) for c in corners]).T
    if heights.min() > 0 or heights.max() < 0:
        return None
    out = np.zeros((plane.rows, plane.columns), dtype=np.float32)
    c0, c1 = max(0, int(np.floor(cols.min()))), min(plane.columns, int(np.ceil(cols.max())) + 1)
    r0, r1 = max(0, int(np.floor(rows.min()))), min(plane.rows, int(np.ceil(rows.max())) + 1)
    if c0 < c1 and r0 < r1:
        rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        world = (
            plane.position
            + cc[..., None] * plane.pixel_spacing[1] * plane.row_cosine
            + rr[..., None] * plane.pixel_spacing[0] * plane.column_cosine
        )
        index_xyz = (world - np.asarray(origin_mm, dtype=np.float64)) / spacing_mm
        coords = np.moveaxis(index_xyz[..., ::-1], -1, 0)
        out[r0:r1, c0:c1] = ndimage.map_coordinates(
            values, coords, order=1, mode="constant", cval=0.0
        )
    return out


def project_mask(nodule: Nodule, planes: Sequence[SourcePlane]) -> list[PlaneMask]:
    """The nodule's mask on every stored frame its bounding box crosses.

    Frames where the sampled mask is empty are kept (empty), so callers see the whole extent.

    Parameters
    ----------
    nodule : Nodule
        With ``mask[z, y, x]`` on the isotropic grid.
    planes : sequence of SourcePlane
        From :func:`source_planes`.

    Returns
    -------
    list of PlaneMask
        In the order of ``planes``; frames the box does not cross are left out.
    """
    values = nodule.mask.astype(np.float32)
    origin, spacing = nodule.mask_origin_mm, nodule.mask_spacing_mm
    corners = grid_corners(values.shape, origin, spacing)
    out: list[PlaneMask] = []
    for plane in planes:
        sampled = sample_on_plane(values, origin, spacing, plane, corners)
        if sampled is not None:
            out.append(PlaneMask(plane, sampled >= OVERLAP))
    return out


def largest_plane(masks: Sequence[PlaneMask], nodule: Nodule) -> PlaneMask | None:
    """The frame with the most nodule pixels (ties: the one nearest the nodule centre)."""
    candidates = [m for m in masks if m.area_px > 0]
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda m: (m.area_px, -abs(m.plane.to_pixel(nodule.center_mm)[2])),
    )


_STEPS = {(1, 0), (0, 1), (-1, 0), (0, -1)}


def _boundary_edges(mask: BoolArray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Directed pixel-edge segments with the nodule on their right (clockwise on screen)."""
    m = np.pad(mask, 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    rows, cols = np.nonzero(m)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        if not m[r - 1, c]:
            edges.setdefault((c, r), []).append((c + 1, r))
        if not m[r, c + 1]:
            edges.setdefault((c + 1, r), []).append((c + 1, r + 1))
        if not m[r + 1, c]:
            edges.setdefault((c + 1, r + 1), []).append((c, r + 1))
        if not m[r, c - 1]:
            edges.setdefault((c, r + 1), []).append((c, r))
    return edges


def _largest_component(mask: BoolArray) -> BoolArray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == int(np.argmax(sizes)) + 1
    return np.asarray(ndimage.binary_fill_holes(mask), dtype=bool)


def outline_points(mask: BoolArray) -> Points:
    """Closed outline of the largest 8-connected region, ``(column, row)`` image coordinates.

    The boundary is traced along pixel edges (turning towards diagonal neighbours, so an
    8-connected region gives one loop), then the midpoints of consecutive edges are joined and
    collinear points dropped. Holes are filled. The first point is repeated at the end, as a
    closed POLYLINE requires (PS3.3 C.18.6.1.2, C.10.5.1.2).

    Parameters
    ----------
    mask : numpy.ndarray
        2D boolean ``[row, column]``, with at least one pixel set.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` float64.
    """
    region = _largest_component(mask)
    if not region.any():
        raise ValueError("empty mask has no outline")
    edges = _boundary_edges(region)
    start = min(edges, key=lambda v: (v[1], v[0]))
    vertices = [start]
    current, direction = start, (1, 0)
    remaining = sum(len(v) for v in edges.values())
    while remaining:
        options = edges[current]
        if len(options) > 1:
            # prefer the left turn (cross < 0 with y down): cross to the diagonal neighbour
            options.sort(
                key=lambda e: (
                    direction[0] * (e[1] - current[1]) - direction[1] * (e[0] - current[0])
                )
            )
        nxt = options.pop(0)
        remaining -= 1
        direction = (nxt[0] - current[0], nxt[1] - current[1])
        current = nxt
        if current == start and not edges[start]:
            break
        vertices.append(current)
    ring = np.asarray(vertices, dtype=np.float64) - 1.0  # undo the padding
    mids = (ring + np.roll(ring, -1, axis=0)) / 2.0
    keep = []
    for i in range(len(mids)):
        a, b, c = mids[i - 1], mids[i], mids[(i + 1) % len(mids)]
        cross = (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0])
        if abs(cross) > 1e-9:
            keep.append(b)
    points = np.asarray(keep if len(keep) >= 3 else mids, dtype=np.float64)
    return np.vstack([points, points[:1]])


def long_axis(points: Points, pixel_spacing: tuple[float, float]) -> tuple[Points, float]:
    """Endpoints and length (mm) of the longest chord between ``(column, row)`` points."""
    scale = np.array([pixel_spacing[1], pixel_spacing[0]])
    mm = points * scale
    d = np.sqrt(((mm[:, None, :] - mm[None, :, :]) ** 2).sum(-1))
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return np.stack([points[i], points[j]]), float(d[i, j])


def short_axis(points: Points, ends: Points, pixel_spacing: tuple[float, float]) -> float:
    """Extent (mm) of ``(column, row)`` points perpendicular to the chord ``ends``."""
    scale = np.array([pixel_spacing[1], pixel_spacing[0]])
    mm, tips = points * scale, ends * scale
    direction = (tips[1] - tips[0]) / max(float(np.linalg.norm(tips[1] - tips[0])), 1e-9)
    across = mm @ np.array([-direction[1], direction[0]])
    return float(across.max() - across.min())


def nodule_outline(masks: Sequence[PlaneMask], nodule: Nodule) -> Outline | None:
    """Outline, long and short axis of ``nodule`` on its largest-extent stored slice (None if
    empty)."""
    best = largest_plane(masks, nodule)
    if best is None:
        return None
    points = outline_points(best.mask)
    ends, length = long_axis(points[:-1], best.plane.pixel_spacing)
    width = short_axis(points[:-1], ends, best.plane.pixel_spacing)
    return Outline(best.plane, points, ends, length, min(width, length))
