//! Test helpers: clippers, random inputs of awkward shapes, and comparison with the
//! float64 reference.
#![allow(dead_code)]

use microclip::half::{bf16, f16};
use microclip::reference::{clip_f64, Reference};
use microclip::{Backend, ClipConfig, ClipOutput, Clipper, REQUIRE_GPU_ENV};
use microclip::{ClipBound, ClipFunction, Dtype, GaussianNoise, GradElement, MicroBatches};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;

/// A GPU clipper, or `None` (test skipped with a message) when there is no adapter
/// and `MICROCLIP_REQUIRE_GPU` is not `1`. With it set, a missing GPU fails the test.
pub fn gpu() -> Option<Clipper> {
    match Clipper::new(Backend::Gpu) {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_GPU_ENV}=1 but no GPU clipper: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// Random per-sample gradients: `n` rows per tensor, each row with its own scale
/// (some rows 10x larger, like "dragger" samples), values of both signs.
pub fn random_tensors(seed: u64, n: usize, widths: &[usize], magnitude: f32) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let row_scale: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random_bool(0.2) {
                10.0
            } else {
                rng.random_range(0.1..2.0)
            }
        })
        .collect();
    widths
        .iter()
        .map(|&d| {
            (0..n * d)
                .map(|k| {
                    let base: f32 = rng.random_range(-1.0..1.0) + 0.3; // a shared direction
                    base * row_scale[k / d] * magnitude
                })
                .collect()
        })
        .collect()
}

/// Random strictly increasing offsets `[0, ..., n]` with `m` micro-batches.
pub fn random_offsets(seed: u64, n: usize, m: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut cuts: Vec<usize> = (1..n).collect();
    for i in (1..cuts.len()).rev() {
        cuts.swap(i, rng.random_range(0..=i));
    }
    let mut o: Vec<usize> = cuts.into_iter().take(m.saturating_sub(1)).collect();
    o.push(0);
    o.push(n);
    o.sort_unstable();
    o
}

pub fn slices(t: &[Vec<f32>]) -> Vec<&[f32]> {
    t.iter().map(|v| v.as_slice()).collect()
}

/// Absolute error allowed everywhere: an f32 result that underflows (the reference
/// below f32's normal range) or a subnormal flushed to zero.
const F32_FLOOR: f64 = 2.0 * f32::MIN_POSITIVE as f64;

/// Relative L2 error of `got` against `want` over all tensors (finite entries).
pub fn rel_l2(got: &[Vec<f32>], want: &[Vec<f64>]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        for (&a, &b) in g.iter().zip(w) {
            num += (a as f64 - b).powi(2);
            den += b * b;
        }
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// A reference value an f32 result can hold (not near or beyond `f32::MAX`).
fn in_f32_range(b: f64) -> bool {
    b.is_finite() && b.abs() < 0.9999 * f32::MAX as f64
}

fn same_nonfinite(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a.is_infinite() && a == b)
}

