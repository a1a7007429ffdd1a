//! Models: the [`Classifier`] interface every attack and evaluation uses, the quantizer
//! seam ([`QuantSeam`]) a quantized model plugs in, ResNet-20 and its checkpoints.

pub mod bn_fold;
pub mod checkpoint;
pub mod resnet20;

use std::sync::Arc;

use candle_core::Tensor;

pub use resnet20::ResNet20;

/// Anything that maps a batch of images in [0, 1] (B×3×32×32, f32) to logits (B×10).
///
/// `train = false` is evaluation mode (BatchNorm uses its running statistics); attacks
/// always call it so.
pub trait Classifier {
    /// Logits for a batch.
    fn forward_t(&self, x: &Tensor, train: bool) -> crate::Result<Tensor>;
}

/// How gradients pass through a quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum GradientMode {
    /// Straight-through estimator: ∂q/∂x = 1 inside the clipping range, 0 outside.
    #[default]
    Ste,
    /// The true gradient: zero almost everywhere (rounding is piecewise constant).
    Raw,
}

/// Where quantizers plug into a model.
///
/// The model calls [`QuantSeam::weight`] on the weight of every conv and linear layer
/// before using it, and [`QuantSeam::activation`] at every activation that feeds a conv or
/// linear layer (in place of the ReLU: PACT replaces ReLU). The full-precision seam
/// ([`FullPrecision`]) is the identity and ReLU. Site names are PyTorch module names
/// (`layer2.0.conv1`) for weights and `<block>.relu1` / `<block>.relu2` / `relu` for
/// activations, so quantizer settings can address layers by name.
pub trait QuantSeam: Send + Sync {
    /// The weight the layer `layer` uses, given its stored weight.
    fn weight(&self, _layer: &str, w: &Tensor) -> crate::Result<Tensor> {
        Ok(w.clone())
    }

    /// The activation at site `site` (FP: ReLU).
    fn activation(&self, _site: &str, x: &Tensor) -> crate::Result<Tensor> {
        Ok(crate::kernels::relu(x)?)
    }

    /// Whether the activation at `site` is ReLU followed by [`QuantSeam::after_relu`], so
    /// that the model may fuse the ReLU into the operation before it (the convolution's
    /// store, the residual sum). Default: no; a seam may say yes only where
    /// `activation(site, x)` equals `after_relu(site, relu(x))`, values and gradients.
    fn relu_first(&self, _site: &str) -> bool {
        false
    }

    /// What follows the ReLU at `site` where [`QuantSeam::relu_first`] holds (FP: nothing;
    /// uniform quantization: the activation quantizer).
    fn after_relu(&self, _site: &str, y: &Tensor) -> crate::Result<Tensor> {
        Ok(y.clone())
    }

    /// A short description for manifests (`fp`, `ptq-pwlq-w4a8`, ...).
    fn describe(&self) -> String;

    /// Whether the model's weights or activations go through quantizers (PTQ and QAT
    /// need a model that does not).
    fn quantizes(&self) -> bool {
        false
    }

    /// The same quantizers with their gradients passed as `mode` says; `None` for a seam
    /// without quantizers (nothing to change).
    fn with_gradient_mode(&self, _mode: GradientMode) -> Option<Seam> {
        None
    }

    /// The metadata entries a checkpoint stores to rebuild this seam (none for full
    /// precision); `crate::quant::StoredSeam` writes and reads them.
    fn persist(&self) -> crate::Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    /// Learnable quantizer parameters (PACT's α) with their weight decay.
    fn trainable(&self) -> Vec<(String, candle_core::Var, f64)> {
        Vec::new()
    }

    /// Called after every optimizer step (PACT keeps α positive and bounded).
    fn after_step(&self) -> crate::Result<()> {
        Ok(())
    }
}

/// The full-precision seam: weights as stored, ReLU activations.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullPrecision;

impl QuantSeam for FullPrecision {
    fn relu_first(&self, _site: &str) -> bool {
        true
    }

    fn describe(&self) -> String {
        "fp".into()
    }
}

/// A shared seam.
pub type Seam = Arc<dyn QuantSeam>;
