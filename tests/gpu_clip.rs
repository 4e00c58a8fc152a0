//! GPU backend against the float64 reference on awkward shapes.

mod common;

use common::*;
use microclip::half::f16;
use microclip::reference::clip_f64;
use microclip::{Backend, ClipConfig, ClipFunction, Clipper, MicroBatches, NonFinitePolicy};
use microclip::{ClipError, ClipOutput, Dtype, GpuTensor, GpuTensorMut};
use wgpu::util::DeviceExt;

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
        // around the norm pass's 4096-column tile, and several tiles
        (6, &[4095, 4096, 4097], 1),
        (9, &[8191, 1, 12289], 4),
        (3, &[8193], 3),
    ];
    for (k, &(n, widths, b)) in cases.iter().enumerate() {
        let t = random_tensors(k as u64, n, widths, 1.0);
        // The adapter's tile width and workgroup sizes (on a software adapter: wider
        // tiles, 8-thread reduction workgroups), then a hardware adapter's (always
        // 4096 columns, 64 and 256 threads).
        for hardware in [false, true] {
            gpu.set_gpu_min_tile_workgroups(hardware.then_some(u64::MAX));
            gpu.set_gpu_small_workgroups(hardware.then_some(false));
            for cfg in [
                ClipConfig::fixed(0.5, MicroBatches::Uniform(b)),
                ClipConfig::fixed(100.0, MicroBatches::Uniform(b)),
                ClipConfig::adaptive(1.0, MicroBatches::Uniform(b)),
                ClipConfig::adaptive(0.7, MicroBatches::Uniform(b)),
            ] {
                check(
                    &mut gpu,
                    &cfg,
                    &t,
                    n,
                    TOL,
                    &format!("case {k} hardware sizes {hardware} {cfg:?}"),
                );
            }
        }
    }
    // None restores the adapter's default: small workgroups on a software adapter.
    gpu.set_gpu_small_workgroups(None);
    let software = gpu.device().unwrap().adapter_info().device_type == wgpu::DeviceType::Cpu;
    assert_eq!(gpu.gpu_small_workgroups(), Some(software));
}

#[test]
fn every_tile_width_of_the_norm_pass() {
    // Tensors around the 4096- and 65536-column tiles, every tile width from the
    // narrowest to the widest, one binding and row windows.
    let Some(mut gpu) = gpu() else { return };
    let n = 6;
    let widths = [65_537, 4097, 1, 16_383];
    let t = random_tensors(31, n, &widths, 1.0);
    for floor in [u64::MAX, 60, 30, 12, 1] {
        gpu.set_gpu_min_tile_workgroups(Some(floor));
        for b in [1, 2, 4, 6] {
            let m = n.div_ceil(b);
            let tile = gpu.gpu_tile_cols(&widths, m, b).unwrap();
            for max_binding in [u64::MAX, 65_537 * 4 * 2 + 256] {
                gpu.set_max_binding_bytes(max_binding);
                let cfg = ClipConfig::adaptive(0.8, MicroBatches::Uniform(b));
                let what = format!("tile {tile} b {b} binding {max_binding}");
                check(&mut gpu, &cfg, &t, n, TOL, &what);
            }
        }
    }
    // The floors above reach both ends.
    gpu.set_gpu_min_tile_workgroups(Some(u64::MAX));
    assert_eq!(gpu.gpu_tile_cols(&widths, 6, 1), Some(4096));
    gpu.set_gpu_min_tile_workgroups(Some(1));
    assert_eq!(gpu.gpu_tile_cols(&widths, 1, 6), Some(65_536));
}

#[test]
fn every_span_and_run_tail_of_the_vec4_paths() {
    // Widths that are multiples of 4 (vec4 loads), around the boundaries of the
    // norm pass's spans (a tile's quads cut into 8 spans of a multiple of 8 quads)
    // and of pass 4's runs (8 threads of 8 quads, 256 columns; 2048 columns per
    // workgroup): threads with all 8 quads, with 1 to 7 of them, and with none;
    // pass 4 on the input rows (b = 1 and b = 2, with row weights) and on stored
    // means (b >= 3).
    let Some(mut gpu) = gpu() else { return };
    let n = 6;
    let widths = [
        4, 36, 124, 132, 252, 260, 1020, 1028, 2044, 2052, 2300, 4100, 8188,
    ];
    let t = random_tensors(41, n, &widths, 1.0);
    for (floor, small) in [(u64::MAX, false), (1, true), (1, false), (u64::MAX, true)] {
        gpu.set_gpu_min_tile_workgroups(Some(floor));
        // The norm pass's spans: 8 per tile of 64 threads, 1 of 8 threads.
        gpu.set_gpu_small_workgroups(Some(small));
        for b in [1, 2, 3, 6] {
            let cfg = ClipConfig::fixed(0.7, MicroBatches::Uniform(b));
            let what = format!("floor {floor} small workgroups {small} b {b}");
            check(&mut gpu, &cfg, &t, n, TOL, &what);
        }
    }
}

#[test]
fn both_pass4_kernels_at_two_rows_per_micro_batch() {
    // Pass 4 on stored means from b = 2 (a rule tests can set) and from b = 3 (the
    // default: at b = 2 it re-reads the rows with row weights): both rules on this
    // adapter, at and around b = 2, aligned and unaligned widths.
    let n = 14;
    let widths = [4100, 37, 1024];
    let t = random_tensors(43, n, &widths, 1.0);
    let mut scratch = Vec::new();
    for rows in [2, 3] {
        let Some(mut gpu) = gpu() else { return };
        gpu.set_gpu_means_min_rows(Some(rows));
        assert_eq!(gpu.gpu_means_min_rows(), Some(rows));
        for mb in [
            MicroBatches::Uniform(2),
            MicroBatches::Uniform(3),
            MicroBatches::Offsets(vec![0, 1, 4, 6, 7, 10, 14]), // 7 micro-batches, N / M = 2
            MicroBatches::Offsets(vec![0, 5, 6, 7, 8, 9, 10, 11, 14]), // N / M < 2
        ] {
            let cfg = ClipConfig::fixed(0.6, mb.clone());
            check(
                &mut gpu,
                &cfg,
                &t,
                n,
                TOL,
                &format!("min rows {rows} {mb:?}"),
            );
        }
        scratch.push(gpu.scratch_bytes());
        // Below 2 the rule stays 2 (one-row means would copy the input).
        gpu.set_gpu_means_min_rows(Some(0));
        assert_eq!(gpu.gpu_means_min_rows(), Some(2));
    }
    // Only the first rule stored means, the largest those of b = 2 (M = 7): the
    // pool holds them rounded up to 16 bytes where the other holds a 16-byte dummy.
    // Each row of means is padded to a multiple of 4 elements (37 -> 40). Both
    // ran pass 4 of the 3 tensors into one scratch row (over the means, or over
    // the input rows), so that row is in both.
    let padded: usize = widths.iter().map(|w| w.next_multiple_of(4)).sum();
    let means_b2 = 7 * padded as u64 * 4;
    assert_eq!(
        scratch[0] - scratch[1],
        means_b2.next_multiple_of(16) - 16,
        "{scratch:?}"
    );
}

#[test]
fn windows_smaller_than_a_tensor() {
    let Some(mut gpu) = gpu() else { return };
    let n = 23;
    let widths = [300, 7, 1100];
    // Magnitude 1e-30: Blue's second walk of the norm pass, in windows that carry
    // (its build for aligned rows with carries, and the one for unaligned rows).
    for (scale, seed) in [(1.0, 9), (1e-30, 10)] {
        let t = random_tensors(seed, n, &widths, scale);
        for max_binding in [1100 * 4 + 256, 3 * 1100 * 4, 8192, 50_000] {
            let what = format!("scale {scale} binding {max_binding}");
            check_windows(&mut gpu, &t, n, max_binding, &[1, 4, 5, 23], &what);
            let cfg = ClipConfig::fixed(0.3, MicroBatches::Offsets(vec![0, 1, 9, 10, 22, 23]));
            check(
                &mut gpu,
                &cfg,
                &t,
                n,
                TOL,
                &format!("scale {scale} binding {max_binding} offsets"),
            );
        }
    }
}

