//! Scenario 4 (`fork`): mappings are inherited across `fork()`.
//!
//! A shared mapping and a private mapping of the same file exist before `fork()`. While both
//! processes are alive, the parent sees the child's shared stores (and so does `read()`) and the
//! child sees the parent's post-fork stores; the child's stores to the inherited private mapping
//! stay invisible to the parent. A control word on the last page sequences the two processes.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::check::{Expect, create_fresh, expect_file, expect_map, store_pattern, write_pattern};
use crate::error::{Context, Outcome};
use crate::scenarios::{Peer, wait_for_state};
use crate::sys::{ChildEnd, Mapping, ftruncate, page_size, spawn_child};

const FILE: &str = "fork.dat";
const SEED_BEFORE: u64 = 0x5EED_0401;
const SEED_CHILD: u64 = 0x5EED_0402;
const SEED_CHILD_PRIVATE: u64 = 0x5EED_0403;
const SEED_PARENT: u64 = 0x5EED_0404;
const SEED_PARENT_PRIVATE: u64 = 0x5EED_0405;
const TIMEOUT: Duration = Duration::from_secs(20);
/// Data pages; one more page holds the control word.
const DATA_PAGES: usize = 4;

/// The single phase.
pub fn run(dir: &Path) -> Outcome {
    let page = page_size();
    let data_len = DATA_PAGES * page;
    let path = dir.join(FILE);
    let file = create_fresh(&path)?;
    write_pattern(&file, SEED_BEFORE, 0, data_len as u64)?;
    ftruncate(&file, (data_len + page) as u64).ctx(|| "ftruncate")?;

    let shared = Mapping::shared_rw(&file, 0, data_len + page).ctx(|| "mmap(MAP_SHARED)")?;
    let private = Mapping::private_rw(&file, 0, data_len).ctx(|| "mmap(MAP_PRIVATE)")?;
    // Copy every private page in the parent before forking, so what it must show is defined.
    store_pattern(&private, 0, 0, data_len, SEED_PARENT_PRIVATE);
    let state = shared.atomic_u32(data_len);

    let mut child = spawn_child(|| {
        store_pattern(&shared, page, page as u64, 2 * page, SEED_CHILD);
        store_pattern(&private, 0, 0, data_len, SEED_CHILD_PRIVATE);
        state.store(1, Ordering::Release);
        let outcome = wait_for_state(state, 2, TIMEOUT, "parent's store", None).and_then(|()| {
            expect_map(
                &shared,
                0,
                0,
                page,
                Expect::Pattern(SEED_PARENT),
                "child reading the parent's post-fork store",
            )
        });
        match outcome {
            Ok(()) => 0,
            Err(err) => {
                eprintln!("fork child: {err}");
                3
            }
        }
    })
    .ctx(|| "fork")?;

    wait_for_state(
        state,
        1,
        TIMEOUT,
        "child's stores",
        Some(&mut child as &mut dyn Peer),
    )?;
    expect_map(
        &shared,
        page,
        page as u64,
        2 * page,
        Expect::Pattern(SEED_CHILD),
        "parent reading the live child's shared stores",
    )?;
    expect_file(
        &file,
        page as u64,
        2 * page as u64,
        Expect::Pattern(SEED_CHILD),
        "read() of the child's shared stores",
    )?;
    store_pattern(&shared, 0, 0, page, SEED_PARENT);
    state.store(2, Ordering::Release);
    let end = child.wait().ctx(|| "waitpid")?;
    ensure!(end == ChildEnd::Exited(0), "forked child {end}");

    expect_map(
        &shared,
        3 * page,
        3 * page as u64,
        page,
        Expect::Pattern(SEED_BEFORE),
        "untouched page 3",
    )?;
    expect_map(
        &private,
        0,
        0,
        data_len,
        Expect::Pattern(SEED_PARENT_PRIVATE),
        "parent's MAP_PRIVATE after the child's private stores",
    )?;
    expect_file(
        &file,
        0,
        page as u64,
        Expect::Pattern(SEED_PARENT),
        "read() of the parent's store",
    )
}
