//! Scenario 9 (`coherence`): `read()`/`write()` and mappings of one file stay coherent.
//!
//! A seeded random sequence of 400 operations runs against one file (64 pages plus a partial
//! page) and an in-memory model: `pwrite` through one descriptor, stores through a shared
//! mapping, `pwrite` and `pread` from forked processes with their own descriptors, checks via
//! `pread` on a second descriptor, via the mapping and via a second read-only mapping, and
//! `msync` with various flags. Every check compares with the model, so a stale page in either
//! direction is caught, with the operation number and the file offset. Then a hole is punched
//! (`fallocate(PUNCH_HOLE)`, unaligned end) under the live mappings, which must show zeros there
//! at once, and the hole is partly written again through the mapping. The verify phase replays
//! the model and checks the file after remount.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_whole_file, open_ro, open_rw, read_at,
    write_pattern,
};
use crate::error::{Context, Outcome};
use crate::pattern::{self, Rng};
use crate::sys::{ChildEnd, Mapping, page_size, run_in_child};

const FILE: &str = "coherence.dat";
const SEED_INITIAL: u64 = 0x5EED_0901;
const RNG_SEED: u64 = 0x5EED_0902;
const OPS: usize = 400;
const SEED_REFILL: u64 = 0x5EED_0903;

/// The punched range: pages 10..12 plus 300 bytes.
fn hole() -> (usize, usize) {
    (10 * page_size(), 2 * page_size() + 300)
}

/// The range re-written through the mapping after the punch: half of page 10.
fn refill() -> (usize, usize) {
    (10 * page_size() + 1000, page_size() / 2)
}

fn file_len() -> usize {
    64 * page_size() + 1234
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// `pwrite` of a pattern through the main descriptor.
    Write {
        offset: usize,
        len: usize,
        seed: u64,
    },
    /// Store of a pattern through the shared mapping.
    Store {
        offset: usize,
        len: usize,
        seed: u64,
    },
    /// `pwrite` from a forked process with its own descriptor.
    ForeignWrite {
        offset: usize,
        len: usize,
        seed: u64,
    },
    /// `pread` check through a second descriptor.
    CheckRead { offset: usize, len: usize },
    /// `pread` check from a forked process with its own descriptor.
    ForeignCheckRead { offset: usize, len: usize },
    /// Check through the shared mapping.
    CheckMap { offset: usize, len: usize },
    /// Check through a second, read-only mapping.
    CheckSecondMap { offset: usize, len: usize },
    /// `msync` of the main mapping.
    Msync { flags: i32 },
}

fn operations() -> Vec<Op> {
    let len = file_len();
    let page = page_size();
    let mut rng = Rng::new(RNG_SEED);
    (0..OPS)
        .map(|i| {
            let offset = rng.below(len as u64) as usize;
            let size = 1 + rng.below((3 * page).min(len - offset) as u64) as usize;
            let seed = RNG_SEED ^ ((i as u64) << 20);
            match rng.below(16) {
                0..=3 => Op::Write {
                    offset,
                    len: size,
                    seed,
                },
                4..=7 => Op::Store {
                    offset,
                    len: size,
                    seed,
                },
                8 => Op::ForeignWrite {
                    offset,
                    len: size,
                    seed,
                },
                9..=10 => Op::CheckRead { offset, len: size },
                11 => Op::ForeignCheckRead { offset, len: size },
                12..=13 => Op::CheckMap { offset, len: size },
                14 => Op::CheckSecondMap { offset, len: size },
                _ => Op::Msync {
                    flags: [libc::MS_SYNC, libc::MS_ASYNC, libc::MS_INVALIDATE]
                        [rng.below(3) as usize],
                },
            }
        })
        .collect()
}

/// Apply the data-changing effect of `op` to the model.
fn apply(model: &mut [u8], op: Op) {
    if let Op::Write { offset, len, seed }
    | Op::Store { offset, len, seed }
    | Op::ForeignWrite { offset, len, seed } = op
    {
        pattern::fill(seed, offset as u64, &mut model[offset..offset + len]);
    }
}

fn final_model() -> Vec<u8> {
    let mut model = pattern::generate(SEED_INITIAL, 0, file_len());
    for op in operations() {
        apply(&mut model, op);
    }
    apply_hole(&mut model);
    model
}

fn apply_hole(model: &mut [u8]) {
    let (start, len) = hole();
    model[start..start + len].fill(0);
    let (start, len) = refill();
    pattern::fill(SEED_REFILL, start as u64, &mut model[start..start + len]);
}

