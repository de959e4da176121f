//! Scenario 6 (`sigbus`): touching mapped pages that have no file behind them raises `SIGBUS`.
//!
//! Each touch runs in a forked child; the parent checks how the child ended.
//! - A file of one page plus a few bytes, mapped over four pages: loads in the partial last page
//!   are fine; a load or a store in a page wholly past EOF kills with `SIGBUS` (shared and
//!   private mappings alike), and the store does not grow the file.
//! - A file of eight pages, mapped and read in full; a separate process (`truncate-peer`, the
//!   client re-executed) truncates it to one page: touching a cut-off page now raises `SIGBUS`,
//!   while the remaining page still holds its data.
//! - The same with dirty pages: stores into all eight pages, no `msync`, then the foreign
//!   truncate to one page plus 100 bytes. The cut-off pages raise `SIGBUS`; `msync` succeeds;
//!   late write-back must not bring the size or the dropped data back: after growing the file
//!   again with `ftruncate`, everything past the truncation point reads as zeros.

use std::path::Path;
use std::process::Command;

use crate::check::{Expect, create_fresh, expect_map, expect_size, open_rw, write_pattern};
use crate::error::{Context, Outcome};
use crate::sys::{ChildEnd, Mapping, ftruncate, page_size, run_in_child};

const FILE: &str = "sigbus.dat";
const TRUNCATE_FILE: &str = "sigbus-truncate.dat";
const SEED: u64 = 0x5EED_0601;
const SEED_TRUNCATE: u64 = 0x5EED_0602;
const DIRTY_FILE: &str = "sigbus-dirty.dat";
const SEED_DIRTY_BEFORE: u64 = 0x5EED_0603;
const SEED_DIRTY_STORES: u64 = 0x5EED_0604;

/// Run `touch` in a forked child and check it ended as `expected`.
fn expect_touch(expected: ChildEnd, what: &str, touch: impl FnOnce()) -> Outcome {
    let end = run_in_child(|| {
        touch();
        0
    })
    .ctx(|| format!("{what}: fork"))?;
    let want = match expected {
        ChildEnd::Exited(_) => "to survive".to_string(),
        ChildEnd::Signaled(_) => {
            format!("to be killed by {}", crate::sys::signal_name(libc::SIGBUS))
        }
    };
    ensure!(
        end == expected,
        "{what}: expected the touching process {want}, but it {end}"
    );
    Ok(())
}

const SURVIVES: ChildEnd = ChildEnd::Exited(0);
const SIGBUS: ChildEnd = ChildEnd::Signaled(libc::SIGBUS);

/// The single phase.
pub fn run(dir: &Path) -> Outcome {
    past_eof(dir)?;
    cut_by_foreign_truncate(dir)?;
    dirty_pages_cut_by_foreign_truncate(dir)
}

/// Run `truncate-peer FILE LEN` as a separate process.
fn foreign_truncate(path: &Path, len: u64) -> Outcome {
    let exe = std::env::current_exe().ctx(|| "locate own executable")?;
    let status = Command::new(exe)
        .arg("truncate-peer")
        .arg(path)
        .arg(len.to_string())
        .status()
        .ctx(|| "run truncate-peer")?;
    ensure!(status.success(), "truncate-peer {status}");
    Ok(())
}

