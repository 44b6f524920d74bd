"""Reference two-stage nodule detection on a HU volume with the shipped ONNX weights.

onnxruntime + numpy + scipy only (no torch). Used by the evaluation and as the reference the
pipeline's stages reproduce::

    from models.infer import NoduleDetector
    det = NoduleDetector()                       # loads models/weights/*.onnx + manifests
    result = det.detect(volume_hu, spacing_mm, origin_mm)
    for f in result.findings_at():               # the manifest's operating point
        print(f.centre_xyz_mm, f.probability, f.diameter_mm)

Steps: resample to the isotropic grid, segment the lungs, stage 1 screens every slice inside the
lungs' bounding box (2.5D) into a centre heatmap; local maxima above the stage-1 threshold within
:data:`~models.preprocessing.LUNG_MARGIN_MM` of the lungs become candidates; stage 2 scores a
32^3 patch around each and segments it; the mask refines the centre and gives the size;
overlapping findings are merged.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.preprocessing import (
    ISO_SPACING_MM,
    STAGE1_CONTEXT,
    STAGE2_PATCH,
    FloatArray,
    crop_patch,
    lung_mask,
    near_lung,
    normalise_hu,
    resample_to_iso,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
STAGE1_NAME = "stage1_screen"
STAGE2_NAME = "stage2_refine"
MAX_CANDIDATES = 128
"""Most candidates per scan passed to stage 2 (highest stage-1 scores first)."""

Predict1 = Callable[[FloatArray], FloatArray]
Predict2 = Callable[[FloatArray], tuple[FloatArray, FloatArray]]


@dataclass
class Candidate:
    """A stage-1 candidate: isotropic voxel ``(z, y, x)`` and heatmap score."""

    voxel: tuple[int, int, int]
    score: float


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


@dataclass
class DetectionResult:
    """Everything one detection produced: candidates, scored findings and timings (s)."""

    candidates: list[Candidate]
    findings: list[Finding]
    threshold: float
    timings: dict[str, float]

    def findings_at(self, threshold: float | None = None) -> list[Finding]:
        """Findings with probability at or above ``threshold`` (default: the operating point)."""
        t = self.threshold if threshold is None else threshold
        return [f for f in self.findings if f.probability >= t]


# --------------------------------------------------------------------------- stage 1


def lung_box(lung: npt.NDArray[np.bool_], margin: int = 8) -> tuple[slice, slice, slice]:
    """Bounding box of the lungs plus ``margin`` voxels (the whole volume when empty)."""
    if not lung.any():
        return (slice(0, lung.shape[0]), slice(0, lung.shape[1]), slice(0, lung.shape[2]))
    idx = np.argwhere(lung)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, lung.shape)
    return (
        slice(int(lo[0]), int(hi[0])),
        slice(int(lo[1]), int(hi[1])),
        slice(int(lo[2]), int(hi[2])),
    )


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


def extract_candidates(
    heat: FloatArray,
    allowed: npt.NDArray[np.bool_],
    threshold: float,
    max_candidates: int = MAX_CANDIDATES,
    min_dist_vox: float = 4.0,
) -> list[Candidate]:
    """Local maxima of ``heat`` at or above ``threshold`` inside ``allowed``, strongest first.

    Peaks closer than ``min_dist_vox`` to a stronger kept peak are dropped.
    """
    peaks = (heat == ndimage.maximum_filter(heat, size=3)) & (heat >= threshold) & allowed
    idx = np.argwhere(peaks)
    scores = heat[peaks]
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


# --------------------------------------------------------------------------- stage 2


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


def predict_flip_averaged(predict: Predict2, x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Stage 2 on the patches and on their mirror image (all three axes), averaged."""
    p0, m0 = predict(x)
    p1, m1 = predict(np.ascontiguousarray(x[:, :, ::-1, ::-1, ::-1]))
    prob = ((p0 + p1) / 2).astype(np.float32)
    mask = ((m0 + m1[:, :, ::-1, ::-1, ::-1]) / 2).astype(np.float32)
    return prob, mask


def refine_candidates(
    iso_norm: FloatArray,
    candidates: list[Candidate],
    predict: Predict2,
    origin_mm: tuple[float, float, float],
    batch: int = 16,
    max_offset: float = 0.6,
) -> list[Finding]:
    """Run stage 2 (flip-averaged) on a patch around every candidate; return merged findings.

    ``max_offset`` is passed to :func:`make_finding` (training's threshold choice used 0.6;
    :meth:`NoduleDetector.detect` uses 1.0 and then :func:`recentre_findings`).
    """
    prob, mask = predict_patches(
        iso_norm, candidates, lambda x: predict_flip_averaged(predict, x), batch
    )
    return merge_findings(
        [
            make_finding(c, float(p[0]), m[0], origin_mm, max_offset)
            for c, p, m in zip(candidates, prob, mask, strict=True)
        ]
    )


