//! The real `coca` binary: the main job works, and every bad input is one line on stderr and
//! exit code 2, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
fn bundle() -> PathBuf {
    root().join(coca_edge::TEST_BUNDLE)
}
fn image(name: &str) -> PathBuf {
    root().join("tests/fixtures/images").join(name)
}
fn bad(name: &str) -> PathBuf {
    root().join("tests/fixtures/bad").join(name)
}

fn coca(args: &[&dyn AsRef<std::ffi::OsStr>], cache: &Path) -> Output {
    let mut c = common::coca_command();
    c.env("COCA_CACHE_DIR", cache);
    for a in args {
        c.arg(a.as_ref());
    }
    c.output().expect("coca runs")
}

/// Exit 2, exactly one non-empty line on stderr that mentions `needle`, no panic.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    assert!(lines[0].starts_with("coca: "), "{stderr}");
    assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
}

/// `coca ARGS` that must succeed, its stdout parsed as JSON.
fn coca_json(args: &[&dyn AsRef<std::ffi::OsStr>], cache: &Path) -> serde_json::Value {
    let out = coca(args, cache);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn copy_bundle(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(bundle()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("coca.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&p, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

fn sha256(p: &Path) -> String {
    coca_edge::bundle::sha256_file(p).unwrap()
}

#[test]
fn classify_default_model_text_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image("chelsea.png");
    let out = coca(&[&"classify", &img, &"--labels", &"cat,dog,car", &"--top-k", &"2"], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    assert_eq!(s.lines().count(), 3, "{s}");
    // second run: labels come from the cache, same output
    let out = coca(&[&"classify", &img, &"--labels", &"cat,dog,car", &"--top-k", &"2", &"--json"], tmp.path());
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["top"].as_array().unwrap().len(), 2);
    assert!(std::fs::read_dir(tmp.path().join("labels")).unwrap().count() >= 1, "cache written");
}

#[test]
fn embed_prints_one_normalised_vector_per_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = coca(&[&"embed", &"--json", &image("chelsea.png"), &image("china.jpg")], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    for line in s.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let e: Vec<f64> = v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let n: f64 = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() < 1e-4, "norm {n}");
    }
    assert_eq!(s.lines().count(), 2);
}

#[test]
fn info_describes_the_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let v = coca_json(&[&"info", &"--json", &"--threads", &"1"], tmp.path());
    assert_eq!(v["threads"], 1);
    assert_eq!(v["precision"], "f32");
    assert!(v["graphs"].as_array().unwrap().len() >= 2);
}

#[test]
fn a_bad_image_among_good_ones_keeps_the_good_results() {
    let tmp = tempfile::tempdir().unwrap();
    let out = coca(&[&"embed", &image("chelsea.png"), &bad("empty.jpg"), &image("china.jpg")], tmp.path());
    assert_one_line_error(&out, "empty.jpg");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

#[test]
fn missing_bundle_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = coca(&[&"--model", &tmp.path().join("nope"), &"embed", &image("chelsea.png")], tmp.path());
    assert_one_line_error(&out, "model bundle folder not found");
    // the OS error's text once (it was printed twice: as the message and again as its source)
    assert_eq!(String::from_utf8_lossy(&out.stderr).matches("not found").count(), 1, "{}", String::from_utf8_lossy(&out.stderr));
}

/// A label with terminal control characters (ESC, BEL) is named in its error with them escaped:
/// nothing raw reaches the terminal (hardening finding 13).
#[test]
fn control_characters_in_labels_are_escaped_in_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // (the default model's small vocabulary refuses the word, naming the label)
    let model = common::root().join("models/coca-scenes");
    let out = coca(&[&"--model", &model, &"classify", &image("chelsea.png"), &"--labels", &"red,x\u{1b}[31my\u{7}z"], tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_one_line_error(&out, "\\u{1b}[31my");
    assert!(!stderr.contains('\u{1b}') && !stderr.contains('\u{7}'), "{stderr:?}");
}

/// A negative number given to a numeric option is refused as that option's bad value, without
/// clap's tip to write `-- -1` (which does not work for an option's value; hardening finding 19).
#[test]
fn negative_option_values_are_bad_values() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [vec!["--threads", "-1", "info"], vec!["caption", "--beams", "-3", "x.jpg"]] {
        let a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>).collect();
        let out = coca(&a, tmp.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("invalid value '-"), "{stderr}");
        assert!(!stderr.contains("tip:"), "{stderr}");
    }
}

