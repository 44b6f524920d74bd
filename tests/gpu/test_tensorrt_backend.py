"""TensorRT and CUDA backends agree with onnxruntime CPU (runs only where a GPU is present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.backends.onnx import OnnxBackend
from pipelines.manifest import (
    STAGE1_NAME,
    STAGE2_NAME,
    STAGE2_SCORE_NAME,
    WEIGHTS_DIR,
    load_manifest,
)

pytestmark = pytest.mark.gpu


def _gpu_available() -> bool:
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


def _batch(manifest: dict[str, object], n: int) -> np.ndarray:
    shape = [n, *manifest["inputs"][0]["shape"][1:]]  # type: ignore[index]
    shape = [d if isinstance(d, int) and d > 0 else 64 for d in shape]
    return np.random.default_rng(0).uniform(-1, 1, size=shape).astype(np.float32)


@pytest.mark.parametrize("name", [STAGE1_NAME, STAGE2_NAME, STAGE2_SCORE_NAME])
@pytest.mark.parametrize(("fp16", "tolerance"), [(False, 1e-3), (True, 3e-2)])
def test_tensorrt_engines_match_onnxruntime_and_are_cached(
    name: str, fp16: bool, tolerance: float, tmp_path: Path
) -> None:
    pytest.importorskip("tensorrt")
    if not _gpu_available():
        pytest.skip("no CUDA device")
    from pipelines.backends.tensorrt import TensorRTBackend

    manifest = load_manifest(name)
    model = WEIGHTS_DIR / str(manifest["file"])
    batch = _batch(manifest, 4)
    reference = OnnxBackend(model, "CPUExecutionProvider").run(batch)
    engine = TensorRTBackend(model, tmp_path, fp16=fp16)
    got = engine.run(batch)
    for ref, out in zip(reference, got, strict=True):
        diff = float(np.abs(ref - out).max())
        print(f"{name} fp16={fp16}: largest difference {diff:.2e} (tolerance {tolerance})")
        assert diff <= tolerance
    cached = list(tmp_path.glob("*.engine"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    TensorRTBackend(model, tmp_path, fp16=fp16)
    assert cached[0].stat().st_mtime_ns == stamp


def test_the_cuda_execution_provider_matches_cpu() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDA")
    manifest = load_manifest(STAGE2_NAME)
    model = WEIGHTS_DIR / str(manifest["file"])
    batch = _batch(manifest, 8)
    cpu = OnnxBackend(model, "CPUExecutionProvider").run(batch)
    gpu = OnnxBackend(model, "CUDAExecutionProvider").run(batch)
    for a, b in zip(cpu, gpu, strict=True):
        assert float(np.abs(a - b).max()) <= 1e-3
