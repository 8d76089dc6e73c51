//! Heads trained on frozen features: the robot's own classes learnt from a few labelled frames.
//!
//! * **Linear probe**: multinomial logistic regression on the L2-normalised contrastive embedding
//!   (scaled by sqrt(dim) so its entries are of order 1), L2 strength chosen by stratified k-fold
//!   cross-validation, fitted by L-BFGS. Hand-written: it is small, must be fast on a Pi, and
//!   needs no linear-algebra stack.
//! * **Prototype**: the normalised class means, scored like zero-shot labels
//!   (softmax(logit_scale * cosine)); for one or two shots per class.
//!
//! A head file is JSON (`coca-edge-head`, version 1): the classes, the weights, how it was
//! trained, and the id of the bundle whose embeddings it was trained on; a head is refused with
//! another bundle.

pub mod data;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::classify::Score;
use crate::error::{Error, Result};

pub const HEAD_FORMAT: &str = "coca-edge-head";
pub const HEAD_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    Linear,
    Prototype,
    /// a fresh attentional pooler + linear layer on the ViT's frozen tokens, an ONNX graph
    /// trained in PyTorch (models/train/train_ap_head.py)
    AttentionalPooler,
}

impl std::str::FromStr for HeadKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<HeadKind> {
        match s {
            "linear" => Ok(HeadKind::Linear),
            "prototype" => Ok(HeadKind::Prototype),
            _ => Err(Error::InvalidArgument(format!(
                "head kind '{s}': use linear or prototype (attentional-pooler heads are trained in PyTorch: models/train/train_ap_head.py)"
            ))),
        }
    }
}

/// A trained head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub format: String,
    pub version: u32,
    pub kind: HeadKind,
    /// `Bundle::id` of the model whose embeddings it was trained on
    pub bundle_id: String,
    pub bundle_name: String,
    pub classes: Vec<String>,
    pub dim: usize,
    /// classes x dim, row-major (linear: weights on scale * embedding; prototype: unit class means)
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    /// linear: the input scale (sqrt(dim)); prototype: the logit scale
    pub scale: f32,
    /// L2 strength (linear)
    #[serde(default)]
    pub l2: Option<f32>,
    /// cross-validated accuracy when there were enough images per class
    #[serde(default)]
    pub cv_accuracy: Option<f32>,
    pub images_per_class: Vec<usize>,
    /// attentional-pooler heads: the ONNX graph (next to the head file), its sha256, and the
    /// number of frozen tokens it reads (`dim` is their width)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    #[serde(skip)]
    runner: GraphRunner,
}

/// The loaded graph of an attentional-pooler head (compared as equal: it follows the file).
#[derive(Clone, Default)]
struct GraphRunner(Option<std::sync::Arc<crate::model::OnnxGraph>>);

impl PartialEq for GraphRunner {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for GraphRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "GraphRunner(loaded)" } else { "GraphRunner(none)" })
    }
}

impl Head {
    /// Classes with probabilities from one encoder pass: the embedding for linear and
    /// prototype heads, the frozen tokens for attentional-pooler heads.
    pub fn classify_features(&self, f: &crate::model::ImageFeatures, top_k: usize) -> Result<Vec<Score>> {
        if self.kind != HeadKind::AttentionalPooler {
            return self.classify(&f.embedding, top_k);
        }
        let (t, w) = (self.tokens.unwrap_or(0), self.dim);
        if f.frozen_tokens.len() != t * w {
            return Err(Error::InvalidArgument(format!(
                "this attentional-pooler head reads {t}x{w} frozen tokens, the image encoder gave {} values (export the bundle with --frozen-tokens)",
                f.frozen_tokens.len()
            )));
        }
        let plan = self.runner.0.as_ref().ok_or_else(|| Error::InvalidArgument("head graph not loaded".into()))?;
        let out = plan.run(&[(&[1, t, w], &f.frozen_tokens)])?;
        let z = out.first().ok_or_else(|| Error::engine("head graph", "no output"))?;
        if z.len() != self.classes.len() {
            return Err(Error::engine("head graph", format!("{} logits for {} classes", z.len(), self.classes.len())));
        }
        let p = softmax(z);
        let mut s: Vec<Score> = p.iter().enumerate().map(|(i, &p)| Score { label: self.classes[i].clone(), index: i, probability: p, cosine: z[i] }).collect();
        s.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        s.truncate(top_k.max(1));
        Ok(s)
    }

