# syntax=docker/dockerfile:1
# One image for every fleetline process: `fleetline migrate|ingest|api|rules`.
#   docker build -t fleetline:0.1.0 .
# Settings come from FLEETLINE_* environment variables (a ConfigMap and a Secret in
# Kubernetes, see deploy/k8s/); the files it carries beside the code are the package's
# data (migrations, and the broker config and plugin source for `fleetline up`).

# The Python the project targets and tests (pyproject.toml: requires-python, ruff and
# mypy targets).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The context is allow-listed by .dockerignore: pyproject.toml, the packages, migrations/
# and the broker files the package carries as data. Every dependency ships manylinux
# wheels, so no compiler is needed here.
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
 && pip check

FROM python:${PYTHON_VERSION}-slim-bookworm
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 fleetline \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin fleetline
# Same base image in both stages, so the venv's interpreter path stays valid.
COPY --from=build /opt/venv /opt/venv
# The migrations travel with the package (/opt/venv/share/fleetline/migrations, found by
# fleetline/files.py); FLEETLINE_MIGRATIONS_DIR may point elsewhere.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLEETLINE_LOG_FORMAT=json
WORKDIR /app
USER 10001:10001
# api 8000 (its probes/metrics 9102); ingest probes/metrics 9101; rules probes/metrics 9103.
EXPOSE 8000 9101 9102 9103
ENTRYPOINT ["fleetline"]
CMD ["--help"]
