#!/usr/bin/env bash
# git on the mount: packfiles and their .idx files are read through mmap.
#
#   git_check.sh write DIR    init DIR/repo, commit 300 files in 3 commits, git gc, fsck
#   git_check.sh verify DIR   fsck --full, history, index/worktree match (after remount)
#
# Prints one line and exits 1 on the first failed check.
set -euo pipefail

fail() { echo "git: $*" >&2; exit 1; }

# Predictable identity and no user/system config; the mount may report another owner.
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export GIT_AUTHOR_NAME=mmapfs GIT_AUTHOR_EMAIL=mmapfs@example.invalid
export GIT_COMMITTER_NAME=mmapfs GIT_COMMITTER_EMAIL=mmapfs@example.invalid
export GIT_AUTHOR_DATE="2024-01-01T00:00:00Z" GIT_COMMITTER_DATE="2024-01-01T00:00:00Z"
FILES=300
COMMITS=3

g() { git -c safe.directory='*' -c core.packedGitWindowSize=64k -c gc.auto=0 "$@"; }

check() {
    local repo=$1 when=$2 out
    out=$(g -C "$repo" fsck --full --strict 2>&1) || fail "git fsck --full $when: $out"
    [[ -z $out ]] || fail "git fsck --full $when reported: $(head -n 3 <<<"$out")"
    local count; count=$(g -C "$repo" rev-list --count HEAD) || fail "rev-list $when"
    [[ $count == "$COMMITS" ]] || fail "$when: $count commits, expected $COMMITS"
    local files; files=$(g -C "$repo" ls-files | wc -l)
    [[ $files == "$FILES" ]] || fail "$when: $files tracked files, expected $FILES"
    local status; status=$(g -C "$repo" status --porcelain) || fail "git status $when"
    [[ -z $status ]] || fail "$when: worktree differs from HEAD: $(head -n 3 <<<"$status")"
    local loose; loose=$(g -C "$repo" count-objects -v | awk '$1 == "count:" {print $2}')
    [[ $loose == 0 ]] || fail "$when: $loose loose objects after gc, expected all packed"
    local pack; pack=$(ls "$repo"/.git/objects/pack/*.idx 2>/dev/null | head -n 1)
    [[ -n $pack ]] || fail "$when: no packfile after gc"
    g -C "$repo" verify-pack "$pack" >/dev/null 2>&1 || fail "$when: git verify-pack $pack failed"
    # Read every blob back out of the pack and compare with the expected generator output.
    local expected actual
    expected=$(generate_listing)
    actual=$(g -C "$repo" grep -c '' HEAD -- . | sed 's/^HEAD://' | sort)
    [[ $expected == "$actual" ]] || fail "$when: line counts of blobs read from the pack differ from what was committed"
}

# "path:line-count" for every file, as `git grep -c` prints it.
generate_listing() {
    local i
    for ((i = 0; i < FILES; i++)); do
        printf 'dir%d/file%03d.txt:%d\n' $((i % 10)) "$i" $((5 + i % 40 + (i < FILES / COMMITS ? 0 : 1)))
    done | sort
}

write_file() {  # index, generation
    local i=$1 gen=$2 n=$((5 + $1 % 40)) path line
    printf -v path 'dir%d/file%03d.txt' $((i % 10)) "$i"
    mkdir -p "${path%/*}"
    {
        for ((line = 0; line < n; line++)); do
            printf 'file %d line %d: %08x\n' "$i" "$line" $(((i * 2654435761 + line * 40503) % 4294967296))
        done
        ((gen == 0)) || printf 'generation %d\n' "$gen"
    } >"$path"
}

write() {
    local repo=$1/repo i c
    rm -rf "$repo"
    g init -q "$repo" || fail "git init"
    cd "$repo"
    for ((i = 0; i < FILES; i++)); do write_file "$i" 0; done
    g add -A && g commit -q -m "300 files" || fail "first commit"
    # Second and third commits: rewrite two thirds of the files.
    for ((c = 1; c < COMMITS; c++)); do
        for ((i = c * FILES / COMMITS; i < FILES; i++)); do write_file "$i" "$c"; done
        g add -A && g commit -q -m "generation $c" || fail "commit $c"
    done
    g gc -q --prune=now || fail "git gc"
    check "$repo" "after gc"
}

verify() {
    local repo=$1/repo
    [[ -d $repo/.git ]] || fail "$repo missing"
    check "$repo" "after remount"
}

[[ $# == 2 && ($1 == write || $1 == verify) ]] || fail "usage: git_check.sh write|verify DIR"
"$1" "$2"
