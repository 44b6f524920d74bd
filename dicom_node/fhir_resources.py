"""FHIR R4 resources for a study's findings: one DiagnosticReport, one Observation per nodule.

Resource building, no network I/O (:func:`report_subject` reads a few attributes of a spooled
header): the worker builds a job's results with :func:`build_results`
(stored with its result set, :mod:`dicom_node.results`), delivery builds the ``registered`` and
``cancelled`` status reports with :func:`build_report`, and :mod:`dicom_node.fhir_client` sends
them.

Resources are validated with the ``fhir.resources.R4B`` pydantic models (the package has no R4
module). R4B (4.3.0) left DiagnosticReport and Observation as they were in R4 (4.0.1): the
integration tests compare the R4B models with the R4 StructureDefinitions element by element
(top level, ``Observation.component``, every ``[x]`` choice type) and send every resource built
here to an R4 server that validates it against those definitions. Like that server, the models
check structure, not value sets: the ``status`` codes are checked here
(:data:`REPORT_STATUSES`, :data:`OBSERVATION_STATUSES`).

Identity (what makes retries and reruns idempotent):

- the DiagnosticReport is identified by ``urn:noduleai:report`` | a UUIDv5 of the
  StudyInstanceUID, so every run for a study updates the same report;
- each Observation is identified by ``urn:dicom:uid`` | ``urn:oid:<TrackingUID>`` of its nodule
  (the SR's ``(112040, DCM, "Tracking Unique Identifier")`` of the nodule, PS3.16 TID 1500;
  :meth:`pipelines.uids.ResultUIDs.tracking_uid` derives it once, for SR, SEG and FHIR alike);
- the ImagingStudy is referenced *logically* by ``urn:dicom:uid`` | ``urn:oid:<StudyInstanceUID>``
  (FHIR R4 ImagingStudy.identifier, "DICOM Study Instance UID"), the patient by identifier
  (system: the calling AE's ``patient_identifier_system``, else IssuerOfPatientID), made literal
  (``Patient/<id>``) by the client where the server holds exactly that patient; no Patient or
  ImagingStudy resource needs to exist on the server.
- ``effectiveDateTime`` of report and Observations is when the study was performed
  (:func:`study_datetime`); ``issued`` on the results is when their input was complete (the
  worker passes it), so a redelivered job writes the same resources.

The report's ``result`` references carry the Observations' identifiers; the client turns them
into literal ``Observation/<id>`` references once the server has assigned ids.

Codes (HL7 FHIR R4 DiagnosticReport, Observation; DICOM PS3.16 for the measurement concepts,
the same concepts the TID 1500 SR uses, so the two outputs say the same thing):

- report category ``v2-0074#RAD`` "Radiology"; report code LOINC ``24627-2`` "CT Chest" (PS3.16
  CID 7000 "CT Chest Report": the document is a chest CT report, more specific than ``18748-4``
  "Diagnostic imaging study");
- Observation category ``observation-category#imaging``; code by the finding's class
  (:data:`FINDING_CODES`): SNOMED CT ``27925004`` "Nodule", ``4147007`` "Mass", or
  ``DCM#112001`` "Opacity" for an opacity of diffuse disease;
  body site SNOMED CT ``39607008`` "Lung structure" qualified by the mCODE laterality extension
  (:data:`LATERALITY_EXTENSION`) with ``7771000`` "Left" or ``24028007`` "Right" from the sign of
  the LPS x coordinate (+x is patient left, PS3.3 C.7.6.2.1.1);
- components: ``SCT#103339001`` "Long axis" and ``SCT#103340004`` "Short axis" (UCUM ``mm``),
  ``SCT#118565006`` "Volume" (UCUM ``mm3``), ``DCM#112031`` "Attenuation Coefficient" as the
  mean over the nodule (UCUM ``[hnsf'U]``), attenuation type, detection probability (UCUM ``1``)
  and the needs-review flag, the nodule's Lung-RADS v2022 category (baseline or follow-up rules,
  :mod:`pipelines.lungrads`), and its malignancy risk as ``DCM#111047`` "Probability of cancer"
  (UCUM ``%``, the Brock model, :mod:`pipelines.brock`; what it assumed, or why it is missing,
  in ``note``). Attenuation type, detection probability, needs-review and Lung-RADS have no
  standard code we could verify (SNOMED CT's solid / part-solid / ground-glass *nodule*
  concepts were not checkable offline; ``DCM#111047`` means probability of *cancer*, not of
  detection), so they use the local code system :data:`COMPONENT_SYSTEM`, with ``DCM#112120``
  "Ground glass opacity" added to the ground-glass type as a second coding;
- against a prior CT (:mod:`pipelines.priors`): the change (``DCM#111424`` "Comparison to
  previous studies" valued with SNOMED CT ``129721008`` New finding, ``129723006`` No
  significant changes in the finding, ``15454001`` Increased size, ``19776001`` Decreased
  size), the volume change (UCUM ``%``) and the volume doubling time (UCUM ``d``), both local
  codes; the report's conclusion sums the comparison up and ``imagingStudy`` lists the prior.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final, Literal

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydicom import dcmread

from dicom_node.results import ModelIdentity, PriorComparison, PriorOutcome

JSON = dict[str, Any]
ReportStatus = Literal["registered", "preliminary", "final", "amended", "cancelled"]

SNOMED: Final = "http://snomed.info/sct"
LOINC: Final = "http://loinc.org"
DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
UCUM: Final = "http://unitsofmeasure.org"
V2_0074: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
#: FHIR's identifier system for DICOM UIDs, whose values are ``urn:oid:<uid>`` (FHIR R4 §2.24.0.1).
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
#: Identifier system of the reports this node writes.
REPORT_SYSTEM: Final = "urn:noduleai:report"
#: Local code system for the components no standard terminology covers.
COMPONENT_SYSTEM: Final = "urn:noduleai:fhir:nodule"

#: DiagnosticReport.status codes (FHIR R4 value set ``diagnostic-report-status``, required).
REPORT_STATUSES: Final = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
#: Observation.status codes (FHIR R4 value set ``observation-status``, required).
OBSERVATION_STATUSES: Final = frozenset(
    {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)

#: Namespace of the UUIDv5 values this module derives (report identifiers).
NAMESPACE: Final = uuid.UUID("5b0c7d0e-2f4a-5c55-9a51-6e6f64756c65")

REPORT_CODE: Final[JSON] = {
    "coding": [{"system": LOINC, "code": "24627-2", "display": "CT Chest"}],
    "text": "CT chest: lung nodule detection (AI)",
}
RADIOLOGY: Final[JSON] = {"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}
IMAGING: Final[JSON] = {
    "coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]
}
NODULE_CODE: Final[JSON] = {
    "coding": [{"system": SNOMED, "code": "27925004", "display": "Nodule"}],
    "text": "Lung nodule",
}
#: Observation.code per lesion class (``pipelines.lesions``), the SR's finding types.
FINDING_CODES: Final[dict[str, JSON]] = {
    "nodule": NODULE_CODE,
    "mass": {
        "coding": [{"system": SNOMED, "code": "4147007", "display": "Mass"}],
        "text": "Lung mass (over 30 mm)",
    },
    "diffuse": {
        "coding": [{"system": DCM, "code": "112001", "display": "Opacity"}],
        "text": "Opacity of diffuse lung disease (not a nodule)",
    },
}
LUNG: Final[JSON] = {"system": SNOMED, "code": "39607008", "display": "Lung structure"}
#: Laterality qualifier of a body site (HL7 mCODE STU2, laterality qualifier extension; R4 has no
#: laterality element, and a second coding would claim "left" is a synonym of "lung").
LATERALITY_EXTENSION: Final = (
    "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-laterality-qualifier"
)
LATERALITY: Final[dict[str, JSON]] = {
    "left": {"system": SNOMED, "code": "7771000", "display": "Left"},
    "right": {"system": SNOMED, "code": "24028007", "display": "Right"},
}

LONG_AXIS: Final[JSON] = {"system": SNOMED, "code": "103339001", "display": "Long axis"}
SHORT_AXIS: Final[JSON] = {"system": SNOMED, "code": "103340004", "display": "Short axis"}
VOLUME: Final[JSON] = {"system": SNOMED, "code": "118565006", "display": "Volume"}
MEAN_HU: Final[JSON] = {"system": DCM, "code": "112031", "display": "Attenuation Coefficient"}
NODULE_TYPE: Final[JSON] = {
    "system": COMPONENT_SYSTEM,
    "code": "attenuation-type",
    "display": "Nodule attenuation type",
}
PROBABILITY: Final[JSON] = {
    "system": COMPONENT_SYSTEM,
    "code": "detection-probability",
    "display": "Detection probability",
}
NEEDS_REVIEW: Final[JSON] = {
    "system": COMPONENT_SYSTEM,
    "code": "needs-review",
    "display": "Needs review (probability in the uncertainty band)",
}
#: DICOM's "Probability of cancer" (the Brock model's output), as in the SR.
CANCER_PROBABILITY: Final[JSON] = {
    "system": DCM,
    "code": "111047",
    "display": "Probability of cancer",
}
#: Against the prior CT: the change (DCM 111424 "Comparison to previous studies", valued with
#: SNOMED CT findings as the SR does), the volume change (%) and the volume doubling time (d).
CHANGE: Final[JSON] = {"system": DCM, "code": "111424", "display": "Comparison to previous studies"}
CHANGE_VALUES: Final[dict[str, JSON]] = {
    "new": {"system": SNOMED, "code": "129721008", "display": "New finding"},
    "stable": {
        "system": SNOMED,
        "code": "129723006",
        "display": "No significant changes in the finding",
    },
    "grown": {"system": SNOMED, "code": "15454001", "display": "Increased size"},
    "shrunk": {"system": SNOMED, "code": "19776001", "display": "Decreased size"},
}
VOLUME_CHANGE: Final[JSON] = {
    "system": COMPONENT_SYSTEM,
    "code": "volume-change",
    "display": "Volume change since the prior study",
}
DOUBLING_TIME: Final[JSON] = {
    "system": COMPONENT_SYSTEM,
    "code": "volume-doubling-time",
    "display": "Volume doubling time",
}
LUNG_RADS: Final[JSON] = {
    "system": COMPONENT_SYSTEM,
    "code": "lung-rads-v2022",
    "display": "Lung-RADS v2022 category",
}
#: Attenuation types (Fleischner Society glossary) as ``pipelines.findings`` names them.
NODULE_TYPES: Final[dict[str, JSON]] = {
    "solid": {
        "coding": [{"system": COMPONENT_SYSTEM, "code": "solid", "display": "Solid nodule"}],
        "text": "Solid",
    },
    "part-solid": {
        "coding": [
            {"system": COMPONENT_SYSTEM, "code": "part-solid", "display": "Part-solid nodule"}
        ],
        "text": "Part-solid",
    },
    "ground-glass": {
        "coding": [
            {"system": COMPONENT_SYSTEM, "code": "ground-glass", "display": "Ground-glass nodule"},
            {"system": DCM, "code": "112120", "display": "Ground glass opacity"},
        ],
        "text": "Ground-glass",
    },
}

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


@dataclass(frozen=True)
class ReportSubject:
    """What the resources say about the study and its patient.

    Parameters
    ----------
    study_instance_uid : str
        StudyInstanceUID (0020,000D).
    patient_id : str
        PatientID (0010,0020), read from the spooled header at job time; never logged.
    issuer_of_patient_id : str, optional
        IssuerOfPatientID (0010,0021); becomes the patient identifier's system
        (:func:`patient_identifier_system`) unless ``identifier_system`` is set.
    identifier_system : str, optional
        The patient identifier's system configured for the AE that sent the study
        (``ae_policies[].patient_identifier_system``); it takes precedence over the issuer.
    effective : str, optional
        When the study was performed, as a FHIR dateTime (:func:`study_datetime`).
    """

    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str | None = None
    identifier_system: str | None = None
    effective: str | None = None

    def __repr__(self) -> str:  # keep patient data out of logs and tracebacks
        return f"ReportSubject(study_instance_uid={self.study_instance_uid!r}, patient=<hidden>)"


#: The header attributes :func:`report_subject` reads (nothing else of the file).
SUBJECT_TAGS: Final = (
    "PatientID",
    "IssuerOfPatientID",
    "StudyDate",
    "StudyTime",
    "TimezoneOffsetFromUTC",
)


def report_subject(
    study_instance_uid: str, path: Path | None, identifier_system: str | None = None
) -> ReportSubject:
    """The report's subject: the study, its patient identifier and date, read from ``path``.

    ``path`` is one spooled instance of the study (only :data:`SUBJECT_TAGS` are read); without
    it the patient identifier is empty and the date unknown. ``identifier_system`` is the
    calling AE's configured patient identifier system, if any.
    """
    if path is None:
        return ReportSubject(study_instance_uid, "", identifier_system=identifier_system)
    ds = dcmread(path, stop_before_pixels=True, specific_tags=list(SUBJECT_TAGS))
    patient_id = str(ds.get("PatientID", "") or "")
    issuer = str(ds.get("IssuerOfPatientID", "") or "") or None
    effective = study_datetime(
        str(ds.get("StudyDate", "") or ""),
        str(ds.get("StudyTime", "") or ""),
        str(ds.get("TimezoneOffsetFromUTC", "") or ""),
    )
    return ReportSubject(study_instance_uid, patient_id, issuer, identifier_system, effective)


def study_datetime(date: str, time: str, offset: str = "") -> str | None:
    """StudyDate and StudyTime (DICOM DA, TM) as a FHIR R4 dateTime, or ``None`` without a date.

    A FHIR dateTime with a time needs a zone: TimezoneOffsetFromUTC (``+hhmm``) when the study
    has one, else the node's own zone, which is the one PS3.3 C.12.1.1.8 assumes for local times
    (the node runs in the hospital). Without a (valid) time the date alone is given.
    """
    try:
        day = datetime.strptime(date.strip(), "%Y%m%d")
    except ValueError:
        return None
    match = re.match(r"^(\d{2})(\d{2})?(\d{2})?", time.strip())
    if match is None:
        return day.date().isoformat()
    hour, minute, second = (int(g or 0) for g in match.groups())
    try:
        local = day.replace(hour=hour, minute=minute, second=second)
    except ValueError:
        return day.date().isoformat()
    zone = re.match(r"^([+-])(\d{2})(\d{2})$", offset.strip())
    if zone is not None:
        sign = 1 if zone.group(1) == "+" else -1
        delta = timedelta(hours=int(zone.group(2)), minutes=int(zone.group(3)))
        return local.replace(tzinfo=timezone(sign * delta)).isoformat()
    return local.astimezone().isoformat()


def dicom_uid_identifier(uid: str) -> JSON:
    """A DICOM UID as a FHIR Identifier: ``urn:dicom:uid`` | ``urn:oid:<uid>`` (FHIR R4 §2.24)."""
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def report_identifier(study_instance_uid: str) -> JSON:
    """The report's identifier: a UUIDv5 of the StudyInstanceUID, the same for every run."""
    value = str(uuid.uuid5(NAMESPACE, f"report:{study_instance_uid}"))
    return {"use": "official", "system": REPORT_SYSTEM, "value": value}


