//! Products with int8 weights and activations quantised at run time (`models/export/quantize.py`,
//! design "dyn-q8"), for the decoder step on CPUs with an 8-bit dot product. The graphs stay
//! standard ONNX, onnxruntime's own dynamic-quantisation form:
//!
//! ```text
//! x -> DynamicQuantizeLinear -> (q u8, s_x, z_x)
//!   -> MatMulInteger(q, W8, z_x) -> Cast(f32) -> Mul(s_x) -> Mul(s_w [n]) -> y
//! ```
//!
//! Before parsing, [`fuse_int8_products`] rewrites each such chain in the protobuf into one
//! `CocaMatMulQ8(x)` node, which the `MatMulQ8` op ([`WeightProduct`] of [`PackedQ8`]) runs:
//! the activation tensor quantised once per call exactly as the operator defines it (range over
//! the whole tensor and 0, `round_half_even(x / s_x) + z_x` saturated to u8), the weights kept in
//! int8 in column blocks of 16 with four k per 32-bit lane, the integer product exact in i32
//! (`sdot` where the CPU has it, `kernels::Kernels::q8_block`), then the two scales applied
//! in the graph's order. Every step is exact or one correctly rounded f32 operation in the
//! graph's order, so the result is onnxruntime's to the rounding of its f32 operations, on every
//! ISA alike.
//!
//! The same op runs the image encoder's statically quantised products (quantize.py's sym-mmi:
//! `QuantizeLinear(x, s, 0) -> MatMulInteger(q, W8, 0, 0) -> Cast -> Mul(s · s_w)`) where the
//! kernel table says its `q8_block` executes fewer instructions than tract's int8 kernels
//! (`Kernels::fuse_q8_static`, set from the exact ARM counts of `boards/cross/armcount.sh`): x
//! is quantised by the table's `quantize_i8`, exactly as our `QuantizeLinear` op does, and the
//! integer product and the one scale follow the graph's order.
//!
//! The u8 activation is stored shifted to i8 (`q - 128`) for a signed dot product; the shift
//! and the zero point come back as `(128 - z_x) · Σ_k W[k, j]`, with the column sums computed
//! at pack time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, ModelProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

use super::product::{WeightProduct, Weights};
use super::w8::{count_reads, names_read};
use crate::kernels::{self, parallel, SendPtr, Q8_KSTEP, Q8_MAX_ROWS, Q8_NB};

/// The op name our rewrite gives fused nodes (never in a graph on disk).
pub const FUSED_OP: &str = "CocaMatMulQ8";

const ONNX_FLOAT: i32 = 1;
const ONNX_INT8: i32 = 3;

thread_local! {
    /// Packed weights of the fused nodes of the graph this thread is parsing (see [`Fused`]).
    static PACKED: std::cell::RefCell<HashMap<String, Arc<PackedQ8>>> = Default::default();
}

/// What [`fuse_int8_products`] did; the packed weights stay available to [`parse`] on this
/// thread while the value lives.
pub struct Fused {
    /// Products fused.
    pub products: usize,
}

impl Drop for Fused {
    fn drop(&mut self) {
        PACKED.with_borrow_mut(|t| t.clear());
    }
}

fn standard(n: &NodeProto, op: &str) -> bool {
    n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx")
}

fn inline(t: &pb::TensorProto) -> bool {
    t.data_location != Some(1) && t.external_data.is_empty()
}

fn floats(t: &pb::TensorProto) -> Vec<f32> {
    if !t.raw_data.is_empty() {
        t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    } else {
        t.float_data.clone()
    }
}

