//! Cameras. [`Camera`] holds everything a robot needs around a capture device: format
//! negotiation results, payloads sliced to `bytesused`, conversion to RGB, driver sequence-gap
//! counting, and recovery: a device that times out is reported as stalled (never a busy loop);
//! a device that errors or disappears (ENODEV) is closed and reopened with backoff, and every
//! successful reopen is counted. The device itself sits behind [`CaptureDevice`], so all of this
//! is tested with scripted fakes; [`V4l2Device`] (feature `camera`, Linux) is the real one.

use std::io;
use std::time::{Duration, Instant};

use super::{Frame, FrameSource, SourceCounters};
use crate::error::{Error, Result};
use crate::vision::{self, DecodeLimits, PixelFormat};

/// What a camera delivers per buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraFormat {
    /// a raw layout with a row stride in bytes (0 = packed)
    Raw { format: PixelFormat, stride: usize },
    /// one JPEG image per buffer (V4L2 `MJPG`)
    Mjpeg,
}

/// The format a device agreed to (drivers may change what was asked for).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Negotiated {
    pub format: CameraFormat,
    pub width: u32,
    pub height: u32,
    /// frames per second, when the driver says
    pub fps: Option<f64>,
}

/// One dequeued buffer: the payload (already cut to the bytes the driver filled), the driver's
/// frame sequence number and its capture timestamp.
pub struct Buffer<'a> {
    pub data: &'a [u8],
    pub sequence: u32,
    pub timestamp: Duration,
}

/// A capture device, opened and streaming after [`CaptureDevice::open`]. Errors are plain
/// `io::Error`s: `TimedOut` means no frame within the device timeout; anything else (ENODEV
/// after an unplug, EIO) makes [`Camera`] close and reopen it.
pub trait CaptureDevice: Send {
    /// Open (or reopen), negotiate the format and start streaming.
    fn open(&mut self) -> io::Result<Negotiated>;
    /// Wait for the next buffer (at most the device timeout).
    fn dequeue(&mut self) -> io::Result<Buffer<'_>>;
    /// Stop streaming and release the device.
    fn close(&mut self);
    fn name(&self) -> &str;
}

/// Reconnect and watchdog settings.
#[derive(Debug, Clone, Copy)]
pub struct CameraOptions {
    /// first wait before reopening a lost device; doubles up to `max_backoff`
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// consecutive timeouts after which a stalled device is reopened
    pub reopen_after_timeouts: u32,
}

impl Default for CameraOptions {
    fn default() -> Self {
        CameraOptions { backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(2), reopen_after_timeouts: 3 }
    }
}

/// A [`FrameSource`] over a [`CaptureDevice`], with recovery.
pub struct Camera<D: CaptureDevice> {
    dev: D,
    opts: CameraOptions,
    limits: DecodeLimits,
    name: String,
    open: Option<Negotiated>,
    ever_opened: bool,
    backoff: Duration,
    timeouts: u32,
    last_sequence: Option<u32>,
    seq: u64,
    started: Instant,
    counters: SourceCounters,
}

impl<D: CaptureDevice> Camera<D> {
    /// Wrap `dev`; the first [`FrameSource::next_frame`] opens it. Use [`Camera::open`] to
    /// fail early when the device cannot be opened at start-up.
    pub fn new(dev: D, opts: CameraOptions, limits: DecodeLimits) -> Camera<D> {
        let name = dev.name().to_string();
        Camera {
            dev,
            opts,
            limits,
            name,
            open: None,
            ever_opened: false,
            backoff: opts.backoff,
            timeouts: 0,
            last_sequence: None,
            seq: 0,
            started: Instant::now(),
            counters: SourceCounters::default(),
        }
    }

    /// Open now: a camera that is missing at start-up is an error (a typo in the path), not
    /// something to wait for. Returns what was negotiated.
    pub fn open(&mut self) -> Result<Negotiated> {
        let n = self.dev.open().map_err(|e| Error::Source { name: self.name.clone(), message: format!("cannot open: {e}") })?;
        self.opened(n);
        Ok(n)
    }

    /// What the device agreed to, while open.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.open
    }

    fn opened(&mut self, n: Negotiated) {
        if self.ever_opened {
            self.counters.reconnects += 1;
            log::warn!("{}: reopened ({} reconnects so far)", self.name, self.counters.reconnects);
        }
        self.ever_opened = true;
        self.open = Some(n);
        self.backoff = self.opts.backoff;
        self.timeouts = 0;
        self.last_sequence = None;
    }

    fn lose(&mut self, why: &str) {
        log::warn!("{}: {why}; reopening", self.name);
        self.dev.close();
        self.open = None;
    }

    fn stalled(&self, message: String) -> Error {
        Error::SourceStalled { name: self.name.clone(), message }
    }
}

