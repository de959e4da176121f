# Shared helpers for the project's scripts (sourced, not run).

# Installs Debian packages whose command is missing: need_cmd CMD PACKAGE.
need_cmd() {
    local cmd=$1 pkg=$2
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "installing $pkg (for $cmd)" >&2
        if [ -z "${MMAPFS_APT_UPDATED:-}" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
            export MMAPFS_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
    fi
}

# Everything a mount needs: fusermount3 (fuse3) and the fuse module.
need_fuse() {
    need_cmd fusermount3 fuse3
    [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
    if [ ! -e /dev/fuse ]; then
        echo "/dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2
        return 1
    fi
}

# Waits until DIR is a mount point (or the daemon PID died): wait_mounted DIR PID [SECONDS].
wait_mounted() {
    local dir=$1 pid=$2 limit=${3:-20} i
    for ((i = 0; i < limit * 10; i++)); do
        mountpoint -q "$dir" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# Unmounts DIR if mounted (lazy fallback so an exit path never leaves a mount behind).
unmount_quietly() {
    local dir=$1
    if mountpoint -q "$dir" 2>/dev/null; then
        fusermount3 -u "$dir" 2>/dev/null || umount "$dir" 2>/dev/null || umount -l "$dir" 2>/dev/null || true
    fi
}