/// A manifest naming a file outside the bundle folder (an absolute vocab path, `..`) is refused
/// before anything is opened (hardening finding 12).
#[test]
fn manifest_files_outside_the_bundle_are_refused() {
    for vocab in ["/etc/passwd", "../outside.txt.gz"] {
        let tmp = tempfile::tempdir().unwrap();
        let b = tmp.path().join("b");
        copy_bundle(&b);
        edit_manifest(&b, |m| {
            let old = m["text"]["vocab"].as_str().unwrap().to_string();
            let entry = m["files"][&old].clone();
            m["files"].as_object_mut().unwrap().insert(vocab.to_string(), entry);
            m["text"]["vocab"] = serde_json::Value::from(vocab);
        });
        let out = coca(&[&"--model", &b, &"embed", &image("chelsea.png")], tmp.path());
        assert_one_line_error(&out, &format!("file '{vocab}' is outside the bundle"));
    }
}

/// Files read whole are capped and must be regular files: a manifest or a labels file that is
/// /dev/zero is refused in one line instead of read until memory runs out (hardening findings
/// 5 and 6).
#[test]
fn manifest_and_labels_file_that_never_end_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    std::fs::remove_file(b.join("coca.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", b.join("coca.json")).unwrap();
    let out = coca(&[&"--model", &b, &"embed", &image("chelsea.png")], tmp.path());
    assert_one_line_error(&out, "coca.json: the manifest is not a regular file");
    let out = coca(&[&"classify", &image("chelsea.png"), &"--labels-file", &"/dev/zero"], tmp.path());
    assert_one_line_error(&out, "/dev/zero: the text file is not a regular file");
    let big = tmp.path().join("big.txt");
    std::fs::File::create(&big).unwrap().set_len(coca_edge::limits::TEXT_FILE_BYTES + 1).unwrap();
    let out = coca(&[&"classify", &image("chelsea.png"), &"--labels-file", &big], tmp.path());
    assert_one_line_error(&out, "is over the 16 MB limit");
}

#[test]
fn missing_graph_file() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    std::fs::remove_file(b.join("image_encoder.onnx")).unwrap();
    let out = coca(&[&"--model", &b, &"embed", &image("chelsea.png")], tmp.path());
    assert_one_line_error(&out, "image_encoder.onnx: bundle file missing");
}

#[test]
fn corrupt_graph_file_same_size() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    let p = b.join("image_encoder.onnx");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&p, bytes).unwrap();
    let out = coca(&[&"--model", &b, &"embed", &image("chelsea.png")], tmp.path());
    assert_one_line_error(&out, "image_encoder.onnx: sha256");
}

#[test]
fn truncated_graph_file() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    let p = b.join("image_encoder.onnx");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let out = coca(&[&"--model", &b, &"embed", &image("chelsea.png")], tmp.path());
    assert_one_line_error(&out, "does not match the manifest");
}

#[test]
fn graph_that_does_not_match_the_manifest() {
    // a valid graph with the right hash in the manifest, but the wrong graph for the slot
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    std::fs::copy(b.join("text_encoder.onnx"), b.join("image_encoder.onnx")).unwrap();
    let (sha, size) = (sha256(&b.join("image_encoder.onnx")), std::fs::metadata(b.join("image_encoder.onnx")).unwrap().len());
    edit_manifest(&b, |m| {
        m["files"]["image_encoder.onnx"]["sha256"] = sha.into();
        m["files"]["image_encoder.onnx"]["size"] = size.into();
    });
    let out = coca(&[&"--model", &b, &"embed", &image("chelsea.png")], tmp.path());
    assert_one_line_error(&out, "graph does not match the manifest");
}

#[test]
fn graph_with_a_wrong_input_shape_in_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    edit_manifest(&b, |m| {
        m["graphs"]["image_encoder"]["inputs"][0]["shape"] = serde_json::json!(["batch", 3, 256, 256]);
    });
    let out = coca(&[&"--model", &b, &"embed", &image("chelsea.png")], tmp.path());
    assert_one_line_error(&out, "image_encoder.onnx: graph does not match the manifest");
}

#[test]
fn manifest_of_unknown_version() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    edit_manifest(&b, |m| m["format_version"] = 7.into());
    let out = coca(&[&"--model", &b, &"info"], tmp.path());
    assert_one_line_error(&out, "unsupported bundle format version 7");
}

