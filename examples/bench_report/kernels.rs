//! The bench's own GPU code: a device context, the reference kernels
//! (`reference.wgsl`: vec4 read-and-sum, vec4 copy) and the 5-pass baseline
//! (`baseline.wgsl`). Every kernel binds its big buffers in windows of at most
//! `Gpu::max_binding` bytes (the device's `max_storage_buffer_binding_size`
//! unless overridden) and dispatches once per window.
//!
//! Work is prepared once into a [`Job`] (pipelines, bind groups, uniforms) so that a
//! timed run is only: encode the dispatches, submit, block until the queue is idle.
//! With the timer on ([`Gpu::enable_timer`]) a run also returns the device time of
//! its pass, from timestamps written at the pass's beginning and end.
//!
//! Self-contained (wgpu, bytemuck, pollster, std) so that `benches/clip.rs` can
//! include it with `#[path]`.

use wgpu::util::DeviceExt;
use wgpu::BufferUsages as U;

// The crate's own pass timer (timestamp queries), shared rather than copied.
#[path = "../../src/gpu/timer.rs"]
mod timer;
use timer::{PassTimer, TIMER_BYTES};

const REFERENCE_WGSL: &str = include_str!("reference.wgsl");
const BASELINE_WGSL: &str = include_str!("baseline.wgsl");

/// Workgroup size of every bench kernel.
const WG: u64 = 256;
/// vec4 per thread in the reference kernels (`ITEMS` in reference.wgsl).
const ITEMS: u64 = 16;
/// `ITEMS` of the read-and-sum on a software adapter (8 threads x 512 vec4).
const SOFTWARE_ITEMS: u64 = 512;
// read_sum's unchecked loop takes 8 vec4 per iteration.
const _: () = assert!(ITEMS.is_multiple_of(8) && SOFTWARE_ITEMS.is_multiple_of(8));
/// Largest workgroup count of one dispatch dimension.
const MAX_GROUPS: u64 = 65535;

/// A device and queue with the limits the bench kernels respect.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// Most bytes one storage binding may cover.
    pub max_binding: u64,
    pub storage_align: u64,
    pub uniform_align: u64,
    /// A software adapter (`DeviceType::Cpu`, e.g. lavapipe).
    pub software: bool,
    /// Times each pass of [`Self::run_pass`] when set (see [`Self::enable_timer`]),
    /// with the buffer its two timestamps are copied to.
    timer: Option<(PassTimer, wgpu::Buffer)>,
}

impl Gpu {
    /// `max_binding`: an override (smaller than the device's) to exercise windows.
    pub fn new(device: wgpu::Device, queue: wgpu::Queue, max_binding: Option<u64>) -> Self {
        let limits = device.limits();
        let device_max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Self {
            max_binding: max_binding.map_or(device_max, |m| m.min(device_max)),
            storage_align: limits.min_storage_buffer_offset_alignment as u64,
            uniform_align: limits.min_uniform_buffer_offset_alignment as u64,
            software: device.adapter_info().device_type == wgpu::DeviceType::Cpu,
            timer: None,
            device,
            queue,
        }
    }

