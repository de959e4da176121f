//! Transactions and commits (see `docs/design/transactions.md`).
//!
//! - [`Engine::begin`] returns a [`Tx`]: the only way to change the image. It holds the commit
//!   gate shared and the blocks reserved for the operation, so an operation either fails before
//!   changing anything (`ENOSPC`) or runs to its end inside one transaction.
//! - A commit closes the running transaction at an operation boundary (the gate taken
//!   exclusively for a moment), applies its space-map changes, and makes it durable while the
//!   next transaction runs: one flush with an inline list of block CRCs when the commit wrote
//!   at most `COMMIT_LIST_MAX` blocks, two flushes for larger ones.
//! - A failed write-back or flush is fatal: nothing more is committed (see
//!   `CommitState::fatal`) and every later fsync reports it; a remount recovers.
//! - `fsync` waits for a flush that started after its data reached the device and for the
//!   transactions that changed its inode; concurrent callers share commits (group commit).

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard};
use zerocopy::IntoBytes;

use super::alloc::Extents;
use super::data::Pending;
use super::pager::Blocks;
use super::{Engine, block_off};
use crate::error::{Error, Result};
use crate::format::*;

/// The committer starts a commit early once the running transaction wrote this many metadata
/// blocks (keeps commits, and the daemon's bookkeeping, bounded).
const SOFT_COMMIT_PAGES: usize = 8192;
/// Flush locks (fsync of inode `n` takes `n % FLUSH_LOCKS`).
const FLUSH_LOCKS: usize = 256;
/// Default interval of the committer thread.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// A running operation's hold on the running transaction.
pub struct Tx<'a> {
    e: &'a Engine,
    _gate: RwLockReadGuard<'a, ()>,
    id: u64,
    reserved: Cell<u64>,
}

impl Tx<'_> {
    /// The transaction this operation runs in.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Reserves `n` more blocks (an operation that learns its needs once it holds its locks).
    /// Fails with `ENOSPC` like [`Engine::begin`], before the operation changes anything.
    pub fn reserve_more(&self, n: u64) -> Result<()> {
        self.e.reserve(n, false)?;
        self.reserved.set(self.reserved.get() + n);
        Ok(())
    }

    /// The allocator as this operation sees it.
    pub(super) fn blocks(&self) -> TxBlocks<'_> {
        TxBlocks {
            e: self.e,
            tx: self,
        }
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        self.e.unreserve(self.reserved.get());
        if self.e.space.lock().pages.len() > SOFT_COMMIT_PAGES {
            self.e.txm.nudge();
        }
    }
}

/// Blocks for an operation: allocations consume its reservation.
pub(super) struct TxBlocks<'a> {
    e: &'a Engine,
    tx: &'a Tx<'a>,
}

impl Blocks for TxBlocks<'_> {
    fn txn(&self) -> u64 {
        self.tx.id
    }
    fn alloc(&mut self, goal: u64, want: u64, data: bool) -> Result<(u64, u64)> {
        let mut reserved = self.tx.reserved.get();
        let r = self
            .e
            .alloc_in(&mut self.e.space.lock(), goal, want, data, &mut reserved);
        self.tx.reserved.set(reserved);
        r
    }
    fn free(&mut self, start: u64, len: u64) -> Result<()> {
        self.e
            .free_in(&mut self.e.space.lock(), self.tx.id, start, len)
    }
    fn born(&self, block: u64) -> bool {
        self.e.space.lock().pages.contains(&block)
    }
}

/// Data blocks listed by single-flush commits that are not yet superseded: writes to them go
/// to a copy (see "Why one flush is enough" in the design).
#[derive(Default)]
struct Pins {
    by_txn: VecDeque<(u64, Vec<(u64, u64)>)>,
    all: Extents,
}

#[derive(Default)]
struct CommitState {
    /// A commit or flush is in progress (its thread is the leader).
    busy: bool,
    /// Newest durable transaction, and the slot holding it.
    durable: u64,
    durable_slot: u64,
    flushes_started: u64,
    flushes_done: u64,
    /// The first write-back or flush that failed (errno): from then on nothing is committed
    /// and every fsync fails. After a write-back error Linux may drop the pages' new contents,
    /// so retrying could commit stale blocks; a remount recovers from what is on disk.
    fatal: Option<i32>,
}

