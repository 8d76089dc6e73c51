//! Captioning: greedy, beam and sampling search over the KV-cached decoder, with open_clip
//! 3.3.0's `CoCa.generate()` semantics (which builds on transformers 4.56's `BeamSearchScorer`
//! and logits processors), so the token ids are open_clip's.
//!
//! What open_clip does, and so what we do:
//! - Every sequence starts with SOT; `max_tokens` is open_clip's `seq_len` (SOT included) and
//!   `min_tokens` its `min_seq_len`: EOT's logit is -inf while the sequence is shorter.
//! - Greedy (`generation_type="top_k"`, `top_k=1`): argmax of the processed logits; the last
//!   allowed position is forced to EOT; generation stops after EOT **or after the pad id 0**
//!   (the BPE token "!"), which open_clip treats as finished.
//! - Beam search: beam scores are sums of *processed logits* (not log-probabilities); beams are
//!   split into groups searched one after the other with no diversity penalty; the first beam of
//!   each group starts at 0 and the others at -1e9; a hypothesis ending in EOT is scored
//!   `sum / (len + 1)` (its tokens with SOT, plus the EOT), an unfinished one at the end
//!   `sum / len`; a group is done when it holds `beams / groups` hypotheses and none of the
//!   current candidates can beat its worst (`length_penalty` 1, no early stopping).
//! - Sampling: processed logits -> top-k or top-p filter -> softmax(logits / temperature) ->
//!   one draw, from a seeded ChaCha8 generator (same seed, same caption; not torch's stream).
//! - The unimodal text tower's legacy pad mask: a generated pad id 0 masks the next key
//!   position in later steps, exactly as open_clip's full recompute does.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{CrossKv, Decoder, KvCache};

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Search {
    /// argmax at every step (open_clip `generation_type="top_k"`, `top_k=1`)
    Greedy,
    /// group beam search (open_clip's default: 6 beams in 3 groups)
    Beam { beams: usize, groups: usize },
    /// sample from the `k` most likely tokens
    TopK { k: usize },
    /// sample from the smallest set of tokens whose probability reaches `p`
    TopP { p: f32 },
}

/// Caption settings; the defaults are open_clip `generate()`'s.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionOptions {
    pub search: Search,
    /// open_clip's `seq_len`: longest sequence, start token included (default 30)
    pub max_tokens: usize,
    /// open_clip's `min_seq_len`: EOT is forbidden before this length (default 5)
    pub min_tokens: usize,
    /// sampling temperature (sampling only)
    pub temperature: f32,
    /// transformers' repetition penalty (1.0 = none)
    pub repetition_penalty: f32,
    /// seed of the sampling generator
    pub seed: u64,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        CaptionOptions { search: Search::Beam { beams: 6, groups: 3 }, max_tokens: 30, min_tokens: 5, temperature: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

/// Largest beam count accepted.
pub const MAX_BEAMS: usize = 64;

impl CaptionOptions {
    /// The options for a decoder of `max_positions` positions: `max_tokens` above it stops at
    /// the decoder's last position (open_clip's `generate()` would index past its positional
    /// embedding and fail; a model with a short context, like the shipped default whose
    /// decoder holds 17 positions, still captions with the default 30).
    pub fn fitted(&self, max_positions: usize) -> Result<CaptionOptions> {
        self.validate(max_positions)?;
        Ok(CaptionOptions { max_tokens: self.max_tokens.min(max_positions), ..self.clone() })
    }

    /// Check the options against the decoder (`max_positions`) and open_clip's rules.
    pub fn validate(&self, max_positions: usize) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.max_tokens < 2 {
            return bad(format!("max tokens {} is too small: the sequence holds the start token and at least one more", self.max_tokens));
        }
        let max_tokens = self.max_tokens.min(max_positions);
        if self.min_tokens >= max_tokens {
            let held = if max_tokens < self.max_tokens { format!(" (the decoder holds {max_positions} positions)") } else { String::new() };
            return bad(format!("min tokens {} must be less than max tokens {max_tokens}{held} (open_clip asserts seq_len > min_seq_len)", self.min_tokens));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition penalty {} must be > 0", self.repetition_penalty));
        }
        match self.search {
            Search::Greedy => {}
            Search::Beam { beams, groups } => {
                if beams == 0 || beams > MAX_BEAMS {
                    return bad(format!("{beams} beams: use 1..={MAX_BEAMS}"));
                }
                if groups == 0 || groups > beams || beams % groups != 0 {
                    return bad(format!("{groups} beam groups must divide {beams} beams"));
                }
            }
            Search::TopK { k } => {
                if k == 0 {
                    return bad("top-k needs k >= 1".into());
                }
            }
            Search::TopP { p } => {
                if !(p > 0.0 && p <= 1.0) {
                    return bad(format!("top-p {p} must be in (0, 1]"));
                }
            }
        }
        if matches!(self.search, Search::TopK { .. } | Search::TopP { .. }) && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!("temperature {} must be > 0", self.temperature));
        }
        Ok(())
    }
}

