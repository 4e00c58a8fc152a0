//! GPU execution: the clipper's device and settings, the host-slice and
//! caller-buffer calls, submission and the read-back of the statistics. Each
//! concern below it has its module: `validate` (caller buffers), `layout` (a
//! call's tiles, windows and scratch), `plan` (the planning arithmetic it
//! uses), `encode`, `tables` and `dispatch` (recording the passes), `kernels`
//! (the pipelines), `pool` (scratch buffers reused across calls), `defaults`
//! (settings per kind of adapter), `timer` (timestamp queries) and
//! `noise_words` (the noise generator's raw output, for tests).
//!
//! Passes (one compute pass, wgpu inserts the barriers between dispatches):
//! 1. `mb_partials`: per (micro-batch, column tile) partial squared norm of the
//!    micro-batch mean, for every tensor and row window (and, when
//!    `materialize_means` says so, the means themselves: one matrix bound
//!    whole, or a block per tensor bound by the rows each dispatch writes);
//!    tensors share
//!    dispatches through a table (`plan::pass1_dispatches`), those in separate
//!    buffers through up to 8 binding slots (grads_slots.wgsl);
//! 2. `mb_norms`: per (micro-batch, parameter group) norm over the group's tiles
//!    (tiles are numbered group by group);
//! 3. `clip_factors`: bounds (fixed or adaptive), factors, weights, counts, the
//!    total bound and the noise scale;
//! 4. `weighted_means`: `out_p = sum_j (s_{j,g} / M) * mean_j` over the stored means
//!    (per tensor, in windows of rows for blocks larger than one binding, or once
//!    for all tensors into a scratch row), or as the sum over
//!    the input rows, per tensor and window (or in the norm pass's dispatches into
//!    the scratch row), of each micro-batch's rows over its size, summed, times
//!    its weight (those row weights from `row_weights`, dispatched after
//!    `clip_factors` unless b = 1), those rows in chunks of `pass4_chunk_rows`
//!    into partial rows, then summed, where that is set (`chunk_rows_table`; a
//!    tensor's row windows together, `chunk_windows_table`);
//! 5. `add_noise` (only with noise): `out_p += noise_scale * z`, per tensor.

mod defaults;
mod dispatch;
mod encode;
pub(crate) mod kernels;
mod layout;
mod noise_words;
mod plan;
mod pool;
mod tables;
mod timer;
mod validate;

use layout::CallLayout;

use crate::clipper::{BackendKind, ClipOutput, ClipStats};
use crate::config::{total_bound, ClipConfig, NonFinitePolicy};
use crate::dtype::{Dtype, GradElement};
use crate::error::{ClipError, Result};
pub(crate) use defaults::MAX_PASS4_CHUNK_ROWS;
use defaults::{
    default_buffer_slots, default_loop_budget, default_merge_max_avg_cols,
    default_min_tile_workgroups, default_pass4_chunk_rows, default_small_workgroups,
    DEFAULT_MEANS_MIN_ROWS,
};
use kernels::{slots_supported, Kernels, Needs, SLOTS, STATS_BYTES};
use noise_words::noise_params;
use plan::{pack, tile_cap, tile_cols};
use pool::{Pool, Slot};
use timer::{PassTimer, TIMER_BYTES};
use wgpu::BufferUsages as U;

/// A per-sample gradient tensor in a caller's buffer: a row-major `[N, cols]`
/// matrix of `dtype` elements starting at byte `offset` (a multiple of 4). The
/// buffer needs `BufferUsages::STORAGE`, must belong to the clipper's device and,
/// for 16-bit types, must hold the tensor's bytes rounded up to a multiple of 4
/// (storage bindings cover whole 32-bit words).
#[derive(Debug, Clone, Copy)]
pub struct GpuTensor<'a> {
    /// The buffer holding the tensor.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of element `[0, 0]`.
    pub offset: u64,
    /// Row width `D_p`.
    pub cols: usize,
    /// Element type (f32, or f16 / bf16 read and accumulated in f32).
    pub dtype: Dtype,
}

impl<'a> GpuTensor<'a> {
    /// An f32 tensor of `cols` columns at byte `offset` of `buffer`.
    pub fn new(buffer: &'a wgpu::Buffer, offset: u64, cols: usize) -> Self {
        Self {
            buffer,
            offset,
            cols,
            dtype: Dtype::F32,
        }
    }

