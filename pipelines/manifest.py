"""The shipped models' manifests: where the weights are, and reading a manifest with its hash check.

Each network ships as ``<name>.onnx`` beside ``<name>.json`` (written by :mod:`models.export`):
name, version, file, sha256, inputs and outputs, the preprocessing constants and the thresholds
(``candidate_threshold`` for stage 1, ``operating_threshold`` for stage 2). ``stage2_score`` is
stage 2 cut to its probability output, derived from the stage-2 file its manifest names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError, InferenceError

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights"
"""The shipped weights: ``models/weights`` beside the ``pipelines`` package (package data of
``models``, installed alongside)."""

STAGE1_NAME = "stage1_screen"
STAGE2_NAME = "stage2_refine"
STAGE2_SCORE_NAME = "stage2_score"
"""Stage 2's probability alone (its graph cut to the encoder and classification head, the same
weights; ``derived_from`` names the stage-2 file): the cheap first pass over every candidate."""


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_manifest(name: str, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Read ``<weights_dir>/<name>.json`` and check the ONNX file's sha256 against it.

    Raises
    ------
    InferenceError
        When the manifest or the ONNX file cannot be read (a transient fault: a volume not mounted
        yet, say; retried).
    ConfigError
        When the ONNX file's hash differs from the manifest's (permanent: the installation is
        inconsistent).
    """
    try:
        data: dict[str, Any] = json.loads((weights_dir / f"{name}.json").read_text())
        digest = sha256(weights_dir / data["file"])
    except (OSError, ValueError, KeyError) as exc:
        raise InferenceError(f"cannot read model {name} in {weights_dir}: {exc}") from exc
    if digest != data["sha256"]:
        raise ConfigError(f"{data['file']}: sha256 {digest} differs from the manifest")
    return data
