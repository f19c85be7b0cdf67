#!/bin/sh
# Downloads the circleci-runner packages for the runner bundle from CircleCI's
# package repository (packagecloud), inside throw-away containers:
#   fetch-packages.sh OUTDIR [VERSION]
# VERSION is the package version (e.g. 3.2.0-1); empty means the latest.
# Architectures: RUNNER_BUNDLE_PLATFORMS (default "linux/amd64 linux/arm64").
# Needs podman or docker and internet access.
set -eu

[ $# -ge 1 ] || {
	echo "usage: $0 OUTDIR [VERSION]" >&2
	exit 2
}
OUT=$1
VERSION=${2:-}
PLATFORMS=${RUNNER_BUNDLE_PLATFORMS:-linux/amd64 linux/arm64}
ENGINE=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$ENGINE" ] || {
	echo "podman or docker is needed" >&2
	exit 1
}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The in-container scripts are single-quoted on purpose: VERSION reaches them
# as an environment variable, never pasted into the script.
# shellcheck disable=SC2016
for platform in $PLATFORMS; do
	"$ENGINE" run --rm --platform "$platform" -e VERSION="$VERSION" -v "$OUT:/out" \
		docker.io/library/debian:bookworm sh -euc '
			apt-get update -q
			apt-get install -y -q curl ca-certificates
			curl -fsSL "https://packagecloud.io/install/repositories/circleci/runner/script.deb.sh?any=true" | bash
			cd /out
			apt-get download "circleci-runner${VERSION:+=$VERSION}"'
	"$ENGINE" run --rm --platform "$platform" -e VERSION="$VERSION" -v "$OUT:/out" \
		docker.io/library/almalinux:9 sh -euc '
			curl -fsSL "https://packagecloud.io/install/repositories/circleci/runner/script.rpm.sh?any=true" | bash
			dnf download -y --destdir /out "circleci-runner${VERSION:+-$VERSION}"'
done
ls -l "$OUT"
