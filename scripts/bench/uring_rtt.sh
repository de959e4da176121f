#!/usr/bin/env bash
# What FUSE over io_uring would give mmapfs (issue 10): mounts the prototype server
# scripts/bench/uring_proto.c in its classic /dev/fuse mode, in its io_uring mode (ring threads at
# normal priority, and at SCHED_IDLE: "uring-idle"), and the real mmapfs daemon
# (target/release/mmapfs, if built: this script does not build it), and measures on each
#   - the getxattr round trip (scripts/bench/fuse_rtt.c): client unpinned, on CPU 0, on CPU 1, and
#     on CPU 0 while a busy loop also runs on CPU 0;
#   - 4 KiB random read and random write IOPS (fio, psync, O_DIRECT so that each I/O is one round
#     trip), client unpinned and pinned to CPU 1.
# The servers take turns within each repetition, so drift in the load of the shared machine hits
# them alike.
#   bash scripts/bench/uring_rtt.sh [REPS] [FIO_SECONDS]
# Needs root (mount(2); the fuse module's enable_uring parameter, which it turns on only while an
# io_uring mount starts and restores on every exit path).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/scripts/lib.sh"
reps=${1:-3}
secs=${2:-5}
[[ $(id -u) == 0 ]] || { echo "uring_rtt.sh: must run as root (mounts)" >&2; exit 1; }
(($(nproc) >= 2)) || { echo "uring_rtt.sh: needs two CPUs" >&2; exit 1; }
need_fuse
need_cmd fio fio
need_cmd jq jq
command -v gcc >/dev/null || { echo "uring_rtt.sh: gcc is missing" >&2; exit 1; }
param=/sys/module/fuse/parameters/enable_uring
[[ -w $param ]] || { echo "uring_rtt.sh: $param missing (kernel without CONFIG_FUSE_IO_URING?)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/mmapfs-uring.XXXXXX)
mnt=$work/mnt
param_was=$(cat "$param")
daemon=
hog=
cleanup() {
    [[ -n $hog ]] && kill "$hog" 2>/dev/null || true
    if mountpoint -q "$mnt" 2>/dev/null; then
        umount "$mnt" 2>/dev/null || fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    fi
    if [[ -n $daemon ]] && kill -0 "$daemon" 2>/dev/null; then
        sleep 0.5
        kill "$daemon" 2>/dev/null || true
    fi
    [[ $param_was == Y ]] && echo 1 >"$param" || echo 0 >"$param"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir "$mnt"
gcc -O2 -Wall -Wextra -pthread -o "$work/uring_proto" "$here/uring_proto.c"
gcc -O2 -o "$work/fuse_rtt" "$here/fuse_rtt.c"
servers="classic uring uring-idle"
if [[ -x $root/target/release/mmapfs ]]; then
    # A copy, so a rebuild by someone else during the run neither changes nor is blocked by it.
    cp "$root/target/release/mmapfs" "$work/mmapfs"
    echo "mmapfs: target/release/mmapfs built $(date -r "$root/target/release/mmapfs" '+%F %T')"
    servers+=" mmapfs"
fi

declare -A res # res[server,metric] = space-separated values, one per repetition
metrics="rtt_any rtt_cpu0 rtt_cpu1 rtt_busy randread randread_cpu1 randwrite randwrite_cpu1"
declare -A label=(
    [rtt_any]="getxattr RTT µs, client unpinned"
    [rtt_cpu0]="getxattr RTT µs, client on CPU 0"
    [rtt_cpu1]="getxattr RTT µs, client on CPU 1"
    [rtt_busy]="getxattr RTT µs, client+busy loop on CPU 0"
    [randread]="4K randread IOPS, client unpinned"
    [randread_cpu1]="4K randread IOPS, client on CPU 1"
    [randwrite]="4K randwrite IOPS, client unpinned"
    [randwrite_cpu1]="4K randwrite IOPS, client on CPU 1"
)

mount_server() { # mount_server SERVER; sets $file (the 64 MiB file) and $daemon
    case $1 in
    classic | uring | uring-idle)
        [[ $1 == uring* ]] && echo 1 >"$param"
        "$work/uring_proto" "$1" "$mnt" 64 2>"$work/$1.log" &
        daemon=$!
        wait_mounted "$mnt" "$daemon" 10 || { cat "$work/$1.log" >&2; return 1; }
        file=$mnt/file
        stat "$file" >/dev/null # returns once the rings are registered (INIT is answered first)
        [[ $param_was == Y ]] && echo 1 >"$param" || echo 0 >"$param"
        ;;
    mmapfs)
        rm -f "$work/image"
        "$work/mmapfs" mkfs "$work/image" --size 256M >/dev/null
        "$work/mmapfs" mount "$work/image" "$mnt"
        daemon=$(pgrep -f -- "--foreground.*$work/image" | head -1 || true)
        file=$mnt/file
        dd if=/dev/zero of="$file" bs=1M count=64 conv=fsync status=none
        ;;
    esac
}

