//! Two passes over fixed column blocks (rayon over blocks): the norms of every
//! micro-batch mean, then, once the factors are known, the weighted sum. Each block's
//! working set (one f64 mean or accumulator row of `BLOCK_COLS`) stays in the
//! core's cache; the input is read twice.

use rayon::prelude::*;

use super::{add_row, axpy, factors, scale_and_sum_squares, sum_squares, PathOutput, Plan};
use crate::error::Result;

/// Squared norm of block `b`'s part of micro-batch `j`'s mean; `sum` is scratch.
fn block_ssq(plan: &Plan<'_>, b: &super::Block, j: usize, sum: &mut [f64]) -> f64 {
    let rows = plan.rows(j);
    if rows.len() == 1 {
        return sum_squares(plan.segment(b, rows.start));
    }
    let inv_n = 1.0 / rows.len() as f64;
    let sum = &mut sum[..b.w];
    for i in rows.clone() {
        add_row(sum, plan.segment(b, i), i == rows.start);
    }
    scale_and_sum_squares(sum, inv_n, None)
}

pub(super) fn run(plan: &Plan<'_>) -> Result<PathOutput> {
    let (m, g) = (plan.micro_batches(), plan.groups);
    // Pass 1: per block, the squared norm of each micro-batch mean.
    let ssq: Vec<Vec<f64>> = plan
        .blocks
        .par_iter()
        .map(|b| {
            let mut sum = vec![0.0f64; b.w];
            (0..m).map(|j| block_ssq(plan, b, j, &mut sum)).collect()
        })
        .collect();
    let norms: Vec<f64> = (0..m).flat_map(|j| plan.norms(|k| ssq[k][j])).collect();

    // Pass 2: sum_j s_j * mean_j = sum_i (s_j(i) / n_j(i)) * x_i, block by block.
    let f = factors(plan, &norms)?;
    let block_sums: Vec<Vec<f64>> = plan
        .blocks
        .par_iter()
        .map(|b| {
            let mut acc = vec![0.0f64; b.w];
            for j in 0..m {
                let s = f.factors[j * g + plan.group(b)];
                if s == 0.0 && !plan.propagate {
                    continue;
                }
                let rows = plan.rows(j);
                let coef = s / rows.len() as f64;
                for i in rows {
                    axpy(&mut acc, coef, plan.segment(b, i));
                }
            }
            acc
        })
        .collect();
    let mut sums: Vec<Vec<f64>> = plan.widths.iter().map(|&d| Vec::with_capacity(d)).collect();
    for (b, s) in plan.blocks.iter().zip(block_sums) {
        sums[b.tensor].extend_from_slice(&s);
    }
    Ok(PathOutput {
        norms,
        sums,
        adaptive_scaled: false,
    })
}
