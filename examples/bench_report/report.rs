//! Rows, timing helpers, the markdown table, the summary line and the JSON dump.

use std::time::Instant;

use microclip::Dtype;

/// Which implementation a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Microclip,
    Baseline5Pass,
    /// Microclip with its GPU buffer slots set against the adapter's default
    /// (`Clipper::set_gpu_buffer_slots`): on (true) or off; not in the summary.
    MicroclipSlots(bool),
    /// Microclip with its GPU f16 decode set against the adapter's default
    /// (`Clipper::set_gpu_f16_unpack`): `unpack2x16float` (true) or integer
    /// operations; not in the summary.
    MicroclipF16Unpack(bool),
    /// Microclip with its GPU pass 4 over input rows set against the adapter's
    /// default (`Clipper::set_gpu_pass4_chunk_rows`): in chunks of
    /// [`crate::cases::ROW_CHUNK_ROWS`] rows (true) or all rows at once; not in
    /// the summary.
    MicroclipRowChunks(bool),
    /// Microclip with its GPU oct loads of 16-bit rows set against the
    /// adapter's default (`Clipper::set_gpu_oct_loads`): on (true) or off; not
    /// in the summary.
    MicroclipOctLoads(bool),
}

/// One measured case.
#[derive(Debug, Clone)]
pub struct Row {
    pub case: String,
    pub method: Method,
    /// `device`: inputs already in device buffers; `host`: host slices (`clip()`).
    pub path: &'static str,
    pub backend: String,
    pub n: usize,
    /// Total row width over all tensors.
    pub d: usize,
    pub b: usize,
    pub tensors: usize,
    /// Element type of the input.
    pub dtype: Dtype,
    pub median_ms: f64,
    pub runs: usize,
    /// N x D x (2 or 4) (input read once) + D x 4 (output written once).
    pub min_bytes: u64,
    /// Median of the reference read-and-sum over the same input bytes, sampled
    /// interleaved with this row.
    pub read_ms: f64,
    /// Median over the timed rounds of this row's time / the read-sum's time in
    /// the same round ([`paired_ratio`]).
    pub read_ratio: f64,
    pub extra_device_bytes: u64,
    /// 5-pass rows: baseline time / microclip time of the same case.
    pub speedup: Option<f64>,
    /// How the row was timed: `device` (timestamp queries) or `wall`.
    pub timing: &'static str,
    pub note: String,
}

impl Row {
    pub fn micro_batches(&self) -> usize {
        self.n.div_ceil(self.b)
    }

    pub fn gbps(&self) -> f64 {
        self.min_bytes as f64 / (self.median_ms * 1e-3) / 1e9
    }

    pub fn read_ratio(&self) -> f64 {
        self.read_ratio
    }

    fn method_name(&self) -> &'static str {
        match self.method {
            Method::Microclip => "microclip",
            Method::Baseline5Pass => "5-pass baseline",
            Method::MicroclipSlots(true) => "microclip, buffer slots on",
            Method::MicroclipSlots(false) => "microclip, buffer slots off",
            Method::MicroclipF16Unpack(true) => "microclip, f16 by unpack2x16float",
            Method::MicroclipF16Unpack(false) => "microclip, f16 by integer decode",
            Method::MicroclipRowChunks(true) => "microclip, pass 4 in row chunks",
            Method::MicroclipRowChunks(false) => "microclip, pass 4 without row chunks",
            Method::MicroclipOctLoads(true) => "microclip, 16-bit rows as octs",
            Method::MicroclipOctLoads(false) => "microclip, 16-bit rows without octs",
        }
    }
}

/// A timed call: returns its device time in ms when it is timed by timestamp
/// queries (NaN when the driver gave none: the sample is dropped, never replaced
/// by the wall clock), else `None` and the wall clock around it counts.
pub type Timed<'a> = dyn FnMut() -> Option<f64> + 'a;

/// A microclip call's [`Timed`] result: its device time (NaN when missing) when
/// the run is `timed`, else `None`.
pub fn device_ms(timed: bool, time: Option<std::time::Duration>) -> Option<f64> {
    timed.then(|| time.map_or(f64::NAN, |t| t.as_secs_f64() * 1e3))
}

/// Samples without a time (NaN: a timed call whose timestamps were missing).
pub fn missing(samples: &[f64]) -> usize {
    samples.iter().filter(|v| v.is_nan()).count()
}

/// Milliseconds taken by `f`: its device time if it returns one, else the wall
/// clock around it.
pub fn time_ms(f: &mut Timed<'_>) -> f64 {
    let t = Instant::now();
    let device = f();
    device.unwrap_or_else(|| t.elapsed().as_secs_f64() * 1e3)
}

