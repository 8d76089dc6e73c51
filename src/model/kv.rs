//! The decoder step's attention with its KV cache kept in place, and its cross-attention read
//! straight from the image's keys and values.
//!
//! The exported `decoder_step` takes the self-attention caches as an input
//! (`self_kv [layers, 2, batch, heads, past, head_dim]`), concatenates each layer's new key and
//! value to them and returns the grown caches as an output: every step copies the whole past
//! twice (in the graph's Concat and again in its output stack), and beam search reorders it with
//! a third copy. Its cross-attention multiplies by keys cut out of the `cross_kv` input, which
//! tract repacks at every step (B/32: about 12 MB per step, the same for every token).
//!
//! [`cache_in_place`] rewrites the graph at load (the file on disk is unchanged):
//! - each self-attention core, `MatMul(q, Transpose(Concat(past_k, k))) · scale + mask ->
//!   Softmax -> MatMul(·, Concat(past_v, v))`, becomes one [`CachedAttention`] node reading
//!   `(q, k, v, scale, mask, kv_rows)`. Its op state (one per node, in the run state the caller
//!   keeps for a caption) holds the layer's keys and values, `[rows, heads, capacity, head_dim]`,
//!   allocated once and grown geometrically; each step writes the new keys and values of sequence
//!   `i` in row `i` at their positions, and attends over the past through `kv_rows [batch, total]`:
//!   position `j` of sequence `i` is in row `kv_rows[i, j]`. Beam search reorders sequences by
//!   rewriting that small table (no copy of the cache): every (row, position) is written once,
//!   at the step of that position, so rows can share their history.
//! - the `self_kv` input becomes `kv_rows` (int64, the key mask's shape), the `self_kv_out` output
//!   goes, and the past length the positions need is read from the key mask and ids instead.
//! - each cross-attention core, `MatMul(q, Transpose(cross_kv[m, 0])) · scale -> Softmax ->
//!   MatMul(·, cross_kv[m, 1])`, becomes one [`CrossAttention`] node reading `cross_kv` whole, in
//!   place.
//!
//! Both compute each (sequence, head) with the kernel table's decoder attention, split over the
//! executor's threads when the work pays for it. A graph that does not have this shape exactly is
//! left as it is (and captions go through the copying path).

use std::collections::{HashMap, HashSet};

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, ModelProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

use crate::kernels::{self, parallel, SendPtr};

/// Our self-attention-with-cache node (never in a graph on disk).
pub const SELF_OP: &str = "CocaCachedAttention";
/// Our cross-attention node (never in a graph on disk).
pub const CROSS_OP: &str = "CocaCrossAttention";
/// The input that replaces `self_kv`: the cache row of each sequence's each position.
pub const ROWS: &str = "kv_rows";
/// The graph's cache input and output (export.py's names).
const SELF_KV: &str = "self_kv";
const SELF_KV_OUT: &str = "self_kv_out";
const CROSS_KV: &str = "cross_kv";

/// What [`cache_in_place`] rewrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InPlace {
    pub self_attention: usize,
    pub cross_attention: usize,
}

fn std_op(n: &NodeProto, op: &str) -> bool {
    n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx")
}

fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn attr_ints<'a>(n: &'a NodeProto, name: &str) -> Option<&'a [i64]> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.ints.as_slice())
}

/// A scalar integer held inline by `t`.
fn scalar_int(t: &pb::TensorProto) -> Option<i64> {
    if !t.dims.is_empty() || t.data_location == Some(1) || !t.external_data.is_empty() {
        return None;
    }
    match t.data_type {
        7 if t.raw_data.len() == 8 => Some(i64::from_le_bytes(t.raw_data[..].try_into().ok()?)),
        7 if t.int64_data.len() == 1 => Some(t.int64_data[0]),
        6 if t.raw_data.len() == 4 => Some(i32::from_le_bytes(t.raw_data[..].try_into().ok()?) as i64),
        6 if t.int32_data.len() == 1 => Some(t.int32_data[0] as i64),
        _ => None,
    }
}

