//! The CPU backend's loops over rows: squares, means and their squared norms,
//! sums of rows and weighted sums into the f64 accumulator, each compiled for
//! several SIMD levels (`multiversion`) and reading 16-bit rows in their own
//! type. The planning that calls them is in `mod.rs`.

use std::ops::Range;

use multiversion::multiversion;

use crate::dtype::{Dtype, F16c, GradElement};

/// Independent accumulators of the hot sums: a chain of dependent f64 adds runs at
/// one add per 3-4 cycles, lanes let the compiler vectorise. Fixed, so the order
/// of additions (and the result) does not depend on the machine.
pub(super) const LANES: usize = 8;

// The hot loops, compiled for multiversion's SIMD levels as well as the baseline,
// chosen at run time: on x86-64 AVX-512 of the Ice Lake class (x86-64-v4), AVX2 with FMA and F16C (v3) and v2; SVE (with FP16) on AArch64,
// whose baseline has NEON. AVX-512 took 16-bit input at b = 1 from 83-117 to
// 71-75 ms on the twelfth session's Xeon; f32 moved only at b = 2 and 4, about
// 5% (BENCHMARKS.md). No FMA contraction happens in Rust, so every version
// computes bitwise the same result. They read the input in its own type and widen
// it in registers, 8 values at a time (`lanes_f64`: a shift for bf16, for f16 one
// F16C instruction where the CPU has it, else the exact branch-free decode of
// `GradElement::to_f32`), so 16-bit rows move half the bytes of f32 ones and give
// the same bits as f32 rows of the same values.

/// f32 lanes of [`sum_squares`]' short sums.
pub(super) const SQUARE_LANES: usize = 32;

/// Squares each of [`sum_squares`]' f32 lanes adds before its short sum joins
/// an f64 sum.
pub(super) const SQUARES_PER_LANE: usize = 8;

/// `sum_c x_c^2` over a row segment (a one-row micro-batch's part of a squared
/// norm). The squares are formed and added in f32, [`SQUARES_PER_LANE`] to each
/// of [`SQUARE_LANES`] lanes, and each lane's short sum is then added to an f64
/// sum; the columns after the last whole chunk go to [`sum_squares_f64`]. Each
/// square rounds once and each short sum adds 8 non-negative terms (`8 * 2^-24`
/// of the sum, relative); a square in f32's subnormal range loses at most
/// `2^-150`, which the fallback below keeps within another `2^-24` of the sum.
/// So the result is within about `9 * 2^-24` (5.4e-7) of the exact sum,
/// relative (in the default floating-point environment: with flush-to-zero
/// set by foreign code, subnormal squares would flush). Widening every
/// element to f64 first took 1.4x as long: a throwaway probe summing 1 GB of
/// squares on the Emerald Rapids VM of the twenty-ninth session took 56-58 ms
/// in f64, 40-41 ms this way, against 37-38 ms for a plain f32 sum
/// (BENCHMARKS.md).
///
/// Where f32 cannot hold the squares, the whole segment is summed in f64
/// instead: when the f32 part is not finite (squares beyond f32's range, or
/// inf or NaN input), or below `2^-126` per column (squares in f32's
/// subnormal range keep no relative precision), unless every one of its
/// columns is zero.
#[multiversion(targets = "simd")]
pub(super) fn sum_squares<T: GradElement>(row: &[T], f16c: F16c) -> f64 {
    const CHUNK: usize = SQUARE_LANES * SQUARES_PER_LANE;
    let full = row.len() - row.len() % CHUNK;
    let mut wide = [0.0f64; SQUARE_LANES];
    for chunk in row[..full].chunks_exact(CHUNK) {
        let mut short = [0.0f32; SQUARE_LANES];
        for squares in chunk.chunks_exact(SQUARE_LANES) {
            for (c0, l8) in (0..SQUARE_LANES)
                .step_by(LANES)
                .zip(short.chunks_exact_mut(LANES))
            {
                for (l, x) in l8.iter_mut().zip(lanes_f32(squares, c0, f16c)) {
                    *l += x * x;
                }
            }
        }
        for (w, s) in wide.iter_mut().zip(short) {
            *w += s as f64;
        }
    }
    let chunks: f64 = wide.iter().sum();
    let smallest = full as f64 * f32::MIN_POSITIVE as f64;
    let zeros = || {
        (0..full)
            .step_by(LANES)
            .all(|c0| lanes_f32(row, c0, f16c) == [0.0; LANES])
    };
    if !chunks.is_finite() || (chunks < smallest && !(chunks == 0.0 && zeros())) {
        return sum_squares_f64(row, f16c);
    }
    chunks + sum_squares_f64(&row[full..], f16c)
}

