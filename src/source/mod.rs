//! Frame sources behind one trait: image files and folders, Y4M and MJPEG files, raw frames from
//! a pipe (`-`, for GStreamer or ffmpeg). Input names follow jetson-inference's conventions:
//! `file://path`, a plain path, `-`; `/dev/videoN`, `/dev/v4l/by-id/...` and `v4l2://` name V4L2
//! cameras ([`camera`], feature `camera` on Linux).

pub mod camera;

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::vision::{self, DecodeLimits, DecodedImage, PixelFormat};

/// One captured frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub image: DecodedImage,
    /// capture order, from 0
    pub seq: u64,
    /// position in the source (file time for paced files, capture time for live sources)
    pub timestamp: Duration,
}

/// Where frames come from. `next_frame` returns `Ok(None)` at the end; a bad frame is an `Err`
/// the caller counts and skips (the source stays usable unless it says it ended).
pub trait FrameSource: Send {
    fn next_frame(&mut self) -> Result<Option<Frame>>;
    /// The source's own frame rate, if it has one (paced playback of files).
    fn fps(&self) -> Option<f64> {
        None
    }
    /// A name for logs and JSON.
    fn name(&self) -> &str;
    /// Live sources (pipes, cameras) are never paced: they deliver at their own rate.
    fn is_live(&self) -> bool {
        false
    }
    /// Losses and recoveries the source saw itself (cameras).
    fn counters(&self) -> SourceCounters {
        SourceCounters::default()
    }
}

/// What a source counts on its own: frames the driver skipped (gaps in its sequence numbers)
/// and reopens after a stall or an unplug.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceCounters {
    pub driver_dropped: u64,
    pub reconnects: u64,
}

/// `fmt:WxH` for raw frames, e.g. `yuyv:640x480`, `rgb24:1280x720`, `nv12:1920x1080`,
/// `i420:640x480`, `bgr24:...`, `gray:...`, `rgba:...`.
pub fn parse_input_format(spec: &str) -> Result<(PixelFormat, u32, u32)> {
    let bad = || Error::InvalidArgument(format!("--input-format '{spec}': expected FORMAT:WIDTHxHEIGHT, e.g. yuyv:640x480"));
    let (fmt, size) = spec.split_once(':').ok_or_else(bad)?;
    let (w, h) = size.split_once('x').ok_or_else(bad)?;
    let (w, h): (u32, u32) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    let format = match fmt.to_ascii_lowercase().as_str() {
        "yuyv" | "yuy2" | "yuyv422" => PixelFormat::Yuyv,
        "nv12" => PixelFormat::Nv12,
        "i420" | "yuv420p" => PixelFormat::I420,
        "rgb" | "rgb24" | "rgb3" => PixelFormat::Rgb8,
        "bgr" | "bgr24" | "bgr3" => PixelFormat::Bgr8,
        "rgba" => PixelFormat::Rgba8,
        "gray" | "grey" | "gray8" => PixelFormat::Gray8,
        other => return Err(Error::InvalidArgument(format!("--input-format: unknown pixel format '{other}' (yuyv, nv12, i420, rgb24, bgr24, rgba, gray)"))),
    };
    if w == 0 || h == 0 || w > vision::MAX_FRAME_SIDE || h > vision::MAX_FRAME_SIDE {
        return Err(Error::InvalidArgument(format!("--input-format '{spec}': size out of range")));
    }
    let even_w = matches!(format, PixelFormat::Yuyv | PixelFormat::Nv12 | PixelFormat::I420);
    let even_h = matches!(format, PixelFormat::Nv12 | PixelFormat::I420);
    if (even_w && w % 2 != 0) || (even_h && h % 2 != 0) {
        return Err(Error::InvalidArgument(format!("--input-format '{spec}': {fmt} needs an even width{}", if even_h { " and height" } else { "" })));
    }
    Ok((format, w, h))
}

/// How to open a source: the raw format for pipes and raw files, decode limits, and what to
/// ask a camera for.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// `--input-format` for raw pipes and files
    pub raw: Option<(PixelFormat, u32, u32)>,
    pub limits: DecodeLimits,
    pub camera: camera::CameraRequest,
    pub camera_options: camera::CameraOptions,
}

