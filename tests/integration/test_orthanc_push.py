"""Orthanc, as the hospital PACS, pushes a real CT study to the node through its REST API.

Orthanc (Debian package) holds LIDC-IDRI-0001 (133 CT slices), has the node registered as a
modality and C-STOREs the study with ``POST /modalities/{id}/store``. The node must spool every
instance as sent (same SOP Instance UID, same pixel data), record all of them, and publish exactly
one job for the study to RabbitMQ, carrying ids and UIDs only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pydicom
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import func, select

from dicom_node.db import Instance, Job, Series, Study, StudyState
from dicom_node.node import Node
from dicom_node.queues import declare_topology
from dicom_node.spool import study_path
from tests.helpers import AMQP_URL, wait_for
from tests.integration.conftest import running_orthanc
from tests.peers import Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIDC = "lidc-idri-0001"
NODE_MODALITY = "noduleai"
MESSAGE_KEYS = {"job_id", "study_instance_uid", "instances", "spool_path", "supersedes"}
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs")


@dataclass
class SourceStudy:
    """The files of one study as they are on disk, keyed by SOP Instance UID."""

    study_uid: str
    files: dict[str, Path] = field(default_factory=dict)
    patient_values: set[str] = field(default_factory=set)


def read_source(folder: Path) -> SourceStudy:
    """Index the ``.dcm`` files under ``folder`` (LIDC's XML annotations are skipped)."""
    paths = sorted(folder.rglob("*.dcm"))
    assert paths, f"no DICOM files under {folder}"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    study_uids = {str(ds.StudyInstanceUID) for ds in headers}
    assert len(study_uids) == 1, study_uids
    source = SourceStudy(study_uids.pop())
    for path, ds in zip(paths, headers, strict=True):
        source.files[str(ds.SOPInstanceUID)] = path
        for keyword in PATIENT_KEYWORDS:
            value = str(ds.get(keyword, "") or "").strip()
            if value:
                source.patient_values.add(value)
    assert len(source.files) == len(paths), "SOP Instance UIDs repeat in the source"
    return source


def load_study(orthanc: Orthanc, source: SourceStudy) -> str:
    """Upload every file through ``POST /instances``; return Orthanc's id of the study."""
    for path in source.files.values():
        answer = orthanc.upload(path)
        assert answer["Status"] in ("Success", "AlreadyStored"), answer
    orthanc_id = orthanc.lookup_study(source.study_uid)
    assert len(orthanc.instances_of_study(orthanc_id)) == len(source.files)
    return orthanc_id


@dataclass
class PacsStudy:
    """A study held by an Orthanc of this module's own."""

    orthanc: Orthanc
    orthanc_id: str
    source: SourceStudy


@pytest.fixture(scope="module")
def lidc_in_orthanc(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PacsStudy]:
    """LIDC-IDRI-0001 (133 CT slices) loaded into one Orthanc, shared by this module's tests.

    The tests only read from this Orthanc (each pushes to a node of its own), so loading the
    70 MB study once keeps the module lean.
    """
    source = read_source(shared_data / LIDC)
    assert len(source.files) == 133
    assert source.patient_values, "the source should carry patient attributes to look for"
    with running_orthanc(tmp_path_factory) as orthanc:
        yield PacsStudy(orthanc, load_study(orthanc, source), source)


class JobQueueReader:
    """Reads the node's work queue with ``basic_get``, as a test-side consumer."""

    def __init__(self, queue: str, dead_letter_queue: str) -> None:
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel: BlockingChannel = self.connection.channel()
        # Same arguments as the node declares, so the queue exists before the node publishes.
        declare_topology(self.channel, queue, dead_letter_queue)

    def get(self, timeout: float) -> tuple[pika.BasicProperties, bytes] | None:
        """The next message (acknowledged), or ``None`` after ``timeout`` seconds without one."""
        deadline = time.monotonic() + timeout
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=False)
            if method is not None:
                self.channel.basic_ack(method.delivery_tag)
                return properties, body
            if time.monotonic() >= deadline:
                return None
            self.connection.sleep(0.1)  # keeps the connection serviced while polling

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@pytest.fixture
def job_queue(amqp_queues: tuple[str, str]) -> Iterator[JobQueueReader]:
    reader = JobQueueReader(*amqp_queues)
    yield reader
    reader.close()


def start_node(
    make_node: Callable[..., Node], amqp_queues: tuple[str, str], **overrides: Any
) -> Node:
    queue, dead = amqp_queues
    return make_node(amqp_url=AMQP_URL, amqp_queue=queue, amqp_dead_letter_queue=dead, **overrides)


def push(orthanc: Orthanc, node: Node, orthanc_id: str, expected: int) -> float:
    """Register the node in Orthanc, C-ECHO it, push the study; return the push's seconds."""
    orthanc.add_modality(NODE_MODALITY, node.settings.ae_title, "127.0.0.1", node.scp.port)
    orthanc.echo(NODE_MODALITY)
    started = time.monotonic()
    answer = orthanc.push_study(NODE_MODALITY, orthanc_id)
    seconds = time.monotonic() - started
    assert answer.get("FailedInstancesCount", 0) == 0, answer
    assert answer.get("InstancesCount") == expected, answer
    assert answer.get("RemoteAet") == node.settings.ae_title, answer
    return seconds


def stored_instances(node: Node, study_uid: str) -> dict[str, Path]:
    """SOP Instance UID → spool file of every instance the database records for the study."""
    with node.db.session() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.path)
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == study_uid)
        ).all()
    return {uid: node.spool.path(path) for uid, path in rows}


