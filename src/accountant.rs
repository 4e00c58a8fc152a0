//! Rényi-DP (RDP) privacy accountant for the Poisson-subsampled Gaussian
//! mechanism, the mechanism behind DP-SGD.
//!
//! # The mechanism
//!
//! Each training step samples a batch by including every one of the `n`
//! examples independently with probability `q` (Poisson sampling), computes a
//! sum `G` whose L2 sensitivity is `D` (adding or removing one example moves
//! `G` by at most `D` in L2 norm), and releases `G + N(0, (sigma * D)^2 I)`.
//! `sigma` is the *noise multiplier*. One such step is the sampled Gaussian
//! mechanism (SGM); `T` steps compose.
//!
//! The RDP of one step at order `alpha > 1` is `ln(A_alpha) / (alpha - 1)` with
//! `A_alpha = E_{z ~ mu0}[(mu(z) / mu0(z))^alpha]`, `mu0 = N(0, sigma^2)` and
//! `mu = (1 - q) N(0, sigma^2) + q N(1, sigma^2)` (Mironov, Talwar and Zhang,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019,
//! arXiv:1908.10530, Section 3.3). [`rdp_subsampled_gaussian`] evaluates it
//! the way TensorFlow Privacy's `rdp_accountant._compute_rdp` and Opacus'
//! `accountants/analysis/rdp.py` do: a finite binomial sum for integer orders
//! (here of `A_alpha - 1`, whose terms are all positive, so tiny RDPs keep
//! their relative precision), and the two-sided erfc series in log space for
//! fractional orders (with a numerically stable log-space subtraction, summed
//! until the terms are below `e^-30` absolute, as there, and also below
//! `e^-30` of `A_alpha - 1`, or 1000 terms more). Fractional orders below 1.1 (the
//! smallest default order; callers may pass their own) use a rearrangement of
//! that series that sums `A_alpha - 1` with the factor `alpha - 1` in every
//! term, because `ln(A_alpha)` is divided by `alpha - 1` and the log-space
//! series' absolute errors (rounding near 1e-16, truncation at `e^-30`) would
//! be magnified, by up to `1e12` at `alpha = 1 + 1e-12`. The result is capped
//! at `alpha / (2 sigma^2)`, the RDP without subsampling (a valid bound). RDP
//! composes additively, so `T` steps have RDP `T * rdp(alpha)`. Orders are
//! limited to [`MAX_ORDER`].
//!
//! # Micro-batch clipping
//!
//! With micro-batch clipping the batch is split into `M` micro-batches; each
//! micro-batch mean gradient `g_j` is scaled by `s_j = min(1, C / ||g_j||)` (in
//! each parameter group g by its own bound `C_g`), so `||s_j g_j|| <= S`, where
//! `S = sqrt(sum_g C_g^2)` is the total clip bound (`S = C` without groups). microclip adds noise of standard deviation
//! `multiplier * S` to the **sum** `sum_j s_j g_j` (as TensorFlow Privacy adds
//! `noise_multiplier * l2_norm_clip`) and then divides by `M`.
//!
//! Suppose every example belongs to exactly one micro-batch and adding or
//! removing one example changes only that micro-batch (the other micro-batches
//! keep their members). Then the L2 sensitivity of the sum is
//! * `S` with one example per micro-batch (per-example clipping, `M = N`):
//!   adding or removing the example adds or removes a whole term of norm `<= S`;
//! * `2 S` when a micro-batch can hold more than one example: adding or
//!   removing an example moves its micro-batch's clipped mean from one vector of
//!   norm `<= S` to another, up to `2 S` away. This is why TensorFlow Privacy's
//!   `compute_dp_sgd_privacy_statement(..., used_microbatching=True)` accounts
//!   with half the noise multiplier ("increases sensitivity by a factor of
//!   two"); see also "How to DP-fy ML" (Ponomareva et al. 2023,
//!   arXiv:2303.00654, Sec. 5.6).
//!
//! [`micro_batch_sensitivity`] gives this factor (1 or 2) from the largest
//! number of examples in one micro-batch. The configured multiplier is
//! therefore the Gaussian mechanism with noise multiplier
//! `sigma = multiplier / micro_batch_sensitivity(b)`: pass that `sigma` to
//! [`epsilon`], and configure `multiplier = sigma * micro_batch_sensitivity(b)`
//! for a `sigma` found by [`noise_multiplier_for_epsilon`]. The sampling rate is
//! `q = expected batch size / dataset size` under Poisson sampling.
//!
//! Caveats:
//! * The guarantee needs a *fixed* clip bound; a bound computed from the batch
//!   (such as an adaptive `C_t = scale * min_j ||g_j||`) is itself data
//!   dependent and is not covered.
//! * The assignment of examples to micro-batches must not depend on the
//!   presence of other examples for the sensitivity above to hold. Forming
//!   micro-batches from consecutive rows of a Poisson sample can move many
//!   examples between micro-batches when one example is added.
//! * The outputs are divided by the call's `M`, which under Poisson sampling
//!   depends on the data (the batch size is random). Division by a
//!   data-independent number is post-processing; division by `M` is not. For
//!   the guarantee, rescale the output by `M / M_expected`, i.e. treat the
//!   division as one by the expected number of micro-batches.
//!
//! # From RDP to (epsilon, delta)
//!
//! [`epsilon`] uses the conversion that Opacus' `get_privacy_spent` and
//! Google's `dp_accounting` (`rdp_privacy_accountant.compute_epsilon`) use
//! today (Balle et al. 2020, "Hypothesis testing interpretations and Rényi
//! differential privacy", Theorem 21; Asoodeh et al. 2020):
//!
//! ```text
//! eps(alpha) = rdp(alpha) - (ln(delta) + ln(alpha)) / (alpha - 1) + ln((alpha - 1) / alpha)
//! ```
//!
//! minimised over the orders, clamped at 0, with `dp_accounting`'s two
//! refinements: orders `alpha <= 1.01` are skipped (numerically unstable), and
//! a total KL divergence below `-ln(1 - delta^2)` gives `eps = 0` (the bound
//! `delta <= sqrt(1 - exp(-KL))`). [`rdp_to_epsilon`] tests each given RDP value
//! against that bound as `dp_accounting` does (`delta^2 + expm1(-rdp) > 0`,
//! compared in log space so that it survives `delta^2` underflowing);
//! [`epsilon`] tests the closed-form bound `T ln(1 + q^2 expm1(1 / sigma^2))`
//! on the KL instead, because the computed per-step RDP can be rounded to 0
//! (see [`epsilon_with_orders`]). [`epsilon_classic`] is the older
//! conversion `eps = min_alpha rdp(alpha) - ln(delta) / (alpha - 1)` (Mironov
//! 2017, Proposition 3) that TensorFlow Privacy's tutorials printed; over
//! orders above 1.01 it is never smaller than the improved one. Both give 0
//! for `q = 0` (the RDP is then 0 at every order, and the classic bound's
//! infimum over all orders is 0).
//!
//! # Checked values
//!
//! The unit tests compare against:
//! * TensorFlow Privacy `rdp_accountant_test.py` and `dp_accounting`
//!   `rdp_privacy_accountant_test.py`: `compute_rdp(0.1, 2, 10, 5) = 0.07737`;
//!   `compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100])
//!   = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307]`;
//!   `compute_rdp(1, 10, 1, 20) = 0.1`; the pure-DP conversion value
//!   `1.32783806176` (constant RDP 1.1 at orders 2..=32, delta = 1e-5); and the
//!   Gaussian with `sigma = 4.530877117` being exactly `(1, 1e-6)`-DP.
//! * The TensorFlow Privacy MNIST tutorial (`tutorials/README.md`): with
//!   `q = 256 / 60000`, `sigma = 1.12`, `delta = 1e-5` and the classic
//!   conversion, `eps = 1.00` after 1 epoch, `1.04` after 2, `2.92` after 60;
//!   `sigma = 1.2`, 10 epochs: `1.20`; `sigma = 0.6`, 30 epochs: `9.74` (this
//!   code, like TF Privacy's current code, gives 9.753 for the last one).
//!   The often-quoted `sigma = 1.1` variant of this setting gives 3.008
//!   (classic) and 2.597 (improved); the README's 2.92 is for `sigma = 1.12`.
//! * `ln(A_alpha)` from multi-precision quadrature (mpmath, 60 digits) at the
//!   TF Privacy test points: within `1e-9` relative for integer orders and
//!   `1e-5` for fractional ones.
//! * A review's mpmath grid (twenty-fifth session: q from 1e-10 to 0.999999,
//!   sigma 0.3 to 50, 15 orders from 1.0001 to 200; 1485 points): 31 per-step
//!   RDPs more than 1e-6 below the exact value, all at `q <= 1e-6` (a second
//!   review's grid, to sigma = 100, found some at `q = 1e-5`, sigma = 100) and
//!   fractional orders with RDPs below about 1e-9: at most about 1e-17 per
//!   step in absolute terms, the log-space series' rounding (63 before the
//!   integer sum of `A - 1` and the relative stop; up to 2.4% low at integer
//!   orders then). `epsilon(1e-6, 0.5, 1e9 steps, 1e-5)` is now 2.5e-9
//!   (relative) below the exact 1.940294010 (4.9e-7 before).
//! * Per-step RDP at fractional orders `1 + 1e-12 .. 1.0999` from mpmath
//!   quadrature (60 digits) of `A_alpha - 1`: within `1e-9` relative (`1e-7`
//!   at `q = 1e-6`, where the RDP `~5e-15` is left after cancellation among
//!   terms of size `~1e-9`); TF Privacy's series was off by up to 2.8x there.
//! * Per-step RDP and `(epsilon, order)` from Opacus' `analysis/rdp.py` run in
//!   float64: agreement to `1e-9` relative (`1.1e-8` at one fractional order,
//!   where Opacus stops its series earlier and ours matches mpmath's full sum
//!   to 4e-12), same optimal orders.
//!
//! # Example
//!
//! ```
//! use microclip::accountant;
//!
//! // MNIST, batch 256 of 60000, 60 epochs, noise multiplier 1.12.
//! let q = 256.0 / 60000.0;
//! let steps = 60 * 60000 / 256;
//! let (eps, order) = accountant::epsilon(q, 1.12, steps, 1e-5)?;
//! assert!(eps > 2.4 && eps < 2.6 && order > 1.0);
//! let (classic, _) = accountant::epsilon_classic(q, 1.12, steps, 1e-5)?;
//! assert!((classic - 2.92).abs() < 0.01);
//!
//! // The inverse: the noise multiplier that gives epsilon = 3; it is exactly
//! // representable as f32 (GaussianNoise::multiplier is an f32).
//! let sigma = accountant::noise_multiplier_for_epsilon(q, steps, 1e-5, 3.0)?;
//! assert!(accountant::epsilon(q, sigma, steps, 1e-5)?.0 <= 3.0);
//! assert_eq!(sigma as f32 as f64, sigma);
//!
//! // Micro-batches of up to 8 examples: sensitivity 2 S, so the configured
//! // multiplier is twice the accountant's sigma, and a configured multiplier m
//! // is accounted as m / 2.
//! let multiplier = sigma * accountant::micro_batch_sensitivity(8);
//! assert_eq!(multiplier, 2.0 * sigma);
//! let accounted = multiplier / accountant::micro_batch_sensitivity(8);
//! assert!(accountant::epsilon(q, accounted, steps, 1e-5)?.0 <= 3.0);
//! # Ok::<(), accountant::AccountantError>(())
//! ```

