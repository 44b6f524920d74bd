"""One error hierarchy for the service, and the codes that failures are recorded with.

Errors are either *transient* (worth retrying: a broker that is down, a peer that timed out) or
*permanent* (retrying cannot help: a dataset that cannot be decoded, a study with no eligible
series). Third-party errors are translated at the boundary with ``raise ... from exc``.

Every error class carries an :class:`ErrorCode`; jobs and deliveries store a failure as
``(code, detail)``: :mod:`dicom_node.retry` decides what a failure means,
:mod:`dicom_node.lifecycle` records it. A rejected study's code is a :class:`RejectionCode`.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a job or a delivery did not succeed (stored in ``error_code`` columns)."""

    #: A transient fault (network, peer busy) without a more specific code.
    TRANSIENT = "transient"
    #: A permanent fault without a more specific code.
    PERMANENT = "permanent"
    #: An exception the service did not expect (a bug, or an unknown third-party failure).
    INTERNAL = "internal_error"
    #: The database could not be reached or refused the transaction.
    DATABASE_UNAVAILABLE = "database_unavailable"
    #: The job queue (RabbitMQ or the embedded queue) could not take or give messages.
    QUEUE_UNAVAILABLE = "queue_unavailable"
    #: The spool's free space is under the configured floor.
    STORAGE_FULL = "storage_full"
    #: A spooled file could not be read: the node's spool unreachable over HTTP, or a file
    #: missing or not as it was stored (length or digest).
    SPOOL_UNREADABLE = "spool_unreadable"
    #: The configuration is invalid (or no longer names a destination).
    CONFIG_INVALID = "config_invalid"
    #: A received dataset cannot be parsed as DICOM.
    UNDECODABLE_DATASET = "undecodable_dataset"
    #: A dataset parses but lacks what its SOP class requires.
    DATASET_MISMATCH = "dataset_mismatch"
    #: The inference backend failed (model files, runtime).
    INFERENCE_FAILED = "inference_failed"
    #: The findings could not be encoded as DICOM SEG/SR/GSPS or FHIR resources.
    ENCODING_FAILED = "encoding_failed"
    #: The job was tried ``max_attempts`` times.
    RETRIES_EXHAUSTED = "retries_exhausted"
    #: A destination refused an object for good (C-STORE 0xA9xx/0xCxxx, HTTP 4xx).
    REFUSED = "refused"
    #: A destination could not take an object now (C-STORE 0xA7xx, timeouts, HTTP 5xx).
    UNAVAILABLE = "destination_unavailable"
    #: One or more of the job's deliveries failed.
    DELIVERY_FAILED = "delivery_failed"


class RejectionCode(StrEnum):
    """Why a study cannot be analysed (:class:`StudyRejectedError`); shown to operators."""

    NO_ELIGIBLE_SERIES = "no_eligible_series"
    MIXED_SERIES = "mixed_series"
    NO_PIXEL_DATA = "no_pixel_data"
    NO_PIXEL_SPACING = "no_pixel_spacing"
    NO_IMAGE_PLANE = "no_image_plane"
    NO_FRAME_OF_REFERENCE = "no_frame_of_reference"
    INCONSISTENT_GEOMETRY = "inconsistent_geometry"
    NOT_AXIAL = "not_axial"
    GANTRY_TILT = "gantry_tilt"
    TOO_FEW_SLICES = "too_few_slices"
    DUPLICATE_POSITIONS = "duplicate_positions"
    MISSING_SLICES = "missing_slices"
    UNEVEN_SPACING = "uneven_spacing"
    UNDECODABLE_PIXEL_DATA = "undecodable_pixel_data"
    UNSUPPORTED_PIXEL_DATA = "unsupported_pixel_data"
    UNREADABLE_INSTANCE = "unreadable_instance"


#: What a failure is recorded with: an :class:`ErrorCode`, or for a rejection its reason.
FailureCode = ErrorCode | RejectionCode


class NoduleAIError(Exception):
    """Base class of every error this service raises on purpose."""

    #: What the failure is recorded with (a class attribute; a rejection's is its reason).
    code: FailureCode = ErrorCode.INTERNAL


class TransientError(NoduleAIError):
    """Retry later: the cause is expected to go away (broker down, peer busy, disk briefly full)."""

    code = ErrorCode.TRANSIENT


class PermanentError(NoduleAIError):
    """Do not retry: the input or configuration itself is wrong."""

    code: FailureCode = ErrorCode.PERMANENT


class ConfigError(PermanentError):
    """Invalid configuration; the message names the setting."""

    code = ErrorCode.CONFIG_INVALID


class StorageFullError(TransientError):
    """Free space on the spool is under the configured floor."""

    code = ErrorCode.STORAGE_FULL


class SpoolUnreadableError(TransientError):
    """A spooled file cannot be read now (the node unreachable, or a file missing or not as
    it was stored)."""

    code = ErrorCode.SPOOL_UNREADABLE


class UndecodableDatasetError(PermanentError):
    """A received dataset cannot be parsed as DICOM."""

    code = ErrorCode.UNDECODABLE_DATASET


class DatasetMismatchError(PermanentError):
    """A dataset parses, but lacks what its SOP class requires (identifying UIDs, say)."""

    code = ErrorCode.DATASET_MISMATCH


class DatabaseUnavailableError(TransientError):
    """The database cannot be reached or refused the transaction right now."""

    code = ErrorCode.DATABASE_UNAVAILABLE


class QueueUnavailableError(TransientError):
    """The job queue (RabbitMQ or the embedded one) cannot take or give messages right now."""

    code = ErrorCode.QUEUE_UNAVAILABLE


class InferenceError(TransientError):
    """The inference backend failed to load or run (a GPU busy or lost, a runtime error)."""

    code = ErrorCode.INFERENCE_FAILED


class EncodingError(PermanentError):
    """The findings cannot be encoded (SEG, SR, GSPS, FHIR): the same input fails again."""

    code = ErrorCode.ENCODING_FAILED


class DestinationRefusedError(PermanentError):
    """A destination refused what was sent (C-STORE failure status, HTTP 4xx)."""

    code = ErrorCode.REFUSED


class DestinationUnavailableError(TransientError):
    """A destination could not be reached or is out of resources (C-STORE 0xA7xx, HTTP 5xx)."""

    code = ErrorCode.UNAVAILABLE


class StudyRejectedError(PermanentError):
    """The study cannot be analysed (no eligible series, unusable geometry).

    Parameters
    ----------
    rejection : RejectionCode
        Machine-readable reason (becomes :attr:`code`).
    detail : str
        A sentence for people.
    """

    def __init__(self, rejection: RejectionCode, detail: str) -> None:
        self.code = rejection
        super().__init__(f"{self.code}: {detail}")
        self.detail = detail
