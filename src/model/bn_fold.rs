//! Folding BatchNorm (evaluation mode) into the preceding convolution:
//! `BN(conv(x, W)) = conv(x, W') + b'` with, per output channel o,
//! `W'_o = W_o·γ_o/√(σ²_o + ε)` and `b'_o = β_o − μ_o·γ_o/√(σ²_o + ε)`.
//! PWLQ quantizes the folded weights.

use candle_core::Tensor;

use crate::Result;

/// The folded weight (O×C×k×k) and bias (O) of a conv followed by BatchNorm.
pub fn fold(
    w: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let o = w.dim(0)?;
    let k = (var + eps)?.sqrt()?.recip()?.mul(gamma)?;
    let w_f = w.broadcast_mul(&k.reshape((o, 1, 1, 1))?)?;
    let b_f = (beta - mean.mul(&k)?)?;
    Ok((w_f, b_f))
}
