//! aarch64 kernels (NEON, which every aarch64 CPU has: Raspberry Pi 4's Cortex-A72, Pi 5's
//! Cortex-A76, Jetson Orin's Cortex-A78AE).
//!
//! - int8-weight products: 16 weights widened int8 -> int16 -> int32 -> f32 in registers and
//!   multiplied into f32 accumulators (`fmla` by lane); the portable loop this replaces was a
//!   scalar one on ARM.
//! - f32 products by packed weights: R rows x 32 columns held in 8 x R registers over the whole k,
//!   four k-steps of a row per load (`fmla` by lane).
//! - int8 x int8 products (the decoder step's run-time-quantised design, `MatMulQ8`): with the
//!   8-bit dot product (`sdot`, ARMv8.2 dotprod: Cortex-A76 = Pi 5, A78AE = Jetson Orin) four
//!   multiply-adds per lane per instruction, 16 columns x 4 k in four registers; without it
//!   (Cortex-A72 = Pi 4) `smull` to 16 bits and pairwise-add-accumulate (`sadalp`) to 32.
//! - LayerNorm and quantize: the portable bodies (NEON is the baseline of the target, so the
//!   compiler vectorises them with it).
//!
//! Whether our f32 products and attention run in place of tract's (`fuse_f32`) is decided by the
//! exact instruction counts of `boards/cross/` on the boards' CPUs, not here by hope: until those
//! say ours execute fewer instructions per image, tract's NEON kernels keep them.

use std::arch::aarch64::*;

use super::{portable, Kernels, F32_NB, Q8_KSTEP, Q8_MAX_ROWS, Q8_NB, W8_MAX_ROWS, W8_NB};

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
        decoder_attention,
        w8_block: w8_block_neon,
        q8_block: q8_block_neon,
        layer_norm: portable::layer_norm,
        quantize_i8: portable::quantize_i8,
        fuse_f32: false,
        // B/32 image encoder as a Cortex-A72 (no dot product): tract's `smlal` kernel 1,851 M
        // instructions, ours (`smull` + `sadalp`) 2,327 M; the dotprod table turns it on
        fuse_q8_static: false,
    })
}

/// NEON with the 8-bit dot product (`FEAT_DotProd`): the NEON table with `sdot` for the
/// int8 x int8 products.
pub(crate) fn dotprod() -> Result<Kernels, String> {
    let base = neon()?;
    if !std::arch::is_aarch64_feature_detected!("dotprod") {
        return Err("this CPU has no 8-bit dot product (asimddp)".into());
    }
    // B/32 image encoder as a Cortex-A76, same bundle: tract's int8 (`sdot`, 8x8 tiles) 575 M
    // instructions, ours 478 M (boards/cross/armcount.sh, COCA_TRACT_INT8=1 for tract's)
    Ok(Kernels { name: "aarch64 neon+dotprod", q8_block: q8_block_dotprod, fuse_q8_static: true, ..base })
}

/// [`super::DecoderAttention`] in NEON for head size 64 (every open_clip ViT-B and ViT-L text
/// tower): the query and the result stay in 16 registers each over the row of keys, so a key
/// costs its 16 loads and 16 `fmla` for the score and as many for the value. Other head sizes:
/// the portable body with fused multiply-adds (compiled for the autovectoriser: it made two-lane
/// code of a fixed-size form of this, so the registers are written out here).
fn decoder_attention(q: &[f32], d: usize, k: &[f32], v: &[f32], keys: &[usize], mask: &[f32], scale: f32, o: &mut [f32], scores: &mut Vec<f32>) {
    const D: usize = 64;
    if d != D {
        return portable::decoder_attention_body::<true>(q, d, k, v, keys, mask, scale, o, scores);
    }
    let (s, t) = (q.len() / D, keys.len());
    assert!(o.len() >= s * D && (mask.is_empty() || mask.len() >= s * t));
    assert!(keys.iter().all(|&kj| kj + D <= k.len() && kj + D <= v.len()), "decoder attention: a key or value row leaves its buffer");
    scores.clear();
    scores.resize(t, 0.0);
    for i in 0..s {
        // SAFETY: q has s rows of D, every key and value row was checked to lie in k and v, o
        // has s rows of D (asserted above)
        unsafe {
            let qp = q.as_ptr().add(i * D);
            let qr: [float32x4_t; 16] = std::array::from_fn(|c| vld1q_f32(qp.add(4 * c)));
            for (j, (sj, &kj)) in scores.iter_mut().zip(keys).enumerate() {
                let kp = k.as_ptr().add(kj);
                let mut acc = [vdupq_n_f32(0.0); 4];
                for c in 0..16 {
                    acc[c % 4] = vfmaq_f32(acc[c % 4], qr[c], vld1q_f32(kp.add(4 * c)));
                }
                let sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
                let m = if mask.is_empty() { 0.0 } else { mask[i * t + j] };
                *sj = sum * scale + m;
            }
            let inv = portable::softmax_unnormalised(scores);
            let mut out = [vdupq_n_f32(0.0); 16];
            for (&p, &kj) in scores.iter().zip(keys) {
                let vp = v.as_ptr().add(kj);
                let pv = vdupq_n_f32(p);
                for c in 0..16 {
                    out[c] = vfmaq_f32(out[c], pv, vld1q_f32(vp.add(4 * c)));
                }
            }
            let op = o.as_mut_ptr().add(i * D);
            for (c, x) in out.iter().enumerate() {
                vst1q_f32(op.add(4 * c), vmulq_n_f32(*x, inv));
            }
        }
    }
}