/// A finished caption.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Caption {
    /// the text: open_clip's `decode` of the ids without SOT, EOT and padding, trimmed
    pub text: String,
    /// the sequence as open_clip's `generate()` returns it: SOT first, EOT last when it ended
    pub ids: Vec<u32>,
    /// beam search: the hypothesis score (sum of processed logits / length); greedy and
    /// sampling: the sum of the chosen tokens' processed logits
    pub score: f32,
}

/// Special token ids the search needs.
#[derive(Debug, Clone, Copy)]
pub struct Specials {
    pub sot: u32,
    pub eot: u32,
    pub pad: u32,
    /// apply open_clip's legacy pad mask in the unimodal tower
    pub legacy_pad_mask: bool,
}

/// One decoding run: what the search asks of the model. Implemented over [`Decoder`]; tests
/// implement it with fixed logits.
pub trait Stepper {
    /// Feed one new token per sequence; `key_mask` has `past + 1` values per sequence.
    /// Returns `batch x vocab` logits.
    fn step(&mut self, new_ids: &[i64], key_mask: &[f32]) -> Result<Vec<f32>>;
    /// New sequence `i` continues old sequence `order[i]`.
    fn reorder(&mut self, order: &[usize]) -> Result<()>;
    fn vocab(&self) -> usize;
}

/// [`Stepper`] over the real decoder.
pub struct DecoderRun<'a> {
    pub decoder: &'a Decoder,
    pub cache: KvCache,
    pub cross: CrossKv,
}

impl Stepper for DecoderRun<'_> {
    fn step(&mut self, new_ids: &[i64], key_mask: &[f32]) -> Result<Vec<f32>> {
        let b = self.cache.batch();
        // beams that all start from the same prompt: run it once and repeat the result
        if b > 1 && self.cache.past() == 0 && new_ids.iter().all(|&t| t == new_ids[0]) {
            let mut one = self.decoder.empty_cache(1);
            let logits = self.decoder.step(&mut one, &new_ids[..1], 1, &key_mask[..1], &self.cross)?;
            self.decoder.tile(&mut one, b)?;
            self.cache = one;
            return Ok(logits.repeat(b));
        }
        self.decoder.step(&mut self.cache, new_ids, 1, key_mask, &self.cross)
    }
    fn reorder(&mut self, order: &[usize]) -> Result<()> {
        self.decoder.reorder(&mut self.cache, order)
    }
    fn vocab(&self) -> usize {
        self.decoder.dims().vocab_size
    }
}

/// Additive key mask of one sequence over all its positions (open_clip's legacy CoCa pad
/// mask: key `j` is masked when token `j - 1` is the pad id).
fn key_mask_row(ids: &[u32], sp: &Specials, out: &mut Vec<f32>) {
    for j in 0..ids.len() {
        let masked = sp.legacy_pad_mask && j > 0 && ids[j - 1] == sp.pad;
        out.push(if masked { f32::NEG_INFINITY } else { 0.0 });
    }
}

