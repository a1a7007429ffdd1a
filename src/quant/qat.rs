//! Quantization-aware training (the paper's QAT): PACT activations with a learnable α per
//! site and DoReFa weights (first conv and last linear at `first_last_bits`), straight-through
//! gradients, through the model's quantizer seam ([`PactSeam`]).
//!
//! α starts at the calibrated maximum of its site's full-precision activation (or a fixed
//! value), is trained with an L2 penalty (weight decay `alpha_decay`, i.e. the gradient of
//! (λ/2)·α²), and is clamped to [`QatConfig::alpha_bounds`] after every step: α that runs
//! away (a PyTorch PACT W4A4 run saw α reach −4,390) cannot happen here, and its range is
//! logged every epoch.
//!
//! After training, [`export`] turns the model into an ordinary quantized checkpoint: the
//! DoReFa-quantized weights as the state and, since PACT's forward equals an unsigned
//! uniform quantizer of range α, the activations as a [`super::seam::UniformSeam`] with the
//! learnt α as ranges — exactly reloadable, and evaluated and attacked like a PTQ model.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::pact::{dorefa, pact};
use super::seam::{UniformConfig, UniformSeam};
use super::GradientMode;
use crate::model::resnet20::{tensor_specs, TensorKind};
use crate::model::{QuantSeam, ResNet20};
use crate::{Error, Result};

/// How α starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlphaInit {
    /// The calibrated maximum of the site's full-precision activation.
    Calibrated,
    /// A fixed value (PACT's paper: 10).
    Fixed(f64),
}

impl AlphaInit {
    /// A fixed start must be a finite, positive number.
    pub fn validate(self, name: &'static str) -> Result<()> {
        match self {
            AlphaInit::Fixed(v) if !(v.is_finite() && v > 0.0) => Err(Error::config(
                name,
                v,
                "α's start must be a finite number > 0 (or \"calibrated\")",
            )),
            _ => Ok(()),
        }
    }
}

/// QAT settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QatConfig {
    pub bits: UniformConfig,
    /// Default calibrated.
    pub alpha_init: AlphaInit,
    /// L2 penalty (weight decay) on α. Default 2e-4.
    pub alpha_decay: f64,
    /// α is clamped to this range after every step. Default [0.01, 100].
    pub alpha_bounds: (f64, f64),
    /// After training, BatchNorm's running statistics are re-estimated as the average over
    /// this many training batches (clean, with the training's augmentation) with the final
    /// quantized weights; 0 keeps the momentum estimate. Only a fine-tuning of a few dozen
    /// steps needs it (momentum 0.1 forgets the starting statistics after ~30 steps).
    /// Default 0: on trained models it gains nothing, and re-estimating without the
    /// augmentation lost 1.5 pp on the golden natural checkpoint.
    pub bn_reestimate_batches: usize,
}

impl Default for QatConfig {
    fn default() -> Self {
        QatConfig {
            bits: UniformConfig::default(),
            alpha_init: AlphaInit::Calibrated,
            alpha_decay: 2e-4,
            alpha_bounds: (0.01, 100.0),
            bn_reestimate_batches: 0,
        }
    }
}

/// PACT + DoReFa through the quantizer seam.
pub struct PactSeam {
    pub config: QatConfig,
    pub alphas: BTreeMap<String, Var>,
    pub mode: GradientMode,
}

impl PactSeam {
    /// A seam with α per activation site (`ranges` gives the calibrated maxima).
    pub fn new(config: QatConfig, ranges: &BTreeMap<String, f32>, device: &Device) -> Result<Self> {
        let (lo, hi) = config.alpha_bounds;
        if !(lo > 0.0 && hi > lo) {
            return Err(Error::config(
                "alpha_bounds",
                format!("({lo}, {hi})"),
                "need 0 < low < high",
            ));
        }
        config.alpha_init.validate("alpha_init")?;
        let mut alphas = BTreeMap::new();
        for (site, &r) in ranges {
            let a = match config.alpha_init {
                AlphaInit::Calibrated => r as f64,
                AlphaInit::Fixed(v) => v,
            }
            .clamp(lo, hi);
            alphas.insert(site.clone(), Var::new(a as f32, device)?);
        }
        Ok(PactSeam {
            config,
            alphas,
            mode: GradientMode::Ste,
        })
    }

