"""The worker: takes jobs from the queue, analyses the study, persists the results, acknowledges.

At-least-once delivery, idempotent processing (DESIGN.md):

- a job already finished (or superseded) when its message arrives is acknowledged and skipped;
- results and the job's state change are written in one transaction, and the ``results`` row is
  unique per job, so a redelivered job cannot leave a second result set;
- the message is acknowledged only after that transaction committed;
- transient errors are retried with exponential backoff up to ``max_attempts``; then, and for
  permanent errors, the job is ``failed`` with its reason and the message is dead-lettered;
  a study that cannot be analysed ends ``rejected`` with a machine-readable reason.

pika is not thread-safe: on RabbitMQ the analysis runs in its own thread while the connection's
thread keeps serving heartbeats, and the acknowledgement goes back through
``add_callback_threadsafe``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from enum import Enum
from io import BytesIO
from pathlib import Path
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from dicom_node.config import Settings
from dicom_node.db import Database, Instance, Job, JobState, Result, Series, Study, set_job_state
from dicom_node.errors import PermanentError, StudyRejectedError, TransientError
from dicom_node.export import delivery_rows
from dicom_node.queues import EmbeddedQueue, JobSource, Received, declare_topology
from dicom_node.spool import LocalSpool, safe_uid
from dicom_node.workers import record_heartbeat
from pipelines.analysis import Analysis, analyse
from pipelines.detect import Detection, Detector, DetectorConfig
from pipelines.outputs import encode_results, model_identity
from pipelines.uids import ResultUIDs

LOGGER = logging.getLogger(__name__)

_FINISHED = (JobState.DONE, JobState.REJECTED, JobState.FAILED, JobState.SUPERSEDED)
HEARTBEAT_SECONDS = 10.0


class Decision(Enum):
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
    detector : Detector, optional
        Loaded lazily on the first job when not given.
    """

    def __init__(self, settings: Settings, db: Database, detector: Detector | None = None) -> None:
        self.settings = settings
        self.db = db
        self.spool = LocalSpool(settings.spool_dir, min_free_bytes=0)
        self.config = settings.node_config()
        self._detector = detector
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

    def handle(self, body: dict[str, Any]) -> Decision:
        """Handle one job message; return what to do with the message."""
        job_id = str(body.get("job_id", ""))
        paths = self._start(job_id)
        if paths is None:
            return Decision.ACK
        self.current_job = job_id
        self.heartbeat()
        try:
            analysis = analyse(paths, lambda: self.detector, self.settings.min_slices)
            detection = analysis.detection
            outputs = self._encode(job_id, analysis)
        except StudyRejectedError as exc:
            self._finish(job_id, JobState.REJECTED, error=f"{exc.code}: {exc.detail}")
            LOGGER.info("job %s rejected: %s", job_id, exc.code)
            return Decision.ACK
        except Exception as exc:
            return self._failed(job_id, exc)
        finally:
            self.current_job = None
        self._save(job_id, detection, outputs)
        LOGGER.info(
            "job %s done: %d nodules from %d candidates in %.0f ms on %s",
            job_id,
            len(detection.nodules),
            detection.candidates,
            detection.timings_ms["total"],
            detection.backend,
        )
        return Decision.ACK

    def _start(self, job_id: str) -> list[Path] | None:
        """Move the job to processing and list its files; ``None`` if there is nothing to do."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state in _FINISHED:
                LOGGER.info("job %s skipped: %s", job_id, job.state if job else "unknown job")
                return None
            job.attempts += 1
            set_job_state(session, job, JobState.PROCESSING)
            relpaths = session.scalars(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == job.study_id)
            ).all()
            LOGGER.info("job %s processing (attempt %d)", job_id, job.attempts)
        return [self.spool.path(p) for p in relpaths]

    def _encode(self, job_id: str, analysis: Analysis) -> dict[str, Any]:
        """Encode SEG/SR/GSPS into the spool (``results/<job>/``); describe what was written."""
        start = time.perf_counter()
        volume, detection = analysis.volume, analysis.detection
        datasets = encode_results(
            analysis.paths,
            volume,
            detection.nodules,
            detection.model_name,
            detection.model_version,
            predecessor=self._predecessor(job_id),
        )
        uids = ResultUIDs.create(
            volume.series_instance_uid,
            volume.sop_instance_uids,
            model_identity(detection.model_name, detection.model_version),
        )
        objects = []
        for ds in datasets:
            relpath = f"results/{safe_uid(job_id)}/{ds.Modality}-{safe_uid(ds.SOPInstanceUID)}.dcm"
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            self.spool.write(relpath, buffer.getvalue())
            objects.append(
                {
                    "modality": str(ds.Modality),
                    "sop_class_uid": str(ds.SOPClassUID),
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "study_instance_uid": str(ds.StudyInstanceUID),
                    "path": relpath,
                }
            )
        detection.timings_ms["encode"] = (time.perf_counter() - start) * 1000.0
        return {
            "objects": objects,
            "tracking_uids": [uids.tracking_uid(i) for i in range(len(detection.nodules))],
            "sr_uid": uids.sr_instance_uid,
            "seg_uid": uids.seg_instance_uid if detection.nodules else None,
            "model": {"name": detection.model_name, "version": detection.model_version},
        }

    def _predecessor(self, job_id: str) -> tuple[str, str, str] | None:
        """The SR of the job this one supersedes, if it produced one."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            previous = job.supersedes if job is not None else None
            result = session.scalar(select(Result).where(Result.job_id == previous))
        if result is None:
            return None
        for obj in result.detail.get("outputs", {}).get("objects", []):
            if obj["modality"] == "SR":
                return (
                    obj["study_instance_uid"],
                    obj["series_instance_uid"],
                    obj["sop_instance_uid"],
                )
        return None

    def _save(self, job_id: str, detection: Detection, outputs: dict[str, Any]) -> None:
        """Write the result set and its deliveries and move the job on, in one transaction."""
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.PROCESSING:
                LOGGER.info("job %s no longer processing; result discarded", job_id)
                return
            exists = session.scalar(select(Result.id).where(Result.job_id == job_id))
            if exists is None:
                session.add(
                    Result(
                        job_id=job_id,
                        series_instance_uid=detection.series_instance_uid,
                        nodules=[n.to_json() for n in detection.nodules],
                        detail={**detection.to_json(), "outputs": outputs},
                    )
                )
            job.timings = {k: round(v, 1) for k, v in detection.timings_ms.items()}
            job.backend = detection.backend
            job.findings = len(detection.nodules)
            study = session.get(Study, job.study_id)
            calling_ae = study.calling_ae if study is not None else ""
            rows = delivery_rows(self.config, calling_ae, job_id, outputs["objects"], "preliminary")
            session.add_all(rows)
            set_job_state(session, job, JobState.DELIVERING if rows else JobState.DONE)

    def _finish(self, job_id: str, state: JobState, error: str) -> None:
        """End the job rejected or failed; the FHIR report says ``cancelled``."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is not None and job.state == JobState.PROCESSING:
                set_job_state(session, job, state, error=error)
                study = session.get(Study, job.study_id)
                calling_ae = study.calling_ae if study is not None else ""
                session.add_all(delivery_rows(self.config, calling_ae, job_id, [], "cancelled"))

    def _failed(self, job_id: str, exc: Exception) -> Decision:
        """Retry a transient failure with backoff, or fail the job for good."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            attempts = job.attempts if job is not None else self.settings.max_attempts
        permanent = isinstance(exc, PermanentError)
        reason = f"{type(exc).__name__}: {exc}"
        if permanent or attempts >= self.settings.max_attempts:
            LOGGER.error("job %s failed after %d attempt(s): %s", job_id, attempts, reason)
            self._finish(job_id, JobState.FAILED, error=reason)
            return Decision.DEAD_LETTER
        delay = self.settings.retry_backoff_seconds * 2 ** (attempts - 1)
        kind = "transient" if isinstance(exc, TransientError | OperationalError) else "unexpected"
        LOGGER.warning(
            "job %s attempt %d failed (%s): %s; retrying in %.0f s",
            job_id,
            attempts,
            kind,
            reason,
            delay,
        )
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is not None and job.state == JobState.PROCESSING:
                set_job_state(session, job, JobState.QUEUED, error=f"attempt {attempts}: {reason}")
        self._stop.wait(delay)
        return Decision.REQUEUE

    def heartbeat(self) -> None:
        """Tell the dashboard this worker is alive and what it works on."""
        try:
            backend = self._detector.backend if self._detector is not None else None
            record_heartbeat(
                self.db, self.worker_id, socket.gethostname(), backend, self.current_job
            )
        except OperationalError:
            LOGGER.warning("heartbeat not recorded: database unavailable")

    # ------------------------------------------------------------------ queues

    def run_source(self, source: JobSource, poll: float = 1.0) -> None:
        """Consume from a :class:`JobSource` (the embedded queue) until stopped."""
        last_beat = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                self.heartbeat()
                last_beat = time.monotonic()
            message = source.receive(timeout=poll)
            if message is None:
                continue
            decision = self._decide(message)
            if decision is Decision.ACK:
                source.ack(message)
            else:
                source.reject(message, requeue=decision is Decision.REQUEUE)

    def _decide(self, message: Received) -> Decision:
        try:
            return self.handle(message.body)
        except Exception:
            LOGGER.exception("job message could not be handled; requeued")
            self._stop.wait(self.settings.retry_backoff_seconds)
            return Decision.REQUEUE

    def run_rabbitmq(self, url: str, queue: str, dead_letter_queue: str) -> None:
        """Consume from RabbitMQ with prefetch 1 until stopped, reconnecting on failures."""
        while not self._stop.is_set():
            try:
                self._consume_rabbitmq(url, queue, dead_letter_queue)
            except (pika.exceptions.AMQPError, OSError) as exc:
                LOGGER.warning("RabbitMQ connection lost (%r); reconnecting", exc)
                self._stop.wait(2.0)

    def _consume_rabbitmq(self, url: str, queue: str, dead_letter_queue: str) -> None:
        params = pika.URLParameters(url)
        params.heartbeat = 30
        connection = pika.BlockingConnection(params)
        channel = connection.channel()
        declare_topology(channel, queue, dead_letter_queue)
        channel.basic_qos(prefetch_count=1)
        busy = threading.Event()

        def on_message(
            ch: BlockingChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes
        ) -> None:
            busy.set()
            message = Received(json.loads(body), method.delivery_tag, bool(method.redelivered))
            threading.Thread(
                target=self._work_off_thread,
                args=(connection, ch, message, busy),
                name=f"job-{message.body.get('job_id', '?')}",
                daemon=True,
            ).start()

        channel.basic_consume(queue, on_message)
        last_beat = 0.0
        try:
            while not (self._stop.is_set() and not busy.is_set()):
                connection.process_data_events(time_limit=1.0)
                if time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                    self.heartbeat()
                    last_beat = time.monotonic()
        finally:
            if connection.is_open:
                connection.close()

    def _work_off_thread(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        message: Received,
        busy: threading.Event,
    ) -> None:
        decision = self._decide(message)

        def settle() -> None:
            if decision is Decision.ACK:
                channel.basic_ack(message.tag)
            else:
                channel.basic_reject(message.tag, requeue=decision is Decision.REQUEUE)
            busy.clear()

        connection.add_callback_threadsafe(functools.partial(settle))


def run_worker(settings: Settings, db: Database, worker: Worker | None = None) -> Worker:
    """Run a worker on the configured queue in the calling thread until it is stopped."""
    worker = worker or Worker(settings, db)
    if settings.amqp_url is not None:
        worker.run_rabbitmq(
            settings.amqp_url.get_secret_value(),
            settings.amqp_queue,
            settings.amqp_dead_letter_queue,
        )
    else:
        source = EmbeddedQueue(
            db,
            settings.amqp_queue,
            settings.amqp_dead_letter_queue,
            lease_seconds=settings.job_timeout_seconds,
        )
        worker.run_source(source)
    return worker
