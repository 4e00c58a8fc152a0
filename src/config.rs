//! What the caller asks for: clip bound, micro-batch layout, non-finite policy,
//! clip function, parameter groups and Gaussian noise.

use crate::error::{ClipError, Result};

/// How the clip bound `C` of a step is chosen. With parameter groups
/// ([`ClipConfig::with_groups`]) every group `g` gets its own bound `C_g`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClipBound {
    /// A fixed bound `C` (finite, > 0), the same for every group.
    Fixed(f32),
    /// One fixed bound `C_g` per parameter group (each finite, > 0); needs
    /// [`ClipConfig::with_groups`] with as many groups as bounds.
    PerGroup(Vec<f32>),
    /// The paper's Algorithm 1: `C_t = scale * min_j norm_j` over the step's finite
    /// micro-batch gradients. With `scale = 1` every micro-batch gradient leaves the
    /// step with norm `C_t`. Computed on the device, without a host round trip. With
    /// groups, per group: `C_g = scale * min_j norm_{j,g}`. The bound depends on the
    /// data, so noise calibrated to it carries no differential-privacy guarantee.
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
///
/// A factor beyond `f32::MAX` (`C / norm_j` above 3.4e38 under `Normalize` or
/// AUTO-S, e.g. `C = 1` on a norm below 3e-39) is reported as `+inf` on both
/// backends, but the output's terms `s_j g_j` are formed without it (the CPU in
/// f64, the GPU as a power of two and a scaled factor), so they are finite
/// wherever they fit f32; on the GPU except where a micro-batch's mean lies
/// wholly below f32's normal range (every element under 1.2e-38) and
/// `C * 1.2e-38 / max|g_j|` exceeds `f32::MAX`: those terms are `+inf`. A
/// micro-batch whose mean is exactly zero adds nothing
/// (unless its factor is NaN, see [`NonFinitePolicy::Propagate`]).
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
    /// average still divides by M. Everything else is exact. Under an adaptive
    /// bound with no finite micro-batch the output is 0, but the bound is NaN
    /// (there is nothing to take its minimum over), and so are the noise's
    /// standard deviation and, with [`GaussianNoise`], every output element.
    #[default]
    Skip,
    /// Plain arithmetic: the micro-batch's norm is NaN (or +inf when it holds
    /// infinities but no NaN); its factor is `min(1, C / norm)`, i.e. NaN or 0, and
    /// the output is `(1/M) * sum_j s_j * g_j` evaluated in IEEE arithmetic
    /// (so `0 * inf = NaN` where the infinities are). An adaptive bound still uses
    /// only the finite micro-batches; with none, each group's bound is NaN, and
    /// so is every factor (and output) of its tensors.
    Propagate,
    /// Return [`ClipError::NonFinite`] naming the first non-finite micro-batch.
    Error,
}

/// Gaussian noise for DP-SGD: the output becomes `(sum_j s_j g_j + z) / M` with
/// `z ~ N(0, (multiplier * S)^2 I)` and `S = sqrt(sum_g C_g^2)` the total clip
/// bound, as TensorFlow Privacy adds `noise_multiplier * l2_norm_clip`. Each
/// clipped micro-batch mean has norm at most `S`. One sample moves the sum by up
/// to `S` when micro-batches hold one sample (it adds or removes a whole term),
/// but by up to `2 S` when they hold more (it moves its micro-batch's clipped mean
/// from one vector of norm `S` to another): account with
/// `multiplier / accountant::micro_batch_sensitivity(b)`
/// ([`micro_batch_sensitivity`](crate::accountant::micro_batch_sensitivity)).
///
/// The noise is drawn by Philox4x32-10 keyed by `seed`, with counter
/// `(element / 2, step)` and Box-Muller (a 64-bit uniform for the radius: its
/// tail is cut at 9.49 standard deviations), where `element` numbers the outputs of all
/// tensors in order: it does not depend on the backend, workgroup sizes or row
/// windows. The GPU and CPU backends draw bitwise the same random bits and the same
/// normals up to float rounding; see [`noise`](mod@crate::noise).
///
/// **The seed is the noise's secret.** Whoever knows `seed` can draw the same
/// noise and subtract it from a released gradient (epsilon = infinity). Draw it
/// per training run from a cryptographic source (the operating system's, e.g.
/// the `getrandom` crate), keep it out of logs, checkpoints others can read and
/// published configurations. Philox4x32-10 is a statistical generator, not a
/// cryptographic one: the guarantee assumes its outputs cannot be predicted
/// without the seed, as with Opacus outside its `secure_mode`.
///
/// **Every call needs its own `(seed, step)`.** Elements are numbered from 0 in
/// each call, so two calls with the same pair add the same noise, and the
/// difference of their outputs has none: use a new `step` (or seed) for every
/// call, also for tensors of one training step clipped in separate calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianNoise {
    /// Noise multiplier `sigma` (finite, >= 0).
    pub multiplier: f32,
    /// Key of the generator: secret and random (see above).
    pub seed: u64,
    /// Counter of the call: no two calls with one seed may share it (see above).
    pub step: u64,
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
    /// The parameter group of each tensor (`None`: one group of all tensors).
    pub groups: Option<Vec<usize>>,
    /// Gaussian noise added to the sum before the division by M (`None`: none).
    pub noise: Option<GaussianNoise>,
}

