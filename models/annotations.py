"""Readers for real CT data and its annotations (no torch).

- :func:`load_dicom_series`: a folder of axial CT slices -> HU volume ``[z, y, x]``.
- :func:`read_lidc_xml`: LIDC-IDRI reader XML -> per-reader nodule contours, grouped into
  nodules across readers by :func:`lidc_consensus`.
- :func:`read_luna16_annotations` and :func:`load_mhd`: LUNA16 ``annotations.csv`` and
  ``.mhd``/``.raw`` volumes.

World positions are patient LPS ``(x, y, z)`` mm, as in ImagePositionPatient and LUNA16.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom

_NS = {"l": "http://www.nih.gov"}


@dataclass
class CTVolume:
    """An axial CT volume in Hounsfield units.

    Attributes
    ----------
    volume_hu : numpy.ndarray
        float32 ``[z, y, x]``; slices sorted by increasing z.
    spacing_mm : tuple of float
        ``(dz, dy, dx)``.
    origin_mm : tuple of float
        LPS ``(x, y, z)`` of voxel ``[0, 0, 0]``.
    sop_uids : list of str
        SOPInstanceUID per slice (empty for non-DICOM sources).
    """

    volume_hu: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    sop_uids: list[str] = field(default_factory=list)

    def world_to_voxel(self, xyz: tuple[float, float, float]) -> tuple[float, float, float]:
        """Continuous ``(z, y, x)`` voxel index of a world point."""
        return (
            (xyz[2] - self.origin_mm[2]) / self.spacing_mm[0],
            (xyz[1] - self.origin_mm[1]) / self.spacing_mm[1],
            (xyz[0] - self.origin_mm[0]) / self.spacing_mm[2],
        )


def load_dicom_series(folder: str | Path) -> CTVolume:
    """Read every ``*.dcm`` slice of one axial series in ``folder`` into a HU volume.

    Slices are sorted by ImagePositionPatient z; HU = stored * RescaleSlope + RescaleIntercept.
    Only axial slices with orientation ``[1, 0, 0, 0, 1, 0]`` are supported; the slice spacing
    is the median difference of positions (which may differ from SliceThickness).

    Parameters
    ----------
    folder : str or pathlib.Path
        Folder holding the series' files (other DICOM files with no pixels are skipped).

    Returns
    -------
    CTVolume
    """
    slices = []
    for path in sorted(Path(folder).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise ValueError(f"no DICOM image slices in {folder}")
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    zs = np.array([float(d.ImagePositionPatient[2]) for d in slices])
    dz = float(np.median(np.diff(zs))) if len(zs) > 1 else float(slices[0].SliceThickness)
    vol = np.stack(
        [
            d.pixel_array.astype(np.float32) * float(d.get("RescaleSlope", 1))
            + float(d.get("RescaleIntercept", 0))
            for d in slices
        ]
    )
    px = [float(v) for v in slices[0].PixelSpacing]
    ipp = [float(v) for v in slices[0].ImagePositionPatient]
    return CTVolume(
        volume_hu=vol,
        spacing_mm=(dz, px[0], px[1]),
        origin_mm=(ipp[0], ipp[1], ipp[2]),
        sop_uids=[str(d.SOPInstanceUID) for d in slices],
    )


# --------------------------------------------------------------------------- LIDC


@dataclass
class LidcRoi:
    """One contour of one reader on one slice (``inclusion`` False marks a hole)."""

    z_mm: float
    sop_uid: str
    inclusion: bool
    xy_px: npt.NDArray[np.float64]


@dataclass
class LidcReading:
    """One reader's mark: a nodule of 3 mm or more (contours), a small nodule or a non-nodule."""

    reader: str
    nodule_id: str
    kind: str
    rois: list[LidcRoi]
    malignancy: int | None = None

    def centre_px_z(self) -> tuple[float, float, float]:
        """Mean contour point ``(x_px, y_px, z_mm)`` over included contours."""
        pts = [(p[0], p[1], r.z_mm) for r in self.rois if r.inclusion for p in r.xy_px]
        arr = np.asarray(pts, dtype=np.float64)
        return float(arr[:, 0].mean()), float(arr[:, 1].mean()), float(arr[:, 2].mean())


