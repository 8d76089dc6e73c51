//! Attention products of the image encoder in one op: `MatMul(q, kᵀ) -> Softmax(last axis) ->
//! MatMul(·, v)`, the core of every `nn.MultiheadAttention` that open_clip's export writes.
//!
//! With [`super::f32mm`] running the weight products, these three ops were the largest part of
//! the B/32 encoder left to tract (about 8 ms of 57 at 2 threads, BENCHMARKS.md): per head a
//! 50 x 64 x 50 product, packed for tract's kernels each time, a softmax, a second product; none
//! of it split over the threads. [`fuse_attention`] rewrites each such chain (each intermediate
//! read only by the next op) into one `CocaAttention(q, kᵀ, v)` node; [`Attention`] computes each
//! (batch, head) slice row by row in registers and L1 (scores, a vectorised exp, the weighted sum
//! of v), with the slices split over the executor's threads.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{ModelProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

/// The op name our rewrite gives fused nodes (never in a graph on disk).
pub const FUSED_OP: &str = "CocaAttention";

/// Rewrite every `MatMul(a, b) -> Softmax(axis -1) -> MatMul(·, v)` chain of the top-level graph
/// whose intermediates have no other reader into one `CocaAttention(a, b, v)` node. Returns how
/// many were fused.
pub fn fuse_attention(proto: &mut ModelProto) -> usize {
    use std::collections::{HashMap, HashSet};
    let Some(graph) = proto.graph.as_mut() else { return 0 };
    let std_domain = |n: &NodeProto| n.domain.is_empty() || n.domain == "ai.onnx";
    // the op computes in f32: leave graphs with other float types inside (an f16 variant with
    // f32 inputs and outputs casts its activations to f16)
    const OTHER_FLOATS: [i32; 3] = [10, 11, 16]; // float16, double, bfloat16
    let other_float = graph.initializer.iter().any(|t| OTHER_FLOATS.contains(&t.data_type))
        || graph.node.iter().any(|n| n.op_type == "Cast" && n.attribute.iter().any(|a| a.name == "to" && OTHER_FLOATS.contains(&(a.i as i32))));
    if other_float {
        return 0;
    }
    let opset = proto.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version).unwrap_or(0);
    let mut reads: HashMap<String, usize> = HashMap::new();
    super::w8::count_reads(graph, &mut reads);
    for o in graph.output.iter().chain(graph.input.iter()) {
        *reads.entry(o.name.clone()).or_default() += 1;
    }
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut reader: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            reader.insert(inp.as_str(), i);
        }
    }
    let single = |name: &str| reads.get(name) == Some(&1);
    // (first MatMul, Softmax, second MatMul)
    let mut chains: Vec<(usize, usize, usize)> = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        let is_mm = |n: &NodeProto| n.op_type == "MatMul" && std_domain(n) && n.input.len() == 2 && n.output.len() == 1;
        if !is_mm(n) || n.input.iter().any(|x| inits.contains(x.as_str())) || !single(&n.output[0]) {
            continue;
        }
        let Some(&j) = reader.get(n.output[0].as_str()) else { continue };
        let s = &graph.node[j];
        // the last axis: written as -1 (from opset 13 the default; before, the default is 1)
        let axis = s.attribute.iter().find(|a| a.name == "axis").map(|a| a.i).unwrap_or(if opset >= 13 { -1 } else { 1 });
        if s.op_type != "Softmax" || !std_domain(s) || s.input.len() != 1 || s.output.len() != 1 || axis != -1 || !single(&s.output[0]) {
            continue;
        }
        let Some(&k) = reader.get(s.output[0].as_str()) else { continue };
        let m = &graph.node[k];
        if !is_mm(m) || m.input[0] != s.output[0] || m.input[1] == s.output[0] || inits.contains(m.input[1].as_str()) {
            continue;
        }
        chains.push((i, j, k));
    }
    let mut drop: HashSet<usize> = HashSet::new();
    for &(i, j, k) in &chains {
        let v = graph.node[k].input[1].clone();
        let out = graph.node[k].output[0].clone();
        let n = &mut graph.node[i];
        n.op_type = FUSED_OP.to_string();
        n.domain = String::new();
        n.input.push(v);
        n.output = vec![out];
        n.attribute.clear();
        drop.insert(j);
        drop.insert(k);
    }
    let mut ix = 0;
    graph.node.retain(|_| {
        let keep = !drop.contains(&ix);
        ix += 1;
        keep
    });
    chains.len()
}

pub fn parse(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    ensure!(node.input.len() == 3, "{FUSED_OP} takes three inputs");
    Ok((expand(Attention), vec![]))
}

/// `softmax(a b, last axis) v` for `a [.., l, d]`, `b [.., d, l2]`, `v [.., l2, dv]` with the
/// same leading dims.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attention;

