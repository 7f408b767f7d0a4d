#!/usr/bin/env bash
# Builds qemu-system-x86_64 from Debian's own QEMU source, optionally with patches, into a
# versioned prefix under /opt/hintscope/ and prints the binary's path on stdout (last line).
#
#   scripts/build-qemu.sh [--version 10.0|7.2] [--patch FILE]... [--jobs N]
#
# - Source: the upstream tarball Debian ships (`apt-get source --print-uris` with deb-src lines
#   added idempotently; the archive answers 404 for the bookworm-backports .dsc of 10.0.2, so
#   the checksummed orig tarball is fetched on its own and Debian's own patches are not applied).
# - x86_64-softmmu only, KVM, trace backend "log" (so `-trace PATTERN` works), no docs or blobs.
#   QEMU looks for firmware relative to its binary (PREFIX/share/qemu), so that directory holds
#   links to the packaged firmware (/usr/share/seabios, /usr/share/qemu) and no -L is needed.
# - Prefix /opt/hintscope/qemu-<upstream version>-<stock | p-<patch hash>>: a second call with
#   the same source version and the same patch code finds it and returns at once. The hash is
#   over `git patch-id --stable` of each patch, in order: it covers the diff only, so rewording
#   a commit message keeps the build (and the "patched (<hash>)" label runs carry).
# - One git work tree per source version (/opt/hintscope/build/), reset to the pristine source
#   before the patches go on, so a different patch set recompiles only the files it changes.
# - Installs into a staging directory first and renames it into place, so a failed build leaves
#   no prefix behind. On failure the failing step is named.
set -euo pipefail

version=10.0
patches=()
jobs=$(nproc)
while [ $# -gt 0 ]; do
  case $1 in
    --patch) [ $# -ge 2 ] || { echo "build-qemu: --patch needs a file" >&2; exit 2; }
             [ -f "$2" ] || { echo "build-qemu: no such patch file: $2" >&2; exit 2; }
             patches+=("$(readlink -f "$2")"); shift 2 ;;
    --version) version=${2:?--version needs 10.0 or 7.2}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-qemu: unknown argument: $1" >&2; exit 2 ;;
  esac
done

# The Debian source versions this project compares (the binaries already unpacked beside them).
case $version in
  10.0|10.0.2) debver='1:10.0.2+ds-2+deb13u1~bpo12+1'; suite=bookworm-backports ;;
  7.2|7.2.22)  debver='1:7.2+dfsg-7+deb12u18'; suite=bookworm ;;
  *) echo "build-qemu: unsupported --version $version (10.0 or 7.2)" >&2; exit 2 ;;
esac

root=/opt/hintscope
t0=$(date +%s)
step=start
trap 'rc=$?; echo "build-qemu: FAILED at step \"$step\" (exit $rc) after $(( $(date +%s) - t0 )) s; log: $log" >&2; exit $rc' ERR
log=$root/build/build-qemu.log

phash=stock
if [ ${#patches[@]} -gt 0 ]; then
  ids=""
  for p in "${patches[@]}"; do
    id=$(git patch-id --stable < "$p" | awk '{print $1}')
    [ -n "$id" ] || { echo "build-qemu: $p holds no diff git can read" >&2; exit 2; }
    ids+="$id "
  done
  phash=p-$(printf '%s' "$ids" | sha256sum | cut -c1-12)
fi
upver=${debver#*:}; upver=${upver%%+*}
prefix=$root/qemu-$upver-$phash
bin=$prefix/bin/qemu-system-x86_64
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  echo "build-qemu: cached: $prefix (built earlier; $(( $(date +%s) - t0 )) s)" >&2
  echo "$bin"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "build-qemu: needs root (apt, /opt/hintscope)" >&2; exit 1; }
mkdir -p "$root/build" "$root/src"
: > "$log"
exec 9>"$root/build/.lock"
flock 9   # one build at a time: the work tree is shared between patch sets

step="apt: deb-src lines"
srcfile=/etc/apt/sources.list.d/hintscope-src.sources
want=$'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg'
if [ "$(cat "$srcfile" 2>/dev/null)" != "$want" ]; then
  printf '%s\n' "$want" > "$srcfile"
  apt-get update -q >>"$log" 2>&1
fi

step="apt: build dependencies"
deps=(libglib2.0-dev libpixman-1-dev flex bison python3-venv pkg-config libfdt-dev zlib1g-dev
      ninja-build gcc make git xz-utils curl)
missing=()
for p in "${deps[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1
fi

step="python venv (meson 1.5.0, pycotap)"
# The +ds tarball carries no meson wheel; QEMU's configure wants meson >= 1.5 and pycotap.
venv=$root/build/venv
if ! "$venv/bin/python3" -c 'import mesonbuild, pycotap' 2>/dev/null; then
  /usr/bin/python3 -m venv "$venv" >>"$log" 2>&1
  "$venv/bin/pip" install -q 'meson==1.5.0' pycotap >>"$log" 2>&1
fi

step="apt source: fetch the orig tarball of qemu=$debver"
uris=$(cd /tmp && apt-get source -q --print-uris -t "$suite" "qemu=$debver" 2>>"$log" | grep "orig.tar")
url=$(echo "$uris" | awk '{print $1}' | tr -d "'")
tarname=$(echo "$uris" | awk '{print $2}')
sum=$(echo "$uris" | awk '{print $4}')
tarball=$root/src/$tarname
if [ ! -f "$tarball" ]; then
  curl -fsSL -o "$tarball.part" "$url" >>"$log" 2>&1
  mv "$tarball.part" "$tarball"
fi
step="apt source: verify $tarname"
case $sum in
  SHA256:*) echo "${sum#SHA256:}  $tarball" | sha256sum -c --quiet >>"$log" 2>&1 ;;
  SHA512:*) echo "${sum#SHA512:}  $tarball" | sha512sum -c --quiet >>"$log" 2>&1 ;;
  MD5Sum:*) echo "${sum#MD5Sum:}  $tarball" | md5sum -c --quiet >>"$log" 2>&1 ;;
  *) echo "build-qemu: no checksum for $tarname in apt's answer: $uris" >&2; false ;;
