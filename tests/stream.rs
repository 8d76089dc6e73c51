//! The stream loop with fake sources: the latest-frame policy drops stale frames (and never
//! queues them), every-frame mode drops none, bad frames are counted and skipped, captions come
//! every N frames or on change; the CLI prints schema-2 JSON lines for files, Y4M and raw pipes.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use coca_edge::classify::Templates;
use coca_edge::source::{Frame, FrameSource};
use coca_edge::stream::{self, StreamOptions};
use coca_edge::vision::DecodedImage;
use coca_edge::{Error, Pipeline, PipelineOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A source that delivers `n` frames as fast as it can; frames listed in `bad` fail.
struct Fake {
    n: u64,
    next: u64,
    bad: Vec<u64>,
    delay: Duration,
}

impl FrameSource for Fake {
    fn next_frame(&mut self) -> coca_edge::Result<Option<Frame>> {
        if self.next >= self.n {
            return Ok(None);
        }
        let seq = self.next;
        self.next += 1;
        std::thread::sleep(self.delay);
        if self.bad.contains(&seq) {
            return Err(Error::Image { name: "fake".into(), message: format!("short frame {seq}") });
        }
        let v = (seq * 37 % 256) as u8;
        let image = DecodedImage::from_rgb8(64, 48, vec![v; 64 * 48 * 3]).unwrap();
        Ok(Some(Frame { image, seq, timestamp: Duration::from_millis(seq * 33) }))
    }
    fn name(&self) -> &str {
        "fake"
    }
    fn is_live(&self) -> bool {
        true
    }
}

fn pipeline() -> Pipeline {
    Pipeline::open(root().join(coca_edge::TEST_BUNDLE), PipelineOptions::default()).unwrap()
}

#[test]
fn a_slow_consumer_drops_stale_frames_and_queues_none() {
    let p = pipeline();
    let labels = vec!["cat".to_string(), "dog".to_string()];
    let set = p.label_set(&labels, &Templates::parse("a photo of a {}.", "t").unwrap(), |_, _| {}).unwrap();
    // captions on every frame make the consumer much slower than the source
    let opts = StreamOptions {
        caption_every: 1,
        caption: coca_edge::caption::CaptionOptions { search: coca_edge::caption::Search::Greedy, ..Default::default() },
        ..Default::default()
    };
    let src = Fake { n: 400, next: 0, bad: vec![], delay: Duration::ZERO };
    let mut frames = Vec::new();
    let s = stream::run(
        &p,
        Box::new(src),
        Some(&set),
        &opts,
        &AtomicBool::new(false),
        &mut [stream::sink_fn(|r, _| {
            frames.push(r.frame);
            assert!(r.caption.is_some());
            assert_eq!(r.labels.len(), 2);
            Ok(())
        })],
    )
    .unwrap();
    assert_eq!(s.counters.captured, 400);
    assert!(s.counters.dropped > 0, "{s:?}");
    assert_eq!(s.counters.processed + s.counters.dropped, s.counters.captured, "every frame is processed or dropped, none queued");
    assert!(frames.windows(2).all(|w| w[0] < w[1]), "newest frames, in order");
    assert_eq!(*frames.last().unwrap(), 399, "the last frame is processed");
}

#[test]
fn every_frame_mode_processes_all_and_bad_frames_are_counted() {
    let p = pipeline();
    let opts = StreamOptions { every_frame: true, ..Default::default() };
    let src = Fake { n: 30, next: 0, bad: vec![3, 4, 17], delay: Duration::ZERO };
    let mut n = 0;
    let s = stream::run(
        &p,
        Box::new(src),
        None,
        &opts,
        &AtomicBool::new(false),
        &mut [stream::sink_fn(|_, _| {
            n += 1;
            Ok(())
        })],
    )
    .unwrap();
    assert_eq!((s.counters.captured, s.counters.processed, s.counters.dropped, s.counters.bad_frames), (27, 27, 0, 3));
    assert_eq!(n, 27);
}

#[test]
fn captions_on_change_only_when_the_embedding_moves() {
    let p = pipeline();
    let opts = StreamOptions {
        every_frame: true,
        caption_on_change: Some(0.5),
        caption: coca_edge::caption::CaptionOptions { search: coca_edge::caption::Search::Greedy, ..Default::default() },
        ..Default::default()
    };
    // identical frames: only the first is captioned
    struct Same(u64);
    impl FrameSource for Same {
        fn next_frame(&mut self) -> coca_edge::Result<Option<Frame>> {
            if self.0 == 5 {
                return Ok(None);
            }
            self.0 += 1;
            Ok(Some(Frame { image: DecodedImage::from_rgb8(32, 32, vec![120; 32 * 32 * 3]).unwrap(), seq: self.0 - 1, timestamp: Duration::ZERO }))
        }
        fn name(&self) -> &str {
            "same"
        }
    }
    let mut captions = 0;
    stream::run(
        &p,
        Box::new(Same(0)),
        None,
        &opts,
        &AtomicBool::new(false),
        &mut [stream::sink_fn(|r, _| {
            captions += r.caption.is_some() as usize;
            Ok(())
        })],
    )
    .unwrap();
    assert_eq!(captions, 1);
}

#[test]
fn shutdown_stops_a_live_source() {
    let p = pipeline();
    let stop = AtomicBool::new(false);
    let src = Fake { n: u64::MAX, next: 0, bad: vec![], delay: Duration::from_millis(2) };
    let mut seen = 0;
    let s = stream::run(
        &p,
        Box::new(src),
        None,
        &StreamOptions::default(),
        &stop,
        &mut [stream::sink_fn(|_, _| {
            seen += 1;
            if seen == 5 {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        })],
    )
    .unwrap();
    assert_eq!(s.counters.processed, 5);
}

fn coca_stream(args: &[&str], stdin: Option<Vec<u8>>) -> (i32, String, String) {
    let cache = tempfile::tempdir().unwrap();
    let mut c = common::coca_command();
    c.arg("stream").args(args).env("COCA_CACHE_DIR", cache.path());
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let data = stdin.unwrap_or_default();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn check_schema(stdout: &str) -> (Vec<serde_json::Value>, serde_json::Value) {
    let mut lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary = lines.pop().unwrap();
    assert_eq!(summary["summary"], true);
    for l in &lines {
        assert_eq!(l["schema"], 2);
        for key in ["frame", "t_ms", "labels", "latency", "captured", "processed", "dropped", "bad_frames", "driver_dropped", "reconnects"] {
            assert!(!l[key].is_null(), "missing {key} in {l}");
        }
        for key in ["capture_ms", "preprocess_ms", "encoder_ms", "classify_ms"] {
            assert!(l["latency"][key].as_f64().unwrap() >= 0.0, "latency.{key} in {l}");
        }
        assert!(l["latency"]["encoder_ms"].as_f64().unwrap() > 0.0);
        for lab in l["labels"].as_array().unwrap() {
            assert!(lab["label"].is_string() && (0.0..=1.0).contains(&lab["p"].as_f64().unwrap()), "{l}");
        }
    }
    assert_eq!(summary["schema"], 2);
    for key in ["source", "captured", "processed", "dropped", "bad_frames", "driver_dropped", "reconnects", "seconds", "fps", "mean_ms"] {
        assert!(!summary[key].is_null(), "missing {key} in the summary {summary}");
    }
    for key in ["capture", "preprocess", "encoder", "classify", "caption", "outputs"] {
        assert!(summary["mean_ms"][key].as_f64().unwrap() >= 0.0, "mean_ms.{key} in {summary}");
    }
    (lines, summary)
}

#[test]
fn cli_streams_a_folder_a_y4m_file_and_raw_frames_from_a_pipe() {
    let folder = root().join("tests/fixtures/images");
    let (code, out, err) = coca_stream(
        &[folder.to_str().unwrap(), "--labels", "cat,dog", "--every-frame", "--max-frames", "4", "--caption-every", "2", "--sampling", "greedy"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (lines, _) = check_schema(&out);
    assert_eq!(lines.len(), 4);
    assert!(lines[0]["caption"].is_string() && lines[1]["caption"].is_null() && lines[2]["caption"].is_string());

    // Y4M, 4:2:0, 3 frames
    let tmp = tempfile::tempdir().unwrap();
    let y4m = tmp.path().join("clip.y4m");
    let mut data = b"YUV4MPEG2 W32 H16 F30:1 C420jpeg\n".to_vec();
    for i in 0..3u8 {
        data.extend(b"FRAME\n");
        data.extend(std::iter::repeat_n(40 + 60 * i, 32 * 16));
        data.extend([100u8; 2 * 16 * 8]);
    }
    std::fs::write(&y4m, &data).unwrap();
    let (code, out, err) = coca_stream(&[y4m.to_str().unwrap(), "--labels", "cat,dog", "--every-frame"], None);
    assert_eq!(code, 0, "{err}");
    let (lines, summary) = check_schema(&out);
    assert_eq!(lines.len(), 3);
    assert_eq!(summary["captured"], 3);
    assert!((lines[2]["t_ms"].as_f64().unwrap() - 66.666).abs() < 0.1, "Y4M timestamps follow its frame rate");

    // raw YUYV frames on stdin, the last one short
    let mut raw = vec![128u8; 16 * 8 * 2 * 4];
    raw.extend([0u8; 10]);
    let (code, out, err) = coca_stream(&["-", "--input-format", "yuyv:16x8", "--labels", "cat,dog"], Some(raw));
    assert_eq!(code, 0, "{err}");
    let (_, summary) = check_schema(&out);
    assert_eq!(summary["captured"], 4);
    assert_eq!(summary["bad_frames"], 1);
}

#[test]
fn cli_stream_errors() {
    let (code, _, err) = coca_stream(&["-", "--labels", "a,b"], None);
    assert_eq!(code, 2);
    assert!(err.contains("--input-format"), "{err}");
    // no camera here: the path is named in one line (a missing camera at start-up is a typo,
    // not something to wait for)
    let (code, _, err) = coca_stream(&["v4l2:///dev/video97", "--labels", "a,b"], None);
    assert_eq!(code, 2);
    assert!(err.starts_with("coca: /dev/video97: ") && err.trim().lines().count() == 1, "{err}");
    for bad in [&["--camera-format", "h264"][..], &["--camera-size", "640"], &["--watchdog", "0"], &["--camera-fps", "0"], &["--save", "out.txt"]] {
        let mut args = vec!["/dev/video97", "--labels", "a,b"];
        args.extend_from_slice(bad);
        let (code, _, err) = coca_stream(&args, None);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(err.starts_with("coca: ") && err.contains(bad[0].trim_start_matches("--").split('-').next().unwrap()), "{bad:?}: {err}");
    }
    let (code, _, err) = coca_stream(&["-", "--input-format", "yuyv:15x8", "--labels", "a,b"], Some(vec![0; 240]));
    assert_eq!(code, 2);
    assert!(err.contains("even width"), "{err}");
    // frames that fail to convert are counted and skipped with one warning, never fatal
    let mut raw = vec![128u8; 16 * 8 * 3];
    raw.extend(vec![7u8; 5]);
    let (code, out, err) = coca_stream(&["-", "--input-format", "rgb24:16x8", "--labels", "a,b"], Some(raw));
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.lines().count(), 1, "one warning for the short frame: {err}");
    assert!(out.lines().last().unwrap().contains("\"bad_frames\":1"), "{out}");
    // every frame bad: the summary is written, then an error and exit 2, as `classify` on the
    // same files (it exited 0 with "processed": 0; hardening finding 16)
    let tmp = tempfile::tempdir().unwrap();
    for f in ["empty.jpg", "truncated.jpg", "text.jpg"] {
        std::fs::copy(root().join("tests/fixtures/bad").join(f), tmp.path().join(f)).unwrap();
    }
    let (code, out, err) = coca_stream(&[tmp.path().to_str().unwrap(), "--labels", "a,b"], None);
    assert_eq!(code, 2, "{err}");
    assert!(out.lines().last().unwrap().contains("\"processed\":0"), "{out}");
    let last = err.trim().lines().last().unwrap_or("");
    assert!(last.starts_with("coca: ") && last.contains("no frame could be processed (3 bad frames)"), "{err}");
}
