//! Criterion benches of microclip (`cargo bench`), small shapes so that the whole
//! run completes in a few minutes even on a software adapter (lavapipe):
//!
//! * `gpu_device/N64_D262144`: micro-batches b = 1 and 8, inputs already in device
//!   buffers (`clip_buffers_into`), next to the vec4 read-and-sum reference over
//!   the same bytes (`examples/bench_report/reference.wgsl`);
//! * `gpu_device/multi_N64_b4`: 100 tensors (D_p from 1 to 12,500), each in its
//!   own buffer and all packed into one buffer, against one tensor of the same
//!   total width, and the read-and-sum; `gpu_device/multi_N64_b1`: the packed
//!   tensors and the one tensor at b = 1 (pass 4 re-reads the rows, most of
//!   them not 16-byte aligned);
//! * `gpu_device/N64_D262144_f16`, `.._bf16`: the main shape as 16-bit input
//!   (b = 1 and 8), next to the read-and-sum over its N x D x 2 bytes;
//! * `cpu_host/...`: the same shapes on the CPU backend (`Clipper::clip` on host
//!   slices) next to a multi-threaded rayon sum over the same slice, and
//!   `cpu_host/small_N64_b4`: 10,000 tensors of 20 columns against one tensor of
//!   the same 200,000 columns (per-tensor costs).
//!
//! Throughput is the input size, N x D x 4 bytes (x 2 for 16-bit input). GPU timing uses `iter_custom`
//! with wall clock around each call: `clip_buffers_into` submits and polls the
//! device until its statistics are read back; the reference submits and polls
//! until the queue is idle. Flat sampling, 10 samples: one GPU iteration can take
//! a second on lavapipe. Without a GPU adapter only the CPU benches run (a note is
//! printed; with `MICROCLIP_REQUIRE_GPU=1` that is an error).
//!
//! For the full report (read_ratio, the 5-pass baseline, big shapes) run
//! `cargo run --release --example bench_report`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use microclip::half::{bf16, f16};
use microclip::{
    Backend, ClipConfig, Clipper, Dtype, GpuTensor, GpuTensorMut, GradElement, MicroBatches,
    REQUIRE_GPU_ENV,
};
use rayon::prelude::*;

#[allow(dead_code)]
#[path = "../examples/bench_report/kernels.rs"]
mod kernels;

#[allow(dead_code)]
#[path = "../examples/bench_report/data.rs"]
mod data;

use kernels::{Gpu, RefKernels};

const SEED: u64 = 0xbe7c;
/// Main shape: N samples of D columns, micro-batch sizes.
const N: usize = 64;
const D: usize = 262_144;
const BS: [usize; 2] = [1, 8];
/// Multi-tensor shape: N_MULTI samples, b = B_MULTI, TENSORS widths up to MAX_D_P.
const N_MULTI: usize = 64;
const B_MULTI: usize = 4;
const TENSORS: usize = 100;
const MAX_D_P: usize = 12_500;
/// Many small tensors (CPU): SMALL_TENSORS of SMALL_D_P columns, N_MULTI rows.
const SMALL_TENSORS: usize = 10_000;
const SMALL_D_P: usize = 20;

/// A clip bound that clips about half of the micro-batches: the median norm of a
/// probe call that clips nothing.
fn median_bound(norms: &[f32]) -> f32 {
    let mut v: Vec<f32> = norms.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f32::total_cmp);
    v.get(v.len() / 2)
        .copied()
        .filter(|&c| c > 0.0)
        .unwrap_or(1.0)
}

fn probe_config(b: usize) -> ClipConfig {
    ClipConfig::fixed(f32::MAX, MicroBatches::Uniform(b))
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
}

/// Times `clip_buffers_into` on device buffers `tensors` (buffer, byte offset, D_p).
fn bench_device(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    gpu: &Gpu,
    id: &str,
    n: usize,
    b: usize,
    tensors: &[(&wgpu::Buffer, u64, usize)],
    dtype: Dtype,
) {
    let mut clipper = Clipper::from_device(gpu.device.clone(), gpu.queue.clone())
        .expect("microclip builds on the bench's device");
    let outs: Vec<wgpu::Buffer> = tensors
        .iter()
        .map(|&(_, _, d)| {
            gpu.storage_buffer("output", (d * 4) as u64)
                .expect("output")
        })
        .collect();
    let inputs: Vec<GpuTensor<'_>> = tensors
        .iter()
        .map(|&(buffer, at, cols)| GpuTensor::new(buffer, at, cols).with_dtype(dtype))
        .collect();
    let outputs: Vec<GpuTensorMut<'_>> = outs
        .iter()
        .zip(tensors)
        .map(|(buffer, &(_, _, cols))| GpuTensorMut {
            buffer,
            offset: 0,
            cols,
        })
        .collect();
    let probe = clipper
        .clip_buffers_into(&probe_config(b), &inputs, n, &outputs)
        .expect("probe");
    let cfg = ClipConfig::fixed(median_bound(&probe.norms), MicroBatches::Uniform(b));
    group.bench_function(id, |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let stats = clipper
                    .clip_buffers_into(&cfg, &inputs, n, &outputs)
                    .expect("clip_buffers_into");
                total += t.elapsed();
                black_box(stats);
            }
            total
        })
    });
}

