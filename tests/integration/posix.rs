//! POSIX behaviour through the kernel: file kinds, open flags, unlink/rename semantics,
//! attributes, permissions, xattrs, statfs, name limits and readdir.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn regular_files_and_directories() {
    let m = Mount::new();
    fs::create_dir(m.p("d")).unwrap();
    fs::create_dir_all(m.p("d/e/f")).unwrap();
    fs::write(m.p("d/e/f/file"), b"hello world").unwrap();
    assert_eq!(fs::read(m.p("d/e/f/file")).unwrap(), b"hello world");
    let md = fs::metadata(m.p("d/e/f/file")).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 11);
    // A directory has nlink 2 + one per subdirectory.
    assert_eq!(fs::metadata(m.p("d")).unwrap().nlink(), 3);
    fs::create_dir(m.p("d/g")).unwrap();
    assert_eq!(fs::metadata(m.p("d")).unwrap().nlink(), 4);
    assert_eq!(err_of(fs::create_dir(m.p("d/g"))), libc::EEXIST);
    assert_eq!(err_of(fs::remove_dir(m.p("d/e"))), libc::ENOTEMPTY);
    assert_eq!(err_of(fs::remove_dir(m.p("d/e/f/file"))), libc::ENOTDIR);
    assert_eq!(err_of(fs::remove_file(m.p("d/g"))), libc::EISDIR);
    assert_eq!(err_of(fs::read(m.p("nope"))), libc::ENOENT);
    fs::remove_dir(m.p("d/g")).unwrap();
    assert_eq!(fs::metadata(m.p("d")).unwrap().nlink(), 3);
    fs::remove_file(m.p("d/e/f/file")).unwrap();
    fs::remove_dir_all(m.p("d")).unwrap();
    assert_eq!(fs::read_dir(m.path()).unwrap().count(), 0);
    m.finish();
}

#[test]
fn symlinks_up_to_4095_bytes() {
    let m = Mount::new();
    fs::write(m.p("target"), b"x").unwrap();
    std::os::unix::fs::symlink("target", m.p("link")).unwrap();
    assert_eq!(fs::read_link(m.p("link")).unwrap(), Path::new("target"));
    assert_eq!(fs::read(m.p("link")).unwrap(), b"x");
    assert!(
        fs::symlink_metadata(m.p("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::symlink_metadata(m.p("link")).unwrap().len(), 6);
    for len in [1usize, 59, 60, 61, 255, 4000, 4095] {
        // A target made of path components, so it is a legal path of exactly `len` bytes.
        let target: String = (0..len)
            .map(|i| {
                if i % 100 == 99 {
                    '/'
                } else {
                    (b'a' + (i % 26) as u8) as char
                }
            })
            .collect();
        let name = format!("l{len}");
        std::os::unix::fs::symlink(&target, m.p(&name)).unwrap();
        let got = fs::read_link(m.p(&name)).unwrap();
        assert_eq!(got.as_os_str().as_bytes(), target.as_bytes(), "len {len}");
        assert_eq!(fs::symlink_metadata(m.p(&name)).unwrap().len(), len as u64);
    }
    let too_long = "b".repeat(4096);
    let r = std::os::unix::fs::symlink(&too_long, m.p("l4096"));
    assert_eq!(err_of(r), libc::ENAMETOOLONG);
    // Dangling links are fine.
    std::os::unix::fs::symlink("missing", m.p("dangling")).unwrap();
    assert_eq!(err_of(fs::read(m.p("dangling"))), libc::ENOENT);
    m.finish();
}

#[test]
fn hard_links_share_the_inode() {
    let m = Mount::new();
    fs::create_dir(m.p("sub")).unwrap();
    fs::write(m.p("a"), b"shared").unwrap();
    fs::hard_link(m.p("a"), m.p("b")).unwrap();
    fs::hard_link(m.p("a"), m.p("sub/c")).unwrap();
    let (a, b, c) = (lstat(&m.p("a")), lstat(&m.p("b")), lstat(&m.p("sub/c")));
    assert_eq!(a.st_ino, b.st_ino);
    assert_eq!(a.st_ino, c.st_ino);
    assert_eq!(lstat(&m.p("a")).st_nlink, 3);
    fs::write(m.p("b"), b"changed").unwrap();
    assert_eq!(fs::read(m.p("sub/c")).unwrap(), b"changed");
    fs::remove_file(m.p("a")).unwrap();
    assert_eq!(lstat(&m.p("b")).st_nlink, 2);
    assert_eq!(fs::read(m.p("b")).unwrap(), b"changed");
    assert_eq!(
        err_of(fs::hard_link(m.p("sub"), m.p("dirlink"))),
        libc::EPERM
    );
    assert_eq!(err_of(fs::hard_link(m.p("b"), m.p("sub/c"))), libc::EEXIST);
    fs::remove_file(m.p("sub/c")).unwrap();
    assert_eq!(lstat(&m.p("b")).st_nlink, 1);
    m.finish();
}

#[test]
fn fifo_and_socket_nodes() {
    let m = Mount::new();
    let fifo = m.p("fifo");
    // SAFETY: valid path.
    let r = unsafe { libc::mkfifo(cpath(&fifo).as_ptr(), 0o644) };
    assert_eq!(r, 0, "mkfifo: {}", std::io::Error::last_os_error());
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut f = OpenOptions::new().write(true).open(&fifo).unwrap();
            f.write_all(b"through the pipe").unwrap();
        })
    };
    let mut got = Vec::new();
    File::open(&fifo).unwrap().read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got, b"through the pipe");

    let sock = m.p("sock");
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(cpath(&sock).as_ptr(), libc::S_IFSOCK | 0o600, 0) };
    assert_eq!(r, 0, "mknod sock: {}", std::io::Error::last_os_error());
    assert!(fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    assert_eq!(lstat(&sock).st_mode & 0o7777, 0o600);

    // A live unix socket bound on the mount.
    let path = m.p("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let client = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"ping").unwrap();
    });
    let (mut conn, _) = listener.accept().unwrap();
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf).unwrap();
    client.join().unwrap();
    assert_eq!(buf, b"ping");
    // Bound and accepted sockets hold the mount busy.
    drop(conn);
    drop(listener);

    // A character device node keeps its rdev.
    let dev = m.p("null");
    let rdev = libc::makedev(1, 3);
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(cpath(&dev).as_ptr(), libc::S_IFCHR | 0o666, rdev) };
    assert_eq!(r, 0, "mknod chr: {}", std::io::Error::last_os_error());
    assert_eq!(lstat(&dev).st_rdev, rdev);
    m.finish();
}

#[test]
fn open_flags_excl_trunc_append() {
    let m = Mount::new();
    let p = m.p("f");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.write_all(b"0123456789").unwrap();
    drop(f);
    let r = OpenOptions::new().write(true).create_new(true).open(&p);
    assert_eq!(err_of(r), libc::EEXIST);
    assert_eq!(fs::read(&p).unwrap(), b"0123456789");

    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"AB").unwrap();
    f.seek(SeekFrom::Start(3)).unwrap();
    f.write_all(b"CD").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"0123456789ABCD");

    // O_TRUNC empties it and frees its blocks.
    fs::write(&p, vec![7u8; 1 << 20]).unwrap();
    let before = free_blocks(m.path());
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    assert_eq!(lstat(&p).st_blocks, 0);
    assert!(
        free_blocks(m.path()) >= before + 250,
        "O_TRUNC freed no space"
    );
    m.finish();
}

#[test]
fn unlinked_open_file_lives_until_last_close() {
    let m = Mount::new();
    let base = free_blocks(m.path());
    let p = m.p("victim");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let data = pattern(1, 0, 4 << 20);
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let used = free_blocks(m.path());
    assert!(
        used + 1000 < base,
        "4 MiB written but free went {base} -> {used}"
    );
    fs::remove_file(&p).unwrap();
    assert_eq!(err_of(fs::metadata(&p)), libc::ENOENT);
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    // Still readable and writable.
    let mut back = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut back).unwrap();
    assert!(back == data, "unlinked file content changed");
    f.write_all(b"more").unwrap();
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    let mut tail = [0u8; 4];
    f.read_exact(&mut tail).unwrap();
    assert_eq!(&tail, b"more");
    // The space stays in use while open.
    assert!(free_blocks(m.path()) + 1000 < base);
    drop(f);
    let mut after = 0;
    for _ in 0..100 {
        // The release reaches the daemon asynchronously.
        after = free_blocks(m.path());
        if after + 16 >= base {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        after + 16 >= base,
        "space not freed after last close: base {base}, now {after}"
    );
    m.finish();
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> Result<(), i32> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    check(r).map(|_| ())
}