    /// Times every later [`Self::run_pass`] with timestamp queries; returns whether
    /// it can (the device has `TIMESTAMP_QUERY`).
    pub fn enable_timer(&mut self) -> bool {
        if self.timer.is_none() {
            self.timer = PassTimer::new(&self.device, &self.queue).map(|t| {
                let stamps = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bench timestamps"),
                    size: TIMER_BYTES,
                    usage: U::MAP_READ | U::COPY_DST,
                    mapped_at_creation: false,
                });
                (t, stamps)
            });
        }
        self.timer.is_some()
    }

    /// Records one compute pass with `record`, submits it and blocks until the
    /// queue is idle (the timed unit). With the timer on and `timed`: returns the
    /// pass's device time in ms (NaN when the driver's timestamps were not in
    /// order), read back after the pass; else `None` (time it by the wall clock).
    pub fn run_pass(
        &self,
        timed: bool,
        record: impl FnOnce(&mut wgpu::ComputePass<'_>),
    ) -> Option<f64> {
        let timer = self.timer.as_ref().filter(|_| timed);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench"),
                timestamp_writes: timer.map(|(t, _)| t.writes()),
            });
            record(&mut pass);
        }
        if let Some((t, stamps)) = timer {
            t.copy_to(&mut encoder, stamps, 0);
        }
        self.queue.submit([encoder.finish()]);
        self.wait();
        let (t, stamps) = timer?;
        stamps.map_async(wgpu::MapMode::Read, .., |r| r.expect("map timestamps"));
        self.wait();
        let ms = t
            .elapsed(&stamps.get_mapped_range(..).expect("mapped timestamps"))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        stamps.unmap();
        Some(ms)
    }

    /// A `STORAGE | COPY_SRC | COPY_DST` buffer, or the device's error (e.g. out of
    /// memory, larger than `max_buffer_size`) as a string.
    pub fn storage_buffer(&self, label: &str, size: u64) -> Result<wgpu::Buffer, String> {
        let max = self.device.limits().max_buffer_size;
        if size > max {
            return Err(format!(
                "{label}: {size} bytes exceed max_buffer_size ({max})"
            ));
        }
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(16).next_multiple_of(16),
            usage: U::STORAGE | U::COPY_SRC | U::COPY_DST,
            mapped_at_creation: false,
        });
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        match v.or(o) {
            Some(e) => Err(format!("{label} ({size} bytes): {e}")),
            None => Ok(buffer),
        }
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self) {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("device poll");
    }

    /// Copies `len` bytes from `offset` of `buffer` (needs `COPY_SRC`) to the host.
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, offset: u64, len: u64) -> Vec<u8> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench readback"),
            size: len.next_multiple_of(4),
            usage: U::MAP_READ | U::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, len.next_multiple_of(4));
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait();
        rx.recv().expect("map callback").expect("map buffer");
        let bytes = staging.get_mapped_range(..).expect("mapped range")[..len as usize].to_vec();
        staging.unmap();
        bytes
    }

    /// `len` f32 from element `first` of `buffer`.
    pub fn read_f32(&self, buffer: &wgpu::Buffer, first: u64, len: u64) -> Vec<f32> {
        bytemuck::cast_slice(&self.read_bytes(buffer, first * 4, len * 4)).to_vec()
    }

    /// A compute pipeline from `source`, entry point `entry`, automatic layout.
    fn pipeline(&self, source: &str, entry: &str) -> wgpu::ComputePipeline {
        self.pipeline_with(source, entry, &[])
    }

    /// [`Self::pipeline`] with pipeline-overridable constants.
    fn pipeline_with(
        &self,
        source: &str,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> wgpu::ComputePipeline {
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(entry),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        self.device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            })
    }
}

/// Splits `groups` workgroups into `(x, y)` with `x * y >= groups`.
fn dispatch_2d(groups: u64) -> (u32, u32) {
    let x = groups.clamp(1, MAX_GROUPS);
    let y = groups.div_ceil(x).max(1);
    assert!(y <= MAX_GROUPS, "{groups} workgroups exceed one dispatch");
    (x as u32, y as u32)
}

/// A byte range `[offset, offset + len)` bound from an aligned start: (bind offset,
/// bind size, element index of `offset` inside the binding).
fn aligned(offset: u64, len: u64, align: u64) -> (u64, u64, u32) {
    let start = offset - offset % align;
    (start, offset + len - start, ((offset - start) / 4) as u32)
}

/// Uniform blocks packed at the device's uniform offset alignment, in one buffer.
struct Uniforms {
    align: u64,
    bytes: Vec<u8>,
}

impl Uniforms {
    fn new(align: u64) -> Self {
        Self {
            align,
            bytes: Vec::new(),
        }
    }

    /// Appends a block; returns its offset.
    fn push<T: bytemuck::Pod>(&mut self, block: &T) -> u64 {
        let at = (self.bytes.len() as u64).next_multiple_of(self.align);
        self.bytes.resize(at as usize, 0);
        self.bytes.extend_from_slice(bytemuck::bytes_of(block));
        at
    }

    fn upload(&self, gpu: &Gpu) -> wgpu::Buffer {
        gpu.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("bench uniforms"),
                contents: &self.bytes,
                usage: U::UNIFORM,
            })
    }
}

/// One resource of a bind group: a uniform block, a buffer range, a whole buffer.
enum Res<'a> {
    Uniform(u64, u64),
    Range(&'a wgpu::Buffer, u64, u64),
    Whole(&'a wgpu::Buffer),
}

fn bind_group(
    gpu: &Gpu,
    pipeline: &wgpu::ComputePipeline,
    uniforms: &wgpu::Buffer,
    entries: &[(u32, Res<'_>)],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = entries
        .iter()
        .map(|(binding, res)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: match res {
                Res::Uniform(at, size) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: uniforms,
                    offset: *at,
                    size: wgpu::BufferSize::new(*size),
                }),
                Res::Range(buffer, at, size) => {
                    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: *at,
                        size: wgpu::BufferSize::new(*size),
                    })
                }
                Res::Whole(buffer) => buffer.as_entire_binding(),
            },
        })
        .collect();
    gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// One dispatch of a job.
