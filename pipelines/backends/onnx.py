"""onnxruntime backend: CPU, or the CUDA / TensorRT execution providers when present."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.backends import BackendUnavailableError, FloatArray

_SHORT = {
    "CPUExecutionProvider": "onnxruntime-cpu",
    "CUDAExecutionProvider": "onnxruntime-cuda",
    "TensorrtExecutionProvider": "onnxruntime-tensorrt",
}


class OnnxBackend:
    """An ONNX model in an onnxruntime session with one execution provider (plus CPU).

    Parameters
    ----------
    model : Path
        The ONNX file.
    provider : str
        ``CPUExecutionProvider``, ``CUDAExecutionProvider`` or ``TensorrtExecutionProvider``.
    threads : int, optional
        Intra-op threads (default: onnxruntime's choice, all cores).
    """

    def __init__(self, model: Path, provider: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        if provider not in ort.get_available_providers():
            raise BackendUnavailableError(f"onnxruntime here has no {provider}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers: list[Any] = [provider]
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(model), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendUnavailableError(f"{provider} failed to load: {exc}") from exc
        if self.session.get_providers()[0] != provider:
            raise BackendUnavailableError(f"{provider} did not initialise")
        self.input_name = self.session.get_inputs()[0].name
        self.name = _SHORT[provider]

    def run(self, batch: FloatArray) -> list[FloatArray]:
        """Run the session; outputs in the model's order."""
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return [np.asarray(o, dtype=np.float32) for o in outputs]
