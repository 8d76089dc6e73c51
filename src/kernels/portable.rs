//! Every kernel in plain Rust: the fallback of every CPU, and the bodies that the ISA modules
//! compile again with their target features enabled (`#[inline(always)]` here, so each
//! `#[target_feature]` wrapper gets its own vectorised copy).

use super::{Kernels, Mat, Scratch, F32_NB, Q8_KSTEP, Q8_MAX_ROWS, Q8_NB, W8_MAX_ROWS, W8_NB};

/// The portable table (every CPU runs it). Its f32 products are correct but not fast: the model
/// leaves f32 products to tract where this is all there is.
pub(crate) fn table() -> Kernels {
    Kernels {
        name: "portable",
        f32_block,
        f32_rows: 4,
        attention: attention_slice,
        decoder_attention,
        w8_block,
        q8_block,
        layer_norm,
        quantize_i8,
        fuse_f32: false,
        fuse_q8_static: false,
    }
}

/// [`super::F32Block`] with plain loops (separate multiply and add: `mul_add` is a library call
/// on CPUs without FMA).
///
/// # Safety
/// See [`super::F32Block`].
pub(crate) unsafe fn f32_block(rows: usize, a: *const f32, k: usize, w: *const f32, out: *mut f32, ldo: usize, cols: usize, bias: *const f32, res: *const f32) {
    let w = std::slice::from_raw_parts(w, k * F32_NB);
    for r in 0..rows {
        let ar = std::slice::from_raw_parts(a.add(r * k), k);
        let mut s = [0f32; F32_NB];
        for (&x, wk) in ar.iter().zip(w.chunks_exact(F32_NB)) {
            for (sj, &wj) in s.iter_mut().zip(wk) {
                *sj += x * wj;
            }
        }
        for (j, &sj) in s.iter().enumerate().take(cols) {
            let mut v = sj;
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

/// [`super::AttentionSlice`] row by row with plain loops.
///
/// # Safety
/// See [`super::AttentionSlice`].
pub(crate) unsafe fn attention_slice(
    a: Mat,
    b: Mat,
    v: Mat,
    o: Mat,
    (l, d, l2, dv): (usize, usize, usize, usize),
    (scale, out_scale): (f32, f32),
    sc: &mut Scratch,
) {
    sc.s.clear();
    sc.s.resize(l2, 0.0);
    let s = &mut sc.s;
    for i in 0..l {
        s.fill(0.0);
        for kk in 0..d {
            let x = *a.ptr.add(i * a.rs + kk * a.cs) * scale;
            for (j, sj) in s.iter_mut().enumerate() {
                *sj += x * *b.ptr.add(kk * b.rs + j * b.cs);
            }
        }
        let inv = softmax_unnormalised(s) * out_scale;
        for c in 0..dv {
            let mut acc = 0f32;
            for (j, &p) in s.iter().enumerate() {
                acc += p * *v.ptr.add(j * v.rs + c * v.cs);
            }
            *(o.ptr as *mut f32).add(i * o.rs + c * o.cs) = acc * inv;
        }
    }
}

/// [`super::DecoderAttention`] with plain loops.
pub(crate) fn decoder_attention(q: &[f32], d: usize, k: &[f32], v: &[f32], keys: &[usize], mask: &[f32], scale: f32, o: &mut [f32], scores: &mut Vec<f32>) {
    decoder_attention_body::<false>(q, d, k, v, keys, mask, scale, o, scores)
}

/// The body of every [`super::DecoderAttention`]: dot products in 16 lanes, the vectorised
/// softmax, then the weighted sum of the value rows. `FMA`: fused multiply-adds (only where the
/// CPU has them: elsewhere `mul_add` is a library call).
#[inline(always)]
pub(crate) fn decoder_attention_body<const FMA: bool>(
    q: &[f32],
    d: usize,
    k: &[f32],
    v: &[f32],
    keys: &[usize],
    mask: &[f32],
    scale: f32,
    o: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let t = keys.len();
    if d == 0 {
        return;
    }
    let s = q.len() / d;
    assert!(o.len() >= s * d && (mask.is_empty() || mask.len() >= s * t));
    // keys outer, queries inner: each key and value row is read once for all the queries (the
    // beams of one head share the image's cross-attention keys)
    scores.clear();
    scores.resize(s * t + s, 0.0);
    let (sc, inv) = scores.split_at_mut(s * t);
    for (j, &kj) in keys.iter().enumerate() {
        let kr = &k[kj..kj + d];
        for i in 0..s {
            let m = if mask.is_empty() { 0.0 } else { mask[i * t + j] };
            sc[i * t + j] = dot::<FMA>(&q[i * d..(i + 1) * d], kr) * scale + m;
        }
    }
    for i in 0..s {
        inv[i] = softmax_unnormalised(&mut sc[i * t..(i + 1) * t]);
    }
    let o = &mut o[..s * d];
    o.fill(0.0);
    for (j, &kj) in keys.iter().enumerate() {
        let vr = &v[kj..kj + d];
        for (i, oi) in o.chunks_exact_mut(d).enumerate() {
            let p = sc[i * t + j];
            for (x, &y) in oi.iter_mut().zip(vr) {
                *x = if FMA { p.mul_add(y, *x) } else { *x + p * y };
            }
        }
    }
    for (oi, &f) in o.chunks_exact_mut(d).zip(inv.iter()) {
        for x in oi.iter_mut() {
            *x *= f;
        }
    }
}

/// The 16 lanes summed as a tree (halves added lane-wise: vector adds, not 16 dependent
/// scalar ones).
#[inline(always)]
fn hsum16(acc: [f32; 16]) -> f32 {
    let mut h8 = [0f32; 8];
    for l in 0..8 {
        h8[l] = acc[l] + acc[l + 8];
    }
    let mut h4 = [0f32; 4];
    for l in 0..4 {
        h4[l] = h8[l] + h8[l + 4];
    }
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// `a · b` in 16 lanes (a single running sum is one dependent add per element), summed by
/// [`hsum16`].
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = if FMA { x[l].mul_add(y[l], acc[l]) } else { acc[l] + x[l] * y[l] };
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[l] = if FMA { x.mul_add(y, acc[l]) } else { acc[l] + x * y };
    }
    hsum16(acc)
}

/// [`super::W8Block`] in plain Rust.
pub(crate) fn w8_block(a: &[f32], rows: usize, k: usize, w: &[i8], acc: &mut [[f32; W8_NB]]) {
    assert!(rows <= W8_MAX_ROWS && a.len() >= rows * k && w.len() >= k * W8_NB && acc.len() >= rows);
    for (r, out) in acc.iter_mut().enumerate().take(rows) {
        let mut s = [0f32; W8_NB];
        for (&x, wk) in a[r * k..(r + 1) * k].iter().zip(w.chunks_exact(W8_NB)) {
            for j in 0..W8_NB {
                s[j] += x * wk[j] as f32;
            }
        }
        *out = s;
    }
}

/// [`super::Q8Block`] in plain Rust (the bodies of the ISA tables without an 8-bit dot product).
#[inline(always)]
pub(crate) fn q8_block(a: &[i8], rows: usize, kp: usize, w: &[i8], acc: &mut [[i32; Q8_NB]]) {
    assert!(rows <= Q8_MAX_ROWS && kp.is_multiple_of(Q8_KSTEP) && a.len() >= rows * kp && w.len() >= kp * Q8_NB && acc.len() >= rows);
    for (r, out) in acc.iter_mut().enumerate().take(rows) {
        let mut s = [0i32; Q8_NB];
        for (ag, wg) in a[r * kp..(r + 1) * kp].chunks_exact(4).zip(w.chunks_exact(4 * Q8_NB)) {
            for (j, wj) in wg.chunks_exact(4).enumerate() {
                s[j] += ag[0] as i32 * wj[0] as i32 + ag[1] as i32 * wj[1] as i32 + ag[2] as i32 * wj[2] as i32 + ag[3] as i32 * wj[3] as i32;
            }
        }
        *out = s;
    }
}

/// s = exp(s - max s); returns 1 / sum. (In 16 lanes: a single running max or sum is one
/// dependent op per element, which the compiler may not reorder for floats.)
#[inline(always)]
pub(crate) fn softmax_unnormalised(s: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = s.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    for (m, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = m.max(x);
    }
    let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sums = [0f32; 16];
    let mut chunks = s.chunks_exact_mut(16);
    for c in &mut chunks {
        for (a, x) in sums.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x - max);
            *a += *x;
        }
    }
    for (a, x) in sums.iter_mut().zip(chunks.into_remainder()) {
        *x = exp(*x - max);
        *a += *x;
    }
    1.0 / sums.iter().sum::<f32>()
}

