#!/usr/bin/env bash
# Starts the local environment (real control plane + KubeVirt and CircleCI
# simulators: tests/support/src/bin/rp-env.rs) in the background and waits
# until it is up. Writes DIR/kubeconfig, DIR/control-plane.pids and, last,
# DIR/env (source it). Stop it with env-down.sh.
#
#   tests/support/env-up.sh [rp-env args...]     e.g. --time-scale 120 --boot-latency 30s --seed 7
#
# Environment:
#   RP_DEV_DIR      the directory (default: <repo>/.dev)
#   RP_ENV_BIN      the rp-env binary (default: ${CARGO_TARGET_DIR:-<repo>/target}/debug/rp-env;
#                   build it with `cargo build -p rp-testenv --bin rp-env`)
#   RP_ENV_ARGS     more rp-env arguments (word-split)
#   RP_ENV_TIMEOUT  seconds to wait for DIR/env (default 180)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
dev="$(abs "${RP_DEV_DIR:-$root/.dev}")"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$(abs "${RP_ENV_BIN:-$target/debug/rp-env}")"
timeout="${RP_ENV_TIMEOUT:-180}"

if [[ ! -x $bin ]]; then
  echo "env-up: $bin not found; build it with: cargo build -p rp-testenv --bin rp-env (or: make env-up)" >&2
  exit 1
fi
mkdir -p "$dev"
pidfile="$dev/rp-env.pid"
if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "env-up: already up (pid $(cat "$pidfile"), $dev); run env-down.sh (make env-down) first" >&2
  exit 1
fi
rm -f "$dev/env" "$dev/kubeconfig" "$dev/control-plane.pids" "$pidfile"

# Its own session (setsid): no terminal signals, its own process group.
# shellcheck disable=SC2086 # RP_ENV_ARGS is word-split on purpose
setsid nohup "$bin" --dir "$dev" ${RP_ENV_ARGS:-} "$@" >"$dev/rp-env.log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"
echo "env-up: starting rp-env (pid $pid), log: $dev/rp-env.log"

deadline=$((SECONDS + timeout))
while ((SECONDS < deadline)); do
  if [[ -f $dev/env ]]; then
    # shellcheck disable=SC1091
    (
      . "$dev/env"
      echo "env-up: environment up in $((SECONDS))s (pid $pid)"
      echo "  kube-apiserver:   $(sed -n 's/^ *server: //p' "$KUBECONFIG" | head -n1)"
      echo "  CircleCI sim:     $CIRCLECI_SIM_URL (control API: $CIRCLECI_SIM_CONTROL_URL)"
      echo "  resource class:   $CIRCLECI_RESOURCE_CLASS; time scale: ${RP_TIME_SCALE}x"
      echo "  demo namespace:   $RP_DEMO_NAMESPACE (Secrets circleci-api and sim-linux-runner, key token)"
      echo "  control plane:    logs in $RP_CONTROL_PLANE_DIR"
    )
    echo "Use it:"
    echo "  source $dev/env"
    echo "  kubectl get vmpools,vms,vmis -A"
    echo "  curl -s -H \"Circle-Token: \$CIRCLECI_API_TOKEN\" \"\$CIRCLECI_SIM_URL/api/v3/runner/tasks?resource-class=\$CIRCLECI_RESOURCE_CLASS\""
    echo "  curl -s -X POST \"\$CIRCLECI_SIM_CONTROL_URL/tasks\" -d '{\"resource_class\":\"sim-org/linux\",\"duration_secs\":600,\"count\":3}' -H 'content-type: application/json'"
    echo "Stop it: tests/support/env-down.sh (make env-down)"
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "env-up: rp-env exited before it was up; its log:" >&2
    cat "$dev/rp-env.log" >&2
    rm -f "$pidfile"
    exit 1
  fi
  sleep 0.2
done
echo "env-up: timed out after ${timeout}s waiting for $dev/env; see $dev/rp-env.log (still running: stop it with env-down.sh)" >&2
exit 1
