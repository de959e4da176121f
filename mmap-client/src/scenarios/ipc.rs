//! Scenario 3 (`ipc`): two unrelated processes share pages through a `MAP_SHARED` file mapping.
//!
//! The client re-executes itself as a separate program (`ipc-peer FILE`, a fresh address space,
//! not a fork). Both map the same file shared. Data and a state word are exchanged purely by
//! memory stores and loads, with no syscall in between: the peer stores a payload and sets the
//! state to 1; the parent checks the payload, stores its own and sets the state to 2; the peer
//! checks that and sets 3. Waits are bounded spins.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::check::{Expect, create_fresh, expect_file, expect_map, open_rw, store_pattern};
use crate::error::{Context, Outcome};
use crate::scenarios::wait_for_state;
use crate::sys::{Mapping, ftruncate, page_size};

const FILE: &str = "ipc.dat";
const SEED_PEER: u64 = 0x5EED_0301;
const SEED_PARENT: u64 = 0x5EED_0302;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Parent side: creates the file, starts the peer, runs the exchange.
pub fn run(dir: &Path) -> Outcome {
    let path = dir.join(FILE);
    let page = page_size();
    let file = create_fresh(&path)?;
    ftruncate(&file, 2 * page as u64).ctx(|| "ftruncate")?;
    let map = Mapping::shared_rw(&file, 0, 2 * page).ctx(|| "mmap(MAP_SHARED)")?;
    let state = map.atomic_u32(0);

    let exe = std::env::current_exe().ctx(|| "locate own executable")?;
    let mut peer = Command::new(exe)
        .arg("ipc-peer")
        .arg(&path)
        .spawn()
        .ctx(|| "spawn ipc-peer")?;

    let result = (|| {
        wait_for_state(state, 1, TIMEOUT, "peer's first store", Some(&mut peer))?;
        expect_map(
            &map,
            page,
            page as u64,
            page,
            Expect::Pattern(SEED_PEER),
            "parent reading the peer's stores",
        )?;
        store_pattern(&map, page, page as u64, page, SEED_PARENT);
        state.store(2, Ordering::Release);
        wait_for_state(state, 3, TIMEOUT, "peer's acknowledgement", Some(&mut peer))
    })();
    if result.is_err() {
        let _ = peer.kill();
    }
    let status = peer.wait().ctx(|| "wait for ipc-peer")?;
    result?;
    ensure!(status.success(), "ipc-peer {status}");
    expect_file(
        &file,
        page as u64,
        page as u64,
        Expect::Pattern(SEED_PARENT),
        "read() of the exchanged page",
    )
}

/// Peer side (`ipc-peer FILE`), a separately executed process.
pub fn peer(path: &Path) -> Outcome {
    let page = page_size();
    let file = open_rw(path)?;
    let map = Mapping::shared_rw(&file, 0, 2 * page).ctx(|| "peer: mmap(MAP_SHARED)")?;
    let state = map.atomic_u32(0);
    ensure!(
        state.load(Ordering::Acquire) == 0,
        "peer: state word not 0 at start"
    );
    store_pattern(&map, page, page as u64, page, SEED_PEER);
    state.store(1, Ordering::Release);
    wait_for_state(state, 2, TIMEOUT, "parent's store", None)?;
    expect_map(
        &map,
        page,
        page as u64,
        page,
        Expect::Pattern(SEED_PARENT),
        "peer reading the parent's stores",
    )?;
    state.store(3, Ordering::Release);
    Ok(())
}
