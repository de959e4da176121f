//! Free-space allocator. Committed allocation state is one bitmap block per group of
//! `GROUP_BLOCKS` blocks (bit set = in use), reached through the space tree (file block `g` of
//! the tree = bitmap of group `g`).
//!
//! During a transaction the bitmaps are only read: blocks allocated or freed by the running
//! transaction are kept in memory (`allocated`, `freed`), and the commit applies them to copies
//! of the bitmaps it touches ([`Engine::apply_space`]), in one pass at the cut. So allocation never
//! recurses into copy-on-write of the space map, and every committed state's bitmaps are exact.
//!
//! A freed block stays unallocatable ("frozen") until the transaction after the one that freed
//! it is durable: both superblock slots then describe states that never saw it reused.
//! All of this is guarded by the `space` lock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::pager::Blocks;
use super::{Engine, block_off};
use crate::error::{Error, Result};
use crate::format::*;

/// Smallest growth step of the image, in blocks (16 MiB).
const MIN_GROW_BLOCKS: u64 = 4096;
/// The image grows ahead of need when fewer blocks than this would stay available.
const LOW_WATER_BLOCKS: u64 = 1024;
/// Blocks that only operations freeing space may use (so a full image can always be emptied).
const DELETE_MARGIN_BLOCKS: u64 = 128;

/// Disjoint block ranges `start -> len`, adjacent ranges merged.
#[derive(Default, Debug, Clone)]
pub(super) struct Extents {
    map: BTreeMap<u64, u64>,
    total: u64,
}

impl Extents {
    pub fn insert(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (mut s, mut l) = (start, len);
        if let Some((&ps, &pl)) = self.map.range(..=start).next_back()
            && ps + pl >= start
        {
            // Overlap or adjacency with the previous range.
            let end = (ps + pl).max(start + len);
            self.total -= pl;
            self.map.remove(&ps);
            s = ps;
            l = end - ps;
        }
        while let Some((&ns, &nl)) = self.map.range(s..).next() {
            if ns > s + l {
                break;
            }
            let end = (ns + nl).max(s + l);
            self.total -= nl;
            self.map.remove(&ns);
            l = end - s;
        }
        self.total += l;
        self.map.insert(s, l);
    }

    /// Removes `[start, start+len)`; returns how many blocks were present.
    pub fn remove(&mut self, start: u64, len: u64) -> u64 {
        let end = start + len;
        let mut removed = 0;
        let mut touched: Vec<(u64, u64)> = Vec::new();
        if let Some((&ps, &pl)) = self.map.range(..start).next_back()
            && ps + pl > start
        {
            touched.push((ps, pl));
        }
        touched.extend(self.map.range(start..end).map(|(&s, &l)| (s, l)));
        for (s, l) in touched {
            self.map.remove(&s);
            self.total -= l;
            let e = s + l;
            if s < start {
                self.map.insert(s, start - s);
                self.total += start - s;
            }
            if e > end {
                self.map.insert(end, e - end);
                self.total += e - end;
            }
            removed += e.min(end) - s.max(start);
        }
        removed
    }

    /// End of the range covering `block`, if any.
    pub fn covering(&self, block: u64) -> Option<u64> {
        let (&s, &l) = self.map.range(..=block).next_back()?;
        (block < s + l).then_some(s + l)
    }

    /// Start of the first range at or after `block`.
    pub fn next_start(&self, block: u64) -> Option<u64> {
        self.map.range(block..).next().map(|(&s, _)| s)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &l)| (s, l))
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The allocator's state (under the `space` lock).
pub(super) struct Space {
    pub total_blocks: u64,
    /// Blocks not in use (including frozen ones).
    pub free_blocks: u64,
    /// Packed space tree of the committed bitmaps.
    pub tree: u64,
    /// Where data allocation searches next (next fit: files stay contiguous).
    pub cursor: u64,
    /// Where metadata allocation searches next (first fit from the start of the image, moved
    /// back when freed blocks become reusable): copies made by copy-on-write recycle blocks
    /// the host file has already written, which flush faster than never-written (fallocated)
    /// space, and stay close together.
    meta_cursor: u64,
    /// Blocks promised to running operations.
    reserved: u64,
    /// Allocated by the running transaction (bits not yet set).
    pub allocated: Extents,
    /// Freed by the running transaction, committed as used (bits not yet cleared).
    pub freed: Extents,
    /// Freed and not yet reusable.
    frozen: Extents,
    frozen_by_txn: VecDeque<(u64, Vec<(u64, u64)>)>,
    /// Groups added by growth since the last commit: their first block (set aside in
    /// `allocated`) becomes their bitmap at the commit.
    new_groups: BTreeSet<u64>,
    /// Metadata blocks written by the running transaction.
    pub pages: BTreeSet<u64>,
    /// Data blocks allocated by the running transaction (ordered data).
    pub ordered: Extents,
    /// The running transaction changed something.
    pub dirty: bool,
    /// Groups whose bitmap failed its check: never allocated from (each logged once).
    quarantined: BTreeSet<u64>,
}