    /// The same tensor with element type `dtype`.
    pub fn with_dtype(self, dtype: Dtype) -> Self {
        Self { dtype, ..self }
    }

    /// Bytes the tensor's `rows` rows occupy in a binding (whole 32-bit words).
    fn bound_bytes(&self, rows: u64) -> u64 {
        rows.saturating_mul(self.cols as u64)
            .saturating_mul(self.dtype.size_bytes())
            .saturating_add(3)
            / 4
            * 4
    }
}

/// Where to write `out_p`: `cols` f32 starting at byte `offset` (a multiple of 4) of
/// a buffer with `BufferUsages::STORAGE`, not one of the input buffers.
#[derive(Debug, Clone, Copy)]
pub struct GpuTensorMut<'a> {
    /// The buffer to write.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of `out_p[0]`.
    pub offset: u64,
    /// Number of elements, equal to the input tensor's `cols`.
    pub cols: usize,
}

/// The GPU engine behind [`crate::Clipper`].
pub(crate) struct GpuClipper {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter_name: String,
    kernels: Kernels,
    pool: Pool,
    /// The device's largest storage binding (and buffer).
    device_max_binding: u64,
    /// The binding limit in use (`device_max_binding` unless lowered).
    max_binding: u64,
    storage_align: u64,
    uniform_align: u64,
    /// The norm pass widens its column tiles while it keeps at least this many
    /// workgroups (see `plan::tile_cols`).
    min_tile_workgroups: u64,
    /// Average rows per micro-batch from which pass 1 stores the means (see
    /// `plan::materialize_means`).
    means_min_rows: u64,
    /// Pass 4 runs once for several tensors only while their average padded
    /// width is at most this (see `default_merge_max_avg_cols`).
    merge_max_avg_cols: u64,
    /// Buffer ranges one input-reading dispatch may bind: [`SLOTS`] or 1 (tensors
    /// in separate buffers then take a dispatch each per pass); see
    /// `default_buffer_slots`.
    buffer_slots: usize,
    /// Pass 4 over input rows walks them this many at a time (0: all at once);
    /// see `default_pass4_chunk_rows`.
    pass4_chunk_rows: u32,
    /// Loop iterations one shader invocation may make (`None`: no limit); see
    /// `default_loop_budget`.
    loop_budget: Option<u64>,
    /// Whether 16-bit rows that allow it are read as octs (`None`: with small
    /// workgroups); see `oct_loads`.
    oct_loads: Option<bool>,
    /// Times each call's compute pass when set (`set_timing`).
    timer: Option<PassTimer>,
    /// Device time of the last call's compute pass, when timed.
    last_pass_time: Option<std::time::Duration>,
    /// Compute dispatches the last call recorded.
    last_dispatches: usize,
    /// Of those, the input readers that read 16-bit rows as octs.
    last_oct_dispatches: usize,
}

impl GpuClipper {
    /// The default adapter with all of its limits: a primary backend (Vulkan, Metal,
    /// DX12) first, OpenGL only when none exists; `WGPU_BACKEND` overrides the order.
    pub async fn new_default() -> Result<Self> {
        let mut last_error = String::from("no adapter");
        let tries = match wgpu::Backends::from_env() {
            Some(only) => vec![only],
            None => vec![wgpu::Backends::PRIMARY, wgpu::Backends::GL],
        };
        for backends in tries {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
            desc.backends = backends;
            let instance = wgpu::Instance::new(desc);
            let adapter = match instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    ..Default::default()
                })
                .await
            {
                Ok(adapter) => adapter,
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            };
            let device = adapter
                .request_device(&wgpu::DeviceDescriptor {
                    label: Some("microclip"),
                    // Timestamps where the adapter has them (`set_timing`).
                    required_features: adapter.features() & wgpu::Features::TIMESTAMP_QUERY,
                    required_limits: adapter.limits(),
                    ..Default::default()
                })
                .await;
            let (device, queue) = match device {
                Ok(pair) => pair,
                // The device of one kind failing to open: try the next kind too.
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            };
            match Self::from_device(device, queue) {
                Ok(clipper) => return Ok(clipper),
                // Say a GL adapter without compute shaders: try the next kind.
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(ClipError::NoAdapter(last_error))
    }

