#!/usr/bin/env bash
# Stops what env-up.sh started and leaves no process behind.
set -euo pipefail
cd "$(dirname "$0")/../.."
pidfile=.dev/rp-env.pid
[[ -f $pidfile ]] || { echo "environment not running"; exit 0; }
pid=$(cat "$pidfile")
if kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  # rp-env runs in its own session; anything left in its process group goes too.
  kill -KILL -- "-$pid" 2>/dev/null || true
fi
rm -f "$pidfile" .dev/env
echo "environment down"