def assert_spooled_as_sent(node: Node, source: SourceStudy, calling_ae: str) -> set[str]:
    """Every source instance is spooled once, same UID, same pixels; return the syntaxes seen."""
    stored = stored_instances(node, source.study_uid)
    assert set(stored) == set(source.files)
    syntaxes: set[str] = set()
    for sop_uid, original_path in source.files.items():
        received = pydicom.dcmread(stored[sop_uid])
        original = pydicom.dcmread(original_path)
        assert received.SOPInstanceUID == sop_uid
        assert received.SOPClassUID == original.SOPClassUID
        received_syntax = received.file_meta.TransferSyntaxUID
        syntaxes.add(str(received_syntax))
        if received_syntax == original.file_meta.TransferSyntaxUID:
            assert received.PixelData == original.PixelData, sop_uid
        else:  # Orthanc transcoded: the decoded pixel values must still be the same
            np.testing.assert_array_equal(received.pixel_array, original.pixel_array)
    with node.db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == source.study_uid))
        assert study is not None
        assert study.instances == len(source.files)
        assert study.calling_ae == calling_ae
        count = session.scalar(
            select(func.count(Instance.id))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id)
        )
        assert count == len(source.files)
    return syntaxes


def assert_job_message(
    node: Node, source: SourceStudy, properties: pika.BasicProperties, body: bytes
) -> dict[str, Any]:
    """The message names the study's one job with ids and UIDs only, never patient data."""
    message: dict[str, Any] = json.loads(body)
    assert set(message) == MESSAGE_KEYS
    assert message["study_instance_uid"] == source.study_uid
    assert message["instances"] == len(source.files)
    assert message["spool_path"] == study_path(source.study_uid)
    assert not Path(message["spool_path"]).is_absolute()
    assert message["supersedes"] is None
    assert properties.message_id == message["job_id"]
    assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
    text = body.decode()
    for value in source.patient_values:
        assert value not in text, "patient data in the queue message"
    with node.db.session() as session:
        jobs = session.scalars(
            select(Job)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_instance_uid == source.study_uid)
        ).all()
        assert [job.id for job in jobs] == [message["job_id"]]
        study = session.scalar(select(Study).where(Study.study_instance_uid == source.study_uid))
        assert study is not None and study.state == StudyState.QUEUED
    # The publisher stamps the confirm in its own transaction, just after the broker confirmed.
    wait_for(lambda: published_at(node, message["job_id"]), timeout=10)
    return message


def published_at(node: Node, job_id: str) -> Any:
    with node.db.session() as session:
        return session.scalar(select(Job.published_at).where(Job.id == job_id))


def test_orthanc_push_is_spooled_as_sent_and_makes_one_job(
    lidc_in_orthanc: PacsStudy,
    make_node: Callable[..., Node],
    amqp_queues: tuple[str, str],
    job_queue: JobQueueReader,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A study pushed by Orthanc is spooled byte for byte and published as exactly one job."""
    orthanc, orthanc_id, lidc = (
        lidc_in_orthanc.orthanc,
        lidc_in_orthanc.orthanc_id,
        lidc_in_orthanc.source,
    )
    node = start_node(make_node, amqp_queues)

    push_seconds = push(orthanc, node, orthanc_id, len(lidc.files))

    syntaxes = assert_spooled_as_sent(node, lidc, orthanc.aet)
    received = job_queue.get(timeout=30)
    assert received is not None, "no job message within 30 s of the push"
    assert_job_message(node, lidc, *received)
    # A second job would come at the latest one quiet period and one publish retry later.
    window = node.settings.quiet_seconds + node.settings.publish_retry_seconds + 2.0
    extra = job_queue.get(timeout=window)
    assert extra is None, f"a second message for the study: {extra[1]!r}"
    with capsys.disabled():
        print(f"\n  Orthanc push of {len(lidc.files)} instances: {push_seconds:.2f} s; {syntaxes}")


def test_orthanc_push_with_release_policy_publishes_when_the_push_returns(
    lidc_in_orthanc: PacsStudy,
    make_node: Callable[..., Node],
    amqp_queues: tuple[str, str],
    job_queue: JobQueueReader,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With ``completeness: release`` for Orthanc's AE, the job does not wait for quiet."""
    orthanc, orthanc_id, lidc = (
        lidc_in_orthanc.orthanc,
        lidc_in_orthanc.orthanc_id,
        lidc_in_orthanc.source,
    )
    quiet_seconds = 60.0
    config = tmp_path / "noduleai.yaml"
    config.write_text(
        f"ae_policies:\n"
        f"  - ae_title: {orthanc.aet}\n"
        f"    hosts: [127.0.0.1]\n"
        f"    completeness: release\n",
        encoding="utf-8",
    )
    node = start_node(make_node, amqp_queues, config=config, quiet_seconds=quiet_seconds)

    push_seconds = push(orthanc, node, orthanc_id, len(lidc.files))
    returned = time.monotonic()
    received = job_queue.get(timeout=15)
    published_after = time.monotonic() - returned

    assert received is not None, "no job within 15 s of the push returning (quiet is 60 s)"
    assert published_after < quiet_seconds / 4
    assert_job_message(node, lidc, *received)
    assert_spooled_as_sent(node, lidc, orthanc.aet)
    assert job_queue.get(timeout=2.0) is None, "a second message for the study"
    with capsys.disabled():
        print(
            f"\n  release policy: push {push_seconds:.2f} s, "
            f"job consumed {published_after:.2f} s after the push returned"
        )
