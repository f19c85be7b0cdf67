#!/usr/bin/env bash
# Builds the real control plane (kube-apiserver, kube-controller-manager from
# k8s.io/kubernetes, etcd from go.etcd.io/etcd/server/v3) and helm from their Go
# modules into a cache directory keyed by version. Builds only what is missing.
#
#   tests/tools/build.sh            build what is missing, print the bin dir
#   tests/tools/build.sh --print    print the bin dir without building
#
# Cache: $RP_TOOLS_CACHE (default ~/.cache/runner-provisioner/tools).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"
export GOTOOLCHAIN="$GO_TOOLCHAIN" CGO_ENABLED=0 GOFLAGS=-buildvcs=false
cache="${RP_TOOLS_CACHE:-$HOME/.cache/runner-provisioner/tools}"
bin="$cache/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin"
if [[ "${1:-}" == "--print" ]]; then echo "$bin"; exit 0; fi
mkdir -p "$bin"
log() { echo "[tools] $*" >&2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

# ---- kube-apiserver, kube-controller-manager ----
if [[ ! -x "$bin/kube-apiserver" || ! -x "$bin/kube-controller-manager" ]]; then
  log "building kube-apiserver and kube-controller-manager v$KUBE_VERSION (cold: 10-20 min)"
  mod="$work/k8s"; mkdir -p "$mod"
  minor="${KUBE_VERSION#*.}"; minor="${minor%%.*}"
  staging="0.$minor.${KUBE_VERSION##*.}"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them
  # with local paths that a dependent module cannot see: derive the list from
  # this release's own go.mod and replace each with the published v0.X.Y.
  kmod="$(cd "$mod" && go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module runner-provisioner/tools/k8s"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes v$KUBE_VERSION"
    echo
    awk '$2 == "v0.0.0" && $1 ~ /^k8s.io\// {print "replace " $1 " => " $1 " '"v$staging"'"}' "$kmod"
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true
   cd "$mod" && go get "k8s.io/kubernetes@v$KUBE_VERSION" >/dev/null
   vpkg=k8s.io/component-base/version
   cpkg=k8s.io/client-go/pkg/version
   ld="-s -w"
   for p in $vpkg $cpkg; do
     ld="$ld -X $p.gitVersion=v$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
   done
   go build -tags notest -trimpath -ldflags "$ld" -o "$bin/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
   go build -tags notest -trimpath -ldflags "$ld" -o "$bin/kube-controller-manager.tmp" k8s.io/kubernetes/cmd/kube-controller-manager)
  mv "$bin/kube-apiserver.tmp" "$bin/kube-apiserver"
  mv "$bin/kube-controller-manager.tmp" "$bin/kube-controller-manager"
fi

# ---- etcd ----
if [[ ! -x "$bin/etcd" ]]; then
  log "building etcd v$ETCD_VERSION"
  mod="$work/etcd"; mkdir -p "$mod"
  # `go install` refuses go.etcd.io/etcd/v3 (local replaces): wrap etcdmain.
  cat > "$mod/go.mod" <<GOMOD
module runner-provisioner/tools/etcd

go 1.24

require go.etcd.io/etcd/server/v3 v$ETCD_VERSION
GOMOD
  cat > "$mod/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$mod" && go mod tidy >/dev/null && go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" .)
  mv "$bin/etcd.tmp" "$bin/etcd"
fi

# ---- helm ----
if [[ ! -x "$bin/helm" ]]; then
  log "building helm v$HELM_VERSION"
  GOBIN="$work/gobin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION"
  mv "$work/gobin/helm" "$bin/helm"
fi

log "tools ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
