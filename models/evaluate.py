"""Evaluate the shipped ONNX models and write the model cards' measured figures.

::

    python -m models.evaluate --n 50 --data ../shared/data [--jobs 2]

``--jobs`` evaluates that many phantoms at a time in worker processes (the same figures).

1. Held-out synthetic set (seeds ``seed*100000 + 50000 + i``, never used in training or
   threshold choice): FROC and CPM per LUNA16, sensitivity per size bin and false positives per
   scan at the operating point, stage-1 recall at its candidate threshold, Dice of the masks of
   detected nodules.
2. Held-out phantoms with confounders (seeds ``seed*100000 + 60000 + i``; pneumonia-like
   opacities, atelectasis, fissures, pleural plaques: see :func:`models.phantom.make_phantom`):
   the same FROC figures, and false positives per scan at the operating point.
3. The real series LIDC-IDRI-0001 (when the data folder is there): every finding at the
   operating point (and the strongest ones below it), matched to the readers' nodules; and the
   same on its copy moved by :data:`models.followup.LIDC_TEST_MOTION` (resampled through a
   rotation of a few degrees, as the priors test sends it: a detector must not depend on how
   the patient lay or on the interpolation's blur).
4. The real COVID-19 series ``ricord-1a-covid-ct`` (no nodules): every finding the service
   reports, with its lesion class, exactly as ``noduleai detect`` reports it.

Detection is the service's own :class:`pipelines.detect.Detector` on onnxruntime CPU
(:meth:`~pipelines.detect.Detector.run_stages`, which keeps the findings below the operating
point), so the figures are those of what the service runs.

Writes ``models/cards/evaluation.json`` and renders ``models/cards/stage1_screen.md`` and
``models/cards/stage2_refine.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.annotations import lidc_consensus, load_dicom_series, read_lidc_xml
from models.evaluation import (
    SIZE_BINS_MM,
    EvalDetection,
    Reference,
    ScanCase,
    dice,
    fps_per_scan,
    froc,
    sensitivity_by_size,
    size_bin_name,
    threshold_at_fp_rate,
)
from models.followup import LIDC_TEST_MOTION, write_moved_copy
from models.phantom import CONFOUNDER_MASS_CHANCE, Phantom, make_phantom
from pipelines.detect import Detector, DetectorConfig, StageResult
from pipelines.manifest import WEIGHTS_DIR
from pipelines.preprocess import ISO_SPACING_MM, STAGE2_PATCH, crop_patch, resample_to_iso
from pipelines.refine import Finding
from pipelines.registration import RigidTransform
from pipelines.screen import candidate_world

CARDS_DIR = Path(__file__).resolve().parent / "cards"
TEST_OFFSET = 50000
CONFOUNDER_TEST_OFFSET = 60000
NEGATIVE_SERIES = "ricord-1a-covid-ct"
"""Real series without nodules (COVID-19 pneumonia) in the shared data folder."""


def default_data_dir() -> Path | None:
    """``$NODULEAI_TEST_DATA`` or ``<repo>/../shared/data`` when it exists."""
    env = os.environ.get("NODULEAI_TEST_DATA")
    if env:
        return Path(env)
    p = Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.exists() else None


def evaluation_detector(weights: str | Path = WEIGHTS_DIR, threads: int | None = 1) -> Detector:
    """The service's detector on onnxruntime CPU with ``threads`` intra-op threads."""
    return Detector(DetectorConfig(models_dir=Path(weights), backend="onnx-cpu", threads=threads))


def _timings_s(res: StageResult) -> dict[str, float]:
    """``preprocess_s``, ``stage1_s``, ``stage2_s`` in seconds."""
    return {f"{k}_s": v / 1000.0 for k, v in res.timings_ms.items()}


def _hit(centre: tuple[float, float, float], ref: Reference) -> bool:
    return bool(np.linalg.norm(np.subtract(centre, ref.centre_mm)) <= ref.diameter_mm / 2)