use std::f64::consts::{LN_2, PI};

/// Largest noise multiplier [`noise_multiplier_for_epsilon`] searches (as
/// Opacus' `get_noise_multiplier`).
pub const MAX_NOISE_MULTIPLIER: f64 = 1e6;

/// Relative tolerance of [`noise_multiplier_for_epsilon`] on the noise
/// multiplier: it returns the smallest `f32` that meets the target, which is
/// above the exact threshold by less than one `f32` ulp, i.e. less than `2^-23`
/// (about `1.19e-7`) of the result.
pub const NOISE_MULTIPLIER_RTOL: f64 = f32::EPSILON as f64;

/// Largest finite RDP order accepted (`+inf` is accepted too, and never
/// optimal). The integer-order sum has `order + 1` terms, and every order above
/// `2^53` is an integer, so an unbounded order could run for hours; `1e6` takes
/// well under a second and is far above any useful order (the defaults stop at
/// 63; `dp_accounting`'s at a few hundred). Larger orders are
/// [`AccountantError::InvalidOrder`].
pub const MAX_ORDER: f64 = 1e6;

/// Iteration cap of the fractional-order series; an order that does not
/// converge within it is given the RDP bound `order / (2 sigma^2)` of the
/// Gaussian mechanism without subsampling (conservative; `dp_accounting` gives
/// `+inf` after 1000 terms).
const MAX_FRAC_TERMS: usize = 100_000;

