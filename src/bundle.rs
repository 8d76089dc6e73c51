//! Model bundles: a folder with `coca.json` (the manifest), ONNX graphs per precision and the
//! BPE vocab, as written by `models/export/export.py`.
//!
//! Nothing in a bundle is trusted before it is checked: the manifest's format and version, and
//! for every file the runtime opens, its size and sha256 against the manifest. A missing,
//! corrupt or mismatched file is an [`Error`] naming that file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The `format` string every manifest carries.
pub const FORMAT: &str = "coca-edge-bundle";
/// The manifest version this build reads.
pub const FORMAT_VERSION: u64 = 1;
/// Name of the manifest file inside a bundle folder.
pub const MANIFEST: &str = "coca.json";

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u64,
    pub name: String,
    #[serde(default)]
    pub source: serde_json::Value,
    pub image: ImageSpec,
    pub text: TextSpec,
    pub dims: Dims,
    pub logit_scale: f32,
    /// captioning geometry; absent in bundles exported without decoder graphs
    #[serde(default)]
    pub decoder: Option<DecoderDims>,
    pub graphs: BTreeMap<String, GraphSpec>,
    pub files: BTreeMap<String, FileSpec>,
    /// zero-shot defaults of the model (templates it was trained to read)
    #[serde(default)]
    pub classify: Option<ClassifySpec>,
    /// captioning defaults of the model
    #[serde(default)]
    pub caption: Option<CaptionSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CaptionSpec {
    /// the search to use when the user names none: "greedy" or "beam" (open_clip's default)
    #[serde(default)]
    pub search: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClassifySpec {
    /// prompt templates, each with one `{}`; used when the user gives none
    #[serde(default)]
    pub templates: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageSpec {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    #[serde(default = "default_interpolation")]
    pub interpolation: String,
    #[serde(default = "default_resize_mode")]
    pub resize_mode: String,
}

fn default_interpolation() -> String {
    "bicubic".into()
}
fn default_resize_mode() -> String {
    "shortest".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextSpec {
    pub vocab: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub sot: u32,
    pub eot: u32,
    pub pad: u32,
    #[serde(default = "default_clean")]
    pub clean: String,
    /// open_clip's pad mask of the unimodal text tower: "legacy" (key j masked when token j-1
    /// is the pad id, open_clip's CoCa default) or "none"
    #[serde(default = "default_pad_mask")]
    pub pad_mask: String,
    /// a restricted vocabulary: model id i is BPE id vocab_map[i] (vocab_size entries; sot,
    /// eot and pad are model ids then)
    #[serde(default)]
    pub vocab_map: Option<Vec<u32>>,
}

fn default_pad_mask() -> String {
    "legacy".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct DecoderDims {
    /// self-attention layers with a KV cache: unimodal text layers, then multimodal layers
    pub self_layers: usize,
    pub text_layers: usize,
    pub cross_layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// size of the logits (the decoder's output vocabulary)
    pub vocab_size: usize,
    /// positional embeddings of the text tower: the longest sequence the decoder can see
    pub max_positions: usize,
}

fn default_clean() -> String {
    "lower".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct Dims {
    pub embed_dim: usize,
    pub caption_tokens: usize,
    pub token_dim: usize,
    /// `[tokens, width]` of the image encoder's optional third output, the ViT's tokens before
    /// the attentional pooler (exported with `--frozen-tokens`, for attentional-pooler heads)
    #[serde(default)]
    pub frozen_tokens: Option<[usize; 2]>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GraphSpec {
    /// precision name ("f32", "f16", "int8") -> file name in the bundle
    pub precisions: BTreeMap<String, String>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    /// concrete sizes as numbers, symbolic ones (e.g. "batch") as strings
    pub shape: Vec<Dim>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Symbol(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileSpec {
    pub sha256: String,
    pub size: u64,
}

/// An opened bundle: its folder and its parsed, format-checked manifest. Files are checked
/// against the manifest when they are opened ([`Bundle::verified_path`]).
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    id: String,
    /// where verified digests are remembered (None: hash every file on every open)
    digest_cache: Option<PathBuf>,
}

impl Bundle {
    /// Open the bundle folder `dir` and parse its manifest.
    pub fn open(dir: impl AsRef<Path>) -> Result<Bundle> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::Manifest { path: dir, message: "not a model bundle folder (it is a file)".into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::io(dir, std::io::Error::new(e.kind(), "model bundle folder not found"))),
            Err(e) => return Err(Error::io(dir, e)),
        }
        let mpath = dir.join(MANIFEST);
        let text = crate::limits::read_capped(&mpath, crate::limits::MANIFEST_BYTES, "the manifest").map_err(|e| match e {
            Error::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::io(path, std::io::Error::new(source.kind(), "manifest not found: not a model bundle"))
            }
            e => e,
        })?;
        let manifest = parse_manifest(&text, &mpath)?;
        let id = bundle_id(&manifest);
        Ok(Bundle { dir, manifest, id, digest_cache: None })
    }

    /// Remember verified digests under `dir`, keyed by the file's path, size, modification time
    /// and inode, so a large graph is hashed once, not at every start (cold start). A file that
    /// changes in any of these is hashed again; an unreadable or damaged entry is ignored.
    pub fn with_digest_cache(mut self, dir: Option<PathBuf>) -> Bundle {
        self.digest_cache = dir;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// A stable identity of the bundle's content (hash over every file's sha256), used to key
    /// caches and to refuse files (label caches, heads) made for another bundle.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The graph spec named `graph`, or an error naming the manifest.
    pub fn graph(&self, graph: &str) -> Result<&GraphSpec> {
        self.manifest.graphs.get(graph).ok_or_else(|| Error::Manifest { path: self.dir.join(MANIFEST), message: format!("no graph named '{graph}'") })
    }

    /// The precision `graph` is loaded at when `wanted` is asked for: `wanted` where the graph
    /// has it, else f32 for a graph the bundle ships only in f32 (int8 image encoder beside an
    /// f32 decoder, say); an error if no graph of the bundle has `wanted` at all.
    pub fn graph_precision(&self, graph: &str, wanted: &str) -> Result<String> {
        let spec = self.graph(graph)?;
        if spec.precisions.contains_key(wanted) {
            return Ok(wanted.to_string());
        }
        let any = self.manifest.graphs.values().any(|g| g.precisions.contains_key(wanted));
        let bad = |message: String| Error::Manifest { path: self.dir.join(MANIFEST), message };
        if !any {
            let mut all: Vec<&String> = self.manifest.graphs.values().flat_map(|g| g.precisions.keys()).collect();
            all.sort();
            all.dedup();
            return Err(bad(format!(
                "no '{wanted}' graphs in this bundle (it has: {}); add them with models/export/quantize.py --precision {wanted}",
                all.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        if !spec.precisions.contains_key("f32") {
            return Err(bad(format!(
                "graph '{graph}' has neither '{wanted}' nor f32 (it has: {})",
                spec.precisions.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok("f32".to_string())
    }

    /// A key for what was computed at `precision`: the precision, plus a digest of the
    /// reduced-precision files it loads, so caches of int8 or f16 results go stale when the
    /// variants are made again (other calibration images, say). "f32" alone for f32.
    pub fn precision_key(&self, precision: &str) -> String {
        let mut h = Sha256::new();
        let mut any = false;
        for (name, g) in self.manifest.graphs.iter().filter(|_| precision != "f32") {
            if let Some(file) = g.precisions.get(precision) {
                let sha = self.manifest.files.get(file).map(|f| f.sha256.as_str()).unwrap_or("");
                for part in [name.as_str(), sha] {
                    h.update(part.as_bytes());
                    h.update([0]);
                }
                any = true;
            }
        }
        if any {
            format!("{precision}-{}", hex::encode(&h.finalize()[..6]))
        } else {
            precision.to_string()
        }
    }

    /// Path of the file for `graph` at `precision`, after checking it against the manifest.
    pub fn graph_file(&self, graph: &str, precision: &str) -> Result<PathBuf> {
        let spec = self.graph(graph)?;
        let file = spec.precisions.get(precision).ok_or_else(|| Error::Manifest {
            path: self.dir.join(MANIFEST),
            message: format!("graph '{graph}' has no '{precision}' precision (available: {})", spec.precisions.keys().cloned().collect::<Vec<_>>().join(", ")),
        })?;
        self.verified_path(file)
    }

    /// Check `name`'s size and sha256 against the manifest and return its path.
    pub fn verified_path(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let spec = self
            .manifest
            .files
            .get(name)
            .ok_or_else(|| Error::Manifest { path: self.dir.join(MANIFEST), message: format!("file '{name}' is used but not listed in 'files'") })?;
        let meta = std::fs::metadata(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::io(&path, std::io::Error::new(e.kind(), "bundle file missing"))
            } else {
                Error::io(&path, e)
            }
        })?;
        if meta.len() != spec.size {
            return Err(Error::Integrity {
                path,
                message: format!("size {} does not match the manifest's {} (truncated or replaced file)", meta.len(), spec.size),
            });
        }
        let digest = self.digest(&path, &meta)?;
        if !digest.eq_ignore_ascii_case(&spec.sha256) {
            return Err(Error::Integrity { path, message: format!("sha256 {digest} does not match the manifest's {} (corrupt file)", spec.sha256) });
        }
        Ok(path)
    }
}

impl Bundle {
    fn digest(&self, path: &Path, meta: &std::fs::Metadata) -> Result<String> {
        let Some(dir) = &self.digest_cache else { return sha256_file(path) };
        let stamp = file_stamp(path, meta);
        let entry = dir.join("digests").join(format!("{}.json", hex::encode(&Sha256::digest(stamp.as_bytes())[..16])));
        if let Ok(text) = std::fs::read_to_string(&entry) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if v["stamp"] == stamp.as_str() {
                    if let Some(d) = v["sha256"].as_str().filter(|d| d.len() == 64) {
                        return Ok(d.to_string());
                    }
                }
            }
            log::warn!("ignoring damaged digest cache entry {}", entry.display());
        }
        let digest = sha256_file(path)?;
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(entry.parent().unwrap())?;
            let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, serde_json::json!({"stamp": stamp, "sha256": digest}).to_string())?;
            std::fs::rename(&tmp, &entry)
        };
        if let Err(e) = write() {
            log::debug!("could not write digest cache {}: {e}", entry.display());
        }
        Ok(digest)
    }
}

/// Identity of a file's current content as the file system sees it.
fn file_stamp(path: &Path, meta: &std::fs::Metadata) -> String {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    #[cfg(unix)]
    let ino = {
        use std::os::unix::fs::MetadataExt;
        format!("{}:{}", meta.dev(), meta.ino())
    };
    #[cfg(not(unix))]
    let ino = String::new();
    format!("{}|{}|{}|{}", canonical.display(), meta.len(), mtime, ino)
}

fn parse_manifest(text: &[u8], path: &Path) -> Result<Manifest> {
    let bad = |message: String| Error::Manifest { path: path.to_path_buf(), message };
    // Read format and version first, so a newer manifest gets a version error, not a field error.
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
    if format != FORMAT {
        return Err(bad(format!("'format' is '{format}', expected '{FORMAT}'")));
    }
    let version = value.get("format_version").and_then(|v| v.as_u64()).ok_or_else(|| bad("'format_version' missing or not a number".into()))?;
    if version != FORMAT_VERSION {
        return Err(Error::FormatVersion { path: path.to_path_buf(), found: version, supported: FORMAT_VERSION });
    }
    let m: Manifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    // internal consistency: every graph file is listed, sizes are sane
    for (gname, g) in &m.graphs {
        if g.precisions.is_empty() {
            return Err(bad(format!("graph '{gname}' lists no precision")));
        }
        for file in g.precisions.values() {
            if !m.files.contains_key(file) {
                return Err(bad(format!("graph '{gname}' file '{file}' not listed in 'files'")));
            }
            if file.contains("..") || Path::new(file).is_absolute() {
                return Err(bad(format!("graph '{gname}' file '{file}' is outside the bundle")));
            }
        }
    }
    if !m.files.contains_key(&m.text.vocab) {
        return Err(bad(format!("vocab '{}' not listed in 'files'", m.text.vocab)));
    }
    // every file the manifest lists is opened inside the bundle folder (an absolute vocab path
    // like /etc/passwd was opened where it pointed)
    for file in m.files.keys() {
        let p = Path::new(file);
        if p.is_absolute() || p.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(bad(format!("file '{file}' is outside the bundle")));
        }
    }
    if m.image.size == 0 || m.image.size > 4096 {
        return Err(bad(format!("image size {} out of range", m.image.size)));
    }
    if m.image.std.iter().any(|s| !s.is_finite() || *s <= 0.0) || m.image.mean.iter().any(|v| !v.is_finite()) {
        return Err(bad("image mean/std must be finite and std > 0".into()));
    }
    if m.text.context_length < 2 || m.text.context_length > 4096 {
        return Err(bad(format!("text context_length {} out of range", m.text.context_length)));
    }
    if !m.logit_scale.is_finite() || m.logit_scale <= 0.0 {
        return Err(bad(format!("logit_scale {} must be finite and > 0", m.logit_scale)));
    }
    if m.dims.embed_dim == 0 {
        return Err(bad("dims.embed_dim is 0".into()));
    }
    Ok(m)
}

/// The model's identity: every file but the reduced-precision variants (int8, f16), which are
/// derived from the f32 graphs. Adding variants to a bundle keeps its id, so heads trained on
/// it stay valid; caches that depend on the precision key on it separately.
fn bundle_id(m: &Manifest) -> String {
    let f32_files: std::collections::BTreeSet<&String> = m.graphs.values().filter_map(|g| g.precisions.get("f32")).collect();
    // only variants of graphs that also ship in f32: a graph shipped in int8 alone is the model
    let variants: std::collections::BTreeSet<&String> = m
        .graphs
        .values()
        .filter(|g| g.precisions.contains_key("f32"))
        .flat_map(|g| g.precisions.iter().filter(|(p, _)| p.as_str() != "f32").map(|(_, f)| f))
        .filter(|f| !f32_files.contains(f))
        .collect();
    let mut h = Sha256::new();
    for (name, f) in m.files.iter().filter(|(name, _)| !variants.contains(name)) {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(f.sha256.to_ascii_lowercase().as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_version_is_a_version_error() {
        let t = br#"{"format":"coca-edge-bundle","format_version":99}"#;
        let e = parse_manifest(t, Path::new("coca.json")).unwrap_err();
        assert!(matches!(e, Error::FormatVersion { found: 99, .. }), "{e}");
    }

    #[test]
    fn invalid_json_names_the_file() {
        let e = parse_manifest(b"{not json", Path::new("x/coca.json")).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("x/coca.json: invalid manifest: not valid JSON"), "{s}");
    }

    #[test]
    fn dims_parse_numbers_and_symbols() {
        let d: Vec<Dim> = serde_json::from_str(r#"["batch", 3, 224]"#).unwrap();
        assert_eq!(d, vec![Dim::Symbol("batch".into()), Dim::Fixed(3), Dim::Fixed(224)]);
    }
}
