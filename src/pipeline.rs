//! `Pipeline`: one bundle, loaded once; frame -> preprocess -> image encoder -> labels.
//! The CLI, the stream loop, the Rust API and the C ABI all go through it: one frame is one
//! [`Pipeline::process`] call ([`FrameRequest`] in, [`FrameResult`] out).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use crate::bundle::Bundle;
use crate::caption::{self, Caption, CaptionOptions, DecoderRun, Search, Specials};
use crate::classify::{LabelCache, LabelSet, Score, Templates};
use crate::error::{Error, Result};
use crate::head::data::{Dataset, Embedded, EmbeddingCache};
use crate::head::{Head, TrainOptions, TrainReport};
use crate::model::{Decoder, EngineOptions, ImageEncoder, ImageFeatures, TextEncoder};
use crate::text::{Clean, Tokenizer};
use crate::vision::{self, DecodeLimits, DecodedImage};

/// Everything that decides how a pipeline loads and runs.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    pub engine: EngineOptions,
    pub limits: DecodeLimits,
    /// Where label embeddings are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
}

impl PipelineOptions {
    /// Defaults with the user's cache folder.
    pub fn with_default_cache() -> Self {
        PipelineOptions { cache_dir: LabelCache::default_dir(), ..Default::default() }
    }
}

/// What [`Pipeline::process`] reads: a decoded image, or a CHW tensor already preprocessed
/// for the encoder (`3 x size x size`, normalised).
#[derive(Debug, Clone, Copy)]
pub enum FrameInput<'a> {
    Image(&'a DecodedImage),
    Preprocessed(&'a [f32]),
}

impl<'a> From<&'a DecodedImage> for FrameInput<'a> {
    fn from(img: &'a DecodedImage) -> Self {
        FrameInput::Image(img)
    }
}

impl<'a> From<&'a [f32]> for FrameInput<'a> {
    fn from(chw: &'a [f32]) -> Self {
        FrameInput::Preprocessed(chw)
    }
}

/// What to do with one frame beyond the encoder pass (which always runs). The default asks
/// for nothing more: the features alone.
#[derive(Clone, Copy, Default)]
pub struct FrameRequest<'a> {
    /// zero-shot labels to score
    pub labels: Option<&'a LabelSet>,
    /// how many labels (and head classes) to keep, best first
    pub top_k: usize,
    /// a trained head to run beside the labels
    pub head: Option<&'a Head>,
    /// caption the frame with these options
    pub caption: Option<&'a CaptionOptions>,
    /// with `caption`: caption only when this says so for the frame's features (a decision
    /// that needs the embedding, e.g. "has the scene changed"); `None` = always
    pub caption_if: Option<&'a dyn Fn(&ImageFeatures) -> bool>,
}

impl std::fmt::Debug for FrameRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameRequest")
            .field("labels", &self.labels.map(|l| l.labels().len()))
            .field("top_k", &self.top_k)
            .field("head", &self.head.map(|h| &h.classes))
            .field("caption", &self.caption)
            .field("caption_if", &self.caption_if.is_some())
            .finish()
    }
}

/// Milliseconds per stage of one [`Pipeline::process`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    /// resize, crop and normalise (0 for a preprocessed input)
    pub preprocess_ms: f64,
    pub encoder_ms: f64,
    /// zero-shot labels and head together
    pub classify_ms: f64,
    /// `None` when no caption was made
    pub caption_ms: Option<f64>,
}

/// The output of one frame.
#[derive(Debug, Clone)]
pub struct FrameResult {
    /// the encoder pass: embedding and captioning tokens (a later [`Pipeline::caption`] of
    /// these needs no second pass)
    pub features: ImageFeatures,
    /// zero-shot scores, best first (`None` when no labels were asked for)
    pub scores: Option<Vec<Score>>,
    /// the head's scores, best first (`None` when no head was asked for)
    pub head_scores: Option<Vec<Score>>,
    pub caption: Option<Caption>,
    pub timings: StageTimings,
}

