"""The two-stage detector on a built volume: preprocessing, stage 1, stage 2, post-processing.

This is the one orchestration of the detector: the service runs :meth:`Detector.run`, the models'
evaluation (:mod:`models.evaluate`) runs :meth:`Detector.run_stages` on the same steps to see
every scored finding. Each step is timed (milliseconds); the backend that ran is reported with
the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicom_node.errors import ConfigError
from pipelines.backends import InferenceBackend, load_backend
from pipelines.findings import Nodule, describe
from pipelines.inputcheck import input_review
from pipelines.manifest import (
    STAGE1_NAME,
    STAGE2_NAME,
    STAGE2_SCORE_NAME,
    WEIGHTS_DIR,
    load_manifest,
)
from pipelines.preprocess import (
    ISO_SPACING_MM,
    FloatArray,
    lung_mask,
    normalise_hu,
    resample_to_iso,
)
from pipelines.refine import Finding, refine
from pipelines.screen import MAX_CANDIDATES, Candidate, Heatmap, screen
from pipelines.volume import Volume

LOGGER = logging.getLogger(__name__)


MODEL_NAME = "NoduleAI lung nodule detector"


@dataclass(frozen=True)
class DetectorConfig:
    """How the detector runs; built from the service settings."""

    models_dir: Path = WEIGHTS_DIR
    backend: str = "auto"
    engine_cache: Path = Path("var/engines")
    fp16: bool = False
    threads: int | None = None
    operating_threshold: float | None = None
    review_band: float = 0.5
    max_candidates: int = MAX_CANDIDATES
    #: Keep stage 1's heatmap (over the lungs' box) with the detection, for the heatmap object.
    heatmap: bool = False


@dataclass
class Detection:
    """What the detector found in one series."""

    series_instance_uid: str
    nodules: list[Nodule]
    candidates: int
    timings_ms: dict[str, float]
    backend: str
    model_versions: dict[str, str] = field(default_factory=dict)
    heatmap: Heatmap | None = None
    #: Why the series is outside what the detector was validated on
    #: (:func:`pipelines.inputcheck.input_review`); when any, every nodule needs review.
    input_review: tuple[str, ...] = ()

    @property
    def model_name(self) -> str:
        """The algorithm's name in result objects."""
        return MODEL_NAME

    @property
    def model_version(self) -> str:
        """Both stages' versions, e.g. ``stage1_screen-1.0.0+stage2_refine-1.0.0``."""
        return "+".join(
            f"{name}-{version}" for name, version in sorted(self.model_versions.items())
        )


@dataclass
class StageResult:
    """What preprocessing and the two stages made of one volume, before post-processing.

    Attributes
    ----------
    candidates : list of Candidate
        Stage 1's candidates, strongest first.
    findings : list of Finding
        The findings stage 2 scored (merged and recentred) at or above the floor
        :meth:`Detector.run_stages` was asked for: all of them for FROC, those at the operating
        threshold for the service.
    threshold : float
        The detector's operating threshold.
    iso_hu : numpy.ndarray
        The volume resampled to the isotropic grid, in HU (what post-processing measures on).
    timings_ms : dict of str to float
        ``preprocess``, ``stage1`` and ``stage2`` in milliseconds.
    lung_z_mm : tuple of float, optional
        LPS z of the lung mask's lowest and highest slice (``None``: no lung found).
    heatmap : Heatmap, optional
        Stage 1's heatmap over the lungs' box, when the configuration keeps it.
    lung_median_hu : float, optional
        Median HU inside the lung mask (``None``: no lung found).
    """

    candidates: list[Candidate]
    findings: list[Finding]
    threshold: float
    iso_hu: FloatArray = field(repr=False)
    timings_ms: dict[str, float] = field(default_factory=dict)
    lung_z_mm: tuple[float, float] | None = None
    heatmap: Heatmap | None = field(default=None, repr=False)
    lung_median_hu: float | None = None

    def upper_zone(self, z_mm: float) -> bool | None:
        """Whether ``z_mm`` lies in the cranial half of the lungs (``None``: no lung mask)."""
        if self.lung_z_mm is None:
            return None
        low, high = self.lung_z_mm
        return bool(z_mm > (low + high) / 2.0)

    def findings_at(self, threshold: float | None = None) -> list[Finding]:
        """Findings with probability at or above ``threshold`` (default: the operating point)."""
        t = self.threshold if threshold is None else threshold
        return [f for f in self.findings if f.probability >= t]