/// transformers' MinLength + RepetitionPenalty processors, in place, for one sequence.
fn process_logits(logits: &mut [f32], ids: &[u32], opts: &CaptionOptions, sp: &Specials) {
    if opts.repetition_penalty != 1.0 {
        let mut seen = ids.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l < 0.0 { *l * opts.repetition_penalty } else { *l / opts.repetition_penalty };
            }
        }
    }
    if ids.len() < opts.min_tokens {
        if let Some(l) = logits.get_mut(sp.eot as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

fn argmax(v: &[f32]) -> usize {
    // first maximum, as torch.argmax / topk(1) on CPU
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Greedy or sampling search for one image. `on_token` sees each chosen token.
pub fn sample_search(stepper: &mut dyn Stepper, opts: &CaptionOptions, sp: &Specials, mut on_token: impl FnMut(u32)) -> Result<(Vec<u32>, f32)> {
    let mut ids = vec![sp.sot];
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut score = 0f32;
    let mut mask = Vec::new();
    loop {
        let last = *ids.last().unwrap();
        if ids.len() > 1 && (last == sp.eot || last == sp.pad) {
            break;
        }
        mask.clear();
        key_mask_row(&ids, sp, &mut mask);
        let mut logits = stepper.step(&[last as i64], &mask)?;
        process_logits(&mut logits, &ids, opts, sp);
        let next = if ids.len() + 1 == opts.max_tokens {
            sp.eot as usize
        } else {
            match opts.search {
                Search::Greedy | Search::Beam { .. } => argmax(&logits),
                Search::TopK { k } => draw(&top_k_filter(&logits, k), opts.temperature, &mut rng),
                Search::TopP { p } => draw(&top_p_filter(&logits, p), opts.temperature, &mut rng),
            }
        };
        score += logits[next];
        ids.push(next as u32);
        on_token(next as u32);
        if ids.len() >= opts.max_tokens {
            break;
        }
    }
    Ok((ids, score))
}

/// transformers' TopKLogitsWarper: everything below the k-th largest logit becomes -inf.
fn top_k_filter(logits: &[f32], k: usize) -> Vec<f32> {
    let k = k.min(logits.len());
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits.iter().map(|&l| if l < kth { f32::NEG_INFINITY } else { l }).collect()
}

/// transformers' TopPLogitsWarper: drop the least likely tokens whose cumulative probability
/// (ascending) is at most 1 - p, always keeping the most likely one.
fn top_p_filter(logits: &[f32], p: f32) -> Vec<f32> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let probs = softmax(&order.iter().map(|&i| logits[i]).collect::<Vec<_>>());
    let mut out = logits.to_vec();
    let mut cum = 0f32;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[rank];
        if cum <= 1.0 - p && rank + 1 < order.len() {
            out[i] = f32::NEG_INFINITY;
        }
    }
    out
}

use crate::kernels::softmax;

fn draw(logits: &[f32], temperature: f32, rng: &mut ChaCha8Rng) -> usize {
    let scaled: Vec<f32> = logits.iter().map(|l| l / temperature).collect();
    let probs = softmax(&scaled);
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0f64;
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_nonzero = i;
            acc += p as f64;
            if u < acc {
                return i;
            }
        }
    }
    last_nonzero
}

/// transformers' BeamHypotheses (length_penalty 1, early_stopping false).
struct Hyps {
    size: usize,
    beams: Vec<(f64, Vec<u32>)>,
    worst: f64,
}