/// A tensor's row windows cut into row chunks together (pass 4 re-reading the
/// rows): each window into chunks of nearly equal rows, one sum of all of them
/// into the output. Windows of 9 and 20 rows in chunks of 8 (one and three per
/// window: their partial rows must fit one binding too), uniform and
/// ragged micro-batches that cross chunk and window ends (row runs at b > 1),
/// two groups, f16 rows, against the float64 reference; on one tensor the
/// dispatch count says the windows took that path (one more dispatch than
/// without chunks: the sum; each window cut on its own would add one per
/// window).
#[test]
fn row_windows_cut_into_chunks_together() {
    let Some(mut gpu) = gpu() else { return };
    gpu.set_gpu_means_min_rows(Some(u64::MAX));
    let n = 61;
    let t = random_tensors(41, n, &[1003, 6], 1.0);
    let windows = [9 * 1003 * 4 + 256, 20 * 1003 * 4 + 256];
    let batches = [
        MicroBatches::Uniform(1),
        MicroBatches::Uniform(2),
        MicroBatches::Uniform(7),
        MicroBatches::Offsets(vec![0, 1, 8, 9, 30, 33, 60, 61]),
    ];
    for (max_binding, mb) in windows
        .into_iter()
        .flat_map(|w| batches.iter().map(move |mb| (w, mb)))
    {
        gpu.set_max_binding_bytes(max_binding);
        let mut dispatches = Vec::new();
        for chunk_rows in [0, 8] {
            gpu.set_gpu_pass4_chunk_rows(Some(chunk_rows));
            let what = format!("binding {max_binding} {mb:?} chunks of {chunk_rows}");
            let cfg = ClipConfig::adaptive(1.0, mb.clone());
            check(&mut gpu, &cfg, &t[..1], n, TOL, &what);
            dispatches.push(gpu.last_gpu_dispatches().unwrap());
            let groups = ClipConfig::fixed(0.05, mb.clone()).with_groups(vec![1, 0]);
            check(&mut gpu, &groups, &t, n, TOL, &format!("{what} groups"));
            check_as(
                &mut gpu,
                &cfg,
                &t,
                n,
                TOL,
                &format!("{what} f16"),
                Dtype::F16,
            );
        }
        assert_eq!(
            dispatches[1],
            dispatches[0] + 1,
            "binding {max_binding} {mb:?}"
        );
    }
    gpu.set_gpu_pass4_chunk_rows(None);
    gpu.set_gpu_means_min_rows(None);
    gpu.set_max_binding_bytes(u64::MAX);
}

/// Means larger than one storage binding, stored as a block per tensor: each
/// norm-pass dispatch binds the rows of means its micro-batches write, pass 4
/// sums a block in windows of rows (bindings cut to one row of the widest
/// tensor, and to a few rows). Unaligned widths, ragged offsets, two groups,
/// f16 input. Narrow tensors whose dispatches would bind more means than a
/// binding holds: split dispatches, or re-read rows.
#[test]
fn means_larger_than_one_binding() {
    let Some(mut gpu) = gpu() else { return };
    let n = 60;
    let widths = [1003, 5, 300];
    let t = random_tensors(23, n, &widths, 1.0);
    let padded: usize = widths.iter().map(|d| d.next_multiple_of(4)).sum();
    // Hardware-style workgroups (64 threads) too, on the narrower binding.
    for (max_binding, small) in [
        (1004 * 4 + 256, None),
        (1004 * 4 + 256, Some(false)),
        (16384, None),
    ] {
        gpu.set_max_binding_bytes(max_binding);
        gpu.set_gpu_small_workgroups(small);
        for (b, dtype) in [
            (3, Dtype::F32),
            (4, Dtype::F16),
            (7, Dtype::F32),
            (60, Dtype::F32),
        ] {
            let m = n.div_ceil(b);
            gpu.release_scratch();
            let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(b));
            let what = format!("binding {max_binding} {small:?} b {b} {dtype}");
            check_as(&mut gpu, &cfg, &t, n, TOL, &what, dtype);
            let means_bytes = (m * padded * 4) as u64;
            if means_bytes > max_binding {
                // The means were kept (re-reading the rows takes far less).
                assert!(
                    gpu.scratch_bytes() >= means_bytes,
                    "{what}: means not stored"
                );
            }
        }
        let offsets = random_offsets(29, n, 15);
        let cfg =
            ClipConfig::fixed(0.05, MicroBatches::Offsets(offsets)).with_groups(vec![0, 1, 0]);
        check(
            &mut gpu,
            &cfg,
            &t,
            n,
            TOL,
            &format!("binding {max_binding} groups"),
        );
    }
    // 32 f16 tensors of 5 columns: their means (8 padded columns of 4 bytes a
    // row) take more bytes than their rows at b = 3, so the dispatches they share
    // are split to bind their rows of means; one such tensor cut into windows
    // would bind more means per window than one binding holds: re-read.
    gpu.set_gpu_small_workgroups(None);
    gpu.set_max_binding_bytes(8192);
    let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(3));
    let narrow = random_tensors(37, 1000, &[5], 1.0);
    check_as(
        &mut gpu,
        &cfg,
        &narrow,
        1000,
        TOL,
        "one narrow tensor",
        Dtype::F16,
    );
    let narrow = random_tensors(31, 48, &[5; 32], 1.0);
    check_as(
        &mut gpu,
        &cfg,
        &narrow,
        48,
        TOL,
        "32 narrow tensors",
        Dtype::F16,
    );
}

#[test]
fn windows_over_several_column_tiles() {
    // Rows wider than one norm tile (4096 columns), cut into windows: the carry
    // crosses tile boundaries. Tiles pinned to 4096 columns: a software adapter
    // would widen them past these rows (every_tile_width_of_the_norm_pass covers
    // windows with wide tiles).
    let Some(mut gpu) = gpu() else { return };
    gpu.set_gpu_min_tile_workgroups(Some(u64::MAX));
    let n = 11;
    let widths = [8193, 5, 4095, 4100];
    let t = random_tensors(17, n, &widths, 1.0);
    assert_eq!(gpu.gpu_tile_cols(&widths, n, 1), Some(4096));
    for max_binding in [8193 * 4 + 256, 3 * 8193 * 4] {
        let what = format!("binding {max_binding}");
        check_windows(&mut gpu, &t, n, max_binding, &[1, 3, 4, 11], &what);
    }
}

/// More micro-batches than one dispatch dimension holds on hardware (65,535
/// workgroups): the plan cuts the rows into windows of at most that many
/// micro-batches, with carries where a window cuts a micro-batch (ragged
/// offsets, bindings of fewer rows than a window). Checks the results of those
/// cuts; the limit itself is not checked here, since a dispatch past it passes on
/// lavapipe.
#[test]
fn more_micro_batches_than_workgroups_per_dimension() {
    let Some(mut gpu) = gpu() else { return };
    let n = 140_000;
    let t = random_tensors(5, n, &[3, 1], 1.0);
    for b in [1, 2, 3] {
        let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(b));
        check(&mut gpu, &cfg, &t, n, TOL, &format!("b {b}"));
    }
    // Micro-batches of 1 row, every 1000th of 7 rows, in one tensor of 20 columns.
    let t = random_tensors(7, n, &[20], 1.0);
    let mut offsets = vec![0usize];
    while *offsets.last().unwrap() < n {
        let step = if offsets.len() % 1000 == 0 { 7 } else { 1 };
        offsets.push((offsets.last().unwrap() + step).min(n));
    }
    for max_binding in [u64::MAX, 80 * 70_001 + 256, 80 * 40_001 + 256] {
        gpu.set_max_binding_bytes(max_binding);
        for layout in [
            MicroBatches::Offsets(offsets.clone()),
            MicroBatches::Uniform(3),
        ] {
            let what = format!("binding {max_binding} {layout:?}")
                .chars()
                .take(60)
                .collect::<String>();
            check(&mut gpu, &ClipConfig::fixed(0.5, layout), &t, n, TOL, &what);
        }
    }
}

