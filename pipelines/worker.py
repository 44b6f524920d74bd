"""The worker: takes jobs from the queue, analyses the study, persists the result set, settles.

At-least-once delivery, idempotent processing (DESIGN.md):

- a job already finished (or superseded) when its message arrives is acknowledged and skipped; a
  job superseded while it runs is abandoned at the next step (volume built, detection done,
  results encoded) without a result;
- a worker owns a job by a lease (:func:`dicom_node.lifecycle.begin_attempt`), renewed with its
  heartbeat, not by the queue connection: a message redelivered while another worker's lease is
  live (a dropped broker connection) goes back to the queue untouched, and only after a lease ran
  out (its worker died) may another worker take the job over; a run that lost its lease writes
  nothing that counts (each attempt writes its own folder, only the lease holder commits);
- the result set (:class:`dicom_node.results.ResultSet`) is written under the job's results
  folder, then its row, its delivery rows and the job's state change are committed in one
  transaction (:func:`dicom_node.lifecycle.store_result`); the ``results`` row is unique per job,
  so a redelivered job cannot leave a second result set;
- the message is acknowledged only after that transaction committed;
- a failure is classified by the one retry policy (:mod:`dicom_node.retry`): a rejected study
  ends ``rejected`` with its reason, a permanent fault (an encoder error, say) fails the job at
  once and dead-letters the message, anything else is retried *by the outbox*: the job goes back
  to ``queued`` with a ``retry_at`` after the backoff and its message is acknowledged, so no
  message is held while waiting; after ``max_attempts`` the job fails;
- when not even the failure can be recorded (the database is unreachable), the message is given
  back to the queue and this worker pauses before it takes another.

The job source (:func:`dicom_node.queues.make_job_source`) is RabbitMQ's consumer or the embedded
queue; on RabbitMQ the connection lives on its own thread, so a long analysis never starves its
heartbeats.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from enum import Enum
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import NodeConfig, Settings
from dicom_node.db import Database, Instance, Job, Series, Study, utcnow
from dicom_node.errors import ErrorCode, QueueUnavailableError, SpoolUnreadableError
from dicom_node.fhir_resources import ReportSubject, build_results, report_subject
from dicom_node.lifecycle import (
    FINISHED,
    begin_attempt,
    holds,
    leased_elsewhere,
    renew_lease,
    settle_failure,
    store_result,
)
from dicom_node.queues import JobSource, Received, make_job_source
from dicom_node.remote_spool import worker_spool
from dicom_node.results import (
    ModelIdentity,
    ObjectKind,
    PriorComparison,
    ResultObject,
    ResultSet,
    earlier_results,
)
from dicom_node.retry import Decision, RetryPolicy, Verdict
from dicom_node.spool import results_path, safe_uid
from dicom_node.workers import record_heartbeat
from pipelines.analysis import Analysis, analyse
from pipelines.detect import Detector, DetectorConfig
from pipelines.outputs import KIND_BY_SOP_CLASS, encode_results
from pipelines.priors import Located, PriorFindings, PriorLocator

LOGGER = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
#: How long a job's lease holds without renewal (renewed with every heartbeat).
LEASE_SECONDS = 3 * HEARTBEAT_SECONDS


class JobAbandonedError(Exception):
    """The job was superseded (or otherwise left ``processing``) while the worker ran it."""


class Settle(Enum):
    """What becomes of a message after its job was handled."""

    ACK = "ack"
    REQUEUE = "requeue"
    DEAD_LETTER = "dead-letter"


def detector_config(settings: Settings) -> DetectorConfig:
    """The detector's configuration from the service settings."""
    config = DetectorConfig(
        backend=settings.backend,
        engine_cache=settings.data_dir / "engines",
        fp16=settings.fp16,
        threads=settings.inference_threads,
        operating_threshold=settings.operating_threshold,
        review_band=settings.review_band,
        heatmap=settings.heatmap,
    )
    if settings.models_dir is not None:
        config = DetectorConfig(**{**config.__dict__, "models_dir": settings.models_dir})
    return config