def _mask_dice(ph: Phantom, f: Finding, label: int) -> float:
    iso_lab = resample_to_iso(ph.labels == label, ph.spacing_mm, order=0) > 0.5
    lo = [round((f.mask_origin_xyz_mm[a] - ph.origin_mm[a]) / ISO_SPACING_MM) for a in (2, 1, 0)]
    centre = (lo[0] + STAGE2_PATCH // 2, lo[1] + STAGE2_PATCH // 2, lo[2] + STAGE2_PATCH // 2)
    gt = crop_patch(iso_lab.astype(np.float32), centre, STAGE2_PATCH) > 0.5
    return dice(f.mask, gt)


def evaluate_phantom(det: Detector, seed: int, confounders: bool = False) -> dict[str, Any]:
    """Detect in one held-out phantom; return its scan case, stage-1 hits and Dice values."""
    ph = make_phantom(
        seed, confounders=confounders, mass_chance=CONFOUNDER_MASS_CHANCE if confounders else 0.0
    )
    res = det.run_stages(ph.volume_hu, ph.spacing_mm, ph.origin_mm)
    refs = [Reference(n.centre_xyz_mm, n.diameter_mm) for n in ph.nodules]
    cands = [candidate_world(c, ph.origin_mm) for c in res.candidates]
    s1_hits = [any(_hit(c, r) for c in cands) for r in refs]
    dices = []
    for n, r in zip(ph.nodules, refs, strict=True):
        hits = [f for f in res.findings_at() if _hit(f.centre_xyz_mm, r)]
        if hits:
            dices.append(
                (n.diameter_mm, _mask_dice(ph, max(hits, key=lambda f: f.probability), n.label))
            )
    case = ScanCase(refs, [EvalDetection(f.centre_xyz_mm, f.probability) for f in res.findings])
    return {
        "case": case,
        "s1_hits": s1_hits,
        "dice": dices,
        "n_candidates": len(res.candidates),
        "timings": _timings_s(res),
        "kinds": [(n.kind, n.location) for n in ph.nodules],
    }


_worker_detector: Detector | None = None
"""The detector of an evaluation worker process (:func:`_start_worker`)."""


def _start_worker(weights: str, threads: int | None) -> None:
    global _worker_detector
    _worker_detector = evaluation_detector(weights, threads)


def _evaluate_in_worker(seed: int, confounders: bool) -> dict[str, Any]:
    assert _worker_detector is not None
    return evaluate_phantom(_worker_detector, seed, confounders)


def _phantom_rows(
    det: Detector, seeds: list[int], confounders: bool, jobs: int
) -> Iterator[dict[str, Any]]:
    """:func:`evaluate_phantom` of every seed, in order; with ``jobs`` > 1 in that many worker
    processes, each with its own detector on ``det``'s weights and threads (the rows are the
    same: each phantom and its detection depend on its seed alone)."""
    if jobs <= 1:
        yield from (evaluate_phantom(det, s, confounders) for s in seeds)
        return
    with ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(str(det.config.models_dir), det.config.threads),
    ) as pool:
        yield from pool.map(_evaluate_in_worker, seeds, [confounders] * len(seeds))


def evaluate_synthetic(
    det: Detector, seed: int, n: int, confounders: bool = False, jobs: int = 1
) -> dict[str, Any]:
    """Held-out synthetic evaluation (see the module docstring), of the phantoms with
    confounders when asked; ``jobs`` phantoms at a time (:func:`_phantom_rows`)."""
    offset = CONFOUNDER_TEST_OFFSET if confounders else TEST_OFFSET
    seeds = [seed * 100000 + offset + i for i in range(n)]
    rows = []
    for i, row in enumerate(_phantom_rows(det, seeds, confounders, jobs)):
        rows.append(row)
        if (i + 1) % 10 == 0:
            print(f"evaluated {i + 1}/{n} phantoms", flush=True)
    cases = [r["case"] for r in rows]
    res = froc(cases)
    s1 = [h for r in rows for h in r["s1_hits"]]
    dices = [d for r in rows for d in r["dice"]]
    thr = det.threshold
    by_kind: dict[str, list[bool]] = {}
    for r in rows:
        best = [
            max(
                (d.probability for d in r["case"].detections if _hit(d.centre_mm, ref)),
                default=-1.0,
            )
            for ref in r["case"].references
        ]
        for (kind, loc), b in zip(r["kinds"], best, strict=True):
            by_kind.setdefault(kind, []).append(b >= thr)
            by_kind.setdefault(loc, []).append(b >= thr)
    return {
        "n_scans": n,
        "n_nodules": res.n_nodules,
        "seeds": f"{seed * 100000 + offset}..+{n - 1}",
        "sensitivity_at_fp": {str(k): round(v, 4) for k, v in res.sensitivities_at.items()},
        "cpm": round(res.cpm, 4),
        "operating_threshold": thr,
        "sensitivity_at_operating_point": round(
            float(np.mean([b >= thr for b in _best_all(cases)])), 4
        )
        if res.n_nodules
        else None,
        "fps_per_scan_at_operating_point": round(fps_per_scan(cases, thr), 3),
        "sensitivity_by_size": {
            k: [round(v[0], 4), v[1]] for k, v in sensitivity_by_size(cases, thr).items()
        },
        "sensitivity_3_6_mm_at_1_fp": _small_at_1_fp(cases),
        "sensitivity_by_kind": {
            k: [round(float(np.mean(v)), 4), len(v)] for k, v in by_kind.items()
        },
        "stage1_threshold": det.candidate_threshold,
        "stage1_recall": round(float(np.mean(s1)), 4) if s1 else None,
        "stage1_candidates_per_scan": round(float(np.mean([r["n_candidates"] for r in rows])), 1),
        "dice_mean": round(float(np.mean([d for _, d in dices])), 4) if dices else None,
        "dice_by_size": _dice_by_size(dices),
        "mean_timings_s": {
            k: round(float(np.mean([r["timings"][k] for r in rows])), 3) for k in rows[0]["timings"]
        },
    }


