//! The inode table: inode `n` is record `n % 15` of leaf `n / 15` of the inode-table tree.
//! Free slots form a list through `next_free`; inodes unlinked while the kernel still uses them
//! form the orphan list (`orphan_next`/`orphan_prev`), which recovery empties.
//!
//! The table's tree, its size and both lists belong to the `itab` lock. Records are read
//! without it: a reader copies the record and retries if freed blocks became reusable during
//! the copy (the leaf it read may have been reused), see [`Engine::read_inode_raw`].
//! The list fields and the orphan flag belong to the engine: [`Engine::write_inode`] keeps
//! the values on the image, whatever the caller's copy holds.

use std::sync::atomic::Ordering;

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::txn::Tx;
use super::{Engine, NewInode, block_off, set_all_times_now};
use crate::error::{Error, Result};
use crate::format::*;

/// Inode-table state (under the `itab` lock).
pub(super) struct ItabState {
    pub tree: u64,
    pub slots: u64,
    pub free_head: u64,
    pub used: u64,
    pub next_generation: u64,
    pub orphan_head: u64,
}

impl ItabState {
    pub fn new(sb: &Superblock) -> ItabState {
        ItabState {
            tree: sb.itab_tree.get(),
            slots: sb.itab_slots.get(),
            free_head: sb.free_inode_head.get(),
            used: sb.used_inodes.get(),
            next_generation: sb.next_generation.get(),
            orphan_head: sb.orphan_head.get(),
        }
    }

    pub fn fill(&self, sb: &mut Superblock) {
        sb.itab_tree = self.tree.into();
        sb.itab_slots = self.slots.into();
        sb.free_inode_head = self.free_head.into();
        sb.used_inodes = self.used.into();
        sb.next_generation = self.next_generation.into();
        sb.orphan_head = self.orphan_head.into();
    }
}

/// Reads of a record retried at most this often when blocks keep being reused under them.
const READ_RETRIES: u32 = 1000;
/// Reads of a record retried at most this often when its checksum fails (see
/// [`Engine::read_inode_raw`]).
const TORN_READ_RETRIES: u32 = 100;

impl Engine {
    /// Byte offset of inode `ino`'s record, through the published inode-table tree.
    fn inode_offset(&self, ino: u64) -> Result<u64> {
        if ino == 0 || ino >= self.itab_slots.load(Ordering::Acquire) {
            return Err(Error::NotFound);
        }
        let tree = self.itab_tree.load(Ordering::Acquire);
        match self.tree_lookup(tree, ino / INODES_PER_BLOCK)? {
            Some(leaf) => {
                self.expect_kind(leaf, BlockKind::InodeTable, None)?;
                Ok(block_off(leaf) + (ino % INODES_PER_BLOCK) * INODE_SIZE)
            }
            None => Err(self.corrupt(format!("inode table leaf of inode {ino} missing"))),
        }
    }

    /// Reads inode `ino` (free or used), verifying its checksum.
    pub fn read_inode_raw(&self, ino: u64) -> Result<Inode> {
        let mut torn_reads = 0;
        for _ in 0..READ_RETRIES {
            let generation = self.txm.reuse_gen.load(Ordering::Acquire);
            let read = super::speculative(|| {
                self.inode_offset(ino).and_then(|off| {
                    let bytes = self.img.bytes(off, INODE_SIZE as usize)?;
                    Inode::read_from_bytes(bytes).map_err(|_| Error::corrupt("inode size"))
                })
            });
            if self.txm.reuse_gen.load(Ordering::Acquire) != generation {
                continue;
            }
            // Nothing was reused under the read: what it found is damage.
            if let Err(Error::Corrupt(why)) = read {
                return Err(self.corrupt(why));
            }
            let rec = read?;
            if rec.checksum_ok() {
                return Ok(rec);
            }
            // Records are written in place under the `itab` lock, and some by threads that do
            // not hold this inode's lock (links of the free and orphan lists): the read may
            // have met one half-written. A mismatch that persists is damage.
            torn_reads += 1;
            if torn_reads > TORN_READ_RETRIES {
                return Err(self.corrupt(format!("inode {ino}: checksum mismatch")));
            }
            std::thread::yield_now();
        }
        Err(Error::corrupt(format!(
            "inode {ino}: blocks kept being reused while reading it"
        )))
    }

