//! Text cleaning applied before BPE, mirroring open_clip 3.3.0 `tokenizer.py`
//! (`basic_clean`, `whitespace_clean`, `canonicalize_text`, `_clean_lower`, ...) and the parts
//! of ftfy 6.3.1 `fix_text` (`ftfy/__init__.py`, `ftfy/fixes.py`, `ftfy/chardata.py`) that
//! `basic_clean` runs with ftfy's default configuration.
//!
//! What is reproduced, in ftfy's order and inside its fixed-point loop, per line segment:
//! `unescape_html` ("auto": off from the first segment that contains `<` on), `fix_c1_controls`,
//! `fix_latin_ligatures`, `fix_character_width`, `uncurl_quotes`, `fix_line_breaks`,
//! `remove_terminal_escapes`, `remove_control_chars` and NFC normalisation. Python's
//! `html.unescape` (used twice by `basic_clean`) is reimplemented from CPython 3.11's
//! `html/__init__.py`, with the WHATWG entity table that the `htmlize` crate ships.
//!
//! Known differences from the Python reference:
//! * ftfy's mojibake repair (`fix_encoding`: re-decoding text such as `cafÃ©` as `café`,
//!   `restore_byte_a0`, `replace_lossy_sequences`, `decode_inconsistent_utf8`) is not
//!   implemented; such text is tokenized as it stands. C1 control characters are still mapped
//!   to their Windows-1252 characters by `fix_c1_controls`, which gives the same result as
//!   `fix_encoding` does for them.
//! * `fix_surrogates` has nothing to do: a Rust `str` cannot hold surrogates.
//! * Unicode versions: Python 3.11's `str.lower`, `str.isspace` and `unicodedata` (NFC, NFKC)
//!   use Unicode 14.0 and the `regex` module (2026.11.15) its own, newer tables, while Rust's
//!   std, `regex` and `unicode-normalization` use theirs. Checked over every code point: the
//!   pre-tokeniser classes agree on every character that Rust's tables assign (Python's
//!   `regex` also classes some 17,000 code points that are unassigned for Rust, such as new CJK
//!   ideographs, as letters or digits), and lower-casing differs on 55 characters that are
//!   unassigned in Unicode 14 (such as U+1C89, U+A7CB, U+10D50..U+10D65, U+16EA0..U+16EB8).
//!   Text using characters newer than Unicode 14 may therefore tokenize differently.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Python's `str.isspace()` (as used by `str.split()` and `str.strip()` with no argument):
/// Unicode White_Space plus the information separators U+001C..U+001F.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no argument.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Python's `" ".join(text.split())`.
pub fn py_join_split(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split(py_isspace).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// open_clip `basic_clean`: `ftfy.fix_text`, `html.unescape` twice, `strip()`.
pub fn basic_clean(text: &str) -> String {
    let fixed = fix_text(text);
    let once = html_unescape(&fixed);
    let twice = html_unescape(&once);
    py_strip(&twice).to_string()
}

/// open_clip `whitespace_clean`: `" ".join(text.split()).strip()`.
pub fn whitespace_clean(text: &str) -> String {
    py_join_split(text)
}

/// open_clip `canonicalize_text` (no `keep_punctuation_exact_string`): `_` becomes a space,
/// ASCII punctuation (`string.punctuation`) is removed, then lower case and whitespace clean.
pub fn canonicalize_text(text: &str) -> String {
    let stripped: String = text
        .chars()
        .filter_map(|c| match c {
            '_' => Some(' '),
            c if c.is_ascii_punctuation() => None,
            c => Some(c),
        })
        .collect();
    py_join_split(&stripped.to_lowercase())
}

// ---------------------------------------------------------------------------------------------
// ftfy.fix_text
// ---------------------------------------------------------------------------------------------

/// ftfy's `TextFixerConfig.max_decode_length`: segments are at most this many characters.
const MAX_DECODE_LENGTH: usize = 1_000_000;

/// `ftfy.fix_text(text)` with the default configuration, except mojibake repair
/// (`fix_encoding`), see the module docs.
///
/// As in ftfy, the text is fixed one segment at a time (each line with its `\n`, long lines
/// cut every million characters), and HTML unescaping is switched off for the segment that
/// first contains `<` and for every segment after it.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for line in text.split_inclusive('\n') {
        let mut rest = line;
        while !rest.is_empty() {
            let cut = rest.char_indices().nth(MAX_DECODE_LENGTH).map_or(rest.len(), |(i, _)| i);
            let (segment, tail) = rest.split_at(cut);
            rest = tail;
            if unescape && segment.contains('<') {
                unescape = false;
            }
            out.push_str(&fix_segment(segment, unescape));
        }
    }
    out
}

