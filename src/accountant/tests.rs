use super::*;

fn assert_rel(actual: f64, expected: f64, rtol: f64, what: &str) {
    let err = (actual - expected).abs() / expected.abs().max(f64::MIN_POSITIVE);
    assert!(
        err <= rtol,
        "{what}: got {actual:e}, expected {expected:e} (relative error {err:e} > {rtol:e})"
    );
}

fn assert_abs(actual: f64, expected: f64, atol: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= atol,
        "{what}: got {actual}, expected {expected} (tolerance {atol})"
    );
}

const MNIST_Q: f64 = 256.0 / 60000.0;

/// Steps as TF Privacy's `mnist_dpsgd_tutorial.py` counts them:
/// `epochs * 60000 // 256`.
fn mnist_steps(epochs: u64) -> u64 {
    epochs * 60000 / 256
}

// ----- helpers -------------------------------------------------------

#[test]
fn log_erfc_matches_mpmath() {
    // ln(erfc(x)) computed with mpmath at 40 digits.
    let table = [
        (-5.0, 0.693_147_180_559_176_6),
        (-1.0, 0.611_232_317_678_070_5),
        (0.0, 0.0),
        (0.5, -0.735_011_129_837_084_4),
        (1.0, -1.849_605_509_933_248_2),
        (2.0, -5.364_941_264_616_638),
        (5.0, -27.200_889_545_537_434),
        (10.0, -102.879_889_024_844_89),
        (20.0, -403.569_343_334_104_23),
        (26.0, -679.831_199_763_194_3),
        (26.5, -706.100_220_410_148),
        (27.0, -732.868_886_507_897_4),
        (27.5, -760.137_211_015_348_2),
        (30.0, -903.974_117_110_643_9),
        (50.0, -2_504.484_587_848_451_4),
        (100.0, -10_005.177_585_122_664),
        (1000.0, -1_000_007.480_120_721_9),
    ];
    for (x, expected) in table {
        let got = log_erfc(x);
        if expected == 0.0 {
            assert_eq!(got, 0.0);
        } else {
            assert_rel(got, expected, 1e-14, &format!("log_erfc({x})"));
        }
    }
}

#[test]
fn log_add_and_sub() {
    let (a, b) = (3.0_f64.ln(), 5.0_f64.ln());
    assert_rel(log_add(a, b), 8.0_f64.ln(), 1e-15, "ln(3+5)");
    assert_rel(log_sub(b, a).unwrap(), 2.0_f64.ln(), 1e-15, "ln(5-3)");
    assert_eq!(log_add(f64::NEG_INFINITY, a), a);
    assert_eq!(log_add(a, f64::NEG_INFINITY), a);
    assert_eq!(log_sub(a, f64::NEG_INFINITY), Some(a));
    assert_eq!(log_sub(a, a), Some(f64::NEG_INFINITY));
    assert_eq!(log_sub(a, b), None);
    assert_eq!(log_add(1000.0, -1000.0), 1000.0);
    assert_eq!(log_sub(1000.0, -1000.0), Some(1000.0));
    assert_eq!(log_add(f64::INFINITY, 1.0), f64::INFINITY);
}

#[test]
fn log_binom_int_is_exact_enough() {
    assert_eq!(log_binom_int(10, 0), 0.0);
    assert_rel(log_binom_int(10, 3), 120.0_f64.ln(), 1e-14, "C(10,3)");
    assert_rel(
        log_binom_int(63, 31),
        916_312_070_471_295_267.0_f64.ln(),
        1e-14,
        "C(63,31)",
    );
    // lgamma branch: C(2000, 1) = 2000.
    assert_rel(log_binom_int(2000, 1), 2000.0_f64.ln(), 1e-12, "C(2000,1)");
}

#[test]
fn default_orders_as_opacus() {
    let o = default_orders();
    assert_eq!(o.len(), 99 + 52);
    assert_eq!(o[0], 1.1);
    assert_eq!(o[98], 10.9);
    assert_eq!(o[99], 12.0);
    assert_eq!(*o.last().unwrap(), 63.0);
    assert!(o.windows(2).all(|w| w[0] < w[1]));
}

// ----- RDP of the sampled Gaussian: published values -------------------

#[test]
fn tf_privacy_compute_rdp_scalar() {
    // TF Privacy rdp_accountant_test.py, test_compute_rdp_scalar:
    // compute_rdp(0.1, 2, 10, 5) ~= 0.07737 (5 places).
    let r = compute_rdp(0.1, 2.0, 10, &[5.0]).unwrap()[0];
    assert_abs(r, 0.07737, 5e-6, "compute_rdp(0.1, 2, 10, 5)");
}

#[test]
fn tf_privacy_compute_rdp_sequence() {
    // TF Privacy rdp_accountant_test.py, test_compute_rdp_sequence (delta=1e-5):
    // compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100, inf])
    //   = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307, inf].
    let orders = [1.5, 2.5, 5.0, 50.0, 100.0, f64::INFINITY];
    let r = compute_rdp(0.01, 2.5, 50, &orders).unwrap();
    let tf = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307];
    for (k, &e) in tf.iter().enumerate() {
        assert_abs(r[k], e, 1e-5, &format!("order {}", orders[k]));
    }
    assert_eq!(r[5], f64::INFINITY);
    // dp_accounting rdp_privacy_accountant_test.py,
    // test_compute_rdp_poisson_sampled_gaussian (rtol 1e-4).
    let dpa = [6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e+02];
    for (k, &e) in dpa.iter().enumerate() {
        assert_rel(r[k], e, 1e-4, &format!("order {}", orders[k]));
    }
}