/// The int8 weights `[k, n]` of a MatMulInteger and its per-column (or single) f32 scale.
fn decode(w: &pb::TensorProto, s: &pb::TensorProto) -> Option<PackedQ8> {
    if w.data_type != ONNX_INT8 || w.dims.len() != 2 || s.data_type != ONNX_FLOAT || !inline(w) || !inline(s) {
        return None;
    }
    let (k, n) = (usize::try_from(w.dims[0]).ok()?, usize::try_from(w.dims[1]).ok()?);
    let widened: Vec<i8>;
    let values: &[i8] = if !w.raw_data.is_empty() {
        // SAFETY: u8 and i8 have the same size and alignment
        unsafe { std::slice::from_raw_parts(w.raw_data.as_ptr() as *const i8, w.raw_data.len()) }
    } else {
        widened = w.int32_data.iter().map(|&v| v as i8).collect();
        &widened
    };
    let scale = floats(s);
    let numel: i64 = s.dims.iter().product();
    let shape_ok = numel == 1 || s.dims.len() == 1 && s.dims[0] == w.dims[1];
    let ok = k > 0 && k.checked_mul(n) == Some(values.len()) && shape_ok && (scale.len() == 1 || scale.len() == n) && scale.iter().all(|v| v.is_finite());
    ok.then(|| PackedQ8::new(values, k, n, &scale))
}

