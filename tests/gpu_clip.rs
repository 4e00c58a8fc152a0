//! GPU backend against the float64 reference on awkward shapes.

mod common;

use common::*;
use microclip::{ClipConfig, MicroBatches, NonFinitePolicy};
use proptest::prelude::*;

const TOL: f64 = 3e-5;

#[test]
fn smoke_shapes() {
    let Some(mut gpu) = gpu() else { return };
    // (n, widths, b)
    let cases: &[(usize, &[usize], usize)] = &[
        (1, &[1], 1),
        (7, &[1], 1),
        (7, &[3, 1025], 7),
        (10, &[255, 257, 1], 3),
        (33, &[4096, 17], 32),
        (64, &[1000], 64),
        (5, &[2049], 2),
    ];
    for (k, &(n, widths, b)) in cases.iter().enumerate() {
        let t = random_tensors(k as u64, n, widths, 1.0);
        for cfg in [
            ClipConfig::fixed(0.5, MicroBatches::Uniform(b)),
            ClipConfig::fixed(100.0, MicroBatches::Uniform(b)),
            ClipConfig::adaptive(1.0, MicroBatches::Uniform(b)),
            ClipConfig::adaptive(0.7, MicroBatches::Uniform(b)),
        ] {
            check(&mut gpu, &cfg, &t, n, TOL, &format!("case {k} {cfg:?}"));
        }
    }
}

#[test]
fn windows_smaller_than_a_tensor() {
    let Some(mut gpu) = gpu() else { return };
    let n = 23;
    let widths = [300, 7, 1100];
    let t = random_tensors(9, n, &widths, 1.0);
    for max_binding in [1100 * 4 + 256, 3 * 1100 * 4, 8192, 50_000] {
        gpu.set_max_binding_bytes(max_binding);
        for b in [1, 4, 5, 23] {
            let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(b));
            check(
                &mut gpu,
                &cfg,
                &t,
                n,
                TOL,
                &format!("binding {max_binding} b {b}"),
            );
        }
        let cfg = ClipConfig::fixed(0.3, MicroBatches::Offsets(vec![0, 1, 9, 10, 22, 23]));
        check(
            &mut gpu,
            &cfg,
            &t,
            n,
            TOL,
            &format!("binding {max_binding} offsets"),
        );
    }
}