/// Shapes whose loops ran past what llvmpipe allows one shader invocation
/// (65,535 iterations over all its loops, after which it silently ends them): a
/// micro-batch of 2,048 rows of 4,096 columns (the norm pass walked its tile
/// 32 steps per row, and the norms came out 92% low), 1,024 such rows of
/// values below 2^-40 or above 2^52 (walked twice), 80,000 stored means of a
/// tensor of 5 columns (pass 4 walked them once per quad: the second quad's
/// column kept 0 of its sum), and 65,535 input rows summed without row chunks
/// (the hardware default, set here). On hardware these check ordinary shapes.
#[test]
fn long_loops_stay_within_a_software_adapters_iteration_limit() {
    let Some(mut gpu) = gpu() else { return };
    let (n, d) = (2048, 4096);
    let deep = random_tensors(11, n, &[d], 1.0);
    for b in [n, 1000] {
        let cfg = ClipConfig::fixed(1e-3, MicroBatches::Uniform(b));
        check(&mut gpu, &cfg, &deep, n, TOL, &format!("deep b {b}"));
    }
    let deep16 = rounded(&deep, f16::from_f32);
    let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(n));
    check_typed(&mut gpu, &cfg, &deep16, n, TOL, "deep f16, adaptive");
    // Values outside [2^-40, 2^52] make the norm pass walk the rows twice (plain
    // squares, then Blue's scaled sums): 1,024 rows of 4,096 columns had norms
    // 93% low, and a fixed bound of 1 gave an output of norm 11.97.
    for (d, magnitude) in [(4096, 1e-14), (4095, 1e-14), (4096, 1e17), (8192, 1e-14)] {
        let n = 1024;
        let t = random_tensors(14, n, &[d], magnitude);
        let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(n));
        check(
            &mut gpu,
            &cfg,
            &t,
            n,
            TOL,
            &format!("deep x{magnitude:e} d {d}"),
        );
    }
    let n = 240_000;
    let narrow = random_tensors(12, n, &[5, 9], 1.0);
    for b in [3, 4] {
        let cfg = ClipConfig::fixed(1e-3, MicroBatches::Uniform(b));
        check(
            &mut gpu,
            &cfg,
            &narrow,
            n,
            TOL,
            &format!("many means b {b}"),
        );
    }
    gpu.set_gpu_pass4_chunk_rows(Some(0));
    let n = 65_535;
    let rows = random_tensors(13, n, &[5], 1.0);
    for b in [1, 2] {
        let cfg = ClipConfig::fixed(1e-3, MicroBatches::Uniform(b));
        check(
            &mut gpu,
            &cfg,
            &rows,
            n,
            TOL,
            &format!("no row chunks b {b}"),
        );
    }
}

/// Adaptive clipping at every uniform micro-batch size in `bs` against the
/// float64 reference, with storage bindings cut to `max_binding` bytes (so
/// tensors are read in row windows).
fn check_windows(
    gpu: &mut Clipper,
    t: &[Vec<f32>],
    n: usize,
    max_binding: u64,
    bs: &[usize],
    what: &str,
) {
    gpu.set_max_binding_bytes(max_binding);
    for &b in bs {
        let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(b));
        check(gpu, &cfg, t, n, TOL, &format!("{what} b {b}"));
    }
}

#[test]
fn random_shapes_match_float64_reference() {
    let Some(gpu) = gpu() else { return };
    run_random_cases(gpu, 64, TOL);
}

/// Every pooled buffer filled with 0xFF bytes (NaN) each time a call takes it
/// (`set_gpu_poison_scratch`): no kernel reads scratch its own call did not
/// write, which in normal use would be what an earlier call left there.
#[test]
fn no_call_reads_scratch_it_did_not_write() {
    let Some(mut gpu) = gpu() else { return };
    gpu.set_gpu_poison_scratch(true);
    run_random_cases(gpu, 64, TOL);
}

#[test]
fn large_rows_stay_accurate() {
    // D in the millions: tree/blocked accumulation keeps the f32 result within 3e-5.
    let Some(mut gpu) = gpu() else { return };
    let (n, d) = (6, 3_000_001);
    let t = random_tensors(11, n, &[d], 1.0);
    for b in [1, 4, 6] {
        check(
            &mut gpu,
            &ClipConfig::fixed(0.1, MicroBatches::Uniform(b)),
            &t,
            n,
            TOL,
            "D=3M",
        );
    }
}

#[test]
fn near_f32_max_means_and_norms() {
    let Some(mut gpu) = gpu() else { return };
    let (n, d) = (4, 1500);
    let t: Vec<f32> = (0..n * d)
        .map(|k| if k % 3 == 0 { -3.0e38 } else { 3.0e38 })
        .collect();
    // The true norms exceed f32::MAX (reported as +inf), the factors are still
    // exact. The norms are about 1.2e40: with C = 1 the factors C / norm
    // (8.6e-41) are below f32's normal range, and reach pass 4 as weight pairs
    // (clip_factors.wgsl's EXTREME_LOG2); as one f32 weight they were 0 where a
    // division result below the normal range is flushed (NVIDIA; `cargo test
    // --features emulate-ftz-division`), and the output with them.
    for cfg in [
        ClipConfig::fixed(1.0e4, MicroBatches::Uniform(2)),
        ClipConfig::fixed(1.0, MicroBatches::Uniform(2)),
        ClipConfig::fixed(1.0, MicroBatches::Uniform(1)),
        ClipConfig::fixed(1.0, MicroBatches::Uniform(4)),
        ClipConfig::adaptive(1.0, MicroBatches::Uniform(1)),
    ] {
        check(
            &mut gpu,
            &cfg,
            std::slice::from_ref(&t),
            n,
            TOL,
            "near f32::MAX",
        );
    }
    // ~3e-38, near the smallest normal. Its outputs (about 2.6e-39) are f32
    // subnormals: a GPU that flushes denormals (Vulkan allows it; NVIDIA does)
    // returns zeros there, the documented policy; elsewhere they must match the
    // reference.
    let tiny: Vec<f32> = t.iter().map(|v| v * 1e-76).collect();
    let cfg = ClipConfig::fixed(1e-37, MicroBatches::Uniform(2));
    let want = clip_f64(&cfg, &[&tiny], n).unwrap();
    let got = gpu.clip(&cfg, &[&tiny], n).unwrap();
    let below_normal = want
        .grads
        .iter()
        .flatten()
        .all(|v| v.abs() < f32::MIN_POSITIVE as f64);
    let flushed = got.grads.iter().flatten().all(|&v| v == 0.0);
    if !(below_normal && flushed) {
        assert_matches(&got, &want, 1e-4, "tiny");
    }
}

/// An adaptive scale below f32's normal range (the config accepts any finite
/// scale > 0): the bound and factors are subnormal. Before the host split the
/// scale into mantissa and exponent, lavapipe's `frexp` of the subnormal scale
/// gave bounds 60x (scale 1e-40) to 6000x (1e-45) too large, and outputs as
/// wrong, all below the common check's absolute floor (2 x f32::MIN_POSITIVE),
/// so this test checks against the subnormal quantum 2^-149 instead. A GPU that
/// flushes denormals may return 0 for each (the documented policy).
#[test]
fn subnormal_adaptive_scale() {
    let Some(mut gpu) = gpu() else { return };
    let quantum = 2f64.powi(-149);
    let (n, d) = (12, 37);
    let t = random_tensors(91, n, &[d], 1.0).remove(0);
    for scale in [1e-39f32, 1e-40, 3e-43, 1e-45] {
        let cfg = ClipConfig::adaptive(scale, MicroBatches::Uniform(2));
        let want = clip_f64(&cfg, &[&t], n).unwrap();
        let got = gpu.clip(&cfg, &[&t], n).unwrap();
        let what = format!("scale {scale:e}");
        let close = |a: f32, b: f64, quanta: f64| {
            a == 0.0 || (a as f64 - b).abs() <= 1e-5 * b.abs() + quanta * quantum
        };
        assert!(
            close(got.stats.clip_bound, want.clip_bound, 1.0),
            "{what}: bound {:e}, reference {:e}",
            got.stats.clip_bound,
            want.clip_bound
        );
        for (j, (&a, &b)) in got.stats.factors.iter().zip(&want.factors).enumerate() {
            assert!(
                close(a, b, 1.0),
                "{what}: factor[{j}] = {a:e}, reference {b:e}"
            );
        }
        // out[c] = (1/M) sum_j s_j g_j[c]: each factor off by up to a quantum
        // costs |g_j[c]| quanta, each product and the sum round once more.
        for (c, (&a, &b)) in got.grads[0].iter().zip(&want.grads[0]).enumerate() {
            let mean_abs_g = (0..n).map(|r| (t[r * d + c] as f64).abs()).sum::<f64>() / n as f64;
            assert!(
                close(a, b, mean_abs_g + 2.0),
                "{what}: out[{c}] = {a:e}, reference {b:e}"
            );
        }
        assert_eq!(
            got.stats.clipped_count, want.clipped_count,
            "{what}: clipped"
        );
    }
}

