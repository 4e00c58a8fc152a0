//! Micro-batch clipping of per-sample gradients stored as NumPy `.npy` files.
//!
//! ```text
//! cargo run --release --example clip_npy -- \
//!     --grads G.npy (--micro-batch B | --offsets O.npy) --clip (C | C1,C2,... | min[:SCALE]) \
//!     [--mode hard|auto|normalize] [--gamma GAMMA] [--groups COLS.npy] \
//!     [--noise-multiplier SIGMA --seed SEED --step STEP] \
//!     [--non-finite skip|propagate|error] [--backend auto|gpu|cpu] \
//!     --out OUT.npy [--norms NORMS.npy] [--stats STATS.json]
//! ```
//!
//! * `G.npy`: 2-D `[N, D]` float16, float32 or float64 (float64 is rounded to
//!   float32, and a finite value beyond the float32 range is an error; float16 is
//!   clipped as 16-bit input, half the bytes to read), C or Fortran order. Every
//!   input's data section must hold exactly the bytes its shape needs (an input
//!   that is not a regular file, such as a pipe, is read into memory to check).
//! * `O.npy`: 1-D int32/int64/uint32/uint64 row offsets `[0, ..., N]`.
//! * `--clip 1.5` is a fixed bound, `--clip min` the adaptive bound `min_j norm_j`,
//!   `--clip min:0.5` the adaptive bound `0.5 * min_j norm_j`, `--clip 1,0.5` one
//!   fixed bound per group (with `--groups`; a single number applies to every group).
//! * `--mode`: `hard` `min(1, C / norm)` (default), `auto` AUTO-S `C / (norm + GAMMA)`
//!   (`--gamma`, default 0.01), `normalize` `C / norm`.
//! * `COLS.npy`: 1-D integer column offsets `[0, ..., D]` splitting the D columns into
//!   G parameter groups, each clipped against its own bound. The columns of each
//!   group are copied into a tensor of their own on the host (one copy of the input).
//! * `--noise-multiplier SIGMA --seed SEED --step STEP`: DP-SGD Gaussian noise of
//!   standard deviation `SIGMA * sqrt(sum_g C_g^2)` added to the sum before the
//!   division by M; column `c` draws element `c` of the `(SEED, STEP)` stream. All
//!   three or none: the same `(SEED, STEP)` draws the same noise, so every run
//!   needs its own STEP (there is no default to reuse by accident), and SEED is
//!   the noise's secret (random, never published; see `microclip::GaussianNoise`).
//! * `OUT.npy`: float32 `[D]`, the clipped average; `NORMS.npy`: float32 `[M]`, or
//!   `[M, G]` with `--groups`; `STATS.json`: `clipped_count`, `nonfinite_count`,
//!   `micro_batches`, `groups`, `clip_bound` (the total `sqrt(sum_g C_g^2)`, null when
//!   not finite), `group_bounds`, `noise_std`, `backend` (`"gpu"` / `"cpu"`) and
//!   `adapter` (null on the CPU). The same summary is printed to stdout.
//!   The outputs must be three different files, none of them an input. They are
//!   written only when the whole run succeeds (each to a temporary file in its
//!   directory, then renamed over it), and a directory that cannot be written
//!   fails the run before any input is read.
//!
//! Errors are one line on stderr, `error: ...`, with exit status 1.

#[path = "shared/parse_float.rs"]
mod parse_float;

use clap::{ArgGroup, Parser, ValueEnum};
use microclip::half::f16;
use microclip::{
    Backend, BackendKind, ClipBound, ClipConfig, ClipError, ClipFunction, ClipOutput, Clipper,
    GaussianNoise, GradElement, MicroBatches, NonFinitePolicy,
};
use npyz::{DType, NpyFile, NpyHeader, Order, TypeChar, WriterBuilder};
use std::error::Error;
use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

