//! Board profiles: the defaults coca-edge uses on a known board (threads, precision, camera),
//! from the TOML files in `boards/`, which are compiled in. `--board NAME` (CLI) and
//! `CocaOptions.board` (C ABI) apply one; `--board auto` detects the board from
//! `/proc/device-tree/model`, falling back to the CPU part in `/proc/cpuinfo`. Explicit options
//! still win.

use serde::Deserialize;

use crate::error::{Error, Result};

const BUILTIN: &[&str] = &[
    include_str!("../boards/raspberry-pi-4.toml"),
    include_str!("../boards/raspberry-pi-5.toml"),
    include_str!("../boards/jetson-orin-nano.toml"),
    include_str!("../boards/jetson-agx-orin.toml"),
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub description: String,
    /// substrings of `/proc/device-tree/model` that name this board
    #[serde(default)]
    pub models: Vec<String>,
    /// `CPU part` values of `/proc/cpuinfo` (the fallback of `--board auto`)
    #[serde(default)]
    pub cpu_parts: Vec<String>,
    /// Rust target triple to build for
    pub target: String,
    /// RUSTFLAGS for a binary tuned to this board only
    pub rustflags: String,
    /// CPU model (also the QEMU_CPU used to emulate it)
    pub cpu: String,
    /// what the CPU offers tract's kernels
    pub features: String,
    /// default inference threads (capped at the cores online)
    pub threads: usize,
    /// default precision (a default: where the bundle has no graphs of it, f32 loads)
    pub precision: String,
    /// why that precision and thread count, from the measure (printed by `coca info`)
    pub why: String,
    pub camera: CameraDefaults,
    pub notes: Notes,
}

/// What `coca stream` asks a V4L2 camera for on this board, unless told otherwise.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraDefaults {
    pub device: String,
    /// `--camera-format` list
    pub format: String,
    /// `--camera-size`
    pub size: String,
    pub fps: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notes {
    pub power: String,
    pub camera: String,
}

/// How `--board auto` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Detected {
    /// `/proc/device-tree/model` named the board
    Model(String),
    /// the CPU part in `/proc/cpuinfo` matched
    CpuPart(String),
}

impl BoardProfile {
    fn all() -> Vec<BoardProfile> {
        BUILTIN.iter().map(|t| toml::from_str(t).expect("built-in board profiles parse (tested)")).collect()
    }

    /// The built-in profile `name` or alias (see `boards/`).
    pub fn named(name: &str) -> Result<BoardProfile> {
        Self::all()
            .into_iter()
            .find(|p| p.name == name || p.aliases.iter().any(|a| a == name))
            .ok_or_else(|| Error::InvalidArgument(format!("unknown board '{name}' (known: {}, or auto)", Self::names().join(", "))))
    }

    pub fn names() -> Vec<String> {
        Self::all().into_iter().map(|p| p.name).collect()
    }

    /// `--board auto` on this machine: None when nothing matches (then no profile applies).
    pub fn detect() -> Option<(BoardProfile, Detected)> {
        let model = std::fs::read("/proc/device-tree/model").ok().map(|b| String::from_utf8_lossy(&b).trim_end_matches('\0').trim().to_string());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok();
        Self::detect_from(model.as_deref(), cpuinfo.as_deref())
    }

    /// Detection from the texts of `/proc/device-tree/model` and `/proc/cpuinfo`.
    pub fn detect_from(model: Option<&str>, cpuinfo: Option<&str>) -> Option<(BoardProfile, Detected)> {
        let all = Self::all();
        if let Some(m) = model.filter(|m| !m.is_empty()) {
            let lower = m.to_ascii_lowercase();
            // the longest matching name wins ("Raspberry Pi 400" over "Raspberry Pi 4")
            let best = all
                .iter()
                .flat_map(|p| p.models.iter().map(move |n| (p, n)))
                .filter(|(_, n)| lower.contains(&n.to_ascii_lowercase()))
                .max_by_key(|(_, n)| n.len());
            if let Some((p, _)) = best {
                return Some((p.clone(), Detected::Model(m.to_string())));
            }
        }
        let part = cpuinfo?.lines().filter_map(|l| l.split_once(':')).find(|(k, _)| k.trim() == "CPU part").map(|(_, v)| v.trim().to_ascii_lowercase())?;
        let p = all.into_iter().find(|p| p.cpu_parts.iter().any(|c| c.eq_ignore_ascii_case(&part)))?;
        Some((p, Detected::CpuPart(part)))
    }

    /// `NAME`, an alias, or `auto` (None when auto finds no known board).
    pub fn resolve(name: &str) -> Result<Option<(BoardProfile, Option<Detected>)>> {
        if name == "auto" {
            return Ok(Self::detect().map(|(p, d)| (p, Some(d))));
        }
        Ok(Some((Self::named(name)?, None)))
    }

    /// The profile's threads, capped at the cores this machine has online.
    pub fn threads_here(&self) -> usize {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        self.threads.min(cores).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_parses_and_names_are_unique() {
        let all = BoardProfile::all();
        assert_eq!(BoardProfile::names(), vec!["raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "jetson-agx-orin"]);
        for p in &all {
            assert_eq!(BoardProfile::named(&p.name).unwrap(), *p);
            for a in &p.aliases {
                assert_eq!(BoardProfile::named(a).unwrap().name, p.name);
            }
            assert!(p.threads >= 1 && p.target.contains("linux") && p.rustflags.contains("target-cpu"));
            crate::source::camera::parse_camera_formats(&p.camera.format).unwrap();
            assert!(p.camera.device.starts_with("/dev/") && p.camera.size.contains('x') && p.camera.fps > 0);
            assert!(!p.notes.power.is_empty() && !p.notes.camera.is_empty());
            assert!(["f32", "int8", "f16"].contains(&p.precision.as_str()) && p.why.starts_with(&p.precision), "{}: {}", p.name, p.why);
        }
        let e = BoardProfile::named("toaster").unwrap_err().to_string();
        assert!(e.contains("known: raspberry-pi-4") && e.contains("auto"), "{e}");
    }

    #[test]
    fn detection_from_device_tree_and_cpuinfo() {
        let d = |m: Option<&str>, c: Option<&str>| BoardProfile::detect_from(m, c).map(|(p, _)| p.name);
        assert_eq!(d(Some("Raspberry Pi 4 Model B Rev 1.4\0"), None).as_deref(), Some("raspberry-pi-4"));
        assert_eq!(d(Some("Raspberry Pi 5 Model B Rev 1.0"), None).as_deref(), Some("raspberry-pi-5"));
        assert_eq!(d(Some("Raspberry Pi Compute Module 4 Rev 1.0"), None).as_deref(), Some("raspberry-pi-4"));
        assert_eq!(d(Some("NVIDIA Jetson Orin Nano Developer Kit"), None).as_deref(), Some("jetson-orin-nano"));
        assert_eq!(d(Some("NVIDIA Jetson AGX Orin Developer Kit"), None).as_deref(), Some("jetson-agx-orin"));
        // unknown model: the CPU part decides
        let a76 = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n";
        assert_eq!(d(Some("Some Other Board"), Some(a76)).as_deref(), Some("raspberry-pi-5"));
        assert_eq!(BoardProfile::detect_from(None, Some(a76)).unwrap().1, Detected::CpuPart("0xd0b".into()));
        // an x86 machine: no board
        assert_eq!(d(None, Some("processor\t: 0\nvendor_id\t: GenuineIntel\n")), None);
        assert_eq!(d(None, None), None);
    }
}
