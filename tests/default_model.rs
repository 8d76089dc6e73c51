//! Semantic checks of the shipped default model (models/coca-scenes) through our runtime, on
//! the committed held-out scenes (tests/fixtures/scenes, written by
//! models/train/make_heldout.py from the same generator as the training data, other seeds).
//!
//! The truth comes from the generator, never from our output: a preprocessing, tokenizer or
//! decoding bug shows up here as wrong labels and wrong captions. Thresholds are the issue's
//! (the default-model issue's): zero-shot color and shape >= 95%, position >= 85%, greedy captions
//! exact >= 80% (a caption is exact when it is one of the generator's phrasings of the scene) on
//! the in-distribution split; count and size, which the issue gives none, have floors under their
//! measured values.
//! The model card (models/coca-scenes/README.md) quotes the numbers this test prints.

mod common;
use common::root;

use std::collections::BTreeMap;

use coca_edge::caption::{CaptionOptions, Search};
use coca_edge::classify::Templates;
use coca_edge::{Pipeline, PipelineOptions};
use serde_json::Value;

fn truth() -> Value {
    serde_json::from_slice(&std::fs::read(root().join("tests/fixtures/scenes/truth.json")).unwrap()).unwrap()
}

fn pipeline() -> Pipeline {
    Pipeline::open(root().join(coca_edge::DEFAULT_BUNDLE), PipelineOptions::default()).unwrap()
}

/// (split, metric) -> (correct, total)
type Tally = BTreeMap<(String, String), (usize, usize)>;

fn add(t: &mut Tally, split: &str, metric: &str, ok: bool) {
    let e = t.entry((split.to_string(), metric.to_string())).or_default();
    e.0 += usize::from(ok);
    e.1 += 1;
}

fn rate(t: &Tally, split: &str, metric: &str) -> f64 {
    let (ok, n) = t[&(split.to_string(), metric.to_string())];
    ok as f64 / n as f64
}

fn value_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn pipeline_at(precision: &str) -> Pipeline {
    let mut opts = PipelineOptions::default();
    opts.engine.precision = precision.to_string();
    Pipeline::open(root().join(coca_edge::DEFAULT_BUNDLE), opts).unwrap()
}

