//! Mount options: mmapfs's own, the kernel's, FUSE's, and the generic ones that mount(8) and
//! /etc/fstab lines hand to a mount helper. Parsing is pure (no I/O but user-name lookups), so
//! every option is checked before the image is opened.

use std::time::Duration;

use crate::fs::Atime;
use crate::fuse::{KernelOptions, MAX_WRITE, Ownership};

/// Backing-device settings the `-o` options may set (files in /sys/class/bdi/DEV/): readahead
/// size, and the dirty-page limit the kernel imposes on FUSE mounts (a strict 1%).
pub const BDI_KNOBS: [&str; 4] = ["read_ahead_kb", "max_ratio", "strict_limit", "max_bytes"];

/// The kernel holds every FUSE mount to a strict 1% share of the dirty-page limit, which
/// throttles writes through mappings (mmap sequential writes: 490 -> 1323 MB/s without it, 1 GiB
/// fio on 2 cores). The limit guards against daemons that cannot make progress on writeback;
/// this one copies into its own mapping of a file on another device. `-o max_ratio=1,
/// strict_limit=1` restores the kernel's settings. Readahead of 4 MiB instead of the kernel's
/// 128 KiB keeps a sequential reader's next requests in flight while it copies (cold 1 MiB reads
/// 2298 -> 2947 MiB/s, through a mapping 2243 -> 2833 MiB/s; random cold reads unchanged).
const DEFAULT_BDI: [(&str, &str); 3] = [
    ("max_ratio", "40"),
    ("strict_limit", "0"),
    ("read_ahead_kb", "4096"),
];

/// Options that fstab lines and mount(8) carry and that mean nothing to this filesystem (mount(8)
/// acts on most of them itself): accepted and ignored, as other FUSE filesystems do.
const IGNORED: [&str; 16] = [
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "async",
    "lazytime",
    "nolazytime",
    "iversion",
    "noiversion",
    // FUSE 2's permission to mount over a non-empty directory, which FUSE 3 always grants.
    "nonempty",
];
/// Prefixes of ignored options: userspace annotations (`x-systemd.automount`, `comment=...`).
const IGNORED_PREFIXES: [&str; 2] = ["x-", "comment="];

/// The help text listing every accepted option (`mmapfs mount --help`).
pub const HELP: &str = "\
Mount options (-o, comma separated; a later one overrides an earlier one):
  ro, rw              read-only (nothing is written to the image), or not [rw]
  exec, noexec, suid, nosuid, dev, nodev, sync, dirsync
                      the kernel's generic flags [nosuid,nodev unless asked]
  relatime, strictatime, noatime, nodiratime
                      when reads update access times: only when older than
                      the last change or a day old, always, never, never
                      for directories [relatime; atime = relatime,
                      norelatime = strictatime]
  allow_other         every user may use the mount [the default as root; a
                      normal user needs user_allow_other in /etc/fuse.conf]
  noallow_other       only the user who mounted may use it
  allow_root          the user who mounted and root may use it
  auto_unmount        unmount when the daemon dies (with allow_other/allow_root)
  default_permissions, no_default_permissions
                      who checks permissions: the kernel, from the modes and
                      ACLs, or mmapfs itself, by the same rules (slower: the
                      kernel then caches no names) [default_permissions]
  acl, noacl          POSIX ACLs (setfacl/getfacl) [acl]
  uid=USER, gid=GROUP show every file as owned by this user and group
  umask=OCTAL         show every file with these permission bits cleared
  commit=SECONDS      seconds between commits when nothing calls fsync [5]
  writeback_cache, no_writeback_cache
                      let the kernel cache writes until close, fsync or its
                      own write-back [writeback_cache; README, Durability]
  no_readdirplus, no_clone_fd, no_pin_threads, max_write=BYTES
                      FUSE tuning (docs/fuse.md)
  io_uring, no_io_uring
                      serve FUSE requests over io_uring, one thread pinned
                      per CPU (Linux 6.14+) [off]. Needs the machine-wide
                      switch /sys/module/fuse/parameters/enable_uring on,
                      which only root can set and mmapfs never sets; when
                      it is off, a warning says so and /dev/fuse is used
  read_ahead_kb=N, max_ratio=N, strict_limit=0|1, max_bytes=N
                      backing-device settings [read_ahead_kb=4096,
                      max_ratio=40,strict_limit=0]
  fsname=NAME         the source /proc/mounts shows [the image's path]
  defaults, auto, noauto, nofail, _netdev, user, users, owner, group, async,
  lazytime, nonempty, x-*, comment=*
                      accepted for /etc/fstab, and ignored

Unmount with `umount MOUNTPOINT`, or `fusermount3 -u MOUNTPOINT` as a normal
user.";

/// Who may use the mount besides its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Owner,
    OwnerAndRoot,
    Everyone,
}

