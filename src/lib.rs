//! # microclip: micro-batch gradient clipping on wgpu
//!
//! A batch of N per-sample gradients is split into M micro-batches of consecutive
//! rows. Each micro-batch gradient is averaged, clipped to L2 norm `C`, and the
//! clipped gradients are averaged:
//!
//! ```text
//! g_j    = mean of the rows of micro-batch j        (each tensor p: [N, D_p] -> [D_p])
//! norm_j = || g_j ||_2   over ALL tensors together
//! s_j    = min(1, C / norm_j)      (s_j = 1 when norm_j = 0; see ClipFunction)
//! out_p  = (1/M) * sum_j s_j * g_j,p
//! ```
//!
//! `C` is fixed ([`ClipBound::Fixed`]) or adaptive as in "Revisit Micro-batch
//! Clipping" (Algorithm 1): `C_t = scale * min_j norm_j` ([`ClipBound::Adaptive`]).
//! The statistics ([`ClipStats`]) carry the norms, factors, the bound used and how
//! many micro-batches were clipped (`norm_j > C`) or non-finite.
//!
//! For DP-SGD: [`ClipFunction`] chooses hard clipping, AUTO-S or normalisation;
//! [`ClipConfig::with_groups`] clips parameter groups against their own bounds
//! ([`ClipBound::PerGroup`]; norms and factors become `[M, G]`);
//! [`ClipConfig::with_noise`] adds seeded Gaussian noise ([`GaussianNoise`],
//! generator in [`noise`](mod@noise)) of standard deviation `sigma * S`, `S` the
//! total bound `sqrt(sum_g C_g^2)`; [`accountant`] turns (q, sigma, steps, delta)
//! into epsilon, with sigma halved for micro-batches of more than one sample
//! ([`accountant::micro_batch_sensitivity`]: one sample then moves the sum by up
//! to `2 S`). That accounting assumes Poisson sampling, a fixed bound (not
//! [`ClipBound::Adaptive`]), micro-batches whose members do not depend on
//! other samples' presence, and a division by the expected `M`; the
//! [`accountant`] docs say why each matters. The noise's seed must be secret
//! and random, and no two calls may share `(seed, step)` ([`GaussianNoise`]).
//! The README's "Using microclip for DP-SGD" has a worked example.
//!
//! ## Quick start (host slices)
//!
//! ```
//! use microclip::{Backend, ClipConfig, Clipper, MicroBatches};
//!
//! // 6 samples; two parameter tensors of widths 3 and 2, row-major [N, D_p].
//! let w: Vec<f32> = (0..18).map(|i| i as f32 * 0.1).collect();
//! let b: Vec<f32> = (0..12).map(|i| 1.0 - i as f32 * 0.05).collect();
//! let mut clipper = Clipper::new(Backend::Cpu)?; // or Backend::Auto / Backend::Gpu
//! let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(2));
//! let out = clipper.clip(&cfg, &[&w, &b], 6)?;
//! assert_eq!(out.grads[0].len(), 3);
//! assert_eq!(out.stats.norms.len(), 3); // M = 6 / 2
//! # Ok::<(), microclip::ClipError>(())
//! ```
//!
//! ## Input precision
//!
//! Inputs are f32, [`half::f16`] or [`half::bf16`] ([`GradElement`]; `half` is
//! re-exported): `clip` takes `&[&[T]]`, and [`GpuTensor::with_dtype`] marks a
//! buffer's element type ([`Dtype`]). 16-bit values are widened exactly and
//! accumulated in f32 (GPU) or f64 (CPU, where a one-row micro-batch's squares
//! are added 8 at a time in f32 first, within 5.4e-7 of its squared norm,
//! relative); outputs and statistics are f32.
//!
//! ## GPU buffers the caller owns
//!
//! [`Clipper::clip_buffers_into`] takes [`GpuTensor`]s (a `wgpu::Buffer`, a byte
//! offset, the row width and the element type) on the clipper's device and writes the clipped average
//! into caller buffers; [`Clipper::clip_buffers`] returns new buffers instead. Only
//! the statistics (O(M) bytes) come back to the host. Build the clipper on the
//! framework's own device with [`Clipper::from_device`] (an error, not a panic,
//! when the device's limits are below what the kernels need, all within
//! WebGPU's defaults).
//!
//! Tensors in one buffer share the kernels' dispatches. On a hardware adapter so
//! do tensors in up to 8 separate buffers, where the device allows 21 storage
//! buffers per shader stage (wgpu's default limit is 8; [`Clipper::new`] asks
//! for the adapter's limits, and a framework's device made with them qualifies);
//! otherwise each buffer takes its own dispatches, with the same results.
//!
//! ## Timing the kernels
//!
//! [`Clipper::set_gpu_timing`] makes every later GPU call time its compute pass
//! with timestamp queries (where the device has wgpu's `TIMESTAMP_QUERY`, which
//! [`Clipper::new`] requests); [`Clipper::last_gpu_time`] then gives the device
//! time of the last call's kernels, without the host's encoding and read-back.
//!
//! ## burn
//!
//! With the `burn` feature, `microclip::burn` shares one wgpu device with burn 0.22
//! and clips burn gradient tensors in burn's own buffers.
//!
//! ## Backends
//!
//! [`Backend::Gpu`] runs the WGSL kernels in `shaders/`; [`Backend::Cpu`] runs the
//! same semantics on the CPU: on rayon's global pool, except its one-read path
//! (see Memory), which runs on the calling thread and one scoped thread per
//! further core (`std::thread::available_parallelism`, not limited by
//! `RAYON_NUM_THREADS`; where a thread cannot be started, on the calling
//! thread alone, with the same result). A call with less than 8 MiB of input
//! runs on the calling thread alone (starting threads would cost more than its
//! work). [`Backend::Auto`] takes the GPU when an adapter exists and the CPU
//! otherwise. [`ClipStats::backend`] says which one ran.
//!
//! ## Numerics
//!
//! * On the GPU, means are accumulated in f32 as `sum_i (x_i * (1/n_j))`
//!   (`1/n_j` rounded to f32) so they do not overflow when the true mean is
//!   finite, with one exception: a mean within a few rounding errors of
//!   `f32::MAX` (for example every row `f32::MAX` in a micro-batch of 10, 18,
//!   20, 36 or 40 rows on lavapipe: the f32 terms round up) can round to
//!   infinity, and the micro-batch then counts as non-finite
//!   (the CPU's f64 sums do not round so). A micro-batch's rows are summed
//!   before its factor scales them, so rows that cancel to a mean far below
//!   them cannot swamp the other micro-batches' terms (except where the GPU's
//!   last pass cuts a micro-batch: at a row window of a tensor larger than one
//!   storage binding or, on a software adapter, of its loop budget (a
//!   micro-batch of more than 341 rows, or a re-read of more than 80,640
//!   rows; the README's "loop budget"), or at a row chunk on a software
//!   adapter, which ends
//!   between micro-batches wherever one ends within half a chunk of its even
//!   cut, so in practice only in micro-batches longer than a chunk of about
//!   32 rows; and at the far end of f32, below);
//!   norms are accumulated as (scale, scaled sum of squares)
//!   pairs like BLAS `nrm2`, so values near `1e30` or `1e-30` give the right factor;
//!   factors are computed from the scaled form, so a norm beyond `f32::MAX` (reported
//!   as `+inf`) still clips correctly. The CPU backend sums rows and squares in
//!   f64 (a one-row micro-batch's squares 8 at a time in f32 first, see "Input
//!   precision") and scales a micro-batch's sum by `1 / n_j` afterwards.
//! * All reductions are trees or fixed blocks, never float atomics: the same input on
//!   the same adapter gives bitwise the same output.
//! * [`reference`](mod@reference) is a plain float64 implementation used by the tests.
//! * On GPUs that flush denormals (Vulkan allows it; NVIDIA does), f32-subnormal
//!   inputs, outputs and clip factors (below 1.2e-38; a factor `C / norm` is that
//!   small for a norm above `8.5e37 * C`) read and come back as zero.
//! * On any GPU the terms `x_i * (1/n_j)` of a mean are rounded to f32, each to
//!   within 2^-150 (7e-46) where it is subnormal: a micro-batch whose mean is
//!   that small (a norm near 1e-37 or below) carries that absolute error, which
//!   hard clipping leaves alone (factor 1) but `Normalize` and AUTO-S multiply by
//!   their factor `C / norm`. The CPU's f64 sums are exact there.
//! * Divisions by numbers beyond 2^126, which some GPUs (NVIDIA) compute through
//!   a reciprocal flushed to zero, are scaled by 2^-64 first; the tests run with
//!   that division emulated under the testing feature `emulate-ftz-division`.
//! * At the far ends of f32 the GPU is less exact than the CPU (a differential
//!   fuzz, thirtieth session): rows that exceed their micro-batch's mean by about
//!   1e38 under a factor beyond 2^60 (`Normalize` or AUTO-S) overflow in the
//!   last pass when it re-reads the rows (b < 3, or means not stored for
//!   another reason; see Memory), giving NaN outputs; bounds in
//!   f32's subnormal range give factors up to about 20% off; AUTO-S with gamma
//!   beyond about 1e30 times the norm (or both subnormal) loses its factors'
//!   precision or flushes them to 0; and an adaptive bound beyond `f32::MAX` under `Normalize` or AUTO-S
//!   makes terms beyond f32, which give inf or NaN where they meet.
//!
//! ## Memory
//!
//! No copy of the `N x D` input is ever made on the device. The GPU path uses
//! `M x sum_p ceil(D_p / T) x 16` bytes of norm partials (column tiles of T = 4096,
//! up to 65536 on a software adapter), `M x G x 32 + M x 4`
//! bytes of per-(micro-batch, group) state, `(M + 1) x 4` bytes of row offsets,
//! `G x 8` bytes of group tables and, only when a micro-batch spans two row windows
//! (of a tensor larger than one storage binding, or, on a software adapter, of a
//! micro-batch too deep for one shader invocation's loop budget: see the README's
//! "loop budget"), two carry rows of `ceil4(max_p D_p) x 4` bytes (`ceil4`:
//! rounded up to a multiple of 4).
//! When the micro-batches hold `b = N / M >= 3` rows on average and the means fit
//! one storage binding or, larger, take at most 1 GiB (and, on a software
//! adapter, number at most 2,520), it also keeps the `M x sum ceil4(D_p) x 4` bytes of
//! micro-batch means (a fraction
//! `1 / b` of the input; rows padded to multiples of 4 elements), which saves
//! re-reading the input in the last pass (means larger than one binding are
//! kept as a block per tensor, unless one row window of a tensor would write
//! more of them than a binding holds); otherwise the last pass
//! re-reads the rows, with `N x G x 8` bytes of per-row weights when `b > 1` and,
//! where it walks them in chunks of about 32 rows (by default on a software
//! adapter, b = 1 too), the partial rows of its largest dispatch, or of all the
//! row windows of a tensor larger than one binding (about `rows / 32 x
//! ceil4(D_p) x 4` bytes summed over that dispatch's tensors, about 1/32 of an
//! f32 input's bytes), and 8 bytes of ones per partial row. Either way, when the
//! last pass runs once for several tensors (no noise, outputs that accept
//! copies), it adds a `sum ceil4(D_p) x 4`-byte output row. Noise is generated in
//! place in the output: no buffer of random numbers.
//!
//! The CPU backend reads the input once, in groups of micro-batches, when an f64
//! accumulator row and a group's means fit its cache budget (20 MiB; the working
//! memory of one call) and each micro-batch's factor follows from its own norm
//! (not so for hard clipping under an adaptive bound with `scale > 1`, nor for
//! [`NonFinitePolicy::Propagate`] with several groups and an adaptive hard
//! bound). Otherwise it takes two passes and, from `b >= 3` rows per
//! micro-batch on average, keeps the `M x sum_p D_p x 4` bytes of f32 means (up
//! to 1 GiB) between calls for its second pass; below that it reads the input
//! twice. [`Clipper::scratch_bytes`] reports what a clipper keeps;
//! [`Clipper::release_scratch`] frees it.