/// Errors of the accountant. The public functions check their inputs and
/// return one of these instead of panicking, except the per-step
/// [`rdp_subsampled_gaussian`], which returns NaN for inputs outside its domain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountantError {
    /// The sampling rate is NaN or outside `[0, 1]`.
    #[error("sampling rate q must be in [0, 1], got {0}")]
    InvalidSamplingRate(f64),
    /// The noise multiplier is NaN, negative or infinite.
    #[error("noise multiplier must be finite and >= 0, got {0}")]
    InvalidNoiseMultiplier(f64),
    /// Delta is NaN or outside the open interval `(0, 1)`.
    #[error("delta must be in (0, 1), got {0}")]
    InvalidDelta(f64),
    /// Zero steps: nothing was released, so there is nothing to account.
    #[error("the number of steps must be >= 1")]
    ZeroSteps,
    /// An RDP order is NaN, not greater than 1, or finite and above
    /// [`MAX_ORDER`].
    #[error("RDP orders must be > 1 and at most {max} (or +inf), got {0}", max = MAX_ORDER)]
    InvalidOrder(f64),
    /// The list of orders is empty.
    #[error("the list of RDP orders is empty")]
    NoOrders,
    /// `orders` and `rdp` have different lengths.
    #[error("{orders} orders given for {rdp} RDP values")]
    LengthMismatch {
        /// Number of orders.
        orders: usize,
        /// Number of RDP values.
        rdp: usize,
    },
    /// An RDP value is NaN or negative.
    #[error("RDP values must be >= 0, got {0}")]
    InvalidRdp(f64),
    /// The target epsilon is NaN, infinite or not positive.
    #[error("target epsilon must be finite and > 0, got {0}")]
    InvalidTargetEpsilon(f64),
    /// No noise multiplier up to [`MAX_NOISE_MULTIPLIER`] reaches the target.
    #[error(
        "target epsilon {target} is unreachable: even noise multiplier {max_sigma} gives \
         epsilon {best} (use a larger delta, fewer steps, a smaller sampling rate or more orders)"
    )]
    UnreachableEpsilon {
        /// The requested epsilon.
        target: f64,
        /// The epsilon at the largest noise multiplier searched.
        best: f64,
        /// The largest noise multiplier searched.
        max_sigma: f64,
    },
}

// ---------------------------------------------------------------------------
// Log-space arithmetic
// ---------------------------------------------------------------------------

/// `ln(exp(x) + exp(y))`.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::INFINITY {
        return f64::INFINITY;
    }
    (a - b).exp().ln_1p() + b
}

/// `ln(exp(x) - exp(y))`, `None` when the difference would be negative.
fn log_sub(x: f64, y: f64) -> Option<f64> {
    if x < y {
        return None;
    }
    if y == f64::NEG_INFINITY {
        return Some(x);
    }
    if x == y {
        return Some(f64::NEG_INFINITY);
    }
    // x + ln(1 - exp(y - x)), as dp_accounting's `_log_sub_sign`. The older
    // form ln(expm1(x - y)) + y cancels: for x ~ 0 and y ~ -45 it is exact only
    // to ulp(45) ~ 7e-15, which rounded tiny ln(A) (and with it the per-step RDP)
    // to 0. ln(1 - e^d) is taken as ln(-expm1(d)) near d = 0 and as
    // ln1p(-exp(d)) below -ln 2, each accurate to a few ulps where it is used.
    let d = y - x;
    let log1mexp = if d > -LN_2 {
        (-d.exp_m1()).ln()
    } else {
        (-d.exp()).ln_1p()
    };
    Some(x + log1mexp)
}

/// `ln(erfc(x))`, accurate also far in the upper tail where `erfc` underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r >= f64::MIN_POSITIVE {
        return r.ln();
    }
    // Subnormal or zero: the Laurent series at infinity (TF Privacy's fallback),
    //   ln erfc(x) ~ -x^2 - ln(x) - ln(pi)/2 - 1/(2x^2) + 5/(8x^4) - 37/(24x^6) + 353/(64x^8),
    // whose next term is below 1e-13 for x > 26.
    let x2 = x * x;
    let inv2 = 1.0 / x2;
    -0.5 * PI.ln() - x.ln() - x2
        + inv2 * (-0.5 + inv2 * (0.625 + inv2 * (-37.0 / 24.0 + inv2 * (353.0 / 64.0))))
}

/// `ln(n choose k)` for integers `0 <= k <= n`.
fn log_binom_int(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    if n <= 1000 {
        // Exact enough and independent of lgamma's cancellation.
        (0..k)
            .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
            .sum()
    } else {
        libm::lgamma(n as f64 + 1.0)
            - libm::lgamma(k as f64 + 1.0)
            - libm::lgamma((n - k) as f64 + 1.0)
    }
}

// ---------------------------------------------------------------------------
// RDP of the sampled Gaussian mechanism
// ---------------------------------------------------------------------------

/// `ln(A_alpha)` for integer `alpha >= 2`, `0 < q < 1`: TF Privacy's
/// `_compute_log_a_int` sum `A = sum_i binom(alpha, i) q^i (1 - q)^(alpha - i)
/// e^((i^2 - i) / (2 sigma^2))`, less the binomial sum of 1 term by term:
/// `A - 1 = sum_{i >= 2} binom(alpha, i) q^i (1 - q)^(alpha - i)
/// expm1((i^2 - i) / (2 sigma^2))` (the terms `i = 0, 1` have exponent 0).
/// Every term is positive, so `A - 1` has full relative precision where it is
/// tiny; summed with the terms of size ~1, as TF Privacy does, `ln A` kept only
/// an absolute `1e-16`, and RDPs below about `1e-14` came out up to tens of
/// percent low (a review's mpmath grid, twenty-fifth session).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_s2 = 2.0 * sigma * sigma;
    let mut log_am1 = f64::NEG_INFINITY;
    for i in 2..=alpha {
        let fi = i as f64;
        let log_coef = log_binom_int(alpha, i) + fi * log_q + (alpha - i) as f64 * log_1mq;
        // ln(expm1(x)), x > 0; x + ln(1 - e^-x) where expm1 would overflow.
        let x = (fi * fi - fi) / two_s2;
        let log_expm1 = if x > 30.0 {
            x + (-(-x).exp()).ln_1p()
        } else {
            x.exp_m1().ln()
        };
        log_am1 = log_add(log_am1, log_coef + log_expm1);
    }
    // ln(1 + (A - 1)).
    log_add(0.0, log_am1)
}

/// Terms [`log_a_frac`] sums past TF Privacy's stop (terms below `e^-30`)
/// while they are not yet below `e^-30` of `A - 1`.
const REL_STOP_EXTRA_TERMS: usize = 1000;

