//! C ABI: a thin layer over the public Rust API ([`Pipeline`], [`vision`], [`classify`]).
//! The header `include/coca_edge.h` is generated from this file by cbindgen (pinned, checked in
//! CI by `tests/c_abi.rs`).
//!
//! Rules every function follows (after rustls-ffi):
//! - a panic guard (`catch_unwind`) around the body: a panic becomes `COCA_STATUS_PANIC` and
//!   poisons the model handle it happened on (later calls get `COCA_STATUS_POISONED`);
//! - every pointer is checked for null, every length for consistency, every string for UTF-8;
//! - outputs are written only on success;
//! - `*_free` functions accept null and set the caller's pointer to null;
//! - nothing is printed: messages go to the thread-local last error and to the log callback.
//!
//! Thread safety: a `CocaModel` may be shared between threads; calls on one model are
//! serialised by an internal lock. A `CocaResult` is immutable and may be read from several
//! threads, but must not be read while (or after) it is freed. Status codes are never reused.
//!
//! # Safety
//! Every `unsafe extern "C"` function here has the same contract, so it is stated once: each
//! pointer argument is null (refused with `COCA_STATUS_NULL_POINTER` unless its doc says null is
//! accepted) or valid for the reads or writes its doc describes (`cap` elements or bytes for a
//! buffer, a NUL-terminated string for `const char *`); handles come from this library and are
//! not used after their `*_free`. Null is checked; validity and lifetimes cannot be.
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use crate::classify::{self, LabelSet, Score, Templates};
use crate::error::Error;
use crate::model::EngineOptions;
use crate::pipeline::{FrameRequest, FrameResult, Pipeline, PipelineOptions};
use crate::vision::{self, PixelFormat};

/// Result of every fallible call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CocaStatus {
    Ok = 0,
    /// a required pointer argument was null
    NullPointer = 1,
    /// an argument is out of range or inconsistent (sizes, strides, enum values, counts)
    InvalidArgument = 2,
    /// a string argument is not valid UTF-8
    InvalidUtf8 = 3,
    /// the model bundle is missing, corrupt or does not match its manifest
    Bundle = 4,
    /// the image or frame could not be used
    Image = 5,
    /// labels or templates are unusable
    Labels = 6,
    /// the inference engine failed
    Engine = 7,
    /// `coca_model_process` needs labels: call `coca_model_set_labels` first
    NoLabels = 8,
    /// a caller-supplied buffer is too small (the needed size is returned)
    BufferTooSmall = 9,
    /// a panic was caught inside the library; the model handle is now poisoned
    Panic = 10,
    /// the model handle was poisoned by an earlier panic: free it and open a new one
    Poisoned = 11,
    /// a file could not be read
    Io = 12,
}

/// Pixel layouts of `coca_model_process` frames.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CocaPixelFormat {
    Rgb8 = 0,
    Rgba8 = 1,
    Bgr8 = 2,
    Gray8 = 3,
    /// YUV 4:2:2 Y0 U Y1 V, BT.601 limited range; even width
    Yuyv = 4,
    /// YUV 4:2:0, Y plane then interleaved UV plane with the same stride; even width and height
    Nv12 = 5,
}

/// Options for `coca_model_open`. Initialise with `coca_options_default`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CocaOptions {
    /// `sizeof(CocaOptions)`, set by `coca_options_default`; lets the struct grow compatibly
    pub struct_size: u32,
    /// inference threads; 0 = all cores
    pub threads: u32,
    /// "f32" (default when null), "int8" or "f16": the bundle's variants where it has them;
    /// an unknown name, or f16 on a CPU without fp16 arithmetic, is COCA_STATUS_INVALID_ARGUMENT
    pub precision: *const c_char,
    /// "cpu" (default when null); the CUDA backend is not part of this build
    pub backend: *const c_char,
    /// 1 = cache label embeddings on disk ($COCA_CACHE_DIR or ~/.cache/coca-edge), 0 = never
    pub label_cache: u32,
    /// board profile ("raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "jetson-agx-orin",
    /// "auto"; null = none): its threads and precision
    /// are the defaults when `threads` is 0 and `precision` is null
    pub board: *const c_char,
}

/// Search strategies of `CocaCaptionOptions.search`.
pub const COCA_SEARCH_GREEDY: i32 = 0;
pub const COCA_SEARCH_BEAM: i32 = 1;
pub const COCA_SEARCH_TOP_K: i32 = 2;
pub const COCA_SEARCH_TOP_P: i32 = 3;

