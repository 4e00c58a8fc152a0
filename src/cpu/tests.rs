//! Unit tests of the CPU backend's hot loops (the end-to-end checks against the
//! float64 reference are in `tests/cpu_clip.rs`).

use half::{bf16, f16};

use super::loops::{add_rows, mean_ssq_k, store_means, sum_squares, sum_squares_f64, LANES};
use crate::dtype::{F16c, GradElement};

/// `sum x^2` in f64 of exact squares, one term after another.
fn exact(row: &[f32]) -> f64 {
    row.iter().map(|&x| x as f64 * x as f64).sum()
}

/// `len` values of magnitudes from about 1e-3 to 1e3, of both signs.
fn random_row(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let unit = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            let exponent = ((s >> 8) % 7) as i32 - 3;
            (unit - 0.5) * 10f32.powi(exponent)
        })
        .collect()
}

/// Lengths around the f32 chunks (256 columns) and a whole block.
const LENGTHS: [usize; 10] = [0, 1, 7, 8, 255, 256, 257, 511, 4096, 4100];

/// The f32 short sums stay within `9 * 2^-24` of the exact sum, relative.
#[test]
fn squares_in_f32_short_sums_stay_within_their_bound() {
    for (k, &len) in LENGTHS.iter().enumerate() {
        let row = random_row(k as u64 + 3, len);
        let (got, want) = (sum_squares(&row, F16c::OFF), exact(&row));
        let bound = 9.0 * f64::powi(2.0, -24) * want;
        assert!((got - want).abs() <= bound, "len {len}: {got} vs {want}");
        if len >= 256 {
            // The f32 path ran (it rounds differently from the f64 one).
            assert_ne!(got, sum_squares_f64(&row, F16c::OFF), "len {len}");
        }
    }
}

/// Rows whose squares f32 cannot hold are summed in f64: beyond f32's range,
/// in its subnormal range (far below it, and just below it: every square
/// between 2^-128 and 2^-126, which pins the threshold's scale), and a tiny
/// value among zeros. inf and NaN input give inf and NaN.
#[test]
fn squares_beyond_f32_fall_back_to_f64() {
    let mut huge = random_row(5, 300);
    huge.iter_mut().for_each(|x| *x *= 1e20);
    let mut tiny = random_row(6, 300);
    tiny.iter_mut().for_each(|x| *x *= 1e-22);
    let edge: Vec<f32> = (0..300)
        .map(|i| (1.0 + (i * 37 % 101) as f32 / 101.0) * f32::powi(2.0, -64))
        .collect();
    let mut lone = vec![0.0f32; 300];
    lone[123] = 1e-30;
    let mut inf = random_row(7, 300);
    inf[7] = f32::INFINITY;
    for (what, row) in [
        ("huge", &huge),
        ("tiny", &tiny),
        ("edge", &edge),
        ("lone", &lone),
    ] {
        let got = sum_squares(row, F16c::OFF);
        assert_eq!(got, sum_squares_f64(row, F16c::OFF), "{what}");
        let want = exact(row);
        assert!(got.is_finite() && got > 0.0, "{what}: {got}");
        assert!(
            (got - want).abs() <= 1e-13 * want,
            "{what}: {got} vs {want}"
        );
    }
    assert_eq!(sum_squares(&inf, F16c::OFF), f64::INFINITY);
    let mut nan = random_row(8, 300);
    nan[200] = f32::NAN;
    assert!(sum_squares(&nan, F16c::OFF).is_nan());
    // Zeros (either sign) give 0 (exact in f32: no fallback needed).
    let mut zeros = vec![0.0f32; 600];
    zeros[5] = -0.0;
    assert_eq!(sum_squares(&zeros, F16c::OFF), 0.0);
}

/// 16-bit rows give the bits of their f32 widening, with F16C and without.
#[test]
fn sixteen_bit_squares_match_their_f32_widening() {
    for (k, &len) in LENGTHS.iter().enumerate() {
        let row = random_row(k as u64 + 11, len);
        let halves: Vec<f16> = row.iter().map(|&x| f16::from_f32(x)).collect();
        // bf16 has f32's range: every other row's squares are beyond it.
        let scale = if k % 2 == 0 { 1.0 } else { 1e25 };
        let brains: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x * scale)).collect();
        let wide = |v: &[f32]| sum_squares(v, F16c::OFF).to_bits();
        let h32: Vec<f32> = halves.iter().map(|x| x.to_f32()).collect();
        let b32: Vec<f32> = brains.iter().map(|x| GradElement::to_f32(*x)).collect();
        for f16c in [F16c::OFF, F16c::detect()] {
            assert_eq!(
                sum_squares(&halves, f16c).to_bits(),
                wide(&h32),
                "f16 {len}"
            );
            assert_eq!(
                sum_squares(&brains, f16c).to_bits(),
                wide(&b32),
                "bf16 {len}"
            );
        }
    }
}

