//! The cases of the report and how each backend runs them.
//!
//! GPU: every input lives in a device buffer before timing starts; each case gets
//! a fresh `Clipper::from_device` on the shared device (so `scratch_bytes` is that
//! case's own), C = the median micro-batch norm of a probe call (about half the
//! micro-batches clipped), then warm-up and `runs` rounds of [reference read-sum,
//! microclip, (5-pass baseline)] interleaved.
//!
//! CPU: the same shapes as host `Vec<f32>`s through `Clipper::clip`, interleaved
//! with a multi-threaded rayon sum over the same bytes.

use microclip::half::{bf16, f16};
use microclip::{
    Backend, ClipConfig, Clipper, Dtype, GpuTensor, GpuTensorMut, GradElement, MicroBatches,
};
use rayon::prelude::*;

use crate::data;
use crate::kernels::{Baseline, Gpu, ReadSum, RefKernels};
use crate::report::{
    device_ms, interleaved, median, missing, paired_ratio, Method, Report, Row, Timed,
};

/// Input seed of every case.
const SEED: u64 = 0x5eed_c11b;
/// Micro-batch sizes that also run the 5-pass baseline (main shape only).
pub const BASELINE_B: [usize; 2] = [1, 8];
/// Micro-batch sizes of the 16-bit rows (main shape).
pub const HALF_BS: [usize; 2] = [1, 8];
/// Micro-batch sizes whose pass 4 re-reads the input rows (main shape), also
/// timed with the adapter's other row-chunk setting.
pub const ROWS_BS: [usize; 2] = [1, 2];
/// Rows per chunk of those rows where the adapter's default has none (a
/// software adapter's default).
pub const ROW_CHUNK_ROWS: u32 = 32;

/// The shapes, every D divided by `scale` (N and b kept, so the
/// micro-batch structure is the same; only the bytes shrink).
pub struct Sizes {
    pub scale: usize,
    /// (N, D) of the main shape, run for every b in `bs`.
    pub main: (usize, usize),
    pub bs: Vec<usize>,
    /// (N, D, b): few samples, wide rows.
    pub wide: (usize, usize, usize),
    /// (N, D, b): many samples, narrow rows (also run on the GPU host path).
    pub tall: (usize, usize, usize),
    /// (N, b, tensors, largest D_p).
    pub multi: (usize, usize, usize, usize),
}

impl Sizes {
    pub fn new(scale: usize) -> Self {
        let s = |d: usize| (d / scale.max(1)).max(1);
        Self {
            scale: scale.max(1),
            main: (256, s(1_000_000)),
            bs: vec![1, 2, 4, 8, 32, 256],
            wide: (64, s(4_000_000), 4),
            tall: (1024, s(65_536), 16),
            multi: (64, 4, 100, s(200_000)),
        }
    }

    /// A note for every row when the sizes are scaled.
    fn note(&self) -> String {
        if self.scale > 1 {
            format!("D/{}", self.scale)
        } else {
            String::new()
        }
    }

    fn header(&self) -> String {
        if self.scale > 1 {
            format!(
                "sizes: the issue's shapes with every D divided by {} (--scale / --quick); N, b and the tensor count unchanged",
                self.scale
            )
        } else {
            "sizes: the issue's shapes (main input 1.02 GB)".to_string()
        }
    }
}

/// Joins the non-empty parts with "; ".
fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("; ")
}

/// Run options shared by the cases.
#[derive(Debug, Clone)]
pub struct Opts {
    pub warmup: usize,
    pub runs: usize,
    /// Binding-size override for microclip and the bench kernels.
    pub max_binding: Option<u64>,
    /// Also time the GPU host-slice path (`clip()`, upload included) on the tall shape.
    pub host_row: bool,
    /// Also time microclip's input-reading kernels one by one (GPU only).
    pub breakdown: bool,
    /// Divide every D by this (default 1: the sizes).
    pub scale: Option<usize>,
    /// Also run the scaling series (`scaling.rs`).
    pub scaling: bool,
    /// Time GPU calls with the wall clock even where timestamp queries exist.
    pub wall_clock: bool,
}

