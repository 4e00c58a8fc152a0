//! The CPU backend: the same contract as the kernels, multi-threaded, accumulating
//! in float64 (f32 squares summed in f64 can neither overflow nor underflow).
//! One exception: a one-row micro-batch's squares are formed and added in f32,
//! 8 to a lane, before they join the f64 sums, within `9 * 2^-24` of its squared
//! norm (and in f64 where f32 cannot hold them; [`sum_squares`]). Means, and
//! the weighted sum, stay in f64.
//!
//! Two paths, chosen per call (see [`choose`]):
//! * [`fused`]: one read of the input. For a group of R micro-batches, each thread
//!   forms the means of its columns, the threads exchange partial norms at a
//!   barrier, and each adds `sum_r h_r * mean_r` to its accumulator while the
//!   group's rows or means are still in the last-level cache. The factor must be known from the micro-batch's own norm: with a fixed
//!   bound it is `s_j`; with an adaptive bound `C` every clip function factors as
//!   `s_j = C * h(norm_j)` (hard clipping only when `scale <= 1`, since then
//!   `C <= norm_j` for every j), and `C` multiplies the sum at the end.
//! * [`two_pass`]: norms first, then the weighted sum, over fixed column blocks
//!   that stay in the core's cache. The second pass reads the micro-batch means
//!   that the first one stored (f32, `M x sum_p D_p x 4` bytes, kept by the
//!   [`CpuEngine`] for the next call) from `b >= 3` rows per micro-batch on
//!   average, up to [`DEFAULT_MEANS_MAX_BYTES`]; otherwise it reads the input
//!   again.
//!
//! Partial norms are formed over fixed column blocks and summed in block order, so
//! the result does not depend on the number of threads. The loops over rows that
//! both paths run (squares, means, sums, weighted sums) are in [`loops`].

mod fused;
mod loops;
mod two_pass;

#[cfg(test)]
mod tests;

use std::ops::Range;

use rayon::prelude::*;

use crate::clipper::{BackendKind, ClipOutput, ClipStats};
use crate::config::{starts, total_bound, ClipBound, ClipConfig, ClipFunction, NonFinitePolicy};
use crate::dtype::{F16c, GradElement};
use crate::error::{ClipError, Result};
use crate::noise::standard_normal;
use loops::{
    add_rows, axpy_rows, fence_streamed_means, mean_ssq_k, sum_squares, widen, MEAN_ROWS_PER_SWEEP,
};

/// Columns per block (the unit of parallel work and of the partial norms).
const BLOCK_COLS: usize = 4096;

/// Input bytes below which a call runs on the calling thread alone (no fused
/// worker threads; rayon's iterations in one piece, though the first one still
/// starts rayon's global pool once per process). Starting
/// the fused pass's threads and waking rayon's pool cost about 150-250 us a
/// call on the project's 2-core VM, far more than a small model's work: a
/// 64 x 44 gradient took 136 us a call (3 us alone), and the `sweet_spot`
/// example spent 119 s of system time in 106 s of wall time scheduling
/// threads. Medians of `N = 64` calls there (throwaway probe, two rounds,
/// b = 4 / b = 1): alone against parallel, `D = 5,000` (1.3 MB) 48-77 us
/// against 170-245, `D = 20,000` (5 MB) 187-301 against 326-520, `D = 40,000`
/// (10 MB) 380-615 against 447-752, `D = 100,000` (26 MB) 1.4-2.1 ms against
/// 1.1-1.5 (BENCHMARKS.md, twenty-fourth session). Since the fused pass runs
/// its first worker on the calling thread, parallel at `D = 33,000` (8.4 MB)
/// takes 301-398 / 471-760 us (525-605 / 522-882 before; three rounds).
const PARALLEL_MIN_BYTES: usize = 8 << 20;

/// Norms below 2^-64: see [`mean_too_coarse`].
const COARSE_MEAN_NORM: f64 = 5.421_010_862_427_522e-20;

/// Whether a micro-batch (group) mean of this norm, formed in f64, is too coarse
/// once stored as f32 for the weighted sum: its elements may then be f32
/// subnormals, kept only to within 2^-150, which a factor of up to `C / norm`
/// magnifies (Normalize or AUTO-S on a norm of 1e-45 gives a factor of 1e45).
/// The paths that store means add such micro-batches from their rows instead
/// (summed, then scaled: [`Plan::add_mean_from_rows`]), as does the path that
/// reads the input twice (which otherwise scales each row before summing).
/// From 2^-64 on the stored error is at most `2^-86 sqrt(D)` of the norm;
/// real gradients are far above it, so the rows are read only in such corners.
fn mean_too_coarse(norm: f64) -> bool {
    norm > 0.0 && norm < COARSE_MEAN_NORM
}