    /// Reads a used inode; a free slot is `NotFound`.
    pub fn read_inode(&self, ino: u64) -> Result<Inode> {
        let rec = self.read_inode_raw(ino)?;
        if rec.is_free() {
            return Err(Error::NotFound);
        }
        Ok(rec)
    }

    /// The record of `ino` as it is in the running transaction (under the `itab` lock).
    fn record_locked(&self, it: &ItabState, ino: u64) -> Result<Inode> {
        if ino == 0 || ino >= it.slots {
            return Err(Error::NotFound);
        }
        let leaf = self
            .tree_lookup(it.tree, ino / INODES_PER_BLOCK)?
            .ok_or_else(|| self.corrupt(format!("inode table leaf of inode {ino} missing")))?;
        let off = block_off(leaf) + (ino % INODES_PER_BLOCK) * INODE_SIZE;
        let rec = Inode::read_from_bytes(self.img.bytes(off, INODE_SIZE as usize)?)
            .map_err(|_| Error::corrupt("inode size"))?;
        if !rec.checksum_ok() {
            return Err(self.corrupt(format!("inode {ino}: checksum mismatch")));
        }
        Ok(rec)
    }

    /// Writes `rec` as inode `ino`'s record in `tx` (under the `itab` lock), copying the leaf
    /// (and its path) first if it is older than the transaction. Returns the previous record
    /// (as it was, checksum unchecked).
    fn put_record(&self, tx: &Tx, it: &mut ItabState, ino: u64, rec: &mut Inode) -> Result<Inode> {
        if ino == 0 || ino >= it.slots {
            return Err(Error::NotFound);
        }
        let mut tree = it.tree;
        let (leaf, _) = self.tree_meta_mut(
            &mut tx.blocks(),
            &mut tree,
            ino / INODES_PER_BLOCK,
            BlockKind::InodeTable,
            &mut 0,
        )?;
        if tree != it.tree {
            it.tree = tree;
            self.itab_tree.store(tree, Ordering::Release);
        }
        rec.seal();
        let off = block_off(leaf) + (ino % INODES_PER_BLOCK) * INODE_SIZE;
        let old = Inode::read_from_bytes(self.img.bytes(off, INODE_SIZE as usize)?)
            .map_err(|_| Error::corrupt("inode size"))?;
        self.img.write(off, rec.as_bytes())?;
        Ok(old)
    }

    /// Repair: replaces a record whatever the old one held.
    pub(super) fn overwrite_record(&self, tx: &Tx, ino: u64, rec: &mut Inode) -> Result<()> {
        let mut it = self.itab.lock();
        self.put_record(tx, &mut it, ino, rec)?;
        self.note_change(ino, tx.id(), true);
        Ok(())
    }

    /// Repair: relinks every free slot into the free list (low numbers first) and recounts
    /// the used inodes.
    pub(super) fn rebuild_free_list(&self, tx: &Tx) -> Result<()> {
        let mut it = self.itab.lock();
        let mut head = 0;
        let mut used = 0;
        for ino in (1..it.slots).rev() {
            // A record that does not read is left out (its own repair frees it; the next
            // round lists it).
            let Ok(rec) = self.record_locked(&it, ino) else {
                used += 1;
                continue;
            };
            if !rec.is_free() {
                used += 1;
                continue;
            }
            if rec.next_free.get() != head {
                let mut free = Inode::new_zeroed();
                free.next_free = head.into();
                self.put_record(tx, &mut it, ino, &mut free)?;
            }
            head = ino;
        }
        it.free_head = head;
        it.used = used;
        Ok(())
    }