impl Hyps {
    fn new(size: usize) -> Hyps {
        Hyps { size, beams: Vec::new(), worst: 1e9 }
    }
    fn add(&mut self, hyp: Vec<u32>, sum: f64, generated_len: usize) {
        let score = sum / generated_len as f64;
        if self.beams.len() < self.size || score > self.worst {
            self.beams.push((score, hyp));
            if self.beams.len() > self.size {
                let mut sorted: Vec<(f64, usize)> = self.beams.iter().enumerate().map(|(i, b)| (b.0, i)).collect();
                sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                self.beams.remove(sorted[0].1);
                self.worst = sorted[1].0;
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }
    fn is_done(&self, best_sum: f64, cur_len: usize) -> bool {
        if self.beams.len() < self.size {
            return false;
        }
        self.worst >= best_sum / cur_len as f64
    }
}

/// open_clip's `_generate_beamsearch` for one image.
pub fn beam_search(stepper: &mut dyn Stepper, beams: usize, groups: usize, opts: &CaptionOptions, sp: &Specials) -> Result<(Vec<u32>, f32)> {
    let gs = beams / groups;
    let vocab = stepper.vocab();
    let mut ids: Vec<Vec<u32>> = vec![vec![sp.sot]; beams];
    let mut beam_scores = vec![-1e9f32; beams];
    for g in 0..groups {
        beam_scores[g * gs] = 0.0;
    }
    let mut hyps: Vec<Hyps> = (0..groups).map(|_| Hyps::new(gs)).collect();
    let mut done = vec![false; groups];
    let mut pending: Vec<i64> = vec![sp.sot as i64; beams];
    let mut mask = Vec::new();
    loop {
        mask.clear();
        for seq in &ids {
            key_mask_row(seq, sp, &mut mask);
        }
        let logits = stepper.step(&pending, &mask)?;
        if logits.len() != beams * vocab {
            return Err(Error::InvalidArgument(format!("decoder gave {} logits for {beams} beams x {vocab}", logits.len())));
        }
        let mut current = vec![0u32; beams];
        let mut order: Vec<usize> = (0..beams).collect();
        let mut new_ids = ids.clone();
        let cur_len = ids[0].len();
        for g in 0..groups {
            let base = g * gs;
            // processed scores + beam scores, flattened over the group's beams
            let mut cand: Vec<f32> = Vec::with_capacity(gs * vocab);
            for j in 0..gs {
                let b = base + j;
                let mut row = logits[b * vocab..(b + 1) * vocab].to_vec();
                process_logits(&mut row, &ids[b], opts, sp);
                cand.extend(row.iter().map(|l| l + beam_scores[b]));
            }
            let top = top_n(&cand, 2 * gs);
            let (mut next_scores, mut next_tokens, mut next_beams) = (vec![0f32; gs], vec![sp.pad; gs], vec![0usize; gs]);
            if !done[g] {
                let mut k = 0;
                for (rank, &flat) in top.iter().enumerate() {
                    let (beam, token) = (flat / vocab, (flat % vocab) as u32);
                    if token == sp.eot {
                        if rank >= gs {
                            continue;
                        }
                        hyps[g].add(ids[base + beam].clone(), cand[flat] as f64, cur_len + 1);
                    } else {
                        next_scores[k] = cand[flat];
                        next_tokens[k] = token;
                        next_beams[k] = beam;
                        k += 1;
                    }
                    if k == gs {
                        break;
                    }
                }
                if k < gs {
                    return Err(Error::InvalidArgument(format!("beam search: too many EOT candidates for {gs} beams per group")));
                }
                let best = top.iter().map(|&f| cand[f]).fold(f32::NEG_INFINITY, f32::max) as f64;
                done[g] = hyps[g].is_done(best, cur_len + 1);
            }
            for j in 0..gs {
                beam_scores[base + j] = next_scores[j];
                new_ids[base + j] = ids[base + next_beams[j]].clone();
                new_ids[base + j].push(next_tokens[j]);
                current[base + j] = next_tokens[j];
                order[base + j] = base + next_beams[j];
            }
        }
        ids = new_ids;
        stepper.reorder(&order)?;
        pending = current.iter().map(|&t| t as i64).collect();
        if done.iter().all(|&d| d) || ids[0].len() >= opts.max_tokens {
            break;
        }
    }
    // finalize: unfinished groups add their current beams
    for g in 0..groups {
        if done[g] {
            continue;
        }
        for j in 0..gs {
            let b = g * gs + j;
            hyps[g].add(ids[b].clone(), beam_scores[b] as f64, ids[b].len());
        }
    }
    let mut all: Vec<(f64, Vec<u32>)> = hyps.into_iter().flat_map(|h| h.beams).collect();
    // Python's sorted() is stable and pop() takes the last: the best, the last one among ties
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (score, mut best) = all.pop().ok_or_else(|| Error::InvalidArgument("beam search produced no hypothesis".into()))?;
    if best.len() < opts.max_tokens {
        best.push(sp.eot);
    }
    Ok((best, score as f32))
}

/// Indices of the `n` largest values, largest first (ties: lower index first).
fn top_n(v: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(v.len());
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.select_nth_unstable_by(n.saturating_sub(1), |&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model: the logits depend only on the last token of each sequence.
    struct Table {
        vocab: usize,
        f: fn(u32) -> Vec<f32>,
        order_log: Vec<Vec<usize>>,
    }
    impl Stepper for Table {
        fn step(&mut self, new_ids: &[i64], _mask: &[f32]) -> Result<Vec<f32>> {
            Ok(new_ids.iter().flat_map(|&t| (self.f)(t as u32)).collect())
        }
        fn reorder(&mut self, order: &[usize]) -> Result<()> {
            self.order_log.push(order.to_vec());
            Ok(())
        }
        fn vocab(&self) -> usize {
            self.vocab
        }
    }

    const SP: Specials = Specials { sot: 5, eot: 6, pad: 0, legacy_pad_mask: true };

    #[test]
    fn greedy_respects_min_length_and_stops_at_eot() {
        // token 6 (EOT) is always best; min length 3 forbids it until ids.len() >= 3
        let mut t = Table { vocab: 7, f: |_| vec![0.0, 0.1, 0.5, 0.2, 0.0, 0.0, 1.0], order_log: vec![] };
        let o = CaptionOptions { search: Search::Greedy, min_tokens: 3, ..Default::default() };
        let (ids, _) = sample_search(&mut t, &o, &SP, |_| {}).unwrap();
        assert_eq!(ids, vec![5, 2, 2, 6]);
    }

    #[test]
    fn greedy_stops_on_pad_and_forces_eot_at_the_end() {
        let mut t = Table { vocab: 7, f: |_| vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], order_log: vec![] };
        let o = CaptionOptions { search: Search::Greedy, min_tokens: 1, ..Default::default() };
        assert_eq!(sample_search(&mut t, &o, &SP, |_| {}).unwrap().0, vec![5, 0]);
        let mut t = Table { vocab: 7, f: |_| vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0], order_log: vec![] };
        let o = CaptionOptions { search: Search::Greedy, max_tokens: 4, min_tokens: 1, ..Default::default() };
        assert_eq!(sample_search(&mut t, &o, &SP, |_| {}).unwrap().0, vec![5, 2, 2, 6]);
    }

    #[test]
    fn pad_masks_the_next_key() {
        let mut m = Vec::new();
        key_mask_row(&[5, 0, 3, 0], &SP, &mut m);
        assert_eq!(m, vec![0.0, 0.0, f32::NEG_INFINITY, 0.0]);
    }

    #[test]
    fn beam_search_prefers_the_higher_scoring_finished_hypothesis() {
        // from SOT: token 1 (2.0) or 2 (1.5); after 1: EOT 0.1; after 2: EOT 3.0
        let f: fn(u32) -> Vec<f32> = |last| match last {
            5 => vec![-9.0, 2.0, 1.5, -9.0, -9.0, -9.0, -9.0],
            1 => vec![-9.0, -9.0, -9.0, -9.0, -9.0, -9.0, 0.1],
            2 => vec![-9.0, -9.0, -9.0, -9.0, -9.0, -9.0, 3.0],
            _ => vec![-9.0, -9.0, -9.0, -9.0, -9.0, -9.0, 0.0],
        };
        let mut t = Table { vocab: 7, f, order_log: vec![] };
        let o = CaptionOptions { search: Search::Beam { beams: 2, groups: 1 }, min_tokens: 1, max_tokens: 5, ..Default::default() };
        let (ids, score) = beam_search(&mut t, 2, 1, &o, &SP).unwrap();
        assert_eq!(ids, vec![5, 2, 6]);
        assert!((score - 4.5 / 3.0).abs() < 1e-6, "{score}");
        assert!(!t.order_log.is_empty());
    }

    #[test]
    fn options_are_checked() {
        let v = |o: CaptionOptions| o.validate(76);
        assert!(v(CaptionOptions::default()).is_ok());
        assert!(v(CaptionOptions { max_tokens: 0, ..Default::default() }).is_err());
        // longer than the decoder (76 positions here): stops at its last position
        assert!(v(CaptionOptions { max_tokens: 77, ..Default::default() }).is_ok());
        assert_eq!(CaptionOptions { max_tokens: 77, ..Default::default() }.fitted(32).unwrap().max_tokens, 32);
        assert_eq!(CaptionOptions::default().fitted(77).unwrap().max_tokens, 30);
        // min tokens must fit under the decoder's positions too
        let e = v(CaptionOptions { max_tokens: 77, min_tokens: 76, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("76 positions"), "{e}");
        assert!(v(CaptionOptions { search: Search::Beam { beams: 0, groups: 1 }, ..Default::default() }).is_err());
        assert!(v(CaptionOptions { search: Search::Beam { beams: 10000, groups: 1 }, ..Default::default() }).is_err());
        assert!(v(CaptionOptions { search: Search::Beam { beams: 6, groups: 4 }, ..Default::default() }).is_err());
        assert!(v(CaptionOptions { min_tokens: 30, ..Default::default() }).is_err());
    }

    #[test]
    fn filters() {
        let l = [1.0, 3.0, 2.0, 0.0];
        assert_eq!(top_k_filter(&l, 2), vec![f32::NEG_INFINITY, 3.0, 2.0, f32::NEG_INFINITY]);
        let kept = top_p_filter(&l, 0.5);
        assert_eq!(kept[1], 3.0);
        assert_eq!(top_n(&[0.5, 2.0, 2.0, 1.0], 3), vec![1, 2, 3]);
    }
}