/// Host memory the fused path may keep hot across a group of micro-batches: its
/// f64 accumulator row and the group's rows (or f32 means). About two thirds of a
/// 32 MiB L3; beyond it the two-pass path, whose working set is one column block,
/// moves fewer bytes.
pub(crate) const DEFAULT_FUSED_BUDGET_BYTES: usize = 20 << 20;

/// Largest stored means the two-pass path keeps (1 GiB); beyond it, it reads the
/// input twice.
pub(crate) const DEFAULT_MEANS_MAX_BYTES: usize = 1 << 30;

/// The CPU backend's settings and the memory it keeps between calls.
pub(crate) struct CpuEngine {
    /// Bytes the fused path may keep hot ([`DEFAULT_FUSED_BUDGET_BYTES`]).
    pub(crate) fused_budget: usize,
    /// Largest stored means of the two-pass path ([`DEFAULT_MEANS_MAX_BYTES`]).
    pub(crate) means_max_bytes: usize,
    /// Whether f16 may widen with F16C where the CPU has it (else the integer
    /// decode, as on CPUs without it).
    pub(crate) f16c: bool,
    /// Input bytes from which a call uses more than the calling thread
    /// ([`PARALLEL_MIN_BYTES`]).
    pub(crate) parallel_min_bytes: usize,
    /// The two-pass path's stored means, grown on demand and reused: fresh pages
    /// cost a page fault each on first touch (a new 256 MiB buffer per call made
    /// the two-pass path slower than reading the input twice).
    means: Vec<f32>,
}

impl Default for CpuEngine {
    fn default() -> Self {
        Self {
            fused_budget: DEFAULT_FUSED_BUDGET_BYTES,
            means_max_bytes: DEFAULT_MEANS_MAX_BYTES,
            f16c: true,
            parallel_min_bytes: PARALLEL_MIN_BYTES,
            means: Vec::new(),
        }
    }
}

impl CpuEngine {
    /// Host bytes kept between calls (the stored means).
    pub(crate) fn scratch_bytes(&self) -> u64 {
        (self.means.capacity() * 4) as u64
    }

    /// Frees the stored means.
    pub(crate) fn release_scratch(&mut self) {
        self.means = Vec::new();
    }

    /// The first `len` floats of the pooled means, grown when too short.
    fn means(&mut self, len: usize) -> &mut [f32] {
        if self.means.len() < len {
            self.means = Vec::new(); // release before allocating the larger one
            self.means = vec![0.0; len];
        }
        &mut self.means[..len]
    }
}

/// A column block of one tensor.
#[derive(Debug, Clone, Copy)]
struct Block {
    tensor: usize,
    c0: usize,
    w: usize,
}

/// One call's inputs and layout, shared by both paths.
struct Plan<'a, T> {
    config: &'a ClipConfig,
    offsets: &'a [usize],
    widths: &'a [usize],
    tensors: &'a [&'a [T]],
    groups: usize,
    group_of: &'a [usize],
    blocks: Vec<Block>,
    propagate: bool,
    /// How the hot loops widen f16 (F16C where detected and allowed).
    f16c: F16c,
    /// Whether the call is worth more than one thread
    /// ([`CpuEngine::parallel_min_bytes`]).
    parallel: bool,
}

impl<'a, T: GradElement> Plan<'a, T> {
    fn micro_batches(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The least items a parallel iteration hands a rayon task: all of them
    /// (no task, the calling thread does the work) for a small call, else
    /// `items` (1 for blocks and tensors; a block's width for elements).
    fn min_len(&self, items: usize) -> usize {
        if self.parallel {
            items
        } else {
            usize::MAX
        }
    }

    fn rows(&self, j: usize) -> Range<usize> {
        self.offsets[j]..self.offsets[j + 1]
    }

    /// Row `i` of block `b`'s columns.
    fn segment(&self, b: &Block, i: usize) -> &'a [T] {
        let d = self.widths[b.tensor];
        &self.tensors[b.tensor][i * d + b.c0..i * d + b.c0 + b.w]
    }

    /// Whether block `b` covers its whole tensor (`D_p <= BLOCK_COLS`).
    fn whole(&self, b: &Block) -> bool {
        b.w == self.widths[b.tensor]
    }

    fn group(&self, b: &Block) -> usize {
        self.group_of[b.tensor]
    }