type Res<T> = Result<T, Box<dyn Error>>;
type Npy = NpyFile<Box<dyn Read>>;

/// Micro-batch gradient clipping of a [N, D] .npy gradient matrix.
#[derive(Parser)]
#[command(group(ArgGroup::new("layout").required(true).args(["micro_batch", "offsets"])))]
struct Args {
    /// Per-sample gradients: 2-D [N, D] .npy, float16, float32 or float64 (float64 is rounded to float32)
    #[arg(long, value_name = "G.npy")]
    grads: PathBuf,
    /// Micro-batches of B consecutive rows (the last one is shorter when B does not divide N)
    #[arg(long, value_name = "B", allow_negative_numbers = true)]
    micro_batch: Option<usize>,
    /// Micro-batch row offsets [0, ..., N]: 1-D int32/int64/uint32/uint64 .npy
    #[arg(long, value_name = "O.npy")]
    offsets: Option<PathBuf>,
    /// Clip bound: a number C > 0 (fixed), C1,C2,... (one per group), or min[:SCALE] (adaptive: SCALE * min_j norm_j, SCALE = 1 by default)
    #[arg(long, value_name = "C|C1,C2,...|min[:SCALE]", value_parser = parse_clip, allow_negative_numbers = true)]
    clip: ClipBound,
    /// Clip function: hard min(1, C/norm), auto C/(norm + gamma) (AUTO-S), normalize C/norm
    #[arg(long, value_enum, default_value = "hard")]
    mode: Mode,
    /// AUTO-S stability constant (only with --mode auto)
    #[arg(long, value_name = "GAMMA", value_parser = parse_f32, allow_negative_numbers = true)]
    gamma: Option<f32>,
    /// Parameter groups: 1-D integer column offsets [0, ..., D]
    #[arg(long, value_name = "COLS.npy")]
    groups: Option<PathBuf>,
    /// DP-SGD noise multiplier sigma: Gaussian noise of std sigma * sqrt(sum_g C_g^2)
    #[arg(
        long,
        value_name = "SIGMA",
        value_parser = parse_f32,
        requires = "seed",
        requires = "step",
        allow_negative_numbers = true
    )]
    noise_multiplier: Option<f32>,
    /// Noise generator key: secret and random (needed with --noise-multiplier, and only with it)
    #[arg(
        long,
        value_name = "SEED",
        requires = "noise_multiplier",
        allow_negative_numbers = true
    )]
    seed: Option<u64>,
    /// Noise counter: a new one for every run with one seed (needed with --noise-multiplier, and only with it)
    #[arg(
        long,
        value_name = "STEP",
        requires = "noise_multiplier",
        allow_negative_numbers = true
    )]
    step: Option<u64>,
    /// What to do with a micro-batch whose mean gradient holds NaN or infinity
    #[arg(long, value_enum, default_value = "skip")]
    non_finite: Policy,
    /// Where to run: the GPU when there is one (auto), the GPU or an error (gpu), the CPU (cpu)
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// Output: the clipped average, float32 [D]
    #[arg(long, value_name = "OUT.npy")]
    out: PathBuf,
    /// Optional output: the micro-batch norms, float32 [M], or [M, G] with --groups
    #[arg(long, value_name = "NORMS.npy")]
    norms: Option<PathBuf>,
    /// Optional output: the summary as a JSON object
    #[arg(long, value_name = "STATS.json")]
    stats: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Mode {
    Hard,
    Auto,
    Normalize,
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

/// An `f32` argument (`shared/parse_float.rs`).
fn parse_f32(text: &str) -> Result<f32, String> {
    parse_float::parse_float(text)
}

fn parse_clip(s: &str) -> Result<ClipBound, String> {
    let num = parse_f32;
    let bound = match s.strip_prefix("min") {
        Some("") => ClipBound::Adaptive { scale: 1.0 },
        Some(rest) => match rest.strip_prefix(':') {
            Some(scale) => ClipBound::Adaptive { scale: num(scale)? },
            None => return Err(format!("expected C, min or min:SCALE, got {s:?}")),
        },
        None if s.contains(',') => {
            ClipBound::PerGroup(s.split(',').map(num).collect::<Result<_, _>>()?)
        }
        None => ClipBound::Fixed(num(s)?),
    };
    let values = match &bound {
        ClipBound::Fixed(v) | ClipBound::Adaptive { scale: v } => vec![*v],
        ClipBound::PerGroup(v) => v.clone(),
    };
    if values.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(format!("must be finite and > 0, got {s:?}"));
    }
    Ok(bound)
}

