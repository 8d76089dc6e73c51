//! Heads on the shipped default model: a linear probe from 10 images per class beats zero-shot
//! labels by at least 15 points on the robot's new objects (the (color, shape) pairs the model
//! never saw, named by shape), as docs/heads.md reports; the CLI trains, evaluates and applies
//! heads beside zero-shot labels; every bad input is a clear error or a counted warning.

mod common;

use std::path::{Path, PathBuf};

use coca_edge::classify::Templates;
use coca_edge::head::data::Dataset;
use coca_edge::head::{HeadKind, TrainOptions};
use coca_edge::{Pipeline, PipelineOptions};

fn root() -> PathBuf {
    common::root()
}

fn default_model() -> Pipeline {
    Pipeline::open(root().join(coca_edge::DEFAULT_BUNDLE), PipelineOptions::default()).unwrap()
}

fn first_n(mut ds: Dataset, n: usize) -> Dataset {
    let mut seen = vec![0; ds.classes.len()];
    ds.items.retain(|(_, k)| {
        seen[*k] += 1;
        seen[*k] <= n
    });
    ds
}

/// (probe accuracy, zero-shot accuracy) on a task's test list.
fn probe_vs_zero_shot(task: &str, shots: usize) -> (f32, f32) {
    let p = default_model();
    let dir = root().join("tests/fixtures/heads").join(task);
    let train = first_n(Dataset::scan(&dir.join("train")).unwrap(), shots);
    assert_eq!(train.items.len(), shots * train.classes.len());
    let (head, report, _) = p.train_head(&train, &TrainOptions::default(), |_, _| {}).unwrap();
    assert_eq!(report.kind, HeadKind::Linear);
    let test = Dataset::scan(&dir.join("test.tsv")).unwrap();
    let emb = p.embed_dataset(&test, |_, _| {}).unwrap();
    assert!(emb.skipped.is_empty());
    // the test list names the same classes (maybe in another order)
    let to_head: Vec<usize> = test.classes.iter().map(|c| head.classes.iter().position(|h| h == c).unwrap()).collect();
    let zs = p.label_set(&head.classes, &Templates::parse("a photo of a {}.", "t").unwrap(), |_, _| {}).unwrap();
    let (mut probe_ok, mut zs_ok) = (0, 0);
    for (x, &y) in emb.x.iter().zip(&emb.y) {
        probe_ok += (head.classify(x, 1).unwrap()[0].index == to_head[y]) as usize;
        zs_ok += (zs.classify(x, p.bundle().manifest().logit_scale, 1).unwrap()[0].index == to_head[y]) as usize;
    }
    let n = emb.x.len() as f32;
    (probe_ok as f32 / n, zs_ok as f32 / n)
}

#[test]
fn a_ten_shot_probe_beats_zero_shot_by_15_points_on_new_objects() {
    let (probe, zs) = probe_vs_zero_shot("novel", 10);
    eprintln!("new objects, 10 shots: linear probe {:.1}%, zero-shot {:.1}%", probe * 100.0, zs * 100.0);
    // docs/heads.md: 94.0% vs 44.0% (150 images); small slack for other CPUs' float order
    assert!(probe >= 0.91, "10-shot probe {probe}");
    assert!(probe - zs >= 0.15, "probe {probe} vs zero-shot {zs}");
}

fn coca(args: &[&str]) -> std::process::Output {
    common::coca_command().args(["--model", root().join(coca_edge::DEFAULT_BUNDLE).to_str().unwrap()]).args(args).output().unwrap()
}

