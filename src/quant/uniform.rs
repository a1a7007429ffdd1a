//! The uniform fake quantizer.
//!
//! With `b` bits, codes are integers in [q_min, q_max]: symmetric (weights) uses the narrow
//! signed range [−(2^{b−1} − 1), 2^{b−1} − 1], so it is odd and zero is exact; unsigned
//! (post-ReLU activations) uses [0, 2^b − 1]. For a scale s,
//! `Q(x) = s · clamp(round_half_even(x / s), q_min, q_max)`; the scale comes from a range r
//! (a calibrated max, or max |x|) as s = r / q_max, per tensor or per output channel
//! (dimension 0). A zero range (an all-zero tensor) gives s = 1, so no NaN arises.
//!
//! Gradients: [`GradientMode::Ste`] passes the gradient through unchanged where
//! q_min·s ≤ x ≤ q_max·s and blocks it outside (masks, not `clamp`, whose gradient halves
//! at the bounds); [`GradientMode::Raw`] keeps rounding's true, zero, gradient.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::round::{round_half_even, round_half_even_tensor};
use super::GradientMode;
use crate::{Error, Result};

/// Signed (symmetric, narrow range) or unsigned codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Signedness {
    Symmetric,
    Unsigned,
}

/// The code range [q_min, q_max] for `bits` (2..=16).
pub fn code_range(bits: u32, s: Signedness) -> Result<(f32, f32)> {
    if !(2..=16).contains(&bits) {
        return Err(Error::config(
            "bits",
            bits,
            "must be between 2 and 16 (32 = full precision)",
        ));
    }
    Ok(match s {
        Signedness::Symmetric => {
            let m = ((1u32 << (bits - 1)) - 1) as f32;
            (-m, m)
        }
        Signedness::Unsigned => (0.0, ((1u32 << bits) - 1) as f32),
    })
}

/// The scale for a range `r` ≥ 0 (1 for a zero or non-finite range).
pub fn scale_for(range: f32, q_max: f32) -> f32 {
    if range > 0.0 && range.is_finite() {
        range / q_max
    } else {
        1.0
    }
}

/// Fake-quantizes values on the host (the reference the tensor path is tested against).
pub fn quantize_slice(xs: &[f32], scale: f32, q_min: f32, q_max: f32) -> Vec<f32> {
    xs.iter()
        .map(|&x| round_half_even(x / scale).clamp(q_min, q_max) * scale)
        .collect()
}

/// Integer codes on the host.
pub fn codes(xs: &[f32], scale: f32, q_min: f32, q_max: f32) -> Vec<i32> {
    xs.iter()
        .map(|&x| round_half_even(x / scale).clamp(q_min, q_max) as i32)
        .collect()
}

/// Fake-quantizes `x` with `scale` (a scalar tensor, or one broadcastable to `x`).
pub fn fake_quant(
    x: &Tensor,
    scale: &Tensor,
    q_min: f32,
    q_max: f32,
    mode: GradientMode,
) -> Result<Tensor> {
    let scaled = x.broadcast_div(scale)?;
    let q = round_half_even_tensor(&scaled)?
        .clamp(q_min, q_max)?
        .broadcast_mul(scale)?;
    match mode {
        // Q(x) is built from floor and comparisons: its gradient is rounding's own, zero.
        GradientMode::Raw => Ok(q),
        GradientMode::Ste => {
            let lo = scale.affine(q_min as f64, 0.0)?;
            let hi = scale.affine(q_max as f64, 0.0)?;
            let inside = x
                .broadcast_ge(&lo)?
                .mul(&x.broadcast_le(&hi)?)?
                .to_dtype(x.dtype())?;
            let pass = (x * &inside)?;
            Ok((&pass + (q - &pass)?.detach())?)
        }
    }
}

/// Per-tensor or per-output-channel max |x| (the symmetric range), as a tensor shaped to
/// broadcast against `x`.
pub fn abs_max(x: &Tensor, per_channel: bool) -> Result<Tensor> {
    let a = x.detach().abs()?;
    if per_channel {
        let o = x.dim(0)?;
        let mut shape = vec![o];
        shape.extend(std::iter::repeat_n(1, x.rank() - 1));
        Ok(a.flatten_from(1)?.max(1)?.reshape(shape)?)
    } else {
        Ok(a.max_all()?)
    }
}

/// Symmetric weight quantization with the range max |w| (per output channel or tensor).
pub fn quantize_weight(
    w: &Tensor,
    bits: u32,
    per_channel: bool,
    mode: GradientMode,
) -> Result<Tensor> {
    let (q_min, q_max) = code_range(bits, Signedness::Symmetric)?;
    let r = abs_max(w, per_channel)?.to_dtype(DType::F32)?;
    // Zero ranges become scale 1: s = r/q_max where r > 0, else 1.
    let positive = r.gt(&r.zeros_like()?)?;
    let scale = positive.where_cond(&(&r / q_max as f64)?, &r.ones_like()?)?;
    fake_quant(w, &scale, q_min, q_max, mode)
}

/// Unsigned activation quantization with a calibrated range.
pub fn quantize_activation(
    x: &Tensor,
    bits: u32,
    range: f32,
    mode: GradientMode,
) -> Result<Tensor> {
    let (q_min, q_max) = code_range(bits, Signedness::Unsigned)?;
    let s = scale_for(range, q_max);
    let fused = crate::kernels::fake_quant::FakeQuant {
        scale: s,
        q_min,
        q_max,
        ste: mode == GradientMode::Ste,
    };
    if let Some(y) = crate::kernels::fake_quant::fake_quant_scalar(x, fused)? {
        return Ok(y);
    }
    let scale = Tensor::new(s, x.device())?;
    fake_quant(x, &scale, q_min, q_max, mode)
}
