//! Scenario 10a (`hints`): `msync` flags, `MAP_POPULATE` and `madvise` hints.
//!
//! On a 32-page file: a `MAP_POPULATE` mapping is fully resident (`mincore`) and correct;
//! `MADV_NORMAL/SEQUENTIAL/RANDOM/WILLNEED` are accepted and change no data; `MS_ASYNC` after
//! stores is accepted and `read()` sees the stores; after a `write()`, `MS_INVALIDATE` is accepted
//! and the mapping shows the written data; `MS_SYNC|MS_ASYNC` and an unaligned address are
//! `EINVAL`; `MADV_DONTNEED` on a shared mapping keeps stored data (re-read sees the file data),
//! on a private mapping it discards the private copies; `MADV_COLD`/`MADV_PAGEOUT` after stores
//! lose nothing. The verify phase checks the resulting layout after remount.

use std::path::Path;

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_size, open_ro, store_pattern,
    write_pattern,
};
use crate::error::{Context, Outcome};
use crate::sys::{Mapping, page_size};

const FILE: &str = "hints.dat";
const PAGES: usize = 32;
const SEED_FILE: u64 = 0x5EED_1001;
const SEED_ASYNC: u64 = 0x5EED_1002;
const SEED_INVALIDATE: u64 = 0x5EED_1003;
const SEED_DONTNEED: u64 = 0x5EED_1004;
const SEED_PRIVATE: u64 = 0x5EED_1005;
const SEED_PAGEOUT: u64 = 0x5EED_1006;

/// Final layout: (first page, page count, seed).
const LAYOUT: [(usize, usize, u64); 6] = [
    (0, 8, SEED_ASYNC),
    (8, 4, SEED_INVALIDATE),
    (12, 4, SEED_DONTNEED),
    (16, 4, SEED_FILE),
    (20, 4, SEED_PAGEOUT),
    (24, 8, SEED_FILE),
];

fn check_layout(file: &std::fs::File, map: &Mapping, when: &str) -> Outcome {
    let page = page_size();
    for (first, count, seed) in LAYOUT {
        let (offset, len) = (first * page, count * page);
        expect_file(
            file,
            offset as u64,
            len as u64,
            Expect::Pattern(seed),
            &format!("read() of pages {first}..{} {when}", first + count),
        )?;
        expect_map(
            map,
            offset,
            offset as u64,
            len,
            Expect::Pattern(seed),
            &format!("mapping of pages {first}..{} {when}", first + count),
        )?;
    }
    Ok(())
}

fn expect_einval(result: std::io::Result<()>, what: &str) -> Outcome {
    match result {
        Ok(()) => fail!("{what}: succeeded, expected EINVAL"),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(err) => fail!("{what}: {err}, expected EINVAL"),
    }
}

