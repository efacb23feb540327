# syntax=docker/dockerfile:1
#
# tasklane's image: the project and its locked dependencies in a virtual environment, on a slim
# Python, run by an unprivileged user. `tasklane` is on PATH; the default command is a worker.
#
#   docker build -t tasklane .
#   docker run --rm -e DATABASE_URL=… -e REDIS_URL=… tasklane              # a worker
#   docker run --rm -e DATABASE_URL=… -e REDIS_URL=… tasklane tasklane stats
#
# Your own agents: build FROM this image and set TASKLANE_AGENTS (examples/derived-image/).
# The installed package is `tasklane` alone (its modules live under it), so a module of yours
# named worker, domain or persistence never collides with it.
#
# The build stage and the runtime stage use the same Python image, so the virtual environment's
# interpreter path (/usr/local/bin/python3) is valid in both.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The uv that wrote uv.lock; a newer one reads it too.
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# -- build: resolve nothing, install exactly what uv.lock says ---------------------------------------
FROM ${PYTHON_IMAGE} AS build

COPY --from=uv /uv /usr/local/bin/uv

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when the lock file changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --extra web --no-install-project

# Then the project itself, installed as a regular (non-editable) package: the runtime stage
# needs the virtual environment only, not the source tree.
COPY . /src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra web --no-editable

# -- runtime -----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="tasklane" \
      org.opencontainers.image.description="A background task worker for agent systems: arq for dispatch, PostgreSQL as the record of truth."

# tini is PID 1: it forwards SIGTERM to the command and reaps zombies. Without it the command
# would be PID 1, and the kernel drops a signal that PID 1 installed no handler for: `docker
# stop` would do nothing during `tasklane migrate` or a worker's start-up, until the SIGKILL.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 tasklane \
    && useradd --system --uid 10001 --gid tasklane --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin tasklane

COPY --from=build --chown=root:root /app/.venv /app/.venv

ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json

WORKDIR /app
USER tasklane:tasklane

# The worker stops taking jobs on SIGTERM and hands back what it cannot finish within
# TASKLANE_SHUTDOWN_GRACE_SECONDS: give it longer than that before a SIGKILL
# (`docker stop --time`, compose's `stop_grace_period`, Kubernetes'
# `terminationGracePeriodSeconds`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["tasklane", "worker"]