esac

tree=$root/build/qemu-$upver
step="unpack into $tree (git work tree)"
if [ ! -d "$tree/.git" ]; then
  rm -rf "$tree" "$tree.part"; mkdir -p "$tree.part"
  tar -xf "$tarball" -C "$tree.part" --strip-components=1
  # edk2 blobs are not in the +ds tarball; without this meson fails on edk2-*.fd.bz2.
  sed -i 's/unpack_edk2_blobs = bzip2.found()/unpack_edk2_blobs = false/' "$tree.part/meson.build"
  if grep -q 'unpack_edk2_blobs = bzip2.found()' "$tree.part/meson.build"; then
    echo "build-qemu: could not turn off unpack_edk2_blobs in meson.build" >&2; false
  fi
  ( cd "$tree.part" && git init -q && git add -A && \
    git -c user.name=build -c user.email=build@localhost commit -qm "pristine $tarname" ) >>"$log" 2>&1
  mv "$tree.part" "$tree"
fi

step="reset the work tree and apply patches"
cd "$tree"
git reset -q --hard HEAD >>"$log" 2>&1
git clean -qfd -e build >>"$log" 2>&1
for p in ${patches[@]+"${patches[@]}"}; do
  step="apply patch $(basename "$p")"
  git apply --whitespace=nowarn "$p" >>"$log" 2>&1
done

step="configure"
if [ ! -f build/build.ninja ]; then
  mkdir -p build
  ( cd build && ../configure --python="$venv/bin/python3" --prefix=/usr \
      --target-list=x86_64-softmmu --enable-kvm --enable-trace-backends=log \
      --disable-docs --disable-werror --disable-user --disable-install-blobs ) >>"$log" 2>&1
fi

step="compile (ninja -j$jobs qemu-system-x86_64)"
ninja -C build -j"$jobs" qemu-system-x86_64 >>"$log" 2>&1

step="install into a staging dir and rename to $prefix"
stage=$(mktemp -d "$root/.stage-XXXXXX")
trap 'rc=$?; rm -rf "$stage"; echo "build-qemu: FAILED at step \"$step\" (exit $rc) after $(( $(date +%s) - t0 )) s; log: $log" >&2; exit $rc' ERR
mkdir -p "$stage/bin" "$stage/patches"
install -m 755 build/qemu-system-x86_64 "$stage/bin/"
for p in ${patches[@]+"${patches[@]}"}; do cp "$p" "$stage/patches/"; done
mkdir -p "$stage/share/qemu"
for f in /usr/share/seabios/* /usr/share/qemu/*; do if [ -e "$f" ]; then ln -sfn "$f" "$stage/share/qemu/"; fi; done
[ -e "$stage/share/qemu/bios-256k.bin" ] || { echo "build-qemu: no bios-256k.bin in /usr/share/seabios or /usr/share/qemu (install seabios)" >&2; false; }
"$stage/bin/qemu-system-x86_64" --version >>"$log" 2>&1
secs=$(( $(date +%s) - t0 ))
{
  echo "source=$tarname"
  echo "debian_version=$debver"
  echo "patch_hash=${phash#p-}"
  for p in ${patches[@]+"${patches[@]}"}; do echo "patch=$(basename "$p") sha256=$(sha256sum "$p" | cut -c1-64)"; done
  echo "label=$( [ "$phash" = stock ] && echo "stock $upver (source build)" || echo "patched (${phash#p-})")"
  echo "build_seconds=$secs"
  echo "built=$(date -u +%FT%TZ)"
} > "$stage/BUILD-INFO"
chmod 755 "$stage"
rm -rf "$prefix"
mv "$stage" "$prefix"
echo "build-qemu: built $prefix in $secs s" >&2
echo "$bin"