/// ftfy `fix_and_explain` for one segment: apply the fixers until the text stops changing.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let mut t: Cow<'_, str> = Cow::Borrowed(text.as_str());
        if unescape {
            t = own(t, unescape_html);
        }
        // fix_encoding: not implemented (see module docs)
        t = own(t, fix_c1_controls);
        t = own(t, fix_latin_ligatures);
        t = own(t, fix_character_width);
        t = own(t, uncurl_quotes);
        t = own(t, fix_line_breaks);
        t = own(t, remove_terminal_escapes);
        t = own(t, remove_control_chars);
        t = own(t, nfc);
        match t {
            Cow::Borrowed(_) => return text,
            Cow::Owned(new) => {
                if new == text {
                    return text;
                }
                text = new;
            }
        }
    }
}

/// Apply a fixer to a `Cow`, keeping it borrowed when nothing changed.
fn own<'a>(t: Cow<'a, str>, f: impl Fn(&str) -> Cow<'_, str>) -> Cow<'a, str> {
    match t {
        Cow::Borrowed(s) => f(s),
        Cow::Owned(s) => match f(&s) {
            Cow::Borrowed(_) => Cow::Owned(s),
            Cow::Owned(n) => Cow::Owned(n),
        },
    }
}

/// Map every char through `f`; `None` keeps the char. Borrowed when nothing was mapped.
fn map_chars<'a>(s: &'a str, f: impl Fn(char) -> Option<&'static str>) -> Cow<'a, str> {
    let Some(first) = s.char_indices().find(|&(_, c)| f(c).is_some()).map(|(i, _)| i) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        match f(c) {
            Some(r) => out.push_str(r),
            None => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Windows-1252 for bytes 0x80..=0x9F, with the five undefined bytes passed through as the
/// C1 character of the same number (ftfy's "sloppy-windows-1252"; also CPython's
/// `html._invalid_charrefs` for these numbers).
const CP1252_C1: [&str; 32] = [
    "\u{20ac}", "\u{81}", "\u{201a}", "\u{192}", "\u{201e}", "\u{2026}", "\u{2020}", "\u{2021}", "\u{2c6}", "\u{2030}", "\u{160}", "\u{2039}", "\u{152}",
    "\u{8d}", "\u{17d}", "\u{8f}", "\u{90}", "\u{2018}", "\u{2019}", "\u{201c}", "\u{201d}", "\u{2022}", "\u{2013}", "\u{2014}", "\u{2dc}", "\u{2122}",
    "\u{161}", "\u{203a}", "\u{153}", "\u{9d}", "\u{17e}", "\u{178}",
];

/// ftfy `fix_c1_controls`: U+0080..U+009F read as Windows-1252.
pub fn fix_c1_controls(s: &str) -> Cow<'_, str> {
    map_chars(s, |c| match c as u32 {
        n @ 0x80..=0x9f => Some(CP1252_C1[(n - 0x80) as usize]),
        _ => None,
    })
}

/// ftfy `fix_latin_ligatures` (`chardata.LIGATURES`).
pub fn fix_latin_ligatures(s: &str) -> Cow<'_, str> {
    map_chars(s, |c| {
        Some(match c {
            'Ĳ' => "IJ",
            'ĳ' => "ij",
            'ŉ' => "ʼn",
            'Ǳ' => "DZ",
            'ǲ' => "Dz",
            'ǳ' => "dz",
            'Ǆ' => "DŽ",
            'ǅ' => "Dž",
            'ǆ' => "dž",
            'Ǉ' => "LJ",
            'ǈ' => "Lj",
            'ǉ' => "lj",
            'Ǌ' => "NJ",
            'ǋ' => "Nj",
            'ǌ' => "nj",
            'ﬀ' => "ff",
            'ﬁ' => "fi",
            'ﬂ' => "fl",
            'ﬃ' => "ffi",
            'ﬄ' => "ffl",
            'ﬅ' => "ſt",
            'ﬆ' => "st",
            _ => return None,
        })
    })
}

