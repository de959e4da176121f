//! mmapfs: a persistent FUSE filesystem whose whole state lives in one memory-mapped image.
//!
//! Layers, each depending only on the ones below it: `cli` and `mount` (the commands) ->
//! `fuse` (adapter) -> `fs` (POSIX semantics) -> `engine` (storage) -> `format` (on-image
//! structs) -> `image` (the mapping). `acl` (the POSIX ACL rules) is a leaf that `fs` and
//! `engine`'s fsck use; `perm` (the permission checks the daemon makes when mounted without
//! `default_permissions`) uses only `acl`, and `fs` uses it. `unsafe` lives only in `image`
//! and in `sys` (the few system calls std has no safe form of). `v1` stands apart: a
//! read-only reader of format-version-1 images (with `pread`), for upgrading them.

#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod acl;
pub mod cli;
pub mod control;
pub mod engine;
pub mod error;
pub mod format;
pub mod fs;
pub mod fuse;
#[allow(unsafe_code)]
pub mod image;
pub mod logging;
pub mod mount;
pub mod perm;
pub mod scrub;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod upgrade;
pub mod v1;
pub mod workers;
