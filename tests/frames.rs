//! Raw camera layouts against reference conversions made by tests/fixtures/frames/make_frames.py
//! (ffmpeg's BT.601 limited-range formula for YUV, Pillow for packed RGB/BGR/RGBA/grey), with
//! row padding full of garbage where the layout has a stride.

use std::path::PathBuf;

use coca_edge::source::parse_input_format;
use coca_edge::vision::frame_to_image;

#[test]
fn every_raw_layout_matches_the_reference() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/frames");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("frames.json")).unwrap()).unwrap();
    let cases = index["cases"].as_array().unwrap();
    assert!(cases.len() >= 14);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let (w, h) = (c["width"].as_u64().unwrap() as u32, c["height"].as_u64().unwrap() as u32);
        let (format, _, _) = parse_input_format(&format!("{}:{w}x{h}", c["format"].as_str().unwrap())).unwrap();
        let data = std::fs::read(dir.join(format!("{name}.raw"))).unwrap();
        let want = std::fs::read(dir.join(format!("{name}.rgb"))).unwrap();
        let img = frame_to_image(&data, w, h, c["stride"].as_u64().unwrap() as usize, format).unwrap();
        let got = img.to_rgb8();
        assert_eq!(got.len(), want.len(), "{name}");
        let max = got.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        // YUV: 16.16 fixed point against float64; packed layouts are exact
        let tol = if name.starts_with("yuyv") || name.starts_with("nv12") || name.starts_with("i420") { 1 } else { 0 };
        assert!(max <= tol, "{name}: max difference {max} > {tol}");
        // a packed buffer one byte short is refused, never read past
        if c["stride"].as_u64() == Some(0) {
            assert!(frame_to_image(&data[..data.len() - 1], w, h, 0, format).is_err(), "{name}");
        }
    }
}