#[test]
fn tf_privacy_special_cases() {
    // test_compute_rdp_no_data: q = 0 -> 0.
    assert_eq!(compute_rdp(0.0, 10.0, 1, &[20.0]).unwrap(), vec![0.0]);
    // test_compute_rdp_no_sampling: q = 1 -> alpha / (2 sigma^2) = 0.1.
    assert_eq!(compute_rdp(1.0, 10.0, 1, &[20.0]).unwrap(), vec![0.1]);
    // sigma = 0 -> no privacy (unless q = 0).
    assert_eq!(rdp_subsampled_gaussian(0.5, 0.0, 2.0), f64::INFINITY);
    assert_eq!(rdp_subsampled_gaussian(0.0, 0.0, 2.0), 0.0);
    assert_eq!(
        rdp_subsampled_gaussian(0.5, 1.0, f64::INFINITY),
        f64::INFINITY
    );
}

#[test]
fn log_a_matches_multiprecision_integration() {
    // The (q, sigma, order) cases of TF Privacy's / dp_accounting's
    // test_compute_log_a_equals_mp (which allow rtol 1e-4), plus four more;
    // expected ln(A_alpha) from mpmath quadrature of
    // int mu0(z) (1 - q + q exp((2z - 1) / (2 sigma^2)))^alpha dz at 60 digits.
    let cases = [
        (1e-7, 0.1, 1.01, 4.003_412_322_526_395_3e-8),
        (1e-6, 0.1, 256.0, 3_260_463.229_297_161),
        (1e-5, 0.1, 256.1, 3_263_607.039_788_421_1),
        (1e-6, 1.0, 27.0, 8.769_511_304_848_502e-10),
        (1e-4, 1.0, 1.5, 6.442_686_953_836_649_1e-9),
        (1e-3, 1.0, 2.0, 1.718_280_352_214_515_3e-6),
        (0.01, 10.0, 20.0, 1.912_969_991_284_296_2e-4),
        (0.1, 100.0, 20.5, 1.999_181_845_806_829_4e-4),
        (0.99, 0.1, 256.0, 3_263_997.427_114_021_5),
        (0.999, 100.0, 256.1, 3.260_108_037_973_112),
        (0.01, 2.5, 1.5, 6.500_708_971_880_397_1e-6),
        (0.004, 0.8, 10.9, 24.121_283_503_693_63),
        (0.02, 0.3, 3.7, 41.025_514_879_932_83),
        (0.5, 0.7, 1.1, 0.035_207_051_785_686_7),
    ];
    for (q, sigma, order, expected) in cases {
        let log_a = rdp_subsampled_gaussian(q, sigma, order) * (order - 1.0);
        // The fractional series stops at terms below e^-30 (as TF Privacy
        // does), an absolute error ~1e-14 in ln(A): visible only when
        // ln(A) itself is ~1e-8.
        let rtol = if order.fract() == 0.0 { 1e-9 } else { 1e-5 };
        assert_rel(
            log_a,
            expected,
            rtol,
            &format!("ln A(q={q}, sigma={sigma}, alpha={order})"),
        );
    }
}

#[test]
fn matches_opacus_per_step_rdp() {
    // Per-step RDP from Opacus' accountants/analysis/rdp.py (the same code as
    // TF Privacy's rdp_accountant.py) run in float64 with scipy.
    let orders = [1.1, 1.5, 2.0, 3.7, 10.9, 12.0, 32.0, 63.0];
    let cases: [(f64, f64, [f64; 8]); 4] = [
        (
            0.01,
            1.0,
            [
                9.241470982855839e-05,
                0.00012725374351154145,
                0.00017181342207453428,
                0.0003329356254202168,
                0.3876114113003885,
                0.9780117180253621,
                11.246275937048072,
                26.820552875528232,
            ],
        ),
        (
            0.1,
            3.0,
            [
                0.0006397492201051858,
                0.0008761320774272878,
                0.0011745006913745394,
                0.0022138920313446876,
                0.0071113506019091464,
                0.007942731517270587,
                0.030773588901407696,
                1.1698816500377605,
            ],
        ),
        (
            0.9,
            5.0,
            [
                0.017829977355543505,
                0.024348364896947437,
                0.03252210353373575,
                0.06052337530515533,
                0.18249891306800653,
                0.2015805877574566,
                0.5645679687735544,
                1.1624631409900856,
            ],
        ),
        (
            0.02,
            0.3,
            [
                0.052905186795448124,
                0.30401054531032984,
                3.3237329431573515,
                15.194635140715867,
                56.24837871119527,
                62.399005206199604,
                173.73956048185195,
                346.02487984932304,
            ],
        ),
    ];
    for (q, sigma, expected) in cases {
        for (&order, &e) in orders.iter().zip(&expected) {
            let r = rdp_subsampled_gaussian(q, sigma, order);
            assert_rel(
                r,
                e,
                2e-8,
                &format!("rdp(q={q}, sigma={sigma}, alpha={order})"),
            );
        }
    }
    // Opacus stops its fractional series at terms below e^-30 (as TF Privacy);
    // ours sums on until they are also below e^-30 of A - 1. At (0.01, 1, 1.1)
    // Opacus is 1.1e-8 (relative) below the full sum, hence 2e-8 above (its
    // log_sub, ln(expm1(x - y)) + y, also rounds to ulp(|y|) at every
    // subtraction: 1.8e-9 of it). Against the full sums (mpmath quadrature of
    // A - 1, 40 digits; ref.py of the twenty-fifth session's review):
    for (order, exact) in [
        (1.1, 9.241_471_084_686_958e-5),
        (1.5, 1.272_537_433_274_498_3e-4),
    ] {
        let r = rdp_subsampled_gaussian(0.01, 1.0, order);
        assert_rel(r, exact, 1e-11, &format!("full series, alpha={order}"));
    }
}

