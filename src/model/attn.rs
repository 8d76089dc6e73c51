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
//!
//! tract then surrounds the op with copies: the export cuts q, k and v out of one projection
//! output with reshapes, transposes, gathers and scalar scalings, and puts the result back in
//! token order with another transpose (six copies per block). After tract's optimisation,
//! [`absorb_layouts`] traces each operand back through those ops to the buffer it was cut from,
//! and the op reads it there through a strided [`View`] (scalings folded into the scores' or the
//! result's factor) and writes its result in the order of the transposes after it.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{ModelProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

use crate::kernels::{self, parallel, Mat, Scratch, SendPtr};

/// The op name our rewrite gives fused nodes (never in a graph on disk).
pub const FUSED_OP: &str = "CocaAttention";

/// Rewrite every `MatMul(a, b) -> Softmax(axis -1) -> MatMul(·, v)` chain of the top-level graph
/// whose intermediates have no other reader into one `CocaAttention(a, b, v)` node. Returns how
/// many were fused.
pub fn fuse_attention(proto: &mut ModelProto) -> usize {
    use std::collections::{HashMap, HashSet};
    let Some(graph) = proto.graph.as_mut() else { return 0 };
    let std_domain = |n: &NodeProto| n.domain.is_empty() || n.domain == "ai.onnx";
    // the op computes in f32
    if other_floats(graph) {
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

/// The graph holds float types other than f32 (an f16 variant with f32 inputs and outputs casts
/// its activations to f16): our f32 ops leave it alone.
pub(crate) fn other_floats(graph: &tract_onnx::pb::GraphProto) -> bool {
    const OTHER_FLOATS: [i32; 3] = [10, 11, 16]; // float16, double, bfloat16
    graph.initializer.iter().any(|t| OTHER_FLOATS.contains(&t.data_type))
        || graph.node.iter().any(|n| n.op_type == "Cast" && n.attribute.iter().any(|a| a.name == "to" && OTHER_FLOATS.contains(&(a.i as i32))))
}

pub fn parse(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    ensure!(node.input.len() == 3, "{FUSED_OP} takes three inputs");
    Ok((expand(Attention { layout: None }), vec![]))
}

/// `softmax(a b, last axis) v` for `a [.., l, d]`, `b [.., d, l2]`, `v [.., l2, dv]` with the
/// same leading dims. As parsed, the three inputs are these operands, contiguous; after
/// [`absorb_layouts`] they may be the buffers the operands were cut from ([`Layout`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attention {
    layout: Option<Layout>,
}

/// Where the operands are in the op's inputs and where the result goes in its output, with the
/// factor the scores are multiplied by before the softmax.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The shapes of the three inputs.
    sources: [TVec<usize>; 3],
    /// `a` ([.., l, d]) in input 0, `b` ([.., d, l2]) in input 1, `v` ([.., l2, dv]) in input 2.
    operands: [View; 3],
    /// The output's shape, and the result ([.., l, dv]) in it.
    out_shape: TVec<usize>,
    out: View,
    /// The scores' factor (scalings met on the way of `a` and `b`), as f32 bits (1.0 for none).
    scale: u32,
    /// The result's factor (scalings met on the way of `v`), as f32 bits.
    out_scale: u32,
}

impl Layout {
    /// The operands as the inputs themselves, the result as the output.
    fn natural(shapes: [&[usize]; 3]) -> TractResult<Layout> {
        let [a, b, v] = shapes;
        let r = a.len();
        ensure!(r >= 2 && b.len() == r && v.len() == r, "Attention: ranks {a:?} {b:?} {v:?}");
        ensure!(b[..r - 2] == a[..r - 2] && v[..r - 2] == a[..r - 2] && b[r - 2] == a[r - 1] && v[r - 2] == b[r - 1], "Attention: shapes {a:?} {b:?} {v:?}");
        let mut out_shape: TVec<usize> = a.into();
        out_shape[r - 1] = v[r - 1];
        Ok(Layout {
            sources: [a.into(), b.into(), v.into()],
            operands: [View::natural(a), View::natural(b), View::natural(v)],
            out: View::natural(&out_shape),
            out_shape,
            scale: 1f32.to_bits(),
            out_scale: 1f32.to_bits(),
        })
    }