/// Checks every output element, the norms, factors, bound and counts against the
/// float64 reference. `tol` is the relative L2 bound on the output.
pub fn assert_matches(out: &ClipOutput, want: &Reference, tol: f64, what: &str) {
    assert_eq!(out.grads.len(), want.grads.len(), "{what}: tensor count");
    // Every element: finite where the reference is, NaN/inf where it is, and close.
    let scale: f64 = want
        .grads
        .iter()
        .flatten()
        .filter(|v| v.is_finite())
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
        / (want.grads.iter().map(|g| g.len()).sum::<usize>() as f64).sqrt();
    // An element may differ by a rounding of its terms s_j * g_j[c] (1e-5 of their
    // magnitudes: about 100 f32 roundings), however far they cancel.
    for (p, ((g, w), mags)) in out
        .grads
        .iter()
        .zip(&want.grads)
        .zip(&want.magnitudes)
        .enumerate()
    {
        assert_eq!(g.len(), w.len(), "{what}: tensor {p} length");
        for (c, ((&a, &b), &mag)) in g.iter().zip(w).zip(mags).enumerate() {
            let a = a as f64;
            if b.is_finite() && b.abs() >= 0.9999 * f32::MAX as f64 && a.is_infinite() {
                // The true value is (about) beyond f32's range: inf of its sign.
                assert_eq!(
                    a.signum(),
                    b.signum(),
                    "{what}: out[{p}][{c}] = {a}, reference {b:e}"
                );
            } else if b.is_finite() {
                let err = (a - b).abs();
                assert!(
                    a.is_finite() && err <= 1e-4 * (b.abs() + scale) + 1e-5 * mag + F32_FLOOR,
                    "{what}: out[{p}][{c}] = {a:e}, reference {b:e} (rms {scale:e})"
                );
            } else {
                assert!(
                    same_nonfinite(a, b),
                    "{what}: out[{p}][{c}] = {a}, reference {b}"
                );
            }
        }
    }
    // Relative L2 error over the elements an f32 result can hold, plus a
    // millionth of the terms' magnitudes: results whose terms cancel (the float64
    // reference can then be exactly 0) keep the rounding of their terms. Results
    // at the bottom of f32's range (subnormals may flush to zero on a GPU) are
    // checked by the absolute floor above only.
    let (mut err2, mut want2, mut mag2, mut count) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for ((g, w), mags) in out.grads.iter().zip(&want.grads).zip(&want.magnitudes) {
        for ((&a, &b), &mag) in g.iter().zip(w).zip(mags) {
            if in_f32_range(b) {
                err2 += (a as f64 - b).powi(2);
                want2 += b * b;
                mag2 += mag * mag;
                count += 1;
            }
        }
    }
    let rms = |sum: f64| (sum / count.max(1) as f64).sqrt();
    let (err, want_rms, mag_rms) = (rms(err2), rms(want2), rms(mag2));
    assert!(
        err <= tol * want_rms + 1e-6 * mag_rms || scale < 1e-35,
        "{what}: rms error {err:e} > {tol:e} x rms {want_rms:e} + 1e-6 x rms magnitude {mag_rms:e}"
    );

    let s = &out.stats;
    assert_eq!(s.norms.len(), want.norms.len(), "{what}: norms length");
    for (j, (&a, &b)) in s.norms.iter().zip(&want.norms).enumerate() {
        let a = a as f64;
        if b.is_finite() && b <= f32::MAX as f64 {
            assert!(
                // Relative, down to f32's normal range (a norm below it may
                // round or flush to 0 as an f32 statistic).
                (a - b).abs() <= 1e-5 * b + F32_FLOOR,
                "{what}: norm[{j}] = {a:e}, reference {b:e}"
            );
        } else if b.is_finite() {
            assert_eq!(a, f64::INFINITY, "{what}: norm[{j}] beyond f32 range");
        } else {
            assert!(
                same_nonfinite(a, b),
                "{what}: norm[{j}] = {a}, reference {b}"
            );
        }
    }
    for (j, (&a, &b)) in s.factors.iter().zip(&want.factors).enumerate() {
        let a = a as f64;
        if b.is_nan() {
            assert!(a.is_nan(), "{what}: factor[{j}] = {a}, reference NaN");
        } else if b > f32::MAX as f64 {
            assert_eq!(a, f64::INFINITY, "{what}: factor[{j}] beyond f32 range");
        } else {
            assert!(
                // Relative, down to f32's normal range (tiny factors count too).
                (a - b).abs() <= 1e-5 * b.abs() + F32_FLOOR,
                "{what}: factor[{j}] = {a:e}, reference {b:e}"
            );
        }
    }
    if want.clip_bound.is_nan() {
        assert!(
            s.clip_bound.is_nan(),
            "{what}: bound {} (reference NaN)",
            s.clip_bound
        );
    } else if want.clip_bound > f32::MAX as f64 {
        assert_eq!(
            s.clip_bound,
            f32::INFINITY,
            "{what}: bound beyond f32 range"
        );
    } else {
        let b = want.clip_bound;
        assert!(
            // Relative, down to f32's normal range (an adaptive bound from
            // subnormal norms keeps fewer bits, or flushes on a GPU).
            (s.clip_bound as f64 - b).abs() <= 1e-5 * b + F32_FLOOR,
            "{what}: bound {} vs reference {b}",
            s.clip_bound
        );
    }
    assert_eq!(s.groups, want.groups, "{what}: groups");
    assert_eq!(
        s.group_bounds.len(),
        want.group_bounds.len(),
        "{what}: bounds"
    );
    for (g, (&a, &b)) in s.group_bounds.iter().zip(&want.group_bounds).enumerate() {
        let a = a as f64;
        assert!(
            same_nonfinite(a, b)
                || (b > f32::MAX as f64 && a == f64::INFINITY)
                || (a - b).abs() <= 1e-5 * b + F32_FLOOR,
            "{what}: group bound {g} = {a:e}, reference {b:e}"
        );
    }
    let (a, b) = (s.noise_std as f64, want.noise_std);
    assert!(
        same_nonfinite(a, b)
            || (b > f32::MAX as f64 && a == f64::INFINITY)
            || (a - b).abs() <= 1e-5 * b + F32_FLOOR,
        "{what}: noise std {a:e}, reference {b:e}"
    );
    assert_eq!(s.clipped_count, want.clipped_count, "{what}: clipped count");
    assert_eq!(
        s.nonfinite_count, want.nonfinite_count,
        "{what}: non-finite count"
    );
}

