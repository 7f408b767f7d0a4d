#!/usr/bin/env bash
# Installs a Debian kernel series for the Linux guest lab (`hintscope lab ... --guest-kernel SERIES`):
# its image (vmlinuz, initrd built by the host's initramfs-tools, modules) and its headers, which
# BCC in the guest compiles against. Idempotent; prints the installed release.
#   6.1   bookworm's kernel, through the meta packages linux-image-amd64/linux-headers-amd64 (setup.sh does this)
#   6.12  the kernel bookworm-backports' linux-image-amd64 points at, installed by its versioned
#         package names and exact version, so the host's meta packages, bpftool, linux-libc-dev
#         and perf stay on bookworm (`apt-get -t bookworm-backports` would upgrade all of them)
# The host never boots these kernels; QEMU loads them with -kernel/-initrd.
set -euo pipefail
series=${1:-6.1}
[ "$(id -u)" = 0 ] || { echo "install-guest-kernel: needs root (apt)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
case "$series" in
  6.1)
    apt-get install -y -q --no-install-recommends linux-image-amd64 linux-headers-amd64 >/dev/null
    dpkg-query -W -f '${Depends}\n' linux-image-amd64 | sed -E 's/^linux-image-([^ ,]+).*/\1/'
    ;;
  6.12)
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        > /etc/apt/sources.list.d/hintscope-backports.sources
      apt-get update -q >/dev/null
    fi
    # "linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)": what the archive serves today
    dep=$(apt-cache show linux-image-amd64/bookworm-backports 2>/dev/null | sed -n 's/^Depends: //p' | head -n 1)
    if [ -z "$dep" ]; then apt-get update -q >/dev/null
      dep=$(apt-cache show linux-image-amd64/bookworm-backports | sed -n 's/^Depends: //p' | head -n 1); fi
    pkg=${dep%% *}
    ver=$(sed -E 's/.*\(= ([^)]+)\).*/\1/' <<<"$dep")
    rel=${pkg#linux-image-}
    case "$rel" in 6.12.*-amd64) ;; *) echo "install-guest-kernel: bookworm-backports serves $pkg, not 6.12" >&2; exit 1;; esac
    apt-get install -y -q --no-install-recommends "$pkg=$ver" "linux-headers-$rel=$ver" >/dev/null
    echo "$rel"
    ;;
  *) echo "install-guest-kernel: unknown series $series (6.1 or 6.12)" >&2; exit 2 ;;
esac