    /// The raw logits of an attentional-pooler head (for golden tests).
    pub fn graph_logits(&self, f: &crate::model::ImageFeatures) -> Result<Vec<f32>> {
        let mut s = self.classify_features(f, self.classes.len())?;
        s.sort_by_key(|s| s.index);
        Ok(s.into_iter().map(|s| s.cosine).collect())
    }

    fn load_graph(&mut self, head_path: &Path) -> Result<()> {
        let bad = |m: String| Error::Labels { what: head_path.display().to_string(), message: m };
        let name = self.graph.clone().ok_or_else(|| bad("an attentional-pooler head names no graph".into()))?;
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(bad(format!("graph '{name}' must be a file next to the head file")));
        }
        let path = head_path.parent().unwrap_or(Path::new(".")).join(&name);
        let sha = crate::bundle::sha256_file(&path)?;
        if Some(sha.as_str()) != self.graph_sha256.as_deref() {
            return Err(bad(format!("{}: sha256 {sha} differs from the head file's", path.display())));
        }
        let (t, w) = (self.tokens.ok_or_else(|| bad("no token count".into()))?, self.dim);
        let plan = crate::model::OnnxGraph::load(&path, Some(&[&[1, t, w]]), &crate::model::EngineOptions::default())?;
        self.runner = GraphRunner(Some(std::sync::Arc::new(plan)));
        Ok(())
    }

    /// Logits for one embedding (linear and prototype heads).
    pub fn logits(&self, embedding: &[f32]) -> Result<Vec<f32>> {
        if self.kind == HeadKind::AttentionalPooler {
            return Err(Error::InvalidArgument("an attentional-pooler head reads frozen tokens, not the embedding: use classify_features".into()));
        }
        if embedding.len() != self.dim {
            return Err(Error::InvalidArgument(format!("head expects {}-dim embeddings, got {}", self.dim, embedding.len())));
        }
        Ok(self.weights.chunks_exact(self.dim).zip(&self.bias).map(|(w, b)| self.scale * crate::classify::dot(w, embedding) + b).collect())
    }

    /// Classes with probabilities, most probable first.
    pub fn classify(&self, embedding: &[f32], top_k: usize) -> Result<Vec<Score>> {
        let z = self.logits(embedding)?;
        let p = softmax(&z);
        // `cosine` holds the class score before the softmax: the cosine to the class mean for a
        // prototype head, the logit / scale for a linear one
        let mut s: Vec<Score> =
            p.iter().enumerate().map(|(i, &p)| Score { label: self.classes[i].clone(), index: i, probability: p, cosine: z[i] / self.scale }).collect();
        s.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        s.truncate(top_k.max(1));
        Ok(s)
    }

    /// Read a head file and check it belongs to the bundle `bundle_id`.
    pub fn load(path: &Path, bundle_id: &str) -> Result<Head> {
        let bad = |m: String| Error::Labels { what: path.display().to_string(), message: m };
        let bytes = crate::limits::read_capped(path, crate::limits::HEAD_BYTES, "the head file")?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not a head file (not UTF-8 text)".into()))?;
        let h: Head = serde_json::from_str(&text).map_err(|e| bad(format!("not a head file: {e}")))?;
        if h.format != HEAD_FORMAT {
            return Err(bad(format!("format '{}' is not {HEAD_FORMAT}", h.format)));
        }
        if h.version != HEAD_VERSION {
            return Err(bad(format!("head version {} (this build reads {HEAD_VERSION})", h.version)));
        }
        let mut h = h;
        let c = h.classes.len();
        // each class once, each named (a duplicate made two scores of one name)
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = h.classes.iter().find(|c| !seen.insert(c.as_str())) {
            return Err(bad(format!("class '{}' is listed twice", dup.chars().take(40).collect::<String>())));
        }
        if h.classes.iter().any(|c| c.trim().is_empty()) {
            return Err(bad("a class has no name".into()));
        }
        if h.kind == HeadKind::AttentionalPooler {
            if c < 2 || h.dim == 0 || h.images_per_class.len() != c {
                return Err(bad(format!("inconsistent sizes ({c} classes, dim {})", h.dim)));
            }
            if h.bundle_id != bundle_id {
                return Err(bad(format!("trained on bundle {} ({}), not on this one ({bundle_id}): train it again", h.bundle_id, h.bundle_name)));
            }
            h.load_graph(path)?;
            return Ok(h);
        }
        if c < 2 || h.dim == 0 || h.weights.len() != c * h.dim || h.bias.len() != c || h.images_per_class.len() != c {
            return Err(bad(format!("inconsistent sizes ({c} classes, dim {}, {} weights, {} biases)", h.dim, h.weights.len(), h.bias.len())));
        }
        if !h.weights.iter().chain(&h.bias).chain(std::iter::once(&h.scale)).all(|v| v.is_finite()) {
            return Err(bad("non-finite weights".into()));
        }
        // (a zero scale made every cosine 0/0: null scores with exit 0)
        if h.scale <= 0.0 {
            return Err(bad(format!("scale {} must be > 0", h.scale)));
        }
        if h.bundle_id != bundle_id {
            return Err(bad(format!(
                "trained on bundle {} ({}), not on this one ({bundle_id}): train it again with `coca head train`",
                h.bundle_id, h.bundle_name
            )));
        }
        Ok(h)
    }

    /// Write atomically (a temporary file renamed over `path`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