fn q8_check(a: &[i8], rows: usize, kp: usize, w: &[i8], acc: &[[i32; Q8_NB]]) {
    assert!((1..=Q8_MAX_ROWS).contains(&rows) && kp.is_multiple_of(Q8_KSTEP) && a.len() >= rows * kp && w.len() >= kp * Q8_NB && acc.len() >= rows);
}

fn q8_block_dotprod(a: &[i8], rows: usize, kp: usize, w: &[i8], acc: &mut [[i32; Q8_NB]]) {
    q8_check(a, rows, kp, w, acc);
    // SAFETY: only in the dotprod table (built where the CPU has it); sizes checked above
    unsafe {
        let (a, w, o) = (a.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        match rows {
            1 => q8_sdot::<1>(a, kp, w, o),
            2 => q8_sdot::<2>(a, kp, w, o),
            3 => q8_sdot::<3>(a, kp, w, o),
            4 => q8_sdot::<4>(a, kp, w, o),
            _ => q8_sdot::<5>(a, kp, w, o),
        }
    }
}

/// `acc += w · a[lane]`, four 8-bit products per 32-bit lane (`sdot` by element; the intrinsic
/// is not stable in Rust yet, the instruction is).
#[inline(always)]
unsafe fn sdot<const L: i32>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    std::arch::asm!("sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]", acc = inout(vreg) acc, w = in(vreg) w, a = in(vreg) a, l = const L,
        options(pure, nomem, nostack, preserves_flags));
    acc
}

/// 16 bytes at `*p`, then `*p += 16` (a post-indexed `ldr`: LLVM otherwise recomputed each row's
/// address from the first with an `add` per row per 16 k).
/// SAFETY: 16 readable bytes at `*p`.
#[inline(always)]
unsafe fn load_next(p: &mut *const i8) -> int8x16_t {
    let v: int8x16_t;
    std::arch::asm!("ldr {v:q}, [{p}], #16", v = out(vreg) v, p = inout(reg) *p, options(pure, readonly, nostack, preserves_flags));
    v
}

/// 64 bytes at `*p` into four registers (one `ld1` of four, which needs consecutive registers:
/// v28-v31), then `*p += 64`. LLVM splits `vld1q_s8_x4` into two `ldp`.
/// SAFETY: 64 readable bytes at `*p`.
#[inline(always)]
unsafe fn load4_next(p: &mut *const i8) -> (int8x16_t, int8x16_t, int8x16_t, int8x16_t) {
    let (a, b, c, d);
    std::arch::asm!("ld1 {{v28.16b, v29.16b, v30.16b, v31.16b}}, [{p}], #64", p = inout(reg) *p,
        out("v28") a, out("v29") b, out("v30") c, out("v31") d, options(pure, readonly, nostack, preserves_flags));
    (a, b, c, d)
}

