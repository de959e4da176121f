#!/usr/bin/env bash
# Every test: formatting and lints, unit and model tests, the mounted integration suite,
# pjdfstest (with the kernel's permission checks and with the daemon's), the mmap integration
# scripts, and a quick benchmark run.
#   scripts/test.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_fuse || exit 1
need_cmd cc gcc
need_cmd mount.fuse3 fuse3      # mount -t fuse.mmapfs and fstab lines (tests/integration/mounting.rs)
need_cmd lsattr e2fsprogs      # the inode-flag ioctl test
need_cmd setpriv util-linux    # commands run as a normal user
need_cmd setfacl acl            # POSIX ACL tests (posix::acls_as_on_tmpfs)

passed=0
failed=0
failures=()
stage() {
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then
        echo "=== $name: ok ($((SECONDS - start)) s)"
        passed=$((passed + 1))
    else
        echo "=== $name: FAILED ($((SECONDS - start)) s)"
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

stage fmt cargo fmt --all -- --check
stage clippy cargo clippy --release --workspace --all-targets -- -D warnings
stage cargo-test cargo test --release --workspace
stage pjdfstest bash scripts/pjdfstest.sh
stage pjdfstest-no-default-permissions bash scripts/pjdfstest.sh -o no_default_permissions
stage integration bash scripts/integration.sh --both
stage bench-quick bash scripts/bench.sh --quick

[ ${#failures[@]} -eq 0 ] || echo "failed stages: ${failures[*]}"
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
