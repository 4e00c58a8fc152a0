//! f16 and bf16 input gradients on both backends: against the float64 reference
//! of the same rounded values, bitwise against the f32 path on the widened values
//! (the accumulation is the same), in caller buffers at awkward offsets, with
//! special values, and with bad buffer sizes.

mod common;

use common::*;
use microclip::half::{bf16, f16};
use microclip::reference::clip_f64;
use microclip::{
    Backend, ClipConfig, ClipError, ClipOutput, Clipper, Dtype, GpuTensor, GpuTensorMut,
};
use microclip::{GradElement, MicroBatches, NonFinitePolicy};
use wgpu::util::DeviceExt;

const TOL: f64 = 3e-5;

/// The CPU backend's three paths (one read; two passes storing the means; two
/// passes reading the input again), each with f16 widened by F16C where the CPU
/// has it and by the integer decode, then the GPU's, with its default f16 decode
/// and with the other one (`unpack2x16float` or integer operations) where the
/// device has both.
fn clippers() -> Vec<Clipper> {
    let mut all = Vec::new();
    for f16c in [true, false] {
        let mut fused = Clipper::new(Backend::Cpu).unwrap();
        fused.set_cpu_f16c(f16c);
        all.push(fused);
        for means_max in [usize::MAX, 0] {
            let mut two_pass = Clipper::new(Backend::Cpu).unwrap();
            two_pass.set_cpu_fused_budget_bytes(0);
            two_pass.set_cpu_means_max_bytes(means_max);
            two_pass.set_cpu_f16c(f16c);
            all.push(two_pass);
        }
    }
    if let Some(default) = gpu() {
        let other = default.gpu_f16_unpack() == Some(false);
        all.push(default);
        all.extend(gpu().and_then(|mut gpu| {
            gpu.set_gpu_f16_unpack(Some(other));
            (gpu.gpu_f16_unpack() == Some(other)).then_some(gpu)
        }));
    }
    all
}

// (n, widths, b): odd widths put 16-bit rows at odd element offsets (mid-word).
const SHAPES: &[(usize, &[usize], usize)] = &[
    (1, &[1], 1),
    (7, &[3, 1025], 7),
    (10, &[255, 257, 1], 3),
    (6, &[4095, 4096, 4097], 1),
    (9, &[8191, 1, 12289], 4),
    (33, &[4096, 17], 32),
    (5, &[2049], 2),
];

#[test]
fn awkward_shapes_match_the_reference_of_the_rounded_inputs() {
    for mut clipper in clippers() {
        for dtype in [Dtype::F16, Dtype::Bf16] {
            for (k, &(n, widths, b)) in SHAPES.iter().enumerate() {
                let t = random_tensors(40 + k as u64, n, widths, 1.0);
                for cfg in [
                    ClipConfig::fixed(0.5, MicroBatches::Uniform(b)),
                    ClipConfig::adaptive(1.0, MicroBatches::Uniform(b)),
                    ClipConfig::fixed(
                        0.3,
                        MicroBatches::Offsets(random_offsets(k as u64, n, n.div_ceil(2))),
                    ),
                ] {
                    let what = format!(
                        "{} (f16 unpack {:?}) {dtype} case {k} {cfg:?}",
                        clipper.backend(),
                        clipper.gpu_f16_unpack()
                    );
                    check_as(&mut clipper, &cfg, &t, n, TOL, &what, dtype);
                }
            }
        }
    }
}

#[test]
fn row_windows_of_16_bit_rows() {
    // Bindings smaller than a tensor: windows start mid-word (7 rows of 301 columns
    // per window at the first binding, 3 rows of 1101 at the second) and carry
    // partial micro-batches to the next window. The smallest still holds the f32
    // output row (a binding below it is ClipError::TooLarge, see errors.rs).
    let Some(mut gpu) = gpu() else { return };
    let n = 23;
    let widths = [301, 7, 1101];
    let t = random_tensors(9, n, &widths, 1.0);
    for dtype in [Dtype::F16, Dtype::Bf16] {
        for max_binding in [1101 * 4 + 256, 3 * 1101 * 2 + 256, 8190, 50_000] {
            gpu.set_max_binding_bytes(max_binding);
            for b in [1, 4, 5, 23] {
                let cfg = ClipConfig::adaptive(1.0, MicroBatches::Uniform(b));
                let what = format!("{dtype} binding {max_binding} b {b}");
                check_as(&mut gpu, &cfg, &t, n, TOL, &what, dtype);
            }
        }
    }
}