def patient_identifier_system(issuer_of_patient_id: str | None) -> str | None:
    """The Identifier.system for an IssuerOfPatientID (0010,0021).

    An OID becomes ``urn:oid:<oid>``, a URI is kept, other text becomes
    ``urn:noduleai:issuer:<text>`` (spaces as ``%20``); no issuer gives no system.
    """
    if not issuer_of_patient_id or not issuer_of_patient_id.strip():
        return None
    issuer = issuer_of_patient_id.strip()
    if _OID.match(issuer):
        return f"urn:oid:{issuer}"
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", issuer):
        return issuer
    return "urn:noduleai:issuer:" + issuer.replace("%", "%25").replace(" ", "%20")


def patient_reference(study: ReportSubject) -> JSON:
    """Logical reference to the patient by identifier (FHIR R4 Reference.identifier); the
    client makes it literal where the server holds that patient
    (:meth:`dicom_node.fhir_client.FhirClient.publish`)."""
    identifier: JSON = {"value": study.patient_id}
    system = study.identifier_system or patient_identifier_system(study.issuer_of_patient_id)
    if system is not None:
        identifier = {"system": system, **identifier}
    return {"type": "Patient", "identifier": identifier}


def imaging_study_reference(study_instance_uid: str) -> JSON:
    """Logical reference to the ImagingStudy by its ``urn:dicom:uid`` identifier."""
    return {
        "type": "ImagingStudy",
        "identifier": dicom_uid_identifier(study_instance_uid),
        "display": "CT study",
    }


