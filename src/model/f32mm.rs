//! Products with constant f32 weights, for the image encoder on x86 CPUs with AVX-512.
//!
//! The image encoder is nine tenths matrix products of a few dozen token rows (50 for a
//! ViT-B/32, 257 for an L/14, 256 pooler queries) by constant weights. tract runs them with
//! kernels whose tiles leave part of such row counts idle, and splits them over threads less
//! evenly than onnxruntime does (BENCHMARKS.md, "Image path"). So before parsing,
//! [`fuse_f32_weights`] rewrites each `MatMul(x, W)` and `Gemm(x, W, b)` whose weight is a 2-D
//! f32 initializer (and, when it is the only reader, the `Add` of a constant bias after it) into
//! one `CocaMatMulF32` node, which the `MatMulF32` op ([`WeightProduct`] of [`PackedF32`]) runs:
//! - weights packed once at load in column blocks of 32 (two AVX-512 registers);
//! - rows cut into even tiles of at most 12 (so 50 rows run as 5 x 10, no padded rows), each
//!   tile's 24 accumulators held in registers over the whole k;
//! - the bias added as the tile is stored;
//! - column blocks split evenly over the threads of tract's executor.
//!
//! The ViT's patch embedding, a `Conv` whose strides equal its kernel, becomes one
//! `CocaPatchEmbed` node ([`PatchEmbed`]): the patches gathered as rows, the same kernel, the
//! result stored channel-first (tract's own convolution took 1.8 ms of the B/32 encoder at 2
//! threads for this 49 x 3072 x 768 product).
//!
//! Only where the CPU has AVX-512F (checked when the graph loads): elsewhere tract's own
//! kernels (NEON on the boards, AVX2 on older x86) run these products as before.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, ModelProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

use super::product::{WeightProduct, Weights};
use crate::kernels::{self, parallel, SendPtr};

/// The op name our rewrite gives fused nodes (never in a graph on disk).
pub const FUSED_OP: &str = "CocaMatMulF32";

const ONNX_FLOAT: i32 = 1;

/// Columns per packed block.
const NB: usize = kernels::F32_NB;

/// Multiply-accumulates from which a product is split over the executor's threads.
const PARALLEL_MACS: usize = 1 << 21;

/// Are our f32 products (and attention) faster than tract's on this CPU, so that the rewrites
/// are worth making? (They compute right on every CPU: the tests make them everywhere.)
pub(crate) fn worth_fusing() -> bool {
    kernels::kernels().fuse_f32
}

/// The op name our rewrite gives fused patch embeddings (never in a graph on disk).
pub const PATCH_OP: &str = "CocaPatchEmbed";

/// A ViT's patch embedding: a 2-D `Conv` whose strides equal its kernel, without padding,
/// dilation or groups, by a constant weight `[O, C, kh, kw]`. Returns (kh, kw, O).
fn patch_conv(n: &NodeProto, weight_dims: Option<Vec<i64>>) -> Option<(usize, usize, i64)> {
    let d = weight_dims?;
    let [o, c, kh, kw] = d[..] else { return None };
    if o <= 0 || c <= 0 || kh <= 0 || kw <= 0 {
        return None;
    }
    for a in &n.attribute {
        let ok = match a.name.as_str() {
            "group" => a.i == 1,
            "strides" => a.ints == [kh, kw],
            "kernel_shape" => a.ints == [kh, kw],
            "dilations" => a.ints.iter().all(|&x| x == 1),
            "pads" => a.ints.iter().all(|&x| x == 0),
            "auto_pad" => matches!(&a.s[..], b"NOTSET" | b"VALID" | b""),
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    // (strides default to 1: a patch embedding always states them)
    n.attribute.iter().any(|a| a.name == "strides").then_some((kh as usize, kw as usize, o))
}

/// f32 values of an inline initializer (raw little-endian bytes or float_data).
fn floats(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != ONNX_FLOAT || t.data_location == Some(1) || !t.external_data.is_empty() {
        return None;
    }
    if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(4) {
            return None;
        }
        Some(t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    } else {
        Some(t.float_data.clone())
    }
}

fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.f).unwrap_or(default)
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i).unwrap_or(default)
}

thread_local! {
    /// Packed weights of the fused nodes of the graph this thread is parsing (see [`Fused`]).
    static PACKED: std::cell::RefCell<HashMap<String, Arc<PackedF32>>> = Default::default();
}

/// What [`fuse_f32_weights`] did; the packed weights stay available to [`parse`] on this
/// thread while the value lives.
pub struct Fused {
    /// Products fused.
    pub products: usize,
    /// Of which with their bias.
    pub with_bias: usize,
}

impl Drop for Fused {
    fn drop(&mut self) {
        PACKED.with_borrow_mut(|t| t.clear());
    }
}

