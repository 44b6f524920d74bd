"""DIMSE status codes, and the one place that maps exceptions to them.

See DICOM PS3.4 Annex B.2.3 (Storage Service Class statuses) and PS3.7 Annex C.
"""

from __future__ import annotations

from enum import IntEnum

from dicom_node.errors import (
    DatasetMismatchError,
    TransientError,
    UndecodableDatasetError,
)


class Status(IntEnum):
    """DIMSE statuses the node answers with."""

    SUCCESS = 0x0000
    #: PS3.7 C.4: the SCP could not process the request.
    PROCESSING_FAILURE = 0x0110
    #: PS3.4 B.2.3: Refused, out of resources.
    OUT_OF_RESOURCES = 0xA700
    #: PS3.4 B.2.3: Error, data set does not match SOP class.
    DATASET_MISMATCH = 0xA900
    #: PS3.4 B.2.3: Error, cannot understand (the dataset cannot be decoded).
    CANNOT_UNDERSTAND = 0xC210
    #: PS3.4 B.2.3: Warning, data set does not match SOP class (stored nonetheless).
    DATASET_MISMATCH_WARNING = 0xB007


def status_for(exc: BaseException) -> Status:
    """Return the C-STORE status that answers ``exc``.

    Parameters
    ----------
    exc : BaseException
        The error raised while handling a C-STORE request.

    Returns
    -------
    Status
        ``OUT_OF_RESOURCES`` for what should pass (a full spool, the database unavailable: the
        sender is to try again later), ``CANNOT_UNDERSTAND`` for an undecodable dataset,
        ``DATASET_MISMATCH`` for a dataset missing required identifiers, and
        ``PROCESSING_FAILURE`` for anything else.
    """
    if isinstance(exc, TransientError):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, UndecodableDatasetError):
        return Status.CANNOT_UNDERSTAND
    if isinstance(exc, DatasetMismatchError):
        return Status.DATASET_MISMATCH
    return Status.PROCESSING_FAILURE
