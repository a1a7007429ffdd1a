//! APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
//! of diverse parameter-free attacks", Algorithm 1), with the cross-entropy (APGD-CE) or the
//! difference-of-logits-ratio loss (APGD-DLR), L∞ or L2; and APGD-T ([`ApgdTargeted`]):
//! the same iteration on the targeted DLR loss, once per target class.
//!
//! - start: a uniform random point of the ε-ball; first step size η = 2ε;
//! - each iteration: z = P(x_k + η·d(∇)), x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))
//!   with momentum α = 0.75 (α = 1 on the first step), d the sign (L∞) or unit direction (L2);
//! - checkpoints: the first after ⌈0.22·N⌉ iterations, each later interval shorter by
//!   ⌈0.03·N⌉, never below ⌈0.06·N⌉; at a checkpoint, an example halves η and restarts from
//!   its best point if fewer than ρ = 0.75 of the steps since the last checkpoint increased
//!   its loss, or if neither its step size was halved nor its best loss improved since then;
//! - every iterate that fools the model is kept (the attack returns, per example, the first
//!   fooling point found, else the point of highest loss).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    direction, loss_and_gradient, loss_and_gradient_of, per_target, predictions, project,
    random_start, select, targeted_dlr, with_restarts, Attack, Loss, Norm,
};
use crate::model::Classifier;
use crate::rng::Rng;
use crate::{Error, Result};

/// APGD settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Apgd {
    /// The loss maximized.
    pub loss: Loss,
    /// Iterations N. Default 100.
    pub iterations: usize,
    /// Momentum α. Default 0.75.
    pub momentum: f64,
    /// Fraction ρ of loss-increasing steps required between checkpoints. Default 0.75.
    pub rho: f64,
    /// Random restarts. Default 1.
    pub restarts: usize,
}

impl Default for Apgd {
    fn default() -> Self {
        Apgd {
            loss: Loss::Ce,
            iterations: 100,
            momentum: 0.75,
            rho: 0.75,
            restarts: 1,
        }
    }
}

impl Apgd {
    /// APGD with the DLR loss.
    pub fn dlr() -> Self {
        Apgd {
            loss: Loss::Dlr,
            ..Apgd::default()
        }
    }

    /// The checkpoint iterations w_1 < w_2 < … (< N).
    pub fn checkpoints(n: usize) -> Vec<usize> {
        let first = ((0.22 * n as f64).ceil() as usize).max(1);
        let decr = ((0.03 * n as f64).ceil() as usize).max(1);
        let min = ((0.06 * n as f64).ceil() as usize).max(1);
        let mut out = Vec::new();
        let (mut w, mut interval) = (first, first);
        while w < n {
            out.push(w);
            interval = interval.saturating_sub(decr).max(min);
            w += interval;
        }
        out
    }

