"""Native TensorRT backend: engines built from the shipped ONNX, cached on disk.

The cache key is model sha256 x TensorRT version x GPU name x precision, so a new model, a
TensorRT upgrade or another GPU model builds a fresh engine instead of loading one that does not
fit. Needs the ``gpu`` extra (tensorrt, pycuda) and an NVIDIA GPU; anything missing raises
:class:`~pipelines.backends.BackendUnavailableError` and the caller falls back.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.backends import BackendUnavailableError, FloatArray

LOGGER = logging.getLogger(__name__)

MAX_BATCH = 64

SPATIAL_RANGE = (8, 256, 640)
"""Optimisation-profile range (min, opt, max) of a dynamic axis other than the batch: stage 1's
in-plane size, the lungs' box on the 1.25 mm grid (640 voxels = 800 mm)."""


def profile_shapes(
    shape: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of an input whose axis 0 is the batch; other dynamic axes (-1)
    take :data:`SPATIAL_RANGE`, fixed ones keep their size."""
    rest = shape[1:]

    def pick(k: int) -> tuple[int, ...]:
        return tuple(d if d > 0 else SPATIAL_RANGE[k] for d in rest)

    return (1, *pick(0)), (MAX_BATCH // 4, *pick(1)), (MAX_BATCH, *pick(2))


def engine_path(cache_dir: Path, model: Path, trt_version: str, gpu: str, fp16: bool) -> Path:
    """Where the engine for this model, TensorRT version, GPU and precision is cached."""
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:16]
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    precision = "fp16" if fp16 else "fp32"
    return cache_dir / f"{model.stem}-{digest}-trt{trt_version}-{gpu_slug}-{precision}.engine"


class TensorRTBackend:
    """A TensorRT engine with a dynamic batch axis (and stage 1's dynamic in-plane size, see
    :func:`profile_shapes`), run on one CUDA stream.

    Parameters
    ----------
    model : Path
        The ONNX file the engine is built from.
    cache_dir : Path
        Engine cache directory.
    fp16 : bool
        Build with FP16 kernels allowed.
    """

    def __init__(self, model: Path, cache_dir: Path, fp16: bool = False) -> None:
        try:
            import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
            import pycuda.driver as cuda
            import tensorrt as trt
        except Exception as exc:  # ImportError, or a CUDA driver error at context creation
            raise BackendUnavailableError(f"TensorRT/pycuda unavailable: {exc}") from exc
        self._cuda = cuda
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        gpu = cuda.Device(0).name()
        path = engine_path(cache_dir, model, trt.__version__, gpu, fp16)
        if not path.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            LOGGER.info("building TensorRT engine %s", path.name)
            path.write_bytes(self._build(model, fp16))
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"cannot deserialise {path.name}")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.name = f"tensorrt-{'fp16' if fp16 else 'fp32'}"

    def _build(self, model: Path, fp16: bool) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model.read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendUnavailableError(f"TensorRT cannot parse {model.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            profile.set_shape(tensor.name, *profile_shapes(tuple(tensor.shape)))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailableError(f"TensorRT failed to build {model.name}")
        return bytes(serialized)

    def run(self, batch: FloatArray) -> list[FloatArray]:
        """Run the engine, splitting batches larger than the profile's maximum."""
        if len(batch) > MAX_BATCH:
            parts = [self.run(batch[i : i + MAX_BATCH]) for i in range(0, len(batch), MAX_BATCH)]
            return [np.concatenate(outs) for outs in zip(*parts, strict=True)]
        cuda = self._cuda
        host_in = np.ascontiguousarray(batch, dtype=np.float32)
        self.context.set_input_shape(self.inputs[0], host_in.shape)
        device: list[Any] = [cuda.mem_alloc(host_in.nbytes)]
        cuda.memcpy_htod_async(device[0], host_in, self.stream)
        self.context.set_tensor_address(self.inputs[0], int(device[0]))
        hosts = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            host = cuda.pagelocked_empty(shape, dtype=np.float32)
            device.append(cuda.mem_alloc(host.nbytes))
            self.context.set_tensor_address(name, int(device[-1]))
            hosts.append(host)
        if not self.context.execute_async_v3(self.stream.handle):
            raise BackendUnavailableError("TensorRT execution failed")
        for host, buffer in zip(hosts, device[1:], strict=True):
            cuda.memcpy_dtoh_async(host, buffer, self.stream)
        self.stream.synchronize()
        return [np.array(h) for h in hosts]