/// The 16-bit path gives the same bits as the f32 path on the widened values: the
/// loads are exact and everything after them is the same arithmetic.
fn same_bits_as_f32<T: GradElement>(clipper: &mut Clipper, from_f32: fn(f32) -> T) {
    let (n, widths) = (12, [5, 4100, 64, 3]);
    let typed = rounded(&random_tensors(3, n, &widths, 1.0), from_f32);
    let widened = widened(&typed);
    // The CPU widens 16-bit rows in registers: b = 3 and 6 form the means in one
    // sweep, b = 11 and 12 through an f64 sum row (16-bit rows a chunk of columns
    // at a time, f32 rows one column at a time: the same additions; 11 ends with
    // a sweep of 3 rows, then a micro-batch of one); the ragged
    // micro-batches mix one-row ones (16-bit rows widened into the means, f32 rows
    // read as they are) with longer ones.
    let ragged = MicroBatches::Offsets(vec![0, 1, 3, 4, 9, 10, 12]);
    let uniform = [1, 3, 6, 11, 12].map(MicroBatches::Uniform);
    for mb in uniform.into_iter().chain([ragged]) {
        let b = format!("{mb:?}");
        let cfg = ClipConfig::fixed(0.2, mb);
        let views: Vec<&[T]> = typed.iter().map(Vec::as_slice).collect();
        let got = clipper.clip(&cfg, &views, n).unwrap();
        let want = clipper.clip(&cfg, &slices(&widened), n).unwrap();
        let unpack = clipper.gpu_f16_unpack();
        assert_eq!(
            got,
            want,
            "{} (f16 unpack {unpack:?}) b {b}",
            clipper.backend()
        );
    }
}

#[test]
fn bitwise_equal_to_the_f32_path_on_widened_values() {
    for mut clipper in clippers() {
        same_bits_as_f32(&mut clipper, f16::from_f32);
        same_bits_as_f32(&mut clipper, bf16::from_f32);
    }
}

#[test]
fn special_values() {
    // f16 subnormals (the loader must not flush them), an infinity in micro-batch 1
    // and a NaN in micro-batch 2 under the Skip policy.
    let (n, d) = (8, 9);
    let mut x: Vec<f16> = (0..n * d)
        .map(|i| f16::from_bits(1 + (i as u16 * 37) % 1000)) // all subnormal
        .collect();
    for mut clipper in clippers() {
        let cfg = ClipConfig::fixed(1e-5, MicroBatches::Uniform(2));
        check_typed(
            &mut clipper,
            &cfg,
            std::slice::from_ref(&x),
            n,
            TOL,
            "subnormals",
        );
        let out = clipper.clip(&cfg, &[&x[..]], n).unwrap();
        assert!(
            out.stats.norms.iter().all(|&v| v > 0.0),
            "{:?}",
            out.stats.norms
        );
    }
    x[2 * d + 4] = f16::INFINITY;
    x[5 * d] = f16::NAN;
    let big: Vec<bf16> = (0..n * d)
        .map(|i| bf16::from_f32(if i % 7 == 0 { 3e38 } else { -1e-38 }))
        .collect();
    for mut clipper in clippers() {
        let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(2));
        check_typed(
            &mut clipper,
            &cfg,
            std::slice::from_ref(&x),
            n,
            TOL,
            "inf and nan",
        );
        let out = clipper.clip(&cfg, &[&x[..]], n).unwrap();
        assert_eq!(out.stats.nonfinite_count, 2);
        let strict = ClipConfig {
            non_finite: NonFinitePolicy::Error,
            ..cfg.clone()
        };
        assert!(matches!(
            clipper.clip(&strict, &[&x[..]], n),
            Err(ClipError::NonFinite {
                micro_batch: 1,
                count: 2
            })
        ));
        // bf16 keeps f32's range: norms beyond f32::MAX still clip correctly.
        // The norms are about 2e38, so C = 1e3 keeps the factors C / norm normal
        // f32 numbers (with C = 0.5 they would be subnormal, which a GPU that
        // flushes denormals, the documented policy, makes 0).
        check_typed(
            &mut clipper,
            &ClipConfig::fixed(1e3, MicroBatches::Uniform(2)),
            std::slice::from_ref(&big),
            n,
            TOL,
            "bf16 near f32::MAX",
        );
    }
}