/// R rows by one block of 16 columns: per 16 k, one activation register per row (four 4-byte
/// lanes, a post-indexed load per row) and, per lane, the 16 columns' weights in four
/// registers (one post-indexed `ld1` of 64 bytes), used by every row before the next lane.
/// Registers: 4R accumulators, R activations, 4 weights: R = 5 fits NEON's 32. Per 16 k: 80
/// `sdot` to 5 + 4 loads and the loop's 2-3 (B/32 as a Cortex-A76: R = 4 with `ldp` pairs was
/// 25% beside the `sdot`s; R = 6 needs more than 32 registers and LLVM spilled).
/// SAFETY: NEON and dotprod; `a` R x kp, `w` kp x 16 in the [`super::Q8Block`] order.
#[target_feature(enable = "neon,dotprod")]
unsafe fn q8_sdot<const R: usize>(a: *const i8, kp: usize, mut w: *const i8, out: *mut [i32; Q8_NB]) {
    let mut acc = [[vdupq_n_s32(0); 4]; R];
    let mut rows: [*const i8; R] = std::array::from_fn(|r| a.add(r * kp));
    let mut kk = 0;
    while kk < kp {
        let mut av = [vdupq_n_s8(0); R];
        for r in 0..R {
            av[r] = load_next(&mut rows[r]);
        }
        macro_rules! lane {
            ($l:literal) => {
                let wv = load4_next(&mut w);
                for r in 0..R {
                    acc[r][0] = sdot::<$l>(acc[r][0], wv.0, av[r]);
                    acc[r][1] = sdot::<$l>(acc[r][1], wv.1, av[r]);
                    acc[r][2] = sdot::<$l>(acc[r][2], wv.2, av[r]);
                    acc[r][3] = sdot::<$l>(acc[r][3], wv.3, av[r]);
                }
            };
        }
        lane!(0);
        lane!(1);
        lane!(2);
        lane!(3);
        kk += 16;
    }
    for r in 0..R {
        let o = (*out.add(r)).as_mut_ptr();
        for q in 0..4 {
            vst1q_s32(o.add(4 * q), acc[r][q]);
        }
    }
}

fn q8_block_neon(a: &[i8], rows: usize, kp: usize, w: &[i8], acc: &mut [[i32; Q8_NB]]) {
    q8_check(a, rows, kp, w, acc);
    // SAFETY: only in the NEON tables; sizes checked above
    unsafe {
        let (a, w, o) = (a.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        match rows {
            1 => q8_smull::<1>(a, kp, w, o),
            2 => q8_smull::<2>(a, kp, w, o),
            3 => q8_smull::<3>(a, kp, w, o),
            4 => q8_smull::<4>(a, kp, w, o),
            _ => q8_smull::<5>(a, kp, w, o),
        }
    }
}

/// R rows by one block of 16 columns without a dot product: per group of four k, the row's
/// four bytes repeated over a register, `smull`/`smull2` against the four weight registers
/// (each product fits 16 bits) and `sadalp` into 32-bit pair sums, added pairwise at the end.
/// SAFETY: NEON; `a` R x kp, `w` kp x 16 in the [`super::Q8Block`] order.
#[target_feature(enable = "neon")]
unsafe fn q8_smull<const R: usize>(a: *const i8, kp: usize, w: *const i8, out: *mut [i32; Q8_NB]) {
    // acc[r][q][h]: columns 4q + 2h, 4q + 2h + 1, two k-pair sums each
    let mut acc = [[[vdupq_n_s32(0); 2]; 4]; R];
    let mut kk = 0;
    while kk < kp {
        let wv = vld1q_s8_x4(w.add(kk * Q8_NB));
        let wq = [wv.0, wv.1, wv.2, wv.3];
        for r in 0..R {
            let x = vreinterpretq_s8_s32(vld1q_dup_s32(a.add(r * kp + kk) as *const i32));
            for q in 0..4 {
                acc[r][q][0] = vpadalq_s16(acc[r][q][0], vmull_s8(vget_low_s8(wq[q]), vget_low_s8(x)));
                acc[r][q][1] = vpadalq_s16(acc[r][q][1], vmull_high_s8(wq[q], x));
            }
        }
        kk += 4;
    }
    for r in 0..R {
        let o = (*out.add(r)).as_mut_ptr();
        for q in 0..4 {
            // (c0 pair sums, c1 pair sums) + (c2, c3) -> c0..c3
            vst1q_s32(o.add(4 * q), vpaddq_s32(acc[r][q][0], acc[r][q][1]));
        }
    }
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
