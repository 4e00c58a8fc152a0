//! The `clip_npy` example end to end: inputs written with npyz into a temporary
//! directory, the example binary run as a subprocess, and its outputs checked against
//! the float64 reference (`microclip::reference::clip_f64`).

mod common;

use microclip::half::f16;
use microclip::reference::{clip_f64, Reference};
use microclip::{ClipBound, ClipConfig, ClipFunction, GaussianNoise, MicroBatches};
use npyz::{AutoSerialize, DType, NpyFile, Order, WriterBuilder};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const N: usize = 13;
const D: usize = 1027;

/// The clip_npy binary (see `common::example_bin`).
fn example_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| common::example_bin("clip_npy"))
}

/// The backends to run: "gpu" too when `common::gpu()` finds an adapter (it fails the
/// test instead of skipping when `MICROCLIP_REQUIRE_GPU=1`).
fn backends() -> Vec<&'static str> {
    static GPU: OnceLock<bool> = OnceLock::new();
    match *GPU.get_or_init(|| common::gpu().is_some()) {
        true => vec!["cpu", "gpu"],
        false => vec!["cpu"],
    }
}

/// A fresh directory under the system temp dir, removed on drop unless the test failed.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("microclip-clip_npy-{pid}-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn write<T: AutoSerialize>(&self, file: &str, shape: &[usize], order: Order, data: &[T]) {
        let shape: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
        let f = std::fs::File::create(self.path(file)).unwrap();
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape)
            .order(order)
            .writer(std::io::BufWriter::new(f))
            .begin_nd()
            .unwrap();
        for x in data {
            w.push(x).unwrap();
        }
        w.finish().unwrap();
    }

    /// Reads a float32 .npy file written by the example: (shape, data).
    fn read_f32(&self, file: &str) -> (Vec<u64>, Vec<f32>) {
        let npy = NpyFile::new(std::fs::File::open(self.path(file)).unwrap()).unwrap();
        assert_eq!(npy.dtype().descr(), "'<f4'", "{file}: dtype");
        assert_eq!(npy.order(), Order::C);
        (npy.shape().to_vec(), npy.into_vec().unwrap())
    }

    fn stats(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.path("stats.json")).unwrap()).unwrap()
    }

    /// The example with whitespace-separated arguments; `@name` is a file here.
    fn command(&self, args: &str) -> Command {
        let args = args.split_whitespace().map(|a| match a.strip_prefix('@') {
            Some(file) => self.path(file).into_os_string(),
            None => a.into(),
        });
        let mut command = Command::new(example_bin());
        command
            .args(args)
            .env("XDG_RUNTIME_DIR", std::env::temp_dir());
        command
    }

    /// Runs [`Self::command`] to its end.
    fn run(&self, args: &str) -> Output {
        self.command(args).output().expect("running clip_npy")
    }

    /// Runs the example, expecting success; returns stdout.
    fn ok(&self, args: &str) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "clip_npy {args} failed: {stderr}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the example, expecting exit status 1 and one `error: ...` line on stderr.
    fn fails(&self, args: &str) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "clip_npy {args}: {stderr}");
        assert!(
            !stderr.contains("panicked"),
            "clip_npy {args} panicked: {stderr}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].len() > 10,
            "clip_npy {args}: want one `error: ...` line, got {stderr:?}"
        );
        lines[0].to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Random `[N, D]` gradients (both signs, uneven row scales) as float64 and float32,
/// written to `g64.npy` and `g32.npy`. The float64 values carry bits below f32
/// precision; the float32 ones are their rounding, what the example computes with.
fn write_grads(dir: &Dir) -> Vec<f32> {
    let t = common::random_tensors(7, N, &[D], 1.0).remove(0);
    let g64: Vec<f64> = t
        .iter()
        .enumerate()
        .map(|(k, &v)| v as f64 + 1e-12 * k as f64)
        .collect();
    let g32: Vec<f32> = g64.iter().map(|&v| v as f32).collect();
    dir.write("g64.npy", &[N, D], Order::C, &g64);
    dir.write("g32.npy", &[N, D], Order::C, &g32);
    g32
}

