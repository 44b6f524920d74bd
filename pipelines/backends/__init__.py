"""Inference backends behind one protocol, chosen by configuration with a logged fallback.

``tensorrt`` (native engines built from the shipped ONNX, cached per model hash x TensorRT version
x GPU x precision), ``onnx-tensorrt`` / ``onnx-cuda`` / ``onnx-cpu`` (onnxruntime with that
execution provider). ``auto`` tries them in that order and takes the first that loads; every
fallback is logged with its reason. Torch is never used at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dicom_node.errors import InferenceError

LOGGER = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BACKENDS = ("tensorrt", "onnx-tensorrt", "onnx-cuda", "onnx-cpu")


class InferenceBackend(Protocol):
    """One loaded network: a batch in, its outputs (in the ONNX model's output order) out."""

    name: str

    def run(self, batch: FloatArray) -> list[FloatArray]:
        """Run the network on ``batch`` (first axis: batch)."""


class BackendUnavailableError(InferenceError):
    """A backend cannot load here (no GPU, no TensorRT, no such provider)."""


def load_backend(
    model: Path, choice: str, cache_dir: Path, fp16: bool = False, threads: int | None = None
) -> InferenceBackend:
    """Load ``model`` with the configured backend, falling back along :data:`BACKENDS`.

    Parameters
    ----------
    model : Path
        The ONNX file.
    choice : str
        ``auto`` or one of :data:`BACKENDS`; a named backend falls back to the ones after it.
    cache_dir : Path
        Where TensorRT engines are cached.
    fp16 : bool
        Build TensorRT engines in half precision.
    threads : int, optional
        onnxruntime intra-op threads on CPU.
    """
    order = BACKENDS if choice == "auto" else BACKENDS[BACKENDS.index(choice) :]
    reasons = []
    for name in order:
        try:
            backend = _load(name, model, cache_dir, fp16, threads)
        except BackendUnavailableError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        if reasons:
            LOGGER.warning(
                "backend %s for %s (fallback from: %s)",
                backend.name,
                model.name,
                "; ".join(reasons),
            )
        else:
            LOGGER.info("backend %s for %s", backend.name, model.name)
        return backend
    raise BackendUnavailableError(f"no backend could load {model.name}: {'; '.join(reasons)}")


def _load(
    name: str, model: Path, cache_dir: Path, fp16: bool, threads: int | None
) -> InferenceBackend:
    if name == "tensorrt":
        from pipelines.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(model, cache_dir, fp16=fp16)
    from pipelines.backends.onnx import OnnxBackend

    provider = {
        "onnx-tensorrt": "TensorrtExecutionProvider",
        "onnx-cuda": "CUDAExecutionProvider",
        "onnx-cpu": "CPUExecutionProvider",
    }[name]
    return OnnxBackend(model, provider, threads=threads)
