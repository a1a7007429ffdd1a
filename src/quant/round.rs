//! Round half to even, as PyTorch's `torch.round` (and NumPy): ties go to the even
//! neighbour, so 0.5 → 0, 1.5 → 2, 2.5 → 2, −0.5 → −0. Ties are routine in quantization
//! (an 8-bit symmetric quantizer hits 127.5), and candle's `round` sends them away from zero.

use candle_core::Tensor;

use crate::Result;

pub use crate::kernels::round::round_half_even;

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