struct Step {
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    groups: (u32, u32, u32),
}

/// Prepared dispatches, run in order in one compute pass.
pub struct Job {
    steps: Vec<Step>,
    _uniforms: wgpu::Buffer,
}

impl Job {
    /// Runs the dispatches in one pass ([`Gpu::run_pass`]): its device time in ms
    /// when the timer is on.
    pub fn run(&self, gpu: &Gpu) -> Option<f64> {
        self.run_pass(gpu, true)
    }

    /// [`Self::run`] without timestamps, for rows timed by the wall clock (no
    /// read-back of the timestamps after the pass).
    pub fn run_untimed(&self, gpu: &Gpu) {
        self.run_pass(gpu, false);
    }

    fn run_pass(&self, gpu: &Gpu, timed: bool) -> Option<f64> {
        gpu.run_pass(timed, |pass| {
            for s in &self.steps {
                pass.set_pipeline(&s.pipeline);
                pass.set_bind_group(0, &s.group, &[]);
                pass.dispatch_workgroups(s.groups.0, s.groups.1, s.groups.2);
            }
        })
    }

    /// Number of dispatches.
    pub fn dispatches(&self) -> usize {
        self.steps.len()
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RefParams {
    count: u32,
    groups: u32,
    groups_x: u32,
    out_base: u32,
}

/// The read-and-sum and copy pipelines.
pub struct RefKernels {
    read_sum: wgpu::ComputePipeline,
    copy: wgpu::ComputePipeline,
}

/// A prepared read-and-sum over a buffer: the job and where its partial sums go.
pub struct ReadSum {
    pub job: Job,
    partials: wgpu::Buffer,
    n_partials: u64,
    /// Bytes read per run (a multiple of 16).
    pub bytes: u64,
}

impl ReadSum {
    /// The sum of what the last run read (f64 over the per-workgroup partials).
    pub fn result(&self, gpu: &Gpu) -> f64 {
        gpu.read_f32(&self.partials, 0, self.n_partials)
            .iter()
            .map(|&v| v as f64)
            .sum()
    }
}

impl RefKernels {
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            // One SIMD group per workgroup on a software adapter (see reference.wgsl);
            // the same 64 KiB per workgroup either way.
            read_sum: gpu.pipeline_with(
                REFERENCE_WGSL,
                "read_sum",
                if gpu.software {
                    &[("WG", 8.0), ("ITEMS", SOFTWARE_ITEMS as f64)]
                } else {
                    &[]
                },
            ),
            copy: gpu.pipeline(REFERENCE_WGSL, "copy"),
        }
    }

    /// Windows of a `bytes`-long range from offset 0: (offset, len), each a multiple
    /// of 16 bytes and at most one binding. Trailing bytes past a multiple of 16 are
    /// left out (at most 12).
    fn windows(gpu: &Gpu, bytes: u64) -> Vec<(u64, u64)> {
        let step = (gpu.max_binding / 256 * 256)
            .min(u32::MAX as u64 / 256 * 256)
            .max(256);
        assert!(
            step.is_multiple_of(gpu.storage_align),
            "window step not aligned"
        );
        let total = bytes / 16 * 16;
        (0..total)
            .step_by(step as usize)
            .map(|at| (at, step.min(total - at)))
            .collect()
    }

    fn groups(len: u64) -> u64 {
        (len / 16).div_ceil(WG * ITEMS)
    }