def predict_patches(
    iso_norm: FloatArray, candidates: list[Candidate], predict: Predict2, batch: int = 16
) -> tuple[FloatArray, FloatArray]:
    """Stage 2 on the patch around every candidate, ``batch`` patches per call."""
    if not candidates:
        empty = np.zeros((0, 1), np.float32)
        return empty, np.zeros((0, 1, STAGE2_PATCH, STAGE2_PATCH, STAGE2_PATCH), np.float32)
    probs, masks = zip(
        *(
            predict(
                np.stack(
                    [
                        crop_patch(iso_norm, c.voxel, STAGE2_PATCH)[None]
                        for c in candidates[i : i + batch]
                    ]
                )
            )
            for i in range(0, len(candidates), batch)
        ),
        strict=True,
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


# --------------------------------------------------------------------------- onnx


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_manifest(name: str, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Read ``<weights_dir>/<name>.json`` and check the ONNX file's sha256 against it.

    Raises
    ------
    ValueError
        When the ONNX file's hash differs from the manifest's.
    """
    data: dict[str, Any] = json.loads((weights_dir / f"{name}.json").read_text())
    digest = sha256(weights_dir / data["file"])
    if digest != data["sha256"]:
        raise ValueError(f"{data['file']}: sha256 {digest} differs from the manifest")
    return data


def _session(path: Path, providers: list[str] | None, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
    )


class NoduleDetector:
    """The two ONNX stages plus the glue around them.

    Parameters
    ----------
    weights_dir : pathlib.Path, optional
        Folder with ``stage1_screen.onnx/.json`` and ``stage2_refine.onnx/.json``.
    providers : list of str, optional
        onnxruntime execution providers (default CPU).
    threads : int, optional
        onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        wd = Path(weights_dir) if weights_dir else WEIGHTS_DIR
        self.manifest1 = load_manifest(STAGE1_NAME, wd)
        self.manifest2 = load_manifest(STAGE2_NAME, wd)
        self.s1 = _session(wd / self.manifest1["file"], providers, threads)
        self.s2 = _session(wd / self.manifest2["file"], providers, threads)
        self.stage1_threshold = float(self.manifest1["candidate_threshold"])
        self.threshold = float(self.manifest2["operating_threshold"])

    def predict1(self, x: FloatArray) -> FloatArray:
        """Stage 1 on a batch ``(N, 2 * STAGE1_CONTEXT + 1, H, W)`` -> heatmap ``(N, 1, H, W)``."""
        out = self.s1.run(None, {"slices": x.astype(np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def predict2(self, x: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Stage 2 on patches ``(N, 1, 32, 32, 32)`` -> (probability ``(N, 1)``, mask)."""
        prob, mask = self.s2.run(None, {"patch": x.astype(np.float32)})
        return np.asarray(prob, np.float32), np.asarray(mask, np.float32)

    def detect(
        self,
        volume_hu: npt.NDArray[np.generic],
        spacing_mm: tuple[float, float, float],
        origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> DetectionResult:
        """Detect nodules in an axial HU volume.

        Parameters
        ----------
        volume_hu : numpy.ndarray
            ``[z, y, x]`` Hounsfield units, slices in increasing z.
        spacing_mm : tuple of float
            ``(dz, dy, dx)``.
        origin_mm : tuple of float
            LPS ``(x, y, z)`` of voxel ``[0, 0, 0]``.

        Returns
        -------
        DetectionResult
            All scored findings (for FROC) and the operating threshold.
        """
        t0 = time.perf_counter()
        iso_hu = resample_to_iso(volume_hu, spacing_mm)
        lung = lung_mask(iso_hu)
        iso = normalise_hu(iso_hu)
        t1 = time.perf_counter()
        heat = screen_volume(iso, lung_box(lung), self.predict1)
        cands = extract_candidates(heat, near_lung(lung), self.stage1_threshold)
        t2 = time.perf_counter()
        findings = refine_candidates(iso, cands, self.predict2, origin_mm, max_offset=1.0)
        findings = recentre_findings(iso, findings, self.predict2, origin_mm)
        t3 = time.perf_counter()
        return DetectionResult(
            candidates=cands,
            findings=findings,
            threshold=self.threshold,
            timings={"preprocess_s": t1 - t0, "stage1_s": t2 - t1, "stage2_s": t3 - t2},
        )


def detect_nodules(
    volume_hu: npt.NDArray[np.generic],
    spacing_mm: tuple[float, float, float],
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> list[Finding]:
    """Convenience: findings at the operating point with the shipped weights."""
    return NoduleDetector().detect(volume_hu, spacing_mm, origin_mm).findings_at()


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
