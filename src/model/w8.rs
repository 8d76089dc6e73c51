//! Products with int8 weights and f32 activations (`models/export/quantize.py`, design
//! "sym-w8"), for the decoder step: at batch 1 it is a matrix-vector product over every decoder
//! weight, bound by the bytes read per token. The graphs stay standard ONNX,
//! `DequantizeLinear(W8, scale, axis=1) -> MatMul(x, ·)`, which onnxruntime runs as it is.
//!
//! tract would fold the DequantizeLinear of a constant weight back into an f32 constant at
//! load time (the f32 bytes again, and its f32 kernel), and has no int8 matrix-vector kernel on
//! x86 for the `MatMulInteger` form. So before parsing, [`fuse_weight_dequant`] rewrites each
//! such pair in the protobuf into one `CocaMatMulW8` node, which the `MatMulW8` op ([`WeightProduct`] of [`PackedW8`]) runs: weights kept
//! in int8, packed in column blocks of 16, converted to f32 in registers and multiplied into
//! f32 accumulators, one scale per output column applied at the end. With AVX-512F or AVX2 + FMA
//! on x86 (chosen at run time); elsewhere (aarch64) a portable loop the compiler vectorises.
//! Column blocks are split over the threads of tract's executor.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, ModelProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

use super::product::{WeightProduct, Weights};
use crate::kernels::{self, parallel, SendPtr};

/// The op name our rewrite gives fused nodes (never in a graph on disk).
pub const FUSED_OP: &str = "CocaMatMulW8";

const ONNX_FLOAT: i32 = 1;
const ONNX_INT8: i32 = 3;

/// Columns per packed block (two AVX vectors of f32).
const NB: usize = kernels::W8_NB;

/// Is this initializer's data inline and all zeros (an int8 zero point)?
fn all_zero(t: &pb::TensorProto) -> bool {
    let inline = t.data_location != Some(1) && t.external_data.is_empty();
    inline && t.raw_data.iter().all(|&b| b == 0) && t.int32_data.iter().all(|&v| v == 0)
}

/// Every tensor name the nodes of `graph` read, subgraphs (If / Loop / Scan bodies) included.
pub(crate) fn names_read(graph: &pb::GraphProto, out: &mut std::collections::HashSet<String>) {
    let mut counts = std::collections::HashMap::new();
    count_reads(graph, &mut counts);
    out.extend(counts.into_keys());
}

/// How many times the nodes of `graph` (and of its subgraphs) read each name.
pub(crate) fn count_reads(graph: &pb::GraphProto, out: &mut std::collections::HashMap<String, usize>) {
    for n in &graph.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *out.entry(i.clone()).or_default() += 1;
        }
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                count_reads(g, out);
            }
        }
    }
}

/// The int8 weights of one DequantizeLinear, decoded from the protobuf and packed (inline data
/// only).
fn decode_weight(w: &pb::TensorProto, s: &pb::TensorProto) -> Option<PackedW8> {
    let (k, n) = (usize::try_from(w.dims[0]).ok()?, usize::try_from(w.dims[1]).ok()?);
    let widened: Vec<i8>;
    let values: &[i8] = if !w.raw_data.is_empty() {
        // SAFETY: u8 and i8 have the same size and alignment
        unsafe { std::slice::from_raw_parts(w.raw_data.as_ptr() as *const i8, w.raw_data.len()) }
    } else {
        widened = w.int32_data.iter().map(|&v| v as i8).collect();
        &widened
    };
    let scale: Vec<f32> =
        if !s.raw_data.is_empty() { s.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect() } else { s.float_data.clone() };
    let inline = |t: &pb::TensorProto| t.data_location != Some(1) && t.external_data.is_empty();
    let ok = inline(w) && inline(s) && k.checked_mul(n) == Some(values.len()) && (scale.len() == 1 || scale.len() == n) && scale.iter().all(|v| v.is_finite());
    ok.then(|| PackedW8::new(values, k, n, &scale))
}

thread_local! {
    /// Packed weights of the fused nodes of the graph this thread is parsing (see [`Fused`]).
    static PACKED: std::cell::RefCell<std::collections::HashMap<String, Arc<PackedW8>>> = Default::default();
}