pub struct Pipeline {
    bundle: Bundle,
    opts: PipelineOptions,
    image: ImageEncoder,
    /// loaded on first use: a robot with cached labels never pays for it
    text: OnceLock<TextEncoder>,
    /// loaded on first caption
    decoder: OnceLock<Decoder>,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("bundle", &self.bundle.dir()).finish()
    }
}

impl Pipeline {
    /// Open and check the bundle at `dir`, load its tokenizer and image encoder.
    pub fn open(dir: impl AsRef<Path>, opts: PipelineOptions) -> Result<Pipeline> {
        let bundle = Bundle::open(dir)?.with_digest_cache(opts.cache_dir.clone());
        let m = bundle.manifest();
        let vocab = bundle.verified_path(&m.text.vocab)?;
        let clean: Clean = m
            .text
            .clean
            .parse()
            .map_err(|e: Error| Error::Manifest { path: bundle.dir().join(crate::bundle::MANIFEST), message: format!("text.clean: {e}") })?;
        let mut tokenizer = Tokenizer::from_gz_file(&vocab)?.with_clean(clean);
        if let Some(map) = &m.text.vocab_map {
            tokenizer = tokenizer
                .with_vocab_map(map.clone())
                .map_err(|message| Error::Manifest { path: bundle.dir().join(crate::bundle::MANIFEST), message: format!("text.vocab_map: {message}") })?;
        }
        if tokenizer.vocab_size() != m.text.vocab_size || tokenizer.sot() != m.text.sot || tokenizer.eot() != m.text.eot {
            return Err(Error::Vocab {
                what: vocab.display().to_string(),
                message: format!(
                    "vocab has {} tokens (sot {}, eot {}), manifest says {} (sot {}, eot {})",
                    tokenizer.vocab_size(),
                    tokenizer.sot(),
                    tokenizer.eot(),
                    m.text.vocab_size,
                    m.text.sot,
                    m.text.eot
                ),
            });
        }
        if m.image.interpolation != "bicubic" || m.image.resize_mode != "shortest" {
            return Err(Error::Manifest {
                path: bundle.dir().join(crate::bundle::MANIFEST),
                message: format!("preprocessing '{}' / '{}' is not supported (bicubic / shortest is)", m.image.interpolation, m.image.resize_mode),
            });
        }
        let image = ImageEncoder::load(&bundle, &opts.engine)?;
        Ok(Pipeline { bundle, opts, image, text: OnceLock::new(), decoder: OnceLock::new(), tokenizer })
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }
    pub fn options(&self) -> &PipelineOptions {
        &self.opts
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn image_encoder(&self) -> &ImageEncoder {
        &self.image
    }

    /// The text encoder, loaded on first use.
    pub fn text_encoder(&self) -> Result<&TextEncoder> {
        if let Some(t) = self.text.get() {
            return Ok(t);
        }
        let t = TextEncoder::load(&self.bundle, &self.opts.engine)?;
        Ok(self.text.get_or_init(|| t))
    }

    /// Preprocess a decoded image into the encoder's CHW input.
    pub fn preprocess(&self, img: &DecodedImage) -> Vec<f32> {
        let p = &self.bundle.manifest().image;
        vision::preprocess(img, p.size, p.mean, p.std)
    }

    /// Decode (with the pipeline's limits) and encode an image file.
    pub fn embed_path(&self, path: &Path) -> Result<ImageFeatures> {
        let img = vision::load_image(path, &self.opts.limits)?;
        self.embed_image(&img)
    }

    /// Encode a decoded image.
    pub fn embed_image(&self, img: &DecodedImage) -> Result<ImageFeatures> {
        self.image.run(&self.preprocess(img))
    }

    /// Encode an already preprocessed CHW tensor.
    pub fn embed_preprocessed(&self, chw: &[f32]) -> Result<ImageFeatures> {
        self.image.run(chw)
    }

    /// The prompt templates of the bundle (`classify.templates` in its manifest), or open_clip's
    /// ImageNet templates for bundles that name none.
    pub fn default_templates(&self) -> Result<Templates> {
        match self.bundle.manifest().classify.as_ref().and_then(|c| c.templates.as_ref()) {
            Some(t) => Templates::parse(&t.join("\n"), &format!("{} classify.templates", crate::bundle::MANIFEST)),
            None => Ok(Templates::openai_imagenet()),
        }
    }

    /// The caption options to use when the caller gives none: open_clip's generate() defaults
    /// (beam search), or greedy search for a model whose manifest asks for it (`caption.search`:
    /// a model trained on several phrasings, where beam search favours the generic ones).
    pub fn default_caption_options(&self) -> CaptionOptions {
        let mut o = CaptionOptions::default();
        if self.bundle.manifest().caption.as_ref().and_then(|c| c.search.as_deref()) == Some("greedy") {
            o.search = crate::caption::Search::Greedy;
        }
        o
    }

    /// An error naming the words of `text` that the model's restricted vocabulary cannot
    /// spell (`what` names the text); Ok for bundles with the full BPE vocabulary.
    pub fn check_vocabulary(&self, text: &str, what: &str) -> Result<()> {
        let unknown = self.tokenizer.unknown_words(text);
        if unknown.is_empty() {
            return Ok(());
        }
        // the pad id is in the vocabulary map but is no word
        let pad = self.tokenizer.decode(&[self.bundle.manifest().text.pad]).trim().to_string();
        let known: Vec<String> = self.tokenizer.known_words().unwrap_or_default().into_iter().filter(|w| *w != pad).collect();
        Err(Error::Labels {
            what: what.to_string(),
            message: format!(
                "'{}' is not in the vocabulary of model '{}', which knows only these words and word pieces: {}",
                unknown.join("', '"),
                self.bundle.manifest().name,
                known.join(" ")
            ),
        })
    }

    /// Token ids for `texts`, `texts.len() x context_length`.
    pub fn tokenize(&self, texts: &[String]) -> Vec<i64> {
        let ctx = self.bundle.manifest().text.context_length;
        self.tokenizer.tokenize_batch(texts, ctx)
    }

    /// L2-normalised text embeddings, one `embed_dim` vector per text.
    pub fn embed_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let d = self.bundle.manifest().dims.embed_dim;
        for t in texts {
            self.check_vocabulary(t, &format!("text '{t}'"))?;
        }
        let flat = self.text_encoder()?.run(&self.tokenize(texts), |_, _| {})?;
        Ok(flat.chunks(d).map(|c| c.to_vec()).collect())
    }