/// Caption settings for `coca_model_caption`. Initialise with `coca_caption_options_default`
/// (open_clip generate()'s defaults: beam search, 6 beams, 3 groups, 30 tokens, min 5).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CocaCaptionOptions {
    /// `sizeof(CocaCaptionOptions)`, set by `coca_caption_options_default`
    pub struct_size: u32,
    /// one of `COCA_SEARCH_*`
    pub search: i32,
    pub beams: u32,
    pub beam_groups: u32,
    /// longest sequence, start token included (open_clip's seq_len); a caption stops at the decoder's last position if that comes first
    pub max_tokens: u32,
    /// EOT forbidden before this length (open_clip's min_seq_len)
    pub min_tokens: u32,
    pub top_k: u32,
    pub top_p: f32,
    pub temperature: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// One scored label of a result. `label` is borrowed from the result: valid until
/// `coca_result_free`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CocaLabelScore {
    pub label: *const c_char,
    /// index of the label in the set given to `coca_model_set_labels`
    pub index: u32,
    /// softmax(logit_scale * cosine) over the label set
    pub probability: f32,
    pub cosine: f32,
}

/// Log levels passed to the log callback.
pub const COCA_LOG_ERROR: i32 = 1;
pub const COCA_LOG_WARN: i32 = 2;
pub const COCA_LOG_INFO: i32 = 3;
pub const COCA_LOG_DEBUG: i32 = 4;

/// Version of this C ABI; bumped on any incompatible change.
pub const COCA_ABI_VERSION: u32 = 1;

/// Log callback: `level` is one of `COCA_LOG_*`, `message` is valid during the call only.
pub type CocaLogCallback = Option<extern "C" fn(level: i32, message: *const c_char, user_data: *mut c_void)>;

/// An opened model bundle with its label set.
pub struct CocaModel {
    inner: Mutex<ModelInner>,
    poisoned: AtomicBool,
}

struct ModelInner {
    pipeline: Pipeline,
    labels: Option<LabelSet>,
    head: Option<crate::head::Head>,
}

/// The output of one processed frame.
pub struct CocaResult {
    /// the features (kept so `coca_model_caption` needs no second encoder pass) and scores
    frame: FrameResult,
    labels_c: Vec<CString>,
    head_labels_c: Vec<CString>,
}

impl CocaResult {
    fn scores(&self) -> &[Score] {
        self.frame.scores.as_deref().unwrap_or_default()
    }
    fn head_scores(&self) -> &[Score] {
        self.frame.head_scores.as_deref().unwrap_or_default()
    }
}

// ------------------------------------------------------------------------------ errors and guard

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let clean: String = msg.replace('\0', " ");
    log::debug!("{clean}");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(clean).unwrap_or_default());
}

fn status_of(e: &Error) -> CocaStatus {
    match e {
        Error::Io { .. } => CocaStatus::Io,
        Error::Manifest { .. } | Error::FormatVersion { .. } | Error::Integrity { .. } | Error::GraphMismatch { .. } | Error::Vocab { .. } => {
            CocaStatus::Bundle
        }
        Error::Engine { .. } => CocaStatus::Engine,
        Error::Image { .. } => CocaStatus::Image,
        Error::Labels { .. } => CocaStatus::Labels,
        Error::InvalidArgument(_) => CocaStatus::InvalidArgument,
        // the C ABI runs on frames the caller passes; sources are the CLI's
        Error::Source { .. } | Error::SourceStalled { .. } | Error::Watchdog { .. } => CocaStatus::Io,
    }
}

struct Fail(CocaStatus, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail(status_of(&e), crate::error::one_line(&e.to_string()))
    }
}

fn fail(status: CocaStatus, msg: impl Into<String>) -> Fail {
    Fail(status, msg.into())
}

/// Run `f` behind a panic guard; record the error; poison `model` on panic.
fn guard(model: Option<&CocaModel>, f: impl FnOnce() -> Result<(), Fail>) -> CocaStatus {
    if let Some(m) = model {
        if m.poisoned.load(Ordering::SeqCst) {
            set_last_error("model handle poisoned by an earlier panic: free it and open a new one");
            return CocaStatus::Poisoned;
        }
    }
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            CocaStatus::Ok
        }
        Ok(Err(Fail(status, msg))) => {
            set_last_error(&msg);
            status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            if let Some(m) = model {
                m.poisoned.store(true, Ordering::SeqCst);
            }
            set_last_error(&format!("internal error (panic): {what}"));
            CocaStatus::Panic
        }
    }
}

unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(fail(CocaStatus::NullPointer, format!("{what} is null")));
    }
    CStr::from_ptr(p).to_str().map_err(|_| fail(CocaStatus::InvalidUtf8, format!("{what} is not valid UTF-8")))
}

unsafe fn str_list(p: *const *const c_char, n: usize, what: &str) -> Result<Vec<String>, Fail> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(fail(CocaStatus::NullPointer, format!("{what} is null with a count of {n}")));
    }
    if n > classify::MAX_LABELS {
        return Err(fail(CocaStatus::InvalidArgument, format!("{n} {what}, over the limit of {}", classify::MAX_LABELS)));
    }
    let ptrs = std::slice::from_raw_parts(p, n);
    ptrs.iter().enumerate().map(|(i, &s)| str_arg(s, &format!("{what}[{i}]")).map(str::to_string)).collect()
}

fn lock(m: &CocaModel) -> Result<std::sync::MutexGuard<'_, ModelInner>, Fail> {
    m.inner.lock().map_err(|_| fail(CocaStatus::Poisoned, "model handle poisoned by an earlier panic"))
}

// ------------------------------------------------------------------------------ library

/// Version of the library, e.g. "0.1.0" (static string, never freed).
#[no_mangle]
pub extern "C" fn coca_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// Version of the C ABI (`COCA_ABI_VERSION` of the header the library was built with).
#[no_mangle]
pub extern "C" fn coca_abi_version() -> u32 {
    COCA_ABI_VERSION
}

/// The last error on this thread, "" after a success. Valid until the next call on this thread.
#[no_mangle]
pub extern "C" fn coca_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Copy the last error on this thread into `buf` (NUL-terminated, truncated to `cap`).
/// Returns the length the full message needs, NUL included (so `cap` >= that means complete).
/// `buf` may be null when `cap` is 0.
#[no_mangle]
pub unsafe extern "C" fn coca_last_error_copy(buf: *mut c_char, cap: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR.with(|e| {
            let e = e.borrow();
            let bytes = e.as_bytes();
            if !buf.is_null() && cap > 0 {
                let n = bytes.len().min(cap - 1);
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n);
                *buf.add(n) = 0;
            }
            bytes.len() + 1
        })
    })
    .unwrap_or(0)
}

struct CallbackLogger;
static LOG_CALLBACK: RwLock<Option<(extern "C" fn(i32, *const c_char, *mut c_void), usize)>> = RwLock::new(None);

impl log::Log for CallbackLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        LOG_CALLBACK.read().map(|c| c.is_some()).unwrap_or(false)
    }
    fn log(&self, record: &log::Record) {
        if let Ok(guard) = LOG_CALLBACK.read() {
            if let Some((cb, user)) = *guard {
                let level = match record.level() {
                    log::Level::Error => COCA_LOG_ERROR,
                    log::Level::Warn => COCA_LOG_WARN,
                    log::Level::Info => COCA_LOG_INFO,
                    _ => COCA_LOG_DEBUG,
                };
                let msg = CString::new(format!("{}", record.args()).replace('\0', " ")).unwrap_or_default();
                cb(level, msg.as_ptr(), user as *mut c_void);
            }
        }
    }
    fn flush(&self) {}
}

/// Route the library's log messages to `callback` at `max_level` (`COCA_LOG_*`) and below;
/// null disables logging. Without a callback the library prints nothing. Fails with
/// `COCA_STATUS_INVALID_ARGUMENT` if the host process already installed another Rust logger.
#[no_mangle]
pub extern "C" fn coca_set_log_callback(callback: CocaLogCallback, max_level: i32, user_data: *mut c_void) -> CocaStatus {
    let user = user_data as usize;
    guard(None, || {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        let mut ok = true;
        INSTALLED.call_once(|| ok = log::set_logger(&CallbackLogger).is_ok());
        if !ok {
            return Err(fail(CocaStatus::InvalidArgument, "another logger is already installed in this process"));
        }
        *LOG_CALLBACK.write().map_err(|_| fail(CocaStatus::Poisoned, "log callback lock poisoned"))? = callback.map(|cb| (cb, user));
        log::set_max_level(match max_level {
            i32::MIN..=0 => log::LevelFilter::Off,
            COCA_LOG_ERROR => log::LevelFilter::Error,
            COCA_LOG_WARN => log::LevelFilter::Warn,
            COCA_LOG_INFO => log::LevelFilter::Info,
            _ => log::LevelFilter::Debug,
        });
        Ok(())
    })
}