    /// Per-block rows (in block order) joined into one row per tensor.
    fn per_tensor<'s>(&self, block_rows: impl Iterator<Item = &'s [f64]>) -> Vec<Vec<f64>> {
        let mut rows: Vec<Vec<f64>> = self.widths.iter().map(|&d| Vec::with_capacity(d)).collect();
        for (b, r) in self.blocks.iter().zip(block_rows) {
            rows[b.tensor].extend_from_slice(r);
        }
        rows
    }

    /// The squared norm of block `b`'s part of the mean of rows `rows`, which it
    /// also stores as f32 in `mean` when given (past the cache when `stream`: see
    /// [`store_means`](loops::store_means)); `sum` is scratch of at least `b.w`.
    /// One row: [`sum_squares`] (of its f32 copy when it is stored: the same
    /// bits). Micro-batches of 2 to [`MEAN_ROWS_PER_SWEEP`] rows in one sweep
    /// ([`mean_ssq_k`]: sums, mean and squares per column in registers); larger ones
    /// as f64 column sums of all but their last [`MEAN_ROWS_PER_SWEEP`] rows first
    /// ([`add_rows`]), then those rows in the one sweep, added to the sums. The
    /// same bits as every row summed first and then scaled, and the same for
    /// every element type.
    fn mean_ssq(
        &self,
        b: &Block,
        rows: Range<usize>,
        sum: &mut [f64],
        mean: Option<&mut [f32]>,
        stream: bool,
    ) -> f64 {
        let inv_n = 1.0 / rows.len() as f64;
        let row = |i: usize| self.segment(b, i);
        let x = |i: usize| row(rows.start + i);
        // One sweep for 2 to MEAN_ROWS_PER_SWEEP rows, a const K each (the list
        // below ends at MEAN_ROWS_PER_SWEEP; larger micro-batches fall through).
        const _: () = assert!(MEAN_ROWS_PER_SWEEP == 8);
        macro_rules! one_sweep {
            ($($k:literal)*) => {
                match rows.len() {
                    $($k => return mean_ssq_k::<T, $k>(std::array::from_fn(x), inv_n, mean, stream, self.f16c, None),)*
                    _ => {}
                }
            };
        }
        if rows.len() == 1 {
            // One row: its f32 squares (sum_squares), of the row itself or of its
            // f32 copy (the same bits).
            return match mean {
                Some(mean) => {
                    let mean = &mut mean[..b.w];
                    widen(x(0), mean);
                    sum_squares(mean, self.f16c)
                }
                None => sum_squares(x(0), self.f16c),
            };
        }
        one_sweep!(2 3 4 5 6 7 8);
        // Deeper: all but the last MEAN_ROWS_PER_SWEEP rows as f64 column sums,
        // then those rows added to them in the one sweep that also scales and
        // squares (the same additions in the same order as summing every row
        // first: the same bits, without a second sweep over the sums).
        // (Offsets are strictly increasing: no micro-batch is empty.)
        debug_assert!(rows.len() > MEAN_ROWS_PER_SWEEP);
        let sum = &mut sum[..b.w];
        let last = rows.end - MEAN_ROWS_PER_SWEEP;
        add_rows(sum, rows.start..last, row, self.f16c);
        let x = std::array::from_fn(|i| row(last + i));
        mean_ssq_k::<T, MEAN_ROWS_PER_SWEEP>(x, inv_n, mean, stream, self.f16c, Some(sum))
    }

    /// `acc += h * mean` for block `b`'s part of the mean of rows `rows`, from the
    /// rows: their f64 sums (into `sum`, scratch of at least `b.w`) scaled by
    /// `1 / n`, the mean [`Self::mean_ssq`] forms before any rounding to f32. For
    /// micro-batches whose stored f32 mean is too coarse ([`mean_too_coarse`]),
    /// and for every micro-batch of several rows where pass 2 re-reads the input;
    /// summing before scaling keeps rows that cancel from rounding at the size of
    /// `h` times the rows instead of `h` times the mean.
    fn add_mean_from_rows(
        &self,
        acc: &mut [f64],
        b: &Block,
        rows: Range<usize>,
        h: f64,
        sum: &mut [f64],
    ) {
        let inv_n = 1.0 / rows.len() as f64;
        let sum = &mut sum[..b.w];
        add_rows(sum, rows, |i| self.segment(b, i), self.f16c);
        for (a, &s) in acc.iter_mut().zip(sum.iter()) {
            *a += h * (s * inv_n);
        }
    }

    /// Norms `[M, G]` from per-(micro-batch, block) squared norms, in block order.
    fn norms(&self, block_ssq: impl Fn(usize) -> f64) -> Vec<f64> {
        let mut ssq = vec![0.0f64; self.groups];
        for (k, b) in self.blocks.iter().enumerate() {
            ssq[self.group(b)] += block_ssq(k);
        }
        ssq.into_iter().map(f64::sqrt).collect()
    }
}

