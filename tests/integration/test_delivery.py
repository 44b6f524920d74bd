"""Delivery to a real PACS (Orthanc): exactly what is sent, confirmed objects only once, and
everything delivered after the PACS was stopped in the middle and started again."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
from sqlalchemy import select

from dicom_node.db import Delivery, DeliveryKind, DeliveryState, Job, JobState, Study, StudyState
from dicom_node.node import Node
from tests.helpers import free_port, wait_for
from tests.peers import Orthanc


def _config(tmp_path: Path, orthanc: Orthanc) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(
        "destinations:\n"
        f"  - {{name: pacs, type: dimse, ae_title: {orthanc.aet}, host: 127.0.0.1, "
        f"port: {orthanc.dicom_port}}}\n"
        f"  - {{name: web, type: dicomweb, url: '{orthanc.url}/dicom-web', "
        f"username: {orthanc.username}, password: '{orthanc.password}'}}\n"
    )
    return path


def _job_with_deliveries(node: Node, files: list[Path], destination: str) -> str:
    """A delivering job whose result objects are ``files`` (copied into the spool)."""
    with node.db.session() as session:
        study = Study(
            study_instance_uid=f"1.2.3.999.{len(files)}",
            calling_ae="ORTHANC",
            instances=0,
            state=StudyState.DELIVERING,
        )
        session.add(study)
        session.flush()
        job = Job(
            id=f"job-{destination}",
            study_id=study.id,
            instances=0,
            attempts=1,
            state=JobState.DELIVERING,
        )
        session.add(job)
        study.current_job_id = job.id
        session.flush()
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            relpath = f"results/{job.id}/{ds.SOPInstanceUID}.dcm"
            node.spool.path(relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, node.spool.path(relpath))
            session.add(
                Delivery(
                    job_id=job.id,
                    destination=destination,
                    kind=DeliveryKind.DICOM,
                    object_uid=ds.SOPInstanceUID,
                    report_status="",
                    path=relpath,
                    attempts=0,
                    state=DeliveryState.PENDING,
                )
            )
        return job.id


def _instances(orthanc: Orthanc) -> int:
    return int(orthanc.get("/statistics")["CountInstances"])


def _job_state(node: Node, job_id: str) -> str:
    with node.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def test_a_pacs_stopped_during_delivery_gets_everything_once_when_it_is_back(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", store_delay=0.1).start()
    try:
        _stop_during_delivery(make_node, orthanc, shared_data, tmp_path)
    finally:
        orthanc.stop()


def _stop_during_delivery(
    make_node: Callable[..., Node], orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    node = make_node(
        config=_config(tmp_path, orthanc), delivery_backoff_seconds=0.3, delivery_max_attempts=50
    )
    files = sorted((shared_data / "lidc-idri-0001").rglob("*.dcm"))[:40]

    stopped = threading.Event()

    def stop_midway() -> None:
        wait_for(lambda: _instances(orthanc) >= 5, timeout=60, interval=0.05)
        # Killed, not asked to stop: a graceful stop may finish the association first.
        orthanc.crash()
        stopped.set()

    stopper = threading.Thread(target=stop_midway)
    stopper.start()
    job_id = _job_with_deliveries(node, files, "pacs")
    node.delivery.wake()
    stopper.join(timeout=90)
    assert stopped.is_set()

    def retried() -> bool:
        with node.db.session() as session:
            rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
        return any(r.attempts >= 2 and r.state == DeliveryState.PENDING for r in rows)

    wait_for(retried, timeout=120)  # a cut association may wait out the DIMSE timeout (30 s)
    assert _job_state(node, job_id) == JobState.DELIVERING
    orthanc.start()
    wait_for(lambda: _job_state(node, job_id) == JobState.DONE, timeout=120, interval=0.3)
    assert _instances(orthanc) == len(files)
    with node.db.session() as session:
        rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
    assert {r.state for r in rows} == {DeliveryState.DONE}

    # Delivering the same objects again leaves the PACS with the same instances.
    again = _job_with_deliveries_again(node, job_id)
    node.delivery.wake()
    wait_for(lambda: _all_done(node, again), timeout=60)
    assert _instances(orthanc) == len(files)


def _job_with_deliveries_again(node: Node, job_id: str) -> str:
    with node.db.session() as session:
        for row in session.scalars(select(Delivery).where(Delivery.job_id == job_id)):
            row.state, row.next_attempt_at = DeliveryState.PENDING, None
    return job_id


def _all_done(node: Node, job_id: str) -> bool:
    with node.db.session() as session:
        states = session.scalars(select(Delivery.state).where(Delivery.job_id == job_id)).all()
    return set(states) == {DeliveryState.DONE}


def test_stow_rs_delivers_to_orthanc_dicomweb(
    make_node: Callable[..., Node], orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    node = make_node(config=_config(tmp_path, orthanc), delivery_backoff_seconds=0.3)
    files = sorted((shared_data / "lidc-small").rglob("*.dcm"))[:5]
    job_id = _job_with_deliveries(node, files, "web")
    node.delivery.wake()
    wait_for(lambda: _job_state(node, job_id) == JobState.DONE, timeout=60, interval=0.3)
    assert _instances(orthanc) == 5


def test_a_delivery_failing_on_every_attempt_fails_the_job_with_the_reason(
    make_node: Callable[..., Node], orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    node = make_node(
        config=_config(tmp_path, orthanc), delivery_backoff_seconds=0.1, delivery_max_attempts=3
    )
    orthanc.stop()
    files = sorted((shared_data / "lidc-small").rglob("*.dcm"))[:2]
    job_id = _job_with_deliveries(node, files, "pacs")
    node.delivery.wake()
    wait_for(lambda: _job_state(node, job_id) == JobState.FAILED, timeout=60, interval=0.2)
    with node.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.error is not None
    assert job.error_code == "delivery_failed"
    assert "pacs: destination_unavailable" in job.error and "not established" in job.error


class _StatusSCP:
    """A Storage SCP on loopback that answers the C-STOREs with ``statuses`` in turn (the last
    one for ever after): a PACS out of resources (0xA700) or refusing a dataset (0xA900)."""

    def __init__(self, statuses: list[int]) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.statuses = list(statuses)
        self.answered: list[int] = []
        self.ae = AE(ae_title="STATUSPACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, _event: object) -> int:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        self.answered.append(status)
        return status

    def config(self, tmp_path: Path) -> Path:
        path = tmp_path / "status-pacs.yaml"
        path.write_text(
            "destinations:\n"
            f"  - {{name: pacs, type: dimse, ae_title: STATUSPACS, host: 127.0.0.1, "
            f"port: {self.port}}}\n"
        )
        return path

    def stop(self) -> None:
        self.server.shutdown()


def _deliveries(node: Node, job_id: str) -> list[Delivery]:
    with node.db.session() as session:
        return list(session.scalars(select(Delivery).where(Delivery.job_id == job_id)))


def _deliver_to(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path, statuses: list[int]
) -> tuple[_StatusSCP, Node, str, JobState]:
    """One object delivered to a PACS answering ``statuses``; wait for the job to end."""
    pacs = _StatusSCP(statuses)
    try:
        node = make_node(
            config=pacs.config(tmp_path), delivery_backoff_seconds=0.2, delivery_max_attempts=5
        )
        files = sorted((shared_data / "lidc-small").rglob("*.dcm"))[:1]
        job_id = _job_with_deliveries(node, files, "pacs")
        node.delivery.wake()
        ended = (JobState.DONE, JobState.FAILED)
        wait_for(lambda: _job_state(node, job_id) in ended, timeout=60, interval=0.2)
    finally:
        pacs.stop()
    return pacs, node, job_id, JobState(_job_state(node, job_id))


def test_a_pacs_out_of_resources_is_retried_until_it_stores(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    pacs, node, job_id, state = _deliver_to(
        make_node, shared_data, tmp_path, [0xA700, 0xA700, 0x0000]
    )
    assert state == JobState.DONE
    assert pacs.answered == [0xA700, 0xA700, 0x0000]
    (row,) = _deliveries(node, job_id)
    assert (row.state, row.attempts, row.error_code) == (DeliveryState.DONE, 3, None)


def test_a_pacs_refusing_a_dataset_fails_the_delivery_at_once(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    pacs, node, job_id, state = _deliver_to(make_node, shared_data, tmp_path, [0xA900])
    assert state == JobState.FAILED
    assert pacs.answered == [0xA900]
    (row,) = _deliveries(node, job_id)
    assert (row.state, row.attempts, row.error_code) == (DeliveryState.FAILED, 1, "refused")
    assert row.error == "C-STORE status 0xA900"
    with node.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.error_code, job.error) == (
            "delivery_failed",
            "pacs: refused: C-STORE status 0xA900",
        )
