//! Scenario 12 (`stream`): a reader verifies a file continuously while another process writes
//! hundreds of MiB into it (on mmapfs, the image grows under both).
//!
//! The writer (`stream-writer`, the client re-executed as a separate process) appends the file in
//! 1 MiB chunks, alternately with `pwrite` and with `ftruncate` + `mmap` + stores + `munmap`, and
//! after each chunk publishes the number of bytes written in a shared control page
//! (`stream.ctl`, a release store). The reader maps the whole final length up front, and in a
//! loop reads the published length (acquire load), checks every newly published byte through its
//! mapping, and re-checks a random older 1 MiB window through `pread` and through the mapping.
//! At the end the whole file is checked once more through `read()`. The verify phase checks the
//! whole file after remount.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, expect_size, open_ro, open_rw, store_pattern,
    write_pattern,
};
use crate::error::{Context, Outcome};
use crate::pattern::Rng;
use crate::scenarios::Peer;
use crate::sys::{Mapping, ftruncate, page_size};

const DATA_FILE: &str = "stream.dat";
const CONTROL_FILE: &str = "stream.ctl";
const SEED: u64 = 0x5EED_1201;
const CHUNK: u64 = 1 << 20;
/// Default amount written, in MiB.
pub const DEFAULT_MIB: u64 = 320;
const TIMEOUT: Duration = Duration::from_secs(120);

/// Control page layout.
const PROGRESS_OFFSET: usize = 0;
const DONE_OFFSET: usize = 8;

/// Reader side: starts the writer and checks until everything is written.
pub fn run(dir: &Path, mib: u64) -> Outcome {
    let total = mib * CHUNK;
    let page = page_size();
    let data_path = dir.join(DATA_FILE);
    let control_path = dir.join(CONTROL_FILE);
    let data = create_fresh(&data_path)?;
    let control = create_fresh(&control_path)?;
    ftruncate(&control, page as u64).ctx(|| "ftruncate control page")?;
    let control_map = Mapping::shared_rw(&control, 0, page).ctx(|| "mmap control page")?;
    let progress = control_map.atomic_u64(PROGRESS_OFFSET);
    let done = control_map.atomic_u32(DONE_OFFSET);
    // The whole final length is mapped now; only published bytes are ever touched.
    let map = Mapping::shared_ro(&data, 0, total as usize)
        .ctx(|| format!("mmap {mib} MiB of the (still empty) data file"))?;

    let exe = std::env::current_exe().ctx(|| "locate own executable")?;
    let mut writer = Command::new(exe)
        .arg("stream-writer")
        .arg(dir)
        .arg(mib.to_string())
        .spawn()
        .ctx(|| "spawn stream-writer")?;

    let result = (|| {
        let start = Instant::now();
        let mut rng = Rng::new(SEED);
        let mut checked: u64 = 0;
        let mut passes: u64 = 0;
        loop {
            let finished = done.load(Ordering::Acquire) == 1;
            let published = progress.load(Ordering::Acquire);
            ensure!(
                published <= total,
                "writer published {published} bytes, more than {total}"
            );
            if published > checked {
                expect_map(
                    &map,
                    checked as usize,
                    checked,
                    (published - checked) as usize,
                    Expect::Pattern(SEED),
                    "reader's mapping of newly published bytes",
                )?;
                checked = published;
            }
            if checked > 0 {
                let offset = rng.below(checked);
                let len = CHUNK.min(checked - offset);
                expect_file(
                    &data,
                    offset,
                    len,
                    Expect::Pattern(SEED),
                    "reader's pread of an older window",
                )?;
                let offset = rng.below(checked);
                let len = CHUNK.min(checked - offset);
                expect_map(
                    &map,
                    offset as usize,
                    offset,
                    len as usize,
                    Expect::Pattern(SEED),
                    "reader's mapping of an older window",
                )?;
            }
            passes += 1;
            if finished && checked == total {
                break;
            }
            if let Some(end) = writer.ended()
                && done.load(Ordering::Acquire) != 1
            {
                fail!("stream-writer {end} after publishing {published} of {total} bytes");
            }
            ensure!(
                start.elapsed() < TIMEOUT,
                "timed out after {TIMEOUT:?}: {checked} of {total} bytes published and checked ({passes} passes)"
            );
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = writer.kill();
    }
    let status = writer.wait().ctx(|| "wait for stream-writer")?;
    result?;
    ensure!(status.success(), "stream-writer {status}");
    drop(map);
    expect_size(&data, total, "after the writer finished")?;
    expect_file(
        &data,
        0,
        total,
        Expect::Pattern(SEED),
        "read() of the whole streamed file",
    )
}

/// Writer side (`stream-writer DIR MIB`), a separately executed process.
pub fn writer(dir: &Path, mib: u64) -> Outcome {
    let page = page_size();
    let data = open_rw(&dir.join(DATA_FILE))?;
    let control = open_rw(&dir.join(CONTROL_FILE))?;
    let control_map = Mapping::shared_rw(&control, 0, page).ctx(|| "writer: mmap control page")?;
    let progress = control_map.atomic_u64(PROGRESS_OFFSET);
    let done = control_map.atomic_u32(DONE_OFFSET);
    for index in 0..mib {
        let offset = index * CHUNK;
        if index % 2 == 0 {
            write_pattern(&data, SEED, offset, CHUNK)?;
        } else {
            ftruncate(&data, offset + CHUNK)
                .ctx(|| format!("writer: ftruncate to {}", offset + CHUNK))?;
            let chunk = Mapping::shared_rw(&data, offset, CHUNK as usize)
                .ctx(|| format!("writer: mmap at {offset}"))?;
            store_pattern(&chunk, 0, offset, CHUNK as usize, SEED);
            chunk.unmap().ctx(|| "writer: munmap")?;
        }
        progress.store(offset + CHUNK, Ordering::Release);
    }
    done.store(1, Ordering::Release);
    Ok(())
}

/// Verify phase.
pub fn verify(dir: &Path, mib: u64) -> Outcome {
    let total = mib * CHUNK;
    let data = open_ro(&dir.join(DATA_FILE))?;
    expect_size(&data, total, "after remount")?;
    expect_file(
        &data,
        0,
        total,
        Expect::Pattern(SEED),
        "read() after remount",
    )?;
    let map = Mapping::shared_ro(&data, 0, total as usize).ctx(|| "mmap after remount")?;
    expect_map(
        &map,
        0,
        0,
        total as usize,
        Expect::Pattern(SEED),
        "mapping after remount",
    )
}