/// Micro-batch means entirely below f32's normal range under factors near or
/// beyond f32::MAX: the factor's mantissa (below 1 for a subnormal scale) made
/// C / mantissa overflow, so factors that fit and terms s_j g_j that fit came
/// out inf (a review, twenty-fifth session). Both backends; a GPU that flushes
/// denormals reads these rows as zero (the documented policy) and is skipped,
/// and so is the GPU under `emulate-ftz-division`, which flushes the divisions'
/// subnormal operands but not the loads and sums that make them (no real GPU
/// does one without the other).
#[test]
fn subnormal_means_under_huge_factors() {
    let rows = vec![vec![5e-39f32, 6e-39, 7e-39, 1.0, 1.0, 1.0]];
    let one_col = vec![vec![5e-39f32, 1.0]];
    let auto = ClipFunction::Automatic { gamma: 1.0 };
    let cases = [
        (ClipFunction::Normalize, 3e38f32, &rows),
        (auto, 3e38, &rows),
        (ClipFunction::Normalize, 1e38, &one_col),
        (ClipFunction::Normalize, 1.0, &one_col),
        (auto, 1e38, &one_col),
    ];
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let mut gpu = gpu().filter(|_| !cfg!(feature = "emulate-ftz-division"));
    for (function, c, t) in cases {
        let cfg = ClipConfig::fixed(c, MicroBatches::Uniform(1)).with_function(function);
        let what = format!("{function:?}, C = {c:e}, {} cols", t[0].len() / 2);
        check(&mut cpu, &cfg, t, 2, 1e-5, &format!("cpu: {what}"));
        if let Some(gpu) = gpu.as_mut() {
            let flushed = gpu.clip(&cfg, &slices(t), 2).unwrap().stats.norms[0] == 0.0;
            if !flushed {
                check(gpu, &cfg, t, 2, 1e-5, &format!("gpu: {what}"));
            }
        }
    }
}

/// Factors and weights beyond f32's range: Normalize and AUTO-S on a micro-batch
/// whose mean is tiny (C / norm = 1e40 overflowed f32 as one weight, and inf * 0
/// made the whole group's zero columns NaN), and Hard clipping of a huge
/// micro-batch among many (weight 1e-36 / 1024: subnormal as one f32, 0 on a GPU
/// that flushes denormals; lavapipe keeps them, so only the first half fails
/// there without the weight pairs). Every
/// path of pass 4: b = 1 (the rows are the means), 2 (rows re-read with row
/// weights) and 4 (stored means).
#[test]
fn weights_beyond_f32_range() {
    let Some(mut gpu) = gpu() else { return };
    let d = 300;
    for b in [1, 2, 4] {
        let n = 4 * b;
        let mut t = random_tensors(70 + b as u64, n, &[d], 1.0).remove(0);
        // Micro-batch 1: 1e-37 in column 0, zeros elsewhere.
        for r in b..2 * b {
            t[r * d..(r + 1) * d].fill(0.0);
            t[r * d] = 1e-37;
        }
        for function in [
            ClipFunction::Normalize,
            ClipFunction::Automatic { gamma: 1e-3 },
        ] {
            let cfg = ClipConfig::fixed(1000.0, MicroBatches::Uniform(b)).with_function(function);
            check(
                &mut gpu,
                &cfg,
                std::slice::from_ref(&t),
                n,
                TOL,
                &format!("b {b} {function:?}, a mean of norm 1e-37"),
            );
        }
    }
    // Propagate with parameter groups: the finite group of a micro-batch that is
    // non-finite in the other group is weighted like any other (its pair too).
    for b in [1, 2, 4] {
        let n = 4 * b;
        let d = 50;
        let mut a = random_tensors(90 + b as u64, n, &[d], 1.0).remove(0);
        let mut tiny = random_tensors(95 + b as u64, n, &[d], 1.0).remove(0);
        a[3] = f32::NAN; // micro-batch 0, group 0
        for r in 0..b {
            tiny[r * d..(r + 1) * d].fill(0.0);
            tiny[r * d] = 1e-37; // micro-batch 0, group 1
        }
        let cfg = ClipConfig::fixed(1000.0, MicroBatches::Uniform(b))
            .with_function(ClipFunction::Normalize)
            .with_groups(vec![0, 1])
            .with_non_finite(NonFinitePolicy::Propagate);
        check(
            &mut gpu,
            &cfg,
            &[a, tiny],
            n,
            TOL,
            &format!("b {b} Propagate, groups: NaN in one, a mean of norm 1e-37 in the other"),
        );
    }
    for b in [1, 2, 4] {
        let n = 1024 * b;
        let mut t = random_tensors(80 + b as u64, n, &[7], 1.0).remove(0);
        // Micro-batch 5 has norm about 1e36: its weight C / (norm M) is 1e-39.
        for v in &mut t[5 * b * 7..6 * b * 7] {
            *v *= 1e36;
        }
        let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(b));
        check(
            &mut gpu,
            &cfg,
            std::slice::from_ref(&t),
            n,
            TOL,
            &format!("b {b}, a micro-batch of norm 1e36 among 1024"),
        );
    }
}

#[test]
fn mixed_magnitudes_in_one_tile() {
    // Every class of the one-pass scaled sum of squares in the same tile: big
    // (> 2^52), medium and small (< 2^-63) means, and each pair without the third;
    // then neighbouring classes straddling 2^52 and 2^-63, where the smaller
    // class carries a visible share of the norm (a dropped class term passed
    // the others: mutation testing, twenty-fifth session).
    let Some(mut gpu) = gpu() else { return };
    let (n, d) = (4, 5000);
    let classes: [&[f32]; 6] = [
        &[1e30, 1.0, 1e-30],
        &[1e20, 3.0],
        &[2.0, 1e-25],
        &[1e-35, 1e-20],
        &[2e16, 2e15],
        &[4e-19, 4e-20],
    ];
    for (k, mags) in classes.iter().enumerate() {
        let base = random_tensors(40 + k as u64, n, &[d], 1.0).remove(0);
        let t: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(i, v)| v * mags[(i % d) % mags.len()])
            .collect();
        for cfg in [
            ClipConfig::adaptive(1.0, MicroBatches::Uniform(1)),
            ClipConfig::fixed(1.0, MicroBatches::Uniform(2)),
            ClipConfig::fixed(1.0, MicroBatches::Uniform(4)),
        ] {
            check(
                &mut gpu,
                &cfg,
                std::slice::from_ref(&t),
                n,
                TOL,
                &format!("mixed {mags:?}, {:?}", cfg.micro_batches),
            );
        }
    }
}

