#!/usr/bin/env bash
# mmapfs integration suite: mount a fresh filesystem, run mmap-based client processes and
# third-party mmap users (SQLite, LMDB, git, fio) against it, unmount, remount, verify, fsck.
#
#   bash scripts/integration.sh                     # mmapfs (default)
#   bash scripts/integration.sh --baseline tmpfs    # the same scenarios on tmpfs (reference)
#   bash scripts/integration.sh --both              # tmpfs, then mmapfs, one summary
#   bash scripts/integration.sh --only eof          # one scenario (comma list or repeat --only)
#   bash scripts/integration.sh --list              # scenario names
#   options: --keep (keep temp dir, image and logs), --stream-mib N (default 320),
#            --step-timeout SECONDS (default 180)
#
# Output: one line per scenario, `PASS name` or `FAIL name: reason`, then `N passed, N failed`.
# Progress and log locations go to stderr. Exit status is non-zero if anything failed.
# See docs/integration.md for what each scenario shows.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS=$ROOT/scripts/integration
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CLIENT=$TARGET_DIR/release/mmap-client
MMAPFS=$TARGET_DIR/release/mmapfs

ALL_SCENARIOS=(shared private ipc fork eof sigbus protection grow coherence hints many-files exec stream
    unlinked sqlite lmdb git fio)

MODES=()
SELECTED=()
KEEP=0
STREAM_MIB=320
STEP_TIMEOUT=180
IMAGE_SIZE=16M

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while (($#)); do
    case $1 in
        --baseline)
            [[ ${2:-} == tmpfs || ${2:-} == mmapfs ]] || { echo "--baseline takes tmpfs or mmapfs" >&2; exit 2; }
            MODES=("$2"); shift ;;
        --baseline=*) MODES=("${1#*=}") ;;
        --both) MODES=(tmpfs mmapfs) ;;
        --only) [[ -n ${2:-} ]] || usage 2; IFS=, read -ra more <<<"$2"; SELECTED+=("${more[@]}"); shift ;;
        --only=*) IFS=, read -ra more <<<"${1#*=}"; SELECTED+=("${more[@]}") ;;
        --keep) KEEP=1 ;;
        --stream-mib) STREAM_MIB=${2:?}; shift ;;
        --step-timeout) STEP_TIMEOUT=${2:?}; shift ;;
        --list) printf '%s\n' "${ALL_SCENARIOS[@]}"; exit 0 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
    shift