impl Expansion for Attention {
    fn name(&self) -> StaticName {
        "Attention".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        for input in inputs {
            s.equals(&input.datum_type, f32::datum_type())?;
            s.equals(&input.rank, &outputs[0].rank)?;
        }
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            ensure!(rank >= 2, "Attention of rank {rank}");
            for ax in 0..rank - 2 {
                s.equals(&inputs[0].shape[ax], &outputs[0].shape[ax])?;
                s.equals(&inputs[1].shape[ax], &outputs[0].shape[ax])?;
                s.equals(&inputs[2].shape[ax], &outputs[0].shape[ax])?;
            }
            s.equals(&inputs[0].shape[rank - 2], &outputs[0].shape[rank - 2])?;
            s.equals(&inputs[0].shape[rank - 1], &inputs[1].shape[rank - 2])?;
            s.equals(&inputs[1].shape[rank - 1], &inputs[2].shape[rank - 2])?;
            s.equals(&inputs[2].shape[rank - 1], &outputs[0].shape[rank - 1])?;
            Ok(())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        "Attention".into()
    }

    op_as_typed_op!();
}

/// The dims of one evaluation: `bh` slices of `l x d` by `d x l2`, then by `l2 x dv`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    bh: usize,
    l: usize,
    d: usize,
    l2: usize,
    dv: usize,
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b, v) = (&inputs[0], &inputs[1], &inputs[2]);
        let r = a.rank();
        ensure!(r >= 2 && b.rank() == r && v.rank() == r, "Attention: ranks {:?} {:?} {:?}", a.shape(), b.shape(), v.shape());
        let lead = &a.shape()[..r - 2];
        ensure!(
            &b.shape()[..r - 2] == lead && &v.shape()[..r - 2] == lead && b.shape()[r - 2] == a.shape()[r - 1] && v.shape()[r - 2] == b.shape()[r - 1],
            "Attention: shapes {:?} {:?} {:?}",
            a.shape(),
            b.shape(),
            v.shape()
        );
        let dims = Dims { bh: lead.iter().product(), l: a.shape()[r - 2], d: a.shape()[r - 1], l2: b.shape()[r - 1], dv: v.shape()[r - 1] };
        let mut out_shape: TVec<usize> = a.shape().into();
        out_shape[r - 1] = dims.dv;
        let (xa, xb, xv) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?, v.try_as_plain_ram()?);
        let (sa, sb, sv) = (xa.as_slice::<f32>()?, xb.as_slice::<f32>()?, xv.as_slice::<f32>()?);
        let mut y = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys = view.as_slice_mut::<f32>()?;
            super::product::with_executor_pool(|pool| attention(sa, sb, sv, ys, dims, pool));
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (a, v) = (inputs[0], inputs[2]);
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()), "Attention takes f32");
        ensure!(a.rank() >= 2 && v.rank() == a.rank(), "Attention: ranks {} and {}", a.rank(), v.rank());
        let mut shape: TVec<TDim> = a.shape.iter().cloned().collect();
        let r = shape.len();
        shape[r - 1] = v.shape[r - 1].clone();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Every slice; slices split over `pool`'s threads when there are several.
fn attention(a: &[f32], b: &[f32], v: &[f32], out: &mut [f32], dims: Dims, pool: Option<&rayon::ThreadPool>) {
    let Dims { bh, l, d, l2, dv } = dims;
    assert!(a.len() == bh * l * d && b.len() == bh * d * l2 && v.len() == bh * l2 * dv && out.len() == bh * l * dv);
    if bh == 0 || l == 0 || dv == 0 {
        return;
    }
    let threads = pool.map(|p| p.current_num_threads()).unwrap_or(1).min(bh);
    // (the work of one slice is l x l2 x (d + dv) multiply-adds: tens of microseconds for a ViT)
    if threads > 1 && bh * l * l2 * (d + dv) >= 1 << 18 {
        let pool = pool.expect("threads > 1");
        let per = bh.div_ceil(threads);
        pool.scope(|s| {
            for (t, chunk) in out.chunks_mut(per * l * dv).enumerate() {
                let first = t * per;
                s.spawn(move |_| slices(a, b, v, chunk, dims, first));
            }
        });
    } else {
        slices(a, b, v, out, dims, 0);
    }
}

/// Slices `first..` into `out` (whole slices).
fn slices(a: &[f32], b: &[f32], v: &[f32], out: &mut [f32], dims: Dims, first: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F
        unsafe { x86::slices(a, b, v, out, dims, first) };
        return;
    }
    slices_impl(a, b, v, out, dims, first)
}

