//! File contents: data blocks of regular files and symlinks, reached through the inode's tree.
//!
//! Data is written in place (overwrites are not atomic, as on ext4), except in blocks pinned by
//! the newest single-flush commit, which are copied first. Newly allocated blocks get zeros
//! around what is written, and are ordered data of their transaction (the commit writes them
//! with the metadata that makes them part of the file).
//!
//! The daemon remembers which blocks of which file were written since its last fsync (bounded:
//! past a limit, fsync writes back the whole image instead).

use std::collections::HashMap;

use super::pager::Blocks;
use super::tree::Mapped;
use super::txn::Tx;
use super::{Engine, block_off};
use crate::error::{Error, Result};
use crate::format::*;

/// Beyond this many tracked ranges, fsync writes back the whole image: keeps the daemon's
/// heap bounded however many files are written between two fsyncs.
const MAX_TRACKED_RANGES: usize = 1 << 16;

/// Writes of at least this many bytes start their pages' write-back to the host file at once.
const EARLY_WRITE_BACK: u64 = 512 << 10;

/// Data ranges (in blocks) written since the last fsync of their inode.
#[derive(Default)]
pub(super) struct DirtyData {
    data: HashMap<u64, Vec<(u64, u64)>>,
    ranges: usize,
    overflow: bool,
}

/// What one fsync writes back: some ranges, or everything.
pub(super) struct Pending {
    ranges: Vec<(u64, u64)>,
    all: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && !self.all
    }

    /// Starts writing the ranges back (see [`Pending::wait`]).
    pub fn start(&self, e: &Engine) -> Result<()> {
        if self.all {
            return Ok(e.img.start_write_back(0, e.img.len())?);
        }
        for &(s, l) in &self.ranges {
            e.img.start_write_back(block_off(s), l * BLOCK_SIZE)?;
        }
        Ok(())
    }

    /// Writes the ranges back and waits for the writes (no device flush: the commit or flush
    /// that follows makes them durable).
    pub fn wait(&self, e: &Engine) -> Result<()> {
        if self.all {
            return Ok(e.img.write_back(0, e.img.len())?);
        }
        for &(s, l) in &self.ranges {
            e.img.write_back(block_off(s), l * BLOCK_SIZE)?;
        }
        Ok(())
    }

    /// After a failed fsync: tracked again (a later fsync reports the failure too).
    pub fn restore(&self, e: &Engine, ino: u64) {
        if self.all {
            e.dirty_data.lock().overflow = true;
            return;
        }
        for &(s, l) in &self.ranges {
            e.mark_data(ino, s, l);
        }
    }
}

/// A piece of file data: bytes straight from the mapping, or a hole of that many bytes.
pub enum DataRun<'a> {
    Mapped(&'a [u8]),
    Hole(u64),
}

impl Engine {
    /// Records that blocks `[start, start+len)` hold data of `ino` not yet written back.
    pub(super) fn mark_data(&self, ino: u64, start: u64, len: u64) {
        let mut d = self.dirty_data.lock();
        if d.overflow {
            return;
        }
        if d.ranges >= MAX_TRACKED_RANGES {
            d.overflow = true;
            d.data.clear();
            d.ranges = 0;
            return;
        }
        let ranges = d.data.entry(ino).or_default();
        if let Some(last) = ranges.last_mut() {
            if last.0 + last.1 == start {
                last.1 += len;
                return;
            }
            if last.0 <= start && start + len <= last.0 + last.1 {
                return;
            }
        }
        ranges.push((start, len));
        d.ranges += 1;
    }

    /// Takes what `ino`'s fsync must write back.
    pub(super) fn take_dirty_data(&self, ino: u64) -> Pending {
        let mut d = self.dirty_data.lock();
        if d.overflow {
            *d = DirtyData::default();
            return Pending {
                ranges: Vec::new(),
                all: true,
            };
        }
        let ranges = d.data.remove(&ino).unwrap_or_default();
        d.ranges -= ranges.len();
        Pending { ranges, all: false }
    }

    /// Forgets what is pending for an inode whose blocks were freed.
    pub(super) fn forget_dirty_data(&self, ino: u64) {
        let mut d = self.dirty_data.lock();
        if let Some(r) = d.data.remove(&ino) {
            d.ranges -= r.len();
        }
    }