/// Checks out.npy, norms.npy, stats.json and the stdout summary against the reference.
fn check_outputs(dir: &Dir, stdout: &str, want: &Reference, backend: &str, what: &str) {
    let (shape, out) = dir.read_f32("out.npy");
    assert_eq!(shape, [D as u64], "{what}: OUT shape");
    let want_out = &want.grads[0];
    let num: f64 = out
        .iter()
        .zip(want_out)
        .map(|(&a, b)| (a as f64 - b).powi(2))
        .sum();
    let den: f64 = want_out.iter().map(|b| b * b).sum();
    let err = (num / den).sqrt();
    assert!(err <= 1e-5, "{what}: OUT relative L2 error {err:e}");

    let (shape, norms) = dir.read_f32("norms.npy");
    let m = want.norms.len();
    assert_eq!(shape, [m as u64], "{what}: NORMS shape");
    for (j, (&a, &b)) in norms.iter().zip(&want.norms).enumerate() {
        assert!(
            (a as f64 - b).abs() <= 1e-5 * b,
            "{what}: norm {j}: {a} vs {b}"
        );
    }

    let stats = dir.stats();
    assert_eq!(stats["micro_batches"], m, "{what}: {stats}");
    assert_eq!(
        stats["clipped_count"], want.clipped_count,
        "{what}: {stats}"
    );
    assert_eq!(stats["nonfinite_count"], 0, "{what}: {stats}");
    let bound = stats["clip_bound"].as_f64().unwrap();
    assert!(
        (bound - want.clip_bound).abs() <= 1e-5 * want.clip_bound,
        "{what}: {stats}"
    );
    assert_eq!(stats["backend"], backend, "{what}: {stats}");
    let adapter = &stats["adapter"];
    match backend {
        "gpu" => assert!(!adapter.as_str().unwrap().is_empty(), "{what}: {stats}"),
        _ => assert!(adapter.is_null(), "{what}: {stats}"),
    }

    // stdout: one `field: value` line per field, with the values of stats.json.
    for (field, value) in stats.as_object().unwrap() {
        let line = stdout.lines().find(|l| l.starts_with(&format!("{field}:")));
        let line = line.unwrap_or_else(|| panic!("{what}: no {field} in {stdout:?}"));
        let got = line[field.len() + 1..].trim();
        match value {
            Value::Number(v) => {
                let (got, v) = (got.parse::<f64>().unwrap(), v.as_f64().unwrap());
                assert!((got - v).abs() <= 1e-6 * v, "{what}: {line:?} vs {value}")
            }
            Value::String(v) => assert_eq!(got, v, "{what}"),
            Value::Array(v) => {
                let got: Vec<f64> = got
                    .trim_matches(['[', ']'])
                    .split(',')
                    .map(|x| x.trim().parse().unwrap())
                    .collect();
                assert_eq!(got.len(), v.len(), "{what}: {line:?}");
                for (a, b) in got.iter().zip(v) {
                    let b = b.as_f64().unwrap();
                    assert!((a - b).abs() <= 1e-6 * b, "{what}: {line:?} vs {value}");
                }
            }
            _ => assert_eq!(got, "none", "{what}"),
        }
    }
}

#[test]
fn uniform_micro_batches_match_reference() {
    let dir = Dir::new("uniform");
    let g = write_grads(&dir);
    let layout = MicroBatches::Uniform(4);

    // A fixed bound halfway between the two middle norms: two of the four micro-batches
    // are clipped, and no norm is near enough to C for rounding to decide.
    let loose = clip_f64(&ClipConfig::fixed(1e30, layout.clone()), &[&g], N).unwrap();
    let mut sorted = loose.norms.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(sorted[2] > 1.01 * sorted[1], "norms too close: {sorted:?}");
    let c = ((sorted[1] + sorted[2]) / 2.0) as f32;
    let want = clip_f64(&ClipConfig::fixed(c, layout), &[&g], N).unwrap();
    assert_eq!(want.clipped_count, 2);

    for backend in backends() {
        for input in ["g32", "g64"] {
            let stdout = dir.ok(&format!(
                "--grads @{input}.npy --micro-batch 4 --clip {c} --backend {backend} \
                 --out @out.npy --norms @norms.npy --stats @stats.json"
            ));
            check_outputs(&dir, &stdout, &want, backend, &format!("{backend} {input}"));
        }
    }
}

/// float16 input (C and Fortran order) is clipped as 16-bit input: the same result
/// as the reference on the values widened to f32.
#[test]
fn float16_input_matches_reference() {
    let dir = Dir::new("f16");
    let g = write_grads(&dir);
    let h: Vec<f16> = g.iter().map(|&x| f16::from_f32(x)).collect();
    let widened: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    let fortran: Vec<f16> = (0..N * D).map(|k| h[(k % N) * D + k / N]).collect();
    dir.write("g16.npy", &[N, D], Order::C, &h);
    dir.write("g16f.npy", &[N, D], Order::Fortran, &fortran);
    let cfg = ClipConfig::adaptive(0.8, MicroBatches::Uniform(3));
    let want = clip_f64(&cfg, &[&widened], N).unwrap();
    for backend in backends() {
        for input in ["g16", "g16f"] {
            let stdout = dir.ok(&format!(
                "--grads @{input}.npy --micro-batch 3 --clip min:0.8 --backend {backend} \
                 --out @out.npy --norms @norms.npy --stats @stats.json"
            ));
            check_outputs(&dir, &stdout, &want, backend, &format!("{backend} {input}"));
        }
    }
}