/// The graph as the rewrite reads it: who makes and who reads each name.
struct Index<'g> {
    nodes: &'g [NodeProto],
    producer: HashMap<&'g str, usize>,
    readers: HashMap<&'g str, Vec<usize>>,
    /// reads of each name by nodes, subgraphs and graph outputs
    reads: HashMap<String, usize>,
    inits: HashMap<&'g str, &'g pb::TensorProto>,
}

impl<'g> Index<'g> {
    fn new(graph: &'g pb::GraphProto) -> Index<'g> {
        let mut producer = HashMap::new();
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for inp in n.input.iter().filter(|s| !s.is_empty()) {
                readers.entry(inp.as_str()).or_default().push(i);
            }
        }
        let mut reads = HashMap::new();
        super::w8::count_reads(graph, &mut reads);
        for o in &graph.output {
            *reads.entry(o.name.clone()).or_default() += 1;
        }
        let inits = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        Index { nodes: &graph.node, producer, readers, reads, inits }
    }

    fn readers(&self, name: &str) -> &[usize] {
        self.readers.get(name).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The one node reading `name`, when nothing else (no other node, subgraph or output) does.
    fn only_reader(&self, name: &str) -> Option<usize> {
        match self.readers(name) {
            [r] if self.reads.get(name) == Some(&1) => Some(*r),
            _ => None,
        }
    }

    /// Every read of `name` is by a top-level node (none in a subgraph).
    fn read_at_top_level_only(&self, name: &str) -> bool {
        self.reads.get(name).copied().unwrap_or(0) == self.readers(name).len()
    }

    /// A scalar integer constant (a Constant node's value or an initializer).
    fn const_int(&self, name: &str) -> Option<i64> {
        if let Some(t) = self.inits.get(name) {
            return scalar_int(t);
        }
        let n = &self.nodes[*self.producer.get(name)?];
        if !std_op(n, "Constant") {
            return None;
        }
        let a = n.attribute.iter().find(|a| a.name == "value" || a.name == "value_int")?;
        if a.name == "value_int" {
            return Some(a.i);
        }
        scalar_int(a.t.as_ref()?)
    }

    /// `Gather(from, constant scalar, axis 0)`: the index.
    fn gather_index(&self, i: usize, from: &str) -> Option<i64> {
        let n = &self.nodes[i];
        (std_op(n, "Gather") && n.input.len() == 2 && n.output.len() == 1 && n.input[0] == from && attr_i(n, "axis").unwrap_or(0) == 0)
            .then(|| self.const_int(&n.input[1]))
            .flatten()
    }

    /// `Transpose` swapping the last two of four axes.
    fn is_kt(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        std_op(n, "Transpose") && n.output.len() == 1 && attr_ints(n, "perm") == Some(&[0, 1, 3, 2])
    }

    fn softmax_last(&self, i: usize, opset: i64) -> bool {
        let n = &self.nodes[i];
        // the last axis: written as -1, or 3 of four (from opset 13 the default is -1)
        let axis = attr_i(n, "axis").unwrap_or(if opset >= 13 { -1 } else { 1 });
        std_op(n, "Softmax") && n.output.len() == 1 && (axis == -1 || axis == 3)
    }

    fn matmul(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        std_op(n, "MatMul") && n.input.len() == 2 && n.output.len() == 1
    }

    /// `Mul` or `Add` of `x` by another tensor: that tensor.
    fn binary_other(&self, i: usize, op: &str, x: &str) -> Option<String> {
        let n = &self.nodes[i];
        if !std_op(n, op) || n.input.len() != 2 || n.output.len() != 1 {
            return None;
        }
        match (n.input[0] == x, n.input[1] == x) {
            (true, false) => Some(n.input[1].clone()),
            (false, true) => Some(n.input[0].clone()),
            _ => None,
        }
    }
}

/// One attention core found: the node that becomes ours, its new inputs, the nodes that go.
struct Core {
    first: usize,
    inputs: Vec<String>,
    output: String,
    drop: Vec<usize>,
    op: &'static str,
    layer: Option<i64>,
}

/// From the scores product `mm` (whose second operand is the keys): `· scale (+ mask) ->
/// Softmax -> MatMul(·, values)`, each intermediate read once. (scale, mask, softmax, product).
fn core_after(ix: &Index, mm: usize, values: &str, masked: bool, opset: i64) -> Option<(String, Option<String>, Vec<usize>, String)> {
    let out = |i: usize| ix.nodes[i].output[0].as_str();
    let mul = ix.only_reader(out(mm))?;
    let scale = ix.binary_other(mul, "Mul", out(mm))?;
    let (mask, before_softmax) = if masked {
        let add = ix.only_reader(out(mul))?;
        (Some(ix.binary_other(add, "Add", out(mul))?), add)
    } else {
        (None, mul)
    };
    let sm = ix.only_reader(out(before_softmax))?;
    if !ix.softmax_last(sm, opset) {
        return None;
    }
    let mm2 = ix.only_reader(out(sm))?;
    let n2 = &ix.nodes[mm2];
    if !ix.matmul(mm2) || n2.input[0] != out(sm) || n2.input[1] != values {
        return None;
    }
    let mut drop = vec![mul, sm, mm2];
    if before_softmax != mul {
        drop.push(before_softmax);
    }
    Some((scale, mask, drop, n2.output[0].clone()))
}

/// Rewrite an exported `decoder_step` so its self-attention caches stay in the op states and its
/// cross-attention reads `cross_kv` in place (module docs). Returns `None`, the graph untouched,
/// when it is not exactly the shape export.py writes.
pub fn cache_in_place(proto: &mut ModelProto) -> Option<InPlace> {
    let opset = proto.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version).unwrap_or(0);
    let graph = proto.graph.as_mut()?;
    // the ops compute in f32
    if super::attn::other_floats(graph) {
        return None;
    }
    let input = |n: &str| graph.input.iter().position(|i| i.name == n);
    let (kv_in, mask_in) = (input(SELF_KV)?, input("key_mask")?);
    input("ids")?;
    let kv_out = graph.output.iter().position(|o| o.name == SELF_KV_OUT)?;
    let ix = Index::new(graph);
    let out = |i: usize| ix.nodes[i].output[0].as_str();
    if !ix.read_at_top_level_only(SELF_KV) {
        return None;
    }

