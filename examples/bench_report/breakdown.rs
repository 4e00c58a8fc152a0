//! `--breakdown`: where microclip's time goes, per kernel.
//!
//! Replays microclip's two big kernels, `mb_partials` and pass 4 (`weighted_means`
//! re-reading the N rows with per-row weights from `row_weights`, untimed, or
//! reading the M means that `mb_partials` wrote, when b >= 3 as in microclip's
//! `materialize_means` rule;
//! sources from `microclip::shaders::kernel_source`, parameter blocks laid out as
//! in the WGSL), each as its own submit, on a shape that fits one storage binding
//! (no row windows, no carry). Where the clipper cuts pass 4's rows into row
//! chunks (`Clipper::gpu_pass4_chunk_rows`), pass 4 is the chunk dispatch and
//! the sum of its partial rows, in one submit. Pass 4 gets the weights `s_j / M` from the
//! statistics of a real call, and its output is compared with microclip's (a
//! mismatch means the replayed layout is stale: the breakdown is then skipped, the
//! report goes on). "rest" = full call - both kernels: the tiny
//! `mb_norms` and `clip_factors` dispatches plus host-side encoding, submit and the
//! read-back of the statistics.

use microclip::{ClipConfig, Clipper, GpuTensor, GpuTensorMut, MicroBatches};
use wgpu::util::DeviceExt;

use crate::data;
use crate::kernels::{Gpu, RefKernels};
use crate::report::{interleaved, median};

/// The narrowest column tile of mb_partials.wgsl (D is cut to a multiple of it).
const TILE: usize = 4096;

/// `Params` of mb_partials.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct PartialsParams {
    cols: u32,
    elem_offset: u32,
    row_start: u32,
    row_end: u32,
    mb_first: u32,
    tiles: u32,
    tiles_x: u32,
    tile_base: u32,
    tiles_total: u32,
    carry_in: u32,
    carry_out: u32,
    last_local: u32,
    vec4_path: u32,
    write_means: u32,
    means_base: u32,
    tile_cols: u32,
    means_stride: u32,
    first_tile: u32,
    entries: u32,
    dispatch_tiles: u32,
    slot: u32,
    pad: [u32; 3],
}

/// Entries of mb_partials.wgsl's tensor table (`TABLE_LEN`).
const TABLE_LEN: usize = 32;

/// `Params` of weighted_means.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct MeansSumParams {
    cols: u32,
    means_base: u32,
    rows: u32,
    groups_x: u32,
    out_offset: u32,
    skip_zero: u32,
    vec4_path: u32,
    groups: u32,
    group: u32,
    stride: u32,
    weights_base: u32,
    accumulate: u32,
    first_group: u32,
    entries: u32,
    dispatch_groups: u32,
    slot: u32,
}

/// `Params` of row_weights.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct RowWeightsParams {
    rows: u32,
    micro_batches: u32,
    groups: u32,
    groups_x: u32,
}

/// One kernel with its bind group and dispatch, run as one submit.
struct Single {
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    groups: (u32, u32, u32),
}

impl Single {
    fn new(
        gpu: &Gpu,
        kernel: &str,
        resources: &[wgpu::BindingResource<'_>],
        groups: (u32, u32, u32),
        constants: &[(&str, f64)],
    ) -> Self {
        let source = microclip::shaders::kernel_source(kernel).expect("kernel");
        let module = gpu
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(kernel),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = gpu
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                // The constants microclip builds this kernel with.
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            });
        let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: r.clone(),
            })
            .collect();
        let group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Self {
            pipeline,
            group,
            groups,
        }
    }

    /// One dispatch in its own pass: its device time in ms when timed.
    fn run(&self, gpu: &Gpu) -> Option<f64> {
        run_all(gpu, std::slice::from_ref(self))
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.group, &[]);
        pass.dispatch_workgroups(self.groups.0, self.groups.1, self.groups.2);
    }
}

