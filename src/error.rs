//! The library's one error type. Every variant names the thing that was wrong (a file, an
//! image, a label) so the CLI can print it on one line; `anyhow` lives only in the binary.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bundle folder or one of its files could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid JSON or is missing a field.
    #[error("{}: invalid manifest: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    /// The manifest declares a format this build cannot read.
    #[error("{}: unsupported bundle format version {found} (this build reads version {supported})", path.display())]
    FormatVersion { path: PathBuf, found: u64, supported: u64 },
    /// A file listed in the manifest does not match its recorded size or hash.
    #[error("{}: {message}", path.display())]
    Integrity { path: PathBuf, message: String },
    /// A graph loaded but its inputs/outputs are not what the manifest says.
    #[error("{}: graph does not match the manifest: {message}", path.display())]
    GraphMismatch { path: PathBuf, message: String },
    /// tract failed to load, optimise or run a graph.
    #[error("{what}: {message}")]
    Engine { what: String, message: String },
    /// An image could not be opened, decoded or is too large.
    #[error("{name}: {message}")]
    Image { name: String, message: String },
    /// Labels or templates given by the user are unusable.
    #[error("{what}: {message}")]
    Labels { what: String, message: String },
    /// The tokenizer vocabulary is unusable.
    #[error("{what}: {message}")]
    Vocab { what: String, message: String },
    /// A frame source (camera, pipe, file) failed.
    #[error("{name}: {message}")]
    Source { name: String, message: String },
    /// A live source has no frame for now (a timeout, a reconnect under way); not a bad frame.
    #[error("{name}: {message}")]
    SourceStalled { name: String, message: String },
    /// No frame arrived for longer than the watchdog allows.
    #[error("{name}: no frame for {seconds:.1} s (watchdog); exiting so a supervisor can restart")]
    Watchdog { name: String, seconds: f64 },
    /// A caller passed an argument outside what the API accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub(crate) fn engine(what: impl Into<String>, err: impl std::fmt::Display) -> Self {
        // tract's errors are anyhow chains; keep the whole chain on one line
        Error::Engine { what: what.into(), message: one_line(&format!("{err:#}")) }
    }
}

/// Collapse a multi-line message into one line (the CLI promises one-line errors).
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