/// Rewrite every `DynamicQuantizeLinear(x) -> MatMulInteger(q, W, z) -> Cast(float) -> Mul(s_x)
/// -> Mul(s_w)` chain whose W is a 2-D inline int8 initializer with no (or a zero) zero point and
/// s_w a per-column or per-tensor f32 initializer, each intermediate read by the next node only,
/// into one `CocaMatMulQ8(x)` node. With `statics`, also every `QuantizeLinear(x, s, 0) ->
/// MatMulInteger(q, W, 0, 0) -> Cast(float) -> Mul(c)` chain (models/export/quantize.py's
/// sym-mmi: one constant scale s, int8 zero points 0, c per column or per tensor). The weights
/// are packed here; the chain's nodes, and a quantizing node once no product reads it, leave
/// the protobuf. Only the top-level graph is rewritten; the returned [`Fused`] must live until
/// the protobuf is parsed, on this thread.
pub fn fuse_int8_products(proto: &mut ModelProto, statics: bool) -> Fused {
    let Some(graph) = proto.graph.as_mut() else { return Fused { products: 0 } };
    let mut reads: HashMap<String, usize> = HashMap::new();
    count_reads(graph, &mut reads);
    for o in graph.output.iter() {
        *reads.entry(o.name.clone()).or_default() += 1;
    }
    let read_once = |name: &str| reads.get(name) == Some(&1);
    // the node that reads each name (where a single one does)
    let mut reader: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for x in n.input.iter().filter(|x| !x.is_empty()) {
            reader.insert(x.as_str(), i);
        }
    }
    let producer: HashMap<&str, (usize, usize)> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().enumerate().map(move |(o, name)| (name.as_str(), (i, o)))).collect();
    let inits: HashMap<&str, &pb::TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let is_zero_i8 = |z: &pb::TensorProto| z.data_type == ONNX_INT8 && inline(z) && z.raw_data.iter().all(|&b| b == 0) && z.int32_data.iter().all(|&v| v == 0);
    let zero_i8 = |name: Option<&String>| match name.filter(|z| !z.is_empty()) {
        None => true,
        Some(z) => inits.get(z.as_str()).is_some_and(|z| is_zero_i8(z)),
    };
    // QuantizeLinear's one constant scale s (as 1 / s, the factor our quantizer applies), where
    // its zero point is an int8 0 (an absent one would make the output u8)
    let static_scale = |qn: &NodeProto| -> Option<f32> {
        if qn.input.len() != 3 || qn.output.len() != 1 || qn.attribute.iter().any(|a| a.name == "block_size" && a.i != 0) {
            return None;
        }
        let (s, z) = (inits.get(qn.input[1].as_str())?, inits.get(qn.input[2].as_str())?);
        let one = |t: &pb::TensorProto| t.dims.iter().product::<i64>() == 1;
        if !is_zero_i8(z) || !one(z) || s.data_type != ONNX_FLOAT || !inline(s) || !one(s) {
            return None;
        }
        super::ops::inverse_scale(*floats(s).first()?)
    };
    let other = |m: &NodeProto, mine: &str| -> Option<String> {
        (standard(m, "Mul") && m.input.len() == 2 && m.output.len() == 1).then(|| if m.input[0] == mine { m.input[1].clone() } else { m.input[0].clone() })
    };
    // (the chain's nodes before the last, the last (a Mul), weight name, scale name, x, activations)
    let mut plans: Vec<(Vec<usize>, usize, String, String, String, Activations)> = Vec::new();
    for (mi, n) in graph.node.iter().enumerate() {
        if !standard(n, "MatMulInteger") || n.input.len() < 3 || n.output.len() != 1 || !zero_i8(n.input.get(3)) {
            continue;
        }
        if !inits.get(n.input[1].as_str()).is_some_and(|w| w.data_type == ONNX_INT8 && w.dims.len() == 2) {
            continue;
        }
        let Some(&(d, 0)) = producer.get(n.input[0].as_str()) else { continue };
        let qn = &graph.node[d];
        let act = if standard(qn, "DynamicQuantizeLinear") {
            if producer.get(n.input[2].as_str()) != Some(&(d, 2)) || qn.output.len() != 3 || qn.input.len() != 1 {
                continue;
            }
            Activations::Dynamic
        } else if statics && standard(qn, "QuantizeLinear") && zero_i8(n.input.get(2)) {
            let Some(inv_scale) = static_scale(qn) else { continue };
            Activations::Static { inv_scale }
        } else {
            continue;
        };
        // MatMulInteger -> Cast(float) -> [Mul(s_x) ->] Mul(s_w)
        let next = |name: &str| read_once(name).then(|| reader.get(name).copied()).flatten();
        let Some(ci) = next(&n.output[0]) else { continue };
        let cast = &graph.node[ci];
        if !standard(cast, "Cast") || cast.output.len() != 1 || !cast.attribute.iter().any(|a| a.name == "to" && a.i == i64::from(ONNX_FLOAT)) {
            continue;
        }
        let mut chain = vec![mi, ci];
        let mut last = cast.output[0].clone();
        if act == Activations::Dynamic {
            let Some(xi) = next(&last) else { continue };
            if other(&graph.node[xi], &last).as_deref() != Some(qn.output[1].as_str()) {
                continue;
            }
            chain.push(xi);
            last = graph.node[xi].output[0].clone();
        }
        let Some(wi) = next(&last) else { continue };
        let Some(scale) = other(&graph.node[wi], &last) else { continue };
        if !inits.contains_key(scale.as_str()) {
            continue;
        }
        plans.push((chain, wi, n.input[1].clone(), scale, qn.input[0].clone(), act));
    }
    drop((reader, producer, inits));
    let mut packed: HashMap<String, Arc<PackedQ8>> = HashMap::new();
    let mut gone: HashSet<usize> = HashSet::new();
    let mut used: HashSet<String> = HashSet::new();
    let position: HashMap<String, usize> = graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    for (chain, wi, w, scale, x, act) in plans {
        let (Some(&w_at), Some(&s_at)) = (position.get(&w), position.get(&scale)) else { continue };
        let Some(mut p) = decode(&graph.initializer[w_at], &graph.initializer[s_at]) else { continue };
        p.act = act;
        let key = graph.node[wi].output[0].clone();
        packed.insert(key.clone(), Arc::new(p));
        gone.extend(chain);
        used.extend([w, scale]);
        let m = &mut graph.node[wi];
        m.op_type = FUSED_OP.to_string();
        m.domain = String::new();
        m.input = vec![x];
        m.attribute = vec![pb::AttributeProto { name: "weights".into(), r#type: 3, s: key.into_bytes(), ..Default::default() }];
    }
    if packed.is_empty() {
        return Fused { products: 0 };
    }
    let fused = packed.len();
    let mut i = 0;
    graph.node.retain(|_| {
        i += 1;
        !gone.contains(&(i - 1))
    });
    // the quantizing nodes whose outputs nothing reads any more, then the initializers nothing
    // reads any more among those the chains used
    let mut read = HashSet::new();
    names_read(graph, &mut read);
    read.extend(graph.output.iter().map(|o| o.name.clone()));
    graph.node.retain(|n| !((standard(n, "DynamicQuantizeLinear") || standard(n, "QuantizeLinear")) && n.output.iter().all(|o| !read.contains(o))));
    let mut read = HashSet::new();
    names_read(graph, &mut read);
    read.extend(graph.output.iter().chain(graph.input.iter()).map(|o| o.name.clone()));
    graph.initializer.retain(|t| read.contains(&t.name) || !used.contains(&t.name));
    PACKED.with_borrow_mut(|t| *t = packed);
    Fused { products: fused }
}

pub fn parse(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let key = node.attribute.iter().find(|a| a.name == "weights").map(|a| String::from_utf8_lossy(&a.s).into_owned());
    let w = key
        .and_then(|k| PACKED.with_borrow(|t| t.get(&k).cloned()))
        .with_context(|| format!("{FUSED_OP} node '{}' without its weights (made by coca-edge's loader only)", node.name))?;
    ensure!(node.input.len() == 1, "{FUSED_OP} takes one input");
    Ok((expand(WeightProduct { w }), vec![]))
}

/// int8 weights `[k, n]` packed for [`kernels::Q8Block`]: column blocks of [`Q8_NB`], each
/// `kp` (k rounded up to [`Q8_KSTEP`], zeros past k) x 16 bytes in groups of four k, with each
/// column's sum and scale.
#[derive(Debug)]
pub struct PackedQ8 {
    k: usize,
    n: usize,
    kp: usize,
    data: Vec<i8>,
    colsum: Vec<i32>,
    scale: Vec<f32>,
    act: Activations,
}

/// How a fused product's activations become int8.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Activations {
    /// `DynamicQuantizeLinear` over the whole tensor at each call (dyn-q8)
    Dynamic,
    /// `QuantizeLinear` by one constant scale s, zero point 0 (sym-mmi): `inv_scale` = 1 / s,
    /// applied by the kernel table's quantizer, as our `QuantizeLinear` op does
    Static { inv_scale: f32 },
}

