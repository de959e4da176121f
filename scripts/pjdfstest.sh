#!/usr/bin/env bash
# POSIX conformance: runs pjdfstest (crates.io) against a fresh mmapfs mount and checks the
# result against the known list of failures (currently none).
# Usage: scripts/pjdfstest.sh [-o MOUNT_OPTIONS]   (e.g. -o io_uring)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. scripts/lib.sh

mount_opts=()
if [ "${1:-}" = "-o" ] && [ -n "${2:-}" ]; then
    mount_opts=(-o "$2")
elif [ $# -gt 0 ]; then
    echo "usage: scripts/pjdfstest.sh [-o MOUNT_OPTIONS]" >&2
    exit 2
fi

need_fuse
if ! command -v pjdfstest >/dev/null 2>&1; then
    echo "installing pjdfstest (cargo install)" >&2
    cargo install --quiet pjdfstest
fi
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
bin=$PWD/target/release/mmapfs

work=$(mktemp -d /tmp/mmapfs-pjdfstest.XXXXXX)
# pjdfstest switches to unprivileged users: they must be able to reach the mount.
chmod 0755 "$work"
daemon=""
cleanup() {
    unmount_quietly "$work/mnt"
    unmount_quietly "$work/secondary"
    [ -n "$daemon" ] && wait "$daemon" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

mkdir -p "$work/mnt" "$work/secondary"
"$bin" mkfs "$work/img" --size 64M >/dev/null
"$bin" mount --foreground "${mount_opts[@]}" "$work/img" "$work/mnt" >/dev/null &
daemon=$!
wait_mounted "$work/mnt" "$daemon" || { echo "pjdfstest: mount failed" >&2; exit 1; }
# pjdfstest needs a secondary filesystem for EXDEV tests.
mount -t tmpfs -o size=16m tmpfs "$work/secondary"
mkdir "$work/mnt/t" && chmod 0777 "$work/mnt/t"

out=$work/pjdfstest.out
(cd "$work/mnt/t" && timeout 600 pjdfstest -c "$root/scripts/pjdfstest.toml" -p "$work/mnt/t" -s "$work/secondary") >"$out" 2>&1 || true
summary=$(grep -E '^Summary:' "$out" | tail -n 1 || true)
if [ -z "$summary" ]; then
    tail -n 20 "$out" >&2
    echo "pjdfstest: did not produce a summary" >&2
    exit 1
fi
echo "pjdfstest: $summary"
failed=$(sed -E 's/.*Summary: ([0-9]+) failed.*/\1/' <<<"$summary")
passed=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$summary")
if [ "$failed" != 0 ]; then
    grep -E 'FAILED|failed$' "$out" | grep -v '^Summary' | head -n 50 >&2 || true
fi

fusermount3 -u "$work/mnt"
wait "$daemon"
daemon=""
"$bin" fsck "$work/img" >/dev/null || { echo "pjdfstest: fsck found problems after the run" >&2; "$bin" fsck "$work/img" >&2; exit 1; }
echo "pjdfstest: $passed passed, $failed failed"
[ "$failed" = 0 ]