#[test]
fn manifest_that_is_not_json() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    std::fs::write(b.join("coca.json"), b"{\"format\": \"coca-edge-bundle\",").unwrap();
    let out = coca(&[&"--model", &b, &"info"], tmp.path());
    assert_one_line_error(&out, "coca.json: invalid manifest: not valid JSON");
}

#[test]
fn bad_images_each_get_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["empty.jpg", "empty.png", "truncated.jpg", "truncated.png", "text.jpg", "huge_header.png"] {
        let out = coca(&[&"classify", &bad(name), &"--labels", &"a,b"], tmp.path());
        assert_one_line_error(&out, name);
    }
    let out = coca(&[&"embed", &bad("huge_header.png")], tmp.path());
    assert_one_line_error(&out, "100000x100000");
    let out = coca(&[&"embed", &tmp.path().join("missing.jpg")], tmp.path());
    assert_one_line_error(&out, "missing.jpg");
}

#[test]
fn empty_label_list() {
    let tmp = tempfile::tempdir().unwrap();
    let out = coca(&[&"classify", &image("chelsea.png"), &"--labels", &" , "], tmp.path());
    assert_one_line_error(&out, "no labels");
    let f = tmp.path().join("labels.txt");
    std::fs::write(&f, "\n# only a comment\n\n").unwrap();
    let out = coca(&[&"classify", &image("chelsea.png"), &"--labels-file", &f], tmp.path());
    assert_one_line_error(&out, "no labels");
}

#[test]
fn label_file_that_is_not_utf8() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("labels.txt");
    std::fs::write(&f, b"cat\ndog\n\xff\xfe caf\xe9\n").unwrap();
    let out = coca(&[&"classify", &image("chelsea.png"), &"--labels-file", &f], tmp.path());
    assert_one_line_error(&out, "not UTF-8");
}

#[test]
fn templates_without_placeholder() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("t.txt");
    std::fs::write(&f, "a photo of something\n").unwrap();
    let out = coca(&[&"classify", &image("chelsea.png"), &"--labels", &"a,b", &"--templates", &f], tmp.path());
    assert_one_line_error(&out, "placeholder");
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = coca(&[&"classify", &image("chelsea.png")], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let out = coca(&[&"--threads", &"0", &"info"], tmp.path());
    assert_one_line_error(&out, "--threads");
    // far too many threads: refused before any pool is built (100000 used to panic in the pool's
    // builder, u64::MAX to start threads until the process was killed)
    for n in ["100000", "18446744073709551615"] {
        let out = coca(&[&"--threads", &n, &"info"], tmp.path());
        assert_one_line_error(&out, "--threads");
        assert!(String::from_utf8_lossy(&out.stderr).contains("at most 1024"), "{n}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn damaged_caches_are_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image("chelsea.png");
    let first = coca(&[&"classify", &img, &"--labels", &"cat,dog", &"--json"], tmp.path());
    assert!(first.status.success());
    // damage every cache entry: label embeddings and file digests
    let mut damaged = 0;
    for sub in ["labels", "digests"] {
        for e in std::fs::read_dir(tmp.path().join(sub)).unwrap() {
            std::fs::write(e.unwrap().path(), b"{ not json").unwrap();
            damaged += 1;
        }
    }
    assert!(damaged >= 3, "expected label and digest entries, found {damaged}");
    let again = coca(&[&"classify", &img, &"--labels", &"cat,dog", &"--json"], tmp.path());
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(first.stdout, again.stdout, "same result after the caches were rebuilt");
    // and the rebuilt entries are valid again: a third run reads them without warnings
    let third = coca(&[&"classify", &img, &"--labels", &"cat,dog", &"--json"], tmp.path());
    assert_eq!(first.stdout, third.stdout);
    assert!(third.stderr.is_empty(), "{}", String::from_utf8_lossy(&third.stderr));
}

#[test]
fn a_digest_cache_never_hides_a_changed_file() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    copy_bundle(&b);
    let img = image("chelsea.png");
    assert!(coca(&[&"--model", &b, &"embed", &img], tmp.path()).status.success());
    // same size, new content: the stamp (mtime) changes, so the file is hashed again
    std::thread::sleep(std::time::Duration::from_millis(20));
    let p = b.join("image_encoder.onnx");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&p, bytes).unwrap();
    let out = coca(&[&"--model", &b, &"embed", &img], tmp.path());
    assert_one_line_error(&out, "image_encoder.onnx: sha256");
}