    /// The file data at byte `off`, at most `len` bytes: a slice of the mapping as long as the
    /// blocks are contiguous in the image, or the length of the hole that starts there.
    pub fn data_run(&self, rec: &Inode, off: u64, len: u64) -> Result<DataRun<'_>> {
        let fblock = off / BLOCK_SIZE;
        let in_block = off % BLOCK_SIZE;
        let max_blocks = (in_block + len).div_ceil(BLOCK_SIZE);
        let run = self.tree_lookup_run(rec.tree.get(), fblock, max_blocks)?;
        let avail = (run.len * BLOCK_SIZE - in_block).min(len);
        match run.start {
            Some(b) => Ok(DataRun::Mapped(
                self.img.bytes(block_off(b) + in_block, avail as usize)?,
            )),
            None => Ok(DataRun::Hole(avail)),
        }
    }

    /// The writable blocks for file blocks `fblock..` (up to `want`): existing blocks in place
    /// (a pinned one copied first), or new ones for a hole (then `true`).
    fn data_blocks_mut(
        &self,
        tx: &Tx,
        rec: &mut Inode,
        fblock: u64,
        want: u64,
    ) -> Result<(Mapped, bool)> {
        let mut tree = rec.tree.get();
        let mut blocks = rec.blocks.get();
        let run = self.tree_lookup_run(tree, fblock, want)?;
        let result = match run.start {
            Some(start) => {
                let unpinned = (0..run.len)
                    .position(|i| self.pinned(start + i))
                    .unwrap_or(run.len as usize) as u64;
                if unpinned > 0 {
                    Ok((
                        Mapped {
                            start,
                            len: unpinned,
                        },
                        false,
                    ))
                } else {
                    // Listed by the newest single-flush commit: keep that version intact.
                    let copy = self.copy_data_block(tx, &mut tree, fblock, start)?;
                    Ok((
                        Mapped {
                            start: copy,
                            len: 1,
                        },
                        false,
                    ))
                }
            }
            None => {
                self.tree_ensure_data(&mut tx.blocks(), &mut tree, fblock, run.len, &mut blocks)
            }
        };
        rec.tree = tree.into();
        rec.blocks = blocks.into();
        result
    }

    /// Moves file block `fblock` (now at `block`) to a fresh copy; returns the copy.
    fn copy_data_block(&self, tx: &Tx, tree: &mut u64, fblock: u64, block: u64) -> Result<u64> {
        let mut b = tx.blocks();
        let (copy, _) = b.alloc(block + 1, 1, true)?;
        self.img
            .copy_within(block_off(block), block_off(copy), BLOCK_SIZE as usize)?;
        self.tree_remap(&mut b, tree, fblock, copy)?;
        b.free(block, 1)?;
        Ok(copy)
    }

    /// Whether data block `block` was allocated by the running transaction (then its contents
    /// are ordered data of that transaction, and changes to it need no copy).
    fn data_born(&self, block: u64) -> bool {
        self.space.lock().ordered.covering(block).is_some()
    }

    /// Copies `data` into the file at byte `off`, allocating blocks as needed; freshly allocated
    /// blocks get zeros around the written part. Does not change `size` or times.
    pub fn write_data(
        &self,
        tx: &Tx,
        ino: u64,
        rec: &mut Inode,
        off: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = off.checked_add(data.len() as u64).ok_or(Error::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let mut pos = off;
        while pos < end {
            let fblock = pos / BLOCK_SIZE;
            let last_fblock = (end - 1) / BLOCK_SIZE;
            let (run, fresh) = self.data_blocks_mut(tx, rec, fblock, last_fblock - fblock + 1)?;
            let run_start_byte = fblock * BLOCK_SIZE;
            let run_end_byte = (fblock + run.len) * BLOCK_SIZE;
            let chunk_end = end.min(run_end_byte);
            if fresh {
                let head = pos - run_start_byte;
                if head > 0 {
                    self.img.zero(block_off(run.start), head as usize)?;
                }
                if chunk_end < run_end_byte {
                    let tail_off = block_off(run.start) + (chunk_end - run_start_byte);
                    self.img
                        .zero(tail_off, (run_end_byte - chunk_end) as usize)?;
                }
            }
            let src = &data[(pos - off) as usize..(chunk_end - off) as usize];
            self.img
                .write(block_off(run.start) + (pos - run_start_byte), src)?;
            self.mark_data(ino, run.start, run.len);
            if src.len() as u64 >= EARLY_WRITE_BACK {
                // A large write is a stream (the kernel's write-back of a file, a big copy): its
                // pages start on their way to the disk now, so a later fsync finds them written
                // instead of writing them all itself. (A failure shows again at that fsync.)
                let _ = self.img.start_write_back(
                    block_off(run.start) + (pos - run_start_byte),
                    src.len() as u64,
                );
            }
            pos = chunk_end;
        }
        Ok(())
    }

    /// Frees whole blocks in `[from_block, to_block)` of a file.
    pub fn punch_blocks(
        &self,
        tx: &Tx,
        rec: &mut Inode,
        from_block: u64,
        to_block: u64,
    ) -> Result<()> {
        let mut tree = rec.tree.get();
        let mut blocks = rec.blocks.get();
        let r = self.tree_free_range(
            &mut tx.blocks(),
            &mut tree,
            from_block,
            to_block,
            &mut blocks,
        );
        rec.tree = tree.into();
        rec.blocks = blocks.into();
        r
    }

    /// Zeroes `[off, off+len)` of the file where blocks exist (partial blocks of a punch or a
    /// truncate); holes stay holes. The zeros must reach the disk with the size or hole that
    /// needs them, so a block of an older transaction is copied first (the copy is ordered
    /// data of this one).
    pub fn zero_range(&self, tx: &Tx, ino: u64, rec: &mut Inode, off: u64, len: u64) -> Result<()> {
        let end = off.saturating_add(len);
        let mut pos = off;
        while pos < end {
            let fblock = pos / BLOCK_SIZE;
            let block_end = ((fblock + 1) * BLOCK_SIZE).min(end);
            if let Some(mut block) = self.tree_lookup(rec.tree.get(), fblock)? {
                if !self.data_born(block) {
                    let mut tree = rec.tree.get();
                    block = self.copy_data_block(tx, &mut tree, fblock, block)?;
                    rec.tree = tree.into();
                }
                self.img.zero(
                    block_off(block) + pos % BLOCK_SIZE,
                    (block_end - pos) as usize,
                )?;
                self.mark_data(ino, block, 1);
            }
            pos = block_end;
        }
        Ok(())
    }

    /// Allocates blocks for `[off, off+len)` without writing data (fallocate); new blocks are
    /// zeroed.
    pub fn allocate_range(
        &self,
        tx: &Tx,
        ino: u64,
        rec: &mut Inode,
        off: u64,
        len: u64,
    ) -> Result<()> {
        let end = off.checked_add(len).ok_or(Error::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let mut fblock = off / BLOCK_SIZE;
        let last = end.div_ceil(BLOCK_SIZE);
        while fblock < last {
            let run = self.tree_lookup_run(rec.tree.get(), fblock, last - fblock)?;
            if run.start.is_some() {
                fblock += run.len;
                continue;
            }
            let (run, _) = self.data_blocks_mut(tx, rec, fblock, run.len)?;
            self.img
                .zero(block_off(run.start), (run.len * BLOCK_SIZE) as usize)?;
            self.mark_data(ino, run.start, run.len);
            fblock += run.len;
        }
        Ok(())
    }

    /// Repair: copies every node of a file's tree (the copies get fresh trailers at commit).
    pub(super) fn rewrite_tree(&self, tx: &Tx, rec: &mut Inode) -> Result<()> {
        let mut leaves = Vec::new();
        self.tree_visit(rec.tree.get(), &mut |_, is_content, fblock| {
            if !is_content && fblock % TREE_FANOUT == 0 {
                leaves.push(fblock);
            }
            Ok(())
        })?;
        let mut tree = rec.tree.get();
        for fblock in leaves {
            self.tree_slot_mut(&mut tx.blocks(), &mut tree, fblock)?;
        }
        rec.tree = tree.into();
        Ok(())
    }

    /// Blocks a write of `[off, off+len)` needs at most: its holes (with tree nodes) and its
    /// pinned blocks (copied).
    pub fn write_cost(&self, rec: &Inode, off: u64, len: u64) -> Result<u64> {
        let mut fblock = off / BLOCK_SIZE;
        let end = off.saturating_add(len).div_ceil(BLOCK_SIZE);
        let mut need = 0;
        while fblock < end {
            let run = self.tree_lookup_run(rec.tree.get(), fblock, end - fblock)?;
            match run.start {
                None => need += run.len + run.len / 256 + u64::from(TREE_MAX_HEIGHT),
                Some(s) => need += (s..s + run.len).filter(|&b| self.pinned(b)).count() as u64,
            }
            fblock += run.len;
        }
        Ok(need)
    }

    /// First byte offset `>= off` that is data (`want_data`) or a hole, within `size`.
    pub fn seek(&self, rec: &Inode, off: u64, want_data: bool) -> Result<Option<u64>> {
        let size = rec.size.get();
        if off >= size {
            return Ok(None);
        }
        match self.tree_next(rec.tree.get(), off / BLOCK_SIZE, want_data)? {
            Some(fb) => {
                let pos = fb.saturating_mul(BLOCK_SIZE).max(off);
                if pos >= size {
                    Ok(if want_data { None } else { Some(size) })
                } else {
                    Ok(Some(pos))
                }
            }
            None => Ok(if want_data { None } else { Some(size) }),
        }
    }
}
