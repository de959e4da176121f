//! Consistency check (`mmapfs fsck`) and repair (`fsck --repair`).
//!
//! Invariants checked, on the state the superblock names:
//! 1. Every metadata block (tree nodes, inode-table leaves, bitmaps, directory and xattr
//!    blocks) has a valid trailer: its kind, its checksum, a birth no newer than the state.
//! 2. Every block is either free or owned exactly once (a superblock slot, the space map, the
//!    inode table, an inode's tree or xattr block), and the bitmaps mark exactly the owned.
//! 3. An inode's `blocks` equals what it owns; its contents lie where its type allows.
//! 4. Directory entries point at used inodes of the recorded type; every entry is found
//!    through the directory's name index; `dir_live` counts the entries; a directory is
//!    referenced by exactly one entry, in the directory its `parent` names.
//! 5. Link counts equal the references (2 + subdirectories for a directory).
//! 6. Every used inode is reachable from the root, or on the orphan list with no links.
//! 7. The free-inode list holds exactly the free slots; the superblock's counters match.
//!
//! Repair collects fixes during a check, applies them in a transaction and commits, then checks
//! again (a fix can reveal the next problem: a directory moved to `/lost+found` brings its
//! entries into view), up to a few rounds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use zerocopy::FromZeros;

use super::{Engine, SetMode};
use crate::acl::{self, Acl};
use crate::error::{Error, Result};
use crate::format::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Report,
    Repair,
}

#[derive(Default, Debug)]
pub struct Report {
    pub problems: Vec<String>,
    /// Repair: the problems the repairs addressed, and what each repair did.
    pub found: Vec<String>,
    pub repaired: Vec<String>,
    pub inodes: u64,
    pub directories: u64,
    pub blocks_used: u64,
}

/// Problems beyond this count are summarised, so a badly damaged image gives a readable list.
const MAX_LISTED: usize = 200;
/// Repair rounds before giving up.
const REPAIR_ROUNDS: usize = 4;
/// Name of the directory unreachable inodes are moved to.
const LOST_FOUND: &[u8] = b"lost+found";

#[derive(Clone, Debug)]
enum Fix {
    /// A damaged record: becomes a free slot (its blocks are then unowned).
    FreeSlot(u64),
    /// The inode's tree conflicts with others: it loses its contents.
    DropTree(u64),
    DropXattr(u64),
    /// One attribute that cannot stand (an invalid or misplaced ACL).
    DropAttr(u64, Vec<u8>),
    /// An access ACL that disagrees with the mode bits: its entries take the mode's bits.
    AclFromMode(u64),
    SalvageDir(u64),
    DropEntry(u64, Vec<u8>),
    /// An entry whose name cannot stand in a directory: renamed to a legal one.
    RenameEntry(u64, Vec<u8>, Vec<u8>),
    Reindex(u64),
    ToLostFound(u64),
    SetLinks(u64, u32),
    SetBlocks(u64, u64),
    SetSize(u64, u64),
    SetParent(u64, u64),
    /// Fields the inode's type does not use (directory fields of other inodes, reserved
    /// bytes, unknown flag bits) hold values: set to 0.
    ClearUnused(u64),
    /// An inode-table leaf whose trailer is damaged: copied (and so resealed) as it is.
    RewriteLeaf(u64),
    /// A file tree with a damaged node: every node copied (resealed).
    RewriteTree(u64),
    RebuildFreeList,
    /// The superblock's inode-slot count disagrees with the table: set to what it holds.
    SetItabSlots(u64),
    /// Content blocks a symlink or directory may not own: freed.
    DropStray(u64),
    /// A directory whose index area number is neither 0 nor 1: set to 0 (its index is
    /// rebuilt by `Reindex`).
    ResetIndexArea(u64),
    /// The orphan list does not hold what the records say: rebuilt from them.
    RebuildOrphans,
    /// A bitmap that fails its checksum: rewritten from the owned blocks of its group.
    RebuildBitmap(u64, Vec<(u64, u64)>),
    /// Bitmap corrections: owned blocks marked free, free blocks marked used.
    MarkUsed(Vec<(u64, u64)>),
    MarkFree(Vec<(u64, u64)>),
    /// List links (free list, orphan list) on a used inode that is not on that list.
    ClearListLinks(u64),
    /// Nanosecond fields of 10^9 or more: set to the largest valid value.
    ClampTimes(u64),
    /// Indexed attributes exist but the superblock's incompat bit for them is clear.
    EnableIndexedXattrs,
    /// The superblock slot the state is not in is damaged: the next commit rewrites it.
    Recommit,
    /// The superblock's next generation number is not above every inode's: raised.
    SetNextGeneration(u64),
    /// Counter corrections (true value minus recorded value).
    Counters {
        free_blocks: i64,
        used_inodes: i64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Used,
    Damaged,
}

struct Walk<'a> {
    e: &'a Engine,
    txn: u64,
    total: u64,
    owned: Vec<u64>,
    problems: Vec<String>,
    fixes: Vec<Fix>,
    inodes: u64,
    directories: u64,
    /// The path of each inode reached from the root (the first name found).
    paths: Vec<Option<String>>,
}

