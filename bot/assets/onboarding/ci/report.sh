#!/usr/bin/env bash
# Report a CI result to DeksdenFlow: report.sh running|success|failure [failing-check ...]
#
# Needs DEKSDENFLOW_CI_URL (https://<bot>/webhooks/ci) and DEKSDENFLOW_WEBHOOK_TOKEN; without
# them it prints "skip" and succeeds, so CI stays green where the hook is not wanted.
# The branch and sha come from GitHub Actions or GitLab CI variables unless given as
# DEKSDENFLOW_BRANCH / DEKSDENFLOW_SHA.
set -euo pipefail

status="${1:-}"
case "$status" in
  running|success|failure) ;;
  *) echo "usage: $0 running|success|failure [failing-check ...]" >&2; exit 2 ;;
esac
shift || true

if [ -z "${DEKSDENFLOW_CI_URL:-}" ] || [ -z "${DEKSDENFLOW_WEBHOOK_TOKEN:-}" ]; then
  echo "skip: DEKSDENFLOW_CI_URL or DEKSDENFLOW_WEBHOOK_TOKEN is not set"
  exit 0
fi

branch="${DEKSDENFLOW_BRANCH:-${GITHUB_HEAD_REF:-${CI_MERGE_REQUEST_SOURCE_BRANCH_NAME:-${CI_COMMIT_REF_NAME:-${GITHUB_REF_NAME:-}}}}}"
sha="${DEKSDENFLOW_SHA:-${CI_COMMIT_SHA:-${GITHUB_SHA:-}}}"
project="${DEKSDENFLOW_PROJECT:-${GITHUB_REPOSITORY:-${CI_PROJECT_PATH:-}}}"

json_string() {
  # JSON-escape backslashes, quotes and control characters
  printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr -d '\000-\037' | sed -e 's/^/"/' -e 's/$/"/'
}

failing="["
sep=""
for name in "$@"; do
  failing="$failing$sep$(json_string "$name")"
  sep=","
done
failing="$failing]"

body="{\"branch\":$(json_string "$branch"),\"status\":\"$status\",\"failing\":$failing"
[ -n "$sha" ] && body="$body,\"sha\":$(json_string "$sha")"
[ -n "$project" ] && body="$body,\"project\":$(json_string "$project")"
body="$body}"

signature="sha256=$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$DEKSDENFLOW_WEBHOOK_TOKEN" | sed 's/^.*= *//')"

curl --silent --show-error --fail-with-body --max-time 30 \
  -H "Content-Type: application/json" \
  -H "X-DeksdenFlow-Signature: $signature" \
  --data-binary "$body" \
  "$DEKSDENFLOW_CI_URL"
echo