def _small_at_1_fp(cases: list[ScanCase]) -> list[float]:
    """Sensitivity for 3-6 mm nodules at the FROC point of 1 false positive per scan, and how
    many there are."""
    ((sens, n),) = sensitivity_by_size(
        cases, threshold_at_fp_rate(cases, 1.0), ((3.0, 6.0),)
    ).values()
    return [round(sens, 4), n]


def _best_all(cases: list[ScanCase]) -> list[float]:
    from models.evaluation import match_scan

    return [float(b) for c in cases for b in match_scan(c)[0]]


def _dice_by_size(dices: list[tuple[float, float]]) -> dict[str, list[float]]:
    out = {}
    for lo, hi in SIZE_BINS_MM:
        v = [d for s, d in dices if lo <= s < hi]
        out[size_bin_name(lo, hi)] = [round(float(np.mean(v)), 4) if v else float("nan"), len(v)]
    return out


def _lidc_series(data: Path) -> Path | None:
    hits = sorted((data / "lidc-idri-0001").glob("*/*/069.xml"))
    return hits[0].parent if hits else None


def _moved(motion: RigidTransform, p: tuple[float, float, float]) -> tuple[float, float, float]:
    x, y, z = motion.to_current(p)
    return float(x), float(y), float(z)


def evaluate_lidc(
    det: Detector, data: Path, motion: RigidTransform | None = None
) -> dict[str, Any] | None:
    """Detection on LIDC-IDRI-0001 compared with the readers' marks; with ``motion``, on its
    copy moved by it (:func:`models.followup.write_moved_copy`: the same anatomy resampled
    through a rotation, as a later study of a patient who lay otherwise), the readers' marks
    moved with it."""
    folder = _lidc_series(data)
    if folder is None:
        return None
    if motion is None:
        ct = load_dicom_series(folder)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            write_moved_copy(folder, Path(tmp), motion, days_later=0, salt="evaluation")
            ct = load_dicom_series(tmp)
    t0 = time.perf_counter()
    res = det.run_stages(ct.volume_hu, ct.spacing_mm, ct.origin_mm)
    wall = time.perf_counter() - t0
    readers = lidc_consensus(
        read_lidc_xml(folder / "069.xml"), ct.origin_mm, ct.spacing_mm[1:], ct.spacing_mm[0]
    )
    if motion is not None:
        readers = [replace(n, centre_xyz_mm=_moved(motion, n.centre_xyz_mm)) for n in readers]
    big = [n for n in readers if n.kind == "nodule"]

    def describe(f: Finding) -> dict[str, Any]:
        match = [
            n
            for n in readers
            if np.linalg.norm(np.subtract(f.centre_xyz_mm, n.centre_xyz_mm))
            <= max(n.diameter_mm / 2, 5.0)
        ]
        return {
            "centre_xyz_mm": [round(v, 1) for v in f.centre_xyz_mm],
            "probability": round(f.probability, 4),
            "diameter_mm": round(f.diameter_mm, 1),
            "equivalent_diameter_mm": round(f.equivalent_diameter_mm, 1),
            "volume_mm3": round(f.volume_mm3, 0),
            "matches": (
                f"readers' {match[0].kind} ({match[0].readers} readers)"
                if match
                else "none (false positive)"
            ),
        }

    at_op = [describe(f) for f in res.findings_at()]
    below = [describe(f) for f in res.findings if f.probability < det.threshold][:5]
    ref = big[0] if big else None
    found = [
        f
        for f in res.findings_at()
        if ref
        and np.linalg.norm(np.subtract(f.centre_xyz_mm, ref.centre_xyz_mm)) <= ref.diameter_mm / 2
    ]
    return {
        "series": folder.name,
        "moved": None
        if motion is None
        else {
            "rotation_deg": round(motion.rotation_deg, 2),
            "translation_mm": round(motion.translation_mm, 2),
        },
        "shape": list(ct.volume_hu.shape),
        "spacing_mm": [round(v, 4) for v in ct.spacing_mm],
        "readers_nodule": None
        if ref is None
        else {
            "centre_xyz_mm": [round(v, 1) for v in ref.centre_xyz_mm],
            "extent_mm": [round(v, 1) for v in ref.extent_mm],
            "long_axis_mm": round(ref.diameter_mm, 1),
            "readers": ref.readers,
        },
        "readers_small_nodules": [
            [round(v, 1) for v in n.centre_xyz_mm] for n in readers if n.kind == "small"
        ],
        "found": bool(found),
        "diameter_error_vs_long_axis": (
            round(found[0].diameter_mm / ref.diameter_mm - 1, 3) if found and ref else None
        ),
        "false_positives_at_operating_point": sum(
            1 for f in at_op if f["matches"].startswith("none")
        ),
        "findings_at_operating_point": at_op,
        "strongest_below_operating_point": below,
        "n_candidates": len(res.candidates),
        "timings_s": {k: round(v, 2) for k, v in _timings_s(res).items()},
        "wall_s": round(wall, 2),
    }