/// The inode number the directory `dir` lists for its `..` entry (asks the filesystem, unlike
/// a path walk through `..`, which the kernel answers from its dentry cache).
fn dotdot_ino(dir: &Path) -> u64 {
    let c = cpath(dir);
    // SAFETY: valid path; the stream is closed below.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    assert!(!d.is_null(), "opendir {}", dir.display());
    let mut found = None;
    loop {
        // SAFETY: d is an open stream.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: readdir returns a valid entry with a NUL-terminated name.
        let (name, ino) = unsafe {
            (
                std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
                    .to_bytes()
                    .to_vec(),
                (*e).d_ino,
            )
        };
        if name == b".." {
            found = Some(ino);
        }
    }
    // SAFETY: d is open and closed once.
    unsafe { libc::closedir(d) };
    found.unwrap_or_else(|| panic!("no .. in {}", dir.display()))
}

#[test]
fn rename_files_and_directories() {
    let m = Mount::new();
    fs::create_dir_all(m.p("a/sub")).unwrap();
    fs::create_dir(m.p("b")).unwrap();
    fs::write(m.p("a/f"), b"f").unwrap();
    // Simple and across directories.
    fs::rename(m.p("a/f"), m.p("a/g")).unwrap();
    assert_eq!(err_of(fs::metadata(m.p("a/f"))), libc::ENOENT);
    fs::rename(m.p("a/g"), m.p("b/h")).unwrap();
    assert_eq!(fs::read(m.p("b/h")).unwrap(), b"f");
    // A directory across directories: nlinks and `..` follow.
    fs::rename(m.p("a/sub"), m.p("b/sub")).unwrap();
    assert_eq!(lstat(&m.p("a")).st_nlink, 2);
    assert_eq!(lstat(&m.p("b")).st_nlink, 3);
    assert_eq!(dotdot_ino(&m.p("b/sub")), lstat(&m.p("b")).st_ino);

    // Over an existing file: the target is replaced and its data freed.
    fs::write(m.p("big"), pattern(2, 0, 4 << 20)).unwrap();
    fs::write(m.p("small"), b"small").unwrap();
    let small_ino = lstat(&m.p("small")).st_ino;
    let before = free_blocks(m.path());
    fs::rename(m.p("small"), m.p("big")).unwrap();
    assert_eq!(fs::read(m.p("big")).unwrap(), b"small");
    assert_eq!(lstat(&m.p("big")).st_ino, small_ino);
    assert_eq!(err_of(fs::metadata(m.p("small"))), libc::ENOENT);
    // Freed when the kernel forgets the replaced inode (it may still have it cached).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while free_blocks(m.path()) < before + 1000 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        free_blocks(m.path()) >= before + 1000,
        "replaced target's 4 MiB not freed"
    );

    // A directory over an empty directory, and over a non-empty one.
    fs::create_dir(m.p("d1")).unwrap();
    fs::write(m.p("d1/inside"), b"1").unwrap();
    fs::create_dir(m.p("empty")).unwrap();
    fs::rename(m.p("d1"), m.p("empty")).unwrap();
    assert_eq!(fs::read(m.p("empty/inside")).unwrap(), b"1");
    fs::create_dir(m.p("d2")).unwrap();
    assert_eq!(err_of(fs::rename(m.p("d2"), m.p("empty"))), libc::ENOTEMPTY);
    assert_eq!(err_of(fs::rename(m.p("d2"), m.p("b/h"))), libc::ENOTDIR);
    assert_eq!(err_of(fs::rename(m.p("b/h"), m.p("d2"))), libc::EISDIR);
    // Into its own subdirectory.
    fs::create_dir_all(m.p("d2/x/y")).unwrap();
    assert_eq!(err_of(fs::rename(m.p("d2"), m.p("d2/x/y/z"))), libc::EINVAL);
    // Onto itself: nothing happens.
    fs::rename(m.p("b/h"), m.p("b/h")).unwrap();
    assert_eq!(fs::read(m.p("b/h")).unwrap(), b"f");
    m.finish();
}