class Detector:
    """Both stages loaded once, run on many volumes.

    Parameters
    ----------
    config : DetectorConfig
        Model folder, backend choice, operating point and review band.
    """

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.manifest1 = load_manifest(STAGE1_NAME, config.models_dir)
        self.manifest2 = load_manifest(STAGE2_NAME, config.models_dir)
        self.stage1: InferenceBackend = self._load(self.manifest1)
        self.stage2: InferenceBackend = self._load(self.manifest2)
        # Stage 2's score network, when the weights have it (older weight folders do not: stage 2
        # then scores every candidate with the full network, with the same findings).
        self.stage2_score: InferenceBackend | None = None
        if (config.models_dir / f"{STAGE2_SCORE_NAME}.json").exists():
            score = load_manifest(STAGE2_SCORE_NAME, config.models_dir)
            if score["derived_from"]["sha256"] != self.manifest2["sha256"]:
                raise ConfigError(
                    f"{score['file']} was not derived from {self.manifest2['file']} "
                    "(models.export.write_stage2_score makes it again)"
                )
            self.stage2_score = self._load(score)
        self.candidate_threshold = float(self.manifest1["candidate_threshold"])
        self.threshold = (
            config.operating_threshold
            if config.operating_threshold is not None
            else float(self.manifest2["operating_threshold"])
        )

    def _load(self, manifest: dict[str, Any]) -> InferenceBackend:
        c = self.config
        return load_backend(
            c.models_dir / manifest["file"], c.backend, c.engine_cache, c.fp16, c.threads
        )

    @property
    def backend(self) -> str:
        """The backends in use, e.g. ``onnxruntime-cpu``."""
        names = {self.stage1.name, self.stage2.name}
        return "+".join(sorted(names))

    def run(self, volume: Volume) -> Detection:
        """Detect nodules in a built series volume; timings in ms per step."""
        return self.detect(
            volume.hu,
            volume.spacing_mm,
            volume.origin_mm,
            volume.series_instance_uid,
            volume.slice_thickness,
            volume.corrections,
        )

    def run_stages(
        self,
        hu: npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]],
        spacing_mm: tuple[float, float, float],
        origin_mm: tuple[float, float, float],
        floor: float = 0.0,
    ) -> StageResult:
        """Preprocess ``hu`` and run both stages; every scored finding at or above ``floor``
        (default: all, as the evaluation's FROC needs; the service asks for its operating
        threshold, and stage 2 then skips what cannot reach it).

        Parameters
        ----------
        hu : numpy.ndarray
            ``[z, y, x]`` Hounsfield units, slices in increasing z.
        spacing_mm : tuple of float
            ``(dz, dy, dx)``.
        origin_mm : tuple of float
            LPS ``(x, y, z)`` of voxel ``[0, 0, 0]``.
        floor : float
            The lowest probability of a finding wanted.

        Returns
        -------
        StageResult
            Candidates, the scored findings at or above ``floor`` and timings.
        """
        timings: dict[str, float] = {}
        with _timed(timings, "preprocess"):
            iso_hu = resample_to_iso(hu, spacing_mm)
            lung = lung_mask(iso_hu)
            iso = normalise_hu(iso_hu)
        with _timed(timings, "stage1"):
            screening = screen(
                iso, lung, self.stage1, self.candidate_threshold, self.config.max_candidates
            )
        candidates = screening.candidates
        heatmap = None
        if self.config.heatmap:
            z, y, x = (s.start for s in screening.box)
            heatmap = Heatmap(
                np.ascontiguousarray(screening.heat[screening.box]),
                (
                    origin_mm[0] + x * ISO_SPACING_MM,
                    origin_mm[1] + y * ISO_SPACING_MM,
                    origin_mm[2] + z * ISO_SPACING_MM,
                ),
            )
        del screening
        with _timed(timings, "stage2"):
            findings = refine(
                iso, candidates, self.stage2, origin_mm, floor=floor, score=self.stage2_score
            )
        median_hu = float(np.median(iso_hu[lung])) if lung.any() else None
        slices = np.flatnonzero(lung.any(axis=(1, 2)))
        lung_z = (
            (origin_mm[2] + slices[0] * ISO_SPACING_MM, origin_mm[2] + slices[-1] * ISO_SPACING_MM)
            if slices.size
            else None
        )
        return StageResult(
            candidates, findings, self.threshold, iso_hu, timings, lung_z, heatmap, median_hu
        )

    def detect(
        self,
        hu: npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]],
        spacing_mm: tuple[float, float, float],
        origin_mm: tuple[float, float, float],
        series_instance_uid: str = "",
        slice_thickness_mm: float | None = None,
        corrections: Sequence[str] = (),
    ) -> Detection:
        """Detect nodules in ``hu[z, y, x]``, spacing ``(dz, dy, dx)``, LPS origin ``(x, y, z)``;
        ``slice_thickness_mm`` and ``corrections`` (the Volume's) say whether the input is one
        the detector was validated on (:mod:`pipelines.inputcheck`)."""
        stages = self.run_stages(hu, spacing_mm, origin_mm, floor=self.threshold)
        review = input_review(spacing_mm, slice_thickness_mm, stages.lung_median_hu, corrections)
        timings = dict(stages.timings_ms)
        with _timed(timings, "postprocess"):
            nodules = [
                describe(f, stages.iso_hu, origin_mm, self.threshold, self.config.review_band)
                for f in stages.findings_at()
            ]
            for nodule in nodules:
                nodule.upper_zone = stages.upper_zone(nodule.center_mm[2])
                nodule.needs_review = nodule.needs_review or bool(review)
            nodules.sort(key=lambda n: -n.probability)
        return Detection(
            series_instance_uid=series_instance_uid,
            nodules=nodules,
            candidates=len(stages.candidates),
            timings_ms=timings,
            backend=self.backend,
            model_versions={
                m["name"]: str(m.get("version", "")) for m in (self.manifest1, self.manifest2)
            },
            heatmap=stages.heatmap,
            input_review=review,
        )


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = (time.perf_counter() - start) * 1000.0
