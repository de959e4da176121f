//! Scenario 2 (`private`): `MAP_PRIVATE` is copy-on-write.
//!
//! Stores into a private mapping are visible to that mapping only: not to `read()`, not to a
//! shared mapping of the same file, not after `msync`/`munmap`, not to a new private mapping,
//! and not after remount. Conversely, once a private page has been copied, later `write()`s to
//! the file do not show up in it.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_size, open_ro, store_pattern,
    write_pattern,
};
use crate::error::{Context, Outcome};
use crate::pattern;
use crate::sys::{Mapping, page_size};

const FILE: &str = "private.dat";
const SEED_FILE: u64 = 0x5EED_0201;
const SEED_PRIVATE: u64 = 0x5EED_0202;
const SEED_LATER_WRITE: u64 = 0x5EED_0203;

fn file_len() -> usize {
    16 * page_size()
}

/// Write phase.
pub fn write(dir: &Path) -> Outcome {
    let path = dir.join(FILE);
    let len = file_len();
    let page = page_size();
    let file = create_fresh(&path)?;
    write_pattern(&file, SEED_FILE, 0, len as u64)?;

    let shared = Mapping::shared_ro(&file, 0, len).ctx(|| "mmap(MAP_SHARED)")?;
    let private = Mapping::private_rw(&file, 0, len).ctx(|| "mmap(MAP_PRIVATE)")?;
    expect_map(
        &private,
        0,
        0,
        len,
        Expect::Pattern(SEED_FILE),
        "private mapping before any store",
    )?;

    store_pattern(&private, 0, 0, len, SEED_PRIVATE);
    expect_map(
        &private,
        0,
        0,
        len,
        Expect::Pattern(SEED_PRIVATE),
        "private mapping reading its own stores",
    )?;
    expect_map(
        &shared,
        0,
        0,
        len,
        Expect::Pattern(SEED_FILE),
        "shared mapping after private stores",
    )?;
    expect_file(
        &file,
        0,
        len as u64,
        Expect::Pattern(SEED_FILE),
        "read() after private stores",
    )?;
    private
        .msync(libc::MS_SYNC)
        .ctx(|| "msync(MS_SYNC) of the private mapping")?;
    expect_file(
        &file,
        0,
        len as u64,
        Expect::Pattern(SEED_FILE),
        "read() after msync of the private mapping",
    )?;

    // The copied private page no longer follows the file.
    let later = pattern::generate(SEED_LATER_WRITE, 0, page);
    file.write_all_at(&later, 0).ctx(|| "write() page 0")?;
    expect_map(
        &shared,
        0,
        0,
        page,
        Expect::Pattern(SEED_LATER_WRITE),
        "shared mapping after write() of page 0",
    )?;
    expect_map(
        &private,
        0,
        0,
        page,
        Expect::Pattern(SEED_PRIVATE),
        "private (copied) page 0 after write() to the file",
    )?;
    write_pattern(&file, SEED_FILE, 0, page as u64)?;

    private.unmap().ctx(|| "munmap of the private mapping")?;
    expect_file(
        &file,
        0,
        len as u64,
        Expect::Pattern(SEED_FILE),
        "read() after munmap of the private mapping",
    )?;
    let fresh = Mapping::private_rw(&file, 0, len).ctx(|| "second mmap(MAP_PRIVATE)")?;
    expect_map(
        &fresh,
        0,
        0,
        len,
        Expect::Pattern(SEED_FILE),
        "a new private mapping",
    )?;
    expect_map(
        &shared,
        0,
        0,
        len,
        Expect::Pattern(SEED_FILE),
        "shared mapping at the end",
    )
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
        Expect::Pattern(SEED_FILE),
        "read() after remount",
    )
}