pub(super) struct TxnManager {
    gate: RwLock<()>,
    running: AtomicU64,
    /// First transaction of this mount (per-inode transaction marks are relative to it).
    base: u64,
    state: Mutex<CommitState>,
    cv: Condvar,
    pins: RwLock<Pins>,
    any_pins: AtomicBool,
    /// The first change of a mount commits first, so that both superblock slots hold states
    /// that never saw a block reused (blocks freed by the newest state are not tracked).
    pub initial_commit: AtomicBool,
    /// The next commit first writes back and flushes the whole image (the first of a mount).
    pub sync_before_commit: AtomicBool,
    /// Incremented whenever freed blocks become reusable: a lock-free reader that saw it
    /// change may have read a reused block and must retry.
    pub reuse_gen: AtomicU64,
    flush_locks: Box<[Mutex<()>]>,
    /// Committer thread control (shared with the thread, which holds the engine only while
    /// it commits).
    tick: Arc<Tick>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct Tick {
    ctl: Mutex<CommitterCtl>,
    cv: Condvar,
}

#[derive(Default)]
struct CommitterCtl {
    stop: bool,
    nudged: bool,
    interval: Option<Duration>,
}

impl TxnManager {
    pub fn new(durable: u64, durable_slot: u64, next: u64) -> TxnManager {
        TxnManager {
            gate: RwLock::new(()),
            running: AtomicU64::new(next),
            base: next,
            state: Mutex::new(CommitState {
                durable,
                durable_slot,
                ..CommitState::default()
            }),
            cv: Condvar::new(),
            pins: RwLock::new(Pins::default()),
            any_pins: AtomicBool::new(false),
            initial_commit: AtomicBool::new(false),
            sync_before_commit: AtomicBool::new(false),
            reuse_gen: AtomicU64::new(0),
            flush_locks: (0..FLUSH_LOCKS).map(|_| Mutex::new(())).collect(),
            tick: Arc::default(),
            committer: Mutex::new(None),
        }
    }

    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Acquire)
    }

    /// `txn` as stored in the volatile per-inode table (0 = never changed in this mount;
    /// saturates, which then means "the running transaction").
    pub fn relative(&self, txn: u64) -> u32 {
        (txn.saturating_sub(self.base) + 1).min(u64::from(u32::MAX)) as u32
    }

    pub fn absolute(&self, rel: u32) -> u64 {
        match rel {
            0 => 0,
            u32::MAX => self.running(),
            r => self.base + u64::from(r) - 1,
        }
    }

    /// Tells the committer thread to end (it then exits at its next wake-up).
    pub fn tick_stop(&self) {
        self.tick.ctl.lock().stop = true;
        self.tick.cv.notify_all();
    }

    fn nudge(&self) {
        self.tick.ctl.lock().nudged = true;
        self.tick.cv.notify_one();
    }

    /// Newest durable transaction.
    pub fn durable(&self) -> u64 {
        self.state.lock().durable
    }

    /// The superblock slot the durable state is in.
    pub fn slot(&self) -> u64 {
        self.state.lock().durable_slot
    }
}

/// One closed transaction on its way to the disk.
struct Cut {
    id: u64,
    sb: Superblock,
    pages: Vec<u64>,
    ordered: Vec<(u64, u64)>,
    /// Small enough for one flush with an inline list.
    single: bool,
}