/// ftfy `chardata.WIDTH_MAP`: U+3000 to a space, U+FF01..U+FFEF to their NFKC form where it
/// differs.
fn width_map() -> &'static HashMap<char, String> {
    static MAP: OnceLock<HashMap<char, String>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut map = HashMap::new();
        map.insert('\u{3000}', " ".to_string());
        for c in (0xff01u32..0xfff0).filter_map(char::from_u32) {
            let alt: String = std::iter::once(c).nfkc().collect();
            if alt.chars().ne(std::iter::once(c)) {
                map.insert(c, alt);
            }
        }
        map
    })
}

/// ftfy `fix_character_width`.
pub fn fix_character_width(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\u{3000}' || ('\u{ff01}'..='\u{ffef}').contains(&c)) {
        return Cow::Borrowed(s);
    }
    let map = width_map();
    map_chars(s, |c| map.get(&c).map(String::as_str))
}

/// ftfy `uncurl_quotes`.
pub fn uncurl_quotes(s: &str) -> Cow<'_, str> {
    map_chars(s, |c| match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => Some("'"),
        '\u{201c}'..='\u{201f}' => Some("\""),
        _ => None,
    })
}

/// ftfy `fix_line_breaks`: `\r\n`, `\r`, U+2028, U+2029 and U+0085 become `\n`.
pub fn fix_line_breaks(s: &str) -> Cow<'_, str> {
    if !s.contains(['\r', '\u{2028}', '\u{2029}', '\u{85}']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push('\n');
            }
            '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// ftfy `remove_terminal_escapes` (`ANSI_RE`; Python `re`'s `\d` is Unicode `Nd`, as here).
pub fn remove_terminal_escapes(s: &str) -> Cow<'_, str> {
    if !s.contains('\u{1b}') {
        return Cow::Borrowed(s);
    }
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]").expect("valid regex")).replace_all(s, "")
}

/// ftfy `remove_control_chars` (`chardata.CONTROL_CHARS`).
pub fn remove_control_chars(s: &str) -> Cow<'_, str> {
    fn is_removed(c: char) -> bool {
        matches!(c as u32,
            0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc)
    }
    if !s.chars().any(is_removed) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().filter(|&c| !is_removed(c)).collect())
}

/// `unicodedata.normalize("NFC", s)`.
pub fn nfc(s: &str) -> Cow<'_, str> {
    if is_nfc_quick(s.chars()) == IsNormalized::Yes {
        return Cow::Borrowed(s);
    }
    let out: String = s.nfc().collect();
    if out == s {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(out)
    }
}

// ---------------------------------------------------------------------------------------------
// HTML entities
// ---------------------------------------------------------------------------------------------

/// Look up an HTML5 named reference, `name` without the `&` (with its `;` if it has one).
fn html5(name: &str) -> Option<&'static str> {
    if name.len() + 1 > htmlize::ENTITY_MAX_LENGTH {
        return None;
    }
    let mut key = [0u8; 64];
    key[0] = b'&';
    key[1..=name.len()].copy_from_slice(name.as_bytes());
    let value = htmlize::ENTITIES.get(&key[..=name.len()])?;
    // the table is generated from UTF-8 text
    std::str::from_utf8(value).ok()
}

/// ftfy's extra entities: all-caps spellings (`&EACUTE;`) of the all-lowercase HTML5 names
/// that end in `;`, decoding to the upper case of their character, where Python's
/// `html.unescape` leaves the all-caps spelling alone (`chardata._build_html_entities`).
fn upper_entities() -> &'static HashMap<String, String> {
    static MAP: OnceLock<HashMap<String, String>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut map = HashMap::new();
        for (key, value) in htmlize::ENTITIES.entries() {
            let (Ok(key), Ok(value)) = (std::str::from_utf8(key), std::str::from_utf8(value)) else {
                continue;
            };
            if !key.ends_with(';') || key != key.to_ascii_lowercase() {
                continue;
            }
            let upper = key.to_ascii_uppercase();
            if html_unescape(&upper) == upper {
                map.insert(upper, value.to_uppercase());
            }
        }
        map
    })
}