def laterality(center_mm: Sequence[float]) -> Literal["left", "right"]:
    """Left or right lung from the LPS x coordinate (+x points to the patient's left)."""
    return "left" if float(center_mm[0]) > 0 else "right"


def build_observation(
    study: ReportSubject,
    nodule: Mapping[str, Any],
    tracking_uid: str,
    model: ModelIdentity,
    *,
    sr_uid: str | None = None,
    seg_uid: str | None = None,
    issued: datetime | None = None,
    status: str = "preliminary",
) -> JSON:
    """One nodule as an R4 Observation (validated, as a JSON dict).

    Parameters
    ----------
    study : ReportSubject
        The study and its patient.
    nodule : mapping
        As :meth:`dicom_node.results.ReportedNodule.to_json` gives it.
    tracking_uid : str
        The nodule's tracking UID (TID 1500); the Observation's identifier.
    model : ModelIdentity
        Shown as ``device`` (display only) and ``method``.
    sr_uid, seg_uid : str, optional
        SOP Instance UIDs of the SR and SEG that hold the nodule, referenced from ``derivedFrom``
        as DocumentReference by ``urn:dicom:uid`` identifier.
    issued : datetime, optional
        Observation.issued; left out by default so that reruns produce identical resources.
    status : str
        Observation.status (FHIR R4 ``observation-status``).

    Returns
    -------
    dict
        The Observation's JSON.
    """
    if status not in OBSERVATION_STATUSES:
        raise ValueError(f"not an Observation.status: {status!r}")
    kind = str(nodule["type"])
    if kind not in NODULE_TYPES:
        raise ValueError(f"unknown nodule type {kind!r}; expected one of {sorted(NODULE_TYPES)}")
    side = laterality(nodule["center_mm"])
    derived = [imaging_study_reference(study.study_instance_uid)]
    for uid, what in ((sr_uid, "DICOM SR (TID 1500)"), (seg_uid, "DICOM SEG")):
        if uid:
            derived.append(
                {
                    "type": "DocumentReference",
                    "identifier": dicom_uid_identifier(uid),
                    "display": what,
                }
            )
    components = [
        _quantity(LONG_AXIS, nodule["long_axis_mm"], "mm", "mm"),
        _quantity(SHORT_AXIS, nodule["short_axis_mm"], "mm", "mm"),
        _quantity(VOLUME, nodule["volume_mm3"], "mm3", "mm3"),
        _quantity(MEAN_HU, nodule["mean_hu"], "HU", "[hnsf'U]", text="Mean attenuation (HU)"),
        {"code": {"coding": [NODULE_TYPE]}, "valueCodeableConcept": NODULE_TYPES[kind]},
        _quantity(PROBABILITY, nodule["probability"], "probability", "1"),
        {"code": {"coding": [NEEDS_REVIEW]}, "valueBoolean": bool(nodule["needs_review"])},
        _lung_rads(nodule.get("lung_rads")),
        _risk(nodule.get("malignancy_risk")),
        *_change(nodule),
    ]
    x, y, z = (float(v) for v in nodule["center_mm"])
    resource: JSON = {
        "resourceType": "Observation",
        "identifier": [dicom_uid_identifier(tracking_uid)],
        "status": status,
        "category": [IMAGING],
        "code": FINDING_CODES[str(nodule.get("lesion_class", "nodule"))],
        "subject": patient_reference(study),
        "focus": [imaging_study_reference(study.study_instance_uid)],
        "bodySite": {
            "extension": [
                {
                    "url": LATERALITY_EXTENSION,
                    "valueCodeableConcept": {"coding": [LATERALITY[side]]},
                }
            ],
            "coding": [LUNG],
            "text": f"{side.capitalize()} lung",
        },
        "method": {"text": f"AI detection: {model.display}"},
        "device": {"display": model.display},
        "effectiveDateTime": study.effective,
        "derivedFrom": derived,
        "note": [
            {"text": f"Centre (DICOM patient LPS, mm): {x:.1f}, {y:.1f}, {z:.1f}"},
            *([{"text": str(nodule["risk_note"])}] if nodule.get("risk_note") else []),
        ],
        "component": [c for c in components if c is not None],
    }
    if issued is not None:
        resource["issued"] = issued.isoformat()
    return _validated(Observation, resource)