/// The gradient matrix as read: float16 stays 16-bit (clipped as such, with f32
/// accumulation); float32 and float64 (rounded to nearest) become f32.
enum Grads {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Grads {
    /// All elements of the `[n, d]` array `npy` in file order.
    fn read(npy: Npy, n: usize, d: usize) -> Res<Self> {
        let dtype = npy.dtype();
        if let DType::Plain(t) = &dtype {
            if t.type_char() == TypeChar::Float {
                match t.size_field() {
                    2 => return Ok(Self::F16(npy.into_vec::<f16>()?)),
                    4 => return Ok(Self::F32(npy.into_vec::<f32>()?)),
                    8 => return Ok(Self::F32(Self::round_f64(npy, n, d)?)),
                    _ => {}
                }
            }
        }
        Err(format!(
            "dtype {} is not supported; need float16, float32 or float64",
            dtype.descr()
        )
        .into())
    }

    /// float64 elements rounded to f32; a finite value beyond the f32 range (which
    /// would round to an infinity, a non-finite gradient the file does not hold) is
    /// an error naming its (row, column).
    fn round_f64(npy: Npy, n: usize, d: usize) -> Res<Vec<f32>> {
        let fortran = npy.order() == Order::Fortran;
        let mut out = Vec::with_capacity(n * d);
        for (k, x) in npy.data::<f64>()?.enumerate() {
            let x = x?;
            let y = x as f32;
            if y.is_infinite() && x.is_finite() {
                let (i, c) = if fortran {
                    (k % n, k / n)
                } else {
                    (k / d, k % d)
                };
                return Err(format!(
                    "element ({i}, {c}) = {x:e} is beyond the float32 range (magnitude at \
                     most {:e}); rescale the gradients",
                    f32::MAX
                )
                .into());
            }
            out.push(y);
        }
        Ok(out)
    }

    fn len(&self) -> usize {
        match self {
            Self::F16(v) => v.len(),
            Self::F32(v) => v.len(),
        }
    }

