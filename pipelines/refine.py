"""Stage 2: the 3D network on an isotropic patch around each candidate.

It returns a nodule probability and a segmentation mask per patch (averaged with the mirrored
patch); the mask refines the centre and gives the size, overlapping findings are merged, and a
second pass centred on each finding's mask measures large nodules whole. Batched over candidates.
Training and evaluation (:mod:`models`) use the same functions, so the service runs exactly what
was measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from pipelines.backends import InferenceBackend
from pipelines.preprocess import ISO_SPACING_MM, STAGE2_PATCH, FloatArray, crop_patch
from pipelines.screen import Candidate

_ROUNDING = 1e-6
"""Slack for float32 rounding when a first score is compared with ``2 * floor - 1``."""

Score2 = Callable[[FloatArray], FloatArray]
"""Stage 2's probability alone on patches ``(N, 1, 32, 32, 32)`` -> ``(N, 1)``."""

Predict2 = Callable[[FloatArray], tuple[FloatArray, FloatArray]]
"""Stage 2 on patches ``(N, 1, 32, 32, 32)`` -> (probability ``(N, 1)``, mask, same shape as the
patches)."""


@dataclass
class Finding:
    """One detected nodule.

    Attributes
    ----------
    centre_xyz_mm : tuple of float
        LPS centre (mask centroid when the mask is usable, else the candidate).
    probability : float
        Stage-2 nodule probability.
    diameter_mm : float
        Longest in-plane diameter on the mask's largest axial slice (0 without a mask).
    equivalent_diameter_mm : float
        Diameter of the sphere with the mask's volume.
    volume_mm3 : float
        Mask volume.
    stage1_score : float
        Heatmap peak of the candidate.
    mask : numpy.ndarray
        Boolean ``32^3`` isotropic mask patch (``ISO_SPACING_MM`` voxels).
    mask_origin_xyz_mm : tuple of float
        LPS position of mask voxel ``[0, 0, 0]``.
    """

    centre_xyz_mm: tuple[float, float, float]
    probability: float
    diameter_mm: float
    equivalent_diameter_mm: float
    volume_mm3: float
    stage1_score: float
    mask: npt.NDArray[np.bool_] = field(repr=False)
    mask_origin_xyz_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _long_axis_mm(comp: npt.NDArray[np.bool_]) -> float:
    """Longest in-plane extent on the axial slice with most voxels (voxel edge added)."""
    z = int(np.argmax(comp.sum(axis=(1, 2))))
    pts = np.argwhere(comp[z]).astype(np.float64)
    if len(pts) > 400:
        hull = pts[np.isin(np.arange(len(pts)), _edge_points(comp[z]))]
        pts = hull if len(hull) else pts
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max() if len(pts) > 1 else 0.0
    return float(d + 1.0) * ISO_SPACING_MM


def _edge_points(sl: npt.NDArray[np.bool_]) -> npt.NDArray[np.intp]:
    edge = sl & ~ndimage.binary_erosion(sl)
    lin = np.flatnonzero(sl.ravel())
    return np.flatnonzero(np.isin(lin, np.flatnonzero(edge.ravel())))


def measure_mask(
    mask_prob: FloatArray,
) -> tuple[npt.NDArray[np.bool_], tuple[float, float, float] | None]:
    """Component of ``mask_prob >= 0.5`` at (or nearest to) the patch centre and its centroid.

    Returns the boolean component and its centroid in patch voxels, or an empty mask and None.
    """
    m = mask_prob >= 0.5
    lab, n = ndimage.label(m)
    if n == 0:
        return np.zeros_like(m), None
    c = STAGE2_PATCH // 2
    dist = ndimage.distance_transform_edt(lab == 0, return_distances=False, return_indices=True)
    near = dist[:, c, c, c]
    comp = lab == lab[near[0], near[1], near[2]]
    if comp.sum() < 2:
        return np.zeros_like(m), None
    cz, cy, cx = (float(v) for v in np.argwhere(comp).mean(0))
    return comp, (cz, cy, cx)