#[test]
fn integer_and_fractional_paths_agree() {
    // The binomial sum (integer orders) and the erfc series (fractional
    // orders) are different algorithms; they must meet at integers.
    for &(q, sigma) in &[
        (0.01, 1.0),
        (0.004, 0.8),
        (0.3, 2.0),
        (0.9, 5.0),
        (1e-5, 0.5),
    ] {
        for &k in &[2.0, 3.0, 7.0, 20.0, 63.0] {
            let at = rdp_subsampled_gaussian(q, sigma, k);
            let above = rdp_subsampled_gaussian(q, sigma, k + 1e-9);
            let below = rdp_subsampled_gaussian(q, sigma, k - 1e-9);
            assert!(
                below <= at * (1.0 + 1e-6) + 1e-18 && at <= above * (1.0 + 1e-6) + 1e-18,
                "q={q} sigma={sigma} alpha={k}: {below} {at} {above}"
            );
            assert_rel(above, at, 1e-6, &format!("q={q} sigma={sigma} alpha={k}+"));
        }
    }
}

#[test]
fn rdp_is_monotone() {
    let orders = default_orders();
    for &q in &[1e-4, 0.004, 0.05, 0.5, 0.99] {
        for &sigma in &[0.3, 0.7, 1.1, 3.0, 10.0] {
            let r = compute_rdp(q, sigma, 1, &orders).unwrap();
            // Non-decreasing in the order ...
            for w in r.windows(2) {
                assert!(w[1] >= w[0] * (1.0 - 1e-9), "q={q} sigma={sigma}: {w:?}");
            }
            // ... non-increasing in sigma, non-decreasing in q.
            let r_more_noise = compute_rdp(q, sigma * 1.1, 1, &orders).unwrap();
            let r_more_q = compute_rdp((q * 1.5).min(1.0), sigma, 1, &orders).unwrap();
            for k in 0..orders.len() {
                assert!(r_more_noise[k] <= r[k] * (1.0 + 1e-12), "sigma monotone");
                assert!(r_more_q[k] >= r[k] * (1.0 - 1e-12), "q monotone");
            }
        }
    }
}

#[test]
fn full_batch_is_plain_gaussian_closed_form() {
    let orders = default_orders();
    let (sigma, steps) = (1.3, 250);
    let r = compute_rdp(1.0, sigma, steps, &orders).unwrap();
    for (a, r) in orders.iter().zip(r) {
        assert_rel(r, a * steps as f64 / (2.0 * sigma * sigma), 1e-15, "q = 1");
    }
    // And q slightly below 1 approaches it from below.
    let near = compute_rdp(1.0 - 1e-9, sigma, steps, &[2.0, 2.5, 10.0]).unwrap();
    for (a, r) in [2.0, 2.5, 10.0].iter().zip(near) {
        assert_rel(r, a * steps as f64 / (2.0 * sigma * sigma), 1e-6, "q -> 1");
    }
}

#[test]
fn extreme_parameters_stay_finite_or_conservative() {
    // Tiny sigma: huge but never NaN; sigma^2 underflowing gives +inf.
    for &order in &[1.5, 2.0, 10.9, 63.0] {
        let r = rdp_subsampled_gaussian(0.01, 1e-3, order);
        assert!(r.is_finite() && r > 1e4, "{r}");
        assert_eq!(rdp_subsampled_gaussian(0.01, 1e-200, order), f64::INFINITY);
        // Tiny q: essentially zero, never negative.
        let r = rdp_subsampled_gaussian(1e-300, 1.0, order);
        assert!((0.0..1e-290).contains(&r), "{r}");
        // Huge sigma.
        let r = rdp_subsampled_gaussian(0.3, 1e4, order);
        assert!((0.0..1e-6).contains(&r), "{r}");
    }
}

// ----- RDP -> (epsilon, delta) ---------------------------------------

#[test]
fn conversion_pure_dp_hand_value() {
    // dp_accounting test_compute_epsilon_delta_pure_dp (and TF Privacy
    // test_get_privacy_spent_check_target_delta): constant RDP 1.1 at
    // orders 2..=32, delta = 1e-5 -> epsilon 1.32783806176 at order 32.
    let orders: Vec<f64> = (2..=32).map(f64::from).collect();
    let rdp = vec![1.1; orders.len()];
    let (eps, order) = rdp_to_epsilon(&orders, &rdp, 1e-5).unwrap();
    assert_abs(eps, 1.327_838_061_76, 1e-10, "pure-DP epsilon");
    assert_eq!(order, 32.0);
}

#[test]
fn conversion_gaussian_exact_1_1e6() {
    // dp_accounting test_compute_epsilon_delta_gaussian: the Gaussian
    // mechanism with sigma = 4.530877117 is exactly (1, 1e-6)-DP, and the
    // improved conversion over orders 1.001..99.999 recovers epsilon = 1
    // (assertAlmostEqual, 7 places). dp_accounting's list starts at 1.000,
    // which it skips anyway (orders <= 1.01 give +inf).
    let orders: Vec<f64> = (1001..100_000).map(|i| 0.001 * f64::from(i)).collect();
    let (eps, _) = epsilon_with_orders(1.0, 4.530_877_117, 1, 1e-6, &orders).unwrap();
    assert_abs(eps, 1.0, 5e-8, "Gaussian (1, 1e-6)");
}