impl<D: CaptureDevice> FrameSource for Camera<D> {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        let Some(n) = self.open else {
            // wait first, then try: the caller checks its stop flag between calls
            std::thread::sleep(self.backoff);
            return match self.dev.open() {
                Ok(n) => {
                    self.opened(n);
                    Err(self.stalled("reopened, waiting for frames".into()))
                }
                Err(e) => {
                    self.backoff = (self.backoff * 2).min(self.opts.max_backoff);
                    Err(self.stalled(format!("cannot reopen: {e}")))
                }
            };
        };
        let (image, sequence, timestamp) = match self.dev.dequeue() {
            Ok(buf) => {
                let image = match n.format {
                    CameraFormat::Mjpeg => vision::decode_image(buf.data, &self.name, &self.limits),
                    CameraFormat::Raw { format, stride } => vision::frame_to_image(buf.data, n.width, n.height, stride, format)
                        .map_err(|e| Error::Source { name: self.name.clone(), message: format!("frame of {} bytes: {e}", buf.data.len()) }),
                };
                (image, buf.sequence, buf.timestamp)
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                self.timeouts += 1;
                if self.timeouts >= self.opts.reopen_after_timeouts {
                    self.lose(&format!("no frame after {} timeouts", self.timeouts));
                }
                return Err(self.stalled("timed out waiting for a frame".into()));
            }
            Err(e) => {
                self.lose(&format!("device error: {e}"));
                return Err(self.stalled(format!("device lost: {e}")));
            }
        };
        self.timeouts = 0;
        if let Some(prev) = self.last_sequence {
            let gap = sequence.wrapping_sub(prev).wrapping_sub(1);
            // a restarted or reset counter is not a gap
            if gap > 0 && gap < 1 << 16 {
                self.counters.driver_dropped += gap as u64;
            }
        }
        self.last_sequence = Some(sequence);
        let image = image?;
        let seq = self.seq;
        self.seq += 1;
        let timestamp = if timestamp.is_zero() { self.started.elapsed() } else { timestamp };
        Ok(Some(Frame { image, seq, timestamp }))
    }
    fn fps(&self) -> Option<f64> {
        self.open.and_then(|n| n.fps)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn is_live(&self) -> bool {
        true
    }
    fn counters(&self) -> SourceCounters {
        self.counters
    }
}

/// Camera request: what to ask the driver for.
#[derive(Debug, Clone, Default)]
pub struct CameraRequest {
    /// V4L2 fourccs to try in order (e.g. `YUYV`, `MJPG`); empty = YUYV, MJPG, NV12, RGB3, BGR3
    pub formats: Vec<[u8; 4]>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub fps: Option<u32>,
    /// device timeout per dequeue (default 2 s)
    pub timeout: Option<Duration>,
}

/// The fourccs we read, in our default order of preference: raw YUYV converts fastest and
/// exactly; MJPEG is what USB cameras offer at high resolutions.
pub const FOURCCS: &[[u8; 4]] = &[*b"YUYV", *b"MJPG", *b"NV12", *b"RGB3", *b"BGR3"];

/// Our layout for a V4L2 fourcc.
pub fn camera_format(fourcc: [u8; 4], stride: usize) -> Option<CameraFormat> {
    Some(match &fourcc {
        b"YUYV" => CameraFormat::Raw { format: PixelFormat::Yuyv, stride },
        b"NV12" => CameraFormat::Raw { format: PixelFormat::Nv12, stride },
        b"RGB3" => CameraFormat::Raw { format: PixelFormat::Rgb8, stride },
        b"BGR3" => CameraFormat::Raw { format: PixelFormat::Bgr8, stride },
        b"MJPG" | b"JPEG" => CameraFormat::Mjpeg,
        _ => return None,
    })
}

/// Parse `--camera-format` (`yuyv`, `mjpeg`, `nv12`, `rgb`, `bgr`, or a comma list).
pub fn parse_camera_formats(spec: &str) -> Result<Vec<[u8; 4]>> {
    spec.split(',')
        .map(|f| {
            Ok(match f.trim().to_ascii_lowercase().as_str() {
                "yuyv" | "yuy2" => *b"YUYV",
                "mjpeg" | "mjpg" => *b"MJPG",
                "nv12" => *b"NV12",
                "rgb" | "rgb3" | "rgb24" => *b"RGB3",
                "bgr" | "bgr3" | "bgr24" => *b"BGR3",
                other => return Err(Error::InvalidArgument(format!("--camera-format '{other}': use yuyv, mjpeg, nv12, rgb or bgr"))),
            })
        })
        .collect()
}

/// The device path of a camera input name (`/dev/video0`, `v4l2:///dev/video0`,
/// `/dev/v4l/by-id/...`), or None when `input` names no camera.
pub fn camera_path(input: &str) -> Option<&str> {
    if let Some(p) = input.strip_prefix("v4l2://") {
        return Some(p);
    }
    (input.starts_with("/dev/video") || input.starts_with("/dev/v4l/")).then_some(input)
}

#[cfg(all(feature = "camera", target_os = "linux"))]
pub use v4l2::V4l2Device;

