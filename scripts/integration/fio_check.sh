#!/usr/bin/env bash
# fio with ioengine=mmap: every I/O is a memcpy into or out of a MAP_SHARED mapping of the file.
#
#   fio_check.sh write DIR    random 4 KiB and sequential 64 KiB writes, each block checksummed
#                             (verify=crc32c) and read back through the mapping
#   fio_check.sh verify DIR   --verify_only: re-read and check every block (after remount)
#
# Prints one line and exits 1 on failure.
set -uo pipefail

fail() { echo "fio: $*" >&2; exit 1; }

[[ $# == 2 && ($1 == write || $1 == verify) ]] || fail "usage: fio_check.sh write|verify DIR"
phase=$1 dir=$2

run_job() {  # name rw bs
    local name=$1 rw=$2 bs=$3 out
    local args=(--name="$name" --filename="$dir/$name.dat" --ioengine=mmap --rw="$rw" --bs="$bs"
        --size=64M --randrepeat=1 --verify=crc32c --verify_fatal=1 --end_fsync=1 --runtime=120
        --output-format=normal)
    [[ $phase == verify ]] && args+=(--verify_only)
    out=$(fio "${args[@]}" 2>&1)
    local rc=$?
    if ((rc != 0)) || grep -qiE 'verify failed|bad magic|crc32c.*fail' <<<"$out"; then
        fail "$name ($phase) exit $rc: $(grep -iE -m 1 'verify|error|fail' <<<"$out" || tail -n 1 <<<"$out")"
    fi
    [[ $phase == verify || -f $dir/$name.dat ]] || fail "$name: $dir/$name.dat not created"
    local size; size=$(stat -c %s "$dir/$name.dat")
    [[ $size == $((64 << 20)) ]] || fail "$name ($phase): file size $size, expected $((64 << 20))"
}

run_job mmap-randwrite randwrite 4k
run_job mmap-seqwrite write 64k
