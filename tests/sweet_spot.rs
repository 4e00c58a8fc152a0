//! A shortened sweep of the `sweet_spot` example (its training logic is included
//! from `examples/sweet_spot/sim.rs`). Checks only what must hold whatever the
//! outcome of the experiment: every arm trains, the clip statistics agree with the
//! bound, and a seed gives the same numbers twice.

#[allow(dead_code)]
#[path = "../examples/sweet_spot/sim.rs"]
mod sim;

use microclip::{Backend, ClipConfig, Clipper, MicroBatches};
use rand::SeedableRng;
use sim::{Rule, Scenario, SweepConfig, World};

fn short(scenario: Scenario) -> SweepConfig {
    SweepConfig {
        ps: vec![0.0, 0.25],
        bs: vec![1, 8, 64],
        rules: vec![Rule::Adaptive, Rule::FixedWarmupMedian],
        lrs: vec![0.3],
        seeds: 2,
        steps: 80,
        warmup_steps: 20,
        backend: Backend::Cpu,
        threads: 2,
        ..SweepConfig::defaults(scenario)
    }
}

#[test]
fn every_arm_trains_and_stats_agree_with_the_bound() {
    let world = World::new();
    for scenario in [Scenario::Draggers, Scenario::MultiDomain] {
        let cfg = short(scenario);
        let arms = sim::sweep(&cfg, &world, |_, _, _| {}).expect("sweep runs");
        assert_eq!(arms.len(), cfg.ps.len() * cfg.rules.len() * cfg.bs.len());
        for arm in &arms {
            assert_eq!(arm.runs.len(), cfg.seeds);
            for r in &arm.runs {
                let what = format!(
                    "{:?} p={} {:?} b={} seed={}",
                    scenario, r.spec.p, r.spec.rule, r.spec.b, r.spec.seed
                );
                assert!(
                    r.val.loss.is_finite() && r.test.acc.is_finite(),
                    "{what}: non-finite result"
                );
                // "Trains": the training objective (draggers with their wrong labels
                // included) or the clean validation loss went down. Not always both:
                // plain SGD at p = 0.25 follows the draggers, so its clean loss rises;
                // a clipped arm that prunes them fits the clean data and the draggers'
                // loss (hence the training objective) rises.
                assert!(
                    r.train_loss_final < r.train_loss_init || r.val.loss < r.val_loss_init,
                    "{what}: neither the training loss ({} -> {}) nor the validation loss ({} -> {}) went down",
                    r.train_loss_init,
                    r.train_loss_final,
                    r.val_loss_init,
                    r.val.loss
                );
                if r.spec.p == 0.0 || scenario == Scenario::MultiDomain {
                    // No draggers: training and validation distributions agree.
                    assert!(
                        r.val.loss < r.val_loss_init,
                        "{what}: validation loss did not go down"
                    );
                    assert!(
                        r.train_loss_final < r.train_loss_init,
                        "{what}: training loss did not go down"
                    );
                }
                assert_eq!(
                    r.stat_mismatches, 0,
                    "{what}: clip statistics disagree with the bound"
                );
                assert!((0.0..=1.0).contains(&r.clipped_frac), "{what}");
                match r.spec.rule {
                    // Algorithm 1: only micro-batches above the minimum are clipped.
                    Rule::Adaptive => {
                        let m = (cfg.batch / r.spec.b) as f64;
                        assert!(r.clipped_frac <= (m - 1.0) / m + 1e-12, "{what}");
                        assert!(r.fixed_bound.is_nan());
                    }
                    Rule::FixedWarmupMedian => {
                        assert!(r.fixed_bound.is_finite() && r.fixed_bound > 0.0, "{what}")
                    }
                }
                if r.spec.p == 0.0 {
                    assert!(
                        r.weight_ratio.is_nan(),
                        "{what}: no minority samples at p = 0"
                    );
                }
            }
        }
    }
}

