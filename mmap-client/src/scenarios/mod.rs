//! The scenarios, one module each, plus the small pieces they share.
//!
//! | # | subcommand(s)                         | what it shows                                   |
//! |---|---------------------------------------|-------------------------------------------------|
//! | 1 | `shared-write` / `shared-verify`      | `MAP_SHARED` stores + `msync` reach the file    |
//! | 2 | `private-write` / `private-verify`    | `MAP_PRIVATE` is copy-on-write                  |
//! | 3 | `ipc`                                 | two unrelated processes share pages             |
//! | 4 | `fork`                                | mappings inherited across `fork()`              |
//! | 5 | `eof-write` / `eof-verify`            | partial last page: zeros past EOF, never stored |
//! | 6 | `sigbus`                              | `SIGBUS` past EOF and after a foreign truncate  |
//! | 7 | `protection`                          | `SIGSEGV`, `EACCES`, `EINVAL`                   |
//! | 8 | `grow-write` / `grow-verify`          | `ftruncate` growth, sparse file above 4 GiB     |
//! | 9 | `coherence-write` / `coherence-verify`| `read`/`write` and mappings stay coherent       |
//! |10 | `hints-write` / `hints-verify`        | `MS_ASYNC`, `MS_INVALIDATE`, `MAP_POPULATE`, `madvise` |
//! |10 | `many-files-write` / `many-files-verify` | 300 files mapped at once                     |
//! |11 | `exec`                                | `PROT_EXEC`: run a binary, `dlopen` a library   |
//! |12 | `stream` / `stream-verify`            | reader never sees a wrong byte while a writer grows the file |
//! |13 | `unlinked-write` / `unlinked-verify`  | mappings outlive unlink and rename-over         |

pub mod coherence;
pub mod eof;
pub mod exec;
pub mod fork;
pub mod grow;
pub mod hints;
pub mod ipc;
pub mod many_files;
pub mod private;
pub mod protection;
pub mod shared;
pub mod sigbus;
pub mod stream;
pub mod unlinked;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::Outcome;
use crate::sys::ForkedChild;

/// Another process taking part in a handshake, which may die before answering.
pub trait Peer {
    /// `Some(description)` once the process has ended.
    fn ended(&mut self) -> Option<String>;
}

impl Peer for std::process::Child {
    fn ended(&mut self) -> Option<String> {
        match self.try_wait() {
            Ok(Some(status)) => Some(format!("{status}")),
            Ok(None) => None,
            Err(err) => Some(format!("wait failed: {err}")),
        }
    }
}

impl Peer for ForkedChild {
    fn ended(&mut self) -> Option<String> {
        match self.try_wait() {
            Ok(Some(end)) => Some(format!("{end}")),
            Ok(None) => None,
            Err(err) => Some(format!("wait failed: {err}")),
        }
    }
}

/// Spin (no syscalls except an occasional yield and liveness check) until `word == want`.
///
/// Fails after `timeout`, or early when `peer` ends without having stored `want`.
pub fn wait_for_state(
    word: &AtomicU32,
    want: u32,
    timeout: Duration,
    what: &str,
    mut peer: Option<&mut dyn Peer>,
) -> Outcome {
    let start = Instant::now();
    let mut spins: u64 = 0;
    loop {
        if word.load(Ordering::Acquire) == want {
            return Ok(());
        }
        spins += 1;
        if spins.is_multiple_of(4096) {
            if let Some(peer) = peer.as_deref_mut()
                && let Some(end) = peer.ended()
            {
                if word.load(Ordering::Acquire) == want {
                    return Ok(());
                }
                fail!(
                    "waiting for {what}: the other process {end} first (state word {})",
                    word.load(Ordering::Acquire)
                );
            }
            if start.elapsed() > timeout {
                fail!(
                    "waiting for {what}: state word still {} after {timeout:?}, expected {want} (a store by the other process never became visible)",
                    word.load(Ordering::Acquire)
                );
            }
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}
