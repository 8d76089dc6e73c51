//! aarch64 kernels (NEON, which every aarch64 CPU has: Raspberry Pi 4's Cortex-A72, Pi 5's
//! Cortex-A76, Jetson Orin's Cortex-A78AE).
//!
//! - int8-weight products: 16 weights widened int8 -> int16 -> int32 -> f32 in registers and
//!   multiplied into f32 accumulators (`fmla` by lane); the portable loop this replaces was a
//!   scalar one on ARM.
//! - f32 products by packed weights: R rows x 32 columns held in 8 x R registers over the whole k,
//!   four k-steps of a row per load (`fmla` by lane).
//! - LayerNorm and quantize: the portable bodies (NEON is the baseline of the target, so the
//!   compiler vectorises them with it).
//!
//! Whether our f32 products and attention run in place of tract's (`fuse_f32`) is decided by the
//! exact instruction counts of `boards/cross/` on the boards' CPUs, not here by hope: until those
//! say ours execute fewer instructions per image, tract's NEON kernels keep them.

use std::arch::aarch64::*;

use super::{portable, Kernels, F32_NB, W8_MAX_ROWS, W8_NB};

/// Most rows of the f32 kernel: 8 x 3 accumulators, 3 row registers and one weight register fit
/// NEON's 32.
const F32_ROWS: usize = 3;

pub(crate) fn neon() -> Result<Kernels, String> {
    if !std::arch::is_aarch64_feature_detected!("neon") {
        return Err("this CPU has no NEON (asimd)".into());
    }
    Ok(Kernels {
        name: "aarch64 neon",
        f32_block: f32_block_neon,
        f32_rows: F32_ROWS,
        attention: portable::attention_slice,
        w8_block: w8_block_neon,
        layer_norm: portable::layer_norm,
        quantize_i8: portable::quantize_i8,
        fuse_f32: false,
    })
}

/// # Safety
/// [`super::F32Block`]; only in the NEON table.
unsafe fn f32_block_neon(rows: usize, a: *const f32, k: usize, w: *const f32, out: *mut f32, ldo: usize, cols: usize, bias: *const f32, res: *const f32) {
    match rows {
        1 => f32_kernel::<1>(a, k, w, out, ldo, cols, bias, res),
        2 => f32_kernel::<2>(a, k, w, out, ldo, cols, bias, res),
        _ => f32_kernel::<3>(a, k, w, out, ldo, cols, bias, res),
    }
}

/// R rows by one packed block of 32 columns. SAFETY: NEON; see [`super::F32Block`].
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn f32_kernel<const R: usize>(a: *const f32, k: usize, w: *const f32, out: *mut f32, ldo: usize, cols: usize, bias: *const f32, res: *const f32) {
    let mut acc = [[vdupq_n_f32(0.0); 8]; R];
    let main = k / 4 * 4;
    let mut kk = 0;
    while kk < main {
        let mut av = [vdupq_n_f32(0.0); R];
        for r in 0..R {
            av[r] = vld1q_f32(a.add(r * k + kk));
        }
        macro_rules! step {
            ($u:literal) => {
                let wr = w.add((kk + $u) * F32_NB);
                for q in 0..8 {
                    let wv = vld1q_f32(wr.add(4 * q));
                    for r in 0..R {
                        acc[r][q] = vfmaq_laneq_f32::<$u>(acc[r][q], wv, av[r]);
                    }
                }
            };
        }
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        kk += 4;
    }
    while kk < k {
        let wr = w.add(kk * F32_NB);
        for q in 0..8 {
            let wv = vld1q_f32(wr.add(4 * q));
            for r in 0..R {
                acc[r][q] = vfmaq_n_f32(acc[r][q], wv, *a.add(r * k + kk));
            }
        }
        kk += 1;
    }
    for r in 0..R {
        let mut vals = [0f32; F32_NB];
        for q in 0..8 {
            vst1q_f32(vals.as_mut_ptr().add(4 * q), acc[r][q]);
        }
        for (j, &v) in vals.iter().enumerate().take(cols) {
            let mut v = v;
            if !bias.is_null() {
                v += *bias.add(j);
            }
            if !res.is_null() {
                v += *res.add(r * ldo + j);
            }
            *out.add(r * ldo + j) = v;
        }
    }
}

fn w8_block_neon(a: &[f32], rows: usize, k: usize, w: &[i8], acc: &mut [[f32; W8_NB]]) {
    assert!((1..=W8_MAX_ROWS).contains(&rows) && a.len() >= rows * k && w.len() >= k * W8_NB && acc.len() >= rows);
    // SAFETY: only in the NEON table; the slices have the sizes asserted above
    unsafe {
        let (a, w, o) = (a.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        match rows {
            1 => w8_kernel::<1, 2>(a, k, w, o),
            2 => w8_kernel::<2, 1>(a, k, w, o),
            3 => w8_kernel::<3, 1>(a, k, w, o),
            4 => w8_kernel::<4, 1>(a, k, w, o),
            5 => w8_kernel::<5, 1>(a, k, w, o),
            _ => w8_kernel::<6, 1>(a, k, w, o),
        }
    }
}

/// 16 int8 weights of one k-step as four f32x4 registers.
#[inline(always)]
unsafe fn widen(w: *const i8) -> [float32x4_t; 4] {
    let x = vld1q_s8(w);
    let lo = vmovl_s8(vget_low_s8(x));
    let hi = vmovl_s8(vget_high_s8(x));
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
        vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
        vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))),
    ]
}

/// `R` rows, `U` independent accumulator sets along k (one row keeps 8 FMA chains in flight).
/// SAFETY: NEON; `a` has R x k values, `w` k x 16, `out` R blocks.
#[target_feature(enable = "neon")]
unsafe fn w8_kernel<const R: usize, const U: usize>(a: *const f32, k: usize, w: *const i8, out: *mut [f32; W8_NB]) {
    let mut acc = [[[vdupq_n_f32(0.0); 4]; U]; R];
    let main = k / U * U;
    let mut kk = 0;
    while kk < main {
        for u in 0..U {
            let wv = widen(w.add((kk + u) * W8_NB));
            for r in 0..R {
                let x = *a.add(r * k + kk + u);
                for q in 0..4 {
                    acc[r][u][q] = vfmaq_n_f32(acc[r][u][q], wv[q], x);
                }
            }
        }
        kk += U;
    }
    while kk < k {
        let wv = widen(w.add(kk * W8_NB));
        for r in 0..R {
            let x = *a.add(r * k + kk);
            for q in 0..4 {
                acc[r][0][q] = vfmaq_n_f32(acc[r][0][q], wv[q], x);
            }
        }
        kk += 1;
    }
    for r in 0..R {
        let o = (*out.add(r)).as_mut_ptr();
        for q in 0..4 {
            let mut v = acc[r][0][q];
            for u in 1..U {
                v = vaddq_f32(v, acc[r][u][q]);
            }
            vst1q_f32(o.add(4 * q), v);
        }
    }
}
