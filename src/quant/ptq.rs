//! Post-training quantization of ResNet-20 (the paper's PTQ): BatchNorm folded into each
//! conv, the folded weights quantized per output channel with PWLQ (or uniformly, which is
//! PWLQ with p = m), activations quantized uniformly with ranges calibrated on a seeded
//! set of training images.
//!
//! The result is an ordinary ResNet-20 state: each conv holds its folded, fake-quantized
//! weight and each BatchNorm becomes the identity plus the folded bias (γ = 1, β = b',
//! μ = 0, σ² = 1 − ε), so any ResNet-20 loader (PyTorch's too) computes the quantized
//! weights' network; the activation quantizers (bits and ranges) travel in the checkpoint's
//! metadata and [`super::seam::UniformSeam`] applies them on load.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::pwlq::{quantize_rows, Breakpoint};
use super::seam::{CalibMethod, UniformConfig};
use crate::model::bn_fold::fold;
use crate::model::resnet20::{blocks, ResNet20, BN_EPS};
use crate::{Error, Result};

/// The weight quantizer of PTQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum PtqMethod {
    /// Piecewise linear (Fang et al. 2020).
    Pwlq,
    /// Uniform symmetric, per output channel, range max |w|.
    Uniform,
}

/// PTQ settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PtqConfig {
    pub method: PtqMethod,
    /// Bits (weights, activations, first/last layer weights).
    pub bits: UniformConfig,
    /// PWLQ breakpoint rule. Default search.
    pub breakpoint: Breakpoint,
    /// PWLQ bias correction. Default false.
    pub bias_correction: bool,
    /// Calibration images (seeded, stratified, from the training set). Default 512.
    pub calib: usize,
    /// Activation range: the maximum (default) or a percentile.
    pub calib_range: CalibMethod,
}

impl Default for PtqConfig {
    fn default() -> Self {
        PtqConfig {
            method: PtqMethod::Pwlq,
            bits: UniformConfig::default(),
            breakpoint: Breakpoint::Search,
            bias_correction: false,
            calib: 512,
            calib_range: CalibMethod::Max,
        }
    }
}

/// The (conv, BatchNorm) pairs of ResNet-20.
pub fn conv_bn_pairs() -> Vec<(String, String)> {
    let mut v = vec![("conv1".to_string(), "bn1".to_string())];
    for (b, ..) in blocks() {
        v.push((format!("{b}.conv1"), format!("{b}.bn1")));
        v.push((format!("{b}.conv2"), format!("{b}.bn2")));
    }
    v
}

