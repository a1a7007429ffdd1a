//! Transfer attack: adversarial examples crafted with PGD on a *source* model (for the
//! study, the full-precision model) and evaluated on the target. It uses no gradient of
//! the target, so a target that resists white-box attacks but not transfer is masking its
//! gradients.

use candle_core::Tensor;

use super::pgd::Pgd;
use super::{Attack, Norm};
use crate::model::Classifier;
use crate::rng::Rng;
use crate::Result;

/// PGD on `source`, evaluated on whatever model [`Attack::perturb`] is given.
pub struct Transfer {
    /// The model the examples are crafted on.
    pub source: Box<dyn Classifier>,
    /// A name for the source (its checkpoint path).
    pub source_name: String,
    /// The PGD used on the source.
    pub pgd: Pgd,
}

impl Attack for Transfer {
    fn name(&self) -> String {
        format!("transfer:{}", self.source_name)
    }
    fn supports(&self, _norm: Norm) -> bool {
        true
    }
    fn uses_gradients(&self) -> bool {
        false
    }
    fn perturb(
        &self,
        _target: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        norm: Norm,
        eps: f64,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        self.pgd.perturb(self.source.as_ref(), x, y, norm, eps, rng)
    }
}
