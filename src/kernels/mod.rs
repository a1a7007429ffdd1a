//! CPU kernels for the operations that dominate ResNet-20 on the CPU, as candle custom ops.
//!
//! candle 0.11's CPU conv2d backward goes through a direct-loop `conv_transpose2d` (input
//! gradient) and a batch-as-channels convolution (weight gradient), which together make a
//! training or attack step ~20 images/s on 2 cores. [`conv2d`] replaces the convolution on
//! the CPU with im2col + GEMM (the `gemm` crate candle itself uses for matmul) in all three
//! directions, parallel over the images of the batch; [`batch_norm`] fuses BatchNorm (both
//! modes) and ReLU with their gradients; [`fake_quant`] and [`pact`] fuse activation fake quantization (PTQ's and QAT's). On CUDA the model keeps candle's own operations.
//! Results equal candle's reference path within float tolerance (tested on
//! random shapes).

pub mod batch_norm;
pub mod conv2d;
pub mod fake_quant;
pub mod pact;

pub use batch_norm::{batch_norm_train, channel_affine, channel_stats, relu};
pub use conv2d::conv2d;

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
