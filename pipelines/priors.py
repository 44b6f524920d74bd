"""The patient's prior CT: find it, fetch it, know its nodules, align it to the current study.

For a study whose calling AE has a priors policy (``ae_policies[].priors``,
:class:`dicom_node.config.PriorsPolicy`), :meth:`PriorLocator.locate` runs after detection:

1. **Find** (C-FIND, Study Root, STUDY level, :mod:`dicom_node.retrieve`) the patient's studies
   at the policy's source PACS by PatientID, with CT in ModalitiesInStudy and a StudyDate before
   the current one; the most recent at most ``max_age_days`` older is the prior.
2. **Fetch** it unless its instances are already here: C-MOVE to our own AE title (the PACS
   pushes it to the node's SCP) or C-GET. Its study row is made ``prior`` first
   (:attr:`dicom_node.db.StudyState.PRIOR`), so its instances never become a job of their own.
   Query and retrieval together are bounded by ``timeout_seconds``.
3. **Its nodules, reused before recomputed**: from this node's stored result of that study, else
   from our own SR stored with it (TID 1500 read back, :func:`pipelines.sr.read_findings`), else
   by running the detector on it.
4. **Align** it to the current study (rigid, :func:`pipelines.registration.register_rigid`).

Whatever stops this (no prior, a refusal, a timeout, an unusable series) makes the study a
**baseline** with the reason (:meth:`dicom_node.results.PriorComparison.baseline`); the current
result is never held back longer than the timeout plus the prior's own analysis. Matching and
growth are computed where the result is encoded (:func:`pipelines.outputs.encode_results`), on
the same measurements every output reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from pydicom import Dataset, dcmread
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.config import DimseDestination, NodeConfig, PriorsPolicy, RetrieveMethod
from dicom_node.db import (
    Database,
    Instance,
    Job,
    JobState,
    Result,
    ReturnedResult,
    Series,
    Study,
    StudyState,
)
from dicom_node.errors import StudyRejectedError
from dicom_node.ingest import Ingest
from dicom_node.results import COMPREHENSIVE_3D_SR, PriorComparison, ResultSet
from dicom_node.retrieve import QueryRetrieve, RetrieveError, StudyMatch
from dicom_node.spool import Spool
from pipelines.comparison import Measured
from pipelines.detect import Detector
from pipelines.registration import Registration, register_rigid
from pipelines.selection import select_series
from pipelines.sr import read_findings
from pipelines.uids import prior_identity
from pipelines.volume import Volume, build_volume

LOGGER = logging.getLogger(__name__)

#: Below this fraction of the current study's body lying inside the aligned prior, the two
#: scans do not show the same anatomy (or alignment failed): no comparison is made.
MIN_OVERLAP = 0.5


@dataclass(frozen=True)
class PriorFindings:
    """A prior study ready to compare with the current one.

    ``nodules`` are in the prior's patient coordinates; ``registration`` maps current to
    prior; ``evidence`` holds one reference per instance of the prior series (SOP class and
    instance, series and study UIDs), which the SR lists as pertinent other evidence.
    """

    study_instance_uid: str
    study_date: date
    interval_days: float
    nodules: tuple[Measured, ...]
    findings_from: str
    registration: Registration
    evidence: tuple[Dataset, ...] = field(repr=False, default=())

    @property
    def identity(self) -> str:
        """What the result UIDs derive from besides the current input
        (:func:`pipelines.uids.prior_identity`)."""
        uids = [str(ds.SOPInstanceUID) for ds in self.evidence]
        return prior_identity(self.study_instance_uid, uids, self.findings_from)


Located = PriorFindings | PriorComparison


def _study_date(value: object) -> date | None:
    try:
        return datetime.strptime(str(value), "%Y%m%d").date()
    except ValueError:
        return None


class PriorLocator:
    """Finds, fetches and prepares the prior of a study (module docstring).

    Parameters
    ----------
    db : Database
        Studies, instances, stored results.
    spool : Spool
        Where received (and C-GET retrieved) instances live.
    config : NodeConfig
        The AE policies (``priors``) and the source destinations.
    ae_title : str
        Our AE title (calling AE, C-MOVE destination).
    detector : callable
        The detector, for priors without stored findings.
    min_slices : int
        As for the current study's series selection.
    """

    def __init__(
        self,
        db: Database,
        spool: Spool,
        config: NodeConfig,
        ae_title: str,
        detector: Callable[[], Detector],
        min_slices: int,
    ) -> None:
        self.db = db
        self.spool = spool
        self.config = config
        self.ae_title = ae_title
        self.detector = detector
        self.min_slices = min_slices

    def locate(
        self, calling_ae: str, header: Dataset, volume: Volume, timings: dict[str, float]
    ) -> Located | None:
        """The prior of the study ``header`` belongs to, aligned to ``volume``; or why there is
        none (a baseline); ``None`` when ``calling_ae`` has no priors policy.

        ``timings`` receives ``prior_retrieve``, ``prior_findings`` and ``prior_register`` (ms).
        """
        found = self.config.priors_of(calling_ae)
        if found is None:
            return None
        policy, source = found
        patient_id = str(header.get("PatientID", "") or "").strip()
        current_date = _study_date(header.get("StudyDate", ""))
        if not patient_id:
            return PriorComparison.baseline("no_patient_id", "the study has no PatientID")
        if current_date is None:
            return PriorComparison.baseline("no_study_date", "the study has no valid StudyDate")
        start = time.perf_counter()
        try:
            match = self._fetch(policy, source, patient_id, current_date, header)
        except RetrieveError as exc:
            LOGGER.warning("prior not retrieved: %s", exc)
            return PriorComparison.baseline(exc.code.value, exc.detail)
        finally:
            timings["prior_retrieve"] = (time.perf_counter() - start) * 1000.0
        if match is None:
            days = policy.max_age_days
            return PriorComparison.baseline(
                "no_prior", f"no earlier CT of the patient within {days} days at {source.name}"
            )
        return self._prepare(match, current_date, volume, timings)

    # ------------------------------------------------------------------ find and fetch

    def _fetch(
        self,
        policy: PriorsPolicy,
        source: DimseDestination,
        patient_id: str,
        current_date: date,
        header: Dataset,
    ) -> StudyMatch | None:
        """Find the prior at ``source`` and make sure its instances are here."""
        deadline = time.monotonic() + policy.timeout_seconds
        qr = QueryRetrieve(source, self.ae_title, deadline)
        oldest = current_date - timedelta(days=policy.max_age_days)
        current_uid = str(header.get("StudyInstanceUID", ""))
        candidates = [
            m
            for m in qr.find_studies(patient_id, before=current_date)
            if m.study_instance_uid != current_uid
            and m.study_date is not None
            and m.study_date >= oldest
        ]
        if not candidates:
            return None
        match = max(candidates, key=lambda m: (m.study_date or date.min, m.study_instance_uid))
        if self._held_locally(match.study_instance_uid, source.ae_title) < max(match.instances, 1):
            if policy.retrieve is RetrieveMethod.GET:
                ingest = Ingest(self.db, self.spool)
                qr.get(match.study_instance_uid, lambda data: ingest.store(data, source.ae_title))
            else:
                qr.move(match.study_instance_uid)
        return match

    def _held_locally(self, study_uid: str, source_ae: str) -> int:
        """How many of the study's instances are here; a study new to this node is first made
        ``prior``, so that what the retrieval brings never becomes a job of its own."""
        with self.db.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is not None:
                return int(study.instances)
            session.add(
                Study(
                    study_instance_uid=study_uid,
                    calling_ae=source_ae,
                    state=StudyState.PRIOR,
                    instances=0,
                )
            )
            try:
                session.flush()
            except IntegrityError:  # another worker made it at the same moment
                session.rollback()
        return 0

    # ------------------------------------------------------------------ prepare

    def _prepare(
        self, match: StudyMatch, current_date: date, volume: Volume, timings: dict[str, float]
    ) -> Located:
        """Build the prior's volume, get its nodules, align it."""
        assert match.study_date is not None
        start = time.perf_counter()
        paths, evidence = self._instances(match.study_instance_uid)
        try:
            selected = select_series(paths, min_slices=self.min_slices)
            prior_volume = build_volume(selected.paths)
        except StudyRejectedError as exc:
            return PriorComparison.baseline(
                "prior_not_analysable", f"the prior has no usable CT series ({exc.code.value})"
            )
        nodules, findings_from = self._findings(match.study_instance_uid, prior_volume, paths)
        timings["prior_findings"] = (time.perf_counter() - start) * 1000.0
        start = time.perf_counter()
        registration = register_rigid(volume, prior_volume)
        timings["prior_register"] = (time.perf_counter() - start) * 1000.0
        if registration.overlap < MIN_OVERLAP:
            return PriorComparison.baseline(
                "registration_failed",
                f"the prior overlaps {registration.overlap:.0%} of this study after alignment",
            )
        used = set(prior_volume.sop_instance_uids)
        return PriorFindings(
            study_instance_uid=match.study_instance_uid,
            study_date=match.study_date,
            interval_days=float((current_date - match.study_date).days),
            nodules=tuple(nodules),
            findings_from=findings_from,
            registration=registration,
            evidence=tuple(ds for ds in evidence if str(ds.SOPInstanceUID) in used),
        )

    def _instances(self, study_uid: str) -> tuple[list[Path], list[Dataset]]:
        """The study's instance files here, and a reference dataset per instance."""
        with self.db.session() as session:
            rows = session.execute(
                select(
                    Instance.path,
                    Instance.sop_class_uid,
                    Instance.sop_instance_uid,
                    Series.series_instance_uid,
                )
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_uid)
            ).all()
        paths, evidence = [], []
        for path, sop_class, sop_uid, series_uid in rows:
            paths.append(self.spool.path(path))
            ref = Dataset()
            ref.SOPClassUID, ref.SOPInstanceUID = sop_class, sop_uid
            ref.SeriesInstanceUID, ref.StudyInstanceUID = series_uid, study_uid
            evidence.append(ref)
        return paths, evidence

    def _findings(
        self, study_uid: str, volume: Volume, paths: list[Path]
    ) -> tuple[list[Measured], str]:
        """The prior's nodules: stored result, else our SR in it, else the detector's."""
        with self.db.session() as session:
            stored = _stored_result(session, study_uid)
            report = _returned_report(session, study_uid)
        if stored is not None:
            return [
                Measured(n.center_mm, n.volume_mm3, n.long_axis_mm, n.short_axis_mm, n.type)
                for n in stored.nodules
            ], "result"
        if report is not None:
            sr = dcmread(self.spool.path(report))
            headers = {str(ds.SOPInstanceUID): ds for ds in _headers(paths)}
            return read_findings(sr, headers), "report"
        detection = self.detector().run(volume)
        return [Measured.of(n) for n in detection.nodules], "detector"


def _stored_result(session: Session, study_uid: str) -> ResultSet | None:
    """The latest result this node stored for the study, from a job that finished well."""
    row = session.scalar(
        select(Result)
        .join(Job, Job.id == Result.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(
            Study.study_instance_uid == study_uid,
            Job.state.in_([JobState.DONE, JobState.DELIVERING]),
        )
        .order_by(Result.id.desc())
        .limit(1)
    )
    return ResultSet.from_json(row.detail) if row is not None else None


def _returned_report(session: Session, study_uid: str) -> str | None:
    """The spool path of the latest of our SRs that came with the study, if any."""
    latest = (
        select(func.max(ReturnedResult.id))
        .where(
            ReturnedResult.study_instance_uid == study_uid,
            ReturnedResult.sop_class_uid == COMPREHENSIVE_3D_SR,
        )
        .scalar_subquery()
    )
    return session.scalar(select(ReturnedResult.path).where(ReturnedResult.id == latest))


def _headers(paths: list[Path]) -> list[Dataset]:
    return [dcmread(p, stop_before_pixels=True) for p in paths]
