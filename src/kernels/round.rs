//! Round half to even for one value, the kernels' rounding (and the quantizers', through
//! `quant::round`).

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