#[test]
fn deep_micro_batches_walk_in_chunks() {
    // Micro-batches of more than 32 rows whose means are stored: on a software
    // adapter the norm pass walks them in chunks of 32 rows (CHUNK_ROWS), the
    // running totals kept in the means; 100 rows = 3 chunks and 4 rows, 64 = 2
    // whole chunks, 33 = one and a row; ragged offsets put 67 rows (2 chunks and
    // 3) next to 3 and 30. Aligned, unaligned and narrow tensors, f32 and 16-bit,
    // magnitude 1e-30 for Blue's second walk; both lane mappings and tile widths
    // (small workgroups take the chunked variant on any adapter); f16 with the
    // adapter's default decode and with the integer one (with small workgroups
    // the default is unpack2x16float where the device compiles it). The chunked
    // norms have the bits of the same walk without stored means (no chunks).
    let Some(mut gpu) = gpu() else { return };
    let n = 100;
    let layouts = [
        MicroBatches::Uniform(100),
        MicroBatches::Uniform(64),
        MicroBatches::Uniform(33),
        MicroBatches::Offsets(vec![0, 3, 70, 100]),
    ];
    let norm_bits = |o: ClipOutput| {
        o.stats
            .norms
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    for (scale, dtype, f16_unpack) in [
        (1.0, Dtype::F32, None),
        (1e-30, Dtype::F32, None),
        (0.5, Dtype::F16, None),
        (0.5, Dtype::F16, Some(false)),
        (1.0, Dtype::Bf16, None),
    ] {
        let t = random_tensors(77, n, &[4100, 4101, 9, 1], scale);
        gpu.set_gpu_f16_unpack(f16_unpack);
        // (The integer decode is the hardware shapes' default: covered above.)
        let shapes = if f16_unpack.is_some() { 1 } else { 2 };
        for hardware in [false, true].into_iter().take(shapes) {
            gpu.set_gpu_small_workgroups(Some(!hardware));
            gpu.set_gpu_min_tile_workgroups(hardware.then_some(u64::MAX));
            let unpack = gpu.gpu_f16_unpack();
            for layout in &layouts {
                let cfg = ClipConfig::fixed(0.3 * scale, layout.clone());
                let what = format!(
                    "scale {scale} {dtype:?} unpack {unpack:?} hardware {hardware} {layout:?}"
                );
                check_as(&mut gpu, &cfg, &t, n, TOL, &what, dtype);
                if dtype == Dtype::F32 {
                    let chunked = norm_bits(gpu.clip(&cfg, &slices(&t), n).unwrap());
                    gpu.set_gpu_means_min_rows(Some(1 << 20));
                    let plain = norm_bits(gpu.clip(&cfg, &slices(&t), n).unwrap());
                    gpu.set_gpu_means_min_rows(None);
                    assert_eq!(
                        chunked, plain,
                        "{what}: norms with and without stored means"
                    );
                }
            }
        }
    }
    gpu.set_gpu_small_workgroups(None);
    gpu.set_gpu_min_tile_workgroups(None);
    gpu.set_gpu_f16_unpack(None);
}

fn with_non_finite(n: usize, widths: &[usize]) -> Vec<Vec<f32>> {
    let mut t = random_tensors(5, n, widths, 1.0);
    let d1 = widths[1];
    t[0][widths[0] + 2] = f32::NAN; // row 1: micro-batch 0 (b = 2)
    t[1][2 * d1 + d1 - 1] = f32::INFINITY; // row 2: micro-batch 1
    t[1][4 * d1] = f32::INFINITY; // rows 4 and 5, same column: +inf - inf = NaN, micro-batch 2
    t[1][5 * d1] = f32::NEG_INFINITY;
    t
}

#[test]
fn non_finite_policies() {
    let Some(mut gpu) = gpu() else { return };
    let (n, widths) = (11, [5usize, 1030]);
    let t = with_non_finite(n, &widths);
    for bound in [
        ClipConfig::fixed(0.2, MicroBatches::Uniform(2)),
        ClipConfig::adaptive(1.0, MicroBatches::Uniform(2)),
    ] {
        for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Propagate] {
            let cfg = bound.clone().with_non_finite(policy);
            check(&mut gpu, &cfg, &t, n, TOL, &format!("{cfg:?}"));
        }
        let cfg = bound.clone().with_non_finite(NonFinitePolicy::Error);
        let err = gpu.clip(&cfg, &slices(&t), n).unwrap_err();
        assert_eq!(
            err,
            ClipError::NonFinite {
                micro_batch: 0,
                count: 3
            }
        );
        assert_eq!(clip_f64(&cfg, &slices(&t), n).unwrap_err(), err);
    }
    // Micro-batches of 3 and 4 rows: pass 4 reads the materialised means.
    for b in [3, 4] {
        for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Propagate] {
            let cfg = ClipConfig::fixed(0.2, MicroBatches::Uniform(b)).with_non_finite(policy);
            check(&mut gpu, &cfg, &t, n, TOL, &format!("{cfg:?}"));
        }
    }
    // Every micro-batch non-finite: adaptive bound is NaN, Skip gives zeros.
    let all_nan = vec![f32::NAN; 4 * 3];
    let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(2));
    let out = gpu.clip(&cfg, &[&all_nan], 4).unwrap();
    assert!(out.stats.clip_bound.is_nan());
    assert_eq!(out.grads[0], vec![0.0; 3]);
    assert_eq!(out.stats.nonfinite_count, 2);
}

#[test]
fn factor_edge_cases_match_the_reference() {
    let Some(mut gpu) = gpu() else { return };
    for (what, cfg, t, n) in factor_edge_cases() {
        check(&mut gpu, &cfg, &t, n, TOL, &what);
    }
}

#[test]
fn rows_that_cancel_with_stored_means() {
    // Means stored from 2 rows on: pass 1 sums each micro-batch's rows first.
    let Some(mut gpu) = gpu() else { return };
    gpu.set_gpu_means_min_rows(Some(2));
    for (what, cfg, t, n) in cancelling_rows_cases() {
        check(&mut gpu, &cfg, &t, n, TOL, &what);
    }
}

#[test]
fn rows_that_cancel_when_pass4_rereads_the_rows() {
    // Row runs: each micro-batch's rows summed before its weight scales them,
    // in one walk over the rows or in chunks of 2 rows, with either kernel shape.
    let Some(mut gpu) = gpu() else { return };
    gpu.set_gpu_means_min_rows(Some(u64::MAX));
    for small in [false, true] {
        gpu.set_gpu_small_workgroups(Some(small));
        for chunk in [0, 2] {
            gpu.set_gpu_pass4_chunk_rows(Some(chunk));
            for (what, cfg, t, n) in cancelling_rows_cases() {
                let what = format!("small {small} chunk rows {chunk}: {what}");
                check(&mut gpu, &cfg, &t, n, TOL, &what);
            }
            // Runs longer than ROW_BLOCK rows, and ragged ones, on random rows.
            let t = random_tensors(31, 45, &[4101, 7], 1.0);
            for mb in [
                MicroBatches::Uniform(20),
                MicroBatches::Offsets(vec![0, 1, 19, 21, 45]),
            ] {
                let cfg = ClipConfig::fixed(0.05, mb.clone());
                let what = format!("small {small} chunk rows {chunk}: {mb:?}");
                check(&mut gpu, &cfg, &t, 45, TOL, &what);
            }
        }
    }
}

/// Pass 4's row chunks end between micro-batches where one ends near the even
/// cut: 70 rows of two-row micro-batches in chunks of 32 would be cut at row 35,
/// inside micro-batch 17, whose rows (about 1e10) cancel to a small mean. Cut
/// there, its halves would each be scaled and added to the other micro-batches'
/// terms in f32 and swamp them (most outputs were 0 before the cuts moved).
#[test]
fn rows_that_cancel_where_an_even_chunk_cut_would_fall() {
    let Some(mut gpu) = gpu() else { return };
    let n = 70;
    let widths = [583, 9];
    let mut t = random_tensors(34, n, &widths, 1.0);
    let big = random_tensors(35, 1, &widths, 1e10);
    let small = random_tensors(36, 1, &widths, 1.0);
    for ((x, &d), (big, small)) in t.iter_mut().zip(&widths).zip(big.iter().zip(&small)) {
        for c in 0..d {
            x[34 * d + c] = big[c];
            x[35 * d + c] = -big[c] + small[c] * 1e5;
        }
    }
    // One- and two-row micro-batches, [34, 36) among them (means not stored).
    let ragged: Vec<usize> = (0..n).filter(|r| r % 3 != 2).chain([n]).collect();
    assert!(ragged.contains(&34) && ragged.contains(&36) && !ragged.contains(&35));
    for mb in [MicroBatches::Uniform(2), MicroBatches::Offsets(ragged)] {
        for chunk in [None, Some(32)] {
            gpu.set_gpu_pass4_chunk_rows(chunk);
            let cfg = ClipConfig::fixed(1e6, mb.clone());
            check(
                &mut gpu,
                &cfg,
                &t,
                n,
                TOL,
                &format!("{mb:?}, chunk rows {chunk:?}"),
            );
        }
    }
}

