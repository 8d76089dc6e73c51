//! Image decoding with size limits, and open_clip's eval preprocessing reproduced in pure Rust.
//!
//! open_clip 3.3.0 builds its eval transform (`image_transform(224, is_train=False)`, resize mode
//! "shortest", bicubic) from torchvision's PIL path:
//!
//! 1. `Resize(224, BICUBIC)`: the shorter side becomes 224, the longer side
//!    `int(224 * long / short)` (truncated), via Pillow's `Image.resize`;
//! 2. `CenterCrop(224)`: offsets `int(round((new - 224) / 2))` (Python rounds halves to even);
//! 3. `convert("RGB")`;
//! 4. `ToTensor()` (`x / 255` in float32) and `Normalize(mean, std)` (`(x - mean) / std`).
//!
//! [`preprocess_u8`] reproduces steps 1-3 bit for bit (see `resize.rs` for Pillow's integer
//! resampler and `convert.rs` for its mode conversions), including what `Image.resize` does per
//! mode: "P" (palette) and "1" images are resized with nearest neighbour on their indices
//! before the palette lookup; "LA" and "RGBA" are premultiplied by alpha for the resize and
//! un-premultiplied after it (so colours under alpha 0 drop out of the blend; `convert("RGB")`
//! then drops the alpha without compositing). [`normalize`] reproduces step 4 with the same
//! float32 operations as torch, so its output is identical to open_clip's tensor given the same
//! bytes.
//!
//! Where decoding differs from what `PIL.Image.open` gives, the difference is documented on
//! [`decode_image`]; the measured effect on the 224x224 output is in `tests/preprocess.rs`.

mod convert;
mod decode;
mod frame;
mod jpeg;
mod resize;

pub use decode::{decode_image, load_image};
pub use frame::{frame_bytes, frame_to_image, PixelFormat, MAX_FRAME_SIDE};

/// Whether `p` has an image file extension (what folders of images are scanned for: frame
/// sources, head datasets).
pub fn is_image_file(p: &std::path::Path) -> bool {
    const EXT: &[&str] = &["jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "webp", "pgm", "ppm", "pnm"];
    p.extension().and_then(|e| e.to_str()).map(|e| EXT.contains(&e.to_ascii_lowercase().as_str())).unwrap_or(false)
}

/// Encode packed RGB8 as a baseline JPEG through libjpeg-turbo (annotated frames, teach mode).
pub fn encode_jpeg(rgb: &[u8], width: u32, height: u32, quality: u8) -> crate::error::Result<Vec<u8>> {
    jpeg::encode_rgb(rgb, width, height, quality).map_err(|m| crate::error::Error::Image { name: "JPEG encoder".into(), message: m })
}

use crate::error::{Error, Result};
use resize::Coeffs;

/// open_clip's `OPENAI_DATASET_MEAN`.
pub const OPENAI_DATASET_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// open_clip's `OPENAI_DATASET_STD`.
#[allow(clippy::excessive_precision)] // the literals exactly as open_clip writes them
pub const OPENAI_DATASET_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Limits checked before an image is decoded. Every limit is checked against the file's size or
/// header, before any pixel buffer is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width in pixels.
    pub max_width: u32,
    /// Largest accepted height in pixels.
    pub max_height: u32,
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
    /// Largest accepted file size in bytes.
    pub max_bytes: u64,
}

impl Default for DecodeLimits {
    /// 16384 x 16384, 64 Mpixel, 256 MiB.
    fn default() -> Self {
        DecodeLimits { max_width: 16384, max_height: 16384, max_pixels: 64 << 20, max_bytes: 256 << 20 }
    }
}

