//! Board profiles: the defaults coca-edge uses on a known board (threads, precision), from the
//! TOML files in `boards/`, which are compiled in. `--board NAME` (CLI) and
//! `CocaOptions.board` (C ABI) apply one; explicit options still win.

use serde::Deserialize;

use crate::error::{Error, Result};

const BUILTIN: &[(&str, &str)] = &[
    ("rpi4", include_str!("../boards/rpi4.toml")),
    ("rpi5", include_str!("../boards/rpi5.toml")),
    ("jetson-orin", include_str!("../boards/jetson-orin.toml")),
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BoardProfile {
    pub name: String,
    /// Rust target triple to build for
    pub target: String,
    /// CPU model (also the QEMU_CPU used to emulate it)
    pub cpu: String,
    /// what the CPU offers tract's kernels
    pub features: String,
    /// default inference threads
    pub threads: usize,
    /// default precision
    pub precision: String,
}

impl BoardProfile {
    /// The built-in profile `name` (see `boards/`).
    pub fn named(name: &str) -> Result<BoardProfile> {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown board '{name}' (known: {})", Self::names().join(", ")))
        })?;
        toml::from_str(text).map_err(|e| Error::InvalidArgument(format!("board profile '{name}': {e}")))
    }

    pub fn names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_parses() {
        for n in BoardProfile::names() {
            let p = BoardProfile::named(n).unwrap();
            assert_eq!(p.name, n);
            assert!(p.threads >= 1 && p.target.contains("linux"));
        }
        assert!(BoardProfile::named("toaster").unwrap_err().to_string().contains("known: rpi4"));
    }
}
