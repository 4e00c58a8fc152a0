//! Every typed error, on both backends: bad configurations, shapes and buffers
//! (raised before any kernel runs), and devices the kernels cannot use.

mod common;

use common::gpu;
use microclip::{
    Backend, ClipBound, ClipConfig, ClipError, ClipFunction, Clipper, GaussianNoise, GpuTensor,
    GpuTensorMut, MicroBatches,
};
use wgpu::util::DeviceExt;

#[test]
fn cpu_host_errors() {
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let t = vec![1.0f32; 12];
    let nan = cpu
        .clip(
            &ClipConfig::fixed(f32::NAN, MicroBatches::Uniform(2)),
            &[&t],
            4,
        )
        .unwrap_err();
    assert!(matches!(nan, ClipError::InvalidClipNorm(c) if c.is_nan()));
    host_errors(&mut cpu);
}

/// The float64 reference checks the lengths before it forms the offsets: a wrong
/// `n_samples` of 2^40 had it allocate 8 TiB of offsets (an abort, not an error).
#[test]
fn reference_checks_lengths_before_offsets() {
    let config = ClipConfig::fixed(1.0, MicroBatches::Uniform(1));
    let huge = 1usize << 40;
    let err = microclip::reference::clip_f64(&config, &[&[1.0, 2.0]], huge).unwrap_err();
    assert!(
        matches!(err, ClipError::TensorLength { tensor: 0, len: 2, n_samples } if n_samples == huge),
        "{err:?}"
    );
    let err = microclip::reference::clip_f64(&config, &[&[1.0, 2.0]], 0).unwrap_err();
    assert!(matches!(err, ClipError::NoSamples), "{err:?}");
    let ok = microclip::reference::clip_f64(&config, &[&[1.0, 2.0]], 2).unwrap();
    // Norms 1 and 2, factors 1 and 1 / 2: (1 + 1) / 2.
    assert_eq!(ok.grads, vec![vec![1.0]]);
}

/// `row_offsets` is public: offsets it cannot allocate are an error, not a
/// capacity-overflow panic (`usize::MAX`) or an abort (2^60 offsets).
#[test]
fn offsets_too_many_to_allocate() {
    let config = ClipConfig::fixed(1.0, MicroBatches::Uniform(1));
    for n in [usize::MAX, 1 << 60] {
        let err = config.row_offsets(n).unwrap_err();
        assert!(matches!(err, ClipError::TooLarge(_)), "{n}: {err:?}");
    }
    let offsets = ClipConfig::fixed(1.0, MicroBatches::Uniform(usize::MAX))
        .row_offsets(usize::MAX)
        .unwrap();
    assert_eq!(offsets, vec![0, usize::MAX]);
    let offsets = ClipConfig::fixed(1.0, MicroBatches::Uniform(3))
        .row_offsets(7)
        .unwrap();
    assert_eq!(offsets, vec![0, 3, 6, 7]);
}

#[test]
fn gpu_host_errors() {
    let Some(mut gpu) = gpu() else { return };
    let t = vec![1.0f32; 12];
    let nan = gpu
        .clip(
            &ClipConfig::fixed(f32::NAN, MicroBatches::Uniform(2)),
            &[&t],
            4,
        )
        .unwrap_err();
    assert!(matches!(nan, ClipError::InvalidClipNorm(c) if c.is_nan()));
    host_errors(&mut gpu);
}

