//! JPEG decoding through libjpeg-turbo's decoder (as built by `mozjpeg-sys`, C only), the
//! decoder PIL uses: accurate integer IDCT (JDCT_ISLOW) and fancy upsampling, so our pixels are
//! the ones open_clip sees, bit for bit (checked on the fixtures).
//!
//! libjpeg reports fatal errors through `error_exit`, which here unwinds with
//! `resume_unwind` (no panic hook, nothing printed) to a `catch_unwind` around the decode.
//! A premature end of data is only a warning in libjpeg (it pads with grey); PIL refuses such a
//! file ("image file is truncated") and so do we. Other corrupt-data warnings are tolerated, as
//! PIL tolerates them.

use std::os::raw::c_int;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use mozjpeg_sys as ffi;

/// Why a file could not be decoded.
#[derive(Debug)]
pub(crate) enum JpegError {
    /// A valid JPEG this decoder does not handle; another decoder may.
    Unsupported(String),
    /// Truncated or corrupt data.
    Corrupt(String),
    /// Refused by the caller's size check (message from the check).
    Refused(String),
}

/// Decoded pixels, interleaved.
pub(crate) enum JpegPixels {
    Gray(Vec<u8>),
    Rgb(Vec<u8>),
    /// CMYK as Pillow holds a JPEG's CMYK ("CMYK;I" raw mode: Adobe's inverted values).
    Cmyk(Vec<u8>),
}

pub(crate) struct JpegImage {
    pub width: u32,
    pub height: u32,
    pub pixels: JpegPixels,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Gray,
    Rgb,
    Cmyk,
}

struct Fatal(String);

#[derive(Default)]
struct Warnings {
    premature_end: bool,
    first: Option<String>,
}

fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    unsafe {
        let err = &*cinfo.err;
        match err.format_message {
            Some(fmt) => {
                let buffer = [0u8; 80];
                fmt(cinfo, &buffer);
                let end = buffer.iter().position(|&c| c == 0).unwrap_or(buffer.len());
                String::from_utf8_lossy(&buffer[..end]).into_owned()
            }
            None => format!("libjpeg error {}", err.msg_code),
        }
    }
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let msg = message(cinfo);
    resume_unwind(Box::new(Fatal(msg)));
}

unsafe extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    if level >= 0 {
        return; // trace messages
    }
    let msg = message(cinfo);
    let w = &mut *(cinfo.client_data as *mut Warnings);
    if msg.starts_with("Premature end of JPEG file") {
        w.premature_end = true;
    }
    if w.first.is_none() {
        w.first = Some(msg);
    }
}

/// Decode a whole JPEG held in memory. `check_size(width, height)` runs after the header is
/// read and before any pixel memory is allocated; an `Err` refuses the image. `max_memory` caps
/// libjpeg's own allocations (coefficient buffers of progressive files).
pub(crate) fn decode(bytes: &[u8], check_size: impl Fn(u64, u64) -> Result<(), String>, max_memory: u64) -> Result<JpegImage, JpegError> {
    if bytes.is_empty() {
        return Err(JpegError::Corrupt("empty JPEG data".into()));
    }
    let mut err: Box<ffi::jpeg_error_mgr> = Box::new(unsafe { std::mem::zeroed() });
    let mut warnings = Box::new(Warnings::default());
    let mut cinfo: Box<ffi::jpeg_decompress_struct> = Box::new(unsafe { std::mem::zeroed() });
    unsafe {
        ffi::jpeg_std_error(&mut err);
    }
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    cinfo.common.err = &mut *err;
    cinfo.common.client_data = (&mut *warnings) as *mut Warnings as *mut _;

    let mut created = false;
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<JpegImage, JpegError> {
        unsafe {
            ffi::jpeg_create_decompress(&mut *cinfo);
            created = true;
            (*cinfo.common.mem).max_memory_to_use = max_memory.min(i64::MAX as u64) as _;
            ffi::jpeg_mem_src(&mut cinfo, bytes.as_ptr(), bytes.len() as _);
            ffi::jpeg_read_header(&mut cinfo, 1);
            let (w, h) = (cinfo.image_width, cinfo.image_height);
            check_size(w as u64, h as u64).map_err(JpegError::Refused)?;
            let layout = match (cinfo.jpeg_color_space, cinfo.num_components) {
                (ffi::J_COLOR_SPACE::JCS_GRAYSCALE, 1) => {
                    cinfo.out_color_space = ffi::J_COLOR_SPACE::JCS_GRAYSCALE;
                    Layout::Gray
                }
                (ffi::J_COLOR_SPACE::JCS_CMYK | ffi::J_COLOR_SPACE::JCS_YCCK, 4) => {
                    cinfo.out_color_space = ffi::J_COLOR_SPACE::JCS_CMYK;
                    Layout::Cmyk
                }
                (ffi::J_COLOR_SPACE::JCS_YCbCr | ffi::J_COLOR_SPACE::JCS_RGB, 3) => {
                    cinfo.out_color_space = ffi::J_COLOR_SPACE::JCS_RGB;
                    Layout::Rgb
                }
                (cs, n) => return Err(JpegError::Unsupported(format!("{n} components in colour space {cs:?}"))),
            };
            // PIL's defaults: accurate integer IDCT, fancy upsampling, no block smoothing tweaks
            cinfo.dct_method = ffi::J_DCT_METHOD::JDCT_ISLOW;
            cinfo.do_fancy_upsampling = 1;
            ffi::jpeg_start_decompress(&mut cinfo);
            let (ow, oh, oc) = (cinfo.output_width as usize, cinfo.output_height as usize, cinfo.output_components as usize);
            let stride = ow * oc;
            let mut data = vec![0u8; stride * oh];
            while (cinfo.output_scanline as usize) < oh {
                let row = cinfo.output_scanline as usize;
                let mut ptr = data[row * stride..].as_mut_ptr();
                let n = ffi::jpeg_read_scanlines(&mut cinfo, &mut ptr, 1);
                if n == 0 || warnings.premature_end {
                    return Err(JpegError::Corrupt("premature end of data".into()));
                }
            }
            ffi::jpeg_finish_decompress(&mut cinfo);
            if warnings.premature_end {
                return Err(JpegError::Corrupt("premature end of data".into()));
            }
            if let Some(w) = &warnings.first {
                log::debug!("JPEG decoded with a libjpeg warning: {w}");
            }
            let pixels = match layout {
                Layout::Gray => JpegPixels::Gray(data),
                Layout::Rgb => JpegPixels::Rgb(data),
                Layout::Cmyk => {
                    // Pillow decodes every CMYK JPEG as "CMYK;I" (Adobe's inverted convention)
                    data.iter_mut().for_each(|v| *v = 255 - *v);
                    JpegPixels::Cmyk(data)
                }
            };
            Ok(JpegImage { width: ow as u32, height: oh as u32, pixels })
        }
    }));
    if created {
        unsafe { ffi::jpeg_destroy_decompress(&mut cinfo) };
    }
    match result {
        Ok(r) => r,
        Err(payload) => match payload.downcast::<Fatal>() {
            Ok(f) => Err(JpegError::Corrupt(f.0)),
            Err(p) => resume_unwind(p),
        },
    }
}

