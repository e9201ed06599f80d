#!/usr/bin/env bash
# Scheduled retraining of one bloger workspace: new interactions and items in, a warm-started model out.
#
#   examples/cron/retrain.sh CONFIG WORKSPACE [LOG]
#
# crontab (nightly at 02:30; cron mails the one-line reason when the exit code is not 0):
#   30 2 * * *  cd /srv/reco && PATH=/srv/reco/.venv/bin:$PATH examples/cron/retrain.sh retrain.toml work logs/retrain.log
#
# CONFIG's [prepare] section reads the raw files your pipeline appends to (e.g. source = "table").
# Each run: prepare (the new interactions) -> embed (the cache encodes only new or changed item text)
# -> tokenize and train-bilevel, both --warm-start from the last run's tokenizer and model (kept in
# WORKSPACE/previous/) -> evaluate -> export-ids --compare with the last run's IDs -> recommend: every
# user's next items with the new model, to RECS (default WORKSPACE/recommendations.parquet; replaced
# atomically, so readers see yesterday's file until today's is complete). The first run, with no
# earlier model, trains from scratch. CONFIG's [recommend] section can set k, exclude_seen, ...
#
# Exit codes: 0 done; 75 another run of this script holds the lock (try later); else the failing
# stage's code (1 data, 2 config, 3 workspace busy, 130 interrupted: rerun, or `train-bilevel --resume`).
# Everything is appended to LOG (default WORKSPACE.retrain.log), stderr gets one line.
set -uo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKSPACE [LOG]" >&2
  exit 2
fi
config=$1 ws=${2%/} log=${3:-${2%/}.retrain.log}
recs=${RECS:-$ws/recommendations.parquet}
mkdir -p "$(dirname "$log")" "$ws"

exec 9>"$ws.retrain.lock"
if ! flock -n 9; then
  echo "retrain: $ws is being retrained by another job (lock $ws.retrain.lock held); try later" >&2
  exit 75
fi
exec 8>&2 >>"$log" 2>&1
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) retrain $ws with $config"

stage() {  # stage NAME ARGS...: run one bloger stage; on failure, one line to the caller and exit
  local name=$1
  shift
  echo "--- bloger $name $*"
  bloger --verbose "$name" -c "$config" -w "$ws" "$@"
  local code=$?
  if [ $code -ne 0 ]; then
    echo "retrain: bloger $name failed with exit code $code"
    echo "retrain: bloger $name failed with exit code $code; see $log" >&8
    exit $code
  fi
}

previous="$ws/previous"
warm=()
if [ -f "$ws/best.pt" ]; then  # snapshot the last run: the warm start and the IDs to compare with
  rm -rf "$previous.tmp" && mkdir -p "$previous.tmp"
  cp "$ws/best.pt" "$ws/trained_tokenizer.pt" "$previous.tmp/" &&
    bloger --quiet export-ids -w "$ws" --from train --out "$previous.tmp/ids.parquet" || {
      echo "retrain: could not snapshot the last run into $previous" >&8
      exit 1
    }
  rm -rf "$previous" && mv "$previous.tmp" "$previous"
  warm=(--warm-start "$previous")
fi

stage prepare
stage embed
stage tokenize "${warm[@]}"
stage train-bilevel "${warm[@]}"
stage evaluate
if [ ${#warm[@]} -gt 0 ]; then
  stage export-ids --from train --out "$ws/ids.parquet" --compare "$previous/ids.parquet"
else
  stage export-ids --from train --out "$ws/ids.parquet"
fi
stage recommend --out "$recs" --force
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) retrain $ws done"
