//! x86-64 kernels: AVX-512F (f32 products by packed weights, attention, int8-weight products)
//! and AVX2 + FMA (int8-weight products), plus AVX-512 / AVX2 builds of the portable LayerNorm
//! and quantize bodies (VEX-encoded: after tract's AVX kernels have run, legacy-SSE code on the
//! same thread ran 4x slower here, 1.9 vs 0.5 ns per quantized value in the B/32 graph).
//!
//! Each table constructor checks the features its kernels need; a table is only ever built on
//! a CPU that has them, which is what makes the safe wrappers below sound.

use super::{portable, Kernels, Mat, Scratch, Q8_NB, W8_NB};

/// AVX-512F (with AVX2 and FMA, which every AVX-512 CPU has): our f32 products and attention
/// beat tract's kernels here (BENCHMARKS.md, "Image path"), so the f32 rewrites are made.
pub(crate) fn avx512() -> Result<Kernels, String> {
    for f in ["avx512f", "avx2", "fma"] {
        if !detected(f) {
            return Err(format!("this CPU has no {f}"));
        }
    }
    Ok(Kernels {
        name: "x86_64 avx512f",
        f32_block: f32_block_avx512,
        f32_rows: 12,
        attention: attention_avx512,
        w8_block: w8_block_avx512,
        q8_block: q8_block_avx2,
        decoder_attention: decoder_attention_avx512,
        layer_norm: layer_norm_avx512,
        quantize_i8: quantize_i8_avx2,
        fuse_f32: true,
        // q8_block is the compiler-vectorised loop here (no VNNI kernel): the dyn-q8 decoder step
        // measured 2.5x slower through it than sym-w8, so tract's AVX2 / AVX-512 int8 kernels keep
        // the static products (not timed against them)
        fuse_q8_static: false,
    })
}

/// AVX2 + FMA: int8-weight products, LayerNorm and quantize; f32 products and attention stay
/// tract's (its AVX2 kernels; ours are AVX-512 only), so the portable forms fill the table.
pub(crate) fn avx2() -> Result<Kernels, String> {
    for f in ["avx2", "fma"] {
        if !detected(f) {
            return Err(format!("this CPU has no {f}"));
        }
    }
    Ok(Kernels {
        name: "x86_64 avx2+fma",
        f32_block: portable::f32_block,
        f32_rows: portable::table().f32_rows,
        attention: portable::attention_slice,
        w8_block: w8_block_avx2,
        q8_block: q8_block_avx2,
        decoder_attention: decoder_attention_avx2,
        layer_norm: layer_norm_avx2,
        quantize_i8: quantize_i8_avx2,
        fuse_f32: false,
        fuse_q8_static: false,
    })
}

fn detected(feature: &str) -> bool {
    match feature {
        "avx512f" => std::is_x86_feature_detected!("avx512f"),
        "avx2" => std::is_x86_feature_detected!("avx2"),
        "fma" => std::is_x86_feature_detected!("fma"),
        _ => false,
    }
}

/// # Safety
/// [`super::F32Block`]; only in the AVX-512 table.
unsafe fn f32_block_avx512(rows: usize, a: *const f32, k: usize, w: *const f32, out: *mut f32, ldo: usize, cols: usize, bias: *const f32, res: *const f32) {
    product::dispatch(rows, a, k, w, out, ldo, cols, (!bias.is_null()).then_some(bias), res)
}

/// # Safety
/// [`super::AttentionSlice`]; only in the AVX-512 table.
unsafe fn attention_avx512(a: Mat, b: Mat, v: Mat, o: Mat, dims: (usize, usize, usize, usize), scales: (f32, f32), sc: &mut Scratch) {
    attention::slice(a, b, v, o, dims, scales, sc)
}