#[test]
fn caller_buffers_of_mixed_element_types() {
    let Some(mut gpu) = gpu() else { return };
    let n = 9;
    let widths = [7, 4097, 5];
    let t = random_tensors(21, n, &widths, 1.0);
    let h0 = rounded(&t[..1], f16::from_f32).remove(0);
    let h2 = rounded(&t[2..], bf16::from_f32).remove(0);
    let widened = vec![
        h0.iter().map(|x| x.to_f32()).collect::<Vec<f32>>(),
        t[1].clone(),
        h2.iter().map(|x| x.to_f32()).collect(),
    ];
    // One buffer: f16 tensor at byte 4 (63 halves: ends mid-word), the f32 tensor
    // after it, the bf16 tensor at byte 260 + its f32 bytes.
    let at1 = (4 + h0.len() as u64 * 2).next_multiple_of(4);
    let at2 = at1 + t[1].len() as u64 * 4 + 260;
    let mut bytes = vec![0u8; (at2 + h2.len() as u64 * 2).next_multiple_of(4) as usize];
    bytes[4..4 + h0.len() * 2].copy_from_slice(bytemuck::cast_slice(&h0));
    bytes[at1 as usize..at1 as usize + t[1].len() * 4].copy_from_slice(bytemuck::cast_slice(&t[1]));
    bytes[at2 as usize..at2 as usize + h2.len() * 2].copy_from_slice(bytemuck::cast_slice(&h2));
    let device = gpu.device().unwrap().clone();
    let input = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: &bytes,
        usage: wgpu::BufferUsages::STORAGE,
    });
    let inputs = [
        GpuTensor::new(&input, 4, widths[0]).with_dtype(Dtype::F16),
        GpuTensor::new(&input, at1, widths[1]),
        GpuTensor::new(&input, at2, widths[2]).with_dtype(Dtype::Bf16),
    ];
    for b in [1, 2, 3, 9] {
        let cfg = ClipConfig::fixed(0.4, MicroBatches::Uniform(b));
        let (buffers, stats) = gpu.clip_buffers(&cfg, &inputs, n).unwrap();
        let want = clip_f64(&cfg, &slices(&widened), n).unwrap();
        let host = gpu.clip(&cfg, &slices(&widened), n).unwrap();
        assert_eq!(stats, host.stats, "b {b}");
        for (p, buffer) in buffers.iter().enumerate() {
            let got = read_buffer(&gpu, buffer, 0, widths[p]);
            assert_eq!(got, host.grads[p], "b {b} tensor {p}");
        }
        assert_matches(&host, &want, TOL, &format!("b {b}"));
    }

    // The buffer must hold the 16-bit tensor's bytes rounded up to whole words.
    let short = common::storage_buffer(&device, "short f16 input", 8);
    let out = common::storage_buffer(gpu.device().unwrap(), "output", 4);
    let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(1));
    // 3 rows of 1 f16 at byte 4: 6 bytes, 8 with the last word, 12 > 8.
    let e = gpu
        .clip_buffers_into(
            &cfg,
            &[GpuTensor::new(&short, 4, 1).with_dtype(Dtype::F16)],
            3,
            &[GpuTensorMut {
                buffer: &out,
                offset: 0,
                cols: 1,
            }],
        )
        .unwrap_err();
    assert!(matches!(e, ClipError::BufferRange { tensor: 0, .. }), "{e}");
}

