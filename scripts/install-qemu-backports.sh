#!/usr/bin/env bash
# Unpacks bookworm-backports' QEMU (10.0) next to the system QEMU 7.2, without replacing it,
# for version comparisons: /opt/hintscope/qemu-bpo/usr/bin/qemu-system-x86_64 (run it with
# -L /opt/hintscope/qemu-bpo/usr/share/qemu -L /opt/hintscope/qemu-bpo/usr/share/seabios).
# Its shared-library dependencies are the same bookworm libraries QEMU 7.2 uses. Idempotent.
set -euo pipefail
dest=${1:-/opt/hintscope/qemu-bpo}
bin=$dest/usr/bin/qemu-system-x86_64
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then echo "$bin"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "install-qemu-backports: needs root (apt source and download)" >&2; exit 1; }
src=/etc/apt/sources.list.d/hintscope-backports.sources
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src"
fi
apt-get update -q >/dev/null
tmp=$(mktemp -d)
( cd "$tmp" && apt-get download -q -t bookworm-backports qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu >/dev/null )
mkdir -p "$dest"
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$dest"; done
rm -rf "$tmp"
"$bin" --version >/dev/null
echo "$bin"
