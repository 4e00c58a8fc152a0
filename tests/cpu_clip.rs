//! CPU backend against the float64 reference, and backend selection.

mod common;

use common::*;
use microclip::reference::clip_f64;
use microclip::{
    Backend, BackendKind, ClipConfig, ClipError, ClipFunction, Clipper, MicroBatches,
    NonFinitePolicy,
};

#[test]
fn random_shapes_match_float64_reference() {
    // The one-read path (the default for these sizes), then the two-pass path
    // (storing the means where b >= 3), then the two-pass path reading the input
    // twice at every b; each on the calling thread alone (the default for these
    // sizes, all below 8 MiB) and with every thread it would start for a large
    // input.
    for parallel_min_bytes in [usize::MAX, 0] {
        let cpu = || {
            let mut cpu = Clipper::new(Backend::Cpu).unwrap();
            cpu.set_cpu_parallel_min_bytes(parallel_min_bytes);
            cpu
        };
        run_random_cases(cpu(), 128, 1e-6);
        let mut two_pass = cpu();
        two_pass.set_cpu_fused_budget_bytes(0);
        run_random_cases(two_pass, 128, 1e-6);
        let mut re_read = cpu();
        re_read.set_cpu_fused_budget_bytes(0);
        re_read.set_cpu_means_max_bytes(0);
        run_random_cases(re_read, 128, 1e-6);
    }
}

/// The two-pass path stores the means from b = 3 on (f32), keeps them for the next
/// call, reuses them for a smaller one (every stored value rewritten), and agrees
/// with reading the input twice.
#[test]
fn two_pass_stored_means() {
    let mut stored = Clipper::new(Backend::Cpu).unwrap();
    stored.set_cpu_fused_budget_bytes(0);
    let mut re_read = Clipper::new(Backend::Cpu).unwrap();
    re_read.set_cpu_fused_budget_bytes(0);
    re_read.set_cpu_means_max_bytes(0);
    let widths = [5000usize, 3, 4099];
    let cols: usize = widths.iter().sum();
    // (rows, b, rows of means kept after the call): stored from b = 3 on, the
    // buffer grown when too short and otherwise reused.
    for (n, b, kept) in [(7, 7, 1), (24, 2, 1), (20, 5, 4), (24, 3, 8), (20, 5, 8)] {
        let t = random_tensors(11 + b as u64, n, &widths, 1.0);
        let cfg = ClipConfig::fixed(0.05, MicroBatches::Uniform(b))
            .with_non_finite(NonFinitePolicy::Propagate);
        check(
            &mut stored,
            &cfg,
            &t,
            n,
            1e-6,
            &format!("stored n {n} b {b}"),
        );
        assert_eq!(
            stored.scratch_bytes(),
            (4 * kept * cols) as u64,
            "n {n} b {b}"
        );
        let a = stored.clip(&cfg, &slices(&t), n).unwrap();
        let r = re_read.clip(&cfg, &slices(&t), n).unwrap();
        assert_eq!(a.stats.norms, r.stats.norms, "n {n} b {b}");
        let r64: Vec<Vec<f64>> = r
            .grads
            .iter()
            .map(|g| g.iter().map(|&x| x as f64).collect())
            .collect();
        assert!(rel_l2(&a.grads, &r64) < 1e-6, "n {n} b {b}");
        assert_eq!(re_read.scratch_bytes(), 0);
        // Released means are allocated again at the call's size, same bits.
        stored.release_scratch();
        assert_eq!(stored.scratch_bytes(), 0, "n {n} b {b}");
        let again = stored.clip(&cfg, &slices(&t), n).unwrap();
        assert_eq!(again, a, "n {n} b {b}");
        let rows = if b >= 3 { n / b } else { 0 };
        assert_eq!(stored.scratch_bytes(), (4 * rows * cols) as u64);
    }
    // The cap on the stored means (`set_cpu_means_max_bytes`) at its boundary:
    // means of exactly the cap are stored, one byte less re-reads the input.
    let (n, b) = (20, 5);
    let t = random_tensors(3, n, &widths, 1.0);
    let cfg = ClipConfig::fixed(0.05, MicroBatches::Uniform(b));
    let bytes = 4 * (n / b) * cols;
    for (cap, kept) in [(bytes, bytes), (bytes - 1, 0)] {
        let mut capped = Clipper::new(Backend::Cpu).unwrap();
        capped.set_cpu_fused_budget_bytes(0);
        capped.set_cpu_means_max_bytes(cap);
        check(&mut capped, &cfg, &t, n, 1e-6, &format!("cap {cap}"));
        assert_eq!(capped.scratch_bytes(), kept as u64, "cap {cap}");
    }
}