#[test]
fn rename_noreplace_and_exchange() {
    let m = Mount::new();
    fs::create_dir_all(m.p("a/dir/deep")).unwrap();
    fs::create_dir(m.p("b")).unwrap();
    fs::write(m.p("a/dir/deep/file"), b"deep").unwrap();
    fs::write(m.p("b/file"), b"plain").unwrap();
    fs::write(m.p("x"), b"x").unwrap();
    fs::write(m.p("y"), b"y").unwrap();
    assert_eq!(
        renameat2(&m.p("x"), &m.p("y"), libc::RENAME_NOREPLACE),
        Err(libc::EEXIST)
    );
    assert_eq!(fs::read(m.p("x")).unwrap(), b"x");
    assert_eq!(fs::read(m.p("y")).unwrap(), b"y");
    renameat2(&m.p("x"), &m.p("z"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(m.p("z")).unwrap(), b"x");

    // Two files.
    renameat2(&m.p("z"), &m.p("y"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.p("z")).unwrap(), b"y");
    assert_eq!(fs::read(m.p("y")).unwrap(), b"x");
    assert_eq!(
        renameat2(&m.p("z"), &m.p("missing"), libc::RENAME_EXCHANGE),
        Err(libc::ENOENT)
    );

    // A directory and a file in different directories.
    let dir_ino = lstat(&m.p("a/dir")).st_ino;
    let file_ino = lstat(&m.p("b/file")).st_ino;
    let (a_ino, b_ino) = (lstat(&m.p("a")).st_ino, lstat(&m.p("b")).st_ino);
    renameat2(&m.p("a/dir"), &m.p("b/file"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(lstat(&m.p("a/dir")).st_ino, file_ino);
    assert_eq!(lstat(&m.p("b/file")).st_ino, dir_ino);
    assert_eq!(fs::read(m.p("a/dir")).unwrap(), b"plain");
    assert_eq!(fs::read(m.p("b/file/deep/file")).unwrap(), b"deep");
    assert_eq!(dotdot_ino(&m.p("b/file")), b_ino);
    assert_ne!(dotdot_ino(&m.p("b/file")), a_ino);
    // The subdirectory moved from a to b: link counts follow.
    assert_eq!(lstat(&m.p("a")).st_nlink, 2);
    assert_eq!(lstat(&m.p("b")).st_nlink, 3);

    // Two directories in different directories.
    fs::create_dir(m.p("a/d2")).unwrap();
    fs::create_dir(m.p("other")).unwrap();
    renameat2(&m.p("a/d2"), &m.p("b/file"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(dotdot_ino(&m.p("a/d2")), a_ino);
    assert_eq!(fs::read(m.p("a/d2/deep/file")).unwrap(), b"deep");
    assert_eq!(dotdot_ino(&m.p("b/file")), b_ino);

    // Survives a remount (the on-image parent pointers changed too).
    let mut m = m;
    m.remount();
    assert_eq!(fs::read(m.p("a/d2/deep/file")).unwrap(), b"deep");
    assert_eq!(dotdot_ino(&m.p("a/d2")), lstat(&m.p("a")).st_ino);
    assert_eq!(fs::read(m.p("a/dir")).unwrap(), b"plain");
    m.finish();
}

#[test]
fn chmod_chown_and_nanosecond_times() {
    let m = Mount::new();
    let p = m.p("f");
    fs::write(&p, b"t").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(lstat(&p).st_mode & 0o7777, 0o4751);
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let st = lstat(&p);
    assert_eq!((st.st_uid, st.st_gid), (1234, 5678));
    // Changing the owner clears set-uid.
    assert_eq!(st.st_mode & 0o7777, 0o751);

    let set = |atime: libc::timespec, mtime: libc::timespec| {
        let times = [atime, mtime];
        // SAFETY: valid path and a two-element array.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, cpath(&p).as_ptr(), times.as_ptr(), 0) };
        assert_eq!(r, 0, "utimensat: {}", std::io::Error::last_os_error());
    };
    let ts = |sec: i64, nsec: i64| libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    set(
        ts(1_000_000_000, 123_456_789),
        ts(1_500_000_000, 987_654_321),
    );
    let st = lstat(&p);
    assert_eq!(
        (st.st_atime, st.st_atime_nsec),
        (1_000_000_000, 123_456_789)
    );
    assert_eq!(
        (st.st_mtime, st.st_mtime_nsec),
        (1_500_000_000, 987_654_321)
    );
    // Before the epoch (whole seconds), and far in the future.
    set(ts(-1_000, 0), ts(4_000_000_000, 999_999_999));
    let st = lstat(&p);
    assert_eq!((st.st_atime, st.st_atime_nsec), (-1_000, 0));
    assert_eq!(
        (st.st_mtime, st.st_mtime_nsec),
        (4_000_000_000, 999_999_999)
    );
    // UTIME_OMIT keeps atime, UTIME_NOW sets mtime to now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    set(ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW));
    let st = lstat(&p);
    assert_eq!((st.st_atime, st.st_atime_nsec), (-1_000, 0));
    assert!(
        (st.st_mtime - now).abs() <= 5,
        "UTIME_NOW gave {}",
        st.st_mtime
    );
    assert!(st.st_ctime >= now - 5);
    set(ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_OMIT));
    let st2 = lstat(&p);
    assert!((st2.st_atime - now).abs() <= 5);
    assert_eq!(
        (st2.st_mtime, st2.st_mtime_nsec),
        (st.st_mtime, st.st_mtime_nsec)
    );

    // Writing updates mtime; it is kept exactly across a remount.
    set(ts(1, 0), ts(2, 0));
    fs::write(&p, b"again").unwrap();
    let st = lstat(&p);
    assert!(st.st_mtime >= now - 5, "write did not update mtime");
    let mut m = m;
    m.remount();
    let st3 = lstat(&m.p("f"));
    assert_eq!(
        (st3.st_mtime, st3.st_mtime_nsec),
        (st.st_mtime, st.st_mtime_nsec)
    );
    assert_eq!((st3.st_uid, st3.st_gid), (1234, 5678));
    m.finish();
}

/// Sets both times of `p` to `(sec, nsec)` and returns what stat reads back.
fn roundtrip_time(p: &Path, sec: i64, nsec: i64) -> (i64, i64) {
    let t = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let times = [t, t];
    // SAFETY: valid path and a two-element array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, cpath(p).as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat: {}", std::io::Error::last_os_error());
    let st = lstat(p);
    assert_eq!(
        (st.st_atime, st.st_atime_nsec),
        (st.st_mtime, st.st_mtime_nsec)
    );
    (st.st_mtime, st.st_mtime_nsec)
}

#[test]
fn pre_epoch_timestamps_keep_their_nanoseconds() {
    let m = Mount::new();
    let p = m.p("old");
    fs::write(&p, b"").unwrap();
    assert_eq!(roundtrip_time(&p, -1, 0), (-1, 0));
    // (-1000, 1) is 1969-12-31T23:43:20.000000001Z: seconds round down, nanoseconds count up.
    assert_eq!(roundtrip_time(&p, -1_000, 1), (-1_000, 1));
    assert_eq!(roundtrip_time(&p, -1, 500_000_000), (-1, 500_000_000));
    m.finish();
}

/// Runs `sh -c script` as user `nobody` (uid/gid 65534, no groups).
fn as_nobody(script: &str) -> std::process::Output {
    run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(script))
}

/// `as_nobody` for a script that must succeed.
fn as_nobody_ok(script: &str) {
    let out = as_nobody(script);
    assert!(out.status.success(), "{script}: {}", describe(&out));
}

#[test]
fn permissions_are_enforced_for_other_users() {
    let m = Mount::new();
    fs::write(m.p("secret"), b"root only").unwrap();
    fs::set_permissions(m.p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.p("public"), b"everyone").unwrap();
    fs::set_permissions(m.p("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(m.p("rootdir")).unwrap();
    fs::set_permissions(m.p("rootdir"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(m.p("open")).unwrap();
    fs::set_permissions(m.p("open"), fs::Permissions::from_mode(0o777)).unwrap();
    let q = |rel: &str| m.p(rel).display().to_string();

    // The positive controls prove the user can reach the mount at all.
    let out = as_nobody(&format!("cat {}", q("public")));
    assert!(
        out.status.success(),
        "nobody cannot read 0644: {}",
        describe(&out)
    );
    assert_eq!(out.stdout, b"everyone");
    let out = as_nobody(&format!("echo mine > {}", q("open/mine")));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(lstat(&m.p("open/mine")).st_uid, 65534);
    assert_eq!(lstat(&m.p("open/mine")).st_gid, 65534);

    let out = as_nobody(&format!("cat {}", q("secret")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        describe(&out)
    );
    let out = as_nobody(&format!("echo x >> {}", q("public")));
    assert!(!out.status.success(), "nobody appended to a 0644 root file");
    let out = as_nobody(&format!("touch {}", q("rootdir/new")));
    assert!(
        !out.status.success(),
        "nobody created a file in a 0755 root dir"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    assert_eq!(err_of(fs::metadata(m.p("rootdir/new"))), libc::ENOENT);
    let out = as_nobody(&format!("rm -f {}", q("public")));
    assert!(
        !out.status.success(),
        "nobody removed a file from the root dir"
    );
    assert!(m.p("public").exists());
    let out = as_nobody(&format!("chmod 777 {}", q("public")));
    assert!(!out.status.success(), "nobody chmodded a root file");
    assert_eq!(lstat(&m.p("public")).st_mode & 0o777, 0o644);
    assert_eq!(fs::read(m.p("public")).unwrap(), b"everyone");
    m.finish();
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid path, name and value buffer.
    let r = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    check(r).map(|_| ())
}

/// getxattr into a buffer of `cap` bytes.
fn getxattr_cap(p: &Path, name: &str, cap: usize) -> Result<Vec<u8>, i32> {
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; cap];
    // SAFETY: valid path and name; the buffer holds `cap` bytes (null when cap is 0).
    let r = unsafe {
        libc::lgetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            if cap == 0 {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            },
            cap,
        )
    };
    let len = check(r)?;
    buf.truncate(if cap == 0 { 0 } else { len as usize });
    if cap == 0 {
        return Ok(vec![0; len as usize]);
    }
    Ok(buf)
}

pub fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    getxattr_cap(p, name, 65536)
}

pub fn listxattr(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let r = unsafe { libc::llistxattr(cpath(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = check(r).expect("listxattr") as usize;
    let mut names: Vec<String> = buf[..len]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    names
}

pub fn removexattr(p: &Path, name: &str) -> Result<(), i32> {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid path and name.
    check(unsafe { libc::lremovexattr(cpath(p).as_ptr(), n.as_ptr()) }).map(|_| ())
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    setxattr(p, name, value, 0).unwrap_or_else(|e| panic!("setxattr {name}: errno {e}"));
}

#[test]
fn xattrs() {
    let mut m = Mount::new();
    let p = m.p("f");
    fs::write(&p, b"x").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    let big = pattern(3, 0, 3000);
    set_xattr(&p, "user.one", b"1");
    set_xattr(&p, "user.big", &big);
    set_xattr(&p, "user.empty", b"");
    set_xattr(&p, "trusted.t", b"trusted value");
    set_xattr(&p, "security.s", b"sec");
    set_xattr(&m.p("d"), "user.on_dir", b"dir");
    assert_eq!(getxattr(&p, "user.one").unwrap(), b"1");
    assert_eq!(getxattr(&p, "user.big").unwrap(), big);
    assert_eq!(getxattr(&p, "user.empty").unwrap(), b"");
    assert_eq!(getxattr(&p, "trusted.t").unwrap(), b"trusted value");
    assert_eq!(getxattr(&p, "security.s").unwrap(), b"sec");
    assert_eq!(getxattr(&p, "user.none"), Err(libc::ENODATA));
    assert_eq!(
        listxattr(&p),
        [
            "security.s",
            "trusted.t",
            "user.big",
            "user.empty",
            "user.one"
        ]
    );
    // Size probe and a too-small buffer.
    assert_eq!(getxattr_cap(&p, "user.big", 0).unwrap().len(), 3000);
    assert_eq!(getxattr_cap(&p, "user.big", 100), Err(libc::ERANGE));
    assert_eq!(
        setxattr(&p, "user.one", b"again", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        setxattr(&p, "user.missing", b"v", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    setxattr(&p, "user.one", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.one").unwrap(), b"replaced");
    setxattr(&p, "user.new", b"created", libc::XATTR_CREATE).unwrap();
    removexattr(&p, "user.empty").unwrap();
    assert_eq!(removexattr(&p, "user.empty"), Err(libc::ENODATA));
    assert_eq!(getxattr(&p, "user.empty"), Err(libc::ENODATA));

    m.remount();
    let p = m.p("f");
    assert_eq!(
        listxattr(&p),
        [
            "security.s",
            "trusted.t",
            "user.big",
            "user.new",
            "user.one"
        ]
    );
    assert_eq!(getxattr(&p, "user.big").unwrap(), big);
    assert_eq!(getxattr(&p, "user.one").unwrap(), b"replaced");
    assert_eq!(getxattr(&p, "trusted.t").unwrap(), b"trusted value");
    assert_eq!(getxattr(&m.p("d"), "user.on_dir").unwrap(), b"dir");
    // Unlinking the file frees its xattrs (fsck checks the block is not leaked).
    fs::remove_file(&p).unwrap();
    m.finish();
}

/// Many attributes per file and values up to Linux's 64 KiB maximum: the inode's attributes
/// outgrow one block and move to chunks, and back when they shrink.
#[test]
fn many_and_large_xattrs() {
    let mut m = Mount::new();
    let p = m.p("f");
    fs::write(&p, b"x").unwrap();
    let blocks_before = lstat(&p).st_blocks;
    for i in 0..1000 {
        set_xattr(
            &p,
            &format!("user.attr_{i:04}"),
            format!("value {i}").as_bytes(),
        );
    }
    let max = pattern(7, 0, 65536);
    set_xattr(&p, "user.max", &max);
    let half = pattern(8, 0, 40000);
    set_xattr(&p, "trusted.half", &half);
    assert_eq!(
        setxattr(&p, "user.toobig", &pattern(9, 0, 65537), 0),
        Err(libc::E2BIG)
    );
    assert!(
        lstat(&p).st_blocks >= blocks_before + 8 * 30,
        "st_blocks counts the attribute chunks"
    );
    let check_all = |p: &Path| {
        let names = listxattr(p);
        assert_eq!(names.len(), 1002);
        for i in (0..1000).step_by(37) {
            let v = getxattr(p, &format!("user.attr_{i:04}")).unwrap();
            assert_eq!(v, format!("value {i}").as_bytes());
        }
        assert_eq!(getxattr(p, "user.max").unwrap(), max);
        assert_eq!(getxattr(p, "trusted.half").unwrap(), half);
    };
    check_all(&p);
    // A change in the middle of the stream, and a replace that grows a value.
    setxattr(
        &p,
        "user.attr_0500",
        &pattern(10, 0, 5000),
        libc::XATTR_REPLACE,
    )
    .unwrap();
    assert_eq!(
        getxattr(&p, "user.attr_0500").unwrap(),
        pattern(10, 0, 5000)
    );
    set_xattr(&p, "user.attr_0500", b"value 500");
    m.remount();
    let p = m.p("f");
    check_all(&p);
    // Shrink back to a few small ones: the inline form again, and the chunks are freed (fsck
    // in `finish` finds no leaked block).
    for i in 0..1000 {
        removexattr(&p, &format!("user.attr_{i:04}")).unwrap();
    }
    removexattr(&p, "trusted.half").unwrap();
    removexattr(&p, "user.max").unwrap();
    set_xattr(&p, "user.small", b"s");
    assert_eq!(listxattr(&p), ["user.small"]);
    assert_eq!(lstat(&p).st_blocks, blocks_before + 8);

    // Limits: the names of one file fit listxattr's 64 KiB, the stream its 508 chunks.
    let q = m.p("names");
    fs::write(&q, b"").unwrap();
    let long = |i: usize| format!("user.{i:04}{}", "n".repeat(246));
    let mut set = 0;
    while set < 300 {
        match setxattr(&q, &long(set), b"", 0) {
            Ok(()) => set += 1,
            Err(e) => {
                assert_eq!(e, libc::ENOSPC);
                break;
            }
        }
    }
    assert_eq!(set, 256, "names up to 64 KiB in all");
    assert_eq!(listxattr(&q).len(), 256);
    let r = m.p("values");
    fs::write(&r, b"").unwrap();
    let mut set = 0;
    while set < 40 {
        match setxattr(
            &r,
            &format!("user.v{set}"),
            &pattern(set as u64, 0, 65536),
            0,
        ) {
            Ok(()) => set += 1,
            Err(e) => {
                assert_eq!(e, libc::ENOSPC);
                break;
            }
        }
    }
    assert_eq!(set, 31, "about 2 MiB of attributes per file");
    assert_eq!(getxattr(&r, "user.v30").unwrap(), pattern(30, 0, 65536));
    assert_eq!(getxattr(&r, "user.v31"), Err(libc::ENODATA));
    m.remount();
    assert_eq!(listxattr(&m.p("names")).len(), 256);
    assert_eq!(
        getxattr(&m.p("values"), "user.v0").unwrap(),
        pattern(0, 0, 65536)
    );
    // Unlinking frees every chunk (fsck in `finish`).
    fs::remove_file(m.p("values")).unwrap();
    m.unmount();
    // Older builds must refuse the image instead of misreading the chunked form.
    let info = info(m.image());
    assert!(info.contains("features:     large_xattrs"), "{info}");
    m.finish();
}

#[test]
fn statfs_reports_capacity_and_usage() {
    let mut m = Mount::new();
    let st = statfs(m.path());
    assert_eq!(st.f_bsize, 4096);
    assert_eq!(st.f_namelen, 255);
    // `info` locks the image, so it runs between mounts.
    m.unmount();
    let capacity = info_field(&info(m.image()), "capacity");
    m.mount();
    let diff = (st.f_blocks as i64 - capacity as i64).unsigned_abs();
    assert!(
        diff * 100 <= capacity,
        "statfs f_blocks {} vs info capacity {capacity}",
        st.f_blocks
    );
    let out = run(Command::new("stat")
        .args(["-f", "-c", "%l %S"])
        .arg(m.path()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "255 4096");

    let free0 = free_blocks(m.path());
    fs::write(m.p("eight"), pattern(4, 0, 8 << 20)).unwrap();
    let free1 = free_blocks(m.path());
    assert!(
        free1 + 2048 <= free0 || statfs(m.path()).f_blocks > st.f_blocks,
        "free {free0} -> {free1} after writing 8 MiB"
    );
    let blocks1 = statfs(m.path()).f_blocks;
    let used1 = blocks1 - free1;
    assert!(
        used1 >= (st.f_blocks - free0) + 2048,
        "used did not grow by 8 MiB"
    );
    fs::remove_file(m.p("eight")).unwrap();
    // FUSE sends the release of the closed file asynchronously: the space comes back then.
    let mut free2 = free_blocks(m.path());
    for _ in 0..100 {
        if free2 >= free1 + 2048 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        free2 = free_blocks(m.path());
    }
    assert!(
        free2 >= free1 + 2048,
        "free {free1} -> {free2} after deleting 8 MiB"
    );
    let df = run(Command::new("df").arg("-B4096").arg(m.path()));
    assert!(df.status.success(), "{}", describe(&df));
    m.finish();
}

#[test]
fn name_length_limit() {
    let m = Mount::new();
    let ok = "n".repeat(255);
    fs::write(m.p(&ok), b"ok").unwrap();
    assert_eq!(fs::read(m.p(&ok)).unwrap(), b"ok");
    fs::create_dir(m.p(&"d".repeat(255))).unwrap();
    let long = "n".repeat(256);
    assert_eq!(err_of(fs::write(m.p(&long), b"no")), libc::ENAMETOOLONG);
    assert_eq!(err_of(fs::create_dir(m.p(&long))), libc::ENAMETOOLONG);
    assert_eq!(err_of(fs::metadata(m.p(&long))), libc::ENAMETOOLONG);
    assert_eq!(err_of(fs::rename(m.p(&ok), m.p(&long))), libc::ENAMETOOLONG);
    let names: Vec<_> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().len())
        .collect();
    assert_eq!(names, [255, 255]);
    m.finish();
}

fn mknod_file(p: &Path) {
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(cpath(p).as_ptr(), libc::S_IFREG | 0o644, 0) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn list(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn assert_exact_listing(dir: &Path, expected: &HashSet<String>) {
    let listed = list(dir);
    let set: HashSet<String> = listed.iter().cloned().collect();
    assert_eq!(listed.len(), set.len(), "duplicates in the listing");
    let missing: Vec<_> = expected.difference(&set).take(5).collect();
    let extra: Vec<_> = set.difference(expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "listing differs: missing {missing:?}, extra {extra:?}"
    );
}

#[test]
fn readdir_10k_entries_and_delete_while_listing() {
    let m = Mount::new();
    let dir = m.p("many");
    fs::create_dir(&dir).unwrap();
    let names: HashSet<String> = (0..10_000)
        .map(|i| format!("entry-{i:05}-{}", i * 7919 % 10007))
        .collect();
    for n in &names {
        mknod_file(&dir.join(n));
    }
    assert_exact_listing(&dir, &names);
    // Delete every other one, list again.
    let mut kept = HashSet::new();
    for (i, n) in names.iter().enumerate() {
        if i % 2 == 0 {
            fs::remove_file(dir.join(n)).unwrap();
        } else {
            kept.insert(n.clone());
        }
    }
    assert_exact_listing(&dir, &kept);

    // rm -rf style: unlink each entry as readdir returns it.
    let mut seen = HashSet::new();
    for e in fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            seen.insert(name.clone()),
            "{name} listed twice during deletion"
        );
        fs::remove_file(dir.join(&name)).unwrap();
    }
    assert_eq!(seen, kept, "entries lost while deleting");
    assert!(list(&dir).is_empty());
    fs::remove_dir(&dir).unwrap();

    // A tree removed by remove_dir_all.
    for d in 0..20 {
        let sub = m.p(&format!("tree/{d}/inner"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..50 {
            fs::write(sub.join(f.to_string()), b"z").unwrap();
        }
    }
    fs::remove_dir_all(m.p("tree")).unwrap();
    assert!(list(m.path()).is_empty());
    m.finish();
}

#[test]
fn readdir_100k_entries() {
    let m = Mount::with(&["--size", "64M"], &[]);
    let dir = m.p("huge");
    fs::create_dir(&dir).unwrap();
    let n = 100_000;
    let start = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
    for name in &names {
        mknod_file(&dir.join(name));
    }
    let created = start.elapsed();
    let mut rng = Rng::new(seed("readdir_100k_entries"));
    for _ in 0..50 {
        let i = rng.below(n) as usize;
        let md = fs::symlink_metadata(dir.join(&names[i])).unwrap();
        assert!(md.is_file());
    }
    let t = Instant::now();
    assert_exact_listing(&dir, &names.iter().cloned().collect());
    eprintln!("100k entries: create {:?}, list {:?}", created, t.elapsed());
    m.finish();
}

#[test]
fn readdir_while_creating_and_deleting() {
    let m = Mount::new();
    let dir = m.p("busy");
    fs::create_dir(&dir).unwrap();
    let old: HashSet<String> = (0..3000).map(|i| format!("old{i}")).collect();
    for n in &old {
        mknod_file(&dir.join(n));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                mknod_file(&dir.join(format!("new{i}")));
                if i >= 2 && i % 3 == 0 {
                    fs::remove_file(dir.join(format!("new{}", i - 2))).unwrap();
                }
                i += 1;
            }
            i
        })
    };
    // Entries neither created nor removed during the listing appear exactly once.
    let mut seen = Vec::new();
    for e in fs::read_dir(&dir).unwrap() {
        seen.push(e.unwrap().file_name().to_string_lossy().into_owned());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let created = churn.join().unwrap();
    let olds: Vec<&String> = seen.iter().filter(|n| n.starts_with("old")).collect();
    let set: HashSet<&String> = seen.iter().collect();
    assert_eq!(
        set.len(),
        seen.len(),
        "duplicates while the directory changed"
    );
    assert_eq!(
        olds.len(),
        3000,
        "stable entries lost or repeated ({created} created meanwhile)"
    );
    m.finish();
}

/// The mode as the kernel reports it when asked for nothing else (statx with STATX_MODE): from
/// its attribute cache, which a write's reply does not refresh.
fn cached_mode(p: &Path) -> u32 {
    // SAFETY: statx is plain old data and statx(2) fills it.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a valid out pointer.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MODE,
            &mut st,
        )
    };
    assert_eq!(r, 0, "statx {}", p.display());
    u32::from(st.stx_mode) & 0o7777
}

/// Set-ID bits and file capabilities drop on write, truncate and chown exactly as on tmpfs (the
/// daemon does it: FUSE_HANDLE_KILLPRIV_V2), and the kernel's cached mode follows at once.
#[test]
fn setid_bits_and_capabilities_drop_like_tmpfs() {
    let m = Mount::new();
    fs::set_permissions(m.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let file = |name: &str, mode: u32| {
        let p = m.p(name);
        fs::write(&p, b"").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(cached_mode(&p), mode);
        p
    };
    let q = |p: &Path| p.display().to_string();

    // Written by a user without CAP_FSETID: both bits go (the group may execute).
    let a = file("a", 0o6777);
    as_nobody_ok(&format!("echo x >> {}", q(&a)));
    assert_eq!(cached_mode(&a), 0o777);
    // Set-group-ID without group execute marks mandatory locking: it stays when the writer is
    // in the file's group, and goes when it is not.
    let b = file("b", 0o2767);
    as_nobody_ok(&format!("echo x >> {}", q(&b)));
    assert_eq!(cached_mode(&b), 0o767);
    let b2 = file("b2", 0o2767);
    std::os::unix::fs::lchown(&b2, None, Some(65534)).unwrap();
    fs::set_permissions(&b2, fs::Permissions::from_mode(0o2767)).unwrap();
    as_nobody_ok(&format!("echo x >> {}", q(&b2)));
    assert_eq!(cached_mode(&b2), 0o2767);
    // Root keeps them on write and truncate.
    let c = file("c", 0o6777);
    OpenOptions::new()
        .append(true)
        .open(&c)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert_eq!(cached_mode(&c), 0o6777);
    let e = file("e", 0o6777);
    OpenOptions::new()
        .write(true)
        .open(&e)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(cached_mode(&e), 0o6777);
    // Truncated by an unprivileged user: dropped.
    let d = file("d", 0o6777);
    as_nobody_ok(&format!("truncate -s 0 {}", q(&d)));
    assert_eq!(cached_mode(&d), 0o777);
    // chown drops them even for root; the group bit only when the group may execute.
    let f = file("f", 0o6755);
    std::os::unix::fs::lchown(&f, Some(65534), None).unwrap();
    assert_eq!(cached_mode(&f), 0o755);
    let h = file("h", 0o6745);
    std::os::unix::fs::lchown(&h, Some(0), Some(65534)).unwrap();
    assert_eq!(cached_mode(&h), 0o2745);
    // The kernel's own requests to drop them (before fallocate, copy_file_range, or a chown
    // that changes nothing) reach the daemon as a SETATTR that sets nothing.
    let fa = file("fa", 0o6777);
    as_nobody_ok(&format!("fallocate -l 8192 {}", q(&fa)));
    assert_eq!(cached_mode(&fa), 0o777);
    let fr = file("fr", 0o6777);
    let out = run(Command::new("fallocate").args(["-l", "8192"]).arg(&fr));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(cached_mode(&fr), 0o6777);
    fs::write(m.p("src"), b"hello").unwrap();
    let cf = file("cf", 0o6777);
    as_nobody_ok(&format!(
        "/usr/bin/python3 -c 'import os; a = os.open(\"{}\", os.O_RDONLY); \
         b = os.open(\"{}\", os.O_WRONLY); os.copy_file_range(a, b, 5)'",
        q(&m.p("src")),
        q(&cf)
    ));
    assert_eq!(fs::read(&cf).unwrap(), b"hello");
    assert_eq!(cached_mode(&cf), 0o777);
    let cn = file("cn", 0o6777);
    std::os::unix::fs::lchown(&cn, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&cn, fs::Permissions::from_mode(0o6777)).unwrap();
    as_nobody_ok(&format!(
        "/usr/bin/python3 -c 'import os; os.chown(\"{}\", -1, -1)'",
        q(&cn)
    ));
    assert_eq!(cached_mode(&cn), 0o777);

    // After a chmod puts the bits back, the next write drops them again.
    as_nobody_ok(&format!("echo y >> {}", q(&a)));
    fs::set_permissions(&a, fs::Permissions::from_mode(0o6777)).unwrap();
    as_nobody_ok(&format!("echo z >> {}", q(&a)));
    assert_eq!(cached_mode(&a), 0o777);

    // File capabilities (a valid v2 capability set: cap_net_raw, effective) go with any write.
    let k = file("k", 0o755);
    let mut caps = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        caps.extend_from_slice(&word.to_le_bytes());
    }
    setxattr(&k, "security.capability", &caps, 0).unwrap();
    assert!(getxattr_cap(&k, "security.capability", 64).is_ok());
    OpenOptions::new()
        .append(true)
        .open(&k)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert_eq!(
        getxattr_cap(&k, "security.capability", 64),
        Err(libc::ENODATA)
    );
    // Stores through a mapping drop nothing, neither set-ID bits nor capabilities (the page
    // cache's write-back reaches the daemon as ordinary WRITEs).
    let s = file("s", 0o6777);
    fs::write(&s, b"abcd").unwrap();
    setxattr(&s, "security.capability", &caps, 0).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&s).unwrap();
    // SAFETY: a fresh shared mapping of 4 bytes of an open file, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        *p.cast::<u8>() = b'X';
        assert_eq!(libc::msync(p, 4, libc::MS_SYNC), 0);
        libc::munmap(p, 4);
    }
    drop(f);
    assert_eq!(fs::read(&s).unwrap(), b"Xbcd");
    assert_eq!(cached_mode(&s), 0o6777);
    assert!(getxattr_cap(&s, "security.capability", 64).is_ok());

    // What the kernel showed is what the image holds.
    let mut m = m;
    m.remount();
    for (name, mode) in [
        ("a", 0o777),
        ("b", 0o767),
        ("b2", 0o2767),
        ("c", 0o6777),
        ("s", 0o6777),
    ] {
        assert_eq!(lstat(&m.p(name)).st_mode & 0o7777, mode, "{name}");
    }
    for (name, mode) in [("d", 0o777), ("e", 0o6777), ("f", 0o755), ("h", 0o2745)] {
        assert_eq!(lstat(&m.p(name)).st_mode & 0o7777, mode, "{name}");
    }
    m.finish();
}

/// Runs `f` on a fresh tmpfs (the reference) and returns its result.
fn on_tmpfs<T>(f: impl FnOnce(&Path) -> T) -> T {
    on_tmpfs_with("size=8m", f)
}

/// `on_tmpfs` with mount options.
fn on_tmpfs_with<T>(options: &str, f: impl FnOnce(&Path) -> T) -> T {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(dir.path()));
    assert!(out.status.success(), "mount tmpfs: {}", describe(&out));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(dir.path())));
    let _ = Command::new("umount").arg(dir.path()).status();
    r.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// POSIX ACLs with the standard tools, compared with tmpfs: setfacl/getfacl, the mode bits
/// that follow an access ACL and chmod, default ACLs inherited by new files and directories in
/// place of the umask, and the kernel enforcing named entries for another user. They survive
/// a remount; `-o noacl` turns them off.
#[test]
fn acls_as_on_tmpfs() {
    const SCRIPT: &str = "
        umask 022
        mkdir d open
        setfacl -m u:nobody:rwx,g:nogroup:r open
        setfacl -d -m u:nobody:rx,g::rwx,o::- d
        touch d/f plain
        mkdir d/sub
        mknod d/fifo p
        ln -s f d/link
        echo data > d/secret
        chmod 640 d/secret
        setfacl -m u:nobody:r d/secret
        chmod 600 d/f
        setfacl -m m::rw d/sub
        setfacl -m u::rwx,g::-,o::r plain
        getfacl -p -n d d/* open plain 2>&1
        stat -c '%A %n' d d/* open plain
        setpriv --reuid=65534 --regid=65534 --clear-groups sh -c '
            cat d/secret; cat d/f 2>/dev/null || echo denied f
            echo by nobody > open/new && echo wrote open/new
            echo x > plain 2>/dev/null || echo denied plain' 2>&1
        stat -c '%A %U %n' open/new
        setfacl -b d/secret
        setfacl -k d
        getfacl -p -n d d/secret 2>&1
        stat -c '%A %n' d/secret
        touch d/after
        stat -c '%A %n' d/after
    ";
    let script = |root: &Path| {
        let out = run(Command::new("sh").arg("-c").arg(SCRIPT).current_dir(root));
        assert!(out.status.success(), "{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let want = on_tmpfs(script);
    assert!(want.contains("user:65534:r-x"), "tmpfs has ACLs: {want}");
    let mut m = Mount::new();
    let got = script(m.path());
    assert_eq!(got, want);
    let listing = |root: &Path| {
        let out = run(Command::new("getfacl")
            .args(["-R", "-p", "-n", "."])
            .current_dir(root));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = listing(m.path());
    m.remount();
    assert_eq!(listing(m.path()), before);
    m.unmount();
    let mut m2 = Mount::with(&["--size", "16M"], &["noacl"]);
    let out = run(Command::new("setfacl")
        .args(["-m", "u:nobody:r"])
        .arg(m2.p(".")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not supported"),
        "{}",
        describe(&out)
    );
    m2.unmount();
    m.finish();
}

/// Root's side of `daemon_checks_permissions_as_tmpfs`: files of every kind of access, in a
/// world-writable directory `t`, then a look at `private/f` so that the kernel has the name
/// cached before another user asks.
const PERM_SETUP: &str = "
    umask 022
    mkdir -m 0777 t && cd t
    mkdir -m 0700 private && echo secret > private/f && cat private/f >/dev/null
    mkdir -m 0755 shut && echo x > shut/f && mkdir shut/empty
    mkdir -m 0711 blind && echo x > blind/known
    mkdir -m 1777 sticky && echo x > sticky/roots && chmod 666 sticky/roots
    mkdir -m 0777 mine other
    mkdir mine/rodir
    echo data > rofile && chmod 644 rofile
    echo data > rwfile && chmod 666 rwfile
    echo data > setid && chmod 6666 setid
    echo grp > grpfile && chgrp 1 grpfile && chmod 640 grpfile
    echo acl > aclread && chmod 600 aclread && setfacl -m u:nobody:r aclread
    echo acl > acldeny && chmod 644 acldeny && setfacl -m u:nobody:- acldeny
    echo acl > aclgroup && chmod 600 aclgroup && setfacl -m g:1:rw aclgroup
    mkdir -m 0700 acldir && echo in > acldir/f && setfacl -m u:nobody:rwx acldir
    echo x > mine/given && chown 65534:0 mine/given
    cp /usr/bin/true tru700 && chmod 700 tru700
    cp /usr/bin/true tru711 && chmod 711 tru711
    /usr/bin/python3 -c \"import os; os.setxattr('rofile', 'user.a', b'1'); \\
        os.setxattr('rwfile', 'trusted.t', b'1')\"
    cat private/f >/dev/null
";

/// The other user's side: each operation and its errno, as `nobody` with the supplementary
/// group 1 (`daemon`).
const PERM_PROBE: &str = r#"
import ctypes, errno, os, subprocess
os.umask(0o022)
def t(name, f, *a):
    try:
        r = f(*a)
        print(name, r if isinstance(r, (bytes, list)) else "ok")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
def opened(path, flags):
    os.close(os.open(path, flags, 0o644))
def run(path):
    subprocess.run([path], check=True)
libc = ctypes.CDLL(None, use_errno=True)
def utimensat(path, atime, mtime):
    times = (ctypes.c_long * 4)(0, atime, 0, mtime)
    if libc.utimensat(-100, path.encode(), times, 0) != 0:
        raise OSError(ctypes.get_errno(), path)
NOW, OMIT = (1 << 30) - 1, (1 << 30) - 2
t("stat private/f", os.stat, "private/f")
t("stat private/none", os.stat, "private/none")
t("open private/f", opened, "private/f", os.O_RDONLY)
t("list private", os.listdir, "private")
t("chdir private", lambda: (os.chdir("private"), os.chdir("..")) and None)
t("list blind", os.listdir, "blind")
t("stat blind/known", os.stat, "blind/known")
t("create shut/new", opened, "shut/new", os.O_CREAT | os.O_WRONLY)
t("mkdir shut/d", os.mkdir, "shut/d")
t("mkfifo shut/p", os.mkfifo, "shut/p")
t("symlink shut/s", os.symlink, "x", "shut/s")
t("unlink shut/f", os.unlink, "shut/f")
t("rmdir shut/empty", os.rmdir, "shut/empty")
t("rename shut/f", os.rename, "shut/f", "mine/f")
t("create mine/own", opened, "mine/own", os.O_CREAT | os.O_WRONLY)
t("rename into shut", os.rename, "mine/own", "shut/own")
t("link into shut", os.link, "mine/own", "shut/own")
t("unlink sticky/roots", os.unlink, "sticky/roots")
t("rename sticky/roots", os.rename, "sticky/roots", "sticky/x")
t("create sticky/mine", opened, "sticky/mine", os.O_CREAT | os.O_WRONLY)
t("rename over sticky/roots", os.rename, "sticky/mine", "sticky/roots")
t("unlink sticky/mine", os.unlink, "sticky/mine")
t("rename mine/rodir away", os.rename, "mine/rodir", "other/rodir")
t("rename mine/rodir here", os.rename, "mine/rodir", "mine/rodir2")
t("read rofile", opened, "rofile", os.O_RDONLY)
t("write rofile", opened, "rofile", os.O_WRONLY)
t("rdwr rofile", opened, "rofile", os.O_RDWR)
t("trunc-open rofile", opened, "rofile", os.O_RDONLY | os.O_TRUNC)
t("truncate rofile", os.truncate, "rofile", 0)
t("truncate rwfile", os.truncate, "rwfile", 1)
t("trunc-open rwfile", opened, "rwfile", os.O_WRONLY | os.O_TRUNC)
t("chmod rofile", os.chmod, "rofile", 0o666)
t("chown rofile", os.chown, "rofile", 65534, -1)
t("chgrp rofile", os.chown, "rofile", -1, 65534)
t("touch rwfile", os.utime, "rwfile")
t("touch rofile", os.utime, "rofile")
t("utime rwfile", os.utime, "rwfile", (1, 1))
t("utimensat rwfile now,omit", utimensat, "rwfile", NOW, OMIT)
t("utimensat rwfile omit,now", utimensat, "rwfile", OMIT, NOW)
t("utimensat rwfile now,now", utimensat, "rwfile", NOW, NOW)
t("chmod mine/own g+s", os.chmod, "mine/own", 0o2755)
t("chgrp mine/own 1", os.chown, "mine/own", -1, 1)
t("chgrp mine/own 0", os.chown, "mine/own", -1, 0)
t("chown mine/own self", os.chown, "mine/own", 65534, -1)
t("chmod mine/given g+s", os.chmod, "mine/given", 0o2755)
t("utime mine/given", os.utime, "mine/given", (1, 1))
fd = os.open("setid", os.O_WRONLY)
t("write setid", os.write, fd, b"x")
os.close(fd)
for p, m in [("rofile", os.R_OK), ("rofile", os.W_OK), ("rofile", os.X_OK), ("private", os.X_OK),
             ("blind", os.R_OK), ("blind", os.X_OK), ("tru711", os.X_OK), ("aclread", os.R_OK),
             ("acldeny", os.R_OK), ("aclgroup", os.W_OK), ("acldir", os.W_OK), ("rofile", os.F_OK)]:
    print("access", p, m, os.access(p, m))
t("read aclread", opened, "aclread", os.O_RDONLY)
t("write aclread", opened, "aclread", os.O_WRONLY)
t("read acldeny", opened, "acldeny", os.O_RDONLY)
t("write aclgroup", opened, "aclgroup", os.O_WRONLY)
t("read grpfile", opened, "grpfile", os.O_RDONLY)
t("list acldir", os.listdir, "acldir")
t("create acldir/new", opened, "acldir/new", os.O_CREAT | os.O_WRONLY)
t("exec tru700", run, "./tru700")
t("exec tru711", run, "./tru711")
t("getxattr rofile user.a", os.getxattr, "rofile", "user.a")
t("setxattr rofile user.b", os.setxattr, "rofile", "user.b", b"1")
t("setxattr rwfile user.b", os.setxattr, "rwfile", "user.b", b"1")
t("removexattr rofile user.a", os.removexattr, "rofile", "user.a")
t("getxattr rwfile trusted.t", os.getxattr, "rwfile", "trusted.t")
t("setxattr rwfile trusted.u", os.setxattr, "rwfile", "trusted.u", b"1")
t("listxattr rwfile", lambda p: sorted(os.listxattr(p)), "rwfile")
acl = os.getxattr("aclread", "system.posix_acl_access")
t("setfacl rofile", os.setxattr, "rofile", "system.posix_acl_access", acl)
t("setfacl mine/own", os.setxattr, "mine/own", "system.posix_acl_access", acl)
t("setxattr mine/own security.x", os.setxattr, "mine/own", "security.x", b"1")
t("setxattr mine/own user.x", os.setxattr, "mine/own", "user.x", b"1")
t("link rofile", os.link, "rofile", "mine/hard1")
t("link rwfile", os.link, "rwfile", "mine/hard2")
"#;

/// Without `default_permissions` (`-o no_default_permissions`) the daemon checks permissions:
/// another user meets exactly what tmpfs gives it (lookups in a directory it may not search,
/// creating and removing in directories it may not write, the sticky bit, open modes and
/// truncation, chmod/chown/utimes of others' files and set-group-ID clearing, access(2),
/// exec, named ACL entries and groups, extended attribute namespaces, protected hardlinks),
/// and the modes, owners and ACLs left behind are the same.
#[test]
fn daemon_checks_permissions_as_tmpfs() {
    let script = |root: &Path| {
        let out = run(Command::new("sh")
            .arg("-c")
            .arg(PERM_SETUP)
            .current_dir(root));
        assert!(out.status.success(), "setup: {}", describe(&out));
        let out = run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--groups=1"])
            .args(["/usr/bin/python3", "-c", PERM_PROBE])
            .current_dir(root.join("t")));
        assert!(out.status.success(), "probe: {}", describe(&out));
        let after = run(Command::new("sh")
            .arg("-c")
            .arg(
                "stat -c '%a %u %g %n' * */* | sort; find . -type f -exec stat -c '%s %n' {} + \
                 | sort; getfacl -p -n $(find . | sort) 2>&1",
            )
            .current_dir(root.join("t")));
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&after.stdout)
    };
    let want = on_tmpfs(script);
    assert!(want.contains("stat private/f EACCES"), "{want}");
    let m = Mount::with(&["--size", "16M"], &["no_default_permissions"]);
    let got = script(m.path());
    let differ: Vec<_> = got
        .lines()
        .zip(want.lines())
        .filter(|(g, w)| g != w)
        .map(|(g, w)| format!("mmapfs: {g}\n tmpfs: {w}"))
        .collect();
    assert!(
        differ.is_empty() && got.lines().count() == want.lines().count(),
        "differs from tmpfs:\n{}\nmmapfs:\n{got}",
        differ.join("\n")
    );
    m.finish();
}

/// Sets only the atime of `p` (mtime untouched).
fn set_atime(p: &Path, sec: i64) {
    let times = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, cpath(p).as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat: {}", std::io::Error::last_os_error());
}

/// Which accesses changed atime, in a fixed sequence: reads of a cached file (a day old atime,
/// again at once, after a write), a write-only open, listings of a directory.
fn atime_changes(root: &Path) -> Vec<(&'static str, bool)> {
    let atime = |p: &Path| {
        let st = lstat(p);
        (st.st_atime, st.st_atime_nsec)
    };
    let tick = || std::thread::sleep(Duration::from_millis(30));
    let f = root.join("f");
    let d = root.join("d");
    fs::write(&f, pattern(1, 0, 8192)).unwrap();
    fs::create_dir(&d).unwrap();
    fs::write(d.join("x"), b"x").unwrap();
    let two_days_ago = lstat(&f).st_mtime - 2 * 86400;
    let mut out = Vec::new();
    let mut step = |what: &'static str, p: &Path, act: &dyn Fn()| {
        tick();
        let before = atime(p);
        act();
        out.push((what, atime(p) != before));
    };
    set_atime(&f, two_days_ago);
    step("read, atime two days old", &f, &|| {
        drop(fs::read(&f).unwrap())
    });
    step("read again", &f, &|| drop(fs::read(&f).unwrap()));
    fs::write(&f, pattern(2, 0, 8192)).unwrap();
    step("read after a write", &f, &|| drop(fs::read(&f).unwrap()));
    step("write-only open", &f, &|| {
        drop(OpenOptions::new().write(true).open(&f).unwrap())
    });
    set_atime(&d, two_days_ago);
    step("list, atime two days old", &d, &|| {
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1)
    });
    step("list again", &d, &|| {
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1)
    });
    out
}