    // every read of self_kv: the past length (Shape -> Gather 4), or a layer's cache
    let mut past_reads: Vec<usize> = Vec::new();
    let mut layers: Vec<(i64, usize)> = Vec::new();
    for &r in ix.readers(SELF_KV) {
        let n = &ix.nodes[r];
        if std_op(n, "Shape") && n.input.len() == 1 && n.output.len() == 1 && n.attribute.is_empty() {
            if !ix.read_at_top_level_only(out(r)) {
                return None;
            }
            for &g in ix.readers(out(r)) {
                if ix.gather_index(g, out(r)) != Some(4) {
                    return None;
                }
                past_reads.push(g);
            }
        } else if let Some(l) = ix.gather_index(r, SELF_KV) {
            layers.push((l, r));
        } else {
            return None;
        }
    }
    if layers.is_empty() {
        return None;
    }

    let mut cores: Vec<Core> = Vec::new();
    for &(_, g) in &layers {
        // the layer's past keys (0) and values (1), each concatenated to the new ones on axis 2
        let mut cats: [Option<usize>; 2] = [None, None];
        if !ix.read_at_top_level_only(out(g)) {
            return None;
        }
        for &r in ix.readers(out(g)) {
            let c = ix.gather_index(r, out(g))?;
            let cat = ix.only_reader(out(r))?;
            let n = &ix.nodes[cat];
            let ok = std_op(n, "Concat") && n.input.len() == 2 && n.output.len() == 1 && n.input[0] == out(r) && attr_i(n, "axis") == Some(2);
            if !ok || !(0..2).contains(&c) || cats[c as usize].replace(cat).is_some() {
                return None;
            }
        }
        let [Some(kcat), Some(vcat)] = cats else { return None };
        // keys: Transpose -> scores product (the cache output's stack may read the Concat too)
        let t = *ix.readers(out(kcat)).iter().find(|&&r| ix.is_kt(r))?;
        let mm = ix.only_reader(out(t))?;
        if !ix.matmul(mm) || ix.nodes[mm].input[1] != out(t) {
            return None;
        }
        let (scale, mask, drop, output) = core_after(&ix, mm, out(vcat), true, opset)?;
        let (k, v) = (ix.nodes[kcat].input[1].clone(), ix.nodes[vcat].input[1].clone());
        let q = ix.nodes[mm].input[0].clone();
        cores.push(Core { first: mm, inputs: vec![q, k, v, scale, mask?, ROWS.to_string()], output, drop, op: SELF_OP, layer: None });
    }
    let self_attention = cores.len();