/// Column groups with one bound each, AUTO-S, and seeded noise: the reference runs
/// on the same columns split into one tensor per group.
#[test]
fn groups_modes_and_noise_match_reference() {
    let dir = Dir::new("groups");
    let g = write_grads(&dir);
    let cols = [0usize, 300, 301, D];
    dir.write("cols.npy", &[4], Order::C, &[0i64, 300, 301, D as i64]);
    let split: Vec<Vec<f32>> = cols
        .windows(2)
        .map(|w| {
            (0..N)
                .flat_map(|i| &g[i * D + w[0]..i * D + w[1]])
                .copied()
                .collect()
        })
        .collect();
    let split: Vec<&[f32]> = split.iter().map(Vec::as_slice).collect();
    let noise = GaussianNoise {
        multiplier: 0.8,
        seed: 12345,
        step: 7,
    };
    let layout = MicroBatches::Uniform(3);
    let cases = [
        (
            "--clip 0.5,0.01,2 --mode hard",
            ClipConfig::new(ClipBound::PerGroup(vec![0.5, 0.01, 2.0]), layout.clone()),
        ),
        (
            "--clip 0.3 --mode auto --gamma 0.05",
            ClipConfig::fixed(0.3, layout.clone())
                .with_function(ClipFunction::Automatic { gamma: 0.05 }),
        ),
        (
            "--clip min:2 --mode normalize",
            ClipConfig::adaptive(2.0, layout.clone()).with_function(ClipFunction::Normalize),
        ),
    ];
    for (flags, cfg) in cases {
        let cfg = cfg.with_groups(vec![0, 1, 2]).with_noise(noise);
        let want = clip_f64(&cfg, &split, N).unwrap();
        let want_out: Vec<f64> = want.grads.concat();
        let rms = (want_out.iter().map(|v| v * v).sum::<f64>() / D as f64).sqrt();
        for backend in backends() {
            let what = format!("{backend} {flags}");
            let stdout = dir.ok(&format!(
                "--grads @g32.npy --micro-batch 3 {flags} --groups @cols.npy \
                 --noise-multiplier 0.8 --seed 12345 --step 7 --backend {backend} \
                 --out @out.npy --norms @norms.npy --stats @stats.json"
            ));
            let (shape, out) = dir.read_f32("out.npy");
            assert_eq!(shape, [D as u64], "{what}");
            for (c, (&a, &b)) in out.iter().zip(&want_out).enumerate() {
                assert!(
                    (a as f64 - b).abs() <= 1e-5 * (b.abs() + rms),
                    "{what}: out[{c}] = {a}, reference {b}"
                );
            }
            let (shape, norms) = dir.read_f32("norms.npy");
            assert_eq!(shape, [5, 3], "{what}: NORMS is [M, G]");
            for (&a, &b) in norms.iter().zip(&want.norms) {
                assert!((a as f64 - b).abs() <= 1e-5 * b, "{what}: norm {a} vs {b}");
            }
            let stats = dir.stats();
            assert_eq!(stats["groups"], 3, "{what}: {stats}");
            assert_eq!(
                stats["clipped_count"], want.clipped_count,
                "{what}: {stats}"
            );
            let std = stats["noise_std"].as_f64().unwrap();
            assert!(
                (std - want.noise_std).abs() <= 1e-5 * want.noise_std,
                "{what}: {stats}"
            );
            assert!(stdout.contains("groups:          3"), "{what}: {stdout}");
        }
    }
    let fails = [
        ("--clip 1,2 --groups @cols.npy", "groups"),
        ("--clip 1,2", "groups"),
        ("--clip 1,-2 --groups @cols.npy", "--clip"),
        ("--clip 1 --gamma 0.1", "--mode auto"),
        ("--clip 1 --mode auto --gamma -1", "gamma"),
        ("--clip 1 --mode soft", "soft"),
        ("--clip 1 --noise-multiplier 1", "--seed"),
        // No default step: a second run would draw the first one's noise.
        ("--clip 1 --noise-multiplier 1 --seed 3", "--step"),
        (
            "--clip 1 --noise-multiplier -1 --seed 3 --step 1",
            "noise multiplier",
        ),
        ("--clip 1 --groups @o_bad.npy", "column groups"),
    ];
    dir.write("o_bad.npy", &[3], Order::C, &[0i64, 500, 400]);
    for (flags, needle) in fails {
        let err = dir.fails(&format!(
            "--grads @g32.npy --micro-batch 3 {flags} --backend cpu --out @out.npy"
        ));
        assert!(
            err.contains(needle),
            "{flags}: {err:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn offsets_and_adaptive_bound_match_reference() {
    let dir = Dir::new("offsets");
    let g = write_grads(&dir);
    let offsets = vec![0usize, 1, 5, 13];
    dir.write("o.npy", &[4], Order::C, &[0i64, 1, 5, 13]);

    for (clip, scale) in [("min", 1.0), ("min:0.5", 0.5)] {
        let cfg = ClipConfig::adaptive(scale, MicroBatches::Offsets(offsets.clone()));
        let want = clip_f64(&cfg, &[&g], N).unwrap();
        assert!(want.clipped_count >= 2, "--clip {clip}: {want:?}");
        for backend in backends() {
            for input in ["g32", "g64"] {
                let stdout = dir.ok(&format!(
                    "--grads @{input}.npy --offsets @o.npy --clip {clip} --backend {backend} \
                     --non-finite error --out @out.npy --norms @norms.npy --stats @stats.json"
                ));
                let what = format!("{backend} {input} --clip {clip}");
                check_outputs(&dir, &stdout, &want, backend, &what);
            }
        }
    }
}

/// Every offsets integer type and a Fortran-ordered G give bitwise the same output.
#[test]
fn offset_dtypes_and_fortran_order() {
    let dir = Dir::new("dtypes");
    let g = write_grads(&dir);
    let column_major: Vec<f32> = (0..N * D).map(|k| g[(k % N) * D + k / N]).collect();
    dir.write("g_fortran.npy", &[N, D], Order::Fortran, &column_major);
    let o = [0u32, 1, 5, 13];
    dir.write("i32.npy", &[4], Order::C, &o.map(|v| v as i32));
    dir.write("i64.npy", &[4], Order::C, &o.map(|v| v as i64));
    dir.write("u32.npy", &[4], Order::C, &o);
    dir.write("u64.npy", &[4], Order::C, &o.map(|v| v as u64));

    let clip = |grads: &str, offsets: &str| {
        dir.ok(&format!(
            "--grads @{grads}.npy --offsets @{offsets}.npy --clip 0.5 --backend cpu --out @o.npy"
        ));
        dir.read_f32("o.npy").1
    };
    let first = clip("g32", "i64");
    for offsets in ["i32", "u32", "u64"] {
        assert_eq!(clip("g32", offsets), first, "offsets as {offsets}");
    }
    assert_eq!(clip("g_fortran", "i64"), first, "Fortran order");
}

/// All micro-batches non-finite: the adaptive bound is NaN, written as JSON null.
#[test]
fn nan_bound_is_null_in_json() {
    let dir = Dir::new("nan");
    let mut g = vec![1.0f32; 6 * 5];
    g[0] = f32::NAN;
    g[2 * 5 + 3] = f32::INFINITY;
    g[4 * 5 + 1] = f32::NAN;
    dir.write("g.npy", &[6, 5], Order::C, &g);
    for backend in backends() {
        let args = format!(
            "--grads @g.npy --micro-batch 2 --clip min --backend {backend} \
             --out @out.npy --stats @stats.json"
        );
        let stdout = dir.ok(&args);
        assert!(stdout.contains("nonfinite_count: 3"), "{backend}: {stdout}");
        assert!(
            stdout.contains("clip_bound:      NaN"),
            "{backend}: {stdout}"
        );
        let stats = dir.stats();
        assert!(stats["clip_bound"].is_null(), "{backend}: {stats}");
        assert_eq!(stats["nonfinite_count"], 3, "{backend}: {stats}");
        assert_eq!(stats["clipped_count"], 0, "{backend}: {stats}");
        assert_eq!(dir.read_f32("out.npy").1, [0.0; 5], "{backend}");

        let err = dir.fails(&format!("{args} --non-finite error"));
        assert!(
            err.contains("micro-batch 0 has a non-finite gradient"),
            "{err}"
        );
    }
}

#[test]
fn bad_inputs_give_one_error_line() {
    let dir = Dir::new("bad");
    let g = [0.5f32; N * 4];
    dir.write("g.npy", &[N, 4], Order::C, &g);
    dir.write("g1d.npy", &[N * 4], Order::C, &g);
    dir.write("g3d.npy", &[N, 2, 2], Order::C, &g);
    dir.write("g_empty.npy", &[N, 0], Order::C, &[] as &[f32]);
    dir.write("g_int.npy", &[N, 4], Order::C, &[1i32; N * 4]);
    dir.write("o_short.npy", &[4], Order::C, &[0i64, 1, 5, 12]);
    dir.write("o_neg.npy", &[4], Order::C, &[-1i64, 1, 5, 13]);
    dir.write("o_float.npy", &[4], Order::C, &[0.0f64, 1.0, 5.0, 13.0]);
    dir.write("o_2d.npy", &[2, 2], Order::C, &[0i64, 1, 5, 13]);
    std::fs::write(dir.path("junk.npy"), "not an npy file").unwrap();
    // complex64: a header written by npyz, then raw zeros.
    let mut f = std::fs::File::create(dir.path("g_c8.npy")).unwrap();
    npyz::WriteOptions::new_header_only()
        .dtype(DType::new_scalar("<c8".parse().unwrap()))
        .shape(&[N as u64, 4])
        .writer(&mut f)
        .write_header_only()
        .unwrap();
    f.write_all(&[0u8; N * 4 * 8]).unwrap();
    drop(f);

    let rest = "--micro-batch 4 --clip 1 --backend cpu --out @out.npy";
    let cases = [
        // (arguments, a word the message must hold)
        (format!("--grads @missing.npy {rest}"), "missing.npy"),
        (format!("--grads @junk.npy {rest}"), "junk.npy"),
        (
            format!("--grads @g_int.npy {rest}"),
            "float16, float32 or float64",
        ),
        (format!("--grads @g_c8.npy {rest}"), "<c8"),
        (format!("--grads @g1d.npy {rest}"), "2-D"),
        (format!("--grads @g3d.npy {rest}"), "2-D"),
        (format!("--grads @g_empty.npy {rest}"), "empty"),
        (
            format!("--grads @g.npy {rest} --non-finite ignore"),
            "ignore",
        ),
        (
            "--grads @g.npy --micro-batch 4 --clip 1 --backend tpu --out @out.npy".into(),
            "tpu",
        ),
        (format!("--grads @g.npy {rest} --bogus"), "--bogus"),
        (
            format!("--grads @g.npy {rest} --offsets @o_short.npy"),
            "--offsets",
        ),
        (
            "--grads @g.npy --micro-batch 4 --clip 1 --backend cpu --out @no-such-dir/o.npy".into(),
            "no-such-dir",
        ),
        ("--grads @g.npy --micro-batch 4 --clip 1".into(), "--out"),
        (
            "--grads @g.npy --micro-batch 4 --out @out.npy".into(),
            "--clip",
        ),
        (
            "--grads @g.npy --clip 1 --out @out.npy".into(),
            "--micro-batch",
        ),
        (
            "--grads @g.npy --micro-batch 0 --clip 1 --out @out.npy".into(),
            "micro-batch size",
        ),
        (
            "--grads @g.npy --micro-batch -2 --clip 1 --out @out.npy".into(),
            "micro-batch",
        ),
        // Per-group bounds need the groups.
        (
            "--grads @g.npy --micro-batch 4 --clip 1,2 --out @out.npy".into(),
            "--groups",
        ),
        // Numbers that f32 cannot hold are named as typed, not as inf or 0.
        (
            format!("--grads @g.npy {rest} --noise-multiplier 1e39 --seed 3"),
            "1e39 is beyond the largest f32",
        ),
        (
            "--grads @g.npy --micro-batch 4 --clip 1e-50 --out @out.npy".into(),
            "1e-50 is nonzero but below",
        ),
        (
            format!("--grads @g.npy {rest} --mode auto --gamma 1e-50"),
            "1e-50 is nonzero but below",
        ),
        // Negative integers reach the integer parser (not "unexpected argument").
        (
            format!("--grads @g.npy {rest} --noise-multiplier 1 --seed -3"),
            "invalid value '-3' for '--seed",
        ),
        (
            format!("--grads @g.npy {rest} --noise-multiplier 1 --seed 3 --step -1"),
            "invalid value '-1' for '--step",
        ),
        // An output directory that does not exist fails before the input is read.
        (
            "--grads @missing.npy --micro-batch 4 --clip 1 --out @no-such-dir/o.npy".into(),
            "no-such-dir",
        ),
    ];
    let offsets = [
        ("o_short", "N = 13"),
        ("o_neg", "offset -1"),
        ("o_float", "int64"),
        ("o_2d", "1-D"),
        ("missing-o", "missing-o.npy"),
    ];
    let offsets = offsets.iter().map(|(o, why)| {
        (
            format!("--grads @g.npy --offsets @{o}.npy --clip 1 --out @out.npy"),
            *why,
        )
    });
    let clips = [
        "0", "-1", "abc", "nan", "inf", "min:0", "min:-1", "min:x", "minimum",
    ];
    let clips = clips.iter().map(|c| {
        (
            format!("--grads @g.npy --micro-batch 4 --clip {c} --out @out.npy"),
            "--clip",
        )
    });
    for (args, needle) in cases.into_iter().chain(offsets).chain(clips) {
        let err = dir.fails(&args);
        assert!(
            err.contains(needle),
            "{args}: {err:?} does not mention {needle:?}"
        );
    }
}

/// A run that fails leaves no output behind, also when only a later output
/// cannot be written; a successful one gives its outputs the mode a plain create
/// gives (not a temporary file's 0600) and leaves no temporary file.
#[test]
fn failed_runs_write_no_output() {
    let dir = Dir::new("nooutput");
    write_grads(&dir);
    let base = "--grads @g32.npy --micro-batch 4 --clip 1 --backend cpu --out @o.npy";
    for bad in ["--norms @no-such-dir/n.npy", "--stats @no-such-dir/s.json"] {
        let err = dir.fails(&format!("{base} {bad}"));
        assert!(err.contains("no-such-dir"), "{bad}: {err}");
        assert!(!dir.path("o.npy").exists(), "{bad}: wrote o.npy");
    }
    // An existing output survives a failed run unchanged.
    std::fs::write(dir.path("o.npy"), b"old").unwrap();
    dir.fails(&format!("{base} --norms @no-such-dir/n.npy"));
    assert_eq!(std::fs::read(dir.path("o.npy")).unwrap(), b"old");
    dir.fails("--grads @g32.npy --micro-batch 0 --clip 1 --out @o.npy --stats @s.json");
    assert_eq!(std::fs::read(dir.path("o.npy")).unwrap(), b"old");
    assert!(!dir.path("s.json").exists());

    // A directory as a later output: refused before anything is written.
    std::fs::create_dir(dir.path("normsdir")).unwrap();
    let err = dir.fails(&format!("{base} --norms @normsdir"));
    assert!(err.contains("is a directory"), "{err}");
    assert_eq!(std::fs::read(dir.path("o.npy")).unwrap(), b"old");

    dir.ok(&format!("{base} --norms @n.npy --stats @s.json"));
    assert_eq!(dir.read_f32("o.npy").0, vec![D as u64]);
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".clip_npy"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = dir.path("plain");
        std::fs::File::create(&plain).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for f in ["o.npy", "n.npy", "s.json"] {
            assert_eq!(mode(&dir.path(f)), mode(&plain), "{f}");
        }
    }
}

#[test]
fn help_mentions_float64_rounding() {
    let dir = Dir::new("help");
    let out = dir.run("--help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("float64 is rounded to float32"), "{help}");
}

/// The bytes of a version 1.0 .npy file with the header dict `{descr, fortran_order,
/// shape}` as given (the shape as Python text), then `data`: for headers npyz will
/// not write.
fn raw_npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let mut text = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    // Magic (6), version (2), header length (2), text: padded to 64 bytes, '\n' last.
    while (10 + text.len() + 1) % 64 != 0 {
        text.push(' ');
    }
    text.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(text.len() as u16).to_le_bytes());
    bytes.extend_from_slice(text.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A shape whose element count overflows 64 bits is an error, not a wrapped count
/// (a [2, 1] matrix) or a panic (npyz's unchecked product in debug builds, an index
/// past the end in the Fortran reorder); so is a data section shorter or longer than
/// the shape needs, and a header longer than 1 MiB.
#[test]
fn overflowing_shape_and_wrong_data_size_are_errors() {
    let dir = Dir::new("overflow");
    let two_floats: Vec<u8> = [0.5f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let huge = "(2, 9223372036854775809)";
    let files: [(&str, Vec<u8>); 10] = [
        ("c", raw_npy("<f4", false, huge, &two_floats)),
        ("f", raw_npy("<f4", true, huge, &two_floats)),
        ("f64", raw_npy("<f8", false, huge, &[0; 16])),
        (
            "h3",
            raw_npy("<f4", false, "(4, 4611686018427387904, 1)", &[]),
        ),
        // Hexadecimal dimensions (valid Python, never written by NumPy); an empty
        // array whose other dimensions overflow (npyz multiplies them for strides).
        (
            "hex",
            raw_npy("<f4", true, "(2, 0x8000000000000001)", &two_floats),
        ),
        (
            "zero",
            raw_npy("<f4", false, "(0, 4294967296, 4294967296)", &[]),
        ),
        ("short", raw_npy("<f4", false, "(3, 2)", &two_floats)),
        ("long", raw_npy("<f4", false, "(1, 1)", &two_floats)),
        ("o_short", raw_npy("<i8", false, "(4,)", &[0; 24])),
        // Version 2.0 declaring a header of 4 GiB - 16 bytes: refused before npyz
        // allocates it.
        ("huge_header", {
            let mut b = b"\x93NUMPY\x02\x00".to_vec();
            b.extend_from_slice(&0xffff_fff0u32.to_le_bytes());
            b.extend_from_slice(b"{'descr': '<f4'");
            b
        }),
    ];
    for (name, bytes) in &files {
        std::fs::write(dir.path(&format!("{name}.npy")), bytes).unwrap();
    }
    dir.write("g.npy", &[4, 2], Order::C, &[1.0f32; 8]);
    let cases = [
        ("--grads @c.npy --micro-batch 1", "c.npy", "too large"),
        ("--grads @f.npy --micro-batch 1", "f.npy", "too large"),
        ("--grads @f64.npy --micro-batch 1", "f64.npy", "too large"),
        ("--grads @h3.npy --micro-batch 1", "h3.npy", "too large"),
        ("--grads @hex.npy --micro-batch 1", "hex.npy", "too large"),
        ("--grads @zero.npy --micro-batch 1", "zero.npy", "too large"),
        (
            "--grads @short.npy --micro-batch 1",
            "short.npy",
            "24 bytes",
        ),
        ("--grads @long.npy --micro-batch 1", "long.npy", "4 bytes"),
        (
            "--grads @huge_header.npy --micro-batch 1",
            "huge_header.npy",
            "header declares 4294967280 bytes",
        ),
        (
            "--grads @g.npy --offsets @o_short.npy",
            "o_short.npy",
            "32 bytes",
        ),
    ];
    for (args, file, needle) in cases {
        for backend in backends() {
            let err = dir.fails(&format!(
                "{args} --clip 1 --backend {backend} --out @out.npy"
            ));
            assert!(
                err.contains(file) && err.contains(needle),
                "{args}: {err:?} does not mention {file:?} and {needle:?}"
            );
            assert!(!dir.path("out.npy").exists(), "{args}: wrote OUT");
        }
    }
}

/// Outputs that name the same file, or an input, are refused before anything is
/// written (also through `..`, symbolic links and hard links); inputs are left as
/// they were.
#[test]
fn outputs_must_not_collide_with_each_other_or_inputs() {
    let dir = Dir::new("collide");
    write_grads(&dir);
    dir.write("o.npy", &[4], Order::C, &[0i64, 1, 5, 13]);
    dir.write("cols.npy", &[3], Order::C, &[0i64, 5, D as i64]);
    std::fs::create_dir(dir.path("sub")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.path("g32.npy"), dir.path("link.npy")).unwrap();
    std::fs::hard_link(dir.path("o.npy"), dir.path("hard.npy")).unwrap();
    let before = |f: &str| std::fs::read(dir.path(f)).unwrap();
    let inputs = ["g32.npy", "o.npy", "cols.npy"].map(|f| (f, before(f)));

    let base = "--grads @g32.npy --offsets @o.npy --groups @cols.npy --clip 1 --backend cpu";
    let mut cases = vec![
        ("--out @x.npy --norms @x.npy", "--norms"),
        ("--out @x.npy --stats @x.npy", "--stats"),
        ("--out @x.npy --norms @y.npy --stats @y.npy", "--stats"),
        ("--out @x.npy --norms @sub/../x.npy", "--norms"),
        ("--out @g32.npy", "--grads"),
        ("--out @sub/../g32.npy", "--grads"),
        ("--out @x.npy --norms @o.npy", "--offsets"),
        ("--out @x.npy --stats @cols.npy", "--groups"),
        ("--out @x.npy --norms @hard.npy", "--offsets"),
    ];
    if cfg!(unix) {
        cases.push(("--out @link.npy", "--grads"));
    }
    for (outputs, needle) in cases {
        let err = dir.fails(&format!("{base} {outputs}"));
        assert!(
            err.contains(needle) && err.contains("same file"),
            "{outputs}: {err:?} does not mention {needle:?}"
        );
        for (f, bytes) in &inputs {
            assert!(&before(f) == bytes, "{outputs}: {f} was changed");
        }
        for f in ["x.npy", "y.npy"] {
            assert!(!dir.path(f).exists(), "{outputs}: wrote {f}");
        }
    }
    dir.ok(&format!(
        "{base} --out @x.npy --norms @sub/x.npy --stats @y.npy"
    ));
}

/// A closed stdout is the usual one-line error with status 1, not a panic.
#[test]
fn closed_stdout_is_an_error_not_a_panic() {
    let dir = Dir::new("stdout");
    dir.write("g.npy", &[4, 3], Order::C, &[1.0f32; 12]);
    let mut child = dir
        .command("--grads @g.npy --micro-batch 2 --clip 1 --backend cpu --out @out.npy")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running clip_npy");
    drop(child.stdout.take()); // the read end: every write to stdout fails
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].contains("stdout"),
        "{stderr:?}"
    );
}

/// float64 values beyond the float32 range are an error naming the element, under
/// every --non-finite policy; a float64 infinity is still a non-finite gradient.
#[test]
fn float64_beyond_float32_range_is_an_error() {
    let dir = Dir::new("f64range");
    let (n, d) = (4, 5);
    let mut g = vec![0.25f64; n * d];
    g[2 * d + 3] = 1e39;
    g[3 * d + 4] = -1e300;
    let fortran: Vec<f64> = (0..n * d).map(|k| g[(k % n) * d + k / n]).collect();
    dir.write("g.npy", &[n, d], Order::C, &g);
    dir.write("gf.npy", &[n, d], Order::Fortran, &fortran);
    let mut edge = vec![0.25f64; n * d];
    edge[1] = f32::MAX as f64;
    edge[2] = -(f32::MAX as f64);
    edge[3] = f64::INFINITY;
    dir.write("edge.npy", &[n, d], Order::C, &edge);
    for input in ["g", "gf"] {
        for policy in ["skip", "propagate", "error"] {
            let err = dir.fails(&format!(
                "--grads @{input}.npy --micro-batch 2 --clip 1 --backend cpu \
                 --non-finite {policy} --out @out.npy"
            ));
            assert!(
                err.contains(&format!("{input}.npy")) && err.contains("(2, 3)"),
                "{input} {policy}: {err:?}"
            );
            assert!(err.contains("float32"), "{input} {policy}: {err:?}");
        }
    }
    let stdout = dir.ok("--grads @edge.npy --micro-batch 2 --clip 1 --backend cpu --out @out.npy");
    assert!(stdout.contains("nonfinite_count: 1"), "{stdout}");
}

/// --seed and --step mean nothing without --noise-multiplier: an error, not ignored.
#[test]
fn seed_and_step_need_noise_multiplier() {
    let dir = Dir::new("seed");
    dir.write("g.npy", &[4, 3], Order::C, &[1.0f32; 12]);
    for flag in ["--seed 3", "--step 2", "--seed 3 --step 2"] {
        let err = dir.fails(&format!(
            "--grads @g.npy --micro-batch 2 --clip 1 --backend cpu --out @out.npy {flag}"
        ));
        assert!(err.contains("--noise-multiplier"), "{flag}: {err:?}");
    }
    let help = String::from_utf8(dir.run("--help").stdout).unwrap();
    assert!(help.contains("[M, G] with --groups"), "{help}");
}

/// A named pipe as the input gives the regular file's result (the output-collision
/// check compares metadata and opens nothing); its data section must hold exactly
/// the bytes its shape needs, as a file's must; a pipe that delivers the header's
/// first bytes in pieces still has its declared header length checked.
#[cfg(unix)]
#[test]
fn named_pipe_input_streams() {
    let dir = Dir::new("fifo");
    let data: Vec<f32> = (0..12).map(|k| k as f32 - 5.5).collect();
    dir.write("g.npy", &[4, 3], Order::C, &data);
    let bytes = std::fs::read(dir.path("g.npy")).unwrap();
    // The output exists (an earlier run's): the collision check compares it.
    std::fs::write(dir.path("from_pipe.npy"), b"old").unwrap();
    let args = "--grads @pipe.npy --micro-batch 2 --clip 1 --backend cpu --out @from_pipe.npy";
    let (status, stderr) = run_on_pipe(&dir, "pipe.npy", vec![bytes.clone()], args);
    assert!(status.success(), "{stderr}");
    dir.ok("--grads @g.npy --micro-batch 2 --clip 1 --backend cpu --out @from_file.npy");
    assert_eq!(
        std::fs::read(dir.path("from_pipe.npy")).unwrap(),
        std::fs::read(dir.path("from_file.npy")).unwrap()
    );
    // Four bytes more, or fewer, than the shape [4, 3] needs.
    let args = "--grads @long.npy --micro-batch 2 --clip 1 --backend cpu --out @o.npy";
    let long = [bytes.as_slice(), &[0; 4]].concat();
    let (status, stderr) = run_on_pipe(&dir, "long.npy", vec![long], args);
    assert!(!status.success());
    assert!(
        stderr.contains("holds more than 48 bytes") && stderr.contains("needs 48 bytes"),
        "{stderr}"
    );
    let args = "--grads @short.npy --micro-batch 2 --clip 1 --backend cpu --out @o.npy";
    let short = bytes[..bytes.len() - 4].to_vec();
    let (status, stderr) = run_on_pipe(&dir, "short.npy", vec![short], args);
    assert!(!status.success());
    assert!(stderr.contains("holds 44 bytes"), "{stderr}");
    assert!(!dir.path("o.npy").exists());
    // A version 2.0 header declaring 4 GiB - 16 bytes, its first 12 bytes
    // arriving in three writes.
    let mut huge = b"\x93NUMPY\x02\x00".to_vec();
    huge.extend_from_slice(&0xffff_fff0u32.to_le_bytes());
    huge.extend_from_slice(b"{'descr': '<f4'");
    let pieces = vec![
        huge[..5].to_vec(),
        huge[5..10].to_vec(),
        huge[10..].to_vec(),
    ];
    let args = "--grads @huge.npy --micro-batch 2 --clip 1 --backend cpu --out @o.npy";
    let (status, stderr) = run_on_pipe(&dir, "huge.npy", pieces, args);
    assert!(!status.success());
    assert!(
        stderr.contains("header declares 4294967280 bytes"),
        "{stderr}"
    );
}

/// Runs clip_npy with `args` while a thread writes `pieces` into the new named
/// pipe `name` of `dir`, pausing between them; its exit status and stderr. A run
/// that blocks for two minutes fails the test; one that exits without opening
/// the pipe leaves the writer to be released here.
#[cfg(unix)]
fn run_on_pipe(
    dir: &Dir,
    name: &str,
    pieces: Vec<Vec<u8>>,
    args: &str,
) -> (std::process::ExitStatus, String) {
    let fifo = dir.path(name);
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    // Write errors are ignored: a reader that refuses the input closes the pipe.
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || -> std::io::Result<()> {
            let mut pipe = std::fs::OpenOptions::new().write(true).open(&fifo)?;
            for piece in pieces {
                pipe.write_all(&piece)?;
                pipe.flush()?;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok(())
        }
    });
    let mut child = dir
        .command(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running clip_npy");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("clip_npy blocked on a named pipe");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    // A writer still waiting to open the pipe (clip_npy never opened it) is let
    // through by a read-write open, which does not block on Linux; its few bytes
    // fit the pipe's buffer.
    let _release = (!writer.is_finished()).then(|| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
    });
    let _ = writer.join().unwrap();
    (status, stderr)
}