def make_finding(
    cand: Candidate,
    prob: float,
    mask_prob: FloatArray,
    origin_mm: tuple[float, float, float],
    max_offset: float = 0.6,
) -> Finding:
    """Turn a scored candidate and its mask into a :class:`Finding` (world coordinates).

    The mask is kept when its centroid lies within ``max_offset`` half-patches of the patch
    centre; otherwise the finding keeps the candidate's centre and has no mask.
    """
    comp, centroid = measure_mask(mask_prob)
    half = STAGE2_PATCH // 2
    lo = tuple(v - half for v in cand.voxel)
    mask_origin = (
        origin_mm[0] + lo[2] * ISO_SPACING_MM,
        origin_mm[1] + lo[1] * ISO_SPACING_MM,
        origin_mm[2] + lo[0] * ISO_SPACING_MM,
    )
    if centroid is not None and np.linalg.norm(np.array(centroid) - half) < half * max_offset:
        cz, cy, cx = centroid
    else:
        cz, cy, cx, comp = float(half), float(half), float(half), np.zeros_like(comp)
    vol = float(comp.sum()) * ISO_SPACING_MM**3
    return Finding(
        centre_xyz_mm=(
            mask_origin[0] + cx * ISO_SPACING_MM,
            mask_origin[1] + cy * ISO_SPACING_MM,
            mask_origin[2] + cz * ISO_SPACING_MM,
        ),
        probability=prob,
        diameter_mm=_long_axis_mm(comp) if comp.any() else 0.0,
        equivalent_diameter_mm=float((6.0 * vol / np.pi) ** (1 / 3)),
        volume_mm3=vol,
        stage1_score=cand.score,
        mask=comp,
        mask_origin_xyz_mm=mask_origin,
    )


def merge_findings(findings: list[Finding]) -> list[Finding]:
    """Greedy merge: a finding inside a more probable one's radius (at least 3 mm) is dropped."""
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: -f.probability):
        c = np.array(f.centre_xyz_mm)
        if any(
            np.linalg.norm(c - np.array(k.centre_xyz_mm))
            < max(3.0, 0.5 * max(k.diameter_mm, k.equivalent_diameter_mm))
            for k in kept
        ):
            continue
        kept.append(f)
    return kept


def refine_candidates(
    iso_norm: FloatArray,
    candidates: list[Candidate],
    predict: Predict2,
    origin_mm: tuple[float, float, float],
    batch: int = 16,
    max_offset: float = 0.6,
    floor: float = 0.0,
    score: Score2 | None = None,
) -> list[Finding]:
    """Run stage 2 (flip-averaged) on a patch around every candidate; return merged findings.

    ``max_offset`` is passed to :func:`make_finding` (training's threshold choice used 0.6;
    :func:`refine`, what the service and the evaluation run, uses 1.0 and then
    :func:`recentre_findings`).

    ``floor``: findings below this probability are not wanted (the service reports only those at
    its operating threshold). The probability is the mean of the patch's and its mirror image's
    (each at most 1), so a candidate whose first score is below ``2 * floor - 1`` cannot reach
    the floor: its mirror image is not scored and it yields no finding. Every finding at or above
    the floor is the same as with ``floor=0`` (merging drops a finding only for a more probable
    one). ``score``, stage 2's probability alone (:data:`~pipelines.manifest.STAGE2_SCORE_NAME`,
    the same numbers at a quarter of the work), makes that first score, so that the full network
    runs only on the candidates that can reach the floor.
    """
    if score is not None and floor > 0.0:
        first = [score(x)[:, 0] for x in _patch_batches(iso_norm, candidates, batch)]
        candidates = [
            c
            for c, p in zip(candidates, np.concatenate(first) if first else [], strict=True)
            if _can_reach(p, floor)
        ]
    prob, mask = predict_patches(iso_norm, candidates, predict, batch)
    hopeful = np.flatnonzero(_can_reach(prob[:, 0], floor))
    candidates = [candidates[i] for i in hopeful]
    mirror_prob, mirror_mask = predict_patches(iso_norm, candidates, predict, batch, mirrored=True)
    prob = ((prob[hopeful] + mirror_prob) / 2).astype(np.float32)
    mask = ((mask[hopeful] + mirror_mask[:, :, ::-1, ::-1, ::-1]) / 2).astype(np.float32)
    return merge_findings(
        [
            make_finding(c, float(p[0]), m[0], origin_mm, max_offset)
            for c, p, m in zip(candidates, prob, mask, strict=True)
        ]
    )


def _can_reach(first: npt.ArrayLike, floor: float) -> npt.NDArray[np.bool_]:
    """Whether a first (unmirrored) score can average to ``floor`` with a mirror score <= 1."""
    return np.asarray(first) >= 2.0 * floor - 1.0 - _ROUNDING


