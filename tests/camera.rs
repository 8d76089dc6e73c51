//! Cameras through the `CaptureDevice` seam with scripted fakes (no /dev/video* exists on these
//! machines): frames converted from the negotiated layout, short frames dropped and counted,
//! driver sequence gaps counted, timeouts reported as stalls (not bad frames), an unplugged
//! device reopened with backoff (no busy loop), and the watchdog ending a dead stream.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coca_edge::source::camera::{Buffer, Camera, CameraFormat, CameraOptions, CaptureDevice, Negotiated};
use coca_edge::source::{FrameSource, SourceCounters};
use coca_edge::stream::{self, StreamOptions};
use coca_edge::vision::PixelFormat;
use coca_edge::{Error, Pipeline, PipelineOptions};

#[derive(Clone, Debug)]
enum Ev {
    /// open() succeeds
    Open,
    /// open() fails (device absent)
    OpenFails,
    /// a buffer with this sequence number and fill byte (a full YUYV frame)
    Frame(u32, u8),
    /// a buffer of 3 bytes
    Short(u32),
    /// dequeue times out (after sleeping like a poll timeout)
    Timeout,
    /// the device is gone (ENODEV)
    Unplug,
}

#[derive(Default)]
struct Log {
    opens: usize,
    dequeues: usize,
}

struct Fake {
    script: VecDeque<Ev>,
    /// what happens once the script is over
    then: Ev,
    buf: Vec<u8>,
    log: Arc<Mutex<Log>>,
    poll: Duration,
}

const W: u32 = 8;
const H: u32 = 4;

impl Fake {
    fn new(script: Vec<Ev>, then: Ev) -> (Fake, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        (Fake { script: script.into(), then, buf: Vec::new(), log: log.clone(), poll: Duration::from_millis(5) }, log)
    }
    fn next_ev(&mut self) -> Ev {
        self.script.pop_front().unwrap_or_else(|| self.then.clone())
    }
}

impl CaptureDevice for Fake {
    fn open(&mut self) -> io::Result<Negotiated> {
        self.log.lock().unwrap().opens += 1;
        // past the script (a capture thread may run on after the test has what it needs), the
        // device stays away
        let ev = self.script.pop_front().unwrap_or(Ev::OpenFails);
        match ev {
            Ev::Open => Ok(Negotiated { format: CameraFormat::Raw { format: PixelFormat::Yuyv, stride: 0 }, width: W, height: H, fps: Some(30.0) }),
            Ev::OpenFails => Err(io::Error::from_raw_os_error(2)),
            other => panic!("script expects {other:?} at open"),
        }
    }
    fn dequeue(&mut self) -> io::Result<Buffer<'_>> {
        self.log.lock().unwrap().dequeues += 1;
        match self.next_ev() {
            Ev::Frame(seq, y) => {
                // grey YUYV: Y = y, U = V = 128
                self.buf = (0..W * H).flat_map(|_| [y, 128]).collect();
                Ok(Buffer { data: &self.buf, sequence: seq, timestamp: Duration::from_millis(seq as u64 * 33) })
            }
            Ev::Short(seq) => {
                self.buf = vec![16; 3];
                Ok(Buffer { data: &self.buf, sequence: seq, timestamp: Duration::ZERO })
            }
            Ev::Timeout => {
                std::thread::sleep(self.poll);
                Err(io::Error::new(io::ErrorKind::TimedOut, "VIDIOC_DQBUF"))
            }
            Ev::Unplug => Err(io::Error::from_raw_os_error(19)), // ENODEV
            other => panic!("script expects {other:?} at dequeue"),
        }
    }
    fn close(&mut self) {}
    fn name(&self) -> &str {
        "/dev/video-fake"
    }
}

fn quick() -> CameraOptions {
    CameraOptions { backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(80), reopen_after_timeouts: 3 }
}

#[derive(Debug, PartialEq)]
enum Got {
    Frame(u8),
    Bad,
    Stalled,
    End,
}

fn pull(cam: &mut dyn FrameSource) -> Got {
    match cam.next_frame() {
        Ok(Some(f)) => {
            assert_eq!((f.image.width(), f.image.height()), (W, H));
            Got::Frame(f.image.to_rgb8()[0])
        }
        Ok(None) => Got::End,
        Err(Error::SourceStalled { name, .. }) => {
            assert_eq!(name, "/dev/video-fake");
            Got::Stalled
        }
        Err(e) => {
            assert!(e.to_string().starts_with("/dev/video-fake: "), "{e}");
            Got::Bad
        }
    }
}

