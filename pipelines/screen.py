"""Stage 1: the 2D screen over every slice of the lungs, and candidate extraction.

The network (2.5D input: each slice with its neighbours as channels) turns every slice inside the
lungs' bounding box into a nodule-centre heatmap; local maxima at or above the stage-1 threshold
within :data:`~pipelines.preprocess.LUNG_MARGIN_MM` of the lungs become candidates after 3D
non-maximum suppression, strongest first and at most :data:`MAX_CANDIDATES`. Training and
evaluation (:mod:`models`) use the same functions, so the service runs exactly what was measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from pipelines.backends import InferenceBackend
from pipelines.preprocess import (
    ISO_SPACING_MM,
    STAGE1_CONTEXT,
    FloatArray,
    grown_box,
    near_lung_at,
)

MAX_CANDIDATES = 128
"""Most candidates per scan passed to stage 2 (highest stage-1 scores first)."""

Predict1 = Callable[[FloatArray], FloatArray]
"""Stage 1 on a batch ``(N, 2 * STAGE1_CONTEXT + 1, H, W)`` -> heatmap ``(N, 1, H, W)``."""


@dataclass
class Candidate:
    """A stage-1 candidate: isotropic voxel ``(z, y, x)`` and heatmap score."""

    voxel: tuple[int, int, int]
    score: float


def candidate_world(
    c: Candidate, origin_mm: tuple[float, float, float]
) -> tuple[float, float, float]:
    """LPS position of a candidate voxel on the isotropic grid."""
    z, y, x = c.voxel
    return (
        origin_mm[0] + x * ISO_SPACING_MM,
        origin_mm[1] + y * ISO_SPACING_MM,
        origin_mm[2] + z * ISO_SPACING_MM,
    )


def lung_box(lung: npt.NDArray[np.bool_], margin: int = 8) -> tuple[slice, slice, slice]:
    """Bounding box of the lungs plus ``margin`` voxels (the whole volume when empty)."""
    box = grown_box(lung, margin)
    if box is None:
        return (slice(0, lung.shape[0]), slice(0, lung.shape[1]), slice(0, lung.shape[2]))
    return box[0], box[1], box[2]


def stage1_input(iso_norm: FloatArray, z: int) -> FloatArray:
    """The 2.5D input of slice ``z``: slices ``z-2 .. z+2`` as channels (edges repeated)."""
    idx = np.clip(np.arange(z - STAGE1_CONTEXT, z + STAGE1_CONTEXT + 1), 0, iso_norm.shape[0] - 1)
    return np.ascontiguousarray(iso_norm[idx], dtype=np.float32)


def screen_volume(
    iso_norm: FloatArray, box: tuple[slice, slice, slice], predict: Predict1, batch: int = 8
) -> FloatArray:
    """Run stage 1 on every slice of ``box``; return the heatmap on the full isotropic grid.

    The in-plane box is padded (with 0, i.e. air) to a multiple of 8 for the network's strides.
    """
    heat = np.zeros(iso_norm.shape, np.float32)
    ys, xs = box[1], box[2]
    h, w = ys.stop - ys.start, xs.stop - xs.start
    ph, pw = -h % 8, -w % 8
    zs = list(range(box[0].start, box[0].stop))
    for i in range(0, len(zs), batch):
        chunk = zs[i : i + batch]
        x = np.stack([stage1_input(iso_norm, z)[:, ys, xs] for z in chunk])
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)))
        out = predict(x)
        heat[chunk[0] : chunk[-1] + 1, ys, xs] = out[:, 0, :h, :w]
    return heat


Allowed = Callable[[npt.NDArray[np.intp]], npt.NDArray[np.bool_]]
"""Which of the voxels (rows of ``z, y, x`` indices) may hold a candidate."""


def inside(mask: npt.NDArray[np.bool_]) -> Allowed:
    """The voxels set in ``mask`` (a precomputed region, as training keeps it)."""
    return lambda idx: mask[tuple(idx.T)]


def extract_candidates(
    heat: FloatArray,
    allowed: Allowed,
    threshold: float,
    max_candidates: int = MAX_CANDIDATES,
    min_dist_vox: float = 4.0,
) -> list[Candidate]:
    """Local maxima of ``heat`` at or above ``threshold`` that are ``allowed``, strongest first.

    Peaks closer than ``min_dist_vox`` to a stronger kept peak are dropped.
    """
    idx = np.argwhere((heat == ndimage.maximum_filter(heat, size=3)) & (heat >= threshold))
    idx = idx[allowed(idx)]
    scores = heat[tuple(idx.T)]
    order = np.argsort(-scores, kind="stable")
    kept: list[Candidate] = []
    kept_vox = np.empty((max_candidates, 3))
    for i in order:
        v = idx[i]
        if ((kept_vox[: len(kept)] - v) ** 2).sum(axis=1).min(initial=np.inf) < min_dist_vox**2:
            continue
        kept_vox[len(kept)] = v
        kept.append(Candidate(voxel=(int(v[0]), int(v[1]), int(v[2])), score=float(scores[i])))
        if len(kept) >= max_candidates:
            break
    return kept


@dataclass(frozen=True)
class Heatmap:
    """Stage 1's score over the lungs' box, on the isotropic grid.

    Attributes
    ----------
    values : numpy.ndarray
        float32 ``[z, y, x]`` scores in ``[0, 1]``.
    origin_mm : tuple of float
        LPS ``(x, y, z)`` of ``values[0, 0, 0]``.
    spacing_mm : float
        Grid spacing (isotropic).
    """

    values: FloatArray
    origin_mm: tuple[float, float, float]
    spacing_mm: float = ISO_SPACING_MM


@dataclass
class Screening:
    """What stage 1 made of one volume: the candidates, and the heatmap over the lungs' box.

    ``heat`` covers the whole isotropic grid (0 outside ``box``).
    """

    candidates: list[Candidate]
    heat: FloatArray
    box: tuple[slice, slice, slice]


def screen(
    iso_norm: FloatArray,
    lung: npt.NDArray[np.bool_],
    backend: InferenceBackend,
    threshold: float,
    max_candidates: int,
    batch: int = 16,
) -> Screening:
    """Screen every slice of the lungs' box, batched; return the candidates and the heatmap.

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
    batch : int
        Slices per network call.
    """
    box = lung_box(lung)
    heat = screen_volume(iso_norm, box, lambda x: backend.run(x)[0], batch=batch)
    # Peaks are looked for in the box only: the heatmap is 0 outside it, and nothing outside it
    # is near the lungs (its margin is the near-lung margin); the scores are >= 0, so the box's
    # edge (mirrored by the maximum filter) keeps or drops the same peaks as the zeros beyond it.
    lung_in_box = lung[box]
    found = extract_candidates(
        heat[box],
        lambda idx: near_lung_at(lung_in_box, idx),
        threshold,
        max_candidates=max_candidates,
    )
    z0, y0, x0 = (s.start for s in box)
    candidates = [
        Candidate(voxel=(c.voxel[0] + z0, c.voxel[1] + y0, c.voxel[2] + x0), score=c.score)
        for c in found
    ]
    return Screening(candidates, heat, box)
