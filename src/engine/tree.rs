//! Block trees: a radix tree of 4 KiB nodes holding 512 little-endian block numbers each, mapping
//! a file's block index to an image block (0 = hole). The root block and height are packed into
//! one u64 (see `format::pack_tree`). A tree of height `h` addresses `512^h` blocks.
//!
//! Slots are read with atomic loads and published with atomic stores after the block they point
//! at is initialised, so the inode table (extended under `meta`) can be walked without a lock.
//! File trees are modified under the file's inode write lock.

use super::{Engine, block_off};
use crate::error::{Error, Result};
use crate::format::*;

const FANOUT_BITS: u32 = 9;

/// A run of file blocks: mapped to `len` contiguous image blocks starting at `start`, or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: Option<u64>,
    pub len: u64,
}

/// A run of mapped blocks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mapped {
    pub start: u64,
    pub len: u64,
}

fn capacity(height: u32) -> u64 {
    if height >= 6 {
        u64::MAX
    } else {
        1u64 << (FANOUT_BITS * height)
    }
}

fn slot_index(fblock: u64, level: u32) -> u64 {
    (fblock >> (FANOUT_BITS * level)) & (TREE_FANOUT - 1)
}

fn slot_off(node: u64, idx: u64) -> u64 {
    block_off(node) + idx * 8
}

impl Engine {
    fn load_slot(&self, node: u64, idx: u64) -> Result<u64> {
        let v = self.img.load_u64(slot_off(node, idx))?;
        if v != 0 {
            self.check_block(v, "tree slot")?;
        }
        Ok(v)
    }

    fn checked_root(&self, packed: u64) -> Result<(u64, u32)> {
        let (root, height) = unpack_tree(packed);
        if height > TREE_MAX_HEIGHT || (height > 0) != (root != 0) {
            return Err(Error::corrupt(format!("tree root {root} height {height}")));
        }
        if root != 0 {
            self.check_block(root, "tree root")?;
        }
        Ok((root, height))
    }

    /// Image block of file block `fblock`, if mapped.
    pub(super) fn tree_lookup(&self, packed: u64, fblock: u64) -> Result<Option<u64>> {
        let (mut node, height) = self.checked_root(packed)?;
        if height == 0 || fblock >= capacity(height) {
            return Ok(None);
        }
        for level in (0..height).rev() {
            node = self.load_slot(node, slot_index(fblock, level))?;
            if node == 0 {
                return Ok(None);
            }
        }
        Ok(Some(node))
    }

    /// The run starting at `fblock`, at most `max` blocks, never crossing a leaf node.
    pub fn tree_lookup_run(&self, packed: u64, fblock: u64, max: u64) -> Result<Run> {
        let max = max.max(1);
        let (mut node, height) = self.checked_root(packed)?;
        if height == 0 || fblock >= capacity(height) {
            return Ok(Run {
                start: None,
                len: max,
            });
        }
        for level in (1..height).rev() {
            let child = self.load_slot(node, slot_index(fblock, level))?;
            if child == 0 {
                // The whole subtree below is a hole.
                let span = capacity(level);
                let left = span - (fblock & (span - 1));
                return Ok(Run {
                    start: None,
                    len: left.min(max),
                });
            }
            node = child;
        }
        let first = slot_index(fblock, 0);
        let limit = (TREE_FANOUT - first).min(max);
        let start = self.load_slot(node, first)?;
        let mut len = 1;
        while len < limit {
            let next = self.load_slot(node, first + len)?;
            let continues = if start == 0 {
                next == 0
            } else {
                next == start + len
            };
            if !continues {
                break;
            }
            len += 1;
        }
        Ok(Run {
            start: (start != 0).then_some(start),
            len,
        })
    }

    /// Maps `fblock` (allocating if needed) and as many following blocks (up to `want`) as fit
    /// one contiguous run. Returns the run and whether it was freshly allocated.
    pub(super) fn tree_ensure(
        &self,
        packed: &mut u64,
        fblock: u64,
        want: u64,
        counter: &mut u64,
    ) -> Result<(Mapped, bool)> {
        let mut alloc = |goal: u64, n: u64| self.alloc_run(goal, n);
        self.tree_ensure_with(packed, fblock, want, counter, &mut alloc)
    }

