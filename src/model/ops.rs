//! ONNX ops that tract 0.23.9 runs far below memory speed in our graphs, replaced by ops
//! written here (the graphs stay standard ONNX that onnxruntime runs unchanged). At parse time:
//!
//! - `LayerNormalization`: tract decomposes it into Reduce<Sum>, a broadcast Sub and RmsNorm.
//!   After its axis optimiser has made the token axis innermost ([1, width, tokens]), the Sub
//!   broadcasts along a middle axis of 50 (ViT-B/32) or 257 (ViT-L/14) tokens, neither a
//!   multiple of its vector width, and falls back to a generic element loop: about 10 ms of the
//!   B/32 encoder's 112 ms. [`LayerNorm`] normalises along any axis in two passes over
//!   contiguous memory with the affine parameters fused.
//! - `QuantizeLinear` with a per-tensor scale and an int8 zero point (the int8 graphs of
//!   models/export/quantize.py): tract's op rounds with a branchy scalar routine (12 ms per B/32
//!   image), its f32 -> i8 Cast is no faster. [`QuantizeI8`] is one branch-free loop.
//!
//! And after tract's optimisation ([`parallel_gelu`], called by `model::optimize`):
//! - tract's exact GELU runs on one thread like all its element-wise ops; [`GeluParallel`] is
//!   the same formula with tract-linalg's erf kernel, in even shares over the executor's threads.
//!
//! Anything else (per-axis quantization, LayerNorm with extra outputs) keeps tract's own
//! translation; LayerNorm parameters that are not constants are applied by tract's ops. Both ops declare the natural axes mapping and follow axis changes, like tract's
//! Softmax, so tract's layout optimiser moves them as before. tests/parity.rs (graph within
//! 1e-5 of PyTorch) and tests/precision.rs cover them.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

type Builder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

static TRACT_QUANTIZE: OnceLock<Builder> = OnceLock::new();
static TRACT_LAYER_NORM: OnceLock<Builder> = OnceLock::new();

/// Put our builders in front of tract's for the two ops (tract's stay the fallback).
pub fn register(onnx: &mut tract_onnx::Onnx) {
    if let Some(b) = onnx.op_register.0.get("QuantizeLinear").copied() {
        let _ = TRACT_QUANTIZE.set(b);
        onnx.op_register.insert("QuantizeLinear", quantize_linear);
    }
    if let Some(b) = onnx.op_register.0.get("LayerNormalization").copied() {
        let _ = TRACT_LAYER_NORM.set(b);
        onnx.op_register.insert("LayerNormalization", layer_normalization);
    }
    onnx.op_register.insert(super::w8::FUSED_OP, super::w8::parse);
    onnx.op_register.insert(super::q8::FUSED_OP, super::q8::parse);
    onnx.op_register.insert(super::f32mm::FUSED_OP, super::f32mm::parse);
    onnx.op_register.insert(super::f32mm::PATCH_OP, super::f32mm::parse_patches);
    onnx.op_register.insert(super::attn::FUSED_OP, super::attn::parse);
    onnx.op_register.insert(super::kv::SELF_OP, super::kv::parse_self);
    onnx.op_register.insert(super::kv::CROSS_OP, super::kv::parse_cross);
}

/// A top-level initializer of the model being parsed, decoded.
fn initializer(ctx: &ParsingContext, name: &str) -> Option<Tensor> {
    if name.is_empty() {
        return None;
    }
    let graph = ctx.model.graph.as_ref()?;
    let t = graph.initializer.iter().find(|t| t.name == name)?;
    tract_onnx::tensor::load_tensor(&*ctx.framework.provider, t, ctx.model_dir).ok()
}

// ------------------------------------------------------------------------------ QuantizeLinear

