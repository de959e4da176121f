//! Block access under everything else: metadata block trailers, and copy-on-write of one block.
//!
//! A metadata block may be changed in place only by the transaction that wrote it (its
//! trailer's `birth`); any other transaction first copies it to a fresh block ([`Engine::cow`])
//! and frees the old one, and the caller points the parent at the copy.

use std::sync::atomic::Ordering;

use zerocopy::{FromBytes, IntoBytes};

use super::{Engine, block_off};
use crate::error::Result;
use crate::format::*;

/// Where blocks come from and go to: the running transaction's allocator during operations, or
/// the allocator itself while a commit applies the space map.
pub(super) trait Blocks {
    /// The transaction new blocks belong to.
    fn txn(&self) -> u64;
    /// Allocates up to `want` contiguous blocks, preferably at `goal`; at least one. `data`:
    /// the blocks will hold file contents (ordered data), else metadata.
    fn alloc(&mut self, goal: u64, want: u64, data: bool) -> Result<(u64, u64)>;
    /// Frees blocks (reusable only once the transaction after this one is durable).
    fn free(&mut self, start: u64, len: u64) -> Result<()>;
    /// Whether `block` was allocated by this transaction (and may be changed in place). Decided
    /// from the allocator's memory, never from the image: a trailer cannot make a committed
    /// block writable.
    fn born(&self, block: u64) -> bool;
}

impl Engine {
    /// The trailer of metadata block `block`.
    pub(super) fn trailer(&self, block: u64) -> Result<Trailer> {
        let bytes = self
            .img
            .bytes(block_off(block) + TRAILER_OFFSET as u64, TRAILER_SIZE)?;
        Trailer::read_from_bytes(bytes).map_err(|_| self.corrupt("trailer size"))
    }

    /// The trailer of `block`, which must hold `kind` (and be at `level`, for tree nodes), and
    /// whose checksum is verified on first use since open (kinds without checksums inside).
    pub(super) fn expect_kind(
        &self,
        block: u64,
        kind: BlockKind,
        level: Option<u32>,
    ) -> Result<Trailer> {
        let t = self.trailer(block)?;
        if t.kind != kind as u8 || level.is_some_and(|l| u32::from(t.level) != l) {
            self.suspect(block);
            return Err(self.corrupt(format!(
                "block {block}: expected {kind:?}{} but the block says kind {} level {}",
                level.map(|l| format!(" at level {l}")).unwrap_or_default(),
                t.kind,
                t.level
            )));
        }
        // Kinds whose contents carry no checksums of their own are verified before their first
        // use. Inode records, directory records and attribute streams have their own, so one
        // damaged record costs only that record, not its 14 neighbours in the block.
        let inner = matches!(
            kind,
            BlockKind::InodeTable | BlockKind::DirEntries | BlockKind::Xattr | BlockKind::XattrData
        );
        if !inner && !self.trusted(block) {
            let bytes = self.img.bytes(block_off(block), BLOCK_SIZE as usize)?;
            if block_checksum(bytes) != t.checksum.get() {
                self.suspect(block);
                return Err(self.corrupt(format!("block {block} ({kind:?}): checksum mismatch")));
            }
            if let Some(m) = SetBitsMismatch::of(block, bytes, &t) {
                // Bits cleared under a valid checksum would hand out blocks in use; bits set
                // only leak blocks, so the group stays usable until fsck reclaims them.
                if m.bits_cleared {
                    return Err(self.corrupt(m.why));
                }
                log::error!(
                    "{}: the extra blocks stay unused until `mmapfs fsck --repair`",
                    m.why
                );
                self.mark_damaged();
            }
            self.trust(block);
        }
        Ok(t)
    }

