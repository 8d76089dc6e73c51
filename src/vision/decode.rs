//! Decoding files into [`DecodedImage`]s in the mode `PIL.Image.open` would give them.

use std::io::{Cursor, Read};
use std::path::Path;

use super::jpeg::{JpegError, JpegPixels};
use super::{DecodeLimits, DecodedImage, PixelMode};
use crate::error::{one_line, Error, Result};

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Decode an image file held in memory. `name` is only used in error messages.
///
/// Formats: PNG, JPEG, GIF (first frame), BMP, TIFF (first page), WebP (first frame), PNM.
/// The format is recognised from the content, not the name. The header is checked against
/// `limits` before pixel memory is allocated, so a small file claiming 100000x100000 is refused
/// cheaply. Never panics; every failure is an [`Error::Image`] naming `name`.
///
/// The result is in the mode PIL's `Image.open` gives, so that [`super::preprocess_u8`]
/// resizes it as Pillow would:
///
/// * PNG (decoded with the `png` crate, no transformations): grey 1-bit is [`PixelMode::Bilevel`];
///   grey 2/4-bit are scaled to 8-bit [`PixelMode::L`] (x85, x17, as Pillow's unpackers);
///   palette images at any bit depth stay [`PixelMode::Palette`] with their `PLTE` and `tRNS`;
///   `tRNS` on grey/RGB images is ignored (PIL keeps it as metadata only). 16-bit RGB, RGBA
///   and grey+alpha keep their high byte, as Pillow's unpackers do (grey+alpha is kept as
///   [`PixelMode::LA`]; Pillow opens it as RGBA with equal colour channels, which resizes to the
///   same values); 16-bit grey is [`PixelMode::I16`] like Pillow's "I;16".
/// * GIF (`gif` crate, indexed output): the first frame on its logical screen (grown to fit the
///   frame, as Pillow does), background index 0 or the transparent index; mode
///   [`PixelMode::Palette`] with the local or global palette, or [`PixelMode::L`] when there is
///   no palette or it is the identity grey ramp (Pillow's rule).
/// * JPEG: `super::jpeg`, libjpeg-turbo's own decoder (through `mozjpeg-sys`), the decoder
///   Pillow uses, with Pillow's settings (accurate integer IDCT, fancy upsampling): the same
///   pixels bit for bit. Grey, YCbCr/RGB and CMYK/YCCK (four-component files become
///   [`PixelMode::Cmyk`] as Pillow reads them); other component layouts go to the `image`
///   crate, which may refuse them.
/// * BMP, TIFF, WebP, PNM: the `image` crate. Grey stays grey, RGB stays RGB, alpha stays
///   alpha; 16-bit grey is [`PixelMode::I16`], other 16-bit samples keep the high byte; float
///   samples are clamped to 0..=1 and scaled. Palette BMP/TIFF images are expanded to RGB by the
///   decoder, whereas Pillow keeps mode "P" and resizes them with nearest neighbour, so those
///   differ from open_clip (8-bit palette BMP: up to 50 levels). Binary PBM files become
///   [`PixelMode::Bilevel`] like PIL's mode "1".
/// * EXIF orientation is not applied (open_clip does not apply it either).
pub fn decode_image(bytes: &[u8], name: &str, limits: &DecodeLimits) -> Result<DecodedImage> {
    let fail = |message: String| Error::Image { name: name.to_string(), message: one_line(&message) };
    if bytes.is_empty() {
        return Err(fail("empty file (0 bytes)".into()));
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err(fail(format!("file is {} bytes, over the {}-byte limit", bytes.len(), limits.max_bytes)));
    }
    if bytes.starts_with(PNG_SIGNATURE) {
        return decode_png(bytes, limits).map_err(fail);
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return decode_gif(bytes, limits).map_err(fail);
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return match super::jpeg::decode(bytes, |w, h| check_size(w, h, limits), limits.max_pixels.saturating_mul(16).saturating_add(64 << 20)) {
            Ok(img) => jpeg_image(img).map_err(fail),
            Err(JpegError::Refused(m)) => Err(fail(m)),
            Err(JpegError::Corrupt(m)) => Err(fail(format!("truncated or corrupt JPEG: {m}"))),
            // not what libjpeg-turbo's default path handles: let the image crate try
            Err(JpegError::Unsupported(what)) => {
                decode_with_image_crate(bytes, image::ImageFormat::Jpeg, limits).map_err(|e| fail(format!("unsupported JPEG variant ({what}): {e}")))
            }
        };
    }
    use image::ImageFormat as F;
    match image::guess_format(bytes) {
        Ok(format @ (F::Jpeg | F::Bmp | F::Tiff | F::WebP | F::Pnm)) => decode_with_image_crate(bytes, format, limits).map_err(fail),
        Ok(other) => Err(fail(format!("not a supported image ({} format)", format_name(other)))),
        Err(_) => Err(fail("not a supported image (unknown format)".into())),
    }
}