/// Runs `clipper` and the reference on the same input and compares.
pub fn check(
    clipper: &mut Clipper,
    cfg: &ClipConfig,
    tensors: &[Vec<f32>],
    n: usize,
    tol: f64,
    what: &str,
) {
    check_typed(clipper, cfg, tensors, n, tol, what);
}

/// `tensors` rounded to `T` (round to nearest even).
pub fn rounded<T: GradElement>(tensors: &[Vec<f32>], from_f32: fn(f32) -> T) -> Vec<Vec<T>> {
    tensors
        .iter()
        .map(|t| t.iter().map(|&x| from_f32(x)).collect())
        .collect()
}

/// `typed` widened to f32 (exact for every `GradElement`).
pub fn widened<T: GradElement>(typed: &[Vec<T>]) -> Vec<Vec<f32>> {
    typed
        .iter()
        .map(|t| t.iter().map(|x| x.to_f32()).collect())
        .collect()
}

/// [`check`] on inputs of any element type: `clipper` gets `typed`, the reference
/// gets the same values widened to f32 (exactly), so only the accumulation differs.
pub fn check_typed<T: GradElement>(
    clipper: &mut Clipper,
    cfg: &ClipConfig,
    typed: &[Vec<T>],
    n: usize,
    tol: f64,
    what: &str,
) {
    let want = clip_f64(cfg, &slices(&widened(typed)), n).expect("reference");
    let views: Vec<&[T]> = typed.iter().map(Vec::as_slice).collect();
    let got = clipper
        .clip(cfg, &views, n)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_matches(&got, &want, tol, what);
}

/// `x` rounded to `dtype`: its values widened back to f32 (as the reference
/// sees them) and the bytes a buffer of that element type holds.
pub fn as_dtype(x: Vec<f32>, dtype: Dtype) -> (Vec<f32>, Vec<u8>) {
    fn typed<T: GradElement>(x: Vec<f32>, from_f32: fn(f32) -> T) -> (Vec<f32>, Vec<u8>) {
        let typed = rounded(&[x], from_f32);
        let bytes = bytemuck::cast_slice(&typed[0]).to_vec();
        (widened(&typed).remove(0), bytes)
    }
    match dtype {
        Dtype::F32 => typed(x, |v| v),
        Dtype::F16 => typed(x, f16::from_f32),
        Dtype::Bf16 => typed(x, bf16::from_f32),
    }
}

/// [`check`] with the inputs rounded to `dtype` first.
pub fn check_as(
    clipper: &mut Clipper,
    cfg: &ClipConfig,
    tensors: &[Vec<f32>],
    n: usize,
    tol: f64,
    what: &str,
    dtype: Dtype,
) {
    match dtype {
        Dtype::F32 => check(clipper, cfg, tensors, n, tol, what),
        Dtype::F16 => check_typed(clipper, cfg, &rounded(tensors, f16::from_f32), n, tol, what),
        Dtype::Bf16 => check_typed(
            clipper,
            cfg,
            &rounded(tensors, bf16::from_f32),
            n,
            tol,
            what,
        ),
    }
}