    /// Builds the pipelines on an existing device: a [`ClipError::Device`] when
    /// its limits are below the kernels' needs or a pipeline fails to build.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        let info = device.adapter_info();
        let limits = device.limits();
        if limits.max_storage_buffers_per_shader_stage < KERNEL_STORAGE_BUFFERS
            || limits.max_compute_invocations_per_workgroup < 256
            || limits.max_compute_workgroup_size_x < 256
            || limits.max_compute_workgroups_per_dimension < plan::MAX_GROUPS_PER_DIM
        {
            return Err(ClipError::Device(format!(
                "the device allows {} storage buffers per shader stage, {} invocations \
                 per workgroup, workgroups of {} in x and {} workgroups per dimension; the \
                 kernels need {KERNEL_STORAGE_BUFFERS}, 256, 256 and {}",
                limits.max_storage_buffers_per_shader_stage,
                limits.max_compute_invocations_per_workgroup,
                limits.max_compute_workgroup_size_x,
                limits.max_compute_workgroups_per_dimension,
                plan::MAX_GROUPS_PER_DIM
            )));
        }
        let small_workgroups = default_small_workgroups(info.device_type);
        let kernels = scoped(&device, || Kernels::new(&device, small_workgroups))?;
        let device_max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            .min(MAX_BINDING_BYTES)
            / 16
            * 16;
        Ok(Self {
            adapter_name: format!("{} ({:?})", info.name, info.backend),
            kernels,
            pool: Pool::new(device.clone()),
            device_max_binding,
            max_binding: device_max_binding,
            storage_align: limits.min_storage_buffer_offset_alignment as u64,
            uniform_align: limits.min_uniform_buffer_offset_alignment as u64,
            min_tile_workgroups: default_min_tile_workgroups(info.device_type),
            means_min_rows: DEFAULT_MEANS_MIN_ROWS,
            merge_max_avg_cols: default_merge_max_avg_cols(info.device_type),
            buffer_slots: default_buffer_slots(&device),
            pass4_chunk_rows: default_pass4_chunk_rows(info.device_type),
            loop_budget: default_loop_budget(info.device_type),
            oct_loads: None,
            timer: None,
            last_pass_time: None,
            last_dispatches: 0,
            last_oct_dispatches: 0,
            device,
            queue,
        })
    }

    /// Times every later call's compute pass (`on`) or stops; returns whether
    /// calls are timed (false without `TIMESTAMP_QUERY` on the device, or when
    /// its query set or buffers cannot be made).
    pub fn set_timing(&mut self, on: bool) -> bool {
        self.timer = if on {
            let (device, queue) = (&self.device, &self.queue);
            self.timer.take().or_else(|| {
                scoped(device, || PassTimer::new(device, queue))
                    .ok()
                    .flatten()
            })
        } else {
            None
        };
        self.last_pass_time = None;
        self.timer.is_some()
    }

    /// Device time of the last call's compute pass, when it was timed.
    pub fn last_pass_time(&self) -> Option<std::time::Duration> {
        self.last_pass_time
    }

    pub fn last_dispatches(&self) -> usize {
        self.last_dispatches
    }

    pub fn last_oct_dispatches(&self) -> usize {
        self.last_oct_dispatches
    }

    /// Clears what the last call left (its device time and dispatch counts): a
    /// new call begins, so one that fails before recording reports none.
    pub fn forget_last_call(&mut self) {
        self.last_pass_time = None;
        self.last_dispatches = 0;
        self.last_oct_dispatches = 0;
    }

    pub fn adapter_name(&self) -> &str {
        &self.adapter_name
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    pub fn scratch_bytes(&self) -> u64 {
        self.pool.scratch_bytes()
    }

    /// Drops every pooled buffer (calls wait for their work, so none is in use).
    pub fn release_scratch(&mut self) {
        self.pool.clear();
    }

    pub fn set_max_binding_bytes(&mut self, bytes: u64) {
        // Up to a multiple of 16 (the device's limit is one): a limit a test sets
        // just above a row plus the alignment slack must stay above it.
        // (Not `clamp`: a device whose own limit is below the floor keeps it,
        // and its calls are `TooLarge`.)
        self.max_binding = bytes
            .max(self.storage_align + 16)
            .min(self.device_max_binding)
            .next_multiple_of(16)
            .min(self.device_max_binding);
    }

    pub fn set_min_tile_workgroups(&mut self, workgroups: Option<u64>) {
        self.min_tile_workgroups = workgroups
            .unwrap_or_else(|| default_min_tile_workgroups(self.device.adapter_info().device_type));
    }

    /// At least 2: one-row means would be a copy of the input.
    pub fn set_means_min_rows(&mut self, rows: Option<u64>) {
        self.means_min_rows = rows.unwrap_or(DEFAULT_MEANS_MIN_ROWS).max(2);
    }

    /// Whether input-reading dispatches may bind several buffers (where the device
    /// allows it); `None`: the default for the device.
    pub fn set_buffer_slots(&mut self, on: Option<bool>) {
        self.buffer_slots = match on {
            None => default_buffer_slots(&self.device),
            Some(true) if slots_supported(&self.device) => SLOTS,
            Some(_) => 1,
        };
    }

    pub fn buffer_slots(&self) -> bool {
        self.buffer_slots > 1
    }

    /// Rows per chunk of pass 4 over input rows (0: no chunks; at most
    /// [`MAX_PASS4_CHUNK_ROWS`]); `None`: the default for the adapter.
    pub fn set_pass4_chunk_rows(&mut self, rows: Option<u32>) {
        self.pass4_chunk_rows = rows
            .unwrap_or_else(|| default_pass4_chunk_rows(self.device.adapter_info().device_type))
            .min(MAX_PASS4_CHUNK_ROWS);
    }

    pub fn pass4_chunk_rows(&self) -> u32 {
        self.pass4_chunk_rows
    }

    /// Whether the input readers take 16-bit rows that start at multiples of 8
    /// elements as octs (grads_octs.wgsl: one `vec4<u32>` load per two quads
    /// instead of two `vec2<u32>` loads): by default with small workgroups, whose
    /// ADJACENT walks read a lane's quads in pairs (on lavapipe, where each load
    /// instruction costs per lane, see BENCHMARKS.md); the same bits either way.
    pub fn oct_loads(&self) -> bool {
        self.oct_loads
            .unwrap_or_else(|| self.kernels.small_workgroups())
    }

    /// Sets [`Self::oct_loads`] (`None`: the default).
    pub fn set_oct_loads(&mut self, on: Option<bool>) {
        self.oct_loads = on;
    }

    /// Fills every pooled buffer a call takes with 0xFF bytes first (`on`), or
    /// stops ([`Pool::set_poison`]).
    pub fn set_poison_scratch(&mut self, on: bool) {
        self.pool.set_poison(on.then(|| self.queue.clone()));
    }

    /// Whether the octs readers may read 16-bit tensor `t`'s rows (rows of a
    /// multiple of 8 elements; whether a dispatch's rows start at multiples of 8
    /// elements of its binding is `plan::oct_rows`), where oct loads are on: its
    /// type's octs readers are prepared for the call.
    fn oct_tensor(&self, t: &GpuTensor<'_>) -> bool {
        self.oct_loads() && t.dtype.size_bytes() == 2 && t.cols.is_multiple_of(8)
    }

    /// Rebuilds the pipelines in error scopes and keeps the old ones if that
    /// fails (`small_workgroups` then reports the setting unchanged).
    pub fn set_small_workgroups(&mut self, small: Option<bool>) {
        let small = small
            .unwrap_or_else(|| default_small_workgroups(self.device.adapter_info().device_type));
        if small != self.kernels.small_workgroups() {
            if let Ok(kernels) = scoped(&self.device, || self.kernels.rebuilt(&self.device, small))
            {
                self.kernels = kernels;
            }
        }
    }

    pub fn small_workgroups(&self) -> bool {
        self.kernels.small_workgroups()
    }

    /// Rebuilds the f16 readers (in error scopes, as [`Self::set_small_workgroups`]).
    pub fn set_f16_unpack(&mut self, unpack: Option<bool>) {
        let (device, kernels) = (&self.device, &mut self.kernels);
        if scoped(device, || kernels.set_f16_unpack(device, unpack)).is_err() {
            kernels.forget_readers();
        }
    }

    pub fn f16_unpack(&self) -> bool {
        self.kernels.f16_unpack()
    }

    pub fn f16_unpack_built(&self) -> Option<bool> {
        self.kernels.f16_unpack_built()
    }

    pub fn means_min_rows(&self) -> u64 {
        self.means_min_rows
    }

    pub fn tile_cols(&self, widths: &[usize], micro_batches: usize, deepest: usize) -> u64 {
        tile_cols(
            widths.iter().map(|&d| d as u64),
            micro_batches as u64,
            self.min_tile_workgroups,
            tile_cap(self.loop_budget, deepest as u64),
        )
    }

    /// A new output buffer for `cols` f32: [`ClipError::TooLarge`] beyond the
    /// device's largest buffer, [`ClipError::Device`] if it cannot be made.
    pub fn output_buffer(&self, cols: usize) -> Result<wgpu::Buffer> {
        let size = (cols as u64).saturating_mul(4).max(4);
        let max_buffer = self.device.limits().max_buffer_size;
        if size > max_buffer {
            return Err(ClipError::TooLarge(format!(
                "an output of {cols} f32 exceeds the device's largest buffer ({max_buffer} bytes)"
            )));
        }
        scoped(&self.device, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("microclip output"),
                size,
                usage: U::STORAGE | U::COPY_SRC | U::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    /// Host slices in, host vectors out: uploads each tensor once into pooled
    /// buffers, packed (the input itself, not a copy of a device buffer).
    pub fn clip_host<T: GradElement>(
        &mut self,
        config: &ClipConfig,
        offsets: &[usize],
        widths: &[usize],
        group_of: &[usize],
        tensors: &[&[T]],
    ) -> Result<ClipOutput> {
        let max_buffer = self.device.limits().max_buffer_size;
        // The tensors packed one after the other (at the storage offset alignment)
        // into pooled buffers of up to one binding each: tensors in one buffer
        // share the norm pass's dispatches. (buffer index, byte offset) each.
        // Pooled buffers are rounded up to 16 bytes: keep that within the limit.
        let max_buffer = max_buffer / 16 * 16;
        let sizes: Vec<u64> = tensors
            .iter()
            .map(|t| (std::mem::size_of_val(*t) as u64).next_multiple_of(4))
            .collect();
        if let Some(p) = sizes.iter().position(|&bytes| bytes > max_buffer) {
            return Err(ClipError::TooLarge(format!(
                "tensor {p}: {} bytes exceed the device's largest buffer ({max_buffer} bytes)",
                sizes[p]
            )));
        }
        if let Some(p) = widths.iter().position(|&d| d as u64 * 4 > max_buffer) {
            return Err(ClipError::TooLarge(format!(
                "tensor {p}: its f32 output row of {} bytes exceeds the device's largest \
                 buffer ({max_buffer} bytes)",
                widths[p] as u64 * 4
            )));
        }
        // The outputs are read back in one buffer with the statistics: refused
        // before the upload when that buffer is too large.
        let readback_len = self.readback_len(
            offsets.len() as u64 - 1,
            group_count(group_of) as u64,
            widths.iter().map(|&d| d as u64 * 4).sum(),
        );
        if readback_len > max_buffer {
            return Err(ClipError::TooLarge(format!(
                "the statistics and outputs read back ({readback_len} bytes) exceed the \
                 device's largest buffer ({max_buffer} bytes)"
            )));
        }
        // Buffers up to one binding (sharing needs no more) unless a tensor is larger.
        let limit = self.max_binding.min(max_buffer) / 16 * 16;
        let (placed, buffer_bytes) = pack(&sizes, self.storage_align, limit);
        // In error scopes: running out of device memory is a ClipError::Device.
        let (pool, queue) = (&mut self.pool, &self.queue);
        let created = scoped(&self.device, || {
            let buffers: Vec<wgpu::Buffer> = buffer_bytes
                .iter()
                .enumerate()
                .map(|(k, &bytes)| pool.get(Slot::Input(k), bytes, U::STORAGE | U::COPY_DST))
                .collect();
            // Each buffer's tensors in one write (placed in order, buffer by buffer).
            let mut placed_tensors = placed.iter().zip(tensors).peekable();
            for (k, buffer) in buffers.iter().enumerate() {
                let mut mine = Vec::new();
                while let Some((&(_, at), t)) = placed_tensors.next_if(|((b, _), _)| *b == k) {
                    mine.push((at, bytemuck::cast_slice(t)));
                }
                upload(queue, buffer, buffer_bytes[k], &mine);
            }
            let outputs: Vec<(wgpu::Buffer, usize)> = widths
                .iter()
                .enumerate()
                .map(|(p, &cols)| {
                    let usage = U::STORAGE | U::COPY_SRC | U::COPY_DST;
                    (pool.get(Slot::Output(p), cols as u64 * 4, usage), cols)
                })
                .collect();
            (buffers, outputs)
        });
        // A buffer that failed (out of memory) must not be reused by later calls.
        let (buffers, outputs) = created.inspect_err(|_| self.pool.clear())?;
        let in_views: Vec<GpuTensor<'_>> = placed
            .iter()
            .zip(widths)
            .map(|(&(k, at), &cols)| GpuTensor::new(&buffers[k], at, cols).with_dtype(T::DTYPE))
            .collect();
        let out_views: Vec<GpuTensorMut<'_>> = outputs
            .iter()
            .map(|(buffer, cols)| GpuTensorMut {
                buffer,
                offset: 0,
                cols: *cols,
            })
            .collect();
        let (stats, grads) = self.run(config, offsets, group_of, &in_views, &out_views, true)?;
        Ok(ClipOutput { grads, stats })
    }

    /// Caller buffers in and out; only the statistics are read back.
    pub fn clip_buffers(
        &mut self,
        config: &ClipConfig,
        offsets: &[usize],
        group_of: &[usize],
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
    ) -> Result<ClipStats> {
        self.run(config, offsets, group_of, inputs, outputs, false)
            .map(|(stats, _)| stats)
    }

    /// With small workgroups (the default on a software adapter, where the norm
    /// pass's lanes then own adjacent quads), the size of a binding of
    /// `tensor`'s buffer from `offset` of at least `size` bytes that holds whole
    /// quads of its elements
    /// (4 x 4 bytes for f32, 4 x 2 for 16-bit types), if the buffer and one
    /// binding have room for it. Rows that are not 16-byte aligned are then read
    /// as aligned quads shifted into place (`vec4_path` 2 in mb_partials.wgsl and
    /// weighted_means.wgsl, grads_shifted.wgsl): the binding covers up to one
    /// quad of the buffer past the rows, read (never written), its values never
    /// used. llvmpipe pays per load instruction, and its lanes then share the
    /// aligned loads (on lavapipe the bench's 100 tensors, 65% of their columns
    /// unaligned, went from 1.54-1.56x to 1.39-1.49x one tensor's time at b = 4);
    /// without small workgroups (the hardware default), scalar loads (not
    /// measured on hardware).
    fn quads_binding(&self, tensor: &GpuTensor<'_>, offset: u64, size: u64) -> Option<u64> {
        if !self.kernels.small_workgroups() {
            return None;
        }
        let elem_bytes = tensor.dtype.size_bytes();
        plan::whole_quads_binding(
            offset,
            size,
            elem_bytes,
            tensor.buffer.size(),
            self.max_binding,
        )
    }

    fn run(
        &mut self,
        config: &ClipConfig,
        offsets: &[usize],
        group_of: &[usize],
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
        read_outputs: bool,
    ) -> Result<(ClipStats, Vec<Vec<f32>>)> {
        let n = *offsets.last().expect("validated offsets") as u64;
        self.check_buffers(n, inputs, outputs)?;
        let offsets_u32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        // (A read-back without outputs, at most 12 bytes per micro-batch and group
        // plus 48, stays within 48 bytes of the norm partials `plan` checks against
        // a binding, 16 bytes per micro-batch and tile; the host path checks the
        // read-back of its outputs before the upload.)
        let layout = self.plan(&offsets_u32, inputs, outputs, group_of)?;

        // In error scopes: building a 16-bit type's pipelines on first use, the
        // scratch buffers and the passes report a failure as ClipError::Device,
        // not through wgpu's panicking handler.
        let device = self.device.clone();
        let readback = scoped(&device, || {
            let needs = Needs {
                chunks: layout.row_chunks,
                runs: layout.per_row_weights,
                ..Needs::default()
            };
            // The f32 readers too: the passes over stored means and over row
            // chunks' partial rows read f32 whatever the input type (built at
            // construction, and again after a failed call forgot them).
            self.kernels.prepare(&device, Dtype::F32, Needs::default());
            for t in inputs {
                self.kernels.prepare(&device, t.dtype, needs);
                // The octs readers for pass 4 over its rows (Pass4::push takes
                // them only for rows of such a tensor).
                if self.oct_tensor(t) {
                    let octs = Needs {
                        octs: true,
                        ..needs
                    };
                    self.kernels.prepare(&device, t.dtype, octs);
                }
            }
            for ((d, &partials), &octs) in layout
                .pass1
                .iter()
                .zip(&layout.pass1_variants)
                .zip(&layout.pass1_octs)
            {
                let dtype = inputs[d.entries[0].tensor].dtype;
                let slots = d.bindings.len() > 1;
                let needs = Needs {
                    slots,
                    partials: Some(partials),
                    octs,
                    ..needs
                };
                self.kernels.prepare(&device, dtype, needs);
            }
            self.encode_and_submit(config, &offsets_u32, &layout, inputs, outputs, read_outputs)
        })
        .inspect_err(|_| {
            // A pooled buffer or a pipeline that failed (out of memory, a lost
            // device) must not serve later calls: both are made again.
            self.pool.clear();
            self.kernels.forget_readers();
        })?;
        let bytes = self.read_back(&readback?)?;
        // The read-back ends with the pass's timestamps when timed.
        let pass_time = self
            .timer
            .as_ref()
            .and_then(|t| t.elapsed(&bytes[bytes.len() - TIMER_BYTES as usize..]));

        let m = layout.micro_batches as usize;
        let g = layout.groups as usize;
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        // Copied (the bytes of a Vec<u8> need not be aligned for f32).
        let floats: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        let at = STATS_BYTES as usize / 4;
        let group_bounds = &floats[at + 2 * m * g..at + 2 * m * g + g];
        // S beyond f32 (reported as inf) is formed again in f64 from the group
        // bounds, so that a noise std sigma * S that fits f32 is reported as
        // such, as on the CPU (an f32 S that fits gives the same bits either
        // way: the f64 product of two f32 is exact).
        let total_bound = match floats[0] {
            s if s.is_finite() => s as f64,
            _ => total_bound(group_bounds.iter().map(|&c| c as f64)),
        };
        let stats = ClipStats {
            groups: g,
            clip_bound: floats[0],
            clipped_count: word(1) as usize,
            nonfinite_count: word(2) as usize,
            noise_std: config.noise_std(total_bound) as f32,
            norms: floats[at..at + m * g].to_vec(),
            factors: floats[at + m * g..at + 2 * m * g].to_vec(),
            group_bounds: group_bounds.to_vec(),
            backend: BackendKind::Gpu(self.adapter_name.clone()),
        };
        if config.non_finite == NonFinitePolicy::Error && stats.nonfinite_count > 0 {
            return Err(ClipError::NonFinite {
                micro_batch: word(3) as usize,
                count: stats.nonfinite_count,
            });
        }
        let mut grads = Vec::new();
        if read_outputs {
            let mut at = at + 2 * m * g + g;
            for t in inputs {
                grads.push(floats[at..at + t.cols].to_vec());
                at += t.cols;
            }
        }
        // Only a call that succeeds has a time (not one failing NonFinitePolicy::Error).
        self.last_pass_time = pass_time;
        Ok((stats, grads))
    }

    /// Waits for the queue and reads `buffer`'s first `len` bytes. On an error the
    /// pool is cleared, so that a buffer left mapped or pending is not reused.
    fn read_back(&mut self, readback: &(wgpu::Buffer, u64)) -> Result<Vec<u8>> {
        let bytes = self.map_and_read(readback);
        if bytes.is_err() {
            self.pool.clear();
        }
        bytes
    }

    fn map_and_read(&self, (buffer, len): &(wgpu::Buffer, u64)) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        buffer.map_async(wgpu::MapMode::Read, ..*len, move |r| {
            let _ = tx.send(r);
        });
        // wgpu returns only a timeout as an error here; a lost device or running out
        // of memory while waiting reaches its fatal handler, which panics: caught,
        // that is a ClipError::Device too.
        let device = &self.device;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            device.poll(wgpu::PollType::wait_indefinitely())
        }))
        .map_err(|panic| {
            ClipError::Device(panic_message("waiting for the device failed", &*panic))
        })?
        .map_err(|e| ClipError::Device(e.to_string()))?;
        rx.recv()
            .map_err(|e| ClipError::Device(e.to_string()))?
            .map_err(|e| ClipError::Device(e.to_string()))?;
        let bytes = buffer
            .get_mapped_range(..*len)
            .map_err(|e| ClipError::Device(e.to_string()))?
            .to_vec();
        buffer.unmap();
        Ok(bytes)
    }
}

