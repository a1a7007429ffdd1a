//! Piecewise linear quantization (Fang et al., ECCV 2020), per output channel.
//!
//! With m = max |w| and a breakpoint 0 < p ≤ m, the center [−p, p] is quantized uniformly
//! with b bits (signed, narrow range: scale p/(2^{b−1} − 1)), and each tail (p, m] and
//! [−m, −p) with b − 1 bits offset by ±p (scale (m − p)/(2^{b−1} − 1)): both regions get
//! about 2^b levels, and p = m is plain uniform quantization.
//!
//! The breakpoint minimizes the expected squared error for a Gaussian or Laplace fit: in
//! units of the weights' standard deviation σ (m̃ = m/σ),
//! Gaussian p̃ ≈ ln(0.8614·m̃ + 0.6079), Laplace p̃ ≈ 0.8030·√m̃ − 0.3167; or it is found
//! by a direct search over p/m (a grid of `SEARCH_STEPS` values, plus the closed forms and
//! p = m, so the search is never worse than either). Optional bias correction rescales the
//! quantized weights to the full-precision mean and standard deviation of their channel.

use serde::{Deserialize, Serialize};

use super::round::round_half_even;
use crate::{Error, Result};

/// How the breakpoint is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Breakpoint {
    Gaussian,
    Laplace,
    Search,
}

/// Grid points of the breakpoint search over p/m ∈ (0, 1].
pub const SEARCH_STEPS: usize = 100;

/// Mean and (population) standard deviation.
fn mean_std(w: &[f32]) -> (f64, f64) {
    let n = w.len().max(1) as f64;
    let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn max_abs(w: &[f32]) -> f32 {
    w.iter().fold(0f32, |a, &v| a.max(v.abs()))
}

/// PWLQ of one value with breakpoint `p`, range `m`, `bits` bits.
pub fn quantize_value(x: f32, p: f32, m: f32, bits: u32) -> f32 {
    let levels = ((1u32 << (bits - 1)) - 1) as f32;
    let a = x.abs();
    if a <= p {
        let s = if p > 0.0 { p / levels } else { 1.0 };
        round_half_even(x / s).clamp(-levels, levels) * s
    } else {
        let s = if m > p { (m - p) / levels } else { 1.0 };
        let q = p + round_half_even((a.min(m) - p) / s).clamp(0.0, levels) * s;
        q.copysign(x)
    }
}

/// PWLQ of a channel with breakpoint `p`.
pub fn quantize_channel(w: &[f32], p: f32, bits: u32) -> Vec<f32> {
    let m = max_abs(w);
    w.iter().map(|&x| quantize_value(x, p, m, bits)).collect()
}

/// Sum of squared errors.
pub fn sse(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

fn closed_form(kind: Breakpoint, m: f32, sigma: f64) -> f32 {
    if sigma <= 0.0 || m <= 0.0 {
        return m;
    }
    let mt = m as f64 / sigma;
    let pt = match kind {
        Breakpoint::Gaussian => (0.8614 * mt + 0.6079).ln(),
        Breakpoint::Laplace => 0.8030 * mt.sqrt() - 0.3167,
        Breakpoint::Search => unreachable!("not a closed form"),
    };
    // Keep 0 < p ≤ m.
    ((pt * sigma) as f32).clamp(m * 1e-3, m)
}

/// The breakpoint of a channel.
pub fn breakpoint(w: &[f32], bits: u32, kind: Breakpoint) -> Result<f32> {
    if !(2..=16).contains(&bits) {
        return Err(Error::config("bits", bits, "must be between 2 and 16"));
    }
    let m = max_abs(w);
    if m == 0.0 {
        return Ok(0.0);
    }
    let (_, sigma) = mean_std(w);
    Ok(match kind {
        Breakpoint::Gaussian | Breakpoint::Laplace => closed_form(kind, m, sigma),
        Breakpoint::Search => {
            let mut candidates: Vec<f32> = (1..=SEARCH_STEPS)
                .map(|k| m * k as f32 / SEARCH_STEPS as f32)
                .collect();
            candidates.push(closed_form(Breakpoint::Gaussian, m, sigma));
            candidates.push(closed_form(Breakpoint::Laplace, m, sigma));
            let mut best = (f64::INFINITY, m);
            for p in candidates {
                let e = sse(w, &quantize_channel(w, p, bits));
                if e < best.0 {
                    best = (e, p);
                }
            }
            best.1
        }
    })
}

/// Rescales `q` to the mean and standard deviation of `w` (bias correction).
pub fn bias_correct(w: &[f32], q: &[f32]) -> Vec<f32> {
    let (mw, sw) = mean_std(w);
    let (mq, sq) = mean_std(q);
    let k = if sq > 0.0 { sw / sq } else { 1.0 };
    q.iter()
        .map(|&v| ((v as f64 - mq) * k + mw) as f32)
        .collect()
}

/// PWLQ of a weight tensor's rows (one row per output channel, flattened), returning the
/// quantized rows and the breakpoint of each.
pub fn quantize_rows(
    rows: &[Vec<f32>],
    bits: u32,
    kind: Breakpoint,
    bias_correction: bool,
) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
    let mut out = Vec::with_capacity(rows.len());
    let mut ps = Vec::with_capacity(rows.len());
    for w in rows {
        let p = breakpoint(w, bits, kind)?;
        let q = quantize_channel(w, p, bits);
        out.push(if bias_correction {
            bias_correct(w, &q)
        } else {
            q
        });
        ps.push(p);
    }
    Ok((out, ps))
}
