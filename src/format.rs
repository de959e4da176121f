//! On-image structures of format version 2: little-endian, fixed layout, checksummed.
//! `docs/format.md` is the byte-level specification; struct sizes (and the offsets the code
//! relies on) are asserted here at compile time, field offsets follow from `#[repr(C)]` with
//! unaligned fields. `docs/design/transactions.md` explains how the structures change.
//!
//! Invariants that double as fsck rules:
//! - Blocks 0 and 1 are the two superblock slots; the valid one with the higher `txn` is the
//!   newest state. Every other block in use is reachable from that state exactly once: a node of
//!   the space-map tree or a bitmap, a node or leaf of the inode-table tree, a node or block of a
//!   file's or directory's tree, or an xattr block.
//! - Every metadata block ends in a [`Trailer`] whose `birth` is at most the state's `txn`.
//! - Block pointers are below `total_blocks` and below 2^48 (the upper bits are reserved, 0).
//! - Bit `i` of the bitmap of group `g` is set iff block `g * GROUP_BLOCKS + i` is in use.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of a block, the unit of allocation, copy-on-write and flushing.
pub const BLOCK_SIZE: u64 = 4096;
/// First 8 bytes of every image.
pub const MAGIC: [u8; 8] = *b"MMAPFS\0\x1a";
/// The format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 2;
/// Block numbers of the two superblock slots.
pub const SUPERBLOCK_SLOTS: [u64; 2] = [0, 1];
/// Smallest image `mkfs` accepts.
pub const MIN_IMAGE_SIZE: u64 = 1 << 20;

// ----- block trailer ------------------------------------------------------------------------

/// Bytes of a metadata block before its trailer.
pub const PAYLOAD_SIZE: u64 = 4080;
/// Size of [`Trailer`].
pub const TRAILER_SIZE: usize = 16;
/// Byte offset of the trailer in a metadata block.
pub const TRAILER_OFFSET: usize = PAYLOAD_SIZE as usize;
/// Byte of a block where its trailer's `set_bits` is.
pub const TRAILER_SET_BITS_OFFSET: usize = TRAILER_OFFSET + 10;
/// Byte offset of the trailer's checksum: the CRC covers every byte before it.
pub const TRAILER_CHECKSUM_OFFSET: usize = BLOCK_SIZE as usize - 4;

/// The last 16 bytes of every metadata block.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Trailer {
    /// Transaction that wrote this version of the block; only that transaction changes it in
    /// place, later ones copy it first.
    pub birth: U64,
    /// What the block holds ([`BlockKind`]).
    pub kind: u8,
    /// Tree nodes: level above the leaves (0 = slots point at blocks that are not nodes).
    pub level: u8,
    /// Bitmaps: 1 + the number of bits set in the payload, a second witness of every bit (a
    /// bit cleared under a valid checksum would hand out a block in use); 0 = not recorded
    /// (bitmaps written by builds before it). Other kinds: 0.
    pub set_bits: U16,
    /// CRC-32C of bytes `0..4092` of the block, computed when its transaction commits.
    pub checksum: U32,
}
const _: () = assert!(size_of::<Trailer>() == TRAILER_SIZE);
const _: () =
    assert!(std::mem::offset_of!(Trailer, set_bits) + TRAILER_OFFSET == TRAILER_SET_BITS_OFFSET);

/// The trailer `set_bits` value of a bitmap payload.
pub fn bitmap_set_bits(payload: &[u8]) -> u16 {
    let ones: u32 = payload.iter().map(|b| b.count_ones()).sum();
    // At most 4080 * 8 = 32640 bits: 1 + that fits.
    (ones + 1) as u16
}

/// Kinds of metadata blocks (the trailer's `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockKind {
    /// A node of a block tree: 510 block pointers.
    Node = 1,
    /// A leaf of the inode table: 15 inode records.
    InodeTable = 2,
    /// An allocation bitmap of one group.
    Bitmap = 3,
    /// Directory entry records.
    DirEntries = 4,
    /// Slots of a directory's name index.
    DirIndex = 5,
    /// Extended attributes of one inode.
    Xattr = 6,
    /// A chunk of an inode's extended attributes that did not fit in its `Xattr` block.
    XattrData = 7,
}

impl BlockKind {
    pub fn from_u8(v: u8) -> Option<BlockKind> {
        Some(match v {
            1 => BlockKind::Node,
            2 => BlockKind::InodeTable,
            3 => BlockKind::Bitmap,
            4 => BlockKind::DirEntries,
            5 => BlockKind::DirIndex,
            6 => BlockKind::Xattr,
            7 => BlockKind::XattrData,
            _ => return None,
        })
    }
}

/// CRC-32C of a whole metadata block as its trailer records it (bytes `0..4092`).
pub fn block_checksum(block: &[u8]) -> u32 {
    crc32c::crc32c(&block[..TRAILER_CHECKSUM_OFFSET])
}

// ----- block trees --------------------------------------------------------------------------

/// Pointers per tree node (u64 each, in the payload).
pub const TREE_FANOUT: u64 = PAYLOAD_SIZE / 8;
/// Maximum height of a block tree: 510^5 blocks, more than any file can have.
pub const TREE_MAX_HEIGHT: u32 = 5;
/// Block pointers are below this (the upper 16 bits are reserved and 0).
pub const MAX_BLOCKS: u64 = 1 << 48;
/// Largest file size (256 TiB).
pub const MAX_FILE_SIZE: u64 = 1 << 48;

/// Packs a tree root block and height into the one 8-byte slot that stores a tree.
pub fn pack_tree(root: u64, height: u32) -> u64 {
    root | (u64::from(height) << 56)
}

/// Inverse of [`pack_tree`].
pub fn unpack_tree(packed: u64) -> (u64, u32) {
    (packed & ((1 << 56) - 1), (packed >> 56) as u32)
}

// ----- space map ----------------------------------------------------------------------------

/// Blocks per allocation group: one bitmap block's payload holds one bit per block.
pub const GROUP_BLOCKS: u64 = PAYLOAD_SIZE * 8;

// ----- superblock ---------------------------------------------------------------------------

/// Superblock state: cleanly unmounted.
pub const STATE_CLEAN: u32 = 1;
/// Superblock state: committed while mounted (a crash leaves this).
pub const STATE_MOUNTED: u32 = 2;
/// Superblock state: the daemon found damage; run `fsck`.
pub const STATE_ERRORS: u32 = 3;

/// Incompatible feature: some inode's extended attributes are in the indexed form (an `Xattr`
/// block listing `XattrData` chunks). Set by the first commit that stores one.
pub const INCOMPAT_XATTR_INDEXED: u32 = 1;
/// Feature flags this build understands.
pub const INCOMPAT_SUPPORTED: u32 = INCOMPAT_XATTR_INDEXED;
pub const RO_COMPAT_SUPPORTED: u32 = 0;

/// Entries in a superblock's inline commit list.
pub const COMMIT_LIST_MAX: usize = 298;

/// Commit-list entries with this bit set in `block` name data blocks.
pub const LIST_DATA_FLAG: u64 = 1 << 63;

/// One block written by a single-flush commit and its CRC-32C: for a metadata block the
/// checksum in its trailer (of bytes `0..4092`), for a data block (`block` has bit 63 set) of
/// all its 4096 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ListEntry {
    pub block: U64,
    pub crc: U32,
}
const _: () = assert!(size_of::<ListEntry>() == 12);

/// A superblock slot (blocks 0 and 1): one complete state of the filesystem.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Superblock {
    pub magic: [u8; 8],
    pub version: U32,
    pub block_size: U32,
    /// Features a reader must understand.
    pub incompat: U32,
    /// Features a writer must understand.
    pub ro_compat: U32,
    /// Features that older builds may ignore.
    pub compat: U32,
    pub state: U32,
    pub uuid: [u8; 16],
    pub hash_seed: U64,
    pub created_sec: I64,
    /// Transaction number of this state.
    pub txn: U64,
    pub total_blocks: U64,
    pub free_blocks: U64,
    pub used_inodes: U64,
    /// Inode slots in the table (numbers `1..itab_slots`; a multiple of 15).
    pub itab_slots: U64,
    /// Packed tree of the inode table.
    pub itab_tree: U64,
    /// Packed tree of the group bitmaps (file block `g` = bitmap of group `g`).
    pub space_tree: U64,
    pub free_inode_head: U64,
    /// First inode on the orphan list (unlinked while open), 0 = none.
    pub orphan_head: U64,
    pub next_generation: U64,
    pub alloc_cursor: U64,
    pub mount_count: U64,
    pub last_mount_sec: I64,
    pub commit_sec: I64,
    /// Entries used in `list` (0 for a commit that flushed its blocks before this superblock).
    pub list_len: U32,
    pub flags: U32,
    pub reserved: [u8; 328],
    pub list: [ListEntry; COMMIT_LIST_MAX],
    pub reserved2: [u8; 4],
    /// CRC-32C of bytes `0..4092`.
    pub checksum: U32,
}
const _: () = assert!(size_of::<Superblock>() == BLOCK_SIZE as usize);
/// Byte offset of the inline commit list in a superblock.
pub const SUPERBLOCK_LIST_OFFSET: usize = 512;
const _: () = assert!(std::mem::offset_of!(Superblock, list) == SUPERBLOCK_LIST_OFFSET);
const _: () = assert!(std::mem::offset_of!(Superblock, reserved) == 184);

impl Superblock {
    pub fn seal(&mut self) {
        self.checksum = record_checksum(self.as_bytes()).into();
    }
    pub fn checksum_ok(&self) -> bool {
        record_checksum(self.as_bytes()) == self.checksum.get()
    }
    pub fn groups(&self) -> u64 {
        self.total_blocks.get().div_ceil(GROUP_BLOCKS)
    }
    /// The blocks a single-flush commit listed, with their CRCs.
    pub fn listed(&self) -> &[ListEntry] {
        &self.list[..(self.list_len.get() as usize).min(COMMIT_LIST_MAX)]
    }
}

// ----- inodes -------------------------------------------------------------------------------

/// Size of one inode record.
pub const INODE_SIZE: u64 = 256;
/// Inode records per inode-table leaf.
pub const INODES_PER_BLOCK: u64 = 15;
/// The root directory's inode number (FUSE's root is 1).
pub const ROOT_INO: u64 = 1;
/// Inode flag: the inode is on the orphan list.
pub const INODE_FLAG_ORPHAN: u32 = 1;
/// Inode flag set by `chattr +A`: reads do not update atime.
pub const INODE_FLAG_NOATIME: u32 = 1 << 8;
/// Inode flag set by `chattr +d`: backup tools (dump) skip the file.
pub const INODE_FLAG_NODUMP: u32 = 1 << 9;

/// One inode record.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Inode {
    /// File type and permission bits (`S_IF*` | mode); 0 = free slot.
    pub mode: U32,
    pub nlink: U32,
    pub uid: U32,
    pub gid: U32,
    pub size: U64,
    /// Blocks owned (data, tree nodes, xattr block).
    pub blocks: U64,
    pub atime_sec: I64,
    pub mtime_sec: I64,
    pub ctime_sec: I64,
    pub btime_sec: I64,
    pub atime_nsec: U32,
    pub mtime_nsec: U32,
    pub ctime_nsec: U32,
    pub btime_nsec: U32,
    pub rdev: U32,
    pub flags: U32,
    pub generation: U64,
    /// Packed tree of the contents.
    pub tree: U64,
    pub xattr_block: U64,
    /// Free slots: the next free slot.
    pub next_free: U64,
    /// Orphans: the next and previous inode on the orphan list.
    pub orphan_next: U64,
    pub orphan_prev: U64,
    /// Directories: the parent directory's inode number.
    pub parent: U64,
    /// Directories: byte offset where the next entry record is appended.
    pub dir_entries_end: U64,
    /// Directories: live entries (not counting `.` and `..`).
    pub dir_live: U64,
    /// Directories: bytes of deleted entry records.
    pub dir_tomb_bytes: U64,
    /// Directories: slots in the name index (power of two), 0 = no index yet.
    pub dir_hash_cap: U64,
    /// Directories: index slots in use, live and deleted.
    pub dir_hash_used: U64,
    /// Directories: which of the two index areas holds the index (0 or 1).
    pub dir_hash_area: U32,
    pub reserved: [u8; 64],
    pub checksum: U32,
}
const _: () = assert!(size_of::<Inode>() == INODE_SIZE as usize);
const _: () = assert!(std::mem::offset_of!(Inode, reserved) == 188);

/// crc32c of a record whose last 4 bytes are its checksum field.
pub fn record_checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(&bytes[..bytes.len() - 4])
}

impl Inode {
    pub fn seal(&mut self) {
        self.checksum = record_checksum(self.as_bytes()).into();
    }
    pub fn checksum_ok(&self) -> bool {
        record_checksum(self.as_bytes()) == self.checksum.get()
    }
    pub fn is_free(&self) -> bool {
        self.mode.get() == 0
    }
    pub fn file_type(&self) -> u32 {
        self.mode.get() & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.file_type() == libc::S_IFREG
    }
}

// ----- directories --------------------------------------------------------------------------

/// Header of one directory entry record; the name follows, the record is padded to 8 bytes.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DirentHeader {
    /// Inode number; 0 = deleted record.
    pub ino: U64,
    /// crc32c of the rest of the header and the name (see [`dirent_checksum`]).
    pub checksum: U32,
    /// Whole record length (header + name + padding); 0 = nothing more in this block.
    pub rec_len: U16,
    pub name_len: u8,
    /// File type (`DT_*` value).
    pub kind: u8,
}
pub const DIRENT_HEADER_SIZE: u64 = 16;
const _: () = assert!(size_of::<DirentHeader>() == DIRENT_HEADER_SIZE as usize);

/// Checksum of a directory entry record: crc32c over the header without its checksum field,
/// then the name.
pub fn dirent_checksum(h: &DirentHeader, name: &[u8]) -> u32 {
    let bytes = h.as_bytes();
    let c = crc32c::crc32c(&bytes[..8]);
    let c = crc32c::crc32c_append(c, &bytes[12..]);
    crc32c::crc32c_append(c, name)
}

impl DirentHeader {
    /// A header with its checksum computed for `name`.
    pub fn sealed(ino: u64, rec_len: u64, kind: u8, name: &[u8]) -> DirentHeader {
        let mut h = DirentHeader {
            ino: ino.into(),
            checksum: 0.into(),
            rec_len: (rec_len as u16).into(),
            name_len: name.len() as u8,
            kind,
        };
        h.checksum = dirent_checksum(&h, name).into();
        h
    }
}

/// Record length of a directory entry with a name of `name_len` bytes.
pub fn dirent_rec_len(name_len: usize) -> u64 {
    (DIRENT_HEADER_SIZE + name_len as u64).div_ceil(8) * 8
}

/// Longest name in a directory.
pub const NAME_MAX: usize = 255;

/// Whether `name` may stand in a directory: 1 to 255 bytes, no `/` or NUL, not `.` or `..`.
/// (Names come from the image, which is untrusted: the kernel refuses a whole listing that
/// carries one illegal name.)
pub fn legal_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}
/// Longest symlink target (PATH_MAX - 1).
pub const SYMLINK_MAX: usize = 4095;
/// Entry records live in file blocks `0..DIR_ENTRY_BLOCKS` of a directory's tree.
pub const DIR_ENTRY_BLOCKS: u64 = 1 << 23;
/// Directory name index slots per block.
pub const DIR_INDEX_SLOTS_PER_BLOCK: u64 = PAYLOAD_SIZE / 8;
/// First file block of index area `area` (0 or 1) in a directory's tree.
pub fn dir_index_area_block(area: u32) -> u64 {
    DIR_ENTRY_BLOCKS * (1 + u64::from(area))
}
/// Blocks an index area may span.
pub const DIR_INDEX_AREA_BLOCKS: u64 = DIR_ENTRY_BLOCKS;
/// Index slot value meaning "deleted" in the low 32 bits (the entry reference).
pub const DIR_SLOT_DELETED: u32 = u32::MAX;

/// `DT_*` directory entry type of an `S_IF*` mode.
pub fn dtype_of_mode(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        _ => libc::DT_UNKNOWN,
    }
}

/// Seeded 32-bit name hash for directory indexes (FNV-1a with a murmur finaliser).
pub fn name_hash(seed: u64, name: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

// ----- extended attributes ------------------------------------------------------------------

/// Header of an xattr block. Inline form: the entries follow, each `XattrEntryHeader` + name +
/// value. Indexed form: the entries are a byte stream cut into `XattrData` chunks of
/// `XATTR_CHUNK` bytes, and the block numbers of the chunks follow (u64 each).
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrBlockHeader {
    pub magic: U32,
    /// Bytes of entries (inline: after the header; indexed: in the chunks).
    pub used: U32,
    /// crc32c of those `used` bytes.
    pub checksum: U32,
    /// `XATTR_FORM_INLINE` or `XATTR_FORM_INDEXED`.
    pub form: U32,
}
pub const XATTR_MAGIC: u32 = 0x5841_5454;
pub const XATTR_HEADER_SIZE: usize = 16;
const _: () = assert!(size_of::<XattrBlockHeader>() == XATTR_HEADER_SIZE);
/// Bytes of entries an inline xattr block holds.
pub const XATTR_CAPACITY: usize = PAYLOAD_SIZE as usize - XATTR_HEADER_SIZE;
pub const XATTR_FORM_INLINE: u32 = 0;
pub const XATTR_FORM_INDEXED: u32 = 1;
/// Bytes of the entry stream per `XattrData` chunk (its whole payload).
pub const XATTR_CHUNK: usize = PAYLOAD_SIZE as usize;
/// Chunks an indexed xattr block can list.
pub const XATTR_MAX_CHUNKS: usize = XATTR_CAPACITY / 8;
/// Largest attribute value (Linux's XATTR_SIZE_MAX).
pub const XATTR_VALUE_MAX: usize = 65536;
/// Largest total of the names with their NULs (Linux's XATTR_LIST_MAX: what listxattr returns).
pub const XATTR_NAMES_MAX: usize = 65536;

#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrEntryHeader {
    pub name_len: u8,
    /// Bits 16..24 of the value length (values reach 65536 bytes).
    pub value_len_hi: u8,
    /// Bits 0..16 of the value length.
    pub value_len: U16,
}
pub const XATTR_ENTRY_HEADER_SIZE: usize = 4;
const _: () = assert!(size_of::<XattrEntryHeader>() == XATTR_ENTRY_HEADER_SIZE);

impl XattrEntryHeader {
    pub fn new(name_len: usize, value_len: usize) -> XattrEntryHeader {
        XattrEntryHeader {
            name_len: name_len as u8,
            value_len_hi: (value_len >> 16) as u8,
            value_len: (value_len as u16).into(),
        }
    }
    pub fn value_len(&self) -> usize {
        usize::from(self.value_len_hi) << 16 | usize::from(self.value_len.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn tree_packing_round_trips() {
        for (root, h) in [(0, 0), (1, 1), ((1 << 56) - 1, 5)] {
            assert_eq!(unpack_tree(pack_tree(root, h)), (root, h));
        }
    }

    #[test]
    fn checksums_detect_a_flipped_bit() {
        let mut ino = Inode::new_zeroed();
        ino.mode = 0o100644.into();
        ino.seal();
        assert!(ino.checksum_ok());
        let mut bytes = ino.as_bytes().to_vec();
        bytes[17] ^= 1;
        let bad = Inode::read_from_bytes(&bytes).unwrap();
        assert!(!bad.checksum_ok());
        let mut sb = Superblock::new_zeroed();
        sb.seal();
        assert!(sb.checksum_ok());
        sb.list[3].crc = 7.into();
        assert!(!sb.checksum_ok());
    }

    #[test]
    fn rec_len_is_aligned() {
        assert_eq!(dirent_rec_len(1), 24);
        assert_eq!(dirent_rec_len(8), 24);
        assert_eq!(dirent_rec_len(9), 32);
        assert_eq!(dirent_rec_len(255), 272);
    }

    #[test]
    fn layout_constants_agree() {
        assert_eq!(TREE_FANOUT, 510);
        assert_eq!(GROUP_BLOCKS, 32640);
        const { assert!(INODES_PER_BLOCK * INODE_SIZE <= PAYLOAD_SIZE) };
        // A tree of maximum height addresses every block of the largest file.
        assert!(TREE_FANOUT.pow(TREE_MAX_HEIGHT) >= MAX_FILE_SIZE / BLOCK_SIZE);
        // The index areas fit a tree of height 3.
        assert!(dir_index_area_block(1) + DIR_INDEX_AREA_BLOCKS <= TREE_FANOUT.pow(3));
    }
}