/// What [`fuse_weight_dequant`] did; the packed weights stay available to [`parse`] on this
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

/// Rewrite every `MatMul(x, DequantizeLinear(W, s))` whose W is a 2-D int8 initializer with a
/// per-column (axis 1) or per-tensor float scale and no or zero zero point into one
/// `CocaMatMulW8(x)` node. The weights are packed here, once per DequantizeLinear; their
/// initializers and the DequantizeLinear nodes leave the protobuf when nothing else reads
/// them, so tract never holds them as constants. Only the top-level graph is rewritten; the
/// returned [`Fused`] must live until the protobuf is parsed, on this thread.
pub fn fuse_weight_dequant(proto: &mut ModelProto) -> Fused {
    use std::collections::{HashMap, HashSet};
    // (a Fused is only made on return: dropping one clears the table)
    let Some(graph) = proto.graph.as_mut() else { return Fused { products: 0 } };
    let is_matmul = |n: &NodeProto| n.op_type == "MatMul" && n.input.len() == 2 && (n.domain.is_empty() || n.domain == "ai.onnx");
    // how many times each name is read (nodes, subgraphs, graph inputs and outputs), and by
    // how many MatMuls as their weight
    let mut reads: HashMap<String, usize> = HashMap::new();
    count_reads(graph, &mut reads);
    let inits: HashMap<&str, &pb::TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    for o in graph.output.iter().chain(graph.input.iter()) {
        *reads.entry(o.name.clone()).or_default() += 1;
    }
    let mut as_weight: HashMap<String, usize> = HashMap::new();
    for n in graph.node.iter().filter(|n| is_matmul(n)) {
        *as_weight.entry(n.input[1].clone()).or_default() += 1;
    }
    // DequantizeLinear nodes of int8 weights we can take over: (output, W, scale, inputs)
    let mut plans: Vec<(String, String, String, Vec<String>)> = Vec::new();
    for n in &graph.node {
        if n.op_type != "DequantizeLinear" || !n.domain.is_empty() && n.domain != "ai.onnx" || n.output.len() != 1 || n.output[0].is_empty() {
            continue;
        }
        if !as_weight.contains_key(n.output[0].as_str()) {
            continue;
        }
        let Some(w) = n.input.first().and_then(|i| inits.get(i.as_str())) else { continue };
        let Some(s) = n.input.get(1).and_then(|i| inits.get(i.as_str())) else { continue };
        if w.data_type != ONNX_INT8 || w.dims.len() != 2 || s.data_type != ONNX_FLOAT {
            continue;
        }
        let cols = w.dims[1];
        let mut axis = 1i64;
        let mut plain = true;
        for a in &n.attribute {
            match a.name.as_str() {
                "axis" => axis = a.i,
                "block_size" => plain &= a.i == 0,
                _ => {}
            }
        }
        let per_tensor = s.dims.iter().product::<i64>() == 1;
        let per_column = s.dims.len() == 1 && s.dims[0] == cols && (axis == 1 || axis == -1);
        let zero_ok = match n.input.get(2).filter(|z| !z.is_empty()) {
            None => true,
            Some(z) => inits.get(z.as_str()).is_some_and(|z| z.data_type == ONNX_INT8 && all_zero(z)),
        };
        if plain && (per_tensor || per_column) && zero_ok {
            plans.push((n.output[0].clone(), n.input[0].clone(), n.input[1].clone(), n.input.iter().filter(|i| !i.is_empty()).cloned().collect()));
        }
    }
    drop(inits);
    // pack each weight; its protobuf bytes go at once when its DequantizeLinear alone reads it
    // and goes too (every reader of the DequantizeLinear is a MatMul weight slot)
    let position: HashMap<String, usize> = graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let mut dq: HashMap<String, Arc<PackedW8>> = HashMap::new();
    let mut consumed: Vec<String> = Vec::new();
    for (out, w, scale, inputs) in plans {
        let (Some(&wi), Some(&si)) = (position.get(&w), position.get(&scale)) else { continue };
        let packed = decode_weight(&graph.initializer[wi], &graph.initializer[si]);
        let Some(packed) = packed else { continue };
        if reads.get(&out) == as_weight.get(&out) && reads.get(&w) == Some(&1) {
            graph.initializer[wi].raw_data = Vec::new();
            graph.initializer[wi].int32_data = Vec::new();
        }
        dq.insert(out, Arc::new(packed));
        consumed.extend(inputs);
    }
    if dq.is_empty() {
        return Fused { products: 0 };
    }
    let mut fused = 0;
    for n in graph.node.iter_mut() {
        if is_matmul(n) && dq.contains_key(&n.input[1]) {
            let key = n.input[1].clone();
            n.op_type = FUSED_OP.to_string();
            n.input.truncate(1);
            n.attribute = vec![pb::AttributeProto { name: "weights".into(), r#type: 3, s: key.into_bytes(), ..Default::default() }];
            fused += 1;
        }
    }
    // drop the DequantizeLinear nodes, then the initializers, that nothing reads any more
    let mut read = HashSet::new();
    names_read(graph, &mut read);
    read.extend(graph.output.iter().map(|o| o.name.clone()));
    graph.node.retain(|n| !(n.op_type == "DequantizeLinear" && n.output.first().is_some_and(|o| dq.contains_key(o) && !read.contains(o))));
    let mut read = HashSet::new();
    names_read(graph, &mut read);
    read.extend(graph.output.iter().chain(graph.input.iter()).map(|o| o.name.clone()));
    let consumed: HashSet<String> = consumed.into_iter().filter(|c| !read.contains(c)).collect();
    graph.initializer.retain(|t| !consumed.contains(&t.name));
    PACKED.with_borrow_mut(|t| *t = dq);
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

/// int8 weights `[k, n]` packed for [`PackedW8::matmul`]: column blocks of [`NB`], each block
/// `k` rows of `NB` values (zero past `n`), with per-column scales.
#[derive(Debug)]
pub struct PackedW8 {
    k: usize,
    n: usize,
    data: Vec<i8>,
    scale: Vec<f32>,
}

impl PackedW8 {
    /// Pack row-major `w` (`k` x `n`) with one scale per column (or one for all).
    pub fn new(w: &[i8], k: usize, n: usize, scale: &[f32]) -> PackedW8 {
        assert_eq!(w.len(), k * n);
        let blocks = n.div_ceil(NB);
        let mut data = vec![0i8; blocks * k * NB];
        for (kk, row) in w.chunks_exact(n.max(1)).enumerate().take(k) {
            for (jb, cols) in row.chunks(NB).enumerate() {
                let at = (jb * k + kk) * NB;
                data[at..at + cols.len()].copy_from_slice(cols);
            }
        }
        let mut sc = vec![0f32; blocks * NB];
        if scale.len() == 1 {
            sc[..n].fill(scale[0]);
        } else {
            sc[..n].copy_from_slice(scale);
        }
        PackedW8 { k, n, data, scale: sc }
    }

    /// `out` (`m` x n) = `a` (`m` x k) times the dequantised weights; column blocks are split
    /// over `pool`'s threads when there is enough work.
    pub fn matmul(&self, a: &[f32], m: usize, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
        assert_eq!(a.len(), m * self.k);
        assert_eq!(out.len(), m * self.n);
        let out_ptr = SendPtr(out.as_mut_ptr());
        // waking the pool costs some microseconds a call: only products of a few MB of int8
        // weights per row group (the vocabulary projection at batch 1, most at 6 beams) gain
        parallel::run_shares(pool, self.n.div_ceil(NB), m * self.k * self.n >= PARALLEL_MACS, |range| {
            // SAFETY: out has m x n values; each share writes the columns of its own blocks only
            unsafe { self.blocks(a, m, range, out_ptr.get()) }
        });
    }

    /// Column blocks `range` of every row. SAFETY: `out` points to m x n writable values and no
    /// other thread writes these blocks' columns.
    unsafe fn blocks(&self, a: &[f32], m: usize, range: std::ops::Range<usize>, out: *mut f32) {
        let (k, n) = (self.k, self.n);
        let kernel = kernels::kernels().w8_block;
        let mut acc = [[0f32; NB]; MAX_ROWS];
        for jb in range {
            let w = &self.data[jb * k * NB..(jb + 1) * k * NB];
            let cols = NB.min(n - jb * NB);
            let scale = &self.scale[jb * NB..(jb + 1) * NB];
            let mut r0 = 0;
            while r0 < m {
                let rows = MAX_ROWS.min(m - r0);
                kernel(&a[r0 * k..(r0 + rows) * k], rows, k, w, &mut acc[..rows]);
                for (r, acc) in acc[..rows].iter().enumerate() {
                    let o = out.add((r0 + r) * n + jb * NB);
                    for j in 0..cols {
                        *o.add(j) = acc[j] * scale[j];
                    }
                }
                r0 += rows;
            }
        }
    }
}

/// Multiply-accumulates from which a product is split over the executor's threads.
const PARALLEL_MACS: usize = 1 << 23;

/// Rows computed together, so each weight block is read once per group of rows.
const MAX_ROWS: usize = kernels::W8_MAX_ROWS;

impl Weights for PackedW8 {
    const OP: &'static str = "MatMulW8";
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn describe(&self) -> String {
        format!("int8 weights {}x{}", self.k, self.n)
    }
    fn matmul(&self, a: &[f32], m: usize, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
        PackedW8::matmul(self, a, m, out, pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dequantised product in f64, and for each value the sum of its terms' magnitudes
    /// (f32 rounding in any summation order stays within a few ulps of that).
    fn reference(a: &[f32], m: usize, k: usize, w: &[i8], n: usize, scale: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0f32; m * n];
        let mut mag = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let s = if scale.len() == 1 { scale[0] } else { scale[j] };
                let terms = (0..k).map(|kk| a[r * k + kk] as f64 * (w[kk * n + j] as f64 * s as f64));
                out[r * n + j] = terms.clone().sum::<f64>() as f32;
                mag[r * n + j] = terms.map(f64::abs).sum::<f64>() as f32;
            }
        }
        (out, mag)
    }

    #[test]
    fn matches_dequantised_product_for_every_row_count_and_odd_sizes() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 5), (2, 33, 17), (3, 64, 48), (5, 13, 31), (6, 8, 16), (7, 130, 40), (13, 9, 3), (1, 512, 600), (2, 512, 8200)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let w: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
            for scale in [vec![0.01f32], (0..n).map(|j| 0.001 + j as f32 * 1e-4).collect()] {
                let p = PackedW8::new(&w, k, n, &scale);
                let (want, mag) = reference(&a, m, k, &w, n, &scale);
                let close = |g: f32, i: usize| (g - want[i]).abs() <= 1e-6 * (1.0 + mag[i]);
                for pool in [None, Some(&pool)] {
                    let mut got = vec![f32::NAN; m * n];
                    p.matmul(&a, m, &mut got, pool);
                    for (i, &g) in got.iter().enumerate() {
                        assert!(close(g, i), "m {m} k {k} n {n}: {g} vs {}", want[i]);
                    }
                }
                // every kernel table this CPU runs, on the first column block, for each row count
                for rows in 1..=m.min(MAX_ROWS) {
                    let (a, w) = (&a[..rows * k], &p.data[..k * NB]);
                    let mut kernels: Vec<(&str, Vec<[f32; NB]>)> = Vec::new();
                    for (name, table) in crate::kernels::candidates() {
                        let Ok(table) = table else {
                            eprintln!("skipped {name}: not on this CPU");
                            continue;
                        };
                        let mut out = vec![[0f32; NB]; rows];
                        (table.w8_block)(a, rows, k, w, &mut out);
                        kernels.push((name, out));
                    }
                    for (name, got) in kernels {
                        #[allow(clippy::needless_range_loop)]
                        for r in 0..rows {
                            for j in 0..NB.min(n) {
                                assert!(close(got[r][j] * p.scale[j], r * n + j), "{name} rows {rows} k {k} n {n}");
                            }
                        }
                    }
                }
            }
        }
    }
}
