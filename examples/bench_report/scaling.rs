//! `--scaling`: how the time grows with N x D, and how it depends on M at a fixed
//! N x D (the "time grows linearly in N x D; flat in M").
//!
//! * **N x D**: the main shape's N and D each cut by 2, 4 and 8 (N = 256 with D,
//!   D / 2, D / 4, D / 8; D with N = 128, 64, 32), at b = 1 (the input read twice)
//!   and b = 8 (read once, means stored). Per b, a least-squares line
//!   `t = a + k * N x D` over the seven shapes: `k` (ms per million elements) is
//!   the cost of the bytes, `a` the fixed cost of a call (dispatches, read-back);
//!   linear growth means every shape lies close to the line. The read-sum's own
//!   line gives the slope ratio: the read_ratio that large inputs tend to.
//! * **M**: the main shape at b = 1, 2, 4, ..., 256 (M = 256 down to 1).
//!
//! The raw times follow the host's speed, which on a shared VM wanders by up to
//! 2x between shapes (BENCHMARKS.md, thirty-sixth session); each shape's
//! read_ratio (against the read-sum interleaved with it) does not. So the N x D
//! summary also gives the read_ratio's range over the shapes (linear growth:
//! a narrow range, since the read-sum's own time is linear), and the M table
//! its read_ratio over the one at M = 1 beside the ratio of raw times.
//!
//! The rows also go to `--json` (cases `scaling: N x D` and `scaling: M`); the
//! summary line does not count them.

use crate::cases::Sizes;
use crate::report::Row;

/// Case name of the rows that vary N x D.
pub const CASE_ND: &str = "scaling: N x D";
/// Case name of the rows that vary M at a fixed N x D.
pub const CASE_M: &str = "scaling: M";
/// Micro-batch sizes of the N x D series.
const ND_BS: [usize; 2] = [1, 8];

/// Whether a row belongs to the scaling series.
pub fn is_scaling(row: &Row) -> bool {
    row.case == CASE_ND || row.case == CASE_M
}

/// Measures one shape: (case, N, D, the b to run) -> one microclip row per b.
pub type Measure<'a> = dyn FnMut(&str, usize, usize, &[usize]) -> Result<Vec<Row>, String> + 'a;

/// Runs both series through `measure` and returns their rows.
pub fn run(sizes: &Sizes, measure: &mut Measure<'_>) -> Result<Vec<Row>, String> {
    let (n0, d0) = sizes.main;
    let mut shapes = vec![(n0, d0)];
    for cut in [2, 4, 8] {
        shapes.push((n0, (d0 / cut).max(1)));
        shapes.push(((n0 / cut).max(8), d0));
    }
    let mut rows = Vec::new();
    for (n, d) in shapes {
        rows.extend(measure(CASE_ND, n, d, &ND_BS)?);
    }
    let bs: Vec<usize> = (0..).map(|k| 1 << k).take_while(|&b| b <= n0).collect();
    rows.extend(measure(CASE_M, n0, d0, &bs)?);
    Ok(rows)
}

/// Least-squares line through (x, y): (intercept, slope).
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { f64::NAN };
    (my - slope * mx, slope)
}

/// The two series as markdown tables with the fitted lines.
pub fn footer(rows: &[Row]) -> Vec<String> {
    let mut out = vec![
        String::new(),
        "## scaling: time against N x D (`--scaling`)".to_string(),
        String::new(),
        "| b | N | D | N x D (M elements) | median ms | read-sum ms | read_ratio | ms per M elements | fit ms | (median - fit) / median |".to_string(),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".to_string(),
    ];
    let mut fits = Vec::new();
    for b in ND_BS {
        let mut series: Vec<&Row> = rows
            .iter()
            .filter(|r| r.case == CASE_ND && r.b == b)
            .collect();
        series.sort_by_key(|r| (r.n * r.d, r.n));
        let elems = |r: &Row| (r.n * r.d) as f64 / 1e6;
        let points: Vec<(f64, f64)> = series.iter().map(|r| (elems(r), r.median_ms)).collect();
        if points.len() < 2 {
            continue;
        }
        let (a, k) = fit(&points);
        let mut worst: f64 = 0.0;
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for r in &series {
            lo = lo.min(r.read_ratio());
            hi = hi.max(r.read_ratio());
            let line = a + k * elems(r);
            let dev = (r.median_ms - line) / r.median_ms;
            worst = worst.max(dev.abs());
            out.push(format!(
                "| {b} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} | {:+.3} |",
                r.n,
                r.d,
                elems(r),
                r.median_ms,
                r.read_ms,
                r.read_ratio(),
                r.median_ms / elems(r),
                line,
                dev
            ));
        }
        let (ra, rk) = fit(&series
            .iter()
            .map(|r| (elems(r), r.read_ms))
            .collect::<Vec<_>>());
        fits.push(format!(
            "b = {b}: t = {a:.3} ms + {k:.4} ms per million elements (N x D), largest |deviation| from the line {:.1}% of the time; the read-sum's line {ra:.3} ms + {rk:.4} ms per million: slope ratio {:.2} (the read_ratio of large inputs, fixed costs aside); read_ratio over the {} shapes {lo:.2}-{hi:.2}",
            100.0 * worst,
            k / rk,
            series.len()
        ));
    }
    out.push(String::new());
    out.extend(fits);

    let series: Vec<&Row> = rows.iter().filter(|r| r.case == CASE_M).collect();
    if let Some(last) = series.iter().max_by_key(|r| r.b) {
        out.extend([
            String::new(),
            format!(
                "## scaling: time against M at N = {}, D = {} (`--scaling`)",
                last.n, last.d
            ),
            String::new(),
            format!(
                "| b | M | median ms | read-sum ms | read_ratio | time / time at M = {0} | read_ratio / read_ratio at M = {0} |",
                last.micro_batches()
            ),
            "|---:|---:|---:|---:|---:|---:|---:|".to_string(),
        ]);
        for r in &series {
            out.push(format!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                r.b,
                r.micro_batches(),
                r.median_ms,
                r.read_ms,
                r.read_ratio(),
                r.median_ms / last.median_ms,
                r.read_ratio() / last.read_ratio()
            ));
        }
    }
    out
}
