"""Unit behaviour of settings, spool paths, header checks, statuses and the AE policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.config import Completeness, NodeConfig, load_settings
from dicom_node.errors import (
    ConfigError,
    DatabaseUnavailableError,
    DatasetMismatchError,
    StorageFullError,
    UndecodableDatasetError,
)
from dicom_node.ingest import read_header, uid_form_problem
from dicom_node.policy import AssociationPolicy
from dicom_node.spool import LocalSpool, instance_path, safe_uid
from dicom_node.status import Status, status_for


def _encoded(**attrs: object) -> bytes:
    from io import BytesIO

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


IDS = {
    "SOPClassUID": CTImageStorage,
    "SOPInstanceUID": "1.2.3.4",
    "StudyInstanceUID": "1.2.3",
    "SeriesInstanceUID": "1.2.3.5",
}


def test_settings_have_the_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATA_DIR", "AE_TITLE", "DICOM_PORT", "HTTP_PORT", "AMQP_URL", "DB_URL"):
        monkeypatch.delenv(f"NODULEAI_{name}", raising=False)
    s = load_settings()
    assert (s.data_dir, s.ae_title, s.dicom_port, s.http_port) == (
        Path("var"),
        "NODULEAI",
        11112,
        8080,
    )
    assert s.amqp_url is None and s.quiet_seconds == 5
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("var/noduleai.db")


def test_secrets_are_masked_in_the_effective_configuration() -> None:
    s = load_settings(amqp_url="amqp://user:hunter2@broker/", db_url="postgresql://u:pw@db/x")
    assert "hunter2" not in str(s.effective()) and "pw@" not in str(s.effective())


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"ae_title": "A" * 17}, "NODULEAI_AE_TITLE"),
        ({"quiet_seconds": -1}, "NODULEAI_QUIET_SECONDS"),
        ({"tls_cert": "/x.pem"}, "NODULEAI_TLS_KEY"),
    ],
)
def test_invalid_settings_fail_with_the_setting_named(
    overrides: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(**overrides)


def test_uids_that_are_not_uids_never_steer_a_spool_path() -> None:
    assert safe_uid("1.2.840.10008") == "1.2.840.10008"
    assert safe_uid("1.2.3\x00") == "1.2.3"
    for hostile in ("../../etc/passwd", "1.2/3", "..", "", "1.2.3" + ".4" * 40):
        name = safe_uid(hostile)
        assert name.startswith("x") and "/" not in name and ".." not in name
    assert instance_path("1.2", "../x", "1.3").count("/") == 2


def test_the_spool_refuses_writes_under_the_free_space_floor(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path, min_free_bytes=1 << 62)
    with pytest.raises(StorageFullError):
        spool.ensure_space(10)
    LocalSpool(tmp_path, 0).write("a/b/c.dcm", b"data")
    assert (tmp_path / "a/b/c.dcm").read_bytes() == b"data"
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError):
        spool.path("../outside")


def test_headers_are_read_and_incomplete_iods_listed_without_patient_values() -> None:
    header = read_header(_encoded(**IDS, Modality="CT", PatientName="Doe^J"))
    assert header.sop_instance_uid == "1.2.3.4" and header.modality == "CT"
    assert "PatientName" not in header.missing and "PatientID" in header.missing


def test_a_dataset_missing_an_identifier_or_cut_short_is_refused() -> None:
    with pytest.raises(DatasetMismatchError, match="SOPInstanceUID"):
        read_header(_encoded(**{**IDS, "SOPInstanceUID": ""}))
    data = _encoded(**IDS, Rows=2, Columns=2, BitsAllocated=16, PixelData=b"\x00" * 8)
    with pytest.raises(UndecodableDatasetError):
        read_header(data[:-3])
    with pytest.raises(UndecodableDatasetError):
        read_header(b"\x00" * 50 + b"not dicom at all")


def test_a_dataset_with_an_unknown_value_representation_cannot_be_understood() -> None:
    data = _encoded(**IDS, Modality="CT")
    at = data.find(b"\x08\x00\x60\x00CS")  # (0008,0060) Modality, explicit VR "CS"
    assert at > 0
    with pytest.raises(UndecodableDatasetError, match="Unknown Value Representation") as refused:
        read_header(data[: at + 4] + b"ZZ" + data[at + 6 :])
    assert status_for(refused.value) is Status.CANNOT_UNDERSTAND


def test_a_uid_whose_value_representation_was_replaced_cannot_be_understood() -> None:
    # found by `make chaos`: StudyInstanceUID re-labelled SL (4-byte integers), so its 26 bytes
    # of text cannot be read as values (pydicom's BytesLengthException, not a ValueError)
    data = _encoded(**IDS, Modality="CT")
    at = data.find(b"\x20\x00\x0d\x00UI")  # (0020,000D) StudyInstanceUID, explicit VR "UI"
    assert at > 0
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    assert length % 4, "the test needs a UID whose length is no multiple of 4"
    with pytest.raises(UndecodableDatasetError, match="even multiple") as refused:
        read_header(data[: at + 4] + b"SL" + data[at + 6 :])
    assert status_for(refused.value) is Status.CANNOT_UNDERSTAND


def test_errors_map_to_one_status_each() -> None:
    assert status_for(StorageFullError()) is Status.OUT_OF_RESOURCES
    assert status_for(DatabaseUnavailableError()) is Status.OUT_OF_RESOURCES
    assert status_for(UndecodableDatasetError()) is Status.CANNOT_UNDERSTAND
    assert status_for(DatasetMismatchError()) is Status.DATASET_MISMATCH
    assert status_for(RuntimeError()) is Status.PROCESSING_FAILURE


def test_the_ae_policy_checks_titles_and_source_networks() -> None:
    config = NodeConfig.model_validate(
        {
            "ae_policies": [
                {"ae_title": "CT1", "hosts": ["10.0.0.0/24"], "completeness": "release"},
                {"ae_title": "ANYWHERE"},
            ]
        }
    )
    policy = AssociationPolicy(config, default_quiet_seconds=5)
    assert policy.allows("CT1", "10.0.0.7") and not policy.allows("CT1", "10.0.1.7")
    assert policy.allows("ANYWHERE", "192.0.2.1") and not policy.allows("OTHER", "10.0.0.7")
    assert policy.for_ae("CT1").completeness is Completeness.RELEASE
    assert policy.for_ae("OTHER").completeness is Completeness.QUIET
    assert AssociationPolicy(NodeConfig(), 5).allows("ANYONE", "192.0.2.1")


@pytest.mark.parametrize(
    ("uid", "problem"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", None),
        ("0.1.0.2", None),
        ("2.25." + "9" * 59, None),  # exactly 64 characters
        ("2.25." + "9" * 60, "longer than 64 characters"),
        ("1.2..3", "an empty component"),
        ("1.2.3.", "an empty component"),
        ("1.02.3", "a component with a leading zero"),
    ],
)
def test_uid_form_follows_ps3_5_9_1(uid: str, problem: str | None) -> None:
    assert uid_form_problem(uid) == problem


def test_a_uid_of_other_characters_is_refused_and_one_of_bad_form_stored_with_its_problem() -> None:
    for hostile in ("../../etc/x", "1.2.3a", "1.2 .3"):
        with pytest.raises(DatasetMismatchError, match="SOPInstanceUID not a UID") as refused:
            read_header(_encoded(**{**IDS, "SOPInstanceUID": hostile}, Modality="CT"))
        assert hostile not in str(refused.value)  # source UIDs stay out of messages and logs
    header = read_header(_encoded(**{**IDS, "SeriesInstanceUID": "1.02.3"}, Modality="CT"))
    assert header.nonconforming == ("SeriesInstanceUID: a component with a leading zero",)
    assert read_header(_encoded(**IDS, Modality="CT")).nonconforming == ()
