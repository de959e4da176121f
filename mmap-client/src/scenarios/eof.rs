//! Scenario 5 (`eof`): the partial last page.
//!
//! A file whose size is not a page multiple is mapped to the end of its last page. Bytes past
//! EOF read as zero through the mapping; stores there are allowed (same page) but never reach the
//! file: after `msync` and `munmap` the size is unchanged and `read()` returns exactly the file
//! bytes. The verify phase checks size and contents again after remount; with `--remounted`
//! (only meaningful after a real remount, when the last page is read afresh from the filesystem)
//! it also checks that a new mapping shows zeros past EOF and that an extending `ftruncate`
//! exposes zeros, not the bytes stored past EOF before the remount.
//!
//! Those two checks cannot run on the same mount: Linux keeps the stored bytes in the cached
//! last page, and on tmpfs that page *is* the file, so a new mapping, and even an extending
//! `ftruncate`, still show them there (tmpfs is the reference, so the client does not fail it).

use std::path::Path;

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_size, open_rw, write_pattern,
};
use crate::error::{Context, Outcome};
use crate::sys::{Mapping, ftruncate, page_size};

const FILE: &str = "eof.dat";
const SEED: u64 = 0x5EED_0501;
const GARBAGE: u8 = 0xEE;

fn file_len() -> usize {
    2 * page_size() + 123
}

/// Map the partial file, check zeros past EOF, store garbage there, msync, munmap, check.
fn store_past_eof(path: &Path) -> Outcome<std::fs::File> {
    let page = page_size();
    let len = file_len();
    let map_len = len.div_ceil(page) * page;
    let file = create_fresh(path)?;
    write_pattern(&file, SEED, 0, len as u64)?;
    let map = Mapping::shared_rw(&file, 0, map_len)
        .ctx(|| "mmap(MAP_SHARED) to the end of the last page")?;
    expect_map(
        &map,
        0,
        0,
        len,
        Expect::Pattern(SEED),
        "mapping of the file bytes",
    )?;
    expect_map(
        &map,
        len,
        len as u64,
        map_len - len,
        Expect::Zero,
        "mapped bytes past EOF in the last page",
    )?;
    map.write_from(len, &vec![GARBAGE; map_len - len]);
    map.msync(libc::MS_SYNC).ctx(|| "msync(MS_SYNC)")?;
    map.unmap().ctx(|| "munmap")?;
    expect_size(&file, len as u64, "after stores past EOF, msync and munmap")?;
    crate::check::expect_whole_file(
        path,
        &crate::pattern::generate(SEED, 0, len),
        "read() of the whole file after stores past EOF",
    )?;
    Ok(file)
}

/// Extend by `ftruncate`, check the exposed range is zero, then cut back to the original size.
fn extend_exposes_zeros(file: &std::fs::File, what: &str) -> Outcome {
    let page = page_size();
    let len = file_len();
    ftruncate(file, (len + page) as u64).ctx(|| format!("{what}: extending ftruncate"))?;
    expect_file(
        file,
        len as u64,
        page as u64,
        Expect::Zero,
        &format!("{what}: read() of the range exposed by an extending ftruncate"),
    )?;
    expect_file(
        file,
        0,
        len as u64,
        Expect::Pattern(SEED),
        &format!("{what}: read() of the original bytes after extension"),
    )?;
    ftruncate(file, len as u64).ctx(|| format!("{what}: ftruncate back"))
}

/// Write phase.
pub fn write(dir: &Path) -> Outcome {
    store_past_eof(&dir.join(FILE)).map(drop)
}

/// Verify phase; `remounted` enables the checks that need a fresh page cache.
pub fn verify(dir: &Path, remounted: bool) -> Outcome {
    let page = page_size();
    let len = file_len();
    let map_len = len.div_ceil(page) * page;
    let path = dir.join(FILE);
    let file = open_rw(&path)?;
    expect_size(&file, len as u64, "after remount")?;
    crate::check::expect_whole_file(
        &path,
        &crate::pattern::generate(SEED, 0, len),
        "read() after remount",
    )?;
    let map = Mapping::shared_ro(&file, 0, map_len).ctx(|| "mmap after remount")?;
    expect_map(
        &map,
        0,
        0,
        len,
        Expect::Pattern(SEED),
        "mapping after remount",
    )?;
    if !remounted {
        return Ok(());
    }
    expect_map(
        &map,
        len,
        len as u64,
        map_len - len,
        Expect::Zero,
        "mapped bytes past EOF after remount",
    )?;
    drop(map);
    extend_exposes_zeros(&file, "after remount")
}