/// atime under relatime (the default), strictatime and noatime, compared with tmpfs under the
/// same option; atime survives a remount.
#[test]
fn atime_follows_the_mount_option_as_on_tmpfs() {
    for option in ["relatime", "strictatime", "noatime"] {
        let want = on_tmpfs_with(&format!("size=8m,{option}"), atime_changes);
        let changed: Vec<bool> = want.iter().map(|w| w.1).collect();
        let expected = match option {
            "relatime" => [true, false, true, false, true, false],
            "strictatime" => [true, true, true, false, true, true],
            _ => [false; 6],
        };
        assert_eq!(changed, expected, "tmpfs -o {option}: {want:?}");
        let options: &[&str] = if option == "relatime" { &[] } else { &[option] };
        let mut m = Mount::with(&["--size", "16M"], options);
        assert_eq!(atime_changes(m.path()), want, "-o {option}");
        let st = lstat(&m.p("f"));
        m.remount();
        let again = lstat(&m.p("f"));
        assert_eq!(
            (again.st_atime, again.st_atime_nsec),
            (st.st_atime, st.st_atime_nsec),
            "-o {option}: atime after remount"
        );
        m.finish();
    }
}

/// RENAME_WHITEOUT (overlayfs on an upper directory here): the file moves and a 0/0 character
/// device takes its old name, as on tmpfs; it survives a remount and fsck is clean.
#[test]
fn rename_whiteout_as_on_tmpfs() {
    let outcome = |root: &Path| {
        fs::write(root.join("a"), b"A").unwrap();
        fs::write(root.join("over"), b"old").unwrap();
        renameat2(&root.join("a"), &root.join("b"), libc::RENAME_WHITEOUT).unwrap();
        renameat2(&root.join("b"), &root.join("over"), libc::RENAME_WHITEOUT).unwrap();
        let both = renameat2(
            &root.join("over"),
            &root.join("a"),
            libc::RENAME_WHITEOUT | libc::RENAME_EXCHANGE,
        );
        let mut names: Vec<(String, u32, u64)> = fs::read_dir(root)
            .unwrap()
            .flatten()
            .map(|e| {
                let md = fs::symlink_metadata(e.path()).unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    md.mode() & libc::S_IFMT,
                    md.rdev(),
                )
            })
            .collect();
        names.sort();
        (names, fs::read(root.join("over")).unwrap(), both)
    };
    let want = on_tmpfs(outcome);
    let mut m = Mount::new();
    assert_eq!(outcome(m.path()), want);
    m.remount();
    let md = fs::symlink_metadata(m.p("a")).unwrap();
    assert!(md.file_type().is_char_device() && md.rdev() == 0);
    assert_eq!(fs::read(m.p("over")).unwrap(), b"A");
    m.finish();
}

