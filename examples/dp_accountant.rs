//! RDP privacy accountant for DP-SGD with (micro-batch) clipping.
//!
//! Epsilon spent:
//!
//! ```text
//! cargo run --release --example dp_accountant -- --sampling-rate 0.0042667 \
//!     --noise-multiplier 1.1 --micro-batch-size 1 --steps 14062 --delta 1e-5
//! ```
//!
//! prints a short summary and, as its last line, `epsilon=<value> order=<alpha>`.
//!
//! Noise multiplier needed for a target epsilon:
//!
//! ```text
//! cargo run --release --example dp_accountant -- --sampling-rate 0.0042667 \
//!     --target-epsilon 3 --micro-batch-size 8 --steps 14062 --delta 1e-5
//! ```
//!
//! prints `noise_multiplier=<multiplier>` as its last line: the value to put in
//! `GaussianNoise::multiplier` (exactly representable as `f32`).
//!
//! The sampling rate is the expected batch size over the dataset size (Poisson
//! sampling). The noise multiplier is the configured `GaussianNoise` multiplier
//! (accounted as the f32 that field holds): the noise standard deviation over
//! the total clip bound `S`, for noise added to the SUM of the clipped
//! micro-batch means. `--micro-batch-size B` is the most examples a micro-batch
//! can hold (1 = per-example clipping): with `B > 1` one example can move the sum
//! by `2 S`, so the accountant's sigma is half the multiplier
//! (`accountant::micro_batch_sensitivity`). Bad arguments print one
//! `error: ...` line and exit with a non-zero status; that includes numbers
//! that overflow `f64` (such as `1e400`) or underflow it to 0, and a noise
//! multiplier beyond the largest `f32` (about `3.4e38`), which
//! `GaussianNoise::multiplier` cannot hold.

#[path = "shared/parse_float.rs"]
mod parse_float;

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use microclip::accountant;

/// RDP accountant for the Poisson-subsampled Gaussian mechanism (DP-SGD).
#[derive(Parser, Debug)]
#[command(name = "dp_accountant")]
struct Args {
    /// Sampling rate q = expected batch size / dataset size, in [0, 1].
    #[arg(long, value_name = "Q", value_parser = parse_f64, allow_negative_numbers = true)]
    sampling_rate: f64,