    /// Shapes agree with each other, and every view stays inside its buffer.
    fn check(&self) -> TractResult<()> {
        let [a, b, v] = [&self.operands[0].shape, &self.operands[1].shape, &self.operands[2].shape];
        let r = a.len();
        ensure!(r >= 2 && b.len() == r && v.len() == r && self.out.shape.len() == r, "Attention layout: ranks");
        ensure!(b[..r - 2] == a[..r - 2] && v[..r - 2] == a[..r - 2] && b[r - 2] == a[r - 1] && v[r - 2] == b[r - 1], "Attention layout: shapes");
        ensure!(self.out.shape[..r - 1] == a[..r - 1] && self.out.shape[r - 1] == v[r - 1], "Attention layout: output shape");
        for (view, source) in self.operands.iter().chain([&self.out]).zip(self.sources.iter().chain([&self.out_shape])) {
            ensure!(view.fits(source.iter().product()), "Attention layout: a view leaves its buffer");
        }
        Ok(())
    }
}

/// A strided view: element `(i0, .., ir-1)` is at `offset + Σ ik·strides[k]` of a contiguous
/// buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct View {
    shape: TVec<usize>,
    strides: TVec<usize>,
    offset: usize,
}

impl View {
    /// A whole contiguous buffer of this shape.
    pub fn natural(shape: &[usize]) -> View {
        let mut strides: TVec<usize> = tvec![0; shape.len()];
        let mut s = 1;
        for (st, &d) in strides.iter_mut().zip(shape).rev() {
            *st = s;
            s *= d;
        }
        View { shape: shape.into(), strides, offset: 0 }
    }

    /// tract's `AxisOp::Move(from, to)`: axis `from` taken out and put back at `to`.
    pub fn moved(&self, from: usize, to: usize) -> Option<View> {
        let r = self.shape.len();
        if from >= r || to >= r {
            return None;
        }
        let mut v = self.clone();
        let (d, s) = (v.shape.remove(from), v.strides.remove(from));
        v.shape.insert(to, d);
        v.strides.insert(to, s);
        Some(v)
    }

    /// `index` along `axis`, the axis removed (a Gather by a scalar index).
    pub fn selected(&self, axis: usize, index: i64) -> Option<View> {
        let d = *self.shape.get(axis)? as i64;
        let i = if index < 0 { index + d } else { index };
        if !(0..d).contains(&i) {
            return None;
        }
        let mut v = self.clone();
        v.offset += i as usize * v.strides[axis];
        v.shape.remove(axis);
        v.strides.remove(axis);
        Some(v)
    }

    /// The same elements in row-major order under a new shape, where strides can express it
    /// (as numpy's reshape without a copy): each group of old dims merged into new ones must be
    /// contiguous among themselves.
    pub fn reshaped(&self, to: &[usize]) -> Option<View> {
        if to.iter().product::<usize>() != self.shape.iter().product::<usize>() || to.contains(&0) {
            return None;
        }
        let old: Vec<(usize, usize)> = self.shape.iter().zip(&self.strides).map(|(&d, &s)| (d, s)).filter(|&(d, _)| d != 1).collect();
        let new: Vec<(usize, usize)> = to.iter().enumerate().map(|(i, &d)| (i, d)).filter(|&(_, d)| d != 1).collect();
        let mut strides: TVec<usize> = tvec![0; to.len()];
        let (mut oi, mut ni) = (0, 0);
        while oi < old.len() && ni < new.len() {
            let (mut op, mut np) = (old[oi].0, new[ni].1);
            let (mut oj, mut nj) = (oi + 1, ni + 1);
            while op != np {
                if np < op {
                    np *= new.get(nj)?.1;
                    nj += 1;
                } else {
                    op *= old.get(oj)?.0;
                    oj += 1;
                }
            }
            for k in oi..oj - 1 {
                if old[k].1 != old[k + 1].0 * old[k + 1].1 {
                    return None;
                }
            }
            let mut s = old[oj - 1].1;
            for &(axis, d) in new[ni..nj].iter().rev() {
                strides[axis] = s;
                s *= d;
            }
            (oi, ni) = (oj, nj);
        }
        if oi != old.len() || ni != new.len() {
            return None;
        }
        Some(View { shape: to.into(), strides, offset: self.offset })
    }

