//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `coca` binary, with `$COCA_MODEL` set to the test bundle (full vocabulary, parity
/// goldens): a test that wants another model passes `--model`. Under a cross-build the binary
/// runs through `$COCA_TEST_RUNNER` (e.g. `qemu-aarch64-static -L /`, for machines without
/// binfmt_misc).
pub fn coca_command() -> Command {
    let bin = env!("CARGO_BIN_EXE_coca");
    let mut c = match std::env::var("COCA_TEST_RUNNER").ok().filter(|r| !r.trim().is_empty()) {
        Some(runner) => {
            let mut parts = runner.split_whitespace();
            let mut c = Command::new(parts.next().expect("non-empty runner"));
            c.args(parts).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.env("COCA_MODEL", root().join(coca_edge::TEST_BUNDLE)).env_remove("COCA_LOG");
    c
}