done
((${#MODES[@]})) || MODES=(mmapfs)
for mode in "${MODES[@]}"; do
    [[ $mode == tmpfs || $mode == mmapfs ]] || { echo "unknown mode $mode" >&2; exit 2; }
done
if ((${#SELECTED[@]} == 0)); then
    SELECTED=("${ALL_SCENARIOS[@]}")
else
    for name in "${SELECTED[@]}"; do
        [[ " ${ALL_SCENARIOS[*]} " == *" $name "* ]] || { echo "unknown scenario '$name' (see --list)" >&2; exit 2; }
    done
fi
PREFIX_NAMES=0
((${#MODES[@]} > 1)) && PREFIX_NAMES=1

note() { echo "== $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Results

declare -A RESULT=() REASON=()
ORDER=()
PASSED=0
FAILED=0

result_key() { if ((PREFIX_NAMES)); then echo "$MODE/$1"; else echo "$1"; fi; }

# record NAME: register a result line (PASS until a failure is recorded).
record() {
    local key; key=$(result_key "$1")
    if [[ -z ${RESULT[$key]:-} ]]; then
        ORDER+=("$key")
        RESULT[$key]=PASS
    fi
}

record_fail() {  # name reason (the first failure of a scenario is kept)
    local key; key=$(result_key "$1")
    record "$1"
    if [[ ${RESULT[$key]} == PASS ]]; then
        RESULT[$key]=FAIL
        REASON[$key]=$2
    fi
}

has_failed() { local key; key=$(result_key "$1"); [[ ${RESULT[$key]:-} == FAIL ]]; }

print_results() {
    local key
    for key in "${ORDER[@]}"; do
        if [[ ${RESULT[$key]} == PASS ]]; then
            echo "PASS $key"
            PASSED=$((PASSED + 1))
        else
            echo "FAIL $key: ${REASON[$key]}"
            FAILED=$((FAILED + 1))
        fi
    done
    ORDER=()
}

# ---------------------------------------------------------------------------------------------
# Cleanup: runs on every exit path.

WORK=""
MNT=""
DAEMON_PID=""
STEP_PID=""
WORK_DIRS=()

stop_daemon() {
    [[ -n $DAEMON_PID ]] || return 0
    local i
    for ((i = 0; i < 50; i++)); do
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        note "mmapfs daemon $DAEMON_PID still running; sending SIGTERM"
        kill -TERM "$DAEMON_PID" 2>/dev/null
        sleep 2
        kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    wait "$DAEMON_PID" 2>/dev/null
    DAEMON_PID=""
}

force_unmount() {
    if [[ -z $MNT ]] || ! mountpoint -q "$MNT" 2>/dev/null; then
        stop_daemon
        return 0
    fi
    if [[ $MODE == mmapfs ]]; then
        fusermount3 -u "$MNT" 2>/dev/null || umount "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null ||
            umount -l "$MNT" 2>/dev/null
    else
        umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null
    fi
    stop_daemon
}

cleanup() {
    trap - EXIT INT TERM
    if [[ -n $STEP_PID ]]; then
        kill -TERM "$STEP_PID" 2>/dev/null
        wait "$STEP_PID" 2>/dev/null
        STEP_PID=""
    fi
    force_unmount
    local dir
    for dir in "${WORK_DIRS[@]}"; do
        if mountpoint -q "$dir/mnt" 2>/dev/null; then
            note "$dir/mnt is still mounted; leaving $dir in place"
        elif ((KEEP)); then
            note "kept $dir (image, logs)"
        else
            rm -rf --one-file-system "$dir"
        fi
    done
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Tools

if ((EUID != 0)); then
    echo "integration.sh must run as root (mounts, /dev/fuse)" >&2
    exit 2
fi

APT_UPDATED=0
apt_install() {
    if ((!APT_UPDATED)); then
        note "apt-get update"
        apt-get update -qq >&2 || return 1
        APT_UPDATED=1
    fi
    note "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

need_command() {  # command package...
    local cmd=$1
    shift
    command -v "$cmd" >/dev/null 2>&1 || apt_install "$@" || { echo "cannot install $* (for $cmd)" >&2; exit 2; }
}

wants() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

setup_tools() {
    need_command mountpoint util-linux
    need_command timeout coreutils
    [[ " ${MODES[*]} " == *" mmapfs "* ]] && need_command fusermount3 fuse3
    wants fio && need_command fio fio
    wants git && need_command git git
    wants exec && need_command gcc gcc libc6-dev
    wants sqlite && need_command sqlite3 sqlite3
    wants lmdb && need_command mdb_stat lmdb-utils
    PYTHON=""
    if wants sqlite || wants lmdb; then
        local candidate
        for candidate in python3 /usr/bin/python3; do
            if "$candidate" -c 'import sqlite3, lmdb' 2>/dev/null; then PYTHON=$candidate; break; fi
        done
        if [[ -z $PYTHON ]]; then
            apt_install python3 python3-lmdb || { echo "cannot install python3-lmdb" >&2; exit 2; }
            PYTHON=/usr/bin/python3
        fi
    fi
    CARGO=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
}

# ---------------------------------------------------------------------------------------------
# Build (once)

BUILT_CLIENT=0
BUILT_WORKSPACE=""
build() {  # mode -> 0 when everything that mode needs is built
    local log=$1
    if [[ $MODE == mmapfs ]]; then
        if [[ -z $BUILT_WORKSPACE ]]; then
            note "cargo build --release --workspace"
            if (cd "$ROOT" && "$CARGO" build --release --workspace) >"$log" 2>&1; then
                BUILT_WORKSPACE=ok
                BUILT_CLIENT=1
            else
                BUILT_WORKSPACE=failed
            fi
        fi
        [[ $BUILT_WORKSPACE == ok ]] && return 0
        BUILD_ERROR="cargo build --release --workspace failed: $(grep -m 1 -E '^error' "$log" || tail -n 1 "$log")"
        return 1
    fi
    if ((!BUILT_CLIENT)); then
        note "cargo build --release -p mmap-client"
        if ! (cd "$ROOT" && "$CARGO" build --release -p mmap-client) >"$log" 2>&1; then
            BUILD_ERROR="cargo build --release -p mmap-client failed: $(grep -m 1 -E '^error' "$log" || tail -n 1 "$log")"
            return 1
        fi
        BUILT_CLIENT=1
    fi
}

# The exec scenario's library and program, compiled into the work directory.
compile_probe() {
    local out=$WORK/probe
    mkdir -p "$out"
    # shellcheck disable=SC2016 # '$ORIGIN' is for the dynamic loader, not the shell
    gcc -O2 -shared -fPIC -o "$out/libmmapfsprobe.so" "$HELPERS/probe_lib.c" &&
        gcc -O2 -o "$out/probe-bin" "$HELPERS/probe_main.c" -L"$out" -lmmapfsprobe -Wl,-rpath,'$ORIGIN' -ldl
}

# ---------------------------------------------------------------------------------------------
# Mounting

mount_fs() {  # -> 0 when mounted; MOUNT_ERROR otherwise
    MOUNT_ERROR=""
    mkdir -p "$MNT"
    if [[ $MODE == tmpfs ]]; then
        mount -t tmpfs -o size=12G,mode=0755 mmapfs-baseline "$MNT" || { MOUNT_ERROR="mount -t tmpfs failed"; return 1; }
        return 0
    fi
    "$MMAPFS" mount --foreground "$IMG" "$MNT" >>"$WORK/daemon.log" 2>&1 &
    DAEMON_PID=$!
    local i
    for ((i = 0; i < 200; i++)); do
        if mountpoint -q "$MNT" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            wait "$DAEMON_PID"
            MOUNT_ERROR="mmapfs mount exited with status $? before the mount appeared: $(tail -n 1 "$WORK/daemon.log")"
            DAEMON_PID=""
            return 1
        fi
        sleep 0.1
    done
    MOUNT_ERROR="mount did not appear within 20 s ($(tail -n 1 "$WORK/daemon.log"))"
    force_unmount
    return 1
}

unmount_fs() {  # -> 0 when unmounted and (mmapfs) the daemon exited with status 0; UNMOUNT_ERROR
    UNMOUNT_ERROR=""
    local i out
    if [[ $MODE == tmpfs ]]; then
        umount "$MNT" || { UNMOUNT_ERROR="umount failed"; return 1; }
        return 0
    fi
    for ((i = 0; i < 20; i++)); do
        out=$(fusermount3 -u "$MNT" 2>&1) && break
        sleep 0.5
    done
    if mountpoint -q "$MNT"; then
        UNMOUNT_ERROR="fusermount3 -u failed: $out"
        force_unmount
        return 1
    fi
    for ((i = 0; i < 600; i++)); do
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        UNMOUNT_ERROR="daemon still running 60 s after unmount"
        stop_daemon
        return 1
    fi
    wait "$DAEMON_PID"
    local rc=$?
    DAEMON_PID=""
    ((rc == 0)) || { UNMOUNT_ERROR="daemon exited with status $rc after unmount: $(tail -n 1 "$WORK/daemon.log")"; return 1; }
}

# ---------------------------------------------------------------------------------------------
# Steps

# run_step NAME PHASE COMMAND...: run with a timeout (its whole process group is killed),
# output to a log; on failure record the last line of output as the reason.
run_step() {
    local name=$1 phase=$2
    shift 2
    local log=$WORK/logs/$name.$phase.log start=$SECONDS rc reason
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >"$log" 2>&1 &
    STEP_PID=$!
    wait "$STEP_PID"
    rc=$?
    STEP_PID=""
    if ((rc == 0)); then
        note "$name $phase: ok ($((SECONDS - start)) s)"
        return 0
    fi
    # The failing process's one-line message, preceded by up to two lines from its helpers.
    reason=$(grep -v '^[[:space:]]*$' "$log" | tail -n 3 | awk 'NR > 1 { printf " // " } { printf "%s", $0 }')
    if ((rc == 124 || rc == 137)); then
        reason="timed out after ${STEP_TIMEOUT} s${reason:+ (last output: $reason)}"
    fi
    [[ -n $reason ]] || reason="exit status $rc"
    note "$name $phase: FAILED ($((SECONDS - start)) s), log $log"
    record_fail "$name" "$phase: $reason"
    return 1
}

setup_exec_dir() {  # dir: copy the probe program, library and /bin/true onto the mount
    compile_probe || { echo "gcc failed to build the probe library/program"; return 1; }
    timeout 60 cp "$WORK/probe/libmmapfsprobe.so" "$WORK/probe/probe-bin" "$1/" &&
        timeout 60 cp "$(readlink -f /bin/true)" "$1/true"
}

write_phase() {  # name dir
    local name=$1 dir=$2
    case $name in
        shared | private | eof | grow | coherence | hints | many-files | unlinked)
            run_step "$name" write "$CLIENT" "$name-write" "$dir" ;;
        ipc | fork | sigbus | protection)
            run_step "$name" run "$CLIENT" "$name" "$dir" ;;
        exec)
            local out
            out=$(setup_exec_dir "$dir" 2>&1) || { record_fail exec "setup: ${out:-copy onto the mount failed}"; return 1; }
            run_step exec run "$CLIENT" exec "$dir" ;;
        stream) run_step stream write "$CLIENT" stream "$dir" "$STREAM_MIB" ;;
        sqlite) run_step sqlite write "$PYTHON" "$HELPERS/sqlite_check.py" write "$dir" ;;
        lmdb) run_step lmdb write "$PYTHON" "$HELPERS/lmdb_check.py" write "$dir" ;;
        git) run_step git write bash "$HELPERS/git_check.sh" write "$dir" ;;
        fio) run_step fio write bash "$HELPERS/fio_check.sh" write "$dir" ;;
    esac
}

verify_phase() {  # name dir
    local name=$1 dir=$2
    case $name in
        shared | private | grow | coherence | hints | many-files | unlinked)
            run_step "$name" verify "$CLIENT" "$name-verify" "$dir" ;;
        eof)
            if ((REMOUNTED)); then
                run_step eof verify "$CLIENT" eof-verify "$dir" --remounted
            else
                run_step eof verify "$CLIENT" eof-verify "$dir"
            fi ;;
        ipc | fork | sigbus | protection) return 0 ;;
        exec) run_step exec verify "$CLIENT" exec "$dir" ;;
        stream) run_step stream verify "$CLIENT" stream-verify "$dir" "$STREAM_MIB" ;;
        sqlite) run_step sqlite verify "$PYTHON" "$HELPERS/sqlite_check.py" verify "$dir" ;;
        lmdb) run_step lmdb verify "$PYTHON" "$HELPERS/lmdb_check.py" verify "$dir" ;;
        git) run_step git verify bash "$HELPERS/git_check.sh" verify "$dir" ;;
        fio) run_step fio verify bash "$HELPERS/fio_check.sh" verify "$dir" ;;
    esac
}