def build_report(
    study: ReportSubject,
    status: ReportStatus,
    *,
    observations: Sequence[Mapping[str, Any]] = (),
    model: ModelIdentity | None = None,
    conclusion: str | None = None,
    sr_uid: str | None = None,
    issued: datetime | None = None,
) -> JSON:
    """The study's DiagnosticReport (validated, as a JSON dict).

    Parameters
    ----------
    study : ReportSubject
        The study and its patient.
    status : {"registered", "preliminary", "final", "amended", "cancelled"}
        ``registered`` when the study is queued, ``preliminary`` with results, ``cancelled`` on
        rejection or failure (FHIR R4 DiagnosticReport.status).
    observations : sequence of dict
        The Observations (from :func:`build_observation`) the report's ``result`` lists, by
        identifier; :mod:`dicom_node.fhir_client` makes the references literal.
    model : ModelIdentity, optional
        Named in the default conclusion.
    conclusion : str, optional
        DiagnosticReport.conclusion; for ``cancelled`` the reason (required). For ``preliminary``
        a count of the nodules by default.
    sr_uid : str, optional
        SOP Instance UID of the SR; added as a second identifier (``urn:dicom:uid``).
    issued : datetime, optional
        DiagnosticReport.issued; left out by default so that reruns are identical.

    Returns
    -------
    dict
        The DiagnosticReport's JSON.
    """
    if status not in REPORT_STATUSES:
        raise ValueError(f"not a DiagnosticReport.status: {status!r}")
    if status == "cancelled" and not conclusion:
        raise ValueError("a cancelled report needs the reason in its conclusion")
    identifiers = [report_identifier(study.study_instance_uid)]
    if sr_uid:
        identifiers.append(dicom_uid_identifier(sr_uid))
    resource: JSON = {
        "resourceType": "DiagnosticReport",
        "identifier": identifiers,
        "status": status,
        "category": [RADIOLOGY],
        "code": REPORT_CODE,
        "subject": patient_reference(study),
        "effectiveDateTime": study.effective,
        "imagingStudy": [imaging_study_reference(study.study_instance_uid)],
    }
    if observations:
        resource["result"] = [
            {"type": "Observation", "identifier": obs["identifier"][0]} for obs in observations
        ]
    if conclusion is None and status in ("preliminary", "final"):
        conclusion = summary(observations, model)
    if conclusion:
        resource["conclusion"] = conclusion
    if issued is not None:
        resource["issued"] = issued.isoformat()
    return _validated(DiagnosticReport, resource)