    // cross-attention cores, where the graph has them in this shape (each one independent)
    if input(CROSS_KV).is_some() && ix.read_at_top_level_only(CROSS_KV) {
        for &r in ix.readers(CROSS_KV) {
            let Some(m) = ix.gather_index(r, CROSS_KV) else { continue };
            let (mut kg, mut vg) = (None, None);
            for &rr in ix.readers(out(r)) {
                match ix.gather_index(rr, out(r)) {
                    Some(0) => kg = Some(rr),
                    Some(1) => vg = Some(rr),
                    _ => {}
                }
            }
            let (Some(kg), Some(vg)) = (kg, vg) else { continue };
            let Some(t) = ix.only_reader(out(kg)).filter(|&t| ix.is_kt(t)) else { continue };
            let Some(mm) = ix.only_reader(out(t)).filter(|&mm| ix.matmul(mm) && ix.nodes[mm].input[1] == out(t)) else { continue };
            let Some((scale, _, drop, output)) = core_after(&ix, mm, out(vg), false, opset) else { continue };
            let q = ix.nodes[mm].input[0].clone();
            cores.push(Core { first: mm, inputs: vec![q, CROSS_KV.to_string(), scale], output, drop, op: CROSS_OP, layer: Some(m) });
        }
    }
    let cross_attention = cores.len() - self_attention;

    // the new node list (the weights stay where they are: only nodes are copied)
    let mut nodes: Vec<NodeProto> = ix.nodes.to_vec();
    // each core's node takes the place of its last (every input is made before it) and the
    // others go
    let place = |c: &Core| *c.drop.iter().max().expect("a core drops nodes");
    let gone: HashSet<usize> = cores.iter().flat_map(|c| c.drop.iter().copied().chain([c.first]).filter(move |&i| i != place(c))).collect();
    for c in &cores {
        let n = &mut nodes[place(c)];
        n.op_type = c.op.to_string();
        n.domain = String::new();
        n.input = c.inputs.clone();
        n.output = vec![c.output.clone()];
        n.attribute.clear();
        if let Some(m) = c.layer {
            n.attribute.push(pb::AttributeProto { name: "layer".into(), r#type: 2, i: m, ..Default::default() });
        }
    }
    // past = total (key mask's axis 1) - step (ids' axis 1)
    let name = |s: &str| format!("coca_kv_{s}");
    let node = |op: &str, inputs: &[String], output: String| NodeProto {
        op_type: op.into(),
        input: inputs.to_vec(),
        output: vec![output.clone()],
        name: output,
        ..Default::default()
    };
    for &g in &past_reads {
        let o = nodes[g].output[0].clone();
        nodes[g] = node("Sub", &[name("total"), name("step")], o);
    }
    let mut head = vec![
        node("Shape", &["key_mask".into()], name("mask_shape")),
        node("Gather", &[name("mask_shape"), name("one")], name("total")),
        node("Shape", &["ids".into()], name("ids_shape")),
        node("Gather", &[name("ids_shape"), name("one")], name("step")),
    ];
    let mut kept: Vec<NodeProto> = nodes.into_iter().enumerate().filter(|(i, _)| !gone.contains(i)).map(|(_, n)| n).collect();
    head.append(&mut kept);
    let mut nodes = head;

    // drop what no output needs any more (the concatenations and the cache output's stack)
    let mut needed: HashSet<String> = graph.output.iter().enumerate().filter(|&(i, _)| i != kv_out).map(|(_, o)| o.name.clone()).collect();
    let mut keep = vec![false; nodes.len()];
    for (i, n) in nodes.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
            for a in &n.attribute {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    super::w8::names_read(sub, &mut needed);
                }
            }
        }
    }
    if needed.contains(SELF_KV) {
        return None;
    }
    let mut i = 0;
    nodes.retain(|_| {
        i += 1;
        keep[i - 1]
    });

    graph.node = nodes;
    graph.initializer.push(pb::TensorProto { name: name("one"), dims: vec![], data_type: 7, raw_data: 1i64.to_le_bytes().to_vec(), ..Default::default() });
    let mut rows = graph.input[mask_in].clone();
    rows.name = ROWS.into();
    if let Some(pb::type_proto::Value::TensorType(t)) = rows.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        t.elem_type = 7;
    }
    graph.input[kv_in] = rows;
    graph.output.remove(kv_out);
    Some(InPlace { self_attention, cross_attention })
}