fail_all() {  # reason: every selected scenario not yet failed
    local name
    for name in "${SELECTED[@]}"; do
        has_failed "$name" || record_fail "$name" "$1"
    done
}

# ---------------------------------------------------------------------------------------------
# One complete run in one mode

run_mode() {
    MODE=$1
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmapfs-integration.$MODE.XXXXXX")
    WORK_DIRS+=("$WORK")
    MNT=$WORK/mnt
    IMG=$WORK/image.mmapfs
    REMOUNTED=0
    mkdir -p "$WORK/logs" "$MNT"
    note "mode $MODE, work dir $WORK"
    local name

    for name in "${SELECTED[@]}"; do record "$name"; done

    if ! build "$WORK/logs/build.log"; then
        [[ $MODE == mmapfs ]] && record_fail build "$BUILD_ERROR"
        fail_all "not run: $BUILD_ERROR"
        return
    fi
    if [[ $MODE == mmapfs ]]; then
        local out
        if ! out=$("$MMAPFS" mkfs "$IMG" --size "$IMAGE_SIZE" 2>&1); then
            record_fail mkfs "mmapfs mkfs $IMG --size $IMAGE_SIZE: $(tail -n 1 <<<"$out")"
            fail_all "not run: mkfs failed"
            return
        fi
        record mkfs
    fi
    if ! mount_fs; then
        record_fail mount "$MOUNT_ERROR"
        fail_all "not run: mount failed"
        return
    fi
    [[ $MODE == mmapfs ]] && record mount

    for name in "${SELECTED[@]}"; do
        mkdir -p "$MNT/$name" || { record_fail "$name" "mkdir $MNT/$name failed"; continue; }
        write_phase "$name" "$MNT/$name"
    done

    if [[ $MODE == mmapfs ]]; then
        note "unmount and remount"
        if ! unmount_fs; then
            record_fail remount "first unmount: $UNMOUNT_ERROR"
        elif ! mount_fs; then
            record_fail remount "mount again: $MOUNT_ERROR"
        else
            record remount
            REMOUNTED=1
        fi
        if ((!REMOUNTED)); then
            fail_all "verify not run: remount failed"
            force_unmount
            run_fsck
            return
        fi
    fi

    for name in "${SELECTED[@]}"; do
        has_failed "$name" || verify_phase "$name" "$MNT/$name"
    done

    if ! unmount_fs; then
        record_fail unmount "$UNMOUNT_ERROR"
    else
        [[ $MODE == mmapfs ]] && record unmount
    fi
    [[ $MODE == mmapfs ]] && run_fsck
}

run_fsck() {
    local out
    note "mmapfs fsck"
    if out=$("$MMAPFS" fsck "$IMG" 2>&1); then
        record fsck
    else
        record_fail fsck "mmapfs fsck exited non-zero: $(grep -v '^[[:space:]]*$' <<<"$out" | tail -n 1)"
    fi
    echo "$out" >"$WORK/logs/fsck.log"
}

setup_tools
for mode in "${MODES[@]}"; do
    run_mode "$mode"
    force_unmount
    print_results
done
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