def _text(el: ET.Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def _locus(node: ET.Element) -> LidcRoi:
    loc = node.find("l:locus", _NS)
    x = float(_text(loc.find("l:xCoord", _NS))) if loc is not None else np.nan
    y = float(_text(loc.find("l:yCoord", _NS))) if loc is not None else np.nan
    return LidcRoi(
        z_mm=float(_text(node.find("l:imageZposition", _NS))),
        sop_uid=_text(node.find("l:imageSOP_UID", _NS)),
        inclusion=True,
        xy_px=np.array([[x, y]], dtype=np.float64),
    )


def _rois(node: ET.Element) -> list[LidcRoi]:
    rois = []
    for roi in node.findall("l:roi", _NS):
        pts = [
            (float(_text(e.find("l:xCoord", _NS))), float(_text(e.find("l:yCoord", _NS))))
            for e in roi.findall("l:edgeMap", _NS)
        ]
        rois.append(
            LidcRoi(
                z_mm=float(_text(roi.find("l:imageZposition", _NS))),
                sop_uid=_text(roi.find("l:imageSOP_UID", _NS)),
                inclusion=_text(roi.find("l:inclusion", _NS)).upper() != "FALSE",
                xy_px=np.asarray(pts, dtype=np.float64).reshape(-1, 2),
            )
        )
    return rois


def read_lidc_xml(path: str | Path) -> list[LidcReading]:
    """Parse an LIDC-IDRI reader XML (``LidcReadMessage``) into readings.

    Parameters
    ----------
    path : str or pathlib.Path
        The XML file.

    Returns
    -------
    list of LidcReading
        ``kind`` is ``nodule`` (3 mm or more, with contours), ``small`` (under 3 mm, a centre
        point) or ``non-nodule``. ``reader`` is the servicingRadiologistID.
    """
    root = ET.parse(path).getroot()
    out: list[LidcReading] = []
    for session in root.findall("l:readingSession", _NS):
        reader = _text(session.find("l:servicingRadiologistID", _NS))
        for nod in session.findall("l:unblindedReadNodule", _NS):
            rois = _rois(nod)
            has_contour = any(len(r.xy_px) > 1 for r in rois)
            mal = _text(nod.find("l:characteristics/l:malignancy", _NS))
            out.append(
                LidcReading(
                    reader=reader,
                    nodule_id=_text(nod.find("l:noduleID", _NS)),
                    kind="nodule" if has_contour else "small",
                    rois=rois,
                    malignancy=int(mal) if mal else None,
                )
            )
        for non in session.findall("l:nonNodule", _NS):
            out.append(
                LidcReading(
                    reader=reader,
                    nodule_id=_text(non.find("l:nonNoduleID", _NS)),
                    kind="non-nodule",
                    rois=[_locus(non)],
                )
            )
    return out


@dataclass
class LidcNodule:
    """A nodule as the readers marked it, grouped across readers.

    Attributes
    ----------
    centre_xyz_mm : tuple of float
        Mean of the readers' contour centres, LPS mm.
    extent_mm : tuple of float
        Mean over readers of the contours' bounding-box extent (x, y, z) in mm.
    diameter_mm : float
        Mean over readers of the longest in-plane diameter on their largest contour.
    readers : int
        How many readers marked it.
    kind : str
        ``nodule`` (3 mm or more) or ``small``.
    """

    centre_xyz_mm: tuple[float, float, float]
    extent_mm: tuple[float, float, float]
    diameter_mm: float
    readers: int
    kind: str


def _reading_world(
    reading: LidcReading, origin: tuple[float, float, float], pixel_mm: tuple[float, float]
) -> npt.NDArray[np.float64]:
    pts = [
        (origin[0] + p[0] * pixel_mm[1], origin[1] + p[1] * pixel_mm[0], r.z_mm)
        for r in reading.rois
        if r.inclusion
        for p in r.xy_px
    ]
    return np.asarray(pts, dtype=np.float64).reshape(-1, 3)


def _long_axis(reading: LidcReading, pixel_mm: tuple[float, float]) -> float:
    best = 0.0
    for roi in reading.rois:
        if not roi.inclusion or len(roi.xy_px) < 2:
            continue
        p = roi.xy_px * np.array([pixel_mm[1], pixel_mm[0]])
        d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)).max()
        best = max(best, float(d))
    return best


