//! Pillow's resamplers, reimplemented bit for bit for the cases open_clip's eval transform hits.
//!
//! * [`Coeffs`] / [`bicubic_window`]: `ImagingResample` from Pillow's `src/libImaging/Resample.c`
//!   with the bicubic filter (a = -0.5): per output pixel a window of source pixels whose `f64`
//!   weights are normalised to sum to one, then turned into 22-bit fixed point
//!   (`PRECISION_BITS = 32 - 8 - 2`, rounded away from zero); each pass accumulates in `i32`
//!   starting from `1 << 21` and clips `acc >> 22` to 0..=255. Two passes, horizontal first into
//!   a temporary image holding only the source rows the vertical pass reads, then vertical; a
//!   pass is skipped when that dimension does not change.
//! * [`nearest_indices`]: `ImagingScaleAffine` from `src/libImaging/Geometry.c`, which
//!   `Image.resize` uses for modes "P" and "1": a source coordinate accumulated in `f64`
//!   (`xo = scale * 0.5`, then `xo += scale` per output pixel) and truncated.
//!
//! Unlike Pillow, the functions here compute only a window of the output (the centre crop that
//! follows the resize). Every output pixel depends only on its own coefficients, so the values are
//! the same as resizing the whole image and cropping afterwards.

/// `PRECISION_BITS` in Resample.c.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support of Pillow's bicubic filter at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// Pillow's `bicubic_filter` (Keys' cubic convolution, a = -0.5), same operation order.
#[inline]
pub(crate) fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` for the bicubic filter over the full box `(0, in_size)`, for
/// the outputs `first..first + count` of a resize to `out_size`: per output the first source
/// index, the tap count and `ksize` normalised `f64` weights (unused tail zero).
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    pub bounds: Vec<(usize, usize)>,
    pub k: Vec<f64>,
    pub ksize: usize,
}

impl Weights {
    pub fn bicubic(in_size: usize, out_size: usize, first: usize, count: usize) -> Weights {
        debug_assert!(in_size > 0 && out_size > 0 && first + count <= out_size);
        // box coordinates are C floats in Pillow; in1 - in0 is computed in float, exact for the
        // sizes accepted here (< 2^24)
        let span = in_size as f32 as f64;
        let scale = span / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;

        let mut bounds = Vec::with_capacity(count);
        let mut k = vec![0f64; count * ksize];
        for (i, xx) in (first..first + count).enumerate() {
            let center = 0.0 + (xx as f64 + 0.5) * scale;
            // `(int)(v + 0.5)` truncates towards zero, then clamps
            let xmin = c_int(center - support + 0.5).max(0) as usize;
            let xmax = (c_int(center + support + 0.5).min(in_size as i64) as usize).saturating_sub(xmin);
            let xmax = xmax.min(ksize);
            let row = &mut k[i * ksize..(i + 1) * ksize];
            let mut ww = 0.0;
            for (x, w) in row.iter_mut().enumerate().take(xmax) {
                let v = bicubic_filter(((x + xmin) as f64 - center + 0.5) * ss);
                *w = v;
                ww += v;
            }
            if ww != 0.0 {
                for w in row.iter_mut().take(xmax) {
                    *w /= ww;
                }
            }
            bounds.push((xmin, xmax));
        }
        Weights { bounds, k, ksize }
    }

    #[inline]
    fn taps(&self, i: usize) -> (usize, &[f64]) {
        let (xmin, n) = self.bounds[i];
        (xmin, &self.k[i * self.ksize..i * self.ksize + n])
    }

    /// First source index used by any output in the window, and one past the last.
    pub fn source_range(&self) -> (usize, usize) {
        source_range(&self.bounds)
    }
}

fn source_range(bounds: &[(usize, usize)]) -> (usize, usize) {
    let lo = bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let hi = bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
    (lo, hi)
}

/// The 8-bit resampler's coefficients: [`Weights`] in 22-bit fixed point
/// (`normalize_coeffs_8bpc`).
#[derive(Debug, Clone)]
pub(crate) struct Coeffs {
    /// Per output: first source index and number of taps.
    pub bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output (unused tail zero), 22-bit fixed point.
    pub k: Vec<i32>,
    pub ksize: usize,
}

impl Coeffs {
    pub fn bicubic(in_size: usize, out_size: usize, first: usize, count: usize) -> Coeffs {
        let w = Weights::bicubic(in_size, out_size, first, count);
        Coeffs { k: w.k.iter().map(|&v| to_fixed(v)).collect(), bounds: w.bounds, ksize: w.ksize }
    }

    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (xmin, n) = self.bounds[i];
        (xmin, &self.k[i * self.ksize..i * self.ksize + n])
    }

    /// First source index used by any output in the window, and one past the last.
    pub fn source_range(&self) -> (usize, usize) {
        source_range(&self.bounds)
    }
}

/// C's `(int)v` for the values seen here (truncation towards zero).
#[inline]
fn c_int(v: f64) -> i64 {
    v as i64
}

/// `normalize_coeffs_8bpc`: round half away from zero to 22-bit fixed point.
#[inline]
pub(crate) fn to_fixed(v: f64) -> i32 {
    let scaled = v * (1u32 << PRECISION_BITS) as f64;
    if v < 0.0 {
        (-0.5 + scaled) as i32
    } else {
        (0.5 + scaled) as i32
    }
}

/// `clip8`: the accumulator already includes the rounding constant.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUND: i32 = 1 << (PRECISION_BITS - 1);

/// One row of `ImagingResampleHorizontal_8bpc`: `src` holds `C`-channel pixels starting at source
/// column `src_x0`; writes `coeffs.bounds.len()` pixels to `out`.
#[inline]
pub(crate) fn horizontal_row<const C: usize>(src: &[u8], src_x0: usize, coeffs: &Coeffs, out: &mut [u8]) {
    for (i, o) in out.chunks_exact_mut(C).enumerate() {
        let (xmin, k) = coeffs.taps(i);
        let s = &src[(xmin - src_x0) * C..(xmin - src_x0 + k.len()) * C];
        let mut acc = [ROUND; C];
        for (px, &w) in s.chunks_exact(C).zip(k) {
            for c in 0..C {
                acc[c] += px[c] as i32 * w;
            }
        }
        for c in 0..C {
            o[c] = clip8(acc[c]);
        }
    }
}

/// `ImagingResampleVertical_8bpc` for a window of output rows. `src` holds rows of `row_len`
/// bytes starting at source row `src_y0`; output rows of `row_len` bytes go to `out`.
pub(crate) fn vertical<const C: usize>(src: &[u8], src_y0: usize, row_len: usize, coeffs: &Coeffs, out: &mut [u8]) {
    let mut acc = vec![0i32; row_len];
    for (yy, orow) in out.chunks_exact_mut(row_len).enumerate() {
        let (ymin, k) = coeffs.taps(yy);
        acc.fill(ROUND);
        for (j, &w) in k.iter().enumerate() {
            let y = ymin + j - src_y0;
            let srow = &src[y * row_len..(y + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(srow) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

/// `ROUND_UP`, then clamped to 0..=65535 as Pillow 13's 16-bit resampler stores results
/// (measured: `Image.resize` on "I;16" clamps where the "I" path overshoots).
#[inline]
fn store_i16(ss: f64) -> u16 {
    let v = if ss >= 0.0 { (ss + 0.5) as i64 } else { (ss - 0.5) as i64 };
    v.clamp(0, 65535) as u16
}

/// `ImagingResampleHorizontal_16bpc` for one row of "I;16" samples starting at source column
/// `src_x0`.
pub(crate) fn horizontal_row_i16(src: &[u16], src_x0: usize, w: &Weights, out: &mut [u16]) {
    for (i, o) in out.iter_mut().enumerate() {
        let (xmin, k) = w.taps(i);
        let mut ss = 0.0f64;
        for (&p, &kw) in src[xmin - src_x0..].iter().zip(k) {
            ss += p as f64 * kw;
        }
        *o = store_i16(ss);
    }
}

/// `ImagingResampleVertical_16bpc` for a window of output rows of `row_len` samples.
pub(crate) fn vertical_i16(src: &[u16], src_y0: usize, row_len: usize, w: &Weights, out: &mut [u16]) {
    for (yy, orow) in out.chunks_exact_mut(row_len).enumerate() {
        let (ymin, k) = w.taps(yy);
        for (x, o) in orow.iter_mut().enumerate() {
            let mut ss = 0.0f64;
            for (j, &kw) in k.iter().enumerate() {
                ss += src[(ymin + j - src_y0) * row_len + x] as f64 * kw;
            }
            *o = store_i16(ss);
        }
    }
}

/// Source indices picked by Pillow's nearest-neighbour scaling (`ImagingScaleAffine`) for the
/// outputs `first..first + count` of a resize from `in_size` to `out_size`. `None` where Pillow
/// leaves the output pixel at its fill value 0 (the accumulated coordinate left the image).
pub(crate) fn nearest_indices(in_size: usize, out_size: usize, first: usize, count: usize) -> Vec<Option<usize>> {
    // a[0] = (double)(box[2] - box[0]) / xsize with float box coordinates
    let a0 = (in_size as f32 as f64) / out_size as f64;
    let mut xo = 0.0 + a0 * 0.5;
    let mut out = Vec::with_capacity(count);
    for x in 0..first + count {
        if x >= first {
            // COORD(v): -1 for negative, else (int)v
            let xin = if xo < 0.0 { None } else { Some(xo as usize) };
            out.push(xin.filter(|&v| v < in_size));
        }
        xo += a0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_filter_values() {
        assert_eq!(bicubic_filter(0.0), 1.0);
        assert_eq!(bicubic_filter(1.0), 0.0);
        assert_eq!(bicubic_filter(-1.0), 0.0);
        assert_eq!(bicubic_filter(2.0), 0.0);
        assert_eq!(bicubic_filter(0.5), 0.5625);
        assert_eq!(bicubic_filter(1.5), -0.0625);
        assert_eq!(bicubic_filter(-1.5), -0.0625);
        assert_eq!(bicubic_filter(3.0), 0.0);
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        assert_eq!(to_fixed(1.0), 1 << 22);
        assert_eq!(to_fixed(0.5), 1 << 21);
        assert_eq!(to_fixed(-0.0625), -(1 << 18));
        // 2^-23 is half a unit: rounds away from zero on both sides
        assert_eq!(to_fixed(2f64.powi(-23)), 1);
        assert_eq!(to_fixed(-(2f64.powi(-23))), -1);
        assert_eq!(to_fixed(2f64.powi(-24)), 0);
    }

    #[test]
    fn identity_scale_is_identity() {
        let c = Coeffs::bicubic(7, 7, 0, 7);
        for i in 0..7 {
            let (xmin, k) = c.taps(i);
            for (j, &w) in k.iter().enumerate() {
                assert_eq!(w, if xmin + j == i { 1 << 22 } else { 0 }, "output {i} tap {j}");
            }
        }
    }

    #[test]
    fn downscale_by_two_matches_pillow() {
        // Pillow 13: Image.resize((2, 1), BICUBIC) of a 4x1 image; support = 4, window of
        // output 0 is source 0..3 (clipped on the left) with weights from bicubic((x-1+.5)/2)
        let c = Coeffs::bicubic(4, 2, 0, 2);
        assert_eq!(c.ksize, 9);
        assert_eq!(c.bounds, vec![(0, 4), (0, 4)]);
        let w: Vec<f64> = (0..4).map(|x| bicubic_filter((x as f64 - 1.0 + 0.5) * 0.5)).collect();
        let sum: f64 = w.iter().sum();
        let expect: Vec<i32> = w.iter().map(|v| to_fixed(v / sum)).collect();
        assert_eq!(&c.k[..4], &expect[..]);
        // weights are the mirror image for the second output
        let mirrored: Vec<i32> = expect.iter().rev().copied().collect();
        assert_eq!(&c.k[9..13], &mirrored[..]);
        // each set sums to one within rounding
        let s: i32 = expect.iter().sum();
        assert!((s - (1 << 22)).abs() <= 2);
    }

    #[test]
    fn window_matches_full_table() {
        let full = Coeffs::bicubic(1000, 333, 0, 333);
        let part = Coeffs::bicubic(1000, 333, 100, 50);
        assert_eq!(full.ksize, part.ksize);
        for i in 0..50 {
            assert_eq!(full.bounds[100 + i], part.bounds[i]);
            assert_eq!(full.taps(100 + i).1, part.taps(i).1);
        }
    }

    #[test]
    fn upscale_coefficients() {
        // upscaling keeps support 2 (filterscale 1)
        let c = Coeffs::bicubic(3, 10, 0, 10);
        assert_eq!(c.ksize, 5);
        for (i, &(xmin, n)) in c.bounds.iter().enumerate() {
            assert!(xmin + n <= 3 && n >= 1, "output {i}");
            let s: i32 = c.taps(i).1.iter().sum();
            assert!((s - (1 << 22)).abs() <= 3, "output {i}: {s}");
        }
    }

    #[test]
    fn horizontal_and_vertical_constant_image_stays_constant() {
        let c = Coeffs::bicubic(10, 4, 0, 4);
        let src = vec![77u8; 10 * 3];
        let mut out = vec![0u8; 4 * 3];
        horizontal_row::<3>(&src, 0, &c, &mut out);
        assert!(out.iter().all(|&v| v == 77));
        let rows = vec![200u8; 10 * 2];
        let mut out = vec![0u8; 4 * 2];
        vertical::<1>(&rows, 0, 2, &c, &mut out);
        assert!(out.iter().all(|&v| v == 200));
    }

    #[test]
    fn clip8_clamps() {
        assert_eq!(clip8(ROUND + (300 << 22)), 255);
        assert_eq!(clip8(ROUND - (3 << 22)), 0);
        assert_eq!(clip8(ROUND + (5 << 22)), 5);
        assert_eq!(clip8((5 << 22) + (1 << 22) - 1), 5);
    }

    #[test]
    fn sixteen_bit_resampling_matches_pillow() {
        // Image.frombytes("I;16", (5, 1), ...).resize((13, 1), BICUBIC) in Pillow 13
        let cases: [([u16; 5], [u16; 13]); 3] = [
            ([0, 65535, 0, 65535, 0], [0, 3148, 31286, 61400, 56676, 21626, 0, 21626, 56676, 61400, 31286, 3148, 0]),
            ([10, 200, 10, 250, 5], [0, 19, 101, 188, 173, 69, 10, 93, 219, 234, 122, 17, 0]),
            ([65535, 65535, 0, 0, 65535], [65535, 65535, 65535, 65535, 53544, 23416, 0, 0, 0, 7708, 37772, 62560, 65535]),
        ];
        for (src, expect) in cases {
            let w = Weights::bicubic(5, 13, 0, 13);
            let mut out = [0u16; 13];
            horizontal_row_i16(&src, 0, &w, &mut out);
            assert_eq!(out, expect, "{src:?}");
            // the vertical pass is the same arithmetic
            let mut out = [0u16; 13];
            vertical_i16(&src, 0, 1, &w, &mut out);
            assert_eq!(out, expect, "{src:?} vertical");
        }
        assert_eq!(store_i16(-3.7), 0);
        assert_eq!(store_i16(65600.2), 65535);
        assert_eq!(store_i16(2.5), 3);
        assert_eq!(store_i16(-0.4), 0);
    }

    #[test]
    fn nearest_matches_pillow_rule() {
        // Image.resize((3, 1), NEAREST) of a 9x1 "P" image picks columns 1, 4, 7
        let idx = nearest_indices(9, 3, 0, 3);
        assert_eq!(idx, vec![Some(1), Some(4), Some(7)]);
        // upscale 2 -> 5: xo = 0.2, 0.6, 1.0, 1.4, 1.8
        let idx = nearest_indices(2, 5, 0, 5);
        assert_eq!(idx, vec![Some(0), Some(0), Some(1), Some(1), Some(1)]);
        assert_eq!(nearest_indices(2, 5, 2, 2), vec![Some(1), Some(1)]);
    }
}