fn min_bytes(n: usize, d: usize, dtype: Dtype) -> u64 {
    (n * d) as u64 * dtype.size_bytes() + (d * 4) as u64
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(want) {
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// The median of the finite norms (a clip bound that clips about half), or 1.
fn median_norm(norms: &[f32]) -> f32 {
    let finite: Vec<f64> = norms
        .iter()
        .filter(|v| v.is_finite() && **v > 0.0)
        .map(|&v| v as f64)
        .collect();
    let c = median(&finite) as f32;
    if c.is_finite() && c > 0.0 {
        c
    } else {
        1.0
    }
}

/// Probe config: nothing is clipped, the statistics give the norms.
fn probe_config(b: usize) -> ClipConfig {
    ClipConfig::fixed(f32::MAX, MicroBatches::Uniform(b))
}

// ---------------------------------------------------------------------------------
// GPU

struct GpuCtx {
    gpu: Gpu,
    refk: RefKernels,
    baseline: Baseline,
    backend: String,
    opts: Opts,
    /// Row note of the size scaling ("D/16"), empty at full size.
    size_note: String,
    /// Cases whose N had to be halved.
    scaled: Vec<String>,
    /// Device times from timestamp queries (else the wall clock).
    timed: bool,
    /// Buffer slots of the clippers made now (`Clipper::set_gpu_buffer_slots`;
    /// `None`: the adapter's default).
    slots: std::cell::Cell<Option<bool>>,
    /// f16 decode of the clippers made now (`Clipper::set_gpu_f16_unpack`;
    /// `None`: the adapter's default).
    f16_unpack: std::cell::Cell<Option<bool>>,
    /// Rows per chunk of pass 4 over input rows of the clippers made now
    /// (`Clipper::set_gpu_pass4_chunk_rows`; `None`: the adapter's default).
    row_chunks: std::cell::Cell<Option<u32>>,
    /// Oct loads of 16-bit rows of the clippers made now
    /// (`Clipper::set_gpu_oct_loads`; `None`: the adapter's default).
    oct_loads: std::cell::Cell<Option<bool>>,
}

impl GpuCtx {
    fn clipper(&self) -> Clipper {
        let mut c = Clipper::from_device(self.gpu.device.clone(), self.gpu.queue.clone())
            .expect("microclip builds on the device the bench opened");
        if let Some(mb) = self.opts.max_binding {
            c.set_max_binding_bytes(mb);
        }
        c.set_gpu_timing(self.timed);
        if let Some(on) = self.slots.get() {
            c.set_gpu_buffer_slots(Some(on));
        }
        if let Some(on) = self.f16_unpack.get() {
            c.set_gpu_f16_unpack(Some(on));
        }
        if let Some(rows) = self.row_chunks.get() {
            c.set_gpu_pass4_chunk_rows(Some(rows));
        }
        if let Some(on) = self.oct_loads.get() {
            c.set_gpu_oct_loads(Some(on));
        }
        c
    }

    /// Uploads tensor `tensor` as `[n, d]`, halving `n` while the buffer cannot be
    /// created (larger than `max_buffer_size`, or out of memory). Returns the buffer,
    /// the `n` used and a note when it was scaled down.
    fn input(
        &mut self,
        what: &str,
        tensor: u64,
        n: usize,
        d: usize,
        b_max: usize,
    ) -> Result<(wgpu::Buffer, usize, String), String> {
        let mut rows = n;
        loop {
            match data::device_tensor(&self.gpu, SEED, tensor, rows, d) {
                Ok(buffer) => {
                    let mut halved = String::new();
                    if rows < n {
                        halved = format!("scaled down: N {n} -> {rows}");
                        self.scaled.push(format!("{what}: {halved}"));
                    }
                    return Ok((buffer, rows, join(&[&self.size_note, &halved])));
                }
                Err(e) if rows / 2 >= b_max.max(1) => {
                    eprintln!("{what}: cannot hold [{rows}, {d}] f32 ({e}); halving N");
                    rows /= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Times microclip on device buffers (and the 5-pass baseline on a single tensor),
/// interleaved with `reference`. `tensors`: (buffer, byte offset, D_p).
#[allow(clippy::too_many_arguments)]
fn device_case(
    ctx: &GpuCtx,
    case: &str,
    n: usize,
    b: usize,
    tensors: &[(&wgpu::Buffer, u64, usize)],
    dtype: Dtype,
    reference: &ReadSum,
    with_baseline: bool,
    note: &str,
) -> Result<Vec<Row>, String> {
    let gpu = &ctx.gpu;
    let d_total: usize = tensors.iter().map(|t| t.2).sum();
    eprintln!(
        "case {case}: N={n} D={d_total} b={b} tensors={}",
        tensors.len()
    );
    let mut clipper = ctx.clipper();
    let outs: Vec<wgpu::Buffer> = tensors
        .iter()
        .map(|&(_, _, d)| gpu.storage_buffer("output", (d * 4) as u64))
        .collect::<Result<_, _>>()?;
    let inputs: Vec<GpuTensor<'_>> = tensors
        .iter()
        .map(|&(buffer, at, cols)| GpuTensor::new(buffer, at, cols).with_dtype(dtype))
        .collect();
    let outputs: Vec<GpuTensorMut<'_>> = outs
        .iter()
        .zip(tensors)
        .map(|(buffer, &(_, _, cols))| GpuTensorMut {
            buffer,
            offset: 0,
            cols,
        })
        .collect();
    let probe = clipper
        .clip_buffers_into(&probe_config(b), &inputs, n, &outputs)
        .map_err(|e| format!("{case}: {e}"))?;
    let c = median_norm(&probe.norms);
    let cfg = ClipConfig::fixed(c, MicroBatches::Uniform(b));

    let mut baseline_note = String::new();
    let baseline = if with_baseline && tensors.len() == 1 && dtype == Dtype::F32 {
        match ctx
            .baseline
            .prepare(gpu, tensors[0].0, n, tensors[0].2, b, c)
        {
            Ok(job) => Some(job),
            Err(e) => {
                eprintln!("{case}: 5-pass baseline skipped: {e}");
                baseline_note = format!("5-pass baseline skipped: {e}");
                None
            }
        }
    } else {
        None
    };
    // One correctness check of the baseline against microclip on this shape.
    let mut check_err = f64::NAN;
    if let Some(bl) = &baseline {
        clipper
            .clip_buffers_into(&cfg, &inputs, n, &outputs)
            .map_err(|e| format!("{case}: {e}"))?;
        bl.job.run(gpu);
        let d = tensors[0].2 as u64;
        let ours = gpu.read_f32(&outs[0], 0, d);
        let theirs = gpu.read_f32(&bl.out, 0, d);
        check_err = rel_l2(&theirs, &ours);
        if check_err.is_nan() || check_err >= 1e-4 {
            return Err(format!(
                "{case}: 5-pass baseline disagrees with microclip (relative L2 {check_err:.3e})"
            ));
        }
    }

    let mut stats = None;
    let samples = {
        let mut run_ref = || reference.job.run(gpu);
        let mut run_clip = || {
            stats = Some(
                clipper
                    .clip_buffers_into(&cfg, &inputs, n, &outputs)
                    .expect("clip_buffers_into"),
            );
            device_ms(ctx.timed, clipper.last_gpu_time())
        };
        let mut run_base = || baseline.as_ref().and_then(|bl| bl.job.run(gpu));
        let mut fs: Vec<&mut Timed<'_>> = vec![&mut run_ref, &mut run_clip];
        if baseline.is_some() {
            fs.push(&mut run_base);
        }
        interleaved(ctx.opts.warmup, ctx.opts.runs, &mut fs)
    };
    let stats = stats.expect("at least one run");
    let read_ms = median(&samples[0]);
    let ours_ms = median(&samples[1]);
    let samples_read = samples[0].clone();
    let dropped: usize = samples.iter().map(|s| missing(s)).sum();
    let widths: Vec<usize> = tensors.iter().map(|t| t.2).collect();
    let mut notes: Vec<String> = vec![format!(
        "clipped {}/{}",
        stats.clipped_count,
        stats.norms.len()
    )];
    if let Some(tile) = clipper.gpu_tile_cols(&widths, n.div_ceil(b), b.min(n)) {
        notes.push(format!("tiles of {tile} cols"));
    }
    if let Some(dispatches) = clipper.last_gpu_dispatches() {
        notes.push(format!("{dispatches} dispatches"));
    }
    if !note.is_empty() {
        notes.push(note.to_string());
    }
    if !baseline_note.is_empty() {
        notes.push(baseline_note);
    }
    if dropped > 0 {
        notes.push(format!(
            "{dropped} samples without device timestamps, left out"
        ));
    }
    let row = |method, samples: &[f64], extra, note: String| Row {
        case: case.to_string(),
        method,
        path: "device",
        backend: ctx.backend.clone(),
        n,
        d: d_total,
        b,
        tensors: tensors.len(),
        dtype,
        median_ms: median(samples),
        runs: ctx.opts.runs,
        min_bytes: min_bytes(n, d_total, dtype),
        read_ms,
        read_ratio: paired_ratio(samples, &samples_read),
        extra_device_bytes: extra,
        speedup: None,
        timing: if ctx.timed { "device" } else { "wall" },
        note,
    };
    let method = match (
        ctx.slots.get(),
        ctx.f16_unpack.get(),
        ctx.row_chunks.get(),
        ctx.oct_loads.get(),
    ) {
        (Some(on), ..) => Method::MicroclipSlots(on),
        (None, Some(on), ..) => Method::MicroclipF16Unpack(on),
        (None, None, Some(rows), _) => Method::MicroclipRowChunks(rows > 0),
        (None, None, None, Some(on)) => Method::MicroclipOctLoads(on),
        (None, None, None, None) => Method::Microclip,
    };
    let mut rows = vec![row(
        method,
        &samples[1],
        clipper.scratch_bytes(),
        notes.join("; "),
    )];
    if let Some(bl) = &baseline {
        let base_ms = median(&samples[2]);
        let mut base = row(
            Method::Baseline5Pass,
            &samples[2],
            bl.extra_bytes,
            format!(
                "{} dispatches, moves {:.0} MB; speedup of microclip (5-pass / microclip) {:.2}x; rel L2 vs microclip {:.1e}",
                bl.job.dispatches(),
                bl.moved_bytes as f64 / 1e6,
                base_ms / ours_ms,
                check_err
            ),
        );
        base.speedup = Some(base_ms / ours_ms);
        rows.push(base);
    }
    Ok(rows)
}

/// The GPU host-slice path (`Clipper::clip`: upload, four passes, output read
/// back), against the device read-sum over the same bytes.
fn gpu_host_case(
    ctx: &GpuCtx,
    case: &str,
    n: usize,
    d: usize,
    b: usize,
    reference: &ReadSum,
) -> Result<Row, String> {
    eprintln!("case {case}: N={n} D={d} b={b} (host slices)");
    let host = data::host_tensor(SEED, 2, n, d);
    let mut clipper = ctx.clipper();
    let probe = clipper
        .clip(&probe_config(b), &[&host], n)
        .map_err(|e| e.to_string())?;
    let cfg = ClipConfig::fixed(median_norm(&probe.stats.norms), MicroBatches::Uniform(b));
    let gpu = &ctx.gpu;
    let samples = {
        // Wall clock for both (the upload is part of this path's cost).
        let mut run_ref = || {
            reference.job.run_untimed(gpu);
            None
        };
        let mut run_clip = || {
            clipper.clip(&cfg, &[&host], n).expect("clip");
            None
        };
        interleaved(
            ctx.opts.warmup,
            ctx.opts.runs,
            &mut [&mut run_ref, &mut run_clip],
        )
    };
    Ok(Row {
        case: case.to_string(),
        method: Method::Microclip,
        path: "host",
        backend: ctx.backend.clone(),
        n,
        d,
        b,
        tensors: 1,
        median_ms: median(&samples[1]),
        runs: ctx.opts.runs,
        dtype: Dtype::F32,
        min_bytes: min_bytes(n, d, Dtype::F32),
        read_ms: median(&samples[0]),
        read_ratio: paired_ratio(&samples[1], &samples[0]),
        extra_device_bytes: clipper.scratch_bytes(),
        speedup: None,
        timing: "wall",
        note: join(&[
            &format!(
                "upload of {:.0} MB + output read-back included; extra bytes exclude the uploaded input",
                (n * d * 4) as f64 / 1e6
            ),
            &ctx.size_note,
        ]),
    })
}

/// Runs every case on the default GPU adapter.
pub fn run_gpu(opts: Opts) -> Result<Report, String> {
    let base = Clipper::new(Backend::Gpu).map_err(|e| format!("no GPU clipper: {e}"))?;
    let backend = base.backend().to_string();
    let device = base.device().expect("gpu").clone();
    let queue = base.queue().expect("gpu").clone();
    drop(base);
    let info = device.adapter_info();
    let limits = device.limits();
    let sizes = &Sizes::new(opts.scale.unwrap_or(1));
    let mut gpu = Gpu::new(device, queue, opts.max_binding);
    let timed = !opts.wall_clock && gpu.enable_timer();
    let mut ctx = GpuCtx {
        refk: RefKernels::new(&gpu),
        baseline: Baseline::new(&gpu),
        gpu,
        backend,
        opts,
        size_note: sizes.note(),
        scaled: Vec::new(),
        timed,
        slots: Default::default(),
        f16_unpack: Default::default(),
        row_chunks: Default::default(),
        oct_loads: Default::default(),
    };
    let checks = crate::check::verify(&ctx.gpu, &ctx.refk, &ctx.baseline)?;
    for c in &checks {
        eprintln!("{c}");
    }

    let mut header = vec![
        "# microclip bench_report".to_string(),
        format!(
            "backend: {} (driver: {} {}; device type {:?})",
            ctx.backend, info.driver, info.driver_info, info.device_type
        ),
        format!(
            "limits: max_buffer_size = {}, max_storage_buffer_binding_size = {}; bench kernels bind <= {} bytes per dispatch",
            limits.max_buffer_size, limits.max_storage_buffer_binding_size, ctx.gpu.max_binding
        ),
        format!(
            "lavapipe threads: LP_NUM_THREADS = {} (unset: one per CPU core; {} cores here)",
            std::env::var("LP_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        sizes.header(),
    ];
    header.extend(checks);
    let mut rows = Vec::new();

    // Main shape: bandwidth probes, then every b.
    let (n0, d0) = sizes.main;
    let (x, n, note) = ctx.input("main", 0, n0, d0, 1)?;
    let bytes = (n * d0 * 4) as u64;
    let reference = ctx.refk.read_sum(&ctx.gpu, &x, bytes);
    {
        let dst = ctx.gpu.storage_buffer("copy destination", bytes)?;
        let copy = ctx.refk.copy(&ctx.gpu, &x, &dst, bytes);
        let gpu = &ctx.gpu;
        let s = interleaved(
            ctx.opts.warmup,
            ctx.opts.runs,
            &mut [&mut || reference.job.run(gpu), &mut || copy.run(gpu)],
        );
        let (read_ms, copy_ms) = (median(&s[0]), median(&s[1]));
        header.push(format!(
            "adapter bandwidth on {:.0} MB: copy kernel {:.2} GB/s (read + write bytes counted; {:.2} ms), vec4 read-and-sum {:.2} GB/s ({:.2} ms); windows of {} dispatches",
            bytes as f64 / 1e6,
            2.0 * bytes as f64 / (copy_ms * 1e-3) / 1e9,
            copy_ms,
            bytes as f64 / (read_ms * 1e-3) / 1e9,
            read_ms,
            reference.job.dispatches()
        ));
    }
    let main_case = |b, with_baseline| {
        device_case(
            &ctx,
            "main",
            n,
            b,
            &[(&x, 0, d0)],
            Dtype::F32,
            &reference,
            with_baseline,
            &note,
        )
    };
    for &b in &sizes.bs {
        if b > n {
            header.push(format!("main: b = {b} skipped (N = {n} after scaling)"));
            continue;
        }
        rows.extend(main_case(b, BASELINE_B.contains(&b))?);
    }
    // Pass 4 over the input rows with the adapter's other row-chunk setting.
    let other = match ctx.clipper().gpu_pass4_chunk_rows() {
        Some(0) => ROW_CHUNK_ROWS,
        _ => 0,
    };
    ctx.row_chunks.set(Some(other));
    for b in ROWS_BS.into_iter().filter(|&b| b <= n) {
        rows.extend(main_case(b, false)?);
    }
    ctx.row_chunks.set(None);
    drop(reference);
    drop(x);

    // 16-bit inputs on the main shape: half the bytes to read, against the
    // read-and-sum over those bytes. f16 also with the adapter's other decode
    // (`unpack2x16float` or integer operations) where it has both; both types
    // also with the adapter's other choice of oct loads.
    let other_unpack = ctx.clipper().gpu_f16_unpack() == Some(false);
    let other_octs = ctx.clipper().gpu_oct_loads() == Some(false);
    // (f16 decode, oct loads) of each run: `None` the adapter's default.
    let default = (None, None);
    let f16_runs = [
        default,
        (Some(other_unpack), None),
        (None, Some(other_octs)),
    ];
    let bf16_runs = [default, (None, Some(other_octs))];
    for (dtype, runs) in [(Dtype::F16, &f16_runs[..]), (Dtype::Bf16, &bf16_runs[..])] {
        // One upload per type, read by each of its runs.
        let x = data::device_tensor_as(&ctx.gpu, SEED, 0, n, d0, dtype)?;
        let reference = ctx.refk.read_sum(&ctx.gpu, &x, (n * d0 * 2) as u64);
        for &(unpack, octs) in runs {
            ctx.f16_unpack.set(unpack);
            ctx.oct_loads.set(octs);
            if unpack.is_some() && ctx.clipper().gpu_f16_unpack() != unpack {
                continue;
            }
            for b in HALF_BS.into_iter().filter(|&b| b <= n) {
                rows.extend(device_case(
                    &ctx,
                    &format!("main {dtype}"),
                    n,
                    b,
                    &[(&x, 0, d0)],
                    dtype,
                    &reference,
                    false,
                    &note,
                )?);
            }
        }
    }
    ctx.f16_unpack.set(None);
    ctx.oct_loads.set(None);

    // Few wide rows, then many narrow rows (+ the host path on the same shape).
    for (what, (n0, d, b), host) in [
        ("wide", sizes.wide, false),
        ("tall", sizes.tall, ctx.opts.host_row),
    ] {
        let (x, n, note) = ctx.input(what, 1, n0, d, b)?;
        let reference = ctx.refk.read_sum(&ctx.gpu, &x, (n * d * 4) as u64);
        rows.extend(device_case(
            &ctx,
            what,
            n,
            b,
            &[(&x, 0, d)],
            Dtype::F32,
            &reference,
            false,
            &note,
        )?);
        if host {
            rows.push(gpu_host_case(&ctx, what, n, d, b, &reference)?);
        }
    }

    // Many tensors, each its own buffer, then all in one buffer, versus one tensor of
    // the same total size; all against the read-sum over the single buffer (the
    // same number of bytes).
    let (n0, b, count, max_d) = sizes.multi;
    let widths = data::spread_widths(count, max_d);
    let total: usize = widths.iter().sum();
    let (single, n, note) = ctx.input("multi", 3, n0, total, b)?;
    let many: Vec<wgpu::Buffer> = widths
        .iter()
        .enumerate()
        .map(|(p, &d)| data::device_tensor(&ctx.gpu, SEED, 100 + p as u64, n, d))
        .collect::<Result<_, _>>()?;
    let reference = ctx.refk.read_sum(&ctx.gpu, &single, (n * total * 4) as u64);
    let multi_note = join(&[
        &format!("D_p from {} to {}", widths[0], widths[count - 1]),
        &note,
    ]);
    let many_refs: Vec<(&wgpu::Buffer, u64, usize)> =
        many.iter().zip(&widths).map(|(b, &d)| (b, 0, d)).collect();
    // With the adapter's default, then its other choice of buffer slots (up to 8
    // buffers per dispatch, or one dispatch per buffer) where it has both.
    let other_slots = !ctx.clipper().gpu_buffer_slots().unwrap_or(false);
    for slots in [None, Some(other_slots)] {
        ctx.slots.set(slots);
        if slots.is_some() && ctx.clipper().gpu_buffer_slots() != slots {
            continue;
        }
        rows.extend(device_case(
            &ctx,
            &format!("multi: {count} buffers"),
            n,
            b,
            &many_refs,
            Dtype::F32,
            &reference,
            false,
            &multi_note,
        )?);
    }
    ctx.slots.set(None);
    drop(many);
    // The same tensors packed into one buffer (as a framework's allocator may
    // place them): they share the norm pass's dispatches.
    let (packed, at) = data::packed_tensors(&ctx.gpu, SEED, 100, n, &widths)?;
    let packed_refs: Vec<(&wgpu::Buffer, u64, usize)> = widths
        .iter()
        .zip(&at)
        .map(|(&d, &at)| (&packed, at, d))
        .collect();
    rows.extend(device_case(
        &ctx,
        &format!("multi: {count} tensors, 1 buffer"),
        n,
        b,
        &packed_refs,
        Dtype::F32,
        &reference,
        false,
        &multi_note,
    )?);
    drop(packed);
    rows.extend(device_case(
        &ctx,
        "multi: 1 buffer, same total",
        n,
        b,
        &[(&single, 0, total)],
        Dtype::F32,
        &reference,
        false,
        note.as_str(),
    )?);

    drop((single, reference));

    if ctx.opts.scaling {
        let mut measure = |case: &str, n0: usize, d: usize, bs: &[usize]| {
            let b_max = bs.iter().copied().max().unwrap_or(1);
            let (x, n, note) = ctx.input(case, 0, n0, d, b_max)?;
            let reference = ctx.refk.read_sum(&ctx.gpu, &x, (n * d * 4) as u64);
            let mut rows = Vec::new();
            for &b in bs.iter().filter(|&&b| b <= n) {
                let one = [(&x, 0, d)];
                rows.extend(device_case(
                    &ctx,
                    case,
                    n,
                    b,
                    &one,
                    Dtype::F32,
                    &reference,
                    false,
                    &note,
                )?);
            }
            Ok(rows)
        };
        rows.extend(crate::scaling::run(sizes, &mut measure)?);
    }

    let mut footer = if ctx.opts.breakdown {
        let (n, d) = sizes.main;
        let mut lines =
            crate::breakdown::run(&ctx.gpu, &ctx.refk, n, d, &sizes.bs, &ctx.opts, ctx.timed)?;
        // The tall shape too: its fixed costs weigh more (4,096 columns at D/16).
        let (n, d, b) = sizes.tall;
        lines.extend(crate::breakdown::run(
            &ctx.gpu,
            &ctx.refk,
            n,
            d,
            &[b],
            &ctx.opts,
            ctx.timed,
        )?);
        lines
    } else {
        Vec::new()
    };
    if ctx.opts.scaling {
        footer.extend(crate::scaling::footer(&rows));
    }
    for s in &ctx.scaled {
        header.push(format!("scaled down: {s}"));
    }
    let timing = if ctx.timed {
        Timing::Device
    } else {
        Timing::GpuWall
    };
    push_conventions(&mut header, &ctx.opts, timing);
    Ok(Report {
        header,
        rows,
        footer,
    })
}

/// How a run timed its calls (the header's timing line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timing {
    /// GPU, timestamp queries at the beginning and end of each call's pass.
    Device,
    /// GPU, wall clock around submit + wait.
    GpuWall,
    /// CPU backend, wall clock.
    Cpu,
}

fn push_conventions(header: &mut Vec<String>, opts: &Opts, timing: Timing) {
    let gpu = timing != Timing::Cpu;
    header.push(format!(
        "timing: median of {} runs after {} warm-up, interleaved with the reference over the same bytes; {}",
        opts.runs,
        opts.warmup,
        match timing {
            Timing::Device => "GPU times are device times from timestamp queries at the beginning and end of each call's one compute pass (microclip: every kernel of the call, Clipper::set_gpu_timing; reference and baseline: all their dispatches), without the host's encoding, submission and read-back; the host-path row is wall clock (its upload counts); --wall-clock times every row by the wall clock",
            Timing::GpuWall => "GPU times are wall clock around submit + poll (clip_buffers_into returns after its statistics are read back; the reference and baseline jobs submit and poll until the queue is idle)",
            Timing::Cpu => "CPU times are wall clock around Clipper::clip on host slices (output vectors included)",
        }
    ));
    header.push(
        "min MB = N x D x 4 (x 2 for f16/bf16 input; input read once) + D x 4 (output); GB/s = min bytes / median; read_ratio = median over the timed rounds of (time / read-sum time over the same input bytes in the same round) (1.0 = physical floor; a two-pass method cannot go below 2.0 at b = 1; the JSON also has ratio_of_medians, median ms / read-sum ms)".to_string(),
    );
    header.push(if gpu {
        "read-sum = vec4 read-and-sum WGSL kernel on the same adapter (64 KiB per workgroup, one partial per workgroup); extra device bytes = Clipper::scratch_bytes() after the case (5-pass rows: its intermediates)".to_string()
    } else {
        "read-sum = rayon sum (32 f32 lanes per task, SIMD level picked at run time) over the same slice; extra device bytes = host bytes the clipper keeps between calls (Clipper::scratch_bytes(): the two-pass path's stored means; not the per-call working memory)".to_string()
    });
}

// ---------------------------------------------------------------------------------
// CPU

/// Bytes of the CPU header's in-cache read-and-sum (a slice that fits the
/// last-level cache of most machines the bench runs on).
const CACHE_PROBE_BYTES: usize = 16 << 20;

/// Multi-threaded sum of a slice: 64 Ki-element tasks, each a read of every
/// element once into 32 independent f32 lanes.
fn cpu_sum(x: &[f32]) -> f32 {
    x.par_chunks(1 << 16).map(sum_lanes).sum()
}

/// `sum(c)` in 32 independent f32 lanes (four 256-bit or two 512-bit vectors),
/// compiled for the same SIMD levels as microclip's CPU loops. On the
/// twenty-eighth session's AMD VM the earlier 8 lanes in baseline x86-64 code
/// (SSE2) were bound by the additions' latency: 1 GB in 50-55 ms, against 39 ms
/// this way and 38-40 ms for PyTorch's own sum (BENCHMARKS.md). The floor must
/// be a read that the clipper cannot beat.
#[multiversion::multiversion(targets = "simd")]
fn sum_lanes(c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    let mut it = c.chunks_exact(32);
    for v in &mut it {
        for (a, &e) in acc.iter_mut().zip(v) {
            *a += e;
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

fn cpu_copy(src: &[f32], dst: &mut [f32]) {
    dst.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

#[allow(clippy::too_many_arguments)]
fn cpu_case<T: GradElement>(
    opts: &Opts,
    case: &str,
    n: usize,
    b: usize,
    tensors: &[&[T]],
    reference: &[f32],
    note: &str,
) -> Result<Row, String> {
    let d_total: usize = tensors.iter().map(|t| t.len() / n).sum();
    eprintln!(
        "case {case}: N={n} D={d_total} b={b} tensors={} (cpu)",
        tensors.len()
    );
    // A fresh clipper per case, so that its scratch_bytes are this case's.
    let mut clipper = Clipper::new(Backend::Cpu).map_err(|e| e.to_string())?;
    let probe = clipper
        .clip(&probe_config(b), tensors, n)
        .map_err(|e| e.to_string())?;
    let cfg = ClipConfig::fixed(median_norm(&probe.stats.norms), MicroBatches::Uniform(b));
    let mut clipped = 0;
    let samples = {
        let mut run_ref = || {
            std::hint::black_box(cpu_sum(std::hint::black_box(reference)));
            None
        };
        let mut run_clip = || {
            clipped = clipper
                .clip(&cfg, tensors, n)
                .expect("clip")
                .stats
                .clipped_count;
            None
        };
        interleaved(opts.warmup, opts.runs, &mut [&mut run_ref, &mut run_clip])
    };
    let mut notes = vec![format!("clipped {clipped}/{}", n.div_ceil(b))];
    if !note.is_empty() {
        notes.push(note.to_string());
    }
    Ok(Row {
        case: case.to_string(),
        method: Method::Microclip,
        path: "host",
        backend: "cpu".to_string(),
        n,
        d: d_total,
        b,
        tensors: tensors.len(),
        dtype: T::DTYPE,
        median_ms: median(&samples[1]),
        runs: opts.runs,
        min_bytes: min_bytes(n, d_total, T::DTYPE),
        read_ms: median(&samples[0]),
        read_ratio: paired_ratio(&samples[1], &samples[0]),
        extra_device_bytes: clipper.scratch_bytes(),
        speedup: None,
        timing: "wall",
        note: notes.join("; "),
    })
}

/// Runs every case on the CPU backend (host slices).
pub fn run_cpu(opts: Opts) -> Result<Report, String> {
    let sizes = &Sizes::new(opts.scale.unwrap_or(1));
    let mut header = vec![
        "# microclip bench_report".to_string(),
        format!(
            "backend: cpu (rayon, {} threads)",
            rayon::current_num_threads()
        ),
        sizes.header(),
    ];
    let mut rows = Vec::new();

    let (n, d) = sizes.main;
    let x = data::host_tensor(SEED, 0, n, d);
    {
        let mut dst = vec![0.0f32; x.len()];
        let s = interleaved(
            opts.warmup,
            opts.runs,
            &mut [
                &mut || {
                    std::hint::black_box(cpu_sum(&x));
                    None
                },
                &mut || {
                    cpu_copy(&x, &mut dst);
                    None
                },
            ],
        );
        let bytes = (x.len() * 4) as f64;
        let (read_ms, copy_ms) = (median(&s[0]), median(&s[1]));
        let read_gbs = bytes / (read_ms * 1e-3) / 1e9;
        header.push(format!(
            "host bandwidth on {:.0} MB: rayon copy {:.2} GB/s (read + write bytes counted; {:.2} ms), rayon read-and-sum {:.2} GB/s ({:.2} ms)",
            bytes / 1e6,
            2.0 * bytes / (copy_ms * 1e-3) / 1e9,
            copy_ms,
            read_gbs,
            read_ms
        ));
        // The same sum over a slice that stays in the last-level cache between
        // runs: what a second read of a cache block costs against the first one
        // from DRAM (the stretch target re-reads each block from cache).
        let hot = &x[..x.len().min(CACHE_PROBE_BYTES / 4)];
        if hot.len() == x.len() {
            header.push(
                "(the main input is no larger than the in-cache probe's 16 MiB: \
                 no second bandwidth line)"
                    .to_string(),
            );
        } else {
            let hot_ms = median(
                &interleaved(
                    opts.warmup,
                    opts.runs,
                    &mut [&mut || {
                        std::hint::black_box(cpu_sum(hot));
                        None
                    }],
                )[0],
            );
            let hot_gbs = (hot.len() * 4) as f64 / (hot_ms * 1e-3) / 1e9;
            header.push(format!(
                "host read-and-sum over the first {:.1} MB, again and again (in the \
                 last-level cache if it fits): {:.2} GB/s, {:.2}x the rate over {:.0} MB",
                (hot.len() * 4) as f64 / 1e6,
                hot_gbs,
                hot_gbs / read_gbs,
                bytes / 1e6
            ));
        }
    }
    for &b in &sizes.bs {
        if b <= n {
            rows.push(cpu_case(&opts, "main", n, b, &[&x], &x, &sizes.note())?);
        }
    }
    // 16-bit inputs on the main shape, against the sum over the same bytes.
    let as_bytes = &x[..x.len() / 2];
    let halves: Vec<f16> = x.par_iter().map(|&v| f16::from_f32(v)).collect();
    let bhalves: Vec<bf16> = x.par_iter().map(|&v| bf16::from_f32(v)).collect();
    for b in HALF_BS.into_iter().filter(|&b| b <= n) {
        let note = sizes.note();
        rows.push(cpu_case(
            &opts,
            "main f16",
            n,
            b,
            &[&halves],
            as_bytes,
            &note,
        )?);
        rows.push(cpu_case(
            &opts,
            "main bf16",
            n,
            b,
            &[&bhalves],
            as_bytes,
            &note,
        )?);
    }
    drop((x, halves, bhalves));
    for (what, (n, d, b)) in [("wide", sizes.wide), ("tall", sizes.tall)] {
        let x = data::host_tensor(SEED, 1, n, d);
        rows.push(cpu_case(&opts, what, n, b, &[&x], &x, &sizes.note())?);
    }
    let (n, b, count, max_d) = sizes.multi;
    let widths = data::spread_widths(count, max_d);
    let total: usize = widths.iter().sum();
    let single = data::host_tensor(SEED, 3, n, total);
    let many: Vec<Vec<f32>> = widths
        .iter()
        .enumerate()
        .map(|(p, &d)| data::host_tensor(SEED, 100 + p as u64, n, d))
        .collect();
    let many_refs: Vec<&[f32]> = many.iter().map(|v| v.as_slice()).collect();
    let note = join(&[
        &format!("D_p from {} to {}", widths[0], widths[count - 1]),
        &sizes.note(),
    ]);
    rows.push(cpu_case(
        &opts,
        &format!("multi: {count} tensors"),
        n,
        b,
        &many_refs,
        &single,
        &note,
    )?);
    rows.push(cpu_case(
        &opts,
        "multi: 1 tensor, same total",
        n,
        b,
        &[&single],
        &single,
        &sizes.note(),
    )?);
    drop((single, many));
    let mut footer = Vec::new();
    if opts.scaling {
        let mut measure = |case: &str, n: usize, d: usize, bs: &[usize]| {
            let x = data::host_tensor(SEED, 0, n, d);
            bs.iter()
                .filter(|&&b| b <= n)
                .map(|&b| cpu_case(&opts, case, n, b, &[&x], &x, &sizes.note()))
                .collect::<Result<Vec<_>, _>>()
        };
        rows.extend(crate::scaling::run(sizes, &mut measure)?);
        footer = crate::scaling::footer(&rows);
    }
    push_conventions(&mut header, &opts, Timing::Cpu);
    Ok(Report {
        header,
        rows,
        footer,
    })
}
