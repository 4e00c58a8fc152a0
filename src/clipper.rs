//! The public entry point: a [`Clipper`] that owns a backend.

use crate::config::{tensor_widths, ClipConfig, GaussianNoise};
use crate::cpu;
use crate::dtype::GradElement;
use crate::error::{ClipError, Result};
use crate::gpu::{GpuClipper, GpuTensor, GpuTensorMut};

/// Which backend to build a [`Clipper`] on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The GPU when an adapter exists, else the CPU (unless
    /// [`REQUIRE_GPU_ENV`](crate::REQUIRE_GPU_ENV) is `1`, then an error).
    #[default]
    Auto,
    /// The default wgpu adapter; an error when there is none.
    Gpu,
    /// The multi-threaded CPU implementation.
    Cpu,
}

/// The backend that actually ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// WGSL kernels on this adapter (its name and wgpu backend, e.g. `"llvmpipe (Vulkan)"`).
    Gpu(String),
    /// The CPU implementation.
    Cpu,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendKind::Gpu(name) => write!(f, "gpu: {name}"),
            BackendKind::Cpu => write!(f, "cpu"),
        }
    }
}

/// Per-step statistics. With G parameter groups, `norms` and `factors` hold one
/// value per (micro-batch, group), micro-batch-major: entry `j * G + g`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipStats {
    /// Number of parameter groups G (1 without groups).
    pub groups: usize,
    /// `norm_{j,g}` (NaN or +inf for a non-finite one; +inf also when a finite norm
    /// exceeds `f32::MAX`; 0 for a norm below f32's smallest subnormal, about
    /// 1.4e-45, or below its normal range where a GPU flushes subnormals, while
    /// the factors are formed from the norm itself).
    pub norms: Vec<f32>,
    /// The factor `s_{j,g}` applied to micro-batch `j`'s mean in group `g` (0 for a
    /// skipped micro-batch).
    pub factors: Vec<f32>,
    /// The bound `C_g` of each group (NaN when adaptive and no micro-batch is
    /// finite; +inf when an adaptive bound exceeds `f32::MAX`, the factors stay exact).
    pub group_bounds: Vec<f32>,
    /// The total bound `S = sqrt(sum_g C_g^2)`: with one group, the bound `C`
    /// used this step. One sample moves the clipped sum by up to `S`, or `2 S`
    /// with micro-batches of more than one sample
    /// ([`accountant::micro_batch_sensitivity`](crate::accountant::micro_batch_sensitivity)).
    pub clip_bound: f32,
    /// (micro-batch, group) pairs of finite micro-batches with `norm_{j,g} > C_g`,
    /// as the backend rounds them (the GPU in f32, the CPU in f64 but for a
    /// one-row micro-batch's squares, in short f32 sums): a norm within
    /// a rounding of `C_g` may count on one backend and not the other (not the
    /// micro-batch an adaptive bound of scale 1 comes from: it never counts).
    pub clipped_count: usize,
    /// Micro-batches whose mean gradient holds NaN or infinity (in any group).
    pub nonfinite_count: usize,
    /// Standard deviation of the Gaussian noise added before the division by M,
    /// `sigma * S` (0 without noise), multiplied in f64: finite whenever the
    /// product fits f32, even where `clip_bound` (`S` in f32) is +inf.
    pub noise_std: f32,
    /// The backend that ran.
    pub backend: BackendKind,
}

/// The clipped average (one vector per input tensor) and the statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipOutput {
    /// `out_p`, of length `D_p`, for each input tensor `p`.
    pub grads: Vec<Vec<f32>>,
    /// The statistics of the step.
    pub stats: ClipStats,
}

enum Engine {
    Gpu(Box<GpuClipper>),
    /// The CPU backend, its settings and pooled host memory.
    Cpu(cpu::CpuEngine),
}

/// Runs micro-batch clipping. Build once and reuse: the GPU's core pipelines are
/// created in the constructor (the 16-bit readers and the kernels' variants on
/// the first call that needs them), and pipelines and scratch buffers are kept
/// between calls.
pub struct Clipper {
    engine: Engine,
}