/// One random case: shape, layout, bound, magnitude and binding limit.
#[derive(Debug, Clone)]
struct Case {
    n: usize,
    widths: Vec<usize>,
    layout: MicroBatches,
    adaptive: Option<f32>,
    clip: f32,
    magnitude: f32,
    max_binding: Option<u64>,
    function: ClipFunction,
    /// (number of groups, per-group bounds instead of one) when grouped.
    groups: Option<(usize, bool)>,
    noise: Option<GaussianNoise>,
    /// Element type of the inputs.
    dtype: Dtype,
    /// The GPU norm pass's workgroup floor for widening its tiles (None: the
    /// adapter's default; `u64::MAX`: always 4096 columns; 1: the widest).
    min_tile_workgroups: Option<u64>,
    /// From how many rows per micro-batch the GPU stores the means (None: the
    /// adapter's default; 2 or 3).
    means_min_rows: Option<u64>,
    /// Whether the GPU's reduction kernels run 8-thread workgroups (None: the
    /// adapter's default, 8 on a software adapter; Some(false): 64 and 256 threads).
    small_workgroups: Option<bool>,
    /// Rows per chunk of the GPU's last pass over input rows (None: the adapter's
    /// default, 32 on a software adapter, which cuts no case here: N <= 47;
    /// Some(0): no chunks; 1-11 rows cut the few rows into many chunks).
    pass4_chunk_rows: Option<u32>,
    seed: u64,
}

impl Case {
    /// The group of each tensor: the first G tensors take groups 0..G (so none is
    /// empty), the others a pseudo-random one.
    fn group_of(&self, g: usize) -> Vec<usize> {
        (0..self.widths.len())
            .map(|p| {
                if p < g {
                    g - 1 - p
                } else {
                    (self.seed as usize ^ (p * 7919)) % g
                }
            })
            .collect()
    }

    fn config(&self) -> ClipConfig {
        let mut bound = match self.adaptive {
            Some(scale) => ClipBound::Adaptive { scale },
            None => ClipBound::Fixed(self.clip),
        };
        let mut cfg =
            ClipConfig::new(bound.clone(), self.layout.clone()).with_function(self.function);
        if let Some((g, per_group)) = self.groups {
            if per_group && self.adaptive.is_none() {
                bound = ClipBound::PerGroup((0..g).map(|k| self.clip / (1.0 + k as f32)).collect());
            }
            cfg = ClipConfig { bound, ..cfg }.with_groups(self.group_of(g));
        }
        if let Some(noise) = self.noise {
            cfg = cfg.with_noise(noise);
        }
        cfg
    }
}

