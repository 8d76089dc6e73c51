//! What our ops that multiply activations by weights they hold share: the op itself
//! (`x [.., k] -> [.., n]`, typed, evaluated with tract's executor's threads) and the pieces
//! they split work with. [`super::w8`] (int8 weights) and [`super::f32mm`] (f32 weights) each
//! bring only their packed weights, through [`Weights`].

use std::sync::Arc;

use tract_onnx::tract_hir::internal::*;

/// Packed weights `[k, n]` that multiply `m` rows of f32 activations.
pub trait Weights: std::fmt::Debug + Send + Sync + 'static {
    /// The op's name (profiles and tests find the ops by it).
    const OP: &'static str;
    fn k(&self) -> usize;
    fn n(&self) -> usize;
    /// One line for tract's op info.
    fn describe(&self) -> String;
    /// `out` (`m` x n) = `a` (`m` x k) times the weights, split over `pool`'s threads when given.
    fn matmul(&self, a: &[f32], m: usize, out: &mut [f32], pool: Option<&rayon::ThreadPool>);
}

/// Calls `f` with the thread pool of tract's current executor, if it has one.
pub fn with_executor_pool<R>(f: impl FnOnce(Option<&rayon::ThreadPool>) -> R) -> R {
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => f(Some(&pool)),
        _ => f(None),
    }
}

/// `x [.., k] -> [.., n]` with weights held by the op (parse-time expansion).
#[derive(Debug)]
pub struct WeightProduct<W: Weights> {
    pub w: Arc<W>,
}

impl<W: Weights> Clone for WeightProduct<W> {
    fn clone(&self) -> Self {
        WeightProduct { w: self.w.clone() }
    }
}

impl<W: Weights> PartialEq for WeightProduct<W> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.w, &other.w)
    }
}

impl<W: Weights> Eq for WeightProduct<W> {}

impl<W: Weights> Expansion for WeightProduct<W> {
    fn name(&self) -> StaticName {
        W::OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(&'s self, s: &mut Solver<'r>, inputs: &'p [TensorProxy], outputs: &'p [TensorProxy]) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        let (k, n) = (self.w.k(), self.w.n());
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for ax in 0..rank.saturating_sub(1) {
                s.equals(&inputs[0].shape[ax], &outputs[0].shape[ax])?;
            }
            if rank >= 1 {
                s.equals(&inputs[0].shape[rank - 1], k.to_dim())?;
                s.equals(&outputs[0].shape[rank - 1], n.to_dim())?;
            }
            Ok(())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl<W: Weights> Op for WeightProduct<W> {
    fn name(&self) -> StaticName {
        W::OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.w.describe()])
    }

    op_as_typed_op!();
}

impl<W: Weights> EvalOp for WeightProduct<W> {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (k, n) = (self.w.k(), self.w.n());
        let x = &inputs[0];
        let shape = x.shape();
        ensure!(shape.last() == Some(&k), "{}: input {shape:?}, weights {k}x{n}", W::OP);
        let m: usize = shape[..shape.len() - 1].iter().product();
        let mut out_shape: TVec<usize> = shape.into();
        *out_shape.last_mut().unwrap() = n;
        let xs = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut y = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys = view.as_slice_mut::<f32>()?;
            with_executor_pool(|pool| self.w.matmul(xs, m, ys, pool));
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl<W: Weights> TypedOp for WeightProduct<W> {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        let (k, n) = (self.w.k(), self.w.n());
        ensure!(x.datum_type == f32::datum_type(), "{} takes f32, got {:?}", W::OP, x.datum_type);
        ensure!(x.rank() >= 1, "{} of a scalar", W::OP);
        let mut shape: TVec<TDim> = x.shape.iter().cloned().collect();
        if let Ok(kk) = shape[shape.len() - 1].to_usize() {
            ensure!(kk == k, "{}: input {:?}, weights {k}x{n}", W::OP, x.shape);
        }
        *shape.last_mut().unwrap() = n.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}