/// Encode packed RGB8 as a baseline JPEG (libjpeg-turbo's defaults: the fastest profile, not
/// mozjpeg's trellis search) at `quality` 1..=100. For annotated frames (`--save`, the preview):
/// several times faster than a pure-Rust encoder, which matters next to a 3 ms encoder.
pub(crate) fn encode_rgb(rgb: &[u8], width: u32, height: u32, quality: u8) -> Result<Vec<u8>, String> {
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 || rgb.len() != w * h * 3 || width > 65500 || height > 65500 {
        return Err(format!("cannot encode a {width}x{height} RGB frame from {} bytes", rgb.len()));
    }
    let mut err: Box<ffi::jpeg_error_mgr> = Box::new(unsafe { std::mem::zeroed() });
    let mut warnings = Box::new(Warnings::default());
    let mut cinfo: Box<ffi::jpeg_compress_struct> = Box::new(unsafe { std::mem::zeroed() });
    unsafe {
        ffi::jpeg_std_error(&mut err);
    }
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    cinfo.common.err = &mut *err;
    cinfo.common.client_data = (&mut *warnings) as *mut Warnings as *mut _;
    let mut buf: *mut u8 = std::ptr::null_mut();
    let mut size: std::os::raw::c_ulong = 0;
    let mut created = false;
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        ffi::jpeg_create_compress(&mut *cinfo);
        created = true;
        ffi::jpeg_mem_dest(&mut cinfo, &mut buf, &mut size);
        cinfo.image_width = width;
        cinfo.image_height = height;
        cinfo.input_components = 3;
        cinfo.in_color_space = ffi::J_COLOR_SPACE::JCS_RGB;
        ffi::jpeg_c_set_int_param(&mut cinfo, ffi::J_INT_PARAM::JINT_COMPRESS_PROFILE, ffi::JCP_FASTEST as c_int);
        ffi::jpeg_set_defaults(&mut cinfo);
        ffi::jpeg_set_quality(&mut cinfo, quality.clamp(1, 100) as c_int, 1);
        ffi::jpeg_start_compress(&mut cinfo, 1);
        while (cinfo.next_scanline as usize) < h {
            let row = cinfo.next_scanline as usize;
            let ptr = rgb[row * w * 3..].as_ptr();
            ffi::jpeg_write_scanlines(&mut cinfo, &ptr, 1);
        }
        ffi::jpeg_finish_compress(&mut cinfo);
    }));
    if created {
        unsafe { ffi::jpeg_destroy_compress(&mut cinfo) };
    }
    let out = if buf.is_null() { Vec::new() } else { unsafe { std::slice::from_raw_parts(buf, size as usize).to_vec() } };
    if !buf.is_null() {
        // jpeg_mem_dest's buffer comes from malloc
        unsafe { libc::free(buf as *mut libc::c_void) };
    }
    match result {
        Ok(()) => Ok(out),
        Err(payload) => match payload.downcast::<Fatal>() {
            Ok(f) => Err(f.0),
            Err(p) => resume_unwind(p),
        },
    }
}
