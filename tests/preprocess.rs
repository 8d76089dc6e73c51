//! Golden tests for `coca_edge::vision` against open_clip 3.3.0's eval transform run in Python
//! (`tests/fixtures/preprocess/make_goldens.py`: Pillow 13.0.0 with its bundled libjpeg-turbo,
//! torchvision 0.29.2, torch 2.15).
//!
//! Tolerance reached: **bit-exact on every fixture** (max abs diff 0 levels, 0 differing values
//! out of 224 * 224 * 3) for PNG (RGB, L, LA, RGBA with alpha 0 areas, palette with and without
//! tRNS, 4-bit palette, 1-bit, 16-bit RGB, 16-bit grey), JPEG (baseline 4:2:0, 4:2:2, 4:4:4,
//! 4:4:0, 4:1:1, progressive, restart markers, non-interleaved scans, grey, CMYK, odd sizes),
//! GIF (palette and grey), BMP, TIFF, WebP (lossless and lossy), PGM and PPM. JPEGs are exact
//! because `vision::jpeg` reproduces libjpeg-turbo's islow IDCT, fancy upsampling and colour
//! conversion. The test therefore demands equality: any difference is a regression (or a
//! changed reference: rerun make_goldens.py and say why).
//! `normalize` matches open_clip's float32 tensor to within 1e-6 (bit-identical in practice;
//! the test prints the measured maximum).

use std::path::{Path, PathBuf};

use coca_edge::vision::{self, DecodeLimits, DecodedImage, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD};

const SIZE: u32 = 224;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Golden {
    file: String,
    mode: String,
    size: (u32, u32),
    f32: Option<String>,
}