    /// Label embeddings for zero-shot classification (from the cache when present).
    /// `progress(done, total)` is called as prompts are encoded.
    pub fn label_set(&self, labels: &[String], templates: &Templates, mut progress: impl FnMut(usize, usize)) -> Result<LabelSet> {
        let d = self.bundle.manifest().dims.embed_dim;
        if self.tokenizer.is_restricted() {
            for l in labels {
                self.check_vocabulary(l, &format!("label '{l}'"))?;
            }
            for (j, t) in templates.as_slice().iter().enumerate() {
                for l in labels {
                    self.check_vocabulary(&templates.fill(j, l), &format!("template '{t}' (with label '{l}')"))?;
                }
            }
        }
        let cache = self.opts.cache_dir.as_ref().map(LabelCache::new);
        let key = LabelCache::key(self.bundle.id(), &self.bundle.precision_key(&self.opts.engine.precision), labels, templates);
        if let Some(set) = cache.as_ref().and_then(|c| c.get(self.bundle.id(), &key, labels, d)) {
            return Ok(set);
        }
        let nt = templates.as_slice().len();
        let prompts: Vec<String> = labels.iter().flat_map(|l| (0..nt).map(move |j| templates.fill(j, l))).collect();
        let emb = self.text_encoder()?.run(&self.tokenize(&prompts), &mut progress)?;
        let set = LabelSet::from_prompt_embeddings(labels.to_vec(), nt, d, &emb)?;
        if let Some(c) = cache {
            c.put(self.bundle.id(), &key, &set);
        }
        Ok(set)
    }