    /// A read-and-sum over bytes `[0, bytes)` of `src`.
    pub fn read_sum(&self, gpu: &Gpu, src: &wgpu::Buffer, bytes: u64) -> ReadSum {
        let windows = Self::windows(gpu, bytes);
        let n_partials: u64 = windows.iter().map(|&(_, len)| Self::groups(len)).sum();
        let partials = gpu
            .storage_buffer("read_sum partials", n_partials * 4)
            .expect("partials buffer");
        let mut uniforms = Uniforms::new(gpu.uniform_align);
        let mut blocks = Vec::new();
        let mut base = 0u64;
        for &(_, len) in &windows {
            let groups = Self::groups(len);
            let (x, y) = dispatch_2d(groups);
            blocks.push((
                uniforms.push(&RefParams {
                    count: (len / 16) as u32,
                    groups: groups as u32,
                    groups_x: x,
                    out_base: base as u32,
                }),
                (x, y),
            ));
            base += groups;
        }
        let ubuf = uniforms.upload(gpu);
        let steps = windows
            .iter()
            .zip(&blocks)
            .map(|(&(at, len), &(u, (x, y)))| Step {
                group: bind_group(
                    gpu,
                    &self.read_sum,
                    &ubuf,
                    &[
                        (0, Res::Uniform(u, 16)),
                        (1, Res::Range(src, at, len)),
                        (2, Res::Whole(&partials)),
                    ],
                ),
                pipeline: self.read_sum.clone(),
                groups: (x, y, 1),
            })
            .collect();
        ReadSum {
            job: Job {
                steps,
                _uniforms: ubuf,
            },
            partials,
            n_partials,
            bytes: bytes / 16 * 16,
        }
    }

