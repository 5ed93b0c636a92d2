#!/usr/bin/env bash
# `make up`: the reward service (and the trainer, when installed) on this machine, without Docker.
#
#   MRC_PORT=8080           port on 127.0.0.1 (every other MRC_* setting is passed to `mrc serve` too)
#   LOCAL_DIR=out/local     pidfiles, logs and the example grid
#   READY_TIMEOUT=300       seconds to wait for /readyz
#   TRAINER=auto            auto: start carve3d-train if installed; on: required; off: never
#   TRAINER_BIN=.venv/bin/carve3d-train   TRAINER_ARGS="train --run-dir out/local/train ..."
#                           (the trainer gets MRC_URL and MRC_AUTH_TOKEN)
#
# Steps: start `mrc serve` on 127.0.0.1, wait for /readyz, score an example grid through POST /mrc,
# check the /metrics scrape (Prometheus text format, every metric of the Grafana dashboard present),
# start the trainer, print how to score a grid. If a step fails, what was started is stopped again.
set -euo pipefail
# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT="${MRC_PORT:-8080}"
URL="http://127.0.0.1:$PORT"
READY_TIMEOUT="${READY_TIMEOUT:-300}"
TRAINER="${TRAINER:-auto}"
TRAINER_BIN="${TRAINER_BIN:-$BIN/carve3d-train}"
TRAINER_ARGS="${TRAINER_ARGS:-train --run-dir $LOCAL_DIR/train --overwrite --epochs 3 --no-progress}"
HELPER=("$BIN/python" "$ROOT/deploy/local/mrc_local.py")
GRID="$LOCAL_DIR/grid.png"

fail() {
  echo "make up: $*" >&2
  LOCAL_DIR="$LOCAL_DIR" bash "$ROOT/deploy/local/down.sh" >&2 || true
  exit 1
}

case "$TRAINER" in auto | on | off) ;; *) echo "make up: TRAINER must be auto, on or off (got '$TRAINER')" >&2; exit 2 ;; esac
[ -x "$BIN/mrc" ] || { echo "make up: $BIN/mrc not found: run 'make venv' first" >&2; exit 1; }
if pid="$(tracked reward)"; then
  echo "make up: the reward service is already running (pid $pid, $LOCAL_DIR/reward.pid); 'make down' first" >&2
  exit 1
fi
rm -f "$LOCAL_DIR/reward.pid" "$LOCAL_DIR/trainer.pid"
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "make up: something already listens on 127.0.0.1:$PORT; stop it or choose another MRC_PORT" >&2
  exit 1
fi

echo "reward: starting mrc serve on $URL (log: $LOCAL_DIR/reward.log)"
: >"$LOCAL_DIR/reward.log"
start_bg reward "$LOCAL_DIR/reward.log" \
  env MRC_HOST=127.0.0.1 MRC_PORT="$PORT" "$BIN/mrc" serve --host 127.0.0.1 --port "$PORT"
pid="$STARTED_PID"
"${HELPER[@]}" wait-ready "$URL" --timeout "$READY_TIMEOUT" --pid "$pid" --log "$LOCAL_DIR/reward.log" \
  || fail "the reward service did not become ready"

"${HELPER[@]}" example-grid "$GRID" >/dev/null || fail "could not write the example grid"
"${HELPER[@]}" score "$URL" "$GRID" || fail "scoring the example grid failed"
"${HELPER[@]}" scrape-check "$URL" || fail "the metrics scrape check failed"
pid_alive "$pid" || fail "the service (pid $pid) exited; see $LOCAL_DIR/reward.log"

if [ "$TRAINER" = off ]; then
  echo "trainer: skipped (TRAINER=off)"
elif [ ! -x "$TRAINER_BIN" ]; then
  [ "$TRAINER" = on ] && fail "TRAINER=on but $TRAINER_BIN is not installed"
  echo "trainer: skipped: $TRAINER_BIN is not installed (services/trainer; install it into .venv to run it here)"
else
  read -r -a trainer_args <<<"$TRAINER_ARGS"
  : >"$LOCAL_DIR/trainer.log"
  start_bg trainer "$LOCAL_DIR/trainer.log" env MRC_URL="$URL" "$TRAINER_BIN" "${trainer_args[@]}"
  tpid="$STARTED_PID"
  sleep 2
  if pid_alive "$tpid"; then
    echo "trainer: started $TRAINER_BIN ${TRAINER_ARGS} (pid $tpid, MRC_URL=$URL, log: $LOCAL_DIR/trainer.log)"
  else
    rc=0
    wait "$tpid" || rc=$?
    rm -f "$LOCAL_DIR/trainer.pid"
    [ "$TRAINER" = on ] && fail "the trainer exited at once (status $rc); see $LOCAL_DIR/trainer.log"
    echo "trainer: WARNING: $TRAINER_BIN exited at once (status $rc); last lines of $LOCAL_DIR/trainer.log:" >&2
    tail -n 5 "$LOCAL_DIR/trainer.log" >&2 || true
  fi
fi

auth=""
[ -n "${MRC_AUTH_TOKEN:-}" ] && auth=" -H \"Authorization: Bearer \$MRC_AUTH_TOKEN\""
cat <<MSG

The MRC reward service is up: $URL (pid $pid, log $LOCAL_DIR/reward.log)
Score a grid (a 2x2 PNG; an example is at $GRID):
  curl --data-binary @$GRID -H 'content-type: image/png'$auth $URL/mrc
From Python (carve3d_reward.client):
  $BIN/python -c 'import os, pathlib; from carve3d_reward.client import MRCClient; c = MRCClient("$URL", token=os.environ.get("MRC_AUTH_TOKEN")); print(c.score([pathlib.Path("$GRID").read_bytes()])[0])'
Metrics: $URL/metrics   Info: $URL/v1/info
Stop everything: make down
MSG
