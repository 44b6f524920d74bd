"""Delivery: result objects back to the PACS (C-STORE SCU or STOW-RS), reports to FHIR.

Every result object has a delivery row per destination. The delivery loop sends what is due,
grouped per job and destination (one association, proposing exactly the SOP classes and transfer
syntaxes of the files sent), marks each object that the destination confirmed, and retries the
rest with exponential backoff; after the configured attempts a delivery is ``failed`` and the
job with it, reason recorded. Output UIDs are deterministic, so a resend is stored once.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import (
    DicomWebDestination,
    DimseDestination,
    FhirDestination,
    NodeConfig,
    Settings,
)
from dicom_node.db import (
    Database,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    set_job_state,
    utcnow,
)
from dicom_node.errors import PermanentError, TransientError
from dicom_node.spool import LocalSpool

LOGGER = logging.getLogger(__name__)

#: Sends files, returns per SOP Instance UID ``None`` (confirmed) or the reason it was not.
Outcome = dict[str, str | None]


class Sender(Protocol):
    """Sends DICOM files to one destination."""

    def send(self, paths: Sequence[Path]) -> Outcome:
        """Send ``paths``; raise :class:`TransientError` when nothing could be sent."""


def _meta(path: Path) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Transfer Syntax UID) from the file meta."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return (
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
    )


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

    def _ssl(self) -> tuple[ssl.SSLContext, str] | None:
        tls = self.destination.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        context.check_hostname = False
        if tls.cert is not None and tls.key is not None:
            context.load_cert_chain(tls.cert, tls.key)
        return context, self.destination.host

    def send(self, paths: Sequence[Path]) -> Outcome:
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
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=self._ssl())
        if not assoc.is_established:
            raise TransientError(f"association with {d.ae_title}@{d.host}:{d.port} not established")
        outcome: Outcome = {}
        try:
            for path, (_sop_class, uid, _syntax) in metas.items():
                outcome[uid] = self._store_one(assoc, path)
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        for _sop_class, uid, _syntax in metas.values():
            outcome.setdefault(uid, "association ended before it was sent")
        return outcome

    @staticmethod
    def _store_one(assoc: object, path: Path) -> str | None:
        try:
            status = assoc.send_c_store(path)  # type: ignore[attr-defined]
        except (OSError, RuntimeError, ValueError) as exc:
            return f"C-STORE failed: {exc}"
        code = int(status.Status) if "Status" in status else None
        if code is None:
            return "no C-STORE response (timeout or abort)"
        if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
            return None
        return f"C-STORE status 0x{code:04X}"


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

    def send(self, paths: Sequence[Path]) -> Outcome:
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
            raise TransientError(f"STOW-RS to {url} failed: {exc}") from exc
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise TransientError(f"STOW-RS to {url}: HTTP {response.status_code}")
        failed = _stow_failures(response)
        uids = [_meta(path)[1] for path in paths]
        if response.status_code >= 400 and not failed:
            return dict.fromkeys(uids, f"HTTP {response.status_code}")
        return {uid: failed.get(uid) for uid in uids}


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


FHIR_ORDER = ("registered", "preliminary", "cancelled")


def delivery_rows(
    config: NodeConfig,
    calling_ae: str,
    job_id: str,
    objects: Sequence[dict[str, str]],
    fhir_status: str | None,
) -> list[Delivery]:
    """The delivery rows of a job: each DICOM object to each DICOM destination of the calling
    AE, and the FHIR report's new ``fhir_status`` to each FHIR destination."""
    rows = []
    for destination in config.destinations_for(calling_ae):
        if isinstance(destination, FhirDestination):
            if fhir_status is not None:
                rows.append(_row(job_id, destination.name, "fhir", fhir_status, None))
            continue
        rows += [
            _row(job_id, destination.name, "dicom", obj["sop_instance_uid"], obj["path"])
            for obj in objects
        ]
    return rows