fn host_errors(clipper: &mut Clipper) {
    let t = vec![1.0f32; 12];
    let ok = ClipConfig::fixed(1.0, MicroBatches::Uniform(2));
    group_and_noise_errors(clipper, &t);
    for c in [0.0, -1.0, f32::INFINITY] {
        assert_eq!(
            clipper
                .clip(&ClipConfig::fixed(c, MicroBatches::Uniform(2)), &[&t], 4)
                .unwrap_err(),
            ClipError::InvalidClipNorm(c)
        );
    }
    for scale in [-2.0, 0.0, f32::NAN, f32::INFINITY] {
        let cfg = ClipConfig::adaptive(scale, MicroBatches::Uniform(2));
        let e = clipper.clip(&cfg, &[&t], 4).unwrap_err();
        assert!(matches!(e, ClipError::InvalidAdaptiveScale(_)), "{e:?}");
    }
    assert!(matches!(
        clipper
            .clip(&ClipConfig::fixed(f32::NAN, MicroBatches::Uniform(2)), &[&t], 4)
            .unwrap_err(),
        ClipError::InvalidClipNorm(c) if c.is_nan()
    ));
    assert_eq!(
        clipper
            .clip(&ClipConfig::fixed(1.0, MicroBatches::Uniform(0)), &[&t], 4)
            .unwrap_err(),
        ClipError::ZeroMicroBatchSize
    );
    for gamma in [0.0, -0.5, f32::INFINITY, f32::NAN] {
        let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(2))
            .with_function(ClipFunction::Automatic { gamma });
        let e = clipper.clip(&cfg, &[&t], 4).unwrap_err();
        assert!(
            matches!(e, ClipError::InvalidGamma(g) if g.to_bits() == gamma.to_bits()),
            "{e:?}"
        );
    }
    assert_eq!(
        clipper.clip(&ok, &[&t], 0).unwrap_err(),
        ClipError::NoSamples
    );
    assert_eq!(
        clipper.clip::<f32>(&ok, &[], 4).unwrap_err(),
        ClipError::NoTensors
    );
    assert_eq!(
        clipper.clip(&ok, &[&t, &t[..5]], 4).unwrap_err(),
        ClipError::TensorLength {
            tensor: 1,
            len: 5,
            n_samples: 4
        }
    );
    // An empty tensor (no columns) is a length error too.
    assert_eq!(
        clipper.clip(&ok, &[&t, &[]], 4).unwrap_err(),
        ClipError::TensorLength {
            tensor: 1,
            len: 0,
            n_samples: 4
        }
    );
    // An n_samples no tensor holds: typed before its offsets (2^49 of them) are built.
    assert_eq!(
        clipper.clip(&ok, &[&t], 1 << 50).unwrap_err(),
        ClipError::TensorLength {
            tensor: 0,
            len: 12,
            n_samples: 1 << 50
        }
    );
    for bad in [
        vec![0, 2],
        vec![1, 4],
        vec![0, 2, 2, 4],
        vec![0, 3, 2, 4],
        vec![0, 4, 5],
        vec![4],
    ] {
        let cfg = ClipConfig::fixed(1.0, MicroBatches::Offsets(bad.clone()));
        assert!(
            matches!(
                clipper.clip(&cfg, &[&t], 4).unwrap_err(),
                ClipError::InvalidOffsets(_)
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn cpu_clipper_rejects_gpu_buffers() {
    let Some(gpu) = gpu() else { return };
    let device = gpu.device().unwrap();
    let buf = common::storage_buffer(device, "a GPU buffer", 64);
    let mut cpu = Clipper::new(Backend::Cpu).unwrap();
    let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(1));
    let err = cpu
        .clip_buffers(&cfg, &[GpuTensor::new(&buf, 0, 1)], 4)
        .unwrap_err();
    assert_eq!(err, ClipError::NotGpu);
}

#[test]
fn gpu_buffer_errors() {
    let Some(mut gpu) = gpu() else { return };
    let device = gpu.device().unwrap().clone();
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let make = |floats: usize, usage| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&vec![1.0f32; floats]),
            usage,
        })
    };
    let input = make(4 * 8, storage);
    let out = make(8, storage);
    let no_storage = make(4 * 8, wgpu::BufferUsages::COPY_DST);
    let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(2));
    let t = |buffer, offset, cols| GpuTensor::new(buffer, offset, cols);
    let o = |buffer, offset, cols| GpuTensorMut {
        buffer,
        offset,
        cols,
    };
    let range_err = |e: ClipError| matches!(e, ClipError::BufferRange { .. });
    // Fits exactly: 4 rows x 8 cols.
    gpu.clip_buffers_into(&cfg, &[t(&input, 0, 8)], 4, &[o(&out, 0, 8)])
        .unwrap();
    // clip_buffers checks the configuration and the inputs before it creates
    // its outputs: a tensor claiming 2^40 columns is a range error (it was the
    // output's TooLarge, after outputs for the tensors before it had been
    // created), and under a zero bound the bound's error.
    let huge = [t(&input, 0, 1 << 40)];
    assert!(
        range_err(gpu.clip_buffers(&cfg, &huge, 4).unwrap_err()),
        "huge input"
    );
    let zero = ClipConfig::fixed(0.0, MicroBatches::Uniform(2));
    let err = gpu.clip_buffers(&zero, &huge, 4).unwrap_err();
    assert!(matches!(err, ClipError::InvalidClipNorm(_)), "{err:?}");
    // An n_samples no buffer holds: typed before its offsets are built.
    assert!(
        range_err(
            gpu.clip_buffers_into(&cfg, &[t(&input, 0, 8)], 1 << 50, &[o(&out, 0, 8)])
                .unwrap_err()
        ),
        "rows"
    );
    assert!(
        range_err(
            gpu.clip_buffers_into(&cfg, &[t(&input, 4, 8)], 4, &[o(&out, 0, 8)])
                .unwrap_err()
        ),
        "overrun"
    );
    assert!(
        range_err(
            gpu.clip_buffers_into(&cfg, &[t(&input, 2, 4)], 4, &[o(&out, 0, 4)])
                .unwrap_err()
        ),
        "misaligned"
    );
    assert!(
        range_err(
            gpu.clip_buffers_into(&cfg, &[t(&input, 0, 0)], 4, &[o(&out, 0, 0)])
                .unwrap_err()
        ),
        "zero cols"
    );
    assert!(
        range_err(
            gpu.clip_buffers_into(&cfg, &[t(&input, 0, 8)], 4, &[o(&out, 4, 8)])
                .unwrap_err()
        ),
        "output overrun"
    );
    assert!(
        range_err(
            gpu.clip_buffers_into(&cfg, &[t(&input, 0, 4)], 4, &[o(&out, 0, 5)])
                .unwrap_err()
        ),
        "cols mismatch"
    );
    assert!(
        range_err(
            gpu.clip_buffers_into(&cfg, &[t(&no_storage, 0, 8)], 4, &[o(&out, 0, 8)])
                .unwrap_err()
        ),
        "usage"
    );
    assert!(
        range_err(
            gpu.clip_buffers_into(&cfg, &[t(&input, 0, 4)], 4, &[o(&input, 64, 4)])
                .unwrap_err()
        ),
        "aliasing"
    );
    // Two outputs in one buffer, the second starting inside the first.
    let two_out = make(16, storage);
    let two_in = [t(&input, 0, 4), t(&input, 64, 4)];
    let e = gpu
        .clip_buffers_into(&cfg, &two_in, 4, &[o(&two_out, 0, 4), o(&two_out, 12, 4)])
        .unwrap_err();
    assert!(
        matches!(e, ClipError::BufferRange { tensor: 1, .. }),
        "overlapping outputs: {e:?}"
    );
    gpu.clip_buffers_into(&cfg, &two_in, 4, &[o(&two_out, 16, 4), o(&two_out, 0, 4)])
        .unwrap();
    assert_eq!(
        gpu.clip_buffers_into(&cfg, &[t(&input, 0, 8)], 4, &[])
            .unwrap_err(),
        ClipError::OutputCount {
            inputs: 1,
            outputs: 0
        }
    );
    assert_eq!(
        gpu.clip_buffers_into(&cfg, &[], 4, &[]).unwrap_err(),
        ClipError::NoTensors
    );
    // A row larger than one storage binding.
    gpu.set_max_binding_bytes(1024);
    let wide = make(4 * 1000, storage);
    let wide_out = make(1000, storage);
    assert!(matches!(
        gpu.clip_buffers_into(&cfg, &[t(&wide, 0, 1000)], 4, &[o(&wide_out, 0, 1000)])
            .unwrap_err(),
        ClipError::TooLarge(_)
    ));
    // Buffers bound whole, each just over the 1024-byte binding while every row fits
    // (rows of up to 1024 - 252 = 772 bytes): the per-row weights when the means are
    // not stored (micro-batches of 2 and 3 rows, 2.5 on average; 150 x 8 = 1200
    // bytes of weight pairs; 60 x 16 = 960 bytes of norm partials) ...
    let data: Vec<f32> = (0..150 * 128).map(|i| (i % 7) as f32 - 3.0).collect();
    let offsets: Vec<usize> = (0..=60).map(|j| j / 2 * 5 + j % 2 * 2).collect();
    assert_eq!(offsets[60], 150);
    let cfg = ClipConfig::fixed(1.0, MicroBatches::Offsets(offsets));
    let e = gpu.clip(&cfg, &[&data], 150).unwrap_err();
    assert!(
        matches!(&e, ClipError::TooLarge(m) if m.contains("per-row weights")),
        "{e:?}"
    );
    // ... and an f32 output row twice as long as a 16-bit input row (600 bytes).
    let half: Vec<microclip::half::f16> = (0..4 * 300)
        .map(|i| microclip::half::f16::from_f32((i % 5) as f32 - 2.0))
        .collect();
    let e = gpu
        .clip(
            &ClipConfig::fixed(1.0, MicroBatches::Uniform(1)),
            &[&half],
            4,
        )
        .unwrap_err();
    assert!(
        matches!(&e, ClipError::TooLarge(m) if m.contains("output")),
        "{e:?}"
    );
    // The same shapes run under the device's own limit.
    gpu.set_max_binding_bytes(u64::MAX);
    gpu.clip(
        &ClipConfig::fixed(1.0, MicroBatches::Uniform(100)),
        &[&data],
        300,
    )
    .unwrap();
}