/// Write phase: run the operation sequence.
pub fn write(dir: &Path) -> Outcome {
    let path = dir.join(FILE);
    let len = file_len();
    let map_len = len.div_ceil(page_size()) * page_size();
    let file = create_fresh(&path)?;
    write_pattern(&file, SEED_INITIAL, 0, len as u64)?;
    let mut model = pattern::generate(SEED_INITIAL, 0, len);
    let reader = open_ro(&path)?;
    let map = Mapping::shared_rw(&file, 0, map_len).ctx(|| "mmap(MAP_SHARED)")?;
    let second = Mapping::shared_ro(&reader, 0, map_len).ctx(|| "second mmap(MAP_SHARED)")?;

    for (index, op) in operations().into_iter().enumerate() {
        let what = format!("op {index} {op:?}");
        match op {
            Op::Write { offset, len, seed } => {
                let data = pattern::generate(seed, offset as u64, len);
                file.write_all_at(&data, offset as u64)
                    .ctx(|| format!("{what}: pwrite"))?;
            }
            Op::Store { offset, len, seed } => {
                crate::check::store_pattern(&map, offset, offset as u64, len, seed);
            }
            Op::ForeignWrite { offset, len, seed } => {
                let end = run_in_child(|| {
                    let data = pattern::generate(seed, offset as u64, len);
                    match open_rw(&path)
                        .and_then(|f| f.write_all_at(&data, offset as u64).ctx(|| "pwrite"))
                    {
                        Ok(()) => 0,
                        Err(err) => {
                            eprintln!("{what}: child: {err}");
                            3
                        }
                    }
                })
                .ctx(|| format!("{what}: fork"))?;
                ensure!(end == ChildEnd::Exited(0), "{what}: writing process {end}");
            }
            Op::CheckRead { offset, len } => {
                expect_file(
                    &reader,
                    offset as u64,
                    len as u64,
                    Expect::Bytes(&model[offset..offset + len]),
                    &what,
                )?;
            }
            Op::ForeignCheckRead { offset, len } => {
                let expected = &model[offset..offset + len];
                let end = run_in_child(|| {
                    let found = open_ro(&path).and_then(|f| read_at(&f, offset as u64, len, &what));
                    match found.and_then(|found| {
                        crate::check::compare(expected, &found, offset as u64, &what)
                    }) {
                        Ok(()) => 0,
                        Err(err) => {
                            eprintln!("reading process: {err}");
                            3
                        }
                    }
                })
                .ctx(|| format!("{what}: fork"))?;
                ensure!(end == ChildEnd::Exited(0), "{what}: reading process {end}");
            }
            Op::CheckMap { offset, len } => {
                expect_map(
                    &map,
                    offset,
                    offset as u64,
                    len,
                    Expect::Bytes(&model[offset..offset + len]),
                    &what,
                )?;
            }
            Op::CheckSecondMap { offset, len } => {
                expect_map(
                    &second,
                    offset,
                    offset as u64,
                    len,
                    Expect::Bytes(&model[offset..offset + len]),
                    &what,
                )?;
            }
            Op::Msync { flags } => map.msync(flags).ctx(|| format!("{what}: msync"))?,
        }
        apply(&mut model, op);
    }

    expect_map(
        &map,
        0,
        0,
        len,
        Expect::Bytes(&model),
        "whole mapping after all operations",
    )?;

    // Punch a hole under the live mappings, then write part of it again through the mapping.
    let (start, size) = hole();
    crate::sys::punch_hole(&file, start as u64, size as u64)
        .ctx(|| format!("fallocate(PUNCH_HOLE) at {start}+{size}"))?;
    expect_map(
        &map,
        start,
        start as u64,
        size,
        Expect::Zero,
        "mapping of a hole punched under it",
    )?;
    expect_map(
        &second,
        start,
        start as u64,
        size,
        Expect::Zero,
        "second mapping of a hole punched under it",
    )?;
    expect_file(
        &reader,
        start as u64,
        size as u64,
        Expect::Zero,
        "read() of the punched hole",
    )?;
    let (refill_start, refill_len) = refill();
    crate::check::store_pattern(
        &map,
        refill_start,
        refill_start as u64,
        refill_len,
        SEED_REFILL,
    );
    apply_hole(&mut model);
    expect_file(
        &reader,
        start as u64,
        size as u64,
        Expect::Bytes(&model[start..start + size]),
        "read() of the hole after stores into it",
    )?;

    expect_file(
        &reader,
        0,
        len as u64,
        Expect::Bytes(&model),
        "whole file via read() after all operations",
    )?;
    map.msync(libc::MS_SYNC).ctx(|| "final msync(MS_SYNC)")?;
    map.unmap().ctx(|| "munmap")?;
    second.unmap().ctx(|| "munmap of the second mapping")?;
    expect_whole_file(&path, &model, "whole file via read() after munmap")
}

/// Verify phase: the file equals the replayed model.
pub fn verify(dir: &Path) -> Outcome {
    expect_whole_file(
        &dir.join(FILE),
        &final_model(),
        "coherence.dat after remount",
    )
}