    /// Repair: sets the number of inode slots to what the table holds (the free list is
    /// rebuilt by the same repair round).
    pub(super) fn set_itab_slots(&self, slots: u64) {
        let mut it = self.itab.lock();
        it.slots = slots;
        if it.free_head >= slots {
            it.free_head = 0;
        }
        self.itab_slots.store(slots, Ordering::Release);
        *self.misc_dirty.lock() = true;
    }

    /// Repair: rebuilds the orphan list from the records: every inode flagged as an orphan that
    /// has no links is listed (low numbers first); a flagged inode with links loses the flag.
    /// Records that do not read are left to the other repairs.
    pub(super) fn rebuild_orphan_list(&self, tx: &Tx) -> Result<()> {
        let mut it = self.itab.lock();
        let mut orphans = Vec::new();
        for ino in 1..it.slots {
            let Ok(mut rec) = self.record_locked(&it, ino) else {
                continue;
            };
            if rec.is_free() || rec.flags.get() & INODE_FLAG_ORPHAN == 0 {
                continue;
            }
            if rec.nlink.get() == 0 {
                orphans.push(ino);
            } else {
                rec.flags = (rec.flags.get() & !INODE_FLAG_ORPHAN).into();
                rec.orphan_next = 0.into();
                rec.orphan_prev = 0.into();
                self.put_record(tx, &mut it, ino, &mut rec)?;
            }
        }
        for (i, &ino) in orphans.iter().enumerate() {
            let mut rec = self.record_locked(&it, ino)?;
            rec.orphan_prev = (if i == 0 { 0 } else { orphans[i - 1] }).into();
            rec.orphan_next = orphans.get(i + 1).copied().unwrap_or(0).into();
            self.put_record(tx, &mut it, ino, &mut rec)?;
        }
        it.orphan_head = orphans.first().copied().unwrap_or(0);
        Ok(())
    }

    /// Repair: copies inode-table leaf `leaf` (its copy gets a fresh trailer at commit).
    pub(super) fn rewrite_itab_leaf(&self, tx: &Tx, leaf: u64) -> Result<()> {
        let mut it = self.itab.lock();
        let mut tree = it.tree;
        self.tree_meta_mut(
            &mut tx.blocks(),
            &mut tree,
            leaf,
            BlockKind::InodeTable,
            &mut 0,
        )?;
        it.tree = tree;
        self.itab_tree.store(tree, Ordering::Release);
        Ok(())
    }

    /// Repair: corrects the used-inode count by `delta`.
    pub(super) fn adjust_used_inodes(&self, delta: i64) {
        let mut it = self.itab.lock();
        it.used = (it.used as i64 + delta).max(0) as u64;
    }

    /// Writes a used inode's record in `tx`. The engine's own fields (list links, the orphan
    /// flag) keep their values on the image.
    pub fn write_inode(&self, tx: &Tx, ino: u64, rec: &mut Inode) -> Result<()> {
        let mut it = self.itab.lock();
        let cur = self.record_locked(&it, ino)?;
        rec.next_free = cur.next_free;
        rec.orphan_next = cur.orphan_next;
        rec.orphan_prev = cur.orphan_prev;
        rec.flags =
            ((rec.flags.get() & !INODE_FLAG_ORPHAN) | (cur.flags.get() & INODE_FLAG_ORPHAN)).into();
        rec.seal();
        if rec.as_bytes() == cur.as_bytes() {
            // Nothing changed (a write within one clock tick): no copy, nothing to commit.
            return Ok(());
        }
        let old = self.put_record(tx, &mut it, ino, rec)?;
        let structural = old.size != rec.size || old.tree != rec.tree || old.blocks != rec.blocks;
        self.note_change(ino, tx.id(), structural);
        Ok(())
    }

