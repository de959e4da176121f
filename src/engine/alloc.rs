//! Free-space allocator: one bitmap block per group of `GROUP_BLOCKS` blocks (bit set = in use).
//! All bitmap access happens under the `meta` lock, which also guards the superblock counters.
//! When no free block is left the image grows (host space reserved first, see `Image::grow`).

use super::{Engine, block_off};
use crate::error::{Error, Result};
use crate::format::*;
use crate::image::Image;

/// Smallest growth step of the image, in blocks (16 MiB).
const MIN_GROW_BLOCKS: u64 = 4096;

fn bit_location(block: u64) -> (u64, u8) {
    let group = block / GROUP_BLOCKS;
    let bit = block % GROUP_BLOCKS;
    (block_off(bitmap_block(group)) + bit / 8, 1 << (bit % 8))
}

pub(super) fn get_bit(img: &Image, block: u64) -> Result<bool> {
    let (off, mask) = bit_location(block);
    Ok(img.bytes(off, 1)?[0] & mask != 0)
}

pub(super) fn set_bit(img: &Image, block: u64, used: bool) -> Result<()> {
    let (off, mask) = bit_location(block);
    let old = img.bytes(off, 1)?[0];
    let new = if used { old | mask } else { old & !mask };
    img.write(off, &[new])?;
    Ok(())
}

impl Engine {
    /// Allocates up to `want` contiguous blocks, preferably starting at `goal`.
    /// Returns `(start, len)` with `1 <= len <= want`.
    pub(super) fn alloc_run(&self, goal: u64, want: u64) -> Result<(u64, u64)> {
        let mut sb = self.meta.lock();
        self.alloc_run_locked(&mut sb, goal, want)
    }

    pub(super) fn alloc_run_locked(
        &self,
        sb: &mut Superblock,
        goal: u64,
        want: u64,
    ) -> Result<(u64, u64)> {
        let want = want.clamp(1, GROUP_BLOCKS);
        let total = self.total_blocks();
        let start = if goal > 0 && goal < total && !get_bit(&self.img, goal)? {
            Some(goal)
        } else {
            self.find_free(sb.alloc_cursor.get(), total)?
        };
        let start = match start {
            Some(s) => s,
            None => self.grow(sb, want)?,
        };
        let total = self.total_blocks();
        let mut len = 1;
        // Extend the run while the next block is free and in the same group.
        while len < want
            && start + len < total
            && (start + len) % GROUP_BLOCKS != 0
            && !get_bit(&self.img, start + len)?
        {
            len += 1;
        }
        for b in start..start + len {
            set_bit(&self.img, b, true)?;
        }
        self.mark_bitmap_dirty(start, len);
        sb.free_blocks = sb.free_blocks.get().saturating_sub(len).into();
        sb.alloc_cursor = (start + len).into();
        self.write_sb(sb)?;
        Ok((start, len))
    }

    fn mark_bitmap_dirty(&self, start: u64, len: u64) {
        let first = start / GROUP_BLOCKS;
        let last = (start + len - 1) / GROUP_BLOCKS;
        for g in first..=last {
            self.mark_meta(bitmap_block(g));
        }
    }

    /// First free block at or after `cursor`, wrapping around once.
    fn find_free(&self, cursor: u64, total: u64) -> Result<Option<u64>> {
        let cursor = if cursor >= total { 0 } else { cursor };
        if let Some(b) = self.scan(cursor, total)? {
            return Ok(Some(b));
        }
        self.scan(0, cursor)
    }

    fn scan(&self, from: u64, to: u64) -> Result<Option<u64>> {
        let mut b = from;
        while b < to {
            let group = b / GROUP_BLOCKS;
            let group_end = ((group + 1) * GROUP_BLOCKS).min(to);
            let bm = self
                .img
                .bytes(block_off(bitmap_block(group)), BLOCK_SIZE as usize)?;
            // Word at a time: skip fully used 64-block words.
            while b < group_end {
                let bit = b % GROUP_BLOCKS;
                let word_idx = (bit / 64) as usize;
                let word = u64::from_le_bytes(
                    bm[word_idx * 8..word_idx * 8 + 8]
                        .try_into()
                        .map_err(|_| Error::corrupt("bitmap word"))?,
                );
                let masked = word | ((1u64 << (bit % 64)) - 1);
                if masked == u64::MAX {
                    b = (b - bit % 64) + 64;
                    continue;
                }
                let free = (b - bit % 64) + u64::from((!masked).trailing_zeros());
                if free < group_end {
                    return Ok(Some(free));
                }
                break;
            }
            b = group_end;
        }
        Ok(None)
    }

    /// Grows the image so at least `want` more blocks are free; returns the first new block.
    fn grow(&self, sb: &mut Superblock, want: u64) -> Result<u64> {
        let old_total = self.total_blocks();
        let step = (old_total / 4).max(MIN_GROW_BLOCKS).max(want + 1);
        let new_total = old_total + step;
        self.img.grow(new_total * BLOCK_SIZE).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EFBIG) {
                Error::NoSpace
            } else {
                Error::Io(e)
            }
        })?;
        let mut added_free = new_total - old_total;
        let first_new_group = old_total.div_ceil(GROUP_BLOCKS);
        let groups = new_total.div_ceil(GROUP_BLOCKS);
        for g in first_new_group..groups {
            // A new group's bitmap is its own first block (zero-filled by the growth).
            set_bit(&self.img, bitmap_block(g), true)?;
            self.mark_meta(bitmap_block(g));
            added_free -= 1;
        }
        sb.total_blocks = new_total.into();
        sb.free_blocks = (sb.free_blocks.get() + added_free).into();
        self.write_sb(sb)?;
        log::debug!("image grew from {old_total} to {new_total} blocks");
        match self.scan(old_total, new_total)? {
            Some(b) => Ok(b),
            None => Err(Error::NoSpace),
        }
    }

    /// Returns blocks to the free pool.
    pub(super) fn free_run(&self, start: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut sb = self.meta.lock();
        for b in start..start + len {
            self.check_block(b, "freed block")?;
            if !get_bit(&self.img, b)? {
                return Err(Error::corrupt(format!("block {b} freed twice")));
            }
            set_bit(&self.img, b, false)?;
        }
        self.mark_bitmap_dirty(start, len);
        sb.free_blocks = (sb.free_blocks.get() + len).into();
        self.write_sb(&mut sb)
    }

    /// Free blocks right now.
    pub fn free_blocks(&self) -> u64 {
        self.meta.lock().free_blocks.get()
    }
}
