//! Where processed frames go: every [`Sink`] given to [`super::run`] sees every processed frame
//! ([`FrameEvent`]) and then the [`Summary`]. The library's sinks: [`JsonLines`] (the JSON lines
//! schema to any writer), [`SaveTo`] (annotated frames to an MJPEG file or a folder) and
//! [`Preview`] (the live preview server); [`sink_fn`] makes one of a closure. A sink that fails
//! stops the stream with its error. Network publishers are more sinks.

use std::cell::OnceCell;
use std::io::Write;
use std::path::PathBuf;

use super::{overlay, preview::Preview, save::SaveTo, FrameReport, Summary};
use crate::error::{Error, Result};
use crate::source::Frame;

/// JPEG quality of annotated frames.
pub const ANNOTATED_JPEG_QUALITY: u8 = 85;

/// One processed frame as sinks see it: the report, the frame, and what overlays show. The JSON
/// line and the annotated JPEG are made on first use and shared by every sink of the frame.
pub struct FrameEvent<'a> {
    pub report: &'a FrameReport,
    pub frame: &'a Frame,
    /// the latest caption (this frame's or an earlier one's)
    pub last_caption: Option<&'a str>,
    /// processed frames per second over the last 2 seconds
    pub fps: Option<f64>,
    json: OnceCell<String>,
    jpeg: OnceCell<Vec<u8>>,
}

impl<'a> FrameEvent<'a> {
    pub fn new(report: &'a FrameReport, frame: &'a Frame, last_caption: Option<&'a str>, fps: Option<f64>) -> FrameEvent<'a> {
        FrameEvent { report, frame, last_caption, fps, json: OnceCell::new(), jpeg: OnceCell::new() }
    }

    /// The report as one JSON line (no newline).
    pub fn json(&self) -> Result<&str> {
        if let Some(j) = self.json.get() {
            return Ok(j);
        }
        let j = serde_json::to_string(self.report).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(self.json.get_or_init(|| j))
    }

    /// The frame with its labels, the latest caption and the FPS drawn on it, as a JPEG.
    pub fn annotated_jpeg(&self) -> Result<&[u8]> {
        if let Some(j) = self.jpeg.get() {
            return Ok(j);
        }
        let j = overlay::annotate(&self.frame.image, self.report, self.last_caption, self.fps).to_jpeg(ANNOTATED_JPEG_QUALITY)?;
        Ok(self.jpeg.get_or_init(|| j))
    }

    /// Whether an earlier sink of this frame already made the annotated JPEG.
    pub fn has_annotated_jpeg(&self) -> bool {
        self.jpeg.get().is_some()
    }
}

/// Where processed frames go.
pub trait Sink {
    /// One processed frame; an error stops the stream.
    fn frame(&mut self, ev: &FrameEvent<'_>) -> Result<()>;
    /// The end of a stream that ran to its end (not called when the stream failed).
    fn finish(&mut self, _summary: &Summary) -> Result<()> {
        Ok(())
    }
}

struct FnSink<F>(F);

impl<F: FnMut(&FrameReport, &Frame) -> Result<()>> Sink for FnSink<F> {
    fn frame(&mut self, ev: &FrameEvent<'_>) -> Result<()> {
        (self.0)(ev.report, ev.frame)
    }
}

/// A sink that calls `f` with every report and its frame.
pub fn sink_fn<'a>(f: impl FnMut(&FrameReport, &Frame) -> Result<()> + 'a) -> Box<dyn Sink + 'a> {
    Box::new(FnSink(f))
}

/// The JSON lines schema ([`super::SCHEMA_VERSION`]): one line per frame, flushed, then the
/// summary line.
pub struct JsonLines<W: Write> {
    out: W,
    /// names the writer in errors ("stdout")
    name: PathBuf,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W, name: impl Into<PathBuf>) -> JsonLines<W> {
        JsonLines { out, name: name.into() }
    }

    fn line(&mut self, line: &str) -> Result<()> {
        writeln!(self.out, "{line}").and_then(|_| self.out.flush()).map_err(|e| Error::Io { path: self.name.clone(), source: e })
    }
}

impl<W: Write> Sink for JsonLines<W> {
    fn frame(&mut self, ev: &FrameEvent<'_>) -> Result<()> {
        self.line(ev.json()?)
    }
    fn finish(&mut self, summary: &Summary) -> Result<()> {
        let line = serde_json::to_string(summary).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.line(&line)
    }
}

/// Every annotated frame to the file or folder.
impl Sink for SaveTo {
    fn frame(&mut self, ev: &FrameEvent<'_>) -> Result<()> {
        self.write(ev.annotated_jpeg()?, ev.report.frame)
    }
}

/// Annotated frames while a viewer is connected, the first one (for `/frame.jpg`), and any an
/// earlier sink encoded anyway; in teach mode also the raw frame.
impl Sink for Preview {
    fn frame(&mut self, ev: &FrameEvent<'_>) -> Result<()> {
        if self.has_clients() || ev.report.counters.processed == 1 || ev.has_annotated_jpeg() {
            self.publish(ev.annotated_jpeg()?.to_vec(), ev.json()?.to_string());
        }
        if self.teaching() {
            self.publish_raw(std::sync::Arc::new(ev.frame.image.clone()), ev.report.frame);
        }
        Ok(())
    }
}

/// Frames per second over the last 2 seconds.
#[derive(Debug, Default)]
pub struct FpsMeter {
    times: std::collections::VecDeque<std::time::Instant>,
}

impl FpsMeter {
    /// Count a frame now; the rate once two frames were counted.
    pub fn tick(&mut self) -> Option<f64> {
        let now = std::time::Instant::now();
        self.times.push_back(now);
        while self.times.front().is_some_and(|t| now.duration_since(*t).as_secs_f64() > 2.0) {
            self.times.pop_front();
        }
        let span = now.duration_since(*self.times.front()?).as_secs_f64();
        (self.times.len() > 1 && span > 0.0).then(|| (self.times.len() - 1) as f64 / span)
    }
}