    /// As `tree_ensure`, for callers already holding `meta` (the inode table).
    pub(super) fn tree_ensure_locked(
        &self,
        sb: &mut Superblock,
        packed: &mut u64,
        fblock: u64,
        want: u64,
        counter: &mut u64,
    ) -> Result<(Mapped, bool)> {
        let mut alloc = |goal: u64, n: u64| self.alloc_run_locked(sb, goal, n);
        self.tree_ensure_with(packed, fblock, want, counter, &mut alloc)
    }

    fn new_node(
        &self,
        alloc: &mut dyn FnMut(u64, u64) -> Result<(u64, u64)>,
        goal: u64,
    ) -> Result<u64> {
        let (b, _) = alloc(goal, 1)?;
        self.img.zero(block_off(b), BLOCK_SIZE as usize)?;
        self.mark_meta(b);
        Ok(b)
    }

    fn tree_ensure_with(
        &self,
        packed: &mut u64,
        fblock: u64,
        want: u64,
        counter: &mut u64,
        alloc: &mut dyn FnMut(u64, u64) -> Result<(u64, u64)>,
    ) -> Result<(Mapped, bool)> {
        let (mut root, mut height) = self.checked_root(*packed)?;
        if fblock >= capacity(TREE_MAX_HEIGHT) {
            return Err(Error::TooBig);
        }
        // Grow the tree until it covers fblock.
        while height == 0 || fblock >= capacity(height) {
            let node = self.new_node(alloc, root + 1)?;
            *counter += 1;
            if height > 0 {
                self.img.store_u64(slot_off(node, 0), root)?;
            }
            root = node;
            height += 1;
            *packed = pack_tree(root, height);
        }
        let mut node = root;
        for level in (1..height).rev() {
            let idx = slot_index(fblock, level);
            let mut child = self.load_slot(node, idx)?;
            if child == 0 {
                child = self.new_node(alloc, node + 1)?;
                *counter += 1;
                self.img.store_u64(slot_off(node, idx), child)?;
            }
            node = child;
        }
        let first = slot_index(fblock, 0);
        let existing = self.load_slot(node, first)?;
        let limit = (TREE_FANOUT - first).min(want.max(1));
        if existing != 0 {
            let mut len = 1;
            while len < limit && self.load_slot(node, first + len)? == existing + len {
                len += 1;
            }
            return Ok((
                Mapped {
                    start: existing,
                    len,
                },
                false,
            ));
        }
        // Count the hole from `first` (bounded by `limit`) and allocate one run for it,
        // preferably right after the previous block of the file.
        let mut hole = 1;
        while hole < limit && self.load_slot(node, first + hole)? == 0 {
            hole += 1;
        }
        let goal = if first > 0 {
            match self.load_slot(node, first - 1)? {
                0 => node + 1,
                prev => prev + 1,
            }
        } else {
            node + 1
        };
        let (start, len) = alloc(goal, hole)?;
        for i in 0..len {
            self.img.store_u64(slot_off(node, first + i), start + i)?;
        }
        self.mark_meta(node);
        *counter += len;
        Ok((Mapped { start, len }, true))
    }

    /// Frees the blocks mapped in `[from, to)` and any node left empty.
    pub(super) fn tree_free_range(
        &self,
        packed: &mut u64,
        from: u64,
        to: u64,
        counter: &mut u64,
    ) -> Result<()> {
        let (root, height) = self.checked_root(*packed)?;
        if height == 0 || from >= to {
            return Ok(());
        }
        let to = to.min(capacity(height));
        if from >= to {
            return Ok(());
        }
        let empty = self.free_node_range(root, height - 1, 0, from, to, counter)?;
        if empty {
            self.free_run(root, 1)?;
            *counter = counter.saturating_sub(1);
            *packed = 0;
        }
        Ok(())
    }

