//! Element types of the input gradients: f32, and the 16-bit f16 and bf16 (read
//! as such, accumulated in f32 on the GPU and f64 on the CPU; outputs are f32).

/// The element type of an input gradient tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16 ([`half::f16`]).
    F16,
    /// bfloat16 ([`half::bf16`]): the upper 16 bits of an f32.
    Bf16,
}

impl Dtype {
    /// Every element type, in the order of [`Dtype::index`].
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// Bytes per element.
    pub const fn size_bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// Position in [`Dtype::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
        }
    }

    /// The name used in messages and file formats: `"f32"`, `"f16"`, `"bf16"`.
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub(crate) mod sealed {
    /// Crate-private methods of [`super::GradElement`] (outside users cannot
    /// name this trait).
    pub trait Sealed: Sized + Copy {
        /// Eight consecutive values as f32 (the CPU backend's hot loops widen a
        /// vector of them at a time): exact; NaN stays NaN.
        #[inline(always)]
        fn to_f32_x8(x: &[Self; 8], _f16c: super::F16c) -> [f32; 8]
        where
            Self: super::GradElement,
        {
            x.map(super::GradElement::to_f32)
        }
    }
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {
        /// With F16C (x86-64), one `vcvtph2ps` for the eight, against a dozen
        /// integer operations per vector for the decode (which also keeps NaN
        /// payloads; the instruction quiets signalling NaNs).
        #[inline(always)]
        fn to_f32_x8(x: &[Self; 8], f16c: super::F16c) -> [f32; 8] {
            #[cfg(target_arch = "x86_64")]
            if f16c.on() {
                // SAFETY: F16c is on only where `F16c::detect` found F16C and AVX
                // usable.
                return unsafe { f16x8_f16c(x) };
            }
            x.map(super::GradElement::to_f32)
        }
    }

    /// Eight f16 as f32 with F16C.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "f16c")]
    #[inline]
    unsafe fn f16x8_f16c(x: &[half::f16; 8]) -> [f32; 8] {
        use std::arch::x86_64::{_mm256_cvtph_ps, _mm_loadu_si128};
        // SAFETY: `x` is 16 readable bytes (unaligned load); __m256 and [f32; 8]
        // have the same size and every bit pattern is valid for both.
        unsafe { std::mem::transmute(_mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().cast()))) }
    }
}

/// Whether f16 values widen with F16C (one instruction per 8 values, x86-64)
/// rather than by the integer decode. Only [`F16c::detect`] says yes, and only
/// where the CPU has F16C and the OS has AVX enabled (`vcvtph2ps` writes a 256-bit
/// register; `is_x86_feature_detected!("f16c")` alone reads the CPUID bit), so a
/// holder of a yes may use the instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct F16c(bool);

impl F16c {
    /// The integer decode.
    pub(crate) const OFF: F16c = F16c(false);

    /// F16C where the CPU and OS support it.
    pub(crate) fn detect() -> F16c {
        #[cfg(target_arch = "x86_64")]
        return F16c(
            std::arch::is_x86_feature_detected!("avx")
                && std::arch::is_x86_feature_detected!("f16c"),
        );
        #[cfg(not(target_arch = "x86_64"))]
        F16c(false)
    }

    /// Whether F16C is used.
    #[inline(always)]
    pub(crate) fn on(self) -> bool {
        self.0
    }
}

/// A host element type [`crate::Clipper::clip`] accepts: `f32`, [`half::f16`] or
/// [`half::bf16`] (re-exported as `microclip::half`). Sealed.
pub trait GradElement: bytemuck::Pod + Send + Sync + sealed::Sealed {
    /// The matching [`Dtype`].
    const DTYPE: Dtype;
    /// The value as f32: exact for all three types, NaN payloads kept (as the GPU
    /// loaders' integer decodes do), with integer operations and selects only, so
    /// that loops over it vectorise. (The CPU backend's hot loops widen 8 values
    /// at a time, f16 with F16C where the CPU has it: exact too, but signalling
    /// NaNs come out quiet, as they do from any f32 -> f64 conversion after it.)
    fn to_f32(self) -> f32;
}