pub use crate::kernels::softmax;

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// None: linear when every class has 2 images or more, else prototype
    pub kind: Option<HeadKind>,
    /// most folds for cross-validation (fewer when a class has fewer images)
    pub folds: usize,
    /// L2 strengths tried by cross-validation (linear)
    pub l2_grid: Vec<f32>,
    /// the logit scale for prototype heads (the bundle's)
    pub logit_scale: f32,
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { kind: None, folds: 5, l2_grid: vec![1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4], logit_scale: 100.0, seed: 0 }
    }
}

/// What training found.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub kind: HeadKind,
    pub l2: Option<f32>,
    /// out-of-fold accuracy at the chosen L2 (None with fewer than 2 images in a class)
    pub cv_accuracy: Option<f32>,
    pub folds: usize,
    /// confusion[true][predicted], out of fold
    pub confusion: Vec<Vec<usize>>,
    /// (l2, cv accuracy) for every L2 tried
    pub cv_by_l2: Vec<(f32, f32)>,
}

/// Train a head on `x` (L2-normalised embeddings) with labels `y` in `0..classes.len()`.
pub fn train(classes: &[String], x: &[Vec<f32>], y: &[usize], opts: &TrainOptions) -> Result<(Head, TrainReport)> {
    let c = classes.len();
    if c < 2 {
        return Err(Error::InvalidArgument(format!("a head needs at least 2 classes, got {c}")));
    }
    if x.len() != y.len() || x.is_empty() {
        return Err(Error::InvalidArgument("no training images".into()));
    }
    let dim = x[0].len();
    if x.iter().any(|v| v.len() != dim) || y.iter().any(|&l| l >= c) {
        return Err(Error::InvalidArgument("embeddings of different sizes or labels out of range".into()));
    }
    let mut counts = vec![0usize; c];
    y.iter().for_each(|&l| counts[l] += 1);
    if let Some(i) = counts.iter().position(|&n| n == 0) {
        return Err(Error::InvalidArgument(format!("class '{}' has no images", classes[i])));
    }
    let min = *counts.iter().min().unwrap();
    if opts.kind == Some(HeadKind::AttentionalPooler) {
        return Err(Error::InvalidArgument("attentional-pooler heads are trained in PyTorch: models/train/train_ap_head.py".into()));
    }
    let kind = opts.kind.unwrap_or(if min >= 2 { HeadKind::Linear } else { HeadKind::Prototype });
    if kind == HeadKind::Linear && min < 2 {
        let i = counts.iter().position(|&n| n == min).unwrap();
        return Err(Error::InvalidArgument(format!(
            "class '{}' has {min} image: a linear probe needs at least 2 per class (use the prototype head for 1 shot)",
            classes[i]
        )));
    }
    let folds = opts.folds.min(min).max(1);
    let fold_of = stratified_folds(y, c, folds, opts.seed);
    let scale = (dim as f32).sqrt();
    // the scaled inputs, contiguous, in f64 (the optimiser's precision)
    let xs: Vec<f64> = x.iter().flat_map(|v| v.iter().map(|&a| a as f64 * scale as f64)).collect();
    let fit = |rows: &[usize], l2: f32, warm: Option<&[f32]>| -> Vec<f32> {
        match kind {
            HeadKind::Linear => fit_logistic(&xs, y, rows, c, dim, l2, warm),
            HeadKind::Prototype | HeadKind::AttentionalPooler => prototypes(x, y, rows, c, dim),
        }
    };
    let predict = |params: &[f32], v: &[f32]| -> usize {
        let (w, b) = params.split_at(c * dim);
        let s = if kind == HeadKind::Linear { scale } else { opts.logit_scale };
        (0..c).map(|k| s * crate::classify::dot(&w[k * dim..(k + 1) * dim], v) + b[k]).enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0
    };
    let grid: Vec<f32> = if kind == HeadKind::Linear { opts.l2_grid.clone() } else { vec![0.0] };
    let mut cv_by_l2 = Vec::new();
    let mut best: Option<(f32, f32, Vec<Vec<usize>>)> = None;
    if folds >= 2 {
        // folds in parallel (each walks the L2 grid from strong to weak, warm-started)
        let per_fold: Vec<Vec<Vec<usize>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..folds)
                .map(|f| {
                    let (fold_of, grid, fit, predict) = (&fold_of, &grid, &fit, &predict);
                    s.spawn(move || {
                        let train_rows: Vec<usize> = (0..y.len()).filter(|&i| fold_of[i] != f).collect();
                        let test_rows: Vec<usize> = (0..y.len()).filter(|&i| fold_of[i] == f).collect();
                        let mut warm: Option<Vec<f32>> = None;
                        grid.iter()
                            .map(|&l2| {
                                let p = fit(&train_rows, l2, warm.as_deref());
                                let preds = test_rows.iter().map(|&i| predict(&p, &x[i])).collect::<Vec<_>>();
                                warm = Some(p);
                                preds
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("fold thread")).collect()
        });
        for (g, &l2) in grid.iter().enumerate() {
            let mut confusion = vec![vec![0usize; c]; c];
            for (f, preds) in per_fold.iter().enumerate() {
                let test_rows = (0..y.len()).filter(|&i| fold_of[i] == f);
                for (i, &p) in test_rows.zip(&preds[g]) {
                    confusion[y[i]][p] += 1;
                }
            }
            let acc = (0..c).map(|k| confusion[k][k]).sum::<usize>() as f32 / y.len() as f32;
            cv_by_l2.push((l2, acc));
            // ties go to the stronger regularisation (earlier in the grid)
            if best.as_ref().map(|b| acc > b.1).unwrap_or(true) {
                best = Some((l2, acc, confusion));
            }
        }
    }
    let l2 = best.as_ref().map(|b| b.0).unwrap_or(1e-2);
    let all: Vec<usize> = (0..y.len()).collect();
    let params = fit(&all, l2, None);
    let (w, b) = params.split_at(c * dim);
    let head = Head {
        format: HEAD_FORMAT.into(),
        version: HEAD_VERSION,
        kind,
        bundle_id: String::new(),
        bundle_name: String::new(),
        classes: classes.to_vec(),
        dim,
        weights: w.to_vec(),
        bias: b.to_vec(),
        scale: if kind == HeadKind::Linear { scale } else { opts.logit_scale },
        l2: (kind == HeadKind::Linear).then_some(l2),
        cv_accuracy: best.as_ref().map(|b| b.1),
        images_per_class: counts,
        graph: None,
        graph_sha256: None,
        tokens: None,
        runner: GraphRunner::default(),
    };
    let report = TrainReport {
        kind,
        l2: head.l2,
        cv_accuracy: head.cv_accuracy,
        folds: if folds >= 2 { folds } else { 0 },
        confusion: best.map(|b| b.2).unwrap_or_default(),
        cv_by_l2: if kind == HeadKind::Linear { cv_by_l2 } else { Vec::new() },
    };
    Ok((head, report))
}

/// Fold index per sample: each class's samples shuffled (seeded) and dealt round-robin.
fn stratified_folds(y: &[usize], classes: usize, folds: usize, seed: u64) -> Vec<usize> {
    use rand_chacha::rand_core::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut fold_of = vec![0; y.len()];
    for k in 0..classes {
        let mut idx: Vec<usize> = (0..y.len()).filter(|&i| y[i] == k).collect();
        for i in (1..idx.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            idx.swap(i, j);
        }
        for (n, i) in idx.into_iter().enumerate() {
            fold_of[i] = n % folds;
        }
    }
    fold_of
}

fn prototypes(x: &[Vec<f32>], y: &[usize], rows: &[usize], c: usize, dim: usize) -> Vec<f32> {
    let mut p = vec![0f32; c * dim + c];
    for &i in rows {
        p[y[i] * dim..(y[i] + 1) * dim].iter_mut().zip(&x[i]).for_each(|(a, b)| *a += b);
    }
    for k in 0..c {
        let row = &mut p[k * dim..(k + 1) * dim];
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|v| *v /= n);
        }
    }
    p
}

