"""Pipeline benchmark: a 300-slice 512x512 series through the service's pipeline on onnxruntime
CPU (time per stage, total, peak RSS), and the two-stage detector against an exhaustive
sliding-window pass of the stage-2 network over the whole lung volume, on held-out phantoms.

Run: ``.venv/bin/python benchmarks/pipeline.py [--phantoms 8] [--threads 2]``.

Targets (issue 4, 2 CPU cores): 300 slices in 30 s or less and 2 GB or less; two-stage at least
5x faster than exhaustive at no more than 2 points lower sensitivity. Both detectors are measured
in the same run, on the same volumes, with the same stage-2 network and operating threshold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.evaluation import EvalDetection, Reference, ScanCase, match_scan  # noqa: E402
from models.phantom import make_phantom, write_dicom_series  # noqa: E402
from pipelines.detect import Detector, DetectorConfig  # noqa: E402
from pipelines.manifest import WEIGHTS_DIR  # noqa: E402
from pipelines.preprocess import (  # noqa: E402
    STAGE2_PATCH,
    lung_mask,
    normalise_hu,
    resample_to_iso,
)
from pipelines.refine import refine  # noqa: E402
from pipelines.screen import Candidate, lung_box  # noqa: E402

SERIES_SEED = 424242
HELD_OUT_SEEDS = range(90_000, 90_100)


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux keeps that across
    ``execve``, so a child would report the parent's size at ``fork``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_series(folder: Path, threads: int, models: Path) -> dict[str, Any]:
    """Child process: the service's analysis of one folder; timings and peak RSS."""
    from pipelines.analysis import analyse

    detector = Detector(DetectorConfig(models_dir=models, threads=threads))
    start = time.perf_counter()
    detection = analyse(sorted(folder.iterdir()), lambda: detector, min_slices=20).detection
    wall = time.perf_counter() - start
    peak_mb = _peak_rss_mb()
    return {
        "timings_ms": detection.timings_ms,
        "wall_s": wall,
        "peak_rss_mb": peak_mb,
        "nodules": len(detection.nodules),
        "candidates": detection.candidates,
    }


def bench_series(threads: int, models: Path) -> dict[str, Any]:
    """Write a 300-slice 512x512 phantom series, analyse it in a fresh process."""
    phantom = make_phantom(SERIES_SEED, shape=(300, 512, 512), spacing_mm=(1.0, 0.7, 0.7))
    with tempfile.TemporaryDirectory() as tmp:
        write_dicom_series(
            phantom.volume_hu, phantom.spacing_mm, tmp, SERIES_SEED, origin_mm=phantom.origin_mm
        )
        del phantom
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                tmp,
                "--threads",
                str(threads),
                "--models",
                str(models),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def exhaustive(
    detector: Detector,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    stride: int,
) -> list[EvalDetection]:
    """Stage 2 on every patch of the lungs' box at ``stride`` isotropic voxels."""
    iso_hu = resample_to_iso(hu, spacing)
    lung = lung_mask(iso_hu)
    iso = normalise_hu(iso_hu)
    box = lung_box(lung)
    half = STAGE2_PATCH // 2
    centres = [
        (z, y, x)
        for z in range(box[0].start, box[0].stop, stride)
        for y in range(box[1].start, box[1].stop, stride)
        for x in range(box[2].start, box[2].stop, stride)
        if lung[
            max(0, z - half) : z + half, max(0, y - half) : y + half, max(0, x - half) : x + half
        ].any()
    ]
    findings = refine(iso, [Candidate(c, 1.0) for c in centres], detector.stage2, origin, batch=32)
    return [EvalDetection(f.centre_xyz_mm, f.probability) for f in findings]


def bench_held_out(detector: Detector, n: int, stride: int) -> dict[str, Any]:
    """Sensitivity and time of both detectors on ``n`` held-out phantoms."""
    totals = {"two_stage": [0.0, 0, 0], "exhaustive": [0.0, 0, 0]}  # seconds, hits, fps
    n_nodules = 0
    for seed in list(HELD_OUT_SEEDS)[:n]:
        p = make_phantom(seed, n_nodules=(1, 4))
        refs = [Reference(x.centre_xyz_mm, x.diameter_mm) for x in p.nodules]
        n_nodules += len(refs)
        for name in totals:
            t0 = time.perf_counter()
            if name == "two_stage":
                found = detector.detect(p.volume_hu, p.spacing_mm, p.origin_mm).nodules
                dets = [EvalDetection(f.center_mm, f.probability) for f in found]
            else:
                dets = exhaustive(detector, p.volume_hu, p.spacing_mm, p.origin_mm, stride)
            dets = [d for d in dets if d.probability >= detector.threshold]
            totals[name][0] += time.perf_counter() - t0
            best, fps = match_scan(ScanCase(refs, dets))
            totals[name][1] += int(np.isfinite(best).sum())
            totals[name][2] += len(fps)
    return {
        name: {"seconds": t, "sensitivity": hits / max(n_nodules, 1), "fps_per_scan": fps / n}
        for name, (t, hits, fps) in totals.items()
    } | {"nodules": n_nodules, "phantoms": n, "stride_vox": stride}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phantoms", type=int, default=8)
    parser.add_argument("--stride", type=int, default=8, help="exhaustive stride (iso voxels)")
    parser.add_argument("--models", type=Path, default=WEIGHTS_DIR, help="ONNX weights folder")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_series(args.one, args.threads, args.models)))
        return

    series = bench_series(args.threads, args.models)
    t = series["timings_ms"]
    print(
        "300-slice 512x512 series, onnxruntime CPU, "
        f"{args.threads} threads (reference target: 30 s, 2048 MB)"
    )
    for stage in ("load", "preprocess", "stage1", "stage2", "postprocess", "total"):
        print(f"  {stage:<12} {t[stage] / 1000:8.2f} s")
    print(
        f"  peak RSS     {series['peak_rss_mb']:8.0f} MB"
        f"   ({series['candidates']} candidates, {series['nodules']} nodules)"
    )
    print(
        f"  total / 30 s target: {t['total'] / 30000:.2f}x;"
        f" peak RSS / 2048 MB: {series['peak_rss_mb'] / 2048:.2f}x"
    )

    detector = Detector(DetectorConfig(models_dir=args.models, threads=args.threads))
    held = bench_held_out(detector, args.phantoms, args.stride)
    two, ex = held["two_stage"], held["exhaustive"]
    print(
        f"\nTwo-stage vs exhaustive stage-2 sliding window (stride {held['stride_vox']} voxels), "
        f"{held['phantoms']} held-out phantoms, {held['nodules']} nodules, same threshold"
    )
    for name, r in (("two-stage", two), ("exhaustive", ex)):
        print(
            f"  {name:<11} {r['seconds']:8.1f} s   sensitivity {r['sensitivity']:.3f}"
            f"   FP/scan {r['fps_per_scan']:.2f}"
        )
    print(
        f"  speed-up {ex['seconds'] / max(two['seconds'], 1e-9):.1f}x (target >= 5x);"
        f" sensitivity difference {100 * (two['sensitivity'] - ex['sensitivity']):+.1f} points"
        " (target >= -2)"
    )


if __name__ == "__main__":
    main()