    /// Every element lies below `len`.
    fn fits(&self, len: usize) -> bool {
        if self.shape.contains(&0) {
            return true;
        }
        let last = self.shape.iter().zip(&self.strides).try_fold(self.offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| x.checked_add(acc)));
        last.is_some_and(|last| last < len)
    }
}

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

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(match &self.layout {
            Some(l) => {
                vec![format!("operands {:?}, output {:?}, scores x {}, result x {}", l.operands, l.out, f32::from_bits(l.scale), f32::from_bits(l.out_scale))]
            }
            None => vec![],
        })
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let natural;
        let layout = match &self.layout {
            Some(l) => l,
            None => {
                natural = Layout::natural([inputs[0].shape(), inputs[1].shape(), inputs[2].shape()])?;
                &natural
            }
        };
        let mut src: [&[f32]; 3] = [&[]; 3];
        let plain: Vec<_> = inputs.iter().map(|t| t.try_as_plain_ram()).collect::<TractResult<_>>()?;
        for (i, (t, x)) in inputs.iter().zip(&plain).enumerate() {
            ensure!(t.shape() == &*layout.sources[i], "Attention: input {i} is {:?}, planned {:?}", t.shape(), layout.sources[i]);
            src[i] = x.as_slice::<f32>()?;
            ensure!(src[i].len() == t.shape().iter().product::<usize>(), "Attention: input {i} is not contiguous");
        }
        let mut y = unsafe { Tensor::uninitialized::<f32>(&layout.out_shape)? };
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys = view.as_slice_mut::<f32>()?;
            super::product::with_executor_pool(|pool| attention(src, layout, ys, pool));
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()), "Attention takes f32");
        if let Some(l) = &self.layout {
            return Ok(tvec!(f32::fact(&*l.out_shape)));
        }
        let (a, v) = (inputs[0], inputs[2]);
        ensure!(a.rank() >= 2 && v.rank() == a.rank(), "Attention: ranks {} and {}", a.rank(), v.rank());
        let mut shape: TVec<TDim> = a.shape.iter().cloned().collect();
        let r = shape.len();
        shape[r - 1] = v.shape[r - 1].clone();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// One step between a buffer and an operand cut from it.
enum Step {
    Move(usize, usize),
    Reshape(TVec<usize>),
    Select(usize, i64),
    Scale(f32),
}

/// The ops tract puts between a product's output and an attention operand (reshapes, axis
/// moves, a Gather of q, k or v out of a fused projection, a scale by a constant), walked back
/// from `outlet`: (the outlets met, nearest first, and the step of each but the last).
fn walk_back(model: &TypedModel, outlet: OutletId) -> (Vec<OutletId>, Vec<Step>) {
    use tract_onnx::tract_core::ops::array::Gather;
    use tract_onnx::tract_core::ops::change_axes::{AxisOp, IntoShape};
    let mut outlets = vec![outlet];
    let mut steps = Vec::new();
    let concrete = |o: OutletId| model.outlet_fact(o).ok().and_then(|f| f.shape.as_concrete().map(TVec::<usize>::from));
    while steps.len() < 64 {
        let cur = *outlets.last().unwrap();
        let node = model.node(cur.node);
        let Some(out) = concrete(cur) else { break };
        if node.inputs.is_empty() || node.outputs.len() != 1 || model.outlet_fact(node.inputs[0]).map_or(true, |f| f.datum_type != f32::datum_type()) {
            break;
        }
        let konst = |ix: usize| node.inputs.get(ix).and_then(|&i| model.outlet_fact(i).ok()).and_then(|f| f.konst.clone());
        let step = if let Some(op) = node.op_as::<AxisOp>() {
            match op {
                AxisOp::Move(from, to) => Step::Move(*from, *to),
                _ => Step::Reshape(out),
            }
        } else if node.op_is::<IntoShape>() {
            Step::Reshape(out)
        } else if let Some(g) = node.op_as::<Gather>() {
            match konst(1) {
                Some(t) if t.rank() == 0 && node.inputs.len() == 2 => match t.cast_to_scalar::<i64>() {
                    Ok(i) => Step::Select(g.axis, i),
                    Err(_) => break,
                },
                _ => break,
            }
        } else if node.op.name() == "OptMulByScalar" && node.inputs.len() == 2 {
            match konst(1) {
                Some(t) if t.len() == 1 && t.datum_type() == f32::datum_type() && concrete(node.inputs[0]).as_ref() == Some(&out) => {
                    Step::Scale(t.cast_to_scalar::<f32>().unwrap_or(f32::NAN))
                }
                _ => break,
            }
        } else {
            break;
        };
        steps.push(step);
        outlets.push(node.inputs[0]);
    }
    (outlets, steps)
}

