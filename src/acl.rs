//! POSIX ACLs in the form the kernel hands them to FUSE (`system.posix_acl_access` and
//! `system.posix_acl_default`: a 4-byte version, then 8-byte entries of tag, permissions and
//! id, little-endian), and the rules that tie them to the mode bits. With the FUSE POSIX ACL
//! capability the kernel parses, caches and enforces ACLs; the filesystem keeps them, keeps
//! the mode in step with them and gives new files their directory's default ACL. The rules
//! are the kernel's own (`fs/posix_acl.c`), so files behave as on ext4 and tmpfs.

use crate::error::{Error, Result};

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const HEADER: usize = 4;
const ENTRY: usize = 8;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A valid ACL: entries in the kernel's order (owner, named users by id, owning group, named
/// groups by id, mask, other), each permission within `rwx`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl(Vec<Entry>);

impl Acl {
    /// Parses and validates an ACL as `posix_acl_valid` does; `EINVAL` otherwise.
    pub fn parse(bytes: &[u8]) -> Result<Acl> {
        if bytes.len() < HEADER || !(bytes.len() - HEADER).is_multiple_of(ENTRY) {
            return Err(Error::Invalid);
        }
        if u32::from_le_bytes(bytes[..4].try_into().unwrap()) != VERSION {
            return Err(Error::NotSupported);
        }
        let entries: Vec<Entry> = bytes[HEADER..]
            .chunks_exact(ENTRY)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes(e[4..8].try_into().unwrap()),
            })
            .collect();
        // The order of tags is a state machine; named entries are sorted by id, no duplicates.
        let mut stage: Option<u8> = None;
        let mut last_id: Option<u32> = None;
        let mut named = false;
        let mut mask = false;
        for e in &entries {
            if e.perm & !7 != 0 {
                return Err(Error::Invalid);
            }
            let s = match e.tag {
                USER_OBJ => 0,
                USER => 1,
                GROUP_OBJ => 2,
                GROUP => 3,
                MASK => 4,
                OTHER => 5,
                _ => return Err(Error::Invalid),
            };
            let repeatable = s == 1 || s == 3;
            match stage {
                Some(prev) if s < prev || (s == prev && !repeatable) => {
                    return Err(Error::Invalid);
                }
                Some(prev) if s == prev => {}
                _ => last_id = None,
            }
            if repeatable {
                if last_id.is_some_and(|l| e.id <= l) {
                    return Err(Error::Invalid);
                }
                last_id = Some(e.id);
                named = true;
            }
            mask |= s == 4;
            stage = Some(s);
        }
        let has = |t: u16| entries.iter().any(|e| e.tag == t);
        if !(has(USER_OBJ) && has(GROUP_OBJ) && has(OTHER)) || (named && !mask) {
            return Err(Error::Invalid);
        }
        Ok(Acl(entries))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.0.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.0 {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// Whether the mode bits say everything the ACL says (only owner, group and other): such
    /// an access ACL is not stored (`posix_acl_equiv_mode`).
    pub fn is_minimal(&self) -> bool {
        self.0
            .iter()
            .all(|e| matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
    }

    fn perm(&self, tag: u16) -> Option<u32> {
        self.0
            .iter()
            .find(|e| e.tag == tag)
            .map(|e| u32::from(e.perm))
    }

    /// The permission bits (`rwxrwxrwx`) an access ACL gives the mode: the group bits are the
    /// mask when there is one.
    pub fn mode_bits(&self) -> u32 {
        let group = self.perm(MASK).or(self.perm(GROUP_OBJ)).unwrap_or(0);
        self.perm(USER_OBJ).unwrap_or(0) << 6 | group << 3 | self.perm(OTHER).unwrap_or(0)
    }

    /// Whether the ACL grants `want` (`rwx` bits) to a caller who is not the file's owner
    /// (the owner's entry is the mode's, checked before): the first named user entry matching
    /// the caller, else any matching group entry that grants all of `want` (limited by the
    /// mask), else "other" when no group entry matched (`posix_acl_permission`).
    pub fn grants(
        &self,
        uid: u32,
        owning_group: u32,
        in_group: &dyn Fn(u32) -> bool,
        want: u32,
    ) -> bool {
        let want = want & 7;
        let mask = self.perm(MASK).unwrap_or(7);
        let masked = |perm: u16| u32::from(perm) & mask & want == want;
        let mut group_matched = false;
        for e in &self.0 {
            match e.tag {
                USER if e.id == uid => return masked(e.perm),
                GROUP_OBJ | GROUP => {
                    let gid = if e.tag == GROUP_OBJ {
                        owning_group
                    } else {
                        e.id
                    };
                    if in_group(gid) {
                        if u32::from(e.perm) & want == want {
                            return masked(e.perm);
                        }
                        group_matched = true;
                    }
                }
                OTHER => return !group_matched && u32::from(e.perm) & want == want,
                _ => {}
            }
        }
        false
    }

    /// chmod: the owner, mask (or owning group) and other entries take the new mode's bits
    /// (`posix_acl_chmod`).
    pub fn chmod(&mut self, mode: u32) {
        let has_mask = self.perm(MASK).is_some();
        for e in &mut self.0 {
            let bits = match e.tag {
                USER_OBJ => mode >> 6,
                MASK => mode >> 3,
                GROUP_OBJ if !has_mask => mode >> 3,
                OTHER => mode,
                _ => continue,
            };
            e.perm = (bits & 7) as u16;
        }
    }

    /// A new file's access ACL from its directory's default ACL: every class entry is limited
    /// by the creation mode, and the mode by the ACL (`posix_acl_create_masq`). Returns the new
    /// permission bits.
    pub fn create_masq(&mut self, mode: u32) -> u32 {
        let has_mask = self.perm(MASK).is_some();
        let mut mode = mode & 0o777;
        for e in &mut self.0 {
            let shift = match e.tag {
                USER_OBJ => 6,
                MASK => 3,
                GROUP_OBJ if !has_mask => 3,
                OTHER => 0,
                _ => continue,
            };
            e.perm &= ((mode >> shift) & 7) as u16;
            mode &= !(0o7 << shift) | u32::from(e.perm) << shift;
        }
        mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        Acl(entries
            .iter()
            .map(|&(tag, perm, id)| Entry { tag, perm, id })
            .collect())
        .encode()
    }

    const ANY: u32 = u32::MAX;

    #[test]
    fn validates_like_the_kernel() {
        let base = [(USER_OBJ, 7, ANY), (GROUP_OBJ, 5, ANY), (OTHER, 0, ANY)];
        assert!(Acl::parse(&acl(&base)).unwrap().is_minimal());
        let named = [
            (USER_OBJ, 7, ANY),
            (USER, 6, 1000),
            (USER, 4, 1001),
            (GROUP_OBJ, 5, ANY),
            (GROUP, 1, 50),
            (MASK, 7, ANY),
            (OTHER, 0, ANY),
        ];
        let a = Acl::parse(&acl(&named)).unwrap();
        assert!(!a.is_minimal());
        assert_eq!(a.encode(), acl(&named));
        // Named entries need a mask; order, duplicates, bad bits and sizes are refused.
        let bad: [&[(u16, u16, u32)]; 6] = [
            &named[..5],
            &[(GROUP_OBJ, 5, ANY), (USER_OBJ, 7, ANY), (OTHER, 0, ANY)],
            &[
                (USER_OBJ, 7, ANY),
                (USER, 6, 9),
                (USER, 6, 9),
                (GROUP_OBJ, 5, ANY),
                (MASK, 7, ANY),
                (OTHER, 0, ANY),
            ],
            &[(USER_OBJ, 8, ANY), (GROUP_OBJ, 5, ANY), (OTHER, 0, ANY)],
            &[(USER_OBJ, 7, ANY), (OTHER, 0, ANY)],
            &[
                (USER_OBJ, 7, ANY),
                (GROUP_OBJ, 5, ANY),
                (0x40, 0, ANY),
                (OTHER, 0, ANY),
            ],
        ];
        for b in bad {
            assert!(matches!(Acl::parse(&acl(b)), Err(Error::Invalid)), "{b:?}");
        }
        assert!(matches!(Acl::parse(&acl(&base)[..10]), Err(Error::Invalid)));
        let mut v1 = acl(&base);
        v1[0] = 1;
        assert!(matches!(Acl::parse(&v1), Err(Error::NotSupported)));
    }

    #[test]
    fn mode_follows_the_mask() {
        let mut a = Acl::parse(&acl(&[
            (USER_OBJ, 6, ANY),
            (USER, 7, 1000),
            (GROUP_OBJ, 4, ANY),
            (MASK, 5, ANY),
            (OTHER, 1, ANY),
        ]))
        .unwrap();
        assert_eq!(a.mode_bits(), 0o651);
        a.chmod(0o704);
        assert_eq!(a.mode_bits(), 0o704);
        assert_eq!(
            a.perm(GROUP_OBJ),
            Some(4),
            "the owning group keeps its entry"
        );
        assert_eq!(a.perm(USER), Some(7), "named entries are kept");
    }

    #[test]
    fn creation_masks_both_ways() {
        let default = acl(&[
            (USER_OBJ, 7, ANY),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, ANY),
            (MASK, 7, ANY),
            (OTHER, 5, ANY),
        ]);
        let mut a = Acl::parse(&default).unwrap();
        // open(O_CREAT, 0666): the x bits of the ACL go, the mode keeps what the ACL allows.
        assert_eq!(a.create_masq(0o666), 0o664);
        assert_eq!(a.mode_bits(), 0o664);
        assert_eq!(
            a.perm(USER),
            Some(7),
            "a named entry is limited by the mask only"
        );
        let mut m = Acl::parse(&acl(&[
            (USER_OBJ, 6, ANY),
            (GROUP_OBJ, 0, ANY),
            (OTHER, 4, ANY),
        ]))
        .unwrap();
        assert_eq!(m.create_masq(0o777), 0o604);
    }
}
