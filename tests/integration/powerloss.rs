//! Simulated power loss at msync boundaries. The daemon runs with the `MMAPFS_POWERLOSS_SHADOW`
//! hook: every range it flushes is copied to a shadow file, so the shadow is exactly what a power
//! loss is guaranteed to leave (only msync'd bytes). After random fsyncs the shadow is
//! snapshotted; each snapshot must mount (recovery), hold every file fsync'd before it byte for
//! byte under its name, and pass fsck.

use std::fs;
use std::io::Write;

use crate::common::{Mount, Rng, pattern, seed};

const SHADOW_ENV: &str = "MMAPFS_POWERLOSS_SHADOW";

/// A file fsync'd during the run: name, pattern seed, length.
type Synced = (String, u64, usize);

#[test]
fn every_fsynced_file_survives_power_loss_at_any_fsync() {
    let seed = seed("every_fsynced_file_survives_power_loss_at_any_fsync");
    let mut rng = Rng::new(seed);
    let mut m = Mount::new();
    m.unmount();
    let keep = tempfile::tempdir().unwrap();
    let shadow = keep.path().join("shadow");
    m.set_env(SHADOW_ENV, shadow.to_str().unwrap());
    m.mount();
    fs::create_dir(m.p("keep")).unwrap();
    fs::create_dir(m.p("scratch")).unwrap();

    let mut snapshots: Vec<(std::path::PathBuf, Vec<Synced>)> = Vec::new();
    let mut synced: Vec<Synced> = Vec::new();
    for i in 0..60 {
        // Unsynced churn around the synced files: creates, overwrites, renames, unlinks.
        for j in 0..rng.below(6) {
            let name = m.p(&format!("scratch/s{}", rng.below(12)));
            match rng.below(4) {
                0 | 1 => {
                    let len = rng.below(200_000) as usize;
                    fs::write(&name, pattern(rng.next_u64(), 0, len)).unwrap();
                }
                2 => {
                    let _ = fs::rename(&name, m.p(&format!("scratch/r{i}-{j}")));
                }
                _ => {
                    let _ = fs::remove_file(&name);
                }
            }
        }
        // One write-once file, fsync'd.
        let name = format!("keep/f{i}");
        let pseed = rng.next_u64();
        let len = rng.below(300_000) as usize;
        let mut f = fs::File::create(m.p(&name)).unwrap();
        f.write_all(&pattern(pseed, 0, len)).unwrap();
        f.sync_all().unwrap();
        drop(f);
        synced.push((name, pseed, len));
        if rng.below(6) == 0 || i == 59 {
            let snap = keep.path().join(format!("snapshot-{i}"));
            fs::copy(&shadow, &snap).unwrap();
            snapshots.push((snap, synced.clone()));
        }
    }
    m.finish();

    for (snap, files) in snapshots {
        let r = Mount::from_image(&snap);
        for (name, pseed, len) in &files {
            let got = fs::read(r.p(name)).unwrap_or_else(|e| {
                panic!(
                    "seed {seed}: {name} lost at power loss {}: {e}",
                    snap.display()
                )
            });
            assert!(
                got == pattern(*pseed, 0, *len),
                "seed {seed}: {name} has wrong content after power loss {}",
                snap.display()
            );
        }
        // The recovered filesystem stays usable.
        fs::write(r.p("keep/after"), b"after").unwrap();
        r.finish();
    }
}