fn one_line_error(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

fn copy_class(from: &Path, to: &Path, n: usize) {
    std::fs::create_dir_all(to).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(from).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.into_iter().take(n) {
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

#[test]
fn cli_trains_evaluates_and_applies_a_head_beside_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = root().join("tests/fixtures/heads/novel/train");
    for c in ["circle", "star", "heart"] {
        copy_class(&src.join(c), &data.join(c), 6);
    }
    // an unreadable image inside a class is skipped and counted, never fatal
    std::fs::write(data.join("star/broken.jpg"), b"not a jpeg").unwrap();
    let head = tmp.path().join("head.json");
    let out = coca(&["head", "train", "--data", data.to_str().unwrap(), "--out", head.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["kind"], "linear");
    assert_eq!(r["skipped"], 1);
    assert_eq!(r["images_per_class"], serde_json::json!([6, 6, 6]));
    assert!(r["cv_accuracy"].as_f64().unwrap() > 0.5, "{r}");
    assert_eq!(r["confusion"].as_array().unwrap().len(), 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 1 unreadable image"));
    assert!(r["bytes"].as_u64().unwrap() < 100_000);
    // the second run finds every embedding in the cache (tests share the user's cache unless
    // COCA_CACHE_DIR says otherwise; either way the first run filled it)
    let out = coca(&["head", "train", "--data", data.to_str().unwrap(), "--out", head.to_str().unwrap(), "--json"]);
    let r2: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r2["cached_embeddings"], 18);
    assert_eq!(r2["cv_accuracy"], r["cv_accuracy"], "the same head from cached embeddings");

    // eval on the held-out new objects of those classes
    let list = tmp.path().join("test.tsv");
    let scenes = root().join("tests/fixtures/scenes");
    let truth: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(scenes.join("truth.json")).unwrap()).unwrap();
    let lines: Vec<String> = truth["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["split"] == "novel" && ["circle", "star", "heart"].contains(&i["shape"].as_str().unwrap()))
        .map(|i| format!("{}\t{}", i["shape"].as_str().unwrap(), scenes.join(i["file"].as_str().unwrap()).display()))
        .collect();
    std::fs::write(&list, lines.join("\n")).unwrap();
    let out = coca(&["head", "eval", "--head", head.to_str().unwrap(), "--data", list.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["images"].as_u64().unwrap() as usize, lines.len());
    assert!(e["accuracy"].as_f64().unwrap() > 0.7, "{e}");

    // classify with the head and zero-shot labels: one pass, both answers
    let img =
        scenes.join(truth["items"].as_array().unwrap().iter().find(|i| i["split"] == "novel" && i["shape"] == "heart").unwrap()["file"].as_str().unwrap());
    let out = coca(&["classify", img.to_str().unwrap(), "--head", head.to_str().unwrap(), "--labels", "circle,star,heart", "--json", "--top-k", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["top"].as_array().unwrap().len(), 3);
    assert_eq!(v["head"].as_array().unwrap().len(), 3);
    assert_eq!(v["head"][0]["label"], "heart", "{v}");
    // the head alone
    let out = coca(&["classify", img.to_str().unwrap(), "--head", head.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("top").is_none() && v["head"].is_array(), "{v}");

    // a head for another bundle, a corrupt head
    let out = common::coca_command().args(["classify", img.to_str().unwrap(), "--head", head.to_str().unwrap()]).output().unwrap();
    one_line_error(&out, "trained on bundle");
    let text = std::fs::read_to_string(&head).unwrap();
    std::fs::write(&head, &text[..text.len() / 3]).unwrap();
    one_line_error(&coca(&["classify", img.to_str().unwrap(), "--head", head.to_str().unwrap()]), "not a head file");
    one_line_error(&coca(&["stream", img.to_str().unwrap(), "--head", head.to_str().unwrap()]), "not a head file");
}

#[test]
fn bad_training_data_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("tests/fixtures/heads/novel/train");
    let out = |d: &Path, extra: &[&str]| {
        let mut args = vec!["head", "train", "--data", d.to_str().unwrap(), "--out"];
        let o = tmp.path().join("h.json");
        let o = o.to_str().unwrap().to_string();
        args.push(&o);
        args.extend_from_slice(extra);
        coca(&args)
    };
    // one class only
    let one = tmp.path().join("one");
    copy_class(&src.join("circle"), &one.join("circle"), 3);
    one_line_error(&out(&one, &[]), "at least 2 classes, found 1");
    // an empty class folder
    std::fs::create_dir_all(one.join("star")).unwrap();
    one_line_error(&out(&one, &[]), "class 'star' has no images");
    // a class whose every image is unreadable
    std::fs::write(one.join("star/a.jpg"), b"junk").unwrap();
    one_line_error(&out(&one, &[]), "class 'star': none of its images could be read");
    // one image in a class: a linear probe is refused, the prototype head works
    copy_class(&src.join("star"), &one.join("star"), 1);
    std::fs::remove_file(one.join("star/a.jpg")).unwrap();
    one_line_error(&out(&one, &["--kind", "linear"]), "class 'star' has 1 image");
    let o = out(&one, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("prototype head"));
    // a missing folder, a bad list file, bad numbers
    one_line_error(&out(&tmp.path().join("nope"), &[]), "nope");
    let list = tmp.path().join("list.tsv");
    std::fs::write(&list, "circle no-tab-here.jpg\n").unwrap();
    one_line_error(&out(&list, &[]), "list.tsv:1: expected CLASS<TAB>PATH");
    one_line_error(&out(&one, &["--shots", "0"]), "--shots");
    one_line_error(&out(&one, &["--folds", "1"]), "--folds");
}

/// The attentional-pooler head (trained in PyTorch on frozen tokens, models/train/
/// train_ap_head.py) runs in our runtime with PyTorch's logits within 1e-4, and classifies the
/// new objects as the script measured (docs/heads.md).
#[test]
fn attentional_pooler_head_matches_pytorch() {
    let p = default_model();
    let dir = root().join("tests/fixtures/heads/novel");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("ap_golden.json")).unwrap()).unwrap();
    let head = p.load_head(&dir.join(golden["head"].as_str().unwrap())).unwrap();
    assert_eq!(head.kind, HeadKind::AttentionalPooler);
    let tol = golden["tolerance"].as_f64().unwrap() as f32;
    let mut worst = 0f32;
    for (img, want) in golden["images"].as_array().unwrap().iter().zip(golden["logits"].as_array().unwrap()) {
        let f = p.embed_path(&dir.join(img.as_str().unwrap())).unwrap();
        let got = head.graph_logits(&f).unwrap();
        let want: Vec<f32> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len());
        worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    eprintln!("attentional-pooler head: worst |logit - PyTorch| = {worst:.2e}");
    assert!(worst <= tol, "{worst} > {tol}");
    // accuracy through the runtime on the held-out new objects
    let test = Dataset::scan(&dir.join("test.tsv")).unwrap();
    let mut ok = 0;
    for (path, k) in &test.items {
        let f = p.embed_path(path).unwrap();
        ok += (head.classify_features(&f, 1).unwrap()[0].label == test.classes[*k]) as usize;
    }
    let acc = ok as f32 / test.items.len() as f32;
    eprintln!("attentional-pooler head, 10 shots, new objects: {:.1}%", acc * 100.0);
    assert!(acc >= 0.92, "{acc}");
    // a damaged graph is refused by its hash
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("ap_head.json"), tmp.path().join("ap_head.json")).unwrap();
    std::fs::write(tmp.path().join("ap_head.onnx"), b"not onnx").unwrap();
    let e = p.load_head(&tmp.path().join("ap_head.json")).unwrap_err().to_string();
    assert!(e.contains("sha256"), "{e}");
    // and a bundle without frozen tokens cannot use it
    let other = Pipeline::open(root().join(coca_edge::TEST_BUNDLE), PipelineOptions::default()).unwrap();
    assert!(other.load_head(&dir.join("ap_head.json")).is_err());
}
