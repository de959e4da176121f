//! Directories. A directory inode's block tree holds two things:
//! - entry records (blocks of kind `DirEntries`), appended at `dir_entries_end` in tree blocks
//!   `[0, DIR_ENTRY_BLOCKS)`; a record never crosses a block's payload (a zero `rec_len` means
//!   "rest of the block unused"); a deleted record keeps its place with `ino = 0`, so a record's
//!   offset is a stable readdir cookie;
//! - a name index (blocks of kind `DirIndex`): an open-addressing hash table of u64 slots
//!   `(hash << 32) | (offset / 8 + 1)` in one of two areas (`dir_index_area_block`). Empty
//!   slot = 0, deleted = `DIR_SLOT_DELETED` in the low half. It is rebuilt into the other area
//!   when it fills up, so lookups stay O(1) at any size without moving entry records.
//!
//! Callers hold the directory's inode write lock for changes, the read lock for lookups and
//! iteration, and write the inode record back after a change.

use zerocopy::{FromBytes, IntoBytes};

use super::txn::Tx;
use super::{Engine, block_off};
use crate::error::{Error, Result};
use crate::format::*;

/// Index slots in a new index (a power of two; two blocks of 510 slots).
const MIN_INDEX_SLOTS: u64 = 512;
/// Largest offset the 32-bit entry reference in an index slot can name.
const ENTRIES_LIMIT: u64 = (u32::MAX as u64 - 1) * 8;

/// Whether a record header at `in_block` is well formed (lengths fit the payload and the name).
fn plausible_record(h: &DirentHeader, in_block: u64) -> bool {
    let rec_len = u64::from(h.rec_len.get());
    let name_len = usize::from(h.name_len);
    rec_len % 8 == 0
        && name_len > 0
        && rec_len >= dirent_rec_len(name_len)
        && in_block + rec_len <= PAYLOAD_SIZE
}

/// The record header at payload offset `p` of a block's bytes, if one fits there.
fn header_at(bytes: &[u8], p: u64) -> Option<DirentHeader> {
    let at = usize::try_from(p).ok()?;
    DirentHeader::read_from_bytes(bytes.get(at..at + DIRENT_HEADER_SIZE as usize)?).ok()
}

/// Whether a record whose lengths fit and whose checksum matches starts at payload offset `p`.
fn valid_record_at(bytes: &[u8], p: u64) -> bool {
    header_at(bytes, p).is_some_and(|h| {
        let name_at = (p + DIRENT_HEADER_SIZE) as usize;
        h.rec_len.get() != 0
            && plausible_record(&h, p)
            && bytes
                .get(name_at..name_at + usize::from(h.name_len))
                .is_some_and(|name| dirent_checksum(&h, name) == h.checksum.get())
    })
}

/// One live directory entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: u8,
    /// Byte offset of the record (stable while the entry exists).
    pub offset: u64,
    /// Offset right after this record: where to resume iteration.
    pub next: u64,
}

/// Where a name was found.
pub(super) struct Found {
    pub ino: u64,
    pub kind: u8,
    pub offset: u64,
    slot: u64,
}

fn kind_of_block(fblock: u64) -> BlockKind {
    if fblock < DIR_ENTRY_BLOCKS {
        BlockKind::DirEntries
    } else {
        BlockKind::DirIndex
    }
}

impl Engine {
    /// Borrows `len` bytes of a directory's tree at byte `off` (inside one payload);
    /// `None` = hole.
    fn dir_bytes(&self, dir: &Inode, off: u64, len: usize) -> Result<Option<&[u8]>> {
        let fblock = off / BLOCK_SIZE;
        if off % BLOCK_SIZE + len as u64 > PAYLOAD_SIZE {
            return Err(self.corrupt(format!("directory read at {off}+{len} crosses a block")));
        }
        match self.tree_lookup(dir.tree.get(), fblock)? {
            Some(b) => {
                self.expect_kind(b, kind_of_block(fblock), None)?;
                Ok(Some(self.img.bytes(block_off(b) + off % BLOCK_SIZE, len)?))
            }
            None => Ok(None),
        }
    }

