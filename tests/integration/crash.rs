//! Crash consistency: `kill -9` the daemon under a mixed workload at random moments; the next
//! mount recovers, every fsync'd file holds its fsync'd content, and fsck is clean.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;

type Durable = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;

/// Writes, renames, unlinks and fsyncs until the mount dies. Files under `durable/` are
/// written once, fsync'd (with their directory) and recorded, then never touched again.
fn workload(root: PathBuf, tag: String, seed: u64, durable: Durable) {
    let mut rng = Rng::new(seed);
    let ddir = root.join("durable");
    let sdir = root.join("scratch");
    let _ = fs::create_dir(&ddir);
    let _ = fs::create_dir(&sdir);
    let mut live: Vec<PathBuf> = Vec::new();
    for i in 0u64.. {
        let mut step = || -> std::io::Result<()> {
            match rng.below(10) {
                0..=2 => {
                    // A durable file.
                    let name = format!("{tag}-{i}");
                    let len = rng.below(300_000) as usize;
                    let data = rng.bytes(len);
                    let p = ddir.join(&name);
                    let mut f = File::create(&p)?;
                    f.write_all(&data)?;
                    f.sync_all()?;
                    File::open(&ddir)?.sync_all()?;
                    durable.lock().unwrap().insert(name, data);
                }
                3..=4 => {
                    let p = sdir.join(format!("s{}", rng.below(64)));
                    let max = if rng.below(8) == 0 { 4 << 20 } else { 64 << 10 };
                    let len = rng.below(max);
                    let f = OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(false)
                        .open(&p)?;
                    f.write_all_at(&rng.bytes(len as usize), rng.below(1 << 20))?;
                    live.push(p);
                }
                5 => {
                    let from = sdir.join(format!("s{}", rng.below(64)));
                    let to = sdir.join(format!("s{}", rng.below(64)));
                    match fs::rename(&from, &to) {
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        r => r?,
                    }
                }
                6 => match fs::remove_file(sdir.join(format!("s{}", rng.below(64)))) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    r => r?,
                },
                7 => {
                    let d = sdir.join(format!("d{}", rng.below(8)));
                    match fs::create_dir(&d) {
                        Ok(()) => {
                            fs::write(d.join("x"), b"x")?;
                            std::os::unix::fs::symlink("x", d.join("l"))?;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                            fs::remove_dir_all(&d)?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                8 => {
                    let p = sdir.join(format!("s{}", rng.below(64)));
                    if let Ok(f) = OpenOptions::new().write(true).open(&p) {
                        f.set_len(rng.below(2 << 20))?;
                        if rng.below(2) == 0 {
                            f.sync_data()?;
                        }
                    }
                }
                _ => {
                    let p = sdir.join(format!("s{}", rng.below(64)));
                    match fs::hard_link(&p, sdir.join(format!("h{}", rng.below(16)))) {
                        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EEXIST)) => {
                        }
                        r => r?,
                    }
                }
            }
            Ok(())
        };
        if step().is_err() {
            // ENOTCONN / ECONNABORTED once the daemon is dead.
            return;
        }
    }
}

/// Reads every file under `root`: after recovery nothing may give EIO. Returns the first
/// failure with its path.
fn read_everything(root: &Path) -> Result<(), String> {
    let what = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    for e in fs::read_dir(root).map_err(|e| what(root, e))? {
        let e = e.map_err(|e| what(root, e))?;
        let t = e.file_type().map_err(|err| what(&e.path(), err))?;
        if t.is_dir() {
            read_everything(&e.path())?;
        } else if t.is_file() {
            fs::read(e.path()).map_err(|err| what(&e.path(), err))?;
        } else if t.is_symlink() {
            fs::read_link(e.path()).map_err(|err| what(&e.path(), err))?;
        }
    }
    Ok(())
}

#[test]
fn kill9_under_load_keeps_fsynced_data() {
    let seed = seed("kill9_under_load_keeps_fsynced_data");
    let mut rng = Rng::new(seed);
    let mut m = Mount::new();
    let durable: Durable = Arc::default();
    for iter in 0..6 {
        let delay = 50 + rng.below(700);
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let root = m.path().to_path_buf();
                let d = durable.clone();
                let s = rng.next_u64();
                std::thread::spawn(move || workload(root, format!("i{iter}w{w}"), s, d))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(delay));
        m.kill_daemon();
        for w in writers {
            w.join().unwrap();
        }
        m.clear_dead_mount();
        // A mount that committed something (an fsync'd file) and was killed is not clean; one
        // killed before its first change wrote nothing and still is.
        let committed = durable
            .lock()
            .unwrap()
            .keys()
            .any(|k| k.starts_with(&format!("i{iter}w")));
        let text = info(m.image());
        assert!(
            !committed || text.contains("dirty"),
            "killed mount left state clean:\n{text}"
        );
        m.mount();
        let durable = durable.lock().unwrap();
        eprintln!(
            "crash iteration {iter}: killed after {delay} ms, {} durable files",
            durable.len()
        );
        for (name, data) in durable.iter() {
            let got = fs::read(m.p(&format!("durable/{name}")))
                .unwrap_or_else(|e| panic!("fsync'd {name} lost (seed {seed}, iter {iter}): {e}"));
            assert!(
                got == *data,
                "fsync'd {name}: {} bytes, expected {} (seed {seed}, iter {iter})",
                got.len(),
                data.len()
            );
        }
        if let Err(e) = read_everything(m.path()) {
            let log = m.log();
            m.unmount();
            let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
            panic!(
                "after crash {iter} (seed {seed}): {e}\ndaemon log (tail):\n{}\nfsck: {}",
                log.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
                describe(&out)
            );
        }
        m.unmount();
        fsck(m.image());
        m.mount();
    }
    assert!(
        !durable.lock().unwrap().is_empty(),
        "the workload never fsync'd anything"
    );
    m.finish();
}