pub fn parse_self(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    ensure!(node.input.len() == 6, "{SELF_OP} takes six inputs");
    Ok((expand(CachedAttention), vec![]))
}

pub fn parse_cross(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    ensure!(node.input.len() == 3, "{CROSS_OP} takes three inputs");
    let layer = attr_i(node, "layer").context("CrossAttention without its layer")?;
    ensure!(layer >= 0, "CrossAttention of layer {layer}");
    Ok((expand(CrossAttention { layer: layer as usize }), vec![]))
}

/// Shape rules shared by both ops: f32 out, shaped like the queries (input 0).
fn like_queries<'r, 'p: 'r>(s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy], arity: usize) -> InferenceResult {
    check_input_arity(inputs, arity)?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    s.equals(&inputs[0].rank, 4)?;
    s.equals(&outputs[0].shape, &inputs[0].shape)?;
    Ok(())
}

fn typed_like_queries(inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
    ensure!(inputs[0].datum_type == f32::datum_type() && inputs[0].rank() == 4, "decoder attention takes f32 queries [batch, heads, step, head_dim]");
    Ok(tvec!(f32::fact(inputs[0].shape.clone())))
}

fn scalar_f32(x: &TValue) -> TractResult<f32> {
    ensure!(x.len() == 1, "decoder attention: the scale has {} values", x.len());
    x.cast_to_scalar::<f32>()
}

/// Per-thread buffers of the slices: the scores, the key offsets.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    keys: Vec<usize>,
}

/// Runs `each(slice, scratch, out)` for `slices` (sequence, head) pairs, each writing its own
/// `per` values of `out`, over the executor's threads when there is enough `work`.
fn over_slices(slices: usize, per: usize, work: usize, out: &mut [f32], each: impl Fn(usize, &mut Scratch, &mut [f32]) + Sync) {
    let ptr = SendPtr(out.as_mut_ptr());
    super::product::with_executor_pool(|pool| {
        // (one slice of a B/32 step is a few thousand multiply-adds: split only many of them)
        parallel::run_shares(pool, slices, work >= 1 << 20, |range| {
            let mut scratch = Scratch::default();
            for i in range {
                // SAFETY: slice i writes only its own `per` values of `out`
                let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(i * per), per) };
                each(i, &mut scratch, o);
            }
        });
    });
}

/// Self-attention over the cached past and the step's new keys and values (module docs).
/// Inputs: q, k, v `[batch, heads, step, head_dim]`, the scale, the additive mask `[1 or batch,
/// 1 or heads, step, total]`, `kv_rows [batch, total]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CachedAttention;

impl Expansion for CachedAttention {
    fn name(&self) -> StaticName {
        "CachedAttention".into()
    }
    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        like_queries(s, inputs, outputs, 6)
    }
    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for CachedAttention {
    fn name(&self) -> StaticName {
        "CachedAttention".into()
    }
    op_as_typed_op!();
}

impl EvalOp for CachedAttention {
    not_out_of_plan!();

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::<Cache>::default()))
    }
}

impl TypedOp for CachedAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        typed_like_queries(inputs)
    }
    as_op!();
}

/// One layer's keys and values, `[rows, heads, cap, d]` each (the op state of a
/// [`CachedAttention`] node in one run state).
#[derive(Debug, Clone, Default)]
pub struct Cache {
    k: Vec<f32>,
    v: Vec<f32>,
    rows: usize,
    heads: usize,
    cap: usize,
    d: usize,
}

