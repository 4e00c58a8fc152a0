//! Start-up checks of the bench's own kernels on a small, awkward shape
//! (N = 50, D = 10,007: rows not 16-byte aligned, a ragged last micro-batch),
//! with every binding limited to 1 MiB so that the window paths of the bench
//! kernels and of microclip all run:
//!
//! * read-and-sum equals the host sum (f64) to 1e-5 of sum |x|;
//! * the copy kernel's destination equals the source, bit for bit;
//! * the 5-pass baseline agrees with microclip to relative L2 < 1e-4, b = 1 and 8
//!   (and both with the float64 reference).
//!
//! Any failure aborts the report.

use microclip::reference::clip_f64;
use microclip::{ClipConfig, Clipper, GpuTensor, GpuTensorMut, MicroBatches};

use crate::data;
use crate::kernels::{Baseline, Gpu, RefKernels};

const N: usize = 50;
const D: usize = 10_007;
const WINDOW: u64 = 1 << 20;

fn rel_l2_f64(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(want) {
        num += (a as f64 - b).powi(2);
        den += b * b;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Runs the checks; returns one line per check for the report header.
pub fn verify(gpu: &Gpu, refk: &RefKernels, baseline: &Baseline) -> Result<Vec<String>, String> {
    let small = Gpu::new(gpu.device.clone(), gpu.queue.clone(), Some(WINDOW));
    let host = data::host_tensor(7, 0, N, D);
    let x = data::device_tensor(&small, 7, 0, N, D)?;
    let bytes = (N * D * 4) as u64;
    let mut lines = Vec::new();

    // Read-and-sum.
    let rs = refk.read_sum(&small, &x, bytes);
    rs.job.run(&small);
    let got = rs.result(&small);
    let covered = &host[..(rs.bytes / 4) as usize];
    let want: f64 = covered.iter().map(|&v| v as f64).sum();
    let abs: f64 = covered.iter().map(|&v| (v as f64).abs()).sum();
    if (got - want).abs() > 1e-5 * abs {
        return Err(format!("check: read_sum = {got}, host sum = {want}"));
    }

    // Copy.
    let dst = small.storage_buffer("check copy", bytes)?;
    refk.copy(&small, &x, &dst, bytes).run(&small);
    let copied = small.read_bytes(&dst, 0, rs.bytes);
    if copied != bytemuck::cast_slice::<f32, u8>(covered) {
        return Err("check: copy kernel output differs from its input".into());
    }
    lines.push(format!(
        "check: read-sum (rel err {:.1e}) and copy ok over {} windows of <= 1 MiB",
        (got - want).abs() / want.abs(),
        rs.job.dispatches()
    ));

    // 5-pass baseline against microclip (both windowed) and the f64 reference.
    let mut clipper =
        Clipper::from_device(gpu.device.clone(), gpu.queue.clone()).map_err(|e| e.to_string())?;
    clipper.set_max_binding_bytes(WINDOW);
    let out = small.storage_buffer("check out", (D * 4) as u64)?;
    let input = [GpuTensor::new(&x, 0, D)];
    let output = [GpuTensorMut {
        buffer: &out,
        offset: 0,
        cols: D,
    }];
    for b in [1, 8] {
        let probe = clipper
            .clip_buffers_into(
                &ClipConfig::fixed(f32::MAX, MicroBatches::Uniform(b)),
                &input,
                N,
                &output,
            )
            .map_err(|e| e.to_string())?;
        let mut norms = probe.norms.clone();
        norms.sort_by(f32::total_cmp);
        let c = norms[norms.len() / 2];
        let cfg = ClipConfig::fixed(c, MicroBatches::Uniform(b));
        let stats = clipper
            .clip_buffers_into(&cfg, &input, N, &output)
            .map_err(|e| e.to_string())?;
        let ours = small.read_f32(&out, 0, D as u64);
        let job = baseline.prepare(&small, &x, N, D, b, c)?;
        job.job.run(&small);
        let theirs = small.read_f32(&job.out, 0, D as u64);
        let ours64: Vec<f64> = ours.iter().map(|&v| v as f64).collect();
        let err = rel_l2_f64(&theirs, &ours64);
        let reference = clip_f64(&cfg, &[&host], N).map_err(|e| e.to_string())?;
        let err_ours = rel_l2_f64(&ours, &reference.grads[0]);
        let err_theirs = rel_l2_f64(&theirs, &reference.grads[0]);
        if !(err < 1e-4 && err_ours < 1e-4 && err_theirs < 1e-4) {
            return Err(format!(
                "check b={b}: relative L2 5-pass vs microclip {err:.2e}, microclip vs f64 {err_ours:.2e}, 5-pass vs f64 {err_theirs:.2e}"
            ));
        }
        lines.push(format!(
            "check b={b}: 5-pass vs microclip rel L2 {err:.1e} (vs f64 reference: microclip {err_ours:.1e}, 5-pass {err_theirs:.1e}; clipped {}/{}; {} baseline dispatches)",
            stats.clipped_count,
            stats.norms.len(),
            job.job.dispatches()
        ));
    }
    Ok(lines)
}