fn width() -> impl Strategy<Value = usize> {
    prop_oneof![
        1..40usize,
        1..3000usize,
        (1..10usize, -1..=1i64).prop_map(|(k, d)| (k as i64 * 256 + d).max(1) as usize),
        (1..4usize, -1..=1i64).prop_map(|(k, d)| (k as i64 * 1024 + d) as usize),
        (1..3usize, -1..=1i64).prop_map(|(k, d)| (k as i64 * 4096 + d) as usize),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        1..48usize,
        prop::collection::vec(width(), 1..6),
        any::<u64>(),
    )
        .prop_flat_map(|(n, widths, seed)| {
            let tensors = widths.len();
            let layout = prop_oneof![
                (1..=n + 1).prop_map(MicroBatches::Uniform),
                Just(MicroBatches::Uniform(1)),
                Just(MicroBatches::Uniform(n)),
                (1..=n).prop_map(move |m| MicroBatches::Offsets(random_offsets(seed, n, m))),
            ];
            let max_w = *widths.iter().max().unwrap() as u64;
            // A limit below one row is a TooLarge error (tested in errors.rs), and so is
            // one below the norm partials (16 bytes per micro-batch and 4096-column
            // tile, which also bounds the N x G per-row weights).
            let tiles: u64 = widths.iter().map(|&w| (w as u64).div_ceil(4096)).sum();
            let floor = (max_w * 4 + 256).max(n as u64 * tiles * 16);
            let max_binding = prop_oneof![
                Just(None),
                (0..20_000u64).prop_map(move |extra| Some(floor + extra)),
            ];
            (
                Just((n, widths, seed)),
                layout,
                prop_oneof![Just(None), Just(Some(1.0f32)), (0.2f32..3.0).prop_map(Some)],
                -3.0f32..3.0,
                prop_oneof![
                    Just(1.0f32),
                    Just(1e30),
                    Just(1e-30),
                    Just(1e-3),
                    Just(1e36)
                ],
                max_binding,
                prop_oneof![
                    2 => Just(ClipFunction::Hard),
                    1 => (1e-3f32..1.0).prop_map(|gamma| ClipFunction::Automatic { gamma }),
                    1 => Just(ClipFunction::Normalize),
                ],
                prop_oneof![
                    2 => Just(None),
                    1 => (1..=tensors, any::<bool>()).prop_map(Some),
                ],
                prop_oneof![
                    3 => Just(None),
                    1 => (0.0f32..1.5, any::<u64>(), any::<u64>())
                        .prop_map(|(multiplier, seed, step)| Some(GaussianNoise { multiplier, seed, step })),
                ],
                prop_oneof![
                    2 => Just(Dtype::F32),
                    1 => Just(Dtype::F16),
                    1 => Just(Dtype::Bf16),
                ],
                (
                    prop_oneof![
                        Just(None),
                        Just(Some(u64::MAX)),
                        (1..200u64).prop_map(Some),
                    ],
                    prop_oneof![Just(None), Just(Some(2u64)), Just(Some(3u64))],
                    prop_oneof![Just(None), Just(Some(false)), Just(Some(true))],
                    prop_oneof![Just(None), Just(Some(0u32)), (1..12u32).prop_map(Some)],
                ),
            )
        })
        .prop_map(
            |(
                (n, widths, seed),
                layout,
                adaptive,
                log_clip,
                magnitude,
                max_binding,
                function,
                groups,
                noise,
                dtype,
                (min_tile_workgroups, means_min_rows, small_workgroups, pass4_chunk_rows),
            )| {
                Case {
                    n,
                    widths,
                    layout,
                    adaptive,
                    clip: (10f32.powf(log_clip) * magnitude).min(1e37),
                    magnitude,
                    max_binding,
                    function,
                    groups,
                    // GPU noise is formed in f32: with values near f32::MAX the noise
                    // term itself can overflow where the float64 reference does not.
                    noise: noise.filter(|_| magnitude < 1e36),
                    // f16 holds magnitudes 6e-8 .. 65504: beyond them, use bf16.
                    dtype: match dtype {
                        Dtype::F16 if !(1e-3..=1.0).contains(&magnitude) => Dtype::Bf16,
                        d => d,
                    },
                    seed,
                    min_tile_workgroups,
                    means_min_rows,
                    small_workgroups,
                    pass4_chunk_rows,
                }
            },
        )
}

/// Runs `cases` random cases (shape, layout, bound, magnitude, binding limit) on
/// `clipper` against the float64 reference; proptest shrinks a failure.
pub fn run_random_cases(clipper: Clipper, cases: u32, tol: f64) {
    let clipper = RefCell::new(clipper);
    let mut runner = TestRunner::new(Config::with_cases(cases));
    runner
        .run(&case(), |c| {
            let mut clipper = clipper.borrow_mut();
            clipper.set_max_binding_bytes(c.max_binding.unwrap_or(u64::MAX));
            clipper.set_gpu_min_tile_workgroups(c.min_tile_workgroups);
            clipper.set_gpu_means_min_rows(c.means_min_rows);
            clipper.set_gpu_small_workgroups(c.small_workgroups);
            clipper.set_gpu_pass4_chunk_rows(c.pass4_chunk_rows);
            let t = random_tensors(c.seed, c.n, &c.widths, c.magnitude);
            let cfg = c.config();
            check_as(&mut clipper, &cfg, &t, c.n, tol, &format!("{c:?}"), c.dtype);
            Ok(())
        })
        .unwrap();
}