#[test]
fn factor_edge_cases_match_the_reference() {
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    // The one-read path, then the two-pass paths (re-reading, stored means).
    for (budget, means) in [(usize::MAX, usize::MAX), (0, usize::MAX), (0, 0)] {
        cpu.set_cpu_fused_budget_bytes(budget);
        cpu.set_cpu_means_max_bytes(means);
        for (what, cfg, t, n) in factor_edge_cases()
            .into_iter()
            .chain(cancelling_rows_cases())
        {
            let what = format!("budget {budget} means {means}: {what}");
            check(&mut cpu, &cfg, &t, n, 1e-6, &what);
        }
    }
}

#[test]
fn non_finite_policies() {
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let n = 9;
    let mut t = random_tensors(2, n, &[4, 300], 1.0);
    t[0][5] = f32::NAN;
    t[1][3 * 300 + 7] = f32::INFINITY;
    // Both CPU paths (one-read, then two-pass), micro-batches of 3 rows and of 1,
    // groups where only one group of a micro-batch is non-finite.
    for (budget, means) in [(usize::MAX, usize::MAX), (0, usize::MAX), (0, 0)] {
        cpu.set_cpu_fused_budget_bytes(budget);
        cpu.set_cpu_means_max_bytes(means);
        for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Propagate] {
            for b in [3, 1] {
                for cfg in [
                    ClipConfig::fixed(0.3, MicroBatches::Uniform(b)),
                    ClipConfig::adaptive(1.0, MicroBatches::Uniform(b)),
                    ClipConfig::adaptive(0.5, MicroBatches::Uniform(b))
                        .with_groups(vec![1, 0])
                        .with_function(ClipFunction::Automatic { gamma: 0.1 }),
                ] {
                    let what = format!("budget {budget} means {means} {policy:?} {cfg:?}");
                    check(&mut cpu, &cfg.with_non_finite(policy), &t, n, 1e-6, &what);
                }
            }
        }
    }
    cpu.set_cpu_fused_budget_bytes(usize::MAX);
    let cfg =
        ClipConfig::fixed(0.3, MicroBatches::Uniform(3)).with_non_finite(NonFinitePolicy::Error);
    let err = cpu.clip(&cfg, &slices(&t), n).unwrap_err();
    assert_eq!(
        err,
        ClipError::NonFinite {
            micro_batch: 0,
            count: 2
        }
    );
    assert_eq!(clip_f64(&cfg, &slices(&t), n).unwrap_err(), err);
}

#[test]
fn cpu_and_gpu_agree() {
    let Some(mut gpu) = gpu() else { return };
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let t = random_tensors(8, 30, &[2000, 5, 300], 1.0);
    let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(4));
    let a = gpu.clip(&cfg, &slices(&t), 30).unwrap();
    let b = cpu.clip(&cfg, &slices(&t), 30).unwrap();
    assert_eq!(b.stats.backend, BackendKind::Cpu);
    assert!(matches!(a.stats.backend, BackendKind::Gpu(_)));
    let want = clip_f64(&cfg, &slices(&t), 30).unwrap();
    assert!(rel_l2(&a.grads, &want.grads) < 3e-5);
    assert!(rel_l2(&b.grads, &want.grads) < 1e-6);
    assert_eq!(a.stats.clipped_count, b.stats.clipped_count);
}