// ------------------------------------------------------------------------------ model

/// Fill `out` with the defaults: all cores, f32, CPU, label cache on.
#[no_mangle]
pub unsafe extern "C" fn coca_options_default(out: *mut CocaOptions) -> CocaStatus {
    guard(None, || {
        if out.is_null() {
            return Err(fail(CocaStatus::NullPointer, "options is null"));
        }
        out.write(CocaOptions {
            struct_size: std::mem::size_of::<CocaOptions>() as u32,
            threads: 0,
            precision: std::ptr::null(),
            backend: std::ptr::null(),
            label_cache: 1,
            board: std::ptr::null(),
        });
        Ok(())
    })
}

/// Open the bundle folder `bundle_dir` (checked against its manifest) and load its image
/// encoder. `options` may be null for the defaults. On success `*out` owns a new model; free it
/// with `coca_model_free`.
#[no_mangle]
pub unsafe extern "C" fn coca_model_open(bundle_dir: *const c_char, options: *const CocaOptions, out: *mut *mut CocaModel) -> CocaStatus {
    guard(None, || {
        if out.is_null() {
            return Err(fail(CocaStatus::NullPointer, "out is null"));
        }
        let dir = str_arg(bundle_dir, "bundle_dir")?;
        let mut opts = PipelineOptions::default();
        let mut cache = true;
        if !options.is_null() {
            let o = &*options;
            if o.struct_size as usize != std::mem::size_of::<CocaOptions>() {
                return Err(fail(
                    CocaStatus::InvalidArgument,
                    format!("options.struct_size is {}, expected {} (initialise with coca_options_default)", o.struct_size, std::mem::size_of::<CocaOptions>()),
                ));
            }
            if o.threads as usize > crate::model::MAX_THREADS {
                return Err(fail(CocaStatus::InvalidArgument, format!("options.threads {} is more than {}", o.threads, crate::model::MAX_THREADS)));
            }
            let board = if o.board.is_null() { None } else { crate::board::BoardProfile::resolve(str_arg(o.board, "options.board")?)?.map(|(b, _)| b) };
            let precision = if o.precision.is_null() { None } else { Some(str_arg(o.precision, "options.precision")?) };
            let threads = (o.threads != 0).then_some(o.threads as usize);
            let backend = if o.backend.is_null() { "cpu" } else { str_arg(o.backend, "options.backend")? };
            if backend != "cpu" {
                return Err(fail(CocaStatus::InvalidArgument, format!("options.backend '{backend}': only 'cpu' is available in this build")));
            }
            opts.engine = EngineOptions::for_board(board.as_ref(), threads, precision);
            cache = o.label_cache != 0;
        }
        if cache {
            opts.cache_dir = classify::LabelCache::default_dir();
        }
        let pipeline = Pipeline::open(Path::new(dir), opts)?;
        let model = Box::new(CocaModel { inner: Mutex::new(ModelInner { pipeline, labels: None, head: None }), poisoned: AtomicBool::new(false) });
        out.write(Box::into_raw(model));
        Ok(())
    })
}

/// Free a model and set `*model` to null. Null and `*model == NULL` are accepted.
#[no_mangle]
pub unsafe extern "C" fn coca_model_free(model: *mut *mut CocaModel) {
    let _ = catch_unwind(|| {
        if model.is_null() || (*model).is_null() {
            return;
        }
        drop(Box::from_raw(*model));
        *model = std::ptr::null_mut();
    });
}

/// Length of the embedding vectors of this model.
#[no_mangle]
pub unsafe extern "C" fn coca_model_embed_dim(model: *const CocaModel, out: *mut usize) -> CocaStatus {
    let Some(m) = model.as_ref() else {
        set_last_error("model is null");
        return CocaStatus::NullPointer;
    };
    guard(Some(m), || {
        if out.is_null() {
            return Err(fail(CocaStatus::NullPointer, "out is null"));
        }
        let inner = lock(m)?;
        out.write(inner.pipeline.bundle().manifest().dims.embed_dim);
        Ok(())
    })
}

