//! Winograd F(2×2, 3×3) convolution (3×3, pad 1, stride 1) and its weight gradient (see
//! [`grad_weight`]), x86-64 AVX2 + FMA; F(4×4, 3×3)'s transforms in `f4.rs` share its
//! products and the weight gradient's ([`Tiling`] chooses by the image's shape).
//!
//! A 3×3 convolution computes each 2×2 block of outputs from the 4×4 block of inputs around
//! it. Winograd's minimal filtering algorithm (Lavin & Gray 2016) does that with 16
//! multiplications per input/output channel pair instead of 36:
//!
//! `Y = Aᵀ [ Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B) ] A`
//!
//! with the kernel transform `U = G g Gᵀ` (4×4 per channel pair, computed once per call), the
//! input transform `V = Bᵀ d B` (4×4 per input channel and output tile, additions only) and
//! the output transform `Aᵀ M A` (additions only). The sum over input channels is 16
//! independent matrix products, one per position ξ of the 4×4 transform:
//! `M[ξ] (O × tiles) = U[ξ] (O × C) · V[ξ] (C × tiles)`, computed here on the same register
//! tiles as the direct kernel (`OB` output channels × `N` vectors of 8 tiles). 2.25× fewer
//! multiply-adds than the direct kernel; the transforms are exact up to f32 rounding (their
//! coefficients are 0, ±1 and ½), and the result equals the direct convolution within f32
//! tolerance (tested against candle's).
//!
//! Every output is the same sequence of operations whatever the instruction set (the
//! transforms are shared, the products sum the channels in order from zero), so AVX2 and
//! AVX-512 give the same bits, as for the direct kernel.
//!
//! Shapes: an even height and a width that is a multiple of 8 (four tiles fill a vector row
//! of outputs). Tiles are numbered row-major within an image and go through the products in
//! groups of eight, one per vector; an image's tile count is padded to a multiple of 8 with
//! copies of real tiles that are never stored. Within a group, the lanes hold tiles
//! 0, 1, 4, 5, 2, 3, 6, 7: the order in which the input transform's even/odd column shuffles
//! leave them, and in which the output transform's interleave of each tile's two outputs per
//! row puts them back in place (tiles 0-3, then 4-7).
//!
//! Per image: the input transform (each channel zero-padded in an L1-sized buffer, then eight
//! tiles at a time in registers) writes `V[ξ][c][tile]`; then for each block of output
//! channels and run of tile vectors, the 16 products go to a buffer that stays in L1 and the
//! output transform (with the bias, the residual and the ReLU) stores the outputs.

use std::mem::MaybeUninit;

use super::direct::{self, Isa, Plane};
use super::{Addends, Geom};

mod f4;

/// Whether [`conv`] takes a ReLU mask inside its input transform for `h`×`w` images.
pub(super) fn masks_inside(h: usize, w: usize) -> bool {
    Tiling::of(h, w) == Tiling::F4
}

/// Which Winograd algorithm the passes over an image take (the forward pass, the input
/// gradient as a forward pass of its own, and the weight gradient): F(4×4, 3×3) where its
/// shape allows ([`f4`]: 1.78× fewer products), else F(2×2, 3×3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tiling {
    F2,
    F4,
}

impl Tiling {
    /// The tiling of an `h`×`w` image (of a shape [`fits`] takes).
    pub(super) fn of(h: usize, w: usize) -> Self {
        if f4::fits(h, w) {
            Tiling::F4
        } else {
            Tiling::F2
        }
    }

    /// Positions ξ of the transform.
    fn positions(self) -> usize {
        match self {
            Tiling::F2 => 16,
            Tiling::F4 => f4::POSITIONS,
        }
    }

    /// Tiles of an `h`×`w` image as the products see them (a multiple of 8).
    fn padded_tiles(self, h: usize, w: usize) -> usize {
        match self {
            Tiling::F2 => tiles(h, w).2,
            Tiling::F4 => {
                let (th, tw) = f4::tiles(h, w);
                th * tw
            }
        }
    }
}

/// Whether `g` has the Winograd path's shape: 3×3, stride 1, pad 1, an even height and a
/// width that is a multiple of 8.
pub(super) fn fits(g: &Geom) -> bool {
    g.k == 3
        && g.pad == 1
        && g.stride == 1
        && g.w.is_multiple_of(8)
        && g.h.is_multiple_of(2)
        && g.w > 0
        && g.h > 0
}

/// The kernel transform of every (output, input) channel pair of `w` (O×C×3×3) for
/// `tiling`, packed as `[ξ][o / ob][c][o % ob]` (`ob = isa.ob()`, output channels padded
/// with zeros).
pub(super) fn pack(isa: Isa, tiling: Tiling, w: &[f32], o: usize, c: usize) -> Vec<f32> {
    match tiling {
        Tiling::F2 => pack2(isa.ob(), w, o, c),
        Tiling::F4 => f4::pack(isa.ob(), w, o, c),
    }
}

/// F(2×2, 3×3)'s kernel transform `U = G g Gᵀ` (4×4), packed as [`pack`] says, with
/// `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
fn pack2(ob: usize, w: &[f32], o: usize, c: usize) -> Vec<f32> {
    pack_with(ob, w, o, c, |[a, b, d]| {
        [a, (a + b + d) * 0.5, (a - b + d) * 0.5, d]
    })
}