impl Space {
    pub fn new(sb: &Superblock) -> Space {
        Space {
            total_blocks: sb.total_blocks.get(),
            free_blocks: sb.free_blocks.get(),
            tree: sb.space_tree.get(),
            cursor: sb.alloc_cursor.get(),
            meta_cursor: 2,
            reserved: 0,
            allocated: Extents::default(),
            freed: Extents::default(),
            frozen: Extents::default(),
            frozen_by_txn: VecDeque::new(),
            new_groups: BTreeSet::new(),
            pages: BTreeSet::new(),
            ordered: Extents::default(),
            dirty: false,
            quarantined: BTreeSet::new(),
        }
    }

    /// Copies the allocator's fields into a superblock.
    pub fn fill(&self, sb: &mut Superblock) {
        sb.total_blocks = self.total_blocks.into();
        sb.free_blocks = self.free_blocks.into();
        sb.space_tree = self.tree.into();
        sb.alloc_cursor = self.cursor.into();
    }

    /// Blocks an operation may still reserve.
    fn available(&self) -> u64 {
        self.free_blocks
            .saturating_sub(self.frozen.total())
            .saturating_sub(self.reserved)
    }

    /// Frozen blocks (freed, waiting for durability).
    pub fn frozen_blocks(&self) -> u64 {
        self.frozen.total()
    }
}

fn bit_of(block: u64) -> (u64, usize, u8) {
    let g = block / GROUP_BLOCKS;
    let i = block % GROUP_BLOCKS;
    (g, (i / 8) as usize, 1 << (i % 8))
}

/// Blocks from the allocator while a commit applies the space map (the `space` lock is held).
pub(super) struct CutBlocks<'a> {
    pub e: &'a Engine,
    pub sp: &'a mut Space,
    pub txn: u64,
}

impl Blocks for CutBlocks<'_> {
    fn txn(&self) -> u64 {
        self.txn
    }
    fn alloc(&mut self, goal: u64, want: u64, data: bool) -> Result<(u64, u64)> {
        self.e.alloc_in(self.sp, goal, want, data, &mut 0)
    }
    fn free(&mut self, start: u64, len: u64) -> Result<()> {
        self.e.free_in(self.sp, self.txn, start, len)
    }
    fn born(&self, block: u64) -> bool {
        self.sp.pages.contains(&block)
    }
}

impl Engine {
    /// The committed bitmap block of group `g` (`None`: a group added by a growth not yet
    /// committed, all free).
    fn bitmap_of(&self, tree: u64, g: u64) -> Result<Option<u64>> {
        match self.tree_lookup(tree, g)? {
            Some(b) => {
                self.expect_kind(b, BlockKind::Bitmap, None)?;
                Ok(Some(b))
            }
            None => Ok(None),
        }
    }

    /// Whether group `g`'s committed bitmap fails its checksum (or kind): such a group is
    /// neither allocated from nor written until fsck rebuilds it, since its bits cannot be
    /// trusted (a used block shown free would be handed out and overwritten).
    pub(super) fn bitmap_damaged(&self, tree: u64, g: u64) -> bool {
        matches!(self.bitmap_of(tree, g), Err(Error::Corrupt(_)))
    }

    /// Whether the committed bitmap marks `block` used.
    pub(super) fn bit_set(&self, tree: u64, block: u64) -> Result<bool> {
        let (g, byte, mask) = bit_of(block);
        match self.bitmap_of(tree, g)? {
            Some(bm) => Ok(self.img.bytes(block_off(bm) + byte as u64, 1)?[0] & mask != 0),
            None => Ok(false),
        }
    }

    /// Whether `block` is in use in the running state: its committed bit, with what the
    /// running transaction allocated and freed applied (what its commit will write).
    pub(super) fn in_use_now(&self, block: u64) -> Result<bool> {
        let sp = self.space.lock();
        if sp.allocated.covering(block).is_some() {
            return Ok(true);
        }
        if sp.freed.covering(block).is_some() {
            return Ok(false);
        }
        self.bit_set(sp.tree, block)
    }

