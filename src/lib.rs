//! # coca-edge
//!
//! CoCa (Contrastive Captioners, Yu et al. 2022) on robots: open_clip's CoCa exported to a model
//! bundle (`models/export/export.py`) and run through [tract](https://github.com/sonos/tract),
//! with the same numbers as PyTorch.
//!
//! ```no_run
//! use coca_edge::{Pipeline, PipelineOptions, classify::Templates};
//! let p = Pipeline::open("models/coca-scenes", PipelineOptions::with_default_cache())?;
//! let labels = vec!["red circle".to_string(), "blue square".to_string()];
//! let set = p.label_set(&labels, &p.default_templates()?, |_, _| {})?;
//! let features = p.embed_path("examples/large_orange_circle_top.jpg".as_ref())?;
//! for s in p.classify(&features, &set, 5)? {
//!     println!("{:.3} {}", s.probability, s.label);
//! }
//! # Ok::<(), coca_edge::Error>(())
//! ```
//!
//! # Layout
//! Imports point one way, down this list; nothing imports what is above it (tests/layout.rs checks
//! it, and that only `model` names tract). One frame's data flow: docs/architecture.md.
//! - [`ffi`]: the C ABI (`include/coca_edge.h`), a thin panic-safe layer over the public API.
//! - [`stream`]: capture thread, latest-frame slot, per-frame labels and captions, reports to
//!   sinks (JSON lines, saved annotated frames, the preview server).
//! - [`source`]: frame sources: image files and folders, Y4M, MJPEG, raw frames from a pipe.
//! - [`pipeline`]: `Pipeline`, what the CLI, the stream, the Rust API and the C ABI share:
//!   bundle -> preprocess -> image encoder -> labels, head, caption, one frame per
//!   `Pipeline::process` call.
//! - [`head`]: heads trained on the frozen encoder, and their labelled datasets.
//! - [`caption`]: greedy, beam and sampling search over the KV-cached decoder (open_clip's
//!   `generate()` semantics).
//! - [`classify`]: zero-shot label embeddings (prompt templates, averaging, on-disk cache), scores.
//! - [`model`]: the only module that names tract types: loads, checks, optimises and runs graphs;
//!   ONNX rewrites before parsing, our tract ops wrapping the kernels, passes after tract's
//!   optimisation (all crate-private; `EngineOptions::tract_ops` turns them off).
//! - `kernels` (crate-private): compute kernels with no tract types, one submodule per ISA
//!   (x86_64, aarch64, portable), one table chosen at start-up (`model::kernel_set()` names it).
//! - [`board`]: built-in board profiles (`boards/*.toml`): default threads and precision.
//! - [`bundle`]: the model bundle: versioned manifest, file sizes and hashes, validation.
//! - [`vision`]: image decoding with limits, preprocessing identical to open_clip's (PIL) transform.
//! - [`text`]: the CLIP BPE tokenizer and detokenizer, identical to open_clip's SimpleTokenizer.
//! - [`error`]: the library's one error type; every variant names the thing that was wrong.

pub mod board;
pub mod bundle;
pub mod caption;
pub mod classify;
pub mod error;
pub mod ffi;
pub mod head;
pub(crate) mod kernels;
pub mod limits;
pub mod model;
pub mod pipeline;
pub mod source;
pub mod stream;
pub mod text;
pub mod vision;

pub use error::{Error, Result};
pub use pipeline::{Pipeline, PipelineOptions};

/// The default model shipped with the repository (a tiny CoCa trained on generated scenes,
/// models/coca-scenes/README.md), relative to the repository root.
pub const DEFAULT_BUNDLE: &str = "models/coca-scenes";

/// The test bundle: random weights in a tiny CoCa geometry with open_clip's full vocabulary,
/// the subject of the parity goldens (tests/fixtures/goldens), relative to the repository root.
pub const TEST_BUNDLE: &str = "models/coca-tiny-random";