/// Everything `-o` decides.
#[derive(Debug)]
pub struct Settings {
    pub kernel: KernelOptions,
    pub clone_fd: bool,
    pub pin_threads: bool,
    pub commit_interval: Duration,
    pub bdi: Vec<(&'static str, String)>,
    pub fsname: Option<String>,
    pub read_only: bool,
    pub exec: bool,
    pub suid: bool,
    pub dev: bool,
    pub sync: bool,
    pub dirsync: bool,
    /// `None`: the default (everyone as root, the owner otherwise).
    pub access: Option<Access>,
    pub auto_unmount: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            // The writeback cache: write(2) fills the kernel's page cache and the kernel sends
            // large WRITEs when it writes back (docs/fuse.md).
            kernel: KernelOptions {
                writeback_cache: true,
                acl: true,
                atime: Atime::Relative,
                diratime: true,
                readdirplus: true,
                max_write: MAX_WRITE,
                ownership: Ownership::default(),
                io_uring: false,
                default_permissions: true,
            },
            clone_fd: true,
            pin_threads: true,
            commit_interval: crate::engine::DEFAULT_COMMIT_INTERVAL,
            bdi: DEFAULT_BDI
                .iter()
                .map(|(k, v)| (*k, v.to_string()))
                .collect(),
            fsname: None,
            read_only: false,
            exec: true,
            suid: false,
            dev: false,
            sync: false,
            dirsync: false,
            access: None,
            auto_unmount: false,
        }
    }
}

impl Settings {
    /// Parses the `-o` options (each element may itself hold several, comma separated).
    pub fn parse(options: &[String]) -> Result<Settings, String> {
        let mut s = Settings::default();
        for o in options
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| !o.is_empty())
        {
            s.apply(o)?;
        }
        Ok(s)
    }

    fn apply(&mut self, o: &str) -> Result<(), String> {
        let flag = |v: &mut bool, on: bool| {
            *v = on;
            Ok(())
        };
        match o {
            "ro" => flag(&mut self.read_only, true),
            "rw" => flag(&mut self.read_only, false),
            "exec" => flag(&mut self.exec, true),
            "noexec" => flag(&mut self.exec, false),
            "suid" => flag(&mut self.suid, true),
            "nosuid" => flag(&mut self.suid, false),
            "dev" => flag(&mut self.dev, true),
            "nodev" => flag(&mut self.dev, false),
            "atime" | "relatime" => self.set_atime(Atime::Relative),
            "strictatime" | "norelatime" => self.set_atime(Atime::Strict),
            "noatime" => self.set_atime(Atime::Never),
            "diratime" => flag(&mut self.kernel.diratime, true),
            "nodiratime" => flag(&mut self.kernel.diratime, false),
            "sync" => flag(&mut self.sync, true),
            "dirsync" => flag(&mut self.dirsync, true),
            "allow_other" => self.set_access(Access::Everyone),
            "allow_root" => self.set_access(Access::OwnerAndRoot),
            "noallow_other" => self.set_access(Access::Owner),
            "auto_unmount" => flag(&mut self.auto_unmount, true),
            "default_permissions" => flag(&mut self.kernel.default_permissions, true),
            "no_default_permissions" => flag(&mut self.kernel.default_permissions, false),
            "writeback_cache" => flag(&mut self.kernel.writeback_cache, true),
            "no_writeback_cache" => flag(&mut self.kernel.writeback_cache, false),
            "no_readdirplus" => flag(&mut self.kernel.readdirplus, false),
            "acl" => flag(&mut self.kernel.acl, true),
            "noacl" => flag(&mut self.kernel.acl, false),
            "no_clone_fd" => flag(&mut self.clone_fd, false),
            "no_pin_threads" => flag(&mut self.pin_threads, false),
            "io_uring" => flag(&mut self.kernel.io_uring, true),
            "no_io_uring" => flag(&mut self.kernel.io_uring, false),
            "remount" => Err(
                "remount is not supported: unmount, then mount with the new \
                              options"
                    .into(),
            ),
            _ if IGNORED.contains(&o) || IGNORED_PREFIXES.iter().any(|p| o.starts_with(p)) => {
                log::debug!("mount option {o} ignored");
                Ok(())
            }
            _ => self.apply_valued(o),
        }
    }

    fn set_atime(&mut self, a: Atime) -> Result<(), String> {
        self.kernel.atime = a;
        Ok(())
    }

    fn set_access(&mut self, a: Access) -> Result<(), String> {
        self.access = Some(a);
        Ok(())
    }

    fn apply_valued(&mut self, o: &str) -> Result<(), String> {
        let Some((key, value)) = o.split_once('=') else {
            return Err(unknown(o));
        };
        let bad = |what: &str| Err(format!("mount option {o}: expected {what}"));
        match key {
            "fsname" if !value.is_empty() && !value.contains(char::is_whitespace) => {
                self.fsname = Some(value.to_string());
                Ok(())
            }
            "fsname" => bad("a name without spaces"),
            "commit" => match value.parse::<u64>() {
                Ok(n) if (1..=86_400).contains(&n) => {
                    self.commit_interval = Duration::from_secs(n);
                    Ok(())
                }
                _ => bad("seconds between commits, 1..=86400"),
            },
            "max_write" => match value.parse::<u32>() {
                Ok(n) if (4096..=MAX_WRITE).contains(&n) => {
                    self.kernel.max_write = n;
                    Ok(())
                }
                _ => bad(&format!("4096..={MAX_WRITE}")),
            },
            "uid" => match lookup_id("/etc/passwd", value) {
                Some(id) => {
                    self.kernel.ownership.uid = Some(id);
                    Ok(())
                }
                None => bad("a user id or name"),
            },
            "gid" => match lookup_id("/etc/group", value) {
                Some(id) => {
                    self.kernel.ownership.gid = Some(id);
                    Ok(())
                }
                None => bad("a group id or name"),
            },
            "umask" => match u16::from_str_radix(value, 8) {
                Ok(m) if m <= 0o7777 => {
                    self.kernel.ownership.umask = m;
                    Ok(())
                }
                _ => bad("an octal mask such as 022"),
            },
            _ => match BDI_KNOBS.iter().find(|k| **k == key) {
                Some(&knob) if value.parse::<u64>().is_ok() => {
                    self.bdi.retain(|(k, _)| *k != knob);
                    self.bdi.push((knob, value.to_string()));
                    Ok(())
                }
                Some(_) => bad("a number"),
                None => Err(unknown(o)),
            },
        }
    }
}

