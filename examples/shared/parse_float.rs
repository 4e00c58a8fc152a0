//! The examples' float arguments: parsed as the target type, but text that
//! names a finite, non-zero number the type cannot hold is an error rather than
//! an infinity or 0 (`1e39` as `f32`, `1e-400` as `f64`), so that the range
//! checks after it never quote a value the user did not type. Included with
//! `#[path]` by `clip_npy` and `dp_accountant`.

use std::fmt::LowerExp;
use std::str::FromStr;

/// A float type an example parses.
pub trait ParsedFloat: FromStr + Copy + LowerExp + Into<f64> {
    /// The type's name in messages.
    const NAME: &'static str;
    /// The largest finite value.
    const MAX: Self;
    /// The smallest positive (subnormal) value.
    const TINY: Self;
}

impl ParsedFloat for f32 {
    const NAME: &'static str = "f32";
    const MAX: Self = f32::MAX;
    const TINY: Self = f32::from_bits(1);
}

impl ParsedFloat for f64 {
    const NAME: &'static str = "f64";
    const MAX: Self = f64::MAX;
    const TINY: Self = f64::from_bits(1);
}

/// Parses `text` as `T` directly (rounded once, not through a wider type).
/// Beyond `T`'s range that gives an infinity or 0, told apart here from one
/// typed as such; `inf`, `NaN` and negative numbers typed as such are left to
/// the caller's range checks.
pub fn parse_float<T: ParsedFloat>(text: &str) -> Result<T, String> {
    let value: T = text
        .trim()
        .parse()
        .map_err(|_| format!("not a number: {text:?}"))?;
    let wide: f64 = value.into();
    let mantissa = text.split(['e', 'E']).next().unwrap_or("");
    if wide.is_infinite() && mantissa.chars().any(|c| c.is_ascii_digit()) {
        return Err(format!(
            "{text} is beyond the largest {} ({:e})",
            T::NAME,
            T::MAX
        ));
    }
    if wide == 0.0 && mantissa.chars().any(|c| ('1'..='9').contains(&c)) {
        return Err(format!(
            "{text} is nonzero but below the smallest positive {} ({:e})",
            T::NAME,
            T::TINY
        ));
    }
    Ok(value)
}