fn dirty_pages_cut_by_foreign_truncate(dir: &Path) -> Outcome {
    let page = page_size();
    let len = 8 * page;
    let cut = page + 100;
    let path = dir.join(DIRTY_FILE);
    let file = create_fresh(&path)?;
    write_pattern(&file, SEED_DIRTY_BEFORE, 0, len as u64)?;
    let map = Mapping::shared_rw(&file, 0, len).ctx(|| "mmap(MAP_SHARED) of 8 pages")?;
    crate::check::store_pattern(&map, 0, 0, len, SEED_DIRTY_STORES);
    foreign_truncate(&path, cut as u64)?;
    expect_size(
        &file,
        cut as u64,
        "after the other process truncated a dirty mapping",
    )?;
    expect_touch(
        SIGBUS,
        "load in dirty page 3 after another process's truncate",
        || {
            map.load_u8(3 * page);
        },
    )?;
    map.msync(libc::MS_SYNC)
        .ctx(|| "msync(MS_SYNC) of a mapping partly cut off by truncate")?;
    drop(map);
    expect_size(
        &file,
        cut as u64,
        "after msync and munmap of the truncated dirty mapping",
    )?;
    crate::check::expect_file(
        &file,
        0,
        cut as u64,
        Expect::Pattern(SEED_DIRTY_STORES),
        "read() of the stores below the truncation point",
    )?;
    ftruncate(&file, len as u64).ctx(|| "ftruncate back to 8 pages")?;
    crate::check::expect_file(
        &file,
        cut as u64,
        (len - cut) as u64,
        Expect::Zero,
        "read() past the old truncation point after growing again (dropped dirty data must not return)",
    )?;
    let map = Mapping::shared_ro(&file, 0, len).ctx(|| "mmap after growing again")?;
    expect_map(
        &map,
        cut,
        cut as u64,
        len - cut,
        Expect::Zero,
        "mapping past the old truncation point after growing again",
    )?;
    expect_map(
        &map,
        0,
        0,
        cut,
        Expect::Pattern(SEED_DIRTY_STORES),
        "mapping below the truncation point",
    )
}

fn past_eof(dir: &Path) -> Outcome {
    let page = page_size();
    let len = page + 10;
    let file = create_fresh(&dir.join(FILE))?;
    write_pattern(&file, SEED, 0, len as u64)?;
    let shared = Mapping::shared_rw(&file, 0, 4 * page).ctx(|| "mmap(MAP_SHARED) of 4 pages")?;
    let private = Mapping::private_rw(&file, 0, 4 * page).ctx(|| "mmap(MAP_PRIVATE) of 4 pages")?;

    expect_touch(SURVIVES, "load in the partial last page", || {
        shared.load_u8(page + 100);
    })?;
    expect_touch(
        SIGBUS,
        "load in page 2, wholly past EOF (MAP_SHARED)",
        || {
            shared.load_u8(2 * page + 8);
        },
    )?;
    expect_touch(
        SIGBUS,
        "store in page 3, wholly past EOF (MAP_SHARED)",
        || {
            shared.store_u8(3 * page, 0x55);
        },
    )?;
    expect_touch(
        SIGBUS,
        "load in page 2, wholly past EOF (MAP_PRIVATE)",
        || {
            private.load_u8(2 * page);
        },
    )?;
    expect_size(&file, len as u64, "after a store past EOF")?;
    expect_map(
        &shared,
        0,
        0,
        len,
        Expect::Pattern(SEED),
        "file bytes after the SIGBUS children",
    )
}

fn cut_by_foreign_truncate(dir: &Path) -> Outcome {
    let page = page_size();
    let len = 8 * page;
    let path = dir.join(TRUNCATE_FILE);
    let file = create_fresh(&path)?;
    write_pattern(&file, SEED_TRUNCATE, 0, len as u64)?;
    let map = Mapping::shared_ro(&file, 0, len).ctx(|| "mmap(MAP_SHARED) of 8 pages")?;
    expect_map(
        &map,
        0,
        0,
        len,
        Expect::Pattern(SEED_TRUNCATE),
        "mapping before truncate",
    )?;

    foreign_truncate(&path, page as u64)?;
    expect_size(&file, page as u64, "after the other process's truncate")?;

    expect_touch(
        SIGBUS,
        "load in page 5, cut off by another process's truncate",
        || {
            map.load_u8(5 * page + 1);
        },
    )?;
    expect_touch(
        SIGBUS,
        "load in page 1, cut off by another process's truncate",
        || {
            map.load_u8(page);
        },
    )?;
    expect_touch(SURVIVES, "load in page 0, still inside the file", || {
        map.load_u8(page - 1);
    })?;
    expect_map(
        &map,
        0,
        0,
        page,
        Expect::Pattern(SEED_TRUNCATE),
        "remaining page after truncate",
    )
}

/// `truncate-peer FILE LEN`: a separate process that truncates the file.
pub fn truncate_peer(path: &Path, len: u64) -> Outcome {
    let file = open_rw(path)?;
    ftruncate(&file, len).ctx(|| format!("truncate-peer: ftruncate({len})"))
}
