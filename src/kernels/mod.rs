//! CPU kernels for the operations that dominate ResNet-20 on the CPU, as candle custom ops.
//!
//! candle 0.11's CPU conv2d backward goes through a direct-loop `conv_transpose2d` (input
//! gradient) and a batch-as-channels convolution (weight gradient), which together make a
//! training or attack step ~20 images/s on 2 cores. [`conv2d()`] replaces the convolution on
//! the CPU in all three directions: Winograd F(4×4, 3×3) or F(2×2, 3×3) for stride-1 passes and a
//! direct 3×3 kernel over SIMD register tiles where the shape allows, im2col + GEMM (the
//! `gemm` crate candle itself uses for matmul) elsewhere, parallel over the images of the
//! batch; [`batch_norm`] fuses BatchNorm (both modes) and
//! ReLU with their gradients; [`fake_quant`] and [`pact`] fuse activation fake quantization
//! (PTQ's and QAT's); a [`ResidualLink`] hands a residual block's identity-shortcut gradient
//! to the block's first convolution, which adds it as it stores its input gradient. On CUDA
//! the model keeps candle's own operations. Results equal
//! candle's reference path within float tolerance (tested on random shapes).

/// Defines an elementwise function compiled three times, for AVX-512, for AVX2 + FMA and for
/// the baseline, and run as the best this machine has: a plain loop then vectorizes at the
/// machine's width (a baseline x86-64 build otherwise gets 4-wide SSE, or scalar code).
/// Elementwise IEEE operations give the same bits at every width.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn inner($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    inner($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    inner($($a),*)
                }
                match $crate::kernels::conv2d::direct_isa() {
                    // SAFETY: the machine runs the instruction set (checked at run time).
                    Some($crate::kernels::Isa::Avx512) => return unsafe { avx512($($a),*) },
                    Some($crate::kernels::Isa::Avx2) => return unsafe { avx2($($a),*) },
                    None => {}
                }
            }
            inner($($a),*)
        }
    };
}
pub(crate) use multiversion;

pub mod batch_norm;
pub mod conv2d;
pub mod fake_quant;
pub mod pact;
pub mod round;
pub mod shortcut;

pub use batch_norm::{
    add, add_relu, batch_norm_add_relu_train, batch_norm_add_relu_train_with,
    batch_norm_relu_train, batch_norm_train, batch_norm_train_with, channel_affine, channel_stats,
    channel_stats_with, relu, BnPath,
};
pub use conv2d::{
    conv2d, conv2d_bias, conv2d_bias_add_relu, conv2d_bias_add_relu_with, conv2d_bias_relu,
    conv2d_bias_relu_with, conv2d_bias_with, conv2d_block_start, conv2d_with, ConvPath, Isa,
};
pub use shortcut::{option_a_shortcut, ResidualLink};

/// A vector of `len` f32s filled by `fill` in parallel chunks of `chunk` elements (called
/// with the chunk's index), without zeroing the memory first: an op's output that the op
/// writes in full would otherwise be written twice (a fresh page-sized zeroing is ~8% of an
/// evaluation forward pass).
///
/// # Safety
/// `fill` must initialize every element of each chunk it is given.
pub(crate) unsafe fn par_uninit<F>(len: usize, chunk: usize, fill: F) -> Vec<f32>
where
    F: Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
{
    use rayon::prelude::*;
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: the caller guarantees that `fill` wrote every element of `0..len`.
    unsafe { v.set_len(len) };
    v
}

/// Asks for the 64-byte line at `at` with the intent to write it (`prefetchw`, where
/// `prefetchw` is set: every AVX-512 processor runs it), else to read it, so that a store
/// there later does not wait for the line. A hint only: it reads and writes nothing and
/// faults on no address.
#[inline(always)]
pub(crate) fn prefetch_write(at: *const f32, prefetchw: bool) {
    #[cfg(target_arch = "x86_64")]
    if prefetchw {
        // SAFETY: a prefetch touches no memory the program sees and faults on no address;
        // the caller runs this only on AVX-512 machines, all of which have PREFETCHW.
        unsafe {
            std::arch::asm!(
                "prefetchw [{0}]",
                in(reg) at,
                options(nostack, preserves_flags, readonly)
            )
        };
    } else {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: as above.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, prefetchw);
}