/// Writes `mean[c] = sum[c] * inv_n` (as f32 when `mean` is given; `stream`: see
/// `store_means`) and returns `sum_c (sum[c] * inv_n)^2`, in `LANES`
/// interleaved partial sums: the second sweep of the two-loop formulation that
/// the test below holds [`mean_ssq_k`] to (deep micro-batches took it until the
/// thirty-fourth session).
fn scale_and_sum_squares(sum: &[f64], inv_n: f64, mean: Option<&mut [f32]>, stream: bool) -> f64 {
    let mut lanes = [0.0f64; LANES];
    match mean {
        Some(mean) => {
            for (cs, cm) in sum.chunks(LANES).zip(mean.chunks_mut(LANES)) {
                let mut v = [0.0f64; LANES];
                for ((l, v), &s) in lanes.iter_mut().zip(&mut v).zip(cs) {
                    *v = s * inv_n;
                    *l += *v * *v;
                }
                store_means(cm, &v, stream);
            }
        }
        None => {
            for cs in sum.chunks(LANES) {
                for (l, &s) in lanes.iter_mut().zip(cs) {
                    *l += (s * inv_n) * (s * inv_n);
                }
            }
        }
    }
    lanes.iter().sum()
}

/// A micro-batch's mean and squared norm in one sweep ([`mean_ssq_k`], 2 to
/// `MEAN_ROWS_PER_SWEEP` rows, after the f64 sums of any earlier rows) have the
/// bits of the f64 row sums followed by the scaling ([`add_rows`],
/// [`scale_and_sum_squares`]): for K at both ends of the sweep's match (2, 3,
/// 7 and 8), rows that cancel, and widths with a tail of fewer than 8 columns;
/// 16-bit rows give the bits of their f32 widening, and means stored past the
/// cache the bits of plain stores.
#[test]
fn one_sweep_means_match_the_row_sums() {
    fn check<const K: usize>() {
        for &len in &[1, 7, 8, 37, 4100] {
            // Rows of magnitudes 2^-40 to 2^40 apart: their f64 sums round, so
            // that another order of additions gives other bits.
            let mut rows: Vec<Vec<f32>> = (0..K)
                .map(|r| {
                    let scale = f32::powi(2.0, (r as i32 * 29) % 81 - 40);
                    let row = random_row((K * 100 + r) as u64 + len as u64, len);
                    row.iter().map(|&x| x * scale).collect()
                })
                .collect();
            // The last row cancels the first (with a row between them).
            if K > 2 {
                rows[K - 1] = rows[0].iter().map(|&x| -x).collect();
            }
            let x: [&[f32]; K] = std::array::from_fn(|r| &rows[r][..]);
            let inv_n = 1.0 / K as f64;
            let mut one = vec![0.0f32; len];
            let ssq_one = mean_ssq_k::<f32, K>(x, inv_n, Some(&mut one), false, F16c::OFF, None);
            let mut sum = vec![0.0f64; len];
            add_rows(&mut sum, 0..K, |r| &rows[r][..], F16c::OFF);
            let mut two = vec![0.0f32; len];
            let ssq_two = scale_and_sum_squares(&sum, inv_n, Some(&mut two), false);
            assert_eq!(ssq_one.to_bits(), ssq_two.to_bits(), "K {K}, {len} columns");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&two), "K {K}, {len} columns");
            assert!(ssq_one > 0.0);
            // Deeper micro-batches (Plan::mean_ssq): the sums of `head` earlier
            // rows, then these K rows added to them in the one sweep; the bits
            // of all head + K rows summed first. The earlier rows cancel the
            // last ones (reversed in sign and order), so the sums pass through
            // values far from the mean.
            for head in [1, 5, 8, 9, 16] {
                let earlier: Vec<Vec<f32>> = (0..head)
                    .map(|r| {
                        rows[(K - 1 - r % K) % K]
                            .iter()
                            .map(|&v| -v * 0.75)
                            .collect()
                    })
                    .collect();
                let deep = |r: usize| -> &[f32] {
                    if r < head {
                        &earlier[r]
                    } else {
                        &rows[r - head]
                    }
                };
                let inv_n = 1.0 / (head + K) as f64;
                let mut sums = vec![0.0f64; len];
                add_rows(&mut sums, 0..head, deep, F16c::OFF);
                let mut one = vec![f32::NAN; len];
                let ssq_one =
                    mean_ssq_k::<f32, K>(x, inv_n, Some(&mut one), false, F16c::OFF, Some(&sums));
                let mut all = vec![0.0f64; len];
                add_rows(&mut all, 0..head + K, deep, F16c::OFF);
                let mut two = vec![0.0f32; len];
                let ssq_two = scale_and_sum_squares(&all, inv_n, Some(&mut two), false);
                let what = format!("K {K}, {head} earlier rows, {len} columns");
                assert_eq!(ssq_one.to_bits(), ssq_two.to_bits(), "{what}");
                assert_eq!(bits(&one), bits(&two), "{what}");
                let ssq_none = mean_ssq_k::<f32, K>(x, inv_n, None, false, F16c::OFF, Some(&sums));
                assert_eq!(ssq_none.to_bits(), ssq_two.to_bits(), "{what}, no means");
            }
            // Means stored past the cache (store_means: non-temporal stores where
            // a chunk starts 16-byte aligned): the same bits, at each of the four
            // f32 offsets within 16 bytes (one of them aligned), over NaN.
            let mut line = vec![0.0f32; len + 3];
            for at in 0..4 {
                let m = &mut line[at..at + len];
                m.fill(f32::NAN);
                let ssq = mean_ssq_k::<f32, K>(x, inv_n, Some(&mut *m), true, F16c::OFF, None);
                assert_eq!((ssq.to_bits(), bits(m)), (ssq_one.to_bits(), bits(&one)));
                m.fill(f32::NAN);
                let ssq = scale_and_sum_squares(&sum, inv_n, Some(&mut *m), true);
                assert_eq!((ssq.to_bits(), bits(m)), (ssq_two.to_bits(), bits(&two)));
            }
            // 16-bit rows: the bits of their f32 widening, with F16C and without
            // (bf16 rows as they are; f16 rows of the same values at f16's range).
            let brains: Vec<Vec<bf16>> = rows
                .iter()
                .map(|r| r.iter().map(|&v| bf16::from_f32(v)).collect())
                .collect();
            let halves: Vec<Vec<f16>> = rows
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|&v| f16::from_f32(v.clamp(-6e4, 6e4)))
                        .collect()
                })
                .collect();
            let wide = |rows: &[Vec<f32>]| {
                let x: [&[f32]; K] = std::array::from_fn(|r| &rows[r][..]);
                let mut mean = vec![0.0f32; len];
                let ssq = mean_ssq_k::<f32, K>(x, inv_n, Some(&mut mean), false, F16c::OFF, None);
                (ssq.to_bits(), bits(&mean))
            };
            let b32: Vec<Vec<f32>> = brains
                .iter()
                .map(|r| r.iter().map(|v| v.to_f32()).collect())
                .collect();
            let h32: Vec<Vec<f32>> = halves
                .iter()
                .map(|r| r.iter().map(|v| v.to_f32()).collect())
                .collect();
            for f16c in [F16c::OFF, F16c::detect()] {
                let x: [&[bf16]; K] = std::array::from_fn(|r| &brains[r][..]);
                let mut mean = vec![0.0f32; len];
                let ssq = mean_ssq_k::<bf16, K>(x, inv_n, Some(&mut mean), false, f16c, None);
                assert_eq!((ssq.to_bits(), bits(&mean)), wide(&b32), "bf16 K {K}");
                let x: [&[f16]; K] = std::array::from_fn(|r| &halves[r][..]);
                let ssq = mean_ssq_k::<f16, K>(x, inv_n, Some(&mut mean), false, f16c, None);
                assert_eq!((ssq.to_bits(), bits(&mean)), wide(&h32), "f16 K {K}");
            }
        }
    }
    check::<2>();
    check::<3>();
    check::<7>();
    check::<8>();
}