/// Zero-shot and greedy-caption tallies of `p` on the held-out scenes, with up to 12 wrong
/// captions for the log.
fn evaluate(p: &Pipeline) -> (Tally, Vec<String>) {
    let t = truth();
    let items = t["items"].as_array().unwrap();
    assert!(items.len() >= 300, "held-out set too small");

    // zero-shot label sets, one per attribute, from the generator's prompt spec
    let mut sets = Vec::new();
    for (attr, spec) in t["zero_shot"].as_object().unwrap() {
        let labels: Vec<String> = spec["labels"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        let values: Vec<String> = spec["values"].as_array().unwrap().iter().map(value_str).collect();
        let templates: Vec<&str> = spec["templates"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let templates = Templates::parse(&templates.join("\n"), attr).unwrap();
        let set = p.label_set(&labels, &templates, |_, _| {}).unwrap();
        sets.push((attr.clone(), labels, values, set));
    }

    let greedy = CaptionOptions { search: Search::Greedy, ..Default::default() };
    let mut tally = Tally::new();
    let mut wrong_captions = Vec::new();
    for it in items {
        let split = it["split"].as_str().unwrap();
        let f = p.embed_path(&root().join("tests/fixtures/scenes").join(it["file"].as_str().unwrap())).unwrap();
        for (attr, labels, values, set) in &sets {
            let top = &p.classify(&f, set, 1).unwrap()[0];
            let ix = labels.iter().position(|l| *l == top.label).unwrap();
            add(&mut tally, split, &format!("zero-shot {attr}"), values[ix] == value_str(&it[attr.as_str()]));
        }
        let cap = p.caption(&f, &greedy, |_, _| {}).unwrap();
        let valid: Vec<&str> = it["valid_captions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let exact = valid.contains(&cap.text.as_str());
        add(&mut tally, split, "caption exact", exact);
        if !exact && wrong_captions.len() < 12 {
            wrong_captions.push(format!("{}: '{}' (truth '{}')", it["file"].as_str().unwrap(), cap.text, valid[0]));
        }
        // word accuracy against the canonical caption, position by position
        let truth_words: Vec<&str> = valid[0].split_whitespace().collect();
        let got: Vec<&str> = cap.text.split_whitespace().collect();
        for (k, w) in truth_words.iter().enumerate() {
            add(&mut tally, split, "caption word", got.get(k) == Some(w));
        }
    }
    (tally, wrong_captions)
}

fn print_tally(title: &str, tally: &Tally) {
    eprintln!("{title}");
    eprintln!("{:<22} {:>8} {:>8}", "metric", "test", "novel");
    let metrics: Vec<String> = tally.keys().map(|(_, m)| m.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for m in &metrics {
        let cell = |s: &str| tally.get(&(s.to_string(), m.clone())).map(|&(ok, n)| format!("{:.1}%", 100.0 * ok as f64 / n as f64)).unwrap_or_default();
        eprintln!("{m:<22} {:>8} {:>8}", cell("test"), cell("novel"));
    }
}

/// The f32 evaluation, made once per test binary and shared by the tests that need it (under
/// emulation in CI one evaluation takes minutes).
fn f32_evaluation() -> &'static (Tally, Vec<String>) {
    static F32: std::sync::OnceLock<(Tally, Vec<String>)> = std::sync::OnceLock::new();
    F32.get_or_init(|| evaluate(&pipeline()))
}

#[test]
fn default_model_classifies_and_captions_held_out_scenes() {
    let (tally, wrong_captions) = f32_evaluation();
    print_tally("held-out scenes through the Rust runtime (f32, greedy captions):", tally);
    for w in wrong_captions.iter() {
        eprintln!("  wrong caption: {w}");
    }

    // the thresholds, and floors under the measured values of the attributes it
    // names none for (count 98.8%, size 93.6% when the model was trained)
    let checks = [
        ("zero-shot color", 0.95),
        ("zero-shot shape", 0.95),
        ("zero-shot position", 0.85),
        ("caption exact", 0.80),
        ("zero-shot count", 0.95),
        ("zero-shot size", 0.90),
    ];
    let failed: Vec<String> = checks
        .iter()
        .filter(|(m, min)| rate(tally, "test", m) < *min)
        .map(|(m, min)| format!("{m}: {:.1}% < {:.0}%", 100.0 * rate(tally, "test", m), 100.0 * min))
        .collect();
    assert!(failed.is_empty(), "default model below its thresholds on the held-out test split: {failed:?}");
}

/// The int8 variant of the shipped model (models/export/quantize.py) keeps every held-out
/// metric within 1 point of f32 (the int8/fp16 issue's bar), through the same runtime.
#[test]
fn int8_variant_keeps_held_out_accuracy_within_one_point() {
    // int8 first: the f32 evaluation runs meanwhile in the other test, on the other core
    let (int8_tally, _) = evaluate(&pipeline_at("int8"));
    let (f32_tally, _) = f32_evaluation();
    print_tally("held-out scenes, int8 image encoder and decoder step:", &int8_tally);
    let mut worse = Vec::new();
    for (key, _) in f32_tally.iter().filter(|((split, _), _)| split == "test") {
        let (a, b) = (rate(f32_tally, &key.0, &key.1), rate(&int8_tally, &key.0, &key.1));
        eprintln!("  {:<22} f32 {:.1}%  int8 {:.1}%", key.1, 100.0 * a, 100.0 * b);
        if b < a - 0.01 {
            worse.push(format!("{}: int8 {:.1}% vs f32 {:.1}%", key.1, 100.0 * b, 100.0 * a));
        }
    }
    assert!(worse.is_empty(), "int8 loses more than 1 point on the held-out test split: {worse:?}");
}

#[test]
fn default_model_refuses_words_it_cannot_spell() {
    let p = pipeline();
    let labels = vec!["red circle".to_string(), "golden retriever".to_string()];
    let e = p.label_set(&labels, &p.default_templates().unwrap(), |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("golden") && e.contains("retriever") && e.contains("not in the vocabulary"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    // the model's own template is used by default, and spelled by its vocabulary
    assert_eq!(p.default_templates().unwrap().as_slice(), ["a photo of a {}."]);
    assert!(p.label_set(&labels[..1], &p.default_templates().unwrap(), |_, _| {}).is_ok());
}

/// The stream job on the shipped sample clip: `coca stream examples/scenes.mjpeg`, every frame,
/// greedy captions every 6 frames, color labels. The truth of every frame is in
/// examples/scenes.json (written with the clip by models/train/make_clip.py).
#[test]
fn stream_on_the_sample_clip_says_what_is_on_screen() {
    let clip = root().join("examples/scenes.mjpeg");
    let truth: Value = serde_json::from_slice(&std::fs::read(root().join("examples/scenes.json")).unwrap()).unwrap();
    let frames = truth["frames"].as_array().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let model = root().join(coca_edge::DEFAULT_BUNDLE);
    let out = common::coca_command()
        .env("COCA_CACHE_DIR", cache.path())
        .args(["--model", model.to_str().unwrap(), "stream", clip.to_str().unwrap()])
        .args(["--labels", "red shape,green shape,blue shape,yellow shape,purple shape,orange shape,white shape,black shape"])
        .args(["--top", "1", "--every-frame", "--caption-every", "6", "--sampling", "greedy"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), frames.len() + 1, "one line per frame and a summary");
    let (mut color_ok, mut shown, mut cap_ok, mut caps, mut cap_color_pos) = (0, 0, 0, 0, 0);
    for l in &lines[..frames.len()] {
        let i = l["frame"].as_u64().unwrap() as usize;
        let Some(t) = frames[i].as_object() else { continue };
        shown += 1;
        color_ok += usize::from(l["labels"][0]["label"].as_str().unwrap() == format!("{} shape", t["color"].as_str().unwrap()));
        if let Some(c) = l["caption"].as_str() {
            caps += 1;
            let truth = t["caption"].as_str().unwrap();
            let ok = c == truth;
            cap_ok += usize::from(ok);
            // count, size and color (the first three words) and the position phrase (the end)
            let (w, tw): (Vec<&str>, Vec<&str>) = (c.split_whitespace().collect(), truth.split_whitespace().collect());
            cap_color_pos += usize::from(w.len() >= 5 && w[..3] == tw[..3] && w[w.len() - 2..] == tw[tw.len() - 2..]);
            if !ok {
                eprintln!("  frame {i}: '{c}' (truth '{}')", t["caption"].as_str().unwrap());
            }
        }
    }
    eprintln!(
        "sample clip: color label right on {color_ok}/{shown} frames with objects; captions exact {cap_ok}/{caps}, \
         count+size+color+position right {cap_color_pos}/{caps}"
    );
    assert!(caps >= 30, "{caps} captions");
    assert!(color_ok as f64 >= 0.95 * shown as f64, "color labels: {color_ok}/{shown}");
    assert!(cap_color_pos as f64 >= 0.8 * caps as f64, "captions' count, size, color and position: {cap_color_pos}/{caps}");
    // shapes are the model's weak point (see its card): a floor, not the held-out threshold
    assert!(cap_ok as f64 >= 0.75 * caps as f64, "exact captions: {cap_ok}/{caps}");
}