/// Rewrite the top-level graph's products by constant 2-D f32 weights (see the module doc).
/// A weight is packed once however many products read it; its initializer leaves the protobuf
/// when nothing else reads it. The returned [`Fused`] must live until the protobuf is parsed,
/// on this thread.
pub fn fuse_f32_weights(proto: &mut ModelProto) -> Fused {
    // (a Fused is only made on return: dropping one clears the table)
    let none = || Fused { products: 0, with_bias: 0 };
    let Some(graph) = proto.graph.as_mut() else { return none() };
    let std_domain = |n: &NodeProto| n.domain.is_empty() || n.domain == "ai.onnx";
    let mut reads: HashMap<String, usize> = HashMap::new();
    super::w8::count_reads(graph, &mut reads);
    for o in graph.output.iter().chain(graph.input.iter()) {
        *reads.entry(o.name.clone()).or_default() += 1;
    }
    let mut position: HashMap<String, usize> = graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    // names that are an initializer through Identity nodes (the exporter writes one where two
    // parameters hold the same values, e.g. the zero biases of a randomly initialised model)
    let identities: Vec<(String, String)> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Identity" && std_domain(n) && n.input.len() == 1 && n.output.len() == 1)
        .map(|n| (n.output[0].clone(), n.input[0].clone()))
        .collect();
    for _ in 0..4 {
        for (out, src) in &identities {
            if let Some(&i) = position.get(src) {
                position.entry(out.clone()).or_insert(i);
            }
        }
    }
    let position = position;
    let dims = |name: &str| position.get(name).map(|&i| graph.initializer[i].dims.clone());
    // a bias: a constant f32 vector of n values ([n] or [1, n])
    let bias_of = |name: &str, n: i64| -> Option<Vec<f32>> {
        let t = &graph.initializer[*position.get(name)?];
        let ok = match t.dims.as_slice() {
            [m] => *m == n,
            [1, m] => *m == n,
            _ => false,
        };
        if !ok {
            return None;
        }
        floats(t).filter(|v| v.len() == n as usize && v.iter().all(|x| x.is_finite()))
    };
    // the node reading each name, when exactly one does
    let mut reader: HashMap<String, usize> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            reader.insert(inp.clone(), i);
        }
    }

    struct Plan {
        node: usize,
        weight: String,
        transposed: bool,
        /// a patch-embedding Conv: its kernel (= strides)
        patches: Option<(usize, usize)>,
        bias: Option<Vec<f32>>,
        /// the Add node folded in (its output becomes the product's)
        add: Option<usize>,
    }
    let mut plans: Vec<Plan> = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        if !std_domain(n) || n.output.len() != 1 || n.output[0].is_empty() {
            continue;
        }
        let plan = match n.op_type.as_str() {
            "MatMul" if n.input.len() == 2 => {
                let Some(d) = dims(&n.input[1]) else { continue };
                if d.len() != 2 {
                    continue;
                }
                Plan { node: i, weight: n.input[1].clone(), transposed: false, patches: None, bias: None, add: None }
            }
            "Gemm" if n.input.len() >= 2 => {
                // y = x W (+ b): alpha 1, beta 1, x not transposed
                if attr_i(n, "transA", 0) != 0 || attr_f(n, "alpha", 1.0) != 1.0 {
                    continue;
                }
                let Some(d) = dims(&n.input[1]) else { continue };
                if d.len() != 2 {
                    continue;
                }
                let transposed = attr_i(n, "transB", 0) != 0;
                let cols = if transposed { d[0] } else { d[1] };
                let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                    None => None,
                    Some(b) => {
                        if attr_f(n, "beta", 1.0) != 1.0 {
                            continue;
                        }
                        match bias_of(b, cols) {
                            Some(v) => Some(v),
                            None => continue,
                        }
                    }
                };
                Plan { node: i, weight: n.input[1].clone(), transposed, patches: None, bias, add: None }
            }
            "Conv" if (2..=3).contains(&n.input.len()) => match patch_conv(n, dims(&n.input[1])) {
                Some((kh, kw, out_ch)) => {
                    let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                        None => None,
                        Some(b) => match bias_of(b, out_ch) {
                            Some(v) => Some(v),
                            None => continue,
                        },
                    };
                    Plan { node: i, weight: n.input[1].clone(), transposed: true, patches: Some((kh, kw)), bias, add: None }
                }
                None => continue,
            },
            _ => continue,
        };
        let mut plan = plan;
        // MatMul -> Add(bias): fold the Add when it alone reads the product
        if plan.bias.is_none() && n.op_type == "MatMul" && reads.get(&n.output[0]) == Some(&1) {
            if let Some(&j) = reader.get(&n.output[0]) {
                let a = &graph.node[j];
                let cols = dims(&plan.weight).map(|d| d[1]).unwrap_or(-1);
                if a.op_type == "Add" && std_domain(a) && a.input.len() == 2 && a.output.len() == 1 {
                    let other = if a.input[0] == n.output[0] { &a.input[1] } else { &a.input[0] };
                    // (a [1, n] bias would add a leading axis to a 1-D product)
                    let vector = dims(other).is_some_and(|d| d.len() == 1);
                    if let Some(b) = bias_of(other, cols).filter(|_| vector) {
                        plan.bias = Some(b);
                        plan.add = Some(j);
                    }
                }
            }
        }
        plans.push(plan);
    }
    if plans.is_empty() {
        return none();
    }
    // pack each weight once; its protobuf bytes go as soon as every reader is packed for
    let mut packed: HashMap<String, Arc<PackedF32>> = HashMap::new();
    let mut keys: Vec<Option<String>> = Vec::with_capacity(plans.len());
    let mut done: HashMap<String, usize> = HashMap::new();
    for p in &plans {
        let key = format!("{}#{}", p.weight, if p.transposed { "t" } else { "n" });
        let wi = position[&p.weight];
        if !packed.contains_key(&key) {
            let t = &graph.initializer[wi];
            // (a Conv's [O, C, kh, kw] is [O, C·kh·kw], transposed)
            let (r, c) = (t.dims[0], t.dims[1..].iter().product::<i64>());
            let Some(values) = floats(t).filter(|v| r > 0 && c > 0 && v.len() as i64 == r * c) else {
                keys.push(None);
                continue;
            };
            let (r, c) = (r as usize, c as usize);
            let w = if p.transposed { PackedF32::new_transposed(&values, c, r) } else { PackedF32::new(&values, r, c) };
            packed.insert(key.clone(), Arc::new(w));
        }
        // (a weight read through an Identity is never cleared here: the Identity reads it too)
        let d = done.entry(p.weight.clone()).or_default();
        *d += 1;
        if graph.initializer[wi].name == p.weight && reads.get(&p.weight) == Some(d) {
            graph.initializer[wi].raw_data = Vec::new();
            graph.initializer[wi].float_data = Vec::new();
        }
        keys.push(Some(key));
    }
    // rewrite the nodes
    let mut fused = 0;
    let mut with_bias = 0;
    let mut drop_nodes: HashSet<usize> = HashSet::new();
    let mut table: HashMap<String, Arc<PackedF32>> = HashMap::new();
    for (p, key) in plans.into_iter().zip(keys) {
        let Some(key) = key else { continue };
        let mut w = packed[&key].clone();
        let mut node_key = key;
        if let Some(b) = &p.bias {
            // the same packed weights (shared) with this node's bias
            w = Arc::new(w.clone_shared().with_bias(b));
            node_key = format!("{node_key}+bias@{}", graph.node[p.node].output[0]);
            with_bias += 1;
        }
        table.insert(node_key.clone(), w);
        let out = match p.add {
            Some(j) => {
                drop_nodes.insert(j);
                graph.node[j].output[0].clone()
            }
            None => graph.node[p.node].output[0].clone(),
        };
        let n = &mut graph.node[p.node];
        n.op_type = if p.patches.is_some() { PATCH_OP } else { FUSED_OP }.to_string();
        n.domain = String::new();
        n.input.truncate(1);
        n.output = vec![out];
        n.attribute = vec![pb::AttributeProto { name: "weights".into(), r#type: 3, s: node_key.into_bytes(), ..Default::default() }];
        if let Some((kh, kw)) = p.patches {
            n.attribute.push(pb::AttributeProto { name: "kernel".into(), r#type: 7, ints: vec![kh as i64, kw as i64], ..Default::default() });
        }
        fused += 1;
    }
    let mut ix = 0;
    graph.node.retain(|_| {
        let keep = !drop_nodes.contains(&ix);
        ix += 1;
        keep
    });
    // Identity nodes, then initializers, that nothing reads any more (weights, folded biases)
    loop {
        let mut read = HashSet::new();
        super::w8::names_read(graph, &mut read);
        read.extend(graph.output.iter().map(|o| o.name.clone()));
        let before = graph.node.len();
        graph.node.retain(|n| !(n.op_type == "Identity" && n.output.len() == 1 && !read.contains(&n.output[0])));
        if graph.node.len() == before {
            break;
        }
    }
    let mut read = HashSet::new();
    super::w8::names_read(graph, &mut read);
    read.extend(graph.output.iter().chain(graph.input.iter()).map(|o| o.name.clone()));
    graph.initializer.retain(|t| read.contains(&t.name));
    PACKED.with_borrow_mut(|t| *t = table);
    Fused { products: fused, with_bias }
}

/// The packed weights a fused node names (its "weights" attribute), from the table of the graph
/// being parsed.
fn packed_weights(node: &NodeProto) -> TractResult<Arc<PackedF32>> {
    let key = node.attribute.iter().find(|a| a.name == "weights").map(|a| String::from_utf8_lossy(&a.s).into_owned());
    key.and_then(|k| PACKED.with_borrow(|t| t.get(&k).cloned()))
        .with_context(|| format!("{} node '{}' without its weights (made by coca-edge's loader only)", node.op_type, node.name))
}

pub fn parse(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let w = packed_weights(node)?;
    ensure!(node.input.len() == 1, "{FUSED_OP} takes one input");
    Ok((expand(WeightProduct { w }), vec![]))
}

pub fn parse_patches(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let w = packed_weights(node)?;
    let kernel = node.attribute.iter().find(|a| a.name == "kernel").map(|a| a.ints.clone()).unwrap_or_default();
    ensure!(node.input.len() == 1 && kernel.len() == 2 && kernel.iter().all(|&k| k > 0), "{PATCH_OP} takes one input and a kernel");
    let (kh, kw) = (kernel[0] as usize, kernel[1] as usize);
    ensure!(w.k % (kh * kw) == 0, "{PATCH_OP}: weights of {} rows for a {kh}x{kw} kernel", w.k);
    Ok((expand(PatchEmbed { w, kh, kw }), vec![]))
}

/// A patch-embedding convolution (`x [N, C, H, W] -> [N, O, H/kh, W/kw]`, strides = kernel):
/// each image's patches gathered as rows of `C·kh·kw` values, multiplied by the packed weights
/// with [`PackedF32::matmul`], and stored channel-first as the `Conv` does.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    w: Arc<PackedF32>,
    kh: usize,
    kw: usize,
}

impl PartialEq for PatchEmbed {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.w, &other.w) && self.kh == other.kh && self.kw == other.kw
    }
}

