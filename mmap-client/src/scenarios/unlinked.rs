//! Scenario 13 (`unlinked`): a mapping outlives its file's name.
//!
//! - A file is mapped shared, its descriptor closed and its name unlinked: the mapping is now the
//!   only reference. Stores and `msync(MS_SYNC)` through it still work and read back correctly;
//!   the name stays gone.
//! - Another file is renamed over a mapped file: the old mapping keeps showing (and writing) the
//!   replaced inode, while `read()` of the name shows the new file, untouched by those stores.
//!
//! The verify phase (after remount) checks the directory holds exactly the renamed file with its
//! own contents; `mmapfs fsck` at the end of the script checks the orphans were freed.

use std::path::Path;

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_whole_file, store_pattern, write_pattern,
};
use crate::error::{Context, Outcome};
use crate::pattern;
use crate::sys::{Mapping, ftruncate, page_size};

const UNLINKED: &str = "unlinked.dat";
const TARGET: &str = "target.dat";
const REPLACEMENT: &str = "replacement.dat";
const SEED_BEFORE_UNLINK: u64 = 0x5EED_1301;
const SEED_AFTER_UNLINK: u64 = 0x5EED_1302;
const SEED_TARGET: u64 = 0x5EED_1303;
const SEED_REPLACEMENT: u64 = 0x5EED_1304;
const SEED_OLD_INODE: u64 = 0x5EED_1305;
const UNLINKED_LEN: usize = 1 << 20;

fn target_len() -> usize {
    2 * page_size()
}

/// Write phase.
pub fn write(dir: &Path) -> Outcome {
    let path = dir.join(UNLINKED);
    let file = create_fresh(&path)?;
    ftruncate(&file, UNLINKED_LEN as u64).ctx(|| "ftruncate")?;
    let map = Mapping::shared_rw(&file, 0, UNLINKED_LEN).ctx(|| "mmap(MAP_SHARED)")?;
    drop(file);
    store_pattern(&map, 0, 0, UNLINKED_LEN, SEED_BEFORE_UNLINK);
    std::fs::remove_file(&path).ctx(|| "unlink the mapped file")?;
    ensure!(
        !path.exists(),
        "{} still exists after unlink",
        path.display()
    );
    let half = UNLINKED_LEN / 2;
    store_pattern(&map, half, half as u64, half, SEED_AFTER_UNLINK);
    map.msync(libc::MS_SYNC)
        .ctx(|| "msync(MS_SYNC) of a mapping of an unlinked file")?;
    expect_map(
        &map,
        0,
        0,
        half,
        Expect::Pattern(SEED_BEFORE_UNLINK),
        "mapping of the unlinked file, stores before unlink",
    )?;
    expect_map(
        &map,
        half,
        half as u64,
        half,
        Expect::Pattern(SEED_AFTER_UNLINK),
        "mapping of the unlinked file, stores after unlink",
    )?;
    map.unmap().ctx(|| "munmap of the unlinked file")?;
    ensure!(!path.exists(), "{} reappeared after munmap", path.display());

    let target = dir.join(TARGET);
    let replacement = dir.join(REPLACEMENT);
    let len = target_len();
    let old = create_fresh(&target)?;
    write_pattern(&old, SEED_TARGET, 0, len as u64)?;
    let old_map = Mapping::shared_rw(&old, 0, len).ctx(|| "mmap the rename target")?;
    drop(old);
    let new = create_fresh(&replacement)?;
    write_pattern(&new, SEED_REPLACEMENT, 0, len as u64)?;
    drop(new);
    std::fs::rename(&replacement, &target).ctx(|| "rename over the mapped file")?;
    store_pattern(&old_map, 0, 0, page_size(), SEED_OLD_INODE);
    old_map
        .msync(libc::MS_SYNC)
        .ctx(|| "msync(MS_SYNC) of the replaced inode's mapping")?;
    expect_map(
        &old_map,
        0,
        0,
        page_size(),
        Expect::Pattern(SEED_OLD_INODE),
        "old mapping after rename, stored page",
    )?;
    expect_map(
        &old_map,
        page_size(),
        page_size() as u64,
        page_size(),
        Expect::Pattern(SEED_TARGET),
        "old mapping after rename, untouched page",
    )?;
    old_map.unmap().ctx(|| "munmap of the replaced inode")?;
    let reopened = crate::check::open_ro(&target)?;
    expect_file(
        &reopened,
        0,
        len as u64,
        Expect::Pattern(SEED_REPLACEMENT),
        "read() of the name after rename (stores to the old inode must not show)",
    )?;
    verify(dir)
}

/// Verify phase: only the renamed file is left, with its own contents.
pub fn verify(dir: &Path) -> Outcome {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ctx(|| format!("readdir {}", dir.display()))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .ctx(|| "readdir entry")?;
    names.sort();
    ensure!(
        names == [TARGET],
        "directory holds {names:?}, expected only {TARGET:?}"
    );
    expect_whole_file(
        &dir.join(TARGET),
        &pattern::generate(SEED_REPLACEMENT, 0, target_len()),
        "renamed file",
    )
}