    /// Group `g`'s bitmap failed its check (`why`): it is skipped from now on.
    fn quarantine(&self, sp: &mut Space, g: u64, why: &str) {
        if sp.quarantined.insert(g) {
            log::error!(
                "group {g}: {why}; nothing is allocated from its blocks until `mmapfs fsck --repair` rewrites its bitmap"
            );
        }
    }

    fn is_free(&self, sp: &mut Space, block: u64) -> Result<bool> {
        if block < 2
            || block >= sp.total_blocks
            || self.is_suspect(block)
            || sp.allocated.covering(block).is_some()
            || sp.frozen.covering(block).is_some()
        {
            return Ok(false);
        }
        let g = block / GROUP_BLOCKS;
        match self.bitmap_of(sp.tree, g) {
            Ok(None) if !sp.new_groups.contains(&g) => {
                return Err(self.corrupt(format!("group {g} has no bitmap")));
            }
            Err(Error::Corrupt(why)) => {
                self.quarantine(sp, g, &why);
                return Ok(false);
            }
            r => r?,
        };
        Ok(!self.bit_set(sp.tree, block)?)
    }

    /// First block in `[from, to)` that is free in its bitmap and neither allocated by the
    /// running transaction nor frozen.
    fn scan(&self, sp: &mut Space, from: u64, to: u64) -> Result<Option<u64>> {
        let mut b = from.max(2);
        while b < to {
            let g = b / GROUP_BLOCKS;
            let group_end = ((g + 1) * GROUP_BLOCKS).min(to);
            let candidate = match self.bitmap_of(sp.tree, g) {
                Err(Error::Corrupt(why)) => {
                    self.quarantine(sp, g, &why);
                    None
                }
                Err(e) => return Err(e),
                Ok(None) if sp.new_groups.contains(&g) => Some(b),
                Ok(None) => return Err(self.corrupt(format!("group {g} has no bitmap"))),
                Ok(Some(bm)) => {
                    let bytes = self.img.bytes(block_off(bm), PAYLOAD_SIZE as usize)?;
                    first_zero_bit(bytes, b % GROUP_BLOCKS, group_end - g * GROUP_BLOCKS)
                        .map(|i| g * GROUP_BLOCKS + i)
                }
            };
            let Some(c) = candidate else {
                b = group_end;
                continue;
            };
            let busy = [sp.allocated.covering(c), sp.frozen.covering(c)]
                .into_iter()
                .flatten()
                .max();
            match busy {
                Some(end) => b = end,
                None if self.is_suspect(c) => b = c + 1,
                None => return Ok(Some(c)),
            }
        }
        Ok(None)
    }

    /// Allocates up to `want` contiguous blocks (see [`Blocks::alloc`]), consuming `reserved`.
    pub(super) fn alloc_in(
        &self,
        sp: &mut Space,
        goal: u64,
        want: u64,
        data: bool,
        reserved: &mut u64,
    ) -> Result<(u64, u64)> {
        let want = want.clamp(1, GROUP_BLOCKS);
        let mut start = None;
        if data && goal >= 2 && goal < sp.total_blocks && self.is_free(sp, goal)? {
            start = Some(goal);
        }
        if start.is_none() {
            let total = sp.total_blocks;
            let from = if data { sp.cursor } else { sp.meta_cursor };
            let cursor = if from >= total { 2 } else { from };
            start = match self.scan(sp, cursor, total)? {
                Some(s) => Some(s),
                None => self.scan(sp, 2, cursor)?,
            };
        }
        let start = match start {
            Some(s) => s,
            None => {
                // Growth would add blocks to the last group: no help if it is quarantined (and
                // a damaged image should not balloon).
                let last = sp.total_blocks.saturating_sub(1) / GROUP_BLOCKS;
                if sp.quarantined.contains(&last) {
                    return Err(Error::NoSpace);
                }
                let first_new = sp.total_blocks;
                self.grow(sp, want)?;
                self.scan(sp, first_new, sp.total_blocks)?
                    .ok_or(Error::NoSpace)?
            }
        };
        // Extend while free, up to the next range the transaction holds and within the group.
        let group_end = (start / GROUP_BLOCKS + 1) * GROUP_BLOCKS;
        let mut limit = (start + want).min(sp.total_blocks).min(group_end);
        for next in [sp.allocated.next_start(start), sp.frozen.next_start(start)]
            .into_iter()
            .flatten()
        {
            limit = limit.min(next);
        }
        let mut len = 1;
        while start + len < limit
            && !self.bit_set(sp.tree, start + len)?
            && !self.is_suspect(start + len)
        {
            len += 1;
        }
        sp.allocated.insert(start, len);
        if data {
            sp.ordered.insert(start, len);
        } else {
            sp.pages.extend(start..start + len);
        }
        sp.free_blocks = sp.free_blocks.saturating_sub(len);
        if data {
            sp.cursor = start + len;
        } else {
            sp.meta_cursor = start + len;
        }
        sp.dirty = true;
        let take = (*reserved).min(len);
        *reserved -= take;
        sp.reserved -= take;
        Ok((start, len))
    }

