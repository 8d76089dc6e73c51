//! The C ABI from C: the committed header is what the pinned cbindgen generates from
//! src/ffi.rs, the C example
//! builds against the static library with gcc and gives the Rust API's answer, and the misuse
//! test (every function with nulls, wrong sizes, bad enums, bad UTF-8) passes, also under
//! valgrind with no leaks or invalid accesses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use coca_edge::classify::Templates;
use coca_edge::vision::{self, PixelFormat};
use coca_edge::{Pipeline, PipelineOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder holding libcoca_edge.a for this test run's profile. `cargo test` builds the
/// staticlib but leaves it in deps/ under a hashed name, so ask cargo for the artifact (a no-op
/// build: the library was just compiled for these tests) and use the folder it reports.
fn staticlib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => "release".to_string(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--lib", "--profile", &profile, "--message-format=json-render-diagnostics"])
        .current_dir(root())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo build --lib failed:\n{}", String::from_utf8_lossy(&out.stderr));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "coca_edge" {
            for f in v["filenames"].as_array().into_iter().flatten().filter_map(|f| f.as_str()) {
                if f.ends_with("libcoca_edge.a") {
                    return Path::new(f).parent().unwrap().to_path_buf();
                }
            }
        }
    }
    panic!("cargo reported no libcoca_edge.a");
}

/// Build the C programs once (examples/c/build.sh against this run's static library).
fn built() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = staticlib_dir();
        assert!(dir.join("libcoca_edge.a").exists(), "no libcoca_edge.a in {}", dir.display());
        let out = Command::new("sh").arg(root().join("examples/c/build.sh")).arg(&dir).output().expect("sh runs");
        assert!(out.status.success(), "examples/c/build.sh failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        dir
    })
}

#[test]
fn committed_header_matches_cbindgen() {
    let config = cbindgen::Config::from_file(root().join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new().with_src(root().join("src/ffi.rs")).with_config(config).generate().expect("cbindgen generates the header").write(&mut generated);
    let path = root().join("include/coca_edge.h");
    if std::env::var_os("COCA_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/coca_edge.h differs from what cbindgen generates from src/ffi.rs: run COCA_UPDATE_HEADER=1 cargo test --release --test c_abi and commit it"
    );
}

#[test]
fn pkg_config_file_lists_the_native_libraries() {
    let pc = std::fs::read_to_string(built().join("coca_edge.pc")).unwrap();
    let libs = pc.lines().find(|l| l.starts_with("Libs:")).unwrap();
    assert!(libs.contains("-lcoca_edge") && libs.contains("-lm") && libs.contains("-lpthread"), "{libs}");
}

#[test]
fn c_example_classifies_like_the_rust_api() {
    let dir = built();
    let img = vision::load_image(&root().join("tests/fixtures/images/chelsea.png"), &Default::default()).unwrap();
    let (w, h) = (img.width(), img.height());
    let rgb = img.to_rgb8();
    let tmp = tempfile::tempdir().unwrap();
    let frame = tmp.path().join("frame.rgb");
    std::fs::write(&frame, &rgb).unwrap();
    let bundle = root().join(coca_edge::TEST_BUNDLE);
    let labels = ["cat", "dog", "car", "person"];
    let out = Command::new(dir.join("coca_classify_c"))
        .arg(&bundle)
        .arg(&frame)
        .arg(w.to_string())
        .arg(h.to_string())
        .args(labels)
        .env("COCA_CACHE_DIR", tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();

    // the same frame through the Rust API
    let p = Pipeline::open(&bundle, PipelineOptions::default()).unwrap();
    let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
    let set = p.label_set(&labels, &Templates::openai_imagenet(), |_, _| {}).unwrap();
    let f = p.embed_image(&vision::frame_to_image(&rgb, w, h, 0, PixelFormat::Rgb8).unwrap()).unwrap();
    let mut want: Vec<String> = p.classify(&f, &set, 3).unwrap().iter().map(|s| format!("{:.4} {}", s.probability, s.label)).collect();
    want.push(format!("embedding {}: {:.6} {:.6} {:.6}", f.embedding.len(), f.embedding[0], f.embedding[1], f.embedding[2]));
    let caption = p.caption(&f, &coca_edge::caption::CaptionOptions::default(), |_, _| {}).unwrap();
    want.push(format!("caption: {}", caption.text));
    assert_eq!(stdout.lines().collect::<Vec<_>>(), want);
}

#[test]
fn c_example_reports_a_bad_bundle_on_one_line() {
    let dir = built();
    let tmp = tempfile::tempdir().unwrap();
    let frame = tmp.path().join("frame.rgb");
    std::fs::write(&frame, [0u8; 12]).unwrap();
    let out = Command::new(dir.join("coca_classify_c")).arg(tmp.path().join("nope")).arg(&frame).args(["2", "2", "cat"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("model bundle folder not found"), "{stderr}");
}

fn run_misuse(wrapper: Option<&[&str]>) -> std::process::Output {
    let dir = built();
    let exe = dir.join("coca_abi_misuse_c");
    let bundle = root().join(coca_edge::TEST_BUNDLE);
    let mut cmd = match wrapper {
        Some(w) => {
            let mut c = Command::new(w[0]);
            c.args(&w[1..]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let (head, other) = heads();
    cmd.arg(&bundle).arg(head).arg(other).output().unwrap()
}

/// A head trained on the test bundle (two classes of test photos) and the same head stamped
/// with another bundle's id, written once.
fn heads() -> (PathBuf, PathBuf) {
    static HEADS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    HEADS
        .get_or_init(|| {
            use coca_edge::head::data::Dataset;
            let dir = root().join("target/c-abi-heads");
            let _ = std::fs::remove_dir_all(&dir);
            let imgs = root().join("tests/fixtures/images");
            let mut photos: Vec<PathBuf> =
                std::fs::read_dir(&imgs).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "jpg")).collect();
            photos.sort();
            let ds = Dataset { classes: vec!["a".into(), "b".into()], items: photos.iter().take(4).enumerate().map(|(i, p)| (p.clone(), i % 2)).collect() };
            let p = coca_edge::Pipeline::open(root().join(coca_edge::TEST_BUNDLE), Default::default()).unwrap();
            let (mut head, _, _) = p.train_head(&ds, &Default::default(), |_, _| {}).unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            let (h, o) = (dir.join("head.json"), dir.join("other.json"));
            head.save(&h).unwrap();
            head.bundle_id = "0000000000000000".into();
            head.save(&o).unwrap();
            (h, o)
        })
        .clone()
}

#[test]
fn c_misuse_gets_status_codes_never_a_crash() {
    let out = run_misuse(None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(", 0 failed"), "{stdout}");
}

#[test]
fn c_misuse_is_clean_under_valgrind() {
    let supp = format!("--suppressions={}", root().join("tests/c/valgrind.supp").display());
    let args = [
        "valgrind",
        &supp,
        "--error-exitcode=99",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite,indirect",
        "--show-leak-kinds=definite,indirect",
        "--show-possibly-lost=no",
        "--quiet",
    ];
    let out = run_misuse(Some(&args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "valgrind reported problems (exit {:?}):\n{stderr}", out.status.code());
    assert!(String::from_utf8_lossy(&out.stdout).contains(", 0 failed"));
}
