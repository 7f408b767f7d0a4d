#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine of this kind: apt packages, the kernel-headers
# shim BCC needs (only when headers are missing), tracefs, and the project venv (.venv).
# Non-root users get the venv only; tests that need root/BPF/KVM then skip with the reason.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
log() { printf 'setup: %s\n' "$*" >&2; }

APT_PKGS=(qemu-system-x86 python3-bpfcc linux-headers-amd64 linux-image-amd64 bpftrace bpftool
          debootstrap squashfs-tools busybox-static cpio e2fsprogs gcc binutils make)

if [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # BCC compiles at run time against /lib/modules/$(uname -r)/build. This kernel ships no
  # headers, so link Debian's: tracepoint layouts come from tracefs, so this is sound for the
  # tracepoint programs hintscope loads on the host (it reads no kernel-internal structs).
  kdir=/lib/modules/$(uname -r)
  if [ ! -e "$kdir/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$hdr" ]; then
      log "linking kernel headers $hdr into $kdir (headers shim)"
      mkdir -p "$kdir"
      ln -sfn "$hdr" "$kdir/build"
      ln -sfn "${hdr%-amd64}-common" "$kdir/source"
    fi
  fi
  # QEMU 10.0 from bookworm-backports, unpacked beside the system 7.2, for the version tests.
  [ -x /opt/hintscope/qemu-bpo/usr/bin/qemu-system-x86_64 ] || bash scripts/install-qemu-backports.sh >/dev/null \
    || log "could not unpack QEMU 10.0 from bookworm-backports (its tests will skip)"
  # The second guest kernel series (6.12, bookworm-backports), only for the long Linux guest lab
  # (HINTSCOPE_LAB=1): ~2.5 min (initramfs) the first time, which the demo and the normal suite do not
  # need. After the headers shim above, so the host's BCC keeps bookworm's headers.
  if [ "${HINTSCOPE_LAB:-0}" = 1 ]; then
    compgen -G '/boot/vmlinuz-6.12.*-amd64' >/dev/null || bash scripts/install-guest-kernel.sh 6.12 >/dev/null \
      || log "could not install the 6.12 guest kernel from bookworm-backports (its lab tests will skip)"
  fi
  [ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
  [ -d /sys/kernel/debug/tracing ] || mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
else
  log "not root: skipping apt packages and the headers shim (probe and lab tests will skip)"
fi

py=${HINTSCOPE_PYTHON:-$(command -v python3.11 || true)}
[ -n "$py" ] || { log "python3.11 not found"; exit 1; }
stamp=.venv/.hintscope-setup
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating .venv and installing hintscope[test]"
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]" > .venv/pip.log 2>&1 \
    || { tail -n 20 .venv/pip.log >&2; log "pip install failed (full log: .venv/pip.log)"; exit 1; }
  .venv/bin/python -c 'import hintscope, pandas, pyarrow, qemu.qmp' || { log "venv install failed"; exit 1; }
  echo "$want" > "$stamp"
fi