/// Set the zero-shot labels (`n_labels` UTF-8 strings) and prompt templates (`n_templates`
/// strings with one `{}` placeholder each; `templates` null and `n_templates` 0 for the model's
/// own templates, or open_clip's 80 ImageNet templates when it names none). Runs the text encoder unless the label cache has this set.
#[no_mangle]
pub unsafe extern "C" fn coca_model_set_labels(
    model: *mut CocaModel,
    labels: *const *const c_char,
    n_labels: usize,
    templates: *const *const c_char,
    n_templates: usize,
) -> CocaStatus {
    let Some(m) = model.as_ref() else {
        set_last_error("model is null");
        return CocaStatus::NullPointer;
    };
    guard(Some(m), || {
        if n_labels == 0 {
            return Err(fail(CocaStatus::Labels, "labels: no labels given"));
        }
        let labels = str_list(labels, n_labels, "labels")?;
        let labels = classify::parse_label_list_vec(labels)?;
        let templates = if n_templates == 0 && templates.is_null() {
            None
        } else {
            let t = str_list(templates, n_templates, "templates")?;
            Some(Templates::parse(&t.join("\n"), "templates")?)
        };
        let mut inner = lock(m)?;
        let templates = match templates {
            Some(t) => t,
            None => inner.pipeline.default_templates()?,
        };
        let set = inner.pipeline.label_set(&labels, &templates, |_, _| {})?;
        inner.labels = Some(set);
        Ok(())
    })
}

/// Process one frame: convert, preprocess, encode; score the labels if any were set
/// (`top_k` best, 0 for none). `stride` is bytes between rows (0 = packed). `data_len` is the
/// size of the buffer at `data`. On success `*out` owns a new result: free it with
/// `coca_result_free`.
#[no_mangle]
pub unsafe extern "C" fn coca_model_process(
    model: *mut CocaModel,
    data: *const u8,
    data_len: usize,
    width: u32,
    height: u32,
    stride: u32,
    format: i32,
    top_k: u32,
    out: *mut *mut CocaResult,
) -> CocaStatus {
    let Some(m) = model.as_ref() else {
        set_last_error("model is null");
        return CocaStatus::NullPointer;
    };
    guard(Some(m), || {
        if out.is_null() {
            return Err(fail(CocaStatus::NullPointer, "out is null"));
        }
        if data.is_null() {
            return Err(fail(CocaStatus::NullPointer, "data is null"));
        }
        let format = match format {
            0 => PixelFormat::Rgb8,
            1 => PixelFormat::Rgba8,
            2 => PixelFormat::Bgr8,
            3 => PixelFormat::Gray8,
            4 => PixelFormat::Yuyv,
            5 => PixelFormat::Nv12,
            other => return Err(fail(CocaStatus::InvalidArgument, format!("pixel format {other} is not a CocaPixelFormat"))),
        };
        let bytes = std::slice::from_raw_parts(data, data_len);
        let img = vision::frame_to_image(bytes, width, height, stride as usize, format).map_err(|e| Fail(CocaStatus::Image, e.to_string()))?;
        let inner = lock(m)?;
        if top_k > 0 && inner.labels.is_none() && inner.head.is_none() {
            return Err(fail(CocaStatus::NoLabels, "top_k > 0 but neither labels nor a head are set: call coca_model_set_labels or coca_model_set_head first"));
        }
        let scored = top_k > 0;
        let req = FrameRequest {
            labels: inner.labels.as_ref().filter(|_| scored),
            head: inner.head.as_ref().filter(|_| scored),
            top_k: top_k as usize,
            ..Default::default()
        };
        let frame = inner.pipeline.process(&img, &req)?;
        let c_names = |v: Option<&Vec<Score>>| v.into_iter().flatten().map(|s| CString::new(s.label.replace('\0', " ")).unwrap_or_default()).collect();
        let (labels_c, head_labels_c) = (c_names(frame.scores.as_ref()), c_names(frame.head_scores.as_ref()));
        out.write(Box::into_raw(Box::new(CocaResult { frame, labels_c, head_labels_c })));
        Ok(())
    })
}