/// The longest tail of `walk_back`'s chain that views can express: (the buffer, the operand's
/// view in it, the product of the scales met).
fn trace(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, View, f32)> {
    let (outlets, steps) = walk_back(model, outlet);
    'len: for m in (0..=steps.len()).rev() {
        let source = outlets[m];
        let shape = model.outlet_fact(source).ok()?.shape.as_concrete()?.to_vec();
        let mut view = View::natural(&shape);
        let mut scale = 1f32;
        for (k, step) in steps[..m].iter().enumerate().rev() {
            let next = match step {
                Step::Move(from, to) => view.moved(*from, *to),
                Step::Reshape(to) => view.reshaped(to),
                Step::Select(axis, i) => view.selected(*axis, *i),
                Step::Scale(s) => {
                    scale *= s;
                    Some(view.clone())
                }
            };
            match next {
                // (every step must land on the shape tract computed for its output)
                Some(v) if model.outlet_fact(outlets[k]).ok()?.shape.as_concrete() == Some(&v.shape[..]) => view = v,
                _ => continue 'len,
            }
        }
        if scale.is_finite() {
            return Some((source, view, scale));
        }
    }
    None
}

/// Let each `Attention` node of an optimised model read its operands where tract's reshapes,
/// axis moves, gathers and scalings would have copied them from (the projection's output), and
/// write its result in the order of the axis moves that follow it. Those ops then have no
/// reader left and drop out of the plan. Graphs with symbolic shapes are left as they are.
/// Returns how many nodes were changed.
pub fn absorb_layouts(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    let ids: Vec<usize> = model.nodes().iter().filter(|n| n.op_as::<Attention>().is_some_and(|a| a.layout.is_none())).map(|n| n.id).collect();
    let mut changed = 0;
    for id in ids {
        let node = model.node(id);
        let mut sources = Vec::new();
        let mut views = Vec::new();
        // scalings of a or b scale the scores; of v, the result
        let (mut scale, mut out_scale) = (1f32, 1f32);
        for (ix, &input) in node.inputs.iter().enumerate() {
            let Some((src, view, s)) = trace(model, input) else { break };
            sources.push(src);
            views.push(view);
            if ix == 2 {
                out_scale *= s;
            } else {
                scale *= s;
            }
        }
        let Some(out_shape) = model.outlet_fact(OutletId::new(id, 0))?.shape.as_concrete().map(TVec::<usize>::from) else { continue };
        if views.len() != 3 || sources.iter().any(|&s| model.outlet_fact(s).map_or(true, |f| f.datum_type != f32::datum_type())) {
            continue;
        }
        // the axis moves after the op: order[i] is the result's axis at position i of the output
        let mut tail = OutletId::new(id, 0);
        let mut order: TVec<usize> = (0..out_shape.len()).collect();
        let mut moves = 0;
        while !model.output_outlets()?.contains(&tail) && model.outlet_successors(tail).len() == 1 {
            let succ = model.node(model.outlet_successors(tail)[0].node);
            let Some(&AxisOp::Move(from, to)) = succ.op_as::<AxisOp>() else { break };
            if from >= order.len() || to >= order.len() {
                break;
            }
            let a = order.remove(from);
            order.insert(to, a);
            tail = OutletId::new(succ.id, 0);
            moves += 1;
        }
        let buffer: TVec<usize> = order.iter().map(|&a| out_shape[a]).collect();
        let natural = View::natural(&buffer);
        let mut out = View { shape: out_shape.clone(), strides: tvec![0; out_shape.len()], offset: 0 };
        for (pos, &a) in order.iter().enumerate() {
            out.strides[a] = natural.strides[pos];
        }
        let trivial = moves == 0 && scale == 1.0 && out_scale == 1.0 && sources.iter().zip(&node.inputs).all(|(s, i)| s == i);
        if trivial {
            continue;
        }
        let shapes: Vec<TVec<usize>> = sources
            .iter()
            .map(|&s| model.outlet_fact(s).ok().and_then(|f| f.shape.as_concrete().map(TVec::from)))
            .collect::<Option<_>>()
            .context("concrete")?;
        let layout = Layout {
            sources: [shapes[0].clone(), shapes[1].clone(), shapes[2].clone()],
            operands: [views[0].clone(), views[1].clone(), views[2].clone()],
            out_shape: buffer,
            out,
            scale: scale.to_bits(),
            out_scale: out_scale.to_bits(),
        };
        if layout.check().is_err() {
            continue;
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("absorb layouts of {name}"));
        let taps = sources.iter().map(|&s| patch.tap_model(model, s)).collect::<TractResult<TVec<_>>>()?;
        let y = patch.wire_node(&name, Attention { layout: Some(layout) }, &taps)?;
        patch.shunt_outside(model, tail, y[0])?;
        patch.apply(model)?;
        changed += 1;
    }
    if changed > 0 {
        model.compact()?;
    }
    Ok(changed)
}

