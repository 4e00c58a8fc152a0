//! GPU execution: validation of caller buffers, buffer pooling, encoding of the
//! four passes, submission and the read-back of the statistics.
//!
//! Passes (one compute pass, wgpu inserts the barriers between dispatches):
//! 1. `mb_partials`: per (micro-batch, column tile) partial squared norm of the
//!    micro-batch mean, for every tensor and row window (and, when
//!    `materialize_means` says so, the means themselves); tensors share
//!    dispatches through a table (`plan::pass1_dispatches`), those in separate
//!    buffers through up to 8 binding slots (grads_slots.wgsl);
//! 2. `mb_norms`: per (micro-batch, parameter group) norm over the group's tiles
//!    (tiles are numbered group by group);
//! 3. `clip_factors`: bounds (fixed or adaptive), factors, weights, counts, the
//!    total sensitivity and the noise scale;
//! 4. `weighted_means`: `out_p = sum_j (s_{j,g} / M) * mean_j` over the stored means
//!    (per tensor, or once for all tensors into a scratch row), or as the sum over
//!    the input rows, per tensor and window (or in the norm pass's dispatches into
//!    the scratch row), of each row times its micro-batch's weight over the
//!    micro-batch's size (those row weights from `row_weights`, dispatched after
//!    `clip_factors` unless b = 1), those rows in chunks of `pass4_chunk_rows`
//!    into partial rows, then summed, where that is set (`chunk_rows_table`);
//! 5. `add_noise` (only with noise): `out_p += noise_scale * z`, per tensor.

pub(crate) mod kernels;
mod plan;
mod pool;
mod timer;

use crate::clipper::{BackendKind, ClipOutput, ClipStats};
use crate::config::{ClipBound, ClipConfig, ClipFunction, GaussianNoise, NonFinitePolicy};
use crate::dtype::{Dtype, GradElement};
use crate::error::{ClipError, Result};
use kernels::{
    slot_binding, slots_supported, FactorsParams, Kernels, MeansSumParams, Needs, NoiseParams,
    NormsParams, PartialsParams, PartialsVariant, RowWeightsParams, MB_NORM_BYTES, NOISE_MODE_ADD,
    NOISE_MODE_NORMALS, NOISE_MODE_RAW_WORDS, PARTIAL_BYTES, SLOTS, STATS_BYTES,
};
use plan::{
    aligned_binding, chunk_rows_table, cuts, dispatch_2d, materialize_means, means_cols, pack,
    pass1_dispatches, plan_windows, tile_cols, tiles, vec4_aligned, Pass1Dispatch, Pass1Tensor,
    RowChunks, Window, MEANS_SUM_COLS, TABLE_LEN, WORKGROUP,
};
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
    /// Times each call's compute pass when set (`set_timing`).
    timer: Option<PassTimer>,
    /// Device time of the last call's compute pass, when timed.
    last_pass_time: Option<std::time::Duration>,
    /// Compute dispatches the last call recorded.
    last_dispatches: usize,
}