/// `ln(A_alpha)` for fractional `alpha > 1`, `0 < q < 1` (TF Privacy / Opacus
/// `_compute_log_a_frac`). `+inf` when the series does not converge. Orders
/// below [`NEAR_ONE_ORDER`] go to [`log_a_near_one`], and come back here only
/// where that one overflows.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    if alpha < NEAR_ONE_ORDER {
        if let Some(log_a) = log_a_near_one(q, sigma, alpha) {
            return log_a;
        }
    }
    let mut log_a0 = f64::NEG_INFINITY;
    let mut log_a1 = f64::NEG_INFINITY;
    let mut extra_terms = 0;
    let mut settled = None;
    for (positive, log_s0, log_s1) in FracSeries::new(q, sigma, alpha) {
        if positive {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            match (log_sub(log_a0, log_s0), log_sub(log_a1, log_s1)) {
                (Some(a0), Some(a1)) => {
                    log_a0 = a0;
                    log_a1 = a1;
                }
                // A partial sum went negative: rounding has broken the series
                // (past TF Privacy's stop: the last partial sum formed there).
                _ => return settled.unwrap_or(f64::INFINITY),
            }
        }

        if log_s0.is_nan() || log_s1.is_nan() {
            return settled.unwrap_or(f64::INFINITY);
        }
        // Terms below e^-30, and below e^-30 of A - 1 (which the RDP is made
        // of): TF Privacy's absolute stop alone left RDPs near 1e-10 up to
        // 4e-6 low (mpmath, twenty-fifth session).
        // Where the tail decays only polynomially (q near 1/2, large sigma)
        // the second test may take millions of terms: after
        // REL_STOP_EXTRA_TERMS more, the partial sum is taken as it is.
        let top = log_s0.max(log_s1);
        if top < -30.0 {
            let log_a = log_add(log_a0, log_a1);
            let excess = log_a.exp_m1();
            extra_terms += 1;
            if excess <= 0.0 || top < excess.ln() - 30.0 || extra_terms > REL_STOP_EXTRA_TERMS {
                return log_a;
            }
            settled = Some(log_a);
        }
    }
    settled.unwrap_or(f64::INFINITY)
}

/// The terms of the fractional-order erfc series (TF Privacy / Opacus
/// `_compute_log_a_frac`): for `i = 0, 1, ..` up to [`MAX_FRAC_TERMS`], whether
/// `binom(alpha, i)` is positive and the logs of the two halves' `i`-th terms
/// (of sizes `|binom(alpha, i)| q^i (1 - q)^(alpha - i) e^((i^2 - i) / (2
/// sigma^2)) erfc(..) / 2` and the mirror image). [`log_a_frac`] sums all of
/// them in log space, [`log_a_near_one`] those from `i = 2` directly.
struct FracSeries {
    alpha: f64,
    log_q: f64,
    log_1mq: f64,
    two_s2: f64,
    sqrt2_sigma: f64,
    /// `sigma^2 ln(1/q - 1) + 1/2`, written to stay finite for tiny q.
    z0: f64,
    i: usize,
    /// `ln |binom(alpha, i)|`, by `binom(a, i+1) = binom(a, i) (a - i) / (i + 1)`.
    log_coef: f64,
    positive: bool,
}

impl FracSeries {
    fn new(q: f64, sigma: f64, alpha: f64) -> Self {
        let log_q = q.ln();
        let log_1mq = (-q).ln_1p();
        Self {
            alpha,
            log_q,
            log_1mq,
            two_s2: 2.0 * sigma * sigma,
            sqrt2_sigma: std::f64::consts::SQRT_2 * sigma,
            z0: sigma * sigma * (log_1mq - log_q) + 0.5,
            i: 0,
            log_coef: 0.0,
            positive: true,
        }
    }
}

impl Iterator for FracSeries {
    /// `(binom(alpha, i) > 0, log_s0, log_s1)`.
    type Item = (bool, f64, f64);

    fn next(&mut self) -> Option<Self::Item> {
        if self.i >= MAX_FRAC_TERMS {
            return None;
        }
        let fi = self.i as f64;
        if self.i > 0 {
            let factor = self.alpha - (fi - 1.0);
            self.log_coef += factor.abs().ln() - fi.ln();
            if factor < 0.0 {
                self.positive = !self.positive;
            }
        }
        self.i += 1;
        let j = self.alpha - fi;

        let log_t0 = self.log_coef + fi * self.log_q + j * self.log_1mq;
        let log_t1 = self.log_coef + j * self.log_q + fi * self.log_1mq;

        let log_e0 = -LN_2 + log_erfc((fi - self.z0) / self.sqrt2_sigma);
        let log_e1 = -LN_2 + log_erfc((self.z0 - j) / self.sqrt2_sigma);

        let log_s0 = log_t0 + (fi * fi - fi) / self.two_s2 + log_e0;
        let log_s1 = log_t1 + (j * j - j) / self.two_s2 + log_e1;
        Some((self.positive, log_s0, log_s1))
    }
}

/// Fractional orders below this (the smallest default order) are evaluated by
/// [`log_a_near_one`]; the default orders keep TF Privacy's series unchanged.
const NEAR_ONE_ORDER: f64 = 1.1;

/// Relative tolerance at which [`log_a_near_one`] stops its series.
const NEAR_ONE_RTOL: f64 = 1e-13;

/// Nodes (the non-negative half) and weights of 8-point Gauss-Legendre
/// quadrature on `[-1, 1]` (mpmath, 40 digits, rounded to f64).
const GAUSS_LEGENDRE_8: [(f64, f64); 4] = [
    (0.183_434_642_495_649_8, 0.362_683_783_378_362),
    (0.525_532_409_916_329, 0.313_706_645_877_887_27),
    (0.796_666_477_413_626_7, 0.222_381_034_453_374_48),
    (0.960_289_856_497_536_3, 0.101_228_536_290_376_26),
];

/// `P(N(0, 1) <= x)`, with full relative precision in the lower tail.
fn norm_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// `P(N(0, 1) > x)`, with full relative precision in the upper tail.
fn norm_sf(x: f64) -> f64 {
    0.5 * libm::erfc(x / std::f64::consts::SQRT_2)
}

/// `P(x - h < N(0, 1) <= x)` for `h > 0`, with full relative precision also for
/// tiny `h`, where `norm_cdf(x) - norm_cdf(x - h)` would cancel (and `x - h`
/// itself would lose `h` to rounding): there the density is integrated by
/// Gauss-Legendre quadrature on an interval over which its exponent changes by
/// at most about 1.5, which 8 points integrate to rounding.
fn norm_mass_below(x: f64, h: f64) -> f64 {
    let lo = x - h;
    if h <= 1.0 && h * x.abs().max(lo.abs()) <= 1.0 {
        let (mid, half) = (x - 0.5 * h, 0.5 * h);
        let density = |t: f64| (-0.5 * t * t).exp();
        let sum: f64 = GAUSS_LEGENDRE_8
            .iter()
            .map(|&(node, weight)| {
                weight * (density(mid - half * node) + density(mid + half * node))
            })
            .sum();
        half * sum / (2.0 * PI).sqrt()
    } else if lo >= 0.0 {
        // Both in the upper tail; norm_sf(x) <= e^(-1/2) norm_sf(lo) or so here.
        norm_sf(lo) - norm_sf(x)
    } else if x <= 0.0 {
        norm_cdf(x) - norm_cdf(lo)
    } else {
        // Straddles 0 with h > 1: at least about 0.34 of mass, no cancellation.
        1.0 - norm_cdf(lo) - norm_sf(x)
    }
}