def lidc_consensus(
    readings: list[LidcReading],
    origin_mm: tuple[float, float, float],
    pixel_mm: tuple[float, float],
    slice_mm: float,
    match_mm: float = 10.0,
) -> list[LidcNodule]:
    """Group readers' nodule marks whose centres lie within ``match_mm`` into nodules.

    Parameters
    ----------
    readings : list of LidcReading
        From :func:`read_lidc_xml`; non-nodules are ignored.
    origin_mm : tuple of float
        ImagePositionPatient ``(x, y, z)`` of the series (contour pixels are relative to it).
    pixel_mm : tuple of float
        PixelSpacing ``(row spacing, column spacing)``.
    slice_mm : float
        Slice spacing, added to the z extent (each contour stands for one slice).
    match_mm : float
        Centre distance under which two readers' marks are the same nodule.

    Returns
    -------
    list of LidcNodule
        Nodules of 3 mm or more first, each sorted by reader count.
    """
    groups: list[list[tuple[LidcReading, npt.NDArray[np.float64]]]] = []
    for r in readings:
        if r.kind == "non-nodule":
            continue
        pts = _reading_world(r, origin_mm, pixel_mm)
        c = pts.mean(axis=0)
        for g in groups:
            if g[0][0].kind == r.kind and np.linalg.norm(g[0][1].mean(axis=0) - c) < match_mm:
                g.append((r, pts))
                break
        else:
            groups.append([(r, pts)])
    out = []
    for g in groups:
        centres = np.array([p.mean(axis=0) for _, p in g])
        ext = np.array(
            [p.max(axis=0) - p.min(axis=0) + [pixel_mm[1], pixel_mm[0], slice_mm] for _, p in g]
        )
        out.append(
            LidcNodule(
                centre_xyz_mm=tuple(float(v) for v in centres.mean(axis=0)),  # type: ignore[arg-type]
                extent_mm=tuple(float(v) for v in ext.mean(axis=0)),  # type: ignore[arg-type]
                diameter_mm=float(np.mean([_long_axis(r, pixel_mm) for r, _ in g])),
                readers=len({r.reader for r, _ in g}),
                kind=g[0][0].kind,
            )
        )
    out.sort(key=lambda n: (n.kind != "nodule", -n.readers))
    return out


# --------------------------------------------------------------------------- LUNA16


@dataclass(frozen=True)
class LunaAnnotation:
    """One row of LUNA16 ``annotations.csv``."""

    seriesuid: str
    centre_xyz_mm: tuple[float, float, float]
    diameter_mm: float


def read_luna16_annotations(path: str | Path) -> dict[str, list[LunaAnnotation]]:
    """Read LUNA16 ``annotations.csv`` (seriesuid, coordX, coordY, coordZ, diameter_mm).

    Returns
    -------
    dict
        Annotations per seriesuid. ``candidates.csv`` (with ``class`` instead of a diameter)
        is read the same way with diameter 0.
    """
    out: dict[str, list[LunaAnnotation]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            ann = LunaAnnotation(
                seriesuid=row["seriesuid"],
                centre_xyz_mm=(float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])),
                diameter_mm=float(row.get("diameter_mm") or 0.0),
            )
            out.setdefault(ann.seriesuid, []).append(ann)
    return out


def _mhd_header(path: Path) -> dict[str, str]:
    head = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            head[k.strip()] = v.strip()
    return head


_MHD_TYPES = {
    "MET_SHORT": "<i2",
    "MET_USHORT": "<u2",
    "MET_FLOAT": "<f4",
    "MET_UCHAR": "u1",
    "MET_CHAR": "i1",
    "MET_INT": "<i4",
}


def load_mhd(path: str | Path) -> CTVolume:
    """Read a MetaImage ``.mhd`` + ``.raw`` CT (as LUNA16 ships) into a :class:`CTVolume`.

    Axis flips in TransformMatrix (diagonal -1) are undone so the array is in the identity
    orientation; rotated volumes are not supported.
    """
    p = Path(path)
    head = _mhd_header(p)
    dims = [int(v) for v in head["DimSize"].split()]
    spacing = [float(v) for v in head["ElementSpacing"].split()]
    offset = [float(v) for v in head["Offset"].split()]
    raw = p.parent / head["ElementDataFile"]
    dtype = np.dtype(_MHD_TYPES[head["ElementType"]])
    if head.get("BinaryDataByteOrderMSB", "False").lower() == "true":
        dtype = dtype.newbyteorder(">")
    vol = np.fromfile(raw, dtype=dtype).reshape(dims[::-1]).astype(np.float32)
    direction = np.array(
        [float(v) for v in head.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]
    ).reshape(3, 3)
    origin = list(offset)
    for axis in range(3):
        if direction[axis, axis] < 0:
            arr_axis = 2 - axis
            vol = np.flip(vol, axis=arr_axis)
            origin[axis] -= (dims[axis] - 1) * spacing[axis]
    return CTVolume(
        volume_hu=np.ascontiguousarray(vol),
        spacing_mm=(spacing[2], spacing[1], spacing[0]),
        origin_mm=(origin[0], origin[1], origin[2]),
    )
