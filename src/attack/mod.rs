//! Adversarial attacks over any [`Classifier`], in evaluation mode, computing the input
//! gradient only.
//!
//! Conventions (ANCHORS.md): images in [0, 1], ε in pixel units (8/255), random starts
//! uniform in the ε-ball and then clipped to [0, 1], every output inside the ball and in
//! [0, 1]. Random draws come from the caller's seeded [`crate::rng::Rng`].

pub mod pgd;

use candle_core::{Tensor, Var};

use crate::model::Classifier;
use crate::Result;

pub use pgd::{pgd_linf, PgdConfig};

/// Mean cross-entropy of logits against u32 labels.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::loss::cross_entropy(logits, labels)?)
}

/// The loss (summed over the batch, so each example's gradient is its own) and its
/// gradient with respect to the input `x`. The model should hold no variables (a
/// [`crate::model::ResNet20::frozen`] view), so that no weight gradient is computed.
pub fn input_gradient<M: Classifier + ?Sized>(
    model: &M,
    x: &Tensor,
    labels: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let xv = Var::from_tensor(&x.detach())?;
    let logits = model.forward_t(xv.as_tensor(), false)?;
    let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
    let n = x.dim(0)? as f64;
    let loss_sum = (loss * n)?;
    let grads = loss_sum.backward()?;
    let g = match grads.get(xv.as_tensor()) {
        Some(g) => g.detach(),
        None => xv.as_tensor().zeros_like()?,
    };
    Ok((loss_sum.detach(), g))
}

/// Projects `x_adv` onto the L∞ ball of radius `eps` around `x`, intersected with [0, 1].
pub fn project_linf(x_adv: &Tensor, x: &Tensor, eps: f64) -> Result<Tensor> {
    let lo = (x - eps)?.clamp(0f32, 1f32)?;
    let hi = (x + eps)?.clamp(0f32, 1f32)?;
    Ok(x_adv.maximum(&lo)?.minimum(&hi)?)
}
