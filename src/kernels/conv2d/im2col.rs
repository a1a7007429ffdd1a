//! im2col + GEMM: every convolution shape (the fallback of the direct and Winograd
//! kernels). For one image with `C` input channels, kernel `k`, output `Ho×Wo`: `col` is the
//! `(C·k·k) × (Ho·Wo)` patch matrix, and
//! - forward:       `y = W · col`                 (`O × Ho·Wo`, `W` is `O × C·k·k`)
//! - input grad:    `dcol = Wᵀ · dy`, scattered back by col2im
//! - weight grad:   `dW = Σ_images dy · colᵀ`
//!
//! Each GEMM runs single-threaded; the callers split the batch over the threads.

use std::ops::Range;

use gemm::Parallelism;

use super::{chunk, Addends, Geom};

/// `y = conv(x, w) + add` [through ReLU], every image of the batch.
pub(super) fn forward(g: &Geom, x: &[f32], w: &[f32], add: Addends, relu: bool) -> Vec<f32> {
    let (ckk, hw) = (g.ckk(), g.hw_out());
    let per = chunk(g.n);
    assert_eq!(add.bias.len(), g.o, "im2col: one bias per output channel");
    // Not zeroed first (on one thread): each image's outputs start from their biases.
    // SAFETY: chunk t holds the outputs of images t·per.., each image's O rows of Ho·Wo
    // written with its bias (`add.bias` has O values) before they are read.
    unsafe {
        super::super::par_uninit(g.n * g.o * hw, per * g.o * hw, |t, ys| {
            let mut col = vec![0f32; ckk * hw];
            for (i, yi) in ys.chunks_mut(g.o * hw).enumerate() {
                let img = t * per + i;
                im2col(g, &x[img * g.in_len()..(img + 1) * g.in_len()], &mut col);
                for (row, &b) in yi.chunks_mut(hw).zip(add.bias) {
                    row.fill(std::mem::MaybeUninit::new(b));
                }
                let yi = super::super::assume_written(yi);
                matmul(
                    (g.o, hw, ckk),
                    yi,
                    true,
                    Mat::rows(w, ckk),
                    Mat::rows(&col, hw),
                );
                if let Some(r) = add.residual {
                    let ri = &r[img * g.o * hw..(img + 1) * g.o * hw];
                    for (v, &u) in yi.iter_mut().zip(ri) {
                        *v += u;
                    }
                }
                if relu {
                    for v in yi.iter_mut() {
                        *v = v.max(0.0);
                    }
                }
            }
        })
    }
}

/// The input gradient of every image of the batch, given the output gradient `dy`.
pub(super) fn grad_input(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (ckk, hw) = (g.ckk(), g.hw_out());
    let per = chunk(g.n);
    // Not zeroed first (on one thread): each image's gradient is zeroed where col2im adds
    // into it.
    // SAFETY: chunk t holds images t·per.., each zeroed in full before it is read.
    unsafe {
        super::super::par_uninit(g.n * g.in_len(), per * g.in_len(), |t, dxs| {
            let mut dcol = vec![0f32; ckk * hw];
            for (i, dxi) in dxs.chunks_mut(g.in_len()).enumerate() {
                let img = t * per + i;
                let dyi = &dy[img * g.o * hw..(img + 1) * g.o * hw];
                // dcol (ckk × hw) = Wᵀ (ckk × o) · dy (o × hw)
                let wt = Mat::cols(w, ckk);
                matmul((ckk, hw, g.o), &mut dcol, false, wt, Mat::rows(dyi, hw));
                dxi.fill(std::mem::MaybeUninit::new(0.0));
                col2im(g, &dcol, super::super::assume_written(dxi));
            }
        })
    }
}