/// `ln(A_alpha)` for `1 < alpha < 2` (used below [`NEAR_ONE_ORDER`]),
/// `0 < q < 1`, however close `alpha` is to 1 accurate to about `1e-9`
/// relative, or `4e-16 / (q (e^(1/sigma^2) - 1))` where that is larger (the
/// cancellation described below; `3e-8` at `q = 1e-6`, `sigma = 10`). `None`
/// where a term overflows (then `ln A_alpha` is large and the log-space series
/// of [`log_a_frac`] is accurate); `Some(+inf)` when the series does not
/// converge within [`MAX_FRAC_TERMS`]: with `q` at 1/2 its terms decay only
/// as `1 / i^2` up to `i ~ sigma`, so from `sigma` of about 300 (probed
/// against mpmath: `q` from 0.4999999 to 0.5; 0.499 converged) the caller
/// gets the bound `order / (2 sigma^2)` instead, about 4x the true RDP there
/// (conservative).
///
/// The erfc series of [`log_a_frac`] computes `ln A` from terms of size up to
/// ~1 (and ~q) whose sum is `1 + O((alpha - 1) q^2)`, to an absolute precision
/// of about `1e-16` plus its truncation at terms below `e^-30`; dividing by
/// `alpha - 1` magnifies both, so near 1 its RDP could be off by orders of
/// magnitude. Here, with `d = alpha - 1`, `A - 1` is summed directly. Of the
/// series' terms, only the first two of each half survive at `alpha = 1`,
/// and they pair up to exactly `1 - q` and `q` there: with
/// `z0 = sigma^2 ln(1/q - 1) + 1/2`, `a = z0 / sigma`, `b = a - 1 / sigma`,
/// `h = d / sigma` and `Phi` the standard normal CDF,
///
/// ```text
/// (1 - q)^alpha Phi(a) + alpha q^d (1 - q) e^(d (d - 1) / (2 sigma^2)) (1 - Phi(a - h)) - (1 - q)
///   = (1 - q) [expm1(d ln(1 - q)) Phi(a) + expm1(d (ln q + (d - 1) / (2 sigma^2)) + ln1p(d)) (1 - Phi(a - h))
///              + P(a - h < N < a)],
/// alpha q (1 - q)^d Phi(b) + q^alpha e^(alpha d / (2 sigma^2)) (1 - Phi(b - h)) - q
///   = q [expm1(ln1p(d) + d ln(1 - q)) Phi(b) + expm1(d (ln q + alpha / (2 sigma^2))) (1 - Phi(b - h))
///        + P(b - h < N < b)],
/// ```
///
/// every piece of which carries the factor `d` and is computed to full
/// relative precision; the other terms (`i >= 2`) carry `binom(alpha, i)`,
/// hence `d`, and alternate in sign. They are summed until a term is below
/// [`NEAR_ONE_RTOL`] of the sum or, in the slowly (polynomially) decaying tail
/// that large `sigma` and `q` near 1/2 give, until the mean of the last two
/// partial sums is that close (for an alternating series with decreasing,
/// convex terms, its error is below half the difference of the last two
/// terms). What remains is the cancellation among terms of size `~d q` in a
/// sum of size `~d q^2 (e^(1/sigma^2) - 1)`, as at integer orders.
fn log_a_near_one(q: f64, sigma: f64, alpha: f64) -> Option<f64> {
    // Exact (Sterbenz) for alpha in [1, 2].
    let d = alpha - 1.0;
    let series = FracSeries::new(q, sigma, alpha);
    let (log_q, log_1mq, two_s2, z0) = (series.log_q, series.log_1mq, series.two_s2, series.z0);
    let (a, b, h) = (z0 / sigma, (z0 - 1.0) / sigma, d / sigma);
    let ln1p_d = d.ln_1p();

    let pair_1mq = (1.0 - q)
        * ((d * log_1mq).exp_m1() * norm_cdf(a)
            + (d * (log_q + (d - 1.0) / two_s2) + ln1p_d).exp_m1() * norm_sf(a - h)
            + norm_mass_below(a, h));
    let pair_q = q
        * ((ln1p_d + d * log_1mq).exp_m1() * norm_cdf(b)
            + (d * (log_q + alpha / two_s2)).exp_m1() * norm_sf(b - h)
            + norm_mass_below(b, h));
    let mut sum = pair_1mq + pair_q;
    if !sum.is_finite() {
        return None;
    }

    let (mut prev, mut prev2) = (f64::INFINITY, f64::INFINITY);
    // The i-th terms of log_a_frac's two halves, from i = 2.
    for (positive, log_s0, log_s1) in series.skip(2) {
        let t = log_s0.exp() + log_s1.exp();
        if !t.is_finite() {
            return if t.is_nan() {
                Some(f64::INFINITY)
            } else {
                None
            };
        }
        sum += if positive { t } else { -t };
        if t <= NEAR_ONE_RTOL * sum.abs() {
            return Some(sum.ln_1p());
        }
        let mean = if positive {
            sum - 0.5 * t
        } else {
            sum + 0.5 * t
        };
        if t <= 1e-6 * sum.abs()
            && t <= prev
            && prev <= prev2
            && prev - t <= NEAR_ONE_RTOL * mean.abs()
        {
            return Some(mean.ln_1p());
        }
        prev2 = prev;
        prev = t;
    }
    Some(f64::INFINITY)
}

