#!/usr/bin/env bash
# Report a CI result to DeksdenFlow: report.sh running|success|failure [failing-check ...]
#
# Needs DEKSDENFLOW_CI_URL (https://<bot>/webhooks/ci) and DEKSDENFLOW_WEBHOOK_TOKEN; without
# them it prints "skip" and succeeds, so CI stays green where the hook is not wanted.
# The branch and sha come from GitHub Actions or GitLab CI variables unless given as
# DEKSDENFLOW_BRANCH / DEKSDENFLOW_SHA.
#
# On failure it also sends the failing stage and the tail of its log, so the next attempt of the
# step sees why CI failed: DEKSDENFLOW_FAILED_STAGE and DEKSDENFLOW_FAILED_LOG (a file) when
# set, else what the CI templates' run_hook recorded in .deksdenflow-ci/ (the stage it started
# last, and that stage's log). DEKSDENFLOW_LOG_TAIL_BYTES (default 16384) bounds the tail.
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

log_string() {
  # a log as one JSON string: newlines and tabs kept as \n and \t, other control bytes dropped
  LC_ALL=C sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' "$1" | LC_ALL=C tr -d '\000-\010\013-\037' \
    | LC_ALL=C awk 'BEGIN { printf "\"" } { printf "%s\\n", $0 } END { printf "\"" }'
}

stage_field=""
log_field=""
if [ "$status" = "failure" ]; then
  ci_dir="${DEKSDENFLOW_CI_DIR:-.deksdenflow-ci}"
  stage="${DEKSDENFLOW_FAILED_STAGE:-}"
  if [ -z "$stage" ] && [ -f "$ci_dir/stage" ]; then stage="$(head -n 1 "$ci_dir/stage")"; fi
  log_file="${DEKSDENFLOW_FAILED_LOG:-}"
  if [ -z "$log_file" ] && [ -n "$stage" ] && [ -f "$ci_dir/$stage.log" ]; then log_file="$ci_dir/$stage.log"; fi
  [ -n "$stage" ] && stage_field=",\"stage\":$(json_string "$stage")"
  if [ -n "$log_file" ] && [ -f "$log_file" ]; then
    tail_file="$(mktemp)"
    # the first line may start inside a character: drop it; iconv drops any other bad bytes
    tail -c "${DEKSDENFLOW_LOG_TAIL_BYTES:-16384}" "$log_file" | tail -n +2 \
      | if command -v iconv > /dev/null; then iconv -c -f UTF-8 -t UTF-8; else cat; fi > "$tail_file"
    log_field=",\"log\":$(log_string "$tail_file")"
    rm -f "$tail_file"
  fi
fi

body="{\"branch\":$(json_string "$branch"),\"status\":\"$status\",\"failing\":$failing$stage_field$log_field"
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
