#!/usr/bin/env bash
# Extract the Linux 6.12 files vfmig's tests compare against (uAPI headers, the vfio core,
# the mtty sample) from Debian's linux-source-6.12 package into a cache directory, without
# installing the package. Prefers the pinned build and falls back to the newest 6.12 one
# when the pinned build has left the archive (it says so).
#
#   tests/kernel/kernel-source.sh DEST      -> DEST/linux-source-6.12/... and DEST/VERSION
#
# Needs apt's package lists (as root it runs 'apt-get update' when they are missing).
set -euo pipefail
dest=${1:?usage: kernel-source.sh DEST}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
pinned=${VFMIG_KERNEL_SOURCE_VERSION:-6.12.117-1~deb12u1}
files=(
  include/uapi/linux/vfio.h
  include/uapi/linux/iommufd.h
  drivers/vfio/vfio_main.c
  drivers/vfio/vfio.h
  drivers/vfio/group.c
  drivers/vfio/container.c
  drivers/vfio/virqfd.c
  drivers/vfio/debugfs.c
  samples/vfio-mdev/mtty.c
)
done_marker="$dest/linux-source-6.12/.complete"
if [ -f "$done_marker" ]; then exit 0; fi
mkdir -p "$dest"
work=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-cache show linux-source-6.12 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else
    echo "kernel-source.sh: apt has no linux-source-6.12; run 'sudo apt-get update'" >&2; exit 3
  fi
fi
if apt-get download -q "linux-source-6.12=$pinned" >/dev/null 2>&1; then
  version=$pinned
else
  version=$(apt-cache policy linux-source-6.12 | awk '/Candidate:/ {print $2}')
  echo "kernel-source.sh: pinned $pinned is gone from the archive; using $version" >&2
  apt-get download -q "linux-source-6.12=$version" >/dev/null
fi
deb=$(ls linux-source-6.12_*.deb)
members=()
for f in "${files[@]}"; do members+=("linux-source-6.12/$f"); done
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/src/linux-source-6.12.tar.xz | tar -xJ "${members[@]}"
rm -rf "$dest/linux-source-6.12"
mv linux-source-6.12 "$dest/"
echo "$version" > "$dest/linux-source-6.12/VERSION"
touch "$done_marker"
echo "kernel-source.sh: linux-source-6.12 $version -> $dest/linux-source-6.12" >&2
