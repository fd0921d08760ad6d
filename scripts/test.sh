#!/usr/bin/env bash
# The whole test suite, as CI runs it: install the Debian packages, build
# into build/, run every ctest test (unit, integration and end-to-end).
#   usage: scripts/test.sh          (as root on Debian 12: the FUSE/ext4
#                                     end-to-end test needs root)
# Exit status: ctest's. CTEST_JOBS and CTEST_TIMEOUT override -j2 / 600 s.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

bash scripts/install-deps.sh
bash scripts/build.sh

log=$(mktemp -t blockrelay-ctest.XXXXXX)
trap 'rm -f "$log"' EXIT
set +e
(cd build && ctest --output-on-failure -j"${CTEST_JOBS:-2}" --timeout "${CTEST_TIMEOUT:-600}") </dev/null 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

echo
echo "==== test.sh summary ($((SECONDS - start)) s) ===="
grep -E '^[0-9]+% tests passed' "$log" || echo "ctest printed no summary line"
grep -E '^The following tests (FAILED|did not run)' -A 200 "$log" || true
exit "$rc"