/// Read and decode an image file. The file size is checked against `limits.max_bytes` before
/// the file is read; errors name the path as given.
pub fn load_image(path: &Path, limits: &DecodeLimits) -> Result<DecodedImage> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::Image { name, message: "is a directory, not an image file".into() });
    }
    if meta.len() > limits.max_bytes {
        return Err(Error::Image { name, message: format!("file is {} bytes, over the {}-byte limit", meta.len(), limits.max_bytes) });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // the file may grow between metadata() and read: never read more than the limit + 1
    file.take(limits.max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, &name, limits)
}

fn format_name(f: image::ImageFormat) -> String {
    use image::ImageFormat as F;
    match f {
        F::Jpeg => "JPEG".into(),
        F::Tiff => "TIFF".into(),
        F::WebP => "WebP".into(),
        F::Pnm => "PNM".into(),
        f => f.extensions_str().first().map_or_else(|| format!("{f:?}"), |e| e.to_uppercase()),
    }
}

/// Checks the header's size against the limits; messages are the part after "name: ".
fn check_size(width: u64, height: u64, limits: &DecodeLimits) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("image is {width}x{height}, which has no pixels"));
    }
    if width > limits.max_width as u64 || height > limits.max_height as u64 {
        return Err(format!("image is {width}x{height}, over the {}x{} limit", limits.max_width, limits.max_height));
    }
    let pixels = width * height;
    if pixels > limits.max_pixels {
        return Err(format!("image is {width}x{height} ({pixels} pixels), over the {}-pixel limit", limits.max_pixels));
    }
    Ok(())
}

/// Allocation budget handed to the decoders: the largest image the limits allow at 8 bytes per
/// pixel (16-bit RGBA) plus room for the decoders' own buffers.
fn alloc_budget(width: u64, height: u64) -> u64 {
    width.saturating_mul(height).saturating_mul(8).saturating_add(64 << 20)
}

fn u32_be(b: &[u8]) -> u64 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64
}

// ------------------------------------------------------------------------------------------ PNG

