//! One training step's clipping, microclip versus the same clipping written with
//! burn tensor ops, on the same burn wgpu device, in one run (feature `burn`):
//!
//! ```text
//! cargo bench --features burn --bench burn_clip
//! ```
//!
//! The gradients are an MLP's (784x128, 128, 128x10, 10: P = 101,770 parameters)
//! as `[N, D_p]` burn tensors on the device, N = 64 per-sample rows, micro-batches
//! of b = 1 and b = 4 rows, C = 1.
//!
//! * `microclip`: `BurnClipper::clip_rows` (fused WGSL kernels on burn's buffers;
//!   it returns once the statistics are read back, which can be before the
//!   device-side copy of the clipped average into burn's tensors is done), then
//!   `Device::sync`;
//! * `burn ops`: reshape `[M, b, D_p]`, `mean_dim(1)`, squared norms summed over
//!   all tensors, `sqrt`, `C / norm` clamped to 1, `mul`, `sum_dim(0) / M`, then
//!   `Device::sync`.
//!
//! Both sides end with `Device::sync` (which waits for all work submitted to the
//! shared queue), so both time finished device work.
//!
//! Each side runs 3 warm-up and 15 timed iterations; the median and min wall
//! times are printed.

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use microclip::burn::{shared_setup, BurnClipper};
use microclip::{ClipConfig, MicroBatches, REQUIRE_GPU_ENV};

const WIDTHS: [usize; 4] = [784 * 128, 128, 128 * 10, 10];
const N: usize = 64;
const C: f32 = 1.0;
const WARMUP: usize = 3;
const ITERS: usize = 15;

fn burn_ops_clip(rows: &[Tensor<2>], b: usize) -> Vec<Tensor<1>> {
    let m = N / b;
    let means: Vec<Tensor<2>> = rows
        .iter()
        .map(|t| {
            let d = t.dims()[1];
            t.clone().reshape([m, b, d]).mean_dim(1).reshape([m, d])
        })
        .collect();
    let sq = means
        .iter()
        .map(|g| g.clone().powi_scalar(2).sum_dim(1))
        .reduce(|a, b| a + b)
        .unwrap(); // [M, 1]
    let factor = (sq.sqrt().recip() * C).clamp_max(1.0); // [M, 1]
    means
        .into_iter()
        .map(|g| {
            let d = g.dims()[1];
            (g * factor.clone())
                .sum_dim(0)
                .div_scalar(m as f32)
                .reshape([d])
        })
        .collect()
}

fn time<F: FnMut()>(mut f: F) -> (f64, f64) {
    for _ in 0..WARMUP {
        f();
    }
    let mut t: Vec<f64> = (0..ITERS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[ITERS / 2], t[0])
}

fn main() {
    let setup = match shared_setup() {
        Ok(s) => s,
        Err(e) => {
            if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_GPU_ENV}=1 but no GPU: {e}");
            }
            eprintln!("no GPU adapter, burn bench skipped: {e}");
            return;
        }
    };
    let (mut clipper, device): (BurnClipper, Device) =
        BurnClipper::register(setup).expect("register with burn");
    println!("device: {}", clipper.clipper().backend());
    let rows: Vec<Tensor<2>> = WIDTHS
        .iter()
        .enumerate()
        .map(|(p, &d)| {
            let v: Vec<f32> = (0..N * d)
                .map(|k| (((k * 7919 + p * 104729) % 2003) as f32 / 1001.0 - 1.0) * 0.05)
                .collect();
            Tensor::from_data(TensorData::new(v, [N, d]), &device)
        })
        .collect();
    let p: usize = WIDTHS.iter().sum();
    let mb = (N * p * 4) as f64 / 1e6;
    println!("N = {N}, P = {p}, input {mb:.1} MB");
    for b in [1usize, 4] {
        let cfg = ClipConfig::fixed(C, MicroBatches::Uniform(b));
        // Same answer first.
        let (ours, _) = clipper.clip_rows(&cfg, rows.clone()).unwrap();
        let theirs = burn_ops_clip(&rows, b);
        let mut max_diff = 0f32;
        for (a, t) in ours.into_iter().zip(theirs) {
            let diff: f32 = (a - t).abs().max().into_scalar();
            max_diff = max_diff.max(diff);
        }
        let (mc_med, mc_min) = time(|| {
            let (out, stats) = clipper.clip_rows(&cfg, rows.clone()).unwrap();
            // The copy into burn's tensors may still be running.
            device.sync().unwrap();
            std::hint::black_box((out, stats));
        });
        let (bo_med, bo_min) = time(|| {
            let out = burn_ops_clip(&rows, b);
            device.sync().unwrap();
            std::hint::black_box(out);
        });
        println!(
            "b = {b} (M = {}): microclip median {mc_med:.2} ms (min {mc_min:.2}), burn ops median {bo_med:.2} ms (min {bo_min:.2}), ratio {:.2}x, max |diff| {max_diff:.2e}",
            N / b,
            bo_med / mc_med
        );
    }
}
