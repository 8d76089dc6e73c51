//! Compute kernels: plain slices and pointers in, numbers out; no tract types, no I/O.
//!
//! Each kernel has a portable form ([`portable`]) and, where it pays, one per instruction set:
//! [`x86_64`] (AVX-512F, AVX2 + FMA) and [`aarch64`] (NEON). At the first call, [`kernels`]
//! detects what the CPU has and picks one [`Kernels`] table for the life of the process; the rest
//! of the code calls kernels only through that table. [`candidates`] lists every table this build
//! knows, each either usable here or refused with the reason, so the shared test suite
//! (`tests.rs`) runs every kernel the CPU has against a portable f64 reference and reports the
//! others as skipped.
//!
//! Adding an ISA: write its kernels in a submodule with the signatures below, give it a table
//! constructor that checks the CPU features it needs (and refuses with the missing one), and list
//! it in [`candidates`] before the ones it beats. The model's ops (`src/model/`) need no change.

// SIMD kernels index several arrays in lockstep (accumulators by row, lanes by column), and
// their signatures are the table's (pointers, strides and sizes), not a design choice per kernel.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

pub(crate) mod parallel;
pub(crate) mod portable;

#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

pub(crate) use parallel::SendPtr;

/// Columns per packed block of f32 weights ([`F32Block`]).
pub(crate) const F32_NB: usize = 32;
/// Columns per packed block of int8 weights ([`W8Block`]).
pub(crate) const W8_NB: usize = 16;
/// Most rows an int8-weight kernel computes together (each weight block is read once per group).
pub(crate) const W8_MAX_ROWS: usize = 6;
/// Columns per packed block of the int8 x int8 product ([`Q8Block`]).
pub(crate) const Q8_NB: usize = 16;
/// k of a [`Q8Block`]'s operands is padded to a multiple of this (zeros in the weights).
pub(crate) const Q8_KSTEP: usize = 16;
/// Most rows a [`Q8Block`] computes together.
pub(crate) const Q8_MAX_ROWS: usize = 5;

/// `out[r, 0..cols] = bias + Σ_kk a[r, kk] · w[kk, 0..cols] (+ res[r, 0..cols])` for `rows` rows of
/// `a` (row stride k) and one packed block `w` (k x [`F32_NB`]); `out` and `res` have row stride
/// `ldo`.
///
/// SAFETY: `rows` is 1..=[`Kernels::f32_rows`]; `a` has rows x k values, `w` k x 32, `out` rows
/// rows of `cols` <= 32 writable values, `bias` null or 32 values, `res` null or rows rows of
/// `cols` values.
pub(crate) type F32Block =
    unsafe fn(rows: usize, a: *const f32, k: usize, w: *const f32, out: *mut f32, ldo: usize, cols: usize, bias: *const f32, res: *const f32);

/// One attention slice: `o = softmax(a b · scale) v · out_scale` with `a` l x d, `b` d x l2, `v`
/// l2 x dv, each a strided [`Mat`]; `dims` = (l, d, l2, dv), `scales` = (scale, out_scale).
///
/// SAFETY: the matrices address valid elements of their dims, `o` writable and not aliased.
pub(crate) type AttentionSlice = unsafe fn(a: Mat, b: Mat, v: Mat, o: Mat, dims: (usize, usize, usize, usize), scales: (f32, f32), scratch: &mut Scratch);

/// Attention of one sequence and one head of a decoder step, over keys and values kept as rows
/// of `d` values (a KV cache, or an image's cross-attention keys): for each query row `i` of
/// `q` (rows of `d`), `scores_j = scale · q_i·k_j + mask[i·t + j]` (no mask when `mask` is
/// empty) over the `t = keys.len()` keys, key `j` being `k[keys[j]..][..d]` and value `j`
/// `v[keys[j]..][..d]`; then `o[i·d..][..d] = softmax(scores) · values`. `scores` is scratch.
pub(crate) type DecoderAttention =
    fn(q: &[f32], d: usize, k: &[f32], v: &[f32], keys: &[usize], mask: &[f32], scale: f32, o: &mut [f32], scores: &mut Vec<f32>);

/// `acc[r] = Σ_kk a[r, kk] · w[kk, 0..16]` for `rows` (1..=[`W8_MAX_ROWS`]) rows of `a` (row
/// stride k) and one packed int8 block `w` (k x [`W8_NB`]); the per-column scale is applied by
/// the caller.
pub(crate) type W8Block = fn(a: &[f32], rows: usize, k: usize, w: &[i8], acc: &mut [[f32; W8_NB]]);

