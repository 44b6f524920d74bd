"""Ingest: check a received dataset, spool it, record it. Independent of the network layer.

The order is the node's durability contract (DESIGN.md): free-space check, header check, the file
fsync'd and renamed into place, the row committed, and only then success is answered.

Our own result objects coming back (a PACS forwarding a study with its results, PS3.4 B.5 SOP
classes with our Manufacturer) are stored the same way but recorded apart
(:class:`~dicom_node.db.ReturnedResult`): they never reopen a study nor count as its input. An
instance received again under a known SOP Instance UID is a duplicate: stored once, reopening
nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.db import Database, Instance, ReturnedResult, Series, Study, StudyState, utcnow
from dicom_node.errors import (
    DatabaseUnavailableError,
    DatasetMismatchError,
    UndecodableDatasetError,
)
from dicom_node.lifecycle import reopen_study
from dicom_node.results import is_own_result
from dicom_node.spool import Spool, instance_path

LOGGER = logging.getLogger(__name__)

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: Attributes every composite IOD requires to be present (PS3.3 C.7.1.1 Patient, C.7.2.1 General
#: Study, C.7.3.1 General Series): Modality is Type 1, the others Type 2 (present, maybe empty).
_EXPECTED = (
    "Modality",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
)


@dataclass(frozen=True)
class InstanceHeader:
    """The identifiers of a received instance; no patient attributes."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    #: Keywords of attributes the IOD requires that the dataset lacks (stored with a warning).
    missing: tuple[str, ...] = ()
    #: Identifying UIDs that break PS3.5 9.1 only in form (stored with a warning), each as
    #: ``"<keyword>: <what>"``; never the value (source UIDs stay out of logs).
    nonconforming: tuple[str, ...] = ()
    #: Manufacturer (0008,0070), to recognise our own result objects.
    manufacturer: str | None = None


@dataclass(frozen=True)
class Stored:
    """What happened to one received instance."""

    header: InstanceHeader
    duplicate: bool
    reopened: bool
    #: One of our own result objects, sent back: stored, not study input.
    own_result: bool = False


def read_header(data: bytes) -> InstanceHeader:
    """Parse an encoded dataset (with file meta) and check that it is whole and identifiable.

    The pixel data is read as bytes, never decompressed.

    Attributes that the IOD requires but that do not identify the instance (Modality, the Type 2
    patient and study attributes) are reported in ``missing``: the instance is stored, and the SCP
    answers with a warning.

    Raises
    ------
    UndecodableDatasetError
        Not DICOM, or truncated: an element shorter than its declared length, or an image whose
        pixel data is missing (PS3.4 B.2.3 status C210).
    DatasetMismatchError
        A required identifier (SOP class/instance, study, series UID) is missing, or holds
        characters other than digits and dots, so it is not a UID (status A900). A UID of digits
        and dots that breaks PS3.5 9.1 only in form (too long, an empty component, a leading
        zero) is stored, with the problem in ``nonconforming`` (a warning status): archives hold
        such UIDs from older modalities, and refusing them would lose the instance.
    """
    try:
        ds = dcmread(BytesIO(data))
        _check_whole(ds)
        values = {kw: str(ds.get(kw, "") or "").strip(" \x00") for kw in _REQUIRED}
        modality = str(ds.get("Modality", "") or "").strip() or None
        manufacturer = str(ds.get("Manufacturer", "") or "").strip() or None
        absent = tuple(
            kw for kw in _EXPECTED if kw not in ds or (kw == "Modality" and not modality)
        )
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except UndecodableDatasetError:
        raise
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        KeyError,
        AttributeError,
        OSError,
        NotImplementedError,  # pydicom: "Unknown Value Representation"
        BytesLengthException,  # pydicom: a value's bytes do not fit its VR (a replaced VR)
    ) as exc:
        raise UndecodableDatasetError(f"cannot decode dataset: {exc}") from exc
    missing = [kw for kw, value in values.items() if not value]
    if missing:
        raise DatasetMismatchError(f"dataset lacks {', '.join(missing)}")
    not_uids = [kw for kw, value in values.items() if not _UID_CHARACTERS.fullmatch(value)]
    if not_uids:
        raise DatasetMismatchError(
            f"{', '.join(not_uids)} not a UID (PS3.5 9.1: digits and dots only)"
        )
    problems = ((kw, uid_form_problem(value)) for kw, value in values.items())
    return InstanceHeader(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
        modality=modality,
        missing=absent,
        manufacturer=manufacturer,
        nonconforming=tuple(f"{kw}: {problem}" for kw, problem in problems if problem),
    )


#: The characters a UID may hold (PS3.5 9.1); anything else cannot name an instance.
_UID_CHARACTERS = re.compile(r"[0-9.]+")


def uid_form_problem(uid: str) -> str | None:
    """What makes a UID of digits and dots break PS3.5 9.1, or ``None`` when it conforms.

    The rules: at most 64 characters; components separated by ".", none empty; no component
    with a leading zero (a component "0" is allowed).
    """
    if len(uid) > 64:
        return "longer than 64 characters"
    components = uid.split(".")
    if any(not c for c in components):
        return "an empty component"
    if any(len(c) > 1 and c.startswith("0") for c in components):
        return "a component with a leading zero"
    return None