/// Runs every closure `warmup` times, then `runs` rounds of one call each, in
/// turn, so that all see the same background load; returns the samples (ms) per
/// closure.
pub fn interleaved(warmup: usize, runs: usize, fs: &mut [&mut Timed<'_>]) -> Vec<Vec<f64>> {
    for _ in 0..warmup {
        for f in fs.iter_mut() {
            f();
        }
    }
    let mut samples = vec![Vec::with_capacity(runs); fs.len()];
    for _ in 0..runs {
        for (f, s) in fs.iter_mut().zip(&mut samples) {
            s.push(time_ms(*f));
        }
    }
    samples
}

/// The median over the rounds of `ours[i] / read[i]`, each round's time over the
/// read-and-sum's in the same round. The host can change speed for seconds at a
/// time (on the AMD EPYC VM both kernels took about half as long in some stretches
/// as in others), and a change within a row's rounds made the ratio of the two
/// medians compare one kernel's fast rounds with the other's slow ones.
pub fn paired_ratio(ours: &[f64], read: &[f64]) -> f64 {
    let ratios: Vec<f64> = ours.iter().zip(read).map(|(a, b)| a / b).collect();
    median(&ratios)
}

/// The median of the samples that have a time (NaN ones left out).
pub fn median(samples: &[f64]) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    let k = v.len();
    if k == 0 {
        f64::NAN
    } else if k % 2 == 1 {
        v[k / 2]
    } else {
        0.5 * (v[k / 2 - 1] + v[k / 2])
    }
}

/// Everything `bench_report` prints.
pub struct Report {
    /// Lines before the table (adapter, limits, bandwidth, conventions).
    pub header: Vec<String>,
    pub rows: Vec<Row>,
    /// Lines after the table, before the summary line.
    pub footer: Vec<String>,
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

impl Report {
    /// Microclip rows that count for the summary: device path on the GPU, all rows
    /// on the CPU backend (where everything is the host path); not the scaling
    /// series.
    fn summary_rows(&self) -> impl Iterator<Item = &Row> {
        let cpu = self.rows.iter().all(|r| r.backend == "cpu");
        self.rows.iter().filter(move |r| {
            r.method == Method::Microclip
                && (cpu || r.path == "device")
                && !crate::scaling::is_scaling(r)
        })
    }

    /// The 5-pass speedup at b = 1: baseline time / microclip time of the same case.
    pub fn speedup_b1(&self) -> f64 {
        let base = self
            .rows
            .iter()
            .find(|r| r.method == Method::Baseline5Pass && r.b == 1);
        let ours = base.and_then(|bl| {
            self.rows
                .iter()
                .find(|r| r.method == Method::Microclip && r.case == bl.case && r.b == 1)
        });
        match (base, ours) {
            (Some(bl), Some(o)) => bl.median_ms / o.median_ms,
            _ => f64::NAN,
        }
    }

    pub fn summary_line(&self) -> String {
        let worst = self
            .summary_rows()
            .map(Row::read_ratio)
            .fold(f64::NAN, f64::max);
        let worst_b1 = self
            .summary_rows()
            .filter(|r| r.b == 1)
            .map(Row::read_ratio)
            .fold(f64::NAN, f64::max);
        // `nan` (not Rust's `NaN`) where a value does not exist.
        let num = |v: f64| {
            if v.is_nan() {
                "nan".to_string()
            } else {
                format!("{v:.3}")
            }
        };
        format!(
            "summary: worst_read_ratio={} worst_read_ratio_b1={} speedup_vs_5pass_b1={}",
            num(worst),
            num(worst_b1),
            num(self.speedup_b1())
        )
    }

    pub fn print(&self) {
        for line in &self.header {
            println!("{line}");
        }
        println!();
        println!(
            "| case | method | path | input | N | D | b | M | tensors | median ms | min MB | GB/s | read-sum ms | read_ratio | extra device bytes | note |"
        );
        println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for r in &self.rows {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {} | {} |",
                r.case,
                r.method_name(),
                r.path,
                r.dtype,
                r.n,
                r.d,
                r.b,
                r.micro_batches(),
                r.tensors,
                r.median_ms,
                mb(r.min_bytes),
                r.gbps(),
                r.read_ms,
                r.read_ratio(),
                r.extra_device_bytes,
                r.note
            );
        }
        for line in &self.footer {
            println!("{line}");
        }
        println!();
        println!("{}", self.summary_line());
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "case": r.case,
                        "method": r.method_name(),
                        "path": r.path,
                        "backend": r.backend,
                        "N": r.n,
                        "D": r.d,
                        "b": r.b,
                        "M": r.micro_batches(),
                        "tensors": r.tensors,
                        "dtype": r.dtype.name(),
                        "median_ms": r.median_ms,
                        "runs": r.runs,
                        "min_bytes": r.min_bytes,
                        "gbps": r.gbps(),
                        "read_sum_ms": r.read_ms,
                        "read_ratio": r.read_ratio(),
                        "ratio_of_medians": r.median_ms / r.read_ms,
                        "extra_device_bytes": r.extra_device_bytes,
                        "speedup_of_microclip": r.speedup,
                        "timing": r.timing,
                        "note": r.note,
                    })
                })
                .collect(),
        )
    }
}
