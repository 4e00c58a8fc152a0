//! The counter-based Gaussian generator behind [`GaussianNoise`](crate::GaussianNoise),
//! on the CPU. The GPU kernel `add_noise.wgsl` implements the same functions.
//!
//! Output element `e` (numbered over all tensors in order, `e = sum_{q<p} D_q + i`
//! for element `i` of tensor `p`) takes word `e % 4` of
//!
//! ```text
//! philox4x32_10(counter = [lo(e/4), hi(e/4), lo(step), hi(step)], key = [lo(seed), hi(seed)])
//! ```
//!
//! and the four words of a counter give four normals by Box-Muller on pairs
//! `(w0, w1)` and `(w2, w3)`: with `u(w) = (2 * (w >> 9) + 1) / 2^24` (exact in f32,
//! in `(0, 1)`), `r = sqrt(-2 ln u(w0))`, `theta = 2 pi u(w1) - pi`, the normals are
//! `r cos theta` and `r sin theta`. The smallest `u` is `2^-24`, so `|z| <= 5.77`:
//! the tails beyond 5.77 standard deviations (probability 8e-9) are cut, and the
//! far tail is discrete (the largest radii are 5.77, 5.57, 5.48, ..., each drawn
//! with probability 2^-23). The accountant's guarantee is for exact Gaussian
//! noise; like every floating-point sampler (PyTorch's cuts near 6.7 standard
//! deviations), this one approximates it only up to its tails.
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

/// The four random words of the counter holding output element `element`.
pub fn philox_block(seed: u64, step: u64, element: u64) -> [u32; 4] {
    let q = element / 4;
    philox4x32_10(
        [q as u32, (q >> 32) as u32, step as u32, (step >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The random word of output element `element`.
pub fn philox_word(seed: u64, step: u64, element: u64) -> u32 {
    philox_block(seed, step, element)[(element % 4) as usize]
}

/// A word as a uniform in `(0, 1)`: `(2 * (w >> 9) + 1) / 2^24`.
fn uniform(w: u32) -> f64 {
    (2 * (w >> 9) + 1) as f64 / (1u64 << 24) as f64
}

/// The standard normal of output element `element`, evaluated in f64.
pub fn standard_normal(seed: u64, step: u64, element: u64) -> f64 {
    let w = philox_block(seed, step, element);
    let pair = (element % 4) as usize / 2;
    let r = (-2.0 * uniform(w[2 * pair]).ln()).sqrt();
    let theta = 2.0 * std::f64::consts::PI * uniform(w[2 * pair + 1]) - std::f64::consts::PI;
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