fn unknown(o: &str) -> String {
    format!("unknown mount option {o:?} (`mmapfs mount --help` lists the accepted options)")
}

/// A numeric id, or the id of a name in `/etc/passwd` or `/etc/group` (`name:x:id:...`).
fn lookup_id(table: &str, value: &str) -> Option<u32> {
    if let Ok(n) = value.parse::<u32>() {
        return Some(n);
    }
    let text = std::fs::read_to_string(table).ok()?;
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&value))
        .and_then(|f| f.get(2)?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Settings, String> {
        Settings::parse(&[s.to_string()])
    }

    #[test]
    fn fstab_options_are_accepted() {
        let s =
            parse("defaults,nofail,noauto,_netdev,users,x-systemd.automount,comment=x,rw").unwrap();
        assert!(!s.read_only);
        assert_eq!(s.access, None);
    }

    #[test]
    fn later_options_override_earlier_ones() {
        assert!(!parse("ro,rw").unwrap().read_only);
        assert!(parse("rw,ro").unwrap().read_only);
        assert!(parse("nosuid,suid").unwrap().suid);
        assert!(parse("").unwrap().kernel.default_permissions);
        assert!(
            !parse("no_default_permissions")
                .unwrap()
                .kernel
                .default_permissions
        );
        assert!(
            parse("no_default_permissions,default_permissions")
                .unwrap()
                .kernel
                .default_permissions
        );
        assert_eq!(
            parse("allow_other,noallow_other").unwrap().access,
            Some(Access::Owner)
        );
    }

    #[test]
    fn ownership_options() {
        let s = parse("uid=1000,gid=root,umask=027").unwrap();
        assert_eq!(s.kernel.ownership.uid, Some(1000));
        assert_eq!(s.kernel.ownership.gid, Some(0));
        assert_eq!(s.kernel.ownership.umask, 0o027);
        assert!(parse("uid=no-such-user-here").is_err());
        assert!(parse("umask=9").is_err());
    }

    #[test]
    fn bad_options_are_named() {
        for (o, want) in [
            ("typo_option", "typo_option"),
            ("remount,ro", "remount"),
            ("commit=0", "commit=0"),
            ("max_ratio=x", "max_ratio=x"),
            ("frobnicate=1", "frobnicate=1"),
        ] {
            let e = parse(o).unwrap_err();
            assert!(e.contains(want), "{o}: {e}");
        }
    }
}
