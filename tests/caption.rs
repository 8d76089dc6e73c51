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