fn w8_block_avx512(a: &[f32], rows: usize, k: usize, w: &[i8], acc: &mut [[f32; W8_NB]]) {
    assert!((1..=super::W8_MAX_ROWS).contains(&rows) && a.len() >= rows * k && w.len() >= k * W8_NB && acc.len() >= rows);
    // SAFETY: this function is only in the AVX-512 table, built where the CPU has AVX-512F; the
    // slices have the sizes asserted above
    unsafe {
        let (a, w, o) = (a.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        match rows {
            1 => w8::kernel512::<1, 4>(a, k, w, o),
            2 => w8::kernel512::<2, 2>(a, k, w, o),
            3 => w8::kernel512::<3, 2>(a, k, w, o),
            4 => w8::kernel512::<4, 1>(a, k, w, o),
            5 => w8::kernel512::<5, 1>(a, k, w, o),
            _ => w8::kernel512::<6, 1>(a, k, w, o),
        }
    }
}

fn w8_block_avx2(a: &[f32], rows: usize, k: usize, w: &[i8], acc: &mut [[f32; W8_NB]]) {
    assert!((1..=super::W8_MAX_ROWS).contains(&rows) && a.len() >= rows * k && w.len() >= k * W8_NB && acc.len() >= rows);
    // SAFETY: only in tables built where the CPU has AVX2 and FMA; sizes asserted above
    unsafe {
        let (a, w, o) = (a.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        match rows {
            1 => w8::kernel::<1, 4>(a, k, w, o),
            2 => w8::kernel::<2, 2>(a, k, w, o),
            3 => w8::kernel::<3, 2>(a, k, w, o),
            4 => w8::kernel::<4, 1>(a, k, w, o),
            5 => w8::kernel::<5, 1>(a, k, w, o),
            _ => w8::kernel::<6, 1>(a, k, w, o),
        }
    }
}

/// The portable int8 x int8 block compiled with AVX2 (the compiler widens to 16 bits and uses
/// `vpmaddwd`); the B/32 decoder's int8 design on x86 stays the f32-activation one (`w8_block`).
fn q8_block_avx2(a: &[i8], rows: usize, kp: usize, w: &[i8], acc: &mut [[i32; Q8_NB]]) {
    #[target_feature(enable = "avx2")]
    unsafe fn build(a: &[i8], rows: usize, kp: usize, w: &[i8], acc: &mut [[i32; Q8_NB]]) {
        portable::q8_block(a, rows, kp, w, acc)
    }
    // SAFETY: only in tables built where the CPU has AVX2
    unsafe { build(a, rows, kp, w, acc) }
}

fn decoder_attention_avx512(q: &[f32], d: usize, k: &[f32], v: &[f32], keys: &[usize], mask: &[f32], scale: f32, o: &mut [f32], scores: &mut Vec<f32>) {
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn build(q: &[f32], d: usize, k: &[f32], v: &[f32], keys: &[usize], mask: &[f32], scale: f32, o: &mut [f32], scores: &mut Vec<f32>) {
        portable::decoder_attention_body::<true>(q, d, k, v, keys, mask, scale, o, scores)
    }
    // SAFETY: only in the AVX-512 table, built where the CPU has AVX-512F (and so FMA)
    unsafe { build(q, d, k, v, keys, mask, scale, o, scores) }
}

fn decoder_attention_avx2(q: &[f32], d: usize, k: &[f32], v: &[f32], keys: &[usize], mask: &[f32], scale: f32, o: &mut [f32], scores: &mut Vec<f32>) {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn build(q: &[f32], d: usize, k: &[f32], v: &[f32], keys: &[usize], mask: &[f32], scale: f32, o: &mut [f32], scores: &mut Vec<f32>) {
        portable::decoder_attention_body::<true>(q, d, k, v, keys, mask, scale, o, scores)
    }
    // SAFETY: only in tables built where the CPU has AVX2 and FMA
    unsafe { build(q, d, k, v, keys, mask, scale, o, scores) }
}

fn layer_norm_avx512(x: &[f32], y: &mut [f32], n: usize, inner: usize, scale: &[f32], bias: &[f32], eps: f32) {
    #[target_feature(enable = "avx512f")]
    unsafe fn build(x: &[f32], y: &mut [f32], n: usize, inner: usize, scale: &[f32], bias: &[f32], eps: f32) {
        portable::layer_norm_body(x, y, n, inner, scale, bias, eps)
    }
    // SAFETY: only in the AVX-512 table
    unsafe { build(x, y, n, inner, scale, bias, eps) }
}

fn layer_norm_avx2(x: &[f32], y: &mut [f32], n: usize, inner: usize, scale: &[f32], bias: &[f32], eps: f32) {
    #[target_feature(enable = "avx2")]
    unsafe fn build(x: &[f32], y: &mut [f32], n: usize, inner: usize, scale: &[f32], bias: &[f32], eps: f32) {
        portable::layer_norm_body(x, y, n, inner, scale, bias, eps)
    }
    // SAFETY: only in tables built where the CPU has AVX2
    unsafe { build(x, y, n, inner, scale, bias, eps) }
}

fn quantize_i8_avx2(xs: &[f32], ys: &mut [i8], inv_scale: f32, zero_point: i8) {
    #[target_feature(enable = "avx2")]
    unsafe fn build(xs: &[f32], ys: &mut [i8], inv_scale: f32, zero_point: i8) {
        portable::quantize_i8_body(xs, ys, inv_scale, zero_point)
    }
    // SAFETY: only in tables built where the CPU has AVX2
    unsafe { build(xs, ys, inv_scale, zero_point) }
}

/// `m` (rows x cols) as a pointer and row stride with contiguous rows: itself where it has them,
/// else copied into `buf`.
/// SAFETY: `m` addresses rows x cols valid elements.
pub(crate) unsafe fn contiguous_rows(m: Mat, rows: usize, cols: usize, buf: &mut Vec<f32>) -> (*const f32, usize) {
    if m.cs == 1 || cols == 1 {
        return (m.ptr, m.rs);
    }
    buf.clear();
    buf.resize(rows * cols, 0.0);
    if m.rs < m.cs {
        // (k as the projection wrote it: read its contiguous rows, each written down a column;
        // the other order misses L1 on every read once l2 rows exceed it, as an L/14's 257 do)
        for j in 0..cols {
            for i in 0..rows {
                *buf.get_unchecked_mut(i * cols + j) = *m.ptr.add(i * m.rs + j * m.cs);
            }
        }
    } else {
        for i in 0..rows {
            for j in 0..cols {
                *buf.get_unchecked_mut(i * cols + j) = *m.ptr.add(i * m.rs + j * m.cs);
            }
        }
    }
    (buf.as_ptr(), cols)
}

/// The attention slice: two register-blocked products around the softmax.
mod attention {
    use super::contiguous_rows;
    use crate::kernels::portable::softmax_unnormalised;
    use crate::kernels::{Mat, Scratch};
    use std::arch::x86_64::*;

    /// Rows of a product computed together.
    const MR: usize = 4;
    /// Columns of a product computed together (four registers).
    const NC: usize = 64;

    /// One slice: scores = a b · scale (l x l2), softmax rows, out = scores v, rows scaled by
    /// out_scale / sum.
    /// SAFETY: AVX-512F; the matrices address valid elements of their dims, `o` writable.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn slice(a: Mat, b: Mat, v: Mat, o: Mat, (l, d, l2, dv): (usize, usize, usize, usize), (scale, out_scale): (f32, f32), sc: &mut Scratch) {
        let (ap, lda) = contiguous_rows(a, l, d, &mut sc.a);
        let (bp, ldb) = contiguous_rows(b, d, l2, &mut sc.b);
        let (vp, ldv) = contiguous_rows(v, l2, dv, &mut sc.v);
        sc.s.resize(l * l2, 0.0);
        sc.inv.resize(l, 0.0);
        let row_scale = if scale == 1.0 {
            None
        } else {
            sc.scale.clear();
            sc.scale.resize(l, scale);
            Some(&sc.scale[..])
        };
        product(ap, lda, bp, ldb, sc.s.as_mut_ptr(), l2, l, d, l2, row_scale);
        for (row, inv) in sc.s.chunks_exact_mut(l2).zip(sc.inv.iter_mut()) {
            *inv = softmax_unnormalised(row) * out_scale;
        }
        if o.cs == 1 || dv == 1 {
            product(sc.s.as_ptr(), l2, vp, ldv, o.ptr as *mut f32, o.rs, l, l2, dv, Some(&sc.inv));
        } else {
            sc.o.resize(l * dv, 0.0);
            product(sc.s.as_ptr(), l2, vp, ldv, sc.o.as_mut_ptr(), dv, l, l2, dv, Some(&sc.inv));
            for i in 0..l {
                for c in 0..dv {
                    *(o.ptr as *mut f32).add(i * o.rs + c * o.cs) = sc.o[i * dv + c];
                }
            }
        }
    }

    /// c (rows x cols, row stride ldc) = x (rows x k, stride ldx) times y (k x cols, stride
    /// ldy), each row of c times `scale[row]` when given.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn product(
        x: *const f32,
        ldx: usize,
        y: *const f32,
        ldy: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        k: usize,
        cols: usize,
        scale: Option<&[f32]>,
    ) {
        let mut j0 = 0;
        while j0 < cols {
            let w = NC.min(cols - j0);
            let mut r0 = 0;
            while r0 < rows {
                let r = MR.min(rows - r0);
                let sc = scale.map(|s| s.as_ptr().add(r0));
                let (xp, yp, cp) = (x.add(r0 * ldx), y.add(j0), c.add(r0 * ldc + j0));
                match r {
                    1 => block::<1>(xp, ldx, yp, ldy, cp, ldc, k, w, sc),
                    2 => block::<2>(xp, ldx, yp, ldy, cp, ldc, k, w, sc),
                    3 => block::<3>(xp, ldx, yp, ldy, cp, ldc, k, w, sc),
                    _ => block::<4>(xp, ldx, yp, ldy, cp, ldc, k, w, sc),
                }
                r0 += r;
            }
            j0 += w;
        }
    }

    fn mask(w: usize, chunk: usize) -> __mmask16 {
        let left = w.saturating_sub(chunk * 16).min(16);
        if left == 16 {
            0xffff
        } else {
            ((1u32 << left) - 1) as u16
        }
    }

    /// R rows by up to 64 columns (`w`), over k.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize>(
        x: *const f32,
        ldx: usize,
        y: *const f32,
        ldy: usize,
        c: *mut f32,
        ldc: usize,
        k: usize,
        w: usize,
        scale: Option<*const f32>,
    ) {
        let m = [mask(w, 0), mask(w, 1), mask(w, 2), mask(w, 3)];
        let chunks = w.div_ceil(16);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if chunks == 4 {
            for kk in 0..k {
                let yr = y.add(kk * ldy);
                let yv = [_mm512_loadu_ps(yr), _mm512_loadu_ps(yr.add(16)), _mm512_loadu_ps(yr.add(32)), _mm512_maskz_loadu_ps(m[3], yr.add(48))];
                for r in 0..R {
                    let xv = _mm512_set1_ps(*x.add(r * ldx + kk));
                    for q in 0..4 {
                        acc[r][q] = _mm512_fmadd_ps(xv, yv[q], acc[r][q]);
                    }
                }
            }
        } else {
            for kk in 0..k {
                let yr = y.add(kk * ldy);
                let mut yv = [_mm512_setzero_ps(); 4];
                for q in 0..chunks {
                    yv[q] = _mm512_maskz_loadu_ps(m[q], yr.add(16 * q));
                }
                for r in 0..R {
                    let xv = _mm512_set1_ps(*x.add(r * ldx + kk));
                    for q in 0..chunks {
                        acc[r][q] = _mm512_fmadd_ps(xv, yv[q], acc[r][q]);
                    }
                }
            }
        }
        for r in 0..R {
            let f = _mm512_set1_ps(scale.map_or(1.0, |s| *s.add(r)));
            for q in 0..chunks {
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * q), m[q], _mm512_mul_ps(acc[r][q], f));
            }
        }
    }
}