    /// Whether `block` was verified since open or written by this process.
    fn trusted(&self, block: u64) -> bool {
        self.trusted
            .get(block / 32)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (block % 32)) != 0)
    }

    /// Marks `block` as verified or written here (a block past the table is verified on every
    /// use instead).
    fn trust(&self, block: u64) {
        if let Some(w) = self.trusted.get(block / 32) {
            w.fetch_or(1 << (block % 32), Ordering::Relaxed);
        }
    }

    /// Writes an empty metadata block: zero payload, trailer born in `txn`.
    pub(super) fn init_block(
        &self,
        block: u64,
        txn: u64,
        kind: BlockKind,
        level: u32,
    ) -> Result<()> {
        self.img.zero(block_off(block), PAYLOAD_SIZE as usize)?;
        self.write_trailer(block, txn, kind, level)
    }

    fn write_trailer(&self, block: u64, txn: u64, kind: BlockKind, level: u32) -> Result<()> {
        self.trust(block);
        let t = Trailer {
            birth: txn.into(),
            kind: kind as u8,
            level: level as u8,
            set_bits: 0.into(),
            checksum: 0.into(),
        };
        self.img
            .write(block_off(block) + TRAILER_OFFSET as u64, t.as_bytes())?;
        Ok(())
    }

    /// Repair: gives a damaged block a fresh trailer (level 0).
    pub(super) fn rewrite_trailer(&self, block: u64, birth: u64, kind: BlockKind) -> Result<()> {
        self.write_trailer(block, birth, kind, 0)
    }

    /// Allocates and initialises an empty metadata block.
    pub(super) fn new_block(
        &self,
        b: &mut dyn Blocks,
        goal: u64,
        kind: BlockKind,
        level: u32,
    ) -> Result<u64> {
        let (block, _) = b.alloc(goal, 1, false)?;
        self.init_block(block, b.txn(), kind, level)?;
        Ok(block)
    }

    /// Makes metadata block `block` writable in `b`'s transaction: returns it if it was born
    /// there, else a copy (the old block is freed; the caller re-points the parent).
    pub(super) fn cow(&self, b: &mut dyn Blocks, block: u64, kind: BlockKind) -> Result<u64> {
        let t = self.expect_kind(block, kind, None)?;
        if t.birth.get() == b.txn() && b.born(block) {
            return Ok(block);
        }
        let (copy, _) = b.alloc(block + 1, 1, false)?;
        self.img
            .copy_within(block_off(block), block_off(copy), BLOCK_SIZE as usize)?;
        self.write_trailer(copy, b.txn(), kind, u32::from(t.level))?;
        b.free(block, 1)?;
        Ok(copy)
    }

    /// Computes and stores the trailer checksum of a block written in the transaction being
    /// committed; returns it (for the commit list). The checksum covers the block up to itself:
    /// a checksum over a whole sealed block would be the same constant for every block (a CRC
    /// over data followed by its own CRC is the CRC's residue), so it could not tell versions
    /// apart.
    pub(super) fn seal_block(&self, block: u64) -> Result<u32> {
        let off = block_off(block);
        if self.trailer(block)?.kind == BlockKind::Bitmap as u8 {
            let bits = bitmap_set_bits(self.img.bytes(off, PAYLOAD_SIZE as usize)?);
            self.img
                .write(off + TRAILER_SET_BITS_OFFSET as u64, &bits.to_le_bytes())?;
        }
        let crc = block_checksum(self.img.bytes(off, BLOCK_SIZE as usize)?);
        self.img
            .write(off + TRAILER_CHECKSUM_OFFSET as u64, &crc.to_le_bytes())?;
        Ok(crc)
    }

    /// Verifies a committed metadata block's trailer checksum (fsck).
    pub(super) fn verify_block(&self, block: u64) -> Result<Trailer> {
        let bytes = self.img.bytes(block_off(block), BLOCK_SIZE as usize)?;
        let t = self.trailer(block)?;
        if block_checksum(bytes) != t.checksum.get() {
            return Err(self.corrupt(format!("block {block}: checksum mismatch")));
        }
        if let Some(m) = SetBitsMismatch::of(block, bytes, &t) {
            return Err(self.corrupt(m.why));
        }
        Ok(t)
    }
}

/// A bitmap whose recorded count of set bits disagrees with its payload (a bit changed under
/// a valid checksum).
struct SetBitsMismatch {
    /// Fewer bits set than recorded: a used block may look free.
    bits_cleared: bool,
    why: String,
}

impl SetBitsMismatch {
    fn of(block: u64, bytes: &[u8], t: &Trailer) -> Option<SetBitsMismatch> {
        let recorded = t.set_bits.get();
        if t.kind != BlockKind::Bitmap as u8 || recorded == 0 {
            return None;
        }
        let actual = bitmap_set_bits(&bytes[..PAYLOAD_SIZE as usize]);
        (actual != recorded).then(|| SetBitsMismatch {
            bits_cleared: actual < recorded,
            why: format!(
                "block {block}: bitmap records {} bits set but has {}",
                recorded - 1,
                actual - 1
            ),
        })
    }
}