    /// Logits, per-example loss and input gradient: the configured loss, or the targeted
    /// DLR loss towards `targets`.
    fn loss_grad(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        targets: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match targets {
            None => loss_and_gradient(model, x, y, self.loss),
            Some(t) => loss_and_gradient_of(model, x, |logits| targeted_dlr(logits, y, t)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        targets: Option<&Tensor>,
        norm: Norm,
        eps: f64,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let labels = y.to_vec1::<u32>()?;
        let dev = x.device();
        let checkpoints = Self::checkpoints(self.iterations);
        let mut x_adv = random_start(x, norm, eps, rng)?;
        let (logits, loss, mut grad) = self.loss_grad(model, &x_adv, y, targets)?;
        let mut loss_cur = loss.to_vec1::<f32>()?;
        let mut fooled: Vec<bool> = predictions(&logits)?
            .iter()
            .zip(&labels)
            .map(|(p, l)| p != l)
            .collect();
        let mut x_found = x_adv.clone();
        let mut best_loss = loss_cur.clone();
        let mut x_best = x_adv.clone();
        let mut grad_best = grad.clone();
        let mut step = vec![2.0 * eps; b];
        let mut x_prev = x_adv.clone();
        let mut increases = vec![0usize; b];
        let mut last_check = 0usize;
        let mut best_at_check = best_loss.clone();
        let mut halved_at_check = vec![false; b];
        for k in 0..self.iterations {
            let eta = Tensor::from_vec(
                step.iter().map(|&s| s as f32).collect::<Vec<_>>(),
                (b, 1, 1, 1),
                dev,
            )?;
            let z = project(
                &(&x_adv + direction(&grad, norm)?.broadcast_mul(&eta)?)?,
                x,
                norm,
                eps,
            )?;
            let alpha = if k == 0 { 1.0 } else { self.momentum };
            let moved =
                ((&x_adv + ((&z - &x_adv)? * alpha)?)? + ((&x_adv - &x_prev)? * (1.0 - alpha))?)?;
            x_prev = x_adv;
            x_adv = project(&moved, x, norm, eps)?;
            let (logits, loss, g) = self.loss_grad(model, &x_adv, y, targets)?;
            grad = g;
            let loss_new = loss.to_vec1::<f32>()?;
            let preds = predictions(&logits)?;
            let newly: Vec<bool> = (0..b)
                .map(|i| !fooled[i] && preds[i] != labels[i])
                .collect();
            if newly.iter().any(|&v| v) {
                x_found = select(&newly, &x_adv, &x_found)?;
                for (f, n) in fooled.iter_mut().zip(&newly) {
                    *f |= *n;
                }
            }
            for i in 0..b {
                if loss_new[i] > loss_cur[i] {
                    increases[i] += 1;
                }
            }
            loss_cur = loss_new;
            let improved: Vec<bool> = (0..b).map(|i| loss_cur[i] > best_loss[i]).collect();
            if improved.iter().any(|&v| v) {
                x_best = select(&improved, &x_adv, &x_best)?;
                grad_best = select(&improved, &grad, &grad_best)?;
                for i in 0..b {
                    if improved[i] {
                        best_loss[i] = loss_cur[i];
                    }
                }
            }
            if checkpoints.contains(&(k + 1)) {
                let interval = k + 1 - last_check;
                let reduce: Vec<bool> = (0..b)
                    .map(|i| {
                        let few = (increases[i] as f64) < self.rho * interval as f64;
                        let stalled = !halved_at_check[i] && best_at_check[i] >= best_loss[i];
                        few || stalled
                    })
                    .collect();
                if reduce.iter().any(|&v| v) {
                    x_adv = select(&reduce, &x_best, &x_adv)?;
                    grad = select(&reduce, &grad_best, &grad)?;
                    // Restarting from the best point: no momentum across the restart.
                    x_prev = select(&reduce, &x_best, &x_prev)?;
                    for i in 0..b {
                        if reduce[i] {
                            step[i] /= 2.0;
                        }
                    }
                }
                halved_at_check = reduce;
                best_at_check = best_loss.clone();
                increases.iter_mut().for_each(|c| *c = 0);
                last_check = k + 1;
            }
        }
        select(&fooled, &x_found, &x_best)
    }
}

impl Attack for Apgd {
    fn name(&self) -> String {
        let l = match self.loss {
            Loss::Ce => "ce",
            Loss::Dlr => "dlr",
        };
        if self.restarts > 1 {
            format!("apgd-{l}x{}", self.restarts)
        } else {
            format!("apgd-{l}")
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
        if self.iterations == 0 || self.restarts == 0 {
            return Err(Error::config(
                "apgd",
                format!("iterations {}, restarts {}", self.iterations, self.restarts),
                "both must be ≥ 1",
            ));
        }
        let x = x.detach();
        if eps == 0.0 {
            return Ok(x);
        }
        with_restarts(model, &x, y, self.restarts, |xs, ys| {
            self.run(model, xs, ys, None, norm, eps, rng)
        })
    }
}

/// APGD-T, AutoAttack's targeted APGD: for each of the `targets` classes ranked highest by
/// the clean logits after the first (AutoAttack's `-target_class` for target_class in
/// 2..=targets+1), APGD on the targeted DLR loss, run only on the examples no earlier target
/// has fooled. An example counts as fooled when it is misclassified, as any class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApgdTargeted {
    /// The APGD iteration (its loss is replaced by the targeted DLR loss). Default: 100
    /// iterations, 1 restart.
    pub apgd: Apgd,
    /// Target classes. Default 9 (every other class of CIFAR-10).
    pub targets: usize,
}

impl Default for ApgdTargeted {
    fn default() -> Self {
        ApgdTargeted {
            apgd: Apgd::dlr(),
            targets: 9,
        }
    }
}

impl Attack for ApgdTargeted {
    fn name(&self) -> String {
        if self.apgd.restarts > 1 {
            format!("apgd-tx{}", self.apgd.restarts)
        } else {
            "apgd-t".into()
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
        let a = &self.apgd;
        if a.iterations == 0 || a.restarts == 0 || self.targets == 0 {
            return Err(Error::config(
                "apgd-t",
                format!(
                    "iterations {}, restarts {}, targets {}",
                    a.iterations, a.restarts, self.targets
                ),
                "each must be ≥ 1",
            ));
        }
        let x = x.detach();
        if eps == 0.0 {
            return Ok(x);
        }
        per_target(
            model,
            &x,
            y,
            "apgd-t targets",
            self.targets,
            a.restarts,
            |xs, ys, ts| a.run(model, xs, ys, Some(ts), norm, eps, rng),
        )
    }
}