def _row(job_id: str, destination: str, kind: str, uid: str, path: str | None) -> Delivery:
    return Delivery(
        job_id=job_id,
        destination=destination,
        kind=kind,
        object_uid=uid,
        path=path,
        attempts=0,
        state=DeliveryState.PENDING,
    )


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
        self.destinations = {d.name: d for d in config.destinations}
        self.spool = LocalSpool(settings.spool_dir, min_free_bytes=0)
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
        with self.db.session() as session:
            rows = session.scalars(
                select(Delivery).where(
                    Delivery.job_id == job_id,
                    Delivery.destination == name,
                    Delivery.state == DeliveryState.PENDING,
                )
            ).all()
            pending = {row.id: (row.kind, row.object_uid, row.path) for row in rows}
        if not pending:
            return
        try:
            outcome = self._send(job_id, name, list(pending.values()))
        except (TransientError, PermanentError) as exc:
            outcome = {uid: str(exc) for _kind, uid, _path in pending.values()}
        self._record(job_id, name, pending, outcome)

    def _send(self, job_id: str, name: str, objects: list[tuple[str, str, str | None]]) -> Outcome:
        destination = self.destinations.get(name)
        if destination is None:
            raise PermanentError(f"destination {name!r} is no longer configured")
        if isinstance(destination, DimseDestination | DicomWebDestination):
            sender: Sender = (
                DimseSender(destination, self.settings.ae_title)
                if isinstance(destination, DimseDestination)
                else StowSender(destination)
            )
            paths = [self.spool.path(path) for _kind, _uid, path in objects if path]
            return sender.send(paths)
        statuses = sorted((uid for _kind, uid, _path in objects), key=FHIR_ORDER.index)
        return FhirReporter(self.db, self.spool, destination).send(job_id, statuses)

    def _record(
        self,
        job_id: str,
        name: str,
        pending: dict[int, tuple[str, str, str | None]],
        outcome: Outcome,
    ) -> None:
        s = self.settings
        with self.db.session() as session:
            for row_id, (_kind, uid, _path) in pending.items():
                row = session.get(Delivery, row_id)
                if row is None:
                    continue
                row.attempts += 1
                error = outcome.get(uid, "not sent")
                if error is None:
                    row.state, row.error = DeliveryState.DONE, None
                    continue
                row.error = error
                if row.attempts >= s.delivery_max_attempts:
                    row.state = DeliveryState.FAILED
                else:
                    delay = min(300.0, s.delivery_backoff_seconds * 2 ** (row.attempts - 1))
                    row.next_attempt_at = utcnow() + timedelta(seconds=delay)
            session.flush()
            sent = sum(1 for e in outcome.values() if e is None)
            LOGGER.info("job %s to %s: %d of %d confirmed", job_id, name, sent, len(pending))
            settle_job(session, job_id)


def settle_job(session: Session, job_id: str) -> None:
    """Finish a delivering job: ``done`` when every delivery is, ``failed`` if one failed."""
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.DELIVERING:
        return
    states = session.scalars(select(Delivery.state).where(Delivery.job_id == job_id)).all()
    if any(state == DeliveryState.PENDING for state in states):
        return
    failed = session.scalars(
        select(Delivery).where(Delivery.job_id == job_id, Delivery.state == DeliveryState.FAILED)
    ).all()
    if failed:
        reasons = sorted({f"{d.destination}: {d.error}" for d in failed})
        set_job_state(session, job, JobState.FAILED, error="delivery failed: " + "; ".join(reasons))
    else:
        set_job_state(session, job, JobState.DONE)


class FhirReporter:
    """Publishes a job's DiagnosticReport (and Observations) to one FHIR server.

    ``registered`` is sent only while the job is still waiting or running (a later status has
    already replaced it otherwise); ``preliminary`` carries the results; ``cancelled`` the reason
    the study was rejected or failed. The patient is referenced by the PatientID (and issuer) read
    from the spooled header at send time; it is never logged or stored in the database.
    """

    def __init__(self, db: Database, spool: LocalSpool, destination: FhirDestination) -> None:
        self.db = db
        self.spool = spool
        self.destination = destination

    def send(self, job_id: str, statuses: Sequence[str]) -> Outcome:
        """Publish each status in order; raise :class:`TransientError` if the server fails."""
        from dicom_node.fhir_client import FhirClient
        from pipelines.fhir import Model, build_report, build_results

        job, study_uid, result, first_path = self._load(job_id)
        study = self._study(study_uid, first_path)
        outcome: Outcome = {}
        with FhirClient.from_destination(self.destination) as client:
            for status in statuses:
                if status == "registered" and job.state in (JobState.QUEUED, JobState.PROCESSING):
                    client.publish(build_report(study, "registered"), [])
                elif status == "preliminary" and result is not None:
                    outputs = result.detail.get("outputs", {})
                    report, observations = build_results(
                        study,
                        result.nodules,
                        Model(**outputs["model"]),
                        tracking_uids=outputs.get("tracking_uids"),
                        sr_uid=outputs.get("sr_uid"),
                        seg_uid=outputs.get("seg_uid"),
                    )
                    client.publish(report, observations)
                elif status == "cancelled":
                    reason = job.error or "the study could not be analysed"
                    client.publish(build_report(study, "cancelled", conclusion=reason), [])
                outcome[status] = None
        return outcome

    def _load(self, job_id: str) -> tuple[Job, str, Result | None, str | None]:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise PermanentError(f"job {job_id} is gone")
            study = session.get(Study, job.study_id)
            assert study is not None
            result = session.scalar(select(Result).where(Result.job_id == job_id))
            first = session.scalar(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == study.id)
                .limit(1)
            )
            return job, study.study_instance_uid, result, first

    def _study(self, study_uid: str, path: str | None) -> Any:
        from pipelines.fhir import Study as FhirStudy

        patient_id, issuer = "", None
        if path is not None:
            ds = dcmread(
                self.spool.path(path),
                stop_before_pixels=True,
                specific_tags=["PatientID", "IssuerOfPatientID"],
            )
            patient_id = str(ds.get("PatientID", "") or "")
            issuer = str(ds.get("IssuerOfPatientID", "") or "") or None
        return FhirStudy(study_uid, patient_id, issuer)
