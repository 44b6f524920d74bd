# syntax=docker/dockerfile:1
# NoduleAI inference workers. Two targets:
#   worker-gpu  NVIDIA TensorRT base, the `gpu` extra (TensorRT, pycuda, onnxruntime-gpu)
#               docker build -f docker/worker.Dockerfile --target worker-gpu -t noduleai/worker-gpu .
#   worker-cpu  python:3.11-slim, onnxruntime on CPU
#               docker build -f docker/worker.Dockerfile --target worker-cpu -t noduleai/worker-cpu .
# A worker has no HTTP port: its health check asks the database whether this container's worker
# recorded a heartbeat recently (docker/healthcheck_worker.py).

# NGC TensorRT images from 24.10 on are Ubuntu 24.04 with Python 3.12 (the project needs >= 3.11).
ARG TENSORRT_TAG=25.01
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- CPU wheels
FROM ${PYTHON_IMAGE} AS wheels-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY pipelines ./pipelines
COPY models ./models
RUN pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------- GPU wheels (built against the TensorRT image's Python and CUDA)
FROM nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}-py3 AS wheels-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# --system-site-packages: the image's own TensorRT Python bindings satisfy the `tensorrt` requirement.
RUN python3 -m venv --system-site-packages /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY pipelines ./pipelines
COPY models ./models
RUN /opt/venv/bin/pip wheel --wheel-dir /wheels '.[gpu]'

# ---------------------------------------------------------------- GPU worker
FROM nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}-py3 AS worker-gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    NODULEAI_DATA_DIR=/var/lib/noduleai \
    NODULEAI_BACKEND=auto
RUN python3 -m venv --system-site-packages /opt/venv
RUN --mount=type=bind,from=wheels-gpu,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels 'noduleai[gpu]'
RUN groupadd --system --gid 10001 noduleai \
 && useradd --system --uid 10001 --gid noduleai --home-dir /var/lib/noduleai --create-home \
        --shell /usr/sbin/nologin noduleai
COPY --chmod=0555 docker/healthcheck_worker.py /usr/local/bin/noduleai-worker-healthcheck
USER noduleai:noduleai
WORKDIR /var/lib/noduleai
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/noduleai-worker-healthcheck"]
ENTRYPOINT ["noduleai"]
CMD ["worker"]

# ---------------------------------------------------------------- CPU worker (last: the default target)
FROM ${PYTHON_IMAGE} AS worker-cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NODULEAI_DATA_DIR=/var/lib/noduleai \
    NODULEAI_BACKEND=onnx-cpu
RUN groupadd --system --gid 10001 noduleai \
 && useradd --system --uid 10001 --gid noduleai --home-dir /var/lib/noduleai --create-home \
        --shell /usr/sbin/nologin noduleai
RUN --mount=type=bind,from=wheels-cpu,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels noduleai
COPY --chmod=0555 docker/healthcheck_worker.py /usr/local/bin/noduleai-worker-healthcheck
USER noduleai:noduleai
WORKDIR /var/lib/noduleai
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/noduleai-worker-healthcheck"]
ENTRYPOINT ["noduleai"]
CMD ["worker"]