    /// Top-k labels for an image's features.
    pub fn classify(&self, features: &ImageFeatures, labels: &LabelSet, top_k: usize) -> Result<Vec<Score>> {
        labels.classify(&features.embedding, self.bundle.manifest().logit_scale, top_k)
    }

    /// One frame: preprocess (unless the input is preprocessed), one encoder pass, then what
    /// `req` asks for from those features (labels, head, caption), timed per stage.
    pub fn process<'i>(&self, input: impl Into<FrameInput<'i>>, req: &FrameRequest) -> Result<FrameResult> {
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let preprocessed;
        let chw = match input.into() {
            FrameInput::Image(img) => {
                preprocessed = self.preprocess(img);
                &preprocessed[..]
            }
            FrameInput::Preprocessed(chw) => chw,
        };
        let t1 = Instant::now();
        let features = self.embed_preprocessed(chw)?;
        let t2 = Instant::now();
        let scores = req.labels.map(|set| self.classify(&features, set, req.top_k)).transpose()?;
        let head_scores = req.head.map(|h| self.classify_head(&features, h, req.top_k)).transpose()?;
        let t3 = Instant::now();
        let caption = match req.caption {
            Some(opts) if req.caption_if.is_none_or(|due| due(&features)) => Some(self.caption(&features, opts, |_, _| {})?),
            _ => None,
        };
        let t4 = Instant::now();
        let timings =
            StageTimings { preprocess_ms: ms(t0, t1), encoder_ms: ms(t1, t2), classify_ms: ms(t2, t3), caption_ms: caption.as_ref().map(|_| ms(t3, t4)) };
        Ok(FrameResult { features, scores, head_scores, caption, timings })
    }
}

impl Pipeline {
    /// The captioning decoder, loaded on first use (an error if the bundle has none).
    pub fn decoder(&self) -> Result<&Decoder> {
        if let Some(d) = self.decoder.get() {
            return Ok(d);
        }
        let d = Decoder::load(&self.bundle, &self.opts.engine)?;
        Ok(self.decoder.get_or_init(|| d))
    }

    /// Caption an image from its features (the same encoder pass that gives the embedding).
    /// `on_token(id, text_so_far)` sees every chosen token of greedy and sampling search
    /// (beam search knows its caption only at the end).
    pub fn caption(&self, features: &ImageFeatures, opts: &CaptionOptions, mut on_token: impl FnMut(u32, &str)) -> Result<Caption> {
        let decoder = self.decoder()?;
        let opts = &opts.fitted(decoder.dims().max_positions)?;
        let m = self.bundle.manifest();
        let sp = Specials { sot: m.text.sot, eot: m.text.eot, pad: m.text.pad, legacy_pad_mask: m.text.pad_mask == "legacy" };
        let cross = decoder.cross_kv(&features.tokens)?;
        let (ids, score) = match opts.search {
            Search::Beam { beams, groups } => {
                let mut run = DecoderRun { decoder, cache: decoder.empty_cache(beams), cross };
                caption::beam_search(&mut run, beams, groups, opts, &sp)?
            }
            _ => {
                let mut run = DecoderRun { decoder, cache: decoder.empty_cache(1), cross };
                let mut so_far: Vec<u32> = Vec::new();
                caption::sample_search(&mut run, opts, &sp, |t| {
                    so_far.push(t);
                    let text = self.caption_text(&so_far, &sp);
                    on_token(t, &text);
                })?
            }
        };
        let text = self.caption_text(&ids, &sp);
        Ok(Caption { text, ids, score })
    }

