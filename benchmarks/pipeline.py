"""Pipeline benchmark: a 300-slice 512x512 series through the service's pipeline on onnxruntime
CPU (time per stage, total, peak RSS), and the two-stage detector against an exhaustive
sliding-window pass of the stage-2 network over the whole lung volume, on held-out phantoms.

Run: ``.venv/bin/python benchmarks/pipeline.py [--phantoms 8] [--threads 2] [--baseline DIR]``.

Targets (issue 4, 2 CPU cores): 300 slices in 30 s or less and 2 GB or less; two-stage at least
5x faster than exhaustive at no more than 2 points lower sensitivity. Both detectors are measured
in the same run, on the same volumes, with the same stage-2 network and operating threshold.

``--baseline DIR`` (a checkout of an earlier commit: ``git worktree add /tmp/baseline <commit>``)
also runs that code's pipeline on the 300-slice series and on LIDC-IDRI-0001 (``--lidc``, default
``../shared/data/lidc-idri-0001``) and on ``--compare-phantoms`` held-out phantoms, alternating
with this tree's, and prints both times, the speed-up, both peak RSS figures and whether the
findings are the same (issue 22: at least 2.5x, peak RSS at most 1.2 GB, findings unchanged).
Each analysis runs in a fresh process. Both sides run ``--models`` unless ``--baseline-models``
names the baseline's own weights (issue 17: per-scan time of new weights against the old ones,
``--baseline-models /tmp/baseline/models/weights``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: The code a ``--one`` child analyses with: this tree, or a ``--baseline`` checkout.
sys.path.insert(0, os.environ.get("NODULEAI_BENCH_CODE", str(REPO)))

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
    files = sorted(p for p in folder.rglob("*.dcm") if p.is_file())
    detection = analyse(files, lambda: detector, min_slices=20).detection
    wall = time.perf_counter() - start
    peak_mb = _peak_rss_mb()
    return {
        "timings_ms": detection.timings_ms,
        "wall_s": wall,
        "peak_rss_mb": peak_mb,
        "nodules": len(detection.nodules),
        "candidates": detection.candidates,
        # what a radiologist would see: position, size, probability (rounded as findings.json)
        "findings": [
            [
                [round(float(v), 2) for v in n.center_mm],
                round(float(n.long_axis_mm), 2),
                round(float(n.probability), 4),
            ]
            for n in detection.nodules
        ],
    }


def analyse_in_child(
    folder: Path, threads: int, models: Path, code: Path | None = None
) -> dict[str, Any]:
    """:func:`one_series` in a fresh process, on this tree's code or on ``code``'s."""
    env = dict(os.environ)
    if code is not None:
        env["NODULEAI_BENCH_CODE"] = str(code)
    args = ["--one", str(folder), "--threads", str(threads), "--models", str(models)]
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def compare_with_baseline(
    cases: dict[str, Path],
    baseline: Path,
    threads: int,
    models: Path,
    runs: int,
    baseline_models: Path | None = None,
) -> None:
    """This tree's pipeline against ``baseline``'s on each case, alternating, median of runs;
    the baseline runs ``baseline_models`` (default: the same weights as this tree)."""
    theirs_models = baseline_models or models
    print(
        f"\nthis tree ({models}) against {baseline} ({theirs_models}); {threads} threads, "
        f"median of {runs} runs each"
    )
    for name, folder in cases.items():
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        for _ in range(runs):
            theirs.append(analyse_in_child(folder, threads, theirs_models, baseline))
            ours.append(analyse_in_child(folder, threads, models))
        new = statistics.median(r["timings_ms"]["total"] for r in ours) / 1000
        old = statistics.median(r["timings_ms"]["total"] for r in theirs) / 1000
        same = all(r["findings"] == theirs[0]["findings"] for r in ours + theirs)
        print(f"  {name}: baseline {old:6.1f} s, this tree {new:6.1f} s: {old / new:.2f}x faster")
        for stage in ("preprocess", "stage1", "stage2"):
            o = statistics.median(r["timings_ms"][stage] for r in theirs) / 1000
            n = statistics.median(r["timings_ms"][stage] for r in ours) / 1000
            print(f"    {stage:<11} {o:6.1f} s -> {n:6.1f} s")
        print(
            f"    peak RSS {max(r['peak_rss_mb'] for r in theirs):.0f} MB -> "
            f"{max(r['peak_rss_mb'] for r in ours):.0f} MB; findings "
            f"{'the same' if same else 'DIFFERENT'} ({len(ours[0]['findings'])} vs "
            f"{len(theirs[0]['findings'])}; candidates {ours[0]['candidates']} vs "
            f"{theirs[0]['candidates']})"
        )
        if not same:
            print(f"    this tree: {ours[0]['findings']}\n    baseline:  {theirs[0]['findings']}")


def write_benchmark_series(folder: Path) -> None:
    """The 300-slice 512x512 phantom series of the benchmark, as DICOM files in ``folder``."""
    phantom = make_phantom(SERIES_SEED, shape=(300, 512, 512), spacing_mm=(1.0, 0.7, 0.7))
    write_dicom_series(
        phantom.volume_hu, phantom.spacing_mm, folder, SERIES_SEED, origin_mm=phantom.origin_mm
    )


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
    parser.add_argument("--phantoms", type=int, default=8, help="0: skip the held-out part")
    parser.add_argument("--stride", type=int, default=8, help="exhaustive stride (iso voxels)")
    parser.add_argument("--models", type=Path, default=WEIGHTS_DIR, help="ONNX weights folder")
    parser.add_argument("--baseline", type=Path, help="checkout of earlier code to compare with")
    parser.add_argument(
        "--baseline-models",
        type=Path,
        help="weights the baseline runs (default: --models; e.g. DIR/models/weights to compare "
        "the weights each checkout ships)",
    )
    parser.add_argument("--lidc", type=Path, default=REPO.parent / "shared/data/lidc-idri-0001")
    parser.add_argument("--runs", type=int, default=2, help="runs per code version (--baseline)")
    parser.add_argument(
        "--compare-phantoms", type=int, default=4, help="held-out phantoms compared (--baseline)"
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_series(args.one, args.threads, args.models)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        write_benchmark_series(Path(tmp))
        series = analyse_in_child(Path(tmp), args.threads, args.models)
        if args.baseline is not None:
            cases = {"300-slice series": Path(tmp)}
            if args.lidc.is_dir():
                cases["LIDC-IDRI-0001"] = args.lidc
            for seed in list(HELD_OUT_SEEDS)[: args.compare_phantoms]:
                folder = Path(tmp) / f"phantom-{seed}"
                p = make_phantom(seed, n_nodules=(1, 4))
                write_dicom_series(p.volume_hu, p.spacing_mm, folder, seed, origin_mm=p.origin_mm)
                cases[f"held-out phantom {seed}"] = folder
            compare_with_baseline(
                cases, args.baseline, args.threads, args.models, args.runs, args.baseline_models
            )
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

    if args.phantoms == 0:
        return
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
