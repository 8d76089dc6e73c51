//! `Pipeline`: one bundle, loaded once; frame -> preprocess -> image encoder -> labels.
//! The CLI, the Rust API and (later) the C ABI all go through it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::bundle::Bundle;
use crate::caption::{self, Caption, CaptionOptions, DecoderRun, Search, Specials};
use crate::classify::{LabelCache, LabelSet, Score, Templates};
use crate::error::{Error, Result};
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
    pub fn load_head(&self, path: &Path) -> Result<crate::head::Head> {
        let h = crate::head::Head::load(path, self.bundle.id())?;
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
    pub fn classify_head(&self, features: &ImageFeatures, head: &crate::head::Head, top_k: usize) -> Result<Vec<Score>> {
        head.classify_features(features, top_k)
    }

    /// Train a head on labelled images (`ds`), embeddings cached; stamps it with this bundle.
    pub fn train_head(
        &self,
        ds: &crate::head::data::Dataset,
        opts: &crate::head::TrainOptions,
        progress: impl FnMut(usize, usize),
    ) -> Result<(crate::head::Head, crate::head::TrainReport, crate::head::data::Embedded)> {
        let emb = crate::head::data::embed_dataset(self, ds, progress)?;
        let opts = crate::head::TrainOptions { logit_scale: self.bundle.manifest().logit_scale, ..opts.clone() };
        let (mut head, report) = crate::head::train(&ds.classes, &emb.x, &emb.y, &opts)?;
        head.bundle_id = self.bundle.id().to_string();
        head.bundle_name = self.bundle.manifest().name.clone();
        Ok((head, report, emb))
    }
}