impl PackedQ8 {
    /// Pack row-major `w` (`k` x `n`) with one scale per column (or one for all).
    pub fn new(w: &[i8], k: usize, n: usize, scale: &[f32]) -> PackedQ8 {
        assert_eq!(w.len(), k * n);
        let kp = k.div_ceil(Q8_KSTEP) * Q8_KSTEP;
        let blocks = n.div_ceil(Q8_NB);
        let mut data = vec![0i8; blocks * kp * Q8_NB];
        let mut colsum = vec![0i32; blocks * Q8_NB];
        for kk in 0..k {
            for j in 0..n {
                let v = w[kk * n + j];
                let (jb, c) = (j / Q8_NB, j % Q8_NB);
                data[jb * kp * Q8_NB + (kk / 4 * Q8_NB + c) * 4 + kk % 4] = v;
                colsum[j] += i32::from(v);
            }
        }
        let mut sc = vec![0f32; blocks * Q8_NB];
        if scale.len() == 1 {
            sc[..n].fill(scale[0]);
        } else {
            sc[..n].copy_from_slice(scale);
        }
        PackedQ8 { k, n, kp, data, colsum, scale: sc, act: Activations::Dynamic }
    }

    /// `out` (`m` x n) = the activations quantised (DynamicQuantizeLinear over all `m` x k
    /// values, or QuantizeLinear by the constant scale) times the weights, scaled as the graph
    /// scales it; column blocks are split over `pool`'s threads when there is enough work. With
    /// dynamic quantisation a non-finite activation makes every output NaN (the graph's range
    /// would be infinite or NaN); the constant scale maps NaN to -128, as `QuantizeLinear` does
    /// in our op.
    pub fn matmul(&self, a: &[f32], m: usize, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
        let (k, kp, n) = (self.k, self.kp, self.n);
        assert_eq!(a.len(), m * k);
        assert_eq!(out.len(), m * n);
        let mut qa = vec![0i8; m * kp];
        let (corr, x_scale) = match self.act {
            Activations::Dynamic => {
                let Some(q) = DynQuant::of(a) else {
                    out.fill(f32::NAN);
                    return;
                };
                for (row, dst) in a.chunks_exact(k.max(1)).zip(qa.chunks_exact_mut(kp)) {
                    q.quantize_shifted(row, dst);
                }
                (128 - q.zero_point, q.scale)
            }
            Activations::Static { inv_scale } => {
                let quantize = kernels::kernels().quantize_i8;
                for (row, dst) in a.chunks_exact(k.max(1)).zip(qa.chunks_exact_mut(kp)) {
                    quantize(row, &mut dst[..k], inv_scale, 0);
                }
                // Cast then Mul(c): (exact as f32 * 1.0) * c is (exact as f32) * c to the bit
                (0, 1.0)
            }
        };
        let out_ptr = SendPtr(out.as_mut_ptr());
        parallel::run_shares(pool, n.div_ceil(Q8_NB), m * k * n >= PARALLEL_MACS, |range| {
            // SAFETY: out has m x n values; each share writes the columns of its own blocks only
            unsafe { self.blocks(&qa, m, corr, x_scale, range, out_ptr.get()) }
        });
    }