/// How the pixels of a [`DecodedImage`] are laid out, named after the PIL mode they mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PixelMode {
    /// PIL "1": one byte per pixel, 0 (black) or 255 (white). Resized with nearest neighbour.
    Bilevel,
    /// PIL "L": one byte per pixel, grey level.
    L,
    /// PIL "I;16": 16-bit grey (PNG and TIFF), two bytes per pixel, little-endian. Resized
    /// like Pillow (float weights, rounded, clamped to 0..=65535); `convert("RGB")` then clips
    /// values above 255 to 255, so full-range 16-bit images come out nearly white. That is
    /// what open_clip does with them, and it is reproduced here on purpose.
    I16,
    /// PIL "LA": grey level then alpha (not premultiplied).
    LA,
    /// PIL "RGB": three bytes per pixel.
    Rgb,
    /// PIL "RGBA": four bytes per pixel, alpha last (not premultiplied).
    Rgba,
    /// PIL "CMYK": four bytes per pixel (JPEG files with four components, as Pillow reads
    /// them). Resized per channel, then converted with Pillow's `cmyk2rgb`.
    Cmyk,
    /// PIL "P": one byte per pixel, an index into `colors`. Resized with nearest neighbour on the
    /// indices, then looked up; an index past the end of `colors` reads as black, as in Pillow.
    Palette {
        /// The palette, at most 256 RGB entries.
        colors: Vec<[u8; 3]>,
        /// Per-entry alpha from a PNG `tRNS` chunk or a GIF transparent index, when the file has
        /// one (entries past its end are opaque). Kept for callers; open_clip's
        /// `convert("RGB")` ignores it.
        alpha: Option<Vec<u8>>,
    },
}

impl PixelMode {
    /// Bytes per pixel.
    pub fn bytes_per_pixel(&self) -> usize {
        match self {
            PixelMode::Bilevel | PixelMode::L | PixelMode::Palette { .. } => 1,
            PixelMode::LA | PixelMode::I16 => 2,
            PixelMode::Rgb => 3,
            PixelMode::Rgba | PixelMode::Cmyk => 4,
        }
    }

    /// The PIL mode name ("1", "L", "LA", "RGB", "RGBA", "P").
    pub fn pil_name(&self) -> &'static str {
        match self {
            PixelMode::Bilevel => "1",
            PixelMode::L => "L",
            PixelMode::I16 => "I;16",
            PixelMode::LA => "LA",
            PixelMode::Rgb => "RGB",
            PixelMode::Rgba => "RGBA",
            PixelMode::Cmyk => "CMYK",
            PixelMode::Palette { .. } => "P",
        }
    }
}

/// A decoded image in its source's mode, as PIL holds it after `Image.open` (see
/// [`decode_image`] for where it differs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    width: u32,
    height: u32,
    mode: PixelMode,
    pixels: Vec<u8>,
}

impl DecodedImage {
    /// Wrap raw pixels: `width * height * mode.bytes_per_pixel()` bytes, row-major, no padding.
    pub fn new(width: u32, height: u32, mode: PixelMode, pixels: Vec<u8>) -> Result<Self> {
        let expect = (width as u64).checked_mul(height as u64).and_then(|n| n.checked_mul(mode.bytes_per_pixel() as u64));
        if width == 0 || height == 0 {
            return Err(Error::InvalidArgument(format!("image size {width}x{height} is empty")));
        }
        if expect != Some(pixels.len() as u64) {
            return Err(Error::InvalidArgument(format!(
                "{width}x{height} {} image needs {} bytes, got {}",
                mode.pil_name(),
                expect.map_or_else(|| "too many".to_string(), |n| n.to_string()),
                pixels.len()
            )));
        }
        if let PixelMode::Palette { colors, .. } = &mode {
            if colors.len() > 256 {
                return Err(Error::InvalidArgument(format!("palette has {} entries, over 256", colors.len())));
            }
        }
        Ok(DecodedImage { width, height, mode, pixels })
    }

    /// Wrap packed RGB bytes (e.g. a camera frame).
    pub fn from_rgb8(width: u32, height: u32, pixels: Vec<u8>) -> Result<Self> {
        Self::new(width, height, PixelMode::Rgb, pixels)
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn mode(&self) -> &PixelMode {
        &self.mode
    }

    /// The raw pixels, `width * height * mode().bytes_per_pixel()` bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    pub fn into_pixels(self) -> Vec<u8> {
        self.pixels
    }

    /// The whole image as packed RGB, as PIL's `convert("RGB")` gives it (alpha dropped, not
    /// composited; palette looked up; grey replicated).
    pub fn to_rgb8(&self) -> Vec<u8> {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut out = vec![0u8; w * h * 3];
        crop_to_rgb(self, 0, 0, w, h, &mut out);
        out
    }
}

