# shellcheck shell=bash disable=SC2034  # sourced: BIN and STARTED_PID are used by up.sh / down.sh
# Shared by up.sh and down.sh (sourced): where things live, and processes tracked by pidfiles.
# A pidfile holds the pid on line 1 and the process's start time on line 2, so a pid reused by
# another process after a crash is never signalled.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${VENV_BIN:-$ROOT/.venv/bin}"
LOCAL_DIR="${LOCAL_DIR:-$ROOT/out/local}"
mkdir -p "$LOCAL_DIR"
LOCAL_DIR="$(cd "$LOCAL_DIR" && pwd)"

# proc_start PID: the start time of PID (empty if there is no such process).
proc_start() {
  ps -o lstart= -p "$1" 2>/dev/null | sed 's/^ *//; s/ *$//'
}

# group_alive PGID: true while any process of the group is alive (zombies excluded).
group_alive() {
  ps -e -o pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

# pid_alive PID: true while PID is alive (zombies excluded).
pid_alive() {
  local stat
  stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
  [ -n "$stat" ] && [[ "$stat" != Z* ]]
}

# tracked NAME: prints the pid from NAME's pidfile if that process is still the one we started.
tracked() {
  local file="$LOCAL_DIR/$1.pid" pid start
  [ -f "$file" ] || return 1
  { read -r pid; read -r start; } <"$file" || true
  [ -n "${pid:-}" ] || return 1
  if [ -n "$start" ] && [ "$(proc_start "$pid")" = "$start" ] && pid_alive "$pid"; then
    echo "$pid"
    return 0
  fi
  if group_alive "$pid"; then  # the leader exited but processes it started in its group live on
    echo "$pid"
    return 0
  fi
  return 1
}

# start_bg NAME LOG CMD...: run CMD in the background in its own session (process group), record it
# in NAME's pidfile; its pid is left in STARTED_PID (the process stays a child of the calling shell).
start_bg() {
  local name="$1" log="$2" pid
  shift 2
  if command -v setsid >/dev/null 2>&1; then
    setsid "$@" </dev/null >>"$log" 2>&1 &
  else
    "$@" </dev/null >>"$log" 2>&1 &
  fi
  pid=$!
  printf '%s\n%s\n' "$pid" "$(proc_start "$pid")" >"$LOCAL_DIR/$name.pid"
  STARTED_PID="$pid"
}

# stop NAME TIMEOUT: SIGTERM NAME's process group, wait up to TIMEOUT seconds, then SIGKILL it.
stop() {
  local name="$1" timeout="$2" file="$LOCAL_DIR/$1.pid" pid target deadline
  if ! pid="$(tracked "$name")"; then
    [ -f "$file" ] && echo "$name: not running (stale pidfile removed)"
    rm -f "$file"
    return 0
  fi
  target="$pid"
  if [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] || ! pid_alive "$pid"; then
    target="-$pid"  # its own process group (setsid): signal every process in it
  fi
  echo "$name: SIGTERM to pid $pid (waiting up to ${timeout}s)"
  kill -TERM -- "$target" 2>/dev/null || true
  deadline=$((SECONDS + timeout))
  while group_alive "$pid" || pid_alive "$pid"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$name: still running after ${timeout}s: SIGKILL"
      kill -KILL -- "$target" 2>/dev/null || true
      kill -KILL -- "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  if group_alive "$pid" || pid_alive "$pid"; then
    echo "$name: could not stop pid $pid" >&2
    return 1
  fi
  rm -f "$file"
  echo "$name: stopped"
}
