//! The live preview: a small HTTP server (`--preview 127.0.0.1:8090`) so an engineer can watch a
//! headless robot from a laptop's browser.
//!
//! * `/` an HTML page showing the stream and the latest JSON report,
//! * `/stream.mjpg` the annotated frames as `multipart/x-mixed-replace` (MJPEG over HTTP: every
//!   browser, VLC, ffplay and OpenCV read it),
//! * `/frame.jpg` the latest annotated frame, `/report.json` the latest report,
//! * with a teach folder (`--teach DIR`): `/teach?class=NAME` (POST or GET) saves the latest
//!   camera frame, without the overlay, as `DIR/NAME/<time>_<frame>.jpg`: the layout
//!   `coca head train --data DIR` reads. The page gets a class box and a button for it.
//!
//! Written on std's `TcpListener` on purpose: each part must be flushed as soon as it is written
//! (tiny_http's chunked writer holds the tail of a frame until the next one), and four GET routes
//! need no framework. The publisher never waits for a client: a slow client just skips frames.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

const BOUNDARY: &str = "cocaframe";
const MAX_CLIENTS: usize = 16;

#[derive(Default)]
struct Latest {
    id: u64,
    jpeg: Option<Arc<Vec<u8>>>,
    report: String,
    /// the frame as captured (for teaching), with its index
    raw: Option<(Arc<crate::vision::DecodedImage>, u64)>,
}

struct Shared {
    latest: Mutex<Latest>,
    cv: Condvar,
    closed: AtomicBool,
    clients: AtomicUsize,
    teach: Option<std::path::PathBuf>,
}

/// A running preview server; dropping it stops the server and closes the streams.
pub struct Preview {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Preview {
    /// Listen on `addr` (`127.0.0.1:8090`; port 0 picks a free one).
    pub fn start(addr: &str) -> Result<Preview> {
        Self::start_with(addr, None)
    }