def evaluate_negative_series(
    weights: str | Path, data: Path, threads: int
) -> dict[str, Any] | None:
    """Every finding the service reports on the real series without nodules, with its class."""
    from dicom_node.config import Settings
    from dicom_node.results import ModelIdentity
    from pipelines.analysis import analyse
    from pipelines.outputs import encode_results

    folder = data / NEGATIVE_SERIES
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    min_slices = int(Settings.model_fields["min_slices"].default)
    a = analyse(files, lambda: evaluation_detector(weights, threads), min_slices)
    d = a.detection
    enc = encode_results(a.paths, a.volume, d.nodules, ModelIdentity(d.model_name, d.model_version))
    nodules = [n.to_json() for n in enc.nodules]
    classes = [str(n["lesion_class"]) for n in nodules]
    return {
        "series": NEGATIVE_SERIES,
        "findings": len(nodules),
        "by_class": {c: classes.count(c) for c in sorted(set(classes))},
        "over_30_mm": sum(1 for n in nodules if float(n["long_axis_mm"]) > 30.0),
        "lung_rads": enc.lung_rads,
        "each": [
            {k: n[k] for k in ("lesion_class", "type", "long_axis_mm", "probability", "center_mm")}
            for n in nodules
        ],
        "n_candidates": d.candidates,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m models.evaluate``."""
    p = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__)
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--n-confounders", type=int, default=20)
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--jobs", type=int, default=1, help="phantoms evaluated at a time, in worker processes"
    )
    p.add_argument("--out", default=str(CARDS_DIR))
    p.add_argument("--skip-synthetic", action="store_true")
    args = p.parse_args(argv)
    det = evaluation_detector(args.weights, threads=args.threads)
    data = Path(args.data) if args.data else default_data_dir()
    out = Path(args.out)
    prev = out / "evaluation.json"
    result: dict[str, Any] = json.loads(prev.read_text()) if prev.exists() else {}
    result["weights_sha256"] = {
        det.manifest1["name"]: det.manifest1["sha256"],
        det.manifest2["name"]: det.manifest2["sha256"],
    }
    if data is not None:
        result["lidc_idri_0001"] = evaluate_lidc(det, data)
        print(json.dumps(result["lidc_idri_0001"], indent=2), flush=True)
        result["lidc_idri_0001_moved"] = evaluate_lidc(det, data, LIDC_TEST_MOTION)
        print(json.dumps(result["lidc_idri_0001_moved"], indent=2), flush=True)
        result["negative_series"] = evaluate_negative_series(args.weights, data, args.threads)
        print(json.dumps(result["negative_series"], indent=2), flush=True)
    if not args.skip_synthetic:
        result["synthetic_held_out"] = evaluate_synthetic(det, args.seed, args.n, jobs=args.jobs)
        print(json.dumps(result["synthetic_held_out"], indent=2), flush=True)
        result["synthetic_confounders"] = evaluate_synthetic(
            det, args.seed, args.n_confounders, confounders=True, jobs=args.jobs
        )
        print(json.dumps(result["synthetic_confounders"], indent=2), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    prev.write_text(json.dumps(result, indent=2) + "\n")
    from models.modelcards import render_cards

    render_cards(result, det.manifest1, det.manifest2, out)


if __name__ == "__main__":
    main()
