//! Checks of caller buffers before any device memory is taken for a call:
//! inputs in range, aligned and usable as storage; outputs of the inputs'
//! widths, outside the input buffers and not overlapping each other.

use super::{GpuClipper, GpuTensor, GpuTensorMut};
use crate::error::{ClipError, Result};
use wgpu::BufferUsages as U;

impl GpuClipper {
    /// The checks of [`Self::check_inputs`], then of [`Self::check_outputs`].
    pub(crate) fn check_buffers(
        &self,
        n: u64,
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
    ) -> Result<()> {
        self.check_inputs(n, inputs)?;
        self.check_outputs(inputs, outputs)
    }

    /// The outputs of `inputs`: in range, each with its input's width, none in
    /// an input's buffer, none overlapping another.
    pub(crate) fn check_outputs(
        &self,
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
    ) -> Result<()> {
        // A set, not a scan per output: 600,000 tensors took minutes here.
        // (wgpu::Buffer hashes and compares by its handle's address.)
        #[allow(clippy::mutable_key_type)]
        let input_buffers: std::collections::HashSet<&wgpu::Buffer> =
            inputs.iter().map(|i| i.buffer).collect();
        for (p, (t, o)) in inputs.iter().zip(outputs).enumerate() {
            let bytes = (t.cols as u64).saturating_mul(4);
            check_range(p, "output", o.buffer, o.offset, bytes)?;
            if o.cols != t.cols {
                return Err(range_error(
                    p,
                    format!("output has {} cols, input {}", o.cols, t.cols),
                ));
            }
            if input_buffers.contains(o.buffer) {
                return Err(range_error(
                    p,
                    "output buffer is also an input buffer".into(),
                ));
            }
        }
        // Outputs in one buffer, by offset: each must end before the next starts.
        let mut order: Vec<usize> = (0..outputs.len()).collect();
        order.sort_by(|&a, &b| {
            (outputs[a].buffer, outputs[a].offset).cmp(&(outputs[b].buffer, outputs[b].offset))
        });
        for w in order.windows(2) {
            let (a, b) = (&outputs[w[0]], &outputs[w[1]]);
            if a.buffer == b.buffer && a.offset + a.cols as u64 * 4 > b.offset {
                return Err(range_error(
                    w[1],
                    format!("output overlaps the output of tensor {}", w[0]),
                ));
            }
        }
        Ok(())
    }

    /// Every input is non-empty, aligned, inside its buffer with `n` rows and
    /// usable as storage, and `n` fits the device's u32 row indices. Checked
    /// before any device memory is taken for the call (also its outputs).
    pub(crate) fn check_inputs(&self, n: u64, inputs: &[GpuTensor<'_>]) -> Result<()> {
        if inputs.is_empty() {
            return Err(ClipError::NoTensors);
        }
        for (p, t) in inputs.iter().enumerate() {
            if t.cols == 0 {
                return Err(range_error(p, "cols must be >= 1".into()));
            }
            check_range(p, "input", t.buffer, t.offset, t.bound_bytes(n))?;
        }
        // Row indices are u32 on the device (checked after the ranges: an
        // n_samples no buffer holds is a range error).
        if n >= u32::MAX as u64 {
            return Err(ClipError::TooLarge(format!("{n} rows exceed u32 indexing")));
        }
        Ok(())
    }
}

fn range_error(tensor: usize, reason: String) -> ClipError {
    ClipError::BufferRange { tensor, reason }
}

/// Tensor `p`'s `what` ("input" or "output") at `offset`, `len` bytes, in `buffer`:
/// 4-byte aligned, inside the buffer, with `STORAGE` usage.
fn check_range(p: usize, what: &str, buffer: &wgpu::Buffer, offset: u64, len: u64) -> Result<()> {
    if !offset.is_multiple_of(4) {
        return Err(range_error(
            p,
            format!("{what} offset {offset} is not a multiple of 4"),
        ));
    }
    if offset.saturating_add(len) > buffer.size() {
        return Err(range_error(
            p,
            format!(
                "{what} needs bytes [{offset}, {}) but its buffer has {} bytes",
                offset.saturating_add(len),
                buffer.size()
            ),
        ));
    }
    if !buffer.usage().contains(U::STORAGE) {
        return Err(range_error(
            p,
            format!("{what} buffer lacks BufferUsages::STORAGE"),
        ));
    }
    Ok(())
}