/// Parameter groups and noise: every inconsistent combination is a typed error.
fn group_and_noise_errors(clipper: &mut Clipper, t: &[f32]) {
    let layout = MicroBatches::Uniform(2);
    let two = [t, t];
    // Group 1 of 0..3 is empty, with every index below the tensor count.
    let e = clipper
        .clip(
            &ClipConfig::fixed(1.0, layout.clone()).with_groups(vec![0, 2, 2]),
            &[t, t, t],
            4,
        )
        .unwrap_err();
    assert!(
        matches!(&e, ClipError::InvalidGroups(m) if m.contains("group 1 has no tensor")),
        "{e:?}"
    );
    let mut groups_err = |cfg: ClipConfig, tensors: &[&[f32]]| {
        let e = clipper.clip(&cfg, tensors, 4).unwrap_err();
        assert!(matches!(e, ClipError::InvalidGroups(_)), "{cfg:?}: {e:?}");
    };
    // Group 1 of 0..3 is empty.
    groups_err(
        ClipConfig::fixed(1.0, layout.clone()).with_groups(vec![0, 2]),
        &two,
    );
    // An index far past the tensors (G = usize::MAX + 1 would overflow).
    groups_err(
        ClipConfig::fixed(1.0, layout.clone()).with_groups(vec![0, usize::MAX]),
        &two,
    );
    groups_err(
        ClipConfig::fixed(1.0, layout.clone()).with_groups(vec![usize::MAX]),
        &[t],
    );
    // Three group indices for two tensors.
    groups_err(
        ClipConfig::fixed(1.0, layout.clone()).with_groups(vec![0, 1, 1]),
        &two,
    );
    // Per-group bounds without groups, or with the wrong count.
    let per_group = |b: Vec<f32>| ClipConfig::new(ClipBound::PerGroup(b), layout.clone());
    groups_err(per_group(vec![1.0]), &[t]);
    let e = per_group(vec![1.0]).validate().unwrap_err();
    assert!(e.to_string().contains("with_groups"), "{e}");
    groups_err(per_group(vec![1.0]).with_groups(vec![0, 1]), &two);
    assert_eq!(
        clipper
            .clip(&per_group(vec![1.0, -3.0]).with_groups(vec![0, 1]), &two, 4)
            .unwrap_err(),
        ClipError::InvalidClipNorm(-3.0)
    );
    for sigma in [-1.0, f32::INFINITY, f32::NAN] {
        let cfg = ClipConfig::fixed(1.0, layout.clone()).with_noise(GaussianNoise {
            multiplier: sigma,
            seed: 1,
            step: 0,
        });
        let e = clipper.clip(&cfg, &[t], 4).unwrap_err();
        assert!(
            matches!(e, ClipError::InvalidNoise(s) if s.to_bits() == sigma.to_bits()),
            "{e:?}"
        );
    }
    // And a valid grouped, noised configuration runs.
    let cfg = per_group(vec![1.0, 0.5])
        .with_groups(vec![1, 0])
        .with_noise(GaussianNoise {
            multiplier: 1.0,
            seed: 3,
            step: 4,
        });
    let out = clipper.clip(&cfg, &two, 4).unwrap();
    assert_eq!(out.stats.norms.len(), 2 * 2);
    assert!((out.stats.clip_bound - 1.25f32.sqrt()).abs() < 1e-6);
    assert!((out.stats.noise_std - 1.25f32.sqrt()).abs() < 1e-6);
}

