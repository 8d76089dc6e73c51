//! Parity with the Python reference: every number here was computed by open_clip 3.3.0 /
//! PyTorch (tests/fixtures/goldens/make_goldens.py), never by this crate.
//!
//! Tolerances (absolute, per value):
//! - CLOSE (1e-5): the graph alone, fed PyTorch's own preprocessed tensor.
//! - APPROX (1e-4): end to end (our decoding + preprocessing + graph) vs open_clip's PIL path.

use std::path::{Path, PathBuf};

use coca_edge::classify::Templates;
use coca_edge::{Pipeline, PipelineOptions};
use serde_json::Value;

const CLOSE: f32 = 1e-5;
const APPROX: f32 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn goldens() -> Value {
    let p = root().join("tests/fixtures/goldens/goldens.json");
    serde_json::from_slice(&std::fs::read(&p).expect("goldens.json")).expect("goldens.json parses")
}

fn pipeline() -> Pipeline {
    // no label cache: every run recomputes from the graphs
    Pipeline::open(root().join(coca_edge::TEST_BUNDLE), PipelineOptions::default()).expect("test bundle opens")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).expect("f32 file").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn goldens_were_made_for_the_committed_bundle() {
    let g = goldens();
    let m: Value = serde_json::from_slice(&std::fs::read(root().join(coca_edge::TEST_BUNDLE).join("coca.json")).unwrap()).unwrap();
    for (name, sha) in g["bundle_files"].as_object().unwrap() {
        assert_eq!(&m["files"][name]["sha256"], sha, "{name} changed since the goldens were made: rerun make_goldens.py");
    }
}

#[test]
fn image_embeddings_and_tokens_match_pytorch_end_to_end() {
    let g = goldens();
    let p = pipeline();
    let mut failures = Vec::new();
    let mut worst = (0.0f32, 0.0f32);
    for im in g["images"].as_array().unwrap() {
        let file = im["file"].as_str().unwrap();
        let f = p.embed_path(&root().join("tests/fixtures/images").join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let de = max_abs_diff(&f.embedding, &floats(&im["embedding"]));
        let tokens = read_f32(&root().join("tests/fixtures/goldens").join(format!("{file}.tokens.f32")));
        let dt = max_abs_diff(&f.tokens, &tokens);
        worst = (worst.0.max(de), worst.1.max(dt));
        if de > APPROX || dt > APPROX {
            failures.push(format!("{file} ({}): embedding {de:.2e}, tokens {dt:.2e}", im["mode"]));
        }
    }
    eprintln!("worst end-to-end diff: embedding {:.2e}, tokens {:.2e}", worst.0, worst.1);
    assert!(failures.is_empty(), "over {APPROX:e}:\n{}", failures.join("\n"));
}

#[test]
fn graph_alone_matches_pytorch_on_its_preprocessed_tensor() {
    let g = goldens();
    let p = pipeline();
    let pre = root().join("tests/fixtures/preprocess");
    let mut checked = 0;
    for im in g["images"].as_array().unwrap() {
        let file = im["file"].as_str().unwrap();
        let t = pre.join(format!("{file}.f32"));
        if !t.exists() {
            continue;
        }
        let f = p.embed_preprocessed(&read_f32(&t)).unwrap();
        let de = max_abs_diff(&f.embedding, &floats(&im["embedding"]));
        let tokens = read_f32(&root().join("tests/fixtures/goldens").join(format!("{file}.tokens.f32")));
        let dt = max_abs_diff(&f.tokens, &tokens);
        assert!(de <= CLOSE && dt <= CLOSE, "{file}: embedding {de:.2e}, tokens {dt:.2e} over {CLOSE:e}");
        checked += 1;
    }
    assert!(checked >= 2, "expected preprocessed tensors for at least 2 images, found {checked}");
}

#[test]
fn text_ids_and_embeddings_match_pytorch() {
    let g = goldens();
    let p = pipeline();
    let texts: Vec<String> = g["texts"].as_array().unwrap().iter().map(|t| t["text"].as_str().unwrap().to_string()).collect();
    let ids = p.tokenize(&texts);
    let ctx = p.bundle().manifest().text.context_length;
    for (i, t) in g["texts"].as_array().unwrap().iter().enumerate() {
        let want: Vec<i64> = t["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(&ids[i * ctx..(i + 1) * ctx], &want[..], "token ids of {:?}", texts[i]);
    }
    let emb = p.embed_texts(&texts).unwrap();
    for (i, t) in g["texts"].as_array().unwrap().iter().enumerate() {
        let d = max_abs_diff(&emb[i], &floats(&t["embedding"]));
        assert!(d <= APPROX, "text {:?}: {d:.2e}", texts[i]);
    }
}

#[test]
fn zero_shot_matches_open_clip_classifier() {
    let g = goldens();
    let p = pipeline();
    let labels: Vec<String> = g["labels"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let custom: Vec<String> = g["custom_templates"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    for (name, templates) in [("openai_imagenet", Templates::openai_imagenet()), ("custom", Templates::parse(&custom.join("\n"), "custom").unwrap())] {
        let zs = &g["zero_shot"][name];
        let set = p.label_set(&labels, &templates, |_, _| {}).unwrap();
        for (i, e) in zs["label_embeddings"].as_array().unwrap().iter().enumerate() {
            let d = max_abs_diff(set.embedding(i), &floats(e));
            assert!(d <= APPROX, "{name}: label {} embedding {d:.2e}", labels[i]);
        }
        for row in zs["images"].as_array().unwrap() {
            let file = row["file"].as_str().unwrap();
            let f = p.embed_path(&root().join("tests/fixtures/images").join(file)).unwrap();
            let scores = p.classify(&f, &set, labels.len()).unwrap();
            let top5: Vec<usize> = row["top5"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(scores[0].index, top5[0], "{name}/{file}: top-1 {} vs open_clip's {}", scores[0].label, labels[top5[0]]);
            let probs = floats(&row["probs"]);
            for s in &scores {
                assert!((s.probability - probs[s.index]).abs() <= 1e-3, "{name}/{file}: p({}) {} vs {}", s.label, s.probability, probs[s.index]);
            }
        }
    }
}