/// `sum_c (x_c as f64)^2` over a row segment, in `LANES` interleaved partial
/// sums (exact squares; [`sum_squares`] where f32 cannot hold them, and for
/// the columns after its last whole chunk).
#[inline(always)]
pub(super) fn sum_squares_f64<T: GradElement>(row: &[T], f16c: F16c) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let full = row.len() - row.len() % LANES;
    let rest = &row[full..];
    for c0 in (0..full).step_by(LANES) {
        let x = lanes_f64(row, c0, f16c);
        for (l, x) in lanes.iter_mut().zip(x) {
            *l += x * x;
        }
    }
    for (l, &x) in lanes.iter_mut().zip(rest) {
        let x = x.to_f32() as f64;
        *l += x * x;
    }
    lanes.iter().sum()
}

/// `dst[c] = src[c]` as f32 (exact), for equal lengths.
#[multiversion(targets = "simd")]
pub(super) fn widen<T: GradElement>(src: &[T], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Stores the means `v` as f32 into `m` (at most LANES of them). `stream`: means
/// read back only after the whole pass, far past the cache (the two-pass path's
/// stored means); on x86-64 they are then written with non-temporal stores
/// where `m` is a whole, 16-byte aligned chunk, so their lines are not read
/// for ownership first (at b = 4 a quarter of the input's bytes). Callers end
/// such a pass with [`fence_streamed_means`]. Otherwise, and for the means a
/// pass reads back soon (the fused path's), plain stores.
#[inline(always)]
pub(super) fn store_means(m: &mut [f32], v: &[f64; LANES], stream: bool) {
    let f: [f32; LANES] = std::array::from_fn(|l| v[l] as f32);
    #[cfg(target_arch = "x86_64")]
    if stream && m.len() == LANES && (m.as_ptr() as usize).is_multiple_of(16) {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        // SAFETY: SSE is in x86-64's baseline; `m` holds LANES = 8 floats and
        // starts 16-byte aligned, so both halves are aligned 16-byte stores
        // within it.
        unsafe {
            _mm_stream_ps(m.as_mut_ptr(), _mm_loadu_ps(f.as_ptr()));
            _mm_stream_ps(m.as_mut_ptr().add(4), _mm_loadu_ps(f.as_ptr().add(4)));
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = stream;
    // A whole chunk as one fixed-size store: with the length known only at run
    // time, `copy_from_slice` became a call to `memcpy` per 8 means.
    match <&mut [f32; LANES]>::try_from(&mut *m) {
        Ok(whole) => *whole = f,
        Err(_) => {
            let len = m.len();
            m.copy_from_slice(&f[..len]);
        }
    }
}

/// Orders this thread's non-temporal stores of [`store_means`] before its later
/// stores, so that the pass's end publishes the means to the other threads
/// (non-temporal stores are not ordered by the release of a plain store).
pub(super) fn fence_streamed_means() {
    // SAFETY: SSE is in x86-64's baseline.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// [`add_k`] of all `K` rows (the first assigned, or added to the f64 sums of
/// the micro-batch's `earlier` rows) followed by a second sweep over the f64
/// row that scales, squares and stores (the two-loop formulation the tests
/// keep), without the f64 row between them: each column's sum, mean and square
/// stay in registers (the same operations in the same order, so the same
/// bits). For micro-batches of up to [`MEAN_ROWS_PER_SWEEP`] rows, where the
/// second sweep cost about as much as the rows' loads (b = 2 took half the
/// time with one sweep), and for the last rows of deeper ones.
#[multiversion(targets = "simd")]
pub(super) fn mean_ssq_k<T: GradElement, const K: usize>(
    x: [&[T]; K],
    inv_n: f64,
    mean: Option<&mut [f32]>,
    stream: bool,
    f16c: F16c,
    earlier: Option<&[f64]>,
) -> f64 {
    let n = x[0].len();
    let full = n - n % LANES;
    let earlier = earlier.map(|e| &e[..n]);
    // Whole chunks of LANES columns (column c0 + l in lane l): the means, in
    // inlined functions rather than closures, which LLVM did not inline for
    // 16-bit rows (f16 at b = 8 took 2.5x as long, one call per lane).
    let chunk = |c0: usize| -> [f64; LANES] { chunk_means(&x, c0, inv_n, f16c, earlier) };
    let mut lanes = [0.0f64; LANES];
    let mut add = |v: &[f64; LANES]| {
        for (a, &v) in lanes.iter_mut().zip(v) {
            *a += v * v;
        }
    };
    match mean {
        Some(mean) => {
            for (c0, m) in (0..full).step_by(LANES).zip(mean.chunks_exact_mut(LANES)) {
                let v = chunk(c0);
                add(&v);
                store_means(m, &v, stream);
            }
            let tail = tail_means(&x, full, inv_n, earlier);
            store_means(&mut mean[full..n], &tail, false);
            add(&tail);
        }
        None => {
            for c0 in (0..full).step_by(LANES) {
                add(&chunk(c0));
            }
            add(&tail_means(&x, full, inv_n, earlier));
        }
    }
    lanes.iter().sum()
}

/// Columns `c0 .. c0 + LANES` of `x` as f32 (exact), one lane each: all LANES
/// in one vector (f16's decode costs a dozen integer operations per vector, or
/// one F16C instruction).
#[inline(always)]
pub(super) fn lanes_f32<T: GradElement>(x: &[T], c0: usize, f16c: F16c) -> [f32; LANES] {
    let x: &[T; LANES] = x[c0..c0 + LANES].try_into().expect("LANES columns");
    T::to_f32_x8(x, f16c)
}

/// Columns `c0 .. c0 + LANES` of `x` as f64 (exact), one lane each.
#[inline(always)]
pub(super) fn lanes_f64<T: GradElement>(x: &[T], c0: usize, f16c: F16c) -> [f64; LANES] {
    // Widened as f32 first (lanes_f32), then as f64 (one vector with AVX-512,
    // two with AVX2).
    let w32 = lanes_f32(x, c0, f16c);
    let mut w = [0.0f64; LANES];
    for l in 0..LANES {
        w[l] = w32[l] as f64;
    }
    w
}

/// Columns of an `n`-column row that [`add_k`] and [`axpy_k`] take in whole
/// chunks of LANES: all whole chunks for 16-bit rows, none for f32 rows.
#[inline(always)]
pub(super) fn chunked_len<T: GradElement>(n: usize) -> usize {
    if T::DTYPE == Dtype::F32 {
        0
    } else {
        n - n % LANES
    }
}

/// The means of columns `c0 .. c0 + LANES` of the K rows: the rows added in order
/// (the first assigned, or added to `earlier`, the f64 column sums of the
/// micro-batch's earlier rows), then scaled by `inv_n`.
#[inline(always)]
pub(super) fn chunk_means<T: GradElement, const K: usize>(
    x: &[&[T]; K],
    c0: usize,
    inv_n: f64,
    f16c: F16c,
    earlier: Option<&[f64]>,
) -> [f64; LANES] {
    let (mut s, rest) = match earlier {
        Some(e) => (e[c0..c0 + LANES].try_into().expect("LANES columns"), &x[..]),
        None => (lanes_f64(x[0], c0, f16c), &x[1..]),
    };
    for r in rest {
        let v = lanes_f64(r, c0, f16c);
        for l in 0..LANES {
            s[l] += v[l];
        }
    }
    for v in &mut s {
        *v *= inv_n;
    }
    s
}

/// The means of columns `full..` (fewer than LANES) in lanes 0.., zeros after
/// (`earlier`: as in [`chunk_means`]).
pub(super) fn tail_means<T: GradElement, const K: usize>(
    x: &[&[T]; K],
    full: usize,
    inv_n: f64,
    earlier: Option<&[f64]>,
) -> [f64; LANES] {
    let mut v = [0.0f64; LANES];
    for (l, v) in v.iter_mut().enumerate().take(x[0].len() - full) {
        let (mut s, rest) = match earlier {
            Some(e) => (e[full + l], &x[..]),
            None => (x[0][full + l].to_f32() as f64, &x[1..]),
        };
        for r in rest {
            s += r[full + l].to_f32() as f64;
        }
        *v = s * inv_n;
    }
    v
}

/// Rows added to a row of f64 sums per sweep by [`add_rows`]: 8, which took
/// the means of deep micro-batches (b = 32, 256) about 13% less time than 4
/// (twenty-eighth session, BENCHMARKS.md).
pub(super) const ROWS_PER_SWEEP: usize = 8;

/// (factor, row) pairs added to the f64 accumulator per sweep by [`axpy_rows`]:
/// 4 (8 made b = 1, a sweep over a group of 4-5 rows, about 6% slower).
pub(super) const AXPY_ROWS_PER_SWEEP: usize = 4;

/// Rows of the largest micro-batch whose mean [`mean_ssq_k`] forms in one sweep
/// (a const K each, in [`Plan::mean_ssq`](super::Plan::mean_ssq)'s match): 8, as [`ROWS_PER_SWEEP`].
/// 16 took N = 1024, D = 65,536, b = 16 from 11.8-13.5 to 11.0-11.9 ms on an
/// Intel Xeon VM (thirty-first session, when 8 rows still took a second sweep
/// over their f64 sums), but 1.3-1.5x as long as 8 on an AMD EPYC VM (Zen 4):
/// 14.2-16.4 against 9.8-12.1 ms there, and the main shape at b = 16 65-70
/// against 50 ms (thirty-fifth session, BENCHMARKS.md). A sweep of K rows
/// reads K streams at once: a plain f32 sum of K rows at a time over 256 MB on
/// that VM's 2 cores read 27-33 GB/s at K = 4 to 8, 24-30 at 16 and 14-20 at
/// 24 to 32, with rows on the 4 KiB grid or off it; two 8-row sweeps per
/// block of columns ([`Plan::mean_ssq`](super::Plan::mean_ssq)'s order for 16 rows) read as fast as
/// K = 8 (thirty-sixth session).
pub(super) const MEAN_ROWS_PER_SWEEP: usize = 8;

/// `sum[c] = sum_i x_i[c]` in f64 over the rows `rows` (`row(i)`), added in order,
/// [`ROWS_PER_SWEEP`] rows at a time ([`add_k`]): each column's sum stays in a
/// register across the rows, so the f64 row is loaded and stored once per sweep
/// instead of once per row (the same additions in the same order: the same bits
/// as one row at a time).
pub(super) fn add_rows<'x, T: GradElement>(
    sum: &mut [f64],
    rows: Range<usize>,
    row: impl Fn(usize) -> &'x [T],
    f16c: F16c,
) {
    for start in rows.clone().step_by(ROWS_PER_SWEEP) {
        let first = start == rows.start;
        let x = |i: usize| row(start + i);
        match (rows.end - start).min(ROWS_PER_SWEEP) {
            8 => add_k::<T, 8>(sum, std::array::from_fn(x), first, f16c),
            7 => add_k::<T, 7>(sum, std::array::from_fn(x), first, f16c),
            6 => add_k::<T, 6>(sum, std::array::from_fn(x), first, f16c),
            5 => add_k::<T, 5>(sum, std::array::from_fn(x), first, f16c),
            4 => add_k::<T, 4>(sum, std::array::from_fn(x), first, f16c),
            3 => add_k::<T, 3>(sum, std::array::from_fn(x), first, f16c),
            2 => add_k::<T, 2>(sum, std::array::from_fn(x), first, f16c),
            _ => add_k::<T, 1>(sum, [x(0)], first, f16c),
        }
    }
}

/// `sum[c] = x_0[c] + x_1[c] + ...` (`first`: a sum's first rows) or
/// `sum[c] += x_0[c] + ...`, added one row after the other, in f64.
#[multiversion(targets = "simd")]
pub(super) fn add_k<T: GradElement, const K: usize>(
    sum: &mut [f64],
    x: [&[T]; K],
    first: bool,
    f16c: F16c,
) {
    let n = sum.len();
    let x = x.map(|x| &x[..n]);
    // The first row of a sum is assigned, not added.
    let (x0, rest) = if first {
        (Some(x[0]), &x[1..])
    } else {
        (None, &x[..])
    };
    // 16-bit rows: whole chunks of LANES columns, each row widened a vector at a
    // time (lanes_f64; one column at a time, LLVM decoded f16 4 lanes at a time
    // and spilled), then the rest one column at a time: the same additions.
    // f32 rows: all one column at a time (the chunks took f32 at b = 32 10%
    // longer: bounds checks and fewer loads in flight per iteration).
    let full = chunked_len::<T>(n);
    for (c0, s) in (0..full).step_by(LANES).zip(sum.chunks_exact_mut(LANES)) {
        let mut v = match x0 {
            Some(x0) => lanes_f64(x0, c0, f16c),
            None => s.try_into().expect("LANES columns"),
        };
        for x in rest {
            let w = lanes_f64(x, c0, f16c);
            for l in 0..LANES {
                v[l] += w[l];
            }
        }
        s.copy_from_slice(&v);
    }
    for c in full..n {
        let mut s = match x0 {
            Some(x0) => x0[c].to_f32() as f64,
            None => sum[c],
        };
        for x in rest {
            s += x[c].to_f32() as f64;
        }
        sum[c] = s;
    }
}

/// `acc[c] += h * x[c]` in f64 for every (factor h, row x) pair in order,
/// [`AXPY_ROWS_PER_SWEEP`] pairs at a time ([`axpy_k`]): the same operations per column
/// as one pair at a time (the same bits), one load and store of the accumulator
/// per sweep.
pub(super) fn axpy_rows<T: GradElement>(acc: &mut [f64], terms: &[(f64, &[T])], f16c: F16c) {
    for chunk in terms.chunks(AXPY_ROWS_PER_SWEEP) {
        let h = |i: usize| chunk[i].0;
        let x = |i: usize| chunk[i].1;
        match chunk.len() {
            4 => axpy_k::<T, 4>(acc, std::array::from_fn(h), std::array::from_fn(x), f16c),
            3 => axpy_k::<T, 3>(acc, std::array::from_fn(h), std::array::from_fn(x), f16c),
            2 => axpy_k::<T, 2>(acc, std::array::from_fn(h), std::array::from_fn(x), f16c),
            _ => axpy_k::<T, 1>(acc, [h(0)], [x(0)], f16c),
        }
    }
}

/// `acc[c] = (acc[c] + h_0 * x_0[c]) + h_1 * x_1[c] + ...`, in f64.
#[multiversion(targets = "simd")]
pub(super) fn axpy_k<T: GradElement, const K: usize>(
    acc: &mut [f64],
    h: [f64; K],
    x: [&[T]; K],
    f16c: F16c,
) {
    let n = acc.len();
    let x = x.map(|x| &x[..n]);
    // As add_k: whole chunks of LANES columns (16-bit rows), then the rest.
    let full = chunked_len::<T>(n);
    for (c0, a) in (0..full).step_by(LANES).zip(acc.chunks_exact_mut(LANES)) {
        let mut v: [f64; LANES] = (&*a).try_into().expect("LANES columns");
        for (&h, x) in h.iter().zip(&x) {
            let w = lanes_f64(x, c0, f16c);
            for l in 0..LANES {
                v[l] += h * w[l];
            }
        }
        a.copy_from_slice(&v);
    }
    for c in full..n {
        let mut a = acc[c];
        for (h, x) in h.iter().zip(&x) {
            a += h * x[c].to_f32() as f64;
        }
        acc[c] = a;
    }
}