    /// open_clip's caption text: decode without SOT, EOT and padding, trimmed.
    fn caption_text(&self, ids: &[u32], sp: &Specials) -> String {
        let body: Vec<u32> = ids.iter().copied().skip_while(|&t| t == sp.sot).take_while(|&t| t != sp.eot).collect();
        self.tokenizer.decode(&body).trim().to_string()
    }

    /// Load a head trained on this bundle's embeddings (`coca head train`); a head trained on
    /// another bundle is refused.
    pub fn load_head(&self, path: &Path) -> Result<Head> {
        let h = Head::load(path, self.bundle.id())?;
        if h.kind == crate::head::HeadKind::AttentionalPooler {
            let want = self.bundle.manifest().dims.frozen_tokens;
            if want != Some([h.tokens.unwrap_or(0), h.dim]) {
                return Err(Error::Labels {
                    what: path.display().to_string(),
                    message: format!("head reads {:?}x{} frozen tokens, the model offers {want:?}", h.tokens, h.dim),
                });
            }
            return Ok(h);
        }
        if h.dim != self.bundle.manifest().dims.embed_dim {
            return Err(Error::Labels {
                what: path.display().to_string(),
                message: format!("head is for {}-dim embeddings, the model has {}", h.dim, self.bundle.manifest().dims.embed_dim),
            });
        }
        Ok(h)
    }

    /// A head's classes for one encoder pass (side by side with [`Pipeline::classify`]).
    pub fn classify_head(&self, features: &ImageFeatures, head: &Head, top_k: usize) -> Result<Vec<Score>> {
        head.classify_features(features, top_k)
    }

    /// Embed every image of `ds`, cached by content when the pipeline has a cache folder
    /// ([`EmbeddingCache`]); unreadable or undecodable images are skipped and counted.
    /// `progress(done, total)` after each image.
    pub fn embed_dataset(&self, ds: &Dataset, mut progress: impl FnMut(usize, usize)) -> Result<Embedded> {
        let dim = self.bundle.manifest().dims.embed_dim;
        let cache =
            self.opts.cache_dir.as_ref().map(|d| EmbeddingCache::new(d, self.bundle.id(), &self.bundle.precision_key(&self.opts.engine.precision), dim));
        let mut out = Embedded::new();
        for (n, (path, k)) in ds.items.iter().enumerate() {
            progress(n, ds.items.len());
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    out.skipped.push((path.clone(), e.to_string()));
                    continue;
                }
            };
            let key = EmbeddingCache::key(&bytes);
            let emb = match cache.as_ref().and_then(|c| c.get(&key)) {
                Some(emb) => {
                    out.cached += 1;
                    emb
                }
                None => {
                    let img = match vision::decode_image(&bytes, &path.display().to_string(), &self.opts.limits) {
                        Ok(i) => i,
                        Err(e) => {
                            out.skipped.push((path.clone(), e.to_string()));
                            continue;
                        }
                    };
                    let emb = self.process(&img, &FrameRequest::default())?.features.embedding;
                    if let Some(c) = &cache {
                        c.put(&key, &emb);
                    }
                    emb
                }
            };
            out.x.push(emb);
            out.y.push(*k);
        }
        progress(ds.items.len(), ds.items.len());
        out.check_every_class(ds)?;
        Ok(out)
    }

    /// Train a head on labelled images (`ds`), embeddings cached; stamps it with this bundle.
    pub fn train_head(&self, ds: &Dataset, opts: &TrainOptions, progress: impl FnMut(usize, usize)) -> Result<(Head, TrainReport, Embedded)> {
        let emb = self.embed_dataset(ds, progress)?;
        let opts = TrainOptions { logit_scale: self.bundle.manifest().logit_scale, ..opts.clone() };
        let (mut head, report) = crate::head::train(&ds.classes, &emb.x, &emb.y, &opts)?;
        head.bundle_id = self.bundle.id().to_string();
        head.bundle_name = self.bundle.manifest().name.clone();
        Ok((head, report, emb))
    }
}