    /// Writes inside one payload of a directory's tree, copying or creating the block as needed.
    fn dir_write(&self, tx: &Tx, dir: &mut Inode, off: u64, data: &[u8]) -> Result<()> {
        let fblock = off / BLOCK_SIZE;
        debug_assert!(off % BLOCK_SIZE + data.len() as u64 <= PAYLOAD_SIZE);
        let mut tree = dir.tree.get();
        let mut blocks = dir.blocks.get();
        let r = self.tree_meta_mut(
            &mut tx.blocks(),
            &mut tree,
            fblock,
            kind_of_block(fblock),
            &mut blocks,
        );
        dir.tree = tree.into();
        dir.blocks = blocks.into();
        let (block, _) = r?;
        self.img.write(block_off(block) + off % BLOCK_SIZE, data)?;
        Ok(())
    }

    fn index_slot_off(dir: &Inode, idx: u64) -> u64 {
        let fblock =
            dir_index_area_block(dir.dir_hash_area.get()) + idx / DIR_INDEX_SLOTS_PER_BLOCK;
        fblock * BLOCK_SIZE + (idx % DIR_INDEX_SLOTS_PER_BLOCK) * 8
    }

    fn load_index_slot(&self, dir: &Inode, idx: u64) -> Result<u64> {
        match self.dir_bytes(dir, Self::index_slot_off(dir, idx), 8)? {
            Some(b) => Ok(u64::from_le_bytes(
                b.try_into().map_err(|_| Error::corrupt("slot"))?,
            )),
            None => Ok(0),
        }
    }

    fn store_index_slot(&self, tx: &Tx, dir: &mut Inode, idx: u64, v: u64) -> Result<()> {
        let off = Self::index_slot_off(dir, idx);
        self.dir_write(tx, dir, off, &v.to_le_bytes())
    }

    /// Reads and validates the entry record at `off`. `Ok(None)` = end of this block.
    fn read_record(&self, dir: &Inode, off: u64) -> Result<Option<(DirentHeader, &[u8])>> {
        let in_block = off % BLOCK_SIZE;
        if in_block + DIRENT_HEADER_SIZE > PAYLOAD_SIZE {
            return Ok(None);
        }
        let Some(hb) = self.dir_bytes(dir, off, DIRENT_HEADER_SIZE as usize)? else {
            return Ok(None);
        };
        let h = DirentHeader::read_from_bytes(hb).map_err(|_| Error::corrupt("dirent"))?;
        let rec_len = u64::from(h.rec_len.get());
        if rec_len == 0 {
            return Ok(None);
        }
        if !plausible_record(&h, in_block) {
            return Err(self.corrupt(format!(
                "directory entry at {off}: record length {rec_len}, name length {}",
                h.name_len
            )));
        }
        let name = self
            .dir_bytes(dir, off + DIRENT_HEADER_SIZE, usize::from(h.name_len))?
            .ok_or_else(|| Error::corrupt("directory entry name"))?;
        if dirent_checksum(&h, name) != h.checksum.get() {
            return Err(self.corrupt(format!("directory entry at {off}: checksum mismatch")));
        }
        Ok(Some((h, name)))
    }

    /// Finds `name` through the index.
    pub(super) fn dir_find(&self, dir: &Inode, name: &[u8]) -> Result<Option<Found>> {
        let cap = dir.dir_hash_cap.get();
        if cap == 0 {
            return Ok(None);
        }
        if !cap.is_power_of_two()
            || !(MIN_INDEX_SLOTS..=DIR_INDEX_AREA_BLOCKS * DIR_INDEX_SLOTS_PER_BLOCK).contains(&cap)
        {
            return Err(self.corrupt(format!("directory index size {cap}")));
        }
        let hash = name_hash(self.hash_seed, name);
        let mut idx = u64::from(hash) & (cap - 1);
        for _ in 0..cap {
            let slot = self.load_index_slot(dir, idx)?;
            if slot == 0 {
                return Ok(None);
            }
            let reference = slot as u32;
            if (slot >> 32) as u32 == hash && reference != DIR_SLOT_DELETED {
                let off = (u64::from(reference) - 1) * 8;
                if off >= dir.dir_entries_end.get() {
                    return Err(self.corrupt(format!("directory index points past end: {off}")));
                }
                if let Some((h, n)) = self.read_record(dir, off)?
                    && h.ino.get() != 0
                    && n == name
                {
                    return Ok(Some(Found {
                        ino: h.ino.get(),
                        kind: h.kind,
                        offset: off,
                        slot: idx,
                    }));
                }
            }
            idx = (idx + 1) & (cap - 1);
        }
        Ok(None)
    }

