//! Winograd F(2×2, 3×3) forward convolution (3×3, pad 1, stride 1), x86-64 AVX2 + FMA.
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

/// The kernel transform `U = G g Gᵀ` of every (output, input) channel pair of `w` (O×C×3×3),
/// packed as `[ξ][o / ob][c][o % ob]` (`ob = isa.ob()`, output channels padded with zeros),
/// with `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
pub(super) fn pack(isa: Isa, w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let ob = isa.ob();
    let blocks = o.div_ceil(ob);
    let mut out = vec![0f32; 16 * blocks * c * ob];
    // One row or column: (a, b, d) -> (a, (a + b + d)/2, (a − b + d)/2, d).
    let g4 = |a: f32, b: f32, d: f32| [a, (a + b + d) * 0.5, (a - b + d) * 0.5, d];
    for oo in 0..o {
        for cc in 0..c {
            let g = &w[(oo * c + cc) * 9..][..9];
            // G·g (4×3), column by column.
            let cols: [[f32; 4]; 3] = std::array::from_fn(|j| g4(g[j], g[3 + j], g[6 + j]));
            for i in 0..4 {
                let row = g4(cols[0][i], cols[1][i], cols[2][i]);
                for (j, v) in row.into_iter().enumerate() {
                    out[(((i * 4 + j) * blocks + oo / ob) * c + cc) * ob + oo % ob] = v;
                }
            }
        }
    }
    out
}

/// Per-thread buffers: one zero-padded input channel and the transformed input
/// `V[ξ][c][tile]`.
#[derive(Default)]
pub(super) struct Scratch {
    xp: Vec<f32>,
    v: Vec<f32>,
}

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

