//! Scenario 1 (`shared`): `MAP_SHARED` stores reach the file.
//!
//! Write phase: an `ftruncate`d file is mapped shared, filled with a pattern through the mapping,
//! `msync(MS_SYNC)`ed, and a separate descriptor's `read()` must see every byte (before and after
//! `munmap`). A second file is written through a shared mapping and never `msync`ed: the process
//! just exits, which must write the pages back. Verify phase (after unmount/remount): size and
//! contents of both files, through `read()` and a fresh read-only shared mapping.

use std::path::Path;

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_size, open_ro, store_pattern,
};
use crate::error::{Context, Outcome};
use crate::sys::{Mapping, ftruncate, page_size};

const FILE: &str = "shared.dat";
const NO_MSYNC_FILE: &str = "shared-no-msync.dat";
const SEED: u64 = 0x5EED_0001;
const SEED_NO_MSYNC: u64 = 0x5EED_0002;

fn file_len() -> usize {
    (1 << 20) + 3 * page_size()
}

/// Write phase.
pub fn write(dir: &Path) -> Outcome {
    let path = dir.join(FILE);
    let len = file_len();
    let file = create_fresh(&path)?;
    ftruncate(&file, len as u64).ctx(|| "ftruncate")?;
    let map = Mapping::shared_rw(&file, 0, len).ctx(|| "mmap(PROT_READ|PROT_WRITE, MAP_SHARED)")?;
    expect_map(
        &map,
        0,
        0,
        len,
        Expect::Zero,
        "fresh mapping of an ftruncate'd file",
    )?;
    store_pattern(&map, 0, 0, len, SEED);
    map.msync(libc::MS_SYNC).ctx(|| "msync(MS_SYNC)")?;

    let reader = open_ro(&path)?;
    expect_size(&reader, len as u64, "after msync")?;
    expect_file(
        &reader,
        0,
        len as u64,
        Expect::Pattern(SEED),
        "read() after msync(MS_SYNC)",
    )?;
    map.unmap().ctx(|| "munmap")?;
    expect_file(
        &reader,
        0,
        len as u64,
        Expect::Pattern(SEED),
        "read() after munmap",
    )?;

    // Stores without any msync; the mapping is left for process exit to tear down.
    let file = create_fresh(&dir.join(NO_MSYNC_FILE))?;
    ftruncate(&file, len as u64).ctx(|| "ftruncate")?;
    let map = Mapping::shared_rw(&file, 0, len).ctx(|| "mmap(MAP_SHARED)")?;
    store_pattern(&map, 0, 0, len, SEED_NO_MSYNC);
    std::mem::forget(map);
    Ok(())
}

/// Verify phase.
pub fn verify(dir: &Path) -> Outcome {
    let path = dir.join(FILE);
    let len = file_len();
    let file = open_ro(&path)?;
    expect_size(&file, len as u64, "after remount")?;
    expect_file(
        &file,
        0,
        len as u64,
        Expect::Pattern(SEED),
        "read() after remount",
    )?;
    let map =
        Mapping::shared_ro(&file, 0, len).ctx(|| "mmap(PROT_READ, MAP_SHARED) after remount")?;
    expect_map(
        &map,
        0,
        0,
        len,
        Expect::Pattern(SEED),
        "shared mapping after remount",
    )?;
    let file = open_ro(&dir.join(NO_MSYNC_FILE))?;
    expect_size(&file, len as u64, "never-msynced file after remount")?;
    expect_file(
        &file,
        0,
        len as u64,
        Expect::Pattern(SEED_NO_MSYNC),
        "read() after remount of stores never msynced (written back at process exit)",
    )
}