fn quantize_linear(ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let fast = || -> Option<QuantizeI8> {
        if node.input.len() != 3 || node.attribute.iter().any(|a| a.name == "block_size" && a.i != 0) {
            return None;
        }
        let scale = initializer(ctx, &node.input[1])?;
        let zero = initializer(ctx, &node.input[2])?;
        if scale.len() != 1 || zero.len() != 1 || zero.datum_type() != i8::datum_type() || scale.datum_type() != f32::datum_type() {
            return None;
        }
        let s = scale.cast_to_scalar::<f32>().ok()?;
        let z = zero.cast_to_scalar::<i8>().ok()?;
        inverse_scale(s).map(|inv_scale| QuantizeI8 { inv_scale, zero_point: z })
    };
    match fast() {
        Some(op) => Ok((expand(op), vec![])),
        None => (TRACT_QUANTIZE.get().expect("registered"))(ctx, node),
    }
}

/// The factor our quantizer multiplies by for `QuantizeLinear`'s scale `s` (`1 / s`), where
/// both are positive and finite; elsewhere the op stays tract's. Shared by the fused int8
/// products ([`super::q8`]), so both quantize the same values alike.
pub(crate) fn inverse_scale(s: f32) -> Option<f32> {
    (s > 0.0 && s.is_finite() && (1.0 / s).is_finite()).then_some(1.0 / s)
}

/// `QuantizeLinear` to int8 with one scale and zero point: y = clamp(round(x / s) + z).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeI8 {
    inv_scale: f32,
    zero_point: i8,
}

impl Eq for QuantizeI8 {}

impl Expansion for QuantizeI8 {
    fn name(&self) -> StaticName {
        "QuantizeI8".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, i8::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        if model.outlet_fact(x)?.datum_type != f32::datum_type() {
            // f16 / bf16 / i32 inputs (opset 21): quantize from f32, as tract's own op would
            x = model.wire_node(format!("{prefix}.to_f32"), tract_onnx::tract_core::ops::cast::cast(f32::datum_type()), &[x])?[0];
        }
        model.wire_node(prefix, self.clone(), &[x])
    }
}

impl Op for QuantizeI8 {
    fn name(&self) -> StaticName {
        "QuantizeI8".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("scale 1/{} zero point {}", self.inv_scale, self.zero_point)])
    }

    op_as_typed_op!();
}

/// Quantize through the kernel table ([`crate::kernels::QuantizeI8`]).
pub fn quantize_i8(xs: &[f32], ys: &mut [i8], inv_scale: f32, zero_point: i8) {
    (crate::kernels::kernels().quantize_i8)(xs, ys, inv_scale, zero_point)
}

