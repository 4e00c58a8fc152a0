//! A plain float64 implementation of the contract, written for obviousness, not
//! speed. The tests compare both backends against it; it is public so that users
//! can check their own integration the same way.

use crate::config::{tensor_widths, ClipBound, ClipConfig, ClipFunction, NonFinitePolicy};
use crate::error::{ClipError, Result};

/// The float64 result of one clipping step.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// `out_p` per tensor.
    pub grads: Vec<Vec<f64>>,
    /// `norm_j` (NaN when the mean holds a NaN, +inf when it holds an infinity).
    pub norms: Vec<f64>,
    /// `s_j`.
    pub factors: Vec<f64>,
    /// The bound used (NaN when adaptive and no micro-batch is finite).
    pub clip_bound: f64,
    /// Finite micro-batches with `norm_j > C`.
    pub clipped_count: usize,
    /// Micro-batches whose mean holds NaN or infinity.
    pub nonfinite_count: usize,
}

/// Computes the clipping step in float64 from f32 inputs (each `[n_samples, D_p]`).
pub fn clip_f64(config: &ClipConfig, tensors: &[&[f32]], n_samples: usize) -> Result<Reference> {
    let offsets = config.row_offsets(n_samples)?;
    let widths = tensor_widths(tensors.iter().map(|t| t.len()), n_samples)?;
    let m = offsets.len() - 1;

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
    let norms: Vec<f64> = means
        .iter()
        .map(|g| g.iter().flatten().map(|v| v * v).sum::<f64>().sqrt())
        .collect();
    let finite = |n: &f64| n.is_finite();
    let nonfinite_count = norms.iter().filter(|n| !finite(n)).count();
    if config.non_finite == NonFinitePolicy::Error {
        if let Some(j) = norms.iter().position(|n| !finite(n)) {
            return Err(ClipError::NonFinite {
                micro_batch: j,
                count: nonfinite_count,
            });
        }
    }
    let clip_bound = match config.bound {
        ClipBound::Fixed(c) => c as f64,
        ClipBound::Adaptive { scale } => {
            let min = norms
                .iter()
                .copied()
                .filter(finite)
                .fold(f64::INFINITY, f64::min);
            if min.is_finite() {
                scale as f64 * min
            } else {
                f64::NAN
            }
        }
    };
    let factors: Vec<f64> = norms
        .iter()
        .map(|&n| {
            if !n.is_finite() {
                match config.non_finite {
                    // Plain arithmetic: min(1, C / NaN) = NaN, min(1, C / inf) = 0.
                    NonFinitePolicy::Propagate if n.is_nan() => f64::NAN,
                    _ => 0.0,
                }
            } else {
                match config.function {
                    ClipFunction::Hard if n > clip_bound => clip_bound / n,
                    ClipFunction::Hard => 1.0,
                    ClipFunction::Automatic { gamma } => clip_bound / (n + gamma as f64),
                    ClipFunction::Normalize if n == 0.0 => 0.0,
                    ClipFunction::Normalize => clip_bound / n,
                }
            }
        })
        .collect();
    let clipped_count = norms
        .iter()
        .filter(|&&n| n.is_finite() && n > clip_bound)
        .count();
    let skip = config.non_finite != NonFinitePolicy::Propagate;
    let grads = widths
        .iter()
        .enumerate()
        .map(|(p, &d)| {
            (0..d)
                .map(|c| {
                    let sum: f64 = (0..m)
                        .filter(|&j| !(skip && factors[j] == 0.0))
                        .map(|j| factors[j] * means[j][p][c])
                        .sum();
                    sum / m as f64
                })
                .collect()
        })
        .collect();
    Ok(Reference {
        grads,
        norms,
        factors,
        clip_bound,
        clipped_count,
        nonfinite_count,
    })
}