/// torchvision's `_compute_resized_output_size` for an int size: (width, height) after resizing
/// the shorter side to `size`; the longer side is `int(size * long / short)`.
pub fn resized_size(width: u32, height: u32, size: u32) -> (u64, u64) {
    let (w, h, s) = (width as u64, height as u64, size as u64);
    if w <= h {
        // exact integer floor == Python's int() of the correctly rounded quotient for these sizes
        (s, s * h / w.max(1))
    } else {
        (s * w / h.max(1), s)
    }
}

/// torchvision's `center_crop` offset: `int(round((len - crop) / 2.0))`, halves to even.
pub fn center_crop_offset(len: u64, crop: u64) -> u64 {
    let d = len.saturating_sub(crop);
    let half = d / 2;
    if d.is_multiple_of(2) || half.is_multiple_of(2) {
        half
    } else {
        half + 1
    }
}

/// The `size x size x 3` RGB bytes open_clip's eval transform feeds to `ToTensor`: resize the
/// shorter side to `size` (Pillow bicubic, or nearest for palette and bilevel images), centre
/// crop, `convert("RGB")`. Row-major HWC. Returns an empty vector for `size == 0`.
pub fn preprocess_u8(img: &DecodedImage, size: u32) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    let s = size as usize;
    let (w, h) = (img.width as usize, img.height as usize);
    let (nw, nh) = resized_size(img.width, img.height, size);
    let left = center_crop_offset(nw, s as u64) as usize;
    let top = center_crop_offset(nh, s as u64) as usize;
    let (nw, nh) = (nw as usize, nh as usize);
    let mut out = vec![0u8; s * s * 3];

    if nw == w && nh == h {
        // torchvision returns the image untouched when the size already matches
        crop_to_rgb(img, left, top, s, s, &mut out);
        return out;
    }

    let px = &img.pixels;
    match &img.mode {
        PixelMode::Bilevel | PixelMode::Palette { .. } => {
            let xs = resize::nearest_indices(w, nw, left, s);
            let ys = resize::nearest_indices(h, nh, top, s);
            let lut = index_lut(&img.mode);
            for (orow, y) in out.chunks_exact_mut(s * 3).zip(&ys) {
                for (o, x) in orow.chunks_exact_mut(3).zip(&xs) {
                    // Pillow leaves pixels outside the source at 0 (index 0)
                    let v = match (y, x) {
                        (Some(y), Some(x)) => px[y * w + x],
                        _ => 0,
                    };
                    o.copy_from_slice(&lut[v as usize]);
                }
            }
        }
        PixelMode::L => {
            let r = bicubic_window::<1>(px, w, h, nw, nh, left, top, s, false);
            for (o, &v) in out.chunks_exact_mut(3).zip(&r) {
                o.fill(v);
            }
        }
        PixelMode::I16 => {
            let r = bicubic_window_i16(px, w, h, nw, nh, left, top, s);
            for (o, &v) in out.chunks_exact_mut(3).zip(&r) {
                o.fill(v.min(255) as u8);
            }
        }
        PixelMode::LA => {
            let r = bicubic_window::<2>(px, w, h, nw, nh, left, top, s, true);
            for (o, p) in out.chunks_exact_mut(3).zip(r.chunks_exact(2)) {
                o.fill(convert::unpremultiply(p[0], p[1]));
            }
        }
        PixelMode::Rgb => {
            out = bicubic_window::<3>(px, w, h, nw, nh, left, top, s, false);
        }
        PixelMode::Cmyk => {
            let r = bicubic_window::<4>(px, w, h, nw, nh, left, top, s, false);
            for (o, p) in out.chunks_exact_mut(3).zip(r.chunks_exact(4)) {
                o.copy_from_slice(&convert::cmyk_to_rgb(p));
            }
        }
        PixelMode::Rgba => {
            let r = bicubic_window::<4>(px, w, h, nw, nh, left, top, s, true);
            for (o, p) in out.chunks_exact_mut(3).zip(r.chunks_exact(4)) {
                for c in 0..3 {
                    o[c] = convert::unpremultiply(p[c], p[3]);
                }
            }
        }
    }
    out
}