/// Dot product with four accumulators (vectorises; the order is fixed, so results are
/// reproducible).
#[inline]
fn dot64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..4 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Mean cross-entropy + l2/2 |W|^2 and its gradient, for parameters [W (c x dim), b (c)] on the
/// scaled inputs `xs` (rows of `dim`).
#[allow(clippy::too_many_arguments)]
fn loss_grad(params: &[f64], xs: &[f64], y: &[usize], rows: &[usize], c: usize, dim: usize, l2: f64, grad: &mut [f64]) -> f64 {
    grad.iter_mut().for_each(|g| *g = 0.0);
    let (w, b) = params.split_at(c * dim);
    let mut loss = 0.0;
    let mut z = vec![0f64; c];
    for &i in rows {
        let xi = &xs[i * dim..(i + 1) * dim];
        for k in 0..c {
            z[k] = dot64(&w[k * dim..(k + 1) * dim], xi) + b[k];
        }
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
        loss += m + sum.ln() - z[y[i]];
        for k in 0..c {
            let d = (z[k] - m).exp() / sum - if k == y[i] { 1.0 } else { 0.0 };
            grad[k * dim..(k + 1) * dim].iter_mut().zip(xi).for_each(|(g, v)| *g += d * v);
            grad[c * dim + k] += d;
        }
    }
    let n = rows.len() as f64;
    loss /= n;
    grad.iter_mut().for_each(|g| *g /= n);
    for (g, wv) in grad[..c * dim].iter_mut().zip(w) {
        *g += l2 * wv;
    }
    loss + 0.5 * l2 * dot64(w, w)
}