/// Row by row: scores (l2) = a row times b, softmax, then the scores' weighted sum of v's rows.
/// Loops over contiguous rows, written for the compiler to vectorise (the path of CPUs without
/// AVX-512F, where the rewrite is not made: tests only).
#[inline(always)]
fn slices_impl(a: &[f32], b: &[f32], v: &[f32], out: &mut [f32], dims: Dims, first: usize) {
    let Dims { l, d, l2, dv, .. } = dims;
    let mut s = vec![0f32; l2];
    for (i, o_slice) in out.chunks_exact_mut(l * dv).enumerate() {
        let h = first + i;
        let (ah, bh, vh) = (&a[h * l * d..(h + 1) * l * d], &b[h * d * l2..(h + 1) * d * l2], &v[h * l2 * dv..(h + 1) * l2 * dv]);
        for (row, o) in ah.chunks_exact(d).zip(o_slice.chunks_exact_mut(dv)) {
            s.fill(0.0);
            for (&x, brow) in row.iter().zip(bh.chunks_exact(l2)) {
                for (sj, &bj) in s.iter_mut().zip(brow) {
                    *sj = x.mul_add(bj, *sj);
                }
            }
            let inv = softmax_unnormalised(&mut s);
            o.fill(0.0);
            for (&p, vrow) in s.iter().zip(vh.chunks_exact(dv)) {
                for (oj, &vj) in o.iter_mut().zip(vrow) {
                    *oj = p.mul_add(vj, *oj);
                }
            }
            for oj in o.iter_mut() {
                *oj *= inv;
            }
        }
    }
}