def _check_whole(ds: Dataset) -> None:
    """Raise :class:`UndecodableDatasetError` when ``ds`` was cut short in transit or on disk."""
    for elem in ds._dict.values():
        if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH:
            got = len(elem.value) if elem.value is not None else 0
            if got != elem.length:
                raise UndecodableDatasetError(
                    f"dataset truncated: {elem.tag} declares {elem.length} bytes, has {got}"
                )
    if "Rows" in ds and not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise UndecodableDatasetError("dataset truncated: image attributes without pixel data")


class Ingest:
    """Receives encoded datasets from the SCP and makes them durable.

    Parameters
    ----------
    db : Database
        Where instances, series and studies are recorded.
    spool : Spool
        Where the files go.
    on_unrecorded : callable, optional
        ``on_unrecorded(study_instance_uid)`` when an instance of that study could not be
        recorded (the database failed): the study must not count as complete meanwhile
        (:meth:`dicom_node.completeness.CompletenessTracker.hold`).
    """

    def __init__(
        self, db: Database, spool: Spool, on_unrecorded: Callable[[str], None] | None = None
    ) -> None:
        self.db = db
        self.spool = spool
        self.on_unrecorded = on_unrecorded

    def store(self, data: bytes, calling_ae: str) -> Stored:
        """Make one received dataset durable, or raise the error that explains why not.

        Raises
        ------
        StorageFullError, DatabaseUnavailableError, UndecodableDatasetError, DatasetMismatchError
            Mapped to DIMSE statuses by :func:`dicom_node.status.status_for` (the first two:
            0xA700, try again later; no file is kept without its row).
        """
        self.spool.ensure_space(len(data))
        header = read_header(data)
        try:
            if is_own_result(header.manufacturer, header.sop_class_uid):
                return self._store_returned(header, data, calling_ae)
            return self._store_instance(header, data, calling_ae)
        except SQLAlchemyError as exc:
            if self.on_unrecorded is not None:
                self.on_unrecorded(header.study_instance_uid)
            raise DatabaseUnavailableError(
                f"instance not recorded (database unavailable: {type(exc).__name__})"
            ) from exc

    def _store_instance(self, header: InstanceHeader, data: bytes, calling_ae: str) -> Stored:
        """Spool the file, commit its row; without the row, the file is removed again."""
        if self._known(header.sop_instance_uid):
            return Stored(header, duplicate=True, reopened=False)
        relpath = instance_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        self.spool.write(relpath, data)
        try:
            return self._record(header, relpath, len(data), calling_ae)
        except SQLAlchemyError:
            self.spool.remove(relpath)
            raise

    def _record(self, header: InstanceHeader, relpath: str, size: int, calling_ae: str) -> Stored:
        for attempt in (1, 2):
            try:
                with self.db.session() as session:
                    reopened = record_instance(session, header, relpath, size, calling_ae)
                return Stored(header, duplicate=False, reopened=reopened)
            except IntegrityError:
                # Another association stored the same instance at the same moment (stored once),
                # or created the same new study or series first (try again: it exists now).
                if self._known(header.sop_instance_uid):
                    return Stored(header, duplicate=True, reopened=False)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _store_returned(self, header: InstanceHeader, data: bytes, calling_ae: str) -> Stored:
        """Keep one of our own result objects once, apart from the study's input."""
        with self.db.session() as session:
            known = session.scalar(
                select(ReturnedResult.id).where(
                    ReturnedResult.sop_instance_uid == header.sop_instance_uid
                )
            )
        if known is not None:
            return Stored(header, duplicate=True, reopened=False, own_result=True)
        relpath = "returned/" + instance_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        self.spool.write(relpath, data)
        try:
            with self.db.session() as session:
                session.add(
                    ReturnedResult(
                        sop_instance_uid=header.sop_instance_uid,
                        sop_class_uid=header.sop_class_uid,
                        study_instance_uid=header.study_instance_uid,
                        series_instance_uid=header.series_instance_uid,
                        path=relpath,
                        size=len(data),
                        calling_ae=calling_ae,
                    )
                )
        except IntegrityError:  # the same object from another association at the same moment
            return Stored(header, duplicate=True, reopened=False, own_result=True)
        except SQLAlchemyError:
            self.spool.remove(relpath)  # no file without its row
            raise
        return Stored(header, duplicate=False, reopened=False, own_result=True)

    def _known(self, sop_instance_uid: str) -> bool:
        with self.db.session() as session:
            found = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
        return found is not None


def record_instance(
    session: Session, header: InstanceHeader, relpath: str, size: int, calling_ae: str
) -> bool:
    """Insert the instance row and update its series and study; return whether it reopened one.

    A study that was already queued (or further) is reopened (:func:`reopen_study`): back to
    ``receiving``, so that completeness produces a new job that supersedes the old one.
    """
    now = utcnow()
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == header.study_instance_uid).with_for_update()
    )
    if study is None:
        study = Study(
            study_instance_uid=header.study_instance_uid,
            calling_ae=calling_ae,
            state=StudyState.RECEIVING,
            instances=0,
        )
        session.add(study)
        session.flush()
    reopened = reopen_study(study)
    study.instances += 1
    study.last_received_at = now
    study.calling_ae = calling_ae
    series = session.scalar(
        select(Series).where(Series.series_instance_uid == header.series_instance_uid)
    )
    if series is None:
        series = Series(
            study_id=study.id,
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            instances=0,
        )
        session.add(series)
        session.flush()
    series.instances += 1
    session.add(
        Instance(
            series_id=series.id,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            path=relpath,
            size=size,
            calling_ae=calling_ae,
            received_at=now,
        )
    )
    return reopened
