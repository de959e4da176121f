//! Scenario 10b (`many-files`): hundreds of files mapped at the same time.
//!
//! 300 files of different sizes (most with a partial last page) are created, grown with
//! `ftruncate`, mapped shared and filled through the mappings, and their descriptors closed: the
//! mappings alone keep the files' pages reachable. With all 300 mappings alive, every file is
//! checked through `read()`; half are `msync`ed, then all are unmapped (which writes the rest back)
//! and checked again. The verify phase checks all 300 after remount.

use std::path::{Path, PathBuf};

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_size, open_ro, store_pattern,
};
use crate::error::{Context, Outcome};
use crate::sys::{Mapping, ftruncate, page_size};

const FILES: usize = 300;
const SEED_BASE: u64 = 0x5EED_1100;

fn file_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("file-{index:03}.dat"))
}

fn file_len(index: usize) -> usize {
    2 * page_size() + index * 37
}

fn seed(index: usize) -> u64 {
    SEED_BASE + index as u64
}

/// Write phase.
pub fn write(dir: &Path) -> Outcome {
    let mut maps = Vec::with_capacity(FILES);
    for index in 0..FILES {
        let path = file_path(dir, index);
        let len = file_len(index);
        let file = create_fresh(&path)?;
        ftruncate(&file, len as u64).ctx(|| format!("{}: ftruncate", path.display()))?;
        let map = Mapping::shared_rw(&file, 0, len)
            .ctx(|| format!("{}: mmap (file #{index} mapped at once)", path.display()))?;
        store_pattern(&map, 0, 0, len, seed(index));
        maps.push(map);
        // `file` is closed here; the mapping keeps the pages reachable.
    }
    for (index, map) in maps.iter().enumerate() {
        let path = file_path(dir, index);
        let len = file_len(index);
        let what = format!("{} while all {FILES} are mapped", path.display());
        let file = open_ro(&path)?;
        expect_size(&file, len as u64, &what)?;
        expect_file(
            &file,
            0,
            len as u64,
            Expect::Pattern(seed(index)),
            &format!("read() of {what}"),
        )?;
        expect_map(
            map,
            0,
            0,
            len,
            Expect::Pattern(seed(index)),
            &format!("mapping of {what}"),
        )?;
        if index % 2 == 0 {
            map.msync(libc::MS_SYNC)
                .ctx(|| format!("{}: msync", path.display()))?;
        }
    }
    for (index, map) in maps.into_iter().enumerate() {
        map.unmap().ctx(|| format!("munmap of file #{index}"))?;
    }
    check_all(dir, "after munmap")
}

fn check_all(dir: &Path, when: &str) -> Outcome {
    for index in 0..FILES {
        let path = file_path(dir, index);
        let expected = crate::pattern::generate(seed(index), 0, file_len(index));
        crate::check::expect_whole_file(&path, &expected, &format!("{} {when}", path.display()))?;
    }
    Ok(())
}

/// Verify phase.
pub fn verify(dir: &Path) -> Outcome {
    check_all(dir, "after remount")
}