impl Cache {
    /// Room for `rows` rows of `cap` positions: grown (doubling the positions) as needed, the
    /// held values kept.
    fn reserve(&mut self, rows: usize, heads: usize, cap: usize, d: usize) -> TractResult<()> {
        if self.rows == 0 {
            *self = Cache { heads, d, ..Cache::default() };
        }
        ensure!(heads == self.heads && d == self.d, "kv cache of {} heads x {} values given {heads} x {d}", self.heads, self.d);
        if cap > self.cap {
            let new_cap = cap.max(2 * self.cap).max(32);
            let block = new_cap * d;
            for buf in [&mut self.k, &mut self.v] {
                let mut grown = vec![0f32; self.rows.max(rows) * heads * block];
                if self.cap * d > 0 {
                    for (i, old) in buf.chunks_exact(self.cap * d).enumerate() {
                        grown[i * block..i * block + old.len()].copy_from_slice(old);
                    }
                }
                *buf = grown;
            }
            self.cap = new_cap;
            self.rows = self.rows.max(rows);
        }
        if rows > self.rows {
            let len = rows * heads * self.cap * d;
            self.k.resize(len, 0.0);
            self.v.resize(len, 0.0);
            self.rows = rows;
        }
        Ok(())
    }

    /// Where (row, head, position) starts.
    fn at(&self, row: usize, h: usize, pos: usize) -> usize {
        ((row * self.heads + h) * self.cap + pos) * self.d
    }
}

impl OpState for Cache {
    fn eval(&mut self, _ctx: &EvalContext, _op: &dyn Op, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v, scale, mask, rows) = args_6!(inputs);
        let [b, h, s, d] = *q.shape() else { bail!("CachedAttention: queries of shape {:?}", q.shape()) };
        ensure!(k.shape() == q.shape() && v.shape() == q.shape(), "CachedAttention: q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape());
        let (rs, ms) = (rows.shape(), mask.shape());
        ensure!(rs.len() == 2 && rs[0] == b && rs[1] >= s, "CachedAttention: kv_rows of shape {rs:?} for batch {b}, step {s}");
        let t = rs[1];
        let past = t - s;
        ensure!(
            ms.len() == 4 && (ms[0] == 1 || ms[0] == b) && (ms[1] == 1 || ms[1] == h) && ms[2] == s && ms[3] == t,
            "CachedAttention: mask of shape {ms:?} for batch {b}, heads {h}, step {s}, total {t}"
        );
        let scale = scalar_f32(&scale)?;
        let rows = rows.cast_to::<i64>()?;
        let rows_view = rows.try_as_plain_ram()?;
        let rows = rows_view.as_slice::<i64>()?;
        let (qp, kp, vp, mp) = (q.try_as_plain_ram()?, k.try_as_plain_ram()?, v.try_as_plain_ram()?, mask.try_as_plain_ram()?);
        let (q, k, v, mask) = (qp.as_slice::<f32>()?, kp.as_slice::<f32>()?, vp.as_slice::<f32>()?, mp.as_slice::<f32>()?);
        self.reserve(b, h, t, d)?;
        for i in 0..b {
            for (j, &r) in rows[i * t..i * t + past].iter().enumerate() {
                ensure!(r >= 0 && (r as usize) < self.rows, "kv_rows[{i}, {j}] = {r}: the cache holds {} rows", self.rows);
            }
        }
        // the step's keys and values, in place
        for i in 0..b {
            for hh in 0..h {
                let src = ((i * h + hh) * s) * d;
                let dst = self.at(i, hh, past);
                self.k[dst..dst + s * d].copy_from_slice(&k[src..src + s * d]);
                self.v[dst..dst + s * d].copy_from_slice(&v[src..src + s * d]);
            }
        }
        let mut y = Tensor::zero::<f32>(&[b, h, s, d])?;
        let mut yv = y.try_as_plain_ram_mut()?;
        let attend = kernels::kernels().decoder_attention;
        let cache = &*self;
        over_slices(b * h, s * d, b * h * s * t * d * 2, yv.as_slice_mut::<f32>()?, |slice, sc, o| {
            let (i, hh) = (slice / h, slice % h);
            sc.keys.clear();
            sc.keys.extend((0..t).map(|j| cache.at(if j < past { rows[i * t + j] as usize } else { i }, hh, j)));
            let m = ((if ms[0] == 1 { 0 } else { i }) * ms[1] + if ms[1] == 1 { 0 } else { hh }) * s * t;
            let q = &q[slice * s * d..(slice + 1) * s * d];
            attend(q, d, &cache.k, &cache.v, &sc.keys, &mask[m..m + s * t], scale, o, &mut sc.scores);
        });
        Ok(tvec!(y.into_tvalue()))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("CachedAttention keeps one cache per run state, not per lane")
    }
}

