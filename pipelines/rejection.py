"""The IHE IOCM rejection note: a Key Object Selection that retracts replaced results.

When a rerun (late instances, a new model, an operator's rerun) replaces a study's results, the
earlier SEG, SR and GSPS are still in the PACS. IHE Radiology TF-1 Imaging Object Change
Management (IOCM) retracts them with a *rejection note*: a Key Object Selection Document
(PS3.3 A.35.4) whose document title is DCM 113001 "Rejected for Quality Reasons" (CID 7011) and
whose TID 2010 content lists every rejected instance (PS3.16 TID 2010; IHE RAD TF-3 4.66). An
Image Manager that implements IOCM hides or deletes the listed instances; one that does not keeps
the note beside them, where a reader of the study can still find it.

The note is one more result object of the new result set: its UIDs derive from the SR it
accompanies and the set it rejects (:meth:`pipelines.uids.ResultUIDs.rejection_uids`), so a
redelivered job writes it byte-identical. Delivery stores it only after the new objects were
confirmed, so a study never shows no results at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.results import MANUFACTURER, ResultObject
from pipelines.sr import device_observer
from pipelines.uids import ResultUIDs

REJECTION_SERIES_NUMBER = 9709
#: Document title of the IOCM rejection note (CID 7011 Rejected Objects Titles).
REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons
#: Patient and study attributes the note inherits from the study it belongs to (highdicom
#: reads those of the first line from its evidence: empty when the study lacks them).
_REQUIRED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_OPTIONAL = ("SpecificCharacterSet", "IssuerOfPatientID", "ReferringPhysicianName")


def _reference(obj: ResultObject, study: Dataset) -> Dataset:
    """What highdicom needs of one rejected instance: its UIDs and the study it is in."""
    ds = Dataset()
    for keyword in _REQUIRED:
        setattr(ds, keyword, study.get(keyword))
    for keyword in _OPTIONAL:
        if keyword in study:
            setattr(ds, keyword, study.get(keyword))
    ds.StudyInstanceUID = obj.study_instance_uid
    ds.SeriesInstanceUID = obj.series_instance_uid
    ds.SOPClassUID = obj.sop_class_uid
    ds.SOPInstanceUID = obj.sop_instance_uid
    return ds


def encode_rejection_note(
    rejected: Sequence[ResultObject],
    study: Dataset,
    uids: ResultUIDs,
    model_name: str,
    model_version: str,
    instance_number: int,
) -> Dataset:
    """Build the rejection note of ``rejected``.

    Parameters
    ----------
    rejected : sequence of ResultObject
        The earlier result objects of the study that the new result replaces (at least one).
    study : pydicom.Dataset
        A header of the study (a source instance): patient and study attributes.
    uids : ResultUIDs
        The new result's UIDs; the note's derive from its SR and ``rejected``.
    model_name, model_version : str
        The observer device.
    instance_number : int
        The new result's revision.

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.ko.KeyObjectSelectionDocument`` (Modality KO).
    """
    if not rejected:
        raise ValueError("a rejection note lists at least one instance")
    evidence = [_reference(obj, study) for obj in rejected]
    series_uid, sop_uid = uids.rejection_uids(obj.sop_instance_uid for obj in rejected)
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=evidence,
        observer_device_context=device_observer(model_name, model_version),
        description=f"NoduleAI results replaced by revision {instance_number}",
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_uid,
        series_number=REJECTION_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
    )
    note.SeriesDescription = "NoduleAI replaced results (IOCM rejection note)"
    note.ManufacturerModelName = model_name
    note.SoftwareVersions = model_version
    return note
