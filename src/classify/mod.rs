//! Zero-shot classification, as open_clip's `build_zero_shot_classifier` does it: every label is
//! put into every prompt template, the text embeddings (L2-normalised) are averaged per label and
//! re-normalised; an image's scores are `softmax(logit_scale * cosine)` over the labels.
//!
//! Label embeddings are cached on disk, keyed by the bundle's identity, the precision, the labels
//! and the templates, so a robot pays for the text encoder once per label set.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// open_clip's 80 OpenAI ImageNet prompt templates (`OPENAI_IMAGENET_TEMPLATES`), `{}` = label.
const OPENAI_IMAGENET_TEMPLATES: &str = include_str!("openai_imagenet_templates.txt");

/// Most labels accepted in one set, and the longest label (bytes): beyond that it is a mistake.
pub const MAX_LABELS: usize = 100_000;
pub const MAX_LABEL_BYTES: usize = 1_000;

/// Prompt templates, each with exactly one `{}` placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates(Vec<String>);

impl Templates {
    /// open_clip's ImageNet templates (80 prompts), the default.
    pub fn openai_imagenet() -> Templates {
        Templates(OPENAI_IMAGENET_TEMPLATES.lines().map(str::to_string).collect())
    }

    /// One template per line; empty lines and lines starting with `#` are skipped.
    pub fn parse(text: &str, what: &str) -> Result<Templates> {
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if t.matches("{}").count() != 1 {
                // (the first 60 characters: a 1 MB line stays a readable one-line error)
                let shown: String = t.chars().take(60).collect();
                let more = if shown.len() < t.len() { format!("...' ({} bytes)", t.len()) } else { "'".into() };
                return Err(Error::Labels {
                    what: what.to_string(),
                    message: format!("line {}: a template needs exactly one {{}} placeholder: '{shown}{more}", i + 1),
                });
            }
            v.push(t.to_string());
        }
        if v.is_empty() {
            return Err(Error::Labels { what: what.to_string(), message: "no templates".into() });
        }
        Ok(Templates(v))
    }

    pub fn from_file(path: &Path) -> Result<Templates> {
        let text = read_utf8(path)?;
        Templates::parse(&text, &path.display().to_string())
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// The prompt for `label` from template `ix`.
    pub fn fill(&self, ix: usize, label: &str) -> String {
        self.0[ix].replacen("{}", label, 1)
    }
}

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = crate::limits::read_capped(path, crate::limits::TEXT_FILE_BYTES, "the text file")?;
    String::from_utf8(bytes).map_err(|e| Error::Labels {
        what: path.display().to_string(),
        message: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
    })
}

fn check_labels(labels: Vec<String>, what: &str) -> Result<Vec<String>> {
    let bad = |message: String| Error::Labels { what: what.to_string(), message };
    if labels.is_empty() {
        return Err(bad("no labels given".into()));
    }
    if labels.len() > MAX_LABELS {
        return Err(bad(format!("{} labels, over the limit of {MAX_LABELS}", labels.len())));
    }
    let mut seen = std::collections::HashSet::new();
    for l in &labels {
        if l.len() > MAX_LABEL_BYTES {
            return Err(bad(format!("label '{}...' is longer than {MAX_LABEL_BYTES} bytes", l.chars().take(40).collect::<String>())));
        }
        if !seen.insert(l.as_str()) {
            return Err(bad(format!("label '{l}' given twice")));
        }
    }
    Ok(labels)
}

/// Check a list of labels given by a program (trimmed; empty, duplicate, over-long refused).
pub fn parse_label_list_vec(labels: Vec<String>) -> Result<Vec<String>> {
    let labels = labels.into_iter().map(|s| s.trim().to_string()).collect::<Vec<_>>();
    if let Some(i) = labels.iter().position(|l| l.is_empty()) {
        return Err(Error::Labels { what: "labels".into(), message: format!("label {i} is empty") });
    }
    check_labels(labels, "labels")
}

