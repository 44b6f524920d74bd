"""Delivery: stored result objects back to the PACS (C-STORE SCU or STOW-RS), reports to FHIR.

Every stored result artifact has a delivery row per destination (:mod:`dicom_node.lifecycle`
creates them). The delivery loop sends what is due, grouped per job and destination (one
association, proposing exactly the SOP classes and transfer syntaxes of the files sent), and
records each row's outcome with the one retry policy (:mod:`dicom_node.retry`): confirmed, retried
after a backoff (the destination was unavailable), or failed at once (the destination refused it,
or the attempts ran out). Delivery ships only what the worker stored: the DICOM files and the FHIR
resources of the job's result set. Output UIDs are deterministic, so a resend is stored once.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import httpx
from pydicom import Dataset, dcmread
from pynetdicom import AE
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from sqlalchemy import select

from dicom_node.config import (
    DicomWebDestination,
    DimseDestination,
    FhirDestination,
    NodeConfig,
    OrthancRest,
    Retraction,
    Settings,
)
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryKind,
    DeliveryState,
    Instance,
    Job,
    JobState,
    ReportStatus,
    Series,
    Study,
    utcnow,
)
from dicom_node.errors import (
    ConfigError,
    DestinationRefusedError,
    DestinationUnavailableError,
    NoduleAIError,
    PermanentError,
)
from dicom_node.fhir_client import FhirClient
from dicom_node.fhir_resources import ReportSubject, build_report, report_subject
from dicom_node.lifecycle import record_delivery, settle_deliveries
from dicom_node.retry import RetryPolicy
from dicom_node.spool import LocalSpool

LOGGER = logging.getLogger(__name__)

#: Per SOP Instance UID: ``None`` (the destination confirmed it) or why it did not.
SendOutcome = dict[str, NoduleAIError | None]


class Sender(Protocol):
    """Sends DICOM files to one destination."""

    def send(self, paths: Sequence[Path]) -> SendOutcome:
        """Send ``paths``; raise :class:`DestinationUnavailableError` when nothing could be sent."""


def _meta(path: Path) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Transfer Syntax UID) from the file meta."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return (
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
    )


def store_status_failure(code: int) -> NoduleAIError | None:
    """What a C-STORE response status means for delivery (PS3.4 B.2.3, PS3.7 C).

    Success and warnings (0xB000, 0xB007, 0xB006: stored, maybe coerced) are ``None``; 0xA7xx
    (out of resources) is :class:`DestinationUnavailableError` (try again later); every other
    failure (0xA9xx data set does not match, 0xCxxx cannot understand, 0x01xx, ...) is
    :class:`DestinationRefusedError` (sending it again cannot help). The categories are
    pynetdicom's (:func:`pynetdicom.status.code_to_category`).
    """
    if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):
        return None
    if 0xA700 <= code <= 0xA7FF:
        return DestinationUnavailableError(f"C-STORE status 0x{code:04X} (out of resources)")
    return DestinationRefusedError(f"C-STORE status 0x{code:04X}")


class DimseSender:
    """C-STORE SCU to a PACS (PS3.4 B), optionally over TLS.

    Parameters
    ----------
    destination : DimseDestination
        AE title, host, port and TLS files of the PACS.
    calling_ae : str
        Our AE title.
    timeout : float
        ACSE, DIMSE and network timeout in seconds.
    """

    def __init__(self, destination: DimseDestination, calling_ae: str, timeout: float = 30) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeout = timeout

    def send(self, paths: Sequence[Path]) -> SendOutcome:
        """Store ``paths`` over one association proposing exactly what they need."""
        metas = {path: _meta(path) for path in paths}
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        syntaxes: dict[str, set[str]] = defaultdict(set)
        for sop_class, _uid, syntax in metas.values():
            syntaxes[sop_class].add(syntax)
        for sop_class, names in sorted(syntaxes.items()):
            ae.add_requested_context(sop_class, sorted(names))
        d = self.destination
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=d.tls_args())
        if not assoc.is_established:
            raise DestinationUnavailableError(
                f"association with {d.ae_title}@{d.host}:{d.port} not established"
            )
        outcome: SendOutcome = {}
        try:
            for path, (_sop_class, uid, _syntax) in metas.items():
                outcome[uid] = self._store_one(assoc, path)
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        for _sop_class, uid, _syntax in metas.values():
            if uid not in outcome:
                outcome[uid] = DestinationUnavailableError("association ended before it was sent")
        return outcome

    @staticmethod
    def _store_one(assoc: object, path: Path) -> NoduleAIError | None:
        try:
            status = assoc.send_c_store(path)  # type: ignore[attr-defined]
        except (OSError, RuntimeError, ValueError) as exc:
            return DestinationUnavailableError(f"C-STORE failed: {exc}")
        if "Status" not in status:
            return DestinationUnavailableError("no C-STORE response (timeout or abort)")
        return store_status_failure(int(status.Status))


class StowSender:
    """STOW-RS to a DICOMweb server (PS3.18 10.5), one multipart request per batch."""

    def __init__(self, destination: DicomWebDestination, timeout: float = 60) -> None:
        self.destination = destination
        self.timeout = timeout

    def _auth(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Extra headers and basic-auth credentials."""
        d = self.destination
        if d.token is not None:
            return {"Authorization": f"Bearer {d.token.get_secret_value()}"}, None
        if d.username is not None and d.password is not None:
            return {}, (d.username, d.password.get_secret_value())
        return {}, None

    def send(self, paths: Sequence[Path]) -> SendOutcome:
        """POST the files as ``multipart/related; type="application/dicom"``."""
        boundary = "noduleai-stow-boundary"
        body = (
            b"".join(
                b"--"
                + boundary.encode()
                + b"\r\nContent-Type: application/dicom\r\n\r\n"
                + path.read_bytes()
                + b"\r\n"
                for path in paths
            )
            + b"--"
            + boundary.encode()
            + b"--\r\n"
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        extra, auth = self._auth()
        headers.update(extra)
        url = self.destination.url.rstrip("/") + "/studies"
        try:
            response = httpx.post(
                url, content=body, headers=headers, timeout=self.timeout, auth=auth
            )
        except httpx.HTTPError as exc:
            raise DestinationUnavailableError(f"STOW-RS to {url} failed: {exc}") from exc
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise DestinationUnavailableError(f"STOW-RS to {url}: HTTP {response.status_code}")
        failed = _stow_failures(response)
        uids = [_meta(path)[1] for path in paths]
        if response.status_code >= 400 and not failed:
            return {uid: DestinationRefusedError(f"HTTP {response.status_code}") for uid in uids}
        return {
            uid: DestinationRefusedError(failed[uid]) if uid in failed else None for uid in uids
        }


def _stow_failures(response: httpx.Response) -> dict[str, str]:
    """SOP Instance UIDs in the response's Failed SOP Sequence (0008,1198) with their reasons."""
    try:
        payload = response.json()
    except ValueError:
        return {}
    failed = (payload or {}).get("00081198", {}).get("Value", [])
    out = {}
    for item in failed:
        uid = item.get("00081155", {}).get("Value", [""])[0]
        reason = item.get("00081197", {}).get("Value", ["?"])[0]
        out[uid] = f"STOW-RS failure reason {reason}"
    return out


class OrthancRetractor:
    """Retracts replaced results by deleting them through Orthanc's REST API.

    For each instance the rejection note lists: ``POST /tools/lookup`` with its SOP Instance UID,
    then ``DELETE /instances/{id}``. An instance Orthanc does not hold (never delivered, deleted
    already) is skipped, so a retried retraction finishes what an interrupted one began.
    """

    def __init__(self, rest: OrthancRest, timeout: float = 30) -> None:
        self.rest = rest
        self.timeout = timeout

    def retract(self, note: Path) -> NoduleAIError | None:
        """Delete every instance ``note`` lists; ``None`` when all are gone."""
        auth = None
        if self.rest.username is not None and self.rest.password is not None:
            auth = (self.rest.username, self.rest.password.get_secret_value())
        base = self.rest.url.rstrip("/")
        try:
            with httpx.Client(base_url=base, auth=auth, timeout=self.timeout) as client:
                for uid in rejected_instances(dcmread(note)):
                    found = _orthanc_answer(client.post("/tools/lookup", content=uid)).json()
                    for item in found:
                        if item.get("Type") == "Instance":
                            _orthanc_answer(client.delete(f"/instances/{item['ID']}"), ok=404)
        except httpx.HTTPError as exc:
            return DestinationUnavailableError(f"Orthanc REST at {base}: {exc}")
        except NoduleAIError as exc:
            return exc
        return None


def _orthanc_answer(response: httpx.Response, ok: int = 200) -> httpx.Response:
    """``response`` if it succeeded (or answered ``ok``); else the error it means."""
    if response.is_success or response.status_code == ok:
        return response
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise DestinationUnavailableError(f"Orthanc REST: HTTP {response.status_code}")
    raise DestinationRefusedError(f"Orthanc REST: HTTP {response.status_code}")


def rejected_instances(note: Dataset) -> list[str]:
    """SOP Instance UIDs a rejection note lists (its Current Requested Procedure Evidence)."""
    return [
        str(item.ReferencedSOPInstanceUID)
        for study in note.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedSOPSequence", [])
    ]


#: The order in which a job's FHIR report statuses are published (a report never goes back).
REPORT_ORDER = (ReportStatus.REGISTERED, ReportStatus.PRELIMINARY, ReportStatus.CANCELLED)


class DeliveryLoop(threading.Thread):
    """Sends due deliveries every ``interval`` seconds, or when woken.

    Parameters
    ----------
    settings : Settings
        Our AE title, attempts and backoff.
    db : Database
        Delivery rows and jobs.
    config : NodeConfig
        The destinations.
    """

    def __init__(
        self, settings: Settings, db: Database, config: NodeConfig, interval: float = 1.0
    ) -> None:
        super().__init__(name="delivery", daemon=True)
        self.settings = settings
        self.db = db
        self.config = config
        self.destinations = {d.name: d for d in config.destinations}
        self.spool = LocalSpool(settings.spool_dir, min_free_bytes=0)
        self.policy = RetryPolicy(settings.delivery_max_attempts, settings.delivery_backoff_seconds)
        self.interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def wake(self) -> None:
        """Look for due deliveries now."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stopping.set()
        self._wake.set()
        self.join(timeout=60)

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.deliver_due()
            except Exception:
                LOGGER.exception("delivery pass failed; trying again")

    def deliver_due(self) -> int:
        """Send every due delivery, grouped by job and destination; return how many were due."""
        now = utcnow()
        with self.db.session() as session:
            due = session.execute(
                select(Delivery.job_id, Delivery.destination)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    (Delivery.next_attempt_at.is_(None)) | (Delivery.next_attempt_at <= now),
                )
                .distinct()
            ).all()
        for job_id, destination in due:
            self._deliver(job_id, destination)
        return len(due)

    def _deliver(self, job_id: str, name: str) -> None:
        """Send the group's due rows: its objects first, its retraction (the rejection note)
        only once every object of the job was confirmed there, in the same pass when it can."""
        while True:
            batch = self._batch(job_id, name)
            if not batch:
                return
            try:
                outcome = self._send(job_id, name, batch)
            except Exception as exc:  # classified by the retry policy, like any other failure
                outcome = dict.fromkeys((row.id for row in batch), exc)
            self._record(job_id, name, outcome)
            if any(failure is not None for failure in outcome.values()):
                return

    def _batch(self, job_id: str, name: str) -> list[Delivery]:
        """The group's pending rows that are due now, retractions held back behind objects."""
        now = utcnow()
        with self.db.session() as session:
            pending = session.scalars(
                select(Delivery).where(
                    Delivery.job_id == job_id,
                    Delivery.destination == name,
                    Delivery.state == DeliveryState.PENDING,
                )
            ).all()
        objects = [row for row in pending if row.kind != DeliveryKind.RETRACTION]
        rows = objects or list(pending)
        return [row for row in rows if row.next_attempt_at is None or row.next_attempt_at <= now]

    def _send(
        self, job_id: str, name: str, rows: Sequence[Delivery]
    ) -> dict[int, Exception | None]:
        """Send ``rows`` to destination ``name``; the outcome per row id."""
        destination = self.destinations.get(name)
        if destination is None:
            raise ConfigError(f"destination {name!r} is no longer configured")
        if isinstance(destination, FhirDestination):
            ordered = sorted(rows, key=lambda r: REPORT_ORDER.index(ReportStatus(r.report_status)))
            return FhirReporter(self.db, self.spool, destination, self.config).send(job_id, ordered)
        if destination.retraction is Retraction.ORTHANC and destination.orthanc is not None:
            retractor = OrthancRetractor(destination.orthanc)
            retractions = {r.id: r for r in rows if r.kind == DeliveryKind.RETRACTION and r.path}
            if retractions:
                return {
                    row_id: retractor.retract(self.spool.path(row.path or ""))
                    for row_id, row in retractions.items()
                }
        sender: Sender = (
            DimseSender(destination, self.settings.ae_title)
            if isinstance(destination, DimseDestination)
            else StowSender(destination)
        )
        stored = {row.id: row.path for row in rows if row.kind != DeliveryKind.FHIR and row.path}
        sent = sender.send([self.spool.path(path) for path in stored.values()]) if stored else {}
        return {
            row.id: (
                sent.get(row.object_uid, DestinationUnavailableError("not sent"))
                if row.id in stored
                else PermanentError("a DICOM delivery without a stored file")
            )
            for row in rows
        }

    def _record(self, job_id: str, name: str, outcome: dict[int, Exception | None]) -> None:
        with self.db.session() as session:
            for row_id, failure in outcome.items():
                row = session.get(Delivery, row_id)
                if row is None or row.state != DeliveryState.PENDING:
                    continue
                decision = (
                    None if failure is None else self.policy.decide(failure, row.attempts + 1)
                )
                record_delivery(row, decision)
            session.flush()
            sent = sum(1 for failure in outcome.values() if failure is None)
            LOGGER.info("job %s to %s: %d of %d confirmed", job_id, name, sent, len(outcome))
            settle_deliveries(session, job_id)


class FhirReporter:
    """Publishes a job's DiagnosticReport statuses (and Observations) to one FHIR server.

    ``registered`` is sent only while the job is still waiting or running (a later status has
    already replaced it otherwise); ``preliminary`` publishes the resources the worker stored with
    the result set; ``cancelled`` carries the reason the study was rejected or failed. For the
    status-only reports the patient is referenced by the PatientID (and issuer) read from the
    spooled header at send time; it is never logged or stored in the database.
    """

    def __init__(
        self, db: Database, spool: LocalSpool, destination: FhirDestination, config: NodeConfig
    ) -> None:
        self.db = db
        self.spool = spool
        self.destination = destination
        self.config = config

    def send(self, job_id: str, rows: Sequence[Delivery]) -> dict[int, Exception | None]:
        """Publish each row's status in order; the first failure also stops the later ones."""
        job, study, first = self._load(job_id)
        system = self.config.patient_identifier_system(study.calling_ae)
        # Read from the spooled header only for the status-only reports that need it.
        subject = functools.cache(lambda: report_subject(study.study_instance_uid, first, system))
        outcome: dict[int, Exception | None] = {}
        with FhirClient.from_destination(self.destination) as client:
            for row in rows:
                try:
                    self._publish(client, job, subject, row)
                except NoduleAIError as exc:
                    outcome.update(dict.fromkeys((r.id for r in rows if r.id not in outcome), exc))
                    break
                outcome[row.id] = None
        return outcome

    def _publish(
        self, client: FhirClient, job: Job, subject: Callable[[], ReportSubject], row: Delivery
    ) -> None:
        status = ReportStatus(row.report_status)
        if status is ReportStatus.REGISTERED:
            if job.state in (JobState.QUEUED, JobState.PROCESSING):
                client.publish(build_report(subject(), "registered"), [])
        elif status is ReportStatus.PRELIMINARY:
            if row.path is None:
                raise PermanentError("the preliminary report's resources were not stored")
            stored = json.loads(self.spool.path(row.path).read_text(encoding="utf-8"))
            client.publish(stored["report"], stored["observations"])
        else:
            reason = job.error or "the study could not be analysed"
            conclusion = f"{job.error_code}: {reason}" if job.error_code else reason
            client.publish(build_report(subject(), "cancelled", conclusion=conclusion), [])

    def _load(self, job_id: str) -> tuple[Job, Study, Path | None]:
        """The job, its study and one spooled instance of the study."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise PermanentError(f"job {job_id} is gone")
            study = session.get(Study, job.study_id)
            assert study is not None
            first = session.scalar(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == study.id)
                .limit(1)
            )
            path = self.spool.path(first) if first is not None else None
            return job, study, path