#[test]
fn tf_privacy_mnist_tutorial_classic_epsilons() {
    // TF Privacy tutorials/README.md ("Expected Output" and "Select
    // Parameters"), MNIST with batch 256 of 60000, delta = 1e-5, printed with
    // two decimals by the classic conversion over the default orders:
    //   sigma 1.12: 1 epoch -> 1.00, 2 epochs -> 1.04, 60 epochs -> 2.92
    //   sigma 1.2, 10 epochs -> 1.20; sigma 0.6, 30 epochs -> 9.74.
    let cases = [
        (1.12, 1, 1.00, 0.005),
        (1.12, 2, 1.04, 0.005),
        (1.12, 60, 2.92, 0.005),
        (1.2, 10, 1.20, 0.005),
        // We (and TF Privacy's own code today) get 9.7527; the README's
        // 9.74 was printed by an earlier version.
        (0.6, 30, 9.74, 0.015),
    ];
    for (sigma, epochs, published, tol) in cases {
        let (eps, _) = epsilon_classic(MNIST_Q, sigma, mnist_steps(epochs), 1e-5).unwrap();
        assert_abs(
            eps,
            published,
            tol,
            &format!("sigma={sigma}, {epochs} epochs"),
        );
    }
}

#[test]
fn abadi_mnist_sigma_1_1() {
    // Abadi et al. 2016 setting as in the brief: q = 256/60000, sigma = 1.1,
    // 60 epochs, delta = 1e-5. Expected values from Opacus'
    // analysis/rdp.py (get_privacy_spent) and from TF Privacy's classic
    // conversion, run in float64 over the same default orders.
    let steps = mnist_steps(60);
    assert_eq!(steps, 14062);
    let (eps, order) = epsilon(MNIST_Q, 1.1, steps, 1e-5).unwrap();
    assert_rel(eps, 2.596_555_868_960_748_6, 1e-10, "improved");
    assert_eq!(order, 8.1);
    let (classic, order) = epsilon_classic(MNIST_Q, 1.1, steps, 1e-5).unwrap();
    assert_rel(classic, 3.008_272_082_524_604, 1e-10, "classic");
    assert_eq!(order, 8.8);
}

#[test]
fn matches_opacus_get_privacy_spent() {
    // (q, sigma, steps, delta) -> Opacus get_privacy_spent (improved) and
    // the classic conversion, computed with Opacus' analysis/rdp.py over the
    // default orders in float64.
    let cases = [
        (
            0.01,
            1.0,
            1000,
            1e-5,
            (2.1013652716430564, 7.8),
            (2.537982880184644, 7.9),
        ),
        (
            0.001,
            0.6,
            100_000,
            1e-6,
            (7.754842863463112, 3.7),
            (8.554491621084557, 3.7),
        ),
        (
            0.1,
            2.0,
            100,
            1e-5,
            (2.5805688086608938, 7.6),
            (3.0165381626535757, 8.1),
        ),
        (
            1.0,
            10.0,
            1,
            1e-5,
            (0.3752912223662765, 41.0),
            (0.4848526138535464, 49.0),
        ),
        (
            0.05,
            1.5,
            5000,
            1e-6,
            (16.693814859973386, 2.8),
            (17.69514247295694, 2.9),
        ),
    ];
    // 1e-9: at (0.001, 0.6) the optimal order 3.7 is fractional, where Opacus'
    // series stops early and its per-step RDP is 8e-10 above the full sum
    // (ours is within 4e-13 of mpmath there), and epsilon 3.9e-10 above ours.
    for (q, sigma, steps, delta, improved, classic) in cases {
        let what = format!("q={q} sigma={sigma} steps={steps} delta={delta}");
        let (e, o) = epsilon(q, sigma, steps, delta).unwrap();
        assert_rel(e, improved.0, 1e-9, &what);
        assert_eq!(o, improved.1, "{what}");
        let (e, o) = epsilon_classic(q, sigma, steps, delta).unwrap();
        assert_rel(e, classic.0, 1e-9, &what);
        assert_eq!(o, classic.1, "{what}");
    }
}

#[test]
fn improved_never_exceeds_classic_and_monotone() {
    let orders = default_orders();
    let scaled = |r: &[f64], steps: u64| r.iter().map(|x| x * steps as f64).collect::<Vec<_>>();
    for &q in &[1e-4, 0.004, 0.02, 0.3, 1.0] {
        for &sigma in &[0.5, 0.8, 1.1, 2.0, 5.0] {
            let r1 = compute_rdp(q, sigma, 1, &orders).unwrap();
            let r1_more_noise = compute_rdp(q, sigma * 1.05, 1, &orders).unwrap();
            for &delta in &[1e-9, 1e-5, 1e-2] {
                let mut last = 0.0;
                for &steps in &[1u64, 10, 100, 1000, 10_000] {
                    let r = scaled(&r1, steps);
                    let (e, _) = rdp_to_epsilon(&orders, &r, delta).unwrap();
                    let (c, _) = rdp_to_epsilon_classic(&orders, &r, delta).unwrap();
                    assert!(e <= c, "improved {e} > classic {c}");
                    assert!(e >= last, "not monotone in steps: {last} -> {e}");
                    last = e;
                    let (e_more_noise, _) =
                        rdp_to_epsilon(&orders, &scaled(&r1_more_noise, steps), delta).unwrap();
                    assert!(e_more_noise <= e, "not monotone in sigma");
                    let (e_more_delta, _) = rdp_to_epsilon(&orders, &r, delta * 2.0).unwrap();
                    assert!(e_more_delta <= e, "not monotone in delta");
                }
            }
            // The convenience functions agree with the pieces.
            let (e, o) = epsilon(q, sigma, 100, 1e-5).unwrap();
            assert_eq!(
                (e, o),
                rdp_to_epsilon(&orders, &scaled(&r1, 100), 1e-5).unwrap()
            );
        }
    }
}

