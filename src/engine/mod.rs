//! The storage engine: everything the image stores, changed only through transactions.
//! `docs/design/transactions.md` is the design; `docs/format.md` the layout.
//!
//! Layers (each uses only the ones above it in this list):
//! - `pager`: block access, trailers, copy-on-write of one block;
//! - `alloc`: the space map (group bitmaps in a block tree), deferred frees, image growth;
//! - `tree`: block trees (copy-on-write paths);
//! - `inode`, `data`, `dir`, `xattr`: inode table and orphan list, file contents, directories,
//!   extended attributes;
//! - `txn`: transactions ([`Tx`]), commits, `fsync`, the committer thread;
//! - `open`: mkfs, open and recovery; `check`: fsck.
//!
//! Locking (callers above follow it):
//! - Every change runs inside a [`Tx`], which holds the commit gate shared: a commit closes the
//!   running transaction only between operations.
//! - Inode `n` is read under `stripe(n).read()` and changed under `stripe(n).write()`; a
//!   directory's entries and a file's tree belong to its inode. Several stripes are taken in
//!   ascending stripe order ([`Engine::lock_many`]).
//! - `itab` (inode table, free list, orphan list) and then `space` (allocator) are leaf locks
//!   taken in that order; nothing else is taken while they are held.
//! - Inode records are read without a lock (tree pointers are published with atomic stores); a
//!   reader retries when blocks may have been reused during its read (see `inode.rs`).

mod alloc;
pub mod check;
mod data;
mod dir;
mod inode;
mod open;
mod pager;
mod tree;
mod txn;
mod xattr;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::format::*;
use crate::image::{Image, VolatileTable, VolatileWords};

pub use data::DataRun;
pub use dir::DirEntry;
pub use open::{OpenError, OpenMode, Recovery, RootDir, peek_superblock};
pub use tree::Run;
pub use txn::{DEFAULT_COMMIT_INTERVAL, Tx};
pub use xattr::SetMode;

/// Number of inode lock stripes (inode `n` uses stripe `n % LOCK_STRIPES`).
const LOCK_STRIPES: usize = 1024;

/// Volatile per-inode counters (see [`VolatileTable`]).
const VOL_REFS: u64 = 0;
const VOL_META_TXN: u64 = 1;
const VOL_STRUCT_TXN: u64 = 2;

pub struct Engine {
    img: Image,
    hash_seed: u64,
    mode: OpenMode,
    /// The superblock fields that are neither inode-table nor allocator state (uuid, counts
    /// of mounts, state): the template each commit starts from.
    misc: Mutex<Superblock>,
    /// `misc` changed since the last commit (mount count at the first commit of a mount).
    misc_dirty: Mutex<bool>,
    itab: Mutex<inode::ItabState>,
    /// Published copies of the inode table's root and size, for lock-free lookups.
    itab_tree: AtomicU64,
    itab_slots: AtomicU64,
    space: Mutex<alloc::Space>,
    txm: txn::TxnManager,
    stripes: Box<[RwLock<()>]>,
    vol: VolatileTable,
    /// One bit per block: a metadata block verified against its trailer checksum since open,
    /// or written by this process (its checksum is sealed at commit). Every other block is
    /// verified before its first use (see `Engine::expect_kind`).
    trusted: VolatileWords,
    dirty_data: Mutex<data::DirtyData>,
    /// Damage was found while mounted: the final commit marks the image for fsck.
    errors: AtomicBool,
    /// Blocks reached through damaged pointers (see [`Engine::suspect`]).
    suspects: Mutex<std::collections::BTreeSet<u64>>,
    any_suspects: AtomicBool,
    recovery: Recovery,
}

thread_local! {
    /// The running read is speculative: blocks may be reused under it, and a failure is damage
    /// only once its caller has ruled that out (see [`speculative`]).
    static SPECULATIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a lock-free read whose blocks may be reused under it: what it finds wrong is neither
/// recorded as damage nor makes blocks suspect; the caller decides once it knows.
fn speculative<T>(read: impl FnOnce() -> T) -> T {
    /// Restores the flag however the read ends (a panic included).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SPECULATIVE.set(self.0);
        }
    }
    let _restore = Restore(SPECULATIVE.replace(true));
    read()
}

