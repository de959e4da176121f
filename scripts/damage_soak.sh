#!/usr/bin/env bash
# Soak of the damage generator (tests/integration/damage.rs): every kind of structure-aware
# damage with many seeds (each seed damages other objects with other values). Not part of the
# test command, which runs every kind once.
#   scripts/damage_soak.sh [SEEDS]        (default 20; about 10 s per seed on 2 cores)
# MMAPFS_DAMAGE_KIND=a,b limits the run to the kinds whose names start with a or b. Failing runs
# are listed with their seed, kind and step, and the damaged image is kept under
# $TMPDIR/mmapfs-damage-failures/ (the full log next to it); replay one with
#   MMAPFS_DAMAGE_SEED=N MMAPFS_DAMAGE_KIND=KIND cargo test --release --test integration damage::
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-20}
keep=${TMPDIR:-/tmp}/mmapfs-damage-failures
mkdir -p "$keep"
echo "damage soak: $seeds seeds (full log: $keep.log)"
start=$SECONDS
set +e
MMAPFS_DAMAGE_SEEDS=$seeds MMAPFS_DAMAGE_KEEP=$keep \
    cargo test --release --test integration damage::every_kind_of_damage_is_survived -- \
    --exact --nocapture 2>&1 | tee "$keep.log" |
    grep -E "^damage: |^damage .*FAILED|^=== |^--- step|damage runs failed|test result"
status=${PIPESTATUS[0]}
set -e
echo "damage soak: $((SECONDS - start)) s, exit $status (failing images: $keep)"
exit "$status"