/// L-BFGS (memory 10) with a backtracking Armijo line search.
#[allow(clippy::too_many_arguments)]
fn fit_logistic(xs: &[f64], y: &[usize], rows: &[usize], c: usize, dim: usize, l2: f32, warm: Option<&[f32]>) -> Vec<f32> {
    let n = c * dim + c;
    let l2 = l2 as f64;
    let mut p: Vec<f64> = warm.map(|w| w.iter().map(|&v| v as f64).collect()).unwrap_or_else(|| vec![0.0; n]);
    let mut g = vec![0.0; n];
    let mut f = loss_grad(&p, xs, y, rows, c, dim, l2, &mut g);
    let (mut ss, mut ys): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (Vec::new(), Vec::new());
    let dotp = dot64;
    let mut g_new = vec![0.0; n];
    for _ in 0..200 {
        let gnorm = dotp(&g, &g).sqrt();
        if gnorm < 1e-5 {
            break;
        }
        // two-loop recursion: d = -H g
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(ss.len());
        for (s, yv) in ss.iter().zip(&ys).rev() {
            let rho = 1.0 / dotp(yv, s);
            let a = rho * dotp(s, &q);
            q.iter_mut().zip(yv).for_each(|(q, y)| *q -= a * y);
            alphas.push((a, rho));
        }
        if let (Some(s), Some(yv)) = (ss.last(), ys.last()) {
            let gamma = dotp(s, yv) / dotp(yv, yv);
            q.iter_mut().for_each(|v| *v *= gamma);
        } else {
            q.iter_mut().for_each(|v| *v /= gnorm.max(1.0));
        }
        for ((s, yv), (a, rho)) in ss.iter().zip(&ys).zip(alphas.into_iter().rev()) {
            let b = rho * dotp(yv, &q);
            q.iter_mut().zip(s).for_each(|(q, s)| *q += (a - b) * s);
        }
        let mut d: Vec<f64> = q.into_iter().map(|v| -v).collect();
        let mut slope = dotp(&g, &d);
        if slope >= 0.0 {
            // not a descent direction: restart from steepest descent
            ss.clear();
            ys.clear();
            d = g.iter().map(|v| -v / gnorm.max(1.0)).collect();
            slope = dotp(&g, &d);
        }
        let mut t = 1.0;
        let mut p_new = vec![0.0; n];
        let mut f_new;
        loop {
            p_new.iter_mut().zip(&p).zip(&d).for_each(|((pn, p), d)| *pn = p + t * d);
            f_new = loss_grad(&p_new, xs, y, rows, c, dim, l2, &mut g_new);
            if f_new <= f + 1e-4 * t * slope || t < 1e-10 {
                break;
            }
            t *= 0.5;
        }
        let s: Vec<f64> = p_new.iter().zip(&p).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let improvement = f - f_new;
        if dotp(&s, &yv) > 1e-12 {
            ss.push(s);
            ys.push(yv);
            if ss.len() > 10 {
                ss.remove(0);
                ys.remove(0);
            }
        }
        std::mem::swap(&mut p, &mut p_new);
        std::mem::swap(&mut g, &mut g_new);
        f = f_new;
        if improvement.abs() < 1e-8 * f.abs().max(1.0) {
            break;
        }
    }
    p.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three separable clusters on the unit sphere in 8 dims.
    fn clusters(per: usize) -> (Vec<String>, Vec<Vec<f32>>, Vec<usize>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for k in 0..3 {
            for i in 0..per {
                let mut v: Vec<f32> = (0..8).map(|d| ((d * 7 + i * 13 + k) % 11) as f32 * 0.03).collect();
                v[k] += 1.0;
                let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
                x.push(v.into_iter().map(|a| a / n).collect());
                y.push(k);
            }
        }
        (vec!["a".into(), "b".into(), "c".into()], x, y)
    }

    #[test]
    fn the_probe_separates_clusters_and_reports_cv() {
        let (classes, x, y) = clusters(6);
        let (head, report) = train(&classes, &x, &y, &TrainOptions::default()).unwrap();
        assert_eq!(report.kind, HeadKind::Linear);
        assert_eq!(report.cv_accuracy, Some(1.0));
        assert_eq!(report.folds, 5);
        assert_eq!(report.confusion.iter().flatten().sum::<usize>(), 18);
        for (v, &l) in x.iter().zip(&y) {
            assert_eq!(head.classify(v, 1).unwrap()[0].index, l);
        }
        let p: f32 = head.classify(&x[0], 3).unwrap().iter().map(|s| s.probability).sum();
        assert!((p - 1.0).abs() < 1e-5);
    }

    #[test]
    fn one_shot_gives_a_prototype_head_and_linear_is_refused() {
        let (classes, x, y) = clusters(1);
        let (head, report) = train(&classes, &x, &y, &TrainOptions::default()).unwrap();
        assert_eq!((head.kind, report.cv_accuracy), (HeadKind::Prototype, None));
        assert_eq!(head.classify(&x[2], 1).unwrap()[0].label, "c");
        let e = train(&classes, &x, &y, &TrainOptions { kind: Some(HeadKind::Linear), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("class 'a' has 1 image"), "{e}");
        let e = train(&classes[..1], &x[..1], &y[..1], &TrainOptions::default()).unwrap_err().to_string();
        assert!(e.contains("at least 2 classes"), "{e}");
    }

    #[test]
    fn head_files_round_trip_and_refuse_other_bundles_and_damage() {
        let (classes, x, y) = clusters(4);
        let (mut head, _) = train(&classes, &x, &y, &TrainOptions::default()).unwrap();
        head.bundle_id = "abc".into();
        head.bundle_name = "test".into();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("head.json");
        head.save(&p).unwrap();
        assert_eq!(Head::load(&p, "abc").unwrap(), head);
        let e = Head::load(&p, "xyz").unwrap_err().to_string();
        assert!(e.contains("trained on bundle abc") && e.contains("head.json"), "{e}");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, &text[..text.len() / 2]).unwrap();
        let e = Head::load(&p, "abc").unwrap_err().to_string();
        assert!(e.contains("not a head file"), "{e}");
        std::fs::write(&p, text.replace("\"dim\":8", "\"dim\":9")).unwrap();
        assert!(Head::load(&p, "abc").unwrap_err().to_string().contains("inconsistent sizes"));
        // a zero scale and a duplicated class loaded before and gave null scores or two
        // scores of one name with exit 0 (hardening finding 15)
        let mut zero = head.clone();
        zero.scale = 0.0;
        zero.save(&p).unwrap();
        let e = Head::load(&p, "abc").unwrap_err().to_string();
        assert!(e.contains("scale 0 must be > 0"), "{e}");
        let mut dup = head.clone();
        dup.classes[2] = dup.classes[0].clone();
        dup.save(&p).unwrap();
        let e = Head::load(&p, "abc").unwrap_err().to_string();
        assert!(e.contains("class 'a' is listed twice"), "{e}");
    }
}