/// A device of the default adapter with the limits `limits` makes of the
/// adapter's (None without an adapter).
fn device_with(
    limits: impl FnOnce(wgpu::Limits) -> wgpu::Limits,
) -> Option<(wgpu::Device, wgpu::Queue)> {
    gpu()?;
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .expect("an adapter (gpu() found one)");
    let required_limits = limits(adapter.limits());
    Some(
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            required_limits,
            ..Default::default()
        }))
        .expect("a device with lower limits"),
    )
}

/// Tensors whose merged pass-4 row (sum ceil4(D_p) x 4 = 4800 bytes) is over the
/// device's storage binding (4096 bytes) while each row fits: pass 4 runs per
/// tensor instead of failing at binding (ClipError::Device before).
#[test]
fn merged_row_over_the_devices_binding() {
    let Some((device, queue)) = device_with(|l| wgpu::Limits {
        max_storage_buffer_binding_size: 4096,
        ..l
    }) else {
        return;
    };
    let mut clipper = Clipper::from_device(device, queue).unwrap();
    let tensors: Vec<Vec<f32>> = (0..4)
        .map(|p| {
            (0..8 * 300)
                .map(|i| ((i * 7 + p) % 9) as f32 - 4.0)
                .collect()
        })
        .collect();
    let views: Vec<&[f32]> = tensors.iter().map(Vec::as_slice).collect();
    for b in [1, 2] {
        let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(b));
        let got = clipper.clip(&cfg, &views, 8).unwrap();
        let want = microclip::reference::clip_f64(&cfg, &views, 8).unwrap();
        for (g, w) in got.grads.iter().flatten().zip(want.grads.iter().flatten()) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "b {b}: {g} vs {w}"
            );
        }
    }
}

