//! Block trees: a radix tree of metadata blocks (kind `Node`) holding 510 little-endian block
//! numbers each, mapping a block index of a file, directory, the inode table or the space map
//! to an image block (0 = hole). The root block and height are packed into one u64
//! (`format::pack_tree`). A tree of height `h` addresses `510^h` blocks; a node at level 0
//! points at the tree's content blocks.
//!
//! Changes copy the path from the root down (`tree_slot_mut`), so a committed tree is never
//! modified. Slots are read with atomic loads and published with atomic stores after the block
//! they point at is initialised, so the inode table can be walked without a lock.

use super::pager::Blocks;
use super::{Engine, block_off};
use crate::error::{Error, Result};
use crate::format::*;

/// A run of tree blocks: mapped to `len` contiguous image blocks starting at `start`, or a hole.
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

/// Blocks addressed by a tree of `height` (saturating).
pub(super) fn capacity(height: u32) -> u64 {
    TREE_FANOUT.saturating_pow(height)
}

fn slot_index(fblock: u64, level: u32) -> u64 {
    (fblock / capacity(level)) % TREE_FANOUT
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

    fn store_slot(&self, node: u64, idx: u64, v: u64) -> Result<()> {
        Ok(self.img.store_u64(slot_off(node, idx), v)?)
    }

    /// A node to read at `level`, validated.
    fn node(&self, block: u64, level: u32) -> Result<u64> {
        self.expect_kind(block, BlockKind::Node, Some(level))?;
        Ok(block)
    }

    fn checked_root(&self, packed: u64) -> Result<(u64, u32)> {
        let (root, height) = unpack_tree(packed);
        if height > TREE_MAX_HEIGHT || (height > 0) != (root != 0) {
            return Err(self.corrupt(format!("tree root {root} height {height}")));
        }
        if root != 0 {
            self.check_block(root, "tree root")?;
            self.node(root, height - 1)?;
        }
        Ok((root, height))
    }

    /// Image block of tree block `fblock`, if mapped.
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
            if level > 0 {
                self.node(node, level - 1)?;
            }
        }
        Ok(Some(node))
    }

    /// The run starting at `fblock`, at most `max` blocks, never crossing a level-0 node.
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
                let left = span - fblock % span;
                return Ok(Run {
                    start: None,
                    len: left.min(max),
                });
            }
            node = self.node(child, level - 1)?;
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

    /// Makes the path to `fblock` writable in `b`'s transaction, growing the tree and creating
    /// missing nodes; returns the level-0 node and the slot index of `fblock` in it.
    pub(super) fn tree_slot_mut(
        &self,
        b: &mut dyn Blocks,
        packed: &mut u64,
        fblock: u64,
    ) -> Result<(u64, u64)> {
        let mut counter = 0;
        self.tree_slot_mut_counted(b, packed, fblock, &mut counter)
    }

    fn tree_slot_mut_counted(
        &self,
        b: &mut dyn Blocks,
        packed: &mut u64,
        fblock: u64,
        counter: &mut u64,
    ) -> Result<(u64, u64)> {
        let (mut root, mut height) = self.checked_root(*packed)?;
        if fblock >= capacity(TREE_MAX_HEIGHT) {
            return Err(Error::TooBig);
        }
        while height == 0 || fblock >= capacity(height) {
            let node = self.new_block(b, root + 1, BlockKind::Node, height)?;
            *counter += 1;
            if height > 0 {
                self.store_slot(node, 0, root)?;
            }
            root = node;
            height += 1;
            *packed = pack_tree(root, height);
        }
        let copy = self.cow(b, root, BlockKind::Node)?;
        if copy != root {
            root = copy;
            *packed = pack_tree(root, height);
        }
        let mut node = root;
        for level in (1..height).rev() {
            let idx = slot_index(fblock, level);
            let child = self.load_slot(node, idx)?;
            let writable = if child == 0 {
                *counter += 1;
                self.new_block(b, node + 1, BlockKind::Node, level - 1)?
            } else {
                self.node(child, level - 1)?;
                self.cow(b, child, BlockKind::Node)?
            };
            if writable != child {
                self.store_slot(node, idx, writable)?;
            }
            node = writable;
        }
        Ok((node, slot_index(fblock, 0)))
    }

    /// Maps `fblock` of a file (allocating data blocks for a hole) and as many following blocks,
    /// up to `want`, as form one contiguous run. Returns the run and whether it is new.
    pub(super) fn tree_ensure_data(
        &self,
        b: &mut dyn Blocks,
        packed: &mut u64,
        fblock: u64,
        want: u64,
        counter: &mut u64,
    ) -> Result<(Mapped, bool)> {
        let (node, first) = self.tree_slot_mut_counted(b, packed, fblock, counter)?;
        let limit = (TREE_FANOUT - first).min(want.max(1));
        let existing = self.load_slot(node, first)?;
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
        let mut hole = 1;
        while hole < limit && self.load_slot(node, first + hole)? == 0 {
            hole += 1;
        }
        // Prefer the block after the file's previous one: files stay contiguous.
        let goal = match first {
            0 => node + 1,
            _ => match self.load_slot(node, first - 1)? {
                0 => node + 1,
                prev => prev + 1,
            },
        };
        let (start, len) = b.alloc(goal, hole, true)?;
        for i in 0..len {
            self.store_slot(node, first + i, start + i)?;
        }
        *counter += len;
        Ok((Mapped { start, len }, true))
    }

    /// The metadata block at `fblock` (of `kind`), writable in `b`'s transaction: a copy if it
    /// was older, a new empty block if it was a hole (then `true`).
    pub(super) fn tree_meta_mut(
        &self,
        b: &mut dyn Blocks,
        packed: &mut u64,
        fblock: u64,
        kind: BlockKind,
        counter: &mut u64,
    ) -> Result<(u64, bool)> {
        let (node, idx) = self.tree_slot_mut_counted(b, packed, fblock, counter)?;
        let cur = self.load_slot(node, idx)?;
        if cur == 0 {
            let block = self.new_block(b, node + 1, kind, 0)?;
            self.store_slot(node, idx, block)?;
            *counter += 1;
            return Ok((block, true));
        }
        let copy = self.cow(b, cur, kind)?;
        if copy != cur {
            self.store_slot(node, idx, copy)?;
        }
        Ok((copy, false))
    }

    /// Points mapped tree block `fblock` at `block` instead (a data block copied elsewhere).
    pub(super) fn tree_remap(
        &self,
        b: &mut dyn Blocks,
        packed: &mut u64,
        fblock: u64,
        block: u64,
    ) -> Result<()> {
        let (node, idx) = self.tree_slot_mut(b, packed, fblock)?;
        self.store_slot(node, idx, block)
    }

    /// Frees the blocks mapped in `[from, to)` and any node left empty.
    pub(super) fn tree_free_range(
        &self,
        b: &mut dyn Blocks,
        packed: &mut u64,
        from: u64,
        to: u64,
        counter: &mut u64,
    ) -> Result<()> {
        let (root, height) = self.checked_root(*packed)?;
        let to = to.min(capacity(height));
        if height == 0 || from >= to {
            return Ok(());
        }
        if from == 0 && to == capacity(height) {
            self.free_subtree(b, root, height - 1, counter)?;
            *packed = 0;
            return Ok(());
        }
        let copy = self.cow(b, root, BlockKind::Node)?;
        *packed = pack_tree(copy, height);
        if self.free_node_range(b, copy, height - 1, 0, from, to, counter)? {
            b.free(copy, 1)?;
            *counter = counter.saturating_sub(1);
            *packed = 0;
        }
        Ok(())
    }

    /// Frees a whole subtree: its content blocks and nodes.
    fn free_subtree(
        &self,
        b: &mut dyn Blocks,
        node: u64,
        level: u32,
        counter: &mut u64,
    ) -> Result<()> {
        self.node(node, level)?;
        let mut pending: Option<(u64, u64)> = None;
        for idx in 0..TREE_FANOUT {
            let child = self.load_slot(node, idx)?;
            if child == 0 {
                continue;
            }
            if level == 0 {
                *counter = counter.saturating_sub(1);
                pending = coalesce_free(b, pending, child)?;
            } else {
                self.free_subtree(b, child, level - 1, counter)?;
            }
        }
        if let Some((s, l)) = pending {
            b.free(s, l)?;
        }
        b.free(node, 1)?;
        *counter = counter.saturating_sub(1);
        Ok(())
    }

    /// Frees `[from, to)` below the writable `node` (at `level`, covering tree blocks from
    /// `base`). Returns whether the node is now empty.
    #[allow(clippy::too_many_arguments)]
    fn free_node_range(
        &self,
        b: &mut dyn Blocks,
        node: u64,
        level: u32,
        base: u64,
        from: u64,
        to: u64,
        counter: &mut u64,
    ) -> Result<bool> {
        let span = capacity(level);
        let first = from.saturating_sub(base) / span;
        let last = (to - base).div_ceil(span).min(TREE_FANOUT);
        let mut pending: Option<(u64, u64)> = None;
        for idx in first..last {
            let child = self.load_slot(node, idx)?;
            if child == 0 {
                continue;
            }
            let child_base = base + idx * span;
            let whole = from <= child_base && child_base + span <= to;
            if level == 0 {
                self.store_slot(node, idx, 0)?;
                *counter = counter.saturating_sub(1);
                pending = coalesce_free(b, pending, child)?;
            } else if whole {
                self.free_subtree(b, child, level - 1, counter)?;
                self.store_slot(node, idx, 0)?;
            } else {
                self.node(child, level - 1)?;
                let copy = self.cow(b, child, BlockKind::Node)?;
                if copy != child {
                    self.store_slot(node, idx, copy)?;
                }
                if self.free_node_range(b, copy, level - 1, child_base, from, to, counter)? {
                    self.store_slot(node, idx, 0)?;
                    b.free(copy, 1)?;
                    *counter = counter.saturating_sub(1);
                }
            }
        }
        if let Some((s, l)) = pending {
            b.free(s, l)?;
        }
        for idx in 0..TREE_FANOUT {
            if self.img.load_u64(slot_off(node, idx))? != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// First tree block `>= from` that is mapped (`want_data`) or a hole; `None` if there is no
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
            // Bounded by the tree's capacity: each step advances by at least one block.
            while fb < capacity(height) {
                let run = self.tree_lookup_run(packed, fb, TREE_FANOUT)?;
                if run.start.is_none() {
                    return Ok(Some(fb));
                }
                fb += run.len;
            }
            Ok(Some(fb))
        }
    }

    fn next_mapped(&self, node: u64, level: u32, base: u64, from: u64) -> Result<Option<u64>> {
        let span = capacity(level);
        let first = from.saturating_sub(base) / span;
        for idx in first..TREE_FANOUT {
            let child = self.load_slot(node, idx)?;
            if child == 0 {
                continue;
            }
            let child_base = base + idx * span;
            if level == 0 {
                return Ok(Some(child_base));
            }
            self.node(child, level - 1)?;
            if let Some(fb) =
                self.next_mapped(child, level - 1, child_base, from.max(child_base))?
            {
                return Ok(Some(fb));
            }
        }
        Ok(None)
    }

    /// Calls `f(block, is_content, tree_block)` for every block a tree owns: nodes
    /// (`is_content == false`, with the first tree block they cover) and content blocks.
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
                self.node(child, level - 1)?;
                self.visit_node(child, level - 1, base + idx * span, f)?;
            }
        }
        Ok(())
    }
}

/// Adds `block` to a run of blocks to free, freeing the run when `block` does not extend it.
fn coalesce_free(
    b: &mut dyn Blocks,
    pending: Option<(u64, u64)>,
    block: u64,
) -> Result<Option<(u64, u64)>> {
    Ok(match pending {
        Some((s, l)) if s + l == block => Some((s, l + 1)),
        Some((s, l)) => {
            b.free(s, l)?;
            Some((block, 1))
        }
        None => Some((block, 1)),
    })
}