    /// Allocates and writes a new inode; returns its number and record.
    pub fn alloc_inode(&self, tx: &Tx, new: &NewInode) -> Result<(u64, Inode)> {
        let mut it = self.itab.lock();
        if it.free_head == 0 {
            self.grow_inode_table(tx, &mut it)?;
        }
        let ino = it.free_head;
        let free = self.list_record(&it, ino, "free inode list")?;
        if !free.is_free() {
            return Err(self.corrupt(format!("free inode list points at used inode {ino}")));
        }
        let generation = it.next_generation;
        let mut rec = Inode::new_zeroed();
        rec.mode = new.mode.into();
        rec.uid = new.uid.into();
        rec.gid = new.gid.into();
        rec.rdev = new.rdev.into();
        rec.nlink = 1.into();
        rec.generation = generation.into();
        set_all_times_now(&mut rec);
        self.put_record(tx, &mut it, ino, &mut rec)?;
        it.free_head = free.next_free.get();
        // Wraps rather than overflows on a damaged counter (0 stays unused).
        it.next_generation = generation.checked_add(1).unwrap_or(1);
        it.used += 1;
        drop(it);
        // A fresh inode: no kernel references, nothing pending from an earlier life.
        if let Some(c) = self.vol.get(ino, super::VOL_REFS) {
            c.store(0, Ordering::Release);
        }
        self.note_change(ino, tx.id(), true);
        Ok((ino, rec))
    }

    /// Adds a leaf of free slots to the inode table.
    fn grow_inode_table(&self, tx: &Tx, it: &mut ItabState) -> Result<()> {
        let slots = it.slots;
        if slots + INODES_PER_BLOCK > self.vol.entries() {
            return Err(Error::NoSpace);
        }
        let mut tree = it.tree;
        let (leaf, fresh) = self.tree_meta_mut(
            &mut tx.blocks(),
            &mut tree,
            slots / INODES_PER_BLOCK,
            BlockKind::InodeTable,
            &mut 0,
        )?;
        if !fresh {
            return Err(self.corrupt(format!("inode table leaf past slot {slots} exists")));
        }
        for i in 0..INODES_PER_BLOCK {
            let mut rec = Inode::new_zeroed();
            rec.next_free = if i + 1 < INODES_PER_BLOCK {
                slots + i + 1
            } else {
                it.free_head
            }
            .into();
            rec.seal();
            self.img
                .write(block_off(leaf) + i * INODE_SIZE, rec.as_bytes())?;
        }
        it.tree = tree;
        it.slots = slots + INODES_PER_BLOCK;
        it.free_head = slots;
        // Publish: the tree first, then the slot count readers check against.
        self.itab_tree.store(tree, Ordering::Release);
        self.itab_slots.store(it.slots, Ordering::Release);
        Ok(())
    }

    /// Frees an inode with all its blocks (the caller holds its write lock; no entry names it).
    pub fn free_inode(&self, tx: &Tx, ino: u64, rec: &mut Inode) -> Result<()> {
        let mut tree = rec.tree.get();
        let mut blocks = rec.blocks.get();
        self.tree_free_range(&mut tx.blocks(), &mut tree, 0, u64::MAX, &mut blocks)?;
        self.xattr_free(tx, rec)?;
        self.forget_dirty_data(ino);
        let mut it = self.itab.lock();
        let cur = self.record_locked(&it, ino)?;
        if cur.flags.get() & INODE_FLAG_ORPHAN != 0 {
            self.orphan_unlink(tx, &mut it, ino)?;
        }
        let mut free = Inode::new_zeroed();
        free.next_free = it.free_head.into();
        self.put_record(tx, &mut it, ino, &mut free)?;
        it.free_head = ino;
        it.used = it.used.saturating_sub(1);
        drop(it);
        self.note_change(ino, tx.id(), true);
        Ok(())
    }

    /// The record a list link (free list, orphan list) names: a link to a slot that does
    /// not exist is damage (EIO), not a missing file (ENOENT).
    fn list_record(&self, it: &ItabState, ino: u64, list: &str) -> Result<Inode> {
        match self.record_locked(it, ino) {
            Err(Error::NotFound) => {
                Err(self.corrupt(format!("{list} names inode {ino}, past the table")))
            }
            r => r,
        }
    }

