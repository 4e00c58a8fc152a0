//! Micro-batch clipping of per-sample gradients stored as NumPy `.npy` files.
//!
//! ```text
//! cargo run --release --example clip_npy -- \
//!     --grads G.npy (--micro-batch B | --offsets O.npy) --clip (C | min[:SCALE]) \
//!     [--non-finite skip|propagate|error] [--backend auto|gpu|cpu] \
//!     --out OUT.npy [--norms NORMS.npy] [--stats STATS.json]
//! ```
//!
//! * `G.npy`: 2-D `[N, D]` float32 or float64 (float64 is rounded to float32), C or
//!   Fortran order.
//! * `O.npy`: 1-D int32/int64/uint32/uint64 row offsets `[0, ..., N]`.
//! * `--clip 1.5` is a fixed bound, `--clip min` the adaptive bound `min_j norm_j`,
//!   `--clip min:0.5` the adaptive bound `0.5 * min_j norm_j`.
//! * `OUT.npy`: float32 `[D]`, the clipped average; `NORMS.npy`: float32 `[M]`;
//!   `STATS.json`: `clipped_count`, `nonfinite_count`, `micro_batches`, `clip_bound`
//!   (null when not finite), `backend` (`"gpu"` / `"cpu"`) and `adapter` (null on
//!   the CPU). The same summary is printed to stdout.
//!
//! Errors are one line on stderr, `error: ...`, with exit status 1.

use clap::{ArgGroup, Parser, ValueEnum};
use microclip::{
    Backend, BackendKind, ClipBound, ClipConfig, Clipper, MicroBatches, NonFinitePolicy,
};
use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};
use std::error::Error;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

type Res<T> = Result<T, Box<dyn Error>>;
type Npy = NpyFile<BufReader<File>>;

/// Micro-batch gradient clipping of a [N, D] .npy gradient matrix.
#[derive(Parser)]
#[command(group(ArgGroup::new("layout").required(true).args(["micro_batch", "offsets"])))]
struct Args {
    /// Per-sample gradients: 2-D [N, D] .npy, float32 or float64 (float64 is rounded to float32)
    #[arg(long, value_name = "G.npy")]
    grads: PathBuf,
    /// Micro-batches of B consecutive rows (the last one is shorter when B does not divide N)
    #[arg(long, value_name = "B", allow_negative_numbers = true)]
    micro_batch: Option<usize>,
    /// Micro-batch row offsets [0, ..., N]: 1-D int32/int64/uint32/uint64 .npy
    #[arg(long, value_name = "O.npy")]
    offsets: Option<PathBuf>,
    /// Clip bound: a number C > 0 (fixed), or min[:SCALE] (adaptive: SCALE * min_j norm_j, SCALE = 1 by default)
    #[arg(long, value_name = "C|min[:SCALE]", value_parser = parse_clip, allow_negative_numbers = true)]
    clip: ClipBound,
    /// What to do with a micro-batch whose mean gradient holds NaN or infinity
    #[arg(long, value_enum, default_value = "skip")]
    non_finite: Policy,
    /// Where to run: the GPU when there is one (auto), the GPU or an error (gpu), the CPU (cpu)
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// Output: the clipped average, float32 [D]
    #[arg(long, value_name = "OUT.npy")]
    out: PathBuf,
    /// Optional output: the micro-batch norms, float32 [M]
    #[arg(long, value_name = "NORMS.npy")]
    norms: Option<PathBuf>,
    /// Optional output: the summary as a JSON object
    #[arg(long, value_name = "STATS.json")]
    stats: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Policy {
    Skip,
    Propagate,
    Error,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Auto,
    Gpu,
    Cpu,
}

fn parse_clip(s: &str) -> Result<ClipBound, String> {
    let num = |v: &str| v.parse::<f32>().map_err(|_| format!("not a number: {v:?}"));
    let bound = match s.strip_prefix("min") {
        Some("") => ClipBound::Adaptive { scale: 1.0 },
        Some(rest) => match rest.strip_prefix(':') {
            Some(scale) => ClipBound::Adaptive { scale: num(scale)? },
            None => return Err(format!("expected C, min or min:SCALE, got {s:?}")),
        },
        None => ClipBound::Fixed(num(s)?),
    };
    match bound {
        ClipBound::Fixed(v) | ClipBound::Adaptive { scale: v } if !(v.is_finite() && v > 0.0) => {
            Err(format!("must be finite and > 0, got {s:?}"))
        }
        _ => Ok(bound),
    }
}

/// The element types `--grads` accepts. Another one (float16, once npyz's `half`
/// feature is on) is one more variant with an arm in `of` and in `read`.
enum GradDtype {
    F32,
    F64,
}

impl GradDtype {
    fn of(dtype: &DType) -> Res<Self> {
        match dtype {
            DType::Plain(t) if t.type_char() == TypeChar::Float => match t.size_field() {
                4 => return Ok(Self::F32),
                8 => return Ok(Self::F64),
                2 => return Err("float16 input is not supported yet; convert to float32".into()),
                _ => {}
            },
            _ => {}
        }
        Err(format!(
            "dtype {} is not supported; need float32 or float64",
            dtype.descr()
        )
        .into())
    }

