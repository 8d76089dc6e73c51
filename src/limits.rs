//! Caps on what the tool reads whole into memory, and the one function that reads under them.
//! docs/limits.md lists every input with its cap and what happens past it.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// A bundle's `coca.json` (a few KB in every exported bundle).
pub const MANIFEST_BYTES: u64 = 4 << 20;
/// The gzipped BPE vocabulary (open_clip's is 1.3 MB).
pub const VOCAB_GZ_BYTES: u64 = 16 << 20;
/// The BPE vocabulary once decompressed (open_clip's is 1.6 MB; a gzip of zeros would
/// otherwise decompress without end).
pub const VOCAB_TEXT_BYTES: u64 = 64 << 20;
/// A labels file or a templates file.
pub const TEXT_FILE_BYTES: u64 = 16 << 20;
/// A head file (JSON: a linear head over a ViT-L embedding of 1,000 classes is about 20 MB).
pub const HEAD_BYTES: u64 = 256 << 20;

/// `path` read whole when it is a regular file of at most `cap` bytes (checked before reading,
/// and the read stops at `cap` whatever the size said: a device or a growing file cannot run
/// past it). `what` names the kind of file in the error.
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let too_big = |size: String| Error::io(path, std::io::Error::other(format!("{what} of {size} is over the {} MB limit", cap >> 20)));
    if !meta.is_file() {
        return Err(Error::io(path, std::io::Error::other(format!("{what} is not a regular file"))));
    }
    if meta.len() > cap {
        return Err(too_big(format!("{} bytes", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(too_big("more bytes than its size said".into()));
    }
    Ok(bytes)
}