/// Times the vec4 read-and-sum over the first `bytes` of `buffer`.
fn bench_read_sum(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    gpu: &Gpu,
    refk: &RefKernels,
    buffer: &wgpu::Buffer,
    bytes: u64,
) {
    let job = refk.read_sum(gpu, buffer, bytes);
    group.bench_function("read_sum", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                job.job.run(gpu);
                total += t.elapsed();
            }
            total
        })
    });
}

fn gpu_benches(c: &mut Criterion) {
    let base = match Clipper::new(Backend::Gpu) {
        Ok(clipper) => clipper,
        Err(e) => {
            if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_GPU_ENV}=1 but no GPU clipper: {e}");
            }
            eprintln!("note: no GPU adapter ({e}); only the CPU benches run");
            return;
        }
    };
    eprintln!("GPU benches on {}", base.backend());
    let gpu = Gpu::new(
        base.device().expect("gpu").clone(),
        base.queue().expect("gpu").clone(),
        None,
    );
    drop(base);
    let refk = RefKernels::new(&gpu);

    let x = data::device_tensor(&gpu, SEED, 0, N, D).expect("input");
    let mut group = c.benchmark_group(format!("gpu_device/N{N}_D{D}"));
    configure(&mut group);
    group.throughput(Throughput::Bytes((N * D * 4) as u64));
    for b in BS {
        bench_device(
            &mut group,
            &gpu,
            &format!("microclip/b{b}"),
            N,
            b,
            &[(&x, 0, D)],
            Dtype::F32,
        );
    }
    bench_read_sum(&mut group, &gpu, &refk, &x, (N * D * 4) as u64);
    group.finish();
    drop(x);

    for dtype in [Dtype::F16, Dtype::Bf16] {
        let x = data::device_tensor_as(&gpu, SEED, 0, N, D, dtype).expect("input");
        let mut group = c.benchmark_group(format!("gpu_device/N{N}_D{D}_{dtype}"));
        configure(&mut group);
        group.throughput(Throughput::Bytes((N * D * 2) as u64));
        for b in BS {
            let id = format!("microclip/b{b}");
            bench_device(&mut group, &gpu, &id, N, b, &[(&x, 0, D)], dtype);
        }
        bench_read_sum(&mut group, &gpu, &refk, &x, (N * D * 2) as u64);
        group.finish();
    }

    let widths = data::spread_widths(TENSORS, MAX_D_P);
    let total: usize = widths.iter().sum();
    let many: Vec<wgpu::Buffer> = widths
        .iter()
        .enumerate()
        .map(|(p, &d)| data::device_tensor(&gpu, SEED, 100 + p as u64, N_MULTI, d).expect("input"))
        .collect();
    let single = data::device_tensor(&gpu, SEED, 1, N_MULTI, total).expect("input");
    let (packed, at) =
        data::packed_tensors(&gpu, SEED, 100, N_MULTI, &widths).expect("packed input");
    let many_refs: Vec<(&wgpu::Buffer, u64, usize)> =
        many.iter().zip(&widths).map(|(b, &d)| (b, 0, d)).collect();
    let packed_refs: Vec<(&wgpu::Buffer, u64, usize)> = widths
        .iter()
        .zip(&at)
        .map(|(&d, &at)| (&packed, at, d))
        .collect();
    // b = 4 as the case; b = 1 also for the packed tensors, where pass 4
    // re-reads the (mostly unaligned) rows.
    for b in [B_MULTI, 1] {
        let mut group = c.benchmark_group(format!("gpu_device/multi_N{N_MULTI}_b{b}"));
        configure(&mut group);
        group.throughput(Throughput::Bytes((N_MULTI * total * 4) as u64));
        if b == B_MULTI {
            bench_device(
                &mut group,
                &gpu,
                &format!("microclip/{TENSORS}_buffers"),
                N_MULTI,
                b,
                &many_refs,
                Dtype::F32,
            );
        }
        bench_device(
            &mut group,
            &gpu,
            &format!("microclip/{TENSORS}_tensors_1_buffer"),
            N_MULTI,
            b,
            &packed_refs,
            Dtype::F32,
        );
        bench_device(
            &mut group,
            &gpu,
            "microclip/1_buffer",
            N_MULTI,
            b,
            &[(&single, 0, total)],
            Dtype::F32,
        );
        bench_read_sum(
            &mut group,
            &gpu,
            &refk,
            &single,
            (N_MULTI * total * 4) as u64,
        );
        group.finish();
    }
}

