"""The two-stage detector on a built volume: preprocessing, stage 1, stage 2, post-processing.

Each step is timed (milliseconds); the backend that ran is reported with the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.infer import MAX_CANDIDATES, STAGE1_NAME, STAGE2_NAME, WEIGHTS_DIR, load_manifest
from models.preprocessing import lung_mask, normalise_hu
from pipelines.backends import InferenceBackend, load_backend
from pipelines.findings import Nodule, describe
from pipelines.refine import refine
from pipelines.resample import resample_to_iso
from pipelines.screen import screen
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
    review_band: float = 0.1
    max_candidates: int = MAX_CANDIDATES


@dataclass
class Detection:
    """What the detector found in one series."""

    series_instance_uid: str
    nodules: list[Nodule]
    candidates: int
    timings_ms: dict[str, float]
    backend: str
    model_versions: dict[str, str] = field(default_factory=dict)

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

    def to_json(self) -> dict[str, Any]:
        """``findings.json``: the series, the nodules, timings per stage, the backend."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "nodules": [n.to_json() for n in self.nodules],
            "candidates": self.candidates,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
            "backend": self.backend,
            "models": self.model_versions,
        }


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
            volume.hu, volume.spacing_mm, volume.origin_mm, volume.series_instance_uid
        )

    def detect(
        self,
        hu: npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]],
        spacing_mm: tuple[float, float, float],
        origin_mm: tuple[float, float, float],
        series_instance_uid: str = "",
    ) -> Detection:
        """Detect nodules in ``hu[z, y, x]``, spacing ``(dz, dy, dx)``, LPS origin ``(x, y, z)``."""
        timings: dict[str, float] = {}
        with _timed(timings, "preprocess"):
            iso_hu = resample_to_iso(hu, spacing_mm)
            lung = lung_mask(iso_hu)
            iso = normalise_hu(iso_hu)
        with _timed(timings, "stage1"):
            candidates = screen(
                iso, lung, self.stage1, self.candidate_threshold, self.config.max_candidates
            )
        with _timed(timings, "stage2"):
            findings = refine(iso, candidates, self.stage2, origin_mm)
        with _timed(timings, "postprocess"):
            nodules = [
                describe(f, iso_hu, origin_mm, self.threshold, self.config.review_band)
                for f in findings
                if f.probability >= self.threshold
            ]
            nodules.sort(key=lambda n: -n.probability)
        return Detection(
            series_instance_uid=series_instance_uid,
            nodules=nodules,
            candidates=len(candidates),
            timings_ms=timings,
            backend=self.backend,
            model_versions={
                m["name"]: str(m.get("version", "")) for m in (self.manifest1, self.manifest2)
            },
        )


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = (time.perf_counter() - start) * 1000.0
