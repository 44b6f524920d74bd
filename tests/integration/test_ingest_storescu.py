"""A modality (DCMTK storescu) sends real CT to the node: every instance spooled as sent, one job
per study, consumable from RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pika
import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicom_node.db import Instance, Job, ReturnedResult, Study
from dicom_node.node import Node
from dicom_node.queues import declare_topology
from dicom_node.results import ModelIdentity
from pipelines.outputs import encode_results
from pipelines.volume import build_volume
from tests.helpers import AMQP_URL, storescu, system_program, wait_for
from tests.nodule_fixtures import lidc_nodules


def _dicom_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".xml"]


def _identified_copies(folder: Path, out: Path) -> list[Path]:
    """Copies of the JPEG 2000 slices with the dataset's UIDs filled in.

    The TotalSegmentator files carry their SOP Class and Instance UIDs only in the file meta; the
    dataset's SOPClassUID, SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID are empty, so
    storescu refuses them ("unknown storage SOP class") and the node would answer A900. The copies
    take the UIDs from the file meta and one invented study/series; the JPEG 2000 pixel data stays
    byte for byte as it was.
    """
    out.mkdir()
    study, series = generate_uid(entropy_srcs=["study"]), generate_uid(entropy_srcs=["series"])
    copies = []
    for path in _dicom_files(folder):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        copies.append(out / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def _consume_all(queues: tuple[str, str], settle: float) -> list[dict[str, object]]:
    """Every message in the work queue, waiting ``settle`` seconds after the last one for more."""
    queue, dead = queues
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    declare_topology(channel, queue, dead)
    messages: list[dict[str, object]] = []
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.1)
            continue
        messages.append(json.loads(body))
        deadline = time.monotonic() + settle
    connection.close()
    return messages


def test_storescu_sends_lidc_and_jpeg2000_and_each_study_gets_one_job_on_rabbitmq(
    make_node: Callable[..., Node],
    amqp_queues: tuple[str, str],
    shared_data: Path,
    tmp_path: Path,
) -> None:
    queue, dead = amqp_queues
    node = make_node(amqp_url=AMQP_URL, amqp_queue=queue, amqp_dead_letter_queue=dead)
    lidc = shared_data / "lidc-idri-0001"
    j2k = tmp_path / "jpeg2000-ct"
    originals = dict(
        zip(
            _identified_copies(shared_data / "jpeg2000-ct", j2k),
            _dicom_files(shared_data / "jpeg2000-ct"),
            strict=True,
        )
    )

    # The LIDC folder holds the readers' XML next to the slices: the scan pattern skips it.
    # -xv proposes JPEG 2000 lossless, so the JPEG 2000 slices go as they are, not transcoded.
    for folder, pattern, extra in ((lidc, "*.dcm", ()), (j2k, "*", ("-xv",))):
        result = storescu(node.scp.port, folder, pattern=pattern, extra=extra)
        assert result.returncode == 0, result.stderr

    sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in _dicom_files(lidc) + _dicom_files(j2k)}
    assert len(sent) == 133 + 20
    with node.db.session() as session:
        stored = {i.sop_instance_uid: i.path for i in session.scalars(select(Instance))}
    assert stored.keys() == sent.keys()
    for uid, original in sent.items():
        ours = pydicom.dcmread(node.spool.path(stored[uid]))
        theirs = pydicom.dcmread(originals.get(original, original))
        assert ours.SOPInstanceUID == uid
        assert ours.file_meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID
        assert ours.PixelData == theirs.PixelData

    messages = _consume_all(amqp_queues, settle=3.0)
    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in sent.values()}
    assert sorted(m["study_instance_uid"] for m in messages) == sorted(studies)
    for message in messages:
        assert set(message) == {
            "job_id",
            "study_instance_uid",
            "instances",
            "spool_path",
            "supersedes",
        }
    with node.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2
        counts = dict(session.execute(select(Study.study_instance_uid, Study.instances)).all())
    assert sorted(counts.values()) == [20, 133]


def test_the_same_instances_sent_twice_are_stored_and_counted_once(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node(quiet_seconds=30)
    small = shared_data / "lidc-small"
    assert storescu(node.scp.port, small).returncode == 0
    assert storescu(node.scp.port, small).returncode == 0
    with node.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 16
        study = session.scalars(select(Study)).one()
    assert study.instances == 16
    files = [p for p in node.spool.root.rglob("*") if p.is_file()]
    assert len(files) == 16


def test_instances_arriving_after_the_study_was_queued_make_a_job_that_supersedes_it(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node(quiet_seconds=0.5)
    files = sorted((shared_data / "lidc-small").rglob("*.dcm"))
    assert storescu(node.scp.port, *files[:10]).returncode == 0

    def jobs() -> list[Job]:
        with node.db.session() as session:
            return list(session.scalars(select(Job).order_by(Job.created_at)))

    first = wait_for(jobs)[0]
    assert first.instances == 10
    assert storescu(node.scp.port, *files[10:]).returncode == 0
    both = wait_for(lambda: len(jobs()) == 2 and jobs())
    assert both[1].instances == 16
    assert both[1].supersedes == first.id
    assert both[0].state in ("superseded", "done")
    with node.db.session() as session:
        study = session.scalars(select(Study)).one()
    assert study.current_job_id == both[1].id
    assert study.state == "queued"


def test_concurrent_associations_each_storing_a_study_all_succeed(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    node = make_node(quiet_seconds=30)
    slices = sorted((shared_data / "lidc-small").rglob("*.dcm"))
    folders = []
    for n in range(4):
        folder = tmp_path / f"s{n}"
        folder.mkdir()
        study = generate_uid()
        for path in slices:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name)
        folders.append(folder)
    cmds = [
        subprocess.Popen(
            [
                system_program("storescu"),
                "-aec",
                "NODULEAI",
                "+sd",
                "+sp",
                "*.dcm",
                "127.0.0.1",
                str(node.scp.port),
                str(folder),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    for cmd in cmds:
        _, err = cmd.communicate(timeout=120)
        assert cmd.returncode == 0, err
    with node.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 4 * len(slices)
        assert sorted(session.scalars(select(Study.instances))) == [len(slices)] * 4


def test_our_own_results_sent_back_with_a_re_push_neither_reopen_the_study_nor_count_as_input(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    """A PACS forwarding a study sends its CT again with our SEG, SR and GSPS: all are stored
    (success for the sender), the study stays as it was, no second job."""
    node = make_node(quiet_seconds=0.5)
    small = sorted((shared_data / "lidc-small").rglob("*.dcm"))
    assert storescu(node.scp.port, *small).returncode == 0

    def jobs() -> list[Job]:
        with node.db.session() as session:
            return list(session.scalars(select(Job)))

    (job,) = wait_for(jobs)
    volume = build_volume(small)
    (xml,) = (shared_data / "lidc-small").rglob("*.xml")
    model = ModelIdentity("NoduleAI lung nodule detector", "test")
    encoded = encode_results(small, volume, lidc_nodules(xml, volume), model)
    outputs = []
    for ds in encoded.datasets:
        outputs.append(tmp_path / f"{ds.Modality}.dcm")
        ds.save_as(outputs[-1], enforce_file_format=True)

    for _ in range(2):  # the re-push, and once more
        sent = storescu(node.scp.port, *small, *outputs, extra=("-R",))
        assert sent.returncode == 0, sent.stderr
    time.sleep(2.0)  # longer than the quiet period: a reopened study would have a new job now

    assert [j.id for j in jobs()] == [job.id]
    with node.db.session() as session:
        study = session.scalars(select(Study)).one()
        returned = session.scalars(select(ReturnedResult)).all()
        instances = session.scalar(select(func.count()).select_from(Instance))
    assert (study.state, study.instances, instances) == ("queued", 16, 16)
    assert sorted(r.sop_class_uid for r in returned) == sorted(
        str(ds.SOPClassUID) for ds in encoded.datasets
    )
    assert all(node.spool.path(r.path).is_file() for r in returned)
