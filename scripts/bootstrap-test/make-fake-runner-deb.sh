#!/bin/sh
# Builds a tiny stand-in for CircleCI's circleci-runner .deb, for the
# bootstrap rootfs test (tests/bootstrap_rootfs.rs):
#   make-fake-runner-deb.sh OUTDIR [ARCH]   prints the path of the .deb
# Like the real package it ships a template config (a conffile), a systemd
# unit running as user circleci and creates that user. Its
# /usr/bin/circleci-runner records how it was run and the config it read in
# /var/lib/fake-circleci-runner/.
set -eu

[ $# -ge 1 ] || {
	echo "usage: $0 OUTDIR [ARCH]" >&2
	exit 2
}
OUT=$1
ARCH=${2:-$(dpkg --print-architecture)}
VERSION=3.0.0-fake1
command -v dpkg-deb >/dev/null 2>&1 || {
	echo "dpkg-deb not found: apt-get install -y dpkg" >&2
	exit 1
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PKG="$WORK/pkg"
mkdir -p "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/usr/lib/systemd/system" "$PKG/etc/circleci-runner"

cat >"$PKG/DEBIAN/control" <<CONTROL
Package: circleci-runner
Version: $VERSION
Architecture: $ARCH
Maintainer: runner-provisioner tests <tests@invalid>
Section: devel
Priority: optional
Description: stand-in for CircleCI's machine runner (tests only)
 Records its invocation and the config it reads.
CONTROL

echo /etc/circleci-runner/circleci-runner-config.yaml >"$PKG/DEBIAN/conffiles"

# The real package's template: a placeholder token.
cat >"$PKG/etc/circleci-runner/circleci-runner-config.yaml" <<'CONFIG'
api:
  auth_token: << AUTH TOKEN >>
runner:
  name: << RUNNER NAME >>
CONFIG

cat >"$PKG/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
	if ! id circleci >/dev/null 2>&1; then
		useradd --system --create-home --home-dir /var/lib/circleci-runner --shell /bin/bash circleci
	fi
	chown circleci: /etc/circleci-runner/circleci-runner-config.yaml
	chmod 0600 /etc/circleci-runner/circleci-runner-config.yaml
	install -d -o circleci -g circleci -m 0755 /var/lib/fake-circleci-runner
	echo installed >/var/lib/fake-circleci-runner/postinst
fi
POSTINST
chmod 0755 "$PKG/DEBIAN/postinst"

cat >"$PKG/usr/lib/systemd/system/circleci-runner.service" <<'UNIT'
[Unit]
Description=CircleCI machine runner (test stand-in)
After=network.target

[Service]
ExecStart=/usr/bin/circleci-runner machine --config /etc/circleci-runner/circleci-runner-config.yaml
User=circleci
Restart=always
TimeoutStopSec=18300

[Install]
WantedBy=multi-user.target
UNIT

cat >"$PKG/usr/bin/circleci-runner" <<'RUNNER'
#!/bin/sh
# Test stand-in for circleci-runner: records its run and the config it read.
set -eu
rec=/var/lib/fake-circleci-runner
config=/etc/circleci-runner/circleci-runner-config.yaml
while [ $# -gt 0 ]; do
	case $1 in
	--config | -c)
		config=$2
		shift
		;;
	esac
	shift
done
id -un >"$rec/user"
printf '%s\n' "${CIRCLECI_RUNNER_NAME:-}" >"$rec/name"
cat "$config" >"$rec/config.yaml"
RUNNER
chmod 0755 "$PKG/usr/bin/circleci-runner"

mkdir -p "$OUT"
DEB="$OUT/circleci-runner_${VERSION}_$ARCH.deb"
dpkg-deb --root-owner-group --build "$PKG" "$DEB" >/dev/null
printf '%s\n' "$DEB"