unmount_server() { # unmount_server SERVER
    umount "$mnt" 2>/dev/null || fusermount3 -u "$mnt"
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -n $daemon ]] && kill -0 "$daemon" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $daemon ]] && wait "$daemon" 2>/dev/null || true
    daemon=
    if [[ $1 != mmapfs ]]; then
        # The prototype counts the requests each path served: the io_uring run must not have
        # fallen back to /dev/fuse (a failed registration does that silently in the kernel).
        local line ring dev
        line=$(grep 'served' "$work/$1.log")
        ring=$(sed -E 's/.* ([0-9]+) requests through io_uring.*/\1/' <<<"$line")
        dev=$(sed -E 's/.*, ([0-9]+) through .*/\1/' <<<"$line")
        echo "    $line" >&2
        if [[ $1 == uring* ]] && ((ring == 0 || dev > 100)); then
            echo "uring_rtt.sh: the io_uring mount did not run through the rings" >&2
            cat "$work/$1.log" >&2
            return 1
        fi
    fi
}

fio_iops() { # fio_iops randread|randwrite FILE [taskset -c CPU]
    local rw=$1 f=$2
    shift 2
    "$@" fio --name=uring-rtt --filename="$f" --rw="$rw" --bs=4k --ioengine=psync --direct=1 \
        --size=64m --time_based --runtime="$secs" --ramp_time=1 --output-format=json |
        jq -r --arg rw "$rw" '.jobs[0] | (if $rw == "randread" then .read else .write end).iops | floor'
}

measure() { # measure SERVER
    local s=$1
    res[$s,rtt_any]+=" $("$work/fuse_rtt" "$file" 50000)"
    res[$s,rtt_cpu0]+=" $(taskset -c 0 "$work/fuse_rtt" "$file" 50000)"
    res[$s,rtt_cpu1]+=" $(taskset -c 1 "$work/fuse_rtt" "$file" 50000)"
    # A server thread pinned to the client's CPU must share it with whatever else runs there.
    taskset -c 0 bash -c 'while :; do :; done' &
    hog=$!
    res[$s,rtt_busy]+=" $(taskset -c 0 "$work/fuse_rtt" "$file" 5000)"
    kill "$hog"
    wait "$hog" 2>/dev/null || true
    hog=
    res[$s,randread]+=" $(fio_iops randread "$file")"
    res[$s,randread_cpu1]+=" $(fio_iops randread "$file" taskset -c 1)"
    res[$s,randwrite]+=" $(fio_iops randwrite "$file")"
    res[$s,randwrite_cpu1]+=" $(fio_iops randwrite "$file" taskset -c 1)"
}

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= reps; r++)); do
    for s in $servers; do
        echo "  repetition $r/$reps: $s" >&2
        mount_server "$s"
        measure "$s"
        unmount_server "$s"
    done
done
echo "load average at end:   $(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "classic = prototype, one pinned worker per CPU on cloned /dev/fuse fds; uring = prototype,"
echo "FUSE over io_uring, one pinned ring thread per CPU (uring-idle: those threads at SCHED_IDLE);"
echo "mmapfs = target/release/mmapfs (fuser 0.18). fio: psync, O_DIRECT, ${secs} s after 1 s ramp."
printf '%-42s %-10s %s\n' "measure" "server" "runs (min-max)"
for m in $metrics; do
    for s in $servers; do
        vals=${res[$s,$m]# }
        range=$(tr ' ' '\n' <<<"$vals" | sort -g | sed -n '1p;$p' | paste -sd-)
        printf '%-42s %-10s %s   (%s)\n' "${label[$m]}" "$s" "$vals" "$range"
    done
done
