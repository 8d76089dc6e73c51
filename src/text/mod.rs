//! The CLIP byte-level BPE tokenizer, a port of open_clip 3.3.0's `SimpleTokenizer`
//! (`open_clip/tokenizer.py`, itself copied from OpenAI's CLIP) as returned by
//! `open_clip.get_tokenizer('coca_ViT-B-32')`: clean `'lower'`, no extra special tokens, no
//! reduction mask.
//!
//! * Vocabulary: `bpe_simple_vocab_16e6.txt.gz`, a header line then merges; like Python, lines
//!   1..=48894 are used, giving 256 byte symbols, 256 byte symbols with `</w>`, 48894 merges and
//!   `<start_of_text>` (49406) / `<end_of_text>` (49407): 49408 ids.
//! * Cleaning ([`Clean`], see [`clean`]): ftfy's `fix_text`, `html.unescape` twice, strip,
//!   then whitespace collapsing and lower case (`'lower'`), just the collapsing
//!   (`'whitespace'`) or big_vision's canonicalisation (`'canonicalize'`).
//! * Pre-tokenisation: the same pattern as Python's
//!   `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!   (case-insensitive), so every digit is its own token. A literal `<start_of_text>` or
//!   `<end_of_text>` in the text becomes the special id, as in Python. Python's `regex` module
//!   matches U+0345 (COMBINING GREEK YPOGEGRAMMENI) with none of the three classes under
//!   IGNORECASE, so that character is dropped; the pattern here does the same.
//! * BPE: the lowest-ranked adjacent pair is merged everywhere until none is left; results are
//!   cached per pre-token (a bounded cache behind a mutex; a contended lock just skips it).
//!
//! Differences from Python are listed in [`clean`] (mainly: no mojibake repair). In
//! [`Tokenizer::decode`], ids outside the vocabulary are skipped (Python raises `KeyError`).
//! [`Tokenizer::tokenize`] with `context_length` 0 returns an empty row (Python raises).

pub mod clean;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Read;
use std::path::Path;
use std::sync::{Mutex, OnceLock, TryLockError};

use regex::Regex;

use crate::error::{Error, Result};

/// Number of merge lines Python reads: `merges[1:49152-256-2+1]`.
pub const NUM_MERGES: usize = 49152 - 256 - 2;
/// Size of the vocabulary: 512 byte symbols, the merges and two special tokens.
pub const VOCAB_SIZE: usize = 512 + NUM_MERGES + 2;
/// open_clip's default context length (CoCa models use 76).
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;

const SOT_TEXT: &str = "<start_of_text>";
const EOT_TEXT: &str = "<end_of_text>";
/// Entries kept in the BPE cache before it is emptied.
const CACHE_LIMIT: usize = 1 << 16;

/// How text is cleaned before tokenisation (open_clip's `clean=` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Clean {
    /// `whitespace_clean(basic_clean(x)).lower()`: the default, and what CoCa uses.
    #[default]
    Lower,
    /// `whitespace_clean(basic_clean(x))`.
    Whitespace,
    /// `canonicalize_text(basic_clean(x))`: also drops ASCII punctuation, `_` becomes a space.
    Canonicalize,
}

impl Clean {
    /// Clean `text` the way open_clip's clean function of this name does.
    pub fn apply(self, text: &str) -> String {
        let basic = clean::basic_clean(text);
        match self {
            Clean::Lower => clean::whitespace_clean(&basic).to_lowercase(),
            Clean::Whitespace => clean::whitespace_clean(&basic),
            Clean::Canonicalize => clean::canonicalize_text(&basic),
        }
    }

    /// The name open_clip uses for this clean function.
    pub fn as_str(self) -> &'static str {
        match self {
            Clean::Lower => "lower",
            Clean::Whitespace => "whitespace",
            Clean::Canonicalize => "canonicalize",
        }
    }
}

impl std::str::FromStr for Clean {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lower" => Ok(Clean::Lower),
            "whitespace" => Ok(Clean::Whitespace),
            "canonicalize" => Ok(Clean::Canonicalize),
            other => Err(Error::InvalidArgument(format!("unknown text clean function {other:?} (expected lower, whitespace or canonicalize)"))),
        }
    }
}