/// Storage buffers the kernels bind in one shader stage (mb_partials' and
/// clip_factors' 7; the slots variants need more, see `slots_supported`).
const KERNEL_STORAGE_BUFFERS: u32 = 7;

/// The largest storage binding the kernels use, whatever the device allows: a
/// window and its alignment slack (under 256 bytes) stay below 4 GiB, since
/// WGSL indexes in u32 and Metal passes each binding's size to the shader as a
/// u32 (clamped, so a larger binding would silently read its tail wrong). The
/// limit in use is also a multiple of 16, the pool's granularity, so a scratch
/// buffer checked against it still fits once rounded up (and bound whole).
const MAX_BINDING_BYTES: u64 = (1 << 32) - 256;

/// Parameter groups G of a call whose tensors are in groups `group_of`.
fn group_count(group_of: &[usize]) -> usize {
    group_of.iter().max().map_or(1, |g| g + 1)
}

/// `what` and the text of a caught panic's payload.
fn panic_message(what: &str, panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    format!("{what}: {text}")
}

/// Runs `f` (buffer or pipeline creation, uploads, a call's passes) in
/// out-of-memory, internal and validation error scopes: a failure is a
/// [`ClipError::Device`] rather than a panic in wgpu's default error handler.
/// A panic while `f` runs (inside wgpu: wgpu-core 30 panics binding a buffer of
/// another `wgpu::Instance`; or in microclip's own encoding) is caught and is a
/// `ClipError::Device` too, after the scopes are popped; the caller then clears
/// the pool and the readers. The default panic hook still prints it, and
/// nothing is caught under `panic = "abort"`.
fn scoped<R>(device: &wgpu::Device, f: impl FnOnce() -> R) -> Result<R> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let validation = pollster::block_on(validation.pop());
    let internal = pollster::block_on(internal.pop());
    let oom = pollster::block_on(oom.pop());
    match (validation.or(internal).or(oom), result) {
        (Some(e), _) => Err(ClipError::Device(e.to_string())),
        (None, Err(panic)) => Err(ClipError::Device(panic_message(
            "a panic during the call's GPU work",
            &*panic,
        ))),
        (None, Ok(result)) => Ok(result),
    }
}

/// Writes `tensors` (byte offset, bytes), placed in order from offset 0 in the
/// first `len` bytes of `buffer` (a multiple of 4), through one staging view:
/// one staging allocation per buffer, not per tensor (wgpu searches a free list
/// of them on each: with a `write_buffer` per tensor, 20,000 tensors of a few
/// floats took 7 s a call on lavapipe, growing with the square of the count).
/// The gaps between tensors and after the last (the last word of an odd number
/// of 16-bit elements included) are written as zeros.
fn upload(queue: &wgpu::Queue, buffer: &wgpu::Buffer, len: u64, tensors: &[(u64, &[u8])]) {
    let Some(size) = wgpu::BufferSize::new(len) else {
        return;
    };
    // None: a validation error, which the caller's error scope reports.
    let Some(mut view) = queue.write_buffer_with(buffer, 0, size) else {
        return;
    };
    let mut written = 0;
    for &(at, bytes) in tensors {
        let at = at as usize;
        view.slice(written..at).fill(0);
        view.slice(at..at + bytes.len()).copy_from_slice(bytes);
        written = at + bytes.len();
    }
    view.slice(written..).fill(0);
}