#[test]
fn frames_gaps_short_frames_timeouts_and_an_unplug() {
    use Ev::*;
    let (dev, log) =
        Fake::new(vec![Open, Frame(0, 16), Timeout, Frame(1, 235), Frame(4, 16), Short(5), Unplug, OpenFails, OpenFails, Open, Frame(0, 235)], Timeout);
    let mut cam = Camera::new(dev, quick(), Default::default());
    cam.open().unwrap();
    let got: Vec<Got> = (0..10).map(|_| pull(&mut cam)).collect();
    assert_eq!(
        got,
        vec![
            Got::Frame(0),   // Y=16 is black
            Got::Stalled,    // a timeout is no bad frame
            Got::Frame(255), // Y=235 is white
            Got::Frame(0),   // sequence 1 -> 4: the driver skipped 2
            Got::Bad,        // 3 bytes for an 8x4 YUYV frame
            Got::Stalled,    // unplugged
            Got::Stalled,    // reopen fails
            Got::Stalled,    // reopen fails
            Got::Stalled,    // reopened, waiting for frames
            Got::Frame(255), // the counter restarted at 0: no gap
        ]
    );
    assert_eq!(cam.counters(), SourceCounters { driver_dropped: 2, reconnects: 1 });
    assert_eq!(log.lock().unwrap().opens, 4);
    assert!(cam.is_live());
}

#[test]
fn a_device_that_keeps_timing_out_is_reopened() {
    use Ev::*;
    let (dev, log) = Fake::new(vec![Open, Timeout, Timeout, Timeout, Open, Frame(7, 16)], Timeout);
    let mut cam = Camera::new(dev, quick(), Default::default());
    cam.open().unwrap();
    for _ in 0..4 {
        assert_eq!(pull(&mut cam), Got::Stalled);
    }
    assert_eq!(pull(&mut cam), Got::Frame(0));
    assert_eq!(log.lock().unwrap().opens, 2);
    assert_eq!(cam.counters().reconnects, 1);
}

#[test]
fn a_missing_camera_at_start_is_an_error() {
    let (dev, _) = Fake::new(vec![Ev::OpenFails], Ev::OpenFails);
    let mut cam = Camera::new(dev, quick(), Default::default());
    let e = cam.open().unwrap_err().to_string();
    assert!(e.starts_with("/dev/video-fake: cannot open"), "{e}");
}

fn pipeline() -> Pipeline {
    Pipeline::open(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(coca_edge::TEST_BUNDLE), PipelineOptions::default()).unwrap()
}

#[test]
fn the_stream_survives_an_unplug_and_replug() {
    use Ev::*;
    let mut script = vec![Open];
    script.extend((0..5).map(|i| Frame(i, 100)));
    script.extend([Unplug, OpenFails, OpenFails, OpenFails, Open]);
    script.extend((0..5).map(|i| Frame(i, 100)));
    let (dev, log) = Fake::new(script, Timeout);
    let mut cam = Camera::new(dev, quick(), Default::default());
    cam.open().unwrap();
    let opts = StreamOptions { every_frame: true, max_frames: Some(10), watchdog: Some(Duration::from_secs(20)), ..Default::default() };
    let s = stream::run(&pipeline(), Box::new(cam), None, &opts, &AtomicBool::new(false), &mut [stream::sink_fn(|_, _| Ok(()))]).unwrap();
    assert_eq!((s.counters.processed, s.counters.reconnects, s.counters.bad_frames), (10, 1, 0), "{s:?}");
    // 1 + 3 failed + 1 reopen; the capture thread may try again after the 10th frame
    assert!(log.lock().unwrap().opens >= 5);
}

#[test]
fn a_dead_camera_trips_the_watchdog_without_spinning() {
    use Ev::*;
    // two frames, then unplugged for good
    let (dev, log) = Fake::new(vec![Open, Frame(0, 50), Frame(1, 50), Unplug], OpenFails);
    let mut cam = Camera::new(dev, quick(), Default::default());
    cam.open().unwrap();
    let opts = StreamOptions { watchdog: Some(Duration::from_millis(800)), ..Default::default() };
    let t = Instant::now();
    let e = stream::run(&pipeline(), Box::new(cam), None, &opts, &AtomicBool::new(false), &mut [stream::sink_fn(|_, _| Ok(()))]).unwrap_err();
    let took = t.elapsed();
    assert!(matches!(e, Error::Watchdog { .. }), "{e}");
    assert!(e.to_string().contains("/dev/video-fake") && e.to_string().contains("watchdog"), "{e}");
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(10), "{took:?}");
    // backoff: 10, 20, 40, 80, 80 ... ms between attempts, not thousands of tries
    let opens = log.lock().unwrap().opens;
    assert!((3..=40).contains(&opens), "{opens} open attempts in {took:?}");
}

#[test]
fn a_stalled_camera_is_never_a_bad_frame_and_never_a_busy_loop() {
    let (dev, log) = Fake::new(vec![Ev::Open], Ev::Timeout);
    let mut cam = Camera::new(dev, CameraOptions { reopen_after_timeouts: 1000, ..quick() }, Default::default());
    cam.open().unwrap();
    let opts = StreamOptions { watchdog: Some(Duration::from_millis(300)), ..Default::default() };
    let e = stream::run(&pipeline(), Box::new(cam), None, &opts, &AtomicBool::new(false), &mut [stream::sink_fn(|_, _| Ok(()))]).unwrap_err();
    assert!(matches!(e, Error::Watchdog { .. }), "{e}");
    // each dequeue waits for its poll timeout (5 ms here): a bounded number of calls
    let n = log.lock().unwrap().dequeues;
    assert!(n <= 300 / 5 + 20, "{n} dequeues in 300 ms");
}
