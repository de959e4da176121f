//! The one error type of the filesystem core and engine, and its single exhaustive errno
//! mapping: a new variant cannot silently become `EIO`.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name too long")]
    NameTooLong,
    #[error("no space left on image")]
    NoSpace,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("permission denied")]
    AccessDenied,
    #[error("file too large")]
    TooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("no such attribute")]
    NoAttr,
    #[error("result does not fit the buffer")]
    Range,
    #[error("argument list too long")]
    ArgTooBig,
    #[error("operation not supported")]
    NotSupported,
    #[error("no more data")]
    NoData,
    #[error("read-only file system")]
    ReadOnly,
    #[error("image is corrupted: {0}")]
    Corrupt(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno the client sees.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc::ENOENT,
            Error::Exists => libc::EEXIST,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::NoSpace => libc::ENOSPC,
            Error::Invalid => libc::EINVAL,
            Error::NotPermitted => libc::EPERM,
            Error::AccessDenied => libc::EACCES,
            Error::TooBig => libc::EFBIG,
            Error::TooManyLinks => libc::EMLINK,
            Error::NoAttr => libc::ENODATA,
            Error::Range => libc::ERANGE,
            Error::ArgTooBig => libc::E2BIG,
            Error::NotSupported => libc::EOPNOTSUPP,
            Error::NoData => libc::ENXIO,
            Error::ReadOnly => libc::EROFS,
            Error::Corrupt(_) => libc::EIO,
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    pub fn corrupt(what: impl Into<String>) -> Error {
        Error::Corrupt(what.into())
    }
}