/// lsattr/chattr work through the inode-flag ioctls: `A` (no atime updates) and `d` (no dump)
/// are stored and survive a remount, others are EOPNOTSUPP; an unknown ioctl is ENOTTY, and
/// none of them fills the daemon's log.
#[test]
fn inode_flag_ioctls_and_unknown_ioctls() {
    let mut m = Mount::new();
    fs::write(m.p("f"), b"x").unwrap();
    let f = m.p("f");
    let lsattr = |p: &Path| {
        let out = run(Command::new("lsattr").arg("-d").arg(p));
        assert!(out.status.success(), "lsattr: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert!(!lsattr(&f).contains(['A', 'd']), "{}", lsattr(&f));
    let out = run(Command::new("chattr").args(["+A", "+d"]).arg(&f));
    assert!(out.status.success(), "chattr +A +d: {}", describe(&out));
    assert!(
        lsattr(&f).contains('A') && lsattr(&f).contains('d'),
        "{}",
        lsattr(&f)
    );
    // +A: reads leave atime alone, even a day-old one under relatime.
    set_atime(&f, 1_000_000_000);
    assert_eq!(fs::read(&f).unwrap(), b"x");
    assert_eq!(lstat(&f).st_atime, 1_000_000_000);
    // Flags not kept here are refused, and leave the others as they were.
    let out = run(Command::new("chattr").arg("+i").arg(&f));
    assert!(!out.status.success(), "chattr +i: {}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not supported"),
        "{}",
        describe(&out)
    );
    m.remount();
    let f = m.p("f");
    assert!(
        lsattr(&f).contains('A') && lsattr(&f).contains('d'),
        "{}",
        lsattr(&f)
    );
    let out = run(Command::new("chattr").arg("-A").arg(&f));
    assert!(out.status.success(), "chattr -A: {}", describe(&out));
    assert!(
        !lsattr(&f).contains('A') && lsattr(&f).contains('d'),
        "{}",
        lsattr(&f)
    );
    assert_eq!(fs::read(&f).unwrap(), b"x");
    assert!(
        lstat(&f).st_atime > 1_000_000_000,
        "atime updates again without A"
    );
    let file = File::open(&f).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..100 {
        // SAFETY: TCGETS writes at most sizeof(struct termios) < 64 bytes into `buf`.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::TCGETS,
                buf.as_mut_ptr(),
            )
        };
        assert_eq!(check(r), Err(libc::ENOTTY));
    }
    drop(file);
    assert!(!m.log().contains("Not Implemented"), "{}", m.log());
    m.finish();
}