    /// Listen on `addr`; with `teach`, `/teach?class=NAME` saves frames under that folder.
    pub fn start_with(addr: &str, teach: Option<std::path::PathBuf>) -> Result<Preview> {
        let fail = |e: std::io::Error| Error::InvalidArgument(format!("--preview {addr}: {e}"));
        let listener = TcpListener::bind(addr).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        let shared =
            Arc::new(Shared { latest: Mutex::new(Latest::default()), cv: Condvar::new(), closed: AtomicBool::new(false), clients: AtomicUsize::new(0), teach });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("coca-preview".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| Error::InvalidArgument(format!("--preview: cannot start the server thread: {e}")))?;
        Ok(Preview { shared, addr, accept: Some(accept) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Keep the captured frame `frame` for `/teach` (only needed with a teach folder).
    pub fn publish_raw(&self, image: Arc<crate::vision::DecodedImage>, frame: u64) {
        if self.shared.teach.is_some() {
            self.shared.latest.lock().unwrap().raw = Some((image, frame));
        }
    }

    /// Whether frames can be taught (a teach folder was given).
    pub fn teaching(&self) -> bool {
        self.shared.teach.is_some()
    }

    /// Whether anyone is connected (frames need not be encoded for nobody).
    pub fn has_clients(&self) -> bool {
        self.shared.clients.load(Ordering::SeqCst) > 0
    }

    /// Make `jpeg` (and its JSON report) the frame every client gets next.
    pub fn publish(&self, jpeg: Vec<u8>, report_json: String) {
        let mut l = self.shared.latest.lock().unwrap();
        l.id += 1;
        l.jpeg = Some(Arc::new(jpeg));
        l.report = report_json;
        self.shared.cv.notify_all();
    }
}

impl Drop for Preview {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.closed.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => {
                if shared.clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
                    let mut conn = conn;
                    let _ = conn.write_all(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                }
                shared.clients.fetch_add(1, Ordering::SeqCst);
                let s = shared.clone();
                let spawned = std::thread::Builder::new().name("coca-preview-client".into()).spawn(move || {
                    if let Err(e) = serve(conn, &s) {
                        log::debug!("preview client: {e}");
                    }
                    s.clients.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    shared.clients.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(25)),
            Err(e) => {
                log::warn!("preview: {e}");
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>coca-edge preview</title>
<style>
body { background: #111; color: #ddd; font: 14px system-ui, sans-serif; margin: 0; padding: 12px; }
img { display: block; width: min(100%, 960px); min-width: 320px; border: 1px solid #333; }
pre { white-space: pre-wrap; font-size: 12px; color: #9c9; }
</style></head>
<body>
<img id="stream" src="/stream.mjpg" alt="annotated camera stream">
<!--TEACH-->
<pre id="report"></pre>
<script>
async function poll() {
  try { const r = await fetch('/report.json', {cache: 'no-store'}); document.getElementById('report').textContent = await r.text(); } catch (e) {}
  setTimeout(poll, 1000);
}
poll();
</script>
</body></html>
"#;

fn serve(conn: TcpStream, shared: &Shared) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut first = String::new();
    reader.by_ref().take(8192).read_line(&mut first)?;
    // skip the headers (bounded)
    let mut total = first.len();
    loop {
        let mut line = String::new();
        let n = reader.by_ref().take(8192).read_line(&mut line)?;
        total += n;
        if n == 0 || line == "\r\n" || line == "\n" || total > 32 * 1024 {
            break;
        }
    }
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let mut out = conn;
    if path == "/teach" && (method == "POST" || method == "GET") {
        return match teach(shared, target) {
            Ok(body) => respond(&mut out, "200 OK", "application/json", body.as_bytes()),
            Err((status, msg)) => respond(&mut out, status, "application/json", serde_json::json!({"error": msg}).to_string().as_bytes()),
        };
    }
    if method != "GET" && method != "HEAD" {
        return respond(&mut out, "405 Method Not Allowed", "text/plain", b"GET only\n");
    }
    match path {
        "/" | "/index.html" => {
            let page = PAGE.replace("<!--TEACH-->", if shared.teach.is_some() { TEACH_FORM } else { "" });
            respond(&mut out, "200 OK", "text/html; charset=utf-8", page.as_bytes())
        }
        "/report.json" => {
            let r = shared.latest.lock().unwrap().report.clone();
            respond(&mut out, "200 OK", "application/json", if r.is_empty() { b"{}" } else { r.as_bytes() })
        }
        "/frame.jpg" => match shared.latest.lock().unwrap().jpeg.clone() {
            Some(j) => respond(&mut out, "200 OK", "image/jpeg", &j),
            None => respond(&mut out, "503 Service Unavailable", "text/plain", b"no frame yet\n"),
        },
        "/stream.mjpg" => stream(&mut out, shared),
        _ => respond(&mut out, "404 Not Found", "text/plain", b"not found\n"),
    }
}

const TEACH_FORM: &str = r#"<form id="teach" onsubmit="return teach()">
<label>class <input id="cls" required maxlength="64" placeholder="e.g. red cup"></label>
<button>save this frame</button> <span id="taught"></span></form>
<script>
async function teach() {
  const c = document.getElementById('cls').value;
  const r = await fetch('/teach?class=' + encodeURIComponent(c), {method: 'POST'});
  const j = await r.json();
  document.getElementById('taught').textContent = j.error ? j.error : ('saved ' + j.saved + ' (' + j.count + ' in ' + j.class + ')');
  return false;
}
</script>"#;

/// A class name that is a safe folder name: not empty, at most 64 characters, no path
/// separators, no leading dot, no control characters.
pub fn valid_class_name(c: &str) -> bool {
    !c.trim().is_empty() && c.chars().count() <= 64 && !c.starts_with('.') && !c.chars().any(|ch| ch == '/' || ch == '\\' || ch.is_control())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn teach(shared: &Shared, target: &str) -> std::result::Result<String, (&'static str, String)> {
    let dir = shared.teach.as_ref().ok_or(("404 Not Found", "teaching is off: start coca stream with --teach DIR".to_string()))?;
    let query = target.split_once('?').map(|q| q.1).unwrap_or("");
    let class = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("class="))
        .and_then(percent_decode)
        .map(|c| c.trim().to_string())
        .ok_or(("400 Bad Request", "give ?class=NAME".to_string()))?;
    if !valid_class_name(&class) {
        return Err(("400 Bad Request", format!("class '{class}': use 1-64 characters, no '/', no leading '.'")));
    }
    let (img, frame) = shared.latest.lock().unwrap().raw.clone().ok_or(("503 Service Unavailable", "no frame yet".to_string()))?;
    let rgb = img.to_rgb8();
    let jpeg = crate::vision::encode_jpeg(&rgb, img.width(), img.height(), 95).map_err(|e| ("500 Internal Server Error", e.to_string()))?;
    let cdir = dir.join(&class);
    std::fs::create_dir_all(&cdir).map_err(|e| ("500 Internal Server Error", format!("{}: {e}", cdir.display())))?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let file = cdir.join(format!("{stamp}_{frame:06}.jpg"));
    std::fs::write(&file, jpeg).map_err(|e| ("500 Internal Server Error", format!("{}: {e}", file.display())))?;
    let count = std::fs::read_dir(&cdir).map(|d| d.count()).unwrap_or(0);
    log::info!("taught '{class}': {}", file.display());
    Ok(serde_json::json!({"saved": file.display().to_string(), "class": class, "count": count}).to_string())
}

fn respond(out: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    write!(out, "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n", body.len())?;
    out.write_all(body)?;
    out.flush()
}

fn stream(out: &mut TcpStream, shared: &Shared) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary={BOUNDARY}\r\nCache-Control: no-cache\r\nPragma: no-cache\r\nConnection: close\r\n\r\n"
    )?;
    out.flush()?;
    let mut sent = 0u64;
    loop {
        let jpeg = {
            let mut l = shared.latest.lock().unwrap();
            while (l.id == sent || l.jpeg.is_none()) && !shared.closed.load(Ordering::SeqCst) {
                l = shared.cv.wait_timeout(l, Duration::from_millis(500)).unwrap().0;
            }
            if shared.closed.load(Ordering::SeqCst) {
                return Ok(());
            }
            sent = l.id;
            l.jpeg.clone().unwrap()
        };
        write!(out, "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", jpeg.len())?;
        out.write_all(&jpeg)?;
        out.write_all(b"\r\n")?;
        out.flush()?;
    }
}
