//! Grow-only scratch buffers, reused across calls.

use std::collections::HashMap;

/// What a pooled buffer is for; with an index for per-tensor slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Slot {
    RowOffsets,
    Params,
    Partials,
    MbNorms,
    Factors,
    Weights,
    Norms,
    Stats,
    /// Per-group bounds `C_g`.
    Bounds,
    /// Per-micro-batch non-finite flags.
    MbFlags,
    /// First tile of each group.
    GroupTiles,
    /// One of the two carried rows (read by one window, written by the next).
    Carry(usize),
    /// `[M, sum ceil4(D_p)]` micro-batch means, when a call materialises them.
    Means,
    /// `[N, G]` per-row weights, when pass 4 re-reads rows of micro-batches of
    /// several rows.
    RowWeights,
    /// Pass 4's output row of all tensors, when it runs as one dispatch over the
    /// means (then copied into each tensor's output).
    MergedOutput,
    /// Partial rows of pass 4's row chunks (see `plan::chunk_rows_table`).
    ChunkPartials,
    /// Ones: the weights of the sum of pass 4's row chunks.
    Ones,
    /// 16 bytes bound as pass 4's partial rows where a dispatch writes none.
    NoPartials,
    Readback,
    /// Host-path upload buffer `k`, holding input tensors packed one after the other.
    Input(usize),
    /// Host-path output of tensor `p`.
    Output(usize),
}

/// Usage of the pooled scratch that kernels read and write and copies read or
/// fill: one value, so that every request for a slot matches its buffer.
pub(crate) const SCRATCH_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Buffers by slot; a request larger than the slot's buffer replaces it.
pub(crate) struct Pool {
    device: wgpu::Device,
    buffers: HashMap<Slot, wgpu::Buffer>,
    /// Set (for tests): every buffer handed out is first filled with 0xFF bytes
    /// (f32 NaN, u32::MAX) through this queue.
    poison: Option<wgpu::Queue>,
}

impl Pool {
    pub fn new(device: wgpu::Device) -> Self {
        Self {
            device,
            buffers: HashMap::new(),
            poison: None,
        }
    }

    /// Poisons every buffer [`Self::get`] hands out from now on (`Some`), or stops.
    /// Queue writes run before the commands of the submission after them, and
    /// after the writes queued before, so a call sees 0xFF wherever it reads a
    /// scratch byte that neither it nor the host wrote since taking the buffer:
    /// what a pooled buffer left by an earlier call could hold.
    pub fn set_poison(&mut self, queue: Option<wgpu::Queue>) {
        self.poison = queue;
    }

    /// A buffer of at least `size` bytes with `usage`.
    pub fn get(&mut self, slot: Slot, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let size = size.max(16).next_multiple_of(16);
        let buffer = match self.buffers.get(&slot) {
            Some(b) if b.size() >= size && b.usage() == usage => b.clone(),
            _ => {
                let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("microclip {slot:?}")),
                    size,
                    usage,
                    mapped_at_creation: false,
                });
                self.buffers.insert(slot, buffer.clone());
                buffer
            }
        };
        if let Some(queue) = &self.poison {
            if usage.contains(wgpu::BufferUsages::COPY_DST) {
                queue.write_buffer(&buffer, 0, &vec![0xFF; buffer.size() as usize]);
            }
        }
        buffer
    }

    /// Drops every buffer: after a failed call (one may be invalid, say out of
    /// memory, and must not be handed out again), or to free the memory
    /// (`Clipper::release_scratch`).
    pub fn clear(&mut self) {
        self.buffers.clear();
    }

    /// Drops `slot`'s buffer, if any.
    pub fn release(&mut self, slot: Slot) {
        self.buffers.remove(&slot);
    }

    /// Bytes of scratch held (everything but the host path's input and output
    /// tensors, which hold the caller's data rather than extra state).
    pub fn scratch_bytes(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|(slot, _)| !matches!(slot, Slot::Input(_) | Slot::Output(_)))
            .map(|(_, b)| b.size())
            .sum()
    }
}