/// s = exp(s - max s); returns 1 / sum.
#[inline(always)]
fn softmax_unnormalised(s: &mut [f32]) -> f32 {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for sj in s.iter_mut() {
        *sj = exp(*sj - max);
        sum += *sj;
    }
    1.0 / sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{softmax_unnormalised, Dims};
    use std::arch::x86_64::*;

    /// Rows of a product computed together.
    const MR: usize = 4;
    /// Columns of a product computed together (four registers).
    const NC: usize = 64;

    /// Each slice: scores = a b (l x l2), softmax rows, out = scores v, rows scaled by 1/sum.
    /// SAFETY: AVX-512F; the slices have the sizes of `dims` (asserted by the caller).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn slices(a: &[f32], b: &[f32], v: &[f32], out: &mut [f32], dims: Dims, first: usize) {
        let Dims { l, d, l2, dv, .. } = dims;
        let mut s = vec![0f32; l * l2];
        let mut inv = vec![0f32; l];
        for (i, o) in out.chunks_exact_mut(l * dv).enumerate() {
            let h = first + i;
            let (ah, bh, vh) = (a.as_ptr().add(h * l * d), b.as_ptr().add(h * d * l2), v.as_ptr().add(h * l2 * dv));
            product(ah, d, bh, l2, s.as_mut_ptr(), l2, l, d, l2, None);
            for (row, inv) in s.chunks_exact_mut(l2).zip(inv.iter_mut()) {
                *inv = softmax_unnormalised(row);
            }
            product(s.as_ptr(), l2, vh, dv, o.as_mut_ptr(), dv, l, l2, dv, Some(&inv));
        }
    }

    /// c (rows x cols, row stride ldc) = x (rows x k, stride ldx) times y (k x cols, stride
    /// ldy), each row of c times `scale[row]` when given.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn product(x: *const f32, ldx: usize, y: *const f32, ldy: usize, c: *mut f32, ldc: usize, rows: usize, k: usize, cols: usize, scale: Option<&[f32]>) {
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
    unsafe fn block<const R: usize>(x: *const f32, ldx: usize, y: *const f32, ldy: usize, c: *mut f32, ldc: usize, k: usize, w: usize, scale: Option<*const f32>) {
        let m = [mask(w, 0), mask(w, 1), mask(w, 2), mask(w, 3)];
        let chunks = w.div_ceil(16);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if chunks == 4 {
            for kk in 0..k {
                let yr = y.add(kk * ldy);
                let yv = [
                    _mm512_loadu_ps(yr),
                    _mm512_loadu_ps(yr.add(16)),
                    _mm512_loadu_ps(yr.add(32)),
                    _mm512_maskz_loadu_ps(m[3], yr.add(48)),
                ];
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

/// e^x for x <= 0 (a softmax's shifted scores), within 2 ulp over the range that matters; 0
/// below -87.3 (where e^x leaves the normal floats) and NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
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
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0037;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    fn reference(a: &[f32], b: &[f32], v: &[f32], dims: Dims) -> Vec<f32> {
        let Dims { bh, l, d, l2, dv } = dims;
        let mut out = vec![0f32; bh * l * dv];
        for h in 0..bh {
            for i in 0..l {
                let s: Vec<f64> = (0..l2).map(|j| (0..d).map(|k| a[(h * l + i) * d + k] as f64 * b[(h * d + k) * l2 + j] as f64).sum()).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..dv {
                    out[(h * l + i) * dv + c] = (0..l2).map(|j| e[j] / sum * v[(h * l2 + j) * dv + c] as f64).sum::<f64>() as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_softmax_attention_for_odd_sizes_and_threads() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for dims in [
            Dims { bh: 1, l: 1, d: 1, l2: 1, dv: 1 },
            Dims { bh: 3, l: 5, d: 7, l2: 9, dv: 4 },
            Dims { bh: 12, l: 50, d: 64, l2: 50, dv: 64 },
            Dims { bh: 8, l: 256, d: 64, l2: 50, dv: 64 },
            Dims { bh: 5, l: 17, d: 33, l2: 65, dv: 19 },
        ] {
            let f = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 30.0).collect() };
            let (a, b, v) = (f(dims.bh * dims.l * dims.d, 1), f(dims.bh * dims.d * dims.l2, 2), f(dims.bh * dims.l2 * dims.dv, 3));
            let want = reference(&a, &b, &v, dims);
            let check = |got: &[f32], what: &str| {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} {dims:?} at {i}: {g} vs {w}");
                }
            };
            for pool in [None, Some(&pool)] {
                let mut got = vec![f32::NAN; want.len()];
                attention(&a, &b, &v, &mut got, dims, pool);
                check(&got, "dispatched");
            }
            // the portable loops too, whatever this CPU has
            let mut got = vec![f32::NAN; want.len()];
            slices_impl(&a, &b, &v, &mut got, dims, 0);
            check(&got, "portable");
        }
    }

    /// q k^T -> softmax -> v as open_clip's export writes it (a scale Mul on each side, k
    /// transposed), next to a chain the rewrite must leave alone (the scores are also an output),
    /// runs the same with and without the rewrite.
    #[test]
    fn fused_graph_computes_what_the_onnx_graph_does() {
        use super::super::test_proto::{model, node, value_info as vi};
        use prost::Message;
        use tract_onnx::pb;
        if !super::super::f32mm::supported() {
            eprintln!("skipped: this CPU has no AVX-512F (the rewrite is not made)");
            return;
        }
        let ints = |name: &str, v: &[i64]| pb::AttributeProto { name: name.into(), r#type: 7, ints: v.to_vec(), ..Default::default() };
        let int = |name: &str, i: i64| pb::AttributeProto { name: name.into(), r#type: 2, i, ..Default::default() };
        let scale = super::super::test_proto::tensor("scale", &[], &[0.35]);
        let (b, h, l, d) = (1i64, 3i64, 7i64, 8i64);
        let graph = pb::GraphProto {
            name: "g".into(),
            node: vec![
                node("Mul", &["q", "scale"], "qs", vec![]),
                node("Transpose", &["k"], "kt", vec![ints("perm", &[0, 1, 3, 2])]),
                node("Mul", &["kt", "scale"], "kts", vec![]),
                node("MatMul", &["qs", "kts"], "s", vec![]),
                node("Softmax", &["s"], "p", vec![int("axis", -1)]),
                node("MatMul", &["p", "v"], "y", vec![]),
                node("MatMul", &["q", "kt"], "s2", vec![]),
                node("Softmax", &["s2"], "p2", vec![int("axis", -1)]),
                node("MatMul", &["p2", "v"], "y2", vec![]),
            ],
            initializer: vec![scale],
            input: vec![vi("q", &[b, h, l, d]), vi("k", &[b, h, l, d]), vi("v", &[b, h, l, d])],
            output: vec![vi("y", &[b, h, l, d]), vi("y2", &[b, h, l, d]), vi("s2", &[b, h, l, l])],
            ..Default::default()
        };
        let model = model(graph);
        let mut proto = model.clone();
        assert_eq!(fuse_attention(&mut proto), 1, "the chain whose scores are an output stays");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, model.encode_to_vec()).unwrap();
        let n = (b * h * l * d) as usize;
        let input = |seed: usize| -> TValue {
            let v: Vec<f32> = (0..n).map(|i| (((i * 29 + seed * 13) % 83) as f32 - 41.0) / 20.0).collect();
            tract_ndarray::Array4::from_shape_vec((b as usize, h as usize, l as usize, d as usize), v).unwrap().into_tensor().into()
        };
        let run = |ours: bool| -> Vec<Vec<f32>> {
            let typed = super::super::load_onnx_with(&path, ours).unwrap().into_typed().unwrap();
            assert_eq!(typed.nodes().iter().filter(|n| n.op.name() == "Attention").count(), usize::from(ours));
            let plan = typed.into_optimized().unwrap().into_runnable().unwrap();
            let out = plan.run(tvec!(input(1), input(2), input(3))).unwrap();
            out.iter().map(|t| t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()).collect()
        };
        let (ours, theirs) = (run(true), run(false));
        for (o, (x, y)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(x.len(), y.len());
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "output {o} value {i}: {p} vs {q}");
            }
        }
    }
}