    /// Column-major `[n, d]` data reordered to row-major.
    fn fortran_to_row_major(self, n: usize, d: usize) -> Self {
        fn reorder<T: Copy>(data: Vec<T>, n: usize, d: usize) -> Vec<T> {
            // Element (i, c) is stored at c * n + i.
            (0..n * d).map(|k| data[(k % d) * n + k / d]).collect()
        }
        match self {
            Self::F16(v) => Self::F16(reorder(v, n, d)),
            Self::F32(v) => Self::F32(reorder(v, n, d)),
        }
    }
}

/// Runs `f`, prefixing its error with the file name.
fn in_file<T>(path: &Path, f: impl FnOnce() -> Res<T>) -> Res<T> {
    f().map_err(|e| format!("{}: {e}", path.display()).into())
}

/// The longest .npy header `open_npy` reads.
const MAX_HEADER_BYTES: u32 = 1 << 20;

/// Opens an .npy file whose shape and data section agree: the element count fits in
/// 64 bits and the data section holds exactly the bytes the shape needs.
fn open_npy(path: &Path) -> Res<Npy> {
    let mut reader = BufReader::new(File::open(path)?);
    // npyz allocates the header length the file declares (up to 4 GiB in format
    // versions 2 and 3) before reading it: refuse an absurd one first (NumPy's own
    // reader allows 10,000 bytes). The first 12 bytes are read until they are all
    // there (a pipe may deliver fewer at a time), then handed to npyz first.
    let mut head = Vec::with_capacity(12);
    (&mut reader).take(12).read_to_end(&mut head)?;
    if let [0x93, b'N', b'U', b'M', b'P', b'Y', major, _, l0, l1, l2, l3] = head[..] {
        let declared = match major {
            1 => u16::from_le_bytes([l0, l1]) as u32,
            _ => u32::from_le_bytes([l0, l1, l2, l3]),
        };
        if declared > MAX_HEADER_BYTES {
            return Err(format!(
                "the header declares {declared} bytes; at most {MAX_HEADER_BYTES} are read"
            )
            .into());
        }
    }
    // npyz multiplies the dimensions unchecked: a panic in builds with overflow
    // checks (caught here: an error, never a panic), a wrapped element count in
    // others (checked below against the shape).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let header = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        NpyHeader::from_reader(&mut head.as_slice().chain(&mut reader))
    }));
    std::panic::set_hook(hook);
    let header = header.map_err(|_| "the header's shape is too large: npyz cannot read it")??;
    let len = check_shape(header.shape())?;
    if len != header.len() {
        return Err(format!("shape {:?} is too large", header.shape()).into());
    }
    // The data section's size: a regular file's from its length; a pipe's (or
    // other stream's) by reading it into memory, up to one byte more than the
    // shape needs.
    let Some(item) = header.dtype().num_bytes() else {
        return Ok(NpyFile::with_header(header, Box::new(reader)));
    };
    let need = len as u128 * item as u128;
    let wrong_size = |data: String| -> Box<dyn Error> {
        format!(
            "the data section holds {data} bytes, but shape {:?} of dtype {} needs {need} bytes",
            header.shape(),
            header.dtype().descr()
        )
        .into()
    };
    if reader.get_ref().metadata()?.is_file() {
        let start = reader.stream_position()?;
        let data = reader.get_ref().metadata()?.len().saturating_sub(start);
        if data as u128 != need {
            return Err(wrong_size(data.to_string()));
        }
        return Ok(NpyFile::with_header(header, Box::new(reader)));
    }
    let limit = u64::try_from(need).unwrap_or(u64::MAX).saturating_add(1);
    let mut data = Vec::new();
    (&mut reader).take(limit).read_to_end(&mut data)?;
    if data.len() as u128 != need {
        let more = if data.len() as u128 > need {
            "more than "
        } else {
            ""
        };
        return Err(wrong_size(format!(
            "{more}{}",
            need.min(data.len() as u128)
        )));
    }
    Ok(NpyFile::with_header(
        header,
        Box::new(std::io::Cursor::new(data)),
    ))
}

/// The number of elements of `shape`; an error when its non-zero dimensions multiply
/// past `u64::MAX` (npyz also multiplies the dimensions of an empty array).
fn check_shape(shape: &[u64]) -> Res<u64> {
    let mut nonzero = shape.iter().filter(|&&s| s != 0);
    match nonzero.try_fold(1u64, |p, &s| p.checked_mul(s)) {
        Some(_) if shape.contains(&0) => Ok(0),
        Some(len) => Ok(len),
        None => Err(
            format!("shape {shape:?} is too large: its dimensions multiply past 64 bits").into(),
        ),
    }
}