impl Eq for PatchEmbed {}

impl PatchEmbed {
    fn channels(&self) -> usize {
        self.w.k / (self.kh * self.kw)
    }

    /// Output rows and columns for an image of h x w, if it holds one patch.
    fn grid(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        (h >= self.kh && w >= self.kw).then(|| ((h - self.kh) / self.kh + 1, (w - self.kw) / self.kw + 1))
    }
}

impl Expansion for PatchEmbed {
    fn name(&self) -> StaticName {
        "PatchEmbed".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
        s.equals(&inputs[0].shape[1], self.channels().to_dim())?;
        s.equals(&outputs[0].shape[1], self.w.n.to_dim())?;
        for ax in [2, 3] {
            let k = if ax == 2 { self.kh } else { self.kw } as i64;
            s.given(&inputs[0].shape[ax], move |s, d| {
                if let Ok(d) = d.to_i64() {
                    ensure!(d >= k, "PatchEmbed: image side {d} under the patch's {k}");
                    s.equals(&outputs[0].shape[ax], ((d - k) / k + 1).to_dim())?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for PatchEmbed {
    fn name(&self) -> StaticName {
        "PatchEmbed".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{}x{} patches, {}", self.kh, self.kw, self.w.describe())])
    }

    op_as_typed_op!();
}

impl EvalOp for PatchEmbed {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let &[batch, c, h, w] = x.shape() else { bail!("PatchEmbed: input {:?} is not [N, C, H, W]", x.shape()) };
        ensure!(c == self.channels(), "PatchEmbed: {c} channels, weights for {}", self.channels());
        let (gh, gw) = self.grid(h, w).with_context(|| format!("PatchEmbed: image {h}x{w} under one {}x{} patch", self.kh, self.kw))?;
        let (kh, kw, k, o, p) = (self.kh, self.kw, self.w.k, self.w.n, gh * gw);
        let xs = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut y = unsafe { Tensor::uninitialized::<f32>(&[batch, o, gh, gw])? };
        let mut rows = vec![0f32; p * k];
        let mut tokens = vec![0f32; p * o];
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys = view.as_slice_mut::<f32>()?;
            for (img, out) in xs.chunks_exact(c * h * w).zip(ys.chunks_exact_mut(o * p)) {
                // row (py, px): channel-major, then the patch's rows, as the weights are laid out
                for (pi, row) in rows.chunks_exact_mut(k).enumerate() {
                    let (py, px) = (pi / gw, pi % gw);
                    for (ci, dst) in row.chunks_exact_mut(kh * kw).enumerate() {
                        for (i, d) in dst.chunks_exact_mut(kw).enumerate() {
                            let at = (ci * h + py * kh + i) * w + px * kw;
                            d.copy_from_slice(&img[at..at + kw]);
                        }
                    }
                }
                super::product::with_executor_pool(|pool| self.w.matmul(&rows, p, &mut tokens, pool));
                for (pi, t) in tokens.chunks_exact(o).enumerate() {
                    for (oi, &v) in t.iter().enumerate() {
                        out[oi * p + pi] = v;
                    }
                }
            }
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for PatchEmbed {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(x.datum_type == f32::datum_type() && x.rank() == 4, "PatchEmbed takes f32 [N, C, H, W], got {x:?}");
        // (d - k) / k + 1 patches along a side of d; checked at eval where d is symbolic
        let side = |d: &TDim, k: usize| -> TractResult<TDim> {
            match d.to_usize() {
                Ok(v) => {
                    ensure!(v >= k, "PatchEmbed: image side {v} under the patch's {k}");
                    Ok(((v - k) / k + 1).to_dim())
                }
                Err(_) => Ok((d.clone() - k as i64) / k as i64 + 1),
            }
        };
        Ok(tvec!(f32::fact([x.shape[0].clone(), self.w.n.to_dim(), side(&x.shape[2], self.kh)?, side(&x.shape[3], self.kw)?])))
    }

    as_op!();
}

/// `x W (+ b) + r`: a product whose output goes, through reshapes only, to an `Add` of a tensor
/// of its shape (a transformer's residual), the sum made as each tile is stored. Made from an
/// optimised model by [`fuse_residual_adds`]; its output has `r`'s shape.
#[derive(Debug, Clone)]
pub struct ProductAdd {
    w: Arc<PackedF32>,
}

impl PartialEq for ProductAdd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.w, &other.w)
    }
}

impl Eq for ProductAdd {}

impl Op for ProductAdd {
    fn name(&self) -> StaticName {
        "MatMulF32Add".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} + residual", self.w.describe())])
    }

    op_as_typed_op!();
}

impl EvalOp for ProductAdd {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, r) = (&inputs[0], &inputs[1]);
        let (k, n) = (self.w.k, self.w.n);
        ensure!(x.shape().last() == Some(&k), "MatMulF32Add: input {:?}, weights {k}x{n}", x.shape());
        let m = x.len() / k.max(1);
        ensure!(r.len() == m * n, "MatMulF32Add: residual {:?} for {m}x{n}", r.shape());
        let (xs, rs) = (x.try_as_plain_ram()?, r.try_as_plain_ram()?);
        let mut y = unsafe { Tensor::uninitialized::<f32>(r.shape())? };
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys = view.as_slice_mut::<f32>()?;
            let (xs, rs) = (xs.as_slice::<f32>()?, rs.as_slice::<f32>()?);
            super::product::with_executor_pool(|pool| self.w.matmul_add(xs, m, Some(rs), ys, pool));
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for ProductAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()), "MatMulF32Add takes f32");
        Ok(tvec!(f32::fact(inputs[1].shape.clone())))
    }

    as_op!();
}