/// Dispatches one after the other in one pass: their device time in ms when timed.
fn run_all(gpu: &Gpu, kernels: &[Single]) -> Option<f64> {
    gpu.run_pass(true, |pass| {
        for k in kernels {
            k.record(pass);
        }
    })
}

/// A `weighted_means` dispatch from its buffers [parameter table, rows (bound as
/// `grads` and `grads4`), weights, output, partial rows (the `ROW_CHUNKS`
/// variant's; a stand-in otherwise)], as microclip binds them.
fn weighted_means(
    gpu: &Gpu,
    [table, rows, weights, out, partials]: [&wgpu::Buffer; 5],
    (x, y): (u32, u32),
    constants: &[(&str, f64)],
) -> Single {
    Single::new(
        gpu,
        "weighted_means",
        &[
            table.as_entire_binding(),
            rows.as_entire_binding(),
            weights.as_entire_binding(),
            out.as_entire_binding(),
            rows.as_entire_binding(),
            partials.as_entire_binding(),
        ],
        (x, y, 1),
        constants,
    )
}

fn split(groups: u64) -> (u32, u32) {
    let x = groups.clamp(1, 65535);
    (x as u32, groups.div_ceil(x).max(1) as u32)
}

fn uniform<T: bytemuck::Pod>(gpu: &Gpu, block: &T) -> wgpu::Buffer {
    gpu.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("breakdown params"),
            contents: bytemuck::bytes_of(block),
            usage: wgpu::BufferUsages::UNIFORM,
        })
}

fn storage_init(gpu: &Gpu, bytes: &[u8]) -> wgpu::Buffer {
    gpu.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("breakdown data"),
            contents: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
}