def _patch_batches(
    iso_norm: FloatArray, candidates: list[Candidate], batch: int, mirrored: bool = False
) -> Iterator[FloatArray]:
    """The patches around the candidates, ``batch`` at a time (``mirrored``: all three axes
    flipped)."""
    flip = slice(None, None, -1) if mirrored else slice(None)
    for i in range(0, len(candidates), batch):
        yield np.stack(
            [
                crop_patch(iso_norm, c.voxel, STAGE2_PATCH)[None, flip, flip, flip]
                for c in candidates[i : i + batch]
            ]
        )


def predict_patches(
    iso_norm: FloatArray,
    candidates: list[Candidate],
    predict: Predict2,
    batch: int = 16,
    mirrored: bool = False,
) -> tuple[FloatArray, FloatArray]:
    """Stage 2 on the patch around every candidate (``mirrored``: on its mirror image, all three
    axes flipped; the mask comes back in the mirrored frame), ``batch`` patches per call."""
    if not candidates:
        empty = np.zeros((0, 1), np.float32)
        return empty, np.zeros((0, 1, STAGE2_PATCH, STAGE2_PATCH, STAGE2_PATCH), np.float32)
    probs, masks = zip(
        *(predict(x) for x in _patch_batches(iso_norm, candidates, batch, mirrored)), strict=True
    )
    return np.concatenate(probs), np.concatenate(masks)


def recentre_findings(
    iso_norm: FloatArray,
    findings: list[Finding],
    predict: Predict2,
    origin_mm: tuple[float, float, float],
    min_probability: float = 0.05,
) -> list[Finding]:
    """Second stage-2 pass centred on each finding's mask centroid.

    A large nodule whose candidate sat off its centre gets a mask that is no longer cut by the
    patch border, so its centre and size improve. The probability stays the first pass's (the
    one the operating threshold was chosen with); findings are merged again afterwards.
    """
    todo = [f for f in findings if f.probability >= min_probability and f.mask.any()]
    if not todo:
        return findings
    cands = [
        Candidate(
            voxel=(
                round((f.centre_xyz_mm[2] - origin_mm[2]) / ISO_SPACING_MM),
                round((f.centre_xyz_mm[1] - origin_mm[1]) / ISO_SPACING_MM),
                round((f.centre_xyz_mm[0] - origin_mm[0]) / ISO_SPACING_MM),
            ),
            score=f.stage1_score,
        )
        for f in todo
    ]
    masks = predict_patches(iso_norm, cands, predict)[1]
    redone = [
        make_finding(c, f.probability, m[0], origin_mm)
        for c, f, m in zip(cands, todo, masks, strict=True)
    ]
    redone = [r if r.mask.any() else f for r, f in zip(redone, todo, strict=True)]
    done = {id(f) for f in todo}
    rest = [f for f in findings if id(f) not in done]
    return merge_findings(redone + rest)


def refine(
    iso_norm: FloatArray,
    candidates: list[Candidate],
    backend: InferenceBackend,
    origin_mm: tuple[float, float, float],
    batch: int = 16,
    floor: float = 0.0,
    score: InferenceBackend | None = None,
) -> list[Finding]:
    """Score and segment every candidate; overlapping findings are merged.

    The flip-averaged pass keeps any mask whose centroid lies inside the patch
    (``max_offset=1.0``), then :func:`recentre_findings` measures each finding again on a patch
    centred on its mask. Only findings at or above ``floor`` are returned (the service's
    operating threshold; 0, every finding, for the evaluation's FROC); they are the same as with
    ``floor=0``, and stage 2 skips what cannot reach it (:func:`refine_candidates`; ``score``,
    the stage-2 score network, when the weights have it).
    """

    def predict(x: FloatArray) -> tuple[FloatArray, FloatArray]:
        probability, mask = backend.run(x)[:2]
        return probability, mask

    findings = refine_candidates(
        iso_norm,
        candidates,
        predict,
        origin_mm,
        batch,
        max_offset=1.0,
        floor=floor,
        score=None if score is None else lambda x: score.run(x)[0],
    )
    wanted = [f for f in findings if f.probability >= floor]
    return recentre_findings(iso_norm, wanted, predict, origin_mm)