#[test]
fn degenerate_mechanisms() {
    // No sampling: nothing is ever used, epsilon 0.
    assert_eq!(epsilon(0.0, 1.0, 1000, 1e-5).unwrap().0, 0.0);
    // No noise: no privacy.
    let (eps, order) = epsilon(0.01, 0.0, 10, 1e-5).unwrap();
    assert_eq!(eps, f64::INFINITY);
    assert!(order.is_nan());
    let (eps, _) = epsilon_classic(0.01, 0.0, 10, 1e-5).unwrap();
    assert_eq!(eps, f64::INFINITY);
    // Orders <= 1.01 are skipped by the improved conversion.
    let (eps, _) = epsilon_with_orders(0.01, 1.0, 10, 1e-5, &[1.005]).unwrap();
    assert_eq!(eps, f64::INFINITY);
    // An infinite order is accepted and never chosen.
    let (_, order) = epsilon_with_orders(0.01, 1.0, 10, 1e-5, &[8.0, f64::INFINITY]).unwrap();
    assert_eq!(order, 8.0);
}

// ----- inverse -------------------------------------------------------

#[test]
fn noise_multiplier_round_trips() {
    // Recover sigma = 1.1 from the Abadi epsilon.
    let steps = mnist_steps(60);
    let (eps, _) = epsilon(MNIST_Q, 1.1, steps, 1e-5).unwrap();
    let sigma = noise_multiplier_for_epsilon(MNIST_Q, steps, 1e-5, eps).unwrap();
    assert_rel(sigma, 1.1, 1e-6, "round trip");
    for &(q, steps, delta, target) in &[
        (0.004, 10_000u64, 1e-5, 1.0),
        (0.01, 1000, 1e-6, 8.0),
        (0.5, 10, 1e-5, 50.0),
        (1.0, 100, 1e-5, 3.0),
        (1e-4, 100_000, 1e-7, 0.5),
    ] {
        let sigma = noise_multiplier_for_epsilon(q, steps, delta, target).unwrap();
        let (e, _) = epsilon(q, sigma, steps, delta).unwrap();
        assert!(e <= target, "eps({sigma}) = {e} > {target}");
        let (e_less, _) = epsilon(q, sigma * (1.0 - 1e-6), steps, delta).unwrap();
        assert!(
            e_less > target,
            "sigma {sigma} is not the smallest: {e_less}"
        );
    }
}

#[test]
fn noise_multiplier_q1_closed_form() {
    // With q = 1 the RDP is alpha T / (2 sigma^2); check the inverse against
    // a direct scan of the closed form over the default orders.
    let (steps, delta, target) = (50u64, 1e-5, 2.0);
    let sigma = noise_multiplier_for_epsilon(1.0, steps, delta, target).unwrap();
    let eps_closed = |s: f64| {
        default_orders()
            .iter()
            .map(|&a| {
                a * steps as f64 / (2.0 * s * s) + (-1.0 / a).ln_1p()
                    - (delta.ln() + a.ln()) / (a - 1.0)
            })
            .fold(f64::INFINITY, f64::min)
    };
    assert!(eps_closed(sigma) <= target + 1e-12);
    assert!(eps_closed(sigma * (1.0 - 1e-6)) > target);
}

#[test]
fn noise_multiplier_unreachable_and_trivial() {
    // Full batch, a million steps: even sigma = 1e6 leaves epsilon ~0.1 with
    // the default orders (largest order 63), so 0.05 cannot be reached.
    match noise_multiplier_for_epsilon(1.0, 1_000_000, 1e-5, 0.05) {
        Err(AccountantError::UnreachableEpsilon {
            target,
            best,
            max_sigma,
        }) => {
            assert_eq!(target, 0.05);
            assert!(best > 0.05 && best < 0.2, "{best}");
            assert_eq!(max_sigma, MAX_NOISE_MULTIPLIER);
        }
        other => panic!("expected UnreachableEpsilon, got {other:?}"),
    }
    assert_eq!(noise_multiplier_for_epsilon(0.0, 100, 1e-5, 1.0), Ok(0.0));
}

// ----- review defects ----------------------------------------------------

#[test]
fn tiny_per_step_rdp_is_resolved_not_rounded_to_zero() {
    // ln(e^x - e^y) next to 0 with a far smaller y: x + ln1p(-e^(y - x)).
    let (x, y) = (1.2e-15_f64, -45.0_f64);
    assert_rel(
        log_sub(x, y).unwrap(),
        x - (y - x).exp(),
        1e-12,
        "log_sub(1.2e-15, -45)",
    );
    // Small q: ln A_alpha = alpha (alpha - 1) / 2 q^2 expm1(1 / sigma^2) + O(q^3),
    // so the per-step RDP is alpha / 2 q^2 expm1(1 / sigma^2), ~6e-15 at order 1.2.
    let (q, sigma) = (1e-6_f64, 10.0_f64);
    for &order in &[1.1, 1.2, 1.5, 2.0, 2.5, 10.9] {
        let leading = order / 2.0 * q * q * (1.0 / (sigma * sigma)).exp_m1();
        assert_rel(
            rdp_subsampled_gaussian(q, sigma, order),
            leading,
            1e-4,
            &format!("rdp(q=1e-6, sigma=10, alpha={order})"),
        );
    }
    // 1e8 steps: 6e-7 at order 1.2, far above delta^2 = 1e-10, so epsilon is
    // not 0 (dp_accounting's RDP accountant: 0.1029).
    let (eps, _) = epsilon(q, sigma, 100_000_000, 1e-5).unwrap();
    assert!(eps > 0.09 && eps < 0.11, "{eps}");
    // Epsilon 0.001 is below the conversion's floor with these orders (~0.103
    // at order 63), so only the KL shortcut reaches it: the returned sigma
    // must make T * KL, KL ~ q^2 expm1(1 / sigma^2) / 2, smaller than delta^2.
    let s = noise_multiplier_for_epsilon(q, 100_000_000, 1e-5, 0.001).unwrap();
    let kl_total = 1e8 * q * q * (1.0 / (s * s)).exp_m1() / 2.0;
    assert!(kl_total < 1e-10, "sigma {s}: T * KL = {kl_total}");

    // Further down, float64 cannot resolve the per-step RDP at small orders at
    // all: the series gives exactly 0 at order 1.1 for (q, sigma) = (1e-14, 1)
    // and at order 1.5 for (0.5, 1e7) (true values ~1e-28 and ~2e-15). The KL
    // shortcut must not take those zeros at face value: the total KL here is
    // ~1e-9 and ~2e-3, far above delta^2 = 1e-10.
    let (eps, _) = epsilon(1e-14, 1.0, 10_000_000_000_000_000_000, 1e-5).unwrap();
    assert!(eps > 0.09, "{eps}");
    let (eps, _) = epsilon_with_orders(0.5, 1e7, 1_000_000_000_000, 1e-5, &[1.5, 2.0]).unwrap();
    assert!(eps > 1.0, "{eps}");
}

