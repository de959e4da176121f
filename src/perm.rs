//! Permission checks for mounts without the kernel's `default_permissions`
//! (`-o no_default_permissions`), where the kernel leaves them to the daemon. The rules are the
//! kernel's own, so that files behave as on tmpfs: `generic_permission` with POSIX ACLs
//! (fs/namei.c), the sticky bit (`check_sticky`), `setattr_prepare` and `notify_change`
//! (fs/attr.c), `xattr_permission` (fs/xattr.c) and `may_linkat`'s protected hardlinks.
//!
//! Pure functions over who asks ([`Caller`]) and what is asked about ([`Target`]: a file's
//! owner, group and mode, with its access ACL when the check needs it). Root (uid 0) stands for
//! the capabilities a root process holds: it passes every check, as CAP_DAC_OVERRIDE,
//! CAP_FOWNER, CAP_CHOWN and CAP_FSETID make it, except that executing a non-directory needs an
//! x bit somewhere. Denials by mode are `EACCES`, by ownership `EPERM`, as on Linux.

use crate::acl::{self, Acl};
use crate::error::{Error, Result};

pub const MAY_EXEC: u32 = 1;
pub const MAY_WRITE: u32 = 2;
pub const MAY_READ: u32 = 4;

/// The process behind a request.
pub struct Caller<'a> {
    /// Its filesystem uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Whether one of its supplementary groups is this one; asked only when the primary group
    /// does not decide (reading them can cost a /proc read).
    pub supplementary: &'a dyn Fn(u32) -> bool,
}

impl Caller<'_> {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// `in_group_p`: the primary or a supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || (self.supplementary)(gid)
    }

    fn owns(&self, t: &Target) -> bool {
        self.uid == t.uid
    }

    /// `inode_owner_or_capable`.
    fn owns_or_root(&self, t: &Target) -> bool {
        self.owns(t) || self.is_root()
    }
}

/// What a check needs to know of a file.
#[derive(Clone, Debug)]
pub struct Target {
    pub uid: u32,
    pub gid: u32,
    /// File type and permission bits, as `st_mode`.
    pub mode: u32,
    /// Its access ACL, when it has one and the check consults it (see [`consults_acl`]).
    pub acl: Option<Acl>,
}