/// The weight gradient (O×C·k·k) summed over the images `imgs` of the batch, in order.
pub(super) fn grad_weight(g: &Geom, x: &[f32], dy: &[f32], imgs: Range<usize>) -> Vec<f32> {
    let (ckk, hw) = (g.ckk(), g.hw_out());
    let mut dw = vec![0f32; g.o * ckk];
    let mut col = vec![0f32; ckk * hw];
    for img in imgs {
        im2col(g, &x[img * g.in_len()..(img + 1) * g.in_len()], &mut col);
        let dyi = &dy[img * g.o * hw..(img + 1) * g.o * hw];
        // dW (o × ckk) += dy (o × hw) · colᵀ (hw × ckk)
        let colt = Mat::cols(&col, hw);
        matmul((g.o, ckk, hw), &mut dw, true, Mat::rows(dyi, hw), colt);
    }
    dw
}

/// The output columns `ow` whose input column `ow·stride + kj − pad` lies inside the image.
fn valid_cols(g: &Geom, kj: usize) -> std::ops::Range<usize> {
    // ow·s + kj ≥ pad  and  ow·s + kj − pad < w
    let lo = g.pad.saturating_sub(kj).div_ceil(g.stride);
    let hi = if g.w + g.pad > kj {
        (g.w + g.pad - kj).div_ceil(g.stride).min(g.wo)
    } else {
        0
    };
    lo..hi.max(lo)
}

/// The patch matrix of one image: `col[(c·k + ki)·k + kj][oh·Wo + ow]`.
fn im2col(g: &Geom, x: &[f32], col: &mut [f32]) {
    let hw = g.hw_out();
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.k {
            for kj in 0..g.k {
                let row = &mut col[((c * g.k + ki) * g.k + kj) * hw..][..hw];
                let cols = valid_cols(g, kj);
                for oh in 0..g.ho {
                    let ih = (oh * g.stride + ki) as isize - g.pad as isize;
                    let out = &mut row[oh * g.wo..(oh + 1) * g.wo];
                    if ih < 0 || ih >= g.h as isize || cols.is_empty() {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    out[..cols.start].fill(0.0);
                    out[cols.end..].fill(0.0);
                    let first = cols.start * g.stride + kj - g.pad;
                    if g.stride == 1 {
                        out[cols.clone()].copy_from_slice(&src[first..first + cols.len()]);
                    } else {
                        for (o, v) in out[cols.clone()]
                            .iter_mut()
                            .zip(src[first..].iter().step_by(g.stride))
                        {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// Adds the patch-matrix gradient back onto the image gradient (the adjoint of im2col).
fn col2im(g: &Geom, col: &[f32], dx: &mut [f32]) {
    let hw = g.hw_out();
    for c in 0..g.c {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.k {
            for kj in 0..g.k {
                let row = &col[((c * g.k + ki) * g.k + kj) * hw..][..hw];
                let cols = valid_cols(g, kj);
                if cols.is_empty() {
                    continue;
                }
                let first = cols.start * g.stride + kj - g.pad;
                for oh in 0..g.ho {
                    let ih = (oh * g.stride + ki) as isize - g.pad as isize;
                    if ih < 0 || ih >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    let src = &row[oh * g.wo + cols.start..oh * g.wo + cols.end];
                    for (d, v) in dst[first..].iter_mut().step_by(g.stride).zip(src) {
                        *d += *v;
                    }
                }
            }
        }
    }
}

/// A row-major view of a matrix: its elements and its row and column strides.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: isize,
    cs: isize,
}

impl<'a> Mat<'a> {
    /// `data` as a matrix of `cols` columns, rows one after the other.
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of [`Mat::rows`]: `data` holds the matrix column after column, each
    /// `rows` long.
    fn cols(data: &'a [f32], rows: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: rows as isize,
        }
    }
}

/// `dst (m×n) = [dst +] a (m×k) · b (k×n)`, `dst` row-major.
fn matmul((m, n, k): (usize, usize, usize), dst: &mut [f32], accumulate: bool, a: Mat, b: Mat) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the slices cover every element addressed by the given sizes and strides
    // (checked by the callers' shapes), and `dst` does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}
