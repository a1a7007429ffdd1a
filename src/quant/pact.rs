//! PACT (Choi et al. 2018) activations and DoReFa (Zhou et al. 2016) weights, for
//! quantization-aware training.
//!
//! PACT: `y = clip(x, 0, α)` with a learnable α per layer, `y_q = round(y·(2^k−1)/α)·α/(2^k−1)`
//! (round half to even), with straight-through rounding and exact gradients built from masks
//! (not `clamp`, whose gradient is halved at the bound): ∂y_q/∂x = 1 for 0 ≤ x < α, else 0;
//! ∂y_q/∂α = 1 for x ≥ α, else 0. In raw mode rounding keeps its true zero gradient.
//!
//! DoReFa: `w_q = 2·quant_k(tanh(w) / (2·max|tanh(w)|) + 0.5) − 1`,
//! `quant_k(u) = round(u·(2^k−1))/(2^k−1)`, straight-through for the rounding (the
//! gradient flows through tanh and the normalization).

use candle_core::Tensor;

use super::round::round_half_even_tensor;
use super::GradientMode;
use crate::Result;

/// PACT with `bits` bits and clipping level `alpha` (a scalar tensor, possibly a variable).
pub fn pact(x: &Tensor, alpha: &Tensor, bits: u32, mode: GradientMode) -> Result<Tensor> {
    if mode == GradientMode::Ste {
        if let Some(y) = crate::kernels::pact::pact_ste(x, alpha, bits)? {
            return Ok(y);
        }
    }
    pact_composed(x, alpha, bits, mode)
}

/// PACT from candle's elementwise ops (CUDA, raw mode, and the reference of the fused CPU
/// kernel).
pub fn pact_composed(x: &Tensor, alpha: &Tensor, bits: u32, mode: GradientMode) -> Result<Tensor> {
    let levels = ((1u64 << bits) - 1) as f64;
    let a = alpha.broadcast_as(x.shape())?;
    let below = x.lt(&a)?.to_dtype(x.dtype())?;
    let nonneg = x.ge(&x.zeros_like()?)?.to_dtype(x.dtype())?;
    let inside = (&below * &nonneg)?;
    let above = (below.ones_like()? - &below)?;
    // clip(x, 0, α) with gradient 1 inside for x, and 1 above for α.
    let y = ((x * &inside)? + (a * &above)?)?;
    let step = (alpha.detach() / levels)?;
    let q = round_half_even_tensor(&y.detach().broadcast_div(&step)?)?.broadcast_mul(&step)?;
    match mode {
        GradientMode::Ste => Ok((&y + (q - &y)?.detach())?),
        GradientMode::Raw => Ok(q),
    }
}

/// DoReFa weights with `bits` bits.
pub fn dorefa(w: &Tensor, bits: u32, mode: GradientMode) -> Result<Tensor> {
    let levels = ((1u64 << bits) - 1) as f64;
    let t = w.tanh()?;
    let m = t.abs()?.max_all()?;
    let m = m.maximum(&Tensor::new(1e-12f32, w.device())?)?;
    let u = (t.broadcast_div(&(m * 2.0)?)? + 0.5)?;
    let uq = (round_half_even_tensor(&(u.detach() * levels)?)? / levels)?;
    let uq = match mode {
        GradientMode::Ste => (&u + (uq - &u)?.detach())?,
        GradientMode::Raw => uq,
    };
    Ok(((uq * 2.0)? - 1.0)?)
}