impl Target {
    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    fn is_reg(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

/// The owner, group and cleared permission bits every file is shown with (`-o uid=,gid=,umask=`):
/// checks see files as shown, as the kernel's own do.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shown {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: u32,
}

impl Shown {
    /// `(uid, gid, mode)` as shown.
    pub fn apply(&self, uid: u32, gid: u32, mode: u32) -> (u32, u32, u32) {
        (
            self.uid.unwrap_or(uid),
            self.gid.unwrap_or(gid),
            mode & !(self.umask & 0o7777),
        )
    }
}

/// Whether a permission check of a file with this owner and mode by `c` can depend on the
/// file's access ACL, so that the ACL is read only then: not for its owner or root, and not
/// when the mode's group bits (the ACL's mask) are empty.
pub fn consults_acl(c: &Caller, uid: u32, mode: u32) -> bool {
    c.uid != uid && !c.is_root() && mode & 0o070 != 0
}

/// `generic_permission`: whether `c` may read, write and/or execute (search) `t`, `want` being
/// a combination of `MAY_*`.
pub fn permission(c: &Caller, t: &Target, want: u32) -> Result<()> {
    let want = want & 7;
    if mode_permits(c, t, want) {
        return Ok(());
    }
    if c.is_root() && (t.is_dir() || want & MAY_EXEC == 0 || t.mode & 0o111 != 0) {
        return Ok(());
    }
    Err(Error::AccessDenied)
}

/// `acl_permission_check`: the owner's bits for the owner, else the ACL when there is one,
/// else the group's bits for a member of the file's group (when they differ from other's in
/// what is asked), else other's.
fn mode_permits(c: &Caller, t: &Target, want: u32) -> bool {
    let mode = t.mode;
    if c.owns(t) {
        return want & !(mode >> 6) & 7 == 0;
    }
    if mode & 0o070 != 0
        && let Some(a) = &t.acl
    {
        return a.grants(c.uid, t.gid, &|g| c.in_group(g), want);
    }
    let bits = if want & (mode ^ (mode >> 3)) & 7 != 0 && c.in_group(t.gid) {
        mode >> 3
    } else {
        mode
    };
    want & !bits & 7 == 0
}

/// Whether `c` may create an entry in directory `dir` (`may_create`).
pub fn may_create(c: &Caller, dir: &Target) -> Result<()> {
    permission(c, dir, MAY_WRITE | MAY_EXEC)
}

/// Whether `c` may remove (or rename away, or replace) `victim` from directory `dir`
/// (`may_delete`): write and search permission on the directory, and in a sticky directory
/// ownership of the directory or of the victim.
pub fn may_delete(c: &Caller, dir: &Target, victim: &Target) -> Result<()> {
    permission(c, dir, MAY_WRITE | MAY_EXEC)?;
    if dir.mode & libc::S_ISVTX != 0 && !c.owns(victim) && !c.owns_or_root(dir) {
        return Err(Error::NotPermitted);
    }
    Ok(())
}

/// Whether `c` may make a hard link to `t` under the kernel's protected hardlinks
/// (`fs.protected_hardlinks` = 1, `may_linkat`): its owner may, else only to a regular file
/// without set-ID execution that `c` may read and write.
pub fn may_link(c: &Caller, t: &Target) -> Result<()> {
    if c.owns_or_root(t) {
        return Ok(());
    }
    let mode = t.mode;
    let setid = mode & libc::S_ISUID != 0
        || mode & (libc::S_ISGID | libc::S_IXGRP) == (libc::S_ISGID | libc::S_IXGRP);
    if !t.is_reg() || setid || permission(c, t, MAY_READ | MAY_WRITE).is_err() {
        return Err(Error::NotPermitted);
    }
    Ok(())
}

/// What an open with these flags asks for (`MAY_*`): read and/or write by the access mode,
/// write for `O_TRUNC`; an open for execution (`__FMODE_EXEC`) asks for execution alone.
pub fn open_mask(flags: i32) -> u32 {
    // The kernel marks the opens of execve and uselib with __FMODE_EXEC, which it passes on in
    // the OPEN request's flags.
    const FMODE_EXEC: i32 = 0x20;
    if flags & FMODE_EXEC != 0 {
        return MAY_EXEC;
    }
    let mut want = match flags & libc::O_ACCMODE {
        libc::O_WRONLY => MAY_WRITE,
        libc::O_RDWR => MAY_READ | MAY_WRITE,
        _ => MAY_READ,
    };
    if flags & libc::O_TRUNC != 0 {
        want |= MAY_WRITE;
    }
    want
}

/// How a setattr changes timestamps, as far as permissions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeChange {
    /// None, or none the caller asked for (the kernel's own, with a truncate or a flush).
    None,
    /// Both to the current time (`utimes(f, NULL)`, `touch`): the owner, or a writer.
    Touch,
    /// Any other: to given times, or only one of them to now: the owner only.
    Set,
}

/// A setattr request, as far as permissions go.
#[derive(Clone, Copy, Debug)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A size change by path (`truncate(2)`, `open(O_TRUNC)`); not one through an open file,
    /// which was checked when the file was opened.
    pub truncate: bool,
    pub times: TimeChange,
}

/// Whether `c` may make change `ch` to `t` (`notify_change`, `vfs_truncate`, `setattr_prepare`);
/// returns the mode to set, if any: without the set-group-ID bit when `c` is neither root nor
/// a member of the file's (new) group, which chmod then drops silently.
pub fn setattr(c: &Caller, t: &Target, ch: &AttrChange) -> Result<Option<u32>> {
    if ch.times == TimeChange::Touch && !c.owns_or_root(t) {
        permission(c, t, MAY_WRITE)?;
    }
    if ch.truncate {
        permission(c, t, MAY_WRITE)?;
    }
    let mine = c.owns(t);
    if let Some(uid) = ch.uid
        && !(mine && uid == t.uid || c.is_root())
    {
        return Err(Error::NotPermitted);
    }
    if let Some(gid) = ch.gid
        && !(mine && (gid == t.gid || c.in_group(gid)) || c.is_root())
    {
        return Err(Error::NotPermitted);
    }
    let mut mode = ch.mode;
    if let Some(m) = &mut mode {
        if !c.owns_or_root(t) {
            return Err(Error::NotPermitted);
        }
        if !c.is_root() && !c.in_group(ch.gid.unwrap_or(t.gid)) {
            *m &= !libc::S_ISGID;
        }
    }
    if ch.times == TimeChange::Set && !c.owns_or_root(t) {
        return Err(Error::NotPermitted);
    }
    Ok(mode)
}

