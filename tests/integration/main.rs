//! Integration tests: each test mounts its own mmapfs image (see `common`), exercises it through
//! the kernel, unmounts and runs `mmapfs fsck`.

mod common;

mod cli;
mod concurrency;
mod crash;
mod damage;
mod data;
mod io_uring;
mod mounting;
mod persistence;
mod posix;
mod powerloss;
mod upgrade;
