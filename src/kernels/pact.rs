//! Fused PACT (STE) on the CPU: (x, α) → y + (q − y) with y = clip(x, 0, α) and
//! q = round_half_even(y / (α/L))·(α/L), L = 2^bits − 1, in one pass; gradients
//! ∂/∂x = dy·[0 ≤ x < α] and ∂/∂α = Σ dy·[x ≥ α]. The same numbers, bit for bit, as the
//! composed candle ops of [`crate::quant::pact::pact`] (tested), which take ~15 elementwise
//! ops forward and more backward at every activation of every step.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::round::round_half_even;
use super::slice;

/// PACT's forward with `levels` = 2^bits − 1.
#[derive(Debug, Clone, Copy)]
pub struct Pact {
    pub levels: f64,
}

const CHUNK: usize = 1 << 14;

fn scalar(s: &CpuStorage, l: &Layout) -> candle_core::Result<f32> {
    let a = slice(s, l, "alpha")?;
    if a.len() != 1 {
        candle_core::bail!("pact: α must be a scalar, got {} values", a.len());
    }
    Ok(a[0])
}

super::multiversion! {
    /// PACT's forward on a slice, branch-free so that it vectorizes.
    fn pact_slice(o: &mut [MaybeUninit<f32>], i: &[f32], a: f32, step: f32) {
        for (o, &v) in o.iter_mut().zip(i) {
            let y = if v < a {
                if v >= 0.0 {
                    v
                } else {
                    0.0
                }
            } else {
                a
            };
            let q = round_half_even(y / step) * step;
            o.write(y + (q - y));
        }
    }
}

impl CustomOp2 for Pact {
    fn name(&self) -> &'static str {
        "qr-pact"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "input")?;
        let a = scalar(s2, l2)?;
        // As the composed version (candle's `t / f64` is `t · (1/f64)` in f32).
        let step = a * (1.0 / self.levels) as f32;
        // SAFETY: chunk i pairs with the equally long chunk i of x; every element is written.
        let out = unsafe {
            super::par_uninit(x.len(), CHUNK, |i, o| {
                pact_slice(o, &x[i * CHUNK..][..o.len()], a, step)
            })
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let a = alpha.flatten_all()?.to_vec1::<f32>()?[0];
        let dy = dy.contiguous()?;
        let dx = super::IntervalGrad {
            lo: 0.0,
            lo_inclusive: true,
            hi: a,
            hi_inclusive: false,
        }
        .apply(x, &dy)?;
        // dα = Σ dy·[x ≥ α], the terms in one parallel pass and summed by candle (so in
        // the order, and to the bits, of the composed version).
        let above = super::IntervalGrad {
            lo: a,
            lo_inclusive: true,
            hi: f32::INFINITY,
            hi_inclusive: true,
        }
        .apply(x, &dy)?;
        let da = above.sum_all()?.reshape(alpha.shape())?;
        Ok((Some(dx), Some(da)))
    }
}

/// Fused PACT (STE) on a CPU f32 tensor; `None` elsewhere (the caller composes it).
pub fn pact_ste(x: &Tensor, alpha: &Tensor, bits: u32) -> candle_core::Result<Option<Tensor>> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && alpha.elem_count() == 1 {
        let levels = ((1u64 << bits) - 1) as f64;
        Ok(Some(x.contiguous()?.apply_op2(alpha, Pact { levels })?))
    } else {
        Ok(None)
    }
}
