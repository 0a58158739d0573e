#!/usr/bin/env bash
# Submit one qwenbatch run to a Ray cluster, stream its logs, and exit with the job's status
# (`ray job submit` exits 1 when the job fails). The command of jobs/crontab.
#
#   RAY_ADDRESS=http://HEAD:8265 jobs/nightly.sh CONFIG [--date DAY] [--force] [key.path=value ...]
#
# CONFIG's input.path and output.path hold {date} templates (see jobs/nightly.yaml). Everything
# after CONFIG goes to `qwenbatch run` unchanged; without --date the job takes today's date on the
# cluster. A cluster with token authentication also needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:?usage: jobs/nightly.sh CONFIG [--date DAY] [--force] [key.path=value ...]}"
shift
exec ray job submit \
  --submission-id "qwenbatch-nightly-$(date +%Y%m%d-%H%M%S)" \
  --runtime-env jobs/runtime_env.yaml \
  --working-dir . \
  -- python jobs/run.py --config "$config" "$@"