#[cfg(all(feature = "camera", target_os = "linux"))]
mod v4l2 {
    use super::*;
    use v4l::buffer::Type;
    use v4l::io::mmap::Stream;
    use v4l::io::traits::CaptureStream;
    use v4l::video::Capture;
    use v4l::{Device, FourCC};

    /// A V4L2 capture device through the v4l crate: mmap streaming with 4 buffers, a poll
    /// timeout on every dequeue.
    pub struct V4l2Device {
        path: String,
        req: CameraRequest,
        // the stream holds its own handle to the device; drop order: stream first
        stream: Option<Stream<'static>>,
        dev: Option<Device>,
        size: usize,
    }

    impl V4l2Device {
        pub fn new(path: &str, req: CameraRequest) -> V4l2Device {
            V4l2Device { path: path.to_string(), req, stream: None, dev: None, size: 0 }
        }
    }

    impl CaptureDevice for V4l2Device {
        fn open(&mut self) -> io::Result<Negotiated> {
            self.close();
            let dev = Device::with_path(&self.path)?;
            let caps = dev.query_caps()?;
            if !caps.capabilities.contains(v4l::capability::Flags::VIDEO_CAPTURE) {
                return Err(io::Error::other(format!("'{}' ({}) is not a video capture device", caps.card, caps.driver)));
            }
            let offered: Vec<[u8; 4]> = dev.enum_formats()?.iter().map(|d| d.fourcc.repr).collect();
            let wanted = if self.req.formats.is_empty() { FOURCCS.to_vec() } else { self.req.formats.clone() };
            let Some(fourcc) = wanted.iter().find(|f| offered.contains(f)) else {
                let names: Vec<String> = offered.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
                return Err(io::Error::other(format!(
                    "offers none of the formats asked for ({}); it offers {}",
                    wanted.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect::<Vec<_>>().join(", "),
                    names.join(", ")
                )));
            };
            let mut fmt = dev.format()?;
            fmt.fourcc = FourCC::new(fourcc);
            if let Some(w) = self.req.width {
                fmt.width = w;
            }
            if let Some(h) = self.req.height {
                fmt.height = h;
            }
            let fmt = dev.set_format(&fmt)?;
            let format = camera_format(fmt.fourcc.repr, fmt.stride as usize)
                .ok_or_else(|| io::Error::other(format!("driver chose format {} that coca cannot read", fmt.fourcc)))?;
            if let Some(fps) = self.req.fps {
                // not every driver supports frame intervals; the rate is a wish
                if let Err(e) = dev.set_params(&v4l::video::capture::Parameters::with_fps(fps)) {
                    log::warn!("{}: cannot set {fps} frames/s: {e}", self.path);
                }
            }
            let fps = dev.params().ok().and_then(|p| (p.interval.numerator > 0).then(|| p.interval.denominator as f64 / p.interval.numerator as f64));
            let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, 4)?;
            stream.set_timeout(self.req.timeout.unwrap_or(Duration::from_secs(2)));
            self.size = fmt.size as usize;
            self.stream = Some(stream);
            self.dev = Some(dev);
            log::info!("{}: {} {}x{} (stride {})", self.path, fmt.fourcc, fmt.width, fmt.height, fmt.stride);
            Ok(Negotiated { format, width: fmt.width, height: fmt.height, fps })
        }

        fn dequeue(&mut self) -> io::Result<Buffer<'_>> {
            let stream = self.stream.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
            let (buf, meta) = stream.next()?;
            // the payload is what the driver filled, never the whole mapped buffer
            let used = (meta.bytesused as usize).min(buf.len());
            let ts = Duration::from_secs(meta.timestamp.sec.max(0) as u64) + Duration::from_micros(meta.timestamp.usec.max(0) as u64);
            Ok(Buffer { data: &buf[..used], sequence: meta.sequence, timestamp: ts })
        }

        fn close(&mut self) {
            self.stream = None;
            self.dev = None;
        }

        fn name(&self) -> &str {
            &self.path
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camera_names_and_formats() {
        assert_eq!(camera_path("/dev/video0"), Some("/dev/video0"));
        assert_eq!(camera_path("v4l2:///dev/video2"), Some("/dev/video2"));
        assert_eq!(camera_path("/dev/v4l/by-id/usb-cam-video-index0"), Some("/dev/v4l/by-id/usb-cam-video-index0"));
        assert_eq!(camera_path("clip.mjpeg"), None);
        assert_eq!(parse_camera_formats("mjpeg,yuyv").unwrap(), vec![*b"MJPG", *b"YUYV"]);
        assert!(parse_camera_formats("h264").unwrap_err().to_string().contains("h264"));
        assert_eq!(camera_format(*b"YUYV", 1280), Some(CameraFormat::Raw { format: PixelFormat::Yuyv, stride: 1280 }));
        assert_eq!(camera_format(*b"H264", 0), None);
    }
}