impl Engine {
    /// Starts an operation that may allocate up to `reserve` blocks.
    pub fn begin(&self, reserve: u64) -> Result<Tx<'_>> {
        self.begin_with(reserve, false)
    }

    /// Starts an operation that frees space: it may use the last blocks of a full image.
    pub fn begin_delete(&self, reserve: u64) -> Result<Tx<'_>> {
        self.begin_with(reserve, true)
    }

    fn begin_with(&self, reserve: u64, delete: bool) -> Result<Tx<'_>> {
        if !self.writable() {
            return Err(Error::ReadOnly);
        }
        self.check_fatal()?;
        if self.txm.initial_commit.swap(false, Ordering::AcqRel) {
            self.commit_now()?;
        }
        // Frozen blocks become reusable after commits: when short of space, commit and retry
        // (before taking the gate: a commit waits for it).
        let mut attempt = 0;
        loop {
            match self.reserve(reserve, delete) {
                Ok(()) => break,
                Err(Error::NoSpace) if attempt < 2 && self.space.lock().frozen_blocks() > 0 => {
                    attempt += 1;
                    self.commit_now()?;
                }
                Err(e) => return Err(e),
            }
        }
        let gate = self.txm.gate.read();
        Ok(Tx {
            e: self,
            _gate: gate,
            id: self.txm.running(),
            reserved: Cell::new(reserve),
        })
    }

    /// `EIO` once a write-back or flush has failed (see `CommitState::fatal`).
    fn check_fatal(&self) -> Result<()> {
        match self.txm.state.lock().fatal {
            Some(errno) => Err(Error::Io(io::Error::from_raw_os_error(errno))),
            None => Ok(()),
        }
    }

    /// Whether writes to data block `block` must go to a copy.
    pub(super) fn pinned(&self, block: u64) -> bool {
        self.txm.any_pins.load(Ordering::Acquire)
            && self.txm.pins.read().all.covering(block).is_some()
    }

    /// Closes the running transaction and makes it durable. `final_state`: the superblock state
    /// to record (clean unmount). `data`: an fsync's data, whose write-back was started and is
    /// waited for with the commit's own blocks (one wait, one flush). Returns whether there was
    /// anything to commit. The caller is the leader (`busy` set).
    fn commit(&self, final_state: Option<u32>, data: Option<&Pending>) -> Result<bool> {
        self.check_fatal()?;
        if self.txm.sync_before_commit.load(Ordering::Acquire) {
            // Also surfaces a write-back error nobody has seen yet.
            self.img.sync_all()?;
            self.txm.sync_before_commit.store(false, Ordering::Release);
        }
        let Some(cut) = self.cut(final_state)? else {
            return Ok(false);
        };
        let slot = self.write_cut(&cut, data).inspect_err(|e| {
            log::error!(
                "commit of transaction {} failed: {e}; nothing more is committed until a remount",
                cut.id
            );
            self.txm.state.lock().fatal = Some(e.errno());
        })?;
        {
            let mut st = self.txm.state.lock();
            st.durable = cut.id;
            st.durable_slot = slot;
        }
        self.release_frozen(cut.id);
        self.release_pins(cut.id);
        self.txm.reuse_gen.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// Closes the running transaction: `None` if it changed nothing.
    fn cut(&self, final_state: Option<u32>) -> Result<Option<Cut>> {
        let _gate = self.txm.gate.write();
        let it = self.itab.lock();
        let mut sp = self.space.lock();
        let misc_dirty = std::mem::take(&mut *self.misc_dirty.lock());
        if !sp.dirty && final_state.is_none() && !misc_dirty {
            return Ok(None);
        }
        let id = self.txm.running();
        self.apply_space(&mut sp, id)?;
        let pages: Vec<u64> = std::mem::take(&mut sp.pages).into_iter().collect();
        let ordered: Vec<(u64, u64)> = std::mem::take(&mut sp.ordered).iter().collect();
        sp.dirty = false;
        let mut sb = self.misc.lock().clone();
        it.fill(&mut sb);
        sp.fill(&mut sb);
        sb.txn = id.into();
        let state = match final_state {
            _ if self.has_errors() => STATE_ERRORS,
            Some(s) => s,
            None => STATE_MOUNTED,
        };
        sb.state = state.into();
        sb.commit_sec = super::now().0.into();
        let blocks = pages.len() as u64 + ordered.iter().map(|r| r.1).sum::<u64>();
        let single = blocks <= COMMIT_LIST_MAX as u64;
        if single && !ordered.is_empty() {
            // From the cut on, writes to these blocks go to copies: the CRCs listed below must
            // stay true until a newer commit is durable.
            let mut pins = self.txm.pins.write();
            for &(s, l) in &ordered {
                pins.all.insert(s, l);
            }
            pins.by_txn.push_back((id, ordered.clone()));
            self.txm.any_pins.store(true, Ordering::Release);
        }
        self.txm.running.store(id + 1, Ordering::Release);
        Ok(Some(Cut {
            id,
            sb,
            pages,
            ordered,
            single,
        }))
    }

    /// Writes a closed transaction and its superblock; returns the slot written.
    ///
    /// One flush: the superblock carries the CRC of every block the commit wrote, and goes to
    /// the device in the same batch; recovery trusts it only if they all match. Two flushes
    /// (commits too large for the list): the blocks are durable before the superblock is
    /// written.
    fn write_cut(&self, cut: &Cut, data: Option<&Pending>) -> Result<u64> {
        let mut list: Vec<ListEntry> = Vec::new();
        for &p in &cut.pages {
            let crc = self.seal_block(p)?;
            list.push(ListEntry {
                block: p.into(),
                crc: crc.into(),
            });
        }
        if cut.single {
            for &(s, l) in &cut.ordered {
                for b in s..s + l {
                    let crc = crc32c::crc32c(self.img.bytes(block_off(b), BLOCK_SIZE as usize)?);
                    list.push(ListEntry {
                        block: (b | LIST_DATA_FLAG).into(),
                        crc: crc.into(),
                    });
                }
            }
        }
        let slot = 1 - self.txm.state.lock().durable_slot;
        let mut runs: Vec<(u64, u64)> = cut.pages.iter().map(|&p| (p, 1)).collect();
        runs.extend(cut.ordered.iter().copied());
        let mut sb = cut.sb.clone();
        if cut.single {
            sb.list_len = (list.len() as u32).into();
            sb.list[..list.len()].copy_from_slice(&list);
            sb.seal();
            self.img.write(block_off(slot), sb.as_bytes())?;
            runs.push((slot, 1));
        }
        let runs = coalesce(runs);
        for &(s, l) in &runs {
            self.img.start_write_back(block_off(s), l * BLOCK_SIZE)?;
        }
        if let Some(d) = data {
            d.wait(self)?;
        }
        for &(s, l) in &runs {
            self.img.write_back(block_off(s), l * BLOCK_SIZE)?;
        }
        if !cut.single {
            // Everything the superblock refers to is durable before it is written.
            self.img.flush(0, 0)?;
            sb.list_len = 0.into();
            sb.seal();
            self.img.write(block_off(slot), sb.as_bytes())?;
        }
        self.img.flush(block_off(slot), BLOCK_SIZE)?;
        Ok(slot)
    }

    fn release_pins(&self, durable: u64) {
        if !self.txm.any_pins.load(Ordering::Acquire) {
            return;
        }
        let mut pins = self.txm.pins.write();
        while pins.by_txn.front().is_some_and(|(t, _)| *t < durable) {
            if let Some((_, list)) = pins.by_txn.pop_front() {
                for (s, l) in list {
                    pins.all.remove(s, l);
                }
            }
        }
        self.txm
            .any_pins
            .store(!pins.all.is_empty(), Ordering::Release);
    }

    /// Runs `f` as the only committer: waits for a running commit or flush to end first.
    fn as_leader(&self, f: impl FnOnce() -> Result<bool>) -> Result<bool> {
        let mut st = self.txm.state.lock();
        while st.busy {
            self.txm.cv.wait(&mut st);
        }
        self.lead(st, f)
    }

    /// Runs `f` as the leader (the caller saw `busy` unset under this same guard) and records
    /// the outcome of its flush for everyone waiting in [`Engine::wait_durable`].
    fn lead(
        &self,
        mut st: parking_lot::MutexGuard<'_, CommitState>,
        f: impl FnOnce() -> Result<bool>,
    ) -> Result<bool> {
        st.busy = true;
        st.flushes_started += 1;
        let idx = st.flushes_started;
        drop(st);
        let r = f();
        let mut st = self.txm.state.lock();
        st.busy = false;
        match &r {
            Ok(_) => st.flushes_done = idx,
            Err(e) if st.fatal.is_none() => {
                log::error!("flush failed: {e}; nothing more is committed until a remount");
                st.fatal = Some(e.errno());
            }
            Err(_) => {}
        }
        self.txm.cv.notify_all();
        r
    }

    /// Waits until transaction `need` is durable and `data` (whose write-back was started)
    /// is on the device with a flush after it; commits or flushes itself when no one else
    /// does. As the leader it waits for `data` together with the commit's own blocks.
    fn wait_durable(&self, need: u64, data: &Pending) -> Result<()> {
        let mut st = self.txm.state.lock();
        // Set once `data` is known written: flushes started after this index make it durable.
        let mut after = data.is_empty().then_some(st.flushes_started);
        loop {
            if let Some(errno) = st.fatal {
                return Err(Error::Io(io::Error::from_raw_os_error(errno)));
            }
            if let Some(a) = after
                && st.durable >= need
                && (data.is_empty() || st.flushes_done > a)
            {
                return Ok(());
            }
            if st.busy {
                if after.is_none() {
                    // Another thread flushes: wait for our data ourselves so that the next
                    // flush covers it.
                    drop(st);
                    data.wait(self)?;
                    st = self.txm.state.lock();
                    after = Some(st.flushes_started);
                } else {
                    self.txm.cv.wait(&mut st);
                }
                continue;
            }
            let commit_needed = need > st.durable;
            let data_to_wait = after.is_none().then_some(data);
            // Leading: our data is written before the flush this thread issues.
            return self
                .lead(st, || {
                    if commit_needed && self.commit(None, data_to_wait)? {
                        return Ok(true);
                    }
                    if let Some(d) = data_to_wait {
                        d.wait(self)?;
                    }
                    self.img.flush(0, 0)?;
                    Ok(false)
                })
                .map(|_| ());
        }
    }

    /// fsync: makes `ino`'s written data and the transactions that changed it durable. With
    /// `datasync` (fdatasync, msync) only transactions that changed its size or allocation.
    pub fn sync_inode(&self, ino: u64, datasync: bool) -> Result<()> {
        let _flush = self.txm.flush_locks[(ino % FLUSH_LOCKS as u64) as usize].lock();
        let pending = self.take_dirty_data(ino);
        let r = (|| {
            pending.start(self)?;
            let need = self.last_change(ino, datasync);
            self.wait_durable(need, &pending)
        })();
        if r.is_err() {
            pending.restore(self, ino);
        }
        r
    }

    /// Commits whatever the running transaction changed.
    pub fn commit_now(&self) -> Result<()> {
        self.as_leader(|| self.commit(None, None)).map(|_| ())
    }

    /// Flushes everything and marks the image clean (unmount).
    pub fn close_clean(&self) -> Result<()> {
        self.stop_committer();
        if !self.writable() {
            return Ok(());
        }
        self.as_leader(|| self.commit(Some(STATE_CLEAN), None))?;
        self.img.sync_all()?;
        Ok(())
    }

    /// Holds off every operation and commit while the guard lives, after a commit already
    /// past its cut (writing its blocks, which needs no gate) has finished.
    pub(super) fn quiesce(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        loop {
            let gate = self.txm.gate.write();
            let mut st = self.txm.state.lock();
            if !st.busy {
                return gate;
            }
            // A leader sets `busy` before it takes the gate for its cut: let it have it.
            drop(gate);
            while st.busy {
                self.txm.cv.wait(&mut st);
            }
        }
    }

    /// Whether `block` was written by the running transaction (not yet sealed).
    pub(super) fn in_running_txn(&self, block: u64) -> bool {
        self.space.lock().pages.contains(&block)
    }

    /// The newest durable transaction.
    pub fn durable_txn(&self) -> u64 {
        self.txm.durable()
    }

    /// Sets the committer thread's interval (`-o commit=SECONDS`).
    pub fn set_commit_interval(&self, interval: Duration) {
        self.txm.tick.ctl.lock().interval = Some(interval.max(Duration::from_millis(10)));
        self.txm.tick.cv.notify_all();
    }

    /// Starts the thread that commits every few seconds and when a transaction grows large.
    pub fn start_committer(self: &Arc<Engine>) {
        if !self.writable() {
            return;
        }
        let weak = Arc::downgrade(self);
        let tick = self.txm.tick.clone();
        let handle = std::thread::Builder::new()
            .name("mmapfs-commit".into())
            .spawn(move || {
                if let Some(e) = weak.upgrade()
                    && e.recovery().orphans > 0
                    && let Err(err) = e.free_orphans()
                {
                    log::error!("freeing files left unlinked at a crash: {err}");
                }
                loop {
                    {
                        let mut ctl = tick.ctl.lock();
                        if !ctl.stop && !ctl.nudged {
                            let interval = ctl.interval.unwrap_or(DEFAULT_COMMIT_INTERVAL);
                            tick.cv.wait_for(&mut ctl, interval);
                        }
                        if ctl.stop {
                            return;
                        }
                        ctl.nudged = false;
                    }
                    let Some(e) = weak.upgrade() else { return };
                    if let Err(err) = e.commit_now() {
                        log::error!("background commit failed: {err}");
                    }
                }
            });
        match handle {
            Ok(h) => *self.txm.committer.lock() = Some(h),
            Err(e) => log::error!("cannot start the committer thread: {e}"),
        }
    }

    /// Stops the committer thread and waits for it (it may be freeing orphans).
    pub fn stop_committer(&self) {
        self.txm.tick.ctl.lock().stop = true;
        self.txm.tick.cv.notify_all();
        let handle = self.txm.committer.lock().take();
        if let Some(h) = handle
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }
}

/// Sorts block runs and merges the overlapping or adjacent ones.
fn coalesce(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, l) in runs {
        match out.last_mut() {
            Some(m) if s <= m.0 + m.1 => m.1 = m.1.max(s + l - m.0),
            _ => out.push((s, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_adjacent_and_overlapping() {
        assert_eq!(
            coalesce(vec![(10, 2), (3, 1), (12, 1), (4, 2), (20, 5), (21, 1)]),
            vec![(3, 3), (10, 3), (20, 5)]
        );
    }

    #[test]
    fn relative_transaction_numbers_round_trip() {
        let t = TxnManager::new(9, 0, 10);
        assert_eq!(t.absolute(0), 0);
        assert_eq!(t.absolute(t.relative(10)), 10);
        assert_eq!(t.absolute(t.relative(12345)), 12345);
        assert_eq!(t.relative(1 << 40), u32::MAX);
        assert_eq!(t.absolute(u32::MAX), t.running());
    }
}
