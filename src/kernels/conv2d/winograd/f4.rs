//! Winograd F(4×4, 3×3): each 4×4 block of outputs from the 6×6 block of inputs around it,
//! 36 multiplications per channel pair instead of F(2×2, 3×3)'s 16 for a quarter of the
//! outputs (1.78× fewer products), with the interpolation points 0, ±1, ±2 (Lavin & Gray
//! 2016):
//!
//! - `Bᵀ` rows: (4, 0, −5, 0, 1, 0), (0, −4, −4, 1, 1, 0), (0, 4, −4, −1, 1, 0),
//!   (0, −2, −1, 2, 1, 0), (0, 2, −1, −2, 1, 0), (0, 4, 0, −5, 0, 1);
//! - `G` rows: (¼, 0, 0), (−⅙, −⅙, −⅙), (−⅙, ⅙, −⅙), (1⁄24, 1⁄12, ⅙), (1⁄24, −1⁄12, ⅙),
//!   (0, 0, 1);
//! - `Aᵀ` rows: (1, 1, 1, 1, 1, 0), (0, 1, −1, 2, −2, 0), (0, 1, 1, 4, 4, 0),
//!   (0, 1, −1, 8, −8, 1).
//!
//! The products (the forward pass's and the weight gradient's) are the parent module's, over
//! 36 positions; the weight gradient's transforms are `A` on the output gradient's 4×4
//! blocks and `Gᵀ · G` on the summed products. Shapes: a height that is a
//! multiple of 8 and a width that is a multiple of 16, so an image's tiles fill whole groups
//! of eight and each half of a group (four tiles) lies in one row of tiles. Within a group
//! the lanes hold the tiles in their row-major order.
//!
//! The input transform reads each channel from four phase planes (padded column `q` in
//! plane `q mod 4` at `q / 4`), so that the same column of eight consecutive tiles is one
//! contiguous load; the output transform transposes each tile's four outputs per row back
//! into place. The rounding differs from F(2×2, 3×3)'s (coefficients up to 8 in the output
//! transform, ⅙ in the kernel's), within f32 tolerance of the direct convolution (tested
//! against candle's).

/// Positions ξ of the 6×6 transform.
pub(super) const POSITIONS: usize = 36;

/// Whether an `h`×`w` image takes F(4×4, 3×3) (module docs).
pub(super) fn fits(h: usize, w: usize) -> bool {
    h > 0 && w > 0 && h.is_multiple_of(8) && w.is_multiple_of(16)
}

/// Tiles of an `h`×`w` image: rows and columns.
pub(super) fn tiles(h: usize, w: usize) -> (usize, usize) {
    (h / 4, w / 4)
}

/// The kernel transform `U = G g Gᵀ` (6×6) of every (output, input) channel pair of `w`
/// (O×C×3×3), packed as `[ξ][o / ob][c][o % ob]` (output channels padded with zeros).
pub(super) fn pack(ob: usize, w: &[f32], o: usize, c: usize) -> Vec<f32> {
    super::pack_with(ob, w, o, c, |[a, b, d]| {
        [
            a * 0.25,
            -(a + b + d) / 6.0,
            -(a - b + d) / 6.0,
            (a * 0.25 + b * 0.5 + d) / 6.0,
            (a * 0.25 - b * 0.5 + d) / 6.0,
            d,
        ]
    })
}

