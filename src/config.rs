//! What the caller asks for: clip bound, micro-batch layout, non-finite policy.

use crate::error::{ClipError, Result};

/// How the clip bound `C` of a step is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClipBound {
    /// A fixed bound `C` (finite, > 0).
    Fixed(f32),
    /// The paper's Algorithm 1: `C_t = scale * min_j norm_j` over the step's finite
    /// micro-batch gradients. With `scale = 1` every micro-batch gradient leaves the
    /// step with norm `C_t`. Computed on the device, without a host round trip.
    Adaptive {
        /// Multiplier on the smallest norm (finite, > 0; 1 in the paper).
        scale: f32,
    },
}

/// How the N samples are split into M micro-batches of consecutive rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MicroBatches {
    /// Micro-batches of `b` rows; when `b` does not divide N the last one is shorter.
    /// `b >= N` gives one micro-batch (plain clipping of the mean gradient).
    Uniform(usize),
    /// Explicit row offsets `[0 = o_0 < o_1 < ... < o_M = N]`.
    Offsets(Vec<usize>),
}

/// How a micro-batch's factor `s_j` follows from its norm and the bound `C`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ClipFunction {
    /// `s_j = min(1, C / norm_j)` (1 when `norm_j = 0`): the classic clip.
    #[default]
    Hard,
    /// AUTO-S (Bu et al., "Automatic Clipping"): `s_j = C / (norm_j + gamma)`, every
    /// micro-batch rescaled to just under norm `C`; `gamma` finite and > 0 (0.01 is
    /// the paper's default).
    Automatic {
        /// Stability constant added to the norm.
        gamma: f32,
    },
    /// `s_j = C / norm_j` (0 when `norm_j = 0`): every micro-batch to norm exactly `C`.
    Normalize,
}

/// What to do with a micro-batch whose mean gradient contains NaN or infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// The micro-batch gets factor 0, is counted in `nonfinite_count`, and the
    /// average still divides by M. Everything else is exact.
    #[default]
    Skip,
    /// Plain arithmetic: the micro-batch's norm is NaN (or +inf when it holds
    /// infinities but no NaN); its factor is `min(1, C / norm)`, i.e. NaN or 0, and
    /// the output is `(1/M) * sum_j s_j * g_j` evaluated in IEEE arithmetic
    /// (so `0 * inf = NaN` where the infinities are). An adaptive bound still uses
    /// only the finite micro-batches.
    Propagate,
    /// Return [`ClipError::NonFinite`] naming the first non-finite micro-batch.
    Error,
}

/// A complete clipping configuration.
///
/// ```
/// use microclip::{ClipConfig, MicroBatches, NonFinitePolicy};
/// let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(4))
///     .with_non_finite(NonFinitePolicy::Error);
/// assert!(cfg.validate().is_ok());
/// assert!(ClipConfig::fixed(0.0, MicroBatches::Uniform(4)).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// The clip bound.
    pub bound: ClipBound,
    /// The micro-batch layout.
    pub micro_batches: MicroBatches,
    /// The non-finite policy.
    pub non_finite: NonFinitePolicy,
    /// The clip function (default [`ClipFunction::Hard`]).
    pub function: ClipFunction,
}

impl ClipConfig {
    /// Any bound, hard clipping, [`NonFinitePolicy::Skip`].
    pub fn new(bound: ClipBound, micro_batches: MicroBatches) -> Self {
        Self {
            bound,
            micro_batches,
            non_finite: NonFinitePolicy::default(),
            function: ClipFunction::default(),
        }
    }

    /// Fixed clip norm `c`, [`NonFinitePolicy::Skip`].
    pub fn fixed(c: f32, micro_batches: MicroBatches) -> Self {
        Self::new(ClipBound::Fixed(c), micro_batches)
    }

    /// Adaptive bound `scale * min_j norm_j` (paper's Algorithm 1 with `scale = 1`).
    pub fn adaptive(scale: f32, micro_batches: MicroBatches) -> Self {
        Self::new(ClipBound::Adaptive { scale }, micro_batches)
    }

    /// Replace the clip function.
    pub fn with_function(mut self, function: ClipFunction) -> Self {
        self.function = function;
        self
    }

    /// Replace the non-finite policy.
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Check the parts that do not depend on the data.
    pub fn validate(&self) -> Result<()> {
        match self.bound {
            ClipBound::Fixed(c) if !(c.is_finite() && c > 0.0) => {
                return Err(ClipError::InvalidClipNorm(c))
            }
            ClipBound::Adaptive { scale } if !(scale.is_finite() && scale > 0.0) => {
                return Err(ClipError::InvalidAdaptiveScale(scale))
            }
            _ => {}
        }
        if let ClipFunction::Automatic { gamma } = self.function {
            if !(gamma.is_finite() && gamma > 0.0) {
                return Err(ClipError::InvalidGamma(gamma));
            }
        }
        if self.micro_batches == MicroBatches::Uniform(0) {
            return Err(ClipError::ZeroMicroBatchSize);
        }
        Ok(())
    }

    /// The row offsets `[o_0 = 0, ..., o_M = n_samples]` this layout gives for a
    /// batch of `n_samples`, validated.
    pub fn row_offsets(&self, n_samples: usize) -> Result<Vec<usize>> {
        self.validate()?;
        if n_samples == 0 {
            return Err(ClipError::NoSamples);
        }
        match &self.micro_batches {
            MicroBatches::Uniform(b) => {
                let mut offsets: Vec<usize> = (0..n_samples).step_by(*b).collect();
                offsets.push(n_samples);
                Ok(offsets)
            }
            MicroBatches::Offsets(o) => {
                let bad = |why: String| Err(ClipError::InvalidOffsets(why));
                if o.len() < 2 {
                    return bad(format!("need at least 2 offsets, got {}", o.len()));
                }
                if o[0] != 0 {
                    return bad(format!("first offset must be 0, got {}", o[0]));
                }
                if o[o.len() - 1] != n_samples {
                    return bad(format!(
                        "last offset must equal N = {n_samples}, got {}",
                        o[o.len() - 1]
                    ));
                }
                if let Some(k) = o.windows(2).position(|w| w[0] >= w[1]) {
                    return bad(format!(
                        "offsets must be strictly increasing: o[{k}] = {} >= o[{}] = {}",
                        o[k],
                        k + 1,
                        o[k + 1]
                    ));
                }
                Ok(o.clone())
            }
        }
    }
}

/// Checks tensor lengths against `n_samples` and returns each tensor's row width `D_p`.
pub(crate) fn tensor_widths(
    lens: impl Iterator<Item = usize>,
    n_samples: usize,
) -> Result<Vec<usize>> {
    let widths: Vec<usize> = lens
        .enumerate()
        .map(|(tensor, len)| {
            if len == 0 || n_samples == 0 || len % n_samples != 0 {
                Err(ClipError::TensorLength {
                    tensor,
                    len,
                    n_samples,
                })
            } else {
                Ok(len / n_samples)
            }
        })
        .collect::<Result<_>>()?;
    if widths.is_empty() {
        return Err(ClipError::NoTensors);
    }
    Ok(widths)
}