#[test]
fn auto_names_the_backend_that_ran() {
    let mut auto = Clipper::new(Backend::Auto).unwrap();
    // Auto takes the GPU wherever there is an adapter (gpu() fails the test
    // without one under MICROCLIP_REQUIRE_GPU=1), the CPU otherwise.
    let gpu_adapter = gpu().map(|g| g.backend());
    match (&gpu_adapter, auto.backend()) {
        (Some(g), chosen) => assert_eq!(&chosen, g),
        (None, chosen) => assert_eq!(chosen, BackendKind::Cpu),
    }
    let t = random_tensors(1, 5, &[3, 70], 1.0);
    let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(2));
    check(&mut auto, &cfg, &t, 5, 3e-5, "auto");
    let out = auto.clip(&cfg, &slices(&t), 5).unwrap();
    assert_eq!(out.stats.backend, auto.backend());
    eprintln!("auto chose {}", auto.backend());
}

/// The one-read path in groups of R = 1, 2, 3 and 16 micro-batches per barrier,
/// and the two-pass path: all match the reference, and the one-read results are
/// bitwise equal (the additions happen in the same order whatever R is).
#[test]
fn fused_group_sizes_agree_bitwise() {
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let (n, widths) = (29, [600usize, 400]);
    let t = random_tensors(5, n, &widths, 1.0);
    let cols: usize = widths.iter().sum();
    for cfg in [
        ClipConfig::fixed(0.5, MicroBatches::Uniform(2)),
        ClipConfig::adaptive(0.8, MicroBatches::Offsets(vec![0, 1, 2, 9, 10, 29])),
        ClipConfig::fixed(0.5, MicroBatches::Uniform(1))
            .with_function(ClipFunction::Normalize)
            .with_groups(vec![1, 0]),
    ] {
        let mut first: Option<Vec<Vec<f32>>> = None;
        // Group sizes, on the calling thread alone and with a thread per block.
        for (r, parallel_min_bytes) in [1, 2, 3, 16]
            .into_iter()
            .flat_map(|r| [(r, usize::MAX), (r, 0)])
        {
            cpu.set_cpu_parallel_min_bytes(parallel_min_bytes);
            cpu.set_cpu_fused_budget_bytes(8 * cols + 4 * cols * r);
            let what = format!("R = {r}, parallel from {parallel_min_bytes} bytes, {cfg:?}");
            check(&mut cpu, &cfg, &t, n, 1e-6, &what);
            let out = cpu.clip(&cfg, &slices(&t), n).unwrap().grads;
            match &first {
                None => first = Some(out),
                Some(f) => assert_eq!(&out, f, "{what}"),
            }
        }
        // Budgets too small for one micro-batch's means beside the accumulator
        // (R would be 0): the two-pass path.
        for budget in [0, 8 * cols, 12 * cols - 1] {
            cpu.set_cpu_fused_budget_bytes(budget);
            check(
                &mut cpu,
                &cfg,
                &t,
                n,
                1e-6,
                &format!("budget {budget}, {cfg:?}"),
            );
        }
    }
}

/// One-row micro-batches whose terms cancel in f64 (1 + 1e16 - 1e16 is 0: the 1
/// is lost in the first sum; another order gives 1 / 3) come out with the same
/// bits from every group size R and both two-pass paths: the terms are added in
/// micro-batch order everywhere.
#[test]
fn terms_add_in_micro_batch_order() {
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let t = vec![vec![1.0f32, 1e16, -1e16]];
    let cfg = ClipConfig::fixed(1e30, MicroBatches::Uniform(1));
    let mut outputs = Vec::new();
    for (budget, means) in [
        (8 + 4, usize::MAX),
        (8 + 4 * 2, usize::MAX),
        (8 + 4 * 3, usize::MAX),
        (0, usize::MAX),
        (0, 0),
    ] {
        cpu.set_cpu_fused_budget_bytes(budget);
        cpu.set_cpu_means_max_bytes(means);
        let out = cpu.clip(&cfg, &slices(&t), 3).unwrap().grads[0][0];
        outputs.push((budget, means, out.to_bits()));
    }
    assert!(outputs.iter().all(|o| o.2 == outputs[0].2), "{outputs:?}");
}