fn decode_png(bytes: &[u8], limits: &DecodeLimits) -> std::result::Result<DecodedImage, String> {
    // the IHDR chunk is first and fixed-size: check the size before the decoder allocates
    if bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        check_size(u32_be(&bytes[16..20]), u32_be(&bytes[20..24]), limits)?;
    }
    let corrupt = |e: png::DecodingError| match e {
        png::DecodingError::LimitsExceeded => "PNG needs more memory than the decode limits allow".to_string(),
        e => format!("truncated or corrupt PNG: {e}"),
    };
    let budget = if bytes.len() >= 24 { alloc_budget(u32_be(&bytes[16..20]), u32_be(&bytes[20..24])) } else { 64 << 20 };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: usize::try_from(budget).unwrap_or(usize::MAX) });
    decoder.set_transformations(png::Transformations::IDENTITY);
    decoder.set_ignore_text_chunk(true);
    let mut reader = decoder.read_info().map_err(corrupt)?;
    let info = reader.info();
    let (width, height) = (info.width, info.height);
    check_size(width as u64, height as u64, limits)?;
    let (color, depth) = (info.color_type, info.bit_depth as u8);
    let palette = info.palette.as_ref().map(|p| p.to_vec());
    let trns = info.trns.as_ref().map(|t| t.to_vec());

    let size = reader.output_buffer_size().ok_or("PNG image is too large to address in memory")?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(corrupt)?;
    let line = frame.line_size;
    let (w, h) = (width as usize, height as usize);

    use png::ColorType as C;
    let (mode, pixels) = match (color, depth) {
        (C::Grayscale, 1) => (PixelMode::Bilevel, unpack_bits(&buf, line, w, h, 1, |v| if v != 0 { 255 } else { 0 })),
        (C::Grayscale, 2) => (PixelMode::L, unpack_bits(&buf, line, w, h, 2, |v| v * 85)),
        (C::Grayscale, 4) => (PixelMode::L, unpack_bits(&buf, line, w, h, 4, |v| v * 17)),
        (C::Indexed, 1 | 2 | 4) => (palette_mode(palette, trns)?, unpack_bits(&buf, line, w, h, depth, |v| v)),
        (C::Indexed, 8) => (palette_mode(palette, trns)?, rows(&buf, line, w, h, 1)),
        (C::Grayscale, 8) => (PixelMode::L, rows(&buf, line, w, h, 1)),
        (C::GrayscaleAlpha, 8) => (PixelMode::LA, rows(&buf, line, w, h, 2)),
        (C::Rgb, 8) => (PixelMode::Rgb, rows(&buf, line, w, h, 3)),
        (C::Rgba, 8) => (PixelMode::Rgba, rows(&buf, line, w, h, 4)),
        (C::Grayscale, 16) => (PixelMode::I16, swap_bytes(&buf, line, w, h)),
        (C::GrayscaleAlpha, 16) => (PixelMode::LA, high_bytes(&buf, line, w, h, 2)),
        (C::Rgb, 16) => (PixelMode::Rgb, high_bytes(&buf, line, w, h, 3)),
        (C::Rgba, 16) => (PixelMode::Rgba, high_bytes(&buf, line, w, h, 4)),
        (c, d) => return Err(format!("unsupported PNG colour type {c:?} at bit depth {d}")),
    };
    DecodedImage::new(width, height, mode, pixels).map_err(|e| e.to_string())
}

fn palette_mode(palette: Option<Vec<u8>>, trns: Option<Vec<u8>>) -> std::result::Result<PixelMode, String> {
    let palette = palette.ok_or("corrupt PNG: palette image without a PLTE chunk")?;
    let colors: Vec<[u8; 3]> = palette.chunks_exact(3).take(256).map(|c| [c[0], c[1], c[2]]).collect();
    Ok(PixelMode::Palette { colors, alpha: trns })
}

/// Packed 8-bit rows (no filter byte) to a tight buffer.
fn rows(buf: &[u8], line: usize, w: usize, h: usize, c: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(w * h * c);
    for y in 0..h {
        out.extend_from_slice(&buf[y * line..y * line + w * c]);
    }
    out
}

/// 16-bit big-endian samples to their high byte.
fn high_bytes(buf: &[u8], line: usize, w: usize, h: usize, c: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(w * h * c);
    for y in 0..h {
        out.extend(buf[y * line..y * line + w * c * 2].iter().step_by(2));
    }
    out
}

/// 16-bit big-endian grey rows to tight little-endian samples.
fn swap_bytes(buf: &[u8], line: usize, w: usize, h: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(w * h * 2);
    for y in 0..h {
        for p in buf[y * line..y * line + w * 2].chunks_exact(2) {
            out.extend_from_slice(&[p[1], p[0]]);
        }
    }
    out
}

/// Sub-byte samples (MSB first) to one byte each, through `map`.
fn unpack_bits(buf: &[u8], line: usize, w: usize, h: usize, bits: u8, map: impl Fn(u8) -> u8) -> Vec<u8> {
    let per_byte = 8 / bits as usize;
    let mask = (1u8 << bits) - 1;
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * line..(y + 1) * line];
        for x in 0..w {
            let byte = row[x / per_byte];
            let shift = 8 - bits as usize * (x % per_byte + 1);
            out.push(map((byte >> shift) & mask));
        }
    }
    out
}

