//! # quant-robust
//!
//! Does quantization make a neural network more or less robust to adversarial attacks, and
//! under which pipeline? This crate reproduces the study of Li et al. 2024 ("Investigating
//! the Impact of Quantization on Adversarial Robustness": ResNet-20 on CIFAR-10, PTQ with
//! PWLQ, QAT with PACT, robust/natural/random initialization, adversarial training, L_p
//! attacks) on candle, on the CPU and on CUDA.
//!
//! The pipeline, one module per concept (dependencies point down the list):
//! - [`rng`]: the only source of randomness (seeded, named streams);
//! - [`data`]: CIFAR-10 from the shipped JPEG archive, the canonical binary release, or an
//!   image folder; stratified subsets; on-device augmentation and batches;
//! - [`model`]: the [`model::Classifier`] interface, the quantizer seam, ResNet-20 and its
//!   PyTorch-compatible safetensors checkpoints;
//! - [`quant`]: round half to even, the uniform quantizer (STE or raw gradients), uniform
//!   PTQ through the model's seam;
//! - [`attack`]: FGSM, PGD (L∞, L2), APGD-CE/DLR, Square, transfer (input gradients only);
//! - [`eval`]: clean and robust accuracy, per-example worst case, masking diagnostics;
//! - [`report`]: pictures of results (adversarial-example grids);
//! - [`train`]: SGD (momentum, Nesterov, weight decay), schedules, natural and PGD
//!   adversarial training, resumable;
//! - [`manifest`], [`io`]: what produced a result; atomic writes;
//! - [`device`]: CPU/CUDA selection;
//! - [`kernels`]: fast CPU convolution (direct 3×3 SIMD tiles, im2col + GEMM; bias and ReLU in
//!   the store), BatchNorm, ReLU and fake quantizers with their gradients.

pub mod attack;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod io;
pub mod kernels;
pub mod manifest;
pub mod model;
pub mod quant;
pub mod report;
pub mod rng;
pub mod study;
pub mod train;

pub use error::{Error, Result};