impl EvalOp for QuantizeI8 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let xs = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut y = unsafe { Tensor::uninitialized::<i8>(x.shape())? };
        quantize_i8(xs, y.try_as_plain_ram_mut()?.as_slice_mut::<i8>()?, self.inv_scale, self.zero_point);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for QuantizeI8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type(), "QuantizeI8 takes f32, got {:?}", inputs[0].datum_type);
        Ok(tvec!(i8::datum_type().fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(&self, inputs: &[&TypedFact], outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn change_axes(&self, model: &TypedModel, node: &TypedNode, _io: InOut, change: &AxisOp) -> TractResult<Option<AxisChangeConsequence>> {
        Ok(Some(AxisChangeConsequence::new(model, node, None, change)))
    }

    as_op!();
}

// -------------------------------------------------------------------------- LayerNormalization

fn layer_normalization(ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    // one output (no Mean / InvStdDev outputs) and f32 statistics; the affine parameters are
    // checked when wiring, where constants behind Identity nodes are known
    let mut axis = -1i64;
    let mut epsilon = 1e-5f32;
    let mut plain = node.output.iter().skip(1).all(|o| o.is_empty()) && node.input.len() >= 2;
    for a in &node.attribute {
        match a.name.as_str() {
            "axis" => axis = a.i,
            "epsilon" => epsilon = a.f,
            "stash_type" => plain &= a.i == 1,
            _ => {}
        }
    }
    // several normalised axes (axis other than -1, rare outside vision convnets): tract's own
    if !plain || axis != -1 {
        return (TRACT_LAYER_NORM.get().expect("registered"))(ctx, node);
    }
    let has_bias = node.input.get(2).is_some_and(|b| !b.is_empty());
    Ok((expand(LayerNormSpec { axis, epsilon, has_bias }), vec![]))
}

/// ONNX LayerNormalization over the last axis.
#[derive(Debug, Clone)]
struct LayerNormSpec {
    axis: i64,
    epsilon: f32,
    has_bias: bool,
}

impl Expansion for LayerNormSpec {
    fn name(&self) -> StaticName {
        "LayerNormalization".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_input_arity(inputs, 2 + self.has_bias as usize)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[1].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?.clone();
        let rank = fact.rank() as i64;
        let axis = if self.axis < 0 { self.axis + rank } else { self.axis };
        ensure!(axis == rank - 1, "LayerNormalization over {} axes: only one (the last) is supported", rank - axis);
        let axis = axis as usize;
        let konst = |model: &TypedModel, o: OutletId| -> TractResult<Option<Arc<Tensor>>> {
            let f = model.outlet_fact(o)?;
            match &f.konst {
                Some(t) if t.rank() == 1 && t.datum_type().is_float() => Ok(Some(t.cast_to::<f32>()?.into_owned().into_arc_tensor())),
                _ => Ok(None),
            }
        };
        let dt = fact.datum_type;
        ensure!(dt.is_float(), "LayerNormalization of {dt:?}");
        // f32 and f16 run as they are; f64 / bf16 go through f32
        let mut x = inputs[0];
        if dt != f32::datum_type() && dt != f16::datum_type() {
            x = model.wire_node(format!("{prefix}.to_f32"), tract_onnx::tract_core::ops::cast::cast(f32::datum_type()), &[x])?[0];
        }
        let n = fact.shape[axis].to_usize().ok();
        let scale = konst(model, inputs[1])?.filter(|t| Some(t.len()) == n);
        let bias = if self.has_bias {
            konst(model, inputs[2])?.filter(|t| Some(t.len()) == n)
        } else {
            n.map(|n| Tensor::zero::<f32>(&[n])).transpose()?.map(|t| t.into_arc_tensor())
        };
        let back = |model: &mut TypedModel, y: TVec<OutletId>| -> TractResult<TVec<OutletId>> {
            if model.outlet_fact(y[0])?.datum_type == dt {
                return Ok(y);
            }
            model.wire_node(format!("{prefix}.back"), tract_onnx::tract_core::ops::cast::cast(dt), &y)
        };
        match (scale, bias) {
            (Some(scale), Some(bias)) => {
                let op = LayerNorm { axis, epsilon: self.epsilon, scale: Some(scale), bias: Some(bias) };
                let y = model.wire_node(prefix, op, &[x])?;
                back(model, y)
            }
            _ => {
                // computed or broadcast parameters: normalise here, scale and shift with tract's
                // broadcasting ops
                let op = LayerNorm { axis, epsilon: self.epsilon, scale: None, bias: None };
                let y = model.wire_node(format!("{prefix}.normalize"), op, &[x])?;
                let mut y = back(model, y)?;
                y = wire_with_rank_broadcast(format!("{prefix}.scale"), model, tract_onnx::tract_core::ops::math::mul(), &[y[0], inputs[1]])?;
                if self.has_bias {
                    y = wire_with_rank_broadcast(format!("{prefix}.bias"), model, tract_onnx::tract_core::ops::math::add(), &[y[0], inputs[2]])?;
                }
                Ok(y)
            }
        }
    }
}

/// y = (x - mean) / sqrt(var + eps) * scale + bias along `axis`, with constant scale and bias
/// held by the op (so tract can move the axis without touching them); without them, plain
/// normalisation.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    axis: usize,
    epsilon: f32,
    scale: Option<Arc<Tensor>>,
    bias: Option<Arc<Tensor>>,
}

impl PartialEq for LayerNorm {
    fn eq(&self, other: &Self) -> bool {
        self.axis == other.axis && self.epsilon == other.epsilon && self.scale == other.scale && self.bias == other.bias
    }
}

impl Eq for LayerNorm {}

impl Op for LayerNorm {
    fn name(&self) -> StaticName {
        "LayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("axis {} epsilon {}", self.axis, self.epsilon)])
    }

    op_as_typed_op!();
}

/// Normalise `x` viewed as [outer, n, inner] along n into `y`, through the kernel table
/// ([`crate::kernels::LayerNorm`]).
pub fn layer_norm(x: &[f32], y: &mut [f32], n: usize, inner: usize, scale: &[f32], bias: &[f32], eps: f32) {
    (crate::kernels::kernels().layer_norm)(x, y, n, inner, scale, bias, eps)
}

impl EvalOp for LayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let dt = input.datum_type();
        // f16 graphs (ARM fp16 cores): statistics in f32, like tract's own f16 reductions
        let x = if dt == f32::datum_type() { std::borrow::Cow::Borrowed(&**input) } else { input.cast_to::<f32>()? };
        let shape = x.shape();
        let n = shape[self.axis];
        let inner: usize = shape[self.axis + 1..].iter().product();
        let xs = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut y = unsafe { Tensor::uninitialized::<f32>(shape)? };
        let (ones, zeros);
        let scale = match &self.scale {
            Some(t) => t.try_as_plain_ram()?.as_slice::<f32>()?,
            None => {
                ones = vec![1f32; n];
                &ones[..]
            }
        };
        let bias = match &self.bias {
            Some(t) => t.try_as_plain_ram()?.as_slice::<f32>()?,
            None => {
                zeros = vec![0f32; n];
                &zeros[..]
            }
        };
        if !xs.is_empty() {
            layer_norm(xs, y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, n, inner, scale, bias, self.epsilon);
        }
        if dt != f32::datum_type() {
            y = y.cast_to_dt(dt)?.into_owned();
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for LayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let dt = inputs[0].datum_type;
        ensure!(dt == f32::datum_type() || dt == f16::datum_type(), "LayerNorm takes f32 or f16, got {dt:?}");
        Ok(tvec!(dt.fact(inputs[0].shape.clone())))
    }

    /// Every axis maps through but the normalised one, which (as in tract's Reduce) gets one
    /// letter on the input and another on the output: the op is not element-wise, so tract
    /// must never fold it into a DequantizeLinear -> ... -> QuantizeLinear lookup table (the
    /// trap its Softmax falls into, docs/precision.md).
    fn axes_mapping(&self, inputs: &[&TypedFact], _outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        let mut letters = 'a'..;
        let mut axes = Vec::new();
        for ix in 0..inputs[0].rank() {
            if ix == self.axis {
                axes.push(Axis::new(letters.next().unwrap(), 1, 1).input(0, ix));
                axes.push(Axis::new(letters.next().unwrap(), 1, 1).output(0, ix));
            } else {
                axes.push(Axis::new(letters.next().unwrap(), 1, 1).input(0, ix).output(0, ix));
            }
        }
        AxesMapping::new(1, 1, axes)
    }

    fn change_axes(&self, model: &TypedModel, node: &TypedNode, _io: InOut, change: &AxisOp) -> TractResult<Option<AxisChangeConsequence>> {
        let Some(axis) = change.transform_axis(self.axis) else { return Ok(None) };
        // the normalised axis must stay one whole axis (no reshape splitting or merging it)
        if let AxisOp::Reshape(..) = change {
            return Ok(None);
        }
        Ok(Some(AxisChangeConsequence::new(model, node, Some(Box::new(LayerNorm { axis, ..self.clone() })), change)))
    }

    as_op!();
}

