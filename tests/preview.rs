//! The live preview, end to end: `coca stream - --preview 127.0.0.1:0` fed frames through a
//! pipe; a real HTTP client (ureq) reads the page, `/frame.jpg` and `/stream.mjpg` as a
//! multipart stream of JPEGs; then a headless Chromium takes a screenshot of the page, which must
//! show the annotated frame (saved as target/test-artefacts/preview.png). Chromium is looked for
//! as `$CHROMIUM`, `chromium`, `chromium-browser`, `google-chrome`; without one the screenshot
//! part is skipped with a message, unless `COCA_REQUIRE_BROWSER=1` (set by .ci/run) makes that a
//! failure. `--save` is checked on the same run: its MJPEG file reads back frame by frame.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coca_edge::stream::overlay::LABEL_RGB;
use coca_edge::vision::{decode_image, load_image};

struct Running {
    child: Child,
    addr: String,
    size: (u32, u32),
    stop: Arc<AtomicBool>,
    feeder: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(f) = self.feeder.take() {
            let _ = f.join();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start the stream on a still photo repeated through stdin (about 20 frames/s) until dropped.
fn start(save: &std::path::Path, teach: &std::path::Path) -> Running {
    let img = load_image(&common::root().join("examples/large_orange_circle_top.jpg"), &Default::default()).unwrap();
    let (w, h) = (img.width(), img.height());
    let rgb = img.to_rgb8();
    let mut child = common::coca_command()
        .args(["--model", common::root().join("models/coca-scenes").to_str().unwrap()])
        .args(["stream", "-", "--input-format", &format!("rgb24:{w}x{h}")])
        .args(["--labels", "orange circle,red circle,blue square", "--caption-every", "5", "--preview", "127.0.0.1:0"])
        .arg("--save")
        .arg(save)
        .arg("--teach")
        .arg(teach)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let feeder = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            if stdin.write_all(&rgb).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    // "preview: http://ADDR/" comes on stderr before the model loads
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        if let Some(rest) = line.trim().strip_prefix("preview: http://") {
            addr = Some(rest.trim_end_matches('/').to_string());
            break;
        }
        line.clear();
    }
    // keep draining stderr so the child never blocks on it
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = err.read_to_string(&mut sink);
    });
    Running { child, addr: addr.expect("the preview address on stderr"), size: (w, h), stop, feeder: Some(feeder) }
}

/// Pixels within `d` of the overlay's label colour.
fn label_pixels(rgb: &[u8]) -> usize {
    let c = LABEL_RGB.map(i32::from);
    rgb.chunks_exact(3).filter(|p| (0..3).all(|i| (p[i] as i32 - c[i]).abs() < 60)).count()
}

fn find_browser() -> Option<String> {
    let mut names: Vec<String> = std::env::var("CHROMIUM").ok().into_iter().collect();
    names.extend(["chromium", "chromium-browser", "google-chrome"].map(String::from));
    names
        .into_iter()
        .find(|n| std::process::Command::new(n).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false))
}