/// ToTensor + Normalize: `rgb` (`size * size * 3` bytes, HWC) to CHW float32,
/// `(x / 255 - mean) / std` with torch's float32 operations and order.
///
/// # Panics
/// If `rgb.len() != size * size * 3`.
pub fn normalize(rgb: &[u8], size: u32, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let n = size as usize * size as usize;
    assert_eq!(rgb.len(), n * 3, "normalize: expected {size}x{size}x3 bytes, got {}", rgb.len());
    // every value is a pure function of (byte, channel): tabulate
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, t) in table.iter_mut().enumerate() {
            *t = (v as f32 / 255.0f32 - mean[c]) / std[c];
        }
    }
    let mut out = vec![0f32; 3 * n];
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for (i, p) in rgb.chunks_exact(3).enumerate() {
        r[i] = lut[0][p[0] as usize];
        g[i] = lut[1][p[1] as usize];
        b[i] = lut[2][p[2] as usize];
    }
    out
}

/// [`preprocess_u8`] then [`normalize`]: the CHW float32 tensor open_clip's eval transform gives.
pub fn preprocess(img: &DecodedImage, size: u32, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    normalize(&preprocess_u8(img, size), size, mean, std)
}

/// RGB for each possible byte of a one-byte-per-pixel image (`convert("RGB")`).
fn index_lut(mode: &PixelMode) -> Vec<[u8; 3]> {
    let mut lut = vec![[0u8; 3]; 256];
    match mode {
        PixelMode::Palette { colors, .. } => {
            for (l, c) in lut.iter_mut().zip(colors) {
                *l = *c;
            }
        }
        PixelMode::Bilevel => {
            for (v, l) in lut.iter_mut().enumerate() {
                *l = if v != 0 { [255; 3] } else { [0; 3] };
            }
        }
        _ => {
            for (v, l) in lut.iter_mut().enumerate() {
                *l = [v as u8; 3];
            }
        }
    }
    lut
}

/// `img.crop(...).convert("RGB")` without a resize (no premultiplication round trip).
fn crop_to_rgb(img: &DecodedImage, left: usize, top: usize, cw: usize, ch: usize, out: &mut [u8]) {
    let w = img.width as usize;
    let c = img.mode.bytes_per_pixel();
    let lut = index_lut(&img.mode);
    for (y, orow) in (top..top + ch).zip(out.chunks_exact_mut(cw * 3)) {
        let row = &img.pixels[(y * w + left) * c..(y * w + left + cw) * c];
        match &img.mode {
            PixelMode::Bilevel | PixelMode::L | PixelMode::Palette { .. } => {
                for (o, &v) in orow.chunks_exact_mut(3).zip(row) {
                    o.copy_from_slice(&lut[v as usize]);
                }
            }
            // I16_RGB: values above 255 clip
            PixelMode::I16 => {
                for (o, p) in orow.chunks_exact_mut(3).zip(row.chunks_exact(2)) {
                    o.fill(u16::from_le_bytes([p[0], p[1]]).min(255) as u8);
                }
            }
            PixelMode::LA => {
                for (o, p) in orow.chunks_exact_mut(3).zip(row.chunks_exact(2)) {
                    o.fill(p[0]);
                }
            }
            PixelMode::Rgb => orow.copy_from_slice(row),
            PixelMode::Rgba => {
                for (o, p) in orow.chunks_exact_mut(3).zip(row.chunks_exact(4)) {
                    o.copy_from_slice(&p[..3]);
                }
            }
            PixelMode::Cmyk => {
                for (o, p) in orow.chunks_exact_mut(3).zip(row.chunks_exact(4)) {
                    o.copy_from_slice(&convert::cmyk_to_rgb(p));
                }
            }
        }
    }
}

