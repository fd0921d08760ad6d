#!/usr/bin/env bash
# Configure and build blockrelay into build/ (RelWithDebInfo, Ninja).
#   usage: scripts/build.sh [extra cmake -D options...]
# BUILD_DIR and BUILD_JOBS in the environment override the defaults
# (build/ under the repo, and the number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${BUILD_DIR:-build}
JOBS=${BUILD_JOBS:-$(nproc)}

cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@"
ninja -C "$BUILD_DIR" -j"$JOBS"
echo "build: $(pwd)/$BUILD_DIR/blockrelay"
