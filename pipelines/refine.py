"""Stage 2: the 3D network on an isotropic patch around each candidate.

It returns a nodule probability and a segmentation mask per patch; the mask refines the centre
and gives the size. Batched over candidates. The tensor work is
:func:`models.infer.refine_candidates`, shared with the models' evaluation.
"""

from __future__ import annotations

from models.infer import Candidate, Finding, refine_candidates
from pipelines.backends import FloatArray, InferenceBackend


def refine(
    iso_norm: FloatArray,
    candidates: list[Candidate],
    backend: InferenceBackend,
    origin_mm: tuple[float, float, float],
    batch: int = 16,
) -> list[Finding]:
    """Score and segment every candidate; overlapping findings are merged."""

    def predict(x: FloatArray) -> tuple[FloatArray, FloatArray]:
        probability, mask = backend.run(x)[:2]
        return probability, mask

    return refine_candidates(iso_norm, candidates, predict, origin_mm, batch=batch)