// ---------------------------------------------------------------------------------- GeluExact

/// tract's exact GELU (`GeluExact`: x/2 · (1 + erf(x/√2)) with tract-linalg's erf kernel) split
/// over the executor's threads: tract's element-wise ops run on one. The ViT's MLP applies it to
/// tokens x 4·width values (153,600 for a B/32, 1 ms of the encoder at 2 threads).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GeluParallel;

/// Values from which the GELU is split over threads.
const GELU_PARALLEL: usize = 1 << 15;

impl Op for GeluParallel {
    fn name(&self) -> StaticName {
        "GeluExactParallel".into()
    }

    op_as_typed_op!();
}

impl EvalOp for GeluParallel {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut t = inputs.remove(0).into_tensor();
        {
            let mut view = t.try_as_plain_ram_mut()?;
            let xs = view.as_slice_mut::<f32>()?;
            super::product::with_executor_pool(|pool| gelu(xs, pool))?;
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for GeluParallel {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type(), "GeluExactParallel takes f32");
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// GELU in place ([`crate::kernels::gelu`] with tract-linalg's erf kernel), in even shares over
/// `pool`'s threads when there are several and enough values.
pub fn gelu(xs: &mut [f32], pool: Option<&rayon::ThreadPool>) -> TractResult<()> {
    let erf = tract_linalg::routines::Func::Erf.ew_f32()?;
    let ptr = crate::kernels::SendPtr(xs.as_mut_ptr());
    let len = xs.len();
    let results = crate::kernels::parallel::run_shares(pool, len, len >= GELU_PARALLEL, |range| {
        // SAFETY: the shares are disjoint ranges of `xs`, which outlives the split
        let part = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(range.start), range.len()) };
        crate::kernels::gelu(part, &mut |e| erf.run(e))
    });
    results.into_iter().collect()
}

