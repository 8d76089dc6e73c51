//! Raw camera and host buffers -> [`DecodedImage`]: packed RGB/BGR/RGBA/grey with a row stride,
//! and the YUV layouts cameras deliver (YUYV 4:2:2, NV12 4:2:0).
//!
//! YUV is converted with BT.601 limited-range ("studio swing", Y 16..235, Cb/Cr 16..240)
//! coefficients, the V4L2 default for SDTV/webcam formats, in 16.16 fixed point with rounding;
//! chroma is replicated (nearest) over the pixels that share it. A camera that sends full-range
//! (JPEG-style) YUV will look slightly washed out; convert it upstream or send RGB.

use super::{DecodedImage, PixelMode};
use crate::error::{Error, Result};

/// Pixel layouts accepted for raw frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// packed R, G, B bytes
    Rgb8,
    /// packed R, G, B, A bytes (alpha handled like a PIL "RGBA" image)
    Rgba8,
    /// packed B, G, R bytes (OpenCV's order)
    Bgr8,
    /// one grey byte per pixel
    Gray8,
    /// YUV 4:2:2 packed as Y0 U Y1 V (V4L2 `YUYV`); width must be even
    Yuyv,
    /// YUV 4:2:0: a Y plane of `height` rows, then an interleaved U/V plane of `height / 2`
    /// rows, both with the same stride; width and height must be even
    Nv12,
    /// YUV 4:2:0 planar (I420, Y4M's C420): Y plane, then U, then V planes of half width and
    /// height; rows tightly packed (stride ignored); width and height must be even
    I420,
}

impl PixelFormat {
    /// Bytes of one row's pixels (without padding).
    fn row_bytes(self, width: u64) -> u64 {
        match self {
            PixelFormat::Rgb8 | PixelFormat::Bgr8 => width * 3,
            PixelFormat::Rgba8 => width * 4,
            PixelFormat::Gray8 | PixelFormat::Nv12 | PixelFormat::I420 => width,
            PixelFormat::Yuyv => width * 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb8 => "RGB8",
            PixelFormat::Rgba8 => "RGBA8",
            PixelFormat::Bgr8 => "BGR8",
            PixelFormat::Gray8 => "GRAY8",
            PixelFormat::Yuyv => "YUYV",
            PixelFormat::Nv12 => "NV12",
            PixelFormat::I420 => "I420",
        }
    }
}

/// Largest frame side accepted from a raw buffer.
pub const MAX_FRAME_SIDE: u32 = 16384;

/// Wrap or convert a raw frame. `stride` is the distance in bytes between rows (0 = tightly
/// packed). Every size is checked against `data.len()` before anything is read.
pub fn frame_to_image(data: &[u8], width: u32, height: u32, stride: usize, format: PixelFormat) -> Result<DecodedImage> {
    let bad = |m: String| Error::InvalidArgument(format!("{} frame {width}x{height}: {m}", format.name()));
    if width == 0 || height == 0 || width > MAX_FRAME_SIDE || height > MAX_FRAME_SIDE {
        return Err(bad(format!("size must be 1..={MAX_FRAME_SIDE} on each side")));
    }
    let row = format.row_bytes(width as u64) as usize;
    let stride = if stride == 0 || format == PixelFormat::I420 { row } else { stride };
    if stride < row {
        return Err(bad(format!("stride {stride} is less than a row's {row} bytes")));
    }
    if matches!(format, PixelFormat::Yuyv | PixelFormat::Nv12 | PixelFormat::I420) && !width.is_multiple_of(2) {
        return Err(bad("width must be even".into()));
    }
    if matches!(format, PixelFormat::Nv12 | PixelFormat::I420) && !height.is_multiple_of(2) {
        return Err(bad("height must be even".into()));
    }
    let rows = if format == PixelFormat::Nv12 { height as usize + height as usize / 2 } else { height as usize };
    // the last row need not be padded to the stride
    let need = if format == PixelFormat::I420 { frame_bytes(PixelFormat::I420, width, height) } else { (rows - 1) * stride + row };
    if data.len() < need {
        return Err(bad(format!("buffer has {} bytes, needs {need}", data.len())));
    }
    let (w, h) = (width as usize, height as usize);
    let packed = |bpp: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(w * h * bpp);
        for y in 0..h {
            out.extend_from_slice(&data[y * stride..y * stride + w * bpp]);
        }
        out
    };
    let (mode, pixels) = match format {
        PixelFormat::Rgb8 => (PixelMode::Rgb, packed(3)),
        PixelFormat::Rgba8 => (PixelMode::Rgba, packed(4)),
        PixelFormat::Gray8 => (PixelMode::L, packed(1)),
        PixelFormat::Bgr8 => {
            let mut p = packed(3);
            p.chunks_exact_mut(3).for_each(|px| px.swap(0, 2));
            (PixelMode::Rgb, p)
        }
        PixelFormat::Yuyv => {
            let mut out = vec![0u8; w * h * 3];
            for y in 0..h {
                let src = &data[y * stride..y * stride + w * 2];
                let dst = &mut out[y * w * 3..(y + 1) * w * 3];
                for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(6)) {
                    let (u, v) = (s[1], s[3]);
                    yuv_to_rgb(s[0], u, v, &mut d[0..3]);
                    yuv_to_rgb(s[2], u, v, &mut d[3..6]);
                }
            }
            (PixelMode::Rgb, out)
        }
        PixelFormat::I420 => {
            let mut out = vec![0u8; w * h * 3];
            let (cw, ch) = (w / 2, h / 2);
            let (u_plane, v_plane) = (&data[w * h..w * h + cw * ch], &data[w * h + cw * ch..w * h + 2 * cw * ch]);
            for y in 0..h {
                let dst = &mut out[y * w * 3..(y + 1) * w * 3];
                for x in 0..w {
                    let c = (y / 2) * cw + x / 2;
                    yuv_to_rgb(data[y * w + x], u_plane[c], v_plane[c], &mut dst[x * 3..x * 3 + 3]);
                }
            }
            (PixelMode::Rgb, out)
        }
        PixelFormat::Nv12 => {
            let mut out = vec![0u8; w * h * 3];
            for y in 0..h {
                let ys = &data[y * stride..y * stride + w];
                let uv = &data[(h + y / 2) * stride..(h + y / 2) * stride + w];
                let dst = &mut out[y * w * 3..(y + 1) * w * 3];
                for x in 0..w {
                    let c = x & !1;
                    yuv_to_rgb(ys[x], uv[c], uv[c + 1], &mut dst[x * 3..x * 3 + 3]);
                }
            }
            (PixelMode::Rgb, out)
        }
    };
    DecodedImage::new(width, height, mode, pixels)
}