/// Whether `c` may read (`write` false) or set and remove (`write` true) the extended attribute
/// `name` of `t` (`xattr_permission`, and the ACL rules of `set_posix_acl`): `user.` needs read
/// or write permission, on regular files and directories only, and in a sticky directory
/// ownership to write; `trusted.` is root's; ACLs may be changed by the owner. Reading ACLs and
/// `security.` attributes is free; writing `security.` the kernel's security modules decide.
pub fn xattr(c: &Caller, t: &Target, name: &[u8], write: bool) -> Result<()> {
    // What the kernel answers when an attribute is out of reach.
    let refused = if write {
        Error::NotPermitted
    } else {
        Error::NoAttr
    };
    if name.starts_with(b"trusted.") {
        return if c.is_root() { Ok(()) } else { Err(refused) };
    }
    if name.starts_with(b"user.") {
        if !t.is_reg() && !t.is_dir() {
            return Err(refused);
        }
        if write && t.is_dir() && t.mode & libc::S_ISVTX != 0 && !c.owns_or_root(t) {
            return Err(Error::NotPermitted);
        }
        return permission(c, t, if write { MAY_WRITE } else { MAY_READ });
    }
    if write && (name == acl::ACCESS || name == acl::DEFAULT) && !c.owns_or_root(t) {
        return Err(Error::NotPermitted);
    }
    Ok(())
}