impl Clipper {
    /// Builds a clipper, blocking on adapter and device creation (pollster).
    pub fn new(backend: Backend) -> Result<Self> {
        pollster::block_on(Self::new_async(backend))
    }

    /// Builds a clipper asynchronously.
    pub async fn new_async(backend: Backend) -> Result<Self> {
        let engine = match backend {
            Backend::Cpu => Engine::Cpu(cpu::CpuEngine::default()),
            Backend::Gpu => Engine::Gpu(Box::new(GpuClipper::new_default().await?)),
            Backend::Auto => match GpuClipper::new_default().await {
                Ok(gpu) => Engine::Gpu(Box::new(gpu)),
                Err(e) if gpu_required() => return Err(e),
                Err(_) => Engine::Cpu(cpu::CpuEngine::default()),
            },
        };
        Ok(Self { engine })
    }

    /// Builds a GPU clipper on a device and queue the caller already has (a
    /// framework's), so that its buffers can be passed in directly. The device
    /// must allow 7 storage buffers per shader stage, 256 invocations per
    /// workgroup and 256 in x, and 65,535 workgroups per dimension (all within
    /// WebGPU's default limits; not wgpu's downlevel ones), else
    /// [`ClipError::Device`], as when a kernel fails to build on it. A device
    /// whose storage bindings are smaller than a call's rows and scratch needs
    /// makes that call [`ClipError::TooLarge`]. Buffers passed to the clipper
    /// must come from this device (and its instance: wgpu reports a buffer of
    /// another device of the same instance, which becomes [`ClipError::Device`],
    /// but cannot tell one of another instance, whose buffer may then be taken
    /// for one of the clipper's own: an error (wgpu panics on a mismatched id,
    /// caught as [`ClipError::Device`]; or [`ClipError::BufferRange`]) or wrong
    /// results: never pass one).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Ok(Self {
            engine: Engine::Gpu(Box::new(GpuClipper::from_device(device, queue)?)),
        })
    }

    /// The backend this clipper runs on.
    pub fn backend(&self) -> BackendKind {
        match &self.engine {
            Engine::Gpu(gpu) => BackendKind::Gpu(gpu.adapter_name().to_string()),
            Engine::Cpu(_) => BackendKind::Cpu,
        }
    }

    /// The wgpu device of a GPU clipper (to create buffers for [`Self::clip_buffers`]).
    pub fn device(&self) -> Option<&wgpu::Device> {
        self.gpu().map(|gpu| gpu.device())
    }

    /// The wgpu queue of a GPU clipper.
    pub fn queue(&self) -> Option<&wgpu::Queue> {
        self.gpu().map(|gpu| gpu.queue())
    }

    /// Extra device memory this clipper holds between calls: norm partials,
    /// per-micro-batch state, row offsets, parameters, carry rows, micro-batch means
    /// (`M x sum ceil4(D_p) x 4` bytes, pooled from the first call with `N / M >= 3`),
    /// the output row of a last pass run once for several tensors
    /// (`sum ceil4(D_p) x 4` bytes), per-row weights (`N x G x 8` bytes, when the
    /// last pass re-reads rows of micro-batches of several rows), the partial rows
    /// of that pass's row chunks when it re-reads the rows (b = 1 too; by default
    /// on a software adapter: about `rows / 32 x ceil4(D_p) x 4` bytes summed
    /// over the tensors of its largest dispatch, or over a tensor's row windows
    /// cut together, 8 bytes of ones per partial row, and a 16-byte stand-in) and
    /// the read-back buffer. Not counted: the host path's pooled copies of the
    /// caller's data, kept between calls (the uploaded input, and the outputs,
    /// `sum D_p x 4` bytes), the outputs [`Self::clip_buffers`] returns (new buffers
    /// each call, owned by the caller) and the timer's query set and 16 bytes
    /// ([`Self::set_gpu_timing`]). On the
    /// CPU: the host memory kept between calls, the micro-batch means of the
    /// two-pass path (`M x sum D_p x 4` bytes, from the first call that stores
    /// them; see [Memory](crate#memory)).
    pub fn scratch_bytes(&self) -> u64 {
        match &self.engine {
            Engine::Gpu(gpu) => gpu.scratch_bytes(),
            Engine::Cpu(cpu) => cpu.scratch_bytes(),
        }
    }

    /// Frees the memory this clipper keeps between calls: everything
    /// [`Self::scratch_bytes`] counts, and on the GPU also the host path's pooled
    /// copies of the caller's data. Scratch grows and is kept (a call that needs
    /// more replaces a buffer; one that needs less reuses it), so a clipper that once
    /// clipped a large batch holds that batch's scratch until this call or its
    /// drop. The next call allocates what it needs again; pipelines stay built.
    /// Results do not change.
    pub fn release_scratch(&mut self) {
        match &mut self.engine {
            Engine::Gpu(gpu) => gpu.release_scratch(),
            Engine::Cpu(cpu) => cpu.release_scratch(),
        }
    }

    /// Times the GPU backend's compute pass of every later call with timestamp
    /// queries (`on`), or stops; returns whether calls are timed: false on the CPU
    /// backend and on a device without wgpu's `TIMESTAMP_QUERY` feature
    /// ([`Clipper::new`] requests it where the adapter has it; a device passed to
    /// [`Clipper::from_device`] needs it enabled by its creator). Timing adds two
    /// timestamp writes and 16 bytes to each call's read-back.
    pub fn set_gpu_timing(&mut self, on: bool) -> bool {
        match &mut self.engine {
            Engine::Gpu(gpu) => gpu.set_timing(on),
            Engine::Cpu(_) => false,
        }
    }

    /// The device time of the last GPU call's compute pass (every kernel of the
    /// call: the norm passes, the weighted sum and the noise; not the host's
    /// encoding, the submission, the copies after the pass or the read-back),
    /// when [`Self::set_gpu_timing`] is on; `None` otherwise, when the last call
    /// failed, or when the driver's two timestamps were not in order.
    pub fn last_gpu_time(&self) -> Option<std::time::Duration> {
        self.gpu().and_then(|gpu| gpu.last_pass_time())
    }

    /// Compute dispatches the last GPU call recorded (0 before the first and
    /// after a call that failed before recording; `None` on the CPU). For tests
    /// and benches of how tensors share dispatches.
    #[doc(hidden)]
    pub fn last_gpu_dispatches(&self) -> Option<usize> {
        self.gpu().map(|gpu| gpu.last_dispatches())
    }

    /// Of [`Self::last_gpu_dispatches`], the input readers that read 16-bit rows
    /// as octs ([`Self::set_gpu_oct_loads`]). For tests and benches.
    #[doc(hidden)]
    pub fn last_gpu_oct_dispatches(&self) -> Option<usize> {
        self.gpu().map(|gpu| gpu.last_oct_dispatches())
    }

    /// Limits the bytes one storage binding may cover (default: the device's
    /// `max_storage_buffer_binding_size`). Larger inputs are processed in row
    /// windows; tests use a small value to exercise that path. Rounded up to a
    /// multiple of 16, within the device's limit, which is kept below 4 GiB (u32
    /// indexing). No effect on the CPU.
    pub fn set_max_binding_bytes(&mut self, bytes: u64) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_max_binding_bytes(bytes);
        }
    }

    /// Sets the fewest workgroups the GPU norm pass keeps when it widens its column
    /// tiles; `None` restores the adapter's default (16 per host thread on a
    /// software adapter; `u64::MAX`, i.e. always the narrowest tile, on hardware).
    /// For tests of every tile width. No effect on the CPU.
    #[doc(hidden)]
    pub fn set_gpu_min_tile_workgroups(&mut self, workgroups: Option<u64>) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_min_tile_workgroups(workgroups);
        }
    }

    /// Sets from how many rows per micro-batch (on average, `N / M`) the GPU stores
    /// the micro-batch means for its last pass; `None` restores the default (3);
    /// values below 2 count as 2
    /// (one-row means would be a copy of the input). For tests of both pass-4
    /// kernels on one adapter. No effect on the CPU.
    #[doc(hidden)]
    pub fn set_gpu_means_min_rows(&mut self, rows: Option<u64>) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_means_min_rows(rows);
        }
    }

    /// Sets whether the GPU's kernels take a software adapter's shapes: the
    /// reduction kernels (passes 1 and 2) run workgroups of 8 threads (one SIMD
    /// group) instead of 64 and 256, the input readers give each lane adjacent
    /// quads (`kernel_constants`), calls with micro-batches deeper than
    /// `CHUNK_ROWS` rows walk them in chunks (`deep_kernel_constants`), and f16
    /// is decoded by `unpack2x16float` where the device compiles it (unless
    /// [`Self::set_gpu_f16_unpack`] chose); `None` restores the adapter's default
    /// (on for a software adapter). Rebuilds those pipelines; if that fails on
    /// the device, the old ones stay and [`Self::gpu_small_workgroups`] reports
    /// the setting unchanged. For tests of both shapes on one adapter. No effect
    /// on the CPU.
    #[doc(hidden)]
    pub fn set_gpu_small_workgroups(&mut self, small: Option<bool>) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_small_workgroups(small);
        }
    }

    /// Sets whether the GPU's input-reading dispatches may read tensors of several
    /// buffers at once (up to 8, through the kernels' slots variants, where the
    /// device allows their storage bindings); `true`: where it does; `None`: the
    /// adapter's default (on for hardware that allows it, off on a software
    /// adapter, whose branches cost every slot's loads); `false`: one dispatch per
    /// buffer and pass. For tests and benches
    /// of both ways on one adapter. No effect on the CPU.
    #[doc(hidden)]
    pub fn set_gpu_buffer_slots(&mut self, on: Option<bool>) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_buffer_slots(on);
        }
    }

    /// Whether the GPU's input-reading dispatches read several buffers at once now
    /// ([`Self::set_gpu_buffer_slots`]; `None` on the CPU). For the benchmark.
    #[doc(hidden)]
    pub fn gpu_buffer_slots(&self) -> Option<bool> {
        self.gpu().map(|gpu| gpu.buffer_slots())
    }

    /// Sets how many rows at a time the GPU's last pass walks when it re-reads the
    /// input rows (micro-batches of 1 or 2 rows on average): chunks of about `rows`
    /// rows (`round(r / rows)` chunks of nearly equal rows for each run of `r`
    /// rows, none over 64) summed into partial rows, then one more dispatch adds
    /// those up; `Some(0)`: all rows at once; `None`: the adapter's default (32 on
    /// a software adapter, 0 on hardware); values above 64 count as 64 (a chunk
    /// is summed without blocks). Only dispatches with an entry of at least
    /// `2 x rows` rows are cut,
    /// and the row windows of a tensor larger than one binding (together: one
    /// sum of all their partial rows into the output).
    /// For tests and benches of both ways on one adapter. No effect on the CPU.
    #[doc(hidden)]
    pub fn set_gpu_pass4_chunk_rows(&mut self, rows: Option<u32>) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_pass4_chunk_rows(rows);
        }
    }

    /// The GPU's rows per chunk of its last pass over input rows
    /// ([`Self::set_gpu_pass4_chunk_rows`]; 0: no chunks; `None` on the CPU).
    #[doc(hidden)]
    pub fn gpu_pass4_chunk_rows(&self) -> Option<u32> {
        self.gpu().map(|gpu| gpu.pass4_chunk_rows())
    }

    /// Sets whether the GPU reads 16-bit rows that start at multiples of 8
    /// elements as octs: one `vec4<u32>` load per two quads instead of two
    /// `vec2<u32>` loads, in the walks whose lanes own adjacent quads; `None`:
    /// the default (with small workgroups, a software adapter's shapes). The same
    /// bits either way. For tests and benches of both ways on one adapter. No
    /// effect on the CPU.
    #[doc(hidden)]
    pub fn set_gpu_oct_loads(&mut self, on: Option<bool>) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_oct_loads(on);
        }
    }

    /// Fills every pooled GPU buffer with 0xFF bytes (f32 NaN) each time a call
    /// takes it (`on`), so that a kernel reading scratch its call did not write
    /// (a stale result of an earlier call, in normal use) gives NaN. For tests;
    /// slow (a host copy of each buffer per call). No effect on the CPU.
    #[doc(hidden)]
    pub fn set_gpu_poison_scratch(&mut self, on: bool) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_poison_scratch(on);
        }
    }

    /// Whether the GPU reads such 16-bit rows as octs now
    /// ([`Self::set_gpu_oct_loads`]; `None` on the CPU).
    #[doc(hidden)]
    pub fn gpu_oct_loads(&self) -> Option<bool> {
        self.gpu().map(|gpu| gpu.oct_loads())
    }

    /// Sets whether the GPU decodes f16 input with WGSL's `unpack2x16float` (about
    /// 10% faster at b = 1 on lavapipe; exact there: every finite f16 value is
    /// tested) where the device compiles it, or with its exact integer operations; `None`
    /// restores the default: the builtin with small workgroups (a software
    /// adapter), else the integer decode (WGSL lets the builtin flush f16
    /// subnormals; no hardware run has checked it yet). Rebuilds the f16
    /// pipelines. For tests and benches of both ways on one adapter. No effect on
    /// the CPU.
    #[doc(hidden)]
    pub fn set_gpu_f16_unpack(&mut self, unpack: Option<bool>) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.set_f16_unpack(unpack);
        }
    }

    /// Whether the GPU decodes f16 with `unpack2x16float` now
    /// ([`Self::set_gpu_f16_unpack`]; `None` on the CPU).
    #[doc(hidden)]
    pub fn gpu_f16_unpack(&self) -> Option<bool> {
        self.gpu().map(|gpu| gpu.f16_unpack())
    }

    /// Whether the GPU's f16 pipelines, as built for the last f16 call, decode with
    /// `unpack2x16float` (`None` on the CPU and before the first f16 call). For
    /// tests: that a choice of [`Self::set_gpu_f16_unpack`] rebuilt them.
    #[doc(hidden)]
    pub fn gpu_f16_unpack_built(&self) -> Option<bool> {
        self.gpu().and_then(|gpu| gpu.f16_unpack_built())
    }

    /// The GPU's current choice of [`Self::set_gpu_small_workgroups`] (`None` on the
    /// CPU). For the benchmark's per-kernel replay.
    #[doc(hidden)]
    pub fn gpu_small_workgroups(&self) -> Option<bool> {
        self.gpu().map(|gpu| gpu.small_workgroups())
    }

    /// The GPU's current rule of [`Self::set_gpu_means_min_rows`] (`None` on the
    /// CPU). For the benchmark's per-kernel replay.
    #[doc(hidden)]
    pub fn gpu_means_min_rows(&self) -> Option<u64> {
        self.gpu().map(|gpu| gpu.means_min_rows())
    }

    /// Columns per workgroup the GPU norm pass would use for tensors of `widths`
    /// columns and `micro_batches` micro-batches of at most `deepest` rows
    /// (`None` on the CPU). For the benchmark's per-kernel replay.
    #[doc(hidden)]
    pub fn gpu_tile_cols(
        &self,
        widths: &[usize],
        micro_batches: usize,
        deepest: usize,
    ) -> Option<u64> {
        self.gpu()
            .map(|gpu| gpu.tile_cols(widths, micro_batches, deepest))
    }

    /// Sets the host memory the CPU backend's one-read path may keep hot (default
    /// 20 MiB); 0 forces the two-pass path. For tests of both paths. No effect on
    /// the GPU.
    #[doc(hidden)]
    pub fn set_cpu_fused_budget_bytes(&mut self, bytes: usize) {
        if let Engine::Cpu(cpu) = &mut self.engine {
            cpu.fused_budget = bytes;
        }
    }

    /// Sets the largest micro-batch means (bytes) the CPU backend's two-pass path
    /// stores for its second pass (default 1 GiB); 0 makes it read the input
    /// twice. For tests of both ways. No effect on the GPU.
    #[doc(hidden)]
    pub fn set_cpu_means_max_bytes(&mut self, bytes: usize) {
        if let Engine::Cpu(cpu) = &mut self.engine {
            cpu.means_max_bytes = bytes;
        }
    }

    /// Sets the input bytes from which a CPU backend call uses more threads than
    /// the calling one (default 8 MiB: below, starting threads costs more than
    /// it saves on a 2-core host); 0 starts them whenever the call has work for
    /// more than one (more than one 4096-column block, more than one core).
    /// For tests of both ways (the same bits). No effect on the GPU.
    #[doc(hidden)]
    pub fn set_cpu_parallel_min_bytes(&mut self, bytes: usize) {
        if let Engine::Cpu(cpu) = &mut self.engine {
            cpu.parallel_min_bytes = bytes;
        }
    }

    /// Whether the CPU backend widens f16 with F16C where the CPU has it (default
    /// true); false takes the integer decode of CPUs without it. For tests of
    /// both ways (the same bits). No effect on the GPU.
    #[doc(hidden)]
    pub fn set_cpu_f16c(&mut self, allowed: bool) {
        if let Engine::Cpu(cpu) = &mut self.engine {
            cpu.f16c = allowed;
        }
    }

    /// Clips host slices: tensor `p` is a row-major `[n_samples, D_p]` matrix of
    /// `f32`, [`half::f16`] or [`half::bf16`] (accumulated in f32 on the GPU, f64 on
    /// the CPU; the outputs are f32).
    pub fn clip<T: GradElement>(
        &mut self,
        config: &ClipConfig,
        tensors: &[&[T]],
        n_samples: usize,
    ) -> Result<ClipOutput> {
        self.begin_call();
        config.validate()?;
        if n_samples == 0 {
            return Err(ClipError::NoSamples);
        }
        // The lengths before the offsets, whose vector a wrong n_samples could
        // make huge.
        let widths = tensor_widths(tensors.iter().map(|t| t.len()), n_samples)?;
        let offsets = config.row_offsets(n_samples)?;
        let groups = config.tensor_groups(tensors.len())?;
        match &mut self.engine {
            Engine::Gpu(gpu) => gpu.clip_host(config, &offsets, &widths, &groups, tensors),
            Engine::Cpu(cpu) => cpu::clip(cpu, config, &offsets, &widths, &groups, tensors),
        }
    }

    /// Clips gradients that already live in `wgpu::Buffer`s on this clipper's
    /// device, writing `out_p` (f32, `D_p` elements) into the caller's buffers.
    /// No gradient data crosses to the host; the statistics are read back.
    /// Outputs must not overlap each other, and no output may lie in a buffer
    /// that holds an input, even at other bytes ([`ClipError::BufferRange`]). Under
    /// [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error) the non-finite
    /// micro-batches are found on the device, so when the call returns
    /// [`ClipError::NonFinite`] the outputs already hold the result with those
    /// micro-batches skipped (as [`NonFinitePolicy::Skip`](crate::NonFinitePolicy::Skip)
    /// gives).
    pub fn clip_buffers_into(
        &mut self,
        config: &ClipConfig,
        inputs: &[GpuTensor<'_>],
        n_samples: usize,
        outputs: &[GpuTensorMut<'_>],
    ) -> Result<ClipStats> {
        self.begin_call();
        let gpu = self.gpu_engine()?;
        if inputs.len() != outputs.len() {
            return Err(ClipError::OutputCount {
                inputs: inputs.len(),
                outputs: outputs.len(),
            });
        }
        let (offsets, groups) = buffer_call_layout(gpu, config, inputs, n_samples)?;
        gpu.check_outputs(inputs, outputs)?;
        gpu.clip_buffers(config, &offsets, &groups, inputs, outputs)
    }

    /// Like [`Self::clip_buffers_into`], returning new buffers (usage
    /// `STORAGE | COPY_SRC | COPY_DST`) holding `out_p`.
    pub fn clip_buffers(
        &mut self,
        config: &ClipConfig,
        inputs: &[GpuTensor<'_>],
        n_samples: usize,
    ) -> Result<(Vec<wgpu::Buffer>, ClipStats)> {
        self.begin_call();
        let gpu = self.gpu_engine()?;
        // Checked before the outputs are created: a bad configuration or input
        // is its own error, not an out-of-memory one.
        let (offsets, groups) = buffer_call_layout(gpu, config, inputs, n_samples)?;
        let buffers: Vec<wgpu::Buffer> = inputs
            .iter()
            .map(|t| gpu.output_buffer(t.cols))
            .collect::<Result<_>>()?;
        let outputs: Vec<GpuTensorMut<'_>> = buffers
            .iter()
            .zip(inputs)
            .map(|(buffer, t)| GpuTensorMut {
                buffer,
                offset: 0,
                cols: t.cols,
            })
            .collect();
        let stats = gpu.clip_buffers(config, &offsets, &groups, inputs, &outputs)?;
        Ok((buffers, stats))
    }

    /// The raw random words the GPU noise pass draws for output elements
    /// `first..first + count` under `noise`'s seed and step; they equal
    /// [`crate::noise::philox_word`] bit for bit. For tests of the generator.
    #[doc(hidden)]
    pub fn gpu_philox_words(
        &mut self,
        noise: &GaussianNoise,
        first: u64,
        count: u32,
    ) -> Result<Vec<u32>> {
        self.begin_call();
        self.gpu_engine()?.noise_words(noise, first, count, false)
    }

    /// The standard normals (before scaling) the GPU noise pass adds to output
    /// elements `first..first + count`; compare with
    /// [`crate::noise::standard_normal`]. For tests of the transform's precision.
    #[doc(hidden)]
    pub fn gpu_standard_normals(
        &mut self,
        noise: &GaussianNoise,
        first: u64,
        count: u32,
    ) -> Result<Vec<f32>> {
        self.begin_call();
        let words = self.gpu_engine()?.noise_words(noise, first, count, true)?;
        Ok(words.into_iter().map(f32::from_bits).collect())
    }

    /// Forgets the last call's device time and dispatch counts, so that a call
    /// that fails leaves none.
    fn begin_call(&mut self) {
        if let Engine::Gpu(gpu) = &mut self.engine {
            gpu.forget_last_call();
        }
    }

    /// The GPU engine, `None` on the CPU.
    fn gpu(&self) -> Option<&GpuClipper> {
        match &self.engine {
            Engine::Gpu(gpu) => Some(gpu),
            Engine::Cpu(_) => None,
        }
    }

    fn gpu_engine(&mut self) -> Result<&mut GpuClipper> {
        match &mut self.engine {
            Engine::Gpu(gpu) => Ok(gpu),
            Engine::Cpu(_) => Err(ClipError::NotGpu),
        }
    }
}

/// The checks of a call on caller buffers before it takes any memory, and the
/// row offsets and tensor groups they give: the configuration, `n_samples`, and
/// the inputs before the offsets, whose vector a wrong `n_samples` could make
/// huge (every input must hold `n_samples` rows, fewer than 2^32 - 1).
fn buffer_call_layout(
    gpu: &GpuClipper,
    config: &ClipConfig,
    inputs: &[GpuTensor<'_>],
    n_samples: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    config.validate()?;
    if n_samples == 0 {
        return Err(ClipError::NoSamples);
    }
    gpu.check_inputs(n_samples as u64, inputs)?;
    Ok((
        config.row_offsets(n_samples)?,
        config.tensor_groups(inputs.len())?,
    ))
}

fn gpu_required() -> bool {
    std::env::var(crate::REQUIRE_GPU_ENV).is_ok_and(|v| v == "1")
}