/// The f32 product by one packed block of 32 columns: 2 x R accumulators over the whole k.
mod product {
    use crate::kernels::F32_NB as NB;
    use std::arch::x86_64::*;

    /// SAFETY: AVX-512F; see [`kernel`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dispatch(
        rows: usize,
        a: *const f32,
        k: usize,
        w: *const f32,
        out: *mut f32,
        ldo: usize,
        cols: usize,
        bias: Option<*const f32>,
        res: *const f32,
    ) {
        let f = match rows {
            1 => kernel::<1>,
            2 => kernel::<2>,
            3 => kernel::<3>,
            4 => kernel::<4>,
            5 => kernel::<5>,
            6 => kernel::<6>,
            7 => kernel::<7>,
            8 => kernel::<8>,
            9 => kernel::<9>,
            10 => kernel::<10>,
            11 => kernel::<11>,
            _ => kernel::<12>,
        };
        f(a, k, w, out, ldo, cols, bias.unwrap_or(std::ptr::null()), res)
    }

    /// `out[r, 0..cols] = bias + sum over k of a[r, kk] * w[kk, 0..cols] (+ res[r, 0..cols])`
    /// for R rows of `a` (row stride k) and one packed block `w` (k x 32); `out` and `res` have
    /// row stride `ldo`.
    /// SAFETY: AVX-512F; `a` has R x k values, `w` k x 32, `out` R rows of `cols` <= 32
    /// writable values, `bias` null or 32 values, `res` null or R rows of `cols` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel<const R: usize>(a: *const f32, k: usize, w: *const f32, out: *mut f32, ldo: usize, cols: usize, bias: *const f32, res: *const f32) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for kk in 0..k {
            let w0 = _mm512_loadu_ps(w.add(kk * NB));
            let w1 = _mm512_loadu_ps(w.add(kk * NB + 16));
            for r in 0..R {
                let av = _mm512_set1_ps(*a.add(r * k + kk));
                lo[r] = _mm512_fmadd_ps(av, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, w1, hi[r]);
            }
        }
        let (b0, b1) = if bias.is_null() { (_mm512_setzero_ps(), _mm512_setzero_ps()) } else { (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16))) };
        let m0: __mmask16 = if cols >= 16 { 0xffff } else { ((1u32 << cols) - 1) as u16 };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols <= 16 {
            0
        } else {
            ((1u32 << (cols - 16)) - 1) as u16
        };
        for r in 0..R {
            let o = out.add(r * ldo);
            let (mut l, mut h) = (_mm512_add_ps(lo[r], b0), _mm512_add_ps(hi[r], b1));
            if !res.is_null() {
                let x = res.add(r * ldo);
                l = _mm512_add_ps(l, _mm512_maskz_loadu_ps(m0, x));
                h = _mm512_add_ps(h, _mm512_maskz_loadu_ps(m1, x.add(16)));
            }
            _mm512_mask_storeu_ps(o, m0, l);
            _mm512_mask_storeu_ps(o.add(16), m1, h);
        }
    }
}

