//! Square attack, L∞ (Andriushchenko et al. 2020): score-based and gradient-free.
//!
//! Start from vertical stripes (each column of each channel ±ε); then, for every example
//! the model still classifies correctly, propose changing one random s×s window to new
//! random ±ε values per channel and keep the proposal if the margin z_y − max_{i≠y} z_i
//! drops. The window side shrinks with the schedule of the paper (p halves at 10, 50, 200,
//! 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 iterations, rescaled to the budget),
//! s = round(√(p·H·W)). One query per example per iteration; an example stops once fooled.
//! Simplification: a proposal is not re-drawn when it happens to equal the current window.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{margins, Attack, Norm};
use crate::model::Classifier;
use crate::rng::Rng;
use crate::{Error, Result};

/// Square attack settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Square {
    /// Query budget per example. Default 5,000.
    pub queries: usize,
    /// Initial fraction of pixels changed per proposal. Default 0.8.
    pub p_init: f64,
}

impl Default for Square {
    fn default() -> Self {
        Square {
            queries: 5000,
            p_init: 0.8,
        }
    }
}

impl Square {
    /// The fraction p at iteration `it` of `n` (the paper's schedule, rescaled to n).
    pub fn p_at(&self, it: usize, n: usize) -> f64 {
        let t = (it as f64 / n.max(1) as f64 * 10_000.0) as usize;
        let div = match t {
            0..=10 => 1.0,
            11..=50 => 2.0,
            51..=200 => 4.0,
            201..=500 => 8.0,
            501..=1000 => 16.0,
            1001..=2000 => 32.0,
            2001..=4000 => 64.0,
            4001..=6000 => 128.0,
            6001..=8000 => 256.0,
            _ => 512.0,
        };
        self.p_init / div
    }
}

impl Attack for Square {
    fn name(&self) -> String {
        format!("square-{}", self.queries)
    }
    fn supports(&self, norm: Norm) -> bool {
        norm == Norm::Linf
    }
    fn uses_gradients(&self) -> bool {
        false
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
        if norm != Norm::Linf {
            return Err(Error::config(
                "norm",
                norm,
                "the Square attack here is L∞ only",
            ));
        }
        super::check_eps(norm, eps)?;
        if self.queries == 0 || !(self.p_init > 0.0 && self.p_init <= 1.0) {
            return Err(Error::config(
                "square",
                format!("queries {}, p_init {}", self.queries, self.p_init),
                "queries ≥ 1 and p_init in (0, 1]",
            ));
        }
        let x = x.detach();
        if eps == 0.0 {
            return Ok(x);
        }
        let (b, c, h, w) = x.dims4()?;
        let dev = x.device().clone();
        let labels = y.to_vec1::<u32>()?;
        let e = eps as f32;
        // Vertical stripes.
        let stripes: Vec<f32> = (0..b * c * w)
            .map(|_| if rng.coin() { e } else { -e })
            .collect();
        let mut delta = Tensor::from_vec(stripes, (b, c, 1, w), &dev)?
            .broadcast_as((b, c, h, w))?
            .contiguous()?;
        let adv = |d: &Tensor, xs: &Tensor| -> Result<Tensor> { Ok((xs + d)?.clamp(0f32, 1f32)?) };
        let mut margin = margins(&model.forward_t(&adv(&delta, &x)?, false)?, &labels)?;
        for it in 1..self.queries {
            let active: Vec<u32> = (0..b as u32)
                .filter(|&i| margin[i as usize] > 0.0)
                .collect();
            if active.is_empty() {
                break;
            }
            let a = active.len();
            let p = self.p_at(it, self.queries);
            let s = ((p * (h * w) as f64).sqrt().round() as usize).clamp(1, h - 1);
            let mut mask = vec![0u8; a * h * w];
            let mut vals = Vec::with_capacity(a * c);
            for k in 0..a {
                let (vh, vw) = (rng.below(h - s + 1), rng.below(w - s + 1));
                for r in vh..vh + s {
                    mask[k * h * w + r * w + vw..k * h * w + r * w + vw + s].fill(1);
                }
                for _ in 0..c {
                    vals.push(if rng.coin() { e } else { -e });
                }
            }
            let idx = Tensor::from_vec(active.clone(), a, &dev)?;
            let xa = x.index_select(&idx, 0)?;
            let da = delta.index_select(&idx, 0)?;
            let mask = Tensor::from_vec(mask, (a, 1, h, w), &dev)?.broadcast_as((a, c, h, w))?;
            let vals = Tensor::from_vec(vals, (a, c, 1, 1), &dev)?.broadcast_as((a, c, h, w))?;
            let proposal = mask.where_cond(&vals, &da)?;
            let ya: Vec<u32> = active.iter().map(|&i| labels[i as usize]).collect();
            let m_new = margins(&model.forward_t(&adv(&proposal, &xa)?, false)?, &ya)?;
            let accept: Vec<bool> = active
                .iter()
                .zip(&m_new)
                .map(|(&i, &m)| m < margin[i as usize])
                .collect();
            if accept.iter().any(|&v| v) {
                let diff = super::select(&accept, &(proposal - &da)?, &da.zeros_like()?)?;
                delta = delta.index_add(&idx, &diff, 0)?;
                for (k, &i) in active.iter().enumerate() {
                    if accept[k] {
                        margin[i as usize] = m_new[k];
                    }
                }
            }
        }
        adv(&delta, &x)
    }
}