#[test]
fn clip_stats_of_one_step_match_the_definition() {
    let world = World::new();
    let mut clipper = Clipper::new(Backend::Cpu).unwrap();
    let model = sim::Model::init(3);
    for (b, p) in [(1, 0.25), (4, 0.25), (8, 0.0), (64, 0.1)] {
        let spec = sim::RunSpec {
            scenario: Scenario::Draggers,
            p,
            rule: Rule::Adaptive,
            b,
            lr: 0.1,
            steps: 1,
            batch: 64,
            seed: 3,
            dragger_scale: 4.0,
            warmup_steps: 0,
            warmup_lr: 0.1,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let batch = sim::make_batch(&world, &model, &spec, &mut rng);
        assert_eq!(batch.grad_w.len(), 64 * sim::DW);
        assert_eq!(batch.grad_b.len(), 64 * sim::K);
        // Norms by hand (f64) from the micro-batch means over both tensors.
        let m = 64 / b;
        let mut means = vec![vec![0.0f64; sim::DW + sim::K]; m];
        for i in 0..64 {
            let row = batch.grad_w[i * sim::DW..(i + 1) * sim::DW]
                .iter()
                .chain(&batch.grad_b[i * sim::K..(i + 1) * sim::K]);
            for (acc, &g) in means[i / b].iter_mut().zip(row) {
                *acc += g as f64 / b as f64;
            }
        }
        let norms: Vec<f64> = means
            .iter()
            .map(|g| g.iter().map(|v| v * v).sum::<f64>().sqrt())
            .collect();
        for cfg in [
            ClipConfig::adaptive(1.0, MicroBatches::Uniform(b)),
            ClipConfig::fixed(0.05, MicroBatches::Uniform(b)),
        ] {
            let out = clipper
                .clip(&cfg, &[&batch.grad_w, &batch.grad_b], 64)
                .unwrap();
            let st = &out.stats;
            assert_eq!(st.norms.len(), m);
            for (a, e) in st.norms.iter().zip(&norms) {
                assert!(
                    (*a as f64 - e).abs() <= 1e-5 * e.max(1e-6),
                    "norm {a} vs {e}"
                );
            }
            let above = st.norms.iter().filter(|&&n| n > st.clip_bound).count();
            assert_eq!(
                st.clipped_count, above,
                "b={b}: clipped_count vs #norms > bound"
            );
            if matches!(cfg.bound, microclip::ClipBound::Adaptive { .. }) {
                let min = st.norms.iter().cloned().fold(f32::INFINITY, f32::min);
                assert!(
                    (st.clip_bound - min).abs() <= 1e-6 * min,
                    "adaptive bound {} vs min norm {min}",
                    st.clip_bound
                );
            } else {
                assert_eq!(st.clip_bound, 0.05);
            }
            // The output is the mean of the clipped micro-batch means.
            let mut expect = vec![0.0f64; sim::DW + sim::K];
            for (j, g) in means.iter().enumerate() {
                let s = (st.clip_bound as f64 / norms[j]).min(1.0);
                assert!(
                    (st.factors[j] as f64 - s).abs() <= 1e-5,
                    "factor {} vs {s}",
                    st.factors[j]
                );
                for (e, v) in expect.iter_mut().zip(g) {
                    *e += s * v / m as f64;
                }
            }
            let got: Vec<f32> = out.grads[0].iter().chain(&out.grads[1]).cloned().collect();
            for (a, e) in got.iter().zip(&expect) {
                assert!(
                    (*a as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "grad {a} vs {e}"
                );
            }
        }
    }
}

#[test]
fn same_seed_same_numbers() {
    let world = World::new();
    let mut cfg = short(Scenario::Draggers);
    cfg.ps = vec![0.25];
    cfg.bs = vec![2, 16];
    let a = sim::sweep(&cfg, &world, |_, _, _| {}).unwrap();
    cfg.threads = 1; // a different schedule must not matter either
    let b = sim::sweep(&cfg, &world, |_, _, _| {}).unwrap();
    // Debug prints every f64 exactly (NaN included), so equal strings = equal numbers.
    assert_eq!(
        format!("{:?}", a.iter().map(|x| &x.all_runs).collect::<Vec<_>>()),
        format!("{:?}", b.iter().map(|x| &x.all_runs).collect::<Vec<_>>())
    );
    // And a different seed gives different numbers.
    let mut spec = a[0].runs[0].spec.clone();
    spec.seed = 99;
    let mut clipper = Clipper::new(Backend::Cpu).unwrap();
    let other = sim::run(&world, &spec, &mut clipper).unwrap();
    assert_ne!(other.val.loss, a[0].runs[0].val.loss);
}

#[path = "common/mod.rs"]
mod common;

#[test]
fn gpu_and_cpu_backends_train_the_same() {
    let Some(mut gpu) = common::gpu() else { return };
    let world = World::new();
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let arms = sim::sweep(&short(Scenario::Draggers), &world, |_, _, _| {}).unwrap();
    for arm in arms.iter().filter(|a| a.runs[0].spec.p > 0.0) {
        for steps in [10, 60] {
            let mut spec = arm.runs[0].spec.clone();
            spec.steps = steps;
            let a = sim::run(&world, &spec, &mut cpu).unwrap();
            let b = sim::run(&world, &spec, &mut gpu).unwrap();
            let what = format!("{:?} b={} steps={steps}", spec.rule, spec.b);
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-3 * x.abs().max(y.abs()) + 1e-9;
            assert!(
                close(a.train_loss_final, b.train_loss_final),
                "{what}: train loss {} vs {}",
                a.train_loss_final,
                b.train_loss_final
            );
            assert!(
                close(a.val.loss, b.val.loss),
                "{what}: val loss {} vs {}",
                a.val.loss,
                b.val.loss
            );
            assert!(
                close(a.mean_bound, b.mean_bound)
                    || (a.mean_bound.is_nan() && b.mean_bound.is_nan()),
                "{what}: bound"
            );
            assert!(
                (a.clipped_frac - b.clipped_frac).abs() <= 0.02,
                "{what}: clipped fraction"
            );
        }
    }
}

/// Arguments that cannot run a meaningful sweep are refused before it starts, as
/// one `error: ...` line (a NaN learning rate had printed a table of NaN with exit
/// status 0; a `--json` path in a missing directory failed only after the sweep,
/// without naming the path).
#[test]
fn bad_arguments_are_refused_before_the_sweep() {
    let bin = common::example_bin("sweet_spot");
    for (args, needle) in [
        ("--lr nan", "learning rate NaN"),
        ("--lr 0.1,-1", "learning rate -1"),
        ("--lr -1,0.1", "learning rate -1"),
        ("--p -0.1,0.5", "p = -0.1"),
        ("--dragger-scale nan", "--dragger-scale NaN"),
        ("--dragger-scale -4", "--dragger-scale -4"),
        ("--p -0.5", "p = -0.5"),
        ("--b 3", "b = 3"),
        ("--json no-such-dir/x.json", "no-such-dir"),
    ] {
        let out = std::process::Command::new(&bin)
            .args(args.split_whitespace())
            .args(["--seeds", "1", "--steps", "1"])
            .output()
            .expect("running sweet_spot");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args}: {stderr}");
        assert!(
            stderr.trim().lines().count() == 1 && stderr.contains(needle),
            "{args}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args}: the sweep started");
    }
}