    /// A copy of bytes `[0, bytes)` of `src` into `dst`.
    pub fn copy(&self, gpu: &Gpu, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: u64) -> Job {
        let windows = Self::windows(gpu, bytes);
        let mut uniforms = Uniforms::new(gpu.uniform_align);
        let blocks: Vec<_> = windows
            .iter()
            .map(|&(_, len)| {
                let groups = Self::groups(len);
                let (x, y) = dispatch_2d(groups);
                let u = uniforms.push(&RefParams {
                    count: (len / 16) as u32,
                    groups: groups as u32,
                    groups_x: x,
                    out_base: 0,
                });
                (u, (x, y))
            })
            .collect();
        let ubuf = uniforms.upload(gpu);
        let steps = windows
            .iter()
            .zip(&blocks)
            .map(|(&(at, len), &(u, (x, y)))| Step {
                group: bind_group(
                    gpu,
                    &self.copy,
                    &ubuf,
                    &[
                        (0, Res::Uniform(u, 16)),
                        (1, Res::Range(src, at, len)),
                        (3, Res::Range(dst, at, len)),
                    ],
                ),
                pipeline: self.copy.clone(),
                groups: (x, y, 1),
            })
            .collect();
        Job {
            steps,
            _uniforms: ubuf,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BaselineParams {
    cols: u32,
    n: u32,
    b: u32,
    m: u32,
    mb_first: u32,
    mb_count: u32,
    x_elem: u32,
    mb_elem: u32,
    groups_x: u32,
    accumulate: u32,
    clip: f32,
    pad: u32,
}

/// The five pipelines of the eager-style baseline.
pub struct Baseline {
    mean: wgpu::ComputePipeline,
    sq_norm: wgpu::ComputePipeline,
    factor: wgpu::ComputePipeline,
    scale: wgpu::ComputePipeline,
    mean_out: wgpu::ComputePipeline,
}

/// A prepared baseline run over one `[N, D]` tensor.
pub struct BaselineJob {
    pub job: Job,
    /// `out` (D f32), `COPY_SRC`.
    pub out: wgpu::Buffer,
    /// Intermediates held on the device: means, squared norms, factors, scaled means.
    pub extra_bytes: u64,
    /// Bytes the five kernels read and write per run.
    pub moved_bytes: u64,
    _scratch: Vec<wgpu::Buffer>,
}

impl Baseline {
    pub fn new(gpu: &Gpu) -> Self {
        Self {
            mean: gpu.pipeline(BASELINE_WGSL, "mb_mean"),
            sq_norm: gpu.pipeline(BASELINE_WGSL, "sq_norm"),
            factor: gpu.pipeline(BASELINE_WGSL, "clip_factor"),
            scale: gpu.pipeline(BASELINE_WGSL, "scale"),
            mean_out: gpu.pipeline(BASELINE_WGSL, "mean_out"),
        }
    }

    /// Prepares the five passes for `x` (`[n, d]` f32 from offset 0), micro-batches
    /// of `b` rows, clip bound `clip`. Fails when a buffer cannot be created or one
    /// micro-batch does not fit in a binding.
    pub fn prepare(
        &self,
        gpu: &Gpu,
        x: &wgpu::Buffer,
        n: usize,
        d: usize,
        b: usize,
        clip: f32,
    ) -> Result<BaselineJob, String> {
        let (n, d, b) = (n as u64, d as u64, b as u64);
        let m = n.div_ceil(b);
        let row = d * 4;
        let usable = gpu.max_binding.saturating_sub(gpu.storage_align - 4);
        let mb_per_window = (usable / (b * row)).min(MAX_GROUPS);
        if mb_per_window == 0 {
            return Err(format!(
                "one micro-batch ({} bytes) exceeds a storage binding ({} bytes)",
                b * row,
                gpu.max_binding
            ));
        }
        let means = gpu.storage_buffer("baseline means", m * row)?;
        let scaled = gpu.storage_buffer("baseline scaled", m * row)?;
        let sq = gpu.storage_buffer("baseline sq_norms", m * 4)?;
        let factors = gpu.storage_buffer("baseline factors", m * 4)?;
        let out = gpu.storage_buffer("baseline out", row)?;
        let extra_bytes = means.size() + scaled.size() + sq.size() + factors.size();

        let (gx, gy) = dispatch_2d(d.div_ceil(WG));
        let mut uniforms = Uniforms::new(gpu.uniform_align);
        // (uniform, x binding, mb binding, mb_count)
        let mut windows = Vec::new();
        let mut mb_first = 0;
        while mb_first < m {
            let mb_count = mb_per_window.min(m - mb_first);
            let rows = ((mb_first + mb_count) * b).min(n) - mb_first * b;
            let (x_at, x_len, x_elem) = aligned(mb_first * b * row, rows * row, gpu.storage_align);
            let (m_at, m_len, mb_elem) = aligned(mb_first * row, mb_count * row, gpu.storage_align);
            let u = uniforms.push(&BaselineParams {
                cols: d as u32,
                n: n as u32,
                b: b as u32,
                m: m as u32,
                mb_first: mb_first as u32,
                mb_count: mb_count as u32,
                x_elem,
                mb_elem,
                groups_x: gx,
                accumulate: (mb_first > 0) as u32,
                clip,
                pad: 0,
            });
            windows.push((u, (x_at, x_len), (m_at, m_len), mb_count as u32));
            mb_first += mb_count;
        }
        let factor_block = uniforms.push(&BaselineParams {
            cols: d as u32,
            n: n as u32,
            b: b as u32,
            m: m as u32,
            mb_first: 0,
            mb_count: m as u32,
            x_elem: 0,
            mb_elem: 0,
            groups_x: 0,
            accumulate: 0,
            clip,
            pad: 0,
        });
        let ubuf = uniforms.upload(gpu);
        let size = std::mem::size_of::<BaselineParams>() as u64;
        let step = |p: &wgpu::ComputePipeline, entries: &[(u32, Res<'_>)], groups| Step {
            pipeline: p.clone(),
            group: bind_group(gpu, p, &ubuf, entries),
            groups,
        };
        let mut steps = Vec::new();
        for &(u, (xa, xl), (ma, ml), c) in &windows {
            steps.push(step(
                &self.mean,
                &[
                    (0, Res::Uniform(u, size)),
                    (1, Res::Range(x, xa, xl)),
                    (2, Res::Range(&means, ma, ml)),
                ],
                (gx, gy, c),
            ));
        }
        for &(u, _, (ma, ml), c) in &windows {
            steps.push(step(
                &self.sq_norm,
                &[
                    (0, Res::Uniform(u, size)),
                    (2, Res::Range(&means, ma, ml)),
                    (3, Res::Whole(&sq)),
                ],
                (c, 1, 1),
            ));
        }
        steps.push(step(
            &self.factor,
            &[
                (0, Res::Uniform(factor_block, size)),
                (3, Res::Whole(&sq)),
                (4, Res::Whole(&factors)),
            ],
            (m.div_ceil(WG) as u32, 1, 1),
        ));
        for &(u, _, (ma, ml), c) in &windows {
            steps.push(step(
                &self.scale,
                &[
                    (0, Res::Uniform(u, size)),
                    (2, Res::Range(&means, ma, ml)),
                    (4, Res::Whole(&factors)),
                    (5, Res::Range(&scaled, ma, ml)),
                ],
                (gx, gy, c),
            ));
        }
        for &(u, _, (ma, ml), _) in &windows {
            steps.push(step(
                &self.mean_out,
                &[
                    (0, Res::Uniform(u, size)),
                    (5, Res::Range(&scaled, ma, ml)),
                    (6, Res::Whole(&out)),
                ],
                (gx, gy, 1),
            ));
        }
        // x read; means written, read twice; scaled written, read; out written.
        let moved_bytes = n * row + 5 * m * row + row;
        Ok(BaselineJob {
            job: Job {
                steps,
                _uniforms: ubuf,
            },
            out,
            extra_bytes,
            moved_bytes,
            _scratch: vec![means, scaled, sq, factors],
        })
    }
}