/// `dw[o][c]` += `Gᵀ dU[o][c] G` (`du(ξ, c, o)`, 6×6 per channel pair), the kernel
/// transform's gradient, with `Gᵀ`'s rows (¼, −⅙, −⅙, 1⁄24, 1⁄24, 0), (0, −⅙, ⅙, 1⁄12, −1⁄12, 0),
/// (0, −⅙, −⅙, ⅙, ⅙, 1).
pub(super) fn kernel_gradient(
    du: impl Fn(usize, usize, usize) -> f32,
    c: usize,
    o: usize,
    dw: &mut [f32],
) {
    super::kernel_gradient_with(du, c, o, dw, |u: [f32; 6]| {
        let (s12, d12) = (u[1] + u[2], u[2] - u[1]);
        let (s34, d34) = (u[3] + u[4], u[3] - u[4]);
        [
            u[0] * 0.25 - s12 / 6.0 + s34 / 24.0,
            d12 / 6.0 + d34 / 12.0,
            (s34 - s12) / 6.0 + u[5],
        ]
    })
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::super::x86::{MBlock, Out};
    use super::super::{gradient_position_stride, position_stride, Isa, Plane};
    use super::{tiles, POSITIONS};
    use std::arch::x86_64::*;

    /// `Bᵀ·d` for one column (or `d·B` for one row) of six vectors.
    #[inline(always)]
    unsafe fn bt(d: [__m256; 6]) -> [__m256; 6] {
        let (four, five, two) = (
            _mm256_set1_ps(4.0),
            _mm256_set1_ps(5.0),
            _mm256_set1_ps(2.0),
        );
        let d42 = _mm256_sub_ps(d[4], d[2]);
        [
            _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4])),
            _mm256_fnmadd_ps(four, _mm256_add_ps(d[1], d[2]), _mm256_add_ps(d[3], d[4])),
            _mm256_fmadd_ps(four, _mm256_sub_ps(d[1], d[2]), _mm256_sub_ps(d[4], d[3])),
            _mm256_fmadd_ps(two, _mm256_sub_ps(d[3], d[1]), d42),
            _mm256_fmadd_ps(two, _mm256_sub_ps(d[1], d[3]), d42),
            _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5])),
        ]
    }

    /// The output transform's arithmetic on 256-bit registers (`at`, `output_rows`: eight
    /// tiles) and 512-bit ones (`at16`, `output_rows16`: sixteen), the same operations per
    /// lane: `at` is `Aᵀ·m` for one column (or `m·A` for one row) of six vectors;
    /// `output_rows` the four rows of `Aᵀ M A` (four outputs each) for the tiles at `src`,
    /// whose 36 positions lie `position` floats apart.
    macro_rules! output_transform_with {
        (
            $at:ident, $rows:ident, $v:ty, $load:ident, $add:ident, $sub:ident, $fmadd:ident,
            $set1:ident, $(#[$m:meta])*
        ) => {
            #[inline(always)]
            unsafe fn $at(m: [$v; 6]) -> [$v; 4] {
                let (s12, d12) = ($add(m[1], m[2]), $sub(m[1], m[2]));
                let (s34, d34) = ($add(m[3], m[4]), $sub(m[3], m[4]));
                [
                    $add($add(s12, s34), m[0]),
                    $fmadd($set1(2.0), d34, d12),
                    $fmadd($set1(4.0), s34, s12),
                    $add($fmadd($set1(8.0), d34, d12), m[5]),
                ]
            }

            $(#[$m])*
            unsafe fn $rows(src: *const f32, position: usize) -> [[$v; 4]; 4] {
                // cols[j][i]: row i, column j of Aᵀ M. (Arrays of calls, as in the input
                // transform.)
                let col = |j: usize| {
                    let (at, step) = (src.add(j * position), 6 * position);
                    $at([
                        $load(at),
                        $load(at.add(step)),
                        $load(at.add(2 * step)),
                        $load(at.add(3 * step)),
                        $load(at.add(4 * step)),
                        $load(at.add(5 * step)),
                    ])
                };
                let cols = [col(0), col(1), col(2), col(3), col(4), col(5)];
                std::array::from_fn(|r| {
                    $at([
                        cols[0][r], cols[1][r], cols[2][r], cols[3][r], cols[4][r], cols[5][r],
                    ])
                })
            }
        };
    }
    output_transform_with!(
        at,
        output_rows,
        __m256,
        _mm256_loadu_ps,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_fmadd_ps,
        _mm256_set1_ps,
        #[inline(always)]
    );
    output_transform_with!(
        at16,
        output_rows16,
        __m512,
        _mm512_loadu_ps,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_fmadd_ps,
        _mm512_set1_ps,
        #[target_feature(enable = "avx512f")]
        #[inline]
    );

    /// Eight tiles' values at offset `off` from the corners `a` (lanes 0-3) and `b` (lanes
    /// 4-7) in `base`; one load when `one` (`b` = `a` + 4).
    #[inline(always)]
    unsafe fn load8(base: *const f32, a: usize, b: usize, one: bool, off: usize) -> __m256 {
        if one {
            _mm256_loadu_ps(base.add(a + off))
        } else {
            _mm256_loadu2_m128(base.add(b + off), base.add(a + off))
        }
    }

    /// Row `r` of `d·B` for the group of eight tiles with corners `a`, `b` in the phase
    /// planes at `base` (`phase` floats apart, rows of `l`).
    #[inline(always)]
    unsafe fn input_row(
        base: *const f32,
        [a, b]: [usize; 2],
        one: bool,
        [phase, l]: [usize; 2],
        r: usize,
    ) -> [__m256; 6] {
        let at = |k: usize| k % 4 * phase + r * l + k / 4;
        bt([
            load8(base, a, b, one, at(0)),
            load8(base, a, b, one, at(1)),
            load8(base, a, b, one, at(2)),
            load8(base, a, b, one, at(3)),
            load8(base, a, b, one, at(4)),
            load8(base, a, b, one, at(5)),
        ])
    }

    /// Floats per phase plane row (`w / 4` columns and the right padding column's) and per
    /// phase plane (`h + 2` padded rows).
    fn phase_dims(h: usize, w: usize) -> (usize, usize) {
        let l = w / 4 + 1;
        (l, (h + 2) * l)
    }

    /// `v[ξ][c][tile]` = `Bᵀ d B` for every channel and tile of `x` (C×H×W). Each channel is
    /// first written into the four phase planes of its zero-padded copy (`xp`, zeroed when
    /// sized: only the image's own pixels are written, so the padding stays zero), then the
    /// transform takes eight tiles at a time in registers, `d·B` along each input row, then
    /// `Bᵀ` down the columns.
    /// [`transform_input_body`] compiled for `isa`: with AVX-512VL's 32 vector registers its
    /// 36 values per group of tiles stay in registers (the same instructions on 256-bit
    /// vectors, hence the same bits).
    pub(in super::super) unsafe fn transform_input(
        isa: Isa,
        p: Plane,
        x: &[f32],
        mask: Option<&[f32]>,
        xp: &mut Vec<f32>,
        v: &mut [f32],
    ) {
        match isa {
            Isa::Avx512 => transform_input_avx512(p, x, mask, xp, v),
            Isa::Avx2 => transform_input_avx2(p, x, mask, xp, v),
        }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn transform_input_avx512(
        p: Plane,
        x: &[f32],
        mask: Option<&[f32]>,
        xp: &mut Vec<f32>,
        v: &mut [f32],
    ) {
        transform_input_body(p, x, mask, xp, v)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn transform_input_avx2(
        p: Plane,
        x: &[f32],
        mask: Option<&[f32]>,
        xp: &mut Vec<f32>,
        v: &mut [f32],
    ) {
        transform_input_body(p, x, mask, xp, v)
    }

    /// Eight floats of `x` from `at`, or with `mask` those where the mask (a ReLU's output,
    /// at the same place) is positive and +0 elsewhere: the select of the ReLU's gradient.
    #[inline(always)]
    unsafe fn load_masked(x: *const f32, mask: Option<*const f32>, at: usize) -> __m256 {
        let v = _mm256_loadu_ps(x.add(at));
        match mask {
            None => v,
            Some(m) => {
                let m = _mm256_loadu_ps(m.add(at));
                _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_GT_OQ>(m, _mm256_setzero_ps()))
            }
        }
    }

    #[inline(always)]
    unsafe fn transform_input_body(
        p: Plane,
        x: &[f32],
        mask: Option<&[f32]>,
        xp: &mut Vec<f32>,
        v: &mut [f32],
    ) {
        let Plane { h, w, c, .. } = p;
        let (th, tw) = tiles(h, w);
        let pp = th * tw;
        let xs = position_stride(c, pp);
        let (l, phase) = phase_dims(h, w);
        assert!(
            super::fits(h, w)
                && x.len() == c * h * w
                && mask.is_none_or(|m| m.len() == x.len())
                && v.len() >= POSITIONS * xs,
            "winograd F(4×4, 3×3): buffer sizes do not match {p:?}"
        );
        if xp.len() != 4 * phase {
            xp.clear();
            xp.resize(4 * phase, 0.0);
        }
        // Lanes of an in-register 8×4 → 4×8 transpose back in column order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let zero = _mm256_setzero_ps();
        // Start of tile t's 6×6 neighbourhood in phase plane 0: padded row 4·ty, j = tx.
        let corner = |t: usize| 4 * (t / tw) * l + t % tw;
        // Each group's two halves' corners, once per call (divisions are slow).
        let corners: Vec<(usize, usize)> = (0..pp)
            .step_by(8)
            .map(|g| (corner(g), corner(g + 4)))
            .collect();
        // 64-byte lines of a channel, and how many to prefetch per group of tiles.
        let lines = (h * w).div_ceil(16);
        let lines_per_group = lines.div_ceil(pp / 8);
        for ci in 0..c {
            let src = x.as_ptr().add(ci * h * w);
            let msrc = mask.map(|m| m.as_ptr().add(ci * h * w));
            let dst = xp.as_mut_ptr();
            for r in 0..h {
                let (row, out) = (src.add(r * w), dst.add((r + 1) * l));
                let mrow = msrc.map(|m| m.add(r * w));
                let mut c0 = 0;
                while c0 < w {
                    // Columns c0 + m + 4i (i < 8, or 4 for a last half-width run) are
                    // padded columns c0 + m + 1 + 4i: plane (m + 1) mod 4 from
                    // j = c0/4 + (m + 1)/4.
                    let wide = w - c0 >= 32;
                    let v0 = load_masked(row, mrow, c0);
                    let v1 = load_masked(row, mrow, c0 + 8);
                    let (v2, v3) = if wide {
                        (
                            load_masked(row, mrow, c0 + 16),
                            load_masked(row, mrow, c0 + 24),
                        )
                    } else {
                        (zero, zero)
                    };
                    let t0 = _mm256_unpacklo_ps(v0, v1);
                    let t1 = _mm256_unpackhi_ps(v0, v1);
                    let t2 = _mm256_unpacklo_ps(v2, v3);
                    let t3 = _mm256_unpackhi_ps(v2, v3);
                    let q = [
                        _mm256_shuffle_ps::<0x44>(t0, t2),
                        _mm256_shuffle_ps::<0xEE>(t0, t2),
                        _mm256_shuffle_ps::<0x44>(t1, t3),
                        _mm256_shuffle_ps::<0xEE>(t1, t3),
                    ];
                    for (m, qm) in q.into_iter().enumerate() {
                        let qm = _mm256_permutevar8x32_ps(qm, order);
                        let at = out.add((m + 1) % 4 * phase + c0 / 4 + (m + 1) / 4);
                        if wide {
                            _mm256_storeu_ps(at, qm);
                        } else {
                            _mm_storeu_ps(at, _mm256_castps256_ps128(qm));
                        }
                    }
                    c0 += if wide { 32 } else { 16 };
                }
            }
            let base = xp.as_ptr();
            for (g, &(a, b)) in (0..pp).step_by(8).zip(&corners) {
                // The next channel's rows into the cache while this one's tiles are
                // transformed, a share with each group of tiles (they come from memory:
                // without this, their loads were the transform's hottest instructions).
                if ci + 1 < c {
                    let first = g / 8 * lines_per_group;
                    for src in std::iter::once(x).chain(mask) {
                        let next = src.as_ptr().add((ci + 1) * h * w);
                        for line in first..(first + lines_per_group).min(lines) {
                            _mm_prefetch::<_MM_HINT_T0>(next.add(16 * line).cast());
                        }
                    }
                }
                let one = b == a + 4;
                // e[r][j]: row r of d·B for the eight tiles. (Arrays of calls, not zeroed
                // arrays filled in loops: those were zeroed by a `memset` call each time.)
                let row = |r: usize| input_row(base, [a, b], one, [phase, l], r);
                let e = [row(0), row(1), row(2), row(3), row(4), row(5)];
                let out = v.as_mut_ptr().add(ci * pp + g);
                // (Column j of every row: an index, not an iterator.)
                #[allow(clippy::needless_range_loop)]
                for j in 0..6 {
                    let col = bt([e[0][j], e[1][j], e[2][j], e[3][j], e[4][j], e[5][j]]);
                    for (i, val) in col.into_iter().enumerate() {
                        _mm256_storeu_ps(out.add((6 * i + j) * xs), val);
                    }
                }
            }
        }
    }

    /// `y[o]` = `Aᵀ M A` + bias [+ residual] [through ReLU] for the block's channels and
    /// tiles: `Aᵀ` down the columns, then `A` along the rows, then each tile's four outputs
    /// per row transposed into place. With `wide` (AVX-512), pairs of vectors of tiles take
    /// the transforms on 512-bit registers (the same operations per lane: the same bits).
    /// (Inlined into the products, compiled for each instruction set as they are: with
    /// AVX-512VL's 32 vector registers, fewer values spill.)
    #[inline(always)]
    pub(in super::super) unsafe fn transform_output<const WIDE: bool>(
        p: Plane,
        mb: MBlock,
        out: Out,
    ) {
        let Plane { h, w, .. } = p;
        let (_, tw) = tiles(h, w);
        // Where the top row of each pair of tiles goes within a channel's plane (computed
        // once per block: divisions are slow).
        let mut places = [[0usize; 4]; 4];
        assert!(mb.vectors <= places.len());
        for (qq, row) in places.iter_mut().enumerate().take(mb.vectors) {
            for (pair, place) in row.iter_mut().enumerate() {
                let tile = mb.first + qq * 8 + 2 * pair;
                *place = 4 * (tile / tw) * w + 4 * (tile % tw);
            }
        }
        let pairs = if WIDE { mb.vectors / 2 } else { 0 };
        for kk in 0..mb.channels {
            let k = mb.k0 + kk;
            let b = _mm256_set1_ps(out.bias[k]);
            let plane = k * h * w;
            let src = mb.m.add(kk * mb.row);
            for pair in 0..pairs {
                let rows = output_rows16(src.add(pair * 16), mb.position);
                for (r, [o0, o1, o2, o3]) in rows.into_iter().enumerate() {
                    for (half, place) in places[2 * pair..2 * pair + 2].iter().enumerate() {
                        let lo = |v: __m512| half16(v, half);
                        let o = [lo(o0), lo(o1), lo(o2), lo(o3)];
                        store_row(p, out, o.map(|v| _mm256_add_ps(v, b)), plane + r * w, place);
                    }
                }
            }
            for (qq, place) in places.iter().enumerate().take(mb.vectors).skip(2 * pairs) {
                let rows = output_rows(src.add(qq * 8), mb.position);
                for (r, o) in rows.into_iter().enumerate() {
                    store_row(p, out, o.map(|v| _mm256_add_ps(v, b)), plane + r * w, place);
                }
            }
        }
    }

    /// Half `half` (0: lanes 0-7, 1: lanes 8-15) of a 512-bit vector.
    #[inline(always)]
    unsafe fn half16(v: __m512, half: usize) -> __m256 {
        let d = _mm512_castps_pd(v);
        _mm256_castpd_ps(if half == 0 {
            _mm512_castpd512_pd256(d)
        } else {
            _mm512_extractf64x4_pd::<1>(d)
        })
    }

    /// One output row of eight tiles (`o[c]`: output column c of each, bias added) stored in
    /// place: transposed so that tiles (0, 1), (2, 3), (4, 5), (6, 7) each lie side by side,
    /// at `row` + `place[pair]` within the output; the residual added and the ReLU applied
    /// as `out` and `p` say.
    #[inline(always)]
    unsafe fn store_row(
        p: Plane,
        out: Out,
        [o0, o1, o2, o3]: [__m256; 4],
        row: usize,
        place: &[usize; 4],
    ) {
        let zero = _mm256_setzero_ps();
        let u0 = _mm256_unpacklo_ps(o0, o1);
        let u1 = _mm256_unpackhi_ps(o0, o1);
        let u2 = _mm256_unpacklo_ps(o2, o3);
        let u3 = _mm256_unpackhi_ps(o2, o3);
        let w0 = _mm256_shuffle_ps::<0x44>(u0, u2);
        let w1 = _mm256_shuffle_ps::<0xEE>(u0, u2);
        let w2 = _mm256_shuffle_ps::<0x44>(u1, u3);
        let w3 = _mm256_shuffle_ps::<0xEE>(u1, u3);
        let pairs = [
            _mm256_permute2f128_ps::<0x20>(w0, w1),
            _mm256_permute2f128_ps::<0x20>(w2, w3),
            _mm256_permute2f128_ps::<0x31>(w0, w1),
            _mm256_permute2f128_ps::<0x31>(w2, w3),
        ];
        for (mut val, place) in pairs.into_iter().zip(place) {
            let at = row + place;
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

    /// `A·d` for one column (or `d·Aᵀ` for one row) of four vectors, `A` (6×4) having the
    /// rows (1, 0, 0, 0), (1, 1, 1, 1), (1, −1, 1, −1), (1, 2, 4, 8), (1, −2, 4, −8),
    /// (0, 0, 0, 1).
    #[inline(always)]
    unsafe fn a6(d: [__m256; 4]) -> [__m256; 6] {
        let (s02, s13) = (_mm256_add_ps(d[0], d[2]), _mm256_add_ps(d[1], d[3]));
        let t02 = _mm256_fmadd_ps(_mm256_set1_ps(4.0), d[2], d[0]);
        let t13 = _mm256_fmadd_ps(
            _mm256_set1_ps(2.0),
            d[1],
            _mm256_mul_ps(_mm256_set1_ps(8.0), d[3]),
        );
        [
            d[0],
            _mm256_add_ps(s02, s13),
            _mm256_sub_ps(s02, s13),
            _mm256_add_ps(t02, t13),
            _mm256_sub_ps(t02, t13),
            d[3],
        ]
    }

    /// `d·Aᵀ` for the four pixels of one row of a tile, eight channels each (`ov` apart).
    #[inline(always)]
    unsafe fn gradient_row(at: *const f32, ov: usize) -> [__m256; 6] {
        a6([
            _mm256_loadu_ps(at),
            _mm256_loadu_ps(at.add(ov)),
            _mm256_loadu_ps(at.add(2 * ov)),
            _mm256_loadu_ps(at.add(3 * ov)),
        ])
    }

    /// `m[ξ][tile][channel]` = `(A dY Aᵀ)[ξ]` for every tile (in [`transform_input`]'s order:
    /// row-major) from the pixel-major output gradient `dyt` (`ov` channels per pixel), eight
    /// channels at a time: `A` along each of the tile's four rows, then down the columns.
    /// [`transform_gradient_body`] compiled for `isa` (as [`transform_input`]).
    pub(in super::super) unsafe fn transform_gradient(
        isa: Isa,
        p: Plane,
        dyt: &[f32],
        ov: usize,
        m: &mut [f32],
    ) {
        match isa {
            Isa::Avx512 => transform_gradient_avx512(p, dyt, ov, m),
            Isa::Avx2 => transform_gradient_avx2(p, dyt, ov, m),
        }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn transform_gradient_avx512(p: Plane, dyt: &[f32], ov: usize, m: &mut [f32]) {
        transform_gradient_body(p, dyt, ov, m)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn transform_gradient_avx2(p: Plane, dyt: &[f32], ov: usize, m: &mut [f32]) {
        transform_gradient_body(p, dyt, ov, m)
    }

    #[inline(always)]
    unsafe fn transform_gradient_body(p: Plane, dyt: &[f32], ov: usize, m: &mut [f32]) {
        let Plane { h, w, .. } = p;
        let (th, tw) = tiles(h, w);
        let pp = th * tw;
        let ms = gradient_position_stride(pp, ov);
        assert!(
            super::fits(h, w)
                && dyt.len() >= h * w * ov
                && m.len() >= POSITIONS * ms
                && ov.is_multiple_of(8)
        );
        let (src, dst) = (dyt.as_ptr(), m.as_mut_ptr());
        for t in 0..pp {
            let top = src.add((4 * (t / tw) * w + 4 * (t % tw)) * ov);
            let out = dst.add(t * ov);
            for cv in (0..ov).step_by(8) {
                // e[r][j]: row r of dY Aᵀ.
                let row = |r: usize| gradient_row(top.add(r * w * ov + cv), ov);
                let e = [row(0), row(1), row(2), row(3)];
                // (Column j of every row: an index, not an iterator.)
                #[allow(clippy::needless_range_loop)]
                for j in 0..6 {
                    let col = a6([e[0][j], e[1][j], e[2][j], e[3][j]]);
                    for (i, val) in col.into_iter().enumerate() {
                        _mm256_storeu_ps(out.add((6 * i + j) * ms + cv), val);
                    }
                }
            }
        }
    }
}