/// e^x for x <= 0 (a softmax's shifted scores), within 2 ulp over the range that matters; 0
/// below -87.3 (where e^x leaves the normal floats) and NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.max(-87.3);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    let e = y * scale;
    // (selects, not branches: the softmax loop vectorises)
    let e = if x < -87.3 { 0.0 } else { e };
    if x.is_nan() {
        x
    } else {
        e
    }
}

/// `Σ f(x)` over 16 independent partial sums: a single running sum is one dependent add per
/// element (the compiler may not reorder float adds), 16 of them vectorise.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(v);
    }
    acc.iter().sum()
}

/// [`super::LayerNorm`] (the portable build).
pub(crate) fn layer_norm(x: &[f32], y: &mut [f32], n: usize, inner: usize, scale: &[f32], bias: &[f32], eps: f32) {
    layer_norm_body(x, y, n, inner, scale, bias, eps)
}

/// Rows (inner == 1) are contiguous; otherwise the statistics of the `inner` columns are
/// accumulated side by side, which keeps every loop over contiguous memory.
#[inline(always)]
pub(crate) fn layer_norm_body(x: &[f32], y: &mut [f32], n: usize, inner: usize, scale: &[f32], bias: &[f32], eps: f32) {
    let block = n * inner;
    if block == 0 {
        return;
    }
    if inner == 1 {
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let mean = lane_sum(xr, |v| v) / n as f32;
            let var = lane_sum(xr, |v| (v - mean) * (v - mean)) / n as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(scale).zip(bias) {
                *o = (v - mean) * r * g + b;
            }
        }
        return;
    }
    let mut mean = vec![0f32; inner];
    let mut var = vec![0f32; inner];
    for (xb, yb) in x.chunks_exact(block).zip(y.chunks_exact_mut(block)) {
        mean.iter_mut().for_each(|m| *m = 0.0);
        var.iter_mut().for_each(|m| *m = 0.0);
        for row in xb.chunks_exact(inner) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f32);
        for row in xb.chunks_exact(inner) {
            for ((s, &v), &m) in var.iter_mut().zip(row).zip(&mean) {
                *s += (v - m) * (v - m);
            }
        }
        var.iter_mut().for_each(|s| *s = 1.0 / (*s / n as f32 + eps).sqrt());
        for (i, (row, out)) in xb.chunks_exact(inner).zip(yb.chunks_exact_mut(inner)).enumerate() {
            let (g, b) = (scale[i], bias[i]);
            for (((o, &v), &m), &r) in out.iter_mut().zip(row).zip(&mean).zip(&var) {
                *o = (v - m) * r * g + b;
            }
        }
    }
}

/// round half to even for |x| <= 2^22 (the input is clamped to the int8 range first):
/// adding and removing 1.5 * 2^23 leaves the nearest integer in f32's mantissa, branch-free
/// and vectorisable on baseline x86-64 (no SSE4.1 `roundps` needed).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// [`super::QuantizeI8`] (the portable build).
pub(crate) fn quantize_i8(xs: &[f32], ys: &mut [i8], inv_scale: f32, zero_point: i8) {
    quantize_i8_body(xs, ys, inv_scale, zero_point)
}

#[inline(always)]
pub(crate) fn quantize_i8_body(xs: &[f32], ys: &mut [i8], inv_scale: f32, zero_point: i8) {
    let lo = -128.0 - zero_point as f32;
    let hi = 127.0 - zero_point as f32;
    for (y, &x) in ys.iter_mut().zip(xs) {
        // max/min map NaN to the low bound, so the cast below always sees a value in range
        let v = (x * inv_scale).max(lo).min(hi);
        let r = (v + ROUND_MAGIC) - ROUND_MAGIC;
        // SAFETY: r is finite and in [-128 - z, 127 - z], an integral value
        *y = (unsafe { r.to_int_unchecked::<i32>() } + zero_point as i32) as i8;
    }
}