/// The kernel transform `U = G g Gᵀ` (N×N) of every (output, input) channel pair of `w`
/// (O×C×3×3), packed as [`pack`] says, for the `G` that `g` applies to one column or row
/// (3 values to N): `G·g` column by column, then `G` along each of its rows.
fn pack_with<const N: usize>(
    ob: usize,
    w: &[f32],
    o: usize,
    c: usize,
    g: impl Fn([f32; 3]) -> [f32; N] + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let blocks = o.div_ceil(ob);
    let position = blocks * c * ob;
    let mut out = vec![0f32; N * N * position];
    // Row i of the transforms (positions i·N..(i + 1)·N) per task: each task recomputes
    // the columns `G·g`, which is cheaper than sharing them.
    let row_i = |(i, rows): (usize, &mut [f32])| {
        for oo in 0..o {
            let (blk, lane) = (oo / ob, oo % ob);
            for cc in 0..c {
                let k = &w[(oo * c + cc) * 9..][..9];
                let cols: [[f32; N]; 3] = std::array::from_fn(|j| g([k[j], k[3 + j], k[6 + j]]));
                let row = g([cols[0][i], cols[1][i], cols[2][i]]);
                for (j, v) in row.into_iter().enumerate() {
                    rows[j * position + (blk * c + cc) * ob + lane] = v;
                }
            }
        }
    };
    // Over the threads where there is enough work to pay for it (ResNet-20's 32×32 and
    // 64×64 kernels: the other thread would otherwise wait).
    if o * c >= PARALLEL_PACK {
        out.par_chunks_mut(N * position).enumerate().for_each(row_i);
    } else {
        out.chunks_mut(N * position).enumerate().for_each(row_i);
    }
    out
}

/// Channel pairs from which [`pack_with`] runs over the threads.
const PARALLEL_PACK: usize = 1024;

/// Per-thread buffers: one zero-padded input channel (F(2×2, 3×3)) or its phase planes
/// (F(4×4, 3×3)), and the transformed input `V[ξ][c][tile]`.
#[derive(Default)]
pub(super) struct Scratch {
    xp: Vec<f32>,
    phases: Vec<f32>,
    v: Vec<f32>,
}

/// The tile in each lane of a group of eight (module docs).
const LANE_TILES: [usize; 8] = [0, 1, 4, 5, 2, 3, 6, 7];

/// Tile counts of an `h`×`w` image: rows, columns, and the total padded to a multiple of 8.
fn tiles(h: usize, w: usize) -> (usize, usize, usize) {
    let (th, tw) = (h / 2, w / 2);
    (th, tw, (th * tw).div_ceil(8) * 8)
}

/// Floats from one position ξ to the next in `V` (`rows` = C input channels, rows of `pp`
/// tiles): 64 more than the rows need, so that the 16 positions' rows, which the input
/// transform writes together, do not all fall on the same cache sets (with ResNet's
/// power-of-two sizes they would lie a multiple of 4 KiB apart; that made the transform
/// ~3× slower).
fn position_stride(rows: usize, pp: usize) -> usize {
    rows * pp + 64
}

