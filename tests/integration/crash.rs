//! Crash consistency: `kill -9` the daemon under a mixed workload at random moments; the next
//! mount recovers, every fsync'd file holds its fsync'd content, and fsck is clean.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
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

/// Reads every file under `root` (no EIO anywhere after recovery).
fn read_everything(root: &Path) {
    for e in fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            read_everything(&e.path());
        } else if t.is_file() {
            fs::read(e.path()).unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
        } else if t.is_symlink() {
            fs::read_link(e.path()).unwrap();
        }
    }
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
        let text = info(m.image());
        assert!(
            text.contains("dirty"),
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
        read_everything(m.path());
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
