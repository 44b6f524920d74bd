# syntax=docker/dockerfile:1
# The NoduleAI node: DICOM SCP, completeness, job publisher, result delivery, dashboard and API.
#   docker build -f docker/node.Dockerfile -t noduleai/node .
# Entry point `noduleai`; default command `node` (no workers in this container: see worker.Dockerfile).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- wheels: build once, copy nothing else
FROM ${PYTHON_IMAGE} AS wheels
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY pipelines ./pipelines
COPY models ./models
RUN pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS node
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NODULEAI_DATA_DIR=/var/lib/noduleai \
    NODULEAI_DICOM_HOST=0.0.0.0 \
    NODULEAI_DICOM_PORT=11112 \
    NODULEAI_HTTP_HOST=0.0.0.0 \
    NODULEAI_HTTP_PORT=8080
RUN groupadd --system --gid 10001 noduleai \
 && useradd --system --uid 10001 --gid noduleai --home-dir /var/lib/noduleai --create-home \
        --shell /usr/sbin/nologin noduleai
# The wheels are bind-mounted, not copied: they never become a layer of this image.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels noduleai
USER noduleai:noduleai
WORKDIR /var/lib/noduleai
VOLUME ["/var/lib/noduleai"]
EXPOSE 11112 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NODULEAI_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["noduleai"]
CMD ["node"]