    /// Column blocks `range` of every row. SAFETY: `out` points to m x n writable values and no
    /// other thread writes these blocks' columns.
    unsafe fn blocks(&self, qa: &[i8], m: usize, corr: i32, x_scale: f32, range: std::ops::Range<usize>, out: *mut f32) {
        let (kp, n) = (self.kp, self.n);
        let kernel = kernels::kernels().q8_block;
        let mut acc = [[0i32; Q8_NB]; Q8_MAX_ROWS];
        for jb in range {
            let w = &self.data[jb * kp * Q8_NB..(jb + 1) * kp * Q8_NB];
            let cols = Q8_NB.min(n - jb * Q8_NB);
            let (scale, colsum) = (&self.scale[jb * Q8_NB..(jb + 1) * Q8_NB], &self.colsum[jb * Q8_NB..(jb + 1) * Q8_NB]);
            // rows in even groups of at most Q8_MAX_ROWS (50 patches: 10 x 5; 6 beams: 2 x 3)
            let groups = m.div_ceil(Q8_MAX_ROWS);
            let mut r0 = 0;
            for g in 0..groups {
                let rows = m / groups + usize::from(g < m % groups);
                kernel(&qa[r0 * kp..(r0 + rows) * kp], rows, kp, w, &mut acc[..rows]);
                for (r, acc) in acc[..rows].iter().enumerate() {
                    // MatMulInteger's exact sum, then Cast, Mul(s_x), Mul(s_w) in order (all
                    // 16 lanes, so the compiler vectorises it; the columns past n are dropped)
                    let mut y = [0f32; Q8_NB];
                    for j in 0..Q8_NB {
                        let exact = acc[j].wrapping_add(corr.wrapping_mul(colsum[j]));
                        y[j] = (exact as f32 * x_scale) * scale[j];
                    }
                    std::ptr::copy_nonoverlapping(y.as_ptr(), out.add((r0 + r) * n + jb * Q8_NB), cols);
                }
                r0 += rows;
            }
        }
    }
}

/// DynamicQuantizeLinear's parameters of one tensor (ONNX opset 11; onnxruntime computes them
/// the same way): range over the values and 0, scale = range / 255 (1 for an all-zero tensor),
/// zero point = round_half_even(clamp(-min / scale, 0, 255)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct DynQuant {
    pub scale: f32,
    pub zero_point: i32,
}