class Worker:
    """Handles inference jobs.

    Parameters
    ----------
    settings : Settings
        Attempts, backoff, minimum slices and the detector's configuration.
    db : Database
        Jobs, instances and results.
    config : NodeConfig
        Destinations (read once at start by the caller).
    detector : Detector, optional
        Loaded lazily on the first job when not given.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        config: NodeConfig,
        detector: Detector | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.config = config
        self.spool = worker_spool(settings)
        self.policy = RetryPolicy(settings.max_attempts, settings.retry_backoff_seconds)
        self._detector = detector
        self.priors = PriorLocator(
            db, self.spool, config, settings.ae_title, lambda: self.detector, settings.min_slices
        )
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xFFFF:04x}"
        self.current_job: str | None = None
        self._stop = threading.Event()

    @property
    def detector(self) -> Detector:
        """The detector, loaded on first use (model loading takes a moment)."""
        if self._detector is None:
            self._detector = Detector(detector_config(self.settings))
        return self._detector

    def stop(self) -> None:
        """Finish the current job, then stop consuming."""
        self._stop.set()

    # ------------------------------------------------------------------ one job

    def handle(self, message: Received) -> Settle:
        """Handle one job message; return what to do with the message."""
        job_id = str(message.body.get("job_id", ""))
        started = self._start(job_id)
        if isinstance(started, Settle):
            return started
        files, study_uid, attempt = started
        self.current_job = job_id
        self.heartbeat()
        try:
            paths = self._inputs(files)
            checkpoint = functools.partial(self._checkpoint, job_id)
            analysis = analyse(paths, lambda: self.detector, self.settings.min_slices, checkpoint)
            prior = self._prior(job_id, study_uid, analysis)
            checkpoint()
            result = self._persist(job_id, study_uid, attempt, analysis, prior)
        except JobAbandonedError:
            LOGGER.info("job %s superseded while it ran; abandoned", job_id)
            return Settle.ACK
        except Exception as exc:
            return self._failed(job_id, self.policy.decide(exc, attempt))
        finally:
            self.current_job = None
            self.spool.release()
        self._save(job_id, result)
        LOGGER.info(
            "job %s done: %d nodules (%d not encodable) from %d candidates in %.0f ms on %s",
            job_id,
            len(result.nodules),
            result.not_encoded,
            result.candidates,
            result.timings_ms["total"],
            result.backend,
        )
        return Settle.ACK

    def _start(self, job_id: str) -> tuple[list[tuple[str, int]], str, int] | Settle:
        """Begin an attempt: the job's files (spool path, size), study UID and attempt number,
        or how to settle."""
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state in FINISHED:
                LOGGER.info("job %s skipped: %s", job_id, job.state if job else "unknown job")
                return Settle.ACK
            if leased_elsewhere(job, self.worker_id):
                LOGGER.info("job %s is running on another worker; message given back", job_id)
                return Settle.REQUEUE
            if job.attempts >= self.policy.max_attempts:  # earlier attempts died with the worker
                decision = Decision(
                    Verdict.DEAD_LETTER,
                    ErrorCode.RETRIES_EXHAUSTED,
                    f"{job.attempts} attempts started, none finished",
                )
                settle_failure(session, job, decision, self.config)
                LOGGER.error("job %s failed: %s", job_id, decision.code)
                return Settle.DEAD_LETTER
            begin_attempt(session, job, self.worker_id, LEASE_SECONDS)
            study = session.get(Study, job.study_id)
            assert study is not None
            files = session.execute(
                select(Instance.path, Instance.size)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == job.study_id)
            ).all()
            LOGGER.info("job %s processing (attempt %d)", job_id, job.attempts)
            return [(p, s) for p, s in files], study.study_instance_uid, job.attempts

    def _inputs(self, files: Sequence[tuple[str, int]]) -> list[Path]:
        """The job's instances as local files (fetched from the node when the spool is reached
        over HTTP), each checked against the size it was received with."""
        paths = []
        for relpath, size in files:
            path = self.spool.path(relpath)
            try:
                found = path.stat().st_size
            except OSError as exc:
                raise SpoolUnreadableError(
                    f"a spooled instance is unreadable: {type(exc).__name__}"
                ) from exc
            if found != size:
                raise SpoolUnreadableError(f"a spooled instance has {found} bytes, not {size}")
            paths.append(path)
        return paths

    def _checkpoint(self, job_id: str) -> None:
        """Raise :class:`JobAbandonedError` when the job is no longer this worker's to finish."""
        with self.db.session() as session:
            if not holds(session.get(Job, job_id), self.worker_id):
                raise JobAbandonedError(job_id)

    def _prior(self, job_id: str, study_uid: str, analysis: Analysis) -> Located | None:
        """The study's prior CT, aligned (:mod:`pipelines.priors`); why there is none; or
        ``None`` without a priors policy. Timings go to the detection's; an unexpected fault
        makes the study a baseline (the result is not held back for it), a database outage is
        retried like any other."""
        header = dcmread(analysis.paths[0], stop_before_pixels=True)
        timings = analysis.detection.timings_ms
        try:
            return self.priors.locate(self._calling_ae(study_uid), header, analysis.volume, timings)
        except SQLAlchemyError:
            raise
        except Exception as exc:
            LOGGER.exception(
                "job %s: comparison with the prior failed; reported as baseline", job_id
            )
            return PriorComparison.baseline("comparison_failed", type(exc).__name__)

    def _persist(
        self,
        job_id: str,
        study_uid: str,
        attempt: int,
        analysis: Analysis,
        prior: Located | None = None,
    ) -> ResultSet:
        """Encode the findings and write every artifact under ``results/<job>/<attempt>/``."""
        start = time.perf_counter()
        detection = analysis.detection
        model = ModelIdentity(detection.model_name, detection.model_version)
        created = self._input_time(analysis.volume.sop_instance_uids)
        encoded = encode_results(
            analysis.paths,
            analysis.volume,
            detection.nodules,
            model,
            history=self._history(job_id),
            created=created,
            prior=prior if isinstance(prior, PriorFindings) else None,
            heatmap=detection.heatmap,
        )
        comparison = encoded.prior if isinstance(prior, PriorFindings) else prior
        folder = f"{results_path(job_id)}/{attempt}"
        objects = tuple(self._write_object(folder, ds) for ds in encoded.datasets)
        lung_rads = encoded.lung_rads
        sr = next(o for o in objects if o.kind is ObjectKind.SR)
        seg = next((o for o in objects if o.kind is ObjectKind.SEG), None)
        report, observations = build_results(
            self._subject(study_uid, analysis.paths[0]),
            [n.to_json() for n in encoded.nodules],
            model,
            tracking_uids=[n.tracking_uid for n in encoded.nodules],
            sr_uid=sr.sop_instance_uid,
            seg_uid=seg.sop_instance_uid if seg is not None else None,
            lung_rads=lung_rads,
            issued=created,
            prior=comparison,
            input_review=detection.input_review,
        )
        fhir_path = f"{folder}/fhir.json"
        fhir = {"report": report, "observations": observations}
        self.spool.write(fhir_path, json.dumps(fhir, indent=1).encode())
        timings = dict(detection.timings_ms)
        timings["encode"] = (time.perf_counter() - start) * 1000.0
        result = ResultSet(
            job_id=job_id,
            study_instance_uid=study_uid,
            series_instance_uid=detection.series_instance_uid,
            model=model,
            nodules=tuple(encoded.nodules),
            not_encoded=encoded.not_encoded,
            objects=objects,
            fhir_path=fhir_path,
            candidates=detection.candidates,
            backend=detection.backend,
            timings_ms=timings,
            model_versions=dict(detection.model_versions),
            lung_rads=lung_rads,
            instance_number=encoded.instance_number,
            retracted=encoded.retracted,
            prior=comparison,
            input_review=detection.input_review,
        )
        document = json.dumps(result.to_json(), indent=1).encode()
        self.spool.write(f"{folder}/resultset.json", document)
        return result

    def _input_time(self, sop_instance_uids: Sequence[str]) -> datetime:
        """When the last of these instances was received: the time the input was complete, and
        the result objects' creation time (a redelivered job writes byte-identical files)."""
        with self.db.session() as session:
            latest = session.scalar(
                select(func.max(Instance.received_at)).where(
                    Instance.sop_instance_uid.in_(list(sop_instance_uids))
                )
            )
        return latest if latest is not None else utcnow()

    def _calling_ae(self, study_uid: str) -> str:
        """The AE title that sent the study ("" if unknown)."""
        with self.db.session() as session:
            calling_ae = session.scalar(
                select(Study.calling_ae).where(Study.study_instance_uid == study_uid)
            )
        return calling_ae or ""

    def _subject(self, study_uid: str, path: Path) -> ReportSubject:
        """The FHIR subject: the study, its patient (with the calling AE's identifier system)."""
        return report_subject(
            study_uid, path, self.config.patient_identifier_system(self._calling_ae(study_uid))
        )

    def _write_object(self, folder: str, ds: Dataset) -> ResultObject:
        relpath = f"{folder}/{ds.Modality}-{safe_uid(ds.SOPInstanceUID)}.dcm"
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        self.spool.write(relpath, buffer.getvalue())
        kind = KIND_BY_SOP_CLASS[str(ds.SOPClassUID)]
        return ResultObject(
            kind=kind,
            modality=str(ds.Modality),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            path=relpath,
            # a key image's InstanceNumber is the number of the finding it shows
            finding=int(ds.InstanceNumber) if kind is ObjectKind.KEY_IMAGE else None,
        )

    def _history(self, job_id: str) -> list[ResultSet]:
        """The results earlier jobs of the study stored, oldest first (what this one replaces)."""
        try:
            with self.db.session() as session:
                return earlier_results(session, job_id)
        except (ValueError, KeyError, TypeError):
            LOGGER.warning("job %s: an earlier result is unreadable; nothing is replaced", job_id)
            return []

    def _save(self, job_id: str, result: ResultSet) -> None:
        """Persist the result set, its deliveries and the job's move, in one transaction."""
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or not holds(job, self.worker_id):
                LOGGER.info("job %s no longer this worker's; result discarded", job_id)
                return
            store_result(session, job, result, self.config)

    def _failed(self, job_id: str, decision: Decision) -> Settle:
        """Record a failed attempt as the retry policy decided; say how to settle the message."""
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or not holds(job, self.worker_id):
                LOGGER.info("job %s no longer this worker's; failure not recorded", job_id)
                return Settle.ACK
            settle_failure(session, job, decision, self.config)
        if decision.verdict is Verdict.RETRY:
            LOGGER.warning(
                "job %s failed (%s); retried in %.0f s",
                job_id,
                decision.code,
                decision.delay_seconds,
            )
            return Settle.ACK
        if decision.verdict is Verdict.REJECT:
            LOGGER.info("job %s rejected: %s", job_id, decision.code)
            return Settle.ACK
        LOGGER.error("job %s failed: %s: %s", job_id, decision.code, decision.detail)
        return Settle.DEAD_LETTER

    def heartbeat(self) -> None:
        """Tell the dashboard this worker is alive and what it works on."""
        try:
            backend = self._detector.backend if self._detector is not None else None
            record_heartbeat(
                self.db, self.worker_id, socket.gethostname(), backend, self.current_job
            )
        except SQLAlchemyError:
            LOGGER.warning("heartbeat not recorded: database unavailable")

    # ------------------------------------------------------------------ the loop

    def run(self, source: JobSource, poll: float = 1.0) -> None:
        """Take messages from ``source`` and settle each, until stopped."""
        beating = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        beating.start()
        try:
            while not self._stop.is_set():
                try:
                    message = source.receive(timeout=poll)
                except QueueUnavailableError as exc:
                    LOGGER.warning("job queue unavailable (%s); trying again", exc)
                    self._stop.wait(self.settings.retry_backoff_seconds)
                    continue
                if message is not None:
                    self._settle(source, message)
        finally:
            self._stop.set()
            beating.join(timeout=HEARTBEAT_SECONDS)

    def _settle(self, source: JobSource, message: Received) -> None:
        try:
            settle = self.handle(message)
        except Exception:
            # Not even the failure could be recorded (the database is unreachable, say): give
            # the message back and pause before taking another one.
            LOGGER.exception("job message could not be handled; requeued")
            settle = Settle.REQUEUE
        if settle is Settle.ACK:
            source.ack(message)
        elif settle is Settle.DEAD_LETTER:
            source.dead_letter(message)
        else:
            source.requeue(message)
            self._stop.wait(self.settings.retry_backoff_seconds)

    def _beat(self) -> None:
        while True:
            self.heartbeat()
            self._renew_lease()
            if self._stop.wait(HEARTBEAT_SECONDS):
                return

    def _renew_lease(self) -> None:
        job_id = self.current_job
        if job_id is None:
            return
        try:
            with self.db.session() as session:
                if not renew_lease(session, job_id, self.worker_id, LEASE_SECONDS):
                    LOGGER.warning("job %s: lease lost (taken over or superseded)", job_id)
        except SQLAlchemyError:
            LOGGER.warning("job %s: lease not renewed: database unavailable", job_id)


def run_worker(settings: Settings, db: Database, worker: Worker) -> Worker:
    """Run ``worker`` on the configured queue in the calling thread until it is stopped."""
    source = make_job_source(settings, db)
    try:
        worker.run(source)
    finally:
        source.close()
    return worker
