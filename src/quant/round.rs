//! Round half to even, as PyTorch's `torch.round` (and NumPy): ties go to the even
//! neighbour, so 0.5 → 0, 1.5 → 2, 2.5 → 2, −0.5 → −0. Ties are routine in quantization
//! (an 8-bit symmetric quantizer hits 127.5), and candle's `round` sends them away from zero.

use candle_core::Tensor;

use crate::Result;

/// Round half to even for one value: the same bits as `f32::round_ties_even` for every
/// input (±0, ties, NaN, ±∞ included), in plain float arithmetic that vectorizes (the
/// standard library calls `rintf` per value on a baseline x86-64 build, which was a third of
/// a quantized model's forward pass). Below 2^23, adding and subtracting 2^23 rounds the
/// magnitude to an integer in the default rounding mode (ties to even, 2^23 being even); at
/// 2^23 and above every f32 is an integer already.
#[inline(always)]
pub fn round_half_even(x: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    let a = x.abs();
    if a < TWO_23 {
        ((a + TWO_23) - TWO_23).copysign(x)
    } else {
        x
    }
}

/// Round half to even, elementwise, from `floor` and comparisons (CPU and CUDA alike).
/// Its gradient is zero (as the true gradient of rounding almost everywhere).
pub fn round_half_even_tensor(x: &Tensor) -> Result<Tensor> {
    let fl = x.floor()?;
    let d = (x - &fl)?;
    // fl is odd when fl − 2·floor(fl/2) == 1.
    let odd = (&fl - ((&fl * 0.5)?.floor()? * 2.0)?)?;
    let half = d.ones_like()?.affine(0.5, 0.0)?;
    let above = d.gt(&half)?;
    let tie_odd = d.eq(&half)?.mul(&odd.gt(&d.zeros_like()?)?)?;
    let up = above.maximum(&tie_odd)?.to_dtype(x.dtype())?;
    Ok((fl + up)?.detach())
}