/// Every slice of `layout` into `out`; slices split over `pool`'s threads when there are several.
fn attention(src: [&[f32]; 3], layout: &Layout, out: &mut [f32], pool: Option<&rayon::ThreadPool>) {
    let [a, b, v] = &layout.operands;
    let r = a.shape.len();
    let (l, d, l2, dv) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1], v.shape[r - 1]);
    let bh: usize = a.shape[..r - 2].iter().product();
    assert!(layout.check().is_ok() && out.len() == layout.out_shape.iter().product::<usize>());
    for (s, shape) in src.iter().zip(&layout.sources) {
        assert_eq!(s.len(), shape.iter().product::<usize>());
    }
    if bh == 0 || l == 0 || dv == 0 {
        return;
    }
    let ptr = SendPtr(out.as_mut_ptr());
    // (the work of one slice is l x l2 x (d + dv) multiply-adds: tens of microseconds for a ViT)
    parallel::run_shares(pool, bh, bh * l * l2 * (d + dv) >= 1 << 18, |range| {
        // SAFETY: views checked to lie in their buffers; each share writes its own slices
        unsafe { slices(src, layout, ptr.get(), range) }
    });
}

/// Slices `range` (their index over the leading dims, row-major), each by the kernel table's
/// attention slice.
/// SAFETY: the layout is checked and the buffers have its sizes.
unsafe fn slices(src: [&[f32]; 3], layout: &Layout, out: *mut f32, range: std::ops::Range<usize>) {
    let [a, b, v] = &layout.operands;
    let r = a.shape.len();
    let (l, d, l2, dv) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1], v.shape[r - 1]);
    let scales = (f32::from_bits(layout.scale), f32::from_bits(layout.out_scale));
    let slice = kernels::kernels().attention;
    let mut scratch = Scratch::default();
    for h in range {
        let offset = |view: &View| -> usize {
            let mut rest = h;
            let mut off = view.offset;
            for ax in (0..r - 2).rev() {
                off += (rest % view.shape[ax]) * view.strides[ax];
                rest /= view.shape[ax];
            }
            off
        };
        let mat = |view: &View, base: *const f32| Mat { ptr: base.add(offset(view)), rs: view.strides[r - 2], cs: view.strides[r - 1] };
        let (ma, mb, mv) = (mat(a, src[0].as_ptr()), mat(b, src[1].as_ptr()), mat(v, src[2].as_ptr()));
        let mo = mat(&layout.out, out);
        slice(ma, mb, mv, mo, (l, d, l2, dv), scales, &mut scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (slices, l, d, l2, dv)
    type Dims = (usize, usize, usize, usize, usize);

    fn reference(a: &[f32], b: &[f32], v: &[f32], (bh, l, d, l2, dv): Dims, scale: f64) -> Vec<f32> {
        let mut out = vec![0f32; bh * l * dv];
        for h in 0..bh {
            for i in 0..l {
                let s: Vec<f64> =
                    (0..l2).map(|j| scale * (0..d).map(|k| a[(h * l + i) * d + k] as f64 * b[(h * d + k) * l2 + j] as f64).sum::<f64>()).collect();
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

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} at {i}: {g} vs {w}");
        }
    }

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 30.0).collect()
    }

    /// Every path (dispatched with and without threads; the portable loops forced) on contiguous
    /// operands.
    #[test]
    fn matches_softmax_attention_for_odd_sizes_and_threads() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for dims in [(1, 1, 1, 1, 1), (3, 5, 7, 9, 4), (12, 50, 64, 50, 64), (8, 256, 64, 50, 64), (5, 17, 33, 65, 19)] {
            let (bh, l, d, l2, dv) = dims;
            let (a, b, v) = (data(bh * l * d, 1), data(bh * d * l2, 2), data(bh * l2 * dv, 3));
            let want = reference(&a, &b, &v, dims, 1.0);
            let layout = Layout::natural([&[bh, l, d], &[bh, d, l2], &[bh, l2, dv]]).unwrap();
            for pool in [None, Some(&pool)] {
                let mut got = vec![f32::NAN; want.len()];
                attention([&a, &b, &v], &layout, &mut got, pool);
                close(&got, &want, &format!("dispatched {dims:?}"));
            }
            let mut got = vec![f32::NAN; want.len()];
            let m = |p: &[f32], rs: usize| Mat { ptr: p.as_ptr(), rs, cs: 1 };
            for h in 0..bh {
                let o = Mat { ptr: got[h * l * dv..].as_mut_ptr(), rs: dv, cs: 1 };
                unsafe {
                    crate::kernels::portable::attention_slice(
                        m(&a[h * l * d..], d),
                        m(&b[h * d * l2..], l2),
                        m(&v[h * l2 * dv..], dv),
                        o,
                        (l, d, l2, dv),
                        (1.0, 1.0),
                        &mut Scratch::default(),
                    )
                };
            }
            close(&got, &want, &format!("portable {dims:?}"));
        }
    }

    /// Operands cut from one fused projection output as the export lays it out ([l, batch,
    /// 3, heads·dh] -> q, k, v of [batch·heads, l, dh], k transposed), a scale on the scores, and
    /// the result written in [l, batch, heads, dh] order: through views, against the operands
    /// materialised.
    #[test]
    fn strided_operands_and_result_match_materialised_ones() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (l, heads, dh) in [(50, 12, 64), (7, 3, 5), (1, 1, 1), (33, 2, 17)] {
            let w = heads * dh;
            let src = data(l * 3 * w, 4);
            let proj = View::natural(&[l, 1, 3 * w]);
            // as tract's plan: reshape [l, 1, 3, w], move 3 first, pick one, reshape [l, heads, dh],
            // heads first
            let cut = |which: i64| -> View {
                let v = proj.reshaped(&[l, 1, 3, w]).unwrap().moved(2, 0).unwrap().selected(0, which).unwrap();
                v.reshaped(&[l, heads, dh]).unwrap().moved(0, 1).unwrap()
            };
            let (q, k, v) = (cut(0), cut(1).moved(1, 2).unwrap(), cut(2));
            let gather = |view: &View| -> Vec<f32> {
                let n: usize = view.shape.iter().product();
                (0..n)
                    .map(|mut i| {
                        let mut off = view.offset;
                        for ax in (0..view.shape.len()).rev() {
                            off += (i % view.shape[ax]) * view.strides[ax];
                            i /= view.shape[ax];
                        }
                        src[off]
                    })
                    .collect()
            };
            let scale = 0.125f32;
            let dims = (heads, l, dh, l, dh);
            let want = reference(&gather(&q), &gather(&k), &gather(&v), dims, scale as f64);
            // the result [heads, l, dh] stored as [l, heads, dh]
            let buffer = View::natural(&[l, heads, dh]);
            let out = View { shape: tvec![heads, l, dh], strides: tvec![buffer.strides[1], buffer.strides[0], 1], offset: 0 };
            let shape: TVec<usize> = tvec![l, 1, 3 * w];
            let layout = Layout {
                sources: [shape.clone(), shape.clone(), shape],
                operands: [q, k, v],
                out_shape: tvec![l, heads, dh],
                out,
                scale: scale.to_bits(),
                out_scale: 1f32.to_bits(),
            };
            layout.check().unwrap();
            for pool in [None, Some(&pool)] {
                let mut got = vec![f32::NAN; want.len()];
                attention([&src, &src, &src], &layout, &mut got, pool);
                // back to [heads, l, dh]
                let got: Vec<f32> = (0..heads * l * dh).map(|i| got[((i / dh) % l * heads + i / (l * dh)) * dh + i % dh]).collect();
                close(&got, &want, &format!("{l} tokens, {heads} heads of {dh}"));
            }
        }
    }

    #[test]
    fn views_reshape_like_numpy_and_refuse_what_needs_a_copy() {
        let v = View::natural(&[2, 3, 4]);
        assert_eq!(v.reshaped(&[6, 4]).unwrap().strides.as_slice(), &[4, 1]);
        assert_eq!(v.reshaped(&[2, 1, 12]).unwrap().strides.as_slice(), &[12, 0, 1]);
        let t = v.moved(2, 0).unwrap(); // [4, 2, 3], strides [1, 12, 4]
        assert_eq!(t.strides.as_slice(), &[1, 12, 4]);
        assert_eq!(t.reshaped(&[4, 6]).unwrap().strides.as_slice(), &[1, 4]);
        assert!(t.reshaped(&[8, 3]).is_none(), "4 and 2 are not contiguous after the move");
        assert!(t.reshaped(&[4, 5]).is_none());
        let s = v.selected(1, -1).unwrap();
        assert_eq!((s.shape.as_slice(), s.strides.as_slice(), s.offset), (&[2usize, 4][..], &[12usize, 1][..], 8));
        assert!(v.selected(1, 3).is_none() && v.moved(3, 0).is_none());
        assert!(s.fits(24) && !s.fits(23));
    }

    /// q k^T -> softmax -> v as open_clip's export writes it (a scale Mul on each side, k
    /// transposed), next to a chain the rewrite must leave alone (the scores are also an output),
    /// runs the same with and without the rewrite.
    #[test]
    fn fused_graph_computes_what_the_onnx_graph_does() {
        use super::super::test_proto::{attr_int as int, attr_ints as ints, model, node, value_info as vi, write_model};
        use tract_onnx::pb;
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
        let (_dir, path) = write_model(&model);
        let n = (b * h * l * d) as usize;
        let input = |seed: usize| -> TValue {
            let v: Vec<f32> = (0..n).map(|i| (((i * 29 + seed * 13) % 83) as f32 - 41.0) / 20.0).collect();
            tract_ndarray::Array4::from_shape_vec((b as usize, h as usize, l as usize, d as usize), v).unwrap().into_tensor().into()
        };
        let run = |ours: bool| -> Vec<Vec<f32>> {
            let typed = super::super::load_onnx_with(&path, super::super::Rewrites { ours: true, f32_products: ours, int8_products: false })
                .unwrap()
                .into_typed()
                .unwrap();
            assert_eq!(typed.nodes().iter().filter(|n| n.op.name() == "Attention").count(), usize::from(ours));
            let optimized = super::super::optimize(typed, true).unwrap();
            // the scales and k's transpose are read through the op's views
            assert!(optimized.nodes().iter().all(|n| n.op_as::<Attention>().is_none_or(|a| a.layout.is_some())));
            let plan = optimized.into_runnable().unwrap();
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

    /// The layout of open_clip's export: q, k and v gathered from one projection output of
    /// [l, batch, 3·width], split into heads, the scores scaled (and v: that scales the result),
    /// the result put back to [l, width]. With the rewrite and [`absorb_layouts`], none of the reshapes, moves,
    /// gathers or scalings is left in the plan, and the outputs are tract's.
    #[test]
    fn export_layout_is_read_in_place() {
        use super::super::test_proto::{attr_int as int, attr_ints as ints, ints_tensor, model, node, tensor, value_info as vi, write_model};
        use tract_onnx::pb;
        let (l, heads, dh) = (9i64, 3i64, 8i64);
        let w = heads * dh;
        let mut nodes = vec![node("Reshape", &["x", "s4"], "x4", vec![]), node("Transpose", &["x4"], "xt", vec![ints("perm", &[2, 0, 1, 3])])];
        for (i, n) in ["q", "k", "v"].iter().enumerate() {
            nodes.push(node("Gather", &["xt", ["i0", "i1", "i2"][i]], &format!("{n}0"), vec![int("axis", 0)]));
            nodes.push(node("Reshape", &[&format!("{n}0"), "s3"], &format!("{n}1"), vec![]));
            nodes.push(node("Transpose", &[&format!("{n}1")], &format!("{n}2"), vec![ints("perm", &[1, 0, 2])]));
        }
        nodes.extend([
            node("Mul", &["q2", "scale"], "qs", vec![]),
            node("Transpose", &["k2"], "kt", vec![ints("perm", &[0, 2, 1])]),
            node("Mul", &["kt", "scale"], "kts", vec![]),
            node("MatMul", &["qs", "kts"], "s", vec![]),
            node("Softmax", &["s"], "p", vec![int("axis", -1)]),
            node("Mul", &["v2", "vscale"], "vs", vec![]),
            node("MatMul", &["p", "vs"], "y", vec![]),
            node("Transpose", &["y"], "yt", vec![ints("perm", &[1, 0, 2])]),
            node("Reshape", &["yt", "s2"], "out", vec![]),
        ]);
        let graph = pb::GraphProto {
            name: "g".into(),
            node: nodes,
            initializer: vec![
                tensor("scale", &[], &[0.59]),
                tensor("vscale", &[], &[-1.7]),
                ints_tensor("s4", &[l, 1, 3, w]),
                ints_tensor("s3", &[l, heads, dh]),
                ints_tensor("s2", &[l, w]),
                ints_tensor("i0", &[0]),
                ints_tensor("i1", &[1]),
                ints_tensor("i2", &[2]),
            ],
            input: vec![vi("x", &[l, 1, 3 * w])],
            output: vec![vi("out", &[l, w])],
            ..Default::default()
        };
        // (the indices as scalars)
        let mut model = model(graph);
        for t in model.graph.as_mut().unwrap().initializer.iter_mut().filter(|t| t.name.starts_with('i')) {
            t.dims.clear();
        }
        let (_dir, path) = write_model(&model);
        let x: Vec<f32> = data((l * 3 * w) as usize, 5);
        let run = |ours: bool| -> (Vec<f32>, Vec<String>) {
            let typed = super::super::load_onnx_with(&path, super::super::Rewrites { ours: true, f32_products: ours, int8_products: false })
                .unwrap()
                .into_typed()
                .unwrap();
            let optimized = super::super::optimize(typed, true).unwrap();
            let ops = optimized.nodes().iter().map(|n| n.op.name().to_string()).collect();
            let plan = optimized.into_runnable().unwrap();
            let input = tract_ndarray::Array3::from_shape_vec((l as usize, 1, (3 * w) as usize), x.clone()).unwrap().into_tensor();
            let out = plan.run(tvec!(input.into())).unwrap();
            (out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec(), ops)
        };
        let ((ours, ops), (theirs, _)) = (run(true), run(false));
        let copies: Vec<&String> = ops.iter().filter(|o| ["MoveAxis", "Gather", "OptMulByScalar"].contains(&o.as_str())).collect();
        assert!(copies.is_empty(), "left in the plan: {copies:?} of {ops:?}");
        close(&ours, &theirs, "export layout");
    }
}
