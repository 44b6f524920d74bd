"""The one retry policy: what each failure means, the backoff, the attempt bound."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from dicom_node.delivery import store_status_failure
from dicom_node.errors import (
    DestinationRefusedError,
    DestinationUnavailableError,
    EncodingError,
    ErrorCode,
    RejectionCode,
    StudyRejectedError,
    TransientError,
)
from dicom_node.retry import RetryPolicy, Verdict

POLICY = RetryPolicy(max_attempts=3, backoff_seconds=5.0, max_delay_seconds=12.0)


def test_a_rejected_study_is_rejected_with_its_reason_at_any_attempt() -> None:
    error = StudyRejectedError(RejectionCode.MISSING_SLICES, "a 5 mm gap")
    decision = POLICY.decide(error, 1)
    assert (decision.verdict, decision.code, decision.detail) == (
        Verdict.REJECT,
        RejectionCode.MISSING_SLICES,
        "a 5 mm gap",
    )


def test_a_permanent_fault_is_dead_lettered_at_the_first_attempt() -> None:
    decision = POLICY.decide(EncodingError("highdicom refused"), 1)
    assert (decision.verdict, decision.code) == (Verdict.DEAD_LETTER, ErrorCode.ENCODING_FAILED)


@pytest.mark.parametrize(
    ("attempt", "verdict", "delay"),
    [(1, Verdict.RETRY, 5.0), (2, Verdict.RETRY, 10.0), (3, Verdict.DEAD_LETTER, 0.0)],
)
def test_a_transient_fault_is_retried_with_a_doubling_delay_until_the_last_attempt(
    attempt: int, verdict: Verdict, delay: float
) -> None:
    decision = POLICY.decide(TransientError("peer busy"), attempt)
    assert (decision.verdict, decision.code, decision.delay_seconds) == (
        verdict,
        ErrorCode.TRANSIENT,
        delay,
    )
    if verdict is Verdict.DEAD_LETTER:
        assert decision.detail == "peer busy (gave up after 3 attempts)"


def test_the_delay_is_capped() -> None:
    assert [POLICY.delay(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 12.0, 12.0]


def test_unexpected_and_database_errors_are_retried_with_their_own_codes() -> None:
    unexpected = POLICY.decide(KeyError("x"), 1)
    database = POLICY.decide(OperationalError("SELECT 1", {}, Exception("gone")), 1)
    assert (unexpected.verdict, unexpected.code) == (Verdict.RETRY, ErrorCode.INTERNAL)
    assert "KeyError" in unexpected.detail
    assert (database.verdict, database.code) == (Verdict.RETRY, ErrorCode.DATABASE_UNAVAILABLE)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, None),
        (0xB000, None),  # coercion of data elements: stored
        (0xB007, None),  # data set does not match SOP class: stored with a warning
        (0xB006, None),  # elements discarded: stored
        (0xA700, DestinationUnavailableError),  # out of resources
        (0xA7FF, DestinationUnavailableError),
        (0xA900, DestinationRefusedError),  # data set does not match SOP class
        (0xC000, DestinationRefusedError),  # cannot understand
        (0x0110, DestinationRefusedError),  # processing failure
        (0x0122, DestinationRefusedError),  # SOP class not supported
    ],
)
def test_c_store_statuses_map_to_stored_retry_later_or_refused(
    status: int, outcome: type[Exception] | None
) -> None:
    failure = store_status_failure(status)
    if outcome is None:
        assert failure is None
    else:
        assert isinstance(failure, outcome) and f"0x{status:04X}" in str(failure)
        transient = POLICY.decide(failure, 1).verdict is Verdict.RETRY
        assert transient == (outcome is DestinationUnavailableError)
