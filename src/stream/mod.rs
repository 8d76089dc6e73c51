//! The stream loop: a capture thread feeds a latest-frame slot (a newer frame replaces a stale
//! one, which is counted as dropped, so the camera never waits for the models); the processing
//! loop takes the newest frame, runs one encoder pass, classifies every processed frame and
//! captions every N frames or when the embedding has moved. `--every-frame` processes every
//! frame instead (the capture thread waits). Files with a frame rate are paced at it unless
//! every frame is asked for; live sources deliver at their own rate.
//!
//! Output events are [`FrameReport`]s (JSON lines schema version [`SCHEMA_VERSION`]), given to
//! [`Sink`]s (JSON lines, saved annotated frames, the preview server, yours).

pub mod overlay;
pub mod preview;
pub mod save;
pub mod sink;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::caption::CaptionOptions;
use crate::classify::LabelSet;
use crate::error::Result;
use crate::model::ImageFeatures;
use crate::pipeline::{FrameRequest, Pipeline};
use crate::source::{Frame, FrameSource, SourceCounters};

pub use sink::{sink_fn, FpsMeter, FrameEvent, JsonLines, Sink};

/// Version of the JSON lines schema of [`FrameReport`] and [`Summary`].
/// 2: `latency.capture_ms`, `driver_dropped`, `reconnects`; summary `mean_ms` per stage.
pub const SCHEMA_VERSION: u32 = 2;

/// When captions are made.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// process every frame (files) instead of the newest one
    pub every_frame: bool,
    /// caption every N processed frames (0 = never, unless `caption_on_change`)
    pub caption_every: usize,
    /// caption when 1 - cosine(embedding, embedding at the last caption) exceeds this
    pub caption_on_change: Option<f32>,
    pub caption: CaptionOptions,
    pub top_k: usize,
    /// stop after this many processed frames
    pub max_frames: Option<u64>,
    /// fail with [`crate::Error::Watchdog`] when no frame arrives for this long
    pub watchdog: Option<Duration>,
    /// a trained head, run on every processed frame beside the zero-shot labels
    pub head: Option<crate::head::Head>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            every_frame: false,
            caption_every: 0,
            caption_on_change: None,
            caption: CaptionOptions::default(),
            top_k: 3,
            max_frames: None,
            watchdog: None,
            head: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LabelScore {
    pub label: String,
    pub p: f32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// the source delivering and converting this frame (read, decode, YUV -> RGB), on the
    /// capture thread
    pub capture_ms: f64,
    pub preprocess_ms: f64,
    pub encoder_ms: f64,
    pub classify_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_ms: Option<f64>,
}

/// One processed frame (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct FrameReport {
    pub schema: u32,
    /// capture index of the frame
    pub frame: u64,
    /// source timestamp in ms
    pub t_ms: f64,
    pub labels: Vec<LabelScore>,
    /// the head's classes (`--head`), most probable first
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<Vec<LabelScore>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    pub latency: Latency,
    /// the counts so far
    #[serde(flatten)]
    pub counters: Counters,
}

/// Frame counts, in every [`FrameReport`] (so far) and in the [`Summary`] (in all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub captured: u64,
    pub processed: u64,
    /// frames replaced in the slot before they were processed
    pub dropped: u64,
    /// frames the source could not deliver (short, corrupt)
    pub bad_frames: u64,
    /// frames the camera driver skipped (gaps in its sequence numbers)
    pub driver_dropped: u64,
    /// times the camera was reopened after a stall or an unplug
    pub reconnects: u64,
}

/// The end of a stream (last JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub schema: u32,
    pub summary: bool,
    pub source: String,
    #[serde(flatten)]
    pub counters: Counters,
    pub seconds: f64,
    pub fps: f64,
    /// mean milliseconds per processed frame and stage (`outputs`: the caller's JSON, overlay,
    /// files and preview; `caption` over the frames that were captioned)
    pub mean_ms: StageMeans,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageMeans {
    pub capture: f64,
    pub preprocess: f64,
    pub encoder: f64,
    pub classify: f64,
    pub caption: f64,
    pub outputs: f64,
}

#[derive(Default)]
struct SlotState {
    frame: Option<Frame>,
    /// how long the source took to deliver `frame`
    frame_ms: f64,
    counters: SourceCounters,
    last_frame_at: Option<Instant>,
    ended: bool,
    captured: u64,
    dropped: u64,
    bad: u64,
    error: Option<String>,
}

struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

/// Run `source` through `pipeline` until it ends, `shutdown` is set or `max_frames` frames were
/// processed; every sink gets every processed frame, in order, then the summary (a sink's error
/// stops the stream and is returned). Returns the summary.
pub fn run(
    pipeline: &Pipeline,
    source: Box<dyn FrameSource>,
    labels: Option<&LabelSet>,
    opts: &StreamOptions,
    shutdown: &AtomicBool,
    sinks: &mut [Box<dyn Sink + '_>],
) -> Result<Summary> {
    if let Some(d) = pipeline.bundle().manifest().decoder.as_ref() {
        if opts.caption_every > 0 || opts.caption_on_change.is_some() {
            opts.caption.validate(d.max_positions)?;
        }
    } else if opts.caption_every > 0 || opts.caption_on_change.is_some() {
        pipeline.decoder()?; // the bundle's own error: it cannot caption
    }
    let name = source.name().to_string();
    let slot = Arc::new(Slot { state: Mutex::new(SlotState::default()), cv: Condvar::new() });
    let stop = Arc::new(AtomicBool::new(false));
    let pace = if opts.every_frame || source.is_live() { None } else { source.fps() };
    let every = opts.every_frame;
    let t0 = Instant::now();
    let capture = {
        let (slot, stop) = (slot.clone(), stop.clone());
        let mut source = source;
        std::thread::Builder::new()
            .name("coca-capture".into())
            .spawn(move || capture_loop(&mut *source, &slot, &stop, pace, every))
            .map_err(|e| crate::error::Error::InvalidArgument(format!("cannot start the capture thread: {e}")))?
    };
    let mut sums = StageMeans::default();
    let result = process_loop(pipeline, &slot, &name, labels, opts, shutdown, &mut sums, sinks);
    stop.store(true, Ordering::SeqCst);
    slot.cv.notify_all();
    let _ = capture.join();
    let processed = result?;
    let st = slot.state.lock().unwrap();
    if let Some(e) = &st.error {
        log::warn!("{name}: {e}");
    }
    let seconds = t0.elapsed().as_secs_f64();
    let n = processed.max(1) as f64;
    let mean_ms = StageMeans {
        capture: sums.capture / n,
        preprocess: sums.preprocess / n,
        encoder: sums.encoder / n,
        classify: sums.classify / n,
        caption: sums.caption,
        outputs: sums.outputs / n,
    };
    let counters = Counters {
        captured: st.captured,
        processed,
        dropped: st.dropped,
        bad_frames: st.bad,
        driver_dropped: st.counters.driver_dropped,
        reconnects: st.counters.reconnects,
    };
    drop(st);
    let summary = Summary { schema: SCHEMA_VERSION, summary: true, source: name, counters, seconds, fps: processed as f64 / seconds.max(1e-9), mean_ms };
    for s in sinks.iter_mut() {
        s.finish(&summary)?;
    }
    Ok(summary)
}

fn capture_loop(source: &mut dyn FrameSource, slot: &Slot, stop: &AtomicBool, pace: Option<f64>, every_frame: bool) {
    let start = Instant::now();
    let mut logged_bad = false;
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        let next = source.next_frame();
        let frame_ms = t.elapsed().as_secs_f64() * 1e3;
        slot.state.lock().unwrap().counters = source.counters();
        match next {
            Ok(Some(frame)) => {
                if let Some(fps) = pace {
                    let due = Duration::from_secs_f64(frame.seq as f64 / fps);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                let mut st = slot.state.lock().unwrap();
                if every_frame {
                    while st.frame.is_some() && !stop.load(Ordering::SeqCst) {
                        st = slot.cv.wait(st).unwrap();
                    }
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
                st.captured += 1;
                st.frame_ms = frame_ms;
                st.last_frame_at = Some(Instant::now());
                if st.frame.replace(frame).is_some() {
                    st.dropped += 1;
                }
                slot.cv.notify_all();
            }
            Ok(None) => break,
            // a live source waiting for its device: not a bad frame (it sleeps, no busy loop)
            Err(crate::Error::SourceStalled { .. }) => continue,
            Err(e) => {
                let mut st = slot.state.lock().unwrap();
                st.bad += 1;
                if !logged_bad {
                    log::warn!("dropping a bad frame (further ones are only counted): {e}");
                    logged_bad = true;
                }
                // a source that keeps failing has ended (a closed pipe, a truncated file)
                if st.bad > 1000 {
                    st.error = Some(format!("too many bad frames, last: {e}"));
                    break;
                }
            }
        }
    }
    let mut st = slot.state.lock().unwrap();
    st.ended = true;
    slot.cv.notify_all();
}

#[allow(clippy::too_many_arguments)]
fn process_loop(
    p: &Pipeline,
    slot: &Slot,
    name: &str,
    labels: Option<&LabelSet>,
    opts: &StreamOptions,
    shutdown: &AtomicBool,
    sums: &mut StageMeans,
    sinks: &mut [Box<dyn Sink + '_>],
) -> Result<u64> {
    let mut processed = 0u64;
    let mut captions = 0u64;
    let mut last_caption_emb: Option<Vec<f32>> = None;
    let mut last_caption: Option<String> = None;
    let mut fps = FpsMeter::default();
    let started = Instant::now();
    let result = loop {
        if shutdown.load(Ordering::SeqCst) || opts.max_frames.map(|m| processed >= m).unwrap_or(false) {
            break Ok(processed);
        }
        let (frame, frame_ms, captured, dropped, bad, counters) = {
            let mut st = slot.state.lock().unwrap();
            loop {
                if st.frame.is_some() || st.ended || shutdown.load(Ordering::SeqCst) {
                    break;
                }
                if let Some(limit) = opts.watchdog {
                    let since = st.last_frame_at.unwrap_or(started).elapsed();
                    if since > limit {
                        return Err(crate::Error::Watchdog { name: name.to_string(), seconds: since.as_secs_f64() });
                    }
                }
                st = slot.cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
            }
            let f = st.frame.take();
            slot.cv.notify_all();
            (f, st.frame_ms, st.captured, st.dropped, st.bad, st.counters)
        };
        let Some(frame) = frame else { break Ok(processed) };
        // the caption-every / caption-on-change decision; on change needs this frame's embedding
        let due_every = opts.caption_every > 0 && processed.is_multiple_of(opts.caption_every as u64);
        let changed = |f: &ImageFeatures| match (opts.caption_on_change, &last_caption_emb) {
            (Some(_), None) => true,
            (Some(t), Some(prev)) => 1.0 - crate::classify::dot(prev, &f.embedding) > t,
            (None, _) => false,
        };
        let req = FrameRequest {
            labels,
            top_k: opts.top_k,
            head: opts.head.as_ref(),
            caption: (due_every || opts.caption_on_change.is_some()).then_some(&opts.caption),
            caption_if: if due_every { None } else { Some(&changed) },
        };
        let result = p.process(&frame.image, &req)?;
        let t4 = Instant::now();
        let caption = result.caption.map(|c| c.text);
        if caption.is_some() {
            last_caption_emb = Some(result.features.embedding);
            last_caption.clone_from(&caption);
        }
        processed += 1;
        let t = result.timings;
        let latency =
            Latency { capture_ms: frame_ms, preprocess_ms: t.preprocess_ms, encoder_ms: t.encoder_ms, classify_ms: t.classify_ms, caption_ms: t.caption_ms };
        sums.capture += latency.capture_ms;
        sums.preprocess += latency.preprocess_ms;
        sums.encoder += latency.encoder_ms;
        sums.classify += latency.classify_ms;
        if let Some(c) = latency.caption_ms {
            sums.caption += c;
            captions += 1;
        }
        let scores = |v: Vec<crate::classify::Score>| v.into_iter().map(|s| LabelScore { label: s.label, p: s.probability }).collect::<Vec<_>>();
        let report = FrameReport {
            schema: SCHEMA_VERSION,
            frame: frame.seq,
            t_ms: frame.timestamp.as_secs_f64() * 1e3,
            labels: scores(result.scores.unwrap_or_default()),
            head: result.head_scores.map(scores),
            latency,
            caption,
            counters: Counters { captured, processed, dropped, bad_frames: bad, driver_dropped: counters.driver_dropped, reconnects: counters.reconnects },
        };
        let ev = FrameEvent::new(&report, &frame, last_caption.as_deref(), fps.tick());
        for s in sinks.iter_mut() {
            s.frame(&ev)?;
        }
        sums.outputs += t4.elapsed().as_secs_f64() * 1e3;
    };
    // a mean over the captioned frames only
    sums.caption /= captions.max(1) as f64;
    result
}