    pub fn dir_lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<(u64, u8)>> {
        Ok(self.dir_find(dir, name)?.map(|f| (f.ino, f.kind)))
    }

    /// Blocks an insert into `dir` may need beyond a handful: an index rebuild.
    pub fn dir_insert_cost(&self, dir: &Inode) -> u64 {
        let cap = dir.dir_hash_cap.get();
        let new_cap = (dir.dir_live.get() + 1)
            .saturating_mul(2)
            .max(cap)
            .max(MIN_INDEX_SLOTS);
        new_cap.next_power_of_two().saturating_mul(2) / DIR_INDEX_SLOTS_PER_BLOCK + 8
    }

    /// Whether the next insert may write its record at `dir_entries_end`: a damaged end
    /// offset must not make it write over a record, nor where no listing would find it. The
    /// position is 8-aligned, and its header bytes are unused, or it starts a block that is a
    /// hole. (A record that would not fit goes to the next block's start instead.)
    fn append_position_free(&self, dir: &Inode) -> Result<bool> {
        let off = dir.dir_entries_end.get();
        if !off.is_multiple_of(8) {
            return Ok(false);
        }
        if off % BLOCK_SIZE + DIRENT_HEADER_SIZE > PAYLOAD_SIZE {
            return Ok(true);
        }
        Ok(
            match self.dir_bytes(dir, off, DIRENT_HEADER_SIZE as usize)? {
                Some(b) => b.iter().all(|&x| x == 0),
                None => off.is_multiple_of(BLOCK_SIZE),
            },
        )
    }