impl ClipConfig {
    /// Any bound, hard clipping, [`NonFinitePolicy::Skip`].
    pub fn new(bound: ClipBound, micro_batches: MicroBatches) -> Self {
        Self {
            bound,
            micro_batches,
            non_finite: NonFinitePolicy::default(),
            function: ClipFunction::default(),
            groups: None,
            noise: None,
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

    /// Parameter groups: tensor `p` belongs to group `group_of_tensor[p]`. Groups
    /// are numbered `0..G` and none may be empty. Norms, factors and bounds become
    /// per (micro-batch, group); see [`ClipBound`] for the bound of each group.
    pub fn with_groups(mut self, group_of_tensor: Vec<usize>) -> Self {
        self.groups = Some(group_of_tensor);
        self
    }

    /// Add Gaussian noise (DP-SGD); see [`GaussianNoise`].
    pub fn with_noise(mut self, noise: GaussianNoise) -> Self {
        self.noise = Some(noise);
        self
    }

    /// Replace the non-finite policy.
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Check the parts that do not depend on the data.
    pub fn validate(&self) -> Result<()> {
        let positive = |c: f32| c.is_finite() && c > 0.0;
        match &self.bound {
            ClipBound::Fixed(c) if !positive(*c) => return Err(ClipError::InvalidClipNorm(*c)),
            ClipBound::PerGroup(bounds) => {
                if let Some(&c) = bounds.iter().find(|&&c| !positive(c)) {
                    return Err(ClipError::InvalidClipNorm(c));
                }
                if self.groups.is_none() {
                    return Err(ClipError::InvalidGroups(format!(
                        "{} per-group bounds without parameter groups (see \
                         ClipConfig::with_groups)",
                        bounds.len()
                    )));
                }
                let groups = self.group_count();
                if bounds.len() != groups {
                    return Err(ClipError::InvalidGroups(format!(
                        "{} per-group bounds for {groups} groups",
                        bounds.len()
                    )));
                }
            }
            ClipBound::Adaptive { scale } if !positive(*scale) => {
                return Err(ClipError::InvalidAdaptiveScale(*scale))
            }
            _ => {}
        }
        if let Some(groups) = &self.groups {
            // Every group has a tensor, so G <= the number of tensors.
            let mut used = vec![false; groups.len()];
            for &k in groups {
                match used.get_mut(k) {
                    Some(seen) => *seen = true,
                    None => {
                        return Err(ClipError::InvalidGroups(format!(
                            "group index {k} with {} tensors (groups must be numbered \
                             0..G with none empty)",
                            groups.len()
                        )))
                    }
                }
            }
            let g = self.group_count();
            if let Some(empty) = (0..g).find(|&k| !used[k]) {
                return Err(ClipError::InvalidGroups(format!(
                    "group {empty} has no tensor (groups must be numbered 0..{g} with none empty)"
                )));
            }
        }
        if let Some(noise) = &self.noise {
            let sigma = noise.multiplier;
            if !(sigma.is_finite() && sigma >= 0.0) {
                return Err(ClipError::InvalidNoise(sigma));
            }
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

    /// The noise's standard deviation `sigma * S` for a total bound `S`, in f64
    /// (0 without noise, or with `sigma = 0` whatever `S`, NaN or beyond f32
    /// included).
    pub(crate) fn noise_std(&self, total_bound: f64) -> f64 {
        self.noise
            .filter(|n| n.multiplier != 0.0)
            .map_or(0.0, |n| n.multiplier as f64 * total_bound)
    }

    /// The number of parameter groups G (1 without groups).
    pub fn group_count(&self) -> usize {
        self.groups
            .as_ref()
            .map_or(1, |g| g.iter().max().map_or(0, |&m| m.saturating_add(1)))
    }

    /// The group of each of `tensors` tensors, checked against the group layout.
    pub(crate) fn tensor_groups(&self, tensors: usize) -> Result<Vec<usize>> {
        match &self.groups {
            None => Ok(vec![0; tensors]),
            Some(g) if g.len() == tensors => Ok(g.clone()),
            Some(g) => Err(ClipError::InvalidGroups(format!(
                "{} group indices for {tensors} tensors",
                g.len()
            ))),
        }
    }

    /// The row offsets `[o_0 = 0, ..., o_M = n_samples]` this layout gives for a
    /// batch of `n_samples`, validated. For `Uniform(b)` this allocates the
    /// `ceil(n_samples / b) + 1` offsets (the clipping calls first check that the
    /// inputs hold `n_samples` rows), or returns [`ClipError::TooLarge`] where
    /// that vector cannot be allocated.
    pub fn row_offsets(&self, n_samples: usize) -> Result<Vec<usize>> {
        self.validate()?;
        if n_samples == 0 {
            return Err(ClipError::NoSamples);
        }
        match &self.micro_batches {
            MicroBatches::Uniform(b) => {
                let len = n_samples.div_ceil(*b).checked_add(1);
                let mut offsets = Vec::new();
                len.and_then(|len| offsets.try_reserve_exact(len).ok())
                    .ok_or_else(|| {
                        ClipError::TooLarge(format!(
                            "the offsets of {n_samples} samples in micro-batches of {b}"
                        ))
                    })?;
                offsets.extend((0..n_samples).step_by(*b));
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

/// Where each of `lengths` starts when they are laid end to end (exclusive prefix
/// sums): tensors' first columns, blocks' first columns in a row, and so on.
pub(crate) fn starts<T>(lengths: impl IntoIterator<Item = T>) -> Vec<T>
where
    T: Copy + Default + std::ops::Add<Output = T>,
{
    lengths
        .into_iter()
        .scan(T::default(), |next, len| {
            let start = *next;
            *next = start + len;
            Some(start)
        })
        .collect()
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

/// The total bound `S = sqrt(sum_g C_g^2)` of the group bounds, in f64.
pub(crate) fn total_bound(group_bounds: impl IntoIterator<Item = f64>) -> f64 {
    group_bounds.into_iter().map(|c| c * c).sum::<f64>().sqrt()
}
