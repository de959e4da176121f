//! mmapfs: a persistent FUSE filesystem whose whole state lives in one memory-mapped image.
//!
//! Layers, each depending only on the ones below it:
//! `fuse` (adapter) -> `fs` (POSIX semantics) -> `engine` (storage) -> `format` (on-image
//! structs) -> `image` (the mapping; the only module with `unsafe`).

#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod engine;
pub mod error;
pub mod format;
pub mod fs;
pub mod fuse;
#[allow(unsafe_code)]
pub mod image;
pub mod workers;