/// RDP at order `order` of ONE step of the Poisson-subsampled Gaussian
/// mechanism with sampling rate `q` and noise multiplier `sigma`.
///
/// Follows TF Privacy's `_compute_rdp` / Opacus' `_compute_rdp`: `0` when
/// `q = 0`; `+inf` when `sigma = 0` or `order = +inf`; `order / (2 sigma^2)`
/// when `q = 1`; otherwise `ln(A_order) / (order - 1)` with the integer-order
/// binomial sum or the fractional-order erfc series, both in log space (below
/// order 1.1, the smallest default order, a form of the series that sums
/// `A_order - 1` directly, so that dividing by `order - 1` does not magnify
/// its error: accurate to about `1e-9` relative however close the order is to
/// 1, less for tiny `q / sigma^2`, as at integer orders; for `q` very close to
/// 1/2 (0.4999999 to 0.5 in a probe against mpmath; 0.499 and 0.501
/// converged) and `sigma` from about 300 that series does not converge and
/// such an order gets the bound below, about 4x the true RDP and more than the
/// RDP at order 1.1). The result never exceeds `order / (2 sigma^2)`, the RDP without
/// subsampling, which is a valid bound (the Rényi divergence is jointly
/// quasi-convex): an order whose series fails to converge, or over- or
/// underflows, gets that bound, which is conservative (`+inf` when `sigma^2`
/// underflows).
///
/// Returns NaN for invalid arguments: `q` NaN or outside `[0, 1]`, `sigma`
/// NaN, negative or infinite, `order` NaN, `<= 1` or finite and above
/// [`MAX_ORDER`].
pub fn rdp_subsampled_gaussian(q: f64, sigma: f64, order: f64) -> f64 {
    if check_q(q).is_err() || check_sigma(sigma).is_err() || check_order(order).is_err() {
        return f64::NAN;
    }
    rdp_unchecked(q, sigma, order)
}

