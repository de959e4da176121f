#!/usr/bin/env bash
# Soak of the power-cut suite (tests/powercut.rs): many seeds of the random workload, each with
# crash images between all operations and inside flushes. Not part of the test command.
#   scripts/powercut_soak.sh [SEEDS]        (default 200; about 2 s per seed on 2 cores)
# A failing seed is printed with its operations and the image is kept under
# $TMPDIR/mmapfs-powercut-failures/; replay it with MMAPFS_SEED=N cargo test --release --test powercut.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-200}
echo "power-cut soak: $seeds seeds"
start=$SECONDS
# The test's status, not grep's (`|| true` would have reset PIPESTATUS to grep's alone).
set +e
MMAPFS_POWERCUT_SEEDS=$seeds cargo test --release --test powercut power_cuts -- --nocapture 2>&1 |
    grep -E "seeds|crash images|panicked|seed [0-9]+:|test result"
status=${PIPESTATUS[0]}
set -e
echo "power-cut soak: $((SECONDS - start)) s, exit $status"
exit "$status"