/// Copy the result's L2-normalised embedding into `out` (`cap` floats). `*written` (may be
/// null) receives the embedding length; if `cap` is too small nothing is copied and
/// `COCA_STATUS_BUFFER_TOO_SMALL` is returned.
#[no_mangle]
pub unsafe extern "C" fn coca_result_embedding(result: *const CocaResult, out: *mut f32, cap: usize, written: *mut usize) -> CocaStatus {
    guard(None, || {
        let r = result.as_ref().ok_or_else(|| fail(CocaStatus::NullPointer, "result is null"))?;
        let embedding = &r.frame.features.embedding;
        let n = embedding.len();
        if !written.is_null() {
            written.write(n);
        }
        if cap < n {
            return Err(fail(CocaStatus::BufferTooSmall, format!("embedding needs {n} floats, buffer holds {cap}")));
        }
        if out.is_null() {
            return Err(fail(CocaStatus::NullPointer, "out is null"));
        }
        std::ptr::copy_nonoverlapping(embedding.as_ptr(), out, n);
        Ok(())
    })
}

/// Copy up to `cap` scored labels (best first) into `out`; `*written` receives how many.
/// Label strings are borrowed from the result.
#[no_mangle]
pub unsafe extern "C" fn coca_result_labels(result: *const CocaResult, out: *mut CocaLabelScore, cap: usize, written: *mut usize) -> CocaStatus {
    guard(None, || {
        let r = result.as_ref().ok_or_else(|| fail(CocaStatus::NullPointer, "result is null"))?;
        copy_scores(r.scores(), &r.labels_c, out, cap, written)
    })
}

/// Copy up to `cap` scores into `out` and their count into `*written` (labels and head labels).
unsafe fn copy_scores(scores: &[Score], names: &[CString], out: *mut CocaLabelScore, cap: usize, written: *mut usize) -> Result<(), Fail> {
    if written.is_null() {
        return Err(fail(CocaStatus::NullPointer, "written is null"));
    }
    let n = scores.len().min(cap);
    if n > 0 && out.is_null() {
        return Err(fail(CocaStatus::NullPointer, "out is null"));
    }
    for (i, (s, c)) in scores.iter().zip(names).take(n).enumerate() {
        out.add(i).write(CocaLabelScore { label: c.as_ptr(), index: s.index as u32, probability: s.probability, cosine: s.cosine });
    }
    written.write(n);
    Ok(())
}

/// Set a head trained with `coca head train` (a JSON file at the UTF-8 path `head_path`; null
/// removes the head). A head trained on another bundle is refused (`COCA_STATUS_LABELS`).
/// With a head set, `coca_model_process` also scores its classes (`coca_result_head_labels`),
/// from the same encoder pass as the zero-shot labels.
#[no_mangle]
pub unsafe extern "C" fn coca_model_set_head(model: *mut CocaModel, head_path: *const c_char) -> CocaStatus {
    let Some(m) = model.as_ref() else {
        set_last_error("model is null");
        return CocaStatus::NullPointer;
    };
    guard(Some(m), || {
        let mut inner = lock(m)?;
        if head_path.is_null() {
            inner.head = None;
            return Ok(());
        }
        let path = str_arg(head_path, "head_path")?;
        let head = inner.pipeline.load_head(std::path::Path::new(path))?;
        inner.head = Some(head);
        Ok(())
    })
}

/// Copy up to `cap` of the head's scores (most probable first) into `out`, like
/// `coca_result_labels`; `*written` is 0 when no head was set. `label` pointers live as long as
/// the result.
#[no_mangle]
pub unsafe extern "C" fn coca_result_head_labels(result: *const CocaResult, out: *mut CocaLabelScore, cap: usize, written: *mut usize) -> CocaStatus {
    guard(None, || {
        let r = result.as_ref().ok_or_else(|| fail(CocaStatus::NullPointer, "result is null"))?;
        copy_scores(r.head_scores(), &r.head_labels_c, out, cap, written)
    })
}

/// Fill `out` with open_clip generate()'s defaults.
#[no_mangle]
pub unsafe extern "C" fn coca_caption_options_default(out: *mut CocaCaptionOptions) -> CocaStatus {
    guard(None, || {
        if out.is_null() {
            return Err(fail(CocaStatus::NullPointer, "options is null"));
        }
        let d = crate::caption::CaptionOptions::default();
        out.write(CocaCaptionOptions {
            struct_size: std::mem::size_of::<CocaCaptionOptions>() as u32,
            search: COCA_SEARCH_BEAM,
            beams: 6,
            beam_groups: 3,
            max_tokens: d.max_tokens as u32,
            min_tokens: d.min_tokens as u32,
            top_k: 50,
            top_p: 0.9,
            temperature: d.temperature,
            repetition_penalty: d.repetition_penalty,
            seed: d.seed,
        });
        Ok(())
    })
}