def build_results(
    study: ReportSubject,
    nodules: Sequence[Mapping[str, Any]],
    model: ModelIdentity,
    *,
    tracking_uids: Sequence[str],
    sr_uid: str | None = None,
    seg_uid: str | None = None,
    issued: datetime | None = None,
    lung_rads: str | None = None,
    prior: PriorComparison | None = None,
    input_review: Sequence[str] = (),
) -> tuple[JSON, list[JSON]]:
    """The ``preliminary`` report with one Observation per nodule.

    ``input_review`` (why the series is outside what the detector was validated on) is stated
    in the conclusion.

    ``lung_rads``, the study's Lung-RADS v2022 category, is stated in the conclusion, and so is
    ``prior``, the comparison with the prior CT (or why there was none); a compared prior is
    also listed in ``imagingStudy``.

    Parameters
    ----------
    study : ReportSubject
        The study and its patient.
    nodules : sequence of mapping
        :meth:`~dicom_node.results.ReportedNodule.to_json` dicts, in the SR's order.
    model : ModelIdentity
        The model that found them.
    tracking_uids : sequence of str
        The nodules' tracking UIDs as the SR gives them (same order).
    sr_uid, seg_uid : str, optional
        SOP Instance UIDs of the SR and SEG.
    issued : datetime, optional
        Set on every resource when given.

    Returns
    -------
    tuple
        ``(report, observations)``.
    """
    if len(tracking_uids) != len(nodules):
        raise ValueError(f"{len(tracking_uids)} tracking UIDs for {len(nodules)} nodules")
    observations = [
        build_observation(study, nodule, uid, model, sr_uid=sr_uid, seg_uid=seg_uid, issued=issued)
        for nodule, uid in zip(nodules, tracking_uids, strict=True)
    ]
    conclusion = summary(observations, model)
    compared = prior is not None and prior.outcome is PriorOutcome.COMPARED
    if lung_rads:
        rules = "follow-up rules against the prior CT" if compared else "baseline screening rules"
        conclusion += f" Lung-RADS v2022 category {lung_rads} ({rules}; not for clinical use)."
    if prior is not None:
        conclusion += " " + prior_sentence(prior, nodules)
    if input_review:
        conclusion += (
            f" Input outside the validated range ({', '.join(input_review)}):"
            " every finding needs review."
        )
    report = build_report(
        study,
        "preliminary",
        observations=observations,
        model=model,
        conclusion=conclusion,
        sr_uid=sr_uid,
        issued=issued,
    )
    if compared and prior is not None:
        report["imagingStudy"].append(imaging_study_reference(prior.study_instance_uid))
    return report, observations


