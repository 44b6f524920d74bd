"""Patient attributes for the study page, read from the spool only when a setting allows it.

The database stores no patient attributes; with ``NODULEAI_SHOW_PATIENT_DATA=true`` the study
page reads the name, ID and birth date from the header of one of the study's spooled files.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.dashboard.models import PatientOut
from dicom_node.db import Instance, Series, Study

_TAGS = ("PatientName", "PatientID", "PatientBirthDate")


def read_patient(session: Session, study: Study, spool_dir: Path) -> PatientOut | None:
    """Patient attributes of ``study`` from its first spooled instance (``None`` if unreadable)."""
    path = session.scalar(
        select(Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study.id)
        .limit(1)
    )
    if path is None:
        return None
    try:
        ds = pydicom.dcmread(spool_dir / path, stop_before_pixels=True, specific_tags=list(_TAGS))
    except (OSError, InvalidDicomError):
        return None
    values = {tag: (str(ds.get(tag)) if ds.get(tag) is not None else None) for tag in _TAGS}
    return PatientOut(**values)
