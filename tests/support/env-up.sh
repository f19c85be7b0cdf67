#!/usr/bin/env bash
# Starts the local environment (real control plane + KubeVirt and CircleCI
# simulators) in the background. Writes .dev/kubeconfig and .dev/env.
set -euo pipefail
cd "$(dirname "$0")/../.."
dev=.dev
mkdir -p "$dev"
if [[ -f $dev/rp-env.pid ]] && kill -0 "$(cat $dev/rp-env.pid)" 2>/dev/null; then
  echo "env already up (pid $(cat $dev/rp-env.pid)); 'make env-down' first" >&2
  exit 1
fi
rm -f "$dev/env" "$dev/kubeconfig"
bin="${CARGO_TARGET_DIR:-target}/debug/rp-env"
setsid nohup "$bin" --dir "$dev" ${RP_ENV_ARGS:-} >"$dev/rp-env.log" 2>&1 < /dev/null &
echo $! > "$dev/rp-env.pid"
for _ in $(seq 1 600); do
  if [[ -f $dev/env ]]; then
    echo "environment up (pid $(cat $dev/rp-env.pid)). Use it with:"
    echo "  source $dev/env && kubectl get vmpools,vms,runnerpools -A"
    cat "$dev/env"
    exit 0
  fi
  if ! kill -0 "$(cat $dev/rp-env.pid)" 2>/dev/null; then
    echo "rp-env exited; its log:" >&2
    cat "$dev/rp-env.log" >&2
    rm -f "$dev/rp-env.pid"
    exit 1
  fi
  sleep 0.2
done
echo "timed out waiting for $dev/env; see $dev/rp-env.log" >&2
exit 1
