#!/bin/sh
# Builds the runner-bundle containerDisk image end to end:
#   build.sh IMAGE [VERSION]     e.g. build.sh registry.example/runner-bundle:3.2.0 3.2.0-1
# fetch-packages.sh -> build-disk.sh -> Containerfile. Needs podman or docker,
# e2fsprogs and internet access.
set -eu

[ $# -ge 1 ] || {
	echo "usage: $0 IMAGE [VERSION]" >&2
	exit 2
}
IMAGE=$1
VERSION=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
ENGINE=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$ENGINE" ] || {
	echo "podman or docker is needed" >&2
	exit 1
}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$HERE/fetch-packages.sh" "$WORK/packages" "$VERSION"
"$HERE/build-disk.sh" "$WORK/packages" "$WORK/disk.img"
cp "$HERE/Containerfile" "$WORK/Containerfile"
"$ENGINE" build -t "$IMAGE" -f "$WORK/Containerfile" "$WORK"
echo "built $IMAGE"