/// ftfy `unescape_html`: replace `&#?[0-9A-Za-z]{1,24};` when it is an HTML5 name that ends in
/// `;`, one of ftfy's all-caps names, or a numeric reference that `html.unescape` decodes
/// whole.
pub fn unescape_html(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("valid regex"));
    re.replace_all(s, |caps: &regex::Captures<'_>| {
        let m = &caps[0];
        if let Some(v) = html5(&m[1..]) {
            return v.to_string();
        }
        if let Some(v) = upper_entities().get(m) {
            return v.clone();
        }
        if m.starts_with("&#") {
            let u = html_unescape(m);
            if u.contains(';') {
                m.to_string()
            } else {
                u.into_owned()
            }
        } else {
            m.to_string()
        }
    })
}

/// CPython `html._replace_charref` for a numeric reference.
fn numeric_charref(num: u64, out: &mut String) {
    match num {
        0 => out.push('\u{fffd}'),
        0x0d => out.push('\r'),
        0x80..=0x9f => out.push_str(CP1252_C1[(num - 0x80) as usize]),
        0xd800..=0xdfff => out.push('\u{fffd}'),
        n if n > 0x10ffff => out.push('\u{fffd}'),
        0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0xfdd0..=0xfdef => {}
        n if n & 0xfffe == 0xfffe => {}
        n => out.push(char::from_u32(n as u32).unwrap_or('\u{fffd}')),
    }
}

/// Python's `html.unescape` (CPython 3.11): numeric references (with or without `;`), HTML5
/// named references, and for an unknown name the longest known prefix (such as `&amp` in
/// `&ampfoo`).
pub fn html_unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut last = 0; // end of the text already copied to `out`
    let mut i = 0;
    while let Some(off) = s[i..].find('&') {
        let amp = i + off;
        let after = &s[amp + 1..];
        let ab = after.as_bytes();
        // _charref = &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)
        let mut end = None; // byte offset in `after` where the match ends
        if ab.first() == Some(&b'#') {
            let digits = ab[1..].iter().take_while(|b| b.is_ascii_digit()).count();
            let (start, len, radix) = if digits > 0 {
                (1, digits, 10)
            } else if matches!(ab.get(1), Some(b'x' | b'X')) {
                (2, ab[2..].iter().take_while(|b| b.is_ascii_hexdigit()).count(), 16)
            } else {
                (0, 0, 0)
            };
            if len > 0 {
                let mut e = start + len;
                // saturate: anything over 0x10FFFF decodes the same
                let num = after[start..e].chars().fold(0u64, |acc, c| (acc * radix + c.to_digit(radix as u32).unwrap_or(0) as u64).min(1 << 40));
                if ab.get(e) == Some(&b';') {
                    e += 1;
                }
                out.push_str(&s[last..amp]);
                numeric_charref(num, &mut out);
                end = Some(e);
            }
        } else {
            let mut e = 0;
            for (n, c) in after.char_indices().take(32) {
                if matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';') {
                    break;
                }
                e = n + c.len_utf8();
            }
            if e > 0 {
                if ab.get(e) == Some(&b';') {
                    e += 1;
                }
                let name = &after[..e];
                out.push_str(&s[last..amp]);
                if let Some(v) = html5(name) {
                    out.push_str(v);
                } else {
                    // longest prefix of at least 2 characters (and shorter than the name)
                    let cuts: Vec<usize> = name.char_indices().map(|(k, _)| k).skip(2).collect();
                    match cuts.iter().rev().find_map(|&k| html5(&name[..k]).map(|v| (k, v))) {
                        Some((k, v)) => {
                            out.push_str(v);
                            out.push_str(&name[k..]);
                        }
                        None => {
                            out.push('&');
                            out.push_str(name);
                        }
                    }
                }
                end = Some(e);
            }
        }
        match end {
            Some(e) => {
                last = amp + 1 + e;
                i = last;
            }
            None => i = amp + 1,
        }
        if i >= bytes.len() {
            break;
        }
    }
    if last == 0 && out.is_empty() {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[last..]);
    Cow::Owned(out)
}
