//! Learning-rate schedules as pure functions of the step: `lr(step, total_steps)`.
//!
//! - `constant`: the peak rate throughout;
//! - `cosine`: peak·½(1 + cos(π·t)), t = step/total (no warm-up);
//! - `one-cycle` (PyTorch's `OneCycleLR`, cosine annealing both ways): from peak/div_factor
//!   up to peak over the first `pct_start` of the steps, then down to
//!   peak/(div_factor·final_div_factor);
//! - `multistep`: peak·γ^k after the k-th milestone (milestones as fractions of training).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum LrSchedule {
    Constant,
    Cosine,
    OneCycle {
        /// Fraction of the steps spent rising. Default 0.25.
        pct_start: f64,
        /// Initial rate = peak / div_factor. Default 25.
        div_factor: f64,
        /// Final rate = initial / final_div_factor. Default 1e4.
        final_div_factor: f64,
    },
    MultiStep {
        /// Fractions of training after which the rate is multiplied by `gamma`.
        milestones: Vec<f64>,
        /// Default 0.1.
        gamma: f64,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::one_cycle()
    }
}

fn cos_interp(from: f64, to: f64, t: f64) -> f64 {
    to + (from - to) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

impl LrSchedule {
    /// One-cycle with its defaults.
    pub fn one_cycle() -> Self {
        LrSchedule::OneCycle {
            pct_start: 0.25,
            div_factor: 25.0,
            final_div_factor: 1e4,
        }
    }

    /// Multistep at 50% and 75% of training, γ = 0.1.
    pub fn multistep() -> Self {
        LrSchedule::MultiStep {
            milestones: vec![0.5, 0.75],
            gamma: 0.1,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        match self {
            LrSchedule::Constant | LrSchedule::Cosine => Ok(()),
            LrSchedule::OneCycle {
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                if !(*pct_start > 0.0 && *pct_start < 1.0) {
                    return Err(Error::config(
                        "schedule.pct_start",
                        pct_start,
                        "must be in (0, 1)",
                    ));
                }
                if !(*div_factor >= 1.0 && *final_div_factor >= 1.0) {
                    return Err(Error::config(
                        "schedule.div_factor",
                        format!("{div_factor}, {final_div_factor}"),
                        "div_factor and final_div_factor must be ≥ 1",
                    ));
                }
                Ok(())
            }
            LrSchedule::MultiStep { milestones, gamma } => {
                if milestones.iter().any(|m| !(*m > 0.0 && *m < 1.0)) {
                    return Err(Error::config(
                        "schedule.milestones",
                        format!("{milestones:?}"),
                        "each milestone is a fraction of training in (0, 1)",
                    ));
                }
                if !(*gamma > 0.0 && *gamma <= 1.0) {
                    return Err(Error::config("schedule.gamma", gamma, "must be in (0, 1]"));
                }
                Ok(())
            }
        }
    }

    /// The rate at `step` (0-based) of `total` steps, for peak rate `peak`.
    pub fn lr(&self, peak: f64, step: usize, total: usize) -> f64 {
        let total = total.max(1);
        let t = step.min(total) as f64 / total as f64;
        match self {
            LrSchedule::Constant => peak,
            LrSchedule::Cosine => cos_interp(peak, 0.0, t),
            LrSchedule::OneCycle {
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let initial = peak / div_factor;
                let min = initial / final_div_factor;
                let up = (pct_start * total as f64).max(1.0);
                let s = step as f64;
                if s < up {
                    cos_interp(initial, peak, s / up)
                } else {
                    let down = (total as f64 - up).max(1.0);
                    cos_interp(peak, min, ((s - up) / down).min(1.0))
                }
            }
            LrSchedule::MultiStep { milestones, gamma } => {
                let k = milestones.iter().filter(|&&m| t >= m).count();
                peak * gamma.powi(k as i32)
            }
        }
    }
}