impl Walk<'_> {
    /// `inode 12 (/docs/a.txt)`, or `inode 12` when no path leads to it.
    fn who(&self, ino: u64) -> String {
        match self.paths.get(ino as usize).and_then(|p| p.as_deref()) {
            Some(p) => format!("inode {ino} ({p})"),
            None => format!("inode {ino}"),
        }
    }

    /// `directory /docs (inode 5)`, or `directory 5`.
    fn dir_who(&self, ino: u64) -> String {
        match self.paths.get(ino as usize).and_then(|p| p.as_deref()) {
            Some(p) => format!("directory {p} (inode {ino})"),
            None => format!("directory {ino}"),
        }
    }

    /// What applying `fix` does, in words.
    fn describe(&self, fix: &Fix) -> Option<String> {
        let blocks = |r: &[(u64, u64)]| r.iter().map(|x| x.1).sum::<u64>();
        Some(match fix {
            Fix::FreeSlot(ino) => format!("freed the damaged record of inode {ino}"),
            Fix::DropTree(ino) => format!(
                "emptied {}: its block tree was damaged (its contents are lost)",
                self.who(*ino)
            ),
            Fix::DropXattr(ino) => {
                format!("dropped the extended attributes of {}", self.who(*ino))
            }
            Fix::DropAttr(ino, name) => format!(
                "removed the attribute {} of {}",
                String::from_utf8_lossy(name),
                self.who(*ino)
            ),
            Fix::AclFromMode(ino) => {
                format!("set the access ACL of {} from its mode", self.who(*ino))
            }
            Fix::SalvageDir(d) => format!("kept the readable entries of {}", self.dir_who(*d)),
            Fix::DropEntry(d, name) => format!(
                "removed the entry {:?} from {}",
                String::from_utf8_lossy(name),
                self.dir_who(*d)
            ),
            Fix::Reindex(d) => format!("rebuilt the name index of {}", self.dir_who(*d)),
            Fix::RenameEntry(d, from, to) => format!(
                "renamed the entry {:?} of {} to {:?}",
                String::from_utf8_lossy(from),
                self.dir_who(*d),
                String::from_utf8_lossy(to)
            ),
            Fix::ToLostFound(ino) => {
                format!("moved unreachable inode {ino} to /lost+found/#{ino}")
            }
            Fix::SetLinks(ino, n) => format!("set the link count of {} to {n}", self.who(*ino)),
            Fix::SetBlocks(ino, n) => {
                format!("set the block count of {} to {n}", self.who(*ino))
            }
            Fix::SetSize(ino, n) => format!("set the size of {} to {n}", self.who(*ino)),
            Fix::SetParent(ino, p) => format!(
                "set the parent of {} to {}",
                self.dir_who(*ino),
                self.dir_who(*p)
            ),
            Fix::ClearUnused(ino) => {
                format!("cleared the unused fields of {}", self.who(*ino))
            }
            Fix::RewriteLeaf(leaf) => format!("resealed inode-table block {leaf}"),
            Fix::RewriteTree(ino) => format!("resealed the block tree of {}", self.who(*ino)),
            Fix::RebuildOrphans => "rebuilt the list of files unlinked while open".to_string(),
            Fix::DropStray(ino) => format!("freed the blocks {} may not own", self.who(*ino)),
            Fix::ResetIndexArea(d) => format!("reset the index area of {}", self.dir_who(*d)),
            Fix::RebuildFreeList => "rebuilt the free inode list".to_string(),
            Fix::SetItabSlots(n) => format!("set the inode-slot count to {n}"),
            Fix::RebuildBitmap(g, _) => {
                format!("rewrote the damaged bitmap of group {g} from the blocks in use")
            }
            Fix::ClearListLinks(ino) => {
                format!("cleared the stray list links of {}", self.who(*ino))
            }
            Fix::ClampTimes(ino) => format!("corrected the timestamps of {}", self.who(*ino)),
            Fix::EnableIndexedXattrs => {
                "recorded in the superblock that the image uses indexed attributes".to_string()
            }
            Fix::Recommit => "rewrote the damaged superblock from the current state".to_string(),
            Fix::SetNextGeneration(n) => format!("set the next generation number to {n}"),
            Fix::MarkUsed(r) if r.is_empty() => return None,
            Fix::MarkUsed(r) => format!("marked {} owned blocks used in the bitmaps", blocks(r)),
            Fix::MarkFree(r) if r.is_empty() => return None,
            Fix::MarkFree(r) => format!("marked {} unowned blocks free in the bitmaps", blocks(r)),
            Fix::Counters {
                free_blocks,
                used_inodes,
            } => format!(
                "corrected the superblock's counts (free blocks {free_blocks:+}, used inodes \
                 {used_inodes:+})"
            ),
        })
    }

    fn problem(&mut self, msg: String) {
        if self.problems.len() < MAX_LISTED {
            self.problems.push(msg);
        } else if self.problems.len() == MAX_LISTED {
            self.problems.push("... (more problems not listed)".into());
        }
    }

    fn is_owned(&self, block: u64) -> bool {
        block < self.total && self.owned[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Claims a block; false if it is out of range or already owned.
    fn claim(&mut self, block: u64) -> bool {
        if block >= self.total || self.is_owned(block) {
            return false;
        }
        self.owned[(block / 64) as usize] |= 1 << (block % 64);
        true
    }

    fn release(&mut self, block: u64) {
        if block < self.total {
            self.owned[(block / 64) as usize] &= !(1 << (block % 64));
        }
    }

    /// A metadata block's trailer is valid: kind, checksum, birth. A block the running
    /// transaction wrote has no checksum yet (its commit computes it).
    fn meta_ok(&self, block: u64, kind: BlockKind) -> std::result::Result<(), String> {
        let t = if self.e.in_running_txn(block) {
            self.e.trailer(block).map_err(|e| e.to_string())?
        } else {
            self.e.verify_block(block).map_err(|e| e.to_string())?
        };
        if t.kind != kind as u8 {
            return Err(format!(
                "block {block} is of kind {} instead of {kind:?}",
                t.kind
            ));
        }
        if t.birth.get() > self.txn && !self.e.in_running_txn(block) {
            return Err(format!(
                "block {block} was written by transaction {} after this state ({})",
                t.birth, self.txn
            ));
        }
        Ok(())
    }

    /// Claims all blocks of a tree whose content blocks are metadata of `kind(tree block)` (or
    /// data when `None`), verifying every metadata block: a damaged one is added to `damaged`
    /// as `(tree block, why)` (nodes with the first tree block they cover). On a conflict or
    /// a tree that cannot be walked, releases what it claimed and fails. Returns the blocks
    /// claimed.
    fn claim_tree(
        &mut self,
        packed: u64,
        kind: &dyn Fn(u64) -> Option<BlockKind>,
        damaged: &mut Vec<(u64, String)>,
    ) -> std::result::Result<u64, String> {
        let mut blocks: Vec<(u64, bool, u64)> = Vec::new();
        self.e
            .tree_visit(packed, &mut |block, content, fblock| {
                blocks.push((block, content, fblock));
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        for &(block, content, fblock) in &blocks {
            let check = match (content, kind(fblock)) {
                (false, _) => self.meta_ok(block, BlockKind::Node),
                (true, Some(k)) => self.meta_ok(block, k),
                (true, None) => Ok(()),
            };
            if let Err(why) = check {
                damaged.push((fblock, why));
            }
        }
        for (i, &(block, _, _)) in blocks.iter().enumerate() {
            if !self.claim(block) {
                for &(c, _, _) in &blocks[..i] {
                    self.release(c);
                }
                return Err(format!("block {block} is owned twice"));
            }
        }
        Ok(blocks.len() as u64)
    }
}

/// Sizes against extents: a symlink holds its target in block 0 only, 1..=SYMLINK_MAX bytes; a
/// directory's blocks lie below `dir_entries_end` or inside its current index. (Regular files
/// may own blocks past EOF: fallocate with KEEP_SIZE.)
fn extent_problem(e: &Engine, rec: &Inode) -> Option<String> {
    let mut content = Vec::new();
    e.tree_visit(rec.tree.get(), &mut |_, is_content, fblock| {
        if is_content {
            content.push(fblock);
        }
        Ok(())
    })
    .ok()?;
    match rec.file_type() {
        libc::S_IFLNK => {
            if let Some(fb) = content.iter().find(|&&fb| fb > 0) {
                return Some(format!("symlink owns file block {fb}"));
            }
        }
        libc::S_IFDIR => {
            let entry_blocks = rec.dir_entries_end.get().div_ceil(BLOCK_SIZE);
            let area = dir_index_area_block(rec.dir_hash_area.get());
            let index_blocks = rec.dir_hash_cap.get().div_ceil(DIR_INDEX_SLOTS_PER_BLOCK);
            for &fb in &content {
                let in_entries = fb < entry_blocks;
                let in_index = fb >= area && fb < area + index_blocks;
                if !in_entries && !in_index {
                    return Some(format!(
                        "directory owns file block {fb} outside its entries ({entry_blocks} \
                         blocks) and index"
                    ));
                }
            }
        }
        _ => {}
    }
    None
}

/// What is wrong with an inode's stored POSIX ACLs: one that does not parse, a default ACL on
/// a non-directory, an access ACL whose class entries disagree with the mode bits.
fn acl_problems(e: &Engine, ino: u64, rec: &Inode) -> Vec<(String, Fix)> {
    let mut out = Vec::new();
    for name in e.xattr_list(rec).unwrap_or_default() {
        let known = [&b"user."[..], b"trusted.", b"security.", b"system."]
            .iter()
            .any(|ns| name.len() > ns.len() && name.starts_with(ns));
        if !known {
            let shown = String::from_utf8_lossy(&name).into_owned();
            out.push((
                format!("attribute {shown:?} has no namespace"),
                Fix::DropAttr(ino, name),
            ));
        }
    }
    for name in [acl::ACCESS, acl::DEFAULT] {
        let shown = String::from_utf8_lossy(name);
        let Ok(value) = e.xattr_get(rec, name) else {
            continue;
        };
        let drop = |why: String| (why, Fix::DropAttr(ino, name.to_vec()));
        match Acl::parse(&value) {
            Err(_) => out.push(drop(format!("{shown} is not a valid ACL"))),
            Ok(_) if name == acl::DEFAULT && !rec.is_dir() => {
                out.push(drop(format!("{shown} on a non-directory")))
            }
            Ok(a) if name == acl::ACCESS && a.mode_bits() != rec.mode.get() & 0o777 => out.push((
                format!(
                    "{shown} gives mode {:03o}, the inode says {:03o}",
                    a.mode_bits(),
                    rec.mode.get() & 0o777
                ),
                Fix::AclFromMode(ino),
            )),
            Ok(_) => {}
        }
    }
    out
}

/// Claims the blocks of an inode's extended attributes after verifying each and the stream;
/// on any problem claims nothing and says why. Returns the blocks claimed.
fn claim_xattrs(
    w: &mut Walk,
    e: &Engine,
    ino: u64,
    rec: &Inode,
) -> std::result::Result<u64, String> {
    let blocks = e.xattr_blocks(rec).map_err(|err| err.to_string())?;
    for (i, &b) in blocks.iter().enumerate() {
        let kind = if i == 0 {
            BlockKind::Xattr
        } else {
            BlockKind::XattrData
        };
        w.meta_ok(b, kind)?;
    }
    // The block goes with the last attribute, so an empty one is damage.
    if e.xattr_list(rec).map_err(|err| err.to_string())?.is_empty() {
        return Err("an attribute block that holds no attributes".to_string());
    }
    if blocks.len() > 1 && e.superblock().incompat.get() & INCOMPAT_XATTR_INDEXED == 0 {
        let who = w.who(ino);
        w.problem(format!(
            "{who} has attributes in the indexed form, but the superblock does not say the \
             image uses it"
        ));
        w.fixes.push(Fix::EnableIndexedXattrs);
    }
    let mut claimed = Vec::new();
    for &b in &blocks {
        if !w.claim(b) {
            claimed.iter().for_each(|&c| w.release(c));
            return Err(format!("block {b} is owned twice"));
        }
        claimed.push(b);
    }
    Ok(blocks.len() as u64)
}

/// A size the contents contradict: a symlink whose size is not the length of its target (0,
/// too long, or covering NULs), a file larger than the format allows. With the fix: the
/// target's real length, the end of the file's last block, or (a symlink with no target at all)
/// freeing the inode, whose name then goes as an entry to a missing inode.
fn size_problem(e: &Engine, ino: u64, rec: &Inode) -> Option<(String, Fix)> {
    let size = rec.size.get();
    match rec.file_type() {
        libc::S_IFLNK => {
            let target: &[u8] = match e.data_run(rec, 0, SYMLINK_MAX as u64) {
                Ok(super::DataRun::Mapped(b)) => b,
                _ => &[],
            };
            let real = target.iter().position(|&b| b == 0).unwrap_or(target.len()) as u64;
            if size == real && size > 0 {
                return None;
            }
            let why = format!("symlink of size {size} but a target of {real} bytes");
            Some(if real > 0 {
                (why, Fix::SetSize(ino, real))
            } else {
                (why, Fix::FreeSlot(ino))
            })
        }
        libc::S_IFDIR | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK
            if size != 0 =>
        {
            Some((format!("size {size}, not 0"), Fix::SetSize(ino, 0)))
        }
        libc::S_IFREG if size > MAX_FILE_SIZE => {
            let mut last = None;
            let _ = e.tree_visit(rec.tree.get(), &mut |_, is_content, fblock| {
                if is_content {
                    last = last.max(Some(fblock));
                }
                Ok(())
            });
            let end = last.map_or(0, |b| (b + 1) * BLOCK_SIZE).min(MAX_FILE_SIZE);
            Some((
                format!("size {size} beyond the format's maximum of {MAX_FILE_SIZE}"),
                Fix::SetSize(ino, end),
            ))
        }
        _ => None,
    }
}

/// The kind of a directory's content block by its position.
fn dir_block_kind(fblock: u64) -> Option<BlockKind> {
    Some(if fblock < DIR_ENTRY_BLOCKS {
        BlockKind::DirEntries
    } else {
        BlockKind::DirIndex
    })
}

/// Runs the check; with `Repair`, fixes what it finds (the engine must be writable).
pub fn run(e: &Engine, mode: Mode) -> Result<Report> {
    if mode == Mode::Report {
        let mut report = check_once(e)?.0;
        // (A repair clears the mark once the image is clean.)
        if e.recovery().state == STATE_ERRORS {
            report.problems.insert(
                0,
                "the image is marked as damaged (errors were seen while it was used)".into(),
            );
        }
        return Ok(report);
    }
    let (mut found, mut repaired) = (Vec::new(), Vec::new());
    for _ in 0..REPAIR_ROUNDS {
        let (report, fixes) = check_once(e)?;
        if fixes.is_empty() {
            let mut report = report;
            report.found = found;
            report.repaired = repaired;
            return Ok(report);
        }
        found.extend(report.problems.iter().cloned());
        let (fixes, said): (Vec<Fix>, Vec<Option<String>>) = fixes.into_iter().unzip();
        for what in said.into_iter().flatten() {
            log::info!("fsck --repair: {what}");
            repaired.push(what);
        }
        e.forget_suspects();
        apply(e, fixes)?;
        e.commit_now()?;
    }
    let (mut report, _) = check_once(e)?;
    report.found = found;
    report.repaired = repaired;
    Ok(report)
}

/// One pass: the problems, and the fixes for them with what each does in words.
type Fixes = Vec<(Fix, Option<String>)>;

fn check_once(e: &Engine) -> Result<(Report, Fixes)> {
    // No operation runs while the image is checked (a live mount's included).
    let _quiet = e.quiesce();
    let sb = e.superblock();
    let total = sb.total_blocks.get();
    let mut w = Walk {
        e,
        txn: e.txm.durable(),
        total,
        owned: vec![0; total.div_ceil(64) as usize],
        problems: Vec::new(),
        fixes: Vec::new(),
        inodes: 0,
        directories: 0,
        paths: Vec::new(),
    };
    if e.image().len() < total * BLOCK_SIZE {
        w.problem(format!(
            "the file holds {} of the image's {total} blocks",
            e.image().len() / BLOCK_SIZE
        ));
    }
    if let Some(why) = e.other_slot_problem() {
        w.problem(why);
        w.fixes.push(Fix::Recommit);
    }
    w.claim(0);
    w.claim(1);
    // The space map and the inode table must be intact: without them nothing can be checked.
    let mut damaged = Vec::new();
    w.claim_tree(
        sb.space_tree.get(),
        &|_| Some(BlockKind::Bitmap),
        &mut damaged,
    )
    .map_err(|m| Error::corrupt(format!("space map: {m}")))?;
    for (_, why) in damaged.drain(..) {
        w.problem(format!("space map: {why}"));
    }
    for g in 0..total.div_ceil(GROUP_BLOCKS) {
        if e.tree_lookup(sb.space_tree.get(), g)?.is_none() {
            return Err(Error::corrupt(format!(
                "space map: bitmap of group {g} missing"
            )));
        }
    }
    // The slot count must end where the table's leaves do (a whole number of leaves).
    let claimed_slots = sb.itab_slots.get();
    let mut leaves = 0;
    while leaves < claimed_slots / INODES_PER_BLOCK
        && e.tree_lookup(sb.itab_tree.get(), leaves)?.is_some()
    {
        leaves += 1;
    }
    let slots = leaves * INODES_PER_BLOCK;
    if slots != claimed_slots {
        w.problem(format!(
            "superblock counts {claimed_slots} inode slots, the table holds {slots}"
        ));
        w.fixes.insert(0, Fix::SetItabSlots(slots));
    }
    w.claim_tree(
        sb.itab_tree.get(),
        &|_| Some(BlockKind::InodeTable),
        &mut damaged,
    )
    .map_err(|m| Error::corrupt(format!("inode table: {m}")))?;
    for (leaf, why) in damaged.drain(..) {
        w.problem(format!("inode table: {why}"));
        w.fixes.push(Fix::RewriteLeaf(leaf));
    }
    for leaf in 0..slots / INODES_PER_BLOCK {
        if e.tree_lookup(sb.itab_tree.get(), leaf)?.is_none() {
            return Err(Error::corrupt(format!("inode table leaf {leaf} missing")));
        }
    }

    // Pass 1: classify every inode slot.
    let mut state = vec![Slot::Free; slots as usize];
    for ino in 1..slots {
        match e.read_inode_raw(ino) {
            Ok(rec) if rec.is_free() => {}
            Ok(_) => state[ino as usize] = Slot::Used,
            Err(err) => {
                w.problem(format!("inode {ino}: {err}"));
                w.fixes.push(Fix::FreeSlot(ino));
                state[ino as usize] = Slot::Damaged;
            }
        }
    }
    if state.get(ROOT_INO as usize) != Some(&Slot::Used) {
        return Err(Error::corrupt("root directory inode is missing or damaged"));
    }
    if !e.read_inode(ROOT_INO)?.is_dir() {
        return Err(Error::corrupt("root inode is not a directory"));
    }
    // A broken list is rebuilt from the records; meanwhile an inode flagged as an orphan with
    // no links counts as one (it is not moved to /lost+found).
    let (orphans, orphan_list_broken): (BTreeSet<u64>, bool) = match e.orphans() {
        Ok(list) => (list.into_iter().collect(), false),
        Err(err) => {
            w.problem(format!("orphan list: {err}"));
            w.fixes.push(Fix::RebuildOrphans);
            (BTreeSet::new(), true)
        }
    };

    // Pass 2: walk the tree from the root, counting references.
    let mut refs = vec![0u32; slots as usize];
    let mut subdirs = vec![0u32; slots as usize];
    let mut reached = vec![false; slots as usize];
    w.paths = vec![None; slots as usize];
    w.paths[ROOT_INO as usize] = Some("/".to_string());
    let mut queue = VecDeque::from([ROOT_INO]);
    reached[ROOT_INO as usize] = true;
    // Directories and the entries of theirs that unreachable inodes may be linked under.
    let mut dir_entries: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    while let Some(dino) = queue.pop_front() {
        walk_dir(
            &mut w,
            dino,
            slots,
            &state,
            &mut refs,
            &mut subdirs,
            &mut reached,
            &mut queue,
        )?;
    }

    // Pass 3: per-inode checks.
    let mut unreachable = Vec::new();
    let mut max_generation = 0;
    for ino in 1..slots {
        let i = ino as usize;
        if state[i] != Slot::Used {
            continue;
        }
        let rec = e.read_inode(ino)?;
        if !reached[i] {
            let flagged = rec.flags.get() & INODE_FLAG_ORPHAN != 0;
            let listed = orphans.contains(&ino) || (orphan_list_broken && flagged);
            if listed && rec.nlink.get() == 0 {
                // Unlinked while open: recovery (the next mount) frees it.
            } else {
                w.problem(format!("inode {ino} is not reachable from the root"));
                unreachable.push(ino);
                if rec.is_dir() {
                    let mut children = Vec::new();
                    let _ = e.dir_for_each(&rec, 0, &mut |ent| {
                        children.push(ent.ino);
                        Ok(true)
                    });
                    dir_entries.insert(ino, children);
                }
            }
        } else if orphans.contains(&ino) {
            let who = w.who(ino);
            w.problem(format!("{who} is on the orphan list but has a name"));
            if !w.fixes.iter().any(|f| matches!(f, Fix::RebuildOrphans)) {
                w.fixes.push(Fix::RebuildOrphans);
            }
        }
        let kind: &dyn Fn(u64) -> Option<BlockKind> = if rec.is_dir() {
            &dir_block_kind
        } else {
            &|_| None
        };
        let tree_blocks = match w.claim_tree(rec.tree.get(), kind, &mut damaged) {
            Ok(n) => {
                if !damaged.is_empty() {
                    let who = w.who(ino);
                    for (_, why) in damaged.drain(..) {
                        w.problem(format!("{who}: {why}"));
                    }
                    if rec.is_dir() {
                        w.fixes.push(Fix::SalvageDir(ino));
                    } else {
                        w.fixes.push(Fix::RewriteTree(ino));
                    }
                }
                n
            }
            Err(m) => {
                let who = w.who(ino);
                w.problem(format!("{who}: contents: {m}"));
                w.fixes.push(Fix::DropTree(ino));
                0
            }
        };
        if let Some((msg, fix)) = size_problem(e, ino, &rec) {
            let who = w.who(ino);
            w.problem(format!("{who}: {msg}"));
            w.fixes.push(fix);
        }
        if let Some(msg) = unused_fields_problem(&rec) {
            let who = w.who(ino);
            w.problem(format!("{who}: {msg}"));
            w.fixes.push(Fix::ClearUnused(ino));
        }
        let flagged = rec.flags.get() & INODE_FLAG_ORPHAN != 0;
        if rec.next_free.get() != 0
            || (!flagged && (rec.orphan_next.get() != 0 || rec.orphan_prev.get() != 0))
        {
            let who = w.who(ino);
            w.problem(format!("{who} holds links of a list it is not on"));
            w.fixes.push(Fix::ClearListLinks(ino));
        }
        let nsecs = [
            rec.atime_nsec,
            rec.mtime_nsec,
            rec.ctime_nsec,
            rec.btime_nsec,
        ];
        if nsecs.iter().any(|ns| ns.get() > 999_999_999) {
            let who = w.who(ino);
            w.problem(format!("{who}: a timestamp has 10^9 or more nanoseconds"));
            w.fixes.push(Fix::ClampTimes(ino));
        }
        max_generation = max_generation.max(rec.generation.get());
        if ino == ROOT_INO && rec.parent.get() != ROOT_INO {
            w.problem(format!("the root directory records parent {}", rec.parent));
            w.fixes.push(Fix::SetParent(ROOT_INO, ROOT_INO));
        }
        if reached[i] && rec.flags.get() & INODE_FLAG_ORPHAN != 0 && !orphans.contains(&ino) {
            let who = w.who(ino);
            w.problem(format!(
                "{who} has a name but is flagged as unlinked while open"
            ));
            if !w.fixes.iter().any(|f| matches!(f, Fix::RebuildOrphans)) {
                w.fixes.push(Fix::RebuildOrphans);
            }
        }
        if let Some(msg) = extent_problem(e, &rec) {
            let who = w.who(ino);
            w.problem(format!("{who}: {msg}"));
            w.fixes.push(Fix::DropStray(ino));
        }
        let mut owned = tree_blocks;
        let xb = rec.xattr_block.get();
        if xb != 0 {
            match claim_xattrs(&mut w, e, ino, &rec) {
                Ok(n) => {
                    owned += n;
                    for (msg, fix) in acl_problems(e, ino, &rec) {
                        let who = w.who(ino);
                        w.problem(format!("{who}: {msg}"));
                        w.fixes.push(fix);
                    }
                }
                Err(why) => {
                    let who = w.who(ino);
                    w.problem(format!("{who}: extended attributes: {why}"));
                    w.fixes.push(Fix::DropXattr(ino));
                }
            }
        }
        if rec.blocks.get() != owned {
            let who = w.who(ino);
            w.problem(format!(
                "{who}: records {} blocks, owns {owned}",
                rec.blocks
            ));
            w.fixes.push(Fix::SetBlocks(ino, owned));
        }
        let expected_links = if rec.is_dir() {
            2 + subdirs[i]
        } else {
            refs[i]
        };
        if reached[i] && rec.nlink.get() != expected_links {
            let who = w.who(ino);
            w.problem(format!(
                "{who}: link count {} but {expected_links} references",
                rec.nlink
            ));
            w.fixes.push(Fix::SetLinks(ino, expected_links));
        }
        w.inodes += 1;
    }
    let next_generation = sb.next_generation.get();
    // (An inode at the largest number leaves nothing to raise the counter to.)
    if next_generation <= max_generation && max_generation < u64::MAX {
        w.problem(format!(
            "superblock's next generation number {next_generation} is not above the inodes' \
             ({max_generation})"
        ));
        w.fixes.push(Fix::SetNextGeneration(
            max_generation.checked_add(1).unwrap_or(1),
        ));
    }
    // Unreachable inodes go to /lost+found; only the tops of unreachable subtrees need a name.
    let inside: BTreeSet<u64> = dir_entries.values().flatten().copied().collect();
    for ino in unreachable {
        if !inside.contains(&ino) {
            w.fixes.push(Fix::ToLostFound(ino));
        }
    }

    // Pass 4: the free inode list.
    let free_slots = (1..slots)
        .filter(|&i| state[i as usize] == Slot::Free)
        .count() as u64;
    let mut listed = 0u64;
    let mut seen = vec![false; slots as usize];
    let mut cur = sb.free_inode_head.get();
    let mut list_ok = true;
    while cur != 0 {
        if cur >= slots || seen[cur as usize] || state[cur as usize] != Slot::Free {
            list_ok = false;
            break;
        }
        seen[cur as usize] = true;
        listed += 1;
        cur = match e.read_inode_raw(cur) {
            Ok(r) => r.next_free.get(),
            Err(_) => {
                list_ok = false;
                break;
            }
        };
    }
    let damaged = state.contains(&Slot::Damaged);
    if !list_ok || listed != free_slots || damaged {
        if !list_ok || listed != free_slots {
            w.problem(format!(
                "free inode list holds {listed} of {free_slots} free inodes or is broken"
            ));
        }
        // First: repairs that create /lost+found allocate from this list.
        w.fixes.insert(0, Fix::RebuildFreeList);
    }
    let used_inodes = (1..slots)
        .filter(|&i| state[i as usize] == Slot::Used)
        .count() as u64;

    // Pass 5: the bitmaps must mark exactly the owned blocks.
    let mut used_blocks = 0u64;
    let mut mark_used: Vec<(u64, u64)> = Vec::new();
    let mut mark_free: Vec<(u64, u64)> = Vec::new();
    let push = |v: &mut Vec<(u64, u64)>, b: u64| match v.last_mut() {
        Some((s, l)) if *s + *l == b => *l += 1,
        _ => v.push((b, 1)),
    };
    for g in 0..total.div_ceil(GROUP_BLOCKS) {
        let (first, end) = (g * GROUP_BLOCKS, ((g + 1) * GROUP_BLOCKS).min(total));
        let damaged = e.group_damaged(g);
        // Bits past the image's end must be 0: growing the image counts those blocks free.
        let mut past_end = 0;
        if !damaged {
            for b in end..(g + 1) * GROUP_BLOCKS {
                past_end += u64::from(e.in_use_now(b)?);
            }
        }
        if past_end > 0 {
            w.problem(format!(
                "the bitmap of group {g} marks {past_end} blocks past the image's end used"
            ));
        }
        if damaged || past_end > 0 {
            // Its bits cannot be compared: it is rewritten from ownership.
            let mut owned = Vec::new();
            for b in first..end {
                if w.is_owned(b) {
                    used_blocks += 1;
                    push(&mut owned, b);
                }
            }
            w.fixes.insert(0, Fix::RebuildBitmap(g, owned));
            continue;
        }
        for b in first..end {
            let owned = w.is_owned(b);
            used_blocks += u64::from(owned);
            let bit = e.in_use_now(b)?;
            if bit != owned {
                if owned {
                    push(&mut mark_used, b);
                } else {
                    push(&mut mark_free, b);
                }
            }
        }
    }
    let mismatched: u64 = mark_used.iter().chain(&mark_free).map(|r| r.1).sum();
    if mismatched > 0 {
        w.problem(format!(
            "bitmap disagrees with block ownership for {mismatched} blocks"
        ));
        w.fixes.insert(0, Fix::MarkUsed(mark_used));
        w.fixes.push(Fix::MarkFree(mark_free));
    }
    let free_blocks = total - used_blocks;
    let delta_free = free_blocks as i64 - sb.free_blocks.get() as i64;
    let delta_used = used_inodes as i64 - sb.used_inodes.get() as i64;
    if delta_free != 0 {
        w.problem(format!(
            "superblock counts {} free blocks, found {free_blocks}",
            sb.free_blocks
        ));
    }
    if delta_used != 0 {
        w.problem(format!(
            "superblock counts {} used inodes, found {used_inodes}",
            sb.used_inodes
        ));
    }
    if delta_free != 0 || delta_used != 0 {
        w.fixes.insert(
            0,
            Fix::Counters {
                free_blocks: delta_free,
                used_inodes: delta_used,
            },
        );
    }
    let report = Report {
        problems: std::mem::take(&mut w.problems),
        found: Vec::new(),
        repaired: Vec::new(),
        inodes: w.inodes,
        directories: w.directories,
        blocks_used: used_blocks,
    };
    let fixes = std::mem::take(&mut w.fixes);
    let fixes = fixes
        .into_iter()
        .map(|f| {
            let said = w.describe(&f);
            (f, said)
        })
        .collect();
    Ok((report, fixes))
}

/// Checks one reachable directory: its records, its index, and each entry's target.
#[allow(clippy::too_many_arguments)]
fn walk_dir(
    w: &mut Walk,
    dino: u64,
    slots: u64,
    state: &[Slot],
    refs: &mut [u32],
    subdirs: &mut [u32],
    reached: &mut [bool],
    queue: &mut VecDeque<u64>,
) -> Result<()> {
    let e = w.e;
    w.directories += 1;
    let dir = e.read_inode(dino)?;
    if dir.dir_hash_area.get() > 1 {
        let who = w.dir_who(dino);
        w.problem(format!("{who}: index area {} (0 or 1)", dir.dir_hash_area));
        // Before the index is rebuilt (the rebuild moves it to the other area).
        w.fixes.insert(0, Fix::ResetIndexArea(dino));
    }
    let mut entries = Vec::new();
    if let Err(err) = e.dir_for_each(&dir, 0, &mut |ent| {
        entries.push(ent);
        Ok(true)
    }) {
        let who = w.dir_who(dino);
        w.problem(format!("{who}: {err}"));
        w.fixes.push(Fix::SalvageDir(dino));
    } else {
        let layout = e
            .dir_layout_problems(&dir)
            .unwrap_or_else(|err| vec![err.to_string()]);
        for problem in &layout {
            let who = w.dir_who(dino);
            w.problem(format!("{who}: {problem}"));
        }
        if !layout.is_empty() {
            w.fixes.push(Fix::SalvageDir(dino));
        }
    }
    let mut index_ok = dir.dir_live.get() == entries.len() as u64;
    let mut names = BTreeSet::new();
    for ent in &entries {
        match e.dir_find(&dir, &ent.name) {
            Ok(Some(f)) if f.offset == ent.offset => {}
            _ => index_ok = false,
        }
        if !names.insert(ent.name.clone()) {
            let who = w.dir_who(dino);
            w.problem(format!(
                "{who}: name {:?} appears twice",
                String::from_utf8_lossy(&ent.name)
            ));
            w.fixes.push(Fix::DropEntry(dino, ent.name.clone()));
        }
    }
    if !index_ok {
        let who = w.dir_who(dino);
        w.problem(format!("{who}: name index does not match its entries"));
        w.fixes.push(Fix::Reindex(dino));
    }
    for ent in entries {
        let t = ent.ino;
        let name = String::from_utf8_lossy(&ent.name).into_owned();
        let valid = t < slots && state[t as usize] == Slot::Used;
        let target = if valid { e.read_inode(t).ok() } else { None };
        let bad = match &target {
            None => Some(format!("points at missing inode {t}")),
            Some(r) if r.is_dir() && reached[t as usize] => {
                Some(format!("is a second link to directory {t}"))
            }
            Some(r) if dtype_of_mode(r.mode.get()) != ent.kind => Some(format!(
                "records type {} for inode {t} of mode {:o}",
                ent.kind, r.mode
            )),
            Some(_) => None,
        };
        if let Some(msg) = bad {
            let who = w.dir_who(dino);
            w.problem(format!("{who}: entry {name:?} {msg}"));
            w.fixes.push(Fix::DropEntry(dino, ent.name));
            continue;
        }
        if !legal_name(&ent.name) {
            let who = w.dir_who(dino);
            w.problem(format!("{who}: entry {name:?} has an illegal name"));
            // A legal name no other entry of the directory has.
            let mut legal = format!("#illegal-{t}").into_bytes();
            let mut n = 1;
            while names.contains(&legal) {
                legal = format!("#illegal-{t}-{n}").into_bytes();
                n += 1;
            }
            names.insert(legal.clone());
            w.fixes
                .push(Fix::RenameEntry(dino, ent.name.clone(), legal));
        }
        refs[t as usize] += 1;
        if w.paths[t as usize].is_none() {
            let parent = w.paths[dino as usize].as_deref().unwrap_or("?");
            w.paths[t as usize] = Some(match parent {
                "/" => format!("/{name}"),
                p => format!("{p}/{name}"),
            });
        }
        if let Some(r) = target {
            reached[t as usize] = true;
            if r.is_dir() {
                subdirs[dino as usize] += 1;
                if r.parent.get() != dino {
                    let (who, parent) = (w.dir_who(t), w.dir_who(dino));
                    w.problem(format!(
                        "{who} is named in {parent} but records parent {}",
                        r.parent
                    ));
                    w.fixes.push(Fix::SetParent(t, dino));
                }
                queue.push_back(t);
            }
        }
    }
    Ok(())
}

/// Applies fixes in one transaction per fix (each is small and independent).
/// Inode flag bits with a meaning (the rest must be 0).
const KNOWN_FLAGS: u32 = INODE_FLAG_ORPHAN | INODE_FLAG_NOATIME | INODE_FLAG_NODUMP;

/// Values in fields the inode does not use: unknown flag bits, reserved bytes, and the
/// directory fields of an inode that is not a directory.
fn unused_fields_problem(rec: &Inode) -> Option<String> {
    let unknown = rec.flags.get() & !KNOWN_FLAGS;
    if unknown != 0 {
        return Some(format!("unknown flag bits {unknown:#x}"));
    }
    if rec.reserved.iter().any(|&b| b != 0) {
        return Some("reserved bytes are not 0".to_string());
    }
    let dir_fields = [
        rec.parent.get(),
        rec.dir_entries_end.get(),
        rec.dir_live.get(),
        rec.dir_tomb_bytes.get(),
        rec.dir_hash_cap.get(),
        rec.dir_hash_used.get(),
        u64::from(rec.dir_hash_area.get()),
    ];
    if !rec.is_dir() && dir_fields.iter().any(|&v| v != 0) {
        return Some("directory fields set on an inode that is not a directory".to_string());
    }
    None
}

/// What to do instead when `fix` finds the object too damaged to repair in place: a
/// directory or file whose tree cannot be read is emptied (its entries' inodes then go to
/// /lost+found), attributes that cannot be read are dropped.
fn fallback_of(fix: &Fix) -> Option<Fix> {
    match *fix {
        Fix::SalvageDir(d) | Fix::Reindex(d) | Fix::DropEntry(d, _) | Fix::RenameEntry(d, ..) => {
            Some(Fix::DropTree(d))
        }
        Fix::RewriteTree(ino) => Some(Fix::DropTree(ino)),
        Fix::DropAttr(ino, _) | Fix::AclFromMode(ino) => Some(Fix::DropXattr(ino)),
        _ => None,
    }
}

/// The inode a fix works on the contents of, if any: the one its fallback would empty.
fn contents_of(fix: &Fix) -> Option<u64> {
    match fallback_of(fix) {
        Some(Fix::DropTree(ino)) => Some(ino),
        _ => None,
    }
}

fn apply(e: &Engine, fixes: Vec<Fix>) -> Result<()> {
    // Contents about to be dropped need no salvage (reading them would fail anyway).
    let dropped: BTreeSet<u64> = fixes
        .iter()
        .filter_map(|f| match f {
            Fix::DropTree(ino) => Some(*ino),
            _ => None,
        })
        .collect();
    for fix in fixes {
        if contents_of(&fix).is_some_and(|ino| dropped.contains(&ino)) {
            continue;
        }
        let fallback = fallback_of(&fix);
        let r = {
            let tx = e.begin_delete(256)?;
            apply_one(e, &tx, fix)
        };
        match (r, fallback) {
            (Ok(()), _) => {}
            // The inode was freed by an earlier fix of this round: nothing left to repair.
            (Err(Error::NotFound), _) => {}
            (Err(Error::Corrupt(why)), Some(instead)) => {
                log::warn!("fsck --repair: {why}; {instead:?} instead");
                let tx = e.begin_delete(256)?;
                apply_one(e, &tx, instead)?;
            }
            (Err(err), _) => return Err(err),
        }
    }
    Ok(())
}

fn apply_one(e: &Engine, tx: &super::Tx, fix: Fix) -> Result<()> {
    {
        match fix {
            Fix::Counters {
                free_blocks,
                used_inodes,
            } => {
                e.adjust_free_blocks(free_blocks);
                e.adjust_used_inodes(used_inodes);
            }
            Fix::RebuildBitmap(g, used) => e.rewrite_bitmap(g, &used)?,
            // The round's commit writes the slot the state is not in.
            Fix::Recommit => e.mark_superblock_dirty(),
            Fix::EnableIndexedXattrs => e.enable_incompat(INCOMPAT_XATTR_INDEXED),
            Fix::ClearListLinks(ino) => e.clear_list_links(tx, ino)?,
            Fix::ClampTimes(ino) => with_inode(e, tx, ino, |rec| {
                for ns in [
                    &mut rec.atime_nsec,
                    &mut rec.mtime_nsec,
                    &mut rec.ctime_nsec,
                    &mut rec.btime_nsec,
                ] {
                    *ns = ns.get().min(999_999_999).into();
                }
            })?,
            Fix::SetNextGeneration(n) => e.set_next_generation(n),
            Fix::MarkUsed(ranges) => {
                for (s, l) in ranges {
                    e.mark_used(s, l);
                }
            }
            Fix::MarkFree(ranges) => {
                for (s, l) in ranges {
                    super::pager::Blocks::free(&mut tx.blocks(), s, l)?;
                }
            }
            Fix::FreeSlot(ino) => {
                let mut free = Inode::new_zeroed();
                e.overwrite_record(tx, ino, &mut free)?;
            }
            Fix::DropTree(ino) => with_inode(e, tx, ino, |rec| {
                rec.tree = 0.into();
                rec.size = 0.into();
                if rec.is_dir() {
                    let parent = rec.parent.get();
                    e.dir_init(rec, parent);
                }
            })?,
            Fix::DropXattr(ino) => with_inode(e, tx, ino, |rec| rec.xattr_block = 0.into())?,
            Fix::DropAttr(ino, name) => {
                let mut rec = e.read_inode(ino)?;
                e.xattr_remove(tx, &mut rec, &name)?;
                e.write_inode(tx, ino, &mut rec)?;
            }
            Fix::AclFromMode(ino) => {
                let mut rec = e.read_inode(ino)?;
                let mut a = Acl::parse(&e.xattr_get(&rec, acl::ACCESS)?)?;
                a.chmod(rec.mode.get());
                e.xattr_set(tx, &mut rec, acl::ACCESS, &a.encode(), SetMode::Replace)?;
                e.write_inode(tx, ino, &mut rec)?;
            }
            Fix::SetBlocks(ino, n) => with_inode(e, tx, ino, |rec| rec.blocks = n.into())?,
            Fix::SetLinks(ino, n) => with_inode(e, tx, ino, |rec| rec.nlink = n.into())?,
            Fix::SetSize(ino, n) => with_inode(e, tx, ino, |rec| rec.size = n.into())?,
            Fix::SetParent(ino, p) => with_inode(e, tx, ino, |rec| rec.parent = p.into())?,
            Fix::ClearUnused(ino) => with_inode(e, tx, ino, |rec| {
                rec.flags = (rec.flags.get() & KNOWN_FLAGS).into();
                rec.reserved = [0; 64];
                if !rec.is_dir() {
                    e.dir_init(rec, 0);
                }
            })?,
            Fix::SalvageDir(dino) => {
                let mut dir = e.read_inode(dino)?;
                e.dir_salvage(tx, &mut dir)?;
                e.dir_reindex(tx, &mut dir)?;
                e.write_inode(tx, dino, &mut dir)?;
            }
            Fix::Reindex(dino) => {
                let mut dir = e.read_inode(dino)?;
                e.dir_reindex(tx, &mut dir)?;
                e.write_inode(tx, dino, &mut dir)?;
            }
            Fix::DropEntry(dino, name) => {
                let mut dir = e.read_inode(dino)?;
                match e.dir_remove(tx, &mut dir, &name) {
                    Ok(_) | Err(Error::NotFound) => {}
                    Err(err) => return Err(err),
                }
                e.write_inode(tx, dino, &mut dir)?;
            }
            Fix::RenameEntry(dino, from, to) => {
                let mut dir = e.read_inode(dino)?;
                if let Some((ino, kind)) = e.dir_lookup(&dir, &from)? {
                    // The new name first, so the directory never counts zero entries between.
                    e.dir_insert(tx, &mut dir, &to, ino, kind)?;
                    e.dir_remove(tx, &mut dir, &from)?;
                    e.write_inode(tx, dino, &mut dir)?;
                }
            }
            Fix::ToLostFound(ino) => to_lost_found(e, tx, ino)?,
            Fix::RebuildFreeList => e.rebuild_free_list(tx)?,
            Fix::SetItabSlots(n) => e.set_itab_slots(n),
            Fix::RebuildOrphans => e.rebuild_orphan_list(tx)?,
            Fix::DropStray(ino) => {
                let mut rec = e.read_inode(ino)?;
                let mut tree = rec.tree.get();
                let mut blocks = rec.blocks.get();
                let keep: Vec<(u64, u64)> = match rec.file_type() {
                    libc::S_IFLNK => vec![(0, 1)],
                    libc::S_IFDIR => {
                        let area = dir_index_area_block(rec.dir_hash_area.get());
                        let index = rec.dir_hash_cap.get().div_ceil(DIR_INDEX_SLOTS_PER_BLOCK);
                        vec![
                            (0, rec.dir_entries_end.get().div_ceil(BLOCK_SIZE)),
                            (area, area + index),
                        ]
                    }
                    _ => return Ok(()),
                };
                // Free the gaps between the ranges kept (they are in ascending order).
                let mut from = 0;
                for (start, end) in keep.into_iter().chain([(u64::MAX, u64::MAX)]) {
                    if start > from {
                        e.tree_free_range(&mut tx.blocks(), &mut tree, from, start, &mut blocks)?;
                    }
                    from = from.max(end);
                }
                rec.tree = tree.into();
                rec.blocks = blocks.into();
                e.write_inode(tx, ino, &mut rec)?;
            }
            Fix::ResetIndexArea(d) => with_inode(e, tx, d, |rec| rec.dir_hash_area = 0.into())?,
            Fix::RewriteLeaf(leaf) => e.rewrite_itab_leaf(tx, leaf)?,
            Fix::RewriteTree(ino) => {
                let mut rec = e.read_inode(ino)?;
                e.rewrite_tree(tx, &mut rec)?;
                e.write_inode(tx, ino, &mut rec)?;
            }
        }
    }
    Ok(())
}

fn with_inode(e: &Engine, tx: &super::Tx, ino: u64, f: impl FnOnce(&mut Inode)) -> Result<()> {
    let mut rec = e.read_inode(ino)?;
    f(&mut rec);
    e.write_inode(tx, ino, &mut rec)
}

/// Links an unreachable inode into `/lost+found` as `#INO` (made on demand).
fn to_lost_found(e: &Engine, tx: &super::Tx, ino: u64) -> Result<()> {
    let mut root = e.read_inode(ROOT_INO)?;
    let lf = match e.dir_lookup(&root, LOST_FOUND)? {
        Some((lf, libc::DT_DIR)) => lf,
        Some(_) => return Err(Error::corrupt("/lost+found is not a directory")),
        None => {
            let (lf, mut rec) = e.alloc_inode(
                tx,
                &super::NewInode {
                    mode: libc::S_IFDIR | 0o700,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                },
            )?;
            e.dir_init(&mut rec, ROOT_INO);
            rec.nlink = 2.into();
            e.write_inode(tx, lf, &mut rec)?;
            e.dir_insert(tx, &mut root, LOST_FOUND, lf, libc::DT_DIR)?;
            root.nlink = (root.nlink.get() + 1).into();
            e.write_inode(tx, ROOT_INO, &mut root)?;
            lf
        }
    };
    let mut dir = e.read_inode(lf)?;
    let mut rec = e.read_inode(ino)?;
    let name = format!("#{ino}");
    if e.dir_lookup(&dir, name.as_bytes())?.is_some() {
        return Ok(());
    }
    e.dir_insert(
        tx,
        &mut dir,
        name.as_bytes(),
        ino,
        dtype_of_mode(rec.mode.get()),
    )?;
    if rec.is_dir() {
        rec.parent = lf.into();
        dir.nlink = (dir.nlink.get() + 1).into();
    } else if rec.nlink.get() == 0 {
        rec.nlink = 1.into();
    }
    e.write_inode(tx, ino, &mut rec)?;
    e.write_inode(tx, lf, &mut dir)
}
