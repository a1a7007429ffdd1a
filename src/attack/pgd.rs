//! Projected gradient descent under the L∞ norm (Madry et al. 2018): an optional uniform
//! random start in the ε-ball (clipped to [0, 1]), then `steps` signed-gradient ascent
//! steps of size `step`, each followed by projection onto the ball ∩ [0, 1].

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{input_gradient, project_linf};
use crate::model::Classifier;
use crate::rng::Rng;
use crate::{Error, Result};

/// PGD settings (ε and step in [0, 1] pixel units).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgdConfig {
    /// Radius of the L∞ ball. Default 8/255.
    pub eps: f64,
    /// Step size. Default 2/255.
    pub step: f64,
    /// Number of steps. Default 10.
    pub steps: usize,
    /// Uniform random start in the ball. Default true.
    pub random_start: bool,
}

impl Default for PgdConfig {
    fn default() -> Self {
        PgdConfig {
            eps: 8.0 / 255.0,
            step: 2.0 / 255.0,
            steps: 10,
            random_start: true,
        }
    }
}

impl PgdConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps >= 0.0 && self.eps <= 1.0) {
            return Err(Error::config(
                "pgd.eps",
                self.eps,
                "must be in [0, 1] (pixel units: write 8/255, not 8)",
            ));
        }
        if !(self.step > 0.0 && self.step.is_finite()) {
            return Err(Error::config("pgd.step", self.step, "must be > 0"));
        }
        Ok(())
    }
}

/// Adversarial examples for `x` (B×3×32×32 in [0, 1]) with labels `y` (u32).
pub fn pgd_linf<M: Classifier + ?Sized>(
    model: &M,
    x: &Tensor,
    y: &Tensor,
    cfg: &PgdConfig,
    rng: &mut Rng,
) -> Result<Tensor> {
    cfg.validate()?;
    let x = x.detach();
    if cfg.eps == 0.0 {
        return Ok(x);
    }
    let mut x_adv = if cfg.random_start {
        let noise = rng.uniform_vec(x.elem_count(), -cfg.eps as f32, cfg.eps as f32);
        let noise = Tensor::from_vec(noise, x.shape(), x.device())?;
        (&x + noise)?.clamp(0f32, 1f32)?
    } else {
        x.clone()
    };
    for _ in 0..cfg.steps {
        let (_, g) = input_gradient(model, &x_adv, y)?;
        let stepped = (x_adv + (g.sign()? * cfg.step)?)?;
        x_adv = project_linf(&stepped, &x, cfg.eps)?;
    }
    Ok(x_adv)
}