/// Pillow's 16-bit ("I;16") resize (`ImagingResample*_16bpc`, float weights) of the `s x s`
/// window at (`left`, `top`) of the `nw x nh` result.
#[allow(clippy::too_many_arguments)]
fn bicubic_window_i16(px: &[u8], w: usize, h: usize, nw: usize, nh: usize, left: usize, top: usize, s: usize) -> Vec<u16> {
    let vw = (nh != h).then(|| resize::Weights::bicubic(h, nh, top, s));
    let hw = (nw != w).then(|| resize::Weights::bicubic(w, nw, left, s));
    let (y0, y1) = vw.as_ref().map_or((top, top + s), resize::Weights::source_range);
    let (x0, x1) = hw.as_ref().map_or((left, left + s), resize::Weights::source_range);
    let mut temp = vec![0u16; (y1 - y0) * s];
    let mut row = vec![0u16; x1 - x0];
    for (y, trow) in (y0..y1).zip(temp.chunks_exact_mut(s)) {
        for (d, p) in row.iter_mut().zip(px[(y * w + x0) * 2..(y * w + x1) * 2].chunks_exact(2)) {
            *d = u16::from_le_bytes([p[0], p[1]]);
        }
        match &hw {
            Some(hw) => resize::horizontal_row_i16(&row, x0, hw, trow),
            None => trow.copy_from_slice(&row),
        }
    }
    match &vw {
        Some(vw) => {
            let mut out = vec![0u16; s * s];
            resize::vertical_i16(&temp, y0, s, vw, &mut out);
            out
        }
        None => temp,
    }
}