/// A device with wgpu's downlevel limits (4 storage buffers per shader stage) is
/// refused with a typed error, not a panic in a pipeline build.
#[test]
fn device_below_the_kernels_limits() {
    assert_device_refused(|_| wgpu::Limits::downlevel_defaults(), "storage buffers");
}

/// `Clipper::from_device` on a device with `limits` must fail with a
/// `ClipError::Device` that names `what`.
fn assert_device_refused(limits: impl FnOnce(wgpu::Limits) -> wgpu::Limits, what: &str) {
    let Some((device, queue)) = device_with(limits) else {
        return;
    };
    let Err(e) = Clipper::from_device(device, queue) else {
        panic!("a clipper on a device with too few {what}");
    };
    assert!(
        matches!(&e, ClipError::Device(m) if m.contains(what)),
        "{e:?}"
    );
}

/// A device whose storage bindings hold 16 bytes: setting a binding limit above
/// it does not panic (it did: a clamp whose floor was above its ceiling), and a
/// call is `TooLarge`.
#[test]
fn device_with_tiny_bindings() {
    let Some((device, queue)) = device_with(|l| wgpu::Limits {
        max_storage_buffer_binding_size: 16,
        ..l
    }) else {
        return;
    };
    let mut clipper = Clipper::from_device(device, queue).unwrap();
    clipper.set_max_binding_bytes(1 << 20);
    let rows = [1.0f32; 40];
    let e = clipper
        .clip(
            &ClipConfig::fixed(1.0, MicroBatches::Uniform(2)),
            &[&rows],
            4,
        )
        .unwrap_err();
    assert!(matches!(e, ClipError::TooLarge(_)), "{e:?}");
}