def prior_sentence(prior: PriorComparison, nodules: Sequence[Mapping[str, Any]]) -> str:
    """The comparison with the prior CT in one sentence (counts by change), or why none."""
    if prior.outcome is PriorOutcome.BASELINE:
        return f"No comparison with a prior CT ({prior.reason.replace('_', ' ')})."
    changes = [str(n.get("change", "")) for n in nodules]
    counts = [f"{changes.count(word)} {word}" for word in ("new", "grown", "stable", "shrunk")] + [
        f"{len(prior.resolved)} resolved"
    ]
    return (
        f"Compared with the prior CT of {prior.study_date} ({prior.interval_days:.0f} days): "
        + ", ".join(counts)
        + "."
    )


def _lung_rads(category: Any) -> JSON | None:
    """The Lung-RADS component; ``None`` for a nodule not assessed."""
    if not category:
        return None
    text = f"Lung-RADS v2022 category {category}"
    return {
        "code": {"coding": [LUNG_RADS]},
        "valueCodeableConcept": {
            "coding": [{"system": COMPONENT_SYSTEM, "code": f"lung-rads-{category}"}],
            "text": text,
        },
    }


def _change(nodule: Mapping[str, Any]) -> list[JSON | None]:
    """The components of the comparison with the prior CT (none when not compared)."""
    change = str(nodule.get("change") or "")
    if change not in CHANGE_VALUES:
        return []
    return [
        {
            "code": {"coding": [CHANGE]},
            "valueCodeableConcept": {"coding": [CHANGE_VALUES[change]], "text": change},
        },
        _quantity(VOLUME_CHANGE, nodule.get("volume_change_percent"), "%", "%"),
        _quantity(DOUBLING_TIME, nodule.get("doubling_time_days"), "days", "d"),
    ]


