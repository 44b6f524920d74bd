"""Backend selection: the configured backend or the next that loads, with the reasons logged."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pipelines.backends import BackendUnavailableError, load_backend
from pipelines.backends.tensorrt import MAX_BATCH, engine_path, profile_shapes


def _tiny_model(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_auto_falls_back_to_onnxruntime_cpu_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _tiny_model(tmp_path / "tiny.onnx")
    caplog.set_level(logging.INFO, logger="pipelines.backends")
    backend = load_backend(model, "auto", tmp_path / "engines")
    assert backend.name == "onnxruntime-cpu"
    out = backend.run(np.array([[-1.0, 0.0, 2.0]], np.float32))
    assert out[0].tolist() == [[0.0, 0.0, 2.0]]
    if "fallback from" in caplog.text:  # machines without TensorRT or CUDA say why
        assert "tensorrt:" in caplog.text and "onnx-cuda:" in caplog.text


def test_a_backend_that_cannot_load_anywhere_is_an_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(BackendUnavailableError, match="no backend could load"):
        load_backend(broken, "onnx-cpu", tmp_path)


def test_engines_are_keyed_by_model_tensorrt_version_gpu_and_precision(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model one")
    a = engine_path(tmp_path, model, "10.3.0", "NVIDIA H100 80GB HBM3", fp16=False)
    assert a.name.startswith("m-") and "trt10.3.0" in a.name and "nvidia-h100" in a.name
    assert a != engine_path(tmp_path, model, "10.3.0", "NVIDIA H100 80GB HBM3", fp16=True)
    assert a != engine_path(tmp_path, model, "10.4.0", "NVIDIA H100 80GB HBM3", fp16=False)
    assert a != engine_path(tmp_path, model, "10.3.0", "NVIDIA L4", fp16=False)
    model.write_bytes(b"model two")
    assert a != engine_path(tmp_path, model, "10.3.0", "NVIDIA H100 80GB HBM3", fp16=False)


def test_tensorrt_profiles_cover_the_dynamic_batch_and_stage_1_in_plane_size() -> None:
    stage1 = profile_shapes((-1, 9, -1, -1))  # stage 1: batch, slices, height, width
    assert stage1[0] == (1, 9, 8, 8) and stage1[2] == (MAX_BATCH, 9, 640, 640)
    assert stage1[0] <= stage1[1] <= stage1[2]
    stage2 = profile_shapes((-1, 1, 32, 32, 32))  # stage 2: only the batch is dynamic
    assert [p[1:] for p in stage2] == [(1, 32, 32, 32)] * 3
    assert [p[0] for p in stage2] == [1, MAX_BATCH // 4, MAX_BATCH]
