"""Where results go: back to the sending PACS by default, as configured, nothing in shadow mode."""

from __future__ import annotations

import pytest

from dicom_node.config import NodeConfig
from dicom_node.db import ReportStatus
from dicom_node.errors import ConfigError
from dicom_node.lifecycle import delivery_rows
from dicom_node.results import ObjectKind, ResultObject

DESTINATIONS = [
    {"name": "pacs", "type": "dimse", "ae_title": "ORTHANC", "host": "10.0.0.5", "port": 4242},
    {"name": "archive", "type": "dicomweb", "url": "http://archive/dicom-web"},
    {"name": "ehr", "type": "fhir", "url": "http://ehr/fhir", "token": "s3cret"},
]


def _object(uid: str, path: str) -> ResultObject:
    return ResultObject(
        ObjectKind.SR, "SR", "1.2.840.10008.5.1.4.1.1.88.34", uid, "2.1", "1.1", path
    )


def _config(*policies: dict[str, object]) -> NodeConfig:
    return NodeConfig.model_validate({"ae_policies": list(policies), "destinations": DESTINATIONS})


def test_results_go_back_to_the_sending_pacs_and_to_fhir_by_default() -> None:
    names = [d.name for d in _config().destinations_for("ORTHANC")]
    assert names == ["pacs", "ehr"]
    assert [d.name for d in _config().destinations_for("CT_SCANNER")] == ["ehr"]


def test_an_ae_policy_can_name_its_destinations() -> None:
    config = _config({"ae_title": "CT1", "results_to": ["archive", "pacs"]})
    assert [d.name for d in config.destinations_for("CT1")] == ["archive", "pacs"]


def test_shadow_mode_sends_nothing_to_dicom_destinations() -> None:
    config = _config({"ae_title": "ORTHANC", "shadow": True})
    assert [d.name for d in config.destinations_for("ORTHANC")] == ["ehr"]
    rows = delivery_rows(config, "ORTHANC", "job", [_object("1.2", "p")], None)
    assert rows == []


def test_delivery_rows_are_one_per_object_and_destination_and_one_per_report_status() -> None:
    objects = [_object(f"1.2.{i}", f"r/{i}.dcm") for i in range(3)]
    rows = delivery_rows(
        _config(), "ORTHANC", "job", objects, ReportStatus.PRELIMINARY, "r/fhir.json"
    )
    assert sorted((r.destination, r.kind, r.object_uid, r.report_status, r.path) for r in rows) == [
        ("ehr", "fhir", "", "preliminary", "r/fhir.json"),
        ("pacs", "dicom", "1.2.0", "", "r/0.dcm"),
        ("pacs", "dicom", "1.2.1", "", "r/1.dcm"),
        ("pacs", "dicom", "1.2.2", "", "r/2.dcm"),
    ]


def test_an_unknown_destination_name_is_refused() -> None:
    config = _config({"ae_title": "CT1", "results_to": ["nowhere"]})
    with pytest.raises(ConfigError, match="nowhere"):
        config.destinations_for("CT1")