/// Found by the random cases: with D = 1 and means near 1e30, AUTO-S's factors
/// make both micro-batches' terms +-C to within float64's rounding, so the
/// float64 reference is exactly 0 while each CPU path's sum keeps a rounding of
/// its terms (C = 1.7e31): -2.8e23 on the one-read path, 2.3e15 on the two-pass
/// paths. The check bounds the error by the terms' magnitudes, not by the zero
/// result.
#[test]
fn terms_that_cancel_exactly() {
    let t = rounded(
        &random_tensors(14916901798787279224, 4, &[1], 1e30),
        microclip::half::bf16::from_f32,
    );
    let cfg = ClipConfig::fixed(1.728053e31, MicroBatches::Uniform(3))
        .with_function(ClipFunction::Automatic { gamma: 0.001 });
    let want = clip_f64(&cfg, &slices(&widened(&t)), 4).unwrap();
    assert_eq!(want.grads[0][0], 0.0);
    assert!(want.magnitudes[0][0] > 1e31);
    // The one-read path, the two-pass path, the two-pass path re-reading the input.
    for (fused, means) in [(None, None), (Some(0), None), (Some(0), Some(0))] {
        let mut clipper = Clipper::new(Backend::Cpu).unwrap();
        if let Some(bytes) = fused {
            clipper.set_cpu_fused_budget_bytes(bytes);
        }
        if let Some(bytes) = means {
            clipper.set_cpu_means_max_bytes(bytes);
        }
        check_typed(&mut clipper, &cfg, &t, 4, 1e-6, "cancelling terms");
    }
}

/// Micro-batch means of tiny norms under Normalize and AUTO-S (factors up to about
/// 1e45): means whose elements are f32 subnormals, which the paths that store f32
/// means must not use there (a mean of 2^-149 / 3 stored as 0 gave an output of 0
/// instead of 1), and a mean of norm 1e-30 from rows of about 1 that cancel, which
/// must be summed before it is scaled (scaling each row by 1e30 / 3 first gave
/// -1.4e14 instead of 0).
#[test]
fn tiny_norm_means_match_the_reference() {
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    // 2^-126 + 2^-149, -2^-126, 0: a mean of 2^-149 / 3.
    let exact = vec![vec![f32::from_bits(0x0080_0001), -f32::MIN_POSITIVE, 0.0]];
    // Column 0 sums to exactly 0 in f64; column 1 is the norm, 1e-30.
    let cancel = [0x3eac_8c34u32, 0x3fce_f389, 0xbffa_1696]
        .iter()
        .flat_map(|&bits| [f32::from_bits(bits), 1e-30])
        .collect();
    let mut cases = vec![
        ("2^-149 / 3".to_string(), exact, 3, 3),
        (
            "rows that cancel, norm 1e-30".to_string(),
            vec![cancel],
            3,
            3,
        ),
    ];
    for (b, magnitude) in [(2, 1e-40f32), (3, 1e-42)] {
        let t = random_tensors(31, 6, &[1000, 7], magnitude);
        cases.push((format!("b {b}, magnitude {magnitude:e}"), t, 6, b));
    }
    // Means whose elements are all f32 subnormals (about 1e-40) but whose norm,
    // over 2^18 columns, is above 2^-126 (about 4e-38): too coarse to store up to
    // 2^-64 (mean_too_coarse), not only below f32's normal range.
    let wide = random_tensors(37, 4, &[1 << 18], 1e-40);
    cases.push(("2^18 subnormal columns".to_string(), wide, 4, 2));
    // The one-read path, then the two-pass paths (stored means, re-reading).
    for (budget, means) in [(usize::MAX, usize::MAX), (0, usize::MAX), (0, 0)] {
        cpu.set_cpu_fused_budget_bytes(budget);
        cpu.set_cpu_means_max_bytes(means);
        for (what, t, n, b) in &cases {
            for function in [
                ClipFunction::Normalize,
                ClipFunction::Automatic { gamma: 1e-44 },
            ] {
                let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(*b)).with_function(function);
                let what = format!("budget {budget} means {means}: {what}, {function:?}");
                check(&mut cpu, &cfg, t, *n, 1e-6, &what);
            }
        }
    }
}
