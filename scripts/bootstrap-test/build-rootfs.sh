#!/bin/sh
# Builds, once, the Debian root filesystem that tests/bootstrap_rootfs.rs runs
# the VM bootstrap script in (chroot). Cached outside the repository, keyed by
# suite and recipe version: bump RECIPE_VERSION when this recipe changes.
#
#   scripts/bootstrap-test/build-rootfs.sh              build if missing
#   scripts/bootstrap-test/build-rootfs.sh --print-path print the rootfs path
#   scripts/bootstrap-test/build-rootfs.sh --check      exit 0 if already built
#
# Environment: RP_CACHE_DIR (default ~/.cache/runner-provisioner),
# RP_ROOTFS_SUITE (default bookworm), RP_DEBIAN_MIRROR (default: the Debian
# mirror this machine's apt sources use). Needs root and debootstrap.
set -eu

RECIPE_VERSION=1
SUITE=${RP_ROOTFS_SUITE:-bookworm}
CACHE_DIR=${RP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner-provisioner}
DEST="$CACHE_DIR/rootfs-$SUITE-v$RECIPE_VERSION"
# Packages on top of minbase that the bootstrap script uses on real images
# (mount, blkid and runuser are in minbase already).
INCLUDE=ca-certificates

case "${1:-}" in
--print-path)
	printf '%s\n' "$DEST"
	exit 0
	;;
--check)
	test -f "$DEST/.rp-rootfs-complete"
	exit
	;;
"") ;;
*)
	echo "usage: $0 [--print-path|--check]" >&2
	exit 2
	;;
esac

if [ -f "$DEST/.rp-rootfs-complete" ]; then
	echo "rootfs up to date: $DEST"
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "build-rootfs.sh must run as root (debootstrap)" >&2
	exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
	echo "debootstrap not found: apt-get install -y debootstrap" >&2
	exit 1
fi

# The Debian mirror apt already uses here (deb822 or one-line format).
find_mirror() {
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' "$f"
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { if ($i ~ /\/debian\/?$/) print $i; break } }' "$f"
	done
}
MIRROR=${RP_DEBIAN_MIRROR:-$(find_mirror | head -n 1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

mkdir -p "$CACHE_DIR"
TMP="$DEST.tmp.$$"
trap 'rm -rf "$TMP"' EXIT
start=$(date +%s)
echo "debootstrap --variant=minbase $SUITE from $MIRROR into $TMP"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$TMP" "$MIRROR"
# Keep the cache small: downloaded .debs are not needed any more.
rm -rf "$TMP"/var/cache/apt/archives/*.deb
echo "recipe=$RECIPE_VERSION suite=$SUITE mirror=$MIRROR" >"$TMP/.rp-rootfs-complete"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
echo "rootfs built in $(($(date +%s) - start)) s: $DEST"