/// Caption the frame of `result` (from the same encoder pass; `options` null for the model's
/// defaults: open_clip's beam search, or greedy search where the bundle asks for it)
/// and copy the NUL-terminated UTF-8 text into `buf` (`cap` bytes). `*needed` (may be null)
/// receives the bytes the text needs with its NUL; if `cap` is smaller nothing is written and
/// `COCA_STATUS_BUFFER_TOO_SMALL` is returned. Needs a bundle with decoder graphs.
#[no_mangle]
pub unsafe extern "C" fn coca_model_caption(
    model: *mut CocaModel,
    result: *const CocaResult,
    options: *const CocaCaptionOptions,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> CocaStatus {
    let Some(m) = model.as_ref() else {
        set_last_error("model is null");
        return CocaStatus::NullPointer;
    };
    guard(Some(m), || {
        use crate::caption::{CaptionOptions, Search};
        let r = result.as_ref().ok_or_else(|| fail(CocaStatus::NullPointer, "result is null"))?;
        let mut opts = if options.is_null() { lock(m)?.pipeline.default_caption_options() } else { CaptionOptions::default() };
        if !options.is_null() {
            let o = &*options;
            if o.struct_size as usize != std::mem::size_of::<CocaCaptionOptions>() {
                return Err(fail(CocaStatus::InvalidArgument, "options.struct_size is wrong (initialise with coca_caption_options_default)"));
            }
            opts.search = match o.search {
                COCA_SEARCH_GREEDY => Search::Greedy,
                COCA_SEARCH_BEAM => Search::Beam { beams: o.beams as usize, groups: o.beam_groups as usize },
                COCA_SEARCH_TOP_K => Search::TopK { k: o.top_k as usize },
                COCA_SEARCH_TOP_P => Search::TopP { p: o.top_p },
                other => return Err(fail(CocaStatus::InvalidArgument, format!("options.search {other} is not a COCA_SEARCH_* value"))),
            };
            opts.max_tokens = o.max_tokens as usize;
            opts.min_tokens = o.min_tokens as usize;
            opts.temperature = o.temperature;
            opts.repetition_penalty = o.repetition_penalty;
            opts.seed = o.seed;
        }
        let inner = lock(m)?;
        let c = inner.pipeline.caption(&r.frame.features, &opts, |_, _| {})?;
        let text = CString::new(c.text.replace('\0', " ")).unwrap_or_default();
        let bytes = text.as_bytes_with_nul();
        if !needed.is_null() {
            needed.write(bytes.len());
        }
        if cap < bytes.len() {
            return Err(fail(CocaStatus::BufferTooSmall, format!("caption needs {} bytes, buffer holds {cap}", bytes.len())));
        }
        if buf.is_null() {
            return Err(fail(CocaStatus::NullPointer, "buf is null"));
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, bytes.len());
        Ok(())
    })
}

/// Free a result and set `*result` to null. Null and `*result == NULL` are accepted.
#[no_mangle]
pub unsafe extern "C" fn coca_result_free(result: *mut *mut CocaResult) {
    let _ = catch_unwind(|| {
        if result.is_null() || (*result).is_null() {
            return;
        }
        drop(Box::from_raw(*result));
        *result = std::ptr::null_mut();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_status_and_poisons_the_handle() {
        let dir = CString::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/coca-tiny-random")).unwrap();
        let mut model: *mut CocaModel = std::ptr::null_mut();
        let mut opts = std::mem::MaybeUninit::<CocaOptions>::uninit();
        unsafe {
            assert_eq!(coca_options_default(opts.as_mut_ptr()), CocaStatus::Ok);
            let mut opts = opts.assume_init();
            opts.label_cache = 0;
            assert_eq!(coca_model_open(dir.as_ptr(), &opts, &mut model), CocaStatus::Ok);
            let m = &*model;
            assert_eq!(guard(Some(m), || panic!("injected")), CocaStatus::Panic);
            assert!(CStr::from_ptr(coca_last_error()).to_str().unwrap().contains("injected"));
            let mut dim = 0usize;
            assert_eq!(coca_model_embed_dim(model, &mut dim), CocaStatus::Poisoned);
            assert_eq!(dim, 0, "no output on failure");
            coca_model_free(&mut model);
            assert!(model.is_null());
        }
    }
}