// ------------------------------------------------------------------------------------------ GIF

fn decode_gif(bytes: &[u8], limits: &DecodeLimits) -> std::result::Result<DecodedImage, String> {
    let corrupt = |e: gif::DecodingError| format!("truncated or corrupt GIF: {e}");
    // logical screen size sits at bytes 6..10, little-endian
    if bytes.len() >= 10 {
        let sw = u16::from_le_bytes([bytes[6], bytes[7]]) as u64;
        let sh = u16::from_le_bytes([bytes[8], bytes[9]]) as u64;
        // a zero screen is legal (the frame then defines the size): only check non-zero ones
        if sw > 0 && sh > 0 {
            check_size(sw, sh, limits)?;
        }
    }
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    if let Some(limit) = std::num::NonZeroU64::new(alloc_budget(65535, 65535).min(alloc_budget(limits.max_width as u64, limits.max_height as u64))) {
        opts.set_memory_limit(gif::MemoryLimit::Bytes(limit));
    }
    let mut decoder = opts.read_info(Cursor::new(bytes)).map_err(corrupt)?;
    let (sw, sh) = (decoder.width() as usize, decoder.height() as usize);
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder.read_next_frame().map_err(corrupt)?.ok_or("GIF has no image in it")?;
    let (fx, fy, fw, fh) = (frame.left as usize, frame.top as usize, frame.width as usize, frame.height as usize);
    // Pillow grows the image to hold a first frame that extends past the logical screen
    let (w, h) = (sw.max(fx + fw), sh.max(fy + fh));
    check_size(w as u64, h as u64, limits)?;
    if frame.buffer.len() < fw * fh {
        return Err("truncated or corrupt GIF: frame data is short".into());
    }
    let fill = frame.transparent.unwrap_or(0);
    let mut pixels = vec![fill; w * h];
    for y in 0..fh {
        let src = &frame.buffer[y * fw..(y + 1) * fw];
        pixels[(fy + y) * w + fx..(fy + y) * w + fx + fw].copy_from_slice(src);
    }
    let palette = match &frame.palette {
        Some(local) => Some(local.clone()),
        None => global,
    };
    // Pillow opens a GIF whose palette is absent or the identity grey ramp as mode "L"
    let palette = palette.filter(|p| p.chunks_exact(3).enumerate().any(|(i, c)| !(c[0] as usize == i && c[1] == c[0] && c[2] == c[0])));
    let mode = match palette {
        Some(p) => {
            let colors: Vec<[u8; 3]> = p.chunks_exact(3).take(256).map(|c| [c[0], c[1], c[2]]).collect();
            let alpha = frame.transparent.map(|t| {
                let mut a = vec![255u8; colors.len().max(t as usize + 1)];
                a[t as usize] = 0;
                a
            });
            PixelMode::Palette { colors, alpha }
        }
        None => PixelMode::L,
    };
    DecodedImage::new(w as u32, h as u32, mode, pixels).map_err(|e| e.to_string())
}

// ----------------------------------------------------------------------------------------- JPEG

fn jpeg_image(img: super::jpeg::JpegImage) -> std::result::Result<DecodedImage, String> {
    let (mode, pixels) = match img.pixels {
        JpegPixels::Gray(p) => (PixelMode::L, p),
        JpegPixels::Rgb(p) => (PixelMode::Rgb, p),
        JpegPixels::Cmyk(p) => (PixelMode::Cmyk, p),
    };
    DecodedImage::new(img.width, img.height, mode, pixels).map_err(|e| e.to_string())
}

// --------------------------------------------------------------------------- JPEG, BMP, TIFF, ...