fn quantize_weight_rows(w: &Tensor, bits: u32, cfg: &PtqConfig) -> Result<(Tensor, Vec<f32>)> {
    let shape = w.dims().to_vec();
    let rows = w.flatten_from(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (kind, bias_correction) = match cfg.method {
        PtqMethod::Pwlq => (cfg.breakpoint, cfg.bias_correction),
        PtqMethod::Uniform => (Breakpoint::Search, false),
    };
    let (q, ps) = match cfg.method {
        PtqMethod::Pwlq => quantize_rows(&rows, bits, kind, bias_correction)?,
        PtqMethod::Uniform => {
            // Uniform = PWLQ with the breakpoint at the range.
            let q = rows
                .iter()
                .map(|r| {
                    let m = r.iter().fold(0f32, |a, v| a.max(v.abs()));
                    super::pwlq::quantize_channel(r, m, bits)
                })
                .collect();
            let ps = rows
                .iter()
                .map(|r| r.iter().fold(0f32, |a, v| a.max(v.abs())))
                .collect();
            (q, ps)
        }
    };
    let flat: Vec<f32> = q.into_iter().flatten().collect();
    Ok((Tensor::from_vec(flat, shape, &Device::Cpu)?, ps))
}

/// Folds BatchNorm into every conv and quantizes the weights: the new state (on the CPU)
/// and, per layer, the mean breakpoint/range ratio p/m (1 for uniform).
pub fn quantize_weights(
    model: &ResNet20,
    cfg: &PtqConfig,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, f32>)> {
    let mut out: BTreeMap<String, Tensor> = model
        .tensors()
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.detach().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let mut ratios = BTreeMap::new();
    let get = |m: &BTreeMap<String, Tensor>, k: &str| -> Result<Tensor> {
        m.get(k)
            .cloned()
            .ok_or_else(|| Error::config("tensor", k, "missing"))
    };
    for (conv, bn) in conv_bn_pairs() {
        let (w, b) = fold(
            &get(&out, &format!("{conv}.weight"))?,
            &get(&out, &format!("{bn}.weight"))?,
            &get(&out, &format!("{bn}.bias"))?,
            &get(&out, &format!("{bn}.running_mean"))?,
            &get(&out, &format!("{bn}.running_var"))?,
            BN_EPS,
        )?;
        let bits = match cfg.bits.weight_bits {
            None => None,
            Some(_) if conv == "conv1" => Some(cfg.bits.first_last_bits),
            Some(b) => Some(b),
        };
        let w = match bits {
            None => w,
            Some(bits) => {
                let m = w.abs()?.flatten_from(1)?.max(1)?.to_vec1::<f32>()?;
                let (q, ps) = quantize_weight_rows(&w, bits, cfg)?;
                let r: f32 = ps
                    .iter()
                    .zip(&m)
                    .map(|(p, m)| if *m > 0.0 { p / m } else { 1.0 })
                    .sum::<f32>()
                    / ps.len().max(1) as f32;
                ratios.insert(conv.clone(), r);
                q
            }
        };
        let c = b.dim(0)?;
        out.insert(format!("{conv}.weight"), w);
        out.insert(
            format!("{bn}.weight"),
            Tensor::ones(c, DType::F32, &Device::Cpu)?,
        );
        out.insert(format!("{bn}.bias"), b);
        out.insert(
            format!("{bn}.running_mean"),
            Tensor::zeros(c, DType::F32, &Device::Cpu)?,
        );
        out.insert(
            format!("{bn}.running_var"),
            Tensor::full((1.0 - BN_EPS) as f32, c, &Device::Cpu)?,
        );
    }
    if cfg.bits.weight_bits.is_some() {
        let (q, ps) =
            quantize_weight_rows(&get(&out, "linear.weight")?, cfg.bits.first_last_bits, cfg)?;
        let m = get(&out, "linear.weight")?
            .abs()?
            .max(1)?
            .to_vec1::<f32>()?;
        let r = ps
            .iter()
            .zip(&m)
            .map(|(p, m)| if *m > 0.0 { p / m } else { 1.0 })
            .sum::<f32>()
            / ps.len().max(1) as f32;
        ratios.insert("linear".into(), r);
        out.insert("linear.weight".into(), q);
    }
    Ok((out, ratios))
}

/// A post-training-quantized model and what its calibration found.
pub struct PtqOutcome {
    /// The quantized model (weights folded and quantized, activation quantizers attached).
    pub model: ResNet20,
    /// Per layer, the mean breakpoint ratio p/m (1 for uniform).
    pub breakpoint_ratios: BTreeMap<String, f32>,
    /// Per activation site, the calibrated range.
    pub activation_ranges: BTreeMap<String, f32>,
}

/// The whole PTQ stage: weights folded and quantized, then activation ranges calibrated on
/// `calib` (all of it) with the quantized weights in place.
pub fn post_training_quantize(
    fp: &ResNet20,
    cfg: &PtqConfig,
    calib: &crate::data::batch::DeviceData,
) -> Result<PtqOutcome> {
    if fp.seam().quantizes() {
        return Err(Error::config(
            "ptq",
            fp.seam().describe(),
            "the model is already quantized; PTQ needs a full-precision one",
        ));
    }
    let (state, breakpoint_ratios) = quantize_weights(fp, cfg)?;
    let wq = ResNet20::from_tensors(state, fp.num_batches_tracked(), fp.device(), false)?;
    let all: Vec<u32> = (0..calib.len() as u32).collect();
    let activation_ranges = super::seam::calibrate_with(&wq, calib, &all, 256, cfg.calib_range)?;
    let act_only = UniformConfig {
        weight_bits: None,
        ..cfg.bits.clone()
    };
    let model = super::seam::uniform_ptq(
        &wq,
        act_only,
        activation_ranges.clone(),
        super::GradientMode::Ste,
    );
    Ok(PtqOutcome {
        model,
        breakpoint_ratios,
        activation_ranges,
    })
}
