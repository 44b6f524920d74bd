"""Stage 1: the 2D screen over every slice of the lungs, and candidate extraction.

The network (2.5D input: each slice with its neighbours as channels) turns every slice into a
nodule-centre heatmap; local maxima inside the lungs become candidates after 3D non-maximum
suppression, strongest first and bounded in number. The tensor work is
:func:`models.infer.screen_volume` and :func:`models.infer.extract_candidates`, shared with the
models' own evaluation so that the service runs exactly what was measured.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from models.infer import Candidate, extract_candidates, lung_box, screen_volume
from models.preprocessing import near_lung
from pipelines.backends import FloatArray, InferenceBackend


def screen(
    iso_norm: FloatArray,
    lung: npt.NDArray[np.bool_],
    backend: InferenceBackend,
    threshold: float,
    max_candidates: int,
    batch: int = 16,
) -> list[Candidate]:
    """Screen every slice of the lungs' box, batched; return the candidates.

    Parameters
    ----------
    iso_norm : ndarray
        The isotropic volume, normalised as the model's manifest says.
    lung : ndarray of bool
        The lung mask on the same grid.
    backend : InferenceBackend
        The stage-1 network.
    threshold : float
        Heatmap level at or above which a local maximum is a candidate.
    max_candidates : int
        The most candidates passed on to stage 2.
    """
    heat = screen_volume(iso_norm, lung_box(lung), lambda x: backend.run(x)[0], batch=batch)
    return extract_candidates(heat, near_lung(lung), threshold, max_candidates=max_candidates)