/// A cheap hasher for the `(u32, u32)` pair keys of the merge table.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type PairMap = HashMap<(u32, u32), (u32, u32), BuildHasherDefault<PairHasher>>;

/// The CLIP BPE tokenizer. Cheap to share between threads (`&self` everywhere).
pub struct Tokenizer {
    /// id -> the bytes it stands for (`</w>` kept as the four bytes `</w>`).
    decoder: Vec<Box<[u8]>>,
    /// byte -> id of its single-byte symbol, and of that symbol with `</w>`.
    byte_sym: [u32; 256],
    byte_sym_end: [u32; 256],
    /// (left id, right id) -> (merge rank, id of the merged symbol).
    merges: PairMap,
    sot: u32,
    eot: u32,
    clean: Clean,
    cache: Mutex<HashMap<String, Vec<u32>>>,
    /// A restricted vocabulary (see [`Tokenizer::with_vocab_map`]).
    map: Option<VocabMap>,
}

/// A model whose embedding and output projection cover only some BPE tokens: model id `i`
/// stands for BPE id `to_bpe[i]`.
#[derive(Debug, Clone)]
struct VocabMap {
    to_bpe: Vec<u32>,
    to_model: HashMap<u32, u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.decoder.len())
            .field("merges", &self.merges.len())
            .field("clean", &self.clean)
            .finish_non_exhaustive()
    }
}

/// CLIP's `bytes_to_unicode()`: the byte values in vocabulary order, paired with the
/// printable character that stands for each.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xa1..=0xac).chain(0xae..=0xff).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter().zip(cs).map(|(b, c)| (b as u8, char::from_u32(c).expect("below 0x200"))).collect()
}

/// The pre-tokenisation pattern (see the module docs).
fn token_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(?i:<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{345}]+").expect("valid regex"))
}

impl Tokenizer {
    /// Load a gzipped merges file such as open_clip's `bpe_simple_vocab_16e6.txt.gz`.
    pub fn from_gz_file(path: &Path) -> Result<Self> {
        let bytes = crate::limits::read_capped(path, crate::limits::VOCAB_GZ_BYTES, "the gzipped vocabulary")?;
        Self::from_gz_bytes(&bytes, &path.display().to_string())
    }

    /// Load a gzipped merges file from memory; `what` names it in error messages.
    pub fn from_gz_bytes(bytes: &[u8], what: &str) -> Result<Self> {
        let err = |message: String| Error::Vocab { what: what.to_string(), message };
        let mut raw = Vec::new();
        let cap = crate::limits::VOCAB_TEXT_BYTES;
        flate2::read::MultiGzDecoder::new(bytes).take(cap + 1).read_to_end(&mut raw).map_err(|e| err(format!("cannot decompress the gzip data: {e}")))?;
        if raw.len() as u64 > cap {
            return Err(err(format!("decompresses to more than the {} MB a vocabulary may hold", cap >> 20)));
        }
        let text = String::from_utf8(raw).map_err(|e| err(format!("not UTF-8 text: {e}")))?;
        Self::from_merges_text(&text).map_err(err)
    }

