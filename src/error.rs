//! Typed errors. Every error is raised before any GPU work is recorded, except
//! [`ClipError::NonFinite`] (needs the norms) and the device errors.

/// Everything that can go wrong in a clipping call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClipError {
    /// The clip norm is zero, negative, NaN or infinite.
    #[error("clip norm must be finite and > 0, got {0}")]
    InvalidClipNorm(f32),
    /// The adaptive-bound scale is zero, negative, NaN or infinite.
    #[error("adaptive clip scale must be finite and > 0, got {0}")]
    InvalidAdaptiveScale(f32),
    /// The AUTO-S stability constant is zero, negative, NaN or infinite.
    #[error("automatic clipping gamma must be finite and > 0, got {0}")]
    InvalidGamma(f32),
    /// The parameter groups do not match the tensors or the per-group bounds, or a
    /// group is empty.
    #[error("invalid parameter groups: {0}")]
    InvalidGroups(String),
    /// The noise multiplier is negative, NaN or infinite.
    #[error("noise multiplier must be finite and >= 0, got {0}")]
    InvalidNoise(f32),
    /// `MicroBatches::Uniform(0)`.
    #[error("micro-batch size must be >= 1")]
    ZeroMicroBatchSize,
    /// The explicit offsets are not `0 = o_0 < o_1 < ... < o_M = N`.
    #[error("invalid micro-batch offsets: {0}")]
    InvalidOffsets(String),
    /// `n_samples` is zero.
    #[error("the batch holds no samples (N = 0)")]
    NoSamples,
    /// No tensors were given.
    #[error("no gradient tensors given")]
    NoTensors,
    /// A tensor's length is not a positive multiple of `n_samples`.
    #[error("tensor {tensor}: length {len} is not a positive multiple of N = {n_samples}")]
    TensorLength {
        /// Index of the offending tensor.
        tensor: usize,
        /// Its length in elements.
        len: usize,
        /// The batch size it was checked against.
        n_samples: usize,
    },
    /// A GPU tensor or output does not fit in the buffer it names, or is misaligned.
    #[error("tensor {tensor}: {reason}")]
    BufferRange {
        /// Index of the offending tensor.
        tensor: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The number of output buffers differs from the number of input tensors.
    #[error("{outputs} outputs given for {inputs} input tensors")]
    OutputCount {
        /// Number of input tensors.
        inputs: usize,
        /// Number of outputs.
        outputs: usize,
    },
    /// A shape is beyond what the kernels can address: one input row, or one
    /// tensor's f32 output row, larger than a storage binding (less up to 256
    /// bytes of offset-alignment slack); scratch bound whole (the `M x tiles`
    /// norm partials, the `N x G` per-row weights) larger than a binding;
    /// `u32::MAX` rows or more; more workgroups than one dispatch can index; on
    /// the GPU host-slice path (`Clipper::clip`), a tensor larger than the
    /// device's largest buffer (caller buffers are read in row windows and have
    /// no such limit beyond the buffer's own); the call's uniform blocks (256
    /// bytes a dispatch) beyond the device's largest buffer, which only a device
    /// asked for a few KiB can see.
    #[error("input too large: {0}")]
    TooLarge(String),
    /// The [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error) policy found a
    /// micro-batch gradient containing NaN or infinity.
    #[error("micro-batch {micro_batch} has a non-finite gradient ({count} non-finite micro-batches in all)")]
    NonFinite {
        /// The first non-finite micro-batch.
        micro_batch: usize,
        /// How many micro-batches are non-finite.
        count: usize,
    },
    /// A GPU call was asked of a CPU clipper.
    #[error("this clipper runs on the CPU backend; GPU buffers need a GPU clipper")]
    NotGpu,
    /// No GPU adapter could be found or the device could not be created.
    #[error("no GPU available: {0}")]
    NoAdapter(String),
    /// The GPU reported an error (validation, out of memory, lost device, map failure).
    #[error("GPU error: {0}")]
    Device(String),
}

/// Result alias for this crate.
pub type Result<T, E = ClipError> = std::result::Result<T, E>;