/// `out` as the initialized slice it is.
///
/// # Safety
///
/// Every element of `out` has been written.
pub(crate) unsafe fn assume_written(out: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller guarantees every element is
    // initialized.
    unsafe { &mut *(out as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// The contiguous f32 data of a CPU storage, or an error naming the operand.
pub(crate) fn slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("kernel: {what} must be contiguous"),
    }
}

/// The gradient of an op that passes its input through where it lies in an interval and is
/// flat elsewhere: (x, dy) → dy·[x ∈ interval]. ReLU (x > 0), the straight-through
/// fake quantizer (lo ≤ x ≤ hi) and PACT's input gradient (0 ≤ x < α) all use it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IntervalGrad {
    pub lo: f32,
    pub lo_inclusive: bool,
    pub hi: f32,
    pub hi_inclusive: bool,
}

impl IntervalGrad {
    /// ReLU's gradient: x > 0.
    pub const POSITIVE: IntervalGrad = IntervalGrad {
        lo: 0.0,
        lo_inclusive: false,
        hi: f32::INFINITY,
        hi_inclusive: true,
    };

    #[inline(always)]
    fn inside(&self, v: f32) -> bool {
        let above = if self.lo_inclusive {
            v >= self.lo
        } else {
            v > self.lo
        };
        let below = if self.hi_inclusive {
            v <= self.hi
        } else {
            v < self.hi
        };
        above && below
    }

    /// `out` = dy·[x ∈ interval] for slices `x` and `dy` of the same length (one image at a
    /// time inside a kernel, where the result stays in the cache).
    pub(crate) fn apply_into(self, x: &[f32], dy: &[f32], out: &mut Vec<f32>) {
        assert_eq!(x.len(), dy.len(), "interval gradient: lengths differ");
        out.clear();
        out.reserve(x.len());
        interval_grad_slice(&mut out.spare_capacity_mut()[..x.len()], x, dy, self);
        // SAFETY: interval_grad_slice wrote every element of 0..x.len().
        unsafe { out.set_len(x.len()) };
    }

    /// dy·[x ∈ interval] for slices `x` and `dy` of the same length, over the threads.
    pub(crate) fn apply_slices(self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        const CHUNK: usize = 1 << 14;
        assert_eq!(x.len(), dy.len(), "interval gradient: lengths differ");
        // SAFETY: each chunk of the output zips with an equally long chunk of x and dy
        // (same length, asserted above), and every element is written.
        unsafe {
            par_uninit(x.len(), CHUNK, |i, o| {
                let (xs, gs) = (&x[i * CHUNK..][..o.len()], &dy[i * CHUNK..][..o.len()]);
                interval_grad_slice(o, xs, gs, self);
            })
        }
    }

    /// dy·[x ∈ interval] for a CPU `x` and `dy` of the same shape.
    pub fn apply(
        self,
        x: &candle_core::Tensor,
        dy: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        x.apply_op2_no_bwd(&dy.contiguous()?, &self)
    }
}

impl candle_core::CustomOp2 for IntervalGrad {
    fn name(&self) -> &'static str {
        "qr-interval-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, dy) = (slice(s1, l1, "input")?, slice(s2, l2, "gradient")?);
        if x.len() != dy.len() {
            candle_core::bail!("gradient: {} inputs vs {} gradients", x.len(), dy.len());
        }
        Ok((
            candle_core::CpuStorage::F32(self.apply_slices(x, dy)),
            l1.shape().clone(),
        ))
    }
}

multiversion! {
    /// dy·[x ∈ interval] on a slice (a select: the gradient's bits where inside, +0 outside).
    fn interval_grad_slice(
        o: &mut [std::mem::MaybeUninit<f32>],
        xs: &[f32],
        gs: &[f32],
        iv: IntervalGrad,
    ) {
        for ((o, &v), &g) in o.iter_mut().zip(xs).zip(gs) {
            o.write(if iv.inside(v) { g } else { 0.0 });
        }
    }
}