/// A device allowing fewer workgroups per dimension than the plans dispatch is
/// refused at construction, not failed in every call's validation.
#[test]
fn device_with_few_workgroups_per_dimension() {
    assert_device_refused(
        |l| wgpu::Limits {
            max_compute_workgroups_per_dimension: 1000,
            ..l
        },
        "workgroups per dimension",
    );
}

/// Host-path outputs that each fit the device's largest buffer but together with
/// the statistics do not fit one read-back buffer: TooLarge before any work, not
/// a validation failure (ClipError::Device) in the call.
#[test]
fn host_readback_over_the_largest_buffer() {
    let Some((device, queue)) = device_with(|l| wgpu::Limits {
        max_buffer_size: 1 << 20,
        max_storage_buffer_binding_size: 1 << 20,
        ..l
    }) else {
        return;
    };
    let mut gpu = Clipper::from_device(device, queue).unwrap();
    let cols = 100_000; // 400,000 bytes a tensor, 1.6 MB for four
    let t: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 - 3.0).collect();
    let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(1));
    let e = gpu.clip(&cfg, &[&t, &t, &t, &t], 1).unwrap_err();
    assert!(
        matches!(&e, ClipError::TooLarge(m) if m.contains("read back")),
        "{e:?}"
    );
    // Two of them fit, and give the rows themselves (norm 2.16e3 > 1: clipped).
    let out = gpu.clip(&cfg, &[&t, &t], 1).unwrap();
    let norm = (2.0 * t.iter().map(|&x| (x as f64).powi(2)).sum::<f64>()).sqrt();
    let want = (t[3] as f64 / norm) as f32;
    assert!(
        (out.grads[1][3] - want).abs() <= 1e-6 * want.abs(),
        "{:?}",
        &out.grads[1][..4]
    );
}

/// The noise test helpers: no words for a count of 0, TooLarge beyond one storage
/// binding (a validation failure in wgpu's panicking handler before).
#[test]
fn noise_words_count_limits() {
    let Some(mut gpu) = gpu() else {
        return;
    };
    let noise = GaussianNoise {
        multiplier: 1.0,
        seed: 7,
        step: 0,
    };
    assert!(gpu.gpu_philox_words(&noise, 0, 0).unwrap().is_empty());
    gpu.set_max_binding_bytes(4096);
    let e = gpu.gpu_philox_words(&noise, 0, 1025).unwrap_err();
    assert!(
        matches!(&e, ClipError::TooLarge(m) if m.contains("binding")),
        "{e:?}"
    );
    assert_eq!(gpu.gpu_philox_words(&noise, 5, 1024).unwrap().len(), 1024);
}

/// A call that fails on the device (here a destroyed input buffer) makes the
/// clipper build its readers again; the next call over 16-bit rows must then
/// also build the f32 readers that its passes over f32 data (stored means, row
/// chunk partials) use, whatever its input type: it panicked on a missing
/// reader before.
#[test]
fn a_device_failure_leaves_the_clipper_usable_for_16_bit_rows() {
    let Some(mut gpu) = gpu() else {
        return;
    };
    let device = gpu.device().unwrap().clone();
    let (n, cols) = (64, 300);
    let input = common::storage_buffer(&device, "destroyed input", (n * cols * 4) as u64);
    let output = common::storage_buffer(&device, "output", (cols * 4) as u64);
    input.destroy();
    let t = common::random_tensors(11, n, &[cols, 5], 1.0);
    let f16_rows = common::rounded(&t, microclip::half::f16::from_f32);
    let bf16_rows = common::rounded(&t, microclip::half::bf16::from_f32);
    // b = 4: pass 4 over stored f32 means; b = 1 and 2: over the rows, with row
    // chunks whose f32 partial rows a last dispatch sums (on lavapipe).
    for b in [4, 1, 2] {
        let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(b));
        assert_device_error(&mut gpu, &cfg, &input, &output, n, cols);
        common::check_typed(&mut gpu, &cfg, &f16_rows, n, 1e-5, &format!("f16, b = {b}"));
        common::check_typed(
            &mut gpu,
            &cfg,
            &bf16_rows,
            n,
            1e-5,
            &format!("bf16, b = {b}"),
        );
        common::check(&mut gpu, &cfg, &t, n, 1e-5, &format!("f32, b = {b}"));
    }
}