    /// Appends an entry (the caller checked that `name` is absent).
    pub fn dir_insert(
        &self,
        tx: &Tx,
        dir: &mut Inode,
        name: &[u8],
        ino: u64,
        kind: u8,
    ) -> Result<()> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        let used = dir.dir_hash_used.get();
        let cap = dir.dir_hash_cap.get();
        if (used + 1) * 4 > cap * 3 {
            let live = dir.dir_live.get() + 1;
            let mut new_cap = MIN_INDEX_SLOTS.max(cap);
            while live * 2 > new_cap {
                new_cap *= 2;
            }
            self.rebuild_index(tx, dir, new_cap)?;
        }
        let rec_len = dirent_rec_len(name.len());
        let mut off = dir.dir_entries_end.get();
        if off % BLOCK_SIZE + rec_len > PAYLOAD_SIZE {
            off = off.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        }
        if off + rec_len > ENTRIES_LIMIT.min(DIR_ENTRY_BLOCKS * BLOCK_SIZE) {
            return Err(Error::NoSpace);
        }
        if !self.append_position_free(dir)? {
            return Err(self.corrupt(format!(
                "directory entries end at {}, which is not where its records end",
                dir.dir_entries_end
            )));
        }
        let hash = name_hash(self.hash_seed, name);
        let mut rec = vec![0u8; rec_len as usize];
        let header = DirentHeader::sealed(ino, rec_len, kind, name);
        rec[..DIRENT_HEADER_SIZE as usize].copy_from_slice(header.as_bytes());
        rec[DIRENT_HEADER_SIZE as usize..][..name.len()].copy_from_slice(name);
        self.dir_write(tx, dir, off, &rec)?;
        dir.dir_entries_end = (off + rec_len).into();
        self.index_put(tx, dir, hash, off)?;
        dir.dir_live = (dir.dir_live.get() + 1).into();
        Ok(())
    }

    fn index_put(&self, tx: &Tx, dir: &mut Inode, hash: u32, off: u64) -> Result<()> {
        let cap = dir.dir_hash_cap.get();
        let mut idx = u64::from(hash) & (cap - 1);
        for _ in 0..cap {
            let slot = self.load_index_slot(dir, idx)?;
            if slot == 0 || slot as u32 == DIR_SLOT_DELETED {
                if slot == 0 {
                    dir.dir_hash_used = (dir.dir_hash_used.get() + 1).into();
                }
                let v = (u64::from(hash) << 32) | (off / 8 + 1);
                return self.store_index_slot(tx, dir, idx, v);
            }
            idx = (idx + 1) & (cap - 1);
        }
        Err(self.corrupt("directory index full"))
    }

    /// Rebuilds the index with `new_cap` slots in the other area, dropping deleted slots.
    fn rebuild_index(&self, tx: &Tx, dir: &mut Inode, new_cap: u64) -> Result<()> {
        let old_area = dir.dir_hash_area.get();
        let new_area = 1 - old_area.min(1);
        let mut entries = Vec::new();
        self.dir_for_each(dir, 0, &mut |e| {
            entries.push((name_hash(self.hash_seed, &e.name), e.offset));
            Ok(true)
        })?;
        // Clear whatever the target area held, then fill it.
        self.free_index_area(tx, dir, new_area)?;
        dir.dir_hash_area = new_area.into();
        dir.dir_hash_cap = new_cap.into();
        dir.dir_hash_used = 0.into();
        for (hash, off) in entries {
            self.index_put(tx, dir, hash, off)?;
        }
        self.free_index_area(tx, dir, old_area)
    }

    fn free_index_area(&self, tx: &Tx, dir: &mut Inode, area: u32) -> Result<()> {
        let start = dir_index_area_block(area);
        self.punch_blocks(tx, dir, start, start + DIR_INDEX_AREA_BLOCKS)
    }

    /// Removes the entry `name`; returns what it pointed at.
    pub fn dir_remove(&self, tx: &Tx, dir: &mut Inode, name: &[u8]) -> Result<(u64, u8)> {
        let f = self.dir_find(dir, name)?.ok_or(Error::NotFound)?;
        let (h, _) = self
            .read_record(dir, f.offset)?
            .ok_or_else(|| Error::corrupt("entry vanished"))?;
        let tombstone = DirentHeader::sealed(0, u64::from(h.rec_len.get()), h.kind, name);
        let slot = self.load_index_slot(dir, f.slot)?;
        self.store_index_slot(
            tx,
            dir,
            f.slot,
            (slot & !0xffff_ffff) | u64::from(DIR_SLOT_DELETED),
        )?;
        self.dir_write(tx, dir, f.offset, tombstone.as_bytes())?;
        dir.dir_live = dir.dir_live.get().saturating_sub(1).into();
        dir.dir_tomb_bytes = (dir.dir_tomb_bytes.get() + u64::from(h.rec_len.get())).into();
        if dir.dir_live.get() == 0 {
            // The counter says empty; the records decide before anything is freed (a damaged
            // counter must not take the other entries with it).
            let mut live = 0u64;
            self.dir_for_each(dir, 0, &mut |_| {
                live += 1;
                Ok(true)
            })?;
            if live > 0 {
                dir.dir_live = live.into();
                let e = self.corrupt(format!(
                    "directory counted no entries left but holds {live}; counter corrected"
                ));
                log::error!("image corruption: {e}");
                return Ok((f.ino, f.kind));
            }
            // Empty: give every block back; cookies of open streams point past the (new) end.
            self.punch_blocks(tx, dir, 0, u64::MAX)?;
            dir.dir_entries_end = 0.into();
            dir.dir_tomb_bytes = 0.into();
            dir.dir_hash_cap = 0.into();
            dir.dir_hash_used = 0.into();
        }
        Ok((f.ino, f.kind))
    }

    /// Points the existing entry `name` at another inode (rename over an existing target).
    pub fn dir_replace(
        &self,
        tx: &Tx,
        dir: &mut Inode,
        name: &[u8],
        ino: u64,
        kind: u8,
    ) -> Result<u64> {
        let f = self.dir_find(dir, name)?.ok_or(Error::NotFound)?;
        let (h, _) = self
            .read_record(dir, f.offset)?
            .ok_or_else(|| Error::corrupt("entry vanished"))?;
        let header = DirentHeader::sealed(ino, u64::from(h.rec_len.get()), kind, name);
        self.dir_write(tx, dir, f.offset, header.as_bytes())?;
        Ok(f.ino)
    }

    /// Whether a valid record (or the end mark of a block, or a hole) starts at `off`.
    fn record_starts_at(&self, dir: &Inode, off: u64) -> Result<bool> {
        if !off.is_multiple_of(8) {
            return Ok(false);
        }
        if off % BLOCK_SIZE + DIRENT_HEADER_SIZE > PAYLOAD_SIZE {
            return Ok(true);
        }
        let Some(hb) = self.dir_bytes(dir, off, DIRENT_HEADER_SIZE as usize)? else {
            return Ok(true);
        };
        let h = DirentHeader::read_from_bytes(hb).map_err(|_| Error::corrupt("dirent"))?;
        if h.rec_len.get() == 0 {
            return Ok(true);
        }
        if !plausible_record(&h, off % BLOCK_SIZE) {
            return Ok(false);
        }
        let name = self.dir_bytes(dir, off + DIRENT_HEADER_SIZE, usize::from(h.name_len))?;
        Ok(name.is_some_and(|n| dirent_checksum(&h, n) == h.checksum.get()))
    }

    /// Calls `f` for each live entry from byte offset `from`, until it returns `false`. A
    /// `from` that is no record's start (a stale readdir position: the directory was emptied
    /// and refilled since) resumes at the next block rather than reading a record's middle.
    pub fn dir_for_each(
        &self,
        dir: &Inode,
        from: u64,
        f: &mut dyn FnMut(DirEntry) -> Result<bool>,
    ) -> Result<()> {
        self.dir_for_each_until(dir, from, u64::MAX, f)
    }

    /// Like `dir_for_each`, stopping at byte offset `until` (the end of the entries when a
    /// listing began: records appended since, by creates and renames, are not visited, so a
    /// pass ends however fast entries are added). A `from` inside a record resumes at the next
    /// record of its block.
    pub fn dir_for_each_until(
        &self,
        dir: &Inode,
        from: u64,
        until: u64,
        f: &mut dyn FnMut(DirEntry) -> Result<bool>,
    ) -> Result<()> {
        let end = dir
            .dir_entries_end
            .get()
            .min(DIR_ENTRY_BLOCKS * BLOCK_SIZE)
            .min(until);
        let mut off = from;
        if from > 0 && from < end {
            // Found by walking the block's records, not by parsing bytes at `from`, which may
            // lie inside a record and look like anything.
            off = self.next_record_start(dir, from)?;
        }
        while off < end {
            if off.is_multiple_of(BLOCK_SIZE) {
                // Skip a run of missing blocks in one step: an end offset far beyond the
                // records (a damaged inode) must not cost a lookup per empty block.
                let block = off / BLOCK_SIZE;
                let blocks_left = end.div_ceil(BLOCK_SIZE) - block;
                let run = self.tree_lookup_run(dir.tree.get(), block, blocks_left)?;
                if run.start.is_none() {
                    off += run.len.max(1) * BLOCK_SIZE;
                    continue;
                }
            }
            match self.read_record(dir, off)? {
                None => off = (off / BLOCK_SIZE + 1) * BLOCK_SIZE,
                Some((h, name)) => {
                    let next = off + u64::from(h.rec_len.get());
                    if h.ino.get() != 0 {
                        let e = DirEntry {
                            name: name.to_vec(),
                            ino: h.ino.get(),
                            kind: h.kind,
                            offset: off,
                            next,
                        };
                        if !f(e)? {
                            return Ok(());
                        }
                    }
                    off = next;
                }
            }
        }
        Ok(())
    }

    /// The first record start at or after `from` in `from`'s block, found by following the
    /// block's records from its start; the next block if the chain does not lead there.
    fn next_record_start(&self, dir: &Inode, from: u64) -> Result<u64> {
        // The common case, a position handed out: a whole record whose checksum matches
        // starts there (bytes inside a record do not pass for one by chance).
        if self.record_starts_at(dir, from)?
            && self.read_record(dir, from).is_ok_and(|r| r.is_some())
        {
            return Ok(from);
        }
        let base = from / BLOCK_SIZE * BLOCK_SIZE;
        let next_block = base + BLOCK_SIZE;
        let mut off = base;
        // At most one step per 8 bytes of the block: rec_len is checked to be positive.
        while off < from {
            match self.read_record(dir, off) {
                Ok(Some((h, _))) if h.rec_len.get() > 0 => off += u64::from(h.rec_len.get()),
                _ => return Ok(next_block),
            }
        }
        if off >= next_block || !self.record_starts_at(dir, off)? {
            return Ok(next_block);
        }
        Ok(off)
    }

    /// Makes `dir` an empty directory whose parent is `parent`.
    pub fn dir_init(&self, dir: &mut Inode, parent: u64) {
        dir.parent = parent.into();
        dir.dir_entries_end = 0.into();
        dir.dir_live = 0.into();
        dir.dir_tomb_bytes = 0.into();
        dir.dir_hash_cap = 0.into();
        dir.dir_hash_used = 0.into();
        dir.dir_hash_area = 0.into();
    }

    /// Repair: makes every block of the entry region parse and agree with `dir_entries_end`.
    /// A damaged record is turned into a deleted one reaching to the next valid record of its
    /// block (or the block is ended there), so the records around it survive; a record whose
    /// length hides a valid record behind its name is cut back to its name; a block whose
    /// checksum fails is rewritten (its records have their own checksums); the end offset is
    /// set to where the records end, and blocks past it are dropped. Returns how many damaged
    /// spots were fixed.
    pub(super) fn dir_salvage(&self, tx: &Tx, dir: &mut Inode) -> Result<u64> {
        let end = dir.dir_entries_end.get().min(DIR_ENTRY_BLOCKS * BLOCK_SIZE);
        let mut cut = 0;
        let mut records_end = 0;
        let mut tomb_bytes = 0;
        for block in self.dir_entry_blocks(dir, end)? {
            let base = block * BLOCK_SIZE;
            let bytes = match self.dir_bytes(dir, base, PAYLOAD_SIZE as usize) {
                Ok(Some(b)) => b.to_vec(),
                Ok(None) => continue,
                Err(_) => {
                    // A block of the wrong kind: drop it from the directory.
                    self.punch_blocks(tx, dir, block, block + 1)?;
                    cut += 1;
                    continue;
                }
            };
            if let Some(b) = self.tree_lookup(dir.tree.get(), block)?
                && self.verify_block(b).is_err()
            {
                // Rewriting a byte copies the block into this transaction, which seals it.
                self.dir_write(tx, dir, base, &bytes[..1])?;
                cut += 1;
            }
            let mut p = 0u64;
            while p + DIRENT_HEADER_SIZE <= PAYLOAD_SIZE {
                let Some(h) = header_at(&bytes, p) else { break };
                if h.rec_len.get() == 0 {
                    break;
                }
                if valid_record_at(&bytes, p) {
                    let tight = dirent_rec_len(usize::from(h.name_len));
                    let len = if u64::from(h.rec_len.get()) > tight
                        && valid_record_at(&bytes, p + tight)
                    {
                        let name_at = (p + DIRENT_HEADER_SIZE) as usize;
                        let name = &bytes[name_at..name_at + usize::from(h.name_len)];
                        let fixed = DirentHeader::sealed(h.ino.get(), tight, h.kind, name);
                        self.dir_write(tx, dir, base + p, fixed.as_bytes())?;
                        cut += 1;
                        tight
                    } else {
                        u64::from(h.rec_len.get())
                    };
                    if h.ino.get() == 0 {
                        tomb_bytes += len;
                    }
                    p += len;
                    records_end = base + p;
                    continue;
                }
                cut += 1;
                // Next 8-aligned offset holding a valid record, far enough to leave room for a
                // deleted record (header and a one-byte name).
                let mut q = p + dirent_rec_len(1);
                while q + DIRENT_HEADER_SIZE <= PAYLOAD_SIZE {
                    if valid_record_at(&bytes, q) {
                        break;
                    }
                    q += 8;
                }
                let filler = if q + DIRENT_HEADER_SIZE <= PAYLOAD_SIZE {
                    // A deleted record over the damage; its one-byte "name" is what lies there.
                    let name_at = (p + DIRENT_HEADER_SIZE) as usize;
                    DirentHeader::sealed(0, q - p, 0, &bytes[name_at..name_at + 1])
                } else {
                    DirentHeader {
                        ino: 0.into(),
                        checksum: 0.into(),
                        rec_len: 0.into(),
                        name_len: 0,
                        kind: 0,
                    }
                };
                self.dir_write(tx, dir, base + p, filler.as_bytes())?;
                if filler.rec_len.get() == 0 {
                    break;
                }
                tomb_bytes += q - p;
                p = q;
                records_end = base + p;
            }
        }
        if records_end != dir.dir_entries_end.get() {
            cut += 1;
            let keep = records_end.div_ceil(BLOCK_SIZE);
            self.punch_blocks(tx, dir, keep, end.div_ceil(BLOCK_SIZE).max(keep))?;
            dir.dir_entries_end = records_end.into();
        }
        dir.dir_tomb_bytes = tomb_bytes.into();
        // The next insert goes at the end: what lies there (the rest of a record cut off) is
        // cleared so it reads as the end of the block's records.
        if !self.append_position_free(dir)? {
            self.dir_write(tx, dir, records_end, &[0; DIRENT_HEADER_SIZE as usize])?;
            cut += 1;
        }
        Ok(cut)
    }

    /// The mapped blocks of the entry region below byte `end` (runs of holes are skipped in
    /// one step, so a huge damaged end offset costs little).
    fn dir_entry_blocks(&self, dir: &Inode, end: u64) -> Result<Vec<u64>> {
        let last = end.min(DIR_ENTRY_BLOCKS * BLOCK_SIZE).div_ceil(BLOCK_SIZE);
        let mut blocks = Vec::new();
        let mut block = 0;
        while block < last {
            let run = self.tree_lookup_run(dir.tree.get(), block, last - block)?;
            let len = run.len.max(1).min(last - block);
            if run.start.is_some() {
                blocks.extend(block..block + len);
            }
            block += len;
        }
        Ok(blocks)
    }

    /// Check: what is wrong with the layout of the entry region that reading it does not
    /// notice: records whose length hides valid records behind their names, and an end offset
    /// that is not where the records end (an insert there would write over a record, or where
    /// no listing reaches). Empty when the region is sound.
    pub(super) fn dir_layout_problems(&self, dir: &Inode) -> Result<Vec<String>> {
        let end = dir.dir_entries_end.get();
        let mut problems = Vec::new();
        if end > DIR_ENTRY_BLOCKS * BLOCK_SIZE {
            problems.push(format!("entries end at {end}, past the entry region"));
            return Ok(problems);
        }
        let mut records_end = 0;
        let mut tomb_bytes = 0;
        for block in self.dir_entry_blocks(dir, end)? {
            let base = block * BLOCK_SIZE;
            let Some(bytes) = self.dir_bytes(dir, base, PAYLOAD_SIZE as usize)? else {
                continue;
            };
            let mut p = 0u64;
            while let Some(h) = header_at(bytes, p).filter(|_| valid_record_at(bytes, p)) {
                if h.ino.get() == 0 {
                    tomb_bytes += u64::from(h.rec_len.get());
                }
                let tight = dirent_rec_len(usize::from(h.name_len));
                if u64::from(h.rec_len.get()) > tight && valid_record_at(bytes, p + tight) {
                    problems.push(format!(
                        "record at {} has length {} and hides the record after it",
                        base + p,
                        h.rec_len
                    ));
                }
                p += u64::from(h.rec_len.get());
                records_end = base + p;
            }
        }
        if records_end != end {
            problems.push(format!(
                "entries end at {end}, but the records end at {records_end}"
            ));
        } else if !self.append_position_free(dir)? {
            problems.push(format!(
                "the bytes at the end of the entries, {end}, are not free"
            ));
        }
        if tomb_bytes != dir.dir_tomb_bytes.get() {
            problems.push(format!(
                "deleted records hold {tomb_bytes} bytes, the directory counts {}",
                dir.dir_tomb_bytes
            ));
        }
        let cap = dir.dir_hash_cap.get();
        if cap.is_power_of_two() && cap <= DIR_INDEX_AREA_BLOCKS * DIR_INDEX_SLOTS_PER_BLOCK {
            let mut used = 0;
            for idx in 0..cap {
                used += u64::from(self.load_index_slot(dir, idx)? != 0);
            }
            if used != dir.dir_hash_used.get() {
                problems.push(format!(
                    "{used} index slots are in use, the directory counts {}",
                    dir.dir_hash_used
                ));
            }
        }
        Ok(problems)
    }

    /// Rebuilds a directory's index from its entry records (repair).
    pub(super) fn dir_reindex(&self, tx: &Tx, dir: &mut Inode) -> Result<()> {
        let mut live = 0u64;
        self.dir_for_each(dir, 0, &mut |_| {
            live += 1;
            Ok(true)
        })?;
        dir.dir_live = live.into();
        if live == 0 {
            self.punch_blocks(tx, dir, 0, u64::MAX)?;
            let parent = dir.parent.get();
            self.dir_init(dir, parent);
            return Ok(());
        }
        let mut cap = MIN_INDEX_SLOTS;
        while live * 2 > cap {
            cap *= 2;
        }
        self.rebuild_index(tx, dir, cap)
    }
}