/// Every finite value of a 16-bit type with `|x| < limit` passes through the GPU
/// loader exactly: one sample, b = 1 and a bound far above the norm make the output
/// the input itself. Both the four-element loads (width a multiple of 4) and the
/// scalar loads (one fewer column) are covered.
fn loader_is_exact<T: GradElement>(gpu: &mut Clipper, from_bits: fn(u16) -> T, limit: f32) {
    let values: Vec<T> = (0..=u16::MAX)
        .map(from_bits)
        .filter(|x| x.to_f32().abs() < limit)
        .collect();
    let cols = values.len() / 4 * 4;
    let cfg = ClipConfig::fixed(1e30, MicroBatches::Uniform(1));
    for width in [cols, cols - 1] {
        let out = gpu.clip(&cfg, &[&values[..width]], 1).unwrap();
        assert_eq!(out.stats.factors, [1.0]);
        for (x, y) in values[..width].iter().zip(&out.grads[0]) {
            // Equal values are equal bits except for zeros: the sum starts at +0.
            // An f32-subnormal value (bf16's smallest) may come back as zero on a
            // GPU that flushes denormals (Vulkan allows it; NVIDIA does): the
            // documented policy. Every other value must be exact.
            let x = x.to_f32();
            let flushed = x.is_subnormal() && *y == 0.0;
            assert!(x == *y || flushed, "{}: {x:e} came back as {y:e}", T::DTYPE);
        }
    }
}

#[test]
fn gpu_loaders_decode_every_finite_value_exactly() {
    let Some(mut gpu) = gpu() else { return };
    // lavapipe (CI's adapter; Mesa with shaderFloat16, as Debian's 22.3) compiles
    // unpack2x16float, and as a software adapter decodes f16 with it by default:
    // that path must not silently drop out of CI. (An llvmpipe without
    // shaderFloat16 would fail here: wgpu then withholds the builtin.)
    let info = gpu.device().unwrap().adapter_info();
    if info.name.contains("llvmpipe") {
        assert_eq!(gpu.gpu_f16_unpack(), Some(true), "{}", info.name);
    }
    // Both f16 decodes where the device has both, each from pipelines rebuilt
    // for it.
    for unpack in [false, true, false] {
        gpu.set_gpu_f16_unpack(Some(unpack));
        if gpu.gpu_f16_unpack() == Some(unpack) {
            loader_is_exact(&mut gpu, f16::from_bits, f32::INFINITY);
            assert_eq!(gpu.gpu_f16_unpack_built(), Some(unpack));
        }
    }
    loader_is_exact(&mut gpu, bf16::from_bits, 1e18);
}

/// A storage buffer on `gpu`'s device holding each f16 tensor at its byte
/// offset in `at`, the other bytes `fill`, its size rounded up to whole words.
fn f16_buffer(gpu: &Clipper, tensors: &[Vec<f16>], at: &[u64], fill: u8) -> wgpu::Buffer {
    let end = tensors
        .iter()
        .zip(at)
        .map(|(x, &a)| a as usize + x.len() * 2);
    let mut bytes = vec![fill; end.max().unwrap_or(0).next_multiple_of(4)];
    for (x, &a) in tensors.iter().zip(at) {
        bytes[a as usize..a as usize + x.len() * 2].copy_from_slice(bytemuck::cast_slice(x));
    }
    let device = gpu.device().unwrap();
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: &bytes,
        usage: wgpu::BufferUsages::STORAGE,
    })
}