/// Attention of the step's queries over one cross-attention layer's keys and values, read in
/// place from `cross_kv [layers, 2, 1 or batch, heads, tokens, head_dim]`. Inputs: q `[batch,
/// heads, step, head_dim]`, cross_kv, the scale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CrossAttention {
    layer: usize,
}

impl Expansion for CrossAttention {
    fn name(&self) -> StaticName {
        "CrossAttention".into()
    }
    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        like_queries(s, inputs, outputs, 3)
    }
    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for CrossAttention {
    fn name(&self) -> StaticName {
        "CrossAttention".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("layer {}", self.layer)])
    }
    op_as_typed_op!();
}

impl EvalOp for CrossAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, kv, scale) = args_3!(inputs);
        let [b, h, s, d] = *q.shape() else { bail!("CrossAttention: queries of shape {:?}", q.shape()) };
        let ks = kv.shape();
        ensure!(
            ks.len() == 6 && self.layer < ks[0] && ks[1] == 2 && (ks[2] == 1 || ks[2] == b) && ks[3] == h && ks[5] == d,
            "CrossAttention: cross_kv of shape {ks:?} for layer {}, batch {b}, heads {h}, head size {d}",
            self.layer
        );
        let (bc, n) = (ks[2], ks[4]);
        let scale = scalar_f32(&scale)?;
        let (qp, kvp) = (q.try_as_plain_ram()?, kv.try_as_plain_ram()?);
        let (q, kv) = (qp.as_slice::<f32>()?, kvp.as_slice::<f32>()?);
        let keys: Vec<usize> = (0..n).map(|j| j * d).collect();
        let block = n * d;
        let base = |kind: usize, i: usize, hh: usize| (((self.layer * 2 + kind) * bc + if bc == 1 { 0 } else { i }) * h + hh) * block;
        let mut y = Tensor::zero::<f32>(&[b, h, s, d])?;
        let mut yv = y.try_as_plain_ram_mut()?;
        let ys = yv.as_slice_mut::<f32>()?;
        let attend = kernels::kernels().decoder_attention;
        if bc == 1 {
            // one image for every sequence: per head, all the sequences' queries at once, so each
            // key and value row is read once for all the beams
            let ptr = SendPtr(ys.as_mut_ptr());
            let per = s * d;
            super::product::with_executor_pool(|pool| {
                parallel::run_shares(pool, h, b * h * s * n * d * 2 >= 1 << 20, |range| {
                    let (mut qs, mut os, mut scores) = (vec![0f32; b * per], vec![0f32; b * per], Vec::new());
                    for hh in range {
                        for i in 0..b {
                            let at = (i * h + hh) * per;
                            qs[i * per..(i + 1) * per].copy_from_slice(&q[at..at + per]);
                        }
                        let (kb, vb) = (base(0, 0, hh), base(1, 0, hh));
                        attend(&qs, d, &kv[kb..kb + block], &kv[vb..vb + block], &keys, &[], scale, &mut os, &mut scores);
                        for i in 0..b {
                            // SAFETY: head hh of sequence i is written by this share only
                            let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add((i * h + hh) * per), per) };
                            o.copy_from_slice(&os[i * per..(i + 1) * per]);
                        }
                    }
                });
            });
        } else {
            over_slices(b * h, s * d, b * h * s * n * d * 2, ys, |slice, sc, o| {
                let (i, hh) = (slice / h, slice % h);
                let (kb, vb) = (base(0, i, hh), base(1, i, hh));
                let q = &q[slice * s * d..(slice + 1) * s * d];
                attend(q, d, &kv[kb..kb + block], &kv[vb..vb + block], &keys, &[], scale, o, &mut sc.scores);
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for CrossAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        typed_like_queries(inputs)
    }
    as_op!();
}