/// Byte layout of one call's scratch data, shared by encoding and read-back.
struct CallLayout {
    micro_batches: u64,
    groups: u64,
    tiles_total: u64,
    /// Columns per norm-pass workgroup.
    tile_cols: u64,
    /// First tile of each group, then `tiles_total`.
    group_tiles: Vec<u32>,
    /// (tile base, windows, group) per tensor.
    tensors: Vec<(u64, Vec<Window>, u32)>,
    carry_cols: u64,
    /// Columns of the stored means matrix, `sum ceil4(D_p)`.
    total_means_cols: u64,
    /// Pass 1 stores the `[M, total_means_cols]` micro-batch means (else pass 4
    /// re-reads the input rows).
    with_means: bool,
    /// Pass 4 re-reads the input rows and may cut them into row chunks (at least
    /// two chunks of `pass4_chunk_rows` rows): its variant for them is built.
    row_chunks: bool,
    /// Pass 4 re-reads rows of micro-batches of several rows, with `[N, G]` per-row
    /// weights.
    per_row_weights: bool,
    /// The norm pass's dispatches (tensors of one buffer share them, and with
    /// buffer slots tensors of up to 8 buffers).
    pass1: Vec<Pass1Dispatch>,
    /// Per dispatch of `pass1`: the norm pass's build it runs (whether all its
    /// entries' rows are read as whole quads, whether none carries sums between
    /// windows, whether the call stores the means, whether some micro-batch of
    /// more than `kernels::CHUNK_ROWS` rows does).
    pass1_variants: Vec<PartialsVariant>,
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
            let (device, queue) = adapter
                .request_device(&wgpu::DeviceDescriptor {
                    label: Some("microclip"),
                    // Timestamps where the adapter has them (`set_timing`).
                    required_features: adapter.features() & wgpu::Features::TIMESTAMP_QUERY,
                    required_limits: adapter.limits(),
                    ..Default::default()
                })
                .await
                .map_err(|e| ClipError::NoAdapter(e.to_string()))?;
            return Ok(Self::from_device(device, queue));
        }
        Err(ClipError::NoAdapter(last_error))
    }

    /// Builds the pipelines on an existing device.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = device.adapter_info();
        let limits = device.limits();
        let device_max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Self {
            adapter_name: format!("{} ({:?})", info.name, info.backend),
            kernels: Kernels::new(&device, default_small_workgroups(info.device_type)),
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
            timer: None,
            last_pass_time: None,
            last_dispatches: 0,
            device,
            queue,
        }
    }

    /// Times every later call's compute pass (`on`) or stops; returns whether
    /// calls are timed (false without `TIMESTAMP_QUERY` on the device).
    pub fn set_timing(&mut self, on: bool) -> bool {
        self.timer = if on {
            self.timer
                .take()
                .or_else(|| PassTimer::new(&self.device, &self.queue))
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

    /// Clears the last call's device time (a new call begins).
    pub fn forget_pass_time(&mut self) {
        self.last_pass_time = None;
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

    pub fn set_max_binding_bytes(&mut self, bytes: u64) {
        self.max_binding = bytes.clamp(self.storage_align + 4, self.device_max_binding) / 4 * 4;
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

    pub fn set_small_workgroups(&mut self, small: Option<bool>) {
        let small = small
            .unwrap_or_else(|| default_small_workgroups(self.device.adapter_info().device_type));
        self.kernels.set_small_workgroups(&self.device, small);
    }

    pub fn small_workgroups(&self) -> bool {
        self.kernels.small_workgroups()
    }

    pub fn set_f16_unpack(&mut self, unpack: Option<bool>) {
        self.kernels.set_f16_unpack(&self.device, unpack);
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

    pub fn tile_cols(&self, widths: &[usize], micro_batches: usize) -> u64 {
        tile_cols(
            widths.iter().map(|&d| d as u64),
            micro_batches as u64,
            self.min_tile_workgroups,
        )
    }

    /// A new output buffer for `cols` f32.
    pub fn output_buffer(&self, cols: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("microclip output"),
            size: (cols as u64 * 4).max(4),
            usage: U::STORAGE | U::COPY_SRC | U::COPY_DST,
            mapped_at_creation: false,
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
        // Buffers up to one binding (sharing needs no more) unless a tensor is larger.
        let limit = self.max_binding.min(max_buffer) / 16 * 16;
        let (placed, buffer_bytes) = pack(&sizes, self.storage_align, limit);
        let buffers: Vec<wgpu::Buffer> = buffer_bytes
            .iter()
            .enumerate()
            .map(|(k, &bytes)| {
                self.pool
                    .get(Slot::Input(k), bytes, U::STORAGE | U::COPY_DST)
            })
            .collect();
        let mut outputs = Vec::with_capacity(tensors.len());
        for (p, (t, &(k, at))) in tensors.iter().zip(&placed).enumerate() {
            upload(&self.queue, &buffers[k], at, bytemuck::cast_slice(t));
            let output = self.pool.get(
                Slot::Output(p),
                widths[p] as u64 * 4,
                U::STORAGE | U::COPY_SRC | U::COPY_DST,
            );
            outputs.push((output, widths[p]));
        }
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

    fn check_buffers(
        &self,
        n: u64,
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
    ) -> Result<()> {
        if inputs.is_empty() {
            return Err(ClipError::NoTensors);
        }
        let range_error = |tensor: usize, reason: String| ClipError::BufferRange { tensor, reason };
        for (p, (t, o)) in inputs.iter().zip(outputs).enumerate() {
            if t.cols == 0 {
                return Err(range_error(p, "cols must be >= 1".into()));
            }
            let cols = t.cols as u64;
            for (what, buffer, offset, len) in [
                ("input", t.buffer, t.offset, t.bound_bytes(n)),
                ("output", o.buffer, o.offset, cols * 4),
            ] {
                if offset % 4 != 0 {
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
            }
            if o.cols != t.cols {
                return Err(range_error(
                    p,
                    format!("output has {} cols, input {}", o.cols, t.cols),
                ));
            }
            if inputs.iter().any(|i| i.buffer == o.buffer) {
                return Err(range_error(
                    p,
                    "output buffer is also an input buffer".into(),
                ));
            }
        }
        Ok(())
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
        let quads = size.next_multiple_of(4 * tensor.dtype.size_bytes());
        (self.kernels.small_workgroups()
            && offset + quads <= tensor.buffer.size()
            && quads <= self.max_binding)
            .then_some(quads)
    }

    /// Tiles, row windows and scratch of one call; every buffer bound whole (not
    /// per window) is checked against one storage binding here, so a shape too
    /// large is a [`ClipError::TooLarge`], not a validation error at dispatch.
    fn plan(
        &self,
        offsets: &[u32],
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
        group_of: &[usize],
    ) -> Result<CallLayout> {
        let groups = group_of.iter().max().map_or(1, |g| g + 1);
        // Tiles are numbered group by group, so each group's tiles are contiguous.
        let mut tile_bases = vec![0u64; inputs.len()];
        let mut group_tiles = Vec::with_capacity(groups + 1);
        let micro_batches = offsets.len() as u64 - 1;
        let tile_cols = tile_cols(
            inputs.iter().map(|t| t.cols as u64),
            micro_batches,
            self.min_tile_workgroups,
        );
        let mut tiles_total = 0u64;
        for g in 0..groups {
            group_tiles.push(tiles_total as u32);
            for (p, t) in inputs.iter().enumerate() {
                if group_of[p] == g {
                    tile_bases[p] = tiles_total;
                    tiles_total += tiles(t.cols as u64, tile_cols);
                }
            }
        }
        group_tiles.push(tiles_total as u32);
        let mut carry_cols = 0u64;
        let mut tensors = Vec::with_capacity(inputs.len());
        for (p, t) in inputs.iter().enumerate() {
            let cols = t.cols as u64;
            let windows = plan_windows(
                offsets,
                cols,
                t.dtype.size_bytes(),
                t.offset,
                self.max_binding,
                self.storage_align,
            )?;
            // Only a micro-batch that goes on in a later window is carried.
            if windows.iter().any(|w| w.carry_out) {
                carry_cols = carry_cols.max(cols);
            }
            tensors.push((tile_bases[p], windows, group_of[p] as u32));
        }
        // Tensors in the same buffer (key: the first such tensor's index).
        // (wgpu::Buffer hashes and compares by its handle's address, which its
        // interior mutability never changes.)
        #[allow(clippy::mutable_key_type)]
        let mut first_of = std::collections::HashMap::new();
        let keyed: Vec<Pass1Tensor<'_>> = inputs
            .iter()
            .zip(&tensors)
            .enumerate()
            .map(|(p, (t, (_, windows, _)))| Pass1Tensor {
                buffer: *first_of.entry(t.buffer).or_insert(p),
                dtype: t.dtype.index(),
                elem_bytes: t.dtype.size_bytes(),
                windows,
            })
            .collect();
        let pass1 = pass1_dispatches(&keyed, self.max_binding, self.buffer_slots);
        let too_large = |what: String, bytes: u64| {
            if bytes > self.max_binding {
                Err(ClipError::TooLarge(format!(
                    "{what} need {bytes} bytes, over one storage binding ({} bytes)",
                    self.max_binding
                )))
            } else {
                Ok(())
            }
        };
        // The per-micro-batch norm records (M x G x 16 bytes) are never larger
        // than the partials (every group has a tile), so this bounds them too.
        too_large(
            format!("{micro_batches} micro-batches x {tiles_total} column tiles of norm partials"),
            micro_batches * tiles_total * PARTIAL_BYTES,
        )?;
        for (p, o) in outputs.iter().enumerate() {
            // One f32 row: larger than a 16-bit input row. It also bounds the two
            // carry rows (D_p x 4 bytes each) of a tensor split over row windows.
            let (_, bind_size, _) =
                aligned_binding(o.offset, o.cols as u64 * 4, self.storage_align, 4);
            too_large(format!("tensor {p}: the f32 output row"), bind_size)?;
        }
        // The stored means only when they fit one binding (else rows are re-read).
        let total_means_cols: u64 = inputs.iter().map(|t| means_cols(t.cols as u64)).sum();
        let n = *offsets.last().expect("offsets hold [0, N]") as u64;
        let with_means = materialize_means(
            n,
            micro_batches,
            total_means_cols,
            self.max_binding,
            self.means_min_rows,
        );
        // Means are stored and some micro-batch has more than CHUNK_ROWS rows.
        let deep_means = with_means
            && offsets
                .windows(2)
                .any(|w| (w[1] - w[0]) as u64 > kernels::CHUNK_ROWS);
        // N is the last of the u32 row offsets.
        let row_chunks = !with_means && cuts(n as u32, self.pass4_chunk_rows);
        let per_row_weights = !with_means && micro_batches != n;
        if per_row_weights {
            too_large(
                format!("{n} rows x {groups} groups of per-row weights"),
                n * groups as u64 * 4,
            )?;
        }
        let pass1_variants = pass1
            .iter()
            .map(|d| PartialsVariant {
                deep: deep_means,
                aligned: d
                    .entries
                    .iter()
                    .all(|e| vec4_aligned(inputs[e.tensor].cols as u64, e.elem_offset)),
                no_carry: d.entries.iter().all(|e| {
                    let w = &tensors[e.tensor].1[e.window];
                    !w.carry_in && !w.carry_out
                }),
                stores_means: Some(with_means),
            })
            .collect();
        Ok(CallLayout {
            micro_batches,
            groups: groups as u64,
            tiles_total,
            tile_cols,
            group_tiles,
            tensors,
            carry_cols,
            total_means_cols,
            with_means,
            row_chunks,
            per_row_weights,
            pass1,
            pass1_variants,
        })
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
        if n >= u32::MAX as u64 {
            return Err(ClipError::TooLarge(format!("{n} rows exceed u32 indexing")));
        }
        self.check_buffers(n, inputs, outputs)?;
        let offsets_u32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        let layout = self.plan(&offsets_u32, inputs, outputs, group_of)?;

        let oom_scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        // Inside the scopes: building a 16-bit type's pipelines on first use reports
        // a failure as ClipError::Device, not through wgpu's panicking handler.
        let needs = Needs {
            chunks: layout.row_chunks,
            ..Needs::default()
        };
        for t in inputs {
            self.kernels.prepare(&self.device, t.dtype, needs);
        }
        for (d, &partials) in layout.pass1.iter().zip(&layout.pass1_variants) {
            let dtype = inputs[d.entries[0].tensor].dtype;
            let slots = d.bindings.len() > 1;
            let needs = Needs {
                slots,
                partials: Some(partials),
                ..needs
            };
            self.kernels.prepare(&self.device, dtype, needs);
        }
        let readback =
            self.encode_and_submit(config, &offsets_u32, &layout, inputs, outputs, read_outputs);
        let validation = pollster::block_on(validation_scope.pop());
        let oom = pollster::block_on(oom_scope.pop());
        if let Some(e) = validation.or(oom) {
            return Err(ClipError::Device(e.to_string()));
        }
        let bytes = self.read_back(&readback?)?;
        // The read-back ends with the pass's timestamps when timed.
        let pass_time = self
            .timer
            .as_ref()
            .and_then(|t| t.elapsed(&bytes[bytes.len() - TIMER_BYTES as usize..]));

        let m = layout.micro_batches as usize;
        let g = layout.groups as usize;
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        let floats: &[f32] = bytemuck::cast_slice(&bytes);
        let at = STATS_BYTES as usize / 4;
        let stats = ClipStats {
            groups: g,
            clip_bound: floats[0],
            clipped_count: word(1) as usize,
            nonfinite_count: word(2) as usize,
            // sigma * S, where sigma = 0 means no noise even if S overflowed f32.
            noise_std: config
                .noise
                .filter(|n| n.multiplier != 0.0)
                .map_or(0.0, |n| n.multiplier * floats[0]),
            norms: floats[at..at + m * g].to_vec(),
            factors: floats[at + m * g..at + 2 * m * g].to_vec(),
            group_bounds: floats[at + 2 * m * g..at + 2 * m * g + g].to_vec(),
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

    /// Records the four passes and the copies into the read-back buffer, submits,
    /// and returns the read-back buffer and its used length.
    fn encode_and_submit(
        &mut self,
        config: &ClipConfig,
        offsets: &[u32],
        layout: &CallLayout,
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
        read_outputs: bool,
    ) -> Result<(wgpu::Buffer, u64)> {
        let m = layout.micro_batches;
        let g = layout.groups;
        let storage = U::STORAGE | U::COPY_DST | U::COPY_SRC;
        let row_offsets = self
            .pool
            .get(Slot::RowOffsets, offsets.len() as u64 * 4, storage);
        self.queue
            .write_buffer(&row_offsets, 0, bytemuck::cast_slice(offsets));
        let partials = self.pool.get(
            Slot::Partials,
            m * layout.tiles_total * PARTIAL_BYTES,
            storage,
        );
        let mb_norms = self.pool.get(Slot::MbNorms, m * g * MB_NORM_BYTES, storage);
        let factors = self.pool.get(Slot::Factors, m * g * 4, storage);
        let weights = self.pool.get(Slot::Weights, m * g * 4, storage);
        let norms = self.pool.get(Slot::Norms, m * g * 4, storage);
        let stats = self.pool.get(Slot::Stats, STATS_BYTES, storage);
        let mb_flags = self.pool.get(Slot::MbFlags, m * 4, storage);
        let group_tiles = self.pool.get(Slot::GroupTiles, (g + 1) * 4, storage);
        self.queue
            .write_buffer(&group_tiles, 0, bytemuck::cast_slice(&layout.group_tiles));
        let bounds = self.pool.get(Slot::Bounds, g * 4, storage);
        let fixed_bounds: Vec<f32> = match &config.bound {
            ClipBound::Fixed(c) => vec![*c; g as usize],
            ClipBound::PerGroup(c) => c.clone(),
            ClipBound::Adaptive { .. } => vec![0.0; g as usize],
        };
        self.queue
            .write_buffer(&bounds, 0, bytemuck::cast_slice(&fixed_bounds));
        // Two buffers of one row each, read and written alternately by the windows.
        let carry = [0, 1].map(|k| {
            self.pool
                .get(Slot::Carry(k), layout.carry_cols * 4, storage)
        });
        // The stored means: one [M, sum ceil4(D_p)] matrix, tensor p's columns from
        // column sum_{q < p} ceil4(D_q) on (whole quads, so that pass 4 reads them
        // four at a time whatever the widths).
        let total_means_cols = layout.total_means_cols;
        let with_means = layout.with_means;
        let n = *offsets.last().expect("offsets hold [0, N]") as u64;
        let means_bytes = if with_means {
            m * total_means_cols * 4
        } else {
            0
        };
        let means = self.pool.get(Slot::Means, means_bytes, storage);
        // Without stored means pass 4 re-reads the input rows, each with its
        // micro-batch's weight over the micro-batch's size: [N, G] floats (at b = 1
        // those are the micro-batch weights themselves).
        let per_row_weights = layout.per_row_weights;
        let row_weights = self.pool.get(
            Slot::RowWeights,
            if per_row_weights { n * g * 4 } else { 0 },
            storage,
        );
        // Pass 4 of several tensors into one scratch row (tensor p's columns from
        // means_bases[p]), then a copy per tensor into its output (or straight into
        // the read-back buffer on the host path): with several tensors, no noise
        // (added per tensor in the output), outputs that accept copies, and tensors
        // narrow enough on average that the dispatches saved outweigh the bytes
        // copied (`merge_max_avg_cols`). Over stored means: ONE dispatch over the
        // means matrix (with one parameter group: one weight per micro-batch).
        // Over the input rows: the norm pass's dispatches and their bindings
        // (slots). Extra memory: the row, sum ceil4(D_p) x 4 bytes.
        let copies_pay = inputs.len() > 1
            && config.noise.is_none()
            && total_means_cols / inputs.len() as u64 <= self.merge_max_avg_cols
            && (read_outputs
                || outputs
                    .iter()
                    .all(|o| o.buffer.usage().contains(U::COPY_DST)));
        let merge_pass4 = with_means && g == 1 && copies_pay;
        let merge_rows = !with_means && copies_pay;
        let merged = merge_pass4 || merge_rows;
        let merged_out = self.pool.get(
            Slot::MergedOutput,
            if merged { total_means_cols * 4 } else { 0 },
            storage,
        );
        let mut means_dispatches = Vec::new();
        // Pass-4 dispatches over input rows (table, bindings by slot, output range,
        // element type), encoded after the tensors' loop, cut into row chunks
        // where `pass4_chunk_rows` says so.
        let mut rows_jobs: Vec<RowsJob<'_>> = Vec::new();
        let row_weights_kind = if per_row_weights {
            Pass4Weights::Row
        } else {
            Pass4Weights::MicroBatch
        };
        // 1: a zero weight skips its row in pass 4 (so 0 * NaN never happens).
        let skip_zero = (config.non_finite != NonFinitePolicy::Propagate) as u32;

        // All uniform blocks of the call in one buffer, one block per aligned slot.
        let mut params = ParamBlocks::new(self.uniform_align);
        // Column of each tensor's means in the means matrix.
        let means_bases: Vec<u64> = inputs
            .iter()
            .scan(0, |at, t| {
                let base = *at;
                *at += means_cols(t.cols as u64);
                Some(base)
            })
            .collect();
        // Pass 4 over the input rows of tensor p's window k (first row at element
        // elem_offset of its binding), each row weighted, into column out_offset.
        // `whole_quads`: the binding holds whole quads (see `quads_binding`).
        let rows_block = |p: usize, k: usize, elem_offset: u32, out_offset: u32, whole_quads| {
            let (_, windows, group) = &layout.tensors[p];
            let w = &windows[k];
            let cols = inputs[p].cols as u64;
            MeansSumParams {
                cols: cols as u32,
                means_base: elem_offset,
                rows: w.row_end - w.row_start,
                out_offset,
                skip_zero,
                vec4_path: load_path(cols, elem_offset, whole_quads),
                groups: g as u32,
                group: *group,
                stride: cols as u32,
                weights_base: w.row_start,
                accumulate: (k > 0) as u32,
                ..Default::default()
            }
        };
        // Each norm-pass dispatch's bindings (buffer, offset, size) by slot, each
        // rounded up to whole quads if it can be, and whether it was (pass 4
        // over the rows reuses the dispatches and their bindings).
        type Bindings<'b> = Vec<(&'b wgpu::Buffer, u64, u64)>;
        let pass1_bindings: Vec<(Bindings<'_>, Vec<bool>)> = layout
            .pass1
            .iter()
            .map(|d| {
                d.bindings
                    .iter()
                    .map(|b| {
                        let t = &inputs[b.tensor];
                        let quads = self.quads_binding(t, b.offset, b.size);
                        (
                            (t.buffer, b.offset, quads.unwrap_or(b.size)),
                            quads.is_some(),
                        )
                    })
                    .unzip()
            })
            .collect();
        // Pass 1: a table of up to TABLE_LEN tensor windows per dispatch.
        let mut partial_dispatches = Vec::with_capacity(layout.pass1.len());
        for ((d, (bindings, whole_quads)), &variant) in layout
            .pass1
            .iter()
            .zip(&pass1_bindings)
            .zip(&layout.pass1_variants)
        {
            let mut table = Vec::with_capacity(d.entries.len());
            let mut dispatch_tiles = 0u64;
            for e in &d.entries {
                let (p, k, elem_offset) = (e.tensor, e.window, e.elem_offset);
                let whole_quads = whole_quads[e.slot];
                let (tile_base, windows, _) = &layout.tensors[p];
                let w = &windows[k];
                let cols = inputs[p].cols as u64;
                let n_tiles = tiles(cols, layout.tile_cols);
                table.push(PartialsParams {
                    cols: cols as u32,
                    elem_offset,
                    row_start: w.row_start,
                    row_end: w.row_end,
                    mb_first: w.mb_first,
                    tiles: n_tiles as u32,
                    tile_base: *tile_base as u32,
                    tiles_total: layout.tiles_total as u32,
                    carry_in: w.carry_in as u32,
                    carry_out: w.carry_out as u32,
                    last_local: w.mb_count - 1,
                    vec4_path: load_path(cols, elem_offset, whole_quads),
                    write_means: with_means as u32,
                    means_base: means_bases[p] as u32,
                    tile_cols: layout.tile_cols as u32,
                    means_stride: total_means_cols as u32,
                    first_tile: dispatch_tiles as u32,
                    slot: e.slot as u32,
                    ..Default::default()
                });
                dispatch_tiles += n_tiles;
            }
            let (tiles_x, tiles_y) = dispatch_2d(dispatch_tiles)?;
            table[0].tiles_x = tiles_x;
            table[0].entries = table.len() as u32;
            table[0].dispatch_tiles = dispatch_tiles as u32;
            let (p, window) = (d.entries[0].tensor, d.entries[0].window);
            partial_dispatches.push(Pass1 {
                params: params.push_table(&table, PARTIALS_TABLE_BYTES),
                variant,
                sources: slot_sources(bindings, &table, |e| (e.slot as usize, e.vec4_path)),
                window,
                groups: (tiles_x, tiles_y, layout.tensors[p].1[window].mb_count),
                dtype: inputs[p].dtype,
            });
        }
        let mut noise_dispatches = Vec::new();
        let mut first_element = 0u64;
        for (p, ((_, windows, group), (t, o))) in layout
            .tensors
            .iter()
            .zip(inputs.iter().zip(outputs))
            .enumerate()
        {
            let cols = t.cols as u64;
            let (groups_x, groups_y) = dispatch_2d(cols.div_ceil(WORKGROUP))?;
            let (out_bind, out_size, out_offset) =
                aligned_binding(o.offset, cols * 4, self.storage_align, 4);
            for (k, w) in windows.iter().enumerate() {
                if !with_means && !merge_rows {
                    // Pass 4 over this window's rows, weighted per row.
                    let quads_size = self.quads_binding(t, w.bind_offset, w.bind_size);
                    rows_jobs.push(RowsJob {
                        table: vec![rows_block(
                            p,
                            k,
                            w.elem_offset,
                            out_offset,
                            quads_size.is_some(),
                        )],
                        bindings: vec![(
                            t.buffer,
                            w.bind_offset,
                            quads_size.unwrap_or(w.bind_size),
                        )],
                        out: (o.buffer, out_bind, out_size),
                        dtype: t.dtype,
                    });
                }
            }
            if with_means && !merge_pass4 {
                // The stored means: f32, rows padded to whole quads.
                means_dispatches.push(Pass4::push(
                    &mut params,
                    vec![MeansSumParams {
                        cols: cols as u32,
                        means_base: means_bases[p] as u32,
                        rows: m as u32,
                        out_offset,
                        skip_zero,
                        vec4_path: 1,
                        groups: g as u32,
                        group: *group,
                        stride: total_means_cols as u32,
                        ..Default::default()
                    }],
                    vec![(&means, 0, means.size())],
                    Pass4Weights::MicroBatch,
                    (o.buffer, out_bind, out_size),
                    Dtype::F32,
                )?);
            }
            if let Some(noise) = config.noise {
                let n = params.push(&noise_params(
                    &noise,
                    first_element,
                    cols as u32,
                    out_offset,
                    groups_x,
                    NOISE_MODE_ADD,
                ));
                noise_dispatches.push((n, (o.buffer, out_bind, out_size), (groups_x, groups_y)));
            }
            first_element += cols;
        }
        if merge_rows {
            // The input rows, in the norm pass's dispatches (same bindings).
            for (d, (bindings, whole_quads)) in layout.pass1.iter().zip(&pass1_bindings) {
                let blocks = d
                    .entries
                    .iter()
                    .map(|e| {
                        let out_offset = means_bases[e.tensor] as u32;
                        let whole_quads = whole_quads[e.slot];
                        MeansSumParams {
                            slot: e.slot as u32,
                            ..rows_block(e.tensor, e.window, e.elem_offset, out_offset, whole_quads)
                        }
                    })
                    .collect();
                rows_jobs.push(RowsJob {
                    table: blocks,
                    bindings: bindings.clone(),
                    out: (&merged_out, 0, merged_out.size()),
                    dtype: inputs[d.entries[0].tensor].dtype,
                });
            }
        }
        // Pass 4 over input rows, each dispatch cut into row chunks when it
        // walks enough rows (`chunk_rows_table`): the chunks' sums go to partial
        // rows of a scratch matrix (shared by the dispatches, one after the
        // other), which a second dispatch sums into the outputs with weight 1.
        // Extra memory: the largest dispatch's partial rows, about
        // `rows / pass4_chunk_rows x ceil4(D_p) x 4` bytes, and the ones.
        let chunked: Vec<Option<RowChunks>> = rows_jobs
            .iter()
            .map(|j| chunk_rows_table(&j.table, self.pass4_chunk_rows, self.max_binding))
            .collect();
        let chunk_floats = chunked.iter().flatten().map(|c| c.scratch_floats).max();
        let max_chunks = chunked.iter().flatten().map(RowChunks::max_chunks).max();
        let chunk_partials =
            self.pool
                .get(Slot::ChunkPartials, chunk_floats.unwrap_or(0) * 4, storage);
        let ones = self
            .pool
            .get(Slot::Ones, max_chunks.unwrap_or(0) as u64 * 4, storage);
        if let Some(k) = max_chunks {
            self.queue
                .write_buffer(&ones, 0, bytemuck::cast_slice(&vec![1.0f32; k as usize]));
        }
        let partial_rows = (&chunk_partials, 0, chunk_floats.unwrap_or(0).max(4) * 4);
        for (job, chunks) in rows_jobs.into_iter().zip(chunked) {
            let Some(chunks) = chunks else {
                means_dispatches.push(Pass4::push(
                    &mut params,
                    job.table,
                    job.bindings,
                    row_weights_kind,
                    job.out,
                    job.dtype,
                )?);
                continue;
            };
            for table in chunks.chunks {
                let mut chunk = Pass4::push(
                    &mut params,
                    table,
                    job.bindings.clone(),
                    row_weights_kind,
                    job.out,
                    job.dtype,
                )?;
                chunk.partials = Some(partial_rows);
                means_dispatches.push(chunk);
            }
            means_dispatches.push(Pass4::push(
                &mut params,
                chunks.reduce,
                vec![partial_rows],
                Pass4Weights::Ones,
                job.out,
                Dtype::F32,
            )?);
        }
        if merge_pass4 {
            means_dispatches.push(Pass4::push(
                &mut params,
                vec![MeansSumParams {
                    cols: total_means_cols as u32,
                    rows: m as u32,
                    skip_zero,
                    vec4_path: 1,
                    groups: 1,
                    stride: total_means_cols as u32,
                    ..Default::default()
                }],
                vec![(&means, 0, means.size())],
                Pass4Weights::MicroBatch,
                (&merged_out, 0, merged_out.size()),
                Dtype::F32,
            )?);
        }
        let (norm_groups_x, norm_groups_y) = dispatch_2d(m * g)?;
        let norms_params = params.push(&NormsParams {
            micro_batches: m as u32,
            tiles_total: layout.tiles_total as u32,
            groups_x: norm_groups_x,
            groups: g as u32,
        });
        let (adaptive, scale) = match config.bound {
            ClipBound::Adaptive { scale } => (1, scale),
            _ => (0, 1.0),
        };
        let (rows_groups_x, rows_groups_y) = dispatch_2d(n.div_ceil(WORKGROUP))?;
        let row_weights_params = params.push(&RowWeightsParams {
            rows: n as u32,
            micro_batches: m as u32,
            groups: g as u32,
            groups_x: rows_groups_x,
        });
        let factor_params = params.push(&FactorsParams {
            micro_batches: m as u32,
            adaptive,
            policy: (config.non_finite == NonFinitePolicy::Propagate) as u32,
            groups: g as u32,
            scale,
            function: match config.function {
                ClipFunction::Hard => 0,
                ClipFunction::Automatic { .. } => 1,
                ClipFunction::Normalize => 2,
            },
            gamma: match config.function {
                ClipFunction::Automatic { gamma } => gamma,
                _ => 0.0,
            },
            sigma: config.noise.map_or(0.0, |n| n.multiplier),
        });
        let uniforms = self.pool.get(
            Slot::Params,
            params.bytes.len() as u64,
            U::UNIFORM | U::COPY_DST,
        );
        self.queue.write_buffer(&uniforms, 0, &params.bytes);

        let device = &self.device;
        let uniform = |at: u64, size: u64| {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &uniforms,
                offset: at,
                size: wgpu::BufferSize::new(size),
            })
        };
        let bind = |pipeline: &wgpu::ComputePipeline, resources: Vec<wgpu::BindingResource<'_>>| {
            bind_group(device, pipeline, resources, Vec::new())
        };
        let k = &self.kernels;
        // The input readers of a dispatch: the slots variants over several
        // buffer ranges.
        let readers = |sources: &[Source<'_>], dtype| k.readers(dtype, sources.len() > 1);
        // Any read-only buffer, for the bindings a dispatch does not read.
        let dummy = &row_offsets;
        let partial_groups: Vec<_> = partial_dispatches
            .iter()
            .map(|d| {
                let [grads, grads4] = d.sources[0].resources(dummy);
                let resources = vec![
                    uniform(d.params, PARTIALS_TABLE_BYTES),
                    grads,
                    whole(&row_offsets),
                    whole(&partials),
                    // window k reads what window k - 1 wrote
                    whole(&carry[(d.window + 1) % 2]),
                    grads4,
                    whole(&means),
                    whole(&carry[d.window % 2]),
                ];
                let slots = slot_resources(&d.sources, dummy);
                bind_group(
                    device,
                    readers(&d.sources, d.dtype).partials(d.variant),
                    resources,
                    slots,
                )
            })
            .collect();
        let norms_group = bind(
            &k.norms,
            vec![
                uniform(norms_params, std::mem::size_of::<NormsParams>() as u64),
                whole(&partials),
                whole(&group_tiles),
                whole(&mb_norms),
            ],
        );
        let factors_group = bind(
            &k.factors,
            vec![
                uniform(factor_params, std::mem::size_of::<FactorsParams>() as u64),
                whole(&mb_norms),
                whole(&factors),
                whole(&weights),
                whole(&norms),
                whole(&stats),
                whole(&bounds),
                whole(&mb_flags),
            ],
        );
        let row_weights_group = per_row_weights.then(|| {
            bind(
                &k.row_weights,
                vec![
                    uniform(
                        row_weights_params,
                        std::mem::size_of::<RowWeightsParams>() as u64,
                    ),
                    whole(&row_offsets),
                    whole(&weights),
                    whole(&row_weights),
                ],
            )
        });
        let noise_groups: Vec<_> = noise_dispatches
            .iter()
            .map(|(n, (out, out_bind, out_size), _)| {
                bind(
                    &k.add_noise,
                    vec![
                        uniform(*n, std::mem::size_of::<NoiseParams>() as u64),
                        whole(&stats),
                        range(out, *out_bind, *out_size),
                    ],
                )
            })
            .collect();

        // The partial rows' binding of pass-4 dispatches without row chunks.
        let no_partials = self.pool.get(Slot::NoPartials, 16, storage);
        let means_groups: Vec<_> = means_dispatches
            .iter()
            .map(|d| {
                let (out, out_bind, out_size) = d.out;
                let [grads, grads4] = d.sources[0].resources(dummy);
                let (partials, at, size) = d.partials.unwrap_or((&no_partials, 0, 16));
                let resources = vec![
                    uniform(d.params, MEANS_TABLE_BYTES),
                    grads,
                    whole(match d.weights {
                        Pass4Weights::MicroBatch => &weights,
                        Pass4Weights::Row => &row_weights,
                        Pass4Weights::Ones => &ones,
                    }),
                    range(out, out_bind, out_size),
                    grads4,
                    range(partials, at, size),
                ];
                let slots = slot_resources(&d.sources, dummy);
                bind_group(
                    device,
                    readers(&d.sources, d.dtype).weighted_means(d.partials.is_some(), d.aligned),
                    resources,
                    slots,
                )
            })
            .collect();

        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("microclip"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("microclip"),
                timestamp_writes: self.timer.as_ref().map(PassTimer::writes),
            });
            for (group, d) in partial_groups.iter().zip(&partial_dispatches) {
                pass.set_pipeline(readers(&d.sources, d.dtype).partials(d.variant));
                pass.set_bind_group(0, group, &[]);
                let (x, y, z) = d.groups;
                pass.dispatch_workgroups(x, y, z);
            }
            pass.set_pipeline(&k.norms);
            pass.set_bind_group(0, &norms_group, &[]);
            pass.dispatch_workgroups(norm_groups_x, norm_groups_y, 1);
            pass.set_pipeline(&k.factors);
            pass.set_bind_group(0, &factors_group, &[]);
            pass.dispatch_workgroups(1, 1, 1);
            if let Some(group) = &row_weights_group {
                pass.set_pipeline(&k.row_weights);
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(rows_groups_x, rows_groups_y, 1);
            }
            for (group, d) in means_groups.iter().zip(&means_dispatches) {
                pass.set_pipeline(
                    readers(&d.sources, d.dtype).weighted_means(d.partials.is_some(), d.aligned),
                );
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(d.groups.0, d.groups.1, 1);
            }
            if !noise_groups.is_empty() {
                pass.set_pipeline(&k.add_noise);
            }
            for (group, (_, _, (x, y))) in noise_groups.iter().zip(&noise_dispatches) {
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(*x, *y, 1);
            }
        }
        self.last_dispatches = partial_groups.len()
            + 2
            + row_weights_group.is_some() as usize
            + means_groups.len()
            + noise_groups.len();

        // Read-back layout: [stats][norms M x G][factors M x G][bounds G][outputs...].
        let out_bytes: u64 = if read_outputs {
            inputs.iter().map(|t| t.cols as u64 * 4).sum()
        } else {
            0
        };
        let per_mb = 4 * m * g;
        let outputs_at = STATS_BYTES + 2 * per_mb + 4 * g;
        // [...][pass timestamps] when timed.
        let timer_bytes = if self.timer.is_some() { TIMER_BYTES } else { 0 };
        let total = outputs_at + out_bytes + timer_bytes;
        let readback = self
            .pool
            .get(Slot::Readback, total, U::MAP_READ | U::COPY_DST);
        encoder.copy_buffer_to_buffer(&stats, 0, &readback, 0, STATS_BYTES);
        encoder.copy_buffer_to_buffer(&norms, 0, &readback, STATS_BYTES, per_mb);
        encoder.copy_buffer_to_buffer(&factors, 0, &readback, STATS_BYTES + per_mb, per_mb);
        encoder.copy_buffer_to_buffer(&bounds, 0, &readback, STATS_BYTES + 2 * per_mb, 4 * g);
        // Each output from where pass 4 left it (its buffer, or its columns of the
        // merged row) to where the caller reads it: the read-back buffer on the
        // host path, else its buffer.
        let mut at = outputs_at;
        for (o, merged_at) in outputs.iter().zip(&means_bases) {
            let len = o.cols as u64 * 4;
            let (source, source_at) = if merged {
                (&merged_out, merged_at * 4)
            } else {
                (o.buffer, o.offset)
            };
            if read_outputs {
                encoder.copy_buffer_to_buffer(source, source_at, &readback, at, len);
                at += len;
            } else if merged {
                encoder.copy_buffer_to_buffer(source, source_at, o.buffer, o.offset, len);
            }
        }
        if let Some(timer) = &self.timer {
            timer.copy_to(&mut encoder, &readback, total - TIMER_BYTES);
        }
        self.queue.submit([encoder.finish()]);
        Ok((readback, total))
    }

    /// The raw Philox words the noise pass draws for output elements
    /// `first..first + count` (the same words as [`crate::noise::philox_word`]),
    /// or, with `normals`, the f32 bits of their standard normals.
    pub fn noise_words(
        &mut self,
        noise: &GaussianNoise,
        first: u64,
        count: u32,
        normals: bool,
    ) -> Result<Vec<u32>> {
        let count = count.max(1);
        let bytes = count as u64 * 4;
        let out = self
            .pool
            .get(Slot::Output(usize::MAX), bytes, U::STORAGE | U::COPY_SRC);
        let stats = self.pool.get(
            Slot::Stats,
            STATS_BYTES,
            U::STORAGE | U::COPY_DST | U::COPY_SRC,
        );
        let (groups_x, groups_y) = dispatch_2d((count as u64).div_ceil(WORKGROUP))?;
        let mode = if normals {
            NOISE_MODE_NORMALS
        } else {
            NOISE_MODE_RAW_WORDS
        };
        let params = noise_params(noise, first, count, 0, groups_x, mode);
        let uniforms = self.pool.get(
            Slot::Params,
            std::mem::size_of::<NoiseParams>() as u64,
            U::UNIFORM | U::COPY_DST,
        );
        self.queue
            .write_buffer(&uniforms, 0, bytemuck::bytes_of(&params));
        let pipeline = &self.kernels.add_noise;
        let group = bind_group(
            &self.device,
            pipeline,
            vec![
                range(&uniforms, 0, std::mem::size_of::<NoiseParams>() as u64),
                whole(&stats),
                range(&out, 0, bytes),
            ],
            Vec::new(),
        );
        let readback = self
            .pool
            .get(Slot::Readback, bytes, U::MAP_READ | U::COPY_DST);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(groups_x, groups_y, 1);
        }
        encoder.copy_buffer_to_buffer(&out, 0, &readback, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let words = self.read_back(&(readback, bytes))?;
        Ok(bytemuck::cast_slice(&words).to_vec())
    }

    fn read_back(&self, (buffer, len): &(wgpu::Buffer, u64)) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        buffer.map_async(wgpu::MapMode::Read, ..*len, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
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

/// Writes `bytes` at byte `at` (a multiple of 4) of `buffer`; a length that is not a multiple of 4
/// (an odd number of 16-bit elements) gets its last word padded with zeros, as
/// `Queue::write_buffer` writes whole words.
fn upload(queue: &wgpu::Queue, buffer: &wgpu::Buffer, at: u64, bytes: &[u8]) {
    let whole = bytes.len() / 4 * 4;
    if whole > 0 {
        queue.write_buffer(buffer, at, &bytes[..whole]);
    }
    if whole < bytes.len() {
        let mut last = [0u8; 4];
        last[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
        queue.write_buffer(buffer, at + whole as u64, &last);
    }
}

/// The `add_noise` parameters for one tensor whose first output is element `first`.
fn noise_params(
    noise: &GaussianNoise,
    first: u64,
    cols: u32,
    out_offset: u32,
    groups_x: u32,
    mode: u32,
) -> NoiseParams {
    let halves = |v: u64| [v as u32, (v >> 32) as u32];
    NoiseParams {
        cols,
        out_offset,
        first: halves(first),
        seed: halves(noise.seed),
        step: halves(noise.step),
        groups_x,
        mode,
        pad: [0; 2],
    }
}

/// A bind group of `pipeline`'s group 0 with `resources` at bindings 0, 1, ...
/// and the numbered `more`.
fn bind_group(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    resources: Vec<wgpu::BindingResource<'_>>,
    more: Vec<(u32, wgpu::BindingResource<'_>)>,
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = (0..)
        .zip(resources)
        .chain(more)
        .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// `vec4_path` of the two input-reading kernels for rows of `cols` elements, the
/// first at element `elem_offset` of a binding: 1 (vec4 loads) when every row
/// starts at a multiple of 4 elements, else 2 (aligned loads shifted into place)
/// when the binding holds whole quads (`GpuClipper::quads_binding`), else 0
/// (scalar loads).
fn load_path(cols: u64, elem_offset: u32, whole_quads: bool) -> u32 {
    if vec4_aligned(cols, elem_offset) {
        1
    } else if whole_quads {
        2
    } else {
        0
    }
}

/// `size` bytes of `buffer` from `offset` as a binding.
fn range(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: wgpu::BufferSize::new(size.max(4)),
    })
}

/// The norm pass's minimum workgroup count for an adapter type. A software adapter
/// (lavapipe, SwiftShader: `DeviceType::Cpu`) pays per workgroup for its start and
/// its barriers (measured on lavapipe: pass 1 at b = 1 went from 2.2x to 0.8x a
/// read of the same bytes with 4x wider tiles), so its tiles widen while every
/// host thread keeps 16 workgroups. Hardware adapters keep the narrowest tile (more
/// workgroups in flight; wider tiles not measured on one).
fn default_min_tile_workgroups(device_type: wgpu::DeviceType) -> u64 {
    match device_type {
        wgpu::DeviceType::Cpu => {
            16 * std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
        }
        _ => u64::MAX,
    }
}

/// Whether the reduction kernels (passes 1 and 2) run workgroups of one SIMD group
/// (8 threads, see `kernels::kernel_constants`) on an adapter type: yes on a
/// software adapter, where a workgroup of several SIMD groups runs them one after
/// the other as coroutines that switch at every barrier (measured on lavapipe: a
/// 64-thread workgroup with a 6-level tree reduction cost 3.9 us, an 8-thread one
/// with a 3-level tree 0.24 us; 100 small tensors at b = 4 went from 3.2x to 2.5x
/// a read of the same bytes). Hardware adapters keep 64 and 256 threads.
fn default_small_workgroups(device_type: wgpu::DeviceType) -> bool {
    device_type == wgpu::DeviceType::Cpu
}

/// From how many rows per micro-batch on average pass 1 stores the means: 3, the
/// break-even in bytes being 2 (see `materialize_means`). On lavapipe at b = 2
/// re-reading the rows cost 2.5x a read (pass 1 1.3x, pass 4 1.3x), storing the
/// means 2.9x while the host's writes cost 4-6x its reads, about the same while
/// they cost 1.2x; at b = 4 storing wins (1.9x against 3.0x).
const DEFAULT_MEANS_MIN_ROWS: u64 = 3;

/// The most rows per chunk of pass 4 over input rows: a chunk is a plain sum
/// (no blocks of `ROW_BLOCK`), so its rounding error grows with its rows.
pub(crate) const MAX_PASS4_CHUNK_ROWS: u32 = 64;

/// Rows per chunk of pass 4 over input rows (b <= 2) for an adapter type: 32 on
/// a software adapter, else 0 (no chunks). Walking a column tile down all N rows
/// costs lavapipe about 1.4x a linear read of the same bytes; 32 rows at a time
/// across all columns (chunk after chunk, in one dispatch) about 1.1x (a probe
/// over 256 rows of 62,500 f32, 64-thread workgroups: 8.8 ms against 6.7-6.8;
/// BENCHMARKS.md), since then few rows stream at once. The chunks' partial rows
/// cost one more dispatch and `1/32` of an f32 input's bytes written and read.
/// Hardware keeps the long walk (not measured there).
fn default_pass4_chunk_rows(device_type: wgpu::DeviceType) -> u32 {
    match device_type {
        wgpu::DeviceType::Cpu => 32,
        _ => 0,
    }
}

/// Up to which average padded tensor width pass 4 runs once for several tensors,
/// for an adapter type. Merging saves a dispatch per tensor and costs one more
/// write, read and write of the output (12 bytes per column). On a software
/// adapter a dispatch costs about 50 us and a 10 KB copy 1.4 us (lavapipe): always.
/// On hardware, where a dispatch costs a few us, up to 2^18 columns on average
/// (3 MB of copies a tensor, a few us at HBM speeds; an estimate, not measured on
/// a GPU yet).
fn default_merge_max_avg_cols(device_type: wgpu::DeviceType) -> u64 {
    match device_type {
        wgpu::DeviceType::Cpu => u64::MAX,
        _ => 1 << 18,
    }
}

/// Buffer ranges per input-reading dispatch on `device` by default: [`SLOTS`] on
/// a hardware adapter that allows the slots variants (their storage bindings),
/// else 1. The slots variants choose each load's binding by the table entry's
/// slot: a branch that is the same for the whole workgroup. llvmpipe runs every
/// side of a branch under a lane mask, so on lavapipe those loads cost about 8
/// times as much: the input readers took 2.3-3.8x the time over the same bytes
/// (measured: the 100 tensors in 100 buffers at b = 4 went from 3.8-4.4x a read
/// to 6-10x, despite 13 norm-pass dispatches instead of 100), so a software
/// adapter keeps a dispatch per buffer. Hardware runs a workgroup-uniform branch
/// as one scalar branch and saves each dispatch's launch and barrier (the H200
/// took 8.6x a read on those 100 buffers with a dispatch each): on by default
/// there, not yet measured on a GPU.
fn default_buffer_slots(device: &wgpu::Device) -> usize {
    let software = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
    if slots_supported(device) && !software {
        SLOTS
    } else {
        1
    }
}

/// A whole scratch buffer as a binding.
fn whole(buffer: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
    buffer.as_entire_binding()
}

/// One pass-4 (`weighted_means`) dispatch: its parameter block, the rows it reads
/// (buffer, offset, size), its output range and the workgroups it runs.
struct Pass4<'a> {
    params: u64,
    /// The rows' buffer ranges, by slot.
    sources: Vec<Source<'a>>,
    /// Which weights it reads.
    weights: Pass4Weights,
    out: (&'a wgpu::Buffer, u64, u64),
    /// The partial rows it writes (a row-chunk dispatch: the `ROW_CHUNKS`
    /// pipeline), if any.
    partials: Option<(&'a wgpu::Buffer, u64, u64)>,
    /// Every entry reads its rows as whole quads (`vec4_path` 1): the pipeline
    /// built for them (`kernels::weighted_means_constants`).
    aligned: bool,
    groups: (u32, u32),
    dtype: Dtype,
}

impl<'a> Pass4<'a> {
    /// Numbers the column groups of `table`'s tensors one after the other, sets
    /// the dispatch's size in entry 0 and appends the table to `params`.
    fn push(
        params: &mut ParamBlocks,
        mut table: Vec<MeansSumParams>,
        bindings: Vec<(&'a wgpu::Buffer, u64, u64)>,
        weights: Pass4Weights,
        out: (&'a wgpu::Buffer, u64, u64),
        dtype: Dtype,
    ) -> Result<Self> {
        let mut dispatch_groups = 0u64;
        for e in &mut table {
            e.first_group = dispatch_groups as u32;
            dispatch_groups += (e.cols as u64).div_ceil(MEANS_SUM_COLS);
        }
        let groups = dispatch_2d(dispatch_groups)?;
        table[0].groups_x = groups.0;
        table[0].entries = table.len() as u32;
        table[0].dispatch_groups = dispatch_groups as u32;
        let sources = slot_sources(&bindings, &table, |e| (e.slot as usize, e.vec4_path));
        Ok(Self {
            aligned: table.iter().all(|e| e.vec4_path == 1),
            params: params.push_table(&table, MEANS_TABLE_BYTES),
            sources,
            weights,
            out,
            partials: None,
            groups,
            dtype,
        })
    }
}

/// The weights a pass-4 dispatch reads: per micro-batch (`s_{j,g} / M`), per
/// input row (the row-weight table), or ones (the sum of row chunks' partial
/// rows).
#[derive(Clone, Copy)]
enum Pass4Weights {
    MicroBatch,
    Row,
    Ones,
}

/// A pass-4 dispatch over input rows before it is cut into row chunks: its
/// table, bindings by slot, output range and element type.
struct RowsJob<'a> {
    table: Vec<MeansSumParams>,
    bindings: Vec<(&'a wgpu::Buffer, u64, u64)>,
    out: (&'a wgpu::Buffer, u64, u64),
    dtype: Dtype,
}

/// One norm-pass (`mb_partials`) dispatch: its table's offset in the uniform
/// blocks, the rows it reads (by slot), the carry buffers' roles (its window's
/// index), its workgroups and type.
struct Pass1<'a> {
    params: u64,
    /// The norm pass's build it runs (`CallLayout::pass1_variants`).
    variant: PartialsVariant,
    sources: Vec<Source<'a>>,
    window: usize,
    groups: (u32, u32, u32),
    dtype: Dtype,
}

/// A buffer range an input-reading dispatch reads rows from, and whether an
/// entry of the table reads it as quads (`vec4_path` != 0).
#[derive(Clone, Copy)]
struct Source<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
    quads: bool,
}

impl<'a> Source<'a> {
    /// Its `grads` and `grads4` bindings (`dummy` for the latter when no entry
    /// reads quads).
    fn resources(&self, dummy: &'a wgpu::Buffer) -> [wgpu::BindingResource<'a>; 2] {
        let rows = range(self.buffer, self.offset, self.size);
        let quads = if self.quads {
            range(self.buffer, self.offset, self.size)
        } else {
            whole(dummy)
        };
        [rows, quads]
    }
}

/// The sources of a dispatch from its bindings (buffer, offset, size) by slot
/// and its table, whose entries give (slot, `vec4_path`) through `slot_path`.
fn slot_sources<'a, T>(
    bindings: &[(&'a wgpu::Buffer, u64, u64)],
    table: &[T],
    slot_path: impl Fn(&T) -> (usize, u32),
) -> Vec<Source<'a>> {
    (0..bindings.len())
        .map(|slot| {
            let (buffer, offset, size) = bindings[slot];
            Source {
                buffer,
                offset,
                size,
                quads: table
                    .iter()
                    .map(&slot_path)
                    .any(|(s, p)| s == slot && p != 0),
            }
        })
        .collect()
}

/// The numbered bindings of slots 1.. of the slots variants (grads_slots.wgsl)
/// for a dispatch over several sources (the unused ones bound to `dummy`); none
/// for a dispatch over one.
fn slot_resources<'a>(
    sources: &[Source<'a>],
    dummy: &'a wgpu::Buffer,
) -> Vec<(u32, wgpu::BindingResource<'a>)> {
    if sources.len() < 2 {
        return Vec::new();
    }
    (1..SLOTS)
        .flat_map(|k| {
            let [rows, quads] = match sources.get(k) {
                Some(s) => s.resources(dummy),
                None => [whole(dummy), whole(dummy)],
            };
            [(slot_binding(k), rows), (slot_binding(k) + 1, quads)]
        })
        .collect()
}

/// Bytes of mb_partials' `table` binding: `TABLE_LEN` parameter blocks.
const PARTIALS_TABLE_BYTES: u64 = (TABLE_LEN * std::mem::size_of::<PartialsParams>()) as u64;
/// Bytes of weighted_means' `table` binding: `TABLE_LEN` parameter blocks.
const MEANS_TABLE_BYTES: u64 = (TABLE_LEN * std::mem::size_of::<MeansSumParams>()) as u64;

/// Uniform blocks packed at the device's uniform offset alignment.
struct ParamBlocks {
    align: u64,
    bytes: Vec<u8>,
}

impl ParamBlocks {
    fn new(align: u64) -> Self {
        Self {
            align,
            bytes: Vec::new(),
        }
    }

    /// Appends `entries` as one block of `bytes` (the rest zeros) and returns its
    /// byte offset.
    fn push_table<T: bytemuck::Pod>(&mut self, entries: &[T], bytes: u64) -> u64 {
        let at = self.push(&entries[0]);
        self.bytes
            .extend_from_slice(bytemuck::cast_slice(&entries[1..]));
        self.bytes.resize((at + bytes) as usize, 0);
        at
    }

    /// Appends a block and returns its byte offset.
    fn push<T: bytemuck::Pod>(&mut self, block: &T) -> u64 {
        let at = (self.bytes.len() as u64).next_multiple_of(self.align);
        self.bytes.resize(at as usize, 0);
        self.bytes.extend_from_slice(bytemuck::bytes_of(block));
        at
    }
}
