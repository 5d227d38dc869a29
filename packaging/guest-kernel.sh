#!/usr/bin/env bash
# Fetch Debian's kernel (linux-image-amd64's current image) into var/guest-kernel, unpacked, not installed:
# tests/guest.py boots it under QEMU to run the tests the host kernel cannot (an NFS server, see README
# "The NFS test and kernels without an NFS server"). Only from the package archive apt already uses; idempotent.
#   packaging/guest-kernel.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-var/guest-kernel}
[[ -f "$dest/ready" ]] && exit 0

# the image linux-image-amd64 depends on now, e.g. linux-image-6.1.0-57-amd64
image=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [[ -z "$image" ]]; then
    apt-get update -qq
    image=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
version=${image#linux-image-}
echo "dev-deps: fetching $image into $dest (a guest kernel for the NFS test)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download drops privileges to _apt where it can
(cd "$work" && apt-get download -qq "$image" 2>/dev/null || apt-get download -qq "$image")
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
dpkg-deb -x "$work"/"$image"_*.deb "$dest.tmp"
depmod -b "$dest.tmp" "$version"
ln -s "boot/vmlinuz-$version" "$dest.tmp/vmlinuz"
echo "$version" >"$dest.tmp/ready"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
