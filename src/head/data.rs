//! Labelled images for heads: a folder with one subfolder of images per class (what `--teach`
//! writes), or a list file of `CLASS<TAB>PATH` lines (paths relative to the list's folder).
//! Embeddings are computed once per image content and cached (`$COCA_CACHE_DIR/embeddings/
//! <bundle id>/<sha256 of the file>.f32`), so retraining with other options is instant.
//! Unreadable or undecodable images are skipped and counted, never fatal. This module lists
//! datasets and keeps the embedding cache; [`crate::Pipeline::embed_dataset`] runs the encoder
//! over them.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Classes and their images.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub classes: Vec<String>,
    pub items: Vec<(PathBuf, usize)>,
}

impl Dataset {
    /// Scan a class-per-folder directory or read a list file.
    pub fn scan(path: &Path) -> Result<Dataset> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let ds = if meta.is_dir() { Self::from_dir(path)? } else { Self::from_list(path)? };
        if ds.classes.len() < 2 {
            return Err(Error::InvalidArgument(format!(
                "{}: a head needs at least 2 classes, found {} ({})",
                path.display(),
                ds.classes.len(),
                if meta.is_dir() { "one subfolder of images per class" } else { "CLASS<TAB>PATH lines" }
            )));
        }
        Ok(ds)
    }

    fn from_dir(dir: &Path) -> Result<Dataset> {
        let mut class_dirs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && !p.file_name().and_then(|n| n.to_str()).unwrap_or(".").starts_with('.'))
            .collect();
        class_dirs.sort();
        let mut classes = Vec::new();
        let mut items = Vec::new();
        for d in class_dirs {
            let name =
                d.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::InvalidArgument(format!("{}: class folder names must be UTF-8", d.display())))?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
                .map_err(|e| Error::io(&d, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| crate::vision::is_image_file(p))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::InvalidArgument(format!("{}: class '{name}' has no images (jpg, png, ...)", d.display())));
            }
            let k = classes.len();
            classes.push(name.to_string());
            items.extend(files.into_iter().map(|f| (f, k)));
        }
        Ok(Dataset { classes, items })
    }

    fn from_list(list: &Path) -> Result<Dataset> {
        let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
        let base = list.parent().unwrap_or(Path::new("."));
        let mut classes: Vec<String> = Vec::new();
        let mut items = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (class, path) =
                line.split_once('\t').ok_or_else(|| Error::InvalidArgument(format!("{}:{}: expected CLASS<TAB>PATH", list.display(), n + 1)))?;
            let class = class.trim();
            if class.is_empty() {
                return Err(Error::InvalidArgument(format!("{}:{}: empty class name", list.display(), n + 1)));
            }
            let k = classes.iter().position(|c| c == class).unwrap_or_else(|| {
                classes.push(class.to_string());
                classes.len() - 1
            });
            items.push((base.join(path.trim()), k));
        }
        Ok(Dataset { classes, items })
    }
}

/// Embeddings of a dataset.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub x: Vec<Vec<f32>>,
    pub y: Vec<usize>,
    /// images that could not be read or decoded, with why
    pub skipped: Vec<(PathBuf, String)>,
    /// embeddings found in the cache
    pub cached: usize,
}

impl Embedded {
    /// No images yet.
    pub fn new() -> Embedded {
        Embedded { x: Vec::new(), y: Vec::new(), skipped: Vec::new(), cached: 0 }
    }

    /// An error naming the first class of `ds` none of whose images could be read.
    pub fn check_every_class(&self, ds: &Dataset) -> Result<()> {
        let mut counts = vec![0usize; ds.classes.len()];
        self.y.iter().for_each(|&k| counts[k] += 1);
        if let Some(k) = counts.iter().position(|&c| c == 0) {
            return Err(Error::InvalidArgument(format!("class '{}': none of its images could be read ({} skipped in all)", ds.classes[k], self.skipped.len())));
        }
        Ok(())
    }
}

impl Default for Embedded {
    fn default() -> Self {
        Embedded::new()
    }
}

/// Image embeddings on disk, one `<sha256 of the file>.f32` file (little-endian floats) per
/// image content, in a folder per bundle and precision.
#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    dir: PathBuf,
    dim: usize,
}

impl EmbeddingCache {
    /// The cache under `cache_dir` (`embeddings/<bundle id>/<precision key>`) for `dim`-value
    /// embeddings.
    pub fn new(cache_dir: &Path, bundle_id: &str, precision_key: &str, dim: usize) -> EmbeddingCache {
        EmbeddingCache { dir: cache_dir.join("embeddings").join(bundle_id).join(precision_key), dim }
    }

    /// The key of an image file's bytes.
    pub fn key(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// The cached embedding for `key`, if there is one of the right length.
    pub fn get(&self, key: &str) -> Option<Vec<f32>> {
        let b = std::fs::read(self.dir.join(format!("{key}.f32"))).ok().filter(|b| b.len() == self.dim * 4)?;
        Some(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Store `emb` under `key`; best effort: a read-only cache only costs time.
    pub fn put(&self, key: &str, emb: &[f32]) {
        let c = &self.dir;
        let _ = std::fs::create_dir_all(c).and_then(|_| {
            let tmp = c.join(format!("{key}.tmp{}", std::process::id()));
            std::fs::write(&tmp, emb.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
            std::fs::rename(tmp, c.join(format!("{key}.f32")))
        });
    }
}