/// A `size`-byte storage buffer of `device`, contents unset (for calls that
/// must fail, and for outputs).
pub fn storage_buffer(device: &wgpu::Device, label: &str, size: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}

/// `gpu.clip_buffers` on `inputs`, each returned output buffer read back.
pub fn clip_buffers_read(
    gpu: &mut Clipper,
    cfg: &ClipConfig,
    inputs: &[microclip::GpuTensor<'_>],
    n: usize,
) -> ClipOutput {
    let (bufs, stats) = gpu.clip_buffers(cfg, inputs, n).unwrap();
    let grads = bufs
        .iter()
        .zip(inputs)
        .map(|(b, t)| read_buffer(gpu, b, 0, t.cols))
        .collect();
    ClipOutput { grads, stats }
}

/// `len` f32 of a GPU clipper's `buffer` from byte `offset`, read back to the host.
pub fn read_buffer(gpu: &Clipper, buffer: &wgpu::Buffer, offset: u64, len: usize) -> Vec<f32> {
    let device = gpu.device().unwrap();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: len as u64 * 4,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, len as u64 * 4);
    gpu.queue().unwrap().submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let v = bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec();
    v
}

/// Corner cases of the factors, each (name, config, tensors, N), run on every
/// backend against the reference: an adaptive hard bound with groups where a
/// non-finite micro-batch's other group lies below the bound (Propagate); no
/// finite micro-batch with groups (the bound and every factor NaN under
/// Propagate, zeros under Skip); adaptive scales far from 1 (the bound, the
/// total bound and the noise scale stay finite); AUTO-S with `C / gamma` beyond
/// f32 on a micro-batch whose mean is exactly zero.
/// Micro-batches of two rows that cancel: micro-batch 1's mean (0, 1e-18) is
/// normalised by 1e18 from rows of magnitude 1, or left unclipped by an adaptive
/// bound of scale 2 (out = (0.5, 0.5), or about (1e-18, 5e-19)). A pass that
/// scales each row before summing a micro-batch's rows loses micro-batch 0's
/// terms to that cancellation (the CPU's re-reading pass and the GPU's pass 4
/// over input rows did until 2026-12-05).
pub fn cancelling_rows_cases() -> Vec<(String, ClipConfig, Vec<Vec<f32>>, usize)> {
    let cancelling = vec![vec![0.3, 0.0, 0.3, 0.0, 1.0, 1e-18, -1.0, 1e-18]];
    let two = || MicroBatches::Uniform(2);
    [
        (ClipFunction::Normalize, ClipConfig::fixed(1.0, two())),
        (
            ClipFunction::Automatic { gamma: 1e-20 },
            ClipConfig::fixed(1.0, two()),
        ),
        (ClipFunction::Hard, ClipConfig::adaptive(2.0, two())),
    ]
    .into_iter()
    .map(|(function, cfg)| {
        (
            format!("rows that cancel, {function:?}"),
            cfg.with_function(function),
            cancelling.clone(),
            4,
        )
    })
    .collect()
}