    /// Repair: clears list links a used inode may not hold (`next_free` always, the orphan
    /// links unless it is flagged as an orphan).
    pub(super) fn clear_list_links(&self, tx: &Tx, ino: u64) -> Result<()> {
        let mut it = self.itab.lock();
        let mut rec = self.record_locked(&it, ino)?;
        if rec.is_free() {
            return Ok(());
        }
        rec.next_free = 0.into();
        if rec.flags.get() & INODE_FLAG_ORPHAN == 0 {
            rec.orphan_next = 0.into();
            rec.orphan_prev = 0.into();
        }
        self.put_record(tx, &mut it, ino, &mut rec)?;
        Ok(())
    }

    /// Repair: sets the generation number the next new inode gets.
    pub(super) fn set_next_generation(&self, n: u64) {
        self.itab.lock().next_generation = n;
        *self.misc_dirty.lock() = true;
    }

    /// Puts an inode whose last name went away, but which the kernel still uses, on the orphan
    /// list: recovery frees it if the daemon stops before it does.
    pub fn orphan_add(&self, tx: &Tx, ino: u64) -> Result<()> {
        let mut it = self.itab.lock();
        let mut rec = self.record_locked(&it, ino)?;
        if rec.flags.get() & INODE_FLAG_ORPHAN != 0 {
            return Ok(());
        }
        let head = it.orphan_head;
        if head != 0 {
            let mut h = self.list_record(&it, head, "orphan list")?;
            h.orphan_prev = ino.into();
            self.put_record(tx, &mut it, head, &mut h)?;
        }
        rec.orphan_next = head.into();
        rec.orphan_prev = 0.into();
        rec.flags = (rec.flags.get() | INODE_FLAG_ORPHAN).into();
        self.put_record(tx, &mut it, ino, &mut rec)?;
        it.orphan_head = ino;
        Ok(())
    }

    /// Takes `ino` off the orphan list.
    fn orphan_unlink(&self, tx: &Tx, it: &mut ItabState, ino: u64) -> Result<()> {
        let mut rec = self.record_locked(it, ino)?;
        let (next, prev) = (rec.orphan_next.get(), rec.orphan_prev.get());
        if prev != 0 {
            let mut p = self.list_record(it, prev, "orphan list")?;
            p.orphan_next = next.into();
            self.put_record(tx, it, prev, &mut p)?;
        } else {
            if it.orphan_head != ino {
                return Err(self.corrupt(format!("orphan list does not lead to inode {ino}")));
            }
            it.orphan_head = next;
        }
        if next != 0 {
            let mut n = self.list_record(it, next, "orphan list")?;
            n.orphan_prev = prev.into();
            self.put_record(tx, it, next, &mut n)?;
        }
        rec.orphan_next = 0.into();
        rec.orphan_prev = 0.into();
        rec.flags = (rec.flags.get() & !INODE_FLAG_ORPHAN).into();
        self.put_record(tx, it, ino, &mut rec)?;
        Ok(())
    }

    /// The inodes on the orphan list (bounded by the table size).
    pub fn orphans(&self) -> Result<Vec<u64>> {
        let it = self.itab.lock();
        let mut out = Vec::new();
        let mut cur = it.orphan_head;
        while cur != 0 {
            if out.len() as u64 >= it.slots {
                return Err(self.corrupt("orphan list loops"));
            }
            let rec = self
                .record_locked(&it, cur)
                .map_err(|e| self.corrupt(format!("orphan list holds inode {cur}: {e}")))?;
            if rec.flags.get() & INODE_FLAG_ORPHAN == 0 || rec.is_free() {
                return Err(self.corrupt(format!("orphan list holds inode {cur} not an orphan")));
            }
            out.push(cur);
            cur = rec.orphan_next.get();
        }
        Ok(out)
    }

    /// Inode slots that exist (numbers `1..slots`).
    pub fn inode_slots(&self) -> u64 {
        self.itab.lock().slots
    }
}
