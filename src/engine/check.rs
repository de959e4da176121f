//! Consistency check (`mmapfs fsck`) and crash recovery (the same walk with repairs, run at
//! mount when the image was not cleanly unmounted).
//!
//! Invariants checked:
//! 1. The superblock is sane (done at open) and its counters match reality.
//! 2. Every inode record's checksum is valid.
//! 3. Every block is free in the bitmap, or owned exactly once (superblock, a group bitmap, the
//!    inode table's tree, an inode's tree or xattr block); the bitmap marks exactly the owned.
//! 4. An inode's `blocks` equals the blocks its tree and xattr block own.
//! 5. Directory entries point at used inodes of the recorded type; every entry is found
//!    through the directory's name index; `dir_live` counts the entries; a directory is
//!    referenced by exactly one entry, in the directory its `parent` names.
//! 6. Link counts equal the references from directories (2 + subdirectories for a directory).
//! 7. Every used inode is reachable from the root. (An unlinked file still open at a crash is
//!    unreachable: recovery frees it, as a clean unmount would have.)
//! 8. The free-inode list holds exactly the free inode slots, without loops.
//!
//! Recovery repairs by recomputing: unreachable and damaged inodes are freed, link counts and
//! indexes are rebuilt, and the bitmap, free list and counters are rewritten from what survives.

use std::collections::VecDeque;

use zerocopy::FromZeros;

use super::{Engine, alloc};
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
    pub repaired: Vec<String>,
    pub inodes: u64,
    pub directories: u64,
    pub blocks_used: u64,
}

/// Problems beyond this count are summarised, so a badly damaged image gives a readable list.
const MAX_LISTED: usize = 200;

struct Walk<'a> {
    e: &'a Engine,
    mode: Mode,
    report: Report,
    total: u64,
    owned: Vec<u64>,
}

impl Walk<'_> {
    fn problem(&mut self, msg: String) {
        if self.mode == Mode::Repair {
            if self.report.repaired.len() < MAX_LISTED {
                self.report.repaired.push(msg);
            }
        } else if self.report.problems.len() < MAX_LISTED {
            self.report.problems.push(msg);
        } else if self.report.problems.len() == MAX_LISTED {
            self.report
                .problems
                .push("... (more problems not listed)".into());
        }
    }

    /// Claims a block; false if it is out of range or already owned.
    fn claim(&mut self, block: u64) -> bool {
        if block >= self.total {
            return false;
        }
        let (w, b) = ((block / 64) as usize, block % 64);
        if self.owned[w] & (1 << b) != 0 {
            return false;
        }
        self.owned[w] |= 1 << b;
        true
    }

    fn release(&mut self, block: u64) {
        if block < self.total {
            self.owned[(block / 64) as usize] &= !(1 << (block % 64));
        }
    }

    /// Claims all blocks of a tree; on conflict releases what it claimed and returns an error
    /// message. Returns the number of blocks on success.
    fn claim_tree(&mut self, packed: u64) -> std::result::Result<u64, String> {
        let mut claimed = Vec::new();
        let mut conflict = None;
        let r = self.e.tree_visit(packed, &mut |block, _, _| {
            claimed.push(block);
            Ok(())
        });
        if let Err(e) = r {
            return Err(format!("{e}"));
        }
        for &b in &claimed {
            if !self.claim(b) {
                conflict = Some(b);
                break;
            }
        }
        if let Some(b) = conflict {
            for &c in claimed.iter().take_while(|&&c| c != b) {
                self.release(c);
            }
            return Err(format!("block {b} is owned twice"));
        }
        Ok(claimed.len() as u64)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Used,
    Damaged,
}

/// Sizes against extents: a symlink holds its target in block 0 only, 1..=SYMLINK_MAX bytes; a
/// directory's blocks lie below `dir_entries_end` or inside its current index. (Regular files
/// may own blocks past EOF: fallocate with KEEP_SIZE.)
fn extent_problem(e: &Engine, rec: &Inode) -> Result<Option<String>> {
    let mut data_blocks = Vec::new();
    e.tree_visit(rec.tree.get(), &mut |_, is_data, fblock| {
        if is_data {
            data_blocks.push(fblock);
        }
        Ok(())
    })
    .ok();
    match rec.file_type() {
        libc::S_IFLNK => {
            let size = rec.size.get();
            if size == 0 || size > SYMLINK_MAX as u64 {
                return Ok(Some(format!("symlink of size {size}")));
            }
            if let Some(fb) = data_blocks.iter().find(|&&fb| fb > 0) {
                return Ok(Some(format!("symlink owns file block {fb}")));
            }
        }
        libc::S_IFDIR => {
            let entries_blocks = rec.dir_entries_end.get().div_ceil(BLOCK_SIZE);
            let area = dir_hash_area_offset(rec.dir_hash_area.get()) / BLOCK_SIZE;
            let index_blocks = (rec.dir_hash_cap.get() * 8).div_ceil(BLOCK_SIZE);
            for &fb in &data_blocks {
                let in_entries = fb < entries_blocks;
                let in_index = fb >= area && fb < area + index_blocks;
                if !in_entries && !in_index {
                    return Ok(Some(format!(
                        "directory owns file block {fb} outside its entries ({entries_blocks} \
                         blocks) and index"
                    )));
                }
            }
        }
        _ => {}
    }
    Ok(None)
}

