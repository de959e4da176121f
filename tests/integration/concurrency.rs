//! Several writers at once: threads, separate processes, and concurrent creates in one
//! directory.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::process::Command;
use std::sync::{Arc, Barrier};

use crate::common::*;

#[test]
fn two_threads_write_different_files() {
    let m = Mount::new();
    let len = 8 << 20;
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2u64)
        .map(|t| {
            let p = m.p(&format!("t{t}"));
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut f = File::create(&p).unwrap();
                barrier.wait();
                // Interleave small and large writes.
                let mut off = 0;
                let mut step = 1 + t as usize * 7;
                while off < len {
                    let n = step.min(len - off);
                    f.write_all(&pattern(100 + t, off as u64, n)).unwrap();
                    off += n;
                    step = (step * 3 + 4097) % 300_000 + 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for t in 0..2u64 {
        let got = fs::read(m.p(&format!("t{t}"))).unwrap();
        assert!(got == pattern(100 + t, 0, len), "thread {t}'s file differs");
    }
    m.finish();
}

#[test]
fn two_processes_write_different_files() {
    let m = Mount::new();
    // Each process writes 16 MiB of a distinct byte value, in 64 KiB blocks.
    let children: Vec<_> = (0..2)
        .map(|i| {
            let out = m.p(&format!("proc{i}"));
            let byte = if i == 0 { "\\101" } else { "\\132" }; // 'A', 'Z'
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "head -c 16777216 /dev/zero | tr '\\000' '{byte}' | dd of={} bs=65536 iflag=fullblock conv=fsync status=none",
                    out.display()
                ))
                .spawn()
                .unwrap()
        })
        .collect();
    // Meanwhile, this process writes a third file.
    fs::write(m.p("self"), pattern(7, 0, 4 << 20)).unwrap();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for (i, byte) in [(0, b'A'), (1, b'Z')] {
        let mut got = Vec::new();
        File::open(m.p(&format!("proc{i}")))
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got.len(), 16 << 20);
        assert!(got.iter().all(|&b| b == byte), "process {i}'s file differs");
    }
    assert!(fs::read(m.p("self")).unwrap() == pattern(7, 0, 4 << 20));
    m.finish();
}

#[test]
fn concurrent_creates_in_one_directory() {
    let m = Mount::with(&["--size", "16M"], &[]);
    fs::create_dir(m.p("shared")).unwrap();
    let threads = 4;
    let per = 2500;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dir = m.p("shared");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per {
                    let p = dir.join(format!("t{t}-{i}"));
                    fs::write(&p, format!("{t}:{i}")).unwrap();
                    // Every thread also fights over a common set of names.
                    let shared = dir.join(format!("common-{}", i % 100));
                    match File::options().write(true).create_new(true).open(&shared) {
                        Ok(_) => {}
                        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EEXIST)),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let listed: Vec<String> = fs::read_dir(m.p("shared"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let set: HashSet<&String> = listed.iter().collect();
    assert_eq!(set.len(), listed.len(), "duplicate names listed");
    assert_eq!(listed.len(), threads * per + 100);
    for t in 0..threads {
        for i in (0..per).step_by(97) {
            let s = fs::read_to_string(m.p(&format!("shared/t{t}-{i}"))).unwrap();
            assert_eq!(s, format!("{t}:{i}"));
        }
    }
    // Concurrent unlinks of everything.
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dir = m.p("shared");
            std::thread::spawn(move || {
                for i in 0..per {
                    fs::remove_file(dir.join(format!("t{t}-{i}"))).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(fs::read_dir(m.p("shared")).unwrap().count(), 100);
    m.finish();
}

#[test]
fn concurrent_renames_between_directories() {
    let m = Mount::new();
    fs::create_dir(m.p("x")).unwrap();
    fs::create_dir(m.p("y")).unwrap();
    for i in 0..200 {
        fs::write(m.p(&format!("x/{i}")), i.to_string()).unwrap();
    }
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let (x, y) = (m.p("x"), m.p("y"));
            std::thread::spawn(move || {
                for round in 0..10 {
                    for i in (t..200).step_by(2) {
                        let (from, to) = if round % 2 == 0 { (&x, &y) } else { (&y, &x) };
                        fs::rename(from.join(i.to_string()), to.join(i.to_string())).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(fs::read_dir(m.p("x")).unwrap().count(), 200);
    assert_eq!(fs::read_dir(m.p("y")).unwrap().count(), 0);
    for i in 0..200 {
        assert_eq!(
            fs::read_to_string(m.p(&format!("x/{i}"))).unwrap(),
            i.to_string()
        );
    }
    m.finish();
}
