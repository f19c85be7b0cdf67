#!/bin/sh
# Builds the runner-bundle disk image: an ext4 filesystem labelled RUNNERBNDL
# holding the circleci-runner packages, in the layout the VM bootstrap
# (src/cloudinit/bootstrap.sh) looks for:
#   deb/circleci-runner_<version>_<arch>.deb     (arch as dpkg names it: amd64, arm64)
#   rpm/circleci-runner-<version>.<arch>.rpm     (arch as uname -m: x86_64, aarch64)
#   MANIFEST                                     sha256 and name of each package
#
#   build-disk.sh PKGDIR OUT.img
#
# PKGDIR holds circleci-runner .deb and/or .rpm files (any names; see
# fetch-packages.sh). The image is reproducible: the same packages and
# SOURCE_DATE_EPOCH give the same bytes. Needs e2fsprogs (mkfs.ext4 -d);
# dpkg-deb and rpm, when installed, check the packages' names.
set -eu

[ $# -eq 2 ] || {
	echo "usage: $0 PKGDIR OUT.img" >&2
	exit 2
}
PKGDIR=$1
OUT=$2
LABEL=RUNNERBNDL
# 1980-01-01 by default (mke2fs ignores a fake time of 0).
EPOCH=${SOURCE_DATE_EPOCH:-315532800}
command -v mkfs.ext4 >/dev/null 2>&1 || {
	echo "mkfs.ext4 not found: apt-get install -y e2fsprogs" >&2
	exit 1
}

fail() {
	echo "build-disk.sh: $*" >&2
	exit 1
}

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE" "$STAGE.debugfs"' EXIT
mkdir -p "$STAGE/deb" "$STAGE/rpm"

count=0
for f in "$PKGDIR"/*.deb; do
	[ -f "$f" ] || continue
	if command -v dpkg-deb >/dev/null 2>&1; then
		pkg=$(dpkg-deb --field "$f" Package) || fail "$f is not a .deb"
		[ "$pkg" = circleci-runner ] || fail "$f is package '$pkg', not circleci-runner"
		version=$(dpkg-deb --field "$f" Version)
		arch=$(dpkg-deb --field "$f" Architecture)
		name="circleci-runner_${version}_$arch.deb"
	else
		name=$(basename "$f")
		case $name in circleci-runner_*_*.deb) ;; *) fail "unexpected .deb name $name" ;; esac
	fi
	case $name in *[!A-Za-z0-9._+~-]*) fail "unexpected characters in $name" ;; esac
	cp "$f" "$STAGE/deb/$name"
	count=$((count + 1))
done
for f in "$PKGDIR"/*.rpm; do
	[ -f "$f" ] || continue
	magic=$(od -An -tx1 -N4 "$f" | tr -d ' \n')
	[ "$magic" = edabeedb ] || fail "$f is not an .rpm"
	if command -v rpm >/dev/null 2>&1; then
		name=$(rpm -qp --nosignature --qf '%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm' "$f") ||
			fail "cannot read $f"
		case $name in circleci-runner-[0-9]*) ;; *) fail "$f is $name, not circleci-runner" ;; esac
	else
		name=$(basename "$f")
	fi
	case $name in circleci-runner-*.*.rpm) ;; *) fail "unexpected .rpm name $name" ;; esac
	case $name in *[!A-Za-z0-9._+~-]*) fail "unexpected characters in $name" ;; esac
	cp "$f" "$STAGE/rpm/$name"
	count=$((count + 1))
done
[ "$count" -gt 0 ] || fail "no circleci-runner .deb or .rpm in $PKGDIR"

(cd "$STAGE" && find deb rpm -type f | LC_ALL=C sort | xargs -r sha256sum) >"$STAGE/MANIFEST"
chmod 0755 "$STAGE" "$STAGE/deb" "$STAGE/rpm"
find "$STAGE" -type f -exec chmod 0644 {} +
find "$STAGE" -exec touch -h -d "@$EPOCH" {} +

# Size: contents plus 20% and 4 MiB for metadata, in MiB.
kib=$(du -sk "$STAGE" | cut -f1)
mib=$(((kib * 12 / 10) / 1024 + 4))
# Reproducible: fixed UUID and hash seed from the manifest, fixed times.
uuid=$(sha256sum "$STAGE/MANIFEST" | sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12}).*/\1-\2-4\3-8\4-\5/')
rm -f "$OUT"
truncate -s "${mib}M" "$OUT"
E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -L "$LABEL" -U "$uuid" \
	-E "root_owner=0:0,hash_seed=$uuid" -O ^has_journal -m 0 -d "$STAGE" "$OUT"
# mkfs -d copies atime and ctime from the staging files: pin them too.
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort) | while IFS= read -r path; do
	for field in atime ctime mtime crtime; do
		printf 'set_inode_field "/%s" %s @%s\n' "${path#./}" "$field" "$EPOCH"
	done
done >"$STAGE.debugfs"
for field in atime ctime mtime crtime; do
	printf 'set_inode_field / %s @%s\n' "$field" "$EPOCH"
	printf 'set_inode_field /lost+found %s @%s\n' "$field" "$EPOCH"
done >>"$STAGE.debugfs"
E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$STAGE.debugfs" "$OUT" >/dev/null 2>&1 ||
	fail "debugfs could not pin the timestamps"
rm -f "$STAGE.debugfs"
echo "built $OUT: label $LABEL, $count package(s), ${mib} MiB"