/// `acc[r][j] = Σ_kk a[r, kk] · w[kk, j]`, exact in i32, for `rows` (1..=[`Q8_MAX_ROWS`]) rows
/// of int8 `a` (row stride `kp`, a multiple of [`Q8_KSTEP`]) and one packed block `w` of
/// [`Q8_NB`] columns in groups of four k: byte `(g·16 + j)·4 + t` is `w[4g + t, j]` (the operand
/// order of an 8-bit dot product instruction: four k of one column in one 32-bit lane).
pub(crate) type Q8Block = fn(a: &[i8], rows: usize, kp: usize, w: &[i8], acc: &mut [[i32; Q8_NB]]);

/// Normalise `x` viewed as [outer, n, inner] along n into `y`, then `· scale[i] + bias[i]`.
pub(crate) type LayerNorm = fn(x: &[f32], y: &mut [f32], n: usize, inner: usize, scale: &[f32], bias: &[f32], eps: f32);

/// `ys = saturate_i8(round_half_even(xs · inv_scale) + zero_point)`; NaN maps to -128.
pub(crate) type QuantizeI8 = fn(xs: &[f32], ys: &mut [i8], inv_scale: f32, zero_point: i8);

/// One matrix operand of an attention slice: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// Per-thread buffers of an attention slice: operands copied where their rows are not
/// contiguous, scores, row sums. (The portable loops use only the scores.)
#[derive(Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Scratch {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub v: Vec<f32>,
    pub o: Vec<f32>,
    pub s: Vec<f32>,
    pub inv: Vec<f32>,
    pub scale: Vec<f32>,
}

/// One set of kernels, all for one instruction set (some entries may be the portable form where
/// the ISA has nothing better).
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    /// e.g. "x86_64 avx512f", "aarch64 neon", "portable"
    pub name: &'static str,
    pub f32_block: F32Block,
    /// most rows [`Kernels::f32_block`] takes at once (rows are cut into even tiles of at most this)
    pub f32_rows: usize,
    pub attention: AttentionSlice,
    pub decoder_attention: DecoderAttention,
    pub w8_block: W8Block,
    pub q8_block: Q8Block,
    pub layer_norm: LayerNorm,
    pub quantize_i8: QuantizeI8,
    /// the f32 products and attention of this table were measured faster than tract's own
    /// kernels on this ISA, so the model's f32 rewrites are made (elsewhere tract runs them)
    pub fuse_f32: bool,
    /// this table's `q8_block` was counted executing fewer instructions than tract's int8
    /// kernels on statically quantised products (sym-mmi), so those run through it too
    pub fuse_q8_static: bool,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("name", &self.name)
            .field("f32_rows", &self.f32_rows)
            .field("fuse_f32", &self.fuse_f32)
            .field("fuse_q8_static", &self.fuse_q8_static)
            .finish()
    }
}

/// Every table this build has, best first: `Ok` where this CPU runs it, else the reason it
/// cannot.
pub(crate) fn candidates() -> Vec<(&'static str, Result<Kernels, String>)> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        v.push(("x86_64 avx512f", x86_64::avx512()));
        v.push(("x86_64 avx2+fma", x86_64::avx2()));
    }
    #[cfg(target_arch = "aarch64")]
    {
        v.push(("aarch64 neon+dotprod", aarch64::dotprod()));
        v.push(("aarch64 neon", aarch64::neon()));
    }
    v.push(("portable", Ok(portable::table())));
    v
}

/// The kernels of this CPU, chosen once (the first usable of [`candidates`]).
pub(crate) fn kernels() -> &'static Kernels {
    static CHOSEN: OnceLock<Kernels> = OnceLock::new();
    CHOSEN.get_or_init(|| {
        let k = candidates().into_iter().find_map(|(_, k)| k.ok()).unwrap_or_else(portable::table);
        log::debug!("kernels: {} (our f32 products and attention: {})", k.name, if k.fuse_f32 { "yes" } else { "no, tract's" });
        k
    })
}

/// The name of the kernel table this process uses (for `coca info` and logs).
pub fn kernel_set() -> &'static str {
    kernels().name
}

/// Probabilities of `z` (max subtracted first; the sum runs in order, so results are
/// bit-identical to the three loops this replaced in classify, head and caption).
pub fn softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// GELU (`x/2 · (1 + erf(x/√2))`) in place, in chunks, with `erf` applied in place to each
/// chunk of scaled values (the model passes tract-linalg's vectorised erf).
pub(crate) fn gelu<E>(xs: &mut [f32], erf: &mut dyn FnMut(&mut [f32]) -> Result<(), E>) -> Result<(), E> {
    const CHUNK: usize = 1024;
    let c = std::f32::consts::FRAC_1_SQRT_2;
    let mut scaled = [0f32; CHUNK];
    for chunk in xs.chunks_mut(CHUNK) {
        let e = &mut scaled[..chunk.len()];
        for (s, &x) in e.iter_mut().zip(chunk.iter()) {
            *s = x * c;
        }
        erf(e)?;
        for (x, &e) in chunk.iter_mut().zip(e.iter()) {
            *x = (*x * 0.5) * (e + 1.0);
        }
    }
    Ok(())
}