/// Three f16 tensors in one caller buffer (so they share norm-pass dispatches):
/// the first at byte 4 (rows of 8 halves start 2 halves past a quad: scalar
/// loads), the second right after it, the third at a 16-byte boundary (vec4
/// loads). The result equals the host path's (which uploads them aligned) bit for
/// bit, and the float64 reference within tolerance.
#[test]
fn f16_tensors_sharing_one_buffer() {
    let Some(mut gpu) = gpu() else { return };
    let n = 7;
    let widths = [8usize, 5, 12];
    let t = rounded(&random_tensors(44, n, &widths, 1.0), f16::from_f32);
    let mut at = vec![4u64];
    at.push((at[0] + (n * widths[0] * 2) as u64).next_multiple_of(4));
    at.push((at[1] + (n * widths[1] * 2) as u64).next_multiple_of(16) + 16);
    let input = f16_buffer(&gpu, &t, &at, 0xff);
    let inputs: Vec<GpuTensor<'_>> = widths
        .iter()
        .zip(&at)
        .map(|(&d, &a)| GpuTensor::new(&input, a, d).with_dtype(Dtype::F16))
        .collect();
    let views: Vec<&[f16]> = t.iter().map(Vec::as_slice).collect();
    let want_inputs = widened(&t);
    for b in [1, 2, 3, 7] {
        let cfg = ClipConfig::fixed(0.3, MicroBatches::Uniform(b));
        let (buffers, stats) = gpu.clip_buffers(&cfg, &inputs, n).unwrap();
        let host = gpu.clip(&cfg, &views, n).unwrap();
        assert_eq!(stats, host.stats, "b {b}");
        for (p, buffer) in buffers.iter().enumerate() {
            let got = read_buffer(&gpu, buffer, 0, widths[p]);
            assert_eq!(got, host.grads[p], "b {b} tensor {p}");
        }
        let want = clip_f64(&cfg, &slices(&want_inputs), n).unwrap();
        assert_matches(&host, &want, TOL, &format!("b {b}"));
    }
}

