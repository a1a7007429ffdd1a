//! Fused PACT (STE) on the CPU: (x, α) → y + (q − y) with y = clip(x, 0, α) and
//! q = round_half_even(y / (α/L))·(α/L), L = 2^bits − 1, in one pass; gradients
//! ∂/∂x = dy·[0 ≤ x < α] and ∂/∂α = Σ dy·[x ≥ α], both in one pass backward. The values and
//! ∂/∂x are the composed candle ops' of [`crate::quant::pact::pact`] bit for bit, ∂/∂α
//! within their f32 sum's rounding (tested): those take ~15 elementwise ops forward and more
//! backward at every activation of every step. ∂/∂α is summed in f64, eight lanes per
//! chunk of the activations and the chunks' sums in order, so its bits do not depend on the
//! number of threads.

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
        let n = x.elem_count();
        let both = x.apply_op2_no_bwd(&dy.contiguous()?, &PactGrad { alpha: a })?;
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let da = both.narrow(0, n, 1)?.reshape(alpha.shape())?;
        Ok((Some(dx), Some(da)))
    }
}

/// PACT's backward pass: (x, dy) → [dy·[0 ≤ x < α] ; Σ dy·[x ≥ α]], flat (N + 1 values).
struct PactGrad {
    alpha: f32,
}

super::multiversion! {
    /// `o` = dy·[0 ≤ x < a] (the select of [`super::IntervalGrad`]) on a slice, and
    /// Σ dy·[x ≥ a] over it in f64, eight lanes (so that it vectorizes) added in order.
    fn pact_grad_slice(o: &mut [MaybeUninit<f32>], xs: &[f32], gs: &[f32], a: f32) -> f64 {
        let mut lanes = [0f64; 8];
        let each = |lane: &mut f64, o: &mut MaybeUninit<f32>, v: f32, g: f32| {
            o.write(if v >= 0.0 && v < a { g } else { 0.0 });
            *lane += if v >= a { g as f64 } else { 0.0 };
        };
        let full = xs.len() / 8 * 8;
        let (o8, o_tail) = o.split_at_mut(full);
        for ((os, vs), gs) in o8.chunks_exact_mut(8).zip(xs.chunks_exact(8)).zip(gs.chunks_exact(8)) {
            for l in 0..8 {
                each(&mut lanes[l], &mut os[l], vs[l], gs[l]);
            }
        }
        for (l, ((o, &v), &g)) in o_tail.iter_mut().zip(&xs[full..]).zip(&gs[full..]).enumerate() {
            each(&mut lanes[l], o, v, g);
        }
        lanes.iter().sum()
    }
}

impl CustomOp2 for PactGrad {
    fn name(&self) -> &'static str {
        "qr-pact-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (x, dy) = (slice(s1, l1, "input")?, slice(s2, l2, "gradient")?);
        if x.len() != dy.len() {
            candle_core::bail!("pact grad: {} inputs vs {} gradients", x.len(), dy.len());
        }
        let n = x.len();
        let mut out = Vec::with_capacity(n + 1);
        let partial: Vec<f64> = out.spare_capacity_mut()[..n]
            .par_chunks_mut(CHUNK)
            .enumerate()
            .map(|(i, o)| {
                let at = i * CHUNK..i * CHUNK + o.len();
                pact_grad_slice(o, &x[at.clone()], &dy[at], self.alpha)
            })
            .collect();
        // SAFETY: the chunks cover 0..n and pact_grad_slice wrote every element of each.
        unsafe { out.set_len(n) };
        out.push(partial.iter().sum::<f64>() as f32);
        Ok((CpuStorage::F32(out), Shape::from(n + 1)))
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
