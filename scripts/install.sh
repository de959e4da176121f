#!/usr/bin/env bash
# Installs mmapfs where mount(8) and /etc/fstab find it, with its man pages and shell completions
# (run as root for the default prefix):
#   scripts/install.sh [--prefix DIR]     (default /usr/local: DIR/bin/mmapfs)
# mount(8) runs helpers with a fixed PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:
# /sbin:/bin): `mount -t fuse.mmapfs IMAGE DIR` and fstab lines of type fuse.mmapfs reach
# mount.fuse3 (package fuse3), which runs `mmapfs IMAGE DIR -o OPTIONS` from that PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

prefix=/usr/local
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=$2; shift ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

need_fuse
need_cmd mount.fuse3 fuse3
cargo build --release --quiet
bin=target/release/mmapfs
install -D -m 0755 "$bin" "$prefix/bin/mmapfs"
echo "installed $prefix/bin/mmapfs"
# Man pages (mmapfs(1), mmapfs-mount(1), ...) and shell completions, generated from the CLI.
man=$(mktemp -d)
trap 'rm -rf "$man"' EXIT
"$bin" manpages "$man"
install -d "$prefix/share/man/man1"
install -m 0644 "$man"/*.1 "$prefix/share/man/man1/"
completions() { # SHELL DESTINATION
    install -d "$(dirname "$2")"
    "$bin" completions "$1" >"$2"
}
completions bash "$prefix/share/bash-completion/completions/mmapfs"
completions zsh "$prefix/share/zsh/site-functions/_mmapfs"
completions fish "$prefix/share/fish/vendor_completions.d/mmapfs.fish"
echo "installed man pages in $prefix/share/man/man1 and bash, zsh and fish completions"
echo "mount with: mount -t fuse.mmapfs IMAGE DIR   or an /etc/fstab line:"
echo "  /path/to/image  /mnt/point  fuse.mmapfs  defaults,nofail  0 0"