    /// Frees `[start, start+len)` in transaction `txn` (see [`Blocks::free`]).
    pub(super) fn free_in(&self, sp: &mut Space, txn: u64, start: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = start
            .checked_add(len)
            .filter(|&e| start >= 2 && e <= sp.total_blocks)
            .ok_or_else(|| self.corrupt(format!("freed blocks {start}+{len} out of range")))?;
        if self.any_suspects.load(std::sync::atomic::Ordering::Acquire) {
            // Blocks another structure's damaged pointer leads to stay marked used until fsck:
            // reused, they would be reachable from both.
            let kept: Vec<u64> = (start..end).filter(|&b| self.is_suspect(b)).collect();
            if !kept.is_empty() {
                let mut from = start;
                for &b in kept.iter().chain(std::iter::once(&end)) {
                    if b > from {
                        self.free_in(sp, txn, from, b - from)?;
                    }
                    from = b + 1;
                }
                return Ok(());
            }
        }
        for b in start..end {
            let pending = sp.allocated.covering(b).is_some();
            // A damaged bitmap cannot say; the commit then leaves the block marked used.
            let committed_free = !pending
                && match self.bit_set(sp.tree, b) {
                    Ok(set) => !set,
                    Err(Error::Corrupt(_)) => false,
                    Err(e) => return Err(e),
                };
            if sp.frozen.covering(b).is_some() || sp.freed.covering(b).is_some() || committed_free {
                return Err(self.corrupt(format!("block {b} freed twice")));
            }
        }
        // Blocks the running transaction allocated were never committed: their bits stay clear.
        for b in start..end {
            if sp.allocated.remove(b, 1) == 0 {
                sp.freed.insert(b, 1);
            }
            sp.pages.remove(&b);
        }
        sp.ordered.remove(start, len);
        sp.frozen.insert(start, len);
        match sp.frozen_by_txn.back_mut() {
            Some((t, list)) if *t == txn => list.push((start, len)),
            _ => sp.frozen_by_txn.push_back((txn, vec![(start, len)])),
        }
        sp.free_blocks += len;
        sp.dirty = true;
        Ok(())
    }

