//! # bench_report: how close microclip gets to reading its input once
//!
//! ```text
//! cargo run --release --example bench_report                    # default GPU adapter
//! cargo run --release --example bench_report -- --backend cpu   # CPU backend
//! cargo run --release --example bench_report -- --quick         # D / 64, 5 runs
//! cargo run --release --example bench_report -- --json rows.json
//! cargo run --release --example bench_report -- --scale 16      # every D / 16
//! ```
//!
//! In one process on one adapter it times every case, prints a markdown table and
//! ends with a line a script can read:
//!
//! ```text
//! summary: worst_read_ratio=<r1> worst_read_ratio_b1=<r2> speedup_vs_5pass_b1=<s>
//! ```
//!
//! ## What is measured
//!
//! * **Cases** (f32 unless named): N = 256, D = 1,000,000 for b in {1, 2, 4, 8, 32,
//!   256} (b = 2 is not among the issue's cases: it is the largest b at which the
//!   GPU's pass 4 re-reads the input rows);
//!   N = 64, D = 4,000,000, b = 4; N = 1024, D = 65,536, b = 16; N = 64, b = 4 with
//!   100 tensors of D_p from 1 to 200,000 (about 4.06 M in total), each in its own
//!   buffer, then all packed into one buffer at 256-byte aligned offsets (they
//!   share the norm pass's dispatches), and one tensor of the same total width.
//!   On the GPU the inputs are in
//!   device buffers before timing (`clip_buffers_into`); one extra row times the
//!   host-slice path (`clip()`, upload included) on the N = 1024 shape. The main
//!   shape also runs as f16 and bf16 input (b = 1 and 8). Rows with a method
//!   after "microclip, " time a GPU setting against the adapter's default and are
//!   left out of the summary line: f16 with the other decode, the 100 buffers
//!   with buffer slots the other way, and b = 1 and 2 with pass 4 the other way
//!   (in row chunks or without). The CPU backend runs the same shapes on host
//!   slices.
//! * **Sizes**: the issue's, by default on every adapter and backend (on
//!   lavapipe the whole report took 3 min 14 s on the project's 2-core host,
//!   3.2 GB resident).
//!   `--scale S` divides every D by S (N, b and the tensor count stay, so the
//!   micro-batch structure is unchanged); `--quick` is S = 64 with 5 runs. Every
//!   row of a scaled run says `D/S`.
//! * **Time**: median over `--runs` (default 11) runs after `--warmup` (default 2)
//!   runs. GPU: where the adapter has timestamp queries (wgpu `TIMESTAMP_QUERY`;
//!   lavapipe has them), the device time of each call's compute pass, written at
//!   the pass's beginning and end: all of microclip's kernels of the call
//!   (`Clipper::set_gpu_timing`), or all dispatches of a bench job (the read-sum,
//!   the copy, the 5-pass baseline); without them, or with `--wall-clock`, the
//!   wall clock around the call (`clip_buffers_into` submits and blocks until its
//!   statistics are read back; the bench's jobs submit and poll until the queue
//!   is idle). The host-path row is always wall clock (its upload counts).
//! * **Bytes**: the minimum a clipping step must move, N x D x 4 (input read once;
//!   x 2 for 16-bit input) + D x 4 (output written once); GB/s = those bytes /
//!   median time.
//! * **read_ratio** = the median over the timed rounds of (time / time of a plain
//!   vec4 read-and-sum kernel over the same input bytes on the same adapter, in the
//!   same round) (CPU: a multi-threaded rayon sum over the same slice), sampled
//!   interleaved with the case in the same run so that both see the same
//!   background load; per round, because the host can change speed for seconds at
//!   a time (`report::paired_ratio`; the JSON also has `ratio_of_medians`). 1.0 is the physical floor; a method
//!   that reads the input twice cannot go below 2.0 at b = 1 (microclip reads it in
//!   `mb_partials` and again in `weighted_means`). For the 100-tensor cases the
//!   reference reads one buffer of the same total size.
//! * **Adapter bandwidth**: a vec4 copy kernel over the main input (GB/s counting
//!   bytes read + written) and the read-and-sum, printed in the header. The CPU
//!   header adds the read-and-sum over the first 16 MiB alone, read again and
//!   again (in the last-level cache where it fits): how much cheaper a second
//!   read of a cached block is than the first read from DRAM, which bounds what
//!   the one-read path can gain at b = 1.
//! * **5-pass baseline** (`baseline.wgsl`): mean -> norms -> factors -> scale ->
//!   sum, one kernel each with materialised intermediates, for b = 1 and 8 on the
//!   main shape; speedup = its time / microclip's. It is checked against microclip
//!   (relative L2 < 1e-4) at start-up and again on each timed shape.
//! * **Extra device bytes**: `Clipper::scratch_bytes()` of a fresh clipper after the
//!   case (5-pass rows: its intermediates).
//!
//! Every bench kernel binds at most `max_storage_buffer_binding_size` bytes per
//! dispatch and loops over windows. A case whose input does not fit one buffer
//! (`max_buffer_size`, or out of memory) has N halved until it does; the table and
//! header say so. `--max-binding BYTES` lowers the binding size for microclip and
//! the bench kernels alike (to exercise the windowed paths).
//!
//! `--scaling` adds two series (see `scaling.rs`): the main shape with N x D cut
//! by up to 8 (b = 1 and 8, with a least-squares line through the times and the
//! read_ratio's range over the shapes), and the main shape at every power-of-two
//! b (time and read_ratio, each over its value at M = 1). Their rows go to
//! `--json` too; the summary line leaves them out.
//!
//! `--breakdown` adds a per-kernel table (see `breakdown.rs`): microclip's
//! `mb_partials` and `weighted_means` replayed one by one on the main shape shrunk to
//! one storage binding (every b) and on the tall shape, to show which pass the time
//! goes to.
//!
//! The summary's worst ratios cover the microclip rows of the device path (all rows
//! on the CPU backend); `speedup_vs_5pass_b1` is `nan` on the CPU backend.

