//! Quantizers and the quantized model's seam.
//!
//! - [`bits`]: [`Bits`], the `w4a8` widths of weights and activations, parsed once;
//! - [`round`]: round half to even (PyTorch's rounding; candle's `round` is half away from
//!   zero);
//! - [`uniform`]: the uniform fake quantizer (b bits, symmetric narrow-range or unsigned,
//!   per tensor or per output channel) with a straight-through or a raw gradient;
//! - [`pwlq`]: piecewise linear quantization of weights (closed-form or searched
//!   breakpoints, bias correction);
//! - [`pact`]: PACT activations (learnable α, exact gradients) and DoReFa weights;
//! - [`ptq`]: the paper's PTQ: BatchNorm folding, PWLQ (or uniform) weights, calibrated
//!   uniform activations;
//! - [`qat`]: the paper's QAT: PACT + DoReFa through the seam, α bounded, export to a plain
//!   quantized checkpoint;
//! - [`seam`]: [`seam::UniformSeam`], uniform post-training quantization of ResNet-20's
//!   weights and activations through [`crate::model::QuantSeam`], with calibration.
//!
//! Gradients through quantizers ([`GradientMode`]): attacks and QAT use the straight-through
//! estimator by default (identity inside the clipping range, zero outside); `raw` keeps the
//! true gradient of rounding, zero almost everywhere, to show gradient masking.

pub mod bits;
pub mod pact;
pub mod ptq;
pub mod pwlq;
pub mod qat;
pub mod round;
pub mod seam;
pub mod uniform;

pub use bits::Bits;
pub use seam::{load_checkpoint, StoredSeam};

/// How gradients pass through a quantizer (defined with the seam, in `model`).
pub use crate::model::GradientMode;
