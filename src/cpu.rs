//! The CPU backend: the same contract as the kernels, multi-threaded with rayon over
//! blocks of columns, accumulating in float64 (f32 squares summed in f64 can neither
//! overflow nor underflow). Blocks are fixed-size and reduced in order, so the result
//! does not depend on the number of threads.

use rayon::prelude::*;

use crate::clipper::{BackendKind, ClipOutput, ClipStats};
use crate::config::{ClipBound, ClipConfig, ClipFunction, NonFinitePolicy};
use crate::error::{ClipError, Result};
use crate::noise::standard_normal;

/// Columns per parallel task.
const BLOCK_COLS: usize = 2048;

/// Micro-batch mean of columns `[c0, c0 + out.len())` of a `[N, d]` tensor, into `out`.
fn block_mean(t: &[f32], d: usize, c0: usize, rows: std::ops::Range<usize>, out: &mut [f64]) {
    out.fill(0.0);
    let inv_n = 1.0 / rows.len() as f64;
    for i in rows {
        let row = &t[i * d + c0..i * d + c0 + out.len()];
        for (o, &x) in out.iter_mut().zip(row) {
            *o += x as f64;
        }
    }
    out.iter_mut().for_each(|o| *o *= inv_n);
}

/// Runs the step on the CPU. `offsets`, `widths` and the groups are validated by
/// the caller.
pub(crate) fn clip(
    config: &ClipConfig,
    offsets: &[usize],
    widths: &[usize],
    tensors: &[&[f32]],
) -> Result<ClipOutput> {
    let m = offsets.len() - 1;
    let groups = config.group_count();
    let group_of = config.tensor_groups(tensors.len())?;
    // Column blocks of every tensor: (tensor, first column, width).
    let blocks: Vec<(usize, usize, usize)> = widths
        .iter()
        .enumerate()
        .flat_map(|(p, &d)| {
            (0..d)
                .step_by(BLOCK_COLS)
                .map(move |c| (p, c, BLOCK_COLS.min(d - c)))
        })
        .collect();

    // Pass 1: per block, the squared norm of each micro-batch mean.
    let block_ssq: Vec<Vec<f64>> = blocks
        .par_iter()
        .map(|&(p, c0, w)| {
            let mut mean = vec![0.0f64; w];
            (0..m)
                .map(|j| {
                    block_mean(
                        tensors[p],
                        widths[p],
                        c0,
                        offsets[j]..offsets[j + 1],
                        &mut mean,
                    );
                    mean.iter().map(|v| v * v).sum::<f64>()
                })
                .collect()
        })
        .collect();
    // Blocks are summed in their fixed order, per (micro-batch, group).
    let mut ssq = vec![0.0f64; m * groups];
    for (&(p, _, _), b) in blocks.iter().zip(&block_ssq) {
        for (j, v) in b.iter().enumerate() {
            ssq[j * groups + group_of[p]] += v;
        }
    }
    let norms: Vec<f64> = ssq.into_iter().map(f64::sqrt).collect();
    // The mean is NaN where a NaN (or +inf and -inf) entered it, and its square sum
    // then NaN; an infinity alone gives +inf. A micro-batch is non-finite when any
    // of its groups is.
    let finite_mb: Vec<bool> = norms
        .chunks(groups)
        .map(|n| n.iter().all(|v| v.is_finite()))
        .collect();
    let nonfinite_count = finite_mb.iter().filter(|f| !**f).count();
    if config.non_finite == NonFinitePolicy::Error && nonfinite_count > 0 {
        return Err(ClipError::NonFinite {
            micro_batch: finite_mb.iter().position(|f| !f).unwrap_or(0),
            count: nonfinite_count,
        });
    }

    // Pass 2: bounds and factors.
    let bounds: Vec<f64> = (0..groups)
        .map(|g| match &config.bound {
            ClipBound::Fixed(c) => *c as f64,
            ClipBound::PerGroup(c) => c[g] as f64,
            ClipBound::Adaptive { scale } => {
                let min = (0..m)
                    .filter(|&j| finite_mb[j])
                    .map(|j| norms[j * groups + g])
                    .fold(f64::INFINITY, f64::min);
                if min.is_finite() {
                    min * *scale as f64
                } else {
                    f64::NAN
                }
            }
        })
        .collect();
    let propagate = config.non_finite == NonFinitePolicy::Propagate;
    let factors: Vec<f64> = norms
        .iter()
        .enumerate()
        .map(|(at, &n)| {
            let bound = bounds[at % groups];
            match n {
                n if n.is_nan() && propagate => f64::NAN,
                n if !n.is_finite() => 0.0,
                _ if !propagate && !finite_mb[at / groups] => 0.0,
                n => match config.function {
                    ClipFunction::Hard if n > bound => bound / n,
                    ClipFunction::Hard => 1.0,
                    ClipFunction::Automatic { gamma } => bound / (n + gamma as f64),
                    ClipFunction::Normalize if n == 0.0 => 0.0,
                    ClipFunction::Normalize => bound / n,
                },
            }
        })
        .collect();
    let clipped_count = (0..m * groups)
        .filter(|&at| finite_mb[at / groups] && norms[at] > bounds[at % groups])
        .count();
    let weights: Vec<f64> = factors.iter().map(|s| s / m as f64).collect();
    let sensitivity = bounds.iter().map(|c| c * c).sum::<f64>().sqrt();
    let noise_std = config
        .noise
        .map_or(0.0, |n| n.multiplier as f64 * sensitivity);
    let first_element: Vec<u64> = widths
        .iter()
        .scan(0u64, |at, &d| {
            *at += d as u64;
            Some(*at - d as u64)
        })
        .collect();

    // Pass 3: weighted sum of the micro-batch means, block by block, plus noise.
    let block_out: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|&(p, c0, w)| {
            let mut mean = vec![0.0f64; w];
            let mut acc = vec![0.0f64; w];
            for j in 0..m {
                let weight = weights[j * groups + group_of[p]];
                if weight == 0.0 && !propagate {
                    continue;
                }
                block_mean(
                    tensors[p],
                    widths[p],
                    c0,
                    offsets[j]..offsets[j + 1],
                    &mut mean,
                );
                acc.iter_mut()
                    .zip(&mean)
                    .for_each(|(a, g)| *a += weight * g);
            }
            if let Some(n) = config.noise {
                let first = first_element[p] + c0 as u64;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += noise_std * standard_normal(n.seed, n.step, first + c as u64) / m as f64;
                }
            }
            acc.into_iter().map(|v| v as f32).collect()
        })
        .collect();
    let mut grads: Vec<Vec<f32>> = widths.iter().map(|&d| Vec::with_capacity(d)).collect();
    for (&(p, _, _), out) in blocks.iter().zip(block_out) {
        grads[p].extend_from_slice(&out);
    }

    let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
    Ok(ClipOutput {
        grads,
        stats: ClipStats {
            groups,
            norms: to_f32(&norms),
            factors: to_f32(&factors),
            group_bounds: to_f32(&bounds),
            clip_bound: sensitivity as f32,
            clipped_count,
            nonfinite_count,
            noise_std: noise_std as f32,
            backend: BackendKind::Cpu,
        },
    })
}
