#!/usr/bin/env bash
# Where a FUSE round trip's time goes on this machine: mounts a fresh mmapfs image and times
# getxattr round trips (scripts/bench/fuse_rtt.c): with the default placement of the workers (one
# pinned per CPU), with `-o io_uring` (where the kernel has it: the fuse module's enable_uring
# switch is turned on only while that mount starts and put back after), then with
# `-o no_pin_threads`, and with every worker moved to CPU 0 while the client runs on CPU 0 (same
# CPU) or CPU 1 (another CPU).
#   bash scripts/bench/rtt.sh [REPS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/scripts/lib.sh"
reps=${1:-3}
[[ $(id -u) == 0 ]] || { echo "rtt.sh: must run as root (mounts)" >&2; exit 1; }
(($(nproc) >= 2)) || { echo "rtt.sh: needs two CPUs" >&2; exit 1; }
need_fuse
command -v gcc >/dev/null || { echo "rtt.sh: gcc is missing" >&2; exit 1; }

work=$(mktemp -d /var/tmp/mmapfs-rtt.XXXXXX)
mnt=$work/mnt
param=/sys/module/fuse/parameters/enable_uring
param_was=$(cat "$param" 2>/dev/null || true)
restore_param() {
    case $param_was in
    Y | 1) echo 1 >"$param" ;;
    N | 0) echo 0 >"$param" ;;
    esac
}
cleanup() {
    restore_param
    unmount_quietly "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir "$mnt"
(cd "$root" && cargo build --release --quiet)
bin=$root/target/release/mmapfs
gcc -O2 -o "$work/fuse_rtt" "$here/fuse_rtt.c"
"$bin" mkfs "$work/image" --size 64M >/dev/null

probe() { "$@" "$work/fuse_rtt" "$mnt/probe" 50000; }
row() { # row LABEL COMMAND-PREFIX...
    local label=$1 i
    shift
    printf '  %-58s' "$label"
    for ((i = 0; i < reps; i++)); do printf ' %6s' "$(probe "$@")"; done
    echo
}
echo "FUSE round trip (getxattr), mean µs per call, $reps runs each:"

"$bin" mount "$work/image" "$mnt"
touch "$mnt/probe"
row "default (one worker pinned per CPU), client anywhere:"
row "default, client on CPU 0:" taskset -c 0
row "default, client on CPU 1:" taskset -c 1
fusermount3 -u "$mnt"
sleep 0.5 # the daemon releases the image lock after the unmount returns

if [[ -w $param ]]; then
    echo 1 >"$param"
    "$bin" mount -o io_uring "$work/image" "$mnt"
    restore_param # a connection that negotiated io_uring keeps it
    row "-o io_uring (ring threads pinned), client anywhere:"
    row "-o io_uring, client on CPU 0:" taskset -c 0
    row "-o io_uring, client on CPU 1:" taskset -c 1
    "$bin" stats "$mnt" | grep '^transport:' | sed 's/^/  /'
    fusermount3 -u "$mnt"
    sleep 0.5
else
    echo "  (no $param: this kernel has no FUSE over io_uring; its rows are skipped)"
fi

"$bin" mount -o no_pin_threads "$work/image" "$mnt"
row "-o no_pin_threads (scheduler places workers):"
pid=$(pgrep -f -- "--foreground.*$work/image" | head -1)
[[ -n $pid ]] || { echo "rtt.sh: daemon not found" >&2; exit 1; }
for t in /proc/"$pid"/task/*; do taskset -pc 0 "${t##*/}" >/dev/null; done
row "all workers moved to CPU 0, client on CPU 0 (same):" taskset -c 0
row "all workers moved to CPU 0, client on CPU 1 (other):" taskset -c 1