fn decode_with_image_crate(bytes: &[u8], format: image::ImageFormat, limits: &DecodeLimits) -> std::result::Result<DecodedImage, String> {
    use image::{DynamicImage as D, ImageDecoder};
    let what = format_name(format);
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => format!("{what} needs more memory than the decode limits allow ({l})"),
        image::ImageError::Unsupported(u) => format!("unsupported {what} variant: {u}"),
        e => format!("truncated or corrupt {what}: {e}"),
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.no_limits(); // the header is read first; limits are set before pixels are decoded
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (w, h) = decoder.dimensions();
    check_size(w as u64, h as u64, limits)?;
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_width);
    image_limits.max_image_height = Some(limits.max_height);
    image_limits.max_alloc = Some(alloc_budget(w as u64, h as u64));
    decoder.set_limits(image_limits).map_err(corrupt)?;
    let img = D::from_decoder(decoder).map_err(corrupt)?;

    let bilevel = format == image::ImageFormat::Pnm && (bytes.starts_with(b"P1") || bytes.starts_with(b"P4"));
    let (w, h) = (img.width(), img.height());
    let (mode, pixels) = match img {
        D::ImageLuma8(b) if bilevel => (PixelMode::Bilevel, b.into_raw().into_iter().map(|v| if v != 0 { 255 } else { 0 }).collect()),
        D::ImageLuma8(b) => (PixelMode::L, b.into_raw()),
        D::ImageLumaA8(b) => (PixelMode::LA, b.into_raw()),
        D::ImageRgb8(b) => (PixelMode::Rgb, b.into_raw()),
        D::ImageRgba8(b) => (PixelMode::Rgba, b.into_raw()),
        D::ImageLuma16(b) => (PixelMode::I16, b.into_raw().into_iter().flat_map(u16::to_le_bytes).collect()),
        D::ImageLumaA16(b) => (PixelMode::LA, b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect()),
        D::ImageRgb16(b) => (PixelMode::Rgb, b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect()),
        D::ImageRgba16(b) => (PixelMode::Rgba, b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect()),
        other if other.color().has_alpha() => (PixelMode::Rgba, other.into_rgba8().into_raw()),
        other => (PixelMode::Rgb, other.into_rgb8().into_raw()),
    };
    DecodedImage::new(w, h, mode, pixels).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut v = (data.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(data);
        v.extend_from_slice(&crc32(&[kind, data].concat()).to_be_bytes());
        v
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    fn err_message(r: Result<DecodedImage>) -> String {
        match r {
            Err(e @ Error::Image { .. }) => e.to_string(),
            Err(e) => panic!("wrong error variant: {e}"),
            Ok(img) => panic!("decoded a {}x{} image", img.width(), img.height()),
        }
    }

    #[test]
    fn unpack_bits_msb_first() {
        let buf = [0b1011_0001u8, 0b1000_0000];
        assert_eq!(unpack_bits(&buf, 2, 9, 1, 1, |v| v), vec![1, 0, 1, 1, 0, 0, 0, 1, 1]);
        let buf = [0b1110_0100u8];
        assert_eq!(unpack_bits(&buf, 1, 4, 1, 2, |v| v * 85), vec![255, 170, 85, 0]);
        let buf = [0xA5u8, 0xF0];
        assert_eq!(unpack_bits(&buf, 1, 2, 2, 4, |v| v), vec![0xA, 0x5, 0xF, 0x0]);
    }

    #[test]
    fn header_limits_checked_first() {
        let ihdr = [&100_000u32.to_be_bytes()[..], &100_000u32.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
        let bytes = [PNG_SIGNATURE, &png_chunk(b"IHDR", &ihdr), &png_chunk(b"IEND", &[])].concat();
        let msg = err_message(decode_image(&bytes, "big.png", &DecodeLimits::default()));
        assert_eq!(msg, "big.png: image is 100000x100000, over the 16384x16384 limit");

        let small = DecodeLimits { max_pixels: 100, ..DecodeLimits::default() };
        let ihdr = [&20u32.to_be_bytes()[..], &20u32.to_be_bytes(), &[8, 0, 0, 0, 0]].concat();
        let bytes = [PNG_SIGNATURE, &png_chunk(b"IHDR", &ihdr), &png_chunk(b"IEND", &[])].concat();
        let msg = err_message(decode_image(&bytes, "a.png", &small));
        assert_eq!(msg, "a.png: image is 20x20 (400 pixels), over the 100-pixel limit");

        let tiny = DecodeLimits { max_bytes: 4, ..DecodeLimits::default() };
        let msg = err_message(decode_image(&bytes, "a.png", &tiny));
        assert!(msg.starts_with("a.png: file is "), "{msg}");
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let limits = DecodeLimits::default();
        assert_eq!(err_message(decode_image(b"", "e.jpg", &limits)), "e.jpg: empty file (0 bytes)");
        assert_eq!(err_message(decode_image(b"hello world", "t.jpg", &limits)), "t.jpg: not a supported image (unknown format)");
        // every prefix of a valid small PNG and GIF, and byte flips, must fail cleanly or decode
        let ihdr = [&3u32.to_be_bytes()[..], &2u32.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
        let raw = [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 10, 11, 12, 13, 14, 15, 16, 17, 18];
        let idat = stored_zlib(&raw);
        let png = [PNG_SIGNATURE, &png_chunk(b"IHDR", &ihdr), &png_chunk(b"IDAT", &idat), &png_chunk(b"IEND", &[])].concat();
        let img = decode_image(&png, "ok.png", &limits).unwrap();
        assert_eq!((img.width(), img.height(), img.mode()), (3, 2, &PixelMode::Rgb));
        assert_eq!(img.pixels(), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]);
        for n in 0..png.len() {
            let _ = decode_image(&png[..n], "p.png", &limits);
        }
        for i in 0..png.len() {
            let mut b = png.clone();
            b[i] ^= 0x5a;
            let _ = decode_image(&b, "p.png", &limits);
        }
        for magic in [&b"GIF89a"[..], b"\xff\xd8\xff", b"BM", b"II*\0", b"RIFF\0\0\0\0WEBPVP8 ", b"P6\n", b"P4 1 1\n"] {
            for n in 0..=magic.len() + 8 {
                let mut b = magic.to_vec();
                b.resize(n.max(magic.len()), 0xff);
                let _ = decode_image(&b, "g", &limits);
            }
        }
    }

    /// zlib stream with one stored (uncompressed) block holding the filtered rows of a 3x2 RGB
    /// image (filter byte 0 per row).
    fn stored_zlib(raw: &[u8]) -> Vec<u8> {
        // rows: [0, r, g, b x3] twice; raw already has the filter bytes at 0 and 10
        let mut v = vec![0x78, 0x01, 0x01];
        v.extend_from_slice(&(raw.len() as u16).to_le_bytes());
        v.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
        v.extend_from_slice(raw);
        let (mut a, mut b) = (1u32, 0u32);
        for &x in raw {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        v.extend_from_slice(&((b << 16) | a).to_be_bytes());
        v
    }

    #[test]
    fn gif_first_frame_palette_and_grey() {
        // 2x2 GIF, global palette of 2 colours, transparent index 1
        let mut out = Vec::new();
        {
            let mut enc = gif_encoder(&mut out);
            enc.write_frame(&gif_frame(vec![0, 1, 1, 0], Some(1))).unwrap();
        }
        let img = decode_image(&out, "t.gif", &DecodeLimits::default()).unwrap();
        assert_eq!(img.pixels(), &[0, 1, 1, 0]);
        match img.mode() {
            PixelMode::Palette { colors, alpha } => {
                assert_eq!(&colors[..2], &[[200, 10, 20], [5, 6, 7]]);
                assert_eq!(alpha.as_deref().map(|a| &a[..2]), Some(&[255u8, 0][..]));
            }
            m => panic!("mode {m:?}"),
        }
    }

    fn gif_encoder(out: &mut Vec<u8>) -> gif::Encoder<&mut Vec<u8>> {
        gif::Encoder::new(out, 2, 2, &[200, 10, 20, 5, 6, 7]).unwrap()
    }

    fn gif_frame(buffer: Vec<u8>, transparent: Option<u8>) -> gif::Frame<'static> {
        gif::Frame { width: 2, height: 2, buffer: buffer.into(), transparent, ..gif::Frame::default() }
    }
}