/// Reads `G` as a row-major `[N, D]` matrix; returns it with `N`.
fn read_grads(path: &Path) -> Res<(Grads, usize)> {
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
        let data = Grads::read(npy, n, d)?;
        Ok((
            if fortran {
                data.fortran_to_row_major(n, d)
            } else {
                data
            },
            n,
        ))
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

/// Reads the `--groups` column offsets and checks them against `d` columns.
fn read_column_groups(path: &Path, d: usize) -> Res<Vec<usize>> {
    let cols = read_offsets(path)?;
    let ok = cols.len() >= 2
        && cols[0] == 0
        && cols[cols.len() - 1] == d
        && cols.windows(2).all(|w| w[0] < w[1]);
    if !ok {
        return Err(format!(
            "{}: column groups must be strictly increasing offsets [0, ..., D = {d}], got {cols:?}",
            path.display()
        )
        .into());
    }
    Ok(cols)
}

/// Clips the row-major `[n, d]` matrix `g` whose columns `cols[k]..cols[k + 1]`
/// form tensor k (one tensor without groups; with groups, each group's columns are
/// copied into a tensor of their own).
fn clip_columns<T: GradElement>(
    clipper: &mut Clipper,
    cfg: &ClipConfig,
    g: &[T],
    n: usize,
    cols: &[usize],
) -> microclip::Result<ClipOutput> {
    if cols.len() == 2 {
        return clipper.clip(cfg, &[g], n);
    }
    let d = g.len() / n;
    let tensors: Vec<Vec<T>> = cols
        .windows(2)
        .map(|w| {
            (0..n)
                .flat_map(|i| &g[i * d + w[0]..i * d + w[1]])
                .copied()
                .collect()
        })
        .collect();
    let views: Vec<&[T]> = tensors.iter().map(Vec::as_slice).collect();
    clipper.clip(cfg, &views, n)
}

/// Where `path` leads: the canonical path of an existing file, else its canonical
/// parent directory joined with its file name (the path as given when the parent
/// does not resolve: writing there fails and says so).
fn resolved(path: &Path) -> PathBuf {
    if let Ok(real) = path.canonicalize() {
        return real;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (parent.canonicalize(), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// Refuses outputs that name the same file as another output or as an input (one
/// would silently overwrite the other), by path or, for files that exist, by
/// identity (hard links).
fn check_paths(args: &Args) -> Res<()> {
    type Named<'a> = (&'static str, &'a PathBuf, PathBuf);
    fn named<'a>(paths: [(&'static str, Option<&'a PathBuf>); 3]) -> Vec<Named<'a>> {
        paths
            .into_iter()
            .filter_map(|(flag, path)| path.map(|p| (flag, p, resolved(p))))
            .collect()
    }
    let inputs = named([
        ("--grads", Some(&args.grads)),
        ("--offsets", args.offsets.as_ref()),
        ("--groups", args.groups.as_ref()),
    ]);
    let outputs = named([
        ("--out", Some(&args.out)),
        ("--norms", args.norms.as_ref()),
        ("--stats", args.stats.as_ref()),
    ]);
    for (k, (flag, path, real)) in outputs.iter().enumerate() {
        // The same resolved path, or an existing file under another name (a hard
        // link).
        let same = |o: &&Named| o.2 == *real || same_existing_file(o.1, path);
        if let Some((other, ..)) = outputs[..k].iter().chain(&inputs).find(same) {
            return Err(format!(
                "{flag} {} names the same file as {other}; every output needs a file of \
                 its own",
                path.display()
            )
            .into());
        }
    }
    Ok(())
}

/// Whether `a` and `b` are one existing file (also through hard links), from
/// their metadata: nothing is opened, since an input may be a named pipe whose
/// writer an open and close would take. Hard links are not detected off Unix.
fn same_existing_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    let _ = (a, b);
    false
}

/// `data` as the bytes of a float32 .npy file of the given shape.
fn npy_f32(shape: &[u64], data: &[f32]) -> Res<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut bytes)
        .begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()?;
    Ok(bytes)
}

/// An output file, set up before any input is read: a temporary file in the
/// target's directory (so that a directory that cannot be written fails the run
/// before the work), renamed over the target once every output is written. A
/// failed run leaves every target as it was. A target is replaced by a new file
/// (the old one's other hard links and permissions are not kept). A target that
/// exists and is not a regular file (`/dev/stdout`, a named pipe) is written in
/// place instead, before the renames; a directory is refused.
struct OutputFile {
    /// The target, through any symbolic links (see `resolved`).
    target: PathBuf,
    /// The path as given, for messages.
    given: PathBuf,
    temp: Option<tempfile::NamedTempFile>,
}

impl OutputFile {
    fn create(path: &Path) -> Res<Self> {
        in_file(path, || {
            let target = resolved(path);
            let meta = std::fs::metadata(&target);
            if meta.as_ref().is_ok_and(|m| m.is_dir()) {
                return Err("is a directory".into());
            }
            let special = meta.is_ok_and(|m| !m.is_file());
            let temp = if special {
                None
            } else {
                let dir = match target.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                let mut builder = tempfile::Builder::new();
                builder.prefix(".clip_npy-");
                #[cfg(unix)]
                {
                    // The mode a plain create gives (0666 less the umask), not
                    // the temporary file's 0600.
                    use std::os::unix::fs::PermissionsExt;
                    builder.permissions(std::fs::Permissions::from_mode(0o666));
                }
                Some(builder.tempfile_in(dir)?)
            };
            Ok(Self {
                target,
                given: path.to_path_buf(),
                temp,
            })
        })
    }
}

/// Writes every output's bytes: all temporary files first, then the targets that
/// are not regular files, then each temporary file renamed over its target.
fn write_outputs(outputs: Vec<(OutputFile, Vec<u8>)>) -> Res<()> {
    let mut outputs = outputs;
    for (out, bytes) in &mut outputs {
        if let Some(temp) = &mut out.temp {
            in_file(&out.given, || Ok(temp.write_all(bytes)?))?;
        }
    }
    let (special, regular): (Vec<_>, Vec<_>) =
        outputs.into_iter().partition(|(out, _)| out.temp.is_none());
    for (out, bytes) in special {
        in_file(&out.given, || Ok(std::fs::write(&out.target, &bytes)?))?;
    }
    for (out, _) in regular {
        let temp = out.temp.expect("regular outputs have a temporary file");
        in_file(&out.given, || Ok(temp.persist(&out.target).map(drop)?))?;
    }
    Ok(())
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
    check_paths(&args)?;
    if matches!(args.clip, ClipBound::PerGroup(_)) && args.groups.is_none() {
        return Err(
            "--clip C1,C2,... gives one bound per parameter group: it needs --groups".into(),
        );
    }
    let layout = match (&args.offsets, args.micro_batch) {
        (Some(path), _) => MicroBatches::Offsets(read_offsets(path)?),
        (None, b) => MicroBatches::Uniform(b.unwrap_or_default()),
    };
    let policy = match args.non_finite {
        Policy::Skip => NonFinitePolicy::Skip,
        Policy::Propagate => NonFinitePolicy::Propagate,
        Policy::Error => NonFinitePolicy::Error,
    };
    let function = match (args.mode, args.gamma) {
        (Mode::Hard, None) => ClipFunction::Hard,
        (Mode::Normalize, None) => ClipFunction::Normalize,
        (Mode::Auto, gamma) => ClipFunction::Automatic {
            gamma: gamma.unwrap_or(0.01),
        },
        (_, Some(_)) => return Err("--gamma needs --mode auto".into()),
    };
    let mut cfg = ClipConfig::new(args.clip.clone(), layout)
        .with_non_finite(policy)
        .with_function(function);
    if let Some(multiplier) = args.noise_multiplier {
        cfg = cfg.with_noise(GaussianNoise {
            multiplier,
            seed: args.seed.unwrap_or_default(),
            step: args.step.unwrap_or_default(),
        });
    }
    if args.groups.is_none() {
        cfg.validate()?; // before reading G (with groups: once they are known)
    }

    // Every output's directory is tried before any input is read.
    let out_file = OutputFile::create(&args.out)?;
    let norms_file = args.norms.as_deref().map(OutputFile::create).transpose()?;
    let stats_file = args.stats.as_deref().map(OutputFile::create).transpose()?;

    let (grads, n) = read_grads(&args.grads)?;
    let d = grads.len() / n;
    // Column groups become one tensor per group (a host copy of the input).
    let cols = match &args.groups {
        Some(path) => read_column_groups(path, d)?,
        None => vec![0, d],
    };
    if args.groups.is_some() {
        cfg = cfg.with_groups((0..cols.len() - 1).collect());
    }
    cfg.validate()?;
    let mut clipper = Clipper::new(match args.backend {
        BackendArg::Auto => Backend::Auto,
        BackendArg::Gpu => Backend::Gpu,
        BackendArg::Cpu => Backend::Cpu,
    })?;
    let on_gpu = matches!(clipper.backend(), BackendKind::Gpu(_));
    let out = match &grads {
        Grads::F16(g) => clip_columns(&mut clipper, &cfg, g, n, &cols),
        Grads::F32(g) => clip_columns(&mut clipper, &cfg, g, n, &cols),
    }
    .map_err(|e| -> Box<dyn Error> {
        match e {
            // Beyond what the GPU's buffers hold; the CPU has no such limit.
            ClipError::TooLarge(_) if on_gpu => {
                format!("{e} on the GPU; --backend cpu clips it on the CPU").into()
            }
            e => e.into(),
        }
    })?;
    let s = &out.stats;
    let m = s.norms.len() / s.groups;
    let mut outputs = vec![(out_file, npy_f32(&[d as u64], &out.grads.concat())?)];
    if let Some(file) = norms_file {
        let shape = match args.groups {
            Some(_) => vec![m as u64, s.groups as u64],
            None => vec![m as u64],
        };
        outputs.push((file, npy_f32(&shape, &s.norms)?));
    }

    let (backend, adapter) = match &s.backend {
        BackendKind::Gpu(name) => ("gpu", Some(name.as_str())),
        BackendKind::Cpu => ("cpu", None),
    };
    let finite = |v: f32| v.is_finite().then_some(v);
    let group_bounds: Vec<Option<f32>> = s.group_bounds.iter().map(|&c| finite(c)).collect();
    let summary = serde_json::json!({
        "micro_batches": m,
        "groups": s.groups,
        "clip_bound": finite(s.clip_bound),
        "group_bounds": group_bounds,
        "noise_std": finite(s.noise_std),
        "clipped_count": s.clipped_count,
        "nonfinite_count": s.nonfinite_count,
        "backend": backend,
        "adapter": adapter,
    });
    if let Some(file) = stats_file {
        let mut json = serde_json::to_vec_pretty(&summary)?;
        json.push(b'\n');
        outputs.push((file, json));
    }
    write_outputs(outputs)?;
    // A closed stdout (`| head -0`) is an error like any other, not a panic.
    let print = || -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "micro_batches:   {m}")?;
        writeln!(out, "groups:          {}", s.groups)?;
        writeln!(out, "clip_bound:      {}", s.clip_bound)?;
        writeln!(out, "group_bounds:    {:?}", s.group_bounds)?;
        writeln!(out, "noise_std:       {}", s.noise_std)?;
        writeln!(out, "clipped_count:   {}", s.clipped_count)?;
        writeln!(out, "nonfinite_count: {}", s.nonfinite_count)?;
        writeln!(out, "backend:         {backend}")?;
        writeln!(out, "adapter:         {}", adapter.unwrap_or("none"))?;
        out.flush()
    };
    print().map_err(|e| format!("writing the summary to stdout: {e}"))?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Always one line, whatever the error text holds.
            let words: Vec<String> = e.to_string().split_whitespace().map(String::from).collect();
            let _ = writeln!(std::io::stderr(), "error: {}", words.join(" "));
            ExitCode::FAILURE
        }
    }
}
