//! Compute kernels: no tract types, no I/O. (Being filled: see docs/architecture.md.)

/// Probabilities of `z` (max subtracted first; the sum runs in order, so results are
/// bit-identical to the three loops this replaced in classify, head and caption).
pub fn softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}