/// Labels from a comma-separated list (`--labels a,b,c`); surrounding spaces are trimmed.
pub fn parse_label_list(list: &str) -> Result<Vec<String>> {
    let labels: Vec<String> = list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    check_labels(labels, "--labels")
}

/// Labels from a UTF-8 file, one per line; empty lines and `#` comments are skipped.
pub fn read_label_file(path: &Path) -> Result<Vec<String>> {
    let text = read_utf8(path)?;
    let labels: Vec<String> = text.lines().map(|l| l.trim()).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    check_labels(labels, &path.display().to_string())
}

/// One scored label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub label: String,
    pub index: usize,
    /// softmax(logit_scale * cosine) over the label set
    pub probability: f32,
    pub cosine: f32,
}

/// A label set with its (averaged, normalised) text embeddings, `labels.len() x dim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelSet {
    labels: Vec<String>,
    dim: usize,
    embeddings: Vec<f32>,
}

impl LabelSet {
    /// Build from per-prompt text embeddings laid out label-major: for label i and template j,
    /// row `i * n_templates + j`. Each row is expected L2-normalised (the graph normalises).
    pub fn from_prompt_embeddings(labels: Vec<String>, n_templates: usize, dim: usize, prompt_emb: &[f32]) -> Result<LabelSet> {
        if n_templates == 0 || dim == 0 || prompt_emb.len() != labels.len() * n_templates * dim {
            return Err(Error::InvalidArgument(format!(
                "{} prompt embedding values for {} labels x {n_templates} templates x {dim}",
                prompt_emb.len(),
                labels.len()
            )));
        }
        let mut embeddings = vec![0f32; labels.len() * dim];
        for (i, out) in embeddings.chunks_mut(dim).enumerate() {
            let rows = &prompt_emb[i * n_templates * dim..(i + 1) * n_templates * dim];
            // mean over templates, then re-normalise (the mean's scale cancels out)
            for row in rows.chunks(dim) {
                for (o, v) in out.iter_mut().zip(row) {
                    *o += v;
                }
            }
            for o in out.iter_mut() {
                *o /= n_templates as f32;
            }
            normalize(out);
        }
        Ok(LabelSet { labels, dim, embeddings })
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn embedding(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }

    /// Scores of every label for one L2-normalised image embedding, best first, `top_k` of them.
    pub fn classify(&self, image_embedding: &[f32], logit_scale: f32, top_k: usize) -> Result<Vec<Score>> {
        if image_embedding.len() != self.dim {
            return Err(Error::InvalidArgument(format!("image embedding has {} values, label embeddings have {}", image_embedding.len(), self.dim)));
        }
        let cos: Vec<f32> = (0..self.labels.len()).map(|i| dot(self.embedding(i), image_embedding)).collect();
        let logits: Vec<f32> = cos.iter().map(|c| logit_scale * c).collect();
        let probs = crate::kernels::softmax(&logits);
        let mut scores: Vec<Score> =
            (0..self.labels.len()).map(|i| Score { label: self.labels[i].clone(), index: i, probability: probs[i], cosine: cos[i] }).collect();
        // stable: equal scores keep label order, like torch.topk on CPU for distinct values
        scores.sort_by(|a, b| b.cosine.total_cmp(&a.cosine).then(a.index.cmp(&b.index)));
        scores.truncate(top_k.max(1));
        Ok(scores)
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) fn normalize(v: &mut [f32]) {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// On-disk cache of label sets.
#[derive(Debug, Clone)]
pub struct LabelCache {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    bundle: String,
    key: String,
    set: LabelSet,
}

impl LabelCache {
    /// `$COCA_CACHE_DIR`, else the user's cache folder (`~/.cache/coca-edge`).
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("COCA_CACHE_DIR") {
            return Some(PathBuf::from(d));
        }
        dirs::cache_dir().map(|d| d.join("coca-edge"))
    }

    pub fn new(dir: impl Into<PathBuf>) -> LabelCache {
        LabelCache { dir: dir.into() }
    }

    pub fn key(bundle_id: &str, precision: &str, labels: &[String], templates: &Templates) -> String {
        let mut h = Sha256::new();
        for part in [bundle_id, precision] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for t in templates.as_slice() {
            h.update(t.as_bytes());
            h.update([1]);
        }
        h.update([0]);
        for l in labels {
            h.update(l.as_bytes());
            h.update([1]);
        }
        hex::encode(&h.finalize()[..16])
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join("labels").join(format!("{key}.json"))
    }

    /// A cached set, if present and consistent; a corrupt entry is ignored (and logged).
    pub fn get(&self, bundle_id: &str, key: &str, labels: &[String], dim: usize) -> Option<LabelSet> {
        let path = self.path(key);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<CacheFile>(&bytes) {
            Ok(f)
                if f.version == 1
                    && f.bundle == bundle_id
                    && f.key == key
                    && f.set.labels == labels
                    && f.set.dim == dim
                    && f.set.embeddings.len() == labels.len() * dim
                    && f.set.embeddings.iter().all(|v| v.is_finite()) =>
            {
                log::debug!("label embeddings from cache {}", path.display());
                Some(f.set)
            }
            _ => {
                log::warn!("ignoring unusable label cache {}", path.display());
                None
            }
        }
    }

    /// Store a set; failures are logged, never fatal (the cache is an optimisation).
    pub fn put(&self, bundle_id: &str, key: &str, set: &LabelSet) {
        let path = self.path(key);
        let res = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().unwrap())?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let f = CacheFile { version: 1, bundle: bundle_id.to_string(), key: key.to_string(), set: set.clone() };
            std::fs::write(&tmp, serde_json::to_vec(&f).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            log::warn!("could not write label cache {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_templates_are_open_clips_80() {
        let t = Templates::openai_imagenet();
        assert_eq!(t.as_slice().len(), 80);
        assert_eq!(t.fill(0, "cat"), "a bad photo of a cat.");
    }

    #[test]
    fn template_without_placeholder_is_refused() {
        let e = Templates::parse("a photo\n", "t.txt").unwrap_err().to_string();
        assert!(e.starts_with("t.txt: line 1"), "{e}");
        // a huge line is cut in the message (hardening finding 18: a 1 MB template was echoed whole)
        let huge = "x".repeat(1 << 20);
        let e = Templates::parse(&huge, "t.txt").unwrap_err().to_string();
        assert!(e.len() < 200 && e.contains("(1048576 bytes)"), "{}", &e[..e.len().min(300)]);
    }

    #[test]
    fn empty_and_duplicate_labels_are_refused() {
        assert!(parse_label_list(" , ,").unwrap_err().to_string().contains("no labels"));
        assert!(parse_label_list("cat,dog,cat").unwrap_err().to_string().contains("given twice"));
        assert_eq!(parse_label_list(" cat , dog ").unwrap(), vec!["cat", "dog"]);
    }

    #[test]
    fn averaging_and_softmax() {
        // two labels, two templates, dim 2
        let emb = [1.0, 0.0, 0.0, 1.0, /* label 1 */ 0.0, 1.0, 0.0, 1.0];
        let set = LabelSet::from_prompt_embeddings(vec!["a".into(), "b".into()], 2, 2, &emb).unwrap();
        let s = std::f32::consts::FRAC_1_SQRT_2;
        assert!((set.embedding(0)[0] - s).abs() < 1e-6 && (set.embedding(0)[1] - s).abs() < 1e-6);
        let scores = set.classify(&[0.0, 1.0], 10.0, 5).unwrap();
        assert_eq!(scores[0].label, "b");
        let p: f32 = scores.iter().map(|s| s.probability).sum();
        assert!((p - 1.0).abs() < 1e-6);
        let expect_b = 1.0 / (1.0 + (10.0 * (s - 1.0f32)).exp());
        assert!((scores[0].probability - expect_b).abs() < 1e-6);
    }
}
