# syntax=docker/dockerfile:1
# DeksdenFlow: one image for the API (`serve`), the workers (`worker`), `migrate` and `doctor`.
#
# Base images are pinned by version and by digest (the multi-platform index of that tag). To move
# to a newer patch release, look the new digest up (`docker buildx imagetools inspect <tag>`) and
# change both here; the build arguments also let a build override them.
# NOT VERIFIED against the registry: there was no Docker and no registry access where they were
# written. Both digests were cross-checked against several independent public repositories that
# pin the same tag to the same digest (one a BuildKit log resolving it), nothing stronger. A
# wrong digest fails the pull, it never builds another image: on the first build with registry
# access, run `docker buildx imagetools inspect` on both tags and correct them if they differ.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
ARG NODE_IMAGE=node:24.11.1-bookworm-slim@sha256:48abc13a19400ca3985071e287bd405a1d99306770eb81d61202fb6b65cf0b57

# --- the Codex CLI from npm (its Linux binary ships inside the package), on Node 24 LTS ---------
FROM ${NODE_IMAGE} AS codex
RUN npm install -g --no-audit --no-fund --loglevel=error @openai/codex@0.169.0

# --- Python dependencies in a venv, exactly as locked (hashes checked) -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# requirements.lock: pip-compile --generate-hashes of pyproject.toml's dependencies; two builds
# of the same commit install the same files. The project itself is not installed: it runs from
# /app, where migrations/, prompts/ and schemas/ sit beside the package as bot/storage/migrate.py expects.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock

# --- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates libstdc++6 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=codex /usr/local/bin/node /usr/local/bin/node
COPY --from=codex /usr/local/lib/node_modules/@openai/codex /opt/codex
RUN ln -s /opt/codex/bin/codex.js /usr/local/bin/codex
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 deksdenflow \
 && useradd --system --uid 10001 --gid deksdenflow --create-home --home-dir /home/deksdenflow deksdenflow \
 && mkdir -p /data /home/deksdenflow/.codex \
 && chown -R deksdenflow:deksdenflow /data /home/deksdenflow
WORKDIR /app
COPY --chown=root:root . /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEKSDENFLOW_DATA_DIR=/data \
    DEKSDENFLOW_PORT=8000 \
    DEKSDENFLOW_CODEX_BIN=/usr/local/bin/codex \
    DEKSDENFLOW_LOG_JSON=true \
    CODEX_HOME=/home/deksdenflow/.codex
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
# The port is DEKSDENFLOW_PORT, for `serve` and for this check alike; compose disables the check
# for the workers (same image, no server).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DEKSDENFLOW_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m", "bot"]
CMD ["serve", "--host", "0.0.0.0"]
