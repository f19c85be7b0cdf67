#!/usr/bin/env bash
# Stops what env-up.sh started and leaves no process behind: SIGTERM to
# rp-env (it stops its simulators and the control plane, and removes
# DIR/env), SIGKILL after RP_ENV_STOP_TIMEOUT seconds (default 30), then
# SIGKILL to any control-plane process listed in DIR/control-plane.pids that
# is still alive.
#
# Environment: RP_DEV_DIR (default: <repo>/.dev), as for env-up.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
dev="$(abs "${RP_DEV_DIR:-$root/.dev}")"
stop_timeout="${RP_ENV_STOP_TIMEOUT:-30}"
pidfile="$dev/rp-env.pid"
pidsfile="$dev/control-plane.pids"
if [[ ! -f $pidfile ]]; then
  echo "env-down: environment not running ($pidfile missing)"
  exit 0
fi
pid="$(cat "$pidfile")"
# Read the children before rp-env removes the list.
children=()
if [[ -f $pidsfile ]]; then
  while read -r name cpid; do children+=("$name:$cpid"); done <"$pidsfile"
fi

# Is $1 still the process we started ($2 in its command line)? A zombie has
# an empty command line and counts as gone.
ours() { [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "$2"; }

if ours "$pid" rp-env; then
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < stop_timeout * 10; i++)); do
    ours "$pid" rp-env || break
    sleep 0.1
  done
  if ours "$pid" rp-env; then
    echo "env-down: rp-env (pid $pid) did not stop in ${stop_timeout}s; killing it" >&2
    # rp-env runs in its own session: its process group goes with it.
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
fi
# Control-plane processes have their own process groups and die with rp-env
# (PR_SET_PDEATHSIG); make sure of it.
for entry in "${children[@]}"; do
  name="${entry%%:*}" cpid="${entry#*:}"
  for ((i = 0; i < 50; i++)); do ours "$cpid" "$name" || break; sleep 0.1; done
  if ours "$cpid" "$name"; then
    echo "env-down: $name (pid $cpid) still running; killing it" >&2
    kill -KILL "$cpid" 2>/dev/null || true
  fi
done
rm -f "$pidfile" "$dev/env" "$dev/kubeconfig" "$pidsfile"
echo "env-down: environment down"