/// In an optimised model, run each f32 `GeluExact` over the threads ([`GeluParallel`]).
/// Returns how many.
pub fn parallel_gelu(model: &mut TypedModel) -> TractResult<usize> {
    let ids: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op.name() == "GeluExact" && n.inputs.len() == 1 && n.outputs.len() == 1)
        .filter(|n| model.outlet_fact(n.inputs[0]).is_ok_and(|f| f.datum_type == f32::datum_type()))
        .map(|n| n.id)
        .collect();
    for &id in &ids {
        let node = model.node(id);
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, GeluParallel)?;
        patch.apply(model)?;
    }
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        let xs = [0.5f32, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0, f32::NAN, 0.49, 126.6];
        let mut ys = [0i8; 10];
        quantize_i8(&xs, &mut ys, 1.0, 0);
        assert_eq!(ys, [0, 2, 2, 0, -2, 127, -128, -128, 0, 127]);
        quantize_i8(&[1.0, -200.0], &mut ys[..2], 10.0, -3);
        assert_eq!(&ys[..2], &[7, -128]);
    }

    /// The threaded GELU against the exact formula in f64, for sizes around the split.
    #[test]
    fn parallel_gelu_matches_the_formula() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for n in [0usize, 1, 1023, 1025, GELU_PARALLEL + 7, 153_600] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 150.0).collect();
            for pool in [None, Some(&pool)] {
                let mut ys = xs.clone();
                gelu(&mut ys, pool).unwrap();
                for (&x, &y) in xs.iter().zip(&ys) {
                    let want = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
                    assert!((y as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "gelu({x}) = {y}, want {want}");
                }
            }
        }
    }

    /// erf to 1e-7 (Abramowitz and Stegun 7.1.26 is too coarse; this is the series and the
    /// continued fraction).
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 3.0 {
            // Maclaurin series
            let (mut term, mut sum, mut k) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                k += 1.0;
                term *= -a * a / k;
                sum += term / (2.0 * k + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        r.copysign(x)
    }

    #[test]
    fn layer_norm_along_middle_axis_matches_rows() {
        // [2 blocks, n = 3, inner = 4] against the same data transposed to rows
        let (n, inner) = (3, 4);
        let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let (g, b) = ([1.0, 2.0, 0.5], [0.0, 1.0, -1.0]);
        let mut y = vec![0f32; 24];
        layer_norm(&x, &mut y, n, inner, &g, &b, 1e-5);
        for blk in 0..2 {
            for j in 0..inner {
                let col: Vec<f32> = (0..n).map(|i| x[blk * 12 + i * inner + j]).collect();
                let mut row = vec![0f32; n];
                layer_norm(&col, &mut row, n, 1, &g, &b, 1e-5);
                for i in 0..n {
                    assert!((row[i] - y[blk * 12 + i * inner + j]).abs() < 1e-6);
                }
            }
        }
    }
}