fn factor(function: ClipFunction, bound: f64, n: f64, mb_finite: bool, propagate: bool) -> f64 {
    match n {
        _ if bound.is_nan() && propagate => f64::NAN, // adaptive, no finite micro-batch
        n if n.is_nan() && propagate => f64::NAN,
        n if !n.is_finite() => 0.0,
        _ if !propagate && !mb_finite => 0.0, // Skip drops the whole micro-batch
        n => match function {
            ClipFunction::Hard if n > bound => bound / n,
            ClipFunction::Hard => 1.0,
            ClipFunction::Automatic { gamma } => bound / (n + gamma as f64),
            ClipFunction::Normalize if n == 0.0 => 0.0,
            ClipFunction::Normalize => bound / n,
        },
    }
}

/// Bounds, factors and counts of a step, from its `[M, G]` norms.
struct Factors {
    bounds: Vec<f64>,
    factors: Vec<f64>,
    clipped: usize,
    nonfinite: usize,
}

fn factors<T: GradElement>(plan: &Plan<'_, T>, norms: &[f64]) -> Result<Factors> {
    let (m, g) = (plan.micro_batches(), plan.groups);
    // A micro-batch is non-finite when any of its groups is.
    let finite_mb: Vec<bool> = norms
        .chunks(g)
        .map(|n| n.iter().all(|v| v.is_finite()))
        .collect();
    let nonfinite = finite_mb.iter().filter(|f| !**f).count();
    if plan.config.non_finite == NonFinitePolicy::Error && nonfinite > 0 {
        return Err(ClipError::NonFinite {
            micro_batch: finite_mb.iter().position(|f| !f).unwrap_or(0),
            count: nonfinite,
        });
    }
    let bounds: Vec<f64> = (0..g)
        .map(|k| match &plan.config.bound {
            ClipBound::Fixed(c) => *c as f64,
            ClipBound::PerGroup(c) => c[k] as f64,
            ClipBound::Adaptive { scale } => {
                let min = (0..m)
                    .filter(|&j| finite_mb[j])
                    .map(|j| norms[j * g + k])
                    .fold(f64::INFINITY, f64::min);
                if min.is_finite() {
                    min * *scale as f64
                } else {
                    f64::NAN
                }
            }
        })
        .collect();
    let function = plan.config.function;
    let factors = (0..m * g)
        .map(|at| {
            let mb_finite = finite_mb[at / g];
            factor(
                function,
                bounds[at % g],
                norms[at],
                mb_finite,
                plan.propagate,
            )
        })
        .collect();
    let clipped = (0..m * g)
        .filter(|&at| finite_mb[at / g] && norms[at] > bounds[at % g])
        .count();
    Ok(Factors {
        bounds,
        factors,
        clipped,
        nonfinite,
    })
}

/// Micro-batches per barrier of the fused path, at most.
const MAX_GROUP: usize = 16;

/// The fused path's group size R, or `None` for the two-pass path: the f64
/// accumulator row and R rows (or f32 means) must fit in `budget` bytes.
fn choose<T: GradElement>(plan: &Plan<'_, T>, budget: usize) -> Option<usize> {
    // The one-read path applies an adaptive hard bound as C / norm_j: right for
    // every micro-batch the minimum was taken over when scale <= 1, not for a
    // group of a non-finite micro-batch under Propagate (its norm may be below C).
    let hard_adaptive_not_normalize = matches!(
        (plan.config.function, &plan.config.bound),
        (ClipFunction::Hard, ClipBound::Adaptive { scale })
            if *scale > 1.0 || (plan.propagate && plan.groups > 1)
    );
    let cols: usize = plan.widths.iter().sum();
    let per_group = budget.checked_sub(8 * cols)? / (4 * cols);
    (!hard_adaptive_not_normalize && per_group >= 1)
        .then(|| per_group.min(MAX_GROUP).min(plan.micro_batches()))
}

/// Whether the two-pass path stores the means (`means_len` floats) rather than
/// reading the input twice: from 3 rows per micro-batch on average (for f32 input,
/// storing the means and reading them back then moves fewer bytes than a second
/// read; 16-bit input follows the same rule, so that it gives the same bits as
/// f32 input of the same values) and up to `max_bytes`.
fn stores_means<T: GradElement>(plan: &Plan<'_, T>, means_len: usize, max_bytes: usize) -> bool {
    let input_len: usize = plan.tensors.iter().map(|t| t.len()).sum();
    means_len.saturating_mul(3) <= input_len && means_len.saturating_mul(4) <= max_bytes
}

