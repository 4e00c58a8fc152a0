//! The counter-based Gaussian generator behind [`GaussianNoise`](crate::GaussianNoise),
//! on the CPU. The GPU kernel `add_noise.wgsl` implements the same functions.
//!
//! The random words form one stream per `(seed, step)`: word `i` is word `i % 4` of
//!
//! ```text
//! philox4x32_10(counter = [lo(i/4), hi(i/4), lo(step), hi(step)], key = [lo(seed), hi(seed)])
//! ```
//!
//! Output elements are numbered over all tensors in order (`e = sum_{q<p} D_q + i`
//! for element `i` of tensor `p`), and elements `2k` and `2k + 1` share the block of
//! counter `k` (words `4k .. 4k + 3`) for one Box-Muller pair: with the 64-bit
//! `x = w0 * 2^32 + w1`, `u = (x + 1/2) / 2^64` in `(0, 1)`, `r = sqrt(-2 ln u)`,
//! `theta = 2 pi (2 * (w2 >> 9) + 1) / 2^24 - pi`; element `2k` is `r cos theta`,
//! `2k + 1` is `r sin theta` (`w3` is unused). The smallest `u` is `2^-65`, so
//! `|z| <= 9.49`: the tail beyond 9.49 standard deviations is cut. That cut is
//! what a privacy bound for exact Gaussian noise does not cover: a neighbouring
//! batch shifts the noise's centre by up to `1 / sigma` standard deviations, and
//! with probability about `3e-17` per step at `sigma = 1` (`7e-14` at `sigma =
//! 0.5`, `5e-19` at `sigma = 2`) the noise lands where it could not land without
//! that shift, when the shift falls on one Box-Muller pair; spread over all `D`
//! coordinates it can reach about `sqrt(D / 2) (R / pi) e^(-R^2 / 2) / sigma`
//! (`R = 9.49`): `6e-16` at `D = 1e8`, `sigma = 1`. Over `T` steps at sampling
//! rate `q` that adds about `T q` times this to delta, negligible beside any
//! delta in use. (Radii from a 24-bit
//! uniform, as before 2026-12-05, were cut at 5.77 standard deviations: about
//! `2.3e-6` per step at `sigma = 1`, `1.5e-4` at `sigma = 0.5`.) Like every
//! floating-point sampler, the values are discrete (f32 radii, angles from 23
//! bits: `w2 >> 9`), which the privacy accounting also does not model.
//!
//! The generator is statistical, not cryptographic, and the seed is the noise's
//! secret: see [`GaussianNoise`](crate::GaussianNoise) for how to draw it and why
//! no two calls may share `(seed, step)`.
//!
//! The random words are integers and match the GPU bit for bit; the normals match
//! up to the float error of `ln`, `cos` and `sin` (the GPU evaluates them in f32,
//! with the accuracy WGSL allows: absolute error up to `2^-11` for `cos`/`sin`;
//! for `1 - u < 1/16` the GPU sums the series of `-ln(1 - v)` instead of calling
//! `log`, whose error bound there is absolute, not relative).

/// Philox4x32 multipliers and Weyl key increments (Salmon et al., SC'11).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The Philox4x32 block function with 10 rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let p0 = M0 as u64 * c0 as u64;
        let p1 = M1 as u64 * c2 as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// The four words of counter `counter` (stream words `4 counter .. 4 counter + 3`).