/// One image: `y` (O×H×W) = conv(`x` (C×H×W), the kernel transformed by [`pack`] for
/// [`Tiling::of`] its shape) + `bias` [+ `residual`] [through ReLU, `p.relu`]. Every element
/// of `y` is written. With `mask` (of `x`'s size; F(4×4, 3×3) only, see [`masks_inside`]),
/// `x` is taken as 0 where the mask is not positive: the gradient through the ReLU whose
/// output the mask is, applied as the input transform reads `x`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    isa: Isa,
    p: Plane,
    x: &[f32],
    mask: Option<&[f32]>,
    up: &[f32],
    Addends { bias, residual }: Addends,
    s: &mut Scratch,
    y: &mut [MaybeUninit<f32>],
) {
    let Plane { h, w, c, o, .. } = p;
    let tiling = Tiling::of(h, w);
    let (positions, pp) = (tiling.positions(), tiling.padded_tiles(h, w));
    let ob = isa.ob();
    assert!(
        p.stride == 1
            && h % 2 == 0
            && w % 8 == 0
            && x.len() == c * h * w
            && y.len() == o * h * w
            && bias.len() == o
            && residual.is_none_or(|r| r.len() == y.len())
            && up.len() == positions * o.div_ceil(ob) * c * ob,
        "winograd conv: buffer sizes do not match {p:?}"
    );
    s.v.resize(positions * position_stride(c, pp), 0.0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` (AVX2 + FMA at least) was detected on this machine (the caller resolved
    // it); the input transform reads `x` and writes `V` (positions×C×pp, checked there); the
    // products read `V` and `U` (sizes checked there) and write each block's `M` to a local
    // buffer, from which the output transform writes `y` within O×H×W (asserted), every
    // element once.
    unsafe {
        match tiling {
            Tiling::F2 => {
                assert!(
                    mask.is_none(),
                    "winograd F(2×2): no mask inside the transform"
                );
                x86::transform_input(p, x, &mut s.xp, &mut s.v)
            }
            Tiling::F4 => f4::x86::transform_input(isa, p, x, mask, &mut s.phases, &mut s.v),
        }
        let out = x86::Out {
            bias,
            residual,
            y: y.as_mut_ptr().cast(),
        };
        match isa {
            Isa::Avx512 => x86::products_avx512(p, tiling, &s.v, up, out),
            Isa::Avx2 => x86::products_avx2(p, tiling, &s.v, up, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("winograd convolution is only selected on x86-64")
}

/// The weight gradient's transforms of a group of images and its running sum.
#[derive(Default)]
pub(super) struct GradScratch {
    xp: Vec<f32>,
    phases: Vec<f32>,
    /// `V` of each image of the group, as the forward pass's input transform writes it.
    v: Vec<f32>,
    /// One image's output gradient, pixel by pixel (`[pixel][channel]`, channels padded).
    dyt: Vec<f32>,
    /// `Mᵀ` of each image of the group: `[ξ][tile][channel]` (channels padded).
    dm: Vec<f32>,
    /// The sum `[ξ][c][channel]` over the images so far.
    du: Vec<f32>,
}

/// Output channels padded to whole vectors of 16 (8 for AVX2: two per block).
fn padded_outputs(o: usize) -> usize {
    o.div_ceil(16) * 16
}

/// Floats from one position ξ to the next in `Mᵀ` (`pp` tiles of `ov` channels), offset as in
/// [`position_stride`] so that the transform's 16 rows do not share cache sets.
fn gradient_position_stride(pp: usize, ov: usize) -> usize {
    pp * ov + 64
}

/// Tiles summed per group before the running sum is loaded and stored again: images are
/// grouped until their tiles reach this (small images have few tiles).
const GRAD_TILES: usize = 64;

/// The weight gradient of a batch of images by Winograd (F(4×4, 3×3) where [`Tiling::of`]
/// the image's shape says so, else F(2×2, 3×3)): `dw` (O×C×3×3) += Σ over images of
/// `Gᵀ [ Σ_tiles (A dY Aᵀ)[ξ] · (Bᵀ d B)[ξ] ] G`, the gradient of the forward pass's
/// `Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A` through each of its linear steps. `V = Bᵀ d B` is the
/// forward's input transform; `Mᵀ = A dY Aᵀ` takes each block of the output gradient to the
/// transform's size (additions and small multiples only). The sum over tiles is one matrix
/// product per position ξ, `dU[ξ] (C × O) += V[ξ] (C × tiles) · Mᵀ[ξ] (tiles × O)`, with the
/// output channels across the vector lanes: every product is added to its own accumulator,
/// image by image and tile by tile in order, whatever the instruction set, so AVX2 and
/// AVX-512 give the same bits.
pub(super) fn grad_weight(
    isa: Isa,
    p: Plane,
    x: &[f32],
    dy: &[f32],
    s: &mut GradScratch,
    dw: &mut [f32],
) {
    let Plane { h, w, c, o, .. } = p;
    let (per_x, per_dy) = (c * h * w, o * h * w);
    assert!(
        p.stride == 1
            && h % 2 == 0
            && w % 8 == 0
            && x.len().is_multiple_of(per_x)
            && dy.len() / per_dy == x.len() / per_x
            && dw.len() == o * c * 9,
        "winograd weight gradient: buffer sizes do not match {p:?}"
    );
    let tiling = Tiling::of(h, w);
    let (positions, pp) = (tiling.positions(), tiling.padded_tiles(h, w));
    let ov = padded_outputs(o);
    let (xs, ms) = (position_stride(c, pp), gradient_position_stride(pp, ov));
    let group = (GRAD_TILES / pp).max(1);
    s.du.clear();
    s.du.resize(positions * c * ov, 0.0);
    s.v.resize(group * positions * xs, 0.0);
    s.dm.resize(group * positions * ms, 0.0);
    s.dyt.resize(h * w * ov, 0.0);
    let images = x.len() / per_x;
    for first in (0..images).step_by(group) {
        let imgs = group.min(images - first);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` (AVX2 + FMA at least) was detected on this machine; each image's
        // transforms read its part of `x` and `dy` (sizes asserted) and write their own
        // part of `v` and `dm` (sized above for `group` images); the products read those
        // and add into `du` (positions×C×ov).
        unsafe {
            for i in 0..imgs {
                let img = first + i;
                let xi = &x[img * per_x..(img + 1) * per_x];
                let vi = &mut s.v[i * positions * xs..(i + 1) * positions * xs];
                let dyi = &dy[img * per_dy..(img + 1) * per_dy];
                x86::transpose_gradient(p, dyi, ov, &mut s.dyt);
                let mi = &mut s.dm[i * positions * ms..(i + 1) * positions * ms];
                match tiling {
                    Tiling::F2 => {
                        x86::transform_input(p, xi, &mut s.xp, vi);
                        x86::transform_gradient(p, &s.dyt, ov, mi);
                    }
                    Tiling::F4 => {
                        f4::x86::transform_input(isa, p, xi, None, &mut s.phases, vi);
                        f4::x86::transform_gradient(isa, p, &s.dyt, ov, mi);
                    }
                }
            }
            let sums = x86::Sums {
                c,
                ov,
                pp,
                positions,
                imgs,
                v: s.v.as_ptr(),
                m: s.dm.as_ptr(),
                du: s.du.as_mut_ptr(),
            };
            match isa {
                Isa::Avx512 => x86::gradient_products_avx512(sums),
                Isa::Avx2 => x86::gradient_products_avx2(sums),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("winograd convolution is only selected on x86-64 ({imgs} images)")
    }
    let du = |xi: usize, cc: usize, oo: usize| s.du[(xi * c + cc) * ov + oo];
    match tiling {
        Tiling::F2 => kernel_gradient2(du, c, o, dw),
        Tiling::F4 => f4::kernel_gradient(du, c, o, dw),
    }
}

/// `dw[o][c]` += `Gᵀ dU[o][c] G` for F(2×2, 3×3) (`du(ξ, c, o)`), with `Gᵀ`'s rows
/// (1, ½, ½, 0), (0, ½, −½, 0), (0, ½, ½, 1).
fn kernel_gradient2(du: impl Fn(usize, usize, usize) -> f32, c: usize, o: usize, dw: &mut [f32]) {
    kernel_gradient_with(du, c, o, dw, |[a, b, d, e]| {
        [a + (b + d) * 0.5, (b - d) * 0.5, (b + d) * 0.5 + e]
    })
}

/// `dw[o][c]` += `Gᵀ dU[o][c] G` (`du(ξ, c, o)`, N×N per channel pair) for the `Gᵀ` that
/// `gt` applies to one column or row (N values to 3): down the columns, then along the rows.
fn kernel_gradient_with<const N: usize>(
    du: impl Fn(usize, usize, usize) -> f32,
    c: usize,
    o: usize,
    dw: &mut [f32],
    gt: impl Fn([f32; N]) -> [f32; 3],
) {
    for cc in 0..c {
        for oo in 0..o {
            let u = |xi: usize| du(xi, cc, oo);
            let cols: [[f32; 3]; N] =
                std::array::from_fn(|j| gt(std::array::from_fn(|i| u(N * i + j))));
            for a in 0..3 {
                let row = gt(std::array::from_fn(|j| cols[j][a]));
                for (b, v) in row.into_iter().enumerate() {
                    dw[(oo * c + cc) * 9 + a * 3 + b] += v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{
        direct, f4, gradient_position_stride, position_stride, tiles, Plane, Tiling, LANE_TILES,
    };
    use std::arch::x86_64::*;

    /// `v[ξ][c][tile]` = `Bᵀ d B` for every channel and tile of `x` (C×H×W), each channel
    /// first copied into `xp` zero-padded by one pixel (the direct kernel's stride-1 layout;
    /// one channel stays in the L1 cache while its tiles are read), with
    /// `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`, eight tiles at a
    /// time in registers. Within each group of eight, the tiles lie in the lanes' order (module
    /// docs); the padding tiles (up to a multiple of 8) hold copies of real ones.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_input(p: Plane, x: &[f32], xp: &mut Vec<f32>, v: &mut [f32]) {
        let Plane { h, w, c, .. } = p;
        let (th, tw, pp) = tiles(h, w);
        let xs = position_stride(c, pp);
        let row = w + 2;
        let plane = (h + 2) * row;
        assert!(x.len() == c * h * w && v.len() >= 16 * xs);
        // Top-left padded input of tile t: (2·ty, 2·tx).
        let corner = |t: usize| {
            let t = if t < th * tw { t } else { t - 4 };
            2 * (t / tw) * row + 2 * (t % tw)
        };
        // Each group's two halves' corners, once per call (divisions are slow).
        let corners: Vec<(usize, usize)> = (0..pp)
            .step_by(8)
            .map(|g| (corner(g), corner(g + 4)))
            .collect();
        for ci in 0..c {
            let one = Plane { c: 1, ..p };
            direct::pad(one, &x[ci * h * w..(ci + 1) * h * w], xp);
            debug_assert_eq!(xp.len(), plane);
            let base = xp.as_ptr();
            for (g, &(a, b)) in (0..pp).step_by(8).zip(&corners) {
                // d[r][k]: input row r, column k of the eight tiles' 4×4 neighbourhoods.
                // (Plain loops, not closures: each closure call would be a function call
                // passing vectors through memory.)
                let mut d = [[_mm256_setzero_ps(); 4]; 4];
                for (r, dr) in d.iter_mut().enumerate() {
                    let (pa, pb) = (base.add(a + r * row), base.add(b + r * row));
                    let (l0, l1) = (_mm256_loadu_ps(pa), _mm256_loadu_ps(pb));
                    let (l2, l3) = (_mm256_loadu_ps(pa.add(2)), _mm256_loadu_ps(pb.add(2)));
                    *dr = [
                        _mm256_shuffle_ps::<0x88>(l0, l1),
                        _mm256_shuffle_ps::<0xDD>(l0, l1),
                        _mm256_shuffle_ps::<0x88>(l2, l3),
                        _mm256_shuffle_ps::<0xDD>(l2, l3),
                    ];
                }
                // Bᵀ down the columns (t[i][k]: row i of Bᵀ d, column k), then B along the
                // rows.
                let mut t = [[_mm256_setzero_ps(); 4]; 4];
                for k in 0..4 {
                    t[0][k] = _mm256_sub_ps(d[0][k], d[2][k]);
                    t[1][k] = _mm256_add_ps(d[1][k], d[2][k]);
                    t[2][k] = _mm256_sub_ps(d[2][k], d[1][k]);
                    t[3][k] = _mm256_sub_ps(d[1][k], d[3][k]);
                }
                let out = v.as_mut_ptr().add(ci * pp + g);
                for (i, [t0, t1, t2, t3]) in t.into_iter().enumerate() {
                    _mm256_storeu_ps(out.add((4 * i) * xs), _mm256_sub_ps(t0, t2));
                    _mm256_storeu_ps(out.add((4 * i + 1) * xs), _mm256_add_ps(t1, t2));
                    _mm256_storeu_ps(out.add((4 * i + 2) * xs), _mm256_sub_ps(t2, t1));
                    _mm256_storeu_ps(out.add((4 * i + 3) * xs), _mm256_sub_ps(t1, t3));
                }
            }
        }
    }

    /// Where the products go: the output image (O×H×W), its bias per channel and its
    /// residual (O×H×W), if any.
    #[derive(Clone, Copy)]
    pub(super) struct Out<'a> {
        pub bias: &'a [f32],
        pub residual: Option<&'a [f32]>,
        pub y: *mut f32,
    }

    /// With 512-bit registers: runs of 4 vectors of 8 tiles as 2 of 16.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(super) unsafe fn products_avx512(p: Plane, tiling: Tiling, v: &[f32], u: &[f32], out: Out) {
        products::<8, 4, true>(p, tiling, v, u, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn products_avx2(p: Plane, tiling: Tiling, v: &[f32], u: &[f32], out: Out) {
        products::<4, 2, false>(p, tiling, v, u, out)
    }

    /// The most floats a block of products needs: 36 positions × 8 channels × 4 vectors.
    const BLOCK: usize = f4::POSITIONS * 8 * 4 * 8;

    /// For each block of `OB` output channels and `N` vectors of 8 tiles (then pairs and
    /// single vectors for the remainder): `M[ξ] = U[ξ] · V[ξ]` for the 16 positions ξ, into a
    /// buffer that stays in the L1 cache, then the output transform of that block. `WIDE`
    /// (AVX-512 only) computes the runs of `N` = 4 and the pairs on 512-bit registers, 16
    /// tiles each: every lane sums the same products in the same order, so the bits are
    /// those of 256-bit registers.
    #[inline(always)]
    unsafe fn products<const OB: usize, const N: usize, const WIDE: bool>(
        p: Plane,
        tiling: Tiling,
        v: &[f32],
        u: &[f32],
        out: Out,
    ) {
        let Plane { h, w, c, o, .. } = p;
        let (positions, pp) = (tiling.positions(), tiling.padded_tiles(h, w));
        let xs = position_stride(c, pp);
        let blocks = o.div_ceil(OB);
        let nvec = pp / 8;
        assert!(
            positions * OB * N * 8 <= BLOCK
                && v.len() >= positions * xs
                && u.len() >= positions * blocks * c * OB
        );
        // Not zeroed (36 KiB per image and call): the output transform reads only what the
        // products wrote, `valid` channels × `n` vectors at each position.
        let mut m = [std::mem::MaybeUninit::<f32>::uninit(); BLOCK];
        // Images of 16 tiles (one run of two vectors): two blocks of output channels at
        // once on 512-bit registers, so each vector of `V` feeds twice the products.
        let step = if WIDE && nvec == 2 { 2 } else { 1 };
        for blk in (0..blocks).step_by(step) {
            let nb = step.min(blocks - blk);
            let valid = (o - blk * OB).min(OB * nb);
            for (j, n) in direct::runs(nvec, N) {
                let row = n * 8;
                let blocks_out = (blk * OB, valid);
                let mut stores = OutputLines::new(p, tiling, blocks_out, (j * 8, row), positions);
                for xi in 0..positions {
                    stores.ask::<WIDE>(out.y);
                    // The next position's rows, asked for while this one's are summed.
                    let nx = (xi + 1).min(positions - 1);
                    let t = Tile {
                        c,
                        pp,
                        v: v.as_ptr().add(xi * xs + j * 8),
                        u: u.as_ptr().add((xi * blocks + blk) * c * OB),
                        v_next: v.as_ptr().add(nx * xs + j * 8),
                        u_next: u.as_ptr().add((nx * blocks + blk) * c * OB),
                        m: m.as_mut_ptr().cast::<f32>().add(xi * OB * nb * row),
                        row,
                        valid,
                    };
                    match (WIDE, n, nb) {
                        (true, 2, 2) => tile16_blocks::<OB>(t),
                        (true, 4, _) => tile16::<OB, 2>(t),
                        (true, 2, _) => tile16::<OB, 1>(t),
                        (_, 1, _) => tile::<OB, 1>(t),
                        (_, 2, _) => tile::<OB, 2>(t),
                        _ => tile::<OB, N>(t),
                    }
                }
                let mb = MBlock {
                    m: m.as_ptr().cast::<f32>(),
                    position: OB * nb * row,
                    row,
                    k0: blk * OB,
                    channels: valid,
                    first: j * 8,
                    vectors: n,
                };
                match tiling {
                    Tiling::F2 => transform_output(p, mb, out),
                    Tiling::F4 => f4::x86::transform_output::<WIDE>(p, mb, out),
                }
            }
        }
    }

    /// The 64-byte lines of one image's output that a block's output transform stores:
    /// channels `k0..k0 + channels`, the pixel rows of tiles `first..first + count`; asked
    /// for with the intent to write while the block's products run, so that the stores do
    /// not wait for their lines (the output is a fresh buffer, in no cache): a share at each
    /// of `steps` calls of [`OutputLines::ask`].
    struct OutputLines {
        plane: usize,
        k0: usize,
        start: usize,
        per_channel: usize,
        total: usize,
        per_step: usize,
        next: usize,
    }

    impl OutputLines {
        fn new(
            p: Plane,
            tiling: Tiling,
            (k0, channels): (usize, usize),
            (first, count): (usize, usize),
            steps: usize,
        ) -> Self {
            let Plane { h, w, .. } = p;
            let (tile, tw) = match tiling {
                Tiling::F2 => (2, w / 2),
                Tiling::F4 => (4, w / 4),
            };
            let real = h / tile * tw;
            let last = (first + count).min(real);
            let (start, end) = if first < last {
                (first / tw * tile * w, ((last - 1) / tw + 1) * tile * w)
            } else {
                (0, 0)
            };
            let per_channel = (end - start).div_ceil(16);
            let total = channels * per_channel;
            OutputLines {
                plane: h * w,
                k0,
                start,
                per_channel,
                total,
                per_step: total.div_ceil(steps.max(1)),
                next: 0,
            }
        }

        /// Asks for the next share of the lines of the output `y` (with `prefetchw` where
        /// `AVX512`, see [`crate::kernels::prefetch_write`]).
        #[inline(always)]
        unsafe fn ask<const AVX512: bool>(&mut self, y: *mut f32) {
            for _ in 0..self.per_step.min(self.total - self.next) {
                let (ch, line) = (self.next / self.per_channel, self.next % self.per_channel);
                let at = y.add((self.k0 + ch) * self.plane + self.start + 16 * line);
                crate::kernels::prefetch_write(at, AVX512);
                self.next += 1;
            }
        }
    }

    /// One block of output channels at one position ξ: the first of `V[ξ]`'s vectors, the
    /// block's `U` rows, where its products go (rows of `row` floats), and how many of its
    /// channels are real.
    #[derive(Clone, Copy)]
    struct Tile {
        c: usize,
        pp: usize,
        v: *const f32,
        u: *const f32,
        /// The same rows of `V` and `U` at the next position (a prefetch hint only).
        v_next: *const f32,
        u_next: *const f32,
        m: *mut f32,
        row: usize,
        valid: usize,
    }

    /// `OB` channels × `NN` vectors of tiles, summed over the input channels in order; the
    /// first `valid` channels are stored.
    #[inline(always)]
    unsafe fn tile<const OB: usize, const NN: usize>(t: Tile) {
        let mut acc = [[_mm256_setzero_ps(); NN]; OB];
        for ci in 0..t.c {
            let vc = t.v.add(ci * t.pp);
            let mut xv = [_mm256_setzero_ps(); NN];
            for (k, x) in xv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(vc.add(k * 8));
            }
            let uc = t.u.add(ci * OB);
            for (oo, row) in acc.iter_mut().enumerate() {
                let wv = _mm256_broadcast_ss(&*uc.add(oo));
                for k in 0..NN {
                    row[k] = _mm256_fmadd_ps(wv, xv[k], row[k]);
                }
            }
        }
        for (oo, row) in acc.iter().enumerate().take(t.valid) {
            for (k, val) in row.iter().enumerate() {
                _mm256_storeu_ps(t.m.add(oo * t.row + k * 8), *val);
            }
        }
    }

    /// [`tile`] on 512-bit registers: `NZ` vectors of 16 tiles (2·`NZ` of `tile`'s).
    #[inline(always)]
    unsafe fn tile16<const OB: usize, const NZ: usize>(t: Tile) {
        let mut acc = [[_mm512_setzero_ps(); NZ]; OB];
        for ci in 0..t.c {
            // `V` and `U` come from L2 (an image's `V` is 36 to 147 KiB): the next
            // position's lines are asked for while this one's are summed.
            for k in 0..NZ {
                _mm_prefetch::<_MM_HINT_T0>(t.v_next.add(ci * t.pp + 16 * k).cast());
            }
            // (A block's `U` row is OB floats: a new line every 16 / OB channels.)
            if (ci * OB).is_multiple_of(16) {
                _mm_prefetch::<_MM_HINT_T0>(t.u_next.add(ci * OB).cast());
            }
            let vc = t.v.add(ci * t.pp);
            let mut xv = [_mm512_setzero_ps(); NZ];
            for (k, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(vc.add(k * 16));
            }
            let uc = t.u.add(ci * OB);
            for (oo, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*uc.add(oo));
                for k in 0..NZ {
                    row[k] = _mm512_fmadd_ps(wv, xv[k], row[k]);
                }
            }
        }
        for (oo, row) in acc.iter().enumerate().take(t.valid) {
            for (k, val) in row.iter().enumerate() {
                _mm512_storeu_ps(t.m.add(oo * t.row + k * 16), *val);
            }
        }
    }

    /// [`tile16`] of one vector of 16 tiles for two consecutive blocks of `OB` output
    /// channels (the second block's `U` rows follow the first's, `c·OB` floats on), stored
    /// as `2·OB` channel rows; the first `valid` channels are stored.
    #[inline(always)]
    unsafe fn tile16_blocks<const OB: usize>(t: Tile) {
        let mut acc = [[_mm512_setzero_ps(); OB]; 2];
        let u2 = t.u.add(t.c * OB);
        for ci in 0..t.c {
            // The next position's lines, as in `tile16`.
            _mm_prefetch::<_MM_HINT_T0>(t.v_next.add(ci * t.pp).cast());
            if (ci * OB).is_multiple_of(16) {
                _mm_prefetch::<_MM_HINT_T0>(t.u_next.add(ci * OB).cast());
                _mm_prefetch::<_MM_HINT_T0>(t.u_next.add(t.c * OB + ci * OB).cast());
            }
            let xv = _mm512_loadu_ps(t.v.add(ci * t.pp));
            for (half, u) in acc.iter_mut().zip([t.u, u2]) {
                let uc = u.add(ci * OB);
                for (oo, a) in half.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*uc.add(oo)), xv, *a);
                }
            }
        }
        for (oo, val) in acc.iter().flatten().enumerate().take(t.valid) {
            _mm512_storeu_ps(t.m.add(oo * t.row), *val);
        }
    }

    /// A block of products `M[ξ][channel][tile]`: floats from one position to the next and
    /// from one channel to the next, its first channel and their number, its first tile and
    /// its number of vectors of 8 tiles.
    #[derive(Clone, Copy)]
    pub(super) struct MBlock {
        pub m: *const f32,
        pub position: usize,
        pub row: usize,
        pub k0: usize,
        pub channels: usize,
        pub first: usize,
        pub vectors: usize,
    }

    /// `y[o]` = `Aᵀ M A` + bias [+ residual] [through ReLU] for the block's channels and
    /// tiles, with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`.
    #[inline(always)]
    unsafe fn transform_output(p: Plane, mb: MBlock, out: Out) {
        let Plane { h, w, .. } = p;
        let (_, tw, _) = tiles(h, w);
        let real = h / 2 * tw;
        let zero = _mm256_setzero_ps();
        // Where the top row of each half of each vector of tiles goes within a channel's
        // plane, `None` for padding tiles (computed once per block: divisions are slow).
        let mut places = [[None; 2]; 4];
        assert!(mb.vectors <= places.len());
        for (qq, row) in places.iter_mut().enumerate().take(mb.vectors) {
            for (part, place) in row.iter_mut().enumerate() {
                let tile = mb.first + qq * 8 + 4 * part;
                *place = (tile < real).then(|| 2 * (tile / tw) * w + 2 * (tile % tw));
            }
        }
        for kk in 0..mb.channels {
            let k = mb.k0 + kk;
            let b = _mm256_set1_ps(out.bias[k]);
            let plane = k * h * w;
            for (qq, place) in places.iter().enumerate().take(mb.vectors) {
                let at = mb.m.add(kk * mb.row + qq * 8);
                // Aᵀ down the columns (s: its first row, d: its second), then A along the
                // rows. (Plain loops, not closures, as in the input transform.)
                let mut mv = [_mm256_setzero_ps(); 16];
                for (xi, v) in mv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(at.add(xi * mb.position));
                }
                let mut rows = [[_mm256_setzero_ps(); 4]; 2];
                for j in 0..4 {
                    rows[0][j] = _mm256_add_ps(_mm256_add_ps(mv[j], mv[4 + j]), mv[8 + j]);
                    rows[1][j] = _mm256_sub_ps(_mm256_sub_ps(mv[4 + j], mv[8 + j]), mv[12 + j]);
                }
                for (r, t) in rows.into_iter().enumerate() {
                    let left = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(t[0], t[1]), t[2]), b);
                    let right = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(t[1], t[2]), t[3]), b);
                    // Interleave: each tile's two outputs side by side. With the tiles in
                    // the lanes' order (module docs), that gives tiles 0-3, then 4-7.
                    let halves = [
                        _mm256_unpacklo_ps(left, right),
                        _mm256_unpackhi_ps(left, right),
                    ];
                    for (mut val, place) in halves.into_iter().zip(place) {
                        let Some(place) = place else { continue };
                        let at = plane + place + r * w;
                        if let Some(res) = out.residual {
                            // One f32 addition, as `conv + residual` in two ops would do.
                            val = _mm256_add_ps(val, _mm256_loadu_ps(res.as_ptr().add(at)));
                        }
                        if p.relu {
                            // max(v, 0) gives 0 for NaN, as f32::max(v, 0.0) does.
                            val = _mm256_max_ps(val, zero);
                        }
                        _mm256_storeu_ps(out.y.add(at), val);
                    }
                }
            }
        }
    }

    /// `dyt[pixel][channel]` = `dy[channel][pixel]` for one image's output gradient (O×H×W),
    /// channels from O to `ov` zero; eight by eight in registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose_gradient(p: Plane, dy: &[f32], ov: usize, dyt: &mut [f32]) {
        let hw = p.h * p.w;
        assert!(
            dy.len() == p.o * hw
                && dyt.len() >= hw * ov
                && ov.is_multiple_of(8)
                && hw.is_multiple_of(8)
        );
        let (src, dst) = (dy.as_ptr(), dyt.as_mut_ptr());
        for ob in (0..ov).step_by(8) {
            for px in (0..hw).step_by(8) {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, ri) in r.iter_mut().enumerate() {
                    if ob + i < p.o {
                        *ri = _mm256_loadu_ps(src.add((ob + i) * hw + px));
                    }
                }
                let t = [
                    _mm256_unpacklo_ps(r[0], r[1]),
                    _mm256_unpackhi_ps(r[0], r[1]),
                    _mm256_unpacklo_ps(r[2], r[3]),
                    _mm256_unpackhi_ps(r[2], r[3]),
                    _mm256_unpacklo_ps(r[4], r[5]),
                    _mm256_unpackhi_ps(r[4], r[5]),
                    _mm256_unpacklo_ps(r[6], r[7]),
                    _mm256_unpackhi_ps(r[6], r[7]),
                ];
                let q = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                ];
                // Column j of the eight rows: the low (j < 4) or high halves of q[j % 4] and
                // q[4 + j % 4].
                for j in 0..4 {
                    let lo = _mm256_permute2f128_ps::<0x20>(q[j], q[4 + j]);
                    let hi = _mm256_permute2f128_ps::<0x31>(q[j], q[4 + j]);
                    _mm256_storeu_ps(dst.add((px + j) * ov + ob), lo);
                    _mm256_storeu_ps(dst.add((px + 4 + j) * ov + ob), hi);
                }
            }
        }
    }

    /// `m[ξ][k][channel]` = `(A dY Aᵀ)[ξ]` for the tile in place `k` of `V`'s order (module
    /// docs; padding tiles zero), from the pixel-major gradient `dyt` (`ov` channels per
    /// pixel), with `A`'s rows (1, 0), (1, 1), (1, −1), (0, −1).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_gradient(p: Plane, dyt: &[f32], ov: usize, m: &mut [f32]) {
        let Plane { h, w, .. } = p;
        let (th, tw, pp) = tiles(h, w);
        let ms = gradient_position_stride(pp, ov);
        assert!(dyt.len() >= h * w * ov && m.len() >= 16 * ms && ov.is_multiple_of(8));
        let (src, dst) = (dyt.as_ptr(), m.as_mut_ptr());
        let sign = _mm256_set1_ps(-0.0);
        for k in 0..pp {
            let t = k / 8 * 8 + LANE_TILES[k % 8];
            let out = dst.add(k * ov);
            if t >= th * tw {
                for xi in 0..16 {
                    for cv in (0..ov).step_by(8) {
                        _mm256_storeu_ps(out.add(xi * ms + cv), _mm256_setzero_ps());
                    }
                }
                continue;
            }
            let top = src.add((2 * (t / tw) * w + 2 * (t % tw)) * ov);
            for cv in (0..ov).step_by(8) {
                let d = [
                    [
                        _mm256_loadu_ps(top.add(cv)),
                        _mm256_loadu_ps(top.add(ov + cv)),
                    ],
                    [
                        _mm256_loadu_ps(top.add(w * ov + cv)),
                        _mm256_loadu_ps(top.add((w + 1) * ov + cv)),
                    ],
                ];
                // A along the rows (e[r][j]: row r of dY Aᵀ), then down the columns.
                let mut e = [[_mm256_setzero_ps(); 4]; 2];
                for (er, [a, b]) in e.iter_mut().zip(d) {
                    *er = [
                        a,
                        _mm256_add_ps(a, b),
                        _mm256_sub_ps(a, b),
                        _mm256_xor_ps(b, sign),
                    ];
                }
                for (j, (a, b)) in e[0].into_iter().zip(e[1]).enumerate() {
                    _mm256_storeu_ps(out.add(j * ms + cv), a);
                    _mm256_storeu_ps(out.add((4 + j) * ms + cv), _mm256_add_ps(a, b));
                    _mm256_storeu_ps(out.add((8 + j) * ms + cv), _mm256_sub_ps(a, b));
                    _mm256_storeu_ps(out.add((12 + j) * ms + cv), _mm256_xor_ps(b, sign));
                }
            }
        }
    }

    /// The weight gradient's products for a group of images: the channel and tile counts, the
    /// first image's `V` and `Mᵀ` (the group's images follow each other, `positions` positions apart
    /// by [`position_stride`] and [`gradient_position_stride`]), and the running sum `du`
    /// (`[ξ][c][ov]`).
    #[derive(Clone, Copy)]
    pub(super) struct Sums {
        pub c: usize,
        pub ov: usize,
        pub pp: usize,
        pub positions: usize,
        pub imgs: usize,
        pub v: *const f32,
        pub m: *const f32,
        pub du: *mut f32,
    }

    impl Sums {
        /// `V[ξ][c0]` of image `img`.
        unsafe fn v_at(&self, img: usize, xi: usize, c0: usize) -> *const f32 {
            let xs = position_stride(self.c, self.pp);
            self.v.add((img * self.positions + xi) * xs + c0 * self.pp)
        }

        /// `Mᵀ[ξ][0][o0]` of image `img`.
        unsafe fn m_at(&self, img: usize, xi: usize, o0: usize) -> *const f32 {
            let ms = gradient_position_stride(self.pp, self.ov);
            self.m.add((img * self.positions + xi) * ms + o0)
        }
    }

    /// `du[ξ][c][o]` += Σ over the group's images and tiles of `V[ξ][c][tile] · Mᵀ[ξ][tile][o]`
    /// on 512-bit registers: blocks of 4 channels × 64 outputs, 8 × 32 or 16 × 16.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn gradient_products_avx512(s: Sums) {
        let nv = s.ov / 16;
        for xi in 0..s.positions {
            let mut j = 0;
            while j < nv {
                let n = match nv - j {
                    4.. => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
                match n {
                    4 => gradient_channels::<4, 4, true>(s, xi, j * 16),
                    2 => gradient_channels::<8, 2, true>(s, xi, j * 16),
                    _ => gradient_channels::<16, 1, true>(s, xi, j * 16),
                }
                j += n;
            }
        }
    }

    /// [`gradient_products_avx512`] on 256-bit registers: blocks of 4 channels × 16 outputs.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gradient_products_avx2(s: Sums) {
        for xi in 0..s.positions {
            for o0 in (0..s.ov).step_by(16) {
                gradient_channels::<4, 2, false>(s, xi, o0);
            }
        }
    }

    /// Every input channel for the outputs `o0..` (`OV` vectors): blocks of `CB` channels,
    /// then one at a time.
    #[inline(always)]
    unsafe fn gradient_channels<const CB: usize, const OV: usize, const WIDE: bool>(
        s: Sums,
        xi: usize,
        o0: usize,
    ) {
        let full = s.c / CB * CB;
        for c0 in (0..full).step_by(CB) {
            if WIDE {
                gradient_block16::<CB, OV>(s, xi, c0, o0);
            } else {
                gradient_block8::<CB, OV>(s, xi, c0, o0);
            }
        }
        for c0 in full..s.c {
            if WIDE {
                gradient_block16::<1, OV>(s, xi, c0, o0);
            } else {
                gradient_block8::<1, OV>(s, xi, c0, o0);
            }
        }
    }

    /// `CB` channels from `c0` × `OV` vectors of outputs from `o0`, at position `xi`: the
    /// running sums loaded, every image's and tile's product added to its own lane in order,
    /// the sums stored back. One body for both register widths, hence the same bits.
    macro_rules! gradient_block {
        ($(#[$m:meta])* $name:ident, $lanes:literal, $zero:ident, $load:ident, $store:ident,
         $splat:ident, $fma:ident) => {
            $(#[$m])*
            #[inline(always)]
            unsafe fn $name<const CB: usize, const OV: usize>(
                s: Sums,
                xi: usize,
                c0: usize,
                o0: usize,
            ) {
                let du = s.du.add((xi * s.c + c0) * s.ov + o0);
                let mut acc = [[$zero(); OV]; CB];
                for (i, row) in acc.iter_mut().enumerate() {
                    for (v, a) in row.iter_mut().enumerate() {
                        *a = $load(du.add(i * s.ov + v * $lanes));
                    }
                }
                for img in 0..s.imgs {
                    let (vb, mb) = (s.v_at(img, xi, c0), s.m_at(img, xi, o0));
                    for k in 0..s.pp {
                        let mut d = [$zero(); OV];
                        for (v, dv) in d.iter_mut().enumerate() {
                            *dv = $load(mb.add(k * s.ov + v * $lanes));
                        }
                        for (i, row) in acc.iter_mut().enumerate() {
                            let b = $splat(*vb.add(i * s.pp + k));
                            for v in 0..OV {
                                row[v] = $fma(b, d[v], row[v]);
                            }
                        }
                    }
                }
                for (i, row) in acc.iter().enumerate() {
                    for (v, a) in row.iter().enumerate() {
                        $store(du.add(i * s.ov + v * $lanes), *a);
                    }
                }
            }
        };
    }

    gradient_block!(
        /// [`gradient_block16`] on 256-bit registers: `OV` vectors of 8 outputs.
        gradient_block8, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps,
        _mm256_set1_ps, _mm256_fmadd_ps
    );
    gradient_block!(
        /// `OV` vectors of 16 outputs on 512-bit registers.
        gradient_block16, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps,
        _mm512_set1_ps, _mm512_fmadd_ps
    );
}
