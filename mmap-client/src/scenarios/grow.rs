//! Scenario 8 (`grow`): files grow with `ftruncate`, never through a mapping.
//!
//! - `grow.dat`: 3000 bytes written, `ftruncate` to 8 MiB, mapped: the new range reads as zeros,
//!   a pattern stored into it reaches `read()`. Then a 16 MiB mapping is made while the file is
//!   8 MiB, the file is grown to 16 MiB under the live mapping, and the upper half is written
//!   through that same mapping.
//! - `sparse.dat`: a sparse file of 5 GiB + 8 MiB; a 4 MiB window at offset 4 GiB + 4 MiB (above
//!   the 32-bit boundary) is mapped there and written. Holes (at 2 GiB, near the end, and at
//!   4 MiB, where a 32-bit offset truncation would land) read as zeros through `read()` and
//!   mappings.
//!
//! The verify phase repeats every content check after remount.

use std::path::Path;

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_size, open_ro, store_pattern,
    write_pattern,
};
use crate::error::{Context, Outcome};
use crate::sys::{Mapping, ftruncate};

const FILE: &str = "grow.dat";
const SPARSE_FILE: &str = "sparse.dat";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SEED_HEAD: u64 = 0x5EED_0801;
const SEED_NEW: u64 = 0x5EED_0802;
const SEED_UPPER: u64 = 0x5EED_0803;
const SEED_HIGH: u64 = 0x5EED_0804;
const HEAD: u64 = 3000;
const FIRST_SIZE: u64 = 8 * MIB;
const FINAL_SIZE: u64 = 16 * MIB;
const SPARSE_SIZE: u64 = 5 * GIB + 8 * MIB;
const HIGH_OFFSET: u64 = 4 * GIB + 4 * MIB;
const HIGH_LEN: u64 = 4 * MIB;

/// Write phase.
pub fn write(dir: &Path) -> Outcome {
    grow_write(dir)?;
    sparse_write(dir)
}

/// Verify phase.
pub fn verify(dir: &Path) -> Outcome {
    let file = open_ro(&dir.join(FILE))?;
    expect_size(&file, FINAL_SIZE, "grow.dat after remount")?;
    check_grow(&file, "after remount")?;
    let map =
        Mapping::shared_ro(&file, 0, FINAL_SIZE as usize).ctx(|| "mmap grow.dat after remount")?;
    expect_map(
        &map,
        FIRST_SIZE as usize,
        FIRST_SIZE,
        (FINAL_SIZE - FIRST_SIZE) as usize,
        Expect::Pattern(SEED_UPPER),
        "mapping of the upper half after remount",
    )?;
    drop(map);

    let sparse = open_ro(&dir.join(SPARSE_FILE))?;
    check_sparse(&sparse, "after remount")
}

fn grow_write(dir: &Path) -> Outcome {
    let file = create_fresh(&dir.join(FILE))?;
    write_pattern(&file, SEED_HEAD, 0, HEAD)?;
    ftruncate(&file, FIRST_SIZE).ctx(|| "ftruncate to 8 MiB")?;
    expect_size(&file, FIRST_SIZE, "after ftruncate")?;
    let map = Mapping::shared_rw(&file, 0, FIRST_SIZE as usize).ctx(|| "mmap 8 MiB")?;
    expect_map(
        &map,
        0,
        0,
        HEAD as usize,
        Expect::Pattern(SEED_HEAD),
        "mapping of the written head",
    )?;
    expect_map(
        &map,
        HEAD as usize,
        HEAD,
        (FIRST_SIZE - HEAD) as usize,
        Expect::Zero,
        "mapping of the range added by ftruncate",
    )?;
    store_pattern(
        &map,
        MIB as usize,
        MIB,
        (FIRST_SIZE - MIB) as usize,
        SEED_NEW,
    );
    map.msync(libc::MS_SYNC).ctx(|| "msync(MS_SYNC)")?;
    map.unmap().ctx(|| "munmap")?;

    // Grow under a live mapping that already extends past EOF.
    let map =
        Mapping::shared_rw(&file, 0, FINAL_SIZE as usize).ctx(|| "mmap 16 MiB of an 8 MiB file")?;
    ftruncate(&file, FINAL_SIZE).ctx(|| "ftruncate to 16 MiB under a live mapping")?;
    expect_map(
        &map,
        FIRST_SIZE as usize,
        FIRST_SIZE,
        (FINAL_SIZE - FIRST_SIZE) as usize,
        Expect::Zero,
        "range added under a live mapping",
    )?;
    store_pattern(
        &map,
        FIRST_SIZE as usize,
        FIRST_SIZE,
        (FINAL_SIZE - FIRST_SIZE) as usize,
        SEED_UPPER,
    );
    map.msync(libc::MS_SYNC)
        .ctx(|| "msync(MS_SYNC) of the grown mapping")?;
    drop(map);
    expect_size(&file, FINAL_SIZE, "after growing under the mapping")?;
    check_grow(&file, "same mount")
}