fn rdp_unchecked(q: f64, sigma: f64, order: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || order == f64::INFINITY {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    let log_a = if order.fract() == 0.0 && order <= u64::MAX as f64 {
        log_a_int(q, sigma, order as u64)
    } else {
        log_a_frac(q, sigma, order)
    };
    let rdp = log_a / (order - 1.0);
    // Subsampling never hurts: the Rényi divergence is jointly quasi-convex
    // (van Erven and Harremoës 2014, Theorem 13), so D_alpha((1 - q) mu0 + q mu1
    // || mu0) <= D_alpha(mu1 || mu0) = order / (2 sigma^2), the RDP at q = 1
    // (divided in two steps so that it does not overflow for huge sigma). A
    // series that does not converge (+inf), a NaN from over/underflow (e.g.
    // sigma^2 underflowing to 0, where the bound is +inf too, or overflowing)
    // and a truncation error above the bound all give the bound instead.
    let gaussian = order / 2.0 / sigma / sigma;
    if rdp.is_nan() {
        gaussian
    } else {
        // A_alpha >= 1 mathematically; clamp rounding below zero.
        rdp.max(0.0).min(gaussian)
    }
}

/// RDP of `steps` steps at each of `orders`: `steps * rdp_subsampled_gaussian(q, sigma, order)`.
pub fn compute_rdp(
    q: f64,
    sigma: f64,
    steps: u64,
    orders: &[f64],
) -> Result<Vec<f64>, AccountantError> {
    check_q(q)?;
    check_sigma(sigma)?;
    check_steps(steps)?;
    check_orders(orders)?;
    Ok(orders
        .iter()
        .map(|&a| rdp_unchecked(q, sigma, a) * steps as f64)
        .collect())
}

/// The default RDP orders, as in Opacus' `RDPAccountant.DEFAULT_ALPHAS` and the
/// TF Privacy tutorials: `1.1, 1.2, ..., 10.9` followed by `12, 13, ..., 63`
/// (151 orders).
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

// ---------------------------------------------------------------------------
// RDP -> (epsilon, delta)
// ---------------------------------------------------------------------------

/// Converts RDP values to `(epsilon, best_order)` at `delta` with the improved
/// conversion of Balle et al. 2020 (as Opacus and `dp_accounting`; see the
/// module documentation). Returns `(+inf, NaN)` when every order gives an
/// infinite epsilon.
pub fn rdp_to_epsilon(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
) -> Result<(f64, f64), AccountantError> {
    check_conversion_inputs(orders, rdp, delta)?;
    Ok(improved_conversion(orders, rdp, delta, true))
}

/// The improved conversion; with `per_order_kl_shortcut`, `dp_accounting`'s
/// test of each order's RDP against the KL bound (eps = 0 when
/// `rdp < -ln(1 - delta^2)`, compared in log space so that it still works when
/// `delta^2` underflows).
fn improved_conversion(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
    per_order_kl_shortcut: bool,
) -> (f64, f64) {
    let log_delta = delta.ln();
    let log_kl_max = log_kl_threshold(delta);
    let per_order = orders.iter().zip(rdp).map(|(&a, &r)| {
        if per_order_kl_shortcut && r.ln() < log_kl_max {
            // delta <= sqrt(1 - exp(-KL)) <= sqrt(1 - exp(-rdp)).
            0.0
        } else if a > 1.01 && a.is_finite() {
            r + (-1.0 / a).ln_1p() - (log_delta + a.ln()) / (a - 1.0)
        } else {
            f64::INFINITY
        }
    });
    argmin(orders, per_order)
}

/// `ln(-ln(1 - delta^2))`: the log of the largest total KL divergence for which
/// the mechanism is `(0, delta)`-DP. `delta^2` underflows below `delta ~ 1.5e-162`;
/// there `-ln(1 - delta^2) = delta^2 (1 + delta^2 / 2 + ...)` has log `2 ln(delta)`.
fn log_kl_threshold(delta: f64) -> f64 {
    let d2 = delta * delta;
    if d2 >= f64::MIN_POSITIVE {
        (-(-d2).ln_1p()).ln()
    } else {
        2.0 * delta.ln()
    }
}

/// Log of an upper bound on the total KL divergence of `steps` steps of the
/// sampled Gaussian mechanism: `T * D_2` with the closed form
/// `D_2 = ln(A_2) = ln(1 + q^2 expm1(1 / sigma^2))` (KL = `D_1 <= D_2`, since
/// the Rényi divergence is non-decreasing in its order). Evaluated in log space
/// with `ln1p`/`expm1`, so it has full relative precision however small it is,
/// and is `-inf` only for `q = 0`.
fn log_kl_upper_bound(q: f64, sigma: f64, steps: u64) -> f64 {
    if q == 0.0 {
        return f64::NEG_INFINITY;
    }
    if sigma == 0.0 {
        return f64::INFINITY;
    }
    // ln(expm1(1 / sigma^2)); for huge sigma, expm1(x) = x to full precision.
    let x = 1.0 / (sigma * sigma);
    let log_c = if x > 700.0 {
        // expm1(x) overflows from about 709.8 (sigma < 0.0375): ln(e^x - 1) =
        // x + ln(1 - e^-x), +inf only when x itself is.
        x + (-(-x).exp()).ln_1p()
    } else if sigma < 1e100 {
        (1.0 / (sigma * sigma)).exp_m1().ln()
    } else {
        -2.0 * sigma.ln()
    };
    // ln(x), x = q^2 expm1(1 / sigma^2), then ln(ln1p(x)).
    let log_x = 2.0 * q.ln() + log_c;
    let log_d2 = if log_x < -700.0 {
        log_x
    } else if log_x < 700.0 {
        log_x.exp().ln_1p().ln()
    } else {
        log_x.ln()
    };
    (steps as f64).ln() + log_d2
}

/// Converts RDP values to `(epsilon, best_order)` at `delta` with the classic
/// conversion `eps = min_alpha rdp(alpha) - ln(delta) / (alpha - 1)` (Mironov
/// 2017, Proposition 3; TF Privacy before 2020). Over orders above 1.01 never
/// smaller than [`rdp_to_epsilon`]. Returns `(+inf, NaN)` when every order gives an infinite
/// epsilon.
pub fn rdp_to_epsilon_classic(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
) -> Result<(f64, f64), AccountantError> {
    check_conversion_inputs(orders, rdp, delta)?;
    let log_delta = delta.ln();
    let per_order = orders.iter().zip(rdp).map(|(&a, &r)| {
        if a.is_finite() {
            r - log_delta / (a - 1.0)
        } else {
            f64::INFINITY
        }
    });
    Ok(argmin(orders, per_order))
}

/// The smallest value (first on ties) with its order, clamped at 0.
fn argmin(orders: &[f64], eps: impl Iterator<Item = f64>) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, e) in orders.iter().zip(eps) {
        if e < best.0 {
            best = (e, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// `(epsilon, best_order)` after `steps` steps of the Poisson-subsampled
/// Gaussian mechanism (sampling rate `q`, noise multiplier `sigma`) at `delta`,
/// over [`default_orders`], with the improved conversion of Balle et al. 2020
/// (the one Opacus and `dp_accounting` use). `(+inf, NaN)` when `sigma = 0` and
/// `q > 0`. Epsilon is 0, with the first order, when the total KL divergence is
/// provably below `-ln(1 - delta^2)` (always for `q = 0`, at any `delta`); this
/// test uses a closed-form bound on the KL rather than the RDP computed at each
/// order, see [`epsilon_with_orders`].
pub fn epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> Result<(f64, f64), AccountantError> {
    epsilon_with_orders(q, sigma, steps, delta, &default_orders())
}

/// [`epsilon`] over the given RDP orders (each `> 1` and at most
/// [`MAX_ORDER`]; `+inf` is accepted and never optimal).
///
/// Unlike [`rdp_to_epsilon`], the `eps = 0` shortcut is decided on the
/// closed-form bound `T ln(1 + q^2 expm1(1 / sigma^2)) >= T * KL`, because a tiny
/// per-step RDP can be rounded to 0 by the series and would then pass the test
/// for any number of steps.
pub fn epsilon_with_orders(
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
    orders: &[f64],
) -> Result<(f64, f64), AccountantError> {
    check_delta(delta)?;
    check_q(q)?;
    check_sigma(sigma)?;
    check_steps(steps)?;
    check_orders(orders)?;
    // The KL shortcut (eps = 0 when the total KL is below -ln(1 - delta^2)) is
    // decided here on the closed-form bound T * D_2 >= T * KL, not on the RDP
    // computed at each order as `dp_accounting` (and `rdp_to_epsilon`) do. For
    // small q, ln(A) ~ alpha (alpha - 1) / 2 q^2 expm1(1 / sigma^2) is what is
    // left of terms of size ~q after cancellation, so its absolute rounding error
    // is ~1e-16 q |ln q| (plus the fractional series' tail below e^-30): a tiny
    // per-step RDP can come out as 0 (at order 1.1 for q = 1e-14, sigma = 1),
    // and T * 0 passes the test for any number of steps and any delta. Where the
    // shortcut can fire (tiny divergences) D_2 is about twice the KL and 1.8
    // times the RDP at order 1.1, so it fires for somewhat more noise than in
    // dp_accounting, and never on a rounded-down value. The per-order rounding
    // does not matter in the formula below: it moves T * rdp by ~1e-16 T q |ln q|,
    // negligible for any realistic number of epochs T q.
    if log_kl_upper_bound(q, sigma, steps) < log_kl_threshold(delta) {
        return Ok((0.0, orders[0]));
    }
    let rdp = compute_rdp(q, sigma, steps, orders)?;
    Ok(improved_conversion(orders, &rdp, delta, false))
}

/// `(epsilon, best_order)` like [`epsilon`] but with the classic conversion
/// `eps = min_alpha rdp(alpha) - ln(delta) / (alpha - 1)`, the one behind the
/// numbers printed by TF Privacy's tutorials and `compute_dp_sgd_privacy`
/// before 2020. Always `>=` [`epsilon`] (same orders, all above 1.01).
///
/// With `q = 0` (no example is ever used) it is `(0, first order)`, as
/// [`epsilon`]: the RDP is then 0 at *every* order, so the classic bound
/// `-ln(delta) / (alpha - 1)` goes to 0 as `alpha -> inf`; the minimum over a
/// finite list of orders (`ln(1 / delta) / 62`, 0.186 at `delta = 1e-5`, with
/// the defaults) is an artefact of the list. For `q > 0` it is the minimum
/// over the given orders, without [`epsilon`]'s KL-divergence shortcut, so it
/// stays at that floor or above even where [`epsilon`] is 0 (e.g. for huge
/// `sigma`).
pub fn epsilon_classic(
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
) -> Result<(f64, f64), AccountantError> {
    epsilon_classic_with_orders(q, sigma, steps, delta, &default_orders())
}

/// [`epsilon_classic`] over the given RDP orders (`(0, orders[0])` for `q = 0`).
pub fn epsilon_classic_with_orders(
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
    orders: &[f64],
) -> Result<(f64, f64), AccountantError> {
    check_delta(delta)?;
    let rdp = compute_rdp(q, sigma, steps, orders)?;
    if q == 0.0 {
        // RDP 0 at every order, not only the listed ones: the infimum of the
        // classic bound over all orders (alpha -> inf) is 0.
        return Ok((0.0, orders[0]));
    }
    rdp_to_epsilon_classic(orders, &rdp, delta)
}

// ---------------------------------------------------------------------------
// Inverse: noise multiplier for a target epsilon
// ---------------------------------------------------------------------------

/// The smallest noise multiplier `sigma` (to a relative tolerance of
/// [`NOISE_MULTIPLIER_RTOL`]) whose [`epsilon`] after `steps` steps at `delta`
/// is at most `target_epsilon`. The returned value always satisfies the
/// target (it is the upper end of the final bisection bracket).
///
/// The result is **exactly representable as `f32`**: it is the smallest `f32`
/// whose epsilon meets the target, returned as `f64`. So
/// `GaussianNoise { multiplier: sigma as f32, .. }` configures exactly the
/// accounted value; rounding an arbitrary `f64` to the nearest `f32` could
/// instead round it down and miss the target. (When configuring micro-batches
/// of more than one example, multiply by [`micro_batch_sensitivity`] first;
/// doubling keeps the value exact.)
///
/// Epsilon is non-increasing in `sigma`, so this brackets the answer by
/// doubling and then bisects over the `f32` values (whose bit patterns are
/// ordered like the values). Returns `0` when `q = 0` (no example is ever
/// used). Fails with [`AccountantError::UnreachableEpsilon`] when even
/// [`MAX_NOISE_MULTIPLIER`] does not reach the target (with the default orders
/// and the improved conversion, epsilon cannot drop below roughly
/// `-(ln(delta) + ln 63) / 62 + ln(62 / 63)`, about 0.10 at `delta = 1e-5`,
/// until the bound `T ln(1 + q^2 expm1(1 / sigma^2))` on the total KL divergence
/// falls below about `delta^2`, where the KL-divergence shortcut of
/// [`epsilon`] gives epsilon 0; a target below that floor is therefore met only
/// by a very large `sigma`, or not at all).
pub fn noise_multiplier_for_epsilon(
    q: f64,
    steps: u64,
    delta: f64,
    target_epsilon: f64,
) -> Result<f64, AccountantError> {
    noise_multiplier_for_epsilon_with_orders(q, steps, delta, target_epsilon, &default_orders())
}

/// [`noise_multiplier_for_epsilon`] over the given RDP orders.
pub fn noise_multiplier_for_epsilon_with_orders(
    q: f64,
    steps: u64,
    delta: f64,
    target_epsilon: f64,
    orders: &[f64],
) -> Result<f64, AccountantError> {
    check_q(q)?;
    check_steps(steps)?;
    check_delta(delta)?;
    check_orders(orders)?;
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(AccountantError::InvalidTargetEpsilon(target_epsilon));
    }
    if q == 0.0 {
        return Ok(0.0);
    }
    let eps_at =
        |sigma: f32| epsilon_with_orders(q, f64::from(sigma), steps, delta, orders).map(|e| e.0);
    // MAX_NOISE_MULTIPLIER (1e6) and the powers of two below are exact in f32.
    let max_sigma = MAX_NOISE_MULTIPLIER as f32;

    // Bracket: eps(lo) > target >= eps(hi). eps(0) = +inf for q > 0.
    let mut lo = 0.0_f32;
    let mut hi = 1.0_f32;
    loop {
        let e = eps_at(hi)?;
        if e <= target_epsilon {
            break;
        }
        lo = hi;
        if hi >= max_sigma {
            return Err(AccountantError::UnreachableEpsilon {
                target: target_epsilon,
                best: e,
                max_sigma: MAX_NOISE_MULTIPLIER,
            });
        }
        hi = (hi * 2.0).min(max_sigma);
    }
    // Halve towards small sigma first so that the bisection starts from a
    // bracket within a factor 2 (keeps the relative tolerance meaningful).
    if lo == 0.0 {
        let mut cand = hi / 2.0;
        while cand > 1e-6 && eps_at(cand)? <= target_epsilon {
            hi = cand;
            cand /= 2.0;
        }
        // Stopped by a cand that misses the target (a bracket), or by the floor
        // (untested: bisect from 0 instead, whose epsilon is +inf for q > 0).
        lo = if cand > 1e-6 { cand } else { 0.0 };
    }
    // Bisect over the f32 values between lo and hi: non-negative f32 bit
    // patterns are ordered like the values, so this ends with hi the smallest
    // f32 meeting the target (for a monotone epsilon), in at most 23 steps from
    // a bracket within a factor 2.
    let (mut lo_bits, mut hi_bits) = (lo.to_bits(), hi.to_bits());
    while hi_bits - lo_bits > 1 {
        let mid_bits = lo_bits + (hi_bits - lo_bits) / 2;
        if eps_at(f32::from_bits(mid_bits))? <= target_epsilon {
            hi_bits = mid_bits;
        } else {
            lo_bits = mid_bits;
        }
    }
    Ok(f64::from(f32::from_bits(hi_bits)))
}

/// The L2 sensitivity of the sum of clipped micro-batch means, in units of the
/// total clip bound S, when a micro-batch can hold at most
/// `max_micro_batch_examples` examples: 1 for per-example clipping (adding or
/// removing an example adds or removes a whole term of norm <= S), 2 beyond (it
/// moves its micro-batch's clipped mean from one vector of norm <= S to another;
/// TensorFlow Privacy's `used_microbatching`). Account with
/// `multiplier / micro_batch_sensitivity(b)`; configure
/// `multiplier = sigma * micro_batch_sensitivity(b)` for the sigma the
/// accountant found.
///
/// `b` counts **examples**, over every step and every neighbouring dataset: the
/// most a micro-batch can hold, not the rows a call sees. Micro-batches that
/// mostly hold one example still need 2 when adding an example can make one
/// hold two; rows that are already micro-batch means (as
/// the `burn` feature's pushed gradients, clipped with `Uniform(1)`) count their
/// examples, not 1. `0` is treated like `1`.
pub fn micro_batch_sensitivity(max_micro_batch_examples: usize) -> f64 {
    if max_micro_batch_examples <= 1 {
        1.0
    } else {
        2.0
    }
}

// ---------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------

fn check_q(q: f64) -> Result<(), AccountantError> {
    if (0.0..=1.0).contains(&q) {
        Ok(())
    } else {
        Err(AccountantError::InvalidSamplingRate(q))
    }
}

fn check_sigma(sigma: f64) -> Result<(), AccountantError> {
    if sigma.is_finite() && sigma >= 0.0 {
        Ok(())
    } else {
        Err(AccountantError::InvalidNoiseMultiplier(sigma))
    }
}

fn check_delta(delta: f64) -> Result<(), AccountantError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(AccountantError::InvalidDelta(delta))
    }
}

fn check_steps(steps: u64) -> Result<(), AccountantError> {
    if steps == 0 {
        Err(AccountantError::ZeroSteps)
    } else {
        Ok(())
    }
}

fn check_order(order: f64) -> Result<(), AccountantError> {
    if order > 1.0 && (order <= MAX_ORDER || order == f64::INFINITY) {
        Ok(())
    } else {
        Err(AccountantError::InvalidOrder(order))
    }
}

fn check_orders(orders: &[f64]) -> Result<(), AccountantError> {
    if orders.is_empty() {
        return Err(AccountantError::NoOrders);
    }
    orders.iter().try_for_each(|&a| check_order(a))
}

fn check_conversion_inputs(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(), AccountantError> {
    check_delta(delta)?;
    check_orders(orders)?;
    if orders.len() != rdp.len() {
        return Err(AccountantError::LengthMismatch {
            orders: orders.len(),
            rdp: rdp.len(),
        });
    }
    match rdp.iter().find(|r| r.is_nan() || **r < 0.0) {
        Some(&r) => Err(AccountantError::InvalidRdp(r)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