/// A directory stream over libc's opendir/readdir/telldir/seekdir.
struct DirStream(*mut libc::DIR);

impl DirStream {
    fn open(p: &Path) -> DirStream {
        let c = cpath(p);
        // SAFETY: valid NUL-terminated path.
        let d = unsafe { libc::opendir(c.as_ptr()) };
        assert!(!d.is_null(), "opendir {}", p.display());
        DirStream(d)
    }

    /// The next name, `Ok(None)` at the end, `Err(errno)` on an error.
    fn next(&mut self) -> Result<Option<String>, i32> {
        // SAFETY: errno is thread-local; the stream is open.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: the stream is open; the entry is copied out before the next call.
        let e = unsafe { libc::readdir(self.0) };
        if e.is_null() {
            return match errno() {
                0 => Ok(None),
                n => Err(n),
            };
        }
        // SAFETY: readdir returned a valid entry with a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        Ok(Some(name.to_string_lossy().into_owned()))
    }

    fn tell(&mut self) -> i64 {
        // SAFETY: the stream is open.
        unsafe { libc::telldir(self.0) }
    }

    fn seek(&mut self, pos: i64) {
        // SAFETY: the stream is open.
        unsafe { libc::seekdir(self.0, pos) }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: opened by `open`, closed once.
        unsafe { libc::closedir(self.0) };
    }
}

