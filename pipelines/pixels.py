"""Pixel data of a CT series: decoding frames and the modality rescale to Hounsfield units.

Decoding goes through pydicom's pixel handlers (pylibjpeg for JPEG, JPEG-LS, JPEG 2000, RLE),
reading only the frames asked for; stored values become float32 HU with each frame's
RescaleSlope/Intercept (PS3.3 C.8.2.1.1.3, C.7.6.16.2.9), written into preallocated arrays so that
a stack costs one float32 volume. Failures are :class:`~dicom_node.errors.StudyRejectedError`
(``undecodable_pixel_data``, ``unsupported_pixel_data``, ``inconsistent_geometry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.utils import iter_pixels, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.errors import RejectionCode, StudyRejectedError
from pipelines.headers import FrameHeader

FloatArray = npt.NDArray[np.float32]


def read_hu(
    path: Path,
    frame_index: int | None,
    slope: float,
    intercept: float,
    out: FloatArray | None = None,
) -> FloatArray:
    """Decode one frame and apply the modality rescale to HU (PS3.3 C.8.2.1.1.3 / C.7.6.16.2.9).

    Parameters
    ----------
    path : Path
        The instance file; decoding goes through pydicom's pixel handlers (pylibjpeg for JPEG,
        JPEG-LS, JPEG 2000, RLE), reading only the requested frame.
    frame_index : int or None
        0-based frame of a multi-frame instance, None for single-frame.
    slope, intercept : float
        RescaleSlope and RescaleIntercept of this frame.
    out : numpy.ndarray, optional
        float32 ``[rows, columns]`` to write into (no temporary float array is made).

    Returns
    -------
    numpy.ndarray
        float32 HU.
    """
    try:
        stored = pixel_array(_decoder_source(path), index=frame_index)
    except DECODE_ERRORS as exc:
        raise StudyRejectedError(
            RejectionCode.UNDECODABLE_PIXEL_DATA, f"{path.name}: {exc}"
        ) from exc
    return _rescale(stored, slope, intercept, out, path.name)


DECODE_ERRORS = (
    AttributeError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    KeyError,
    InvalidDicomError,
    OSError,
)


def _decoder_source(path: Path) -> str | Dataset:
    """What to hand pydicom's decoders: the path (frames read on demand), or a dataset.

    pydicom decodes frames straight from the file, except from a Deflated Explicit VR Little
    Endian file (PS3.5 A.5), which needs a full ``dcmread`` first.
    """
    syntax = read_file_meta_info(path).get("TransferSyntaxUID")
    return dcmread(path) if syntax == DeflatedExplicitVRLittleEndian else str(path)


def _rescale(
    stored: npt.NDArray[Any],
    slope: float,
    intercept: float,
    out: FloatArray | None,
    name: str,
) -> FloatArray:
    """``stored * slope + intercept`` as float32, written into ``out`` (PS3.3 C.11.1.1.2)."""
    if stored.ndim != 2:
        raise StudyRejectedError(
            RejectionCode.UNSUPPORTED_PIXEL_DATA, f"{name}: not a single-sample image"
        )
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    elif out.shape != stored.shape:
        raise StudyRejectedError(
            RejectionCode.INCONSISTENT_GEOMETRY, f"{name}: pixel matrix is not Rows x Columns"
        )
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)
    return out


def load_stack(frames: Sequence[FrameHeader]) -> FloatArray:
    """Decode every frame into one preallocated float32 array, in the given (z) order.

    Single-frame instances are decoded one file at a time; the frames of a multi-frame instance
    are decoded in one sequential pass over the file (``iter_pixels``), not by seeking each.
    """
    head = frames[0]
    stack = np.empty((len(frames), head.rows, head.columns), dtype=np.float32)
    members: dict[Path, list[tuple[int, FrameHeader]]] = {}
    for k, frame in enumerate(frames):
        members.setdefault(frame.path, []).append((k, frame))
    for path, slots in members.items():
        if slots[0][1].frame_index is None:
            for k, frame in slots:
                read_hu(path, None, frame.slope, frame.intercept, out=stack[k])
        else:
            _load_multiframe(path, slots, stack)
    return stack


def _load_multiframe(path: Path, slots: list[tuple[int, FrameHeader]], stack: FloatArray) -> None:
    """Decode the wanted frames of one multi-frame instance into their slots (PS3.3 C.7.6.16)."""
    by_index = {frame.frame_index: (k, frame) for k, frame in slots}
    wanted = sorted(i for i in by_index if i is not None)
    try:
        decoded = iter_pixels(_decoder_source(path), indices=wanted)
        for index, stored in zip(wanted, decoded, strict=True):
            k, frame = by_index[index]
            _rescale(stored, frame.slope, frame.intercept, stack[k], path.name)
    except DECODE_ERRORS as exc:
        raise StudyRejectedError(
            RejectionCode.UNDECODABLE_PIXEL_DATA, f"{path.name}: {exc}"
        ) from exc