/// Bytes of one tightly packed frame.
pub fn frame_bytes(format: PixelFormat, width: u32, height: u32) -> usize {
    let (w, h) = (width as usize, height as usize);
    match format {
        PixelFormat::Nv12 | PixelFormat::I420 => w * h + 2 * (w / 2) * (h / 2),
        f => f.row_bytes(width as u64) as usize * h,
    }
}

/// BT.601 limited range -> RGB, 16.16 fixed point, rounded, clamped.
#[inline]
fn yuv_to_rgb(y: u8, u: u8, v: u8, out: &mut [u8]) {
    // 255/219 = 1.164383, 255/224 * 1.402 = 1.596027, ...
    const CY: i32 = 76309; // 1.164383 * 65536
    const CRV: i32 = 104597; // 1.596027
    const CGU: i32 = 25675; // 0.391762
    const CGV: i32 = 53279; // 0.812968
    const CBU: i32 = 132201; // 2.017232
    let c = (y as i32 - 16) * CY;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let r = (c + CRV * e + 32768) >> 16;
    let g = (c - CGU * d - CGV * e + 32768) >> 16;
    let b = (c + CBU * d + 32768) >> 16;
    out[0] = r.clamp(0, 255) as u8;
    out[1] = g.clamp(0, 255) as u8;
    out[2] = b.clamp(0, 255) as u8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_rgb_and_bgr() {
        // 2x2 RGB with 2 bytes of padding per row
        let data = [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12];
        let img = frame_to_image(&data, 2, 2, 8, PixelFormat::Rgb8).unwrap();
        assert_eq!(img.pixels(), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let img = frame_to_image(&data, 2, 2, 8, PixelFormat::Bgr8).unwrap();
        assert_eq!(&img.pixels()[..3], &[3, 2, 1]);
    }

    #[test]
    fn yuv_reference_colours() {
        // limited-range black, white and pure red (BT.601: Y=81, U=90, V=240)
        let mut px = [0u8; 3];
        yuv_to_rgb(16, 128, 128, &mut px);
        assert_eq!(px, [0, 0, 0]);
        yuv_to_rgb(235, 128, 128, &mut px);
        assert_eq!(px, [255, 255, 255]);
        yuv_to_rgb(81, 90, 240, &mut px);
        assert!(px[0] >= 253 && px[1] <= 2 && px[2] <= 2, "{px:?}");
    }

    #[test]
    fn yuyv_and_nv12_agree_on_a_flat_frame() {
        let (y, u, v) = (120u8, 100u8, 150u8);
        let yuyv: Vec<u8> = (0..4 * 2).flat_map(|_| [y, u, y, v]).collect(); // 8x2... 4 macropixels per row
        let a = frame_to_image(&yuyv, 8, 2, 0, PixelFormat::Yuyv).unwrap();
        let mut nv12 = vec![y; 8 * 2];
        nv12.extend((0..4).flat_map(|_| [u, v]));
        let b = frame_to_image(&nv12, 8, 2, 0, PixelFormat::Nv12).unwrap();
        assert_eq!(a.pixels(), b.pixels());
    }

    #[test]
    fn i420_matches_nv12() {
        let (w, h) = (4usize, 2usize);
        let y: Vec<u8> = (0..w * h).map(|i| 40 + 20 * i as u8).collect();
        let (u, v) = ([90u8, 140], [200u8, 60]);
        let mut i420 = y.clone();
        i420.extend(u);
        i420.extend(v);
        let mut nv12 = y;
        nv12.extend([u[0], v[0], u[1], v[1]]);
        let a = frame_to_image(&i420, 4, 2, 0, PixelFormat::I420).unwrap();
        let b = frame_to_image(&nv12, 4, 2, 0, PixelFormat::Nv12).unwrap();
        assert_eq!(a.pixels(), b.pixels());
        assert_eq!(frame_bytes(PixelFormat::I420, 4, 2), 12);
    }

    #[test]
    fn sizes_are_checked_before_reading() {
        assert!(frame_to_image(&[0; 11], 2, 2, 0, PixelFormat::Rgb8).is_err());
        assert!(frame_to_image(&[0; 12], 2, 2, 5, PixelFormat::Rgb8).is_err());
        assert!(frame_to_image(&[0; 12], 3, 2, 0, PixelFormat::Yuyv).is_err());
        assert!(frame_to_image(&[0; 12], 0, 2, 0, PixelFormat::Gray8).is_err());
        assert!(frame_to_image(&[0; 6], 2, 3, 0, PixelFormat::Nv12).is_err());
        // last row unpadded is fine
        assert!(frame_to_image(&[0; 14], 2, 2, 8, PixelFormat::Rgb8).is_ok());
    }
}