/// Open a source by name. `raw` is the `--input-format` for raw pipes and files.
pub fn open_source(input: &str, raw: Option<(PixelFormat, u32, u32)>, limits: DecodeLimits) -> Result<Box<dyn FrameSource>> {
    open_source_with(input, &SourceOptions { raw, limits, ..Default::default() })
}

/// Open a source by name with every option (cameras included).
pub fn open_source_with(input: &str, o: &SourceOptions) -> Result<Box<dyn FrameSource>> {
    let (raw, limits) = (o.raw, o.limits);
    if let Some(path) = camera::camera_path(input) {
        return open_camera(path, o);
    }
    if input == "-" {
        let (format, w, h) = raw.ok_or_else(|| Error::InvalidArgument("reading frames from stdin (-) needs --input-format FORMAT:WxH".into()))?;
        return Ok(Box::new(RawFrames::new(Box::new(std::io::stdin()), "stdin", format, w, h, true)));
    }
    let path = PathBuf::from(input.strip_prefix("file://").unwrap_or(input));
    let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
    if meta.is_dir() {
        return Ok(Box::new(ImageFiles::from_dir(&path, limits)?));
    }
    if let Some((format, w, h)) = raw {
        let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        return Ok(Box::new(RawFrames::new(Box::new(f), &path.display().to_string(), format, w, h, false)));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "y4m" => Ok(Box::new(Y4m::open(&path)?)),
        "mjpeg" | "mjpg" => Ok(Box::new(Mjpeg::open(&path, limits)?)),
        _ => Ok(Box::new(ImageFiles::new(vec![path], limits))),
    }
}

#[cfg(all(feature = "camera", target_os = "linux"))]
fn open_camera(path: &str, o: &SourceOptions) -> Result<Box<dyn FrameSource>> {
    let dev = camera::V4l2Device::new(path, o.camera.clone());
    let mut cam = camera::Camera::new(dev, o.camera_options, o.limits);
    cam.open()?;
    Ok(Box::new(cam))
}

#[cfg(not(all(feature = "camera", target_os = "linux")))]
fn open_camera(path: &str, _o: &SourceOptions) -> Result<Box<dyn FrameSource>> {
    Err(Error::Source {
        name: path.to_string(),
        message: format!(
            "V4L2 cameras are not in this build (feature `camera`, Linux); pipe frames in instead, e.g. `ffmpeg -f v4l2 -i {path} -f rawvideo -pix_fmt yuyv422 - | coca stream - --input-format yuyv:640x480`"
        ),
    })
}

/// Whether `p` has an image file extension (what folders of images are scanned for).
pub use crate::vision::is_image_file;

/// A list of image files (a folder's images in name order).
pub struct ImageFiles {
    files: Vec<PathBuf>,
    next: usize,
    limits: DecodeLimits,
    name: String,
}

impl ImageFiles {
    pub fn new(files: Vec<PathBuf>, limits: DecodeLimits) -> ImageFiles {
        let name = files.first().map(|p| p.display().to_string()).unwrap_or_default();
        ImageFiles { files, next: 0, limits, name }
    }

    pub fn from_dir(dir: &Path, limits: DecodeLimits) -> Result<ImageFiles> {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_image_file(p)).collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::InvalidArgument(format!("{}: no images in this folder", dir.display())));
        }
        let mut s = ImageFiles::new(files, limits);
        s.name = dir.display().to_string();
        Ok(s)
    }
}

impl FrameSource for ImageFiles {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        let Some(path) = self.files.get(self.next).cloned() else { return Ok(None) };
        let seq = self.next as u64;
        self.next += 1;
        let image = vision::load_image(&path, &self.limits)?;
        Ok(Some(Frame { image, seq, timestamp: Duration::ZERO }))
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Raw frames of a fixed format and size read back to back from a pipe or file.
pub struct RawFrames {
    reader: Box<dyn Read + Send>,
    name: String,
    format: PixelFormat,
    width: u32,
    height: u32,
    seq: u64,
    live: bool,
    start: std::time::Instant,
}

impl RawFrames {
    pub fn new(reader: Box<dyn Read + Send>, name: &str, format: PixelFormat, width: u32, height: u32, live: bool) -> RawFrames {
        RawFrames { reader: Box::new(BufReader::new(reader)), name: name.to_string(), format, width, height, seq: 0, live, start: std::time::Instant::now() }
    }
}

/// Read exactly `buf.len()` bytes; `Ok(false)` at a clean end of stream, an error for a short
/// last frame.
fn read_frame(r: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(Error::Image { name: what.to_string(), message: format!("short frame at the end: {got} of {} bytes", buf.len()) }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Image { name: what.to_string(), message: format!("read failed: {e}") }),
        }
    }
    Ok(true)
}

