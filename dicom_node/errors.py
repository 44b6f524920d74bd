"""One error hierarchy for the service.

Errors are either *transient* (worth retrying: a broker that is down, a peer that timed out) or
*permanent* (retrying cannot help: a dataset that cannot be decoded, a study with no eligible
series). Third-party errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class NoduleAIError(Exception):
    """Base class of every error this service raises on purpose."""


class TransientError(NoduleAIError):
    """Retry later: the cause is expected to go away (broker down, peer busy, disk briefly full)."""


class PermanentError(NoduleAIError):
    """Do not retry: the input or configuration itself is wrong."""


class ConfigError(PermanentError):
    """Invalid configuration; the message names the setting."""


class StorageFullError(TransientError):
    """Free space on the spool is under the configured floor."""


class UndecodableDatasetError(PermanentError):
    """A received dataset cannot be parsed as DICOM."""


class DatasetMismatchError(PermanentError):
    """A dataset parses, but lacks what its SOP class requires (identifying UIDs, say)."""


class QueueUnavailableError(TransientError):
    """The job queue (RabbitMQ or the embedded one) cannot take or give messages right now."""


class StudyRejectedError(PermanentError):
    """The study cannot be analysed (no eligible series, unusable geometry).

    Parameters
    ----------
    code : str
        Machine-readable reason, e.g. ``no_eligible_series``, ``missing_slices``.
    detail : str
        A sentence for people.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