    /// Frees `[from, to)` below `node` (at `level`, covering file blocks from `base`).
    /// Returns whether the node is now empty.
    fn free_node_range(
        &self,
        node: u64,
        level: u32,
        base: u64,
        from: u64,
        to: u64,
        counter: &mut u64,
    ) -> Result<bool> {
        let span = capacity(level);
        let first = if from > base { (from - base) / span } else { 0 };
        let last = ((to - base).div_ceil(span)).min(TREE_FANOUT);
        let mut pending: Option<(u64, u64)> = None;
        for idx in first..last {
            let child = self.load_slot(node, idx)?;
            if child == 0 {
                continue;
            }
            let child_base = base + idx * span;
            let whole = from <= child_base && child_base + span <= to;
            if level == 0 {
                self.img.store_u64(slot_off(node, idx), 0)?;
                *counter = counter.saturating_sub(1);
                pending = match pending {
                    Some((s, l)) if s + l == child => Some((s, l + 1)),
                    Some((s, l)) => {
                        self.free_run(s, l)?;
                        Some((child, 1))
                    }
                    None => Some((child, 1)),
                };
            } else {
                let child_empty = if whole {
                    self.free_node_range(
                        child,
                        level - 1,
                        child_base,
                        child_base,
                        child_base + span,
                        counter,
                    )?
                } else {
                    self.free_node_range(child, level - 1, child_base, from, to, counter)?
                };
                if child_empty {
                    self.img.store_u64(slot_off(node, idx), 0)?;
                    self.free_run(child, 1)?;
                    *counter = counter.saturating_sub(1);
                }
            }
        }
        if let Some((s, l)) = pending {
            self.free_run(s, l)?;
        }
        self.mark_meta(node);
        for idx in 0..TREE_FANOUT {
            if self.img.load_u64(slot_off(node, idx))? != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// First file block `>= from` that is mapped (`want_data`) or a hole; `None` if there is no
    /// mapped block at or after `from` (holes extend to infinity).
    pub(super) fn tree_next(&self, packed: u64, from: u64, want_data: bool) -> Result<Option<u64>> {
        let (root, height) = self.checked_root(packed)?;
        if height == 0 || from >= capacity(height) {
            return Ok(if want_data { None } else { Some(from) });
        }
        if want_data {
            self.next_mapped(root, height - 1, 0, from)
        } else {
            let mut fb = from;
            loop {
                let run = self.tree_lookup_run(packed, fb, TREE_FANOUT)?;
                if run.start.is_none() {
                    return Ok(Some(fb));
                }
                fb += run.len;
            }
        }
    }

    fn next_mapped(&self, node: u64, level: u32, base: u64, from: u64) -> Result<Option<u64>> {
        let span = capacity(level);
        let first = if from > base { (from - base) / span } else { 0 };
        for idx in first..TREE_FANOUT {
            let child = self.load_slot(node, idx)?;
            if child == 0 {
                continue;
            }
            let child_base = base + idx * span;
            if level == 0 {
                return Ok(Some(child_base));
            }
            if let Some(fb) =
                self.next_mapped(child, level - 1, child_base, from.max(child_base))?
            {
                return Ok(Some(fb));
            }
        }
        Ok(None)
    }

    /// Calls `f(kind, block)` for every block a tree owns: nodes (`false`) and data (`true`).
    pub(super) fn tree_visit(
        &self,
        packed: u64,
        f: &mut dyn FnMut(u64, bool, u64) -> Result<()>,
    ) -> Result<()> {
        let (root, height) = self.checked_root(packed)?;
        if height == 0 {
            return Ok(());
        }
        self.visit_node(root, height - 1, 0, f)
    }

    fn visit_node(
        &self,
        node: u64,
        level: u32,
        base: u64,
        f: &mut dyn FnMut(u64, bool, u64) -> Result<()>,
    ) -> Result<()> {
        f(node, false, base)?;
        let span = capacity(level);
        for idx in 0..TREE_FANOUT {
            let child = self.load_slot(node, idx)?;
            if child == 0 {
                continue;
            }
            if level == 0 {
                f(child, true, base + idx)?;
            } else {
                self.visit_node(child, level - 1, base + idx * span, f)?;
            }
        }
        Ok(())
    }
}