pub fn factor_edge_cases() -> Vec<(String, ClipConfig, Vec<Vec<f32>>, usize)> {
    use microclip::NonFinitePolicy::{Propagate, Skip};
    let mut cases = Vec::new();
    let one_row = MicroBatches::Uniform(1);
    // Adaptive (scale 1), one row per micro-batch, tensors 0 and 1 in groups 0 and 1.
    let two_groups = || ClipConfig::adaptive(1.0, one_row.clone()).with_groups(vec![0, 1]);
    // Group 1 of micro-batch 2 (norm 0.5) is below its bound (4) while group 0
    // of that micro-batch is NaN: its factor is 1, not C / norm.
    let below = vec![vec![1.0, 1.0, f32::NAN], vec![4.0, 5.0, 0.5]];
    let mut wide = random_tensors(21, 6, &[3, 70], 1.0);
    wide[0][2 * 3 + 1] = f32::NAN;
    for function in [ClipFunction::Hard, ClipFunction::Normalize] {
        for (name, t, n) in [("3 rows", &below, 3), ("6 random rows", &wide, 6)] {
            let cfg = two_groups()
                .with_function(function)
                .with_non_finite(Propagate);
            cases.push((
                format!("{name}, {function:?}, adaptive, groups, Propagate"),
                cfg,
                t.clone(),
                n,
            ));
        }
    }
    // A norm exactly at a fixed bound is not clipped (norm > C counts), beside
    // one above it: rows [1, 1, 1, 1] and [2, 2, 2, 2], norms 2 and 4 under
    // C = 2 (powers of two: the norms and C / norm are exact in f32, whatever
    // the division, so no rounding decides the count).
    cases.push((
        "a norm exactly at the fixed bound".into(),
        ClipConfig::fixed(2.0, one_row.clone()),
        vec![vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]],
        2,
    ));
    // No finite micro-batch: group 0 NaN everywhere, group 1 finite.
    let none_finite = vec![vec![f32::NAN, f32::NAN], vec![3.0, 4.0]];
    for function in [
        ClipFunction::Hard,
        ClipFunction::Normalize,
        ClipFunction::Automatic { gamma: 0.1 },
    ] {
        for policy in [Propagate, Skip] {
            let cfg = two_groups().with_function(function).with_non_finite(policy);
            cases.push((
                format!("no finite micro-batch, {function:?}, {policy:?}"),
                cfg,
                none_finite.clone(),
                2,
            ));
        }
    }
    // No finite micro-batch, group 1 all zeros: NaN factors, NaN outputs.
    let zero_group = vec![vec![f32::NAN, f32::NAN], vec![0.0, 0.0]];
    let cfg = two_groups().with_non_finite(Propagate);
    cases.push((
        "no finite micro-batch, a zero group, Propagate".into(),
        cfg,
        zero_group,
        2,
    ));
    // No finite micro-batch and sigma = 0: the bound is NaN, the noise none.
    let cfg = two_groups().with_noise(GaussianNoise {
        multiplier: 0.0,
        seed: 1,
        step: 1,
    });
    cases.push((
        "no finite micro-batch, sigma 0".into(),
        cfg,
        none_finite.clone(),
        2,
    ));
    // Adaptive scales far from 1, with noise (the total bound is the adaptive bound).
    let t = random_tensors(22, 8, &[5, 300], 1.0);
    for scale in [1e25f32, 3e-20, 1e-30] {
        for function in [ClipFunction::Hard, ClipFunction::Normalize] {
            let cfg = ClipConfig::adaptive(scale, MicroBatches::Uniform(2))
                .with_function(function)
                .with_noise(GaussianNoise {
                    multiplier: 0.5,
                    seed: 7,
                    step: 1,
                });
            cases.push((
                format!("adaptive scale {scale:e}, {function:?}"),
                cfg,
                t.clone(),
                8,
            ));
        }
    }
    // Scale 1e25 on norms of 2^44: C = 1.8e38, near f32::MAX but inside it
    // (2^44 x 2^84 would not be); scale 1e-30 on norms near 1e-9 (C near 1e-39
    // if the power of two met the norm first).
    let near_max = vec![vec![2f32.powi(44), 2f32.powi(45)]];
    for function in [ClipFunction::Hard, ClipFunction::Normalize] {
        let cfg = ClipConfig::adaptive(1e25, one_row.clone()).with_function(function);
        cases.push((
            format!("scale 1e25, C near f32::MAX, {function:?}"),
            cfg,
            near_max.clone(),
            2,
        ));
    }
    let tiny = random_tensors(24, 8, &[5, 300], 1e-9);
    let cfg = ClipConfig::adaptive(1e-30, MicroBatches::Uniform(2))
        .with_function(ClipFunction::Normalize);
    cases.push(("scale 1e-30 on norms near 1e-9".into(), cfg, tiny, 8));
    // AUTO-S with C / gamma = 1e39 on a micro-batch of zero rows.
    let mut t = random_tensors(23, 6, &[4, 40], 1e30);
    for tensor in &mut t {
        let d = tensor.len() / 6;
        tensor[2 * d..4 * d].fill(0.0);
    }
    let cfg = ClipConfig::fixed(1e36, MicroBatches::Uniform(2))
        .with_function(ClipFunction::Automatic { gamma: 1e-3 });
    cases.push((
        "AUTO-S, C / gamma beyond f32, a zero micro-batch".into(),
        cfg,
        t,
        6,
    ));
    // Normalize on micro-batches whose mean is exactly zero, whole or in one
    // group: factor 0, nothing added (a factor of 1 or C / 0 passed every other
    // case: mutation testing).
    let mut t = random_tensors(3, 6, &[5, 300], 1.0);
    for tensor in &mut t {
        let d = tensor.len() / 6;
        tensor[2 * d..4 * d].fill(0.0);
    }
    t[1][4 * 300..].fill(0.0);
    for b in [1, 2] {
        for (bound, cfg) in [
            ("fixed", ClipConfig::fixed(0.5, MicroBatches::Uniform(b))),
            (
                "fixed, groups",
                ClipConfig::fixed(0.5, MicroBatches::Uniform(b)).with_groups(vec![0, 1]),
            ),
            (
                "adaptive, groups",
                ClipConfig::adaptive(1.0, MicroBatches::Uniform(b)).with_groups(vec![0, 1]),
            ),
        ] {
            cases.push((
                format!("Normalize, zero micro-batches, {bound}, b = {b}"),
                cfg.with_function(ClipFunction::Normalize),
                t.clone(),
                6,
            ));
        }
    }
    // AUTO-S whose factors C / (norm + gamma) overflow f32 while every term
    // s_j g_j fits: one sign, then random signs (inf - inf was NaN).
    let cfg = ClipConfig::fixed(1e30, one_row.clone())
        .with_function(ClipFunction::Automatic { gamma: 1e-20 });
    cases.push((
        "AUTO-S, factors 1e40 on norms of 1e-10".into(),
        cfg,
        vec![vec![6e-11, 8e-11, 3e-11, 4e-11]],
        2,
    ));
    let t = random_tensors(25, 6, &[3, 50], 1e-36);
    for b in [1, 2, 3] {
        let cfg = ClipConfig::fixed(1e37, MicroBatches::Uniform(b))
            .with_function(ClipFunction::Automatic { gamma: 1e-3 });
        cases.push((
            format!("AUTO-S, factors 1e40 on norms near 1e-35, b = {b}"),
            cfg,
            t.clone(),
            6,
        ));
    }
    // Adaptive scales above 2^16 over ratios C / norm near 1e-18 and 1e-36: the
    // plain ratio's product vanished before its 2^shift was applied (the clipped
    // micro-batch dropped, its factor 0; a review, twenty-fifth session).
    let mut t = vec![0.0f32; 8];
    for (r, m) in [2e-20f32, 2e-20, 1e36, 1e36].into_iter().enumerate() {
        t[2 * r] = 0.6 * m;
        t[2 * r + 1] = 0.8 * m;
    }
    for scale in [3e38f32, 1e20] {
        cases.push((
            format!("adaptive scale {scale:e}, ratios far below 1"),
            ClipConfig::adaptive(scale, MicroBatches::Uniform(2)),
            vec![t.clone()],
            4,
        ));
    }
    // Normalize with C near f32::MAX on a norm of 1 whose largest element is
    // below 1: C / max |g| overflows f32 where the factor C / norm does not.
    let cfg = ClipConfig::fixed(3e38, one_row.clone()).with_function(ClipFunction::Normalize);
    cases.push((
        "Normalize, C = 3e38 on a norm of 1".into(),
        cfg,
        vec![vec![0.6, 0.8]],
        1,
    ));
    cases
}

/// An example's binary, built (or found up to date) by cargo in the profile this
/// test was built with. Asking cargo, rather than taking whatever
/// `target/*/examples/<name>` holds, never runs a stale binary.
pub fn example_bin(name: &str) -> std::path::PathBuf {
    let profile = if cfg!(debug_assertions) {
        "test"
    } else {
        "release"
    };
    let out = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", name, "--profile", profile])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cargo build --example {name}: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(std::path::PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reported no {name} executable"))
}
