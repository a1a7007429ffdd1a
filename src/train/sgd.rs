//! SGD with momentum, Nesterov momentum and (coupled) weight decay — PyTorch's `torch.optim.SGD`
//! update, which candle-nn's `SGD` lacks:
//!
//! ```text
//! d   = g + λ·p                       (weight decay λ)
//! buf = d                 on the first step
//! buf = μ·buf + (1 - τ)·d  afterwards (momentum μ, dampening τ)
//! d   = d + μ·buf  (Nesterov)   or   d = buf
//! p   = p - lr·d
//! ```
//!
//! The momentum buffers are the optimizer's state; [`Sgd::state`] and [`Sgd::load_state`]
//! save and restore them by parameter name for exact resumption.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// SGD settings (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Momentum μ. Default 0.9.
    pub momentum: f64,
    /// Dampening τ. Default 0.
    pub dampening: f64,
    /// Nesterov momentum. Default true.
    pub nesterov: bool,
    /// Weight decay λ (L2, coupled), applied to every trainable tensor. Default 5e-4.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 5e-4,
        }
    }
}

impl SgdConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::config(
                "sgd.momentum",
                self.momentum,
                "must be in [0, 1)",
            ));
        }
        if !(0.0..=1.0).contains(&self.dampening) {
            return Err(Error::config(
                "sgd.dampening",
                self.dampening,
                "must be in [0, 1]",
            ));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::config(
                "sgd.nesterov",
                true,
                "Nesterov momentum needs momentum > 0 and dampening 0",
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::config(
                "sgd.weight_decay",
                self.weight_decay,
                "must be ≥ 0",
            ));
        }
        Ok(())
    }
}

/// The optimizer over a fixed list of named variables.
pub struct Sgd {
    vars: Vec<(String, Var)>,
    buffers: Vec<Option<Tensor>>,
    /// Weight decay per variable (the configured one unless overridden).
    decays: Vec<f64>,
    cfg: SgdConfig,
}

impl Sgd {
    /// An optimizer for `vars` (names are the checkpoint names).
    pub fn new(vars: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Self> {
        cfg.validate()?;
        let buffers = vec![None; vars.len()];
        let decays = vec![cfg.weight_decay; vars.len()];
        Ok(Sgd {
            vars,
            buffers,
            decays,
            cfg,
        })
    }

    /// Adds a variable with its own weight decay (PACT's α and its L2 penalty).
    pub fn add_var(&mut self, name: String, var: Var, weight_decay: f64) {
        self.vars.push((name, var));
        self.buffers.push(None);
        self.decays.push(weight_decay);
    }

    /// One update with learning rate `lr`. Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = &self.cfg;
        for (((_, var), buf), &wd) in self
            .vars
            .iter()
            .zip(self.buffers.iter_mut())
            .zip(&self.decays)
        {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients carry their own backprop graph (which references the forward
            // pass); detached, the momentum buffer does not keep every step's graph alive.
            let g = g.detach();
            let p = var.as_tensor().detach();
            let mut d = if wd != 0.0 { (g + (&p * wd)?)? } else { g };
            if c.momentum != 0.0 {
                let b = match buf.take() {
                    None => d.clone(),
                    Some(b) => ((b * c.momentum)? + (&d * (1.0 - c.dampening))?)?,
                };
                d = if c.nesterov {
                    (d + (&b * c.momentum)?)?
                } else {
                    b.clone()
                };
                *buf = Some(b);
            }
            var.set(&(p - (d * lr)?)?)?;
        }
        Ok(())
    }

    /// The momentum buffers by parameter name (only those that exist yet).
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (format!("momentum.{n}"), b.clone())))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::state`].
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for ((name, var), buf) in self.vars.iter().zip(self.buffers.iter_mut()) {
            if let Some(t) = state.get(&format!("momentum.{name}")) {
                if t.dims() != var.dims() {
                    return Err(Error::config(
                        "optimizer state",
                        format!("momentum.{name}"),
                        format!("shape {:?}, expected {:?}", t.dims(), var.dims()),
                    ));
                }
                *buf = Some(t.to_device(var.device())?);
            }
        }
        Ok(())
    }
}