#![warn(missing_docs)]

// Every Rust example in the README compiles and runs as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

pub mod accountant;
#[cfg(feature = "burn")]
pub mod burn;
mod clipper;
mod config;
mod cpu;
mod dtype;
mod error;
mod gpu;
pub mod noise;
pub mod reference;

pub use clipper::{Backend, BackendKind, ClipOutput, ClipStats, Clipper};
pub use config::{
    ClipBound, ClipConfig, ClipFunction, GaussianNoise, MicroBatches, NonFinitePolicy,
};
pub use dtype::{Dtype, GradElement};
pub use error::{ClipError, Result};
pub use gpu::{GpuTensor, GpuTensorMut};
/// The `half` crate, whose `f16` and `bf16` [`Clipper::clip`] accepts.
pub use half;

/// The WGSL sources as the GPU backend compiles them (shared prelude included), for
/// validation tools and for reading: [`shaders::kernel_source_for`] gives each
/// kernel's default source, [`shaders::kernel_source_variant`] its variants (see
/// [`shaders::KernelVariant`]).
pub mod shaders {
    pub use crate::gpu::kernels::{
        deep_kernel_constants, kernel_constants, kernel_names, kernel_source, kernel_source_for,
        kernel_source_variant, kernel_source_with_slots, partials_constants,
        row_chunks_kernel_constants, weighted_means_constants, KernelVariant, PartialsVariant,
        CHUNK_ROWS,
    };
}

/// Environment variable: when set to `1`, [`Clipper::new`] with [`Backend::Auto`]
/// and the GPU test helpers fail instead of falling back or skipping when no GPU
/// adapter exists. CI sets it so that GPU tests cannot silently pass without a GPU.
pub const REQUIRE_GPU_ENV: &str = "MICROCLIP_REQUIRE_GPU";