#[test]
fn kill9_with_open_unlinked_file_frees_it_at_recovery() {
    let mut m = Mount::new();
    fs::write(m.p("keep"), b"keep").unwrap();
    let base = free_blocks(m.path());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("orphan"))
        .unwrap();
    f.write_all(&pattern(3, 0, 4 << 20)).unwrap();
    f.sync_all().unwrap();
    fs::remove_file(m.p("orphan")).unwrap();
    // The unlink is committed (kill -9 keeps exactly what was committed).
    File::open(m.path()).unwrap().sync_all().unwrap();
    assert!(
        free_blocks(m.path()) + 1000 < base,
        "the orphan's space is not in use"
    );
    m.kill_daemon();
    drop(f);
    m.clear_dead_mount();
    m.mount();
    // Recovery frees it once the mount is live (in the background).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut after = free_blocks(m.path());
    while after + 16 < base && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        after = free_blocks(m.path());
    }
    assert!(
        after + 16 >= base,
        "orphan not freed by recovery: free {after}, before {base}"
    );
    assert_eq!(fs::read(m.p("keep")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(m.path()).unwrap().count(), 1);
    m.finish();
}

#[test]
fn kill9_right_after_fsync_of_renamed_files() {
    let seed = seed("kill9_right_after_fsync_of_renamed_files");
    let mut rng = Rng::new(seed);
    let mut m = Mount::new();
    let mut expect = BTreeMap::new();
    for round in 0..3 {
        fs::create_dir_all(m.p("dir")).unwrap();
        for i in 0..20 {
            let len = rng.below(200_000) as usize;
            let data = rng.bytes(len);
            let tmp = m.p(&format!("dir/.tmp{i}"));
            let mut f = File::create(&tmp).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
            drop(f);
            // The atomic-replace idiom: write a temp file, fsync, rename over, fsync the dir.
            let name = format!("r{round}-{}", i % 7);
            fs::rename(&tmp, m.p(&format!("dir/{name}"))).unwrap();
            File::open(m.p("dir")).unwrap().sync_all().unwrap();
            expect.insert(name, data);
        }
        m.kill9();
        m.mount();
        for (name, data) in &expect {
            let got = fs::read(m.p(&format!("dir/{name}"))).unwrap();
            assert!(
                got == *data,
                "{name} after crash (seed {seed}, round {round})"
            );
        }
        let listed = fs::read_dir(m.p("dir")).unwrap().count();
        assert_eq!(listed, expect.len(), "temp files left behind or lost");
    }
    m.finish();
}

/// Directory churn only: mkdir, fill, rm -rf, in a loop; the crash lands inside directory
/// operations far more often than under the mixed workload.
fn dir_churn(root: PathBuf, tag: u64) {
    for i in 0u64.. {
        let d = root.join(format!("c{tag}-{}", i % 4));
        let step = || -> std::io::Result<()> {
            if d.exists() {
                fs::remove_dir_all(&d)
            } else {
                fs::create_dir(&d)?;
                for j in 0..40 {
                    fs::write(d.join(format!("f{j}")), b"data")?;
                }
                fs::create_dir(d.join("sub"))?;
                std::os::unix::fs::symlink("f0", d.join("link"))
            }
        };
        if step().is_err() && !is_alive(&root) {
            return;
        }
    }
}

/// Whether the daemon behind `root` still answers. Not `stat`: the kernel may answer that from
/// its attribute cache long after the daemon died.
fn is_alive(root: &Path) -> bool {
    crate::common::try_statfs(root).is_ok()
}

#[test]
fn kill9_during_directory_churn() {
    let seed = seed("kill9_during_directory_churn");
    let mut rng = Rng::new(seed);
    let mut m = Mount::new();
    for iter in 0..10 {
        let delay = 20 + rng.below(300);
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let root = m.path().to_path_buf();
                std::thread::spawn(move || dir_churn(root, w))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(delay));
        m.kill_daemon();
        for w in writers {
            w.join().unwrap();
        }
        m.clear_dead_mount();
        m.mount();
        let log = m.log();
        let walk = read_everything(m.path());
        m.unmount();
        let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
        if walk.is_err() || !out.status.success() {
            panic!(
                "after crash {iter} at {delay} ms (seed {seed}): walk {walk:?}\n\
                 recovery log (tail):\n{}\nfsck: {}",
                log.lines().rev().take(20).collect::<Vec<_>>().join("\n"),
                describe(&out)
            );
        }
        m.mount();
    }
    m.finish();
}

