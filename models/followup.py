"""A real CT series as a later study of the same patient, who lay moved in the scanner.

For testing the comparison with priors on real anatomy (:mod:`pipelines.priors`): every slice
of an axial series is resampled through a known rigid motion
(:func:`pipelines.registration.move_volume`) and written back on the *same* slice grid, with
the source's headers, new Study, Series and SOP Instance UIDs (derived from the source's and a
salt, so the copy is reproducible) and a StudyDate ``days_later``. Nothing in the anatomy
changes, so every nodule in the copy is the source's nodule, stable, at a known position.

Only the pixel data, the UIDs and the dates change; the copy keeps the source's geometry and its
patient (the comparison is between two studies of one patient).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from pipelines.registration import RigidTransform, move_volume

_NAMESPACE = uuid.UUID("3f6f1a0e-55b1-4c49-9a3e-2f1d7b0c9e11")

#: The motion of the moved copy of LIDC-IDRI-0001 that the priors test and the model evaluation
#: use: 2 to 3 degrees about each axis about a point in the chest, then 6 to 10 mm.
LIDC_TEST_MOTION = RigidTransform.from_params(
    (2.0, -1.5, 3.0), (6.0, -4.0, 10.0), (0.0, 0.0, -180.0)
)


def derived_uid(uid: str, salt: str) -> str:
    """A ``2.25`` UID (PS3.5 B.2) for the copy of ``uid``."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{salt}/{uid}').int}"


def _later(value: str, days: int) -> str:
    return (datetime.strptime(value, "%Y%m%d") + timedelta(days=days)).strftime("%Y%m%d")


def write_moved_copy(
    source: Path | list[Path],
    out_dir: Path,
    transform: RigidTransform,
    days_later: int,
    salt: str = "followup",
) -> list[Path]:
    """Write the moved copy of one axial CT series; return its files in slice order.

    Parameters
    ----------
    source : Path or list of Path
        The series' files, or a folder holding them (``*.dcm`` below it; one series).
    out_dir : Path
        Created if missing.
    transform : RigidTransform
        Copy (current) to source (prior) patient space, as :func:`register_rigid` should find it:
        anatomy at ``q`` in the source appears at ``transform.to_current(q)`` in the copy.
    days_later : int
        Added to StudyDate, SeriesDate, AcquisitionDate and ContentDate.
    salt : str
        Part of every new UID (different salts, different copies).

    Raises
    ------
    ValueError
        For a series that is not axial with one slice spacing.
    """
    paths = sorted(source.rglob("*.dcm")) if isinstance(source, Path) else list(source)
    slices = sorted((dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    if any(
        not np.allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
        for ds in slices
    ):
        raise ValueError("only axial series (ImageOrientationPatient 1\\0\\0\\0\\1\\0)")
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    steps = np.diff(z)
    if len(steps) == 0 or not np.allclose(steps, steps[0], atol=0.01):
        raise ValueError("the slices are not evenly spaced")
    first = slices[0]
    dy, dx = (float(v) for v in first.PixelSpacing)
    origin = tuple(float(v) for v in first.ImagePositionPatient)
    hu = np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in slices
        ]
    )
    moved = move_volume(hu, (float(steps[0]), dy, dx), (origin[0], origin[1], origin[2]), transform)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k, ds in enumerate(slices):
        _restamp(ds, moved[k], days_later, salt)
        path = out_dir / f"CT{k:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _restamp(ds: Dataset, hu: np.ndarray, days_later: int, salt: str) -> None:
    """New pixel data (same stored representation), UIDs and dates."""
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    info = np.iinfo(np.int16 if int(ds.PixelRepresentation) else np.uint16)
    stored = np.clip(np.rint((hu - intercept) / slope), info.min, info.max)
    ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
    ):
        if keyword in ds:
            setattr(ds, keyword, derived_uid(str(getattr(ds, keyword)), salt))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        if ds.get(keyword):
            setattr(ds, keyword, _later(str(getattr(ds, keyword)), days_later))
    if "AccessionNumber" in ds:
        ds.AccessionNumber = ""