/// A buffer of another `wgpu::Instance`: wgpu-core 30 panics when the call
/// binds it (its id names another resource of the clipper's instance). The
/// panic is caught as a `ClipError::Device` (it unwound out of the call
/// before, leaving wgpu's error scopes pushed), and the clipper stays usable.
#[test]
fn a_buffer_of_another_instance_is_a_device_error() {
    let Some(mut gpu) = gpu() else {
        return;
    };
    let (other, _queue) = device_with(|limits| limits).expect("a second instance's device");
    let (n, cols) = (8, 40);
    // Not the other instance's first buffer: the output below is the first of
    // the clipper's device, and a buffer with the same id is taken for it
    // ("output buffer is also an input buffer", an error too).
    let _first = common::storage_buffer(&other, "another instance's first buffer", 16);
    let input = common::storage_buffer(&other, "another instance's input", (n * cols * 4) as u64);
    let output = common::storage_buffer(gpu.device().unwrap(), "output", (cols * 4) as u64);
    let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(2));
    for _ in 0..2 {
        assert_device_error(&mut gpu, &cfg, &input, &output, n, cols);
        let t = common::random_tensors(12, n, &[cols], 1.0);
        common::check(&mut gpu, &cfg, &t, n, 1e-5, "after the failed call");
    }
}

/// Clips the `[n, cols]` f32 tensor `input` into `output` and asserts that the
/// call fails with `ClipError::Device`.
fn assert_device_error(
    gpu: &mut Clipper,
    cfg: &ClipConfig,
    input: &wgpu::Buffer,
    output: &wgpu::Buffer,
    n: usize,
    cols: usize,
) {
    let failed = gpu.clip_buffers_into(
        cfg,
        &[GpuTensor::new(input, 0, cols)],
        n,
        &[GpuTensorMut {
            buffer: output,
            offset: 0,
            cols,
        }],
    );
    assert!(matches!(failed, Err(ClipError::Device(_))), "{failed:?}");
}

/// A device whose largest buffer (4 KiB) cannot hold the call's dispatch
/// parameters (one 256-byte uniform block per dispatch, over 5 KiB here):
/// `TooLarge` before any work (it was a validation failure, `ClipError::Device`).
/// With 64 KiB the same calls run and match the reference.
#[test]
fn dispatch_parameters_over_the_largest_buffer() {
    let t: Vec<f32> = (0..8 * 37).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
    let u: Vec<f32> = (0..8 * 3).map(|i| (i % 4) as f32 * 0.5 - 0.7).collect();
    for (max_buffer, fits) in [(4096, false), (1 << 16, true)] {
        let Some((device, queue)) = device_with(|l| wgpu::Limits {
            max_buffer_size: max_buffer,
            max_storage_buffer_binding_size: 4096,
            ..l
        }) else {
            return;
        };
        let mut gpu = Clipper::from_device(device, queue).unwrap();
        for b in [1, 2, 4] {
            let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(b));
            match gpu.clip(&cfg, &[&t, &u], 8) {
                Ok(out) => {
                    assert!(fits, "b {b}: ran with {max_buffer}-byte buffers");
                    let want = microclip::reference::clip_f64(&cfg, &[&t, &u], 8).unwrap();
                    for (g, w) in out.grads.iter().flatten().zip(want.grads.iter().flatten()) {
                        assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "b {b}");
                    }
                }
                Err(e) => assert!(
                    !fits && matches!(&e, ClipError::TooLarge(m) if m.contains("parameters")),
                    "b {b}, {max_buffer}-byte buffers: {e:?}"
                ),
            }
        }
    }
}