/// A directory damaged on the image (here: a record whose length cannot be walked) costs
/// that directory alone: the mount stays up, the rest reads fine, the image is marked for
/// repair, and `fsck --repair` cuts out the damaged record only.
#[test]
fn damaged_directory_is_contained_and_repaired() {
    let mut m = Mount::new();
    fs::create_dir(m.p("d")).unwrap();
    for i in 0..10 {
        fs::write(m.p(&format!("d/entry-name-{i:02}")), b"x").unwrap();
    }
    fs::write(m.p("outside"), b"outside").unwrap();
    let d = fs::metadata(m.p("d")).unwrap().ino();
    m.settle();
    let mut bytes = fs::read(m.image()).unwrap();
    let pos = name_offset(&bytes, d, b"entry-name-00");
    // The record's rec_len (u16 at header offset 12) becomes impossible.
    bytes[pos - 16 + 12..pos - 16 + 14].copy_from_slice(&3u16.to_le_bytes());
    fs::write(m.image(), &bytes).unwrap();
    m.mount();
    let err = fs::read_dir(m.p("d"))
        .and_then(|it| it.collect::<std::io::Result<Vec<_>>>())
        .expect_err("a damaged directory listed without error");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(m.p("outside")).unwrap(), b"outside");
    m.unmount();
    assert!(
        info(m.image()).contains("fsck --repair"),
        "damage not recorded"
    );
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(
        !out.status.success(),
        "fsck missed the damage: {}",
        describe(&out)
    );
    fsck_repair(m.image());
    m.mount();
    let listed: Vec<String> = fs::read_dir(m.p("d"))
        .expect("directory unreadable after repair")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for i in 1..10 {
        let name = format!("entry-name-{i:02}");
        assert!(listed.contains(&name), "{name} lost by repair: {listed:?}");
        assert_eq!(fs::read(m.p(&format!("d/{name}"))).unwrap(), b"x");
    }
    assert!(!listed.contains(&"entry-name-00".to_string()));
    assert_eq!(fs::read(m.p("outside")).unwrap(), b"outside");
    fs::write(m.p("d/new"), b"new").unwrap();
    m.finish();
}

