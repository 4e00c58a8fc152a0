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
//! `error: ...` line and exit with a non-zero status.

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
    #[arg(long, value_name = "Q")]
    sampling_rate: f64,

    /// Configured noise multiplier (noise std / total clip bound S, noise added
    /// to the sum): compute epsilon.
    #[arg(
        long,
        value_name = "SIGMA",
        conflicts_with = "target_epsilon",
        required_unless_present = "target_epsilon"
    )]
    noise_multiplier: Option<f64>,

    /// Target epsilon: compute the smallest noise multiplier that reaches it.
    #[arg(long, value_name = "E")]
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
    #[arg(long, value_name = "DELTA")]
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
        Err(e) => fail(&e.to_string()),
    }
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

fn run(args: &Args) -> Result<Vec<String>, accountant::AccountantError> {
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
            if !(given.is_finite() && given >= 0.0) {
                return Err(accountant::AccountantError::InvalidNoiseMultiplier(given));
            }
            // The noise microclip adds: GaussianNoise::multiplier is an f32.
            let multiplier = f64::from(given as f32);
            let sigma = multiplier / sensitivity;
            let (eps, order) = accountant::epsilon(q, sigma, steps, delta)?;
            let (classic, classic_order) = accountant::epsilon_classic(q, sigma, steps, delta)?;
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
            let sigma = accountant::noise_multiplier_for_epsilon(q, steps, delta, target)?;
            let multiplier = sigma * sensitivity;
            let (eps, order) = accountant::epsilon(q, sigma, steps, delta)?;
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
