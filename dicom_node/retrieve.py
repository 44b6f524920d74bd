"""Query/Retrieve SCU: find a patient's earlier CT studies at the PACS and fetch one.

Study Root Query/Retrieve Information Model (PS3.4 C.6.2): C-FIND at STUDY level (PS3.4 C.4.1),
then C-MOVE (PS3.4 C.4.2) of the chosen study to our own AE title, whose instances arrive through
the node's C-STORE SCP, or C-GET (PS3.4 C.4.3), whose instances arrive on this association and
are stored through :class:`dicom_node.ingest.Ingest` here. Either way every instance ends in the
spool with its row, as a pushed one would.

Everything is bounded by one deadline: an association still open when it passes is aborted,
and :class:`RetrieveError` says why nothing (or not everything) came. The error carries a code a
study's report can show (``association_rejected``, ``query_refused``, ``retrieve_refused``,
``retrieve_incomplete``, ``timeout``, ``unreachable``); identifiers (PatientID, UIDs) never go
into its message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.config import DimseDestination
from dicom_node.results import RESULT_SOP_CLASSES
from dicom_node.status import Status, status_for

LOGGER = logging.getLogger(__name__)

#: Storage SOP classes a C-GET proposes to receive (SCP role, PS3.7 D.3.3.4): CT images and
#: the result objects a prior may carry (ours among them).
GET_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    *sorted(RESULT_SOP_CLASSES),
)


class RetrieveFailure(StrEnum):
    """Why no prior (or not all of it) was retrieved."""

    UNREACHABLE = "unreachable"
    ASSOCIATION_REJECTED = "association_rejected"
    QUERY_REFUSED = "query_refused"
    RETRIEVE_REFUSED = "retrieve_refused"
    RETRIEVE_INCOMPLETE = "retrieve_incomplete"
    TIMEOUT = "timeout"


class RetrieveError(Exception):
    """A query or retrieval that did not succeed; ``code`` says how (no identifiers inside)."""

    def __init__(self, code: RetrieveFailure, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class StudyMatch:
    """One study a C-FIND found."""

    study_instance_uid: str
    study_date: date | None
    modalities: tuple[str, ...]
    description: str
    #: NumberOfStudyRelatedInstances as the PACS reports it (0: not reported).
    instances: int = 0


@dataclass(frozen=True)
class Retrieved:
    """What a retrieval brought: sub-operations completed, failed and with warnings."""

    completed: int
    failed: int
    warning: int


def _date(value: object) -> date | None:
    try:
        return datetime.strptime(str(value), "%Y%m%d").date()
    except ValueError:
        return None


class QueryRetrieve:
    """Query/Retrieve SCU towards one PACS.

    Parameters
    ----------
    source : DimseDestination
        The PACS (its Q/R SCP: AE title, host, port, TLS).
    ae_title : str
        Our AE title: the calling AE, and the C-MOVE destination.
    deadline : float
        ``time.monotonic()`` value after which every association is aborted.
    """

    def __init__(self, source: DimseDestination, ae_title: str, deadline: float) -> None:
        self.source = source
        self.ae_title = ae_title
        self.deadline = deadline

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()

    @contextmanager
    def _association(self, ae: AE, what: str, **kwargs: Any) -> Iterator[Association]:
        """An association with the source, aborted when the deadline passes."""
        left = self.remaining()
        if left <= 0:
            raise RetrieveError(RetrieveFailure.TIMEOUT, f"no time left for the {what}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = max(left, 1.0)
        s = self.source
        assoc = ae.associate(s.host, s.port, ae_title=s.ae_title, tls_args=s.tls_args(), **kwargs)
        if not assoc.is_established:
            code = RetrieveFailure.UNREACHABLE
            if assoc.is_rejected:
                code = RetrieveFailure.ASSOCIATION_REJECTED
            elif self.remaining() <= 0:  # a peer that accepts the connection but never answers
                code = RetrieveFailure.TIMEOUT
            raise RetrieveError(code, f"{what}: association with {s.ae_title} not established")
        timer = threading.Timer(max(self.remaining(), 0.0), assoc.abort)
        timer.daemon = True
        timer.start()
        try:
            yield assoc
        finally:
            timer.cancel()
            if assoc.is_established:
                assoc.release()
        if self.remaining() <= 0:
            raise RetrieveError(RetrieveFailure.TIMEOUT, f"{what} ran past the deadline")

    def find_studies(self, patient_id: str, before: date) -> list[StudyMatch]:
        """The patient's studies with a StudyDate before ``before`` (C-FIND, STUDY level).

        The query asks for CT in ModalitiesInStudy; SCPs that do not match on it return every
        study, so the answers are filtered here as well (a study that lists no modality stays).
        """
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient_id
        query.StudyInstanceUID = ""
        query.StudyDate = f"-{before.strftime('%Y%m%d')}"
        query.ModalitiesInStudy = "CT"
        query.StudyDescription = ""
        query.NumberOfStudyRelatedInstances = ""
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        found: list[StudyMatch] = []
        with self._association(ae, "query") as assoc:
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                code = _status(status, "query", RetrieveFailure.QUERY_REFUSED, self.deadline)
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    found.append(_match(identifier))
        return [
            m
            for m in found
            if (not m.modalities or "CT" in m.modalities)
            and m.study_date is not None
            and m.study_date < before
        ]

    def move(self, study_uid: str) -> Retrieved:
        """C-MOVE the study to our own AE title; return once the PACS says it is done."""
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        with self._association(ae, "retrieval") as assoc:
            final = self._retrieve(
                self.deadline,
                assoc.send_c_move(
                    _study_level(study_uid),
                    self.ae_title,
                    StudyRootQueryRetrieveInformationModelMove,
                ),
            )
        return final

    def get(self, study_uid: str, store: Callable[[bytes], object]) -> Retrieved:
        """C-GET the study; ``store`` makes each instance durable (given it encoded, with its
        file meta) or raises what :func:`dicom_node.status.status_for` answers."""

        def on_store(event: evt.Event) -> int:
            try:
                store(event.encoded_dataset())
            except Exception as exc:  # the status tells the PACS; the cause is logged here
                LOGGER.warning("a retrieved instance was not stored: %s", type(exc).__name__)
                return int(status_for(exc))
            return int(Status.SUCCESS)

        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in GET_STORAGE_CLASSES:
            ae.add_requested_context(sop_class)
        roles = [build_role(sop_class, scp_role=True) for sop_class in GET_STORAGE_CLASSES]
        with self._association(
            ae, "retrieval", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        ) as assoc:
            final = self._retrieve(
                self.deadline,
                assoc.send_c_get(
                    _study_level(study_uid), StudyRootQueryRetrieveInformationModelGet
                ),
            )
        return final

    @staticmethod
    def _retrieve(
        deadline: float, responses: Iterator[tuple[Dataset, Dataset | None]]
    ) -> Retrieved:
        """Follow C-MOVE/C-GET responses to the final one; raise unless it reports success."""
        last = Retrieved(0, 0, 0)
        for status, _identifier in responses:
            code = _status(status, "retrieval", RetrieveFailure.RETRIEVE_REFUSED, deadline)
            last = Retrieved(
                int(status.get("NumberOfCompletedSuboperations", last.completed) or 0),
                int(status.get("NumberOfFailedSuboperations", 0) or 0),
                int(status.get("NumberOfWarningSuboperations", 0) or 0),
            )
            if code in (0xFF00,):
                continue
            if code == 0xB000 or last.failed:  # some sub-operations failed (PS3.4 C.4.2.1.4.1)
                raise RetrieveError(
                    RetrieveFailure.RETRIEVE_INCOMPLETE,
                    f"{last.completed} instances retrieved, {last.failed} failed",
                )
        return last


def _status(status: Dataset, what: str, refused: RetrieveFailure, deadline: float) -> int:
    """The response's status; raise for none and for a failure.

    No response before the deadline means the PACS aborted the association or dropped the
    connection (Orthanc does so for a C-FIND or C-MOVE its configuration does not allow): a
    refusal; after the deadline, a timeout.
    """
    if "Status" not in status:
        if time.monotonic() >= deadline:
            raise RetrieveError(RetrieveFailure.TIMEOUT, f"no {what} response before the deadline")
        raise RetrieveError(refused, f"no {what} response (association aborted by the PACS)")
    code = int(status.Status)
    if code in (0x0000, 0xFF00, 0xFF01, 0xB000):
        return code
    raise RetrieveError(refused, f"{what} answered status 0x{code:04X}")


def _match(identifier: Dataset) -> StudyMatch:
    modalities = identifier.get("ModalitiesInStudy", "")
    if isinstance(modalities, str):
        modalities = [m for m in modalities.split("\\") if m]
    return StudyMatch(
        study_instance_uid=str(identifier.get("StudyInstanceUID", "")),
        study_date=_date(identifier.get("StudyDate", "")),
        modalities=tuple(str(m) for m in modalities),
        description=str(identifier.get("StudyDescription", "")),
        instances=_int(identifier.get("NumberOfStudyRelatedInstances", "")),
    )


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def _study_level(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier
