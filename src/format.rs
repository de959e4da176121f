//! On-image structures: little-endian, fixed layout, versioned, checksummed. `docs/format.md`
//! is the byte-level specification; every offset there is asserted here at compile time.
//!
//! Invariants that double as fsck rules:
//! - Block 0 holds the superblock; block numbers are `< total_blocks`.
//! - Group `g` covers blocks `[g * GROUP_BLOCKS, (g + 1) * GROUP_BLOCKS)`; its allocation bitmap
//!   is block [`bitmap_block`]`(g)`, bit set = block in use.
//! - Inode `n` lives at byte `n * INODE_SIZE` of the inode-table tree (a block tree like a file's).
//! - Every block in use is owned exactly once: by the superblock, a bitmap, an inode-table or
//!   file tree (node or data), or an xattr block.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of a block, the unit of allocation and of mapping.
pub const BLOCK_SIZE: u64 = 4096;
/// First 8 bytes of every image.
pub const MAGIC: [u8; 8] = *b"MMAPFS\0\x1a";
/// The format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Blocks per allocation group: one bitmap block holds one bit per block of its group.
pub const GROUP_BLOCKS: u64 = BLOCK_SIZE * 8;
/// Size of one inode record.
pub const INODE_SIZE: u64 = 256;
/// Inode records per block.
pub const INODES_PER_BLOCK: u64 = BLOCK_SIZE / INODE_SIZE;
/// Pointers per tree node (block numbers, u64 each).
pub const TREE_FANOUT: u64 = BLOCK_SIZE / 8;
/// Maximum height of a block tree: 512^4 blocks of 4 KiB = 256 TiB.
pub const TREE_MAX_HEIGHT: u32 = 4;
/// The root directory's inode number (FUSE's root is 1).
pub const ROOT_INO: u64 = 1;
/// Longest name in a directory.
pub const NAME_MAX: usize = 255;
/// Longest symlink target (PATH_MAX - 1).
pub const SYMLINK_MAX: usize = 4095;
/// Smallest image `mkfs` accepts.
pub const MIN_IMAGE_SIZE: u64 = 1 << 20;

/// Superblock state: cleanly unmounted, everything flushed.
pub const STATE_CLEAN: u32 = 1;
/// Superblock state: mounted (or crashed while mounted): recovery runs at the next mount.
pub const STATE_DIRTY: u32 = 2;

/// Bitmap block of group `g`: block 1 in group 0 (block 0 is the superblock), else the first.
pub fn bitmap_block(group: u64) -> u64 {
    if group == 0 { 1 } else { group * GROUP_BLOCKS }
}

/// Packs a tree root block and height into the one 8-byte slot that stores a tree, so a reader
/// sees both change atomically.
pub fn pack_tree(root: u64, height: u32) -> u64 {
    root | (u64::from(height) << 56)
}

/// Inverse of [`pack_tree`].
pub fn unpack_tree(packed: u64) -> (u64, u32) {
    (packed & ((1 << 56) - 1), (packed >> 56) as u32)
}

/// Block 0, bytes 0..256.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Superblock {
    pub magic: [u8; 8],
    pub version: U32,
    pub block_size: U32,
    pub total_blocks: U64,
    pub free_blocks: U64,
    pub state: U32,
    pub flags: U32,
    /// Packed tree (see [`pack_tree`]) of the inode table.
    pub itab_tree: U64,
    /// Inode slots that exist in the table (numbers `1..itab_slots` are valid).
    pub itab_slots: U64,
    pub free_inode_head: U64,
    /// Reserved (0). Unlinked-but-open inodes are freed at unmount, or by recovery after a crash.
    pub reserved_orphan_head: U64,
    pub used_inodes: U64,
    pub next_generation: U64,
    pub alloc_cursor: U64,
    pub hash_seed: U64,
    pub uuid: [u8; 16],
    pub created_sec: I64,
    pub mount_count: U64,
    pub last_mount_sec: I64,
    pub reserved: [u8; 108],
    pub checksum: U32,
}
pub const SUPERBLOCK_SIZE: usize = 256;
const _: () = assert!(size_of::<Superblock>() == SUPERBLOCK_SIZE);

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
    /// Blocks owned (data, tree nodes, xattr block), in units of BLOCK_SIZE.
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
    pub generation: U32,
    /// Packed data tree (see [`pack_tree`]).
    pub tree: U64,
    pub xattr_block: U64,
    /// Next inode on the free list (free slots only).
    pub next_link: U64,
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
    pub flags: U32,
    /// Kernel references while mounted: `(mount epoch << 32) | count`, updated atomically in
    /// place and excluded from the checksum; a count from another epoch means 0.
    pub kernel_refs: U64,
    pub reserved: [u8; 76],
    pub checksum: U32,
}
const _: () = assert!(size_of::<Inode>() == INODE_SIZE as usize);
/// Byte offset of `Inode::kernel_refs` inside a record.
pub const INODE_REFS_OFFSET: usize = 168;
const _: () = assert!(std::mem::offset_of!(Inode, kernel_refs) == INODE_REFS_OFFSET);

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

/// Directory name index: area `a` starts at this byte offset of the directory's tree.
pub fn dir_hash_area_offset(area: u32) -> u64 {
    (1u64 << 40) * (1 + u64::from(area))
}
/// Largest directory entry region (entries live at offsets below the first index area).
pub const DIR_ENTRIES_MAX: u64 = 1 << 40;
/// Index slot value meaning "deleted" in the low 32 bits (the entry reference).
pub const DIR_SLOT_DELETED: u32 = u32::MAX;

/// Header of an xattr block; entries follow, each `XattrEntryHeader` + name + value.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrBlockHeader {
    pub magic: U32,
    /// Bytes used after the header.
    pub used: U32,
    /// crc32c of those `used` bytes.
    pub checksum: U32,
    pub reserved: U32,
}
pub const XATTR_MAGIC: u32 = 0x5841_5454;
pub const XATTR_HEADER_SIZE: usize = 16;
const _: () = assert!(size_of::<XattrBlockHeader>() == XATTR_HEADER_SIZE);

#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrEntryHeader {
    pub name_len: u8,
    pub reserved: u8,
    pub value_len: U16,
}
pub const XATTR_ENTRY_HEADER_SIZE: usize = 4;
const _: () = assert!(size_of::<XattrEntryHeader>() == XATTR_ENTRY_HEADER_SIZE);

/// crc32c of a record whose last 4 bytes are its checksum field.
pub fn record_checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(&bytes[..bytes.len() - 4])
}

impl Superblock {
    pub fn seal(&mut self) {
        let c = record_checksum(self.as_bytes());
        self.checksum = c.into();
    }
    pub fn checksum_ok(&self) -> bool {
        record_checksum(self.as_bytes()) == self.checksum.get()
    }
    pub fn groups(&self) -> u64 {
        self.total_blocks.get().div_ceil(GROUP_BLOCKS)
    }
}

/// crc32c of an inode record, skipping the checksum and the in-place `kernel_refs` field.
pub fn inode_checksum(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(&bytes[..INODE_REFS_OFFSET]);
    crc32c::crc32c_append(c, &bytes[INODE_REFS_OFFSET + 8..bytes.len() - 4])
}

impl Inode {
    pub fn seal(&mut self) {
        let c = inode_checksum(self.as_bytes());
        self.checksum = c.into();
    }
    pub fn checksum_ok(&self) -> bool {
        inode_checksum(self.as_bytes()) == self.checksum.get()
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
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn tree_packing_round_trips() {
        for (root, h) in [(0, 0), (1, 1), ((1 << 56) - 1, 4)] {
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
    }

    #[test]
    fn rec_len_is_aligned() {
        assert_eq!(dirent_rec_len(1), 24);
        assert_eq!(dirent_rec_len(8), 24);
        assert_eq!(dirent_rec_len(9), 32);
        assert_eq!(dirent_rec_len(255), 272);
    }
}
