"""The FHIR resource builder: deterministic identity, laterality, components, R4 validity."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from dicom_node.fhir_resources import (
    DCM,
    DICOM_UID_SYSTEM,
    LATERALITY_EXTENSION,
    LOINC,
    REPORT_SYSTEM,
    SNOMED,
    UCUM,
    ReportSubject,
    build_observation,
    build_report,
    build_results,
    laterality,
    patient_identifier_system,
    report_identifier,
    study_datetime,
)
from dicom_node.results import ModelIdentity

STUDY = ReportSubject("1.2.826.0.1.3680043.8.498.1", "PAT-0001", "1.2.826.0.1.3680043.8.498.9")
MODEL = ModelIdentity("noduleai", "1.0.0")
NODULE: dict[str, Any] = {
    "center_mm": [48.3, -12.0, -150.5],
    "long_axis_mm": 8.25,
    "short_axis_mm": 6.0,
    "volume_mm3": 240.5,
    "mean_hu": -35.2,
    "type": "part-solid",
    "probability": 0.8731,
    "needs_review": True,
}


def components(obs: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (c["code"]["coding"][0]["system"], c["code"]["coding"][0]["code"]): c
        for c in obs["component"]
    }


def test_the_report_identifier_depends_on_the_study_only() -> None:
    a = build_report(STUDY, "registered")
    b = build_report(ReportSubject(STUDY.study_instance_uid, "OTHER"), "preliminary")
    assert a["identifier"][0] == b["identifier"][0]
    assert a["identifier"][0]["system"] == REPORT_SYSTEM
    assert report_identifier("1.2.3")["value"] != report_identifier("1.2.4")["value"]


def test_reruns_build_identical_resources() -> None:
    uids = ["2.25.1", "2.25.2"]
    first = build_results(STUDY, [NODULE, NODULE], MODEL, tracking_uids=uids, sr_uid="1.2.3.4")
    again = build_results(
        STUDY, copy.deepcopy([NODULE, NODULE]), MODEL, tracking_uids=uids, sr_uid="1.2.3.4"
    )
    assert first == again
    ids = [o["identifier"][0]["value"] for o in first[1]]
    assert len(set(ids)) == 2
    assert all(v.startswith("urn:oid:2.25.") for v in ids)


def test_observation_identifiers_are_the_tracking_uids() -> None:
    report, (obs,) = build_results(STUDY, [NODULE], MODEL, tracking_uids=["2.25.42"])
    assert obs["identifier"] == [{"system": DICOM_UID_SYSTEM, "value": "urn:oid:2.25.42"}]
    assert report["result"] == [{"type": "Observation", "identifier": obs["identifier"][0]}]


@pytest.mark.parametrize(
    ("x", "side", "code"), [(48.3, "left", "7771000"), (-48.3, "right", "24028007")]
)
def test_laterality_follows_the_lps_x_sign(x: float, side: str, code: str) -> None:
    assert laterality([x, 0.0, 0.0]) == side
    obs = build_observation(STUDY, {**NODULE, "center_mm": [x, 0, 0]}, "2.25.1", MODEL)
    assert obs["bodySite"]["coding"] == [
        {"system": SNOMED, "code": "39607008", "display": "Lung structure"}
    ]
    (ext,) = obs["bodySite"]["extension"]
    assert ext["url"] == LATERALITY_EXTENSION
    assert ext["valueCodeableConcept"]["coding"][0] == {
        "system": SNOMED,
        "code": code,
        "display": side.capitalize(),
    }


def test_components_carry_the_measurements_in_ucum() -> None:
    obs = build_observation(STUDY, NODULE, "2.25.1", MODEL)
    c = components(obs)
    expected = {
        (SNOMED, "103339001"): (8.25, "mm"),
        (SNOMED, "103340004"): (6.0, "mm"),
        (SNOMED, "118565006"): (240.5, "mm3"),
        (DCM, "112031"): (-35.2, "[hnsf'U]"),
        ("urn:noduleai:fhir:nodule", "detection-probability"): (0.8731, "1"),
    }
    for key, (value, unit) in expected.items():
        quantity = c[key]["valueQuantity"]
        assert (quantity["value"], quantity["code"], quantity["system"]) == (value, unit, UCUM)
    kind = c[("urn:noduleai:fhir:nodule", "attenuation-type")]["valueCodeableConcept"]
    assert kind["coding"][0]["code"] == "part-solid"
    assert c[("urn:noduleai:fhir:nodule", "needs-review")]["valueBoolean"] is True
    assert obs["code"]["coding"][0] == {"system": SNOMED, "code": "27925004", "display": "Nodule"}
    assert obs["status"] == "preliminary"


def test_ground_glass_also_carries_the_dicom_code() -> None:
    obs = build_observation(STUDY, {**NODULE, "type": "ground-glass"}, "2.25.1", MODEL)
    kind = components(obs)[("urn:noduleai:fhir:nodule", "attenuation-type")]
    assert {"system": DCM, "code": "112120", "display": "Ground glass opacity"} in kind[
        "valueCodeableConcept"
    ]["coding"]


def test_a_missing_mean_hu_leaves_its_component_out() -> None:
    obs = build_observation(STUDY, {**NODULE, "mean_hu": float("nan")}, "2.25.1", MODEL)
    assert (DCM, "112031") not in components(obs)


def test_references_are_logical_by_dicom_uid_and_patient_identifier() -> None:
    obs = build_observation(STUDY, NODULE, "2.25.1", MODEL, sr_uid="2.25.7", seg_uid="2.25.8")
    study_ref = {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{STUDY.study_instance_uid}"},
        "display": "CT study",
    }
    assert obs["focus"] == [study_ref]
    assert [r["identifier"]["value"] for r in obs["derivedFrom"]] == [
        f"urn:oid:{STUDY.study_instance_uid}",
        "urn:oid:2.25.7",
        "urn:oid:2.25.8",
    ]
    assert obs["subject"] == {
        "type": "Patient",
        "identifier": {"system": f"urn:oid:{STUDY.issuer_of_patient_id}", "value": "PAT-0001"},
    }
    report = build_report(STUDY, "registered")
    assert report["imagingStudy"] == [study_ref]
    assert report["code"]["coding"] == [{"system": LOINC, "code": "24627-2", "display": "CT Chest"}]
    assert report["category"][0]["coding"][0]["code"] == "RAD"


@pytest.mark.parametrize(
    ("issuer", "system"),
    [
        ("1.2.3.4", "urn:oid:1.2.3.4"),
        ("https://hospital.example/mrn", "https://hospital.example/mrn"),
        ("HOSPITAL A", "urn:noduleai:issuer:HOSPITAL%20A"),
        ("", None),
        (None, None),
    ],
)
def test_issuer_of_patient_id_becomes_a_uri(issuer: str | None, system: str | None) -> None:
    assert patient_identifier_system(issuer) == system


def test_report_statuses_and_conclusions() -> None:
    assert "result" not in build_report(STUDY, "registered")
    cancelled = build_report(STUDY, "cancelled", conclusion="rejected: no eligible series")
    assert cancelled["conclusion"] == "rejected: no eligible series"
    with pytest.raises(ValueError, match="reason"):
        build_report(STUDY, "cancelled")
    with pytest.raises(ValueError, match="status"):
        build_report(STUDY, "queued")  # type: ignore[arg-type]
    report, _ = build_results(STUDY, [NODULE], MODEL, tracking_uids=["2.25.9"])
    assert report["status"] == "preliminary"
    assert report["conclusion"].startswith("1 lung nodule detected (1 to review).")
    empty, none = build_results(STUDY, [], MODEL, tracking_uids=[])
    assert none == [] and empty["conclusion"].startswith("No lung nodules detected.")


def test_resources_validate_as_fhir_and_issued_is_opt_in() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    report, (obs,) = build_results(STUDY, [NODULE], MODEL, tracking_uids=["2.25.9"], issued=when)
    assert DiagnosticReport.model_validate(report).issued is not None
    assert Observation.model_validate(obs).issued is not None
    plain, (plain_obs,) = build_results(STUDY, [NODULE], MODEL, tracking_uids=["2.25.9"])
    assert "issued" not in plain and "issued" not in plain_obs


def test_unknown_nodule_type_and_uid_count_mismatch_are_rejected() -> None:
    with pytest.raises(ValueError, match="nodule type"):
        build_observation(STUDY, {**NODULE, "type": "calcified"}, "2.25.1", MODEL)
    with pytest.raises(ValueError, match="tracking UIDs"):
        build_results(STUDY, [NODULE], MODEL, tracking_uids=[])


def test_the_study_repr_hides_the_patient() -> None:
    assert "PAT-0001" not in repr(STUDY)


def test_the_report_identifier_is_pinned_so_a_namespace_change_fails() -> None:
    """Reports already sit on FHIR servers: a changed identifier would start a second report."""
    assert report_identifier("1.2.826.0.1.3680043.8.498.1") == {
        "use": "official",
        "system": "urn:noduleai:report",
        "value": "f5bb3e56-84eb-532b-a4e2-023d14471223",
    }


@pytest.mark.parametrize(
    ("date", "time", "offset", "expected"),
    [
        ("20001231", "235959.123456", "+0100", "2000-12-31T23:59:59+01:00"),
        ("20001231", "0730", "-0500", "2000-12-31T07:30:00-05:00"),
        ("20001231", "", "+0100", "2000-12-31"),
        ("20001231", "99", "", "2000-12-31"),
        ("", "120000", "", None),
        ("2000-12-31", "120000", "", None),
    ],
)
def test_the_study_date_and_time_become_a_fhir_datetime_with_its_zone(
    date: str, time: str, offset: str, expected: str | None
) -> None:
    assert study_datetime(date, time, offset) == expected


def test_without_an_offset_the_study_time_is_in_the_nodes_zone() -> None:
    value = study_datetime("20001231", "120000")
    assert value is not None
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == datetime(2000, 12, 31, 12).astimezone().utcoffset()
    assert parsed.replace(tzinfo=None) == datetime(2000, 12, 31, 12)


def test_report_and_observations_carry_the_study_date_and_the_issue_time() -> None:
    study = dataclasses.replace(STUDY, effective="2000-12-31T12:00:00+01:00")
    issued = datetime(2001, 1, 1, 9, 0, tzinfo=UTC)
    report, observations = build_results(
        study, [NODULE], MODEL, tracking_uids=["1.2.3"], issued=issued
    )
    for resource in (report, *observations):
        assert resource["effectiveDateTime"] == "2000-12-31T12:00:00+01:00"
        assert datetime.fromisoformat(resource["issued"]) == issued
    assert "effectiveDateTime" not in build_report(STUDY, "registered")


def test_the_ae_identifier_system_takes_precedence_over_the_issuer() -> None:
    configured = dataclasses.replace(STUDY, identifier_system="http://hospital.example/mrn")
    subject = build_report(configured, "registered")["subject"]
    assert subject["identifier"] == {"system": "http://hospital.example/mrn", "value": "PAT-0001"}
    from_issuer = build_report(STUDY, "registered")["subject"]["identifier"]
    assert from_issuer["system"] == "urn:oid:1.2.826.0.1.3680043.8.498.9"