impl DynQuant {
    /// None when a value is not finite.
    pub fn of(xs: &[f32]) -> Option<DynQuant> {
        // in 8 lanes without a branch per value (the compiler vectorises it); `x * 0.0` is NaN
        // exactly where x is infinite or NaN, and a NaN anywhere makes the sum NaN
        let (mut lo, mut hi, mut bad) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                lo[i] = lo[i].min(c[i]);
                hi[i] = hi[i].max(c[i]);
                bad[i] += c[i] * 0.0;
            }
        }
        for (i, &x) in chunks.remainder().iter().enumerate() {
            lo[i] = lo[i].min(x);
            hi[i] = hi[i].max(x);
            bad[i] += x * 0.0;
        }
        if bad.iter().sum::<f32>().is_nan() {
            return None;
        }
        let lo = lo.iter().fold(0f32, |m, &v| m.min(v));
        let hi = hi.iter().fold(0f32, |m, &v| m.max(v));
        let scale = if hi == lo { 1.0 } else { (hi - lo) / 255.0 };
        let zero_point = (-lo / scale).clamp(0.0, 255.0).round_ties_even() as i32;
        Some(DynQuant { scale, zero_point })
    }

    /// `saturate_u8(round_half_even(x / scale) + zero_point)`, the operator's definition.
    #[cfg(test)]
    pub fn quantize(&self, x: f32) -> i32 {
        ((x / self.scale).round_ties_even() as i32 + self.zero_point).clamp(0, 255)
    }

    /// [`DynQuant::quantize`] of each value, shifted to i8 (`q - 128`), in a loop the compiler
    /// vectorises (clamped in f32 first: the bounds are integers, so the result is the same).
    pub fn quantize_shifted(&self, xs: &[f32], out: &mut [i8]) {
        let (lo, hi) = (-(self.zero_point as f32), 255.0 - self.zero_point as f32);
        let shift = self.zero_point - 128;
        for (&x, o) in xs.iter().zip(out.iter_mut()) {
            *o = ((x / self.scale).clamp(lo, hi).round_ties_even() as i32 + shift) as i8;
        }
    }
}

/// Multiply-accumulates from which a product is split over the executor's threads.
const PARALLEL_MACS: usize = 1 << 23;

impl Weights for PackedQ8 {
    const OP: &'static str = "MatMulQ8";
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn describe(&self) -> String {
        match self.act {
            Activations::Dynamic => format!("int8 weights {}x{}, run-time int8 activations", self.k, self.n),
            Activations::Static { .. } => format!("int8 weights {}x{}, int8 activations by a constant scale", self.k, self.n),
        }
    }
    fn matmul(&self, a: &[f32], m: usize, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
        PackedQ8::matmul(self, a, m, out, pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ONNX chain in f64 from the operator definitions: DynamicQuantizeLinear, then the
    /// integer product, then the scales.
    fn reference(a: &[f32], m: usize, k: usize, w: &[i8], n: usize, scale: &[f32]) -> Vec<f32> {
        let q = DynQuant::of(a).unwrap();
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let s: i64 = (0..k).map(|kk| (q.quantize(a[r * k + kk]) - q.zero_point) as i64 * w[kk * n + j] as i64).sum();
                let sw = if scale.len() == 1 { scale[0] } else { scale[j] };
                out[r * n + j] = (s as f32 * q.scale) * sw;
            }
        }
        out
    }

