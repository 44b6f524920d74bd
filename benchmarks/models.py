"""Benchmark the shipped ONNX models: stage 1 ms per slice, stage 2 ms per candidate.

    python benchmarks/models.py [--threads N] [--provider CPUExecutionProvider] [--repeat 20]

Stage 1 runs on batches of 2.5D slices of 256 x 256 isotropic pixels (a 320 mm lung box at
1.25 mm); stage 2 on batches of 32^3 patches. Prints one line per figure and a JSON summary.
Uses CUDAExecutionProvider too when onnxruntime offers it (the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.manifest import WEIGHTS_DIR, load_manifest


def _session(name: str, provider: str, threads: int, weights: Path) -> Any:
    m = load_manifest(name, weights)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(weights / m["file"]), sess_options=opts, providers=[provider])


def _time(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(
    provider: str,
    threads: int,
    repeat: int,
    weights: Path = WEIGHTS_DIR,
    batch1: int = 8,
    batch2: int = 16,
    size: int = 256,
) -> dict[str, float]:
    """Median timings for one execution provider."""
    rng = np.random.default_rng(0)
    s1 = _session("stage1_screen", provider, threads, weights)
    s2 = _session("stage2_refine", provider, threads, weights)
    x1 = rng.random((batch1, 5, size, size), dtype=np.float32)
    x2 = rng.random((batch2, 1, 32, 32, 32), dtype=np.float32)
    t1 = _time(lambda: s1.run(None, {"slices": x1}), repeat)
    t2 = _time(lambda: s2.run(None, {"patch": x2}), repeat)
    return {
        "stage1_ms_per_slice": round(1000 * t1 / batch1, 2),
        "stage2_ms_per_candidate": round(1000 * t2 / batch2, 2),
    }


def main() -> None:
    """Run the benchmark for CPU (and CUDA when available) and print the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--provider", action="append")
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    args = p.parse_args()
    providers = args.provider or ["CPUExecutionProvider"] + [
        x for x in ("CUDAExecutionProvider",) if x in ort.get_available_providers()
    ]
    out = {}
    for prov in providers:
        r = bench(prov, args.threads, args.repeat, args.weights)
        out[prov] = r
        print(
            f"{prov} (threads={args.threads}): stage 1 {r['stage1_ms_per_slice']} ms/slice "
            f"(256x256), stage 2 {r['stage2_ms_per_candidate']} ms/candidate (32^3)"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
