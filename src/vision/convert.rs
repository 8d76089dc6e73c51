//! Pillow's per-pixel mode conversions (`src/libImaging/Convert.c`) that open_clip's transform
//! goes through: alpha premultiplication around a resize (`RGBA`<->`RGBa`, `LA`<->`La`) and the
//! final `convert("RGB")`.

/// `MULDIV255(a, b)`: `a * b / 255` rounded, in Pillow's shift form.
#[inline(always)]
pub(crate) fn muldiv255(a: u8, b: u8) -> u8 {
    let t = a as u32 * b as u32 + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// `rgbA2rgba` / `lA2la`: premultiply one colour value by its alpha.
#[inline(always)]
pub(crate) fn premultiply(v: u8, alpha: u8) -> u8 {
    muldiv255(v, alpha)
}

/// `rgba2rgbA` / `la2lA`: undo the premultiplication (alpha 0 and 255 pass the value through).
#[inline(always)]
pub(crate) fn unpremultiply(v: u8, alpha: u8) -> u8 {
    if alpha == 0 || alpha == 255 {
        v
    } else {
        ((255 * v as u32) / alpha as u32).min(255) as u8
    }
}

/// Premultiply a row of `C`-channel pixels whose last channel is alpha (C = 2 for LA, 4 for RGBA).
#[inline]
pub(crate) fn premultiply_row<const C: usize>(src: &[u8], dst: &mut [u8]) {
    for (s, d) in src.chunks_exact(C).zip(dst.chunks_exact_mut(C)) {
        let a = s[C - 1];
        for c in 0..C - 1 {
            d[c] = premultiply(s[c], a);
        }
        d[C - 1] = a;
    }
}

/// `cmyk2rgb`: `nk = 255 - k; channel = nk - c * nk / 255` (rounded), clipped.
#[inline(always)]
pub(crate) fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = 255 - p[3];
    [nk - muldiv255(p[0], nk), nk - muldiv255(p[1], nk), nk - muldiv255(p[2], nk)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn muldiv255_is_rounded_division() {
        for a in 0..=255u32 {
            for b in 0..=255u32 {
                let exact = (a * b) as f64 / 255.0;
                let got = muldiv255(a as u8, b as u8) as f64;
                assert!((got - exact).abs() <= 0.5 + 1e-9, "{a}*{b}: {got} vs {exact}");
            }
        }
        assert_eq!(muldiv255(255, 255), 255);
        assert_eq!(muldiv255(255, 0), 0);
        assert_eq!(muldiv255(200, 128), 100);
    }

    #[test]
    fn premultiply_values_from_pillow() {
        // Image.fromarray(..., "RGBA").convert("RGBa") in Pillow 13
        assert_eq!(premultiply(100, 128), 50);
        assert_eq!(premultiply(1, 127), 0);
        assert_eq!(premultiply(1, 128), 1);
        assert_eq!(premultiply(255, 1), 1);
        assert_eq!(premultiply(37, 255), 37);
        assert_eq!(premultiply(200, 0), 0);
    }

    #[test]
    fn unpremultiply_values_from_pillow() {
        // Image.fromarray(..., "RGBa").convert("RGBA") in Pillow 13
        assert_eq!(unpremultiply(50, 128), 99);
        assert_eq!(unpremultiply(200, 100), 255); // clipped
        assert_eq!(unpremultiply(17, 0), 17);
        assert_eq!(unpremultiply(17, 255), 17);
        assert_eq!(unpremultiply(1, 2), 127);
    }

    #[test]
    fn cmyk_values_from_pillow() {
        // Image.new("CMYK", (1, 1), v).convert("RGB") in Pillow 13
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 0]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[10, 100, 200, 50]), [197, 125, 44]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255]), [0, 0, 0]);
    }

    #[test]
    fn premultiply_row_keeps_alpha() {
        let src = [10u8, 20, 30, 128, 255, 255, 255, 0];
        let mut dst = [0u8; 8];
        premultiply_row::<4>(&src, &mut dst);
        assert_eq!(dst, [5, 10, 15, 128, 0, 0, 0, 0]);
        let src = [200u8, 51, 9, 255];
        let mut dst = [0u8; 4];
        premultiply_row::<2>(&src, &mut dst);
        assert_eq!(dst, [40, 51, 9, 255]);
    }
}