/// telldir/seekdir on a 10,000-entry directory: a told position resumes exactly there; a
/// position never handed out gives an entry or the end, never an error, and the image is
/// never reported damaged.
#[test]
fn telldir_seekdir_and_random_positions() {
    let m = Mount::with(&["--size", "64M"], &[]);
    let dir = m.p("big");
    fs::create_dir(&dir).unwrap();
    for i in 0..10_000 {
        File::create(dir.join(format!("entry-{i:05}"))).unwrap();
    }
    // Told positions and the entry read right after each.
    let mut d = DirStream::open(&dir);
    let mut told = Vec::new();
    loop {
        let pos = d.tell();
        match d.next().unwrap() {
            Some(name) => told.push((pos, name)),
            None => break,
        }
    }
    assert_eq!(told.len(), 10_002, "entries including . and ..");
    let mut rng = Rng::new(11);
    for _ in 0..300 {
        let (pos, name) = &told[rng.below(told.len() as u64) as usize];
        d.seek(*pos);
        assert_eq!(d.next().unwrap().as_ref(), Some(name), "seekdir({pos})");
    }
    // Positions nobody handed out, inside the entries: the listing resumes at the next entry,
    // skipping none. (A told position is where the previous record ended, so a position in the
    // unused tail of a block still comes before the entry that opens the next block.)
    let mut real: Vec<&(i64, String)> = told.iter().filter(|t| t.1.starts_with("entry-")).collect();
    real.sort();
    let (lo, hi) = (real[0].0, real[real.len() - 1].0);
    for _ in 0..300 {
        let pos = lo + 1 + rng.below((hi - lo - 1) as u64) as i64;
        let i = real.iter().position(|t| t.0 >= pos).unwrap();
        let (prev, next) = (&real[i - 1].1, &real[i].1);
        d.seek(pos);
        let got = d.next().unwrap().unwrap_or_default();
        assert!(
            &got == next || &got == prev,
            "seekdir({pos}) then readdir gave {got}, not {prev} or {next}"
        );
    }
    // And beyond them: the end, or EINVAL.
    for _ in 0..100 {
        let pos = hi + 1 + rng.below(1 << 40) as i64;
        d.seek(pos);
        match d.next() {
            Ok(None) => {}
            other => assert_eq!(other, Err(libc::EINVAL), "seekdir({pos}) then readdir"),
        }
    }
    drop(d);
    let log = m.log();
    assert!(!log.contains("corruption"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    m.finish();
}

/// One readdir pass while other threads rename, create and unlink in the same directory: the
/// pass ends, and every entry that stayed put is returned exactly once.
#[test]
fn readdir_pass_ends_under_concurrent_renames() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let m = Mount::with(&["--size", "64M"], &[]);
    let dir = m.p("busy");
    fs::create_dir(&dir).unwrap();
    for i in 0..1_000 {
        File::create(dir.join(format!("stable-{i:05}"))).unwrap();
    }
    for i in 0..200 {
        File::create(dir.join(format!("moving-{i}-a"))).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (dir, stop) = (dir.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..200 {
                    let (from, to) = if round.is_multiple_of(2) {
                        ("a", "b")
                    } else {
                        ("b", "a")
                    };
                    let _ = fs::rename(
                        dir.join(format!("moving-{i}-{from}")),
                        dir.join(format!("moving-{i}-{to}")),
                    );
                    let t = dir.join(format!("temp-{round}-{i}"));
                    let _ = File::create(&t);
                    let _ = fs::remove_file(&t);
                }
                round += 1;
            }
        })
    };
    for pass in 0..2 {
        let mut d = DirStream::open(&dir);
        let mut seen = std::collections::HashMap::<String, u32>::new();
        let mut n = 0u64;
        while let Some(name) = d.next().unwrap() {
            n += 1;
            assert!(n < 10_000, "pass {pass} does not end");
            *seen.entry(name).or_default() += 1;
            // A slow reader: the renames append records faster than it reads them.
            std::thread::sleep(Duration::from_millis(1));
        }
        for i in 0..1_000 {
            let name = format!("stable-{i:05}");
            assert_eq!(seen.get(&name), Some(&1), "pass {pass}: {name}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    m.finish();
}

/// A file handle from name_to_handle_at, opened with open_by_handle_at; `Err(errno)`.
fn handle_of(p: &Path) -> Vec<u8> {
    const MAX: usize = 128;
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    let mut buf = vec![0u8; 8 + MAX];
    buf[..4].copy_from_slice(&(MAX as u32).to_le_bytes());
    let mut mount_id: libc::c_int = 0;
    let c = cpath(p);
    // SAFETY: `buf` holds a file_handle header with room for MAX bytes of handle.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(r, 0, "name_to_handle_at {}: errno {}", p.display(), errno());
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    buf.truncate(8 + len);
    buf
}

fn open_by_handle(mount_dir: &Path, handle: &[u8]) -> Result<File, i32> {
    let m = File::open(mount_dir).unwrap();
    let mut h = handle.to_vec();
    // SAFETY: `h` is a complete file_handle as name_to_handle_at filled it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            std::os::fd::AsRawFd::as_raw_fd(&m),
            h.as_mut_ptr(),
            libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a descriptor the kernel just gave us, owned by nobody else.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// File handles stay valid while the file exists: after the kernel's caches are dropped and
/// after a remount; a deleted file's handle is ESTALE. (What NFS export and backup tools use.)
#[test]
fn file_handles_survive_cache_drops_and_remounts() {
    let mut m = Mount::new();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/f"), b"handled").unwrap();
    fs::write(m.p("gone"), b"x").unwrap();
    let (hf, hd, hg) = (
        handle_of(&m.p("d/f")),
        handle_of(&m.p("d")),
        handle_of(&m.p("gone")),
    );
    let read = |f: Result<File, i32>| -> Vec<u8> {
        let mut v = Vec::new();
        f.expect("open_by_handle_at").read_to_end(&mut v).unwrap();
        v
    };
    assert_eq!(read(open_by_handle(m.path(), &hf)), b"handled");
    drop_caches();
    assert_eq!(read(open_by_handle(m.path(), &hf)), b"handled");
    let dir = open_by_handle(m.path(), &hd).expect("directory handle");
    assert!(dir.metadata().unwrap().is_dir());
    drop(dir);
    m.remount();
    assert_eq!(read(open_by_handle(m.path(), &hf)), b"handled");
    assert!(open_by_handle(m.path(), &hd).is_ok());
    fs::remove_file(m.p("gone")).unwrap();
    drop_caches();
    assert_eq!(open_by_handle(m.path(), &hg).err(), Some(libc::ESTALE));
    // Its inode number used again by a new file: still ESTALE (the generation changed).
    for i in 0..20 {
        fs::write(m.p(&format!("new-{i}")), b"new").unwrap();
    }
    drop_caches();
    assert_eq!(open_by_handle(m.path(), &hg).err(), Some(libc::ESTALE));
    m.finish();
}