#[test]
fn same_input_gives_bitwise_same_output() {
    let Some(mut gpu) = gpu() else { return };
    let t = random_tensors(3, 40, &[5000, 33], 1.0);
    let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(3));
    let bits = |o: &ClipOutput| -> Vec<u32> {
        o.grads
            .iter()
            .flatten()
            .chain(&o.stats.norms)
            .map(|v| v.to_bits())
            .collect()
    };
    let a = gpu.clip(&cfg, &slices(&t), 40).unwrap();
    let b = gpu.clip(&cfg, &slices(&t), 40).unwrap();
    assert_eq!(bits(&a), bits(&b));
    // Released scratch is allocated again, with the same bits.
    let kept = gpu.scratch_bytes();
    assert!(kept > 0);
    gpu.release_scratch();
    assert_eq!(gpu.scratch_bytes(), 0);
    let c = gpu.clip(&cfg, &slices(&t), 40).unwrap();
    assert_eq!(bits(&a), bits(&c));
    assert_eq!(gpu.scratch_bytes(), kept);
}

#[test]
fn vec4_and_scalar_loads_give_the_same_bits() {
    // The same rows at every element offset: with cols % 4 == 0 at offset 0 they are
    // loaded as vec4; otherwise as scalars when the buffer ends with the rows (no
    // whole quad past them), and with small workgroups as aligned quads shifted into
    // place when elements follow them (rows shifted by 1, 2 or 3 elements; with
    // cols % 4 != 0 the shift changes from row to row). Magnitude 1e-30 takes Blue's
    // second walk of the norm pass. The aligned placement runs the norm pass's
    // build for aligned rows (vec4 loads in Blue's walk too), the others the build
    // with shifted and scalar walks (scalar loads in Blue's walk).
    let Some(mut gpu) = gpu() else { return };
    let device = gpu.device().unwrap().clone();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    // (pad elements before the rows, elements after them)
    let placements = [(0usize, 0usize), (1, 0), (1, 3), (2, 3), (3, 8), (2, 0)];
    // b = 3: pass 4 reads stored means; b = 1, 2: it reads the rows, all at once
    // and in row chunks of 3 (the chunk pipeline's loads). Both lane mappings of
    // the norm pass (small workgroups: adjacent quads). b = 70 (n = 70): the norm
    // pass walks its rows in chunks with small workgroups. n = 40 with the means
    // never stored: pass 4 re-reads rows in runs, 20 micro-batches of 2 (past
    // ROW_BLOCK = 16 micro-batches) and 2 of 20 rows (runs past ROW_BLOCK rows),
    // also in chunks of 3 rows that cut the runs.
    let runs: [(usize, &[(usize, bool)]); 3] = [
        (
            10,
            &[
                (1, true),
                (2, true),
                (3, true),
                (1, false),
                (2, false),
                (3, false),
            ],
        ),
        (70, &[(70, true), (70, false)]),
        (40, &[(2, true), (20, true), (2, false), (20, false)]),
    ];
    for ((d, scale), (n, bs)) in [(4100, 1.0), (4100, 1e-30), (4101, 1.0), (4101, 1e-30)]
        .into_iter()
        .flat_map(|shape| runs.iter().map(move |&run| (shape, run)))
    {
        let t = random_tensors(23, n, &[d], scale).remove(0);
        let reread = n == 40;
        gpu.set_gpu_means_min_rows(if reread { Some(u64::MAX) } else { None });
        for (&(b, small), chunk_rows) in bs.iter().flat_map(|r| [(r, 0), (r, 3)]) {
            if chunk_rows > 0 && b > 2 && !reread {
                continue;
            }
            gpu.set_gpu_small_workgroups(Some(small));
            gpu.set_gpu_pass4_chunk_rows(Some(chunk_rows));
            let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(b));
            let mut results = Vec::new();
            for (pad, tail) in placements {
                let mut data = vec![0.0f32; pad];
                data.extend_from_slice(&t);
                // NaN past the rows: read by a shifted load, never taken.
                data.extend(std::iter::repeat_n(f32::NAN, tail));
                let input = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(&data),
                    usage,
                });
                let inputs = [GpuTensor::new(&input, pad as u64 * 4, d)];
                let (bufs, stats) = gpu.clip_buffers(&cfg, &inputs, n).unwrap();
                let out = read_buffer(&gpu, &bufs[0], 0, d);
                let bits: Vec<u32> = out
                    .iter()
                    .chain(&stats.norms)
                    .map(|v| v.to_bits())
                    .collect();
                results.push(bits);
            }
            for (k, r) in results.iter().enumerate().skip(1) {
                assert_eq!(
                    &results[0], r,
                    "d {d} scale {scale} b {b} small {small} chunks of {chunk_rows}: placement {:?}",
                    placements[k]
                );
            }
        }
    }
    gpu.set_gpu_small_workgroups(None);
    gpu.set_gpu_pass4_chunk_rows(None);
    gpu.set_gpu_means_min_rows(None);
}

#[test]
fn caller_buffers_with_offsets_and_poisoned_outputs() {
    let Some(mut gpu) = gpu() else { return };
    let (n, widths) = (9, [700usize, 3, 1500]);
    let t = random_tensors(21, n, &widths, 1.0);
    let device = gpu.device().unwrap().clone();
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    // Tensors 0 and 1 share one buffer: tensor 1 starts 12 bytes after tensor 0 ends.
    let mut packed: Vec<f32> = t[0].clone();
    packed.extend_from_slice(&[7.0; 3]);
    packed.extend_from_slice(&t[1]);
    let shared = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&packed),
        usage,
    });
    let mut padded = vec![5.0f32; 33]; // tensor 2 at byte offset 132 (not 256-aligned)
    padded.extend_from_slice(&t[2]);
    let own = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&padded),
        usage,
    });
    let inputs = [
        GpuTensor::new(&shared, 0, widths[0]),
        GpuTensor::new(&shared, (n * widths[0] + 3) as u64 * 4, widths[1]),
        GpuTensor::new(&own, 132, widths[2]),
    ];
    let total: usize = widths.iter().sum::<usize>() + 10;
    let poison = vec![f32::NAN; total];
    // With COPY_DST pass 4 runs once over all tensors' stored means (b = 3) and
    // copies each tensor's columns into its output; without, once per tensor.
    let out_with_copies = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&poison),
        usage,
    });
    let out_without_copies = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&poison),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    });
    let at = [4usize, 4 + widths[0] + 1, 4 + widths[0] + 1 + widths[1] + 2];
    for out in [&out_with_copies, &out_without_copies] {
        let outputs: Vec<GpuTensorMut<'_>> = (0..3)
            .map(|p| GpuTensorMut {
                buffer: out,
                offset: at[p] as u64 * 4,
                cols: widths[p],
            })
            .collect();
        // b = 2 re-reads the rows in pass 4, b = 3 reads materialised means.
        for (b, max_binding) in [(2, u64::MAX), (2, 6000 * 4), (3, u64::MAX), (3, 6000 * 4)] {
            let cfg = ClipConfig::fixed(0.4, MicroBatches::Uniform(b));
            let want = clip_f64(&cfg, &slices(&t), n).unwrap();
            gpu.set_max_binding_bytes(max_binding);
            let stats = gpu.clip_buffers_into(&cfg, &inputs, n, &outputs).unwrap();
            let all = read_buffer(&gpu, out, 0, total);
            let grads: Vec<Vec<f32>> = (0..3)
                .map(|p| all[at[p]..at[p] + widths[p]].to_vec())
                .collect();
            assert_matches(&ClipOutput { grads, stats }, &want, TOL, "caller buffers");
            // Bytes between the outputs are untouched.
            for k in [0, 1, 2, 3, at[1] - 1, at[2] - 1, at[2] - 2, total - 1] {
                assert!(all[k].is_nan(), "byte range {k} overwritten");
            }
            // Buffers the clipper returns.
            let out = clip_buffers_read(&mut gpu, &cfg, &inputs, n);
            assert_matches(&out, &want, TOL, "returned buffers");
        }
    }
}

/// Found by the random test: an adaptive AUTO-S bound beyond `f32::MAX` (scale 2 on
/// norms near 2.9e38) must still give the finite factors `C / (norm + gamma)`.
#[test]
fn automatic_clipping_with_a_bound_beyond_f32_max() {
    let Some(mut gpu) = gpu() else { return };
    let n = 4;
    let t = random_tensors(13461045567923405046, n, &[22, 4097, 3072, 1], 1e36);
    let cfg = ClipConfig::adaptive(1.9968778, MicroBatches::Uniform(2))
        .with_function(ClipFunction::Automatic { gamma: 0.001 });
    check(&mut gpu, &cfg, &t, n, 3e-5, "AUTO-S, bound 5.7e38");
    // A zero noise multiplier on that infinite-in-f32 total bound adds exactly 0.
    let cfg = cfg.with_noise(microclip::GaussianNoise {
        multiplier: 0.0,
        seed: 1,
        step: 2,
    });
    check(&mut gpu, &cfg, &t, n, 3e-5, "AUTO-S, bound 5.7e38, sigma 0");
}