fn check_grow(file: &std::fs::File, when: &str) -> Outcome {
    expect_file(
        file,
        0,
        HEAD,
        Expect::Pattern(SEED_HEAD),
        &format!("grow.dat head via read() {when}"),
    )?;
    expect_file(
        file,
        HEAD,
        MIB - HEAD,
        Expect::Zero,
        &format!("grow.dat zero-filled range via read() {when}"),
    )?;
    expect_file(
        file,
        MIB,
        FIRST_SIZE - MIB,
        Expect::Pattern(SEED_NEW),
        &format!("grow.dat range written through the mapping, via read() {when}"),
    )?;
    expect_file(
        file,
        FIRST_SIZE,
        FINAL_SIZE - FIRST_SIZE,
        Expect::Pattern(SEED_UPPER),
        &format!("grow.dat upper half via read() {when}"),
    )
}

fn sparse_write(dir: &Path) -> Outcome {
    let file = create_fresh(&dir.join(SPARSE_FILE))?;
    ftruncate(&file, SPARSE_SIZE)
        .ctx(|| format!("ftruncate to {SPARSE_SIZE} bytes (sparse, > 4 GiB)"))?;
    let map = Mapping::shared_rw(&file, HIGH_OFFSET, HIGH_LEN as usize)
        .ctx(|| format!("mmap 4 MiB at file offset {HIGH_OFFSET} (> 4 GiB)"))?;
    expect_map(
        &map,
        0,
        HIGH_OFFSET,
        HIGH_LEN as usize,
        Expect::Zero,
        "hole mapped above 4 GiB",
    )?;
    store_pattern(&map, 0, HIGH_OFFSET, HIGH_LEN as usize, SEED_HIGH);
    map.msync(libc::MS_SYNC)
        .ctx(|| "msync(MS_SYNC) above 4 GiB")?;
    map.unmap().ctx(|| "munmap")?;
    // Unrelated small writes elsewhere must not disturb it.
    write_pattern(&file, SEED_HEAD, 0, HEAD)?;
    check_sparse(&file, "same mount")
}

fn check_sparse(file: &std::fs::File, when: &str) -> Outcome {
    expect_size(file, SPARSE_SIZE, &format!("sparse.dat {when}"))?;
    expect_file(
        file,
        0,
        HEAD,
        Expect::Pattern(SEED_HEAD),
        &format!("sparse.dat head {when}"),
    )?;
    expect_file(
        file,
        HIGH_OFFSET,
        HIGH_LEN,
        Expect::Pattern(SEED_HIGH),
        &format!("sparse.dat data above 4 GiB via read() {when}"),
    )?;
    expect_file(
        file,
        HIGH_OFFSET - 4 * GIB,
        HIGH_LEN,
        Expect::Zero,
        &format!("sparse.dat hole at the 32-bit alias of the high data {when}"),
    )?;
    expect_file(
        file,
        SPARSE_SIZE - MIB,
        MIB,
        Expect::Zero,
        &format!("sparse.dat hole before EOF {when}"),
    )?;
    let hole = Mapping::shared_ro(file, 2 * GIB, MIB as usize).ctx(|| "mmap of a hole at 2 GiB")?;
    expect_map(
        &hole,
        0,
        2 * GIB,
        MIB as usize,
        Expect::Zero,
        &format!("sparse.dat hole at 2 GiB via mapping {when}"),
    )?;
    let high = Mapping::shared_ro(file, HIGH_OFFSET - MIB, (HIGH_LEN + 2 * MIB) as usize)
        .ctx(|| "mmap around the high data")?;
    expect_map(
        &high,
        0,
        HIGH_OFFSET - MIB,
        MIB as usize,
        Expect::Zero,
        &format!("sparse.dat hole below the high data via mapping {when}"),
    )?;
    expect_map(
        &high,
        MIB as usize,
        HIGH_OFFSET,
        HIGH_LEN as usize,
        Expect::Pattern(SEED_HIGH),
        &format!("sparse.dat data above 4 GiB via mapping {when}"),
    )?;
    expect_map(
        &high,
        (MIB + HIGH_LEN) as usize,
        HIGH_OFFSET + HIGH_LEN,
        MIB as usize,
        Expect::Zero,
        &format!("sparse.dat hole above the high data via mapping {when}"),
    )
}
