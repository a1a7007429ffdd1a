//! Fused fake quantization with one scalar scale (activations): q = clamp(round_half_even(x/s),
//! q_min, q_max)·s in one pass, with the straight-through gradient dy·[q_min·s ≤ x ≤ q_max·s]
//! or the raw gradient (zero). The composed candle version takes ~20 elementwise ops per
//! call, forward and backward; this is one.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::round::round_half_even;
use super::slice;

/// The fused op's settings.
#[derive(Debug, Clone, Copy)]
pub struct FakeQuant {
    pub scale: f32,
    pub q_min: f32,
    pub q_max: f32,
    /// Straight-through gradient (else the raw, zero, gradient).
    pub ste: bool,
}

const CHUNK: usize = 1 << 14;

impl CustomOp1 for FakeQuant {
    fn name(&self) -> &'static str {
        "qr-fake-quant"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "input")?;
        let (sc, lo, hi) = (self.scale, self.q_min, self.q_max);
        // SAFETY: chunk i pairs with the equally long chunk i of x; every element is written.
        let y = unsafe {
            super::par_uninit(x.len(), CHUNK, |i, o| {
                fake_quant_slice(o, &x[i * CHUNK..][..o.len()], sc, lo, hi)
            })
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !self.ste {
            return Ok(Some(dy.zeros_like()?));
        }
        let inside = super::IntervalGrad {
            lo: self.q_min * self.scale,
            lo_inclusive: true,
            hi: self.q_max * self.scale,
            hi_inclusive: true,
        };
        Ok(Some(inside.apply(x, dy)?))
    }
}

super::multiversion! {
    /// `o = clamp(round_half_even(i / sc), lo, hi)·sc`, branch-free so that it vectorizes;
    /// `clamp` written out keeps `f32::clamp`'s NaN (a NaN stays NaN).
    fn fake_quant_slice(o: &mut [MaybeUninit<f32>], i: &[f32], sc: f32, lo: f32, hi: f32) {
        for (o, &v) in o.iter_mut().zip(i) {
            let q = round_half_even(v / sc);
            let q = if q < lo {
                lo
            } else if q > hi {
                hi
            } else {
                q
            };
            o.write(q * sc);
        }
    }
}

/// Applies the fused op on a CPU f32 tensor; `None` elsewhere (the caller composes it).
pub fn fake_quant_scalar(x: &Tensor, op: FakeQuant) -> candle_core::Result<Option<Tensor>> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        Ok(Some(x.contiguous()?.apply_op1(op)?))
    } else {
        Ok(None)
    }
}