def _risk(probability: Any) -> JSON | None:
    """The Brock probability of cancer in percent; ``None`` when not assessed."""
    if probability is None:
        return None
    return _quantity(
        CANCER_PROBABILITY,
        round(100.0 * float(probability), 2),
        "%",
        "%",
        text="Malignancy risk (Brock model; not for clinical use)",
    )


def summary(observations: Sequence[Mapping[str, Any]], model: ModelIdentity | None = None) -> str:
    """A one-sentence conclusion: what was found by class, how many need review, by which model."""
    kinds = [obs["code"]["coding"][0]["code"] for obs in observations]
    review = sum(
        1
        for obs in observations
        for c in obs.get("component", [])
        if c["code"]["coding"][0] == NEEDS_REVIEW and c.get("valueBoolean")
    )
    counts = [
        (kinds.count(code["coding"][0]["code"]), word)
        for code, word in (
            (FINDING_CODES["nodule"], "lung nodule"),
            (FINDING_CODES["mass"], "lung mass"),
            (FINDING_CODES["diffuse"], "opacity of diffuse lung disease"),
        )
    ]
    found = [f"{n} {word}{'s' * (n != 1)}" for n, word in counts if n]
    text = "No lung nodules detected." if not found else ", ".join(found) + " detected"
    if found:
        text += f" ({review} to review)." if review else "."
    if model is not None:
        text += f" Preliminary AI result ({model.display}); not reviewed by a radiologist."
    return text


def _quantity(
    code: JSON, value: Any, unit: str, ucum: str, *, text: str | None = None
) -> JSON | None:
    """An Observation.component with a UCUM valueQuantity; ``None`` for a missing/NaN value."""
    if value is None or not math.isfinite(float(value)):
        return None
    concept: JSON = {"coding": [code]}
    if text:
        concept["text"] = text
    return {
        "code": concept,
        "valueQuantity": {"value": float(value), "unit": unit, "system": UCUM, "code": ucum},
    }


def _validated(model: type[DiagnosticReport] | type[Observation], resource: JSON) -> JSON:
    """Validate ``resource`` with the R4B model and return its JSON (``None``s dropped)."""
    validated: JSON = model.model_validate(resource).model_dump(mode="json", exclude_none=True)
    return validated