#[test]
fn huge_orders_are_rejected_quickly() {
    let start = std::time::Instant::now();
    for order in [1e12, 1e15, 2f64.powi(53), 1e300] {
        assert!(
            matches!(
                epsilon_with_orders(0.01, 1.0, 1, 1e-5, &[order]),
                Err(AccountantError::InvalidOrder(_))
            ),
            "{order}"
        );
        assert!(
            rdp_subsampled_gaussian(0.01, 1.0, order).is_nan(),
            "{order}"
        );
        assert!(matches!(
            noise_multiplier_for_epsilon_with_orders(0.01, 1, 1e-5, 1.0, &[2.0, order]),
            Err(AccountantError::InvalidOrder(_))
        ));
    }
    assert!(start.elapsed().as_secs_f64() < 1.0);
}

#[test]
fn tiny_delta_agrees_between_epsilon_and_inverse() {
    // delta^2 underflows for delta = 1e-200; q = 0 still releases nothing.
    let (eps, _) = epsilon(0.0, 1.0, 100, 1e-200).unwrap();
    assert_eq!(eps, 0.0);
    assert_eq!(noise_multiplier_for_epsilon(0.0, 100, 1e-200, 1.0), Ok(0.0));
    // q > 0 with a KL far below delta^2 = 1e-400: epsilon 0; far above: not.
    let (eps, _) = epsilon(1e-210, 1.0, 1, 1e-200).unwrap();
    assert_eq!(eps, 0.0);
    let (eps, _) = epsilon(1e-190, 1.0, 1, 1e-200).unwrap();
    assert!(eps > 1.0, "{eps}");
    // The conversion of given RDP values compares in log space too.
    let (eps, order) = rdp_to_epsilon(&[2.0, 3.0], &[0.0, 0.0], 1e-200).unwrap();
    assert_eq!((eps, order), (0.0, 2.0));
    // An RDP of 1e-300 is far above delta^2 = 1e-400 (which underflows).
    let (eps, _) = rdp_to_epsilon(&[2.0], &[1e-300], 1e-200).unwrap();
    assert!(eps > 1.0, "{eps}");
    // The inverse at q > 0 meets its target at that delta (epsilon cannot drop
    // below about 7.4 there with the default orders, short of the KL shortcut).
    let sigma = noise_multiplier_for_epsilon(1e-2, 100, 1e-200, 10.0).unwrap();
    assert!(sigma > 0.0 && sigma as f32 as f64 == sigma, "{sigma}");
    assert!(epsilon(1e-2, sigma, 100, 1e-200).unwrap().0 <= 10.0);
}

#[test]
fn tiny_sigma_keeps_the_kl_shortcut() {
    // 1 / sigma^2 beyond expm1's range (sigma < 0.0375) with a q so small that
    // the total KL is still far below delta^2: epsilon 0, not the formula's 8.3.
    let (eps, _) = epsilon(1e-300, 0.03, 1, 1e-5).unwrap();
    assert_eq!(eps, 0.0);
    assert!(epsilon(1e-3, 0.03, 1, 1e-5).unwrap().0 > 1.0);
}

#[test]
fn noise_multiplier_search_below_its_halving_floor() {
    // q = 1, one step, target 1e14: eps(1e-7) already meets it, below the
    // halving's 1e-6 floor; the result is still the smallest f32 meeting it.
    let sigma = noise_multiplier_for_epsilon(1.0, 1, 1e-5, 1e14).unwrap();
    assert!(epsilon(1.0, sigma, 1, 1e-5).unwrap().0 <= 1e14);
    let below = f64::from((sigma as f32).next_down());
    assert!(epsilon(1.0, below, 1, 1e-5).unwrap().0 > 1e14, "{sigma}");
}

#[test]
fn noise_multiplier_is_f32_exact_and_meets_target() {
    let (q, steps, delta) = (0.02048, 4883u64, 1e-5);
    for target in [0.5, 1.0, 3.0, 8.0] {
        let sigma = noise_multiplier_for_epsilon(q, steps, delta, target).unwrap();
        assert_eq!(sigma as f32 as f64, sigma, "target {target}");
        let (e, _) = epsilon(q, sigma, steps, delta).unwrap();
        assert!(e <= target, "target {target}: eps({sigma}) = {e}");
        // The next f32 down misses it (the smallest f32 meeting the target).
        let below = f64::from((sigma as f32).next_down());
        let (e_below, _) = epsilon(q, below, steps, delta).unwrap();
        assert!(e_below > target, "target {target}: {below} also meets it");
    }
}