    /// All elements in file order, as f32 (float64 rounded to nearest).
    fn read(self, npy: Npy) -> Res<Vec<f32>> {
        Ok(match self {
            Self::F32 => npy.into_vec::<f32>()?,
            Self::F64 => npy
                .data::<f64>()?
                .map(|v| v.map(|x| x as f32))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Runs `f`, prefixing its error with the file name.
fn in_file<T>(path: &Path, f: impl FnOnce() -> Res<T>) -> Res<T> {
    f().map_err(|e| format!("{}: {e}", path.display()).into())
}

fn open_npy(path: &Path) -> Res<Npy> {
    Ok(NpyFile::new(BufReader::new(File::open(path)?))?)
}

/// Reads `G` as a row-major `[N, D]` f32 matrix; returns it with `N`.
fn read_grads(path: &Path) -> Res<(Vec<f32>, usize)> {
    in_file(path, || {
        let npy = open_npy(path)?;
        let &[n, d] = npy.shape() else {
            return Err(format!("need a 2-D [N, D] array, got shape {:?}", npy.shape()).into());
        };
        let (n, d) = (usize::try_from(n)?, usize::try_from(d)?);
        if n == 0 || d == 0 {
            return Err(format!("empty array of shape [{n}, {d}]").into());
        }
        let fortran = npy.order() == Order::Fortran;
        let data = GradDtype::of(&npy.dtype())?.read(npy)?;
        if !fortran {
            return Ok((data, n));
        }
        // Column-major: element (i, c) is stored at c * n + i.
        Ok(((0..n * d).map(|k| data[(k % d) * n + k / d]).collect(), n))
    })
}

fn read_offsets(path: &Path) -> Res<Vec<usize>> {
    fn ints<T: npyz::Deserialize + Into<i128>>(npy: Npy) -> Res<Vec<i128>> {
        Ok(npy
            .data::<T>()?
            .map(|v| v.map(Into::into))
            .collect::<Result<_, _>>()?)
    }
    in_file(path, || {
        let npy = open_npy(path)?;
        if npy.shape().len() != 1 {
            return Err(format!("need a 1-D array of offsets, got shape {:?}", npy.shape()).into());
        }
        let kind = match npy.dtype() {
            DType::Plain(t) => Some((t.type_char(), t.size_field())),
            _ => None,
        };
        let offsets = match kind {
            Some((TypeChar::Int, 4)) => ints::<i32>(npy)?,
            Some((TypeChar::Int, 8)) => ints::<i64>(npy)?,
            Some((TypeChar::Uint, 4)) => ints::<u32>(npy)?,
            Some((TypeChar::Uint, 8)) => ints::<u64>(npy)?,
            _ => {
                let want = "need int32, int64, uint32 or uint64";
                return Err(
                    format!("dtype {} is not supported; {want}", npy.dtype().descr()).into(),
                );
            }
        };
        let row =
            |o: i128| usize::try_from(o).map_err(|_| format!("offset {o} is not a row index"));
        Ok(offsets.into_iter().map(row).collect::<Result<_, _>>()?)
    })
}

fn write_f32(path: &Path, data: &[f32]) -> Res<()> {
    in_file(path, || {
        let file = BufWriter::new(File::create(path)?);
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[data.len() as u64])
            .writer(file)
            .begin_nd()?;
        w.extend(data.iter().copied())?;
        Ok(w.finish()?)
    })
}

fn run() -> Res<()> {
    let args = Args::try_parse().map_err(|e| {
        if !e.use_stderr() {
            // --help: print it in full and exit successfully.
            let _ = e.print();
            std::process::exit(0);
        }
        // clap's message up to its first blank line (`main` joins it into one line).
        let text = e.to_string();
        let first = text.split("\n\n").next().unwrap_or_default();
        first.trim_start_matches("error: ").to_string()
    })?;
    let layout = match (&args.offsets, args.micro_batch) {
        (Some(path), _) => MicroBatches::Offsets(read_offsets(path)?),
        (None, b) => MicroBatches::Uniform(b.unwrap_or_default()),
    };
    let policy = match args.non_finite {
        Policy::Skip => NonFinitePolicy::Skip,
        Policy::Propagate => NonFinitePolicy::Propagate,
        Policy::Error => NonFinitePolicy::Error,
    };
    let cfg = match args.clip {
        ClipBound::Fixed(c) => ClipConfig::fixed(c, layout),
        ClipBound::Adaptive { scale } => ClipConfig::adaptive(scale, layout),
    };
    let cfg = cfg.with_non_finite(policy);
    cfg.validate()?;

    let (grads, n) = read_grads(&args.grads)?;
    let mut clipper = Clipper::new(match args.backend {
        BackendArg::Auto => Backend::Auto,
        BackendArg::Gpu => Backend::Gpu,
        BackendArg::Cpu => Backend::Cpu,
    })?;
    let out = clipper.clip(&cfg, &[&grads], n)?;
    write_f32(&args.out, &out.grads[0])?;
    let s = &out.stats;
    if let Some(path) = &args.norms {
        write_f32(path, &s.norms)?;
    }

    let (backend, adapter) = match &s.backend {
        BackendKind::Gpu(name) => ("gpu", Some(name.as_str())),
        BackendKind::Cpu => ("cpu", None),
    };
    let clip_bound = s.clip_bound.is_finite().then_some(s.clip_bound);
    let summary = serde_json::json!({
        "micro_batches": s.norms.len(),
        "clip_bound": clip_bound,
        "clipped_count": s.clipped_count,
        "nonfinite_count": s.nonfinite_count,
        "backend": backend,
        "adapter": adapter,
    });
    if let Some(path) = &args.stats {
        in_file(path, || {
            let mut f = BufWriter::new(File::create(path)?);
            serde_json::to_writer_pretty(&mut f, &summary)?;
            writeln!(f)?;
            Ok(f.flush()?)
        })?;
    }
    println!("micro_batches:   {}", s.norms.len());
    println!("clip_bound:      {}", s.clip_bound);
    println!("clipped_count:   {}", s.clipped_count);
    println!("nonfinite_count: {}", s.nonfinite_count);
    println!("backend:         {backend}");
    println!("adapter:         {}", adapter.unwrap_or("none"));
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Always one line, whatever the error text holds.
            let words: Vec<String> = e.to_string().split_whitespace().map(String::from).collect();
            eprintln!("error: {}", words.join(" "));
            ExitCode::FAILURE
        }
    }
}
