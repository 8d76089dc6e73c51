//! Captions token-identical to open_clip 3.3.0's generate() (goldens from PyTorch:
//! tests/fixtures/goldens/make_goldens.py), and clear errors for bad caption requests.
//!
//! Near ties: where the reference's own top-2 logits at a greedy step differ by less than 1e-4,
//! a different token there is accepted (our logits differ from PyTorch's by ~1e-6). The
//! committed goldens have no such step (smallest margin is recorded in the goldens), so every
//! greedy sequence must match exactly. Beam search is compared exactly.

mod common;

use std::path::PathBuf;

use coca_edge::caption::{CaptionOptions, Search};
use coca_edge::{Pipeline, PipelineOptions};
use serde_json::Value;

const NEAR_TIE: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn goldens() -> Value {
    serde_json::from_slice(&std::fs::read(root().join("tests/fixtures/goldens/goldens.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn greedy_and_beam_captions_match_open_clip_generate() {
    let g = goldens();
    let p = Pipeline::open(root().join(coca_edge::TEST_BUNDLE), PipelineOptions::default()).unwrap();
    let cases = g["captions"].as_array().unwrap();
    assert!(cases.len() >= 6);
    let mut failures = Vec::new();
    let (mut eot_endings, mut streamed) = (0, 0);
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let f = p.embed_path(&root().join("tests/fixtures/images").join(file)).unwrap();
        // greedy
        let want = ids(&c["greedy"]);
        let margins: Vec<f64> = c["greedy_top2_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let o = CaptionOptions { search: Search::Greedy, ..Default::default() };
        let got = p.caption(&f, &o, |_, _| streamed += 1).unwrap();
        if got.ids != want {
            let first = got.ids.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.ids.len().min(want.len()));
            let tie = first >= 1 && margins.get(first - 1).map(|m| *m < NEAR_TIE).unwrap_or(false);
            if !tie {
                failures.push(format!("{file} greedy: first difference at {first}: {:?} vs open_clip {:?}", got.ids, want));
            } else {
                eprintln!("{file} greedy: accepted a different token at {first} (reference top-2 margin < {NEAR_TIE})");
            }
        }
        assert_eq!(got.text, c["greedy_text"].as_str().unwrap(), "{file}: greedy text");
        // default beam search (6 beams, 3 groups)
        let want = ids(&c["beam"]);
        let got = p.caption(&f, &CaptionOptions::default(), |_, _| {}).unwrap();
        if got.ids != want {
            failures.push(format!("{file} beam: {:?} vs open_clip {:?}", got.ids, want));
        }
        eot_endings += (want.last() == Some(&49407) && want.len() < 30) as usize;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(eot_endings >= 3, "goldens should exercise beam search's finishing path");
    assert!(streamed > 0, "greedy streams its tokens");
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let p = Pipeline::open(root().join(coca_edge::TEST_BUNDLE), PipelineOptions::default()).unwrap();
    let f = p.embed_path(&root().join("tests/fixtures/images/chelsea.png")).unwrap();
    let o = CaptionOptions { search: Search::TopK { k: 20 }, seed: 7, ..Default::default() };
    let a = p.caption(&f, &o, |_, _| {}).unwrap();
    let b = p.caption(&f, &o, |_, _| {}).unwrap();
    assert_eq!(a, b);
    let c = p.caption(&f, &CaptionOptions { seed: 8, ..o.clone() }, |_, _| {}).unwrap();
    assert_ne!(a.ids, c.ids, "another seed, another caption");
    let o = CaptionOptions { search: Search::TopP { p: 0.9 }, temperature: 0.7, seed: 1, ..Default::default() };
    assert_eq!(p.caption(&f, &o, |_, _| {}).unwrap().ids[0], 49406);
}

fn coca(args: &[&str]) -> std::process::Output {
    let cache = tempfile::tempdir().unwrap();
    common::coca_command().args(args).env("COCA_CACHE_DIR", cache.path()).output().unwrap()
}

fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "expected '{needle}' in {stderr}");
}

#[test]
fn caption_cli_json_and_bad_requests() {
    let img = root().join("tests/fixtures/images/flower.jpg");
    let img = img.to_str().unwrap();
    let out = coca(&["caption", img, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = goldens()["captions"].as_array().unwrap().iter().find(|c| c["file"] == "flower.jpg").unwrap().clone();
    assert_eq!(v["ids"], c["beam"]);
    assert_eq!(v["caption"], c["beam_text"]);
    assert_one_line_error(&coca(&["caption", img, "--max-tokens", "0"]), "max tokens 0");
    assert_one_line_error(&coca(&["caption", img, "--beams", "0"]), "0 beams");
    assert_one_line_error(&coca(&["caption", img, "--beams", "10000"]), "10000 beams");
    assert_one_line_error(&coca(&["caption", img, "--beams", "6", "--beam-groups", "4"]), "must divide");
}

#[test]
fn a_bundle_without_decoder_graphs_cannot_caption() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    std::fs::create_dir(&b).unwrap();
    for e in std::fs::read_dir(root().join(coca_edge::TEST_BUNDLE)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), b.join(e.file_name())).unwrap();
    }
    let mp = b.join("coca.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("decoder");
    m["graphs"].as_object_mut().unwrap().remove("decoder_step");
    m["graphs"].as_object_mut().unwrap().remove("cross_kv");
    std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
    let img = root().join("tests/fixtures/images/flower.jpg");
    let out = coca(&["--model", b.to_str().unwrap(), "caption", img.to_str().unwrap()]);
    assert_one_line_error(&out, "cannot caption");
    // the rest of the bundle still works
    let out = coca(&["--model", b.to_str().unwrap(), "embed", img.to_str().unwrap()]);
    assert!(out.status.success());
}

/// A manifest whose decoder dims promise more than the graph holds (positions or vocabulary)
/// is refused when the decoder loads, in one line naming the manifest field, not with a panic
/// in the embedding lookup of a later step (hardening issue, finding 1; part of 14).
#[test]
fn decoder_dims_beyond_the_graph_are_refused_at_load() {
    for (field, value, want) in [("max_positions", 200u64, "decoder.max_positions is 200"), ("vocab_size", 1_000_000_000, "decoder.vocab_size is 1000000000")] {
        let tmp = tempfile::tempdir().unwrap();
        let b = tmp.path().join("b");
        std::fs::create_dir(&b).unwrap();
        for e in std::fs::read_dir(root().join("models/coca-scenes")).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), b.join(e.file_name())).unwrap();
            }
        }
        let mp = b.join("coca.json");
        let mut m: Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
        m["decoder"][field] = Value::from(value);
        std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
        let img = root().join("tests/fixtures/images/flower.jpg");
        // (min tokens past the real 17 positions: the old failure was a panic at position 17)
        let min = if field == "max_positions" { "25" } else { "5" };
        let out = coca(&["--model", b.to_str().unwrap(), "caption", "--min-tokens", min, img.to_str().unwrap()]);
        assert_one_line_error(&out, want);
    }
}

