#!/usr/bin/env bash
# `make down`: stop what `make up` started (pidfiles in LOCAL_DIR): SIGTERM, wait, SIGKILL after a timeout.
#   STOP_TIMEOUT  seconds to wait after SIGTERM (default: MRC_DRAIN_TIMEOUT_S, 60, + 15)
set -euo pipefail
# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

drain="${MRC_DRAIN_TIMEOUT_S:-60}"
STOP_TIMEOUT="${STOP_TIMEOUT:-$(( ${drain%.*} + 15 ))}"
status=0
stop trainer "$STOP_TIMEOUT" || status=1
stop reward "$STOP_TIMEOUT" || status=1
exit "$status"