    #[test]
    fn dynamic_quantization_follows_the_operator() {
        // all zeros: scale 1, zero point 0
        assert_eq!(DynQuant::of(&[0.0, 0.0]), Some(DynQuant { scale: 1.0, zero_point: 0 }));
        // positive only: min is 0, zero point 0, max maps to 255
        let q = DynQuant::of(&[0.5, 2.55]).unwrap();
        assert_eq!(q.zero_point, 0);
        assert_eq!(q.quantize(2.55), 255);
        // negative only: zero point 255
        let q = DynQuant::of(&[-1.0, -3.0]).unwrap();
        assert_eq!(q.zero_point, 255);
        assert_eq!(q.quantize(-3.0), 0);
        // the ONNX reference implementation's example (opset 11 test data)
        let q = DynQuant::of(&[0.0, 2.0, -3.0, -2.5, 1.34, 0.5]).unwrap();
        assert_eq!((q.scale, q.zero_point), (0.019607844, 153));
        let want = [153, 255, 0, 26, 221, 179];
        for (x, w) in [0.0f32, 2.0, -3.0, -2.5, 1.34, 0.5].iter().zip(want) {
            assert_eq!(q.quantize(*x), w, "{x}");
        }
        // the vectorised form is the definition, minus 128, at every value and past both ends
        for q in [DynQuant::of(&[-3.0, 2.0]).unwrap(), DynQuant::of(&[0.5, 2.55]).unwrap(), DynQuant::of(&[-1.0, -3.0]).unwrap()] {
            let xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.001 + 0.0004).chain((-400..400).map(|i| i as f32 * q.scale * 0.5)).collect();
            let mut got = vec![0i8; xs.len()];
            q.quantize_shifted(&xs, &mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                assert_eq!(g as i32, q.quantize(x) - 128, "{x} with {q:?}");
            }
        }
        assert_eq!(DynQuant::of(&[1.0, f32::NAN]), None);
        assert_eq!(DynQuant::of(&[1.0; 20].iter().copied().chain([f32::NEG_INFINITY]).collect::<Vec<_>>()), None);
        assert_eq!(DynQuant::of(&[f32::INFINITY]), None);
    }

    #[test]
    fn matches_the_onnx_chain_for_every_row_count_and_odd_sizes() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 5), (2, 33, 17), (3, 64, 48), (5, 13, 31), (6, 8, 16), (7, 130, 40), (13, 9, 3), (1, 512, 600), (2, 512, 8200)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 40.0) / 25.0).collect();
            // -128 included: the kernels' products must hold the full int8 range
            let w: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 256) as i32 - 128) as i8).collect();
            for scale in [vec![0.01f32], (0..n).map(|j| 0.001 + j as f32 * 1e-4).collect()] {
                let p = PackedQ8::new(&w, k, n, &scale);
                let want = reference(&a, m, k, &w, n, &scale);
                for pool in [None, Some(&pool)] {
                    let mut got = vec![f32::NAN; m * n];
                    p.matmul(&a, m, &mut got, pool);
                    assert_eq!(got, want, "m {m} k {k} n {n}");
                }
            }
        }
        let p = PackedQ8::new(&[1, 2], 1, 2, &[1.0]);
        let mut got = [0f32; 2];
        p.matmul(&[f32::NAN], 1, &mut got, None);
        assert!(got.iter().all(|v| v.is_nan()), "a NaN activation poisons the product: {got:?}");
    }

    /// sym-mmi's chain from the operator definitions: QuantizeLinear by one scale (as our
    /// QuantizeLinear op applies it: times 1 / s, half to even, saturated), the exact integer
    /// product, Cast, Mul by the per-column constant.
    fn static_reference(a: &[f32], m: usize, k: usize, w: &[i8], n: usize, c: &[f32], inv_scale: f32) -> Vec<f32> {
        let q = |x: f32| if x.is_nan() { -128 } else { (x * inv_scale).round_ties_even().clamp(-128.0, 127.0) as i64 };
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let s: i64 = (0..k).map(|kk| q(a[r * k + kk]) * w[kk * n + j] as i64).sum();
                out[r * n + j] = s as f32 * if c.len() == 1 { c[0] } else { c[j] };
            }
        }
        out
    }

    #[test]
    fn constant_scale_products_match_the_onnx_chain() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(m, k, n) in &[(1, 1, 1), (2, 33, 17), (5, 13, 31), (50, 96, 40), (7, 130, 40), (3, 512, 8200)] {
            // values past both ends of the int8 range, and exact ties (x · 1/s = i + 0.5)
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 211) as f32 - 105.0) * 0.25).collect();
            let w: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 256) as i32 - 128) as i8).collect();
            for c in [vec![0.01f32], (0..n).map(|j| 0.001 + j as f32 * 1e-4).collect()] {
                let mut p = PackedQ8::new(&w, k, n, &c);
                p.act = Activations::Static { inv_scale: 2.0 };
                let want = static_reference(&a, m, k, &w, n, &c, 2.0);
                for pool in [None, Some(&pool)] {
                    let mut got = vec![f32::NAN; m * n];
                    p.matmul(&a, m, &mut got, pool);
                    assert_eq!(got, want, "m {m} k {k} n {n}");
                }
            }
        }
    }

    /// The sym-mmi chain as quantize.py writes it (one QuantizeLinear shared by two products,
    /// one with a bias Add after it), fused and run by our op, against the same graph with the
    /// products left to tract: the same numbers, and no MatMulInteger left.
    #[test]
    fn the_static_chain_is_fused_and_computes_what_tract_computes() {
        use super::super::test_proto::{model, node, tensor, value_info, write_model};
        let (m, k, n) = (6usize, 40usize, 20usize);
        let i8_tensor = |name: &str, dims: &[i64], v: &[i8]| pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: ONNX_INT8,
            raw_data: v.iter().map(|&b| b as u8).collect(),
            ..Default::default()
        };
        let w1: Vec<i8> = (0..k * n).map(|i| ((i * 29 % 255) as i32 - 127) as i8).collect();
        let w2: Vec<i8> = (0..k * n).map(|i| ((i * 71 % 255) as i32 - 127) as i8).collect();
        let c1: Vec<f32> = (0..n).map(|j| 0.002 + j as f32 * 3e-4).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1 - 1.0).collect();
        let mut cast = node("Cast", &["i1"], "c1", vec![]);
        cast.attribute.push(pb::AttributeProto { name: "to".into(), r#type: 2, i: 1, ..Default::default() });
        let mut cast2 = node("Cast", &["i2"], "c2", vec![]);
        cast2.attribute = cast.attribute.clone();
        let graph = pb::GraphProto {
            name: "g".into(),
            node: vec![
                node("QuantizeLinear", &["x", "sx", "z"], "xq", vec![]),
                node("MatMulInteger", &["xq", "w1", "z", "z"], "i1", vec![]),
                cast,
                node("Mul", &["c1", "s1"], "y1nb", vec![]),
                node("Add", &["y1nb", "b1"], "y1", vec![]),
                node("MatMulInteger", &["xq", "w2", "z", "z"], "i2", vec![]),
                cast2,
                node("Mul", &["s2", "c2"], "y2", vec![]),
            ],
            initializer: vec![
                tensor("sx", &[], &[0.05]),
                i8_tensor("z", &[], &[0]),
                i8_tensor("w1", &[k as i64, n as i64], &w1),
                i8_tensor("w2", &[k as i64, n as i64], &w2),
                tensor("s1", &[n as i64], &c1),
                tensor("s2", &[], &[0.004]),
                tensor("b1", &[n as i64], &bias),
            ],
            input: vec![value_info("x", &[m as i64, k as i64])],
            output: vec![value_info("y1", &[m as i64, n as i64]), value_info("y2", &[m as i64, n as i64])],
            ..Default::default()
        };
        let (_dir, path) = write_model(&model(graph));
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 97) as f32 - 48.0) * 0.11).collect();
        let run = |int8_products: bool| {
            let rewrites = super::super::Rewrites { ours: true, f32_products: false, int8_products };
            let plan = super::super::load_onnx_with(&path, rewrites).unwrap().into_optimized().unwrap();
            let names: Vec<String> = plan.nodes().iter().map(|n| n.op().name().to_string()).collect();
            let plan = plan.into_runnable().unwrap();
            let xt = tract_ndarray::Array2::from_shape_vec((m, k), x.clone()).unwrap().into_tensor();
            let ys = plan.run(tvec!(xt.into())).unwrap();
            let ys: Vec<Vec<f32>> = ys.iter().map(|y| y.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()).collect();
            (names, ys)
        };
        let (tract_ops, want) = run(false);
        let (ours, got) = run(true);
        assert!(!tract_ops.iter().any(|o| o.as_str() == "MatMulQ8"), "{tract_ops:?}");
        assert_eq!(ours.iter().filter(|o| o.as_str() == "MatMulQ8").count(), 2, "both products fused: {ours:?}");
        assert!(!ours.iter().any(|o| o.contains("Quantize")), "the shared QuantizeLinear is gone: {ours:?}");
        assert_eq!(got, want);
    }
}
