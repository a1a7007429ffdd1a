//! Training augmentation on the device that trains: random crop with zero padding and
//! horizontal flip (the standard CIFAR recipe: pad 4, crop 32, flip with p = 1/2).
//!
//! The per-image offsets and flips are drawn from the project's [`Rng`] on the host (three
//! small vectors per batch); the pixels never leave the device: the batch is zero-padded
//! and one `gather` with computed indices does crop and flip together.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::Result;

/// Augmentation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Zero padding on each side before the random crop (0 = no crop). Default 4.
    pub pad: usize,
    /// Random horizontal flip. Default true.
    pub flip: bool,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig { pad: 4, flip: true }
    }
}

/// Per-image draws: vertical and horizontal offsets in [0, 2·pad], and flips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AugmentDraw {
    pub dy: Vec<u32>,
    pub dx: Vec<u32>,
    pub flip: Vec<u8>,
}

impl AugmentDraw {
    /// Draws for `n` images.
    pub fn sample(cfg: &AugmentConfig, n: usize, rng: &mut Rng) -> Self {
        let span = 2 * cfg.pad + 1;
        let mut d = AugmentDraw {
            dy: Vec::with_capacity(n),
            dx: Vec::with_capacity(n),
            flip: Vec::with_capacity(n),
        };
        for _ in 0..n {
            d.dy.push(rng.below(span) as u32);
            d.dx.push(rng.below(span) as u32);
            d.flip.push(u8::from(cfg.flip && rng.coin()));
        }
        d
    }
}

/// Applies crops and flips to a B×C×H×W batch (any float dtype), on its device.
pub fn apply(x: &Tensor, pad: usize, draw: &AugmentDraw) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let dev = x.device();
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    let padded = if pad > 0 {
        x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?
    } else {
        x.clone()
    };
    let padded = padded.reshape((b, c, hp * wp))?;
    let rows: Vec<u32> = (0..h as u32).map(|i| i * wp as u32).collect();
    let rows = Tensor::from_vec(rows, (1, h, 1), dev)?;
    let cols = Tensor::from_vec((0..w as u32).collect::<Vec<_>>(), (1, 1, w), dev)?;
    let cols_flipped = Tensor::from_vec((0..w as u32).rev().collect::<Vec<_>>(), (1, 1, w), dev)?;
    let offset: Vec<u32> = draw
        .dy
        .iter()
        .zip(&draw.dx)
        .map(|(&dy, &dx)| dy * wp as u32 + dx)
        .collect();
    let offset = Tensor::from_vec(offset, (b, 1, 1), dev)?;
    let flip = Tensor::from_slice(&draw.flip, (b, 1, 1), dev)?.broadcast_as((b, 1, w))?;
    let col = flip.where_cond(
        &cols_flipped.broadcast_as((b, 1, w))?,
        &cols.broadcast_as((b, 1, w))?,
    )?;
    let idx = rows
        .broadcast_add(&col)?
        .broadcast_add(&offset)?
        .reshape((b, 1, h * w))?
        .broadcast_as((b, c, h * w))?
        .contiguous()?;
    debug_assert_eq!(idx.dtype(), DType::U32);
    Ok(padded
        .contiguous()?
        .gather(&idx, 2)?
        .reshape((b, c, h, w))?)
}