/// Write phase.
pub fn write(dir: &Path) -> Outcome {
    let page = page_size();
    let len = PAGES * page;
    let path = dir.join(FILE);
    let file = create_fresh(&path)?;
    write_pattern(&file, SEED_FILE, 0, len as u64)?;

    let map = Mapping::map(
        &file,
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_POPULATE,
    )
    .ctx(|| "mmap(MAP_SHARED|MAP_POPULATE)")?;
    let resident = map.resident_pages().ctx(|| "mincore")?;
    if let Some(missing) = resident.iter().position(|r| !r) {
        fail!("MAP_POPULATE mapping: page {missing} not resident according to mincore");
    }
    expect_map(
        &map,
        0,
        0,
        len,
        Expect::Pattern(SEED_FILE),
        "MAP_POPULATE mapping",
    )?;

    for (advice, name) in [
        (libc::MADV_SEQUENTIAL, "MADV_SEQUENTIAL"),
        (libc::MADV_RANDOM, "MADV_RANDOM"),
        (libc::MADV_WILLNEED, "MADV_WILLNEED"),
        (libc::MADV_NORMAL, "MADV_NORMAL"),
    ] {
        map.madvise(advice).ctx(|| format!("madvise({name})"))?;
        expect_map(
            &map,
            0,
            0,
            len,
            Expect::Pattern(SEED_FILE),
            &format!("mapping after madvise({name})"),
        )?;
    }

    // MS_ASYNC.
    store_pattern(&map, 0, 0, 8 * page, SEED_ASYNC);
    map.msync(libc::MS_ASYNC).ctx(|| "msync(MS_ASYNC)")?;
    expect_file(
        &file,
        0,
        8 * page as u64,
        Expect::Pattern(SEED_ASYNC),
        "read() after stores and msync(MS_ASYNC)",
    )?;
    map.msync(libc::MS_SYNC).ctx(|| "msync(MS_SYNC)")?;

    // MS_INVALIDATE after write().
    write_pattern(&file, SEED_INVALIDATE, 8 * page as u64, 4 * page as u64)?;
    map.msync(libc::MS_INVALIDATE)
        .ctx(|| "msync(MS_INVALIDATE)")?;
    expect_map(
        &map,
        8 * page,
        8 * page as u64,
        4 * page,
        Expect::Pattern(SEED_INVALIDATE),
        "mapping after write() and msync(MS_INVALIDATE)",
    )?;
    map.msync(libc::MS_ASYNC | libc::MS_INVALIDATE)
        .ctx(|| "msync(MS_ASYNC|MS_INVALIDATE)")?;
    map.msync(libc::MS_SYNC | libc::MS_INVALIDATE)
        .ctx(|| "msync(MS_SYNC|MS_INVALIDATE)")?;
    expect_einval(
        map.msync(libc::MS_SYNC | libc::MS_ASYNC),
        "msync(MS_SYNC|MS_ASYNC)",
    )?;
    expect_einval(
        map.msync_range(1, page, libc::MS_SYNC),
        "msync at an unaligned address",
    )?;

    // MADV_DONTNEED on a shared mapping: stores live in the file, re-read sees them.
    store_pattern(&map, 12 * page, 12 * page as u64, 4 * page, SEED_DONTNEED);
    map.madvise_range(12 * page, 4 * page, libc::MADV_DONTNEED)
        .ctx(|| "madvise(MADV_DONTNEED) on MAP_SHARED")?;
    expect_map(
        &map,
        12 * page,
        12 * page as u64,
        4 * page,
        Expect::Pattern(SEED_DONTNEED),
        "shared mapping re-read after MADV_DONTNEED",
    )?;
    expect_file(
        &file,
        12 * page as u64,
        4 * page as u64,
        Expect::Pattern(SEED_DONTNEED),
        "read() after MADV_DONTNEED",
    )?;

    // MADV_DONTNEED on a private mapping: private copies are dropped, file data shows again.
    let private = Mapping::private_rw(&file, 0, len).ctx(|| "mmap(MAP_PRIVATE)")?;
    store_pattern(
        &private,
        16 * page,
        16 * page as u64,
        4 * page,
        SEED_PRIVATE,
    );
    expect_map(
        &private,
        16 * page,
        16 * page as u64,
        4 * page,
        Expect::Pattern(SEED_PRIVATE),
        "private stores",
    )?;
    private
        .madvise_range(16 * page, 4 * page, libc::MADV_DONTNEED)
        .ctx(|| "madvise(MADV_DONTNEED) on MAP_PRIVATE")?;
    expect_map(
        &private,
        16 * page,
        16 * page as u64,
        4 * page,
        Expect::Pattern(SEED_FILE),
        "private mapping after MADV_DONTNEED (copies discarded)",
    )?;
    drop(private);

    // MADV_COLD / MADV_PAGEOUT after stores lose nothing.
    store_pattern(&map, 20 * page, 20 * page as u64, 4 * page, SEED_PAGEOUT);
    map.madvise_range(20 * page, 2 * page, libc::MADV_COLD)
        .ctx(|| "madvise(MADV_COLD)")?;
    map.madvise_range(22 * page, 2 * page, libc::MADV_PAGEOUT)
        .ctx(|| "madvise(MADV_PAGEOUT)")?;
    expect_map(
        &map,
        20 * page,
        20 * page as u64,
        4 * page,
        Expect::Pattern(SEED_PAGEOUT),
        "mapping after MADV_COLD/MADV_PAGEOUT",
    )?;

    map.msync(libc::MS_SYNC).ctx(|| "final msync(MS_SYNC)")?;
    check_layout(&file, &map, "same mount")?;
    map.unmap().ctx(|| "munmap")?;
    let fresh = Mapping::shared_ro(&file, 0, len).ctx(|| "new mapping")?;
    check_layout(&file, &fresh, "in a new mapping")
}

/// Verify phase.
pub fn verify(dir: &Path) -> Outcome {
    let len = PAGES * page_size();
    let file = open_ro(&dir.join(FILE))?;
    expect_size(&file, len as u64, "after remount")?;
    let map = Mapping::map(
        &file,
        0,
        len,
        libc::PROT_READ,
        libc::MAP_SHARED | libc::MAP_POPULATE,
    )
    .ctx(|| "mmap(MAP_POPULATE) after remount")?;
    map.madvise(libc::MADV_WILLNEED)
        .ctx(|| "madvise(MADV_WILLNEED) after remount")?;
    check_layout(&file, &map, "after remount")
}