    /// Configured noise multiplier (noise std / total clip bound S, noise added
    /// to the sum): compute epsilon.
    #[arg(
        long,
        value_name = "SIGMA",
        value_parser = parse_f64,
        allow_negative_numbers = true,
        conflicts_with = "target_epsilon",
        required_unless_present = "target_epsilon"
    )]
    noise_multiplier: Option<f64>,

    /// Target epsilon: compute the smallest noise multiplier that reaches it.
    #[arg(long, value_name = "E", value_parser = parse_f64, allow_negative_numbers = true)]
    target_epsilon: Option<f64>,

    /// The most examples a micro-batch can hold, over all steps (1 = per-example
    /// clipping; more doubles the sensitivity to 2 S). Examples, not rows: rows
    /// that are already micro-batch means count their examples.
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u64).range(1..))]
    micro_batch_size: u64,

    /// Number of training steps (noisy releases).
    #[arg(long, value_name = "T")]
    steps: u64,

    /// Target delta, in (0, 1).
    #[arg(long, value_name = "DELTA", value_parser = parse_f64, allow_negative_numbers = true)]
    delta: f64,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            return fail(&clap_error_line(&e));
        }
    };
    match run(&args) {
        Ok(lines) => {
            let mut out = std::io::stdout().lock();
            for line in lines {
                if writeln!(out, "{line}").is_err() {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// An `f64` argument (`shared/parse_float.rs`).
fn parse_f64(text: &str) -> Result<f64, String> {
    parse_float::parse_float(text)
}

/// A clap error as one line: its first paragraph (the message and, for missing
/// arguments, their names), without clap's own `error: ` prefix, usage or tips.
fn clap_error_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let msg = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let msg = msg.trim_start_matches("error:").trim();
    if msg.is_empty() {
        "invalid arguments".to_string()
    } else {
        msg.to_string()
    }
}

fn fail(msg: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {msg}");
    ExitCode::from(2)
}

/// The noise multiplier as `GaussianNoise::multiplier` (an `f32`) holds it,
/// or why it cannot.
fn configured_multiplier(given: f64) -> Result<f64, String> {
    if !(given.is_finite() && given >= 0.0) {
        return Err(accountant::AccountantError::InvalidNoiseMultiplier(given).to_string());
    }
    // Values from f32::MAX up to half an f32 ulp above it round to f32::MAX;
    // beyond, the conversion gives +inf.
    let multiplier = given as f32;
    if multiplier.is_infinite() {
        return Err(format!(
            "noise multiplier {given:e} is beyond the largest f32 ({:e}), so \
             GaussianNoise::multiplier (an f32) cannot hold it",
            f32::MAX
        ));
    }
    Ok(f64::from(multiplier))
}

/// The summary lines, or the one-line error message.
fn run(args: &Args) -> Result<Vec<String>, String> {
    let msg = |e: accountant::AccountantError| e.to_string();
    let (q, steps, delta) = (args.sampling_rate, args.steps, args.delta);
    let size = args.micro_batch_size;
    let sensitivity =
        accountant::micro_batch_sensitivity(usize::try_from(size).unwrap_or(usize::MAX));
    let sensitivity_line = if sensitivity == 1.0 {
        "  sensitivity      : 1 S (one example per micro-batch)".to_string()
    } else {
        format!("  sensitivity      : {sensitivity} S (micro-batches of up to {size} examples)")
    };
    let orders = accountant::default_orders();
    let mut lines = vec![
        "Poisson-subsampled Gaussian mechanism, RDP accountant".to_string(),
        format!("  sampling rate q  : {q}"),
        format!("  steps            : {steps}"),
        format!("  delta            : {delta}"),
        format!(
            "  RDP orders       : {} ({} .. {})",
            orders.len(),
            orders[0],
            orders[orders.len() - 1]
        ),
    ];
    match args.noise_multiplier {
        Some(given) => {
            // The noise microclip adds: GaussianNoise::multiplier is an f32.
            let multiplier = configured_multiplier(given)?;
            let sigma = multiplier / sensitivity;
            let (eps, order) = accountant::epsilon(q, sigma, steps, delta).map_err(msg)?;
            let (classic, classic_order) =
                accountant::epsilon_classic(q, sigma, steps, delta).map_err(msg)?;
            lines.push(format!("  noise multiplier : {multiplier} (as f32)"));
            lines.push(sensitivity_line);
            lines.push(format!("  accounting sigma : {sigma}"));
            lines.push(format!(
                "  epsilon          : {eps:.4} (Balle et al. 2020 conversion, as Opacus / dp_accounting)"
            ));
            lines.push(format!(
                "  epsilon, classic : {classic:.4} at order {classic_order} (eps = rdp - ln(delta)/(alpha-1))"
            ));
            lines.push(format!("epsilon={eps} order={order}"));
        }
        None => {
            // clap makes one of the two required; a missing target reads as NaN
            // and is reported as an invalid target epsilon.
            let target = args.target_epsilon.unwrap_or(f64::NAN);
            // The search returns an f32-exact sigma; doubling keeps it exact.
            let sigma =
                accountant::noise_multiplier_for_epsilon(q, steps, delta, target).map_err(msg)?;
            let multiplier = sigma * sensitivity;
            let (eps, order) = accountant::epsilon(q, sigma, steps, delta).map_err(msg)?;
            lines.push(format!("  target epsilon   : {target}"));
            lines.push(sensitivity_line);
            lines.push(format!("  accounting sigma : {sigma}"));
            lines.push(format!(
                "  epsilon reached  : {eps:.6} at order {order} (Balle et al. 2020 conversion)"
            ));
            lines.push(format!("noise_multiplier={multiplier}"));
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(extra: &[&str]) -> Result<Vec<String>, String> {
        let mut argv = vec![
            "dp_accountant",
            "--sampling-rate",
            "0.01",
            "--micro-batch-size",
            "1",
            "--steps",
            "1000",
        ];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| clap_error_line(&e))?;
        run(&args)
    }

    #[test]
    fn huge_noise_multiplier_is_named_not_inf() {
        // 1e39 is a finite f64 but beyond f32::MAX: the f32 conversion gave
        // +inf, reported as "noise multiplier ... got inf".
        for sigma in ["1e39", "3.5e38", "1e300"] {
            let err = run_with(&["--noise-multiplier", sigma, "--delta", "1e-5"]).unwrap_err();
            assert!(
                err.contains("beyond the largest f32") && !err.contains("inf"),
                "{sigma}: {err}"
            );
        }
        // The largest f32 itself is accounted: epsilon 0.
        let lines = run_with(&["--noise-multiplier", "3.4e38", "--delta", "1e-5"]).unwrap();
        assert!(lines.last().unwrap().starts_with("epsilon=0 "), "{lines:?}");
    }

    #[test]
    fn numbers_beyond_f64_are_named_not_inf_or_zero() {
        for (flag, text) in [
            ("--noise-multiplier", "1e400"),
            ("--delta", "1e400"),
            ("--target-epsilon", "1e999"),
            ("--delta", "1e-400"),
            ("--noise-multiplier", "2.5e-330"),
        ] {
            let mut extra = vec![flag, text];
            if flag != "--delta" {
                extra.extend(["--delta", "1e-5"]);
            }
            if flag == "--delta" {
                extra.extend(["--noise-multiplier", "1"]);
            }
            let err = run_with(&extra).unwrap_err();
            assert!(
                err.contains(text) && !err.contains("got inf") && !err.contains("got 0"),
                "{flag} {text}: {err}"
            );
        }
        // inf, NaN and zeros typed as such still reach the range checks.
        let err = run_with(&["--noise-multiplier", "inf", "--delta", "1e-5"]).unwrap_err();
        assert!(err.contains("got inf"), "{err}");
        let err = run_with(&["--noise-multiplier", "1", "--delta", "0.0e-400"]).unwrap_err();
        assert!(err.contains("got 0"), "{err}");
        assert_eq!(parse_f64("0.000e5"), Ok(0.0));
        assert_eq!(parse_f64("1e-320"), Ok(1e-320));
    }

    #[test]
    fn negative_numbers_reach_the_range_checks() {
        // clap read a value such as `-1` as an unknown flag ("unexpected
        // argument '-1'"), so a negative value needed `--flag=-1`. (clap's
        // negative numbers have no signed exponent: `-1e-5` still needs `=`.)
        for (flag, text, named) in [
            ("--target-epsilon", "-1", "epsilon"),
            ("--noise-multiplier", "-0.5", "noise multiplier"),
            ("--delta", "-0.001", "delta"),
        ] {
            let mut extra = vec![flag, text];
            if flag != "--delta" {
                extra.extend(["--delta", "1e-5"]);
            } else {
                extra.extend(["--noise-multiplier", "1"]);
            }
            let err = run_with(&extra).unwrap_err();
            assert!(
                err.to_lowercase().contains(named) && !err.contains("unexpected argument"),
                "{flag} {text}: {err}"
            );
        }
        let err = Args::try_parse_from([
            "dp_accountant",
            "--sampling-rate",
            "-0.1",
            "--micro-batch-size",
            "1",
            "--steps",
            "10",
            "--delta",
            "1e-5",
            "--noise-multiplier",
            "1",
        ])
        .map_err(|e| clap_error_line(&e))
        .and_then(|a| run(&a))
        .unwrap_err();
        assert!(err.contains("sampling rate"), "{err}");
    }
}