impl FrameSource for RawFrames {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        let mut buf = vec![0u8; vision::frame_bytes(self.format, self.width, self.height)];
        if !read_frame(&mut self.reader, &mut buf, &self.name)? {
            return Ok(None);
        }
        let image = vision::frame_to_image(&buf, self.width, self.height, 0, self.format)?;
        let seq = self.seq;
        self.seq += 1;
        let timestamp = if self.live { self.start.elapsed() } else { Duration::ZERO };
        Ok(Some(Frame { image, seq, timestamp }))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn is_live(&self) -> bool {
        self.live
    }
}

/// YUV4MPEG2 files with 8-bit 4:2:0 (C420, C420jpeg, C420paldv, C420mpeg2) or mono frames.
pub struct Y4m {
    reader: BufReader<std::fs::File>,
    name: String,
    width: u32,
    height: u32,
    mono: bool,
    fps: f64,
    seq: u64,
}

impl Y4m {
    pub fn open(path: &Path) -> Result<Y4m> {
        let name = path.display().to_string();
        let bad = |m: String| Error::Image { name: name.clone(), message: m };
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(f);
        let header = read_line(&mut reader, 1024).map_err(|e| bad(format!("not a Y4M file: {e}")))?;
        let mut parts = header.split(' ');
        if parts.next() != Some("YUV4MPEG2") {
            return Err(bad("not a Y4M file (no YUV4MPEG2 signature)".into()));
        }
        let (mut width, mut height, mut fps, mut mono) = (0u32, 0u32, 30.0f64, false);
        for p in parts {
            let (tag, val) = p.split_at(1.min(p.len()));
            match tag {
                "W" => width = val.parse().map_err(|_| bad(format!("bad width '{val}'")))?,
                "H" => height = val.parse().map_err(|_| bad(format!("bad height '{val}'")))?,
                "F" => {
                    if let Some((n, d)) = val.split_once(':') {
                        if let (Ok(n), Ok(d)) = (n.parse::<f64>(), d.parse::<f64>()) {
                            if n > 0.0 && d > 0.0 {
                                fps = n / d;
                            }
                        }
                    }
                }
                "C" => {
                    mono = val == "mono";
                    if !(mono || matches!(val, "420" | "420jpeg" | "420paldv" | "420mpeg2")) {
                        return Err(bad(format!("colour space C{val} is not supported (8-bit 4:2:0 or mono)")));
                    }
                }
                _ => {}
            }
        }
        if width == 0 || height == 0 || width > vision::MAX_FRAME_SIDE || height > vision::MAX_FRAME_SIDE || (!mono && (width % 2 != 0 || height % 2 != 0)) {
            return Err(bad(format!("frame size {width}x{height} not supported")));
        }
        Ok(Y4m { reader, name, width, height, mono, fps, seq: 0 })
    }
}

fn read_line(r: &mut impl Read, max: usize) -> std::io::Result<String> {
    let mut v = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if r.read(&mut b)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "end of file in a header"));
        }
        if b[0] == b'\n' {
            break;
        }
        v.push(b[0]);
        if v.len() > max {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "header line too long"));
        }
    }
    String::from_utf8(v).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "header is not text"))
}