    /// Grows the image so at least `want` more blocks are free. New groups' first blocks are
    /// set aside for their bitmaps, which the commit creates.
    fn grow(&self, sp: &mut Space, want: u64) -> Result<()> {
        let old = sp.total_blocks;
        let step = (old / 4).max(MIN_GROW_BLOCKS).max(want + LOW_WATER_BLOCKS);
        let new = old + step;
        if new >= MAX_BLOCKS {
            return Err(Error::NoSpace);
        }
        self.img.grow(new * BLOCK_SIZE).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EFBIG)) {
                Error::NoSpace
            } else {
                Error::Io(e)
            }
        })?;
        sp.total_blocks = new;
        sp.free_blocks += step;
        for g in old.div_ceil(GROUP_BLOCKS)..new.div_ceil(GROUP_BLOCKS) {
            let first = g * GROUP_BLOCKS;
            sp.allocated.insert(first, 1);
            sp.pages.insert(first);
            sp.new_groups.insert(g);
            sp.free_blocks -= 1;
        }
        sp.dirty = true;
        log::debug!("image grew from {old} to {new} blocks");
        Ok(())
    }

    /// Reserves `n` blocks for an operation of the running transaction, growing the image if
    /// needed; `ENOSPC` when the host cannot provide them. Operations that free space
    /// (`delete`) may use the last few blocks.
    pub(super) fn reserve(&self, n: u64, delete: bool) -> Result<()> {
        let mut sp = self.space.lock();
        let margin = if delete { 0 } else { DELETE_MARGIN_BLOCKS };
        let need = n + margin;
        if sp.available() < need + LOW_WATER_BLOCKS
            && let Err(e) = self.grow(&mut sp, need + LOW_WATER_BLOCKS)
            && sp.available() < need
        {
            return Err(e);
        }
        sp.reserved += n;
        Ok(())
    }

    /// Returns what an operation reserved and did not use.
    pub(super) fn unreserve(&self, n: u64) {
        let mut sp = self.space.lock();
        sp.reserved = sp.reserved.saturating_sub(n);
    }

    /// Repair: marks blocks that the state owns but its bitmaps call free as used.
    pub(super) fn mark_used(&self, start: u64, len: u64) {
        let mut sp = self.space.lock();
        sp.allocated.insert(start, len);
        sp.free_blocks = sp.free_blocks.saturating_sub(len);
        sp.dirty = true;
    }

    /// Whether the running state's bitmap of group `g` is damaged (see `bitmap_damaged`).
    pub(super) fn group_damaged(&self, g: u64) -> bool {
        let tree = self.space.lock().tree;
        self.bitmap_damaged(tree, g)
    }

    /// Repair: rewrites the damaged bitmap of group `g` in place so that exactly `used` (block
    /// ranges within the group) are marked, and reseals it. In place, not copied: a copy would
    /// have to be allocated and its old version freed through the very bitmaps being repaired.
    /// A crash in the middle leaves the block damaged again, for the next fsck.
    pub(super) fn rewrite_bitmap(&self, g: u64, used: &[(u64, u64)]) -> Result<()> {
        let tree = self.space.lock().tree;
        let bm = self
            .tree_lookup(tree, g)?
            .ok_or_else(|| self.corrupt(format!("group {g} has no bitmap")))?;
        self.check_block(bm, "bitmap")?;
        let mut payload = vec![0u8; PAYLOAD_SIZE as usize];
        for &(s, l) in used {
            for b in s..s + l {
                let (bg, byte, mask) = bit_of(b);
                if bg == g {
                    payload[byte] |= mask;
                }
            }
        }
        self.img.write(block_off(bm), &payload)?;
        let birth = self.trailer(bm)?.birth.get().min(self.txm.durable());
        self.rewrite_trailer(bm, birth, BlockKind::Bitmap)?;
        self.seal_block(bm)?;
        Ok(())
    }

    /// Repair: corrects the free-block count by `delta`.
    pub(super) fn adjust_free_blocks(&self, delta: i64) {
        let mut sp = self.space.lock();
        sp.free_blocks = (sp.free_blocks as i64 + delta).max(0) as u64;
        sp.dirty = true;
    }

    /// Transaction `durable` is durable: blocks freed by transactions before it are reusable.
    pub(super) fn release_frozen(&self, durable: u64) {
        let mut sp = self.space.lock();
        while let Some((t, _)) = sp.frozen_by_txn.front() {
            if t + 1 > durable {
                break;
            }
            if let Some((_, list)) = sp.frozen_by_txn.pop_front() {
                for (s, l) in list {
                    sp.frozen.remove(s, l);
                    sp.meta_cursor = sp.meta_cursor.min(s);
                }
            }
        }
    }

    /// At a commit's cut: copies every bitmap the transaction touched (and the space-tree path
    /// to it), then sets and clears its bits. Blocks this needs come from the same allocator and
    /// are applied in the same pass.
    pub(super) fn apply_space(&self, sp: &mut Space, txn: u64) -> Result<()> {
        let mut writable: BTreeSet<u64> = BTreeSet::new();
        // Each round makes the bitmaps of all touched groups writable; copies made in a round
        // may touch new groups (bounded: each group is copied once).
        for _round in 0..64 {
            self.leak_into_damaged_groups(sp);
            let groups: BTreeSet<u64> = sp
                .allocated
                .iter()
                .chain(sp.freed.iter())
                .flat_map(|(s, l)| s / GROUP_BLOCKS..=(s + l - 1) / GROUP_BLOCKS)
                .filter(|g| !writable.contains(g))
                .collect();
            if groups.is_empty() {
                return self.apply_bits(sp);
            }
            for g in groups {
                let mut root = sp.tree;
                let (node, idx) = {
                    let mut b = CutBlocks { e: self, sp, txn };
                    self.tree_slot_mut(&mut b, &mut root, g)?
                };
                sp.tree = root;
                let slot = block_off(node) + idx * 8;
                let cur = self.img.load_u64(slot)?;
                let bitmap = if cur == 0 {
                    // A group added by growth: its first block was set aside for the bitmap.
                    if !sp.new_groups.remove(&g) {
                        return Err(self.corrupt(format!("group {g} has no bitmap")));
                    }
                    let first = g * GROUP_BLOCKS;
                    self.init_block(first, txn, BlockKind::Bitmap, 0)?;
                    first
                } else {
                    self.check_block(cur, "bitmap")?;
                    let mut b = CutBlocks { e: self, sp, txn };
                    self.cow(&mut b, cur, BlockKind::Bitmap)?
                };
                self.img.store_u64(slot, bitmap)?;
                writable.insert(g);
            }
        }
        Err(self.corrupt("space map copy does not converge"))
    }

    /// Blocks freed into a group whose bitmap is damaged stay marked used (leaked until fsck):
    /// writing bits into a bitmap that cannot be trusted would spread the damage. (The copies
    /// a commit makes free blocks too, so this runs in every round.)
    fn leak_into_damaged_groups(&self, sp: &mut Space) {
        let damaged: Vec<(u64, u64)> = sp
            .freed
            .iter()
            .filter(|(s, l)| {
                (s / GROUP_BLOCKS..=(s + l - 1) / GROUP_BLOCKS)
                    .any(|g| self.bitmap_damaged(sp.tree, g))
            })
            .collect();
        for (s, l) in damaged {
            log::error!("blocks {s}+{l} stay allocated: the bitmap of their group is damaged");
            sp.freed.remove(s, l);
        }
    }

    fn apply_bits(&self, sp: &mut Space) -> Result<()> {
        let set: Vec<(u64, u64)> = sp.allocated.iter().collect();
        let clear: Vec<(u64, u64)> = sp.freed.iter().collect();
        for (ranges, used) in [(set, true), (clear, false)] {
            for (s, l) in ranges {
                for b in s..s + l {
                    let (g, byte, mask) = bit_of(b);
                    let bm = self
                        .bitmap_of(sp.tree, g)?
                        .ok_or_else(|| self.corrupt(format!("group {g} has no bitmap")))?;
                    let off = block_off(bm) + byte as u64;
                    let old = self.img.bytes(off, 1)?[0];
                    let new = if used { old | mask } else { old & !mask };
                    self.img.write(off, &[new])?;
                }
            }
        }
        sp.allocated = Extents::default();
        sp.freed = Extents::default();
        Ok(())
    }
}

