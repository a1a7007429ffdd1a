//! FGSM (Goodfellow et al. 2015): one step of size ε along the sign of the input gradient
//! of the cross-entropy (L∞); for L2, one step of length ε along the normalized gradient
//! (FGM). No random start. The result is clipped to [0, 1].

use candle_core::Tensor;

use super::{direction, loss_and_gradient, project, Attack, Loss, Norm};
use crate::model::Classifier;
use crate::rng::Rng;
use crate::Result;

/// FGSM / FGM.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fgsm;

impl Attack for Fgsm {
    fn name(&self) -> String {
        "fgsm".into()
    }
    fn supports(&self, _norm: Norm) -> bool {
        true
    }
    fn perturb(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        norm: Norm,
        eps: f64,
        _rng: &mut Rng,
    ) -> Result<Tensor> {
        super::check_eps(norm, eps)?;
        let x = x.detach();
        if eps == 0.0 {
            return Ok(x);
        }
        let (_, _, g) = loss_and_gradient(model, &x, y, Loss::Ce)?;
        let stepped = (&x + (direction(&g, norm)? * eps)?)?;
        project(&stepped, &x, norm, eps)
    }
}