/// Multi-threaded sum with 8 independent lanes per task (vectorised).
fn rayon_sum(x: &[f32]) -> f32 {
    x.par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0.0f32; 8];
            let mut it = c.chunks_exact(8);
            for v in &mut it {
                for (a, &e) in acc.iter_mut().zip(v) {
                    *a += e;
                }
            }
            acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
        })
        .sum()
}

/// Times `Clipper::clip` on the CPU backend.
fn bench_host<T: GradElement>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    clipper: &mut Clipper,
    id: &str,
    n: usize,
    b: usize,
    tensors: &[&[T]],
) {
    let probe = clipper.clip(&probe_config(b), tensors, n).expect("probe");
    let cfg = ClipConfig::fixed(median_bound(&probe.stats.norms), MicroBatches::Uniform(b));
    group.bench_function(id, |bench| {
        bench.iter(|| clipper.clip(&cfg, black_box(tensors), n).expect("clip"))
    });
}

fn cpu_benches(c: &mut Criterion) {
    let mut clipper = Clipper::new(Backend::Cpu).expect("cpu clipper");
    let x = data::host_tensor(SEED, 0, N, D);
    let mut group = c.benchmark_group(format!("cpu_host/N{N}_D{D}"));
    configure(&mut group);
    group.throughput(Throughput::Bytes((N * D * 4) as u64));
    for b in BS {
        bench_host(
            &mut group,
            &mut clipper,
            &format!("microclip/b{b}"),
            N,
            b,
            &[&x],
        );
    }
    group.bench_function("read_sum", |bench| bench.iter(|| rayon_sum(black_box(&x))));
    group.finish();

    // 16-bit input; the read-and-sum covers the same N x D x 2 bytes.
    let halves: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let bhalves: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    for dtype in [Dtype::F16, Dtype::Bf16] {
        let mut group = c.benchmark_group(format!("cpu_host/N{N}_D{D}_{dtype}"));
        configure(&mut group);
        group.throughput(Throughput::Bytes((N * D * 2) as u64));
        for b in BS {
            let id = format!("microclip/b{b}");
            match dtype {
                Dtype::F16 => bench_host(&mut group, &mut clipper, &id, N, b, &[&halves]),
                _ => bench_host(&mut group, &mut clipper, &id, N, b, &[&bhalves]),
            }
        }
        let same_bytes = &x[..x.len() / 2];
        group.bench_function("read_sum", |bench| {
            bench.iter(|| rayon_sum(black_box(same_bytes)))
        });
        group.finish();
    }
    drop((x, halves, bhalves));

    let widths = data::spread_widths(TENSORS, MAX_D_P);
    let total: usize = widths.iter().sum();
    let many: Vec<Vec<f32>> = widths
        .iter()
        .enumerate()
        .map(|(p, &d)| data::host_tensor(SEED, 100 + p as u64, N_MULTI, d))
        .collect();
    let many_refs: Vec<&[f32]> = many.iter().map(|v| v.as_slice()).collect();
    let single = data::host_tensor(SEED, 1, N_MULTI, total);
    bench_many_against_one(
        c,
        &mut clipper,
        &format!("cpu_host/multi_N{N_MULTI}_b{B_MULTI}"),
        &format!("microclip/{TENSORS}_tensors"),
        &many_refs,
        &single,
    );
    drop((many, single));

    // Many small tensors (biases, norms' scales): per-tensor costs, not bytes.
    let small: Vec<Vec<f32>> = (0..SMALL_TENSORS)
        .map(|p| data::host_tensor(SEED, 1000 + p as u64, N_MULTI, SMALL_D_P))
        .collect();
    let small_refs: Vec<&[f32]> = small.iter().map(|v| v.as_slice()).collect();
    let single = data::host_tensor(SEED, 2, N_MULTI, SMALL_TENSORS * SMALL_D_P);
    bench_many_against_one(
        c,
        &mut clipper,
        &format!("cpu_host/small_N{N_MULTI}_b{B_MULTI}"),
        &format!("microclip/{SMALL_TENSORS}_tensors_of_{SMALL_D_P}"),
        &small_refs,
        &single,
    );
}

/// A CPU group of `many` tensors against `single`, one tensor of their total
/// width (N_MULTI rows, b = B_MULTI), and the rayon read-and-sum over it.
fn bench_many_against_one(
    c: &mut Criterion,
    clipper: &mut Clipper,
    name: &str,
    many_id: &str,
    many: &[&[f32]],
    single: &[f32],
) {
    let mut group = c.benchmark_group(name);
    configure(&mut group);
    group.throughput(Throughput::Bytes((single.len() * 4) as u64));
    bench_host(&mut group, clipper, many_id, N_MULTI, B_MULTI, many);
    bench_host(
        &mut group,
        clipper,
        "microclip/1_tensor",
        N_MULTI,
        B_MULTI,
        &[single],
    );
    group.bench_function("read_sum", |bench| {
        bench.iter(|| rayon_sum(black_box(single)))
    });
    group.finish();
}

criterion_group!(benches, gpu_benches, cpu_benches);
criterion_main!(benches);
