//! A plain float64 implementation of the contract, written for obviousness, not
//! speed. The tests compare both backends against it; it is public so that users
//! can check their own integration the same way.

use crate::config::{tensor_widths, ClipBound, ClipConfig, ClipFunction, NonFinitePolicy};
use crate::error::{ClipError, Result};
use crate::noise::standard_normal;

/// The float64 result of one clipping step.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// `out_p` per tensor.
    pub grads: Vec<Vec<f64>>,
    /// `(1/M) sum_j |s_{j,g} * g_j|` per element of `grads` (noise left out): the
    /// scale of the rounding error of a sum over micro-batches, which can be far
    /// above the result where the terms cancel.
    pub magnitudes: Vec<Vec<f64>>,
    /// Number of parameter groups G.
    pub groups: usize,
    /// `norm_{j,g}` at `j * G + g` (NaN when the mean holds a NaN, +inf when it
    /// holds an infinity).
    pub norms: Vec<f64>,
    /// `s_{j,g}` at `j * G + g`.
    pub factors: Vec<f64>,
    /// `C_g` per group (NaN when adaptive and no micro-batch is finite).
    pub group_bounds: Vec<f64>,
    /// The total bound `sqrt(sum_g C_g^2)` (`C` with one group).
    pub clip_bound: f64,
    /// (micro-batch, group) pairs of finite micro-batches with `norm_{j,g} > C_g`.
    pub clipped_count: usize,
    /// Micro-batches whose mean holds NaN or infinity (in any group).
    pub nonfinite_count: usize,
    /// Standard deviation of the noise added before the division by M:
    /// `sigma * clip_bound` (0 without noise).
    pub noise_std: f64,
}

/// Computes the clipping step in float64 from f32 inputs (each `[n_samples, D_p]`).
pub fn clip_f64(config: &ClipConfig, tensors: &[&[f32]], n_samples: usize) -> Result<Reference> {
    // As `Clipper::clip`: the lengths before the offsets, whose vector a wrong
    // n_samples could make huge.
    config.validate()?;
    if n_samples == 0 {
        return Err(ClipError::NoSamples);
    }
    let widths = tensor_widths(tensors.iter().map(|t| t.len()), n_samples)?;
    let offsets = config.row_offsets(n_samples)?;
    let group_of = config.tensor_groups(tensors.len())?;
    let m = offsets.len() - 1;
    let groups = config.group_count();

    // g_j per tensor, in float64.
    let means: Vec<Vec<Vec<f64>>> = (0..m)
        .map(|j| {
            let (lo, hi) = (offsets[j], offsets[j + 1]);
            tensors
                .iter()
                .zip(&widths)
                .map(|(t, &d)| {
                    (0..d)
                        .map(|c| {
                            (lo..hi).map(|i| t[i * d + c] as f64).sum::<f64>() / (hi - lo) as f64
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let norms: Vec<f64> = (0..m * groups)
        .map(|at| {
            let (j, g) = (at / groups, at % groups);
            means[j]
                .iter()
                .zip(&group_of)
                .filter(|(_, &pg)| pg == g)
                .flat_map(|(mean, _)| mean)
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    // A micro-batch is non-finite when any of its groups is.
    let finite_mb: Vec<bool> = (0..m)
        .map(|j| {
            norms[j * groups..(j + 1) * groups]
                .iter()
                .all(|n| n.is_finite())
        })
        .collect();
    let nonfinite_count = finite_mb.iter().filter(|f| !**f).count();
    if config.non_finite == NonFinitePolicy::Error {
        if let Some(j) = finite_mb.iter().position(|f| !f) {
            return Err(ClipError::NonFinite {
                micro_batch: j,
                count: nonfinite_count,
            });
        }
    }
    let group_bounds: Vec<f64> = (0..groups)
        .map(|g| match &config.bound {
            ClipBound::Fixed(c) => *c as f64,
            ClipBound::PerGroup(c) => c[g] as f64,
            ClipBound::Adaptive { scale } => {
                let min = (0..m)
                    .filter(|&j| finite_mb[j])
                    .map(|j| norms[j * groups + g])
                    .fold(f64::INFINITY, f64::min);
                if min.is_finite() {
                    *scale as f64 * min
                } else {
                    f64::NAN
                }
            }
        })
        .collect();
    let propagate = config.non_finite == NonFinitePolicy::Propagate;
    let factors: Vec<f64> = (0..m * groups)
        .map(|at| {
            let (n, c) = (norms[at], group_bounds[at % groups]);
            if propagate && c.is_nan() {
                // An adaptive bound without a finite micro-batch: plain arithmetic
                // with a NaN bound.
                f64::NAN
            } else if !n.is_finite() {
                // Plain arithmetic: min(1, C / NaN) = NaN, min(1, C / inf) = 0.
                if propagate && n.is_nan() {
                    f64::NAN
                } else {
                    0.0
                }
            } else if !propagate && !finite_mb[at / groups] {
                0.0 // Skip drops the whole micro-batch
            } else {
                match config.function {
                    ClipFunction::Hard if n > c => c / n,
                    ClipFunction::Hard => 1.0,
                    ClipFunction::Automatic { gamma } => c / (n + gamma as f64),
                    ClipFunction::Normalize if n == 0.0 => 0.0,
                    ClipFunction::Normalize => c / n,
                }
            }
        })
        .collect();
    let clipped_count = (0..m * groups)
        .filter(|&at| finite_mb[at / groups] && norms[at] > group_bounds[at % groups])
        .count();
    let clip_bound = group_bounds.iter().map(|c| c * c).sum::<f64>().sqrt();
    // sigma = 0 adds no noise, whatever the bound (NaN or beyond f32 included).
    let noise_std = config
        .noise
        .filter(|n| n.multiplier != 0.0)
        .map_or(0.0, |n| n.multiplier as f64 * clip_bound);
    // The terms s_{j,g} * g_j[c] of output element c of tensor p.
    let (factors_of, means_of) = (&factors, &means);
    let terms = |p: usize, c: usize| {
        let g = group_of[p];
        (0..m)
            .map(move |j| factors_of[j * groups + g])
            .enumerate()
            .filter(move |&(_, s)| propagate || s != 0.0)
            .map(move |(j, s)| s * means_of[j][p][c])
    };
    let magnitudes = widths
        .iter()
        .enumerate()
        .map(|(p, &d)| {
            (0..d)
                .map(|c| terms(p, c).map(f64::abs).sum::<f64>() / m as f64)
                .collect()
        })
        .collect();
    let mut first_element = 0u64;
    let grads = widths
        .iter()
        .enumerate()
        .map(|(p, &d)| {
            let out = (0..d)
                .map(|c| {
                    let sum: f64 = terms(p, c).sum();
                    let z = match config.noise {
                        Some(n) => {
                            noise_std * standard_normal(n.seed, n.step, first_element + c as u64)
                        }
                        None => 0.0,
                    };
                    (sum + z) / m as f64
                })
                .collect();
            first_element += d as u64;
            out
        })
        .collect();
    Ok(Reference {
        grads,
        magnitudes,
        groups,
        norms,
        factors,
        group_bounds,
        clip_bound,
        clipped_count,
        nonfinite_count,
        noise_std,
    })
}