/// Runs the breakdown for each b on `[n, d]` (shrunk to one binding); returns
/// markdown lines.
pub fn run(
    gpu: &Gpu,
    refk: &RefKernels,
    n: usize,
    d: usize,
    bs: &[usize],
    opts: &crate::cases::Opts,
    timed: bool,
) -> Result<Vec<String>, String> {
    let (warmup, runs) = (opts.warmup, opts.runs);
    // One binding, no windows: N x D x 4 <= max_binding - (align - 4).
    let usable = gpu.max_binding.saturating_sub(gpu.storage_align) as usize;
    let d = d.min(usable / (n * 4) / TILE * TILE).max(TILE);
    let x = data::device_tensor(gpu, 0xb4ea, 0, n, d)?;
    let bytes = (n * d * 4) as u64;
    let reference = refk.read_sum(gpu, &x, bytes);
    let out = gpu.storage_buffer("breakdown out (microclip)", (d * 4) as u64)?;
    let mut lines = vec![
        String::new(),
        format!("## per-kernel breakdown (N = {n}, D = {d}, one binding; median of {runs} runs, each kernel its own submit; pass 4 in row chunks: the chunks and their sum in one)"),
        String::new(),
        "| b | M | full call ms | mb_partials ms | pass 4 ms | rest ms | read-sum ms | mb_partials / read | pass 4 / read | pass 4 | workgroups (partials, sum) |".to_string(),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|".to_string(),
    ];
    for &b in bs.iter().filter(|&&b| b <= n) {
        let m = n.div_ceil(b);
        let mut clipper = Clipper::from_device(gpu.device.clone(), gpu.queue.clone())
            .map_err(|e| e.to_string())?;
        // Timed like the replayed kernels (device times when the bench's are).
        clipper.set_gpu_timing(timed);
        let input = [GpuTensor::new(&x, 0, d)];
        let output = [GpuTensorMut {
            buffer: &out,
            offset: 0,
            cols: d,
        }];
        let probe = clipper
            .clip_buffers_into(
                &ClipConfig::fixed(f32::MAX, MicroBatches::Uniform(b)),
                &input,
                n,
                &output,
            )
            .map_err(|e| e.to_string())?;
        let mut sorted = probe.norms.clone();
        sorted.sort_by(f32::total_cmp);
        let cfg = ClipConfig::fixed(
            sorted[m / 2].max(f32::MIN_POSITIVE),
            MicroBatches::Uniform(b),
        );
        let stats = clipper
            .clip_buffers_into(&cfg, &input, n, &output)
            .map_err(|e| e.to_string())?;
        let want = gpu.read_f32(&out, 0, d as u64);

        let offsets: Vec<u32> = (0..m).map(|j| (j * b) as u32).chain([n as u32]).collect();
        let offsets = storage_init(gpu, bytemuck::cast_slice(&offsets));
        // Weight pairs (1, s_j / M): the factors here are ordinary (see
        // clip_factors.wgsl's EXTREME_LOG2).
        let weights: Vec<f32> = stats
            .factors
            .iter()
            .flat_map(|&s| [1.0, s / m as f32])
            .collect();
        let weights = storage_init(gpu, bytemuck::cast_slice(&weights));
        // The tile width microclip chose for this call.
        let tile_cols = clipper
            .gpu_tile_cols(&[d], m, b.min(n))
            .ok_or("not a GPU clipper")?;
        let tiles = (d as u64).div_ceil(tile_cols);
        let (tx, ty) = split(tiles);
        let partials = gpu.storage_buffer("breakdown partials", m as u64 * tiles * 16)?;
        let carry_in = gpu.storage_buffer("breakdown carry in", 16)?;
        let carry_out = gpu.storage_buffer("breakdown carry out", 16)?;
        // microclip's rule (plan.rs `materialize_means`): from b >= 3 (the clipper
        // says, tests may change it) pass 1 writes the means and pass 4 is
        // weighted_means over them.
        let min_rows = clipper.gpu_means_min_rows().ok_or("not a GPU clipper")? as usize;
        let small = clipper.gpu_small_workgroups().ok_or("not a GPU clipper")?;
        // The means' rows are padded to whole quads (plan.rs `means_cols`).
        let d4 = d.next_multiple_of(4);
        // How microclip loads the input rows (`load_path` in src/gpu/dispatch.rs): vec4
        // when D is a multiple of 4, else on a software adapter aligned loads
        // shifted into place when the buffer holds whole quads, else scalars.
        let input_path = if d.is_multiple_of(4) {
            1
        } else if small && x.size().is_multiple_of(16) {
            2
        } else {
            0
        };
        let with_means = n >= min_rows * m && (m * d4 * 4) as u64 <= gpu.max_binding;
        let means = gpu.storage_buffer(
            "breakdown means",
            if with_means { (m * d4 * 4) as u64 } else { 16 },
        )?;
        // A table of one entry (TABLE_LEN copies of it; entries = 1).
        let pp = uniform(
            gpu,
            &[PartialsParams {
                cols: d as u32,
                row_end: n as u32,
                tiles: tiles as u32,
                tiles_x: tx,
                tiles_total: tiles as u32,
                last_local: (m - 1) as u32,
                vec4_path: input_path,
                write_means: with_means as u32,
                tile_cols: tile_cols as u32,
                means_stride: d4 as u32,
                entries: 1,
                dispatch_tiles: tiles as u32,
                ..Default::default()
            }; TABLE_LEN],
        );
        let part = Single::new(
            gpu,
            "mb_partials",
            &[
                pp.as_entire_binding(),
                x.as_entire_binding(),
                offsets.as_entire_binding(),
                partials.as_entire_binding(),
                carry_in.as_entire_binding(),
                x.as_entire_binding(),
                means.as_entire_binding(),
                carry_out.as_entire_binding(),
            ],
            (tx, ty, m as u32),
            // The build microclip runs (`pass1_variants` in src/gpu/layout.rs): rows
            // aligned or not as the loads say, no carry (one window), the
            // means stored or not for the whole call, and deep where
            // micro-batches of more than CHUNK_ROWS rows store means.
            &microclip::shaders::partials_constants(
                small,
                microclip::shaders::PartialsVariant {
                    deep: with_means && b.min(n) > microclip::shaders::CHUNK_ROWS as usize,
                    aligned: input_path == 1,
                    no_carry: true,
                    stores_means: Some(with_means),
                },
            ),
        );
        let replay_out = gpu.storage_buffer("breakdown out (replay)", (d * 4) as u64)?;
        // Without stored means pass 4 reads the N input rows, each with its
        // micro-batch's weight over its size (the micro-batch weights at b = 1).
        let row_weights = if with_means || m == n {
            None
        } else {
            let rw = gpu.storage_buffer("breakdown row weights", (n * 8) as u64)?;
            let (rx, ry) = split((n as u64).div_ceil(256));
            let rp = uniform(
                gpu,
                &RowWeightsParams {
                    rows: n as u32,
                    micro_batches: m as u32,
                    groups: 1,
                    groups_x: rx,
                },
            );
            Single::new(
                gpu,
                "row_weights",
                &[
                    rp.as_entire_binding(),
                    offsets.as_entire_binding(),
                    weights.as_entire_binding(),
                    rw.as_entire_binding(),
                ],
                (rx, ry, 1),
                microclip::shaders::kernel_constants("row_weights", small),
            )
            .run(gpu);
            Some(rw)
        };
        // Over the input rows microclip walks them in chunks of about
        // `chunk_rows` rows when there are at least two (`chunk_rows_table` in
        // src/gpu/plan.rs: round(n / chunk_rows) chunks of nearly equal rows,
        // none over 64): one dispatch sums each chunk into a partial row, a
        // second one adds those up with weight 1.
        let chunk_rows = clipper.gpu_pass4_chunk_rows().ok_or("not a GPU clipper")? as usize;
        let chunks = if !with_means && chunk_rows > 0 && n >= 2 * chunk_rows {
            ((n + chunk_rows / 2) / chunk_rows).max(n.div_ceil(64))
        } else {
            1
        };
        // Rows of chunk c and its first row.
        let chunk = |c: usize| {
            (
                n / chunks + usize::from(c < n % chunks),
                c * (n / chunks) + c.min(n % chunks),
            )
        };
        if chunks > TABLE_LEN {
            return Err(format!("breakdown: {chunks} row chunks exceed one table"));
        }
        let groups_per = (d as u64).div_ceil(2048);
        let partial_rows =
            gpu.storage_buffer("breakdown chunk partials", (chunks * d4 * 4) as u64)?;
        let ones = storage_init(gpu, bytemuck::cast_slice(&vec![1.0f32; 2 * chunks]));
        // Pass 4's partial rows where a dispatch writes none.
        let no_partials = gpu.storage_buffer("breakdown no partials", 16)?;
        let sum = if chunks > 1 {
            let (mx, my) = split(chunks as u64 * groups_per);
            let mut table = [MeansSumParams::default(); TABLE_LEN];
            for (c, e) in table.iter_mut().take(chunks).enumerate() {
                let (rows, first) = chunk(c);
                *e = MeansSumParams {
                    cols: d as u32,
                    means_base: (first * d) as u32,
                    rows: rows as u32,
                    out_offset: (c * d4) as u32,
                    skip_zero: 1,
                    vec4_path: input_path,
                    groups: 1,
                    stride: d as u32,
                    weights_base: first as u32,
                    first_group: (c as u64 * groups_per) as u32,
                    ..Default::default()
                };
            }
            table[0].groups_x = mx;
            table[0].entries = chunks as u32;
            table[0].dispatch_groups = (chunks as u64 * groups_per) as u32;
            let cp = uniform(gpu, &table);
            let (rx, ry) = split(groups_per);
            let rp = uniform(
                gpu,
                &[MeansSumParams {
                    cols: d as u32,
                    rows: chunks as u32,
                    groups_x: rx,
                    vec4_path: 1,
                    groups: 1,
                    stride: d4 as u32,
                    entries: 1,
                    dispatch_groups: groups_per as u32,
                    ..Default::default()
                }; TABLE_LEN],
            );
            vec![
                weighted_means(
                    gpu,
                    [
                        &cp,
                        &x,
                        row_weights.as_ref().unwrap_or(&weights),
                        &replay_out,
                        &partial_rows,
                    ],
                    (mx, my),
                    // microclip's build for the dispatch's rows (aligned or not;
                    // with row runs where rows have per-row weights).
                    &microclip::shaders::weighted_means_constants(
                        small,
                        true,
                        input_path == 1,
                        row_weights.is_some(),
                    ),
                ),
                weighted_means(
                    gpu,
                    [&rp, &partial_rows, &ones, &replay_out, &no_partials],
                    (rx, ry),
                    // The partial rows are whole quads.
                    &microclip::shaders::weighted_means_constants(small, false, true, false),
                ),
            ]
        } else {
            let (mx, my) = split(groups_per);
            let rows = if with_means { m } else { n };
            // A table of one entry (TABLE_LEN copies of it; entries = 1).
            let sp = uniform(
                gpu,
                &[MeansSumParams {
                    cols: d as u32,
                    rows: rows as u32,
                    groups_x: mx,
                    skip_zero: 1,
                    groups: 1,
                    // the means' rows are whole quads
                    vec4_path: if with_means { 1 } else { input_path },
                    stride: if with_means { d4 } else { d } as u32,
                    entries: 1,
                    dispatch_groups: groups_per as u32,
                    ..Default::default()
                }; TABLE_LEN],
            );
            let source = if with_means { &means } else { &x };
            vec![weighted_means(
                gpu,
                [
                    &sp,
                    source,
                    row_weights.as_ref().unwrap_or(&weights),
                    &replay_out,
                    &no_partials,
                ],
                (mx, my),
                &microclip::shaders::weighted_means_constants(
                    small,
                    false,
                    with_means || input_path == 1,
                    row_weights.is_some(),
                ),
            )]
        };
        part.run(gpu);
        run_all(gpu, &sum);
        let got = gpu.read_f32(&replay_out, 0, d as u64);
        if got != want {
            lines.push(format!(
                "| {b} | {m} | replayed pass 4 differs from microclip's output: kernel layout changed, breakdown skipped | | | | | | | |"
            ));
            continue;
        }
        let s = interleaved(
            warmup,
            runs,
            &mut [
                &mut || reference.job.run(gpu),
                &mut || {
                    clipper
                        .clip_buffers_into(&cfg, &input, n, &output)
                        .expect("clip");
                    crate::report::device_ms(timed, clipper.last_gpu_time())
                },
                &mut || part.run(gpu),
                &mut || run_all(gpu, &sum),
            ],
        );
        let [read, full, p, w] = [0, 1, 2, 3].map(|i| median(&s[i]));
        lines.push(format!(
            "| {b} | {m} | {full:.2} | {p:.2} | {w:.2} | {:.2} | {read:.2} | {:.2} | {:.2} | {} | {}, {} |",
            full - p - w,
            p / read,
            w / read,
            if with_means {
                "weighted_means (M rows of means)".to_string()
            } else {
                format!(
                    "weighted_means ({}){}",
                    if m == n {
                        "N = M rows of the input"
                    } else {
                        "N rows of the input, row weights"
                    },
                    if chunks > 1 {
                        format!(" in {chunks} chunks of about {chunk_rows} rows + their sum")
                    } else {
                        String::new()
                    }
                )
            },
            tiles * m as u64,
            if chunks > 1 {
                format!("{} + {groups_per}", chunks as u64 * groups_per)
            } else {
                groups_per.to_string()
            }
        ));
    }
    Ok(lines)
}