/// AUTO-S where `norm + gamma` does not fit f32 (found by a review): a norm or
/// gamma near `f32::MAX` made the sum overflow and the factor 0 (the micro-batch
/// dropped; 0 against 0.75 for `x = 3e38`, `C = 3e38`, `gamma = 1e38`), and a norm
/// beyond `f32::MAX` left gamma out (0.199 against 0.119 for three elements of
/// 2.9e38, `C = 1e38`, `gamma = f32::MAX`).
#[test]
fn automatic_clipping_where_norm_plus_gamma_overflows() {
    let Some(mut gpu) = gpu() else { return };
    let auto = |gamma: f32| ClipFunction::Automatic { gamma };
    let one = |c: f32| ClipConfig::fixed(c, MicroBatches::Uniform(1));
    let cases = [
        (vec![vec![3e38f32]], 1, one(3e38).with_function(auto(1e38))),
        (
            vec![vec![3e38f32]],
            1,
            one(1.0).with_function(auto(f32::MAX)),
        ),
        (
            vec![vec![2.9e38f32; 3]],
            1,
            one(1e38).with_function(auto(f32::MAX)),
        ),
        (
            vec![vec![3e38f32, 1e38, -2e38, 5e37]],
            2,
            ClipConfig::adaptive(1.0, MicroBatches::Uniform(1)).with_function(auto(3e38)),
        ),
    ];
    for (k, (t, n, cfg)) in cases.iter().enumerate() {
        check(&mut gpu, cfg, t, *n, 3e-5, &format!("case {k}"));
    }
    // Random rows near f32::MAX, norms from below to far beyond it.
    let n = 6;
    let t = random_tensors(7, n, &[3, 1, 70], 1e37);
    for (c, gamma) in [(1e38, 1e38), (3e38, f32::MAX), (1.0, 3e38)] {
        let cfg = ClipConfig::fixed(c, MicroBatches::Uniform(2)).with_function(auto(gamma));
        check(
            &mut gpu,
            &cfg,
            &t,
            n,
            3e-5,
            &format!("C {c}, gamma {gamma}"),
        );
    }
    let cfg = ClipConfig::adaptive(0.5, MicroBatches::Uniform(3)).with_function(auto(f32::MAX));
    check(&mut gpu, &cfg, &t, n, 3e-5, "adaptive, gamma f32::MAX");
}

/// Many tensors in one caller buffer (more than one norm-pass table of 32), at
/// offsets that leave some rows 16-byte aligned and some not, with widths from 1
/// to two tiles: tensors of one buffer share the norm pass's dispatches. With a
/// small binding limit the shared dispatches split and the widest tensors are cut
/// into row windows between them.
#[test]
fn many_tensors_in_one_buffer() {
    let Some(mut gpu) = gpu() else { return };
    let n = 11;
    let widths: Vec<usize> = (0..70)
        .map(|p| match p % 10 {
            3 => 4100,
            7 => 8193,
            k => 1 + (p * 7 + k) % 40,
        })
        .collect();
    let t = random_tensors(31, n, &widths, 1.0);
    // Tensor p starts p % 4 floats after the previous one ends.
    let mut packed: Vec<f32> = Vec::new();
    let mut at = Vec::new();
    for (p, x) in t.iter().enumerate() {
        packed.extend(std::iter::repeat_n(f32::NAN, p % 4));
        at.push(packed.len() as u64 * 4);
        packed.extend_from_slice(x);
    }
    let device = gpu.device().unwrap().clone();
    let input = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&packed),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let inputs: Vec<GpuTensor<'_>> = widths
        .iter()
        .zip(&at)
        .map(|(&d, &at)| GpuTensor::new(&input, at, d))
        .collect();
    let groups: Vec<usize> = (0..widths.len()).map(|p| (p * 5) % 3).collect();
    let configs = [
        ClipConfig::fixed(0.3, MicroBatches::Uniform(1)),
        ClipConfig::adaptive(1.0, MicroBatches::Uniform(3)),
        ClipConfig::fixed(0.5, MicroBatches::Uniform(n)),
        ClipConfig::fixed(0.4, MicroBatches::Offsets(vec![0, 1, 5, 6, 11])).with_groups(groups),
    ];
    for max_binding in [u64::MAX, 40_000] {
        gpu.set_max_binding_bytes(max_binding);
        for cfg in &configs {
            let want = clip_f64(cfg, &slices(&t), n).unwrap();
            let out = clip_buffers_read(&mut gpu, cfg, &inputs, n);
            let what = format!("{:?}, binding {max_binding}", cfg.micro_batches);
            assert_matches(&out, &want, TOL, &what);
        }
    }
}

/// Tensors each in its own caller buffer (some pairs sharing one), at offsets
/// that leave some rows 16-byte aligned and some not, f32, f16 and bf16: where
/// the device allows the kernels' slots variants, up to 8 buffers share a norm-pass
/// dispatch (and, re-reading rows at b <= 2, a pass-4 one), so the call records
/// fewer dispatches than there are buffers, with the same bits as one dispatch
/// per buffer; both match the float64 reference. With a small binding limit the
/// widest tensors are cut into row windows (dispatches of their own).
#[test]
fn tensors_in_many_buffers_share_dispatches() {
    let Some(mut gpu) = gpu() else { return };
    let device = gpu.device().unwrap().clone();
    let slots = device.limits().max_storage_buffers_per_shader_stage >= 21;
    let n = 10;
    let widths: Vec<usize> = (0..45)
        .map(|p| match p % 9 {
            2 => 4100,
            5 => 64,
            k => 1 + (p * 5 + k) % 37,
        })
        .collect();
    // Tensors p % 5 = 3 are bf16, p % 5 = 4 f16 (the reference gets their
    // rounded values).
    let dtype = |p: usize| [Dtype::F32, Dtype::F32, Dtype::F32, Dtype::Bf16, Dtype::F16][p % 5];
    // Each tensor's values (as the reference sees them) and its bytes.
    let (t, bytes): (Vec<Vec<f32>>, Vec<Vec<u8>>) = random_tensors(77, n, &widths, 1.0)
        .into_iter()
        .enumerate()
        .map(|(p, x)| as_dtype(x, dtype(p)))
        .unzip();
    // Tensor p at byte 4 * (p % 3) of its buffer; tensors 2k and 2k + 1 (k < 4)
    // share a buffer, the second one word after the first ends.
    let mut contents: Vec<Vec<u8>> = Vec::new();
    let mut place = Vec::new(); // (buffer, byte offset) per tensor
    for (p, rows) in bytes.iter().enumerate() {
        let shares = p < 8 && p % 2 == 1;
        if !shares {
            contents.push(vec![0xff; 4 * (p % 3)]); // NaN words before the rows
        }
        let index = contents.len() - 1;
        let buffer = &mut contents[index];
        if shares {
            buffer.resize(buffer.len().next_multiple_of(4) + 4, 0xff);
        }
        place.push((index, buffer.len() as u64));
        buffer.extend(rows);
    }
    let buffers: Vec<wgpu::Buffer> = contents
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.resize(c.len().next_multiple_of(4), 0xff);
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: &c,
                usage: wgpu::BufferUsages::STORAGE,
            })
        })
        .collect();
    let inputs: Vec<GpuTensor<'_>> = (0..widths.len())
        .map(|p| GpuTensor::new(&buffers[place[p].0], place[p].1, widths[p]).with_dtype(dtype(p)))
        .collect();
    let groups: Vec<usize> = (0..widths.len()).map(|p| (p * 7) % 3).collect();
    let configs = [
        ClipConfig::fixed(0.3, MicroBatches::Uniform(1)),
        ClipConfig::adaptive(1.0, MicroBatches::Uniform(2)),
        ClipConfig::fixed(0.4, MicroBatches::Uniform(3)),
        // Stored means (4 rows per micro-batch on average, from 3).
        ClipConfig::adaptive(1.0, MicroBatches::Uniform(4)),
        ClipConfig::fixed(0.5, MicroBatches::Uniform(n)),
        ClipConfig::fixed(0.4, MicroBatches::Offsets(vec![0, 1, 3, 4, 10])).with_groups(groups),
    ];
    for max_binding in [u64::MAX, 60_000] {
        gpu.set_max_binding_bytes(max_binding);
        for cfg in &configs {
            let what = format!("{:?}, binding {max_binding}", cfg.micro_batches);
            let want = clip_f64(cfg, &slices(&t), n).unwrap();
            let mut runs = Vec::new();
            for on in [true, false] {
                gpu.set_gpu_buffer_slots(Some(on));
                assert_eq!(gpu.gpu_buffer_slots(), Some(on && slots));
                let out = clip_buffers_read(&mut gpu, cfg, &inputs, n);
                assert_matches(&out, &want, TOL, &format!("{what}, slots {on}"));
                runs.push((out, gpu.last_gpu_dispatches().unwrap()));
            }
            let [(with, shared), (without, apart)] = [runs[0].clone(), runs[1].clone()];
            assert_eq!(with, without, "{what}: slots changed the result");
            // Each buffer takes at least one norm-pass dispatch without slots.
            assert!(apart > buffers.len(), "{what}: {apart} dispatches");
            if slots {
                assert!(
                    shared + buffers.len() / 2 < apart,
                    "{what}: {shared} dispatches with slots, {apart} without"
                );
            }
        }
    }
    gpu.set_gpu_buffer_slots(None);
}