/// Whether `listxattr` shows `c` the attribute `name`: `trusted.` ones only to root, as tmpfs
/// and ext4 list them.
pub fn lists_xattr(c: &Caller, name: &[u8]) -> bool {
    c.is_root() || !name.starts_with(b"trusted.")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOBODY: u32 = 65534;
    const ALICE: u32 = 1000;
    const STAFF: u32 = 50;

    const NONE: &dyn Fn(u32) -> bool = &|_| false;
    const IN_STAFF: &dyn Fn(u32) -> bool = &|g| g == STAFF;

    fn caller(uid: u32, gid: u32, supplementary: &'static dyn Fn(u32) -> bool) -> Caller<'static> {
        Caller {
            uid,
            gid,
            supplementary,
        }
    }

    fn file(uid: u32, gid: u32, mode: u32) -> Target {
        Target {
            uid,
            gid,
            mode: libc::S_IFREG | mode,
            acl: None,
        }
    }

    fn dir(uid: u32, gid: u32, mode: u32) -> Target {
        Target {
            mode: libc::S_IFDIR | mode,
            ..file(uid, gid, 0)
        }
    }

    fn denied(r: Result<()>) -> i32 {
        r.err().map_or(0, |e| e.errno())
    }

    #[test]
    fn mode_classes_as_generic_permission() {
        let alice = caller(ALICE, ALICE, IN_STAFF);
        let nobody = caller(NOBODY, NOBODY, NONE);
        // The owner gets the owner's bits only, even when group or other have more.
        let f = file(ALICE, STAFF, 0o077);
        assert_eq!(denied(permission(&alice, &f, MAY_READ)), libc::EACCES);
        assert_eq!(denied(permission(&nobody, &f, MAY_READ | MAY_WRITE)), 0);
        // A member of the group gets the group's bits, a supplementary group counts.
        let f = file(0, STAFF, 0o604);
        assert_eq!(denied(permission(&alice, &f, MAY_READ)), libc::EACCES);
        assert_eq!(denied(permission(&nobody, &f, MAY_READ)), 0);
        let f = file(0, STAFF, 0o640);
        assert_eq!(denied(permission(&alice, &f, MAY_READ)), 0);
        assert_eq!(denied(permission(&nobody, &f, MAY_READ)), libc::EACCES);
    }

    #[test]
    fn root_bypasses_all_but_exec_without_x() {
        let root = caller(0, 0, NONE);
        let f = file(ALICE, ALICE, 0o000);
        assert_eq!(denied(permission(&root, &f, MAY_READ | MAY_WRITE)), 0);
        assert_eq!(denied(permission(&root, &f, MAY_EXEC)), libc::EACCES);
        assert_eq!(
            denied(permission(&root, &file(ALICE, ALICE, 0o001), MAY_EXEC)),
            0
        );
        assert_eq!(
            denied(permission(&root, &dir(ALICE, ALICE, 0), MAY_EXEC)),
            0
        );
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        let mut v = 2u32.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        Acl::parse(&v).unwrap()
    }

    #[test]
    fn acl_entries_and_mask() {
        const ANY: u32 = u32::MAX;
        // u::rw-, u:nobody:rw-, g::r--, g:staff:rwx, m::r--, o::---
        let a = acl(&[
            (0x01, 6, ANY),
            (0x02, 6, NOBODY),
            (0x04, 4, ANY),
            (0x08, 7, STAFF),
            (0x10, 4, ANY),
            (0x20, 0, ANY),
        ]);
        let f = Target {
            acl: Some(a),
            ..file(0, 0, 0o640)
        };
        let nobody = caller(NOBODY, NOBODY, NONE);
        let alice = caller(ALICE, ALICE, IN_STAFF);
        let eve = caller(1001, 1001, NONE);
        assert!(consults_acl(&nobody, f.uid, f.mode));
        assert_eq!(denied(permission(&nobody, &f, MAY_READ)), 0);
        // The mask limits named entries.
        assert_eq!(denied(permission(&nobody, &f, MAY_WRITE)), libc::EACCES);
        assert_eq!(denied(permission(&alice, &f, MAY_READ)), 0);
        assert_eq!(denied(permission(&alice, &f, MAY_WRITE)), libc::EACCES);
        // Other: nothing.
        assert_eq!(denied(permission(&eve, &f, MAY_READ)), libc::EACCES);
        // A matching group entry that lacks the bits denies, even if other has them.
        let g = Target {
            acl: Some(acl(&[
                (0x01, 7, ANY),
                (0x04, 0, ANY),
                (0x10, 7, ANY),
                (0x20, 4, ANY),
            ])),
            ..file(0, STAFF, 0o674)
        };
        assert_eq!(denied(permission(&alice, &g, MAY_READ)), libc::EACCES);
        assert_eq!(denied(permission(&eve, &g, MAY_READ)), 0);
        // With the group bits (mask) empty the ACL is not consulted.
        assert!(!consults_acl(&nobody, 0, 0o604));
        assert!(!consults_acl(&caller(0, 0, NONE), 5, 0o777));
    }

    #[test]
    fn sticky_directories() {
        let alice = caller(ALICE, ALICE, NONE);
        let nobody = caller(NOBODY, NOBODY, NONE);
        let tmp = dir(0, 0, 0o1777);
        let hers = file(ALICE, ALICE, 0o600);
        assert_eq!(denied(may_delete(&alice, &tmp, &hers)), 0);
        assert_eq!(denied(may_delete(&nobody, &tmp, &hers)), libc::EPERM);
        assert_eq!(denied(may_delete(&caller(0, 0, NONE), &tmp, &hers)), 0);
        // The directory's owner may too; without write permission it is EACCES first.
        let own = dir(NOBODY, NOBODY, 0o1777);
        assert_eq!(denied(may_delete(&nobody, &own, &hers)), 0);
        let shut = dir(0, 0, 0o1755);
        assert_eq!(denied(may_delete(&alice, &shut, &hers)), libc::EACCES);
        assert_eq!(denied(may_create(&alice, &shut)), libc::EACCES);
        assert_eq!(denied(may_create(&alice, &dir(0, 0, 0o773))), 0);
    }

    #[test]
    fn chmod_chown_and_times() {
        let alice = caller(ALICE, ALICE, IN_STAFF);
        let nobody = caller(NOBODY, NOBODY, NONE);
        let f = file(ALICE, ALICE, 0o644);
        let ch = |mode, uid, gid, times| AttrChange {
            mode,
            uid,
            gid,
            truncate: false,
            times,
        };
        let err = |r: Result<Option<u32>>| r.err().map_or(0, |e| e.errno());
        let none = TimeChange::None;
        // chmod: the owner; set-group-ID dropped unless in the file's (new) group.
        assert_eq!(
            setattr(&alice, &f, &ch(Some(0o2755), None, None, none)).unwrap(),
            Some(0o2755)
        );
        let g = file(ALICE, 7, 0o644);
        assert_eq!(
            setattr(&alice, &g, &ch(Some(0o2755), None, None, none)).unwrap(),
            Some(0o755)
        );
        assert_eq!(
            setattr(&alice, &g, &ch(Some(0o2755), None, Some(STAFF), none)).unwrap(),
            Some(0o2755)
        );
        assert_eq!(
            err(setattr(&nobody, &f, &ch(Some(0o777), None, None, none))),
            libc::EPERM
        );
        // chown: root; the owner only to its own uid and to a group of its own.
        assert_eq!(
            err(setattr(&alice, &f, &ch(None, Some(NOBODY), None, none))),
            libc::EPERM
        );
        assert_eq!(
            err(setattr(
                &alice,
                &f,
                &ch(None, Some(ALICE), Some(STAFF), none)
            )),
            0
        );
        assert_eq!(
            err(setattr(&alice, &f, &ch(None, None, Some(NOBODY), none))),
            libc::EPERM
        );
        assert_eq!(
            err(setattr(&nobody, &f, &ch(None, None, Some(ALICE), none))),
            libc::EPERM
        );
        let root = caller(0, 0, NONE);
        assert_eq!(
            err(setattr(
                &root,
                &f,
                &ch(Some(0o2777), Some(5), Some(6), none)
            )),
            0
        );
        // utimes: to now, the owner or a writer; to given times, the owner.
        let w = file(ALICE, ALICE, 0o666);
        assert_eq!(
            err(setattr(
                &nobody,
                &w,
                &ch(None, None, None, TimeChange::Touch)
            )),
            0
        );
        assert_eq!(
            err(setattr(
                &nobody,
                &f,
                &ch(None, None, None, TimeChange::Touch)
            )),
            libc::EACCES
        );
        assert_eq!(
            err(setattr(&nobody, &w, &ch(None, None, None, TimeChange::Set))),
            libc::EPERM
        );
        // Truncating by path needs write permission, even for the owner.
        let t = AttrChange {
            truncate: true,
            ..ch(None, None, None, none)
        };
        assert_eq!(
            err(setattr(&alice, &file(ALICE, ALICE, 0o444), &t)),
            libc::EACCES
        );
        assert_eq!(err(setattr(&nobody, &w, &t)), 0);
    }

    #[test]
    fn xattr_namespaces() {
        let nobody = caller(NOBODY, NOBODY, NONE);
        let root = caller(0, 0, NONE);
        let f = file(ALICE, ALICE, 0o644);
        assert_eq!(denied(xattr(&nobody, &f, b"user.a", false)), 0);
        assert_eq!(denied(xattr(&nobody, &f, b"user.a", true)), libc::EACCES);
        assert_eq!(
            denied(xattr(&nobody, &f, b"trusted.a", false)),
            libc::ENODATA
        );
        assert_eq!(denied(xattr(&nobody, &f, b"trusted.a", true)), libc::EPERM);
        assert_eq!(denied(xattr(&root, &f, b"trusted.a", true)), 0);
        assert_eq!(denied(xattr(&nobody, &f, acl::ACCESS, false)), 0);
        assert_eq!(denied(xattr(&nobody, &f, acl::ACCESS, true)), libc::EPERM);
        assert_eq!(
            denied(xattr(&caller(ALICE, ALICE, NONE), &f, acl::ACCESS, true)),
            0
        );
        let fifo = Target {
            mode: libc::S_IFIFO | 0o666,
            ..f.clone()
        };
        assert_eq!(denied(xattr(&nobody, &fifo, b"user.a", true)), libc::EPERM);
        assert_eq!(
            denied(xattr(&nobody, &fifo, b"user.a", false)),
            libc::ENODATA
        );
        let tmp = dir(ALICE, ALICE, 0o1777);
        assert_eq!(denied(xattr(&nobody, &tmp, b"user.a", true)), libc::EPERM);
        assert!(!lists_xattr(&nobody, b"trusted.a"));
        assert!(lists_xattr(&nobody, b"user.a"));
        assert!(lists_xattr(&root, b"trusted.a"));
    }

    #[test]
    fn checks_see_files_as_shown() {
        let shown = Shown {
            uid: Some(NOBODY),
            gid: None,
            umask: 0o027,
        };
        let (uid, gid, mode) = shown.apply(0, STAFF, libc::S_IFREG | 0o4777);
        assert_eq!((uid, gid, mode), (NOBODY, STAFF, libc::S_IFREG | 0o4750));
        assert_eq!(Shown::default().apply(1, 2, 0o777), (1, 2, 0o777));
    }

    #[test]
    fn protected_hardlinks_and_open_modes() {
        let nobody = caller(NOBODY, NOBODY, NONE);
        assert_eq!(denied(may_link(&nobody, &file(ALICE, ALICE, 0o666))), 0);
        assert_eq!(
            denied(may_link(&nobody, &file(ALICE, ALICE, 0o644))),
            libc::EPERM
        );
        assert_eq!(
            denied(may_link(&nobody, &file(ALICE, ALICE, 0o4666))),
            libc::EPERM
        );
        assert_eq!(denied(may_link(&nobody, &file(NOBODY, 0, 0o000))), 0);
        assert_eq!(open_mask(libc::O_RDONLY), MAY_READ);
        assert_eq!(open_mask(libc::O_WRONLY), MAY_WRITE);
        assert_eq!(open_mask(libc::O_RDWR), MAY_READ | MAY_WRITE);
        assert_eq!(
            open_mask(libc::O_RDONLY | libc::O_TRUNC),
            MAY_READ | MAY_WRITE
        );
        assert_eq!(open_mask(libc::O_RDONLY | 0x20), MAY_EXEC);
    }
}