#[test]
fn micro_batch_sensitivity_doubles_beyond_one_row() {
    assert_eq!(micro_batch_sensitivity(1), 1.0);
    assert_eq!(micro_batch_sensitivity(0), 1.0);
    assert_eq!(micro_batch_sensitivity(2), 2.0);
    assert_eq!(micro_batch_sensitivity(8), 2.0);
    assert_eq!(micro_batch_sensitivity(usize::MAX), 2.0);
}

// ----- argument checks -------------------------------------------------

#[test]
fn bad_arguments_are_errors_not_panics() {
    use AccountantError as E;
    let nan = f64::NAN;
    assert!(matches!(
        epsilon(-0.1, 1.0, 1, 1e-5),
        Err(E::InvalidSamplingRate(_))
    ));
    assert!(matches!(
        epsilon(1.1, 1.0, 1, 1e-5),
        Err(E::InvalidSamplingRate(_))
    ));
    assert!(matches!(
        epsilon(nan, 1.0, 1, 1e-5),
        Err(E::InvalidSamplingRate(_))
    ));
    assert!(matches!(
        epsilon(0.1, -1.0, 1, 1e-5),
        Err(E::InvalidNoiseMultiplier(_))
    ));
    assert!(matches!(
        epsilon(0.1, nan, 1, 1e-5),
        Err(E::InvalidNoiseMultiplier(_))
    ));
    assert!(matches!(
        epsilon(0.1, f64::INFINITY, 1, 1e-5),
        Err(E::InvalidNoiseMultiplier(_))
    ));
    assert_eq!(epsilon(0.1, 1.0, 0, 1e-5), Err(E::ZeroSteps));
    for d in [0.0, 1.0, -1e-5, 2.0, nan] {
        assert!(
            matches!(epsilon(0.1, 1.0, 1, d), Err(E::InvalidDelta(_))),
            "{d}"
        );
        assert!(matches!(
            epsilon_classic(0.1, 1.0, 1, d),
            Err(E::InvalidDelta(_))
        ));
    }
    assert_eq!(
        epsilon_with_orders(0.1, 1.0, 1, 1e-5, &[]),
        Err(E::NoOrders)
    );
    for o in [1.0, 0.5, -2.0, nan] {
        assert!(matches!(
            epsilon_with_orders(0.1, 1.0, 1, 1e-5, &[2.0, o]),
            Err(E::InvalidOrder(_))
        ));
    }
    assert_eq!(
        rdp_to_epsilon(&[2.0, 3.0], &[0.1], 1e-5),
        Err(E::LengthMismatch { orders: 2, rdp: 1 })
    );
    assert!(matches!(
        rdp_to_epsilon(&[2.0], &[-0.1], 1e-5),
        Err(E::InvalidRdp(_))
    ));
    assert!(matches!(
        rdp_to_epsilon_classic(&[2.0], &[nan], 1e-5),
        Err(E::InvalidRdp(_))
    ));
    for t in [0.0, -1.0, nan, f64::INFINITY] {
        assert!(matches!(
            noise_multiplier_for_epsilon(0.1, 10, 1e-5, t),
            Err(E::InvalidTargetEpsilon(_))
        ));
    }
    assert_eq!(
        noise_multiplier_for_epsilon(0.1, 0, 1e-5, 1.0),
        Err(E::ZeroSteps)
    );
    assert!(matches!(
        noise_multiplier_for_epsilon(2.0, 10, 1e-5, 1.0),
        Err(E::InvalidSamplingRate(_))
    ));
    // The scalar function reports invalid input as NaN.
    assert!(rdp_subsampled_gaussian(-0.5, 1.0, 2.0).is_nan());
    assert!(rdp_subsampled_gaussian(0.5, -1.0, 2.0).is_nan());
    assert!(rdp_subsampled_gaussian(0.5, 1.0, 1.0).is_nan());
    assert!(rdp_subsampled_gaussian(0.5, 1.0, nan).is_nan());
    // Messages are one line.
    for e in [
        E::InvalidDelta(2.0),
        E::UnreachableEpsilon {
            target: 0.1,
            best: 0.2,
            max_sigma: 1e6,
        },
    ] {
        assert!(!e.to_string().contains('\n'));
    }
}

// ----- orders near 1, huge noise multipliers, no sampling ------------------

#[test]
fn near_one_orders_match_multiprecision() {
    // Per-step RDP ln(A_alpha) / (alpha - 1) at fractional orders within
    // 1e-12 .. 0.1 of 1. Expected values from mpmath (60 digits; unchanged at
    // 80) quadrature of A_alpha - 1 = E_{z ~ N(0, sigma^2)}[(1 + y)^alpha - 1 -
    // alpha y] with y = q (exp((2z - 1) / (2 sigma^2)) - 1) (the subtracted
    // alpha y has mean 0 and makes the integrand >= 0, so nothing cancels),
    // at the exact f64 value of alpha; then ln1p(.) / (alpha - 1). The erfc
    // series stopped at terms below e^-30 was off by up to 2.8x here (and
    // by 7e-5 .. 2e-4 at three more of these points).
    let cases = [
        (1e-3, 1.0, 1.0 + 1e-6, 8.568_471_000_978_874e-7),
        (0.01, 1.0, 1.0 + 1e-6, 8.381_229_346_608_699e-5),
        (1e-4, 0.5, 1.0 + 1e-10, 2.543_067_816_275_194e-7),
        (1e-5, 2.0, 1.0 + 1e-8, 1.420_122_682_303_688_4e-11),
        (0.004, 0.8, 1.0 + 1e-12, 2.928_700_327_206_637e-5),
        (0.1, 3.0, 1.0 + 1e-9, 5.809_701_072_672_541e-4),
        (0.5, 10.0, 1.0 + 1e-6, 1.251_561_158_616_838_2e-3),
        (0.9, 0.7, 1.0 + 1e-6, 0.836_378_221_262_280_1),
        (1e-6, 10.0, 1.001, 5.030_108_574_954_072e-15),
        (0.02, 0.3, 1.05, 0.044_751_605_223_547_1),
        (0.01, 1.0, 1.0999, 9.240_608_729_480_427e-5),
    ];
    for (q, sigma, order, expected) in cases {
        // (1e-6, 10): ln A ~ 5e-18 is what is left of terms of size ~1e-9
        // after cancellation, as at integer orders.
        let rtol = if q < 1e-5 { 1e-7 } else { 1e-9 };
        assert_rel(
            rdp_subsampled_gaussian(q, sigma, order),
            expected,
            rtol,
            &format!("rdp(q={q}, sigma={sigma}, alpha=1+{:e})", order - 1.0),
        );
    }
}

