"""Detection and segmentation metrics as LUNA16 defines them (numpy only).

A detection hits a reference nodule when its centre lies within the nodule's radius
(``diameter / 2``). Per scan, each reference nodule takes the highest probability among the
detections that hit it (further hits on it are neither true nor false positives); detections
that hit no nodule are false positives, except those hitting an "ignore" region (LUNA16's
irrelevant findings), which are dropped. The FROC curve is sensitivity against the mean number
of false positives per scan over all thresholds; the CPM is the mean sensitivity at 1/8, 1/4,
1/2, 1, 2, 4 and 8 false positives per scan, each read as the highest sensitivity reached with
at most that many false positives per scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from models.phantom import MASS_DIAMETERS_MM

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MASS_BIN_MM = (MASS_DIAMETERS_MM[0] + 0.01, MASS_DIAMETERS_MM[1] + 0.01)
"""The size bin of the masses of the phantoms with confounders."""
SIZE_BINS_MM = ((3.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, 30.01), MASS_BIN_MM)
"""Reference diameter bins (mm), named by their rounded ends (``"20-30 mm"``)."""


@dataclass(frozen=True)
class Reference:
    """A reference nodule (centre in mm, diameter in mm)."""

    centre_mm: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class EvalDetection:
    """A detection as the metrics see it (centre in mm, probability)."""

    centre_mm: tuple[float, float, float]
    probability: float


@dataclass
class ScanCase:
    """One scan: its references, detections and ignore regions (references not counted)."""

    references: list[Reference]
    detections: list[EvalDetection]
    ignore: list[Reference] = field(default_factory=list)


@dataclass
class FrocResult:
    """FROC curve, the seven sensitivities and the CPM."""

    thresholds: npt.NDArray[np.float64]
    sensitivity: npt.NDArray[np.float64]
    fps_per_scan: npt.NDArray[np.float64]
    sensitivities_at: dict[float, float]
    cpm: float
    n_nodules: int
    n_scans: int


def _hits(det: EvalDetection, refs: Sequence[Reference]) -> list[int]:
    c = np.asarray(det.centre_mm)
    return [
        i
        for i, r in enumerate(refs)
        if np.linalg.norm(c - np.asarray(r.centre_mm)) <= r.diameter_mm / 2.0
    ]


def match_scan(case: ScanCase) -> tuple[npt.NDArray[np.float64], list[float]]:
    """Best hit probability per reference (``-inf`` if missed) and false-positive probabilities."""
    best = np.full(len(case.references), -np.inf)
    fps: list[float] = []
    for det in case.detections:
        hit = _hits(det, case.references)
        if hit:
            for i in hit:
                best[i] = max(best[i], det.probability)
        elif not _hits(det, case.ignore):
            fps.append(det.probability)
    return best, fps


def froc(cases: Sequence[ScanCase]) -> FrocResult:
    """FROC and CPM over ``cases`` (see the module docstring for the rules).

    Parameters
    ----------
    cases : sequence of ScanCase
        Every scan of the evaluation set, including scans without nodules.

    Returns
    -------
    FrocResult
    """
    best_all: list[float] = []
    fp_all: list[float] = []
    for case in cases:
        best, fps = match_scan(case)
        best_all.extend(best.tolist())
        fp_all.extend(fps)
    best_arr = np.asarray(best_all)
    fp_arr = np.asarray(fp_all)
    n_nod, n_scans = len(best_arr), max(len(cases), 1)
    thr = np.unique(np.concatenate([best_arr[np.isfinite(best_arr)], fp_arr, [np.inf]]))[::-1]
    sens = np.array([(best_arr >= t).sum() / max(n_nod, 1) for t in thr])
    fpr = np.array([(fp_arr >= t).sum() / n_scans for t in thr])
    at = {}
    for rate in FP_RATES:
        ok = fpr <= rate
        at[rate] = float(sens[ok].max()) if ok.any() else 0.0
    return FrocResult(
        thresholds=thr,
        sensitivity=sens,
        fps_per_scan=fpr,
        sensitivities_at=at,
        cpm=float(np.mean(list(at.values()))),
        n_nodules=n_nod,
        n_scans=n_scans,
    )


def size_bin_name(lo: float, hi: float) -> str:
    """``"20-30 mm"`` for the bin ``(20.0, 30.01)``."""
    return f"{round(lo)}-{round(hi)} mm"


def sensitivity_by_size(
    cases: Sequence[ScanCase], threshold: float, bins: Sequence[tuple[float, float]] = SIZE_BINS_MM
) -> dict[str, tuple[float, int]]:
    """Sensitivity per reference diameter bin at ``threshold``: ``{"3-5 mm": (sens, n)}``."""
    out = {}
    for lo, hi in bins:
        found = total = 0
        for case in cases:
            best, _ = match_scan(case)
            for ref, b in zip(case.references, best, strict=True):
                if lo <= ref.diameter_mm < hi:
                    total += 1
                    found += int(b >= threshold)
        out[size_bin_name(lo, hi)] = (found / total if total else float("nan"), total)
    return out


def threshold_at_fp_rate(cases: Sequence[ScanCase], rate: float) -> float:
    """The lowest threshold with at most ``rate`` false positives per scan (the FROC point at
    ``rate``; ``inf`` when even the strongest false positive exceeds it)."""
    res = froc(cases)
    ok = res.fps_per_scan <= rate
    return float(res.thresholds[ok].min()) if ok.any() else float("inf")


def fps_per_scan(cases: Sequence[ScanCase], threshold: float) -> float:
    """Mean false positives per scan at ``threshold``."""
    return float(np.mean([sum(p >= threshold for p in match_scan(c)[1]) for c in cases]))


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    inter = float(np.logical_and(a, b).sum())
    total = float(a.sum()) + float(b.sum())
    return 1.0 if total == 0 else 2.0 * inter / total
