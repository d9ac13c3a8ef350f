# syntax=docker/dockerfile:1
#
# redflow worker image: runs `python -m redflow.supervisor` as an unprivileged user.
#
#   docker build -t redflow:dev .
#   docker run --rm -e REDIS_URL=redis://redis.example:6379 -e REDFLOW_IMPORT=workflows \
#       -v "$PWD/examples/compose_app:/app:ro" -p 8080:8080 redflow:dev --procs 2
#
# Arguments after the image name go to the supervisor (see `--help`); every option also has an
# environment variable (REDFLOW_PROCS, REDFLOW_IMPORT, ...). Put your workflow modules in /app, which
# is on PYTHONPATH, by mounting them or with an image of your own that starts FROM this one.
# See docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a wheel of redflow, plus wheels of everything it depends on ------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip wheel --wheel-dir /wheels .

# --- runtime: a virtualenv holding only redflow and its dependencies ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV VIRTUAL_ENV=/opt/redflow \
    PATH=/opt/redflow/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The wheels are bind-mounted from the build stage, so none of them stays in a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/python" -m pip install --no-cache-dir --no-index --find-links /wheels \
        /wheels/redflow-*.whl \
    && groupadd --system --gid 10001 redflow \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin redflow
WORKDIR /app

# Defaults for the supervisor; override any of them with -e / env / a ConfigMap.
ENV REDFLOW_HTTP_PORT=8080 \
    REDFLOW_LOG_FORMAT=json \
    REDFLOW_GRACE_PERIOD=30

# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080

# Docker and compose only (Kubernetes uses the probes in deploy/kubernetes/). The image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REDFLOW_HTTP_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["python", "-m", "redflow.supervisor"]
