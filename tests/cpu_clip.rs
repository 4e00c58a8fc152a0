//! CPU backend against the float64 reference, and backend selection.

mod common;

use common::*;
use microclip::reference::clip_f64;
use microclip::{
    Backend, BackendKind, ClipConfig, ClipError, Clipper, MicroBatches, NonFinitePolicy,
};

#[test]
fn random_shapes_match_float64_reference() {
    run_random_cases(Clipper::new(Backend::Cpu).unwrap(), 128, 1e-6);
}

#[test]
fn non_finite_policies() {
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let n = 9;
    let mut t = random_tensors(2, n, &[4, 300], 1.0);
    t[0][5] = f32::NAN;
    t[1][3 * 300 + 7] = f32::INFINITY;
    for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Propagate] {
        for cfg in [
            ClipConfig::fixed(0.3, MicroBatches::Uniform(3)),
            ClipConfig::adaptive(1.0, MicroBatches::Uniform(3)),
        ] {
            check(
                &mut cpu,
                &cfg.with_non_finite(policy),
                &t,
                n,
                1e-6,
                &format!("{policy:?}"),
            );
        }
    }
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
    let t = random_tensors(1, 4, &[3], 1.0);
    let out = auto
        .clip(
            &ClipConfig::fixed(1.0, MicroBatches::Uniform(2)),
            &slices(&t),
            4,
        )
        .unwrap();
    assert_eq!(out.stats.backend, auto.backend());
    eprintln!("auto chose {}", auto.backend());
}