/// In an optimised model, fold each `Add` that alone reads a `MatMulF32` product (through
/// reshapes) and adds a tensor of the same shape into a [`ProductAdd`]. Returns how many.
pub fn fuse_residual_adds(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::change_axes::IntoShape;
    let ids: Vec<usize> = model.nodes().iter().filter(|n| n.op_as::<WeightProduct<PackedF32>>().is_some()).map(|n| n.id).collect();
    let mut fused = 0;
    for id in ids {
        let node = model.node(id);
        let Some(w) = node.op_as::<WeightProduct<PackedF32>>().map(|p| p.w.clone()) else { continue };
        let mut tail = OutletId::new(id, 0);
        let add = loop {
            let succs = model.outlet_successors(tail);
            if model.output_outlets()?.contains(&tail) || succs.len() != 1 {
                break None;
            }
            let succ = model.node(succs[0].node);
            if succ.op_is::<IntoShape>() {
                tail = OutletId::new(succ.id, 0);
                continue;
            }
            let name = succ.op.name();
            break ((name == "OptAddUnicast" || name == "Add") && succ.inputs.len() == 2).then_some((succ.id, succs[0].slot));
        };
        let Some((add, slot)) = add else { continue };
        let other = model.node(add).inputs[1 - slot];
        let concrete = |o: OutletId| -> Option<(DatumType, TVec<usize>)> {
            let f = model.outlet_fact(o).ok()?;
            Some((f.datum_type, f.shape.as_concrete()?.into()))
        };
        let (Some(p), Some(r), Some(y)) = (concrete(tail), concrete(other), concrete(OutletId::new(add, 0))) else { continue };
        let f32t = f32::datum_type();
        if !(p.0 == f32t && r.0 == f32t && y.0 == f32t && p.1 == r.1 && r.1 == y.1) {
            continue;
        }
        let x = node.inputs[0];
        let name = model.node(add).name.clone();
        let mut patch = TypedModelPatch::new(format!("residual add into {}", node.name));
        let taps = [patch.tap_model(model, x)?, patch.tap_model(model, other)?];
        let out = patch.wire_node(name, ProductAdd { w }, &taps)?;
        patch.shunt_outside(model, OutletId::new(add, 0), out[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// f32 weights `[k, n]` packed for [`PackedF32::matmul`]: column blocks of [`NB`], each block
/// `k` rows of `NB` values (zero past `n`), and an optional bias (zero past `n`).
#[derive(Debug)]
pub struct PackedF32 {
    k: usize,
    n: usize,
    data: Arc<Vec<f32>>,
    bias: Option<Arc<Vec<f32>>>,
}

impl PackedF32 {
    /// Pack row-major `w` (`k` x `n`).
    pub fn new(w: &[f32], k: usize, n: usize) -> PackedF32 {
        assert_eq!(w.len(), k * n);
        let blocks = n.div_ceil(NB);
        let mut data = vec![0f32; blocks * k * NB];
        for (kk, row) in w.chunks_exact(n.max(1)).enumerate().take(k) {
            for (jb, cols) in row.chunks(NB).enumerate() {
                let at = (jb * k + kk) * NB;
                data[at..at + cols.len()].copy_from_slice(cols);
            }
        }
        PackedF32 { k, n, data: Arc::new(data), bias: None }
    }

    /// Pack `wt`, row-major `n` x `k` (the transposed weight of a `Gemm` with transB).
    pub fn new_transposed(wt: &[f32], k: usize, n: usize) -> PackedF32 {
        assert_eq!(wt.len(), k * n);
        let blocks = n.div_ceil(NB);
        let mut data = vec![0f32; blocks * k * NB];
        for (j, col) in wt.chunks_exact(k.max(1)).enumerate().take(n) {
            let (jb, jj) = (j / NB, j % NB);
            for (kk, &v) in col.iter().enumerate() {
                data[(jb * k + kk) * NB + jj] = v;
            }
        }
        PackedF32 { k, n, data: Arc::new(data), bias: None }
    }

    /// The same packed weights (shared), without a bias.
    fn clone_shared(&self) -> PackedF32 {
        PackedF32 { k: self.k, n: self.n, data: self.data.clone(), bias: None }
    }

    /// With this bias (`n` values) added to every row.
    pub fn with_bias(mut self, bias: &[f32]) -> PackedF32 {
        assert_eq!(bias.len(), self.n);
        let mut b = bias.to_vec();
        b.resize(self.blocks() * NB, 0.0);
        self.bias = Some(Arc::new(b));
        self
    }

    fn blocks(&self) -> usize {
        self.n.div_ceil(NB)
    }

    /// `out` (`m` x n) = `a` (`m` x k) times the weights (plus the bias); column blocks are
    /// split over `pool`'s threads when there is enough work.
    pub fn matmul(&self, a: &[f32], m: usize, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
        self.matmul_add(a, m, None, out, pool)
    }

    /// [`PackedF32::matmul`], plus `residual` (`m` x n) when given.
    pub fn matmul_add(&self, a: &[f32], m: usize, residual: Option<&[f32]>, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
        assert_eq!(a.len(), m * self.k);
        assert_eq!(out.len(), m * self.n);
        assert!(residual.is_none_or(|r| r.len() == m * self.n));
        let res = residual.map_or(std::ptr::null(), |r| r.as_ptr()) as usize;
        if m == 0 || self.n == 0 {
            return;
        }
        let out_ptr = SendPtr(out.as_mut_ptr());
        parallel::run_shares(pool, self.blocks(), m * self.k * self.n >= PARALLEL_MACS, |range| {
            // SAFETY: out has m x n values; each share writes the columns of its own blocks only
            unsafe { self.blocks_into(a, m, range, res as *const f32, out_ptr.get()) }
        });
    }

    /// Column blocks `range` of every row. SAFETY: `out` points to m x n writable values and no
    /// other thread writes these blocks' columns; `res` is null or m x n values.
    unsafe fn blocks_into(&self, a: &[f32], m: usize, range: std::ops::Range<usize>, res: *const f32, out: *mut f32) {
        let kern = kernels::kernels();
        let (k, n) = (self.k, self.n);
        // even row tiles of at most the kernel's rows
        let tiles = m.div_ceil(kern.f32_rows);
        let per = m.div_ceil(tiles);
        for jb in range {
            let w = self.data.as_ptr().add(jb * k * NB);
            let cols = NB.min(n - jb * NB);
            let bias = self.bias.as_ref().map_or(std::ptr::null(), |b| b.as_ptr().add(jb * NB));
            let mut r0 = 0;
            while r0 < m {
                let rows = per.min(m - r0);
                let (ap, op) = (a.as_ptr().add(r0 * k), out.add(r0 * n + jb * NB));
                let rp = if res.is_null() { res } else { res.add(r0 * n + jb * NB) };
                (kern.f32_block)(rows, ap, k, w, op, n, cols, bias, rp);
                r0 += rows;
            }
        }
    }
}

impl Weights for PackedF32 {
    const OP: &'static str = "MatMulF32";
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn describe(&self) -> String {
        format!("f32 weights {}x{}{}", self.k, self.n, if self.bias.is_some() { " + bias" } else { "" })
    }
    fn matmul(&self, a: &[f32], m: usize, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
        PackedF32::matmul(self, a, m, out, pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product in f64, and for each value the sum of its terms' magnitudes.
    fn reference(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0f32; m * n];
        let mut mag = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|kk| a[r * k + kk] as f64 * w[kk * n + j] as f64);
                let b = bias.map_or(0.0, |b| b[j] as f64);
                out[r * n + j] = (terms.clone().sum::<f64>() + b) as f32;
                mag[r * n + j] = (terms.map(f64::abs).sum::<f64>() + b.abs()) as f32;
            }
        }
        (out, mag)
    }

    #[test]
    fn matches_the_product_for_every_row_count_odd_sizes_both_layouts_and_threads() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut shapes: Vec<(usize, usize, usize)> = (1..=26).map(|m| (m, 19, 45)).collect();
        shapes.extend([(1, 1, 1), (50, 64, 96), (7, 130, 33), (50, 768, 200), (257, 40, 70), (3, 512, 8200)]);
        for (m, k, n) in shapes {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 255) as f32 - 127.0) / 64.0).collect();
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
            for (packed, b) in [
                (PackedF32::new(&w, k, n), None),
                (PackedF32::new_transposed(&wt, k, n), None),
                (PackedF32::new(&w, k, n).with_bias(&bias), Some(bias.as_slice())),
            ] {
                let (want, mag) = reference(&a, m, k, &w, n, b);
                let res: Vec<f32> = (0..m * n).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
                for pool in [None, Some(&pool)] {
                    let mut got = vec![f32::NAN; m * n];
                    packed.matmul(&a, m, &mut got, pool);
                    for (i, &g) in got.iter().enumerate() {
                        assert!((g - want[i]).abs() <= 1e-6 * (1.0 + mag[i]), "m {m} k {k} n {n} at {i}: {g} vs {}", want[i]);
                    }
                    packed.matmul_add(&a, m, Some(&res), &mut got, pool);
                    for (i, &g) in got.iter().enumerate() {
                        let w = want[i] + res[i];
                        assert!((g - w).abs() <= 1e-6 * (1.0 + mag[i] + res[i].abs()), "with residual: m {m} k {k} n {n} at {i}: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// A graph with every form the rewrite takes (MatMul + bias Add, a weight read by two
    /// products, a Gemm with transB and bias, a product whose output is also a graph output so
    /// its Add stays) runs the same with and without it.
    #[test]
    fn fused_graph_computes_what_the_onnx_graph_does() {
        use super::super::test_proto::{attr_int as attr_i, model, node, tensor, value_info, write_model};
        let vals = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 31 + seed * 17) % 97) as f32 - 48.0) / 40.0).collect() };
        let (m, k, n, n2) = (6usize, 40usize, 70usize, 33usize);
        let graph = pb::GraphProto {
            name: "g".into(),
            node: vec![
                node("MatMul", &["x", "w1"], "h", vec![]),
                node("Add", &["h", "b1"], "hb", vec![]),
                node("Gemm", &["hb", "w2t", "c2"], "y1", vec![attr_i("transB", 1)]),
                node("MatMul", &["x", "w1"], "y2", vec![]),
                node("MatMul", &["x", "w3"], "p3", vec![]),
                node("Add", &["b3", "p3"], "y3", vec![]),
                // a residual: made as the product is stored, after tract's optimisation
                node("MatMul", &["x", "w4"], "p4", vec![]),
                node("Add", &["r", "p4"], "y4", vec![]),
            ],
            initializer: vec![
                tensor("w1", &[k as i64, n as i64], &vals(k * n, 1)),
                tensor("b1", &[n as i64], &vals(n, 2)),
                tensor("w2t", &[n2 as i64, n as i64], &vals(n2 * n, 3)),
                tensor("c2", &[n2 as i64], &vals(n2, 4)),
                tensor("w3", &[k as i64, n as i64], &vals(k * n, 5)),
                tensor("b3", &[n as i64], &vals(n, 6)),
                tensor("w4", &[k as i64, n as i64], &vals(k * n, 9)),
            ],
            input: vec![value_info("x", &[m as i64, k as i64]), value_info("r", &[m as i64, n as i64])],
            output: vec![
                value_info("y1", &[m as i64, n2 as i64]),
                value_info("y2", &[m as i64, n as i64]),
                value_info("y3", &[m as i64, n as i64]),
                value_info("p3", &[m as i64, n as i64]),
                value_info("y4", &[m as i64, n as i64]),
            ],
            ..Default::default()
        };
        let model = model(graph);
        // what the rewrite does to the protobuf
        let mut proto = model.clone();
        let fused = fuse_f32_weights(&mut proto);
        assert_eq!((fused.products, fused.with_bias), (5, 2), "every product fused, two with their bias");
        let g = proto.graph.as_ref().unwrap();
        assert_eq!(g.node.iter().filter(|n| n.op_type == "Add").count(), 2, "b1's Add folded, y3's kept (p3 is an output), y4's left");
        assert!(g.initializer.iter().all(|t| t.name == "b3"), "weights and folded biases leave the protobuf");
        drop(fused);

        let (_dir, path) = write_model(&model);
        let x = tract_ndarray::Array2::from_shape_vec((m, k), vals(m * k, 7)).unwrap();
        let r = tract_ndarray::Array2::from_shape_vec((m, n), vals(m * n, 8)).unwrap();
        let run = |ours: bool| -> Vec<Vec<f32>> {
            let typed = super::super::load_onnx_with(&path, super::super::Rewrites { ours: true, f32_products: ours, int8_products: false })
                .unwrap()
                .into_typed()
                .unwrap();
            let named = typed.nodes().iter().filter(|n| n.op.name() == "MatMulF32").count();
            assert_eq!(named, if ours { 5 } else { 0 });
            let optimized = super::super::optimize(typed, true).unwrap();
            let adds = optimized.nodes().iter().filter(|n| n.op.name() == "MatMulF32Add").count();
            assert_eq!(adds, usize::from(ours), "the residual add made with its product");
            let plan = optimized.into_runnable().unwrap();
            let out = plan.run(tvec!(x.clone().into_tensor().into(), r.clone().into_tensor().into())).unwrap();
            out.iter().map(|t| t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()).collect()
        };
        let (ours, theirs) = (run(true), run(false));
        assert_eq!(ours.len(), 5);
        for (o, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a.len(), b.len());
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "output {o} value {i}: {p} vs {q}");
            }
        }
    }

    /// Patch-embedding convolutions (square and oblong kernels, image sides that leave a
    /// remainder, with and without bias, a batch of two) run the same with and without the
    /// rewrite; a padded one is left to tract.
    #[test]
    fn patch_convolutions_compute_what_the_onnx_conv_does() {
        use super::super::test_proto::{attr_ints as ints, model, node, tensor, value_info, write_model};
        let vals = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 31 + seed * 17) % 97) as f32 - 48.0) / 40.0).collect() };
        let (b, c, h, w, o) = (2i64, 3i64, 13i64, 11i64, 37i64);
        let graph = pb::GraphProto {
            name: "g".into(),
            node: vec![
                node("Conv", &["x", "w1", "b1"], "y1", vec![ints("kernel_shape", &[4, 4]), ints("strides", &[4, 4])]),
                node("Conv", &["x", "w2"], "y2", vec![ints("strides", &[2, 3]), ints("pads", &[0, 0, 0, 0]), ints("dilations", &[1, 1])]),
                node("Conv", &["x", "w1"], "y3", vec![ints("strides", &[4, 4]), ints("pads", &[1, 1, 1, 1])]),
            ],
            initializer: vec![
                tensor("w1", &[o, c, 4, 4], &vals((o * c * 16) as usize, 1)),
                tensor("b1", &[o], &vals(o as usize, 2)),
                tensor("w2", &[5, c, 2, 3], &vals((5 * c * 6) as usize, 3)),
            ],
            input: vec![value_info("x", &[b, c, h, w])],
            output: vec![value_info("y1", &[b, o, 3, 2]), value_info("y2", &[b, 5, 6, 3]), value_info("y3", &[b, o, 4, 3])],
            ..Default::default()
        };
        let model = model(graph);
        let mut proto = model.clone();
        let fused = fuse_f32_weights(&mut proto);
        assert_eq!((fused.products, fused.with_bias), (2, 1), "the two unpadded convolutions, one with its bias");
        drop(fused);
        let (_dir, path) = write_model(&model);
        let x = tract_ndarray::Array4::from_shape_vec((b as usize, c as usize, h as usize, w as usize), vals((b * c * h * w) as usize, 7)).unwrap();
        let run = |ours: bool| -> Vec<Vec<f32>> {
            let typed = super::super::load_onnx_with(&path, super::super::Rewrites { ours: true, f32_products: ours, int8_products: false })
                .unwrap()
                .into_typed()
                .unwrap();
            assert_eq!(typed.nodes().iter().filter(|n| n.op.name() == "PatchEmbed").count(), if ours { 2 } else { 0 });
            let plan = typed.into_optimized().unwrap().into_runnable().unwrap();
            let out = plan.run(tvec!(x.clone().into_tensor().into())).unwrap();
            out.iter().map(|t| t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()).collect()
        };
        let (ours, theirs) = (run(true), run(false));
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a.len(), b.len(), "output {i}");
            for (j, (p, q)) in a.iter().zip(b).enumerate() {
                assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "output {i} value {j}: {p} vs {q}");
            }
        }
    }
}
