//! CPU kernels for the operations that dominate ResNet-20 on the CPU, as candle custom ops.
//!
//! candle 0.11's CPU conv2d backward goes through a direct-loop `conv_transpose2d` (input
//! gradient) and a batch-as-channels convolution (weight gradient), which together make a
//! training or attack step ~20 images/s on 2 cores. [`conv2d`] replaces the convolution on
//! the CPU with im2col + GEMM (the `gemm` crate candle itself uses for matmul) in all three
//! directions, parallel over the images of the batch. On CUDA the model keeps candle's own
//! convolution. Results equal candle's reference path within float tolerance (tested on
//! random shapes).

pub mod conv2d;

pub use conv2d::conv2d;