#[test]
fn board_profiles_set_defaults_and_unknown_boards_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    for name in ["raspberry-pi-4", "rpi4"] {
        let out = coca(&[&"--board", &name, &"info", &"--json"], tmp.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["threads"], 4.min(cores), "the profile's 4 threads, capped at the cores here");
        assert_eq!(v["board"]["name"], "raspberry-pi-4");
    }
    let out = coca(&[&"--board", &"rpi4", &"--threads", &"1", &"info", &"--json"], tmp.path());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["threads"], 1, "explicit --threads wins over the board");
    assert_one_line_error(&coca(&[&"--board", &"toaster", &"info"], tmp.path()), "unknown board 'toaster'");
}

/// A board's precision is a default: the Pi 5's int8 loads where the bundle has int8 graphs,
/// f32 where it has none (and `coca info` says so and why); an explicit --precision int8 on
/// such a bundle is still refused.
#[test]
fn board_precision_is_a_default_that_falls_back_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let v = coca_json(&[&"--board", &"raspberry-pi-5", &"info", &"--json"], tmp.path());
    assert_eq!(v["precision"], "int8", "{v}");
    assert!(v["precision_why"].as_str().unwrap().contains("raspberry-pi-5"), "{v}");
    let b = tmp.path().join("f32-only");
    copy_bundle(&b);
    edit_manifest(&b, |m| {
        for g in m["graphs"].as_object_mut().unwrap().values_mut() {
            g["precisions"].as_object_mut().unwrap().retain(|k, _| k == "f32");
        }
    });
    let v = coca_json(&[&"--model", &b, &"--board", &"raspberry-pi-5", &"info", &"--json"], tmp.path());
    assert_eq!((v["precision"].as_str(), v["precision_asked"].as_str()), (Some("f32"), Some("int8")), "{v}");
    let img = image("chelsea.png");
    assert!(coca(&[&"--model", &b, &"--board", &"rpi5", &"embed", &img], tmp.path()).status.success());
    assert_one_line_error(&coca(&[&"--model", &b, &"--precision", &"int8", &"embed", &img], tmp.path()), "no 'int8' graphs");
}

/// `--board auto`: under qemu as a Pi 4 or Pi 5 the emulated /proc/cpuinfo's CPU part picks the
/// profile; on an x86_64 machine no board is found and the defaults apply.
#[test]
fn board_auto_detects_the_emulated_pi_and_nothing_on_x86() {
    let tmp = tempfile::tempdir().unwrap();
    let out = coca(&[&"--board", &"auto", &"info", &"--json"], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = match (std::env::consts::ARCH, std::env::var("QEMU_CPU").as_deref()) {
        ("aarch64", Ok("cortex-a72")) => Some("raspberry-pi-4"),
        ("aarch64", Ok("cortex-a76")) => Some("raspberry-pi-5"),
        ("x86_64", _) => None,
        _ => return, // a real board: whatever it is
    };
    match expected {
        Some(name) => assert_eq!(v["board"]["name"], name, "{v}"),
        None => assert!(v["board"].is_null(), "{v}"),
    }
}

#[test]
fn info_names_the_kernels_tract_picked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = coca(&[&"info", &"--json"], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = v["kernels"]["matmul_f32"].as_str().expect("an f32 matmul kernel").to_string();
    eprintln!("tract ISA {} ({}), f32 matmul kernel {k}", v["kernels"]["level"], v["kernels"]["isa"]);
    assert!(!k.starts_with("generic"), "portable fallback kernel in use: {k}");
    if cfg!(target_arch = "aarch64") {
        // a Raspberry Pi 4 or 5 (QEMU_CPU cortex-a72 / cortex-a76 under emulation) has NEON and
        // no SVE: tract must pick its hand-written NEON kernels
        assert!(k.starts_with("arm64simd_") || k.starts_with("arm64fp16_"), "not a NEON kernel: {k}");
        if let Ok(cpu) = std::env::var("QEMU_CPU") {
            if cpu == "cortex-a76" {
                assert_eq!(v["kernels"]["level"], "fp16", "cortex-a76 has fp16 arithmetic");
                assert!(v["kernels"]["matmul_f16"].as_str().unwrap_or("").starts_with("arm64fp16_"), "{v}");
            }
            if cpu == "cortex-a72" {
                assert_eq!(v["kernels"]["level"], "neon", "cortex-a72 has no fp16 arithmetic");
            }
        }
    }
}
