# syntax=docker/dockerfile:1
# DeksdenFlow: one image for the API (`serve`), the workers (`worker`) and `migrate`.

# --- the Codex CLI from npm (its Linux binary ships inside the package) ---------------------
FROM node:20-bookworm-slim AS codex
RUN npm install -g --no-audit --no-fund --loglevel=error @openai/codex@0.169.0

# --- Python dependencies in a venv, built where compilers may live ------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY engines ./engines
# install the project to pull its dependencies, then drop it: the runtime runs from /app,
# where migrations/, prompts/ and schemas/ sit beside the package as bot/migrate.py expects
RUN pip install . && pip uninstall -y deksdenflow

# --- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim
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
    DEKSDENFLOW_CODEX_BIN=/usr/local/bin/codex \
    DEKSDENFLOW_LOG_JSON=true \
    CODEX_HOME=/home/deksdenflow/.codex
USER deksdenflow
VOLUME ["/data"]
EXPOSE 8000
# the worker image is the same: compose disables this check for it
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["python", "-m", "bot"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
