"""INT8 on the CPU: onnxruntime static quantisation of both stages against the shipped FP32 models.

Each stage is quantised twice (``QuantFormat.QDQ`` and ``QuantFormat.QOperator``; weights int8 per
channel, activations uint8), calibrated on the inputs of four phantoms of their own seeds, then
timed against the FP32 model on the inputs of two held-out phantoms in the same run (median of
``--repeat`` passes, ``--threads`` intra-op threads). The largest change of each output shows what
quantisation does to the scores. INT8 ships only if it is faster *and* keeps the findings; this
benchmark decides the first half::

    .venv/bin/python benchmarks/int8.py [--threads 2] [--repeat 5] [--write-card]

``--write-card`` stores the figures in ``models/cards/int8.json`` and renders the model cards
again (from ``models/cards/evaluation.json``; nothing is re-evaluated). Needs the ``onnx`` package
(the ``train`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.phantom import make_phantom  # noqa: E402
from pipelines.detect import Detector, DetectorConfig  # noqa: E402
from pipelines.manifest import WEIGHTS_DIR  # noqa: E402
from pipelines.preprocess import (  # noqa: E402
    STAGE2_PATCH,
    crop_patch,
    lung_mask,
    normalise_hu,
    resample_to_iso,
)
from pipelines.screen import lung_box, screen, stage1_input  # noqa: E402

CALIBRATION_SEEDS = range(80_000, 80_004)
HELD_OUT_SEEDS = range(90_000, 90_002)
BATCH = 16
CARDS = REPO / "models" / "cards"


def stage_inputs(detector: Detector, seed: int) -> dict[str, list[np.ndarray]]:
    """Batches of 16 as the service feeds them: stage-1 slice stacks of the lungs' box (padded to
    multiples of 8) and stage-2 patches around the FP32 model's candidates."""
    p = make_phantom(seed)
    iso_hu = resample_to_iso(p.volume_hu, p.spacing_mm)
    lung = lung_mask(iso_hu)
    iso = normalise_hu(iso_hu)
    box = lung_box(lung)
    h, w = box[1].stop - box[1].start, box[2].stop - box[2].start
    zs = list(range(box[0].start, box[0].stop))
    stage1 = []
    for i in range(0, len(zs) - BATCH + 1, BATCH):
        x = np.stack([stage1_input(iso, z)[:, box[1], box[2]] for z in zs[i : i + BATCH]])
        stage1.append(np.pad(x, ((0, 0), (0, 0), (0, -h % 8), (0, -w % 8))))
    found = screen(iso, lung, detector.stage1, detector.candidate_threshold, 128).candidates
    patches = [crop_patch(iso, c.voxel, STAGE2_PATCH)[None] for c in found]
    stage2 = [np.stack(patches[i : i + BATCH]) for i in range(0, len(patches) - BATCH + 1, BATCH)]
    return {"stage1": stage1, "stage2": stage2}


class Batches(CalibrationDataReader):
    """The calibration batches of one stage, by its input name."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._items: Iterator[np.ndarray] = iter(batches)
        self.name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._items, None)
        return None if batch is None else {self.name: batch}


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(sess: ort.InferenceSession, batches: list[np.ndarray], repeat: int) -> float:
    """Median milliseconds per batch over ``repeat`` passes (after one warm-up pass)."""
    name = sess.get_inputs()[0].name
    sess.run(None, {name: batches[0]})
    passes = []
    for _ in range(repeat):
        start = time.perf_counter()
        for b in batches:
            sess.run(None, {name: b})
        passes.append((time.perf_counter() - start) * 1000 / len(batches))
    return statistics.median(passes)


def largest_change(a: ort.InferenceSession, b: ort.InferenceSession, batches: list[Any]) -> float:
    """The largest absolute difference of the first output (heatmap or probability)."""
    name = a.get_inputs()[0].name
    return max(
        float(np.abs(a.run(None, {name: x})[0] - b.run(None, {name: x})[0]).max()) for x in batches
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write-card", action="store_true")
    args = parser.parse_args()
    detector = Detector(DetectorConfig(threads=args.threads))
    calibration: dict[str, list[np.ndarray]] = {"stage1": [], "stage2": []}
    held_out: dict[str, list[np.ndarray]] = {"stage1": [], "stage2": []}
    for seeds, into in ((CALIBRATION_SEEDS, calibration), (HELD_OUT_SEEDS, held_out)):
        for seed in seeds:
            for stage, batches in stage_inputs(detector, seed).items():
                into[stage] += batches
    files = {"stage1": "stage1_screen.onnx", "stage2": "stage2_refine.onnx"}
    print(
        f"onnxruntime {ort.__version__} CPU, {args.threads} threads, batches of {BATCH}; "
        f"calibrated on {len(CALIBRATION_SEEDS)} phantoms, timed on {len(HELD_OUT_SEEDS)} "
        "held-out phantoms"
    )
    figures: dict[str, Any] = {"onnxruntime": ort.__version__, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        for stage, file in files.items():
            fp32 = session(WEIGHTS_DIR / file, args.threads)
            name = fp32.get_inputs()[0].name
            prepared = Path(tmp) / f"{stage}.pre.onnx"
            quant_pre_process(WEIGHTS_DIR / file, prepared, skip_symbolic_shape=True)
            base_ms = timed(fp32, held_out[stage], args.repeat)
            row: dict[str, Any] = {"fp32_ms_per_batch": round(base_ms, 1)}
            print(f"  {stage}: FP32 {base_ms:7.1f} ms per batch ({len(held_out[stage])} batches)")
            for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
                out = Path(tmp) / f"{stage}.{fmt.name}.onnx"
                quantize_static(
                    prepared,
                    out,
                    Batches(name, calibration[stage]),
                    quant_format=fmt,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
                int8 = session(out, args.threads)
                ms = timed(int8, held_out[stage], args.repeat)
                change = largest_change(fp32, int8, held_out[stage])
                row[fmt.name] = {
                    "ms_per_batch": round(ms, 1),
                    "speed_up": round(base_ms / ms, 2),
                    "largest_output_change": round(change, 4),
                }
                print(
                    f"    INT8 {fmt.name:<9} {ms:7.1f} ms per batch: {base_ms / ms:.2f}x FP32's "
                    f"speed; largest output change {change:.4f}"
                )
            figures[stage] = row
    faster = [
        f"{s} {f}" for s in files for f in ("QDQ", "QOperator") if figures[s][f]["speed_up"] > 1.0
    ]
    figures["ships"] = False
    figures["why"] = (
        "INT8 is slower than FP32 on this CPU for every stage and format"
        if not faster
        else f"faster: {', '.join(faster)}; accuracy (CPM, LIDC-IDRI-0001 findings) not measured"
    )
    print(f"INT8 ships: no ({figures['why']})")
    if args.write_card:
        from models.modelcards import render_cards

        (CARDS / "int8.json").write_text(json.dumps(figures, indent=2) + "\n")
        evaluation = json.loads((CARDS / "evaluation.json").read_text())
        render_cards(evaluation, detector.manifest1, detector.manifest2, CARDS)
        print(f"wrote {CARDS / 'int8.json'} and rendered the model cards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