mod breakdown;
mod cases;
mod check;
mod data;
mod kernels;
mod report;
mod scaling;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Gpu,
    Cpu,
}

/// Bandwidth report of microclip: time per case, effective GB/s, read_ratio
/// against a plain read-and-sum on the same adapter, and a 5-pass baseline.
#[derive(Debug, Parser)]
struct Args {
    /// Backend to measure: the default GPU adapter, or the CPU backend.
    #[arg(long, value_enum, default_value = "gpu")]
    backend: BackendArg,
    /// Small sizes (every D / 64: 16 MB inputs), 5 runs, 1 warm-up: for iterating.
    #[arg(long)]
    quick: bool,
    /// Divide every D by this (default: 1, the issue's sizes; --quick: 64).
    #[arg(long, value_parser = at_least_one())]
    scale: Option<usize>,
    /// Timed runs per case (default: 11, or 5 with --quick).
    #[arg(long, value_parser = at_least_one())]
    runs: Option<usize>,
    /// Warm-up runs per case (default: 2, or 1 with --quick).
    #[arg(long)]
    warmup: Option<usize>,
    /// Also write every row as a JSON list to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Bytes one storage binding may cover (default: the device's limit).
    #[arg(long)]
    max_binding: Option<u64>,
    /// Skip the GPU host-slice row.
    #[arg(long)]
    no_host: bool,
    /// Also time microclip's two input-reading kernels one by one (GPU; main
    /// shape shrunk to one storage binding).
    #[arg(long)]
    breakdown: bool,
    /// Also time the main shape at N x D cut by 2, 4 and 8 (b = 1 and 8, with a
    /// fitted line) and at every power-of-two b (M from N down to 1).
    #[arg(long)]
    scaling: bool,
    /// Time GPU calls with the wall clock around submit + wait even where the
    /// adapter has timestamp queries (the default then is the device time of each
    /// call's compute pass).
    #[arg(long)]
    wall_clock: bool,
}

/// A count of 1 or more (`--scale 0` had meant the full sizes, `--runs 0` one run).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = cases::Opts {
        warmup: args.warmup.unwrap_or(if args.quick { 1 } else { 2 }),
        runs: args.runs.unwrap_or(if args.quick { 5 } else { 11 }),
        max_binding: args.max_binding,
        host_row: !args.no_host,
        breakdown: args.breakdown,
        scale: args.scale.or(args.quick.then_some(64)),
        scaling: args.scaling,
        wall_clock: args.wall_clock,
    };
    let report = match args.backend {
        BackendArg::Gpu => cases::run_gpu(opts),
        BackendArg::Cpu => cases::run_cpu(opts),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench_report: {e}");
            return ExitCode::FAILURE;
        }
    };
    report.print();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json()).expect("json");
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("bench_report: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