#[test]
fn preview_serves_a_page_and_a_multipart_jpeg_stream_a_browser_shows() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("annotated.mjpeg");
    let taught = dir.path().join("taught");
    let run = start(&saved, &taught);
    let base = format!("http://{}", run.addr);

    // the page
    let page = ureq::get(&format!("{base}/")).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(page.contains("<img") && page.contains("/stream.mjpg"), "{page}");

    // the stream: a multipart/x-mixed-replace of JPEGs
    let mut resp = ureq::get(&format!("{base}/stream.mjpg")).call().unwrap();
    let ctype = resp.headers().get("content-type").unwrap().to_str().unwrap().to_string();
    let boundary = ctype.split("boundary=").nth(1).expect("a boundary").to_string();
    assert!(ctype.starts_with("multipart/x-mixed-replace"), "{ctype}");
    let mut body = BufReader::new(resp.body_mut().as_reader());
    let t = Instant::now();
    let mut parts = 0;
    while parts < 3 {
        assert!(t.elapsed() < Duration::from_secs(120), "no frames on the stream");
        let mut line = String::new();
        body.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            continue;
        }
        assert_eq!(line.trim(), format!("--{boundary}"));
        let mut len = None;
        loop {
            let mut h = String::new();
            body.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            if k.eq_ignore_ascii_case("content-type") {
                assert_eq!(v.trim(), "image/jpeg");
            }
            if k.eq_ignore_ascii_case("content-length") {
                len = Some(v.trim().parse::<usize>().unwrap());
            }
        }
        let mut jpeg = vec![0u8; len.expect("Content-Length")];
        body.read_exact(&mut jpeg).unwrap();
        let img = decode_image(&jpeg, "part", &Default::default()).unwrap();
        assert_eq!((img.width(), img.height()), run.size);
        assert!(label_pixels(&img.to_rgb8()) > 30, "the labels are drawn on part {parts}");
        parts += 1;
    }
    drop(body);

    // the latest frame alone
    let mut r = ureq::get(&format!("{base}/frame.jpg")).call().unwrap();
    let jpeg = r.body_mut().read_to_vec().unwrap();
    decode_image(&jpeg, "frame.jpg", &Default::default()).unwrap();

    // teach mode: the current frame saved under a class, in the layout `coca head train` reads
    let mut r = ureq::post(&format!("{base}/teach?class=orange%20circle")).send_empty().unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!((v["class"].as_str(), v["count"].as_u64()), (Some("orange circle"), Some(1)), "{v}");
    let files: Vec<_> = std::fs::read_dir(taught.join("orange circle")).unwrap().collect();
    assert_eq!(files.len(), 1);
    let img = load_image(&files[0].as_ref().unwrap().path(), &Default::default()).unwrap();
    assert_eq!((img.width(), img.height()), run.size);
    assert_eq!(label_pixels(&img.to_rgb8()), 0, "the taught frame has no overlay");
    for bad in ["../x", "", ".hidden"] {
        let e = ureq::post(&format!("{base}/teach?class={bad}")).send_empty();
        assert!(matches!(e, Err(ureq::Error::StatusCode(400))), "class '{bad}': {e:?}");
    }
    assert!(page.contains("save this frame"), "the page offers teaching");

    // a browser shows it
    match find_browser() {
        Some(browser) => {
            let out_dir = common::root().join("target/test-artefacts");
            std::fs::create_dir_all(&out_dir).unwrap();
            let shot = out_dir.join("preview.png");
            let _ = std::fs::remove_file(&shot);
            let profile = tempfile::tempdir().unwrap();
            let mut b = std::process::Command::new(&browser)
                .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=740,900"])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(format!("--screenshot={}", shot.display()))
                .arg(format!("{base}/"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let t = Instant::now();
            while b.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(90) {
                    let _ = b.kill();
                    panic!("{browser} took over 90 s to take the screenshot");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let png = load_image(&shot, &Default::default()).expect("a screenshot");
            let rgb = png.to_rgb8();
            assert!(label_pixels(&rgb) > 60, "the screenshot {} shows the labels", shot.display());
            // the orange circle of the photo is on the page too
            let orange = rgb.chunks_exact(3).filter(|p| p[0] > 200 && (90..190).contains(&p[1]) && p[2] < 80).count();
            assert!(orange > 500, "the screenshot {} shows the frame ({orange} orange pixels)", shot.display());
            eprintln!("screenshot: {}", shot.display());
        }
        None if std::env::var("COCA_REQUIRE_BROWSER").as_deref() == Ok("1") => panic!("COCA_REQUIRE_BROWSER=1 but no chromium found"),
        None => eprintln!("SKIPPED the screenshot: no chromium (set $CHROMIUM or install Debian's chromium)"),
    }

    let size = run.size;
    drop(run);
    // --save: every frame written so far reads back
    let frames: PathBuf = saved;
    let mut src = coca_edge::source::open_source(frames.to_str().unwrap(), None, Default::default()).unwrap();
    let mut n = 0;
    while let Ok(Some(f)) = src.next_frame() {
        assert_eq!((f.image.width(), f.image.height()), size);
        n += 1;
    }
    assert!(n >= 3, "{n} saved frames");
}