/// 16-bit rows that start at multiples of 8 elements are read as octs (one
/// `vec4<u32>` load per two quads) where oct loads are on (the default with
/// small workgroups): the same bits as with them off, and the float64
/// reference's values. Host slices (each tensor uploaded 256-byte aligned), row
/// windows whose rows stay 8-aligned, and caller buffers where one tensor's rows
/// are 8-aligned and the other's only 4-aligned (their shared norm pass reads
/// quads; pass 4 reads the first tensor as octs when it runs per tensor).
#[test]
fn oct_loads_give_the_bits_of_quad_loads() {
    let Some(mut gpu) = gpu() else { return };
    let n = 13;
    let widths = [8usize, 4096, 24, 1032];
    let ragged = MicroBatches::Offsets(vec![0, 1, 2, 5, 6, 12, 13]);
    let configs: Vec<ClipConfig> = [1, 2, 3, 13]
        .map(|b| ClipConfig::fixed(0.5, MicroBatches::Uniform(b)))
        .into_iter()
        .chain([
            ClipConfig::adaptive(1.0, MicroBatches::Uniform(1)),
            ClipConfig::fixed(0.3, ragged),
        ])
        .collect();
    // f16 and bf16 of magnitude 1; bf16 also near 1e-30 and 1e30, where the
    // norm pass walks again with Blue's sums (b = 1 and 3).
    let data = [
        (Dtype::F16, 1.0, &configs[..]),
        (Dtype::Bf16, 1.0, &configs[..]),
        (Dtype::Bf16, 1e-30, &configs[..3]),
        (Dtype::Bf16, 1e30, &configs[..3]),
    ];
    // The software adapter's walks (lanes on adjacent quads, read in pairs),
    // then, with small workgroups off, the hardware walks on the same octs
    // (one quad per load, half of an oct: slower, the same bits).
    for small in [None, Some(false)] {
        gpu.set_gpu_small_workgroups(small);
        for &(dtype, magnitude, configs) in &data {
            let t = random_tensors(61, n, &widths, magnitude);
            let typed = match dtype {
                Dtype::F16 => widened(&rounded(&t, f16::from_f32)),
                _ => widened(&rounded(&t, bf16::from_f32)),
            };
            for cfg in configs {
                let what = format!("{dtype} x {magnitude:e} small {small:?} {cfg:?}");
                let run = |gpu: &mut Clipper, octs: bool, max_binding: Option<u64>| {
                    gpu.set_gpu_oct_loads(Some(octs));
                    gpu.set_max_binding_bytes(max_binding.unwrap_or(u64::MAX));
                    let out = match dtype {
                        Dtype::F16 => {
                            let h = rounded(&typed, f16::from_f32);
                            let views: Vec<&[f16]> = h.iter().map(Vec::as_slice).collect();
                            gpu.clip(cfg, &views, n).unwrap()
                        }
                        _ => {
                            let h = rounded(&typed, bf16::from_f32);
                            let views: Vec<&[bf16]> = h.iter().map(Vec::as_slice).collect();
                            gpu.clip(cfg, &views, n).unwrap()
                        }
                    };
                    (out, gpu.last_gpu_oct_dispatches().unwrap())
                };
                let want = clip_f64(cfg, &slices(&typed), n).unwrap();
                // Whole tensors, then row windows (3 rows of the widest; rows of
                // 1032 x 2 bytes, a multiple of 16: every window's first row
                // stays 8-aligned).
                for max_binding in [None, Some(3 * 4096 * 2 + 256)] {
                    let (quads, none) = run(&mut gpu, false, max_binding);
                    let (octs, used) = run(&mut gpu, true, max_binding);
                    assert_eq!(none, 0, "{what}");
                    assert!(used > 0, "{what} {max_binding:?}: no dispatch read octs");
                    assert!(octs == quads, "{what} {max_binding:?}: not the same bits");
                    assert_matches(&octs, &want, TOL, &what);
                }
            }
        }
    }
    gpu.set_gpu_small_workgroups(None);
    gpu.set_gpu_oct_loads(None);
    gpu.set_max_binding_bytes(u64::MAX);

    // Caller buffer: f16 tensors at bytes 16 (8-aligned rows) and, after it, at
    // a multiple of 8 bytes but not 16 (4-aligned rows: quads only).
    let t = rounded(&random_tensors(62, n, &[16, 12], 1.0), f16::from_f32);
    let at = [16u64, 16 + (n * 16 * 2) as u64 + 8];
    let input = f16_buffer(&gpu, &t, &at, 0);
    let inputs = [
        GpuTensor::new(&input, at[0], 16).with_dtype(Dtype::F16),
        GpuTensor::new(&input, at[1], 12).with_dtype(Dtype::F16),
    ];
    let wide = widened(&t);
    for b in [1, 2, 13] {
        // Noise makes pass 4 run per tensor (1e-9 of it: the reference check
        // stays meaningful).
        let cfg = ClipConfig::fixed(0.4, MicroBatches::Uniform(b));
        let noisy = cfg.clone().with_noise(microclip::GaussianNoise {
            multiplier: 1e-9,
            seed: 7,
            step: b as u64,
        });
        for cfg in [cfg, noisy] {
            let mut results = Vec::new();
            for octs in [false, true] {
                gpu.set_gpu_oct_loads(Some(octs));
                let (buffers, stats) = gpu.clip_buffers(&cfg, &inputs, n).unwrap();
                let grads: Vec<Vec<f32>> = (0..2)
                    .map(|p| read_buffer(&gpu, &buffers[p], 0, [16, 12][p]))
                    .collect();
                results.push((stats, grads, gpu.last_gpu_oct_dispatches().unwrap()));
            }
            let what = format!("caller buffer b {b} {cfg:?}");
            assert_eq!(results[0].2, 0, "{what}");
            if cfg.noise.is_some() && b < 3 {
                // Pass 4 re-reads each tensor's rows in its own dispatches.
                assert!(results[1].2 > 0, "{what}: no dispatch read octs");
            }
            assert_eq!(results[0].0, results[1].0, "{what}");
            assert_eq!(results[0].1, results[1].1, "{what}");
            let want = clip_f64(&cfg, &slices(&wide), n).unwrap();
            let got = ClipOutput {
                grads: results[1].1.clone(),
                stats: results[1].0.clone(),
            };
            assert_matches(&got, &want, TOL, &what);
        }
    }
    gpu.set_gpu_oct_loads(None);
}