pub fn philox_block(seed: u64, step: u64, counter: u64) -> [u32; 4] {
    philox4x32_10(
        [
            counter as u32,
            (counter >> 32) as u32,
            step as u32,
            (step >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// Word `word` of the stream of `(seed, step)`.
pub fn philox_word(seed: u64, step: u64, word: u64) -> u32 {
    philox_block(seed, step, word / 4)[(word % 4) as usize]
}

/// The Box-Muller words of output element `element`: the block of counter
/// `element / 2`, shared with its pair.
pub fn normal_block(seed: u64, step: u64, element: u64) -> [u32; 4] {
    philox_block(seed, step, element / 2)
}

/// `-ln u` for the 64-bit `x` of a block, `u = (x + 1/2) / 2^64`, in f64: from
/// `1 - u = (!x + 1/2) / 2^64` near 1 (`x + 1/2` would round there).
fn neg_ln_uniform64(x: u64) -> f64 {
    let scale = 1.0 / 18_446_744_073_709_551_616.0; // 2^-64
    if x >= 1 << 63 {
        -(-((!x) as f64 + 0.5) * scale).ln_1p()
    } else {
        -((x as f64 + 0.5) * scale).ln()
    }
}

/// The standard normal of output element `element`, evaluated in f64.
pub fn standard_normal(seed: u64, step: u64, element: u64) -> f64 {
    let w = normal_block(seed, step, element);
    let x = ((w[0] as u64) << 32) | w[1] as u64;
    let r = (2.0 * neg_ln_uniform64(x)).sqrt();
    let angle = (2 * (w[2] >> 9) + 1) as f64 / (1u64 << 24) as f64;
    let theta = 2.0 * std::f64::consts::PI * angle - std::f64::consts::PI;
    if element.is_multiple_of(2) {
        r * theta.cos()
    } else {
        r * theta.sin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    /// Elements far into a stream whose radius word is 12: `u` about 2.8e-9, a
    /// radius of 6.27, beyond the 5.77 a 24-bit uniform could reach.
    const TAIL_ELEMENTS: [u64; 2] = [294_965_240, 294_965_241];

    #[test]
    fn normals_match_an_independent_implementation() {
        // (seed 7, step 1): Philox4x32-10 and the Box-Muller of the module docs,
        // written anew in Python (integers, then `-ln u` in 50-digit decimals and
        // math.cos / math.sin), not derived from this code.
        let want = [
            (0, 0.4449907071811655),
            (1, -1.0991894847622405),
            (2, -0.054883155449501224),
            (3, 0.4858261272521519),
            (4, 1.519065024218704),
            (5, 0.4131556124933615),
            (6, -0.6418550814440205),
            (7, -1.5280116959015797),
            (TAIL_ELEMENTS[0], 5.3396205981426),
            (TAIL_ELEMENTS[1], 3.2890493878181126),
        ];
        for (e, z) in want {
            let got = standard_normal(7, 1, e);
            assert!(
                (got - z).abs() <= 1e-13 * z.abs().max(1.0),
                "element {e}: {got} {z}"
            );
        }
        assert_eq!(normal_block(7, 1, TAIL_ELEMENTS[0])[0], 12);
        let r =
            standard_normal(7, 1, TAIL_ELEMENTS[0]).hypot(standard_normal(7, 1, TAIL_ELEMENTS[1]));
        assert!(r > 6.2, "radius {r}");
    }

    #[test]
    fn neighbouring_normals_are_distinct_and_uncorrelated() {
        let n = 400_000u64;
        let z: Vec<f64> = (0..n).map(|e| standard_normal(3, 9, e)).collect();
        for quad in z.chunks(4) {
            for i in 0..4 {
                for j in i + 1..4 {
                    assert_ne!(quad[i], quad[j], "{quad:?}");
                }
            }
        }
        // Lag correlations (elements sharing a block, pair or neither); standard
        // error 1/sqrt(n) = 0.0016.
        for lag in 1..=4 {
            let m = (n - lag) as usize;
            let c = (0..m).map(|e| z[e] * z[e + lag as usize]).sum::<f64>() / m as f64;
            assert!(c.abs() < 5.0 * 0.0016, "lag {lag}: correlation {c}");
        }
    }

    #[test]
    fn normals_have_unit_moments_and_steps_are_independent() {
        let n = 200_000u64;
        let a: Vec<f64> = (0..n).map(|e| standard_normal(7, 1, e)).collect();
        let b: Vec<f64> = (0..n).map(|e| standard_normal(7, 2, e)).collect();
        let mean = a.iter().sum::<f64>() / n as f64;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let corr = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() / n as f64;
        // Standard errors: mean 1/sqrt(n) = 0.0022, variance sqrt(2/n) = 0.0032.
        assert!(mean.abs() < 5.0 * 0.0023, "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * 0.0032, "variance {var}");
        assert!(
            corr.abs() < 5.0 * 0.0023,
            "correlation of steps 1 and 2: {corr}"
        );
        // Fourth moment 3 (a normal's kurtosis), standard error sqrt(96/n) = 0.022.
        let m4 = a.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64;
        assert!((m4 - 3.0).abs() < 5.0 * 0.022, "fourth moment {m4}");
    }
}