    /// Build from the decompressed text; errors are messages for `Error::Vocab`.
    fn from_merges_text(text: &str) -> std::result::Result<Self, String> {
        // Python: merges = text.split('\n')[1:49152-256-2+1]
        let lines: Vec<&str> = text.split('\n').skip(1).take(NUM_MERGES).collect();
        if lines.len() < NUM_MERGES {
            return Err(format!("expected {NUM_MERGES} merge lines after the header, found {}", lines.len()));
        }
        let mut merges = Vec::with_capacity(NUM_MERGES);
        for (k, line) in lines.iter().enumerate() {
            let mut parts = line.split(clean::py_isspace).filter(|p| !p.is_empty());
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a, b)),
                _ => return Err(format!("line {}: expected two symbols separated by a space, found {line:?}", k + 2)),
            }
        }

        let table = bytes_to_unicode();
        let mut byte_of = HashMap::with_capacity(256);
        for &(b, c) in &table {
            byte_of.insert(c, b);
        }
        let mut vocab: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        vocab.extend(table.iter().map(|&(_, c)| c.to_string()));
        vocab.extend(table.iter().map(|&(_, c)| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(SOT_TEXT.to_string());
        vocab.push(EOT_TEXT.to_string());

        // dict(zip(vocab, range(len(vocab)))): a repeated string keeps its last id
        let mut encoder: HashMap<&str, u32> = HashMap::with_capacity(vocab.len());
        for (id, s) in vocab.iter().enumerate() {
            encoder.insert(s.as_str(), id as u32);
        }

        let mut decoder = Vec::with_capacity(vocab.len());
        for (id, s) in vocab.iter().enumerate() {
            let bytes: Option<Vec<u8>> = s.chars().map(|c| byte_of.get(&c).copied()).collect();
            match bytes {
                Some(bytes) => decoder.push(bytes.into_boxed_slice()),
                None => return Err(format!("merge line {}: symbol {s:?} has a character outside the byte alphabet", id - 512 + 2)),
            }
        }

        let mut byte_sym = [0u32; 256];
        let mut byte_sym_end = [0u32; 256];
        for (i, &(b, _)) in table.iter().enumerate() {
            byte_sym[usize::from(b)] = i as u32;
            byte_sym_end[usize::from(b)] = (256 + i) as u32;
        }

        // dict(zip(merges, range(len(merges)))): a repeated pair keeps its last rank. A pair
        // whose parts are not symbols can never occur in a word, so it is left out.
        let mut pairs = PairMap::with_capacity_and_hasher(NUM_MERGES, Default::default());
        for (rank, &(a, b)) in merges.iter().enumerate() {
            if let (Some(&ia), Some(&ib)) = (encoder.get(a), encoder.get(b)) {
                let merged = encoder[format!("{a}{b}").as_str()];
                pairs.insert((ia, ib), (rank as u32, merged));
            }
        }

        Ok(Tokenizer {
            decoder,
            byte_sym,
            byte_sym_end,
            merges: pairs,
            sot: encoder[SOT_TEXT],
            eot: encoder[EOT_TEXT],
            clean: Clean::Lower,
            cache: Mutex::new(HashMap::new()),
            map: None,
        })
    }

    /// Restrict the tokenizer to a model vocabulary: model id `i` is BPE id `to_bpe[i]`.
    /// [`Tokenizer::encode`], [`Tokenizer::tokenize`], [`Tokenizer::sot`], [`Tokenizer::eot`],
    /// [`Tokenizer::vocab_size`] and [`Tokenizer::decode`] then speak model ids; BPE tokens
    /// outside the map are left out of `encode` (check texts first with
    /// [`Tokenizer::unknown_words`]). The map must hold distinct BPE ids, among them
    /// `<start_of_text>` and `<end_of_text>`.
    pub fn with_vocab_map(mut self, to_bpe: Vec<u32>) -> std::result::Result<Self, String> {
        let n = self.decoder.len();
        let mut to_model = HashMap::with_capacity(to_bpe.len());
        for (i, &b) in to_bpe.iter().enumerate() {
            if b as usize >= n {
                return Err(format!("vocab_map[{i}] = {b} is not a BPE id (the vocabulary has {n})"));
            }
            if to_model.insert(b, i as u32).is_some() {
                return Err(format!("vocab_map lists BPE id {b} twice"));
            }
        }
        for (name, id) in [("<start_of_text>", self.sot), ("<end_of_text>", self.eot)] {
            if !to_model.contains_key(&id) {
                return Err(format!("vocab_map has no {name} (BPE id {id})"));
            }
        }
        self.map = Some(VocabMap { to_bpe, to_model });
        Ok(self)
    }

    /// Whether a restricted vocabulary is in use.
    pub fn is_restricted(&self) -> bool {
        self.map.is_some()
    }

    /// The words of `text` (after cleaning) that the model's vocabulary cannot spell: empty
    /// for the full BPE vocabulary.
    pub fn unknown_words(&self, text: &str) -> Vec<String> {
        let Some(map) = &self.map else {
            return Vec::new();
        };
        let cleaned = self.clean.apply(text);
        let mut out: Vec<String> = Vec::new();
        for m in token_regex().find_iter(&cleaned) {
            let token = m.as_str();
            if token == SOT_TEXT || token == EOT_TEXT {
                continue;
            }
            if self.bpe(token.as_bytes()).iter().any(|b| !map.to_model.contains_key(b)) && !out.iter().any(|w| w == token) {
                out.push(token.to_string());
            }
        }
        out
    }

    /// The words the model's vocabulary holds whole (`None` for the full BPE vocabulary).
    pub fn known_words(&self) -> Option<Vec<String>> {
        let map = self.map.as_ref()?;
        let mut v: Vec<String> = map
            .to_bpe
            .iter()
            .filter(|&&b| b != self.sot && b != self.eot)
            .map(|&b| String::from_utf8_lossy(&self.decoder[b as usize]).replace("</w>", ""))
            .collect();
        v.sort();
        Some(v)
    }

    /// Use another clean function (the default is [`Clean::Lower`], as for CoCa).
    pub fn with_clean(mut self, clean: Clean) -> Self {
        self.clean = clean;
        self
    }

    /// The clean function in use.
    pub fn clean(&self) -> Clean {
        self.clean
    }

    /// Id of `<start_of_text>` (49406 in the full vocabulary).
    pub fn sot(&self) -> u32 {
        self.model_id(self.sot)
    }

    /// Id of `<end_of_text>` (49407 in the full vocabulary).
    pub fn eot(&self) -> u32 {
        self.model_id(self.eot)
    }

    /// Number of ids (49408 in the full vocabulary).
    pub fn vocab_size(&self) -> usize {
        self.map.as_ref().map_or(self.decoder.len(), |m| m.to_bpe.len())
    }

    fn model_id(&self, bpe: u32) -> u32 {
        match &self.map {
            None => bpe,
            Some(m) => m.to_model[&bpe],
        }
    }

    /// BPE of one pre-token (its UTF-8 bytes, not empty).
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        let (&last, init) = bytes.split_last().expect("pre-tokens are never empty");
        let mut word: Vec<u32> = init.iter().map(|&b| self.byte_sym[usize::from(b)]).collect();
        word.push(self.byte_sym_end[usize::from(last)]);
        while word.len() > 1 {
            let mut best: Option<(u32, u32, u32, u32)> = None; // rank, left, right, merged
            for w in word.windows(2) {
                if let Some(&(rank, merged)) = self.merges.get(&(w[0], w[1])) {
                    if best.is_none_or(|(r, ..)| rank < r) {
                        best = Some((rank, w[0], w[1], merged));
                    }
                }
            }
            let Some((_, left, right, merged)) = best else {
                break;
            };
            let mut next = Vec::with_capacity(word.len() - 1);
            let mut i = 0;
            while i < word.len() {
                if word[i] == left && i + 1 < word.len() && word[i + 1] == right {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(word[i]);
                    i += 1;
                }
            }
            word = next;
        }
        word
    }

    /// Token ids of `text`, cleaned with [`Tokenizer::clean`], without `<start_of_text>` /
    /// `<end_of_text>` (Python's `SimpleTokenizer.encode`). With a vocabulary map: model ids,
    /// BPE tokens outside the map left out.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let bpe = self.encode_bpe(text);
        match &self.map {
            None => bpe,
            Some(m) => bpe.iter().filter_map(|b| m.to_model.get(b).copied()).collect(),
        }
    }

    fn encode_bpe(&self, text: &str) -> Vec<u32> {
        let cleaned = self.clean.apply(text);
        let mut out = Vec::with_capacity(cleaned.len() / 3 + 1);
        // A poisoned cache is still a valid cache; a contended one is skipped.
        let mut cache = match self.cache.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        for m in token_regex().find_iter(&cleaned) {
            let token = m.as_str();
            if token == SOT_TEXT {
                out.push(self.sot);
            } else if token == EOT_TEXT {
                out.push(self.eot);
            } else if let Some(cache) = cache.as_mut() {
                if let Some(ids) = cache.get(token) {
                    out.extend_from_slice(ids);
                } else {
                    let ids = self.bpe(token.as_bytes());
                    out.extend_from_slice(&ids);
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(token.to_string(), ids);
                }
            } else {
                out.extend(self.bpe(token.as_bytes()));
            }
        }
        out
    }

    /// One row of `context_length` ids, as Python's `SimpleTokenizer.__call__`:
    /// `<start_of_text>`, the ids of `text`, `<end_of_text>`, then zeros. A longer row is cut to
    /// `context_length` and its last id set to `<end_of_text>`.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<i64> {
        let ids = self.encode(text);
        let mut row = Vec::with_capacity(context_length.max(ids.len() + 2));
        row.push(i64::from(self.sot()));
        row.extend(ids.iter().map(|&i| i64::from(i)));
        row.push(i64::from(self.eot()));
        if row.len() > context_length {
            row.truncate(context_length);
            if let Some(last) = row.last_mut() {
                *last = i64::from(self.eot());
            }
        }
        row.resize(context_length, 0);
        row
    }

    /// [`Tokenizer::tokenize`] for several texts: `texts.len()` rows of `context_length` ids,
    /// row-major, ready for a `[n, context_length]` tensor.
    pub fn tokenize_batch<S: AsRef<str>>(&self, texts: &[S], context_length: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(texts.len() * context_length);
        for text in texts {
            out.extend(self.tokenize(text.as_ref(), context_length));
        }
        out
    }

    /// Text of `ids`, as Python's `SimpleTokenizer.decode`: the bytes of every symbol, read as
    /// UTF-8 with U+FFFD for invalid sequences, then every `</w>` replaced by a space. Special
    /// ids decode to `<start_of_text>` / `<end_of_text>`; ids outside the vocabulary (such as
    /// padding beyond it) are skipped, where Python raises `KeyError`. With a vocabulary map,
    /// `ids` are model ids.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let id = match &self.map {
                None => Some(id),
                Some(m) => m.to_bpe.get(id as usize).copied(),
            };
            if let Some(sym) = id.and_then(|id| self.decoder.get(id as usize)) {
                bytes.extend_from_slice(sym);
            }
        }
        String::from_utf8_lossy(&bytes).replace("</w>", " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small gzip that decompresses past the vocabulary cap is refused once the cap is
    /// reached, not read to the end (hardening finding 4: a 14 MB gzip of zeros took 3.1 GB).
    #[test]
    fn a_gzip_bomb_vocabulary_is_refused_at_the_cap() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(crate::limits::VOCAB_TEXT_BYTES >> 20) + 1 {
            gz.write_all(&zeros).unwrap();
        }
        let bytes = gz.finish().unwrap();
        assert!(bytes.len() < 1 << 20);
        let e = Tokenizer::from_gz_bytes(&bytes, "bomb.gz").unwrap_err().to_string();
        assert!(e.starts_with("bomb.gz: decompresses to more than the 64 MB"), "{e}");
    }
    use std::io::Write;

    fn vocab_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/bpe_simple_vocab_16e6.txt.gz")
    }

    fn tokenizer() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::from_gz_file(&vocab_path()).expect("vocab loads"))
    }

    fn gz(text: &str) -> Vec<u8> {
        gz_bytes(text.as_bytes())
    }

    fn gz_bytes(raw: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(raw).unwrap();
        enc.finish().unwrap()
    }

    fn assert_vocab_err(result: Result<Tokenizer>, needle: &str) {
        match result {
            Err(Error::Vocab { what, message }) => {
                assert_eq!(what, "test.gz");
                assert!(message.contains(needle), "message {message:?} lacks {needle:?}");
            }
            other => panic!("expected a Vocab error, got {other:?}"),
        }
    }

    #[test]
    fn sizes_and_special_ids() {
        let tok = tokenizer();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!(tok.sot(), 49406);
        assert_eq!(tok.eot(), 49407);
        assert_eq!(tok.clean(), Clean::Lower);
    }

    #[test]
    fn corrupt_gz_is_an_error() {
        let good = std::fs::read(vocab_path()).unwrap();
        // truncated stream
        assert_vocab_err(Tokenizer::from_gz_bytes(&good[..good.len() / 2], "test.gz"), "gzip");
        // corrupted deflate data (the CRC or the stream breaks)
        let mut bad = good.clone();
        for b in &mut bad[1000..1100] {
            *b ^= 0x5a;
        }
        assert!(matches!(Tokenizer::from_gz_bytes(&bad, "test.gz"), Err(Error::Vocab { .. })));
        // not gzip at all, and nothing
        assert_vocab_err(Tokenizer::from_gz_bytes(b"plain text\nab c\n", "test.gz"), "gzip");
        assert!(Tokenizer::from_gz_bytes(b"", "test.gz").is_err());
        // not UTF-8
        assert_vocab_err(Tokenizer::from_gz_bytes(&gz_bytes(&[0xff, 0xfe, 0x0a]), "test.gz"), "UTF-8");
    }

    #[test]
    fn wrong_merges_are_errors() {
        assert_vocab_err(Tokenizer::from_gz_bytes(&gz("#version: 0.2\ni n\nt h\n"), "test.gz"), "merge lines");
        let mut text = String::from("#version: 0.2\n");
        for _ in 0..NUM_MERGES {
            text.push_str("i n\n");
        }
        let broken = text.replacen("i n\n", "i n x\n", 1);
        assert_vocab_err(Tokenizer::from_gz_bytes(&gz(&broken), "test.gz"), "line 2");
        let alien = text.replacen("i n\n", "i \u{3042}\n", 1);
        assert_vocab_err(Tokenizer::from_gz_bytes(&gz(&alien), "test.gz"), "byte alphabet");
        // a well-formed (if silly) file loads
        let tok = Tokenizer::from_gz_bytes(&gz(&text), "test.gz").unwrap();
        assert_eq!(tok.vocab_size(), VOCAB_SIZE);
        assert_eq!(tok.decode(&tok.encode("in")), "in ");
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = Tokenizer::from_gz_file(Path::new("/nonexistent/vocab.txt.gz")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[test]
    fn known_ids() {
        let tok = tokenizer();
        // open_clip: tokenizer.encode("a photo of a dog.")
        assert_eq!(tok.encode("a photo of a dog."), vec![320, 1125, 539, 320, 1929, 269]);
        assert_eq!(tok.encode(""), Vec::<u32>::new());
        assert_eq!(tok.encode("<start_of_text>hi<end_of_text>"), vec![49406, 1883, 49407]);
    }

    #[test]
    fn decode_round_trip_of_plain_text() {
        let tok = tokenizer();
        for text in ["the quick brown fox jumps over the lazy dog", "zürich café 東京 ελληνικά"] {
            let decoded = tok.decode(&tok.encode(text));
            assert_eq!(decoded, format!("{text} "));
            assert_eq!(tok.encode(&decoded), tok.encode(text));
        }
        // every pre-token ends in `</w>`, so punctuation comes back spaced out
        assert_eq!(tok.decode(&tok.encode("A photo of a dog.")), "a photo of a dog . ");
        assert_eq!(tok.decode(&[tok.sot(), 320, tok.eot()]), "<start_of_text>a <end_of_text>");
        // unknown ids are skipped
        assert_eq!(tok.decode(&[320, 60_000, 1929]), "a dog ");
    }

    #[test]
    fn truncation_keeps_eot() {
        let tok = tokenizer();
        let text = "word ".repeat(200);
        let row = tok.tokenize(&text, 76);
        assert_eq!(row.len(), 76);
        assert_eq!(row[0], 49406);
        assert_eq!(row[75], 49407);
        assert!(row[1..75].iter().all(|&i| i != 0 && i != 49407));
        // exactly full: no truncation needed
        let ids = tok.encode("a photo of a dog.");
        let row = tok.tokenize("a photo of a dog.", ids.len() + 2);
        assert_eq!(row.last(), Some(&49407));
        assert_eq!(row[ids.len()], i64::from(*ids.last().unwrap()));
        // padding
        let row = tok.tokenize("a photo of a dog.", 76);
        assert_eq!(&row[..8], &[49406, 320, 1125, 539, 320, 1929, 269, 49407]);
        assert!(row[8..].iter().all(|&i| i == 0));
        assert_eq!(tok.tokenize("anything", 1), vec![49407]);
        assert!(tok.tokenize("anything", 0).is_empty());
        assert_eq!(tok.tokenize_batch(&["a", "dog"], 4), vec![49406, 320, 49407, 0, 49406, 1929, 49407, 0]);
    }

    #[test]
    fn concurrent_use() {
        let tok = tokenizer();
        let expected = tok.encode("a photo of a golden retriever");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        assert_eq!(tok.encode("a photo of a golden retriever"), expected);
                    }
                });
            }
        });
    }

    #[test]
    fn clean_names() {
        assert_eq!("canonicalize".parse::<Clean>().unwrap(), Clean::Canonicalize);
        assert!("upper".parse::<Clean>().is_err());
        assert_eq!(Clean::Whitespace.as_str(), "whitespace");
        assert_eq!(Clean::Lower.apply("  A  Dog\t&amp; CAT  "), "a dog & cat");
        assert_eq!(Clean::Whitespace.apply("  A  Dog\n"), "A Dog");
        assert_eq!(Clean::Canonicalize.apply("A big_Dog, (really)!"), "a big dog really");
    }

    #[test]
    fn html_unescape_like_python() {
        use clean::html_unescape as u;
        // outputs of CPython 3.11 html.unescape
        assert_eq!(u("&amp;"), "&");
        assert_eq!(u("&amp"), "&");
        assert_eq!(u("&ampfoo;"), "&foo;");
        assert_eq!(u("&notit;"), "¬it;");
        assert_eq!(u("&nosuch;"), "&nosuch;");
        assert_eq!(u("&#39;&#x27;&#X27"), "'''");
        assert_eq!(u("&#0;&#x110000;&#xd800;"), "\u{fffd}\u{fffd}\u{fffd}");
        assert_eq!(u("&#1;&#x7f;&#xfffe;"), "");
        assert_eq!(u("&#x80;&#129;"), "€\u{81}");
        assert_eq!(u("&#;&#x;&"), "&#;&#x;&");
        assert_eq!(u("&#99999999999999999999999;"), "\u{fffd}");
    }

    #[test]
    fn ftfy_steps() {
        use clean::fix_text as f;
        assert_eq!(f("&lt;b&gt; &eacute;"), "<b> é");
        assert_eq!(f("<b> &eacute;"), "<b> &eacute;");
        assert_eq!(f("&amp;amp;amp;"), "&");
        assert_eq!(f("P&EACUTE;REZ BUNDESSTRA&SZLIG;E &nTILDE;"), "PÉREZ BUNDESSTRASSE &nTILDE;");
        assert_eq!(f("ﬂuﬃeﬆ"), "fluffiest");
        assert_eq!(f("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(f("\u{201c}here\u{2019}s\u{201d}"), "\"here's\"");
        assert_eq!(f("a\r\nb\rc\u{2028}d"), "a\nb\nc\nd");
        assert_eq!(f("\u{1b}[36;44mblue\u{1b}[0m"), "blue");
        assert_eq!(f("a\u{0}b\u{7f}c\u{feff}d"), "abcd");
        assert_eq!(f("\u{93}quoted\u{94}"), "\"quoted\"");
        assert_eq!(f("e\u{301}"), "é");
        // '<' in an earlier line switches unescaping off for later lines, not earlier ones
        assert_eq!(f("&amp;\n<\n&amp;"), "&\n<\n&amp;");
    }
}