#[test]
fn near_one_orders_are_monotone_and_continuous() {
    // RDP is non-decreasing in the order and tends to the KL divergence as the
    // order tends to 1; near-1 orders must not exceed larger ones, and must
    // join the series used at the default orders from 1.1 on.
    let orders = [
        1.0 + 1e-15,
        1.0 + 1e-12,
        1.0 + 1e-9,
        1.0 + 1e-6,
        1.0 + 1e-3,
        1.05,
        1.1 - 1e-9,
        1.1,
        1.2,
    ];
    for &(q, sigma) in &[
        (1e-5, 0.5),
        (1e-4, 0.5),
        (0.004, 0.8),
        (0.01, 1.0),
        (0.1, 3.0),
        (0.5, 2.0),
        (0.9, 0.7),
    ] {
        let r = compute_rdp(q, sigma, 1, &orders).unwrap();
        for k in (1..r.len()).filter(|&k| k != 7) {
            assert!(
                r[k - 1] > 0.0 && r[k - 1] <= r[k] * (1.0 + 1e-9),
                "q={q} sigma={sigma}: rdp({}) = {}, rdp({}) = {}: not positive and non-decreasing",
                orders[k - 1],
                r[k - 1],
                orders[k],
                r[k]
            );
        }
        // Just below 1.1 (new form) and at 1.1 (TF Privacy's series, whose
        // truncation at terms below e^-30 is up to ~1e-4 relative here).
        assert_rel(r[6], r[7], 2e-4, &format!("q={q} sigma={sigma} at 1.1"));
    }
}

#[test]
fn huge_noise_multipliers_are_accounted_not_overflowed() {
    // The true RDP is below order / (2 sigma^2) (the RDP without
    // subsampling): 1e-72 at sigma = 1e39, 0 in f64 beyond. The fractional
    // series' truncation leaves up to ~1e-13 (conservative); never +inf or
    // NaN (sigma^2 overflows from sigma ~ 1.34e154), and epsilon is 0 by
    // the KL bound.
    // (q = 0.5 is the slow case: the series meets its iteration cap at the
    // orders below 2 and falls back to the bound.)
    let orders = [1.0 + 1e-6, 1.5, 2.0, 2.5, 63.0, 1e6];
    for sigma in [1e39, 1e155, 1e300, f64::MAX] {
        for q in [1e-3, 0.3, 0.5, 0.9, 1.0] {
            let r = compute_rdp(q, sigma, 1000, &orders).unwrap();
            for (&order, &r) in orders.iter().zip(&r) {
                assert!(
                    (0.0..1e-9).contains(&r),
                    "q={q} sigma={sigma:e} order={order}: rdp {r}"
                );
            }
            let (eps, order) = epsilon(q, sigma, 1000, 1e-5).unwrap();
            assert_eq!((eps, order), (0.0, 1.1), "q={q} sigma={sigma:e}");
        }
    }
    // The classic conversion has no KL shortcut: its floor with the default
    // orders, ln(1e5) / 62 = 0.1857 (order 63), plus a negligible RDP.
    for (q, sigma) in [(1e-3, 1e39), (0.9, 1e39), (0.5, f64::MAX)] {
        let (classic, order) = epsilon_classic(q, sigma, 1000, 1e-5).unwrap();
        assert_abs(classic, 1e5_f64.ln() / 62.0, 1e-9, "classic floor");
        assert_eq!(order, 63.0);
    }
}

#[test]
fn classic_epsilon_is_zero_without_sampling() {
    // q = 0: no example is ever used, the RDP is 0 at every order, and the
    // classic bound rdp - ln(delta) / (alpha - 1) tends to 0 as alpha -> inf;
    // over the finite default orders it would stop at ln(1e5) / 62 = 0.1857.
    for delta in [1e-2, 1e-5, 1e-200] {
        for sigma in [0.0, 0.5, 1.0, 1e6] {
            let improved = epsilon(0.0, sigma, 1000, delta).unwrap();
            let classic = epsilon_classic(0.0, sigma, 1000, delta).unwrap();
            assert_eq!(classic, (0.0, 1.1), "delta={delta} sigma={sigma}");
            assert_eq!(classic, improved);
            let classic = epsilon_classic_with_orders(0.0, sigma, 1, delta, &[2.0, 32.0]).unwrap();
            assert_eq!(classic, (0.0, 2.0));
        }
    }
    // Arguments are still checked.
    assert!(matches!(
        epsilon_classic(0.0, 1.0, 1, 0.0),
        Err(AccountantError::InvalidDelta(_))
    ));
    assert_eq!(
        epsilon_classic(0.0, 1.0, 0, 1e-5),
        Err(AccountantError::ZeroSteps)
    );
    assert!(matches!(
        epsilon_classic_with_orders(0.0, 1.0, 1, 1e-5, &[0.5]),
        Err(AccountantError::InvalidOrder(_))
    ));
}
