"""Stage 2: the 3D network on an isotropic patch around each candidate.

It returns a nodule probability and a segmentation mask per patch (averaged with the mirrored
patch); the mask refines the centre and gives the size, and a second pass centred on each
finding's mask measures large nodules whole. Batched over candidates. The tensor work is
:func:`models.infer.refine_candidates` and :func:`models.infer.recentre_findings`, exactly as
:meth:`models.infer.NoduleDetector.detect` (what the model cards measured) runs them.
"""

from __future__ import annotations

from models.infer import Candidate, Finding, recentre_findings, refine_candidates
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

    findings = refine_candidates(iso_norm, candidates, predict, origin_mm, batch, max_offset=1.0)
    return recentre_findings(iso_norm, findings, predict, origin_mm)