/// One image: `y` (O×H×W) = conv(`x` (C×H×W), the kernel transformed by [`pack`]) + `bias`
/// [+ `residual`] [through ReLU, `p.relu`]. Every element of `y` is written.
pub(super) fn conv(
    isa: Isa,
    p: Plane,
    x: &[f32],
    up: &[f32],
    Addends { bias, residual }: Addends,
    s: &mut Scratch,
    y: &mut [MaybeUninit<f32>],
) {
    let Plane { h, w, c, o, .. } = p;
    let (_, _, pp) = tiles(h, w);
    let ob = isa.ob();
    assert!(
        p.stride == 1
            && h % 2 == 0
            && w % 8 == 0
            && x.len() == c * h * w
            && y.len() == o * h * w
            && bias.len() == o
            && residual.is_none_or(|r| r.len() == y.len())
            && up.len() == 16 * o.div_ceil(ob) * c * ob,
        "winograd conv: buffer sizes do not match {p:?}"
    );
    s.v.resize(16 * position_stride(c, pp), 0.0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` (AVX2 + FMA at least) was detected on this machine (the caller resolved
    // it); the input transform reads `x` and writes `V` (16×C×pp, checked there); the
    // products read `V` and `U` (sizes checked there) and write each block's `M` to a local
    // buffer, from which the output transform writes `y` within O×H×W (asserted), every
    // element once.
    unsafe {
        x86::transform_input(p, x, &mut s.xp, &mut s.v);
        let out = x86::Out {
            bias,
            residual,
            y: y.as_mut_ptr().cast(),
        };
        match isa {
            Isa::Avx512 => x86::products_avx512(p, &s.v, up, out),
            Isa::Avx2 => x86::products_avx2(p, &s.v, up, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("winograd convolution is only selected on x86-64")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{direct, position_stride, tiles, Plane};
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
        for ci in 0..c {
            let one = Plane { c: 1, ..p };
            direct::pad(one, &x[ci * h * w..(ci + 1) * h * w], xp);
            debug_assert_eq!(xp.len(), plane);
            let base = xp.as_ptr();
            for g in (0..pp).step_by(8) {
                let (a, b) = (corner(g), corner(g + 4));
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
    pub(super) unsafe fn products_avx512(p: Plane, v: &[f32], u: &[f32], out: Out) {
        products::<8, 4, true>(p, v, u, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn products_avx2(p: Plane, v: &[f32], u: &[f32], out: Out) {
        products::<4, 2, false>(p, v, u, out)
    }

    /// The most floats a block of products needs: 16 positions × 8 channels × 4 vectors.
    const BLOCK: usize = 16 * 8 * 4 * 8;

    /// For each block of `OB` output channels and `N` vectors of 8 tiles (then pairs and
    /// single vectors for the remainder): `M[ξ] = U[ξ] · V[ξ]` for the 16 positions ξ, into a
    /// buffer that stays in the L1 cache, then the output transform of that block. `WIDE`
    /// (AVX-512 only) computes the runs of `N` = 4 and the pairs on 512-bit registers, 16
    /// tiles each: every lane sums the same products in the same order, so the bits are
    /// those of 256-bit registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn products<const OB: usize, const N: usize, const WIDE: bool>(
        p: Plane,
        v: &[f32],
        u: &[f32],
        out: Out,
    ) {
        let Plane { h, w, c, o, .. } = p;
        let (_, _, pp) = tiles(h, w);
        let xs = position_stride(c, pp);
        let blocks = o.div_ceil(OB);
        let nvec = pp / 8;
        assert!(16 * OB * N * 8 <= BLOCK && v.len() >= 16 * xs && u.len() >= 16 * blocks * c * OB);
        let mut m = [0f32; BLOCK];
        for blk in 0..blocks {
            let valid = (o - blk * OB).min(OB);
            for (j, n) in direct::runs(nvec, N) {
                let row = n * 8;
                for xi in 0..16 {
                    let t = Tile {
                        c,
                        pp,
                        v: v.as_ptr().add(xi * xs + j * 8),
                        u: u.as_ptr().add((xi * blocks + blk) * c * OB),
                        m: m.as_mut_ptr().add(xi * OB * row),
                        row,
                        valid,
                    };
                    match (WIDE, n) {
                        (true, 4) => tile16::<OB, 2>(t),
                        (true, 2) => tile16::<OB, 1>(t),
                        (_, 1) => tile::<OB, 1>(t),
                        (_, 2) => tile::<OB, 2>(t),
                        _ => tile::<OB, N>(t),
                    }
                }
                let mb = MBlock {
                    m: m.as_ptr(),
                    position: OB * row,
                    row,
                    k0: blk * OB,
                    channels: valid,
                    first: j * 8,
                    vectors: n,
                };
                transform_output(p, mb, out);
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
        m: *mut f32,
        row: usize,
        valid: usize,
    }

    /// `OB` channels × `NN` vectors of tiles, summed over the input channels in order; the
    /// first `valid` channels are stored.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
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
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile16<const OB: usize, const NZ: usize>(t: Tile) {
        let mut acc = [[_mm512_setzero_ps(); NZ]; OB];
        for ci in 0..t.c {
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

    /// A block of products `M[ξ][channel][tile]`: floats from one position to the next and
    /// from one channel to the next, its first channel and their number, its first tile and
    /// its number of vectors of 8 tiles.
    #[derive(Clone, Copy)]
    struct MBlock {
        m: *const f32,
        position: usize,
        row: usize,
        k0: usize,
        channels: usize,
        first: usize,
        vectors: usize,
    }

    /// `y[o]` = `Aᵀ M A` + bias [+ residual] [through ReLU] for the block's channels and
    /// tiles, with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn transform_output(p: Plane, mb: MBlock, out: Out) {
        let Plane { h, w, .. } = p;
        let (_, tw, _) = tiles(h, w);
        let real = h / 2 * tw;
        let zero = _mm256_setzero_ps();
        for kk in 0..mb.channels {
            let k = mb.k0 + kk;
            let b = _mm256_set1_ps(out.bias[k]);
            let plane = k * h * w;
            for qq in 0..mb.vectors {
                let q = mb.first + qq * 8;
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
                    for (part, mut val) in halves.into_iter().enumerate() {
                        let tile = q + 4 * part;
                        if tile >= real {
                            continue;
                        }
                        let at = plane + (2 * (tile / tw) + r) * w + 2 * (tile % tw);
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
}
