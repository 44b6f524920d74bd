"""One retry policy for jobs and deliveries: what a failure means, and when to try again.

:meth:`RetryPolicy.decide` classifies an exception (modelled on dramatiq's ``Retries``
middleware: compute a backoff, re-enqueue with a delay, give up after a bound):

- :class:`~dicom_node.errors.StudyRejectedError` → :attr:`Verdict.REJECT` (the study ends
  ``rejected`` with its reason; nothing is retried);
- any other :class:`~dicom_node.errors.PermanentError` → :attr:`Verdict.DEAD_LETTER` at once;
- :class:`~dicom_node.errors.TransientError`, a database error, and any exception the service did
  not expect → :attr:`Verdict.RETRY` after ``backoff_seconds * 2 ** (attempt - 1)`` (capped), until
  ``max_attempts`` attempts were made; then :attr:`Verdict.DEAD_LETTER`.

A retry is always a delayed requeue (the job's message goes back to the queue with a delay, a
delivery row gets ``next_attempt_at``), never a sleep while holding a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.errors import (
    ErrorCode,
    FailureCode,
    NoduleAIError,
    PermanentError,
    StudyRejectedError,
)


class Verdict(StrEnum):
    """What becomes of the work after a failure."""

    RETRY = "retry"
    DEAD_LETTER = "dead-letter"
    REJECT = "reject"


@dataclass(frozen=True)
class Decision:
    """A classified failure: the verdict, the recorded ``(code, detail)``, the delay to retry."""

    verdict: Verdict
    code: FailureCode
    detail: str
    delay_seconds: float = 0.0


def failure_of(exc: BaseException) -> tuple[FailureCode, str]:
    """The ``(code, detail)`` an exception is recorded with.

    Our own errors carry their code; database errors are ``database_unavailable``; anything else
    is ``internal_error`` with the exception's type in the detail.
    """
    if isinstance(exc, StudyRejectedError):
        return exc.code, exc.detail
    if isinstance(exc, NoduleAIError):
        return exc.code, str(exc)
    if isinstance(exc, SQLAlchemyError):
        return ErrorCode.DATABASE_UNAVAILABLE, f"{type(exc).__name__}: {str(exc)[:200]}"
    return ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff.

    Parameters
    ----------
    max_attempts : int
        Attempts in all, the first included; the last failure is final.
    backoff_seconds : float
        Delay after the first failed attempt; doubled after each further one.
    max_delay_seconds : float
        Cap on any one delay.
    """

    max_attempts: int
    backoff_seconds: float
    max_delay_seconds: float = 300.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.max_delay_seconds, self.backoff_seconds * 2 ** max(0, attempt - 1)))

    def decide(self, exc: BaseException, attempt: int) -> Decision:
        """Classify the failure of attempt number ``attempt`` (1-based)."""
        code, detail = failure_of(exc)
        if isinstance(exc, StudyRejectedError):
            return Decision(Verdict.REJECT, code, detail)
        if isinstance(exc, PermanentError):
            return Decision(Verdict.DEAD_LETTER, code, detail)
        return self.transient(code, detail, attempt)

    def transient(self, code: FailureCode, detail: str, attempt: int) -> Decision:
        """A failure worth retrying: retry after the backoff, or give up after the last attempt."""
        if attempt >= self.max_attempts:
            return Decision(
                Verdict.DEAD_LETTER, code, f"{detail} (gave up after {attempt} attempts)"
            )
        return Decision(Verdict.RETRY, code, detail, self.delay(attempt))