#[test]
fn describe_gives_labels_caption_and_timings_from_one_pass() {
    let img = root().join("tests/fixtures/images/chelsea.png");
    let tmp = tempfile::tempdir().unwrap();
    let out = common::coca_command()
        .args(["describe", img.to_str().unwrap(), "--labels", "cat,dog", "--json", "--sampling", "greedy"])
        .env("COCA_CACHE_DIR", tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = goldens()["captions"].as_array().unwrap().iter().find(|c| c["file"] == "chelsea.png").unwrap().clone();
    assert_eq!(v["ids"], c["greedy"]);
    assert_eq!(v["top"].as_array().unwrap().len(), 2);
    assert!(v["timings"]["encoder_ms"].as_f64().unwrap() > 0.0);
}

/// The in-place cache (our rewritten step: a row table, no copies) against the exported graph run
/// by tract alone (its caches copied at each step), through what beam search does to a cache: a
/// shared prompt tiled over the beams, reorders that duplicate and drop beams, a padded token
/// masked in later steps. The logits agree to float rounding at every step, and the in-place
/// path is the one taken by default.
#[test]
fn in_place_kv_cache_matches_the_exported_graph_through_tiles_and_reorders() {
    use coca_edge::bundle::Bundle;
    use coca_edge::model::{Decoder, EngineOptions};
    for dir in [coca_edge::TEST_BUNDLE, "models/coca-scenes"] {
        let bundle = Bundle::open(root().join(dir)).unwrap();
        let ours = Decoder::load(&bundle, &EngineOptions { threads: 1, tract_ops: false, ..EngineOptions::default() }).unwrap();
        let tract = Decoder::load(&bundle, &EngineOptions { threads: 1, tract_ops: true, ..EngineOptions::default() }).unwrap();
        assert!(ours.cache_in_place() && !tract.cache_in_place(), "{dir}");
        let m = bundle.manifest();
        let n = m.dims.caption_tokens * m.dims.token_dim;
        let tokens: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.7).collect();
        let (xa, xb) = (ours.cross_kv(&tokens).unwrap(), tract.cross_kv(&tokens).unwrap());
        let beams = 4;
        let (mut a, mut b) = (ours.empty_cache(1), tract.empty_cache(1));
        // the prompt once, then tiled
        let vocab = ours.dims().vocab_size as i64;
        let first = |d: &Decoder, c: &mut _, x| d.step(c, &[vocab - 2], 1, &[0.0], x).unwrap();
        let (la, lb) = (first(&ours, &mut a, &xa), first(&tract, &mut b, &xb));
        close(&la, &lb, dir, 0);
        ours.tile(&mut a, beams).unwrap();
        tract.tile(&mut b, beams).unwrap();
        let mut masks: Vec<Vec<f32>> = vec![vec![0.0]; beams];
        let orders = [[0, 1, 2, 3], [1, 1, 0, 3], [3, 2, 2, 0], [0, 0, 0, 0], [2, 3, 1, 0], [1, 0, 3, 3]];
        for (step, order) in orders.iter().enumerate() {
            // beam 2 emits the pad id 0 at step 1: its next key is masked from then on
            let ids: Vec<i64> = (0..beams).map(|i| if step == 1 && i == 2 { 0 } else { (7 + 5 * (step * beams + i) as i64) % vocab }).collect();
            for (i, m) in masks.iter_mut().enumerate() {
                m.push(if step == 2 && i == 2 { f32::NEG_INFINITY } else { 0.0 });
            }
            let mask: Vec<f32> = masks.concat();
            let la = ours.step(&mut a, &ids, 1, &mask, &xa).unwrap();
            let lb = tract.step(&mut b, &ids, 1, &mask, &xb).unwrap();
            close(&la, &lb, dir, step + 1);
            ours.reorder(&mut a, order).unwrap();
            tract.reorder(&mut b, order).unwrap();
            masks = order.iter().map(|&o| masks[o].clone()).collect();
        }
        assert_eq!(a.past(), b.past());
        // a token id past the vocabulary is an error, not a panic in the embedding lookup
        let mut c = ours.empty_cache(1);
        let err = ours.step(&mut c, &[vocab], 1, &[0.0], &xa).unwrap_err().to_string();
        assert!(err.contains("outside the decoder's vocabulary"), "{err}");
    }

    fn close(a: &[f32], b: &[f32], dir: &str, step: usize) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4 * scale.max(1.0), "{dir} step {step}: logits differ by {worst} (scale {scale})");
    }
}