/// A flipped bit inside a name leaves a well-formed record that only its checksum can expose:
/// fsck must report it, and repair must drop that entry alone.
#[test]
fn damaged_name_is_caught_by_its_checksum() {
    let mut m = Mount::new();
    fs::create_dir(m.p("d")).unwrap();
    for i in 0..10 {
        fs::write(m.p(&format!("d/name-{i:02}")), b"x").unwrap();
    }
    let d = fs::metadata(m.p("d")).unwrap().ino();
    m.settle();
    let mut bytes = fs::read(m.image()).unwrap();
    let pos = name_offset(&bytes, d, b"name-04");
    bytes[pos + 6] ^= 0x01; // "name-04" becomes "name-05": a clash only the checksum sees
    fs::write(m.image(), &bytes).unwrap();
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(
        !out.status.success(),
        "fsck missed the damage: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("checksum"),
        "{}",
        describe(&out)
    );
    fsck_repair(m.image());
    m.mount();
    let listed: Vec<String> = fs::read_dir(m.p("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed.len(), 9, "{listed:?}");
    assert!(!listed.contains(&"name-04".to_string()));
    m.finish();
}

/// A crash between the host file's growth and the superblock's new size leaves the file longer
/// than the image: inspection works and changes nothing, and the next mount trims the tail.
#[test]
fn interrupted_growth_leaves_a_mountable_image() {
    let mut m = Mount::new();
    let mut f = File::create(m.p("keep")).unwrap();
    f.write_all(&pattern(5, 0, 300_000)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.kill9();
    let image_len = fs::metadata(m.image()).unwrap().len();
    // What ext4 leaves when a fatal signal stops posix_fallocate part way: a longer file.
    let f = OpenOptions::new().write(true).open(m.image()).unwrap();
    f.set_len(image_len + (3 << 20)).unwrap();
    drop(f);
    let text = info(m.image());
    assert!(text.contains("dirty"), "{text}");
    fsck(m.image());
    assert_eq!(
        fs::metadata(m.image()).unwrap().len(),
        image_len + (3 << 20),
        "inspection changed the file"
    );
    m.mount();
    assert_eq!(fs::read(m.p("keep")).unwrap(), pattern(5, 0, 300_000));
    assert_eq!(fs::metadata(m.image()).unwrap().len(), image_len);
    // The image still grows normally afterwards.
    fs::write(m.p("big"), pattern(6, 0, 24 << 20)).unwrap();
    m.remount();
    assert_eq!(fs::read(m.p("big")).unwrap(), pattern(6, 0, 24 << 20));
    m.finish();
}

/// Two superblock copies: damage to the newest one is survived by the other (one commit older),
/// with a warning; the image still mounts, reads and passes fsck.
#[test]
fn one_damaged_superblock_copy_is_survived() {
    let mut m = Mount::new();
    let mut f = File::create(m.p("kept")).unwrap();
    f.write_all(&pattern(11, 0, 200_000)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.settle();
    let mut bytes = fs::read(m.image()).unwrap();
    let newest = newest_slot(&bytes);
    bytes[newest + 100] ^= 0x5a; // inside the checksummed fields
    fs::write(m.image(), &bytes).unwrap();
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(out.status.success(), "fsck: {}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("damaged"),
        "the damaged copy is not mentioned: {}",
        describe(&out)
    );
    m.mount();
    assert_eq!(fs::read(m.p("kept")).unwrap(), pattern(11, 0, 200_000));
    fs::write(m.p("after"), b"after").unwrap();
    m.finish();
}

/// A valid inode that nothing names any more (here: its directory entry removed behind the
/// filesystem's back) is not destroyed by repair: it is moved to /lost+found, contents intact.
#[test]
fn repair_moves_an_unreachable_file_to_lost_and_found() {
    let mut m = Mount::new();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/orphaned-by-damage"), pattern(12, 0, 50_000)).unwrap();
    fs::write(m.p("d/keep"), b"keep").unwrap();
    let ino = fs::metadata(m.p("d/orphaned-by-damage")).unwrap().ino();
    let d = fs::metadata(m.p("d")).unwrap().ino();
    m.settle();
    // Turn the entry into a deleted record with a valid checksum (ino 0 and a resealed
    // header): the directory stays readable, the inode loses its only name.
    let mut bytes = fs::read(m.image()).unwrap();
    let name = b"orphaned-by-damage";
    let pos = name_offset(&bytes, d, name);
    let rec = pos - 16;
    bytes[rec..rec + 8].copy_from_slice(&0u64.to_le_bytes());
    let mut c = crc32c::crc32c(&bytes[rec..rec + 8]);
    c = crc32c::crc32c_append(c, &bytes[rec + 12..rec + 16]);
    c = crc32c::crc32c_append(c, name);
    bytes[rec + 8..rec + 12].copy_from_slice(&c.to_le_bytes());
    // The directory block's trailer checksum covers the record: reseal it too.
    let block = rec / 4096 * 4096;
    let t = crc32c::crc32c(&bytes[block..block + 4092]);
    bytes[block + 4092..block + 4096].copy_from_slice(&t.to_le_bytes());
    fs::write(m.image(), &bytes).unwrap();
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(
        !out.status.success(),
        "fsck missed the unreachable inode: {}",
        describe(&out)
    );
    let text = fsck_repair(m.image());
    assert!(text.contains("not reachable"), "{text}");
    assert!(
        text.contains(&format!(
            "repaired: moved unreachable inode {ino} to /lost+found/#{ino}"
        )),
        "{text}"
    );
    m.mount();
    let moved = m.p(&format!("lost+found/#{ino}"));
    assert_eq!(fs::read(&moved).unwrap(), pattern(12, 0, 50_000));
    assert_eq!(fs::read(m.p("d/keep")).unwrap(), b"keep");
    assert!(fs::metadata(m.p("d/orphaned-by-damage")).is_err());
    m.finish();
}

/// fsck names files by path, and `--repair` says what it did to which file; a second fsck is
/// clean. (A link count damaged with valid checksums.)
#[test]
fn fsck_names_paths_and_says_what_it_repaired() {
    let mut m = Mount::new();
    fs::create_dir(m.p("docs")).unwrap();
    fs::write(m.p("docs/a.txt"), b"text").unwrap();
    let ino = fs::metadata(m.p("docs/a.txt")).unwrap().ino();
    m.settle();
    patch_inode(m.image(), ino, NLINK, &7u32.to_le_bytes());
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(!out.status.success(), "fsck: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "inode {ino} (/docs/a.txt): link count 7 but 1 references"
        )),
        "{text}"
    );
    let text = fsck_repair(m.image());
    assert!(
        text.contains(&format!(
            "repaired: set the link count of inode {ino} (/docs/a.txt) to 1"
        )),
        "{text}"
    );
    fsck(m.image());
    m.mount();
    assert_eq!(fs::metadata(m.p("docs/a.txt")).unwrap().nlink(), 1);
    m.finish();
}

/// fsck checks stored ACLs: an access ACL whose mask disagrees with the mode bits (mode
/// damaged with valid checksums) is found, repaired from the mode, and the repair converges.
#[test]
fn fsck_checks_acls_against_the_mode() {
    let mut m = Mount::new();
    fs::write(m.p("shared"), b"x").unwrap();
    let out = run(std::process::Command::new("setfacl")
        .args(["-m", "u:nobody:rw"])
        .arg(m.p("shared")));
    assert!(out.status.success(), "setfacl: {}", describe(&out));
    assert_eq!(fs::metadata(m.p("shared")).unwrap().mode() & 0o777, 0o664);
    let ino = fs::metadata(m.p("shared")).unwrap().ino();
    m.settle();
    patch_inode(m.image(), ino, 0, &(libc::S_IFREG | 0o604).to_le_bytes());
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(!out.status.success(), "fsck: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("system.posix_acl_access gives mode 664, the inode says 604"),
        "{text}"
    );
    let text = fsck_repair(m.image());
    assert!(text.contains("set the access ACL of"), "{text}");
    fsck(m.image());
    m.mount();
    let out = run(std::process::Command::new("getfacl")
        .args(["-p", "-n"])
        .arg(m.p("shared")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("user:65534:rw-\t#effective:---"), "{text}");
    assert!(text.contains("mask::---"), "{text}");
    m.finish();
}

/// A time no clock can hold (mtime 2^63-1 s and 2^32-1 ns, checksums valid) is shown clamped;
/// `stat` does not bring the daemon down.
#[test]
fn absurd_times_on_the_image_do_not_kill_the_daemon() {
    let mut m = Mount::new();
    fs::write(m.p("f"), b"x").unwrap();
    let ino = fs::metadata(m.p("f")).unwrap().ino();
    m.settle();
    patch_inode(m.image(), ino, MTIME_SEC, &i64::MAX.to_le_bytes());
    patch_inode(m.image(), ino, MTIME_NSEC, &u32::MAX.to_le_bytes());
    m.mount();
    let md = fs::metadata(m.p("f")).unwrap();
    assert!(md.mtime() > 1 << 40, "mtime {}", md.mtime());
    assert_eq!(fs::read(m.p("f")).unwrap(), b"x");
    assert!(!m.log().contains("panicked"), "{}", m.log());
    m.unmount();
    // fsck sees the impossible nanoseconds and repair clamps them.
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(!out.status.success(), "fsck: {}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nanoseconds"),
        "{}",
        describe(&out)
    );
    fsck_repair(m.image());
    m.finish();
}

/// Offsets of fields in the inode record (docs/format.md).
const NLINK: usize = 4;
const MTIME_SEC: usize = 40;
const MTIME_NSEC: usize = 68;
const DIR_ENTRIES_END: usize = 144;
const DIR_LIVE: usize = 152;

/// A directory whose live-entry counter lies (0 or 1 with entries present, checksums valid):
/// rmdir says ENOTEMPTY and unlinking one entry frees no other; fsck --repair fixes the count.
#[test]
fn a_lying_entry_counter_destroys_nothing() {
    let mut m = Mount::new();
    for d in ["zero", "one"] {
        fs::create_dir(m.p(d)).unwrap();
        for i in 0..40 {
            fs::write(m.p(&format!("{d}/f{i}")), format!("{d}{i}")).unwrap();
        }
    }
    let zero = fs::metadata(m.p("zero")).unwrap().ino();
    let one = fs::metadata(m.p("one")).unwrap().ino();
    m.settle();
    patch_inode(m.image(), zero, DIR_LIVE, &0u64.to_le_bytes());
    patch_inode(m.image(), one, DIR_LIVE, &1u64.to_le_bytes());
    m.mount();
    assert_eq!(
        fs::remove_dir(m.p("zero")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    fs::remove_file(m.p("one/f0")).unwrap();
    for i in 1..40 {
        assert_eq!(
            fs::read_to_string(m.p(&format!("one/f{i}"))).unwrap(),
            format!("one{i}")
        );
    }
    for i in 0..40 {
        assert!(m.p(&format!("zero/f{i}")).exists());
    }
    m.unmount();
    fsck_repair(m.image());
    fsck(m.image());
    m.mount();
    assert_eq!(fs::read_dir(m.p("one")).unwrap().count(), 39);
    assert_eq!(fs::read_dir(m.p("zero")).unwrap().count(), 40);
    m.finish();
}

/// A directory link count at the limit (checksums valid): moving a directory into it is
/// EMLINK, never a count that wraps to 0 and frees the directory with its entries.
#[test]
fn a_link_count_at_the_limit_does_not_wrap() {
    let mut m = Mount::new();
    fs::create_dir(m.p("full")).unwrap();
    fs::write(m.p("full/keep"), b"keep").unwrap();
    fs::create_dir(m.p("sub")).unwrap();
    let full = fs::metadata(m.p("full")).unwrap().ino();
    m.settle();
    patch_inode(m.image(), full, NLINK, &u32::MAX.to_le_bytes());
    m.mount();
    assert_eq!(
        fs::rename(m.p("sub"), m.p("full/sub"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EMLINK)
    );
    assert_eq!(fs::read(m.p("full/keep")).unwrap(), b"keep");
    m.unmount();
    fsck_repair(m.image());
    fsck(m.image());
    m.finish();
}

/// A directory whose end offset is 2^62 (checksums valid): listing it and checking the image
/// take no longer than usual, and every entry is still listed.
#[test]
fn a_huge_directory_end_offset_costs_nothing() {
    let mut m = Mount::new();
    fs::create_dir(m.p("d")).unwrap();
    for i in 0..30 {
        fs::write(m.p(&format!("d/f{i}")), b"x").unwrap();
    }
    let d = fs::metadata(m.p("d")).unwrap().ino();
    m.settle();
    patch_inode(m.image(), d, DIR_ENTRIES_END, &(1u64 << 62).to_le_bytes());
    let start = std::time::Instant::now();
    let _ = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "fsck took {:?}",
        start.elapsed()
    );
    m.mount();
    // Ten listings: each used to walk 2^23 empty blocks (half a second or more apiece).
    let start = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(fs::read_dir(m.p("d")).unwrap().count(), 30);
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "10 listings took {took:?}");
    m.unmount();
    fsck_repair(m.image());
    m.finish();
}

/// Renames the entry `from` of directory `dir` to `to` (same length) in the image, resealing
/// the record and its block: a name no kernel call could have made.
fn forge_name(image: &Path, dir: u64, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = fs::read(image).unwrap();
    let pos = name_offset(&bytes, dir, from);
    bytes[pos..pos + to.len()].copy_from_slice(to);
    let rec = pos - 16;
    let mut c = crc32c::crc32c(&bytes[rec..rec + 8]);
    c = crc32c::crc32c_append(c, &bytes[rec + 12..rec + 16]);
    c = crc32c::crc32c_append(c, to);
    bytes[rec + 8..rec + 12].copy_from_slice(&c.to_le_bytes());
    let block = rec / 4096 * 4096;
    let t = crc32c::crc32c(&bytes[block..block + 4092]);
    bytes[block + 4092..block + 4096].copy_from_slice(&t.to_le_bytes());
    fs::write(image, &bytes).unwrap();
}

/// Names with `/`, NUL, `.` or `..` (checksums valid): the directory still lists its other
/// entries; fsck finds each and --repair renames it to a legal name, keeping the file.
#[test]
fn illegal_names_are_left_out_of_listings_and_renamed_by_repair() {
    let mut m = Mount::new();
    fs::create_dir(m.p("d")).unwrap();
    for name in ["slash", "nul", "dot1", "dots", "fine"] {
        fs::write(m.p(&format!("d/{name}")), name).unwrap();
    }
    let d = fs::metadata(m.p("d")).unwrap().ino();
    m.settle();
    forge_name(m.image(), d, b"slash", b"a/b/c");
    forge_name(m.image(), d, b"nul", b"n\0l");
    forge_name(m.image(), d, b"dot1", b".\0\0\0");
    m.mount();
    let listed: Vec<String> = fs::read_dir(m.p("d"))
        .unwrap_or_else(|e| panic!("{e}: {}", m.log()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(listed.contains(&"fine".to_string()), "{listed:?}");
    assert!(listed.contains(&"dots".to_string()), "{listed:?}");
    assert!(!listed.iter().any(|n| n.contains('/')), "{listed:?}");
    m.unmount();
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"a/b/c\" has an illegal name"), "{text}");
    let text = fsck_repair(m.image());
    assert!(
        text.contains("repaired: renamed the entry \"a/b/c\""),
        "{text}"
    );
    fsck(m.image());
    m.mount();
    let mut contents: Vec<Vec<u8>> = fs::read_dir(m.p("d"))
        .unwrap()
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    contents.sort();
    let mut want: Vec<Vec<u8>> = ["dot1", "dots", "fine", "nul", "slash"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    want.sort();
    assert_eq!(contents, want, "every file kept, under a legal name");
    m.finish();
}

/// Sizes the contents contradict (checksums valid): a symlink's size shorter or longer than
/// its target, a file beyond the format's maximum size. fsck --repair fixes each in one run and
/// a second fsck is clean.
#[test]
fn sizes_the_contents_contradict_are_repaired() {
    const SIZE: usize = 16;
    let mut m = Mount::new();
    std::os::unix::fs::symlink("the-target", m.p("short")).unwrap();
    std::os::unix::fs::symlink("the-target", m.p("long")).unwrap();
    fs::write(m.p("huge"), vec![7u8; 5000]).unwrap();
    let ino = |p: &str| fs::symlink_metadata(m.p(p)).unwrap().ino();
    let (short, long, huge) = (ino("short"), ino("long"), ino("huge"));
    m.settle();
    patch_inode(m.image(), short, SIZE, &3u64.to_le_bytes());
    patch_inode(m.image(), long, SIZE, &4000u64.to_le_bytes());
    patch_inode(m.image(), huge, SIZE, &(1u64 << 60).to_le_bytes());
    let out = run(std::process::Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("symlink of size 3 but a target of 10 bytes"),
        "{text}"
    );
    assert!(text.contains("beyond the format's maximum"), "{text}");
    let text = fsck_repair(m.image());
    assert!(text.contains("repaired: set the size of"), "{text}");
    fsck(m.image());
    m.mount();
    for l in ["short", "long"] {
        assert_eq!(fs::read_link(m.p(l)).unwrap(), Path::new("the-target"));
    }
    let data = fs::read(m.p("huge")).unwrap();
    assert_eq!(data.len(), 8192, "size cut to the end of the last block");
    assert_eq!(&data[..5000], &vec![7u8; 5000][..]);
    m.finish();
}

/// `mmapfs scrub` checks a live mount: clean while another process keeps changing it (the
/// check sees one consistent state), and it finds damage that reaches the image under the
/// daemon (bit rot in an inode record), marks the image for fsck, and `fsck --repair` fixes
/// it. Only root or the mount's owner may start one.
#[test]
fn scrub_checks_a_live_mount() {
    let mut m = Mount::new();
    let scrub = |m: &Mount| run(std::process::Command::new(BIN).arg("scrub").arg(m.path()));
    fs::create_dir(m.p("busy")).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (Arc::clone(&stop), m.p("busy"));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = dir.join(format!("f{}", i % 50));
                fs::write(&p, pattern(i, 0, 5000 + (i as usize % 9000))).unwrap();
                let _ = fs::rename(&p, dir.join(format!("g{}", i % 30)));
                i += 1;
            }
            i
        })
    };
    for _ in 0..5 {
        let out = scrub(&m);
        assert!(out.status.success(), "scrub under load: {}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stdout).ends_with("clean\n"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);

    let out = as_nobody_cmd(&[BIN, "scrub", m.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not scrub this mount"),
        "{}",
        describe(&out)
    );

    // Bit rot under the live daemon: a byte of a committed inode record flips.
    fs::write(m.p("victim"), b"soon damaged").unwrap();
    let ino = fs::metadata(m.p("victim")).unwrap().ino();
    File::open(m.p("victim")).unwrap().sync_all().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let bytes = fs::read(m.image()).unwrap();
    let at = inode_offset(&bytes, ino) + MTIME_SEC;
    let img = OpenOptions::new().write(true).open(m.image()).unwrap();
    img.write_all_at(&[bytes[at] ^ 0x40], at as u64).unwrap();
    drop(img);
    let out = scrub(&m);
    assert!(
        !out.status.success(),
        "scrub missed the damage: {}",
        describe(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("problem:") && text.ends_with("damaged\n"),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fsck --repair"),
        "{}",
        describe(&out)
    );
    m.unmount();
    assert!(info(m.image()).contains("fsck"), "{}", info(m.image()));
    fsck_repair(m.image());
    fsck(m.image());
    m.mount();
    assert!(fs::read_dir(m.p("busy")).unwrap().count() > 0);
    m.finish();
}

/// Runs a command as user nobody.
fn as_nobody_cmd(args: &[&str]) -> std::process::Output {
    run(std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args))
}

/// Bit rot in blocks without checksums of their own (a tree node, a bitmap) is caught by the
/// block checksum before the block is used: the damaged file reads EIO instead of other
/// blocks' bytes, the rest of the filesystem keeps working (allocations avoid the group whose
/// bitmap is damaged, so no used block is handed out again), and fsck --repair fixes it.
#[test]
fn bit_rot_in_tree_nodes_and_bitmaps_is_caught_before_use() {
    const TREE: usize = 96;
    // Two allocation groups (32,640 blocks each): new data goes to the undamaged one. (With a
    // single damaged group, allocation fails with ENOSPC until fsck, as on ext4.)
    let mut m = Mount::with(&["--size", "256M"], &[]);
    let big = pattern(5, 0, 3 << 20); // > 510 blocks: the tree has a node above the data
    fs::write(m.p("big"), &big).unwrap();
    fs::write(m.p("small"), pattern(6, 0, 5000)).unwrap();
    let ino = fs::metadata(m.p("big")).unwrap().ino();
    m.settle();
    let mut bytes = fs::read(m.image()).unwrap();
    let rec = inode_offset(&bytes, ino);
    let packed = u64::from_le_bytes(bytes[rec + TREE..rec + TREE + 8].try_into().unwrap());
    assert!(
        packed >> 56 >= 1,
        "expected a tree node above the data blocks"
    );
    let node = (packed & ((1 << 56) - 1)) as usize * 4096;
    bytes[node + 8 * 3] ^= 0x01; // a pointer to another block, trailer left as it was
    let sb = newest_slot(&bytes);
    let space = u64::from_le_bytes(bytes[sb + 112..sb + 120].try_into().unwrap());
    let bitmap = tree_block(&bytes, space, 0) as usize * 4096;
    bytes[bitmap + 100] ^= 0xff; // 8 blocks of group 0 flip between used and free
    fs::write(m.image(), &bytes).unwrap();

    m.mount();
    let err = fs::read(m.p("big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(m.p("small")).unwrap(), pattern(6, 0, 5000));
    // Allocation goes on outside the damaged group; nothing already stored is overwritten.
    for i in 0..8 {
        fs::write(m.p(&format!("new{i}")), pattern(10 + i, 0, 300_000))
            .unwrap_or_else(|e| panic!("write new{i}: {e}\n{}", m.log()));
    }
    fs::remove_file(m.p("small")).unwrap();
    for i in 0..8 {
        assert_eq!(
            fs::read(m.p(&format!("new{i}"))).unwrap(),
            pattern(10 + i, 0, 300_000)
        );
    }
    m.unmount();
    assert!(
        info(m.image()).contains("fsck"),
        "{}\n{}",
        info(m.image()),
        m.log()
    );
    fsck_repair(m.image());
    fsck(m.image());
    m.mount();
    for i in 0..8 {
        assert_eq!(
            fs::read(m.p(&format!("new{i}"))).unwrap(),
            pattern(10 + i, 0, 300_000)
        );
    }
    m.finish();
}

/// A file's data pointer naming a superblock slot (block 1, checksums recomputed) is refused:
/// reads give EIO instead of superblock bytes, a write does not reach the slot, and repair
/// converges.
#[test]
fn a_data_pointer_to_a_superblock_slot_is_refused() {
    const TREE: usize = 96;
    let mut m = Mount::new();
    fs::write(m.p("f"), pattern(3, 0, 4096)).unwrap();
    fs::write(m.p("other"), b"untouched").unwrap();
    let ino = fs::metadata(m.p("f")).unwrap().ino();
    m.settle();
    let mut bytes = fs::read(m.image()).unwrap();
    let rec = inode_offset(&bytes, ino);
    let packed = u64::from_le_bytes(bytes[rec + TREE..rec + TREE + 8].try_into().unwrap());
    assert_eq!(packed >> 56, 1, "a one-level tree");
    let node = (packed & ((1 << 56) - 1)) as usize * 4096;
    bytes[node..node + 8].copy_from_slice(&1u64.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[node..node + 4092]);
    bytes[node + 4092..node + 4096].copy_from_slice(&crc.to_le_bytes());
    let slot1 = bytes[4096..8192].to_vec();
    fs::write(m.image(), &bytes).unwrap();
    m.mount();
    let err = fs::read(m.p("f")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let _ = OpenOptions::new()
        .write(true)
        .open(m.p("f"))
        .and_then(|mut f| f.write_all(&[0xAA; 4096]));
    assert_eq!(fs::read(m.p("other")).unwrap(), b"untouched");
    m.unmount();
    let now = fs::read(m.image()).unwrap();
    // Slot 1 may hold a newer commit, but never the file's bytes.
    assert!(
        now[4096..8192] == slot1[..] || now[4096..4104] == *b"MMAPFS\0\x1a",
        "superblock slot 1 was overwritten"
    );
    fsck_repair(m.image());
    fsck(m.image());
    m.mount();
    assert_eq!(fs::read(m.p("other")).unwrap(), b"untouched");
    m.finish();
}

/// A file's tree pointer into another file's data: once the daemon has seen the pointer fail,
/// the block is never handed out again, even after its real owner frees it. Reused, it would
/// be reachable through the damaged pointer too, and repair would hand it to whichever inode
/// it met first (here the damaged one, taking the new owner's block away).
#[test]
fn a_block_reached_by_a_damaged_pointer_is_not_reused() {
    const TREE: usize = 96;
    let mut m = Mount::new();
    fs::write(m.p("a"), pattern(1, 0, 8192)).unwrap();
    fs::write(m.p("b"), pattern(2, 0, 4096)).unwrap();
    let a = fs::metadata(m.p("a")).unwrap().ino();
    let b = fs::metadata(m.p("b")).unwrap().ino();
    assert!(a < b, "repair meets the damaged inode first");
    m.settle();
    let bytes = fs::read(m.image()).unwrap();
    let b_tree = u64::from_le_bytes(
        bytes[inode_offset(&bytes, b) + TREE..][..8]
            .try_into()
            .unwrap(),
    );
    let b_data = tree_block(&bytes, b_tree, 0);
    patch_inode(m.image(), a, TREE, &((1u64 << 56) | b_data).to_le_bytes());
    m.mount();
    let err = fs::read(m.p("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Free b's blocks, let the frees become reusable, then allocate plenty.
    fs::remove_file(m.p("b")).unwrap();
    // (The daemon frees an unlinked inode's blocks when the kernel forgets it.)
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        fs::write(m.p("sync"), [round]).unwrap();
        File::open(m.p("sync")).unwrap().sync_all().unwrap();
    }
    for i in 0..200 {
        fs::write(m.p(&format!("n{i}")), pattern(i + 10, 0, 4096)).unwrap();
    }
    File::open(m.path()).unwrap().sync_all().unwrap();
    m.unmount();
    let now = fs::read(m.image()).unwrap();
    let d = b_data as usize * 4096;
    assert!(
        now[d..d + 4096] == pattern(2, 0, 4096)[..],
        "block {b_data}, reached by a's damaged pointer, was reused"
    );
    assert!(m.log().contains("damaged pointer"), "{}", m.log());
    fsck_repair(m.image());
    fsck(m.image());
    m.mount();
    for i in 0..200 {
        assert_eq!(
            fs::read(m.p(&format!("n{i}"))).unwrap(),
            pattern(i + 10, 0, 4096),
            "n{i}"
        );
    }
    m.finish();
}
