"""Strange and broken input gets the right DIMSE status, loses nothing; the SCP keeps serving."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dicom_node.db import Instance
from dicom_node.node import Node
from dicom_node.status import Status
from tests.helpers import wait_for


@pytest.fixture
def raw_sending() -> Iterator[None]:
    """Make pynetdicom send files as their bytes are, as a broken modality would."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def _associate(port: int, path: Path | None = None) -> Association:
    """An association proposing what ``path`` needs (its own SOP class and transfer syntax)."""
    ae = AE(ae_title="BROKEN")
    ae.add_requested_context(Verification)
    if path is not None:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="NODULEAI")
    assert assoc.is_established
    return assoc


def _store(port: int, path: Path) -> int:
    assoc = _associate(port, path)
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def _instances(node: Node) -> int:
    with node.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _spooled(node: Node) -> list[Path]:
    return [p for p in node.spool.root.rglob("*") if p.is_file()]


def test_malformed_real_slices_are_stored_with_the_dataset_mismatch_warning(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node(quiet_seconds=30)
    for path in sorted((shared_data / "malformed").glob("*.dcm")):
        assert _store(node.scp.port, path) == Status.DATASET_MISMATCH_WARNING
    assert _instances(node) == 2
    assert len(_spooled(node)) == 2


def test_a_truncated_file_is_refused_as_not_understood_and_nothing_is_written(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path, raw_sending: None
) -> None:
    node = make_node()
    source = sorted((shared_data / "lidc-small").rglob("*.dcm"))[0]
    data = source.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 2000):
        truncated = tmp_path / f"truncated-{cut}.dcm"
        truncated.write_bytes(data[:cut])
        assert _store(node.scp.port, truncated) == Status.CANNOT_UNDERSTAND
    assert _instances(node) == 0
    assert _spooled(node) == []


def test_a_uid_that_is_not_a_uid_is_refused_and_one_of_bad_form_stored_with_a_warning(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path, raw_sending: None
) -> None:
    """PS3.5 9.1: "../../etc/x" as a study UID is refused (0xA900), nothing kept; a series UID
    with a leading zero, as older modalities write them, is stored with the warning 0xB007."""
    node = make_node()
    source = sorted((shared_data / "lidc-small").rglob("*.dcm"))[0]
    hostile = pydicom.dcmread(source)
    hostile.StudyInstanceUID = "../../etc/x"
    hostile.SOPInstanceUID = hostile.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    hostile.save_as(tmp_path / "hostile.dcm")
    assert _store(node.scp.port, tmp_path / "hostile.dcm") == Status.DATASET_MISMATCH
    assert _instances(node) == 0 and _spooled(node) == []
    old_style = pydicom.dcmread(source)
    old_style.SeriesInstanceUID = "1.2.840.0113654.2.70.1"
    old_style.save_as(tmp_path / "old-style.dcm")
    assert _store(node.scp.port, tmp_path / "old-style.dcm") == Status.DATASET_MISMATCH_WARNING
    assert _instances(node) == 1


def test_a_dataset_without_identifying_uids_is_refused_as_not_matching_its_sop_class(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path, raw_sending: None
) -> None:
    node = make_node()
    source = sorted((shared_data / "lidc-small").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    del ds.SOPInstanceUID  # the file meta still names it, so the C-STORE request carries it
    no_uid = tmp_path / "no-sop-instance-uid.dcm"
    ds.save_as(no_uid)
    assert _store(node.scp.port, no_uid) == Status.DATASET_MISMATCH
    # Real files whose dataset UIDs are empty (only the file meta has them).
    j2k = sorted((shared_data / "jpeg2000-ct").iterdir())[0]
    assert _store(node.scp.port, j2k) == Status.DATASET_MISMATCH
    assert _instances(node) == 0
    assert _spooled(node) == []


def test_a_c_store_whose_command_lacks_the_sop_instance_uid_is_answered_at_once(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    # An empty SOP Instance UID (dataset and file meta): the request's Affected SOP Instance UID,
    # required in a C-STORE-RQ, is missing; pynetdicom alone drops such a request unanswered.
    node = make_node()
    source = sorted((shared_data / "lidc-small").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ""
    ds.file_meta.MediaStorageSOPInstanceUID = ""
    empty = tmp_path / "empty-sop-instance-uid.dcm"
    ds.save_as(empty)
    assoc = _associate(node.scp.port, empty)
    assoc.dimse_timeout = 10
    try:
        start = time.monotonic()
        status = assoc.send_c_store(empty)
        assert int(status.Status) == Status.DATASET_MISMATCH
        assert time.monotonic() - start < 5.0
        # the association goes on serving
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
    assert _instances(node) == 0 and _spooled(node) == []


def test_garbage_in_a_p_data_pdu_aborts_that_association_and_others_are_served(
    make_node: Callable[..., Node], shared_data: Path
) -> None:
    node = make_node()
    victim = _associate(node.scp.port)
    garbage = bytes(range(256)) * 4
    # P-DATA-TF (PS3.8 9.3.5) whose PDV item claims more bytes than the PDU holds.
    pdv = struct.pack(">IB", 0x7FFFFFF0, 1) + garbage
    victim.dul.socket.socket.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    wait_for(lambda: not victim.is_established, timeout=20)
    assert victim.is_aborted

    other = _associate(node.scp.port)
    assert other.send_c_echo().Status == Status.SUCCESS
    other.release()
    source = sorted((shared_data / "lidc-small").rglob("*.dcm"))[0]
    assert _store(node.scp.port, source) == Status.SUCCESS


LOSSLESS = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
}


def test_every_transfer_syntax_of_the_real_slice_is_stored_as_sent_and_decodes(
    make_node: Callable[..., Node], shared_data: Path, tmp_path: Path, raw_sending: None
) -> None:
    node = make_node(quiet_seconds=30)
    folder = shared_data / "transfer-syntaxes"
    reference = pydicom.dcmread(folder / "CTImage.dcm").pixel_array
    stored = 0
    for path in sorted(folder.glob("CTImage.dcm_*")):
        # The re-encodings share one SOP Instance UID; give each its own so each is stored.
        ds = pydicom.dcmread(path)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copy = tmp_path / path.name
        ds.save_as(copy)
        assoc = AE(ae_title="MODALITY")
        assoc.add_requested_context(ds.SOPClassUID, [syntax])
        association = assoc.associate("127.0.0.1", node.scp.port, ae_title="NODULEAI")
        if not association.is_established:
            # Only what this installation cannot decode is refused: JPEG processes 6/8, 10/12.
            assert syntax in ("1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"), syntax
            continue
        status = association.send_c_store(copy)
        association.release()
        assert status.Status == Status.SUCCESS, path.name
        stored += 1
        with node.db.session() as session:
            row = session.scalars(
                select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
            ).one()
        ours = pydicom.dcmread(node.spool.path(row.path))
        assert ours.file_meta.TransferSyntaxUID == syntax
        if syntax in LOSSLESS:
            assert (ours.pixel_array == reference).all(), path.name
        else:
            assert ours.pixel_array.shape == reference.shape
    assert stored >= 13
    assert _instances(node) == stored
