"""ONNX export and manifests (torch; training side only).

Each model ships as ``<name>.onnx`` (opset :data:`OPSET`, dynamic batch; stage 1 also dynamic
height and width) plus ``<name>.json``, the manifest the service reads: name, version, file,
sha256, opset, inputs and outputs with shapes and meaning, isotropic spacing, HU window and
the other preprocessing constants, thresholds, and how the file was produced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from models.nets import RefineExport, RefineNet, ScreenExport, ScreenNet
from pipelines.manifest import STAGE2_NAME, STAGE2_SCORE_NAME, sha256
from pipelines.preprocess import (
    HU_WINDOW,
    ISO_SPACING_MM,
    LUNG_MARGIN_MM,
    STAGE1_CONTEXT,
    STAGE2_PATCH,
)

OPSET = 17
STAGE1_VERSION = "1.4.0"
"""1.4.0: trained on volumes resampled shrinking axes first (``pipelines.preprocess``); candidate
threshold ``models.train.CANDIDATE_THRESHOLD`` (0.05, the cap bounds the candidates) instead of
0.7 times the weakest validation nodule's score."""
STAGE2_VERSION = "1.7.0"
"""1.4.0: stage 2 also learns from phantoms with confounders (``models.train`` docstring).
1.5.0: and from masses among them, with patches blurred and noised as other scanners make them
(``models.train.scanner_augment``). 1.6.0: on stage 1 1.4.0's candidates, with patches also
resampled through small rotations (``models.train.rotate_augment``). 1.7.0: also on 180 training
phantoms that stage 1 never saw and 100 confounder phantoms (40 before) with opacity model 2
(``models.phantom.make_phantom``), 40 validation phantoms, 6000 iterations, the moving average
of its weights."""


def export_stage1(net: ScreenNet, path: Path) -> None:
    """Export stage 1 (sigmoid heatmap) with dynamic batch, height and width."""
    net.eval()
    dummy = torch.zeros(1, 2 * STAGE1_CONTEXT + 1, 64, 64)
    torch.onnx.export(
        ScreenExport(net).eval(),
        (dummy,),
        str(path),
        dynamo=False,
        input_names=["slices"],
        output_names=["heatmap"],
        opset_version=OPSET,
        dynamic_axes={
            "slices": {0: "batch", 2: "height", 3: "width"},
            "heatmap": {0: "batch", 2: "height", 3: "width"},
        },
    )


def export_stage2(net: RefineNet, path: Path) -> None:
    """Export stage 2 (probability, mask probability) with a dynamic batch."""
    net.eval()
    dummy = torch.zeros(1, 1, STAGE2_PATCH, STAGE2_PATCH, STAGE2_PATCH)
    torch.onnx.export(
        RefineExport(net).eval(),
        (dummy,),
        str(path),
        dynamo=False,
        input_names=["patch"],
        output_names=["probability", "mask"],
        opset_version=OPSET,
        dynamic_axes={"patch": {0: "batch"}, "probability": {0: "batch"}, "mask": {0: "batch"}},
    )


def _preprocessing() -> dict[str, Any]:
    return {
        "resample": "separable linear interpolation to isotropic voxels; voxel 0 kept",
        "spacing_mm": [ISO_SPACING_MM] * 3,
        "hu_window": list(HU_WINDOW),
        "scale": "clip(HU, lo, hi); (HU - lo) / (hi - lo) -> [0, 1]; padding value 0 (air)",
        "lung_margin_mm": LUNG_MARGIN_MM,
    }


def manifest_stage1(path: Path, threshold: float, training: dict[str, Any]) -> dict[str, Any]:
    """Manifest of the stage-1 ONNX file at ``path``."""
    return {
        "name": "stage1_screen",
        "version": STAGE1_VERSION,
        "file": path.name,
        "sha256": sha256(path),
        "opset": OPSET,
        "framework": "onnx",
        "inputs": [
            {
                "name": "slices",
                "shape": ["batch", 2 * STAGE1_CONTEXT + 1, "height", "width"],
                "dtype": "float32",
                "meaning": "isotropic axial slices z-2 .. z+2 as channels, HU window scaled "
                "to [0, 1]; height and width multiples of 8",
            }
        ],
        "outputs": [
            {
                "name": "heatmap",
                "shape": ["batch", 1, "height", "width"],
                "dtype": "float32",
                "meaning": "probability that the pixel is a nodule centre on slice z; "
                "local 3D maxima over stacked slices are candidates",
            }
        ],
        "preprocessing": _preprocessing(),
        "candidate_threshold": threshold,
        "training": training,
    }


def manifest_stage2(path: Path, threshold: float, training: dict[str, Any]) -> dict[str, Any]:
    """Manifest of the stage-2 ONNX file at ``path``."""
    p = STAGE2_PATCH
    return {
        "name": "stage2_refine",
        "version": STAGE2_VERSION,
        "file": path.name,
        "sha256": sha256(path),
        "opset": OPSET,
        "framework": "onnx",
        "inputs": [
            {
                "name": "patch",
                "shape": ["batch", 1, p, p, p],
                "dtype": "float32",
                "meaning": f"{p}^3 isotropic patch (z, y, x) centred on a stage-1 "
                "candidate, HU window scaled to [0, 1], outside padded with 0",
            }
        ],
        "outputs": [
            {
                "name": "probability",
                "shape": ["batch", 1],
                "dtype": "float32",
                "meaning": "probability that a nodule (3-30 mm) lies at the patch centre",
            },
            {
                "name": "mask",
                "shape": ["batch", 1, p, p, p],
                "dtype": "float32",
                "meaning": "per-voxel nodule probability; >= 0.5 is the mask, the component at "
                "the centre is the nodule",
            },
        ],
        "preprocessing": _preprocessing(),
        "operating_threshold": threshold,
        "training": training,
    }


def write_stage2_score(weights_dir: Path) -> dict[str, Any]:
    """Write ``stage2_score.onnx`` and its manifest beside stage 2 in ``weights_dir``: stage 2's
    graph cut down to its input and its probability output (the encoder and the classification
    head, the same weights; onnx's Extractor). The detector scores every candidate with it first,
    at a quarter of the full network's work, and runs the full network (mask and mirror image)
    only where the probability can reach the operating threshold. Returns the manifest."""
    import onnx
    import onnx.utils

    m2 = json.loads((weights_dir / f"{STAGE2_NAME}.json").read_text())
    full = onnx.load(str(weights_dir / m2["file"]))
    probability = m2["outputs"][0]
    score = onnx.utils.Extractor(full).extract_model(
        [i["name"] for i in m2["inputs"]], [probability["name"]]
    )
    path = weights_dir / f"{STAGE2_SCORE_NAME}.onnx"
    onnx.save(score, str(path))
    manifest = {
        "name": STAGE2_SCORE_NAME,
        "version": m2["version"],
        "file": path.name,
        "sha256": sha256(path),
        "opset": m2["opset"],
        "framework": "onnx",
        "derived_from": {"file": m2["file"], "sha256": m2["sha256"]},
        "inputs": m2["inputs"],
        "outputs": [probability],
        "preprocessing": m2["preprocessing"],
        "produced_by": "models.export.write_stage2_score: onnx.utils.Extractor, stage 2's "
        f"inputs to its {probability['name']!r} output",
    }
    write_manifest(manifest, weights_dir / f"{STAGE2_SCORE_NAME}.json")
    return manifest


def write_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Write ``manifest`` as indented JSON."""
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "score":
        raise SystemExit("usage: python -m models.export score WEIGHTS_DIR")
    print(write_stage2_score(Path(sys.argv[2]))["sha256"])