/// Runs the step on the CPU. `offsets`, `widths` and `group_of` (the group of each
/// tensor) are validated by the caller.
pub(crate) fn clip<T: GradElement>(
    engine: &mut CpuEngine,
    config: &ClipConfig,
    offsets: &[usize],
    widths: &[usize],
    group_of: &[usize],
    tensors: &[&[T]],
) -> Result<ClipOutput> {
    let blocks = widths
        .iter()
        .enumerate()
        .flat_map(|(tensor, &d)| {
            (0..d).step_by(BLOCK_COLS).map(move |c0| Block {
                tensor,
                c0,
                w: BLOCK_COLS.min(d - c0),
            })
        })
        .collect();
    let plan = Plan {
        config,
        offsets,
        widths,
        tensors,
        groups: config.group_count(),
        group_of,
        blocks,
        propagate: config.non_finite == NonFinitePolicy::Propagate,
        f16c: if engine.f16c {
            F16c::detect()
        } else {
            F16c::OFF
        },
        parallel: tensors
            .iter()
            .map(|t| std::mem::size_of_val(*t))
            .sum::<usize>()
            >= engine.parallel_min_bytes,
    };
    // Per tensor, sum_j h_j * mean_j, where h_j = s_j / C_g when `adaptive_scaled`
    // (the fused path under an adaptive bound), else s_j.
    let means_len = plan.micro_batches() * widths.iter().sum::<usize>();
    let (norms, sums, f, adaptive_scaled) = match choose(&plan, engine.fused_budget) {
        Some(group_size) => {
            let (norms, sums) = fused::run(&plan, group_size);
            let f = factors(&plan, &norms)?;
            let adaptive = matches!(config.bound, ClipBound::Adaptive { .. });
            (norms, sums, f, adaptive)
        }
        None if stores_means(&plan, means_len, engine.means_max_bytes) => {
            let means = engine.means(means_len);
            let norms = two_pass::norms_and_means(&plan, means);
            let f = factors(&plan, &norms)?;
            let sums = two_pass::sums_of_means(&plan, &norms, &f.factors, means);
            (norms, sums, f, false)
        }
        None => {
            let norms = two_pass::norms(&plan);
            let f = factors(&plan, &norms)?;
            let sums = two_pass::sums(&plan, &norms, &f.factors);
            (norms, sums, f, false)
        }
    };
    let m = plan.micro_batches() as f64;
    let total_bound = total_bound(f.bounds.iter().copied());
    let noise_std = config.noise_std(total_bound);

    // The noise stream's index of each tensor's first element.
    let firsts = starts(widths.iter().map(|&d| d as u64));
    // One parallel iteration over the tensors (and their elements): a parallel
    // iterator started from this thread per tensor cost a wake-up of the pool's
    // threads each: 10,000 tensors of 20 columns took 150-210 ms, one tensor of
    // the same 200,000 columns 3 ms.
    let grads = sums
        .par_iter()
        .with_min_len(plan.min_len(1))
        .zip(firsts)
        .enumerate()
        .map(|(p, (sum, first))| {
            let bound = f.bounds[plan.group_of[p]];
            // With no finite micro-batch the bound is NaN: under Skip every h_j is
            // 0 (every micro-batch dropped), under Propagate every factor is NaN.
            let scale = match adaptive_scaled {
                true if bound.is_nan() && !plan.propagate => 1.0 / m,
                true => bound / m,
                false => 1.0 / m,
            };
            sum.par_iter()
                .with_min_len(plan.min_len(BLOCK_COLS))
                .enumerate()
                .map(|(c, &v)| {
                    let z = config.noise.map_or(0.0, |n| {
                        noise_std * standard_normal(n.seed, n.step, first + c as u64) / m
                    });
                    (v * scale + z) as f32
                })
                .collect()
        })
        .collect();

    let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
    Ok(ClipOutput {
        grads,
        stats: ClipStats {
            groups: plan.groups,
            norms: to_f32(&norms),
            factors: to_f32(&f.factors),
            group_bounds: to_f32(&f.bounds),
            clip_bound: total_bound as f32,
            clipped_count: f.clipped,
            nonfinite_count: f.nonfinite,
            noise_std: noise_std as f32,
            backend: BackendKind::Cpu,
        },
    })
}