/// Pillow's two-pass bicubic resize of a `C`-channel image from `w x h` to `nw x nh`, computing
/// only the `s x s` window at (`left`, `top`). With `premul`, the last channel is alpha and the
/// colour channels are premultiplied first (the result stays premultiplied).
#[allow(clippy::too_many_arguments)]
fn bicubic_window<const C: usize>(px: &[u8], w: usize, h: usize, nw: usize, nh: usize, left: usize, top: usize, s: usize, premul: bool) -> Vec<u8> {
    let need_h = nw != w;
    let need_v = nh != h;
    let vc = need_v.then(|| Coeffs::bicubic(h, nh, top, s));
    let hc = need_h.then(|| Coeffs::bicubic(w, nw, left, s));
    let (y0, y1) = vc.as_ref().map_or((top, top + s), Coeffs::source_range);
    let (x0, x1) = hc.as_ref().map_or((left, left + s), Coeffs::source_range);

    let row_len = s * C;
    let mut temp = vec![0u8; (y1 - y0) * row_len];
    let mut scratch = if premul { vec![0u8; (x1 - x0) * C] } else { Vec::new() };
    for (y, trow) in (y0..y1).zip(temp.chunks_exact_mut(row_len)) {
        let mut src = &px[(y * w + x0) * C..(y * w + x1) * C];
        if premul {
            convert::premultiply_row::<C>(src, &mut scratch);
            src = &scratch;
        }
        match &hc {
            Some(hc) => resize::horizontal_row::<C>(src, x0, hc, trow),
            None => trow.copy_from_slice(src),
        }
    }
    match &vc {
        Some(vc) => {
            let mut out = vec![0u8; s * row_len];
            resize::vertical::<C>(&temp, y0, row_len, vc, &mut out);
            out
        }
        None => temp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_truncates_like_torchvision() {
        assert_eq!(resized_size(640, 427, 224), (335, 224)); // 224*640/427 = 335.7
        assert_eq!(resized_size(427, 640, 224), (224, 335));
        assert_eq!(resized_size(1920, 1080, 224), (398, 224));
        assert_eq!(resized_size(300, 300, 224), (224, 224));
        assert_eq!(resized_size(1, 16384, 224), (224, 224 * 16384));
    }

    #[test]
    fn center_crop_rounds_half_to_even() {
        assert_eq!(center_crop_offset(224, 224), 0);
        assert_eq!(center_crop_offset(335, 224), 56); // round(55.5) = 56
        assert_eq!(center_crop_offset(333, 224), 54); // round(54.5) = 54
        assert_eq!(center_crop_offset(226, 224), 1);
        assert_eq!(center_crop_offset(227, 224), 2); // round(1.5) = 2
        assert_eq!(center_crop_offset(225, 224), 0); // round(0.5) = 0
    }

    #[test]
    fn new_validates_lengths() {
        assert!(DecodedImage::new(2, 2, PixelMode::Rgb, vec![0; 12]).is_ok());
        assert!(DecodedImage::new(2, 2, PixelMode::Rgb, vec![0; 11]).is_err());
        assert!(DecodedImage::new(0, 2, PixelMode::L, vec![]).is_err());
        let pal = PixelMode::Palette { colors: vec![[0, 0, 0]; 257], alpha: None };
        assert!(DecodedImage::new(1, 1, pal, vec![0]).is_err());
    }

    #[test]
    fn same_size_is_a_plain_crop() {
        // 224 wide, 230 tall: no resize, crop rows 3..227
        let (w, h) = (224u32, 230u32);
        let px: Vec<u8> = (0..w * h * 4).map(|i| (i % 251) as u8).collect();
        let img = DecodedImage::new(w, h, PixelMode::Rgba, px.clone()).unwrap();
        let out = preprocess_u8(&img, 224);
        let top = 3usize;
        for y in 0..224usize {
            for x in 0..224usize {
                let s = ((y + top) * w as usize + x) * 4;
                assert_eq!(&out[(y * 224 + x) * 3..][..3], &px[s..s + 3]);
            }
        }
    }

    #[test]
    fn opaque_rgba_resizes_like_rgb() {
        let (w, h) = (97u32, 61u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| ((i * 37) % 256) as u8).collect();
        let rgba: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
        let a = preprocess_u8(&DecodedImage::from_rgb8(w, h, rgb).unwrap(), 32);
        let b = preprocess_u8(&DecodedImage::new(w, h, PixelMode::Rgba, rgba).unwrap(), 32);
        assert_eq!(a, b);
    }

    #[test]
    fn fully_transparent_colour_does_not_bleed() {
        // left half red opaque, right half green with alpha 0: after premultiplied resizing the
        // colour of the transparent half must not leak into the opaque one
        let (w, h) = (40u32, 40u32);
        let mut px = Vec::new();
        for _y in 0..h {
            for x in 0..w {
                px.extend_from_slice(if x < 20 { &[255, 0, 0, 255] } else { &[0, 255, 0, 0] });
            }
        }
        let out = preprocess_u8(&DecodedImage::new(w, h, PixelMode::Rgba, px).unwrap(), 16);
        for y in 0..16 {
            for x in 0..16 {
                let p = &out[(y * 16 + x) * 3..][..3];
                assert_eq!(p[1], 0, "green leaked at {x},{y}: {p:?}");
            }
        }
    }

    #[test]
    fn tiny_and_extreme_shapes_do_not_panic() {
        for (w, h) in [(1, 1), (1, 500), (500, 1), (2, 3), (3000, 7)] {
            for mode in [PixelMode::L, PixelMode::LA, PixelMode::Rgb, PixelMode::Rgba, PixelMode::Bilevel, PixelMode::Cmyk, PixelMode::I16] {
                let n = (w * h) as usize * mode.bytes_per_pixel();
                let img = DecodedImage::new(w, h, mode, vec![128; n]).unwrap();
                assert_eq!(preprocess_u8(&img, 224).len(), 224 * 224 * 3);
            }
            let pal = PixelMode::Palette { colors: vec![[1, 2, 3]], alpha: None };
            let img = DecodedImage::new(w, h, pal, vec![5; (w * h) as usize]).unwrap();
            // index 5 is past the palette: black
            assert!(preprocess_u8(&img, 224).iter().all(|&v| v == 0));
        }
        let img = DecodedImage::from_rgb8(3, 3, vec![9; 27]).unwrap();
        assert!(preprocess_u8(&img, 0).is_empty());
        assert_eq!(preprocess_u8(&img, 1), vec![9, 9, 9]);
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn normalize_matches_float32_formula() {
        let rgb = [0u8, 128, 255, 255, 0, 1];
        let t = normalize(&rgb[..3], 1, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0], (0.0f32 - 0.48145466f32) / 0.26862954f32);
        assert_eq!(t[1], (128.0f32 / 255.0 - 0.4578275f32) / 0.26130258f32);
        assert_eq!(t[2], (1.0f32 - 0.40821073f32) / 0.27577711f32);
    }
}
