#!/usr/bin/env bash
# CI hook "bootstrap": called by the CI workflow; replace the body with this project's command.
# `deksdenflow setup --run-discovery` (or `/init` with discovery) proposes one for your stack.
set -euo pipefail
echo "bootstrap: nothing configured yet"