/// The int8-weight products: weights widened to f32 in registers.
mod w8 {
    use crate::kernels::W8_NB as NB;
    use std::arch::x86_64::*;

    /// The AVX-512 form: one 16-lane register per block row, the int8 -> i32 widening reads
    /// memory directly (4 instructions per 16 weights and row against 9 with AVX2).
    /// SAFETY: AVX-512F; `a` has R x k values, `w` k x 16, `out` R blocks.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel512<const R: usize, const U: usize>(a: *const f32, k: usize, w: *const i8, out: *mut [f32; NB]) {
        let mut acc = [[_mm512_setzero_ps(); U]; R];
        let main = k / U * U;
        let mut kk = 0;
        while kk < main {
            for u in 0..U {
                let wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(w.add((kk + u) * NB) as *const __m128i)));
                for r in 0..R {
                    acc[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * k + kk + u)), wv, acc[r][u]);
                }
            }
            kk += U;
        }
        while kk < k {
            let wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(w.add(kk * NB) as *const __m128i)));
            for r in 0..R {
                acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * k + kk)), wv, acc[r][0]);
            }
            kk += 1;
        }
        for r in 0..R {
            let mut v = acc[r][0];
            for u in 1..U {
                v = _mm512_add_ps(v, acc[r][u]);
            }
            _mm512_storeu_ps((*out.add(r)).as_mut_ptr(), v);
        }
    }

    /// `R` rows, `U` independent accumulator sets along k (so a single row still keeps
    /// 8 FMA chains in flight). SAFETY: AVX2 + FMA; `a` has R x k values, `w` k x 16,
    /// `out` R blocks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel<const R: usize, const U: usize>(a: *const f32, k: usize, w: *const i8, out: *mut [f32; NB]) {
        let mut lo = [[_mm256_setzero_ps(); U]; R];
        let mut hi = [[_mm256_setzero_ps(); U]; R];
        let main = k / U * U;
        let mut kk = 0;
        while kk < main {
            for u in 0..U {
                let x = _mm_loadu_si128(w.add((kk + u) * NB) as *const __m128i);
                let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
                let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(x, x)));
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*a.add(r * k + kk + u));
                    lo[r][u] = _mm256_fmadd_ps(av, w0, lo[r][u]);
                    hi[r][u] = _mm256_fmadd_ps(av, w1, hi[r][u]);
                }
            }
            kk += U;
        }
        while kk < k {
            let x = _mm_loadu_si128(w.add(kk * NB) as *const __m128i);
            let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
            let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(x, x)));
            for r in 0..R {
                let av = _mm256_broadcast_ss(&*a.add(r * k + kk));
                lo[r][0] = _mm256_fmadd_ps(av, w0, lo[r][0]);
                hi[r][0] = _mm256_fmadd_ps(av, w1, hi[r][0]);
            }
            kk += 1;
        }
        for r in 0..R {
            let (mut l, mut h) = (lo[r][0], hi[r][0]);
            for u in 1..U {
                l = _mm256_add_ps(l, lo[r][u]);
                h = _mm256_add_ps(h, hi[r][u]);
            }
            let o = (*out.add(r)).as_mut_ptr();
            _mm256_storeu_ps(o, l);
            _mm256_storeu_ps(o.add(8), h);
        }
    }
}