/// Guards over one or more inode stripes.
pub enum Locked<'a> {
    Read(RwLockReadGuard<'a, ()>),
    Write(Vec<RwLockWriteGuard<'a, ()>>),
}

/// Creation parameters of a new inode.
pub struct NewInode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

/// Now, as file times record it: the kernel's coarse clock, like tmpfs and ext4. A finer clock
/// would change a file's mtime on every write, so every `fsync` after a write would commit the
/// inode; with it, writes within one tick change no metadata and their `fsync` is data only.
pub fn now() -> (i64, u32) {
    crate::sys::coarse_realtime()
}

fn block_off(block: u64) -> u64 {
    block * BLOCK_SIZE
}

impl Engine {
    /// A copy of the newest superblock as the next commit would write it (counters current).
    pub fn superblock(&self) -> Superblock {
        let mut sb = self.misc.lock().clone();
        self.itab.lock().fill(&mut sb);
        self.space.lock().fill(&mut sb);
        sb
    }

    pub fn total_blocks(&self) -> u64 {
        self.space.lock().total_blocks
    }

    pub fn free_blocks(&self) -> u64 {
        self.space.lock().free_blocks
    }

    pub fn hash_seed(&self) -> u64 {
        self.hash_seed
    }

    /// What `open` found and did (for `fsck` and `info`).
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    pub fn image(&self) -> &Image {
        &self.img
    }

    /// Whether the engine may change the image.
    pub fn writable(&self) -> bool {
        self.mode == OpenMode::Mount
    }

    /// Records in the superblock (from the next commit on) that the image uses an incompatible
    /// feature.
    pub(super) fn enable_incompat(&self, flag: u32) {
        let mut misc = self.misc.lock();
        if misc.incompat.get() & flag == 0 {
            misc.incompat = (misc.incompat.get() | flag).into();
            *self.misc_dirty.lock() = true;
        }
    }

    /// Validates a block number read from the image.
    fn check_block(&self, block: u64, what: &str) -> Result<u64> {
        // Blocks 0 and 1 are the superblock slots: no pointer may name them.
        if block < 2 || block >= self.img.len() / BLOCK_SIZE || block >= MAX_BLOCKS {
            return Err(self.corrupt(format!("{what}: block {block} out of range")));
        }
        Ok(block)
    }

    /// A corruption error; remembers that the image has errors (unless the read that found it
    /// is speculative, see [`speculative`]).
    pub fn corrupt(&self, what: impl Into<String>) -> Error {
        if !SPECULATIVE.get() {
            self.errors.store(true, Ordering::Relaxed);
        }
        Error::Corrupt(what.into())
    }

    /// Remembers that a pointer led to `block` and the block was not what the pointer's
    /// structure expects: it may belong to another structure, so it is never handed out
    /// (nor freed for reuse) until fsck decides who owns it. Otherwise, once its real owner
    /// frees it, whatever reused it would be reachable through the damaged pointer too.
    fn suspect(&self, block: u64) {
        if SPECULATIVE.get() {
            return;
        }
        if self.suspects.lock().insert(block) {
            log::error!(
                "block {block} is reached by a damaged pointer: it stays allocated until `mmapfs fsck --repair`"
            );
        }
        self.any_suspects.store(true, Ordering::Release);
    }

    /// Repair decides who owns every block from a full walk: what reads marked suspect
    /// before it no longer matters.
    fn forget_suspects(&self) {
        self.suspects.lock().clear();
        self.any_suspects.store(false, Ordering::Release);
    }

    /// Whether `block` was reached by a damaged pointer (see [`Engine::suspect`]).
    fn is_suspect(&self, block: u64) -> bool {
        self.any_suspects.load(Ordering::Acquire) && self.suspects.lock().contains(&block)
    }

    /// Records damage found by a check of the live image: the next commit marks the image for
    /// `fsck --repair`.
    pub fn mark_damaged(&self) {
        self.errors.store(true, Ordering::Relaxed);
        *self.misc_dirty.lock() = true;
    }

    /// Repair: makes the next commit happen even if nothing else changed (it rewrites the
    /// superblock slot the state is not in).
    pub(super) fn mark_superblock_dirty(&self) {
        *self.misc_dirty.lock() = true;
    }

    /// Whether damage was seen since open.
    pub fn has_errors(&self) -> bool {
        self.errors.load(Ordering::Relaxed)
    }

    /// A repair left the image consistent: the next commit may record it clean again.
    pub fn clear_errors(&self) {
        self.errors.store(false, Ordering::Relaxed);
    }

    // ----- locks ------------------------------------------------------------------------------

    fn stripe(&self, ino: u64) -> usize {
        (ino % LOCK_STRIPES as u64) as usize
    }

    pub fn lock_read(&self, ino: u64) -> Locked<'_> {
        Locked::Read(self.stripes[self.stripe(ino)].read())
    }

    pub fn lock_write(&self, ino: u64) -> Locked<'_> {
        self.lock_many(&[ino])
    }

    /// Write-locks several inodes without deadlock (ascending stripe order, each once).
    pub fn lock_many(&self, inos: &[u64]) -> Locked<'_> {
        let mut idx: Vec<usize> = inos.iter().map(|&i| self.stripe(i)).collect();
        idx.sort_unstable();
        idx.dedup();
        Locked::Write(idx.into_iter().map(|i| self.stripes[i].write()).collect())
    }

    // ----- volatile per-inode counters --------------------------------------------------------

    /// Adds `delta` to the kernel's reference count of `ino` (kept outside the image and the
    /// heap: see [`VolatileTable`]); returns the new count.
    pub fn add_kernel_refs(&self, ino: u64, delta: i64) -> Result<u64> {
        let c = self.vol.get(ino, VOL_REFS).ok_or(Error::NotFound)?;
        let mut cur = c.load(Ordering::Acquire);
        loop {
            let new = (i64::from(cur) + delta).clamp(0, i64::from(u32::MAX)) as u32;
            match c.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(u64::from(new)),
                Err(actual) => cur = actual,
            }
        }
    }

    /// The kernel's current reference count of `ino`.
    pub fn kernel_refs(&self, ino: u64) -> Result<u64> {
        self.add_kernel_refs(ino, 0)
    }

    /// Records that transaction `txn` changed `ino` (`structural`: its size or allocation), so
    /// that `fsync` knows what to wait for.
    fn note_change(&self, ino: u64, txn: u64, structural: bool) {
        let rel = self.txm.relative(txn);
        if let Some(c) = self.vol.get(ino, VOL_META_TXN) {
            c.fetch_max(rel, Ordering::AcqRel);
        }
        if structural && let Some(c) = self.vol.get(ino, VOL_STRUCT_TXN) {
            c.fetch_max(rel, Ordering::AcqRel);
        }
    }

    /// The newest transaction that changed `ino` (only its size or allocation: `structural`).
    fn last_change(&self, ino: u64, structural: bool) -> u64 {
        let field = if structural {
            VOL_STRUCT_TXN
        } else {
            VOL_META_TXN
        };
        match self.vol.get(ino, field) {
            Some(c) => self.txm.absolute(c.load(Ordering::Acquire)),
            None => self.txm.running(),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The committer holds the engine only while committing; this ends its wait.
        self.txm.tick_stop();
    }
}

/// Sets a new inode's atime, mtime, ctime and birth time to now.
fn set_all_times_now(rec: &mut Inode) {
    let (s, ns) = now();
    for (sec, nsec) in [
        (&mut rec.atime_sec, &mut rec.atime_nsec),
        (&mut rec.mtime_sec, &mut rec.mtime_nsec),
        (&mut rec.ctime_sec, &mut rec.ctime_nsec),
        (&mut rec.btime_sec, &mut rec.btime_nsec),
    ] {
        *sec = s.into();
        *nsec = ns.into();
    }
}