impl GradElement for f32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl GradElement for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
}

impl GradElement for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the upper half of an f32.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// binary16 bits as f32 with integer operations and selects (grads_f16.wgsl's
/// `f16_pair_bits`): normal numbers rebiased, infinities and NaNs moved into place,
/// subnormals as `mantissa * 2^-24` (exact in f32). `half`'s own conversion calls
/// an F16C routine per value (or branches without it), which does not vectorise.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff; // exponent and mantissa
    let normal = (em << 13) + 0x3800_0000;
    let special = (em << 13) | 0x7f80_0000;
    let sub = (em as f32 * f32::from_bits(0x3380_0000)).to_bits(); // 2^-24
    let bits = if em < 0x0400 {
        sub
    } else if em >= 0x7c00 {
        special
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_exact_for_special_values() {
        let h = half::f16::from_bits(0x0001); // smallest subnormal
        assert_eq!(GradElement::to_f32(h) as f64, 2f64.powi(-24));
        assert_eq!(half::f16::INFINITY.to_f32(), f32::INFINITY);
        assert!(half::bf16::NAN.to_f32().is_nan());
        let b = half::bf16::from_bits(0x3f81);
        assert_eq!(GradElement::to_f32(b), f32::from_bits(0x3f81_0000));
    }

    #[test]
    fn conversions_match_half_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            for (got, want) in [
                (
                    GradElement::to_f32(half::f16::from_bits(bits)),
                    half::f16::from_bits(bits).to_f32(),
                ),
                (
                    GradElement::to_f32(half::bf16::from_bits(bits)),
                    half::bf16::from_bits(bits).to_f32(),
                ),
            ] {
                if want.is_nan() {
                    assert!(got.is_nan(), "{bits:#06x}: {got}");
                } else {
                    assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
                }
            }
        }
        // NaN payloads are kept: bf16 0x7f81 is f32 0x7f810000 (signalling), f16
        // 0x7c01 is f32 0x7f802000.
        assert_eq!(
            GradElement::to_f32(half::bf16::from_bits(0x7f81)).to_bits(),
            0x7f81_0000
        );
        assert_eq!(
            GradElement::to_f32(half::f16::from_bits(0x7c01)).to_bits(),
            0x7f80_2000
        );
    }

    #[test]
    fn eight_at_a_time_matches_one_at_a_time() {
        // The integer decode, and on x86-64 with F16C the instruction for f16; NaN
        // stays NaN.
        fn check<T: GradElement>(from_bits: fn(u16) -> T) {
            for first in (0..=u16::MAX).step_by(8) {
                let x: [T; 8] = std::array::from_fn(|i| from_bits(first + i as u16));
                for f16c in [F16c::OFF, F16c::detect()] {
                    let got = T::to_f32_x8(&x, f16c);
                    for (i, (got, one)) in got.into_iter().zip(x).enumerate() {
                        let want = one.to_f32();
                        let at = first as usize + i;
                        if want.is_nan() {
                            assert!(got.is_nan(), "{at:#06x} {f16c:?}");
                        } else {
                            assert_eq!(got.to_bits(), want.to_bits(), "{at:#06x} {f16c:?}");
                        }
                    }
                }
            }
        }
        check(half::f16::from_bits);
        check(half::bf16::from_bits);
        check(|b| f32::from_bits((b as u32) << 16 | 0x1234));
    }

    #[test]
    fn sizes_and_indices() {
        for (i, d) in Dtype::ALL.iter().enumerate() {
            assert_eq!(d.index(), i);
        }
        assert_eq!(Dtype::Bf16.size_bytes(), 2);
        assert_eq!(Dtype::F32.to_string(), "f32");
    }
}