/// First clear bit at index `>= from` and `< to` in a bitmap payload.
fn first_zero_bit(bytes: &[u8], from: u64, to: u64) -> Option<u64> {
    let mut i = from;
    while i < to {
        let word_idx = (i / 64) as usize;
        let word = match bytes.get(word_idx * 8..word_idx * 8 + 8) {
            Some(w) => u64::from_le_bytes(w.try_into().ok()?),
            None => return None,
        };
        let masked = word | ((1u64 << (i % 64)) - 1);
        if masked == u64::MAX {
            i = (i - i % 64) + 64;
            continue;
        }
        let found = (i - i % 64) + u64::from((!masked).trailing_zeros());
        return (found < to).then_some(found);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_split_and_count() {
        let mut e = Extents::default();
        e.insert(10, 5);
        e.insert(15, 5);
        e.insert(30, 2);
        assert_eq!(e.iter().collect::<Vec<_>>(), vec![(10, 10), (30, 2)]);
        assert_eq!(e.total(), 12);
        assert_eq!(e.covering(19), Some(20));
        assert_eq!(e.covering(20), None);
        assert_eq!(e.remove(12, 3), 3);
        assert_eq!(
            e.iter().collect::<Vec<_>>(),
            vec![(10, 2), (15, 5), (30, 2)]
        );
        assert_eq!(e.remove(0, 100), 9);
        assert!(e.is_empty());
        assert_eq!(e.total(), 0);
        e.insert(5, 1);
        e.insert(3, 1);
        e.insert(4, 1);
        assert_eq!(e.iter().collect::<Vec<_>>(), vec![(3, 3)]);
    }

    #[test]
    fn first_zero_bit_respects_bounds() {
        let mut bm = vec![0xffu8; PAYLOAD_SIZE as usize];
        assert_eq!(first_zero_bit(&bm, 0, GROUP_BLOCKS), None);
        bm[100] = 0b1110_1111;
        assert_eq!(first_zero_bit(&bm, 0, GROUP_BLOCKS), Some(804));
        assert_eq!(first_zero_bit(&bm, 805, GROUP_BLOCKS), None);
        assert_eq!(first_zero_bit(&bm, 0, 804), None);
    }
}
