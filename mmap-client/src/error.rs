//! Failure reporting shared by every scenario.
//!
//! A scenario returns [`Outcome`]: `Ok(())` when everything it checked matched, or a [`Failure`]
//! carrying one line that says what was checked, what was expected and what was observed. `main`
//! prints that line and exits non-zero.

use std::fmt;
use std::io;

/// One-line description of the first check that did not hold.
#[derive(Debug)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Result of a scenario step.
pub type Outcome<T = ()> = Result<T, Failure>;

/// Return early with a formatted [`Failure`].
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::error::Failure(format!($($arg)*)))
    };
}

/// Return early with a formatted [`Failure`] unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::fail!($($arg)*);
        }
    };
}

/// Attach a description of the operation to an `io::Error`.
pub trait Context<T> {
    /// Turn the error into a [`Failure`] of the form `"<what>: <os error>"`.
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Outcome<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Outcome<T> {
        self.map_err(|err| Failure(format!("{}: {err}", what().into())))
    }
}

impl<T> Context<T> for Result<T, String> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Outcome<T> {
        self.map_err(|err| Failure(format!("{}: {err}", what().into())))
    }
}
