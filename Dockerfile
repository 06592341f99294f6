# syntax=docker/dockerfile:1
#
# One image for every crux_workers process: `db upgrade`, `worker`, `beat`, `ingress`.
# The command picks the role; configuration comes from CRUX_* environment variables.
#
#   docker build -t crux-workers .
#   docker run --rm crux-workers --help
#
# Your own flows: build FROM this image and COPY your package next to examples/
# (WORKDIR /app is on PYTHONPATH), then run `worker --import yourapp.flows`.

# ---- build: wheels for the package and every dependency ---------------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel is built from: a change under tests/ or docs/ keeps this layer cached.
COPY pyproject.toml README.md ./
COPY crux_workers ./crux_workers

# Optional extras of the package, e.g. --build-arg EXTRAS=ai
ARG EXTRAS=""
RUN pip wheel --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

# ---- runtime ------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1: it forwards SIGTERM to crux-workers (a PID 1 without a handler would
# ignore it) and reaps orphaned children of user code. Docker and Kubernetes alike.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid, so Kubernetes `runAsNonRoot` can verify it without a user database.
RUN groupadd --system --gid 10001 crux \
 && useradd --system --uid 10001 --gid crux --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin crux

# Every wheel built above (the package, its dependencies, the chosen extras), offline.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels /wheels/*.whl \
 && crux-workers --help >/dev/null

WORKDIR /app
# Owned by root and read-only to the crux user: the code it runs is not its to change.
COPY examples ./examples

# `--import examples.onboarding` resolves from /app; the module to run is chosen by the
# compose file or the Kubernetes manifests (APP_MODULE there), not baked in here.
ENV PYTHONPATH=/app

USER 10001:10001

# Celery's warm shutdown on SIGTERM finishes running tasks before the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "crux-workers"]
CMD ["--help"]
