//! Projected gradient descent (Madry et al. 2018), L∞ and L2: an optional random start
//! uniform in the ε-ball (clipped to [0, 1]), then `steps` ascent steps on the
//! cross-entropy — along the gradient's sign (L∞) or its unit L2 direction (L2) — each
//! followed by projection onto the ball ∩ [0, 1]. With restarts, each example keeps the
//! first restart's result that fools the model (else the last).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{direction, input_gradient, project, random_start, with_restarts, Attack, Norm};
use crate::model::Classifier;
use crate::rng::Rng;
use crate::{Error, Result};

/// PGD settings with a fixed ε and step (adversarial training; ε and step in pixel units).
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

/// One PGD run's settings.
#[derive(Debug, Clone, Copy)]
struct Run {
    norm: Norm,
    eps: f64,
    step: f64,
    steps: usize,
    random_start: bool,
}

impl Run {
    /// The PGD iterations for one start.
    fn run(&self, model: &dyn Classifier, x: &Tensor, y: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let mut x_adv = if self.random_start {
            random_start(x, self.norm, self.eps, rng)?
        } else {
            x.clone()
        };
        for _ in 0..self.steps {
            let (_, g) = input_gradient(model, &x_adv, y)?;
            let stepped = (x_adv + (direction(&g, self.norm)? * self.step)?)?;
            x_adv = project(&stepped, x, self.norm, self.eps)?;
        }
        Ok(x_adv)
    }
}

/// PGD L∞ with a fixed configuration (used by adversarial training and its evaluation).
pub fn pgd_linf(
    model: &dyn Classifier,
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
    let run = Run {
        norm: Norm::Linf,
        eps: cfg.eps,
        step: cfg.step,
        steps: cfg.steps,
        random_start: cfg.random_start,
    };
    run.run(model, &x, y, rng)
}

/// PGD as an [`Attack`] over many ε: the step is `step_fraction`·ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pgd {
    /// Steps. Default 10.
    pub steps: usize,
    /// Step size as a fraction of ε. Default 0.25 (ε/4, the study's recipe).
    pub step_fraction: f64,
    /// Random starts (≥ 1). Default 1.
    pub restarts: usize,
    /// Random start (if false, restarts > 1 are identical). Default true.
    pub random_start: bool,
}

impl Default for Pgd {
    fn default() -> Self {
        Pgd {
            steps: 10,
            step_fraction: 0.25,
            restarts: 1,
            random_start: true,
        }
    }
}

impl Attack for Pgd {
    fn name(&self) -> String {
        if self.restarts > 1 {
            format!("pgd-{}x{}", self.steps, self.restarts)
        } else {
            format!("pgd-{}", self.steps)
        }
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
        rng: &mut Rng,
    ) -> Result<Tensor> {
        super::check_eps(norm, eps)?;
        if self.restarts == 0 || self.step_fraction.is_nan() || self.step_fraction <= 0.0 {
            return Err(Error::config(
                "pgd",
                format!(
                    "restarts {}, step_fraction {}",
                    self.restarts, self.step_fraction
                ),
                "restarts must be ≥ 1 and step_fraction > 0",
            ));
        }
        let x = x.detach();
        if eps == 0.0 {
            return Ok(x);
        }
        let run = Run {
            norm,
            eps,
            step: self.step_fraction * eps,
            steps: self.steps,
            random_start: self.random_start,
        };
        with_restarts(model, &x, y, self.restarts, |xs, ys| {
            run.run(model, xs, ys, rng)
        })
    }
}