fn goldens() -> Vec<Golden> {
    let text = std::fs::read_to_string(fixtures().join("preprocess/goldens.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["size"], SIZE);
    for (i, m) in OPENAI_DATASET_MEAN.iter().enumerate() {
        assert_eq!(v["mean"][i].as_f64().unwrap() as f32, *m);
        assert_eq!(v["std"][i].as_f64().unwrap() as f32, OPENAI_DATASET_STD[i]);
    }
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Golden {
            file: e["file"].as_str().unwrap().to_string(),
            mode: e["mode"].as_str().unwrap().to_string(),
            size: (e["size"][0].as_u64().unwrap() as u32, e["size"][1].as_u64().unwrap() as u32),
            f32: e.get("f32").and_then(|f| f.as_str()).map(str::to_string),
        })
        .collect()
}

fn load(file: &str) -> DecodedImage {
    vision::load_image(&fixtures().join("images").join(file), &DecodeLimits::default()).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn preprocess_u8_matches_open_clip() {
    let goldens = goldens();
    assert!(goldens.len() >= 8);
    let mut failures = Vec::new();
    for g in &goldens {
        let img = load(&g.file);
        assert_eq!((img.width(), img.height()), g.size, "{}", g.file);
        assert_eq!(img.mode().pil_name(), g.mode, "{}: decoded mode", g.file);
        let ours = vision::preprocess_u8(&img, SIZE);
        let theirs = std::fs::read(fixtures().join("preprocess").join(format!("{}.rgb", g.file))).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{}", g.file);
        let (mut max, mut differing) = (0u8, 0usize);
        for (&a, &b) in ours.iter().zip(&theirs) {
            max = max.max(a.abs_diff(b));
            differing += (a != b) as usize;
        }
        println!("{:28} {:5} {:>4}x{:<4} max abs diff {max} levels, {differing}/{} values differ", g.file, g.mode, g.size.0, g.size.1, ours.len());
        if max != 0 {
            failures.push(format!("{}: max abs diff {max} levels, {differing} values differ", g.file));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn normalize_matches_open_clip_tensor() {
    let mut checked = 0;
    for g in goldens() {
        let Some(f32_file) = &g.f32 else { continue };
        let bytes = std::fs::read(fixtures().join("preprocess").join(f32_file)).unwrap();
        let theirs: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(theirs.len(), 3 * (SIZE * SIZE) as usize);

        // from the golden bytes: isolates ToTensor + Normalize
        let rgb = std::fs::read(fixtures().join("preprocess").join(format!("{}.rgb", g.file))).unwrap();
        let ours = vision::normalize(&rgb, SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD);
        let max = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{:28} normalize max abs diff {max:e}", g.file);
        assert!(max <= 1e-6, "{}: normalize differs by {max}", g.file);

        // end to end from the file
        let ours = vision::preprocess(&load(&g.file), SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD);
        let max = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max <= 1e-6, "{}: preprocess differs by {max}", g.file);
        checked += 1;
    }
    assert!(checked >= 2);
}

#[test]
fn decode_image_from_memory_matches_load_image() {
    let path = fixtures().join("images/grace_hopper.jpg");
    let bytes = std::fs::read(&path).unwrap();
    let a = vision::decode_image(&bytes, "grace_hopper.jpg", &DecodeLimits::default()).unwrap();
    let b = vision::load_image(&path, &DecodeLimits::default()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.to_rgb8().len(), 512 * 600 * 3);
}

// ------------------------------------------------------------------------------- bad inputs

/// Decode a file from tests/fixtures/bad; it must fail with an image error naming the file.
fn bad(file: &str, limits: &DecodeLimits) -> String {
    let path = fixtures().join("bad").join(file);
    let err = match vision::load_image(&path, limits) {
        Ok(img) => panic!("{file}: decoded a {}x{} image", img.width(), img.height()),
        Err(e) => e,
    };
    assert!(matches!(err, coca_edge::error::Error::Image { .. }), "{file}: wrong error variant: {err:?}");
    let msg = err.to_string();
    assert!(msg.contains(file), "{file}: message does not name the file: {msg}");
    assert!(!msg.contains('\n'), "{file}: message is not one line: {msg}");
    // and the in-memory path gives the same message, with the given name
    let bytes = std::fs::read(&path).unwrap();
    let err = vision::decode_image(&bytes, file, limits).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{file}: ")), "{err}");
    msg
}

#[test]
fn empty_jpg_is_refused() {
    let msg = bad("empty.jpg", &DecodeLimits::default());
    assert!(msg.ends_with("empty.jpg: empty file (0 bytes)"), "{msg}");
}

#[test]
fn empty_png_is_refused() {
    let msg = bad("empty.png", &DecodeLimits::default());
    assert!(msg.ends_with("empty.png: empty file (0 bytes)"), "{msg}");
}

#[test]
fn truncated_jpeg_is_refused() {
    let msg = bad("truncated.jpg", &DecodeLimits::default());
    assert!(msg.contains("truncated or corrupt JPEG"), "{msg}");
}

#[test]
fn truncated_png_is_refused() {
    let msg = bad("truncated.png", &DecodeLimits::default());
    assert!(msg.contains("truncated or corrupt PNG"), "{msg}");
}

#[test]
fn text_named_jpg_is_refused() {
    let msg = bad("text.jpg", &DecodeLimits::default());
    assert!(msg.ends_with("text.jpg: not a supported image (unknown format)"), "{msg}");
}

#[test]
fn huge_png_header_is_refused_before_allocating() {
    let msg = bad("huge_header.png", &DecodeLimits::default());
    assert!(msg.ends_with("huge_header.png: image is 100000x100000, over the 16384x16384 limit"), "{msg}");
}

#[test]
fn limits_apply_to_every_format() {
    let tight = DecodeLimits { max_width: 100, max_height: 100, max_pixels: 10_000, max_bytes: 1 << 30 };
    for file in ["china.jpg", "flower_progressive.jpg", "chelsea.png", "chelsea.gif", "rocket.bmp", "coffee.tif", "chelsea_lossy.webp", "coins.pgm"] {
        let err = vision::load_image(&fixtures().join("images").join(file), &tight).unwrap_err().to_string();
        assert!(err.contains(file) && err.contains("over the 100x100 limit"), "{err}");
    }
    let pixels = DecodeLimits { max_pixels: 1000, ..DecodeLimits::default() };
    let err = vision::load_image(&fixtures().join("images/china.jpg"), &pixels).unwrap_err().to_string();
    assert!(err.ends_with("image is 640x427 (273280 pixels), over the 1000-pixel limit"), "{err}");
    let bytes = DecodeLimits { max_bytes: 1000, ..DecodeLimits::default() };
    let err = vision::load_image(&fixtures().join("images/china.jpg"), &bytes).unwrap_err().to_string();
    assert!(err.ends_with("file is 196653 bytes, over the 1000-byte limit"), "{err}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let path = fixtures().join("bad/does-not-exist.png");
    let err = vision::load_image(&path, &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, coca_edge::error::Error::Io { .. }));
    assert!(err.to_string().contains("does-not-exist.png"));
}

/// Truncations and byte flips of real files: every outcome is `Ok` or an `Err`, never a panic.
#[test]
fn damaged_files_never_panic() {
    let limits = DecodeLimits { max_pixels: 1 << 20, ..DecodeLimits::default() };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for file in [
        "chelsea_150x100.png",
        "rocket_p16_trns.png",
        "camera_1bit.png",
        "chelsea.gif",
        "camera_gray.gif",
        "hubble_333x517.jpg",
        "flower_progressive.jpg",
        "grace_hopper_cmyk.jpg",
        "coins.pgm",
        "rocket.bmp",
    ] {
        let orig = std::fs::read(fixtures().join("images").join(file)).unwrap();
        for i in 0..24 {
            let mut b = orig.clone();
            if i < 12 {
                b.truncate(orig.len() * i / 12 + (rnd() as usize % 64).min(orig.len() / 12));
            } else {
                for _ in 0..1 + rnd() % 3 {
                    let p = rnd() as usize % b.len();
                    b[p] = rnd() as u8;
                }
            }
            if let Ok(img) = vision::decode_image(&b, file, &limits) {
                assert_eq!(vision::preprocess_u8(&img, 32).len(), 32 * 32 * 3);
            }
        }
    }
}
