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

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A host element type [`crate::Clipper::clip`] accepts: `f32`, [`half::f16`] or
/// [`half::bf16`] (re-exported as `microclip::half`). Sealed.
pub trait GradElement: bytemuck::Pod + Send + Sync + sealed::Sealed {
    /// The matching [`Dtype`].
    const DTYPE: Dtype;
    /// The value as f32: exact for all three types, NaN payloads kept (as the GPU
    /// loaders do), with integer operations and selects only, so that the CPU
    /// backend's loops, which widen every element as they read it, vectorise.
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
/// decode): normal numbers rebiased, infinities and NaNs moved into place,
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
    fn sizes_and_indices() {
        for (i, d) in Dtype::ALL.iter().enumerate() {
            assert_eq!(d.index(), i);
        }
        assert_eq!(Dtype::Bf16.size_bytes(), 2);
        assert_eq!(Dtype::F32.to_string(), "f32");
    }
}
