#!/usr/bin/env bash
# Install every Debian 12 package that blockrelay's build, tests, demo and
# benchmarks need. Idempotent and non-interactive: when everything is already
# installed it does nothing at all (no apt-get update, no network).
#
#   usage: scripts/install-deps.sh            (as root, or a user with sudo)
#
# Note: on Debian 12 `nbdfuse` ships inside libnbd-bin (there is no separate
# nbdfuse package), and `fusermount3` comes from fuse3.
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake ninja-build pkg-config git
  libasio-dev libfmt-dev nlohmann-json3-dev libcli11-dev libxxhash-dev
  libnbd-dev liburing-dev libzstd-dev libssl-dev
  # unit and integration tests
  catch2
  # real NBD clients and peers for end-to-end tests and benchmarks
  libnbd-bin python3 python3-libnbd nbdkit qemu-utils fio nbd-client
  # block device / filesystem steps (nbdfuse + losetup + mkfs.ext4 + mount)
  fuse3 e2fsprogs util-linux kmod
  # scripting helpers
  jq procps psmisc coreutils
  # benchmark profiles
  linux-perf
)

missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

echo "install-deps: ${#missing[@]} package(s) missing: ${missing[*]}"

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "install-deps: not root and sudo is not available." >&2
  echo "install-deps: run as root:  apt-get install -y ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  --no-install-recommends "${missing[@]}" </dev/null
echo "install-deps: done"