impl FrameSource for Y4m {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        let line = match read_line(&mut self.reader, 1024) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Error::Image { name: self.name.clone(), message: format!("bad frame header: {e}") }),
        };
        if !line.starts_with("FRAME") {
            return Err(Error::Image { name: self.name.clone(), message: "frame header missing (FRAME)".into() });
        }
        let fmt = if self.mono { PixelFormat::Gray8 } else { PixelFormat::I420 };
        let mut buf = vec![0u8; vision::frame_bytes(fmt, self.width, self.height)];
        if !read_frame(&mut self.reader, &mut buf, &self.name)? {
            return Err(Error::Image { name: self.name.clone(), message: "frame header without data".into() });
        }
        let image = vision::frame_to_image(&buf, self.width, self.height, 0, fmt)?;
        let seq = self.seq;
        self.seq += 1;
        Ok(Some(Frame { image, seq, timestamp: Duration::from_secs_f64(seq as f64 / self.fps) }))
    }
    fn fps(&self) -> Option<f64> {
        Some(self.fps)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Motion-JPEG files: JPEG images back to back (as `ffmpeg -f mjpeg` writes them), 30 fps.
pub struct Mjpeg {
    data: Vec<u8>,
    pos: usize,
    name: String,
    limits: DecodeLimits,
    seq: u64,
}

/// Largest MJPEG file read into memory.
const MAX_MJPEG_BYTES: u64 = 2 << 30;

impl Mjpeg {
    pub fn open(path: &Path, limits: DecodeLimits) -> Result<Mjpeg> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.len() > MAX_MJPEG_BYTES {
            return Err(Error::Image {
                name: path.display().to_string(),
                message: format!("{} bytes is over the {MAX_MJPEG_BYTES}-byte MJPEG limit", meta.len()),
            });
        }
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(Mjpeg { data, pos: 0, name: path.display().to_string(), limits, seq: 0 })
    }
}

impl FrameSource for Mjpeg {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        // find the next SOI, then the EOI that ends it (entropy-coded data never holds FF D9)
        let Some(start) = find(&self.data[self.pos..], &[0xFF, 0xD8]).map(|i| self.pos + i) else { return Ok(None) };
        let end = find(&self.data[start + 2..], &[0xFF, 0xD9]).map(|i| start + 2 + i + 2).unwrap_or(self.data.len());
        self.pos = end;
        let seq = self.seq;
        self.seq += 1;
        let name = format!("{} frame {seq}", self.name);
        let image = vision::decode_image(&self.data[start..end], &name, &self.limits)?;
        Ok(Some(Frame { image, seq, timestamp: Duration::from_secs_f64(seq as f64 / 30.0) }))
    }
    fn fps(&self) -> Option<f64> {
        Some(30.0)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_formats() {
        assert_eq!(parse_input_format("yuyv:640x480").unwrap(), (PixelFormat::Yuyv, 640, 480));
        assert!(parse_input_format("yuyv640x480").is_err());
        assert!(parse_input_format("mp4:640x480").is_err());
        assert!(parse_input_format("rgb24:0x480").is_err());
    }

    #[test]
    fn y4m_frames_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.y4m");
        let mut data = b"YUV4MPEG2 W4 H2 F25:1 Ip A1:1 C420jpeg\n".to_vec();
        for i in 0..3u8 {
            data.extend(b"FRAME\n");
            data.extend(std::iter::repeat_n(16 + i * 50, 8));
            data.extend([128u8; 4]);
        }
        data.extend(b"FRAME\n");
        data.extend([0u8; 5]); // short last frame
        std::fs::write(&p, &data).unwrap();
        let mut s = Y4m::open(&p).unwrap();
        assert_eq!(s.fps(), Some(25.0));
        for i in 0..3 {
            let f = s.next_frame().unwrap().unwrap();
            assert_eq!(f.seq, i);
            assert_eq!((f.image.width(), f.image.height()), (4, 2));
        }
        assert!(s.next_frame().unwrap_err().to_string().contains("short frame"));
    }

    #[test]
    fn raw_frames_end_cleanly_and_report_short_frames() {
        let data = vec![7u8; 2 * 2 * 3 * 2 + 5];
        let mut s = RawFrames::new(Box::new(std::io::Cursor::new(data)), "pipe", PixelFormat::Rgb8, 2, 2, true);
        assert!(s.next_frame().unwrap().is_some());
        assert!(s.next_frame().unwrap().is_some());
        assert!(s.next_frame().is_err());
        let mut s = RawFrames::new(Box::new(std::io::Cursor::new(vec![0u8; 12])), "pipe", PixelFormat::Rgb8, 2, 2, true);
        assert!(s.next_frame().unwrap().is_some());
        assert!(s.next_frame().unwrap().is_none());
    }

    #[test]
    fn a_missing_camera_is_a_clear_error() {
        let e = open_source("/dev/video99", None, DecodeLimits::default()).err().unwrap().to_string();
        assert!(e.starts_with("/dev/video99: "), "{e}");
    }
}