pub fn run(e: &Engine, mode: Mode) -> Result<Report> {
    let sb = e.superblock();
    let total = e.total_blocks();
    let mut w = Walk {
        e,
        mode,
        report: Report::default(),
        total,
        owned: vec![0; total.div_ceil(64) as usize],
    };
    if sb.total_blocks.get() != total {
        w.problem(format!(
            "superblock total_blocks {} but the image has {total}",
            sb.total_blocks
        ));
    }
    w.claim(0);
    for g in 0..total.div_ceil(GROUP_BLOCKS) {
        if !w.claim(bitmap_block(g)) {
            return Err(Error::corrupt(format!(
                "group {g} bitmap block out of range"
            )));
        }
    }
    // The inode table must be intact: without it nothing can be found.
    let itab = sb.itab_tree.get();
    let slots = sb.itab_slots.get();
    w.claim_tree(itab)
        .map_err(|m| Error::corrupt(format!("inode table: {m}")))?;
    for fb in 0..slots / INODES_PER_BLOCK {
        if e.tree_lookup(itab, fb)?.is_none() {
            return Err(Error::corrupt(format!("inode table block {fb} missing")));
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
                state[ino as usize] = Slot::Damaged;
            }
        }
    }
    if state.get(ROOT_INO as usize) != Some(&Slot::Used) {
        return Err(Error::corrupt("root directory inode is missing or damaged"));
    }
    let root = e.read_inode(ROOT_INO)?;
    if !root.is_dir() {
        return Err(Error::corrupt("root inode is not a directory"));
    }

    // Pass 2: walk the tree from the root, counting references.
    let mut refs = vec![0u32; slots as usize];
    let mut subdirs = vec![0u32; slots as usize];
    let mut reached = vec![false; slots as usize];
    let mut queue = VecDeque::from([ROOT_INO]);
    reached[ROOT_INO as usize] = true;
    while let Some(dino) = queue.pop_front() {
        w.report.directories += 1;
        let mut dir = e.read_inode(dino)?;
        let mut entries = Vec::new();
        let walk_result = e.dir_for_each(&dir, 0, &mut |ent| {
            entries.push(ent);
            Ok(true)
        });
        let mut dir_changed = false;
        if let Err(err) = walk_result {
            w.problem(format!("directory {dino}: {err}"));
            if mode == Mode::Repair {
                let cut = e.dir_salvage(&mut dir)?;
                w.problem(format!(
                    "directory {dino}: cut out {cut} damaged entry record(s)"
                ));
                entries.clear();
                e.dir_for_each(&dir, 0, &mut |ent| {
                    entries.push(ent);
                    Ok(true)
                })?;
                e.dir_reindex(&mut dir)?;
                dir_changed = true;
            }
        }
        let mut index_ok = dir.dir_live.get() == entries.len() as u64;
        for ent in &entries {
            match e.dir_find(&dir, &ent.name) {
                Ok(Some(f)) if f.offset == ent.offset => {}
                _ => index_ok = false,
            }
        }
        if !index_ok {
            w.problem(format!(
                "directory {dino}: name index does not match its entries"
            ));
            if mode == Mode::Repair {
                e.dir_reindex(&mut dir)?;
                dir_changed = true;
            }
        }
        for ent in entries {
            let t = ent.ino;
            let name = String::from_utf8_lossy(&ent.name).into_owned();
            let valid = t < slots && state[t as usize] == Slot::Used;
            let target = if valid { e.read_inode(t).ok() } else { None };
            let bad = match &target {
                None => Some(format!("points at missing inode {t}")),
                Some(r) if r.is_dir() && (reached[t as usize] || r.parent.get() != dino) => {
                    Some(format!("is a second link to directory {t}"))
                }
                Some(r) if dtype_of_mode(r.mode.get()) != ent.kind => Some(format!(
                    "records type {} for inode {t} of mode {:o}",
                    ent.kind, r.mode
                )),
                Some(_) => None,
            };
            if let Some(msg) = bad {
                w.problem(format!("directory {dino} entry {name:?} {msg}"));
                if mode == Mode::Repair {
                    e.dir_remove(&mut dir, &ent.name)?;
                    dir_changed = true;
                }
                continue;
            }
            refs[t as usize] += 1;
            if let Some(r) = target {
                if r.is_dir() {
                    subdirs[dino as usize] += 1;
                    reached[t as usize] = true;
                    queue.push_back(t);
                } else {
                    reached[t as usize] = true;
                }
            }
        }
        if dir_changed {
            e.write_inode(dino, &mut dir)?;
        }
    }

    // Pass 3: per-inode checks, freeing what is unreachable or damaged.
    for ino in 1..slots {
        let i = ino as usize;
        match state[i] {
            Slot::Free => continue,
            Slot::Damaged => {
                if mode == Mode::Repair {
                    let mut free = Inode::new_zeroed();
                    e.write_inode(ino, &mut free)?;
                    state[i] = Slot::Free;
                }
                continue;
            }
            Slot::Used => {}
        }
        let mut rec = e.read_inode(ino)?;
        if !reached[i] {
            w.problem(format!("inode {ino} is not reachable from the root"));
            if mode == Mode::Repair {
                let mut free = Inode::new_zeroed();
                e.write_inode(ino, &mut free)?;
                state[i] = Slot::Free;
                continue;
            }
        }
        let mut changed = false;
        let tree_blocks = match w.claim_tree(rec.tree.get()) {
            Ok(n) => n,
            Err(m) => {
                w.problem(format!("inode {ino}: data tree: {m}"));
                if mode == Mode::Repair {
                    rec.tree = 0.into();
                    rec.size = 0.into();
                    changed = true;
                }
                0
            }
        };
        if let Some(msg) = extent_problem(e, &rec)? {
            w.problem(format!("inode {ino}: {msg}"));
        }
        let mut owned = tree_blocks;
        let xb = rec.xattr_block.get();
        if xb != 0 {
            if e.xattr_validate(&rec).is_ok() && w.claim(xb) {
                owned += 1;
            } else {
                w.problem(format!(
                    "inode {ino}: xattr block {xb} invalid or owned twice"
                ));
                if mode == Mode::Repair {
                    rec.xattr_block = 0.into();
                    changed = true;
                }
            }
        }
        if rec.blocks.get() != owned {
            w.problem(format!(
                "inode {ino}: records {} blocks, owns {owned}",
                rec.blocks
            ));
            rec.blocks = owned.into();
            changed = true;
        }
        let expected_links = if rec.is_dir() {
            2 + subdirs[i]
        } else {
            refs[i]
        };
        if reached[i] && rec.nlink.get() != expected_links {
            w.problem(format!(
                "inode {ino}: link count {} but {expected_links} references",
                rec.nlink
            ));
            rec.nlink = expected_links.into();
            changed = true;
        }
        if changed && mode == Mode::Repair {
            e.write_inode(ino, &mut rec)?;
        }
        w.report.inodes += 1;
    }

    // Pass 4: free inode list.
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
            Ok(r) => r.next_link.get(),
            Err(_) => {
                list_ok = false;
                break;
            }
        };
    }
    if !list_ok || listed != free_slots {
        w.problem(format!(
            "free inode list holds {listed} of {free_slots} free inodes or is broken"
        ));
    }
    let used_inodes = (1..slots)
        .filter(|&i| state[i as usize] == Slot::Used)
        .count() as u64;
    if sb.used_inodes.get() != used_inodes {
        w.problem(format!(
            "superblock counts {} used inodes, found {used_inodes}",
            sb.used_inodes
        ));
    }

    // Pass 5: the bitmap must mark exactly the owned blocks.
    let mut used_blocks = 0u64;
    let mut mismatched = 0u64;
    for b in 0..total {
        let owned = w.owned[(b / 64) as usize] & (1 << (b % 64)) != 0;
        used_blocks += u64::from(owned);
        if alloc::get_bit(e.image(), b)? != owned {
            mismatched += 1;
            if mode == Mode::Repair {
                alloc::set_bit(e.image(), b, owned)?;
            }
        }
    }
    if mismatched > 0 {
        w.problem(format!(
            "bitmap disagrees with block ownership for {mismatched} blocks"
        ));
    }
    let free_blocks = total - used_blocks;
    if sb.free_blocks.get() != free_blocks {
        w.problem(format!(
            "superblock counts {} free blocks, found {free_blocks}",
            sb.free_blocks
        ));
    }
    w.report.blocks_used = used_blocks;

    if mode == Mode::Repair {
        // Rebuild the free inode list (descending, so low numbers are reused first).
        let mut head = 0u64;
        for ino in (1..slots).rev() {
            if state[ino as usize] == Slot::Free {
                let mut rec = Inode::new_zeroed();
                rec.next_link = head.into();
                e.write_inode(ino, &mut rec)?;
                head = ino;
            }
        }
        e.update_sb(|sb| {
            sb.free_inode_head = head.into();
            sb.used_inodes = used_inodes.into();
            sb.free_blocks = free_blocks.into();
            sb.total_blocks = total.into();
        })?;
        e.img.sync_all()?;
    }
    Ok(w.report)
}