#[test]
fn timed_calls_give_the_same_bits_and_a_device_time() {
    let Some(mut gpu) = gpu() else { return };
    let device = gpu.device().unwrap().clone();
    let has_timestamps = device.features().contains(wgpu::Features::TIMESTAMP_QUERY);
    let (n, widths) = (12, [300, 7]);
    let t = random_tensors(9, n, &widths, 1.0);
    let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(5));
    let untimed = gpu.clip(&cfg, &slices(&t), n).unwrap();
    assert_eq!(gpu.last_gpu_time(), None);
    // Timing is on exactly where the device has timestamp queries.
    assert_eq!(gpu.set_gpu_timing(true), has_timestamps);
    let timed = gpu.clip(&cfg, &slices(&t), n).unwrap();
    assert_eq!(timed, untimed, "timing changed the result");
    let positive = |t: Option<std::time::Duration>| {
        t.is_some_and(|t| t > std::time::Duration::ZERO && t < std::time::Duration::from_secs(10))
    };
    assert_eq!(positive(gpu.last_gpu_time()), has_timestamps, "host path");
    // The device path (inputs in buffers, clip_buffers -> clip_buffers_into) is timed too.
    let inputs: Vec<wgpu::Buffer> = t
        .iter()
        .map(|x| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(x),
                usage: wgpu::BufferUsages::STORAGE,
            })
        })
        .collect();
    let ins: Vec<GpuTensor<'_>> = inputs
        .iter()
        .zip(widths)
        .map(|(b, d)| GpuTensor::new(b, 0, d))
        .collect();
    let (_, stats) = gpu.clip_buffers(&cfg, &ins, n).unwrap();
    assert_eq!(stats, untimed.stats);
    assert_eq!(positive(gpu.last_gpu_time()), has_timestamps, "device path");
    // A call that fails leaves no time behind: before the pass (b = 0), or after
    // it (a NaN under NonFinitePolicy::Error).
    // Nor dispatch counts from the call before it.
    assert!(gpu.last_gpu_dispatches().unwrap() > 0);
    let bad = ClipConfig::fixed(0.5, MicroBatches::Uniform(0));
    assert!(gpu.clip(&bad, &slices(&t), n).is_err());
    assert_eq!(gpu.last_gpu_time(), None);
    assert_eq!(gpu.last_gpu_dispatches(), Some(0));
    assert_eq!(gpu.last_gpu_oct_dispatches(), Some(0));
    gpu.clip(&cfg, &slices(&t), n).unwrap();
    let mut nan = t.clone();
    nan[1][3] = f32::NAN;
    let strict = cfg.clone().with_non_finite(NonFinitePolicy::Error);
    assert!(gpu.clip(&strict, &slices(&nan), n).is_err());
    assert_eq!(gpu.last_gpu_time(), None);
    // Off again: no time, same bits.
    assert!(!gpu.set_gpu_timing(false));
    assert_eq!(gpu.clip(&cfg, &slices(&t), n).unwrap(), untimed);
    assert_eq!(gpu.last_gpu_time(), None);
}

/// The last pass over input rows (b <= 2) cut into row chunks (partial rows,
/// then their sum; `Clipper::set_gpu_pass4_chunk_rows`) against the float64
/// reference: one tensor and several (which share that pass's dispatches),
/// uniform and ragged micro-batches, parameter groups, non-finite rows under
/// both policies, row windows, f16 input, and more chunks than one dispatch's
/// table holds (5-row chunks of 200 rows). Chunking adds dispatches.
#[test]
fn last_pass_in_row_chunks() {
    let Some(mut gpu) = gpu() else { return };
    let n = 200;
    let widths = [4100, 7, 33, 1];
    let mut t = random_tensors(91, n, &widths, 1.0);
    // Row 77 of the first tensor non-finite.
    t[0][77 * 4100 + 5] = f32::NAN;
    let one = vec![t[0].clone()];
    let groups = vec![1, 0, 1, 0];
    let configs = [
        ClipConfig::fixed(0.3, MicroBatches::Uniform(1)),
        ClipConfig::adaptive(1.0, MicroBatches::Uniform(2)),
        ClipConfig::fixed(0.3, MicroBatches::Uniform(1))
            .with_non_finite(NonFinitePolicy::Propagate),
        ClipConfig::fixed(0.4, MicroBatches::Offsets(random_offsets(5, n, 120))),
        ClipConfig::fixed(0.4, MicroBatches::Uniform(2)).with_groups(groups),
    ];
    // No binding limit, and one that cuts the widest tensor into windows of 40 rows.
    for max_binding in [u64::MAX, 4100 * 4 * 40 + 256] {
        gpu.set_max_binding_bytes(max_binding);
        for cfg in &configs {
            for tensors in [&one, &t] {
                if tensors.len() == 1 && cfg.groups.is_some() {
                    continue;
                }
                let mut dispatches = Vec::new();
                for rows in [0, 5, 32, 64] {
                    gpu.set_gpu_pass4_chunk_rows(Some(rows));
                    assert_eq!(gpu.gpu_pass4_chunk_rows(), Some(rows));
                    let what = format!(
                        "{cfg:?}, {} tensors, binding {max_binding}, chunks of {rows}",
                        tensors.len()
                    );
                    check(&mut gpu, cfg, tensors, n, TOL, &what);
                    dispatches.push(gpu.last_gpu_dispatches().unwrap());
                }
                // Chunks add at least their sum's dispatch (with 5-row chunks of
                // 200 rows, two tables of chunks as well). The one tensor's five
                // 40-row windows are cut together (chunk_windows_table): a chunk
                // dispatch per window in place of its dispatch, and one sum.
                let what = format!("{cfg:?}, binding {max_binding}: dispatches {dispatches:?}");
                if max_binding != u64::MAX && tensors.len() == 1 {
                    assert!(
                        dispatches[1..].iter().all(|&d| d == dispatches[0] + 1),
                        "{what}"
                    );
                } else {
                    assert!(dispatches[1] >= dispatches[0] + 2, "{what}");
                    assert!(dispatches[2] > dispatches[0], "{what}");
                    assert!(dispatches[3] > dispatches[0], "{what}");
                }
            }
        }
    }
    gpu.set_max_binding_bytes(u64::MAX);
    // 16-bit input through the chunks.
    gpu.set_gpu_pass4_chunk_rows(Some(5));
    let halves = rounded(&t[1..], half::f16::from_f32);
    check_typed(
        &mut gpu,
        &configs[0],
        &halves,
        n,
        TOL,
        "f16 in chunks of 5 rows",
    );
    // None restores the adapter's default: 32 rows on a software adapter.
    gpu.set_gpu_pass4_chunk_rows(None);
    let software = gpu.device().unwrap().adapter_info().device_type == wgpu::DeviceType::Cpu;
    assert_eq!(
        gpu.gpu_pass4_chunk_rows(),
        Some(if software { 32 } else { 0 })
    );
}