    /// Current α values.
    pub fn alpha_values(&self) -> Result<BTreeMap<String, f32>> {
        self.alphas
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_scalar::<f32>()?)))
            .collect()
    }

    fn weight_bits(&self, layer: &str) -> Option<u32> {
        self.config.bits.weight_bits.map(|b| {
            if layer == "conv1" || layer == "linear" {
                self.config.bits.first_last_bits
            } else {
                b
            }
        })
    }
}

impl QuantSeam for PactSeam {
    fn weight(&self, layer: &str, w: &Tensor) -> Result<Tensor> {
        match self.weight_bits(layer) {
            None => Ok(w.clone()),
            Some(b) => dorefa(w, b, self.mode),
        }
    }

    fn activation(&self, site: &str, x: &Tensor) -> Result<Tensor> {
        match self.config.bits.activation_bits {
            None => Ok(crate::kernels::relu(x)?),
            Some(b) => {
                let a = self
                    .alphas
                    .get(site)
                    .ok_or_else(|| Error::config("activation site", site, "has no PACT α"))?;
                pact(x, a.as_tensor(), b, self.mode)
            }
        }
    }

    fn describe(&self) -> String {
        format!("qat-pact-dorefa-{}", self.config.bits.name())
    }

    fn quantizes(&self) -> bool {
        true
    }

    fn persist(&self) -> Result<Vec<(String, String)>> {
        Ok(super::seam::StoredSeam::Pact {
            bits: self.config.bits.clone(),
            alphas: self.alpha_values()?,
            alpha_bounds: self.config.alpha_bounds,
        }
        .to_metadata())
    }

    fn with_gradient_mode(&self, mode: GradientMode) -> Option<crate::model::Seam> {
        // The same α variables: a view of the training seam, not a copy.
        Some(std::sync::Arc::new(PactSeam {
            config: self.config.clone(),
            alphas: self.alphas.clone(),
            mode,
        }))
    }

    fn trainable(&self) -> Vec<(String, Var, f64)> {
        if self.config.bits.activation_bits.is_none() {
            return Vec::new();
        }
        self.alphas
            .iter()
            .map(|(k, v)| (format!("{k}.alpha"), v.clone(), self.config.alpha_decay))
            .collect()
    }

    fn after_step(&self) -> Result<()> {
        let (lo, hi) = self.config.alpha_bounds;
        for v in self.alphas.values() {
            let c = v.as_tensor().detach().clamp(lo as f32, hi as f32)?;
            v.set(&c)?;
        }
        Ok(())
    }
}

/// The trained model as a plain quantized model: DoReFa-quantized weights in the state,
/// PACT activations as a uniform quantizer with range α.
pub fn export(model: &ResNet20, seam: &PactSeam) -> Result<ResNet20> {
    let mut state = BTreeMap::new();
    for s in tensor_specs() {
        let t = model.tensor(&s.name)?.detach();
        let layer = s.name.trim_end_matches(".weight");
        let t = match s.kind {
            TensorKind::ConvWeight | TensorKind::LinearWeight => seam.weight(layer, &t)?.detach(),
            _ => t,
        };
        state.insert(s.name.clone(), t);
    }
    let plain = ResNet20::from_tensors(state, model.num_batches_tracked(), model.device(), false)?;
    let ranges = seam.alpha_values()?;
    Ok(plain.with_seam(std::sync::Arc::new(UniformSeam {
        config: UniformConfig {
            weight_bits: None,
            ..seam.config.bits.clone()
        },
        ranges,
        mode: GradientMode::Ste,
    })))
}
