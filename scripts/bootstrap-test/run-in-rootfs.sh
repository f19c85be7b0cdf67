#!/bin/sh
# Runs a command in a root filesystem the way the VM would run it, for the
# bootstrap rootfs test (tests/bootstrap_rootfs.rs):
#   run-in-rootfs.sh ROOT CONSOLE [BUNDLE_DEV] -- COMMAND...
# In private mount, PID and network namespaces (no network: the test must not
# reach the internet; mounts vanish with the namespace): /proc is mounted,
# the file CONSOLE stands in for /dev/console, and if BUNDLE_DEV (a block
# device, e.g. a read-only loop device over the runner-bundle disk image) is
# given it appears as /dev/disk/by-id/virtio-runner-bundle, as udev shows the
# disk with serial "runner-bundle" in the VM. COMMAND runs in chroot ROOT with
# a clean environment; RP_BUNDLE_DIR is passed through when set.
set -eu

if [ "${RP_IN_NAMESPACE:-}" != 1 ]; then
	[ "$(id -u)" = 0 ] || {
		echo "run-in-rootfs.sh needs root (chroot, namespaces)" >&2
		exit 1
	}
	RP_IN_NAMESPACE=1 exec unshare --mount --pid --net --fork --kill-child --propagation private "$0" "$@"
fi

ROOT=$1
CONSOLE=$2
shift 2
BUNDLE_DEV=
if [ "$1" != -- ]; then
	BUNDLE_DEV=$1
	shift
fi
[ "$1" = -- ] || {
	echo "usage: $0 ROOT CONSOLE [BUNDLE_DEV] -- COMMAND..." >&2
	exit 2
}
shift

mount -t proc proc "$ROOT/proc"
mount -t tmpfs -o mode=0755 tmpfs "$ROOT/run"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOT/dev/pts" 2>/dev/null || true
mount --bind "$CONSOLE" "$ROOT/dev/console"
if [ -n "$BUNDLE_DEV" ]; then
	name=$(basename "$BUNDLE_DEV")
	: >"$ROOT/dev/$name"
	mount --bind "$BUNDLE_DEV" "$ROOT/dev/$name"
	mkdir -p "$ROOT/dev/disk/by-id"
	ln -sf "../../$name" "$ROOT/dev/disk/by-id/virtio-runner-bundle"
fi

set -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
	${RP_BUNDLE_DIR:+RP_BUNDLE_DIR="$RP_BUNDLE_DIR"} "$@"
exec chroot "$ROOT" "$@"
